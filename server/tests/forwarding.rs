//! A client that only talks to the front address still reaches every shard:
//! the shard that receives a request it does not own forwards it.

mod common;
use common::*;
use shardstore_client::ClientConfig;
use shardstore_proto::{route, ChunkId, Opcode, ShardId};

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
    // Chunks that do not exist, read through the front: NOT_FOUND from
    // their owners.
    let missing: Vec<ChunkId> = (0..30u128).map(|i| ChunkId(0xdead_0000 + i)).collect();
    for id in &missing {
        assert!(front.read(*id, 0, 10).await.is_err());
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
    // Each request counted once across the shards (on the shard whose
    // connection took it), and each error reply once.
    let (mut requests, mut errors) = (vec![0; 32], vec![0; 32]);
    for s in 0..3 {
        let st = direct.stats(ShardId(s)).await.unwrap();
        for (op, (r, e)) in st.requests.iter().zip(&st.errors).enumerate() {
            requests[op] += r;
            errors[op] += e;
        }
    }
    let (write, read, stat) = (
        Opcode::Write as usize,
        Opcode::Read as usize,
        Opcode::Stat as usize,
    );
    assert_eq!(requests[write], 60, "writes counted");
    assert_eq!(
        requests[read],
        60 + 30 + 60,
        "reads counted (front, missing, direct)"
    );
    assert_eq!(requests[stat], 60, "stats counted");
    assert_eq!(errors[read], 30, "NOT_FOUND replies counted");
    assert_eq!(errors[write] + errors[stat], 0);
    // Every front connection lands on one shard; requests for the other two
    // shards' chunks (about 2/3 of 3 x 60 requests) must have been forwarded.
    assert!(fwd_out >= 60, "forwarded {fwd_out}");
}

/// Two consecutive chunk ids owned by different shards: a stream over the
/// first, marked as going on into the next id, makes the OTHER shard read
/// the second chunk's start ahead (it arrives there as a stream hint), so
/// the reader's first READ of it is served from that shard's cache. The
/// same walk unmarked reads nothing of the next chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marked_stream_reads_ahead_into_the_next_chunk_on_another_shard() {
    let dir = data_dir("fwd-stream");
    let srv = TestServer::try_start(&dir, 2, &["--cache-mib", "64"]).unwrap();
    let client = srv.client().await;
    // Two pairs (a, a + 1) split across the shards, a's owner the same.
    let pairs: Vec<u128> = (1000u128..)
        .filter(|a| route(ChunkId(*a), 2) == ShardId(0) && route(ChunkId(a + 1), 2) == ShardId(1))
        .take(2)
        .collect();
    let len = 2usize << 20;
    for a in &pairs {
        for id in [*a, a + 1] {
            client
                .write(ChunkId(id), 0, pattern(id as u64, len))
                .await
                .unwrap();
        }
    }
    let next_shard = |c: &shardstore_client::Client| {
        let c = c.clone();
        async move { c.stats(ShardId(1)).await.unwrap() }
    };
    let step = 256u32 << 10;
    for (a, marked) in [(pairs[0], false), (pairs[1], true)] {
        let before = next_shard(&client).await;
        let opts = shardstore_client::ReadOptions {
            continues_into_next_chunk: marked,
        };
        for off in (0..len as u64).step_by(step as usize) {
            let r = client.read_with(ChunkId(a), off, step, opts).await.unwrap();
            assert_eq!(r.data.len(), step as usize);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mid = next_shard(&client).await;
        let r = client.read(ChunkId(a + 1), 0, step).await.unwrap();
        assert_eq!(&r.data[..], &pattern((a + 1) as u64, len)[..step as usize]);
        let after = next_shard(&client).await;
        let issued = mid.prefetch_issued - before.prefetch_issued;
        let cached = after.cached_reads - mid.cached_reads;
        println!("marked {marked}: next chunk's shard read ahead {issued} sectors; first read cached: {cached}");
        if marked {
            assert!(issued > 0, "no read-ahead on the next chunk's shard");
            assert_eq!(cached, 1, "the next chunk's first read was not a cache hit");
        } else {
            assert_eq!(issued, 0);
            assert_eq!(cached, 0);
        }
    }
    // The hints went from shard 0 to shard 1, and STATS counted them.
    let (from, to) = (
        client.stats(ShardId(0)).await.unwrap(),
        client.stats(ShardId(1)).await.unwrap(),
    );
    println!(
        "hints: shard 0 sent {} (dropped {}), shard 1 received {}",
        from.stream_hints_out, from.stream_hints_dropped, to.stream_hints_in
    );
    assert!(from.stream_hints_out > 0);
    assert_eq!(from.stream_hints_out, to.stream_hints_in);
    assert_eq!((to.stream_hints_out, from.stream_hints_in), (0, 0));
}
