//! shardstore's per-core storage engine.
//!
//! A [`Shard`] owns one data area (a file, or a range of a block device,
//! O_DIRECT through glommio) and one in-memory index checkpointed to sled,
//! inside one executor. It stores chunks as copy-on-write, self-describing
//! extents (see `layout`), checks every sector's crc32c on every read from
//! disk, and acknowledges a write after ONE device write plus a grouped
//! flush: the data area is the source of truth and the index is brought up
//! to date from it at start-up (see `shard` for the order of durable steps,
//! `index` for how it reaches sled and `recover` for why the recovery scan is
//! bounded). Nothing is shared between shards.
//!
//! All device I/O goes through the [`Storage`] trait: glommio DMA
//! ([`DmaStorage`]) or a seeded simulated disk with faults ([`SimDisk`]).
//!
//! Cancellation: a request's future may be dropped at any `.await` (its
//! client went away), and the shard stays consistent whatever the point.
//! The rules that keep it so:
//! - work other requests depend on, or whose outcome must be seen, runs in
//!   a task of its own and records its own result: every device write (its
//!   range tracked while it runs), every group flush (`group`), every
//!   checkpoint (`Inner::checkpoint`);
//! - state changed before an `.await` and finished after it is owned by a
//!   guard that restores or hands it on when dropped (`InflightGuard` and
//!   the eraser, `ErasingBatch`, `ReadEpoch`, the sweep's `SweepPass`, the
//!   chunk locks);
//! - waiting uses [`sem::Semaphore`], never glommio's directly: a woken
//!   waiter dropped before it ran loses a wake-up there.
//!
//! The simulator cancels writes and sweep passes midway, and the server's
//! crash test resets connections in the middle of writes.

mod alloc;
mod cache;
mod combine;
mod device;
mod error;
mod group;
mod index;
mod layout;
mod locks;
mod poll;
mod prefetch;
mod read_data;
mod recover;
mod scrub;
pub mod sem;
mod shard;
mod sim;
mod storage;
mod sweep;

pub use device::{
    device_size_bytes, is_block_device, split_device, DeviceRange, DmaStorage,
    MIN_DEVICE_RANGE_BYTES,
};
pub use error::ShardError;
pub use index::MAX_CHECKPOINT_RUNS;
pub use layout::{FORMAT_VERSION, SECTOR};
pub use prefetch::{ReadHints, StreamHint, MAX_CHUNKS_AHEAD};
pub use read_data::ReadData;
pub use recover::{RecoveryReport, VerifyReport};
pub use shard::{
    CacheStats, ChunkStat, ListItem, PendingWrite, ReadOutcome, Shard, ShardConfig, ShardStats,
    WriteOutcome,
};
pub use sim::{MemKv, SimDisk, SimFaultCounts, SimFaults, SimRng};
pub use storage::{IoBuf, IoFuture, ReadBuf, Storage};
pub use sweep::SweepReport;

/// Runs `f` to its end on a fresh executor (unit tests).
#[cfg(test)]
pub(crate) fn run_test<T>(f: impl std::future::Future<Output = T>) -> T {
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(256 << 10)
        .make()
        .expect("glommio executor")
        .run(f)
}
