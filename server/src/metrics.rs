//! Prometheus text endpoint (`GET /metrics` on `metrics_addr`).
//!
//! Shards never serve scrapes and never share counters: each shard copies its
//! own `Cell` counters into a [`Snapshot`] every `metrics_interval` (one
//! uncontended per-shard mutex, outside the request path) onto the node's
//! [`Board`]. A plain std thread owns the metrics listener and renders the
//! board on each scrape, so a scrape costs the shards nothing. Figures are
//! therefore up to one interval old; `shardstore_snapshot_age_seconds` says
//! how old. The same board feeds the systemd watchdog (`lifecycle.rs`).

use crate::handler::ShardCtx;
use crate::stats::{RdmaCounters, LATENCY_BOUNDS_US, LATENCY_BUCKETS, OPCODE_SLOTS};
use shardstore_proto::{ErrorCode, Opcode, StatsReply};
use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{debug, info, warn};

/// One shard's figures at one instant. Plain data, `Send`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub taken: Instant,
    pub cpu: usize,
    /// The same figures STATS answers with.
    pub stats: StatsReply,
    /// Sum of execution times by opcode (for the histograms' `_sum`).
    pub latency_sum_us: [u64; OPCODE_SLOTS],
    /// Sum of READ execution times served from the cache, and not.
    pub read_cached_sum_us: u64,
    pub read_uncached_sum_us: u64,
}

impl Snapshot {
    pub fn take(ctx: &ShardCtx, cpu: usize) -> Snapshot {
        Snapshot {
            taken: Instant::now(),
            cpu,
            stats: ctx.stats(),
            latency_sum_us: std::array::from_fn(|op| ctx.counters.latency[op].sum_us.get()),
            read_cached_sum_us: ctx.counters.read_cached.sum_us.get(),
            read_uncached_sum_us: ctx.counters.read_uncached.sum_us.get(),
        }
    }

    /// Requests of opcode slot `op` in latency bucket `b`.
    fn latency(&self, op: usize, b: usize) -> u64 {
        self.stats
            .latency_counts
            .get(op * LATENCY_BUCKETS + b)
            .copied()
            .unwrap_or(0)
    }
}

/// Node facts fixed at start-up, shown on every scrape.
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    pub node_id: u128,
    pub data_dir: PathBuf,
}

/// Where shards publish and scrapes read. One slot (and one mutex) per
/// shard, so shards never contend with each other.
pub struct Board {
    slots: Vec<Mutex<Option<Snapshot>>>,
    facts: NodeFacts,
    started: SystemTime,
    draining: AtomicBool,
    /// The RDMA thread's counters, when it runs.
    rdma: OnceLock<Arc<RdmaCounters>>,
}

impl Board {
    pub fn new(shards: usize, facts: NodeFacts) -> Arc<Board> {
        Arc::new(Board {
            slots: (0..shards).map(|_| Mutex::new(None)).collect(),
            facts,
            started: SystemTime::now(),
            draining: AtomicBool::new(false),
            rdma: OnceLock::new(),
        })
    }

    /// Exports the RDMA thread's counters from now on.
    pub fn attach_rdma(&self, counters: Arc<RdmaCounters>) {
        let _ = self.rdma.set(counters);
    }

    pub fn publish(&self, shard: usize, s: Snapshot) {
        if let Some(slot) = self.slots.get(shard) {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
        }
    }

    fn read(&self) -> Vec<Option<Snapshot>> {
        self.slots
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// A shard whose last snapshot is older than `max_age` (or missing).
    pub fn stale_shard(&self, max_age: Duration) -> Option<usize> {
        self.read()
            .iter()
            .position(|s| s.as_ref().is_none_or(|s| s.taken.elapsed() > max_age))
    }
}

/// Runs on a shard: publishes a snapshot now and then every `interval`.
pub async fn publish_loop(ctx: Rc<ShardCtx>, board: Arc<Board>, cpu: usize, interval: Duration) {
    let shard = ctx.id.0 as usize;
    loop {
        board.publish(shard, Snapshot::take(&ctx, cpu));
        glommio::timer::sleep(interval).await;
    }
}

/// Serves `/metrics` on `listener` from a plain thread (one request per
/// connection, the request's read and the response's write each bounded
/// in total time: it is a management port).
pub fn spawn_server(listener: TcpListener, board: Arc<Board>) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            info!(%addr, "metrics endpoint listening");
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        if let Err(e) = answer(stream, &board) {
                            debug!(error = %e, "metrics request failed");
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "metrics accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok(())
}

/// A request must arrive whole within this once the thread takes it up.
/// One thread answers every scrape: a client sending a byte now and then
/// must not hold it past this, whatever each read's timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pause allowed between a request's bytes (and before the first).
const READ_PAUSE: Duration = Duration::from_secs(2);
/// A response must be taken whole within this once its write starts, or
/// the connection is reset. A timeout per send alone (SO_SNDTIMEO) starts
/// again after every partial send: a client reading a byte now and then
/// held the one thread, and so every other scrape, for as long as it read.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

fn answer(mut stream: TcpStream, board: &Board) -> std::io::Result<()> {
    let mut req = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return timed_out(&mut stream, &req);
        }
        stream.set_read_timeout(Some(left.min(READ_PAUSE)))?;
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return timed_out(&mut stream, &req);
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
        if req.len() > 8192 {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "",
                false,
            );
        }
    }
    let line = String::from_utf8_lossy(&req);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head = method == "HEAD";
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = render(board);
            respond(&mut stream, "200 OK", &body, head)
        }
        ("GET" | "HEAD", "/") => respond(
            &mut stream,
            "200 OK",
            "shardstore: Prometheus metrics at /metrics\n",
            head,
        ),
        ("GET" | "HEAD", _) => respond(&mut stream, "404 Not Found", "not found\n", head),
        _ => respond(
            &mut stream,
            "405 Method Not Allowed",
            "GET /metrics\n",
            head,
        ),
    }
}

/// A request that did not arrive whole in time: 408 if any of it came; a
/// connection that sent nothing (a port probe) is closed without a word.
fn timed_out(stream: &mut TcpStream, req: &[u8]) -> std::io::Result<()> {
    if req.is_empty() {
        return Ok(());
    }
    respond(stream, "408 Request Timeout", "", false)
}

fn respond(stream: &mut TcpStream, status: &str, body: &str, head: bool) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head {
        out.push_str(body);
    }
    let r = write_within(stream, out.as_bytes(), Instant::now() + RESPONSE_TIMEOUT);
    if r.is_err() {
        // Drop what the kernel still holds for the client (a reset, not a
        // close that goes on sending to it at its pace).
        let _ = socket2::SockRef::from(&*stream).set_linger(Some(Duration::ZERO));
    }
    r
}

/// Writes all of `buf` before `deadline`, or fails with `TimedOut`: each
/// send waits at most what is left.
fn write_within(stream: &mut TcpStream, mut buf: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !buf.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                ErrorKind::TimedOut,
                format!(
                    "the client did not take the response within {RESPONSE_TIMEOUT:?} ({} bytes left)",
                    buf.len()
                ),
            ));
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(buf) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            // The deadline is checked at the top of the loop.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn statvfs(path: &std::path::Path) -> Option<(u64, u64)> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs fills a plain struct from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let f = st.f_frsize;
    #[allow(clippy::unnecessary_cast)]
    Some((st.f_blocks as u64 * f as u64, st.f_bavail as u64 * f as u64))
}

/// Writes one metric family: HELP, TYPE and one sample per shard.
fn family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    snaps: &[(usize, &Snapshot)],
    value: impl Fn(&Snapshot) -> u64,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (i, s) in snaps {
        let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", value(s));
    }
}

/// The cumulative buckets (bounds `LATENCY_BOUNDS_US`, then +Inf), the
/// sum and the count of one histogram series; `count(b)`: requests in
/// bucket `b` alone.
fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    count: impl Fn(usize) -> u64,
    sum_seconds: f64,
) {
    let mut cum = 0;
    for (b, bound) in LATENCY_BOUNDS_US.iter().enumerate() {
        cum += count(b);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels},le=\"{}\"}} {cum}",
            *bound as f64 / 1e6
        );
    }
    cum += count(LATENCY_BUCKETS - 1);
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cum}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {sum_seconds}");
    let _ = writeln!(out, "{name}_count{{{labels}}} {cum}");
}

/// A per-shard metric family: name, type, help, value.
type Family = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Snapshot) -> u64,
);

/// The whole exposition, Prometheus text format 0.0.4.
pub fn render(board: &Board) -> String {
    let slots = board.read();
    let snaps: Vec<(usize, &Snapshot)> = slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
        .collect();
    let mut o = String::with_capacity(16 << 10);
    let _ = writeln!(
        o,
        "# HELP shardstore_build_info Build of the running server (value 1).\n\
         # TYPE shardstore_build_info gauge\n\
         shardstore_build_info{{version=\"{}\",profile=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let start = board
        .started
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let _ = writeln!(
        o,
        "# HELP shardstore_start_time_seconds Process start, Unix time.\n\
         # TYPE shardstore_start_time_seconds gauge\nshardstore_start_time_seconds {start:.3}"
    );
    let _ = writeln!(
        o,
        "# HELP shardstore_node_info Node identity (value 1).\n\
         # TYPE shardstore_node_info gauge\nshardstore_node_info{{node_id=\"{:032x}\"}} 1",
        board.facts.node_id
    );
    let _ = writeln!(
        o,
        "# HELP shardstore_shards Shards of this node.\n# TYPE shardstore_shards gauge\nshardstore_shards {}",
        board.slots.len()
    );
    let _ = writeln!(
        o,
        "# HELP shardstore_draining 1 while shutting down (not accepting).\n\
         # TYPE shardstore_draining gauge\nshardstore_draining {}",
        board.is_draining() as u8
    );
    if let Some((size, free)) = statvfs(&board.facts.data_dir) {
        let _ = writeln!(
            o,
            "# HELP shardstore_filesystem_size_bytes Size of the data dir's filesystem.\n\
             # TYPE shardstore_filesystem_size_bytes gauge\nshardstore_filesystem_size_bytes {size}\n\
             # HELP shardstore_filesystem_free_bytes Space available to the server on the data dir's filesystem.\n\
             # TYPE shardstore_filesystem_free_bytes gauge\nshardstore_filesystem_free_bytes {free}"
        );
    }

    let _ = writeln!(
        o,
        "# HELP shardstore_snapshot_age_seconds Age of the shard's published figures.\n\
         # TYPE shardstore_snapshot_age_seconds gauge"
    );
    for (i, s) in &snaps {
        let _ = writeln!(
            o,
            "shardstore_snapshot_age_seconds{{shard=\"{i}\",cpu=\"{}\"}} {:.3}",
            s.cpu,
            s.taken.elapsed().as_secs_f64()
        );
    }

    let ops: Vec<Opcode> = Opcode::ALL
        .into_iter()
        .filter(|op| (*op as usize) < OPCODE_SLOTS)
        .collect();
    let per_op = |o: &mut String, name: &str, help: &str, v: &dyn Fn(&Snapshot, usize) -> u64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
        for (i, s) in &snaps {
            for op in &ops {
                let _ = writeln!(
                    o,
                    "{name}{{shard=\"{i}\",op=\"{}\"}} {}",
                    op.name(),
                    v(s, *op as usize)
                );
            }
        }
    };
    per_op(
        &mut o,
        "shardstore_requests_total",
        "Requests received from clients, by opcode (a forwarded one on the shard that took it; one over RDMA on its owner, unless the RDMA thread refused it: shardstore_rdma_refused_total).",
        &|s, op| s.stats.requests.get(op).copied().unwrap_or(0),
    );
    per_op(
        &mut o,
        "shardstore_request_errors_total",
        "Requests answered with an error, by opcode.",
        &|s, op| s.stats.errors.get(op).copied().unwrap_or(0),
    );

    let name = "shardstore_request_duration_seconds";
    let _ = writeln!(
        o,
        "# HELP {name} Execution time on the owning shard, from decoded request to encoded reply (device I/O and group commit included, network excluded).\n\
         # TYPE {name} histogram"
    );
    for (i, s) in &snaps {
        for op in &ops {
            let k = *op as usize;
            let labels = format!("shard=\"{i}\",op=\"{}\"", op.name());
            let sum = s.latency_sum_us[k] as f64 / 1e6;
            histogram(&mut o, name, &labels, |b| s.latency(k, b), sum);
        }
    }

    for (name, cached, help) in [
        (
            "shardstore_read_cached_duration_seconds",
            true,
            "READ execution time when every byte came from the cache.",
        ),
        (
            "shardstore_read_uncached_duration_seconds",
            false,
            "READ execution time when the device was read.",
        ),
    ] {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, s) in &snaps {
            let (counts, sum_us) = if cached {
                (&s.stats.read_cached_latency, s.read_cached_sum_us)
            } else {
                (&s.stats.read_uncached_latency, s.read_uncached_sum_us)
            };
            let labels = format!("shard=\"{i}\"");
            histogram(
                &mut o,
                name,
                &labels,
                |b| counts.get(b).copied().unwrap_or(0),
                sum_us as f64 / 1e6,
            );
        }
    }

    let fams: [Family; 52] = [
        (
            "shardstore_received_bytes_total",
            "counter",
            "Write payload bytes stored.",
            |s| s.stats.bytes_in,
        ),
        (
            "shardstore_sent_bytes_total",
            "counter",
            "Read payload bytes served.",
            |s| s.stats.bytes_out,
        ),
        (
            "shardstore_in_flight_requests",
            "gauge",
            "Requests executing on the shard.",
            |s| s.stats.in_flight,
        ),
        (
            "shardstore_connections",
            "gauge",
            "Open client connections.",
            |s| s.stats.connections,
        ),
        (
            "shardstore_connections_accepted_total",
            "counter",
            "Connections accepted.",
            |s| s.stats.connections_total,
        ),
        (
            "shardstore_forwarded_out_total",
            "counter",
            "Requests sent to their owner shard.",
            |s| s.stats.forwarded_out,
        ),
        (
            "shardstore_forwarded_in_total",
            "counter",
            "Requests executed for another shard.",
            |s| s.stats.forwarded_in,
        ),
        (
            "shardstore_forward_busy_total",
            "counter",
            "Forwards refused because the owner's queue was full.",
            |s| s.stats.forward_busy,
        ),
        (
            "shardstore_forward_timeouts_total",
            "counter",
            "Forwards answered TIMEOUT: the owner did not answer within forward_timeout.",
            |s| s.stats.forward_timeouts,
        ),
        (
            "shardstore_malformed_frames_total",
            "counter",
            "Frames refused as malformed.",
            |s| s.stats.malformed_frames,
        ),
        (
            "shardstore_connections_refused_total",
            "counter",
            "Connections refused at the connection limit.",
            |s| s.stats.refused_connections,
        ),
        (
            "shardstore_connection_timeouts_total",
            "counter",
            "Connections closed by a timeout: frame, idle, write (a client taking replies slower than 64 KiB/s included), TLS or auth handshake.",
            |s| s.stats.timeouts,
        ),
        (
            "shardstore_tls_failures_total",
            "counter",
            "Connections whose TLS handshake failed (one that timed out counts in shardstore_connection_timeouts_total).",
            |s| s.stats.tls_failures,
        ),
        (
            "shardstore_auth_failures_total",
            "counter",
            "Connections refused for failed authentication (not those that closed or timed out before a frame).",
            |s| s.stats.auth_failures,
        ),
        (
            "shardstore_busy_total",
            "counter",
            "Requests refused with BUSY (buffer budget).",
            |s| s.stats.busy,
        ),
        ("shardstore_chunks", "gauge", "Chunks stored.", |s| {
            s.stats.chunks
        }),
        (
            "shardstore_data_used_bytes",
            "gauge",
            "Data area in use, headers included.",
            |s| s.stats.used_bytes,
        ),
        (
            "shardstore_data_capacity_bytes",
            "gauge",
            "Data area size.",
            |s| s.stats.capacity_bytes,
        ),
        (
            "shardstore_data_free_bytes",
            "gauge",
            "Data area not in use.",
            |s| s.stats.capacity_bytes.saturating_sub(s.stats.used_bytes),
        ),
        (
            "shardstore_device_writes_total",
            "counter",
            "Device writes.",
            |s| s.stats.device_writes,
        ),
        (
            "shardstore_combined_writes_total",
            "counter",
            "Extent writes carried by a device write started for another (write combining).",
            |s| s.stats.combined_writes,
        ),
        (
            "shardstore_device_flushes_total",
            "counter",
            "Data file fdatasyncs.",
            |s| s.stats.flushes,
        ),
        (
            "shardstore_corrupt_errors_total",
            "counter",
            "Checksum mismatches found on reads from disk.",
            |s| s.stats.corrupt_errors,
        ),
        (
            "shardstore_checkpoints_total",
            "counter",
            "Index checkpoints finished (sled batches, off the write path).",
            |s| s.stats.checkpoints,
        ),
        (
            "shardstore_checkpoint_waits_total",
            "counter",
            "Writes that waited for a checkpoint to extend the space reservation.",
            |s| s.stats.checkpoint_waits,
        ),
        (
            "shardstore_checkpoint_last_duration_microseconds",
            "gauge",
            "How long the last index checkpoint took.",
            |s| s.stats.last_checkpoint_us,
        ),
        (
            "shardstore_checkpoint_last_keys",
            "gauge",
            "Index records the last checkpoint wrote.",
            |s| s.stats.last_checkpoint_keys,
        ),
        (
            "shardstore_tombstones",
            "gauge",
            "Tombstone records held (one data-area sector each until a sweep retires them).",
            |s| s.stats.tombstones,
        ),
        (
            "shardstore_tombstones_retired_total",
            "counter",
            "Tombstones retired by sweep passes.",
            |s| s.stats.tombstones_retired,
        ),
        (
            "shardstore_sweep_passes_total",
            "counter",
            "Sweep passes finished.",
            |s| s.stats.sweep_passes,
        ),
        (
            "shardstore_sweep_erased_total",
            "counter",
            "Old extent headers of deleted chunks erased from free space by sweeps.",
            |s| s.stats.sweep_erased,
        ),
        (
            "shardstore_scrub_passes_total",
            "counter",
            "Scrub passes finished over every live sector, extent header and tombstone.",
            |s| s.stats.scrub_passes,
        ),
        (
            "shardstore_scrub_sectors_total",
            "counter",
            "Data sectors the scrubber re-read and verified.",
            |s| s.stats.scrub_sectors,
        ),
        (
            "shardstore_scrub_errors_total",
            "counter",
            "Damaged or unreadable data sectors, extent headers and tombstones the scrubber found (logged, not repaired).",
            |s| s.stats.scrub_errors,
        ),
        (
            "shardstore_stream_hints_out_total",
            "counter",
            "Read-ahead hints sent to the shard owning the next chunk id of a marked stream.",
            |s| s.stats.stream_hints_out,
        ),
        (
            "shardstore_stream_hints_in_total",
            "counter",
            "Read-ahead hints received from other shards.",
            |s| s.stats.stream_hints_in,
        ),
        (
            "shardstore_stream_hints_dropped_total",
            "counter",
            "Read-ahead hints dropped because the owning shard's hint queue was full.",
            |s| s.stats.stream_hints_dropped,
        ),
        (
            "shardstore_fail_stopped",
            "gauge",
            "1 after an fsync error: the shard refuses writes.",
            |s| s.stats.fail_stopped as u64,
        ),
        (
            "shardstore_cache_capacity_bytes",
            "gauge",
            "The shard's slice of the read cache.",
            |s| s.stats.cache_capacity_bytes,
        ),
        (
            "shardstore_cache_bytes",
            "gauge",
            "Bytes in the shard's read cache.",
            |s| s.stats.cache_bytes,
        ),
        (
            "shardstore_cache_entries",
            "gauge",
            "Sectors (4 KiB) in the shard's read cache.",
            |s| s.stats.cache_entries,
        ),
        (
            "shardstore_cache_hits_total",
            "counter",
            "Sectors client reads found in the cache.",
            |s| s.stats.cache_hits,
        ),
        (
            "shardstore_cache_misses_total",
            "counter",
            "Sectors client reads had to read from the device.",
            |s| s.stats.cache_misses,
        ),
        (
            "shardstore_cache_held_bytes",
            "gauge",
            "Bytes of read buffers the cache's entries keep alive (at least the cached bytes).",
            |s| s.stats.cache_held_bytes,
        ),
        (
            "shardstore_cache_compacted_total",
            "counter",
            "Cached sectors copied out of a mostly evicted read buffer so it could be freed.",
            |s| s.stats.cache_compacted,
        ),
        (
            "shardstore_cache_evictions_total",
            "counter",
            "Sectors evicted from the cache.",
            |s| s.stats.cache_evictions,
        ),
        (
            "shardstore_cached_reads_total",
            "counter",
            "READs served entirely from the cache.",
            |s| s.stats.cached_reads,
        ),
        (
            "shardstore_uncached_reads_total",
            "counter",
            "READs that needed the device.",
            |s| s.stats.uncached_reads,
        ),
        (
            "shardstore_prefetch_enabled",
            "gauge",
            "1 if sequential read-ahead is on.",
            |s| s.stats.prefetch_enabled as u64,
        ),
        (
            "shardstore_prefetch_issued_total",
            "counter",
            "Sectors read ahead into the cache.",
            |s| s.stats.prefetch_issued,
        ),
        (
            "shardstore_prefetch_used_total",
            "counter",
            "Read-ahead sectors later read by a client.",
            |s| s.stats.prefetch_used,
        ),
        (
            "shardstore_prefetch_wasted_total",
            "counter",
            "Read-ahead sectors evicted before any client read them.",
            |s| s.stats.prefetch_wasted,
        ),
    ];
    for (name, kind, help, f) in fams {
        family(&mut o, name, kind, help, &snaps, f);
    }
    if let Some(r) = board.rdma.get() {
        rdma_families(&mut o, r);
    }
    o
}

/// The RDMA thread's figures: node-wide, no shard label.
fn rdma_families(o: &mut String, r: &RdmaCounters) {
    let name = "shardstore_rdma_refused_total";
    let _ = writeln!(
        o,
        "# HELP {name} Requests the RDMA thread answered with an error itself, without a shard (bad messages, reply frames, bad payload crcs, BUSY, timeouts, unsendable replies), by error code; not in shardstore_requests_total.\n\
         # TYPE {name} counter"
    );
    for code in (0..crate::stats::ERROR_CODE_SLOTS as u16).filter_map(ErrorCode::from_u16) {
        let _ = writeln!(
            o,
            "{name}{{code=\"{}\"}} {}",
            code.name().to_ascii_lowercase(),
            r.refused_with(code)
        );
    }
    let _ = writeln!(
        o,
        "# HELP shardstore_rdma_connections Open RDMA connections.\n\
         # TYPE shardstore_rdma_connections gauge\nshardstore_rdma_connections {}\n\
         # HELP shardstore_rdma_connections_refused_total RDMA connections refused at the connection limit (max_connections_per_shard).\n\
         # TYPE shardstore_rdma_connections_refused_total counter\nshardstore_rdma_connections_refused_total {}",
        r.connections.load(Ordering::Relaxed),
        r.connections_refused.load(Ordering::Relaxed)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> Snapshot {
        let mut latency_counts = vec![0; OPCODE_SLOTS * LATENCY_BUCKETS];
        latency_counts[Opcode::Write as usize * LATENCY_BUCKETS + 3] = 2;
        latency_counts[Opcode::Write as usize * LATENCY_BUCKETS + LATENCY_BUCKETS - 1] = 1;
        let mut read_cached_latency = vec![0; LATENCY_BUCKETS];
        read_cached_latency[0] = 4;
        Snapshot {
            taken: Instant::now(),
            cpu: 0,
            stats: StatsReply {
                requests: vec![3; OPCODE_SLOTS],
                errors: vec![0; OPCODE_SLOTS],
                latency_counts,
                read_cached_latency,
                cache_hits: 7,
                scrub_passes: 2,
                scrub_sectors: 96,
                scrub_errors: 1,
                tls_failures: 5,
                ..StatsReply::default()
            },
            latency_sum_us: [0; OPCODE_SLOTS],
            read_cached_sum_us: 60,
            read_uncached_sum_us: 0,
        }
    }

    #[test]
    fn histogram_is_cumulative() {
        let b = Board::new(2, NodeFacts::default());
        b.publish(1, snap());
        let text = render(&b);
        assert!(text.contains(
            "shardstore_request_duration_seconds_bucket{shard=\"1\",op=\"write\",le=\"0.0001\"} 0"
        ));
        assert!(text.contains(
            "shardstore_request_duration_seconds_bucket{shard=\"1\",op=\"write\",le=\"0.00025\"} 2"
        ));
        assert!(text.contains(
            "shardstore_request_duration_seconds_bucket{shard=\"1\",op=\"write\",le=\"+Inf\"} 3"
        ));
        assert!(
            text.contains("shardstore_request_duration_seconds_count{shard=\"1\",op=\"write\"} 3")
        );
        assert!(text.contains(
            "shardstore_read_cached_duration_seconds_bucket{shard=\"1\",le=\"0.000025\"} 4"
        ));
        assert!(text.contains("shardstore_cache_hits_total{shard=\"1\"} 7"));
        // Shard 0 has not published: absent, and reported stale.
        assert!(!text.contains("shard=\"0\""));
        assert_eq!(b.stale_shard(Duration::from_secs(10)), Some(0));
    }

    /// A request that stalls gets 408 once a pause passes READ_PAUSE (it
    /// used to be dropped without an answer); a connection that sends
    /// nothing is closed without one.
    #[test]
    fn a_stalled_request_gets_408_and_a_silent_one_nothing() {
        let board = Board::new(1, NodeFacts::default());
        for (sent, want) in [
            (
                &b"GET /metrics HTTP/1.1\r\n"[..],
                "HTTP/1.1 408 Request Timeout\r\n",
            ),
            (&b""[..], ""),
        ] {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let b = board.clone();
            let server = std::thread::spawn(move || answer(l.accept().unwrap().0, &b));
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(sent).unwrap();
            let started = Instant::now();
            let mut got = String::new();
            c.read_to_string(&mut got).unwrap();
            let waited = started.elapsed();
            assert!(
                if want.is_empty() {
                    got.is_empty()
                } else {
                    got.starts_with(want)
                },
                "sent {:?}, got {got:?}",
                String::from_utf8_lossy(sent)
            );
            assert!(
                waited >= READ_PAUSE - Duration::from_millis(100) && waited < REQUEST_TIMEOUT,
                "answered after {waited:?}"
            );
            server.join().unwrap().unwrap();
        }
    }

    /// A client that sends a whole request, then reads the response 1 KiB
    /// every 100 ms, is cut off once RESPONSE_TIMEOUT passes, and a scrape
    /// waiting behind it is answered in full. Before, the write's timeout
    /// (SO_SNDTIMEO) started again after every partial send, and such a
    /// client held the one thread for as long as it read. (A client that
    /// reads a byte at a time frees too little of its window for the
    /// sender to go on at all: that one the old timeout did cut off.)
    #[test]
    fn a_slow_reader_is_cut_off_and_the_next_scrape_answered() {
        use socket2::{Domain, Socket, Type};
        let shards = 16;
        let board = Board::new(shards, NodeFacts::default());
        for i in 0..shards {
            board.publish(i, snap());
        }
        let body_len = render(&board).len();
        // Fixed socket buffers (no autotuning) far smaller than the response,
        // which the slow client would take in 20 s and more.
        let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        l.set_send_buffer_size(16 << 10).unwrap();
        l.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        l.listen(8).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        assert!(body_len > 200 << 10, "a response of {body_len} bytes only");
        spawn_server(l.into(), board).unwrap();

        let slow = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        slow.set_recv_buffer_size(4 << 10).unwrap();
        slow.connect(&addr.into()).unwrap();
        let mut slow: TcpStream = slow.into();
        slow.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let started = Instant::now();
        let next = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(9))).unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
            let mut got = Vec::new();
            let r = c.read_to_end(&mut got);
            (r.map(|_| got), started.elapsed())
        });
        slow.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut read = 0;
        let mut buf = [0u8; 1024];
        let cut = loop {
            match slow.read(&mut buf) {
                Ok(0) => break started.elapsed(),
                Ok(n) => read += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break started.elapsed(), // reset
            }
            assert!(
                started.elapsed() < RESPONSE_TIMEOUT + Duration::from_secs(3),
                "still reading after {:?} ({read} of {body_len} bytes)",
                started.elapsed()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            cut >= RESPONSE_TIMEOUT - Duration::from_millis(500) && read < body_len,
            "cut off after {cut:?}, {read} of {body_len} bytes read"
        );
        let (got, when) = next.join().unwrap();
        let got = got.expect("the next scrape was not answered");
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\n"),
            "{}",
            &text[..text.len().min(200)]
        );
        assert!(got.len() > body_len, "{} bytes of {body_len}", got.len());
        assert!(
            when < RESPONSE_TIMEOUT + Duration::from_secs(3),
            "answered after {when:?}"
        );
    }

    /// The RDMA thread's refusals and connections are exported, node-wide,
    /// once it runs; a node without RDMA shows none of them.
    #[test]
    fn rdma_counters_are_exported_once_attached() {
        let b = Board::new(1, NodeFacts::default());
        b.publish(0, snap());
        assert!(!render(&b).contains("# TYPE shardstore_rdma"));
        let r = Arc::new(RdmaCounters::default());
        r.refused(ErrorCode::Busy);
        r.refused(ErrorCode::Busy);
        r.refused(ErrorCode::Malformed);
        r.connections_refused.fetch_add(3, Ordering::Relaxed);
        b.attach_rdma(r);
        let text = render(&b);
        for line in [
            "# TYPE shardstore_rdma_refused_total counter\n",
            "shardstore_rdma_refused_total{code=\"busy\"} 2\n",
            "shardstore_rdma_refused_total{code=\"malformed\"} 1\n",
            "shardstore_rdma_refused_total{code=\"timeout\"} 0\n",
            "shardstore_rdma_connections 0\n",
            "shardstore_rdma_connections_refused_total 3\n",
        ] {
            assert!(text.contains(line), "no {line}");
        }
    }

    /// The scrubber's and the TLS handshakes' counters, and the READ
    /// histograms' sums, reach the exposition (they were STATS-only, or
    /// tracked and dropped).
    #[test]
    fn scrub_tls_and_read_sums_are_exported() {
        let b = Board::new(2, NodeFacts::default());
        b.publish(1, snap());
        let text = render(&b);
        for line in [
            "shardstore_scrub_passes_total{shard=\"1\"} 2\n",
            "shardstore_scrub_sectors_total{shard=\"1\"} 96\n",
            "shardstore_scrub_errors_total{shard=\"1\"} 1\n",
            "shardstore_tls_failures_total{shard=\"1\"} 5\n",
            "shardstore_read_cached_duration_seconds_sum{shard=\"1\"} 0.00006\n",
            "shardstore_read_uncached_duration_seconds_sum{shard=\"1\"} 0\n",
        ] {
            assert!(text.contains(line), "no {line}");
        }
        for name in [
            "shardstore_scrub_passes_total",
            "shardstore_scrub_sectors_total",
            "shardstore_scrub_errors_total",
            "shardstore_tls_failures_total",
        ] {
            assert!(text.contains(&format!("# TYPE {name} counter\n")), "{name}");
        }
    }
}
