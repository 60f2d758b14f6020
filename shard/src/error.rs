//! Typed errors of the shard engine.
//!
//! Operating errors (a missing chunk, a full data area, corrupt bytes on disk, a
//! device error) are distinct variants from format errors found at open. Every
//! variant maps to one wire [`ErrorCode`] through [`ShardError::code`].

use shardstore_proto::{ChunkId, ErrorCode};

/// Everything a shard operation can fail with.
#[derive(thiserror::Error, Debug)]
pub enum ShardError {
    /// The chunk does not exist on this shard.
    #[error("chunk {0} not found")]
    NotFound(ChunkId),
    /// Stored bytes failed their checksum; `sector` is the logical sector
    /// index inside the chunk (byte offset / SECTOR_SIZE). Never served.
    #[error("chunk {chunk} sector {sector} is corrupt: {detail}")]
    Corrupt {
        chunk: ChunkId,
        sector: u64,
        detail: String,
    },
    /// The request's arguments are not acceptable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A size limit was exceeded (payload, chunk size).
    #[error("too large: {0}")]
    TooLarge(String),
    /// No contiguous free run in the data area fits the extent.
    #[error("no space: needed {needed_bytes} bytes, {free_bytes} bytes free")]
    NoSpace { needed_bytes: u64, free_bytes: u64 },
    /// The shard is fail-stopped after a flush error: no more writes or deletes.
    #[error("shard is read-only after a flush error (fail-stop)")]
    ReadOnly,
    /// A device I/O error.
    #[error("i/o error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The sled index failed.
    #[error("index error: {0}")]
    Index(#[from] sled::Error),
    /// The index is missing or damaged; the message says how to rebuild it.
    #[error("{0}")]
    IndexMissing(String),
    /// The shard's folder is in use: its index is locked by another process
    /// (a second server on the same data folder), or by this one still.
    #[error("{0}")]
    InUse(String),
    /// The index holds something this engine never writes (a bug or corruption).
    #[error("index is inconsistent: {0}")]
    IndexCorrupt(String),
    /// The superblock was written for another shard count.
    #[error("shard count mismatch: the data file was formatted for {found} shards, configured {expected}")]
    ShardCountMismatch { found: u32, expected: u32 },
    /// Bad or foreign superblock, wrong node or shard id, unsupported version.
    #[error("bad data file format: {0}")]
    Format(String),
    /// A broken internal invariant (a bug, not an operating error).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ShardError {
    /// The wire error code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ShardError::NotFound(_) => ErrorCode::NotFound,
            ShardError::Corrupt { .. } => ErrorCode::Corrupt,
            ShardError::NoSpace { .. } => ErrorCode::NoSpace,
            ShardError::ReadOnly => ErrorCode::ReadOnly,
            ShardError::TooLarge(_) => ErrorCode::TooLarge,
            ShardError::InvalidArgument(_) => ErrorCode::InvalidRequest,
            ShardError::Io { .. } | ShardError::Index(_) => ErrorCode::Io,
            ShardError::IndexCorrupt(_)
            | ShardError::IndexMissing(_)
            | ShardError::InUse(_)
            | ShardError::ShardCountMismatch { .. }
            | ShardError::Format(_)
            | ShardError::Internal(_) => ErrorCode::Internal,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ShardError::Io {
            context: context.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(ShardError::NotFound(ChunkId(1)).code(), ErrorCode::NotFound);
        assert_eq!(ShardError::ReadOnly.code(), ErrorCode::ReadOnly);
        assert_eq!(
            ShardError::InvalidArgument("x".into()).code(),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            ShardError::io("x", std::io::Error::other("y")).code(),
            ErrorCode::Io
        );
        assert_eq!(
            ShardError::ShardCountMismatch {
                found: 1,
                expected: 2
            }
            .code(),
            ErrorCode::Internal
        );
    }
}
