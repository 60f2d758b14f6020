//! Client configuration.

use std::time::Duration;

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
    /// Most requests awaiting a reply on one connection; further calls wait
    /// for a slot (backpressure, never unbounded memory).
    pub max_in_flight_per_connection: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            route_direct: true,
            max_in_flight_per_connection: 1024,
        }
    }
}
