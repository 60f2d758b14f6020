//! TCP listener sockets with explicit options (socket2).

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::SocketAddr;

/// Listener options; the defaults suit a storage server on a fast network.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    pub backlog: i32,
    pub reuse_port: bool,
    /// SO_RCVBUF / SO_SNDBUF for accepted sockets (inherited from the listener); 0 keeps the kernel's.
    pub recv_buffer: usize,
    pub send_buffer: usize,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            backlog: 1024,
            reuse_port: false,
            recv_buffer: 0,
            send_buffer: 0,
        }
    }
}

/// A bound, listening, non-blocking socket with SO_REUSEADDR set.
pub fn listen_socket(addr: SocketAddr, opts: &ListenOptions) -> io::Result<Socket> {
    let sk = bind_socket(addr, opts)?;
    sk.listen(opts.backlog)?;
    Ok(sk)
}

/// [`listen_socket`] without the `listen`: connections are refused until
/// the owner calls `listen(opts.backlog)`, e.g. once it can serve them.
/// A socket already listening on `addr` fails the bind. Until the `listen`,
/// the address is not held against other SO_REUSEADDR sockets: one may bind
/// and listen there meanwhile, and then whichever listens second fails.
pub fn bind_socket(addr: SocketAddr, opts: &ListenOptions) -> io::Result<Socket> {
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let sk = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    sk.set_reuse_address(true)?;
    if opts.reuse_port {
        sk.set_reuse_port(true)?;
    }
    if opts.recv_buffer > 0 {
        sk.set_recv_buffer_size(opts.recv_buffer)?;
    }
    if opts.send_buffer > 0 {
        sk.set_send_buffer_size(opts.send_buffer)?;
    }
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux.
    sk.set_nodelay(true)?;
    sk.set_nonblocking(true)?;
    sk.bind(&SockAddr::from(addr))?;
    Ok(sk)
}

/// A glommio listener on a socket built by [`listen_socket`]. Must be called
/// on the glommio executor that will accept on it.
#[cfg(feature = "glommio")]
pub fn glommio_listener(
    addr: SocketAddr,
    opts: &ListenOptions,
) -> io::Result<glommio::net::TcpListener> {
    use std::os::unix::io::{FromRawFd, IntoRawFd};
    let sk = listen_socket(addr, opts)?;
    // SAFETY: the fd comes from a socket we own and hand over whole.
    Ok(unsafe { glommio::net::TcpListener::from_raw_fd(sk.into_raw_fd()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_has_requested_options() {
        let sk = listen_socket("127.0.0.1:0".parse().unwrap(), &ListenOptions::default()).unwrap();
        assert!(sk.reuse_address().unwrap());
        assert!(sk.nodelay().unwrap());
        let addr = sk.local_addr().unwrap().as_socket().unwrap();
        assert_ne!(addr.port(), 0);
        // Binding the same address again without SO_REUSEPORT fails.
        assert!(listen_socket(addr, &ListenOptions::default()).is_err());
    }
}
