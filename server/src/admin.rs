//! Admin commands: thin wrappers over `shardstore-client` on a
//! single-threaded tokio runtime. Tokio is used here only, never by `serve`.

use crate::{Cmd, ConnArgs};
use anyhow::{bail, Context};
use shardstore_client::{Client, ClientConfig};
use shardstore_proto::{ChunkId, Opcode, ShardId};
use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

pub fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the client runtime")?;
    rt.block_on(run_async(cmd))
}

async fn connect(c: &ConnArgs) -> anyhow::Result<Client> {
    let mut cfg = ClientConfig {
        request_timeout: Duration::from_millis(c.timeout_ms),
        ..ClientConfig::default()
    };
    c.security.apply(&mut cfg)?;
    Client::connect_with(&c.addr, cfg)
        .await
        .with_context(|| format!("connecting to {}", c.addr))
}

fn fmt_time(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    format!("{secs}.{:09}", ns % 1_000_000_000)
}

async fn run_async(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Serve(_) | Cmd::Config { .. } => unreachable!("handled by main"),
        Cmd::Put {
            conn,
            chunk,
            file,
            offset,
        } => {
            let data = match file {
                Some(p) if p.as_os_str() != "-" => {
                    std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?
                }
                _ => {
                    let mut v = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut v)
                        .context("reading standard input")?;
                    v
                }
            };
            if data.is_empty() {
                bail!("nothing to write: the input is empty");
            }
            let client = connect(&conn).await?;
            let max = client.topology().max_payload as usize;
            let mut version = 0;
            let mut len = 0;
            // Inputs larger than one request go in payload-sized pieces; each
            // piece is atomic on its own, not the whole file.
            for (i, piece) in data.chunks(max).enumerate() {
                let r = client
                    .write(chunk, offset + (i * max) as u64, piece.to_vec())
                    .await
                    .with_context(|| format!("writing chunk {chunk}"))?;
                version = r.version;
                len = r.chunk_len;
            }
            println!(
                "wrote {} bytes to {chunk} at offset {offset}: version {version}, length {len}",
                data.len()
            );
        }
        Cmd::Get {
            conn,
            chunk,
            offset,
            len,
            out,
        } => {
            let client = connect(&conn).await?;
            let max = client.topology().max_payload as u64;
            let want = match len {
                Some(l) => l,
                None => {
                    let st = client
                        .stat(chunk)
                        .await
                        .with_context(|| format!("stat {chunk}"))?;
                    st.chunk_len.saturating_sub(offset)
                }
            };
            let mut sink: Box<dyn Write> = match &out {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("creating {}", p.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            let mut pos = offset;
            let end = offset.saturating_add(want);
            while pos < end {
                let n = (end - pos).min(max) as u32;
                let r = client
                    .read(chunk, pos, n)
                    .await
                    .with_context(|| format!("reading chunk {chunk} at {pos}"))?;
                sink.write_all(&r.data)?;
                if (r.data.len() as u32) < n {
                    break; // end of chunk
                }
                pos += n as u64;
            }
            sink.flush()?;
        }
        Cmd::Stat { conn, chunk } => {
            let client = connect(&conn).await?;
            let s = client
                .stat(chunk)
                .await
                .with_context(|| format!("stat {chunk}"))?;
            println!("chunk      {chunk}");
            println!("shard      {}", s.shard);
            println!("length     {}", s.chunk_len);
            println!("version    {}", s.version);
            println!("allocated  {}", s.allocated_bytes);
            println!("created    {}", fmt_time(s.created_ns));
            println!("modified   {}", fmt_time(s.modified_ns));
        }
        Cmd::Rm { conn, chunk } => {
            let client = connect(&conn).await?;
            let v = client
                .delete(chunk)
                .await
                .with_context(|| format!("deleting {chunk}"))?;
            println!("deleted {chunk} (was version {v})");
        }
        Cmd::Ls { conn, shard, limit } => {
            let client = connect(&conn).await?;
            let shards: Vec<u32> = match shard {
                Some(s) => vec![s],
                None => (0..client.topology().shard_count).collect(),
            };
            let mut left = limit.unwrap_or(u64::MAX);
            'outer: for s in shards {
                let mut after: Option<ChunkId> = None;
                loop {
                    let page = client
                        .list(ShardId(s), after, 256)
                        .await
                        .with_context(|| format!("listing shard {s}"))?;
                    for e in &page.entries {
                        if left == 0 {
                            break 'outer;
                        }
                        println!(
                            "{}  shard {s}  len {}  version {}",
                            e.chunk, e.chunk_len, e.version
                        );
                        left -= 1;
                    }
                    match (page.more, page.entries.last()) {
                        (true, Some(last)) => after = Some(last.chunk),
                        _ => break,
                    }
                }
            }
        }
        Cmd::Ping { conn, count } => {
            let client = connect(&conn).await?;
            for _ in 0..count.max(1) {
                let rtt = client.ping().await?;
                println!("front {}: {} us", conn.addr, rtt.as_micros());
                for s in 0..client.topology().shard_count {
                    let rtt = client.ping_shard(ShardId(s)).await?;
                    println!(
                        "shard {s} {}: {} us",
                        client.topology().shard_addrs[s as usize],
                        rtt.as_micros()
                    );
                }
            }
        }
        Cmd::Topology { conn } => {
            let client = connect(&conn).await?;
            let t = client.topology();
            println!("protocol   {}", t.protocol_version);
            println!("node       {:032x} (public id)", t.node_id);
            println!("shards     {}", t.shard_count);
            println!("route fn   {}", t.route_fn);
            println!("payload    {} bytes max", t.max_payload);
            println!("chunk      {} bytes max", t.max_chunk_size);
            for (i, a) in t.shard_addrs.iter().enumerate() {
                println!("shard {i:<4} {a}");
            }
        }
        Cmd::Stats { conn } => {
            let client = connect(&conn).await?;
            let mut all = Vec::new();
            for s in 0..client.topology().shard_count {
                all.push(client.stats(ShardId(s)).await?);
            }
            print!("{}", stats_tables(&all));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Upper bound (us) of the bucket holding quantile `q` of a histogram, or
/// `None` if it is empty; the unbounded last bucket is shown as `>max`.
fn quantile_us(counts: &[u64], bounds: &[u64], q: f64) -> Option<String> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(match bounds.get(i) {
                Some(b) => format!("<={b}"),
                None => format!(">{}", bounds.last().copied().unwrap_or(0)),
            });
        }
    }
    None
}

/// The figures of STATS (the same as /metrics) as tables: one row per
/// shard, then one row per shard and opcode with requests, errors and
/// latency quantiles (bucket upper bounds, microseconds).
fn stats_tables(all: &[shardstore_proto::StatsReply]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let _ = writeln!(
        out,
        "{:>5} {:>8} {:>6} {:>11} {:>11} {:>7} {:>7} {:>7} {:>8} {:>9} {:>9} {:>10} {:>8} {:>7} {:>6} {:>6} {:>6} {:>6} {:>7} {:>6}",
        "shard", "conns", "inflt", "MiB_in", "MiB_out", "fwd_out", "fwd_in", "chunks", "used_MiB", "cap_MiB",
        "dev_wr", "flushes", "corrupt", "malform", "refuse", "tmout", "busy", "authf", "scrub", "failed"
    );
    for st in all {
        let _ = writeln!(
            out,
            "{:>5} {:>8} {:>6} {:>11.1} {:>11.1} {:>7} {:>7} {:>7} {:>8.1} {:>9.1} {:>9} {:>10} {:>8} {:>7} {:>6} {:>6} {:>6} {:>6} {:>7} {:>6}",
            st.shard,
            st.connections,
            st.in_flight,
            mib(st.bytes_in),
            mib(st.bytes_out),
            st.forwarded_out,
            st.forwarded_in,
            st.chunks,
            mib(st.used_bytes),
            mib(st.capacity_bytes),
            st.device_writes,
            st.flushes,
            st.corrupt_errors,
            st.malformed_frames,
            st.refused_connections,
            st.timeouts,
            st.busy,
            st.auth_failures,
            format!("{}/{}", st.scrub_passes, st.scrub_errors),
            st.fail_stopped
        );
    }
    let _ = writeln!(
        out,
        "\n{:>5} {:>11} {:>10} {:>13} {:>14} {:>10} {:>8} {:>6} {:>9} {:>9} {:>9} {:>8}",
        "shard",
        "checkpoints",
        "ckpt_waits",
        "last_ckpt_ms",
        "last_ckpt_keys",
        "tombstones",
        "retired",
        "sweeps",
        "combined",
        "fwd_busy",
        "fwd_tmout",
        "tls_fail"
    );
    for st in all {
        let _ = writeln!(
            out,
            "{:>5} {:>11} {:>10} {:>13.1} {:>14} {:>10} {:>8} {:>6} {:>9} {:>9} {:>9} {:>8}",
            st.shard,
            st.checkpoints,
            st.checkpoint_waits,
            st.last_checkpoint_us as f64 / 1000.0,
            st.last_checkpoint_keys,
            st.tombstones,
            st.tombstones_retired,
            st.sweep_passes,
            st.combined_writes,
            st.forward_busy,
            st.forward_timeouts,
            st.tls_failures
        );
    }
    let _ = writeln!(
        out,
        "\n{:>5} {:>9} {:>9} {:>9} {:>8} {:>12} {:>12} {:>9} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "shard",
        "cache_MiB",
        "used_MiB",
        "held_MiB",
        "hit_%",
        "hits",
        "misses",
        "evicted",
        "rd_cached",
        "rd_uncach",
        "pf_issued",
        "pf_used",
        "pf_wasted",
        "hint_out",
        "hint_in",
        "hint_drop"
    );
    for st in all {
        let looked = st.cache_hits + st.cache_misses;
        let ratio = if looked == 0 {
            "-".to_string()
        } else {
            format!("{:.1}", 100.0 * st.cache_hits as f64 / looked as f64)
        };
        let pf = |v: u64| {
            if st.prefetch_enabled {
                v.to_string()
            } else {
                "off".to_string()
            }
        };
        let _ = writeln!(
            out,
            "{:>5} {:>9.1} {:>9.1} {:>9.1} {:>8} {:>12} {:>12} {:>9} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            st.shard,
            mib(st.cache_capacity_bytes),
            mib(st.cache_bytes),
            mib(st.cache_held_bytes),
            ratio,
            st.cache_hits,
            st.cache_misses,
            st.cache_evictions,
            st.cached_reads,
            st.uncached_reads,
            pf(st.prefetch_issued),
            pf(st.prefetch_used),
            pf(st.prefetch_wasted),
            st.stream_hints_out,
            st.stream_hints_in,
            st.stream_hints_dropped
        );
    }
    let _ = writeln!(
        out,
        "\n{:>5} {:<13} {:>10} {:>8} {:>10} {:>10} {:>10} {:>10}",
        "shard", "op", "requests", "errors", "p50_us", "p90_us", "p99_us", "p99.9_us"
    );
    for st in all {
        let mut row = |name: &str, requests: u64, errors: String, counts: &[u64]| {
            let q = |q| quantile_us(counts, &st.latency_bounds_us, q).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "{:>5} {:<13} {:>10} {:>8} {:>10} {:>10} {:>10} {:>10}",
                st.shard,
                name,
                requests,
                errors,
                q(0.5),
                q(0.9),
                q(0.99),
                q(0.999)
            );
        };
        let width = st.latency_bounds_us.len() + 1;
        for op in Opcode::ALL {
            let i = op as usize;
            let r = st.requests.get(i).copied().unwrap_or(0);
            if r == 0 {
                continue;
            }
            let e = st.errors.get(i).copied().unwrap_or(0);
            let counts = st
                .latency_counts
                .get(i * width..(i + 1) * width)
                .unwrap_or(&[]);
            row(op.name(), r, e.to_string(), counts);
        }
        for (name, counts) in [
            ("read(cached)", &st.read_cached_latency),
            ("read(uncach)", &st.read_uncached_latency),
        ] {
            let n: u64 = counts.iter().sum();
            if n > 0 {
                row(name, n, "-".into(), counts);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_bucket_bounds() {
        let bounds = [10, 100, 1000];
        assert_eq!(quantile_us(&[0, 0, 0, 0], &bounds, 0.5), None);
        let counts = [50, 40, 9, 1];
        assert_eq!(quantile_us(&counts, &bounds, 0.5).unwrap(), "<=10");
        assert_eq!(quantile_us(&counts, &bounds, 0.9).unwrap(), "<=100");
        assert_eq!(quantile_us(&counts, &bounds, 0.99).unwrap(), "<=1000");
        assert_eq!(quantile_us(&counts, &bounds, 0.999).unwrap(), ">1000");
    }
}
