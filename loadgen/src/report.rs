//! The final report: the table printed at the end and the `--json` file,
//! built from the same figures.
//!
//! JSON schema `shardstore-loadgen/v1` (all latencies in microseconds,
//! rates per second of the measured duration):
//!
//! ```text
//! { schema, version, started_unix_s,
//!   config: {every CLI option; io_size resolved, a size like size},
//!   target: {addr, shard_count, shard_addrs, route_direct},
//!   client: {threads, pinned_cpus, cpu_user_s, cpu_sys_s, cpu_us_per_op, cpu_utilization},
//!   measured_s, preload: {keys, writes, seconds, errors} | null,
//!   ops: {read: OpReport, write: OpReport, total: OpReport},
//!   open_loop: {target_ops_per_s, achieved_ops_per_s, schedule_deficit} | null,
//!   verify: {enabled, reads_checked, integrity_failures},
//!   timeline: [{t_s, interval_s, ops, ops_per_s, mb_per_s, p50_us, p99_us, max_us, errors}],
//!   result: {status, exit_code, error_rate, max_error_rate} }
//! OpReport = {ops, ops_per_s, bytes, mb_per_s, misses,
//!   latency_us: {min, mean, p50, p90, p99, p999, p9999, max},
//!   errors_total, errors: {kind: count}}
//! ```
//!
//! MB is 10^6 bytes, as fio and iperf3 print MB/s; bytes are the payload
//! bytes of each operation (io-size bytes with `--io-size`).

use crate::config::Config;
use crate::recorder::{Op, OpStats, Stats};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

pub const SCHEMA: &str = "shardstore-loadgen/v1";

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub p9999: f64,
    pub max: f64,
}

impl Latency {
    /// Percentiles of a nanosecond histogram, in microseconds.
    pub fn from_hist(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency {
                min: 0.0,
                mean: 0.0,
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p999: 0.0,
                p9999: 0.0,
                max: 0.0,
            };
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            min: us(h.min()),
            mean: h.mean() / 1000.0,
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            p9999: us(h.value_at_quantile(0.9999)),
            max: us(h.max()),
        }
    }

    /// Percentiles in ascending order, for checks.
    pub fn ordered(&self) -> bool {
        let v = [
            self.min, self.p50, self.p90, self.p99, self.p999, self.p9999, self.max,
        ];
        v.windows(2).all(|w| w[0] <= w[1])
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct OpReport {
    pub ops: u64,
    pub ops_per_s: f64,
    pub bytes: u64,
    pub mb_per_s: f64,
    pub misses: u64,
    pub latency_us: Latency,
    pub errors_total: u64,
    pub errors: BTreeMap<String, u64>,
}

impl OpReport {
    pub fn from_stats(s: &OpStats, secs: f64) -> OpReport {
        let per_s = |x: f64| if secs > 0.0 { x / secs } else { 0.0 };
        OpReport {
            ops: s.ops,
            ops_per_s: per_s(s.ops as f64),
            bytes: s.bytes,
            mb_per_s: per_s(s.bytes as f64) / 1e6,
            misses: s.misses,
            latency_us: Latency::from_hist(&s.hist),
            errors_total: s.errors_total(),
            errors: s
                .errors
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Ops {
    pub read: OpReport,
    pub write: OpReport,
    pub total: OpReport,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub addr: String,
    pub shard_count: u32,
    pub shard_addrs: Vec<String>,
    pub route_direct: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClientCpu {
    pub threads: u32,
    pub pinned_cpus: Vec<usize>,
    pub cpu_user_s: f64,
    pub cpu_sys_s: f64,
    /// (user + sys) CPU time of the loadgen process per measured operation.
    pub cpu_us_per_op: f64,
    /// CPU time / measured wall time: 1.0 is one core fully busy.
    pub cpu_utilization: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Preload {
    pub keys: u64,
    /// Writes: keys x pieces per chunk.
    pub writes: u64,
    pub seconds: f64,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpenLoop {
    pub target_ops_per_s: f64,
    pub achieved_ops_per_s: f64,
    /// Requests the schedule wanted sent in the measured window that never
    /// went out because the loops fell behind (a sign of overload that
    /// completed-request latencies alone do not show).
    pub schedule_deficit: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verify {
    pub enabled: bool,
    pub reads_checked: u64,
    /// Wrong bytes, CORRUPT replies and checksum mismatches, over the whole
    /// run (preload and warmup included).
    pub integrity_failures: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Interval {
    /// End of the interval, seconds since the measurement started.
    pub t_s: f64,
    pub interval_s: f64,
    pub ops: u64,
    pub ops_per_s: f64,
    pub mb_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub errors: u64,
}

impl Interval {
    pub fn from_stats(s: &OpStats, t_s: f64, interval_s: f64) -> Interval {
        let l = Latency::from_hist(&s.hist);
        let secs = interval_s.max(1e-9);
        Interval {
            t_s,
            interval_s,
            ops: s.ops,
            ops_per_s: s.ops as f64 / secs,
            mb_per_s: s.bytes as f64 / secs / 1e6,
            p50_us: l.p50,
            p99_us: l.p99,
            max_us: l.max,
            errors: s.errors_total(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// "ok", "error_rate_exceeded" or "integrity_failure".
    pub status: String,
    pub exit_code: i32,
    pub error_rate: f64,
    pub max_error_rate: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub version: &'static str,
    pub started_unix_s: f64,
    #[serde(serialize_with = "ser_config")]
    pub config: Config,
    pub target: Target,
    pub client: ClientCpu,
    pub measured_s: f64,
    pub preload: Option<Preload>,
    pub ops: Ops,
    pub open_loop: Option<OpenLoop>,
    pub verify: Verify,
    pub timeline: Vec<Interval>,
    pub result: Outcome,
}

fn ser_config<S: serde::Serializer>(c: &Config, s: S) -> Result<S::Ok, S::Error> {
    c.effective().serialize(s)
}

pub const EXIT_OK: i32 = 0;
pub const EXIT_FATAL: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_ERROR_RATE: i32 = 3;
pub const EXIT_INTEGRITY: i32 = 4;

/// The verdict: integrity failures first (they are never tolerated), then
/// the error rate against `max_error_rate`.
pub fn outcome(total: &OpStats, integrity_failures: u64, max_error_rate: f64) -> Outcome {
    let errors = total.errors_total();
    let attempted = total.ops + errors;
    let error_rate = if attempted == 0 {
        0.0
    } else {
        errors as f64 / attempted as f64
    };
    let (status, exit_code) = if integrity_failures > 0 {
        ("integrity_failure", EXIT_INTEGRITY)
    } else if attempted == 0 {
        ("no_operations", EXIT_FATAL)
    } else if error_rate > max_error_rate {
        ("error_rate_exceeded", EXIT_ERROR_RATE)
    } else {
        ("ok", EXIT_OK)
    };
    Outcome {
        status: status.to_owned(),
        exit_code,
        error_rate,
        max_error_rate,
    }
}

pub fn ops_report(totals: &Stats, secs: f64) -> Ops {
    Ops {
        read: OpReport::from_stats(totals.get(Op::Read), secs),
        write: OpReport::from_stats(totals.get(Op::Write), secs),
        total: OpReport::from_stats(&totals.combined(), secs),
    }
}

/// A latency in microseconds, printed with a unit that keeps 3-4 digits.
pub fn fmt_us(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.2}s", us / 1e6)
    } else if us >= 10_000.0 {
        format!("{:.1}ms", us / 1e3)
    } else if us >= 1_000.0 {
        format!("{:.2}ms", us / 1e3)
    } else {
        format!("{us:.1}us")
    }
}

impl Report {
    /// The human-readable summary printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let c = &self.config;
        let _ = writeln!(
            out,
            "\n{} over {:.2}s against {} ({} shard{}), {} x {} loops, {} thread{}, {}, read ratio {}, size {}{}, {} keys {}",
            if c.rate.is_some() { "open loop" } else { "closed loop" },
            self.measured_s,
            self.target.addr,
            self.target.shard_count,
            if self.target.shard_count == 1 { "" } else { "s" },
            c.connections,
            c.pipeline,
            c.threads,
            if c.threads == 1 { "" } else { "s" },
            match c.rate {
                Some(r) => format!("target {r:.0} ops/s"),
                None => "unthrottled".to_owned(),
            },
            c.read_ratio.0,
            c.size,
            match c.io_size {
                Some(n) => format!(" in ops of {n}"),
                None => String::new(),
            },
            c.keys,
            c.distribution,
        );
        let _ = writeln!(
            out,
            "{:<6} {:>10} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  errors",
            "op", "ops", "ops/s", "MB/s", "p50", "p90", "p99", "p99.9", "p99.99", "max"
        );
        for (name, r) in [
            ("read", &self.ops.read),
            ("write", &self.ops.write),
            ("total", &self.ops.total),
        ] {
            if name != "total" && r.ops == 0 && r.errors_total == 0 && r.misses == 0 {
                continue;
            }
            let l = &r.latency_us;
            let mut errors = if r.errors.is_empty() {
                "0".to_owned()
            } else {
                r.errors
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            if r.misses > 0 {
                let _ = write!(errors, " (misses={})", r.misses);
            }
            let _ = writeln!(
                out,
                "{:<6} {:>10} {:>11.0} {:>9.1} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {}",
                name,
                r.ops,
                r.ops_per_s,
                r.mb_per_s,
                fmt_us(l.p50),
                fmt_us(l.p90),
                fmt_us(l.p99),
                fmt_us(l.p999),
                fmt_us(l.p9999),
                fmt_us(l.max),
                errors
            );
        }
        let cl = &self.client;
        let _ = writeln!(
            out,
            "client cpu: {:.2} us/op ({:.0}% of one core; user {:.2}s sys {:.2}s; pinned to {:?})",
            cl.cpu_us_per_op,
            cl.cpu_utilization * 100.0,
            cl.cpu_user_s,
            cl.cpu_sys_s,
            cl.pinned_cpus
        );
        if let Some(p) = &self.preload {
            let _ = writeln!(
                out,
                "preload: {} keys, {} writes in {:.2}s ({} errors)",
                p.keys, p.writes, p.seconds, p.errors
            );
        }
        if let Some(o) = &self.open_loop {
            let _ = writeln!(
                out,
                "open loop: target {:.0} ops/s, achieved {:.0} ops/s, {} scheduled requests never sent",
                o.target_ops_per_s, o.achieved_ops_per_s, o.schedule_deficit
            );
        }
        if self.verify.enabled {
            let _ = writeln!(
                out,
                "verify: {} reads checked, {} integrity failures",
                self.verify.reads_checked, self.verify.integrity_failures
            );
        }
        let r = &self.result;
        let _ = writeln!(
            out,
            "result: {} (error rate {:.6}, max {})",
            r.status, r.error_rate, r.max_error_rate
        );
        out
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }
}

/// Builds the report of a finished run.
pub fn build(cfg: &Config, data: &crate::RunData, pinned_cpus: Vec<usize>) -> Report {
    let secs = data.measured.as_secs_f64();
    let ops = ops_report(&data.totals, secs);
    let total = data.totals.combined();
    let cpu_s = data.cpu.total().as_secs_f64();
    let client = ClientCpu {
        threads: cfg.threads,
        pinned_cpus,
        cpu_user_s: data.cpu.user.as_secs_f64(),
        cpu_sys_s: data.cpu.sys.as_secs_f64(),
        cpu_us_per_op: if total.ops > 0 {
            cpu_s * 1e6 / total.ops as f64
        } else {
            0.0
        },
        cpu_utilization: if secs > 0.0 { cpu_s / secs } else { 0.0 },
    };
    let open_loop = cfg.rate.map(|rate| OpenLoop {
        target_ops_per_s: rate,
        achieved_ops_per_s: ops.total.ops_per_s,
        schedule_deficit: data.schedule_deficit,
    });
    let started_unix_s = data
        .started
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    Report {
        schema: SCHEMA,
        version: env!("CARGO_PKG_VERSION"),
        started_unix_s,
        config: cfg.clone(),
        target: Target {
            addr: cfg.addr.clone(),
            shard_count: data.topology.shard_count,
            shard_addrs: data.topology.shard_addrs.clone(),
            route_direct: !cfg.no_route_direct,
        },
        client,
        measured_s: secs,
        preload: data.preload.clone(),
        ops,
        open_loop,
        verify: Verify {
            enabled: cfg.verify,
            reads_checked: data.reads_checked,
            integrity_failures: data.integrity_failures,
        },
        timeline: data.timeline.clone(),
        result: outcome(&total, data.integrity_failures, cfg.max_error_rate),
    }
}

/// Checks that a parsed JSON report has the `shardstore-loadgen/v1` shape;
/// used by the tests and usable by scripts that consume the reports.
pub fn check_schema(v: &serde_json::Value) -> Result<(), String> {
    fn get<'a>(v: &'a serde_json::Value, path: &str) -> Result<&'a serde_json::Value, String> {
        path.split('.')
            .try_fold(v, |v, k| v.get(k).ok_or_else(|| format!("missing {path}")))
    }
    fn num(v: &serde_json::Value, path: &str) -> Result<f64, String> {
        get(v, path)?
            .as_f64()
            .ok_or_else(|| format!("{path} is not a number"))
    }
    if get(v, "schema")?.as_str() != Some(SCHEMA) {
        return Err(format!("schema is not {SCHEMA}"));
    }
    for key in [
        "config.addr",
        "config.read_ratio",
        "config.size",
        "config.io_size",
        "config.keys",
        "config.distribution",
        "config.connections",
        "config.pipeline",
        "config.threads",
        "config.duration",
        "config.seed",
        "config.verify",
        "target.shard_count",
        "client.cpu_us_per_op",
        "client.pinned_cpus",
        "measured_s",
        "verify.integrity_failures",
        "timeline",
        "result.status",
        "result.exit_code",
        "result.error_rate",
    ] {
        get(v, key)?;
    }
    for op in ["read", "write", "total"] {
        for f in [
            "ops",
            "ops_per_s",
            "bytes",
            "mb_per_s",
            "errors_total",
            "misses",
        ] {
            num(v, &format!("ops.{op}.{f}"))?;
        }
        let mut prev = f64::MIN;
        for p in ["min", "p50", "p90", "p99", "p999", "p9999", "max"] {
            let x = num(v, &format!("ops.{op}.latency_us.{p}"))?;
            if x < prev {
                return Err(format!(
                    "ops.{op}.latency_us.{p} = {x} below the previous percentile"
                ));
            }
            prev = x;
        }
        num(v, &format!("ops.{op}.latency_us.mean"))?;
        if !get(v, &format!("ops.{op}.errors"))?.is_object() {
            return Err(format!("ops.{op}.errors is not an object"));
        }
    }
    let timeline = get(v, "timeline")?
        .as_array()
        .ok_or("timeline is not an array")?;
    for (i, t) in timeline.iter().enumerate() {
        for f in [
            "t_s",
            "interval_s",
            "ops",
            "ops_per_s",
            "mb_per_s",
            "p50_us",
            "p99_us",
            "max_us",
            "errors",
        ] {
            t.get(f)
                .and_then(|x| x.as_f64())
                .ok_or_else(|| format!("timeline[{i}].{f} missing"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn sample_report() -> Report {
        let mut totals = Stats::default();
        for i in 1..=1000u64 {
            totals.op(Op::Read).record_ok(i * 1000, 4096);
        }
        totals.op(Op::Write).record_ok(50_000, 4096);
        totals.op(Op::Write).record_error("timeout");
        let ops = ops_report(&totals, 2.0);
        let total = totals.combined();
        let config =
            Config::parse_from(["loadgen", "--addr", "127.0.0.1:1", "--read-ratio", "0.9"]);
        Report {
            schema: SCHEMA,
            version: env!("CARGO_PKG_VERSION"),
            started_unix_s: 1.0,
            target: Target {
                addr: config.addr.clone(),
                shard_count: 2,
                shard_addrs: vec!["a".into(), "b".into()],
                route_direct: true,
            },
            config,
            client: ClientCpu {
                threads: 1,
                pinned_cpus: vec![0],
                cpu_user_s: 0.5,
                cpu_sys_s: 0.5,
                cpu_us_per_op: 1e6 / 1001.0,
                cpu_utilization: 0.5,
            },
            measured_s: 2.0,
            preload: None,
            ops,
            open_loop: None,
            verify: Verify {
                enabled: false,
                reads_checked: 0,
                integrity_failures: 0,
            },
            timeline: vec![Interval::from_stats(&total, 1.0, 1.0)],
            result: outcome(&total, 0, 0.01),
        }
    }

    #[test]
    fn json_report_has_the_documented_schema() {
        let r = sample_report();
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        check_schema(&v).unwrap();
        assert_eq!(v["ops"]["read"]["ops"], 1000);
        assert_eq!(v["ops"]["total"]["ops"], 1001);
        assert_eq!(v["ops"]["read"]["ops_per_s"], 500.0);
        assert_eq!(v["ops"]["write"]["errors"]["timeout"], 1);
        assert_eq!(v["config"]["read_ratio"], 0.9);
        assert_eq!(v["config"]["size"], "4096");
        assert_eq!(v["config"]["io_size"], "4096");
        assert_eq!(v["config"]["distribution"], "uniform");
        assert_eq!(v["config"]["duration"], 10.0);
        let p50 = v["ops"]["read"]["latency_us"]["p50"].as_f64().unwrap();
        assert!((499.0..=501.0).contains(&p50), "{p50}");
        // 1 error in 1002 attempts: under 1%.
        assert_eq!(v["result"]["status"], "ok");
        assert_eq!(v["result"]["exit_code"], 0);

        // The checker catches a broken report.
        let mut broken = v.clone();
        broken["ops"]["read"]["latency_us"]["p99"] = serde_json::json!(1.0);
        assert!(check_schema(&broken).is_err());
        let mut broken = v.clone();
        broken["ops"]["write"]
            .as_object_mut()
            .unwrap()
            .remove("errors");
        assert!(check_schema(&broken).is_err());
        let mut broken = v;
        broken["schema"] = serde_json::json!("other");
        assert!(check_schema(&broken).is_err());
    }

    #[test]
    fn table_names_every_column() {
        let t = sample_report().table();
        for col in [
            "ops/s",
            "MB/s",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "p99.99",
            "max",
            "errors",
            "timeout=1",
            "us/op",
        ] {
            assert!(t.contains(col), "{col} missing in\n{t}");
        }
    }

    #[test]
    fn verdicts() {
        let mut s = OpStats::default();
        s.record_ok(1, 1);
        assert_eq!(outcome(&s, 0, 0.0).exit_code, EXIT_OK);
        s.record_error("timeout");
        assert_eq!(outcome(&s, 0, 0.0).exit_code, EXIT_ERROR_RATE);
        assert_eq!(outcome(&s, 0, 0.5).exit_code, EXIT_OK);
        assert_eq!(outcome(&s, 1, 1.0).exit_code, EXIT_INTEGRITY);
        assert_eq!(outcome(&OpStats::default(), 0, 1.0).exit_code, EXIT_FATAL);
    }

    #[test]
    fn latency_units() {
        assert_eq!(fmt_us(12.34), "12.3us");
        assert_eq!(fmt_us(1234.0), "1.23ms");
        assert_eq!(fmt_us(12_345.0), "12.3ms");
        assert_eq!(fmt_us(2_500_000.0), "2.50s");
    }
}
