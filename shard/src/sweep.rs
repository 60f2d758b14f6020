//! Retiring tombstones: the sweep.
//!
//! A delete writes a one-sector tombstone and frees the chunk's extents. The
//! tombstone cannot simply go when its space is wanted: the freed extents
//! keep their self-describing headers on disk until their sectors are
//! written again, and a full rebuild (`check --rebuild`, or an index lost)
//! scans the whole data area, so without the tombstone it would bring the
//! deleted chunk back. Left alone, every deleted chunk id would hold a sector
//! and an index record for good.
//!
//! A tombstone T (generation t) of chunk C may go once no sector holds a
//! valid header of C with a generation below t. A sweep pass makes that so:
//!
//! 1. From its start, runs of extent writes that fail or are abandoned are
//!    held for the pass, where checkpoints do not take them (they were never
//!    written, or only partly, and may still hold anything). A checkpoint
//!    then takes the quarantine; once the reclaimer has given back all it
//!    holds (this checkpoint's space and earlier ones' still waiting for
//!    reads), every extent freed below the checkpoint's `replay_from` is in
//!    the free map. The candidates are the tombstones below that generation.
//! 2. Where can an old header of a candidate's chunk be now? Not in a live
//!    sector (it holds another extent), nor in one freed into the quarantine
//!    since (it was live after the candidate's delete: every older extent of
//!    the chunk was freed by that delete, so the sector held someone else's
//!    data). Only in the free map, the reservation, a run a write in flight
//!    was given, or a held failed write's run.
//! 3. The pass reads the free map and the reservation window by window. An
//!    old header of a candidate's chunk in the free map is overwritten with
//!    zeros (the sector is taken out of the free map meanwhile, and given
//!    back only once the zeros are durable, so no write can be given it
//!    before); erasing a free sector is always safe, it holds nothing anyone
//!    reads. One found in the reservation, or in free space that a write
//!    took before the sweep could, keeps its chunk's tombstone until a later
//!    pass.
//! 4. The pass waits for every write in flight when the windows are done to
//!    finish (each either lands, destroying what was there, or fails and
//!    its run is held), then reads the held runs: an old header there keeps
//!    its chunk. The held runs go to the quarantine.
//! 5. Each remaining candidate whose tombstone is unchanged is removed from
//!    the index and its sector quarantined like any freed space. Bounded
//!    recovery does not need it: the chunk's older extents are all below the
//!    durable checkpoint's `replay_from`, which replay never goes under.
//!
//! One pass at a time. A pass dropped unfinished (an error, a cancelled
//! task) retires nothing; sectors it had zeroed but not made durable wait
//! out of the free map for the next pass, which syncs and frees them first.
//!
//! A retired tombstone's own sector becomes a stale tombstone: harmless, it
//! only ever hides older generations of its chunk, and none are left.
//!
//! The pass reads the free space once; it runs before each scrub pass (on the
//! scrub task queue, paced the same way) when there are tombstones, or on
//! demand (`Shard::sweep_now`).

use std::collections::{HashMap, HashSet};
use std::rc::{Rc, Weak};
use std::time::Duration;

use shardstore_proto::ChunkId;

use crate::alloc::Run;
use crate::error::ShardError;
use crate::index::Change;
use crate::layout::{DiskSector, ExtentHeader, SECTOR};
use crate::shard::{bump, Inner};

/// Sectors read per step (1 MiB).
const WINDOW_SECTORS: u64 = 256;

/// What one sweep pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Tombstones old enough to be considered.
    pub candidates: u64,
    /// Free and reserved sectors read.
    pub scanned_sectors: u64,
    /// Old headers of deleted chunks overwritten with zeros.
    pub erased: u64,
    /// Candidates kept because an old header of theirs could not be erased.
    pub kept: u64,
    /// Tombstones removed (their sectors go back to the free space).
    pub retired: u64,
}

/// Where a piece of a window lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    Free,
    Reserved,
}

/// A pass in progress: started by [`SweepPass::start`], advanced one window
/// at a time by [`SweepPass::step`] (so a paced pass holds no strong
/// reference to the shard while it sleeps), ended by [`SweepPass::finish`].
/// Dropped unfinished (an error, or the task cancelled), it retires nothing
/// and hands back what it held (see `Drop`).
pub(crate) struct SweepPass {
    shard: Weak<Inner>,
    candidates: HashMap<ChunkId, u64>,
    kept: HashSet<ChunkId>,
    /// Sectors zeroed in the current window, out of the free map until the
    /// zeros are durable.
    held: Vec<u64>,
    next: u64,
    end: u64,
    report: SweepReport,
}

impl SweepPass {
    /// Step 1: None when no tombstone is old enough to be a candidate, or a
    /// pass is running already.
    pub(crate) async fn start(inner: &Rc<Inner>) -> Result<Option<SweepPass>, ShardError> {
        inner.check_writable()?;
        if inner.index.tomb_count() == 0 || inner.sweep_running.get() {
            return Ok(None);
        }
        // Cleared when the pass is dropped (finished or not).
        inner.sweep_running.set(true);
        // From here until the pass ends, failed writes' runs are held for
        // it (they may hold old headers and would otherwise go through the
        // quarantine to the free space unread).
        inner.hold_failed_writes();
        let area = inner.alloc.borrow().area();
        let mut pass = SweepPass {
            shard: Rc::downgrade(inner),
            candidates: HashMap::new(),
            kept: HashSet::new(),
            held: Vec::new(),
            next: area.start.0,
            end: area.start.0 + area.len,
            report: SweepReport::default(),
        };
        // Sectors an earlier pass left zeroed: durable, then free (and read
        // again by this pass). Taken only after the sync: cancelled during
        // it, they stay stranded.
        if !inner.sweep_stranded.borrow().is_empty() {
            // Their zero writes run in tasks of their own and may outlive
            // the pass that started them: freed before they end, a sector
            // could go to a new write that a late zero write then wipes.
            loop {
                let seen = inner.io.writes_ended();
                let running =
                    (inner.sweep_stranded.borrow().iter()).any(|&at| inner.io.being_written(at, 1));
                if !running {
                    break;
                }
                inner.io.write_ended_since(seen).await;
            }
            inner.sync_erased().await?;
            let stranded = std::mem::take(&mut *inner.sweep_stranded.borrow_mut());
            inner.free_erased(stranded);
        }
        inner.checkpoint(1).await?;
        let floor = inner.last_replay_from.get();
        // Every free so far (this checkpoint's and earlier ones still
        // waiting for reads) back in the free map.
        inner.reclaimed().await;
        pass.candidates = inner
            .index
            .tombs()
            .into_iter()
            .filter(|(_, t)| t.generation.0 < floor)
            .map(|(c, t)| (c, t.generation.0))
            .collect();
        if pass.candidates.is_empty() {
            return Ok(None);
        }
        pass.report.candidates = pass.candidates.len() as u64;
        Ok(Some(pass))
    }

    /// Windows left to read.
    pub(crate) fn windows_left(&self) -> u64 {
        (self.end - self.next).div_ceil(WINDOW_SECTORS)
    }

    /// Step 3 for the next window; false once the whole area is done.
    pub(crate) async fn step(&mut self, inner: &Inner) -> Result<bool, ShardError> {
        if self.next >= self.end {
            return Ok(false);
        }
        let w = self.next;
        let w_end = (w + WINDOW_SECTORS).min(self.end);
        let pieces = inner.alloc.borrow().pieces_in(w, w_end);
        for (run, place) in pieces {
            for (here, chunk) in self.old_headers_in(inner, run).await? {
                // Erased sectors stay out of the free map until the zeros
                // are durable: a write given the sector before that could be
                // overtaken by them at a crash (unsynced writes may reorder).
                if place == Place::Reserved || !inner.erase(here, &mut self.held).await? {
                    self.kept.insert(chunk);
                } else {
                    self.report.erased += 1;
                }
            }
        }
        if !self.held.is_empty() {
            // Synced while still held: cancelled during the sync, `Drop`
            // strands them.
            inner.sync_erased().await?;
            inner.free_erased(std::mem::take(&mut self.held));
        }
        self.next = w_end;
        Ok(self.next < self.end)
    }

    /// Steps 4 and 5.
    pub(crate) async fn finish(mut self, inner: &Inner) -> Result<SweepReport, ShardError> {
        let end_generation = inner.next_generation.get();
        while inner
            .inflight
            .borrow()
            .keys()
            .next()
            .is_some_and(|g| *g < end_generation)
        {
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
        // Writes that failed since the pass began: their runs were held for
        // it; an old header in one keeps its chunk. Then into the
        // quarantine, as they would have gone.
        let watched = inner.held_failed_writes();
        let res = self.read_watched(inner, &watched).await;
        inner.release_failed_writes();
        res?;
        let mut report = self.report;
        for (chunk, generation) in std::mem::take(&mut self.candidates) {
            if self.kept.contains(&chunk) {
                report.kept += 1;
                continue;
            }
            let _lock = inner.locks.lock(chunk).await?;
            inner.check_writable()?;
            let Some(t) = inner.index.get_tomb(chunk) else {
                continue;
            };
            if t.generation.0 != generation {
                // Deleted again meanwhile: the newer one waits for a pass.
                continue;
            }
            let mut change = Change::new();
            change.remove_tomb(chunk);
            change.apply(&inner.index);
            inner.quarantine_run(Run {
                start: t.disk,
                len: 1,
            });
            report.retired += 1;
        }
        bump(&inner.counters.tombstones_retired, report.retired);
        bump(&inner.counters.sweep_erased, report.erased);
        bump(&inner.counters.sweep_passes, 1);
        tracing::info!(
            shard = inner.id.0,
            candidates = report.candidates,
            scanned_sectors = report.scanned_sectors,
            erased = report.erased,
            kept = report.kept,
            retired = report.retired,
            "sweep pass done"
        );
        Ok(report)
    }

    /// Marks kept the candidates with an old header in a failed write's run.
    async fn read_watched(&mut self, inner: &Inner, runs: &[Run]) -> Result<(), ShardError> {
        for &run in runs {
            for (_, chunk) in self.old_headers_in(inner, run).await? {
                self.kept.insert(chunk);
            }
        }
        Ok(())
    }

    /// Reads `run`: the sectors in it holding an old header of a
    /// candidate's chunk, and that chunk.
    async fn old_headers_in(
        &mut self,
        inner: &Inner,
        run: Run,
    ) -> Result<Vec<(u64, ChunkId)>, ShardError> {
        let buf = inner.io.read(run.start, run.len).await.map_err(|e| {
            ShardError::io(format!("sweeping sectors {}+{}", run.start.0, run.len), e)
        })?;
        self.report.scanned_sectors += run.len;
        let mut found = Vec::new();
        for i in 0..run.len {
            let here = run.start.0 + i;
            let s = (i * SECTOR) as usize;
            let sector = &buf[s..s + SECTOR as usize];
            if let Some(chunk) = inner
                .old_header_of(sector, here, self.end, &self.candidates)
                .await
            {
                found.push((here, chunk));
            }
        }
        Ok(found)
    }
}

impl Drop for SweepPass {
    fn drop(&mut self) {
        let Some(inner) = self.shard.upgrade() else {
            return;
        };
        inner.sweep_running.set(false);
        // Unfinished: failed writes' runs go where they would have gone,
        // zeroed sectors wait for the next pass to make them durable.
        inner.release_failed_writes();
        inner
            .sweep_stranded
            .borrow_mut()
            .extend(std::mem::take(&mut self.held));
    }
}

impl Inner {
    /// One whole sweep pass now (see the module docs).
    pub(crate) async fn sweep(self: &Rc<Self>) -> Result<SweepReport, ShardError> {
        let Some(mut pass) = SweepPass::start(self).await? else {
            return Ok(SweepReport::default());
        };
        while pass.step(self).await? {
            glommio::yield_if_needed().await;
        }
        pass.finish(self).await
    }

    /// The chunk whose tombstone `sector` (at `here`) is an older header of,
    /// if any.
    async fn old_header_of(
        &self,
        sector: &[u8],
        here: u64,
        area_end: u64,
        candidates: &HashMap<ChunkId, u64>,
    ) -> Option<ChunkId> {
        if !ExtentHeader::has_magic(sector) {
            return None;
        }
        let decoded = match ExtentHeader::decode(self.node_id, sector) {
            Ok(h) => Ok(h),
            // A header longer than one sector: read the rest.
            Err(_) => {
                let n = 4.min(area_end - here);
                match self.io.read(DiskSector(here), n).await {
                    Ok(b) => ExtentHeader::decode(self.node_id, &b),
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        let h = decoded.ok().filter(|h| h.disk_sector.0 == here)?;
        let tomb = candidates.get(&h.chunk)?;
        (h.generation.0 < *tomb).then_some(h.chunk)
    }

    /// Overwrites the free sector `at` with zeros, taking it out of the free
    /// map (into `held`, freed once the zeros are durable). False if it is no
    /// longer free (a checkpoint reserved it since the window was read).
    async fn erase(&self, at: u64, held: &mut Vec<u64>) -> Result<bool, ShardError> {
        let run = Run {
            start: DiskSector(at),
            len: 1,
        };
        if self.alloc.borrow_mut().mark_used(run).is_err() {
            return Ok(false);
        }
        held.push(at);
        self.io
            .write_zero_sector(run.start)
            .await
            .map_err(|e| ShardError::io(format!("erasing sector {at} (sweep)"), e))?;
        Ok(true)
    }

    /// Makes the zeros written so far durable.
    async fn sync_erased(&self) -> Result<(), ShardError> {
        if self.io.write_through() {
            return Ok(());
        }
        self.sync_data("fdatasync of the data area (sweep)").await
    }

    /// Gives zeroed sectors back (their zeros are durable).
    fn free_erased(&self, sectors: Vec<u64>) {
        let mut alloc = self.alloc.borrow_mut();
        for at in sectors {
            alloc.free_run(Run {
                start: DiskSector(at),
                len: 1,
            });
        }
    }
}
