use futures_io::AsyncRead;
use futures_util::AsyncReadExt;
use shardstore_proto::{limits, FrameHeader, HeaderError, Opcode, ProtoError, HEADER_LEN};
use std::io;

/// Default size of a connection's receive buffer: large enough that one read
/// takes many small frames, small enough that thousands of connections stay
/// within the server's memory budget (bulk payloads bypass it).
pub const DEFAULT_READ_BUFFER: usize = 24 << 10;

/// Why reading a frame failed. After any variant but [`FrameError::Body`] the
/// stream is out of step and the connection must be closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed mid-frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    /// The header was rejected. `request_id` is set when the header's crc held,
    /// so the peer can be answered with a typed error before closing.
    #[error("bad frame header: {err}")]
    Header {
        err: HeaderError,
        request_id: Option<u64>,
        opcode: u8,
    },
    /// The peer did not send (the rest of) a frame in time.
    #[error("timed out waiting for the peer")]
    TimedOut,
    /// The frame was read whole but its body is bad (crc or rkyv validation).
    /// The stream is still in step: answer with an error and carry on.
    #[error("bad frame body: {0}")]
    Body(ProtoError),
}

/// A validated header, its opcode and the raw header bytes.
#[derive(Debug, Clone, Copy)]
pub struct RawFrameHead {
    pub header: FrameHeader,
    pub opcode: Opcode,
}

/// A whole frame with owned body and payload (client side, small frames).
#[derive(Debug)]
pub struct Frame {
    pub header: FrameHeader,
    pub opcode: Opcode,
    pub body: Vec<u8>,
    pub payload: Vec<u8>,
}

/// Buffered frame decoder. Bytes between `start` and `end` of `buf` are
/// received but not yet consumed.
pub struct FrameReader<R> {
    inner: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    max_payload: u32,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max_payload: u32) -> Self {
        Self::with_capacity(inner, max_payload, DEFAULT_READ_BUFFER)
    }

    pub fn with_capacity(inner: R, max_payload: u32, capacity: usize) -> Self {
        assert!(capacity >= HEADER_LEN + limits::MAX_BODY as usize);
        FrameReader {
            inner,
            buf: vec![0u8; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
            max_payload: max_payload.min(limits::MAX_PAYLOAD),
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Bytes received and not yet consumed. When zero after a frame, the peer
    /// has nothing more queued right now: a good moment to flush replies.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Reads until at least `n` unconsumed bytes are buffered.
    /// Returns false on a clean EOF with nothing buffered.
    async fn fill(&mut self, n: usize) -> Result<bool, FrameError> {
        debug_assert!(n <= self.buf.len());
        if self.buffered() >= n {
            return Ok(true);
        }
        if self.start + n > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.buffered() < n {
            let got = self.inner.read(&mut self.buf[self.end..]).await?;
            if got == 0 {
                if self.buffered() == 0 {
                    return Ok(false);
                }
                return Err(FrameError::Truncated {
                    got: self.buffered(),
                    want: n,
                });
            }
            self.end += got;
        }
        Ok(true)
    }

    /// Waits until at least one byte is buffered. `Ok(false)` on a clean EOF
    /// with nothing buffered. Cancel-safe: bytes read stay buffered.
    pub async fn wait_for_data(&mut self) -> Result<bool, FrameError> {
        self.fill(1).await
    }

    /// Reads and validates the next frame header. `Ok(None)` on a clean EOF
    /// between frames. The body and payload are not consumed yet.
    pub async fn read_head(&mut self) -> Result<Option<RawFrameHead>, FrameError> {
        if !self.fill(HEADER_LEN).await? {
            return Ok(None);
        }
        let raw: [u8; HEADER_LEN] = self.buf[self.start..self.start + HEADER_LEN]
            .try_into()
            .expect("HEADER_LEN bytes");
        match FrameHeader::decode(&raw, self.max_payload) {
            Ok((header, opcode)) => {
                self.start += HEADER_LEN;
                Ok(Some(RawFrameHead { header, opcode }))
            }
            Err(err) => {
                let request_id = FrameHeader::request_id_trusted(&raw)
                    .then(|| FrameHeader::from_bytes(&raw).request_id);
                Err(FrameError::Header {
                    err,
                    request_id,
                    opcode: raw[6],
                })
            }
        }
    }

    /// Reads the body of the frame whose head was just read and checks its
    /// crc. The returned slice is valid until the next call.
    pub async fn read_body(&mut self, head: &RawFrameHead) -> Result<&[u8], FrameError> {
        let n = head.header.body_len as usize;
        if !self.fill(n).await? && n > 0 {
            return Err(FrameError::Truncated { got: 0, want: n });
        }
        let body = &self.buf[self.start..self.start + n];
        self.start += n;
        head.header.check_body(body).map_err(FrameError::Body)?;
        Ok(body)
    }

    /// Reads exactly `dst.len()` bytes of payload: first what is buffered, then
    /// straight from the stream into `dst` (no intermediate copy for the bulk
    /// of a large payload).
    pub async fn read_payload(&mut self, dst: &mut [u8]) -> Result<(), FrameError> {
        let from_buf = self.buffered().min(dst.len());
        dst[..from_buf].copy_from_slice(&self.buf[self.start..self.start + from_buf]);
        self.start += from_buf;
        let mut done = from_buf;
        while done < dst.len() {
            let got = self.inner.read(&mut dst[done..]).await?;
            if got == 0 {
                return Err(FrameError::Truncated {
                    got: done,
                    want: dst.len(),
                });
            }
            done += got;
        }
        Ok(())
    }

    /// Discards `n` bytes of payload (a frame that is being refused).
    pub async fn skip_payload(&mut self, mut n: usize) -> Result<(), FrameError> {
        while n > 0 {
            if !self.fill(1).await? {
                return Err(FrameError::Truncated { got: 0, want: n });
            }
            let take = self.buffered().min(n);
            self.start += take;
            n -= take;
        }
        Ok(())
    }

    /// Reads one whole frame into owned buffers. `Ok(None)` on clean EOF.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let Some(head) = self.read_head().await? else {
            return Ok(None);
        };
        let body = match self.read_body(&head).await {
            Ok(b) => b.to_vec(),
            Err(FrameError::Body(e)) => {
                // In step after a bad body (see `FrameError::Body`): its
                // payload is not taken for the next frame's header.
                self.skip_payload(head.header.payload_len as usize).await?;
                return Err(FrameError::Body(e));
            }
            Err(e) => return Err(e),
        };
        let mut payload = vec![0u8; head.header.payload_len as usize];
        self.read_payload(&mut payload).await?;
        Ok(Some(Frame {
            header: head.header,
            opcode: head.opcode,
            body,
            payload,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;
    use futures_util::io::Cursor;
    use shardstore_proto::*;

    fn frames() -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(Opcode::Ping, 0, 1, &Empty {}, 0, &mut out);
        let payload = vec![7u8; 100_000];
        encode_frame(
            Opcode::Write,
            0,
            2,
            &WriteRequest {
                chunk: 5,
                offset: 0,
                payload_crc: payload_crc(&payload),
                flags: 0,
            },
            payload.len() as u32,
            &mut out,
        );
        out.extend_from_slice(&payload);
        encode_frame(Opcode::Stat, 0, 3, &ChunkRequest { chunk: 5 }, 0, &mut out);
        out
    }

    #[test]
    fn decodes_a_stream_of_frames() {
        block_on(async {
            let mut r = FrameReader::new(Cursor::new(frames()), limits::MAX_PAYLOAD);
            let f = r.next_frame().await.unwrap().unwrap();
            assert_eq!((f.opcode, f.header.request_id), (Opcode::Ping, 1));
            let f = r.next_frame().await.unwrap().unwrap();
            assert_eq!(f.opcode, Opcode::Write);
            assert_eq!(f.payload.len(), 100_000);
            let w = access_body::<ArchivedWriteRequest>(&f.body).unwrap();
            assert_eq!(w.payload_crc.to_native(), payload_crc(&f.payload));
            let f = r.next_frame().await.unwrap().unwrap();
            assert_eq!(f.opcode, Opcode::Stat);
            assert!(r.next_frame().await.unwrap().is_none());
        });
    }

    /// A frame whose body is bad is an error, and the stream stays in step:
    /// the next frame reads as itself. Its payload used to be left in the
    /// stream and parsed as the next header (bytes a peer chose).
    #[test]
    fn after_a_bad_body_the_next_frame_is_read() {
        block_on(async {
            let mut all = frames();
            // A byte of the WRITE's body (after the PING and the WRITE's header).
            all[2 * HEADER_LEN + 1] ^= 0xff;
            let mut r = FrameReader::new(Cursor::new(all), limits::MAX_PAYLOAD);
            let f = r.next_frame().await.unwrap().unwrap();
            assert_eq!(f.opcode, Opcode::Ping);
            assert!(matches!(r.next_frame().await, Err(FrameError::Body(_))));
            let f = r.next_frame().await.unwrap().unwrap();
            assert_eq!((f.opcode, f.header.request_id), (Opcode::Stat, 3));
            assert!(r.next_frame().await.unwrap().is_none());
        });
    }

    #[test]
    fn every_truncation_is_an_error_not_a_frame() {
        let all = frames();
        let ping_len = HEADER_LEN;
        let write_len = all.len() - ping_len - (HEADER_LEN + 16);
        let boundaries = [ping_len, ping_len + write_len];
        for cut in 1..all.len() {
            if cut % 997 != 0
                && !(cut < 300
                    || boundaries.iter().any(|b| b.abs_diff(cut) < 60)
                    || cut > all.len() - 300)
            {
                continue;
            }
            let res = block_on(async {
                let mut r = FrameReader::new(Cursor::new(all[..cut].to_vec()), limits::MAX_PAYLOAD);
                loop {
                    match r.next_frame().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => return Ok(()),
                        Err(e) => return Err(e),
                    }
                }
            });
            // A cut exactly between frames is a clean EOF; anything else is Truncated.
            if boundaries.contains(&cut) {
                assert!(res.is_ok(), "cut {cut}: {res:?}");
            } else {
                assert!(
                    matches!(res, Err(FrameError::Truncated { .. })),
                    "cut {cut}: {res:?}"
                );
            }
        }
    }

    #[test]
    fn oversized_length_is_rejected_before_allocation() {
        let mut f = Vec::new();
        encode_frame(Opcode::Write, 0, 9, &ChunkRequest { chunk: 1 }, 0, &mut f);
        let mut h = FrameHeader::from_bytes(f[..HEADER_LEN].try_into().unwrap());
        h.payload_len = u32::MAX;
        let mut raw = h.to_bytes();
        let crc = crc32c::crc32c(&raw[..36]);
        raw[36..].copy_from_slice(&crc.to_le_bytes());
        let err = block_on(async {
            let mut r = FrameReader::new(Cursor::new(raw.to_vec()), limits::MAX_PAYLOAD);
            r.read_head().await.unwrap_err()
        });
        match err {
            FrameError::Header {
                err, request_id, ..
            } => {
                assert_eq!(request_id, Some(9));
                assert_eq!(err.code(), ErrorCode::TooLarge);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn garbage_is_rejected_without_trusting_the_request_id() {
        let err = block_on(async {
            let mut r = FrameReader::new(Cursor::new(vec![0xAB; 4096]), limits::MAX_PAYLOAD);
            r.read_head().await.unwrap_err()
        });
        assert!(matches!(
            err,
            FrameError::Header {
                request_id: None,
                ..
            }
        ));
    }

    #[test]
    fn corrupted_body_keeps_the_stream_in_step() {
        let mut all = frames();
        let last = all.len() - 1;
        all[last] ^= 0xff; // inside the STAT body
        block_on(async {
            let mut r = FrameReader::new(Cursor::new(all), limits::MAX_PAYLOAD);
            r.next_frame().await.unwrap().unwrap();
            r.next_frame().await.unwrap().unwrap();
            assert!(matches!(r.next_frame().await, Err(FrameError::Body(_))));
            assert!(r.next_frame().await.unwrap().is_none());
        });
    }
}
