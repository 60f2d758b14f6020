//! The fixed frame header and body encoding helpers.

use crate::{limits, HeaderError, ProtoError};
use rkyv::{api::high::HighValidator, bytecheck::CheckBytes, rancor, Portable};

/// `b"SHRD"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"SHRD");
pub const PROTOCOL_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 40;

/// Set on every reply.
pub const FLAG_RESPONSE: u8 = 0x01;
/// Set on replies whose body is an [`crate::ErrorBody`].
pub const FLAG_ERROR: u8 = 0x02;
const KNOWN_FLAGS: u8 = FLAG_RESPONSE | FLAG_ERROR;

/// Request kinds. A reply carries the opcode of its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Ping = 1,
    Topology = 2,
    Write = 3,
    Read = 4,
    Stat = 5,
    Delete = 6,
    List = 7,
    /// Per-shard counters of the answering shard.
    Stats = 8,
    /// Starts the authentication handshake; the reply carries a server nonce.
    Hello = 9,
    /// Proves knowledge of the shared secret (HMAC-SHA256 over both nonces).
    Auth = 10,
}

impl Opcode {
    pub const ALL: [Opcode; 10] = [
        Opcode::Ping,
        Opcode::Topology,
        Opcode::Write,
        Opcode::Read,
        Opcode::Stat,
        Opcode::Delete,
        Opcode::List,
        Opcode::Stats,
        Opcode::Hello,
        Opcode::Auth,
    ];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|op| *op as u8 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            Opcode::Ping => "ping",
            Opcode::Topology => "topology",
            Opcode::Write => "write",
            Opcode::Read => "read",
            Opcode::Stat => "stat",
            Opcode::Delete => "delete",
            Opcode::List => "list",
            Opcode::Stats => "stats",
            Opcode::Hello => "hello",
            Opcode::Auth => "auth",
        }
    }

    /// Whether a request (`response == false`) or a successful reply with
    /// this opcode may carry bulk payload.
    pub fn carries_payload(self, response: bool) -> bool {
        matches!(
            (self, response),
            (Opcode::Write, false) | (Opcode::Read, true)
        )
    }
}

/// The fixed header that starts every frame, little-endian on the wire:
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | magic `b"SHRD"` |
/// | 4 | 2 | protocol version |
/// | 6 | 1 | opcode |
/// | 7 | 1 | flags |
/// | 8 | 8 | request id |
/// | 16 | 4 | body length |
/// | 20 | 4 | payload length |
/// | 24 | 4 | crc32c of the body |
/// | 28 | 8 | reserved, zero |
/// | 36 | 4 | crc32c of bytes 0..36 |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct FrameHeader {
    pub magic: u32,
    pub version: u16,
    pub opcode: u8,
    pub flags: u8,
    pub request_id: u64,
    pub body_len: u32,
    pub payload_len: u32,
    pub body_crc: u32,
    pub reserved: [u8; 8],
    pub header_crc: u32,
}

const _: () = assert!(std::mem::size_of::<FrameHeader>() == HEADER_LEN);

impl FrameHeader {
    /// A header for `body` and a payload of `payload_len` bytes; crcs filled in.
    pub fn new(opcode: Opcode, flags: u8, request_id: u64, body: &[u8], payload_len: u32) -> Self {
        let mut h = FrameHeader {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            opcode: opcode as u8,
            flags,
            request_id,
            body_len: body.len() as u32,
            payload_len,
            body_crc: crc32c::crc32c(body),
            reserved: [0; 8],
            header_crc: 0,
        };
        h.header_crc = crc32c::crc32c(&h.to_bytes()[..36]);
        h
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6] = self.opcode;
        b[7] = self.flags;
        b[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.body_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.payload_len.to_le_bytes());
        b[24..28].copy_from_slice(&self.body_crc.to_le_bytes());
        b[28..36].copy_from_slice(&self.reserved);
        b[36..40].copy_from_slice(&self.header_crc.to_le_bytes());
        b
    }

    /// Parses the raw fields without judging them; see [`FrameHeader::validate`].
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        FrameHeader {
            magic: u32_at(0),
            version: u16::from_le_bytes([b[4], b[5]]),
            opcode: b[6],
            flags: b[7],
            request_id: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            body_len: u32_at(16),
            payload_len: u32_at(20),
            body_crc: u32_at(24),
            reserved: b[28..36].try_into().expect("8 bytes"),
            header_crc: u32_at(36),
        }
    }

    /// Parses and validates a header. `max_payload` is the receiver's payload
    /// limit (at most [`limits::MAX_PAYLOAD`]).
    ///
    /// On error, [`FrameHeader::request_id_trusted`] tells whether the peer
    /// can be answered: only when the header's own crc held.
    pub fn decode(b: &[u8; HEADER_LEN], max_payload: u32) -> Result<(Self, Opcode), HeaderError> {
        let h = Self::from_bytes(b);
        let op = h.validate(b, max_payload)?;
        Ok((h, op))
    }

    fn validate(&self, raw: &[u8; HEADER_LEN], max_payload: u32) -> Result<Opcode, HeaderError> {
        if self.magic != MAGIC {
            return Err(HeaderError::BadMagic(self.magic));
        }
        let computed = crc32c::crc32c(&raw[..36]);
        if computed != self.header_crc {
            return Err(HeaderError::BadHeaderCrc {
                stored: self.header_crc,
                computed,
            });
        }
        if self.version != PROTOCOL_VERSION {
            return Err(HeaderError::UnsupportedVersion(self.version));
        }
        if self.reserved != [0; 8] {
            return Err(HeaderError::ReservedNotZero);
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(HeaderError::UnknownFlags(self.flags));
        }
        let op = Opcode::from_u8(self.opcode).ok_or(HeaderError::UnknownOpcode(self.opcode))?;
        if self.body_len > limits::MAX_BODY {
            return Err(HeaderError::BodyTooLarge { len: self.body_len });
        }
        let max = max_payload.min(limits::MAX_PAYLOAD);
        if self.payload_len > max {
            return Err(HeaderError::PayloadTooLarge {
                len: self.payload_len,
                max,
            });
        }
        let response = self.flags & FLAG_RESPONSE != 0;
        let error = self.flags & FLAG_ERROR != 0;
        if self.payload_len != 0 && (error || !op.carries_payload(response)) {
            return Err(HeaderError::UnexpectedPayload(op));
        }
        Ok(op)
    }

    /// Whether `raw` at least has a valid magic and header crc, so its
    /// request id and lengths are what the peer meant to send.
    pub fn request_id_trusted(raw: &[u8; HEADER_LEN]) -> bool {
        let h = Self::from_bytes(raw);
        h.magic == MAGIC && crc32c::crc32c(&raw[..36]) == h.header_crc
    }

    pub fn is_response(&self) -> bool {
        self.flags & FLAG_RESPONSE != 0
    }

    pub fn is_error(&self) -> bool {
        self.flags & FLAG_ERROR != 0
    }

    /// Body plus payload length: what follows the header.
    pub fn rest_len(&self) -> usize {
        self.body_len as usize + self.payload_len as usize
    }

    /// Checks the body bytes against the header's body crc.
    pub fn check_body(&self, body: &[u8]) -> Result<(), ProtoError> {
        let computed = crc32c::crc32c(body);
        if computed != self.body_crc {
            return Err(ProtoError::BadBodyCrc {
                stored: self.body_crc,
                computed,
            });
        }
        Ok(())
    }
}

/// Serializes a message body with rkyv, appending to `out`. Returns the body's
/// length.
pub fn encode_body<T>(value: &T, out: &mut Vec<u8>) -> usize
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >,
{
    // Bodies are tiny flat records; serializing into a fresh AlignedVec and
    // appending keeps rkyv's positions relative to the body's own start.
    let bytes = rkyv::to_bytes::<rancor::Error>(value).expect("serializing a message cannot fail");
    out.extend_from_slice(&bytes);
    bytes.len()
}

/// Appends a whole frame (header and body, not the payload) to `out`.
pub fn encode_frame<T>(
    opcode: Opcode,
    flags: u8,
    request_id: u64,
    body: &T,
    payload_len: u32,
    out: &mut Vec<u8>,
) where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >,
{
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    encode_body(body, out);
    let header = FrameHeader::new(
        opcode,
        flags,
        request_id,
        &out[start + HEADER_LEN..],
        payload_len,
    );
    out[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
}

/// Validates an archived body in place (bytecheck) and returns a reference to it.
pub fn access_body<T>(body: &[u8]) -> Result<&T, ProtoError>
where
    T: Portable + for<'a> CheckBytes<HighValidator<'a, rancor::Error>>,
{
    rkyv::access::<T, rancor::Error>(body).map_err(|e| ProtoError::InvalidBody(e.to_string()))
}
