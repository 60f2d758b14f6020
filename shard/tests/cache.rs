//! The read cache and read-ahead: read-your-writes through the cache, hits
//! served from the cached buffer itself, scan resistance, prefetch counters,
//! streams marked as going on into the next chunk id.
mod common;

use common::*;
use shardstore_shard::{ReadHints, Shard, ShardConfig, ShardError, StreamHint, SECTOR};

fn cached_config(dir: &std::path::Path, cache_bytes: u64, prefetch: bool) -> ShardConfig {
    ShardConfig {
        cache_bytes,
        prefetch,
        scrub_period_secs: 0,
        ..config(dir, 256 * MIB)
    }
}

async fn open_cached(dir: &std::path::Path, cache_bytes: u64, prefetch: bool) -> Shard {
    Shard::open(cached_config(dir, cache_bytes, prefetch))
        .await
        .unwrap()
}

/// Writes each chunk whole, with the bytes [`walk`] expects.
async fn write_whole(shard: &Shard, chunks: &[(shardstore_proto::ChunkId, usize)]) {
    for &(c, len) in chunks {
        shard.write(c, 0, &pattern(c.0 as u64, len)).await.unwrap();
    }
}

async fn read_all(shard: &Shard, c: shardstore_proto::ChunkId, len: u32) -> (Vec<u8>, bool) {
    let r = shard.read(c, 0, len).await.unwrap();
    (r.data.to_vec(), r.cached)
}

#[test]
fn reads_never_return_an_older_version_than_an_acknowledged_write() {
    let dir = tempdir();
    run(|| async {
        let shard = open_cached(dir.path(), 4 * MIB, true).await;
        let c = cid(1);
        let v1 = pattern(1, 3 * SECTOR as usize);
        shard.write(c, 0, &v1).await.unwrap();
        assert_eq!(read_all(&shard, c, 1 << 20).await, (v1.clone(), false));
        // Second read: every byte from the cache.
        assert_eq!(read_all(&shard, c, 1 << 20).await, (v1.clone(), true));

        // Overwrite the middle sector partly: the read sees it at once.
        let patch = pattern(2, 100);
        shard.write(c, SECTOR + 10, &patch).await.unwrap();
        let mut want = v1.clone();
        want[SECTOR as usize + 10..SECTOR as usize + 110].copy_from_slice(&patch);
        let (got, cached) = read_all(&shard, c, 1 << 20).await;
        assert_eq!(got, want);
        assert!(!cached, "the rewritten sector is a new generation: a miss");
        assert_eq!(read_all(&shard, c, 1 << 20).await, (want.clone(), true));

        // Extend the chunk; the old sectors stay cached and correct.
        let tail = pattern(3, 5000);
        shard.write(c, 3 * SECTOR, &tail).await.unwrap();
        want.extend_from_slice(&tail);
        assert_eq!(read_all(&shard, c, 1 << 20).await.0, want);

        // Delete, then re-create with other bytes: never the old ones.
        shard.delete(c).await.unwrap();
        assert!(matches!(
            shard.read(c, 0, 4096).await,
            Err(ShardError::NotFound(_))
        ));
        let v2 = pattern(4, 2 * SECTOR as usize);
        shard.write(c, 0, &v2).await.unwrap();
        assert_eq!(read_all(&shard, c, 1 << 20).await.0, v2);
        assert_eq!(read_all(&shard, c, 1 << 20).await, (v2, true));

        let st = shard.stats().cache;
        assert!(st.hits > 0 && st.misses > 0, "{st:?}");
        assert!(st.bytes <= st.capacity_bytes, "{st:?}");
    });
}

#[test]
fn a_hit_is_served_from_the_cached_buffer_without_a_copy() {
    let dir = tempdir();
    run(|| async {
        let shard = open_cached(dir.path(), 4 * MIB, false).await;
        let c = cid(2);
        shard
            .write(c, 0, &pattern(9, 64 * SECTOR as usize))
            .await
            .unwrap();
        let first = shard.read(c, 0, 64 * SECTOR as u32).await.unwrap();
        assert!(!first.cached);
        let reads_before = shard.stats().device_reads;
        let a = shard.read(c, 4096, 8192).await.unwrap();
        let b = shard.read(c, 4096, 8192).await.unwrap();
        assert!(a.cached && b.cached);
        assert_eq!(shard.stats().device_reads, reads_before, "no device read");
        let pa: Vec<*const u8> = a.data.slices().map(|s| s.as_ptr()).collect();
        let pb: Vec<*const u8> = b.data.slices().map(|s| s.as_ptr()).collect();
        assert_eq!(pa, pb, "both replies point into the same cached buffer");
        assert_eq!(pa.len(), 1, "consecutive cached sectors form one slice");
        // And that buffer is the one the first (disk) read filled.
        let disk_ptr = first.data.slices().next().unwrap().as_ptr();
        assert_eq!(pa[0], disk_ptr.wrapping_add(4096));
    });
}

/// A hot random working set, then one scan of 4x the cache read once, then
/// the hot set again: its hit ratio must stay high right after the scan
/// (S3-FIFO keeps once-read scan sectors in the small probation queue).
#[test]
fn a_scan_larger_than_the_cache_does_not_evict_the_hot_set() {
    let dir = tempdir();
    run(|| async {
        let cache = 4 * MIB;
        let shard = open_cached(dir.path(), cache, false).await;
        let hot: Vec<_> = (0..256).map(|i| cid(1_000 + i)).collect();
        let scan: Vec<_> = (0..4 * cache / SECTOR)
            .map(|i| cid(100_000 + i as u128))
            .collect();
        for (i, c) in hot.iter().chain(scan.iter()).enumerate() {
            shard
                .write(*c, 0, &pattern(i as u64, SECTOR as usize))
                .await
                .unwrap();
        }
        let mut rng = Rng::new(7);
        let mut picks = |n: usize| -> Vec<_> {
            (0..n)
                .map(|_| hot[rng.below(hot.len() as u64) as usize])
                .collect()
        };
        // Warm up: twice, so the hot set is read more than once.
        hot_pass(&shard, picks(2_000)).await;
        let warm = hot_pass(&shard, picks(2_000)).await;
        for c in &scan {
            shard.read(*c, 0, SECTOR as u32).await.unwrap();
        }
        let scan_stats = shard.stats().cache;
        let after_scan = hot_pass(&shard, picks(2_000)).await;
        println!(
            "hot set of {} sectors, cache {} sectors, scan {} sectors: hit ratio warm {:.3}, \
             right after the scan {:.3} (evictions {})",
            hot.len(),
            cache / SECTOR,
            scan.len(),
            warm,
            after_scan,
            scan_stats.evictions
        );
        assert!(warm > 0.99, "warm hit ratio {warm}");
        assert!(
            after_scan > 0.95,
            "the scan evicted the hot set: hit ratio {after_scan} after it"
        );
        assert!(scan_stats.evictions > 0, "the scan did not fill the cache");
    });
}

/// Hit ratio of reading `picks` (one sector each).
async fn hot_pass(shard: &Shard, picks: Vec<shardstore_proto::ChunkId>) -> f64 {
    let before = shard.stats().cache;
    for c in picks {
        shard.read(c, 0, SECTOR as u32).await.unwrap();
    }
    let after = shard.stats().cache;
    let hits = after.hits - before.hits;
    let misses = after.misses - before.misses;
    hits as f64 / (hits + misses) as f64
}

/// Sequential 128 KiB reads of a 16 MiB chunk: read-ahead runs in front of
/// the reader, so most reads after the first few are cached; with prefetch
/// off none is.
#[test]
fn sequential_reads_are_prefetched_and_counted() {
    for prefetch in [true, false] {
        let dir = tempdir();
        run(|| async {
            let shard = open_cached(dir.path(), 64 * MIB, prefetch).await;
            let c = cid(3);
            let total = 16 * MIB;
            let piece: u64 = 1 << 20;
            for off in (0..total).step_by(piece as usize) {
                shard
                    .write(c, off, &pattern(off, piece as usize))
                    .await
                    .unwrap();
            }
            let step: u32 = 128 << 10;
            let mut cached = 0;
            for off in (0..total).step_by(step as usize) {
                let r = shard.read(c, off, step).await.unwrap();
                let p = off - off % piece;
                let want = &pattern(p, piece as usize)
                    [(off - p) as usize..(off - p) as usize + step as usize];
                assert!(r.data.to_vec() == want, "bytes at {off}");
                cached += r.cached as u32;
                // Give the low-priority read-ahead a chance to run, as a
                // client's network round trip would.
                glommio::timer::sleep(std::time::Duration::from_micros(200)).await;
            }
            let reads = (total / u64::from(step)) as u32;
            let st = shard.stats().cache;
            println!("prefetch {prefetch}: {cached}/{reads} reads fully cached, {st:?}");
            if prefetch {
                assert!(st.prefetch_enabled);
                assert!(cached > reads * 3 / 4, "{cached}/{reads} cached");
                assert!(st.prefetch_issued > 0 && st.prefetch_used > 0);
                assert!(st.prefetch_used <= st.prefetch_issued);
            } else {
                assert!(!st.prefetch_enabled);
                assert_eq!(cached, 0);
                assert_eq!(st.prefetch_issued, 0);
            }
        });
    }
}

/// Read-ahead into a small cache that a competing reader keeps churning:
/// prefetched sectors evicted before use are counted as wasted.
#[test]
fn prefetched_sectors_evicted_unread_are_counted_as_wasted() {
    let dir = tempdir();
    run(|| async {
        let shard = open_cached(dir.path(), 16 * MIB, true).await;
        // Another chunk, read backwards (no stream): fills the cache (a
        // cache that is filling up admits new entries to its main queue).
        let o = cid(5);
        let mib = MIB as usize;
        for i in 0..32u64 {
            shard.write(o, i * MIB, &pattern(i, mib)).await.unwrap();
        }
        let churn = || async {
            for i in (0..32u64).rev() {
                shard.read(o, i * MIB, MIB as u32).await.unwrap();
            }
        };
        churn().await;
        let c = cid(4);
        shard.write(c, 0, &pattern(1, 4 << 20)).await.unwrap();
        // Two sequential reads start a stream and read ahead.
        shard.read(c, 0, 64 << 10).await.unwrap();
        shard.read(c, 64 << 10, 64 << 10).await.unwrap();
        glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
        assert!(shard.stats().cache.prefetch_issued > 0);
        // The stream stops; the churn goes on.
        churn().await;
        churn().await;
        let st = shard.stats().cache;
        assert!(st.prefetch_wasted > 0, "{st:?}");
        assert!(
            st.prefetch_wasted + st.prefetch_used <= st.prefetch_issued,
            "{st:?}"
        );
    });
}

/// The same hot set survives a sequential stream with read-ahead that is
/// four times the cache: read-ahead sectors read once stay in probation.
#[test]
fn a_prefetched_sequential_stream_does_not_evict_the_hot_set() {
    let dir = tempdir();
    run(|| async {
        let cache = 16 * MIB;
        let shard = open_cached(dir.path(), cache, true).await;
        let hot: Vec<_> = (0..1024).map(|i| cid(1_000 + i)).collect();
        for (i, c) in hot.iter().enumerate() {
            shard
                .write(*c, 0, &pattern(i as u64, SECTOR as usize))
                .await
                .unwrap();
        }
        let stream = cid(7);
        let mib = MIB as usize;
        for i in 0..64u64 {
            shard
                .write(stream, i * MIB, &pattern(i, mib))
                .await
                .unwrap();
        }
        let mut rng = Rng::new(9);
        let mut picks = |n: usize| -> Vec<_> {
            (0..n)
                .map(|_| hot[rng.below(hot.len() as u64) as usize])
                .collect()
        };
        hot_pass(&shard, picks(8_000)).await;
        let warm = hot_pass(&shard, picks(4_000)).await;
        for i in 0..64 * 4u64 {
            let r = shard
                .read(stream, i * (256 << 10), 256 << 10)
                .await
                .unwrap();
            assert_eq!(r.data.len(), 256 << 10);
            glommio::timer::sleep(std::time::Duration::from_micros(100)).await;
        }
        let st = shard.stats().cache;
        let after = hot_pass(&shard, picks(4_000)).await;
        println!(
            "hot set {} sectors, cache {} sectors, stream {} MiB with read-ahead: hit ratio warm \
             {warm:.3}, after the stream {after:.3}; {st:?}",
            hot.len(),
            cache / SECTOR,
            64
        );
        assert!(st.prefetch_used > 0, "{st:?}");
        assert!(after > 0.95, "hit ratio {after} after the stream");
    });
}

/// Writes two consecutive 2 MiB chunks, then reads the first in order in
/// 256 KiB pieces, the reads marked (or not) as going on into the next
/// chunk id. Returns the shard, still open, and the second chunk.
async fn read_first_of_two(
    shard: &Shard,
    marked: bool,
) -> (shardstore_proto::ChunkId, shardstore_proto::ChunkId) {
    let (a, b) = (cid(40), cid(41));
    let len = 2 * MIB;
    shard.write(a, 0, &pattern(40, len as usize)).await.unwrap();
    shard.write(b, 0, &pattern(41, len as usize)).await.unwrap();
    let hints = ReadHints {
        continues_into_next_chunk: marked,
    };
    let step: u32 = 256 << 10;
    for off in (0..len).step_by(step as usize) {
        let r = shard.read_with(a, off, step, hints).await.unwrap();
        assert_eq!(r.data.len(), step as usize);
        glommio::timer::sleep(std::time::Duration::from_micros(200)).await;
    }
    // Let the low-priority read-ahead finish.
    glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
    (a, b)
}

/// A stream marked as going on into the next chunk id reads that chunk's
/// first bytes ahead, so the reader's first READ there is a cache hit with
/// the right bytes; an unmarked stream stops at the end of its chunk.
#[test]
fn a_marked_stream_reads_ahead_into_the_next_chunk() {
    for marked in [true, false] {
        let dir = tempdir();
        run(|| async {
            let shard = open_cached(dir.path(), 64 * MIB, true).await;
            let (_, b) = read_first_of_two(&shard, marked).await;
            let issued = shard.stats().cache.prefetch_issued;
            let first = shard.read_now(b, 0, 256 << 10);
            println!(
                "marked {marked}: issued {issued} sectors, next chunk cached: {}",
                first.is_some()
            );
            if marked {
                let r = first.expect("the next chunk's start is cached").unwrap();
                assert!(r.cached);
                assert!(r.data.to_vec() == pattern(41, 2 << 20)[..256 << 10]);
                // Read ahead: the first chunk's 2 MiB and a window of the next.
                assert!(issued * SECTOR > 2 * MIB, "{issued} sectors");
                // The stream goes on in the next chunk with its window grown:
                // the next read is cached too.
                let r = shard
                    .read_with(b, 256 << 10, 256 << 10, ReadHints::default())
                    .await
                    .unwrap();
                assert!(r.cached);
            } else {
                assert!(first.is_none(), "an unmarked stream read past its chunk");
                assert!(issued * SECTOR <= 2 * MIB, "{issued} sectors");
            }
        });
    }
}

/// With a forwarder installed (the server's routes hints to the shard that
/// owns the next chunk), the hint leaves the shard instead of being taken
/// here; the owner's `accept_stream_hint` then reads ahead.
#[test]
fn stream_hints_go_through_the_forwarder() {
    let dir = tempdir();
    run(|| async {
        let shard = open_cached(dir.path(), 64 * MIB, true).await;
        let sent = std::rc::Rc::new(std::cell::RefCell::new(Vec::<StreamHint>::new()));
        let log = sent.clone();
        shard.set_stream_forwarder(move |h| {
            log.borrow_mut().push(h);
            true
        });
        let (_, b) = read_first_of_two(&shard, true).await;
        // Hints for the chunk after `b` too (it does not exist: the owner
        // would drop them); those for `b` are the ones to check.
        let hints: Vec<StreamHint> = sent
            .borrow()
            .iter()
            .filter(|h| h.chunk == b)
            .copied()
            .collect();
        assert!(!hints.is_empty());
        assert!(hints
            .iter()
            .all(|h| h.chunk == b && h.ahead > 0 && h.window > 0));
        // Each hint asks for more of the next chunk than the one before.
        assert!(
            hints.windows(2).all(|w| w[0].ahead < w[1].ahead),
            "{hints:?}"
        );
        assert!(
            shard.read_now(b, 0, 256 << 10).is_none(),
            "taken locally too"
        );
        shard.accept_stream_hint(*hints.last().unwrap());
        glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
        let r = shard.read_now(b, 0, 256 << 10).expect("cached").unwrap();
        assert!(r.data.to_vec() == pattern(41, 2 << 20)[..256 << 10]);
    });
}

/// Reads `chunks` in order, each in `step`-byte READs (the last one short),
/// marked as one stream over consecutive ids except the last chunk's reads;
/// pauses 200 us between READs as a client's round trip would. Returns, per
/// chunk, whether its first READ was served from the cache.
async fn walk(
    shard: &Shard,
    chunks: &[(shardstore_proto::ChunkId, usize)],
    step: u32,
) -> Vec<bool> {
    let mut first_cached = Vec::new();
    for (i, &(c, len)) in chunks.iter().enumerate() {
        let hints = ReadHints {
            continues_into_next_chunk: i + 1 < chunks.len(),
        };
        let mut off = 0u64;
        while off < len as u64 {
            let r = shard.read_with(c, off, step, hints).await.unwrap();
            let n = r.data.len();
            assert_eq!(n, step.min(len as u32 - off as u32) as usize);
            assert!(r.data.to_vec() == pattern(c.0 as u64, len)[off as usize..off as usize + n]);
            if off == 0 {
                first_cached.push(r.cached);
            }
            off += n as u64;
            glommio::timer::sleep(std::time::Duration::from_micros(200)).await;
        }
    }
    first_cached
}

/// A marked walk over many chunks of uneven lengths (none a multiple of the
/// read-ahead block, some shorter than a window, some read whole in one
/// READ): every chunk after the first has its first READ cached, and so on
/// a second pass after the cache has turned over (the first pass's finished
/// streams do not block the hints).
#[test]
fn a_marked_walk_reads_ahead_chunk_after_chunk() {
    let dir = tempdir();
    run(|| async {
        // 16 MiB of cache: a 1 MiB window, and two passes over ~24 MiB turn
        // the cache over.
        let shard = open_cached(dir.path(), 16 * MIB, true).await;
        // Starting small, so the first crossings spread over several ids.
        let lens = [
            4096,
            100_000,
            3 << 20,
            12_345,
            1 << 20,
            2_500_000,
            777_777,
            3 << 20,
        ];
        let chunks: Vec<_> = (0..24u128)
            .map(|i| {
                (
                    cid(100 + i),
                    lens[i as usize % lens.len()] + i as usize * SECTOR as usize,
                )
            })
            .collect();
        write_whole(&shard, &chunks).await;
        for pass in 0..2 {
            let first = walk(&shard, &chunks, 256 << 10).await;
            println!(
                "pass {pass}: first READ cached {first:?}, {:?}",
                shard.stats().cache
            );
            assert!(first[1..].iter().all(|&c| c), "pass {pass}: {first:?}");
        }
    });
}

/// Chunks read whole, one READ each (a data set of small objects read in
/// order): marked, every object after the first is read ahead.
#[test]
fn chunks_read_whole_in_a_marked_walk_are_read_ahead() {
    let dir = tempdir();
    run(|| async {
        let shard = open_cached(dir.path(), 64 * MIB, true).await;
        let chunks: Vec<_> = (0..20u128)
            .map(|i| (cid(300 + i), 60_000 + 4096 * i as usize))
            .collect();
        write_whole(&shard, &chunks).await;
        let first = walk(&shard, &chunks, 1 << 20).await;
        assert!(!first[0]);
        assert!(first[1..].iter().all(|&c| c), "{first:?}");
    });
}

/// What a hint may not do: read ahead more than a window, read ahead a
/// chunk that does not exist (and so leave a stream there that claims
/// read-ahead nobody did), or take over the stream of a reader in the
/// middle of the chunk.
#[test]
fn stream_hints_are_bounded_and_never_break_a_stream() {
    let dir = tempdir();
    run(|| async {
        let shard = open_cached(dir.path(), 64 * MIB, true).await;
        let settle = || glommio::timer::sleep(std::time::Duration::from_millis(50));
        let issued = || shard.stats().cache.prefetch_issued;
        // 1. At most a window (64 MiB / 16 = 4 MiB), whatever `ahead` says.
        let big = cid(500);
        for i in 0..4u64 {
            shard
                .write(big, i << 23, &pattern(500 + i, 8 << 20))
                .await
                .unwrap();
        }
        shard.accept_stream_hint(StreamHint {
            chunk: big,
            window: 1 << 30,
            ahead: 1 << 30,
            further: 0,
            max_len: 0,
        });
        settle().await;
        assert!(
            issued() > 0 && issued() * SECTOR <= 4 * MIB,
            "{} sectors",
            issued()
        );
        // 2. A chunk that does not exist yet: nothing happens, and once it
        //    is written a reader's own stream reads ahead as usual.
        let late = cid(501);
        let before = issued();
        shard.accept_stream_hint(StreamHint {
            chunk: late,
            window: 4 << 20,
            ahead: 4 << 20,
            further: 0,
            max_len: 0,
        });
        settle().await;
        assert_eq!(issued(), before);
        shard.write(late, 0, &pattern(501, 4 << 20)).await.unwrap();
        let first = walk(&shard, &[(late, 4 << 20)], 256 << 10).await;
        assert_eq!(first, vec![false]);
        assert!(
            issued() > before,
            "the late chunk's reader got no read-ahead"
        );
        // 3. A reader in the middle of a chunk keeps its stream: after the
        //    hint its next READ still continues it (and reads further ahead).
        let mid = cid(502);
        for i in 0..2u64 {
            shard
                .write(mid, i << 23, &pattern(502 + i, 8 << 20))
                .await
                .unwrap();
        }
        for off in [0u64, 256 << 10] {
            shard.read(mid, off, 256 << 10).await.unwrap();
        }
        settle().await;
        shard.accept_stream_hint(StreamHint {
            chunk: mid,
            window: 512 << 10,
            ahead: 512 << 10,
            further: 0,
            max_len: 0,
        });
        settle().await;
        let before = issued();
        for off in [512u64 << 10, 768 << 10] {
            shard.read(mid, off, 256 << 10).await.unwrap();
        }
        settle().await;
        // Its window doubled twice: [1, 3) MiB read ahead. A stream started
        // over by the hint would have read ahead only [1, 1.5) MiB.
        let more = (issued() - before) * SECTOR;
        assert!(
            more >= 3 * MIB / 2,
            "the hint reset the reader's stream: {more} bytes read ahead"
        );
    });
}

/// A run of small chunks read whole in id order is read ahead several
/// chunks deep (many reads in flight for one reader), but not without
/// bound: at most `MAX_CHUNKS_AHEAD` past the reader.
#[test]
fn small_chunks_in_a_marked_walk_are_read_ahead_several_deep() {
    let dir = tempdir();
    run(|| async {
        let shard = open_cached(dir.path(), 64 * MIB, true).await;
        let len = 16 << 10;
        let chunks: Vec<_> = (0..60u128).map(|i| (cid(700 + i), len)).collect();
        write_whole(&shard, &chunks).await;
        // The reader reads chunks 0-4 marked and 5 unmarked (the walk's
        // last), one READ each (its window doubles with each), then pauses.
        walk(&shard, &chunks[..6], len as u32).await;
        glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
        let cached = |i: usize| shard.read_now(chunks[i].0, 0, len as u32).is_some();
        let ahead: Vec<usize> = (6..60).filter(|&i| cached(i)).collect();
        println!("chunks read ahead past the reader (at 5): {ahead:?}");
        let max = shardstore_shard::MAX_CHUNKS_AHEAD as usize;
        assert!(ahead.len() >= 12, "{ahead:?}");
        assert!(ahead.iter().all(|&i| i <= 4 + max), "{ahead:?}");
    });
}

/// However long a marked READ asks for (even one refused as too large),
/// what it starts reading ahead past its chunk stays within one window.
#[test]
fn a_huge_marked_read_reads_ahead_at_most_a_window() {
    let dir = tempdir();
    run(|| async {
        // 64 MiB of cache: a 4 MiB window.
        let shard = open_cached(dir.path(), 64 * MIB, true).await;
        let chunks: Vec<_> = (0..40u128).map(|i| (cid(900 + i), 1 << 20)).collect();
        write_whole(&shard, &chunks).await;
        let hints = ReadHints {
            continues_into_next_chunk: true,
        };
        let _ = shard.read_with(cid(900), 0, u32::MAX, hints).await;
        glommio::timer::sleep(std::time::Duration::from_millis(100)).await;
        let issued = shard.stats().cache.prefetch_issued * SECTOR;
        println!("read ahead after one huge marked READ: {issued} bytes");
        assert!(
            issued > 0 && issued <= 4 * MIB + (256 << 10),
            "{issued} bytes"
        );
    });
}

/// Large chunks after a run of small ones keep their read-ahead: after the
/// first of them, each one's first READ is a cache hit, as the small ones'
/// are.
#[test]
fn large_chunks_after_small_ones_in_a_marked_walk_are_read_ahead() {
    let dir = tempdir();
    run(|| async {
        let shard = open_cached(dir.path(), 64 * MIB, true).await;
        let lens = [16 << 10; 6]
            .into_iter()
            .chain([4 << 20; 3])
            .chain([16 << 10; 3]);
        let chunks: Vec<_> = lens
            .enumerate()
            .map(|(i, l)| (cid(1000 + i as u128), l))
            .collect();
        write_whole(&shard, &chunks).await;
        // 1 MiB READs: more than the block the small chunks' estimate asks
        // of each large chunk ahead, so the large chunks' own crossing
        // hints must do the rest.
        let first = walk(&shard, &chunks, 1 << 20).await;
        println!("first READ cached: {first:?}");
        // The first large chunk (6) was read ahead as the small ones had it
        // estimated, one block: its first 1 MiB READ waits for the rest.
        // From there on the large chunks' own hints ask for whole windows.
        let expect: Vec<bool> = (0..12).map(|i| i != 0 && i != 6).collect();
        assert_eq!(first, expect);
    });
}

/// A simulated shard with a read cache and read-ahead holding chunk `c`
/// (1 MiB), closed: the next open starts with a cold cache. Returns its
/// config and the chunk's bytes.
fn one_chunk_on_a_sim(
    disk: &shardstore_shard::SimDisk,
    c: shardstore_proto::ChunkId,
) -> (ShardConfig, Vec<u8>) {
    let cfg = ShardConfig {
        cache_bytes: 16 * MIB,
        prefetch: true,
        capacity_bytes: 64 * MIB,
        ..sim_shard_config()
    };
    let data = pattern(c.0 as u64, 1 << 20);
    run(|| async {
        let shard = Shard::open_sim(cfg.clone(), disk).await.unwrap();
        shard.write(c, 0, &data).await.unwrap();
        shard.close().await.unwrap();
    });
    (cfg, data)
}

/// A read that waits for read-ahead in flight over its range takes the
/// chunk's meta only after the wait: a delete made meanwhile gives
/// NOT_FOUND (or the read is served whole from before it), never the old
/// meta over what the index holds after (zeros for a deleted chunk, or a
/// newer version's bytes under the old version) (review finding).
#[test]
fn a_read_waiting_for_read_ahead_sees_a_delete_made_meanwhile() {
    let disk = shardstore_shard::SimDisk::new(64 * MIB + 64 * 1024, 12);
    let (c, step) = (cid(7), 64u32 << 10);
    let (cfg, data) = one_chunk_on_a_sim(&disk, c);
    run(|| async {
        // Cold cache: the first read starts a stream, the second reads
        // ahead of it; both that read and the read-ahead are held at the
        // disk, and a third read waits for the read-ahead.
        let shard = std::rc::Rc::new(Shard::open_sim(cfg.clone(), &disk).await.unwrap());
        shard.read(c, 0, step).await.unwrap();
        disk.hold_reads(true);
        let read_at = |at: u64| {
            let shard = shard.clone();
            glommio::spawn_local(async move { shard.read(c, at, step).await })
        };
        let second = read_at(u64::from(step));
        for _ in 0..8 {
            futures_lite::future::yield_now().await;
        }
        let third = read_at(2 * u64::from(step));
        for _ in 0..8 {
            futures_lite::future::yield_now().await;
        }
        shard.delete(c).await.unwrap();
        disk.hold_reads(false);
        // Each read is from before the delete (its bytes) or after it
        // (NOT_FOUND).
        let check = |r: Result<shardstore_shard::ReadOutcome, ShardError>, at: usize| match r {
            Err(ShardError::NotFound(_)) => {}
            Ok(r) => assert!(
                r.data.to_vec() == data[at..at + step as usize],
                "the read at {at} answered version {} with bytes never written there",
                r.version
            ),
            Err(e) => panic!("{e}"),
        };
        check(second.await, step as usize);
        check(third.await, 2 * step as usize);
        assert!(
            shard.stats().cache.prefetch_issued > 0,
            "no read-ahead was held"
        );
    });
}

/// A bad sector that read-ahead meets is counted once, when a client reads
/// it (read-ahead caches nothing then; the client's own read finds it and
/// gets CORRUPT), not once more for the read-ahead.
#[test]
fn a_bad_sector_met_by_read_ahead_is_counted_once() {
    let disk = shardstore_shard::SimDisk::new(64 * MIB + 64 * 1024, 13);
    let (c, step) = (cid(8), 64u32 << 10);
    let (cfg, data) = one_chunk_on_a_sim(&disk, c);
    let bad = 3 * step as usize;
    let at = (0..disk.sectors())
        .find(|&s| disk.sector(s) == data[bad..bad + SECTOR as usize])
        .unwrap();
    disk.flip_bit(at, 7);
    run(|| async {
        let shard = Shard::open_sim(cfg.clone(), &disk).await.unwrap();
        for i in 0..3u64 {
            shard.read(c, i * u64::from(step), step).await.unwrap();
            glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(shard.stats().cache.prefetch_issued > 0, "no read-ahead");
        let e = shard.read(c, 3 * u64::from(step), step).await.unwrap_err();
        assert!(matches!(e, ShardError::Corrupt { .. }), "{e}");
        assert_eq!(shard.stats().corrupt_errors, 1);
    });
}
