//! Message bodies. Flat records (no maps); ids are `u128`, sizes explicit
//! `u32`/`u64`. Field order is the wire format. Any change to a message's
//! fields, appending one included, changes its archived layout: rkyv 0.8
//! finds a body's root at a fixed distance from its end, so a peer built
//! with the other layout fails to validate the body or misreads it. The
//! messages of the data path (and HELLO, AUTH, TOPOLOGY, errors) therefore
//! never change within a [`crate::PROTOCOL_VERSION`]; the golden frames in
//! `tests/golden/` catch accidental changes. [`StatsReply`] is the
//! exception: an admin reply that grows with the server's counters, read by
//! the CLI and client of the same release (an older one gets a `Protocol`
//! error or wrong counters from STATS, nothing else).

use rkyv::{Archive, Deserialize, Serialize};

/// The id a node shows its clients (TOPOLOGY): the first 16 bytes of
/// SHA-256 of a label and the node's id. One-way: the id it comes from
/// cannot be recovered from it.
pub fn public_node_id(node_id: u128) -> u128 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"shardstore public node id v1");
    h.update(node_id.to_le_bytes());
    let d = h.finalize();
    u128::from_le_bytes(d[..16].try_into().expect("16 of 32 bytes"))
}

/// Body of requests and replies that carry no fields (PING).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Empty {}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TopologyReply {
    pub protocol_version: u16,
    /// The node's public id, [`public_node_id`] of its id: stable for the
    /// node, never the id itself (that seeds the checks of the extent
    /// headers on disk, which clients must not be able to forge).
    pub node_id: u128,
    pub shard_count: u32,
    pub route_fn: u32,
    /// The shard that answered (the front address is served by shard 0).
    pub answering_shard: u32,
    pub sector_size: u32,
    pub max_payload: u32,
    pub max_chunk_size: u64,
    /// `shard_addrs[i]` accepts connections served directly by shard `i`.
    pub shard_addrs: Vec<String>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WriteRequest {
    pub chunk: u128,
    pub offset: u64,
    /// crc32c of the payload that follows the body.
    pub payload_crc: u32,
    /// No WRITE flag is defined: must be 0 (else MALFORMED).
    pub flags: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WriteReply {
    /// The chunk's version after this write (starts at 1, +1 per write).
    pub version: u64,
    /// The chunk's length after this write.
    pub chunk_len: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    pub chunk: u128,
    pub offset: u64,
    pub len: u32,
    /// `READ_FLAG_*` bits; a server refuses bits it does not know
    /// (MALFORMED) rather than ignore what a client asked for.
    pub flags: u32,
}

/// READ flag: this read belongs to a sequential stream that goes on, after
/// the end of this chunk, at offset 0 of chunk id + 1 (a run of consecutive
/// ids read in order). The server may read the next chunk ahead; a hint
/// only, with no effect on what the READ returns.
pub const READ_FLAG_NEXT_CHUNK: u32 = 1;
/// Every READ flag this protocol version defines.
pub const READ_FLAGS_KNOWN: u32 = READ_FLAG_NEXT_CHUNK;

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ReadReply {
    pub version: u64,
    pub chunk_len: u64,
    /// crc32c of the payload that follows the body. The payload is shorter
    /// than requested when the read reaches the end of the chunk.
    pub payload_crc: u32,
}

/// Body of STAT and DELETE requests.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ChunkRequest {
    pub chunk: u128,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StatReply {
    pub chunk_len: u64,
    pub version: u64,
    /// Nanoseconds since the Unix epoch.
    pub created_ns: u64,
    pub modified_ns: u64,
    pub shard: u32,
    /// Bytes of device space the chunk's live sectors take.
    pub allocated_bytes: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DeleteReply {
    /// The version the chunk had when it was deleted.
    pub version: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ListRequest {
    pub shard: u32,
    /// List chunks with ids strictly greater than this one, unless `from_start`.
    pub after: u128,
    pub from_start: bool,
    pub limit: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    pub chunk: u128,
    pub chunk_len: u64,
    pub version: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ListReply {
    pub entries: Vec<ListEntry>,
    /// More entries follow the last one returned.
    pub more: bool,
}

/// Body of every reply with [`crate::FLAG_ERROR`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    /// An [`crate::ErrorCode`] as u16 (unknown codes are kept, not rejected).
    pub code: u16,
    /// The chunk concerned, or 0.
    pub chunk: u128,
    /// For CORRUPT: the sector index within the chunk; else 0.
    pub sector: u64,
    pub message: String,
}

/// Counters of one shard (reply to STATS). `requests` and `errors` are indexed
/// by opcode number.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct StatsReply {
    pub shard: u32,
    pub requests: Vec<u64>,
    pub errors: Vec<u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub forwarded_out: u64,
    pub forwarded_in: u64,
    pub forward_busy: u64,
    pub connections: u64,
    pub connections_total: u64,
    pub malformed_frames: u64,
    pub chunks: u64,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub device_writes: u64,
    pub flushes: u64,
    pub corrupt_errors: u64,
    pub fail_stopped: bool,
    /// Connections refused at the connection limit.
    pub refused_connections: u64,
    /// Connections closed by a frame, idle, write or handshake timeout.
    pub timeouts: u64,
    /// Requests refused with BUSY by the shard's buffer budget (those a
    /// full forward queue refused are in `forward_busy`, not here).
    pub busy: u64,
    /// Connections that failed authentication.
    pub auth_failures: u64,
    /// Payload buffer bytes held now, and the shard's budget for them.
    pub buffer_bytes_used: u64,
    pub buffer_bytes_limit: u64,
    /// Requests executing on the shard now.
    pub in_flight: u64,
    /// Upper bounds (microseconds) of the latency buckets; one more bucket,
    /// unbounded, follows the last.
    pub latency_bounds_us: Vec<u64>,
    /// Per-opcode latency histograms, opcode-major: entry
    /// `op * (latency_bounds_us.len() + 1) + bucket` counts requests of
    /// opcode `op` whose execution took at most that bucket's bound.
    pub latency_counts: Vec<u64>,
    /// Background scrubber: passes finished, sectors verified, bad sectors found.
    pub scrub_passes: u64,
    pub scrub_sectors: u64,
    pub scrub_errors: u64,
    /// Read cache slice: configured and used bytes, entries (4 KiB sectors).
    pub cache_capacity_bytes: u64,
    pub cache_bytes: u64,
    pub cache_entries: u64,
    /// Sectors client reads found in the cache, and read from the device.
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_evictions: u64,
    /// READs served entirely from the cache, and the others.
    pub cached_reads: u64,
    pub uncached_reads: u64,
    pub prefetch_enabled: bool,
    /// Sectors read ahead; of those, read by a client; evicted unread.
    pub prefetch_issued: u64,
    pub prefetch_used: u64,
    pub prefetch_wasted: u64,
    /// READ execution time split by cached / uncached (buckets of
    /// `latency_bounds_us`, one more unbounded).
    pub read_cached_latency: Vec<u64>,
    pub read_uncached_latency: Vec<u64>,
    /// Index checkpoints finished; writes that waited for one (their
    /// shard's space reservation ran out first); the last one's duration
    /// and the index records it wrote.
    pub checkpoints: u64,
    pub checkpoint_waits: u64,
    pub last_checkpoint_us: u64,
    pub last_checkpoint_keys: u64,
    /// Tombstone records held; tombstones retired by sweep passes; passes
    /// finished; old headers of deleted chunks they erased.
    pub tombstones: u64,
    pub tombstones_retired: u64,
    pub sweep_passes: u64,
    pub sweep_erased: u64,
    /// Read-ahead hints of streams crossing into the next chunk id: sent to
    /// the shard owning it, received from other shards, and dropped because
    /// the owner's hint queue was full (or it had stopped).
    pub stream_hints_out: u64,
    pub stream_hints_in: u64,
    pub stream_hints_dropped: u64,
    /// Extent writes that went to the device inside a write started for
    /// another one (write combining); `device_writes` counts that once.
    pub combined_writes: u64,
    /// Requests forwarded to their owner that got no answer within
    /// `forward_timeout` (answered TIMEOUT here).
    pub forward_timeouts: u64,
    /// Connections whose TLS handshake failed (a handshake that timed out
    /// is counted in `timeouts`).
    pub tls_failures: u64,
    /// Bytes of the read buffers the cache's entries keep alive (an entry
    /// shares its read's buffer: at least `cache_bytes`, bounded to about
    /// 2.5 times the capacity), and sectors given a copy of their own so a
    /// mostly evicted buffer could go.
    pub cache_held_bytes: u64,
    pub cache_compacted: u64,
}

/// Reply to HELLO: whether this server requires authentication, and the
/// nonce the client's proof must cover.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    pub auth_required: bool,
    pub server_nonce: [u8; 32],
}

/// Body of AUTH: the client's nonce and its proof
/// (see [`crate::auth::client_proof`]).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AuthRequest {
    pub client_nonce: [u8; 32],
    pub proof: [u8; 32],
}

/// Reply to a successful AUTH: the server's proof that it holds the secret too.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AuthReply {
    pub server_proof: [u8; 32],
}
