//! The frame decoder over a byte stream, as the server's connection loop
//! drives it: header, body (crc), then payload; every outcome is a frame or
//! a typed error, never a panic or an allocation past the limits.
#![no_main]

use futures_lite::future::block_on;
use futures_util::io::Cursor;
use libfuzzer_sys::fuzz_target;
use shardstore_net::{FrameError, FrameReader};
use shardstore_proto::{limits, Opcode};

fuzz_target!(|data: &[u8]| {
    block_on(async {
        let mut r = FrameReader::new(Cursor::new(data.to_vec()), 1 << 20);
        for _ in 0..64 {
            let head = match r.read_head().await {
                Ok(Some(h)) => h,
                Ok(None) | Err(_) => return,
            };
            assert!(head.header.body_len <= limits::MAX_BODY);
            match r.read_body(&head).await {
                Ok(_) => {}
                Err(FrameError::Body(_)) => {}
                Err(_) => return,
            }
            let mut payload = vec![0u8; head.header.payload_len as usize];
            if r.read_payload(&mut payload).await.is_err() {
                return;
            }
            if head.opcode == Opcode::Write && !head.header.is_response() {
                let _ = shardstore_proto::payload_crc(&payload);
            }
        }
    });
});
