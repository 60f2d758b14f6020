//! deploy/: install.sh into a DESTDIR tree (twice: idempotent), the unit
//! through `systemd-analyze verify`, and the Debian package's contents.
//!
//! A tool that is missing skips its test with a printed reason, except under
//! CI (CI=true), where .ci/run installs them and a skip would hide a break.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn have(tool: &str, probe: &[&str]) -> bool {
    let ok = Command::new(tool)
        .args(probe)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "{tool} is missing in CI: .ci/run must install it"
        );
        eprintln!("skipped: {tool} is not installed");
    }
    ok
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Runs install.sh into `root` with `env` set; its success and output.
fn run_install(root: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new("sh")
        .arg(repo().join("deploy/install.sh"))
        .arg(bin())
        .env("DESTDIR", root)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn install(root: &Path) -> String {
    let (ok, text) = run_install(root, &[]);
    assert!(ok, "install.sh failed: {text}");
    text
}

#[test]
fn install_sh_into_destdir() {
    let root = data_dir("destdir");
    install(&root);
    let bin_path = root.join("usr/bin/shardstore");
    let unit = root.join("usr/lib/systemd/system/shardstore.service");
    let conf = root.join("etc/shardstore/shardstore.toml");
    let data = root.join("var/lib/shardstore");
    let sysusers = root.join("usr/lib/sysusers.d/shardstore.conf");
    assert_eq!(mode(&bin_path), 0o755);
    assert_eq!(mode(&unit), 0o644);
    assert_eq!(mode(&conf), 0o640);
    assert_eq!(mode(&data), 0o750);
    assert!(std::fs::read_to_string(&sysusers)
        .unwrap()
        .starts_with("u shardstore "));
    assert_eq!(
        std::fs::read(&unit).unwrap(),
        std::fs::read(repo().join("deploy/shardstore.service")).unwrap()
    );
    // The installed binary runs and accepts the installed config.
    let out = Command::new(&bin_path)
        .args(["config", "check"])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Again: idempotent, and an operator's edit to the config survives.
    std::fs::write(&conf, "capacity_mib = 7\n").unwrap();
    let text = install(&root);
    assert!(text.contains("kept your"), "{text}");
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        "capacity_mib = 7\n"
    );
    assert!(root.join("etc/shardstore/shardstore.toml.dist").exists());
    let mut files: Vec<String> = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p.strip_prefix(&root).unwrap().display().to_string());
            }
        }
    }
    files.sort();
    assert_eq!(
        files,
        [
            "etc/shardstore/shardstore.toml",
            "etc/shardstore/shardstore.toml.dist",
            "usr/bin/shardstore",
            "usr/lib/systemd/system/shardstore.service",
            "usr/lib/sysusers.d/shardstore.conf",
        ]
    );
}

/// With BINDIR the installed unit runs the binary where it was put (it
/// used to keep /usr/bin/shardstore, which was not there); only the
/// ExecStart line differs. A BINDIR that cannot go into the unit as is
/// is refused before anything is installed.
#[test]
fn install_sh_bindir_moves_execstart() {
    let root = data_dir("destdir-bindir");
    let (ok, text) = run_install(&root, &[("BINDIR", "/usr/local/bin")]);
    assert!(ok, "install.sh failed: {text}");
    assert_eq!(mode(&root.join("usr/local/bin/shardstore")), 0o755);
    assert!(!root.join("usr/bin").exists());
    let unit =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/shardstore.service")).unwrap();
    let shipped = std::fs::read_to_string(repo().join("deploy/shardstore.service")).unwrap();
    let exec = |u: &str| -> Vec<String> {
        u.lines()
            .filter(|l| l.starts_with("ExecStart="))
            .map(String::from)
            .collect()
    };
    assert_eq!(
        exec(&unit),
        ["ExecStart=/usr/local/bin/shardstore serve --config /etc/shardstore/shardstore.toml"]
    );
    assert_eq!(
        unit.replace("ExecStart=/usr/local/bin/", "ExecStart=/usr/bin/"),
        shipped
    );

    for bad in ["usr/local/bin", "/opt/my bin", "/opt/a|b"] {
        let root = data_dir("destdir-badbindir");
        let (ok, text) = run_install(&root, &[("BINDIR", bad)]);
        assert!(!ok, "BINDIR {bad:?} was accepted: {text}");
        assert!(text.contains("BINDIR"), "{text}");
        assert!(
            std::fs::read_dir(&root).unwrap().next().is_none(),
            "{bad:?}: something was installed"
        );
    }
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    if !have("systemd-analyze", &["--version"]) {
        return;
    }
    // verify wants ExecStart's binary to exist: point it at the built one.
    let dir = data_dir("unit");
    let text = std::fs::read_to_string(repo().join("deploy/shardstore.service")).unwrap();
    for want in [
        "Type=notify",
        "User=shardstore",
        "LimitMEMLOCK=",
        "LimitNOFILE=",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/shardstore",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
        "RestrictAddressFamilies=",
        "Restart=on-failure",
        // A start refused for good is not retried every 2 s forever.
        "StartLimitBurst=",
        "CPUAffinity",
    ] {
        assert!(text.contains(want), "unit lacks {want}");
    }
    assert!(
        !text.lines().any(|l| l.starts_with("ExecReload")),
        "settings apply at start only: a reload would report a change it did not make"
    );
    assert!(
        !text.lines().any(|l| l.starts_with("SystemCallFilter")),
        "a syscall filter may block io_uring"
    );
    let unit = dir.join("shardstore.service");
    std::fs::write(&unit, text.replace("/usr/bin/shardstore", bin())).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );
}

#[test]
fn debian_package_contents() {
    if !have("cargo", &["deb", "--version"]) || !have("dpkg-deb", &["--version"]) {
        return;
    }
    // Package the binary this test run already built (dev profile), with
    // fast compression: the packaging is under test, not the optimizer.
    let out_dir = data_dir("deb");
    let out = Command::new(env!("CARGO"))
        .current_dir(repo())
        .args([
            "deb",
            "-p",
            "shardstore-server",
            "--no-build",
            "--profile",
            "dev",
            "--no-strip",
            "--fast",
            "-o",
        ])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo deb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");
    let list = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    for (path, perms) in [
        ("./usr/bin/shardstore", "-rwxr-xr-x"),
        ("./usr/lib/systemd/system/shardstore.service", "-rw-r--r--"),
        ("./etc/shardstore/shardstore.toml", "-rw-r-----"),
        ("./usr/share/doc/shardstore/README.md", "-rw-r--r--"),
    ] {
        assert!(
            list.lines()
                .any(|l| l.starts_with(perms) && l.ends_with(path)),
            "{path} ({perms}) missing from the package:\n{list}"
        );
    }
    let info = Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout).into_owned();
    assert!(info.contains("Package: shardstore"), "{info}");
    assert!(info.contains("adduser"), "{info}");
    let dir = out_dir.join("control");
    let st = Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        std::fs::read_to_string(dir.join("conffiles"))
            .unwrap()
            .trim(),
        "/etc/shardstore/shardstore.toml"
    );
    let postinst = std::fs::read_to_string(dir.join("postinst")).unwrap();
    assert!(postinst.contains("adduser --system"), "{postinst}");
}
