//! The Prometheus endpoint: scraped over HTTP from a live 2-shard server,
//! parsed as text exposition format, figures checked against the load sent.

mod common;
use common::*;
use shardstore_proto::ChunkId;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::time::Duration;

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("http response");
    (head.to_string(), body.to_string())
}

/// A parsed exposition: samples by (name, sorted labels), and TYPE by family.
struct Exposition {
    samples: HashMap<(String, BTreeMap<String, String>), f64>,
    types: HashMap<String, String>,
}

fn parse(text: &str) -> Exposition {
    let mut samples = HashMap::new();
    let mut types = HashMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "bad type: {line}"
            );
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "duplicate TYPE {name}"
            );
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        let (series, value) = line.rsplit_once(' ').expect("sample value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("labels: {line}"));
                let mut m = BTreeMap::new();
                for kv in body.split(',') {
                    let (k, v) = kv
                        .split_once('=')
                        .unwrap_or_else(|| panic!("label: {line}"));
                    assert!(
                        k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "label name: {line}"
                    );
                    let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
                    m.insert(
                        k.to_string(),
                        v.unwrap_or_else(|| panic!("quotes: {line}")).to_string(),
                    );
                }
                (n.to_string(), m)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "metric name: {line}"
        );
        // Every sample belongs to a family declared before it.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(&name)
            .to_string();
        assert!(
            types.contains_key(&family),
            "sample before its TYPE: {line}"
        );
        assert!(
            samples.insert((name, labels), value).is_none(),
            "duplicate series: {line}"
        );
    }
    Exposition { samples, types }
}

impl Exposition {
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let l: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        *self
            .samples
            .get(&(name.to_string(), l))
            .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
    }

    fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && filter
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| *v)
            .sum()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_and_parse() {
    let dir = data_dir("metrics");
    let maddr = free_port();
    let srv = TestServer::try_start(
        &dir,
        2,
        &["--metrics-addr", &maddr, "--metrics-interval-ms", "100"],
    )
    .unwrap();
    let c = srv.client().await;
    let writes = 40u64;
    for i in 0..writes {
        c.write(ChunkId(i as u128), 0, pattern(i, 5000))
            .await
            .unwrap();
    }
    for i in 0..10u64 {
        c.read(ChunkId(i as u128), 0, 5000).await.unwrap();
    }
    // The same 10 reads again: served from the cache (2 sectors each).
    for i in 0..10u64 {
        c.read(ChunkId(i as u128), 0, 5000).await.unwrap();
    }
    assert!(c.read(ChunkId(999_999), 0, 10).await.is_err());
    // Figures are published every 100 ms.
    tokio::time::sleep(Duration::from_millis(400)).await;

    let (head, body) = tokio::task::spawn_blocking({
        let m = maddr.clone();
        move || http_get(&m, "/metrics")
    })
    .await
    .unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let m = parse(&body);

    assert_eq!(m.types["shardstore_request_duration_seconds"], "histogram");
    assert_eq!(m.types["shardstore_requests_total"], "counter");
    assert_eq!(m.get("shardstore_shards", &[]), 2.0);
    assert_eq!(
        m.get(
            "shardstore_build_info",
            &[("version", env!("CARGO_PKG_VERSION")), ("profile", "debug")]
        ) + m.sum("shardstore_build_info", &[("profile", "release")]),
        1.0
    );
    assert_eq!(
        m.sum("shardstore_requests_total", &[("op", "write")]),
        writes as f64
    );
    assert_eq!(m.sum("shardstore_requests_total", &[("op", "read")]), 21.0);
    assert_eq!(
        m.sum("shardstore_request_errors_total", &[("op", "read")]),
        1.0
    );
    assert_eq!(
        m.sum("shardstore_received_bytes_total", &[]),
        (writes * 5000) as f64
    );
    assert_eq!(m.sum("shardstore_sent_bytes_total", &[]), 100_000.0);
    // Cache: the first 10 reads missed (2 sectors each), the next 10 hit.
    assert_eq!(m.sum("shardstore_cache_misses_total", &[]), 20.0);
    assert_eq!(m.sum("shardstore_cache_hits_total", &[]), 20.0);
    assert_eq!(m.sum("shardstore_cached_reads_total", &[]), 10.0);
    assert_eq!(m.sum("shardstore_uncached_reads_total", &[]), 10.0);
    assert_eq!(m.sum("shardstore_cache_bytes", &[]), 20.0 * 4096.0);
    // Each read's buffer holds exactly the sectors cached from it.
    assert_eq!(m.sum("shardstore_cache_held_bytes", &[]), 20.0 * 4096.0);
    assert_eq!(m.types["shardstore_cache_compacted_total"], "counter");
    assert_eq!(
        m.sum("shardstore_cache_capacity_bytes", &[]),
        256.0 * 1024.0 * 1024.0,
        "the default 256 MiB split between the shards"
    );
    assert_eq!(
        m.types["shardstore_read_cached_duration_seconds"],
        "histogram"
    );
    assert_eq!(
        m.sum("shardstore_read_cached_duration_seconds_count", &[]),
        10.0
    );
    assert_eq!(
        m.sum("shardstore_read_uncached_duration_seconds_count", &[]),
        10.0
    );
    // Their sums: every READ took some time, so each histogram's sum is
    // above zero wherever its count is.
    for name in [
        "shardstore_read_cached_duration_seconds",
        "shardstore_read_uncached_duration_seconds",
    ] {
        for s in ["0", "1"] {
            let count = m.get(&format!("{name}_count"), &[("shard", s)]);
            let sum = m.get(&format!("{name}_sum"), &[("shard", s)]);
            assert!(
                count == 0.0 || sum > 0.0,
                "{name} shard {s}: {sum} s for {count}"
            );
        }
    }
    // The scrubber's figures and failed TLS handshakes, per shard (their
    // values are checked where they change: unit tests, tls.rs).
    for name in [
        "shardstore_scrub_passes_total",
        "shardstore_scrub_sectors_total",
        "shardstore_scrub_errors_total",
        "shardstore_tls_failures_total",
    ] {
        assert_eq!(m.types[name], "counter", "{name}");
        for s in ["0", "1"] {
            m.get(name, &[("shard", s)]);
        }
    }
    assert_eq!(m.sum("shardstore_scrub_errors_total", &[]), 0.0);
    assert_eq!(m.sum("shardstore_tls_failures_total", &[]), 0.0);
    assert_eq!(m.sum("shardstore_chunks", &[]), writes as f64);
    assert!(m.sum("shardstore_device_flushes_total", &[]) >= 1.0);
    assert_eq!(m.types["shardstore_combined_writes_total"], "counter");
    assert_eq!(
        m.sum("shardstore_combined_writes_total", &[]),
        0.0,
        "one write at a time: nothing to combine"
    );
    assert_eq!(m.sum("shardstore_fail_stopped", &[]), 0.0);
    assert_eq!(m.sum("shardstore_in_flight_requests", &[]), 0.0);
    assert!(
        m.sum("shardstore_connections", &[]) >= 2.0,
        "client connections"
    );
    assert!(m.get("shardstore_filesystem_free_bytes", &[]) > 0.0);
    assert_eq!(m.get("shardstore_draining", &[]), 0.0);
    for s in ["0", "1"] {
        let cap = m.get("shardstore_data_capacity_bytes", &[("shard", s)]);
        assert_eq!(cap, (64u64 << 20) as f64);
        let used = m.get("shardstore_data_used_bytes", &[("shard", s)]);
        let free = m.get("shardstore_data_free_bytes", &[("shard", s)]);
        assert_eq!(used + free, cap);
        assert!(m.sum("shardstore_snapshot_age_seconds", &[("shard", s)]) < 5.0);
    }

    // Histograms: cumulative buckets, +Inf == count, one count per write.
    let name = "shardstore_request_duration_seconds";
    let mut total = 0.0;
    for s in ["0", "1"] {
        let mut buckets: Vec<(f64, f64)> = m
            .samples
            .iter()
            .filter(|((n, l), _)| {
                n == &format!("{name}_bucket") && l["shard"] == s && l["op"] == "write"
            })
            .map(|((_, l), v)| {
                let le = if l["le"] == "+Inf" {
                    f64::INFINITY
                } else {
                    l["le"].parse().unwrap()
                };
                (le, *v)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        assert!(buckets.len() > 5);
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "not cumulative: {buckets:?}"
        );
        let count = m.get(&format!("{name}_count"), &[("shard", s), ("op", "write")]);
        assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, count));
        let sum = m.get(&format!("{name}_sum"), &[("shard", s), ("op", "write")]);
        assert!(count == 0.0 || sum > 0.0);
        total += count;
    }
    assert_eq!(total, writes as f64);

    // Other paths and methods.
    let (head, _) = tokio::task::spawn_blocking({
        let m = maddr.clone();
        move || http_get(&m, "/nope")
    })
    .await
    .unwrap();
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    // Index checkpoints: one per shard at open (the checkpoint record
    // alone), then the periodic one (every 5 s while writes happened)
    // writes each chunk's meta and extent record.
    assert_eq!(m.sum("shardstore_checkpoint_waits_total", &[]), 0.0);
    assert!(m.sum("shardstore_checkpoints_total", &[]) >= 2.0);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let m = loop {
        let (_, body) = tokio::task::spawn_blocking({
            let m = maddr.clone();
            move || http_get(&m, "/metrics")
        })
        .await
        .unwrap();
        let m = parse(&body);
        let keys = m.sum("shardstore_checkpoint_last_keys", &[]);
        if keys >= 2.0 * writes as f64 {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint wrote the {writes} writes' records: {keys} keys"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for s in ["0", "1"] {
        assert!(m.get("shardstore_checkpoints_total", &[("shard", s)]) >= 2.0);
        assert!(
            m.get(
                "shardstore_checkpoint_last_duration_microseconds",
                &[("shard", s)]
            ) > 0.0
        );
    }
    drop(srv);
}

/// One client sending its request a byte at a time, each byte within the
/// per-read timeout, holds the endpoint at most a few seconds: a scrape
/// behind it is answered. Before, it held it until its request ended.
#[test]
fn a_trickling_client_does_not_hold_the_endpoint() {
    let dir = data_dir("metrics-trickle");
    let maddr = free_port();
    let _srv = TestServer::try_start(&dir, 1, &["--metrics-addr", &maddr]).unwrap();
    let trickler = {
        let maddr = maddr.clone();
        std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(&maddr).unwrap();
            // 12 s of one byte a second, never the end of a request.
            for _ in 0..12 {
                if s.write_all(b"G").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let (head, _) = http_get(&maddr, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "the scrape waited {waited:?}"
    );
    trickler.join().unwrap();
}
