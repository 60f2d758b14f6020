//! The admin CLI end to end: put, get, stat, ls, ping, topology, stats, rm.

mod common;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

fn cli(addr: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .args(["--addr", addr])
        .output()
        .unwrap()
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn cli_commands_work_end_to_end() {
    let dir = data_dir("cli");
    let srv = TestServer::start(&dir, 2);
    let addr = srv.addr.clone();

    let file = dir.join("input.bin");
    let data = pattern(42, 70_000);
    std::fs::write(&file, &data).unwrap();
    let out = ok(&cli(&addr, &["put", "abc123", file.to_str().unwrap()]));
    assert!(out.contains("version 1"), "{out}");

    // put from standard input at an offset
    let mut child = Command::new(bin())
        .args(["put", "abc123", "-", "--offset", "70000", "--addr", &addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"tail").unwrap();
    assert!(child.wait_with_output().unwrap().status.success());

    let got = cli(&addr, &["get", "abc123"]);
    let got = {
        assert!(got.status.success());
        got.stdout
    };
    assert_eq!(got.len(), 70_004);
    assert_eq!(&got[..70_000], &data[..]);
    assert_eq!(&got[70_000..], b"tail");

    let outfile = dir.join("out.bin");
    ok(&cli(
        &addr,
        &[
            "get",
            "abc123",
            "--offset",
            "10",
            "--len",
            "100",
            "--out",
            outfile.to_str().unwrap(),
        ],
    ));
    assert_eq!(std::fs::read(&outfile).unwrap(), &data[10..110]);

    let stat = ok(&cli(&addr, &["stat", "abc123"]));
    assert!(
        stat.contains("length     70004") && stat.contains("version    2"),
        "{stat}"
    );
    let ls = ok(&cli(&addr, &["ls"]));
    assert!(ls.contains("00000000000000000000000000abc123"), "{ls}");
    let topo = ok(&cli(&addr, &["topology"]));
    assert!(topo.contains("shards     2"), "{topo}");
    let ping = ok(&cli(&addr, &["ping"]));
    assert!(ping.contains("shard 1"), "{ping}");
    let stats = ok(&cli(&addr, &["stats"]));
    assert!(stats.contains("write"), "{stats}");
    // Cache table, and the read latency split: the second get of the same
    // sectors was a cache hit.
    assert!(
        stats.contains("hit_%") && stats.contains("pf_wasted"),
        "{stats}"
    );
    assert!(stats.contains("read(cached)"), "{stats}");
    // Checkpoint table: every shard took one at open.
    let ckpt_rows: Vec<&str> = stats
        .lines()
        .skip_while(|l| !l.contains("last_ckpt_keys"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(ckpt_rows.len(), 2, "{stats}");
    for row in ckpt_rows {
        let checkpoints: u64 = row.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(checkpoints >= 1, "{stats}");
    }
    ok(&cli(&addr, &["rm", "abc123"]));

    // Errors: non-zero exit and a one-line message.
    let missing = cli(&addr, &["get", "abc123"]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("not found") || err.contains("NOT_FOUND"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let bad_id = cli(&addr, &["stat", "not-hex"]);
    assert!(!bad_id.status.success());
    let unreachable = cli("127.0.0.1:1", &["ping"]);
    assert!(!unreachable.status.success());
}
