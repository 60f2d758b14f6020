//! The background scrubber: re-reads and verifies every live sector over a
//! configurable period, on its own glommio task queue with low shares so
//! foreground requests win the CPU and the ring when both are ready.
//!
//! One extent record at a time: look it up and read it inside one reclaim
//! epoch (so its space cannot be reused in between), check each sector's
//! crc and its header, then sleep enough to spread the pass over the
//! period; at the end of a pass, every tombstone. A bad sector, header or
//! tombstone is logged (chunk, sector) and counted; it is never repaired
//! here (there is no second copy on one node).
//!
//! Before each scrub pass (so also soon after start-up) the same task runs
//! a sweep pass (see `sweep`) when the shard holds tombstones.

use std::cell::Cell;
use std::rc::Weak;
use std::time::{Duration, Instant};

use glommio::{Latency, Shares};
use shardstore_proto::ChunkId;

use crate::layout::{sector_crc, DiskSector, LogicalSector, SECTOR};
use crate::shard::{bump, Inner};
use crate::sweep::SweepPass;

/// Shares of the scrub task queue (the default queue has 1000).
pub const SCRUB_SHARES: usize = 25;

#[derive(Default)]
pub struct ScrubCounters {
    pub passes: Cell<u64>,
    pub sectors: Cell<u64>,
    pub errors: Cell<u64>,
}

/// Checks the extent record after `after` (its sectors and its header);
/// returns its key and the bad ones found, or None at the end.
async fn step(
    inner: &Inner,
    after: Option<(ChunkId, LogicalSector)>,
) -> Option<(ChunkId, LogicalSector, u64)> {
    let _epoch = inner.begin_read();
    let (chunk, rec) = inner.index.extent_after(after)?;
    // An extent the device cannot read whole (a media error) is read again
    // sector by sector: each unreadable sector is a bad one, and the pass
    // goes on (stopping there kept every later extent from being scrubbed).
    let whole = match inner.io.read(rec.disk, rec.count()).await {
        Ok(rb) => Some(rb),
        Err(e) => {
            tracing::warn!(shard = inner.id.0, chunk = %chunk, disk_sector = rec.disk.0, error = %e,
                "scrub: extent unreadable; reading it sector by sector");
            None
        }
    };
    let mut bad = 0;
    for (i, crc) in rec.crcs.iter().enumerate() {
        let logical = LogicalSector(rec.logical.0 + i as u64);
        let disk_sector = rec.disk.0 + i as u64;
        let one;
        let s: &[u8] = match &whole {
            Some(rb) => &rb[i * SECTOR as usize..(i + 1) * SECTOR as usize],
            None => match inner.io.read(DiskSector(disk_sector), 1).await {
                Ok(rb) => {
                    one = rb;
                    &one
                }
                Err(e) => {
                    bad += 1;
                    tracing::error!(shard = inner.id.0, chunk = %chunk, sector = logical.0,
                        disk_sector, error = %e, "scrub: sector unreadable");
                    continue;
                }
            },
        };
        if sector_crc(chunk, logical, rec.generation, s) != *crc {
            bad += 1;
            tracing::error!(
                shard = inner.id.0,
                chunk = %chunk,
                sector = logical.0,
                disk_sector,
                "scrub: sector checksum mismatch"
            );
        }
    }
    // Its header too (shared by the records an overwrite split the extent
    // into: checked, and counted, with each): a damaged one would make a
    // rebuild from the data area drop the extent.
    if !crate::recover::header_intact(inner, chunk, &rec).await {
        bad += 1;
        damaged(inner, chunk, rec.header, "extent header");
    }
    bump(&inner.scrub.sectors, rec.count());
    bump(&inner.scrub.errors, bad);
    Some((chunk, rec.logical, bad))
}

/// Logs a header or tombstone that did not read back intact.
fn damaged(inner: &Inner, chunk: ChunkId, at: DiskSector, what: &str) {
    tracing::error!(
        shard = inner.id.0,
        chunk = %chunk,
        disk_sector = at.0,
        "scrub: {what} damaged or unreadable"
    );
}

/// Ends a pass: checks the tombstones, counts the pass; returns the bad
/// tombstones.
async fn end_pass(inner: &Inner) -> u64 {
    let bad = tombstones(inner).await;
    bump(&inner.scrub.passes, 1);
    bad
}

/// Checks every tombstone the index records (a damaged one would let a
/// rebuild bring its deleted chunk back); returns how many are bad.
async fn tombstones(inner: &Inner) -> u64 {
    let mut bad = 0;
    for (chunk, t) in inner.index.tombs() {
        // Read inside a reclaim epoch, and counted only if the index still
        // holds this tombstone after: one deleted again, or retired, since
        // the list was taken may have had its sector freed and reused.
        let _epoch = inner.begin_read();
        if !crate::recover::tombstone_intact(inner, chunk, &t).await
            && inner.index.get_tomb(chunk) == Some(t)
        {
            bad += 1;
            damaged(inner, chunk, t.disk, "tombstone");
        }
    }
    bump(&inner.scrub.errors, bad);
    bad
}

/// One full pass; `pace` is slept between extents. Returns bad sectors found.
pub(crate) async fn pass(inner: &Inner, pace: Option<Duration>) -> u64 {
    let mut after = None;
    let mut bad = 0;
    while let Some((c, l, b)) = step(inner, after).await {
        after = Some((c, l));
        bad += b;
        if let Some(p) = pace {
            glommio::timer::sleep(p).await;
        }
    }
    bad + end_pass(inner).await
}

/// A sweep pass (see `sweep`) before each scrub pass, spread over at most a
/// quarter of the scrub period (and at least one window per second), holding
/// the shard only while a window is read.
async fn sweep_paced(weak: &Weak<Inner>, period: Duration) {
    let started = match weak.upgrade() {
        Some(inner) => SweepPass::start(&inner).await,
        None => return,
    };
    let mut pass = match started {
        Ok(Some(p)) => p,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "sweep could not start");
            return;
        }
    };
    let pace = (period / 4)
        .checked_div(pass.windows_left().max(1) as u32)
        .unwrap_or_default()
        .min(Duration::from_secs(1));
    loop {
        let Some(inner) = weak.upgrade() else { return };
        match pass.step(&inner).await {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                tracing::warn!(shard = inner.id.0, error = %e, "sweep step failed");
                return;
            }
        }
        drop(inner);
        glommio::timer::sleep(pace).await;
    }
    let Some(inner) = weak.upgrade() else { return };
    if let Err(e) = pass.finish(&inner).await {
        tracing::warn!(shard = inner.id.0, error = %e, "sweep failed");
    }
}

/// Starts the scrubber on a low-shares task queue.
pub(crate) fn spawn(weak: Weak<Inner>, period: Duration) {
    let tq = glommio::executor().create_task_queue(
        Shares::Static(SCRUB_SHARES),
        Latency::NotImportant,
        "scrub",
    );
    let task = glommio::spawn_local_into(
        async move {
            loop {
                let started = Instant::now();
                // Tombstones left by the last run (or the last period) first.
                sweep_paced(&weak, period).await;
                let mut after = None;
                let mut extents = 0u64;
                let mut bad = 0u64;
                // Spread over the period by the extents indexed at the start.
                let total = match weak.upgrade() {
                    Some(inner) => inner.index.extent_count().max(1),
                    None => return,
                };
                loop {
                    let Some(inner) = weak.upgrade() else { return };
                    let pace = crate::recover::pace(period, total);
                    match step(&inner, after).await {
                        Some((c, l, b)) => {
                            after = Some((c, l));
                            extents += 1;
                            bad += b;
                        }
                        None => {
                            bad += end_pass(&inner).await;
                            tracing::info!(
                                shard = inner.id.0,
                                extents,
                                bad_sectors = bad,
                                elapsed_ms = started.elapsed().as_millis() as u64,
                                "scrub pass done"
                            );
                            break;
                        }
                    }
                    drop(inner);
                    glommio::timer::sleep(pace.min(Duration::from_secs(1))).await;
                }
                if let Some(rest) = period.checked_sub(started.elapsed()) {
                    glommio::timer::sleep(rest.min(Duration::from_secs(3600))).await;
                } else {
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
            }
        },
        tq,
    );
    match task {
        Ok(t) => {
            t.detach();
        }
        Err(e) => tracing::warn!(error = %e, "could not start the scrubber"),
    }
}
