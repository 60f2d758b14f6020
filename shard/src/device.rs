//! The glommio DMA implementation of [`Storage`]: a data file in the shard's
//! folder, or a range of a raw block device (or partition), opened O_DIRECT.
//!
//! All positions and sizes are whole sectors. A short read or write is an
//! error here (`UnexpectedEof` / `WriteZero`), so callers never see partial
//! sectors. Positions are relative to the start of the range.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use glommio::io::{DmaFile, OpenOptions};

use crate::layout::{DiskSector, DATA_START_SECTOR, SECTOR};
use crate::storage::{IoBuf, IoFuture, ReadBuf, Storage};

/// A range of a raw block device (or of any file) used as one shard's area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRange {
    pub path: PathBuf,
    /// Start of the range, a multiple of the sector size.
    pub offset_bytes: u64,
    /// Length of the range, a multiple of the sector size.
    pub len_bytes: u64,
}

/// Whether `path` is a block device.
pub fn is_block_device(path: &Path) -> io::Result<bool> {
    Ok(std::fs::metadata(path)?.file_type().is_block_device())
}

/// Size of a block device (`BLKGETSIZE64`) or of a regular file.
pub fn device_size_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::io::AsRawFd;
    if !is_block_device(path)? {
        return Ok(std::fs::metadata(path)?.len());
    }
    let f = std::fs::File::open(path)?;
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: the ioctl writes one u64 into `size`, which outlives the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

pub struct DmaStorage {
    file: DmaFile,
    what: String,
    /// Byte offset of sector 0 in the file or device.
    base: u64,
    /// Length of the range for a block device (`file_size` is 0 there).
    range_len: Option<u64>,
    /// Opened with O_DSYNC: every completed write is durable.
    dsync: bool,
    /// A second descriptor of the same file or range, opened with O_DSYNC,
    /// for `write_durable` (adaptive sync; `None` when not asked for, or
    /// when `file` is O_DSYNC already).
    dsync_file: Option<DmaFile>,
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

/// The O_DSYNC twin descriptor of `open`/`open_range`, when asked for and
/// the main one is not O_DSYNC already.
async fn open_dsync_twin(
    path: &Path,
    dsync: bool,
    durable_path: bool,
) -> io::Result<Option<DmaFile>> {
    if dsync || !durable_path {
        return Ok(None);
    }
    Ok(Some(dma_open(path, false, true).await?))
}

/// Opens `path` for O_DIRECT reads and writes (creating a missing file with
/// `create`), O_DSYNC with `dsync`, and checks its alignment.
async fn dma_open(path: &Path, create: bool, dsync: bool) -> io::Result<DmaFile> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .custom_flags(if dsync { libc::O_DSYNC } else { 0 })
        .dma_open(path)
        .await
        .map_err(to_io)?;
    check_alignment(&file)?;
    Ok(file)
}

fn to_io<T>(e: glommio::GlommioError<T>) -> io::Error {
    e.into()
}

impl DmaStorage {
    /// Opens a range of a block device for O_DIRECT reads and writes; with
    /// `dsync`, O_DSYNC; with `durable_path`, also a second O_DSYNC
    /// descriptor for `write_durable`.
    pub async fn open_range(
        range: &DeviceRange,
        dsync: bool,
        durable_path: bool,
    ) -> io::Result<DmaStorage> {
        if range.offset_bytes % SECTOR != 0 || range.len_bytes % SECTOR != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("device range {range:?} is not sector-aligned"),
            ));
        }
        let size = device_size_bytes(&range.path)?;
        if range.offset_bytes + range.len_bytes > size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} has {size} bytes, the range needs {}",
                    range.path.display(),
                    range.offset_bytes + range.len_bytes
                ),
            ));
        }
        let file = dma_open(&range.path, false, dsync).await?;
        Ok(DmaStorage {
            dsync_file: open_dsync_twin(&range.path, dsync, durable_path).await?,
            file,
            what: format!(
                "{} bytes {}..{}",
                range.path.display(),
                range.offset_bytes,
                range.offset_bytes + range.len_bytes
            ),
            base: range.offset_bytes,
            range_len: Some(range.len_bytes),
            dsync,
        })
    }

    /// Opens (creating if missing) the data file for O_DIRECT reads and
    /// writes; with `dsync`, also O_DSYNC (each write durable on completion);
    /// with `durable_path`, also a second O_DSYNC descriptor for
    /// `write_durable`.
    pub async fn open(path: &Path, dsync: bool, durable_path: bool) -> io::Result<DmaStorage> {
        ensure_first_sectors_written(path)?;
        let file = dma_open(path, true, dsync).await?;
        Ok(DmaStorage {
            dsync_file: open_dsync_twin(path, dsync, durable_path).await?,
            file,
            what: path.display().to_string(),
            base: 0,
            range_len: None,
            dsync,
        })
    }

    /// A sector-aligned buffer of `sectors` sectors for a later write. Comes
    /// from glommio's registered io_memory, or from the heap (still 4 KiB
    /// aligned) when that pool is exhausted. NOT zeroed (pool memory is
    /// recycled): the caller must define every byte before writing it.
    async fn size(&self) -> io::Result<u64> {
        match self.range_len {
            Some(n) => Ok(n),
            None => self.file.file_size().await.map_err(to_io),
        }
    }

    /// Reserves blocks for the whole file so later writes do not allocate.
    async fn pre_allocate_impl(&self, bytes: u64) -> io::Result<()> {
        if self.range_len.is_some() {
            return Ok(());
        }
        self.file.pre_allocate(bytes, false).await.map_err(to_io)
    }

    /// Writes the whole buffer (whole sectors) at `at` with one DMA write.
    async fn write_impl(&self, file: &DmaFile, at: DiskSector, buf: IoBuf) -> io::Result<()> {
        let len = buf.len();
        assert!(len > 0 && len as u64 % SECTOR == 0);
        let buf = match buf {
            IoBuf::Dma(b) => b,
            IoBuf::Heap(v) => {
                let mut b = self.file.alloc_dma_buffer(v.len());
                b.as_bytes_mut().copy_from_slice(&v);
                b
            }
        };
        let written = file
            .write_at(buf, self.base + at.byte_offset())
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
    async fn read_impl(&self, at: DiskSector, sectors: u64) -> io::Result<ReadBuf> {
        assert!(sectors > 0);
        let len = (sectors * SECTOR) as usize;
        let rr = self
            .file
            .read_at_aligned(self.base + at.byte_offset(), len)
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
        Ok(ReadBuf::Dma(rr))
    }
}

fn check_alignment(file: &DmaFile) -> io::Result<()> {
    if file.alignment() > SECTOR {
        return Err(io::Error::other(format!(
            "device alignment {} exceeds the sector size {SECTOR}",
            file.alignment()
        )));
    }
    Ok(())
}

impl Storage for DmaStorage {
    /// A sector-aligned buffer from glommio's registered io_memory, or from
    /// the heap (still aligned) when that pool is exhausted. NOT zeroed.
    fn alloc_buffer(&self, sectors: u64) -> IoBuf {
        IoBuf::Dma(self.file.alloc_dma_buffer((sectors * SECTOR) as usize))
    }

    fn size_bytes(&self) -> IoFuture<'_, u64> {
        Box::pin(self.size())
    }

    fn pre_allocate(&self, bytes: u64) -> IoFuture<'_, ()> {
        Box::pin(self.pre_allocate_impl(bytes))
    }

    fn write(&self, at: DiskSector, buf: IoBuf) -> IoFuture<'_, ()> {
        Box::pin(self.write_impl(&self.file, at, buf))
    }

    fn can_write_durable(&self) -> bool {
        self.dsync || self.dsync_file.is_some()
    }

    fn write_durable(&self, at: DiskSector, buf: IoBuf) -> IoFuture<'_, ()> {
        match (&self.dsync_file, self.dsync) {
            (Some(f), _) => Box::pin(self.write_impl(f, at, buf)),
            (None, true) => self.write(at, buf),
            (None, false) => Box::pin(async {
                Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "opened without a durable-write descriptor",
                ))
            }),
        }
    }

    fn read(&self, at: DiskSector, sectors: u64) -> IoFuture<'_, ReadBuf> {
        Box::pin(self.read_impl(at, sectors))
    }

    /// `fdatasync`. Callers must treat an error as fatal for writes
    /// (fail-stop): the kernel may have dropped the dirty pages.
    fn sync(&self) -> IoFuture<'_, ()> {
        Box::pin(async { self.file.fdatasync().await.map_err(to_io) })
    }

    fn describe(&self) -> String {
        self.what.clone()
    }

    fn write_through(&self) -> bool {
        self.dsync
    }
}

/// Smallest per-shard range `split_device` accepts.
pub const MIN_DEVICE_RANGE_BYTES: u64 = 16 << 20;

/// Splits a block device (or partition, or file) into `shard_count` equal,
/// 1 MiB-aligned ranges, one per shard; refuses a device too small.
pub fn split_device(path: &Path, shard_count: u32) -> io::Result<Vec<DeviceRange>> {
    let size = device_size_bytes(path)?;
    let align = 1u64 << 20;
    let per = size / u64::from(shard_count.max(1)) / align * align;
    if per < MIN_DEVICE_RANGE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "device {} has {size} bytes: too small for {shard_count} shards of at least {} MiB",
                path.display(),
                MIN_DEVICE_RANGE_BYTES >> 20
            ),
        ));
    }
    Ok((0..u64::from(shard_count))
        .map(|i| DeviceRange {
            path: path.to_path_buf(),
            offset_bytes: i * per,
            len_bytes: per,
        })
        .collect())
}
