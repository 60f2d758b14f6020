//! Node start-up: data folder and node identity, CPU placement, listeners,
//! one glommio executor per shard.
//!
//! Order: check the data folder (refuse a shard-count change) -> bind every
//! listener on the main thread (so addresses, including ephemeral ports, are
//! known before any shard starts) -> spawn one executor per shard, pinned to
//! one allowed CPU -> each opens its storage, then accepts -> the main thread
//! logs readiness once every shard reports in.

use crate::conn::accept_loop;
use crate::handler::{Forwarded, NodeInfo, ShardCtx};
use crate::lifecycle::{self, Drain};
use crate::metrics::{self, Board, NodeFacts};
use anyhow::{bail, Context};
use glommio::{LocalExecutorBuilder, Placement, PoolPlacement};
use shardstore_net::tcp::{bind_socket, ListenOptions};
use shardstore_proto::{limits, ShardId};
use shardstore_shard::StreamHint;
use shardstore_shard::{Shard, ShardConfig};
use std::net::SocketAddr;
use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;
use tracing::{error, info, warn};

/// Everything `serve` needs, resolved from flags.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// None: the data folder's shard count, or one shard per allowed CPU for a new folder.
    pub shards: Option<u32>,
    pub capacity_bytes: u64,
    pub io_memory_bytes: usize,
    pub max_payload: u32,
    pub max_chunk_size: u64,
    pub index_cache_bytes: u64,
    pub forward_queue: usize,
    pub limits: crate::conn_limits::ConnLimits,
    pub auth_secret: Option<std::sync::Arc<Vec<u8>>>,
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    pub ready_file: Option<PathBuf>,
    /// CPUs to pin shards to; None: every allowed CPU.
    pub cpus: Option<Vec<usize>>,
    /// Run more shards than CPUs (else refused).
    pub allow_oversubscribe: bool,
    pub metrics_addr: Option<SocketAddr>,
    /// How often shards publish snapshots (metrics, watchdog).
    pub metrics_interval: std::time::Duration,
    /// How long a graceful stop lets in-flight requests finish.
    pub shutdown_timeout: std::time::Duration,
    /// Configured node cache (reported only; the cache is not built yet).
    /// Node-wide read cache, split evenly between the shards.
    pub cache_bytes: u64,
    pub prefetch: bool,
    pub sync_mode: crate::config::SyncMode,
    pub scrub_period_secs: u64,
    /// Idle polling before a shard thread sleeps (`poll_us`); zero: none.
    pub poll: std::time::Duration,
    /// Data written between index checkpoints, per shard.
    pub checkpoint_bytes: u64,
    /// See `ShardConfig::combine_in_flight`.
    pub write_combine: u32,
    /// Data areas on this block device (equal per-shard ranges) instead of files.
    pub device: Option<PathBuf>,
    /// Format over a foreign or damaged superblock.
    pub format: bool,
    /// Rebuild a missing or damaged index from the data area at start-up.
    pub rebuild_index: bool,
    /// RDMA front address (feature `rdma`; config refuses it otherwise).
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub rdma_listen: Option<SocketAddr>,
}

const NODE_FILE: &str = "shardstore.node";
const NODE_FORMAT: u32 = 1;

/// The node identity file at the top of the data folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMeta {
    pub node_id: u128,
    pub shard_count: u32,
}

impl NodeMeta {
    fn render(&self) -> String {
        format!(
            "# shardstore node identity; do not edit\nformat = {NODE_FORMAT}\nnode_id = {:032x}\nshard_count = {}\n",
            self.node_id, self.shard_count
        )
    }

    fn parse(text: &str, path: &Path) -> anyhow::Result<NodeMeta> {
        let mut format = None;
        let mut node_id = None;
        let mut shard_count = None;
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (k, v) = line
                .split_once('=')
                .with_context(|| format!("{}: malformed line {line:?}", path.display()))?;
            let v = v.trim();
            match k.trim() {
                "format" => format = Some(v.parse::<u32>()?),
                "node_id" => node_id = Some(u128::from_str_radix(v, 16)?),
                "shard_count" => shard_count = Some(v.parse::<u32>()?),
                other => bail!("{}: unknown key {other:?}", path.display()),
            }
        }
        if format != Some(NODE_FORMAT) {
            bail!(
                "{}: unsupported node file format {format:?} (this build reads {NODE_FORMAT})",
                path.display()
            );
        }
        Ok(NodeMeta {
            node_id: node_id.with_context(|| format!("{}: missing node_id", path.display()))?,
            shard_count: shard_count
                .with_context(|| format!("{}: missing shard_count", path.display()))?,
        })
    }
}

/// Reads or creates the node identity, refusing a shard-count change.
pub fn open_node_meta(
    data_dir: &Path,
    requested: Option<u32>,
    default_shards: u32,
) -> anyhow::Result<NodeMeta> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let path = data_dir.join(NODE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let meta = NodeMeta::parse(&text, &path)?;
            if let Some(n) = requested {
                if n != meta.shard_count {
                    bail!(
                        "data dir {} was created with {} shards but --shards {} was given; \
                         resharding is not supported yet: start with --shards {} (or omit --shards)",
                        data_dir.display(),
                        meta.shard_count,
                        n,
                        meta.shard_count
                    );
                }
            }
            Ok(meta)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let has_shards = std::fs::read_dir(data_dir)?
                .filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("shard-"));
            if has_shards {
                bail!(
                    "data dir {} holds shard folders but no {NODE_FILE}; refusing to guess its shard count",
                    data_dir.display()
                );
            }
            let meta = NodeMeta {
                node_id: uuid::Uuid::new_v4().as_u128(),
                shard_count: requested.unwrap_or(default_shards),
            };
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, meta.render())?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(data_dir)?.sync_all()?;
            Ok(meta)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Refuses a node whose data folder lost a shard's folder: started anyway,
/// that shard would be created empty and its chunks silently NOT_FOUND.
pub fn refuse_missing_shards(data_dir: &Path, shard_count: u32) -> anyhow::Result<()> {
    let missing: Vec<String> = (0..shard_count)
        .map(|i| ShardConfig::folder_name(ShardId(i)))
        .filter(|f| !data_dir.join(f).is_dir())
        .collect();
    if !missing.is_empty() {
        bail!(
            "data dir {} was initialized for {shard_count} shards ({NODE_FILE}) but {} missing: \
             restore it from a backup (a file-backed shard keeps its data there, a device-backed \
             one its index: `shardstore check --rebuild --device DEV` rebuilds that), or start \
             with --format to create it empty, losing its chunks",
            data_dir.display(),
            if missing.len() == 1 {
                format!("{} is", missing[0])
            } else {
                format!("{} are", missing.join(", "))
            }
        );
    }
    Ok(())
}

/// The CPUs this process may run on (honours taskset and cgroup cpusets).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

fn shard_listener_addr(front: SocketAddr, shard: u32) -> anyhow::Result<SocketAddr> {
    let mut a = front;
    if front.port() != 0 {
        let port = front.port() as u32 + 1 + shard;
        if port > u16::MAX as u32 {
            bail!("shard {shard}'s port {port} (front port + 1 + shard) is out of range");
        }
        a.set_port(port as u16);
    }
    Ok(a)
}

/// A panic anywhere in the server (a bug) ends the process, after the usual
/// message, instead of only its thread: a shard thread gone quietly would
/// leave the other shards' requests forwarded to it waiting forever, and
/// the service manager restarts a process that exited (recovery makes
/// every acknowledged write visible again).
fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        // Not through `tracing`: the panic may have come from inside it.
        eprintln!("shardstore: a thread panicked: aborting the process");
        std::process::abort();
    }));
}

/// A shard's sockets, bound but not listening: the shard listens once its
/// storage is open, so a connection made while it recovers is refused at
/// once instead of waiting in the backlog for the recovery to end.
struct ShardListeners {
    front: socket2::Socket,
    direct: socket2::Socket,
    backlog: i32,
}

impl ShardListeners {
    /// Starts listening; glommio listeners on both sockets.
    fn listen(self) -> std::io::Result<(glommio::net::TcpListener, glommio::net::TcpListener)> {
        self.front.listen(self.backlog)?;
        self.direct.listen(self.backlog)?;
        // SAFETY: the fds come from sockets this shard owns and hands over whole.
        Ok(unsafe {
            (
                glommio::net::TcpListener::from_raw_fd(self.front.into_raw_fd()),
                glommio::net::TcpListener::from_raw_fd(self.direct.into_raw_fd()),
            )
        })
    }
}

/// The process-wide steps of `serve`, which `main` runs before it opens any
/// file (the secret and key files included: read as the service reads
/// them) and before any thread starts: first those that may need root's
/// rights (the open-file limit, the allocator's footprint), then, run as
/// root on an existing data folder that belongs to another user (the
/// service account, when an operator runs `serve --format` or
/// `--rebuild-index` by hand), become that user, so that everything the
/// server creates in the folder is the service's (see `owner`).
pub fn prepare_process(data_dir: &Path) -> anyhow::Result<()> {
    crate::conn_limits::raise_nofile_limit();
    crate::conn_limits::limit_allocator_footprint();
    if let Some((uid, gid)) = crate::owner::become_folder_owner(data_dir)? {
        info!(
            uid,
            gid,
            data_dir = %data_dir.display(),
            "running as the data folder's owner"
        );
    }
    Ok(())
}

/// Runs the node until a signal stops it. `main` calls [`prepare_process`]
/// first.
pub fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    abort_on_panic();
    let started = Instant::now();
    // A ready file left by an earlier run would tell a script waiting for
    // this one that it is ready, with the old address.
    if let Some(p) = &opts.ready_file {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("removing the old ready file {}: {e}", p.display()),
        }
    }
    // Raised by `prepare_process` already: this reads the figure to log.
    let nofile = crate::conn_limits::raise_nofile_limit();
    // Signals first: from here on SIGTERM drains instead of killing.
    let (stop_tx, stop_rx) = flume::unbounded::<()>();
    let board_cell = Arc::new(std::sync::OnceLock::<Arc<Board>>::new());
    {
        let board_cell = board_cell.clone();
        lifecycle::install_signals(move |sig| {
            info!(
                signal = sig,
                "stopping: no new connections, draining in-flight requests"
            );
            lifecycle::notify(&[
                sd_notify::NotifyState::Stopping,
                sd_notify::NotifyState::Status("stopping: draining in-flight requests"),
            ]);
            if let Some(b) = board_cell.get() {
                b.set_draining();
            }
            // One message per shard and one for the RDMA thread (the
            // channel is unbounded).
            for _ in 0..=limits::MAX_SHARDS {
                let _ = stop_tx.send(());
            }
        })
        .context("installing signal handlers")?;
    }
    lifecycle::status("starting: opening shards");
    let cpus = opts.cpus.clone().unwrap_or_else(allowed_cpus);
    let initialized = opts.data_dir.join(NODE_FILE).exists();
    let meta = open_node_meta(&opts.data_dir, opts.shards, cpus.len() as u32)?;
    // The folder's shard count may differ from the one the configuration
    // was checked with (one per CPU when `shards` is not set): past the
    // limit, glommio would fail each executor with a less clear error.
    crate::config::memlock_fits(
        (opts.io_memory_bytes >> 10) as u64,
        u64::from(meta.shard_count),
        crate::config::Machine::probe().memlock_bytes,
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "io_memory_kib: {e}; the data dir {} has {} shards",
            opts.data_dir.display(),
            meta.shard_count
        )
    })?;
    let n = meta.shard_count;
    if n == 0 || n > limits::MAX_SHARDS {
        bail!("shard count {n} out of range 1..={}", limits::MAX_SHARDS);
    }
    if initialized && !opts.format {
        refuse_missing_shards(&opts.data_dir, n)?;
    }
    crate::config::check_oversubscribe(n, &cpus, opts.allow_oversubscribe)
        .with_context(|| format!("data dir {}", opts.data_dir.display()))?;
    crate::config::check_polling(n, &cpus, opts.poll.as_micros() as u64)?;
    if n as usize > cpus.len() {
        warn!(shards = n, cpus = cpus.len(), "more shards than CPUs (allow_oversubscribe): shards will share cores (fine for testing, slow in production)");
    }
    let metrics_listener = match opts.metrics_addr {
        Some(a) => Some(
            std::net::TcpListener::bind(a).with_context(|| format!("metrics_addr: binding {a}"))?,
        ),
        None => None,
    };
    let metrics_at = match &metrics_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let board = Board::new(
        n as usize,
        NodeFacts {
            node_id: meta.node_id,
            data_dir: opts.data_dir.clone(),
        },
    );
    let _ = board_cell.set(board.clone());
    let drain = Drain::new(n as usize, opts.shutdown_timeout);
    // Shards publish often enough for the watchdog to judge their liveness.
    let watchdog = lifecycle::watchdog_period();
    let publish_every = match watchdog {
        Some(p) => opts.metrics_interval.min(p / 4),
        None => opts.metrics_interval,
    };

    // Bind everything before starting shards (each listens once it has
    // opened its storage). The front address is served by every shard
    // through SO_REUSEPORT (the kernel spreads connections among the shards
    // listening); each shard also has its own direct address.
    let mut listeners = Vec::new();
    let mut front = opts.listen;
    let mut shard_addrs = Vec::new();
    let reuse = ListenOptions {
        reuse_port: true,
        ..ListenOptions::default()
    };
    for i in 0..n {
        let f =
            bind_socket(front, &reuse).with_context(|| format!("binding front address {front}"))?;
        front = f.local_addr()?.as_socket().context("front address")?;
        let want = shard_listener_addr(opts.listen, i)?;
        let d = bind_socket(want, &ListenOptions::default())
            .with_context(|| format!("binding shard {i}'s address {want}"))?;
        shard_addrs.push(
            d.local_addr()?
                .as_socket()
                .context("shard address")?
                .to_string(),
        );
        listeners.push(ShardListeners {
            front: f,
            direct: d,
            backlog: reuse.backlog,
        });
    }
    info!(%front, ?shard_addrs, "addresses bound; shards listen once their storage is open");

    let mut node = NodeInfo {
        node_id: meta.node_id,
        shard_count: n,
        shard_addrs: shard_addrs.clone(),
        max_payload: opts.max_payload,
        max_chunk_size: opts.max_chunk_size,
        limits: opts.limits.clone(),
        auth_secret: opts.auth_secret.clone(),
        tls: opts.tls.clone().map(futures_rustls::TlsAcceptor::from),
        stream_hints: Vec::new(),
    };
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    let mut hint_receivers = Vec::new();
    for _ in 0..n {
        let (tx, rx) = flume::bounded::<Forwarded>(opts.forward_queue);
        senders.push(tx);
        receivers.push(rx);
        let (tx, rx) = flume::bounded::<StreamHint>(crate::handler::STREAM_HINT_QUEUE);
        node.stream_hints.push(tx);
        hint_receivers.push(rx);
    }
    // RDMA front: its own thread, requests handed to shards through `senders`.
    #[cfg(feature = "rdma")]
    if let Some(a) = opts.rdma_listen {
        crate::rdma::start(a, &opts, senders.clone(), stop_rx.clone(), &board)?;
    }

    let device_ranges = match &opts.device {
        Some(p) => Some(
            shardstore_shard::split_device(p, n)
                .with_context(|| format!("using device {}", p.display()))?,
        ),
        None => None,
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<(u32, Result<String, String>)>();
    let mut handles = Vec::new();
    let queues = receivers.into_iter().zip(hint_receivers);
    for (i, (lis, (rx, hints))) in listeners.into_iter().zip(queues).enumerate() {
        let i = i as u32;
        let cpu = cpus[i as usize % cpus.len()];
        let node = node.clone();
        let peers = senders.clone();
        let ready = ready_tx.clone();
        let rt = ShardRuntime {
            cpu,
            board: board.clone(),
            interval: publish_every,
            stop: stop_rx.clone(),
            drain: drain.clone(),
        };
        let cfg = ShardConfig {
            shard: ShardId(i),
            shard_count: n,
            node_id: meta.node_id,
            dir: opts.data_dir.join(format!("shard-{i:03}")),
            capacity_bytes: opts.capacity_bytes,
            max_chunk_size: opts.max_chunk_size,
            index_cache_bytes: opts.index_cache_bytes,
            device: device_ranges.as_ref().map(|r| r[i as usize].clone()),
            format: opts.format,
            rebuild_index: opts.rebuild_index,
            cache_bytes: opts.cache_bytes / u64::from(n),
            prefetch: opts.prefetch,
            write_through: opts.sync_mode == crate::config::SyncMode::Dsync,
            adaptive_sync: opts.sync_mode == crate::config::SyncMode::Adaptive,
            scrub_period_secs: opts.scrub_period_secs,
            checkpoint_bytes: opts.checkpoint_bytes,
            combine_in_flight: opts.write_combine,
            yield_while_writing: !opts.poll.is_zero(),
            ..ShardConfig::default()
        };
        // The blocking thread opens sled and writes the shard's index
        // checkpoints to it (see shardstore_shard's `index`). Not pinned to
        // the shard's CPU, so that work does not take turns with the shard
        // thread, nor do the threads sled starts from it.
        let mut builder = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard-{i:03}"))
            .io_memory(opts.io_memory_bytes)
            .spin_before_park(opts.poll)
            .blocking_thread_pool_placement(PoolPlacement::Unbound(1));
        // Debug builds only, for the test that a shard whose executor
        // cannot start ends the start-up with its reason:
        // `SHARDSTORE_DEBUG_BAD_EXECUTOR_SHARD=N` asks io_uring for rings
        // deeper than it makes for shard N.
        if debug_hook_for_shard("SHARDSTORE_DEBUG_BAD_EXECUTOR_SHARD", i) {
            builder = builder.ring_depth(1 << 20);
        }
        let h = builder
            .spawn(move || async move {
                let queues = ShardQueues {
                    peers,
                    forwarded: rx,
                    hints,
                };
                run_shard(cfg, node, queues, lis, ready, rt).await
            })
            .map_err(|e| anyhow::anyhow!("starting shard {i}'s executor on cpu {cpu}: {e}"))?;
        handles.push(h);
    }
    drop(ready_tx);
    drop(senders);

    let mut failed = None;
    let mut reported = vec![false; n as usize];
    for _ in 0..n {
        match ready_rx.recv() {
            Ok((i, Ok(summary))) => {
                reported[i as usize] = true;
                info!(shard = i, "{summary}");
            }
            Ok((i, Err(e))) => {
                reported[i as usize] = true;
                error!(shard = i, error = %e, "shard failed to start");
                failed.get_or_insert(format!("shard {i}: {e}"));
            }
            Err(_) => {
                // Every shard that runs drops its sender once it reported:
                // the rest never ran (their executor could not be made:
                // io_uring refused, the CPU not allowed, locked memory),
                // and their threads have ended with the reason.
                let mut why = Vec::new();
                for (i, h) in handles.drain(..).enumerate() {
                    if !reported[i] {
                        let e = match h.join() {
                            Ok(Ok(())) => "ended without a word".to_owned(),
                            Ok(Err(e)) => e,
                            Err(e) => e.to_string(),
                        };
                        error!(shard = i, error = %e, "shard executor failed to start");
                        why.push(format!("shard {i}: {e}"));
                    }
                }
                failed.get_or_insert(format!(
                    "a shard's executor failed to start: {}",
                    why.join("; ")
                ));
                break;
            }
        }
    }
    if let Some(e) = failed {
        bail!("{e}");
    }
    if let Some(l) = metrics_listener {
        metrics::spawn_server(l, board.clone()).context("starting the metrics thread")?;
    }
    let capacity_mib_total = (opts.capacity_bytes >> 20) * n as u64;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        shards = n,
        cpus = ?cpus,
        data_dir = %opts.data_dir.display(),
        capacity_mib_per_shard = opts.capacity_bytes >> 20,
        capacity_mib_total,
        front = %front,
        shard_addrs = ?shard_addrs,
        metrics = %metrics_at.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        node_id = %format!("{:032x}", meta.node_id),
        startup_ms = started.elapsed().as_millis() as u64,
        nofile,
        "shardstore ready"
    );
    if let Some(p) = &opts.ready_file {
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, format!("{front}\n"))
            .and_then(|()| std::fs::rename(&tmp, p))
            .with_context(|| format!("writing ready file {}", p.display()))?;
    }
    let status = format!(
        "serving: {n} shards on {front}, {capacity_mib_total} MiB, metrics {}",
        metrics_at
            .map(|a| a.to_string())
            .unwrap_or_else(|| "off".into())
    );
    lifecycle::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);
    if let Some(p) = watchdog {
        lifecycle::start_watchdog(board.clone(), p);
    }
    let mut close_failed = 0;
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(error = %e, "shard did not close cleanly");
                close_failed += 1;
            }
            Err(e) => {
                error!(error = %e, "shard executor failed");
                close_failed += 1;
            }
        }
    }
    lifecycle::status("stopped");
    if close_failed > 0 {
        bail!("{close_failed} shard(s) did not close cleanly");
    }
    if let Some(p) = &opts.ready_file {
        let _ = std::fs::remove_file(p);
    }
    info!("shardstore stopped");
    Ok(())
}

/// What a shard needs for metrics and the lifecycle.
struct ShardRuntime {
    cpu: usize,
    board: Arc<Board>,
    interval: std::time::Duration,
    stop: flume::Receiver<()>,
    drain: Arc<Drain>,
}

/// A shard's ends of the queues between shards.
struct ShardQueues {
    peers: Vec<flume::Sender<Forwarded>>,
    forwarded: flume::Receiver<Forwarded>,
    hints: flume::Receiver<StreamHint>,
}

/// Debug builds only: whether the test hook `var` names `shard` (its value
/// is a shard number). Always false in release builds.
fn debug_hook_for_shard(var: &str, shard: u32) -> bool {
    cfg!(debug_assertions) && std::env::var(var).is_ok_and(|v| v == shard.to_string())
}

async fn run_shard(
    cfg: ShardConfig,
    node: NodeInfo,
    queues: ShardQueues,
    lis: ShardListeners,
    ready: std::sync::mpsc::Sender<(u32, Result<String, String>)>,
    rt: ShardRuntime,
) -> Result<(), String> {
    let id = cfg.shard;
    let dir = cfg.dir.clone();
    // Debug builds only, for the test that connections made while shards
    // open are refused: `SHARDSTORE_DEBUG_OPEN_DELAY_MS=N` delays the open.
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("SHARDSTORE_DEBUG_OPEN_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        glommio::timer::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let shard = match Shard::open(cfg).await {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send((id.0, Err(format!("opening {}: {e}", dir.display()))));
            return Ok(());
        }
    };
    let (front, direct) = match lis.listen() {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send((
                id.0,
                Err(format!("listening on shard {id}'s addresses: {e}")),
            ));
            return Ok(());
        }
    };
    let st = shard.stats();
    let ctx = Rc::new(ShardCtx::new(shard, id, node, queues.peers));
    ctx.route_stream_hints(queues.hints);
    glommio::spawn_local(metrics::publish_loop(
        ctx.clone(),
        rt.board.clone(),
        rt.cpu,
        rt.interval,
    ))
    .detach();
    glommio::spawn_local(ctx.clone().serve_forwarded(queues.forwarded)).detach();
    let a = glommio::spawn_local(accept_loop(ctx.clone(), front));
    let b = glommio::spawn_local(accept_loop(ctx.clone(), direct));
    let _ = ready.send((
        id.0,
        Ok(format!(
            "shard open: {} chunks, {} of {} bytes used, dir {}",
            st.chunks,
            st.used_bytes,
            st.capacity_bytes,
            dir.display()
        )),
    ));
    // Let go of it: once every running shard has, a shard whose executor
    // never ran ends the wait for all of them (see `serve`).
    drop(ready);
    // Debug builds only, for the test that a shard's panic ends the whole
    // process (`abort_on_panic`): `SHARDSTORE_DEBUG_PANIC_SHARD=N` makes
    // shard N panic once it serves.
    if debug_hook_for_shard("SHARDSTORE_DEBUG_PANIC_SHARD", id.0) {
        glommio::spawn_local(async move {
            glommio::timer::sleep(std::time::Duration::from_millis(200)).await;
            panic!("SHARDSTORE_DEBUG_PANIC_SHARD: shard {id} panics on purpose");
        })
        .detach();
    }
    // Serve until the first signal, then drain (see lifecycle.rs).
    let _ = rt.stop.recv_async().await;
    drop(a); // cancelling the accept tasks closes this shard's listeners
    drop(b);
    let deadline = rt.drain.deadline();
    ctx.conns.shutdown_reads();
    let c = &ctx.counters;
    let quiet = lifecycle::wait_until(deadline, || {
        c.connections.get() == 0 && c.in_flight.get() == 0 && ctx.conns.requests_running() == 0
    })
    .await;
    if !quiet {
        warn!(
            shard = id.0,
            connections = c.connections.get(),
            in_flight = c.in_flight.get(),
            request_tasks = ctx.conns.requests_running(),
            "shutdown deadline passed with requests in flight; closing anyway"
        );
    }
    rt.drain.mark_drained();
    // Keep serving requests forwarded by shards that are still draining.
    lifecycle::wait_until(deadline, || rt.drain.all_drained()).await;
    rt.board
        .publish(id.0 as usize, metrics::Snapshot::take(&ctx, rt.cpu));
    ctx.shard
        .close()
        .await
        .map_err(|e| format!("closing shard {}: {e}", id.0))
}
