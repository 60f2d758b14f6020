//! A client that only talks to the front address still reaches every shard:
//! the shard that receives a request it does not own forwards it.

mod common;
use common::*;
use shardstore_client::ClientConfig;
use shardstore_proto::{route, ChunkId, ShardId};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_only_client_reaches_every_shard() {
    let dir = data_dir("fwd");
    let srv = TestServer::start(&dir, 3);
    let front = srv
        .client_with(ClientConfig {
            route_direct: false,
            ..ClientConfig::default()
        })
        .await;
    let ids: Vec<ChunkId> = (0..60u128)
        .map(|i| ChunkId(i * 0x1_0000_0001 + 5))
        .collect();
    let mut per_shard = [0; 3];
    for id in &ids {
        per_shard[route(*id, 3).0 as usize] += 1;
        front
            .write(*id, 100, pattern(id.0 as u64, 5000))
            .await
            .unwrap();
    }
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "test ids cover every shard: {per_shard:?}"
    );
    for id in &ids {
        let r = front.read(*id, 100, 5000).await.unwrap();
        assert_eq!(&r.data[..], &pattern(id.0 as u64, 5000)[..]);
        assert_eq!(front.stat(*id).await.unwrap().shard, route(*id, 3));
    }
    // A direct client sees the same data at the owners.
    let direct = srv.client().await;
    for id in &ids {
        assert_eq!(direct.read(*id, 100, 5000).await.unwrap().data.len(), 5000);
    }
    // LIST of any shard through the front works.
    for s in 0..3 {
        let page = front.list(ShardId(s), None, 256).await.unwrap();
        assert_eq!(page.entries.len(), per_shard[s as usize]);
    }
    // Forwarded requests were counted on both sides (read after all traffic).
    let mut fwd_out = 0;
    let mut fwd_in = 0;
    for s in 0..3 {
        let st = direct.stats(ShardId(s)).await.unwrap();
        fwd_out += st.forwarded_out;
        fwd_in += st.forwarded_in;
    }
    assert_eq!(fwd_out, fwd_in);
    // Every front connection lands on one shard; requests for the other two
    // shards' chunks (about 2/3 of 3 x 60 requests) must have been forwarded.
    assert!(fwd_out >= 60, "forwarded {fwd_out}");
}
