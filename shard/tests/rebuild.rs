//! Index loss and rebuild from the data area alone; recovery after a crash
//! that lost unflushed index batches; the golden data folder of this format.
mod common;

use std::ops::Bound;
use std::path::Path;
use std::rc::Rc;

use common::*;
use shardstore_proto::ShardId;
use shardstore_shard::{Shard, ShardConfig, ShardError, FORMAT_VERSION};

/// Chunk `n` reads back whole as `model`.
async fn assert_chunk(shard: &Shard, n: u128, model: &[u8], what: &str) {
    let r = shard.read(cid(n), 0, 1 << 20).await.unwrap();
    assert!(r.data.to_vec() == model, "chunk {n}: {what}");
}

async fn fill(shard: &Shard) {
    for n in 0..12u128 {
        shard
            .write(
                cid(n),
                n as u64 * 700,
                &pattern(n as u64, 3000 + n as usize * 999),
            )
            .await
            .unwrap();
    }
    shard.write(cid(1), 100, &pattern(77, 5000)).await.unwrap();
    shard.delete(cid(2)).await.unwrap();
    shard.delete(cid(3)).await.unwrap();
    shard.write(cid(3), 0, b"reborn").await.unwrap();
}

async fn check(shard: &Shard) {
    for n in 0..12u128 {
        let r = shard.read(cid(n), 0, 1 << 20).await;
        match n {
            2 => assert!(
                matches!(r, Err(ShardError::NotFound(_))),
                "deleted chunk came back"
            ),
            3 => {
                let r = r.unwrap();
                assert_eq!(r.data.to_vec(), b"reborn");
                assert_eq!(r.version, 1);
            }
            _ => {
                let mut m = vec![0u8; n as usize * 700];
                m.extend(pattern(n as u64, 3000 + n as usize * 999));
                let mut version = 1;
                if n == 1 {
                    m.resize(m.len().max(5100), 0);
                    m[100..5100].copy_from_slice(&pattern(77, 5000));
                    version = 2;
                }
                let r = r.unwrap();
                assert!(r.data.to_vec() == m, "chunk {n} differs");
                assert_eq!(r.version, version, "chunk {n} version");
            }
        }
    }
    assert_eq!(shard.stats().chunks, 11);
}

#[test]
fn missing_index_refuses_start_then_rebuilds() {
    let dir = tempdir();
    run(|| async {
        let shard = open(dir.path(), 8 * MIB).await;
        fill(&shard).await;
        shard.close().await.unwrap();
    });
    std::fs::remove_dir_all(shard_dir(dir.path()).join("index")).unwrap();
    run(|| async {
        let e = Shard::open(config(dir.path(), 8 * MIB))
            .await
            .err()
            .expect("refused");
        let msg = e.to_string();
        assert!(matches!(e, ShardError::IndexMissing(_)), "{msg}");
        assert!(msg.contains("check") && msg.contains("--rebuild"), "{msg}");
        assert!(msg.contains("--rebuild-index"), "{msg}");
    });
    run(|| async {
        let mut cfg = config(dir.path(), 8 * MIB);
        cfg.rebuild_index = true;
        let shard = Shard::open(cfg).await.unwrap();
        assert!(shard.recovery_report().rebuilt);
        check(&shard).await;
        // Generations continue above everything on disk.
        shard.write(cid(1), 0, b"z").await.unwrap();
        shard.close().await.unwrap();
    });
    run(|| async {
        let shard = open(dir.path(), 8 * MIB).await;
        assert!(!shard.recovery_report().rebuilt);
        assert_eq!(shard.read(cid(1), 0, 1).await.unwrap().data.to_vec(), b"z");
        assert_eq!(shard.stat(cid(1)).unwrap().version, 3);
    });
}

/// Without close (no final checkpoint), dropping the index's unflushed
/// batches: recovery replays the writes and deletes from the data area.
#[test]
fn recovery_replays_what_the_index_lost() {
    let dir = tempdir();
    // The state of the index at a checkpoint, then more writes that only the
    // data area has; restoring the old index copy simulates losing them.
    let saved = dir.path().join("index-at-checkpoint");
    run(|| async {
        let mut cfg = config(dir.path(), 8 * MIB);
        cfg.checkpoint_interval_ms = 3_600_000;
        let shard = Shard::open(cfg).await.unwrap();
        shard.checkpoint().await.unwrap();
        copy_dir(&shard_dir(dir.path()).join("index"), &saved);
        fill(&shard).await;
        std::mem::forget(shard); // no close, no checkpoint, no sled flush on drop
    });
    let index = shard_dir(dir.path()).join("index");
    std::fs::remove_dir_all(&index).unwrap();
    copy_dir(&saved, &index);
    run(|| async {
        let shard = open(dir.path(), 8 * MIB).await;
        let r = shard.recovery_report();
        assert!(r.replayed >= 13 && r.replayed_tombstones == 2, "{r:?}");
        check(&shard).await;
    });
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &p);
        } else {
            std::fs::copy(e.path(), p).unwrap();
        }
    }
}

const GOLDEN_NODE: u128 = 0x901d_e000_0000_0000_0000_0000_0000_0002;

fn golden_config(dir: &Path) -> ShardConfig {
    ShardConfig {
        shard: ShardId(0),
        shard_count: 1,
        node_id: GOLDEN_NODE,
        dir: dir.join("shard-000"),
        capacity_bytes: 256 * 1024,
        ..ShardConfig::default()
    }
}

fn golden_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/golden-v{FORMAT_VERSION}"))
}

/// Regenerates the fixture: `cargo test -p shardstore-shard --test rebuild -- --ignored`.
/// Only when the format version changes (and then keep the old one too).
#[test]
#[ignore]
fn generate_golden_fixture() {
    let out = golden_dir();
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    run(|| async {
        let shard = Shard::open(golden_config(&out)).await.unwrap();
        fill(&shard).await;
        shard.close().await.unwrap();
    });
}

/// The committed data folder of this format version still opens and reads
/// back, with its index and rebuilt from the data area alone.
#[test]
fn golden_data_folder_opens() {
    let src = golden_dir();
    assert!(
        src.join("shard-000/data").exists(),
        "fixture missing: {}",
        src.display()
    );
    let dir = tempdir();
    copy_dir(&src, dir.path());
    run(|| async {
        let shard = Shard::open(golden_config(dir.path())).await.unwrap();
        check(&shard).await;
        assert!(shard.verify().await.unwrap().problems.is_empty());
    });
    std::fs::remove_dir_all(dir.path().join("shard-000/index")).unwrap();
    run(|| async {
        let mut cfg = golden_config(dir.path());
        cfg.rebuild_index = true;
        let shard = Shard::open(cfg).await.unwrap();
        check(&shard).await;
    });
}

/// An acknowledged write that only the data area has (the index lost it)
/// and whose data was damaged on the medium afterwards is not mistaken for a
/// torn write and silently dropped: it is kept and reads report CORRUPT.
#[test]
fn damaged_acknowledged_extent_is_corrupt_not_lost() {
    let dir = tempdir();
    let saved = dir.path().join("index-at-checkpoint");
    let marker = b"ACKED-THEN-DAMAGED-MARKER";
    run(|| async {
        let mut cfg = config(dir.path(), 8 * MIB);
        cfg.checkpoint_interval_ms = 3_600_000;
        let shard = Shard::open(cfg).await.unwrap();
        shard.checkpoint().await.unwrap();
        copy_dir(&shard_dir(dir.path()).join("index"), &saved);
        let mut data = pattern(5, 8192);
        data[4096 + 10..4096 + 10 + marker.len()].copy_from_slice(marker);
        shard.write(cid(42), 0, &data).await.unwrap();
        // A later write: its header proves chunk 42's write was durable.
        shard.write(cid(43), 0, b"later").await.unwrap();
        std::mem::forget(shard);
    });
    let index = shard_dir(dir.path()).join("index");
    std::fs::remove_dir_all(&index).unwrap();
    copy_dir(&saved, &index);
    let file = shard_dir(dir.path()).join("data");
    let mut bytes = std::fs::read(&file).unwrap();
    let pos = bytes
        .windows(marker.len())
        .position(|w| w == marker)
        .unwrap();
    bytes[pos] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    run(|| async {
        let shard = open(dir.path(), 8 * MIB).await;
        assert_eq!(shard.recovery_report().damaged_kept, 1);
        match shard.read(cid(42), 0, 8192).await {
            Err(ShardError::Corrupt { sector: 1, .. }) => {}
            other => panic!(
                "expected CORRUPT at sector 1, got {:?}",
                other.map(|r| r.version)
            ),
        }
        assert_eq!(
            shard.read(cid(42), 0, 4096).await.unwrap().data.to_vec(),
            pattern(5, 4096)
        );
        assert_eq!(
            shard.read(cid(43), 0, 5).await.unwrap().data.to_vec(),
            b"later"
        );
    });
}

/// A live extent partly overwritten keeps its header; the overwritten
/// sector's space is free and may hold other data by the time the index is
/// lost. The rebuild must keep the extent's other sectors (the bad one is
/// superseded by a newer extent), not discard the whole extent.
#[test]
fn rebuild_keeps_a_partly_overwritten_extent_whose_old_sector_was_reused() {
    let disk = shardstore_shard::SimDisk::new(4 * MIB + 64 * 1024, 3);
    let cfg = sim_shard_config;
    let mut model = pattern(1, 4 * 4096);
    run(|| async {
        let shard = Shard::open_sim(cfg(), &disk).await.unwrap();
        let before: Vec<Vec<u8>> = (0..disk.sectors()).map(|s| disk.sector(s)).collect();
        shard.write(cid(1), 0, &model).await.unwrap();
        let written: Vec<u64> = (0..disk.sectors())
            .filter(|&s| disk.sector(s) != before[s as usize])
            .collect();
        assert_eq!(written.len(), 5, "a header and four data sectors");
        let patch = pattern(2, 4096);
        shard.write(cid(1), 4096, &patch).await.unwrap();
        model[4096..8192].copy_from_slice(&patch);
        shard.checkpoint().await.unwrap();
        shard.checkpoint().await.unwrap();
        shard.close().await.unwrap();
        // The old copy of sector 1 is free space now: another write's data.
        disk.put_sector(written[2], &pattern(99, 4096));
    });
    run(|| async {
        let shard = open_rebuilt(cfg(), &disk).await;
        let r = shard.read(cid(1), 0, 1 << 20).await.unwrap();
        assert!(
            r.data.to_vec() == model,
            "chunk 1 lost or wrong after the rebuild"
        );
        assert_eq!(r.version, 2);
        assert!(shard.verify().await.unwrap().problems.is_empty());
    });
}

/// The rebuild keeps a partly overwritten extent with holes where its
/// stale copies are; a hole's space, reused by another chunk's extent, must
/// stay that extent's even when the only intact copy covering the hole is
/// newer than that extent (review finding: marking the holes used made the
/// rebuild skip the other chunk's extent).
#[test]
fn rebuild_gives_a_reused_hole_to_the_extent_that_reused_it() {
    const N: usize = 300; // sectors: freed runs big enough to be reused
    let disk = shardstore_shard::SimDisk::new(4 * MIB + 64 * 1024, 4);
    let cfg = || ShardConfig {
        checkpoint_bytes: 64 * 1024,
        ..sim_shard_config()
    };
    let changed = |before: &[Vec<u8>]| -> Vec<u64> {
        (0..disk.sectors())
            .filter(|&s| disk.sector(s) != before[s as usize])
            .collect()
    };
    let snapshot = || -> Vec<Vec<u8>> { (0..disk.sectors()).map(|s| disk.sector(s)).collect() };
    let mut model = pattern(1, N * 4096);
    let mut x = Vec::new();
    run(|| async {
        let shard = Shard::open_sim(cfg(), &disk).await.unwrap();
        // E: chunk 1, one header sector and N data sectors.
        let before = snapshot();
        shard.write(cid(1), 0, &model).await.unwrap();
        let e = changed(&before);
        assert_eq!(e.len(), N + 1);
        // E': sectors 1.. again, elsewhere; E keeps sector 0 live.
        let before = snapshot();
        let patch = pattern(2, (N - 1) * 4096);
        shard.write(cid(1), 4096, &patch).await.unwrap();
        let e1 = changed(&before);
        shard.checkpoint().await.unwrap();
        shard.checkpoint().await.unwrap();
        // X: chunk 1000 rewritten until its latest version lands in E's
        // freed sectors.
        let stale: Vec<(u64, Vec<u8>)> = e[2..].iter().map(|&s| (s, disk.sector(s))).collect();
        let mut n = 0u64;
        while stale.iter().all(|(s, b)| disk.sector(*s) == *b) {
            assert!(n < 5000, "E's freed sectors were never reused");
            x = pattern(1000 + n, 4096);
            shard.write(cid(1000), 0, &x).await.unwrap();
            n += 1;
        }
        // E'': sectors 1.. once more (newer than X, in pieces that fit the
        // fragmented space), freeing E'.
        let patch = pattern(3, (N - 1) * 4096);
        for (i, piece) in patch.chunks(30 * 4096).enumerate() {
            let at = 4096 + (i * 30 * 4096) as u64;
            shard.write(cid(1), at, piece).await.unwrap();
        }
        model[4096..].copy_from_slice(&patch);
        shard.checkpoint().await.unwrap();
        shard.checkpoint().await.unwrap();
        // E' is free space now; its header sector gets other data (as a
        // reuse would): the only intact copy covering E's holes is E'',
        // newer than X.
        disk.put_sector(e1[0], &pattern(7, 4096));
        shard.close().await.unwrap();
    });
    run(|| async {
        let shard = open_rebuilt(cfg(), &disk).await;
        let r = shard.read(cid(1), 0, 8 << 20).await.unwrap();
        assert!(r.data.to_vec() == model, "chunk 1 wrong after the rebuild");
        let r = shard.read(cid(1000), 0, 1 << 20).await;
        assert!(
            matches!(&r, Ok(r) if r.data.to_vec() == x),
            "the chunk that reused E's space is lost or wrong after the rebuild"
        );
        assert!(shard.verify().await.unwrap().problems.is_empty());
    });
}

/// A write torn by a crash is discarded by recovery; newer writes of its
/// chunk then cover its torn sector. A later rebuild must not take the torn
/// extent for an acknowledged one that was partly overwritten and revive
/// its intact sectors: recovery erases the header of what it discards.
#[test]
fn rebuild_does_not_revive_a_torn_write_recovery_discarded() {
    let disk = shardstore_shard::SimDisk::new(4 * MIB + 64 * 1024, 5);
    let cfg = sim_shard_config;
    let mut model = pattern(1, 4 * 4096);
    let other = pattern(4, 4096);
    let mut torn_header = 0;
    run(|| async {
        let shard = Rc::new(Shard::open_sim(cfg(), &disk).await.unwrap());
        shard.write(cid(1), 0, &model).await.unwrap();
        shard.checkpoint().await.unwrap();
        // The write the crash tears (all of it lands but its last sector),
        // and one in flight with it: that one lands whole after it on disk
        // and, written while the torn one was in flight, does not vouch
        // for it.
        let before: Vec<Vec<u8>> = (0..disk.sectors()).map(|s| disk.sector(s)).collect();
        let torn = {
            let shard = shard.clone();
            glommio::spawn_local(async move {
                shard.write(cid(1), 0, &pattern(2, 4 * 4096)).await.unwrap();
            })
        };
        let next = {
            let (shard, other) = (shard.clone(), other.clone());
            glommio::spawn_local(async move { shard.write(cid(2), 0, &other).await.unwrap() })
        };
        torn.await;
        next.await;
        let written: Vec<u64> = (0..disk.sectors())
            .filter(|&s| disk.sector(s) != before[s as usize])
            .collect();
        assert_eq!(written.len(), 7, "two headers, 4 + 1 data sectors");
        torn_header = written[0];
        disk.put_sector(written[4], &before[written[4] as usize]);
        drop(shard); // the crash: no checkpoint after these writes
    });
    disk.crash();
    run(|| async {
        let shard = Shard::open_sim(cfg(), &disk).await.unwrap();
        assert_eq!(shard.recovery_report().discarded, 1, "the torn write");
        assert!(
            disk.sector(torn_header).iter().all(|&b| b == 0),
            "the torn write's header is erased"
        );
        assert_chunk(&shard, 1, &model, "torn write discarded whole").await;
        // A newer write covers the torn write's bad sector; too large for
        // the torn write's freed run, it lands past the other write.
        let patch = pattern(3, 7 * 4096);
        shard.write(cid(1), 3 * 4096, &patch).await.unwrap();
        model.truncate(3 * 4096);
        model.extend_from_slice(&patch);
        shard.checkpoint().await.unwrap();
        shard.close().await.unwrap();
    });
    run(|| async {
        let shard = open_rebuilt(cfg(), &disk).await;
        assert_chunk(&shard, 1, &model, "the rebuild revived a torn write").await;
        assert_chunk(&shard, 2, &other, "the write next to it").await;
        assert!(shard.verify().await.unwrap().problems.is_empty());
    });
}

/// A request cancelled while its device write runs leaves a complete,
/// self-describing extent that nothing indexes. Once checkpoints have
/// passed it, a rebuild must not show it: the shard erases the header of
/// every abandoned write before its generation leaves the in-flight set.
#[test]
fn rebuild_does_not_revive_a_cancelled_write() {
    for write_through in [true, false] {
        let disk = shardstore_shard::SimDisk::new(4 * MIB + 64 * 1024, 6);
        let cfg = ShardConfig {
            write_through,
            ..sim_shard_config()
        };
        let what = format!("write_through {write_through}: the rebuild revived a cancelled write");
        cancelled_write_stays_away(&disk, &cfg, || {}, &what);
    }
}

/// The erase of a cancelled write's header fails twice (ENOSPC, as on a
/// full copy-on-write filesystem) and is tried again: a rebuild still does
/// not revive the write. Given up on after one failure, it did.
#[test]
fn a_failed_erase_is_tried_again() {
    let disk = shardstore_shard::SimDisk::new(4 * MIB + 64 * 1024, 7);
    // The cancelled write lands; the two erases after it fail.
    let fail_erases = || disk.fail_writes_after(1, 2);
    let what = "the rebuild revived a cancelled write whose erase failed";
    cancelled_write_stays_away(&disk, &sim_shard_config(), fail_erases, what);
    let failed = disk.fault_counts().write_enospc;
    assert_eq!(failed, 2, "both planned erase failures happened");
}

/// Starts a write of `data` to chunk `n` with the disk holding writes, and
/// cancels it while its device write is held (it lands once the disk lets
/// writes through again).
async fn cancel_a_held_write(
    shard: &Rc<Shard>,
    disk: &shardstore_shard::SimDisk,
    n: u128,
    data: &[u8],
) {
    disk.hold_writes(true);
    let task = {
        let shard = shard.clone();
        let data = data.to_vec();
        glommio::spawn_local(async move { shard.write(cid(n), 0, &data).await })
    };
    for _ in 0..8 {
        futures_lite::future::yield_now().await;
    }
    drop(task);
}

/// The erase of a cancelled write's header keeps failing: it is given up
/// after its five tries, as it must be (a header that cannot be written
/// must not stop the shard). The shard stays writable, checkpoints pass the
/// abandoned write, reads serve the acknowledged version, and later writes
/// land; a full rebuild may then show the cancelled write, but only whole
/// (its request failed, so either version is allowed), never torn.
#[test]
fn an_erase_that_keeps_failing_is_given_up() {
    let disk = shardstore_shard::SimDisk::new(4 * MIB + 64 * 1024, 8);
    let cfg = sim_shard_config();
    let (v1, v2) = (pattern(1, 4 * 4096), pattern(2, 4 * 4096));
    run(|| async {
        let shard = Rc::new(Shard::open_sim(cfg.clone(), &disk).await.unwrap());
        shard.write(cid(1), 0, &v1).await.unwrap();
        cancel_a_held_write(&shard, &disk, 1, &v2).await;
        // The cancelled write lands; every erase of its header fails.
        disk.fail_writes_after(1, 5);
        disk.hold_writes(false);
        glommio::timer::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(disk.fault_counts().write_enospc, 5, "five tries");
        for _ in 0..3 {
            shard.checkpoint().await.unwrap();
        }
        assert!(!shard.stats().fail_stopped);
        assert_chunk(&shard, 1, &v1, "the cancelled write is not applied").await;
        shard.write(cid(2), 0, &v2).await.unwrap();
        assert_chunk(&shard, 2, &v2, "a later write").await;
        assert!(shard.verify().await.unwrap().problems.is_empty());
        shard.close().await.unwrap();
    });
    run(|| async {
        let shard = open_rebuilt(cfg.clone(), &disk).await;
        let got = shard.read(cid(1), 0, 1 << 20).await.unwrap().data.to_vec();
        assert!(got == v1 || got == v2, "chunk 1 torn after the rebuild");
        assert_chunk(&shard, 2, &v2, "the later write after the rebuild").await;
        assert!(shard.verify().await.unwrap().problems.is_empty());
    });
}

/// Writes chunk 1, then a second version whose request is cancelled while
/// its device write is held; `on_release` runs just before the device lets
/// writes through. The first version must stay, before and after a rebuild
/// of the index from the data area.
fn cancelled_write_stays_away(
    disk: &shardstore_shard::SimDisk,
    cfg: &ShardConfig,
    on_release: impl Fn(),
    what: &str,
) {
    let model = pattern(1, 4 * 4096);
    run(|| async {
        let shard = Rc::new(Shard::open_sim(cfg.clone(), disk).await.unwrap());
        shard.write(cid(1), 0, &model).await.unwrap();
        disk.hold_writes(true);
        let task = {
            let shard = shard.clone();
            glommio::spawn_local(async move { shard.write(cid(1), 0, &pattern(2, 4 * 4096)).await })
        };
        for _ in 0..8 {
            futures_lite::future::yield_now().await;
        }
        drop(task); // cancelled while its device write is held
        on_release();
        disk.hold_writes(false);
        glommio::timer::sleep(std::time::Duration::from_millis(100)).await;
        for _ in 0..3 {
            shard.checkpoint().await.unwrap();
        }
        assert_chunk(&shard, 1, &model, "the cancelled write is not applied").await;
        shard.close().await.unwrap();
    });
    run(|| async {
        let shard = open_rebuilt(cfg.clone(), disk).await;
        assert_chunk(&shard, 1, &model, what).await;
    });
}

/// An index damaged in a way only recovery finds (two records claim the
/// same disk space: the allocator meets it twice), with the shard started
/// with `rebuild_index`: the rebuild must start from empty space, not from
/// what the failed recovery had already marked used (review finding: every
/// live extent overlapped that space and was skipped, and deleted chunks'
/// old extents in free space came back).
#[test]
fn a_rebuild_after_a_failed_recovery_starts_from_empty_space() {
    let disk = shardstore_shard::SimDisk::new(8 * MIB, 6);
    let cfg = sim_shard_config;
    run(|| async {
        let shard = Shard::open_sim(cfg(), &disk).await.unwrap();
        fill(&shard).await;
        shard.close().await.unwrap();
    });
    // Chunk 0's record and meta copied to a chunk id that sorts after all
    // the others, so every real extent is marked before the clash.
    let kv = disk.kv();
    let key = |prefix: u8, chunk: u128, logical: Option<u64>| {
        let mut k = vec![prefix];
        k.extend_from_slice(&chunk.to_be_bytes());
        if let Some(l) = logical {
            k.extend_from_slice(&l.to_be_bytes());
        }
        k
    };
    let ext = kv
        .get(&key(b'e', 0, Some(0)))
        .expect("chunk 0's extent record");
    let meta = kv.get(&key(b'm', 0, None)).expect("chunk 0's meta");
    kv.apply(vec![
        (key(b'e', u128::MAX, Some(0)), Some(ext)),
        (key(b'm', u128::MAX, None), Some(meta)),
    ]);
    kv.flush();
    run(|| async {
        let e = Shard::open_sim(cfg(), &disk).await.err().expect("refused");
        let msg = e.to_string();
        assert!(
            msg.contains("damaged") && msg.contains("--rebuild-index"),
            "{msg}"
        );
    });
    run(|| async {
        let mut c = cfg();
        c.rebuild_index = true;
        let shard = Shard::open_sim(c, &disk).await.unwrap();
        assert!(shard.recovery_report().rebuilt);
        check(&shard).await;
        assert!(shard.verify().await.unwrap().problems.is_empty());
        shard.close().await.unwrap();
    });
    run(|| async {
        let shard = Shard::open_sim(cfg(), &disk).await.unwrap();
        assert!(!shard.recovery_report().rebuilt);
        check(&shard).await;
    });
}

/// What recovery replays may be writes the device completed but never
/// flushed (a process crash before their group commit): the open makes the
/// data area durable before its first checkpoint frees the older pieces
/// those writes supersede, also when nothing was discarded (review
/// finding: only erasing a discarded header synced). And a failed sync
/// there fails the open, never ignored.
#[test]
fn recovery_syncs_the_data_area_before_its_checkpoint() {
    let disk = shardstore_shard::SimDisk::new(8 * MIB, 8);
    let cfg = sim_shard_config;
    // The index as of the open's checkpoint, restored after the writes
    // (on this small disk every write starts a checkpoint).
    let kv = disk.kv();
    let saved = run(|| async {
        let shard = Shard::open_sim(cfg(), &disk).await.unwrap();
        let saved = kv.range(Bound::Unbounded, Bound::Unbounded);
        fill(&shard).await;
        std::mem::forget(shard); // no close, no checkpoint
        saved
    });
    kv.clear();
    kv.apply(saved.into_iter().map(|(k, v)| (k, Some(v))).collect());
    kv.flush();
    run(|| async {
        let shard = Shard::open_sim(cfg(), &disk).await.unwrap();
        let r = shard.recovery_report();
        assert!(r.replayed > 0 && r.discarded == 0, "{r:?}");
        assert!(
            shard.stats().flushes >= 1,
            "the open replayed writes and never synced the data area"
        );
        check(&shard).await;
        std::mem::forget(shard);
    });
    disk.set_faults(shardstore_shard::SimFaults {
        flush_eio: 1,
        ..Default::default()
    });
    run(|| async {
        let e = Shard::open_sim(cfg(), &disk).await.err().expect("refused");
        assert!(e.to_string().contains("after recovery"), "{e}");
    });
}

/// A write that finds the index inconsistent (a chunk's meta counts fewer
/// live sectors than the write supersedes) fails with IndexCorrupt after
/// its device write; its run goes back without an extent registered on it,
/// so later writes reusing that space do not trip over a stale one (review
/// finding: registered before the index change failed, the next extent
/// there panicked the shard as "registered twice").
#[test]
fn a_write_that_finds_the_index_inconsistent_leaves_its_space_reusable() {
    let disk = shardstore_shard::SimDisk::new(4 * MIB + 64 * 1024, 9);
    let cfg = sim_shard_config;
    run(|| async {
        let shard = Shard::open_sim(cfg(), &disk).await.unwrap();
        shard.write(cid(5), 0, &pattern(5, 8192)).await.unwrap();
        shard.close().await.unwrap();
    });
    // Chunk 5's meta says none of its sectors is live.
    let kv = disk.kv();
    let mut key = vec![b'm'];
    key.extend_from_slice(&5u128.to_be_bytes());
    let mut meta = kv.get(&key).expect("chunk 5's meta");
    meta[32..40].copy_from_slice(&0u64.to_le_bytes());
    kv.apply(vec![(key, Some(meta))]);
    kv.flush();
    run(|| async {
        let shard = Shard::open_sim(cfg(), &disk).await.unwrap();
        let e = shard.write(cid(5), 0, b"over").await.unwrap_err();
        assert!(matches!(e, ShardError::IndexCorrupt(_)), "{e}");
        // Overwrites going round the whole area (about 1,000 sectors)
        // three times, then most of it filled: all of its space is reused.
        for n in 0..1500u128 {
            let c = cid(1000 + n % 100);
            shard.write(c, 0, &pattern(n as u64, 4096)).await.unwrap();
            if n % 50 == 49 {
                shard.checkpoint().await.unwrap();
                shard.checkpoint().await.unwrap();
            }
        }
        for n in 0..300u128 {
            let c = cid(5000 + n);
            shard.write(c, 0, &pattern(n as u64, 4096)).await.unwrap();
        }
        shard.close().await.unwrap();
    });
}

/// A write cancelled while its device write ran lands whole with nothing
/// indexing it; a later, smaller write of the same chunk is acknowledged;
/// the process dies before the cancelled write's header is erased. The
/// later write computed the chunk's length without the cancelled one, so
/// recovery replaying both showed part of the cancelled write (review
/// finding). A write of a chunk with an abandoned write waiting for its
/// erase now waits for it: recovery finds only what was acknowledged.
#[test]
fn a_write_after_a_cancelled_one_of_its_chunk_waits_for_the_erase() {
    let disk = shardstore_shard::SimDisk::new(4 * MIB + 64 * 1024, 10);
    let cfg = sim_shard_config();
    let v1 = pattern(1, 2 * 4096);
    let (extending, small) = (pattern(2, 4 * 4096), pattern(3, 100));
    run(|| async {
        let shard = Rc::new(Shard::open_sim(cfg.clone(), &disk).await.unwrap());
        shard.write(cid(1), 0, &v1).await.unwrap();
        shard.checkpoint().await.unwrap();
        cancel_a_held_write(&shard, &disk, 1, &extending).await;
        // It lands; the first erase of its header fails, the next (after
        // ERASE_RETRY) would work.
        disk.fail_writes_after(1, 1);
        disk.hold_writes(false);
        while disk.fault_counts().write_enospc == 0 {
            futures_lite::future::yield_now().await;
        }
        shard.write(cid(1), 0, &small).await.unwrap();
        std::mem::forget(shard); // the process dies
    });
    disk.crash();
    run(|| async {
        let shard = Shard::open_sim(cfg.clone(), &disk).await.unwrap();
        let mut want = v1.clone();
        want[..100].copy_from_slice(&small);
        let got = shard.read(cid(1), 0, 1 << 20).await.unwrap().data.to_vec();
        assert!(
            got == want,
            "chunk 1 after recovery: {} bytes, {} (the cancelled write partly visible)",
            got.len(),
            if got.len() == want.len() {
                "wrong bytes"
            } else {
                "wrong length"
            }
        );
        assert!(shard.verify().await.unwrap().problems.is_empty());
    });
}
