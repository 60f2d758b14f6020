//! The shardstore server as a library: everything `serve` runs, so tests and
//! fuzz targets can drive the real request path. The binary `shardstore`
//! (`main.rs`) adds the command line and the admin commands.
//!
//! - `serve`: start-up, one glommio executor per shard, listeners;
//! - `conn`: one connection's loop (framing, limits, replies);
//! - `handler`: request execution on the owning shard and forwarding;
//! - `config`, `lifecycle`, `logging`, `metrics`: operations;
//! - `budget`, `conn_limits`, `stats`: bounds and counters;
//! - `check`: offline verification and index rebuild;
//! - `owner`: running as the data folder's owner when started as root.

pub mod budget;
pub mod check;
pub mod config;
pub mod conn;
pub mod conn_limits;
pub mod handler;
pub mod lifecycle;
pub mod logging;
pub mod mem_stream;
pub mod metrics;
pub mod owner;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod serve;
pub mod stats;
