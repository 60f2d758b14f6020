//! Malformed frames against a live server: each gets a typed error where the
//! request id is known (else the connection closes), nothing is written, and
//! normal requests keep working.

mod common;
use common::*;
use shardstore_proto::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads one reply; `None` if the server closed the connection first.
async fn reply(s: &mut TcpStream) -> Option<(FrameHeader, Vec<u8>)> {
    let mut h = [0u8; HEADER_LEN];
    match tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut h)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return None,
        Err(_) => panic!("server neither answered nor closed"),
    }
    let (h, _) = FrameHeader::decode(&h, limits::MAX_PAYLOAD).expect("valid reply header");
    let mut rest = vec![0u8; h.rest_len()];
    s.read_exact(&mut rest).await.unwrap();
    Some((h, rest))
}

fn error_code(h: &FrameHeader, rest: &[u8]) -> ErrorCode {
    assert!(h.is_error(), "expected an error reply");
    let e = access_body::<ArchivedErrorBody>(&rest[..h.body_len as usize]).unwrap();
    ErrorCode::from_u16(e.code.to_native()).unwrap()
}

async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn ping(id: u64) -> Vec<u8> {
    let mut f = Vec::new();
    encode_frame(Opcode::Ping, 0, id, &Empty {}, 0, &mut f);
    f
}

/// Re-crcs a header after a field was changed, so the field itself is judged.
fn fix_header_crc(f: &mut [u8]) {
    let crc = crc32c::crc32c(&f[..36]);
    f[36..40].copy_from_slice(&crc.to_le_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_typed_errors_and_hurt_nobody() {
    let dir = data_dir("malformed");
    let mut srv = TestServer::start(&dir, 2);
    let addr = srv.addr.clone();
    let client = srv.client().await;
    // A bystander connection that must stay healthy throughout.
    let bystander = srv.client().await;
    bystander
        .write(ChunkId(1), 0, vec![1u8; 4096])
        .await
        .unwrap();

    // 1. Bad magic: request id untrusted, the connection closes.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let mut f = ping(1);
    f[0] ^= 0xff;
    s.write_all(&f).await.unwrap();
    assert!(
        reply(&mut s).await.is_none(),
        "bad magic must close without a reply"
    );

    // 2. Bad header crc: closes.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let mut f = ping(2);
    f[9] ^= 0x01;
    s.write_all(&f).await.unwrap();
    assert!(reply(&mut s).await.is_none());

    // 3. Unknown opcode with a valid crc: typed UNKNOWN_OPCODE, then close.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let mut f = ping(3);
    f[6] = 0xee;
    fix_header_crc(&mut f);
    s.write_all(&f).await.unwrap();
    let (h, rest) = reply(&mut s).await.expect("typed error");
    assert_eq!(h.request_id, 3);
    assert_eq!(error_code(&h, &rest), ErrorCode::UnknownOpcode);
    assert!(closed(&mut s).await);

    // 4. 4 GiB length prefix: TOO_LARGE before anything is allocated, then close.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let mut f = write_frame(4, 9, b"x", 0);
    f[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
    fix_header_crc(&mut f);
    s.write_all(&f[..HEADER_LEN]).await.unwrap();
    let (h, rest) = reply(&mut s).await.expect("typed error");
    assert_eq!(error_code(&h, &rest), ErrorCode::TooLarge);
    assert!(closed(&mut s).await);

    // 5. Unsupported version: typed error.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let mut f = ping(5);
    f[4] = 77;
    fix_header_crc(&mut f);
    s.write_all(&f).await.unwrap();
    let (h, rest) = reply(&mut s).await.expect("typed error");
    assert_eq!(error_code(&h, &rest), ErrorCode::UnsupportedVersion);

    // 6. Body crc mismatch: MALFORMED, the payload is skipped and the same
    //    connection keeps working; nothing was written.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let data = vec![5u8; 3000];
    let mut f = write_frame(6, 0x66, &data, payload_crc(&data));
    f[HEADER_LEN + 2] ^= 0x40; // inside the body
    f.extend_from_slice(&ping(7));
    s.write_all(&f).await.unwrap();
    let (h, rest) = reply(&mut s).await.unwrap();
    assert_eq!(
        (h.request_id, error_code(&h, &rest)),
        (6, ErrorCode::Malformed)
    );
    let (h, _) = reply(&mut s).await.unwrap();
    assert_eq!((h.request_id, h.is_error()), (7, false));

    // 7. Valid crcs but an invalid rkyv body (too short for a WriteRequest).
    let mut body_short = Vec::new();
    encode_frame(
        Opcode::Read,
        0,
        8,
        &ChunkRequest { chunk: 1 },
        0,
        &mut body_short,
    );
    s.write_all(&body_short).await.unwrap();
    let (h, rest) = reply(&mut s).await.unwrap();
    assert_eq!(
        (h.request_id, error_code(&h, &rest)),
        (8, ErrorCode::Malformed)
    );

    // 8. Payload crc mismatch: BAD_CHECKSUM, nothing written.
    s.write_all(&write_frame(9, 0x66, &data, payload_crc(&data) ^ 1))
        .await
        .unwrap();
    let (h, rest) = reply(&mut s).await.unwrap();
    assert_eq!(
        (h.request_id, error_code(&h, &rest)),
        (9, ErrorCode::BadChecksum)
    );
    assert!(matches!(
        client.stat(ChunkId(0x66)).await,
        Err(shardstore_client::ClientError::NotFound(_))
    ));

    // 9. Truncated frame then close: no reply, nothing written, no crash.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let f = write_frame(10, 0x77, &data, payload_crc(&data));
    s.write_all(&f[..f.len() - 100]).await.unwrap();
    s.shutdown().await.unwrap();
    assert!(reply(&mut s).await.is_none());

    // 10. Garbage bytes.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&pattern(11, 10_000)).await.unwrap();
    assert!(closed(&mut s).await);

    // 11. A reply frame sent to the server.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let mut f = Vec::new();
    encode_frame(Opcode::Ping, FLAG_RESPONSE, 12, &Empty {}, 0, &mut f);
    s.write_all(&f).await.unwrap();
    let (h, rest) = reply(&mut s).await.unwrap();
    assert_eq!(error_code(&h, &rest), ErrorCode::Malformed);

    // Nothing was half-written, and everyone else is still served.
    assert!(matches!(
        client.stat(ChunkId(0x77)).await,
        Err(shardstore_client::ClientError::NotFound(_))
    ));
    assert_eq!(
        bystander
            .read(ChunkId(1), 0, 4096)
            .await
            .unwrap()
            .data
            .len(),
        4096
    );
    client.write(ChunkId(2), 0, vec![2u8; 100]).await.unwrap();
    assert!(srv.child_alive());
    let mut malformed = 0;
    for sh in 0..2 {
        malformed += client.stats(ShardId(sh)).await.unwrap().malformed_frames;
    }
    assert!(malformed >= 7, "malformed frames counted: {malformed}");
    // Every error answered a request that was counted.
    for sh in 0..2 {
        let st = client.stats(ShardId(sh)).await.unwrap();
        for (op, (r, e)) in st.requests.iter().zip(&st.errors).enumerate() {
            assert!(e <= r, "shard {sh} opcode {op}: {e} errors of {r} requests");
        }
    }
    // Bounded latency for a normal request, and memory within the budget.
    let t = std::time::Instant::now();
    client.ping().await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(1));
    let status = std::fs::read_to_string(format!("/proc/{}/status", srv.child.id())).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        rss_kib < 128 << 10,
        "server RSS {rss_kib} KiB over the 128 MiB budget"
    );
}

/// READ and WRITE flags this server does not know are refused (MALFORMED),
/// not ignored: nothing is written, and the connection keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_request_flags_are_refused() {
    let dir = data_dir("flags");
    let srv = TestServer::start(&dir, 1);
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    let data = vec![9u8; 4096];
    let mut f = write_frame_flags(1, 0x77, &data, payload_crc(&data), 2);
    let r = ReadRequest {
        chunk: 0x77,
        offset: 0,
        len: 4096,
        flags: READ_FLAG_NEXT_CHUNK | 0x8000_0000,
    };
    encode_frame(Opcode::Read, 0, 2, &r, 0, &mut f);
    f.extend_from_slice(&ping(3));
    s.write_all(&f).await.unwrap();
    let (h, rest) = reply(&mut s).await.unwrap();
    assert_eq!(
        (h.request_id, error_code(&h, &rest)),
        (1, ErrorCode::Malformed)
    );
    let (h, rest) = reply(&mut s).await.unwrap();
    assert_eq!(
        (h.request_id, error_code(&h, &rest)),
        (2, ErrorCode::Malformed)
    );
    let (h, _) = reply(&mut s).await.unwrap();
    assert_eq!((h.request_id, h.is_error()), (3, false));
    let client = srv.client().await;
    assert!(matches!(
        client.stat(ChunkId(0x77)).await,
        Err(shardstore_client::ClientError::NotFound(_))
    ));
    // The known READ flag is accepted.
    client.write(ChunkId(0x77), 0, data.clone()).await.unwrap();
    let opts = shardstore_client::ReadOptions {
        continues_into_next_chunk: true,
    };
    let got = client
        .read_with(ChunkId(0x77), 0, 4096, opts)
        .await
        .unwrap();
    assert_eq!(&got.data[..], &data[..]);
}
