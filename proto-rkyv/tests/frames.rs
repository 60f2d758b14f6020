//! Golden frames and header validation. The fixtures in `tests/golden/` are
//! the wire format: if an encoding changes, these tests fail. Regenerate them
//! only for a deliberate protocol change (with a version bump) by running
//! `SHARDSTORE_BLESS=1 cargo test -p shardstore-proto --test frames`.

use shardstore_proto::*;
use std::path::PathBuf;

fn golden_frames() -> Vec<(&'static str, Vec<u8>)> {
    let mut v = Vec::new();
    let mut f = Vec::new();
    encode_frame(Opcode::Ping, 0, 1, &Empty {}, 0, &mut f);
    v.push(("ping_request", std::mem::take(&mut f)));

    let payload = b"hello, shardstore";
    encode_frame(
        Opcode::Write,
        0,
        2,
        &WriteRequest {
            chunk: 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
            offset: 4096,
            payload_crc: payload_crc(payload),
            flags: 0,
        },
        payload.len() as u32,
        &mut f,
    );
    f.extend_from_slice(payload);
    v.push(("write_request", std::mem::take(&mut f)));

    encode_frame(
        Opcode::Read,
        0,
        3,
        &ReadRequest {
            chunk: 42,
            offset: 0,
            len: 65536,
            flags: 0,
        },
        0,
        &mut f,
    );
    v.push(("read_request", std::mem::take(&mut f)));

    encode_frame(
        Opcode::Topology,
        FLAG_RESPONSE,
        4,
        &TopologyReply {
            protocol_version: PROTOCOL_VERSION,
            node_id: 0x1111_2222_3333_4444_5555_6666_7777_8888,
            shard_count: 2,
            route_fn: ROUTE_FN_JUMP_SPLITMIX,
            answering_shard: 0,
            sector_size: limits::SECTOR_SIZE,
            max_payload: limits::MAX_PAYLOAD,
            max_chunk_size: limits::MAX_CHUNK_SIZE,
            shard_addrs: vec!["127.0.0.1:7701".into(), "127.0.0.1:7702".into()],
        },
        0,
        &mut f,
    );
    v.push(("topology_reply", std::mem::take(&mut f)));

    encode_frame(
        Opcode::Read,
        FLAG_RESPONSE | FLAG_ERROR,
        5,
        &ErrorBody {
            code: ErrorCode::Corrupt as u16,
            chunk: 42,
            sector: 3,
            message: "chunk 2a sector 3: checksum mismatch".into(),
        },
        0,
        &mut f,
    );
    v.push(("corrupt_error_reply", std::mem::take(&mut f)));

    encode_frame(
        Opcode::List,
        FLAG_RESPONSE,
        6,
        &ListReply {
            entries: vec![
                ListEntry {
                    chunk: 1,
                    chunk_len: 4096,
                    version: 1,
                },
                ListEntry {
                    chunk: 7,
                    chunk_len: 10,
                    version: 3,
                },
            ],
            more: true,
        },
        0,
        &mut f,
    );
    v.push(("list_reply", std::mem::take(&mut f)));
    v
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

#[test]
fn golden_frames_are_byte_exact() {
    let bless = std::env::var_os("SHARDSTORE_BLESS").is_some();
    for (name, bytes) in golden_frames() {
        let path = golden_dir().join(format!("{name}.bin"));
        if bless {
            std::fs::write(&path, &bytes).unwrap();
            continue;
        }
        let want = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("missing fixture {}: {e}", path.display()));
        assert_eq!(bytes, want, "frame {name} no longer encodes as its fixture");
    }
}

#[test]
fn golden_frames_decode() {
    for name in [
        "write_request",
        "topology_reply",
        "corrupt_error_reply",
        "list_reply",
    ] {
        let bytes = std::fs::read(golden_dir().join(format!("{name}.bin"))).unwrap();
        let raw: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
        let (h, op) = FrameHeader::decode(&raw, limits::MAX_PAYLOAD).unwrap();
        let body = &bytes[HEADER_LEN..HEADER_LEN + h.body_len as usize];
        h.check_body(body).unwrap();
        assert_eq!(bytes.len(), HEADER_LEN + h.rest_len());
        match name {
            "write_request" => {
                assert_eq!(op, Opcode::Write);
                let w = access_body::<ArchivedWriteRequest>(body).unwrap();
                assert_eq!(w.offset.to_native(), 4096);
                let payload = &bytes[HEADER_LEN + h.body_len as usize..];
                assert_eq!(payload, b"hello, shardstore");
                assert_eq!(w.payload_crc.to_native(), payload_crc(payload));
            }
            "topology_reply" => {
                let t = access_body::<ArchivedTopologyReply>(body).unwrap();
                assert_eq!(t.shard_count.to_native(), 2);
                assert_eq!(t.shard_addrs[1].as_str(), "127.0.0.1:7702");
            }
            "corrupt_error_reply" => {
                assert!(h.is_error());
                let e = access_body::<ArchivedErrorBody>(body).unwrap();
                assert_eq!(
                    ErrorCode::from_u16(e.code.to_native()),
                    Some(ErrorCode::Corrupt)
                );
                assert_eq!(e.sector.to_native(), 3);
            }
            "list_reply" => {
                let l = access_body::<ArchivedListReply>(body).unwrap();
                assert_eq!(l.entries.len(), 2);
                assert_eq!(l.entries[1].chunk.to_native(), 7);
                assert!(l.more);
            }
            _ => unreachable!(),
        }
    }
}

fn ping_header() -> [u8; HEADER_LEN] {
    let mut f = Vec::new();
    encode_frame(Opcode::Ping, 0, 9, &Empty {}, 0, &mut f);
    f[..HEADER_LEN].try_into().unwrap()
}

/// Rewrites a header field and fixes its crc, so the field itself is judged.
fn with_field(mutate: impl FnOnce(&mut FrameHeader)) -> [u8; HEADER_LEN] {
    let mut h = FrameHeader::from_bytes(&ping_header());
    mutate(&mut h);
    let mut raw = h.to_bytes();
    let crc = crc32c::crc32c(&raw[..36]);
    raw[36..].copy_from_slice(&crc.to_le_bytes());
    raw
}

#[test]
fn header_rejections_are_typed() {
    let max = limits::MAX_PAYLOAD;
    let mut raw = ping_header();
    raw[0] ^= 1;
    assert!(matches!(
        FrameHeader::decode(&raw, max),
        Err(HeaderError::BadMagic(_))
    ));
    assert!(!FrameHeader::request_id_trusted(&raw));

    let mut raw = ping_header();
    raw[10] ^= 1;
    assert!(matches!(
        FrameHeader::decode(&raw, max),
        Err(HeaderError::BadHeaderCrc { .. })
    ));

    let raw = with_field(|h| h.version = 99);
    assert_eq!(
        FrameHeader::decode(&raw, max),
        Err(HeaderError::UnsupportedVersion(99))
    );
    assert!(FrameHeader::request_id_trusted(&raw));

    let raw = with_field(|h| h.opcode = 200);
    let err = FrameHeader::decode(&raw, max).unwrap_err();
    assert_eq!(err, HeaderError::UnknownOpcode(200));
    assert_eq!(err.code(), ErrorCode::UnknownOpcode);

    let raw = with_field(|h| h.reserved[3] = 1);
    assert_eq!(
        FrameHeader::decode(&raw, max),
        Err(HeaderError::ReservedNotZero)
    );

    let raw = with_field(|h| h.flags = 0x80);
    assert_eq!(
        FrameHeader::decode(&raw, max),
        Err(HeaderError::UnknownFlags(0x80))
    );

    let raw = with_field(|h| h.body_len = u32::MAX);
    assert_eq!(
        FrameHeader::decode(&raw, max).unwrap_err().code(),
        ErrorCode::TooLarge
    );

    let raw = with_field(|h| {
        h.opcode = Opcode::Write as u8;
        h.payload_len = u32::MAX;
    });
    assert!(matches!(
        FrameHeader::decode(&raw, max),
        Err(HeaderError::PayloadTooLarge { len: u32::MAX, .. })
    ));
    // A receiver with a lower configured limit enforces it.
    let raw = with_field(|h| {
        h.opcode = Opcode::Write as u8;
        h.payload_len = 8192;
    });
    assert!(FrameHeader::decode(&raw, 8192).is_ok());
    assert!(FrameHeader::decode(&raw, 4096).is_err());

    let raw = with_field(|h| h.payload_len = 1);
    assert_eq!(
        FrameHeader::decode(&raw, max),
        Err(HeaderError::UnexpectedPayload(Opcode::Ping))
    );
}

#[test]
fn invalid_bodies_are_rejected_not_trusted() {
    // Too short for a WriteRequest.
    assert!(access_body::<ArchivedWriteRequest>(&[1, 2, 3]).is_err());
    // A ListReply whose relative pointer points outside the body.
    let mut body = Vec::new();
    encode_body(
        &ListReply {
            entries: vec![ListEntry {
                chunk: 1,
                chunk_len: 2,
                version: 3,
            }],
            more: false,
        },
        &mut body,
    );
    let n = body.len();
    // The root's vector pointer sits at the start of the root object, which
    // is the last `size_of::<ArchivedListReply>()` bytes.
    let root = n - std::mem::size_of::<ArchivedListReply>();
    body[root..root + 4].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
    assert!(access_body::<ArchivedListReply>(&body).is_err());
    // An invalid bool.
    let mut body = Vec::new();
    encode_body(
        &ListRequest {
            shard: 0,
            after: 0,
            from_start: true,
            limit: 10,
        },
        &mut body,
    );
    let mut bad = body.clone();
    // from_start is the byte after shard (4) and after (16).
    bad[20] = 7;
    assert!(access_body::<ArchivedListRequest>(&bad).is_err());
    assert!(access_body::<ArchivedListRequest>(&body).is_ok());
}
