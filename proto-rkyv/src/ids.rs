use std::fmt;
use std::str::FromStr;

/// A chunk's 128-bit identifier. Printed and parsed as 32 hex digits
/// (shorter hex strings are accepted and zero-extended on the left).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ChunkId(pub u128);

impl ChunkId {
    /// Big-endian bytes: sorts the same way as the number, used as index keys.
    pub fn to_be_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }
    pub fn from_be_bytes(bytes: [u8; 16]) -> Self {
        Self(u128::from_be_bytes(bytes))
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunk id {input:?}: expected 1 to 32 hex digits")]
pub struct ParseChunkIdError {
    pub input: String,
}

impl FromStr for ChunkId {
    type Err = ParseChunkIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.strip_prefix("0x").unwrap_or(s);
        if t.is_empty() || t.len() > 32 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseChunkIdError {
                input: s.to_owned(),
            });
        }
        u128::from_str_radix(t, 16)
            .map(ChunkId)
            .map_err(|_| ParseChunkIdError {
                input: s.to_owned(),
            })
    }
}

/// Index of a shard within a node, `0..shard_count`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct ShardId(pub u32);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_id_hex_round_trip() {
        let id = ChunkId(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(id.to_string(), "0123456789abcdeffedcba9876543210");
        assert_eq!(id.to_string().parse::<ChunkId>().unwrap(), id);
        assert_eq!("0x2a".parse::<ChunkId>().unwrap(), ChunkId(42));
        assert!("".parse::<ChunkId>().is_err());
        assert!("xyz".parse::<ChunkId>().is_err());
        assert!("1".repeat(33).parse::<ChunkId>().is_err());
        assert!("+1".parse::<ChunkId>().is_err());
    }
}
