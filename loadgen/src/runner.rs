//! Runs a workload: connect, preload, warm up, measure, report.
//!
//! Shape of a run:
//! - `connections` clients (each its own TCP connection per shard) and
//!   `pipeline` request loops per client, so up to `pipeline` requests are
//!   outstanding on each connection;
//! - request loop `w` of `W` owns keys `w, w+W, ...` ([`Partition`]): it is
//!   the only writer of its keys, so it always knows which version of each
//!   piece of each key is on the server (or, after a failed write, which two
//!   may be); a piece is the `--io-size` bytes at one aligned offset of the
//!   chunk, or the whole value without `--io-size` (see `content`);
//! - preload (optional) writes every piece of every key once, in order;
//!   warmup runs the workload
//!   unmeasured; the measurement counts operations *started* in the measured
//!   window (and, with a duration, completed in it);
//! - each loop records into its client's [`ConnStats`] (an uncontended lock
//!   per operation); a reporter drains the interval figures once a second
//!   for the progress line, the timeline and the HdrHistogram log, while the
//!   totals are kept apart so an interval boundary never loses a sample.

use crate::config::Config;
use crate::content;
use crate::content::PieceAt;
use crate::cpu::CpuTimes;
use crate::keys::{hash_words, Distribution, KeyGen, Partition, Pick, Rng, Zipf};
use crate::progress::Progress;
use crate::recorder::{
    error_kind, is_integrity_failure, latency_ns, Op, Pacer, Stats, VERIFY_MISMATCH,
};
use crate::report::{Interval, Preload};
use bytes::Bytes;
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2DeflateSerializer;
use shardstore_client::{
    ChunkId, Client, ClientConfig, ClientError, ReadOptions, ShardId, Topology,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// Loadgen chunks live under this prefix: chunk id = `KEY_PREFIX << 64 | key`
/// (`4c47` is "LG"), so they are recognisable in `shardstore ls`.
pub const KEY_PREFIX: u128 = 0x4c47;

pub fn chunk_of(key: u64) -> ChunkId {
    ChunkId((KEY_PREFIX << 64) | u128::from(key))
}

/// Most integrity failures printed one by one; the rest are only counted.
const MAX_PRINTED_FAILURES: u64 = 50;

/// Open loop: the last stretch before an intended send time is waited out
/// by yielding instead of a timer, whose 1 ms granularity would otherwise be
/// charged to the request's latency.
const SPIN_WINDOW: Duration = Duration::from_millis(1);

/// Why a run produced no figures.
#[derive(Debug)]
pub enum RunError {
    /// The target could not be reached or did not answer its topology.
    Unreachable(String),
    /// Anything else that stops the run before it produced figures.
    Fatal(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Unreachable(m) => write!(f, "target unreachable: {m}"),
            RunError::Fatal(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for RunError {}

/// Everything the report is built from.
pub struct RunData {
    pub topology: Topology,
    pub totals: Stats,
    pub timeline: Vec<Interval>,
    pub measured: Duration,
    pub cpu: CpuTimes,
    pub preload: Option<Preload>,
    pub schedule_deficit: u64,
    pub reads_checked: u64,
    pub integrity_failures: u64,
    pub started: SystemTime,
}

/// The statistics of one client, shared by its request loops.
#[derive(Default)]
struct ConnStats {
    /// Drained by the reporter every second (warmup included).
    interval: Stats,
    /// The measured window only.
    total: Stats,
}

fn lock(m: &Mutex<ConnStats>) -> MutexGuard<'_, ConnStats> {
    // Recording cannot panic halfway; a poisoned lock still holds good data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a piece's owner knows about it: versions `low..=high` may be on the
/// server (equal unless a write failed and might or might not have landed);
/// 0 means "never written by this run".
#[derive(Debug, Clone, Copy, Default)]
struct KeyState {
    low: u32,
    high: u32,
}

/// Run-wide facts and counters shared by all request loops.
struct Shared {
    cfg: Config,
    workers: u64,
    /// Random bytes that unverified writes slice their payload from.
    pool: Bytes,
    measure_start: Instant,
    /// End of the measured window (duration mode).
    end: Option<Instant>,
    /// Measured operations claimed so far (`--ops` mode).
    claimed: AtomicU64,
    stop: AtomicBool,
    reads_checked: AtomicU64,
    integrity_failures: AtomicU64,
    finished: AtomicUsize,
    all_done: tokio::sync::Notify,
}

impl Shared {
    fn report_integrity_failure(&self, msg: String) {
        let n = self.integrity_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= MAX_PRINTED_FAILURES {
            eprintln!("shardstore-loadgen: INTEGRITY FAILURE: {msg}");
        } else if n == MAX_PRINTED_FAILURES + 1 {
            eprintln!(
                "shardstore-loadgen: INTEGRITY FAILURE: more than {MAX_PRINTED_FAILURES}; the rest are only counted"
            );
        }
    }
}

struct Worker {
    id: u64,
    client: Client,
    part: Partition,
    keys: KeyGen,
    rng: Rng,
    /// Pieces per chunk (`Config::pieces`).
    pieces: u64,
    /// Piece `p` of local key `i` is at `i * pieces + p`.
    state: Vec<KeyState>,
    stats: Arc<Mutex<ConnStats>>,
}

enum Outcome {
    Ok(u64),
    Miss,
    Err(&'static str),
}

impl Worker {
    /// Length of `version` of a piece of `key`: the io size, or without
    /// `--io-size` the value size that version was written with.
    fn len_of(cfg: &Config, key: u64, version: u64) -> u64 {
        match cfg.io_size {
            Some(n) => n,
            None => cfg.size.size_of(cfg.seed, key, version),
        }
    }

    /// Where `pick` is: the piece's key and offset, and its state's slot.
    fn locate(&self, cfg: &Config, pick: Pick) -> (PieceAt, usize) {
        let key = cfg.key_offset + self.part.key(pick.index);
        let offset = pick.piece * cfg.io_size.unwrap_or(0);
        let slot = pick.index * self.pieces + pick.piece;
        (PieceAt { key, offset }, slot as usize)
    }

    /// Whether some write to the chunk of local key `index` was acknowledged
    /// (then the chunk must exist).
    fn chunk_acknowledged(&self, index: u64) -> bool {
        let first = (index * self.pieces) as usize;
        self.state[first..first + self.pieces as usize]
            .iter()
            .any(|s| s.low > 0)
    }

    async fn write(&mut self, sh: &Shared, pick: Pick) -> Outcome {
        let cfg = &sh.cfg;
        let (at, slot) = self.locate(cfg, pick);
        let key = at.key;
        let st = &mut self.state[slot];
        let version = st.high + 1;
        let len = Self::len_of(cfg, key, u64::from(version));
        let payload = if cfg.verify {
            Bytes::from(content::value(
                at,
                u64::from(version),
                cfg.seed,
                len as usize,
            ))
        } else {
            sh.pool.slice(0..len as usize)
        };
        match self.client.write(chunk_of(key), at.offset, payload).await {
            Ok(_) => {
                *st = KeyState {
                    low: version,
                    high: version,
                };
                Outcome::Ok(len)
            }
            Err(e) => {
                // It may have landed: either version may be read from now on.
                st.high = version;
                Outcome::Err(self.failed(sh, Op::Write, key, &e))
            }
        }
    }

    async fn read(&mut self, sh: &Shared, pick: Pick) -> Outcome {
        let cfg = &sh.cfg;
        let (at, slot) = self.locate(cfg, pick);
        let key = at.key;
        let st = self.state[slot];
        let len = if st.high == 0 {
            Self::len_of(cfg, key, 0)
        } else {
            let hi = Self::len_of(cfg, key, u64::from(st.high));
            if st.low == 0 {
                hi
            } else {
                hi.max(Self::len_of(cfg, key, u64::from(st.low)))
            }
        };
        // A sequential walk over consecutive chunk ids (one worker: its keys
        // are consecutive) tells the server that the stream goes on into
        // the next chunk, except from the last key (the walk wraps around).
        let opts = ReadOptions {
            continues_into_next_chunk: matches!(cfg.distribution, Distribution::Sequential)
                && self.part.stride == 1
                && pick.index + 1 < self.part.len,
        };
        match self
            .client
            .read_with(chunk_of(key), at.offset, len as u32, opts)
            .await
        {
            // Past the end of a chunk whose other pieces exist: this piece
            // was never written either.
            Ok(r) if r.data.is_empty() && st.high == 0 => Outcome::Miss,
            Ok(r) => {
                if cfg.verify && st.high > 0 {
                    sh.reads_checked.fetch_add(1, Ordering::Relaxed);
                    let checked = content::check(
                        &r.data,
                        len as usize,
                        at,
                        cfg.seed,
                        u64::from(st.low.max(1)),
                        u64::from(st.high),
                        |v| Self::len_of(cfg, key, v),
                    );
                    match checked {
                        Ok(v) => {
                            // Version v is on the server: older ones can no
                            // longer come back (a failed newer write still may).
                            self.state[slot].low = v as u32;
                        }
                        Err(m) => {
                            sh.report_integrity_failure(format!(
                                "key {key} (chunk {}) read of {len} bytes at offset {} by loop {}: {m}",
                                chunk_of(key),
                                at.offset,
                                self.id
                            ));
                            return Outcome::Err(VERIFY_MISMATCH);
                        }
                    }
                }
                Outcome::Ok(r.data.len() as u64)
            }
            Err(ClientError::NotFound(_)) if !self.chunk_acknowledged(pick.index) => Outcome::Miss,
            // Acknowledged, then gone: data lost, whatever the error budget.
            Err(ClientError::NotFound(_)) if cfg.verify => {
                sh.report_integrity_failure(format!(
                    "key {key} (chunk {}) read by loop {}: NOT_FOUND after a write of it was acknowledged",
                    chunk_of(key),
                    self.id
                ));
                Outcome::Err(VERIFY_MISMATCH)
            }
            Err(e) => Outcome::Err(self.failed(sh, Op::Read, key, &e)),
        }
    }

    fn failed(&self, sh: &Shared, op: Op, key: u64, e: &ClientError) -> &'static str {
        let kind = error_kind(e);
        if is_integrity_failure(kind) {
            sh.report_integrity_failure(format!(
                "key {key} (chunk {}) {}: {e}",
                chunk_of(key),
                op.name()
            ));
        }
        kind
    }

    /// Writes every piece of every key of the partition once, each chunk
    /// from its start to its end. Returns (keys, writes, errors).
    async fn preload(&mut self, sh: &Shared) -> (u64, u64, u64) {
        let mut errors = 0;
        for index in 0..self.part.len {
            for piece in 0..self.pieces {
                if let Outcome::Err(_) = self.write(sh, Pick { index, piece }).await {
                    errors += 1;
                }
            }
        }
        (self.part.len, self.part.len * self.pieces, errors)
    }

    /// The request loop. Returns (last measured completion, schedule deficit).
    async fn run(mut self, sh: Arc<Shared>, start: Instant) -> (Option<Instant>, u64) {
        let cfg = &sh.cfg;
        let mut pacer = match cfg.rate {
            Some(rate) => Pacer::open(
                start,
                rate / sh.workers as f64,
                self.id as f64 / sh.workers as f64,
            ),
            None => Pacer::Closed,
        };
        let read_ratio = cfg.read_ratio.0;
        let mut last_done = None;
        let mut sent_measured = 0u64;
        loop {
            if sh.stop.load(Ordering::Relaxed) {
                break;
            }
            let now = Instant::now();
            let intended = pacer.next_intended(now);
            // Nothing is sent once the window is over, however far behind
            // the schedule (open loop): what was due and not sent is the
            // schedule deficit, not a late request run after the end.
            if sh.end.is_some_and(|end| intended >= end || now >= end) {
                break;
            }
            let measured = intended >= sh.measure_start;
            if measured {
                if let Some(max) = cfg.ops {
                    if sh.claimed.fetch_add(1, Ordering::Relaxed) >= max {
                        sh.stop.store(true, Ordering::Relaxed);
                        break;
                    }
                }
                sent_measured += 1;
            }
            if intended > now {
                wait_until(intended).await;
            }
            let pick = self.keys.next_pick();
            let op = if self.rng.unit() < read_ratio {
                Op::Read
            } else {
                Op::Write
            };
            let outcome = match op {
                Op::Read => self.read(&sh, pick).await,
                Op::Write => self.write(&sh, pick).await,
            };
            let done = Instant::now();
            // Open loop: every request sent in the window counts, however
            // late its reply (the slowest ones are the point of measuring
            // from the schedule). Closed loop: those completed in it.
            let in_window =
                measured && (cfg.rate.is_some() || sh.end.is_none_or(|end| done <= end));
            let lat = latency_ns(intended, done);
            let mut s = lock(&self.stats);
            let record = |stats: &mut Stats| {
                let o = stats.op(op);
                match outcome {
                    Outcome::Ok(bytes) => o.record_ok(lat, bytes),
                    Outcome::Miss => o.misses += 1,
                    Outcome::Err(kind) => o.record_error(kind),
                }
            };
            record(&mut s.interval);
            if in_window {
                record(&mut s.total);
                last_done = Some(done);
            }
        }
        let deficit = match (cfg.rate, sh.end) {
            (Some(_), Some(end)) => (pacer.intended_before(end)
                - pacer.intended_before(sh.measure_start))
            .saturating_sub(sent_measured),
            _ => 0,
        };
        (last_done, deficit)
    }
}

async fn wait_until(t: Instant) {
    let now = Instant::now();
    if t > now + SPIN_WINDOW {
        tokio::time::sleep_until((t - SPIN_WINDOW).into()).await;
    }
    while Instant::now() < t {
        tokio::task::yield_now().await;
    }
}

fn client_config(cfg: &Config) -> Result<ClientConfig, RunError> {
    let mut c = ClientConfig {
        request_timeout: cfg.timeout,
        connect_timeout: Duration::from_secs(3),
        route_direct: !cfg.no_route_direct,
        max_in_flight_per_connection: cfg.pipeline as usize,
        ..ClientConfig::default()
    };
    cfg.security
        .apply(&mut c)
        .map_err(|e| RunError::Fatal(e.to_string()))?;
    Ok(c)
}

/// Connects `cfg.connections` clients and opens every connection they will
/// use, so connection setup is neither in the measurement nor a surprise.
async fn connect_all(cfg: &Config) -> Result<Vec<Client>, RunError> {
    let ccfg = client_config(cfg)?;
    let mut clients = Vec::with_capacity(cfg.connections as usize);
    for _ in 0..cfg.connections {
        let c = Client::connect_with(&cfg.addr, ccfg.clone())
            .await
            .map_err(|e| RunError::Unreachable(format!("{}: {e}", cfg.addr)))?;
        if ccfg.route_direct {
            for s in 0..c.topology().shard_count {
                c.ping_shard(ShardId(s)).await.map_err(|e| {
                    RunError::Unreachable(format!(
                        "shard {s} at {}: {e}",
                        c.topology().shard_addrs[s as usize]
                    ))
                })?;
            }
        } else {
            c.ping()
                .await
                .map_err(|e| RunError::Unreachable(format!("{}: {e}", cfg.addr)))?;
        }
        clients.push(c);
    }
    Ok(clients)
}

/// Runs the whole workload. Must be called inside a multi-thread tokio
/// runtime; the request loops are spawned onto its workers.
pub async fn run(cfg: Config) -> Result<RunData, RunError> {
    let clients = connect_all(&cfg).await?;
    let topology = clients[0].topology().clone();
    let io_max = cfg.io_spec().max();
    if io_max > u64::from(topology.max_payload) {
        return Err(RunError::Fatal(format!(
            "requests of up to {io_max} bytes (--io-size, or --size without it) exceed the node's max payload of {} bytes",
            topology.max_payload
        )));
    }
    if cfg.size.max() > topology.max_chunk_size {
        return Err(RunError::Fatal(format!(
            "--size up to {} bytes exceeds the node's max chunk size",
            cfg.size.max()
        )));
    }

    let workers = cfg.workers();
    let pieces = cfg.pieces();
    let mut pool = vec![0u8; io_max as usize];
    let mut r = Rng::new(hash_words(&[cfg.seed, 0x9001]));
    for c in pool.chunks_mut(8) {
        c.copy_from_slice(&r.next_u64().to_le_bytes()[..c.len()]);
    }
    let conn_stats: Vec<Arc<Mutex<ConnStats>>> = (0..cfg.connections)
        .map(|_| Arc::new(Mutex::new(ConnStats::default())))
        .collect();
    let mut zipfs: HashMap<u64, Zipf> = HashMap::new();
    let mut loops = Vec::with_capacity(workers as usize);
    for w in 0..workers {
        let part = Partition::new(cfg.keys, workers, w);
        let zipf = match cfg.distribution {
            crate::keys::Distribution::Zipf { theta } => Some(
                zipfs
                    .entry(part.len)
                    .or_insert_with(|| Zipf::new(part.len, theta))
                    .clone(),
            ),
            _ => None,
        };
        let c = (w / u64::from(cfg.pipeline)) as usize;
        loops.push(Worker {
            id: w,
            client: clients[c].clone(),
            keys: KeyGen::new(
                cfg.distribution,
                part.len,
                hash_words(&[cfg.seed, w, 1]),
                zipf,
            )
            .with_pieces(pieces),
            rng: Rng::new(hash_words(&[cfg.seed, w, 2])),
            pieces,
            state: vec![KeyState::default(); (part.len * pieces) as usize],
            part,
            stats: conn_stats[c].clone(),
        });
    }
    drop(clients);

    let mut sh = Shared {
        cfg,
        workers,
        pool: Bytes::from(pool),
        measure_start: Instant::now(),
        end: None,
        claimed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        reads_checked: AtomicU64::new(0),
        integrity_failures: AtomicU64::new(0),
        finished: AtomicUsize::new(0),
        all_done: tokio::sync::Notify::new(),
    };
    let quiet = sh.cfg.quiet;

    // Preload: every loop writes its own keys, all loops in parallel.
    let preload = if sh.cfg.preload_enabled() {
        if !quiet {
            eprintln!(
                "preloading {} keys of {} bytes in writes of {} bytes...",
                sh.cfg.keys,
                sh.cfg.size,
                sh.cfg.io_spec()
            );
        }
        let t = Instant::now();
        let shp = Arc::new(sh);
        let handles: Vec<_> = loops
            .into_iter()
            .map(|mut w| {
                let shp = shp.clone();
                tokio::spawn(async move {
                    let r = w.preload(&shp).await;
                    (w, r)
                })
            })
            .collect();
        let mut back = Vec::with_capacity(handles.len());
        let (mut keys, mut writes, mut errors) = (0, 0, 0);
        for h in handles {
            let (w, (k, n, e)) = h
                .await
                .map_err(|e| RunError::Fatal(format!("preload task: {e}")))?;
            keys += k;
            writes += n;
            errors += e;
            back.push(w);
        }
        loops = back;
        sh = Arc::try_unwrap(shp).unwrap_or_else(|_| unreachable!("every preload task has ended"));
        if errors > 0 {
            return Err(RunError::Fatal(format!(
                "preload failed: {errors} of {writes} writes failed (see the errors above, or run with RUST_LOG=debug); \
                 figures on a partly loaded key space would mislead"
            )));
        }
        // Preload samples are not part of any figure.
        for s in &conn_stats {
            lock(s).interval.reset();
        }
        Some(Preload {
            keys,
            writes,
            seconds: t.elapsed().as_secs_f64(),
            errors,
        })
    } else {
        None
    };

    let started = SystemTime::now();
    let start = Instant::now();
    sh.measure_start = start + sh.cfg.warmup;
    sh.end = match sh.cfg.ops {
        Some(_) => None,
        None => Some(sh.measure_start + sh.cfg.duration),
    };
    let sh = Arc::new(sh);
    let handles: Vec<_> = loops
        .into_iter()
        .map(|w| {
            let sh = sh.clone();
            tokio::spawn(async move {
                let r = w.run(sh.clone(), start).await;
                if sh.finished.fetch_add(1, Ordering::AcqRel) + 1 == sh.workers as usize {
                    sh.all_done.notify_one();
                }
                r
            })
        })
        .collect();

    let reported = report_loop(&sh, &conn_stats, start, started).await?;

    let mut last_done: Option<Instant> = None;
    let mut schedule_deficit = 0;
    for h in handles {
        let (ld, deficit) = h
            .await
            .map_err(|e| RunError::Fatal(format!("request loop: {e}")))?;
        last_done = last_done.max(ld);
        schedule_deficit += deficit;
    }
    let cpu = CpuTimes::now().since(&reported.cpu_start);
    let measured = match sh.end {
        Some(_) => sh.cfg.duration,
        None => last_done
            .map(|t| t.saturating_duration_since(sh.measure_start))
            .unwrap_or_default(),
    };
    let mut totals = Stats::default();
    for s in &conn_stats {
        totals.merge(&lock(s).total);
    }
    Ok(RunData {
        topology,
        totals,
        timeline: reported.timeline,
        measured,
        cpu,
        preload,
        schedule_deficit,
        reads_checked: sh.reads_checked.load(Ordering::Relaxed),
        integrity_failures: sh.integrity_failures.load(Ordering::Relaxed),
        started,
    })
}

struct Reported {
    timeline: Vec<Interval>,
    cpu_start: CpuTimes,
}

/// Once a second: drain the interval figures, print the progress line,
/// append to the timeline and the HdrHistogram log. Returns when every
/// request loop has ended.
async fn report_loop(
    sh: &Shared,
    conn_stats: &[Arc<Mutex<ConnStats>>],
    start: Instant,
    started: SystemTime,
) -> Result<Reported, RunError> {
    let cfg = &sh.cfg;
    let total_s = sh.end.map(|end| (end - start).as_secs_f64().ceil() as u64);
    let progress = Progress::new(cfg.quiet, total_s);
    let mut hdr_buf: Vec<u8> = Vec::new();
    let mut serializer = V2DeflateSerializer::new();
    let measure_wall = started + cfg.warmup;
    let mut hdr = if cfg.hdr_log.is_some() {
        let mut b = IntervalLogWriterBuilder::new();
        b.with_base_time(measure_wall)
            .with_start_time(measure_wall)
            .with_max_value_divisor(1e6)
            .add_comment(
                "shardstore-loadgen: latency in nanoseconds; MaxValueDivisor 1e6 prints ms",
            )
            .add_comment(&format!(
                "config: {}",
                serde_json::to_string(&cfg.effective()).unwrap_or_default()
            ));
        Some(
            b.begin_log_with(&mut hdr_buf, &mut serializer)
                .map_err(|e| RunError::Fatal(format!("hdr log: {e}")))?,
        )
    } else {
        None
    };

    let mut timeline = Vec::new();
    let mut cpu_start = CpuTimes::now();
    let mut measuring = sh.measure_start <= start;
    let mut interval_start = start;
    let mut interval = Stats::default();
    loop {
        let all_done = sh.finished.load(Ordering::Acquire) == sh.workers as usize;
        let mut next = interval_start + Duration::from_secs(1);
        if !measuring {
            next = next.min(sh.measure_start);
        }
        if let Some(end) = sh.end {
            if measuring && interval_start >= end {
                // Past the window: nothing more to report, only wait.
                if !all_done {
                    sh.all_done.notified().await;
                }
                break;
            }
            next = next.min(end);
        }
        let woke_by_done = if all_done {
            true
        } else {
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => false,
                _ = sh.all_done.notified() => true,
            }
        };
        let now = if woke_by_done {
            Instant::now().min(next)
        } else {
            next
        };
        for s in conn_stats {
            let mut g = lock(s);
            interval.merge(&g.interval);
            g.interval.reset();
        }
        let len = now.saturating_duration_since(interval_start);
        let combined = interval.combined();
        if measuring {
            let t_s = now
                .saturating_duration_since(sh.measure_start)
                .as_secs_f64();
            let entry = Interval::from_stats(&combined, t_s, len.as_secs_f64());
            progress.tick(
                &entry,
                "run",
                now.saturating_duration_since(start).as_secs(),
            );
            if let Some(w) = hdr.as_mut() {
                for op in Op::ALL {
                    let h = &interval.get(op).hist;
                    if h.is_empty() {
                        continue;
                    }
                    let from = interval_start.saturating_duration_since(sh.measure_start);
                    w.write_histogram(h, from, len, Tag::new(op.name()))
                        .map_err(|e| RunError::Fatal(format!("hdr log: {e}")))?;
                }
            }
            if len > Duration::ZERO {
                timeline.push(entry);
            }
        } else {
            let t_s = now.saturating_duration_since(start).as_secs_f64();
            let entry = Interval::from_stats(&combined, t_s, len.as_secs_f64());
            progress.tick(
                &entry,
                "warmup",
                now.saturating_duration_since(start).as_secs(),
            );
        }
        interval.reset();
        interval_start = now;
        if !measuring && now >= sh.measure_start {
            measuring = true;
            cpu_start = CpuTimes::now();
        }
        if woke_by_done || sh.finished.load(Ordering::Acquire) == sh.workers as usize {
            break;
        }
    }
    progress.finish();
    drop(hdr);
    if let Some(path) = &cfg.hdr_log {
        std::fs::write(path, &hdr_buf)
            .map_err(|e| RunError::Fatal(format!("writing {}: {e}", path.display())))?;
    }
    Ok(Reported {
        timeline,
        cpu_start,
    })
}
