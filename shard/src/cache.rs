//! The shard's slice of the node's read cache.
//!
//! O_DIRECT bypasses the kernel's page cache, so each shard keeps its own:
//! a `quick_cache` unsync cache (S3-FIFO: new entries enter a small probation
//! queue and only entries read again while there, or recently evicted from
//! it, reach the main queue, so a scan read once cannot flush the hot set).
//! It is owned by the shard's executor alone: no lock on the read path.
//!
//! Entries are verified 4 KiB sectors keyed by `(generation, disk sector)`.
//! A generation is never reused while the process runs and an extent's
//! sectors never move, so a key always names the same bytes: a write or a
//! delete needs no invalidation for correctness (reads find the new
//! generation in the index and miss). Superseded sectors are dropped
//! explicitly anyway ([`ReadCache::forget`]) so they do not hold memory.
//!
//! An entry does not own a copy of its sector: it holds the buffer the
//! device read filled (shared, reference counted) and the sector's offset in
//! it, so a hit is served by handing that buffer to the socket, and
//! consecutive sectors from one read are served as one slice. A buffer stays
//! alive while any of its sectors is cached. The weight counts the sectors
//! cached, so a large read whose sectors are mostly evicted holds more
//! memory than it weighs: the cache counts the bytes of the buffers its
//! entries hold, and past [`HELD_MAX_RATIO`] times its capacity copies each
//! sector still cached from a mostly evicted buffer into one of its own
//! (`compact`), so the buffers can go.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use quick_cache::unsync::Cache;
use quick_cache::{Lifecycle, OptionsBuilder, Weighter};

use crate::index::ChunkHasher;
use crate::layout::{crc_then_sector, SECTOR};
use crate::shard::bump;
use crate::storage::ReadBuf;

/// Share of the cache for the main queue; the rest is the probation queue
/// new entries (and read-ahead windows, see `prefetch`) wait in until read
/// again. S3-FIFO suggests 10% for probation; read-ahead needs room for a
/// few windows there, hence 20%.
pub(crate) const HOT_ALLOCATION: f64 = 0.8;

/// `(generation, disk sector)`.
pub(crate) type Key = (u64, u64);

/// Bytes of buffers the entries may hold, at most, in multiples of the
/// cache's capacity before `compact` runs.
pub(crate) const HELD_MAX_RATIO: u64 = 2;
/// A buffer is compacted away when fewer than 1 in this many of its
/// sectors are still cached: after `compact`, every buffer left has at
/// least half of its sectors cached, so the held bytes are at most twice
/// the weight.
const SPARSE: u64 = 2;

/// The buffer of one device read, shared by the entries of its sectors:
/// counted in the cache's held bytes while any of them holds it.
struct Held {
    bytes: u64,
    total: Rc<Cell<u64>>,
}

impl Held {
    fn new(bytes: u64, total: &Rc<Cell<u64>>) -> Rc<Held> {
        total.set(total.get() + bytes);
        Rc::new(Held {
            bytes,
            total: total.clone(),
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.total.set(self.total.get() - self.bytes);
    }
}

/// One cached, verified sector.
pub(crate) struct CachedSector {
    /// The whole buffer of the read that brought it in.
    parent: ReadBuf,
    /// Byte offset of the sector in `parent`.
    off: u32,
    /// Plain crc32c of the sector's bytes (replies carry the payload's crc;
    /// a hit does not recompute it).
    crc: u32,
    /// Brought in by read-ahead and not read since: holds the cache's
    /// count of such entries, taken down when the entry is first read or
    /// dropped (evicted, replaced, forgotten).
    prefetched: Cell<Option<Rc<Cell<u64>>>>,
    /// `parent`'s share of the held bytes (one per buffer).
    held: Rc<Held>,
}

impl CachedSector {
    /// Clears the read-ahead mark; true if it was set.
    fn take_prefetched(&self) -> bool {
        match self.prefetched.take() {
            Some(live) => {
                live.set(live.get() - 1);
                true
            }
            None => false,
        }
    }
}

impl Drop for CachedSector {
    fn drop(&mut self) {
        self.take_prefetched();
    }
}

/// Counters of one shard's cache, in sectors (4 KiB) unless named bytes.
#[derive(Default, Debug)]
pub struct CacheCounters {
    pub hits: Cell<u64>,
    pub misses: Cell<u64>,
    pub inserted: Cell<u64>,
    pub evictions: Cell<u64>,
    pub prefetch_issued: Cell<u64>,
    pub prefetch_used: Cell<u64>,
    pub prefetch_wasted: Cell<u64>,
    /// Sectors given a copy of their own by `compact`.
    pub compacted: Cell<u64>,
    /// Read requests served entirely from the cache, and the others.
    pub cached_reads: Cell<u64>,
    pub uncached_reads: Cell<u64>,
}

#[derive(Clone)]
struct SectorWeight;

impl Weighter<Key, CachedSector> for SectorWeight {
    fn weight(&self, _: &Key, _: &CachedSector) -> u64 {
        SECTOR
    }
}

/// Counts evictions, and prefetched sectors evicted before anyone read them
/// (whose keys it keeps for `ReadCache::insert` to remove their ghosts).
#[derive(Clone)]
struct Evictions(Rc<CacheCounters>, Rc<RefCell<Vec<Key>>>);

impl Lifecycle<Key, CachedSector> for Evictions {
    type RequestState = ();

    fn begin_request(&self) {}

    fn on_evict(&self, _: &mut (), key: Key, val: CachedSector) {
        bump(&self.0.evictions, 1);
        if val.take_prefetched() {
            bump(&self.0.prefetch_wasted, 1);
            self.1.borrow_mut().push(key);
        }
    }
}

type Map = Cache<Key, CachedSector, SectorWeight, ChunkHasher, Evictions>;

/// A run of consecutive sectors found in the cache, as one slice.
pub(crate) struct Hit {
    pub sectors: u64,
    pub buf: ReadBuf,
    /// Plain crc32c of `buf`.
    pub crc: u32,
}

pub(crate) struct ReadCache {
    map: Option<RefCell<Map>>,
    capacity_bytes: u64,
    pub(crate) counters: Rc<CacheCounters>,
    /// Entries brought in by read-ahead and not read since. While there are
    /// none, a hit is one lookup (`get`) instead of two (`peek`, to see the
    /// mark, then `get`).
    prefetched_live: Rc<Cell<u64>>,
    /// Bytes of the buffers the entries hold (see `Held`).
    held_bytes: Rc<Cell<u64>>,
    /// Bytes inserted since `compact` last ran: it runs at most once per
    /// half a capacity inserted, so its walk over the entries costs about
    /// two entries per sector inserted, whatever the buffers look like.
    since_compact: Cell<u64>,
    /// Keys of read-ahead sectors just evicted unread (see `insert`).
    evicted_unread: Rc<RefCell<Vec<Key>>>,
}

impl ReadCache {
    /// A cache of `bytes` (rounded down to whole sectors); 0 disables it.
    pub(crate) fn new(bytes: u64) -> ReadCache {
        let counters = Rc::new(CacheCounters::default());
        let evicted_unread = Rc::new(RefCell::new(Vec::new()));
        let sectors = bytes / SECTOR;
        let map = (sectors > 0).then(|| {
            let options = OptionsBuilder::new()
                .hot_allocation(HOT_ALLOCATION)
                .estimated_items_capacity(sectors as usize)
                .weight_capacity(sectors * SECTOR)
                .build()
                .expect("weight and item capacity are set");
            RefCell::new(Map::with_options(
                options,
                SectorWeight,
                ChunkHasher::default(),
                Evictions(counters.clone(), evicted_unread.clone()),
            ))
        });
        ReadCache {
            map,
            capacity_bytes: sectors * SECTOR,
            counters,
            prefetched_live: Rc::default(),
            held_bytes: Rc::default(),
            since_compact: Cell::new(0),
            evicted_unread,
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.map.is_some()
    }

    pub(crate) fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Bytes cached now, and entries (sectors).
    pub(crate) fn usage(&self) -> (u64, u64) {
        self.map.as_ref().map_or((0, 0), |m| {
            let m = m.borrow();
            (m.weight(), m.len() as u64)
        })
    }

    /// The longest run of cached sectors of generation `generation` starting
    /// at `disk`, at most `max` long, that lies in one buffer. Counts hits
    /// (a miss is counted by the caller, per sector it reads).
    ///
    /// The first read of a read-ahead sector does not count as a reuse (it
    /// stays in probation): a stream read once must not push the hot set
    /// out of the main queue (DatenLord's MRU-for-sequential concern).
    pub(crate) fn lookup(&self, generation: u64, disk: u64, max: u64) -> Option<Hit> {
        let map = self.map.as_ref()?.borrow();
        let c = &self.counters;
        let get = |key: &Key| -> Option<&CachedSector> {
            let e = if self.prefetched_live.get() == 0 {
                // Marks it referenced; no entry carries the mark.
                map.get(key)?
            } else {
                let e = map.peek(key)?;
                if e.take_prefetched() {
                    bump(&c.prefetch_used, 1);
                } else {
                    // Marks it referenced.
                    map.get(key);
                }
                e
            };
            bump(&c.hits, 1);
            Some(e)
        };
        let first = get(&(generation, disk))?;
        let base = first.parent[..].as_ptr();
        let mut crc = first.crc;
        let mut n = 1;
        while n < max {
            let Some(e) = map.peek(&(generation, disk + n)) else {
                break;
            };
            // Same buffer (distinct live buffers start at distinct
            // addresses), next sector in it.
            if e.parent[..].as_ptr() != base
                || u64::from(e.off) != u64::from(first.off) + n * SECTOR
            {
                break;
            }
            get(&(generation, disk + n));
            crc = crc_then_sector(crc, e.crc);
            n += 1;
        }
        let buf = first
            .parent
            .slice(first.off as usize, (n * SECTOR) as usize)
            .expect("cached sectors lie inside their buffer");
        Some(Hit {
            sectors: n,
            buf,
            crc,
        })
    }

    /// Caches the verified sectors `buf` of generation `generation` read
    /// from disk sector `disk` on; `crcs`: the plain crc32c of each.
    pub(crate) fn insert(
        &self,
        generation: u64,
        disk: u64,
        buf: &ReadBuf,
        crcs: &[u32],
        prefetched: bool,
    ) {
        let Some(map) = &self.map else { return };
        let mut map = map.borrow_mut();
        let n = crcs.len() as u64;
        debug_assert_eq!(buf.len() as u64, n * SECTOR);
        let held = Held::new(buf.len() as u64, &self.held_bytes);
        for (i, crc) in (0..n).zip(crcs) {
            let mark = prefetched.then(|| {
                let live = &self.prefetched_live;
                live.set(live.get() + 1);
                live.clone()
            });
            map.insert(
                (generation, disk + i),
                CachedSector {
                    parent: buf.clone(),
                    off: (i * SECTOR) as u32,
                    crc: *crc,
                    prefetched: Cell::new(mark),
                    held: held.clone(),
                },
            );
        }
        drop(held);
        // Read-ahead evicted unread leaves no ghost: a ghost's key enters
        // the main queue when inserted again, so the reader's own read of
        // those sectors later would put a scan in the main queue, pushing
        // out the hot set.
        for k in self.evicted_unread.take() {
            // Not one resident again: a read-ahead entry replaced by this
            // insert is reported as evicted too, and its key is this
            // insert's own.
            if !map.contains_key(&k) {
                map.remove(&k);
            }
        }
        let since = self.since_compact.get() + buf.len() as u64;
        self.since_compact.set(since);
        if self.held_bytes.get() > HELD_MAX_RATIO * self.capacity_bytes
            && since >= self.capacity_bytes / 2
        {
            self.since_compact.set(0);
            self.compact(&mut map);
        }
        bump(&self.counters.inserted, n);
        if prefetched {
            bump(&self.counters.prefetch_issued, n);
        }
    }

    /// Gives each entry whose buffer has fewer than 1 in [`SPARSE`] of its
    /// sectors still cached a copy of its own sector, so those buffers go.
    /// Runs when the held bytes pass [`HELD_MAX_RATIO`] times the capacity
    /// (a cache of mostly evicted large reads), at most once per half a
    /// capacity inserted: the held bytes stay under about 2.5 times the
    /// capacity plus one read. The policy's state of the entries is kept
    /// (`peek_mut`).
    fn compact(&self, map: &mut Map) {
        let sparse: Vec<Key> = map
            .iter()
            .filter(|(_, e)| e.held.bytes > SPARSE * SECTOR * Rc::strong_count(&e.held) as u64)
            .map(|(k, _)| *k)
            .collect();
        for k in &sparse {
            if let Some(mut e) = map.peek_mut(k) {
                let off = e.off as usize;
                let own = e.parent[off..off + SECTOR as usize].to_vec();
                e.parent = ReadBuf::from_vec(own);
                e.off = 0;
                e.held = Held::new(SECTOR, &self.held_bytes);
            }
        }
        bump(&self.counters.compacted, sparse.len() as u64);
    }

    /// Bytes of the buffers the entries hold (at least what they weigh).
    pub(crate) fn held_bytes(&self) -> u64 {
        self.held_bytes.get()
    }

    /// Takes back `n` hits counted by lookups whose read was then planned
    /// again.
    pub(crate) fn uncount_hits(&self, n: u64) {
        let h = &self.counters.hits;
        h.set(h.get().saturating_sub(n));
    }

    /// Whether sector `disk` of `generation` is cached (no hit counted).
    pub(crate) fn contains(&self, generation: u64, disk: u64) -> bool {
        self.map
            .as_ref()
            .is_some_and(|m| m.borrow().contains_key(&(generation, disk)))
    }

    /// Drops the sectors `[disk, disk + count)` of `generation` (superseded
    /// or deleted).
    pub(crate) fn forget(&self, generation: u64, disk: u64, count: u64) {
        let Some(map) = &self.map else { return };
        let mut map = map.borrow_mut();
        if map.is_empty() {
            return;
        }
        for i in 0..count {
            map.remove(&(generation, disk + i));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(sectors: u64, fill: u8) -> ReadBuf {
        ReadBuf::from_vec(vec![fill; (sectors * SECTOR) as usize])
    }

    fn crcs(b: &ReadBuf) -> Vec<u32> {
        b.chunks(SECTOR as usize).map(crc32c::crc32c).collect()
    }

    /// Inserts `buf` with its true crcs.
    fn put(c: &ReadCache, generation: u64, disk: u64, buf: ReadBuf, prefetched: bool) {
        c.insert(generation, disk, &buf, &crcs(&buf), prefetched);
    }

    #[test]
    fn runs_from_one_buffer_come_back_as_one_slice() {
        let c = ReadCache::new(64 * SECTOR);
        put(&c, 7, 100, buf(4, 1), false);
        put(&c, 7, 104, buf(2, 2), false);
        let h = c.lookup(7, 101, 10).unwrap();
        assert_eq!(h.sectors, 3, "stops at the end of the first buffer");
        assert!(h.buf.iter().all(|&b| b == 1));
        assert_eq!(h.crc, crc32c::crc32c(&h.buf), "the run's crc is chained");
        let h = c.lookup(7, 104, 10).unwrap();
        assert_eq!(h.sectors, 2);
        assert!(h.buf.iter().all(|&b| b == 2));
        assert!(c.lookup(8, 100, 1).is_none(), "another generation misses");
        assert_eq!(c.counters.hits.get(), 5);
        c.forget(7, 100, 2);
        assert!(c.lookup(7, 100, 1).is_none());
        assert!(c.contains(7, 102));
        assert_eq!(c.usage(), (4 * SECTOR, 4));
    }

    /// Large reads of which one sector each stays hot (read again) while
    /// the rest is evicted: the buffers they hold are bounded, by copying
    /// those sectors out of their mostly evicted buffers, and the copies
    /// serve the same bytes.
    #[test]
    fn buffers_held_by_a_few_hot_sectors_are_bounded() {
        let cap = 256 * SECTOR;
        let c = ReadCache::new(cap);
        for g in 0..64u64 {
            put(&c, g, 0, buf(256, g as u8), false);
            // Its last sector (still in probation) read again: it outlives
            // the rest.
            c.lookup(g, 255, 1).unwrap();
            assert!(
                c.held_bytes() <= HELD_MAX_RATIO * cap + cap / 2 + 256 * SECTOR,
                "{} bytes held by a cache of {cap} after {} reads",
                c.held_bytes(),
                g + 1
            );
        }
        assert!(c.counters.compacted.get() > 0);
        let mut served = 0;
        for g in 0..64u64 {
            if let Some(h) = c.lookup(g, 255, 1) {
                assert!(h.buf.iter().all(|&b| b == g as u8), "generation {g}");
                assert_eq!(h.crc, crc32c::crc32c(&h.buf));
                served += 1;
            }
        }
        assert!(served > 0);
    }

    /// Read-ahead evicted unread leaves no trace: when the reader then
    /// reads those sectors from disk they enter probation like any new
    /// sector (and go with the next scan through it), not the main queue,
    /// where a ghost of the read-ahead sector used to send them.
    #[test]
    fn read_ahead_evicted_unread_does_not_reach_the_main_queue() {
        let c = ReadCache::new(64 * SECTOR);
        // A full cache first (an empty one admits to its main queue).
        for g in 1000..1200 {
            put(&c, g, 0, buf(1, 0), false);
        }
        put(&c, 1, 0, buf(4, 1), true);
        // Just enough to push them out of probation unread.
        let mut g = 2000;
        while (0..4).any(|i| c.contains(1, i)) {
            put(&c, g, 0, buf(1, 0), false);
            g += 1;
        }
        assert_eq!(c.counters.prefetch_wasted.get(), 4);
        put(&c, 1, 0, buf(4, 1), false);
        for g in 3000..3100 {
            put(&c, g, 0, buf(1, 0), false);
        }
        assert!(
            !(0..4).any(|i| c.contains(1, i)),
            "sectors read ahead and wasted went to the main queue when read"
        );
        // Read-ahead replaced by a client's read of the same sectors: the
        // client's entries stay.
        put(&c, 2, 0, buf(4, 2), true);
        put(&c, 2, 0, buf(4, 3), false);
        assert!(
            (0..4).all(|i| c.contains(2, i)),
            "the client's entries were dropped"
        );
    }

    #[test]
    fn prefetched_sectors_count_used_or_wasted() {
        let c = ReadCache::new(64 * SECTOR);
        // A full cache first (an empty one admits new entries to its main
        // queue directly).
        for g in 1000..1200 {
            put(&c, g, 0, buf(1, 0), false);
        }
        put(&c, 1, 0, buf(4, 0), true);
        assert_eq!(c.counters.prefetch_issued.get(), 4);
        c.lookup(1, 0, 2).unwrap();
        assert_eq!(c.counters.prefetch_used.get(), 2);
        c.lookup(1, 0, 2).unwrap();
        assert_eq!(c.counters.prefetch_used.get(), 2, "counted once");
        // Push everything out: the two unread prefetched sectors are waste.
        for g in 2..1000 {
            put(&c, g, 0, buf(1, 0), false);
        }
        assert_eq!(c.counters.prefetch_wasted.get(), 2, "{:?}", c.counters);
        assert!(c.usage().0 <= 64 * SECTOR);
    }

    /// The count that picks the one-lookup hit path follows every way a
    /// read-ahead mark goes: a first read, a forget, a replacement, an
    /// eviction.
    #[test]
    fn read_ahead_marks_are_counted_until_read_or_gone() {
        let c = ReadCache::new(64 * SECTOR);
        let live = || c.prefetched_live.get();
        // A full cache first (an empty one admits new entries to its main
        // queue directly, where the scan below would not reach them).
        for g in 1000..1200 {
            put(&c, g, 0, buf(1, 0), false);
        }
        put(&c, 1, 0, buf(6, 0), true);
        assert_eq!(live(), 6);
        c.lookup(1, 0, 2).unwrap();
        assert_eq!(live(), 4, "read");
        c.forget(1, 2, 1);
        assert_eq!(live(), 3, "forgotten");
        put(&c, 1, 3, buf(1, 9), false);
        assert_eq!(live(), 2, "replaced");
        for g in 2..1000 {
            put(&c, g, 0, buf(1, 0), false);
        }
        assert_eq!(live(), 0, "evicted");
        assert_eq!(
            c.counters.prefetch_wasted.get(),
            3,
            "evicted or replaced unread (a forgotten sector is not waste)"
        );
        // No marks left: a hit is a plain `get`, and still counted.
        let hits = c.counters.hits.get();
        c.lookup(999, 0, 1).unwrap();
        assert_eq!(c.counters.hits.get(), hits + 1);
        assert!(c.usage().0 <= 64 * SECTOR);
    }

    #[test]
    fn disabled_cache_holds_nothing() {
        let c = ReadCache::new(0);
        assert!(!c.enabled());
        put(&c, 1, 0, buf(1, 0), false);
        assert!(c.lookup(1, 0, 1).is_none());
        assert_eq!(c.usage(), (0, 0));
    }
}
