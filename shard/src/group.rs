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
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

pub struct Group {
    s: Rc<State>,
}

struct State {
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

struct NextRound<'a> {
    state: &'a State,
    seen: u64,
}

impl Future for NextRound<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.state.round.get() != self.seen {
            Poll::Ready(())
        } else {
            self.state.waiters.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        }
    }
}

impl State {
    /// A flush covering tickets up to `covers` ended with `res`.
    fn flush_ended(&self, covers: u64, res: io::Result<()>) {
        match res {
            Ok(()) => self.durable.set(self.durable.get().max(covers)),
            Err(e) => {
                self.failed
                    .borrow_mut()
                    .get_or_insert_with(|| (e.kind(), e.to_string()));
            }
        }
        self.in_flight.set(self.in_flight.get() - 1);
        self.round.set(self.round.get() + 1);
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    fn failure(&self) -> Option<io::Error> {
        self.failed
            .borrow()
            .as_ref()
            .map(|(kind, msg)| io::Error::new(*kind, format!("a flush failed: {msg}")))
    }
}

impl Group {
    #[cfg(test)]
    pub fn new() -> Group {
        Group::with_max_in_flight(1)
    }

    pub fn with_max_in_flight(max_in_flight: u32) -> Group {
        Group {
            s: Rc::new(State {
                issued: Cell::new(0),
                durable: Cell::new(0),
                covered: Cell::new(0),
                in_flight: Cell::new(0),
                max_in_flight: max_in_flight.max(1),
                failed: RefCell::new(None),
                round: Cell::new(0),
                waiters: RefCell::new(Vec::new()),
            }),
        }
    }

    #[cfg(test)]
    pub fn failed(&self) -> bool {
        self.s.failed.borrow().is_some()
    }

    /// What failed, once a flush has (recorded by the flush itself, whoever
    /// waited for it).
    pub fn failure(&self) -> Option<String> {
        self.s.failed.borrow().as_ref().map(|(_, msg)| msg.clone())
    }

    /// Returns once every write completed before the call is durable (a
    /// flush issued after the call has completed), or with the error of a
    /// failed flush, this one's or an earlier one's.
    ///
    /// The flush runs in a task of its own and records its own result: a
    /// caller cancelled while it waits (its client went away) cannot cut a
    /// flush off from its outcome. Dropped with its caller, a failed flush
    /// went unseen, and the next one, succeeding, acknowledged writes whose
    /// data the failed one may have lost.
    pub async fn sync<F, Fut>(&self, flush: F) -> io::Result<()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = io::Result<()>> + 'static,
    {
        let s = &*self.s;
        let ticket = s.issued.get() + 1;
        s.issued.set(ticket);
        loop {
            // Read before a flush is started below, which may end before
            // this task waits.
            let seen = s.round.get();
            if let Some(e) = s.failure() {
                return Err(e);
            }
            if s.durable.get() >= ticket {
                return Ok(());
            }
            if s.covered.get() < ticket && s.in_flight.get() < s.max_in_flight {
                let covers = s.issued.get();
                s.covered.set(covers);
                s.in_flight.set(s.in_flight.get() + 1);
                let (state, flushing) = (self.s.clone(), flush());
                glommio::spawn_local(async move {
                    let res = flushing.await;
                    state.flush_ended(covers, res);
                })
                .detach();
            }
            NextRound { state: s, seen }.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_test;
    use std::rc::Rc;

    #[test]
    fn concurrent_callers_share_flushes() {
        run_test(async {
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

    /// The caller that started a flush is cancelled while the flush runs,
    /// and the flush fails: the failure still reaches every later caller.
    /// Cut off with its caller, it went unseen, and the next flush, which
    /// succeeded, acknowledged writes the failed one may have lost.
    #[test]
    fn a_failed_flush_whose_caller_was_cancelled_still_fails_the_group() {
        run_test(async {
            let g = Rc::new(Group::new());
            let leader = {
                let g = g.clone();
                glommio::spawn_local(async move {
                    g.sync(|| async {
                        glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
                        Err(io::Error::from_raw_os_error(libc::EIO))
                    })
                    .await
                })
            };
            futures_lite::future::yield_now().await;
            drop(leader);
            let later = g.sync(|| async { Ok(()) }).await;
            let err = later.expect_err("a failed flush is never retried");
            assert!(err.to_string().contains("Input/output error"), "{err}");
            assert!(g.failed());
        });
    }
}
