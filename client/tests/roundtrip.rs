//! Every call against the fake node, with direct routing and through the
//! front address.

mod fake;

use fake::Fake;
use shardstore_client::*;
use std::sync::atomic::Ordering::SeqCst;

fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}

#[tokio::test]
async fn every_call_round_trips() {
    assert_send_sync_clone::<Client>();
    let fake = Fake::start().await;
    let client = Client::connect(&fake.addr).await.unwrap();

    let t = client.topology();
    assert_eq!(t.shard_count, 1);
    assert_eq!(t.node_id, 0xfeed);
    assert_eq!(t.front_addr, fake.addr);
    assert_eq!(t.shard_addrs, vec![fake.addr.clone()]);
    assert_eq!(client.shard_of(ChunkId(12345)), ShardId(0));

    client.ping().await.unwrap();
    client.ping_shard(ShardId(0)).await.unwrap();
    assert!(matches!(
        client.ping_shard(ShardId(1)).await,
        Err(ClientError::InvalidArgument(_))
    ));

    let c = ChunkId(0xabc);
    let w = client.write(c, 0, b"hello world".to_vec()).await.unwrap();
    assert_eq!(
        w,
        WriteResult {
            version: 1,
            chunk_len: 11
        }
    );
    let w = client.write(c, 6, &b"shard"[..]).await.unwrap();
    assert_eq!(
        w,
        WriteResult {
            version: 2,
            chunk_len: 11
        }
    );

    let r = client.read(c, 0, 100).await.unwrap();
    assert_eq!(&r.data[..], b"hello shard");
    assert_eq!((r.version, r.chunk_len), (2, 11));
    let r = client.read(c, 6, 3).await.unwrap();
    assert_eq!(&r.data[..], b"sha");

    // A large payload goes out without being copied into the batch buffer.
    let big: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
    client.write(ChunkId(2), 0, big.clone()).await.unwrap();
    assert_eq!(client.read(ChunkId(2), 0, 1 << 20).await.unwrap().data, big);

    let s = client.stat(c).await.unwrap();
    assert_eq!((s.chunk_len, s.version, s.shard), (11, 2, ShardId(0)));

    let page = client.list(ShardId(0), None, 1).await.unwrap();
    assert_eq!(page.entries.len(), 1);
    assert_eq!(page.entries[0].chunk, ChunkId(2));
    assert!(page.more);
    let page = client
        .list(ShardId(0), Some(page.entries[0].chunk), 10)
        .await
        .unwrap();
    assert_eq!(
        page.entries,
        vec![ListEntry {
            chunk: c,
            chunk_len: 11,
            version: 2
        }]
    );
    assert!(!page.more);

    assert_eq!(client.delete(c).await.unwrap(), 2);
    assert!(matches!(client.stat(c).await, Err(ClientError::NotFound(id)) if id == c));

    // Direct routing: one connection to the front, one to shard 0's address.
    assert_eq!(fake.ctl.connections.load(SeqCst), 2);
}

#[tokio::test]
async fn front_routing_uses_one_connection() {
    let fake = Fake::start().await;
    let cfg = ClientConfig {
        route_direct: false,
        ..ClientConfig::default()
    };
    let client = Client::connect_with(&fake.addr, cfg).await.unwrap();
    client.write(ChunkId(1), 0, &b"x"[..]).await.unwrap();
    assert_eq!(&client.read(ChunkId(1), 0, 1).await.unwrap().data[..], b"x");
    client.ping().await.unwrap();
    assert_eq!(fake.ctl.connections.load(SeqCst), 1);
}

#[tokio::test]
async fn incompatible_topology_is_refused() {
    let fake = Fake::start().await;
    fake.ctl.route_fn.store(99, SeqCst);
    let err = Client::connect(&fake.addr).await.unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
}

#[tokio::test]
async fn connect_to_nothing_is_a_connect_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let err = Client::connect(&addr).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Connect { addr: ref a, .. } if *a == addr),
        "{err:?}"
    );
}
