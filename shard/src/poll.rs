//! Idle polling's one hazard: kernel work that must run on the shard's core.
//!
//! A shard thread may poll its rings for a while before it sleeps (glommio's
//! `spin_before_park`, the server's `poll_us`): a request arriving meanwhile
//! does not pay for waking a sleeping core, which on a VM is most of a
//! low-depth round trip. But a polling thread makes no system calls, and an
//! O_DSYNC write's completion (ext4's direct-I/O completion work, the cache
//! flush) runs in kernel workers on the core whose interrupt ended the
//! write, usually the shard's own. With lazy preemption a woken kernel
//! worker then waits for the scheduler tick: measured here, a QD1 durable
//! write took 1.2 ms with polling alone against 0.35 ms without.
//!
//! So the device layer counts the writes and syncs in flight on its thread
//! (one shard per thread), and a polling shard runs [`spawn_write_yielder`]:
//! while any is in flight, it gives the core to runnable kernel work every
//! [`YIELD_EVERY`].

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// How often a polling shard gives way while device writes are in flight.
pub const YIELD_EVERY: Duration = Duration::from_micros(20);

#[derive(Default)]
struct Tracker {
    in_flight: Cell<u64>,
    /// The yielder, waiting for the next write to start.
    waiter: RefCell<Option<Waker>>,
}

thread_local! {
    static TRACKER: Tracker = Tracker::default();
}

/// Device writes and syncs in flight on this thread now.
pub fn writes_in_flight() -> u64 {
    TRACKER.with(|t| t.in_flight.get())
}

/// Held for the duration of one device write or sync (dropped with its
/// future if that is cancelled). Not `Send`: it counts on its own thread.
pub(crate) struct WriteInFlight(std::marker::PhantomData<*const ()>);

impl WriteInFlight {
    pub(crate) fn enter() -> WriteInFlight {
        TRACKER.with(|t| {
            t.in_flight.set(t.in_flight.get() + 1);
            if let Some(w) = t.waiter.borrow_mut().take() {
                w.wake();
            }
        });
        WriteInFlight(std::marker::PhantomData)
    }
}

impl Drop for WriteInFlight {
    fn drop(&mut self) {
        TRACKER.with(|t| t.in_flight.set(t.in_flight.get() - 1));
    }
}

/// Ready once a device write or sync is in flight on this thread.
pub fn writes_started() -> impl Future<Output = ()> {
    WritesStarted
}

struct WritesStarted;

impl Future for WritesStarted {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        TRACKER.with(|t| {
            if t.in_flight.get() > 0 {
                Poll::Ready(())
            } else {
                *t.waiter.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}

/// For a shard thread that polls when idle: spawns (on the current glommio
/// executor) the task that, while device writes or syncs are in flight,
/// calls `sched_yield` every [`YIELD_EVERY`] so kernel workers woken on this
/// core run now, not at the next tick. Sleeps while none is in flight.
pub fn spawn_write_yielder() {
    glommio::spawn_local(async {
        loop {
            writes_started().await;
            while writes_in_flight() > 0 {
                glommio::timer::sleep(YIELD_EVERY).await;
                std::thread::yield_now();
            }
        }
    })
    .detach();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DmaStorage;
    use crate::layout::DiskSector;
    use crate::storage::Storage;
    use futures_lite::future::poll_once;

    /// On a real filesystem (O_DIRECT does not work on tmpfs).
    fn scratch() -> tempfile::TempDir {
        let base = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/tmp");
        std::fs::create_dir_all(base).unwrap();
        tempfile::tempdir_in(base).unwrap()
    }

    #[test]
    fn device_writes_and_syncs_are_counted_while_in_flight() {
        let dir = scratch();
        crate::run_test(async {
            let disk = DmaStorage::open(&dir.path().join("data"), false, true)
                .await
                .unwrap();
            disk.pre_allocate(1 << 20).await.unwrap();
            let mut started = Box::pin(writes_started());
            assert!(poll_once(&mut started).await.is_none());
            assert_eq!(writes_in_flight(), 0);

            let mut buf = disk.alloc_buffer(1);
            buf.as_bytes_mut().fill(7);
            let mut w = disk.write(DiskSector(2), buf);
            assert!(
                poll_once(&mut w).await.is_none(),
                "a device write is not instant"
            );
            assert_eq!(writes_in_flight(), 1);
            assert!(
                poll_once(&mut started).await.is_some(),
                "the waiter was not woken"
            );
            let mut s = disk.sync();
            assert!(poll_once(&mut s).await.is_none());
            assert_eq!(writes_in_flight(), 2);
            w.await.unwrap();
            s.await.unwrap();
            assert_eq!(writes_in_flight(), 0);

            let mut durable = disk.alloc_buffer(1);
            durable.as_bytes_mut().fill(8);
            let mut w = disk.write_durable(DiskSector(3), durable);
            assert!(poll_once(&mut w).await.is_none());
            assert_eq!(writes_in_flight(), 1);
            w.await.unwrap();
            assert_eq!(writes_in_flight(), 0);
        });
    }
}
