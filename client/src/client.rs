//! [`Client`]: routing, per-address connections, limits, timeouts, retries.
//!
//! Retry policy: read, stat, ping, list and topology are idempotent and are
//! retried once, on a fresh connection, when the connection is lost
//! (`ConnectionClosed` or `Io`). Write and delete are never retried: the
//! lost request may have been applied, and a replay would bump the chunk's
//! version again (or report NOT_FOUND for a delete that succeeded). Only the
//! caller knows whether that is acceptable, so it gets the error.

use crate::conn::{Connection, Reply};
use crate::{
    ChunkStat, ClientConfig, ClientError, ListEntry, ListPage, ReadOptions, ReadResult, Topology,
    WriteResult,
};
use bytes::Bytes;
use shardstore_proto::{
    access_body, encode_frame, limits, payload_crc, route, ArchivedDeleteReply, ArchivedErrorBody,
    ArchivedListReply, ArchivedReadReply, ArchivedStatReply, ArchivedStatsReply,
    ArchivedTopologyReply, ArchivedWriteReply, ChunkId, ChunkRequest, Empty, ListRequest, Opcode,
    ReadRequest, ShardId, StatsReply, WriteRequest,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A handle to one shardstore node. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ClientConfig,
    topology: Topology,
    front: Slot,
    shards: Vec<Slot>,
}

/// The connection to one address, opened lazily and reopened once dead.
struct Slot {
    addr: String,
    conn: Mutex<Option<Arc<Connection>>>,
    /// Serializes connection attempts so concurrent calls share one.
    connecting: tokio::sync::Mutex<()>,
}

impl Slot {
    fn new(addr: String) -> Self {
        Slot {
            addr,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    fn live(&self) -> Option<Arc<Connection>> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        conn.as_ref().filter(|c| c.is_alive()).cloned()
    }

    async fn get(&self, cfg: &ClientConfig) -> Result<Arc<Connection>, ClientError> {
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let c = Connection::open(&self.addr, cfg).await?;
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
        Ok(c)
    }
}

/// The reply's body, validated in place. (A macro because `access_body`'s
/// bounds are rkyv traits, and this crate does not depend on rkyv itself.)
macro_rules! body {
    ($reply:expr, $ty:ty, $op:expr) => {
        access_body::<$ty>(&$reply.body)
            .map_err(|e| ClientError::Protocol(format!("{} reply: {e}", $op.name())))
    };
}

/// Sends one request through `slot` and returns its successful reply: error
/// replies are mapped to typed errors, a reply with another opcode is a
/// protocol error. The whole call, reconnect and retry included, is bounded
/// by `cfg.request_timeout`.
async fn call<F>(
    cfg: &ClientConfig,
    slot: &Slot,
    op: Opcode,
    chunk: ChunkId,
    idempotent: bool,
    payload: Bytes,
    encode: F,
) -> Result<Reply, ClientError>
where
    F: Fn(u64, &mut Vec<u8>),
{
    let attempts = async {
        let mut retried = false;
        loop {
            let res = match slot.get(cfg).await {
                Ok(conn) => conn.call(&encode, payload.clone()).await,
                Err(e) => Err(e),
            };
            match res {
                Err(e) if idempotent && !retried && e.is_connection_loss() => {
                    tracing::debug!(addr = %slot.addr, op = op.name(), %chunk, error = %e, "retrying on a new connection");
                    retried = true;
                }
                other => return other,
            }
        }
    };
    let reply = match tokio::time::timeout(cfg.request_timeout, attempts).await {
        Ok(res) => res?,
        Err(_) => {
            return Err(ClientError::Timeout {
                op: op.name(),
                after: cfg.request_timeout,
            })
        }
    };
    if reply.opcode != op {
        return Err(ClientError::Protocol(format!(
            "{} reply to a {} request",
            reply.opcode.name(),
            op.name()
        )));
    }
    if reply.is_error {
        let body = body!(reply, ArchivedErrorBody, op)?;
        return Err(ClientError::from_error_body(body, chunk));
    }
    Ok(reply)
}

fn invalid(msg: String) -> ClientError {
    ClientError::InvalidArgument(msg)
}

impl Client {
    /// Connects to a node's front address (`"host:port"`) with the default
    /// [`ClientConfig`] and fetches its topology.
    pub async fn connect(addr: &str) -> Result<Client, ClientError> {
        Self::connect_with(addr, ClientConfig::default()).await
    }

    /// Connects to a node's front address and fetches its topology. Shard
    /// connections are opened on first use.
    pub async fn connect_with(addr: &str, mut cfg: ClientConfig) -> Result<Client, ClientError> {
        if let Some(tls) = &mut cfg.tls {
            // Shard connections go to the addresses the topology advertises
            // (often IPs); the certificate names the node the user gave.
            if tls.server_name.is_none() && crate::rdma::rdma_target(addr).is_none() {
                tls.server_name = Some(crate::conn::host_of(addr));
            }
        }
        let max = crate::config::MAX_IN_FLIGHT_PER_CONNECTION;
        if !(1..=max).contains(&cfg.max_in_flight_per_connection) {
            return Err(invalid(format!(
                "max_in_flight_per_connection must be 1 to {max}, not {}",
                cfg.max_in_flight_per_connection
            )));
        }
        let front = Slot::new(addr.to_owned());
        let reply = call(
            &cfg,
            &front,
            Opcode::Topology,
            ChunkId(0),
            true,
            Bytes::new(),
            |id, out| encode_frame(Opcode::Topology, 0, id, &Empty {}, 0, out),
        )
        .await?;
        let topology =
            Topology::from_reply(body!(reply, ArchivedTopologyReply, Opcode::Topology)?, addr)?;
        tracing::debug!(addr, shard_count = topology.shard_count, node_id = %format_args!("{:032x}", topology.node_id), "topology fetched");
        let shards = topology
            .shard_addrs
            .iter()
            .cloned()
            .map(|a| Slot::new(crate::rdma::shard_addr(addr, a)))
            .collect();
        Ok(Client {
            inner: Arc::new(Inner {
                cfg,
                topology,
                front,
                shards,
            }),
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.cfg
    }

    /// The shard that owns `chunk` (`shardstore_proto::route`).
    pub fn shard_of(&self, chunk: ChunkId) -> ShardId {
        route(chunk, self.inner.topology.shard_count)
    }

    /// Where requests for `shard` go: its own address, or the front address
    /// when `route_direct` is off.
    fn slot_for(&self, shard: ShardId) -> &Slot {
        if self.inner.cfg.route_direct {
            &self.inner.shards[shard.0 as usize]
        } else {
            &self.inner.front
        }
    }

    fn check_shard(&self, shard: ShardId) -> Result<(), ClientError> {
        if shard.0 >= self.inner.topology.shard_count {
            return Err(invalid(format!(
                "shard {shard} out of range (node has {} shards)",
                self.inner.topology.shard_count
            )));
        }
        Ok(())
    }

    async fn ping_slot(&self, slot: &Slot) -> Result<Duration, ClientError> {
        let start = Instant::now();
        call(
            &self.inner.cfg,
            slot,
            Opcode::Ping,
            ChunkId(0),
            true,
            Bytes::new(),
            |id, out| encode_frame(Opcode::Ping, 0, id, &Empty {}, 0, out),
        )
        .await?;
        Ok(start.elapsed())
    }

    /// Round trip of a PING to the front address.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        self.ping_slot(&self.inner.front).await
    }

    /// Round trip of a PING to `shard`'s own address (whatever `route_direct`
    /// says: this measures that shard).
    pub async fn ping_shard(&self, shard: ShardId) -> Result<Duration, ClientError> {
        self.check_shard(shard)?;
        self.ping_slot(&self.inner.shards[shard.0 as usize]).await
    }

    /// Writes `data` at `offset` of `chunk`, creating the chunk if needed.
    /// The payload's crc32c travels with it; the server checks it before
    /// changing anything. Not retried on connection loss (see module docs).
    pub async fn write(
        &self,
        chunk: ChunkId,
        offset: u64,
        data: impl Into<Bytes>,
    ) -> Result<WriteResult, ClientError> {
        let data: Bytes = data.into();
        let t = &self.inner.topology;
        if data.is_empty() {
            return Err(invalid("empty write".into()));
        }
        if data.len() > t.max_payload as usize {
            return Err(invalid(format!(
                "write of {} bytes exceeds the node's max payload of {} bytes",
                data.len(),
                t.max_payload
            )));
        }
        let len = data.len() as u32;
        match offset.checked_add(u64::from(len)) {
            Some(end) if end <= t.max_chunk_size => {}
            _ => {
                return Err(invalid(format!(
                "write of {len} bytes at offset {offset} exceeds the max chunk size of {} bytes",
                t.max_chunk_size
            )))
            }
        }
        let req = WriteRequest {
            chunk: chunk.0,
            offset,
            payload_crc: payload_crc(&data),
            flags: 0,
        };
        let slot = self.slot_for(self.shard_of(chunk));
        let reply = call(
            &self.inner.cfg,
            slot,
            Opcode::Write,
            chunk,
            false,
            data,
            |id, out| encode_frame(Opcode::Write, 0, id, &req, len, out),
        )
        .await?;
        let r = body!(reply, ArchivedWriteReply, Opcode::Write)?;
        Ok(WriteResult {
            version: r.version.to_native(),
            chunk_len: r.chunk_len.to_native(),
        })
    }

    /// Reads up to `len` bytes at `offset` of `chunk`; fewer when the read
    /// reaches the chunk's end. The bytes are checked against the reply's
    /// crc32c and never returned on a mismatch.
    pub async fn read(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: u32,
    ) -> Result<ReadResult, ClientError> {
        self.read_with(chunk, offset, len, ReadOptions::default())
            .await
    }

    /// [`Client::read`], telling the server more about the read (see
    /// [`ReadOptions`]). Options are hints: the bytes returned are the same.
    pub async fn read_with(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: u32,
        opts: ReadOptions,
    ) -> Result<ReadResult, ClientError> {
        let max = self.inner.topology.max_payload;
        if len > max {
            return Err(invalid(format!(
                "read of {len} bytes exceeds the node's max payload of {max} bytes"
            )));
        }
        let req = ReadRequest {
            chunk: chunk.0,
            offset,
            len,
            flags: opts.flags(),
        };
        let slot = self.slot_for(self.shard_of(chunk));
        let reply = call(
            &self.inner.cfg,
            slot,
            Opcode::Read,
            chunk,
            true,
            Bytes::new(),
            |id, out| encode_frame(Opcode::Read, 0, id, &req, 0, out),
        )
        .await?;
        let r = body!(reply, ArchivedReadReply, Opcode::Read)?;
        // Shorter than asked only where the chunk ends.
        let chunk_len = r.chunk_len.to_native();
        let expected = u64::from(len).min(chunk_len.saturating_sub(offset));
        if reply.payload.len() as u64 != expected {
            return Err(ClientError::Protocol(format!(
                "read reply of {} bytes for a read of {len} at offset {offset} of a {chunk_len}-byte chunk (expected {expected})",
                reply.payload.len()
            )));
        }
        let expected = r.payload_crc.to_native();
        let computed = payload_crc(&reply.payload);
        if computed != expected {
            return Err(ClientError::ChecksumMismatch {
                chunk,
                expected,
                computed,
            });
        }
        Ok(ReadResult {
            version: r.version.to_native(),
            chunk_len,
            data: reply.payload,
        })
    }

    pub async fn stat(&self, chunk: ChunkId) -> Result<ChunkStat, ClientError> {
        let slot = self.slot_for(self.shard_of(chunk));
        let reply = call(
            &self.inner.cfg,
            slot,
            Opcode::Stat,
            chunk,
            true,
            Bytes::new(),
            |id, out| {
                encode_frame(
                    Opcode::Stat,
                    0,
                    id,
                    &ChunkRequest { chunk: chunk.0 },
                    0,
                    out,
                )
            },
        )
        .await?;
        let r = body!(reply, ArchivedStatReply, Opcode::Stat)?;
        Ok(ChunkStat {
            chunk_len: r.chunk_len.to_native(),
            version: r.version.to_native(),
            created_ns: r.created_ns.to_native(),
            modified_ns: r.modified_ns.to_native(),
            shard: ShardId(r.shard.to_native()),
            allocated_bytes: r.allocated_bytes.to_native(),
        })
    }

    /// Deletes `chunk`; returns the version it had. Not retried on
    /// connection loss (see module docs).
    pub async fn delete(&self, chunk: ChunkId) -> Result<u64, ClientError> {
        let slot = self.slot_for(self.shard_of(chunk));
        let reply = call(
            &self.inner.cfg,
            slot,
            Opcode::Delete,
            chunk,
            false,
            Bytes::new(),
            |id, out| {
                encode_frame(
                    Opcode::Delete,
                    0,
                    id,
                    &ChunkRequest { chunk: chunk.0 },
                    0,
                    out,
                )
            },
        )
        .await?;
        let r = body!(reply, ArchivedDeleteReply, Opcode::Delete)?;
        Ok(r.version.to_native())
    }

    /// Lists up to `limit` chunks of `shard` with ids greater than `after`
    /// (from the first when `None`), in id order.
    pub async fn list(
        &self,
        shard: ShardId,
        after: Option<ChunkId>,
        limit: u32,
    ) -> Result<ListPage, ClientError> {
        self.check_shard(shard)?;
        if limit == 0 || limit > limits::MAX_LIST_LIMIT {
            return Err(invalid(format!(
                "list limit {limit} not in 1..={}",
                limits::MAX_LIST_LIMIT
            )));
        }
        let req = ListRequest {
            shard: shard.0,
            after: after.map_or(0, |c| c.0),
            from_start: after.is_none(),
            limit,
        };
        let slot = self.slot_for(shard);
        let reply = call(
            &self.inner.cfg,
            slot,
            Opcode::List,
            ChunkId(0),
            true,
            Bytes::new(),
            |id, out| encode_frame(Opcode::List, 0, id, &req, 0, out),
        )
        .await?;
        let r = body!(reply, ArchivedListReply, Opcode::List)?;
        Ok(ListPage {
            entries: r
                .entries
                .iter()
                .map(|e| ListEntry {
                    chunk: ChunkId(e.chunk.to_native()),
                    chunk_len: e.chunk_len.to_native(),
                    version: e.version.to_native(),
                })
                .collect(),
            more: r.more,
        })
    }

    /// Counters of one shard, asked at that shard's own address. The reply is
    /// returned as the protocol defines it (deserialized from the archive).
    /// A reply from another shard is a `Protocol` error: over `rdma://`
    /// every shard's address is the node's one RDMA endpoint, which answers
    /// STATS for shard 0 only (ask over TCP for the others).
    pub async fn stats(&self, shard: ShardId) -> Result<StatsReply, ClientError> {
        self.check_shard(shard)?;
        let slot = &self.inner.shards[shard.0 as usize];
        let reply = call(
            &self.inner.cfg,
            slot,
            Opcode::Stats,
            ChunkId(0),
            true,
            Bytes::new(),
            |id, out| encode_frame(Opcode::Stats, 0, id, &Empty {}, 0, out),
        )
        .await?;
        let r = body!(reply, ArchivedStatsReply, Opcode::Stats)?;
        let st = rkyv::deserialize::<StatsReply, rkyv::rancor::Error>(r)
            .map_err(|e| ClientError::Protocol(format!("stats reply: {e}")))?;
        if st.shard != shard.0 {
            return Err(ClientError::Protocol(format!(
                "asked shard {} for its counters, shard {} answered{}",
                shard.0,
                st.shard,
                if crate::rdma::rdma_target(&slot.addr).is_some() {
                    " (an rdma:// address reaches shard 0 only: ask over TCP)"
                } else {
                    ""
                }
            )));
        }
        Ok(st)
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("front_addr", &self.inner.topology.front_addr)
            .field("shard_count", &self.inner.topology.shard_count)
            .field("route_direct", &self.inner.cfg.route_direct)
            .finish_non_exhaustive()
    }
}
