//! Per-shard counters. Plain `Cell`s: each shard owns its own, no atomics on
//! the request path. A later metrics endpoint reads published snapshots.

use shardstore_proto::Opcode;
use std::cell::Cell;

#[derive(Default)]
pub struct ShardCounters {
    pub requests: [Cell<u64>; 9],
    pub errors: [Cell<u64>; 9],
    pub bytes_in: Cell<u64>,
    pub bytes_out: Cell<u64>,
    pub forwarded_out: Cell<u64>,
    pub forwarded_in: Cell<u64>,
    pub forward_busy: Cell<u64>,
    pub connections: Cell<u64>,
    pub connections_total: Cell<u64>,
    pub malformed_frames: Cell<u64>,
}

impl ShardCounters {
    pub fn request(&self, op: Opcode) {
        let c = &self.requests[op as usize];
        c.set(c.get() + 1);
    }

    pub fn error(&self, op: Opcode) {
        let c = &self.errors[op as usize];
        c.set(c.get() + 1);
    }
}
