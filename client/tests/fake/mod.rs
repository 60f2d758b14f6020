//! A small in-process fake of a one-shard shardstore node, speaking the real
//! protocol with the real codec, with knobs for the faults the client must
//! survive: out-of-order replies, corrupted payload crcs, silence, dropped
//! connections, injected error replies.

#![allow(dead_code)]

use shardstore_net::FrameReader;
use shardstore_proto::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::compat::TokioAsyncReadCompatExt;

pub struct Ctl {
    pub addr: String,
    /// Hold replies until this many are ready, then send them newest first.
    pub reorder: AtomicUsize,
    /// Send READ replies with a wrong payload crc.
    pub corrupt_read_crc: AtomicBool,
    /// Send READ replies one byte short (with a matching crc).
    pub short_read: AtomicBool,
    /// Read requests and never answer them.
    pub silent: AtomicBool,
    /// Stop reading requests (between frames) while set.
    pub paused: AtomicBool,
    /// Close the connection, without answering, on this many next requests.
    pub drop_next: AtomicUsize,
    /// Advertised in TOPOLOGY.
    pub max_payload: AtomicU32,
    pub route_fn: AtomicU32,
    /// The shard a STATS reply says it comes from.
    pub stats_shard: AtomicU32,
    pub connections: AtomicUsize,
    pub requests: AtomicUsize,
    /// Chunk -> (code, sector, message) answered to any request on it.
    pub errors: Mutex<HashMap<u128, (u16, u64, String)>>,
    /// Chunk -> (bytes, version).
    pub chunks: Mutex<BTreeMap<u128, (Vec<u8>, u64)>>,
}

pub struct Fake {
    pub addr: String,
    pub ctl: Arc<Ctl>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Fake {
    pub async fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let ctl = Arc::new(Ctl {
            addr: addr.clone(),
            reorder: AtomicUsize::new(1),
            corrupt_read_crc: AtomicBool::new(false),
            short_read: AtomicBool::new(false),
            silent: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            drop_next: AtomicUsize::new(0),
            max_payload: AtomicU32::new(limits::MAX_PAYLOAD),
            route_fn: AtomicU32::new(ROUTE_FN_JUMP_SPLITMIX),
            stats_shard: AtomicU32::new(0),
            connections: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            errors: Mutex::new(HashMap::new()),
            chunks: Mutex::new(BTreeMap::new()),
        });
        let c = ctl.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                c.connections.fetch_add(1, SeqCst);
                tokio::spawn(serve(c.clone(), stream));
            }
        });
        Fake { addr, ctl, accept }
    }

    pub fn inject_error(&self, chunk: u128, code: u16, sector: u64, message: &str) {
        self.ctl
            .errors
            .lock()
            .unwrap()
            .insert(chunk, (code, sector, message.to_owned()));
    }
}

async fn serve(ctl: Arc<Ctl>, stream: TcpStream) {
    stream.set_nodelay(true).unwrap();
    let (rd, mut wr) = stream.into_split();
    let mut reader = FrameReader::new(rd.compat(), limits::MAX_PAYLOAD);
    let mut held: Vec<Vec<u8>> = Vec::new();
    loop {
        while ctl.paused.load(SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let frame = match reader.next_frame().await {
            Ok(Some(f)) => f,
            _ => return,
        };
        ctl.requests.fetch_add(1, SeqCst);
        if ctl
            .drop_next
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return; // both halves dropped: the client sees EOF
        }
        if ctl.silent.load(SeqCst) {
            continue;
        }
        held.push(handle(&ctl, &frame));
        if held.len() >= ctl.reorder.load(SeqCst).max(1) {
            let mut out = Vec::new();
            for r in held.drain(..).rev() {
                out.extend_from_slice(&r);
            }
            if wr.write_all(&out).await.is_err() {
                return;
            }
        }
    }
}

/// A reply frame (macro: `encode_frame`'s bounds are rkyv traits).
macro_rules! reply {
    ($op:expr, $id:expr, $body:expr) => {
        reply!($op, $id, $body, &[][..])
    };
    ($op:expr, $id:expr, $body:expr, $payload:expr) => {{
        let payload: &[u8] = $payload;
        let mut out = Vec::new();
        encode_frame(
            $op,
            FLAG_RESPONSE,
            $id,
            $body,
            payload.len() as u32,
            &mut out,
        );
        out.extend_from_slice(payload);
        out
    }};
}

fn error_reply(
    op: Opcode,
    id: u64,
    code: ErrorCode,
    chunk: u128,
    sector: u64,
    message: &str,
) -> Vec<u8> {
    error_reply_raw(op, id, code as u16, chunk, sector, message)
}

fn error_reply_raw(
    op: Opcode,
    id: u64,
    code: u16,
    chunk: u128,
    sector: u64,
    message: &str,
) -> Vec<u8> {
    let body = ErrorBody {
        code,
        chunk,
        sector,
        message: message.to_owned(),
    };
    let mut out = Vec::new();
    encode_frame(op, FLAG_RESPONSE | FLAG_ERROR, id, &body, 0, &mut out);
    out
}

fn request_chunk(f: &shardstore_net::Frame) -> Option<u128> {
    match f.opcode {
        Opcode::Write => Some(
            access_body::<ArchivedWriteRequest>(&f.body)
                .ok()?
                .chunk
                .to_native(),
        ),
        Opcode::Read => Some(
            access_body::<ArchivedReadRequest>(&f.body)
                .ok()?
                .chunk
                .to_native(),
        ),
        Opcode::Stat | Opcode::Delete => Some(
            access_body::<ArchivedChunkRequest>(&f.body)
                .ok()?
                .chunk
                .to_native(),
        ),
        _ => None,
    }
}

fn handle(ctl: &Ctl, f: &shardstore_net::Frame) -> Vec<u8> {
    let id = f.header.request_id;
    let op = f.opcode;
    if let Some(chunk) = request_chunk(f) {
        if let Some((code, sector, msg)) = ctl.errors.lock().unwrap().get(&chunk) {
            return error_reply_raw(op, id, *code, chunk, *sector, msg);
        }
    }
    let mut chunks = ctl.chunks.lock().unwrap();
    match op {
        Opcode::Ping => reply!(op, id, &Empty {}),
        Opcode::Stats => reply!(
            op,
            id,
            &StatsReply {
                shard: ctl.stats_shard.load(SeqCst),
                ..StatsReply::default()
            }
        ),
        Opcode::Topology => reply!(
            op,
            id,
            &TopologyReply {
                protocol_version: PROTOCOL_VERSION,
                node_id: 0xfeed,
                shard_count: 1,
                route_fn: ctl.route_fn.load(SeqCst),
                answering_shard: 0,
                sector_size: limits::SECTOR_SIZE,
                max_payload: ctl.max_payload.load(SeqCst),
                max_chunk_size: limits::MAX_CHUNK_SIZE,
                shard_addrs: vec![ctl.addr.clone()],
            }
        ),
        Opcode::Write => {
            let r = access_body::<ArchivedWriteRequest>(&f.body).unwrap();
            let chunk = r.chunk.to_native();
            if payload_crc(&f.payload) != r.payload_crc.to_native() {
                return error_reply(op, id, ErrorCode::BadChecksum, chunk, 0, "payload crc");
            }
            let (data, version) = chunks.entry(chunk).or_default();
            let off = r.offset.to_native() as usize;
            if data.len() < off + f.payload.len() {
                data.resize(off + f.payload.len(), 0);
            }
            data[off..off + f.payload.len()].copy_from_slice(&f.payload);
            *version += 1;
            reply!(
                op,
                id,
                &WriteReply {
                    version: *version,
                    chunk_len: data.len() as u64,
                }
            )
        }
        Opcode::Read => {
            let r = access_body::<ArchivedReadRequest>(&f.body).unwrap();
            let chunk = r.chunk.to_native();
            let Some((data, version)) = chunks.get(&chunk) else {
                return error_reply(op, id, ErrorCode::NotFound, 0, 0, "no such chunk");
            };
            let start = (r.offset.to_native() as usize).min(data.len());
            let end = (start + r.len.to_native() as usize).min(data.len());
            let mut payload = &data[start..end];
            if ctl.short_read.load(SeqCst) && !payload.is_empty() {
                payload = &payload[..payload.len() - 1];
            }
            let mut crc = payload_crc(payload);
            if ctl.corrupt_read_crc.load(SeqCst) {
                crc ^= 1;
            }
            reply!(
                op,
                id,
                &ReadReply {
                    version: *version,
                    chunk_len: data.len() as u64,
                    payload_crc: crc,
                },
                payload
            )
        }
        Opcode::Stat => {
            let chunk = access_body::<ArchivedChunkRequest>(&f.body)
                .unwrap()
                .chunk
                .to_native();
            let Some((data, version)) = chunks.get(&chunk) else {
                return error_reply(op, id, ErrorCode::NotFound, chunk, 0, "no such chunk");
            };
            reply!(
                op,
                id,
                &StatReply {
                    chunk_len: data.len() as u64,
                    version: *version,
                    created_ns: 1,
                    modified_ns: 2,
                    shard: 0,
                    allocated_bytes: data.len().div_ceil(4096) as u64 * 4096,
                }
            )
        }
        Opcode::Delete => {
            let chunk = access_body::<ArchivedChunkRequest>(&f.body)
                .unwrap()
                .chunk
                .to_native();
            match chunks.remove(&chunk) {
                Some((_, version)) => reply!(op, id, &DeleteReply { version }),
                None => error_reply(op, id, ErrorCode::NotFound, chunk, 0, "no such chunk"),
            }
        }
        Opcode::List => {
            let r = access_body::<ArchivedListRequest>(&f.body).unwrap();
            let after = r.after.to_native();
            let limit = r.limit.to_native() as usize;
            let mut entries: Vec<ListEntry> = chunks
                .iter()
                .filter(|(c, _)| r.from_start || **c > after)
                .take(limit + 1)
                .map(|(c, (data, version))| ListEntry {
                    chunk: *c,
                    chunk_len: data.len() as u64,
                    version: *version,
                })
                .collect();
            let more = entries.len() > limit;
            entries.truncate(limit);
            reply!(op, id, &ListReply { entries, more })
        }
        _ => error_reply(op, id, ErrorCode::UnknownOpcode, 0, 0, "not in the fake"),
    }
}
