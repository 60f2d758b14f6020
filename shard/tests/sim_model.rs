//! Randomized model test on the simulated disk (sled's `fuzz_model` habit,
//! TigerBeetle's storage faults): random writes, overwrites, reads, deletes,
//! sweeps (tombstone retirement), writes cancelled midway (a client going
//! away), and `Reboot` steps that crash the disk
//! while operations (and sometimes a sweep) are in flight
//! (unsynced writes lost, torn at 512 B or reordered; the index store keeps
//! its last checkpoint, or the one being flushed), for many seeds, against a
//! `BTreeMap`.
//!
//! After every reboot: every acknowledged write is visible byte for byte,
//! every unacknowledged one is wholly there or wholly absent, and no read
//! fails with CORRUPT (invariants 2-5). At the end the index is wiped and
//! rebuilt from the data area, and must hold exactly the same chunks. Some
//! seeds also inject EIO on writes and flushes (fail-stop) and ENOSPC.
//!
//! `SHARDSTORE_SIM_SEEDS=N` runs N seeds (default 40); a failure prints its
//! seed, and `SHARDSTORE_SIM_SEED=S` replays just that one;
//! `SHARDSTORE_SIM_TRACE=1` prints each seed as it starts (to find one that
//! hangs).
mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use common::*;
use shardstore_proto::ChunkId;
use shardstore_shard::{Shard, ShardConfig, ShardError, SimDisk, SimFaults, SimRng};

const CAPACITY: u64 = 3 * MIB;

/// `seed / 3 % 3` picks how a write is made durable, so the model checks
/// every way: all writes O_DSYNC, group commit, or adaptive (O_DSYNC when
/// alone, group commit when concurrent: bursts mix both); seeds modulo 3
/// pick the cache size, and `seed / 9 % 3` write combining (one combined
/// write at the device at a time, the default, or none).
fn sim_config(seed: u64) -> ShardConfig {
    let mode = seed / 3 % 3;
    ShardConfig {
        write_through: mode == 0,
        adaptive_sync: mode == 2,
        shard: shardstore_proto::ShardId(0),
        shard_count: 1,
        node_id: NODE,
        capacity_bytes: CAPACITY,
        // Small reservations: many checkpoints, and recovery scans that
        // start from all kinds of checkpoints.
        checkpoint_bytes: 256 * 1024,
        checkpoint_interval_ms: 5,
        // No cache, a tiny one (constant eviction), or one large enough for
        // read-ahead: reads must return the model's bytes in every case.
        cache_bytes: [0, 96 << 10, 8 << 20][(seed % 3) as usize],
        combine_in_flight: [1, ShardConfig::DEFAULT_COMBINE_IN_FLIGHT, 0][(seed / 9 % 3) as usize],
        ..ShardConfig::default()
    }
}

/// What the model knows of a chunk: certain content, or (after a crash or
/// an I/O error) a set of allowed outcomes.
#[derive(Clone, Debug)]
enum State {
    Present(Vec<u8>),
    Absent,
}

type Model = BTreeMap<ChunkId, Vec<State>>;

fn apply_write(old: &State, off: usize, data: &[u8]) -> State {
    let mut b = match old {
        State::Present(b) => b.clone(),
        State::Absent => Vec::new(),
    };
    if b.len() < off + data.len() {
        b.resize(off + data.len(), 0);
    }
    b[off..off + data.len()].copy_from_slice(data);
    State::Present(b)
}

fn certain(model: &Model, c: ChunkId) -> Option<&State> {
    match model.get(&c) {
        None => Some(&State::Absent),
        Some(v) if v.len() == 1 => Some(&v[0]),
        _ => None,
    }
}

/// Reads every chunk the model knows and resolves uncertain ones.
async fn check_all(seed: u64, shard: &Shard, model: &mut Model) {
    let keys: Vec<ChunkId> = model.keys().copied().collect();
    for c in keys {
        let got = match shard.read(c, 0, 1 << 20).await {
            Ok(r) => State::Present(r.data.to_vec()),
            Err(ShardError::NotFound(_)) => State::Absent,
            Err(e) => panic!("seed {seed}: chunk {c}: read failed after reboot: {e}"),
        };
        let allowed = &model[&c];
        let ok = allowed.iter().any(|s| match (s, &got) {
            (State::Absent, State::Absent) => true,
            (State::Present(a), State::Present(b)) => a == b,
            _ => false,
        });
        assert!(
            ok,
            "seed {seed}: chunk {c}: content after reboot is none of the {} allowed outcomes (got {})",
            allowed.len(),
            match &got {
                State::Absent => "absent".to_string(),
                State::Present(b) => format!("{} bytes", b.len()),
            }
        );
        match got {
            State::Absent => {
                model.remove(&c);
            }
            s => {
                model.insert(c, vec![s]);
            }
        }
    }
    let (items, _) = shard.list(None, 10_000).unwrap();
    let listed: Vec<ChunkId> = items.iter().map(|i| i.chunk).collect();
    let expected: Vec<ChunkId> = model.keys().copied().collect();
    assert_eq!(listed, expected, "seed {seed}: LIST differs from the model");
    let s = shard.stats();
    assert_eq!(
        s.corrupt_errors, 0,
        "seed {seed}: CORRUPT from our own protocol"
    );
    assert_eq!(s.chunks, model.len() as u64, "seed {seed}: chunk count");
}

fn random_write(rng: &mut SimRng, seed: u64, step: u64) -> (u64, Vec<u8>) {
    let off = if rng.below(3) == 0 {
        rng.below(64) * 4096
    } else {
        rng.below(300_000)
    };
    let len = match rng.below(10) {
        0 => 1 + rng.below(200_000),
        1..=3 => 4096,
        _ => 1 + rng.below(12_000),
    };
    (off, pattern(seed * 1_000_003 + step, len as usize))
}

fn run_seed(seed: u64) {
    let disk = SimDisk::new(CAPACITY + 64 * 1024, seed);
    let mut rng = SimRng::new(seed ^ 0xabcdef);
    let with_errors = seed % 4 == 3;
    let mut model: Model = BTreeMap::new();
    let mut step = 0u64;
    for _boot in 0..5 {
        let m = run(|| async {
            let mut model = std::mem::take(&mut model);
            let shard = Rc::new(
                Shard::open_sim(sim_config(seed), &disk)
                    .await
                    .unwrap_or_else(|e| panic!("seed {seed}: open after reboot: {e}")),
            );
            check_all(seed, &shard, &mut model).await;
            if with_errors {
                disk.set_faults(SimFaults {
                    write_eio: 40,
                    flush_eio: 60,
                    write_enospc: 50,
                    ..SimFaults::default()
                });
            }
            // Sequential steps: each acknowledged result is certain.
            for _ in 0..60 {
                step += 1;
                if rng.below(25) == 0 {
                    // Retires tombstones; must not change what reads see.
                    // Sometimes given up midway (an admin's client gone):
                    // its zero writes may outlive it.
                    let task = {
                        let shard = shard.clone();
                        glommio::spawn_local(async move {
                            let _ = shard.sweep_now().await;
                        })
                    };
                    if rng.below(4) == 0 {
                        for _ in 0..rng.below(40) {
                            futures_lite::future::yield_now().await;
                        }
                        drop(task);
                    } else {
                        task.await;
                    }
                }
                let c = ChunkId(rng.below(8) as u128);
                match rng.below(10) {
                    0..=5 => {
                        // After an I/O error a chunk stays uncertain until
                        // the reboot resolves it: leave it alone.
                        let Some(old) = certain(&model, c).cloned() else {
                            continue;
                        };
                        let (off, data) = random_write(&mut rng, seed, step);
                        let new = apply_write(&old, off as usize, &data);
                        if rng.below(10) == 0 {
                            // A request given up midway (its client went
                            // away) after a random number of scheduling
                            // rounds: unknown outcome until the next
                            // reboot, and no later rebuild may revive it.
                            let task = {
                                let shard = shard.clone();
                                glommio::spawn_local(async move {
                                    let _ = shard.write(c, off, &data).await;
                                })
                            };
                            for _ in 0..rng.below(6) {
                                futures_lite::future::yield_now().await;
                            }
                            drop(task);
                            model.insert(c, vec![old, new]);
                            continue;
                        }
                        let res = shard.write(c, off, &data).await;
                        match res {
                            Ok(_) => {
                                model.insert(c, vec![new]);
                            }
                            Err(ShardError::NoSpace { .. }) | Err(ShardError::ReadOnly) => {}
                            Err(ShardError::Io { .. }) if with_errors => {
                                // Unknown outcome until the next reboot.
                                model.insert(c, vec![old, new]);
                            }
                            Err(e) => panic!("seed {seed} step {step}: write {c}: {e}"),
                        }
                    }
                    6..=7 => {
                        if certain(&model, c).is_none() {
                            continue;
                        }
                        let off = rng.below(320_000);
                        let len = rng.below(70_000) as u32;
                        match (shard.read(c, off, len).await, certain(&model, c).unwrap()) {
                            (Ok(r), State::Present(b)) => {
                                let s = (off as usize).min(b.len());
                                let e = (off as usize + len as usize).min(b.len());
                                assert!(
                                    r.data.to_vec() == b[s..e],
                                    "seed {seed} step {step}: read {c}"
                                );
                            }
                            (Err(ShardError::NotFound(_)), State::Absent) => {}
                            (r, _) => panic!(
                                "seed {seed} step {step}: read {c}: {:?}",
                                r.map(|r| r.version)
                            ),
                        }
                    }
                    _ => {
                        let Some(old) = certain(&model, c).cloned() else {
                            continue;
                        };
                        match (shard.delete(c).await, &old) {
                            (Ok(_), State::Present(_)) => {
                                model.remove(&c);
                            }
                            (Err(ShardError::NotFound(_)), State::Absent) => {}
                            (Err(ShardError::ReadOnly), _)
                            | (Err(ShardError::NoSpace { .. }), _) => {}
                            (Err(ShardError::Io { .. }), State::Present(_)) if with_errors => {
                                model.insert(c, vec![old, State::Absent]);
                            }
                            (r, _) => panic!("seed {seed} step {step}: delete {c}: {r:?}"),
                        }
                    }
                }
            }
            disk.set_faults(SimFaults::default());
            // The crash: concurrent operations on distinct chunks, cut off
            // after a random number of scheduling rounds.
            let done: Rc<RefCell<Vec<(ChunkId, State)>>> = Rc::default();
            let mut tasks = Vec::new();
            let mut inflight: Vec<(ChunkId, State, State)> = Vec::new();
            for k in 0..(1 + rng.below(6)) {
                let c = ChunkId(100 + k as u128 + 10 * rng.below(2) as u128);
                if inflight.iter().any(|(x, _, _)| *x == c) {
                    continue;
                }
                let Some(old) = certain(&model, c).cloned() else {
                    continue;
                };
                step += 1;
                let delete = rng.below(5) == 0 && matches!(old, State::Present(_));
                let (off, data) = random_write(&mut rng, seed, step);
                let new = if delete {
                    State::Absent
                } else {
                    apply_write(&old, off as usize, &data)
                };
                inflight.push((c, old, new.clone()));
                let shard = shard.clone();
                let done = done.clone();
                tasks.push(glommio::spawn_local(async move {
                    let ok = if delete {
                        shard.delete(c).await.is_ok()
                    } else {
                        shard.write(c, off, &data).await.is_ok()
                    };
                    if ok {
                        done.borrow_mut().push((c, new));
                    }
                }));
            }
            if rng.below(3) == 0 {
                // A sweep cut off by the crash too.
                let shard = shard.clone();
                tasks.push(glommio::spawn_local(async move {
                    let _ = shard.sweep_now().await;
                }));
            }
            for _ in 0..rng.below(12) {
                futures_lite::future::yield_now().await;
            }
            drop(tasks); // cancels whatever has not finished
            let acked = done.borrow().clone();
            for (c, old, new) in inflight {
                match acked.iter().find(|(x, _)| *x == c) {
                    Some((_, s)) => {
                        model.insert(c, vec![s.clone()]);
                    }
                    None => {
                        model.insert(c, vec![old, new]);
                    }
                }
            }
            drop(shard);
            model
        });
        model = m;
        // Drop states that say "absent" only.
        model.retain(|_, v| v.iter().any(|s| matches!(s, State::Present(_))) || v.len() > 1);
        disk.crash();
    }
    // A final reboot checks the last crash.
    run(|| async {
        let shard = Shard::open_sim(sim_config(seed), &disk)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: final open: {e}"));
        check_all(seed, &shard, &mut model).await;
        assert!(
            shard.verify().await.unwrap().problems.is_empty(),
            "seed {seed}: verify"
        );
        shard.close().await.unwrap();
    });
    // Then the index is lost: rebuilt from the data area alone, the shard
    // holds the same chunks (nothing deleted comes back, nothing live is
    // lost, including extents partly overwritten whose old space was reused).
    disk.kv().wipe();
    run(|| async {
        let mut cfg = sim_config(seed);
        cfg.rebuild_index = true;
        let shard = Shard::open_sim(cfg, &disk)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: rebuild: {e}"));
        check_all(seed, &shard, &mut model).await;
    });
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("SHARDSTORE_SIM_SEED") {
        return vec![s.parse().expect("SHARDSTORE_SIM_SEED is a number")];
    }
    let n: u64 = std::env::var("SHARDSTORE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    // Each seed's executors leak a descriptor (glommio), so very long runs
    // are split: SHARDSTORE_SIM_FIRST_SEED starts a run further on.
    let first: u64 = std::env::var("SHARDSTORE_SIM_FIRST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    (first..first + n).collect()
}

#[test]
fn model_with_crashes_many_seeds() {
    let trace = std::env::var_os("SHARDSTORE_SIM_TRACE").is_some();
    for seed in seeds() {
        if trace {
            eprintln!("seed {seed}");
        }
        let r = std::panic::catch_unwind(|| run_seed(seed));
        if let Err(e) = r {
            eprintln!("FAILING SEED: {seed} (replay with SHARDSTORE_SIM_SEED={seed})");
            std::panic::resume_unwind(e);
        }
    }
}
