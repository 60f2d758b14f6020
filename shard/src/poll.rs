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
//! So a polling shard (`ShardConfig::yield_while_writing`) runs
//! [`spawn_write_yielder`]: while the I/O layer has a device write or sync
//! running, it gives the core to runnable kernel work every
//! [`YIELD_EVERY`].

use std::task::Poll;
use std::time::Duration;

use crate::storage::{Io, WeakIo};

/// How often a polling shard gives way while device writes are in flight.
pub(crate) const YIELD_EVERY: Duration = Duration::from_micros(20);

/// Ready with true once `io` has a device write or sync running, with false
/// once it is gone (the shard was dropped).
async fn device_write_started(io: &WeakIo) -> bool {
    std::future::poll_fn(|cx| match io.upgrade() {
        None => Poll::Ready(false),
        Some(io) if io.device_writes_in_flight() > 0 => Poll::Ready(true),
        Some(io) => {
            io.wake_on_device_write(cx);
            Poll::Pending
        }
    })
    .await
}

/// Spawns (on the current glommio executor) the task that, while `io` has
/// device writes or syncs running, calls `sched_yield` every
/// [`YIELD_EVERY`] so kernel workers woken on this core run now, not at the
/// next tick. It sleeps while none runs, and ends with the shard.
pub(crate) fn spawn_write_yielder(io: &Io) {
    let io = io.downgrade();
    glommio::spawn_local(async move {
        while device_write_started(&io).await {
            while io
                .upgrade()
                .is_some_and(|io| io.device_writes_in_flight() > 0)
            {
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
            let io = Io::new(Box::new(disk), 0);
            io.pre_allocate(1 << 20).await.unwrap();
            let weak = io.downgrade();
            let mut started = Box::pin(device_write_started(&weak));
            assert!(poll_once(&mut started).await.is_none());
            assert_eq!(io.device_writes_in_flight(), 0);

            let mut buf = io.alloc_buffer(1);
            buf.as_bytes_mut().fill(7);
            let mut w = Box::pin(io.write(DiskSector(2), buf));
            assert!(
                poll_once(&mut w).await.is_none(),
                "a device write is not instant"
            );
            assert_eq!(io.device_writes_in_flight(), 1);
            assert!(
                poll_once(&mut started).await.is_some(),
                "the waiter was not woken"
            );
            let mut s = Box::pin(io.sync());
            assert!(poll_once(&mut s).await.is_none());
            assert_eq!(io.device_writes_in_flight(), 2);
            w.await.unwrap();
            s.await.unwrap();
            assert_eq!(io.device_writes_in_flight(), 0);

            // A task waiting for a write to start is woken by it.
            let woken = glommio::spawn_local({
                let weak = io.downgrade();
                async move { device_write_started(&weak).await }
            });
            futures_lite::future::yield_now().await;
            let mut durable = io.alloc_buffer(1);
            durable.as_bytes_mut().fill(8);
            let mut w = Box::pin(io.write_durable(DiskSector(3), durable));
            assert!(poll_once(&mut w).await.is_none());
            assert_eq!(io.device_writes_in_flight(), 1);
            w.await.unwrap();
            assert_eq!(io.device_writes_in_flight(), 0);
            let woken = futures_lite::future::or(async { Some(woken.await) }, async {
                glommio::timer::sleep(Duration::from_secs(5)).await;
                None
            });
            assert_eq!(woken.await, Some(true), "the waiting task was not woken");
        });
    }
}
