//! The server's request path end to end: the connection loop of
//! `shardstore_server::conn` (framing, limits, decoding, execution,
//! forwarding decisions, replies) over arbitrary client bytes, against a
//! fresh shard on the simulated disk for every input. It must never panic,
//! whatever the bytes.
#![no_main]

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::{LocalExecutor, LocalExecutorBuilder, Placement};
use libfuzzer_sys::fuzz_target;
use shardstore_proto::{limits, ShardId};
use shardstore_server::conn::{connection_loop, Transport};
use shardstore_server::conn_limits::ConnLimits;
use shardstore_server::handler::{NodeInfo, ShardCtx};
use shardstore_shard::{Shard, ShardConfig, SimDisk};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

/// The client's bytes as the read side; replies are counted and dropped.
struct MemStream {
    input: Vec<u8>,
    pos: usize,
    written: usize,
}

impl AsyncRead for MemStream {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        // Small reads, so frames straddle reads as they do on a socket.
        let n = buf.len().min(self.input.len() - self.pos).min(1 + self.pos % 4096);
        let start = self.pos;
        buf[..n].copy_from_slice(&self.input[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for MemStream {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.written += buf.len();
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Transport for MemStream {
    async fn send_all(&mut self, slices: &[&[u8]], _timeout: Duration) -> io::Result<()> {
        self.written += slices.iter().map(|s| s.len()).sum::<usize>();
        Ok(())
    }
}

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
            let node = NodeInfo {
                node_id: 1,
                shard_count: 1,
                shard_addrs: vec!["127.0.0.1:1".into()],
                max_payload: 256 << 10,
                max_chunk_size: limits::MAX_CHUNK_SIZE,
                limits,
                auth_secret: None,
                tls: None,
                stream_hints: Vec::new(),
            };
            let ctx = Rc::new(ShardCtx::new(shard, ShardId(0), node, Vec::new()));
            let stream = MemStream { input, pos: 0, written: 0 };
            let _ = connection_loop(&ctx, stream, "127.0.0.1:9".parse().unwrap()).await;
        });
    });
});
