//! The sweep retires tombstones: deleted chunk ids stop holding a sector and
//! an index record, and a full rebuild from the data area afterwards still
//! does not bring any deleted chunk back (the sweep erased their old headers
//! from the free space first).
mod common;

use common::*;
use shardstore_shard::{Shard, ShardConfig, ShardError, SimDisk};

const CAP: u64 = 16 * MIB;
/// 8 KiB values: one header and two data sectors each.
const LEN: usize = 8192;
const SECTORS_PER_CHUNK: u64 = 3;

fn cfg() -> ShardConfig {
    ShardConfig {
        capacity_bytes: CAP,
        // Small reservations: the free space and the reservation both hold
        // old headers of deleted chunks.
        checkpoint_bytes: 128 * 1024,
        ..sim_shard_config()
    }
}

/// Chunks 0..30 are written (0..10 twice: their first version is an old
/// header in the free space), then deleted; 30..40 stay. Returns the
/// sectors the deletes wrote (the tombstones).
async fn churn(shard: &Shard, disk: &SimDisk) -> Vec<u64> {
    for n in 0..40u128 {
        shard
            .write(cid(n), 0, &pattern(n as u64, LEN))
            .await
            .unwrap();
    }
    for n in 0..10u128 {
        shard
            .write(cid(n), 0, &pattern(1000 + n as u64, LEN))
            .await
            .unwrap();
    }
    shard.checkpoint().await.unwrap();
    let before: Vec<Vec<u8>> = (0..disk.sectors()).map(|s| disk.sector(s)).collect();
    for n in 0..30u128 {
        shard.delete(cid(n)).await.unwrap();
    }
    let tombs: Vec<u64> = (0..disk.sectors())
        .filter(|&s| disk.sector(s) != before[s as usize])
        .collect();
    assert_eq!(tombs.len(), 30, "one sector per delete");
    tombs
}

async fn check_survivors(shard: &Shard, extra: u128) {
    for n in 0..30u128 {
        assert!(
            matches!(
                shard.read(cid(n), 0, LEN as u32).await,
                Err(ShardError::NotFound(_))
            ),
            "deleted chunk {n} came back"
        );
    }
    for n in (30..40u128).chain(100..100 + extra) {
        let r = shard.read(cid(n), 0, LEN as u32).await.unwrap();
        assert!(
            r.data.to_vec() == pattern(n as u64, LEN),
            "chunk {n} differs"
        );
    }
}

#[test]
fn sweeps_retire_tombstones_and_a_rebuild_keeps_deleted_chunks_deleted() {
    let disk = SimDisk::new(CAP + 64 * 1024, 7);
    let extra = run(|| async {
        let shard = Shard::open_sim(cfg(), &disk).await.unwrap();
        let tombs = churn(&shard, &disk).await;
        assert_eq!(shard.tombstones(), 30);
        // Writes consume the reservation (old headers there are
        // overwritten); each pass erases the ones in the free map.
        let mut extra = 0u128;
        let mut retired = 0;
        for round in 0..8 {
            let r = shard.sweep_now().await.unwrap();
            eprintln!("round {round}: {r:?}");
            assert!(r.retired <= r.candidates, "{r:?}");
            retired += r.retired;
            if shard.tombstones() == 0 {
                break;
            }
            assert!(round < 7, "tombstones left after 8 passes: {r:?}");
            for _ in 0..30 {
                let n = 100 + extra;
                shard
                    .write(cid(n), 0, &pattern(n as u64, LEN))
                    .await
                    .unwrap();
                extra += 1;
            }
        }
        assert_eq!(retired, 30);
        assert_eq!(shard.stats().tombstones_retired, 30);
        // Every sector in use is a live chunk's: the tombstones' came back.
        shard.checkpoint().await.unwrap();
        shard.checkpoint().await.unwrap();
        let live = 10 + extra as u64;
        assert_eq!(
            shard.stats().used_bytes,
            live * SECTORS_PER_CHUNK * 4096,
            "space of retired tombstones not reclaimed"
        );
        check_survivors(&shard, extra).await;
        shard.close().await.unwrap();
        (extra, tombs)
    });
    let (extra, tombs) = extra;
    // Recovery without the tombstones.
    run(|| async {
        let shard = Shard::open_sim(cfg(), &disk).await.unwrap();
        assert_eq!(shard.tombstones(), 0);
        check_survivors(&shard, extra).await;
    });
    // The retired tombstones' sectors are free: new data may land there
    // (here: zeros). Then the index is lost and rebuilt from the data area
    // alone: the deleted chunks' old extents must not be there to find.
    for s in tombs {
        disk.put_sector(s, &[0u8; 4096]);
    }
    run(|| async {
        let shard = open_rebuilt(cfg(), &disk).await;
        assert!(shard.stats().recovery_replayed > 0);
        check_survivors(&shard, extra).await;
        assert_eq!(shard.stats().chunks, 10 + extra as u64);
    });
}

/// Without a sweep the tombstones stay, and they are what keeps a rebuild
/// from bringing the deleted chunks back (the reason the sweep exists).
#[test]
fn without_a_sweep_tombstones_stay_and_guard_the_rebuild() {
    let disk = SimDisk::new(CAP + 64 * 1024, 8);
    run(|| async {
        let shard = Shard::open_sim(cfg(), &disk).await.unwrap();
        churn(&shard, &disk).await;
        shard.checkpoint().await.unwrap();
        assert_eq!(shard.tombstones(), 30);
        shard.close().await.unwrap();
    });
    run(|| async {
        let shard = open_rebuilt(cfg(), &disk).await;
        assert_eq!(shard.tombstones(), 30);
        check_survivors(&shard, 0).await;
    });
}

/// Tombstones younger than the last checkpoint are not candidates yet, and
/// a chunk deleted, written and deleted again keeps only its newest one.
#[test]
fn young_tombstones_wait() {
    let disk = SimDisk::new(CAP + 64 * 1024, 9);
    run(|| async {
        let shard = Shard::open_sim(cfg(), &disk).await.unwrap();
        shard.write(cid(1), 0, &pattern(1, LEN)).await.unwrap();
        shard.delete(cid(1)).await.unwrap();
        shard.write(cid(1), 0, &pattern(2, LEN)).await.unwrap();
        shard.delete(cid(1)).await.unwrap();
        assert_eq!(shard.tombstones(), 1);
        let r = shard.sweep_now().await.unwrap();
        // The pass's own checkpoint makes the delete old enough.
        assert_eq!(r.candidates, 1, "{r:?}");
        assert!(matches!(
            shard.read(cid(1), 0, 10).await,
            Err(ShardError::NotFound(_))
        ));
    });
}

/// The background scrubber runs a sweep after each pass.
#[test]
fn the_scrubber_sweeps_in_the_background() {
    let disk = SimDisk::new(CAP + 64 * 1024, 10);
    run(|| async {
        let mut c = cfg();
        c.scrub_period_secs = 1;
        let shard = Shard::open_sim(c, &disk).await.unwrap();
        churn(&shard, &disk).await;
        let started = std::time::Instant::now();
        while shard.tombstones() > 0 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(20),
                "{} tombstones left: {:?}",
                shard.tombstones(),
                shard.stats().sweep_passes
            );
            glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
        }
        let s = shard.stats();
        assert!(s.sweep_passes >= 1 && s.tombstones_retired == 30, "{s:?}");
        check_survivors(&shard, 0).await;
    });
}

/// A pass cancelled part-way retires nothing and loses no space: the next
/// pass makes the sectors the first one zeroed durable, frees them, and
/// retires the tombstones.
#[test]
fn a_cancelled_pass_loses_nothing() {
    let disk = SimDisk::new(CAP + 64 * 1024, 11);
    run(|| async {
        let mut c = cfg();
        c.write_through = false; // zeros wait for a flush: cancel before it
        let shard = std::rc::Rc::new(Shard::open_sim(c, &disk).await.unwrap());
        churn(&shard, &disk).await;
        let mut cancelled = 0;
        for cut in 1..40usize {
            let s = shard.clone();
            let task = glommio::spawn_local(async move { s.sweep_now().await });
            for _ in 0..cut {
                futures_lite::future::yield_now().await;
            }
            drop(task);
            match shard.tombstones() {
                30 => cancelled += 1,
                0 => break, // this one finished before the cut
                n => panic!("a pass retired {} of 30 tombstones", 30 - n),
            }
        }
        assert!(cancelled > 0);
        if shard.tombstones() > 0 {
            let r = shard.sweep_now().await.unwrap();
            assert_eq!(r.retired, 30, "{r:?}");
        }
        shard.checkpoint().await.unwrap();
        shard.checkpoint().await.unwrap();
        assert_eq!(shard.stats().used_bytes, 10 * SECTORS_PER_CHUNK * 4096);
        check_survivors(&shard, 0).await;
    });
}

/// One pass at a time: a second one started while a pass runs does nothing.
#[test]
fn one_pass_at_a_time() {
    let disk = SimDisk::new(CAP + 64 * 1024, 12);
    run(|| async {
        let shard = std::rc::Rc::new(Shard::open_sim(cfg(), &disk).await.unwrap());
        churn(&shard, &disk).await;
        let s = shard.clone();
        let first = glommio::spawn_local(async move { s.sweep_now().await });
        futures_lite::future::yield_now().await;
        let second = shard.sweep_now().await.unwrap();
        assert_eq!(second.candidates, 0, "{second:?}");
        let first = first.await.unwrap();
        assert_eq!(first.retired, 30, "{first:?}");
        // And once it is over, the next one runs.
        shard.delete(cid(30)).await.unwrap();
        assert_eq!(shard.sweep_now().await.unwrap().retired, 1);
        assert_eq!(shard.tombstones(), 0);
    });
}

/// A pass cancelled while one of its zero writes is still at the device
/// (each runs in a task of its own): the next pass waits for that write to
/// end before it makes the sector free again. It did not, and read the old
/// header there again and wrote a second zero write at that sector while
/// the first one ran (a debug assertion of the I/O layer catches two
/// writes running at one sector; in a release build, a write given the
/// sector meanwhile could be wiped by the late zeros).
#[test]
fn a_cancelled_pass_zero_write_ends_before_its_sector_is_free() {
    let disk = SimDisk::new(CAP + 64 * 1024, 13);
    run(|| async {
        let mut c = cfg();
        c.write_through = false;
        let shard = std::rc::Rc::new(Shard::open_sim(c, &disk).await.unwrap());
        churn(&shard, &disk).await;
        disk.hold_writes(true);
        let first = {
            let s = shard.clone();
            glommio::spawn_local(async move { s.sweep_now().await })
        };
        // Its reads are done and its first zero write is held.
        glommio::timer::sleep(std::time::Duration::from_millis(30)).await;
        assert_eq!(shard.tombstones(), 30);
        drop(first);
        futures_lite::future::yield_now().await; // the cancellation runs
        let second = {
            let s = shard.clone();
            glommio::spawn_local(async move { s.sweep_now().await })
        };
        glommio::timer::sleep(std::time::Duration::from_millis(30)).await;
        disk.hold_writes(false);
        let report = second.await.unwrap();
        assert_eq!(report.retired, 30, "{report:?}");
        shard.checkpoint().await.unwrap();
        shard.checkpoint().await.unwrap();
        assert_eq!(shard.stats().used_bytes, 10 * SECTORS_PER_CHUNK * 4096);
        check_survivors(&shard, 0).await;
    });
}
