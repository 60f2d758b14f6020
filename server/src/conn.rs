//! One client connection, served start to finish on the shard that accepted
//! it, by one task: no task spawn per request.
//!
//! The loop reads with a large buffer, so one `recv` takes every frame the
//! kernel holds; requests that finish without I/O (PING, STAT, LIST, errors)
//! are answered inline; requests that wait on the device run as futures in a
//! per-connection `FuturesUnordered` polled by the same task, so a pipeline of
//! reads and writes proceeds concurrently (and writes share group commits).
//! Replies are queued and sent with one vectored `sendmsg` when no complete
//! request is left in the receive buffer; read payloads go from the DMA buffer
//! to the socket without a copy.
//!
//! Network input is validated before it touches state: header first (before
//! allocating anything for the frame), then the body (crc + bytecheck), then
//! the payload crc. A bad header whose own crc held is answered with a typed
//! error, then the connection closes (its lengths cannot be trusted to stay in
//! step); a bad body is answered and the stream carries on.

use crate::handler::{
    encode_error, encode_header_error, EncodedReply, ErrReply, Parsed, ReplyPayload, ShardCtx,
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
use tracing::debug;

/// Most requests a connection may have executing at once; past it the
/// connection is not read until replies drain (TCP backpressure).
pub const MAX_IN_FLIGHT: usize = 256;
/// Queued reply bytes that force a flush even while requests remain buffered.
const FLUSH_THRESHOLD: usize = 256 << 10;

type Pending = Pin<Box<dyn Future<Output = Completed>>>;

/// A reply ready to send: its header and body bytes and its payload.
struct Completed {
    frame: Vec<u8>,
    payload: ReplyPayload,
}

/// Replies queued for one vectored write. `frames` holds every header and
/// body; `parts` says how to interleave them with payloads.
#[derive(Default)]
struct Outbox {
    frames: Vec<u8>,
    parts: Vec<Part>,
}

enum Part {
    Frames { start: usize, end: usize },
    Payload(ReplyPayload),
}

impl Outbox {
    fn push(&mut self, frame: &[u8], payload: ReplyPayload) {
        let start = self.frames.len();
        self.frames.extend_from_slice(frame);
        self.push_frames_since(start);
        if payload.len() > 0 {
            self.parts.push(Part::Payload(payload));
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
    }

    /// Sends everything queued: vectored `sendmsg` with MSG_DONTWAIT while
    /// the socket takes it, and glommio's poll-armed write when it is full.
    async fn flush(&mut self, stream: &mut TcpStream) -> io::Result<()> {
        let slices = self.slices();
        let fd = stream.as_raw_fd();
        let mut idx = 0; // first slice not fully sent
        let mut off = 0; // bytes of slices[idx] already sent
        while idx < slices.len() {
            let iov: Vec<IoSlice<'_>> = std::iter::once(IoSlice::new(&slices[idx][off..]))
                .chain(slices[idx + 1..].iter().take(1023).map(|s| IoSlice::new(s)))
                .collect();
            let sent = match send_vectored(fd, &iov) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Socket buffer full: let glommio wait for writability.
                    stream.write(&slices[idx][off..]).await?
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
        drop(slices);
        self.clear();
        Ok(())
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

/// Why the read side stopped.
enum Stop {
    Eof,
    Close,
}

pub async fn serve_connection(ctx: Rc<ShardCtx>, stream: TcpStream, peer: SocketAddr) {
    let c = &ctx.counters;
    c.connections.set(c.connections.get() + 1);
    c.connections_total.set(c.connections_total.get() + 1);
    let result = connection_loop(&ctx, stream, peer).await;
    c.connections.set(c.connections.get() - 1);
    if let Err(e) = result {
        debug!(shard = ctx.id.0, %peer, error = %e, "connection ended with an error");
    }
}

async fn connection_loop(
    ctx: &Rc<ShardCtx>,
    stream: TcpStream,
    peer: SocketAddr,
) -> io::Result<()> {
    let mut reader = FrameReader::new(stream, ctx.node.max_payload);
    let mut out = Outbox::default();
    let mut pending: FuturesUnordered<Pending> = FuturesUnordered::new();
    let mut stop = None;
    loop {
        // Drain finished requests without waiting.
        while let Some(Some(done)) = futures_lite::future::poll_once(pending.next()).await {
            out.push(&done.frame, done.payload);
        }
        let have_frame = reader.buffered() >= HEADER_LEN;
        if !out.is_empty() && (!have_frame || out.bytes() >= FLUSH_THRESHOLD || stop.is_some()) {
            out.flush(reader.get_mut()).await?;
        }
        if stop.is_some() {
            if pending.is_empty() {
                if out.is_empty() {
                    break;
                }
                continue;
            }
            if let Some(done) = pending.next().await {
                out.push(&done.frame, done.payload);
            }
            continue;
        }
        if pending.len() >= MAX_IN_FLIGHT {
            if let Some(done) = pending.next().await {
                out.push(&done.frame, done.payload);
            }
            continue;
        }
        // Wait for the next request or for a pending one to finish.
        // `read_head` is cancel-safe: bytes it reads stay buffered.
        let head = if pending.is_empty() {
            reader.read_head().await
        } else {
            let next_head = async { Some(reader.read_head().await) };
            let next_done = async { pending.next().await.map(|d| (d.frame, d.payload)) };
            enum Ev {
                Head(Result<Option<RawFrameHead>, FrameError>),
                Done(Vec<u8>, ReplyPayload),
            }
            let ev = async { next_head.await.map(Ev::Head).expect("some") }
                .or(async {
                    match next_done.await {
                        Some((f, p)) => Ev::Done(f, p),
                        None => std::future::pending().await,
                    }
                })
                .await;
            match ev {
                Ev::Head(h) => h,
                Ev::Done(f, p) => {
                    out.push(&f, p);
                    continue;
                }
            }
        };
        match head {
            Ok(None) => stop = Some(Stop::Eof),
            Ok(Some(head)) => {
                if let Some(s) =
                    handle_frame(ctx, &mut reader, head, &mut out, &mut pending, peer).await?
                {
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
                    let start = out.frames.len();
                    encode_header_error(
                        &mut out.frames,
                        opcode,
                        id,
                        &ErrReply::new(err.code(), err.to_string()),
                    );
                    out.push_frames_since(start);
                }
                stop = Some(Stop::Close);
            }
            Err(FrameError::Truncated { got, want }) => {
                debug!(shard = ctx.id.0, %peer, got, want, "connection closed mid-frame");
                stop = Some(Stop::Close);
            }
            Err(FrameError::Io(e)) => return Err(e),
            Err(FrameError::Body(_)) => unreachable!("read_head does not read bodies"),
        }
    }
    if let Some(Stop::Close) = stop {
        debug!(shard = ctx.id.0, %peer, "closing connection after a protocol error");
    }
    reader.get_mut().close().await.ok();
    Ok(())
}

/// Reads the rest of one frame and starts (or finishes) its request.
/// Returns `Some(stop)` if the connection must stop reading.
async fn handle_frame(
    ctx: &Rc<ShardCtx>,
    reader: &mut FrameReader<TcpStream>,
    head: RawFrameHead,
    out: &mut Outbox,
    pending: &mut FuturesUnordered<Pending>,
    peer: SocketAddr,
) -> io::Result<Option<Stop>> {
    let op = head.opcode;
    let id = head.header.request_id;
    let payload_len = head.header.payload_len as usize;
    let fail = |out: &mut Outbox, e: ErrReply| {
        ctx.counters.error(op);
        let start = out.frames.len();
        encode_error(&mut out.frames, op, id, &e);
        out.push_frames_since(start);
    };
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
    ctx.counters.request(op);
    let body = match reader.read_body(&head).await {
        Ok(b) => b,
        Err(FrameError::Body(e)) => {
            ctx.counters
                .malformed_frames
                .set(ctx.counters.malformed_frames.get() + 1);
            debug!(shard = ctx.id.0, %peer, error = %e, "bad frame body");
            fail(out, ErrReply::new(ErrorCode::Malformed, e.to_string()));
            return skip(reader, payload_len).await;
        }
        Err(e) => return Ok(Some(frame_stop(ctx, peer, e)?)),
    };
    let req = match Parsed::decode(op, body) {
        Ok(r) => r,
        Err(e) => {
            ctx.counters
                .malformed_frames
                .set(ctx.counters.malformed_frames.get() + 1);
            debug!(shard = ctx.id.0, %peer, error = %e.message, "invalid body");
            fail(out, e);
            return skip(reader, payload_len).await;
        }
    };
    let owner = req.owner(ctx.node.shard_count, ctx.id);
    if owner != ctx.id {
        let body = body.to_vec();
        let mut payload = vec![0u8; payload_len];
        if let Err(e) = reader.read_payload(&mut payload).await {
            return Ok(Some(frame_stop(ctx, peer, e)?));
        }
        if let Parsed::Write(w) = &req {
            if let Err(e) = ctx.check_payload(w, &payload) {
                fail(out, e);
                return Ok(None);
            }
        }
        let ctx = ctx.clone();
        pending.push(Box::pin(async move {
            match ctx.forward(owner, op, id, body, payload).await {
                Ok(EncodedReply { frame, payload }) => Completed {
                    frame,
                    payload: ReplyPayload::Owned(payload),
                },
                Err(e) => {
                    ctx.counters.error(op);
                    let mut frame = Vec::new();
                    encode_error(&mut frame, op, id, &e);
                    Completed {
                        frame,
                        payload: ReplyPayload::None,
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
                        return skip(reader, payload_len).await;
                    }
                };
            // The payload goes from the socket buffer straight into the DMA
            // buffer that is written to disk.
            if let Err(e) = reader.read_payload(pw.payload_mut()).await {
                return Ok(Some(frame_stop(ctx, peer, e)?));
            }
            if let Err(e) = ctx.check_payload(&w, pw.payload_mut()) {
                fail(out, e);
                return Ok(None);
            }
            let ctx = ctx.clone();
            pending.push(Box::pin(async move {
                let mut frame = Vec::new();
                let payload = ctx
                    .execute(op, id, Parsed::Write(w), Some(pw), &mut frame)
                    .await;
                Completed { frame, payload }
            }));
        }
        Parsed::Read(_) | Parsed::Delete(_) => {
            let ctx = ctx.clone();
            pending.push(Box::pin(async move {
                let mut frame = Vec::new();
                let payload = ctx.execute(op, id, req, None, &mut frame).await;
                Completed { frame, payload }
            }));
        }
        Parsed::Ping | Parsed::Topology | Parsed::Stat(_) | Parsed::List(_) | Parsed::Stats => {
            // No device I/O: answer inline, straight into the outbox.
            let start = out.frames.len();
            let payload = ctx.execute(op, id, req, None, &mut out.frames).await;
            out.push_frames_since(start);
            debug_assert!(payload.len() == 0);
        }
    }
    Ok(None)
}

async fn skip(reader: &mut FrameReader<TcpStream>, n: usize) -> io::Result<Option<Stop>> {
    match reader.skip_payload(n).await {
        Ok(()) => Ok(None),
        Err(FrameError::Io(e)) => Err(e),
        Err(_) => Ok(Some(Stop::Close)),
    }
}

fn frame_stop(ctx: &ShardCtx, peer: SocketAddr, e: FrameError) -> io::Result<Stop> {
    match e {
        FrameError::Io(e) => Err(e),
        other => {
            debug!(shard = ctx.id.0, %peer, error = %other, "closing connection");
            Ok(Stop::Close)
        }
    }
}
