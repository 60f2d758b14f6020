//! Group commit: many concurrent tasks of one executor share one flush.
//!
//! A caller takes a ticket *after* its own write completed, then waits until a
//! flush that was *issued after* the ticket was taken has completed. If such
//! a flush is already in flight it waits for it; otherwise it issues one,
//! unless `max_in_flight` flushes are running (then it waits for one to end).
//! A flush covers exactly the writes completed before it was issued, so the
//! durable mark is the highest ticket covered by any completed flush, in
//! whatever order flushes complete. With `max_in_flight` = 1, N concurrent
//! writers cost about two flushes instead of N; more in flight lets a new
//! group start its flush while the previous one is still running (the
//! block layer merges concurrent flushes), which is what deep queues need.
//!
//! A failed flush is sticky: the group fails every current and future waiter
//! (fail-stop, invariant 8: the flush is never retried).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

pub struct Group {
    /// Last ticket handed out.
    issued: Cell<u64>,
    /// All tickets up to this one are durable.
    durable: Cell<u64>,
    /// Highest ticket covered by a flush issued so far.
    covered: Cell<u64>,
    in_flight: Cell<u32>,
    max_in_flight: u32,
    failed: RefCell<Option<(io::ErrorKind, String)>>,
    /// Bumped whenever a flush ends; waiters wait for it to change.
    round: Cell<u64>,
    waiters: RefCell<Vec<Waker>>,
}

struct InFlight<'a>(&'a Group, bool);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // Also runs if the leader's future is dropped mid-flush: the others
        // then elect a new leader instead of waiting forever (the abandoned
        // flush no longer counts as covering their tickets).
        if !self.1 {
            self.0.covered.set(self.0.durable.get());
        }
        self.0.in_flight.set(self.0.in_flight.get() - 1);
        self.0.round.set(self.0.round.get() + 1);
        for w in self.0.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

struct NextRound<'a> {
    group: &'a Group,
    seen: u64,
}

impl Future for NextRound<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.group.round.get() != self.seen {
            Poll::Ready(())
        } else {
            self.group.waiters.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        }
    }
}

impl Group {
    #[cfg(test)]
    pub fn new() -> Group {
        Group::with_max_in_flight(1)
    }

    pub fn with_max_in_flight(max_in_flight: u32) -> Group {
        Group {
            issued: Cell::new(0),
            durable: Cell::new(0),
            covered: Cell::new(0),
            in_flight: Cell::new(0),
            max_in_flight: max_in_flight.max(1),
            failed: RefCell::new(None),
            round: Cell::new(0),
            waiters: RefCell::new(Vec::new()),
        }
    }

    #[cfg(test)]
    pub fn failed(&self) -> bool {
        self.failed.borrow().is_some()
    }

    fn failure(&self) -> Option<io::Error> {
        self.failed
            .borrow()
            .as_ref()
            .map(|(kind, msg)| io::Error::new(*kind, format!("an earlier flush failed: {msg}")))
    }

    /// Returns once everything completed before this call is durable, running
    /// `flush` (as the group's leader) if no flush that covers it is running.
    pub async fn sync<F, Fut>(&self, flush: F) -> io::Result<()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = io::Result<()>>,
    {
        let ticket = self.issued.get() + 1;
        self.issued.set(ticket);
        loop {
            if let Some(e) = self.failure() {
                return Err(e);
            }
            if self.durable.get() >= ticket {
                return Ok(());
            }
            if self.covered.get() >= ticket || self.in_flight.get() >= self.max_in_flight {
                let seen = self.round.get();
                NextRound { group: self, seen }.await;
                continue;
            }
            // Become a leader: this flush covers every ticket issued so far.
            let covers = self.issued.get();
            self.covered.set(covers);
            self.in_flight.set(self.in_flight.get() + 1);
            let mut guard = InFlight(self, false);
            let res = flush().await;
            guard.1 = true;
            match res {
                Ok(()) => self.durable.set(self.durable.get().max(covers)),
                Err(e) => {
                    *self.failed.borrow_mut() = Some((e.kind(), e.to_string()));
                    drop(guard);
                    return Err(e);
                }
            }
            drop(guard);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::{LocalExecutorBuilder, Placement};
    use std::rc::Rc;

    #[test]
    fn concurrent_callers_share_flushes() {
        let ex = LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(1 << 20)
            .make()
            .unwrap();
        ex.run(async {
            let g = Rc::new(Group::new());
            let flushes = Rc::new(Cell::new(0u32));
            let mut tasks = Vec::new();
            for _ in 0..32 {
                let g = g.clone();
                let flushes = flushes.clone();
                tasks.push(glommio::spawn_local(async move {
                    g.sync(|| {
                        let flushes = flushes.clone();
                        async move {
                            flushes.set(flushes.get() + 1);
                            glommio::timer::sleep(std::time::Duration::from_millis(2)).await;
                            Ok(())
                        }
                    })
                    .await
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            assert!(
                flushes.get() <= 3,
                "{} flushes for 32 callers",
                flushes.get()
            );
            // A failure is sticky.
            let err = g.sync(|| async { Err(io::Error::other("boom")) }).await;
            assert!(err.is_err());
            assert!(g.failed());
            assert!(g.sync(|| async { Ok(()) }).await.is_err());
        });
    }
}
