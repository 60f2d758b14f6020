//! Framing and transports for shardstore. Knows frames, not chunks.
//!
//! - [`FrameReader`]: a buffered frame decoder over any futures-io
//!   `AsyncRead`. One large read takes every frame the kernel has buffered;
//!   the header is validated before anything is allocated for the rest of the
//!   frame; bulk payloads can be read straight into a caller's buffer (the
//!   server passes the DMA buffer that goes to disk).
//! - [`tcp`]: listener sockets with the options a server wants (socket2), and
//!   with the `glommio` feature, glommio listeners built from them.
//! - [`rdma`]: the same frames over RDMA (send/recv for small frames, RDMA
//!   read/write of registered regions for bulk payloads), with an in-memory
//!   loopback; the async-rdma backend is behind the `rdma` feature.
//!
//! The codec is runtime-agnostic: the server drives it over glommio streams,
//! the client over tokio streams through `tokio-util`'s compat layer.

pub mod rdma;
mod reader;
pub mod tcp;
#[cfg(feature = "tls")]
pub mod tls;

pub use reader::{Frame, FrameError, FrameReader, RawFrameHead};
