//! The control message: a fixed RDMA descriptor, then an unchanged frame.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `b"SRDM"` |
//! | 4 | 2 | version (1) |
//! | 6 | 1 | kind ([`DescriptorKind`]) |
//! | 7 | 1 | reserved, zero |
//! | 8 | 8 | region address |
//! | 16 | 4 | region length |
//! | 20 | 4 | rkey |
//! | 24 | 4 | reserved, zero |
//! | 28 | 4 | crc32c of bytes 0..28 |
//!
//! then the 40-byte frame header, the body, and for `Inline` the payload.

use super::RemoteRegion;
use shardstore_proto::{limits, HEADER_LEN};

pub const DESCRIPTOR_MAGIC: u32 = u32::from_le_bytes(*b"SRDM");
pub const DESCRIPTOR_VERSION: u16 = 1;
pub const DESCRIPTOR_LEN: usize = 32;
/// Largest payload carried inside a control message; larger ones move by
/// RDMA read/write.
pub const INLINE_MAX: usize = 4096;
/// Largest control message.
pub const CONTROL_MAX: usize = DESCRIPTOR_LEN + HEADER_LEN + limits::MAX_BODY as usize + INLINE_MAX;

const _: () = assert!(INLINE_MAX <= limits::MAX_PAYLOAD as usize);
const _: () = assert!(INLINE_MAX % limits::SECTOR_SIZE as usize == 0);

/// What a descriptor says about the frame's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DescriptorKind {
    /// No payload, or `payload_len <= INLINE_MAX` bytes after the body.
    Inline = 0,
    /// The payload (`payload_len` bytes) is in the sender's region: RDMA-read it.
    Source = 1,
    /// A request without payload offering a region for the reply's payload.
    Sink = 2,
    /// A reply whose payload was RDMA-written into the request's sink.
    Written = 3,
}

/// A decoded, validated descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub kind: DescriptorKind,
    pub region: RemoteRegion,
}

impl Descriptor {
    pub const INLINE: Descriptor = Descriptor {
        kind: DescriptorKind::Inline,
        region: RemoteRegion {
            addr: 0,
            len: 0,
            rkey: 0,
        },
    };

    pub fn to_bytes(&self) -> [u8; DESCRIPTOR_LEN] {
        let mut b = [0u8; DESCRIPTOR_LEN];
        b[0..4].copy_from_slice(&DESCRIPTOR_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&DESCRIPTOR_VERSION.to_le_bytes());
        b[6] = self.kind as u8;
        b[8..16].copy_from_slice(&self.region.addr.to_le_bytes());
        b[16..20].copy_from_slice(&self.region.len.to_le_bytes());
        b[20..24].copy_from_slice(&self.region.rkey.to_le_bytes());
        let crc = crc32c::crc32c(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and validates the fixed fields (not the lengths: see
    /// [`decode_control`], which knows the frame).
    pub fn from_bytes(b: &[u8; DESCRIPTOR_LEN]) -> Result<Descriptor, DescriptorError> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        if u32_at(0) != DESCRIPTOR_MAGIC {
            return Err(DescriptorError::BadMagic(u32_at(0)));
        }
        let computed = crc32c::crc32c(&b[..28]);
        if computed != u32_at(28) {
            return Err(DescriptorError::BadCrc);
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != DESCRIPTOR_VERSION {
            return Err(DescriptorError::UnsupportedVersion(version));
        }
        if b[7] != 0 || u32_at(24) != 0 {
            return Err(DescriptorError::ReservedNotZero);
        }
        let kind = match b[6] {
            0 => DescriptorKind::Inline,
            1 => DescriptorKind::Source,
            2 => DescriptorKind::Sink,
            3 => DescriptorKind::Written,
            k => return Err(DescriptorError::UnknownKind(k)),
        };
        Ok(Descriptor {
            kind,
            region: RemoteRegion {
                addr: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
                len: u32_at(16),
                rkey: u32_at(20),
            },
        })
    }
}

/// Why a control message's descriptor (or its agreement with the frame) is bad.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    #[error("control message of {0} bytes is shorter than descriptor and header")]
    Short(usize),
    #[error("control message of {0} bytes exceeds {CONTROL_MAX}")]
    TooLong(usize),
    #[error("bad descriptor magic {0:#010x}")]
    BadMagic(u32),
    #[error("descriptor crc mismatch")]
    BadCrc,
    #[error("unsupported descriptor version {0}")]
    UnsupportedVersion(u16),
    #[error("descriptor reserved bytes are not zero")]
    ReservedNotZero,
    #[error("unknown descriptor kind {0}")]
    UnknownKind(u8),
    #[error("control message length {got} does not match the frame ({want})")]
    LengthMismatch { got: usize, want: usize },
    #[error("inline payload of {0} bytes exceeds {INLINE_MAX}")]
    InlineTooLarge(u32),
    #[error(
        "descriptor {kind:?} of {len} bytes does not fit a frame with payload_len {payload_len}"
    )]
    Disagrees {
        kind: DescriptorKind,
        len: u32,
        payload_len: u32,
    },
}

/// Appends a control message: `desc`, then `frame` (header and body, as
/// encoded for TCP), then `inline` payload bytes.
pub fn encode_control(desc: &Descriptor, frame: &[u8], inline: &[u8], out: &mut Vec<u8>) {
    debug_assert!(inline.len() <= INLINE_MAX);
    out.extend_from_slice(&desc.to_bytes());
    out.extend_from_slice(frame);
    out.extend_from_slice(inline);
}

/// Splits and validates a control message. The frame header is validated by
/// [`shardstore_proto::FrameHeader::decode`] with `max_payload`; the body crc
/// is checked by the caller ([`super::RdmaConn::recv`]).
///
/// Returns the descriptor, the raw header bytes, and the rest (body, inline payload).
pub fn decode_control(
    msg: &[u8],
    max_payload: u32,
) -> Result<(Descriptor, [u8; HEADER_LEN], &[u8]), super::RdmaError> {
    use super::RdmaError;
    use crate::FrameError;
    use shardstore_proto::FrameHeader;
    if msg.len() < DESCRIPTOR_LEN + HEADER_LEN {
        return Err(DescriptorError::Short(msg.len()).into());
    }
    if msg.len() > CONTROL_MAX {
        return Err(DescriptorError::TooLong(msg.len()).into());
    }
    let desc = Descriptor::from_bytes(msg[..DESCRIPTOR_LEN].try_into().expect("32 bytes"))?;
    let raw: [u8; HEADER_LEN] = msg[DESCRIPTOR_LEN..DESCRIPTOR_LEN + HEADER_LEN]
        .try_into()
        .expect("HEADER_LEN bytes");
    let header = match FrameHeader::decode(&raw, max_payload) {
        Ok((h, _)) => h,
        Err(err) => {
            let request_id = FrameHeader::request_id_trusted(&raw)
                .then(|| FrameHeader::from_bytes(&raw).request_id);
            return Err(RdmaError::Frame(FrameError::Header {
                err,
                request_id,
                opcode: raw[6],
            }));
        }
    };
    let rest = &msg[DESCRIPTOR_LEN + HEADER_LEN..];
    let payload_len = header.payload_len;
    // From here the header is sound: errors name its request, to answer.
    let answerable = |err: DescriptorError| RdmaError::Request {
        request_id: header.request_id,
        opcode: raw[6],
        err,
    };
    let disagrees = || {
        answerable(DescriptorError::Disagrees {
            kind: desc.kind,
            len: desc.region.len,
            payload_len,
        })
    };
    let inline = match desc.kind {
        DescriptorKind::Inline => {
            if payload_len as usize > INLINE_MAX {
                return Err(answerable(DescriptorError::InlineTooLarge(payload_len)));
            }
            payload_len as usize
        }
        DescriptorKind::Source => {
            if payload_len == 0 || desc.region.len != payload_len {
                return Err(disagrees());
            }
            0
        }
        DescriptorKind::Sink => {
            if payload_len != 0 || desc.region.len == 0 || desc.region.len > limits::MAX_PAYLOAD {
                return Err(disagrees());
            }
            0
        }
        DescriptorKind::Written => {
            if desc.region.len != payload_len {
                return Err(disagrees());
            }
            0
        }
    };
    let want = header.body_len as usize + inline;
    if rest.len() != want {
        return Err(answerable(DescriptorError::LengthMismatch {
            got: msg.len(),
            want: DESCRIPTOR_LEN + HEADER_LEN + want,
        }));
    }
    Ok((desc, raw, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardstore_proto::{encode_frame, ChunkRequest, Opcode};

    fn stat_frame() -> Vec<u8> {
        let mut f = Vec::new();
        encode_frame(Opcode::Stat, 0, 7, &ChunkRequest { chunk: 3 }, 0, &mut f);
        f
    }

    #[test]
    fn descriptor_round_trips_and_every_bit_flip_is_caught() {
        let d = Descriptor {
            kind: DescriptorKind::Source,
            region: RemoteRegion {
                addr: 0x7f00_1234_5000,
                len: 1 << 20,
                rkey: 0xdead_beef,
            },
        };
        let b = d.to_bytes();
        assert_eq!(Descriptor::from_bytes(&b).unwrap(), d);
        for i in 0..DESCRIPTOR_LEN * 8 {
            let mut c = b;
            c[i / 8] ^= 1 << (i % 8);
            assert!(Descriptor::from_bytes(&c).is_err(), "bit {i}");
        }
    }

    #[test]
    fn lengths_must_agree_with_the_frame() {
        let f = stat_frame();
        let mut m = Vec::new();
        encode_control(&Descriptor::INLINE, &f, &[], &mut m);
        assert!(decode_control(&m, limits::MAX_PAYLOAD).is_ok());
        // One extra byte after the body: the header is sound, so the error
        // names its request (it was answered with nothing).
        m.push(0);
        let e = decode_control(&m, limits::MAX_PAYLOAD).unwrap_err();
        assert!(matches!(
            e,
            crate::rdma::RdmaError::Request {
                err: DescriptorError::LengthMismatch { .. },
                ..
            }
        ));
        assert_eq!(e.request_id(), Some((7, Opcode::Stat as u8)));
        // A source descriptor on a frame without payload.
        let mut m = Vec::new();
        let src = Descriptor {
            kind: DescriptorKind::Source,
            region: RemoteRegion {
                addr: 1,
                len: 10,
                rkey: 1,
            },
        };
        encode_control(&src, &f, &[], &mut m);
        let e = decode_control(&m, limits::MAX_PAYLOAD).unwrap_err();
        assert_eq!(e.request_id(), Some((7, Opcode::Stat as u8)), "{e}");
        // Truncated below descriptor + header.
        assert!(decode_control(&m[..50], limits::MAX_PAYLOAD).is_err());
    }
}
