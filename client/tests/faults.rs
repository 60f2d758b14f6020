//! Faults the client must turn into typed errors: damaged payloads, silence,
//! dropped connections, server error replies, arguments over the limits.

mod fake;

use fake::Fake;
use shardstore_client::*;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

#[tokio::test]
async fn damaged_read_payload_is_never_returned() {
    let fake = Fake::start().await;
    let client = Client::connect(&fake.addr).await.unwrap();
    client.write(ChunkId(5), 0, &b"precious"[..]).await.unwrap();
    fake.ctl.corrupt_read_crc.store(true, SeqCst);
    match client.read(ChunkId(5), 0, 8).await {
        Err(ClientError::ChecksumMismatch {
            chunk,
            expected,
            computed,
        }) => {
            assert_eq!(chunk, ChunkId(5));
            assert_eq!(expected ^ 1, computed);
        }
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn silence_is_a_timeout_and_the_connection_stays_usable() {
    let fake = Fake::start().await;
    let cfg = ClientConfig {
        request_timeout: Duration::from_millis(300),
        ..ClientConfig::default()
    };
    let client = Client::connect_with(&fake.addr, cfg).await.unwrap();
    fake.ctl.silent.store(true, SeqCst);
    match client.ping().await {
        Err(ClientError::Timeout { op, after }) => {
            assert_eq!(op, "ping");
            assert_eq!(after, Duration::from_millis(300));
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    fake.ctl.silent.store(false, SeqCst);
    client.ping().await.unwrap();
    assert_eq!(fake.ctl.connections.load(SeqCst), 1);
}

/// A server that stops reading: writes whose callers time out meanwhile
/// are never sent when it reads again (they used to stay queued, without
/// bound, and all reach the server late, after their callers were told they
/// timed out), and a config over the in-flight limit is a typed error.
#[tokio::test]
async fn writes_given_up_on_a_stalled_connection_are_never_sent() {
    let fake = Fake::start().await;
    let cfg = ClientConfig {
        request_timeout: Duration::from_millis(10),
        max_in_flight_per_connection: 2,
        ..ClientConfig::default()
    };
    let too_many = ClientConfig {
        max_in_flight_per_connection: usize::MAX,
        ..cfg.clone()
    };
    match Client::connect_with(&fake.addr, too_many).await {
        Err(ClientError::InvalidArgument(m)) => assert!(m.contains("max_in_flight"), "{m}"),
        other => panic!("expected InvalidArgument, got {:?}", other.err()),
    }
    let client = Client::connect_with(&fake.addr, cfg).await.unwrap();
    client.write(ChunkId(1), 0, &b"x"[..]).await.unwrap();
    let before = fake.ctl.requests.load(SeqCst);
    fake.ctl.paused.store(true, SeqCst);
    let payload = bytes::Bytes::from(vec![7u8; 1 << 20]);
    let tries = 150;
    for _ in 0..tries {
        // (The fake may still take the frame it was already waiting for.)
        match client.write(ChunkId(2), 0, payload.clone()).await {
            Ok(_) | Err(ClientError::Timeout { .. }) => {}
            Err(e) => panic!("expected Timeout, got {e:?}"),
        }
    }
    fake.ctl.paused.store(false, SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // What the sockets' buffers took before the stall was noticed, at most.
    let sent = fake.ctl.requests.load(SeqCst) - before;
    assert!(
        sent <= 40,
        "{sent} of {tries} given-up writes reached the server"
    );
    client.write(ChunkId(3), 0, &b"after"[..]).await.unwrap();
}

#[tokio::test]
async fn dropped_connection_is_reopened_and_reads_retried() {
    let fake = Fake::start().await;
    let client = Client::connect(&fake.addr).await.unwrap();
    client.write(ChunkId(9), 0, &b"data"[..]).await.unwrap();
    let conns = fake.ctl.connections.load(SeqCst);

    // A read is idempotent: retried once on a new connection, transparently.
    fake.ctl.drop_next.store(1, SeqCst);
    assert_eq!(
        &client.read(ChunkId(9), 0, 4).await.unwrap().data[..],
        b"data"
    );
    assert_eq!(fake.ctl.connections.load(SeqCst), conns + 1);

    // Two drops in a row exhaust the single retry.
    fake.ctl.drop_next.store(2, SeqCst);
    assert!(matches!(
        client.stat(ChunkId(9)).await,
        Err(ClientError::ConnectionClosed)
    ));

    // A write is not retried: the caller hears about the lost connection...
    fake.ctl.drop_next.store(1, SeqCst);
    assert!(matches!(
        client.write(ChunkId(9), 0, &b"DATA"[..]).await,
        Err(ClientError::ConnectionClosed)
    ));
    // ...and the next call reconnects.
    let w = client.write(ChunkId(9), 0, &b"DATA"[..]).await.unwrap();
    assert_eq!(w.version, 2, "the dropped write never reached the store");
    assert_eq!(fake.ctl.connections.load(SeqCst), conns + 4);
}

#[tokio::test]
async fn server_errors_are_typed() {
    let fake = Fake::start().await;
    let client = Client::connect(&fake.addr).await.unwrap();

    // NOT_FOUND with chunk 0 in the body names the requested chunk.
    match client.read(ChunkId(77), 0, 10).await {
        Err(ClientError::NotFound(c)) => assert_eq!(c, ChunkId(77)),
        other => panic!("expected NotFound, got {other:?}"),
    }

    fake.inject_error(3, ErrorCode::Corrupt as u16, 17, "sector crc mismatch");
    let err = client.read(ChunkId(3), 0, 4096).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Corrupt));
    match err {
        ClientError::Corrupt {
            chunk,
            sector,
            message,
        } => {
            assert_eq!((chunk, sector), (ChunkId(3), 17));
            assert_eq!(message, "sector crc mismatch");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }

    fake.inject_error(4, ErrorCode::ReadOnly as u16, 0, "fail-stop");
    match client.write(ChunkId(4), 0, &b"x"[..]).await.unwrap_err() {
        ClientError::Server {
            code,
            raw_code,
            chunk,
            ..
        } => {
            assert_eq!(code, Some(ErrorCode::ReadOnly));
            assert_eq!(raw_code, ErrorCode::ReadOnly as u16);
            assert_eq!(chunk, ChunkId(4));
        }
        other => panic!("expected Server, got {other:?}"),
    }

    // A code this client does not know is kept raw.
    fake.inject_error(5, 999, 0, "from the future");
    let err = client.delete(ChunkId(5)).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Server {
                code: None,
                raw_code: 999,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.code(), None);
    assert!(err.to_string().contains("code 999"));
}

#[tokio::test]
async fn limits_are_checked_before_sending() {
    let fake = Fake::start().await;
    fake.ctl.max_payload.store(1 << 20, SeqCst);
    let client = Client::connect(&fake.addr).await.unwrap();
    assert_eq!(client.topology().max_payload, 1 << 20);
    let requests = fake.ctl.requests.load(SeqCst);

    let invalid = |r: Result<_, ClientError>| matches!(r, Err(ClientError::InvalidArgument(_)));
    assert!(invalid(
        client.write(ChunkId(1), 0, Vec::new()).await.map(drop)
    ));
    assert!(invalid(
        client
            .write(ChunkId(1), 0, vec![0u8; (1 << 20) + 1])
            .await
            .map(drop)
    ));
    let max_chunk = client.topology().max_chunk_size;
    assert!(invalid(
        client
            .write(ChunkId(1), max_chunk - 1, vec![0u8; 2])
            .await
            .map(drop)
    ));
    assert!(invalid(
        client
            .write(ChunkId(1), u64::MAX, vec![0u8; 2])
            .await
            .map(drop)
    ));
    assert!(invalid(
        client.read(ChunkId(1), 0, (1 << 20) + 1).await.map(drop)
    ));
    assert!(invalid(client.list(ShardId(0), None, 257).await.map(drop)));
    assert!(invalid(client.list(ShardId(0), None, 0).await.map(drop)));
    assert!(invalid(client.list(ShardId(3), None, 1).await.map(drop)));
    assert_eq!(fake.ctl.requests.load(SeqCst), requests, "nothing was sent");

    // At the limits exactly, calls go through.
    client
        .write(ChunkId(1), max_chunk - 1, vec![7u8; 1])
        .await
        .unwrap();
    client.list(ShardId(0), None, 256).await.unwrap();
}

/// Counters are returned only from the shard asked (over rdma:// every
/// shard address reached shard 0, whose counters came back under the other
/// shards' names).
#[tokio::test]
async fn stats_from_another_shard_are_refused() {
    let fake = Fake::start().await;
    let client = Client::connect(&fake.addr).await.unwrap();
    assert_eq!(client.stats(ShardId(0)).await.unwrap().shard, 0);
    fake.ctl.stats_shard.store(3, SeqCst);
    match client.stats(ShardId(0)).await {
        Err(ClientError::Protocol(m)) => assert!(m.contains("shard 3 answered"), "{m}"),
        other => panic!("expected Protocol, got {other:?}"),
    }
}

/// A READ reply shorter than the chunk allows (a server bug or a damaged
/// frame with a consistent crc) is a Protocol error, not silently short data.
#[tokio::test]
async fn a_short_read_inside_the_chunk_is_refused() {
    let fake = Fake::start().await;
    let client = Client::connect(&fake.addr).await.unwrap();
    client.write(ChunkId(6), 0, vec![9u8; 100]).await.unwrap();
    assert_eq!(
        client.read(ChunkId(6), 90, 50).await.unwrap().data.len(),
        10
    );
    fake.ctl.short_read.store(true, SeqCst);
    match client.read(ChunkId(6), 10, 50).await {
        Err(ClientError::Protocol(m)) => assert!(m.contains("expected 50"), "{m}"),
        other => panic!("expected Protocol, got {other:?}"),
    }
}
