//! The index store holds exactly the last checkpoint: changes made after it
//! live only in the shard's memory (and the data area) until the next one,
//! a crash leaves the store as that checkpoint wrote it, and recovery
//! replays the rest from the data area.
mod common;

use std::ops::Bound;

use common::*;
use shardstore_shard::{Shard, ShardError, SimDisk};

type Records = Vec<(Vec<u8>, Vec<u8>)>;

fn stored(disk: &SimDisk) -> Records {
    disk.kv().range(Bound::Unbounded, Bound::Unbounded)
}

/// Chunks 0..4 written before the checkpoint; after it chunk 10 is new,
/// chunk 1 overwritten at 100 and chunk 2 deleted.
async fn check_after(shard: &Shard) {
    for n in [0u128, 3] {
        let r = shard.read(cid(n), 0, 1 << 20).await.unwrap();
        assert_eq!(r.data.to_vec(), pattern(n as u64, 6000), "chunk {n}");
    }
    let mut one = pattern(1, 6000);
    one[100..5100].copy_from_slice(&pattern(11, 5000));
    let r = shard.read(cid(1), 0, 1 << 20).await.unwrap();
    assert!(r.data.to_vec() == one && r.version == 2, "chunk 1");
    assert!(matches!(
        shard.read(cid(2), 0, 10).await,
        Err(ShardError::NotFound(_))
    ));
    let r = shard.read(cid(10), 0, 1 << 20).await.unwrap();
    assert_eq!(r.data.to_vec(), pattern(10, 9000));
    assert_eq!(shard.stats().chunks, 4);
}

#[test]
fn crash_leaves_the_last_checkpoint_and_recovery_replays_the_rest() {
    let disk = SimDisk::new(5 * MIB, 11);
    let at_checkpoint = run(|| async {
        let shard = Shard::open_sim(sim_shard_config(), &disk).await.unwrap();
        write_chunks(&shard, 4, 6000).await;
        shard.checkpoint().await.unwrap();
        let snapshot = stored(&disk);
        let checkpoints = shard.stats().checkpoints;

        shard.write(cid(10), 0, &pattern(10, 9000)).await.unwrap();
        shard.write(cid(1), 100, &pattern(11, 5000)).await.unwrap();
        shard.delete(cid(2)).await.unwrap();
        check_after(&shard).await;
        assert_eq!(shard.stats().checkpoints, checkpoints);
        assert!(
            stored(&disk) == snapshot,
            "an index change reached the store before the next checkpoint"
        );
        snapshot
    });
    disk.crash();
    assert!(
        stored(&disk) == at_checkpoint,
        "after the crash the store is not the last checkpoint"
    );

    run(|| async {
        let shard = Shard::open_sim(sim_shard_config(), &disk).await.unwrap();
        let r = shard.recovery_report();
        assert_eq!((r.replayed, r.replayed_tombstones), (2, 1), "{r:?}");
        check_after(&shard).await;
    });
    // The checkpoint taken at open holds the replayed changes.
    assert!(stored(&disk) != at_checkpoint);
    disk.crash();
    run(|| async {
        let shard = Shard::open_sim(sim_shard_config(), &disk).await.unwrap();
        let r = shard.recovery_report();
        assert_eq!((r.replayed, r.replayed_tombstones), (0, 0), "{r:?}");
        check_after(&shard).await;
    });
}
