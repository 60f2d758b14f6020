//! Frames over an [`Endpoint`]: which payloads go inline, which by RDMA read
//! or write, and which registered regions must stay alive until when.

use super::wire::{decode_control, encode_control, Descriptor, DescriptorError, DescriptorKind};
use super::INLINE_MAX;
use super::{Endpoint, MemoryRegionPool, PoolConfig, PoolError, PooledRegion, RemoteRegion};
use crate::{FrameError, RawFrameHead};
use shardstore_proto::{access_body, limits, ArchivedReadRequest, FrameHeader, Opcode, HEADER_LEN};
use std::io;

/// Why receiving or sending over RDMA failed.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    #[error("rdma i/o: {0}")]
    Io(#[from] io::Error),
    /// The peer is gone.
    #[error("connection closed")]
    Closed,
    /// The frame inside the message is bad (header or body), as over TCP.
    #[error("{0}")]
    Frame(FrameError),
    /// The body failed its crc or validation; the header (and so the
    /// request id) is sound, so the peer can be answered.
    #[error("bad frame body: {err}")]
    Body {
        request_id: u64,
        opcode: u8,
        err: shardstore_proto::ProtoError,
    },
    #[error("bad control message: {0}")]
    Descriptor(#[from] DescriptorError),
    /// The descriptor does not fit a sound frame header (an inline payload
    /// too large, a region of the wrong size): the request can be answered.
    #[error("bad control message: {err}")]
    Request {
        request_id: u64,
        opcode: u8,
        err: DescriptorError,
    },
    #[error("registered memory: {0}")]
    Pool(#[from] PoolError),
    /// A reply payload too large to inline, and the request offered no sink
    /// (or one too small) to write it into.
    #[error("reply payload of {len} bytes does not fit the request's sink ({sink} bytes)")]
    NoSink { len: usize, sink: u32 },
    /// A WRITTEN reply that names another region than the request's sink.
    #[error("reply names a region the request did not offer")]
    ForeignRegion,
}

impl RdmaError {
    /// The request id of the offending frame, when its header could be trusted.
    pub fn request_id(&self) -> Option<(u64, u8)> {
        match self {
            RdmaError::Frame(FrameError::Header {
                request_id: Some(id),
                opcode,
                ..
            }) => Some((*id, *opcode)),
            RdmaError::Body {
                request_id, opcode, ..
            }
            | RdmaError::Request {
                request_id, opcode, ..
            } => Some((*request_id, *opcode)),
            _ => None,
        }
    }
}

/// Where the payload of a received frame is.
#[derive(Debug)]
pub enum PayloadRef {
    /// No payload, or these bytes came inline.
    Inline(Vec<u8>),
    /// In the peer's region: fetch with [`RdmaConn::fetch_payload`].
    Source(RemoteRegion),
    /// Written into our sink (a reply): see [`RdmaConn::written_payload`].
    Written(RemoteRegion),
}

/// A received frame: header validated, body crc checked.
#[derive(Debug)]
pub struct Incoming {
    pub head: RawFrameHead,
    pub body: Vec<u8>,
    pub payload: PayloadRef,
    /// The region a request offers for its reply's payload.
    pub sink: Option<RemoteRegion>,
}

/// Regions a sent request must keep registered until its reply arrives: the
/// peer may still read the source or write the sink.
pub struct Held<R> {
    pub source: Option<PooledRegion<R>>,
    pub sink: Option<PooledRegion<R>>,
}

/// A connected queue pair with its region pool and receive limits.
pub struct RdmaConn<E: Endpoint> {
    ep: E,
    pool: MemoryRegionPool<E::Region>,
    max_payload: u32,
}

impl<E: Endpoint> RdmaConn<E> {
    pub fn new(ep: E, pool: PoolConfig, max_payload: u32) -> Self {
        RdmaConn {
            ep,
            pool: MemoryRegionPool::new(pool),
            max_payload: max_payload.min(limits::MAX_PAYLOAD),
        }
    }

    pub fn endpoint(&self) -> &E {
        &self.ep
    }

    pub fn pool(&self) -> &MemoryRegionPool<E::Region> {
        &self.pool
    }

    fn acquire(&self, len: usize) -> Result<PooledRegion<E::Region>, PoolError> {
        self.pool.acquire(len, |n| self.ep.register(n))
    }

    /// Receives the next frame. The header is validated against
    /// `max_payload` and the body crc checked before anything else; a
    /// `Source` payload is not fetched yet.
    pub async fn recv(&self) -> Result<Incoming, RdmaError> {
        let msg = match self.ep.recv().await {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(RdmaError::Closed),
            Err(e) => return Err(e.into()),
        };
        let (desc, raw, rest) = decode_control(&msg, self.max_payload)?;
        let header = FrameHeader::from_bytes(&raw);
        let opcode = Opcode::from_u8(header.opcode).expect("validated by decode_control");
        let (body, inline) = rest.split_at(header.body_len as usize);
        header.check_body(body).map_err(|err| RdmaError::Body {
            request_id: header.request_id,
            opcode: header.opcode,
            err,
        })?;
        let (payload, sink) = match desc.kind {
            DescriptorKind::Inline => (PayloadRef::Inline(inline.to_vec()), None),
            DescriptorKind::Source => (PayloadRef::Source(desc.region), None),
            DescriptorKind::Sink => (PayloadRef::Inline(Vec::new()), Some(desc.region)),
            DescriptorKind::Written => (PayloadRef::Written(desc.region), None),
        };
        Ok(Incoming {
            head: RawFrameHead { header, opcode },
            body: body.to_vec(),
            payload,
            sink,
        })
    }

    /// The payload of a received request: inline bytes, or pulled by RDMA
    /// read into a pooled region (released as soon as it is copied out).
    pub async fn fetch_payload(&self, inc: &mut Incoming) -> Result<Vec<u8>, RdmaError> {
        match std::mem::replace(&mut inc.payload, PayloadRef::Inline(Vec::new())) {
            PayloadRef::Inline(v) => Ok(v),
            PayloadRef::Source(src) => {
                // src.len == payload_len <= max_payload (checked in decode_control).
                let mut region = self.acquire(src.len as usize)?;
                self.ep.read(region.get_mut(), src).await?;
                Ok(region.copy_out(src.len as usize))
            }
            PayloadRef::Written(_) => Err(DescriptorError::Disagrees {
                kind: DescriptorKind::Written,
                len: 0,
                payload_len: inc.head.header.payload_len,
            }
            .into()),
        }
    }

    /// Sends a request: `frame` is its header and body exactly as over TCP,
    /// `payload` its bulk bytes. Large payloads go by a `Source` region; a
    /// READ for more than [`INLINE_MAX`] bytes offers a `Sink` for its reply.
    /// Keep the returned [`Held`] until the reply arrives.
    pub async fn send_request(
        &self,
        frame: &[u8],
        payload: &[u8],
    ) -> Result<Held<E::Region>, RdmaError> {
        let (msg, held) = self.prepare_request(frame, payload)?;
        self.ep.send(&msg).await?;
        Ok(held)
    }

    /// [`RdmaConn::send_request`] in two steps, for callers that must record
    /// the [`Held`] regions before the reply can possibly arrive: the control
    /// message to pass to [`RdmaConn::send_message`], and what to hold.
    pub fn prepare_request(
        &self,
        frame: &[u8],
        payload: &[u8],
    ) -> Result<(Vec<u8>, Held<E::Region>), RdmaError> {
        let mut held = Held {
            source: None,
            sink: None,
        };
        let mut msg = Vec::with_capacity(frame.len() + payload.len().min(INLINE_MAX) + 64);
        if payload.len() > INLINE_MAX {
            let mut src = self.acquire(payload.len())?;
            src.copy_in(payload);
            let desc = Descriptor {
                kind: DescriptorKind::Source,
                region: src.remote(),
            };
            encode_control(&desc, frame, &[], &mut msg);
            held.source = Some(src);
        } else if let Some(len) = read_len(frame).filter(|&n| n as usize > INLINE_MAX) {
            let sink = self.acquire(len as usize)?;
            let desc = Descriptor {
                kind: DescriptorKind::Sink,
                region: sink.remote(),
            };
            encode_control(&desc, frame, payload, &mut msg);
            held.sink = Some(sink);
        } else {
            encode_control(&Descriptor::INLINE, frame, payload, &mut msg);
        }
        Ok((msg, held))
    }

    /// Sends a control message made by [`RdmaConn::prepare_request`].
    pub async fn send_message(&self, msg: &[u8]) -> Result<(), RdmaError> {
        self.ep.send(msg).await.map_err(RdmaError::Io)
    }

    /// Sends a reply (`frame`: header and body; `payload`: its bulk bytes).
    /// Small payloads go inline; larger ones are RDMA-written into `sink`
    /// (the request's), then the reply is sent. Fails with
    /// [`RdmaError::NoSink`] when a large payload has nowhere to go: answer
    /// with an error frame instead.
    pub async fn send_reply(
        &self,
        frame: &[u8],
        payload: &[u8],
        sink: Option<RemoteRegion>,
    ) -> Result<(), RdmaError> {
        let mut msg = Vec::with_capacity(frame.len() + payload.len().min(INLINE_MAX) + 64);
        if payload.len() <= INLINE_MAX {
            encode_control(&Descriptor::INLINE, frame, payload, &mut msg);
        } else {
            let sink = match sink {
                Some(s) if s.len as usize >= payload.len() => s,
                other => {
                    return Err(RdmaError::NoSink {
                        len: payload.len(),
                        sink: other.map_or(0, |s| s.len),
                    })
                }
            };
            let mut src = self.acquire(payload.len())?;
            src.copy_in(payload);
            let target = RemoteRegion {
                len: payload.len() as u32,
                ..sink
            };
            // Completes before the reply is sent; the region is then free.
            self.ep.write(src.get(), target).await?;
            drop(src);
            let desc = Descriptor {
                kind: DescriptorKind::Written,
                region: target,
            };
            encode_control(&desc, frame, &[], &mut msg);
        }
        self.ep.send(&msg).await?;
        Ok(())
    }

    /// The payload of a received reply, given what its request held.
    pub fn written_payload(
        held: &Held<E::Region>,
        inc: &mut Incoming,
    ) -> Result<Vec<u8>, RdmaError> {
        match std::mem::replace(&mut inc.payload, PayloadRef::Inline(Vec::new())) {
            PayloadRef::Inline(v) => Ok(v),
            PayloadRef::Written(w) => {
                let sink = held.sink.as_ref().ok_or(RdmaError::ForeignRegion)?;
                let mine = sink.remote();
                if w.rkey != mine.rkey || w.addr != mine.addr || w.len > mine.len {
                    return Err(RdmaError::ForeignRegion);
                }
                Ok(sink.copy_out(w.len as usize))
            }
            PayloadRef::Source(_) => Err(RdmaError::ForeignRegion),
        }
    }
}

/// The length a READ request asks for, from its encoded frame.
fn read_len(frame: &[u8]) -> Option<u32> {
    if frame.len() < HEADER_LEN || frame[6] != Opcode::Read as u8 {
        return None;
    }
    access_body::<ArchivedReadRequest>(&frame[HEADER_LEN..])
        .ok()
        .map(|r| r.len.to_native())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rdma::loopback::{self, LoopbackEndpoint};
    use futures_lite::future::block_on;
    use shardstore_proto::*;
    use std::sync::atomic::Ordering;

    fn conns() -> (RdmaConn<LoopbackEndpoint>, RdmaConn<LoopbackEndpoint>) {
        let (a, b) = loopback::pair();
        (
            RdmaConn::new(a, PoolConfig::default(), limits::MAX_PAYLOAD),
            RdmaConn::new(b, PoolConfig::default(), limits::MAX_PAYLOAD),
        )
    }

    fn write_frame(id: u64, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        encode_frame(
            Opcode::Write,
            0,
            id,
            &WriteRequest {
                chunk: 9,
                offset: 0,
                payload_crc: payload_crc(payload),
                flags: 0,
            },
            payload.len() as u32,
            &mut f,
        );
        f
    }

    #[test]
    fn small_payload_goes_inline_large_by_rdma_read() {
        let (c, s) = conns();
        block_on(async {
            for (id, len) in [
                (1u64, 100usize),
                (2, INLINE_MAX),
                (3, INLINE_MAX + 1),
                (4, 1 << 20),
            ] {
                let payload: Vec<u8> = (0..len).map(|i| (i * 7 + id as usize) as u8).collect();
                let held = c
                    .send_request(&write_frame(id, &payload), &payload)
                    .await
                    .unwrap();
                assert_eq!(held.source.is_some(), len > INLINE_MAX);
                let mut inc = s.recv().await.unwrap();
                assert_eq!(inc.head.opcode, Opcode::Write);
                assert_eq!(inc.head.header.request_id, id);
                let crc = access_body::<ArchivedWriteRequest>(&inc.body)
                    .unwrap()
                    .payload_crc
                    .to_native();
                let got = s.fetch_payload(&mut inc).await.unwrap();
                assert_eq!(got, payload);
                assert_eq!(crc, payload_crc(&got));
            }
        });
        let f = c.endpoint().fabric();
        assert_eq!(f.reads.load(Ordering::Relaxed), 2);
        assert_eq!(
            f.bytes_read.load(Ordering::Relaxed),
            (INLINE_MAX + 1 + (1 << 20)) as u64
        );
        // The server's read regions went back to its pool.
        assert_eq!(s.pool().stats().in_use_bytes, 0);
    }

    #[test]
    fn read_reply_is_written_into_the_requests_sink() {
        let (c, s) = conns();
        block_on(async {
            let mut f = Vec::new();
            let len = 256 << 10;
            encode_frame(
                Opcode::Read,
                0,
                5,
                &ReadRequest {
                    chunk: 9,
                    offset: 0,
                    len,
                    flags: 0,
                },
                0,
                &mut f,
            );
            let held = c.send_request(&f, &[]).await.unwrap();
            assert!(held.sink.is_some());
            let inc = s.recv().await.unwrap();
            let sink = inc.sink.expect("sink offered");
            assert_eq!(sink.len, len);
            // The reply is shorter than asked (end of chunk).
            let data = vec![0x5a; 100_000];
            let mut reply = Vec::new();
            encode_frame(
                Opcode::Read,
                FLAG_RESPONSE,
                5,
                &ReadReply {
                    version: 1,
                    chunk_len: 100_000,
                    payload_crc: payload_crc(&data),
                },
                data.len() as u32,
                &mut reply,
            );
            s.send_reply(&reply, &data, inc.sink).await.unwrap();
            let mut r = c.recv().await.unwrap();
            assert!(r.head.header.is_response());
            assert_eq!(r.head.header.payload_len, 100_000);
            let got = RdmaConn::<LoopbackEndpoint>::written_payload(&held, &mut r).unwrap();
            assert_eq!(got, data);
            // A large payload without a sink is refused, not sent.
            assert!(matches!(
                s.send_reply(&reply, &data, None).await,
                Err(RdmaError::NoSink { .. })
            ));
        });
        assert_eq!(c.endpoint().fabric().writes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn oversized_payload_is_refused_before_any_rdma_read() {
        let (a, b) = loopback::pair();
        let c = RdmaConn::new(a, PoolConfig::default(), limits::MAX_PAYLOAD);
        // The receiver accepts at most 64 KiB.
        let s = RdmaConn::new(b, PoolConfig::default(), 64 << 10);
        block_on(async {
            let payload = vec![1u8; 128 << 10];
            c.send_request(&write_frame(8, &payload), &payload)
                .await
                .unwrap();
            let e = s.recv().await.unwrap_err();
            assert_eq!(e.request_id(), Some((8, Opcode::Write as u8)));
        });
        assert_eq!(s.endpoint().fabric().reads.load(Ordering::Relaxed), 0);
        assert_eq!(s.pool().stats().registrations, 0);
    }

    #[test]
    fn bad_messages_are_refused_and_the_next_one_is_read() {
        let (a, b) = loopback::pair();
        let s = RdmaConn::new(b, PoolConfig::default(), limits::MAX_PAYLOAD);
        block_on(async {
            let mut ping = Vec::new();
            encode_frame(Opcode::Ping, 0, 1, &Empty {}, 0, &mut ping);
            let mut good = Vec::new();
            encode_control(&Descriptor::INLINE, &ping, &[], &mut good);
            // Garbage, a flipped descriptor bit, a flipped body bit, a source
            // region that was never registered.
            a.send(&[0xab; 200]).await.unwrap();
            let mut m = good.clone();
            m[9] ^= 1;
            a.send(&m).await.unwrap();
            let mut stat = Vec::new();
            encode_frame(Opcode::Stat, 0, 2, &ChunkRequest { chunk: 1 }, 0, &mut stat);
            let last = stat.len() - 1;
            stat[last] ^= 0xff;
            let mut m = Vec::new();
            encode_control(&Descriptor::INLINE, &stat, &[], &mut m);
            a.send(&m).await.unwrap();
            let payload = vec![3u8; 10_000];
            let mut m = Vec::new();
            let bogus = Descriptor {
                kind: DescriptorKind::Source,
                region: RemoteRegion {
                    addr: 0x1000,
                    len: 10_000,
                    rkey: 999,
                },
            };
            encode_control(&bogus, &write_frame(3, &payload), &[], &mut m);
            a.send(&m).await.unwrap();
            a.send(&good).await.unwrap();

            assert!(matches!(s.recv().await, Err(RdmaError::Descriptor(_))));
            assert!(matches!(s.recv().await, Err(RdmaError::Descriptor(_))));
            let e = s.recv().await.unwrap_err();
            assert!(matches!(e, RdmaError::Body { .. }), "{e}");
            assert_eq!(e.request_id(), Some((2, Opcode::Stat as u8)));
            let mut w = s.recv().await.unwrap();
            let e = s.fetch_payload(&mut w).await.unwrap_err();
            assert!(
                matches!(e, RdmaError::Io(ref io) if io.kind() == io::ErrorKind::PermissionDenied),
                "{e}"
            );
            let p = s.recv().await.unwrap();
            assert_eq!(p.head.opcode, Opcode::Ping);
            drop(a);
            assert!(matches!(s.recv().await, Err(RdmaError::Closed)));
        });
    }

    #[test]
    fn a_forged_written_descriptor_is_refused() {
        let (c, s) = conns();
        block_on(async {
            let mut f = Vec::new();
            encode_frame(Opcode::Ping, 0, 1, &Empty {}, 0, &mut f);
            let held = c.send_request(&f, &[]).await.unwrap();
            let _ = s.recv().await.unwrap();
            let mut reply = Vec::new();
            encode_frame(
                Opcode::Read,
                FLAG_RESPONSE,
                1,
                &ReadReply {
                    version: 1,
                    chunk_len: 8,
                    payload_crc: 0,
                },
                8,
                &mut reply,
            );
            let desc = Descriptor {
                kind: DescriptorKind::Written,
                region: RemoteRegion {
                    addr: 1 << 32,
                    len: 8,
                    rkey: 1,
                },
            };
            let mut m = Vec::new();
            encode_control(&desc, &reply, &[], &mut m);
            s.endpoint().send(&m).await.unwrap();
            let mut r = c.recv().await.unwrap();
            assert!(matches!(
                RdmaConn::<LoopbackEndpoint>::written_payload(&held, &mut r),
                Err(RdmaError::ForeignRegion)
            ));
        });
    }
}
