//! The one place that touches the data file: every DMA buffer allocation,
//! read, write, `fdatasync` and preallocation of the shard goes through
//! [`Device`], so a later change can put a trait (and a simulated faulty disk)
//! behind it without touching the engine.
//!
//! All positions and sizes are whole sectors: the file is opened `O_DIRECT`.
//! A short read or write is an error here (`UnexpectedEof` / `WriteZero`), so
//! callers never see partial sectors.

use std::cell::Cell;
use std::io;
use std::path::Path;

use glommio::io::{DmaBuffer, DmaFile, OpenOptions, ReadResult};

use crate::layout::{DiskSector, DATA_START_SECTOR, SECTOR};

/// Counters of what went to the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    pub writes: u64,
    pub reads: u64,
    pub flushes: u64,
}

pub struct Device {
    file: DmaFile,
    writes: Cell<u64>,
    reads: Cell<u64>,
    flushes: Cell<u64>,
}

/// glommio decides once per block device (and caches it for the process)
/// whether the device supports io_uring polled I/O, by reading the first
/// block of the file being opened. A read of an empty file or of a hole never
/// reaches the device and "succeeds", which wrongly enables the poll ring on
/// devices without poll queues: every later O_DIRECT read then fails with
/// EOPNOTSUPP. So the superblock sectors of a new file are really written
/// (zeros, which the open logic treats as "not formatted yet") before
/// `dma_open`. Blocking, but only at open time.
fn ensure_first_sectors_written(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let head = (DATA_START_SECTOR * SECTOR) as usize;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    if f.metadata()?.len() < head as u64 {
        f.write_all_at(&vec![0u8; head], 0)?;
        f.sync_all()?;
    }
    Ok(())
}

fn to_io<T>(e: glommio::GlommioError<T>) -> io::Error {
    e.into()
}

impl Device {
    /// Opens (creating if missing) the data file for O_DIRECT reads and writes.
    pub async fn open(path: &Path) -> io::Result<Device> {
        ensure_first_sectors_written(path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .dma_open(path)
            .await
            .map_err(to_io)?;
        if file.alignment() > SECTOR {
            return Err(io::Error::other(format!(
                "device alignment {} exceeds the sector size {SECTOR}",
                file.alignment()
            )));
        }
        Ok(Device {
            file,
            writes: Cell::new(0),
            reads: Cell::new(0),
            flushes: Cell::new(0),
        })
    }

    pub fn counters(&self) -> DeviceCounters {
        DeviceCounters {
            writes: self.writes.get(),
            reads: self.reads.get(),
            flushes: self.flushes.get(),
        }
    }

    /// A sector-aligned buffer of `sectors` sectors for a later write. Comes
    /// from glommio's registered io_memory, or from the heap (still 4 KiB
    /// aligned) when that pool is exhausted. NOT zeroed (pool memory is
    /// recycled): the caller must define every byte before writing it.
    pub fn alloc_buffer(&self, sectors: u64) -> DmaBuffer {
        assert!(sectors > 0, "zero-sized DMA buffers do not exist");
        self.file.alloc_dma_buffer((sectors * SECTOR) as usize)
    }

    pub async fn size_bytes(&self) -> io::Result<u64> {
        self.file.file_size().await.map_err(to_io)
    }

    /// Reserves blocks for the whole file so later writes do not allocate.
    pub async fn pre_allocate(&self, bytes: u64) -> io::Result<()> {
        self.file.pre_allocate(bytes, false).await.map_err(to_io)
    }

    /// Writes the whole buffer (whole sectors) at `at` with one DMA write.
    pub async fn write(&self, at: DiskSector, buf: DmaBuffer) -> io::Result<()> {
        let len = buf.len();
        assert!(len > 0 && len as u64 % SECTOR == 0);
        self.writes.set(self.writes.get() + 1);
        let written = self
            .file
            .write_at(buf, at.byte_offset())
            .await
            .map_err(to_io)?;
        if written != len {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "short device write: {written} of {len} bytes at sector {}",
                    at.0
                ),
            ));
        }
        Ok(())
    }

    /// Reads `sectors` whole sectors starting at `at`.
    pub async fn read(&self, at: DiskSector, sectors: u64) -> io::Result<ReadResult> {
        assert!(sectors > 0);
        let len = (sectors * SECTOR) as usize;
        self.reads.set(self.reads.get() + 1);
        let rr = self
            .file
            .read_at_aligned(at.byte_offset(), len)
            .await
            .map_err(to_io)?;
        if rr.len() != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "short device read: {} of {len} bytes at sector {}",
                    rr.len(),
                    at.0
                ),
            ));
        }
        Ok(rr)
    }

    /// `fdatasync` of the data file. Callers must treat an error as fatal for
    /// writes (fail-stop): the kernel may have dropped the dirty pages.
    pub async fn sync(&self) -> io::Result<()> {
        self.flushes.set(self.flushes.get() + 1);
        self.file.fdatasync().await.map_err(to_io)
    }
}
