//! `serve` run by hand as root on the service account's data folder (as the
//! README says to for `--format` and `--rebuild-index` under the packaged
//! unit) runs as the folder's owner: everything it creates is the
//! service's, which could not write root's files at its next start.

mod common;
use common::*;
use shardstore_proto::ChunkId;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serve_run_as_root_creates_only_files_of_the_folders_owner() {
    if !is_root_else_skip("running serve as another user than the folder's owner") {
        return;
    }
    // An empty folder of the service account, as StateDirectory= makes it.
    let dir = data_dir("serve-owner");
    std::os::unix::fs::lchown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();

    // The first start creates the node file, the shard folders, the data
    // files and sled's index; a second one with --rebuild-index rewrites
    // the index.
    for extra in [&[][..], &["--rebuild-index"][..]] {
        let srv = TestServer::try_start(&dir, 2, extra).unwrap();
        let c = srv.client().await;
        c.write(ChunkId(7), 0, pattern(7, 8000)).await.unwrap();
        drop(c);
        srv.kill();
    }

    assert_all_owned_by(&dir, NOBODY);
    let log = std::fs::read_to_string(dir.join("server.log")).unwrap();
    assert_eq!(
        log.matches("running as the data folder's owner").count(),
        2,
        "one word of the switch per start: {log}"
    );

    // And the service account can start on it and read what was written.
    let srv = TestServer::try_start_as(&dir, 2, NOBODY)
        .unwrap_or_else(|e| panic!("the service account could not start on the folder: {e}"));
    let r = srv.client().await.read(ChunkId(7), 0, 8000).await.unwrap();
    assert!(r.data[..] == pattern(7, 8000)[..]);
    srv.kill();
}

/// A folder of the service account whose group is root's (`chown nobody`
/// alone leaves it so): the run takes the account's own group from the
/// user database, as `User=` does, not root's group from the folder (which
/// kept root's group after the switch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serve_run_as_root_takes_the_owners_own_group_not_the_folders() {
    if !is_root_else_skip("running serve as another user than the folder's owner") {
        return;
    }
    let dir = data_dir("serve-owner-group");
    std::os::unix::fs::lchown(&dir, Some(NOBODY), Some(0)).unwrap();
    let srv = TestServer::try_start(&dir, 1, &[]).unwrap();
    srv.client()
        .await
        .write(ChunkId(9), 0, pattern(9, 4096))
        .await
        .unwrap();
    srv.kill();
    // Everything but the folder itself is nobody:nogroup (65534:65534).
    std::os::unix::fs::lchown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    assert_all_owned_by(&dir, NOBODY);
}
