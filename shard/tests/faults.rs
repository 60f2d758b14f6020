//! Targeted faults on the simulated disk and the one-write-per-ack rule.
mod common;

use common::*;
use shardstore_proto::{ChunkId, ErrorCode};
use shardstore_shard::{Shard, ShardError, SimDisk, SimFaults};

/// The instrumented I/O layer counts exactly one device write per
/// acknowledged write or delete, and no index checkpoint on the way: with
/// an O_DSYNC data area (the default), or adaptive sync for requests that
/// run alone, no flush at all; with plain group commit one flush each
/// (sequential requests share none).
#[test]
fn one_device_write_per_acknowledged_write() {
    // (O_DSYNC data area, adaptive sync, flushes per ack): sequential
    // requests are always alone, so adaptive sync writes them O_DSYNC.
    for (write_through, adaptive_sync, flushes_per_ack) in
        [(true, false, 0), (false, false, 1), (false, true, 0)]
    {
        let dir = tempdir();
        run(|| async {
            let mut cfg = config(dir.path(), 64 * MIB);
            cfg.checkpoint_interval_ms = 3_600_000;
            cfg.write_through = write_through;
            cfg.adaptive_sync = adaptive_sync;
            let shard = Shard::open(cfg).await.unwrap();
            let before = shard.stats();
            for n in 0..40u128 {
                // New chunks, whole-sector overwrites and unaligned overwrites
                // (read-modify-write reads, but writes once).
                let (off, len) = match n % 3 {
                    0 => (0, 4096),
                    1 => (4096, 8192),
                    _ => (100, 300),
                };
                shard
                    .write(cid(n % 7), off, &pattern(n as u64, len))
                    .await
                    .unwrap();
            }
            let mid = shard.stats();
            assert_eq!(mid.device_writes - before.device_writes, 40);
            assert_eq!(mid.flushes - before.flushes, 40 * flushes_per_ack);
            assert_eq!(
                mid.checkpoints, before.checkpoints,
                "no index flush on the ack path"
            );
            for n in 0..7u128 {
                shard.delete(cid(n)).await.unwrap();
            }
            let after = shard.stats();
            assert_eq!(
                after.device_writes - mid.device_writes,
                7,
                "a delete is one tombstone write"
            );
            assert_eq!(after.flushes - mid.flushes, 7 * flushes_per_ack);
            assert_eq!(after.checkpoints, before.checkpoints);
        });
    }
}

/// A shard with chunk 1 written, on a disk whose every flush now fails.
async fn written_then_flushes_fail(disk: &SimDisk) -> Shard {
    let shard = Shard::open_sim(sim_shard_config(), disk).await.unwrap();
    shard.write(cid(1), 0, &pattern(1, 10_000)).await.unwrap();
    disk.set_faults(SimFaults {
        flush_eio: 1,
        ..SimFaults::default()
    });
    shard
}

#[test]
fn flush_eio_fail_stops_writes_but_reads_go_on() {
    let disk = SimDisk::new(5 * MIB, 7);
    run(|| async {
        let shard = written_then_flushes_fail(&disk).await;
        let e = shard.write(cid(2), 0, &pattern(2, 5000)).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::Io, "{e}");
        assert!(shard.stats().fail_stopped);
        disk.set_faults(SimFaults::default());
        // Never retried: the shard stays read-only even though the disk is fine now.
        let e = shard.write(cid(3), 0, b"x").await.unwrap_err();
        assert!(matches!(e, ShardError::ReadOnly), "{e}");
        assert_eq!(e.code(), ErrorCode::ReadOnly);
        assert!(matches!(
            shard.delete(cid(1)).await,
            Err(ShardError::ReadOnly)
        ));
        assert_eq!(
            shard.read(cid(1), 0, 1 << 20).await.unwrap().data.to_vec(),
            pattern(1, 10_000)
        );
        assert!(shard.stat(cid(1)).is_ok());
    });
    disk.crash();
    // After a restart the shard writes again; the failed write is all or nothing.
    run(|| async {
        let shard = Shard::open_sim(sim_shard_config(), &disk).await.unwrap();
        assert!(!shard.stats().fail_stopped);
        match shard.read(cid(2), 0, 1 << 20).await {
            Ok(r) => assert_eq!(r.data.to_vec(), pattern(2, 5000)),
            Err(ShardError::NotFound(_)) => {}
            Err(e) => panic!("{e}"),
        }
        shard.write(cid(3), 0, b"x").await.unwrap();
    });
}

/// The fdatasync at close goes through the group like every other: its
/// failure stops the shard (it used to return an error and leave the shard
/// writable, and a second close retried the flush).
#[test]
fn a_failed_flush_at_close_fail_stops_the_shard() {
    let disk = SimDisk::new(5 * MIB, 8);
    run(|| async {
        let shard = written_then_flushes_fail(&disk).await;
        assert!(shard.close().await.is_err());
        assert!(
            shard.stats().fail_stopped,
            "a failed flush at close did not stop the shard"
        );
        disk.set_faults(SimFaults::default());
        let e = shard.write(cid(2), 0, b"x").await.unwrap_err();
        assert!(matches!(e, ShardError::ReadOnly), "{e}");
    });
}

#[test]
fn enospc_from_the_device_is_no_space_and_writes_resume() {
    let disk = SimDisk::new(5 * MIB, 8);
    run(|| async {
        let shard = Shard::open_sim(sim_shard_config(), &disk).await.unwrap();
        shard.write(cid(1), 0, b"hello").await.unwrap();
        disk.set_faults(SimFaults {
            write_enospc: 1,
            ..SimFaults::default()
        });
        let e = shard.write(cid(2), 0, b"world").await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::NoSpace, "{e}");
        // The failed write's header is erased in the background, and that
        // write fails the same way: given up on, not a reason to stop.
        glommio::timer::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!shard.stats().fail_stopped);
        assert_eq!(
            shard.read(cid(1), 0, 5).await.unwrap().data.to_vec(),
            b"hello"
        );
        disk.set_faults(SimFaults::default());
        shard.write(cid(2), 0, b"world").await.unwrap();
        assert_eq!(
            shard.read(cid(2), 0, 5).await.unwrap().data.to_vec(),
            b"world"
        );
    });
}

/// Silent faults (flipped bits, zeroed sectors, misdirected and dropped
/// writes): every read returns the right bytes or a CORRUPT error naming the
/// chunk; wrong bytes are never served.
#[test]
fn silent_faults_are_detected_never_served() {
    for seed in 1..=6u64 {
        let disk = SimDisk::new(9 * MIB, seed);
        run(|| async {
            let mut cfg = sim_shard_config();
            cfg.capacity_bytes = 8 * MIB;
            let shard = Shard::open_sim(cfg, &disk).await.unwrap();
            disk.set_faults(SimFaults {
                bit_flip: 6,
                zero_sector: 6,
                misdirect: 8,
                drop_write: 8,
                ..SimFaults::default()
            });
            let mut model = std::collections::BTreeMap::new();
            for n in 0..60u64 {
                let c = ChunkId(u128::from(n % 12));
                let data = pattern(seed * 100 + n, 4096 * (1 + (n % 3) as usize));
                if shard.write(c, 0, &data).await.is_ok() {
                    let m: &mut Vec<u8> = model.entry(c).or_default();
                    if m.len() < data.len() {
                        m.resize(data.len(), 0);
                    }
                    m[..data.len()].copy_from_slice(&data);
                } else {
                    // A failed read-modify-write (corrupt old sector) changes nothing.
                }
            }
            disk.set_faults(SimFaults::default());
            let mut corrupt = 0;
            for (c, m) in &model {
                match shard.read(*c, 0, 1 << 20).await {
                    Ok(r) => assert!(
                        r.data.to_vec() == *m,
                        "seed {seed}: wrong bytes served for {c}"
                    ),
                    Err(ShardError::Corrupt { chunk, .. }) => {
                        assert_eq!(chunk, *c);
                        corrupt += 1;
                    }
                    Err(e) => panic!("seed {seed}: {e}"),
                }
            }
            let f = disk.fault_counts();
            assert!(f.bit_flip + f.zero_sector + f.misdirect + f.drop_write > 0);
            assert!(
                corrupt > 0,
                "seed {seed}: faults injected {f:?} but none detected"
            );
            // The scrubber finds them too.
            assert!(shard.scrub_now().await.unwrap() > 0);
            assert!(shard.stats().scrub_errors > 0);
        });
    }
}

/// Where the second sector of chunk `n` (written by `write_chunks`, 8 KiB)
/// is on the disk.
fn second_sector_of(disk: &SimDisk, n: u64) -> u64 {
    let want = pattern(n, 8192);
    (0..disk.sectors())
        .find(|&s| disk.sector(s) == want[4096..])
        .expect("the chunk's second sector is on the disk")
}

/// A sector the device cannot read stops nothing: the scrubber counts it
/// bad and goes on with every extent after it (it used to end the pass
/// there, every period, so later extents were never scrubbed).
#[test]
fn an_unreadable_sector_is_counted_and_the_scrub_goes_on() {
    let disk = SimDisk::new(5 * MIB, 10);
    run(|| async {
        let shard = Shard::open_sim(sim_shard_config(), &disk).await.unwrap();
        write_chunks(&shard, 10, 8192).await;
        disk.fail_reads_of(second_sector_of(&disk, 0));
        assert_eq!(shard.scrub_now().await.unwrap(), 1);
        let s = shard.stats();
        assert_eq!(
            (s.scrub_passes, s.scrub_sectors, s.scrub_errors),
            (1, 20, 1)
        );
    });
}

/// The scrubber also checks each extent's header and each tombstone: a
/// damaged header would make a rebuild drop its extent, a damaged
/// tombstone would let a rebuild bring its deleted chunk back (review
/// finding: only data sectors were read).
#[test]
fn the_scrubber_checks_headers_and_tombstones() {
    let disk = SimDisk::new(5 * MIB, 11);
    run(|| async {
        let shard = Shard::open_sim(sim_shard_config(), &disk).await.unwrap();
        write_chunks(&shard, 10, 8192).await;
        let before: Vec<Vec<u8>> = (0..disk.sectors()).map(|s| disk.sector(s)).collect();
        shard.delete(cid(9)).await.unwrap();
        let tomb = (0..disk.sectors())
            .find(|&s| disk.sector(s) != before[s as usize])
            .expect("the tombstone's sector");
        assert_eq!(shard.scrub_now().await.unwrap(), 0);
        // Chunk 2's header: the sector before its first data sector.
        disk.flip_bit(second_sector_of(&disk, 2) - 2, 300);
        assert_eq!(shard.scrub_now().await.unwrap(), 1, "a damaged header");
        disk.flip_bit(tomb, 300);
        assert_eq!(
            shard.scrub_now().await.unwrap(),
            2,
            "and a damaged tombstone"
        );
        assert_eq!(shard.stats().scrub_errors, 3);
        // The offline check finds both too.
        assert_eq!(shard.verify().await.unwrap().problems.len(), 2);
    });
}

/// A bit flip in a live sector found by the scrubber, counted, and named.
#[test]
fn scrubber_counts_bad_sectors() {
    let disk = SimDisk::new(5 * MIB, 9);
    run(|| async {
        let shard = Shard::open_sim(sim_shard_config(), &disk).await.unwrap();
        write_chunks(&shard, 10, 8192).await;
        assert_eq!(shard.scrub_now().await.unwrap(), 0);
        let s = shard.stats();
        assert_eq!(
            (s.scrub_passes, s.scrub_sectors, s.scrub_errors),
            (1, 20, 0)
        );
        // Find chunk 4's second sector on disk and flip a bit in it.
        disk.flip_bit(second_sector_of(&disk, 4), 100);
        assert_eq!(shard.scrub_now().await.unwrap(), 1);
        assert_eq!(shard.stats().scrub_errors, 1);
        assert!(matches!(
            shard.read(cid(4), 0, 8192).await,
            Err(ShardError::Corrupt { sector: 1, .. })
        ));
    });
}

/// The background scrubber (its own low-shares task queue) passes over every
/// live sector by itself and counts what it found.
#[test]
fn background_scrubber_runs_on_its_own() {
    let disk = SimDisk::new(5 * MIB, 10);
    run(|| async {
        let mut cfg = sim_shard_config();
        cfg.scrub_period_secs = 1;
        let shard = Shard::open_sim(cfg, &disk).await.unwrap();
        for n in 0..5u128 {
            shard
                .write(cid(n), 0, &pattern(n as u64, 4096))
                .await
                .unwrap();
        }
        let want = pattern(2, 4096);
        let at = (0..disk.sectors())
            .find(|&s| disk.sector(s) == want)
            .unwrap();
        disk.flip_bit(at, 7);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while shard.stats().scrub_passes < 2 && std::time::Instant::now() < deadline {
            glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
        }
        let s = shard.stats();
        assert!(s.scrub_passes >= 2, "{s:?}");
        assert!(s.scrub_errors >= 1, "{s:?}");
        assert!(s.scrub_sectors >= 5, "{s:?}");
    });
}
