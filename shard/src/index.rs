//! The shard's sled index: where each chunk's bytes are.
//!
//! Keys (one sled tree, so a write's whole change is one atomic `Batch`):
//! - `'m' ++ chunk_be16` -> [`ChunkMeta`] (length, version, times, live sectors);
//! - `'e' ++ chunk_be16 ++ logical_start_sector_be8` -> [`ExtentRec`]: a run of
//!   logical sectors stored contiguously on disk, with its generation, the
//!   position of the physical extent's header and every sector's crc.
//!
//! Big-endian keys sort by chunk and then by sector, so a chunk's extents are
//! one contiguous key range in logical order. Records of one chunk never
//! overlap: an overwrite splits the records it covers at sector granularity
//! (the kept crcs stay valid because a sector's crc identity is its *logical*
//! index and the generation of the write that produced it).
//!
//! - `'t' ++ chunk_be16` -> [`TombRec`]: the chunk's latest durable delete
//!   (its tombstone extent on disk is live space while this record exists);
//! - `'c'` -> [`Checkpoint`]: the recovery checkpoint (see `recover`).
//!
//! The index is a cache of the data area (invariant 5): it is updated after a
//! write is durable, without waiting for sled to flush, and recovery replays
//! whatever it lacks from the data area written since the last checkpoint.
//!
//! The store is sled, or in tests [`MemKv`] (sled's crash semantics, for the
//! simulated disk). Every change is one atomic batch.

use std::ops::Bound;

use shardstore_proto::ChunkId;

use crate::alloc::Run;
use crate::error::ShardError;
use crate::layout::{le_u32, le_u64, DiskSector, Generation, LogicalSector};
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
    pub crcs: Vec<u32>,
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
            crcs: self.crcs[skip as usize..(to - self.logical.0) as usize].to_vec(),
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

pub fn meta_key(chunk: ChunkId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = META_PREFIX;
    k[1..].copy_from_slice(&chunk.to_be_bytes());
    k
}

fn extent_prefix(chunk: ChunkId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = EXTENT_PREFIX;
    k[1..].copy_from_slice(&chunk.to_be_bytes());
    k
}

pub fn extent_key(chunk: ChunkId, logical: LogicalSector) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[..17].copy_from_slice(&extent_prefix(chunk));
    k[17..].copy_from_slice(&logical.0.to_be_bytes());
    k
}

fn tomb_key(chunk: ChunkId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = TOMB_PREFIX;
    k[1..].copy_from_slice(&chunk.to_be_bytes());
    k
}

type KvPair = (Vec<u8>, Vec<u8>);
type KvItem = Result<KvPair, ShardError>;

/// The ordered key-value store under the index.
pub enum Kv {
    Sled(sled::Db),
    Mem(MemKv),
}

impl Kv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ShardError> {
        match self {
            Kv::Sled(db) => Ok(db.get(key)?.map(|v| v.to_vec())),
            Kv::Mem(m) => Ok(m.get(key)),
        }
    }

    fn range(
        &self,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
    ) -> Box<dyn Iterator<Item = KvItem> + '_> {
        match self {
            Kv::Sled(db) => Box::new(db.range::<Vec<u8>, _>((lo, hi)).map(|r| {
                let (k, v) = r?;
                Ok((k.to_vec(), v.to_vec()))
            })),
            Kv::Mem(m) => Box::new(m.range(lo, hi).into_iter().map(Ok)),
        }
    }

    fn last_in(
        &self,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
    ) -> Result<Option<KvPair>, ShardError> {
        match self {
            Kv::Sled(db) => match db.range::<Vec<u8>, _>((lo, hi)).next_back() {
                Some(r) => {
                    let (k, v) = r?;
                    Ok(Some((k.to_vec(), v.to_vec())))
                }
                None => Ok(None),
            },
            Kv::Mem(m) => Ok(m.range(lo, hi).pop()),
        }
    }

    fn prefix(&self, p: &[u8]) -> Box<dyn Iterator<Item = KvItem> + '_> {
        let mut hi = p.to_vec();
        // Prefixes used here never end in 0xff.
        *hi.last_mut().expect("non-empty prefix") += 1;
        self.range(Bound::Included(p.to_vec()), Bound::Excluded(hi))
    }
}

/// Typed access to the index store.
pub struct Index {
    kv: Kv,
}

impl Index {
    pub fn new(db: sled::Db) -> Index {
        Index { kv: Kv::Sled(db) }
    }

    pub fn new_mem(kv: MemKv) -> Index {
        Index { kv: Kv::Mem(kv) }
    }

    /// Makes every applied change durable (sled `flush_async`, which runs on
    /// sled's own threads: the executor is not blocked).
    pub async fn flush(&self) -> Result<(), ShardError> {
        match &self.kv {
            Kv::Sled(db) => {
                db.flush_async().await?;
            }
            Kv::Mem(m) => {
                futures_lite::future::yield_now().await;
                m.flush();
            }
        }
        Ok(())
    }

    pub fn get_meta(&self, chunk: ChunkId) -> Result<Option<ChunkMeta>, ShardError> {
        match self.kv.get(&meta_key(chunk))? {
            Some(v) => Ok(Some(ChunkMeta::decode(chunk, &v)?)),
            None => Ok(None),
        }
    }

    pub fn get_tomb(&self, chunk: ChunkId) -> Result<Option<TombRec>, ShardError> {
        match self.kv.get(&tomb_key(chunk))? {
            Some(v) => Ok(Some(TombRec::decode(&v)?)),
            None => Ok(None),
        }
    }

    pub fn checkpoint(&self) -> Result<Option<Checkpoint>, ShardError> {
        match self.kv.get(CHECKPOINT_KEY)? {
            Some(v) => Ok(Some(Checkpoint::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Extent records of `chunk` overlapping logical sectors `[first, end)`,
    /// in logical order.
    pub fn overlapping(
        &self,
        chunk: ChunkId,
        first: u64,
        end: u64,
    ) -> Result<Vec<ExtentRec>, ShardError> {
        let mut out = Vec::new();
        let lo = extent_key(chunk, LogicalSector(first)).to_vec();
        // The record starting at or before `first` may reach into the range.
        if let Some((k, v)) = self.kv.last_in(
            Bound::Included(extent_key(chunk, LogicalSector(0)).to_vec()),
            Bound::Included(lo.clone()),
        )? {
            let (_, rec) = ExtentRec::decode(&k, &v)?;
            if rec.end() > first {
                out.push(rec);
            }
        }
        let hi = extent_key(chunk, LogicalSector(end)).to_vec();
        for item in self.kv.range(Bound::Excluded(lo), Bound::Excluded(hi)) {
            let (k, v) = item?;
            let (_, rec) = ExtentRec::decode(&k, &v)?;
            out.push(rec);
        }
        Ok(out)
    }

    /// All extent records of `chunk`.
    pub fn chunk_extents(&self, chunk: ChunkId) -> Result<Vec<ExtentRec>, ShardError> {
        self.kv
            .prefix(&extent_prefix(chunk))
            .map(|item| {
                let (k, v) = item?;
                Ok(ExtentRec::decode(&k, &v)?.1)
            })
            .collect()
    }

    /// Every extent record of the shard.
    pub fn all_extents(
        &self,
    ) -> impl Iterator<Item = Result<(ChunkId, ExtentRec), ShardError>> + '_ {
        self.kv.prefix(&[EXTENT_PREFIX]).map(|item| {
            let (k, v) = item?;
            ExtentRec::decode(&k, &v)
        })
    }

    /// Extent records after `(chunk, logical)` in key order (for the scrubber).
    pub fn extents_after(
        &self,
        after: Option<(ChunkId, LogicalSector)>,
    ) -> impl Iterator<Item = Result<(ChunkId, ExtentRec), ShardError>> + '_ {
        let lo = match after {
            Some((c, l)) => Bound::Excluded(extent_key(c, l).to_vec()),
            None => Bound::Included(vec![EXTENT_PREFIX]),
        };
        self.kv
            .range(lo, Bound::Excluded(vec![EXTENT_PREFIX + 1]))
            .map(|item| {
                let (k, v) = item?;
                ExtentRec::decode(&k, &v)
            })
    }

    /// Every tombstone record of the shard.
    pub fn all_tombs(&self) -> impl Iterator<Item = Result<(ChunkId, TombRec), ShardError>> + '_ {
        self.kv.prefix(&[TOMB_PREFIX]).map(|item| {
            let (k, v) = item?;
            if k.len() != 17 {
                return Err(ShardError::IndexCorrupt(format!(
                    "bad tombstone key {k:02x?}"
                )));
            }
            let mut id = [0u8; 16];
            id.copy_from_slice(&k[1..]);
            Ok((ChunkId::from_be_bytes(id), TombRec::decode(&v)?))
        })
    }

    /// Chunks in id order, strictly after `after`.
    pub fn metas_after(
        &self,
        after: Option<ChunkId>,
    ) -> impl Iterator<Item = Result<(ChunkId, ChunkMeta), ShardError>> + '_ {
        let start = match after {
            Some(c) => Bound::Excluded(meta_key(c).to_vec()),
            None => Bound::Included(vec![META_PREFIX]),
        };
        let end = Bound::Excluded(vec![META_PREFIX + 1]);
        self.kv.range(start, end).map(|item| {
            let (k, v) = item?;
            if k.len() != 17 {
                return Err(ShardError::IndexCorrupt(format!("bad meta key {k:02x?}")));
            }
            let mut id = [0u8; 16];
            id.copy_from_slice(&k[1..]);
            let chunk = ChunkId::from_be_bytes(id);
            Ok((chunk, ChunkMeta::decode(chunk, &v)?))
        })
    }

    pub fn is_empty(&self) -> bool {
        match &self.kv {
            Kv::Sled(db) => db.is_empty(),
            Kv::Mem(m) => m.is_empty(),
        }
    }

    /// Removes everything (before a rebuild from the data area).
    pub fn clear(&self) -> Result<(), ShardError> {
        match &self.kv {
            Kv::Sled(db) => db.clear()?,
            Kv::Mem(m) => m.clear(),
        }
        Ok(())
    }
}

/// One atomic index change under construction.
#[derive(Default)]
pub struct Change {
    ops: KvBatch,
}

impl Change {
    pub fn new() -> Change {
        Change::default()
    }

    pub fn put_meta(&mut self, chunk: ChunkId, meta: &ChunkMeta) {
        self.ops
            .push((meta_key(chunk).to_vec(), Some(meta.encode().to_vec())));
    }

    pub fn remove_meta(&mut self, chunk: ChunkId) {
        self.ops.push((meta_key(chunk).to_vec(), None));
    }

    pub fn put_extent(&mut self, chunk: ChunkId, rec: &ExtentRec) {
        self.ops
            .push((extent_key(chunk, rec.logical).to_vec(), Some(rec.encode())));
    }

    pub fn remove_extent(&mut self, chunk: ChunkId, logical: LogicalSector) {
        self.ops.push((extent_key(chunk, logical).to_vec(), None));
    }

    pub fn put_tomb(&mut self, chunk: ChunkId, t: &TombRec) {
        self.ops
            .push((tomb_key(chunk).to_vec(), Some(t.encode().to_vec())));
    }

    pub fn put_checkpoint(&mut self, c: &Checkpoint) {
        self.ops.push((CHECKPOINT_KEY.to_vec(), Some(c.encode())));
    }

    pub fn apply(self, index: &Index) -> Result<(), ShardError> {
        match &index.kv {
            Kv::Sled(db) => {
                let mut b = sled::Batch::default();
                for (k, v) in self.ops {
                    match v {
                        Some(v) => b.insert(k, v),
                        None => b.remove(k),
                    }
                }
                db.apply_batch(b)?;
            }
            Kv::Mem(m) => m.apply(self.ops),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_overlap_query() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("i"))
            .open()
            .unwrap();
        let index = Index::new(db);
        let c = ChunkId(5);
        let mk = |l: u64, n: u32| ExtentRec {
            logical: LogicalSector(l),
            disk: DiskSector(100 + l),
            header: DiskSector(99),
            header_sectors: 1,
            generation: Generation(7),
            crcs: (0..n).collect(),
        };
        let mut ch = Change::new();
        ch.put_extent(c, &mk(0, 4));
        ch.put_extent(c, &mk(10, 2));
        ch.put_extent(ChunkId(6), &mk(0, 100));
        ch.put_meta(
            c,
            &ChunkMeta {
                len: 1,
                version: 2,
                created_ns: 3,
                modified_ns: 4,
                live_sectors: 6,
                generation: 7,
            },
        );
        ch.apply(&index).unwrap();
        assert_eq!(index.get_meta(c).unwrap().unwrap().version, 2);
        assert_eq!(index.get_meta(ChunkId(6)).unwrap(), None);
        let o = index.overlapping(c, 2, 11).unwrap();
        assert_eq!(o, vec![mk(0, 4), mk(10, 2)]);
        assert!(index.overlapping(c, 4, 10).unwrap().is_empty());
        assert_eq!(index.overlapping(c, 11, 12).unwrap(), vec![mk(10, 2)]);
        assert_eq!(index.chunk_extents(c).unwrap().len(), 2);
        assert_eq!(index.all_extents().count(), 3);
        assert_eq!(mk(0, 4).slice(1, 3).crcs, vec![1, 2]);
        assert_eq!(mk(0, 4).slice(1, 3).disk, DiskSector(101));
        let metas: Vec<_> = index.metas_after(None).collect::<Result<_, _>>().unwrap();
        assert_eq!(metas.len(), 1);
        assert_eq!(index.metas_after(Some(c)).count(), 0);
        let ck = Checkpoint {
            replay_from: 8,
            high_water: 9,
            taken_ns: 1,
            scan: vec![Run {
                start: DiskSector(5),
                len: 6,
            }],
        };
        let mut ch = Change::new();
        ch.put_checkpoint(&ck);
        ch.put_tomb(
            ChunkId(8),
            &TombRec {
                generation: Generation(3),
                disk: DiskSector(4),
                version: 5,
            },
        );
        ch.apply(&index).unwrap();
        assert_eq!(index.checkpoint().unwrap(), Some(ck));
        assert_eq!(index.all_tombs().count(), 1);
        assert_eq!(index.get_tomb(ChunkId(8)).unwrap().unwrap().version, 5);
        // Tombstones and the checkpoint do not show up as chunks or extents.
        assert_eq!(index.all_extents().count(), 3);
        assert_eq!(index.metas_after(None).count(), 1);
    }
}
