//! `rdma://HOST:PORT` addresses: the same frames over RDMA (feature `rdma`).
//!
//! A server's `--rdma-listen` address serves every shard: it routes each
//! request with `route()` to the owning shard itself. The client still
//! computes `route()` per request and keeps one RDMA connection (queue pair)
//! per shard slot, all to that address, so pipelining and failure isolation
//! work as over TCP.
//!
//! A connection is a writer and a reader task, like the TCP one, around a
//! [`shardstore_net::rdma::RdmaConn`]. Regions a request offered to the
//! server (its payload source, its read sink) stay registered until its
//! reply arrives, even if the caller timed out, because the server may still
//! read or write them; the per-connection pool's budget bounds them.
//! Authentication and TLS are not available over RDMA.

/// `Some(host:port)` for an `rdma://` address.
pub(crate) fn rdma_target(addr: &str) -> Option<&str> {
    addr.strip_prefix("rdma://")
}

/// The address shard slots use: every shard through the RDMA front when the
/// client connected to one, else the shard's own TCP address.
pub(crate) fn shard_addr(front: &str, shard_tcp: String) -> String {
    if rdma_target(front).is_some() {
        front.to_owned()
    } else {
        shard_tcp
    }
}

#[cfg(not(feature = "rdma"))]
pub(crate) async fn open(
    addr: &str,
    _cfg: &crate::ClientConfig,
) -> Result<std::sync::Arc<crate::conn::Connection>, crate::ClientError> {
    Err(crate::ClientError::RdmaUnsupported {
        addr: addr.to_owned(),
    })
}

#[cfg(feature = "rdma")]
pub(crate) use imp::open;

#[cfg(feature = "rdma")]
mod imp {
    use crate::conn::{Connection, Outgoing, Reply, Shared};
    use crate::{ClientConfig, ClientError};
    use bytes::Bytes;
    use shardstore_net::rdma::verbs::{self, VerbsEndpoint, VerbsRegion};
    use shardstore_net::rdma::{Held, PoolConfig, RdmaConn, RdmaError};
    use shardstore_proto::limits;
    use std::collections::HashMap;
    use std::io;
    use std::sync::{Arc, Mutex};
    use tokio::sync::mpsc;

    type HeldMap = Arc<Mutex<HashMap<u64, Held<VerbsRegion>>>>;

    pub(crate) async fn open(
        addr: &str,
        cfg: &ClientConfig,
    ) -> Result<Arc<Connection>, ClientError> {
        let target = super::rdma_target(addr).expect("an rdma:// address");
        if cfg.secret.is_some() || cfg.tls.is_some() {
            return Err(ClientError::InvalidArgument(
                "authentication and TLS are not available over rdma://".into(),
            ));
        }
        let connect_err = |source| ClientError::Connect {
            addr: addr.to_owned(),
            source,
        };
        let ep = match tokio::time::timeout(cfg.connect_timeout, verbs::connect(target)).await {
            Ok(Ok(ep)) => ep,
            Ok(Err(e)) => return Err(connect_err(e)),
            Err(_) => {
                return Err(connect_err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no RDMA connection within {:?}", cfg.connect_timeout),
                )))
            }
        };
        // Room for every request in flight to hold one max-size region.
        let pool = PoolConfig {
            budget_bytes: (cfg.max_in_flight_per_connection.clamp(2, 64) as u64)
                * limits::MAX_PAYLOAD as u64,
            ..PoolConfig::default()
        };
        let conn = Arc::new(RdmaConn::new(ep, pool, limits::MAX_PAYLOAD));
        let held: HeldMap = Arc::default();
        Ok(Connection::with_transport(addr, cfg, move |shared, rx| {
            tokio::spawn(writer_task(shared.clone(), conn.clone(), held.clone(), rx));
            tokio::spawn(reader_task(shared, conn, held)).abort_handle()
        }))
    }

    fn lock(m: &HeldMap) -> std::sync::MutexGuard<'_, HashMap<u64, Held<VerbsRegion>>> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn writer_task(
        shared: Arc<Shared>,
        conn: Arc<RdmaConn<VerbsEndpoint>>,
        held: HeldMap,
        mut rx: mpsc::UnboundedReceiver<Outgoing>,
    ) {
        while let Some(out) = rx.recv().await {
            if out.given_up() {
                // Given up (timeout, cancellation) before it was sent.
                continue;
            }
            let id = out.id;
            let msg = match conn.prepare_request(&out.head, &out.payload) {
                Ok((msg, h)) => {
                    // Recorded before sending: the reply may come at once.
                    lock(&held).insert(id, h);
                    msg
                }
                Err(e) => {
                    // Out of registered memory: fail this request only.
                    if let Some(w) = shared.take(id) {
                        let _ = w.send(Err(super::out_of_registered_memory(&e)));
                    }
                    continue;
                }
            };
            if let Err(e) = conn.send_message(&msg).await {
                shared.close(&format!("rdma send failed: {e}"));
                lock(&held).clear();
                return;
            }
        }
    }

    async fn reader_task(shared: Arc<Shared>, conn: Arc<RdmaConn<VerbsEndpoint>>, held: HeldMap) {
        let why = loop {
            let mut inc = match conn.recv().await {
                Ok(inc) => inc,
                Err(RdmaError::Closed) => break "closed by peer".to_owned(),
                Err(e) => {
                    if let Some((id, _)) = e.request_id() {
                        lock(&held).remove(&id);
                        if let Some(w) = shared.take(id) {
                            let _ = w.send(Err(ClientError::Protocol(e.to_string())));
                        }
                        continue;
                    }
                    break e.to_string();
                }
            };
            let h = inc.head.header;
            if !h.is_response() {
                break format!(
                    "peer sent a {} request instead of a reply",
                    inc.head.opcode.name()
                );
            }
            let mine = lock(&held).remove(&h.request_id);
            let payload = match &mine {
                Some(m) => RdmaConn::<VerbsEndpoint>::written_payload(m, &mut inc),
                None => match std::mem::replace(
                    &mut inc.payload,
                    shardstore_net::rdma::PayloadRef::Inline(Vec::new()),
                ) {
                    shardstore_net::rdma::PayloadRef::Inline(v) => Ok(v),
                    _ => Err(RdmaError::ForeignRegion),
                },
            };
            // The server is done with this request's regions.
            drop(mine);
            let Some(waiter) = shared.take(h.request_id) else {
                continue; // its caller gave up
            };
            let msg = payload
                .map(|p| Reply {
                    opcode: inc.head.opcode,
                    is_error: h.is_error(),
                    body: std::mem::take(&mut inc.body),
                    payload: Bytes::from(p),
                })
                .map_err(|e| {
                    ClientError::Protocol(format!("{} reply: {e}", inc.head.opcode.name()))
                });
            let _ = waiter.send(msg);
        };
        shared.close(&why);
        lock(&held).clear();
    }
}

/// A request this client could not stage in its registered memory: BUSY,
/// like a server over its buffer budget, so that it is not taken for a lost
/// connection (and retried at once on the same one).
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
fn out_of_registered_memory(e: &dyn std::fmt::Display) -> crate::ClientError {
    use shardstore_proto::ErrorCode;
    crate::ClientError::Server {
        code: Some(ErrorCode::Busy),
        raw_code: ErrorCode::Busy as u16,
        chunk: shardstore_proto::ChunkId(0),
        sector: 0,
        message: format!("client RDMA registered memory exhausted: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_registered_memory_is_busy_not_a_lost_connection() {
        let e = out_of_registered_memory(&"no buffer of 1048576 bytes");
        assert_eq!(e.code(), Some(shardstore_proto::ErrorCode::Busy));
        assert!(
            !e.is_connection_loss(),
            "would be retried on the same connection"
        );
    }

    #[test]
    fn rdma_front_serves_every_shard_slot() {
        assert_eq!(rdma_target("rdma://h:1"), Some("h:1"));
        assert_eq!(rdma_target("h:1"), None);
        assert_eq!(shard_addr("rdma://h:1", "h:7701".into()), "rdma://h:1");
        assert_eq!(shard_addr("h:7700", "h:7701".into()), "h:7701");
    }

    #[cfg(not(feature = "rdma"))]
    #[tokio::test]
    async fn without_the_feature_rdma_addresses_are_a_typed_error() {
        let e = crate::Client::connect("rdma://127.0.0.1:1")
            .await
            .err()
            .unwrap();
        assert!(
            matches!(e, crate::ClientError::RdmaUnsupported { .. }),
            "{e}"
        );
        assert!(e.to_string().contains("built without rdma"));
    }
}
