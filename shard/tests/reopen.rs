//! Close, drop and open again in a new executor: everything reads back; a
//! foreign configuration is refused.
mod common;

use common::*;
use shardstore_proto::ShardId;
use shardstore_shard::{Shard, ShardError};

#[test]
fn data_survives_reopen_and_space_is_rebuilt() {
    let dir = tempdir();
    let (used, chunks) = run(|| async {
        let shard = open(dir.path(), 16 * MIB).await;
        for n in 0..20u128 {
            shard
                .write(
                    cid(n),
                    n as u64 * 1000,
                    &pattern(n as u64, 5000 + n as usize * 300),
                )
                .await
                .unwrap();
        }
        // Overwrites and a delete, so the index holds split records.
        shard.write(cid(1), 1500, &pattern(99, 3000)).await.unwrap();
        shard.write(cid(2), 0, &pattern(98, 100)).await.unwrap();
        shard.delete(cid(5)).await.unwrap();
        shard.close().await.unwrap();
        let s = shard.stats();
        (s.used_bytes, s.chunks)
    });
    run(|| async {
        let shard = open(dir.path(), 16 * MIB).await;
        let s = shard.stats();
        assert_eq!((s.used_bytes, s.chunks), (used, chunks));
        for n in 0..20u128 {
            if n == 5 {
                assert!(matches!(
                    shard.read(cid(5), 0, 1).await,
                    Err(ShardError::NotFound(_))
                ));
                continue;
            }
            let off = n as usize * 1000;
            let mut model = vec![0u8; off];
            model.extend(pattern(n as u64, 5000 + n as usize * 300));
            if n == 1 {
                model[1500..4500].copy_from_slice(&pattern(99, 3000));
            }
            if n == 2 {
                model[..100].copy_from_slice(&pattern(98, 100));
            }
            let r = shard.read(cid(n), 0, 1 << 20).await.unwrap();
            assert!(r.data.to_vec() == model, "chunk {n} differs after reopen");
            let v = if n == 1 || n == 2 { 2 } else { 1 };
            assert_eq!(r.version, v);
        }
        // New writes do not clobber old data (allocator rebuilt correctly).
        for n in 100..120u128 {
            shard
                .write(cid(n), 0, &pattern(n as u64, 20_000))
                .await
                .unwrap();
        }
        let r = shard.read(cid(3), 0, 1 << 20).await.unwrap();
        assert_eq!(&r.data.to_vec()[3000..], &pattern(3, 5900)[..]);
        // Versions continue from the stored ones.
        assert_eq!(shard.write(cid(1), 0, b"x").await.unwrap().version, 3);
        shard.close().await.unwrap();
    });
}

#[test]
fn foreign_configuration_is_refused() {
    let dir = tempdir();
    run(|| async {
        let shard = open(dir.path(), 4 * MIB).await;
        shard.write(cid(1), 0, b"hello").await.unwrap();
        shard.close().await.unwrap();
    });
    run(|| async {
        let mut cfg = config(dir.path(), 4 * MIB);
        cfg.shard_count = 8;
        match Shard::open(cfg).await {
            Err(ShardError::ShardCountMismatch {
                found: 4,
                expected: 8,
            }) => {}
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened with the wrong shard count"),
        }
    });
    run(|| async {
        let mut cfg = config(dir.path(), 4 * MIB);
        cfg.node_id ^= 1;
        let e = Shard::open(cfg).await.err().expect("foreign node refused");
        assert!(
            matches!(&e, ShardError::Format(m) if m.contains("node")),
            "{e}"
        );
    });
    run(|| async {
        let mut cfg = config(dir.path(), 4 * MIB);
        cfg.shard = ShardId(2);
        let e = Shard::open(cfg).await.err().expect("wrong shard refused");
        assert!(
            matches!(&e, ShardError::Format(m) if m.contains("shard 1")),
            "{e}"
        );
    });
    // A foreign file where the data file should be.
    let data = shard_dir(dir.path()).join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[..8192].fill(0xab);
    std::fs::write(&data, &bytes).unwrap();
    run(|| async {
        let e = Shard::open(config(dir.path(), 4 * MIB))
            .await
            .err()
            .expect("foreign file refused");
        assert!(
            matches!(&e, ShardError::Format(m) if m.contains("magic")),
            "{e}"
        );
    });
}

#[test]
fn one_damaged_superblock_copy_is_enough() {
    let dir = tempdir();
    run(|| async {
        let shard = open(dir.path(), 4 * MIB).await;
        shard.write(cid(1), 0, b"hello").await.unwrap();
        shard.close().await.unwrap();
    });
    let data = shard_dir(dir.path()).join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[20] ^= 0xff; // copy A
    std::fs::write(&data, &bytes).unwrap();
    run(|| async {
        let shard = open(dir.path(), 4 * MIB).await;
        assert_eq!(
            shard.read(cid(1), 0, 5).await.unwrap().data.to_vec(),
            b"hello"
        );
    });
}

/// More concurrent writes than a checkpoint record can list runs for
/// (`MAX_CHECKPOINT_RUNS`): a checkpoint taken while they are all at the
/// device must still be one the next open can read (each write in flight
/// is a run its recovery scan must cover).
#[test]
fn a_checkpoint_amid_thousands_of_writes_still_opens() {
    let writes = shardstore_shard::MAX_CHECKPOINT_RUNS as u128 + 1000;
    let disk = shardstore_shard::SimDisk::new(64 * MIB, 11);
    let cfg = || shardstore_shard::ShardConfig {
        capacity_bytes: 63 * MIB,
        // Room in the reservation for every one of them at once.
        checkpoint_bytes: 48 * MIB,
        ..sim_shard_config()
    };
    run(|| async {
        let shard = std::rc::Rc::new(Shard::open_sim(cfg(), &disk).await.unwrap());
        disk.hold_writes(true);
        let tasks: Vec<_> = (0..writes)
            .map(|n| {
                let shard = shard.clone();
                glommio::spawn_local(async move { shard.write(cid(n), 0, b"x").await })
            })
            .collect();
        for _ in 0..64 {
            futures_lite::future::yield_now().await;
        }
        shard.checkpoint().await.unwrap();
        // The crash, with the writes still at the device: the next open
        // starts from that checkpoint.
        drop(tasks);
    });
    disk.hold_writes(false);
    disk.crash();
    run(|| async {
        let shard = Shard::open_sim(cfg(), &disk).await.unwrap();
        assert_eq!(shard.stats().chunks, 0, "none of them was acknowledged");
        shard.write(cid(1), 0, b"y").await.unwrap();
    });
}

/// A shard folder whose index another open shard holds (a second server on
/// the same data folder) is refused as in use, even with `rebuild_index`,
/// which used to discard the running shard's index and rebuild it. The
/// shard that holds it goes on, and its data reads back after a reopen.
#[test]
fn a_folder_in_use_is_refused_not_rebuilt() {
    let dir = tempdir();
    run(|| async {
        let first = open(dir.path(), 4 * MIB).await;
        first.write(cid(1), 0, b"kept").await.unwrap();
        let mut cfg = config(dir.path(), 4 * MIB);
        cfg.rebuild_index = true;
        match Shard::open(cfg).await {
            Err(e @ ShardError::InUse(_)) => {
                assert!(e.to_string().contains("another server"), "{e}");
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened a folder in use"),
        }
        first.write(cid(2), 0, b"more").await.unwrap();
        first.close().await.unwrap();
    });
    run(|| async {
        let shard = open(dir.path(), 4 * MIB).await;
        for (n, want) in [(1, b"kept"), (2, b"more")] {
            let r = shard.read(cid(n), 0, 4).await.unwrap();
            assert_eq!(&r.data.to_vec()[..], &want[..]);
        }
        assert!(shard.stats().recovery_replayed <= 2, "the index was kept");
        shard.close().await.unwrap();
    });
}
