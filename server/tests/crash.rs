//! Real-process crash test: clients write (and delete) and record every
//! acknowledgement while the server is SIGKILLed at a random moment; after
//! each restart every acknowledged write must read back byte for byte, every
//! unacknowledged one must be all old or all new, and no read may answer
//! CORRUPT. Meanwhile another client resets its connections (SO_LINGER 0)
//! at random moments of its writes, so the server drops requests wherever
//! they are; those writes may land (now or after the restart) or not.
//!
//! `SHARDSTORE_CRASH_CYCLES=N` sets the number of kill cycles (default 16);
//! `SHARDSTORE_CRASH_SEED=S` the seed (printed on failure).

mod common;
use common::*;
use shardstore_client::{ClientConfig, ClientError};
use shardstore_proto::{
    encode_frame, limits, ChunkId, FrameHeader, Opcode, WriteRequest, HEADER_LEN,
};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Debug, PartialEq)]
enum State {
    Absent,
    Present(Vec<u8>),
}

/// Allowed states of each chunk: one when certain, two while a request's
/// outcome is unknown.
type Model = BTreeMap<ChunkId, Vec<State>>;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn applied(old: &State, off: usize, data: &[u8]) -> State {
    let mut b = match old {
        State::Present(b) => b.clone(),
        State::Absent => Vec::new(),
    };
    if b.len() < off + data.len() {
        b.resize(off + data.len(), 0);
    }
    b[off..off + data.len()].copy_from_slice(data);
    State::Present(b)
}

/// One writer: owns `chunks`, issues one request at a time until the server dies.
async fn writer(
    client: shardstore_client::Client,
    chunks: Vec<ChunkId>,
    mut model: Model,
    seed: u64,
) -> (Model, u64) {
    let mut rng = Rng(seed | 1);
    let mut acks = 0;
    loop {
        let c = chunks[rng.below(chunks.len() as u64) as usize];
        let old = model[&c][0].clone();
        let (res, new) = if rng.below(8) == 0 && matches!(old, State::Present(_)) {
            (client.delete(c).await.map(|_| ()), State::Absent)
        } else {
            let off = if rng.below(2) == 0 {
                rng.below(16) * 4096
            } else {
                rng.below(100_000)
            } as usize;
            let len = match rng.below(4) {
                0 => 4096,
                1 => 1 + rng.below(300_000) as usize,
                _ => 1 + rng.below(20_000) as usize,
            };
            let data = pattern(rng.next(), len);
            let new = applied(&old, off, &data);
            (client.write(c, off as u64, data).await.map(|_| ()), new)
        };
        match res {
            Ok(()) => {
                acks += 1;
                model.insert(c, vec![new]);
            }
            Err(_) => {
                // The server died (or is dying): outcome unknown. Stop.
                model.insert(c, vec![old, new]);
                return (model, acks);
            }
        }
    }
}

/// Length of every write of an [`abandoner`]: each replaces its whole chunk,
/// so every version it sent is a complete state the chunk may be in.
const ABANDONED_LEN: usize = 8192;

/// A client that gives up: each write of its `chunks` goes out on a fresh
/// connection to the front address (so it is forwarded when another shard
/// owns it); usually the connection is then reset after a random moment,
/// sometimes partway through the frame, sometimes the reply is awaited.
/// A write without a reply may land at any time until the server stops, even
/// after a later acknowledged one (it is still in flight on the server), so
/// every such version stays allowed until the next restart. Returns the
/// allowed states and the number of writes given up.
async fn abandoner(addr: String, chunks: Vec<ChunkId>, model: Model, seed: u64) -> (Model, u64) {
    let mut rng = Rng(seed | 1);
    let mut certain: BTreeMap<ChunkId, State> =
        chunks.iter().map(|c| (*c, model[c][0].clone())).collect();
    let mut maybe: BTreeMap<ChunkId, Vec<State>> = chunks
        .iter()
        .map(|c| (*c, model[c][1..].to_vec()))
        .collect();
    let mut given_up = 0;
    let done =
        |certain: BTreeMap<ChunkId, State>, mut maybe: BTreeMap<ChunkId, Vec<State>>| -> Model {
            certain
                .into_iter()
                .map(|(c, s)| {
                    let mut allowed = vec![s];
                    allowed.append(maybe.get_mut(&c).unwrap());
                    (c, allowed)
                })
                .collect()
        };
    loop {
        let c = chunks[rng.below(chunks.len() as u64) as usize];
        let data = pattern(rng.next(), ABANDONED_LEN);
        let new = State::Present(data.clone());
        let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await else {
            return (done(certain, maybe), given_up);
        };
        let w = WriteRequest {
            chunk: c.0,
            offset: 0,
            payload_crc: crc32c::crc32c(&data),
            flags: 0,
        };
        let mut frame = Vec::new();
        encode_frame(Opcode::Write, 0, 1, &w, data.len() as u32, &mut frame);
        frame.extend_from_slice(&data);
        let whole = rng.below(4) != 0;
        let send = if whole {
            frame.len()
        } else {
            1 + rng.below(frame.len() as u64 - 1) as usize
        };
        if s.write_all(&frame[..send]).await.is_err() {
            maybe.get_mut(&c).unwrap().push(new);
            return (done(certain, maybe), given_up);
        }
        if whole && rng.below(3) == 0 {
            let mut h = [0u8; HEADER_LEN];
            match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut h)).await {
                Ok(Ok(_)) => {
                    let (h, _) = FrameHeader::decode(&h, limits::MAX_PAYLOAD).unwrap();
                    if h.is_error() {
                        maybe.get_mut(&c).unwrap().push(new);
                    } else {
                        certain.insert(c, new);
                    }
                    continue;
                }
                _ => {
                    // The server died (or is dying).
                    maybe.get_mut(&c).unwrap().push(new);
                    return (done(certain, maybe), given_up);
                }
            }
        }
        tokio::time::sleep(Duration::from_micros(rng.below(2000))).await;
        // A linger of zero: the close sends RST at once (it never blocks).
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        drop(s);
        given_up += 1;
        if whole {
            maybe.get_mut(&c).unwrap().push(new);
        }
    }
}

async fn verify(client: &shardstore_client::Client, model: &mut Model, seed: u64, cycle: u32) {
    for (c, allowed) in model.iter_mut() {
        let got = match client.read(*c, 0, 4 << 20).await {
            Ok(r) => State::Present(r.data.to_vec()),
            Err(ClientError::NotFound(_)) => State::Absent,
            Err(e) => panic!("seed {seed} cycle {cycle}: chunk {c}: {e}"),
        };
        assert!(
            allowed.contains(&got),
            "seed {seed} cycle {cycle}: chunk {c}: content is none of {} allowed states \
             (acknowledged data lost or a torn write visible)",
            allowed.len()
        );
        *allowed = vec![got];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    let cycles: u32 = std::env::var("SHARDSTORE_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let seed: u64 = std::env::var("SHARDSTORE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash test: seed {seed} (SHARDSTORE_CRASH_SEED={seed} replays the schedule), {cycles} cycles");
    let dir = data_dir("crash");
    let mut rng = Rng(seed | 1);
    // Three writers per shard on average: with `--write-combine 1` (every
    // other round of modes) O_DSYNC writes queue and share device writes.
    let writers = 6u64;
    let per_writer = 6u64;
    let mut model: Model = (0..writers * per_writer)
        .map(|n| (ChunkId(0xc0de_0000 + n as u128), vec![State::Absent]))
        .collect();
    let abandoned_chunks: Vec<ChunkId> = (0..8).map(|n| ChunkId(0xab_0000 + n)).collect();
    for c in &abandoned_chunks {
        model.insert(*c, vec![State::Absent]);
    }
    let probes: Vec<ChunkId> = (0..2)
        .map(|shard| {
            (0x9e_0000u128..)
                .map(ChunkId)
                .find(|c| shardstore_proto::route(*c, 2).0 == shard)
                .unwrap()
        })
        .collect();
    let mut total_given_up = 0;
    let cfg = ClientConfig {
        request_timeout: Duration::from_secs(5),
        ..ClientConfig::default()
    };
    let mut total_acks = 0;
    for cycle in 0..cycles {
        // Every way of making a write durable, in turn: a restart may also
        // switch modes over the same data.
        let mode = ["dsync", "adaptive", "group"][cycle as usize % 3];
        let combine = ["1", "4"][cycle as usize / 3 % 2];
        // A short scrub period: scrub and sweep passes (tombstone
        // retirement erases sectors) run while the kills land.
        let srv = TestServer::try_start(
            &dir,
            2,
            &[
                "--sync-mode",
                mode,
                "--write-combine",
                combine,
                "--scrub-period-secs",
                "1",
            ],
        )
        .unwrap_or_else(|e| panic!("server did not start: {e}"));
        let client = srv.client_with(cfg.clone()).await;
        verify(&client, &mut model, seed, cycle).await;
        let mut tasks = Vec::new();
        for w in 0..writers {
            let chunks: Vec<ChunkId> = (0..per_writer)
                .map(|k| ChunkId(0xc0de_0000 + (w * per_writer + k) as u128))
                .collect();
            let mine: Model = chunks.iter().map(|c| (*c, model[c].clone())).collect();
            tasks.push(tokio::spawn(writer(
                client.clone(),
                chunks,
                mine,
                rng.next(),
            )));
        }
        let mine: Model = abandoned_chunks
            .iter()
            .map(|c| (*c, model[c].clone()))
            .collect();
        let gives_up = tokio::spawn(abandoner(
            srv.addr.clone(),
            abandoned_chunks.clone(),
            mine,
            rng.next(),
        ));
        tokio::time::sleep(Duration::from_millis(20 + rng.below(400))).await;
        // Still answering, whatever the abandoner cancelled meanwhile: a
        // write that cannot complete within the client's timeout (5 s) is
        // a hang (a cancelled request that left a lock or a semaphore
        // behind stops every later write of its shard). One chunk per
        // shard, outside the model.
        for chunk in &probes {
            if let Err(e) = client.write(*chunk, 0, vec![cycle as u8; 4096]).await {
                panic!("cycle {cycle}: the server stopped answering writes to {chunk}: {e}");
            }
        }
        let pid = srv.child.id();
        srv.kill();
        let (m, n) = tokio::time::timeout(Duration::from_secs(20), gives_up)
            .await
            .unwrap_or_else(|_| panic!("the abandoning client hung after the kill of pid {pid}"))
            .unwrap();
        model.extend(m);
        total_given_up += n;
        for t in tasks {
            let m = tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .unwrap_or_else(|_| panic!("writer hung after the kill of pid {pid}"))
                .unwrap();
            model.extend(m.0);
            total_acks += m.1;
        }
    }
    let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    eprintln!(
        "crash test: {total_acks} acknowledged writes/deletes over {cycles} kills, \
         {total_given_up} writes given up midway; \
         {} sweep passes and {} scrub passes finished before a kill",
        log.matches("sweep pass done").count(),
        log.matches("scrub pass done").count()
    );
    assert!(total_acks > u64::from(cycles), "the writers barely wrote");
    let srv = TestServer::start(&dir, 2);
    let client = srv.client_with(cfg).await;
    verify(&client, &mut model, seed, cycles).await;
    for s in 0..2 {
        let st = client.stats(shardstore_proto::ShardId(s)).await.unwrap();
        assert_eq!(st.corrupt_errors, 0);
        assert!(!st.fail_stopped);
    }
    let log = srv.log();
    assert!(log.contains("recovery_us"), "start-up logs its recovery");
    srv.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
