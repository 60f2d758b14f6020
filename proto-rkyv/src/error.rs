use crate::limits;

/// Error codes carried in error replies. Stable on the wire: never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The chunk does not exist.
    NotFound = 1,
    /// Stored bytes failed their checksum; the reply names chunk and sector.
    Corrupt = 2,
    /// The payload did not match the crc32c the client sent; nothing was written.
    BadChecksum = 3,
    /// A size limit was exceeded (payload, chunk size, frame, list limit).
    TooLarge = 4,
    /// The request is well formed but its arguments are not acceptable.
    InvalidRequest = 5,
    /// The server is overloaded; retry later.
    Busy = 6,
    /// The shard's data area is full.
    NoSpace = 7,
    /// The shard stopped accepting writes after a device flush error (fail-stop).
    ReadOnly = 8,
    /// A device I/O error other than a checksum mismatch.
    Io = 9,
    /// The frame or body could not be decoded.
    Malformed = 10,
    /// The opcode is not known to this server.
    UnknownOpcode = 11,
    /// The protocol version is not supported by this server.
    UnsupportedVersion = 12,
    /// Authentication is required or failed.
    Unauthorized = 13,
    /// A bug on the server side; the message says more.
    Internal = 14,
    /// The server is shutting down and accepts no new requests.
    ShuttingDown = 15,
    /// The shard that took the request gave up waiting for the shard that
    /// owns the chunk: the request may still take effect.
    Timeout = 16,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Option<Self> {
        use ErrorCode::*;
        Some(match v {
            1 => NotFound,
            2 => Corrupt,
            3 => BadChecksum,
            4 => TooLarge,
            5 => InvalidRequest,
            6 => Busy,
            7 => NoSpace,
            8 => ReadOnly,
            9 => Io,
            10 => Malformed,
            11 => UnknownOpcode,
            12 => UnsupportedVersion,
            13 => Unauthorized,
            14 => Internal,
            15 => ShuttingDown,
            16 => Timeout,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use ErrorCode::*;
        match self {
            NotFound => "NOT_FOUND",
            Corrupt => "CORRUPT",
            BadChecksum => "BAD_CHECKSUM",
            TooLarge => "TOO_LARGE",
            InvalidRequest => "INVALID_REQUEST",
            Busy => "BUSY",
            NoSpace => "NO_SPACE",
            ReadOnly => "READ_ONLY",
            Io => "IO",
            Malformed => "MALFORMED",
            UnknownOpcode => "UNKNOWN_OPCODE",
            UnsupportedVersion => "UNSUPPORTED_VERSION",
            Unauthorized => "UNAUTHORIZED",
            Internal => "INTERNAL",
            ShuttingDown => "SHUTTING_DOWN",
            Timeout => "TIMEOUT",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a frame header was rejected. `request_id_known` tells whether the
/// header's own crc held, so the peer can be answered with a typed error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("header crc mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadHeaderCrc { stored: u32, computed: u32 },
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u16),
    #[error("reserved header bytes are not zero")]
    ReservedNotZero,
    #[error("unknown opcode {0}")]
    UnknownOpcode(u8),
    #[error("unknown flag bits {0:#04x}")]
    UnknownFlags(u8),
    #[error("body of {len} bytes exceeds the limit of {} bytes", limits::MAX_BODY)]
    BodyTooLarge { len: u32 },
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge { len: u32, max: u32 },
    #[error("opcode {0:?} carries no payload but payload_len is non-zero")]
    UnexpectedPayload(crate::Opcode),
}

impl HeaderError {
    /// The error code to answer with, when the request id can be trusted.
    pub fn code(&self) -> ErrorCode {
        match self {
            HeaderError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            HeaderError::UnknownOpcode(_) => ErrorCode::UnknownOpcode,
            HeaderError::BodyTooLarge { .. } | HeaderError::PayloadTooLarge { .. } => {
                ErrorCode::TooLarge
            }
            _ => ErrorCode::Malformed,
        }
    }
}

/// Errors decoding a frame's body or payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("body crc mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadBodyCrc { stored: u32, computed: u32 },
    #[error("invalid body: {0}")]
    InvalidBody(String),
    #[error("payload crc mismatch (expected {expected:#010x}, computed {computed:#010x})")]
    BadPayloadCrc { expected: u32, computed: u32 },
}
