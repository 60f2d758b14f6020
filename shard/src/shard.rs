//! One shard: a data file and a sled index owned by one executor.
//!
//! Write path, in this order (invariants 2 and 3):
//! 1. validate (`prepare_write`): limits, not fail-stopped; allocate the DMA
//!    buffer the payload is received into;
//! 2. take the chunk's writer lock (per-chunk generation order);
//! 3. read-modify-write the partial head/tail sector from the current version
//!    (crc-verified) or zeros;
//! 4. assign a generation, compute every data sector's crc, encode the header;
//! 5. allocate a contiguous run (in memory only);
//! 6. ONE device write of header + data to the run (copy-on-write: never over
//!    live sectors);
//! 7. group-commit `fdatasync` of the data file: the extent is durable and
//!    self-describing, but not yet findable;
//! 8. one sled batch: chunk meta + new extent record + split old records;
//! 9. group-commit sled `flush_async`: the write is findable after a crash;
//! 10. hand superseded sectors to the reclaimer (deferred free: only after 9,
//!     and only once reads that may still be reading them are done);
//! 11. acknowledge.
//!
//! A crash before 7 leaves at most an unreferenced extent (space that the
//! rebuild at open sees as free); before 9 the index still names the old,
//! untouched sectors; so a write is all or nothing.
//!
//! Delete: one sled batch removing meta and extents, `flush_async`, then free.
//! A durable tombstone in the data area (needed once the index is rebuilt from
//! the data area) comes with a later change.
//!
//! Fail-stop (invariant 8): any error of the data `fdatasync`, of applying or
//! flushing the index, sets the shard read-only for good: writes and deletes
//! answer `ReadOnly`, reads keep working. A flush is never retried.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use glommio::io::DmaBuffer;
use shardstore_proto::{limits, ChunkId, ShardId};

use crate::alloc::{Allocator, Reclaimer, Release, Run};
use crate::device::Device;
use crate::error::ShardError;
use crate::group::Group;
use crate::index::{Change, ChunkMeta, ExtentRec, Index};
use crate::layout::{
    header_sectors_for, sector_crc, DiskSector, ExtentHeader, Generation, LogicalSector,
    Superblock, DATA_START_SECTOR, SECTOR,
};
use crate::locks::ChunkLocks;
use crate::read_data::ReadData;

/// How to open a shard.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    pub shard: ShardId,
    pub shard_count: u32,
    pub node_id: u128,
    /// The shard's own folder (the caller passes DATA_DIR/shard-NNN).
    pub dir: PathBuf,
    /// Data area size; the file is preallocated to this on creation. An
    /// existing file keeps the capacity it was formatted with.
    pub capacity_bytes: u64,
    /// At most `limits::MAX_CHUNK_SIZE`.
    pub max_chunk_size: u64,
    /// sled cache capacity.
    pub index_cache_bytes: u64,
}

impl ShardConfig {
    pub const DEFAULT_INDEX_CACHE_BYTES: u64 = 16 << 20;

    /// Folder name of shard `id` inside the node's data dir: `shard-NNN`.
    pub fn folder_name(id: ShardId) -> String {
        format!("shard-{:03}", id.0)
    }
}

/// Result of a successful write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    pub version: u64,
    pub chunk_len: u64,
}

/// Result of a successful read.
#[derive(Clone, Debug)]
pub struct ReadOutcome {
    pub version: u64,
    pub chunk_len: u64,
    /// crc32c of exactly the bytes of `data`.
    pub payload_crc: u32,
    pub data: ReadData,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkStat {
    pub chunk_len: u64,
    pub version: u64,
    pub created_ns: u64,
    pub modified_ns: u64,
    /// Bytes of data sectors the chunk holds on disk (holes excluded).
    pub allocated_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListItem {
    pub chunk: ChunkId,
    pub chunk_len: u64,
    pub version: u64,
}

/// Counters of one shard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardStats {
    pub writes: u64,
    pub reads: u64,
    pub bytes_written: u64,
    pub bytes_read: u64,
    pub device_writes: u64,
    /// Data-file `fdatasync`s.
    pub flushes: u64,
    pub corrupt_errors: u64,
    pub chunks: u64,
    /// Data area in use, headers included.
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub fail_stopped: bool,
}

/// A validated write whose payload buffer is waiting to be filled.
///
/// The buffer is the one that goes to disk: `header | data sectors`, with the
/// payload at its byte offset inside the first data sector. The caller must
/// fill all of [`PendingWrite::payload_mut`].
pub struct PendingWrite {
    chunk: ChunkId,
    offset: u64,
    len: u32,
    first: LogicalSector,
    sectors: u64,
    header_sectors: u64,
    buf: DmaBuffer,
}

impl PendingWrite {
    fn payload_start(&self) -> usize {
        (self.header_sectors * SECTOR + self.offset % SECTOR) as usize
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = self.payload_start();
        &mut self.buf.as_bytes_mut()[start..start + self.len as usize]
    }

    pub fn chunk(&self) -> ChunkId {
        self.chunk
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[derive(Default)]
struct Counters {
    writes: Cell<u64>,
    reads: Cell<u64>,
    bytes_written: Cell<u64>,
    bytes_read: Cell<u64>,
    corrupt_errors: Cell<u64>,
    chunks: Cell<u64>,
}

fn bump(c: &Cell<u64>, by: u64) {
    c.set(c.get() + by);
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The per-core storage engine. `!Send`: lives in one executor, shared by
/// that executor's tasks through `Rc<Shard>`.
pub struct Shard {
    id: ShardId,
    max_chunk_size: u64,
    capacity_sectors: u64,
    device: Device,
    index: Index,
    alloc: RefCell<Allocator>,
    reclaim: RefCell<Reclaimer>,
    data_sync: Group,
    index_sync: Group,
    next_generation: Cell<u64>,
    locks: ChunkLocks,
    fail_stopped: Cell<bool>,
    counters: Counters,
}

/// Ends a read's reclaim epoch, also when the read is cancelled.
struct ReadEpoch<'a> {
    shard: &'a Shard,
    epoch: u64,
}

impl Drop for ReadEpoch<'_> {
    fn drop(&mut self) {
        let mut alloc = self.shard.alloc.borrow_mut();
        self.shard
            .reclaim
            .borrow_mut()
            .end_read(self.epoch, &mut alloc);
    }
}

impl Shard {
    /// Creates the shard's folder, data file and index, or opens them and
    /// checks the superblock against the configuration.
    pub async fn open(cfg: ShardConfig) -> Result<Shard, ShardError> {
        validate_config(&cfg)?;
        std::fs::create_dir_all(&cfg.dir)
            .map_err(|e| ShardError::io(format!("creating {}", cfg.dir.display()), e))?;
        // Opening sled is blocking file I/O; it happens once, before serving.
        let db = sled::Config::new()
            .path(cfg.dir.join("index"))
            .cache_capacity(cfg.index_cache_bytes)
            .open()?;
        let index = Index::new(db);
        let data_path = cfg.dir.join("data");
        let device = Device::open(&data_path)
            .await
            .map_err(|e| ShardError::io(format!("opening {}", data_path.display()), e))?;
        let size = device
            .size_bytes()
            .await
            .map_err(|e| ShardError::io("reading the data file size", e))?;

        let superblock = if size == 0 {
            if !index.is_empty() {
                return Err(ShardError::Format(format!(
                    "{} is empty but the index in {} is not: refusing to reformat",
                    data_path.display(),
                    cfg.dir.display()
                )));
            }
            format_device(&device, &cfg).await?
        } else {
            let rr = device
                .read(DiskSector(0), DATA_START_SECTOR)
                .await
                .map_err(|e| ShardError::io("reading the superblock", e))?;
            let a = Superblock::decode(&rr[..SECTOR as usize]);
            let b = Superblock::decode(&rr[SECTOR as usize..]);
            match (a, b) {
                (Ok(sb), _) | (Err(_), Ok(sb)) => sb,
                (Err(ea), Err(eb)) => {
                    if rr.iter().all(|&x| x == 0) && index.is_empty() {
                        // A crash during formatting: nothing was ever stored.
                        format_device(&device, &cfg).await?
                    } else {
                        return Err(ShardError::Format(format!(
                            "{}: no valid superblock (copy A: {ea}; copy B: {eb})",
                            data_path.display()
                        )));
                    }
                }
            }
        };
        check_superblock(&superblock, &cfg)?;
        let needed = (DATA_START_SECTOR + superblock.capacity_sectors) * SECTOR;
        let size = device
            .size_bytes()
            .await
            .map_err(|e| ShardError::io("reading the data file size", e))?;
        if size < needed {
            return Err(ShardError::Format(format!(
                "{} has {size} bytes but its superblock needs {needed}",
                data_path.display()
            )));
        }
        if superblock.capacity_sectors * SECTOR != cfg.capacity_bytes / SECTOR * SECTOR {
            tracing::warn!(
                shard = cfg.shard.0,
                formatted_bytes = superblock.capacity_sectors * SECTOR,
                configured_bytes = cfg.capacity_bytes,
                "capacity differs from the configuration; keeping the formatted capacity"
            );
        }

        // Rebuild the allocator and the generation counter from the index.
        let mut alloc = Allocator::new(Run {
            start: DiskSector(DATA_START_SECTOR),
            len: superblock.capacity_sectors,
        });
        let mut max_generation = 0u64;
        for item in index.all_extents() {
            let (chunk, rec) = item?;
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
                .map_err(|e| ShardError::IndexCorrupt(format!("chunk {chunk}: {e}")))?;
        }
        let mut chunks = 0u64;
        for item in index.metas_after(None) {
            item?;
            chunks += 1;
        }
        tracing::info!(
            shard = cfg.shard.0,
            chunks,
            used_sectors = alloc.used_sectors(),
            capacity_sectors = superblock.capacity_sectors,
            next_generation = max_generation + 1,
            "shard opened"
        );
        let counters = Counters::default();
        counters.chunks.set(chunks);
        Ok(Shard {
            id: cfg.shard,
            max_chunk_size: cfg.max_chunk_size,
            capacity_sectors: superblock.capacity_sectors,
            device,
            index,
            alloc: RefCell::new(alloc),
            reclaim: RefCell::new(Reclaimer::new()),
            data_sync: Group::new(),
            index_sync: Group::new(),
            next_generation: Cell::new(max_generation + 1),
            locks: ChunkLocks::default(),
            fail_stopped: Cell::new(false),
            counters,
        })
    }

    pub fn id(&self) -> ShardId {
        self.id
    }

    fn check_writable(&self) -> Result<(), ShardError> {
        if self.fail_stopped.get() {
            Err(ShardError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn fail_stop(&self, what: &str, err: &dyn std::fmt::Display) {
        if !self.fail_stopped.replace(true) {
            tracing::error!(shard = self.id.0, error = %err, "{what} failed: shard is now read-only (fail-stop)");
        }
    }

    fn no_space(&self, needed_sectors: u64) -> ShardError {
        let alloc = self.alloc.borrow();
        ShardError::NoSpace {
            needed_bytes: needed_sectors * SECTOR,
            free_bytes: alloc.free_sectors() * SECTOR,
        }
    }

    /// Validates a write and allocates the buffer its payload is received into.
    pub fn prepare_write(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: u32,
    ) -> Result<PendingWrite, ShardError> {
        self.check_writable()?;
        if len == 0 {
            return Err(ShardError::InvalidArgument("empty write".into()));
        }
        if len > limits::MAX_PAYLOAD {
            return Err(ShardError::TooLarge(format!(
                "payload of {len} bytes exceeds {}",
                limits::MAX_PAYLOAD
            )));
        }
        let end = offset
            .checked_add(u64::from(len))
            .filter(|&e| e <= self.max_chunk_size)
            .ok_or_else(|| {
                ShardError::TooLarge(format!(
                    "write of {len} bytes at offset {offset} exceeds the chunk size limit of {}",
                    self.max_chunk_size
                ))
            })?;
        let first = offset / SECTOR;
        let sectors = end.div_ceil(SECTOR) - first;
        let header_sectors = header_sectors_for(sectors);
        let total = header_sectors + sectors;
        if self.alloc.borrow().free_sectors() < total {
            return Err(self.no_space(total));
        }
        Ok(PendingWrite {
            chunk,
            offset,
            len,
            first: LogicalSector(first),
            sectors,
            header_sectors,
            buf: self.device.alloc_buffer(total),
        })
    }

    /// Writes `data` at `offset` of `chunk` (prepare + copy + commit).
    pub async fn write(
        &self,
        chunk: ChunkId,
        offset: u64,
        data: &[u8],
    ) -> Result<WriteOutcome, ShardError> {
        let len = u32::try_from(data.len())
            .map_err(|_| ShardError::TooLarge(format!("payload of {} bytes", data.len())))?;
        let mut w = self.prepare_write(chunk, offset, len)?;
        w.payload_mut().copy_from_slice(data);
        self.commit_write(w).await
    }

    /// Makes a prepared write durable; see the module docs for the order of steps.
    pub async fn commit_write(&self, mut w: PendingWrite) -> Result<WriteOutcome, ShardError> {
        self.check_writable()?;
        let chunk = w.chunk;
        let _lock = self.locks.lock(chunk).await?;
        self.check_writable()?;
        let old = self.index.get_meta(chunk)?;
        let old_len = old.map_or(0, |m| m.len);
        let end = w.offset + u64::from(w.len);
        let data_start = (w.header_sectors * SECTOR) as usize;
        let first_byte = w.first.0 * SECTOR;
        let last_byte = (w.first.0 + w.sectors) * SECTOR;

        // Read-modify-write of the partial head and tail sectors. Bytes past
        // the old chunk length are zero (they were zero in every version).
        let head = (w.offset - first_byte) as usize;
        if head > 0 {
            let dst = &mut w.buf.as_bytes_mut()[data_start..data_start + head];
            self.fill_from_current(chunk, old_len, first_byte, dst)
                .await?;
        }
        if end < last_byte {
            let from = (end - first_byte) as usize + data_start;
            let to = (last_byte - first_byte) as usize + data_start;
            let dst = &mut w.buf.as_bytes_mut()[from..to];
            self.fill_from_current(chunk, old_len, end, dst).await?;
        }

        let generation = Generation(self.next_generation.get());
        self.next_generation.set(generation.0 + 1);
        let chunk_len = old_len.max(end);
        let now = now_ns();
        let crcs: Vec<u32> = {
            let data = &w.buf.as_bytes()[data_start..];
            (0..w.sectors)
                .map(|i| {
                    let s = &data[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize];
                    sector_crc(chunk, LogicalSector(w.first.0 + i), generation, s)
                })
                .collect()
        };
        let header = ExtentHeader {
            chunk,
            first_sector: w.first,
            generation,
            chunk_len,
            timestamp_ns: now,
            crcs,
        };
        assert_eq!(header.header_sectors(), w.header_sectors);
        header.encode(&mut w.buf.as_bytes_mut()[..data_start]);
        // Pair assertion, disk side: what goes out decodes to what we meant.
        assert_write_buffer(&header, w.buf.as_bytes());

        let total = w.header_sectors + w.sectors;
        let allocated = self.alloc.borrow_mut().allocate(total);
        let Some(at) = allocated else {
            return Err(self.no_space(total));
        };
        let run = Run {
            start: at,
            len: total,
        };
        if let Err(e) = self.device.write(at, w.buf).await {
            // Never referenced: the space can go straight back.
            self.alloc.borrow_mut().free_run(run);
            if e.raw_os_error() == Some(libc::ENOSPC) {
                return Err(self.no_space(total));
            }
            return Err(ShardError::io(
                format!("writing an extent of chunk {chunk} at sector {}", at.0),
                e,
            ));
        }
        if let Err(e) = self.data_sync.sync(|| self.device.sync()).await {
            // The extent's space stays allocated: after a failed fdatasync
            // nothing about it can be trusted, and the shard stops writing.
            self.fail_stop("fdatasync of the data file", &e);
            return Err(ShardError::io("fdatasync of the data file", e));
        }
        self.alloc
            .borrow_mut()
            .register_extent(at, w.header_sectors, w.sectors);

        // The index change: new record, split the records it covers.
        let new_first = w.first.0;
        let new_end = new_first + w.sectors;
        let mut change = Change::new();
        let mut releases = Vec::new();
        let mut superseded = 0u64;
        for rec in self.index.overlapping(chunk, new_first, new_end)? {
            change.remove_extent(chunk, rec.logical);
            if rec.logical.0 < new_first {
                change.put_extent(chunk, &rec.slice(rec.logical.0, new_first));
            }
            if rec.end() > new_end {
                change.put_extent(chunk, &rec.slice(new_end, rec.end()));
            }
            let from = rec.logical.0.max(new_first);
            let to = rec.end().min(new_end);
            releases.push(Release {
                header: rec.header,
                data: Run {
                    start: DiskSector(rec.disk.0 + (from - rec.logical.0)),
                    len: to - from,
                },
            });
            superseded += to - from;
        }
        let rec = ExtentRec {
            logical: w.first,
            disk: DiskSector(at.0 + w.header_sectors),
            header: at,
            header_sectors: w.header_sectors,
            generation,
            crcs: header.crcs,
        };
        change.put_extent(chunk, &rec);
        let meta = ChunkMeta {
            len: chunk_len,
            version: old.map_or(1, |m| m.version + 1),
            created_ns: old.map_or(now, |m| m.created_ns),
            modified_ns: now,
            live_sectors: old.map_or(0, |m| m.live_sectors) - superseded + w.sectors,
        };
        change.put_meta(chunk, &meta);
        self.apply_durably(change).await?;
        {
            let mut alloc = self.alloc.borrow_mut();
            self.reclaim.borrow_mut().defer(releases, &mut alloc);
        }
        bump(&self.counters.writes, 1);
        bump(&self.counters.bytes_written, u64::from(w.len));
        if old.is_none() {
            bump(&self.counters.chunks, 1);
        }
        tracing::trace!(shard = self.id.0, chunk = %chunk, version = meta.version, generation = generation.0, "write");
        Ok(WriteOutcome {
            version: meta.version,
            chunk_len,
        })
    }

    /// Applies an index change and waits until it is durable (grouped flush).
    async fn apply_durably(&self, change: Change) -> Result<(), ShardError> {
        if let Err(e) = change.apply(&self.index) {
            self.fail_stop("applying an index change", &e);
            return Err(e);
        }
        let db = self.index.db();
        let flushed = self
            .index_sync
            .sync(|| async {
                db.flush_async()
                    .await
                    .map(|_| ())
                    .map_err(|e| std::io::Error::other(e.to_string()))
            })
            .await;
        if let Err(e) = flushed {
            self.fail_stop("flushing the index", &e);
            return Err(ShardError::io("flushing the index", e));
        }
        Ok(())
    }

    /// Fills `dst` with the chunk's current bytes from byte `at` (zeros past
    /// `chunk_len`); used for read-modify-write under the chunk lock.
    async fn fill_from_current(
        &self,
        chunk: ChunkId,
        chunk_len: u64,
        at: u64,
        dst: &mut [u8],
    ) -> Result<(), ShardError> {
        let end = (at + dst.len() as u64).min(chunk_len);
        if end <= at {
            dst.fill(0);
            return Ok(());
        }
        let n = (end - at) as usize;
        let data = self.read_bytes(chunk, at, end).await?;
        data.copy_range(0, &mut dst[..n]);
        dst[n..].fill(0);
        Ok(())
    }

    fn begin_read(&self) -> ReadEpoch<'_> {
        let epoch = self.reclaim.borrow_mut().begin_read();
        ReadEpoch { shard: self, epoch }
    }

    /// Reads up to `len` bytes at `offset`; short at the end of the chunk.
    pub async fn read(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: u32,
    ) -> Result<ReadOutcome, ShardError> {
        if len > limits::MAX_PAYLOAD {
            return Err(ShardError::TooLarge(format!(
                "read of {len} bytes exceeds {}",
                limits::MAX_PAYLOAD
            )));
        }
        let want_end = offset
            .checked_add(u64::from(len))
            .ok_or_else(|| ShardError::InvalidArgument(format!("offset {offset} overflows")))?;
        let _epoch = self.begin_read();
        let meta = self
            .index
            .get_meta(chunk)?
            .ok_or(ShardError::NotFound(chunk))?;
        let end = want_end.min(meta.len);
        let data = if offset >= end {
            ReadData::default()
        } else {
            self.read_bytes(chunk, offset, end).await?
        };
        bump(&self.counters.reads, 1);
        bump(&self.counters.bytes_read, data.len() as u64);
        Ok(ReadOutcome {
            version: meta.version,
            chunk_len: meta.len,
            payload_crc: data.crc32c(),
            data,
        })
    }

    /// Bytes `[start, end)` of the chunk (within its length), every sector
    /// read from disk checked against its crc.
    async fn read_bytes(
        &self,
        chunk: ChunkId,
        start: u64,
        end: u64,
    ) -> Result<ReadData, ShardError> {
        assert!(start < end);
        let _epoch = self.begin_read();
        let first = start / SECTOR;
        let last = end.div_ceil(SECTOR);
        let recs: Vec<ExtentRec> = self
            .index
            .overlapping(chunk, first, last)?
            .into_iter()
            .map(|r| {
                let from = r.logical.0.max(first);
                let to = r.end().min(last);
                r.slice(from, to)
            })
            .collect();
        for r in &recs {
            if r.disk.0 < DATA_START_SECTOR
                || r.disk.0 + r.count() > DATA_START_SECTOR + self.capacity_sectors
            {
                return Err(ShardError::IndexCorrupt(format!(
                    "chunk {chunk} extent at logical {} points outside the data area",
                    r.logical.0
                )));
            }
        }
        let reads = recs.iter().map(|r| self.device.read(r.disk, r.count()));
        let results = futures_util::future::join_all(reads).await;

        let mut data = ReadData::default();
        let mut pos = start;
        for (r, res) in recs.iter().zip(results) {
            let rr = res.map_err(|e| {
                ShardError::io(
                    format!("reading chunk {chunk} sectors {}..{}", r.logical.0, r.end()),
                    e,
                )
            })?;
            // Pair assertion, memory side: every sector checked right after the read.
            for (i, crc) in r.crcs.iter().enumerate() {
                let s = &rr[i * SECTOR as usize..(i + 1) * SECTOR as usize];
                let logical = LogicalSector(r.logical.0 + i as u64);
                let got = sector_crc(chunk, logical, r.generation, s);
                if got != *crc {
                    bump(&self.counters.corrupt_errors, 1);
                    tracing::error!(shard = self.id.0, chunk = %chunk, sector = logical.0, disk_sector = r.disk.0 + i as u64, "sector checksum mismatch");
                    return Err(ShardError::Corrupt {
                        chunk,
                        sector: logical.0,
                        detail: format!(
                            "crc32c {got:#010x} != expected {crc:#010x} (disk sector {}, generation {})",
                            r.disk.0 + i as u64,
                            r.generation.0
                        ),
                    });
                }
            }
            let piece_start = (r.logical.0 * SECTOR).max(start);
            let piece_end = (r.end() * SECTOR).min(end);
            if piece_start > pos {
                data.push_zeros((piece_start - pos) as usize);
            }
            let off = (piece_start - r.logical.0 * SECTOR) as usize;
            let len = (piece_end - piece_start) as usize;
            let slice = glommio::io::ReadResult::slice(&rr, off, len).ok_or_else(|| {
                ShardError::Internal(format!("slice {off}+{len} of a {} byte read", rr.len()))
            })?;
            data.push_disk(slice);
            pos = piece_end;
        }
        if end > pos {
            data.push_zeros((end - pos) as usize);
        }
        assert_eq!(data.len() as u64, end - start);
        Ok(data)
    }

    /// Metadata of a chunk.
    pub fn stat(&self, chunk: ChunkId) -> Result<ChunkStat, ShardError> {
        let m = self
            .index
            .get_meta(chunk)?
            .ok_or(ShardError::NotFound(chunk))?;
        Ok(ChunkStat {
            chunk_len: m.len,
            version: m.version,
            created_ns: m.created_ns,
            modified_ns: m.modified_ns,
            allocated_bytes: m.live_sectors * SECTOR,
        })
    }

    /// Deletes a chunk; durable on Ok. Returns the version it had.
    pub async fn delete(&self, chunk: ChunkId) -> Result<u64, ShardError> {
        self.check_writable()?;
        let _lock = self.locks.lock(chunk).await?;
        self.check_writable()?;
        let meta = self
            .index
            .get_meta(chunk)?
            .ok_or(ShardError::NotFound(chunk))?;
        let recs = self.index.chunk_extents(chunk)?;
        let mut change = Change::new();
        change.remove_meta(chunk);
        let mut releases = Vec::with_capacity(recs.len());
        for r in &recs {
            change.remove_extent(chunk, r.logical);
            releases.push(Release {
                header: r.header,
                data: Run {
                    start: r.disk,
                    len: r.count(),
                },
            });
        }
        self.apply_durably(change).await?;
        {
            let mut alloc = self.alloc.borrow_mut();
            self.reclaim.borrow_mut().defer(releases, &mut alloc);
        }
        self.counters
            .chunks
            .set(self.counters.chunks.get().saturating_sub(1));
        tracing::trace!(shard = self.id.0, chunk = %chunk, version = meta.version, "delete");
        Ok(meta.version)
    }

    /// Up to `limit` chunks (at most `MAX_LIST_LIMIT`) in id order after
    /// `after`, and whether more follow.
    pub fn list(
        &self,
        after: Option<ChunkId>,
        limit: u32,
    ) -> Result<(Vec<ListItem>, bool), ShardError> {
        let limit = limit.min(limits::MAX_LIST_LIMIT) as usize;
        let mut items = Vec::with_capacity(limit);
        let mut more = false;
        for item in self.index.metas_after(after) {
            let (chunk, m) = item?;
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(ListItem {
                chunk,
                chunk_len: m.len,
                version: m.version,
            });
        }
        Ok((items, more))
    }

    pub fn stats(&self) -> ShardStats {
        let dev = self.device.counters();
        let c = &self.counters;
        ShardStats {
            writes: c.writes.get(),
            reads: c.reads.get(),
            bytes_written: c.bytes_written.get(),
            bytes_read: c.bytes_read.get(),
            device_writes: dev.writes,
            flushes: dev.flushes,
            corrupt_errors: c.corrupt_errors.get(),
            chunks: c.chunks.get(),
            used_bytes: self.alloc.borrow().used_sectors() * SECTOR,
            capacity_bytes: self.capacity_sectors * SECTOR,
            fail_stopped: self.fail_stopped.get(),
        }
    }

    /// Flushes the index and syncs the data file. Call when no operation is
    /// in flight; the shard can then be dropped.
    pub async fn close(&self) -> Result<(), ShardError> {
        self.index
            .db()
            .flush_async()
            .await
            .map_err(ShardError::Index)?;
        if !self.fail_stopped.get() {
            self.device
                .sync()
                .await
                .map_err(|e| ShardError::io("fdatasync at close", e))?;
        }
        tracing::info!(shard = self.id.0, "shard closed");
        Ok(())
    }
}

fn validate_config(cfg: &ShardConfig) -> Result<(), ShardError> {
    if cfg.shard_count == 0 || cfg.shard_count > limits::MAX_SHARDS {
        return Err(ShardError::InvalidArgument(format!(
            "shard count {} not in 1..={}",
            cfg.shard_count,
            limits::MAX_SHARDS
        )));
    }
    if cfg.shard.0 >= cfg.shard_count {
        return Err(ShardError::InvalidArgument(format!(
            "shard id {} not below the shard count {}",
            cfg.shard.0, cfg.shard_count
        )));
    }
    if cfg.max_chunk_size == 0 || cfg.max_chunk_size > limits::MAX_CHUNK_SIZE {
        return Err(ShardError::InvalidArgument(format!(
            "max chunk size {} not in 1..={}",
            cfg.max_chunk_size,
            limits::MAX_CHUNK_SIZE
        )));
    }
    if cfg.capacity_bytes < 2 * SECTOR {
        return Err(ShardError::InvalidArgument(format!(
            "capacity of {} bytes is below two sectors",
            cfg.capacity_bytes
        )));
    }
    Ok(())
}

fn check_superblock(sb: &Superblock, cfg: &ShardConfig) -> Result<(), ShardError> {
    if sb.shard_count != cfg.shard_count {
        return Err(ShardError::ShardCountMismatch {
            found: sb.shard_count,
            expected: cfg.shard_count,
        });
    }
    if sb.shard != cfg.shard {
        return Err(ShardError::Format(format!(
            "{}: data file belongs to shard {}, not shard {}",
            cfg.dir.display(),
            sb.shard.0,
            cfg.shard.0
        )));
    }
    if sb.node_id != cfg.node_id {
        return Err(ShardError::Format(format!(
            "{}: data file belongs to node {:032x}, not node {:032x}",
            cfg.dir.display(),
            sb.node_id,
            cfg.node_id
        )));
    }
    Ok(())
}

/// Preallocates the data file and writes both superblock copies durably.
async fn format_device(device: &Device, cfg: &ShardConfig) -> Result<Superblock, ShardError> {
    let sb = Superblock {
        node_id: cfg.node_id,
        shard: cfg.shard,
        shard_count: cfg.shard_count,
        capacity_sectors: cfg.capacity_bytes / SECTOR,
        created_ns: now_ns(),
    };
    device
        .pre_allocate((DATA_START_SECTOR + sb.capacity_sectors) * SECTOR)
        .await
        .map_err(|e| ShardError::io("preallocating the data file", e))?;
    let mut buf = device.alloc_buffer(DATA_START_SECTOR);
    for copy in 0..DATA_START_SECTOR as usize {
        let s = SECTOR as usize;
        sb.encode(&mut buf.as_bytes_mut()[copy * s..(copy + 1) * s]);
    }
    device
        .write(DiskSector(0), buf)
        .await
        .map_err(|e| ShardError::io("writing the superblock", e))?;
    device
        .sync()
        .await
        .map_err(|e| ShardError::io("fdatasync after formatting", e))?;
    tracing::info!(
        shard = cfg.shard.0,
        capacity_sectors = sb.capacity_sectors,
        "formatted a new data file"
    );
    Ok(sb)
}

/// The buffer about to be written is a valid extent: its header decodes to
/// `header`, and (with `strict-assertions`) every data sector matches its crc.
fn assert_write_buffer(header: &ExtentHeader, buf: &[u8]) {
    let hs = (header.header_sectors() * SECTOR) as usize;
    let decoded = ExtentHeader::decode(&buf[..hs]);
    assert_eq!(
        decoded.as_ref(),
        Ok(header),
        "extent header does not round-trip"
    );
    if cfg!(feature = "strict-assertions") {
        for (i, crc) in header.crcs.iter().enumerate() {
            let s = &buf[hs + i * SECTOR as usize..hs + (i + 1) * SECTOR as usize];
            let logical = LogicalSector(header.first_sector.0 + i as u64);
            assert_eq!(
                sector_crc(header.chunk, logical, header.generation, s),
                *crc,
                "sector {} changed before the device write",
                logical.0
            );
        }
    }
}
