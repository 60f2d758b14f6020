//! Write combining: durable extent writes that queue behind the device share
//! one device write (group commit at the device, not at a flush).
//!
//! With the data area opened O_DSYNC each extent write is one device write
//! that is durable when it completes, so at depth N the device sees N writes
//! and N flushes. Here every durable write joins a queue, and device writes
//! start from it: a write with nothing queued ahead of it goes out at once,
//! alone, while fewer than `max_in_flight` device writes are in flight. When
//! writes have queued, the head and the writes that follow it on disk with
//! no gap go out as ONE durable device write (up to [`MAX_COMBINED_BYTES`]),
//! one such batch at a time: under a deep queue the writes gather while the
//! previous batch completes. The allocator hands out runs in order, so
//! writes that arrive together are usually adjacent. Each write is
//! acknowledged when the device write that carried it completes: still one
//! device write (shared) and no other synchronous write per acknowledgement.
//! With `max_in_flight` 0 (off) each write goes out at once, alone.
//!
//! Crash behaviour does not change: every extent in a combined write is
//! self-describing, so a torn combined write leaves some whole extents (never
//! acknowledged, entirely new) and a torn one that recovery discards, the
//! same as several torn writes would.
//!
//! Every device write runs in a task of its own, so a request cancelled
//! while it waits does not cancel a write that other requests ride in, and
//! the engine knows which disk ranges are still being written: a cancelled
//! request's run stays quarantined until no running write covers it (see
//! `Io::being_written`). A queued write whose request was cancelled before
//! its turn is skipped (its caller's guard gives up the run it was given:
//! see `Inner::erase_abandoned`). A write that fails is remembered even if
//! nobody waits for it, so
//! the shard still fail-stops.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use crate::layout::{DiskSector, SECTOR};
use crate::storage::IoBuf;

/// Largest combined device write, bytes: small enough to stay one request
/// at the device (128 pages of 4 KiB fit the usual segment limits), so the
/// kernel does not split it into requests that could persist out of order.
/// A single extent larger than this still goes out whole, alone.
pub const MAX_COMBINED_BYTES: u64 = 512 << 10;

/// The outcome of one queued write, and who waits for it.
#[derive(Default)]
pub(crate) struct Done {
    result: RefCell<Option<io::Result<()>>>,
    waker: RefCell<Option<Waker>>,
}

impl Done {
    pub(crate) fn finish(&self, r: io::Result<()>) {
        *self.result.borrow_mut() = Some(r);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// Waits for a queued write's outcome. Dropping it withdraws the write if it
/// has not gone to the device yet.
pub(crate) struct Wait(pub(crate) Rc<Done>);

impl Future for Wait {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(r) = self.0.result.borrow_mut().take() {
            return Poll::Ready(r);
        }
        *self.0.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

pub(crate) struct Queued {
    pub(crate) at: DiskSector,
    pub(crate) buf: IoBuf,
    pub(crate) done: Rc<Done>,
}

impl Queued {
    fn sectors(&self) -> u64 {
        self.buf.len() as u64 / SECTOR
    }

    /// Its waiter is gone (the request was cancelled).
    fn withdrawn(&self) -> bool {
        Rc::strong_count(&self.done) == 1
    }
}

/// The queue and the count of combined writes at the device.
pub(crate) struct Combiner {
    /// Durable device writes allowed at the device at once; 0 turns
    /// combining off (each durable write goes out alone, at once).
    pub(crate) max_in_flight: u32,
    pub(crate) in_flight: Cell<u32>,
    /// One of those is a batch of several writes from the queue: at most one
    /// at a time, so under a deep queue the writes gather into one large
    /// device write while the previous one completes (fewer, larger device
    /// writes cost less CPU and flush less), while a shallow stream of
    /// writes still goes out `max_in_flight` at once, each alone.
    pub(crate) batch_in_flight: Cell<bool>,
    queue: RefCell<VecDeque<Queued>>,
}

impl Combiner {
    pub(crate) fn new(max_in_flight: u32) -> Combiner {
        Combiner {
            max_in_flight,
            in_flight: Cell::new(0),
            batch_in_flight: Cell::new(false),
            queue: RefCell::new(VecDeque::new()),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.max_in_flight > 0
    }

    pub(crate) fn push(&self, q: Queued) {
        self.queue.borrow_mut().push_back(q);
    }

    /// Nothing queued and nothing at the device.
    pub(crate) fn idle(&self) -> bool {
        self.in_flight.get() == 0 && self.queue.borrow().is_empty()
    }

    /// A device write of `writes` queued writes starts.
    pub(crate) fn started(&self, writes: usize) {
        self.in_flight.set(self.in_flight.get() + 1);
        if writes > 1 {
            self.batch_in_flight.set(true);
        }
    }

    /// A device write of `writes` queued writes ended.
    pub(crate) fn ended(&self, writes: usize) {
        self.in_flight.set(self.in_flight.get() - 1);
        if writes > 1 {
            self.batch_in_flight.set(false);
        }
    }

    /// The next batch to write if a device write may start now: the first
    /// live queued write and the live writes after it that continue it on
    /// disk, within [`MAX_COMBINED_BYTES`]. Withdrawn writes at the front are
    /// dropped; one in the middle ends the batch (it would leave a gap).
    pub(crate) fn take_batch(&self) -> Option<Vec<Queued>> {
        let mut q = self.queue.borrow_mut();
        while q.front().is_some_and(Queued::withdrawn) {
            q.pop_front();
        }
        if !self.enabled() {
            // No combining: each write goes out at once, alone.
            return q.pop_front().map(|first| vec![first]);
        }
        if self.in_flight.get() >= self.max_in_flight || (self.batch_in_flight.get() && q.len() > 1)
        {
            return None;
        }
        let first = q.pop_front()?;
        let mut end = first.at.0 + first.sectors();
        let mut bytes = first.buf.len() as u64;
        let mut batch = vec![first];
        while let Some(next) = q.front() {
            if next.withdrawn()
                || next.at.0 != end
                || bytes + next.buf.len() as u64 > MAX_COMBINED_BYTES
            {
                break;
            }
            end += next.sectors();
            bytes += next.buf.len() as u64;
            batch.extend(q.pop_front());
        }
        Some(batch)
    }
}

/// The same outcome for another waiter (`io::Error` is not `Clone`): the OS
/// error code is kept, so ENOSPC stays ENOSPC.
pub(crate) fn share_result(r: &io::Result<()>) -> io::Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(e) => Err(match e.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(e.kind(), e.to_string()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(at: u64, sectors: u64) -> (Queued, Wait) {
        let done = Rc::new(Done::default());
        let q = Queued {
            at: DiskSector(at),
            buf: IoBuf::Heap(vec![0; (sectors * SECTOR) as usize]),
            done: done.clone(),
        };
        (q, Wait(done))
    }

    /// Queues writes of `(first sector, sectors)`; their waiters.
    fn fill(c: &Combiner, writes: &[(u64, u64)]) -> Vec<Wait> {
        writes
            .iter()
            .map(|&(at, n)| {
                let (q, w) = queued(at, n);
                c.push(q);
                w
            })
            .collect()
    }

    fn starts(batch: &[Queued]) -> Vec<u64> {
        batch.iter().map(|q| q.at.0).collect()
    }

    #[test]
    fn batches_take_adjacent_runs_only() {
        let c = Combiner::new(1);
        let _waits = fill(&c, &[(10, 2), (12, 2), (14, 3), (20, 2), (22, 1)]);
        assert_eq!(starts(&c.take_batch().unwrap()), [10, 12, 14]);
        c.in_flight.set(1);
        assert!(c.take_batch().is_none(), "at the in-flight limit");
        c.in_flight.set(0);
        c.batch_in_flight.set(true);
        assert!(c.take_batch().is_none(), "one batch at a time");
        c.batch_in_flight.set(false);
        assert_eq!(starts(&c.take_batch().unwrap()), [20, 22]);
        assert!(c.take_batch().is_none());
        assert!(c.idle());
    }

    #[test]
    fn off_means_each_write_alone_and_at_once() {
        let c = Combiner::new(0);
        let _waits = fill(&c, &[(0, 1), (1, 1), (2, 1)]);
        c.in_flight.set(100);
        assert_eq!(starts(&c.take_batch().unwrap()), [0]);
        assert_eq!(starts(&c.take_batch().unwrap()), [1]);
        assert_eq!(starts(&c.take_batch().unwrap()), [2]);
        assert!(c.take_batch().is_none());
    }

    #[test]
    fn a_lone_write_passes_a_batch_in_flight() {
        let c = Combiner::new(4);
        c.in_flight.set(1);
        c.batch_in_flight.set(true);
        let _w = fill(&c, &[(0, 1)]);
        assert_eq!(starts(&c.take_batch().unwrap()), [0], "nothing else queued");
        let _more = fill(&c, &[(10, 1), (11, 1)]);
        assert!(
            c.take_batch().is_none(),
            "a queue waits for the batch in flight"
        );
    }

    #[test]
    fn withdrawn_writes_are_skipped_and_end_a_batch() {
        let c = Combiner::new(1);
        let mut waits: Vec<_> = fill(&c, &[(0, 1), (1, 1), (2, 1), (3, 1)])
            .into_iter()
            .map(Some)
            .collect();
        waits[0] = None; // the first request was cancelled
        waits[2] = None; // and one in the middle
        assert_eq!(starts(&c.take_batch().unwrap()), [1]);
        assert_eq!(starts(&c.take_batch().unwrap()), [3]);
        assert!(c.take_batch().is_none());
    }

    #[test]
    fn a_batch_stays_within_the_byte_cap() {
        let c = Combiner::new(1);
        let per = MAX_COMBINED_BYTES / SECTOR / 4; // four fill the cap
        let writes: Vec<_> = (0..6).map(|i| (i * per, per)).collect();
        let _waits = fill(&c, &writes);
        assert_eq!(c.take_batch().unwrap().len(), 4);
        assert_eq!(c.take_batch().unwrap().len(), 2);
        // One extent over the cap still goes, alone.
        let big = 2 * MAX_COMBINED_BYTES / SECTOR;
        let _more = fill(&c, &[(1000, big), (1000 + big, 1)]);
        assert_eq!(c.take_batch().unwrap().len(), 1);
    }

    #[test]
    fn shared_errors_keep_their_os_code() {
        let e: io::Result<()> = Err(io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(
            share_result(&e).unwrap_err().raw_os_error(),
            Some(libc::ENOSPC)
        );
        let e: io::Result<()> = Err(io::Error::new(io::ErrorKind::WriteZero, "short"));
        let s = share_result(&e).unwrap_err();
        assert_eq!(
            (s.kind(), s.to_string()),
            (io::ErrorKind::WriteZero, "short".into())
        );
    }
}
