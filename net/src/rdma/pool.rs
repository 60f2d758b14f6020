//! Bounded pool of registered memory regions.
//!
//! Registering memory (pinning pages, programming the NIC's translation
//! table) costs far more than a copy of a small frame, so regions are reused.
//! Sizes are rounded up to a power-of-two class between [`MIN_REGION`] and
//! `max_region` (at most `limits::MAX_PAYLOAD`: no frame needs more).
//! Invariants:
//! - registered bytes (held plus cached) never exceed `budget_bytes`; over it
//!   `acquire` first drops cached regions, then fails with
//!   [`PoolError::Exhausted`] (backpressure, never unbounded memory);
//! - at most `keep_per_class` free regions are cached per class;
//! - a region is reused only after its [`PooledRegion`] was dropped, i.e. once
//!   no peer may still access it (see the module doc of `rdma`).

use super::{Region, RemoteRegion};
use shardstore_proto::limits;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// Smallest region: one sector.
pub const MIN_REGION: usize = limits::SECTOR_SIZE as usize;

#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Largest region (rounded up to a power of two, at most MAX_PAYLOAD).
    pub max_region: usize,
    /// Most bytes registered at once, in use or cached.
    pub budget_bytes: u64,
    /// Free regions kept per size class.
    pub keep_per_class: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_region: limits::MAX_PAYLOAD as usize,
            budget_bytes: 64 << 20,
            keep_per_class: 4,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("region of {len} bytes exceeds the largest of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("registered memory budget of {budget} bytes exhausted ({in_use} in use)")]
    Exhausted { budget: u64, in_use: u64 },
    #[error("registering memory: {0}")]
    Register(#[from] io::Error),
}

/// Counters, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes registered now (in use plus cached).
    pub registered_bytes: u64,
    /// Bytes held by live [`PooledRegion`]s.
    pub in_use_bytes: u64,
    /// Regions registered over the pool's life.
    pub registrations: u64,
    /// Acquisitions served from the cache.
    pub reuses: u64,
}

struct Inner<R> {
    free: Vec<Vec<R>>,
    stats: PoolStats,
}

pub struct MemoryRegionPool<R> {
    inner: Arc<Mutex<Inner<R>>>,
    cfg: PoolConfig,
    classes: usize,
}

impl<R: Region> MemoryRegionPool<R> {
    pub fn new(mut cfg: PoolConfig) -> Self {
        cfg.max_region = cfg
            .max_region
            .clamp(MIN_REGION, limits::MAX_PAYLOAD as usize)
            .next_power_of_two();
        let classes = (cfg.max_region / MIN_REGION).trailing_zeros() as usize + 1;
        MemoryRegionPool {
            inner: Arc::new(Mutex::new(Inner {
                free: (0..classes).map(|_| Vec::new()).collect(),
                stats: PoolStats::default(),
            })),
            cfg,
            classes,
        }
    }

    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// The size class of a `len`-byte request, and the class's region size.
    pub fn class_of(&self, len: usize) -> Option<(usize, usize)> {
        if len > self.cfg.max_region {
            return None;
        }
        let size = len.max(MIN_REGION).next_power_of_two();
        let class = (size / MIN_REGION).trailing_zeros() as usize;
        debug_assert!(class < self.classes);
        Some((class, size))
    }

    pub fn stats(&self) -> PoolStats {
        lock(&self.inner).stats
    }

    /// A region of at least `len` bytes: cached, or new from `register`.
    pub fn acquire(
        &self,
        len: usize,
        register: impl FnOnce(usize) -> io::Result<R>,
    ) -> Result<PooledRegion<R>, PoolError> {
        let (class, size) = self.class_of(len).ok_or(PoolError::TooLarge {
            len,
            max: self.cfg.max_region,
        })?;
        let mut g = lock(&self.inner);
        if let Some(region) = g.free[class].pop() {
            g.stats.in_use_bytes += size as u64;
            g.stats.reuses += 1;
            return Ok(self.wrap(region, class, size, len));
        }
        // Make room by dropping cached regions of other sizes (largest first).
        let mut c = self.classes;
        while g.stats.registered_bytes + size as u64 > self.cfg.budget_bytes && c > 0 {
            c -= 1;
            while g.stats.registered_bytes + size as u64 > self.cfg.budget_bytes {
                let Some(r) = g.free[c].pop() else { break };
                g.stats.registered_bytes -= (MIN_REGION << c) as u64;
                drop(r); // deregisters
            }
        }
        if g.stats.registered_bytes + size as u64 > self.cfg.budget_bytes {
            return Err(PoolError::Exhausted {
                budget: self.cfg.budget_bytes,
                in_use: g.stats.in_use_bytes,
            });
        }
        // Count the bytes before registering (outside the lock) so concurrent
        // acquisitions cannot overshoot the budget together.
        g.stats.registered_bytes += size as u64;
        g.stats.in_use_bytes += size as u64;
        drop(g);
        match register(size) {
            Ok(region) => {
                assert!(
                    region.capacity() >= size,
                    "registrar returned a short region"
                );
                lock(&self.inner).stats.registrations += 1;
                Ok(self.wrap(region, class, size, len))
            }
            Err(e) => {
                let mut g = lock(&self.inner);
                g.stats.registered_bytes -= size as u64;
                g.stats.in_use_bytes -= size as u64;
                Err(PoolError::Register(e))
            }
        }
    }

    fn wrap(&self, region: R, class: usize, size: usize, len: usize) -> PooledRegion<R> {
        PooledRegion {
            region: Some(region),
            class,
            size,
            len,
            keep: self.cfg.keep_per_class,
            pool: self.inner.clone(),
        }
    }
}

fn lock<R>(m: &Mutex<Inner<R>>) -> MutexGuard<'_, Inner<R>> {
    // Plain bookkeeping that cannot panic halfway.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A region taken from the pool, used for `len` bytes; back to the pool on drop.
pub struct PooledRegion<R> {
    region: Option<R>,
    class: usize,
    size: usize,
    len: usize,
    keep: usize,
    pool: Arc<Mutex<Inner<R>>>,
}

impl<R: Region> PooledRegion<R> {
    /// Bytes asked for (the region may be larger).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The descriptor of the bytes asked for, for the peer.
    pub fn remote(&self) -> RemoteRegion {
        self.get().remote(self.len)
    }

    pub fn get(&self) -> &R {
        self.region.as_ref().expect("present until drop")
    }

    pub fn get_mut(&mut self) -> &mut R {
        self.region.as_mut().expect("present until drop")
    }

    /// Copies `src` in; it must fit the length asked for.
    pub fn copy_in(&mut self, src: &[u8]) {
        assert!(src.len() <= self.len, "{} > {}", src.len(), self.len);
        self.get_mut().copy_in(src);
    }

    /// The first `len` bytes; `len` must not exceed the length asked for.
    pub fn copy_out(&self, len: usize) -> Vec<u8> {
        assert!(len <= self.len, "{len} > {}", self.len);
        self.get().copy_out(len)
    }
}

impl<R> Drop for PooledRegion<R> {
    fn drop(&mut self) {
        let Some(region) = self.region.take() else {
            return;
        };
        let mut g = lock(&self.pool);
        g.stats.in_use_bytes -= self.size as u64;
        if g.free[self.class].len() < self.keep {
            g.free[self.class].push(region);
        } else {
            g.stats.registered_bytes -= self.size as u64;
            drop(g);
            drop(region);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rdma::loopback::{self, LoopbackRegion};
    use crate::rdma::Endpoint;

    fn pool(budget: u64) -> MemoryRegionPool<LoopbackRegion> {
        MemoryRegionPool::new(PoolConfig {
            max_region: limits::MAX_PAYLOAD as usize,
            budget_bytes: budget,
            keep_per_class: 2,
        })
    }

    #[test]
    fn sizes_round_up_to_classes_up_to_max_payload() {
        let p = pool(64 << 20);
        assert_eq!(p.class_of(0), Some((0, 4096)));
        assert_eq!(p.class_of(1), Some((0, 4096)));
        assert_eq!(p.class_of(4096), Some((0, 4096)));
        assert_eq!(p.class_of(4097), Some((1, 8192)));
        let max = limits::MAX_PAYLOAD as usize;
        assert_eq!(p.class_of(max).unwrap().1, max);
        assert_eq!(p.class_of(max + 1), None);
        let (a, _) = loopback::pair();
        assert!(matches!(
            p.acquire(max + 1, |n| a.register(n)),
            Err(PoolError::TooLarge { .. })
        ));
    }

    #[test]
    fn regions_are_reused_and_the_cache_is_bounded() {
        let p = pool(64 << 20);
        let (a, _) = loopback::pair();
        let r1 = p.acquire(5000, |n| a.register(n)).unwrap();
        let r2 = p.acquire(6000, |n| a.register(n)).unwrap();
        let r3 = p.acquire(7000, |n| a.register(n)).unwrap();
        assert_eq!(r1.get().capacity(), 8192);
        assert_eq!(r1.remote().len, 5000);
        let s = p.stats();
        assert_eq!(
            (s.registrations, s.registered_bytes, s.in_use_bytes),
            (3, 3 * 8192, 3 * 8192)
        );
        drop((r1, r2, r3));
        // Two kept, the third deregistered.
        let s = p.stats();
        assert_eq!((s.registered_bytes, s.in_use_bytes), (2 * 8192, 0));
        assert_eq!(a.fabric().registered(), 2);
        let _r = p.acquire(8000, |n| a.register(n)).unwrap();
        assert_eq!(p.stats().reuses, 1);
        assert_eq!(p.stats().registrations, 3);
    }

    #[test]
    fn budget_evicts_cached_regions_then_refuses() {
        let p = pool(64 << 10);
        let (a, _) = loopback::pair();
        let small = p.acquire(4096, |n| a.register(n)).unwrap();
        drop(small); // cached: 4 KiB registered
        let big = p.acquire(60 << 10, |n| a.register(n)).unwrap(); // 64 KiB class
        assert_eq!(big.get().capacity(), 64 << 10);
        // The cached 4 KiB region was dropped to fit.
        assert_eq!(p.stats().registered_bytes, 64 << 10);
        assert!(matches!(
            p.acquire(1, |n| a.register(n)),
            Err(PoolError::Exhausted { .. })
        ));
        drop(big);
        assert!(p.acquire(1, |n| a.register(n)).is_ok());
    }

    #[test]
    fn failed_registration_gives_the_budget_back() {
        let p = pool(64 << 10);
        let e = p.acquire(10, |_| Err(io::Error::other("no memory")));
        assert!(matches!(e, Err(PoolError::Register(_))));
        assert_eq!(p.stats(), PoolStats::default());
    }

    #[test]
    #[should_panic]
    fn copy_in_past_the_asked_length_panics() {
        let p = pool(64 << 10);
        let (a, _) = loopback::pair();
        let mut r = p.acquire(10, |n| a.register(n)).unwrap();
        r.copy_in(&[0u8; 11]);
    }
}
