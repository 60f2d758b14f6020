//! A byte flipped on disk while the server is stopped is detected on read:
//! CORRUPT names the chunk and sector, the bytes are never served, and the
//! chunk's other sectors still read.

mod common;
use common::*;
use shardstore_client::ClientError;
use shardstore_proto::{route, ChunkId};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_is_reported_as_corrupt() {
    let dir = data_dir("corrupt");
    let srv = TestServer::start(&dir, 2);
    let c = srv.client().await;
    let id = ChunkId(0xc0ffee);
    // Four sectors; sector 2 holds a marker we can find in the data file.
    let mut data = pattern(3, 4 * 4096);
    let marker = b"SHARDSTORE-CORRUPTION-TEST-MARKER-0123456789";
    data[2 * 4096 + 100..2 * 4096 + 100 + marker.len()].copy_from_slice(marker);
    c.write(id, 0, data.clone()).await.unwrap();
    drop(c);
    srv.kill();

    let shard = route(id, 2).0;
    let file = dir.join(format!("shard-{shard:03}")).join("data");
    let mut bytes = std::fs::read(&file).unwrap();
    let pos = bytes
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("marker on disk");
    bytes[pos + 5] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    drop(bytes);

    let srv = TestServer::start(&dir, 2);
    let c = srv.client().await;
    match c.read(id, 0, 4 * 4096).await {
        Err(ClientError::Corrupt { chunk, sector, .. }) => {
            assert_eq!(chunk, id);
            assert_eq!(sector, 2);
        }
        other => panic!("expected CORRUPT, got {other:?}"),
    }
    match c.read(id, 2 * 4096 + 50, 10).await {
        Err(ClientError::Corrupt { sector: 2, .. }) => {}
        other => panic!("expected CORRUPT for sector 2, got {other:?}"),
    }
    // The other sectors are intact and still served.
    for s in [0u64, 1, 3] {
        let r = c.read(id, s * 4096, 4096).await.unwrap();
        assert_eq!(
            &r.data[..],
            &data[s as usize * 4096..(s as usize + 1) * 4096]
        );
    }
    let st = c.stats(shardstore_proto::ShardId(shard)).await.unwrap();
    assert!(st.corrupt_errors >= 2);
}
