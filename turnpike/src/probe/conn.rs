//! The probe's I/O: a connection to the server over UDP, TCP or TLS carrying whole
//! STUN messages and ChannelData frames, and a [`Session`] that drives the sans-IO
//! [`Client`] over it with blocking, deadline-bounded calls.

use std::io::{self, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use turnpike_proto::attr::{ErrorCode, Software, XorMappedAddress};
use turnpike_proto::channel::{ChannelData, Frame, next_frame};
use turnpike_proto::client::{AllocateOptions, Client, Event};
use turnpike_proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

/// The largest frame the probe reads (a STUN message or ChannelData over a stream).
const MAX_FRAME: usize = 65_535 + 4;

/// A byte stream with TURN framing (RFC 8656 §12.5) over it.
#[derive(Debug)]
pub struct Framed<S> {
    /// The stream.
    pub io: S,
    buf: Vec<u8>,
}

/// A connection to the server.
#[derive(Debug)]
pub enum Link {
    /// A UDP socket connected to the server.
    Udp(UdpSocket),
    /// A TCP connection.
    Tcp(Framed<TcpStream>),
    /// A TLS session over TCP.
    Tls(Box<Framed<StreamOwned<ClientConnection, TcpStream>>>),
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Until `deadline`, never zero (a zero read timeout is an error).
fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

impl<S: io::Read + io::Write> Framed<S> {
    fn new(io: S) -> Framed<S> {
        Framed {
            io,
            buf: Vec::new(),
        }
    }

    /// The next frame, or `None` when `deadline` passes; `set_timeout` bounds each read.
    fn recv(
        &mut self,
        deadline: Instant,
        set_timeout: impl Fn(&mut S, Duration) -> io::Result<()>,
    ) -> io::Result<Option<Vec<u8>>> {
        let mut chunk = [0u8; 16 * 1024];
        // Bounded: each turn reads or times out, and the deadline ends the loop.
        loop {
            match next_frame(&self.buf) {
                Ok(Frame::Complete(n)) => return Ok(Some(self.buf.drain(..n).collect())),
                Ok(Frame::Incomplete(_)) if self.buf.len() > MAX_FRAME => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "frame too large",
                    ));
                }
                Ok(Frame::Incomplete(_)) => {}
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the server sent something that is not TURN: {e}"),
                    ));
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            set_timeout(&mut self.io, left(deadline))?;
            match self.io.read(&mut chunk) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ));
                }
                Ok(n) => self
                    .buf
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(e) if timed_out(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Link {
    /// A UDP socket connected to `server`.
    pub fn udp(server: SocketAddr) -> io::Result<Link> {
        let any: SocketAddr = if server.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(any)?;
        sock.connect(server)?;
        Ok(Link::Udp(sock))
    }

    fn tcp_stream(server: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        let sock = TcpStream::connect_timeout(&server, timeout)?;
        sock.set_nodelay(true)?;
        sock.set_write_timeout(Some(timeout))?;
        Ok(sock)
    }

    /// A TCP connection to `server`.
    pub fn tcp(server: SocketAddr, timeout: Duration) -> io::Result<Link> {
        Ok(Link::Tcp(Framed::new(Self::tcp_stream(server, timeout)?)))
    }

    /// A TCP connection to `server` (an error here is a reachability failure) and then a
    /// TLS handshake for `name` (an error there is a TLS failure): `Ok(Err(_))`.
    pub fn tls(
        server: SocketAddr,
        cfg: Arc<ClientConfig>,
        name: ServerName<'static>,
        timeout: Duration,
    ) -> io::Result<Result<Link, io::Error>> {
        let mut sock = Self::tcp_stream(server, timeout)?;
        Ok((|| {
            let mut conn = ClientConnection::new(cfg, name)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            sock.set_read_timeout(Some(timeout))?;
            while conn.is_handshaking() {
                conn.complete_io(&mut sock)?;
            }
            Ok(Link::Tls(Box::new(Framed::new(StreamOwned::new(
                conn, sock,
            )))))
        })())
    }

    /// Whether this is a stream (ChannelData padded, no retransmissions).
    pub fn is_stream(&self) -> bool {
        !matches!(self, Link::Udp(_))
    }

    /// The ALPN protocol the TLS server chose.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        match self {
            Link::Tls(f) => f.io.conn.alpn_protocol().map(<[u8]>::to_vec),
            _ => None,
        }
    }

    /// The TLS version negotiated.
    pub fn tls_version(&self) -> Option<String> {
        match self {
            Link::Tls(f) => f.io.conn.protocol_version().map(|v| format!("{v:?}")),
            _ => None,
        }
    }

    /// Sends one STUN message or ChannelData frame.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Link::Udp(s) => s.send(bytes).map(|_| ()),
            Link::Tcp(f) => f.io.write_all(bytes),
            Link::Tls(f) => f.io.write_all(bytes).and_then(|()| f.io.flush()),
        }
    }

    /// The next datagram or frame from the server, `None` when `deadline` passes.
    pub fn recv(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        match self {
            Link::Udp(s) => {
                let mut buf = vec![0u8; MAX_FRAME];
                // Bounded: each turn waits at most until the deadline.
                loop {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                    s.set_read_timeout(Some(left(deadline)))?;
                    match s.recv(&mut buf) {
                        Ok(n) => {
                            buf.truncate(n);
                            return Ok(Some(buf));
                        }
                        Err(e) if timed_out(&e) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Link::Tcp(f) => f.recv(deadline, |s, t| s.set_read_timeout(Some(t))),
            Link::Tls(f) => f.recv(deadline, |s, t| s.sock.set_read_timeout(Some(t))),
        }
    }
}

/// How a transaction ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An Allocate succeeded.
    Allocated {
        /// XOR-RELAYED-ADDRESS(es).
        relayed: Vec<SocketAddr>,
        /// XOR-MAPPED-ADDRESS.
        mapped: Option<SocketAddr>,
        /// LIFETIME granted.
        lifetime: u32,
    },
    /// Another request succeeded.
    Done,
    /// An error response.
    Failed {
        /// The STUN error code.
        code: u16,
        /// Its reason phrase.
        reason: String,
    },
    /// No answer before the deadline.
    TimedOut,
    /// The connection failed.
    Io(String),
}

/// What arrived from a peer through the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    /// Whether it came as ChannelData.
    pub channel: bool,
    /// The payload.
    pub data: Vec<u8>,
}

/// A TURN client session over one [`Link`].
#[derive(Debug)]
pub struct Session {
    /// The connection.
    pub link: Link,
    client: Client,
    epoch: Instant,
    timeout: Duration,
    /// SOFTWARE of the server, from any message it sent.
    pub software: Option<String>,
    /// Whether the server challenged a request with 401 (it asks for credentials).
    pub challenged: bool,
}

impl Session {
    /// A session for `user`/`password` whose transactions last at most `timeout`.
    pub fn new(link: Link, user: &str, password: &str, timeout: Duration, seed: u64) -> Session {
        Session {
            link,
            client: Client::new(user, password, seed),
            epoch: Instant::now(),
            timeout,
            software: None,
            challenged: false,
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The realm the server named.
    pub fn realm(&self) -> Option<&str> {
        self.client.realm()
    }

    /// Notes what a STUN message from the server tells about it.
    fn observe(&mut self, bytes: &[u8]) -> Option<()> {
        let m = Message::parse(bytes).ok()?;
        if let Ok(Some(s)) = m.attr::<Software>() {
            self.software = Some(s.0.to_owned());
        }
        if m.class() == Class::Error && m.attr::<ErrorCode>().ok()??.code == 401 {
            self.challenged = true;
        }
        Some(())
    }

    /// Sends a Binding request and waits for its answer (retransmitted over UDP);
    /// returns the XOR-MAPPED-ADDRESS.
    pub fn binding(&mut self) -> Result<Option<SocketAddr>, String> {
        let seed = self.now() ^ 0x7072_6f62_6521;
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&seed.to_be_bytes());
        tid[8..].copy_from_slice(b"prob");
        let mut buf = [0u8; 64];
        let n = {
            let mut w = MessageWriter::new(
                &mut buf,
                Method::BINDING,
                Class::Request,
                TransactionId(tid),
            )
            .map_err(|e| format!("{e:?}"))?;
            w.add_fingerprint().map_err(|e| format!("{e:?}"))?;
            w.finish()
        };
        let req = buf.get(..n).unwrap_or_default().to_vec();
        let deadline = Instant::now() + self.timeout;
        let mut rto = Duration::from_millis(250);
        // Bounded by the deadline; over UDP the request is resent with doubling waits.
        while Instant::now() < deadline {
            self.link.send(&req).map_err(|e| e.to_string())?;
            let until = if self.link.is_stream() {
                deadline
            } else {
                (Instant::now() + rto).min(deadline)
            };
            rto *= 2;
            while let Some(bytes) = self.link.recv(until).map_err(|e| e.to_string())? {
                self.observe(&bytes);
                let Ok(m) = Message::parse(&bytes) else {
                    continue;
                };
                if m.transaction_id() != TransactionId(tid) {
                    continue;
                }
                return match m.class() {
                    Class::Success => Ok(m.attr::<XorMappedAddress>().ok().flatten().map(|a| a.0)),
                    _ => Err(format!(
                        "Binding answered with an error ({})",
                        m.attr::<ErrorCode>().ok().flatten().map_or(0, |e| e.code)
                    )),
                };
            }
        }
        Err(format!(
            "no answer to a STUN Binding request within {:?}",
            self.timeout
        ))
    }

    /// Runs the transaction that `start` begins to its end.
    fn transact(
        &mut self,
        start: impl FnOnce(&mut Client, u64, &mut Vec<u8>) -> Result<(), turnpike_proto::EncodeError>,
    ) -> Outcome {
        let mut out = Vec::new();
        let now = self.now();
        if let Err(e) = start(&mut self.client, now, &mut out) {
            return Outcome::Io(format!("cannot encode the request: {e:?}"));
        }
        if let Err(e) = self.link.send(&out) {
            return Outcome::Io(e.to_string());
        }
        let deadline = Instant::now() + self.timeout;
        // Bounded by the deadline: every turn receives until the next retransmission or
        // the deadline.
        while Instant::now() < deadline {
            let next = match self.client.poll_timeout() {
                Some(t) if !self.link.is_stream() => {
                    let wait = Duration::from_millis(t.saturating_sub(self.now()));
                    (Instant::now() + wait).min(deadline)
                }
                _ => deadline,
            };
            let bytes = match self.link.recv(next) {
                Ok(Some(b)) => b,
                Ok(None) => {
                    if self.link.is_stream() {
                        continue;
                    }
                    out.clear();
                    let now = self.now();
                    match self.client.handle_timeout(now, &mut out) {
                        Event::Retry => {
                            if let Err(e) = self.link.send(&out) {
                                return Outcome::Io(e.to_string());
                            }
                        }
                        Event::TimedOut { .. } => return Outcome::TimedOut,
                        _ => {}
                    }
                    continue;
                }
                Err(e) => return Outcome::Io(e.to_string()),
            };
            self.observe(&bytes);
            out.clear();
            let now = self.now();
            match self.client.handle(now, &bytes, &mut out) {
                Event::Retry => {
                    if let Err(e) = self.link.send(&out) {
                        return Outcome::Io(e.to_string());
                    }
                }
                Event::Allocated {
                    relayed,
                    mapped,
                    lifetime,
                    ..
                } => {
                    return Outcome::Allocated {
                        relayed,
                        mapped,
                        lifetime,
                    };
                }
                Event::Refreshed { .. } | Event::PermissionCreated | Event::ChannelBound { .. } => {
                    return Outcome::Done;
                }
                Event::Failed { code, reason, .. } => return Outcome::Failed { code, reason },
                Event::TimedOut { .. } => return Outcome::TimedOut,
                _ => {}
            }
        }
        Outcome::TimedOut
    }

    /// Allocate (UDP relaying).
    pub fn allocate(&mut self) -> Outcome {
        self.transact(|c, now, out| c.allocate(now, AllocateOptions::default(), out))
    }

    /// CreatePermission for `peer`.
    pub fn create_permission(&mut self, peer: SocketAddr) -> Outcome {
        self.transact(|c, now, out| c.create_permission(now, &[peer], out))
    }

    /// ChannelBind of `channel` to `peer`.
    pub fn channel_bind(&mut self, channel: u16, peer: SocketAddr) -> Outcome {
        self.transact(|c, now, out| c.channel_bind(now, channel, peer, out))
    }

    /// Refresh with `lifetime` (0 releases the allocation).
    pub fn refresh(&mut self, lifetime: u32) -> Outcome {
        self.transact(|c, now, out| c.refresh(now, lifetime, out))
    }

    /// Sends `data` on `channel` (padded on a stream).
    pub fn send_channel(&mut self, channel: u16, data: &[u8]) -> io::Result<()> {
        let mut buf = vec![0u8; data.len() + 8];
        let n = ChannelData {
            channel,
            payload: data,
        }
        .encode(&mut buf, self.link.is_stream())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e:?}")))?;
        self.link.send(buf.get(..n).unwrap_or_default())
    }

    /// Sends `data` to `peer` in a Send indication.
    pub fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) -> io::Result<()> {
        let mut buf = vec![0u8; data.len() + 128];
        let n = self
            .client
            .send_indication(peer, data, &mut buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e:?}")))?;
        self.link.send(buf.get(..n).unwrap_or_default())
    }

    /// The next relayed payload before `deadline` (other messages are skipped).
    pub fn recv_relayed(&mut self, deadline: Instant) -> io::Result<Option<Relayed>> {
        // Bounded by the deadline.
        loop {
            let Some(bytes) = self.link.recv(deadline)? else {
                return Ok(None);
            };
            let mut out = Vec::new();
            let now = self.now();
            match self.client.handle(now, &bytes, &mut out) {
                Event::ChannelData { data, .. } => {
                    return Ok(Some(Relayed {
                        channel: true,
                        data: data.to_vec(),
                    }));
                }
                Event::Data { data, .. } => {
                    return Ok(Some(Relayed {
                        channel: false,
                        data: data.to_vec(),
                    }));
                }
                _ => {}
            }
        }
    }
}
