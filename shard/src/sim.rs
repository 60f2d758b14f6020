//! A seeded, reproducible simulated disk (after TigerBeetle's
//! `testing/storage.zig`) and a simulated index store, for tests.
//!
//! [`SimDisk`] keeps durable bytes plus the list of writes not yet made
//! durable by a `sync`. Reads see both. At [`SimDisk::crash`] every unsynced
//! write is, independently and in a random order (reordering), lost, kept, or
//! torn at a 512-byte boundary; the index store keeps its last flushed state
//! plus a random prefix of the batches applied since (what sled promises;
//! the shard's index applies one checkpoint batch at a time and flushes it
//! right away, so that is at most the batch being flushed).
//!
//! Faults ([`SimFaults`], each "one in N", 0 = never): EIO on read, write or
//! flush, ENOSPC on write, and silent ones: a flipped bit, a zeroed sector, a
//! misdirected write (lands at another sector), a dropped write (reported
//! done, never stored). A failed flush loses a random subset of the unsynced
//! writes, as Linux may after an fsync error.
//!
//! Cloning a `SimDisk` gives another handle to the same disk, so a test keeps
//! the disk across shard "reboots".

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::ops::Bound;
use std::rc::Rc;

use crate::layout::{DiskSector, SECTOR};
use crate::storage::{IoBuf, IoFuture, ReadBuf, Storage};

/// Fault rates, each "one in N operations" (0: never).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimFaults {
    pub read_eio: u32,
    pub write_eio: u32,
    pub flush_eio: u32,
    pub write_enospc: u32,
    pub bit_flip: u32,
    pub zero_sector: u32,
    pub misdirect: u32,
    pub drop_write: u32,
}

/// Counters of faults the disk injected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimFaultCounts {
    pub read_eio: u64,
    pub write_eio: u64,
    pub flush_eio: u64,
    pub write_enospc: u64,
    pub bit_flip: u64,
    pub zero_sector: u64,
    pub misdirect: u64,
    pub drop_write: u64,
    pub crash_lost: u64,
    pub crash_torn: u64,
}

/// Small deterministic RNG (xorshift64*).
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    /// True one time in `n` (never for 0).
    pub fn one_in(&mut self, n: u32) -> bool {
        n != 0 && self.below(u64::from(n)) == 0
    }
}

struct DiskState {
    rng: SimRng,
    durable: Vec<u8>,
    /// Writes since the last sync, in completion order.
    pending: Vec<(usize, Vec<u8>)>,
    faults: SimFaults,
    counts: SimFaultCounts,
    /// Sectors below this are never targets of injected corruption (the
    /// superblock copies), so tests of data faults stay about data.
    protect_below: u64,
    /// Writes are durable on completion (O_DSYNC); see `set_write_through`.
    write_through: bool,
    /// Writes wait (do not complete) while set; see `hold_writes`.
    hold_writes: bool,
    /// Reads wait while set; see `hold_reads`.
    hold_reads: bool,
    /// Sectors every read of which fails with EIO; see `fail_reads_of`.
    unreadable: std::collections::BTreeSet<u64>,
    /// Writes to let through, then writes to fail; see `fail_writes_after`.
    fail_plan: (u32, u32),
}

/// The simulated disk. See the module docs.
#[derive(Clone)]
pub struct SimDisk {
    state: Rc<RefCell<DiskState>>,
    kv: MemKv,
}

impl SimDisk {
    /// A zeroed disk of `bytes` (rounded down to whole sectors).
    pub fn new(bytes: u64, seed: u64) -> SimDisk {
        let bytes = (bytes / SECTOR * SECTOR) as usize;
        SimDisk {
            state: Rc::new(RefCell::new(DiskState {
                rng: SimRng::new(seed),
                durable: vec![0; bytes],
                pending: Vec::new(),
                faults: SimFaults::default(),
                counts: SimFaultCounts::default(),
                protect_below: 2,
                write_through: false,
                hold_writes: false,
                hold_reads: false,
                unreadable: Default::default(),
                fail_plan: (0, 0),
            })),
            kv: MemKv::default(),
        }
    }

    /// The simulated index store that survives with this disk.
    pub fn kv(&self) -> MemKv {
        self.kv.clone()
    }

    /// Makes every write durable when it completes, like a file opened with
    /// O_DSYNC; a flush fault then hits writes (torn, EIO).
    pub fn set_write_through(&self, on: bool) {
        self.state.borrow_mut().write_through = on;
    }

    /// While on, writes to the data area stay in flight (a slow device):
    /// they complete, in order, once it is turned off.
    pub fn hold_writes(&self, on: bool) {
        self.state.borrow_mut().hold_writes = on;
    }

    /// While on, reads of the data area stay in flight; they complete
    /// (with what the disk holds then) once it is turned off.
    pub fn hold_reads(&self, on: bool) {
        self.state.borrow_mut().hold_reads = on;
    }

    /// Every read that covers `sector` fails with EIO from now on (a
    /// media error).
    pub fn fail_reads_of(&self, sector: u64) {
        self.state.borrow_mut().unreadable.insert(sector);
    }

    /// The next `pass` writes complete as usual, then the `fail` after
    /// them fail with ENOSPC: a fault placed on one write, not a rate.
    pub fn fail_writes_after(&self, pass: u32, fail: u32) {
        self.state.borrow_mut().fail_plan = (pass, fail);
    }

    pub fn set_faults(&self, faults: SimFaults) {
        self.state.borrow_mut().faults = faults;
    }

    pub fn fault_counts(&self) -> SimFaultCounts {
        self.state.borrow().counts
    }

    /// Power loss: unsynced writes are lost, kept or torn, in random order;
    /// the index store keeps its flushed state plus a random prefix.
    pub fn crash(&self) {
        let mut st = self.state.borrow_mut();
        let mut pending = std::mem::take(&mut st.pending);
        // Reorder: apply the survivors in a random order.
        for i in (1..pending.len()).rev() {
            let j = st.rng.below(i as u64 + 1) as usize;
            pending.swap(i, j);
        }
        for (at, data) in pending {
            match st.rng.below(3) {
                0 => st.counts.crash_lost += 1,
                1 => st.durable[at..at + data.len()].copy_from_slice(&data),
                _ => {
                    // Torn at a 512-byte boundary: a prefix lands.
                    let pieces = data.len() / 512;
                    let keep = st.rng.below(pieces as u64) as usize * 512;
                    st.durable[at..at + keep].copy_from_slice(&data[..keep]);
                    st.counts.crash_torn += 1;
                }
            }
        }
        let keep = st.rng.next_u64();
        drop(st);
        self.kv.crash(keep);
    }

    /// Flips one bit of a durable sector (for targeted tests).
    pub fn flip_bit(&self, sector: u64, byte: usize) {
        let mut st = self.state.borrow_mut();
        st.durable[(sector * SECTOR) as usize + byte] ^= 0x04;
    }

    /// The durable bytes of one sector.
    pub fn sector(&self, sector: u64) -> Vec<u8> {
        let st = self.state.borrow();
        let at = (sector * SECTOR) as usize;
        st.durable[at..at + SECTOR as usize].to_vec()
    }

    /// Overwrites a durable sector (for targeted tests).
    pub fn put_sector(&self, sector: u64, bytes: &[u8]) {
        let mut st = self.state.borrow_mut();
        let at = (sector * SECTOR) as usize;
        st.durable[at..at + SECTOR as usize].copy_from_slice(bytes);
    }

    /// Number of sectors.
    pub fn sectors(&self) -> u64 {
        self.state.borrow().durable.len() as u64 / SECTOR
    }

    fn write_async(&self, at: DiskSector, buf: IoBuf, durable: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            // Let other tasks run, as a real device would.
            futures_lite::future::yield_now().await;
            while self.state.borrow().hold_writes {
                glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
            }
            self.do_write(at, buf, durable)
        })
    }

    /// `durable`: this one write is durable on completion (O_DSYNC), as
    /// every write is with `write_through`.
    fn do_write(&self, at: DiskSector, buf: IoBuf, durable: bool) -> io::Result<()> {
        let mut st = self.state.borrow_mut();
        let mut data = match buf {
            IoBuf::Heap(v) => v,
            IoBuf::Dma(b) => b.as_bytes().to_vec(),
        };
        let mut off = (at.0 * SECTOR) as usize;
        if off + data.len() > st.durable.len() {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        match st.fail_plan {
            (0, 0) => {}
            (0, fail) => {
                st.fail_plan = (0, fail - 1);
                st.counts.write_enospc += 1;
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            (pass, fail) => st.fail_plan = (pass - 1, fail),
        }
        let f = st.faults;
        if st.rng.one_in(f.write_eio) {
            st.counts.write_eio += 1;
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if st.rng.one_in(f.write_enospc) {
            st.counts.write_enospc += 1;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let sectors = data.len() / SECTOR as usize;
        if at.0 >= st.protect_below {
            if st.rng.one_in(f.drop_write) {
                st.counts.drop_write += 1;
                return Ok(());
            }
            if st.rng.one_in(f.bit_flip) {
                let i = st.rng.below(data.len() as u64) as usize;
                data[i] ^= 1 << st.rng.below(8);
                st.counts.bit_flip += 1;
            }
            if st.rng.one_in(f.zero_sector) {
                let s = st.rng.below(sectors as u64) as usize * SECTOR as usize;
                data[s..s + SECTOR as usize].fill(0);
                st.counts.zero_sector += 1;
            }
            if st.rng.one_in(f.misdirect) {
                let total = st.durable.len() as u64 / SECTOR;
                let room = total.saturating_sub(st.protect_below + sectors as u64);
                off = ((st.protect_below + st.rng.below(room + 1)) * SECTOR) as usize;
                st.counts.misdirect += 1;
            }
        }
        if st.write_through || durable {
            // O_DSYNC: durable when the write completes. A failing write may
            // have reached the media in part (torn at a sector boundary).
            if st.rng.one_in(f.flush_eio) {
                st.counts.flush_eio += 1;
                let keep = st.rng.below(sectors as u64 + 1) as usize * SECTOR as usize;
                st.durable[off..off + keep].copy_from_slice(&data[..keep]);
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            st.durable[off..off + data.len()].copy_from_slice(&data);
            return Ok(());
        }
        st.pending.push((off, data));
        Ok(())
    }

    fn do_read(&self, at: DiskSector, sectors: u64) -> io::Result<ReadBuf> {
        let mut st = self.state.borrow_mut();
        let f = st.faults;
        if st.rng.one_in(f.read_eio) || st.unreadable.range(at.0..at.0 + sectors).next().is_some() {
            st.counts.read_eio += 1;
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let start = (at.0 * SECTOR) as usize;
        let len = (sectors * SECTOR) as usize;
        if start + len > st.durable.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the simulated disk",
            ));
        }
        let mut out = st.durable[start..start + len].to_vec();
        for (off, data) in &st.pending {
            let (ws, we) = (*off, off + data.len());
            let (s, e) = (ws.max(start), we.min(start + len));
            if s < e {
                out[s - start..e - start].copy_from_slice(&data[s - ws..e - ws]);
            }
        }
        Ok(ReadBuf::from_vec(out))
    }

    fn do_sync(&self) -> io::Result<()> {
        let mut st = self.state.borrow_mut();
        let f = st.faults;
        let pending = std::mem::take(&mut st.pending);
        if st.rng.one_in(f.flush_eio) {
            st.counts.flush_eio += 1;
            // The kernel may have dropped some of the dirty data.
            for (at, data) in pending {
                if st.rng.below(2) == 0 {
                    st.durable[at..at + data.len()].copy_from_slice(&data);
                }
            }
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        for (at, data) in pending {
            st.durable[at..at + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }
}

impl Storage for SimDisk {
    fn alloc_buffer(&self, sectors: u64) -> IoBuf {
        IoBuf::Heap(vec![0xa5; (sectors * SECTOR) as usize])
    }

    fn size_bytes(&self) -> IoFuture<'_, u64> {
        let n = self.state.borrow().durable.len() as u64;
        Box::pin(async move { Ok(n) })
    }

    fn pre_allocate(&self, bytes: u64) -> IoFuture<'_, ()> {
        let n = self.state.borrow().durable.len() as u64;
        Box::pin(async move {
            if bytes > n {
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            } else {
                Ok(())
            }
        })
    }

    fn write(&self, at: DiskSector, buf: IoBuf) -> IoFuture<'_, ()> {
        self.write_async(at, buf, false)
    }

    fn can_write_durable(&self) -> bool {
        true
    }

    fn write_durable(&self, at: DiskSector, buf: IoBuf) -> IoFuture<'_, ()> {
        self.write_async(at, buf, true)
    }

    fn read(&self, at: DiskSector, sectors: u64) -> IoFuture<'_, ReadBuf> {
        Box::pin(async move {
            while self.state.borrow().hold_reads {
                glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
            }
            self.do_read(at, sectors)
        })
    }

    fn sync(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            futures_lite::future::yield_now().await;
            self.do_sync()
        })
    }

    fn describe(&self) -> String {
        format!("simulated disk of {} sectors", self.sectors())
    }

    fn write_through(&self) -> bool {
        self.state.borrow().write_through
    }
}

type Map = BTreeMap<Vec<u8>, Vec<u8>>;
/// One batch: `(key, Some(value))` inserts, `(key, None)` removes.
pub type KvBatch = Vec<(Vec<u8>, Option<Vec<u8>>)>;

#[derive(Default)]
struct KvState {
    durable: Map,
    current: Map,
    /// Batches applied since the last flush.
    log: Vec<KvBatch>,
}

/// An in-memory ordered key-value store with sled's crash semantics: after a
/// crash it holds its last flushed state plus a prefix of later batches.
#[derive(Clone, Default)]
pub struct MemKv {
    state: Rc<RefCell<KvState>>,
}

impl MemKv {
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.state.borrow().current.get(key).cloned()
    }

    pub fn apply(&self, batch: KvBatch) {
        let mut st = self.state.borrow_mut();
        for (k, v) in &batch {
            match v {
                Some(v) => st.current.insert(k.clone(), v.clone()),
                None => st.current.remove(k),
            };
        }
        st.log.push(batch);
    }

    pub fn flush(&self) {
        let mut st = self.state.borrow_mut();
        st.durable = st.current.clone();
        st.log.clear();
    }

    /// Entries with keys in the range, in order.
    pub fn range(&self, lo: Bound<Vec<u8>>, hi: Bound<Vec<u8>>) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.state
            .borrow()
            .current
            .range((lo, hi))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.state.borrow().current.is_empty()
    }

    pub fn clear(&self) {
        let mut st = self.state.borrow_mut();
        st.current.clear();
        st.log.push(vec![]);
        // A clear is modelled as durable at once (only rebuilds use it).
        st.durable.clear();
        st.log.clear();
    }

    /// Loses everything not flushed, except a prefix of the batches chosen by `keep`.
    pub fn crash(&self, keep: u64) {
        let mut st = self.state.borrow_mut();
        let n = (keep % (st.log.len() as u64 + 1)) as usize;
        let mut m = st.durable.clone();
        for batch in &st.log[..n] {
            for (k, v) in batch {
                match v {
                    Some(v) => m.insert(k.clone(), v.clone()),
                    None => m.remove(k),
                };
            }
        }
        st.durable = m.clone();
        st.current = m;
        st.log.clear();
    }

    /// Drops the whole store (a lost index).
    pub fn wipe(&self) {
        let mut st = self.state.borrow_mut();
        *st = KvState::default();
    }

    /// Removes one key durably (a damaged index, for tests).
    pub fn remove_durably(&self, key: &[u8]) {
        let mut st = self.state.borrow_mut();
        st.current.remove(key);
        st.durable.remove(key);
    }
}
