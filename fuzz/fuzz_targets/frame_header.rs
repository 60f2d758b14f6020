//! Frame header parsing: any 40 bytes decode to a header within the limits
//! or to a typed error, and a header that decodes re-encodes byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardstore_proto::{limits, FrameHeader, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let Some(raw) = data.get(..HEADER_LEN) else {
        return;
    };
    let raw: [u8; HEADER_LEN] = raw.try_into().unwrap();
    let max = data.get(HEADER_LEN).map_or(limits::MAX_PAYLOAD, |b| (*b as u32) << 16);
    match FrameHeader::decode(&raw, max) {
        Ok((h, op)) => {
            assert!(h.body_len <= limits::MAX_BODY);
            assert!(h.payload_len <= max.min(limits::MAX_PAYLOAD));
            assert_eq!(h.opcode, op as u8);
            assert_eq!(h.to_bytes(), raw);
            assert!(FrameHeader::request_id_trusted(&raw));
        }
        Err(e) => {
            let _ = e.code();
            let _ = e.to_string();
        }
    }
});
