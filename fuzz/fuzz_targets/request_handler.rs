//! The server's request path end to end: the connection loop of
//! `shardstore_server::conn` (framing, limits, decoding, execution,
//! forwarding decisions, replies) over arbitrary client bytes, against a
//! fresh shard on the simulated disk for every input. It must never panic,
//! whatever the bytes.
#![no_main]

use glommio::{LocalExecutor, LocalExecutorBuilder, Placement};
use libfuzzer_sys::fuzz_target;
use shardstore_proto::ShardId;
use shardstore_server::conn::connection_loop;
use shardstore_server::conn_limits::ConnLimits;
use shardstore_server::handler::{NodeInfo, ShardCtx};
use shardstore_server::mem_stream::MemStream;
use shardstore_shard::{Shard, ShardConfig, SimDisk};
use std::rc::Rc;
use std::time::Duration;

thread_local! {
    static EXECUTOR: LocalExecutor = LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(512 << 10)
        .make()
        .expect("glommio executor");
}

fuzz_target!(|data: &[u8]| {
    let input = data.to_vec();
    EXECUTOR.with(|ex| {
        ex.run(async move {
            let cfg = ShardConfig {
                shard: ShardId(0),
                shard_count: 1,
                node_id: 1,
                capacity_bytes: 2 << 20,
                // A small cache: READs take both the inline (cached) and
                // the asynchronous path.
                cache_bytes: 256 << 10,
                ..ShardConfig::default()
            };
            let disk = SimDisk::new(3 << 20, 1);
            let shard = Shard::open_sim(cfg, &disk).await.expect("open a fresh simulated shard");
            let limits = ConnLimits {
                frame_timeout: Duration::from_millis(50),
                idle_timeout: Duration::from_millis(50),
                ..ConnLimits::default()
            };
            let node = NodeInfo::single_shard(256 << 10, limits);
            let ctx = Rc::new(ShardCtx::new(shard, ShardId(0), node, Vec::new()));
            let (stream, _replies) = MemStream::new(input);
            let _ = connection_loop(&ctx, stream, "127.0.0.1:9".parse().unwrap()).await;
        });
    });
});
