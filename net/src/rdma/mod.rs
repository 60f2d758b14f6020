//! RDMA transport: the same frames as over TCP (40-byte header, rkyv body,
//! payload; same limits and crcs from `proto-rkyv`), carried as messages on a
//! reliable-connected queue pair.
//!
//! - Small frames travel by two-sided send/recv: one message is one control
//!   message ([`wire`]): a 32-byte RDMA descriptor, the frame header, the
//!   body, and a payload of at most [`INLINE_MAX`] bytes inline.
//! - Bulk payloads never travel inline. A WRITE request names the registered
//!   region holding its payload (descriptor `{addr, len, rkey}`, kind
//!   `Source`) and the receiver pulls it with an RDMA read. A READ request
//!   offers a registered sink (kind `Sink`); the server RDMA-writes the reply
//!   payload into it before sending the reply (kind `Written`); on a
//!   reliable-connected queue pair the send is ordered after the write, so the
//!   bytes are in place when the reply arrives.
//! - Registered memory comes from a bounded [`MemoryRegionPool`] (size classes
//!   of 4 KiB..MAX_PAYLOAD, reuse, a byte budget).
//!
//! Everything is written against the [`Endpoint`] and [`Region`] traits. The
//! in-memory [`loopback`] implementation runs the framing and bookkeeping
//! tests on every build; the async-rdma implementation (`verbs`) is behind
//! the `rdma` feature and needs a device.
//!
//! Invariants:
//! - a region that a peer may still read or write is never reused: a request's
//!   source and sink stay held until its reply arrives (or the connection
//!   dies); a server reply's source region is only used for RDMA write,
//!   completed before the reply is sent;
//! - every descriptor and header is validated (magic, version, crc, kind,
//!   lengths against the receiver's limits) before anything is registered or
//!   read for it; an RDMA read never reads more than the header's
//!   `payload_len`, itself bounded by `max_payload`;
//! - message boundaries are kept by the transport, so a bad message never
//!   puts the connection out of step: it is answered (when its request id is
//!   trusted) and the next message is read.

pub mod loopback;
mod message;
mod pool;
#[cfg(feature = "rdma")]
pub mod verbs;
mod wire;

pub use message::{Held, Incoming, PayloadRef, RdmaConn, RdmaError};
pub use pool::{MemoryRegionPool, PoolConfig, PoolError, PoolStats, PooledRegion};
pub use wire::{
    decode_control, encode_control, Descriptor, DescriptorError, DescriptorKind, CONTROL_MAX,
    DESCRIPTOR_LEN, INLINE_MAX,
};

use std::io;

/// Where a peer's registered bytes are: what an RDMA read or write targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRegion {
    pub addr: u64,
    pub len: u32,
    pub rkey: u32,
}

/// Registered memory, owned by this side.
pub trait Region: Send + 'static {
    /// Bytes registered.
    fn capacity(&self) -> usize;
    /// The descriptor a peer uses to reach the first `len` bytes.
    fn remote(&self, len: usize) -> RemoteRegion;
    /// Copies `src` to the start of the region. Panics if it does not fit
    /// (callers size regions from validated lengths).
    fn copy_in(&mut self, src: &[u8]);
    /// The first `len` bytes, copied out. Panics past the capacity.
    fn copy_out(&self, len: usize) -> Vec<u8>;
}

/// One connected queue pair.
#[allow(async_fn_in_trait)]
pub trait Endpoint {
    type Region: Region;
    /// Registers `len` bytes for local use and remote read/write.
    fn register(&self, len: usize) -> io::Result<Self::Region>;
    /// Sends one message (at most [`CONTROL_MAX`] bytes) by two-sided send.
    async fn send(&self, msg: &[u8]) -> io::Result<()>;
    /// Receives the next message. `ErrorKind::UnexpectedEof` once the peer is gone.
    async fn recv(&self) -> io::Result<Vec<u8>>;
    /// RDMA read of `src.len` bytes from the peer into the start of `dst`.
    async fn read(&self, dst: &mut Self::Region, src: RemoteRegion) -> io::Result<()>;
    /// RDMA write of the first `dst.len` bytes of `src` to the peer.
    async fn write(&self, src: &Self::Region, dst: RemoteRegion) -> io::Result<()>;
}

/// RDMA devices the kernel lists in `/sys/class/infiniband` (empty when
/// there is none, or no InfiniBand support in the kernel).
pub fn devices() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/infiniband")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
