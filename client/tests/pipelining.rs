//! Many calls share one connection; replies come back in reverse order and
//! each call still gets its own.

mod fake;

use fake::Fake;
use shardstore_client::*;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_replies_are_matched_by_request_id() {
    const N: usize = 16;
    let fake = Fake::start().await;
    let client = Client::connect(&fake.addr).await.unwrap();
    for i in 0..N {
        let data = vec![i as u8; 100 + i];
        client.write(ChunkId(i as u128), 0, data).await.unwrap();
    }
    let before = fake.ctl.connections.load(SeqCst);

    // The fake holds replies until N are ready, then sends them newest first:
    // only pipelining gets N requests to it at all.
    fake.ctl.reorder.store(N, SeqCst);
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { (i, client.read(ChunkId(i as u128), 0, 4096).await) })
        })
        .collect();
    for t in tasks {
        let (i, res) = t.await.unwrap();
        let r = res.unwrap();
        assert_eq!(r.data.len(), 100 + i);
        assert!(
            r.data.iter().all(|&b| b == i as u8),
            "read {i} got another reply"
        );
    }
    assert_eq!(
        fake.ctl.connections.load(SeqCst),
        before,
        "all on one connection"
    );
}

#[tokio::test]
async fn in_flight_is_bounded_per_connection() {
    let fake = Fake::start().await;
    let cfg = ClientConfig {
        max_in_flight_per_connection: 2,
        request_timeout: Duration::from_millis(600),
        ..ClientConfig::default()
    };
    let client = Client::connect_with(&fake.addr, cfg).await.unwrap();
    client.write(ChunkId(1), 0, &b"abc"[..]).await.unwrap();
    let before = fake.ctl.requests.load(SeqCst);
    // The fake goes silent: with 2 allowed in flight, the third call waits
    // for a slot. Each call times out whether it is stuck on the slot or on
    // a reply, so the outcome does not hang on when the third task starts
    // (once the first two time out it may send, and still gets no answer).
    fake.ctl.silent.store(true, SeqCst);
    let reads: Vec<_> = (0..3)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.read(ChunkId(1), 0, 3).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.ctl.requests.load(SeqCst) - before, 2);
    for r in reads {
        assert!(matches!(
            r.await.unwrap(),
            Err(ClientError::Timeout { op: "read", .. })
        ));
    }
}
