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
//! The index is a cache of the data area in the long run (invariant 5); for now
//! it is the source of truth for which extent is current.

use std::ops::Bound;

use shardstore_proto::ChunkId;

use crate::error::ShardError;
use crate::layout::{le_u32, le_u64, DiskSector, Generation, LogicalSector};

const META_PREFIX: u8 = b'm';
const EXTENT_PREFIX: u8 = b'e';
const META_VALUE_LEN: usize = 40;
const EXTENT_VALUE_FIXED: usize = 32;

/// Per-chunk metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkMeta {
    pub len: u64,
    pub version: u64,
    pub created_ns: u64,
    pub modified_ns: u64,
    /// Live data sectors referenced by the chunk's extent records.
    pub live_sectors: u64,
}

impl ChunkMeta {
    fn encode(&self) -> [u8; META_VALUE_LEN] {
        let mut v = [0u8; META_VALUE_LEN];
        v[0..8].copy_from_slice(&self.len.to_le_bytes());
        v[8..16].copy_from_slice(&self.version.to_le_bytes());
        v[16..24].copy_from_slice(&self.created_ns.to_le_bytes());
        v[24..32].copy_from_slice(&self.modified_ns.to_le_bytes());
        v[32..40].copy_from_slice(&self.live_sectors.to_le_bytes());
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

/// Typed access to the sled tree.
pub struct Index {
    db: sled::Db,
}

impl Index {
    pub fn new(db: sled::Db) -> Index {
        Index { db }
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    pub fn get_meta(&self, chunk: ChunkId) -> Result<Option<ChunkMeta>, ShardError> {
        match self.db.get(meta_key(chunk))? {
            Some(v) => Ok(Some(ChunkMeta::decode(chunk, &v)?)),
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
        let lo = extent_key(chunk, LogicalSector(first));
        // The record starting at or before `first` may reach into the range.
        if let Some(item) = self
            .db
            .range(extent_key(chunk, LogicalSector(0))..=lo)
            .next_back()
        {
            let (k, v) = item?;
            let (_, rec) = ExtentRec::decode(&k, &v)?;
            if rec.end() > first {
                out.push(rec);
            }
        }
        let hi = extent_key(chunk, LogicalSector(end));
        for item in self.db.range((Bound::Excluded(lo), Bound::Excluded(hi))) {
            let (k, v) = item?;
            let (_, rec) = ExtentRec::decode(&k, &v)?;
            out.push(rec);
        }
        Ok(out)
    }

    /// All extent records of `chunk`.
    pub fn chunk_extents(&self, chunk: ChunkId) -> Result<Vec<ExtentRec>, ShardError> {
        self.db
            .scan_prefix(extent_prefix(chunk))
            .map(|item| {
                let (k, v) = item?;
                Ok(ExtentRec::decode(&k, &v)?.1)
            })
            .collect()
    }

    /// Every extent record of the shard (for the rebuild at open).
    pub fn all_extents(
        &self,
    ) -> impl Iterator<Item = Result<(ChunkId, ExtentRec), ShardError>> + '_ {
        self.db.scan_prefix([EXTENT_PREFIX]).map(|item| {
            let (k, v) = item?;
            ExtentRec::decode(&k, &v)
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
        self.db.range::<Vec<u8>, _>((start, end)).map(|item| {
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
        self.db.is_empty()
    }
}

/// One atomic index change under construction.
pub struct Change {
    batch: sled::Batch,
}

impl Change {
    pub fn new() -> Change {
        Change {
            batch: sled::Batch::default(),
        }
    }

    pub fn put_meta(&mut self, chunk: ChunkId, meta: &ChunkMeta) {
        self.batch.insert(&meta_key(chunk)[..], &meta.encode()[..]);
    }

    pub fn remove_meta(&mut self, chunk: ChunkId) {
        self.batch.remove(&meta_key(chunk)[..]);
    }

    pub fn put_extent(&mut self, chunk: ChunkId, rec: &ExtentRec) {
        self.batch
            .insert(&extent_key(chunk, rec.logical)[..], rec.encode());
    }

    pub fn remove_extent(&mut self, chunk: ChunkId, logical: LogicalSector) {
        self.batch.remove(&extent_key(chunk, logical)[..]);
    }

    pub fn apply(self, index: &Index) -> Result<(), ShardError> {
        index.db.apply_batch(self.batch)?;
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
    }
}
