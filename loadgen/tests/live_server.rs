//! The loadgen binary against a real `shardstore` server process.
//!
//! The server binary belongs to another package, so Cargo does not hand us
//! its path: it is looked up next to the loadgen binary (same target and
//! profile; `cargo test --workspace` builds both), then under
//! `target/{debug,release}`, or taken from `SHARDSTORE_BIN`.

use shardstore_loadgen::check_schema;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn loadgen() -> &'static str {
    env!("CARGO_BIN_EXE_shardstore-loadgen")
}

fn server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SHARDSTORE_BIN") {
        return PathBuf::from(p);
    }
    let mut candidates = Vec::new();
    if let Some(dir) = Path::new(loadgen()).parent() {
        candidates.push(dir.join("shardstore"));
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    candidates.push(target.join("debug/shardstore"));
    candidates.push(target.join("release/shardstore"));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "the shardstore server binary is missing (looked at {candidates:?}): \
                 build it first with `cargo build -p shardstore-server` \
                 (`cargo test --workspace` does), or set SHARDSTORE_BIN"
            )
        })
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("loadgen-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Server {
    child: Child,
    addr: String,
    dir: PathBuf,
}

impl Server {
    fn start(name: &str, shards: u32) -> Server {
        let dir = scratch(name);
        let ready = dir.join("ready.addr");
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let mut child = Command::new(server_bin())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--capacity-mib",
                "128",
                "--io-memory-kib",
                "512",
            ])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--shards")
            .arg(shards.to_string())
            .arg("--ready-file")
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn shardstore");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(addr) = std::fs::read_to_string(&ready) {
                if !addr.trim().is_empty() {
                    return Server {
                        child,
                        addr: addr.trim().to_owned(),
                        dir,
                    };
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "shardstore exited with {status}: {}",
                    std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "shardstore not ready after 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The data file is preallocated: keep it only to debug a failure.
        if std::thread::panicking() {
            eprintln!("test data kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn run_loadgen(args: &[&str]) -> Output {
    Command::new(loadgen())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run shardstore-loadgen")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn read_json(path: &Path) -> serde_json::Value {
    let s =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&s).unwrap()
}

fn num(v: &serde_json::Value, path: &str) -> f64 {
    path.split('.')
        .fold(v, |v, k| &v[k])
        .as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number"))
}

#[test]
fn verify_run_against_a_live_server_reports_clean_figures() {
    let server = Server::start("verify", 2);
    let out_dir = &server.dir;
    let json = out_dir.join("report.json");
    let hdr = out_dir.join("latency.hlog");
    let svg = out_dir.join("plot.svg");
    let out = run_loadgen(&[
        "--addr",
        &server.addr,
        "--verify",
        "--duration",
        "3s",
        "--warmup",
        "500ms",
        "--keys",
        "2000",
        "--connections",
        "2",
        "--pipeline",
        "4",
        "--read-ratio",
        "0.7",
        "--size",
        "512..8k",
        "--distribution",
        "zipf",
        "--json",
        json.to_str().unwrap(),
        "--hdr-log",
        hdr.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "loadgen failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    // Plain progress lines (stdout is not a terminal here) and the table.
    assert!(stdout.contains(" run]"), "no progress line:\n{stdout}");
    assert!(stdout.contains("p99.99"), "no table:\n{stdout}");

    let v = read_json(&json);
    check_schema(&v).unwrap_or_else(|e| panic!("{e}\n{v:#}"));
    assert!(num(&v, "ops.total.ops") > 0.0);
    assert!(num(&v, "ops.read.ops") > 0.0);
    assert!(num(&v, "ops.write.ops") > 0.0);
    assert_eq!(num(&v, "ops.total.errors_total"), 0.0);
    assert_eq!(
        num(&v, "ops.total.misses"),
        0.0,
        "preloaded: every read hits"
    );
    assert!(num(&v, "verify.reads_checked") > 0.0);
    assert_eq!(num(&v, "verify.integrity_failures"), 0.0);
    assert_eq!(v["result"]["status"], "ok");
    assert_eq!(num(&v, "target.shard_count"), 2.0);
    assert_eq!(num(&v, "preload.keys"), 2000.0);
    assert!(num(&v, "client.cpu_us_per_op") > 0.0);
    let l = &v["ops"]["total"]["latency_us"];
    let p: Vec<f64> = ["min", "p50", "p90", "p99", "p999", "p9999", "max"]
        .iter()
        .map(|k| l[k].as_f64().unwrap())
        .collect();
    assert!(p.windows(2).all(|w| w[0] <= w[1]), "{p:?}");
    assert!(p[0] > 0.0);
    let timeline = v["timeline"].as_array().unwrap();
    assert!(timeline.len() >= 2, "{timeline:?}");
    let sum: f64 = timeline.iter().map(|t| t["ops"].as_f64().unwrap()).sum();
    // Intervals and totals are recorded separately; they agree up to the
    // operations that straddle the end of the window.
    assert!((sum - num(&v, "ops.total.ops")).abs() <= 16.0, "{sum}");

    let log = std::fs::read_to_string(&hdr).unwrap();
    assert!(log.contains("#[BaseTime:") && log.contains("Tag=read,") && log.contains("Tag=write,"));
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg"));
}

/// Preloads 200 keys of 4 KiB and reads them with `flags` (rate and
/// duration), the report in `json`.
fn open_loop_reads(server: &Server, json: &Path, flags: &[&str]) -> Output {
    let mut args = vec!["--addr", &server.addr, "--warmup", "0s", "--keys", "200"];
    args.extend([
        "--preload",
        "--read-ratio",
        "read-only",
        "--size",
        "4k",
        "-q",
    ]);
    args.extend(["--json", json.to_str().unwrap()]);
    args.extend(flags);
    run_loadgen(&args)
}

#[test]
fn open_loop_and_op_count_modes() {
    let server = Server::start("modes", 1);
    let json = server.dir.join("open.json");
    let out = open_loop_reads(&server, &json, &["--rate", "1000", "--duration", "2s"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v = read_json(&json);
    check_schema(&v).unwrap();
    // 1000 ops/s for 2 s on an idle server: the schedule is kept.
    let ops = num(&v, "ops.total.ops");
    assert!((1700.0..=2000.0).contains(&ops), "open loop ran {ops} ops");
    assert_eq!(num(&v, "open_loop.target_ops_per_s"), 1000.0);
    assert_eq!(num(&v, "ops.write.ops"), 0.0);

    let json = server.dir.join("ops.json");
    let out = run_loadgen(&[
        "--addr",
        &server.addr,
        "--ops",
        "777",
        "--warmup",
        "0s",
        "--keys",
        "200",
        "--read-ratio",
        "write-only",
        "-q",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v = read_json(&json);
    assert_eq!(num(&v, "ops.total.ops"), 777.0);
    assert_eq!(num(&v, "ops.write.ops"), 777.0);
}

/// Open loop far over what one connection with one request at a time can
/// serve: the run ends with its window, what was due and never sent is the
/// schedule deficit, and every request sent counts however late its reply
/// (the loop used to run its whole backlog after the window, leave those
/// late replies out of the totals and report a deficit of 0).
#[test]
fn open_loop_overload_counts_what_was_never_sent() {
    let server = Server::start("overload", 1);
    let json = server.dir.join("over.json");
    let rate = 50_000.0;
    let t0 = Instant::now();
    let out = open_loop_reads(
        &server,
        &json,
        &[
            "--rate",
            "50000",
            "--connections",
            "1",
            "--pipeline",
            "1",
            "--duration",
            "1s",
        ],
    );
    let took = t0.elapsed();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v = read_json(&json);
    let ops = num(&v, "ops.total.ops");
    let deficit = num(&v, "open_loop.schedule_deficit");
    assert!(
        deficit > rate / 2.0,
        "deficit {deficit} with {ops} ops sent"
    );
    let scheduled = ops + deficit;
    assert!(
        (0.95 * rate..=1.05 * rate).contains(&scheduled),
        "{ops} sent + {deficit} never sent, for {rate} scheduled"
    );
    assert!(took < Duration::from_secs(8), "the run took {took:?}");
}

/// With --verify, an acknowledged chunk found NOT_FOUND is lost data: the
/// run fails as an integrity failure (exit 4) whatever --max-error-rate
/// allows (it was counted as an ordinary error and the run exited 0).
#[test]
fn verify_fails_on_an_acknowledged_chunk_gone() {
    let server = Server::start("lost", 1);
    let json = server.dir.join("lost.json");
    let child = Command::new(loadgen())
        .args([
            "--addr",
            &server.addr,
            "--keys",
            "20",
            "--connections",
            "2",
            "--pipeline",
            "2",
            "--preload",
            "--verify",
            "--read-ratio",
            "read-only",
            "--duration",
            "3s",
            "--warmup",
            "0s",
            "--max-error-rate",
            "1",
            "-q",
            "--json",
            json.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    for key in 0..20u64 {
        let chunk = format!("{:x}", shardstore_loadgen::chunk_of(key).0);
        let out = Command::new(server_bin())
            .args(["rm", &chunk, "--addr", &server.addr])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("NOT_FOUND after a write of it was acknowledged"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn verify_catches_another_writer() {
    // Two loadgens with different seeds on the same key space: each one's
    // reads find the other's values, which verify must refuse, by key.
    let server = Server::start("foreign", 1);
    let json = server.dir.join("victim.json");
    let common = [
        "--addr",
        server.addr.as_str(),
        "--keys",
        "64",
        "--connections",
        "1",
        "--pipeline",
        "2",
        "--warmup",
        "0s",
        "--size",
        "1k",
        "-q",
    ];
    let mut other = Command::new(loadgen())
        .args(common)
        .args([
            "--seed",
            "2",
            "--read-ratio",
            "write-only",
            "--duration",
            "4s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = run_loadgen(
        &[
            &common[..],
            &[
                "--seed",
                "1",
                "--verify",
                "--read-ratio",
                "0.9",
                "--duration",
                "2s",
                "--json",
                json.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    let _ = other.wait();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "stderr:\n{stderr}");
    assert!(
        stderr.contains("INTEGRITY FAILURE: key "),
        "stderr:\n{stderr}"
    );
    let v = read_json(&json);
    assert!(num(&v, "verify.integrity_failures") > 0.0);
    assert_eq!(v["result"]["status"], "integrity_failure");
    assert!(num(&v, "ops.read.errors.verify_mismatch") > 0.0);
}

#[test]
fn unreachable_target_exits_non_zero() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let out = run_loadgen(&["--addr", &addr, "--duration", "1s", "-q"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("unreachable") && stderr.contains(&addr),
        "{stderr}"
    );

    // Bad arguments are a usage error, not a run.
    let out = run_loadgen(&["--addr", &addr, "--keys", "2", "--connections", "4"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn io_size_pieces_verify_and_count_io_bytes() {
    let server = Server::start("pieces", 2);
    for dist in ["sequential", "uniform"] {
        let json = server.dir.join(format!("pieces-{dist}.json"));
        let out = run_loadgen(&[
            "--addr",
            &server.addr,
            "--verify",
            "--size",
            "1m",
            "--io-size",
            "64k",
            "--keys",
            "6",
            "--connections",
            "2",
            "--pipeline",
            "1",
            "--read-ratio",
            "0.8",
            "--distribution",
            dist,
            "--ops",
            "400",
            "--warmup",
            "0s",
            "--seed",
            if dist == "uniform" { "2" } else { "1" },
            "-q",
            "--json",
            json.to_str().unwrap(),
        ]);
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{dist}: {:?}\n{stderr}", out.status);
        let v = read_json(&json);
        check_schema(&v).unwrap();
        assert_eq!(v["config"]["io_size"], "65536");
        assert_eq!(v["config"]["size"], "1048576");
        // Preload wrote every chunk in 16 pieces.
        assert_eq!(num(&v, "preload.keys"), 6.0);
        assert_eq!(num(&v, "preload.writes"), 96.0);
        assert_eq!(num(&v, "verify.integrity_failures"), 0.0);
        assert!(num(&v, "verify.reads_checked") > 0.0);
        // Every op moved exactly one piece.
        for op in ["read", "write"] {
            let ops = num(&v, &format!("ops.{op}.ops"));
            assert!(ops > 0.0, "{dist}: no {op}s");
            assert_eq!(num(&v, &format!("ops.{op}.bytes")), ops * 65536.0);
        }
        assert_eq!(num(&v, "ops.total.misses"), 0.0);
    }

    // An io size that does not divide the value size is a usage error.
    let out = run_loadgen(&[
        "--addr",
        &server.addr,
        "--size",
        "1m",
        "--io-size",
        "3k",
        "--keys",
        "6",
        "--connections",
        "1",
        "--pipeline",
        "1",
        "-q",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("must divide"));
}

/// `hint_out` summed over the shards, from `shardstore stats`: read-ahead
/// hints sent to another shard for the next chunk id of a marked stream.
fn hints_sent(addr: &str) -> u64 {
    let out = Command::new(server_bin())
        .args(["stats", "--addr", addr])
        .output()
        .expect("run shardstore stats");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut head: Option<Vec<String>> = None;
    let mut sum = 0;
    for line in text(&out.stdout).lines() {
        let f: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        if f.first().map(String::as_str) == Some("shard") && f.iter().any(|c| c == "hint_out") {
            head = Some(f);
        } else if let Some(h) = &head {
            if f.is_empty() {
                break;
            }
            let col = h.iter().position(|c| c == "hint_out").unwrap();
            sum += f[col].parse::<u64>().unwrap();
        }
    }
    assert!(
        head.is_some(),
        "no hint_out column in:\n{}",
        text(&out.stdout)
    );
    sum
}

/// A one-worker sequential walk over consecutive keys marks its reads as
/// going on into the next chunk id, so the server reads ahead across chunks
/// (hints cross to the other shard); a walk split between two workers
/// (whose keys are not consecutive) does not.
#[test]
fn a_one_worker_sequential_walk_marks_its_reads_for_read_ahead() {
    let server = Server::start("walk", 2);
    let walk = |conns: &str, preload: bool| {
        let mut args = vec![
            "--addr",
            &server.addr,
            "--size",
            "1m",
            "--io-size",
            "256k",
            "--keys",
            "12",
            "--connections",
            conns,
            "--pipeline",
            "1",
            "--read-ratio",
            "read-only",
            "--distribution",
            "sequential",
            "--ops",
            "48",
            "--warmup",
            "0s",
            "-q",
        ];
        if preload {
            args.push("--preload");
        }
        let out = run_loadgen(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    walk("2", true);
    assert_eq!(
        hints_sent(&server.addr),
        0,
        "two workers' reads were marked"
    );
    walk("1", false);
    let sent = hints_sent(&server.addr);
    assert!(sent > 0, "a one-worker walk sent no read-ahead hint");
}
