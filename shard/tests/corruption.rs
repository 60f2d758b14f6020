//! A flipped byte on disk is reported as Corrupt naming chunk and sector, and
//! never served; other sectors still read.
mod common;

use common::*;
use shardstore_proto::ErrorCode;
use shardstore_shard::ShardError;

#[test]
fn flipped_byte_is_detected_per_sector() {
    let dir = tempdir();
    let c = cid(0xc0ffee);
    let data = pattern(7, 8 * 4096);
    run(|| async {
        let shard = open(dir.path(), 4 * MIB).await;
        shard.write(c, 4096 * 10, &data).await.unwrap();
        shard.close().await.unwrap();
    });
    // Find logical sector 13 (the 4th data sector) in the file and flip a byte.
    let path = shard_dir(dir.path()).join("data");
    let mut bytes = std::fs::read(&path).unwrap();
    let needle = &data[3 * 4096..4 * 4096];
    let at = bytes
        .chunks(4096)
        .position(|s| s == needle)
        .expect("sector on disk");
    bytes[at * 4096 + 77] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();

    run(|| async {
        let shard = open(dir.path(), 4 * MIB).await;
        let e = shard.read(c, 0, 1 << 20).await.unwrap_err();
        match &e {
            ShardError::Corrupt { chunk, sector, .. } => {
                assert_eq!(*chunk, c);
                assert_eq!(*sector, 13);
            }
            other => panic!("expected Corrupt, got {other}"),
        }
        assert_eq!(e.code(), ErrorCode::Corrupt);
        assert_eq!(shard.stats().corrupt_errors, 1);
        // Reads not touching sector 13 work.
        let r = shard.read(c, 4096 * 10, 3 * 4096).await.unwrap();
        assert_eq!(r.data.to_vec(), &data[..3 * 4096]);
        let r = shard.read(c, 4096 * 14, 4 * 4096).await.unwrap();
        assert_eq!(r.data.to_vec(), &data[4 * 4096..]);
        // A partial write into the bad sector cannot read-modify-write it.
        let e = shard.write(c, 4096 * 13 + 10, b"xy").await.unwrap_err();
        assert!(matches!(e, ShardError::Corrupt { sector: 13, .. }), "{e}");
        // A whole-sector overwrite replaces it.
        let fresh = pattern(8, 4096);
        shard.write(c, 4096 * 13, &fresh).await.unwrap();
        let r = shard.read(c, 4096 * 13, 4096).await.unwrap();
        assert_eq!(r.data.to_vec(), fresh);
        shard.read(c, 0, 1 << 20).await.unwrap();
    });
}

#[test]
fn stale_sector_is_detected() {
    // Swap the content of a live sector with an older version of the same
    // logical sector: the bytes are "valid" but the generation is not.
    let dir = tempdir();
    let c = cid(5);
    let old = pattern(1, 4096);
    let new = pattern(2, 4096);
    run(|| async {
        let shard = open(dir.path(), 4 * MIB).await;
        shard.write(c, 0, &old).await.unwrap();
        shard.write(c, 0, &new).await.unwrap();
        shard.close().await.unwrap();
    });
    let path = shard_dir(dir.path()).join("data");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.chunks(4096).position(|s| s == &new[..]).unwrap();
    bytes[at * 4096..(at + 1) * 4096].copy_from_slice(&old);
    std::fs::write(&path, &bytes).unwrap();
    run(|| async {
        let shard = open(dir.path(), 4 * MIB).await;
        let e = shard.read(c, 0, 4096).await.unwrap_err();
        assert!(matches!(e, ShardError::Corrupt { sector: 0, .. }), "{e}");
    });
}
