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

/// Keeps large payload buffers out of malloc's arenas: glibc raises its mmap
/// threshold after the first large free, after which freed 256 KiB-8 MiB
/// buffers stay in per-thread arenas and RSS only grows. A fixed threshold
/// makes every buffer from 128 KiB up an mmap that is returned on free, so
/// memory goes back to the budget when load stops.
pub fn pin_malloc_thresholds() {
    // SAFETY: mallopt only sets allocator parameters; called once at start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}
