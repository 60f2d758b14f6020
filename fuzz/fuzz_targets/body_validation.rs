//! rkyv body validation: checked access on arbitrary bytes never panics,
//! for every message type, and what validates can be read whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardstore_proto::*;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = access_body::<ArchivedTopologyReply>(data) {
        for a in t.shard_addrs.iter() {
            let _ = a.as_str().len();
        }
    }
    if let Ok(l) = access_body::<ArchivedListReply>(data) {
        for e in l.entries.iter() {
            let _ = e.chunk.to_native();
        }
    }
    if let Ok(e) = access_body::<ArchivedErrorBody>(data) {
        let _ = e.message.as_str().len();
    }
    if let Ok(s) = access_body::<ArchivedStatsReply>(data) {
        let _: u64 = s.requests.iter().map(|x| x.to_native()).sum();
    }
    let _ = access_body::<ArchivedWriteRequest>(data).map(|w| w.offset.to_native());
    let _ = access_body::<ArchivedReadRequest>(data).map(|r| r.len.to_native());
    let _ = access_body::<ArchivedListRequest>(data).map(|l| l.from_start);
    let _ = access_body::<ArchivedChunkRequest>(data).map(|c| c.chunk.to_native());
    let _ = access_body::<ArchivedAuthRequest>(data).map(|a| a.proof[0]);
    let _ = access_body::<ArchivedHelloReply>(data).map(|h| h.auth_required);
});
