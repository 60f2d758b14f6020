//! Chunk ownership: `route(chunk, shard_count)` is the only place that decides
//! which shard owns a chunk (invariant 1). Client and server both call it; the
//! test vectors below pin its output so they can never drift apart.
//!
//! Function id [`ROUTE_FN_JUMP_SPLITMIX`]: the 128-bit id is folded to 64 bits
//! with the SplitMix64 finalizer (`h = mix(lo ^ mix(hi ^ K))`), then Lamping &
//! Veach's jump consistent hash maps `h` to a bucket. Jump hash moves only
//! `1/n` of the chunks when a node grows from `n-1` to `n` shards, which keeps
//! later resharding cheap.

use crate::{ChunkId, ShardId};

/// Routing function identifier advertised in TOPOLOGY.
pub const ROUTE_FN_JUMP_SPLITMIX: u32 = 1;

const FOLD_KEY: u64 = 0x9e37_79b9_7f4a_7c15;

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 64-bit hash of a chunk id used for routing.
pub fn route_hash(chunk: ChunkId) -> u64 {
    let hi = (chunk.0 >> 64) as u64;
    let lo = chunk.0 as u64;
    mix64(lo ^ mix64(hi ^ FOLD_KEY))
}

fn jump_consistent_hash(mut key: u64, buckets: u32) -> u32 {
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = (((b + 1) as f64) * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// The shard that owns `chunk` on a node with `shard_count` shards.
///
/// # Panics
/// If `shard_count` is zero (a node always has at least one shard).
pub fn route(chunk: ChunkId, shard_count: u32) -> ShardId {
    assert!(shard_count > 0, "shard_count must be positive");
    ShardId(jump_consistent_hash(route_hash(chunk), shard_count))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned outputs. If this test fails, routing changed and every existing
    /// deployment would misroute: bump ROUTE_FN and migrate instead.
    #[test]
    fn route_test_vectors() {
        let ids = [
            0u128,
            1,
            2,
            42,
            0xdead_beef,
            u64::MAX as u128,
            1u128 << 64,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
            u128::MAX,
        ];
        let hashes: Vec<u64> = ids.iter().map(|&i| route_hash(ChunkId(i))).collect();
        let got: Vec<(u32, u32, u32, u32)> = ids
            .iter()
            .map(|&i| {
                let c = ChunkId(i);
                (route(c, 1).0, route(c, 2).0, route(c, 7).0, route(c, 64).0)
            })
            .collect();
        assert_eq!(hashes, EXPECTED_HASHES, "route_hash changed");
        assert_eq!(got, EXPECTED_ROUTES, "route changed");
    }

    const EXPECTED_HASHES: [u64; 9] = [
        5197578548964807871,
        11385487063155714807,
        4455725808831290745,
        5006236285904387910,
        948475220252533093,
        17492683508065611904,
        4922461756044938104,
        4165379993355725701,
        17207452866810135194,
    ];
    const EXPECTED_ROUTES: [(u32, u32, u32, u32); 9] = [
        (0, 0, 0, 21),
        (0, 0, 0, 63),
        (0, 0, 6, 59),
        (0, 1, 6, 42),
        (0, 0, 4, 23),
        (0, 0, 0, 0),
        (0, 0, 6, 10),
        (0, 0, 6, 30),
        (0, 0, 6, 42),
    ];

    #[test]
    fn route_is_balanced_and_stable_under_growth() {
        let n = 20_000u128;
        let mut counts = [0u32; 4];
        let mut moved = 0;
        for i in 0..n {
            let c = ChunkId(i * 7919);
            let s4 = route(c, 4).0;
            counts[s4 as usize] += 1;
            let s5 = route(c, 5).0;
            if s5 != s4 {
                assert_eq!(s5, 4, "growth only moves chunks to the new shard");
                moved += 1;
            }
        }
        for c in counts {
            assert!((4500..5500).contains(&c), "unbalanced: {counts:?}");
        }
        // About 1/5 of chunks move to the fifth shard.
        assert!((3500..4500).contains(&moved), "moved {moved}");
    }
}
