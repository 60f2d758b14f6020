//! The async-rdma backend (feature `rdma`): reliable-connected queue pairs on
//! a real device (InfiniBand, RoCE, or the kernel's soft-RoCE `rxe`).
//!
//! Connection set-up exchanges queue-pair endpoints over a TCP connection we
//! own (`ConnectionType::RCIBV`), so the listener binds its address before
//! any peer arrives and a bad address fails at start-up:
//! client -> server: `b"SSQP"`, u32 length, bincode endpoint; the server
//! answers the same, moves its queue pair to ready-to-receive, then sends one
//! byte; only then does the client send (so no message meets a queue pair
//! that cannot take it yet). async-rdma runs on tokio: drive these from a
//! tokio runtime (the server gives them a thread of their own).

use super::{Endpoint, Region, RemoteRegion, CONTROL_MAX};
use async_rdma::{
    AccessFlag, ConnectionType, LocalMr, LocalMrReadAccess, LocalMrWriteAccess, MrAccess,
    MrTokenBuilder, QueuePairEndpoint, Rdma, RdmaBuilder, RemoteMr,
};
use std::alloc::Layout;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HELLO_MAGIC: &[u8; 4] = b"SSQP";
/// Bound of a serialized queue-pair endpoint (it is tens of bytes).
const MAX_ENDPOINT: u32 = 1024;
/// Time allowed for the whole set-up of one connection.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

fn builder() -> RdmaBuilder {
    RdmaBuilder::default()
        .set_conn_type(ConnectionType::RCIBV)
        .set_max_message_length(CONTROL_MAX)
}

fn other(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

async fn write_endpoint(s: &mut TcpStream, ep: &QueuePairEndpoint) -> io::Result<()> {
    let bytes = bincode::serialize(ep).map_err(|e| other(format!("endpoint: {e}")))?;
    let mut out = Vec::with_capacity(8 + bytes.len());
    out.extend_from_slice(HELLO_MAGIC);
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&bytes);
    s.write_all(&out).await
}

async fn read_endpoint(s: &mut TcpStream) -> io::Result<QueuePairEndpoint> {
    let mut head = [0u8; 8];
    s.read_exact(&mut head).await?;
    if &head[..4] != HELLO_MAGIC {
        return Err(other("not a shardstore RDMA peer (bad magic)"));
    }
    let len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    if len > MAX_ENDPOINT {
        return Err(other(format!("endpoint of {len} bytes")));
    }
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf).await?;
    bincode::deserialize(&buf).map_err(|e| other(format!("endpoint: {e}")))
}

async fn timed<T>(f: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(SETUP_TIMEOUT, f)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "RDMA connection set-up timed out"))?
}

/// Connects to a server's `--rdma-listen` address.
pub async fn connect(addr: &str) -> io::Result<VerbsEndpoint> {
    timed(async {
        let mut s = TcpStream::connect(addr).await?;
        let mut rdma = builder().build()?;
        write_endpoint(&mut s, &rdma.get_qp_endpoint()).await?;
        let remote = read_endpoint(&mut s).await?;
        rdma.ibv_connect(remote).await?;
        let mut ready = [0u8; 1];
        s.read_exact(&mut ready).await?;
        Ok(VerbsEndpoint { rdma })
    })
    .await
}

/// Accepts RDMA connections.
pub struct VerbsListener {
    tcp: TcpListener,
}

impl VerbsListener {
    pub async fn bind(addr: SocketAddr) -> io::Result<VerbsListener> {
        Ok(VerbsListener {
            tcp: TcpListener::bind(addr).await?,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The next connection. Errors concern one peer: log and keep accepting.
    pub async fn accept(&self) -> io::Result<(VerbsEndpoint, SocketAddr)> {
        let (setup, peer) = self.accept_setup().await?;
        Ok((setup.finish().await?, peer))
    }

    /// The next TCP connection, its RDMA set-up still to do: a server
    /// finishes it in its own task, so a peer that connects and sends
    /// nothing does not hold up the next accept for the set-up timeout.
    pub async fn accept_setup(&self) -> io::Result<(Setup, SocketAddr)> {
        let (s, peer) = self.tcp.accept().await?;
        Ok((Setup { s }, peer))
    }
}

/// An accepted connection before its queue pair is connected.
pub struct Setup {
    s: TcpStream,
}

impl Setup {
    /// Exchanges endpoints and connects the queue pair, within the set-up
    /// timeout.
    pub async fn finish(self) -> io::Result<VerbsEndpoint> {
        let mut s = self.s;
        timed(async {
            let remote = read_endpoint(&mut s).await?;
            let mut rdma = builder().build()?;
            write_endpoint(&mut s, &rdma.get_qp_endpoint()).await?;
            rdma.ibv_connect(remote).await?;
            s.write_all(&[1]).await?;
            Ok(VerbsEndpoint { rdma })
        })
        .await
    }
}

pub struct VerbsEndpoint {
    rdma: Rdma,
}

pub struct VerbsRegion {
    mr: LocalMr,
}

impl Region for VerbsRegion {
    fn capacity(&self) -> usize {
        self.mr.length()
    }

    fn remote(&self, len: usize) -> RemoteRegion {
        assert!(len <= self.capacity());
        RemoteRegion {
            addr: self.mr.addr() as u64,
            len: len as u32,
            rkey: self.mr.rkey(),
        }
    }

    fn copy_in(&mut self, src: &[u8]) {
        let mut g = self.mr.as_mut_slice();
        g[..src.len()].copy_from_slice(src);
    }

    fn copy_out(&self, len: usize) -> Vec<u8> {
        self.mr.as_slice()[..len].to_vec()
    }
}

fn remote_mr(r: RemoteRegion) -> io::Result<RemoteMr> {
    let token = MrTokenBuilder::default()
        .addr(r.addr as usize)
        .len(r.len as usize)
        .rkey(r.rkey)
        .ddl(SystemTime::now() + Duration::from_secs(60))
        .access(AccessFlag::RemoteRead | AccessFlag::RemoteWrite | AccessFlag::LocalWrite)
        .build()
        .map_err(|e| other(format!("remote region: {e}")))?;
    Ok(RemoteMr::new(token))
}

impl Endpoint for VerbsEndpoint {
    type Region = VerbsRegion;

    fn register(&self, len: usize) -> io::Result<VerbsRegion> {
        let layout = Layout::from_size_align(len.max(1), 4096)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(VerbsRegion {
            mr: self.rdma.alloc_local_mr(layout)?,
        })
    }

    async fn send(&self, msg: &[u8]) -> io::Result<()> {
        // An exactly sized region: async-rdma sends whole regions.
        let layout = Layout::from_size_align(msg.len().max(1), 1)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut mr = self.rdma.alloc_local_mr(layout)?;
        mr.as_mut_slice()[..msg.len()].copy_from_slice(msg);
        self.rdma.send(&mr).await
    }

    async fn recv(&self) -> io::Result<Vec<u8>> {
        let mr = self.rdma.receive().await?;
        let v = mr.as_slice().to_vec();
        Ok(v)
    }

    async fn read(&self, dst: &mut VerbsRegion, src: RemoteRegion) -> io::Result<()> {
        let rmr = remote_mr(src)?;
        let mut local = dst
            .mr
            .get_mut(0..src.len as usize)
            .ok_or_else(|| other("local region too small"))?;
        self.rdma.read(&mut local, &rmr).await
    }

    async fn write(&self, src: &VerbsRegion, dst: RemoteRegion) -> io::Result<()> {
        let mut rmr = remote_mr(dst)?;
        let local = src
            .mr
            .get(0..dst.len as usize)
            .ok_or_else(|| other("local region too small"))?;
        self.rdma.write(&local, &mut rmr).await
    }
}
