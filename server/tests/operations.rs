//! Every operation through the client against a live 2-shard server.

mod common;
use common::*;
use shardstore_client::ClientError;
use shardstore_proto::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_operations_round_trip() {
    let dir = data_dir("ops");
    let srv = TestServer::start(&dir, 2);
    let c = srv.client().await;

    let t = c.topology();
    assert_eq!(t.shard_count, 2);
    assert_eq!(t.shard_addrs.len(), 2);
    assert!(c.ping().await.is_ok());
    for s in 0..2 {
        c.ping_shard(ShardId(s)).await.unwrap();
    }

    // Write, read back, stat.
    let a = ChunkId(0xa);
    let data = pattern(1, 10_000);
    let w = c.write(a, 0, data.clone()).await.unwrap();
    assert_eq!((w.version, w.chunk_len), (1, 10_000));
    let r = c.read(a, 0, 10_000).await.unwrap();
    assert_eq!(&r.data[..], &data[..]);
    assert_eq!(r.version, 1);

    // Unaligned overwrite in the middle: read-modify-write of partial sectors.
    let patch = pattern(2, 5000);
    let w = c.write(a, 3000, patch.clone()).await.unwrap();
    assert_eq!((w.version, w.chunk_len), (2, 10_000));
    let mut model = data.clone();
    model[3000..8000].copy_from_slice(&patch);
    let r = c.read(a, 0, 20_000).await.unwrap();
    assert_eq!(
        &r.data[..],
        &model[..],
        "short read ends at the chunk length"
    );
    assert_eq!(r.chunk_len, 10_000);

    // A write past the end leaves a hole that reads as zeros.
    c.write(a, 50_000, vec![7u8; 100]).await.unwrap();
    let r = c.read(a, 9_000, 41_100).await.unwrap();
    assert_eq!(&r.data[..1000], &model[9000..]);
    assert!(r.data[1000..41_000].iter().all(|&b| b == 0));
    assert_eq!(&r.data[41_000..], &[7u8; 100][..]);
    // Reading at or past the end returns nothing, not an error.
    assert_eq!(c.read(a, 50_100, 10).await.unwrap().data.len(), 0);
    assert_eq!(c.read(a, 1 << 20, 10).await.unwrap().data.len(), 0);

    let s = c.stat(a).await.unwrap();
    assert_eq!((s.chunk_len, s.version), (50_100, 3));
    assert_eq!(s.shard, route(a, 2));
    assert!(s.modified_ns >= s.created_ns && s.created_ns > 0);

    // Missing chunks are NOT_FOUND for every operation.
    let missing = ChunkId(0xdead);
    assert!(
        matches!(c.read(missing, 0, 10).await, Err(ClientError::NotFound(id)) if id == missing)
    );
    assert!(matches!(
        c.stat(missing).await,
        Err(ClientError::NotFound(_))
    ));
    assert!(matches!(
        c.delete(missing).await,
        Err(ClientError::NotFound(_))
    ));

    // LIST pages through each shard in id order and finds every chunk once.
    let mut ids: Vec<ChunkId> = (1..=40u128).map(|i| ChunkId(i << 64 | i)).collect();
    for id in &ids {
        c.write(*id, 0, pattern(id.0 as u64, 100)).await.unwrap();
    }
    ids.push(a);
    let mut listed = Vec::new();
    for s in 0..2 {
        let mut after = None;
        loop {
            let page = c.list(ShardId(s), after, 7).await.unwrap();
            assert!(page.entries.len() <= 7);
            for e in &page.entries {
                assert_eq!(route(e.chunk, 2).0, s, "listed on the wrong shard");
                listed.push(e.chunk);
            }
            if !page.more {
                break;
            }
            after = page.entries.last().map(|e| e.chunk);
        }
    }
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);

    // DELETE removes the chunk and returns its last version.
    assert_eq!(c.delete(a).await.unwrap(), 3);
    assert!(matches!(
        c.read(a, 0, 1).await,
        Err(ClientError::NotFound(_))
    ));
    // A new write after delete starts over at version 1.
    assert_eq!(c.write(a, 0, vec![1u8; 10]).await.unwrap().version, 1);

    // Limits: the client refuses before sending; the server refuses too.
    let too_big = vec![0u8; limits::MAX_PAYLOAD as usize + 1];
    assert!(matches!(
        c.write(a, 0, too_big).await,
        Err(ClientError::InvalidArgument(_))
    ));
    assert!(matches!(
        c.write(a, limits::MAX_CHUNK_SIZE - 10, vec![0u8; 20]).await,
        Err(ClientError::InvalidArgument(_))
    ));

    // A large (max payload) write and read round trip.
    let big = pattern(9, limits::MAX_PAYLOAD as usize);
    c.write(ChunkId(0xb16), 4096, big.clone()).await.unwrap();
    let r = c
        .read(ChunkId(0xb16), 4096, limits::MAX_PAYLOAD)
        .await
        .unwrap();
    assert!(r.data[..] == big[..]);
    drop(srv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_enforces_its_configured_limits() {
    let dir = data_dir("limits");
    let srv = TestServer::try_start(
        &dir,
        1,
        &["--max-payload", "65536", "--max-chunk-size", "1048576"],
    )
    .unwrap();
    let c = srv.client().await;
    assert_eq!(c.topology().max_payload, 65536);
    // The client learned the limits from TOPOLOGY and refuses locally.
    assert!(matches!(
        c.write(ChunkId(1), 0, vec![0u8; 65537]).await,
        Err(ClientError::InvalidArgument(_))
    ));
    // A peer that ignores them is refused by the server with typed errors.
    let e = raw_request(&srv.addr, Opcode::Read, |f| {
        encode_frame(
            Opcode::Read,
            0,
            1,
            &ReadRequest {
                chunk: 1,
                offset: 0,
                len: 1 << 20,
                flags: 0,
            },
            0,
            f,
        )
    })
    .await;
    assert_eq!(e, Some(ErrorCode::TooLarge));
    c.write(ChunkId(1), 1_048_576 - 10, vec![1u8; 10])
        .await
        .unwrap();
    let data = [1u8; 20];
    let e = raw_request(&srv.addr, Opcode::Write, |f| {
        let w = WriteRequest {
            chunk: 1,
            offset: 1_048_576 - 10,
            payload_crc: payload_crc(&data),
            flags: 0,
        };
        encode_frame(Opcode::Write, 0, 1, &w, 20, f);
        f.extend_from_slice(&data);
    })
    .await;
    assert_eq!(e, Some(ErrorCode::TooLarge));
}

/// Sends one frame without the client's checks; returns the error code, if any.
async fn raw_request(
    addr: &str,
    op: Opcode,
    build: impl FnOnce(&mut Vec<u8>),
) -> Option<ErrorCode> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut f = Vec::new();
    build(&mut f);
    s.write_all(&f).await.unwrap();
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).await.unwrap();
    let (h, got) = FrameHeader::decode(&h, limits::MAX_PAYLOAD).unwrap();
    assert_eq!(got, op);
    let mut body = vec![0u8; h.body_len as usize];
    s.read_exact(&mut body).await.unwrap();
    if h.is_error() {
        let e = access_body::<ArchivedErrorBody>(&body).unwrap();
        ErrorCode::from_u16(e.code.to_native())
    } else {
        None
    }
}

/// `--checkpoint-mib` reaches the shards: with 1 MiB, 4 MiB of writes start
/// three checkpoints or more at once, where the default (256 MiB) would
/// start at most one in 9 s (the 5 s interval timer, counted from open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_mib_sets_the_checkpoint_size() {
    let dir = data_dir("ckpt-size");
    let srv = TestServer::try_start(&dir, 1, &["--checkpoint-mib", "1"]).unwrap();
    let started = std::time::Instant::now();
    let c = srv.client().await;
    let before = c.stats(ShardId(0)).await.unwrap().checkpoints;
    for i in 0..16u64 {
        c.write(ChunkId(0x5000 + u128::from(i)), 0, pattern(i, 256 << 10))
            .await
            .unwrap();
    }
    loop {
        let now = c.stats(ShardId(0)).await.unwrap().checkpoints;
        if now >= before + 3 {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(9),
            "{} checkpoints after 4 MiB of writes with checkpoint_mib = 1",
            now - before
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A server whose shard threads poll when idle (`--poll-us`) serves
/// durable writes and reads like one that sleeps (the write yielder runs
/// while the writes are in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polling_server_serves_writes_and_reads() {
    let dir = data_dir("poll-us");
    let srv = TestServer::try_start(&dir, 1, &["--poll-us", "200"]).unwrap();
    let c = srv.client().await;
    for i in 0..64u64 {
        c.write(ChunkId(0x7000 + u128::from(i)), 0, pattern(i, 4096))
            .await
            .unwrap();
    }
    for i in 0..64u64 {
        let got = c
            .read(ChunkId(0x7000 + u128::from(i)), 0, 4096)
            .await
            .unwrap();
        assert_eq!(&got.data[..], &pattern(i, 4096)[..], "chunk {i}");
    }
}

/// Deleted chunks' tombstones are retired in the background (a sweep after
/// each scrub pass): STATS shows them held, then retired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_are_retired_in_the_background() {
    let dir = data_dir("sweep");
    let srv = TestServer::try_start(&dir, 1, &["--scrub-period-secs", "1"]).unwrap();
    let c = srv.client().await;
    for i in 0..20u128 {
        c.write(ChunkId(0x7000 + i), 0, pattern(i as u64, 8192))
            .await
            .unwrap();
    }
    for i in 0..20u128 {
        c.delete(ChunkId(0x7000 + i)).await.unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let s = c.stats(ShardId(0)).await.unwrap();
        if s.tombstones_retired >= 20 && s.tombstones == 0 {
            assert!(s.sweep_passes >= 1 && s.sweep_erased >= 20, "{s:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tombstones not retired: {} held, {} retired, {} passes",
            s.tombstones,
            s.tombstones_retired,
            s.sweep_passes
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for i in 0..20u128 {
        assert!(matches!(
            c.read(ChunkId(0x7000 + i), 0, 10).await,
            Err(ClientError::NotFound(_))
        ));
    }
}

/// Concurrent durable writes queued behind the device go out combined, and
/// STATS says how many rode in another write's device write: each write is
/// one extent, carried by a device write of its own or by another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_writes_are_counted() {
    let dir = data_dir("combined");
    let srv = TestServer::try_start(&dir, 1, &["--write-combine", "1"]).unwrap();
    let c = srv.client().await;
    let before = c.stats(ShardId(0)).await.unwrap();
    let writes = 64u64;
    let tasks: Vec<_> = (0..writes)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.write(ChunkId(i as u128), 0, pattern(i, 4096)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let after = c.stats(ShardId(0)).await.unwrap();
    let combined = after.combined_writes - before.combined_writes;
    let device = after.device_writes - before.device_writes;
    assert_eq!(device + combined, writes, "{device} device writes");
    assert!(
        combined > 0,
        "64 writes at once, one device write in flight"
    );
    for i in 0..writes {
        let r = c.read(ChunkId(i as u128), 0, 4096).await.unwrap();
        assert_eq!(&r.data[..], &pattern(i, 4096)[..]);
    }
}

/// TOPOLOGY shows a public id derived from the node's id, never the id
/// itself: that seeds the checks of the extent headers on disk, and a
/// client that knew it could write payloads that recovery would take for
/// extents of other chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_shows_a_public_node_id_not_the_node_id() {
    let dir = data_dir("publicid");
    let srv = TestServer::start(&dir, 1);
    let text = std::fs::read_to_string(dir.join("shardstore.node")).unwrap();
    let id = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("node_id"))
        .and_then(|v| u128::from_str_radix(v.trim_start_matches([' ', '=']).trim(), 16).ok())
        .expect("node_id in shardstore.node");
    let shown = srv.client().await.topology().node_id;
    assert_ne!(shown, id, "the node id itself is sent to clients");
    assert_eq!(shown, public_node_id(id));
    srv.kill();
}
