//! `shardstore check` and the refusal to start on a missing index.

mod common;
use common::*;
use shardstore_proto::ChunkId;

async fn assert_data(srv: &TestServer) {
    let c = srv.client().await;
    for n in 0..10u128 {
        let r = c.read(ChunkId(n), 0, 8000).await.unwrap();
        assert!(r.data[..] == pattern(n as u64, 8000)[..], "chunk {n}");
    }
    assert!(matches!(
        c.read(ChunkId(99), 0, 1).await,
        Err(shardstore_client::ClientError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_index_refused_then_rebuilt_by_check_or_flag() {
    let dir = data_dir("check");
    let srv = TestServer::start(&dir, 2);
    let c = srv.client().await;
    for n in 0..10u128 {
        c.write(ChunkId(n), 0, pattern(n as u64, 8000))
            .await
            .unwrap();
    }
    c.write(ChunkId(99), 0, b"doomed".to_vec()).await.unwrap();
    c.delete(ChunkId(99)).await.unwrap();
    drop(c);
    srv.kill();

    // A clean check (recovery runs first: the kill skipped the last checkpoint).
    let out = run_check(&dir, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert_eq!(stdout.matches("0 problems").count(), 2, "{stdout}");

    for shard in ["shard-000", "shard-001"] {
        std::fs::remove_dir_all(dir.join(shard).join("index")).unwrap();
    }
    let err = match TestServer::try_start(&dir, 2, &[]) {
        Ok(_) => panic!("started without an index"),
        Err(e) => e,
    };
    assert!(
        err.contains("check --data-dir")
            && err.contains("--rebuild")
            && err.contains("--rebuild-index"),
        "the refusal does not say how to fix it: {err}"
    );

    let out = run_check(&dir, &["--rebuild"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert_eq!(stdout.matches("index rebuilt").count(), 2, "{stdout}");
    let srv = TestServer::start(&dir, 2);
    assert_data(&srv).await;
    srv.kill();

    // Or let the server rebuild at start-up.
    std::fs::remove_dir_all(dir.join("shard-001").join("index")).unwrap();
    let srv = TestServer::try_start(&dir, 2, &["--rebuild-index"]).unwrap();
    assert_data(&srv).await;
    srv.kill();
}
