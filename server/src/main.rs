//! `shardstore`: the server (`serve`) and its admin CLI.

mod admin;

use clap::{Args, Parser, Subcommand};
use shardstore_proto::ChunkId;
use shardstore_server::{check, config, logging, serve};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc keeps freed pages of large buffers (the DMA buffers of 1 MiB
/// reads, payloads) in per-thread free lists for reuse, where glibc with a
/// pinned mmap threshold maps and faults in every such buffer afresh; and it
/// gives memory back to the OS on its own after a short delay.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "shardstore",
    version,
    about = "Thread-per-core sharded chunk storage server"
)]
struct Cli {
    #[command(subcommand)]
    cmd: TopCmd,
}

/// `check` is handled here, apart from `Cmd` (the admin commands' enum).
#[derive(Subcommand, Debug)]
enum TopCmd {
    /// Verify a stopped server's data offline; with --rebuild, rebuild every
    /// shard's index from its data area.
    Check(check::CheckArgs),
    #[command(flatten)]
    Other(Cmd),
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Write a chunk (or part of one) from a file or standard input.
    Put {
        #[command(flatten)]
        conn: ConnArgs,
        /// Chunk id, up to 32 hex digits.
        chunk: ChunkId,
        /// File to read; `-` or nothing for standard input.
        file: Option<PathBuf>,
        /// Byte offset within the chunk.
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// Read a chunk (or part of one) to standard output or a file.
    Get {
        #[command(flatten)]
        conn: ConnArgs,
        chunk: ChunkId,
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Bytes to read; default: to the end of the chunk.
        #[arg(long)]
        len: Option<u64>,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Show a chunk's length, version and times.
    Stat {
        #[command(flatten)]
        conn: ConnArgs,
        chunk: ChunkId,
    },
    /// Delete a chunk.
    Rm {
        #[command(flatten)]
        conn: ConnArgs,
        chunk: ChunkId,
    },
    /// List chunks, shard by shard.
    Ls {
        #[command(flatten)]
        conn: ConnArgs,
        /// Only this shard.
        #[arg(long)]
        shard: Option<u32>,
        /// Stop after this many chunks.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Round-trip a PING to the node and to every shard.
    Ping {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Show the node's topology.
    Topology {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Show every shard's counters.
    Stats {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Check or print configuration.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
}

#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// Server front address.
    #[arg(long, env = "SHARDSTORE_ADDR", default_value = "127.0.0.1:7700")]
    pub addr: String,
    /// Per-request timeout in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    #[command(flatten)]
    pub security: shardstore_client::cli::SecurityArgs,
}

/// `serve` settings. Every one (but `--config` and `--ready-file`) is also a
/// config-file key (the flag's name with `_`) and a `SHARDSTORE_*`
/// environment variable; precedence: flag > environment > file > default
/// (see `config.rs`; `shardstore config default` documents them).
/// No `default_value` here: an absent flag must fall through to the file.
#[derive(Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// TOML config file (see `shardstore config default`).
    #[arg(long, env = "SHARDSTORE_CONFIG")]
    config: Option<PathBuf>,
    /// Front address; shard i also listens on port+1+i (ephemeral ports when 0). [default: 127.0.0.1:7700]
    #[arg(long, env = "SHARDSTORE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data folder, created if missing. O_DIRECT needs a real filesystem (not tmpfs). [default: ./shardstore-data]
    #[arg(long, env = "SHARDSTORE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Number of shards; default: the data folder's, or one per allowed CPU.
    #[arg(long, env = "SHARDSTORE_SHARDS")]
    shards: Option<u32>,
    /// CPUs to pin shards to, e.g. 0-3,8 (each must be allowed); default: every allowed CPU.
    #[arg(long, env = "SHARDSTORE_CPUS")]
    cpus: Option<String>,
    /// Allow more shards than CPUs (shards share cores; for testing).
    #[arg(long, env = "SHARDSTORE_ALLOW_OVERSUBSCRIBE", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    allow_oversubscribe: Option<bool>,
    /// Data area per shard, MiB (preallocated on creation), at most 1073741824. [default: 1024]
    #[arg(long, env = "SHARDSTORE_CAPACITY_MIB")]
    capacity_mib: Option<u64>,
    /// glommio registered I/O memory per shard, KiB (must fit RLIMIT_MEMLOCK across shards). [default: 1024]
    #[arg(long, env = "SHARDSTORE_IO_MEMORY_KIB")]
    io_memory_kib: Option<u64>,
    /// Read cache for the node, MiB, split evenly between the shards (0: none). [default: 256]
    #[arg(long, env = "SHARDSTORE_CACHE_MIB")]
    cache_mib: Option<u64>,
    /// Largest payload of one request, bytes. [default: 8388608]
    #[arg(long, env = "SHARDSTORE_MAX_PAYLOAD")]
    max_payload: Option<u32>,
    /// Largest chunk, bytes. [default: 67108864]
    #[arg(long, env = "SHARDSTORE_MAX_CHUNK_SIZE")]
    max_chunk_size: Option<u64>,
    /// Seconds per scrub pass over every live sector (0: no scrubber). [default: 86400]
    #[arg(long, env = "SHARDSTORE_SCRUB_PERIOD_SECS")]
    scrub_period_secs: Option<u64>,
    /// Microseconds an idle shard thread polls before it sleeps (0: sleep at once; for dedicated cores). [default: 0]
    #[arg(long, env = "SHARDSTORE_POLL_US")]
    poll_us: Option<u64>,
    /// Data written per shard between index checkpoints, MiB; bounds the recovery scan. [default: 256]
    #[arg(long, env = "SHARDSTORE_CHECKPOINT_MIB")]
    checkpoint_mib: Option<u64>,
    /// O_DSYNC writes at the device per shard (sync_mode dsync) before adjacent queued ones share one device write (0: off). [default: 8]
    #[arg(long, env = "SHARDSTORE_WRITE_COMBINE")]
    write_combine: Option<u32>,
    /// Sequential read-ahead into the cache. [default: auto]
    #[arg(long, env = "SHARDSTORE_PREFETCH", value_enum)]
    prefetch: Option<config::Prefetch>,
    /// How an acknowledged write is made durable. [default: dsync]
    #[arg(long, env = "SHARDSTORE_SYNC_MODE", value_enum)]
    sync_mode: Option<config::SyncMode>,
    /// sled page cache per shard, MiB (the index is in memory; sled keeps its checkpoints), at most 1048576. [default: 16]
    #[arg(long, env = "SHARDSTORE_INDEX_CACHE_MIB")]
    index_cache_mib: Option<u64>,
    /// Once every shard is ready, write the front address to this file
    /// (for scripts and tests that listen on port 0). Removed at start
    /// (one left by an earlier run) and at a graceful stop.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Put the data areas on this block device (or partition), split into
    /// equal per-shard ranges, instead of files in the data folder. The
    /// first start on a device needs --format.
    #[arg(long, env = "SHARDSTORE_DEVICE")]
    device: Option<PathBuf>,
    /// Format a device the first time, or over a foreign or damaged
    /// superblock (destroys what was there),
    /// and create shard folders missing from an initialized data folder
    /// (empty: their chunks are lost). One-shot operator action: a flag
    /// only, never a config key or env.
    #[arg(long)]
    format: bool,
    /// Rebuild a missing or damaged index from the data area at start-up.
    /// One-shot operator action: a flag only, never a config key or env.
    #[arg(long)]
    rebuild_index: bool,
    /// Bound of each shard's queue of requests forwarded by other shards. [default: 1024]
    #[arg(long, env = "SHARDSTORE_FORWARD_QUEUE")]
    forward_queue: Option<u64>,
    /// Open connections per shard; past it new ones get BUSY. [default: 4096]
    #[arg(long, env = "SHARDSTORE_MAX_CONNECTIONS_PER_SHARD")]
    max_connections_per_shard: Option<u64>,
    /// Requests executing per connection (then TCP backpressure). [default: 256]
    #[arg(long, env = "SHARDSTORE_MAX_IN_FLIGHT")]
    max_in_flight: Option<u64>,
    /// Payload buffers one connection may hold, MiB. [default: 16]
    #[arg(long, env = "SHARDSTORE_CONN_BUFFER_MIB")]
    conn_buffer_mib: Option<u64>,
    /// Payload buffers a shard's connections may hold, MiB. [default: 64]
    #[arg(long, env = "SHARDSTORE_SHARD_BUFFER_MIB")]
    shard_buffer_mib: Option<u64>,
    /// Time to receive the rest of a started frame (plus its length at 64 KiB/s), ms. [default: 10000]
    #[arg(long, env = "SHARDSTORE_FRAME_TIMEOUT_MS")]
    frame_timeout_ms: Option<u64>,
    /// Idle connections are closed after this, ms. [default: 300000]
    #[arg(long, env = "SHARDSTORE_IDLE_TIMEOUT_MS")]
    idle_timeout_ms: Option<u64>,
    /// Longest wait for a client to take some reply bytes (a send: plus its length at 64 KiB/s), ms. [default: 10000]
    #[arg(long, env = "SHARDSTORE_WRITE_TIMEOUT_MS")]
    write_timeout_ms: Option<u64>,
    /// Longest wait for the owning shard to answer a forwarded request, ms. [default: 8000]
    #[arg(long, env = "SHARDSTORE_FORWARD_TIMEOUT_MS")]
    forward_timeout_ms: Option<u64>,
    /// Prometheus endpoint address (GET /metrics), or "off". [default: off]
    #[arg(long, env = "SHARDSTORE_METRICS_ADDR")]
    metrics_addr: Option<String>,
    /// How often shards publish counters for /metrics and the watchdog, ms. [default: 500]
    #[arg(long, env = "SHARDSTORE_METRICS_INTERVAL_MS")]
    metrics_interval_ms: Option<u64>,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish, ms. [default: 10000]
    #[arg(long, env = "SHARDSTORE_SHUTDOWN_TIMEOUT_MS")]
    shutdown_timeout_ms: Option<u64>,
    /// tracing filter, e.g. info or info,shardstore=debug (RUST_LOG is used when unset). [default: info]
    #[arg(long, env = "SHARDSTORE_LOG_LEVEL")]
    log_level: Option<String>,
    /// Log format. [default: auto: text on a terminal, JSON under journald]
    #[arg(long, env = "SHARDSTORE_LOG_FORMAT", value_enum)]
    log_format: Option<config::LogFormat>,
    /// File holding the shared secret clients must present.
    #[arg(long, env = "SHARDSTORE_AUTH_SECRET_FILE")]
    auth_secret_file: Option<PathBuf>,
    /// Serve a non-loopback address without authentication. [default: false]
    #[arg(long, env = "SHARDSTORE_INSECURE_NO_AUTH", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    insecure_no_auth: Option<bool>,
    /// TLS server certificate chain (PEM) for every TCP listener. [default: none]
    #[arg(long, env = "SHARDSTORE_TLS_CERT_FILE")]
    tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert-file. [default: none]
    #[arg(long, env = "SHARDSTORE_TLS_KEY_FILE")]
    tls_key_file: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM). [default: none]
    #[arg(long, env = "SHARDSTORE_TLS_CLIENT_CA_FILE")]
    tls_client_ca_file: Option<PathBuf>,
    /// RDMA address for rdma://HOST:PORT clients (builds with the `rdma` feature only). [default: none]
    #[arg(long, env = "SHARDSTORE_RDMA_LISTEN")]
    rdma_listen: Option<SocketAddr>,
}

impl ServeArgs {
    /// The flag-and-environment layer, in config-file shape.
    fn layer(&self) -> config::FileConfig {
        config::FileConfig {
            listen: self.listen,
            data_dir: self.data_dir.clone(),
            device: self.device.clone(),
            shards: self.shards,
            cpus: self.cpus.clone(),
            allow_oversubscribe: self.allow_oversubscribe,
            capacity_mib: self.capacity_mib,
            io_memory_kib: self.io_memory_kib,
            cache_mib: self.cache_mib,
            prefetch: self.prefetch,
            sync_mode: self.sync_mode,
            scrub_period_secs: self.scrub_period_secs,
            poll_us: self.poll_us,
            checkpoint_mib: self.checkpoint_mib,
            write_combine: self.write_combine,
            index_cache_mib: self.index_cache_mib,
            max_payload: self.max_payload,
            max_chunk_size: self.max_chunk_size,
            forward_queue: self.forward_queue,
            max_connections_per_shard: self.max_connections_per_shard,
            max_in_flight: self.max_in_flight,
            conn_buffer_mib: self.conn_buffer_mib,
            shard_buffer_mib: self.shard_buffer_mib,
            frame_timeout_ms: self.frame_timeout_ms,
            idle_timeout_ms: self.idle_timeout_ms,
            write_timeout_ms: self.write_timeout_ms,
            forward_timeout_ms: self.forward_timeout_ms,
            metrics_addr: self.metrics_addr.clone(),
            metrics_interval_ms: self.metrics_interval_ms,
            shutdown_timeout_ms: self.shutdown_timeout_ms,
            log_level: self.log_level.clone(),
            log_format: self.log_format,
            auth_secret_file: self.auth_secret_file.clone(),
            insecure_no_auth: self.insecure_no_auth,
            tls_cert_file: self.tls_cert_file.clone(),
            tls_key_file: self.tls_key_file.clone(),
            tls_client_ca_file: self.tls_client_ca_file.clone(),
            rdma_listen: self.rdma_listen,
        }
    }

    /// Flags over environment over file over defaults, validated.
    fn resolve(&self) -> Result<config::Settings, config::ConfigError> {
        self.resolve_on(&config::Machine::probe())
    }

    /// [`ServeArgs::resolve`] against `machine`'s limits.
    fn resolve_on(
        &self,
        machine: &config::Machine,
    ) -> Result<config::Settings, config::ConfigError> {
        let file = match &self.config {
            Some(p) => config::load_file(p)?,
            None => config::FileConfig::default(),
        };
        let mut merged = config::merge(self.layer(), file);
        if merged.log_level.is_none() {
            // RUST_LOG is the developer's habit: honoured below every other layer.
            merged.log_level = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
        }
        config::resolve(merged, machine)
    }
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Validate a config file (keys, types, values against this machine) without starting.
    Check {
        /// The TOML file.
        file: PathBuf,
        /// Check as a process with no locked-memory limit, as the packaged
        /// unit runs the server (LimitMEMLOCK=infinity), instead of against
        /// this shell's limit.
        #[arg(long)]
        memlock_unlimited: bool,
    },
    /// Print the commented example configuration (deploy/shardstore.toml).
    Default,
    /// Print the settings `serve` would run with, after flags, environment and file.
    Show(Box<ServeArgs>),
}

fn config_cmd(c: ConfigCmd) -> anyhow::Result<ExitCode> {
    match c {
        ConfigCmd::Check {
            file,
            memlock_unlimited,
        } => {
            let args = ServeArgs {
                config: Some(file.clone()),
                ..ServeArgs::default()
            };
            let mut machine = config::Machine::probe();
            if memlock_unlimited {
                machine.memlock_bytes = None;
            }
            match args.resolve_on(&machine) {
                Ok(_) => println!("{}: ok", file.display()),
                Err(e) => {
                    // Refused only for this shell's locked-memory limit:
                    // the config passes with none, as the unit runs it.
                    let unlimited = config::Machine {
                        memlock_bytes: None,
                        ..machine
                    };
                    if machine.memlock_bytes.is_some() && args.resolve_on(&unlimited).is_ok() {
                        anyhow::bail!(
                            "{e} (checked against this shell's locked-memory limit; the packaged \
                             unit sets LimitMEMLOCK=infinity: add --memlock-unlimited to check as it runs)"
                        )
                    }
                    return Err(e.into());
                }
            }
        }
        ConfigCmd::Default => print!("{}", config::example()),
        ConfigCmd::Show(args) => print!("{}", args.resolve()?.to_toml()),
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cmd = match cli.cmd {
        TopCmd::Check(c) => {
            logging::init_for_cli();
            let r = check::run(c);
            return r.unwrap_or_else(|e| {
                eprintln!("shardstore: {e:#}");
                ExitCode::FAILURE
            });
        }
        TopCmd::Other(cmd) => cmd,
    };
    let result = match cmd {
        Cmd::Serve(a) => serve_cmd(*a),
        Cmd::Config { cmd } => config_cmd(cmd),
        other => {
            logging::init_for_cli();
            admin::run(other)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shardstore: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A secret every user may read is served anyway, with a warning.
fn warn_if_world_readable(p: &std::path::Path, what: &str) {
    if config::world_readable(p) {
        tracing::warn!(file = %p.display(), "{what} is readable by every user; chmod o-r it");
    }
}

fn serve_cmd(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let s = a.resolve()?;
    logging::init(&s.log_level, s.log_format);
    // Before any file is opened or thread started: see `prepare_process`.
    serve::prepare_process(&s.data_dir)?;
    let auth_secret = match &s.auth_secret_file {
        Some(p) => {
            warn_if_world_readable(p, "auth_secret_file");
            Some(std::sync::Arc::new(config::read_secret(p)?))
        }
        None => None,
    };
    if let Some(key) = &s.tls_key_file {
        warn_if_world_readable(key, "tls_key_file (the server's private key)");
    }
    let tls = match (&s.tls_cert_file, &s.tls_key_file) {
        (Some(cert), Some(key)) => Some(
            shardstore_net::tls::server_config(cert, key, s.tls_client_ca_file.as_deref())
                .map_err(|e| config::ConfigError::key("tls_cert_file", e.to_string()))?,
        ),
        _ => None,
    };
    // Sizes in bytes. `config::validate` bounds every one so none of these
    // saturates; saturating keeps an unchecked value from wrapping small.
    let mib = |v: u64| v.saturating_mul(1 << 20);
    serve::serve(serve::ServeOptions {
        listen: s.listen,
        data_dir: s.data_dir,
        shards: s.shards,
        cpus: s.cpus,
        allow_oversubscribe: s.allow_oversubscribe,
        capacity_bytes: mib(s.capacity_mib),
        io_memory_bytes: s.io_memory_kib.saturating_mul(1 << 10) as usize,
        max_payload: s.max_payload,
        max_chunk_size: s.max_chunk_size,
        index_cache_bytes: mib(s.index_cache_mib),
        forward_queue: s.forward_queue as usize,
        ready_file: a.ready_file,
        device: s.device,
        format: a.format,
        rebuild_index: a.rebuild_index,
        metrics_addr: s.metrics_addr,
        metrics_interval: s.metrics_interval,
        shutdown_timeout: s.shutdown_timeout,
        cache_bytes: mib(s.cache_mib),
        prefetch: s.prefetch == config::Prefetch::Auto,
        sync_mode: s.sync_mode,
        scrub_period_secs: s.scrub_period_secs,
        poll: std::time::Duration::from_micros(s.poll_us),
        checkpoint_bytes: mib(s.checkpoint_mib),
        write_combine: s.write_combine,
        limits: s.limits,
        auth_secret,
        tls,
        rdma_listen: s.rdma_listen,
    })?;
    Ok(ExitCode::SUCCESS)
}
