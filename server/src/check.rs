//! `shardstore check --data-dir D [--rebuild]`: offline verification of a
//! stopped server's data, and the index rebuild from the data areas.
//!
//! For every shard, in a glommio executor of its own: open the shard (which
//! runs the normal recovery, or with `--rebuild` discards the index and
//! rebuilds it from the whole data area), then read and check every live
//! sector, every tombstone and both superblock copies. Prints one line per
//! shard and exits non-zero if anything is wrong. The server must be
//! stopped: the shard's files are opened for writing (recovery records a
//! checkpoint).

use anyhow::{bail, Context};
use clap::Args;
use glommio::{LocalExecutorBuilder, Placement};
use shardstore_proto::ShardId;
use shardstore_shard::{Shard, ShardConfig};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The data folder of a stopped server.
    #[arg(long, env = "SHARDSTORE_DATA_DIR", default_value = "./shardstore-data")]
    data_dir: PathBuf,
    /// Discard each shard's index and rebuild it from the data area.
    #[arg(long)]
    rebuild: bool,
    /// The block device the server was started with (`serve --device`).
    #[arg(long)]
    device: Option<PathBuf>,
    /// glommio registered I/O memory, KiB: 64 to 1048576, as `serve`'s
    /// `io_memory_kib` (bounded so the bytes cannot overflow).
    #[arg(long, default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(64..=crate::config::MAX_IO_MEMORY_KIB))]
    io_memory_kib: u64,
}

/// Reads `node_id` and `shard_count` from the node identity file.
fn read_node_file(data_dir: &Path) -> anyhow::Result<(u128, u32)> {
    let path = data_dir.join("shardstore.node");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (is this a shardstore data folder?)",
            path.display()
        )
    })?;
    let mut node = None;
    let mut count = None;
    for line in text.lines().map(str::trim) {
        if let Some((k, v)) = line.split_once('=') {
            match k.trim() {
                "node_id" => node = Some(u128::from_str_radix(v.trim(), 16)?),
                "shard_count" => count = Some(v.trim().parse::<u32>()?),
                _ => {}
            }
        }
    }
    match (node, count) {
        (Some(n), Some(c)) => Ok((n, c)),
        _ => bail!("{}: missing node_id or shard_count", path.display()),
    }
}

pub fn run(a: CheckArgs) -> anyhow::Result<ExitCode> {
    // As root on the service account's folder: become that account first
    // (see `owner`).
    if let Some((uid, gid)) = crate::owner::become_folder_owner(&a.data_dir)? {
        println!(
            "running as {uid}:{gid}, the owner of {}",
            a.data_dir.display()
        );
    }
    let (node_id, shard_count) = read_node_file(&a.data_dir)?;
    let ranges = match &a.device {
        Some(p) => Some(shardstore_shard::split_device(p, shard_count)?),
        None => None,
    };
    let mut bad = 0usize;
    for i in 0..shard_count {
        let dir = a.data_dir.join(ShardConfig::folder_name(ShardId(i)));
        // `check` never creates a shard: opening a missing one would format
        // it empty (and a data file made here, on a device-backed node,
        // would leave an index that does not describe the device).
        if !dir.is_dir() {
            println!(
                "shard {i}: {} is missing (restore it from a backup; `serve --format` creates it empty)",
                dir.display()
            );
            bad += 1;
            continue;
        }
        let data_len = match (std::fs::metadata(dir.join("data")), &ranges) {
            (Ok(m), _) => m.len(),
            (Err(_), Some(_)) => 0,
            (Err(e), None) => {
                println!(
                    "shard {i}: {}: {e} (if this node keeps its data on a block device, pass --device DEV)",
                    dir.join("data").display()
                );
                bad += 1;
                continue;
            }
        };
        let cfg = ShardConfig {
            shard: ShardId(i),
            shard_count,
            node_id,
            dir: dir.clone(),
            capacity_bytes: data_len
                .saturating_sub(2 * shardstore_shard::SECTOR)
                .max(1 << 20),
            device: ranges.as_ref().map(|r| r[i as usize].clone()),
            rebuild_index: a.rebuild,
            checkpoint_interval_ms: 3_600_000,
            ..ShardConfig::default()
        };
        if a.rebuild {
            let index = dir.join("index");
            if index.exists() {
                // Held while the index is removed: a server starting
                // meanwhile finds it locked.
                let _lock = refuse_if_locked(&index.join("db"))?;
                std::fs::remove_dir_all(&index)
                    .with_context(|| format!("removing {}", index.display()))?;
            }
        }
        let ex = LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory((a.io_memory_kib << 10) as usize)
            .make()
            .map_err(|e| anyhow::anyhow!("starting an executor: {e}"))?;
        let res: anyhow::Result<usize> = ex.run(async move {
            let shard = Shard::open(cfg).await?;
            let rec = shard.recovery_report();
            let v = shard.verify().await?;
            shard.close().await?;
            println!(
                "shard {i}: {} chunks, {} extents, {} sectors, {} tombstones checked; {} of 2 superblock copies ok; \
                 {} problems; recovery {} us ({} extents replayed, {} discarded{})",
                v.chunks,
                v.extents,
                v.sectors,
                v.tombstones,
                v.superblock_copies_ok,
                v.problems.len(),
                rec.elapsed_us,
                rec.replayed + rec.replayed_tombstones,
                rec.discarded,
                if rec.rebuilt { ", index rebuilt from the data area" } else { "" }
            );
            for (chunk, sector, why) in &v.problems {
                println!("shard {i}: chunk {chunk} sector {sector}: {why}");
            }
            Ok(v.problems.len())
        });
        match res {
            Ok(n) => bad += n,
            Err(e) => {
                println!("shard {i}: {e:#}");
                bad += 1;
            }
        }
    }
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Takes sled's lock on an index file (the same `flock` sled takes), or
/// fails if it is held: a server is running on this data folder, and
/// removing its index would not stop it but would leave it without one at
/// its next start. The lock is held until the returned file is dropped.
fn refuse_if_locked(db: &std::path::Path) -> anyhow::Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(db) else {
        return Ok(None); // no index file: nothing holds it
    };
    // SAFETY: flock on a descriptor this function owns; the lock goes with it.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            anyhow::bail!(
                "{} is locked: a server is using this data folder; stop it before `check --rebuild`",
                db.display()
            );
        }
        // Unknown whether a server holds it: do not delete it blind.
        anyhow::bail!(
            "could not lock {} to see whether a server uses it: {e}",
            db.display()
        );
    }
    Ok(Some(f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        check: CheckArgs,
    }

    /// `--io-memory-kib` has `serve`'s bounds: a value whose bytes would
    /// overflow (it was an unbounded usize shifted by 10) is refused by
    /// the parser, naming the range.
    #[test]
    fn io_memory_kib_is_bounded_as_serves() {
        let parse = |v: &str| Cli::try_parse_from(["check", "--io-memory-kib", v]);
        let max = crate::config::MAX_IO_MEMORY_KIB;
        assert_eq!(parse("64").unwrap().check.io_memory_kib, 64);
        assert_eq!(parse(&max.to_string()).unwrap().check.io_memory_kib, max);
        for bad in ["63", &(max + 1).to_string(), "18014398509481984", "0"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("64..=1048576"), "{bad}: {e}");
        }
        assert_eq!(
            Cli::try_parse_from(["check"]).unwrap().check.io_memory_kib,
            1024
        );
    }
}
