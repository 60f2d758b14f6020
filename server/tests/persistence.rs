//! Durability across SIGKILL, and refusal of a shard-count change.

mod common;
use common::*;
use shardstore_proto::ChunkId;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = data_dir("persist");
    let srv = TestServer::start(&dir, 2);
    let c = srv.client().await;
    // Concurrent writers, so acks come from shared group commits.
    let mut acked = Vec::new();
    let mut tasks = Vec::new();
    for t in 0..8u128 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..25u128 {
                let id = ChunkId(t << 32 | i);
                let len = 1 + ((i * 7919) % 20_000) as usize;
                c.write(id, (i as u64 % 3) * 1000, pattern(id.0 as u64, len))
                    .await
                    .unwrap();
                mine.push((id, (i as u64 % 3) * 1000, len));
            }
            // Overwrite some, so the last acknowledged version must win.
            for (id, off, len) in mine.iter_mut().step_by(3) {
                let data = pattern(id.0 as u64 ^ 0xff, *len);
                c.write(*id, *off, data).await.unwrap();
            }
            mine
        }));
    }
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    drop(c);
    srv.kill();

    let srv = TestServer::start(&dir, 2);
    let c = srv.client().await;
    for (n, (id, off, len)) in acked.iter().enumerate() {
        let want = if n % 25 % 3 == 0 {
            pattern(id.0 as u64 ^ 0xff, *len)
        } else {
            pattern(id.0 as u64, *len)
        };
        let r = c.read(*id, *off, *len as u32).await.unwrap();
        assert!(
            r.data[..] == want[..],
            "chunk {id} lost or changed after SIGKILL"
        );
        // The hole before the offset reads as zeros.
        if *off > 0 {
            assert!(c
                .read(*id, 0, *off as u32)
                .await
                .unwrap()
                .data
                .iter()
                .all(|&b| b == 0));
        }
    }
    srv.kill();
}

#[test]
fn restart_with_another_shard_count_is_refused() {
    let dir = data_dir("reshard");
    let srv = TestServer::start(&dir, 2);
    srv.kill();
    let err = match TestServer::try_start(&dir, 3, &[]) {
        Ok(_) => panic!("a 2-shard data dir was opened with 3 shards"),
        Err(e) => e,
    };
    assert!(
        err.contains("created with 2 shards"),
        "unclear error: {err}"
    );
    // The refusal is a one-line error on stderr and a non-zero exit.
    let out = Command::new(bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--data-dir",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("resharding is not supported"));
    // The original count still works.
    TestServer::start(&dir, 2).kill();
}
