//! Space accounting: NoSpace when full, deletes (which still work on a full
//! shard) and overwrites give space back after the next checkpoint.
mod common;

use common::*;
use shardstore_proto::ErrorCode;
use shardstore_shard::{Shard, ShardConfig, ShardError};

#[test]
fn fill_until_no_space_then_delete_frees() {
    let dir = tempdir();
    run(|| async {
        // 64 sectors of data area, 4 kept for tombstones: each 16 KiB write
        // takes 1 header + 4 data sectors.
        let shard = open(dir.path(), 64 * 4096).await;
        let data = pattern(1, 16 * 1024);
        let mut n = 0u128;
        let err = loop {
            match shard.write(cid(n), 0, &data).await {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(n, 12, "(64 - 4) / 5 extents fit");
        assert!(
            matches!(
                err,
                ShardError::NoSpace {
                    needed_bytes: 20480,
                    free_bytes: 16384
                }
            ),
            "{err}"
        );
        assert_eq!(err.code(), ErrorCode::NoSpace);
        assert_eq!(shard.stats().used_bytes, 60 * 4096);
        // Reads are unaffected.
        assert_eq!(
            shard.read(cid(0), 0, 1 << 20).await.unwrap().data.to_vec(),
            data
        );
        // Overwriting in place needs new space first (copy-on-write) ...
        let e = shard.write(cid(0), 0, &data).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::NoSpace);
        // ... and fails without changing anything.
        assert_eq!(shard.stat(cid(0)).unwrap().version, 1);

        // Deletes work on a full shard (one tombstone sector each) ...
        assert_eq!(shard.delete(cid(3)).await.unwrap(), 1);
        assert_eq!(shard.delete(cid(4)).await.unwrap(), 1);
        // ... and writing resumes: the write waits for a checkpoint that
        // makes the freed space reusable.
        shard.write(cid(101), 0, &data).await.unwrap();
        assert!(shard.stats().checkpoint_waits > 0);
        // Every surviving chunk still reads back.
        for c in (0..12).filter(|&c| c != 3 && c != 4).chain([101]) {
            assert_eq!(
                shard.read(cid(c), 0, 1 << 20).await.unwrap().data.to_vec(),
                data
            );
        }
        // Deleting everything frees everything but the tombstones.
        let mut deleted = 2;
        for c in (0..12).chain([101]) {
            if shard.delete(cid(c)).await.is_ok() {
                deleted += 1;
            }
        }
        shard.checkpoint().await.unwrap();
        assert_eq!(shard.stats().used_bytes, deleted * 4096);
        assert_eq!(shard.stats().chunks, 0);
    });
}

/// A checkpoint whose caller is cancelled while the index is being written
/// still runs to its end: the space it took from the quarantine comes back.
/// Cut between its steps, it lost that space until the next restart.
#[test]
fn a_cancelled_checkpoint_still_frees_what_it_took() {
    let dir = tempdir();
    run(|| async {
        let shard = std::rc::Rc::new(open(dir.path(), 1 << 20).await);
        let data = pattern(1, 16 * 1024);
        shard.write(cid(1), 0, &data).await.unwrap();
        for _ in 0..3 {
            shard.checkpoint().await.unwrap();
        }
        let used = shard.stats().used_bytes;
        // The overwrite quarantines the first version's 5 sectors.
        shard.write(cid(1), 0, &data).await.unwrap();
        let checkpoints = shard.stats().checkpoints;
        let task = {
            let shard = shard.clone();
            glommio::spawn_local(async move { shard.checkpoint().await })
        };
        // It runs up to the index write (on the blocking pool), then is
        // cancelled.
        futures_lite::future::yield_now().await;
        assert_eq!(shard.stats().checkpoints, checkpoints, "not finished yet");
        drop(task);
        for _ in 0..3 {
            shard.checkpoint().await.unwrap();
        }
        assert_eq!(
            shard.stats().used_bytes,
            used,
            "the overwritten version's space is back"
        );
        assert_eq!(
            shard.read(cid(1), 0, 1 << 20).await.unwrap().data.to_vec(),
            data
        );
    });
}

/// On a full shard, space freed by deletes becomes reusable at a
/// checkpoint, but only once the reads that began before it have ended: a
/// write that needs it waits for them (it got NO_SPACE while any read was
/// running; review finding).
#[test]
fn a_write_on_a_full_shard_waits_for_reads_holding_freed_space() {
    let disk = shardstore_shard::SimDisk::new(64 * 4096 + 64 * 1024, 14);
    let cfg = ShardConfig {
        capacity_bytes: 64 * 4096,
        ..sim_shard_config()
    };
    run(|| async {
        let shard = std::rc::Rc::new(Shard::open_sim(cfg, &disk).await.unwrap());
        let data = pattern(1, 16 * 1024);
        let mut n = 0u128;
        while shard.write(cid(n), 0, &data).await.is_ok() {
            n += 1;
        }
        shard.delete(cid(3)).await.unwrap();
        shard.delete(cid(4)).await.unwrap();
        // A read in progress (held at the disk) over the checkpoints the
        // write makes.
        disk.hold_reads(true);
        let reader = {
            let shard = shard.clone();
            glommio::spawn_local(async move { shard.read(cid(0), 0, 4096).await })
        };
        for _ in 0..4 {
            futures_lite::future::yield_now().await;
        }
        let writer = {
            let shard = shard.clone();
            let data = data.clone();
            glommio::spawn_local(async move { shard.write(cid(100), 0, &data).await })
        };
        glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
        disk.hold_reads(false);
        reader.await.unwrap();
        writer.await.unwrap();
        assert_eq!(
            shard
                .read(cid(100), 0, 1 << 20)
                .await
                .unwrap()
                .data
                .to_vec(),
            data
        );
    });
}

/// A shard whose free space is below the reservation target (small, or
/// nearly full) does not start a checkpoint after every write: it used to,
/// since the reservation could never reach the target.
#[test]
fn a_small_shard_does_not_checkpoint_after_every_write() {
    let disk = shardstore_shard::SimDisk::new(4 * MIB + 64 * 1024, 15);
    run(|| async {
        let shard = Shard::open_sim(sim_shard_config(), &disk).await.unwrap();
        for n in 0..60u128 {
            shard
                .write(cid(n), 0, &pattern(n as u64, 16 * 1024))
                .await
                .unwrap();
        }
        glommio::timer::sleep(std::time::Duration::from_millis(20)).await;
        let before = shard.stats().checkpoints;
        for n in 100..140u128 {
            shard
                .write(cid(n), 0, &pattern(n as u64, 4096))
                .await
                .unwrap();
            glommio::timer::sleep(std::time::Duration::from_millis(2)).await;
        }
        let taken = shard.stats().checkpoints - before;
        assert!(taken < 10, "{taken} checkpoints for 40 writes");
    });
}
