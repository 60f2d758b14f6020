//! The client's typed errors. Server error replies are mapped to variants a
//! caller can match on (`NotFound`, `Corrupt`), everything else a server can
//! say is kept in `Server` with its raw code, so a newer server's codes are
//! never lost.

use shardstore_proto::{ArchivedErrorBody, ChunkId, ErrorCode};
use std::io;
use std::time::Duration;

/// Everything a [`crate::Client`] call can fail with.
#[derive(thiserror::Error, Debug)]
pub enum ClientError {
    /// The server answered with an error reply other than NOT_FOUND or CORRUPT.
    #[error("server error {}: {message} (chunk {chunk}, sector {sector})", code_name(*.code, *.raw_code))]
    Server {
        /// The decoded code, `None` when this client does not know `raw_code`.
        code: Option<ErrorCode>,
        /// The code as sent on the wire.
        raw_code: u16,
        /// The chunk concerned, or `ChunkId(0)`.
        chunk: ChunkId,
        /// For sector-level errors the sector index within the chunk, else 0.
        sector: u64,
        message: String,
    },
    /// The chunk does not exist (server NOT_FOUND).
    #[error("chunk {0} not found")]
    NotFound(ChunkId),
    /// The server found stored bytes that failed their checksum and refused to
    /// serve them (server CORRUPT).
    #[error("chunk {chunk} is corrupt at sector {sector}: {message}")]
    Corrupt {
        chunk: ChunkId,
        sector: u64,
        message: String,
    },
    /// A read reply's payload did not match the crc32c the server sent with
    /// it: the bytes were damaged in flight and are not returned.
    #[error("payload checksum mismatch reading chunk {chunk} (expected {expected:#010x}, computed {computed:#010x})")]
    ChecksumMismatch {
        chunk: ChunkId,
        expected: u32,
        computed: u32,
    },
    /// No reply within the configured request timeout.
    #[error("{op} timed out after {after:?}")]
    Timeout { op: &'static str, after: Duration },
    /// Opening a connection failed (including the connect timeout).
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The connection closed before the reply arrived.
    #[error("connection closed")]
    ConnectionClosed,
    /// The server sent something this client cannot accept: a malformed
    /// reply, an unexpected opcode, a bad body, an incompatible topology.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A client-side limit check failed; nothing was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The authentication handshake failed (wrong secret, or a server that
    /// cannot prove it holds ours).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// TLS setup or handshake failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// An `rdma://` address, and this client was built without the `rdma`
    /// feature.
    #[error("built without rdma: {addr} needs shardstore-client's `rdma` feature")]
    RdmaUnsupported { addr: String },
}

fn code_name(code: Option<ErrorCode>, raw: u16) -> String {
    match code {
        Some(c) => c.name().to_owned(),
        None => format!("code {raw}"),
    }
}

impl ClientError {
    /// The server error code behind this error, if it came from an error reply.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => *code,
            ClientError::NotFound(_) => Some(ErrorCode::NotFound),
            ClientError::Corrupt { .. } => Some(ErrorCode::Corrupt),
            _ => None,
        }
    }

    /// Whether the request may not have reached the server or its reply was
    /// lost with the connection: the cases where an idempotent request is
    /// retried once on a fresh connection.
    pub(crate) fn is_connection_loss(&self) -> bool {
        matches!(self, ClientError::ConnectionClosed | ClientError::Io(_))
    }

    /// Maps a server error body. `request_chunk` names the chunk when the
    /// server left the body's chunk at 0.
    pub(crate) fn from_error_body(body: &ArchivedErrorBody, request_chunk: ChunkId) -> Self {
        let raw_code = body.code.to_native();
        let chunk = match body.chunk.to_native() {
            0 => request_chunk,
            c => ChunkId(c),
        };
        let sector = body.sector.to_native();
        let message = body.message.as_str().to_owned();
        match ErrorCode::from_u16(raw_code) {
            Some(ErrorCode::NotFound) => ClientError::NotFound(chunk),
            Some(ErrorCode::Corrupt) => ClientError::Corrupt {
                chunk,
                sector,
                message,
            },
            code => ClientError::Server {
                code,
                raw_code,
                chunk,
                sector,
                message,
            },
        }
    }
}
