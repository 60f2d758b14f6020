//! Configuration: precedence (flag > environment > file > default), errors
//! that name the key on one line, `config check`, and `config default`
//! staying identical to deploy/shardstore.toml.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bin());
    c.args(args);
    // The caller's environment must not leak settings into the test.
    for (k, _) in std::env::vars() {
        if k.starts_with("SHARDSTORE_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The one-line error of a failed run.
fn error(o: &Output) -> String {
    assert!(!o.status.success(), "unexpectedly succeeded");
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(e.trim_end().lines().count(), 1, "not one line: {e}");
    e.trim_end().to_string()
}

fn value(show: &str, key: &str) -> String {
    show.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("{key} missing from:\n{show}"))
        .trim_matches('"')
        .to_string()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn precedence_flag_env_file_default() {
    let dir = data_dir("config-prec");
    let file = write(
        &dir,
        "a.toml",
        "capacity_mib = 10\nindex_cache_mib = 20\nforward_queue = 30\n",
    );
    let env = [
        ("SHARDSTORE_INDEX_CACHE_MIB", "21"),
        ("SHARDSTORE_FORWARD_QUEUE", "31"),
    ];
    let show = stdout(&run(
        &["config", "show", "--config", &file, "--forward-queue", "32"],
        &env,
    ));
    assert_eq!(value(&show, "capacity_mib"), "10", "file over default");
    assert_eq!(value(&show, "index_cache_mib"), "21", "env over file");
    assert_eq!(value(&show, "forward_queue"), "32", "flag over env");
    assert_eq!(value(&show, "io_memory_kib"), "1024", "default");
    assert_eq!(value(&show, "metrics_addr"), "off");
    assert_eq!(value(&show, "sync_mode"), "dsync", "default");
    assert_eq!(value(&show, "checkpoint_mib"), "256", "default");
    assert_eq!(value(&show, "write_combine"), "8", "default");
    assert_eq!(value(&show, "poll_us"), "0", "default");
    let show = stdout(&run(
        &["config", "show", "--poll-us", "200"],
        &[("SHARDSTORE_POLL_US", "50")],
    ));
    assert_eq!(value(&show, "poll_us"), "200", "flag over env");
    let show = stdout(&run(
        &["config", "show", "--sync-mode", "group"],
        &[("SHARDSTORE_SYNC_MODE", "adaptive")],
    ));
    assert_eq!(value(&show, "sync_mode"), "group", "flag over env");
    let show = stdout(&run(
        &["config", "show", "--checkpoint-mib", "64"],
        &[("SHARDSTORE_CHECKPOINT_MIB", "32")],
    ));
    assert_eq!(value(&show, "checkpoint_mib"), "64", "flag over env");
    let show = stdout(&run(
        &["config", "show", "--write-combine", "0"],
        &[("SHARDSTORE_WRITE_COMBINE", "8")],
    ));
    assert_eq!(value(&show, "write_combine"), "0", "flag over env");
    let show = stdout(&run(
        &["config", "show"],
        &[("SHARDSTORE_SYNC_MODE", "adaptive")],
    ));
    assert_eq!(value(&show, "sync_mode"), "adaptive");
    // The config file itself can come from the environment.
    let show = stdout(&run(&["config", "show"], &[("SHARDSTORE_CONFIG", &file)]));
    assert_eq!(value(&show, "capacity_mib"), "10");
    // Booleans: the bare flag, and env overriding the file both ways.
    let f2 = write(&dir, "b.toml", "allow_oversubscribe = true\n");
    let show = stdout(&run(
        &["config", "show", "--config", &f2],
        &[("SHARDSTORE_ALLOW_OVERSUBSCRIBE", "false")],
    ));
    assert_eq!(value(&show, "allow_oversubscribe"), "false");
    let show = stdout(&run(&["config", "show", "--allow-oversubscribe"], &[]));
    assert_eq!(value(&show, "allow_oversubscribe"), "true");
    // RUST_LOG is the lowest layer for log_level.
    let show = stdout(&run(&["config", "show"], &[("RUST_LOG", "debug")]));
    assert_eq!(value(&show, "log_level"), "debug");
    let show = stdout(&run(
        &["config", "show", "--log-level", "warn"],
        &[("RUST_LOG", "debug")],
    ));
    assert_eq!(value(&show, "log_level"), "warn");
}

#[test]
fn errors_name_the_key() {
    let dir = data_dir("config-err");
    let cases: &[(&str, &str)] = &[
        ("capacity_mb = 1\n", "capacity_mb: unknown field"),
        ("shards = \"two\"\n", "shards: invalid type"),
        ("log_format = \"xml\"\n", "log_format: unknown variant"),
        (
            "max_payload = 1000\n",
            "max_payload: 1000 is not a multiple",
        ),
        (
            "cache_mib = 999999999\n",
            "cache_mib: 999999999 MiB is more than",
        ),
        ("cpus = \"0,4000\"\n", "cpus:"),
        ("metrics_addr = \"nowhere\"\n", "metrics_addr:"),
        ("checkpoint_mib = 0\n", "checkpoint_mib: 0 is not between"),
        (
            "write_combine = 65\n",
            "write_combine: 65 is not between 0 and 64",
        ),
        ("poll_us = 1000001\n", "poll_us: 1000001 is over 1000000"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let f = write(&dir, &format!("e{i}.toml"), text);
        let e = error(&run(&["config", "check", &f], &[]));
        assert!(e.contains(want), "{text:?}: got {e:?}, want {want:?}");
        assert!(e.starts_with("shardstore: "), "{e}");
    }
    // `serve` refuses the same way, before creating anything.
    let f = write(&dir, "serve.toml", "\n\nshards = \"two\"\n");
    let data = dir.join("never-created");
    let e = error(&run(
        &[
            "serve",
            "--config",
            &f,
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[],
    ));
    assert!(e.contains("serve.toml:3: shards: invalid type"), "{e}");
    assert!(!data.exists());
    // A flag value is checked like a file value.
    let e = error(&run(&["config", "show", "--max-chunk-size", "0"], &[]));
    assert!(e.contains("max_chunk_size:"), "{e}");
    // Oversubscription needs the explicit override.
    let n = std::thread::available_parallelism().unwrap().get() + 1;
    let n = n.to_string();
    let args = ["config", "show", "--io-memory-kib", "64", "--shards", &n];
    let e = error(&run(&args, &[]));
    assert!(
        e.contains(&format!("shards: {n} shards but only")) && e.contains("allow_oversubscribe"),
        "{e}"
    );
    let f = write(
        &dir,
        "over.toml",
        &format!("shards = {n}\nio_memory_kib = 64\n"),
    );
    let e = error(&run(&["config", "check", &f], &[]));
    assert!(e.contains("shards:"), "{e}");
    stdout(&run(&[&args[..], &["--allow-oversubscribe"]].concat(), &[]));
    // A missing file.
    let e = error(&run(&["config", "check", "/nonexistent.toml"], &[]));
    assert!(
        e.contains("/nonexistent.toml: cannot read config file"),
        "{e}"
    );
}

#[test]
fn tmpfs_data_dir_is_refused() {
    let shm = Path::new("/dev/shm");
    let on_tmpfs = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/dev/shm") && l.contains(" tmpfs "));
    if !shm.is_dir() || !on_tmpfs {
        eprintln!("skipped: /dev/shm is not a tmpfs mount here");
        return;
    }
    let e = error(&run(
        &["config", "show", "--data-dir", "/dev/shm/shardstore-test/x"],
        &[],
    ));
    assert!(
        e.contains("data_dir: /dev/shm/shardstore-test/x is on tmpfs"),
        "{e}"
    );
}

#[test]
fn default_config_is_the_deploy_example() {
    let printed = stdout(&run(&["config", "default"], &[]));
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/shardstore.toml");
    let file = std::fs::read_to_string(&path).unwrap();
    assert!(
        printed == file,
        "deploy/shardstore.toml is out of date: regenerate it with \
         `cargo run --bin shardstore -- config default > deploy/shardstore.toml`"
    );
    let ok = stdout(&run(&["config", "check", path.to_str().unwrap()], &[]));
    assert!(ok.ends_with(": ok\n"), "{ok}");
}

/// `config check` runs in the operator's shell, whose locked-memory limit
/// is not the service's: a refusal for io_memory_kib says so, and
/// `--memlock-unlimited` checks as the packaged unit runs the server.
#[test]
fn config_check_can_check_as_the_unit_runs() {
    // SAFETY: getrlimit only fills a plain struct.
    let memlock = unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r);
        r.rlim_cur
    };
    let dir = data_dir("cfg-memlock");
    // 64 MiB per shard, above any default locked-memory limit.
    let conf = write(&dir, "m.toml", "io_memory_kib = 65536\nshards = 1\n");
    if memlock != libc::RLIM_INFINITY && memlock < 64 << 20 {
        let e = error(&run(&["config", "check", &conf], &[]));
        assert!(
            e.contains("io_memory_kib") && e.contains("--memlock-unlimited"),
            "{e}"
        );
    } else {
        eprintln!("first half skipped: this process's locked-memory limit is {memlock}");
    }
    let out = stdout(&run(
        &["config", "check", "--memlock-unlimited", &conf],
        &[],
    ));
    assert!(out.contains(": ok"), "{out}");
}

/// The locked-memory check at start-up counts the data folder's shards, not
/// only the configured ones: a folder made with 8 shards, started with one
/// shard per CPU in mind, used to pass the check and leave glommio to fail
/// (or, as root, to lock past the limit).
#[test]
fn the_memlock_check_counts_the_data_folders_shards() {
    let dir = data_dir("cfg-memlock-folder");
    std::fs::write(
        dir.join("shardstore.node"),
        "# shardstore node identity; do not edit\nformat = 1\n\
         node_id = 0000000000000000000000000000abcd\nshard_count = 8\n",
    )
    .unwrap();
    // 1 MiB x 1 shard (one per CPU of `--cpus 0`) fits 4 MiB; x 8 does not.
    let o = Command::new("bash")
        .args([
            "-c",
            "ulimit -l 4096 && exec \"$0\" serve --data-dir \"$1\" --listen 127.0.0.1:0 \
             --io-memory-kib 1024 --capacity-mib 16 --cpus 0 --allow-oversubscribe",
            bin(),
            dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "started: {e}");
    assert!(
        e.contains("io_memory_kib: 1024 KiB x 8 shards") && e.contains("has 8 shards"),
        "{e}"
    );
}
