//! Layered configuration for `shardstore serve`.
//!
//! Every setting has one name used three ways: the TOML key (`capacity_mib`),
//! the flag (`--capacity-mib`) and the environment variable
//! (`SHARDSTORE_CAPACITY_MIB`). Precedence, highest first: flag, environment,
//! config file (`--config`), built-in default. Flags and environment are
//! merged by clap (every serve flag declares its `env`); this module merges
//! the result over the file and the defaults, then validates the whole.
//!
//! Invariants: the file is parsed with `deny_unknown_fields`; every error is
//! one line naming the key (`capacity_mib: ...`, `FILE:3: shards: ...`);
//! validation refuses impossible values (more shards than allowed CPUs without
//! `allow_oversubscribe`, a cache larger than RAM, a data dir on tmpfs,
//! registered I/O memory beyond RLIMIT_MEMLOCK) before anything is created.
//! `config default` prints [`example`], which is `deploy/shardstore.toml`
//! byte for byte (a test keeps them in step).

use crate::conn_limits::ConnLimits;
use crate::serve::allowed_cpus;
use serde::{Deserialize, Serialize};
use shardstore_proto::limits;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text on a terminal; JSON when stderr goes to the journal (JOURNAL_STREAM set).
    Auto,
    /// Human-readable lines.
    Text,
    /// One JSON object per line (journald, log shippers).
    Json,
}

/// Sequential read-ahead into the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Prefetch {
    /// No read-ahead (for comparison).
    Off,
    /// Read ahead of each sequential stream, window adapted to the stream.
    Auto,
}

/// How a shard makes an acknowledged write durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Every extent write O_DSYNC: durable when it completes.
    Dsync,
    /// O_DSYNC for a write with no other in flight; overlapping writes
    /// share an fdatasync (group commit).
    Adaptive,
    /// Every write shares an fdatasync (group commit).
    Group,
}

/// The config file: every key optional, unknown keys refused.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_oversubscribe: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io_memory_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<Prefetch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_mode: Option<SyncMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scrub_period_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_combine: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index_cache_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_payload: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_chunk_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_queue: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_shard: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn_buffer_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard_buffer_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frame_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_interval_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_secret_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub insecure_no_auth: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdma_listen: Option<SocketAddr>,
}

/// Built-in defaults (the lowest layer).
pub mod defaults {
    pub const LISTEN: &str = "127.0.0.1:7700";
    pub const DATA_DIR: &str = "./shardstore-data";
    pub const CAPACITY_MIB: u64 = 1024;
    pub const IO_MEMORY_KIB: u64 = 1024;
    pub const CACHE_MIB: u64 = 256;
    pub const SCRUB_PERIOD_SECS: u64 = 24 * 3600;
    pub const INDEX_CACHE_MIB: u64 = 16;
    pub const CHECKPOINT_MIB: u64 = 256;
    pub const WRITE_COMBINE: u32 = 8;
    pub const FORWARD_QUEUE: u64 = 1024;
    pub const METRICS_INTERVAL_MS: u64 = 500;
    pub const SHUTDOWN_TIMEOUT_MS: u64 = 10_000;
    pub const LOG_LEVEL: &str = "info";
}

/// Fully resolved settings, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Block device for the data areas (instead of files in data_dir).
    pub device: Option<PathBuf>,
    pub shards: Option<u32>,
    pub cpus: Option<Vec<usize>>,
    pub allow_oversubscribe: bool,
    pub capacity_mib: u64,
    pub io_memory_kib: u64,
    /// Node-wide read cache, split evenly between the shards.
    pub cache_mib: u64,
    pub prefetch: Prefetch,
    pub sync_mode: SyncMode,
    /// One scrub pass over every live sector per this period; 0: off.
    pub scrub_period_secs: u64,
    /// How long an idle shard thread keeps polling before it sleeps, µs.
    pub poll_us: u64,
    /// Data written between index checkpoints, per shard.
    pub checkpoint_mib: u64,
    /// Durable writes at the device per shard before adjacent ones queue and
    /// share one device write (0: no combining).
    pub write_combine: u32,
    pub index_cache_mib: u64,
    pub max_payload: u32,
    pub max_chunk_size: u64,
    pub forward_queue: u64,
    /// Connection limits and timeouts of the serving path.
    pub limits: ConnLimits,
    pub metrics_addr: Option<SocketAddr>,
    pub metrics_interval: Duration,
    pub shutdown_timeout: Duration,
    pub log_level: String,
    pub log_format: LogFormat,
    pub auth_secret_file: Option<PathBuf>,
    /// Serve a non-loopback address without authentication (explicit opt-in).
    pub insecure_no_auth: bool,
    /// TLS server certificate chain and key (PEM); both or neither.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// With TLS: require client certificates signed by this CA (PEM).
    pub tls_client_ca_file: Option<PathBuf>,
    /// RDMA front address (builds with the `rdma` feature only).
    pub rdma_listen: Option<SocketAddr>,
}

/// A configuration error: one line, naming the key (and the file and line
/// when it comes from the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub at: Option<String>,
    pub key: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub fn key(key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            at: None,
            key: Some(key.to_string()),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(at) = &self.at {
            write!(f, "{at}: ")?;
        }
        if let Some(k) = &self.key {
            write!(f, "{k}: ")?;
        }
        // Never more than one line, whatever a parser said.
        let one: Vec<&str> = self.message.split_whitespace().collect();
        write!(f, "{}", one.join(" "))
    }
}

impl std::error::Error for ConfigError {}

/// Reads and parses a config file.
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        at: Some(path.display().to_string()),
        key: None,
        message: format!("cannot read config file: {e}"),
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses config text; `name` is used in errors.
pub fn parse(text: &str, name: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str::<FileConfig>(text).map_err(|e| {
        let (line, key) = match e.span() {
            Some(span) => {
                let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
                let line = text.lines().nth(line_no - 1).unwrap_or("");
                let key = line
                    .split_once('=')
                    .map(|(k, _)| k.trim().trim_matches('"').to_string())
                    .filter(|k| !k.is_empty() && !k.starts_with('#') && !k.starts_with('['));
                (Some(line_no), key)
            }
            None => (None, None),
        };
        ConfigError {
            at: Some(match line {
                Some(l) => format!("{name}:{l}"),
                None => name.to_string(),
            }),
            key,
            message: e.message().to_string(),
        }
    })
}

/// Largest `write_combine`.
pub const MAX_WRITE_COMBINE: u32 = 64;

/// Largest `poll_us` accepted (one second).
pub const MAX_POLL_US: u64 = 1_000_000;

/// Merges `over` (flags and environment, already merged by clap) over
/// `file`: a value in `over` wins.
pub fn merge(over: FileConfig, file: FileConfig) -> FileConfig {
    macro_rules! pick {
        ($($f:ident),* $(,)?) => {
            FileConfig { $($f: over.$f.or(file.$f),)* }
        };
    }
    pick!(
        listen,
        data_dir,
        device,
        shards,
        cpus,
        allow_oversubscribe,
        capacity_mib,
        io_memory_kib,
        cache_mib,
        prefetch,
        sync_mode,
        scrub_period_secs,
        poll_us,
        checkpoint_mib,
        write_combine,
        index_cache_mib,
        max_payload,
        max_chunk_size,
        forward_queue,
        max_connections_per_shard,
        max_in_flight,
        conn_buffer_mib,
        shard_buffer_mib,
        frame_timeout_ms,
        idle_timeout_ms,
        write_timeout_ms,
        forward_timeout_ms,
        metrics_addr,
        metrics_interval_ms,
        shutdown_timeout_ms,
        log_level,
        log_format,
        auth_secret_file,
        insecure_no_auth,
        tls_cert_file,
        tls_key_file,
        tls_client_ca_file,
        rdma_listen,
    )
}

/// Facts about the machine that validation checks against (a struct, so
/// unit tests can pretend).
#[derive(Debug, Clone)]
pub struct Machine {
    pub allowed_cpus: Vec<usize>,
    pub ram_bytes: u64,
    /// RLIMIT_MEMLOCK soft limit; None when unlimited.
    pub memlock_bytes: Option<u64>,
}

/// Whether `shards` executors registering `io_memory_kib` each fit the
/// locked-memory limit (`None`: unlimited). The start-up checks it twice:
/// with the configured (or one-per-CPU) shard count, then with the data
/// folder's own once it is read.
pub fn memlock_fits(io_memory_kib: u64, shards: u64, limit: Option<u64>) -> Result<(), String> {
    let Some(limit) = limit else {
        return Ok(());
    };
    let need = io_memory_kib.saturating_mul(1 << 10).saturating_mul(shards);
    if need > limit {
        return Err(format!(
            "{io_memory_kib} KiB x {shards} shards = {} KiB exceeds the locked-memory limit of {} KiB \
             (RLIMIT_MEMLOCK; raise it with `ulimit -l` or LimitMEMLOCK=, or lower io_memory_kib)",
            need >> 10,
            limit >> 10
        ));
    }
    Ok(())
}

impl Machine {
    pub fn probe() -> Machine {
        // SAFETY: sysconf and getrlimit only fill plain values.
        let ram_bytes = unsafe {
            let pages = libc::sysconf(libc::_SC_PHYS_PAGES);
            let size = libc::sysconf(libc::_SC_PAGESIZE);
            if pages > 0 && size > 0 {
                pages as u64 * size as u64
            } else {
                u64::MAX
            }
        };
        let memlock_bytes = unsafe {
            let mut r: libc::rlimit = std::mem::zeroed();
            if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) == 0
                && r.rlim_cur != libc::RLIM_INFINITY
            {
                Some(r.rlim_cur)
            } else {
                None
            }
        };
        Machine {
            allowed_cpus: allowed_cpus(),
            ram_bytes,
            memlock_bytes,
        }
    }
}

/// Parses a CPU list such as `0-3,8,10-11`.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: usize = a.parse().map_err(|_| format!("bad CPU number {a:?}"))?;
        let b: usize = b.parse().map_err(|_| format!("bad CPU number {b:?}"))?;
        if a > b || b >= libc::CPU_SETSIZE as usize {
            return Err(format!("bad CPU range {part:?}"));
        }
        for c in a..=b {
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    if out.is_empty() {
        return Err("empty CPU list".into());
    }
    Ok(out)
}

/// The filesystem type of `path`, or of its nearest existing ancestor.
fn fs_magic(path: &Path) -> Option<i64> {
    let abs = std::path::absolute(path).ok()?;
    let mut p = abs.as_path();
    loop {
        if p.exists() {
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok()?;
            // SAFETY: statfs fills a plain struct from a NUL-terminated path.
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
                return None;
            }
            #[allow(clippy::unnecessary_cast)]
            return Some(st.f_type as i64);
        }
        p = p.parent()?;
    }
}

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

fn bad(key: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError::key(key, msg)
}

/// Resolves merged values over the defaults and validates them against the
/// machine.
pub fn resolve(c: FileConfig, m: &Machine) -> Result<Settings, ConfigError> {
    let listen = c
        .listen
        .unwrap_or_else(|| defaults::LISTEN.parse().expect("default listen"));
    let data_dir = c
        .data_dir
        .unwrap_or_else(|| PathBuf::from(defaults::DATA_DIR));
    let metrics_addr = match c.metrics_addr.as_deref().map(str::trim) {
        None | Some("") | Some("off") => None,
        Some(a) => Some(a.parse::<SocketAddr>().map_err(|e| {
            bad(
                "metrics_addr",
                format!("{a:?} is not \"off\" or an IP:PORT address: {e}"),
            )
        })?),
    };
    let cpus = match &c.cpus {
        None => None,
        Some(s) => Some(parse_cpu_list(s).map_err(|e| bad("cpus", e))?),
    };
    let d = ConnLimits::default();
    let ms = |v: Option<u64>, dflt: Duration| v.map(Duration::from_millis).unwrap_or(dflt);
    let limits = ConnLimits {
        max_connections: c.max_connections_per_shard.unwrap_or(d.max_connections),
        max_in_flight: c
            .max_in_flight
            .map(|v| v as usize)
            .unwrap_or(d.max_in_flight),
        conn_buffer_bytes: c
            .conn_buffer_mib
            .map(|v| v.saturating_mul(1 << 20))
            .unwrap_or(d.conn_buffer_bytes),
        shard_buffer_bytes: c
            .shard_buffer_mib
            .map(|v| v.saturating_mul(1 << 20))
            .unwrap_or(d.shard_buffer_bytes),
        frame_timeout: ms(c.frame_timeout_ms, d.frame_timeout),
        idle_timeout: ms(c.idle_timeout_ms, d.idle_timeout),
        write_timeout: ms(c.write_timeout_ms, d.write_timeout),
        forward_timeout: ms(c.forward_timeout_ms, d.forward_timeout),
    };
    let s = Settings {
        listen,
        data_dir,
        device: c.device,
        shards: c.shards,
        cpus,
        allow_oversubscribe: c.allow_oversubscribe.unwrap_or(false),
        capacity_mib: c.capacity_mib.unwrap_or(defaults::CAPACITY_MIB),
        io_memory_kib: c.io_memory_kib.unwrap_or(defaults::IO_MEMORY_KIB),
        cache_mib: c.cache_mib.unwrap_or(defaults::CACHE_MIB),
        prefetch: c.prefetch.unwrap_or(Prefetch::Auto),
        sync_mode: c.sync_mode.unwrap_or(SyncMode::Dsync),
        scrub_period_secs: c.scrub_period_secs.unwrap_or(defaults::SCRUB_PERIOD_SECS),
        poll_us: c.poll_us.unwrap_or(0),
        checkpoint_mib: c.checkpoint_mib.unwrap_or(defaults::CHECKPOINT_MIB),
        write_combine: c.write_combine.unwrap_or(defaults::WRITE_COMBINE),
        index_cache_mib: c.index_cache_mib.unwrap_or(defaults::INDEX_CACHE_MIB),
        max_payload: c.max_payload.unwrap_or(limits::MAX_PAYLOAD),
        max_chunk_size: c.max_chunk_size.unwrap_or(limits::MAX_CHUNK_SIZE),
        forward_queue: c.forward_queue.unwrap_or(defaults::FORWARD_QUEUE),
        limits,
        metrics_addr,
        metrics_interval: Duration::from_millis(
            c.metrics_interval_ms
                .unwrap_or(defaults::METRICS_INTERVAL_MS),
        ),
        shutdown_timeout: Duration::from_millis(
            c.shutdown_timeout_ms
                .unwrap_or(defaults::SHUTDOWN_TIMEOUT_MS),
        ),
        log_level: c
            .log_level
            .unwrap_or_else(|| defaults::LOG_LEVEL.to_string()),
        log_format: c.log_format.unwrap_or(LogFormat::Auto),
        auth_secret_file: c.auth_secret_file,
        insecure_no_auth: c.insecure_no_auth.unwrap_or(false),
        tls_cert_file: c.tls_cert_file,
        tls_key_file: c.tls_key_file,
        tls_client_ca_file: c.tls_client_ca_file,
        rdma_listen: c.rdma_listen,
    };
    validate(&s, m)?;
    Ok(s)
}

/// Largest `io_memory_kib`: glommio registers (pins) it per shard.
/// Longest connection timeout, ms (a day).
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;

pub const MAX_IO_MEMORY_KIB: u64 = 1 << 20;
/// Largest `capacity_mib` (1 PiB per shard): far past any device, and its
/// bytes summed over `MAX_SHARDS` shards still fit a u64 (a value past
/// 2^44 MiB used to wrap to a small data area when shifted to bytes).
pub const MAX_CAPACITY_MIB: u64 = 1 << 30;
/// Largest `index_cache_mib` (1 TiB of sled page cache per shard).
pub const MAX_INDEX_CACHE_MIB: u64 = 1 << 20;
const _: () = assert!(MAX_CAPACITY_MIB
    .checked_mul((1 << 20) * limits::MAX_SHARDS as u64)
    .is_some());

fn validate(s: &Settings, m: &Machine) -> Result<(), ConfigError> {
    if s.rdma_listen.is_some() && !cfg!(feature = "rdma") {
        return Err(bad(
            "rdma_listen",
            "this shardstore was built without rdma (rebuild with --features rdma)",
        ));
    }
    if s.rdma_listen.is_some() && s.auth_secret_file.is_some() {
        return Err(bad(
            "rdma_listen",
            "RDMA connections cannot authenticate yet: unset auth_secret_file or rdma_listen",
        ));
    }
    if s.max_payload == 0
        || s.max_payload > limits::MAX_PAYLOAD
        || s.max_payload % limits::SECTOR_SIZE != 0
    {
        return Err(bad(
            "max_payload",
            format!(
                "{} is not a multiple of {} between {} and {}",
                s.max_payload,
                limits::SECTOR_SIZE,
                limits::SECTOR_SIZE,
                limits::MAX_PAYLOAD
            ),
        ));
    }
    for (key, v, lo, hi, note) in [
        (
            "max_chunk_size",
            s.max_chunk_size,
            1,
            limits::MAX_CHUNK_SIZE,
            "",
        ),
        (
            "capacity_mib",
            s.capacity_mib,
            1,
            MAX_CAPACITY_MIB,
            " (1 PiB per shard)",
        ),
        (
            "index_cache_mib",
            s.index_cache_mib,
            0,
            MAX_INDEX_CACHE_MIB,
            " (1 TiB per shard)",
        ),
        ("checkpoint_mib", s.checkpoint_mib, 1, 1 << 20, ""),
        (
            "write_combine",
            u64::from(s.write_combine),
            0,
            u64::from(MAX_WRITE_COMBINE),
            "",
        ),
        (
            "io_memory_kib",
            s.io_memory_kib,
            64,
            MAX_IO_MEMORY_KIB,
            " (1 GiB per shard)",
        ),
    ] {
        if !(lo..=hi).contains(&v) {
            return Err(bad(key, format!("{v} is not between {lo} and {hi}{note}")));
        }
    }
    if s.poll_us > MAX_POLL_US {
        return Err(bad(
            "poll_us",
            format!("{} is over {MAX_POLL_US} (one second)", s.poll_us),
        ));
    }
    if s.forward_queue == 0 {
        return Err(bad("forward_queue", "must be at least 1"));
    }
    let l = &s.limits;
    for (key, v) in [
        ("max_connections_per_shard", l.max_connections),
        ("max_in_flight", l.max_in_flight as u64),
        ("conn_buffer_mib", l.conn_buffer_bytes),
        ("shard_buffer_mib", l.shard_buffer_bytes),
        ("frame_timeout_ms", l.frame_timeout.as_millis() as u64),
        ("idle_timeout_ms", l.idle_timeout.as_millis() as u64),
        ("write_timeout_ms", l.write_timeout.as_millis() as u64),
        ("forward_timeout_ms", l.forward_timeout.as_millis() as u64),
    ] {
        if v == 0 {
            return Err(bad(key, "must be at least 1"));
        }
        // A deadline this far off overflowed the clock (a panic at the
        // first frame, which aborts the server).
        if key.ends_with("_timeout_ms") && v > MAX_TIMEOUT_MS {
            return Err(bad(key, format!("{v} is over {MAX_TIMEOUT_MS} (a day)")));
        }
    }
    let shutdown_ms = s.shutdown_timeout.as_millis();
    if shutdown_ms > u128::from(MAX_TIMEOUT_MS) {
        return Err(bad(
            "shutdown_timeout_ms",
            format!("{shutdown_ms} is over {MAX_TIMEOUT_MS} (a day)"),
        ));
    }
    if s.metrics_interval < Duration::from_millis(50)
        || s.metrics_interval > Duration::from_secs(60)
    {
        return Err(bad(
            "metrics_interval_ms",
            format!(
                "{} is not between 50 and 60000",
                s.metrics_interval.as_millis()
            ),
        ));
    }
    if let Some(n) = s.shards {
        if n == 0 || n > limits::MAX_SHARDS {
            return Err(bad(
                "shards",
                format!("{n} is not between 1 and {}", limits::MAX_SHARDS),
            ));
        }
    }
    // CPUs the shards may use: the `cpus` list, which must be allowed.
    let cpus = match &s.cpus {
        Some(list) => {
            if let Some(c) = list.iter().find(|c| !m.allowed_cpus.contains(c)) {
                return Err(bad(
                    "cpus",
                    format!(
                        "CPU {c} is not allowed for this process (allowed: {})",
                        fmt_cpus(&m.allowed_cpus)
                    ),
                ));
            }
            list.clone()
        }
        None => m.allowed_cpus.clone(),
    };
    if let Some(n) = s.shards {
        check_oversubscribe(n, &cpus, s.allow_oversubscribe)?;
        check_polling(n, &cpus, s.poll_us)?;
    } else if cpus.len() > limits::MAX_SHARDS as usize {
        // One shard per CPU by default: refused here, before a data
        // folder is made for a shard count no start could use.
        return Err(bad(
            "shards",
            format!(
                "one shard per CPU would be {} shards, over the limit of {}; set shards \
                 (or cpus)",
                cpus.len(),
                limits::MAX_SHARDS
            ),
        ));
    }
    let shards = s.shards.map(u64::from).unwrap_or(cpus.len() as u64);
    memlock_fits(s.io_memory_kib, shards, m.memlock_bytes).map_err(|e| bad("io_memory_kib", e))?;
    if s.cache_mib.saturating_mul(1 << 20) > m.ram_bytes {
        return Err(bad(
            "cache_mib",
            format!(
                "{} MiB is more than this machine's {} MiB of RAM",
                s.cache_mib,
                m.ram_bytes >> 20
            ),
        ));
    }
    if let Some(magic) = fs_magic(&s.data_dir) {
        if magic == TMPFS_MAGIC || magic == RAMFS_MAGIC {
            return Err(bad(
                "data_dir",
                format!(
                    "{} is on tmpfs/ramfs, which cannot do O_DIRECT; use a real filesystem",
                    s.data_dir.display()
                ),
            ));
        }
    }
    if s.log_level.trim().is_empty() {
        return Err(bad("log_level", "is empty"));
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&s.log_level) {
        return Err(bad("log_level", format!("{:?}: {e}", s.log_level)));
    }
    if let Some(p) = &s.auth_secret_file {
        read_secret(p)?;
    }
    match (&s.tls_cert_file, &s.tls_key_file) {
        (Some(_), None) => return Err(bad("tls_key_file", "is required with tls_cert_file")),
        (None, Some(_)) => return Err(bad("tls_cert_file", "is required with tls_key_file")),
        _ => {}
    }
    if s.tls_client_ca_file.is_some() && s.tls_cert_file.is_none() {
        return Err(bad(
            "tls_client_ca_file",
            "needs TLS: set tls_cert_file and tls_key_file",
        ));
    }
    let authenticated = s.auth_secret_file.is_some() || s.tls_client_ca_file.is_some();
    if let Some(r) = s.rdma_listen {
        // RDMA connections cannot authenticate (nor use TLS): off loopback
        // they serve anyone who reaches them, which must be asked for.
        if !r.ip().is_loopback() && !s.insecure_no_auth {
            return Err(bad(
                "rdma_listen",
                format!(
                    "{r} is not a loopback address and RDMA connections cannot authenticate; \
                     pass --insecure-no-auth to serve anyone who can reach it"
                ),
            ));
        }
        if s.tls_cert_file.is_some() {
            return Err(bad(
                "rdma_listen",
                "RDMA connections cannot use TLS: unset tls_cert_file or rdma_listen",
            ));
        }
    }
    if !s.listen.ip().is_loopback() && !authenticated && !s.insecure_no_auth {
        return Err(bad(
            "listen",
            format!(
                "{} is not a loopback address and no authentication is configured; set \
                 auth_secret_file (or tls_client_ca_file), or pass --insecure-no-auth to serve \
                 anyone who can reach it",
                s.listen
            ),
        ));
    }
    Ok(())
}

/// Reads the shared secret with the protocol's rules (trailing whitespace
/// trimmed, 16..=4096 bytes).
pub fn read_secret(p: &Path) -> Result<Vec<u8>, ConfigError> {
    shardstore_proto::auth::read_secret_file(p).map_err(|e| bad("auth_secret_file", e.to_string()))
}

/// True if every user may read the file (serve logs a warning).
pub fn world_readable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o004 != 0)
}

/// Refuses idle polling when shards share cores: a polling shard thread
/// makes no system calls, so another shard on its core (and the requests it
/// forwards there) would wait for the scheduler tick.
pub fn check_polling(shards: u32, cpus: &[usize], poll_us: u64) -> Result<(), ConfigError> {
    if poll_us > 0 && shards as usize > cpus.len() {
        return Err(bad(
            "poll_us",
            format!(
                "{shards} shards share {} CPUs: shard threads polling on a shared core would \
                 hold each other off. Set poll_us = 0 or give each shard a CPU",
                cpus.len()
            ),
        ));
    }
    Ok(())
}

/// Refuses more shards than CPUs unless the operator said so.
pub fn check_oversubscribe(shards: u32, cpus: &[usize], allow: bool) -> Result<(), ConfigError> {
    if shards as usize > cpus.len() && !allow {
        return Err(bad(
            "shards",
            format!(
                "{shards} shards but only {} CPUs ({}) to pin them to; shards would share cores. \
                 Set allow_oversubscribe = true (--allow-oversubscribe) to run anyway",
                cpus.len(),
                fmt_cpus(cpus)
            ),
        ));
    }
    Ok(())
}

fn fmt_cpus(c: &[usize]) -> String {
    c.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

impl Settings {
    /// The resolved settings as TOML (for `config show`).
    pub fn to_toml(&self) -> String {
        let f = FileConfig {
            listen: Some(self.listen),
            data_dir: Some(self.data_dir.clone()),
            device: self.device.clone(),
            shards: self.shards,
            cpus: self.cpus.as_ref().map(|c| fmt_cpus(c)),
            allow_oversubscribe: Some(self.allow_oversubscribe),
            capacity_mib: Some(self.capacity_mib),
            io_memory_kib: Some(self.io_memory_kib),
            cache_mib: Some(self.cache_mib),
            prefetch: Some(self.prefetch),
            sync_mode: Some(self.sync_mode),
            scrub_period_secs: Some(self.scrub_period_secs),
            poll_us: Some(self.poll_us),
            checkpoint_mib: Some(self.checkpoint_mib),
            write_combine: Some(self.write_combine),
            index_cache_mib: Some(self.index_cache_mib),
            max_payload: Some(self.max_payload),
            max_chunk_size: Some(self.max_chunk_size),
            forward_queue: Some(self.forward_queue),
            max_connections_per_shard: Some(self.limits.max_connections),
            max_in_flight: Some(self.limits.max_in_flight as u64),
            conn_buffer_mib: Some(self.limits.conn_buffer_bytes >> 20),
            shard_buffer_mib: Some(self.limits.shard_buffer_bytes >> 20),
            frame_timeout_ms: Some(self.limits.frame_timeout.as_millis() as u64),
            idle_timeout_ms: Some(self.limits.idle_timeout.as_millis() as u64),
            write_timeout_ms: Some(self.limits.write_timeout.as_millis() as u64),
            forward_timeout_ms: Some(self.limits.forward_timeout.as_millis() as u64),
            metrics_addr: Some(
                self.metrics_addr
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "off".into()),
            ),
            metrics_interval_ms: Some(self.metrics_interval.as_millis() as u64),
            shutdown_timeout_ms: Some(self.shutdown_timeout.as_millis() as u64),
            log_level: Some(self.log_level.clone()),
            log_format: Some(self.log_format),
            auth_secret_file: self.auth_secret_file.clone(),
            insecure_no_auth: Some(self.insecure_no_auth),
            tls_cert_file: self.tls_cert_file.clone(),
            tls_key_file: self.tls_key_file.clone(),
            tls_client_ca_file: self.tls_client_ca_file.clone(),
            rdma_listen: self.rdma_listen,
        };
        toml::to_string(&f).expect("settings serialize")
    }
}

/// One documented key of the example config.
struct Doc {
    key: &'static str,
    /// Set in the example (uncommented) to this value; None: shown commented
    /// out with its default.
    set: Option<&'static str>,
    default: &'static str,
    help: &'static [&'static str],
}

const DOCS: &[Doc] = &[
    Doc {
        key: "listen",
        set: None,
        default: "\"127.0.0.1:7700\"",
        help: &[
            "Front address (every shard accepts here, SO_REUSEPORT); shard i also",
            "listens on port + 1 + i. Use 0.0.0.0:7700 to serve other machines.",
        ],
    },
    Doc {
        key: "data_dir",
        set: Some("\"/var/lib/shardstore\""),
        default: "\"./shardstore-data\"",
        help: &[
            "Data folder (node identity, one shard-NNN folder per shard). Must be a",
            "real filesystem: tmpfs cannot do O_DIRECT and is refused. Under the",
            "packaged systemd unit only /var/lib/shardstore is writable: for another",
            "path add `ReadWritePaths=` with `systemctl edit shardstore`.",
        ],
    },
    Doc {
        key: "device",
        set: None,
        default: "<none: data files in data_dir>",
        help: &[
            "Block device (or partition) holding the data areas, split into equal",
            "per-shard ranges; data_dir still holds the node file and the indexes.",
            "The service user needs read-write access to the device node. The first",
            "start on a device needs the --format flag (run `shardstore serve --config",
            "FILE --format` once by hand, stop it, then start the service; run as root",
            "on the service's data folder it runs as the folder's owner).",
        ],
    },
    Doc {
        key: "shards",
        set: None,
        default: "<the data folder's count, or one per allowed CPU>",
        help: &[
            "Number of shards (one pinned executor each). A data folder keeps the",
            "count it was created with (resharding is not supported yet).",
        ],
    },
    Doc {
        key: "cpus",
        set: None,
        default: "<every CPU the process may use (taskset, CPUAffinity=)>",
        help: &["CPU list to pin shards to, e.g. \"0-3,8\"; each must be allowed."],
    },
    Doc {
        key: "allow_oversubscribe",
        set: None,
        default: "false",
        help: &["Allow more shards than CPUs (shards then share cores: testing only)."],
    },
    Doc {
        key: "capacity_mib",
        set: None,
        default: "1024",
        help: &[
            "Data area per shard in MiB, preallocated when a shard is created; 1 to",
            "1073741824 (1 PiB).",
        ],
    },
    Doc {
        key: "io_memory_kib",
        set: None,
        default: "1024",
        help: &[
            "glommio registered (mlocked) I/O memory per shard, KiB, 64 to 1048576.",
            "shards x this must fit RLIMIT_MEMLOCK (LimitMEMLOCK= in the unit).",
        ],
    },
    Doc {
        key: "cache_mib",
        set: None,
        default: "256",
        help: &[
            "Read cache for the whole node, MiB, split evenly between the shards",
            "(each shard owns its slice; S3-FIFO, scan-resistant). 0 disables it.",
        ],
    },
    Doc {
        key: "prefetch",
        set: None,
        default: "\"auto\"",
        help: &[
            "Sequential read-ahead into the cache: \"auto\" (adaptive window per",
            "stream, up to 8 MiB or a sixteenth of the shard's cache slice) or \"off\".",
        ],
    },
    Doc {
        key: "sync_mode",
        set: None,
        default: "\"dsync\"",
        help: &[
            "How an acknowledged write is made durable: \"dsync\" (every write O_DSYNC,",
            "one device round trip), \"adaptive\" (O_DSYNC when no other write is in",
            "flight, else a plain write sharing an fdatasync with the writes beside",
            "it) or \"group\" (every write shares an fdatasync).",
        ],
    },
    Doc {
        key: "poll_us",
        set: None,
        default: "0",
        help: &[
            "Microseconds an idle shard thread keeps polling its rings before it sleeps",
            "(Seastar's idle poll). A request arriving meanwhile does not wait for a",
            "sleeping core to wake, which shortens round trips at low queue depth (see",
            "README, Performance), but the core stays busy: for cores given to shardstore",
            "alone; refused when shards share CPUs. While device writes or syncs are in",
            "flight the poller lets kernel work run every 20 us (write completions run on",
            "that core), and the core stays busy. 0 (default): sleep at once. At most",
            "1000000.",
        ],
    },
    Doc {
        key: "scrub_period_secs",
        set: None,
        default: "86400",
        help: &[
            "The background scrubber re-reads and verifies every live sector once per",
            "this period, on a low-priority task queue. 0 turns it off.",
        ],
    },
    Doc {
        key: "checkpoint_mib",
        set: None,
        default: "256",
        help: &[
            "Data written per shard between index checkpoints, MiB (at most this or the",
            "shard's capacity). A checkpoint writes every index record changed since the",
            "last one to sled; recovery after a crash scans at most this much. Larger:",
            "fewer, longer checkpoints (less CPU per write, rarer latency spikes when the",
            "shard shares its core with them) and a longer recovery scan.",
        ],
    },
    Doc {
        key: "write_combine",
        set: None,
        default: "8",
        help: &[
            "With sync_mode = \"dsync\": O_DSYNC writes a shard lets go to the device at",
            "once before new ones queue; queued writes that lie next to each other on",
            "disk then go out as one O_DSYNC device write (up to 512 KiB), each acknowledged",
            "when it completes. Deep queues of small writes share device writes and",
            "flushes instead of paying one each. 0 turns combining off.",
        ],
    },
    Doc {
        key: "index_cache_mib",
        set: None,
        default: "16",
        help: &[
            "sled page cache per shard, MiB (the index is in memory; sled keeps its checkpoints),",
            "at most 1048576 (1 TiB).",
        ],
    },
    Doc {
        key: "max_payload",
        set: None,
        default: "8388608",
        help: &["Largest payload of one request, bytes (a multiple of 4096, at most 8 MiB)."],
    },
    Doc {
        key: "max_chunk_size",
        set: None,
        default: "67108864",
        help: &["Largest chunk, bytes (at most 64 MiB)."],
    },
    Doc {
        key: "forward_queue",
        set: None,
        default: "1024",
        help: &[
            "Bound of each shard's queue of requests forwarded by other shards;",
            "when full the sender answers BUSY.",
        ],
    },
    Doc {
        key: "max_connections_per_shard",
        set: None,
        default: "4096",
        help: &["Open connections per shard; past it new ones get BUSY and are closed."],
    },
    Doc {
        key: "max_in_flight",
        set: None,
        default: "256",
        help: &[
            "Requests executing per connection; past it the connection is not read",
            "(TCP backpressure).",
        ],
    },
    Doc {
        key: "conn_buffer_mib",
        set: None,
        default: "16",
        help: &["Payload buffers one connection may hold, MiB."],
    },
    Doc {
        key: "shard_buffer_mib",
        set: None,
        default: "64",
        help: &[
            "Payload buffers all of a shard's connections may hold, MiB; past it",
            "requests get BUSY. Below conn_buffer_mib, one connection can hold it all.",
        ],
    },
    Doc {
        key: "frame_timeout_ms",
        set: None,
        default: "10000",
        help: &[
            "Longest time to receive the rest of a frame once it has started, plus its",
            "length at 64 KiB/s (a large WRITE on a slow link).",
        ],
    },
    Doc {
        key: "idle_timeout_ms",
        set: None,
        default: "300000",
        help: &["A connection with no request for this long is closed."],
    },
    Doc {
        key: "write_timeout_ms",
        set: None,
        default: "10000",
        help: &[
            "Longest wait for a client to take some reply bytes; one send of queued replies",
            "may last this plus their length at 64 KiB/s at most.",
        ],
    },
    Doc {
        key: "forward_timeout_ms",
        set: None,
        default: "8000",
        help: &[
            "Longest wait for the shard that owns a chunk to answer a request another",
            "shard took for it (a client that did not route by hash; RDMA). Past it the",
            "client gets TIMEOUT: the request may still take effect.",
        ],
    },
    Doc {
        key: "metrics_addr",
        set: Some("\"127.0.0.1:9700\""),
        default: "\"off\"",
        help: &[
            "Prometheus text endpoint (GET /metrics), or \"off\". Keep it on loopback",
            "or a management network: it has no authentication.",
        ],
    },
    Doc {
        key: "metrics_interval_ms",
        set: None,
        default: "500",
        help: &[
            "How often each shard publishes its counters for the metrics endpoint",
            "and the systemd watchdog (50..60000).",
        ],
    },
    Doc {
        key: "shutdown_timeout_ms",
        set: None,
        default: "10000",
        help: &[
            "On SIGTERM/SIGINT: how long to let in-flight requests finish before",
            "closing the shards anyway. Keep it below the unit's TimeoutStopSec=.",
        ],
    },
    Doc {
        key: "log_level",
        set: None,
        default: "\"info\"",
        help: &[
            "tracing filter, e.g. \"info\" or \"info,shardstore=debug\". RUST_LOG is",
            "used only when no flag, SHARDSTORE_LOG_LEVEL or key sets it.",
        ],
    },
    Doc {
        key: "log_format",
        set: None,
        default: "\"auto\"",
        help: &["\"text\", \"json\" or \"auto\" (text on a terminal, JSON under journald)."],
    },
    Doc {
        key: "auth_secret_file",
        set: None,
        default: "<none>",
        help: &[
            "File holding the shared secret clients must present (must exist and be",
            "readable by the service user only; a world-readable file is warned about).",
        ],
    },
    Doc {
        key: "insecure_no_auth",
        set: None,
        default: "false",
        help: &[
            "Allow a non-loopback `listen` address without authentication (neither",
            "auth_secret_file nor tls_client_ca_file). Off: such a start is refused.",
        ],
    },
    Doc {
        key: "tls_cert_file",
        set: None,
        default: "<none: plain TCP>",
        help: &["TLS server certificate chain (PEM) for every TCP listener; needs tls_key_file."],
    },
    Doc {
        key: "tls_key_file",
        set: None,
        default: "<none>",
        help: &["Private key (PEM) of tls_cert_file; readable by the service user only."],
    },
    Doc {
        key: "tls_client_ca_file",
        set: None,
        default: "<none: no client certificates>",
        help: &["With TLS, require client certificates signed by this CA (PEM)."],
    },
    Doc {
        key: "rdma_listen",
        set: None,
        default: "<none: no RDMA>",
        help: &[
            "RDMA address (InfiniBand/RoCE; builds with the `rdma` feature only):",
            "clients use rdma://HOST:PORT. Needs a device in /sys/class/infiniband;",
            "no authentication or TLS over RDMA, so it refuses auth_secret_file.",
            "The RDMA thread counts as one more shard: at most max_connections_per_shard",
            "RDMA connections, and shard_buffer_mib of payloads held (then BUSY).",
        ],
    },
];

/// The commented example config: `shardstore config default`, and
/// `deploy/shardstore.toml` byte for byte.
pub fn example() -> String {
    let mut out = String::from(
        "# shardstore configuration (shardstore serve --config FILE).\n\
         #\n\
         # Every key is also a flag (--capacity-mib) and an environment variable\n\
         # (SHARDSTORE_CAPACITY_MIB). Precedence: flag > environment > this file >\n\
         # built-in default. Unknown keys, wrong types and impossible values are\n\
         # refused with a one-line error naming the key; check a file without\n\
         # starting with `shardstore config check FILE`, and see what serve would\n\
         # use with `shardstore config show --config FILE`.\n\
         #\n\
         # Commented-out keys show their defaults.\n",
    );
    for d in DOCS {
        out.push('\n');
        for h in d.help {
            out.push_str("# ");
            out.push_str(h);
            out.push('\n');
        }
        match d.set {
            Some(v) => {
                out.push_str(&format!("# (default: {})\n", d.default));
                out.push_str(&format!("{} = {v}\n", d.key));
            }
            None => out.push_str(&format!("# {} = {}\n", d.key, d.default)),
        }
    }
    out
}

/// The keys the example documents (for tests).
#[cfg(test)]
pub fn documented_keys() -> Vec<&'static str> {
    DOCS.iter().map(|d| d.key).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine {
            allowed_cpus: vec![0, 1],
            ram_bytes: 4 << 30,
            memlock_bytes: Some(8 << 20),
        }
    }

    fn check(text: &str) -> Result<Settings, String> {
        let f = parse(text, "t.toml").map_err(|e| e.to_string())?;
        resolve(f, &machine()).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_resolve() {
        let s = check("").unwrap();
        assert_eq!(s.capacity_mib, defaults::CAPACITY_MIB);
        assert_eq!(s.metrics_addr, None);
        assert_eq!(s.log_format, LogFormat::Auto);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = check("shards = 1\ncapacity_mb = 5\n").unwrap_err();
        assert!(e.starts_with("t.toml:2: capacity_mb: unknown field"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn wrong_type_names_key() {
        let e = check("capacity_mib = \"big\"\n").unwrap_err();
        assert!(e.starts_with("t.toml:1: capacity_mib: invalid type"), "{e}");
        let e = check("\nlog_format = \"xml\"\n").unwrap_err();
        assert!(
            e.starts_with("t.toml:2: log_format: unknown variant"),
            "{e}"
        );
        let e = check("listen = \"nowhere\"\n").unwrap_err();
        assert!(e.starts_with("t.toml:1: listen:"), "{e}");
    }

    #[test]
    fn syntax_error_is_one_line() {
        let e = check("shards = \n").unwrap_err();
        assert!(e.starts_with("t.toml:1"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn io_memory_is_bounded_without_a_memlock_limit() {
        let f = parse("io_memory_kib = 1073741824\n", "t.toml").unwrap();
        let unlimited = Machine {
            memlock_bytes: None,
            ..machine()
        };
        let e = resolve(f, &unlimited).unwrap_err().to_string();
        assert!(
            e.starts_with("io_memory_kib: 1073741824 is not between"),
            "{e}"
        );
    }

    /// Sizes in MiB become bytes by a shift: a value it would overflow is
    /// refused, naming the key (one past 2^44 MiB used to wrap silently).
    #[test]
    fn sizes_past_their_bound_are_refused() {
        for (key, bound) in [
            ("capacity_mib", MAX_CAPACITY_MIB),
            ("index_cache_mib", MAX_INDEX_CACHE_MIB),
        ] {
            for v in [bound + 1, (1 << 44) + 1, u64::MAX >> 1] {
                let e = check(&format!("{key} = {v}\n")).unwrap_err();
                assert!(e.starts_with(&format!("{key}: {v} is not between")), "{e}");
            }
            let s = check(&format!("{key} = {bound}\n")).unwrap();
            assert!(s.capacity_mib.max(s.index_cache_mib) == bound);
        }
    }

    /// A timeout over a day is refused: 2^63 ms made the first
    /// frame's deadline overflow the clock, a panic that aborts the server.
    #[test]
    fn timeouts_past_a_day_are_refused() {
        for key in [
            "frame_timeout_ms",
            "idle_timeout_ms",
            "write_timeout_ms",
            "forward_timeout_ms",
            "shutdown_timeout_ms",
        ] {
            // (TOML's integers end at i64::MAX.)
            let huge = i64::MAX;
            let e = check(&format!("{key} = {huge}\n")).unwrap_err();
            assert!(e.starts_with(&format!("{key}: {huge} is over")), "{e}");
            check(&format!("{key} = {MAX_TIMEOUT_MS}\n")).unwrap();
        }
    }

    #[test]
    fn one_shard_per_cpu_is_refused_past_the_shard_limit() {
        let big = || Machine {
            allowed_cpus: (0..300).collect(),
            memlock_bytes: None,
            ..machine()
        };
        let e = resolve(parse("", "t.toml").unwrap(), &big())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("shards: one shard per CPU would be 300 shards"),
            "{e}"
        );
        let f = parse("shards = 256\nallow_oversubscribe = true\n", "t.toml").unwrap();
        resolve(f, &big()).unwrap();
    }

    #[test]
    fn rdma_off_loopback_needs_the_insecure_flag_and_no_tls() {
        if !cfg!(feature = "rdma") {
            let e = check("rdma_listen = \"0.0.0.0:7800\"\n").unwrap_err();
            assert!(e.contains("built without rdma"), "{e}");
            return;
        }
        let e = check("rdma_listen = \"0.0.0.0:7800\"\n").unwrap_err();
        assert!(
            e.starts_with("rdma_listen: 0.0.0.0:7800 is not a loopback"),
            "{e}"
        );
        check("rdma_listen = \"0.0.0.0:7800\"\ninsecure_no_auth = true\n").unwrap();
        check("rdma_listen = \"127.0.0.1:7800\"\n").unwrap();
    }

    #[test]
    fn impossible_values() {
        let e = check("shards = 3\n").unwrap_err();
        assert!(e.starts_with("shards: 3 shards but only 2 CPUs"), "{e}");
        check("shards = 3\nallow_oversubscribe = true\n").unwrap();
        let e = check("shards = 3\nallow_oversubscribe = true\npoll_us = 100\n").unwrap_err();
        assert!(e.starts_with("poll_us: 3 shards share 2 CPUs"), "{e}");
        check("shards = 2\npoll_us = 100\n").unwrap();
        let e = check("cpus = \"0,7\"\n").unwrap_err();
        assert!(e.starts_with("cpus: CPU 7 is not allowed"), "{e}");
        let e = check("cpus = \"1\"\nshards = 2\n").unwrap_err();
        assert!(e.starts_with("shards:"), "{e}");
        let e = check("cache_mib = 8192\n").unwrap_err();
        assert!(e.starts_with("cache_mib: 8192 MiB is more than"), "{e}");
        let e = check("io_memory_kib = 8192\nshards = 2\n").unwrap_err();
        assert!(e.starts_with("io_memory_kib:"), "{e}");
        let e = check("max_payload = 1000\n").unwrap_err();
        assert!(e.starts_with("max_payload:"), "{e}");
        let e = check("metrics_addr = \"localhost\"\n").unwrap_err();
        assert!(e.starts_with("metrics_addr:"), "{e}");
        let e = check("log_level = \"info,[\"\n").unwrap_err();
        assert!(e.starts_with("log_level:"), "{e}");
    }

    #[test]
    fn tmpfs_data_dir_is_refused() {
        if fs_magic(Path::new("/dev/shm")) != Some(TMPFS_MAGIC) {
            eprintln!("skipped: /dev/shm is not tmpfs here");
            return;
        }
        let e = check("data_dir = \"/dev/shm/shardstore-x/y\"\n").unwrap_err();
        assert!(
            e.starts_with("data_dir: /dev/shm/shardstore-x/y is on tmpfs"),
            "{e}"
        );
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-2,5, 1").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert!(parse_cpu_list("").is_err());
    }

    #[test]
    fn flags_win_over_file() {
        let file = parse("shards = 1\ncapacity_mib = 5\n", "f").unwrap();
        let over = FileConfig {
            shards: Some(2),
            ..FileConfig::default()
        };
        let m = merge(over, file);
        assert_eq!(m.shards, Some(2));
        assert_eq!(m.capacity_mib, Some(5));
    }

    /// Every field of `FileConfig` is documented in the example, and the
    /// example parses and resolves.
    #[test]
    fn example_documents_every_key() {
        let fields = struct_fields();
        let mut docs = documented_keys();
        let mut f = fields.to_vec();
        docs.sort();
        f.sort();
        assert_eq!(docs, f, "config::DOCS and FileConfig disagree");
        let ex = example();
        let parsed = parse(&ex, "example").unwrap();
        assert_eq!(parsed.data_dir, Some(PathBuf::from("/var/lib/shardstore")));
        // Uncommenting every default must also parse (keys and types right),
        // except the placeholders in angle brackets.
        let uncommented: String = ex
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.split_once(" = ")
                    .is_some_and(|(k, v)| fields.contains(&k) && !v.starts_with('<'))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        parse(&uncommented, "uncommented").unwrap();
    }

    /// The field names serde asks for when deserializing `FileConfig`.
    fn struct_fields() -> &'static [&'static str] {
        use serde::de::{self, Visitor};
        #[derive(Debug)]
        struct Fields(&'static [&'static str]);
        impl fmt::Display for Fields {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "fields")
            }
        }
        impl std::error::Error for Fields {}
        impl de::Error for Fields {
            fn custom<T: fmt::Display>(_: T) -> Self {
                Fields(&[])
            }
        }
        struct Probe;
        impl<'de> de::Deserializer<'de> for Probe {
            type Error = Fields;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Fields> {
                Err(Fields(&[]))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Fields> {
                Err(Fields(fields))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
                bytes byte_buf option unit unit_struct newtype_struct seq tuple
                tuple_struct map enum identifier ignored_any
            }
        }
        FileConfig::deserialize(Probe).unwrap_err().0
    }
}
