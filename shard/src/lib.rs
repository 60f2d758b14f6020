//! shardstore's per-core storage engine.
//!
//! A [`Shard`] owns one data file (O_DIRECT through glommio) and one sled
//! index, in its own folder, inside one executor. It stores chunks as
//! copy-on-write, self-describing extents (see `layout`), checks every
//! sector's crc32c on every read from disk, and acknowledges a write only once
//! its data and its index entry are durable (see `shard` for the order of the
//! durable steps). Nothing is shared between shards.

mod alloc;
mod device;
mod error;
mod group;
mod index;
mod layout;
mod locks;
mod read_data;
mod shard;

pub use error::ShardError;
pub use read_data::ReadData;
pub use shard::{
    ChunkStat, ListItem, PendingWrite, ReadOutcome, Shard, ShardConfig, ShardStats, WriteOutcome,
};
