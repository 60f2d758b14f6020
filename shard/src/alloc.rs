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
//! Allocation is next-fit and contiguous: one extent is one run, so one write
//! is one device write. If no run fits, the answer is `NoSpace`.

use std::collections::{BTreeMap, HashMap};

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

struct ExtentLive {
    header_sectors: u64,
    live: u64,
}

pub struct Allocator {
    area: Run,
    free: BTreeMap<u64, u64>,
    free_sectors: u64,
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
            cursor: area.start.0,
            extents: HashMap::new(),
        }
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

    /// Takes `len` contiguous sectors, next-fit: from the cursor (also from
    /// the middle of the run containing it), then wrapping around.
    pub fn allocate(&mut self, len: u64) -> Option<DiskSector> {
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
        self.free_sectors -= len;
        self.cursor = at + len;
        Some(DiskSector(at))
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
        self.free_sectors += run.len;
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
    pending: Vec<(u64, Vec<Release>)>,
}

impl Reclaimer {
    pub fn new() -> Reclaimer {
        Reclaimer {
            epoch: 0,
            readers: BTreeMap::new(),
            pending: Vec::new(),
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
    pub fn defer(&mut self, releases: Vec<Release>, alloc: &mut Allocator) {
        if releases.is_empty() {
            return;
        }
        self.pending.push((self.epoch, releases));
        self.epoch += 1;
        self.drain(alloc);
    }

    fn drain(&mut self, alloc: &mut Allocator) {
        let oldest_reader = self.readers.keys().next().copied().unwrap_or(u64::MAX);
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].0 < oldest_reader {
                let (_, releases) = self.pending.swap_remove(i);
                for r in releases {
                    alloc.release(r);
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

    #[test]
    fn allocate_free_coalesce() {
        let mut a = Allocator::new(area());
        let x = a.allocate(10).unwrap();
        let y = a.allocate(20).unwrap();
        assert_eq!(x, DiskSector(2));
        assert_eq!(y, DiskSector(12));
        assert_eq!(a.free_sectors(), 70);
        assert!(a.allocate(71).is_none());
        a.free_run(Run { start: x, len: 10 });
        a.free_run(Run { start: y, len: 20 });
        assert_eq!(a.free_sectors(), 100);
        assert_eq!(a.largest_free_run(), 100);
        // next-fit: continues after the cursor
        let z = a.allocate(5).unwrap();
        assert_eq!(z, DiskSector(32));
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_panics() {
        let mut a = Allocator::new(area());
        let x = a.allocate(10).unwrap();
        a.free_run(Run { start: x, len: 10 });
        a.free_run(Run { start: x, len: 10 });
    }

    #[test]
    fn header_freed_with_last_live_sector() {
        let mut a = Allocator::new(area());
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
        let mut a = Allocator::new(area());
        let h = a.allocate(2).unwrap();
        a.register_extent(h, 1, 1);
        let mut r = Reclaimer::new();
        let e = r.begin_read();
        r.defer(
            vec![Release {
                header: h,
                data: Run {
                    start: DiskSector(h.0 + 1),
                    len: 1,
                },
            }],
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
