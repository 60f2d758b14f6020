//! The shard's index: where each chunk's bytes are. It lives in memory,
//! owned by the shard's executor; sled (or [`MemKv`] on the simulated disk)
//! holds its persistent copy, written only by checkpoints.
//!
//! In memory (no locks: the shard is `!Send`):
//! - one hash table, chunk -> entry, so a point read (meta, then the
//!   records a READ covers) probes one table: the entry holds the chunk's
//!   [`ChunkMeta`] (length, version, times, live sectors) and its
//!   [`ExtentRec`]s by logical start sector, each a run of logical sectors
//!   stored contiguously on disk, with its generation, the position of the
//!   physical extent's header and every sector's crc. A chunk's records are
//!   a sorted vector (the first inline) up to 32, a B-tree past that. The
//!   hasher is foldhash with a per-process seed from the OS (chunk ids are
//!   client-chosen);
//! - the same chunk ids in an ordered set, for what needs id order: LIST
//!   and the walks in key order (scrubber, `verify`, recovery's sweep);
//! - chunk -> [`TombRec`]: the chunk's latest durable delete (its tombstone
//!   extent on disk is live space while this record exists);
//! - the recovery [`Checkpoint`] (see `recover`);
//! - the set of keys changed since the last flush.
//!
//! Records of one chunk never overlap: an overwrite splits the records it
//! covers at sector granularity (the kept crcs stay valid because a sector's
//! crc identity is its *logical* index and the generation of the write that
//! produced it).
//!
//! The store uses one sled tree with these keys (big-endian, so they sort
//! like the maps: a chunk's extents are one key range in logical order):
//! `'m' ++ chunk_be16`, `'e' ++ chunk_be16 ++ logical_start_be8`,
//! `'t' ++ chunk_be16`, and `'c'` for the checkpoint.
//!
//! Order of steps: a write's [`Change`] is applied to memory only, after the
//! write is durable in the data area (the source of truth, invariant 5), and
//! marks its keys changed. [`Index::flush`] (one per checkpoint) takes the
//! current value of every changed key plus the checkpoint record as ONE
//! atomic batch, in one synchronous step, and applies and flushes it on the
//! executor's blocking thread pool, never on the shard thread. So after a
//! crash the store holds exactly the index of one checkpoint (the last one
//! whose batch landed), and recovery replays the data area written since.
//! The whole store is read into memory at open ([`Index::load`]).
//!
//! Memory (measured: heap growth, `mallinfo2`, for 200,000 chunks with
//! random ids, dirty set emptied): a chunk of one 4 KiB extent costs about
//! 293 bytes (its hash table slot, the record inline; its share of the
//! ordered id set; the crc vector's allocation); 299 with the three B-trees
//! this replaced, measured the same way (340 was an older measurement).
//! Each further extent record of a chunk costs about 175 bytes plus 4 bytes
//! per sector past the first, and each key changed since the last
//! checkpoint about 45 bytes more in the dirty set until the checkpoint. So
//! about 7% of the data size for 4 KiB chunks, 0.13% for 1 MiB
//! single-extent chunks: the index must fit in RAM. sled's page cache (`ShardConfig::index_cache_bytes`) now
//! serves only the checkpoint batches and the load at open.

use std::cell::RefCell;
use std::collections::{hash_map, BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::BuildHasher;
use std::ops::Bound;

use crate::sem::Semaphore;
use shardstore_proto::ChunkId;
use smallvec::SmallVec;

use crate::alloc::Run;
use crate::error::ShardError;
use crate::layout::{le_u32, le_u64, Crcs, DiskSector, Generation, LogicalSector};
use crate::sim::{KvBatch, MemKv};

const META_PREFIX: u8 = b'm';
const EXTENT_PREFIX: u8 = b'e';
const TOMB_PREFIX: u8 = b't';
const CHECKPOINT_KEY: &[u8] = b"c";
const META_VALUE_LEN: usize = 48;
const EXTENT_VALUE_FIXED: usize = 32;
const TOMB_VALUE_LEN: usize = 24;
const CHECKPOINT_MAGIC: u64 = u64::from_le_bytes(*b"SSCKPT02");
/// Most runs a checkpoint lists (bounds its size and the recovery scan).
pub const MAX_CHECKPOINT_RUNS: usize = 4096;

/// The durable recovery checkpoint: every write with a generation below
/// `replay_from` is in the index; every extent with a generation at or above
/// it lies inside `scan`; no generation at or above `high_water` had been
/// handed out when it was taken (see `recover`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub replay_from: u64,
    pub high_water: u64,
    pub taken_ns: u64,
    pub scan: Vec<Run>,
}

impl Checkpoint {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(32 + 16 * self.scan.len());
        v.extend_from_slice(&CHECKPOINT_MAGIC.to_le_bytes());
        v.extend_from_slice(&self.replay_from.to_le_bytes());
        v.extend_from_slice(&self.high_water.to_le_bytes());
        v.extend_from_slice(&self.taken_ns.to_le_bytes());
        v.extend_from_slice(&(self.scan.len() as u32).to_le_bytes());
        for r in &self.scan {
            v.extend_from_slice(&r.start.0.to_le_bytes());
            v.extend_from_slice(&r.len.to_le_bytes());
        }
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    fn decode(v: &[u8]) -> Result<Checkpoint, ShardError> {
        let bad = |why: &str| ShardError::IndexCorrupt(format!("checkpoint record: {why}"));
        if v.len() < 40 {
            return Err(bad("too short"));
        }
        let body = &v[..v.len() - 4];
        if crc32c::crc32c(body) != le_u32(v, v.len() - 4) {
            return Err(bad("crc mismatch"));
        }
        if le_u64(v, 0) != CHECKPOINT_MAGIC {
            return Err(bad("bad magic"));
        }
        let n = le_u32(v, 32) as usize;
        if n > MAX_CHECKPOINT_RUNS || body.len() != 36 + 16 * n {
            return Err(bad("bad run count"));
        }
        Ok(Checkpoint {
            replay_from: le_u64(v, 8),
            high_water: le_u64(v, 16),
            taken_ns: le_u64(v, 24),
            scan: (0..n)
                .map(|i| Run {
                    start: DiskSector(le_u64(v, 36 + 16 * i)),
                    len: le_u64(v, 44 + 16 * i),
                })
                .collect(),
        })
    }
}

/// A chunk's latest durable delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TombRec {
    pub generation: Generation,
    /// The tombstone extent's sector.
    pub disk: DiskSector,
    /// The version the chunk had when deleted.
    pub version: u64,
}

impl TombRec {
    fn encode(&self) -> [u8; TOMB_VALUE_LEN] {
        let mut v = [0u8; TOMB_VALUE_LEN];
        v[0..8].copy_from_slice(&self.generation.0.to_le_bytes());
        v[8..16].copy_from_slice(&self.disk.0.to_le_bytes());
        v[16..24].copy_from_slice(&self.version.to_le_bytes());
        v
    }

    fn decode(v: &[u8]) -> Result<TombRec, ShardError> {
        if v.len() != TOMB_VALUE_LEN {
            return Err(ShardError::IndexCorrupt(format!(
                "tombstone record has {} bytes",
                v.len()
            )));
        }
        Ok(TombRec {
            generation: Generation(le_u64(v, 0)),
            disk: DiskSector(le_u64(v, 8)),
            version: le_u64(v, 16),
        })
    }
}

/// Per-chunk metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkMeta {
    pub len: u64,
    pub version: u64,
    pub created_ns: u64,
    pub modified_ns: u64,
    /// Live data sectors referenced by the chunk's extent records.
    pub live_sectors: u64,
    /// Generation of the chunk's latest write in the index.
    pub generation: u64,
}

impl ChunkMeta {
    fn encode(&self) -> [u8; META_VALUE_LEN] {
        let mut v = [0u8; META_VALUE_LEN];
        v[0..8].copy_from_slice(&self.len.to_le_bytes());
        v[8..16].copy_from_slice(&self.version.to_le_bytes());
        v[16..24].copy_from_slice(&self.created_ns.to_le_bytes());
        v[24..32].copy_from_slice(&self.modified_ns.to_le_bytes());
        v[32..40].copy_from_slice(&self.live_sectors.to_le_bytes());
        v[40..48].copy_from_slice(&self.generation.to_le_bytes());
        v
    }

    fn decode(chunk: ChunkId, v: &[u8]) -> Result<ChunkMeta, ShardError> {
        if v.len() != META_VALUE_LEN {
            return Err(ShardError::IndexCorrupt(format!(
                "meta of chunk {chunk} has {} bytes",
                v.len()
            )));
        }
        Ok(ChunkMeta {
            len: le_u64(v, 0),
            version: le_u64(v, 8),
            created_ns: le_u64(v, 16),
            modified_ns: le_u64(v, 24),
            live_sectors: le_u64(v, 32),
            generation: le_u64(v, 40),
        })
    }
}

/// A run of a chunk's logical sectors, stored contiguously on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentRec {
    pub logical: LogicalSector,
    /// Disk position of the data sector holding `logical`.
    pub disk: DiskSector,
    /// Header of the physical extent this run belongs to.
    pub header: DiskSector,
    pub header_sectors: u64,
    pub generation: Generation,
    /// crc of each sector of the run; `crcs.len()` is the run's sector count.
    pub crcs: Crcs,
}

impl ExtentRec {
    pub fn count(&self) -> u64 {
        self.crcs.len() as u64
    }

    pub fn end(&self) -> u64 {
        self.logical.0 + self.count()
    }

    /// The sub-run `[from, to)` (logical sectors, inside this run).
    pub fn slice(&self, from: u64, to: u64) -> ExtentRec {
        assert!(self.logical.0 <= from && from < to && to <= self.end());
        let skip = from - self.logical.0;
        ExtentRec {
            logical: LogicalSector(from),
            disk: DiskSector(self.disk.0 + skip),
            header: self.header,
            header_sectors: self.header_sectors,
            generation: self.generation,
            crcs: Crcs::from_slice(&self.crcs[skip as usize..(to - self.logical.0) as usize]),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(EXTENT_VALUE_FIXED + 4 * self.crcs.len());
        v.extend_from_slice(&self.disk.0.to_le_bytes());
        v.extend_from_slice(&self.header.0.to_le_bytes());
        v.extend_from_slice(&self.generation.0.to_le_bytes());
        v.extend_from_slice(&(self.crcs.len() as u32).to_le_bytes());
        v.extend_from_slice(&(self.header_sectors as u32).to_le_bytes());
        for c in &self.crcs {
            v.extend_from_slice(&c.to_le_bytes());
        }
        v
    }

    fn decode(key: &[u8], v: &[u8]) -> Result<(ChunkId, ExtentRec), ShardError> {
        let bad = |why: &str| ShardError::IndexCorrupt(format!("extent record {key:02x?}: {why}"));
        if key.len() != 25 || key[0] != EXTENT_PREFIX {
            return Err(bad("bad key"));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&key[1..17]);
        let chunk = ChunkId::from_be_bytes(id);
        let mut ls = [0u8; 8];
        ls.copy_from_slice(&key[17..25]);
        if v.len() < EXTENT_VALUE_FIXED {
            return Err(bad("value too short"));
        }
        let count = le_u32(v, 24) as usize;
        if count == 0 || v.len() != EXTENT_VALUE_FIXED + 4 * count {
            return Err(bad("value length does not match its sector count"));
        }
        let header_sectors = u64::from(le_u32(v, 28));
        if header_sectors == 0 {
            return Err(bad("zero header sectors"));
        }
        Ok((
            chunk,
            ExtentRec {
                logical: LogicalSector(u64::from_be_bytes(ls)),
                disk: DiskSector(le_u64(v, 0)),
                header: DiskSector(le_u64(v, 8)),
                header_sectors,
                generation: Generation(le_u64(v, 16)),
                crcs: (0..count)
                    .map(|i| le_u32(v, EXTENT_VALUE_FIXED + 4 * i))
                    .collect(),
            },
        ))
    }
}

/// Key of one record in the backing store; also what the dirty set holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    Meta(ChunkId),
    Extent(ChunkId, LogicalSector),
    Tomb(ChunkId),
    Checkpoint,
}

impl Key {
    fn encode(self) -> Vec<u8> {
        let chunk_key = |prefix: u8, chunk: ChunkId| {
            let mut k = Vec::with_capacity(25);
            k.push(prefix);
            k.extend_from_slice(&chunk.to_be_bytes());
            k
        };
        match self {
            Key::Meta(c) => chunk_key(META_PREFIX, c),
            Key::Tomb(c) => chunk_key(TOMB_PREFIX, c),
            Key::Extent(c, l) => {
                let mut k = chunk_key(EXTENT_PREFIX, c);
                k.extend_from_slice(&l.0.to_be_bytes());
                k
            }
            Key::Checkpoint => CHECKPOINT_KEY.to_vec(),
        }
    }
}

/// The chunk id of a `prefix ++ chunk_be16` key.
fn chunk_of(key: &[u8]) -> Result<ChunkId, ShardError> {
    if key.len() != 17 {
        return Err(ShardError::IndexCorrupt(format!("bad key {key:02x?}")));
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&key[1..]);
    Ok(ChunkId::from_be_bytes(id))
}

/// Nice value of the thread that writes checkpoint batches: when it shares
/// a CPU with a shard thread (it is not pinned), the shard thread wins. Not
/// 19: it must still progress when every CPU is busy, or writers end up
/// waiting for their reservation. Measured at 32 writes in flight, with the
/// server confined to one CPU: +8% writes/s and p99 6.7 -> 5.4 ms.
const PERSIST_NICE: libc::c_int = 10;

/// Gives the calling thread [`PERSIST_NICE`] (once per thread; best effort).
/// Called on the shard executor's blocking pool, which only the index uses.
fn lower_priority() {
    thread_local!(static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    if !DONE.replace(true) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as libc::id_t;
        // SAFETY: integer arguments only; on failure the priority stays.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, PERSIST_NICE) } != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower the index persist thread's priority");
        }
    }
}

/// The persistent copy under the index: sled, or [`MemKv`] on the simulated disk.
enum Store {
    Sled(sled::Db),
    Mem(MemKv),
}

impl Store {
    /// Calls `f` on every record, in key order.
    fn for_each(
        &self,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), ShardError>,
    ) -> Result<(), ShardError> {
        match self {
            Store::Sled(db) => {
                for item in db.iter() {
                    let (k, v) = item?;
                    f(&k, &v)?;
                }
            }
            Store::Mem(m) => {
                for (k, v) in m.range(Bound::Unbounded, Bound::Unbounded) {
                    f(&k, &v)?;
                }
            }
        }
        Ok(())
    }

    /// Applies `batch` atomically and makes it durable. sled's part runs on
    /// the executor's blocking thread pool: it costs tens of microseconds per
    /// key and competes with sled's own flusher for locks.
    async fn write(&self, batch: KvBatch) -> Result<(), ShardError> {
        match self {
            Store::Sled(db) => {
                let db = db.clone();
                glommio::executor()
                    .spawn_blocking(move || -> Result<(), sled::Error> {
                        lower_priority();
                        let mut b = sled::Batch::default();
                        for (k, v) in batch {
                            match v {
                                Some(v) => b.insert(k, v),
                                None => b.remove(k),
                            }
                        }
                        db.apply_batch(b)?;
                        db.flush()?;
                        Ok(())
                    })
                    .await?;
            }
            Store::Mem(m) => {
                // Applied, then flushed after a yield: a crash in between
                // keeps the whole batch or none of it, as with sled.
                m.apply(batch);
                futures_lite::future::yield_now().await;
                m.flush();
            }
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        match self {
            Store::Sled(db) => db.is_empty(),
            Store::Mem(m) => m.is_empty(),
        }
    }

    fn clear(&self) -> Result<(), ShardError> {
        match self {
            Store::Sled(db) => db.clear()?,
            Store::Mem(m) => m.clear(),
        }
        Ok(())
    }
}

/// Builds the hasher of the chunk table (and of the read cache): foldhash,
/// seeded from the OS's random source once per process (chunk ids are
/// client-chosen; an unseeded hash would let a client pick colliding ids).
#[derive(Clone)]
pub(crate) struct ChunkHasher(foldhash::fast::SeedableRandomState);

impl Default for ChunkHasher {
    fn default() -> Self {
        static SEED: std::sync::OnceLock<(u64, foldhash::SharedSeed)> = std::sync::OnceLock::new();
        let (per_hasher, shared) = SEED.get_or_init(|| {
            // std's RandomState holds keys from the OS's random source.
            let r = || std::collections::hash_map::RandomState::new().hash_one(0u8);
            (r(), foldhash::SharedSeed::from_u64(r()))
        });
        ChunkHasher(foldhash::fast::SeedableRandomState::with_seed(
            *per_hasher,
            shared,
        ))
    }
}

impl BuildHasher for ChunkHasher {
    type Hasher = foldhash::fast::FoldHasher<'static>;

    #[inline]
    fn build_hasher(&self) -> Self::Hasher {
        self.0.build_hasher()
    }
}

/// The extent records of one chunk overlapping a range, in logical order;
/// inline when there is one (a point read of a chunk written in one piece).
pub type Overlapping = SmallVec<[ExtentRec; 1]>;

/// Most records a chunk keeps in its sorted vector; past this they move to a
/// B-tree (a 64 MiB chunk overwritten in random 4 KiB pieces has 16,384, and
/// a vector's insert would move them all).
const EXTENTS_INLINE_MAX: usize = 32;

/// A chunk's extent records, keyed by logical start sector. Almost every
/// chunk has one or a few: a sorted vector, the first record inline; many
/// records: a B-tree.
enum Extents {
    Few(SmallVec<[ExtentRec; 1]>),
    Many(BTreeMap<u64, ExtentRec>),
}

impl Default for Extents {
    fn default() -> Self {
        Extents::Few(SmallVec::new())
    }
}

impl Extents {
    fn len(&self) -> usize {
        match self {
            Extents::Few(v) => v.len(),
            Extents::Many(m) => m.len(),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Extents::Few(v) => v.is_empty(),
            Extents::Many(m) => m.is_empty(),
        }
    }

    fn get(&self, logical: u64) -> Option<&ExtentRec> {
        match self {
            Extents::Few(v) => v
                .binary_search_by_key(&logical, |r| r.logical.0)
                .ok()
                .map(|i| &v[i]),
            Extents::Many(m) => m.get(&logical),
        }
    }

    fn insert(&mut self, rec: ExtentRec) {
        match self {
            Extents::Few(v) => match v.binary_search_by_key(&rec.logical.0, |r| r.logical.0) {
                Ok(i) => v[i] = rec,
                Err(i) if v.len() < EXTENTS_INLINE_MAX => v.insert(i, rec),
                Err(_) => {
                    let mut m: BTreeMap<u64, ExtentRec> =
                        v.drain(..).map(|r| (r.logical.0, r)).collect();
                    m.insert(rec.logical.0, rec);
                    *self = Extents::Many(m);
                }
            },
            Extents::Many(m) => {
                m.insert(rec.logical.0, rec);
            }
        }
    }

    fn remove(&mut self, logical: u64) {
        match self {
            Extents::Few(v) => {
                if let Ok(i) = v.binary_search_by_key(&logical, |r| r.logical.0) {
                    v.remove(i);
                }
            }
            Extents::Many(m) => {
                m.remove(&logical);
                // Back to a vector well below the limit, so a chunk
                // hovering at it does not convert on every write.
                if m.len() <= EXTENTS_INLINE_MAX / 2 {
                    *self = Extents::Few(std::mem::take(m).into_values().collect());
                }
            }
        }
    }

    /// Records with a logical start in `(lo, hi)`, in order.
    fn between(&self, lo: Bound<u64>, hi: Bound<u64>) -> impl Iterator<Item = &ExtentRec> {
        let (few, many) = match self {
            Extents::Few(v) => {
                let from = match lo {
                    Bound::Included(l) => v.partition_point(|r| r.logical.0 < l),
                    Bound::Excluded(l) => v.partition_point(|r| r.logical.0 <= l),
                    Bound::Unbounded => 0,
                };
                let rest = v[from..].iter().take_while(move |r| match hi {
                    Bound::Included(h) => r.logical.0 <= h,
                    Bound::Excluded(h) => r.logical.0 < h,
                    Bound::Unbounded => true,
                });
                (Some(rest), None)
            }
            Extents::Many(m) => (None, Some(m.range((lo, hi)).map(|(_, r)| r))),
        };
        few.into_iter().flatten().chain(many.into_iter().flatten())
    }

    /// The record starting at or before `logical`, if any.
    fn at_or_before(&self, logical: u64) -> Option<&ExtentRec> {
        match self {
            Extents::Few(v) => match v.partition_point(|r| r.logical.0 <= logical) {
                0 => None,
                i => Some(&v[i - 1]),
            },
            Extents::Many(m) => m.range(..=logical).next_back().map(|(_, r)| r),
        }
    }

    /// Records overlapping logical sectors `[first, end)`, in order.
    fn overlapping(&self, first: u64, end: u64) -> Overlapping {
        let mut out = Overlapping::new();
        if end <= first {
            return out;
        }
        // The record starting at or before `first` may reach into the range.
        if let Some(r) = self.at_or_before(first) {
            if r.end() > first {
                out.push(r.clone());
            }
        }
        out.extend(
            self.between(Bound::Excluded(first), Bound::Excluded(end))
                .cloned(),
        );
        out
    }
}

/// Everything the index holds about one chunk that has a meta or extents.
#[derive(Default)]
struct ChunkEntry {
    meta: Option<ChunkMeta>,
    extents: Extents,
}

/// The in-memory index and the keys changed since the last flush.
///
/// Invariant: `chunks` holds an entry exactly for the chunks that have a meta
/// or an extent record, and `order` holds exactly the keys of `chunks`.
#[derive(Default)]
struct Maps {
    /// Point lookups (reads, writes): one hash probe.
    chunks: HashMap<ChunkId, ChunkEntry, ChunkHasher>,
    /// The chunks of `chunks` in id order, for LIST and the walks in key
    /// order (scrubber, `verify`).
    order: BTreeSet<ChunkId>,
    tombs: BTreeMap<ChunkId, TombRec>,
    checkpoint: Option<Checkpoint>,
    dirty: HashSet<Key, ChunkHasher>,
}

impl Maps {
    /// The entry of `chunk`, created if absent.
    fn entry(&mut self, chunk: ChunkId) -> &mut ChunkEntry {
        match self.chunks.entry(chunk) {
            hash_map::Entry::Occupied(e) => e.into_mut(),
            hash_map::Entry::Vacant(e) => {
                self.order.insert(chunk);
                e.insert(ChunkEntry::default())
            }
        }
    }

    /// Changes the entry of `chunk` (if any) with `f`, then drops it if it
    /// holds nothing any more.
    fn update(&mut self, chunk: ChunkId, f: impl FnOnce(&mut ChunkEntry)) {
        let hash_map::Entry::Occupied(mut e) = self.chunks.entry(chunk) else {
            return;
        };
        f(e.get_mut());
        if e.get().meta.is_none() && e.get().extents.is_empty() {
            e.remove();
            self.order.remove(&chunk);
        }
    }

    fn put_meta(&mut self, chunk: ChunkId, meta: ChunkMeta) {
        self.entry(chunk).meta = Some(meta);
    }

    fn put_extent(&mut self, chunk: ChunkId, rec: ExtentRec) {
        self.entry(chunk).extents.insert(rec);
    }

    /// Adds one record read from the store.
    fn load(&mut self, k: &[u8], v: &[u8]) -> Result<(), ShardError> {
        match k.first() {
            Some(&META_PREFIX) => {
                let chunk = chunk_of(k)?;
                self.put_meta(chunk, ChunkMeta::decode(chunk, v)?);
            }
            Some(&EXTENT_PREFIX) => {
                let (chunk, rec) = ExtentRec::decode(k, v)?;
                self.put_extent(chunk, rec);
            }
            Some(&TOMB_PREFIX) => {
                self.tombs.insert(chunk_of(k)?, TombRec::decode(v)?);
            }
            _ if k == CHECKPOINT_KEY => self.checkpoint = Some(Checkpoint::decode(v)?),
            _ => return Err(ShardError::IndexCorrupt(format!("unknown key {k:02x?}"))),
        }
        Ok(())
    }

    /// The encoded current value of `key` (None: absent).
    fn value(&self, key: Key) -> Option<Vec<u8>> {
        match key {
            Key::Meta(c) => self
                .chunks
                .get(&c)
                .and_then(|e| e.meta)
                .map(|m| m.encode().to_vec()),
            Key::Extent(c, l) => self
                .chunks
                .get(&c)
                .and_then(|e| e.extents.get(l.0))
                .map(ExtentRec::encode),
            Key::Tomb(c) => self.tombs.get(&c).map(|t| t.encode().to_vec()),
            Key::Checkpoint => self.checkpoint.as_ref().map(Checkpoint::encode),
        }
    }

    /// The entries of the chunks from `lo` on, in id order.
    fn entries_from(&self, lo: Bound<ChunkId>) -> impl Iterator<Item = (ChunkId, &ChunkEntry)> {
        self.order
            .range((lo, Bound::Unbounded))
            .map(|&c| (c, &self.chunks[&c]))
    }
}

/// The shard's index, in memory, with its persistent copy. See the module docs.
pub struct Index {
    store: Store,
    maps: RefCell<Maps>,
    /// One flush at a time, so batches reach the store in snapshot order.
    flushing: Semaphore,
}

impl Index {
    /// An index over a sled database; empty until [`Index::load`].
    pub fn new(db: sled::Db) -> Index {
        Index::with_store(Store::Sled(db))
    }

    /// An index over the simulated disk's store; empty until [`Index::load`].
    pub fn new_mem(kv: MemKv) -> Index {
        Index::with_store(Store::Mem(kv))
    }

    fn with_store(store: Store) -> Index {
        Index {
            store,
            maps: RefCell::new(Maps::default()),
            flushing: Semaphore::new(1),
        }
    }

    /// Reads the whole store into memory (at open); returns the checkpoint
    /// record. On an error the in-memory index stays empty.
    pub fn load(&self) -> Result<Option<Checkpoint>, ShardError> {
        let mut maps = Maps::default();
        self.store.for_each(|k, v| maps.load(k, v))?;
        let ck = maps.checkpoint.clone();
        *self.maps.borrow_mut() = maps;
        Ok(ck)
    }

    /// Writes the current value of every key changed since the last flush
    /// (the checkpoint record included) as ONE atomic batch and makes it
    /// durable, off the executor thread. Returns the number of keys written.
    ///
    /// The batch is taken in one synchronous step, between two changes, so
    /// the store always holds the index as it was at some instant. If the
    /// write fails, the keys are marked changed again (the caller fail-stops;
    /// nothing is silently dropped).
    pub async fn flush(&self) -> Result<usize, ShardError> {
        let _permit = self
            .flushing
            .acquire_permit(1)
            .await
            .map_err(|e| ShardError::Internal(format!("index flush lock closed: {e}")))?;
        let (keys, batch) = {
            let mut maps = self.maps.borrow_mut();
            let keys: Vec<Key> = maps.dirty.drain().collect();
            let batch: KvBatch = keys.iter().map(|&k| (k.encode(), maps.value(k))).collect();
            (keys, batch)
        };
        if let Err(e) = self.store.write(batch).await {
            self.maps.borrow_mut().dirty.extend(keys.iter().copied());
            return Err(e);
        }
        Ok(keys.len())
    }

    /// Keys changed since the last flush.
    #[cfg(test)]
    fn dirty_keys(&self) -> usize {
        self.maps.borrow().dirty.len()
    }

    pub fn get_meta(&self, chunk: ChunkId) -> Option<ChunkMeta> {
        self.maps.borrow().chunks.get(&chunk).and_then(|e| e.meta)
    }

    pub fn get_tomb(&self, chunk: ChunkId) -> Option<TombRec> {
        self.maps.borrow().tombs.get(&chunk).copied()
    }

    /// Extent records of `chunk` overlapping logical sectors `[first, end)`,
    /// in logical order.
    pub fn overlapping(&self, chunk: ChunkId, first: u64, end: u64) -> Overlapping {
        let maps = self.maps.borrow();
        match maps.chunks.get(&chunk) {
            Some(e) => e.extents.overlapping(first, end),
            None => Overlapping::new(),
        }
    }

    /// All extent records of `chunk`, in logical order.
    pub fn chunk_extents(&self, chunk: ChunkId) -> Vec<ExtentRec> {
        let maps = self.maps.borrow();
        let Some(e) = maps.chunks.get(&chunk) else {
            return Vec::new();
        };
        e.extents
            .between(Bound::Unbounded, Bound::Unbounded)
            .cloned()
            .collect()
    }

    /// Calls `f` on every extent record of the shard, in key order. `f` must
    /// not use the index.
    pub fn for_each_extent<E>(
        &self,
        mut f: impl FnMut(ChunkId, &ExtentRec) -> Result<(), E>,
    ) -> Result<(), E> {
        let maps = self.maps.borrow();
        for (chunk, e) in maps.entries_from(Bound::Unbounded) {
            for rec in e.extents.between(Bound::Unbounded, Bound::Unbounded) {
                f(chunk, rec)?;
            }
        }
        Ok(())
    }

    /// The extent record after `(chunk, logical)` in key order, or the first
    /// one (for walks that wait between records: the scrubber, `verify`).
    pub fn extent_after(
        &self,
        after: Option<(ChunkId, LogicalSector)>,
    ) -> Option<(ChunkId, ExtentRec)> {
        let maps = self.maps.borrow();
        let lo = after.map_or(Bound::Unbounded, |(c, _)| Bound::Included(c));
        for (chunk, e) in maps.entries_from(lo) {
            let from = match after {
                Some((c, l)) if c == chunk => Bound::Excluded(l.0),
                _ => Bound::Unbounded,
            };
            if let Some(rec) = e.extents.between(from, Bound::Unbounded).next() {
                return Some((chunk, rec.clone()));
            }
        }
        None
    }

    /// Every tombstone record of the shard, in chunk order.
    pub fn tombs(&self) -> Vec<(ChunkId, TombRec)> {
        let maps = self.maps.borrow();
        maps.tombs.iter().map(|(&c, &t)| (c, t)).collect()
    }

    /// Up to `limit` chunks in id order, strictly after `after`.
    pub fn metas_after(&self, after: Option<ChunkId>, limit: usize) -> Vec<(ChunkId, ChunkMeta)> {
        let lo = after.map_or(Bound::Unbounded, Bound::Excluded);
        let maps = self.maps.borrow();
        maps.entries_from(lo)
            .filter_map(|(c, e)| Some((c, e.meta?)))
            .take(limit)
            .collect()
    }

    /// Extent records (counts them: asked once per scrub pass).
    pub fn extent_count(&self) -> u64 {
        let maps = self.maps.borrow();
        maps.chunks.values().map(|e| e.extents.len() as u64).sum()
    }

    /// Chunks with a meta (counts them: asked at recovery, not per request).
    pub fn tomb_count(&self) -> u64 {
        self.maps.borrow().tombs.len() as u64
    }

    /// No key changed since the last flush.
    pub fn is_clean(&self) -> bool {
        self.maps.borrow().dirty.is_empty()
    }

    pub fn chunk_count(&self) -> u64 {
        let maps = self.maps.borrow();
        maps.chunks.values().filter(|e| e.meta.is_some()).count() as u64
    }

    /// The backing store holds nothing (asked at open, before `load`).
    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// Removes everything, in memory and in the store (before a rebuild from
    /// the data area).
    pub fn clear(&self) -> Result<(), ShardError> {
        self.store.clear()?;
        *self.maps.borrow_mut() = Maps::default();
        Ok(())
    }
}

enum Op {
    PutMeta(ChunkId, ChunkMeta),
    RemoveMeta(ChunkId),
    PutExtent(ChunkId, ExtentRec),
    RemoveExtent(ChunkId, LogicalSector),
    PutTomb(ChunkId, TombRec),
    RemoveTomb(ChunkId),
    PutCheckpoint(Checkpoint),
}

/// One index change under construction; applied to memory in one step.
#[derive(Default)]
pub struct Change {
    ops: Vec<Op>,
}

impl Change {
    pub fn new() -> Change {
        Change::default()
    }

    pub fn put_meta(&mut self, chunk: ChunkId, meta: ChunkMeta) {
        self.ops.push(Op::PutMeta(chunk, meta));
    }

    pub fn remove_meta(&mut self, chunk: ChunkId) {
        self.ops.push(Op::RemoveMeta(chunk));
    }

    pub fn put_extent(&mut self, chunk: ChunkId, rec: ExtentRec) {
        self.ops.push(Op::PutExtent(chunk, rec));
    }

    pub fn remove_extent(&mut self, chunk: ChunkId, logical: LogicalSector) {
        self.ops.push(Op::RemoveExtent(chunk, logical));
    }

    pub fn put_tomb(&mut self, chunk: ChunkId, t: TombRec) {
        self.ops.push(Op::PutTomb(chunk, t));
    }

    pub fn remove_tomb(&mut self, chunk: ChunkId) {
        self.ops.push(Op::RemoveTomb(chunk));
    }

    pub fn put_checkpoint(&mut self, c: Checkpoint) {
        self.ops.push(Op::PutCheckpoint(c));
    }

    /// Applies the change to the in-memory index, in order, and marks its
    /// keys for the next flush. No store access.
    pub fn apply(self, index: &Index) {
        let mut maps = index.maps.borrow_mut();
        for op in self.ops {
            let key = match op {
                Op::PutMeta(c, m) => {
                    maps.put_meta(c, m);
                    Key::Meta(c)
                }
                Op::RemoveMeta(c) => {
                    maps.update(c, |e| e.meta = None);
                    Key::Meta(c)
                }
                Op::PutExtent(c, r) => {
                    let l = r.logical;
                    maps.put_extent(c, r);
                    Key::Extent(c, l)
                }
                Op::RemoveExtent(c, l) => {
                    maps.update(c, |e| e.extents.remove(l.0));
                    Key::Extent(c, l)
                }
                Op::PutTomb(c, t) => {
                    maps.tombs.insert(c, t);
                    Key::Tomb(c)
                }
                Op::RemoveTomb(c) => {
                    maps.tombs.remove(&c);
                    Key::Tomb(c)
                }
                Op::PutCheckpoint(ck) => {
                    maps.checkpoint = Some(ck);
                    Key::Checkpoint
                }
            };
            maps.dirty.insert(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_test as run;

    fn ext(l: u64, n: u32) -> ExtentRec {
        ExtentRec {
            logical: LogicalSector(l),
            disk: DiskSector(100 + l),
            header: DiskSector(99),
            header_sectors: 1,
            generation: Generation(7),
            crcs: (0..n).collect(),
        }
    }

    fn meta(version: u64) -> ChunkMeta {
        ChunkMeta {
            len: 1,
            version,
            created_ns: 3,
            modified_ns: 4,
            live_sectors: 6,
            generation: 7,
        }
    }

    fn checkpoint(replay_from: u64) -> Checkpoint {
        Checkpoint {
            replay_from,
            high_water: 9,
            taken_ns: 1,
            scan: vec![Run {
                start: DiskSector(5),
                len: 6,
            }],
        }
    }

    /// Fills `index` with a known set of records.
    fn fill(index: &Index) {
        let c = ChunkId(5);
        let mut ch = Change::new();
        ch.put_extent(c, ext(0, 4));
        ch.put_extent(c, ext(10, 2));
        ch.put_extent(ChunkId(6), ext(0, 100));
        ch.put_meta(c, meta(2));
        ch.put_checkpoint(checkpoint(8));
        ch.put_tomb(
            ChunkId(8),
            TombRec {
                generation: Generation(3),
                disk: DiskSector(4),
                version: 5,
            },
        );
        ch.apply(index);
    }

    fn check_filled(index: &Index) {
        let c = ChunkId(5);
        assert_eq!(index.get_meta(c).unwrap().version, 2);
        assert_eq!(index.get_meta(ChunkId(6)), None);
        assert_eq!(index.overlapping(c, 2, 11)[..], [ext(0, 4), ext(10, 2)]);
        assert!(index.overlapping(c, 4, 10).is_empty());
        assert!(index.overlapping(c, 3, 3).is_empty());
        assert_eq!(index.overlapping(c, 11, 12)[..], [ext(10, 2)]);
        assert_eq!(index.chunk_extents(c).len(), 2);
        let mut all = Vec::new();
        index
            .for_each_extent(|chunk, r| -> Result<(), ()> {
                all.push((chunk, r.logical));
                Ok(())
            })
            .unwrap();
        let want = [(c, 0), (c, 10), (ChunkId(6), 0)].map(|(c, l)| (c, LogicalSector(l)));
        assert_eq!(all, want);
        assert_eq!(index.extent_after(None).unwrap().0, c);
        let after = index.extent_after(Some(want[1])).unwrap();
        assert_eq!((after.0, after.1.logical), want[2]);
        assert!(index.extent_after(Some(want[2])).is_none());
        assert_eq!(index.metas_after(None, 10), vec![(c, meta(2))]);
        assert!(index.metas_after(Some(c), 10).is_empty());
        assert_eq!(index.chunk_count(), 1);
        assert_eq!(index.tombs().len(), 1);
        assert_eq!(index.get_tomb(ChunkId(8)).unwrap().version, 5);
    }

    #[test]
    fn records_round_trip_and_overlap_query() {
        assert_eq!(ext(0, 4).slice(1, 3).crcs.as_slice(), [1, 2]);
        assert_eq!(ext(0, 4).slice(1, 3).disk, DiskSector(101));
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            // sled releases its file lock from its flusher thread a moment
            // after the last handle drops: a reopen right after may have to
            // wait for it.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let db = loop {
                match sled::Config::new().path(dir.path().join("i")).open() {
                    Ok(db) => break db,
                    Err(e) if std::time::Instant::now() < deadline => {
                        assert!(e.to_string().contains("could not acquire lock"), "{e}");
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => panic!("reopening the index: {e}"),
                }
            };
            Index::new(db)
        };
        run(async {
            let index = open();
            assert_eq!(index.load().unwrap(), None);
            fill(&index);
            check_filled(&index);
            assert_eq!(index.flush().await.unwrap(), 6);
            assert_eq!(index.dirty_keys(), 0);
        });
        // Reopened from sled alone.
        run(async {
            let index = open();
            assert_eq!(index.load().unwrap(), Some(checkpoint(8)));
            check_filled(&index);
        });
    }

    /// Changes stay in memory until `flush`, which writes their current
    /// values (removals included) in one batch; a crash keeps the last flush.
    #[test]
    fn changes_reach_the_store_only_at_flush() {
        let kv = MemKv::default();
        let index = Index::new_mem(kv.clone());
        assert_eq!(index.load().unwrap(), None);
        fill(&index);
        assert!(kv.is_empty(), "apply wrote to the store");
        run(async { index.flush().await.unwrap() });
        let flushed = kv.range(Bound::Unbounded, Bound::Unbounded);
        assert_eq!(flushed.len(), 6);

        // Overwritten twice and removed: one key each in the next batch.
        let c = ChunkId(5);
        let mut ch = Change::new();
        ch.put_meta(c, meta(3));
        ch.put_meta(c, meta(4));
        ch.remove_extent(c, LogicalSector(10));
        ch.put_extent(ChunkId(9), ext(0, 1));
        ch.apply(&index);
        assert_eq!(index.dirty_keys(), 3);
        assert_eq!(kv.range(Bound::Unbounded, Bound::Unbounded), flushed);
        kv.crash(u64::MAX);
        assert_eq!(kv.range(Bound::Unbounded, Bound::Unbounded), flushed);

        run(async { index.flush().await.unwrap() });
        let reloaded = Index::new_mem(kv.clone());
        reloaded.load().unwrap();
        assert_eq!(reloaded.get_meta(c).unwrap().version, 4);
        assert_eq!(reloaded.chunk_extents(c), vec![ext(0, 4)]);
        assert_eq!(reloaded.chunk_extents(ChunkId(9)), vec![ext(0, 1)]);
    }

    /// `overlapping` at its edges: a record starting before the range, holes
    /// on either side, an empty range, a chunk of one record, one of many
    /// (past the vector limit, so the B-tree form is taken too).
    #[test]
    fn overlapping_edges() {
        let index = Index::new_mem(MemKv::default());
        let (one, holes, many) = (ChunkId(1), ChunkId(2), ChunkId(3));
        let mut ch = Change::new();
        ch.put_extent(one, ext(0, 1));
        // Records [2, 6) and [10, 12); holes [0, 2), [6, 10), [12, ..).
        ch.put_extent(holes, ext(10, 2));
        ch.put_extent(holes, ext(2, 4));
        for l in (0..2 * EXTENTS_INLINE_MAX as u64).rev() {
            ch.put_extent(many, ext(3 * l, 2));
        }
        ch.apply(&index);
        let logicals = |chunk, first, end| -> Vec<u64> {
            let recs = index.overlapping(chunk, first, end);
            recs.iter().map(|r| r.logical.0).collect()
        };
        assert_eq!(logicals(one, 0, 1), [0]);
        assert_eq!(logicals(one, 0, 100), [0]);
        assert!(logicals(one, 1, 2).is_empty());
        assert!(logicals(ChunkId(9), 0, 1).is_empty());
        for chunk in [holes, many] {
            assert!(logicals(chunk, 5, 5).is_empty());
            assert!(logicals(chunk, 6, 5).is_empty());
        }
        assert!(logicals(holes, 0, 2).is_empty());
        assert_eq!(logicals(holes, 0, 3), [2]);
        assert_eq!(logicals(holes, 5, 6), [2], "starts before the range");
        assert!(logicals(holes, 6, 10).is_empty());
        assert_eq!(logicals(holes, 5, 11), [2, 10]);
        assert_eq!(logicals(holes, 11, 1000), [10]);
        assert!(logicals(holes, 12, 1000).is_empty());
        // Records [3l, 3l + 2): sector 3l + 2 is a hole.
        assert_eq!(logicals(many, 1, 2), [0]);
        assert!(logicals(many, 2, 3).is_empty());
        assert_eq!(logicals(many, 4, 10), [3, 6, 9]);
        assert_eq!(logicals(many, 2, 6), [3]);
        assert_eq!(logicals(many, 190, 1000), [189]);
        // Back below the limit: the vector form again, same answers.
        let mut ch = Change::new();
        for l in 2..2 * EXTENTS_INLINE_MAX as u64 {
            ch.remove_extent(many, LogicalSector(3 * l));
        }
        ch.apply(&index);
        assert_eq!(logicals(many, 0, 1000), [0, 3]);
        assert_eq!(logicals(many, 4, 10), [3]);
    }

    /// The ordered walks (LIST, the scrubber's, `for_each_extent`) see every
    /// chunk in id order and its records in logical order, whatever order
    /// they were inserted in, and a chunk whose last record goes is gone.
    #[test]
    fn walks_in_key_order_after_random_inserts() {
        let index = Index::new_mem(MemKv::default());
        // A fixed permutation of 0..n (7919 is prime to n), over the high
        // and low halves of the id so the order is by the whole u128.
        let n = 1000u64;
        let ids: Vec<ChunkId> = (0..n)
            .map(|i| (i * 7919) % n)
            .map(|i| ChunkId((u128::from(i % 10) << 64) | u128::from(i / 10)))
            .collect();
        for (i, &c) in ids.iter().enumerate() {
            let mut ch = Change::new();
            let records = 1 + i as u64 % 3;
            for l in (0..records).rev() {
                ch.put_extent(c, ext(10 * l, 2));
            }
            // Every seventh chunk has no meta (a walk sees its extents).
            if i % 7 != 0 {
                ch.put_meta(c, meta(i as u64));
            }
            ch.apply(&index);
        }
        let mut sorted = ids.clone();
        sorted.sort();

        let mut walked = Vec::new();
        let mut after = None;
        while let Some((c, rec)) = index.extent_after(after) {
            walked.push((c, rec.logical));
            after = Some((c, rec.logical));
        }
        let mut each = Vec::new();
        index
            .for_each_extent(|c, r| -> Result<(), ()> {
                each.push((c, r.logical));
                Ok(())
            })
            .unwrap();
        assert_eq!(walked, each);
        let mut want = walked.clone();
        want.sort();
        assert_eq!(walked, want);
        let mut chunks: Vec<ChunkId> = walked.iter().map(|&(c, _)| c).collect();
        chunks.dedup();
        assert_eq!(chunks, sorted);

        let mut listed = Vec::new();
        let mut after = None;
        loop {
            let page = index.metas_after(after, 64);
            let Some(&(last, _)) = page.last() else { break };
            listed.extend(page.iter().map(|&(c, _)| c));
            after = Some(last);
        }
        let with_meta: Vec<ChunkId> = sorted
            .iter()
            .copied()
            .filter(|c| index.get_meta(*c).is_some())
            .collect();
        assert_eq!(listed, with_meta);
        assert_eq!(index.chunk_count(), with_meta.len() as u64);

        // Emptied chunks leave the walks.
        let mut ch = Change::new();
        for &(c, l) in &walked {
            if c < sorted[500] {
                ch.remove_extent(c, l);
                ch.remove_meta(c);
            }
        }
        ch.apply(&index);
        assert_eq!(index.extent_after(None).unwrap().0, sorted[500]);
        assert_eq!(
            index.metas_after(None, 1)[0].0,
            with_meta[with_meta.len() - listed.iter().filter(|&&c| c >= sorted[500]).count()]
        );
        assert_eq!(index.maps.borrow().order.len(), 500);
        assert_eq!(index.maps.borrow().chunks.len(), 500);
    }

    #[test]
    fn unknown_or_damaged_records_fail_the_load() {
        let kv = MemKv::default();
        kv.apply(vec![(b"x".to_vec(), Some(vec![1]))]);
        let index = Index::new_mem(kv.clone());
        assert!(matches!(index.load(), Err(ShardError::IndexCorrupt(_))));
        assert_eq!(index.chunk_count(), 0);
        index.clear().unwrap();
        kv.apply(vec![(Key::Meta(ChunkId(1)).encode(), Some(vec![0; 3]))]);
        assert!(matches!(index.load(), Err(ShardError::IndexCorrupt(_))));
    }
}
