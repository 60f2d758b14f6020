//! One shard: a data area (file or block-device range) and an index, owned
//! by one executor.
//!
//! The data area is the source of truth; the index is a cache of it that is
//! made durable by periodic checkpoints, off the acknowledgement path.
//!
//! Write path, in this order (invariants 2 and 3):
//! 1. validate (`prepare_write`): limits, not fail-stopped, space; allocate the
//!    buffer the payload is received into;
//! 2. take the chunk's writer lock (per-chunk generation order), and wait
//!    while an abandoned write of the chunk waits for the erase of its
//!    header (`Inner::settle_abandoned`);
//! 3. read-modify-write the partial head/tail sector from the current version
//!    (crc-verified) or zeros;
//! 4. allocate a contiguous run from the reservation (in memory only; if the
//!    reservation is used up, wait for a checkpoint that extends it);
//! 5. assign a generation (recorded as in flight), compute every data
//!    sector's crc, encode the self-describing header;
//! 6. ONE device write of header + data (copy-on-write: never over live or
//!    quarantined sectors);
//! 7. group-commit `fdatasync` of the data area: the write is now durable AND
//!    findable (recovery scans the reservation for it);
//! 8. one index change (chunk meta + new extent record + split old records),
//!    applied to the in-memory index only (no sled call on this path);
//!    superseded sectors go to quarantine;
//! 9. acknowledge.
//!
//! So an ack costs one device write plus a (shared) flush, and no other
//! synchronous write. A crash before 7 completes leaves at most an extent
//! that recovery finds torn (a sector crc fails: discarded) or whole (then it
//! is replayed as if it had been acknowledged): all or nothing.
//!
//! Delete: the same steps with a one-sector tombstone extent instead of data
//! (one device write + flush), then one in-memory index change removing the
//! chunk's meta and extents and recording the tombstone.
//!
//! Checkpoint (background, or when the reservation runs out), see `recover`:
//! a. synchronously: take `replay_from` = the lowest in-flight generation (or
//!    the next one), the quarantine so far, extend the reservation, and put
//!    the checkpoint record (listing the in-flight runs and the reservation)
//!    into the in-memory index;
//! b. flush the index: every key changed since the last checkpoint and the
//!    record, as one atomic sled batch applied and flushed on the executor's
//!    blocking thread pool (see `index`);
//! c. only then hand the quarantined space to the reclaimer, which frees it
//!    once no read that may be looking at it is running ("reclaim: persist
//!    first, then change memory").
//!
//! Fail-stop (invariant 8): any error of the data `fdatasync` or of writing
//! the index's checkpoint batch sets the shard read-only for good: writes
//! and deletes answer `ReadOnly`, reads keep working. A flush is never
//! retried.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::sem::{Permit, Semaphore};
use shardstore_proto::{limits, ChunkId, ShardId};

use crate::alloc::{Allocator, Free, Reclaimer, Release, Run};
use crate::cache::ReadCache;
use crate::device::{DeviceRange, DmaStorage};
use crate::error::ShardError;
use crate::group::Group;
use crate::index::{Change, Checkpoint, ChunkMeta, ExtentRec, Index, TombRec, MAX_CHECKPOINT_RUNS};
use crate::layout::{
    crc_then_sector, header_sectors_for, sector_crc, sector_crc_from_plain, Crcs, DiskSector,
    ExtentHeader, ExtentKind, Generation, LogicalSector, Superblock, DATA_START_SECTOR, SECTOR,
};
use crate::locks::ChunkLocks;
use crate::prefetch::{Prefetcher, ReadHints, StreamHint};
use crate::read_data::ReadData;
use crate::recover::{self, RecoveryReport};
use crate::scrub::ScrubCounters;
use crate::sim::SimDisk;
use crate::storage::{Io, IoBuf, ReadBuf, Storage};

/// How to open a shard.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    pub shard: ShardId,
    pub shard_count: u32,
    pub node_id: u128,
    /// The shard's own folder (the caller passes DATA_DIR/shard-NNN); holds
    /// the index, and the data file unless `device` is set.
    pub dir: PathBuf,
    /// Data area size; the file is preallocated to this on creation. An
    /// existing file keeps the capacity it was formatted with. With a device
    /// range, the range's length (minus the superblocks) is used instead.
    pub capacity_bytes: u64,
    /// At most `limits::MAX_CHUNK_SIZE`.
    pub max_chunk_size: u64,
    /// sled page cache capacity. Reads never use sled (the index is in
    /// memory); checkpoint batches do, and a smaller cache measured slower
    /// checkpoints (100,000 chunks of 4 KiB at 32 writes in flight: 26-32 us
    /// per key with 4 MiB, 16-28 us with 16 MiB), so the default stays 16 MiB.
    pub index_cache_bytes: u64,
    /// Store the data area on this range of a block device instead of a file.
    pub device: Option<DeviceRange>,
    /// Format over a foreign or damaged superblock (destroys what was there).
    pub format: bool,
    /// Rebuild a missing or damaged index from the data area at open.
    pub rebuild_index: bool,
    /// Bytes written between checkpoints (bounds the recovery scan).
    /// Each checkpoint writes every index record changed since the last one
    /// to sled (off the shard thread, but on some core). The default 256 MiB
    /// is about 32,000 4 KiB writes (a header and a data sector each); a
    /// 64 MiB interval measured about a third of the shard process's CPU
    /// under 32 outstanding 4 KiB writes. The recovery scan it bounds reads
    /// at most this much (server setting `checkpoint_mib`).
    pub checkpoint_bytes: u64,
    /// Longest time between checkpoints while writes happen.
    pub checkpoint_interval_ms: u64,
    /// Period of a full scrub pass over live sectors (default one day); 0
    /// disables the scrubber.
    pub scrub_period_secs: u64,
    /// Write zeros over a new data file's area when formatting. A file
    /// preallocated with fallocate holds "unwritten" extents: the first
    /// write to each makes the next fdatasync commit a filesystem journal
    /// transaction, which measured about 2.7x slower per durable 4 KiB write
    /// on ext4 here. Not done for block devices (nothing to convert).
    pub zero_fill: bool,
    /// Group-commit flushes allowed in flight at once (see `group`). Keep
    /// it at 1 (the default, and what the server uses): Linux reports a
    /// write-back error to one fdatasync of an open file, so with several
    /// in flight, a later one may succeed and acknowledge writes before
    /// the one that got the error stops the shard. Only the engine
    /// benchmark (`examples/engine_bench.rs`, `FLUSHES`) raises it.
    pub max_flushes_in_flight: u32,
    /// Combined durable writes allowed at the device at once: durable
    /// extent writes that arrive while this many are in flight queue, and
    /// adjacent queued ones go out as one device write (see `combine`).
    /// 0 turns combining off.
    pub combine_in_flight: u32,
    /// For a shard thread that polls when idle (glommio's
    /// `spin_before_park`): while device writes or syncs run, give the core
    /// to kernel work every 20 us (see `poll`).
    pub yield_while_writing: bool,
    /// Open the data area with O_DSYNC: each extent write is durable when
    /// it completes, so the ack needs no separate flush and concurrent
    /// writes never wait for each other's flush. Off: writes are made
    /// durable by group-committed `fdatasync` (but see `adaptive_sync`).
    /// On by default (server `sync_mode = "dsync"`).
    pub write_through: bool,
    /// With `write_through` off: a write that finds no other data write in
    /// flight (nothing to share a flush with) goes out through a second,
    /// O_DSYNC descriptor and is durable when it completes, one device
    /// round trip instead of a write and then a flush; writes that overlap
    /// others join the group commit (server `sync_mode = "adaptive"`).
    /// Off by default: measured on this machine (2026-12-01, one shard,
    /// 4 KiB writes, interleaved runs) a median 25.9k writes/s at 32
    /// outstanding against 23.9k all-O_DSYNC, the same at depth 1, but with
    /// the shard process 93% busy instead of 69% (the fdatasyncs run on
    /// the process's io_uring workers, O_DSYNC's flushes on kernel threads).
    pub adaptive_sync: bool,
    /// This shard's slice of the read cache, bytes (0: no cache).
    pub cache_bytes: u64,
    /// Sequential read-ahead into the cache (needs a cache slice).
    pub prefetch: bool,
}

impl ShardConfig {
    pub const DEFAULT_INDEX_CACHE_BYTES: u64 = 16 << 20;
    pub const DEFAULT_CHECKPOINT_BYTES: u64 = 256 << 20;
    pub const DEFAULT_COMBINE_IN_FLIGHT: u32 = 8;

    /// Folder name of shard `id` inside the node's data dir: `shard-NNN`.
    pub fn folder_name(id: ShardId) -> String {
        format!("shard-{:03}", id.0)
    }
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            shard: ShardId(0),
            shard_count: 1,
            node_id: 0,
            dir: PathBuf::new(),
            capacity_bytes: 1 << 30,
            max_chunk_size: limits::MAX_CHUNK_SIZE,
            index_cache_bytes: Self::DEFAULT_INDEX_CACHE_BYTES,
            device: None,
            format: false,
            rebuild_index: false,
            checkpoint_bytes: Self::DEFAULT_CHECKPOINT_BYTES,
            checkpoint_interval_ms: 5000,
            scrub_period_secs: 24 * 3600,
            zero_fill: true,
            max_flushes_in_flight: 1,
            combine_in_flight: Self::DEFAULT_COMBINE_IN_FLIGHT,
            yield_while_writing: false,
            write_through: true,
            adaptive_sync: false,
            cache_bytes: 0,
            prefetch: true,
        }
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
    /// Every byte came from the cache (or was a hole): no device read.
    pub cached: bool,
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
    /// Extent writes that rode in another's device write (write combining).
    pub combined_writes: u64,
    /// Data-area `fdatasync`s.
    pub flushes: u64,
    pub corrupt_errors: u64,
    pub chunks: u64,
    /// Data area in use, headers, tombstones and not yet reclaimed space included.
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub fail_stopped: bool,
    pub deletes: u64,
    /// Durable index checkpoints (index flushes; never on the ack path).
    pub checkpoints: u64,
    /// Writes that had to wait for a checkpoint (reservation used up).
    pub checkpoint_waits: u64,
    /// The last checkpoint: how long it took, and the index records it wrote.
    pub last_checkpoint_us: u64,
    pub last_checkpoint_keys: u64,
    pub device_reads: u64,
    /// Last recovery at open: time, extents replayed, torn extents discarded.
    pub recovery_us: u64,
    pub recovery_replayed: u64,
    pub recovery_discarded: u64,
    pub scrub_passes: u64,
    pub scrub_sectors: u64,
    pub scrub_errors: u64,
    /// Tombstone records held (one sector each, see `sweep`).
    pub tombstones: u64,
    /// Tombstones retired by sweep passes, and old headers they erased.
    pub tombstones_retired: u64,
    pub sweep_passes: u64,
    pub sweep_erased: u64,
    pub cache: CacheStats,
}

/// The shard's read cache and read-ahead (sector counts are 4 KiB sectors).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub capacity_bytes: u64,
    pub bytes: u64,
    pub entries: u64,
    /// Sectors found in the cache by client reads, and read from disk.
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    /// Read requests served entirely from the cache, and the others.
    pub cached_reads: u64,
    pub uncached_reads: u64,
    pub prefetch_enabled: bool,
    /// Sectors read ahead, read ahead and then read by a client, and evicted
    /// unread.
    pub prefetch_issued: u64,
    pub prefetch_used: u64,
    pub prefetch_wasted: u64,
    /// Bytes of the read buffers the entries hold (at least `bytes`: a
    /// buffer stays while any of its sectors is cached), bounded to a
    /// small multiple of the capacity by giving sectors of mostly evicted
    /// buffers a copy of their own (`compacted` sectors so far).
    pub held_bytes: u64,
    pub compacted: u64,
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
    buf: IoBuf,
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
pub(crate) struct Counters {
    writes: Cell<u64>,
    reads: Cell<u64>,
    deletes: Cell<u64>,
    bytes_written: Cell<u64>,
    bytes_read: Cell<u64>,
    pub(crate) corrupt_errors: Cell<u64>,
    chunks: Cell<u64>,
    checkpoints: Cell<u64>,
    checkpoint_waits: Cell<u64>,
    last_checkpoint_us: Cell<u64>,
    last_checkpoint_keys: Cell<u64>,
    pub(crate) tombstones_retired: Cell<u64>,
    pub(crate) sweep_erased: Cell<u64>,
    pub(crate) sweep_passes: Cell<u64>,
}

pub(crate) fn bump(c: &Cell<u64>, by: u64) {
    c.set(c.get() + by);
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The per-core storage engine. `!Send`: lives in one executor, shared by
/// that executor's tasks through `Rc<Shard>`. Background tasks (checkpoints,
/// scrub) hold a weak reference and end when the shard is dropped. A
/// checkpoint already running holds a strong one until it ends (it runs in
/// a task of its own so that no cancelled caller cuts it), so the index
/// store stays open for that long after a drop: call `close` (which waits
/// for it) before opening the same folder again in the same process.
pub struct Shard {
    inner: Rc<Inner>,
}

impl Drop for Shard {
    fn drop(&mut self) {
        // Ends the eraser task (it waits on this semaphore and would
        // otherwise outlive the shard in its executor). Abandoned writes
        // not erased yet are left as a crash leaves them: in flight, for
        // recovery to decide.
        self.inner.abandon_signal.close();
    }
}

pub(crate) struct Inner {
    pub(crate) id: ShardId,
    pub(crate) node_id: u128,
    max_chunk_size: u64,
    pub(crate) capacity_sectors: u64,
    pub(crate) io: Io,
    pub(crate) index: Index,
    pub(crate) alloc: RefCell<Allocator>,
    reclaim: RefCell<Reclaimer>,
    /// Space unlinked since the last checkpoint began; reusable only after
    /// the next checkpoint is durable.
    quarantine: RefCell<Quarantine>,
    /// The last durable checkpoint's `replay_from` (see `sweep`).
    pub(crate) last_replay_from: Cell<u64>,
    /// Sectors a sweep pass zeroed but could not give back (it failed or was
    /// dropped before the zeros were made durable): the next pass syncs and
    /// frees them first.
    pub(crate) sweep_stranded: RefCell<Vec<u64>>,
    /// A sweep pass exists (from its start until it is dropped).
    pub(crate) sweep_running: Cell<bool>,
    /// See [`ShardConfig::adaptive_sync`].
    adaptive_sync: bool,
    /// Extent writes between their device write and their ack (flush
    /// included): a write that finds none may go out O_DSYNC alone.
    extent_writes: Cell<u32>,
    /// Sectors a running checkpoint took from the quarantine.
    releasing: Cell<u64>,
    /// Generations handed out whose index change is not applied yet, and
    /// the run each was written to.
    pub(crate) inflight: RefCell<BTreeMap<u64, Run>>,
    /// Generations that failed or were abandoned since the checkpoint
    /// before last: they keep `durable_below` under them until a durable
    /// checkpoint has moved `replay_from` past them.
    failed: RefCell<std::collections::BTreeSet<u64>>,
    /// Extent writes whose request failed or was cancelled: (generation,
    /// run), still in `inflight` until `erase_abandoned` has erased their
    /// headers; `abandon_signal` wakes the task that does.
    abandoned: RefCell<Vec<Abandoned>>,
    /// Chunks with abandoned writes waiting for their erase, and how many
    /// (see `Inner::settle_abandoned`).
    abandoned_chunks: RefCell<HashMap<ChunkId, u32>>,
    /// Abandoned writes the eraser holds (see `ErasingBatch`).
    erasing: Cell<usize>,
    /// One eraser at a time: the background one, or `close`.
    eraser_lock: Semaphore,
    /// This shard, for work that must outlive the request that starts it
    /// (a checkpoint: see `Inner::checkpoint`).
    me: Weak<Inner>,
    abandon_signal: Rc<Semaphore>,
    /// `MAX_WRITES_IN_FLIGHT` permits.
    write_slots: Semaphore,
    data_sync: Group,
    checkpoint_lock: Semaphore,
    /// A background checkpoint was spawned and has not finished.
    checkpoint_requested: Cell<bool>,
    /// Generation high-water at the last checkpoint, to skip idle ones.
    last_checkpoint_generation: Cell<u64>,
    checkpoint_sectors: u64,
    checkpoint_interval: Duration,
    pub(crate) next_generation: Cell<u64>,
    pub(crate) locks: ChunkLocks,
    fail_stopped: Cell<bool>,
    pub(crate) counters: Counters,
    pub(crate) scrub: ScrubCounters,
    recovery: Cell<RecoveryReport>,
    pub(crate) cache: ReadCache,
    pub(crate) prefetch: Prefetcher,
}

/// Abandoned writes waiting for their header to be erased, at most (see
/// `InflightGuard`'s drop).
const MAX_ABANDONED: usize = 1024;

/// Tries at erasing one abandoned write's header, `ERASE_RETRY` apart,
/// before giving up on it.
const ERASE_TRIES: u32 = 5;
const ERASE_RETRY: Duration = Duration::from_millis(10);

/// An extent write whose request failed or was cancelled, waiting for its
/// header to be erased (see `Inner::erase_abandoned`).
struct Abandoned {
    chunk: ChunkId,
    generation: u64,
    run: Run,
    failed_erases: u32,
    /// Erased (durably, once the batch's sync is done) or given up on.
    finished: bool,
}

/// Abandoned writes the eraser has taken from `Inner::abandoned`. Counted
/// in `Inner::erasing` (they are still in flight), and put back in the list
/// when dropped unfinished: an erase cancelled midway (a cancelled
/// `Shard::close`) loses none, which would leave them in flight for good.
struct ErasingBatch<'a> {
    inner: &'a Inner,
    items: Vec<Abandoned>,
}

impl<'a> ErasingBatch<'a> {
    /// Takes the abandoned writes whose device write has ended.
    fn take_ready(inner: &'a Inner) -> ErasingBatch<'a> {
        let mut list = inner.abandoned.borrow_mut();
        let (items, busy): (Vec<Abandoned>, Vec<Abandoned>) = std::mem::take(&mut *list)
            .into_iter()
            .partition(|a| !inner.io.being_written(a.run.start.0, a.run.len));
        *list = busy;
        inner.erasing.set(inner.erasing.get() + items.len());
        ErasingBatch { inner, items }
    }

    /// Ends the finished ones (after the sync that made their erases
    /// durable); true if some are left to try again.
    fn end_finished(&mut self) -> bool {
        let (done, left): (Vec<Abandoned>, Vec<Abandoned>) = std::mem::take(&mut self.items)
            .into_iter()
            .partition(|a| a.finished);
        self.inner
            .erasing
            .set(self.inner.erasing.get() - done.len());
        for a in done {
            self.inner.end_erased(a);
        }
        self.items = left;
        !self.items.is_empty()
    }
}

impl Drop for ErasingBatch<'_> {
    fn drop(&mut self) {
        let n = self.items.len();
        self.inner.erasing.set(self.inner.erasing.get() - n);
        let mut list = self.inner.abandoned.borrow_mut();
        for mut a in self.items.drain(..) {
            a.finished = false;
            list.push(a);
        }
    }
}

/// Extent writes (and deletes) between their space allocation and their
/// index change at once, at most; more wait. Each is a run the next
/// checkpoint must list for the recovery scan, and a checkpoint lists at
/// most `MAX_CHECKPOINT_RUNS` (with `MAX_ABANDONED` still in flight too,
/// and room left for the reservation's runs).
const MAX_WRITES_IN_FLIGHT: u64 = 2048;

/// Runs of the reservation at most, pending ones included. A fixed budget,
/// not what the writes in flight leave at the time: a reservation taken
/// while the shard is idle is still listed once thousands of writes are in
/// flight.
const MAX_RESERVED_RUNS: usize = 1024;
const _: () = assert!(
    MAX_WRITES_IN_FLIGHT as usize + MAX_ABANDONED + MAX_RESERVED_RUNS <= MAX_CHECKPOINT_RUNS
);

/// See [`Inner::begin_extent`].
struct InflightGuard<'a> {
    inner: &'a Inner,
    chunk: ChunkId,
    generation: u64,
    run: Run,
    armed: bool,
}

impl InflightGuard<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let waiting = self.inner.abandoned.borrow().len() + self.inner.erasing.get();
        if self.inner.fail_stopped.get() || waiting >= MAX_ABANDONED {
            // Stopped: nothing more is written. Too many waiting (a stalled
            // device, clients giving up): each holds an in-flight record
            // and a checkpoint lists at most MAX_CHECKPOINT_RUNS runs, so
            // this one is not erased. A hazard for a full rebuild, and until
            // the next checkpoint for recovery: a later write of its chunk
            // does not wait for it (see `settle_abandoned`), and both may
            // be replayed after a crash.
            self.inner.end_abandoned(self.generation, self.run);
            return;
        }
        // Its device write may have landed, or still land, whole: a
        // self-describing extent nothing indexes. It stays in flight (so
        // recovery after a crash still scans its run and decides) until the
        // eraser has zeroed its header, so that no later checkpoint lets a
        // full rebuild find it and show it (see `erase_abandoned`).
        *self
            .inner
            .abandoned_chunks
            .borrow_mut()
            .entry(self.chunk)
            .or_insert(0) += 1;
        self.inner.abandoned.borrow_mut().push(Abandoned {
            chunk: self.chunk,
            generation: self.generation,
            run: self.run,
            failed_erases: 0,
            finished: false,
        });
        self.inner.abandon_signal.signal(1);
    }
}

/// Ends a read's reclaim epoch, also when the read is cancelled.
pub(crate) struct ReadEpoch<'a> {
    shard: &'a Inner,
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

/// What `open` found in the data area's first sectors.
enum Found {
    Ours(Superblock),
    Blank,
    Foreign(String),
}

/// Opens sled on the executor's blocking thread pool, off the shard thread:
/// the threads sled starts (its flusher, and the first time its
/// process-wide I/O pool) inherit the CPU mask of the thread that opens it,
/// and the shard thread is pinned to its CPU.
///
/// sled locks its folder (`flock`) for as long as a handle to it lives. A
/// lock held by another process means a second server on the same data
/// folder: `ShardError::InUse`, never a reason to rebuild. Within one
/// process, sled lets go of a dropped database from its own threads a
/// little later, so a reopen right after a close (tests, an embedding
/// application) tries again for up to `INDEX_LOCK_WAIT` first.
async fn open_sled(cfg: &ShardConfig) -> Result<sled::Db, ShardError> {
    let config = sled::Config::new()
        .path(cfg.dir.join("index"))
        .cache_capacity(cfg.index_cache_bytes);
    let deadline = std::time::Instant::now() + INDEX_LOCK_WAIT;
    loop {
        let c = config.clone();
        let e = match glommio::executor().spawn_blocking(move || c.open()).await {
            Ok(db) => return Ok(db),
            Err(e) => e,
        };
        // sled reports its failed `flock` as ErrorKind::Other with this text.
        let locked =
            matches!(&e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"));
        if !locked {
            return Err(ShardError::Index(e));
        }
        if std::time::Instant::now() >= deadline {
            return Err(ShardError::InUse(format!(
                "{}: the shard's index is locked by another process (is another server using \
                 this data folder?): {e}",
                cfg.dir.display()
            )));
        }
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
}

/// How long an open waits for the index's lock (see `open_sled`).
const INDEX_LOCK_WAIT: Duration = Duration::from_secs(3);

pub(crate) fn rebuild_hint(cfg: &ShardConfig, why: &str) -> ShardError {
    ShardError::IndexMissing(format!(
        "{}: {why}; run `shardstore check --data-dir DATA_DIR --rebuild` (with `--device DEV` \
         if the node keeps its data on a block device) with the server stopped, \
         or start the server with --rebuild-index",
        cfg.dir.display()
    ))
}

impl Shard {
    /// Opens the shard on its data file (or device range) and sled index,
    /// creating and formatting them if new, and runs recovery.
    pub async fn open(cfg: ShardConfig) -> Result<Shard, ShardError> {
        validate_config(&cfg)?;
        std::fs::create_dir_all(&cfg.dir)
            .map_err(|e| ShardError::io(format!("creating {}", cfg.dir.display()), e))?;
        let storage: Box<dyn Storage> = match &cfg.device {
            Some(range) => Box::new(
                DmaStorage::open_range(range, cfg.write_through, cfg.adaptive_sync)
                    .await
                    .map_err(|e| {
                        ShardError::io(format!("opening device {}", range.path.display()), e)
                    })?,
            ),
            None => {
                let data_path = cfg.dir.join("data");
                Box::new(
                    DmaStorage::open(&data_path, cfg.write_through, cfg.adaptive_sync)
                        .await
                        .map_err(|e| {
                            ShardError::io(format!("opening {}", data_path.display()), e)
                        })?,
                )
            }
        };
        let index_existed = cfg.dir.join("index").exists();
        let db = match open_sled(&cfg).await {
            Ok(db) => db,
            Err(e @ ShardError::InUse(_)) => return Err(e),
            Err(e) if cfg.rebuild_index => {
                tracing::warn!(shard = cfg.shard.0, error = %e, "index does not open; discarding it to rebuild");
                let _ = std::fs::remove_dir_all(cfg.dir.join("index"));
                open_sled(&cfg).await?
            }
            Err(e) => {
                return Err(rebuild_hint(
                    &cfg,
                    &format!("the index does not open ({e})"),
                ))
            }
        };
        Self::open_with(cfg, storage, Index::new(db), index_existed).await
    }

    /// Opens the shard on a simulated disk (tests); the index lives in the
    /// disk's simulated key-value store.
    pub async fn open_sim(cfg: ShardConfig, disk: &SimDisk) -> Result<Shard, ShardError> {
        validate_config(&cfg)?;
        disk.set_write_through(cfg.write_through);
        let index = Index::new_mem(disk.kv());
        let existed = !index.is_empty();
        Self::open_with(cfg, Box::new(disk.clone()), index, existed).await
    }

    async fn open_with(
        cfg: ShardConfig,
        storage: Box<dyn Storage>,
        index: Index,
        index_existed: bool,
    ) -> Result<Shard, ShardError> {
        let started = Instant::now();
        let io = Io::new(storage, cfg.combine_in_flight);
        if cfg.yield_while_writing {
            crate::poll::spawn_write_yielder(&io);
        }
        let what = io.describe();
        let size = io
            .size_bytes()
            .await
            .map_err(|e| ShardError::io("reading the data area size", e))?;
        let found = if size < DATA_START_SECTOR * SECTOR {
            Found::Blank
        } else {
            let rr = io
                .read(DiskSector(0), DATA_START_SECTOR)
                .await
                .map_err(|e| ShardError::io("reading the superblock", e))?;
            let a = Superblock::decode(&rr[..SECTOR as usize]);
            let b = Superblock::decode(&rr[SECTOR as usize..]);
            match (a, b) {
                (Ok(sb), _) | (Err(_), Ok(sb)) => Found::Ours(sb),
                (Err(ea), Err(eb)) => {
                    if rr.iter().all(|&x| x == 0) {
                        Found::Blank
                    } else {
                        Found::Foreign(format!("copy A: {ea}; copy B: {eb}"))
                    }
                }
            }
        };
        let found = match found {
            Found::Ours(sb) if cfg.format && check_superblock(&sb, &cfg).is_err() => {
                Found::Foreign(format!(
                    "superblock of node {:032x} shard {}/{}",
                    sb.node_id, sb.shard.0, sb.shard_count
                ))
            }
            f => f,
        };
        let mut fresh = false;
        let superblock = match found {
            Found::Ours(sb) => sb,
            Found::Blank => {
                if cfg.device.is_some() && !cfg.format {
                    // Zeros where our superblock goes prove nothing on a
                    // device: a filesystem or volume may keep its
                    // signature elsewhere (btrfs at 64 KiB, a ZFS label
                    // past its first 8 KiB), and each shard sees only its
                    // own range. A device is taken only when asked.
                    return Err(ShardError::Format(format!(
                        "{what} holds no shardstore superblock: a block device is formatted \
                         only with --format (it may hold data whose signature lies elsewhere)"
                    )));
                }
                if !index.is_empty() {
                    return Err(ShardError::Format(format!(
                        "{what} holds no superblock but the index in {} is not empty: refusing to reformat",
                        cfg.dir.display()
                    )));
                }
                fresh = true;
                format_area(&io, &cfg, size).await?
            }
            Found::Foreign(why) => {
                if !cfg.format {
                    return Err(ShardError::Format(format!(
                        "{what}: no valid superblock of this shard ({why}); it may hold someone else's data. \
                         Start with --format to overwrite it"
                    )));
                }
                tracing::warn!(shard = cfg.shard.0, what = %what, why = %why, "--format: overwriting a foreign or damaged superblock");
                index.clear()?;
                fresh = true;
                format_area(&io, &cfg, size).await?
            }
        };
        check_superblock(&superblock, &cfg)?;
        let needed = (DATA_START_SECTOR + superblock.capacity_sectors) * SECTOR;
        let size = io
            .size_bytes()
            .await
            .map_err(|e| ShardError::io("reading the data area size", e))?;
        if size < needed {
            return Err(ShardError::Format(format!(
                "{what} has {size} bytes but its superblock needs {needed}"
            )));
        }
        if cfg.device.is_none()
            && superblock.capacity_sectors * SECTOR != cfg.capacity_bytes / SECTOR * SECTOR
        {
            tracing::warn!(
                shard = cfg.shard.0,
                formatted_bytes = superblock.capacity_sectors * SECTOR,
                configured_bytes = cfg.capacity_bytes,
                "capacity differs from the configuration; keeping the formatted capacity"
            );
        }
        let area = Run {
            start: DiskSector(DATA_START_SECTOR),
            len: superblock.capacity_sectors,
        };
        let checkpoint_sectors = (cfg.checkpoint_bytes / SECTOR).max(64).min(area.len.max(1));
        let inner = Rc::new_cyclic(|me| Inner {
            me: me.clone(),
            id: cfg.shard,
            node_id: cfg.node_id,
            max_chunk_size: cfg.max_chunk_size,
            capacity_sectors: superblock.capacity_sectors,
            io,
            index,
            alloc: RefCell::new(Allocator::new(area)),
            reclaim: RefCell::new(Reclaimer::new()),
            quarantine: RefCell::new(Quarantine::default()),
            last_replay_from: Cell::new(0),
            sweep_stranded: RefCell::new(Vec::new()),
            sweep_running: Cell::new(false),
            adaptive_sync: cfg.adaptive_sync,
            extent_writes: Cell::new(0),
            releasing: Cell::new(0),
            inflight: RefCell::new(BTreeMap::new()),
            failed: RefCell::new(std::collections::BTreeSet::new()),
            abandoned: RefCell::new(Vec::new()),
            abandoned_chunks: RefCell::new(HashMap::new()),
            erasing: Cell::new(0),
            eraser_lock: Semaphore::new(1),
            abandon_signal: Rc::new(Semaphore::new(0)),
            write_slots: Semaphore::new(MAX_WRITES_IN_FLIGHT),
            data_sync: Group::with_max_in_flight(cfg.max_flushes_in_flight),
            checkpoint_lock: Semaphore::new(1),
            checkpoint_requested: Cell::new(false),
            last_checkpoint_generation: Cell::new(0),
            checkpoint_sectors,
            checkpoint_interval: Duration::from_millis(cfg.checkpoint_interval_ms.max(1)),
            next_generation: Cell::new(1),
            locks: ChunkLocks::default(),
            fail_stopped: Cell::new(false),
            counters: Counters::default(),
            scrub: ScrubCounters::default(),
            recovery: Cell::new(RecoveryReport::default()),
            cache: ReadCache::new(cfg.cache_bytes),
            prefetch: Prefetcher::new(cfg.prefetch, cfg.cache_bytes),
        });

        let checkpoint = inner.index.load();
        let report = match checkpoint {
            _ if fresh => RecoveryReport::default(),
            Ok(Some(ck)) => match recover::recover(&inner, &ck).await {
                Ok(r) => r,
                Err(e @ ShardError::IndexCorrupt(_)) if !cfg.rebuild_index => {
                    return Err(rebuild_hint(&cfg, &format!("the index is damaged ({e})")))
                }
                Err(ShardError::IndexCorrupt(_)) => recover::rebuild(&inner).await?,
                Err(e) => return Err(e),
            },
            Ok(None) | Err(ShardError::IndexCorrupt(_)) if cfg.rebuild_index => {
                recover::rebuild(&inner).await?
            }
            Ok(None) => {
                let why = if index_existed {
                    "the index has no checkpoint record (damaged, or not written by this version)"
                } else {
                    "the index is missing"
                };
                return Err(rebuild_hint(&cfg, why));
            }
            Err(e @ ShardError::IndexCorrupt(_)) => {
                return Err(rebuild_hint(&cfg, &format!("the index is damaged ({e})")))
            }
            Err(e) => return Err(e),
        };
        let mut report = report;
        // A first checkpoint: records the generation high-water and the
        // reservation new writes will come from.
        inner.checkpoint(1).await?;
        report.elapsed_us = started.elapsed().as_micros() as u64;
        inner.recovery.set(report);
        inner.counters.chunks.set(report.chunks);
        tracing::info!(
            shard = cfg.shard.0,
            storage = %what,
            fresh,
            chunks = report.chunks,
            used_sectors = inner.alloc.borrow().used_sectors(),
            capacity_sectors = superblock.capacity_sectors,
            next_generation = inner.next_generation.get(),
            recovery_us = report.elapsed_us,
            scanned_sectors = report.scanned_sectors,
            replayed_extents = report.replayed,
            replayed_tombstones = report.replayed_tombstones,
            already_indexed = report.already_indexed,
            discarded_torn = report.discarded,
            damaged_kept = report.damaged_kept,
            rebuilt = report.rebuilt,
            "shard opened"
        );
        spawn_checkpointer(Rc::downgrade(&inner));
        spawn_eraser(Rc::downgrade(&inner), inner.abandon_signal.clone());
        if cfg.scrub_period_secs > 0 {
            crate::scrub::spawn(
                Rc::downgrade(&inner),
                Duration::from_secs(cfg.scrub_period_secs),
            );
        }
        Ok(Shard { inner })
    }

    pub fn id(&self) -> ShardId {
        self.inner.id
    }

    /// What the last recovery at open did.
    pub fn recovery_report(&self) -> RecoveryReport {
        self.inner.recovery.get()
    }

    /// Validates a write and allocates the buffer its payload is received into.
    pub fn prepare_write(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: u32,
    ) -> Result<PendingWrite, ShardError> {
        self.inner.prepare_write(chunk, offset, len)
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
    pub async fn commit_write(&self, w: PendingWrite) -> Result<WriteOutcome, ShardError> {
        let out = self.inner.commit_write(w).await;
        self.inner.maybe_checkpoint_soon();
        out
    }

    /// Reads up to `len` bytes at `offset`; short at the end of the chunk.
    pub async fn read(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: u32,
    ) -> Result<ReadOutcome, ShardError> {
        self.read_with(chunk, offset, len, ReadHints::default())
            .await
    }

    /// [`Shard::read`] with what the client said about the read (it may
    /// continue a stream into the next chunk id: see `prefetch`).
    pub async fn read_with(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: u32,
        hints: ReadHints,
    ) -> Result<ReadOutcome, ShardError> {
        self.inner.prefetch.on_read(
            &self.inner,
            chunk,
            offset,
            offset.saturating_add(u64::from(len)),
            hints,
        );
        self.inner.read(chunk, offset, len).await
    }

    /// Answers a READ at once when it needs no device I/O (every sector is
    /// cached, or the range is empty, or the request fails): `None` means
    /// "use [`Shard::read`]". Lets a server answer cache hits inline.
    pub fn read_now(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: u32,
    ) -> Option<Result<ReadOutcome, ShardError>> {
        self.read_now_with(chunk, offset, len, ReadHints::default())
    }

    /// [`Shard::read_now`] with the client's [`ReadHints`].
    pub fn read_now_with(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: u32,
        hints: ReadHints,
    ) -> Option<Result<ReadOutcome, ShardError>> {
        let out = self.inner.read_now(chunk, offset, len)?;
        self.inner.prefetch.on_read(
            &self.inner,
            chunk,
            offset,
            offset.saturating_add(u64::from(len)),
            hints,
        );
        Some(out)
    }

    /// Routes read-ahead hints for chunks this shard does not own (a marked
    /// stream crossing into the next chunk id, see `prefetch`): `f` returns
    /// true when it took the hint. Without one, every hint is taken here.
    pub fn set_stream_forwarder(&self, f: impl Fn(StreamHint) -> bool + 'static) {
        self.inner.prefetch.set_forwarder(Box::new(f));
    }

    /// A stream hint from another shard for a chunk of this one.
    pub fn accept_stream_hint(&self, h: StreamHint) {
        self.inner.prefetch.accept(&self.inner, h);
    }

    /// Whether reads can be served from a cache (see [`Shard::read_now`]).
    pub fn has_cache(&self) -> bool {
        self.inner.cache.enabled()
    }

    /// Metadata of a chunk.
    pub fn stat(&self, chunk: ChunkId) -> Result<ChunkStat, ShardError> {
        let m = self
            .inner
            .index
            .get_meta(chunk)
            .ok_or(ShardError::NotFound(chunk))?;
        Ok(ChunkStat {
            chunk_len: m.len,
            version: m.version,
            created_ns: m.created_ns,
            modified_ns: m.modified_ns,
            allocated_bytes: m.live_sectors * SECTOR,
        })
    }

    /// Deletes a chunk; durable on Ok (a tombstone in the data area). Returns
    /// the version it had.
    pub async fn delete(&self, chunk: ChunkId) -> Result<u64, ShardError> {
        let out = self.inner.delete(chunk).await;
        self.inner.maybe_checkpoint_soon();
        out
    }

    /// Up to `limit` chunks (at most `MAX_LIST_LIMIT`) in id order after
    /// `after`, and whether more follow.
    pub fn list(
        &self,
        after: Option<ChunkId>,
        limit: u32,
    ) -> Result<(Vec<ListItem>, bool), ShardError> {
        let limit = limit.min(limits::MAX_LIST_LIMIT) as usize;
        let mut metas = self.inner.index.metas_after(after, limit + 1);
        let more = metas.len() > limit;
        metas.truncate(limit);
        let items = metas
            .into_iter()
            .map(|(chunk, m)| ListItem {
                chunk,
                chunk_len: m.len,
                version: m.version,
            })
            .collect();
        Ok((items, more))
    }

    pub fn stats(&self) -> ShardStats {
        let s = &self.inner;
        let dev = s.io.counters();
        let c = &s.counters;
        let r = s.recovery.get();
        ShardStats {
            writes: c.writes.get(),
            reads: c.reads.get(),
            bytes_written: c.bytes_written.get(),
            bytes_read: c.bytes_read.get(),
            device_writes: dev.writes,
            combined_writes: dev.combined_writes,
            flushes: dev.flushes,
            corrupt_errors: c.corrupt_errors.get(),
            chunks: c.chunks.get(),
            used_bytes: s.alloc.borrow().used_sectors() * SECTOR,
            capacity_bytes: s.capacity_sectors * SECTOR,
            fail_stopped: s.fail_stopped.get(),
            deletes: c.deletes.get(),
            checkpoints: c.checkpoints.get(),
            checkpoint_waits: c.checkpoint_waits.get(),
            last_checkpoint_us: c.last_checkpoint_us.get(),
            last_checkpoint_keys: c.last_checkpoint_keys.get(),
            device_reads: dev.reads,
            recovery_us: r.elapsed_us,
            recovery_replayed: r.replayed + r.replayed_tombstones,
            recovery_discarded: r.discarded,
            scrub_passes: s.scrub.passes.get(),
            scrub_sectors: s.scrub.sectors.get(),
            scrub_errors: s.scrub.errors.get(),
            tombstones: s.index.tomb_count(),
            tombstones_retired: s.counters.tombstones_retired.get(),
            sweep_passes: s.counters.sweep_passes.get(),
            sweep_erased: s.counters.sweep_erased.get(),
            cache: s.cache_stats(),
        }
    }

    /// Runs one scrub pass over every live sector now (also used by tests);
    /// returns the number of bad sectors found.
    pub async fn scrub_now(&self) -> Result<u64, ShardError> {
        Ok(crate::scrub::pass(&self.inner, None).await)
    }

    /// Runs one sweep pass now (see `sweep`): erases old headers of deleted
    /// chunks from the free space and retires the tombstones that no longer
    /// hide anything.
    pub async fn sweep_now(&self) -> Result<crate::SweepReport, ShardError> {
        self.inner.sweep().await
    }

    /// Tombstone records in the index.
    pub fn tombstones(&self) -> u64 {
        self.inner.index.tomb_count()
    }

    /// Verifies every live extent and tombstone (offline `check`).
    pub async fn verify(&self) -> Result<recover::VerifyReport, ShardError> {
        recover::verify(&self.inner).await
    }

    /// Takes a durable index checkpoint now (normally done in the
    /// background): quarantined space becomes reusable, and the recovery
    /// scan restarts from here.
    pub async fn checkpoint(&self) -> Result<(), ShardError> {
        self.inner.checkpoint(1).await
    }

    /// Takes a checkpoint and syncs the data area. Call when no operation is
    /// in flight; the shard can then be dropped.
    pub async fn close(&self) -> Result<(), ShardError> {
        self.inner.io.quiesce().await;
        if !self.inner.fail_stopped.get() {
            self.inner.erase_abandoned().await?;
            self.inner.checkpoint(1).await?;
            // Through the group: a failure stops the shard, never retried.
            self.inner.sync_data("fdatasync at close").await?;
        }
        tracing::info!(shard = self.inner.id.0, "shard closed");
        Ok(())
    }
}

/// Background checkpoints: every interval while something changed, and soon
/// after the reservation runs low (see `maybe_checkpoint_soon`).
fn spawn_checkpointer(weak: Weak<Inner>) {
    glommio::spawn_local(async move {
        loop {
            let interval = match weak.upgrade() {
                Some(s) => s.checkpoint_interval,
                None => return,
            };
            glommio::timer::sleep(interval).await;
            let Some(s) = weak.upgrade() else { return };
            if s.fail_stopped.get() {
                return;
            }
            // Index changes applied after the last checkpoint took its
            // snapshot (a write in flight then) count as activity too.
            let idle = s.next_generation.get() == s.last_checkpoint_generation.get()
                && s.quarantine.borrow().frees.is_empty()
                && s.index.is_clean();
            if !idle {
                // Already a task of its own: nothing cancels it midway.
                if let Err(e) = s.checkpoint_to_end(1, None).await {
                    tracing::error!(shard = s.id.0, error = %e, "background checkpoint failed");
                }
            }
        }
    })
    .detach();
}

/// Erases the headers of abandoned extent writes whenever a request gives
/// one up (see `InflightGuard`). Ends when the shard is dropped or closed.
fn spawn_eraser(weak: Weak<Inner>, signal: Rc<Semaphore>) {
    glommio::spawn_local(async move {
        while signal.acquire(1).await.is_ok() {
            let Some(s) = weak.upgrade() else { return };
            if let Err(e) = s.erase_abandoned().await {
                tracing::error!(shard = s.id.0, error = %e, "erasing abandoned extent headers failed");
            }
        }
    })
    .detach();
}

/// Decrements a counter when dropped (also when the future holding it is).
pub(crate) struct DecrementOnDrop<'a>(pub(crate) &'a Cell<u32>);

impl Drop for DecrementOnDrop<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// Space unlinked since the last checkpoint began, and its size in sectors
/// (kept as a sum: every write asks for it, see `quarantined_sectors`).
#[derive(Default)]
struct Quarantine {
    frees: Vec<Free>,
    sectors: u64,
    /// While a sweep pass runs: runs of extent writes that failed or were
    /// abandoned, held back from the next checkpoint until the pass has
    /// read them (see `sweep`). None: no pass is running.
    held: Option<Vec<Run>>,
    held_sectors: u64,
}

impl Quarantine {
    fn push(&mut self, f: Free) {
        self.sectors += f.sectors();
        self.frees.push(f);
    }

    /// A failed write's run (it may hold anything, an old header of a
    /// deleted chunk included).
    fn push_failed(&mut self, run: Run) {
        match &mut self.held {
            Some(held) => {
                held.push(run);
                self.held_sectors += run.len;
            }
            None => self.push(Free::Run(run)),
        }
    }

    /// What a checkpoint takes (held runs stay).
    fn take_frees(&mut self) -> Vec<Free> {
        self.sectors = 0;
        std::mem::take(&mut self.frees)
    }
}

fn free_sectors_of(frees: &[Free]) -> u64 {
    frees.iter().map(Free::sectors).sum()
}

/// Starts a background checkpoint if the reservation runs low and none is running.
fn maybe_checkpoint(inner: &Rc<Inner>) {
    // Early (at a quarter used): an index flush can take long under load,
    // and writers must not run out of reservation meanwhile. Against what
    // a checkpoint could reserve: on a nearly full (or small) shard the
    // free space is below the target for good, and comparing with the
    // target alone started a checkpoint after every write.
    let low = {
        let alloc = inner.alloc.borrow();
        let reserved = alloc.reserved_sectors();
        // (Free space includes the reservation.)
        let reachable = inner.checkpoint_sectors.min(alloc.free_sectors());
        reserved < reachable / 4 * 3
    };
    if low
        && inner.checkpoint_lock.available() > 0
        && !inner.checkpoint_requested.replace(true)
        && !inner.fail_stopped.get()
    {
        let s = inner.clone();
        glommio::spawn_local(async move {
            let res = s.checkpoint_to_end(1, None).await;
            s.checkpoint_requested.set(false);
            if let Err(e) = res {
                tracing::error!(shard = s.id.0, error = %e, "checkpoint failed");
            }
        })
        .detach();
    }
}

impl Inner {
    fn maybe_checkpoint_soon(self: &Rc<Self>) {
        maybe_checkpoint(self);
    }

    /// Zeroes the header sector of every abandoned extent write whose device
    /// write has ended, makes that durable, and only then ends its in-flight
    /// record and quarantines its run like any failed write's. Until then
    /// the generation keeps `replay_from` at or below it, so a crash leaves
    /// the run to recovery (replayed whole if it landed whole, an outcome
    /// its failed request allows; discarded and erased if torn). Without
    /// this, a complete extent of a cancelled request would outlive the
    /// checkpoints, and a full rebuild would show it.
    pub(crate) async fn erase_abandoned(&self) -> Result<(), ShardError> {
        let _one = self
            .eraser_lock
            .acquire_permit(1)
            .await
            .map_err(|e| ShardError::Internal(format!("eraser lock closed: {e}")))?;
        let res = self.erase_abandoned_until_stopped().await;
        if self.fail_stopped.get() {
            // No more writes, nor checkpoints: nothing is erased, and
            // nothing may wait for these to leave `inflight` (a sweep does).
            let left = std::mem::take(&mut *self.abandoned.borrow_mut());
            for a in left {
                self.end_erased(a);
            }
        }
        res
    }

    /// Waits for one of the `MAX_WRITES_IN_FLIGHT` places of extent writes.
    async fn write_slot(&self) -> Result<Permit<&Semaphore>, ShardError> {
        self.write_slots
            .acquire_permit(1)
            .await
            .map_err(|e| ShardError::Internal(format!("write slots closed: {e}")))
    }

    /// An abandoned write the eraser is done with (erased durably, given up
    /// on, or the shard stopped): see `end_abandoned`; writes of its chunk
    /// may go on.
    fn end_erased(&self, a: Abandoned) {
        let mut chunks = self.abandoned_chunks.borrow_mut();
        if let Some(n) = chunks.get_mut(&a.chunk) {
            *n -= 1;
            if *n == 0 {
                chunks.remove(&a.chunk);
            }
        }
        drop(chunks);
        self.end_abandoned(a.generation, a.run);
    }

    /// Waits until no abandoned write of `chunk` waits for the erase of its
    /// header (called with the chunk's lock held, before a write or delete
    /// of it reads its meta). Such a write may have landed whole; a later
    /// write computes the chunk's length and version without it, so if
    /// both were found after a crash, recovery would replay both and show
    /// part of the abandoned one. Once its header is erased (durably) it
    /// cannot be found. Waits at most for the eraser (a write and a flush,
    /// a few retries if those fail), and not at all in the common case.
    async fn settle_abandoned(&self, chunk: ChunkId) -> Result<(), ShardError> {
        let mut pause = Duration::from_micros(50);
        while self.abandoned_chunks.borrow().contains_key(&chunk) {
            self.check_writable()?;
            glommio::timer::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(5));
        }
        Ok(())
    }

    /// An abandoned write leaves `inflight` as a failed one; its run goes
    /// to the quarantine unless the shard has stopped.
    fn end_abandoned(&self, generation: u64, run: Run) {
        self.inflight.borrow_mut().remove(&generation);
        self.failed.borrow_mut().insert(generation);
        if !self.fail_stopped.get() {
            self.quarantine.borrow_mut().push_failed(run);
        }
    }

    async fn erase_abandoned_until_stopped(&self) -> Result<(), ShardError> {
        loop {
            if self.fail_stopped.get() {
                return Ok(());
            }
            let seen = self.io.writes_ended();
            let mut batch = ErasingBatch::take_ready(self);
            if batch.items.is_empty() {
                drop(batch);
                if self.abandoned.borrow().is_empty() {
                    return Ok(());
                }
                self.io.write_ended_since(seen).await;
                continue;
            }
            let mut erased = 0;
            for a in batch.items.iter_mut() {
                match self.io.write_zero_sector(a.run.start).await {
                    Ok(()) => {
                        a.finished = true;
                        erased += 1;
                    }
                    // Tried again a few times. The write that failed there
                    // may keep failing (ENOSPC on a full copy-on-write
                    // filesystem, a bad sector): then give up on this
                    // header rather than stop the shard. It stays a hazard
                    // for a full rebuild, and until the next checkpoint for
                    // recovery (as for MAX_ABANDONED in `InflightGuard`).
                    Err(e) => {
                        a.failed_erases += 1;
                        if a.failed_erases >= ERASE_TRIES {
                            tracing::warn!(
                                shard = self.id.0,
                                error = %e,
                                sector = a.run.start.0,
                                "could not erase the header of an abandoned write"
                            );
                            a.finished = true;
                        }
                    }
                }
            }
            if erased > 0 {
                // Failed: the batch goes back to the list as it is.
                self.sync_data("fdatasync of erased headers").await?;
            }
            let retry = batch.end_finished();
            drop(batch);
            if retry {
                glommio::timer::sleep(ERASE_RETRY).await;
            }
        }
    }

    pub(crate) fn check_writable(&self) -> Result<(), ShardError> {
        // Also when every request it carried, or that waited for the flush,
        // was cancelled.
        let failure = (self.io.durable_write_failure()).or_else(|| self.data_sync.failure());
        if let Some(failure) = failure {
            self.fail_stop("a durable write or flush of the data area", &failure);
        }
        if self.fail_stopped.get() {
            Err(ShardError::ReadOnly)
        } else {
            Ok(())
        }
    }

    pub(crate) fn fail_stop(&self, what: &str, err: &dyn std::fmt::Display) {
        if !self.fail_stopped.replace(true) {
            tracing::error!(shard = self.id.0, error = %err, what, "failed: shard is now read-only (fail-stop)");
        }
    }

    /// Sectors that come back at the next checkpoint (quarantined, or taken
    /// by a checkpoint in progress).
    fn quarantined_sectors(&self) -> u64 {
        let q = self.quarantine.borrow();
        debug_assert_eq!(q.sectors, free_sectors_of(&q.frees));
        q.sectors + q.held_sectors + self.releasing.get() + self.reclaim.borrow().pending_sectors()
    }

    fn no_space(&self, needed_sectors: u64) -> ShardError {
        let alloc = self.alloc.borrow();
        ShardError::NoSpace {
            needed_bytes: needed_sectors * SECTOR,
            free_bytes: alloc.free_sectors() * SECTOR,
        }
    }

    /// Sectors data writes leave free so that deletes (one tombstone sector
    /// each) still work on a full shard.
    fn delete_reserve(&self) -> u64 {
        (self.capacity_sectors / 16).clamp(1, 64)
    }

    fn prepare_write(
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
        // Quarantined space comes back at the next checkpoint.
        if self.alloc.borrow().free_sectors() + self.quarantined_sectors()
            < total + self.delete_reserve()
        {
            return Err(self.no_space(total));
        }
        Ok(PendingWrite {
            chunk,
            offset,
            len,
            first: LogicalSector(first),
            sectors,
            header_sectors,
            buf: self.io.alloc_buffer(total),
        })
    }

    /// Takes a run for a new extent from the reservation, waiting for a
    /// checkpoint that extends it if needed (backpressure, not on the normal
    /// ack path).
    /// `keep`: sectors that must stay free afterwards.
    async fn allocate_run(&self, total: u64, keep: u64) -> Result<DiskSector, ShardError> {
        let fits = |s: &Self| s.alloc.borrow().free_sectors() >= total + keep;
        if fits(self) {
            if let Some(at) = self.alloc.borrow_mut().allocate(total) {
                return Ok(at);
            }
        }
        bump(&self.counters.checkpoint_waits, 1);
        // The first checkpoint makes quarantined space free, the second
        // reserves it. Free once the reads that may still look at it have
        // ended (the reclaimer): waited for between the two, or the second
        // finds nothing to reserve.
        for round in 0..2 {
            self.checkpoint_for(total).await?;
            self.check_writable()?;
            if round == 0 {
                self.reclaimed().await;
            }
            if fits(self) {
                if let Some(at) = self.alloc.borrow_mut().allocate(total) {
                    return Ok(at);
                }
            }
        }
        Err(self.no_space(total))
    }

    /// Every generation below this one was durable or failed (see
    /// `ExtentHeader::durable_below`).
    fn durable_below(&self) -> u64 {
        let a = self.inflight.borrow().keys().next().copied();
        let b = self.failed.borrow().iter().next().copied();
        match (a, b) {
            (Some(a), Some(b)) => a.min(b),
            (Some(x), None) | (None, Some(x)) => x,
            (None, None) => self.next_generation.get(),
        }
    }

    /// Hands out the next generation for an extent written to `run`. The
    /// guard keeps it in flight until the index change is applied; if the
    /// request is cancelled (or fails) before that, the guard hands the
    /// never-referenced run to the eraser, which erases its header once its
    /// device write has ended, then ends the in-flight record and
    /// quarantines the run (see `erase_abandoned`).
    fn begin_extent(&self, chunk: ChunkId, run: Run) -> (Generation, InflightGuard<'_>) {
        let g = self.next_generation.get();
        self.next_generation.set(g + 1);
        self.inflight.borrow_mut().insert(g, run);
        (
            Generation(g),
            InflightGuard {
                inner: self,
                chunk,
                generation: g,
                run,
                armed: true,
            },
        )
    }

    /// Writes an encoded extent and waits for the grouped flush: steps 6-7.
    /// On an error the caller's [`InflightGuard`] quarantines the run.
    async fn write_extent(&self, chunk: ChunkId, run: Run, buf: IoBuf) -> Result<(), ShardError> {
        // Alone: no other extent write to share a flush with, so one
        // O_DSYNC write (one device round trip) beats a write then a flush.
        let alone = self.extent_writes.get() == 0;
        self.extent_writes.set(self.extent_writes.get() + 1);
        let _counted = DecrementOnDrop(&self.extent_writes);
        let write_through =
            self.io.write_through() || (self.adaptive_sync && alone && self.io.can_write_durable());
        let res = if write_through {
            self.io.write_durable(run.start, buf).await
        } else {
            self.io.write(run.start, buf).await
        };
        if let Err(e) = res {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                return Err(self.no_space(run.len));
            }
            if write_through {
                // With O_DSYNC a failed write is a failed flush too: what
                // reached the media is unknown. Fail-stop, never retried.
                self.fail_stop("O_DSYNC write of the data area", &e);
            }
            return Err(ShardError::io(
                format!(
                    "writing an extent of chunk {chunk} at sector {}",
                    run.start.0
                ),
                e,
            ));
        }
        if write_through {
            return Ok(());
        }
        self.sync_data("fdatasync of the data area").await?;
        Ok(())
    }

    /// A group-committed `fdatasync` of the data area. After a failed one
    /// nothing written since the last good one can be trusted, and the
    /// shard stops writing (fail-stop, never retried).
    pub(crate) async fn sync_data(&self, what: &str) -> Result<(), ShardError> {
        let flush = || {
            let io = self.io.clone();
            async move { io.sync().await }
        };
        if let Err(e) = self.data_sync.sync(flush).await {
            self.fail_stop(what, &e);
            return Err(ShardError::io(what.to_string(), e));
        }
        // A durable (O_DSYNC) write that failed meanwhile stopped the shard
        // outside this group (its failure is a failed flush too): what this
        // flush covered is not acknowledged after the stop.
        self.check_writable()
    }

    /// Applies an index change (in memory only: the data area is the durable
    /// copy until the next checkpoint) and quarantines what it unlinked.
    fn apply_index(&self, generation: Generation, change: Change, frees: Vec<Free>) {
        change.apply(&self.index);
        self.inflight.borrow_mut().remove(&generation.0);
        let mut q = self.quarantine.borrow_mut();
        for f in frees {
            q.push(f);
        }
    }

    /// The index change for a durable data extent `h` written at `at`, given
    /// the chunk's current meta: split the records it covers, add its own.
    /// Used by the write path and by recovery (which must produce the same).
    pub(crate) fn data_extent_change(
        &self,
        h: &ExtentHeader,
        at: DiskSector,
        old: Option<ChunkMeta>,
    ) -> Result<(Change, Vec<Free>, ChunkMeta), ShardError> {
        let chunk = h.chunk;
        let hs = h.header_sectors();
        let new_first = h.first_sector.0;
        let new_end = new_first + h.crcs.len() as u64;
        let mut change = Change::new();
        let mut frees = Vec::new();
        let mut superseded = 0u64;
        for rec in self.index.overlapping(chunk, new_first, new_end) {
            change.remove_extent(chunk, rec.logical);
            if rec.logical.0 < new_first {
                change.put_extent(chunk, rec.slice(rec.logical.0, new_first));
            }
            if rec.end() > new_end {
                change.put_extent(chunk, rec.slice(new_end, rec.end()));
            }
            let from = rec.logical.0.max(new_first);
            let to = rec.end().min(new_end);
            let disk_from = rec.disk.0 + (from - rec.logical.0);
            self.cache.forget(rec.generation.0, disk_from, to - from);
            frees.push(Free::Piece(Release {
                header: rec.header,
                data: Run {
                    start: DiskSector(rec.disk.0 + (from - rec.logical.0)),
                    len: to - from,
                },
            }));
            superseded += to - from;
        }
        let rec = ExtentRec {
            logical: h.first_sector,
            disk: DiskSector(at.0 + hs),
            header: at,
            header_sectors: hs,
            generation: h.generation,
            crcs: h.crcs.clone(),
        };
        change.put_extent(chunk, rec);
        let live_before = old.map_or(0, |m| m.live_sectors);
        if live_before < superseded {
            return Err(ShardError::IndexCorrupt(format!(
                "chunk {chunk}: {superseded} sectors superseded but only {live_before} live"
            )));
        }
        let meta = ChunkMeta {
            len: h.chunk_len,
            version: h.version,
            created_ns: h.created_ns,
            modified_ns: h.timestamp_ns,
            live_sectors: live_before - superseded + h.crcs.len() as u64,
            generation: h.generation.0,
        };
        change.put_meta(chunk, meta);
        Ok((change, frees, meta))
    }

    /// The index change for a durable tombstone `h` at `at`.
    pub(crate) fn tombstone_change(
        &self,
        h: &ExtentHeader,
        at: DiskSector,
    ) -> Result<(Change, Vec<Free>), ShardError> {
        let chunk = h.chunk;
        let mut change = Change::new();
        let mut frees = Vec::new();
        change.remove_meta(chunk);
        self.prefetch.forget(chunk);
        for r in self.index.chunk_extents(chunk) {
            self.cache.forget(r.generation.0, r.disk.0, r.count());
            change.remove_extent(chunk, r.logical);
            frees.push(Free::Piece(Release {
                header: r.header,
                data: Run {
                    start: r.disk,
                    len: r.count(),
                },
            }));
        }
        // The newer tombstone covers everything the older one did.
        if let Some(old) = self.index.get_tomb(chunk) {
            frees.push(Free::Run(Run {
                start: old.disk,
                len: 1,
            }));
        }
        change.put_tomb(
            chunk,
            TombRec {
                generation: h.generation,
                disk: at,
                version: h.version,
            },
        );
        Ok((change, frees))
    }

    async fn commit_write(&self, mut w: PendingWrite) -> Result<WriteOutcome, ShardError> {
        self.check_writable()?;
        let chunk = w.chunk;
        let _slot = self.write_slot().await?;
        let _lock = self.locks.lock(chunk).await?;
        self.settle_abandoned(chunk).await?;
        self.check_writable()?;
        let old = self.index.get_meta(chunk);
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

        let total = w.header_sectors + w.sectors;
        let at = self.allocate_run(total, self.delete_reserve()).await?;
        let run = Run {
            start: at,
            len: total,
        };
        let (generation, guard) = self.begin_extent(chunk, run);
        let chunk_len = old_len.max(end);
        let now = now_ns();
        let crcs: Crcs = {
            let data = &w.buf.as_bytes()[data_start..];
            (0..w.sectors)
                .map(|i| {
                    let s = &data[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize];
                    sector_crc(chunk, LogicalSector(w.first.0 + i), generation, s)
                })
                .collect()
        };
        let header = ExtentHeader {
            kind: ExtentKind::Data,
            chunk,
            first_sector: w.first,
            generation,
            chunk_len,
            timestamp_ns: now,
            version: old.map_or(1, |m| m.version + 1),
            created_ns: old.map_or(now, |m| m.created_ns),
            disk_sector: at,
            durable_below: self.durable_below(),
            crcs,
        };
        assert_eq!(header.header_sectors(), w.header_sectors);
        header.encode(self.node_id, &mut w.buf.as_bytes_mut()[..data_start]);
        // Pair assertion, disk side: what goes out decodes to what we meant.
        assert_write_buffer(self.node_id, &header, w.buf.as_bytes());

        self.write_extent(chunk, run, w.buf).await?;
        // The change first: if the index proves inconsistent, the run goes
        // back (see `InflightGuard`) with no extent registered on it, which
        // the next write there would find registered twice.
        let (change, frees, meta) = self.data_extent_change(&header, at, old)?;
        self.alloc
            .borrow_mut()
            .register_extent(at, w.header_sectors, w.sectors);
        self.apply_index(generation, change, frees);
        guard.disarm();
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

    async fn delete(&self, chunk: ChunkId) -> Result<u64, ShardError> {
        self.check_writable()?;
        let _slot = self.write_slot().await?;
        let _lock = self.locks.lock(chunk).await?;
        self.settle_abandoned(chunk).await?;
        self.check_writable()?;
        let meta = self
            .index
            .get_meta(chunk)
            .ok_or(ShardError::NotFound(chunk))?;
        let at = self.allocate_run(1, 0).await?;
        let run = Run { start: at, len: 1 };
        let (generation, guard) = self.begin_extent(chunk, run);
        let header = ExtentHeader {
            kind: ExtentKind::Tombstone,
            chunk,
            first_sector: LogicalSector(0),
            generation,
            chunk_len: 0,
            timestamp_ns: now_ns(),
            version: meta.version,
            created_ns: meta.created_ns,
            disk_sector: at,
            durable_below: self.durable_below(),
            crcs: Crcs::new(),
        };
        let mut buf = self.io.alloc_buffer(1);
        header.encode(self.node_id, buf.as_bytes_mut());
        assert_write_buffer(self.node_id, &header, buf.as_bytes());
        self.write_extent(chunk, run, buf).await?;
        let (change, frees) = self.tombstone_change(&header, at)?;
        self.apply_index(generation, change, frees);
        guard.disarm();
        bump(&self.counters.deletes, 1);
        self.counters
            .chunks
            .set(self.counters.chunks.get().saturating_sub(1));
        tracing::trace!(shard = self.id.0, chunk = %chunk, version = meta.version, generation = generation.0, "delete");
        Ok(meta.version)
    }

    /// A checkpoint for a writer that found no room in the reservation,
    /// unless one that ran meanwhile (while it waited for the lock) made room.
    async fn checkpoint_for(&self, min_len: u64) -> Result<(), ShardError> {
        let ran = self.counters.checkpoints.get();
        self.checkpoint_detached(min_len, Some(ran)).await
    }

    /// Takes a durable checkpoint; see the module docs (steps a-c). One at a
    /// time. `min_len`: the reservation gets a run of at least this many
    /// sectors if the free map has one.
    ///
    /// It runs in a task of its own: a caller cancelled meanwhile (a write
    /// waiting for space whose client went away) must not cut it between
    /// its steps, which would lose the frees it took from the quarantine,
    /// strand its reservation, or drop index changes whose store write
    /// then failed unseen.
    pub(crate) async fn checkpoint(&self, min_len: u64) -> Result<(), ShardError> {
        self.checkpoint_detached(min_len, None).await
    }

    /// `checkpoint`, skipped if `unless_ran_since` (a count of checkpoints)
    /// is given and a checkpoint that ran since then left a run of
    /// `min_len` in the reservation.
    async fn checkpoint_detached(
        &self,
        min_len: u64,
        unless_ran_since: Option<u64>,
    ) -> Result<(), ShardError> {
        let Some(me) = self.me.upgrade() else {
            return Err(ShardError::Internal("checkpoint of a closed shard".into()));
        };
        glommio::spawn_local(async move { me.checkpoint_to_end(min_len, unless_ran_since).await })
            .detach()
            .await
            .unwrap_or_else(|| {
                Err(ShardError::Internal(
                    "the checkpoint task ended early".into(),
                ))
            })
    }

    /// The checkpoint itself, for callers that nothing cancels midway.
    async fn checkpoint_to_end(
        &self,
        min_len: u64,
        unless_ran_since: Option<u64>,
    ) -> Result<(), ShardError> {
        let _permit = self
            .checkpoint_lock
            .acquire_permit(1)
            .await
            .map_err(|e| ShardError::Internal(format!("checkpoint lock closed: {e}")))?;
        if let Some(ran) = unless_ran_since {
            if self.counters.checkpoints.get() != ran && self.alloc.borrow().has_run(min_len) {
                return Ok(());
            }
        }
        self.check_writable()?;
        let (ck, freed) = {
            let mut alloc = self.alloc.borrow_mut();
            let inflight = self.inflight.borrow();
            let high_water = self.next_generation.get();
            let replay_from = inflight.keys().next().copied().unwrap_or(high_water);
            let failed_before: Vec<u64> = self.failed.borrow().iter().copied().collect();
            let freed = {
                let mut q = self.quarantine.borrow_mut();
                let (freed, busy): (Vec<Free>, Vec<Free>) =
                    q.take_frees().into_iter().partition(|f| match f {
                        // A cancelled request's run whose device write still
                        // runs: not reusable until that write has ended.
                        Free::Run(r) => !self.io.being_written(r.start.0, r.len),
                        Free::Piece(_) => true,
                    });
                for f in busy {
                    q.push(f);
                }
                freed
            };
            self.releasing.set(free_sectors_of(&freed));
            let want = self
                .checkpoint_sectors
                .saturating_sub(alloc.reserved_sectors());
            alloc.reserve(want, min_len, MAX_RESERVED_RUNS);
            let mut scan: Vec<Run> = inflight.values().copied().collect();
            scan.extend(alloc.reserved_runs());
            // Guaranteed by the write slots and MAX_ABANDONED: a longer
            // record would not decode at the next open.
            debug_assert!(scan.len() <= MAX_CHECKPOINT_RUNS, "{} runs", scan.len());
            (
                Checkpoint {
                    replay_from,
                    high_water,
                    taken_ns: now_ns(),
                    scan,
                },
                (freed, failed_before),
            )
        };
        let (freed, failed_before) = freed;
        let (replay_from, high_water, scan_runs) = (ck.replay_from, ck.high_water, ck.scan.len());
        // The record goes into the same batch as every change it covers.
        let mut change = Change::new();
        change.put_checkpoint(ck);
        change.apply(&self.index);
        let started = Instant::now();
        let res = self.index.flush().await;
        self.releasing.set(0);
        let keys = match res {
            Ok(n) => n,
            Err(e) => {
                self.alloc.borrow_mut().drop_pending_reservation();
                self.fail_stop("checkpointing the index", &e);
                return Err(e);
            }
        };
        self.alloc.borrow_mut().activate_reservation();
        {
            // replay_from is past these now, durably.
            let mut failed = self.failed.borrow_mut();
            for g in failed_before {
                if g < replay_from {
                    failed.remove(&g);
                }
            }
        }
        self.last_checkpoint_generation.set(high_water);
        let elapsed_us = started.elapsed().as_micros() as u64;
        self.counters.last_checkpoint_us.set(elapsed_us);
        self.counters.last_checkpoint_keys.set(keys as u64);
        bump(&self.counters.checkpoints, 1);
        {
            let mut alloc = self.alloc.borrow_mut();
            self.reclaim.borrow_mut().defer(freed, &mut alloc);
            self.last_replay_from.set(replay_from);
        }
        tracing::debug!(
            shard = self.id.0,
            replay_from,
            high_water,
            scan_runs,
            keys,
            elapsed_us,
            "checkpoint"
        );
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
        let (data, _) = self.read_bytes(chunk, at, end).await?;
        data.copy_range(0, &mut dst[..n]);
        dst[n..].fill(0);
        Ok(())
    }

    /// Waits until all space deferred so far (unlinked by durable
    /// checkpoints) is back in the free map: the reads that may look at it
    /// have ended.
    pub(crate) async fn reclaimed(&self) {
        let epoch = self.reclaim.borrow().epoch();
        while !self.reclaim.borrow().drained_before(epoch) {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Quarantines a run (reusable after the next durable checkpoint).
    pub(crate) fn quarantine_run(&self, run: Run) {
        self.quarantine.borrow_mut().push(Free::Run(run));
    }

    /// From now on, failed writes' runs are held for a sweep pass.
    pub(crate) fn hold_failed_writes(&self) {
        self.quarantine.borrow_mut().held = Some(Vec::new());
    }

    /// The failed writes' runs held so far.
    pub(crate) fn held_failed_writes(&self) -> Vec<Run> {
        self.quarantine.borrow().held.clone().unwrap_or_default()
    }

    /// Stops holding failed writes' runs; the held ones are quarantined.
    pub(crate) fn release_failed_writes(&self) {
        let mut q = self.quarantine.borrow_mut();
        q.held_sectors = 0;
        for run in q.held.take().unwrap_or_default() {
            q.push(Free::Run(run));
        }
    }

    pub(crate) fn begin_read(&self) -> ReadEpoch<'_> {
        let epoch = self.reclaim.borrow_mut().begin_read();
        ReadEpoch { shard: self, epoch }
    }

    /// Reads up to `len` bytes at `offset`; short at the end of the chunk.
    async fn read(&self, chunk: ChunkId, offset: u64, len: u32) -> Result<ReadOutcome, ShardError> {
        let _epoch = self.begin_read();
        // The wait for read-ahead comes before the meta, so that the meta
        // and the extents the read uses are taken together with no wait
        // between. Taken before, a delete or overwrite during the wait left
        // the old meta over the new extents: zeros, or newer bytes under
        // the old version. (A range past any chunk's end fails its bounds
        // check below.)
        let asked_end = offset
            .saturating_add(u64::from(len))
            .min(limits::MAX_CHUNK_SIZE);
        if offset < asked_end {
            self.settle_read_ahead(chunk, offset, asked_end).await;
        }
        let (meta, end) = self.read_bounds(chunk, offset, len)?;
        let (data, cached) = if offset >= end {
            (ReadData::default(), true)
        } else {
            self.read_bytes_settled(chunk, offset, end).await?
        };
        Ok(self.read_outcome(meta, data, cached))
    }

    /// Checks a READ and returns the chunk's meta and where the read ends.
    fn read_bounds(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: u32,
    ) -> Result<(ChunkMeta, u64), ShardError> {
        if len > limits::MAX_PAYLOAD {
            return Err(ShardError::TooLarge(format!(
                "read of {len} bytes exceeds {}",
                limits::MAX_PAYLOAD
            )));
        }
        let want_end = offset
            .checked_add(u64::from(len))
            .ok_or_else(|| ShardError::InvalidArgument(format!("offset {offset} overflows")))?;
        let meta = self
            .index
            .get_meta(chunk)
            .ok_or(ShardError::NotFound(chunk))?;
        Ok((meta, want_end.min(meta.len)))
    }

    fn read_outcome(&self, meta: ChunkMeta, data: ReadData, cached: bool) -> ReadOutcome {
        bump(&self.counters.reads, 1);
        if cached {
            bump(&self.cache.counters.cached_reads, 1);
        } else {
            bump(&self.cache.counters.uncached_reads, 1);
        }
        bump(&self.counters.bytes_read, data.len() as u64);
        ReadOutcome {
            version: meta.version,
            chunk_len: meta.len,
            payload_crc: data.crc32c(),
            data,
            cached,
        }
    }

    /// A READ answered without waiting: `None` if it needs the device (or
    /// waits for read-ahead in flight), else its outcome (errors included).
    fn read_now(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: u32,
    ) -> Option<Result<ReadOutcome, ShardError>> {
        if !self.cache.enabled() {
            return None;
        }
        let _epoch = self.begin_read();
        let (meta, end) = match self.read_bounds(chunk, offset, len) {
            Ok(b) => b,
            Err(e) => return Some(Err(e)),
        };
        if offset >= end {
            return Some(Ok(self.read_outcome(meta, ReadData::default(), true)));
        }
        let (first, last) = (offset / SECTOR, end.div_ceil(SECTOR));
        if !self
            .prefetch
            .pending(chunk, first * SECTOR, last * SECTOR)
            .is_empty()
        {
            return None;
        }
        let recs = self.index.overlapping(chunk, first, last);
        let parts = self.plan(&recs, first, last);
        if parts.iter().any(|p| matches!(p, Part::Miss(_))) {
            // The asynchronous path plans this read again: its cache hits
            // must not be counted twice (a repeated lookup only marks an
            // entry used again, and a read-ahead sector counts as used once).
            let hits = parts
                .iter()
                .map(|p| match p {
                    Part::Hit { sectors, .. } => *sectors,
                    Part::Miss(_) => 0,
                })
                .sum();
            self.cache.uncount_hits(hits);
            return None;
        }
        let data = self.assemble(offset, end, &recs, parts, std::iter::empty());
        Some(data.map(|d| self.read_outcome(meta, d, true)))
    }

    /// Bytes `[start, end)` of the chunk (within its length): sectors from
    /// the cache where it has them, the others read from disk (every one
    /// checked against its crc) and cached. Also says whether the device was
    /// not needed at all.
    pub(crate) async fn read_bytes(
        &self,
        chunk: ChunkId,
        start: u64,
        end: u64,
    ) -> Result<(ReadData, bool), ShardError> {
        self.settle_read_ahead(chunk, start, end).await;
        self.read_bytes_settled(chunk, start, end).await
    }

    /// Waits until no read-ahead of bytes `[start, end)` of `chunk` is in
    /// flight (rather than read them twice). The caller then looks up what
    /// it reads in the index with no wait in between.
    async fn settle_read_ahead(&self, chunk: ChunkId, start: u64, end: u64) {
        let (from, to) = (start / SECTOR * SECTOR, end.div_ceil(SECTOR) * SECTOR);
        loop {
            let pending = self.prefetch.pending(chunk, from, to);
            if pending.is_empty() {
                return;
            }
            for p in pending {
                p.await;
            }
        }
    }

    /// [`Inner::read_bytes`] once `settle_read_ahead` has returned, with no
    /// wait since.
    async fn read_bytes_settled(
        &self,
        chunk: ChunkId,
        start: u64,
        end: u64,
    ) -> Result<(ReadData, bool), ShardError> {
        assert!(start < end);
        let _epoch = self.begin_read();
        let first = start / SECTOR;
        let last = end.div_ceil(SECTOR);
        let recs = self.index.overlapping(chunk, first, last);
        let parts = self.plan(&recs, first, last);
        let misses: Vec<Span> = parts
            .iter()
            .filter_map(|p| match p {
                Part::Miss(s) => Some(*s),
                Part::Hit { .. } => None,
            })
            .collect();
        let cached = misses.is_empty();
        let reads = misses
            .iter()
            .map(|s| self.read_verified(chunk, &recs[s.rec], s.from, s.to, ReadBy::Client));
        let results = futures_util::future::join_all(reads).await;
        let data = self.assemble(start, end, &recs, parts, results.into_iter())?;
        Ok((data, cached))
    }

    /// The parts of a read of logical sectors `[first, last)` covered by
    /// `recs`: runs found in the cache and spans to read.
    fn plan(&self, recs: &[ExtentRec], first: u64, last: u64) -> Vec<Part> {
        let mut parts = Vec::with_capacity(recs.len());
        for (i, r) in recs.iter().enumerate() {
            let span = Span {
                rec: i,
                from: r.logical.0.max(first),
                to: r.end().min(last),
            };
            self.plan_span(r, span, &mut parts);
        }
        parts
    }

    /// Bytes `[start, end)` from the planned parts, the spans read from disk
    /// (`results`, one per `Part::Miss`, in order) going into the cache.
    fn assemble(
        &self,
        start: u64,
        end: u64,
        recs: &[ExtentRec],
        parts: Vec<Part>,
        mut results: impl Iterator<Item = Result<(ReadBuf, Vec<u32>), ShardError>>,
    ) -> Result<ReadData, ShardError> {
        let mut data = ReadData::default();
        let mut pos = start;
        for part in parts {
            let (logical, sectors, buf, crc) = match part {
                Part::Hit {
                    logical,
                    sectors,
                    buf,
                    crc,
                } => (logical, sectors, buf, crc),
                Part::Miss(s) => {
                    let (buf, crcs) = results.next().ok_or_else(|| {
                        ShardError::Internal("a read span without its device read".into())
                    })??;
                    let r = &recs[s.rec];
                    let disk = r.disk.0 + (s.from - r.logical.0);
                    bump(&self.cache.counters.misses, s.to - s.from);
                    self.cache.insert(r.generation.0, disk, &buf, &crcs, false);
                    let crc = crcs
                        .iter()
                        .skip(1)
                        .fold(crcs[0], |a, c| crc_then_sector(a, *c));
                    (s.from, s.to - s.from, buf, crc)
                }
            };
            let piece_start = (logical * SECTOR).max(start);
            let piece_end = ((logical + sectors) * SECTOR).min(end);
            if piece_start > pos {
                data.push_zeros((piece_start - pos) as usize);
            }
            let off = (piece_start - logical * SECTOR) as usize;
            let len = (piece_end - piece_start) as usize;
            let whole = off == 0 && len == buf.len();
            let slice = buf.slice(off, len).ok_or_else(|| {
                ShardError::Internal(format!("slice {off}+{len} of a {} byte read", buf.len()))
            })?;
            data.push_disk(slice, whole.then_some(crc));
            pos = piece_end;
        }
        if end > pos {
            data.push_zeros((end - pos) as usize);
        }
        assert_eq!(data.len() as u64, end - start);
        Ok(data)
    }

    /// Splits `span` of extent record `r` into runs found in the cache and
    /// runs to read.
    fn plan_span(&self, r: &ExtentRec, span: Span, parts: &mut Vec<Part>) {
        if !self.cache.enabled() {
            parts.push(Part::Miss(span));
            return;
        }
        let disk_of = |logical: u64| r.disk.0 + (logical - r.logical.0);
        let mut at = span.from;
        let mut miss_from = None;
        while at < span.to {
            match self.cache.lookup(r.generation.0, disk_of(at), span.to - at) {
                Some(hit) => {
                    if let Some(from) = miss_from.take() {
                        parts.push(Part::Miss(Span {
                            to: at,
                            from,
                            ..span
                        }));
                    }
                    parts.push(Part::Hit {
                        logical: at,
                        sectors: hit.sectors,
                        buf: hit.buf,
                        crc: hit.crc,
                    });
                    at += hit.sectors;
                }
                None => {
                    miss_from.get_or_insert(at);
                    at += 1;
                }
            }
        }
        if let Some(from) = miss_from {
            parts.push(Part::Miss(Span { from, ..span }));
        }
    }

    /// Reads logical sectors `[from, to)` of extent record `r` from disk and
    /// checks each against its crc (pair assertion, memory side: right after
    /// the read). Returns the bytes and each sector's plain crc32c. A bad
    /// sector is counted in `corrupt_errors` (and logged as an error) when
    /// a client read it (`by`); read-ahead caches nothing then, and the
    /// client's own read of it counts it.
    pub(crate) async fn read_verified(
        &self,
        chunk: ChunkId,
        r: &ExtentRec,
        from: u64,
        to: u64,
        by: ReadBy,
    ) -> Result<(ReadBuf, Vec<u32>), ShardError> {
        assert!(r.logical.0 <= from && from < to && to <= r.end());
        let skip = from - r.logical.0;
        let disk = r.disk.0 + skip;
        let count = to - from;
        if r.disk.0 < DATA_START_SECTOR
            || r.disk.0 + r.count() > DATA_START_SECTOR + self.capacity_sectors
        {
            return Err(ShardError::IndexCorrupt(format!(
                "chunk {chunk} extent at logical {} points outside the data area",
                r.logical.0
            )));
        }
        let rr = self.io.read(DiskSector(disk), count).await.map_err(|e| {
            ShardError::io(format!("reading chunk {chunk} sectors {from}..{to}"), e)
        })?;
        let mut plain = Vec::with_capacity(count as usize);
        for i in 0..count {
            let s = &rr[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize];
            let logical = LogicalSector(from + i);
            let want = r.crcs[(skip + i) as usize];
            let crc = crc32c::crc32c(s);
            let got = sector_crc_from_plain(chunk, logical, r.generation, crc);
            if got != want {
                match by {
                    ReadBy::Client => {
                        bump(&self.counters.corrupt_errors, 1);
                        tracing::error!(shard = self.id.0, chunk = %chunk, sector = logical.0, disk_sector = disk + i, "sector checksum mismatch");
                    }
                    ReadBy::ReadAhead => {
                        tracing::debug!(shard = self.id.0, chunk = %chunk, sector = logical.0, disk_sector = disk + i, "read-ahead found a sector checksum mismatch");
                    }
                }
                return Err(ShardError::Corrupt {
                    chunk,
                    sector: logical.0,
                    detail: format!(
                        "crc32c {got:#010x} != expected {want:#010x} (disk sector {}, generation {})",
                        disk + i,
                        r.generation.0
                    ),
                });
            }
            plain.push(crc);
        }
        Ok((rr, plain))
    }

    fn cache_stats(&self) -> CacheStats {
        let c = &self.cache.counters;
        let (bytes, entries) = self.cache.usage();
        CacheStats {
            capacity_bytes: self.cache.capacity_bytes(),
            bytes,
            entries,
            hits: c.hits.get(),
            misses: c.misses.get(),
            evictions: c.evictions.get(),
            cached_reads: c.cached_reads.get(),
            uncached_reads: c.uncached_reads.get(),
            prefetch_enabled: self.prefetch.enabled(),
            prefetch_issued: c.prefetch_issued.get(),
            prefetch_used: c.prefetch_used.get(),
            prefetch_wasted: c.prefetch_wasted.get(),
            held_bytes: self.cache.held_bytes(),
            compacted: c.compacted.get(),
        }
    }
}

/// Who reads sectors from disk (see `Inner::read_verified`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadBy {
    Client,
    ReadAhead,
}

/// Logical sectors `[from, to)` of the `rec`-th extent record of a read.
#[derive(Clone, Copy)]
struct Span {
    rec: usize,
    from: u64,
    to: u64,
}

/// A piece of a read: sectors found in the cache, or a span to read.
enum Part {
    Hit {
        logical: u64,
        sectors: u64,
        buf: ReadBuf,
        crc: u32,
    },
    Miss(Span),
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

/// Writes both superblock copies durably (and preallocates a data file).
async fn format_area(io: &Io, cfg: &ShardConfig, size: u64) -> Result<Superblock, ShardError> {
    let capacity_sectors = match &cfg.device {
        Some(_) => (size / SECTOR).saturating_sub(DATA_START_SECTOR),
        None => cfg.capacity_bytes / SECTOR,
    };
    if capacity_sectors < 16 {
        return Err(ShardError::Format(format!(
            "{}: {capacity_sectors} sectors is too small for a data area",
            io.describe()
        )));
    }
    let sb = Superblock {
        node_id: cfg.node_id,
        shard: cfg.shard,
        shard_count: cfg.shard_count,
        capacity_sectors,
        created_ns: now_ns(),
    };
    io.pre_allocate((DATA_START_SECTOR + sb.capacity_sectors) * SECTOR)
        .await
        .map_err(|e| ShardError::io("preallocating the data area", e))?;
    if cfg.device.is_none() && cfg.zero_fill {
        zero_fill(io, sb.capacity_sectors).await?;
    }
    let mut buf = io.alloc_buffer(DATA_START_SECTOR);
    for copy in 0..DATA_START_SECTOR as usize {
        let s = SECTOR as usize;
        sb.encode(&mut buf.as_bytes_mut()[copy * s..(copy + 1) * s]);
    }
    io.write(DiskSector(0), buf)
        .await
        .map_err(|e| ShardError::io("writing the superblock", e))?;
    io.sync()
        .await
        .map_err(|e| ShardError::io("fdatasync after formatting", e))?;
    tracing::info!(
        shard = cfg.shard.0,
        storage = %io.describe(),
        capacity_sectors = sb.capacity_sectors,
        "formatted a new data area"
    );
    Ok(sb)
}

/// Writes zeros over the data area, four 1 MiB writes in flight.
async fn zero_fill(io: &Io, capacity_sectors: u64) -> Result<(), ShardError> {
    let started = Instant::now();
    const PIECE: u64 = 256;
    let end = DATA_START_SECTOR + capacity_sectors;
    let mut at = DATA_START_SECTOR;
    while at < end {
        let mut batch = Vec::new();
        for _ in 0..4 {
            if at >= end {
                break;
            }
            let n = PIECE.min(end - at);
            let mut buf = io.alloc_buffer(n);
            buf.as_bytes_mut().fill(0);
            batch.push(io.write_uncounted(DiskSector(at), buf));
            at += n;
        }
        for r in futures_util::future::join_all(batch).await {
            r.map_err(|e| ShardError::io("zero-filling the data area", e))?;
        }
    }
    tracing::info!(
        sectors = capacity_sectors,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "zero-filled the new data area"
    );
    Ok(())
}

/// The buffer about to be written is a valid extent: its header decodes to
/// `header`, and (with `strict-assertions`) every data sector matches its crc.
fn assert_write_buffer(node_id: u128, header: &ExtentHeader, buf: &[u8]) {
    let hs = (header.header_sectors() * SECTOR) as usize;
    let decoded = ExtentHeader::decode(node_id, &buf[..hs]);
    assert_eq!(
        decoded.as_ref(),
        Ok(header),
        "extent header does not round-trip"
    );
    if cfg!(feature = "strict-assertions") {
        assert_eq!(
            header.first_bad_sector(&buf[hs..]),
            None,
            "a sector changed before the device write"
        );
    }
}
