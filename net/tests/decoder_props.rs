//! Property: any byte string fed to the frame decoder yields valid frames
//! or a typed error, never a panic, and never an allocation larger than the
//! limits allow (checked with a counting global allocator).

use futures_lite::future::block_on;
use futures_util::io::Cursor;
use proptest::prelude::*;
use shardstore_net::{FrameError, FrameReader};
use shardstore_proto::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only recording sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `alloc` with `l`.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const MAX_PAYLOAD_UNDER_TEST: u32 = 64 << 10;

fn decode_all(bytes: Vec<u8>) -> (usize, Option<FrameError>) {
    block_on(async {
        let mut r = FrameReader::new(Cursor::new(bytes), MAX_PAYLOAD_UNDER_TEST);
        let mut n = 0;
        loop {
            match r.next_frame().await {
                Ok(Some(f)) => {
                    // Whatever decoded must be within the limits.
                    assert!(f.body.len() <= limits::MAX_BODY as usize);
                    assert!(f.payload.len() <= MAX_PAYLOAD_UNDER_TEST as usize);
                    // Bodies are only trusted after validation; it must not panic.
                    let _ = access_body::<ArchivedWriteRequest>(&f.body);
                    let _ = access_body::<ArchivedListReply>(&f.body);
                    let _ = access_body::<ArchivedTopologyReply>(&f.body);
                    n += 1;
                }
                Ok(None) => return (n, None),
                Err(e) => return (n, Some(e)),
            }
        }
    })
}

/// A valid frame to mutate, so mutations reach past the header checks.
fn valid_frames() -> Vec<u8> {
    let mut f = Vec::new();
    let data = vec![3u8; 300];
    encode_frame(
        Opcode::Write,
        0,
        7,
        &WriteRequest {
            chunk: 9,
            offset: 0,
            payload_crc: payload_crc(&data),
            flags: 0,
        },
        data.len() as u32,
        &mut f,
    );
    f.extend_from_slice(&data);
    encode_frame(
        Opcode::List,
        FLAG_RESPONSE,
        8,
        &ListReply {
            entries: vec![ListEntry {
                chunk: 1,
                chunk_len: 2,
                version: 3,
            }],
            more: false,
        },
        0,
        &mut f,
    );
    f
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decode_all(bytes);
        prop_assert!(LARGEST.load(Ordering::Relaxed) < 1 << 20);
    }

    #[test]
    fn mutated_frames_never_panic(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut f = valid_frames();
        for (pos, x) in flips {
            let i = pos % f.len();
            f[i] ^= x;
        }
        f.truncate(cut % (f.len() + 1));
        let _ = decode_all(f);
        prop_assert!(LARGEST.load(Ordering::Relaxed) < 1 << 20);
    }

    #[test]
    fn huge_lengths_are_refused_before_allocation(len in (MAX_PAYLOAD_UNDER_TEST + 1)..=u32::MAX) {
        let mut f = valid_frames();
        f[20..24].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c::crc32c(&f[..36]);
        f[36..40].copy_from_slice(&crc.to_le_bytes());
        let (n, err) = decode_all(f);
        prop_assert_eq!(n, 0);
        let is_header_err = matches!(err, Some(FrameError::Header { .. }));
        prop_assert!(is_header_err);
        prop_assert!(LARGEST.load(Ordering::Relaxed) < 1 << 20);
    }
}
