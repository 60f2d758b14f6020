//! Async client for shardstore, for tokio applications.
//!
//! [`Client::connect`] fetches the node's topology from its front address;
//! after that every request goes straight to the shard that owns its chunk
//! (`shardstore_proto::route`, the same function the server uses), so the
//! common path has no cross-core hop on the server. Set
//! [`ClientConfig::route_direct`] to `false` to send everything to the front
//! address instead (the server forwards).
//!
//! # Runtime
//!
//! Calls must be made inside a tokio runtime with the `net` and `time`
//! drivers enabled (`#[tokio::main]` or a `Builder` with `enable_all()`);
//! each connection spawns a reader and a writer task on it. All methods take
//! `&self`; [`Client`] is `Clone + Send + Sync`, and clones share
//! connections, so one client can serve a whole application.
//!
//! # Connections, pipelining, limits
//!
//! One TCP connection (TCP_NODELAY) per shard address, opened on first use,
//! plus one to the front address. Many calls share a connection: requests are
//! pipelined and the writer coalesces everything queued into one vectored
//! write; replies are matched by request id and may come back in any order.
//! At most [`ClientConfig::max_in_flight_per_connection`] requests wait on a
//! connection; further calls wait for a slot.
//!
//! Arguments over the node's limits are refused before anything is sent
//! ([`ClientError::InvalidArgument`]).
//!
//! # Integrity
//!
//! A write carries the crc32c of its payload, which the server checks before
//! changing state. A read reply carries the crc32c of its payload, which the
//! client checks: on a mismatch the bytes are never returned
//! ([`ClientError::ChecksumMismatch`]).
//!
//! # Timeouts and retries
//!
//! Every call is bounded by [`ClientConfig::request_timeout`]
//! ([`ClientError::Timeout`]). When a connection drops, every request waiting
//! on it fails with [`ClientError::ConnectionClosed`] and the next call opens
//! a new one. Idempotent calls (read, stat, ping, list) are retried once on
//! the new connection; write and delete are not, because the lost request may
//! have been applied and a replay would bump the chunk's version again: the
//! caller decides whether that is acceptable.
//!
//! A call that times out before its request was written is never sent
//! later. A peer that vanished without closing (host down, partition) is
//! detected by keepalive probes and TCP_USER_TIMEOUT within about 30 s;
//! its connection then closes like a dropped one.
//!
//! # Example
//!
//! Needs a running server (`shardstore serve`):
//!
//! ```no_run
//! use shardstore_client::{ChunkId, Client, ClientError};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), ClientError> {
//!     let client = Client::connect("127.0.0.1:7000").await?;
//!     let chunk = ChunkId(42);
//!     let written = client.write(chunk, 0, &b"hello, shardstore"[..]).await?;
//!     println!("version {} on shard {}", written.version, client.shard_of(chunk));
//!     let read = client.read(chunk, 0, 5).await?;
//!     assert_eq!(&read.data[..], b"hello");
//!     match client.stat(ChunkId(7)).await {
//!         Err(ClientError::NotFound(_)) => println!("no chunk 7"),
//!         other => println!("{other:?}"),
//!     }
//!     Ok(())
//! }
//! ```

#[cfg(feature = "cli")]
pub mod cli;
mod client;
mod config;
mod conn;
mod error;
mod rdma;
mod topology;
mod types;

pub use client::Client;
pub use config::{ClientConfig, ClientTls, Secret, MAX_IN_FLIGHT_PER_CONNECTION};
pub use error::ClientError;
pub use shardstore_proto::{ChunkId, ErrorCode, ShardId, StatsReply};
pub use topology::Topology;
pub use types::{ChunkStat, ListEntry, ListPage, ReadOptions, ReadResult, WriteResult};
