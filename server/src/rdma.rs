//! `--rdma-listen`: the RDMA front of the node (feature `rdma`).
//!
//! async-rdma runs on tokio, and shards are glommio executors that must
//! never block, so RDMA gets a thread of its own ("shardstore-rdma") with a
//! current-thread tokio runtime. It accepts queue pairs, receives frames
//! (`shardstore_net::rdma`: same header, body, crcs and limits as TCP), pulls
//! bulk payloads by RDMA read, and hands every request to its owning shard
//! through the same bounded flume queues shards forward to each other with
//! ([`Forwarded`]); the owner executes it and sends the encoded reply back
//! on the request's reply channel; the RDMA thread RDMA-writes a bulk reply
//! payload into the request's sink and sends the reply.
//!
//! Routing is `shardstore_proto::route` through [`Parsed::owner`], with shard
//! 0 answering PING, TOPOLOGY, STATS (and HELLO). A WRITE's payload crc is
//! checked here, before the request leaves for the shard (invariant 4: bad
//! bytes never reach state). Bounds: a full forward queue is a BUSY reply;
//! at most `max_in_flight` requests per connection are in flight, after
//! which the connection is not read (the peer's sends wait: RDMA's
//! receiver-not-ready backpressure); registered memory per connection is a
//! bounded pool; the payload bytes the thread's requests hold (a WRITE's
//! payload, copied out of its registered region once fetched, and what a
//! READ's reply may carry) are reserved, before the payload is fetched,
//! against one budget for the whole thread (`shard_buffer_mib`, as one
//! more shard), and held until the reply is sent: over it, BUSY; at most
//! `max_connections_per_shard` connections are served at once, past it a
//! new one is dropped before its queue pair is set up.
//!
//! Counters: a request that reaches its owner is counted there like one
//! from TCP; what this thread answers itself (a bad message, a reply frame,
//! a bad crc, BUSY, a timeout, an unsendable reply) in the bridge's
//! [`RdmaCounters`], by error code (`shardstore_rdma_refused_total`).
//!
//! Not supported over RDMA (refused at start-up): authentication and TLS.

use crate::budget::{Budget, Reservation};
use crate::handler::{
    await_shard_reply, check_write_payload, encode_error, encode_header_error, enqueue_to_shard,
    forward_timed_out, Count, EncodedReply, ErrReply, ForwardMsg, Forwarded, Parsed,
};
use crate::stats::RdmaCounters;
use shardstore_net::rdma::{Endpoint, Incoming, PoolConfig, RdmaConn, RdmaError};
use shardstore_proto::{ErrorCode, Opcode, ShardId};
use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::{debug, info, warn};

/// Hands requests to their owning shards and brings replies back.
#[derive(Clone)]
pub struct Bridge {
    peers: Arc<Vec<flume::Sender<Forwarded>>>,
    shard_count: u32,
    forward_timeout: std::time::Duration,
    /// What this thread answers itself (exported on /metrics; see
    /// [`RdmaCounters`]).
    counters: Arc<RdmaCounters>,
}

impl Bridge {
    /// `forward_timeout`: longest wait for a shard's answer (see
    /// `ConnLimits::forward_timeout`).
    pub fn new(
        peers: Vec<flume::Sender<Forwarded>>,
        forward_timeout: std::time::Duration,
    ) -> Bridge {
        Bridge {
            shard_count: peers.len() as u32,
            peers: Arc::new(peers),
            forward_timeout,
            counters: Arc::default(),
        }
    }

    pub fn counters(&self) -> &Arc<RdmaCounters> {
        &self.counters
    }

    /// An error reply made here, counted as the bridge's refusal.
    fn refuse(&self, opcode: Opcode, request_id: u64, e: &ErrReply) -> EncodedReply {
        self.counters.refused(e.code);
        error_reply(opcode, request_id, e)
    }

    /// Executes one request on its owner; failures become error replies.
    pub async fn call(
        &self,
        opcode: Opcode,
        request_id: u64,
        body: Vec<u8>,
        payload: Vec<u8>,
    ) -> EncodedReply {
        match self.try_call(opcode, request_id, body, payload).await {
            Ok(r) => r,
            Err(e) => self.refuse(opcode, request_id, &e),
        }
    }

    async fn try_call(
        &self,
        opcode: Opcode,
        request_id: u64,
        body: Vec<u8>,
        payload: Vec<u8>,
    ) -> Result<EncodedReply, ErrReply> {
        let req = Parsed::decode(opcode, &body)?;
        if let Parsed::Write(w) = &req {
            check_write_payload(w, &payload)?;
        }
        let owner = req.owner(self.shard_count, ShardId(0));
        let msg = ForwardMsg {
            opcode,
            request_id,
            body,
            payload,
            deadline: std::time::Instant::now() + self.forward_timeout,
            count: Count::Here,
        };
        // This path keeps no buffer budget (the TCP path holds its share
        // until the owner lets go, see `ShardCtx::forward`): after a
        // timeout, the payload stays in a stalled owner's queue until the
        // owner drops it, at most the queue's depth of them per owner.
        let deadline = msg.deadline;
        let queued = enqueue_to_shard(&self.peers, owner, msg)?;
        let after = self.forward_timeout;
        tokio::time::timeout(
            after,
            await_shard_reply(owner, queued.reply, deadline, after),
        )
        .await
        .map_err(|_| {
            warn!(owner = owner.0, "a forwarded RDMA request timed out");
            forward_timed_out(owner, after)
        })?
    }
}

fn error_reply(opcode: Opcode, request_id: u64, e: &ErrReply) -> EncodedReply {
    let mut frame = Vec::new();
    encode_error(&mut frame, opcode, request_id, e);
    EncodedReply {
        frame,
        payload: Vec::new(),
    }
}

/// What the RDMA thread's connections share: the bridge to the shards and
/// the thread's limits. Made on that thread (its budget is not `Send`).
#[derive(Clone)]
pub struct Front {
    bridge: Bridge,
    /// Payload bytes held by this thread's requests until their replies
    /// are sent (see the module doc).
    budget: Rc<Budget>,
    max_in_flight: usize,
    max_connections: u64,
}

impl Front {
    /// The payload budget is `limits.shard_buffer_bytes` (the RDMA thread
    /// holds payloads as one more shard would), the connection limit
    /// `limits.max_connections` (per shard: the RDMA thread counts as one).
    pub fn new(bridge: Bridge, limits: &crate::conn_limits::ConnLimits) -> Front {
        Front {
            bridge,
            budget: Budget::new(limits.shard_buffer_bytes),
            max_in_flight: limits.max_in_flight,
            max_connections: limits.max_connections,
        }
    }

    /// A connection's place, or `None` (counted) when `max_connections`
    /// are open: drop the connection.
    pub fn admit(&self) -> Option<ConnSlot> {
        let c = &self.bridge.counters;
        // This thread is the only one that changes the count.
        if c.connections.load(Ordering::Relaxed) >= self.max_connections {
            c.connections_refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        c.connections.fetch_add(1, Ordering::Relaxed);
        Some(ConnSlot(c.clone()))
    }
}

/// An admitted connection, counted in `RdmaCounters::connections` until
/// dropped.
pub struct ConnSlot(Arc<RdmaCounters>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one connection until the peer goes away. Runs on a tokio
/// `LocalSet` (requests are spawned with `spawn_local`).
pub async fn serve_conn<E: Endpoint + 'static>(conn: RdmaConn<E>, front: Front) {
    let conn = Rc::new(conn);
    // This connection's share of the thread's payload budget (the budget
    // bounds the thread; `max_in_flight` bounds the connection).
    let held = Rc::new(Cell::new(0u64));
    let max_in_flight = front.max_in_flight.max(1);
    let slots = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    serve_requests(&conn, &front, &held, &slots).await;
    // The connection's place lasts until its requests end: a peer closing
    // and reopening connections cannot leave more running than the
    // connection limit times `max_in_flight` (requests without a payload
    // hold none of the budget, and would fill the shards' queues).
    let _ = slots.acquire_many(max_in_flight as u32).await;
}

/// Reads and starts requests until the connection ends.
async fn serve_requests<E: Endpoint + 'static>(
    conn: &Rc<RdmaConn<E>>,
    front: &Front,
    held: &Rc<Cell<u64>>,
    slots: &Arc<tokio::sync::Semaphore>,
) {
    let bridge = &front.bridge;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match conn.recv().await {
            Ok(inc) => {
                let conn = conn.clone();
                let front = front.clone();
                let held = held.clone();
                tokio::task::spawn_local(async move {
                    handle(&conn, &front, &held, inc).await;
                    drop(slot);
                });
            }
            Err(RdmaError::Closed) => return,
            Err(RdmaError::Io(e)) => {
                debug!(error = %e, "rdma connection failed");
                return;
            }
            Err(e) => {
                // Message boundaries survive a bad message: answer it when
                // its request id can be trusted, then read the next one.
                debug!(error = %e, "bad rdma message");
                let code = match &e {
                    RdmaError::Frame(shardstore_net::FrameError::Header { err, .. }) => err.code(),
                    _ => ErrorCode::Malformed,
                };
                bridge.counters.refused(code);
                if let Some((id, op)) = e.request_id() {
                    let mut frame = Vec::new();
                    encode_header_error(&mut frame, op, id, &ErrReply::new(code, e.to_string()));
                    if conn.send_reply(&frame, &[], None).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Payload bytes a request may hold here: its own (a WRITE's, once
/// fetched) and its reply's (a READ's, at most what it asks for).
fn payload_bound(inc: &Incoming) -> u64 {
    let reply = match inc.head.opcode {
        Opcode::Read => {
            shardstore_proto::access_body::<shardstore_proto::ArchivedReadRequest>(&inc.body)
                .map_or(0, |r| {
                    r.len.to_native().min(shardstore_proto::limits::MAX_PAYLOAD)
                })
        }
        _ => 0,
    };
    u64::from(inc.head.header.payload_len) + u64::from(reply)
}

async fn handle<E: Endpoint>(
    conn: &RdmaConn<E>,
    front: &Front,
    held: &Rc<Cell<u64>>,
    mut inc: Incoming,
) {
    let bridge = &front.bridge;
    let opcode = inc.head.opcode;
    let request_id = inc.head.header.request_id;
    if inc.head.header.is_response() {
        let e = ErrReply::new(ErrorCode::InvalidRequest, "a reply frame sent as a request");
        let r = bridge.refuse(opcode, request_id, &e);
        let _ = conn.send_reply(&r.frame, &[], None).await;
        return;
    }
    // Reserved before the payload is fetched, released once the reply is
    // sent (the end of this function).
    let hold = Reservation::try_new(&front.budget, held, payload_bound(&inc));
    let reply = if hold.is_none() {
        let msg = format!(
            "the RDMA payload budget ({} bytes) is in use; retry",
            front.budget.limit()
        );
        bridge.refuse(opcode, request_id, &ErrReply::new(ErrorCode::Busy, msg))
    } else {
        match conn.fetch_payload(&mut inc).await {
            Ok(payload) => {
                let body = std::mem::take(&mut inc.body);
                bridge.call(opcode, request_id, body, payload).await
            }
            Err(e) => {
                let code = match e {
                    RdmaError::Pool(_) => ErrorCode::Busy,
                    _ => ErrorCode::InvalidRequest,
                };
                let msg = format!("fetching the payload by RDMA read: {e}");
                bridge.refuse(opcode, request_id, &ErrReply::new(code, msg))
            }
        }
    };
    match conn
        .send_reply(&reply.frame, &reply.payload, inc.sink)
        .await
    {
        Ok(()) => {}
        Err(e @ (RdmaError::Io(_) | RdmaError::Closed)) => {
            debug!(request_id, error = %e, "sending an rdma reply failed")
        }
        // The reply could not be sent as built (no sink for its payload, no
        // registered memory left to write it from): a typed error instead,
        // never silence (the client waited until its own timeout).
        Err(e) => {
            let code = match e {
                RdmaError::NoSink { .. } => ErrorCode::TooLarge,
                RdmaError::Pool(shardstore_net::rdma::PoolError::Exhausted { .. }) => {
                    ErrorCode::Busy
                }
                _ => ErrorCode::Internal,
            };
            let r = bridge.refuse(opcode, request_id, &ErrReply::new(code, e.to_string()));
            if let Err(e) = conn.send_reply(&r.frame, &[], None).await {
                debug!(request_id, error = %e, "sending an rdma error reply failed");
            }
        }
    }
}

/// Starts the RDMA thread on `addr`; returns the bound address once it
/// listens. Refuses configurations RDMA cannot honour.
pub fn start(
    addr: std::net::SocketAddr,
    opts: &crate::serve::ServeOptions,
    peers: Vec<flume::Sender<Forwarded>>,
    stop: flume::Receiver<()>,
    board: &crate::metrics::Board,
) -> anyhow::Result<std::net::SocketAddr> {
    use anyhow::{bail, Context};
    if opts.auth_secret.is_some() {
        bail!("rdma_listen: RDMA connections cannot authenticate yet; unset auth_secret_file or rdma_listen");
    }
    if opts.tls.is_some() {
        bail!("rdma_listen: RDMA connections are not encrypted; TLS and rdma_listen cannot be combined");
    }
    let devices = shardstore_net::rdma::devices();
    if devices.is_empty() {
        bail!("rdma_listen {addr}: no RDMA device (/sys/class/infiniband is empty or missing: no NIC, or no InfiniBand/RXE support in this kernel)");
    }
    let pool = PoolConfig {
        max_region: opts.max_payload as usize,
        budget_bytes: opts
            .limits
            .conn_buffer_bytes
            .max(2 * opts.max_payload as u64),
        ..PoolConfig::default()
    };
    let max_payload = opts.max_payload;
    let limits = opts.limits.clone();
    let bridge = Bridge::new(peers, opts.limits.forward_timeout);
    board.attach_rdma(bridge.counters().clone());
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("shardstore-rdma".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = bound_tx.send(Err(format!("tokio runtime: {e}")));
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            let front = Front::new(bridge, &limits);
            local.block_on(&rt, async move {
                let listener = match shardstore_net::rdma::verbs::VerbsListener::bind(addr).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = bound_tx.send(Err(format!("binding {addr}: {e}")));
                        return;
                    }
                };
                let _ = bound_tx.send(listener.local_addr().map_err(|e| e.to_string()));
                loop {
                    let accepted = tokio::select! {
                        a = listener.accept_setup() => a,
                        _ = stop.recv_async() => {
                            info!("rdma listener closed (stopping)");
                            return;
                        }
                    };
                    match accepted {
                        Ok((setup, peer)) => {
                            let Some(slot) = front.admit() else {
                                warn!(%peer, "rdma connection refused: max_connections_per_shard RDMA connections are open");
                                continue; // dropping the set-up closes it
                            };
                            debug!(%peer, "rdma connection");
                            // The set-up in the connection's own task: a
                            // silent peer held up every accept after it.
                            let (pool, front) = (pool.clone(), front.clone());
                            tokio::task::spawn_local(async move {
                                let _slot = slot;
                                match setup.finish().await {
                                    Ok(ep) => {
                                        let conn = RdmaConn::new(ep, pool, max_payload);
                                        serve_conn(conn, front).await;
                                    }
                                    Err(e) => {
                                        warn!(%peer, error = %e, "rdma connection set-up failed")
                                    }
                                }
                            });
                        }
                        Err(e) => warn!(error = %e, "rdma connection set-up failed"),
                    }
                }
            });
        })
        .context("starting the rdma thread")?;
    let at = bound_rx
        .recv()
        .context("the rdma thread exited during start-up")?
        .map_err(|e| anyhow::anyhow!("rdma_listen: {e}"))?;
    info!(rdma = %at, devices = ?devices, "rdma listening");
    Ok(at)
}

#[cfg(test)]
mod tests {
    //! The bridge without a device: loopback queue pairs on a tokio
    //! current-thread runtime (as on the RDMA thread) -> flume -> real
    //! glommio shard executors on simulated disks -> replies back.
    use super::*;
    use crate::handler::{NodeInfo, ShardCtx};
    use shardstore_net::rdma::loopback::{self, LoopbackEndpoint};
    use shardstore_net::rdma::PayloadRef;
    use shardstore_proto::*;
    use shardstore_shard::{Shard, ShardConfig, SimDisk};

    const SHARDS: u32 = 2;

    /// Starts `SHARDS` executors serving forwarded requests; returns their
    /// queues. They stop when every sender is dropped.
    fn start_shards() -> (
        Vec<flume::Sender<Forwarded>>,
        Vec<std::thread::JoinHandle<()>>,
    ) {
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..SHARDS {
            let (tx, rx) = flume::bounded::<Forwarded>(16);
            senders.push(tx);
            receivers.push(rx);
        }
        let mut joins = Vec::new();
        for (i, rx) in receivers.into_iter().enumerate() {
            let peers = senders.clone();
            let h = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                .name(&format!("test-shard-{i}"))
                .io_memory(256 << 10)
                .spawn(move || async move {
                    let cfg = ShardConfig {
                        shard: ShardId(i as u32),
                        shard_count: SHARDS,
                        node_id: 7,
                        capacity_bytes: 4 << 20,
                        ..ShardConfig::default()
                    };
                    let disk = SimDisk::new(5 << 20, i as u64 + 1);
                    let shard = Shard::open_sim(cfg, &disk).await.unwrap();
                    let limits = crate::conn_limits::ConnLimits::default();
                    let ctx = std::rc::Rc::new(ShardCtx {
                        shard,
                        id: ShardId(i as u32),
                        node: NodeInfo {
                            node_id: 7,
                            shard_count: SHARDS,
                            shard_addrs: vec!["a:1".into(), "b:2".into()],
                            max_payload: limits::MAX_PAYLOAD,
                            max_chunk_size: limits::MAX_CHUNK_SIZE,
                            limits: limits.clone(),
                            auth_secret: None,
                            tls: None,
                            stream_hints: Vec::new(),
                        },
                        peers: Vec::new(),
                        counters: Default::default(),
                        budget: crate::budget::Budget::new(limits.shard_buffer_bytes),
                        limits,
                        conns: Default::default(),
                    });
                    drop(peers);
                    ctx.serve_forwarded(rx).await;
                })
                .unwrap();
            joins.push(std::thread::spawn(move || {
                h.join().unwrap();
            }));
        }
        (senders, joins)
    }

    macro_rules! frame {
        ($op:expr, $id:expr, $body:expr, $len:expr) => {{
            let mut f = Vec::new();
            encode_frame($op, 0, $id, $body, $len, &mut f);
            f
        }};
    }

    /// Sends one request and returns (reply header, body, payload).
    async fn call(
        c: &RdmaConn<LoopbackEndpoint>,
        f: &[u8],
        payload: &[u8],
    ) -> (FrameHeader, Vec<u8>, Vec<u8>) {
        let held = c.send_request(f, payload).await.unwrap();
        let mut inc = c.recv().await.unwrap();
        let p = match &inc.payload {
            PayloadRef::Inline(v) => v.clone(),
            _ => RdmaConn::<LoopbackEndpoint>::written_payload(&held, &mut inc).unwrap(),
        };
        assert!(inc.head.header.is_response());
        (inc.head.header, inc.body, p)
    }

    fn error_code(h: &FrameHeader, body: &[u8]) -> ErrorCode {
        assert!(h.is_error(), "expected an error reply");
        let e = access_body::<ArchivedErrorBody>(body).unwrap();
        ErrorCode::from_u16(e.code.to_native()).unwrap()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Runs `test` on a `LocalSet` with a bridge to two simulated shards
    /// and a loopback fabric, then ends the shards.
    fn on_bridge<F, Fut>(test: F)
    where
        F: FnOnce(Bridge, loopback::LoopbackConnector, loopback::LoopbackListener) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let (senders, joins) = start_shards();
        let bridge = Bridge::new(senders, std::time::Duration::from_secs(30));
        let rt = rt();
        let local = tokio::task::LocalSet::new();
        let (connector, listener) = loopback::listener();
        local.block_on(&rt, test(bridge, connector, listener));
        // Dropping the LocalSet drops the serving tasks and their bridge
        // clones: the shards' queues close and their executors end.
        drop(local);
        for j in joins {
            j.join().unwrap();
        }
    }

    fn test_limits() -> crate::conn_limits::ConnLimits {
        crate::conn_limits::ConnLimits {
            max_in_flight: 8,
            ..Default::default()
        }
    }

    /// Serves every loopback connection with `front`, the n-th (from 0)
    /// with the pool `pool(n)`.
    fn serve_all(
        listener: loopback::LoopbackListener,
        front: Front,
        pool: impl Fn(usize) -> PoolConfig + 'static,
    ) {
        tokio::task::spawn_local(async move {
            let mut n = 0;
            while let Some(ep) = listener.accept().await {
                let conn = RdmaConn::new(ep, pool(n), limits::MAX_PAYLOAD);
                tokio::task::spawn_local(serve_conn(conn, front.clone()));
                n += 1;
            }
        });
    }

    /// A WRITE of `data` at the start of `chunk`, its crc right.
    fn write_frame(chunk: u128, id: u64, data: &[u8]) -> Vec<u8> {
        let w = WriteRequest {
            chunk,
            offset: 0,
            payload_crc: payload_crc(data),
            flags: 0,
        };
        frame!(Opcode::Write, id, &w, data.len() as u32)
    }

    fn client(connector: &loopback::LoopbackConnector) -> RdmaConn<LoopbackEndpoint> {
        RdmaConn::new(
            connector.connect().unwrap(),
            PoolConfig::default(),
            limits::MAX_PAYLOAD,
        )
    }

    #[test]
    fn requests_reach_their_owning_shard_and_replies_come_back() {
        on_bridge(|bridge, connector, listener| async move {
            serve_all(listener, Front::new(bridge.clone(), &test_limits()), |_| {
                PoolConfig::default()
            });
            let c = client(&connector);
            // PING and TOPOLOGY are answered by shard 0.
            let (h, _, _) = call(&c, &frame!(Opcode::Ping, 1, &Empty {}, 0), &[]).await;
            assert!(!h.is_error());
            let (_, body, _) = call(&c, &frame!(Opcode::Topology, 2, &Empty {}, 0), &[]).await;
            let t = access_body::<ArchivedTopologyReply>(&body).unwrap();
            assert_eq!(t.answering_shard.to_native(), 0);
            assert_eq!(t.shard_count.to_native(), SHARDS);

            // Find chunks owned by each shard; write 256 KiB (RDMA read of
            // the source) and read it back (RDMA write into the sink).
            let mut id = 10;
            for want in 0..SHARDS {
                let chunk = (1u128..)
                    .find(|c| route(ChunkId(*c), SHARDS).0 == want)
                    .unwrap();
                let data: Vec<u8> = (0..256 << 10)
                    .map(|i| (i % 251) as u8 ^ want as u8)
                    .collect();
                let w = WriteRequest {
                    chunk,
                    offset: 0,
                    payload_crc: payload_crc(&data),
                    flags: 0,
                };
                id += 1;
                let (h, body, _) =
                    call(&c, &frame!(Opcode::Write, id, &w, data.len() as u32), &data).await;
                assert!(!h.is_error(), "{:?}", error_code(&h, &body));
                assert_eq!(h.request_id, id);
                let r = ReadRequest {
                    chunk,
                    offset: 0,
                    len: data.len() as u32,
                    flags: 0,
                };
                id += 1;
                let (h, body, payload) = call(&c, &frame!(Opcode::Read, id, &r, 0), &[]).await;
                assert!(!h.is_error());
                let rr = access_body::<ArchivedReadReply>(&body).unwrap();
                assert_eq!(rr.payload_crc.to_native(), payload_crc(&payload));
                assert_eq!(payload, data);
                id += 1;
                let (_, body, _) = call(
                    &c,
                    &frame!(Opcode::Stat, id, &ChunkRequest { chunk }, 0),
                    &[],
                )
                .await;
                let st = access_body::<ArchivedStatReply>(&body).unwrap();
                assert_eq!(st.shard.to_native(), want, "executed on the owner");
            }

            // A payload that does not match its crc never reaches a shard.
            let data = vec![9u8; 10_000];
            let w = WriteRequest {
                chunk: 5,
                offset: 0,
                payload_crc: payload_crc(&data) ^ 1,
                flags: 0,
            };
            let (h, body, _) =
                call(&c, &frame!(Opcode::Write, 90, &w, data.len() as u32), &data).await;
            assert_eq!(error_code(&h, &body), ErrorCode::BadChecksum);
            // LIST of a shard that does not exist.
            let l = ListRequest {
                shard: 9,
                after: 0,
                from_start: true,
                limit: 10,
            };
            let (h, body, _) = call(&c, &frame!(Opcode::List, 91, &l, 0), &[]).await;
            assert_eq!(error_code(&h, &body), ErrorCode::InvalidRequest);
            // A corrupted body is answered with its request id; the
            // connection stays usable.
            let mut bad = frame!(Opcode::Stat, 92, &ChunkRequest { chunk: 1 }, 0);
            let last = bad.len() - 1;
            bad[last] ^= 0xff;
            let (h, body, _) = call(&c, &bad, &[]).await;
            assert_eq!(h.request_id, 92);
            assert_eq!(error_code(&h, &body), ErrorCode::Malformed);
            let (h, _, _) = call(&c, &frame!(Opcode::Ping, 93, &Empty {}, 0), &[]).await;
            assert!(!h.is_error());
            // A reply frame sent as a request.
            let mut reply = Vec::new();
            encode_frame(Opcode::Ping, FLAG_RESPONSE, 94, &Empty {}, 0, &mut reply);
            let (h, body, _) = call(&c, &reply, &[]).await;
            assert_eq!(error_code(&h, &body), ErrorCode::InvalidRequest);
            // A shard's own error.
            let (h, body, _) = call(
                &c,
                &frame!(Opcode::Stat, 95, &ChunkRequest { chunk: 1 << 100 }, 0),
                &[],
            )
            .await;
            assert_eq!(error_code(&h, &body), ErrorCode::NotFound);

            // What the bridge answered itself, without a shard, is counted
            // by error code (it was counted nowhere: no shard's request);
            // what a shard answered, errors included, is not (the shard
            // counts it).
            let counters = bridge.counters();
            let refused = |code| counters.refused_with(code);
            assert_eq!(refused(ErrorCode::BadChecksum), 1);
            assert_eq!(refused(ErrorCode::InvalidRequest), 2);
            assert_eq!(refused(ErrorCode::Malformed), 1);
            assert_eq!(refused(ErrorCode::NotFound), 0);
            let total: u64 = counters
                .refused
                .iter()
                .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
                .sum();
            assert_eq!(total, 4);
        });
    }

    /// A reply whose payload finds no registered memory left to write it
    /// from is answered BUSY; it used to get no reply at all, and the client
    /// waited until its own timeout.
    #[test]
    fn a_reply_without_registered_memory_left_is_busy() {
        on_bridge(|bridge, connector, listener| async move {
            // The first connection as configured; the second with
            // registered memory for nothing above the inline size.
            serve_all(listener, Front::new(bridge.clone(), &test_limits()), |n| {
                PoolConfig {
                    budget_bytes: if n == 0 {
                        PoolConfig::default().budget_bytes
                    } else {
                        0
                    },
                    ..PoolConfig::default()
                }
            });
            let c = client(&connector);
            let data = vec![5u8; 64 << 10];
            let (h, body, _) = call(&c, &write_frame(3, 1, &data), &data).await;
            assert!(!h.is_error(), "{:?}", error_code(&h, &body));
            let starved = RdmaConn::new(
                connector.connect().unwrap(),
                PoolConfig::default(),
                limits::MAX_PAYLOAD,
            );
            let r = ReadRequest {
                chunk: 3,
                offset: 0,
                len: data.len() as u32,
                flags: 0,
            };
            let answer = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                call(&starved, &frame!(Opcode::Read, 2, &r, 0), &[]),
            )
            .await;
            let (h, body, _) = answer.expect("no reply");
            assert_eq!(h.request_id, 2);
            assert_eq!(error_code(&h, &body), ErrorCode::Busy);
            // Small replies (inline) still go out on that connection.
            let (h, _, _) = call(&starved, &frame!(Opcode::Ping, 3, &Empty {}, 0), &[]).await;
            assert!(!h.is_error());
        });
    }

    /// WRITE payloads copied out of their registered regions (and READ
    /// replies) are held against the RDMA thread's payload budget until
    /// their replies are sent: past it a request is BUSY before its payload
    /// is fetched. (Before, each connection could hold max_in_flight x
    /// max_payload of them, whatever the pool's budget.)
    #[test]
    fn fetched_payloads_are_bounded_by_the_thread_budget() {
        // A shard that never answers: each request holds its payload
        // until its forward timeout.
        let (tx, _rx) = flume::bounded::<Forwarded>(16);
        let bridge = Bridge::new(vec![tx], std::time::Duration::from_millis(500));
        let limits = crate::conn_limits::ConnLimits {
            shard_buffer_bytes: 64 << 10,
            ..test_limits()
        };
        let front = Front::new(bridge, &limits);
        let budget = front.budget.clone();
        let counters = front.bridge.counters().clone();
        let rt = rt();
        let local = tokio::task::LocalSet::new();
        let (connector, listener) = loopback::listener();
        local.block_on(&rt, async move {
            serve_all(listener, front, |_| PoolConfig::default());
            let c = client(&connector);
            let data = vec![3u8; 48 << 10];
            let write = |id| write_frame(1, id, &data);
            // The first one is fetched, and held while the shard is silent.
            let first = c.send_request(&write(1), &data).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            assert_eq!(budget.used(), 48 << 10);
            // The second does not fit beside it: BUSY at once.
            let (h, body, _) = call(&c, &write(2), &data).await;
            assert_eq!(h.request_id, 2);
            assert_eq!(error_code(&h, &body), ErrorCode::Busy);
            assert_eq!(counters.refused_with(ErrorCode::Busy), 1);
            // So is a READ whose reply could not fit.
            let r = ReadRequest {
                chunk: 1,
                offset: 0,
                len: 32 << 10,
                flags: 0,
            };
            let (h, body, _) = call(&c, &frame!(Opcode::Read, 3, &r, 0), &[]).await;
            assert_eq!((h.request_id, error_code(&h, &body)), (3, ErrorCode::Busy));
            // The first one's reply (TIMEOUT) lets its bytes go.
            let mut inc = c.recv().await.unwrap();
            assert_eq!(inc.head.header.request_id, 1);
            let _ = RdmaConn::<LoopbackEndpoint>::written_payload(&first, &mut inc);
            assert_eq!(error_code(&inc.head.header, &inc.body), ErrorCode::Timeout);
            assert_eq!(budget.used(), 0);
            let (h, body, _) = call(&c, &write(4), &data).await;
            assert_eq!(error_code(&h, &body), ErrorCode::Timeout, "not BUSY");
            assert_eq!(budget.used(), 0);
        });
    }

    /// At most `max_connections` RDMA connections are served at once;
    /// one past it is refused (and counted) until another closes.
    #[test]
    fn rdma_connections_are_capped() {
        let (tx, _rx) = flume::bounded::<Forwarded>(1);
        let limits = crate::conn_limits::ConnLimits {
            max_connections: 2,
            ..test_limits()
        };
        let front = Front::new(
            Bridge::new(vec![tx], std::time::Duration::from_secs(1)),
            &limits,
        );
        let counters = front.bridge.counters().clone();
        let a = front.admit().expect("first");
        let _b = front.admit().expect("second");
        assert!(front.admit().is_none(), "a third was admitted");
        assert_eq!(counters.connections_refused.load(Ordering::Relaxed), 1);
        assert_eq!(counters.connections.load(Ordering::Relaxed), 2);
        drop(a);
        assert_eq!(counters.connections.load(Ordering::Relaxed), 1);
        let _c = front.admit().expect("a place was freed");
    }

    #[test]
    fn a_full_shard_queue_is_busy_not_unbounded() {
        // A queue nobody serves, of depth 1.
        let (tx, _rx) = flume::bounded::<Forwarded>(1);
        let bridge = Bridge::new(vec![tx], std::time::Duration::from_secs(30));
        let rt = rt();
        rt.block_on(async {
            let ping = || bridge.call(Opcode::Ping, 1, Vec::new(), Vec::new());
            // The first one waits in the queue (until its timeout); the second is BUSY.
            let first = ping();
            tokio::pin!(first);
            assert!(futures_lite::future::poll_once(&mut first).await.is_none());
            let r = ping().await;
            let h = FrameHeader::from_bytes(r.frame[..HEADER_LEN].try_into().unwrap());
            assert_eq!(error_code(&h, &r.frame[HEADER_LEN..]), ErrorCode::Busy);
            assert_eq!(bridge.counters().refused_with(ErrorCode::Busy), 1);
        });
    }

    /// A connection the peer closes keeps its place until the requests it
    /// started end: it used to return at once, so a peer reopening
    /// connections could leave any number of requests running.
    #[test]
    fn a_closed_connection_ends_after_its_requests() {
        // A queue nobody serves: the PING waits there until its timeout.
        let (tx, _rx) = flume::bounded::<Forwarded>(4);
        let wait = std::time::Duration::from_millis(300);
        let front = Front::new(
            Bridge::new(vec![tx], wait),
            &crate::conn_limits::ConnLimits::default(),
        );
        let rt = rt();
        let local = tokio::task::LocalSet::new();
        let (a, b) = loopback::pair();
        local.block_on(&rt, async move {
            let server = RdmaConn::new(b, PoolConfig::default(), limits::MAX_PAYLOAD);
            let client = RdmaConn::new(a, PoolConfig::default(), limits::MAX_PAYLOAD);
            let held = client
                .send_request(&frame!(Opcode::Ping, 1, &Empty {}, 0), &[])
                .await
                .unwrap();
            drop((held, client));
            let started = std::time::Instant::now();
            serve_conn(server, front).await;
            assert!(
                started.elapsed() >= wait,
                "the connection ended {:?} after its peer, its request still waiting",
                started.elapsed()
            );
        });
    }

    #[test]
    fn a_shard_that_does_not_answer_times_out() {
        // A queue nobody serves: the request waits there until its timeout.
        let (tx, _rx) = flume::bounded::<Forwarded>(1);
        let bridge = Bridge::new(vec![tx], std::time::Duration::from_millis(100));
        let rt = rt();
        rt.block_on(async {
            let started = std::time::Instant::now();
            let r = bridge.call(Opcode::Ping, 1, Vec::new(), Vec::new()).await;
            let h = FrameHeader::from_bytes(r.frame[..HEADER_LEN].try_into().unwrap());
            assert_eq!(error_code(&h, &r.frame[HEADER_LEN..]), ErrorCode::Timeout);
            assert_eq!(bridge.counters().refused_with(ErrorCode::Timeout), 1);
            assert!(started.elapsed() >= std::time::Duration::from_millis(100));
        });
    }
}
