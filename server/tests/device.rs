//! `serve --device` on a loop device: per-shard ranges of one block device,
//! data survives SIGKILL, a foreign superblock or a too small device is
//! refused unless `--format`. Needs root and losetup; otherwise the test
//! prints why it was skipped.

mod common;
use common::*;
use shardstore_proto::ChunkId;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Loop {
    dev: PathBuf,
    file: PathBuf,
}

impl Loop {
    fn new(dir: &Path, name: &str, mib: u64) -> Result<Loop, String> {
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        let file = dir.join(name);
        let f = std::fs::File::create(&file).map_err(|e| e.to_string())?;
        f.set_len(mib << 20).map_err(|e| e.to_string())?;
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&file)
            .output()
            .map_err(|e| format!("losetup not usable: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
        Ok(Loop { dev, file })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        let _ = std::fs::remove_file(&self.file);
    }
}

fn dev_args(l: &Loop) -> Vec<String> {
    vec!["--device".into(), l.dev.display().to_string()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_a_loop_device() {
    let dir = data_dir("device");
    let lo = match Loop::new(&dir, "disk.img", 96) {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIPPED serve_on_a_loop_device: {why}");
            return;
        }
    };
    let args = dev_args(&lo);
    let extra: Vec<&str> = args.iter().map(String::as_str).collect();
    // A device with no superblock of ours is taken only with --format
    // (zeros where it goes prove nothing), and then formatted.
    let err = match TestServer::try_start(&dir, 2, &extra) {
        Ok(_) => panic!("a blank device was formatted without --format"),
        Err(e) => e,
    };
    assert!(err.contains("--format"), "unclear refusal: {err}");
    let mut first = extra.clone();
    first.push("--format");
    let srv = TestServer::try_start(&dir, 2, &first).unwrap();
    let c = srv.client().await;
    for n in 0..20u128 {
        c.write(ChunkId(n), n as u64 * 10, pattern(n as u64, 9000))
            .await
            .unwrap();
    }
    c.delete(ChunkId(3)).await.unwrap();
    drop(c);
    srv.kill();
    // No data file was created: the data areas are on the device.
    assert!(!dir.join("shard-000/data").exists());

    let srv = TestServer::try_start(&dir, 2, &extra).unwrap();
    let c = srv.client().await;
    for n in 0..20u128 {
        match c.read(ChunkId(n), n as u64 * 10, 9000).await {
            Ok(r) => {
                assert_ne!(n, 3, "deleted chunk came back");
                assert!(r.data[..] == pattern(n as u64, 9000)[..], "chunk {n}");
            }
            Err(shardstore_client::ClientError::NotFound(_)) => assert_eq!(n, 3),
            Err(e) => panic!("{e}"),
        }
    }
    drop(c);
    srv.kill();

    // check on the device.
    let out = Command::new(bin())
        .args(["check", "--data-dir"])
        .arg(&dir)
        .args(&extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "check failed: {stdout}");
    assert!(stdout.contains("0 problems"), "{stdout}");

    // Someone else's bytes at the start of the device: refused ...
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&lo.dev)
            .unwrap();
        f.write_all_at(&[0x5a; 8192], 0).unwrap();
        f.sync_all().unwrap();
    }
    let err = match TestServer::try_start(&dir, 2, &extra) {
        Ok(_) => panic!("a device with a foreign superblock was used"),
        Err(e) => e,
    };
    assert!(err.contains("--format"), "unclear refusal: {err}");
    // ... unless --format.
    let mut with_format = extra.clone();
    with_format.push("--format");
    let srv = TestServer::try_start(&dir, 2, &with_format).unwrap();
    srv.kill();
}

#[test]
fn a_too_small_device_is_refused() {
    let dir = data_dir("device-small");
    let lo = match Loop::new(&dir, "small.img", 8) {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIPPED a_too_small_device_is_refused: {why}");
            return;
        }
    };
    let args = dev_args(&lo);
    let extra: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = match TestServer::try_start(&dir, 2, &extra) {
        Ok(_) => panic!("an 8 MiB device was split into 2 shards"),
        Err(e) => e,
    };
    assert!(err.contains("too small"), "unclear refusal: {err}");
}
