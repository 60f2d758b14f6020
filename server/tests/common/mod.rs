//! Test harness: runs the real `shardstore` binary as a child process on a
//! data folder under `target/` (O_DIRECT needs a real filesystem).
#![allow(dead_code)]

use shardstore_client::{Client, ClientConfig};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestServer {
    pub child: Child,
    pub addr: String,
    pub data_dir: PathBuf,
    pub shards: u32,
}

/// A test's data folder under `target/tmp`. Removed when it goes out of scope
/// on a passing test (data files are preallocated and zero-filled, so a
/// suite run would otherwise leave gigabytes behind); kept when the test
/// panics, so the server log and data can be inspected.
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test data kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn data_dir(name: &str) -> Scratch {
    let d =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_shardstore")
}

impl TestServer {
    pub fn start(data_dir: &Path, shards: u32) -> TestServer {
        Self::try_start(data_dir, shards, &[])
            .unwrap_or_else(|e| panic!("server did not start: {e}"))
    }

    pub fn try_start(data_dir: &Path, shards: u32, extra: &[&str]) -> Result<TestServer, String> {
        Self::try_start_env(data_dir, shards, extra, &[])
    }

    /// [`TestServer::try_start`] with environment variables for the server.
    pub fn try_start_env(
        data_dir: &Path,
        shards: u32,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<TestServer, String> {
        Self::spawn(data_dir, shards, extra, env, None)
    }

    /// [`TestServer::try_start`] as user and group `uid` (the test must run
    /// as root).
    #[allow(dead_code)]
    pub fn try_start_as(data_dir: &Path, shards: u32, uid: u32) -> Result<TestServer, String> {
        Self::spawn(data_dir, shards, &[], &[], Some(uid))
    }

    fn spawn(
        data_dir: &Path,
        shards: u32,
        extra: &[&str],
        env: &[(&str, &str)],
        uid: Option<u32>,
    ) -> Result<TestServer, String> {
        let ready = data_dir.join("ready.addr");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("server.log"))
            .unwrap();
        // Defaults a test may override by passing the same flag in `extra`.
        let defaults = [
            ("--listen", "127.0.0.1:0"),
            ("--capacity-mib", "64"),
            ("--io-memory-kib", "512"),
        ];
        let mut cmd = Command::new(bin());
        if let Some(uid) = uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid);
        }
        cmd.arg("serve");
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        let mut child = cmd
            // Tests run 2-3 shards on small CI machines.
            .arg("--allow-oversubscribe")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--shards")
            .arg(shards.to_string())
            .arg("--ready-file")
            .arg(&ready)
            .args(extra)
            .env("RUST_LOG", "info,shardstore=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn shardstore");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(addr) = std::fs::read_to_string(&ready) {
                return Ok(TestServer {
                    child,
                    addr: addr.trim().to_string(),
                    data_dir: data_dir.to_path_buf(),
                    shards,
                });
            }
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(data_dir.join("server.log")).unwrap_or_default();
                return Err(format!("exited with {status}: {log}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("not ready after 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to flush anything that was not already durable.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.addr).await.expect("connect")
    }

    pub async fn client_with(&self, cfg: ClientConfig) -> Client {
        Client::connect_with(&self.addr, cfg)
            .await
            .expect("connect")
    }

    pub fn child_alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic test bytes for (chunk, seed).
/// Runs `shardstore check [flags] --data-dir DIR` and returns its output.
#[allow(dead_code)]
pub fn run_check(dir: &Path, flags: &[&str]) -> std::process::Output {
    std::process::Command::new(bin())
        .arg("check")
        .args(flags)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap()
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every path under `dir`, not `dir` itself.
pub fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut all = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                todo.push(p.clone());
            }
            all.push(p);
        }
    }
    all
}

/// Whether this test runs as root; if not, says that `what` is skipped.
pub fn is_root_else_skip(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: {what} needs root");
    }
    root
}

/// The uid and gid of `nobody`, as a service account stand-in.
pub const NOBODY: u32 = 65534;

/// Asserts that every file under `dir` (but the test's own `server.log`,
/// which the test opens as itself) belongs to `uid`:`uid`, and that there
/// are more than a handful.
pub fn assert_all_owned_by(dir: &Path, uid: u32) {
    use std::os::unix::fs::MetadataExt;
    let mut files = 0;
    for p in walk(dir) {
        if p.file_name().is_some_and(|n| n == "server.log") {
            continue;
        }
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!(
            (m.uid(), m.gid()),
            (uid, uid),
            "{} belongs to {}:{}, not to the folder's owner",
            p.display(),
            m.uid(),
            m.gid()
        );
        files += 1;
    }
    assert!(files > 6, "only {files} files under {}", dir.display());
}

/// A WRITE frame of `data` at offset 0 of `chunk`, its payload included,
/// claiming `crc` for it.
pub fn write_frame(id: u64, chunk: u128, data: &[u8], crc: u32) -> Vec<u8> {
    write_frame_flags(id, chunk, data, crc, 0)
}

/// [`write_frame`] with WRITE flags.
pub fn write_frame_flags(id: u64, chunk: u128, data: &[u8], crc: u32, flags: u32) -> Vec<u8> {
    use shardstore_proto::{encode_frame, Opcode, WriteRequest};
    let mut f = Vec::new();
    let w = WriteRequest {
        chunk,
        offset: 0,
        payload_crc: crc,
        flags,
    };
    encode_frame(Opcode::Write, 0, id, &w, data.len() as u32, &mut f);
    f.extend_from_slice(data);
    f
}
