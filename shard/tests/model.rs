//! Randomized test against an in-memory model, with reopens (sled's
//! `fuzz_model` habit): writes, overwrites, reads, deletes, stat, list.
mod common;

use std::collections::BTreeMap;
use std::rc::Rc;

use common::*;
use shardstore_proto::ChunkId;
use shardstore_shard::{Shard, ShardError};

#[derive(Default, Clone)]
struct ModelChunk {
    bytes: Vec<u8>,
    version: u64,
}

async fn check_all(shard: &Shard, model: &BTreeMap<ChunkId, ModelChunk>) {
    for (c, m) in model {
        let r = shard.read(*c, 0, 1 << 20).await.unwrap();
        assert_eq!(r.version, m.version, "chunk {c}");
        assert!(r.data.to_vec() == m.bytes, "chunk {c} content");
    }
    let (items, more) = shard.list(None, 1000).unwrap();
    assert!(!more);
    assert_eq!(
        items.iter().map(|i| i.chunk).collect::<Vec<_>>(),
        model.keys().copied().collect::<Vec<_>>()
    );
    assert_eq!(shard.stats().chunks, model.len() as u64);
}

fn run_seed(seed: u64) {
    let dir = tempdir();
    let mut model: BTreeMap<ChunkId, ModelChunk> = BTreeMap::new();
    let mut rng = Rng::new(seed);
    for _epoch in 0..3 {
        run(|| async {
            let shard = Rc::new(open(dir.path(), 32 * MIB).await);
            check_all(&shard, &model).await;
            for step in 0..150 {
                let c = cid(rng.below(6) as u128);
                match rng.below(10) {
                    0..=4 => {
                        // Mostly small and unaligned, sometimes large.
                        let span = if rng.below(4) == 0 { 300_000 } else { 20_000 };
                        let off = rng.below(span);
                        let big = if rng.below(8) == 0 { 200_000 } else { 9_000 };
                        let len = 1 + rng.below(big);
                        let data = pattern(seed * 10_000 + step, len as usize);
                        let out = shard.write(c, off, &data).await.unwrap();
                        let m = model.entry(c).or_default();
                        let end = (off + len) as usize;
                        if m.bytes.len() < end {
                            m.bytes.resize(end, 0);
                        }
                        m.bytes[off as usize..end].copy_from_slice(&data);
                        m.version += 1;
                        assert_eq!(out.version, m.version);
                        assert_eq!(out.chunk_len, m.bytes.len() as u64);
                    }
                    5..=7 => {
                        let off = rng.below(320_000);
                        let len = rng.below(100_000) as u32;
                        match (shard.read(c, off, len).await, model.get(&c)) {
                            (Ok(r), Some(m)) => {
                                let s = (off as usize).min(m.bytes.len());
                                let e = (off as usize + len as usize).min(m.bytes.len());
                                assert!(r.data.to_vec() == m.bytes[s..e], "read {c} {off}+{len}");
                                assert_eq!(r.payload_crc, crc32c::crc32c(&m.bytes[s..e]));
                                assert_eq!(r.chunk_len, m.bytes.len() as u64);
                            }
                            (Err(ShardError::NotFound(_)), None) => {}
                            (r, m) => panic!(
                                "read {c}: {:?} vs model present={}",
                                r.map(|r| r.version),
                                m.is_some()
                            ),
                        }
                    }
                    8 => match (shard.delete(c).await, model.remove(&c)) {
                        (Ok(v), Some(m)) => assert_eq!(v, m.version),
                        (Err(ShardError::NotFound(_)), None) => {}
                        (r, m) => panic!("delete {c}: {r:?} vs model present={}", m.is_some()),
                    },
                    _ => match (shard.stat(c), model.get(&c)) {
                        (Ok(s), Some(m)) => {
                            assert_eq!(s.chunk_len, m.bytes.len() as u64);
                            assert_eq!(s.version, m.version);
                        }
                        (Err(ShardError::NotFound(_)), None) => {}
                        (r, m) => panic!("stat {c}: {r:?} vs model present={}", m.is_some()),
                    },
                }
            }
            // A burst of concurrent writes to distinct chunks.
            let mut tasks = Vec::new();
            for k in 0..8u128 {
                let shard = shard.clone();
                let data = pattern(seed + k as u64, 5000);
                tasks.push(glommio::spawn_local(async move {
                    shard
                        .write(cid(100 + k), 123, &data)
                        .await
                        .map(|o| (k, o, data))
                }));
            }
            for t in tasks {
                let (k, out, data) = t.await.unwrap();
                let m = model.entry(cid(100 + k)).or_default();
                if m.bytes.len() < 5123 {
                    m.bytes.resize(5123, 0);
                }
                m.bytes[123..5123].copy_from_slice(&data);
                m.version += 1;
                assert_eq!(out.version, m.version);
            }
            check_all(&shard, &model).await;
            shard.close().await.unwrap();
        });
    }
}

#[test]
fn model_seed_1() {
    run_seed(1);
}

#[test]
fn model_seed_2() {
    run_seed(2);
}

#[test]
fn model_seed_3() {
    run_seed(3);
}
