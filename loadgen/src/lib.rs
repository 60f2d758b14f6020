//! shardstore-loadgen: the load generator for shardstore.
//!
//! Workloads are reproducible (every random choice derives from `--seed`),
//! latencies are HdrHistogram-recorded without coordinated omission in open
//! loop (`--rate`: latency counts from the intended send time, as wrk2
//! does), and `--verify` checks every read against the exact bytes the key's
//! single writer last wrote. Modules:
//!
//! - [`config`]: the command line and the workload it describes;
//! - [`keys`]: PRNG, key distributions (uniform, zipf, sequential), key
//!   partitioning between request loops;
//! - [`content`]: verify-mode values and the read check;
//! - [`recorder`]: per-operation statistics, error kinds, open-loop pacing;
//! - `runner`: connect, preload, warm up, measure;
//! - [`report`]: the final table and the JSON report (schema
//!   `shardstore-loadgen/v1`); [`plot`]: the SVG.

pub mod config;
pub mod content;
pub mod cpu;
pub mod keys;
pub mod plot;
mod progress;
pub mod recorder;
pub mod report;
mod runner;

pub use config::Config;
pub use report::{check_schema, Report};
pub use runner::{chunk_of, run, RunData, RunError};
