//! Bytes returned by a read, as segments that point into the buffers the
//! device filled (glommio `ReadResult`s, or heap buffers of the simulated
//! disk), so a server can hand them to the socket without copying. Holes
//! read as zeros from one static buffer.

use smallvec::SmallVec;

use crate::layout::{crc_then_sector, SECTOR};
use crate::storage::ReadBuf;

const ZEROS_LEN: usize = 64 << 10;
const COMBINE_ABOVE: usize = 64 << 10;
static ZEROS: [u8; ZEROS_LEN] = [0; ZEROS_LEN];

#[derive(Clone, Debug)]
enum Segment {
    /// Bytes, and their crc32c when the read already knows it.
    Disk(ReadBuf, Option<u32>),
    /// At most `ZEROS_LEN` zero bytes.
    Zeros(usize),
}

/// The bytes of a read, in order, as borrowed segments.
#[derive(Clone, Debug, Default)]
pub struct ReadData {
    /// Inline room for the common one- or two-piece read (no allocation).
    segments: SmallVec<[Segment; 2]>,
    len: usize,
}

impl ReadData {
    /// Appends `rr`; `crc`: its crc32c if known (saves a pass over it).
    pub(crate) fn push_disk(&mut self, rr: ReadBuf, crc: Option<u32>) {
        if rr.is_empty() {
            return;
        }
        self.len += rr.len();
        self.segments.push(Segment::Disk(rr, crc));
    }

    pub(crate) fn push_zeros(&mut self, mut n: usize) {
        self.len += n;
        while n > 0 {
            let piece = n.min(ZEROS_LEN);
            self.segments.push(Segment::Zeros(piece));
            n -= piece;
        }
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, segment by segment, without copying.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> {
        self.segments.iter().map(|s| match s {
            Segment::Disk(rr, _) => &rr[..],
            Segment::Zeros(n) => &ZEROS[..*n],
        })
    }

    /// crc32c of all the bytes (chained over the segments). A segment whose
    /// crc is known is not read again: the first one's crc is the running
    /// value, a long later one is combined (`crc32c_combine` costs about as
    /// much as hashing 64 KiB).
    pub fn crc32c(&self) -> u32 {
        let mut acc = 0;
        for (i, seg) in self.segments.iter().enumerate() {
            acc = match seg {
                Segment::Disk(_, Some(c)) if i == 0 => *c,
                Segment::Disk(rr, Some(c)) if rr.len() % SECTOR as usize == 0 => {
                    // Shift by whole sectors with the precomputed operator
                    // (a few ns per sector; `crc32c_combine` rebuilds its
                    // operator on every call).
                    let shifted =
                        (0..rr.len() / SECTOR as usize).fold(acc, |a, _| crc_then_sector(a, 0));
                    shifted ^ *c
                }
                Segment::Disk(rr, Some(c)) if rr.len() >= COMBINE_ABOVE => {
                    crc32c::crc32c_combine(acc, *c, rr.len())
                }
                Segment::Disk(rr, _) => crc32c::crc32c_append(acc, rr),
                Segment::Zeros(n) => crc32c::crc32c_append(acc, &ZEROS[..*n]),
            };
        }
        acc
    }

    /// A copy of all the bytes in one vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len);
        for s in self.slices() {
            v.extend_from_slice(s);
        }
        v
    }

    /// Copies `self[at..at + out.len()]` into `out` (used for read-modify-write).
    pub(crate) fn copy_range(&self, mut at: usize, out: &mut [u8]) {
        assert!(at + out.len() <= self.len);
        let mut filled = 0;
        for s in self.slices() {
            if filled == out.len() {
                break;
            }
            if at >= s.len() {
                at -= s.len();
                continue;
            }
            let n = (s.len() - at).min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&s[at..at + n]);
            filled += n;
            at = 0;
        }
        assert_eq!(filled, out.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_are_split_and_copied() {
        let mut d = ReadData::default();
        d.push_zeros(ZEROS_LEN * 2 + 3);
        assert_eq!(d.len(), ZEROS_LEN * 2 + 3);
        assert_eq!(d.slices().count(), 3);
        assert!(d.to_vec().iter().all(|&b| b == 0));
        assert_eq!(d.crc32c(), crc32c::crc32c(&d.to_vec()));
        let mut out = [1u8; 10];
        d.copy_range(ZEROS_LEN - 5, &mut out);
        assert_eq!(out, [0u8; 10]);
    }

    #[test]
    fn known_segment_crcs_chain_like_the_bytes() {
        let bytes = |n: usize, seed: u8| -> Vec<u8> {
            (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
        };
        let (a, b, c) = (bytes(5000, 1), bytes((100 << 10) + 1, 2), bytes(300, 3));
        let whole = bytes(3 * SECTOR as usize, 4);
        let mut d = ReadData::default();
        d.push_disk(ReadBuf::from_vec(a.clone()), Some(crc32c::crc32c(&a)));
        d.push_zeros(7);
        d.push_disk(ReadBuf::from_vec(b.clone()), Some(crc32c::crc32c(&b)));
        d.push_disk(ReadBuf::from_vec(c.clone()), None);
        d.push_disk(
            ReadBuf::from_vec(whole.clone()),
            Some(crc32c::crc32c(&whole)),
        );
        assert_eq!(d.crc32c(), crc32c::crc32c(&d.to_vec()));
    }
}
