//! A worker's sockets: created here (listening sockets at start, relay sockets when the
//! control plane asks for a bind), indexed by [`Token`], closed when the backend lets go
//! of them. The forwarding core only ever sees tokens.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};

use socket2::{Domain, Protocol, Socket, Type};
use turnpike_plane::BindError;

use crate::core::Token;
use crate::io::sys;

/// What a socket of the worker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// UDP: a listening socket or a relay socket.
    Udp,
    /// A TCP listening socket clients connect to (plain TCP or TLS).
    Listener(crate::io::conns::ListenerKind),
    /// A client connection (TCP or TLS), its state in [`SockEntry::stream`].
    Stream,
}

/// One socket of the worker.
#[derive(Debug)]
pub(crate) struct SockEntry {
    pub(crate) sock: Socket,
    pub(crate) local: SocketAddr,
    pub(crate) kind: Kind,
    /// The connection state of a [`Kind::Stream`] socket (taken out while the worker
    /// works on it).
    pub(crate) stream: Option<Box<crate::io::conns::Conn>>,
    /// UDP GSO may be used (probed at creation, cleared when the kernel refuses).
    pub(crate) gso: bool,
    /// Closed by the core; the backend still has to let go of it.
    pub(crate) closing: bool,
}

/// The worker's sockets, indexed by [`Token`]. A token is reused only after
/// [`Sockets::release`], which the backend calls once the kernel holds no reference to
/// the socket's pending operations.
#[derive(Debug, Default)]
pub(crate) struct Sockets {
    entries: Vec<Option<SockEntry>>,
    free: Vec<u32>,
}

impl Sockets {
    /// Adds a bound UDP socket; its local address is read back (port 0 resolved).
    pub(crate) fn insert(&mut self, sock: Socket) -> io::Result<(Token, SocketAddr)> {
        self.insert_kind(sock, Kind::Udp)
    }

    /// Adds a socket of any kind; its local address is read back (port 0 resolved).
    pub(crate) fn insert_kind(
        &mut self,
        sock: Socket,
        kind: Kind,
    ) -> io::Result<(Token, SocketAddr)> {
        let local = sock
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("socket without an IP address"))?;
        let gso = kind == Kind::Udp && sys::gso_supported(sock.as_fd());
        let e = SockEntry {
            sock,
            local,
            kind,
            stream: None,
            gso,
            closing: false,
        };
        let t = match self.free.pop() {
            Some(i) => {
                if let Some(slot) = self.entries.get_mut(i as usize) {
                    *slot = Some(e);
                }
                Token(i)
            }
            None => {
                self.entries.push(Some(e));
                Token(u32::try_from(self.entries.len() - 1).unwrap_or(u32::MAX))
            }
        };
        Ok((t, local))
    }

    /// Binds UDP relay sockets on every address of `relays`, all or none.
    pub(crate) fn bind_relays(
        &mut self,
        relays: &[SocketAddr],
        buffers: usize,
        inherited: Option<&crate::Inherited>,
    ) -> Result<Vec<Token>, BindError> {
        if relays.is_empty() {
            return Err(BindError::Invalid("no relay address to bind".into()));
        }
        let mut socks = Vec::with_capacity(relays.len());
        for &r in relays {
            // A socket the previous process handed over (an upgrade): taken as it is,
            // with what its receive buffer holds.
            if let Some(s) = inherited.and_then(|i| i.take_relay(r)) {
                socks.push(s);
                continue;
            }
            match udp_socket(r, false, buffers) {
                Ok(s) => socks.push(s),
                // The sockets bound so far close as `socks` drops: all or none.
                Err(e) => {
                    tracing::debug!(relay = %r, error = %e, "relay bind failed");
                    return Err(BindError::from_io(&e));
                }
            }
        }
        let mut tokens = Vec::with_capacity(socks.len());
        for sock in socks {
            match self.insert(sock) {
                Ok((t, _)) => tokens.push(t),
                Err(e) => {
                    for t in tokens {
                        self.release(t);
                    }
                    return Err(BindError::System(e.to_string()));
                }
            }
        }
        Ok(tokens)
    }

    pub(crate) fn get(&self, t: Token) -> Option<&SockEntry> {
        self.entries.get(t.0 as usize).and_then(Option::as_ref)
    }

    pub(crate) fn get_mut(&mut self, t: Token) -> Option<&mut SockEntry> {
        self.entries.get_mut(t.0 as usize).and_then(Option::as_mut)
    }

    /// What socket `t` is (`None` once released).
    pub(crate) fn kind(&self, t: Token) -> Option<Kind> {
        self.get(t).map(|e| e.kind)
    }

    pub(crate) fn fd(&self, t: Token) -> Option<BorrowedFd<'_>> {
        self.get(t).map(|e| e.sock.as_fd())
    }

    /// Drops (closes) a socket the backend no longer refers to.
    pub(crate) fn release(&mut self, t: Token) {
        if let Some(slot) = self.entries.get_mut(t.0 as usize)
            && slot.take().is_some()
        {
            self.free.push(t.0);
        }
    }

    /// Every live socket.
    pub(crate) fn tokens(&self) -> impl Iterator<Item = Token> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_some())
            .map(|(i, _)| Token(i as u32))
    }
}

/// Creates a non-blocking UDP socket bound to `addr`.
pub(crate) fn udp_socket(addr: SocketAddr, reuse_port: bool, buffers: usize) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_nonblocking(true)?;
    s.set_cloexec(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    sys::set_buffers(&s, buffers);
    s.bind(&addr.into())?;
    Ok(s)
}

/// Creates a non-blocking TCP listening socket bound to `addr` (SO_REUSEPORT, so that
/// every worker has its own and the kernel spreads connections over them).
pub(crate) fn tcp_listener(addr: SocketAddr, backlog: i32) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_nonblocking(true)?;
    s.set_cloexec(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog)?;
    Ok(s)
}
