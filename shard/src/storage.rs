//! The storage trait: everything the engine asks of a disk.
//!
//! Two implementations: [`crate::device::DmaStorage`] (glommio O_DIRECT I/O
//! on a file or a range of a block device) and [`crate::sim::SimDisk`] (a
//! seeded, reproducible simulated disk with faults, for tests). The engine
//! only ever talks to [`Io`], which wraps one of them and counts every device
//! write, read and flush (the instrumented layer the one-write-per-ack test
//! reads).
//!
//! Positions and sizes are whole sectors; sector 0 of a storage is the first
//! superblock copy. A short read or write is an error, never a partial result.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::ops::Deref;
use std::pin::Pin;
use std::rc::Rc;

use glommio::io::{DmaBuffer, ReadResult};

use crate::combine::{share_result, Combiner, Done, Queued, Wait};
use crate::layout::{DiskSector, SECTOR};
use crate::shard::DecrementOnDrop;

/// A boxed, single-threaded I/O future.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + 'a>>;

/// A buffer about to be written: DMA memory for the real device, heap
/// memory for the simulated one.
pub enum IoBuf {
    Dma(DmaBuffer),
    Heap(Vec<u8>),
}

impl IoBuf {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            IoBuf::Dma(b) => b.as_bytes(),
            IoBuf::Heap(v) => v,
        }
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            IoBuf::Dma(b) => b.as_bytes_mut(),
            IoBuf::Heap(v) => v,
        }
    }

    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Bytes read from a storage; cheap to clone and to slice.
#[derive(Clone, Debug)]
pub enum ReadBuf {
    Dma(ReadResult),
    Heap {
        data: Rc<Vec<u8>>,
        off: usize,
        len: usize,
    },
}

impl ReadBuf {
    pub fn from_vec(v: Vec<u8>) -> ReadBuf {
        let len = v.len();
        ReadBuf::Heap {
            data: Rc::new(v),
            off: 0,
            len,
        }
    }

    /// `len` bytes from `off`, sharing the memory.
    pub fn slice(&self, off: usize, len: usize) -> Option<ReadBuf> {
        match self {
            ReadBuf::Dma(rr) => ReadResult::slice(rr, off, len).map(ReadBuf::Dma),
            ReadBuf::Heap {
                data,
                off: o,
                len: l,
            } => {
                if off.checked_add(len)? > *l {
                    return None;
                }
                Some(ReadBuf::Heap {
                    data: data.clone(),
                    off: o + off,
                    len,
                })
            }
        }
    }
}

impl Deref for ReadBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ReadBuf::Dma(rr) => &rr[..],
            ReadBuf::Heap { data, off, len } => &data[*off..*off + *len],
        }
    }
}

/// A disk as the engine sees it. Object-safe (boxed futures) so a shard can
/// hold either implementation without becoming generic.
pub trait Storage {
    /// A sector-aligned buffer of `sectors` sectors. Not necessarily zeroed.
    fn alloc_buffer(&self, sectors: u64) -> IoBuf;
    /// Usable size in bytes (for a block device range: the range's length).
    fn size_bytes(&self) -> IoFuture<'_, u64>;
    /// Reserves space for `bytes` so later writes do not allocate.
    fn pre_allocate(&self, bytes: u64) -> IoFuture<'_, ()>;
    /// Writes the whole buffer at `at` with one device write.
    fn write(&self, at: DiskSector, buf: IoBuf) -> IoFuture<'_, ()>;
    /// Reads `sectors` whole sectors at `at`.
    fn read(&self, at: DiskSector, sectors: u64) -> IoFuture<'_, ReadBuf>;
    /// Makes every completed write durable (`fdatasync`). An error is final.
    fn sync(&self) -> IoFuture<'_, ()>;
    /// For logs: what this storage is.
    fn describe(&self) -> String;
    /// Whether a completed write is already durable (O_DSYNC), so no
    /// separate flush is needed to acknowledge it.
    fn write_through(&self) -> bool {
        false
    }
    /// Whether [`Storage::write_durable`] is available: always on a
    /// write-through storage.
    fn can_write_durable(&self) -> bool {
        self.write_through()
    }
    /// Like `write`, but durable when it completes (O_DSYNC), whatever
    /// `write_through` says: an error leaves unknown what reached the media,
    /// as a failed flush does. On a write-through storage, `write` itself.
    fn write_durable(&self, at: DiskSector, buf: IoBuf) -> IoFuture<'_, ()> {
        if self.write_through() {
            return self.write(at, buf);
        }
        Box::pin(async {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this storage has no durable-write path",
            ))
        })
    }
}

/// Counters of what went to the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoCounters {
    pub writes: u64,
    pub reads: u64,
    pub flushes: u64,
    /// Extent writes carried by a device write started for another extent
    /// (write combining): `writes` counts that device write once.
    pub combined_writes: u64,
}

/// The instrumented I/O layer: a storage plus counters. Every device access
/// of the engine goes through here. Durable writes go through the write
/// combiner (see `combine`) when it is on.
#[derive(Clone)]
pub struct Io {
    s: Rc<Shared>,
}

/// What `Io` shares with the tasks that carry combined writes.
struct Shared {
    inner: Box<dyn Storage>,
    writes: Cell<u64>,
    reads: Cell<u64>,
    flushes: Cell<u64>,
    /// Extent writes that rode in a device write started for another one.
    combined: Cell<u64>,
    combiner: Combiner,
    /// Device writes running: first disk sector -> end (they never
    /// overlap). A write keeps running when the requests it carries are
    /// cancelled, so their runs must not be reused before it ends.
    running: RefCell<BTreeMap<u64, u64>>,
    /// Device writes ended so far, and who waits for the next one.
    ended: Cell<u64>,
    ended_waiters: RefCell<Vec<std::task::Waker>>,
    /// The first durable write that failed (not for lack of space), even if
    /// every request it carried was cancelled: the shard must fail-stop.
    failure: RefCell<Option<String>>,
    /// Syncs running.
    syncs: Cell<u32>,
    /// Who waits for a device write or sync to start (see `poll`).
    busy_waiter: RefCell<Option<std::task::Waker>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Lets a waiter see that the shard is gone.
        if let Some(w) = self.busy_waiter.take() {
            w.wake();
        }
    }
}

/// A handle on an [`Io`] that does not keep it alive.
pub(crate) struct WeakIo(std::rc::Weak<Shared>);

impl WeakIo {
    pub(crate) fn upgrade(&self) -> Option<Io> {
        self.0.upgrade().map(|s| Io { s })
    }
}

impl Io {
    /// `combine_in_flight`: combined durable writes allowed at the device at
    /// once (0: no combining; see `combine`).
    pub fn new(inner: Box<dyn Storage>, combine_in_flight: u32) -> Io {
        Io {
            s: Rc::new(Shared {
                inner,
                writes: Cell::new(0),
                reads: Cell::new(0),
                flushes: Cell::new(0),
                combined: Cell::new(0),
                combiner: Combiner::new(combine_in_flight),
                running: RefCell::new(BTreeMap::new()),
                ended: Cell::new(0),
                ended_waiters: RefCell::new(Vec::new()),
                failure: RefCell::new(None),
                syncs: Cell::new(0),
                busy_waiter: RefCell::new(None),
            }),
        }
    }

    pub(crate) fn downgrade(&self) -> WeakIo {
        WeakIo(Rc::downgrade(&self.s))
    }

    /// Device writes and syncs running now (a write stays running when
    /// the requests it carries are cancelled).
    pub(crate) fn device_writes_in_flight(&self) -> u64 {
        self.s.running.borrow().len() as u64 + u64::from(self.s.syncs.get())
    }

    /// Registers `cx`'s task to be woken when a device write or sync starts
    /// (or the `Io` is dropped); one waiter at a time.
    pub(crate) fn wake_on_device_write(&self, cx: &std::task::Context<'_>) {
        *self.s.busy_waiter.borrow_mut() = Some(cx.waker().clone());
    }

    pub fn counters(&self) -> IoCounters {
        IoCounters {
            writes: self.s.writes.get(),
            reads: self.s.reads.get(),
            flushes: self.s.flushes.get(),
            combined_writes: self.s.combined.get(),
        }
    }

    /// Whether a device write still running covers any of disk
    /// sectors `[start, start + len)` (its requests may have been cancelled:
    /// such space must stay quarantined until the write ends).
    pub fn being_written(&self, start: u64, len: u64) -> bool {
        // The running write starting last before the range's end is the
        // only one that can reach into it (they do not overlap).
        self.s
            .running
            .borrow()
            .range(..start + len)
            .next_back()
            .is_some_and(|(_, &end)| end > start)
    }

    /// Device writes ended so far (see [`Io::write_ended_since`]).
    pub fn writes_ended(&self) -> u64 {
        self.s.ended.get()
    }

    /// Resolves once a device write has ended after [`Io::writes_ended`]
    /// returned `seen`.
    pub fn write_ended_since(&self, seen: u64) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.s.ended.get() != seen {
                std::task::Poll::Ready(())
            } else {
                self.s.ended_waiters.borrow_mut().push(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
    }

    /// A durable write that failed (other than for space), whoever waited
    /// for it: the shard must stop writing.
    pub fn durable_write_failure(&self) -> Option<String> {
        self.s.failure.borrow().clone()
    }

    /// Waits until no durable write is queued or at the device (a write
    /// whose requests were cancelled may still be running).
    pub async fn quiesce(&self) {
        while !self.s.combiner.idle() || !self.s.running.borrow().is_empty() {
            glommio::timer::sleep(std::time::Duration::from_micros(100)).await;
        }
    }

    pub fn describe(&self) -> String {
        self.s.inner.describe()
    }

    pub fn write_through(&self) -> bool {
        self.s.inner.write_through()
    }

    pub fn alloc_buffer(&self, sectors: u64) -> IoBuf {
        assert!(sectors > 0, "zero-sized buffers do not exist");
        let b = self.s.inner.alloc_buffer(sectors);
        assert_eq!(b.len() as u64, sectors * SECTOR);
        b
    }

    pub async fn size_bytes(&self) -> io::Result<u64> {
        self.s.inner.size_bytes().await
    }

    pub async fn pre_allocate(&self, bytes: u64) -> io::Result<()> {
        self.s.inner.pre_allocate(bytes).await
    }

    /// A write that is not part of serving a request (format-time zeroing):
    /// not counted, so the counters describe the request path only.
    pub async fn write_uncounted(&self, at: DiskSector, buf: IoBuf) -> io::Result<()> {
        self.s.inner.write(at, buf).await
    }

    /// A device write, durable only after the next [`Io::sync`]. Like a
    /// durable write, it goes out from a task of its own and its range is
    /// tracked while it runs: a request cancelled meanwhile leaves the write
    /// running, and its space must not be reused before the write ends.
    pub async fn write(&self, at: DiskSector, buf: IoBuf) -> io::Result<()> {
        let len = buf.len();
        assert!(len > 0 && len as u64 % SECTOR == 0);
        bump(&self.s.writes);
        let done = Rc::new(Done::default());
        self.s.begin_running(at, len);
        let (s, d) = (self.s.clone(), done.clone());
        glommio::spawn_local(async move {
            let res = s.inner.write(at, buf).await;
            s.end_running(at);
            d.finish(res);
        })
        .detach();
        Wait(done).await
    }

    /// Overwrites one sector with zeros (erasing a header), as [`Io::write`].
    pub async fn write_zero_sector(&self, at: DiskSector) -> io::Result<()> {
        let mut zeros = self.alloc_buffer(1);
        zeros.as_bytes_mut().fill(0);
        self.write(at, zeros).await
    }

    pub fn can_write_durable(&self) -> bool {
        self.s.inner.can_write_durable()
    }

    /// Durable when it completes (see [`Storage::write_durable`]): one
    /// device write, shared with adjacent writes queued behind the device
    /// when the combiner is on. Counted as a device write each time one
    /// starts; no flush.
    pub async fn write_durable(&self, at: DiskSector, buf: IoBuf) -> io::Result<()> {
        let len = buf.len();
        assert!(len > 0 && len as u64 % SECTOR == 0);
        // Every durable write goes out from a task of its own (see
        // `start_combined`), combined or not, so a cancelled request never
        // leaves a device write behind that nothing tracks.
        let done = Rc::new(Done::default());
        self.s.combiner.push(Queued {
            at,
            buf,
            done: done.clone(),
        });
        start_combined(&self.s);
        Wait(done).await
    }

    pub async fn read(&self, at: DiskSector, sectors: u64) -> io::Result<ReadBuf> {
        assert!(sectors > 0);
        bump(&self.s.reads);
        let rb = self.s.inner.read(at, sectors).await?;
        if rb.len() as u64 != sectors * SECTOR {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "short device read: {} of {} bytes at sector {}",
                    rb.len(),
                    sectors * SECTOR,
                    at.0
                ),
            ));
        }
        Ok(rb)
    }

    pub async fn sync(&self) -> io::Result<()> {
        bump(&self.s.flushes);
        let s = &self.s;
        s.syncs.set(s.syncs.get() + 1);
        s.device_write_started();
        // Also when the future is dropped unfinished.
        let _running = DecrementOnDrop(&s.syncs);
        s.inner.sync().await
    }
}

impl Shared {
    /// Records a device write of `bytes` at `at` as running; returns its
    /// end sector. The caller removes it when the write ends.
    fn begin_running(&self, at: DiskSector, bytes: usize) -> u64 {
        let end = at.0 + bytes as u64 / SECTOR;
        let before = self.running.borrow_mut().insert(at.0, end);
        self.device_write_started();
        // Two device writes at once from one sector: space handed out twice.
        debug_assert!(
            before.is_none(),
            "a device write at sector {} is already running",
            at.0
        );
        end
    }

    fn device_write_started(&self) {
        if let Some(w) = self.busy_waiter.take() {
            w.wake();
        }
    }

    /// The device write started at `at` has ended: wakes who waits for one.
    fn end_running(&self, at: DiskSector) {
        self.running.borrow_mut().remove(&at.0);
        self.ended.set(self.ended.get() + 1);
        for w in self.ended_waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

/// Starts device writes for queued durable writes while the combiner allows
/// one more at the device; each runs in a task of its own and starts the
/// next batch when it ends.
fn start_combined(s: &Rc<Shared>) {
    while let Some(batch) = s.combiner.take_batch() {
        let writes = batch.len();
        s.combiner.started(writes);
        bump(&s.writes);
        s.combined.set(s.combined.get() + writes as u64 - 1);
        // Tracked from now, not from when the task first runs: a checkpoint
        // in between must already see the range as being written.
        let at = batch[0].at;
        let end = s.begin_running(at, batch.iter().map(|q| q.buf.len()).sum());
        let sectors = end - at.0;
        let s = s.clone();
        glommio::spawn_local(async move {
            let (buf, dones) = assemble(&*s.inner, batch);
            let res = s.inner.write_durable(at, buf).await;
            s.end_running(at);
            if let Err(e) = &res {
                if e.raw_os_error() != Some(libc::ENOSPC) {
                    s.failure.borrow_mut().get_or_insert_with(|| {
                        format!("O_DSYNC write of sectors {}..{}: {e}", at.0, at.0 + sectors)
                    });
                }
            }
            s.combiner.ended(writes);
            for d in &dones {
                d.finish(share_result(&res));
            }
            start_combined(&s);
        })
        .detach();
    }
}

/// One buffer holding a batch's extents back to back (the batch is
/// contiguous on disk), and their waiters.
fn assemble(storage: &dyn Storage, mut batch: Vec<Queued>) -> (IoBuf, Vec<Rc<Done>>) {
    if batch.len() == 1 {
        let q = batch.pop().expect("one");
        return (q.buf, vec![q.done]);
    }
    let bytes: usize = batch.iter().map(|q| q.buf.len()).sum();
    let mut buf = storage.alloc_buffer(bytes as u64 / SECTOR);
    let mut dones = Vec::with_capacity(batch.len());
    let mut off = 0;
    for q in batch {
        let b = q.buf.as_bytes();
        buf.as_bytes_mut()[off..off + b.len()].copy_from_slice(b);
        off += b.len();
        dones.push(q.done);
    }
    (buf, dones)
}
