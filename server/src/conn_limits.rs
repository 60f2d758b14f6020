//! Per-connection and per-shard limits of the serving path (invariant 6),
//! with their flags. Every bound has a default that is safe on a shared
//! network; over a bound the answer is backpressure or a typed error.

use std::time::Duration;

/// Resolved limits, copied into every shard.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    pub max_connections: u64,
    pub max_in_flight: usize,
    pub conn_buffer_bytes: u64,
    pub shard_buffer_bytes: u64,
    pub frame_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    /// Longest wait for another shard of this node to answer a request
    /// forwarded to it (invariant 6: time waiting for a peer is bounded).
    pub forward_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 4096,
            max_in_flight: 256,
            conn_buffer_bytes: 16 << 20,
            shard_buffer_bytes: 64 << 20,
            frame_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            write_timeout: Duration::from_secs(10),
            // Below the client's default request timeout (10 s), so
            // that its callers see the typed TIMEOUT.
            forward_timeout: Duration::from_secs(8),
        }
    }
}

/// Raises this process's open-file soft limit to its hard limit, so the
/// connection limits above, not the default 1024 descriptors, decide how
/// many clients are served. Returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: plain getrlimit/setrlimit on this process with a zeroed struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
        r.rlim_cur
    }
}

/// Keeps the allocator's footprint to what it uses. The server allocates
/// with mimalloc (see `main.rs`), which maps memory in large aligned regions;
/// with transparent huge pages on ("always", common), touching one byte of
/// such a region can commit 2 MiB, and RSS no longer tracks the memory
/// budget. THP is turned off for this process only.
pub fn limit_allocator_footprint() {
    // SAFETY: prctl with PR_SET_THP_DISABLE only sets a flag on this process.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not turn transparent huge pages off: RSS may exceed the memory budget");
    }
}
