//! Reproducible key streams: a small PRNG and the key distributions.
//!
//! Invariants:
//! - everything is a pure function of the seed: the same `--seed`, key count,
//!   distribution and worker count give the same key stream per worker, on
//!   any machine (no `rand` crate whose streams may change between versions);
//! - a worker draws only from its own partition of the key space (see
//!   [`Partition`]), so each key has exactly one writer and its expected
//!   content is always known (verify mode relies on it);
//! - with `--io-size` an operation targets one piece of a chunk ([`Pick`]):
//!   sequential walks a chunk's pieces in order before the next key, the
//!   other distributions draw the key as before and the piece uniformly from
//!   a stream of their own, so the key stream of a seed does not depend on
//!   the io size.

use serde::Serialize;
use std::fmt;
use std::str::FromStr;

/// SplitMix64 finalizer: a bijective mix of 64 bits, used both as a hash of
/// (seed, key, version) tuples and as the PRNG's step.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hash of a few words, order-sensitive.
pub fn hash_words(words: &[u64]) -> u64 {
    let mut h = 0x5353_4c47_5f76_3031; // "SSLG_v01"
    for w in words {
        h = mix64(h ^ mix64(*w));
    }
    h
}

/// SplitMix64 generator: 8 bytes of state, fast, good enough for workloads.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (Lemire's multiply-high; the bias is below 2^-40
    /// for any key space this tool can hold).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// How keys are picked (`--distribution`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Distribution {
    Uniform,
    /// Zipfian with exponent `theta` in (0, 1): key rank 0 is the hottest.
    Zipf {
        theta: f64,
    },
    /// Each worker walks its partition in order and wraps around.
    Sequential,
}

pub const DEFAULT_ZIPF_THETA: f64 = 0.99;

impl FromStr for Distribution {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uniform" => Ok(Distribution::Uniform),
            "sequential" | "seq" => Ok(Distribution::Sequential),
            "zipf" => Ok(Distribution::Zipf {
                theta: DEFAULT_ZIPF_THETA,
            }),
            _ => {
                let theta = s
                    .strip_prefix("zipf:")
                    .ok_or_else(|| {
                        format!("unknown distribution {s:?}: uniform, zipf[:THETA] or sequential")
                    })?
                    .parse::<f64>()
                    .map_err(|e| format!("zipf theta in {s:?}: {e}"))?;
                if !(theta > 0.0 && theta < 1.0) {
                    return Err(format!("zipf theta {theta} must be in (0, 1)"));
                }
                Ok(Distribution::Zipf { theta })
            }
        }
    }
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Distribution::Uniform => write!(f, "uniform"),
            Distribution::Zipf { theta } => write!(f, "zipf:{theta}"),
            Distribution::Sequential => write!(f, "sequential"),
        }
    }
}

impl Serialize for Distribution {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Zipfian sampler over ranks `0..n` (Gray et al., "Quickly generating
/// billion-record synthetic databases", the algorithm YCSB uses). Setup is
/// O(n) once; each sample is O(1).
#[derive(Debug, Clone)]
pub struct Zipf {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

impl Zipf {
    pub fn new(n: u64, theta: f64) -> Self {
        assert!(n >= 1, "zipf over an empty key space");
        assert!(
            theta > 0.0 && theta < 1.0,
            "zipf theta {theta} not in (0, 1)"
        );
        let zetan = zeta(n, theta);
        let zeta2 = zeta(2.min(n), theta);
        let alpha = 1.0 / (1.0 - theta);
        let eta = (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        Zipf {
            n,
            theta,
            alpha,
            zetan,
            eta,
        }
    }

    /// Probability of rank 0 (the hottest key): `1 / zeta(n, theta)`.
    pub fn p_hottest(&self) -> f64 {
        1.0 / self.zetan
    }

    pub fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.unit();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if self.n >= 2 && uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1;
        }
        let r = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        r.min(self.n - 1)
    }
}

/// The keys one worker owns: `offset, offset + stride, offset + 2*stride, ...`
/// below `keys`. Worker `w` of `W` owns `w, w+W, w+2W, ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub offset: u64,
    pub stride: u64,
    /// Number of keys in this partition.
    pub len: u64,
}

impl Partition {
    pub fn new(keys: u64, workers: u64, worker: u64) -> Self {
        assert!(workers >= 1 && worker < workers && keys >= workers);
        let len = keys / workers + u64::from(worker < keys % workers);
        Partition {
            offset: worker,
            stride: workers,
            len,
        }
    }

    /// The global key of local index `i` (`i < len`).
    pub fn key(&self, i: u64) -> u64 {
        self.offset + i * self.stride
    }
}

/// Draws local key indexes (`0..partition.len`) for one worker, and the
/// piece of the key's chunk each operation targets.
#[derive(Debug, Clone)]
pub struct KeyGen {
    dist: Sampler,
    rng: Rng,
    len: u64,
    next_seq: u64,
    /// Pieces per chunk (1: every op is the whole value).
    pieces: u64,
    piece_rng: Rng,
    /// Sequential: the key being walked and its next piece.
    seq_pick: Pick,
}

/// Where an operation lands: local key index and piece of that key's chunk
/// (the piece at byte offset `piece * io_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub index: u64,
    pub piece: u64,
}

#[derive(Debug, Clone)]
enum Sampler {
    Uniform,
    Zipf(Zipf),
    Sequential,
}

impl KeyGen {
    /// `zipf` may be passed in to share the O(n) setup between workers whose
    /// partitions have the same length.
    pub fn new(dist: Distribution, len: u64, seed: u64, zipf: Option<Zipf>) -> Self {
        assert!(len >= 1);
        let dist = match dist {
            Distribution::Uniform => Sampler::Uniform,
            Distribution::Sequential => Sampler::Sequential,
            Distribution::Zipf { theta } => Sampler::Zipf(match zipf {
                Some(z) if z.n == len && z.theta == theta => z,
                _ => Zipf::new(len, theta),
            }),
        };
        KeyGen {
            dist,
            rng: Rng::new(seed),
            len,
            next_seq: 0,
            pieces: 1,
            piece_rng: Rng::new(hash_words(&[seed, 0x0ff5])),
            seq_pick: Pick { index: 0, piece: 0 },
        }
    }

    /// Chunks of `pieces` pieces (`>= 1`) instead of whole values.
    pub fn with_pieces(mut self, pieces: u64) -> Self {
        assert!(pieces >= 1);
        self.pieces = pieces;
        self
    }

    /// The next operation's key and piece.
    pub fn next_pick(&mut self) -> Pick {
        if let Sampler::Sequential = self.dist {
            if self.seq_pick.piece == 0 {
                self.seq_pick.index = self.next_index();
            }
            let pick = self.seq_pick;
            self.seq_pick.piece = (pick.piece + 1) % self.pieces;
            return pick;
        }
        let index = self.next_index();
        let piece = match self.pieces {
            1 => 0,
            n => self.piece_rng.below(n),
        };
        Pick { index, piece }
    }

    /// The next local key index.
    pub fn next_index(&mut self) -> u64 {
        match &self.dist {
            Sampler::Uniform => self.rng.below(self.len),
            Sampler::Zipf(z) => z.sample(&mut self.rng),
            Sampler::Sequential => {
                let i = self.next_seq;
                self.next_seq = (i + 1) % self.len;
                i
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(gen: &mut KeyGen, n: u64, samples: usize) -> Vec<u64> {
        let mut c = vec![0u64; n as usize];
        for _ in 0..samples {
            c[gen.next_index() as usize] += 1;
        }
        c
    }

    #[test]
    fn parse_and_print_distributions() {
        assert_eq!("uniform".parse::<Distribution>(), Ok(Distribution::Uniform));
        assert_eq!(
            "sequential".parse::<Distribution>(),
            Ok(Distribution::Sequential)
        );
        assert_eq!(
            "zipf".parse::<Distribution>(),
            Ok(Distribution::Zipf { theta: 0.99 })
        );
        assert_eq!(
            "zipf:0.5".parse::<Distribution>(),
            Ok(Distribution::Zipf { theta: 0.5 })
        );
        assert!("zipf:1.0".parse::<Distribution>().is_err());
        assert!("zipf:x".parse::<Distribution>().is_err());
        assert!("gauss".parse::<Distribution>().is_err());
        assert_eq!(Distribution::Zipf { theta: 0.8 }.to_string(), "zipf:0.8");
    }

    #[test]
    fn zipf_is_skewed_as_theory_says() {
        let n = 1000;
        let samples = 200_000;
        let mut z = KeyGen::new(Distribution::Zipf { theta: 0.99 }, n, 7, None);
        let c = counts(&mut z, n, samples);
        // Rank 0 is the hottest, and its share matches 1/zeta(n, theta).
        let max_rank = (0..n as usize).max_by_key(|&i| c[i]).unwrap();
        assert_eq!(max_rank, 0);
        let p0 = Zipf::new(n, 0.99).p_hottest();
        let share0 = c[0] as f64 / samples as f64;
        assert!(
            (share0 - p0).abs() < 0.1 * p0,
            "rank 0 share {share0}, theory {p0}"
        );
        // Frequencies fall with rank: the top 1% of keys take far more than 1%.
        let top10: u64 = c[..10].iter().sum();
        let top10_share = top10 as f64 / samples as f64;
        assert!(top10_share > 0.35, "top 10 of 1000 keys: {top10_share}");
        assert!(c[0] > c[1] && c[1] > c[10] && c[10] > c[500]);
        // Every rank is reachable in principle; the tail is cold but present.
        let tail: u64 = c[500..].iter().sum();
        assert!(tail > 0);

        // Uniform over the same space is flat: top 10 keys take about 1%.
        let mut u = KeyGen::new(Distribution::Uniform, n, 7, None);
        let cu = counts(&mut u, n, samples);
        let top10u: u64 = cu[..10].iter().sum();
        let share = top10u as f64 / samples as f64;
        assert!((0.007..0.013).contains(&share), "uniform top 10: {share}");
        assert!(cu.iter().all(|&x| x > 100), "every key drawn");
    }

    #[test]
    fn lower_theta_is_less_skewed() {
        let n = 1000;
        let mut hi = KeyGen::new(Distribution::Zipf { theta: 0.99 }, n, 1, None);
        let mut lo = KeyGen::new(Distribution::Zipf { theta: 0.5 }, n, 1, None);
        let chi = counts(&mut hi, n, 100_000);
        let clo = counts(&mut lo, n, 100_000);
        assert!(
            chi[0] > 2 * clo[0],
            "theta .99: {} theta .5: {}",
            chi[0],
            clo[0]
        );
    }

    #[test]
    fn sequential_walks_in_order_and_wraps() {
        let mut s = KeyGen::new(Distribution::Sequential, 5, 99, None);
        let got: Vec<u64> = (0..12).map(|_| s.next_index()).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]);
    }

    #[test]
    fn sequential_walks_every_piece_of_a_chunk_then_the_next_key() {
        // 3 keys of 4 pieces: a chunk's offsets in order, then the next key,
        // and around again.
        let mut s = KeyGen::new(Distribution::Sequential, 3, 5, None).with_pieces(4);
        let got: Vec<(u64, u64)> = (0..14)
            .map(|_| s.next_pick())
            .map(|p| (p.index, p.piece))
            .collect();
        let want: Vec<(u64, u64)> = (0..3)
            .flat_map(|k| (0..4).map(move |p| (k, p)))
            .chain([(0, 0), (0, 1)])
            .collect();
        assert_eq!(got, want);
        // One piece per chunk is the plain key walk.
        let mut s = KeyGen::new(Distribution::Sequential, 3, 5, None);
        let got: Vec<Pick> = (0..4).map(|_| s.next_pick()).collect();
        assert_eq!(
            got.iter().map(|p| (p.index, p.piece)).collect::<Vec<_>>(),
            vec![(0, 0), (1, 0), (2, 0), (0, 0)]
        );
    }

    #[test]
    fn random_picks_keep_the_key_stream_and_spread_over_pieces() {
        let mut plain = KeyGen::new(Distribution::Uniform, 100, 8, None);
        let mut pieced = KeyGen::new(Distribution::Uniform, 100, 8, None).with_pieces(16);
        let mut seen = [0u32; 16];
        for _ in 0..16_000 {
            let p = pieced.next_pick();
            assert_eq!(p.index, plain.next_index(), "same key stream");
            seen[p.piece as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }

    #[test]
    fn same_seed_same_stream_other_seed_other_stream() {
        for dist in [
            Distribution::Uniform,
            Distribution::Zipf { theta: 0.9 },
            Distribution::Sequential,
        ] {
            let mut a = KeyGen::new(dist, 10_000, 42, None);
            let mut b = KeyGen::new(dist, 10_000, 42, None);
            let sa: Vec<u64> = (0..1000).map(|_| a.next_index()).collect();
            let sb: Vec<u64> = (0..1000).map(|_| b.next_index()).collect();
            assert_eq!(sa, sb, "{dist}");
            if dist != Distribution::Sequential {
                let mut c = KeyGen::new(dist, 10_000, 43, None);
                let sc: Vec<u64> = (0..1000).map(|_| c.next_index()).collect();
                assert_ne!(sa, sc, "{dist}");
            }
        }
        // The generator itself is pinned: a change here changes every
        // published workload, so it must be deliberate.
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn partitions_cover_the_key_space_once() {
        let keys = 103;
        let workers = 7;
        let mut seen = vec![0u32; keys as usize];
        for w in 0..workers {
            let p = Partition::new(keys, workers, w);
            for i in 0..p.len {
                seen[p.key(i) as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
    }

    #[test]
    fn below_stays_in_range() {
        let mut r = Rng::new(5);
        for n in [1u64, 2, 3, 1000, u64::MAX] {
            for _ in 0..1000 {
                assert!(r.below(n) < n);
            }
        }
        for _ in 0..1000 {
            let x = r.unit();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
