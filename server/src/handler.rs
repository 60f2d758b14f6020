//! Request execution on the owning shard, and forwarding to the owner.
//!
//! A request that reaches a shard that does not own its chunk (the front
//! port, or a misrouted client) is sent to the owner over a bounded flume
//! queue with its body and payload, executed there, and the encoded reply
//! comes back the same way. Nothing mutable is shared between shards: a
//! forwarded request carries owned bytes only.

use crate::stats::ShardCounters;
use futures_lite::FutureExt;
use shardstore_proto::{
    access_body, encode_frame, limits, route, ArchivedChunkRequest, ArchivedListRequest,
    ArchivedReadRequest, ArchivedWriteRequest, ChunkId, ChunkRequest, DeleteReply, Empty,
    ErrorBody, ErrorCode, HelloReply, ListEntry, ListReply, ListRequest, Opcode, ReadReply,
    ReadRequest, ShardId, StatReply, StatsReply, TopologyReply, WriteReply, WriteRequest,
    FLAG_ERROR, FLAG_RESPONSE, PROTOCOL_VERSION, READ_FLAGS_KNOWN, READ_FLAG_NEXT_CHUNK,
    ROUTE_FN_JUMP_SPLITMIX,
};
use shardstore_shard::sem::Semaphore;
use shardstore_shard::{ReadData, ReadHints, Shard, ShardError, StreamHint};
use std::rc::Rc;
use std::time::Instant;
use tracing::debug;

/// What every shard knows about the node, fixed at start-up.
#[derive(Clone)]
pub struct NodeInfo {
    pub node_id: u128,
    pub shard_count: u32,
    pub shard_addrs: Vec<String>,
    pub max_payload: u32,
    pub max_chunk_size: u64,
    pub limits: crate::conn_limits::ConnLimits,
    /// Shared secret every connection must prove before any other request.
    pub auth_secret: Option<std::sync::Arc<Vec<u8>>>,
    /// TLS for every listener, when configured.
    pub tls: Option<futures_rustls::TlsAcceptor>,
    /// `stream_hints[i]`: shard `i`'s queue of read-ahead hints (a marked
    /// sequential stream crossing into one of its chunks, see
    /// [`ShardCtx::route_stream_hints`]). Empty: hints stay on their shard.
    pub stream_hints: Vec<flume::Sender<StreamHint>>,
}

impl NodeInfo {
    /// A node of one shard without TLS nor authentication, for the request
    /// path run in one process (tests, fuzzing).
    pub fn single_shard(max_payload: u32, limits: crate::conn_limits::ConnLimits) -> NodeInfo {
        NodeInfo {
            node_id: 1,
            shard_count: 1,
            shard_addrs: vec!["127.0.0.1:1".into()],
            max_payload,
            max_chunk_size: shardstore_proto::limits::MAX_CHUNK_SIZE,
            limits,
            auth_secret: None,
            tls: None,
            stream_hints: Vec::new(),
        }
    }
}

/// Bound of each shard's queue of stream hints. A hint that finds it full
/// is dropped: read-ahead is an optimisation, never worth a wait.
pub const STREAM_HINT_QUEUE: usize = 256;

/// Where a request and its outcome are counted (`requests`, `errors`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    /// On this shard.
    Here,
    /// On the shard that forwarded it here (see [`ForwardMsg::count`]).
    BySender,
}

/// A request handed to its owning shard. Only owned, `Send` data.
pub struct Forwarded {
    pub opcode: Opcode,
    pub request_id: u64,
    pub body: Vec<u8>,
    pub payload: Vec<u8>,
    pub reply: flume::Sender<EncodedReply>,
    /// When the sender stops waiting (`forward_timeout_ms`): a request
    /// still queued then is dropped unexecuted.
    pub deadline: std::time::Instant,
    /// Never sent on: dropped with this message, it tells the sender that
    /// the owner has let go of the payload (see [`Queued::released`]).
    pub release: flume::Sender<()>,
    /// See [`ForwardMsg::count`].
    pub count: Count,
}

/// A reply encoded by the owner: header and body, then payload bytes.
pub struct EncodedReply {
    pub frame: Vec<u8>,
    pub payload: Vec<u8>,
}

/// Bytes that follow a reply's header and body.
pub enum ReplyPayload {
    None,
    Disk(ReadData),
    Owned(Vec<u8>),
}

impl ReplyPayload {
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        match self {
            ReplyPayload::None => 0,
            ReplyPayload::Disk(d) => d.len(),
            ReplyPayload::Owned(v) => v.len(),
        }
    }
}

/// The per-shard request context, shared by that shard's tasks through `Rc`.
pub struct ShardCtx {
    pub shard: Shard,
    pub id: ShardId,
    pub node: NodeInfo,
    pub peers: Vec<flume::Sender<Forwarded>>,
    pub counters: ShardCounters,
    pub limits: crate::conn_limits::ConnLimits,
    /// Payload buffer budget shared by this shard's connections.
    pub budget: std::rc::Rc<crate::budget::Budget>,
    /// Open connections, so a graceful stop can end their reads.
    pub conns: crate::lifecycle::ConnRegistry,
}

/// What a READ's flags tell the shard (validated in [`Parsed::decode`]).
fn read_hints(r: &ReadRequest) -> ReadHints {
    ReadHints {
        continues_into_next_chunk: r.flags & READ_FLAG_NEXT_CHUNK != 0,
    }
}

/// Checks a write's payload against the crc the client sent, before any
/// state changes (invariant 4).
pub fn check_write_payload(w: &WriteRequest, payload: &[u8]) -> Result<(), ErrReply> {
    let computed = crc32c::crc32c(payload);
    if computed != w.payload_crc {
        return Err(ErrReply {
            code: ErrorCode::BadChecksum,
            chunk: ChunkId(w.chunk),
            sector: 0,
            message: format!(
                "payload crc32c {computed:#010x} does not match the request's {:#010x}; nothing written",
                w.payload_crc
            ),
        });
    }
    Ok(())
}

/// A request to hand to another shard (see [`enqueue_to_shard`]).
pub struct ForwardMsg {
    pub opcode: Opcode,
    pub request_id: u64,
    pub body: Vec<u8>,
    pub payload: Vec<u8>,
    /// See [`Forwarded::deadline`].
    pub deadline: std::time::Instant,
    /// Where the request and its outcome are counted in `requests` and
    /// `errors`: `BySender` from a shard that took it from a client
    /// connection (the owner counts it only in `forwarded_in` and its
    /// execution latency), `Here` (on the owner) from the RDMA bridge.
    pub count: Count,
}

/// A request queued for another shard.
pub struct Queued {
    /// The reply (see [`await_shard_reply`]); dropping it tells the owner
    /// nobody waits for the request any more.
    pub reply: flume::Receiver<EncodedReply>,
    /// Disconnects once the owner has dropped the request: its payload is
    /// no longer held anywhere.
    pub released: flume::Receiver<()>,
}

/// Queues a request for shard `owner` without waiting: a missing shard is
/// INVALID_REQUEST, a full queue BUSY (never unbounded growth). Used by
/// shard-to-shard forwarding and by the RDMA bridge.
pub fn enqueue_to_shard(
    peers: &[flume::Sender<Forwarded>],
    owner: ShardId,
    msg: ForwardMsg,
) -> Result<Queued, ErrReply> {
    let Some(peer) = peers.get(owner.0 as usize) else {
        return Err(ErrReply::new(
            ErrorCode::InvalidRequest,
            format!("shard {owner} does not exist (shard count {})", peers.len()),
        ));
    };
    let (tx, rx) = flume::bounded(1);
    let (release, released) = flume::bounded(1);
    let fwd = Forwarded {
        opcode: msg.opcode,
        request_id: msg.request_id,
        body: msg.body,
        payload: msg.payload,
        reply: tx,
        deadline: msg.deadline,
        release,
        count: msg.count,
    };
    if peer.try_send(fwd).is_err() {
        return Err(ErrReply::new(
            ErrorCode::Busy,
            format!("forwarding queue to shard {owner} is full"),
        ));
    }
    Ok(Queued {
        reply: rx,
        released,
    })
}

/// A forwarded request's share of its sender's buffer budget, kept until the
/// owner lets go of the request: given back with the reply, or, when the
/// sender stops waiting first (a TIMEOUT, or the request's future dropped
/// with its connection), held by a task of its own until the owner drops
/// the request. Its payload is in the owner's queue or in use until then.
struct HoldUntilReleased {
    hold: Option<crate::budget::Reservation>,
    released: Option<flume::Receiver<()>>,
}

impl HoldUntilReleased {
    /// The reply came: the owner is done with the request.
    fn take(mut self) -> Option<crate::budget::Reservation> {
        self.released = None;
        self.hold.take()
    }
}

impl Drop for HoldUntilReleased {
    fn drop(&mut self) {
        if let (Some(hold), Some(released)) = (self.hold.take(), self.released.take()) {
            glommio::spawn_local(async move {
                let _hold = hold;
                let _ = released.recv_async().await;
            })
            .detach();
        }
    }
}

/// Waits for the reply to a request queued by [`enqueue_to_shard`] with
/// `deadline`, `after` its sending. An owner drops a request it takes past
/// its deadline unexecuted: that is a TIMEOUT too (the sender's own timer
/// may not have fired yet), not a failure of the owner.
pub async fn await_shard_reply(
    owner: ShardId,
    rx: flume::Receiver<EncodedReply>,
    deadline: Instant,
    after: std::time::Duration,
) -> Result<EncodedReply, ErrReply> {
    rx.recv_async().await.map_err(|_| {
        if Instant::now() >= deadline {
            return forward_timed_out(owner, after);
        }
        ErrReply::new(
            ErrorCode::Internal,
            format!("shard {owner} dropped a forwarded request (stopping?)"),
        )
    })
}

/// The error for a forwarded request `owner` did not answer within `after`
/// (`forward_timeout_ms`): the request may still take effect there.
pub fn forward_timed_out(owner: ShardId, after: std::time::Duration) -> ErrReply {
    ErrReply::new(
        ErrorCode::Timeout,
        format!(
            "shard {owner} did not answer a forwarded request within {} ms; it may still take effect",
            after.as_millis()
        ),
    )
}

/// Error reply parts.
pub struct ErrReply {
    pub code: ErrorCode,
    pub chunk: ChunkId,
    pub sector: u64,
    pub message: String,
}

impl ErrReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrReply {
            code,
            chunk: ChunkId(0),
            sector: 0,
            message: message.into(),
        }
    }
}

impl From<ShardError> for ErrReply {
    fn from(e: ShardError) -> Self {
        let (chunk, sector) = match &e {
            ShardError::NotFound(c) => (*c, 0),
            ShardError::Corrupt { chunk, sector, .. } => (*chunk, *sector),
            _ => (ChunkId(0), 0),
        };
        let mut message = e.to_string();
        truncate_message(&mut message);
        ErrReply {
            code: e.code(),
            chunk,
            sector,
            message,
        }
    }
}

fn truncate_message(m: &mut String) {
    if m.len() > limits::MAX_ERROR_MESSAGE {
        let mut cut = limits::MAX_ERROR_MESSAGE;
        while !m.is_char_boundary(cut) {
            cut -= 1;
        }
        m.truncate(cut);
    }
}

pub fn encode_error(out: &mut Vec<u8>, opcode: Opcode, request_id: u64, e: &ErrReply) {
    encode_frame(
        opcode,
        FLAG_RESPONSE | FLAG_ERROR,
        request_id,
        &ErrorBody {
            code: e.code as u16,
            chunk: e.chunk.0,
            sector: e.sector,
            message: e.message.clone(),
        },
        0,
        out,
    );
}

/// Errors for opcode-less failures (bad header): answered with the opcode
/// byte the peer sent when it is valid, else PING.
pub fn encode_header_error(out: &mut Vec<u8>, opcode: u8, request_id: u64, e: &ErrReply) {
    let op = Opcode::from_u8(opcode).unwrap_or(Opcode::Ping);
    encode_error(out, op, request_id, e);
}

/// A request decoded from its body, payload not yet read.
pub enum Parsed {
    Ping,
    Topology,
    Write(WriteRequest),
    Read(ReadRequest),
    Stat(ChunkRequest),
    Delete(ChunkRequest),
    List(ListRequest),
    Stats,
    /// HELLO/AUTH after the handshake, or on a server without authentication.
    Hello,
    Auth,
}

impl Parsed {
    /// Decodes and validates a body (bytecheck), copying its few scalar fields out.
    pub fn decode(opcode: Opcode, body: &[u8]) -> Result<Parsed, ErrReply> {
        let bad =
            |e: shardstore_proto::ProtoError| ErrReply::new(ErrorCode::Malformed, e.to_string());
        Ok(match opcode {
            Opcode::Ping => Parsed::Ping,
            Opcode::Topology => Parsed::Topology,
            Opcode::Stats => Parsed::Stats,
            Opcode::Hello => Parsed::Hello,
            Opcode::Auth => Parsed::Auth,
            Opcode::Write => {
                let w = access_body::<ArchivedWriteRequest>(body).map_err(bad)?;
                let flags = w.flags.to_native();
                if flags != 0 {
                    return Err(ErrReply::new(
                        ErrorCode::Malformed,
                        format!("unknown WRITE flags {flags:#x} (this server knows none)"),
                    ));
                }
                Parsed::Write(WriteRequest {
                    chunk: w.chunk.to_native(),
                    offset: w.offset.to_native(),
                    payload_crc: w.payload_crc.to_native(),
                    flags: w.flags.to_native(),
                })
            }
            Opcode::Read => {
                let r = access_body::<ArchivedReadRequest>(body).map_err(bad)?;
                let flags = r.flags.to_native();
                if flags & !READ_FLAGS_KNOWN != 0 {
                    return Err(ErrReply::new(
                        ErrorCode::Malformed,
                        format!(
                            "unknown READ flags {:#x} (known: {READ_FLAGS_KNOWN:#x})",
                            flags & !READ_FLAGS_KNOWN
                        ),
                    ));
                }
                Parsed::Read(ReadRequest {
                    chunk: r.chunk.to_native(),
                    offset: r.offset.to_native(),
                    len: r.len.to_native(),
                    flags: r.flags.to_native(),
                })
            }
            Opcode::Stat | Opcode::Delete => {
                let c = access_body::<ArchivedChunkRequest>(body).map_err(bad)?;
                let req = ChunkRequest {
                    chunk: c.chunk.to_native(),
                };
                if opcode == Opcode::Stat {
                    Parsed::Stat(req)
                } else {
                    Parsed::Delete(req)
                }
            }
            Opcode::List => {
                let l = access_body::<ArchivedListRequest>(body).map_err(bad)?;
                Parsed::List(ListRequest {
                    shard: l.shard.to_native(),
                    after: l.after.to_native(),
                    from_start: l.from_start,
                    limit: l.limit.to_native(),
                })
            }
        })
    }

    /// The shard that must execute this request.
    pub fn owner(&self, shard_count: u32, me: ShardId) -> ShardId {
        match self {
            Parsed::Ping | Parsed::Topology | Parsed::Stats | Parsed::Hello | Parsed::Auth => me,
            Parsed::Write(w) => route(ChunkId(w.chunk), shard_count),
            Parsed::Read(r) => route(ChunkId(r.chunk), shard_count),
            Parsed::Stat(c) | Parsed::Delete(c) => route(ChunkId(c.chunk), shard_count),
            Parsed::List(l) => ShardId(l.shard),
        }
    }
}

impl ShardCtx {
    /// A shard's context with fresh counters, its buffer budget from the
    /// node's limits and no open connections.
    pub fn new(
        shard: Shard,
        id: ShardId,
        node: NodeInfo,
        peers: Vec<flume::Sender<Forwarded>>,
    ) -> ShardCtx {
        let limits = node.limits.clone();
        ShardCtx {
            shard,
            id,
            node,
            peers,
            counters: ShardCounters::default(),
            budget: crate::budget::Budget::new(limits.shard_buffer_bytes),
            limits,
            conns: crate::lifecycle::ConnRegistry::default(),
        }
    }

    /// Executes a request this shard owns. For WRITE, `payload` holds the
    /// bytes already read (and checked by the caller against the crc).
    /// Appends the reply's header and body to `out` and returns its payload.
    /// An error reply is counted in `errors` unless `errors` says the
    /// sender counts it (see [`ForwardMsg::count`]).
    pub async fn execute(
        &self,
        opcode: Opcode,
        request_id: u64,
        req: Parsed,
        write: Option<shardstore_shard::PendingWrite>,
        out: &mut Vec<u8>,
        errors: Count,
    ) -> ReplyPayload {
        // In-flight gauge and latency histogram (metrics), released on drop.
        let _in_flight = self.counters.start(opcode);
        match self
            .execute_inner(opcode, request_id, req, write, out)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                if errors == Count::Here {
                    self.counters.error(opcode);
                }
                encode_error(out, opcode, request_id, &e);
                ReplyPayload::None
            }
        }
    }

    async fn execute_inner(
        &self,
        opcode: Opcode,
        request_id: u64,
        req: Parsed,
        write: Option<shardstore_shard::PendingWrite>,
        out: &mut Vec<u8>,
    ) -> Result<ReplyPayload, ErrReply> {
        let ok = FLAG_RESPONSE;
        match req {
            Parsed::Ping => {
                encode_frame(opcode, ok, request_id, &Empty {}, 0, out);
            }
            Parsed::Topology => {
                encode_frame(opcode, ok, request_id, &self.topology(), 0, out);
            }
            Parsed::Stats => {
                encode_frame(opcode, ok, request_id, &self.stats(), 0, out);
            }
            Parsed::Hello => {
                // Reaching here means no handshake is pending: either the
                // server does not authenticate, or this connection already did.
                if self.node.auth_secret.is_some() {
                    return Err(ErrReply::new(
                        ErrorCode::InvalidRequest,
                        "already authenticated",
                    ));
                }
                let reply = HelloReply {
                    auth_required: false,
                    server_nonce: [0; 32],
                };
                encode_frame(opcode, ok, request_id, &reply, 0, out);
            }
            Parsed::Auth => {
                let why = if self.node.auth_secret.is_some() {
                    "already authenticated"
                } else {
                    "this server does not use authentication"
                };
                return Err(ErrReply::new(ErrorCode::InvalidRequest, why));
            }
            Parsed::Write(_) => {
                let w = write.ok_or_else(|| {
                    ErrReply::new(ErrorCode::Internal, "write without payload buffer")
                })?;
                let len = w.len() as u64;
                let outcome = self.shard.commit_write(w).await?;
                self.counters
                    .bytes_in
                    .set(self.counters.bytes_in.get() + len);
                encode_frame(
                    opcode,
                    ok,
                    request_id,
                    &WriteReply {
                        version: outcome.version,
                        chunk_len: outcome.chunk_len,
                    },
                    0,
                    out,
                );
            }
            Parsed::Read(r) => {
                if r.len > self.node.max_payload {
                    return Err(ErrReply::new(
                        ErrorCode::TooLarge,
                        format!(
                            "read of {} bytes exceeds the payload limit of {}",
                            r.len, self.node.max_payload
                        ),
                    ));
                }
                let started = Instant::now();
                let res = self
                    .shard
                    .read_with(ChunkId(r.chunk), r.offset, r.len, read_hints(&r))
                    .await?;
                let us = started.elapsed().as_micros() as u64;
                return Ok(self.encode_read(opcode, request_id, res, us, out));
            }
            Parsed::Stat(c) => {
                let s = self.shard.stat(ChunkId(c.chunk))?;
                encode_frame(
                    opcode,
                    ok,
                    request_id,
                    &StatReply {
                        chunk_len: s.chunk_len,
                        version: s.version,
                        created_ns: s.created_ns,
                        modified_ns: s.modified_ns,
                        shard: self.id.0,
                        allocated_bytes: s.allocated_bytes,
                    },
                    0,
                    out,
                );
            }
            Parsed::Delete(c) => {
                let version = self.shard.delete(ChunkId(c.chunk)).await?;
                encode_frame(opcode, ok, request_id, &DeleteReply { version }, 0, out);
            }
            Parsed::List(l) => {
                if l.limit > limits::MAX_LIST_LIMIT {
                    return Err(ErrReply::new(
                        ErrorCode::TooLarge,
                        format!("list limit {} exceeds {}", l.limit, limits::MAX_LIST_LIMIT),
                    ));
                }
                let after = (!l.from_start).then_some(ChunkId(l.after));
                let (items, more) = self.shard.list(after, l.limit)?;
                let entries = items
                    .into_iter()
                    .map(|i| ListEntry {
                        chunk: i.chunk.0,
                        chunk_len: i.chunk_len,
                        version: i.version,
                    })
                    .collect();
                encode_frame(opcode, ok, request_id, &ListReply { entries, more }, 0, out);
            }
        }
        Ok(ReplyPayload::None)
    }

    /// The most payload bytes a READ of this shard's chunk can return now:
    /// its length, capped by the payload limit and by the chunk's end (0 for
    /// a missing chunk or an offset at or past its end).
    pub fn read_reply_bound(&self, r: &ReadRequest) -> u64 {
        let len = u64::from(r.len.min(self.node.max_payload));
        match self.shard.stat(ChunkId(r.chunk)) {
            Ok(st) => len.min(st.chunk_len.saturating_sub(r.offset)),
            Err(_) => 0,
        }
    }

    /// Whether the shard has a read cache (READs may be answered inline).
    pub fn shard_has_cache(&self) -> bool {
        self.shard.has_cache()
    }

    /// Answers a READ inline when it needs no device I/O (see
    /// `Shard::read_now`): appends the reply to `out` and returns its
    /// payload, or `None` if the request must go through [`Self::execute`].
    pub fn read_now(
        &self,
        opcode: Opcode,
        request_id: u64,
        r: &ReadRequest,
        out: &mut Vec<u8>,
    ) -> Option<ReplyPayload> {
        if r.len > self.node.max_payload {
            return None;
        }
        let started = Instant::now();
        let res = self
            .shard
            .read_now_with(ChunkId(r.chunk), r.offset, r.len, read_hints(r))?;
        // One clock read for both histograms (a cached read takes a few us).
        let us = started.elapsed().as_micros() as u64;
        self.counters.record_us(opcode, us);
        Some(match res {
            Ok(res) => self.encode_read(opcode, request_id, res, us, out),
            Err(e) => {
                self.counters.error(opcode);
                encode_error(out, opcode, request_id, &e.into());
                ReplyPayload::None
            }
        })
    }

    /// Encodes a READ's reply and counts it.
    fn encode_read(
        &self,
        opcode: Opcode,
        request_id: u64,
        res: shardstore_shard::ReadOutcome,
        us: u64,
        out: &mut Vec<u8>,
    ) -> ReplyPayload {
        let split = if res.cached {
            &self.counters.read_cached
        } else {
            &self.counters.read_uncached
        };
        split.record(us);
        let n = res.data.len();
        self.counters
            .bytes_out
            .set(self.counters.bytes_out.get() + n as u64);
        encode_frame(
            opcode,
            FLAG_RESPONSE,
            request_id,
            &ReadReply {
                version: res.version,
                chunk_len: res.chunk_len,
                payload_crc: res.payload_crc,
            },
            n as u32,
            out,
        );
        ReplyPayload::Disk(res.data)
    }

    pub fn stats(&self) -> StatsReply {
        let c = &self.counters;
        let s = self.shard.stats();
        StatsReply {
            shard: self.id.0,
            requests: c.requests.iter().map(|x| x.get()).collect(),
            errors: c.errors.iter().map(|x| x.get()).collect(),
            bytes_in: c.bytes_in.get(),
            bytes_out: c.bytes_out.get(),
            forwarded_out: c.forwarded_out.get(),
            forwarded_in: c.forwarded_in.get(),
            forward_busy: c.forward_busy.get(),
            connections: c.connections.get(),
            connections_total: c.connections_total.get(),
            malformed_frames: c.malformed_frames.get(),
            chunks: s.chunks,
            used_bytes: s.used_bytes,
            capacity_bytes: s.capacity_bytes,
            device_writes: s.device_writes,
            flushes: s.flushes,
            corrupt_errors: s.corrupt_errors,
            fail_stopped: s.fail_stopped,
            refused_connections: c.refused_connections.get(),
            timeouts: c.timeouts.get(),
            busy: c.busy.get(),
            auth_failures: c.auth_failures.get(),
            buffer_bytes_used: self.budget.used(),
            buffer_bytes_limit: self.budget.limit(),
            in_flight: c.in_flight.get(),
            latency_bounds_us: crate::stats::LATENCY_BOUNDS_US.to_vec(),
            latency_counts: c.latency.iter().flat_map(|l| l.counts()).collect(),
            scrub_passes: s.scrub_passes,
            scrub_sectors: s.scrub_sectors,
            scrub_errors: s.scrub_errors,
            cache_capacity_bytes: s.cache.capacity_bytes,
            cache_bytes: s.cache.bytes,
            cache_entries: s.cache.entries,
            cache_hits: s.cache.hits,
            cache_misses: s.cache.misses,
            cache_evictions: s.cache.evictions,
            cached_reads: s.cache.cached_reads,
            uncached_reads: s.cache.uncached_reads,
            prefetch_enabled: s.cache.prefetch_enabled,
            prefetch_issued: s.cache.prefetch_issued,
            prefetch_used: s.cache.prefetch_used,
            prefetch_wasted: s.cache.prefetch_wasted,
            read_cached_latency: c.read_cached.counts(),
            read_uncached_latency: c.read_uncached.counts(),
            checkpoints: s.checkpoints,
            checkpoint_waits: s.checkpoint_waits,
            last_checkpoint_us: s.last_checkpoint_us,
            last_checkpoint_keys: s.last_checkpoint_keys,
            tombstones: s.tombstones,
            tombstones_retired: s.tombstones_retired,
            sweep_passes: s.sweep_passes,
            sweep_erased: s.sweep_erased,
            stream_hints_out: c.stream_hints_out.get(),
            stream_hints_in: c.stream_hints_in.get(),
            stream_hints_dropped: c.stream_hints_dropped.get(),
            combined_writes: s.combined_writes,
            forward_timeouts: c.forward_timeouts.get(),
            tls_failures: c.tls_failures.get(),
            cache_held_bytes: s.cache.held_bytes,
            cache_compacted: s.cache.compacted,
        }
    }

    pub fn topology(&self) -> TopologyReply {
        TopologyReply {
            protocol_version: PROTOCOL_VERSION,
            node_id: shardstore_proto::public_node_id(self.node.node_id),
            shard_count: self.node.shard_count,
            route_fn: ROUTE_FN_JUMP_SPLITMIX,
            answering_shard: self.id.0,
            sector_size: limits::SECTOR_SIZE,
            max_payload: self.node.max_payload,
            max_chunk_size: self.node.max_chunk_size,
            shard_addrs: self.node.shard_addrs.clone(),
        }
    }

    /// Checks a write's payload against the crc the client sent, before any
    /// state changes (invariant 4).
    pub fn check_payload(&self, w: &WriteRequest, payload: &[u8]) -> Result<(), ErrReply> {
        check_write_payload(w, payload)
    }

    /// Sends a request to its owner and waits for the encoded reply, at
    /// most `forward_timeout_ms` (then TIMEOUT). `hold`: the request's
    /// share of this shard's buffer budget, given back with the reply. On
    /// a timeout it stays held until the owner has let go of the request
    /// (answered it, or dropped it unexecuted once past its deadline): its
    /// payload is still in the owner's queue or in use until then.
    pub async fn forward(
        &self,
        owner: ShardId,
        opcode: Opcode,
        request_id: u64,
        body: Vec<u8>,
        payload: Vec<u8>,
        hold: Option<crate::budget::Reservation>,
    ) -> (
        Result<EncodedReply, ErrReply>,
        Option<crate::budget::Reservation>,
    ) {
        let after = self.limits.forward_timeout;
        let msg = ForwardMsg {
            opcode,
            request_id,
            body,
            payload,
            deadline: Instant::now() + after,
            count: Count::BySender,
        };
        let deadline = msg.deadline;
        let queued = match enqueue_to_shard(&self.peers, owner, msg) {
            Ok(q) => q,
            Err(e) => {
                if e.code == ErrorCode::Busy {
                    self.counters
                        .forward_busy
                        .set(self.counters.forward_busy.get() + 1);
                }
                return (Err(e), hold);
            }
        };
        self.counters
            .forwarded_out
            .set(self.counters.forwarded_out.get() + 1);
        let held = HoldUntilReleased {
            hold,
            released: Some(queued.released),
        };
        let reply = async { Some(await_shard_reply(owner, queued.reply, deadline, after).await) };
        let timed_out = async {
            glommio::timer::sleep(after).await;
            None
        };
        let (r, hold) = match reply.or(timed_out).await {
            // A reply, or the owner dropped the request (past its deadline:
            // TIMEOUT): either way it has let go of it.
            Some(r) => (r, held.take()),
            None => {
                tracing::warn!(
                    shard = self.id.0,
                    owner = owner.0,
                    "a forwarded request timed out"
                );
                // `held` keeps the budget until the owner lets go.
                (Err(forward_timed_out(owner, after)), None)
            }
        };
        if matches!(&r, Err(e) if e.code == ErrorCode::Timeout) {
            let c = &self.counters.forward_timeouts;
            c.set(c.get() + 1);
        }
        (r, hold)
    }

    /// Sends this shard's stream hints for chunks of other shards to their
    /// owners' queues, and takes the hints other shards send here.
    pub fn route_stream_hints(self: &Rc<Self>, rx: flume::Receiver<StreamHint>) {
        let queues = self.node.stream_hints.clone();
        let (me, shards) = (self.id, self.node.shard_count);
        // Weak: the forwarder lives inside this context's shard.
        let weak = Rc::downgrade(self);
        self.shard.set_stream_forwarder(move |h| {
            let owner = route(h.chunk, shards);
            if owner == me {
                return false;
            }
            let Some(q) = queues.get(owner.0 as usize) else {
                return false;
            };
            let sent = q.try_send(h).map_err(|e| {
                let why = match e {
                    flume::TrySendError::Full(_) => "its queue is full",
                    flume::TrySendError::Disconnected(_) => "that shard stopped",
                };
                debug!(shard = me.0, to = owner.0, why, "stream hint dropped");
            });
            if let Some(ctx) = weak.upgrade() {
                let c = &ctx.counters;
                let n = match sent {
                    Ok(()) => &c.stream_hints_out,
                    Err(()) => &c.stream_hints_dropped,
                };
                n.set(n.get() + 1);
            }
            true
        });
        let weak = Rc::downgrade(self);
        glommio::spawn_local(async move {
            while let Ok(h) = rx.recv_async().await {
                let Some(ctx) = weak.upgrade() else { return };
                let c = &ctx.counters;
                c.stream_hints_in.set(c.stream_hints_in.get() + 1);
                ctx.shard.accept_stream_hint(h);
            }
        })
        .detach();
    }

    /// Serves requests forwarded by other shards until every sender is gone.
    ///
    /// At most as many at once as the queue holds: the queue then fills and
    /// senders answer BUSY. Taken off the queue without a limit, forwarded
    /// requests piled up here while the connections that sent them (and
    /// their buffer budget on the sending shard) were already gone.
    pub async fn serve_forwarded(self: Rc<Self>, rx: flume::Receiver<Forwarded>) {
        let slots = Rc::new(Semaphore::new(rx.capacity().unwrap_or(1024).max(1) as u64));
        loop {
            let Ok(slot) = slots.acquire_rc_permit(1).await else {
                return;
            };
            let Ok(msg) = rx.recv_async().await else {
                return;
            };
            let ctx = self.clone();
            glommio::spawn_local(async move {
                let _slot = slot;
                ctx.counters
                    .forwarded_in
                    .set(ctx.counters.forwarded_in.get() + 1);
                if msg.reply.is_disconnected() || std::time::Instant::now() >= msg.deadline {
                    // Its connection is gone, or its sender stopped waiting
                    // (TIMEOUT): nobody reads the reply, and the client was
                    // told the request may not have taken effect.
                    return;
                }
                let reply = ctx
                    .execute_forwarded(
                        msg.opcode,
                        msg.request_id,
                        &msg.body,
                        msg.payload,
                        msg.count,
                    )
                    .await;
                let _ = msg.reply.send(reply);
            })
            .detach();
        }
    }

    async fn execute_forwarded(
        &self,
        opcode: Opcode,
        request_id: u64,
        body: &[u8],
        payload: Vec<u8>,
        count: Count,
    ) -> EncodedReply {
        let mut frame = Vec::new();
        if count == Count::Here {
            self.counters.request(opcode);
        }
        let result = async {
            let req = Parsed::decode(opcode, body)?;
            let owner = req.owner(self.node.shard_count, self.id);
            if owner != self.id {
                // Never forward twice: the sender computed the same route.
                return Err(ErrReply::new(
                    ErrorCode::Internal,
                    "forwarded request is not owned here",
                ));
            }
            let write = match &req {
                Parsed::Write(w) => {
                    let mut pw = self.shard.prepare_write(
                        ChunkId(w.chunk),
                        w.offset,
                        payload.len() as u32,
                    )?;
                    pw.payload_mut().copy_from_slice(&payload);
                    Some(pw)
                }
                _ => None,
            };
            Ok((req, write))
        }
        .await;
        let payload = match result {
            Ok((req, write)) => {
                self.execute(opcode, request_id, req, write, &mut frame, count)
                    .await
            }
            Err(e) => {
                debug!(shard = self.id.0, code = %e.code, "forwarded request refused");
                if count == Count::Here {
                    self.counters.error(opcode);
                }
                encode_error(&mut frame, opcode, request_id, &e);
                ReplyPayload::None
            }
        };
        let payload = match payload {
            ReplyPayload::None => Vec::new(),
            ReplyPayload::Disk(d) => d.to_vec(),
            ReplyPayload::Owned(v) => v,
        };
        EncodedReply { frame, payload }
    }
}
