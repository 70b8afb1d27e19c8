//! TURN over TCP and TLS from the client side (RFC 8656 §3.1, §12.5; RFC 8489 §6.2.2):
//! a framer that cuts STUN messages and padded ChannelData out of a byte stream, and a
//! client over any `Read + Write` that drives the sans-IO [`Client`].
//!
//! The framer is written here, independently of the server's, so that a framing bug on
//! either side shows up as a test failure rather than cancelling out.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use turnpike_proto::attr::{ErrorCode, XorMappedAddress};
use turnpike_proto::client::{AllocateOptions, Client, Event};
use turnpike_proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

use super::Outcome;

/// How long a read on a test stream blocks before the caller's deadline is checked again.
pub const POLL: Duration = Duration::from_millis(50);
/// How long a transaction may take over a stream (no retransmissions on a reliable
/// transport: RFC 8489 §6.2.2).
pub const TRANSACTION: Duration = Duration::from_secs(10);

/// One message cut from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Framed {
    /// A whole STUN message, or a ChannelData header and payload without its padding.
    pub bytes: Vec<u8>,
    /// The padding bytes that followed a ChannelData message (0 for STUN).
    pub padding: usize,
}

impl Framed {
    /// Whether this is a ChannelData message.
    pub fn is_channel_data(&self) -> bool {
        matches!(self.bytes.first(), Some(0x40..=0x7F))
    }
}

/// Rounds `n` up to a multiple of four.
pub fn padded(n: usize) -> usize {
    n.div_ceil(4) * 4
}

/// Cuts the first message out of `buf`: `Ok(None)` until it is complete, `Err` when the
/// first byte starts neither a STUN message nor ChannelData. Returns the message and the
/// bytes it took (padding included).
pub fn cut(buf: &[u8]) -> Result<Option<(Framed, usize)>, String> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let be16 = |at: usize| -> Option<usize> {
        Some(usize::from(u16::from_be_bytes([
            *buf.get(at)?,
            *buf.get(at + 1)?,
        ])))
    };
    match first {
        0x00..=0x3F => {
            let Some(len) = be16(2) else { return Ok(None) };
            let total = 20 + len;
            if buf.len() < total {
                return Ok(None);
            }
            Ok(Some((
                Framed {
                    bytes: buf[..total].to_vec(),
                    padding: 0,
                },
                total,
            )))
        }
        0x40..=0x7F => {
            let Some(len) = be16(2) else { return Ok(None) };
            let end = 4 + len;
            let total = padded(end);
            if buf.len() < total {
                return Ok(None);
            }
            Ok(Some((
                Framed {
                    bytes: buf[..end].to_vec(),
                    padding: total - end,
                },
                total,
            )))
        }
        b => Err(format!("the server sent a frame starting with {b:#04x}")),
    }
}

/// A ChannelData message for a stream: header, payload, zero padding to a multiple of 4.
pub fn channel_data_padded(channel: u16, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(padded(4 + data.len()));
    m.extend_from_slice(&channel.to_be_bytes());
    m.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
    m.extend_from_slice(data);
    m.resize(padded(m.len()), 0);
    m
}

/// A Binding request with transaction id `tid`.
pub fn binding_request(tid: [u8; 12]) -> Vec<u8> {
    let mut buf = vec![0u8; 64];
    let mut w = MessageWriter::new(
        &mut buf,
        Method::BINDING,
        Class::Request,
        TransactionId(tid),
    )
    .unwrap();
    w.add_fingerprint().unwrap();
    let n = w.finish();
    buf.truncate(n);
    buf
}

/// What the server relayed to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relayed {
    /// ChannelData on `channel`.
    Channel { channel: u16, data: Vec<u8> },
    /// A Data indication from `peer`.
    Data { peer: SocketAddr, data: Vec<u8> },
}

impl Relayed {
    /// The application data, however it came.
    pub fn data(&self) -> &[u8] {
        match self {
            Relayed::Channel { data, .. } | Relayed::Data { data, .. } => data,
        }
    }
}

/// How a connection ended, as seen by a reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The server closed it (EOF, reset, or a TLS close) after this long.
    Closed(Duration),
    /// Still open when the limit passed.
    Open,
}

/// A TURN client over a byte stream (`TcpStream`, or a rustls `StreamOwned`). The
/// underlying socket must have a short read timeout ([`POLL`]) so that every wait is
/// bounded; bytes read are buffered, so a timeout never loses part of a message.
pub struct TurnStream<S: Read + Write> {
    pub io: S,
    pub client: Client,
    rx: Vec<u8>,
    start: Instant,
    /// The last message from the server that answered a transaction.
    pub last: Vec<u8>,
    /// XOR-MAPPED-ADDRESS of the last successful Allocate.
    pub mapped: Option<SocketAddr>,
    /// ChannelData messages received, and the padding bytes that followed them.
    pub channel_frames: usize,
    pub padding_bytes: usize,
}

/// A TCP connection to `server` with [`POLL`] as read timeout and TCP_NODELAY.
pub fn tcp_connect(server: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&server, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {server}: {e}"));
    s.set_read_timeout(Some(POLL)).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

impl TurnStream<TcpStream> {
    /// TURN over TCP to `server`.
    pub fn tcp(server: SocketAddr, user: &str, password: &str) -> TurnStream<TcpStream> {
        TurnStream::over(tcp_connect(server), user, password)
    }

    /// Our end of the connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.io.local_addr().unwrap()
    }
}

impl<S: Read + Write> TurnStream<S> {
    /// A client over `io`, which must already have a short read timeout.
    pub fn over(io: S, user: &str, password: &str) -> TurnStream<S> {
        TurnStream {
            io,
            client: Client::new(user, password, super::rand_seed()),
            rx: Vec::new(),
            start: Instant::now(),
            last: Vec::new(),
            mapped: None,
            channel_frames: 0,
            padding_bytes: 0,
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Writes `bytes` and flushes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes)?;
        self.io.flush()
    }

    /// The next message from the server: `Ok(None)` if none came within `timeout`, an
    /// `UnexpectedEof` error once the server has closed the connection, `InvalidData`
    /// when it sent something that is not TURN framing.
    pub fn next_frame(&mut self, timeout: Duration) -> io::Result<Option<Framed>> {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match cut(&self.rx) {
                Ok(Some((frame, used))) => {
                    self.rx.drain(..used);
                    if frame.is_channel_data() {
                        self.channel_frames += 1;
                        self.padding_bytes += frame.padding;
                    }
                    return Ok(Some(frame));
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            match self.io.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.rx.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `req` (the first request of the client's outstanding transaction) and runs
    /// the transaction to its end, answering a 401/438 once.
    pub fn finish(&mut self, req: Vec<u8>) -> Outcome {
        if self.send_raw(&req).is_err() {
            return Outcome::TimedOut;
        }
        self.outcome()
    }

    /// Runs the outstanding transaction, whose request has been sent, to its end.
    pub fn outcome(&mut self) -> Outcome {
        let deadline = Instant::now() + TRANSACTION;
        while Instant::now() < deadline {
            let frame = match self.next_frame(POLL) {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(_) => return Outcome::TimedOut,
            };
            let now = self.now();
            let mut out = Vec::new();
            let event = self.client.handle(now, &frame.bytes, &mut out);
            match event {
                Event::Retry => {
                    self.last = frame.bytes;
                    if self.send_raw(&out).is_err() {
                        return Outcome::TimedOut;
                    }
                }
                Event::Allocated {
                    relayed, mapped, ..
                } => {
                    self.mapped = mapped;
                    self.last = frame.bytes.clone();
                    return Outcome::Allocated(relayed);
                }
                Event::Refreshed { .. } | Event::PermissionCreated | Event::ChannelBound { .. } => {
                    self.last = frame.bytes.clone();
                    return Outcome::Ok;
                }
                Event::Failed { code, .. } => {
                    self.last = frame.bytes.clone();
                    return Outcome::Failed(code);
                }
                Event::TimedOut { .. } => return Outcome::TimedOut,
                // Relayed data or a stray message while a transaction runs: not ours.
                _ => {}
            }
        }
        Outcome::TimedOut
    }

    /// Allocates (a 401 first, then success with credentials).
    pub fn allocate(&mut self) -> Outcome {
        let req = self.allocate_request();
        self.finish(req)
    }

    /// Allocates, checking that the server first challenges the unauthenticated request
    /// with a 401 carrying REALM and NONCE; returns the relayed addresses.
    pub fn allocate_after_challenge(&mut self) -> Result<Vec<SocketAddr>, String> {
        let req = self.authenticated_allocate()?;
        match self.finish(req) {
            Outcome::Allocated(r) => Ok(r),
            other => Err(format!("authenticated Allocate: {other:?}")),
        }
    }

    /// Sends an unauthenticated Allocate, checks that the server challenges it with a
    /// 401 carrying REALM and NONCE, and returns the authenticated retry without sending
    /// it (for a test that sends it its own way; [`TurnStream::outcome`] reads its
    /// answer).
    pub fn authenticated_allocate(&mut self) -> Result<Vec<u8>, String> {
        let req = self.allocate_request();
        self.send_raw(&req).map_err(|e| format!("write: {e}"))?;
        let frame = self
            .next_frame(TRANSACTION)
            .map_err(|e| format!("read: {e}"))?
            .ok_or("no answer to the first Allocate")?;
        let m = Message::parse(&frame.bytes).map_err(|e| format!("{e:?}: {:02x?}", frame.bytes))?;
        let code = m.attr::<ErrorCode>().ok().flatten().map(|e| e.code);
        if m.class() != Class::Error || code != Some(401) {
            return Err(format!(
                "first Allocate answered with {:?} {code:?}, not 401",
                m.class()
            ));
        }
        let mut out = Vec::new();
        let now = self.now();
        if self.client.handle(now, &frame.bytes, &mut out) != Event::Retry {
            return Err("the 401 did not lead to a retry (no REALM/NONCE?)".into());
        }
        Ok(out)
    }

    /// Starts an Allocate and returns its first request without sending it.
    pub fn allocate_request(&mut self) -> Vec<u8> {
        let mut req = Vec::new();
        let now = self.now();
        self.client
            .allocate(now, AllocateOptions::default(), &mut req)
            .unwrap();
        req
    }

    pub fn refresh(&mut self, lifetime: u32) -> Outcome {
        let mut req = Vec::new();
        let now = self.now();
        self.client.refresh(now, lifetime, &mut req).unwrap();
        self.finish(req)
    }

    pub fn permit(&mut self, peer: SocketAddr) -> Outcome {
        let mut req = Vec::new();
        let now = self.now();
        self.client
            .create_permission(now, &[peer], &mut req)
            .unwrap();
        self.finish(req)
    }

    pub fn bind(&mut self, channel: u16, peer: SocketAddr) -> Outcome {
        let mut req = Vec::new();
        let now = self.now();
        self.client
            .channel_bind(now, channel, peer, &mut req)
            .unwrap();
        self.finish(req)
    }

    /// Sends `data` on `channel`, padded as a stream requires.
    pub fn send_channel(&mut self, channel: u16, data: &[u8]) -> io::Result<()> {
        self.send_raw(&channel_data_padded(channel, data))
    }

    /// Sends `data` to `peer` in a Send indication.
    pub fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) -> io::Result<()> {
        let mut buf = vec![0u8; data.len() + 128];
        let n = self.client.send_indication(peer, data, &mut buf).unwrap();
        self.send_raw(&buf[..n])
    }

    /// The next relayed message (ChannelData or Data indication), bounded in time;
    /// other messages are skipped. `Err` if the connection ended or went bad.
    pub fn recv_relayed(&mut self, timeout: Duration) -> io::Result<Option<Relayed>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(frame) = self.next_frame(left)? else {
                return Ok(None);
            };
            let mut out = Vec::new();
            match self.client.handle(0, &frame.bytes, &mut out) {
                Event::ChannelData { channel, data } => {
                    return Ok(Some(Relayed::Channel {
                        channel,
                        data: data.to_vec(),
                    }));
                }
                Event::Data { peer, data } => {
                    return Ok(Some(Relayed::Data {
                        peer,
                        data: data.to_vec(),
                    }));
                }
                _ => {}
            }
        }
    }

    /// The payload of the next relayed message, if one came within `timeout`.
    pub fn recv_data(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        self.recv_relayed(timeout)
            .ok()
            .flatten()
            .map(|r| r.data().to_vec())
    }

    /// Sends a Binding request; returns the XOR-MAPPED-ADDRESS of its success response.
    pub fn binding(&mut self) -> Result<SocketAddr, String> {
        let tid: [u8; 12] = *b"streamtestbd";
        self.send_raw(&binding_request(tid))
            .map_err(|e| format!("write: {e}"))?;
        self.binding_answer(tid)
    }

    /// Reads up to the answer to the Binding request `tid` (sent already); returns the
    /// XOR-MAPPED-ADDRESS of its success response.
    pub fn binding_answer(&mut self, tid: [u8; 12]) -> Result<SocketAddr, String> {
        let deadline = Instant::now() + TRANSACTION;
        while Instant::now() < deadline {
            let frame = match self.next_frame(POLL) {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(e) => return Err(format!("no Binding response: {e}")),
            };
            let Ok(m) = Message::parse(&frame.bytes) else {
                continue;
            };
            if m.transaction_id() != TransactionId(tid) || m.method() != Method::BINDING {
                continue;
            }
            if m.class() != Class::Success {
                return Err(format!("Binding answered with class {:?}", m.class()));
            }
            return match m.attr::<XorMappedAddress>() {
                Ok(Some(a)) => Ok(a.0),
                other => Err(format!("no XOR-MAPPED-ADDRESS: {other:?}")),
            };
        }
        Err("no Binding response in time".into())
    }

    /// Reads (and discards) until the server closes the connection or `limit` passes.
    pub fn wait_closed(&mut self, limit: Duration) -> Ended {
        let t = Instant::now();
        let mut chunk = [0u8; 4096];
        while t.elapsed() < limit {
            match self.io.read(&mut chunk) {
                Ok(0) => return Ended::Closed(t.elapsed()),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => return Ended::Closed(t.elapsed()),
            }
        }
        Ended::Open
    }
}

/// Payload number `i` of a sequence of odd sizes (1, 3, 5, 7, 1001, then odd sizes up to
/// 1199), with recognisable content.
pub fn odd_payload(i: usize) -> Vec<u8> {
    let len = match i {
        0..=3 => 2 * i + 1,
        4 => 1001,
        _ => 1 + 2 * ((i * 37) % 600),
    };
    (0..len)
        .map(|k| (k as u8).wrapping_mul(31) ^ (i as u8))
        .collect()
}
