//! Limits both sides of the wire agree on. A server may configure lower values
//! (it advertises its own in the TOPOLOGY reply); it never accepts higher ones.

/// Unit of checksumming and of device I/O.
pub const SECTOR_SIZE: u32 = 4096;
/// Largest chunk: offsets and lengths are checked against this.
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// Largest bulk payload of one WRITE request or READ reply.
pub const MAX_PAYLOAD: u32 = 8 << 20;
/// Largest rkyv body of any frame. Bodies are small, flat records.
pub const MAX_BODY: u32 = 16 << 10;
/// Most entries one LIST reply carries.
pub const MAX_LIST_LIMIT: u32 = 256;
/// Most shards a node can have.
pub const MAX_SHARDS: u32 = 256;
/// Longest message text in an error body.
pub const MAX_ERROR_MESSAGE: usize = 512;

const _: () = assert!(MAX_PAYLOAD % SECTOR_SIZE == 0);
const _: () = assert!(MAX_CHUNK_SIZE % MAX_PAYLOAD as u64 == 0);
const _: () = assert!((MAX_PAYLOAD as u64) <= MAX_CHUNK_SIZE);
const _: () = assert!(SECTOR_SIZE.is_power_of_two());
// A LIST reply of MAX_LIST_LIMIT entries (chunk 16 + len 8 + version 8) fits a body.
const _: () = assert!(MAX_LIST_LIMIT * 40 + 64 <= MAX_BODY);

/// Largest whole frame.
pub const MAX_FRAME: u64 = crate::HEADER_LEN as u64 + MAX_BODY as u64 + MAX_PAYLOAD as u64;
