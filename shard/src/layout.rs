//! On-disk format of a shard's data file. Everything is little-endian and
//! encoded explicitly (never by transmuting memory).
//!
//! ```text
//! sector 0            superblock copy A
//! sector 1            superblock copy B (identical; either valid copy is enough)
//! sector 2 ..         data area of `capacity_sectors` sectors, holding extents
//! ```
//!
//! An extent is what one write puts on disk, with ONE device write:
//! `header_sectors` header sectors followed by `sector_count` data sectors.
//! The header is self-describing (invariant 5): chunk id, first logical sector,
//! sector count, generation, chunk length after the write, timestamp and the
//! crc32c of every data sector, plus a crc of the header itself. A header that
//! does not fit one sector continues in the next ones (multi-sector header:
//! `header_sectors = ceil((EXTENT_HEADER_FIXED + 4 * sector_count) / SECTOR)`),
//! so one header describes up to `MAX_EXTENT_SECTORS` data sectors.
//!
//! A delete is a one-sector *tombstone* extent (kind 2, no data sectors):
//! every extent of its chunk with a lower generation is dead.
//!
//! Each data sector's crc covers its identity as well as its bytes:
//! `crc32c_append(crc32c(chunk_le16 ++ logical_sector_le8 ++ generation_le8), data)`,
//! so a stale sector (older generation) or a misdirected one (other chunk or
//! offset) fails the check just like a bit flip.

use shardstore_proto::{limits, ChunkId, ShardId};
use smallvec::SmallVec;

/// Bytes per sector: the unit of checksumming, allocation and device I/O.
pub const SECTOR: u64 = limits::SECTOR_SIZE as u64;
/// Sectors before the data area (two superblock copies).
pub const DATA_START_SECTOR: u64 = 2;
/// Most data sectors of one extent: a payload of MAX_PAYLOAD that is not
/// sector-aligned touches one more sector than MAX_PAYLOAD / SECTOR.
pub const MAX_EXTENT_SECTORS: u64 = limits::MAX_PAYLOAD as u64 / SECTOR + 1;

const _: () = assert!(SECTOR.is_power_of_two());
const _: () = assert!(SECTOR >= SUPERBLOCK_SIZE as u64);
const _: () = assert!(SECTOR > EXTENT_HEADER_FIXED as u64);
const _: () = assert!(limits::MAX_CHUNK_SIZE % SECTOR == 0);

/// A sector index in the data file (absolute: sector 0 is the superblock).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DiskSector(pub u64);

impl DiskSector {
    pub fn byte_offset(self) -> u64 {
        self.0 * SECTOR
    }
}

/// A sector index inside a chunk (byte offset in the chunk / SECTOR).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogicalSector(pub u64);

/// Per-shard monotonically increasing write number; part of every sector's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(pub u64);

/// crc32c of one data sector, bound to its identity.
pub fn sector_crc(
    chunk: ChunkId,
    sector: LogicalSector,
    generation: Generation,
    data: &[u8],
) -> u32 {
    crc32c::crc32c_append(identity_crc(chunk, sector, generation), data)
}

/// crc32c of the 32-byte identity a sector's crc is seeded with.
fn identity_crc(chunk: ChunkId, sector: LogicalSector, generation: Generation) -> u32 {
    let mut identity = [0u8; 32];
    identity[..16].copy_from_slice(&chunk.0.to_le_bytes());
    identity[16..24].copy_from_slice(&sector.0.to_le_bytes());
    identity[24..32].copy_from_slice(&generation.0.to_le_bytes());
    crc32c::crc32c(&identity)
}

/// [`sector_crc`] from the plain crc32c of the sector's bytes, without a
/// second pass over them: `crc(identity || data)` is
/// `crc_then_sector(crc(identity), crc(data))`.
pub fn sector_crc_from_plain(
    chunk: ChunkId,
    sector: LogicalSector,
    generation: Generation,
    plain: u32,
) -> u32 {
    crc_then_sector(identity_crc(chunk, sector, generation), plain)
}

/// crc32c of `A || B` from crc32c(A) and crc32c(B) when B is one sector
/// long: crc32c combination with the "append SECTOR zero bytes" operator
/// precomputed as four byte tables (`crc32c_combine` rebuilds it per call,
/// about a microsecond).
pub fn crc_then_sector(crc_a: u32, crc_b: u32) -> u32 {
    static TABLES: std::sync::OnceLock<[[u32; 256]; 4]> = std::sync::OnceLock::new();
    let t = TABLES.get_or_init(|| {
        // The operator is linear: tabulate it on each byte of the input.
        let basis: Vec<u32> = (0..32)
            .map(|i| crc32c::crc32c_combine(1 << i, 0, SECTOR as usize))
            .collect();
        let mut t = [[0u32; 256]; 4];
        for (k, table) in t.iter_mut().enumerate() {
            for (b, v) in table.iter_mut().enumerate() {
                *v = (0..8)
                    .filter(|i| b & (1 << i) != 0)
                    .fold(0, |acc, i| acc ^ basis[8 * k + i]);
            }
        }
        t
    });
    let x = crc_a;
    t[0][(x & 0xff) as usize]
        ^ t[1][((x >> 8) & 0xff) as usize]
        ^ t[2][((x >> 16) & 0xff) as usize]
        ^ t[3][(x >> 24) as usize]
        ^ crc_b
}

// ---------------------------------------------------------------------------
// Superblock

pub const SUPERBLOCK_MAGIC: u64 = u64::from_le_bytes(*b"SSSUPER1");
/// Version 2: tombstones, chunk version/creation time and intended disk
/// position in extent headers, node-seeded header crc.
pub const FORMAT_VERSION: u32 = 2;
pub const SUPERBLOCK_SIZE: usize = 128;

/// Field layout of the superblock; encoded explicitly by [`Superblock::encode`].
#[repr(C)]
struct SuperblockRepr {
    magic: u64,             // 0
    format_version: u32,    // 8
    sector_size: u32,       // 12
    node_id: [u8; 16],      // 16
    shard_id: u32,          // 32
    shard_count: u32,       // 36
    capacity_sectors: u64,  // 40
    data_start_sector: u64, // 48
    created_ns: u64,        // 56
    reserved: [u8; 60],     // 64, must be zero
    crc: u32,               // 124, crc32c of bytes 0..124
}
const _: () = assert!(std::mem::size_of::<SuperblockRepr>() == SUPERBLOCK_SIZE);

/// The identity and geometry of a shard's data file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub node_id: u128,
    pub shard: ShardId,
    pub shard_count: u32,
    pub capacity_sectors: u64,
    pub created_ns: u64,
}

impl Superblock {
    /// Encodes into one full sector (the rest of the sector is zero).
    pub fn encode(&self, out: &mut [u8]) {
        assert_eq!(out.len(), SECTOR as usize);
        out.fill(0);
        out[0..8].copy_from_slice(&SUPERBLOCK_MAGIC.to_le_bytes());
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&limits::SECTOR_SIZE.to_le_bytes());
        out[16..32].copy_from_slice(&self.node_id.to_le_bytes());
        out[32..36].copy_from_slice(&self.shard.0.to_le_bytes());
        out[36..40].copy_from_slice(&self.shard_count.to_le_bytes());
        out[40..48].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        out[48..56].copy_from_slice(&DATA_START_SECTOR.to_le_bytes());
        out[56..64].copy_from_slice(&self.created_ns.to_le_bytes());
        let crc = crc32c::crc32c(&out[0..124]);
        out[124..128].copy_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(Superblock::decode(out), Ok(*self));
    }

    /// Decodes one sector, or says why it is not a valid superblock.
    pub fn decode(sector: &[u8]) -> Result<Superblock, String> {
        if sector.len() != SECTOR as usize {
            return Err(format!("superblock sector has {} bytes", sector.len()));
        }
        let magic = le_u64(sector, 0);
        if magic != SUPERBLOCK_MAGIC {
            if sector.iter().all(|&b| b == 0) {
                return Err("superblock is all zeros (never formatted)".into());
            }
            return Err(format!(
                "bad magic {magic:#018x}: not a shardstore data file"
            ));
        }
        let stored_crc = le_u32(sector, 124);
        let crc = crc32c::crc32c(&sector[0..124]);
        if stored_crc != crc {
            return Err(format!(
                "superblock crc mismatch (stored {stored_crc:#010x}, computed {crc:#010x})"
            ));
        }
        let version = le_u32(sector, 8);
        if version != FORMAT_VERSION {
            return Err(format!(
                "unsupported format version {version} (this build reads {FORMAT_VERSION})"
            ));
        }
        let sector_size = le_u32(sector, 12);
        if sector_size != limits::SECTOR_SIZE {
            return Err(format!(
                "sector size {sector_size} differs from this build's {}",
                limits::SECTOR_SIZE
            ));
        }
        if le_u64(sector, 48) != DATA_START_SECTOR {
            return Err(format!(
                "unexpected data start sector {}",
                le_u64(sector, 48)
            ));
        }
        if !all_zero(&sector[64..124]) || !all_zero(&sector[128..]) {
            return Err("reserved superblock bytes are not zero".into());
        }
        Ok(Superblock {
            node_id: le_u128(sector, 16),
            shard: ShardId(le_u32(sector, 32)),
            shard_count: le_u32(sector, 36),
            capacity_sectors: le_u64(sector, 40),
            created_ns: le_u64(sector, 56),
        })
    }
}

// ---------------------------------------------------------------------------
// Extent header

pub const EXTENT_MAGIC: u64 = u64::from_le_bytes(*b"SSEXTNT1");
pub const EXTENT_HEADER_FIXED: usize = 128;

/// What an extent records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// `sector_count` data sectors of a chunk follow the header.
    Data = 1,
    /// A durable delete: every extent of the chunk with a lower generation is
    /// dead. Header only (one sector, no data sectors).
    Tombstone = 2,
}

/// Field layout of the fixed part of an extent header; the per-sector crcs
/// (`sector_count` x u32) follow it, then zero padding to a sector boundary.
#[repr(C)]
struct ExtentHeaderRepr {
    magic: u64,          // 0
    format_version: u16, // 8
    kind: u8,            // 10
    reserved0: u8,       // 11
    header_sectors: u32, // 12
    chunk: [u8; 16],     // 16
    first_sector: u64,   // 32
    sector_count: u32,   // 40
    reserved1: u32,      // 44
    generation: u64,     // 48
    chunk_len: u64,      // 56
    timestamp_ns: u64,   // 64
    version: u64,        // 72: chunk version after this write (or at delete)
    created_ns: u64,     // 80: chunk creation time
    disk_sector: u64,    // 88: where this header was meant to land
    durable_below: u64,  // 96: every lower generation was durable (or failed) when this was written
    reserved2: [u8; 16], // 104
    header_crc: u32, // 120: crc32c seeded with the node id, over the whole header with this field zero
    reserved3: u32,  // 124
}
const _: () = assert!(std::mem::size_of::<ExtentHeaderRepr>() == EXTENT_HEADER_FIXED);
const _: () = assert!(
    MAX_EXTENT_SECTORS * 4 + EXTENT_HEADER_FIXED as u64 <= 4 * SECTOR,
    "a maximal extent's header fits in 4 sectors"
);

/// Header sectors needed to describe `sector_count` data sectors.
pub const fn header_sectors_for(sector_count: u64) -> u64 {
    let s = (EXTENT_HEADER_FIXED as u64 + 4 * sector_count).div_ceil(SECTOR);
    if s == 0 {
        1
    } else {
        s
    }
}

/// The sector crcs of a run: a run of up to four sectors (16 KiB, the common
/// small write) keeps them inline, in the header's or record's own bytes, so
/// reading one takes no second memory line and copying it no allocation
/// (same size as a `Vec`).
pub type Crcs = SmallVec<[u32; 4]>;

/// The self-describing header of one extent (data or tombstone).
///
/// Its crc is seeded with the node id and covers the intended disk position,
/// so a header that landed at the wrong place is never taken for a real one,
/// nor is a header-looking sector written by a client (payload bytes) unless
/// it guessed the 32-bit seed: the node id is never sent to clients (see
/// README, Security). Decoding also refuses generations past
/// [`MAX_GENERATION`] and sizes past the largest chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentHeader {
    pub kind: ExtentKind,
    pub chunk: ChunkId,
    pub first_sector: LogicalSector,
    pub generation: Generation,
    pub chunk_len: u64,
    pub timestamp_ns: u64,
    pub version: u64,
    pub created_ns: u64,
    pub disk_sector: DiskSector,
    /// When this extent was written, every write with a lower generation had
    /// been made durable (acknowledged) or had failed. Recovery uses it to
    /// tell a torn write (in flight at the crash: discard) from an
    /// acknowledged extent damaged later (keep: reads report CORRUPT).
    pub durable_below: u64,
    /// crc of each data sector, see [`sector_crc`]. Empty for a tombstone.
    pub crcs: Crcs,
}

/// Generations are counted from 1 and never reach this (2^62: a billion
/// writes a second for 146 years); a header claiming one is not ours.
pub const MAX_GENERATION: u64 = 1 << 62;

fn header_crc(node_id: u128, header: &[u8]) -> u32 {
    let seed = crc32c::crc32c(&node_id.to_le_bytes());
    let c = crc32c::crc32c_append(seed, &header[..120]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &header[124..])
}

impl ExtentHeader {
    pub fn header_sectors(&self) -> u64 {
        header_sectors_for(self.crcs.len() as u64)
    }

    /// Header plus data sectors.
    pub fn total_sectors(&self) -> u64 {
        self.header_sectors() + self.crcs.len() as u64
    }

    /// Encodes into `out`, which must be exactly `header_sectors() * SECTOR` bytes.
    pub fn encode(&self, node_id: u128, out: &mut [u8]) {
        let hs = self.header_sectors();
        assert_eq!(out.len() as u64, hs * SECTOR);
        match self.kind {
            ExtentKind::Data => {
                assert!(!self.crcs.is_empty() && self.crcs.len() as u64 <= MAX_EXTENT_SECTORS)
            }
            ExtentKind::Tombstone => assert!(self.crcs.is_empty()),
        }
        out.fill(0);
        out[0..8].copy_from_slice(&EXTENT_MAGIC.to_le_bytes());
        out[8..10].copy_from_slice(&(FORMAT_VERSION as u16).to_le_bytes());
        out[10] = self.kind as u8;
        out[12..16].copy_from_slice(&(hs as u32).to_le_bytes());
        out[16..32].copy_from_slice(&self.chunk.0.to_le_bytes());
        out[32..40].copy_from_slice(&self.first_sector.0.to_le_bytes());
        out[40..44].copy_from_slice(&(self.crcs.len() as u32).to_le_bytes());
        out[48..56].copy_from_slice(&self.generation.0.to_le_bytes());
        out[56..64].copy_from_slice(&self.chunk_len.to_le_bytes());
        out[64..72].copy_from_slice(&self.timestamp_ns.to_le_bytes());
        out[72..80].copy_from_slice(&self.version.to_le_bytes());
        out[80..88].copy_from_slice(&self.created_ns.to_le_bytes());
        out[88..96].copy_from_slice(&self.disk_sector.0.to_le_bytes());
        out[96..104].copy_from_slice(&self.durable_below.to_le_bytes());
        for (i, crc) in self.crcs.iter().enumerate() {
            let at = EXTENT_HEADER_FIXED + 4 * i;
            out[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        }
        let crc = header_crc(node_id, out);
        out[120..124].copy_from_slice(&crc.to_le_bytes());
    }

    /// Cheap pre-check for scans: does this sector start with the magic?
    pub fn has_magic(sector: &[u8]) -> bool {
        sector.len() >= 8 && le_u64(sector, 0) == EXTENT_MAGIC
    }

    /// Decodes a header, or says why the bytes are not a valid extent header.
    /// `bytes` must hold at least the whole header (it may hold more).
    pub fn decode(node_id: u128, bytes: &[u8]) -> Result<ExtentHeader, String> {
        if bytes.len() < SECTOR as usize {
            return Err("extent header shorter than a sector".into());
        }
        let magic = le_u64(bytes, 0);
        if magic != EXTENT_MAGIC {
            return Err(format!("bad extent magic {magic:#018x}"));
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if u32::from(version) != FORMAT_VERSION {
            return Err(format!("unsupported extent format version {version}"));
        }
        let kind = match bytes[10] {
            1 => ExtentKind::Data,
            2 => ExtentKind::Tombstone,
            k => return Err(format!("unknown extent kind {k}")),
        };
        let count = u64::from(le_u32(bytes, 40));
        let count_ok = match kind {
            ExtentKind::Data => count > 0 && count <= MAX_EXTENT_SECTORS,
            ExtentKind::Tombstone => count == 0,
        };
        if !count_ok {
            return Err(format!("extent sector count {count} out of range"));
        }
        let hs = u64::from(le_u32(bytes, 12));
        if hs != header_sectors_for(count) {
            return Err(format!(
                "header sector count {hs} does not match {count} data sectors"
            ));
        }
        let total = (hs * SECTOR) as usize;
        if bytes.len() < total {
            return Err(format!(
                "extent header needs {total} bytes, got {}",
                bytes.len()
            ));
        }
        let header = &bytes[..total];
        let stored = le_u32(header, 120);
        let computed = header_crc(node_id, header);
        if stored != computed {
            return Err(format!(
                "extent header crc mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        if header[11] != 0
            || le_u32(header, 44) != 0
            || !all_zero(&header[104..120])
            || le_u32(header, 124) != 0
        {
            return Err("reserved extent header bytes are not zero".into());
        }
        let crcs_end = EXTENT_HEADER_FIXED + 4 * count as usize;
        if !all_zero(&header[crcs_end..]) {
            return Err("extent header padding is not zero".into());
        }
        // Bounds no header this code writes can exceed: past them the
        // sector is not taken for a header (and sizes from disk cannot
        // overflow later arithmetic).
        let (first, generation, chunk_len) =
            (le_u64(header, 32), le_u64(header, 48), le_u64(header, 56));
        let max_sectors = limits::MAX_CHUNK_SIZE / SECTOR;
        if first.checked_add(count).is_none_or(|end| end > max_sectors) {
            return Err(format!(
                "extent sectors {first}+{count} past the largest chunk"
            ));
        }
        if chunk_len > limits::MAX_CHUNK_SIZE {
            return Err(format!("chunk length {chunk_len} past the largest chunk"));
        }
        if generation >= MAX_GENERATION {
            return Err(format!("generation {generation} out of range"));
        }
        let crcs = (0..count as usize)
            .map(|i| le_u32(header, EXTENT_HEADER_FIXED + 4 * i))
            .collect();
        Ok(ExtentHeader {
            kind,
            chunk: ChunkId(le_u128(header, 16)),
            first_sector: LogicalSector(first),
            generation: Generation(generation),
            chunk_len,
            timestamp_ns: le_u64(header, 64),
            version: le_u64(header, 72),
            created_ns: le_u64(header, 80),
            disk_sector: DiskSector(le_u64(header, 88)),
            durable_below: le_u64(header, 96),
            crcs,
        })
    }

    /// Checks every data sector of the extent (`data` = the data sectors);
    /// returns the index of the first bad one.
    pub fn first_bad_sector(&self, data: &[u8]) -> Option<usize> {
        (0..self.crcs.len()).find(|&i| !self.sector_ok(data, i))
    }

    /// Indices of every data sector of `data` that fails its crc.
    pub fn bad_sectors(&self, data: &[u8]) -> Vec<usize> {
        (0..self.crcs.len())
            .filter(|&i| !self.sector_ok(data, i))
            .collect()
    }

    fn sector_ok(&self, data: &[u8], i: usize) -> bool {
        assert_eq!(data.len() as u64, self.crcs.len() as u64 * SECTOR);
        let s = &data[i * SECTOR as usize..(i + 1) * SECTOR as usize];
        sector_crc(
            self.chunk,
            LogicalSector(self.first_sector.0 + i as u64),
            self.generation,
            s,
        ) == self.crcs[i]
    }
}

/// Whether every byte is zero. A fold without an early exit, so it
/// vectorizes: the byte-at-a-time `any` over a header's ~4 KiB of padding
/// was 6% of the server's CPU under 32 outstanding writes (every header is
/// decoded once before it is written, see `shard::assert_write_buffer`).
fn all_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |acc, &x| acc | x) == 0
}

pub fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

pub fn le_u128(b: &[u8], at: usize) -> u128 {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    u128::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_crc_from_the_plain_crc_matches_and_chains() {
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut sector = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        for i in 0..20u64 {
            let data = sector(SECTOR as usize);
            let (c, l, g) = (
                ChunkId(u128::from(i) << 70 | 3),
                LogicalSector(i * 7),
                Generation(i),
            );
            assert_eq!(
                sector_crc_from_plain(c, l, g, crc32c::crc32c(&data)),
                sector_crc(c, l, g, &data)
            );
            let head = sector(1 + i as usize * 100);
            let mut both = head.clone();
            both.extend_from_slice(&data);
            assert_eq!(
                crc_then_sector(crc32c::crc32c(&head), crc32c::crc32c(&data)),
                crc32c::crc32c(&both)
            );
        }
    }

    #[test]
    fn superblock_round_trip_and_rejects() {
        let sb = Superblock {
            node_id: 0x1234_5678_9abc_def0_1122_3344_5566_7788,
            shard: ShardId(3),
            shard_count: 8,
            capacity_sectors: 1000,
            created_ns: 42,
        };
        let mut buf = vec![0u8; SECTOR as usize];
        sb.encode(&mut buf);
        assert_eq!(Superblock::decode(&buf), Ok(sb));
        let mut bad = buf.clone();
        bad[37] ^= 1;
        assert!(Superblock::decode(&bad).unwrap_err().contains("crc"));
        let mut foreign = buf.clone();
        foreign[0] = b'X';
        assert!(Superblock::decode(&foreign).unwrap_err().contains("magic"));
        let mut reserved = buf.clone();
        reserved[200] = 1;
        assert!(Superblock::decode(&reserved)
            .unwrap_err()
            .contains("reserved"));
        assert!(Superblock::decode(&vec![0u8; SECTOR as usize])
            .unwrap_err()
            .contains("zeros"));
    }

    #[test]
    fn extent_header_round_trip_multi_sector() {
        for count in [1u64, 2, 992, 993, MAX_EXTENT_SECTORS] {
            let h = ExtentHeader {
                kind: ExtentKind::Data,
                version: 3,
                created_ns: 4,
                disk_sector: DiskSector(1234),
                durable_below: 2,
                chunk: ChunkId(77),
                first_sector: LogicalSector(5),
                generation: Generation(9),
                chunk_len: 123_456,
                timestamp_ns: 1,
                crcs: (0..count as u32)
                    .map(|i| i.wrapping_mul(2_654_435_761))
                    .collect(),
            };
            let mut buf = vec![0u8; (h.header_sectors() * SECTOR) as usize];
            h.encode(5, &mut buf);
            assert_eq!(ExtentHeader::decode(5, &buf).unwrap(), h);
            // Another node's key does not validate it.
            assert!(ExtentHeader::decode(6, &buf).is_err());
            let last = buf.len() - 1;
            buf[last] ^= 0xff;
            assert!(ExtentHeader::decode(5, &buf).is_err());
        }
        assert_eq!(header_sectors_for(992), 1);
        assert_eq!(header_sectors_for(993), 2);
        assert_eq!(header_sectors_for(MAX_EXTENT_SECTORS), 3);
        assert_eq!(header_sectors_for(0), 1);
        let t = ExtentHeader {
            kind: ExtentKind::Tombstone,
            chunk: ChunkId(9),
            first_sector: LogicalSector(0),
            generation: Generation(11),
            chunk_len: 0,
            timestamp_ns: 1,
            version: 4,
            created_ns: 2,
            disk_sector: DiskSector(77),
            durable_below: 10,
            crcs: Crcs::new(),
        };
        let mut buf = vec![0u8; SECTOR as usize];
        t.encode(1, &mut buf);
        assert_eq!(ExtentHeader::decode(1, &buf).unwrap(), t);
        assert_eq!(t.total_sectors(), 1);
    }

    #[test]
    fn sector_crc_binds_identity() {
        let data = vec![7u8; SECTOR as usize];
        let c = sector_crc(ChunkId(1), LogicalSector(2), Generation(3), &data);
        assert_ne!(
            c,
            sector_crc(ChunkId(2), LogicalSector(2), Generation(3), &data)
        );
        assert_ne!(
            c,
            sector_crc(ChunkId(1), LogicalSector(3), Generation(3), &data)
        );
        assert_ne!(
            c,
            sector_crc(ChunkId(1), LogicalSector(2), Generation(4), &data)
        );
    }
}
