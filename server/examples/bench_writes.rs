//! A small closed-loop write benchmark for `bench/engine.sh`: `--qd`
//! concurrent writers, each issuing one durable write at a time (so the
//! node sees `qd` outstanding requests), random 4 KiB-aligned offsets inside
//! a set of chunks. Prints IOPS and latency percentiles as one JSON line.
//!
//! `cargo run --release -p shardstore-server --example bench_writes -- \
//!     ADDR QD SECONDS SIZE_BYTES [CHUNKS_PER_WRITER] [SPAN_BYTES] [MAX_TOTAL_BYTES]`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardstore_client::Client;
use shardstore_proto::ChunkId;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        eprintln!(
            "usage: bench_writes ADDR QD SECONDS SIZE_BYTES [CHUNKS_PER_WRITER] [SPAN_BYTES]"
        );
        std::process::exit(2);
    }
    let addr = a[1].clone();
    let qd: usize = a[2].parse().unwrap();
    let secs: f64 = a[3].parse().unwrap();
    let size: usize = a[4].parse().unwrap();
    let chunks: u64 = a.get(5).map_or(64, |s| s.parse().unwrap());
    let span: u64 = a.get(6).map_or(1 << 20, |s| s.parse().unwrap());
    let budget: u64 = a.get(7).map_or(0, |s| s.parse().unwrap());
    let written = Arc::new(AtomicU64::new(0));
    let client = Client::connect(&addr).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..qd {
        let client = client.clone();
        let written = written.clone();
        tasks.push(tokio::spawn(async move {
            let mut x = (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let data = vec![0x5au8 ^ w as u8; size];
            let mut lat_us = Vec::new();
            while Instant::now() < deadline
                && (budget == 0 || written.fetch_add(size as u64, Ordering::Relaxed) < budget)
            {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let chunk = ChunkId(((w as u128) << 64) | u128::from(x % chunks));
                let slots = (span / size as u64).max(1);
                let off = (x >> 20) % slots * size as u64;
                let t = Instant::now();
                client.write(chunk, off, data.clone()).await.expect("write");
                lat_us.push(t.elapsed().as_nanos() as f64 / 1000.0);
            }
            lat_us
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| all[((all.len() as f64 - 1.0) * p) as usize];
    println!(
        "{{\"qd\":{qd},\"size\":{size},\"writes\":{},\"iops\":{:.0},\"lat_us_p50\":{:.1},\"lat_us_p99\":{:.1},\"lat_us_mean\":{:.1}}}",
        all.len(),
        all.len() as f64 / elapsed,
        pct(0.5),
        pct(0.99),
        all.iter().sum::<f64>() / all.len() as f64
    );
}
