//! Values written in verify mode and how a read is checked.
//!
//! The unit of verification is a *piece*: the bytes one write puts at one
//! offset of a chunk. Without `--io-size` a chunk is one piece (offset 0,
//! the whole value); with it, a chunk of `--size` bytes is `size / io_size`
//! pieces, piece `p` covering `[p * io_size, (p + 1) * io_size)`. Each piece
//! has its own version (the writer's write count for that piece, from 1), so
//! rewriting one piece never changes what the others must hold, and every
//! piece carries its own header, so a read at any aligned offset explains
//! itself. A piece is a 32-byte header followed by a byte stream, both a pure
//! function of (key, offset, version, seed), so the reader recomputes
//! exactly what the piece's single writer wrote:
//!
//! ```text
//! 0..8    magic "SSLGVAL1"
//! 8..16   key (u64 LE)
//! 16..20  version of this piece (u32 LE)
//! 20..24  byte offset of this piece in the chunk (u32 LE; 0 for whole values)
//! 24..28  low 32 bits of the seed (u32 LE)
//! 28..32  piece length (u32 LE)
//! 32..    stream(key, offset, version, seed)
//! ```
//!
//! (A whole value's header is the same bytes as before pieces existed: the
//! version was a u64 whose high half was always zero.) The header makes a
//! failure explainable: a misdirected write shows another key or offset, a
//! lost or stale write an older version, a torn one a wrong tail.

use crate::keys::{hash_words, mix64};
use std::fmt;

pub const MAGIC: [u8; 8] = *b"SSLGVAL1";
pub const HEADER_LEN: usize = 32;

/// The stream part: 8 bytes per step, seeded by (key, offset, version, seed).
fn fill_stream(out: &mut [u8], key: u64, offset: u64, version: u64, seed: u64) {
    let mut state = hash_words(&[seed, key, version, offset]);
    for chunk in out.chunks_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let w = mix64(state).to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
}

/// Where a piece lives: its chunk's key and its byte offset in the chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceAt {
    pub key: u64,
    pub offset: u64,
}

/// The full piece `version` at `at`, `len` bytes (`len >= HEADER_LEN`;
/// versions and offsets fit in u32: the loadgen counts versions in u32 and
/// chunks are at most `MAX_VALUE_SIZE`).
pub fn value(at: PieceAt, version: u64, seed: u64, len: usize) -> Vec<u8> {
    assert!(
        len >= HEADER_LEN,
        "verify values carry a {HEADER_LEN}-byte header"
    );
    let version32 = u32::try_from(version).expect("piece versions are counted in u32");
    let offset32 = u32::try_from(at.offset).expect("chunk offsets fit in u32");
    let mut v = vec![0u8; len];
    v[0..8].copy_from_slice(&MAGIC);
    v[8..16].copy_from_slice(&at.key.to_le_bytes());
    v[16..20].copy_from_slice(&version32.to_le_bytes());
    v[20..24].copy_from_slice(&offset32.to_le_bytes());
    v[24..28].copy_from_slice(&(seed as u32).to_le_bytes());
    v[28..32].copy_from_slice(&(len as u32).to_le_bytes());
    fill_stream(&mut v[HEADER_LEN..], at.key, at.offset, version, seed);
    v
}

/// Why a read's bytes are not what the key's writer wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    Short {
        got: usize,
        want: usize,
    },
    BadMagic,
    WrongKey {
        found: u64,
    },
    WrongSeed {
        found: u32,
    },
    /// The piece belongs at another offset of the chunk.
    WrongOffset {
        found: u64,
    },
    /// The value's version is outside what may be on the server.
    WrongVersion {
        found: u64,
        low: u64,
        high: u64,
    },
    WrongLength {
        found: u64,
        want: u64,
    },
    /// Header fine, payload differs from the first differing byte on.
    Bytes {
        first_bad_offset: usize,
    },
    /// Version `found` whole, but the bytes past its length are a newer,
    /// longer version's: that write (not acknowledged) partly landed.
    Torn {
        found: u64,
        newer: u64,
    },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Short { got, want } => write!(f, "short read: {got} bytes, expected {want}"),
            Mismatch::BadMagic => write!(f, "no value header (bad magic)"),
            Mismatch::WrongKey { found } => {
                write!(f, "value belongs to key {found} (misdirected write?)")
            }
            Mismatch::WrongSeed { found } => {
                write!(f, "value written with seed {found:#x} (another run?)")
            }
            Mismatch::WrongOffset { found } => {
                write!(f, "piece belongs at offset {found} (misplaced write?)")
            }
            Mismatch::WrongVersion { found, low, high } => {
                if low == high {
                    write!(f, "version {found}, expected {low} (lost or stale write?)")
                } else {
                    write!(
                        f,
                        "version {found}, expected {low}..={high} (lost or stale write?)"
                    )
                }
            }
            Mismatch::WrongLength { found, want } => {
                write!(f, "header length {found}, expected {want}")
            }
            Mismatch::Bytes { first_bad_offset } => {
                write!(f, "payload differs from byte {first_bad_offset} on")
            }
            Mismatch::Torn { found, newer } => write!(
                f,
                "version {found} followed by the tail of version {newer} (torn write)"
            ),
        }
    }
}

/// Checks `data`, a read of `requested` bytes of the piece at `at`, whose
/// last write was version `high` and whose last *acknowledged* write was
/// `low` (they differ after a failed write, which may or may not have
/// landed). `len_of(version)` gives the length that version was written with.
pub fn check(
    data: &[u8],
    requested: usize,
    at: PieceAt,
    seed: u64,
    low: u64,
    high: u64,
    len_of: impl Fn(u64) -> u64,
) -> Result<u64, Mismatch> {
    let need = requested.min(HEADER_LEN);
    if data.len() < need {
        return Err(Mismatch::Short {
            got: data.len(),
            want: need,
        });
    }
    if data[0..8] != MAGIC {
        return Err(Mismatch::BadMagic);
    }
    let word = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b[..r.len()].copy_from_slice(&data[r]);
        u64::from_le_bytes(b)
    };
    let found_key = word(8..16);
    if found_key != at.key {
        return Err(Mismatch::WrongKey { found: found_key });
    }
    let found_seed = word(24..28) as u32;
    if found_seed != seed as u32 {
        return Err(Mismatch::WrongSeed { found: found_seed });
    }
    let found_offset = word(20..24);
    if found_offset != at.offset {
        return Err(Mismatch::WrongOffset {
            found: found_offset,
        });
    }
    let version = word(16..20);
    if version < low || version > high {
        return Err(Mismatch::WrongVersion {
            found: version,
            low,
            high,
        });
    }
    let len = word(28..32);
    let want_len = len_of(version);
    if len != want_len {
        return Err(Mismatch::WrongLength {
            found: len,
            want: want_len,
        });
    }
    // Bytes past this version's length may be the tail of an older, longer
    // version: only this version's bytes are checked, and all of them must
    // be there.
    let expect_len = (len as usize).min(requested);
    if data.len() < expect_len {
        return Err(Mismatch::Short {
            got: data.len(),
            want: expect_len,
        });
    }
    let want = value(at, version, seed, len as usize);
    if let Some(i) = (HEADER_LEN..expect_len).find(|&i| data[i] != want[i]) {
        return Err(Mismatch::Bytes {
            first_bad_offset: i,
        });
    }
    // Past this version's length an older, longer version's bytes may
    // follow, never a newer one's: those would be the tail of a write that
    // did not land whole. Compared on up to TORN_PROBE bytes (at least
    // TORN_MIN, so that a chance match of pseudo-random bytes is out).
    // Only when the version found is the acknowledged one: every newer one
    // was then sent after its acknowledgement. A newer version found may
    // itself have been applied after a later, longer one.
    if version == low {
        for newer in version + 1..=high {
            let newer_len = (len_of(newer) as usize).min(data.len());
            let end = newer_len.min(expect_len + TORN_PROBE);
            if end >= expect_len + TORN_MIN {
                let theirs = value(at, newer, seed, end);
                if data[expect_len..end] == theirs[expect_len..end] {
                    return Err(Mismatch::Torn {
                        found: version,
                        newer,
                    });
                }
            }
        }
    }
    Ok(version)
}

/// Bytes past a version's length compared with a newer version's (see
/// `check`): at most, and at least for a verdict.
const TORN_PROBE: usize = 64;
const TORN_MIN: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_of_a_newer_longer_version_is_a_torn_write() {
        let len_of = |v: u64| if v % 2 == 0 { 300 } else { 100 };
        let (v1, v2) = (value(at(5), 1, 7, 100), value(at(5), 2, 7, 300));
        // Version 1 acknowledged, version 2 failed: its header did not
        // land, its tail did.
        let mut torn = v1.clone();
        torn.extend_from_slice(&v2[100..]);
        assert_eq!(
            check(&torn, 300, at(5), 7, 1, 2, len_of),
            Err(Mismatch::Torn { found: 1, newer: 2 })
        );
        // Version 3 (shorter) over version 2: 2's tail stays, and a failed
        // version 4 (as long as 2) did not land.
        let mut kept = value(at(5), 3, 7, 100);
        kept.extend_from_slice(&v2[100..]);
        assert_eq!(check(&kept, 300, at(5), 7, 3, 4, len_of), Ok(3));
        assert_eq!(check(&kept, 300, at(5), 7, 3, 3, len_of), Ok(3));
        // Version 5 (short) over version 6 (long), neither acknowledged (4
        // was): the server may have applied 6 first. Not a tear.
        let mut late = value(at(5), 5, 7, 100);
        late.extend_from_slice(&value(at(5), 6, 7, 300)[100..]);
        assert_eq!(check(&late, 300, at(5), 7, 4, 6, len_of), Ok(5));
    }

    fn at(key: u64) -> PieceAt {
        PieceAt { key, offset: 0 }
    }

    #[test]
    fn good_values_pass_and_damage_is_named() {
        let len_of = |_v| 4096;
        let v = value(at(7), 3, 99, 4096);
        assert_eq!(check(&v, 4096, at(7), 99, 3, 3, len_of), Ok(3));
        assert_eq!(check(&v, 4096, at(7), 99, 2, 3, len_of), Ok(3));
        assert_eq!(
            check(&v, 4096, at(8), 99, 3, 3, len_of),
            Err(Mismatch::WrongKey { found: 7 })
        );
        assert_eq!(
            check(&v, 4096, at(7), 99, 4, 4, len_of),
            Err(Mismatch::WrongVersion {
                found: 3,
                low: 4,
                high: 4
            })
        );
        assert!(matches!(
            check(&v, 4096, at(7), 98, 3, 3, len_of),
            Err(Mismatch::WrongSeed { .. })
        ));
        let mut bad = v.clone();
        bad[1000] ^= 1;
        assert_eq!(
            check(&bad, 4096, at(7), 99, 3, 3, len_of),
            Err(Mismatch::Bytes {
                first_bad_offset: 1000
            })
        );
        assert!(matches!(
            check(&v[..100], 4096, at(7), 99, 3, 3, len_of),
            Err(Mismatch::Short { .. })
        ));
        let mut zeros = v.clone();
        zeros[..8].fill(0);
        assert_eq!(
            check(&zeros, 4096, at(7), 99, 3, 3, len_of),
            Err(Mismatch::BadMagic)
        );
    }

    #[test]
    fn a_shorter_new_version_over_a_longer_old_one_checks_out() {
        let old = value(at(1), 1, 5, 200);
        let new = value(at(1), 2, 5, 100);
        let mut on_disk = old.clone();
        on_disk[..100].copy_from_slice(&new);
        let len_of = |v| if v == 1 { 200 } else { 100 };
        assert_eq!(check(&on_disk, 100, at(1), 5, 2, 2, len_of), Ok(2));
        assert_eq!(check(&on_disk, 200, at(1), 5, 2, 2, len_of), Ok(2));
    }

    #[test]
    fn values_differ_by_version_and_key() {
        assert_ne!(value(at(1), 1, 0, 64), value(at(1), 2, 0, 64));
        assert_ne!(value(at(1), 1, 0, 64), value(at(2), 1, 0, 64));
        assert_eq!(value(at(1), 1, 0, 64), value(at(1), 1, 0, 64));
    }

    #[test]
    fn pieces_name_their_offset_and_do_not_pass_for_each_other() {
        let p0 = PieceAt { key: 3, offset: 0 };
        let p1 = PieceAt {
            key: 3,
            offset: 1 << 20,
        };
        let len_of = |_v| 4096;
        let v1 = value(p1, 2, 9, 4096);
        assert_eq!(check(&v1, 4096, p1, 9, 2, 2, len_of), Ok(2));
        assert_eq!(
            check(&v1, 4096, p0, 9, 2, 2, len_of),
            Err(Mismatch::WrongOffset { found: 1 << 20 })
        );
        // Same key, version and seed at another offset: other bytes.
        assert_ne!(value(p0, 2, 9, 4096)[HEADER_LEN..], v1[HEADER_LEN..]);
        // A whole value keeps the header it had before pieces: version as a
        // u64 whose high half is zero.
        let whole = value(p0, 7, 9, 64);
        assert_eq!(whole[16..24], 7u64.to_le_bytes());
    }
}
