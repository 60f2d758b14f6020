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

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::ops::Deref;
use std::pin::Pin;
use std::rc::Rc;

use glommio::io::{DmaBuffer, ReadResult};

use crate::layout::{DiskSector, SECTOR};

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
}

/// The instrumented I/O layer: a storage plus counters. Every device access
/// of the engine goes through here.
pub struct Io {
    inner: Box<dyn Storage>,
    writes: Cell<u64>,
    reads: Cell<u64>,
    flushes: Cell<u64>,
}

impl Io {
    pub fn new(inner: Box<dyn Storage>) -> Io {
        Io {
            inner,
            writes: Cell::new(0),
            reads: Cell::new(0),
            flushes: Cell::new(0),
        }
    }

    pub fn counters(&self) -> IoCounters {
        IoCounters {
            writes: self.writes.get(),
            reads: self.reads.get(),
            flushes: self.flushes.get(),
        }
    }

    pub fn describe(&self) -> String {
        self.inner.describe()
    }

    pub fn write_through(&self) -> bool {
        self.inner.write_through()
    }

    pub fn alloc_buffer(&self, sectors: u64) -> IoBuf {
        assert!(sectors > 0, "zero-sized buffers do not exist");
        let b = self.inner.alloc_buffer(sectors);
        assert_eq!(b.len() as u64, sectors * SECTOR);
        b
    }

    pub async fn size_bytes(&self) -> io::Result<u64> {
        self.inner.size_bytes().await
    }

    pub async fn pre_allocate(&self, bytes: u64) -> io::Result<()> {
        self.inner.pre_allocate(bytes).await
    }

    /// A write that is not part of serving a request (format-time zeroing):
    /// not counted, so the counters describe the request path only.
    pub async fn write_uncounted(&self, at: DiskSector, buf: IoBuf) -> io::Result<()> {
        self.inner.write(at, buf).await
    }

    pub async fn write(&self, at: DiskSector, buf: IoBuf) -> io::Result<()> {
        let len = buf.len();
        assert!(len > 0 && len as u64 % SECTOR == 0);
        self.writes.set(self.writes.get() + 1);
        self.inner.write(at, buf).await
    }

    pub fn can_write_durable(&self) -> bool {
        self.inner.can_write_durable()
    }

    /// One device write, durable when it completes (see
    /// [`Storage::write_durable`]). Counted as a write; no flush.
    pub async fn write_durable(&self, at: DiskSector, buf: IoBuf) -> io::Result<()> {
        let len = buf.len();
        assert!(len > 0 && len as u64 % SECTOR == 0);
        self.writes.set(self.writes.get() + 1);
        self.inner.write_durable(at, buf).await
    }

    pub async fn read(&self, at: DiskSector, sectors: u64) -> io::Result<ReadBuf> {
        assert!(sectors > 0);
        self.reads.set(self.reads.get() + 1);
        let rb = self.inner.read(at, sectors).await?;
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
        self.flushes.set(self.flushes.get() + 1);
        self.inner.sync().await
    }
}
