//! Space accounting: NoSpace when full, deletes and overwrites give space back.
mod common;

use common::*;
use shardstore_proto::ErrorCode;
use shardstore_shard::ShardError;

#[test]
fn fill_until_no_space_then_delete_frees() {
    let dir = tempdir();
    run(|| async {
        // 64 sectors of data area: each 16 KiB write takes 1 header + 4 data sectors.
        let shard = open(dir.path(), 64 * 4096).await;
        let data = pattern(1, 16 * 1024);
        let mut n = 0u128;
        let err = loop {
            match shard.write(cid(n), 0, &data).await {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(n, 12, "64 / 5 extents fit");
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
        // A smaller write still fits in the tail.
        shard.write(cid(100), 0, &data[..4096]).await.unwrap();
        assert!(shard.write(cid(101), 0, &data).await.is_err());

        assert_eq!(shard.delete(cid(3)).await.unwrap(), 1);
        assert_eq!(shard.stats().used_bytes, (60 + 2 - 5) * 4096);
        shard.write(cid(101), 0, &data).await.unwrap();
        // Every surviving chunk still reads back.
        for c in (0..12).filter(|&c| c != 3) {
            assert_eq!(
                shard.read(cid(c), 0, 1 << 20).await.unwrap().data.to_vec(),
                data
            );
        }
        // Overwriting in place needs new space first (copy-on-write) ...
        let e = shard.write(cid(0), 0, &data).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::NoSpace);
        // ... and fails without changing anything.
        assert_eq!(shard.stat(cid(0)).unwrap().version, 1);
        assert_eq!(
            shard.read(cid(0), 0, 1 << 20).await.unwrap().data.to_vec(),
            data
        );
        // Deletes free the header along with the last live sector.
        for c in 0..12 {
            let _ = shard.delete(cid(c)).await;
        }
        shard.delete(cid(100)).await.unwrap();
        shard.delete(cid(101)).await.unwrap();
        assert_eq!(shard.stats().used_bytes, 0);
        assert_eq!(shard.stats().chunks, 0);
    });
}
