//! Latency and outcome recording, and the open-loop pacing that keeps it
//! honest.
//!
//! Coordinated omission: a closed-loop client that waits for a slow reply
//! also stops *sending*, so it never measures the requests a real user would
//! have sent meanwhile. In open loop ([`Pacer::Open`]) every request has an
//! intended send time on a fixed schedule, and its latency is counted from
//! that time, not from when it actually went out (wrk2's correction): a
//! stall shows up in every request scheduled during it.
//!
//! Histograms are in nanoseconds (HdrHistogram, 3 significant digits, up to
//! [`MAX_LATENCY_NS`]; longer values are clamped, which only happens past
//! the request timeout's range).

use hdrhistogram::Histogram;
use shardstore_client::ClientError;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub const MAX_LATENCY_NS: u64 = 600 * 1_000_000_000;

/// Operation types, the rows of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    Read = 0,
    Write = 1,
}

impl Op {
    pub const ALL: [Op; 2] = [Op::Read, Op::Write];

    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
        }
    }
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("static histogram bounds")
}

/// Why an operation failed, as a stable label for the report.
pub fn error_kind(e: &ClientError) -> &'static str {
    match e {
        ClientError::NotFound(_) => "not_found",
        ClientError::Corrupt { .. } => "corrupt",
        ClientError::ChecksumMismatch { .. } => "checksum_mismatch",
        ClientError::Timeout { .. } => "timeout",
        ClientError::Connect { .. } => "connect",
        ClientError::Io(_) => "io",
        ClientError::ConnectionClosed => "connection_closed",
        ClientError::Protocol(_) => "protocol",
        ClientError::InvalidArgument(_) => "invalid_argument",
        ClientError::Server { code, .. } => match code {
            Some(c) => c.name(),
            None => "server_unknown_code",
        },
        // Variants added to the client later (it is still growing).
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}

/// Label of a read whose bytes were not the ones last written.
pub const VERIFY_MISMATCH: &str = "verify_mismatch";

/// Whether an error kind means bad data (as opposed to an unavailable or
/// slow server): these fail the run whatever --max-error-rate says.
pub fn is_integrity_failure(kind: &str) -> bool {
    matches!(kind, "corrupt" | "checksum_mismatch" | VERIFY_MISMATCH)
}

/// Outcomes of one operation type.
#[derive(Debug, Clone)]
pub struct OpStats {
    /// Latency of successful operations, nanoseconds.
    pub hist: Histogram<u64>,
    pub ops: u64,
    pub bytes: u64,
    /// Reads of keys this run never wrote that were not found (no preload):
    /// expected, so not errors. Not in `ops` or the histogram.
    pub misses: u64,
    pub errors: BTreeMap<&'static str, u64>,
}

impl Default for OpStats {
    fn default() -> Self {
        OpStats {
            hist: new_histogram(),
            ops: 0,
            bytes: 0,
            misses: 0,
            errors: BTreeMap::new(),
        }
    }
}

impl OpStats {
    pub fn record_ok(&mut self, latency_ns: u64, bytes: u64) {
        self.hist.saturating_record(latency_ns.max(1));
        self.ops += 1;
        self.bytes += bytes;
    }

    pub fn record_error(&mut self, kind: &'static str) {
        *self.errors.entry(kind).or_default() += 1;
    }

    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn merge(&mut self, other: &OpStats) {
        self.hist.add(&other.hist).expect("same histogram bounds");
        self.ops += other.ops;
        self.bytes += other.bytes;
        self.misses += other.misses;
        for (k, v) in &other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }

    pub fn reset(&mut self) {
        self.hist.reset();
        self.ops = 0;
        self.bytes = 0;
        self.misses = 0;
        self.errors.clear();
    }
}

/// One [`OpStats`] per operation type.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub ops: [OpStats; 2],
}

impl Stats {
    pub fn op(&mut self, op: Op) -> &mut OpStats {
        &mut self.ops[op as usize]
    }

    pub fn get(&self, op: Op) -> &OpStats {
        &self.ops[op as usize]
    }

    pub fn merge(&mut self, other: &Stats) {
        for op in Op::ALL {
            self.op(op).merge(other.get(op));
        }
    }

    pub fn reset(&mut self) {
        for s in &mut self.ops {
            s.reset();
        }
    }

    /// Both operation types together.
    pub fn combined(&self) -> OpStats {
        let mut all = OpStats::default();
        for s in &self.ops {
            all.merge(s);
        }
        all
    }
}

/// When each request of one request loop is meant to go out.
#[derive(Debug, Clone)]
pub enum Pacer {
    /// Send as soon as the previous reply is in; latency from the send.
    Closed,
    /// Request `n` is intended at `start + (n + phase) * interval`.
    Open {
        start: Instant,
        interval_ns: f64,
        phase: f64,
        n: u64,
    },
}

impl Pacer {
    /// `rate` is this loop's share of the total rate (ops/s). `phase` in
    /// [0, 1) staggers the loops so they do not fire in lockstep.
    pub fn open(start: Instant, rate: f64, phase: f64) -> Pacer {
        assert!(rate > 0.0);
        Pacer::Open {
            start,
            interval_ns: 1e9 / rate,
            phase,
            n: 0,
        }
    }

    /// The intended send time of the next request, given the time now. In
    /// closed loop that is now; in open loop it is the schedule's time, which
    /// may be in the past when the loop has fallen behind (the request is
    /// then sent at once, and its latency still counts from the schedule).
    pub fn next_intended(&mut self, now: Instant) -> Instant {
        match self {
            Pacer::Closed => now,
            Pacer::Open {
                start,
                interval_ns,
                phase,
                n,
            } => {
                let t = *start + Duration::from_nanos(((*n as f64 + *phase) * *interval_ns) as u64);
                *n += 1;
                t
            }
        }
    }

    /// How many requests the schedule wanted sent before `t` (open loop).
    pub fn intended_before(&self, t: Instant) -> u64 {
        match self {
            Pacer::Closed => 0,
            Pacer::Open {
                start,
                interval_ns,
                phase,
                ..
            } => {
                let span = t.saturating_duration_since(*start).as_nanos() as f64;
                let k = span / *interval_ns - *phase;
                if k <= 0.0 {
                    0
                } else {
                    k.ceil() as u64
                }
            }
        }
    }
}

/// The latency to record for a request intended at `intended` whose reply
/// arrived at `done`.
pub fn latency_ns(intended: Instant, done: Instant) -> u64 {
    done.saturating_duration_since(intended).as_nanos() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One open-loop request loop at 1000 ops/s against a server that takes
    /// 100 us, except that it stalls for one second at t = 1 s. A closed-loop
    /// measurement of the same run sees one slow request; the corrected one
    /// sees the thousand that a real user would have waited behind it.
    #[test]
    fn open_loop_recording_counts_the_stall_for_every_scheduled_request() {
        let t0 = Instant::now();
        let at = |ms: f64| t0 + Duration::from_nanos((ms * 1e6) as u64);
        let service = Duration::from_micros(100);
        let (stall_from, stall_to) = (at(1000.0), at(2000.0));
        let end = at(3000.0);

        let mut pacer = Pacer::open(t0, 1000.0, 0.0);
        let mut corrected = OpStats::default();
        let mut naive = OpStats::default();
        let mut now = t0;
        loop {
            let intended = pacer.next_intended(now);
            if intended >= end {
                break;
            }
            let sent = intended.max(now); // wait for the schedule, or go at once when late
            let done = if sent >= stall_from && sent < stall_to {
                stall_to + service
            } else {
                sent + service
            };
            corrected.record_ok(latency_ns(intended, done), 4096);
            naive.record_ok(latency_ns(sent, done), 4096);
            now = done;
        }
        // Every scheduled request was issued and recorded.
        assert_eq!(corrected.ops, 3000);
        assert_eq!(naive.ops, corrected.ops);

        let ms = |ns: u64| ns as f64 / 1e6;
        // Naive: only one request saw the stall; p99 is the service time.
        assert!(ms(naive.hist.value_at_quantile(0.99)) < 0.2);
        assert!(ms(naive.hist.max()) > 999.0);
        // Corrected: the request scheduled at the stall waited 1000 ms, and
        // the ones behind it less and less as the loop caught up (0.9 ms
        // gained per 0.1 ms request): 1000/0.9 = 1111 requests spread evenly
        // over 0..1000 ms. The top 300 (10%) are above 1000 * (1 - 300/1111)
        // = 730 ms, the top 30 (1%) above 973 ms.
        let p90 = ms(corrected.hist.value_at_quantile(0.90));
        let p99 = ms(corrected.hist.value_at_quantile(0.99));
        assert!((710.0..750.0).contains(&p90), "p90 {p90} ms");
        assert!((960.0..985.0).contains(&p99), "p99 {p99} ms");
        assert!(ms(corrected.hist.value_at_quantile(0.5)) < 0.2);
        assert!(ms(corrected.hist.max()) > 999.0);
    }

    #[test]
    fn open_loop_schedule_is_evenly_spaced_and_staggered() {
        let t0 = Instant::now();
        let mut p = Pacer::open(t0, 100.0, 0.5);
        let a = p.next_intended(t0);
        let b = p.next_intended(t0 + Duration::from_secs(5));
        assert_eq!(a - t0, Duration::from_millis(5));
        assert_eq!(b - a, Duration::from_millis(10));
        assert_eq!(p.intended_before(t0 + Duration::from_millis(1000)), 100);
        assert_eq!(p.intended_before(t0), 0);

        let mut c = Pacer::Closed;
        let now = t0 + Duration::from_secs(1);
        assert_eq!(c.next_intended(now), now);
    }

    #[test]
    fn stats_merge_and_error_kinds() {
        let mut a = Stats::default();
        a.op(Op::Read).record_ok(1_000, 10);
        a.op(Op::Read).record_error("timeout");
        let mut b = Stats::default();
        b.op(Op::Read).record_ok(3_000, 10);
        b.op(Op::Write).record_error("timeout");
        b.op(Op::Write).record_error(VERIFY_MISMATCH);
        a.merge(&b);
        assert_eq!(a.get(Op::Read).ops, 2);
        assert_eq!(a.get(Op::Read).bytes, 20);
        assert_eq!(a.get(Op::Read).errors["timeout"], 1);
        assert_eq!(a.combined().errors["timeout"], 2);
        assert_eq!(a.combined().errors_total(), 3);
        assert!(is_integrity_failure(VERIFY_MISMATCH));
        assert!(!is_integrity_failure("timeout"));
        assert_eq!(
            error_kind(&ClientError::NotFound(shardstore_client::ChunkId(1))),
            "not_found"
        );
        a.reset();
        assert_eq!(a.combined().ops, 0);
    }
}
