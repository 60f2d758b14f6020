//! A semaphore whose waiters may be cancelled.
//!
//! glommio 0.9's `Semaphore` hands released units to its first waiter by
//! waking it and unlinking it from the wait list, without setting the units
//! aside for it. If that waiter's task is cancelled before it runs again (a
//! request whose client went away), its future is dropped already unlinked:
//! the units stay available, yet no other waiter is woken, and those wait
//! forever. The simulator found it (seed 1921): a write cancelled while it
//! waited for the checkpoint lock left every later write of the shard
//! waiting for that lock.
//!
//! This wrapper's acquire, when dropped unfinished, first drops glommio's
//! waiter, then signals zero units: that wakes the next waiter when units
//! are available, and does nothing otherwise. Every semaphore a request can
//! wait on in this crate is one of these.

use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

/// What an acquire fails with: the semaphore was closed.
pub type Closed = glommio::GlommioError<()>;

pub struct Semaphore(glommio::sync::Semaphore);

/// Units held; given back when dropped.
pub struct Permit<S: Deref<Target = Semaphore>> {
    sem: S,
    units: u64,
}

impl<S: Deref<Target = Semaphore>> Drop for Permit<S> {
    fn drop(&mut self) {
        self.sem.0.signal(self.units);
    }
}

type Wait<'a> = Pin<Box<dyn Future<Output = Result<(), Closed>> + 'a>>;

/// Resolves once `units` are taken; see the module docs for its drop.
struct Acquire<'a> {
    sem: &'a Semaphore,
    units: u64,
    /// glommio's waiter, once the units were not there at the first poll.
    wait: Option<Wait<'a>>,
}

impl Future for Acquire<'_> {
    type Output = Result<(), Closed>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if this.wait.is_none() {
            if this.sem.0.try_acquire(this.units)? {
                return Poll::Ready(Ok(()));
            }
            this.wait = Some(Box::pin(this.sem.0.acquire(this.units)));
        }
        let res = this.wait.as_mut().expect("set above").as_mut().poll(cx);
        if res.is_ready() {
            this.wait = None;
        }
        res
    }
}

impl Drop for Acquire<'_> {
    fn drop(&mut self) {
        if let Some(wait) = self.wait.take() {
            // In this order: glommio's waiter must be off the list (or
            // already unlinked by a wake it will never act on) before the
            // next one is woken in its place.
            drop(wait);
            self.sem.0.signal(0);
        }
    }
}

impl Semaphore {
    pub fn new(units: u64) -> Semaphore {
        Semaphore(glommio::sync::Semaphore::new(units))
    }

    pub fn available(&self) -> u64 {
        self.0.available()
    }

    /// Adds units (a counting semaphore's "post").
    pub fn signal(&self, units: u64) {
        self.0.signal(units);
    }

    /// Wakes every waiter with an error; later acquires fail at once.
    pub fn close(&self) {
        self.0.close();
    }

    /// Takes `units` for good (a counting semaphore's "wait").
    pub async fn acquire(&self, units: u64) -> Result<(), Closed> {
        Acquire {
            sem: self,
            units,
            wait: None,
        }
        .await
    }

    pub async fn acquire_permit(&self, units: u64) -> Result<Permit<&Semaphore>, Closed> {
        self.acquire(units).await?;
        Ok(Permit { sem: self, units })
    }

    /// A permit that holds the semaphore alive itself.
    pub async fn acquire_rc_permit(
        self: &Rc<Self>,
        units: u64,
    ) -> Result<Permit<Rc<Self>>, Closed> {
        self.acquire(units).await?;
        Ok(Permit {
            sem: self.clone(),
            units,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_test;
    use std::cell::Cell;
    use std::time::Duration;

    /// The waiter a release woke is cancelled before it runs: the next
    /// waiter must get the unit. With glommio's semaphore alone (acquire
    /// through `sem.0`) the second waiter is never woken.
    #[test]
    fn a_cancelled_woken_waiter_passes_its_turn_on() {
        run_test(async {
            let sem = Rc::new(Semaphore::new(1));
            let held = sem.acquire_permit(1).await.unwrap();
            let got = Rc::new(Cell::new(0u32));
            let waiter = |sem: Rc<Semaphore>, got: Rc<Cell<u32>>| async move {
                let _p = sem.acquire_permit(1).await.unwrap();
                got.set(got.get() + 1);
            };
            let first = glommio::spawn_local(waiter(sem.clone(), got.clone()));
            let second = glommio::spawn_local(waiter(sem.clone(), got.clone()));
            // Both are waiting now.
            glommio::timer::sleep(Duration::from_millis(5)).await;
            assert_eq!(got.get(), 0);
            // The release wakes `first`; it is cancelled before it runs.
            drop(held);
            drop(first);
            let waited = glommio::timer::timeout(Duration::from_secs(2), async {
                second.await;
                Ok(())
            })
            .await;
            assert!(waited.is_ok(), "the second waiter was never woken");
            assert_eq!(got.get(), 1);
            assert_eq!(sem.available(), 1);
        });
    }

    #[test]
    fn permits_give_their_units_back_and_close_fails_waiters() {
        run_test(async {
            let sem = Rc::new(Semaphore::new(3));
            let a = sem.acquire_permit(2).await.unwrap();
            let b = sem.acquire_rc_permit(1).await.unwrap();
            assert_eq!(sem.available(), 0);
            drop(a);
            assert_eq!(sem.available(), 2);
            drop(b);
            assert_eq!(sem.available(), 3);
            let blocked = {
                let sem = sem.clone();
                glommio::spawn_local(async move { sem.acquire(4).await.is_err() })
            };
            glommio::timer::sleep(Duration::from_millis(2)).await;
            sem.close();
            assert!(blocked.await, "a waiter of a closed semaphore fails");
            assert!(sem.acquire(1).await.is_err());
        });
    }
}
