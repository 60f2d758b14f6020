//! Memory budgets for request and reply payload buffers (invariant 6).
//!
//! A shard has one [`Budget`] for all its connections; each connection has
//! its own byte count. A request reserves its payload bytes before any buffer
//! is allocated: a write's payload, or what a read can return (its length,
//! capped by the chunk's end when this shard owns the chunk; the length asked
//! when the read is forwarded). The [`Reservation`] travels with the request
//! and its reply, is resized to the reply's payload once that is built, and
//! is released when the reply has been sent (at once when the reply has no
//! payload: a write's data buffer is gone by then). Over the connection's bound the
//! connection is simply not read (TCP backpressure); over the shard's bound
//! the request gets a typed BUSY.

use std::cell::Cell;
use std::rc::Rc;

pub struct Budget {
    used: Cell<u64>,
    limit: u64,
}

impl Budget {
    pub fn new(limit: u64) -> Rc<Budget> {
        Rc::new(Budget {
            used: Cell::new(0),
            limit,
        })
    }

    pub fn used(&self) -> u64 {
        self.used.get()
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }
}

/// Bytes held by one request, counted against its shard and its connection.
pub struct Reservation {
    shard: Rc<Budget>,
    conn: Rc<Cell<u64>>,
    bytes: u64,
}

impl Reservation {
    /// Reserves `bytes`, or `None` when the shard's budget cannot take them.
    /// A request larger than the whole budget is admitted only when nothing
    /// else is reserved, so it can never starve forever.
    pub fn try_new(shard: &Rc<Budget>, conn: &Rc<Cell<u64>>, bytes: u64) -> Option<Reservation> {
        let mut r = Reservation::empty(shard, conn);
        r.try_resize(bytes).then_some(r)
    }

    /// Holds nothing yet, but counts what it is resized to (a READ whose
    /// chunk was missing or ended before it at admission may still return
    /// bytes if a write lands before it runs).
    pub fn empty(shard: &Rc<Budget>, conn: &Rc<Cell<u64>>) -> Reservation {
        Reservation {
            shard: shard.clone(),
            conn: conn.clone(),
            bytes: 0,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Holds `bytes` instead: what a request's reply turned out to need
    /// once it is built (a READ reserves its bound before it knows how much
    /// it returns). Growing is never refused: the bytes exist by then, and
    /// the count must say so.
    pub fn resize(&mut self, bytes: u64) {
        let (old, shard, conn) = (self.bytes, &self.shard.used, &self.conn);
        shard.set(shard.get() - old + bytes);
        conn.set(conn.get() - old + bytes);
        self.bytes = bytes;
    }

    /// Holds `bytes` instead if that fits the shard's budget (shrinking
    /// always does); false, holding what it held, if growing would pass it.
    /// Growth past the budget is admitted only when nothing else is
    /// reserved, so a request larger than the whole budget can never starve
    /// forever. A READ admitted for what its chunk held then may find it
    /// grown by a write that ran first.
    pub fn try_resize(&mut self, bytes: u64) -> bool {
        let others = self.shard.used.get() - self.bytes;
        let over = bytes > self.bytes && others > 0 && others + bytes > self.shard.limit;
        if !over {
            self.resize(bytes);
        }
        !over
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.shard.used.set(self.shard.used.get() - self.bytes);
        self.conn.set(self.conn.get() - self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_and_released() {
        let b = Budget::new(100);
        let c = Rc::new(Cell::new(0));
        let r1 = Reservation::try_new(&b, &c, 60).unwrap();
        assert!(Reservation::try_new(&b, &c, 50).is_none());
        let r2 = Reservation::try_new(&b, &c, 40).unwrap();
        assert_eq!((b.used(), c.get()), (100, 100));
        drop(r1);
        drop(r2);
        assert_eq!((b.used(), c.get()), (0, 0));
        // Larger than the budget: only alone.
        let big = Reservation::try_new(&b, &c, 500).unwrap();
        assert!(Reservation::try_new(&b, &c, 1).is_none());
        drop(big);
    }

    #[test]
    fn a_resized_reservation_counts_its_new_size() {
        let b = Budget::new(100);
        let c = Rc::new(Cell::new(0));
        let mut r = Reservation::try_new(&b, &c, 80).unwrap();
        r.resize(10);
        assert_eq!((b.used(), c.get(), r.bytes()), (10, 10, 10));
        assert!(
            Reservation::try_new(&b, &c, 90).is_some(),
            "the room freed is usable"
        );
        r.resize(120);
        assert_eq!(
            (b.used(), c.get()),
            (120, 120),
            "growth is counted, not refused"
        );
        drop(r);
        assert_eq!((b.used(), c.get()), (0, 0));
    }

    #[test]
    fn a_reservation_grows_only_within_the_budget() {
        let b = Budget::new(100);
        let c = Rc::new(Cell::new(0));
        let mut r = Reservation::try_new(&b, &c, 10).unwrap();
        assert!(r.try_resize(500), "alone, it may grow as try_new admits");
        r.resize(10);
        let other = Reservation::try_new(&b, &c, 50).unwrap();
        assert!(r.try_resize(40));
        assert!(!r.try_resize(51), "would pass the budget");
        assert_eq!((b.used(), r.bytes()), (90, 40), "kept what it held");
        assert!(r.try_resize(5), "shrinking always fits");
        drop((r, other));
        assert_eq!((b.used(), c.get()), (0, 0));
    }
}
