//! Process lifecycle: signals, graceful drain, systemd notifications.
//!
//! Order of a graceful stop (first SIGTERM or SIGINT):
//! 1. the signal thread sends STOPPING=1 and wakes every shard;
//! 2. each shard stops accepting (its accept tasks are cancelled, closing its
//!    listeners) and shuts down the read side of its connections, so each
//!    connection loop sees end-of-stream, finishes the requests it already
//!    read, sends their replies and closes;
//! 3. each shard waits for its connections and in-flight requests to reach
//!    zero, then for every other shard to get there too (a shard keeps
//!    serving requests forwarded to it until all are drained), up to the
//!    shutdown deadline;
//! 4. each shard closes its storage (index flushed, data file synced) and its
//!    executor returns; the process exits 0.
//!
//! A second signal exits at once (status 128 + signal). Durability does not
//! depend on the drain: an acknowledged write was durable before its ack.
//!
//! systemd: READY=1 once every shard has opened its storage and listens,
//! STATUS= lines along the way, STOPPING=1 on shutdown, WATCHDOG=1 while every
//! shard keeps publishing snapshots (if WATCHDOG_USEC is set). All of them
//! are no-ops outside systemd (no NOTIFY_SOCKET).

use crate::metrics::Board;
use sd_notify::NotifyState;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::unix::io::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Sends a notification to systemd; silently nothing outside it.
pub fn notify(states: &[NotifyState<'_>]) {
    let _ = sd_notify::notify(false, states);
}

pub fn status(s: &str) {
    notify(&[NotifyState::Status(s)]);
}

/// What the signal thread does with the n-th signal.
#[derive(Debug, PartialEq, Eq)]
pub enum SignalAction {
    Drain,
    ExitNow,
}

pub fn action_for(nth: usize) -> SignalAction {
    if nth == 0 {
        SignalAction::Drain
    } else {
        SignalAction::ExitNow
    }
}

/// Installs SIGTERM/SIGINT handling on a dedicated thread. `on_first` runs
/// on the first signal; a later one exits the process immediately.
pub fn install_signals(on_first: impl FnOnce(i32) + Send + 'static) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut on_first = Some(on_first);
            for (n, sig) in signals.forever().enumerate() {
                match action_for(n) {
                    SignalAction::Drain => {
                        if let Some(f) = on_first.take() {
                            f(sig);
                        }
                    }
                    SignalAction::ExitNow => {
                        warn!(signal = sig, "second signal: exiting without draining");
                        std::process::exit(128 + sig);
                    }
                }
            }
        })?;
    Ok(())
}

/// Open connections of one shard, by raw fd, so a drain can shut down their
/// read side. Shard-local (`Rc`).
#[derive(Clone, Default)]
pub struct ConnRegistry {
    inner: Rc<RefCell<(u64, HashMap<u64, RawFd>)>>,
    /// Requests running as their own tasks (see `conn::apart`): they may
    /// outlive the connection that read them.
    requests: Rc<Cell<u64>>,
}

/// A request task still running; see [`ConnRegistry::request_started`].
pub struct RequestRunning(Rc<Cell<u64>>);

impl Drop for RequestRunning {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// Removes its connection from the registry when dropped. Drop it right
/// after the connection's stream is closed, with no await in between, so a
/// drain on this shard never sees a closed (and maybe reused) fd.
pub struct Registered {
    reg: ConnRegistry,
    id: u64,
}

impl ConnRegistry {
    /// Counts a request task until the returned guard is dropped.
    pub fn request_started(&self) -> RequestRunning {
        self.requests.set(self.requests.get() + 1);
        RequestRunning(self.requests.clone())
    }

    /// Request tasks still running, of connections open or ended.
    pub fn requests_running(&self) -> u64 {
        self.requests.get()
    }

    pub fn register(&self, fd: RawFd) -> Registered {
        let mut g = self.inner.borrow_mut();
        g.0 += 1;
        let id = g.0;
        g.1.insert(id, fd);
        Registered {
            reg: self.clone(),
            id,
        }
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner.borrow().1.len()
    }

    /// Shuts down the read side of every open connection: each loop reads
    /// end-of-stream, finishes what it has, replies and closes.
    pub fn shutdown_reads(&self) {
        for fd in self.inner.borrow().1.values() {
            // SAFETY: the fd belongs to a live connection of this shard (see
            // `Registered`); shutdown does not close it.
            unsafe {
                libc::shutdown(*fd, libc::SHUT_RD);
            }
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.reg.inner.borrow_mut().1.remove(&self.id);
    }
}

/// Node-wide drain state shared by the shards.
pub struct Drain {
    pub deadline_after: Duration,
    pub shards: usize,
    drained: AtomicUsize,
    started: std::sync::OnceLock<Instant>,
}

impl Drain {
    pub fn new(shards: usize, deadline_after: Duration) -> Arc<Drain> {
        Arc::new(Drain {
            deadline_after,
            shards,
            drained: AtomicUsize::new(0),
            started: std::sync::OnceLock::new(),
        })
    }

    /// When the drain must end, counted from the first shard that started it.
    pub fn deadline(&self) -> Instant {
        *self.started.get_or_init(Instant::now) + self.deadline_after
    }

    pub fn mark_drained(&self) {
        self.drained.fetch_add(1, Ordering::AcqRel);
    }

    pub fn all_drained(&self) -> bool {
        self.drained.load(Ordering::Acquire) >= self.shards
    }
}

/// Waits (on a shard executor) until `done()` or the deadline; true if done.
pub async fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

/// The watchdog period systemd asked for (WATCHDOG_USEC for our pid).
pub fn watchdog_period() -> Option<Duration> {
    let mut usec = 0;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(Duration::from_micros(usec))
    } else {
        None
    }
}

/// Starts the watchdog thread if systemd asked for one: WATCHDOG=1 every
/// half period, but only while every shard's last snapshot is fresh (a
/// wedged executor stops the pings, and systemd restarts the service).
pub fn start_watchdog(board: Arc<Board>, period: Duration) {
    info!(
        watchdog_ms = period.as_millis() as u64,
        "systemd watchdog enabled"
    );
    let _ = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(period / 2);
            match board.stale_shard(period / 2) {
                Some(s) if !board.is_draining() => {
                    warn!(
                        shard = s,
                        "shard has not published for half the watchdog period; not pinging"
                    );
                }
                _ => notify(&[NotifyState::Watchdog]),
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_signal_exits() {
        assert_eq!(action_for(0), SignalAction::Drain);
        assert_eq!(action_for(1), SignalAction::ExitNow);
        assert_eq!(action_for(5), SignalAction::ExitNow);
    }

    #[test]
    fn registry_forgets_on_drop() {
        let r = ConnRegistry::default();
        let a = r.register(100);
        let b = r.register(101);
        assert_eq!(r.len(), 2);
        drop(a);
        assert_eq!(r.len(), 1);
        drop(b);
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn drain_counts_shards() {
        let d = Drain::new(2, Duration::from_secs(1));
        assert!(!d.all_drained());
        d.mark_drained();
        d.mark_drained();
        assert!(d.all_drained());
        assert!(d.deadline() > Instant::now());
    }
}
