//! Concurrent writes share flushes; writes to one chunk are serialized.
mod common;

use std::rc::Rc;

use common::*;
use shardstore_shard::Shard;

/// Group commit, and adaptive sync (whose first write runs alone and goes
/// out O_DSYNC, the rest overlapping it and each other).
#[test]
fn concurrent_writes_to_different_chunks_share_flushes() {
    for adaptive_sync in [false, true] {
        concurrent_writes_share_flushes(adaptive_sync);
    }
}

fn concurrent_writes_share_flushes(adaptive_sync: bool) {
    let dir = tempdir();
    run(|| async {
        let mut cfg = config(dir.path(), 64 * MIB);
        cfg.write_through = false;
        cfg.adaptive_sync = adaptive_sync;
        let shard = Rc::new(Shard::open(cfg).await.unwrap());
        let before = shard.stats();
        let mut tasks = Vec::new();
        for n in 0..64u128 {
            let shard = shard.clone();
            tasks.push(glommio::spawn_local(async move {
                shard.write(cid(n), 0, &pattern(n as u64, 4096)).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().version, 1);
        }
        let s = shard.stats();
        let writes = s.writes - before.writes;
        let flushes = s.flushes - before.flushes;
        assert_eq!(writes, 64);
        assert_eq!(s.device_writes - before.device_writes, 64);
        assert!(
            flushes >= 1 && flushes < writes / 4,
            "{flushes} flushes for {writes} writes"
        );
        for n in 0..64u128 {
            let r = shard.read(cid(n), 0, 4096).await.unwrap();
            assert_eq!(r.data.to_vec(), pattern(n as u64, 4096));
        }
    });
}

#[test]
fn concurrent_writes_to_one_chunk_apply_in_order() {
    let dir = tempdir();
    run(|| async {
        let shard = Rc::new(open(dir.path(), 64 * MIB).await);
        let mut tasks = Vec::new();
        // Overlapping unaligned writes: each one read-modify-writes the last.
        for n in 0..32u64 {
            let shard = shard.clone();
            tasks.push(glommio::spawn_local(async move {
                shard
                    .write(cid(1), n * 1000, &vec![n as u8 + 1; 3000])
                    .await
            }));
        }
        let mut versions = Vec::new();
        for t in tasks {
            versions.push(t.await.unwrap().version);
        }
        versions.sort();
        assert_eq!(versions, (1..=32).collect::<Vec<_>>());
        // Tasks start in spawn order, so the chunk lock applies them in order.
        let mut model = vec![0u8; 31 * 1000 + 3000];
        for n in 0..32usize {
            model[n * 1000..n * 1000 + 3000].fill(n as u8 + 1);
        }
        let r = shard.read(cid(1), 0, 1 << 20).await.unwrap();
        assert!(r.data.to_vec() == model);
    });
}
