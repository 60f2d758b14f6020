//! Single-connection round trips: N sequential 4 KiB writes, then N reads of
//! the same chunks, against a running server. Prints median and p99.
//!
//! `cargo run --release -p shardstore-client --example rtt -- 127.0.0.1:7700 2000`

use shardstore_client::{ChunkId, Client};
use std::time::{Duration, Instant};

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e6;
    println!(
        "{name:<6} n={} median={:.1}us p90={:.1}us p99={:.1}us",
        v.len(),
        p(0.5),
        p(0.9),
        p(0.99)
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7700".into());
    let n: u128 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let client = Client::connect(&addr).await?;
    let data = vec![0x5au8; 4096];
    let base = 0x7777_0000_0000u128;
    let mut writes = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        client.write(ChunkId(base + i), 0, data.clone()).await?;
        writes.push(t.elapsed());
    }
    let mut reads = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        let r = client.read(ChunkId(base + i), 0, 4096).await?;
        reads.push(t.elapsed());
        assert_eq!(r.data.len(), 4096);
    }
    let mut pings = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        client.ping().await?;
        pings.push(t.elapsed());
    }
    summary("write", writes);
    summary("read", reads);
    summary("ping", pings);
    Ok(())
}
