//! Writes and reads: alignment, holes, overwrites, versions, short reads.
mod common;

use common::*;
use shardstore_proto::{limits, ErrorCode};
use shardstore_shard::ShardError;

#[test]
fn unaligned_writes_holes_and_overwrites_read_back() {
    let dir = tempdir();
    run(|| async {
        let shard = open(dir.path(), 64 * MIB).await;
        let c = cid(7);
        let mut model = Vec::new();
        let put = |model: &mut Vec<u8>, off: usize, data: &[u8]| {
            if model.len() < off + data.len() {
                model.resize(off + data.len(), 0);
            }
            model[off..off + data.len()].copy_from_slice(data);
        };

        // Unaligned start, hole before it.
        let a = pattern(1, 10_000);
        let out = shard.write(c, 5_000, &a).await.unwrap();
        assert_eq!(out.version, 1);
        assert_eq!(out.chunk_len, 15_000);
        put(&mut model, 5_000, &a);

        // A far write leaves a hole of several sectors.
        let b = pattern(2, 3);
        let out = shard.write(c, 40_000, &b).await.unwrap();
        assert_eq!((out.version, out.chunk_len), (2, 40_003));
        put(&mut model, 40_000, &b);

        // Partial overwrite inside one sector, and across sector boundaries.
        let d = pattern(3, 100);
        shard.write(c, 5_010, &d).await.unwrap();
        put(&mut model, 5_010, &d);
        let e = pattern(4, 9_000);
        let out = shard.write(c, 3_000, &e).await.unwrap();
        put(&mut model, 3_000, &e);
        assert_eq!((out.version, out.chunk_len), (4, 40_003));

        let r = shard.read(c, 0, 1 << 20).await.unwrap();
        assert_eq!(r.version, 4);
        assert_eq!(r.chunk_len, 40_003);
        let got = r.data.to_vec();
        assert_eq!(got.len(), model.len());
        assert!(got == model, "content differs from the model");
        assert_eq!(r.payload_crc, crc32c::crc32c(&model));
        assert_eq!(
            r.data.slices().map(|s| s.len()).sum::<usize>(),
            r.data.len()
        );

        // Sub-range reads at odd offsets.
        for (off, len) in [
            (0u64, 1u32),
            (4_095, 2),
            (4_096, 4_096),
            (12_345, 20_000),
            (39_999, 100),
        ] {
            let r = shard.read(c, off, len).await.unwrap();
            let end = (off as usize + len as usize).min(model.len());
            assert_eq!(
                r.data.to_vec(),
                model[off as usize..end],
                "read {off}+{len}"
            );
            assert_eq!(r.payload_crc, crc32c::crc32c(&model[off as usize..end]));
        }

        // Short reads: at and past the end give zero bytes, not an error.
        assert_eq!(shard.read(c, 40_003, 10).await.unwrap().data.len(), 0);
        assert_eq!(shard.read(c, 1 << 30, 10).await.unwrap().data.len(), 0);
        assert_eq!(shard.read(c, 0, 0).await.unwrap().data.len(), 0);

        let st = shard.stat(c).unwrap();
        assert_eq!((st.chunk_len, st.version), (40_003, 4));
        assert!(st.created_ns <= st.modified_ns);
        // Sectors 0..=3 (0..16384) and sector 9 (36864..40960) hold data.
        assert_eq!(st.allocated_bytes, 5 * 4096);
        let s = shard.stats();
        assert_eq!(s.writes, 4);
        assert_eq!(s.chunks, 1);
        assert_eq!(s.device_writes, 4 + 1 /* superblock */);
        shard.close().await.unwrap();
    });
}

#[test]
fn overwrite_whole_sectors_is_copy_on_write_and_frees_old_space() {
    let dir = tempdir();
    run(|| async {
        let shard = open(dir.path(), 64 * MIB).await;
        let c = cid(1);
        shard.write(c, 0, &pattern(1, 64 * 1024)).await.unwrap();
        let used = shard.stats().used_bytes;
        assert_eq!(used, (16 + 1) * 4096);
        let new = pattern(2, 8192);
        shard.write(c, 8192, &new).await.unwrap();
        // Superseded sectors stay quarantined until the next checkpoint.
        assert_eq!(shard.stats().used_bytes, used + 3 * 4096);
        shard.checkpoint().await.unwrap();
        // Old sectors 2..4 freed, new extent (1 header + 2 data) in use.
        assert_eq!(shard.stats().used_bytes, used + 4096);
        let mut model = pattern(1, 64 * 1024);
        model[8192..16384].copy_from_slice(&new);
        assert_eq!(
            shard.read(c, 0, 1 << 20).await.unwrap().data.to_vec(),
            model
        );
        // Overwrite everything: both old extents' headers are freed too.
        let all = pattern(3, 64 * 1024);
        shard.write(c, 0, &all).await.unwrap();
        shard.checkpoint().await.unwrap();
        assert_eq!(shard.stats().used_bytes, (16 + 1) * 4096);
        assert_eq!(shard.read(c, 0, 1 << 20).await.unwrap().data.to_vec(), all);
        assert_eq!(shard.stat(c).unwrap().allocated_bytes, 64 * 1024);
    });
}

#[test]
fn errors_and_limits() {
    let dir = tempdir();
    run(|| async {
        let shard = open(dir.path(), 64 * MIB).await;
        let c = cid(9);
        let e = shard.read(c, 0, 10).await.unwrap_err();
        assert!(matches!(e, ShardError::NotFound(x) if x == c), "{e}");
        assert_eq!(e.code(), ErrorCode::NotFound);
        assert!(matches!(shard.stat(c), Err(ShardError::NotFound(_))));
        assert!(matches!(
            shard.delete(c).await,
            Err(ShardError::NotFound(_))
        ));
        let e = shard.write(c, 0, &[]).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidRequest);
        let e = shard
            .write(c, limits::MAX_CHUNK_SIZE - 1, &[1, 2])
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::TooLarge);
        let e = shard.prepare_write(c, u64::MAX, 1).err().unwrap();
        assert_eq!(e.code(), ErrorCode::TooLarge);
        let e = shard
            .prepare_write(c, 0, limits::MAX_PAYLOAD + 1)
            .err()
            .unwrap();
        assert_eq!(e.code(), ErrorCode::TooLarge);
        let e = shard.read(c, u64::MAX, 2).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidRequest);
        // The last byte of the largest chunk is writable.
        shard
            .write(c, limits::MAX_CHUNK_SIZE - 1, &[7])
            .await
            .unwrap();
        let r = shard.read(c, limits::MAX_CHUNK_SIZE - 2, 10).await.unwrap();
        assert_eq!(r.data.to_vec(), vec![0, 7]);
    });
}

#[test]
fn max_payload_unaligned_write_uses_multi_sector_header() {
    let dir = tempdir();
    run(|| async {
        let shard = open(dir.path(), 64 * MIB).await;
        let c = cid(3);
        let data = pattern(5, limits::MAX_PAYLOAD as usize);
        let mut w = shard.prepare_write(c, 100, limits::MAX_PAYLOAD).unwrap();
        assert_eq!(w.len(), limits::MAX_PAYLOAD);
        assert_eq!(w.chunk(), c);
        w.payload_mut().copy_from_slice(&data);
        let out = shard.commit_write(w).await.unwrap();
        assert_eq!(out.chunk_len, 100 + limits::MAX_PAYLOAD as u64);
        // 2049 data sectors + 3 header sectors.
        assert_eq!(shard.stats().used_bytes, (2049 + 3) * 4096);
        let r = shard.read(c, 100, limits::MAX_PAYLOAD).await.unwrap();
        assert!(r.data.to_vec() == data);
        let r = shard.read(c, 0, 200).await.unwrap();
        assert_eq!(&r.data.to_vec()[..100], &[0u8; 100][..]);
        assert_eq!(&r.data.to_vec()[100..], &data[..100]);
    });
}

#[test]
fn list_and_delete() {
    let dir = tempdir();
    run(|| async {
        let shard = open(dir.path(), 64 * MIB).await;
        for n in 1..=10u128 {
            shard
                .write(cid(n * 3), 0, &pattern(n as u64, 100 * n as usize))
                .await
                .unwrap();
        }
        let (items, more) = shard.list(None, 4).unwrap();
        assert!(more);
        assert_eq!(
            items.iter().map(|i| i.chunk).collect::<Vec<_>>(),
            vec![cid(3), cid(6), cid(9), cid(12)]
        );
        assert_eq!(items[1].chunk_len, 200);
        assert_eq!(items[1].version, 1);
        let (items, more) = shard.list(Some(cid(12)), 100).unwrap();
        assert!(!more);
        assert_eq!(items.len(), 6);
        let (items, more) = shard.list(Some(cid(27)), 1).unwrap();
        assert_eq!((items.len(), more), (1, false));
        shard.write(cid(6), 0, b"again").await.unwrap();
        assert_eq!(shard.delete(cid(6)).await.unwrap(), 2);
        assert!(matches!(
            shard.read(cid(6), 0, 1).await,
            Err(ShardError::NotFound(_))
        ));
        assert_eq!(shard.list(None, 1000).unwrap().0.len(), 9);
        assert_eq!(shard.stats().chunks, 9);
        // A deleted chunk starts again at version 1.
        assert_eq!(shard.write(cid(6), 0, b"x").await.unwrap().version, 1);
    });
}
