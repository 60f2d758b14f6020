//! The TOPOLOGY reply, checked: a client only talks to a node whose protocol
//! version and routing function it shares, or it would misroute chunks.

use crate::ClientError;
use shardstore_proto::{limits, ArchivedTopologyReply, PROTOCOL_VERSION, ROUTE_FN_JUMP_SPLITMIX};
use std::net::SocketAddr;

/// What the node said about itself in its TOPOLOGY reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub protocol_version: u16,
    pub node_id: u128,
    pub shard_count: u32,
    /// Routing function id; this client speaks `ROUTE_FN_JUMP_SPLITMIX`.
    pub route_fn: u32,
    pub sector_size: u32,
    /// Largest WRITE payload / READ length: the node's value, capped at the
    /// protocol's `limits::MAX_PAYLOAD`.
    pub max_payload: u32,
    /// Largest chunk: the node's value, capped at `limits::MAX_CHUNK_SIZE`.
    pub max_chunk_size: u64,
    /// `shard_addrs[i]` is served directly by shard `i`. Addresses advertised
    /// with an unspecified host (`0.0.0.0`, `[::]`) are rewritten to the host
    /// of `front_addr`.
    pub shard_addrs: Vec<String>,
    /// The address the client was given and fetched the topology from.
    pub front_addr: String,
}

impl Topology {
    pub(crate) fn from_reply(
        r: &ArchivedTopologyReply,
        front_addr: &str,
    ) -> Result<Self, ClientError> {
        let bad = |what: String| {
            Err(ClientError::Protocol(format!(
                "topology from {front_addr}: {what}"
            )))
        };
        let protocol_version = r.protocol_version.to_native();
        if protocol_version != PROTOCOL_VERSION {
            return bad(format!(
                "protocol version {protocol_version}, this client speaks {PROTOCOL_VERSION}"
            ));
        }
        let route_fn = r.route_fn.to_native();
        if route_fn != ROUTE_FN_JUMP_SPLITMIX {
            return bad(format!(
                "routing function {route_fn}, this client knows {ROUTE_FN_JUMP_SPLITMIX}"
            ));
        }
        let shard_count = r.shard_count.to_native();
        if shard_count == 0 || shard_count > limits::MAX_SHARDS {
            return bad(format!("shard count {shard_count}"));
        }
        if r.shard_addrs.len() != shard_count as usize {
            return bad(format!(
                "{} shard addresses for {shard_count} shards",
                r.shard_addrs.len()
            ));
        }
        let max_payload = r.max_payload.to_native().min(limits::MAX_PAYLOAD);
        let max_chunk_size = r.max_chunk_size.to_native().min(limits::MAX_CHUNK_SIZE);
        if max_payload == 0 || max_chunk_size == 0 {
            return bad("zero size limits".to_owned());
        }
        Ok(Topology {
            protocol_version,
            node_id: r.node_id.to_native(),
            shard_count,
            route_fn,
            sector_size: r.sector_size.to_native(),
            max_payload,
            max_chunk_size,
            shard_addrs: r
                .shard_addrs
                .iter()
                .map(|a| resolve_shard_addr(a.as_str(), front_addr))
                .collect(),
            front_addr: front_addr.to_owned(),
        })
    }
}

/// A server listening on all interfaces advertises `0.0.0.0:port`; the
/// client reaches that shard on the host it reached the front address on.
fn resolve_shard_addr(advertised: &str, front_addr: &str) -> String {
    match advertised.parse::<SocketAddr>() {
        Ok(sa) if sa.ip().is_unspecified() => match front_addr.rsplit_once(':') {
            Some((host, _)) => format!("{host}:{}", sa.port()),
            None => advertised.to_owned(),
        },
        _ => advertised.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::resolve_shard_addr;

    #[test]
    fn unspecified_hosts_take_the_front_host() {
        assert_eq!(
            resolve_shard_addr("0.0.0.0:7001", "10.0.0.5:7000"),
            "10.0.0.5:7001"
        );
        assert_eq!(resolve_shard_addr("[::]:7001", "db1:7000"), "db1:7001");
        assert_eq!(
            resolve_shard_addr("[::]:7001", "[fe80::1]:7000"),
            "[fe80::1]:7001"
        );
        assert_eq!(
            resolve_shard_addr("10.0.0.6:7001", "10.0.0.5:7000"),
            "10.0.0.6:7001"
        );
        assert_eq!(resolve_shard_addr("db2:7001", "db1:7000"), "db2:7001");
    }
}
