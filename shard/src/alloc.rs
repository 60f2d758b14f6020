//! In-memory space allocator of the data area.
//!
//! Invariants:
//! - the free map holds disjoint, non-adjacent runs `start -> len` of disk
//!   sectors inside the data area; it is never persisted and is rebuilt at open
//!   from the index (free = data area minus live data sectors minus the
//!   header sectors of extents that still have a live data sector);
//! - each physical extent (keyed by its header's disk sector) has a live count
//!   of its data sectors still referenced by the index; the header sectors are
//!   freed together with the last live data sector;
//! - "allocate in memory, then persist; reclaim: persist first, then change
//!   memory": space leaves the free map before the device write, and goes back
//!   only after the index change that unlinks it is durable ([`Reclaimer`]),
//!   and only once no read that may still be looking at it is in flight.
//!
//! Allocation is contiguous (one extent is one run, so one write is one
//! device write) and happens only inside the *reservation*: an ordered list
//! of free runs taken next-fit from the free map when a checkpoint is taken
//! and recorded in it. Allocation walks the reservation in order and never
//! goes back; a front run too small for a request goes back to the free map.
//! So every extent written after a checkpoint lies inside runs that
//! checkpoint lists, and recovery scans only those (see `recover`). Space
//! freed after a checkpoint is not reusable before the next one is durable
//! (the shard quarantines it), so the runs a checkpoint lists hold nothing
//! but stale bytes and extents written after it.
//!
//! If nothing fits even after a new checkpoint, the answer is `NoSpace`.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::layout::DiskSector;

/// A run of disk sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub start: DiskSector,
    pub len: u64,
}

/// Part of a physical extent that is no longer referenced by the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Release {
    /// Header position: identifies the physical extent.
    pub header: DiskSector,
    /// Data sectors no longer referenced.
    pub data: Run,
}

/// Reservations prefer free runs at least this long (1 MiB).
const BIG_RUN_SECTORS: u64 = 256;

/// Space to give back: part of an extent, or a whole run (a tombstone, or an
/// extent that never became referenced).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Free {
    Piece(Release),
    Run(Run),
}

impl Free {
    /// Sectors this gives back (data sectors of a piece; a header comes
    /// back with its extent's last piece, see `Allocator::release`).
    pub fn sectors(&self) -> u64 {
        match self {
            Free::Piece(r) => r.data.len,
            Free::Run(r) => r.len,
        }
    }
}

struct ExtentLive {
    header_sectors: u64,
    live: u64,
}

pub struct Allocator {
    area: Run,
    /// Free runs not in the reservation.
    free: BTreeMap<u64, u64>,
    /// Free sectors, reservation included.
    free_sectors: u64,
    reserved: VecDeque<Run>,
    reserved_sectors: u64,
    /// Runs reserved by a checkpoint that is not durable yet: not allocated
    /// from until it is (an older checkpoint does not list them).
    pending: Vec<Run>,
    cursor: u64,
    extents: HashMap<u64, ExtentLive>,
}

impl Allocator {
    /// An allocator where everything in `area` is free.
    pub fn new(area: Run) -> Allocator {
        let mut free = BTreeMap::new();
        if area.len > 0 {
            free.insert(area.start.0, area.len);
        }
        Allocator {
            area,
            free,
            free_sectors: area.len,
            reserved: VecDeque::new(),
            reserved_sectors: 0,
            pending: Vec::new(),
            cursor: area.start.0,
            extents: HashMap::new(),
        }
    }

    pub fn area(&self) -> Run {
        self.area
    }

    /// Sectors still available in the reservation.
    pub fn reserved_sectors(&self) -> u64 {
        self.reserved_sectors
    }

    /// The reservation's runs, in allocation order (pending ones last).
    pub fn reserved_runs(&self) -> Vec<Run> {
        self.reserved
            .iter()
            .chain(self.pending.iter())
            .copied()
            .collect()
    }

    /// Whether the active reservation has a run of `len` sectors.
    pub fn has_run(&self, len: u64) -> bool {
        self.reserved.iter().any(|r| r.len >= len)
    }

    /// The checkpoint listing the pending runs is durable: allocate from them.
    pub fn activate_reservation(&mut self) {
        for run in std::mem::take(&mut self.pending) {
            self.reserved_sectors += run.len;
            if let Some(last) = self.reserved.back_mut() {
                if last.start.0 + last.len == run.start.0 {
                    last.len += run.len;
                    continue;
                }
            }
            self.reserved.push_back(run);
        }
    }

    /// The checkpoint listing the pending runs failed: give them back.
    pub fn drop_pending_reservation(&mut self) {
        for run in std::mem::take(&mut self.pending) {
            self.map_insert(run);
        }
    }

    /// Takes `len` contiguous sectors from the reservation, in order.
    pub fn allocate(&mut self, len: u64) -> Option<DiskSector> {
        assert!(len > 0);
        while let Some(front) = self.reserved.front_mut() {
            if front.len >= len {
                let at = front.start;
                front.start = DiskSector(front.start.0 + len);
                front.len -= len;
                if front.len == 0 {
                    self.reserved.pop_front();
                }
                self.reserved_sectors -= len;
                self.free_sectors -= len;
                return Some(at);
            }
            // Too small: never go back to it in this reservation.
            let r = self.reserved.pop_front().expect("front exists");
            self.reserved_sectors -= r.len;
            self.map_insert(r);
        }
        None
    }

    /// Extends the reservation (as pending, see [`Allocator::activate_reservation`])
    /// with about `target` sectors of free runs, next-fit from the cursor, in
    /// at most `max_runs` runs overall; makes sure (if any free run can) that
    /// a run of `min_len` is included.
    pub fn reserve(&mut self, target: u64, min_len: u64, max_runs: usize) {
        let mut got = 0;
        // Big runs first: small holes left by overwrites would make the
        // reservation (and the checkpoint listing it) long and the writes
        // scattered; they are taken only when nothing bigger is free, and
        // meanwhile coalesce as their neighbours are freed.
        let mut piece = BIG_RUN_SECTORS.min(target.max(1));
        // One run left over for the run of `min_len` below.
        let pieces = max_runs.saturating_sub(1).max(1);
        while got < target && self.reserved.len() + self.pending.len() < pieces {
            let Some(at) = self.take_next_fit(piece) else {
                if piece > 1 {
                    piece = 1;
                    continue;
                }
                break;
            };
            // Grow the piece taken at `at` to the rest of its free run.
            let start = at.0;
            let mut len = piece;
            if let Some((&s, &l)) = self.free.range(start + piece..).next() {
                if s == start + piece {
                    let more = l.min(target.saturating_sub(got + piece));
                    if more > 0 {
                        self.map_remove(s, more);
                        len += more;
                    }
                }
            }
            self.cursor = start + len;
            self.push_reserved(Run {
                start: DiskSector(start),
                len,
            });
            got += len;
        }
        let has_big = self
            .reserved
            .iter()
            .chain(self.pending.iter())
            .any(|r| r.len >= min_len);
        if !has_big && self.reserved.len() + self.pending.len() < max_runs {
            if let Some(at) = self.take_next_fit(min_len) {
                self.push_reserved(Run {
                    start: at,
                    len: min_len,
                });
            }
        }
    }

    fn push_reserved(&mut self, run: Run) {
        if let Some(last) = self.pending.last_mut() {
            if last.start.0 + last.len == run.start.0 {
                last.len += run.len;
                return;
            }
        }
        self.pending.push(run);
    }

    pub fn free_sectors(&self) -> u64 {
        self.free_sectors
    }

    pub fn used_sectors(&self) -> u64 {
        self.area.len - self.free_sectors
    }

    /// Largest contiguous free run.
    #[cfg(test)]
    pub fn largest_free_run(&self) -> u64 {
        self.free.values().copied().max().unwrap_or(0)
    }

    /// Takes `len` contiguous sectors out of the free map (they stay counted
    /// as free: they move to the reservation), next-fit: from the cursor
    /// (also from the middle of the run containing it), then wrapping around.
    fn take_next_fit(&mut self, len: u64) -> Option<DiskSector> {
        assert!(len > 0);
        let cursor = self.cursor;
        let inside = self
            .free
            .range(..=cursor)
            .next_back()
            .filter(|(&s, &l)| s + l >= cursor + len)
            .map(|(&s, &l)| (s, l, cursor));
        let found = inside.or_else(|| {
            self.free
                .range(cursor..)
                .chain(self.free.range(..cursor))
                .find(|(_, &l)| l >= len)
                .map(|(&s, &l)| (s, l, s))
        });
        let (run_start, run_len, at) = found?;
        self.free.remove(&run_start);
        if at > run_start {
            self.free.insert(run_start, at - run_start);
        }
        let run_end = run_start + run_len;
        if run_end > at + len {
            self.free.insert(at + len, run_end - at - len);
        }
        self.cursor = at + len;
        Some(DiskSector(at))
    }

    /// Removes `[start, start + len)`, which must lie in one free run.
    fn map_remove(&mut self, start: u64, len: u64) {
        let (&fs, &fl) = self
            .free
            .range(..=start)
            .next_back()
            .expect("removing a free piece");
        assert!(fs + fl >= start + len, "piece {start}+{len} is not free");
        self.free.remove(&fs);
        if start > fs {
            self.free.insert(fs, start - fs);
        }
        if fs + fl > start + len {
            self.free.insert(start + len, fs + fl - start - len);
        }
    }

    /// Registers a freshly written extent (header + data) with all data live.
    /// The space must have come from [`Allocator::allocate`] or be marked used.
    pub fn register_extent(&mut self, header: DiskSector, header_sectors: u64, data_sectors: u64) {
        let prev = self.extents.insert(
            header.0,
            ExtentLive {
                header_sectors,
                live: data_sectors,
            },
        );
        assert!(
            prev.is_none(),
            "extent at sector {} registered twice",
            header.0
        );
    }

    /// Gives back a run that was allocated but never became referenced.
    pub fn free_run(&mut self, run: Run) {
        self.map_insert(run);
        self.free_sectors += run.len;
    }

    /// Puts a run into the free map (coalescing), without accounting.
    fn map_insert(&mut self, run: Run) {
        assert!(run.len > 0);
        assert!(
            run.start.0 >= self.area.start.0
                && run.start.0 + run.len <= self.area.start.0 + self.area.len,
            "freeing {run:?} outside the data area"
        );
        let mut start = run.start.0;
        let mut len = run.len;
        if let Some((&ps, &pl)) = self.free.range(..=start).next_back() {
            assert!(
                ps + pl <= start,
                "double free of {run:?} (overlaps free run {ps}+{pl})"
            );
            if ps + pl == start {
                self.free.remove(&ps);
                start = ps;
                len += pl;
            }
        }
        if let Some((&ns, &nl)) = self.free.range(run.start.0..).next() {
            assert!(
                ns >= run.start.0 + run.len,
                "double free of {run:?} (overlaps free run {ns}+{nl})"
            );
            if ns == run.start.0 + run.len {
                self.free.remove(&ns);
                len += nl;
            }
        }
        self.free.insert(start, len);
    }

    /// Gives back space (after the unlink is durable and no read may see it).
    pub fn give_back(&mut self, f: Free) {
        match f {
            Free::Piece(r) => self.release(r),
            Free::Run(r) => self.free_run(r),
        }
    }

    /// Returns superseded data sectors, and the header with the last of them.
    pub fn release(&mut self, r: Release) {
        let Some(ext) = self.extents.get_mut(&r.header.0) else {
            panic!("release of unknown extent at sector {}", r.header.0);
        };
        assert!(
            ext.live >= r.data.len,
            "extent at {} over-released",
            r.header.0
        );
        ext.live -= r.data.len;
        let done = ext.live == 0;
        let hs = ext.header_sectors;
        self.free_run(r.data);
        if done {
            self.extents.remove(&r.header.0);
            self.free_run(Run {
                start: r.header,
                len: hs,
            });
        }
    }

    /// The free-map runs and reservation runs (active or pending) inside
    /// sectors `[from, to)`, clipped to it, in disk order.
    pub fn pieces_in(&self, from: u64, to: u64) -> Vec<(Run, crate::sweep::Place)> {
        use crate::sweep::Place;
        let clip = |start: u64, len: u64| -> Option<Run> {
            let s = start.max(from);
            let e = (start + len).min(to);
            (s < e).then(|| Run {
                start: DiskSector(s),
                len: e - s,
            })
        };
        let mut out = Vec::new();
        let first = self.free.range(..from).next_back().map(|(&s, &l)| (s, l));
        for (s, l) in first
            .into_iter()
            .chain(self.free.range(from..to).map(|(&s, &l)| (s, l)))
        {
            out.extend(clip(s, l).map(|r| (r, Place::Free)));
        }
        for r in self.reserved.iter().chain(self.pending.iter()) {
            out.extend(clip(r.start.0, r.len).map(|r| (r, Place::Reserved)));
        }
        out.sort_by_key(|(r, _)| r.start);
        out
    }

    /// Rebuild helper: marks a run used (it must currently be free, whole).
    pub fn mark_used(&mut self, run: Run) -> Result<(), String> {
        let Some((&fs, &fl)) = self.free.range(..=run.start.0).next_back() else {
            return Err(format!("sectors {}+{} are not free", run.start.0, run.len));
        };
        if fs + fl < run.start.0 + run.len {
            return Err(format!(
                "sectors {}+{} are used twice or outside the data area",
                run.start.0, run.len
            ));
        }
        self.free.remove(&fs);
        if run.start.0 > fs {
            self.free.insert(fs, run.start.0 - fs);
        }
        let end = run.start.0 + run.len;
        if fs + fl > end {
            self.free.insert(end, fs + fl - end);
        }
        self.free_sectors -= run.len;
        Ok(())
    }

    /// Rebuild helper: adds live data sectors to an extent, marking its header
    /// used the first time the extent is seen.
    pub fn rebuild_piece(
        &mut self,
        header: DiskSector,
        header_sectors: u64,
        data: Run,
    ) -> Result<(), String> {
        if let Some(ext) = self.extents.get_mut(&header.0) {
            if ext.header_sectors != header_sectors {
                return Err(format!("extent at {} has two header sizes", header.0));
            }
            ext.live += data.len;
        } else {
            self.mark_used(Run {
                start: header,
                len: header_sectors,
            })?;
            self.extents.insert(
                header.0,
                ExtentLive {
                    header_sectors,
                    live: data.len,
                },
            );
        }
        self.mark_used(data)
    }
}

/// Deferred frees, released only when every read that started before the
/// space was unlinked has finished (reads look the index up, then read the
/// device; the space they found must not be reused in between).
pub struct Reclaimer {
    epoch: u64,
    readers: BTreeMap<u64, u64>,
    pending: Vec<(u64, Vec<Free>)>,
    /// Sectors in `pending`.
    pending_sectors: u64,
}

impl Reclaimer {
    pub fn new() -> Reclaimer {
        Reclaimer {
            epoch: 0,
            readers: BTreeMap::new(),
            pending: Vec::new(),
            pending_sectors: 0,
        }
    }

    /// A read starts: returns its epoch, to pass to [`Reclaimer::end_read`].
    pub fn begin_read(&mut self) -> u64 {
        *self.readers.entry(self.epoch).or_insert(0) += 1;
        self.epoch
    }

    /// A read ended; frees whatever no longer has a reader that may see it.
    pub fn end_read(&mut self, epoch: u64, alloc: &mut Allocator) {
        if let Some(n) = self.readers.get_mut(&epoch) {
            *n -= 1;
            if *n == 0 {
                self.readers.remove(&epoch);
            }
        }
        self.drain(alloc);
    }

    /// Space unlinked by a durable index change. Reads that begin from now on
    /// cannot find it; reads already running might.
    pub fn defer(&mut self, releases: Vec<Free>, alloc: &mut Allocator) {
        if releases.is_empty() {
            return;
        }
        self.pending_sectors += releases.iter().map(Free::sectors).sum::<u64>();
        self.pending.push((self.epoch, releases));
        self.epoch += 1;
        self.drain(alloc);
    }

    /// The current epoch: everything deferred so far has a lower one.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Sectors unlinked by a durable checkpoint that wait for reads to end
    /// before they are free.
    pub fn pending_sectors(&self) -> u64 {
        self.pending_sectors
    }

    /// Whether everything deferred before `epoch` has been given back.
    pub fn drained_before(&self, epoch: u64) -> bool {
        self.pending.iter().all(|(e, _)| *e >= epoch)
    }

    fn drain(&mut self, alloc: &mut Allocator) {
        let oldest_reader = self.readers.keys().next().copied().unwrap_or(u64::MAX);
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].0 < oldest_reader {
                let (_, releases) = self.pending.swap_remove(i);
                for r in releases {
                    self.pending_sectors -= r.sectors();
                    alloc.give_back(r);
                }
            } else {
                i += 1;
            }
        }
    }

    #[cfg(test)]
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area() -> Run {
        Run {
            start: DiskSector(2),
            len: 100,
        }
    }

    fn reserved_all() -> Allocator {
        let mut a = Allocator::new(area());
        a.reserve(100, 1, 16);
        a.activate_reservation();
        a
    }

    #[test]
    fn allocate_free_coalesce() {
        let mut a = reserved_all();
        let x = a.allocate(10).unwrap();
        let y = a.allocate(20).unwrap();
        assert_eq!(x, DiskSector(2));
        assert_eq!(y, DiskSector(12));
        assert_eq!(a.free_sectors(), 70);
        assert!(a.allocate(71).is_none());
        // The too-small front went back to the free map: still free.
        assert_eq!(a.reserved_sectors(), 0);
        assert_eq!(a.free_sectors(), 70);
        a.free_run(Run { start: x, len: 10 });
        a.free_run(Run { start: y, len: 20 });
        assert_eq!(a.free_sectors(), 100);
        assert_eq!(a.largest_free_run(), 100);
        // The next reservation is next-fit from where the last one ended
        // (the end of the area): it wraps around.
        a.reserve(10, 1, 16);
        assert_eq!(a.reserved_runs()[0].start, DiskSector(2));
        assert!(
            a.allocate(5).is_none(),
            "pending runs are not allocated from"
        );
        a.activate_reservation();
        let z = a.allocate(5).unwrap();
        assert_eq!(z, DiskSector(2));
    }

    #[test]
    fn reservation_walks_in_order_and_finds_a_big_run() {
        let mut a = reserved_all();
        let x = a.allocate(10).unwrap();
        let _y = a.allocate(10).unwrap();
        let w = a.allocate(10).unwrap();
        let rest = a.allocate(70).unwrap();
        a.free_run(Run { start: x, len: 10 });
        a.free_run(Run { start: w, len: 10 });
        a.free_run(Run {
            start: rest,
            len: 70,
        });
        // cursor is at the end of the area: wraps around to x first.
        let runs = reserve_with_a_run_of(&mut a, 5, 60, 16);
        assert_eq!(runs[0].start, x);
        a.activate_reservation();
        assert!(a.allocate(60).is_some());
    }

    /// Only one-sector holes ahead of the cursor, more of them than the
    /// run budget: the budget still leaves room for the run of `min_len`.
    #[test]
    fn small_holes_do_not_crowd_out_the_big_run() {
        let mut a = reserved_all();
        let mut ones = Vec::new();
        for _ in 0..10 {
            ones.push(a.allocate(1).unwrap());
            a.allocate(1).unwrap();
        }
        let big = a.allocate(16).unwrap();
        a.allocate(64).unwrap(); // the rest: nothing left reserved
        for &one in &ones {
            a.free_run(Run { start: one, len: 1 });
        }
        a.free_run(Run {
            start: big,
            len: 16,
        });
        reserve_with_a_run_of(&mut a, 64, 8, 4);
    }

    /// Reserves, and checks the reservation has a run of `min_len` and at
    /// most `max_runs` runs.
    fn reserve_with_a_run_of(
        a: &mut Allocator,
        target: u64,
        min_len: u64,
        max_runs: usize,
    ) -> Vec<Run> {
        a.reserve(target, min_len, max_runs);
        let runs = a.reserved_runs();
        assert!(runs.len() <= max_runs, "{runs:?}");
        assert!(runs.iter().any(|r| r.len >= min_len), "{runs:?}");
        runs
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_panics() {
        let mut a = reserved_all();
        let x = a.allocate(10).unwrap();
        a.free_run(Run { start: x, len: 10 });
        a.free_run(Run { start: x, len: 10 });
    }

    #[test]
    fn header_freed_with_last_live_sector() {
        let mut a = reserved_all();
        let h = a.allocate(5).unwrap(); // 1 header + 4 data
        a.register_extent(h, 1, 4);
        a.release(Release {
            header: h,
            data: Run {
                start: DiskSector(h.0 + 1),
                len: 2,
            },
        });
        assert_eq!(a.free_sectors(), 97);
        a.release(Release {
            header: h,
            data: Run {
                start: DiskSector(h.0 + 3),
                len: 2,
            },
        });
        assert_eq!(a.free_sectors(), 100);
    }

    #[test]
    fn rebuild_detects_overlap() {
        let mut a = Allocator::new(area());
        a.rebuild_piece(
            DiskSector(10),
            1,
            Run {
                start: DiskSector(11),
                len: 3,
            },
        )
        .unwrap();
        a.rebuild_piece(
            DiskSector(10),
            1,
            Run {
                start: DiskSector(14),
                len: 1,
            },
        )
        .unwrap();
        assert_eq!(a.free_sectors(), 95);
        assert!(a
            .rebuild_piece(
                DiskSector(20),
                1,
                Run {
                    start: DiskSector(12),
                    len: 1
                }
            )
            .is_err());
    }

    #[test]
    fn reclaimer_waits_for_older_reads() {
        let mut a = reserved_all();
        let h = a.allocate(2).unwrap();
        a.register_extent(h, 1, 1);
        let mut r = Reclaimer::new();
        let e = r.begin_read();
        r.defer(
            vec![Free::Piece(Release {
                header: h,
                data: Run {
                    start: DiskSector(h.0 + 1),
                    len: 1,
                },
            })],
            &mut a,
        );
        assert_eq!(a.free_sectors(), 98);
        let later = r.begin_read(); // started after the unlink: does not block
        r.end_read(e, &mut a);
        assert_eq!(a.free_sectors(), 100);
        r.end_read(later, &mut a);
        assert_eq!(r.pending_count(), 0);
    }
}
