//! Concurrent writes share flushes; writes to one chunk are serialized.
mod common;

use std::rc::Rc;

use common::*;
use shardstore_shard::{Shard, ShardError, SimDisk, WriteOutcome};

/// Writes `pattern(n, len)` at offset 0 of chunk `n` in a task of its own.
fn spawn_write(
    shard: &Rc<Shard>,
    n: u128,
    len: usize,
) -> glommio::Task<Result<WriteOutcome, ShardError>> {
    let shard = shard.clone();
    glommio::spawn_local(async move { shard.write(cid(n), 0, &pattern(n as u64, len)).await })
}

/// Writes chunks `0..count` concurrently, a task each; each is new.
async fn write_concurrently(shard: &Rc<Shard>, count: u128, len: usize) {
    let tasks: Vec<_> = (0..count).map(|n| spawn_write(shard, n, len)).collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().version, 1);
    }
}

/// Space in use after three checkpoints (each may release quarantined runs).
async fn used_after_checkpoints(shard: &Shard) -> u64 {
    for _ in 0..3 {
        shard.checkpoint().await.unwrap();
    }
    shard.stats().used_bytes
}

/// Chunks `0..count` read back as written by [`write_concurrently`].
async fn assert_chunks(shard: &Shard, count: u128, len: usize, what: &str) {
    for n in 0..count {
        let r = shard.read(cid(n), 0, len as u32).await.unwrap();
        assert_eq!(r.data.to_vec(), pattern(n as u64, len), "{what}");
    }
}

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
        write_concurrently(&shard, 64, 4096).await;
        let s = shard.stats();
        let writes = s.writes - before.writes;
        let flushes = s.flushes - before.flushes;
        assert_eq!(writes, 64);
        assert_eq!(s.device_writes - before.device_writes, 64);
        assert!(
            flushes >= 1 && flushes < writes / 4,
            "{flushes} flushes for {writes} writes"
        );
        assert_chunks(&shard, 64, 4096, "read back").await;
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

/// O_DSYNC writes that queue behind the device share device writes (write
/// combining); with combining off each is its own device write. Every write
/// reads back, and again after a reopen (recovery finds each extent of a
/// combined write).
#[test]
fn queued_durable_writes_share_device_writes() {
    for combine in [0u32, 1, 4] {
        let dir = tempdir();
        run(|| async {
            let mut cfg = config(dir.path(), 64 * MIB);
            cfg.combine_in_flight = combine;
            let shard = Rc::new(Shard::open(cfg.clone()).await.unwrap());
            let before = shard.stats();
            write_concurrently(&shard, 64, 4096).await;
            let s = shard.stats();
            let (writes, dev) = (
                s.writes - before.writes,
                s.device_writes - before.device_writes,
            );
            assert_eq!(writes, 64);
            assert_eq!(s.flushes, before.flushes, "O_DSYNC writes need no flush");
            if combine == 0 {
                assert_eq!(dev, 64, "combining off: one device write each");
            } else {
                assert!(
                    (1..=64 / 4).contains(&dev),
                    "combine {combine}: {dev} device writes for {writes} writes"
                );
            }
            assert_chunks(&shard, 64, 4096, "read back").await;
            drop(Rc::try_unwrap(shard).ok().expect("one owner"));
            // No close: recovery must find every extent from the data area.
            let shard = Shard::open(cfg).await.unwrap();
            assert_chunks(&shard, 64, 4096, "after reopen").await;
            shard.close().await.unwrap();
        });
    }
}

/// Requests cancelled while their write waits in the combiner's queue
/// neither hang the others nor leave a torn chunk: each cancelled write is
/// withdrawn (absent) or, had it gone out, entirely there, the same before
/// and after a reopen, and the shard still writes.
#[test]
fn cancelled_queued_writes_do_not_block_or_tear() {
    let dir = tempdir();
    run(|| async {
        let mut cfg = config(dir.path(), 64 * MIB);
        cfg.combine_in_flight = 1;
        let shard = Rc::new(Shard::open(cfg.clone()).await.unwrap());
        let mut tasks: Vec<_> = (0..48)
            .map(|n| Some(spawn_write(&shard, n, 8192)))
            .collect();
        // Let every task reach the combiner, then cancel every third.
        futures_lite::future::yield_now().await;
        for (n, t) in tasks.iter_mut().enumerate() {
            if n % 3 == 1 {
                drop(t.take());
            }
        }
        for (n, t) in tasks.into_iter().enumerate() {
            if let Some(t) = t {
                assert_eq!(t.await.unwrap().version, 1, "write {n}");
            }
        }
        // Returns how many chunks are absent (cancelled writes only).
        let check = |shard: Rc<Shard>| async move {
            let mut absent = 0;
            for n in 0..48u128 {
                match shard.read(cid(n), 0, 8192).await {
                    Ok(r) => assert_eq!(r.data.to_vec(), pattern(n as u64, 8192), "chunk {n}"),
                    Err(e) => {
                        assert!(n % 3 == 1, "chunk {n}: {e}");
                        absent += 1;
                    }
                }
            }
            absent
        };
        // Only the first write had gone to the device when the others were
        // cancelled: the cancelled ones were withdrawn from the queue.
        let absent = check(shard.clone()).await;
        assert!(absent >= 8, "{absent} of 16 cancelled writes absent");
        assert!(
            shard.stats().combined_writes > 0,
            "the live writes were combined"
        );
        // Checkpoints while nothing runs: the withdrawn runs come back.
        shard.checkpoint().await.unwrap();
        shard
            .write(cid(1000), 0, &pattern(1000, 4096))
            .await
            .unwrap();
        shard.close().await.unwrap();
        drop(shard);
        let shard = Rc::new(Shard::open(cfg).await.unwrap());
        assert_eq!(check(shard.clone()).await, absent, "after a reopen");
        assert!(shard.verify().await.unwrap().problems.is_empty());
    });
}

/// A request cancelled while its device write still runs (a slow device)
/// leaves its space quarantined until that write ends, however many
/// checkpoints pass: reused earlier, the late write could land on newer,
/// acknowledged data.
/// Both ways a write reaches the device: O_DSYNC (`write_through`), and a
/// plain write made durable by a group-committed flush.
#[test]
fn space_of_a_cancelled_running_write_waits_for_the_write() {
    for write_through in [true, false] {
        quarantine_outlives_a_cancelled_running_write(write_through);
    }
}

fn quarantine_outlives_a_cancelled_running_write(write_through: bool) {
    run(move || async move {
        let disk = SimDisk::new(8 * MIB, 7);
        let mut cfg = sim_shard_config();
        cfg.write_through = write_through;
        let shard = Rc::new(Shard::open_sim(cfg, &disk).await.unwrap());
        shard.write(cid(1), 0, &pattern(1, 4096)).await.unwrap();
        shard.checkpoint().await.unwrap();
        shard.checkpoint().await.unwrap();
        let used = shard.stats().used_bytes;
        disk.hold_writes(true);
        let task = spawn_write(&shard, 2, 8192);
        for _ in 0..8 {
            futures_lite::future::yield_now().await;
        }
        drop(task); // cancelled while its device write is in flight
        let held = shard.stats().used_bytes;
        assert!(held > used, "the cancelled write's run is quarantined");
        assert_eq!(
            used_after_checkpoints(&shard).await,
            held,
            "not reusable while its write runs"
        );
        disk.hold_writes(false);
        glommio::timer::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(
            used_after_checkpoints(&shard).await,
            used,
            "reusable once the write ended"
        );
        shard.close().await.unwrap();
    });
}

/// A durable write that fails with EIO fail-stops the shard even when every
/// request it carried was cancelled (nobody was waiting to see the error).
#[test]
fn a_failed_write_nobody_waits_for_still_fail_stops() {
    run(|| async {
        let disk = SimDisk::new(8 * MIB, 9);
        let mut cfg = sim_shard_config();
        cfg.write_through = true;
        let shard = Rc::new(Shard::open_sim(cfg, &disk).await.unwrap());
        disk.hold_writes(true);
        let task = spawn_write(&shard, 2, 4096);
        for _ in 0..8 {
            futures_lite::future::yield_now().await;
        }
        drop(task);
        disk.set_faults(shardstore_shard::SimFaults {
            write_eio: 1,
            ..Default::default()
        });
        disk.hold_writes(false);
        glommio::timer::sleep(std::time::Duration::from_millis(20)).await;
        disk.set_faults(Default::default());
        assert!(matches!(
            shard.write(cid(3), 0, &pattern(3, 4096)).await,
            Err(shardstore_shard::ShardError::ReadOnly)
        ));
        assert!(shard.stats().fail_stopped);
    });
}
