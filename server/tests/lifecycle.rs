//! Lifecycle against real server processes: SIGTERM during a write load
//! drains and exits 0 with every acknowledged write present after a
//! restart; systemd notifications (READY=1, STATUS=, STOPPING=1, WATCHDOG=1)
//! reach NOTIFY_SOCKET.

mod common;
use common::*;
use shardstore_proto::ChunkId;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn sigterm(pid: u32) {
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
}

fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "server did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_writes_drains_and_keeps_acked_writes() {
    let dir = data_dir("sigterm");
    let mut srv = TestServer::start(&dir, 2);
    let c = srv.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..6u128 {
        let c = c.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0u128;
            // Write until the server stops answering.
            while !stop.load(Ordering::Relaxed) {
                let id = ChunkId((t << 64) | i);
                let len = 1 + (i as usize * 7919) % 30_000;
                match c.write(id, 0, pattern(id.0 as u64, len)).await {
                    Ok(_) => acked.push((id, len)),
                    Err(_) => break,
                }
                i += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    sigterm(srv.child.id());
    let status = tokio::task::spawn_blocking(move || {
        let s = wait_exit(&mut srv.child, Duration::from_secs(20));
        (s, srv)
    })
    .await
    .unwrap();
    let (status, srv) = status;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    let log = srv.log();
    assert_eq!(status.code(), Some(0), "exit status {status}; log:\n{log}");
    assert!(log.contains("stopping"), "{log}");
    assert!(log.contains("shard closed"), "{log}");
    assert!(log.contains("shardstore stopped"), "{log}");
    assert!(
        acked.len() > 20,
        "too few writes before SIGTERM: {}",
        acked.len()
    );
    drop(c);
    drop(srv);

    let srv = TestServer::start(&dir, 2);
    let c = srv.client().await;
    for (id, len) in &acked {
        let r = c.read(*id, 0, *len as u32).await.unwrap();
        assert!(
            r.data[..] == pattern(id.0 as u64, *len)[..],
            "acknowledged chunk {id} lost or changed after SIGTERM"
        );
    }
    eprintln!("{} acknowledged writes survived SIGTERM", acked.len());
}

#[test]
fn systemd_notifications() {
    let dir = data_dir("notify");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let ready = dir.join("ready.addr");
    // systemd sets WATCHDOG_PID to the service's pid: a shell learns its
    // own and execs the server in its place.
    let mut child = Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\"", bin()])
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--capacity-mib",
            "16",
            "--io-memory-kib",
            "512",
            "--metrics-interval-ms",
            "100",
        ])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--ready-file")
        .arg(&ready)
        .env("NOTIFY_SOCKET", &sock_path)
        // 1 s watchdog: pings every 500 ms while the shard publishes.
        .env("WATCHDOG_USEC", "1000000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut got: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    let mut recv_until = |want: &str, got: &mut Vec<String>| {
        while !got
            .iter()
            .any(|m| m.lines().any(|l| l == want || l.starts_with(want)))
        {
            let n = sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no {want} from the server ({e}); got {got:?}"));
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    recv_until("READY=1", &mut got);
    assert!(ready.exists(), "READY=1 before the ready file was written");
    let ready_msg = got.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(
        ready_msg.contains("STATUS=serving: 1 shards"),
        "{ready_msg}"
    );
    assert!(got.iter().any(|m| m.contains("STATUS=starting")), "{got:?}");
    recv_until("WATCHDOG=1", &mut got);
    sigterm(child.id());
    recv_until("STOPPING=1", &mut got);
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
    recv_until("STATUS=stopped", &mut got);
}

/// A shard whose thread panics takes the whole process down (abort, for
/// the unit's `Restart=on-failure`), instead of leaving a node whose other
/// shards forward requests to it that nobody answers. The panic comes from
/// a hook of debug builds (`SHARDSTORE_DEBUG_PANIC_SHARD`).
#[test]
fn a_shard_panic_aborts_the_process() {
    if !cfg!(debug_assertions) {
        eprintln!("skipped: the panic hook exists in debug builds only");
        return;
    }
    let dir = data_dir("panic-abort");
    let env = [("SHARDSTORE_DEBUG_PANIC_SHARD", "1")];
    // Shard 1 panics 200 ms after it is open; the node may not have
    // reported ready by then (shard 0 opening slowly), and then it never
    // does: the abort ends the start instead.
    let log = match TestServer::try_start_env(&dir, 2, &[], &env) {
        Ok(mut srv) => {
            let status = wait_exit(&mut srv.child, Duration::from_secs(20));
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(libc::SIGABRT), "{status}");
            srv.log()
        }
        Err(e) => {
            assert!(e.contains("SIGABRT") || e.contains("signal: 6"), "{e}");
            e
        }
    };
    assert!(log.contains("panics on purpose"), "{log}");
    assert!(log.contains("aborting the process"), "{log}");
}

/// A shard listens only once its storage is open: a connection made while
/// the shards open (recovery, formatting) is refused at once, where it used
/// to wait in the backlog until they were; once ready, the node serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_refused_until_the_shards_are_open() {
    if !cfg!(debug_assertions) {
        eprintln!("skipped: the open-delay hook exists in debug builds only");
        return;
    }
    let dir = data_dir("listen-after-open");
    let d = dir.to_path_buf();
    let starting = tokio::task::spawn_blocking(move || {
        let env = [("SHARDSTORE_DEBUG_OPEN_DELAY_MS", "3000")];
        TestServer::try_start_env(&d, 2, &["--log-format", "text"], &env)
    });
    // The addresses are bound (and logged) before the shards open.
    let deadline = Instant::now() + Duration::from_secs(20);
    let front = loop {
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        let found = log
            .lines()
            .filter(|l| l.contains("addresses bound"))
            .flat_map(|l| l.split_whitespace())
            .find_map(|w| w.strip_prefix("front="))
            .map(str::to_owned);
        if let Some(f) = found {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "no bound addresses logged: {log}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let e = std::net::TcpStream::connect(&front).unwrap_err();
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "connecting to {front} while the shards open: {e}"
    );
    let srv = starting.await.unwrap().unwrap();
    assert_eq!(srv.addr, front);
    let c = srv.client().await;
    c.write(ChunkId(9), 0, vec![9u8; 100]).await.unwrap();
    assert_eq!(
        &c.read(ChunkId(9), 0, 100).await.unwrap().data[..],
        &[9u8; 100][..]
    );
}

/// A second server on a data folder in use is refused (its shards' indexes
/// are locked), with `--rebuild-index` too, and so is `check --rebuild`;
/// the first server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_folder_is_refused() {
    let dir = data_dir("second-server");
    let first = TestServer::start(&dir, 1);
    let c = first.client().await;
    c.write(ChunkId(7), 0, vec![7u8; 4096]).await.unwrap();
    let e = match TestServer::try_start(&dir, 1, &["--rebuild-index"]) {
        Err(e) => e,
        Ok(_) => panic!("a second server started on a data folder in use"),
    };
    assert!(e.contains("another server"), "{e}");
    // `check --rebuild` would discard the indexes: refused too.
    let out = run_check(&dir, &["--rebuild"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "check --rebuild ran on a folder in use"
    );
    assert!(
        stderr.contains("a server is using this data folder"),
        "{stderr}"
    );
    assert!(dir.join("shard-000").join("index").exists());
    c.write(ChunkId(8), 0, vec![8u8; 4096]).await.unwrap();
    let r = c.read(ChunkId(7), 0, 4096).await.unwrap();
    assert_eq!(&r.data[..], &[7u8; 4096][..]);
}

/// A shard folder lost from an initialized data folder (a partial restore,
/// a wrong `rm`): `serve` and `check` refuse instead of creating it empty
/// (its chunks silently NOT_FOUND, and `check` said "0 problems"); `serve
/// --format` creates it empty on purpose, the other shard's data intact.
/// `check` without `--device` on a shard with no data file (a device-backed
/// node) refuses instead of formatting a file there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_shard_folder_is_refused_not_recreated_empty() {
    let dir = data_dir("lost-shard");
    let kept: Vec<u128> = {
        let srv = TestServer::start(&dir, 2);
        let c = srv.client().await;
        let mut kept = Vec::new();
        for chunk in 0..16u128 {
            c.write(ChunkId(chunk), 0, vec![chunk as u8; 4096])
                .await
                .unwrap();
            if c.shard_of(ChunkId(chunk)).0 == 0 {
                kept.push(chunk);
            }
        }
        kept
    };
    assert!(!kept.is_empty());
    std::fs::remove_dir_all(dir.join("shard-001")).unwrap();
    let e = match TestServer::try_start(&dir, 2, &[]) {
        Err(e) => e,
        Ok(_) => panic!("a server started with a shard folder missing"),
    };
    assert!(e.contains("shard-001 is missing"), "{e}");
    let check = || run_check(&dir, &[]);
    let out = check();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "check passed a missing shard: {stdout}"
    );
    assert!(stdout.contains("is missing"), "{stdout}");
    assert!(!dir.join("shard-001").exists(), "check created the shard");
    // A shard with its index but no data file: refused, index kept.
    std::fs::create_dir_all(dir.join("shard-001")).unwrap();
    let data0 = dir.join("shard-000").join("data");
    let moved = dir.join("data0.moved");
    std::fs::rename(&data0, &moved).unwrap();
    let out = run_check(&dir, &["--rebuild"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("--device"), "{stdout}");
    assert!(!data0.exists(), "check made a data file");
    assert!(
        dir.join("shard-000").join("index").exists(),
        "index removed"
    );
    std::fs::rename(&moved, &data0).unwrap();
    std::fs::remove_dir_all(dir.join("shard-001")).unwrap();
    // Created empty on purpose; shard 0 keeps its chunks.
    let srv = TestServer::try_start(&dir, 2, &["--format"]).unwrap();
    let c = srv.client().await;
    for chunk in kept {
        let r = c.read(ChunkId(chunk), 0, 4096).await.unwrap();
        assert_eq!(&r.data[..], &[chunk as u8; 4096][..]);
    }
}

/// A shard whose executor cannot be made (io_uring refuses its rings) ends
/// the start-up with that reason, at once: the other shards, open and
/// serving, used to keep the start-up waiting for it forever.
#[test]
fn a_shard_whose_executor_cannot_start_fails_the_start_with_its_reason() {
    let dir = data_dir("badexec");
    let t = std::time::Instant::now();
    let err = match TestServer::try_start_env(
        &dir,
        2,
        &[],
        &[("SHARDSTORE_DEBUG_BAD_EXECUTOR_SHARD", "1")],
    ) {
        Ok(_) => panic!("started with a shard that has no executor"),
        Err(e) => e,
    };
    assert!(
        err.contains("shard 1") && err.contains("executor failed to start"),
        "{err}"
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t.elapsed()
    );
}

/// The ready file is the signal that this run is ready: one left by an
/// earlier run is removed at start (a script waiting for it would find the
/// old address at once), and the file is removed again at a graceful stop.
#[test]
fn a_stale_ready_file_is_removed_at_start_and_the_file_at_stop() {
    let dir = data_dir("readyfile");
    let ready = dir.join("ready.addr");
    std::fs::write(&ready, "127.0.0.1:1\n").unwrap();
    let mut child = std::process::Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--shards", "1"])
        .args(["--capacity-mib", "64", "--io-memory-kib", "512"])
        .arg("--data-dir")
        .arg(&*dir)
        .arg("--ready-file")
        .arg(&ready)
        .env("SHARDSTORE_DEBUG_OPEN_DELAY_MS", "1500")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        !ready.exists(),
        "the old ready file is still there while the shards open"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&ready) {
            break a;
        }
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_ne!(addr.trim(), "127.0.0.1:1");
    sigterm(child.id());
    assert!(wait_exit(&mut child, Duration::from_secs(20)).success());
    assert!(!ready.exists(), "the ready file outlived the server");
}
