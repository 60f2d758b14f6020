//! One client connection, served start to finish on the shard that accepted
//! it, by one task.
//!
//! The loop reads with a large buffer, so one `recv` takes every frame the
//! kernel holds; requests that finish without I/O (PING, STAT, LIST, cache
//! hits, errors) are answered inline, with no task spawn; requests that wait
//! on the device or on another shard run as futures in a per-connection
//! `FuturesUnordered` polled by the same task, so a pipeline of reads and
//! writes proceeds concurrently (and writes share group commits). Writes
//! and deletes, which hold their chunk's lock and a write slot while they
//! run, are the exception: each runs as its own task (see [`apart`]), so it
//! goes on while the connection's task waits on a slow socket.
//! Replies are queued and sent with one vectored `sendmsg` when no complete
//! request is left in the receive buffer; read payloads go from the DMA buffer
//! to the socket without a copy.
//!
//! Network input is validated before it touches state: header first (before
//! allocating anything for the frame), then the body (crc + bytecheck), then
//! the payload crc. A bad header whose own crc held is answered with a typed
//! error, then the connection closes (its lengths cannot be trusted to stay in
//! step); a bad body is answered and the stream carries on.

use crate::budget::Reservation;
use crate::handler::{
    encode_error, encode_header_error, Count, EncodedReply, ErrReply, Parsed, ReplyPayload,
    ShardCtx,
};
use futures_lite::{AsyncWriteExt, FutureExt};
use futures_util::stream::{FuturesUnordered, StreamExt};
use glommio::net::TcpStream;
use shardstore_net::{FrameError, FrameReader, RawFrameHead};
use shardstore_proto::{ChunkId, ErrorCode, HEADER_LEN};
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::unix::io::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tracing::debug;

/// Queued reply bytes that force a flush even while requests remain buffered.
const FLUSH_THRESHOLD: usize = 256 << 10;

type Pending = Pin<Box<dyn Future<Output = Completed>>>;

/// A reply ready to send: its header and body bytes and its payload.
struct Completed {
    frame: Vec<u8>,
    payload: ReplyPayload,
    /// Released once the reply has been sent.
    hold: Option<Reservation>,
}

/// Replies queued for one vectored write. `frames` holds every header and
/// body; `parts` says how to interleave them with payloads.
#[derive(Default)]
struct Outbox {
    frames: Vec<u8>,
    parts: Vec<Part>,
    holds: Vec<Reservation>,
}

enum Part {
    Frames { start: usize, end: usize },
    Payload(ReplyPayload),
}

impl Outbox {
    fn push_done(&mut self, done: Completed) {
        let start = self.frames.len();
        self.frames.extend_from_slice(&done.frame);
        self.push_inline(start, done.payload, done.hold);
    }

    /// Records a reply appended to `frames` in place from `start`, its
    /// payload, and the reservation to release once it is sent. Until then
    /// the reservation holds what the reply holds: its payload (a write's
    /// data buffer is gone by now; a read may return less than it asked).
    fn push_inline(&mut self, start: usize, payload: ReplyPayload, hold: Option<Reservation>) {
        self.push_frames_since(start);
        let len = payload.len() as u64;
        if len > 0 {
            self.parts.push(Part::Payload(payload));
        }
        if let Some(mut hold) = hold {
            if len > 0 {
                hold.resize(len);
                self.holds.push(hold);
            }
        }
    }

    /// Records that `frames[start..]` was appended in place.
    fn push_frames_since(&mut self, start: usize) {
        let end = self.frames.len();
        if start == end {
            return;
        }
        if let Some(Part::Frames { end: e, .. }) = self.parts.last_mut() {
            if *e == start {
                *e = end;
                return;
            }
        }
        self.parts.push(Part::Frames { start, end });
    }

    fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    fn bytes(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Frames { start, end } => end - start,
                Part::Payload(p) => p.len(),
            })
            .sum()
    }

    fn slices(&self) -> Vec<&[u8]> {
        let mut v = Vec::with_capacity(self.parts.len() + 4);
        for p in &self.parts {
            match p {
                Part::Frames { start, end } => v.push(&self.frames[*start..*end]),
                Part::Payload(ReplyPayload::None) => {}
                Part::Payload(ReplyPayload::Owned(b)) => v.push(b),
                Part::Payload(ReplyPayload::Disk(d)) => v.extend(d.slices()),
            }
        }
        v
    }

    fn clear(&mut self) {
        self.frames.clear();
        self.parts.clear();
        self.holds.clear();
    }

    /// Sends everything queued, then releases the replies' buffers.
    async fn flush<S: Transport>(&mut self, stream: &mut S, timeout: Duration) -> io::Result<()> {
        let slices = self.slices();
        stream.send_all(&slices, timeout).await?;
        drop(slices);
        self.clear();
        Ok(())
    }
}

/// A connection's byte stream: plain TCP or TLS over it (or, in tests and
/// fuzz targets, memory).
// Shards are single-threaded executors: no `Send` bound is wanted on these futures.
#[allow(async_fn_in_trait)]
pub trait Transport: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin {
    /// Writes every slice, in order. Each time the socket refuses more, the
    /// peer has `timeout` to take some of it: a peer that stopped reading
    /// is cut off (`TimedOut`), a slow one that keeps reading is not.
    async fn send_all(&mut self, slices: &[&[u8]], timeout: Duration) -> io::Result<()>;
}

impl Transport for TcpStream {
    /// Vectored `sendmsg` with MSG_DONTWAIT while the socket takes it (read
    /// payloads go from their DMA buffers to the kernel without a copy), and
    /// glommio's poll-armed write when it is full.
    async fn send_all(&mut self, slices: &[&[u8]], timeout: Duration) -> io::Result<()> {
        let fd = self.as_raw_fd();
        // Started at the first refusal: a send the socket takes at once
        // (the usual one) reads no clock.
        let mut clock = None;
        let mut idx = 0; // first slice not fully sent
        let mut off = 0; // bytes of slices[idx] already sent
        while idx < slices.len() {
            let iov: Vec<IoSlice<'_>> = std::iter::once(IoSlice::new(&slices[idx][off..]))
                .chain(slices[idx + 1..].iter().take(1023).map(|s| IoSlice::new(s)))
                .collect();
            let sent = match send_vectored(fd, &iov) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let clock = clock.get_or_insert_with(|| SendClock::new(slices, timeout));
                    within(clock.wait_until(), self.write(&slices[idx][off..]))
                        .await
                        .ok_or_else(|| clock.cut_off())??
                }
                Err(e) => return Err(e),
            };
            let mut left = sent;
            while left > 0 {
                let room = slices[idx].len() - off;
                if left >= room {
                    left -= room;
                    idx += 1;
                    off = 0;
                } else {
                    off += left;
                    left = 0;
                }
            }
            while idx < slices.len() && slices[idx].len() == off {
                idx += 1;
                off = 0;
            }
        }
        Ok(())
    }
}

impl Transport for futures_rustls::server::TlsStream<TcpStream> {
    /// rustls encrypts into its own records, so this path copies; replies
    /// are still batched into one flush per readiness.
    async fn send_all(&mut self, slices: &[&[u8]], timeout: Duration) -> io::Result<()> {
        let clock = SendClock::new(slices, timeout);
        for s in slices {
            let mut s = *s;
            while !s.is_empty() {
                let n = within(clock.wait_until(), self.write(s))
                    .await
                    .ok_or_else(|| clock.cut_off())??;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                s = &s[n..];
            }
        }
        within(clock.wait_until(), self.flush())
            .await
            .ok_or_else(|| clock.cut_off())?
    }
}

/// The slowest a client may take its replies, on average over one flush
/// (after the write timeout's grace), or send a frame (after the frame
/// timeout's): 64 KiB/s, a 512 kbit/s link. A slower one is cut off like
/// one that stopped; else a client moving one segment now and then would
/// keep its buffers (and their share of the shard's budget) for as long as
/// it liked, and a frame larger than the frame timeout's worth at a slow
/// but honest rate could never arrive.
const MIN_PEER_BYTES_PER_SEC: u64 = 64 << 10;

/// `bytes` at [`MIN_PEER_BYTES_PER_SEC`].
fn at_min_rate(bytes: u64) -> Duration {
    Duration::from_millis(bytes.saturating_mul(1000) / MIN_PEER_BYTES_PER_SEC)
}

/// How long a flush may wait for the peer: each wait at most the write
/// timeout (a peer that stopped reading), and the whole flush at most the
/// timeout plus its bytes at [`MIN_PEER_BYTES_PER_SEC`] (one that reads
/// too slowly), counted from the socket's first refusal (over TLS, from the
/// flush's start).
struct SendClock {
    timeout: Duration,
    whole: Instant,
}

impl SendClock {
    fn new(slices: &[&[u8]], timeout: Duration) -> SendClock {
        SendClock::at(
            Instant::now(),
            slices.iter().map(|s| s.len() as u64).sum(),
            timeout,
        )
    }

    fn at(now: Instant, bytes: u64, timeout: Duration) -> SendClock {
        SendClock {
            timeout,
            whole: now + timeout + at_min_rate(bytes),
        }
    }

    /// The deadline of a wait starting now.
    fn wait_until(&self) -> Instant {
        self.wait_from(Instant::now())
    }

    fn wait_from(&self, now: Instant) -> Instant {
        (now + self.timeout).min(self.whole)
    }

    fn cut_off(&self) -> io::Error {
        if Instant::now() >= self.whole {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "peer takes its replies slower than 64 KiB/s",
            )
        } else {
            io::Error::new(io::ErrorKind::TimedOut, "peer stopped reading replies")
        }
    }
}

fn send_vectored(fd: i32, iov: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: msghdr points at `iov`, which outlives the call; IoSlice is
    // ABI-compatible with iovec.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len();
        libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Runs `fut` until `deadline`; `None` if the deadline passed first.
pub async fn within<T>(deadline: Instant, fut: impl Future<Output = T>) -> Option<T> {
    let left = deadline.saturating_duration_since(Instant::now());
    async { Some(fut.await) }
        .or(async {
            glommio::timer::sleep(left).await;
            None
        })
        .await
}

/// Why the read side stopped.
enum Stop {
    Eof,
    Close,
}

/// Accepts connections for one shard, refusing those over its limit with a
/// typed BUSY frame.
pub async fn accept_loop(ctx: Rc<ShardCtx>, listener: glommio::net::TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let peer = stream
                    .peer_addr()
                    .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                let _ = stream.set_nodelay(true);
                if ctx.counters.connections.get() >= ctx.limits.max_connections {
                    ctx.counters
                        .refused_connections
                        .set(ctx.counters.refused_connections.get() + 1);
                    debug!(shard = ctx.id.0, %peer, "connection limit reached; refusing");
                    glommio::spawn_local(refuse(stream, ctx.limits.write_timeout)).detach();
                    continue;
                }
                // Counted from here, not from when its task first runs: the
                // accept loop may take a whole backlog before any of them
                // does, and the limit above must see them all.
                let counted = Counted::open(&ctx);
                // Registered so a graceful stop can shut its reads down;
                // unregistered right after the stream is closed.
                let registered = ctx.conns.register(stream.as_raw_fd());
                let ctx = ctx.clone();
                glommio::spawn_local(async move {
                    serve_connection(ctx, stream, peer).await;
                    drop(registered);
                    drop(counted);
                })
                .detach();
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(shard = ctx.id.0, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
        // glommio accepts at once while connections wait: under a flood of
        // them, requests and the metrics loop still get their turn.
        glommio::yield_if_needed().await;
    }
}

/// An open connection in the shard's `connections` count while it lives.
struct Counted {
    ctx: Rc<ShardCtx>,
}

impl Counted {
    fn open(ctx: &Rc<ShardCtx>) -> Counted {
        let c = &ctx.counters;
        c.connections.set(c.connections.get() + 1);
        c.connections_total.set(c.connections_total.get() + 1);
        Counted { ctx: ctx.clone() }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let c = &self.ctx.counters.connections;
        c.set(c.get() - 1);
    }
}

async fn refuse(mut stream: TcpStream, timeout: Duration) {
    let mut f = Vec::new();
    encode_error(
        &mut f,
        shardstore_proto::Opcode::Ping,
        0,
        &ErrReply::new(ErrorCode::Busy, "connection limit reached; try again later"),
    );
    let _ = within(Instant::now() + timeout, stream.write_all(&f)).await;
    let _ = stream.close().await;
}

pub async fn serve_connection(ctx: Rc<ShardCtx>, stream: TcpStream, peer: SocketAddr) {
    let c = &ctx.counters;
    let result = match ctx.node.tls.clone() {
        None => connection_loop(&ctx, stream, peer).await,
        Some(acceptor) => {
            // The TLS handshake is bounded like a frame.
            let deadline = Instant::now() + ctx.limits.frame_timeout;
            match within(deadline, acceptor.accept(stream)).await {
                Some(Ok(tls)) => connection_loop(&ctx, tls, peer).await,
                Some(Err(e)) => {
                    c.tls_failures.set(c.tls_failures.get() + 1);
                    debug!(shard = ctx.id.0, %peer, error = %e, "TLS handshake failed");
                    Ok(())
                }
                None => {
                    c.timeouts.set(c.timeouts.get() + 1);
                    debug!(shard = ctx.id.0, %peer, "TLS handshake timed out");
                    Ok(())
                }
            }
        }
    };
    if let Err(e) = result {
        // A send that timed out was counted where it happened (once per
        // connection, see `Conn::timed_out`).
        debug!(shard = ctx.id.0, %peer, error = %e, "connection ended with an error");
    }
}

/// Per-connection state besides the socket.
struct Conn {
    out: Outbox,
    pending: FuturesUnordered<Pending>,
    /// Payload bytes this connection holds (see `budget`).
    held: Rc<std::cell::Cell<u64>>,
    /// When the first byte of the frame being received arrived.
    frame_started: Option<Instant>,
    /// The connection was counted in `timeouts` (once, though a frame
    /// timeout can be followed by a send timeout of its last replies).
    timed_out: std::cell::Cell<bool>,
}

impl Conn {
    /// Sends the queued replies. The time that takes is not the client's:
    /// a frame that had begun to arrive keeps all of its frame timeout.
    async fn flush<S: Transport>(
        &mut self,
        ctx: &ShardCtx,
        reader: &mut FrameReader<S>,
    ) -> io::Result<()> {
        let t = self.frame_clock();
        if let Err(e) = self
            .out
            .flush(reader.get_mut(), ctx.limits.write_timeout)
            .await
        {
            if e.kind() == io::ErrorKind::TimedOut {
                self.timed_out(ctx);
            }
            return Err(e);
        }
        self.stop_frame_clock(t);
        Ok(())
    }

    /// Now, if a frame has begun to arrive (else no clock is read).
    fn frame_clock(&self) -> Option<Instant> {
        self.frame_started.map(|_| Instant::now())
    }

    /// Leaves the time since `since` (from [`Conn::frame_clock`]), spent
    /// waiting on the server's side, out of the frame being received.
    fn stop_frame_clock(&mut self, since: Option<Instant>) {
        if let (Some(started), Some(since)) = (self.frame_started.as_mut(), since) {
            *started += since.elapsed();
        }
    }

    /// Counts the connection in `timeouts`, once.
    fn timed_out(&self, ctx: &ShardCtx) {
        count_timeout(ctx, &self.timed_out);
    }

    /// Waits for the requests still running, their replies dropped (the
    /// connection can send no more). Its task, and its place in the
    /// shard's connection count, last until they end: a client that resets
    /// its connections cannot leave more requests running than the
    /// connection limit times `max_in_flight` (returning at once left them
    /// to run unbounded by either).
    async fn settle(&mut self) {
        while self.pending.next().await.is_some() {}
    }
}

/// Counts a connection in `timeouts`, once (`counted` says it was).
fn count_timeout(ctx: &ShardCtx, counted: &std::cell::Cell<bool>) {
    if !counted.replace(true) {
        ctx.counters.timeouts.set(ctx.counters.timeouts.get() + 1);
    }
}

/// When the pieces of a frame's payload are due: the frame's start, plus
/// the frame timeout, plus the payload through the piece's end at 64 KiB/s.
/// A steady sender of a large payload has all the time its length asks;
/// one that stops is cut off about a frame timeout after it stopped (the
/// whole allowance up front let a silent WRITE of 8 MiB hold its buffer
/// and budget for over two minutes).
#[derive(Clone, Copy)]
struct Pace {
    started: Instant,
    grace: Duration,
}

/// Bytes of payload read under one deadline (one second at the minimum rate).
const PACE_PIECE: usize = MIN_PEER_BYTES_PER_SEC as usize;

impl Pace {
    fn due(&self, through: u64) -> Instant {
        self.started + self.grace + at_min_rate(through)
    }

    /// Reads the payload into `dst` in pieces, each by its due time.
    async fn read<S: Transport>(
        self,
        reader: &mut FrameReader<S>,
        dst: &mut [u8],
    ) -> Result<(), FrameError> {
        self.take(reader, dst.len(), Some(dst)).await
    }

    /// Skips `n` bytes of payload, each piece by its due time.
    async fn skip<S: Transport>(
        self,
        reader: &mut FrameReader<S>,
        n: usize,
    ) -> Result<(), FrameError> {
        self.take(reader, n, None).await
    }

    /// `n` bytes of payload into `dst`, or skipped; with no timer when they
    /// are all buffered already.
    async fn take<S: Transport>(
        self,
        reader: &mut FrameReader<S>,
        n: usize,
        mut dst: Option<&mut [u8]>,
    ) -> Result<(), FrameError> {
        let whole = reader.buffered() >= n;
        let mut through = 0;
        while through < n {
            let piece = if whole {
                n
            } else {
                (n - through).min(PACE_PIECE)
            };
            let step = async {
                match dst.as_deref_mut() {
                    Some(d) => reader.read_payload(&mut d[through..through + piece]).await,
                    None => reader.skip_payload(piece).await,
                }
            };
            if whole {
                step.await?;
            } else {
                within(self.due((through + piece) as u64), step)
                    .await
                    .unwrap_or(Err(FrameError::TimedOut))?;
            }
            through += piece;
        }
        Ok(())
    }
}

/// Serves one connection over any transport until it closes: the request
/// path exactly as a TCP client meets it (fuzz targets drive this).
pub async fn connection_loop<S: Transport>(
    ctx: &Rc<ShardCtx>,
    stream: S,
    peer: SocketAddr,
) -> io::Result<()> {
    let lim = &ctx.limits;
    let mut reader = FrameReader::new(stream, ctx.node.max_payload);
    let mut conn = Conn {
        out: Outbox::default(),
        pending: FuturesUnordered::new(),
        held: Rc::new(std::cell::Cell::new(0)),
        frame_started: None,
        timed_out: std::cell::Cell::new(false),
    };
    if let Some(secret) = ctx.node.auth_secret.clone() {
        let deadline = Instant::now() + lim.frame_timeout;
        let outcome = match within(deadline, authenticate(ctx, &mut reader, &secret, peer)).await {
            Some(r) => r?,
            None => {
                ctx.counters.timeouts.set(ctx.counters.timeouts.get() + 1);
                debug!(shard = ctx.id.0, %peer, "authentication handshake timed out");
                Handshake::Abandoned
            }
        };
        if outcome != Handshake::Passed {
            if outcome == Handshake::Refused {
                ctx.counters
                    .auth_failures
                    .set(ctx.counters.auth_failures.get() + 1);
            }
            close(&mut reader, lim.write_timeout).await;
            return Ok(());
        }
    }
    let mut stop = None;
    loop {
        // Drain finished requests without waiting.
        while let Some(Some(done)) = futures_lite::future::poll_once(conn.pending.next()).await {
            conn.out.push_done(done);
        }
        let have_frame = reader.buffered() >= HEADER_LEN;
        if !conn.out.is_empty()
            && (!have_frame || conn.out.bytes() >= FLUSH_THRESHOLD || stop.is_some())
        {
            if let Err(e) = conn.flush(ctx, &mut reader).await {
                conn.settle().await;
                return Err(e);
            }
        }
        if stop.is_some() {
            if conn.pending.is_empty() {
                if conn.out.is_empty() {
                    break;
                }
                continue;
            }
            if let Some(done) = conn.pending.next().await {
                conn.out.push_done(done);
            }
            continue;
        }
        // Backpressure: over either bound, only finish work, read nothing.
        if conn.pending.len() >= lim.max_in_flight || conn.held.get() >= lim.conn_buffer_bytes {
            let waited = conn.frame_clock();
            if let Some(done) = conn.pending.next().await {
                // The server's wait, not the client's (see `Conn::flush`).
                conn.stop_frame_clock(waited);
                conn.out.push_done(done);
                continue;
            }
            // Nothing in flight: replies waiting to be sent hold the bytes
            // (a burst of requests answered at once). Sent first, or one
            // connection's burst takes the whole shard budget and every
            // request after it, its own and others', gets BUSY.
            if !conn.out.is_empty() {
                if let Err(e) = conn.flush(ctx, &mut reader).await {
                    conn.settle().await;
                    return Err(e);
                }
                continue;
            }
        }
        // Wait for the next request or for a pending one to finish.
        let ev = if conn.pending.is_empty() {
            Ev::Head(next_head(ctx, &mut reader, &mut conn.frame_started).await)
        } else {
            let started = &mut conn.frame_started;
            let pending = &mut conn.pending;
            async { Ev::Head(next_head(ctx, &mut reader, started).await) }
                .or(async {
                    match pending.next().await {
                        Some(d) => Ev::Done(d),
                        None => std::future::pending().await,
                    }
                })
                .await
        };
        let head = match ev {
            Ev::Done(d) => {
                conn.out.push_done(d);
                continue;
            }
            Ev::Head(h) => h,
        };
        match head {
            Ok(None) => stop = Some(Stop::Eof),
            Ok(Some(head)) => {
                let rest = head.header.rest_len();
                let pace = Pace {
                    started: conn.frame_started.unwrap_or_else(Instant::now),
                    grace: lim.frame_timeout,
                };
                let res = if reader.buffered() >= rest {
                    // The whole frame is here: no timer needed.
                    handle_frame(ctx, &mut reader, head, pace, &mut conn, peer).await
                } else {
                    match within(
                        pace.due(rest as u64),
                        handle_frame(ctx, &mut reader, head, pace, &mut conn, peer),
                    )
                    .await
                    {
                        Some(r) => r,
                        None => {
                            conn.timed_out(ctx);
                            debug!(shard = ctx.id.0, %peer, "frame did not arrive in time; closing");
                            Ok(Some(Stop::Close))
                        }
                    }
                };
                conn.frame_started = None;
                if let Some(s) = res? {
                    stop = Some(s);
                }
            }
            Err(FrameError::Header {
                err,
                request_id,
                opcode,
            }) => {
                ctx.counters
                    .malformed_frames
                    .set(ctx.counters.malformed_frames.get() + 1);
                debug!(shard = ctx.id.0, %peer, error = %err, "bad frame header; closing");
                if let Some(id) = request_id {
                    let start = conn.out.frames.len();
                    encode_header_error(
                        &mut conn.out.frames,
                        opcode,
                        id,
                        &ErrReply::new(err.code(), err.to_string()),
                    );
                    conn.out.push_frames_since(start);
                }
                stop = Some(Stop::Close);
            }
            Err(FrameError::TimedOut) => {
                conn.timed_out(ctx);
                debug!(shard = ctx.id.0, %peer, "idle or slow connection; closing");
                stop = Some(Stop::Close);
            }
            Err(FrameError::Truncated { got, want }) => {
                debug!(shard = ctx.id.0, %peer, got, want, "connection closed mid-frame");
                stop = Some(Stop::Close);
            }
            Err(FrameError::Io(e)) => {
                // The read side failed: with TLS, also what a graceful
                // stop's shutdown of reads looks like (an end of stream
                // without close_notify). Requests in flight still finish
                // and get their replies if the write side works; returning
                // here dropped them unanswered.
                debug!(shard = ctx.id.0, %peer, error = %e, "read failed; finishing in-flight requests");
                stop = Some(Stop::Eof);
            }
            Err(FrameError::Body(e)) => {
                debug!(shard = ctx.id.0, %peer, error = %e, "unexpected body error; closing");
                stop = Some(Stop::Close);
            }
        }
    }
    if let Some(Stop::Close) = stop {
        debug!(shard = ctx.id.0, %peer, "closing connection after a protocol error or timeout");
    }
    close(&mut reader, lim.write_timeout).await;
    Ok(())
}

/// Closes the stream. With TLS that sends close_notify, which waits for
/// the socket to take it: at most `timeout` (a client that stopped reading
/// kept the task, its fd and its buffer for good).
async fn close<S: Transport>(reader: &mut FrameReader<S>, timeout: Duration) {
    let _ = within(Instant::now() + timeout, reader.get_mut().close()).await;
}

/// How a connection's handshake ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handshake {
    Passed,
    /// A wrong proof, a request before it, or a frame that is not one:
    /// counted in `auth_failures`.
    Refused,
    /// Closed (or timed out) before a complete frame: a health check or a
    /// port scan, not a failed login; not counted there.
    Abandoned,
}

/// The server side of the handshake in `shardstore_proto::auth`. Nothing
/// but HELLO then AUTH is accepted; anything else, or a wrong proof, gets a
/// typed UNAUTHORIZED and the connection closes.
async fn authenticate<S: Transport>(
    ctx: &ShardCtx,
    reader: &mut FrameReader<S>,
    secret: &[u8],
    peer: SocketAddr,
) -> io::Result<Handshake> {
    use shardstore_proto::{
        auth, encode_frame, ArchivedAuthRequest, AuthReply, HelloReply, Opcode,
    };
    let mut out = Vec::new();
    let mut server_nonce = [0u8; 32];
    getrandom::getrandom(&mut server_nonce).map_err(|e| io::Error::other(e.to_string()))?;
    let mut step = Opcode::Hello;
    loop {
        let head = match reader.read_head().await {
            Ok(Some(h)) => h,
            Err(FrameError::Header { .. }) => return Ok(Handshake::Refused),
            Ok(None) | Err(_) => return Ok(Handshake::Abandoned),
        };
        let (op, id) = (head.opcode, head.header.request_id);
        let refuse = |out: &mut Vec<u8>, why: &str| {
            encode_error(out, op, id, &ErrReply::new(ErrorCode::Unauthorized, why));
        };
        if op != step || head.header.payload_len != 0 || head.header.is_response() {
            debug!(shard = ctx.id.0, %peer, opcode = ?op, "request before authentication");
            refuse(&mut out, "authenticate first: HELLO, then AUTH");
            reader.get_mut().write_all(&out).await?;
            return Ok(Handshake::Refused);
        }
        let body = match reader.read_body(&head).await {
            Ok(b) => b,
            Err(_) => {
                refuse(&mut out, "malformed handshake frame");
                reader.get_mut().write_all(&out).await?;
                return Ok(Handshake::Refused);
            }
        };
        if step == Opcode::Hello {
            let reply = HelloReply {
                auth_required: true,
                server_nonce,
            };
            encode_frame(op, shardstore_proto::FLAG_RESPONSE, id, &reply, 0, &mut out);
            reader.get_mut().write_all(&out).await?;
            out.clear();
            step = Opcode::Auth;
            continue;
        }
        let verified = shardstore_proto::access_body::<ArchivedAuthRequest>(body)
            .ok()
            .map(|a| (a.client_nonce, a.proof))
            .filter(|(cn, proof)| auth::verify_client(secret, &server_nonce, cn, proof));
        let Some((client_nonce, _)) = verified else {
            debug!(shard = ctx.id.0, %peer, "authentication failed");
            refuse(&mut out, "authentication failed");
            reader.get_mut().write_all(&out).await?;
            return Ok(Handshake::Refused);
        };
        let reply = AuthReply {
            server_proof: auth::server_proof(secret, &server_nonce, &client_nonce),
        };
        encode_frame(op, shardstore_proto::FLAG_RESPONSE, id, &reply, 0, &mut out);
        reader.get_mut().write_all(&out).await?;
        return Ok(Handshake::Passed);
    }
}

enum Ev {
    Head(Result<Option<RawFrameHead>, FrameError>),
    Done(Completed),
}

/// The next frame header, under the idle timeout while nothing is buffered
/// and under the frame timeout once its first byte has arrived. Cancel-safe.
async fn next_head<S: Transport>(
    ctx: &ShardCtx,
    reader: &mut FrameReader<S>,
    frame_started: &mut Option<Instant>,
) -> Result<Option<RawFrameHead>, FrameError> {
    if reader.buffered() >= HEADER_LEN {
        frame_started.get_or_insert_with(Instant::now);
        return reader.read_head().await;
    }
    if reader.buffered() == 0 {
        let idle = Instant::now() + ctx.limits.idle_timeout;
        match within(idle, reader.wait_for_data()).await {
            None => return Err(FrameError::TimedOut),
            Some(Ok(false)) => return Ok(None),
            Some(Ok(true)) => {}
            Some(Err(e)) => return Err(e),
        }
    }
    let started = *frame_started.get_or_insert_with(Instant::now);
    within(started + ctx.limits.frame_timeout, reader.read_head())
        .await
        .unwrap_or(Err(FrameError::TimedOut))
}

/// Reads the rest of one frame and starts (or finishes) its request.
/// Returns `Some(stop)` if the connection must stop reading.
async fn handle_frame<S: Transport>(
    ctx: &Rc<ShardCtx>,
    reader: &mut FrameReader<S>,
    head: RawFrameHead,
    pace: Pace,
    conn: &mut Conn,
    peer: SocketAddr,
) -> io::Result<Option<Stop>> {
    let op = head.opcode;
    let id = head.header.request_id;
    let payload_len = head.header.payload_len as usize;
    let out = &mut conn.out;
    let fail = |out: &mut Outbox, e: ErrReply| {
        ctx.counters.error(op);
        let start = out.frames.len();
        encode_error(&mut out.frames, op, id, &e);
        out.push_frames_since(start);
    };
    ctx.counters.request(op);
    if head.header.is_response() {
        ctx.counters
            .malformed_frames
            .set(ctx.counters.malformed_frames.get() + 1);
        fail(
            out,
            ErrReply::new(ErrorCode::Malformed, "a reply frame was sent to the server"),
        );
        return Ok(Some(Stop::Close));
    }
    let body = match reader.read_body(&head).await {
        Ok(b) => b,
        Err(FrameError::Body(e)) => {
            ctx.counters
                .malformed_frames
                .set(ctx.counters.malformed_frames.get() + 1);
            debug!(shard = ctx.id.0, %peer, error = %e, "bad frame body");
            fail(out, ErrReply::new(ErrorCode::Malformed, e.to_string()));
            return skip(ctx, reader, payload_len, pace, &conn.timed_out).await;
        }
        Err(e) => return Ok(Some(frame_stop(ctx, &conn.timed_out, peer, e))),
    };
    let req = match Parsed::decode(op, body) {
        Ok(r) => r,
        Err(e) => {
            ctx.counters
                .malformed_frames
                .set(ctx.counters.malformed_frames.get() + 1);
            debug!(shard = ctx.id.0, %peer, error = %e.message, "invalid body");
            fail(out, e);
            return skip(ctx, reader, payload_len, pace, &conn.timed_out).await;
        }
    };
    let owner = req.owner(ctx.node.shard_count, ctx.id);
    // `bytes` of the shard's budget for this request (Err: over it).
    let try_hold = |held: &Rc<std::cell::Cell<u64>>, bytes: u64| match bytes {
        0 => Ok(None),
        _ => Reservation::try_new(&ctx.budget, held, bytes)
            .map(Some)
            .ok_or(()),
    };
    let refuse_busy = |out: &mut Outbox| {
        ctx.counters.busy.set(ctx.counters.busy.get() + 1);
        fail(out, busy_reply());
    };
    if let Parsed::Read(r) = &req {
        if owner == ctx.id && ctx.budget.used() >= ctx.budget.limit() {
            // Refused before the cache is looked at when the budget is
            // full: a hit refused after has counted as served and moved
            // the cache's state (that still happens to a hit larger than
            // what is left of the budget; knowing its size first would
            // cost every hit a second chunk-table lookup).
            refuse_busy(out);
            return Ok(None);
        }
        if owner == ctx.id && ctx.shard_has_cache() {
            // A cache hit is answered inline, straight into the outbox; it
            // then holds exactly its payload until sent.
            let start = out.frames.len();
            if let Some(payload) = ctx.read_now(op, id, r, &mut out.frames) {
                match try_hold(&conn.held, payload.len() as u64) {
                    Ok(hold) => out.push_inline(start, payload, hold),
                    Err(()) => {
                        out.frames.truncate(start);
                        ctx.counters.read_refused(payload.len() as u64);
                        refuse_busy(out);
                    }
                }
                return Ok(None);
            }
        }
    }
    // Payload bytes this request will hold: its write data or its read
    // reply, which a local READ bounds by the chunk's length now (an 8 MiB
    // READ of a 4 KiB chunk holds 4 KiB, not 8 MiB). The reservation is
    // resized to the reply once that is built (see `Outbox::push_inline`).
    let hold_bytes = match &req {
        Parsed::Read(r) if owner == ctx.id => ctx.read_reply_bound(r),
        Parsed::Read(r) => r.len.min(ctx.node.max_payload) as u64,
        _ => payload_len as u64,
    };
    let hold = match &req {
        // Counted even when nothing is expected back (see `Reservation::empty`).
        Parsed::Read(_) if owner == ctx.id && hold_bytes == 0 => {
            Some(Reservation::empty(&ctx.budget, &conn.held))
        }
        _ => match try_hold(&conn.held, hold_bytes) {
            Ok(hold) => hold,
            Err(()) => {
                refuse_busy(out);
                return skip(ctx, reader, payload_len, pace, &conn.timed_out).await;
            }
        },
    };
    if owner != ctx.id {
        let body = body.to_vec();
        let mut payload = vec![0u8; payload_len];
        if let Err(e) = pace.read(reader, &mut payload).await {
            return Ok(Some(frame_stop(ctx, &conn.timed_out, peer, e)));
        }
        if let Parsed::Write(w) = &req {
            if let Err(e) = ctx.check_payload(w, &payload) {
                fail(out, e);
                return Ok(None);
            }
        }
        // Polled by this task: the owner runs the request in a task of its
        // own whether or not this waits (see `ShardCtx::serve_forwarded`).
        let ctx = ctx.clone();
        conn.pending.push(Box::pin(async move {
            let (reply, hold) = ctx.forward(owner, op, id, body, payload, hold).await;
            match reply {
                Ok(EncodedReply { frame, payload }) => {
                    // The owner's error replies are counted here, where
                    // the request was (see `ForwardMsg::count`).
                    if is_error_frame(&frame) {
                        ctx.counters.error(op);
                    }
                    Completed {
                        frame,
                        payload: ReplyPayload::Owned(payload),
                        hold,
                    }
                }
                Err(e) => {
                    ctx.counters.error(op);
                    let mut frame = Vec::new();
                    encode_error(&mut frame, op, id, &e);
                    Completed {
                        frame,
                        payload: ReplyPayload::None,
                        hold,
                    }
                }
            }
        }));
        return Ok(None);
    }
    match req {
        Parsed::Write(w) => {
            let mut pw =
                match ctx
                    .shard
                    .prepare_write(ChunkId(w.chunk), w.offset, payload_len as u32)
                {
                    Ok(pw) => pw,
                    Err(e) => {
                        fail(out, e.into());
                        return skip(ctx, reader, payload_len, pace, &conn.timed_out).await;
                    }
                };
            // The payload goes from the socket buffer straight into the DMA
            // buffer that is written to disk.
            if let Err(e) = pace.read(reader, pw.payload_mut()).await {
                return Ok(Some(frame_stop(ctx, &conn.timed_out, peer, e)));
            }
            if let Err(e) = ctx.check_payload(&w, pw.payload_mut()) {
                fail(out, e);
                return Ok(None);
            }
            let owner = ctx.clone();
            conn.pending.push(apart(ctx, op, id, async move {
                let ctx = owner;
                let mut frame = Vec::new();
                let payload = ctx
                    .execute(op, id, Parsed::Write(w), Some(pw), &mut frame, Count::Here)
                    .await;
                Completed {
                    frame,
                    payload,
                    hold,
                }
            }));
        }
        // A READ here missed the cache (or there is none): see above.
        Parsed::Read(_) => {
            conn.pending
                .push(Box::pin(execute_later(ctx, op, id, req, hold)));
        }
        Parsed::Delete(_) => {
            conn.pending
                .push(apart(ctx, op, id, execute_later(ctx, op, id, req, hold)));
        }
        Parsed::Ping
        | Parsed::Topology
        | Parsed::Stat(_)
        | Parsed::List(_)
        | Parsed::Stats
        | Parsed::Hello
        | Parsed::Auth => {
            // No device I/O: answer inline, straight into the outbox.
            let start = out.frames.len();
            let payload = ctx
                .execute(op, id, req, None, &mut out.frames, Count::Here)
                .await;
            out.push_frames_since(start);
            debug_assert!(payload.is_empty());
        }
    }
    Ok(None)
}

/// Runs a WRITE or DELETE as its own task; the returned future gives its
/// reply. The request goes on, and lets go of what it holds (its chunk's
/// lock, a write slot), while the connection's task waits on a socket that
/// takes replies slowly or a frame that arrives slowly: polled only by that
/// task, a started write kept its chunk locked until the write timeout cut
/// such a client off, and every other client's write of that chunk waited
/// as long. Nor does a connection that ends cancel it midway. A graceful
/// stop waits for these tasks (see `ConnRegistry::requests_running`).
///
/// Reads are not run so: a task per uncached READ cost 10-20% of their
/// rate at 32 outstanding (interleaved runs, 5 s each: 55.0, 53.8, 44.4k
/// against 60.8, 61.5, 58.8k polled inline). A read held up by its
/// connection holds no lock, only its share of the budget and the read
/// epoch that keeps space freed since it began from reuse, for as long as
/// the send clock lets the connection live (see `SendClock`).
fn apart(
    ctx: &Rc<ShardCtx>,
    op: shardstore_proto::Opcode,
    id: u64,
    request: impl Future<Output = Completed> + 'static,
) -> Pending {
    let running = ctx.conns.request_started();
    let task = glommio::spawn_local(async move {
        let _running = running;
        request.await
    })
    .detach();
    Box::pin(async move {
        match task.await {
            Some(done) => done,
            // Only when the executor itself goes away.
            None => {
                let mut frame = Vec::new();
                encode_error(
                    &mut frame,
                    op,
                    id,
                    &ErrReply::new(ErrorCode::Internal, "the request's task was cancelled"),
                );
                Completed {
                    frame,
                    payload: ReplyPayload::None,
                    hold: None,
                }
            }
        }
    })
}

/// A request executed apart (see [`apart`]), its reply queued when done.
fn execute_later(
    ctx: &Rc<ShardCtx>,
    op: shardstore_proto::Opcode,
    id: u64,
    req: Parsed,
    hold: Option<Reservation>,
) -> impl Future<Output = Completed> + 'static {
    let ctx = ctx.clone();
    async move {
        let mut frame = Vec::new();
        let mut hold = hold;
        let mut payload = ctx
            .execute(op, id, req, None, &mut frame, Count::Here)
            .await;
        // A local READ reserved what its chunk held at admission; a write
        // that ran first may have grown it. Its reply must fit the budget
        // too, or it is refused (a READ has no effect to undo).
        if let Some(h) = hold.as_mut() {
            if !h.try_resize(payload.len() as u64) {
                ctx.counters.read_refused(payload.len() as u64);
                ctx.counters.busy.set(ctx.counters.busy.get() + 1);
                ctx.counters.error(op);
                frame.clear();
                payload = ReplyPayload::None;
                encode_error(&mut frame, op, id, &busy_reply());
            }
        }
        Completed {
            frame,
            payload,
            hold,
        }
    }
}

/// Whether an encoded reply carries an error body.
fn is_error_frame(frame: &[u8]) -> bool {
    frame
        .get(..HEADER_LEN)
        .and_then(|h| <&[u8; HEADER_LEN]>::try_from(h).ok())
        .is_some_and(|h| shardstore_proto::FrameHeader::from_bytes(h).is_error())
}

/// The refusal of a request over the shard's buffer budget.
fn busy_reply() -> ErrReply {
    ErrReply::new(
        ErrorCode::Busy,
        "shard request buffer budget exhausted; retry later",
    )
}

/// Skips a refused request's payload. Any failure ends reading only (see
/// `frame_stop`): the replies queued, this request's refusal among them,
/// are still sent.
/// Skips a refused request's payload (see [`Pace`]).
async fn skip<S: Transport>(
    ctx: &ShardCtx,
    reader: &mut FrameReader<S>,
    n: usize,
    pace: Pace,
    timed_out: &std::cell::Cell<bool>,
) -> io::Result<Option<Stop>> {
    match pace.skip(reader, n).await {
        Ok(()) => Ok(None),
        Err(FrameError::TimedOut) => {
            count_timeout(ctx, timed_out);
            Ok(Some(Stop::Close))
        }
        Err(_) => Ok(Some(Stop::Close)),
    }
}

/// How a failed read of a frame's body or payload ends the connection:
/// requests in flight still finish and are answered (see the read error
/// of a frame header in `connection_loop`).
fn frame_stop(
    ctx: &ShardCtx,
    timed_out: &std::cell::Cell<bool>,
    peer: SocketAddr,
    e: FrameError,
) -> Stop {
    if matches!(e, FrameError::TimedOut) {
        count_timeout(ctx, timed_out);
    }
    debug!(shard = ctx.id.0, %peer, error = %e, "bad or unreadable frame; finishing in-flight requests, then closing");
    Stop::Close
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn_limits::ConnLimits;

    /// Each wait of a flush gets the write timeout, but the whole flush no
    /// more than that plus its bytes at 64 KiB/s: a peer that keeps taking
    /// a little is cut off once it is that far behind.
    #[test]
    fn a_flush_waits_at_most_its_bytes_at_the_minimum_rate() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(2);
        let c = SendClock::at(t0, 1 << 20, timeout);
        // Early on, a wait gets the whole write timeout.
        assert_eq!(c.wait_from(t0), t0 + timeout);
        assert_eq!(
            c.wait_from(t0 + Duration::from_secs(10)),
            t0 + Duration::from_secs(12)
        );
        // 1 MiB at 64 KiB/s: 16 s after the grace, then no more.
        let end = t0 + timeout + Duration::from_secs(16);
        assert_eq!(c.wait_from(t0 + Duration::from_secs(17)), end);
        assert_eq!(c.wait_from(end), end);
        // An empty flush waits the write timeout at most.
        let e = SendClock::at(t0, 0, timeout);
        assert_eq!(e.wait_from(t0 + Duration::from_secs(1)), t0 + timeout);
    }
    use crate::handler::NodeInfo;
    use shardstore_proto::{Opcode, ReadRequest, ShardId};
    use shardstore_shard::{Shard, ShardConfig, SimDisk};
    use std::cell::Cell;

    /// A READ admitted for a 4 KiB chunk that a write grows to 1 MiB before
    /// the READ runs: its reply would hold 1 MiB of a 64 KiB budget, so it
    /// is refused with BUSY (it used to be sent, the budget passed 16 times
    /// over, as many times as such READs were queued).
    #[test]
    fn a_read_whose_chunk_grew_since_admission_stays_within_the_budget() {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(512 << 10)
            .make()
            .unwrap()
            .run(async {
                let cfg = ShardConfig {
                    capacity_bytes: 4 << 20,
                    ..ShardConfig::default()
                };
                let disk = SimDisk::new(6 << 20, 1);
                let shard = Shard::open_sim(cfg, &disk).await.unwrap();
                let limits = ConnLimits {
                    shard_buffer_bytes: 64 << 10,
                    ..ConnLimits::default()
                };
                let node = NodeInfo::single_shard(2 << 20, limits);
                let ctx = Rc::new(ShardCtx::new(shard, ShardId(0), node, Vec::new()));
                ctx.shard.write(ChunkId(9), 0, &[1u8; 4096]).await.unwrap();
                let r = ReadRequest {
                    chunk: 9,
                    offset: 0,
                    len: 1 << 20,
                    flags: 0,
                };
                let held = Rc::new(Cell::new(0));
                let bound = ctx.read_reply_bound(&r);
                assert_eq!(bound, 4096, "admitted for what the chunk holds");
                let hold = Reservation::try_new(&ctx.budget, &held, bound);
                let other = Reservation::try_new(&ctx.budget, &held, 4096);
                let grown = vec![2u8; 1 << 20];
                ctx.shard.write(ChunkId(9), 0, &grown).await.unwrap();
                let done = execute_later(&ctx, Opcode::Read, 5, Parsed::Read(r), hold).await;
                assert!(
                    ctx.budget.used() <= ctx.budget.limit(),
                    "{} bytes held of a {} byte budget",
                    ctx.budget.used(),
                    ctx.budget.limit()
                );
                assert_eq!(done.payload.len(), 0);
                let e = shardstore_proto::access_body::<shardstore_proto::ArchivedErrorBody>(
                    &done.frame[HEADER_LEN..],
                )
                .expect("an error reply");
                assert_eq!(e.code.to_native(), ErrorCode::Busy as u16);
                assert_eq!(ctx.counters.busy.get(), 1);
                assert_eq!(
                    ctx.counters.bytes_out.get(),
                    0,
                    "a refused read counted as sent"
                );
                drop((done, other));
                assert_eq!(ctx.budget.used(), 0);
            });
    }
}
