//! One TCP connection to one server address, shared by every call that goes
//! there, with requests pipelined on it.
//!
//! Two tasks per connection:
//! - the writer takes every frame queued on its channel and writes them with
//!   as few syscalls as possible (small frames coalesced into one buffer, bulk
//!   payloads passed by reference, one vectored write per batch);
//! - the reader decodes replies with [`FrameReader`] and hands each to the
//!   call waiting on its request id. Replies may arrive in any order.
//!
//! Invariants:
//! - a request is registered in `pending` before its frame is queued, and
//!   registration fails once the connection is closed, so every registered
//!   request is answered, failed with `ConnectionClosed`, or removed by its
//!   caller (timeout or cancellation), never left behind;
//! - at most `max_in_flight_per_connection` requests are outstanding
//!   (semaphore): a request's slot is taken until its call has ended *and*
//!   its frame has left the writer's queue (sent or skipped), so a stalled
//!   connection holds at most that many frames, however many callers time
//!   out meanwhile;
//! - a frame whose caller gave up (timeout, cancellation) before the writer
//!   took it is skipped, never sent late;
//! - once closed a connection stays dead; the client opens a new one.

use crate::{ClientConfig, ClientError};
use bytes::{Buf, Bytes, BytesMut};
use shardstore_net::{FrameError, FrameReader};
use shardstore_proto::{limits, Opcode};
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

/// The read and write halves of a connection: plain TCP or TLS over it.
type ReadHalf = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
type WriteHalf = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

/// Payloads up to this size are copied into the coalescing buffer; larger
/// ones are written from the caller's `Bytes` without a copy.
const COPY_PAYLOAD_MAX: usize = 16 << 10;
/// Most buffers handed to one vectored write.
const MAX_IOV: usize = 64;

/// A successful frame from the server, matched to its request.
#[derive(Debug)]
pub(crate) struct Reply {
    pub opcode: Opcode,
    /// The reply carries an `ErrorBody` (FLAG_ERROR).
    pub is_error: bool,
    pub body: Vec<u8>,
    pub payload: Bytes,
}

type Waiter = oneshot::Sender<Result<Reply, ClientError>>;

pub(crate) struct Outgoing {
    pub(crate) id: u64,
    /// Header and body.
    pub(crate) head: Vec<u8>,
    pub(crate) payload: Bytes,
    /// The request's in-flight slot, shared with its call: given back when
    /// both the call and this frame are gone.
    slot: Arc<OwnedSemaphorePermit>,
}

impl Outgoing {
    /// Whether its call has ended (timeout, cancellation, connection
    /// closed) before the frame was sent: then this frame holds the slot's
    /// only handle, and nobody waits for a reply.
    pub(crate) fn given_up(&self) -> bool {
        Arc::strong_count(&self.slot) == 1
    }
}

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, Waiter>,
    closed: bool,
}

pub(crate) struct Shared {
    addr: String,
    pending: Mutex<Pending>,
    dead: AtomicBool,
    in_flight: Arc<Semaphore>,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // The lock guards plain map operations that cannot panic halfway.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn take(&self, id: u64) -> Option<Waiter> {
        self.pending().waiters.remove(&id)
    }

    /// Marks the connection dead and fails every pending request.
    pub(crate) fn close(&self, why: &str) {
        let drained = {
            let mut p = self.pending();
            if p.closed {
                return;
            }
            p.closed = true;
            // Under the lock: whoever sees `closed` also sees `dead`.
            self.dead.store(true, Ordering::Release);
            std::mem::take(&mut p.waiters)
        };
        self.in_flight.close();
        if drained.is_empty() {
            tracing::debug!(addr = %self.addr, reason = why, "connection closed");
        } else {
            tracing::warn!(addr = %self.addr, reason = why, failed = drained.len(), "connection lost");
        }
        for (_, waiter) in drained {
            let _ = waiter.send(Err(ClientError::ConnectionClosed));
        }
    }
}

/// Removes a request's pending entry when its call ends for any reason
/// (reply, timeout, the caller dropping the future).
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.take(self.id);
    }
}

pub(crate) struct Connection {
    shared: Arc<Shared>,
    next_id: AtomicU64,
    tx: mpsc::UnboundedSender<Outgoing>,
    reader: AbortHandle,
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Nobody can wait for a reply any more. The writer ends by itself when
        // `tx` is dropped, after writing what is queued.
        self.reader.abort();
    }
}

impl Connection {
    /// Opens a TCP connection (TCP_NODELAY) and starts its reader and writer.
    pub(crate) async fn open(addr: &str, cfg: &ClientConfig) -> Result<Arc<Self>, ClientError> {
        if crate::rdma::rdma_target(addr).is_some() {
            return crate::rdma::open(addr, cfg).await;
        }
        let connect_err = |source| ClientError::Connect {
            addr: addr.to_owned(),
            source,
        };
        let stream = match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(connect_err(e)),
            Err(_) => {
                return Err(connect_err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", cfg.connect_timeout),
                )))
            }
        };
        stream.set_nodelay(true).map_err(connect_err)?;
        detect_dead_peer(&stream).map_err(connect_err)?;
        let (rd, wr): (ReadHalf, WriteHalf) = match &cfg.tls {
            None => {
                let mut stream = stream;
                authenticate(&mut stream, addr, cfg).await?;
                let (rd, wr) = stream.into_split();
                (Box::new(rd), Box::new(wr))
            }
            Some(tls) => {
                let host = tls.server_name.clone().unwrap_or_else(|| host_of(addr));
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| ClientError::Tls(format!("server name {host:?}: {e}")))?;
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                let mut stream = match tokio::time::timeout(
                    cfg.connect_timeout,
                    connector.connect(name, stream),
                )
                .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        return Err(ClientError::Tls(format!("handshake with {addr}: {e}")))
                    }
                    Err(_) => {
                        return Err(ClientError::Tls(format!(
                            "no TLS handshake with {addr} within {:?}",
                            cfg.connect_timeout
                        )))
                    }
                };
                authenticate(&mut stream, addr, cfg).await?;
                let (rd, wr) = tokio::io::split(stream);
                (Box::new(rd), Box::new(wr))
            }
        };
        tracing::debug!(addr, "connected");
        Ok(Self::with_transport(addr, cfg, |shared, rx| {
            tokio::spawn(writer_task(shared.clone(), rx, wr));
            tokio::spawn(reader_task(shared, rd)).abort_handle()
        }))
    }

    /// A connection whose frames are moved by the tasks `start` spawns: it
    /// gets the shared state and the queue of outgoing frames, and returns
    /// the reader's abort handle (TCP above; RDMA in `rdma.rs`).
    pub(crate) fn with_transport(
        addr: &str,
        cfg: &ClientConfig,
        start: impl FnOnce(Arc<Shared>, mpsc::UnboundedReceiver<Outgoing>) -> AbortHandle,
    ) -> Arc<Self> {
        let shared = Arc::new(Shared {
            addr: addr.to_owned(),
            pending: Mutex::new(Pending::default()),
            dead: AtomicBool::new(false),
            in_flight: Arc::new(Semaphore::new(
                cfg.max_in_flight_per_connection
                    .clamp(1, crate::config::MAX_IN_FLIGHT_PER_CONNECTION),
            )),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = start(shared.clone(), rx);
        Arc::new(Connection {
            shared,
            next_id: AtomicU64::new(1),
            tx,
            reader,
        })
    }

    pub(crate) fn is_alive(&self) -> bool {
        !self.shared.dead.load(Ordering::Acquire)
    }

    /// Sends one request and waits for its reply (no timeout here: the
    /// caller wraps the whole call). `encode` appends header and body for
    /// the given request id; `payload` follows them on the wire.
    pub(crate) async fn call<F>(&self, encode: F, payload: Bytes) -> Result<Reply, ClientError>
    where
        F: FnOnce(u64, &mut Vec<u8>),
    {
        let slot = Arc::new(
            self.shared
                .in_flight
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| ClientError::ConnectionClosed)?,
        );
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.shared.pending();
            if p.closed {
                return Err(ClientError::ConnectionClosed);
            }
            p.waiters.insert(id, tx);
        }
        let _guard = PendingGuard {
            shared: &self.shared,
            id,
        };
        let mut head = Vec::with_capacity(128);
        encode(id, &mut head);
        self.tx
            .send(Outgoing {
                id,
                head,
                payload,
                slot: slot.clone(),
            })
            .map_err(|_| ClientError::ConnectionClosed)?;
        // A dropped sender means the reader lost the connection mid-reply.
        rx.await.map_err(|_| ClientError::ConnectionClosed)?
    }
}

async fn writer_task(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    mut wr: WriteHalf,
) {
    let mut queue: VecDeque<Bytes> = VecDeque::new();
    let mut small = BytesMut::with_capacity(8 << 10);
    while let Some(first) = rx.recv().await {
        // One batch of replies wakes many callers, and the runtime runs
        // this task as soon as the first of them queues its next request.
        // Yield once so the others queue theirs too, then take everything
        // queued: one write for the whole batch (without the yield a
        // pipelined client made one write per request).
        append(&shared, first, &mut small, &mut queue);
        tokio::task::yield_now().await;
        while let Ok(out) = rx.try_recv() {
            append(&shared, out, &mut small, &mut queue);
        }
        if !small.is_empty() {
            queue.push_back(small.split().freeze());
        }
        // Flushed too: a TLS stream reports bytes written once they are
        // encrypted into its buffer, and keeps what the socket did not take
        // until the next write or flush (the frame's end would wait for the
        // next request).
        let sent = match write_all_vectored(&mut wr, &mut queue).await {
            Ok(()) => wr.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            shared.close(&format!("write failed: {e}"));
            return;
        }
    }
}

/// Adds one request to the batch: small payloads are copied behind their
/// header, large ones are queued as their own slice. A request nobody
/// waits for any more is dropped unsent (with its slot).
fn append(shared: &Shared, out: Outgoing, small: &mut BytesMut, queue: &mut VecDeque<Bytes>) {
    if out.given_up() {
        tracing::debug!(addr = %shared.addr, request_id = out.id, "request given up before it was sent: skipped");
        return;
    }
    small.extend_from_slice(&out.head);
    if out.payload.len() <= COPY_PAYLOAD_MAX {
        small.extend_from_slice(&out.payload);
    } else {
        if !small.is_empty() {
            queue.push_back(small.split().freeze());
        }
        queue.push_back(out.payload);
    }
}

async fn write_all_vectored(wr: &mut WriteHalf, queue: &mut VecDeque<Bytes>) -> io::Result<()> {
    while !queue.is_empty() {
        let n = {
            let iov: Vec<IoSlice<'_>> = queue
                .iter()
                .take(MAX_IOV)
                .map(|b| IoSlice::new(b))
                .collect();
            wr.write_vectored(&iov).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut left = n;
        while left > 0 {
            let front = queue.front_mut().expect("wrote no more than was queued");
            if front.len() <= left {
                left -= front.len();
                queue.pop_front();
            } else {
                front.advance(left);
                left = 0;
            }
        }
    }
    Ok(())
}

/// Bytes the reader takes from the socket per call at most: 32 replies of a
/// 4 KiB read.
const READ_BUFFER: usize = 136 << 10;

async fn reader_task(shared: Arc<Shared>, rd: ReadHalf) {
    let mut reader = FrameReader::with_capacity(rd.compat(), limits::MAX_PAYLOAD, READ_BUFFER);
    let why = loop {
        match read_reply(&shared, &mut reader).await {
            Ok(true) => continue,
            Ok(false) => break "closed by peer".to_owned(),
            Err(why) => break why,
        }
    };
    shared.close(&why);
}

/// Reads one reply and hands it to its waiter. `Ok(false)` on a clean EOF;
/// `Err` when the stream can no longer be trusted.
async fn read_reply(
    shared: &Shared,
    reader: &mut FrameReader<Compat<ReadHalf>>,
) -> Result<bool, String> {
    let Some(head) = reader.read_head().await.map_err(|e| e.to_string())? else {
        return Ok(false);
    };
    let h = head.header;
    if !h.is_response() {
        return Err(format!(
            "peer sent a {} request instead of a reply",
            head.opcode.name()
        ));
    }
    let body = match reader.read_body(&head).await {
        Ok(b) => Ok(b.to_vec()),
        // The stream is still in step: fail this request only.
        Err(FrameError::Body(e)) => Err(e),
        Err(e) => return Err(e.to_string()),
    };
    let payload_len = h.payload_len as usize;
    let Some(waiter) = shared.take(h.request_id) else {
        // Its caller gave up (timeout) or the id is bogus.
        tracing::debug!(addr = %shared.addr, request_id = h.request_id, "reply for no pending request");
        reader
            .skip_payload(payload_len)
            .await
            .map_err(|e| e.to_string())?;
        return Ok(true);
    };
    let msg = match body {
        Ok(body) => {
            let mut payload = vec![0u8; payload_len];
            if let Err(e) = reader.read_payload(&mut payload).await {
                // Close before the waiter hears of it, so a retry cannot
                // pick this connection again.
                let why = e.to_string();
                shared.close(&why);
                let _ = waiter.send(Err(ClientError::ConnectionClosed));
                return Err(why);
            }
            Ok(Reply {
                opcode: head.opcode,
                is_error: h.is_error(),
                body,
                payload: Bytes::from(payload),
            })
        }
        Err(e) => {
            reader
                .skip_payload(payload_len)
                .await
                .map_err(|e| e.to_string())?;
            Err(ClientError::Protocol(format!(
                "{} reply: {e}",
                head.opcode.name()
            )))
        }
    };
    let _ = waiter.send(msg);
    Ok(true)
}

/// How long sent bytes may stay unacknowledged, or an idle connection's
/// peer stay silent to keepalive probes, before the kernel closes the
/// connection. A peer gone without a FIN or RST (host down, partition, a
/// NAT or firewall that forgot the flow) would otherwise keep every call on
/// the connection timing out for the kernel's default of about 15 minutes;
/// closed, its calls fail and the next ones reconnect. A peer that is alive
/// but not reading (backpressure) still answers window probes and is kept.
pub(crate) const DEAD_PEER_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// Sets keepalive probes and TCP_USER_TIMEOUT so that a dead peer closes
/// the connection within about [`DEAD_PEER_AFTER`].
fn detect_dead_peer(stream: &TcpStream) -> io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    let probe = std::time::Duration::from_secs(5);
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(DEAD_PEER_AFTER - 3 * probe)
            .with_interval(probe)
            .with_retries(3),
    )?;
    sock.set_tcp_user_timeout(Some(DEAD_PEER_AFTER))
}

/// The host part of "host:port" (brackets of an IPv6 literal removed).
pub(crate) fn host_of(addr: &str) -> String {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned()
}

/// Runs the authentication handshake when the config has a secret.
async fn authenticate<S>(stream: &mut S, addr: &str, cfg: &ClientConfig) -> Result<(), ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Some(secret) = &cfg.secret else {
        return Ok(());
    };
    match tokio::time::timeout(cfg.connect_timeout, handshake(stream, &secret.0)).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Auth(format!(
            "no authentication reply from {addr} within {:?}",
            cfg.connect_timeout
        ))),
    }
}

/// Runs the mutual HMAC handshake (see `shardstore_proto::auth`) before the
/// connection carries any request.
async fn handshake<S>(stream: &mut S, secret: &[u8]) -> Result<(), ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use shardstore_proto::{
        auth, encode_frame, ArchivedAuthReply, ArchivedHelloReply, AuthRequest, Empty,
    };
    let mut out = Vec::new();
    encode_frame(Opcode::Hello, 0, 0, &Empty {}, 0, &mut out);
    stream.write_all(&out).await?;
    stream.flush().await?;
    let mut reader = FrameReader::new((&mut *stream).compat(), limits::MAX_PAYLOAD);
    let hello = handshake_reply(&mut reader, Opcode::Hello).await?;
    let h = shardstore_proto::access_body::<ArchivedHelloReply>(&hello)
        .map_err(|e| ClientError::Protocol(format!("hello reply: {e}")))?;
    if !h.auth_required {
        return Err(ClientError::Auth(
            "a secret is configured but the server does not authenticate; refusing to trust it"
                .into(),
        ));
    }
    let server_nonce = h.server_nonce;
    let mut client_nonce = [0u8; 32];
    getrandom::getrandom(&mut client_nonce)
        .map_err(|e| ClientError::Auth(format!("no randomness for a nonce: {e}")))?;
    let req = AuthRequest {
        client_nonce,
        proof: auth::client_proof(secret, &server_nonce, &client_nonce),
    };
    out.clear();
    encode_frame(Opcode::Auth, 0, 1, &req, 0, &mut out);
    reader.get_mut().get_mut().write_all(&out).await?;
    reader.get_mut().get_mut().flush().await?;
    let ok = handshake_reply(&mut reader, Opcode::Auth).await?;
    let r = shardstore_proto::access_body::<ArchivedAuthReply>(&ok)
        .map_err(|e| ClientError::Protocol(format!("auth reply: {e}")))?;
    if !auth::verify_server(secret, &server_nonce, &client_nonce, &r.server_proof) {
        return Err(ClientError::Auth(
            "the server's proof does not match our secret; refusing to trust it".into(),
        ));
    }
    if reader.buffered() != 0 {
        return Err(ClientError::Protocol(
            "unexpected bytes after the handshake".into(),
        ));
    }
    Ok(())
}

/// Reads one handshake reply and returns its body; error replies become typed errors.
async fn handshake_reply<R: futures_io::AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    op: Opcode,
) -> Result<Vec<u8>, ClientError> {
    let frame = match reader.next_frame().await {
        Ok(Some(f)) => f,
        Ok(None) => return Err(ClientError::ConnectionClosed),
        Err(FrameError::Io(e)) => return Err(ClientError::Io(e)),
        Err(e) => return Err(ClientError::Protocol(e.to_string())),
    };
    if frame.opcode != op || !frame.header.is_response() {
        return Err(ClientError::Protocol(format!(
            "unexpected {:?} frame during the handshake",
            frame.opcode
        )));
    }
    if frame.header.is_error() {
        let e = shardstore_proto::access_body::<shardstore_proto::ArchivedErrorBody>(&frame.body)
            .map_err(|e| ClientError::Protocol(format!("error reply: {e}")))?;
        return Err(ClientError::Auth(format!(
            "server refused: {} {}",
            shardstore_proto::ErrorCode::from_u16(e.code.to_native()).map_or("?", |c| c.name()),
            e.message.as_str()
        )));
    }
    Ok(frame.body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::{Duration, Instant};

    /// A write half that, like a TLS stream whose socket is full, takes
    /// bytes and passes them on only when flushed.
    struct PassedOnFlush {
        held: Vec<u8>,
        passed: Arc<Mutex<Vec<u8>>>,
    }

    impl tokio::io::AsyncWrite for PassedOnFlush {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().held.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            let me = self.get_mut();
            me.passed.lock().unwrap().append(&mut me.held);
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.poll_flush(cx)
        }
    }

    #[tokio::test]
    async fn the_writer_flushes_every_batch() {
        let passed = Arc::new(Mutex::new(Vec::new()));
        let p = passed.clone();
        let conn =
            Connection::with_transport("mock", &ClientConfig::default(), move |shared, rx| {
                let wr = PassedOnFlush {
                    held: Vec::new(),
                    passed: p,
                };
                tokio::spawn(writer_task(shared, rx, Box::new(wr)));
                tokio::spawn(std::future::pending::<()>()).abort_handle()
            });
        let c = conn.clone();
        let call = tokio::spawn(async move {
            c.call(
                |id, out| out.extend_from_slice(&id.to_le_bytes()),
                Bytes::from_static(b"the request's last bytes"),
            )
            .await
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while !passed
            .lock()
            .unwrap()
            .ends_with(b"the request's last bytes")
        {
            assert!(
                Instant::now() < deadline,
                "the request never left the writer: it was written but not flushed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        call.abort();
    }

    #[tokio::test]
    async fn connections_detect_a_dead_peer() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        detect_dead_peer(&s).unwrap();
        let sock = socket2::SockRef::from(&s);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(DEAD_PEER_AFTER));
        let probes = sock.keepalive_time().unwrap()
            + sock.keepalive_interval().unwrap() * sock.keepalive_retries().unwrap();
        assert_eq!(probes, DEAD_PEER_AFTER);
    }
}
