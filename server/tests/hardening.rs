//! Hostile and broken clients against a live server. After each scenario,
//! normal clients still get answers with bounded latency and the server's
//! RSS stays within its budget: 128 MiB plus the read cache, which these
//! scenarios barely fill (one test fills a small cache on purpose).

mod common;
use common::*;
use shardstore_client::{Client, ClientConfig, ClientError, Secret};
use shardstore_proto::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RSS_BUDGET_BYTES: u64 = 128 << 20;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

fn raise_nofile() {
    // SAFETY: plain rlimit calls on this process.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
}

/// A normal client still gets a write and a read through, quickly.
async fn healthy(srv: &TestServer, tag: u128) {
    let c = srv.client().await;
    let t = Instant::now();
    let id = ChunkId(0x4ea1_0000 + tag);
    c.write(id, 0, pattern(tag as u64, 4096)).await.unwrap();
    assert_eq!(c.read(id, 0, 4096).await.unwrap().data.len(), 4096);
    c.ping().await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "normal client slowed to {:?}",
        t.elapsed()
    );
    let rss = rss_bytes(srv.child.id());
    assert!(
        rss < RSS_BUDGET_BYTES,
        "server RSS {} MiB over budget",
        rss >> 20
    );
}

async fn closed_within(s: &mut TcpStream, d: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + d;
    loop {
        match tokio::time::timeout_at(deadline.into(), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // an error frame before the close
            Err(_) => return false,
        }
    }
}

fn ping_frame(id: u64) -> Vec<u8> {
    let mut f = Vec::new();
    encode_frame(Opcode::Ping, 0, id, &Empty {}, 0, &mut f);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_and_flooding_clients_are_cut_off() {
    raise_nofile();
    let dir = data_dir("slow");
    let srv = TestServer::try_start(
        &dir,
        2,
        &[
            "--frame-timeout-ms",
            "400",
            "--idle-timeout-ms",
            "1500",
            "--write-timeout-ms",
            "1000",
        ],
    )
    .unwrap();
    healthy(&srv, 1).await;

    // 1 byte per 100 ms: the frame does not arrive whole within 400 ms.
    let mut slow = TcpStream::connect(&srv.addr).await.unwrap();
    let f = ping_frame(1);
    let t = Instant::now();
    let mut cut = false;
    for b in &f {
        if slow.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if t.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    assert!(
        cut || closed_within(&mut slow, Duration::from_secs(2)).await,
        "slowloris not cut off"
    );
    assert!(t.elapsed() < Duration::from_secs(3));
    healthy(&srv, 2).await;

    // Thousands of idle connections: all served by backpressure-free
    // accept, all closed by the idle timeout, memory bounded.
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(TcpStream::connect(&srv.addr).await.unwrap());
    }
    healthy(&srv, 3).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut closed = 0;
    for s in idle.iter_mut() {
        if closed_within(s, Duration::from_millis(50)).await {
            closed += 1;
        }
    }
    assert!(
        closed >= 1990,
        "only {closed} of 2000 idle connections closed"
    );
    drop(idle);

    // Connect/close flood.
    for _ in 0..3000 {
        drop(TcpStream::connect(&srv.addr).await.unwrap());
    }
    healthy(&srv, 4).await;
    // The slowloris and the idle connections are counted.
    let c = srv.client().await;
    let mut n = 0;
    for shard in [ShardId(0), ShardId(1)] {
        n += c.stats(shard).await.unwrap().timeouts;
    }
    assert!(n >= 2, "timeouts counted: {n}");
}

/// A client that pipelines reads and never reads the replies is cut off
/// once its replies cannot drain (write timeout), and counted; memory stays
/// flat. The idle timeout is long here, so no other connection's timeout
/// is counted meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_counted() {
    let dir = data_dir("hog");
    let srv = TestServer::try_start(
        &dir,
        2,
        &["--idle-timeout-ms", "60000", "--write-timeout-ms", "1000"],
    )
    .unwrap();
    let c = srv.client().await;
    c.write(ChunkId(0xb16), 0, vec![9u8; 1 << 20])
        .await
        .unwrap();
    let timeouts = |c: shardstore_client::Client| async move {
        let mut n = 0;
        for shard in [ShardId(0), ShardId(1)] {
            n += c.stats(shard).await.unwrap().timeouts;
        }
        n
    };
    let before = timeouts(c.clone()).await;
    let mut hog = TcpStream::connect(&srv.addr).await.unwrap();
    let reqs = read_frames(0xb16, 2000, 1 << 20);
    let writer = tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(5), hog.write_all(&reqs)).await;
        hog
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    healthy(&srv, 5).await;
    let mut hog = writer.await.unwrap();
    // Unread, the hog is cut off (and counted) within the write timeout
    // from the socket last taking anything. Only then drained: a client
    // that reads is not cut off, however many replies it has to take.
    let t = Instant::now();
    while timeouts(c.clone()).await == before {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "non-reading client not cut off (or its write timeout not counted)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        closed_within(&mut hog, Duration::from_secs(5)).await,
        "non-reading client not closed after its write timeout"
    );
    healthy(&srv, 6).await;
    assert_eq!(timeouts(c).await, before + 1);
}

/// A client that reads its replies slowly but steadily is not cut off,
/// however long the whole burst takes to drain: the write timeout counts
/// from the last time the socket took anything (it counted from the first
/// refusal of a flush, cutting such a client off mid-burst).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_that_keeps_reading_gets_every_reply() {
    let dir = data_dir("slowreader");
    let srv = TestServer::try_start(&dir, 1, &["--write-timeout-ms", "500"]).unwrap();
    let c = srv.client().await;
    c.write(ChunkId(0x51), 0, pattern(0x51, 1 << 20))
        .await
        .unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(32 << 10).unwrap();
    let mut s = sock.connect(srv.addr.parse().unwrap()).await.unwrap();
    const N: u64 = 12;
    s.write_all(&read_frames(0x51, N, 1 << 20)).await.unwrap();
    // About 1.3 MB/s: the 12 MiB of replies take about 9 s, far more than
    // the write timeout, and the socket never takes all of them at once.
    let t = Instant::now();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    // Replies parsed so far, and where the next one starts.
    let (mut replies, mut at) = (0, 0);
    while replies < N {
        match s.read(&mut buf).await.unwrap() {
            0 => panic!(
                "cut off after {:?}, {replies} of {N} replies read",
                t.elapsed()
            ),
            n => got.extend_from_slice(&buf[..n]),
        }
        while let Some(h) = got.get(at..at + HEADER_LEN) {
            let (h, _) = FrameHeader::decode(h.try_into().unwrap(), limits::MAX_PAYLOAD).unwrap();
            let end = at + HEADER_LEN + h.rest_len();
            if end > got.len() {
                break;
            }
            assert!(!h.is_error(), "an error reply");
            let payload = at + HEADER_LEN + h.body_len as usize;
            assert!(got[payload..end] == pattern(0x51, 1 << 20)[..]);
            (replies, at) = (replies + 1, end);
        }
        tokio::time::sleep(Duration::from_millis(12)).await;
    }
    assert!(
        t.elapsed() > Duration::from_secs(2),
        "drained in {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_answers_busy() {
    raise_nofile();
    let dir = data_dir("connlimit");
    let srv = TestServer::try_start(&dir, 1, &["--max-connections-per-shard", "20"]).unwrap();
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(&srv.addr).await.unwrap();
        s.write_all(&ping_frame(1)).await.unwrap();
        let mut h = [0u8; HEADER_LEN];
        s.read_exact(&mut h).await.unwrap();
        held.push(s);
    }
    // The 21st connection gets a typed BUSY frame and is closed.
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).await.unwrap();
    let (h, _) = FrameHeader::decode(&h, limits::MAX_PAYLOAD).unwrap();
    let mut body = vec![0u8; h.body_len as usize];
    s.read_exact(&mut body).await.unwrap();
    let e = access_body::<ArchivedErrorBody>(&body).unwrap();
    assert_eq!(
        ErrorCode::from_u16(e.code.to_native()),
        Some(ErrorCode::Busy)
    );
    assert!(closed_within(&mut s, Duration::from_secs(2)).await);
    // Existing connections are unaffected; freeing one lets a new one in.
    let s0 = held.last_mut().unwrap();
    s0.write_all(&ping_frame(3)).await.unwrap();
    let mut h = [0u8; HEADER_LEN];
    s0.read_exact(&mut h).await.unwrap();
    held.pop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    s.write_all(&ping_frame(2)).await.unwrap();
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).await.unwrap();
    let (h, _) = FrameHeader::decode(&h, limits::MAX_PAYLOAD).unwrap();
    assert!(!h.is_error());
}

/// Connections that wait in the kernel's backlog together (the server was
/// stopped while they connected) are counted as they are accepted, not when
/// their tasks first run: the limit still holds. It did not: the accept
/// loop took the whole backlog before any connection task ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_connections_stays_within_the_limit() {
    raise_nofile();
    let dir = data_dir("connburst");
    let srv = TestServer::try_start(&dir, 1, &["--max-connections-per-shard", "20"]).unwrap();
    let pid = srv.child.id().to_string();
    let signal = |sig: &str| {
        let st = std::process::Command::new("kill")
            .args([sig, &pid])
            .status();
        assert!(st.unwrap().success(), "kill {sig}");
    };
    signal("-STOP");
    let mut socks = Vec::new();
    for _ in 0..60 {
        socks.push(TcpStream::connect(&srv.addr).await.unwrap());
    }
    signal("-CONT");
    let (mut served, mut busy) = (0, 0);
    for (i, s) in socks.iter_mut().enumerate() {
        let _ = s.write_all(&ping_frame(i as u64)).await;
        let mut h = [0u8; HEADER_LEN];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut h)).await;
        let Ok(Ok(_)) = read else { continue };
        match FrameHeader::decode(&h, limits::MAX_PAYLOAD) {
            Ok((h, _)) if h.is_error() => busy += 1,
            Ok(_) => served += 1,
            Err(e) => panic!("bad frame: {e:?}"),
        }
    }
    assert_eq!(served, 20, "served {served}, busy {busy}");
    assert_eq!(busy, 40, "served {served}, busy {busy}");
    drop(socks);
    // The server sees the 20 served connections close asynchronously; until
    // then a new one is still over the limit (a loaded machine made this
    // check fail now and then).
    let t = Instant::now();
    while Client::connect(&srv.addr).await.is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the limit never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    healthy(&srv, 7).await;
}

/// `n` READ frames (ids 0..n) of `len` bytes at offset 0 of `chunk`.
/// A large WRITE sent slowly but steadily (about 250 KiB/s, well above the
/// 64 KiB/s floor) arrives whole though it takes four times the frame
/// timeout: a frame's allowance grows with its length. It used to be cut
/// off at the frame timeout, so a client on a slow link could never write
/// a large chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_write_sent_slowly_but_steadily_arrives() {
    let dir = data_dir("slowwrite");
    let srv = TestServer::try_start(&dir, 1, &["--frame-timeout-ms", "1000"]).unwrap();
    let data = pattern(0x5107, 1 << 20);
    let frame = write_frame(7, 0x5107, &data, crc32c::crc32c(&data));
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    let t = Instant::now();
    for piece in frame.chunks(64 << 10) {
        s.write_all(piece).await.expect("cut off while sending");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(t.elapsed() > Duration::from_secs(4));
    let mut h = [0u8; HEADER_LEN];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut h))
        .await
        .expect("no reply")
        .expect("connection closed: the frame was cut off");
    let (h, _) = FrameHeader::decode(&h, limits::MAX_PAYLOAD).unwrap();
    assert_eq!(h.request_id, 7);
    assert!(!h.is_error(), "the write failed");
    let c = srv.client().await;
    let got = c.read(ChunkId(0x5107), 0, 1 << 20).await.unwrap();
    assert!(got.data[..] == data[..], "wrong bytes");
}

/// A WRITE that declares a large payload and then sends nothing is cut off
/// about a frame timeout after it stopped (and counted), though a steady
/// sender of that payload would have many seconds more: its reservation of
/// the shard's budget was held for the whole payload's allowance (over two
/// minutes for 8 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_write_that_stops_sending_is_cut_off() {
    let dir = data_dir("stalledwrite");
    let srv = TestServer::try_start(&dir, 1, &["--frame-timeout-ms", "1000"]).unwrap();
    let c = srv.client().await;
    let before = c.stats(ShardId(0)).await.unwrap().timeouts;
    let data = pattern(0x57a1, 8 << 20);
    let frame = write_frame(8, 0x57a1, &data, crc32c::crc32c(&data));
    // The header, the body and the payload's first 64 KiB.
    let sent = frame.len() - data.len() + (64 << 10);
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    s.write_all(&frame[..sent]).await.unwrap();
    // 8 MiB at 64 KiB/s would allow 129 s; stopped, it gets about 2 s.
    assert!(
        closed_within(&mut s, Duration::from_secs(6)).await,
        "a stalled WRITE kept its connection"
    );
    assert_eq!(c.stats(ShardId(0)).await.unwrap().timeouts, before + 1);
    assert!(
        c.stat(ChunkId(0x57a1)).await.is_err(),
        "a partial write stored"
    );
}

fn read_frames(chunk: u128, n: u64, len: u32) -> Vec<u8> {
    let mut reqs = Vec::new();
    for i in 0..n {
        let r = ReadRequest {
            chunk,
            offset: 0,
            len,
            flags: 0,
        };
        encode_frame(Opcode::Read, 0, i, &r, 0, &mut reqs);
    }
    reqs
}

/// Sends `n` READs of `MAX_PAYLOAD` bytes at offset 0 of `chunk` in one
/// write, then reads their replies: per reply, the error code (None for a
/// success) and its payload.
async fn pipelined_big_reads(
    s: &mut TcpStream,
    chunk: u128,
    n: u64,
) -> Vec<(Option<u16>, Vec<u8>)> {
    s.write_all(&read_frames(chunk, n, limits::MAX_PAYLOAD))
        .await
        .unwrap();
    let mut replies = Vec::new();
    for _ in 0..n {
        let mut h = [0u8; HEADER_LEN];
        s.read_exact(&mut h).await.unwrap();
        let (h, _) = FrameHeader::decode(&h, limits::MAX_PAYLOAD).unwrap();
        let mut rest = vec![0u8; h.rest_len()];
        s.read_exact(&mut rest).await.unwrap();
        let payload = rest.split_off(h.body_len as usize);
        let code = h.is_error().then(|| {
            access_body::<ArchivedErrorBody>(&rest)
                .unwrap()
                .code
                .to_native()
        });
        replies.push((code, payload));
    }
    replies
}

/// Counts replies by error code (0: success).
fn by_code(replies: &[(Option<u16>, Vec<u8>)]) -> std::collections::BTreeMap<u16, u64> {
    let mut codes = std::collections::BTreeMap::new();
    for (code, _) in replies {
        *codes.entry(code.unwrap_or(0)).or_insert(0) += 1;
    }
    codes
}

/// A burst of READs answered at once (missing chunk: NOT_FOUND, no I/O)
/// all get NOT_FOUND, none BUSY. Each used to reserve its 8 MiB length
/// until its reply was sent, and this test guarded the connection sending
/// its replies once it holds its own bound; a READ of a missing chunk now
/// reserves nothing (see `reads_hold_budget_for_what_they_return`), so it
/// guards only the outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_answered_reads_does_not_exhaust_the_shard_budget() {
    let dir = data_dir("readburst");
    let srv = TestServer::start(&dir, 1);
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    let n = 300u64;
    let codes = by_code(&pipelined_big_reads(&mut s, 0xdead, n).await);
    let not_found = ErrorCode::NotFound as u16;
    assert_eq!(codes.get(&not_found), Some(&n), "{codes:?} (by code)");
}

/// A READ holds budget for what it can return, not for what it asks: 8 MiB
/// READs of a 4 KiB chunk, pipelined on one connection to a shard whose
/// whole budget is 8 MiB, all succeed, cached or not. Each used to hold its
/// 8 MiB until its reply was sent, so every READ behind the first got BUSY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_hold_budget_for_what_they_return() {
    for cache in ["64", "0"] {
        let dir = data_dir(&format!("readhold-{cache}"));
        let srv =
            TestServer::try_start(&dir, 1, &["--shard-buffer-mib", "8", "--cache-mib", cache])
                .unwrap();
        let data = pattern(7, 4096);
        let c = srv.client().await;
        c.write(ChunkId(0xbeef), 0, bytes::Bytes::from(data.clone()))
            .await
            .unwrap();
        let mut s = TcpStream::connect(&srv.addr).await.unwrap();
        let replies = pipelined_big_reads(&mut s, 0xbeef, 50).await;
        assert_eq!(
            by_code(&replies).get(&0),
            Some(&50),
            "cache {cache}: replies by code {:?}",
            by_code(&replies)
        );
        assert!(
            replies.iter().all(|(_, p)| p == &data),
            "cache {cache}: the chunk's bytes"
        );
    }
}

/// Cache hits answered inline hold their payload from the budget too (they
/// reserve once their reply is built): over it they get BUSY in a well
/// formed stream. A client that asks for 1 MiB replies and does not read
/// them holds the whole 1 MiB budget; once it is gone, the same reads
/// succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_over_the_budget_get_busy_in_a_well_formed_stream() {
    let dir = data_dir("hitbusy");
    let srv = TestServer::try_start(&dir, 1, &["--shard-buffer-mib", "1"]).unwrap();
    let data = pattern(9, 1 << 20);
    let c = srv.client().await;
    c.write(ChunkId(0xcafe), 0, bytes::Bytes::from(data.clone()))
        .await
        .unwrap();
    for _ in 0..2 {
        let back = c.read(ChunkId(0xcafe), 0, 1 << 20).await.unwrap();
        assert_eq!(&back.data[..], &data[..]);
    }
    let mut hog = TcpStream::connect(&srv.addr).await.unwrap();
    hog.write_all(&read_frames(0xcafe, 64, 1 << 20))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    let codes = by_code(&pipelined_big_reads(&mut s, 0xcafe, 12).await);
    assert_eq!(codes.get(&(ErrorCode::Busy as u16)), Some(&12), "{codes:?}");
    drop(hog);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let replies = pipelined_big_reads(&mut s, 0xcafe, 12).await;
    assert_eq!(
        by_code(&replies).get(&0),
        Some(&12),
        "{:?}",
        by_code(&replies)
    );
    assert!(replies.iter().all(|(_, p)| p == &data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_gets_typed_busy_and_memory_stays_flat() {
    raise_nofile();
    let dir = data_dir("overload");
    let srv = TestServer::try_start(
        &dir,
        2,
        &["--shard-buffer-mib", "4", "--capacity-mib", "512"],
    )
    .unwrap();
    let rss0 = rss_bytes(srv.child.id());
    // 1000 connections (500 clients x 2 shards), each with writes of 256 KiB
    // in flight: far more than the 4 MiB per-shard buffer budget.
    let mut clients = Vec::new();
    for _ in 0..500 {
        clients.push(srv.client().await);
    }
    let data = bytes::Bytes::from(vec![7u8; 256 << 10]);
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut tasks = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let c = c.clone();
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut busy, mut other) = (0u64, 0u64, 0u64);
            let mut n = 0u128;
            while Instant::now() < deadline {
                match c
                    .write(ChunkId(((i as u128 % 64) << 32) | (n % 2)), 0, data.clone())
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(e) if e.code() == Some(ErrorCode::Busy) => busy += 1,
                    Err(e) => {
                        eprintln!("unexpected: {e}");
                        other += 1
                    }
                }
                n += 1;
            }
            (ok, busy, other)
        }));
    }
    let mut peak = 0;
    while Instant::now() < deadline {
        peak = peak.max(rss_bytes(srv.child.id()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut ok, mut busy, mut other) = (0, 0, 0);
    for t in tasks {
        let (a, b, c) = t.await.unwrap();
        ok += a;
        busy += b;
        other += c;
    }
    eprintln!(
        "overload: ok {ok} busy {busy} other {other}, rss start {} MiB peak {} MiB",
        rss0 >> 20,
        peak >> 20
    );
    assert!(ok > 0, "goodput collapsed");
    assert!(busy > 0, "overload never answered BUSY");
    assert_eq!(other, 0, "only typed BUSY errors are acceptable");
    assert!(peak < RSS_BUDGET_BYTES, "RSS peaked at {} MiB", peak >> 20);
    drop(clients);
    tokio::time::sleep(Duration::from_millis(500)).await;
    healthy(&srv, 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_secret_authentication() {
    let dir = data_dir("auth");
    let secret = dir.join("secret");
    std::fs::write(&secret, "correct horse battery staple\n").unwrap();
    let wrong = dir.join("wrong");
    std::fs::write(&wrong, "incorrect donkey battery staple\n").unwrap();
    let srv = TestServer::try_start(
        &dir,
        2,
        &[
            "--auth-secret-file",
            secret.to_str().unwrap(),
            "--frame-timeout-ms",
            "500",
        ],
    )
    .unwrap();
    let cfg = |p: &std::path::Path| ClientConfig {
        secret: Some(Secret::from_file(p).unwrap()),
        ..ClientConfig::default()
    };
    // Right secret: everything works, on every shard connection.
    let c = shardstore_client::Client::connect_with(&srv.addr, cfg(&secret))
        .await
        .unwrap();
    c.write(ChunkId(1), 0, vec![1u8; 10]).await.unwrap();
    for s in 0..2 {
        c.ping_shard(ShardId(s)).await.unwrap();
    }
    // Wrong secret: typed failure, nothing executed.
    let e = shardstore_client::Client::connect_with(&srv.addr, cfg(&wrong))
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Auth(_)), "{e:?}");
    // No secret: the first request gets UNAUTHORIZED and the connection closes.
    let e = shardstore_client::Client::connect(&srv.addr)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthorized), "{e:?}");
    // Counted: refusals, not connections that never tried (a health check
    // that connects and closes, a client that says nothing in time).
    let failures = || async {
        let mut n = 0;
        for shard in [ShardId(0), ShardId(1)] {
            n += c.stats(shard).await.unwrap().auth_failures;
        }
        n
    };
    let before = failures().await;
    for _ in 0..3 {
        drop(TcpStream::connect(&srv.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        failures().await,
        before,
        "a connect-and-close counted as an auth failure"
    );
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    let mut f = Vec::new();
    encode_frame(Opcode::Delete, 0, 5, &ChunkRequest { chunk: 1 }, 0, &mut f);
    s.write_all(&f).await.unwrap();
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).await.unwrap();
    let (h, _) = FrameHeader::decode(&h, limits::MAX_PAYLOAD).unwrap();
    assert!(h.is_error() && h.request_id == 5);
    assert!(closed_within(&mut s, Duration::from_secs(2)).await);
    assert_eq!(
        c.read(ChunkId(1), 0, 10).await.unwrap().data.len(),
        10,
        "the DELETE was executed"
    );
    assert_eq!(failures().await, before + 1, "the refused DELETE");
    // Handshake deadline: say nothing and be cut off (a timeout).
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(3)).await);
    assert_eq!(
        failures().await,
        before + 1,
        "a timeout counted as an auth failure"
    );
    // A client with a secret refuses a server that does not authenticate.
    let open_dir = data_dir("auth-open");
    let open = TestServer::start(&open_dir, 1);
    let e = shardstore_client::Client::connect_with(&open.addr, cfg(&secret))
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Auth(_)), "{e:?}");
}

#[test]
fn non_loopback_bind_needs_auth_or_explicit_insecure_flag() {
    let dir = data_dir("bind");
    let err = match TestServer::try_start(&dir, 1, &["--listen", "0.0.0.0:0"]) {
        Ok(_) => panic!("a non-loopback bind without authentication started"),
        Err(e) => e,
    };
    assert!(err.contains("--insecure-no-auth"), "{err}");
    let srv =
        TestServer::try_start(&dir, 1, &["--listen", "0.0.0.0:0", "--insecure-no-auth"]).unwrap();
    drop(srv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_forward_queue_answers_busy() {
    let dir = data_dir("fwdbusy");
    let srv = TestServer::try_start(&dir, 2, &["--forward-queue", "1"]).unwrap();
    let front = srv
        .client_with(ClientConfig {
            route_direct: false,
            ..ClientConfig::default()
        })
        .await;
    // Many pipelined requests on one front connection: the shard that
    // accepted it forwards about half of them through a queue of one.
    let mut tasks = Vec::new();
    for i in 0..400u128 {
        let c = front.clone();
        tasks.push(tokio::spawn(async move {
            c.write(ChunkId(i), 0, vec![1u8; 512]).await
        }));
    }
    let (mut ok, mut busy) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) if e.code() == Some(ErrorCode::Busy) => busy += 1,
            Err(e) => panic!("only BUSY is acceptable, got {e}"),
        }
    }
    eprintln!("forward queue of 1: {ok} ok, {busy} busy");
    assert!(busy > 0, "a full forward queue never answered BUSY");
    assert!(
        ok >= 200,
        "requests owned by the receiving shard must not be refused"
    );
    healthy(&srv, 8).await;
}

/// The read cache stays within its size: 48 MiB of chunks read through a
/// 32 MiB cache, in 1 MiB and 4 KiB reads, in an order that evicts pieces
/// of large reads. RSS stays within cache + the 128 MiB budget, and the
/// cache's own figure within its capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_stays_within_its_budget() {
    let dir = data_dir("cachebudget");
    let cache_mib = 32u64;
    let srv = TestServer::try_start(
        &dir,
        1,
        &[
            "--cache-mib",
            &cache_mib.to_string(),
            "--capacity-mib",
            "256",
        ],
    )
    .unwrap();
    let c = srv.client().await;
    let mib = 1usize << 20;
    let chunks = 48u64;
    let data: Vec<Vec<u8>> = (0..chunks).map(|i| pattern(i, mib)).collect();
    for (i, d) in data.iter().enumerate() {
        c.write(ChunkId(0xcac0_0000 + i as u128), 0, d.clone())
            .await
            .unwrap();
    }
    let mut x = 0x9e37_79b9u64;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut peak = 0;
    for round in 0..3 {
        for _ in 0..chunks {
            let i = next(chunks);
            let id = ChunkId(0xcac0_0000 + u128::from(i));
            let r = c.read(id, 0, mib as u32).await.unwrap();
            assert!(r.data == data[i as usize], "chunk {i}");
            // Small reads at random places: they promote single sectors
            // of large cached reads and leave the rest to be evicted.
            for _ in 0..64 {
                let off = next(256) * 4096;
                let j = next(chunks);
                let id = ChunkId(0xcac0_0000 + u128::from(j));
                let r = c.read(id, off, 4096).await.unwrap();
                assert!(
                    r.data[..] == data[j as usize][off as usize..off as usize + 4096],
                    "chunk {j} at {off}"
                );
            }
        }
        peak = peak.max(rss_bytes(srv.child.id()));
        eprintln!("round {round}: rss {} MiB", rss_bytes(srv.child.id()) >> 20);
    }
    let st = c.stats(shardstore_proto::ShardId(0)).await.unwrap();
    eprintln!(
        "cache {} of {} MiB, {} hits, {} misses, {} evictions; peak rss {} MiB",
        st.cache_bytes >> 20,
        st.cache_capacity_bytes >> 20,
        st.cache_hits,
        st.cache_misses,
        st.cache_evictions,
        peak >> 20
    );
    assert!(st.cache_bytes <= cache_mib << 20);
    assert!(st.cache_evictions > 0, "the cache never filled");
    assert!(
        peak < RSS_BUDGET_BYTES + (cache_mib << 20),
        "peak RSS {} MiB over cache {cache_mib} + budget {} MiB",
        peak >> 20,
        RSS_BUDGET_BYTES >> 20
    );
    healthy(&srv, 9).await;
}
