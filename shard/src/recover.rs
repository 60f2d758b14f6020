//! Recovery at open, the full rebuild of the index from the data area, and
//! the offline verification behind `shardstore check`.
//!
//! Why a bounded scan finds every write the index lacks: a checkpoint (see
//! `shard`, steps a-c) records `replay_from` (every write with a lower
//! generation was applied to the in-memory index before the checkpoint's
//! batch was taken, so that batch carries it), `high_water` (no generation at or
//! above it had been handed out) and `scan`: the runs of the writes then in
//! flight plus the allocator's reservation. Every extent written after the
//! checkpoint comes from the reservation (the allocator never allocates
//! elsewhere, and runs reserved by a later checkpoint are not used before
//! that checkpoint is durable), so it lies inside `scan`. Space freed after
//! the checkpoint is quarantined until the next one, so nothing inside `scan`
//! is overwritten twice in one checkpoint interval. The scan is therefore
//! bounded by the reservation size (`checkpoint_bytes`).
//!
//! What the store holds after a crash: the in-memory index is written only
//! by checkpoint batches, each one atomic and holding every key changed since
//! the previous one, taken in one synchronous step between two index changes
//! (see `index`). So the store holds exactly the index as of the last
//! checkpoint whose batch landed: every change applied before that batch was
//! taken, none after. That checkpoint's record is in the same batch, so the
//! record found always describes the state found. (A batch may land without
//! the shard seeing its flush complete; then the shard never allocated from
//! the reservation it added, and the runs it used are listed anyway.)
//!
//! Replay, in generation order, is idempotent: a data extent is applied only
//! if the chunk's indexed generation and tombstone are older; a tombstone
//! only if the chunk's indexed write and tombstone are older. The batch may
//! include writes at or above `replay_from` that completed after the record
//! was built (whole changes: per chunk in generation order, under the chunk
//! lock), so "newer than what the index has" is exactly "not applied yet".
//! Recovery never needs anything after the checkpoint to have reached the
//! store: an earlier version let sled persist later batches too, which replay
//! skipped as already indexed.
//!
//! An extent whose header is valid but whose data sectors fail their crcs is
//! either a torn write (in flight at the crash, never acknowledged: acks
//! follow the flush) or an acknowledged extent damaged on the medium since.
//! Every header records `durable_below`: all lower generations were durable
//! or failed when it was written. With D the highest such mark found, a bad
//! extent below D was acknowledged: it is kept (reads report CORRUPT naming
//! the sector, and the scrubber counts it); one at or above D may be torn and
//! is discarded whole, its header zeroed on disk before the checkpoint that
//! follows recovery (so a later full rebuild cannot take it for a live
//! extent that newer writes partly overwrote), so an unacknowledged write is
//! all or nothing, unless
//! its last data sector is intact while an earlier one is not: a write torn
//! by a crash loses a suffix (the device persists a prefix), so that pattern
//! is taken as damage to an acknowledged write that no later header vouches
//! for yet (the newest writes before a kill). Residual risk: a device that
//! persists the sectors of one write out of order could make a torn
//! unacknowledged write read as CORRUPT. The
//! full rebuild cannot tell a damaged live extent from a stale one whose
//! space was reused, so it discards every extent with a bad sector. The generation counter restarts above the checkpoint's
//! high-water and every generation seen by the scan, so a generation that
//! may be on disk is never handed out twice.
//!
//! The full rebuild scans the whole data area the same way with no lower
//! bound on generations, newest generation wins per sector, tombstones kill
//! older extents of their chunk. Tombstones stay on disk while their record
//! is in the index, so a deleted chunk does not come back in a rebuild.

use std::time::Duration;

use shardstore_proto::ChunkId;

use crate::alloc::{Release, Run};
use crate::error::ShardError;
use crate::index::{Change, Checkpoint, ExtentRec, TombRec};
use crate::layout::{
    DiskSector, ExtentHeader, ExtentKind, Generation, LogicalSector, Superblock, DATA_START_SECTOR,
    MAX_GENERATION, SECTOR,
};
use crate::shard::Inner;

/// Sectors read per scan request.
const SCAN_WINDOW_SECTORS: u64 = 128;

/// What recovery (or a rebuild) did at open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub elapsed_us: u64,
    pub scanned_sectors: u64,
    /// Data extents applied to the index from the data area.
    pub replayed: u64,
    pub replayed_tombstones: u64,
    /// Extents found that the index already had (or that were superseded).
    pub already_indexed: u64,
    /// Extents with a valid header but bad data that may be torn (never
    /// acknowledged), or (rebuild) overwritten or corrupt. Discarded.
    pub discarded: u64,
    /// Acknowledged extents with a bad sector (media damage): kept, so reads
    /// report CORRUPT instead of losing the write silently.
    pub damaged_kept: u64,
    pub chunks: u64,
    /// The index was rebuilt from the whole data area.
    pub rebuilt: bool,
}

/// What `verify` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub chunks: u64,
    pub extents: u64,
    pub sectors: u64,
    pub tombstones: u64,
    pub superblock_copies_ok: u32,
    /// (chunk, logical sector, why) of every bad live sector or tombstone.
    pub problems: Vec<(ChunkId, u64, String)>,
}

struct Found {
    at: DiskSector,
    header: ExtentHeader,
    /// Indices of the data sectors that fail their crcs, ascending (empty:
    /// intact).
    bad: Vec<usize>,
    /// Rebuild: bad sectors of an extent kept because newer intact copies
    /// cover them; replay leaves them out (see `superseded_holes`).
    holes: Vec<usize>,
}

impl Found {
    /// Bad, but not the way a crash tears a write (which loses a suffix,
    /// so its last data sector is bad).
    fn not_a_tear(&self) -> bool {
        !self.bad.is_empty() && self.bad.last() != Some(&(self.header.crcs.len() - 1))
    }
}

/// Valid extents with a generation in `generations` inside `runs`. A
/// header with a generation past its end is not taken for one of ours
/// (logged): no such generation had been handed out.
async fn scan(
    inner: &Inner,
    runs: &[Run],
    generations: std::ops::Range<u64>,
    report: &mut RecoveryReport,
) -> Result<(Vec<Found>, u64), ShardError> {
    let area_end = DATA_START_SECTOR + inner.capacity_sectors;
    let mut found = Vec::new();
    let mut max_generation = 0u64;
    // Adjacent runs (an in-flight run next to the reservation, or a pending
    // reservation next to the active one) may hold one extent across their
    // boundary: merge them.
    let mut merged: Vec<Run> = runs.to_vec();
    merged.sort_by_key(|r| r.start);
    let mut runs: Vec<Run> = Vec::with_capacity(merged.len());
    for r in merged {
        match runs.last_mut() {
            Some(last) if r.start.0 <= last.start.0 + last.len => {
                let end = (r.start.0 + r.len).max(last.start.0 + last.len);
                last.len = end - last.start.0;
            }
            _ => runs.push(r),
        }
    }
    for run in &runs {
        let end = run.start.0 + run.len;
        if run.start.0 < DATA_START_SECTOR || end > area_end {
            return Err(ShardError::IndexCorrupt(format!(
                "checkpoint lists sectors {}+{} outside the data area",
                run.start.0, run.len
            )));
        }
        let mut pos = run.start.0;
        while pos < end {
            let n = SCAN_WINDOW_SECTORS.min(end - pos);
            let buf = inner
                .io
                .read(DiskSector(pos), n)
                .await
                .map_err(|e| ShardError::io(format!("scanning sectors {pos}+{n}"), e))?;
            report.scanned_sectors += n;
            let mut next = pos + n;
            let mut i = 0u64;
            while i < n {
                let here = pos + i;
                let s = (i * SECTOR) as usize;
                if !ExtentHeader::has_magic(&buf[s..s + SECTOR as usize]) {
                    i += 1;
                    continue;
                }
                // The header may continue past the window.
                let room = end - here;
                let owned;
                let hbytes: &[u8] = if n - i >= 4.min(room) {
                    &buf[s..]
                } else {
                    owned = inner
                        .io
                        .read(DiskSector(here), 4.min(room))
                        .await
                        .map_err(|e| ShardError::io(format!("reading sector {here}"), e))?;
                    &owned
                };
                let h = match ExtentHeader::decode(inner.node_id, hbytes) {
                    Ok(h) if h.disk_sector.0 == here && h.total_sectors() <= room => h,
                    _ => {
                        i += 1;
                        continue;
                    }
                };
                if h.generation.0 >= generations.end {
                    tracing::warn!(
                        shard = inner.id.0,
                        sector = here,
                        generation = h.generation.0,
                        bound = generations.end,
                        "a header with a generation never handed out; not ours, skipped"
                    );
                    i += 1;
                    continue;
                }
                max_generation = max_generation.max(h.generation.0);
                if h.generation.0 < generations.start {
                    i += 1;
                    continue;
                }
                let total = h.total_sectors();
                let hs = (h.header_sectors() * SECTOR) as usize;
                let bad = if i + total <= n {
                    h.bad_sectors(&buf[s + hs..s + (total * SECTOR) as usize])
                } else {
                    let whole = inner
                        .io
                        .read(DiskSector(here), total)
                        .await
                        .map_err(|e| ShardError::io(format!("reading extent at {here}"), e))?;
                    h.bad_sectors(&whole[hs..])
                };
                let intact = bad.is_empty();
                found.push(Found {
                    at: DiskSector(here),
                    header: h,
                    bad,
                    holes: Vec::new(),
                });
                if !intact {
                    // Torn or damaged: decided once the whole scan is seen.
                    i += 1;
                    continue;
                }
                if i + total <= n {
                    i += total;
                } else {
                    next = here + total;
                    break;
                }
            }
            pos = next;
        }
    }
    Ok((found, max_generation))
}

/// Drops bad extents that may be torn; keeps (with `keep_damaged`) those the
/// durable marks prove were acknowledged. See the module docs. Returns the
/// kept extents and where the dropped ones start.
fn triage(
    inner: &Inner,
    found: Vec<Found>,
    keep_damaged: bool,
    report: &mut RecoveryReport,
) -> (Vec<Found>, Vec<DiskSector>) {
    let durable_below = found
        .iter()
        .map(|f| f.header.durable_below)
        .max()
        .unwrap_or(0);
    let mut out = Vec::with_capacity(found.len());
    let mut dropped = Vec::new();
    for f in found {
        let Some(&b) = f.bad.first() else {
            out.push(f);
            continue;
        };
        let not_a_tear = f.not_a_tear();
        let h = &f.header;
        if keep_damaged && (h.generation.0 < durable_below || not_a_tear) {
            report.damaged_kept += 1;
            tracing::error!(
                shard = inner.id.0,
                chunk = %h.chunk,
                generation = h.generation.0,
                disk_sector = f.at.0,
                sector = h.first_sector.0 + b as u64,
                "an acknowledged extent has a bad sector (media damage): kept, reads of it report CORRUPT"
            );
            out.push(f);
        } else {
            report.discarded += 1;
            dropped.push(f.at);
            tracing::warn!(
                shard = inner.id.0,
                chunk = %h.chunk,
                generation = h.generation.0,
                disk_sector = f.at.0,
                sector = h.first_sector.0 + b as u64,
                "discarding an extent with a bad data sector (torn write in flight at the crash, or stale)"
            );
        }
    }
    (out, dropped)
}

/// Marks everything the index references as used; returns the highest
/// generation the index knows.
fn load_allocator(inner: &Inner) -> Result<u64, ShardError> {
    let mut alloc = inner.alloc.borrow_mut();
    let mut max_generation = 0u64;
    inner.index.for_each_extent(|chunk, rec| {
        max_generation = max_generation.max(rec.generation.0);
        alloc
            .rebuild_piece(
                rec.header,
                rec.header_sectors,
                Run {
                    start: rec.disk,
                    len: rec.count(),
                },
            )
            .map_err(|e| ShardError::IndexCorrupt(format!("chunk {chunk}: {e}")))
    })?;
    for (chunk, t) in inner.index.tombs() {
        max_generation = max_generation.max(t.generation.0);
        alloc
            .mark_used(Run {
                start: t.disk,
                len: 1,
            })
            .map_err(|e| ShardError::IndexCorrupt(format!("tombstone of chunk {chunk}: {e}")))?;
    }
    Ok(max_generation)
}

/// Applies one found extent to the index unless the index already has it
/// or something newer.
fn replay(inner: &Inner, f: &Found, report: &mut RecoveryReport) -> Result<(), ShardError> {
    let h = &f.header;
    let g = h.generation.0;
    let meta = inner.index.get_meta(h.chunk);
    let tomb = inner.index.get_tomb(h.chunk);
    let meta_gen = meta.map_or(0, |m| m.generation);
    let tomb_gen = tomb.map_or(0, |t| t.generation.0);
    if meta_gen >= g || tomb_gen >= g {
        report.already_indexed += 1;
        return Ok(());
    }
    let hs = h.header_sectors();
    let marked = match h.kind {
        ExtentKind::Data => inner.alloc.borrow_mut().rebuild_piece(
            f.at,
            hs,
            Run {
                start: DiskSector(f.at.0 + hs),
                len: h.crcs.len() as u64,
            },
        ),
        ExtentKind::Tombstone => inner.alloc.borrow_mut().mark_used(Run {
            start: f.at,
            len: 1,
        }),
    };
    if let Err(e) = marked {
        // Only a rebuild can meet this (an intact stale extent overlapping
        // live space cannot exist; a corrupt index can make it look so).
        report.discarded += 1;
        tracing::warn!(shard = inner.id.0, chunk = %h.chunk, generation = g, error = %e, "extent overlaps used space; skipped");
        return Ok(());
    }
    let (change, frees) = match h.kind {
        ExtentKind::Data => {
            let (c, f, _) = inner.data_extent_change(h, f.at, meta)?;
            report.replayed += 1;
            (c, f)
        }
        ExtentKind::Tombstone => {
            report.replayed_tombstones += 1;
            inner.tombstone_change(h, f.at)?
        }
    };
    change.apply(&inner.index);
    // Nothing reads yet and a checkpoint follows before any allocation.
    {
        let mut alloc = inner.alloc.borrow_mut();
        for fr in frees {
            alloc.give_back(fr);
        }
    }
    for &k in &f.holes {
        punch(inner, f, h.first_sector.0 + k as u64)?;
    }
    tracing::debug!(shard = inner.id.0, chunk = %h.chunk, generation = g, kind = ?h.kind, "replayed");
    Ok(())
}

/// Rebuild: takes logical sector `l` out of the extent just replayed from
/// `f` (its copy there is bad; a newer extent, replayed later, has it), and
/// gives its disk sector back, so an extent of another chunk that reused it
/// can be replayed.
fn punch(inner: &Inner, f: &Found, l: u64) -> Result<(), ShardError> {
    let chunk = f.header.chunk;
    let Some(rec) = inner
        .index
        .overlapping(chunk, l, l + 1)
        .into_iter()
        .find(|r| r.header == f.at)
    else {
        return Ok(());
    };
    let mut change = Change::new();
    change.remove_extent(chunk, rec.logical);
    if rec.logical.0 < l {
        change.put_extent(chunk, rec.slice(rec.logical.0, l));
    }
    if l + 1 < rec.end() {
        change.put_extent(chunk, rec.slice(l + 1, rec.end()));
    }
    let mut meta = inner
        .index
        .get_meta(chunk)
        .ok_or_else(|| ShardError::Internal(format!("chunk {chunk} has an extent but no meta")))?;
    meta.live_sectors = meta.live_sectors.saturating_sub(1);
    change.put_meta(chunk, meta);
    change.apply(&inner.index);
    inner.alloc.borrow_mut().release(Release {
        header: f.at,
        data: Run {
            start: DiskSector(rec.disk.0 + (l - rec.logical.0)),
            len: 1,
        },
    });
    Ok(())
}

/// Zeroes the first header sector of each extent recovery (or a rebuild)
/// discarded, a write torn by the crash and never acknowledged (made
/// durable by `make_durable` before the checkpoint that follows moves
/// `replay_from` past them), and returns how many it zeroed. Left alone, such a header would stay on disk in free space, and
/// once newer writes of its chunk had covered its torn sectors, a full
/// rebuild would take it for an acknowledged extent partly overwritten and
/// show its intact sectors (see `superseded_holes`). Each sector zeroed
/// holds that discarded header, so no kept extent uses it: after recovery,
/// it is in the run of a write in flight at the crash. Best effort: the
/// shard still opens if the device refuses these writes.
async fn erase_headers(inner: &Inner, at: &[DiskSector]) -> usize {
    // Best effort: a device that cannot take these writes leaves the old
    // hazard (for a full rebuild only), not a shard that cannot open.
    let mut erased = 0;
    for &s in at {
        match inner.io.write_zero_sector(s).await {
            Ok(()) => erased += 1,
            Err(e) => tracing::warn!(
                shard = inner.id.0,
                error = %e,
                sector = s.0,
                "could not erase the header of a discarded extent"
            ),
        }
    }
    erased
}

/// Ends a recovery or a rebuild: erases the headers of the discarded
/// extents (`erase_headers`), then one fdatasync of the data area, always.
/// What recovery replayed may be a write the device completed but never
/// flushed (the crash came before its group commit), and the checkpoint
/// that follows the open makes the index that points at it durable and
/// frees the older pieces it supersedes: the data must be durable first,
/// also where the index is on another device than the data (a block
/// device). A failed sync fails the open (never retried, as everywhere).
async fn make_durable(inner: &Inner, discarded: &[DiskSector]) -> Result<(), ShardError> {
    let erased = erase_headers(inner, discarded).await;
    inner
        .io
        .sync()
        .await
        .map_err(|e| ShardError::io("fdatasync of the data area after recovery", e))?;
    if erased > 0 {
        tracing::info!(
            shard = inner.id.0,
            erased,
            "erased the headers of discarded extents"
        );
    }
    Ok(())
}

/// Normal start: index plus the data area written since the checkpoint.
pub(crate) async fn recover(inner: &Inner, ck: &Checkpoint) -> Result<RecoveryReport, ShardError> {
    let mut report = RecoveryReport::default();
    let index_max = load_allocator(inner)?;
    // Since the checkpoint, every generation handed out went with an extent
    // of at least one sector in its runs (space freed meanwhile is only
    // reused after the next checkpoint).
    let scanned: u64 = ck.scan.iter().map(|r| r.len).sum();
    let bound = ck.high_water.saturating_add(scanned);
    let (found, scan_max) = scan(inner, &ck.scan, ck.replay_from..bound, &mut report).await?;
    let (mut found, torn) = triage(inner, found, true, &mut report);
    found.sort_by_key(|f| f.header.generation);
    for f in &found {
        replay(inner, f, &mut report)?;
    }
    make_durable(inner, &torn).await?;
    let next = ck
        .high_water
        .max(index_max.saturating_add(1))
        .max(scan_max + 1);
    inner.next_generation.set(next);
    report.chunks = inner.index.chunk_count();
    Ok(report)
}

/// Rebuilds the index from the whole data area.
pub(crate) async fn rebuild(inner: &Inner) -> Result<RecoveryReport, ShardError> {
    tracing::warn!(
        shard = inner.id.0,
        "rebuilding the index from the data area"
    );
    inner.index.clear()?;
    let mut report = RecoveryReport {
        rebuilt: true,
        ..RecoveryReport::default()
    };
    // From empty space, as at a fresh open: a recovery that failed partway
    // (the index damaged) has marked the old index's extents used, and
    // every live extent would then overlap "used" space and be skipped.
    let area = inner.alloc.borrow().area();
    *inner.alloc.borrow_mut() = crate::alloc::Allocator::new(area);
    let (mut found, max) = scan(inner, &[area], 0..MAX_GENERATION, &mut report).await?;
    superseded_holes(&mut found);
    let (mut found, discarded) = triage(inner, found, false, &mut report);
    found.sort_by_key(|f| f.header.generation);
    for f in &found {
        replay(inner, f, &mut report)?;
    }
    // So that a later rebuild, after newer writes covered their bad
    // sectors, does not take them for live extents partly overwritten.
    make_durable(inner, &discarded).await?;
    inner.next_generation.set(max + 1);
    report.chunks = inner.index.chunk_count();
    Ok(report)
}

/// Rebuild: a live extent partly overwritten keeps its header, and the
/// space of its overwritten sectors may hold other data by now, so those
/// sectors fail their crcs. An acknowledged extent (below the highest
/// `durable_below` found) whose every bad sector is covered by a newer
/// intact sector of its chunk, in an extent that is kept itself, is such an
/// extent: it is kept with those sectors as holes (replay leaves them out
/// and gives their space back, see `punch`). Deciding newest first makes
/// "kept itself" known for every coverer.
/// A write torn by a crash would look the same once newer writes of its
/// chunk cover its torn sectors: recovery and the rebuild erase the header
/// of every torn extent they discard (`erase_headers`), and the shard
/// erases the header of a request's extent that failed or was cancelled
/// while its device write ran before any checkpoint passes it
/// (`Inner::erase_abandoned`). (Residual risk: where an erase write failed,
/// after more than `MAX_ABANDONED` abandoned writes at once, and in data
/// areas written by versions before these erases, such a header can remain
/// and a rebuild can show the intact sectors of a write that was never
/// acknowledged.)
fn superseded_holes(found: &mut [Found]) {
    use std::collections::HashMap;
    let durable_below = found
        .iter()
        .map(|f| f.header.durable_below)
        .max()
        .unwrap_or(0);
    let mut order: Vec<usize> = (0..found.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(found[i].header.generation));
    // chunk -> logical sectors with an intact copy in a kept, newer extent
    let mut covered: HashMap<shardstore_proto::ChunkId, std::collections::HashSet<u64>> =
        HashMap::new();
    for i in order {
        let f = &mut found[i];
        let h = &f.header;
        if h.kind != ExtentKind::Data {
            continue;
        }
        if !f.bad.is_empty() {
            let eligible = h.generation.0 < durable_below
                && covered.get(&h.chunk).is_some_and(|c| {
                    f.bad
                        .iter()
                        .all(|&k| c.contains(&(h.first_sector.0 + k as u64)))
                });
            if !eligible {
                continue; // triage decides (a rebuild discards it)
            }
            f.holes = std::mem::take(&mut f.bad);
        }
        let first = h.first_sector.0;
        let n = h.crcs.len();
        let holes = &f.holes;
        let c = covered.entry(h.chunk).or_default();
        c.extend(
            (0..n)
                .filter(|k| !holes.contains(k))
                .map(|k| first + k as u64),
        );
    }
}

/// Reads and checks every live sector and tombstone, and both superblocks.
pub(crate) async fn verify(inner: &Inner) -> Result<VerifyReport, ShardError> {
    let mut r = VerifyReport::default();
    let sb = inner
        .io
        .read(DiskSector(0), DATA_START_SECTOR)
        .await
        .map_err(|e| ShardError::io("reading the superblocks", e))?;
    for copy in 0..DATA_START_SECTOR as usize {
        let s = SECTOR as usize;
        match Superblock::decode(&sb[copy * s..(copy + 1) * s]) {
            Ok(_) => r.superblock_copies_ok += 1,
            Err(e) => r.problems.push((
                ChunkId(0),
                copy as u64,
                format!("superblock copy {copy}: {e}"),
            )),
        }
    }
    r.chunks = inner.index.chunk_count();
    let mut after: Option<(ChunkId, LogicalSector)> = None;
    while let Some((chunk, rec)) = inner.index.extent_after(after) {
        after = Some((chunk, rec.logical));
        r.extents += 1;
        r.sectors += rec.count();
        let _epoch = inner.begin_read();
        match inner
            .read_bytes(chunk, rec.logical.0 * SECTOR, rec.end() * SECTOR)
            .await
        {
            Ok(_) => {}
            Err(ShardError::Corrupt { sector, detail, .. }) => {
                r.problems.push((chunk, sector, detail))
            }
            Err(ShardError::Io { context, source }) => {
                r.problems
                    .push((chunk, rec.logical.0, format!("{context}: {source}")))
            }
            Err(e) => return Err(e),
        }
        if !header_intact(inner, chunk, &rec).await {
            r.problems.push((
                chunk,
                rec.logical.0,
                format!("extent header at sector {} is damaged", rec.header.0),
            ));
        }
    }
    for (chunk, t) in inner.index.tombs() {
        r.tombstones += 1;
        if !tombstone_intact(inner, chunk, &t).await {
            r.problems.push((
                chunk,
                0,
                format!("tombstone at sector {} is missing or damaged", t.disk.0),
            ));
        }
    }
    Ok(r)
}

/// Whether the header at `at` (`sectors` long) reads back and decodes as
/// the `kind` extent of `chunk` with `generation`, written there.
async fn header_at(
    inner: &Inner,
    at: DiskSector,
    sectors: u64,
    kind: ExtentKind,
    chunk: ChunkId,
    generation: Generation,
) -> bool {
    match inner.io.read(at, sectors).await {
        Ok(b) => ExtentHeader::decode(inner.node_id, &b).is_ok_and(|h| {
            h.kind == kind && h.chunk == chunk && h.generation == generation && h.disk_sector == at
        }),
        Err(_) => false,
    }
}

/// Whether the tombstone the index records for `chunk` is intact on disk
/// (a damaged one would let a rebuild bring the deleted chunk back).
pub(crate) async fn tombstone_intact(inner: &Inner, chunk: ChunkId, t: &TombRec) -> bool {
    header_at(inner, t.disk, 1, ExtentKind::Tombstone, chunk, t.generation).await
}

/// Whether the header of the extent record `rec` is intact on disk (a
/// damaged one would make a rebuild drop the live extent).
pub(crate) async fn header_intact(inner: &Inner, chunk: ChunkId, rec: &ExtentRec) -> bool {
    header_at(
        inner,
        rec.header,
        rec.header_sectors,
        ExtentKind::Data,
        chunk,
        rec.generation,
    )
    .await
}

/// How long a scrub should wait between extents to spread a pass over `period`.
pub(crate) fn pace(period: Duration, extents: u64) -> Duration {
    period / (extents.max(1) as u32).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::sector_crc;
    use crate::shard::{Shard, ShardConfig};
    use crate::sim::SimDisk;

    const NODE: u128 = 0x5eed;

    /// The sector where `bytes` (one sector) lies on `disk`.
    fn find(disk: &SimDisk, bytes: &[u8]) -> u64 {
        (0..disk.sectors())
            .find(|&s| disk.sector(s) == bytes)
            .expect("the payload is on the disk")
    }

    /// Puts an extent of chunk `victim` with `generation` where `decoy`'s
    /// payload (two sectors) lies, as a client could by sending those
    /// bytes as its payload: a header sector, then one data sector.
    fn forge(disk: &SimDisk, decoy: &[u8], victim: ChunkId, generation: u64) {
        let at = find(disk, &decoy[..SECTOR as usize]);
        let evil = vec![0xee; SECTOR as usize];
        let h = ExtentHeader {
            kind: ExtentKind::Data,
            chunk: victim,
            first_sector: LogicalSector(0),
            generation: Generation(generation),
            chunk_len: SECTOR,
            timestamp_ns: 1,
            version: 99,
            created_ns: 1,
            disk_sector: DiskSector(at),
            durable_below: 0,
            crcs: smallvec::smallvec![sector_crc(
                victim,
                LogicalSector(0),
                Generation(generation),
                &evil
            )],
        };
        let mut header = vec![0u8; SECTOR as usize];
        h.encode(NODE, &mut header);
        disk.put_sector(at, &header);
        disk.put_sector(at + 1, &evil);
    }

    /// Headers in a recovery scan that claim a generation no write was
    /// given (one past any counter, one past what the checkpoint's runs
    /// could hold) are not replayed: the victim chunk keeps its data, and
    /// the first no longer overflows the generation counter.
    #[test]
    fn headers_with_generations_never_handed_out_are_not_replayed() {
        let disk = SimDisk::new((4 << 20) + (64 << 10), 11);
        let cfg = ShardConfig {
            node_id: NODE,
            capacity_bytes: 4 << 20,
            checkpoint_interval_ms: 3_600_000,
            ..ShardConfig::default()
        };
        let victim = ChunkId(1);
        let good = vec![0x11u8; SECTOR as usize];
        let decoys: Vec<Vec<u8>> = (0..2u8)
            .map(|i| vec![0xd0 + i; 2 * SECTOR as usize])
            .collect();
        crate::run_test(async {
            let shard = Shard::open_sim(cfg.clone(), &disk).await.unwrap();
            shard.write(victim, 0, &good).await.unwrap();
            shard.checkpoint().await.unwrap();
            for (i, d) in decoys.iter().enumerate() {
                shard.write(ChunkId(10 + i as u128), 0, d).await.unwrap();
            }
            std::mem::forget(shard); // the process dies
        });
        forge(&disk, &decoys[0], victim, u64::MAX);
        forge(&disk, &decoys[1], victim, 1 << 40);
        crate::run_test(async {
            let shard = Shard::open_sim(cfg.clone(), &disk).await.unwrap();
            let r = shard.read(victim, 0, SECTOR as u32).await.unwrap();
            assert!(r.data.to_vec() == good, "a forged extent was replayed");
            shard.write(victim, 0, b"after").await.unwrap();
        });
    }
}
