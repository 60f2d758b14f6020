//! In-memory [`Endpoint`]: what a NIC does, minus the wire. Two endpoints
//! from [`pair`] share one [`Fabric`] (the table of registered regions, as a
//! NIC's memory translation table): RDMA read and write look regions up by
//! rkey and refuse any access outside them, as a NIC answers a bad rkey or
//! range with a remote access error. Regions are deregistered on drop, so a
//! stale descriptor fails. Used by the framing tests and the server's bridge
//! tests on every build.

use super::{Endpoint, Region, RemoteRegion};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

type Buf = Arc<Mutex<Vec<u8>>>;

/// The shared registration table and operation counters.
#[derive(Default)]
pub struct Fabric {
    regions: Mutex<HashMap<u32, (u64, Buf)>>,
    next: AtomicU64,
    /// Two-sided messages sent.
    pub sends: AtomicU64,
    /// One-sided operations and the bytes they moved.
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

impl Fabric {
    fn table(&self) -> MutexGuard<'_, HashMap<u32, (u64, Buf)>> {
        self.regions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Regions registered now.
    pub fn registered(&self) -> usize {
        self.table().len()
    }

    /// The buffer behind `r`, if `r` lies inside a registered region.
    fn resolve(&self, r: RemoteRegion) -> io::Result<(Buf, usize)> {
        let t = self.table();
        let denied = || {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("remote access error: {r:?} is not inside a registered region"),
            )
        };
        let (base, buf) = t.get(&r.rkey).ok_or_else(denied)?;
        let cap = buf.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
        let off = r.addr.checked_sub(*base).ok_or_else(denied)?;
        if off + r.len as u64 > cap {
            return Err(denied());
        }
        Ok((buf.clone(), off as usize))
    }
}

pub struct LoopbackRegion {
    rkey: u32,
    addr: u64,
    buf: Buf,
    fabric: Arc<Fabric>,
}

impl Region for LoopbackRegion {
    fn capacity(&self) -> usize {
        self.buf.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn remote(&self, len: usize) -> RemoteRegion {
        assert!(len <= self.capacity());
        RemoteRegion {
            addr: self.addr,
            len: len as u32,
            rkey: self.rkey,
        }
    }

    fn copy_in(&mut self, src: &[u8]) {
        self.buf.lock().unwrap_or_else(|e| e.into_inner())[..src.len()].copy_from_slice(src);
    }

    fn copy_out(&self, len: usize) -> Vec<u8> {
        self.buf.lock().unwrap_or_else(|e| e.into_inner())[..len].to_vec()
    }
}

impl Drop for LoopbackRegion {
    fn drop(&mut self) {
        self.fabric.table().remove(&self.rkey);
    }
}

/// One end of an in-memory queue pair.
pub struct LoopbackEndpoint {
    tx: flume::Sender<Vec<u8>>,
    rx: flume::Receiver<Vec<u8>>,
    fabric: Arc<Fabric>,
}

impl LoopbackEndpoint {
    pub fn fabric(&self) -> &Arc<Fabric> {
        &self.fabric
    }
}

/// Two connected endpoints. The send queue depth is bounded (as a queue
/// pair's is): a sender that outruns its peer waits.
pub fn pair() -> (LoopbackEndpoint, LoopbackEndpoint) {
    let fabric = Arc::new(Fabric::default());
    let (atx, brx) = flume::bounded(64);
    let (btx, arx) = flume::bounded(64);
    (
        LoopbackEndpoint {
            tx: atx,
            rx: arx,
            fabric: fabric.clone(),
        },
        LoopbackEndpoint {
            tx: btx,
            rx: brx,
            fabric,
        },
    )
}

impl Endpoint for LoopbackEndpoint {
    type Region = LoopbackRegion;

    fn register(&self, len: usize) -> io::Result<LoopbackRegion> {
        // Distinct, non-overlapping fake addresses; rkeys from the same counter.
        let n = self.fabric.next.fetch_add(1, Ordering::Relaxed) + 1;
        let rkey = n as u32;
        let addr = n << 32;
        let buf = Arc::new(Mutex::new(vec![0u8; len]));
        self.fabric.table().insert(rkey, (addr, buf.clone()));
        Ok(LoopbackRegion {
            rkey,
            addr,
            buf,
            fabric: self.fabric.clone(),
        })
    }

    async fn send(&self, msg: &[u8]) -> io::Result<()> {
        if msg.len() > super::CONTROL_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "message exceeds CONTROL_MAX",
            ));
        }
        self.fabric.sends.fetch_add(1, Ordering::Relaxed);
        self.tx
            .send_async(msg.to_vec())
            .await
            .map_err(|_| io::ErrorKind::BrokenPipe.into())
    }

    async fn recv(&self) -> io::Result<Vec<u8>> {
        self.rx
            .recv_async()
            .await
            .map_err(|_| io::ErrorKind::UnexpectedEof.into())
    }

    async fn read(&self, dst: &mut LoopbackRegion, src: RemoteRegion) -> io::Result<()> {
        let (buf, off) = self.fabric.resolve(src)?;
        let n = src.len as usize;
        let bytes = buf.lock().unwrap_or_else(|e| e.into_inner())[off..off + n].to_vec();
        if n > dst.capacity() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "local region too small",
            ));
        }
        dst.copy_in(&bytes);
        self.fabric.reads.fetch_add(1, Ordering::Relaxed);
        self.fabric
            .bytes_read
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }

    async fn write(&self, src: &LoopbackRegion, dst: RemoteRegion) -> io::Result<()> {
        let (buf, off) = self.fabric.resolve(dst)?;
        let n = dst.len as usize;
        if n > src.capacity() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "local region too small",
            ));
        }
        let bytes = src.copy_out(n);
        buf.lock().unwrap_or_else(|e| e.into_inner())[off..off + n].copy_from_slice(&bytes);
        self.fabric.writes.fetch_add(1, Ordering::Relaxed);
        self.fabric
            .bytes_written
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Accepts loopback connections: the in-memory counterpart of a listener.
pub struct LoopbackListener {
    rx: flume::Receiver<LoopbackEndpoint>,
}

/// Opens connections to a [`LoopbackListener`].
#[derive(Clone)]
pub struct LoopbackConnector {
    tx: flume::Sender<LoopbackEndpoint>,
}

pub fn listener() -> (LoopbackConnector, LoopbackListener) {
    let (tx, rx) = flume::unbounded();
    (LoopbackConnector { tx }, LoopbackListener { rx })
}

impl LoopbackConnector {
    pub fn connect(&self) -> io::Result<LoopbackEndpoint> {
        let (a, b) = pair();
        self.tx
            .send(b)
            .map_err(|_| io::Error::from(io::ErrorKind::ConnectionRefused))?;
        Ok(a)
    }
}

impl LoopbackListener {
    /// The next connection; `None` once every connector is gone.
    pub async fn accept(&self) -> Option<LoopbackEndpoint> {
        self.rx.recv_async().await.ok()
    }
}
