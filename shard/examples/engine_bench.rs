//! The engine alone (no network): `qd` tasks each doing durable 4 KiB
//! writes at random 4 KiB-aligned offsets for `secs` seconds, on a shard in
//! DIR. Prints IOPS, p50 latency and flushes per write, to tell engine cost
//! from network cost in `bench/engine.sh`'s figures.
//!
//! `cargo run --release -p shardstore-shard --example engine_bench -- DIR QD SECS`

use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use shardstore_proto::{ChunkId, ShardId};
use shardstore_shard::{Shard, ShardConfig};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&a[1]);
    let qd: usize = a[2].parse().unwrap();
    let secs: f64 = a[3].parse().unwrap();
    let ex = LocalExecutorBuilder::new(Placement::Fixed(0))
        .io_memory(1 << 20)
        .make()
        .unwrap();
    ex.run(async move {
        let shard = Rc::new(
            Shard::open(ShardConfig {
                shard: ShardId(0),
                shard_count: 1,
                node_id: 1,
                dir,
                capacity_bytes: 1 << 30,
                max_flushes_in_flight: std::env::var("FLUSHES").ok().and_then(|s| s.parse().ok()).unwrap_or(4),
                ..ShardConfig::default()
            })
            .await
            .unwrap(),
        );
        let before = shard.stats();
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..qd {
            let shard = shard.clone();
            tasks.push(glommio::spawn_local(async move {
                let mut x = (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let data = vec![w as u8; 4096];
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let t = Instant::now();
                    shard
                        .write(ChunkId((w as u128) << 32 | u128::from(x % 256)), (x >> 20) % 1024 * 4096, &data)
                        .await
                        .unwrap();
                    lat.push(t.elapsed().as_micros() as u64);
                }
                lat
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await);
        }
        let el = started.elapsed().as_secs_f64();
        all.sort();
        let s = shard.stats();
        println!(
            "qd {qd}: {} writes, {:.0} IOPS, p50 {} us, p99 {} us, flushes/write {:.3}, device writes/write {:.3}, checkpoints {}, checkpoint waits {}",
            all.len(),
            all.len() as f64 / el,
            all[all.len() / 2],
            all[all.len() * 99 / 100],
            (s.flushes - before.flushes) as f64 / all.len() as f64,
            (s.device_writes - before.device_writes) as f64 / all.len() as f64,
            s.checkpoints - before.checkpoints,
            s.checkpoint_waits - before.checkpoint_waits,
        );
    });
}
