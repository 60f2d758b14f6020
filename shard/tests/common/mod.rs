//! Shared helpers of the shard integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};

use glommio::{LocalExecutorBuilder, Placement};
use shardstore_proto::{ChunkId, ShardId};
use shardstore_shard::{Shard, ShardConfig};

pub const NODE: u128 = 0x5eed_0000_0000_0000_0000_0000_0000_0001;
pub const MIB: u64 = 1 << 20;

/// Runs `f` in a fresh glommio executor with a small io_memory (the
/// machine's locked-memory limit is 8 MiB).
pub fn run<T, F, Fut>(f: F) -> T
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = T>,
{
    let ex = LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(1 << 20)
        .make()
        .expect("glommio executor");
    ex.run(f())
}

/// A temp dir on a real filesystem (O_DIRECT does not work on tmpfs).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir")
}

pub fn config(dir: &Path, capacity_bytes: u64) -> ShardConfig {
    ShardConfig {
        shard: ShardId(1),
        shard_count: 4,
        node_id: NODE,
        dir: dir.join(ShardConfig::folder_name(ShardId(1))),
        capacity_bytes,
        max_chunk_size: shardstore_proto::limits::MAX_CHUNK_SIZE,
        index_cache_bytes: 4 * MIB,
        ..ShardConfig::default()
    }
}

/// Shard 0 of 1 on a simulated disk of at least 4 MiB, no timed checkpoints.
pub fn sim_shard_config() -> ShardConfig {
    ShardConfig {
        shard: ShardId(0),
        shard_count: 1,
        node_id: NODE,
        capacity_bytes: 4 * MIB,
        checkpoint_interval_ms: 3_600_000,
        ..ShardConfig::default()
    }
}

pub fn shard_dir(dir: &Path) -> PathBuf {
    dir.join("shard-001")
}

pub async fn open(dir: &Path, capacity_bytes: u64) -> Shard {
    Shard::open(config(dir, capacity_bytes))
        .await
        .expect("open shard")
}

/// Deterministic bytes: different for every (seed, position).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Writes `pattern(n, len)` at offset 0 of chunks `0..count`.
pub async fn write_chunks(shard: &Shard, count: u128, len: usize) {
    for n in 0..count {
        shard
            .write(cid(n), 0, &pattern(n as u64, len))
            .await
            .expect("write");
    }
}

pub fn cid(n: u128) -> ChunkId {
    ChunkId(n)
}

/// Small deterministic RNG (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The index of a simulated shard lost: wipes it and opens with a rebuild
/// from the data area alone.
pub async fn open_rebuilt(mut cfg: ShardConfig, disk: &shardstore_shard::SimDisk) -> Shard {
    disk.kv().wipe();
    cfg.rebuild_index = true;
    Shard::open_sim(cfg, disk).await.expect("rebuild")
}
