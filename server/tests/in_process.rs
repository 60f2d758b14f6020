//! The request path in one process, on a simulated disk: the connection
//! loop over an in-memory stream, and the server of forwarded requests.

mod common;
use common::write_frame;
use glommio::{LocalExecutorBuilder, Placement};
use shardstore_proto::{
    encode_frame, limits, ChunkId, ErrorCode, FrameHeader, Opcode, ShardId, WriteRequest,
    HEADER_LEN,
};
use shardstore_server::budget::Reservation;
use shardstore_server::conn::connection_loop;
use shardstore_server::conn_limits::ConnLimits;
use shardstore_server::handler::{Forwarded, NodeInfo, ShardCtx};
use shardstore_server::mem_stream::MemStream;
use shardstore_shard::{Shard, ShardConfig, SimDisk};
use std::rc::Rc;

/// Reply headers in `bytes`, in order.
fn reply_headers(mut bytes: &[u8]) -> Vec<FrameHeader> {
    let mut out = Vec::new();
    while bytes.len() >= HEADER_LEN {
        let (h, _) =
            FrameHeader::decode(bytes[..HEADER_LEN].try_into().unwrap(), limits::MAX_PAYLOAD)
                .expect("a reply header");
        let len = HEADER_LEN + h.rest_len();
        out.push(h);
        bytes = &bytes[len..];
    }
    out
}

fn on_executor(f: impl std::future::Future<Output = ()>) {
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(512 << 10)
        .make()
        .unwrap()
        .run(f);
}

/// `input`, then a PING with request id `id`.
fn with_ping(mut input: Vec<u8>, id: u64) -> Vec<u8> {
    encode_frame(
        Opcode::Ping,
        0,
        id,
        &shardstore_proto::Empty {},
        0,
        &mut input,
    );
    input
}

/// A one-shard context on a fresh simulated disk.
async fn sim_ctx() -> Rc<ShardCtx> {
    sim_ctx_on().await.0
}

/// [`sim_ctx`], and its disk.
async fn sim_ctx_on() -> (Rc<ShardCtx>, SimDisk) {
    let cfg = ShardConfig {
        shard: ShardId(0),
        shard_count: 1,
        node_id: 1,
        capacity_bytes: 2 << 20,
        ..ShardConfig::default()
    };
    let disk = SimDisk::new(3 << 20, 1);
    let shard = Shard::open_sim(cfg, &disk).await.unwrap();
    let node = NodeInfo::single_shard(256 << 10, ConnLimits::default());
    (
        Rc::new(ShardCtx::new(shard, ShardId(0), node, Vec::new())),
        disk,
    )
}

/// STATS `busy` counts what the buffer budget refused, `forward_busy` what
/// a full forward queue refused: `shardstore stats` shows them side by
/// side, and `busy` used to hold both (a forward BUSY was counted twice by
/// anyone adding the columns).
#[test]
fn stats_busy_and_forward_busy_do_not_overlap() {
    on_executor(async {
        let ctx = sim_ctx().await;
        ctx.counters.busy.set(3);
        ctx.counters.forward_busy.set(2);
        let st = ctx.stats();
        assert_eq!((st.busy, st.forward_busy), (3, 2));
    });
}

/// A connection whose replies cannot be sent (the client reset it) ends
/// only once the requests it started have: they run as their own tasks, and
/// returning at once let a client that resets connections in a loop leave
/// any number of them running (DELETEs and reads of missing chunks hold no
/// budget), bounded by neither the connection limit nor `max_in_flight`.
#[test]
fn a_connection_whose_sends_fail_ends_after_its_requests() {
    on_executor(async {
        let (ctx, disk) = sim_ctx_on().await;
        for c in 0..8u128 {
            ctx.shard
                .write(ChunkId(60 + c), 0, &[1u8; 4096])
                .await
                .unwrap();
        }
        let mut input = Vec::new();
        for c in 0..8u64 {
            let d = shardstore_proto::ChunkRequest {
                chunk: 60 + u128::from(c),
            };
            encode_frame(Opcode::Delete, 0, c, &d, 0, &mut input);
        }
        let (stream, _written) = MemStream::new(with_ping(input, 9));
        // The deletes wait on the device; the PING's reply fails to send.
        disk.hold_writes(true);
        let ended = Rc::new(std::cell::Cell::new(None));
        let conn = glommio::spawn_local({
            let (ctx, ended) = (ctx.clone(), ended.clone());
            async move {
                let res =
                    connection_loop(&ctx, stream.failing_sends(), "127.0.0.1:9".parse().unwrap())
                        .await;
                ended.set(Some(ctx.conns.requests_running()));
                res
            }
        });
        glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            ctx.conns.requests_running() > 0,
            "the deletes are not running"
        );
        assert_eq!(
            ended.get(),
            None,
            "the connection ended with its requests still running"
        );
        disk.hold_writes(false);
        let res = conn.await;
        assert!(res.is_err(), "the send failure is the connection's result");
        assert_eq!(ended.get(), Some(0));
    });
}

/// A client that stopped reading its replies leaves its connection's task
/// waiting to send. A write it sent before goes on regardless and lets go
/// of its chunk: it used to be polled only by that task, so it kept the
/// chunk's lock (and a write slot) until the write timeout cut the client
/// off, and every other client's write of that chunk waited as long.
#[test]
fn a_write_of_a_client_that_stopped_reading_lets_go_of_its_chunk() {
    on_executor(async {
        let (ctx, disk) = sim_ctx_on().await;
        let data = vec![3u8; 4096];
        let input = write_frame(1, 77, &data, crc32c::crc32c(&data));
        let (stream, _written) = MemStream::new(with_ping(input, 2));
        // The write starts and waits on the device; the PING's reply is
        // then sent, and that send never ends.
        disk.hold_writes(true);
        let conn = glommio::spawn_local({
            let ctx = ctx.clone();
            async move {
                let _ = connection_loop(
                    &ctx,
                    stream.stalling_sends(),
                    "127.0.0.1:9".parse().unwrap(),
                )
                .await;
            }
        })
        .detach();
        glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
        disk.hold_writes(false);
        let other = glommio::timer::timeout(std::time::Duration::from_secs(2), async {
            Ok(ctx.shard.write(ChunkId(77), 0, &[4u8; 4096]).await)
        })
        .await;
        let other = other.expect("another write of the chunk waited for the stalled connection");
        other.unwrap();
        let r = ctx.shard.read(ChunkId(77), 0, 4096).await.unwrap();
        assert_eq!(r.data.to_vec(), vec![4u8; 4096], "the later write's bytes");
        conn.cancel();
    });
}

/// The read side fails after the client's requests (what a TLS
/// connection's reads give once a graceful stop has shut them down: an end
/// of stream without close_notify). Requests already read still run and
/// are answered, and so is a refused one whose payload was being skipped;
/// they were dropped unanswered.
#[test]
fn requests_read_before_a_read_error_are_answered() {
    on_executor(async {
        let ctx = sim_ctx().await;
        // Eight pipelined writes, then the read side fails.
        let mut input = Vec::new();
        for id in 0..8u64 {
            let data = vec![id as u8 + 1; 5000];
            let w = WriteRequest {
                chunk: 40 + u128::from(id),
                offset: 0,
                payload_crc: crc32c::crc32c(&data),
                flags: 0,
            };
            encode_frame(Opcode::Write, 0, id, &w, data.len() as u32, &mut input);
            input.extend_from_slice(&data);
        }
        // A ninth, refused (an undefined flag): its payload is skipped, and
        // the read fails partway through it.
        let w = WriteRequest {
            chunk: 48,
            offset: 0,
            payload_crc: 0,
            flags: 1,
        };
        encode_frame(Opcode::Write, 0, 8, &w, 5000, &mut input);
        input.extend_from_slice(&[0u8; 100]);
        let (stream, written) = MemStream::new(input);
        let stream = stream.failing_at_end();
        let res = connection_loop(&ctx, stream, "127.0.0.1:9".parse().unwrap()).await;
        assert!(res.is_ok(), "{res:?}");
        let replies = reply_headers(&written.borrow());
        let mut ids: Vec<u64> = replies.iter().map(|h| h.request_id).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..9).collect::<Vec<_>>(), "every write answered");
        for h in &replies {
            assert_eq!(h.is_error(), h.request_id == 8, "only the ninth is refused");
        }
        for id in 0..8u64 {
            let r = ctx
                .shard
                .read(ChunkId(40 + u128::from(id)), 0, 5000)
                .await
                .unwrap();
            assert_eq!(r.data.to_vec(), vec![id as u8 + 1; 5000]);
        }
    });
}

/// A request forwarded from another shard whose connection is gone by the
/// time it is taken off the queue (its reply channel is closed), or whose
/// sender stopped waiting (past its deadline: the client got TIMEOUT), is
/// not executed; one still awaited is.
#[test]
fn forwarded_requests_of_closed_connections_are_skipped() {
    on_executor(async {
        let ctx = sim_ctx().await;
        let (tx, rx) = flume::bounded(4);
        glommio::spawn_local(ctx.clone().serve_forwarded(rx)).detach();
        let in_a_minute = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let forward = |chunk: u128, deadline: std::time::Instant| {
            let data = vec![7u8; 3000];
            let w = WriteRequest {
                chunk,
                offset: 0,
                payload_crc: crc32c::crc32c(&data),
                flags: 0,
            };
            let mut frame = Vec::new();
            encode_frame(Opcode::Write, 0, 1, &w, 0, &mut frame);
            let (h, _) =
                FrameHeader::decode(frame[..HEADER_LEN].try_into().unwrap(), limits::MAX_PAYLOAD)
                    .unwrap();
            let body = frame[HEADER_LEN..HEADER_LEN + h.body_len as usize].to_vec();
            let (reply, replies) = flume::bounded(1);
            let msg = Forwarded {
                opcode: Opcode::Write,
                request_id: 1,
                body,
                payload: data,
                reply,
                deadline,
                release: flume::bounded(1).0,
                count: shardstore_server::handler::Count::BySender,
            };
            (msg, replies)
        };
        let (gone, replies) = forward(50, in_a_minute);
        drop(replies);
        tx.send_async(gone).await.unwrap();
        let (late, late_replies) = forward(52, std::time::Instant::now());
        tx.send_async(late).await.unwrap();
        let (kept, replies) = forward(51, in_a_minute);
        tx.send_async(kept).await.unwrap();
        let reply = replies.recv_async().await.unwrap();
        let (h, _) = FrameHeader::decode(
            reply.frame[..HEADER_LEN].try_into().unwrap(),
            limits::MAX_PAYLOAD,
        )
        .unwrap();
        assert!(!h.is_error());
        assert!(ctx.shard.stat(ChunkId(51)).is_ok(), "the awaited write ran");
        assert!(
            ctx.shard.stat(ChunkId(50)).is_err(),
            "the abandoned write ran"
        );
        assert!(ctx.shard.stat(ChunkId(52)).is_err(), "the late write ran");
        assert!(
            late_replies.recv_async().await.is_err(),
            "the late write was answered"
        );
    });
}

/// A request forwarded to a shard that never answers ends with TIMEOUT
/// after `forward_timeout` (invariant 6: time waiting for a peer is
/// bounded); it waited for good.
#[test]
fn a_forwarded_request_the_owner_never_answers_times_out() {
    on_executor(async {
        let cfg = ShardConfig {
            capacity_bytes: 2 << 20,
            ..ShardConfig::default()
        };
        let disk = SimDisk::new(3 << 20, 1);
        let shard = Shard::open_sim(cfg, &disk).await.unwrap();
        let limits = ConnLimits {
            forward_timeout: std::time::Duration::from_millis(100),
            ..ConnLimits::default()
        };
        let mut node = NodeInfo::single_shard(256 << 10, limits);
        node.shard_count = 2;
        // Shard 1's queue: kept open, never served.
        let (to_self, _) = flume::bounded::<Forwarded>(4);
        let (to_owner, owner_rx) = flume::bounded::<Forwarded>(4);
        let ctx = ShardCtx::new(shard, ShardId(0), node, vec![to_self, to_owner]);
        let started = std::time::Instant::now();
        let held = Rc::new(std::cell::Cell::new(0));
        let hold = Reservation::try_new(&ctx.budget, &held, 5000);
        let (r, back) = ctx
            .forward(ShardId(1), Opcode::Ping, 7, Vec::new(), Vec::new(), hold)
            .await;
        let e = r.err().expect("no answer: an error");
        assert_eq!(e.code, ErrorCode::Timeout, "{}", e.message);
        assert!(started.elapsed() >= std::time::Duration::from_millis(100));
        assert_eq!(ctx.stats().forward_timeouts, 1, "counted in STATS");
        // The request (and its payload) is still in the owner's queue: its
        // share of the budget stays taken until the owner lets go of it.
        assert!(back.is_none());
        glommio::timer::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(ctx.budget.used(), 5000, "given back while still queued");
        // The owner takes it off its queue past its deadline and drops it.
        drop(owner_rx.recv_async().await.unwrap());
        glommio::timer::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(ctx.budget.used(), 0, "kept after the owner let go");
    });
}

/// A forwarded request its owner dropped unexecuted because it was past its
/// deadline is a TIMEOUT for the sender, whose own timer may not have fired
/// yet (it was INTERNAL, "dropped a forwarded request"); dropped before its
/// deadline (the owner stopping), it is INTERNAL.
#[test]
fn a_forward_dropped_past_its_deadline_is_a_timeout() {
    use shardstore_server::handler::{await_shard_reply, EncodedReply};
    use std::time::{Duration, Instant};
    on_executor(async {
        let after = Duration::from_millis(50);
        let (tx, rx) = flume::bounded::<EncodedReply>(1);
        let deadline = Instant::now() + after;
        glommio::timer::sleep(after).await;
        drop(tx);
        let e = await_shard_reply(ShardId(1), rx, deadline, after)
            .await
            .err()
            .unwrap();
        assert_eq!(e.code, ErrorCode::Timeout, "{}", e.message);
        let (tx, rx) = flume::bounded::<EncodedReply>(1);
        drop(tx);
        let e = await_shard_reply(ShardId(1), rx, Instant::now() + after, after)
            .await
            .err()
            .unwrap();
        assert_eq!(e.code, ErrorCode::Internal, "{}", e.message);
    });
}
