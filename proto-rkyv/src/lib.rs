//! The shardstore wire protocol, shared by server and clients. No I/O here.
//!
//! A frame is a fixed 40-byte [`FrameHeader`], then an rkyv-archived body
//! (`body_len` bytes, checked with `bytecheck` before use), then `payload_len`
//! bytes of bulk payload. Bodies are archived little-endian, unaligned and with
//! 32-bit relative pointers (rkyv features `little_endian`, `unaligned`,
//! `pointer_width_32`), so a body can be validated in place wherever it sits in
//! a receive buffer. Bulk payload is never inside the body: it follows it, so a
//! server can read it straight into the buffer that goes to disk.
//!
//! Invariants kept here:
//! - the header is validated (magic, version, crc, reserved bytes, opcode,
//!   limits) before anything is allocated for the rest of the frame;
//! - [`route`] is the one definition of chunk ownership (invariant 1);
//! - every limit both sides must agree on lives in [`limits`].

pub mod auth;
mod error;
mod frame;
mod ids;
pub mod limits;
mod messages;
mod route;

pub use error::{ErrorCode, HeaderError, ProtoError};
pub use frame::{
    access_body, encode_body, encode_frame, FrameHeader, Opcode, FLAG_ERROR, FLAG_RESPONSE,
    HEADER_LEN, MAGIC, PROTOCOL_VERSION,
};
pub use ids::{ChunkId, ParseChunkIdError, ShardId};
pub use messages::*;
pub use route::{route, route_hash, ROUTE_FN_JUMP_SPLITMIX};

/// crc32c of a payload as carried in write requests and read replies.
pub fn payload_crc(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}
