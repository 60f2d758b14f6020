//! An in-memory [`Transport`] for tests and fuzzing: the client's bytes as
//! the read side, replies collected.

use crate::conn::Transport;
use futures_lite::{AsyncRead, AsyncWrite};
use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

/// What becomes of the replies sent.
enum Sends {
    /// Collected (see [`MemStream::new`]).
    Taken,
    /// See [`MemStream::stalling_sends`].
    Stall,
    /// See [`MemStream::failing_sends`].
    Fail,
}

pub struct MemStream {
    input: Vec<u8>,
    pos: usize,
    /// Bytes per read at most, so frames straddle reads as on a socket.
    max_read: usize,
    /// At the end of `input`: an error (true) or the end of the stream.
    fail_at_end: bool,
    sends: Sends,
    written: Rc<RefCell<Vec<u8>>>,
}

impl MemStream {
    /// Reads `input` in pieces of varying size, then ends; the replies
    /// written go to the returned buffer.
    pub fn new(input: Vec<u8>) -> (MemStream, Rc<RefCell<Vec<u8>>>) {
        let written = Rc::new(RefCell::new(Vec::new()));
        let s = MemStream {
            input,
            pos: 0,
            max_read: 4096,
            fail_at_end: false,
            sends: Sends::Taken,
            written: written.clone(),
        };
        (s, written)
    }

    /// After `input`, reads fail with `UnexpectedEof`: what a TLS
    /// connection's reads give once they were shut down (no close_notify).
    pub fn failing_at_end(mut self) -> MemStream {
        self.fail_at_end = true;
        self
    }

    /// Every send waits for ever: a client that stopped reading, with no
    /// write timeout to cut it off.
    pub fn stalling_sends(mut self) -> MemStream {
        self.sends = Sends::Stall;
        self
    }

    /// Every send fails with a broken pipe: a client that reset the
    /// connection.
    pub fn failing_sends(mut self) -> MemStream {
        self.sends = Sends::Fail;
        self
    }
}

impl AsyncRead for MemStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.pos == self.input.len() && self.fail_at_end {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed connection without sending TLS close_notify",
            )));
        }
        let piece = 1 + self.pos % self.max_read;
        let n = buf.len().min(self.input.len() - self.pos).min(piece);
        let start = self.pos;
        buf[..n].copy_from_slice(&self.input[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for MemStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.borrow_mut().extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Transport for MemStream {
    async fn send_all(&mut self, slices: &[&[u8]], _timeout: Duration) -> io::Result<()> {
        match self.sends {
            Sends::Taken => {}
            Sends::Stall => std::future::pending::<()>().await,
            Sends::Fail => return Err(io::ErrorKind::BrokenPipe.into()),
        }
        let mut w = self.written.borrow_mut();
        for s in slices {
            w.extend_from_slice(s);
        }
        Ok(())
    }
}
