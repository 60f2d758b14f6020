//! Plain result types returned by [`crate::Client`] calls.

use bytes::Bytes;
use shardstore_proto::{ChunkId, ShardId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteResult {
    /// The chunk's version after this write.
    pub version: u64,
    /// The chunk's length after this write.
    pub chunk_len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadResult {
    /// The bytes read, checked against the reply's crc32c. Shorter than asked
    /// when the read reaches the end of the chunk.
    pub data: Bytes,
    pub version: u64,
    pub chunk_len: u64,
}

/// What a client can tell the server about a READ ([`crate::Client::read_with`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// The read is part of one sequential stream over consecutive chunk
    /// ids, read in order: after the end of this chunk the stream goes on at
    /// offset 0 of chunk id + 1, which the server may then read ahead
    /// (protocol `READ_FLAG_NEXT_CHUNK`). Set it only when that is true: a
    /// wrong hint costs the server a wasted read-ahead of the next chunk.
    pub continues_into_next_chunk: bool,
}

impl ReadOptions {
    pub(crate) fn flags(self) -> u32 {
        if self.continues_into_next_chunk {
            shardstore_proto::READ_FLAG_NEXT_CHUNK
        } else {
            0
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkStat {
    pub chunk_len: u64,
    pub version: u64,
    /// Nanoseconds since the Unix epoch.
    pub created_ns: u64,
    pub modified_ns: u64,
    pub shard: ShardId,
    /// Device space taken by the chunk's live sectors.
    pub allocated_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListEntry {
    pub chunk: ChunkId,
    pub chunk_len: u64,
    pub version: u64,
}

/// One page of a shard's chunks, in id order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListPage {
    pub entries: Vec<ListEntry>,
    /// More entries follow the last one: ask again with `after` set to it.
    pub more: bool,
}
