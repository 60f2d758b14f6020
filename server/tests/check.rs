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

/// Writes what `assert_data` checks (and a deleted chunk) on a 2-shard
/// server, then kills it.
async fn write_then_kill(dir: &std::path::Path) {
    let srv = TestServer::start(dir, 2);
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_index_refused_then_rebuilt_by_check_or_flag() {
    let dir = data_dir("check");
    write_then_kill(&dir).await;

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

/// Under the packaged unit the data folder belongs to the service account,
/// and an admin may run `check --rebuild` as root: the index it rebuilds
/// (and any sled file it writes) must be the folder owner's, or the service
/// cannot open it at its next start. `check` becomes the owner first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_run_as_root_runs_as_the_folders_owner() {
    if !is_root_else_skip("running check as another user than the folder's owner") {
        return;
    }
    let dir = data_dir("check-owner");
    write_then_kill(&dir).await;

    // Every file owned by the service account, as StateDirectory= leaves it.
    for p in walk(&dir).iter().chain([&dir.to_path_buf()]) {
        std::os::unix::fs::lchown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }

    for shard in ["shard-000", "shard-001"] {
        std::fs::remove_dir_all(dir.join(shard).join("index")).unwrap();
    }
    let out = run_check(&dir, &["--rebuild"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert_eq!(stdout.matches("index rebuilt").count(), 2, "{stdout}");
    assert!(
        stdout.contains(&format!("running as {NOBODY}:{NOBODY}")),
        "{stdout}"
    );

    assert_all_owned_by(&dir, NOBODY);

    // And the service account can start on it and read everything.
    let srv = TestServer::try_start_as(&dir, 2, NOBODY)
        .unwrap_or_else(|e| panic!("the service account could not start on the folder: {e}"));
    assert_data(&srv).await;
    srv.kill();
}
