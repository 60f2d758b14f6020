//! Sequential read-ahead into the shard's cache.
//!
//! Per chunk, the shard remembers where the last read ended. A read that
//! starts exactly there continues a stream: its window (bytes to keep read
//! ahead of the reader) starts at `MIN_WINDOW` (or twice the read) and
//! doubles with each further sequential read up to a maximum (a sixteenth
//! of the cache slice, at most `MAX_WINDOW`, so a few windows fit in the
//! cache's probation queue, see `cache::HOT_ALLOCATION`). When less than half a window is
//! left ahead of the reader, the next blocks up to a full window are read in
//! the background, on a task queue with low shares, verified like any read
//! and inserted into the cache marked as prefetched. A read that needs a
//! block whose prefetch is still in flight waits for it instead of reading
//! the same sectors twice.
//!
//! Counted (sectors): issued (read ahead and cached), used (a prefetched
//! sector read by a client before eviction), wasted (evicted unread).
//!
//! Streams across chunks: a client that reads a run of consecutive chunk
//! ids in order marks its reads (protocol `READ_FLAG_NEXT_CHUNK`,
//! [`ReadHints::continues_into_next_chunk`]). The stream of a marked read
//! does not stop at the end of its chunk: the part of the window past the
//! end becomes a [`StreamHint`] for chunk id + 1, which the shard owning
//! that chunk (this one, or another through the forwarder the server
//! installs, see [`Prefetcher::set_forwarder`]) turns into read-ahead of the
//! chunk's first bytes (at most a window, at most that chunk) and a stream
//! waiting at offset 0 with the window already grown, so the reader's first
//! READ of the next chunk is a cache hit and its stream does not start
//! cold. A marked READ that reaches its chunk's end starts crossing at once
//! even without an earlier READ of that chunk, so chunks read whole (one
//! READ each) are read ahead one after the other too. The part of the window
//! past the end is spread over the next chunk ids as if they were as long
//! as the longest chunk the stream has passed through: a run of small
//! chunks is read ahead up to [`MAX_CHUNKS_AHEAD`] chunks deep (that many
//! reads in flight for one reader), a run of large ones one chunk ahead,
//! and what is read ahead past the reader's chunk stays within a window
//! (rounded up to a block), however long the READ. The longest length
//! only grows: after a large chunk the rest of the walk is read ahead as if
//! all were that large. A hint is dropped for a chunk that
//! does not exist, and for one a reader is in the middle of (its own
//! stream goes on). Unmarked reads never look past their chunk (the next id
//! may be unrelated data).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};

use futures_util::future::{FutureExt, LocalBoxFuture, Shared};
use glommio::{Latency, Shares, TaskQueueHandle};
use shardstore_proto::ChunkId;

use crate::error::ShardError;
use crate::layout::SECTOR;
use crate::shard::{Inner, ReadBy};

/// Shares of the read-ahead task queue (the default queue has 1000).
pub const PREFETCH_SHARES: usize = 250;
/// Unit of read-ahead, and of waiting for it.
pub const BLOCK: u64 = 256 << 10;
pub const MIN_WINDOW: u64 = 512 << 10;
pub const MAX_WINDOW: u64 = 8 << 20;
/// Most chunk ids a marked stream reads ahead past the reader's chunk
/// (small chunks read in order: this many in flight at once).
pub const MAX_CHUNKS_AHEAD: u64 = 16;
/// Reads ending past this offset (no chunk is that long) start no stream.
const MAX_STREAM_END: u64 = 1 << 62;
/// Streams remembered per shard, in a direct-mapped table: a chunk's slot
/// is a hash of its id, and a new chunk takes the slot over (O(1) per read,
/// no allocation; two interleaved streams that collide restart each other).
const STREAM_SLOTS: usize = 512;

type Pending = Shared<LocalBoxFuture<'static, ()>>;

#[derive(Default)]
struct Stream {
    /// Where the last read ended.
    next: u64,
    window: u64,
    /// Everything before this offset has been read ahead (or was read).
    ahead: u64,
    /// A marked stream: how far into the next chunk read-ahead was asked
    /// for already (bytes from its start).
    crossed: u64,
    /// A marked stream: how many chunk ids past this one were asked to read
    /// ahead already.
    crossed_chunks: u64,
    /// A marked stream: the longest chunk it has passed through (carried
    /// from chunk to chunk), bytes.
    max_len: u64,
}

/// How a client describes a READ (protocol READ flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadHints {
    /// The read belongs to a sequential stream that goes on, at the end of
    /// this chunk, into offset 0 of chunk id + 1.
    pub continues_into_next_chunk: bool,
}

/// A marked stream reached the end of its chunk's read-ahead: read ahead
/// `[0, ahead)` of `chunk` (the next chunk id) and expect the stream there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamHint {
    pub chunk: ChunkId,
    /// The stream's read-ahead window when it crossed, bytes.
    pub window: u64,
    /// Bytes of `chunk` to read ahead, from its start.
    pub ahead: u64,
    /// Chunk ids after `chunk` that were sent hints of their own (each asked
    /// for `ahead` bytes): the stream waiting in `chunk` does not ask for
    /// them again.
    pub further: u64,
    /// The longest chunk the stream has passed through, bytes.
    pub max_len: u64,
}

/// Hands a [`StreamHint`] to the shard that owns its chunk; false: this
/// shard owns it (or no server routes hints) and takes it itself.
pub type HintForwarder = Box<dyn Fn(StreamHint) -> bool>;

pub(crate) struct Prefetcher {
    max_window: u64,
    streams: RefCell<Vec<Option<(ChunkId, Stream)>>>,
    /// Blocks `(chunk, offset / BLOCK)` being read ahead now.
    pending: RefCell<HashMap<(ChunkId, u64), Pending>>,
    queue: Cell<Option<TaskQueueHandle>>,
    forwarder: RefCell<Option<HintForwarder>>,
}

fn slot(chunk: ChunkId) -> usize {
    let h = (chunk.0 as u64 ^ (chunk.0 >> 64) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> 32) as usize % STREAM_SLOTS
}

impl Prefetcher {
    /// Read-ahead into a cache slice of `cache_bytes`; off if `enabled` is
    /// false or the slice is too small to hold a window.
    pub(crate) fn new(enabled: bool, cache_bytes: u64) -> Prefetcher {
        let max_window = (cache_bytes / 16).min(MAX_WINDOW) / BLOCK * BLOCK;
        Prefetcher {
            max_window: if enabled && max_window >= MIN_WINDOW {
                max_window
            } else {
                0
            },
            streams: RefCell::new((0..STREAM_SLOTS).map(|_| None).collect()),
            pending: RefCell::new(HashMap::new()),
            queue: Cell::new(None),
            forwarder: RefCell::new(None),
        }
    }

    /// Routes hints for chunks of other shards (see [`HintForwarder`]).
    pub(crate) fn set_forwarder(&self, f: HintForwarder) {
        *self.forwarder.borrow_mut() = Some(f);
    }

    pub(crate) fn enabled(&self) -> bool {
        self.max_window > 0
    }

    /// Notes a read of `[offset, end)` of `chunk` and starts read-ahead if it
    /// continues a stream (into the next chunk id too, if `hints` says so).
    pub(crate) fn on_read(
        &self,
        inner: &Rc<Inner>,
        chunk: ChunkId,
        offset: u64,
        end: u64,
        hints: ReadHints,
    ) {
        // A read past any chunk's possible end fails its bounds check right
        // after this; it starts nothing (and the sums below stay in range).
        if !self.enabled() || end <= offset || end > MAX_STREAM_END {
            return;
        }
        // Only a marked stream needs the chunk's length (one more probe).
        let next = match (hints.continues_into_next_chunk, chunk.0.checked_add(1)) {
            (true, Some(n)) => inner.index.get_meta(chunk).map(|m| (ChunkId(n), m.len)),
            _ => None,
        };
        let (issue, hints) = {
            let mut streams = self.streams.borrow_mut();
            let entry = &mut streams[slot(chunk)];
            let continues = matches!(entry, Some((c, s)) if *c == chunk && s.next == offset);
            if !continues {
                *entry = Some((
                    chunk,
                    Stream {
                        next: end,
                        ..Stream::default()
                    },
                ));
                // A new stream starts reading ahead on its second read,
                // unless it is marked and this read already reaches the
                // chunk's end (a chunk read whole, or its tail): then it is
                // crossing into the next chunk now.
                if next.is_none_or(|(_, len)| end < len) {
                    return;
                }
            }
            let Some((_, s)) = entry.as_mut() else {
                return;
            };
            s.window = if s.window == 0 {
                MIN_WINDOW.max(2 * (end - offset))
            } else {
                s.window * 2
            }
            .min(self.max_window);
            s.next = end;
            let from = s.ahead.max(end);
            let target = (end + s.window).div_ceil(BLOCK) * BLOCK;
            if from < target && from - end <= s.window / 2 {
                s.ahead = target;
                let mut local = (from, target);
                let mut hints = Vec::new();
                if let Some((_, len)) = next {
                    local.1 = target.min(len.div_ceil(BLOCK) * BLOCK);
                    hints = crossing_hints(chunk, s, len, target);
                }
                (Some(local).filter(|(f, t)| f < t), hints)
            } else {
                (None, Vec::new())
            }
        };
        if let Some((from, to)) = issue {
            self.issue(inner, chunk, from, to);
        }
        for h in hints {
            let forwarded = self.forwarder.borrow().as_ref().is_some_and(|f| f(h));
            if !forwarded {
                self.accept(inner, h);
            }
        }
    }

    /// A marked stream arrives at the start of `h.chunk` (this shard's):
    /// read its first bytes ahead (at most a window, at most the chunk),
    /// and wait for the reader at offset 0 with the window it had. Ignored
    /// for a chunk that does not exist (nothing to read, and a stream
    /// claiming read-ahead would keep its reader from getting any) and for
    /// a chunk a reader is in the middle of (its own stream is kept); a
    /// stream that reached the chunk's end before is replaced.
    pub(crate) fn accept(&self, inner: &Rc<Inner>, h: StreamHint) {
        if !self.enabled() {
            return;
        }
        let Some(len) = inner.index.get_meta(h.chunk).map(|m| m.len) else {
            return;
        };
        let window = h
            .window
            .clamp(MIN_WINDOW.min(self.max_window), self.max_window);
        // A hint's numbers came from another shard's arithmetic: kept in
        // range here whatever they say.
        let further = h.further.min(MAX_CHUNKS_AHEAD);
        let max_len = h.max_len.min(MAX_STREAM_END);
        // What the chunk after this one was asked for, when it was (every
        // hint of one crossing asks the same estimated size).
        let next_asked = if further > 0 { h.ahead.min(window) } else { 0 };
        let ahead = h
            .ahead
            .min(window.div_ceil(BLOCK) * BLOCK)
            .min(len.div_ceil(BLOCK) * BLOCK);
        if ahead == 0 {
            return;
        }
        let range = {
            let mut streams = self.streams.borrow_mut();
            match &mut streams[slot(h.chunk)] {
                Some((c, s)) if *c == h.chunk && s.next != 0 && s.next < len => None,
                Some((c, s)) if *c == h.chunk && s.next == 0 => {
                    let from = s.ahead;
                    s.ahead = s.ahead.max(ahead);
                    s.window = s.window.max(window);
                    s.crossed_chunks = s.crossed_chunks.max(further);
                    s.max_len = s.max_len.max(max_len);
                    s.crossed = s.crossed.max(next_asked);
                    Some((from, s.ahead))
                }
                other => {
                    *other = Some((
                        h.chunk,
                        Stream {
                            next: 0,
                            window,
                            ahead,
                            crossed: next_asked,
                            crossed_chunks: further,
                            max_len,
                        },
                    ));
                    Some((0, ahead))
                }
            }
        };
        if let Some((from, to)) = range.filter(|(f, t)| f < t) {
            self.issue(inner, h.chunk, from, to);
        }
    }

    /// The chunk was deleted: forget its stream.
    pub(crate) fn forget(&self, chunk: ChunkId) {
        let mut streams = self.streams.borrow_mut();
        let entry = &mut streams[slot(chunk)];
        if entry.as_ref().is_some_and(|(c, _)| *c == chunk) {
            *entry = None;
        }
    }

    fn queue(&self) -> TaskQueueHandle {
        if let Some(q) = self.queue.get() {
            return q;
        }
        let q = glommio::executor().create_task_queue(
            Shares::Static(PREFETCH_SHARES),
            Latency::NotImportant,
            "prefetch",
        );
        self.queue.set(Some(q));
        q
    }

    fn issue(&self, inner: &Rc<Inner>, chunk: ChunkId, from: u64, to: u64) {
        let queue = self.queue();
        for block in from / BLOCK..to.div_ceil(BLOCK) {
            if self.pending.borrow().contains_key(&(chunk, block)) {
                continue;
            }
            let weak: Weak<Inner> = Rc::downgrade(inner);
            let fetch: Pending = async move {
                let Some(inner) = weak.upgrade() else { return };
                if let Err(e) = fetch(&inner, chunk, block * BLOCK, (block + 1) * BLOCK).await {
                    // A client's own read of these sectors reports it.
                    tracing::debug!(shard = inner.id.0, chunk = %chunk, error = %e, "read-ahead failed");
                }
                inner.prefetch.pending.borrow_mut().remove(&(chunk, block));
            }
            .boxed_local()
            .shared();
            self.pending
                .borrow_mut()
                .insert((chunk, block), fetch.clone());
            match glommio::spawn_local_into(fetch, queue) {
                Ok(task) => task.detach(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot spawn read-ahead");
                    self.pending.borrow_mut().remove(&(chunk, block));
                    return;
                }
            };
        }
    }

    /// Read-aheads in flight over bytes `[start, end)` of `chunk`.
    pub(crate) fn pending(&self, chunk: ChunkId, start: u64, end: u64) -> Vec<Pending> {
        let pending = self.pending.borrow();
        if pending.is_empty() {
            return Vec::new();
        }
        (start / BLOCK..end.div_ceil(BLOCK))
            .filter_map(|b| pending.get(&(chunk, b)).cloned())
            .collect()
    }
}

/// The hints a marked stream `s` in `chunk` (of `len` bytes) sends now that
/// its read-ahead reaches `target`, past the chunk's end. The part of the
/// window past the end (the spill) is spread over the chunk ids that
/// follow as if they were as long as the longest chunk the stream has
/// passed through (at least a block each, at most [`MAX_CHUNKS_AHEAD`] of
/// them: many only for a run of small chunks), each asked once for that
/// size; when the spill holds less than two such chunks, the next one is
/// asked for all of it (again whenever it grows). The spill is at most a
/// window, however long the READ asked for, so what is read ahead past the
/// chunk stays within a window (rounded up to a block), whatever the sizes.
fn crossing_hints(chunk: ChunkId, s: &mut Stream, len: u64, target: u64) -> Vec<StreamHint> {
    // At most a window past the chunk, however long the READ asked for.
    let spill = target.saturating_sub(len).min(s.window).div_ceil(BLOCK) * BLOCK;
    if spill == 0 {
        return Vec::new();
    }
    s.max_len = s.max_len.max(len);
    let size = s.max_len.div_ceil(BLOCK).max(1) * BLOCK;
    // Whole estimated chunks only, so the total stays within the spill.
    let reach = (spill / size).clamp(1, MAX_CHUNKS_AHEAD);
    let (window, max_len) = (s.window, s.max_len);
    // The hint for chunk id + j, asking for `ahead` bytes.
    let hint = |j: u64, ahead: u64| {
        let chunk = ChunkId(chunk.0.checked_add(u128::from(j))?);
        Some(StreamHint {
            chunk,
            window,
            ahead,
            further: reach - j,
            max_len,
        })
    };
    let mut out = Vec::new();
    let next_asked = if reach == 1 { spill } else { size };
    // Sent again whenever the read-ahead reaches further: the stream
    // waiting in the next chunk then takes over the grown window and knows
    // which ids after it have hints already.
    if next_asked > s.crossed || reach > s.crossed_chunks {
        s.crossed = s.crossed.max(next_asked);
        out.extend(hint(1, next_asked));
    }
    out.extend((s.crossed_chunks.max(1) + 1..=reach).filter_map(|j| hint(j, size)));
    s.crossed_chunks = s.crossed_chunks.max(reach);
    out
}

/// Reads the sectors of `[start, end)` of `chunk` that are not cached yet
/// into the cache.
async fn fetch(inner: &Inner, chunk: ChunkId, start: u64, end: u64) -> Result<(), ShardError> {
    let _epoch = inner.begin_read();
    let Some(meta) = inner.index.get_meta(chunk) else {
        return Ok(());
    };
    let end = end.min(meta.len);
    if start >= end {
        return Ok(());
    }
    let (first, last) = (start / SECTOR, end.div_ceil(SECTOR));
    let recs = inner.index.overlapping(chunk, first, last);
    // (record, from, to) of every run not cached yet.
    let mut misses = Vec::new();
    for r in &recs {
        let cached = |l: u64| {
            inner
                .cache
                .contains(r.generation.0, r.disk.0 + (l - r.logical.0))
        };
        let mut at = r.logical.0.max(first);
        let to = r.end().min(last);
        while at < to {
            if cached(at) {
                at += 1;
                continue;
            }
            let from = at;
            while at < to && !cached(at) {
                at += 1;
            }
            misses.push((r, from, at));
        }
    }
    let reads = misses
        .iter()
        .map(|(r, from, to)| inner.read_verified(chunk, r, *from, *to, ReadBy::ReadAhead));
    for ((r, from, _), res) in misses
        .iter()
        .zip(futures_util::future::join_all(reads).await)
    {
        let (buf, crcs) = res?;
        let disk = r.disk.0 + (from - r.logical.0);
        inner.cache.insert(r.generation.0, disk, &buf, &crcs, true);
    }
    Ok(())
}
