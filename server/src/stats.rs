//! Per-shard counters. Plain `Cell`s: each shard owns its own, no atomics on
//! the request path. The metrics endpoint reads snapshots that each shard
//! publishes periodically (`metrics.rs`), never these cells.

use shardstore_proto::{ErrorCode, Opcode};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Opcode slots (indexed by `Opcode as usize`).
pub const OPCODE_SLOTS: usize = Opcode::ALL.len() + 1;

/// Upper bounds of the latency buckets, microseconds (Prometheus `le`).
/// Fixed so every shard and every scrape agree; the last bucket is +Inf.
pub const LATENCY_BOUNDS_US: [u64; 18] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// A latency histogram: per-bucket (not cumulative) counts and the sum.
#[derive(Default)]
pub struct Latency {
    pub buckets: [Cell<u64>; LATENCY_BUCKETS],
    pub sum_us: Cell<u64>,
}

impl Latency {
    /// Per-bucket counts.
    pub fn counts(&self) -> Vec<u64> {
        self.buckets.iter().map(|b| b.get()).collect()
    }

    pub fn record(&self, us: u64) {
        let i = LATENCY_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        let b = &self.buckets[i];
        b.set(b.get() + 1);
        self.sum_us.set(self.sum_us.get() + us);
    }
}

#[derive(Default)]
pub struct ShardCounters {
    /// Requests taken from a client connection (or handed over by the RDMA
    /// bridge), by opcode: a request forwarded to its owner is counted here
    /// once, on the shard that took it (the owner counts it in
    /// `forwarded_in`). One the RDMA bridge answers itself, without a
    /// shard, is counted in [`RdmaCounters`] instead.
    pub requests: [Cell<u64>; OPCODE_SLOTS],
    /// Of those, answered with an error (also the owner's errors).
    pub errors: [Cell<u64>; OPCODE_SLOTS],
    pub bytes_in: Cell<u64>,
    pub bytes_out: Cell<u64>,
    pub forwarded_out: Cell<u64>,
    pub forwarded_in: Cell<u64>,
    pub forward_busy: Cell<u64>,
    /// Forwards answered TIMEOUT (no reply from the owner in time).
    pub forward_timeouts: Cell<u64>,
    /// Stream hints sent to other shards, received, and dropped.
    pub stream_hints_out: Cell<u64>,
    pub stream_hints_in: Cell<u64>,
    pub stream_hints_dropped: Cell<u64>,
    pub connections: Cell<u64>,
    pub connections_total: Cell<u64>,
    pub malformed_frames: Cell<u64>,
    /// Connections refused at the per-shard connection limit.
    pub refused_connections: Cell<u64>,
    /// Connections closed by a frame, idle or write timeout.
    pub timeouts: Cell<u64>,
    /// Connections refused for failed authentication (a wrong proof, a
    /// request before it); not those closed or timed out before a frame.
    pub auth_failures: Cell<u64>,
    /// Connections whose TLS handshake failed.
    pub tls_failures: Cell<u64>,
    /// Requests refused with BUSY (buffer budget exhausted).
    pub busy: Cell<u64>,
    /// Requests executing on this shard now (owned ones, including those
    /// forwarded here).
    pub in_flight: Cell<u64>,
    /// Execution time on the owning shard, by opcode.
    pub latency: [Latency; OPCODE_SLOTS],
    /// READ execution time by where the bytes came from.
    pub read_cached: Latency,
    pub read_uncached: Latency,
}

impl ShardCounters {
    pub fn request(&self, op: Opcode) {
        let c = &self.requests[op as usize];
        c.set(c.get() + 1);
    }

    /// A READ reply counted in `bytes_out` when it was built, replaced by
    /// BUSY before it was sent.
    pub fn read_refused(&self, bytes: u64) {
        self.bytes_out
            .set(self.bytes_out.get().saturating_sub(bytes));
    }

    pub fn error(&self, op: Opcode) {
        let c = &self.errors[op as usize];
        c.set(c.get() + 1);
    }

    /// Records the latency (microseconds) of a request answered inline
    /// (never in flight).
    pub fn record_us(&self, op: Opcode, us: u64) {
        if let Some(l) = self.latency.get(op as usize) {
            l.record(us);
        }
    }

    /// Counts a request as in flight until the guard drops, then records its
    /// latency (also when the request's future is dropped unfinished).
    pub fn start(&self, op: Opcode) -> InFlight<'_> {
        self.in_flight.set(self.in_flight.get() + 1);
        InFlight {
            counters: self,
            op,
            started: Instant::now(),
        }
    }
}

/// Slots of [`RdmaCounters::refused`], indexed by `ErrorCode as usize`.
pub const ERROR_CODE_SLOTS: usize = ErrorCode::Timeout as usize + 1;

/// The RDMA thread's counters (`rdma_listen`). That thread is not a shard,
/// so it keeps no `Cell`s on a board slot: it counts with atomics (it is
/// their only writer; scrapes read them directly), exported as node-wide
/// families without a shard label.
#[derive(Debug, Default)]
pub struct RdmaCounters {
    /// Requests (or messages) the bridge answered with an error itself,
    /// without a shard executing them, by error code: a bad message or body
    /// (one whose request id cannot be trusted gets no answer, and counts
    /// too), a reply frame sent as a request, a bad payload crc, a full
    /// shard queue or the payload budget (BUSY), a shard that did not
    /// answer in time, a reply that could not be sent as built. Requests
    /// that reach their shard are counted there (`requests`, `errors`).
    pub refused: [AtomicU64; ERROR_CODE_SLOTS],
    /// RDMA connections open now.
    pub connections: AtomicU64,
    /// RDMA connections refused at the connection limit.
    pub connections_refused: AtomicU64,
}

impl RdmaCounters {
    pub fn refused(&self, code: ErrorCode) {
        if let Some(c) = self.refused.get(code as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Refusals with error code `code`.
    pub fn refused_with(&self, code: ErrorCode) -> u64 {
        self.refused
            .get(code as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

pub struct InFlight<'a> {
    counters: &'a ShardCounters,
    op: Opcode,
    started: Instant,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let c = self.counters;
        c.in_flight.set(c.in_flight.get() - 1);
        if let Some(l) = c.latency.get(self.op as usize) {
            l.record(self.started.elapsed().as_micros() as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets() {
        let l = Latency::default();
        l.record(0);
        l.record(25);
        l.record(26);
        l.record(u64::MAX / 2);
        assert_eq!(l.buckets[0].get(), 2);
        assert_eq!(l.buckets[1].get(), 1);
        assert_eq!(l.buckets[LATENCY_BUCKETS - 1].get(), 1);
    }

    #[test]
    fn every_error_code_has_an_rdma_slot() {
        let c = RdmaCounters::default();
        for v in 0..=u16::MAX {
            if let Some(code) = ErrorCode::from_u16(v) {
                c.refused(code);
                assert_eq!(c.refused_with(code), 1, "{code}");
            }
        }
    }

    #[test]
    fn in_flight_guard() {
        let c = ShardCounters::default();
        {
            let _g = c.start(Opcode::Write);
            assert_eq!(c.in_flight.get(), 1);
        }
        assert_eq!(c.in_flight.get(), 0);
        let n: u64 = c.latency[Opcode::Write as usize]
            .buckets
            .iter()
            .map(|b| b.get())
            .sum();
        assert_eq!(n, 1);
    }
}
