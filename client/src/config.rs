//! Client configuration.

use std::sync::Arc;
use std::time::Duration;

/// Largest [`ClientConfig::max_in_flight_per_connection`] accepted.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 1 << 20;

/// How a [`crate::Client`] connects and how long it waits.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Upper bound on one call, from the moment it is made until its reply is
    /// in hand, including a reconnect and the one retry of idempotent calls.
    pub request_timeout: Duration,
    /// Upper bound on opening one TCP connection.
    pub connect_timeout: Duration,
    /// `true`: send each request to the address of the shard that owns its
    /// chunk (zero cross-core hops on the server). `false`: send everything
    /// to the front address and let the server forward.
    pub route_direct: bool,
    /// Most requests outstanding on one connection (1 to
    /// [`MAX_IN_FLIGHT_PER_CONNECTION`]); further calls wait for a slot
    /// (backpressure, never unbounded memory). A request keeps its slot
    /// until its reply is in hand or its call has ended, and, if it ended
    /// first (timeout), until its frame has left the connection's queue: a
    /// connection the server does not read holds at most this many frames.
    pub max_in_flight_per_connection: usize,
    /// Shared secret for servers that require authentication (read it with
    /// [`Secret::from_file`]). With a secret set, every connection runs the
    /// mutual HMAC handshake first and refuses a server that cannot prove
    /// it holds the same secret.
    pub secret: Option<Secret>,
    /// TLS for every connection, when the server uses it.
    pub tls: Option<ClientTls>,
}

/// TLS settings: trusted roots (and optionally a client certificate) in a
/// rustls configuration, see `shardstore_net::tls::client_config`.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    /// Name to verify the server's certificate against, on every connection
    /// of the client; default: the host part of the front address given to
    /// `Client::connect_with` (shard connections too, whatever addresses
    /// the topology advertises for them).
    pub server_name: Option<String>,
}

impl ClientTls {
    /// Trusts the CA in `ca` (PEM); with `identity` (certificate chain, key)
    /// presents a client certificate to servers that require one.
    pub fn from_pem_files(
        ca: &std::path::Path,
        identity: Option<(&std::path::Path, &std::path::Path)>,
        server_name: Option<String>,
    ) -> Result<ClientTls, crate::ClientError> {
        let config = shardstore_net::tls::client_config(ca, identity)
            .map_err(|e| crate::ClientError::Tls(e.to_string()))?;
        Ok(ClientTls {
            config,
            server_name,
        })
    }
}

/// A shared secret; never printed.
#[derive(Clone)]
pub struct Secret(pub(crate) Arc<Vec<u8>>);

impl Secret {
    /// Reads a secret file (trailing whitespace trimmed, 16..=4096 bytes).
    pub fn from_file(
        path: &std::path::Path,
    ) -> Result<Secret, shardstore_proto::auth::SecretError> {
        shardstore_proto::auth::read_secret_file(path).map(|v| Secret(Arc::new(v)))
    }

    /// A secret from bytes already in memory (tests, embedding).
    pub fn from_bytes(bytes: &[u8]) -> Secret {
        Secret(Arc::new(bytes.to_vec()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            route_direct: true,
            max_in_flight_per_connection: 1024,
            secret: None,
            tls: None,
        }
    }
}
