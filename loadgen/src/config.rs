//! Command line and the workload it describes. The whole [`Config`] is
//! written into the JSON report, so a figure always travels with the exact
//! workload that produced it.

use crate::keys::{hash_words, Distribution, Rng};
use clap::Parser;
use serde::Serialize;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Verify mode writes a 32-byte self-describing header in every piece.
pub const VERIFY_MIN_SIZE: u64 = 32;
/// Largest value (chunk) the loadgen writes: the server's default chunk
/// limit, and what keeps a piece's offset within the u32 of its header.
pub const MAX_VALUE_SIZE: u64 = 64 << 20;
/// Largest request: the server's default payload limit.
pub const MAX_IO_SIZE: u64 = 8 << 20;
/// Most (key, piece) slots a run tracks (8 bytes of state each).
pub const MAX_SLOTS: u64 = 1 << 26;

const _: () = assert!(VERIFY_MIN_SIZE <= MAX_IO_SIZE && MAX_IO_SIZE <= MAX_VALUE_SIZE);
const _: () = assert!(MAX_VALUE_SIZE <= u32::MAX as u64);

/// Load generator for shardstore. Closed loop (as fast as the pipeline
/// allows) by default; open loop with --rate, where latency is measured
/// from each request's intended send time (no coordinated omission).
///
/// Every worker (connections x pipeline of them) owns its own slice of the
/// key space, so each key has one writer and, with --verify, every read is
/// checked against the exact bytes last written.
///
/// Exit status: 0 ok; 1 target unreachable or fatal error; 2 bad arguments;
/// 3 error rate above --max-error-rate; 4 data integrity failure (a read
/// returned wrong bytes, or the server reported CORRUPT / a checksum failed).
#[derive(Parser, Debug, Clone, Serialize)]
#[command(name = "shardstore-loadgen", version)]
pub struct Config {
    /// Front address of the node; the topology is fetched from it and each
    /// request goes to the shard that owns its chunk.
    #[arg(long, default_value = "127.0.0.1:7700", env = "SHARDSTORE_ADDR")]
    pub addr: String,

    /// Fraction of reads (0..1), or a named mix: read-only (1), write-only
    /// (0), read-heavy (0.95), balanced (0.5), update-heavy (0.05).
    #[arg(long, default_value = "balanced")]
    pub read_ratio: ReadRatio,

    /// Value size: a fixed size (4096, 4k, 1m, 1MiB) or a uniform range
    /// (1k..64k), at most 64 MiB. Each write's size is derived from (key,
    /// version, seed).
    #[arg(long, default_value = "4k")]
    pub size: SizeSpec,

    /// Bytes per operation (at most 8 MiB; must divide a fixed --size).
    /// Each op reads or writes this many bytes at an io-size-aligned offset
    /// of the chunk: in order with --distribution sequential (a chunk's
    /// offsets, then the next key), else a uniformly random one. Default:
    /// the value size (each op is a whole value).
    #[arg(long, value_parser = parse_bytes)]
    #[serde(skip)]
    pub io_size: Option<u64>,

    /// Number of keys (chunks) in the key space.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,

    /// First key number: the run uses keys key_offset..key_offset+keys, so
    /// several data sets can live side by side on one node.
    #[arg(long, default_value_t = 0)]
    pub key_offset: u64,

    /// Key distribution: uniform, zipf[:THETA] (0<THETA<1, default 0.99) or
    /// sequential (with --io-size: through each chunk's offsets in order).
    /// Each request loop (connections x pipeline; --threads only spreads
    /// them over client cores) draws from its own slice of the keys (one
    /// writer per key), so zipf ranks keys within a slice: the run has as
    /// many hottest keys as loops.
    #[arg(long, default_value = "uniform")]
    pub distribution: Distribution,

    /// Independent clients, each with its own TCP connection per shard.
    #[arg(long, default_value_t = 4)]
    pub connections: u32,

    /// Outstanding requests per connection (concurrent request loops per
    /// client).
    #[arg(long, default_value_t = 8)]
    pub pipeline: u32,

    /// Client threads (tokio workers), each pinned to one allowed CPU.
    #[arg(long, default_value_t = 1)]
    pub threads: u32,

    /// Don't pin the client threads.
    #[arg(long)]
    pub no_pin: bool,

    /// Measured run time (e.g. 10s, 500ms, 2m). Ignored with --ops.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub duration: Duration,

    /// Stop after this many measured operations instead of a duration.
    #[arg(long)]
    pub ops: Option<u64>,

    /// Unmeasured run time before the measurement starts.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub warmup: Duration,

    /// Write every key once before the run, so reads hit (implied by
    /// --verify); with --io-size, whole chunks in io-size pieces.
    #[arg(long)]
    pub preload: bool,

    /// Seed of the key streams, value sizes and contents.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Open loop: total operations per second, spread evenly over the
    /// workers; latency counts from each request's intended send time.
    #[arg(long)]
    pub rate: Option<f64>,

    /// Check every read against the bytes last written to its key (values
    /// derived from key, version and seed). Implies --preload.
    #[arg(long)]
    pub verify: bool,

    /// Highest tolerated fraction of failed operations before the exit
    /// status turns non-zero.
    #[arg(long, default_value_t = 0.0)]
    pub max_error_rate: f64,

    /// Per-request timeout.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,

    /// Send everything to the front address and let the server forward
    /// (measures the forwarding path).
    #[arg(long)]
    pub no_route_direct: bool,

    #[command(flatten)]
    #[serde(skip)]
    pub security: shardstore_client::cli::SecurityArgs,

    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Write an HdrHistogram interval log (one interval per second, tagged
    /// read/write; values in nanoseconds).
    #[arg(long)]
    pub hdr_log: Option<PathBuf>,

    /// Draw the latency percentile spectrum and throughput over time as SVG.
    #[arg(long)]
    pub plot: Option<PathBuf>,

    /// No live progress output.
    #[arg(long, short)]
    pub quiet: bool,
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Config {
    /// Number of request loops: connections x pipeline.
    pub fn workers(&self) -> u64 {
        u64::from(self.connections) * u64::from(self.pipeline)
    }

    pub fn preload_enabled(&self) -> bool {
        self.preload || self.verify
    }

    /// Bytes per operation: `--io-size`, or the value size.
    pub fn io_spec(&self) -> SizeSpec {
        match self.io_size {
            Some(n) => SizeSpec::Fixed(n),
            None => self.size,
        }
    }

    /// Pieces (operations' worth of bytes) per chunk: `size / io_size`, 1
    /// without `--io-size` (call after [`Config::validate`]).
    pub fn pieces(&self) -> u64 {
        match self.io_size {
            Some(n) => self.size.max() / n,
            None => 1,
        }
    }

    /// The configuration as reports show it: every option, with `io_size`
    /// resolved (the value size unless `--io-size` is given).
    pub fn effective(&self) -> Effective<'_> {
        Effective {
            options: self,
            io_size: self.io_spec(),
        }
    }

    /// The `--size` / `--io-size` checks.
    fn validate_sizes(&self) -> Result<(), String> {
        if self.size.max() > MAX_VALUE_SIZE {
            return Err(format!(
                "--size {} is above the largest chunk, {MAX_VALUE_SIZE} bytes (64 MiB)",
                self.size
            ));
        }
        let Some(io) = self.io_size else {
            if self.size.max() > MAX_IO_SIZE {
                return Err(format!(
                    "--size {} is above the largest request, {MAX_IO_SIZE} bytes (8 MiB): \
                     give --io-size to read and write the value in pieces",
                    self.size
                ));
            }
            return Ok(());
        };
        if io == 0 || io > MAX_IO_SIZE {
            return Err(format!(
                "--io-size {io} must be between 1 and {MAX_IO_SIZE} bytes (8 MiB, the largest request)"
            ));
        }
        let SizeSpec::Fixed(size) = self.size else {
            return Err(format!(
                "--io-size needs a fixed --size, not the range {}",
                self.size
            ));
        };
        if size % io != 0 {
            return Err(format!(
                "--io-size {io} must divide --size {size} (every op is a whole io-size piece; \
                 there is no short tail)"
            ));
        }
        if self.verify && io < VERIFY_MIN_SIZE {
            return Err(format!(
                "--verify needs --io-size of at least {VERIFY_MIN_SIZE} bytes (every piece carries a header)"
            ));
        }
        if self.keys.saturating_mul(size / io) > MAX_SLOTS {
            return Err(format!(
                "--keys {} x {} pieces per chunk is more than {MAX_SLOTS} pieces to track",
                self.keys,
                size / io
            ));
        }
        Ok(())
    }

    /// Cross-field checks clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.connections == 0 || self.pipeline == 0 || self.threads == 0 {
            return Err("--connections, --pipeline and --threads must be at least 1".into());
        }
        if self.keys < self.workers() {
            return Err(format!(
                "--keys {} is smaller than connections x pipeline = {}: every request loop owns at least one key",
                self.keys,
                self.workers()
            ));
        }
        if self.verify && self.size.min() < VERIFY_MIN_SIZE {
            return Err(format!(
                "--verify needs values of at least {VERIFY_MIN_SIZE} bytes (they carry a header)"
            ));
        }
        self.validate_sizes()?;
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(format!("--rate {rate} must be a positive number"));
            }
        }
        if self.key_offset.checked_add(self.keys).is_none() {
            return Err("--key-offset + --keys overflows".into());
        }
        // Without --io-size (checked with the pieces above) each key is one
        // tracked piece.
        if self.io_size.is_none() && self.keys > MAX_SLOTS {
            return Err(format!(
                "--keys {} is more than {MAX_SLOTS} keys to track",
                self.keys
            ));
        }
        if self.ops == Some(0) {
            return Err("--ops must be at least 1".into());
        }
        if self.duration.is_zero() && self.ops.is_none() {
            return Err("--duration must be positive".into());
        }
        if !(0.0..=1.0).contains(&self.max_error_rate) {
            return Err("--max-error-rate must be in 0..1".into());
        }
        Ok(())
    }
}

/// [`Config`] as the reports write it; see [`Config::effective`].
#[derive(Serialize)]
pub struct Effective<'a> {
    #[serde(flatten)]
    options: &'a Config,
    io_size: SizeSpec,
}

/// `--read-ratio`: a number or a named mix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadRatio(pub f64);

impl FromStr for ReadRatio {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let r = match s {
            "read-only" | "ycsb-c" => 1.0,
            "write-only" => 0.0,
            "read-heavy" | "ycsb-b" => 0.95,
            "balanced" | "ycsb-a" => 0.5,
            "update-heavy" => 0.05,
            _ => s.parse::<f64>().map_err(|_| {
                format!("read ratio {s:?}: a number in 0..1 or read-only, write-only, read-heavy, balanced, update-heavy")
            })?,
        };
        if !(0.0..=1.0).contains(&r) {
            return Err(format!("read ratio {r} not in 0..1"));
        }
        Ok(ReadRatio(r))
    }
}

impl Serialize for ReadRatio {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.0)
    }
}

/// `--size`: fixed, or uniform over an inclusive range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSpec {
    Fixed(u64),
    Uniform { min: u64, max: u64 },
}

impl SizeSpec {
    pub fn min(&self) -> u64 {
        match *self {
            SizeSpec::Fixed(n) => n,
            SizeSpec::Uniform { min, .. } => min,
        }
    }

    pub fn max(&self) -> u64 {
        match *self {
            SizeSpec::Fixed(n) => n,
            SizeSpec::Uniform { max, .. } => max,
        }
    }

    /// The size of version `version` of `key`: a pure function, so a reader
    /// knows the length of what the (single) writer of the key wrote.
    pub fn size_of(&self, seed: u64, key: u64, version: u64) -> u64 {
        match *self {
            SizeSpec::Fixed(n) => n,
            SizeSpec::Uniform { min, max } => {
                let mut r = Rng::new(hash_words(&[seed, key, version, 0x5a]));
                min + r.below(max - min + 1)
            }
        }
    }
}

/// Parses `4096`, `4k`, `4K`, `4KiB`, `1m`, `1MiB` (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("size {s:?}: no number"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("size {s:?}: unknown unit {unit:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

impl FromStr for SizeSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let spec = match s.split_once("..") {
            None => SizeSpec::Fixed(parse_bytes(s)?),
            Some((a, b)) => {
                let (min, max) = (parse_bytes(a)?, parse_bytes(b)?);
                if min > max {
                    return Err(format!("size range {s:?} is empty"));
                }
                if min == max {
                    SizeSpec::Fixed(min)
                } else {
                    SizeSpec::Uniform { min, max }
                }
            }
        };
        if spec.min() == 0 {
            return Err("sizes must be at least 1 byte".into());
        }
        Ok(spec)
    }
}

impl fmt::Display for SizeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeSpec::Fixed(n) => write!(f, "{n}"),
            SizeSpec::Uniform { min, max } => write!(f, "{min}..{max}"),
        }
    }
}

impl Serialize for SizeSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses `10s`, `500ms`, `2m`, `1.5s`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("duration {s:?}: expected e.g. 10s, 500ms, 2m"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("duration {s:?} must be non-negative"));
    }
    // Far beyond any run, and safe to add to an Instant.
    const MAX_SECS: f64 = 365.0 * 86400.0;
    if v * mult > MAX_SECS {
        return Err(format!("duration {s:?} is longer than a year"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!("4096".parse(), Ok(SizeSpec::Fixed(4096)));
        assert_eq!("4k".parse(), Ok(SizeSpec::Fixed(4096)));
        assert_eq!("4KiB".parse(), Ok(SizeSpec::Fixed(4096)));
        assert_eq!("1m".parse(), Ok(SizeSpec::Fixed(1 << 20)));
        assert_eq!(
            "1k..64k".parse(),
            Ok(SizeSpec::Uniform {
                min: 1024,
                max: 65536
            })
        );
        assert!("0".parse::<SizeSpec>().is_err());
        assert!("8k..4k".parse::<SizeSpec>().is_err());
        assert!("4q".parse::<SizeSpec>().is_err());
    }

    #[test]
    fn range_sizes_are_a_function_of_key_and_version() {
        let s: SizeSpec = "100..200".parse().unwrap();
        let a: Vec<u64> = (0..100).map(|v| s.size_of(1, 5, v)).collect();
        let b: Vec<u64> = (0..100).map(|v| s.size_of(1, 5, v)).collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|&n| (100..=200).contains(&n)));
        assert!(a.iter().any(|&n| n != a[0]));
    }

    #[test]
    fn ratios_and_durations_parse() {
        assert_eq!("read-only".parse(), Ok(ReadRatio(1.0)));
        assert_eq!("0.25".parse(), Ok(ReadRatio(0.25)));
        assert!("1.5".parse::<ReadRatio>().is_err());
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("x").is_err());
        // Refused, not a panic in Duration or a later Instant overflow.
        assert!(parse_duration("1e20").is_err());
        assert!(parse_duration("1e19s").is_err());
    }

    #[test]
    fn too_many_keys_are_refused_before_connecting() {
        let e = check(&["--keys", "10000000000"]).unwrap_err();
        assert!(e.contains("keys to track"), "{e}");
        assert!(check(&["--keys", "1000000"]).is_ok());
    }

    #[test]
    fn validation() {
        let mut c = Config::parse_from(["loadgen"]);
        assert!(c.validate().is_ok());
        c.keys = 3;
        assert!(c.validate().is_err(), "fewer keys than request loops");
        let mut c = Config::parse_from(["loadgen", "--verify", "--size", "16"]);
        assert!(c.validate().is_err());
        c.size = SizeSpec::Fixed(4096);
        assert!(c.validate().is_ok());
        assert!(c.preload_enabled());
        let c = Config::parse_from(["loadgen", "--rate", "0"]);
        assert!(c.validate().is_err());
    }

    fn check(args: &[&str]) -> Result<Config, String> {
        let c = Config::try_parse_from([&["loadgen"], args].concat()).map_err(|e| e.to_string())?;
        c.validate().map(|()| c)
    }

    #[test]
    fn io_size_validation() {
        let c = check(&["--size", "64m", "--io-size", "1m"]).unwrap();
        assert_eq!(c.pieces(), 64);
        assert_eq!(c.io_spec(), SizeSpec::Fixed(1 << 20));
        let c = check(&["--size", "1m"]).unwrap();
        assert_eq!((c.pieces(), c.io_spec()), (1, SizeSpec::Fixed(1 << 20)));
        let c = check(&["--size", "1k..8k"]).unwrap();
        assert_eq!(c.io_spec(), c.size, "default: the whole value");
        assert_eq!(
            check(&["--size", "4k", "--io-size", "4k"])
                .unwrap()
                .pieces(),
            1
        );

        let err = |args: &[&str]| check(args).unwrap_err();
        assert!(err(&["--size", "64m", "--io-size", "0"]).contains("between 1 and"));
        assert!(err(&["--size", "64m", "--io-size", "16m"]).contains("between 1 and"));
        assert!(err(&["--size", "1m", "--io-size", "3k"]).contains("must divide"));
        assert!(err(&["--size", "1k..8k", "--io-size", "1k"]).contains("fixed --size"));
        assert!(err(&["--size", "128m", "--io-size", "1m"]).contains("largest chunk"));
        assert!(err(&["--size", "16m"]).contains("give --io-size"));
        assert!(err(&["--size", "64m", "--io-size", "16", "--verify"]).contains("at least 32"));
        assert!(
            err(&["--size", "64m", "--io-size", "512", "--keys", "10000"])
                .contains("pieces to track")
        );
        assert!(check(&["--io-size", "4q"]).is_err(), "unparsable size");
    }

    #[test]
    fn reports_carry_the_resolved_io_size() {
        let c = check(&["--size", "8m", "--io-size", "1m"]).unwrap();
        let v = serde_json::to_value(c.effective()).unwrap();
        assert_eq!(v["io_size"], "1048576");
        assert_eq!(v["size"], "8388608");
        let c = check(&["--size", "4k"]).unwrap();
        let v = serde_json::to_value(c.effective()).unwrap();
        assert_eq!(v["io_size"], "4096");
    }
}
