//! TURN over TCP and TLS (RFC 8656 §3.1) on the generator's side. Over a stream, STUN
//! messages and ChannelData frames are delimited by their own length fields, and
//! ChannelData is padded to a multiple of four bytes in both directions (§12.5); the
//! peers stay UDP.
//!
//! [`Conn`] is one non-blocking client connection (with a rustls session for TLS);
//! [`handshakes`] drives many connections through Allocate (and CreatePermission and
//! ChannelBind) with `turnpike_proto::client::Client`; [`conn_rate`] measures new
//! connections + Allocate per second; [`relay()`] is `relay.rs`'s load with streams on
//! the client side. A stream never retransmits a request: a handshake that gets no
//! answer fails after [`HANDSHAKE_TIMEOUT`].

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
};
use rustls::pki_types::ServerName;
use serde::Serialize;
use turnpike_proto::DecodeError;
use turnpike_proto::channel::{ChannelData, Frame, next_frame};
use turnpike_proto::client::{AllocateOptions, Client, Event};

use crate::ServerArgs;
use crate::certs;
use crate::hs::CHANNEL;
use crate::net::{self, BATCH, MAX_GSO_SEGS, Receiver, Sender, Sent};
use crate::payload;
use crate::proc;
use crate::relay::{self, DRAIN, Dir, Extra, Meter, Mode, Progress};

/// How clients reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Datagrams (the default).
    Udp,
    /// TURN over TCP.
    Tcp,
    /// TURN over TLS over TCP.
    Tls,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }
}

/// The client side's transport, for `relay` and `conn`.
#[derive(Debug, Clone, Args)]
pub struct StreamArgs {
    /// How clients reach the server: udp, tcp or tls (RFC 8656 §3.1). `--server` is the
    /// server's address for that transport; the peers are UDP in every case.
    #[arg(long, value_enum, default_value_t = Transport::Udp)]
    pub transport: Transport,
    /// With `--transport tls`: the CA certificate (PEM) that signed the server's
    /// certificate, verified as a client would (`turnpike-bench certs` makes one).
    #[arg(long, conflicts_with = "pin")]
    pub ca: Option<PathBuf>,
    /// With `--transport tls`: accept only this server certificate (PEM) and skip the
    /// handshake signature check, so that the generator's core is not spent on ECDSA
    /// verification (what `compare --suite streams` does).
    #[arg(long)]
    pub pin: Option<PathBuf>,
}

impl StreamArgs {
    /// The TLS client configuration, with `--transport tls`.
    pub fn client_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>> {
        match (self.transport, &self.ca, &self.pin) {
            (Transport::Tls, Some(ca), _) => Ok(Some(certs::client_config(ca)?)),
            (Transport::Tls, None, Some(pin)) => Ok(Some(certs::pinned_client_config(pin)?)),
            (Transport::Tls, None, None) => bail!("--transport tls needs --ca or --pin"),
            _ => Ok(None),
        }
    }
}

/// Bytes read from a socket per call.
const READ_CHUNK: usize = 64 * 1024;
/// Plaintext receive buffer: a chunk's worth of frames plus a partial one.
const RX_CAP: usize = 4 * READ_CHUNK;
/// A handshake without an answer for this long fails (streams do not retransmit).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What one read from the socket gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Bytes arrived (this many of plaintext, possibly none for TLS records that
    /// carried only handshake messages).
    Read(usize),
    /// Nothing more to read now.
    WouldBlock,
    /// The server closed the connection (or sent close_notify).
    Eof,
}

/// One client connection: a non-blocking TCP socket, a rustls session for TLS, the
/// plaintext received and not yet framed, and the plaintext not yet taken by the
/// socket (or by rustls).
pub struct Conn {
    sock: TcpStream,
    tls: Option<Box<rustls::ClientConnection>>,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    /// Ciphertext read from the socket (TLS only).
    raw: Vec<u8>,
    tx: Vec<u8>,
    tx_off: usize,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("sock", &self.sock)
            .field("tls", &self.tls.is_some())
            .field("backlog", &self.backlog())
            .finish()
    }
}

impl Conn {
    /// Starts a non-blocking connect from `source` to `server` (loopback only), with a
    /// TLS session when `tls` is given. Requests may be queued at once: they leave when
    /// the connection (and the TLS handshake) is up.
    pub fn connect(
        server: SocketAddr,
        source: Ipv4Addr,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<Conn> {
        let to = net::v4(server)?;
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .context("socket")?;
        // The port is picked at connect time, for the whole 4-tuple (many client
        // addresses share the ephemeral range).
        setsockopt(&fd, sockopt::IpBindAddressNoPort, &true).context("IP_BIND_ADDRESS_NO_PORT")?;
        bind(
            fd.as_raw_fd(),
            &SockaddrIn::from(SocketAddrV4::new(source, 0)),
        )
        .with_context(|| format!("bind {source}"))?;
        setsockopt(&fd, sockopt::TcpNoDelay, &true).context("TCP_NODELAY")?;
        match connect(fd.as_raw_fd(), &SockaddrIn::from(to)) {
            Ok(()) | Err(Errno::EINPROGRESS) => {}
            Err(e) => return Err(e).with_context(|| format!("connect {to} from {source}")),
        }
        let tls = match tls {
            Some(cfg) => Some(Box::new(rustls::ClientConnection::new(
                cfg.clone(),
                ServerName::IpAddress(IpAddr::V4(*to.ip()).into()),
            )?)),
            None => None,
        };
        Ok(Conn {
            sock: TcpStream::from(fd),
            raw: if tls.is_some() {
                vec![0u8; READ_CHUNK]
            } else {
                Vec::new()
            },
            tls,
            rx: vec![0u8; RX_CAP],
            rx_start: 0,
            rx_end: 0,
            tx: Vec::with_capacity(READ_CHUNK),
            tx_off: 0,
        })
    }

    /// Queues bytes to send (call [`Conn::flush`]).
    pub fn queue(&mut self, bytes: &[u8]) {
        self.tx.extend_from_slice(bytes);
    }

    /// Queues a copy of `bytes` and returns it, to be stamped in place.
    pub fn queue_mut(&mut self, bytes: &[u8]) -> &mut [u8] {
        let at = self.tx.len();
        self.tx.extend_from_slice(bytes);
        &mut self.tx[at..]
    }

    /// Plaintext bytes queued and not yet taken by the socket (or rustls).
    pub fn backlog(&self) -> usize {
        self.tx.len() - self.tx_off
    }

    /// Whether anything waits for the socket to become writable.
    pub fn wants_out(&self) -> bool {
        self.backlog() > 0 || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Writes what the socket takes now.
    pub fn flush(&mut self) -> io::Result<()> {
        let Conn {
            sock,
            tls,
            tx,
            tx_off,
            ..
        } = self;
        match tls {
            None => {
                while *tx_off < tx.len() {
                    match sock.write(&tx[*tx_off..]) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => *tx_off += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Some(t) => loop {
                if *tx_off < tx.len() {
                    *tx_off += t.writer().write(&tx[*tx_off..])?;
                }
                if !t.wants_write() {
                    break;
                }
                match t.write_tls(sock) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            },
        }
        if *tx_off == tx.len() {
            tx.clear();
            *tx_off = 0;
        } else if *tx_off >= READ_CHUNK {
            tx.drain(..*tx_off);
            *tx_off = 0;
        }
        Ok(())
    }

    /// One read from the socket into the plaintext buffer (decrypted for TLS).
    pub fn fill(&mut self) -> io::Result<Fill> {
        if RX_CAP - self.rx_end < READ_CHUNK {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        let Conn {
            sock,
            tls,
            rx,
            rx_end,
            raw,
            ..
        } = self;
        let Some(t) = tls else {
            // With READ_CHUNK free bytes at least, a frame (at most 64 KiB + 4) always
            // fits after the compaction above.
            return match sock.read(&mut rx[*rx_end..]) {
                Ok(0) => Ok(Fill::Eof),
                Ok(n) => {
                    *rx_end += n;
                    Ok(Fill::Read(n))
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    Ok(Fill::WouldBlock)
                }
                Err(e) => Err(e),
            };
        };
        let n = match sock.read(raw) {
            Ok(0) => return Ok(Fill::Eof),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return Ok(Fill::WouldBlock);
            }
            Err(e) => return Err(e),
        };
        let mut data = &raw[..n];
        let before = *rx_end;
        let mut eof = false;
        while !data.is_empty() && !eof {
            if t.read_tls(&mut data)? == 0 {
                eof = true;
            }
            t.process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            // Less plaintext than ciphertext arrives, and READ_CHUNK bytes are free.
            loop {
                if *rx_end == RX_CAP {
                    break;
                }
                match t.reader().read(&mut rx[*rx_end..]) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(k) => *rx_end += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
        if t.wants_write() {
            self.flush()?;
        }
        Ok(if eof {
            Fill::Eof
        } else {
            Fill::Read(self.rx_end - before)
        })
    }

    /// The next complete STUN message or ChannelData frame (padding included) in the
    /// receive buffer, as a range for [`Conn::frame`]. An error means the stream is not
    /// TURN.
    pub fn next_frame(&mut self) -> Result<Option<Range<usize>>, DecodeError> {
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
            return Ok(None);
        }
        match next_frame(&self.rx[self.rx_start..self.rx_end])? {
            Frame::Complete(n) => {
                let r = self.rx_start..self.rx_start + n;
                self.rx_start += n;
                Ok(Some(r))
            }
            Frame::Incomplete(_) => Ok(None),
        }
    }

    /// A frame returned by [`Conn::next_frame`].
    pub fn frame(&self, r: Range<usize>) -> &[u8] {
        self.rx.get(r).unwrap_or(&[])
    }

    /// The negotiated TLS version, cipher suite and key exchange group.
    pub fn tls_info(&self) -> Option<String> {
        let t = self.tls.as_ref()?;
        Some(format!(
            "{:?}, {:?}, {:?}",
            t.protocol_version()?,
            t.negotiated_cipher_suite()?.suite(),
            t.negotiated_key_exchange_group()?.name()
        ))
    }

    /// Closes the connection: close_notify for TLS (best effort), then the socket.
    pub fn close(mut self) {
        if let Some(t) = self.tls.as_mut() {
            t.send_close_notify();
            let _ = self.flush();
        }
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Allocate,
    Permission,
    Channel,
    Done,
    Failed,
}

/// One client connection and its TURN state.
#[derive(Debug)]
pub struct Session {
    pub conn: Conn,
    pub client: Client,
    pub relay: Option<SocketAddr>,
    stage: Stage,
    started: Instant,
}

/// What to do with each new connection.
#[derive(Debug, Clone)]
pub struct Plan {
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// CreatePermission for this peer (and ChannelBind if `channel`); none: Allocate
    /// only.
    pub peer: Option<SocketAddr>,
    pub channel: bool,
    /// Handshakes to complete.
    pub count: usize,
    /// In flight at once.
    pub window: usize,
    /// Give up after this long.
    pub limit: Duration,
    /// Keep the connections (relay flows) or close each as soon as it is done.
    pub keep: bool,
    /// Client addresses, one per connection in turn.
    pub sources: Vec<Ipv4Addr>,
}

/// The outcome of a batch of handshakes.
#[derive(Debug)]
pub struct Outcome {
    pub sessions: Vec<Session>,
    pub completed: usize,
    pub failed: usize,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
    pub first_error: Option<String>,
    /// What the first TLS connection negotiated.
    pub tls: Option<String>,
}

/// Client addresses for connection-rate runs: many, so that neither a server's
/// per-address connection limit nor one address's ephemeral ports are what is
/// measured (clients come from many addresses in real deployments too).
pub fn many_sources() -> Vec<Ipv4Addr> {
    (2..=251).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect()
}

/// An event that borrows nothing (handshakes need no data events).
fn owned(ev: Event<'_>) -> Event<'static> {
    match ev {
        Event::Allocated {
            relayed,
            mapped,
            lifetime,
            reservation,
        } => Event::Allocated {
            relayed,
            mapped,
            lifetime,
            reservation,
        },
        Event::Refreshed { lifetime } => Event::Refreshed { lifetime },
        Event::PermissionCreated => Event::PermissionCreated,
        Event::ChannelBound { channel } => Event::ChannelBound { channel },
        Event::Failed {
            method,
            code,
            reason,
        } => Event::Failed {
            method,
            code,
            reason,
        },
        Event::TimedOut { method } => Event::TimedOut { method },
        Event::Retry => Event::Retry,
        Event::Data { .. } | Event::ChannelData { .. } | Event::None => Event::None,
    }
}

/// Drives `plan.count` new connections through their handshakes against `server`.
pub fn handshakes(server: SocketAddr, user: &ServerArgs, plan: &Plan) -> Result<Outcome> {
    crate::check_loopback(server)?;
    if plan.sources.is_empty() {
        bail!("no client source address");
    }
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let t0 = Instant::now();
    let ms = |t: Instant| t.duration_since(t0).as_millis() as u64;
    let mut slots: Vec<Option<Session>> = Vec::with_capacity(plan.count);
    let mut active: Vec<usize> = Vec::with_capacity(plan.window);
    let mut events = vec![EpollEvent::empty(); 256];
    let mut out = Vec::with_capacity(1500);
    let (mut completed, mut failed) = (0usize, 0usize);
    let mut first_error: Option<String> = None;
    let mut tls_info = None;
    let mut lat = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut last_scan = t0;
    let interest = EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT | EpollFlags::EPOLLET;
    loop {
        let now = Instant::now();
        if now.duration_since(t0) > plan.limit {
            break;
        }
        while active.len() < plan.window && slots.len() < plan.count {
            let idx = slots.len();
            let source = plan.sources[idx % plan.sources.len()];
            let mut conn = match Conn::connect(server, source, plan.tls.as_ref()) {
                Ok(c) => c,
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(format!("{e:#}"));
                    slots.push(None);
                    continue;
                }
            };
            let mut client = Client::new(&user.user, &user.password, 0x9E37_79B9 ^ idx as u64);
            client.allocate(ms(now), AllocateOptions::default(), &mut out)?;
            conn.queue(&out);
            let stage = match conn.flush() {
                Ok(()) => Stage::Allocate,
                Err(e) => {
                    first_error.get_or_insert(format!("send: {e}"));
                    Stage::Failed
                }
            };
            epoll.add(conn.as_fd(), EpollEvent::new(interest, idx as u64))?;
            slots.push(Some(Session {
                conn,
                client,
                relay: None,
                stage,
                started: now,
            }));
            active.push(idx);
        }
        if active.is_empty() {
            break;
        }
        let n = epoll.wait(&mut events, EpollTimeout::from(5u8))?;
        let now = Instant::now();
        for ev in events.iter().take(n) {
            let Some(Some(s)) = slots.get_mut(ev.data() as usize) else {
                continue;
            };
            if matches!(s.stage, Stage::Done | Stage::Failed) {
                continue;
            }
            if let Err(e) = service(s, plan, ms(now), &mut out) {
                s.stage = Stage::Failed;
                first_error.get_or_insert(format!("{e:#}"));
            }
        }
        if now.duration_since(last_scan) >= Duration::from_millis(10) {
            last_scan = now;
            for &idx in &active {
                if let Some(Some(s)) = slots.get_mut(idx)
                    && !matches!(s.stage, Stage::Done | Stage::Failed)
                    && now.duration_since(s.started) > HANDSHAKE_TIMEOUT
                {
                    first_error.get_or_insert(format!(
                        "no answer within {} s at stage {:?}",
                        HANDSHAKE_TIMEOUT.as_secs(),
                        s.stage
                    ));
                    s.stage = Stage::Failed;
                }
            }
        }
        let mut i = 0;
        while i < active.len() {
            let idx = active[i];
            let stage = slots
                .get(idx)
                .and_then(|s| s.as_ref())
                .map_or(Stage::Failed, |s| s.stage);
            if !matches!(stage, Stage::Done | Stage::Failed) {
                i += 1;
                continue;
            }
            active.swap_remove(i);
            let Some(slot) = slots.get_mut(idx) else {
                continue;
            };
            if let Some(s) = slot.as_ref() {
                let _ = epoll.delete(s.conn.as_fd());
                if stage == Stage::Done {
                    completed += 1;
                    lat.saturating_record(s.started.elapsed().as_micros() as u64);
                    if tls_info.is_none() {
                        tls_info = s.conn.tls_info();
                    }
                } else {
                    failed += 1;
                }
            }
            if (!plan.keep || stage == Stage::Failed)
                && let Some(s) = slot.take()
            {
                s.conn.close();
            }
        }
    }
    let elapsed = t0.elapsed();
    failed += active.len();
    let sessions = slots
        .into_iter()
        .flatten()
        .filter(|s| s.stage == Stage::Done)
        .collect();
    Ok(Outcome {
        sessions,
        completed,
        failed,
        elapsed,
        latency_us: lat,
        first_error,
        tls: tls_info,
    })
}

/// Reads what a handshaking connection has, answers it, and sends what is queued.
fn service(s: &mut Session, plan: &Plan, now_ms: u64, out: &mut Vec<u8>) -> Result<()> {
    loop {
        let fill = s.conn.fill().context("receive")?;
        while let Some(r) = s.conn.next_frame().context("framing")? {
            let ev = owned(s.client.handle(now_ms, s.conn.frame(r), out));
            step(s, ev, plan, now_ms, out)?;
        }
        match fill {
            Fill::Read(_) => {}
            Fill::WouldBlock => break,
            Fill::Eof => {
                if !matches!(s.stage, Stage::Done | Stage::Failed) {
                    bail!("the server closed the connection at stage {:?}", s.stage);
                }
                break;
            }
        }
    }
    s.conn.flush().context("send")?;
    Ok(())
}

/// Advances a session on a client event.
fn step(
    s: &mut Session,
    ev: Event<'static>,
    plan: &Plan,
    now_ms: u64,
    out: &mut Vec<u8>,
) -> Result<()> {
    match ev {
        Event::Retry => s.conn.queue(out),
        Event::Allocated { relayed, .. } => {
            s.relay = relayed.into_iter().find(SocketAddr::is_ipv4);
            match plan.peer {
                Some(peer) => {
                    s.client.create_permission(now_ms, &[peer], out)?;
                    s.conn.queue(out);
                    s.stage = Stage::Permission;
                }
                None => s.stage = Stage::Done,
            }
        }
        Event::PermissionCreated => match plan.peer {
            Some(peer) if plan.channel => {
                s.client.channel_bind(now_ms, CHANNEL, peer, out)?;
                s.conn.queue(out);
                s.stage = Stage::Channel;
            }
            _ => s.stage = Stage::Done,
        },
        Event::ChannelBound { .. } | Event::Refreshed { .. } => s.stage = Stage::Done,
        Event::Failed {
            method,
            code,
            reason,
        } => bail!("{method:?} failed: {code} {reason}"),
        Event::TimedOut { method } => bail!("{method:?} timed out"),
        _ => {}
    }
    Ok(())
}

/// Result of the `conn` subcommand: new connections + Allocate per second.
#[derive(Debug, Clone, Serialize)]
pub struct ConnReport {
    pub transport: Transport,
    pub completed: usize,
    pub failed: usize,
    pub seconds: f64,
    pub per_second: f64,
    /// From connect() to the Allocate success.
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    pub window: usize,
    /// Server CPU (all threads) over the run, in cores, and per completed connection.
    pub server_cpu_cores: Option<f64>,
    pub server_cpu_us_per_conn: Option<f64>,
    /// The generator's CPU over the run, in cores (1.0: it was the bottleneck), and
    /// per completed connection.
    pub generator_cpu_cores: f64,
    pub generator_cpu_us_per_conn: Option<f64>,
    /// Run-queue wait of the server's threads and of the generator, as a share of the
    /// run (another task on their cores).
    pub server_rq_wait: f64,
    pub generator_rq_wait: f64,
    /// TLS version, cipher suite and key exchange group negotiated.
    pub tls: Option<String>,
    pub first_error: Option<String>,
    /// The server's side of its connections a second after the run, by TCP state
    /// (filled in by the harness): all of them should be gone.
    pub server_sockets_after: BTreeMap<String, usize>,
}

impl ConnReport {
    pub fn summary(&self) -> String {
        format!(
            "conn {}: {} connections (connect{}, Allocate 401, Allocate, close) in {:.2} s = {:.0}/s, {} failed, p50 {} us p99 {} us (window {}){}{}{}",
            self.transport.name(),
            self.completed,
            if self.transport == Transport::Tls {
                ", TLS handshake"
            } else {
                ""
            },
            self.seconds,
            self.per_second,
            self.failed,
            self.latency_p50_us,
            self.latency_p99_us,
            self.window,
            self.server_cpu_us_per_conn
                .map(|c| format!(
                    "; CPU per connection: server {c:.0} us, generator {:.0} us ({:.0}% of its core)",
                    self.generator_cpu_us_per_conn.unwrap_or(f64::NAN),
                    self.generator_cpu_cores * 100.0
                ))
                .unwrap_or_default(),
            self.tls
                .as_ref()
                .map(|t| format!("; {t}"))
                .unwrap_or_default(),
            self.first_error
                .as_ref()
                .map(|e| format!("; first error: {e}"))
                .unwrap_or_default()
        )
    }
}

/// New connections per second: connect (from many loopback addresses), the TLS
/// handshake (full, no resumption), Allocate, 401, Allocate, success, close.
pub fn conn_rate(
    server: SocketAddr,
    user: &ServerArgs,
    tls: Option<Arc<rustls::ClientConfig>>,
    count: usize,
    window: usize,
    limit: Duration,
    server_pid: Option<u32>,
) -> Result<ConnReport> {
    let transport = if tls.is_some() {
        Transport::Tls
    } else {
        Transport::Tcp
    };
    let plan = Plan {
        tls,
        peer: None,
        channel: false,
        count,
        window,
        limit,
        keep: false,
        sources: many_sources(),
    };
    let me = std::process::id();
    let cpu0 = server_pid.map(proc::cpu_seconds).transpose()?;
    let srv_sched0 = server_pid.map(proc::sched).transpose()?;
    let gen_sched0 = proc::sched(me)?;
    let gen_cpu0 = proc::cpu_seconds(me)?;
    let o = handshakes(server, user, &plan)?;
    let gen_cpu = proc::cpu_seconds(me)? - gen_cpu0;
    let secs = o.elapsed.as_secs_f64().max(1e-9);
    let cpu = match (server_pid, cpu0) {
        (Some(pid), Some(c0)) => Some(proc::cpu_seconds(pid)? - c0),
        _ => None,
    };
    let srv_wait = match (server_pid, srv_sched0) {
        (Some(pid), Some(s0)) => (proc::sched(pid)?.1 - s0.1) / secs,
        _ => 0.0,
    };
    Ok(ConnReport {
        transport,
        completed: o.completed,
        failed: o.failed,
        seconds: secs,
        per_second: o.completed as f64 / secs,
        latency_p50_us: o.latency_us.value_at_quantile(0.5),
        latency_p99_us: o.latency_us.value_at_quantile(0.99),
        window,
        server_cpu_cores: cpu.map(|c| c / secs),
        server_cpu_us_per_conn: cpu
            .filter(|_| o.completed > 0)
            .map(|c| c * 1e6 / o.completed as f64),
        generator_cpu_cores: gen_cpu / secs,
        generator_cpu_us_per_conn: (o.completed > 0).then(|| gen_cpu * 1e6 / o.completed as f64),
        server_rq_wait: srv_wait,
        generator_rq_wait: (proc::sched(me)?.1 - gen_sched0.1) / secs,
        tls: o.tls,
        first_error: o.first_error,
        server_sockets_after: BTreeMap::new(),
    })
}

/// What happened on the client connections of a relay run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamStats {
    /// Bursts the generator held back during the measured window because the
    /// connection's send backlog was full: the server did not read fast enough.
    pub blocked_bursts: u64,
    /// Connections that the server closed, or that failed, during the run.
    pub closed: usize,
    pub first_error: Option<String>,
    /// TLS version, cipher suite and key exchange group negotiated.
    pub tls: Option<String>,
}

/// Most plaintext a flow queues beyond what the socket took; past it, the flow sends
/// nothing new (backpressure, counted in [`StreamStats::blocked_bursts`]).
const MAX_BACKLOG: usize = 64 * 1024;
/// Epoll token of the peer socket.
const PEER: u64 = u64::MAX;
/// Slot size of a datagram in the down send buffer.
const SLOT: usize = 2048;
/// Reads per ready connection and loop turn.
const RX_ROUNDS: usize = 4;
/// recvmmsg rounds on the peer socket per turn.
const PEER_ROUNDS: usize = 4;

struct Flow {
    conn: Conn,
    client: Client,
    relay_sa: SockaddrIn,
    /// The up frame (ChannelData with padding), the payload at offset 4.
    up: Vec<u8>,
    /// The down payload (peer → relay).
    down: Vec<u8>,
    seq_up: u64,
    seq_down: u64,
    want_out: bool,
    closed: bool,
}

/// The relay load over TCP or TLS: `cfg.clients` connections, each with an
/// allocation and a channel to the generator's UDP peer socket; ChannelData both ways
/// at `cfg.rate` per direction (or as fast as the loop goes).
pub fn relay(cfg: &relay::Config) -> Result<relay::Report> {
    net::v4(cfg.server.server)?;
    let peer_bind = net::v4(cfg.peer)?;
    if cfg.mode != Mode::Channel {
        bail!("over TCP and TLS, only ChannelData is relayed");
    }
    if cfg.transport == Transport::Tls && cfg.tls.is_none() {
        bail!("TLS without a client configuration");
    }
    if cfg.size < payload::MIN_PAYLOAD || cfg.size + 8 > SLOT {
        bail!("--size must be {}..={}", payload::MIN_PAYLOAD, SLOT - 8);
    }
    if cfg.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let burst = cfg.burst.clamp(1, MAX_GSO_SEGS);
    let peer_sock = net::udp(SocketAddr::V4(peer_bind), cfg.buffer, cfg.gro)?;
    let peer_addr = peer_sock.local_addr()?;

    let plan = Plan {
        tls: cfg.tls.clone(),
        peer: Some(peer_addr),
        channel: true,
        count: cfg.clients,
        window: cfg.clients.min(64),
        limit: Duration::from_secs(20),
        keep: true,
        sources: vec![Ipv4Addr::LOCALHOST],
    };
    let o = handshakes(cfg.server.server, &cfg.server, &plan)?;
    if o.sessions.len() < cfg.clients {
        bail!(
            "only {} of {} allocations over {} succeeded: {}",
            o.sessions.len(),
            cfg.clients,
            cfg.transport.name(),
            o.first_error.unwrap_or_default()
        );
    }
    let mut flows = Vec::with_capacity(o.sessions.len());
    for (i, s) in o.sessions.into_iter().enumerate() {
        let relay = net::v4(
            s.relay
                .context("allocation without an IPv4 relay address")?,
        )?;
        let p = payload::template(cfg.size, i as u32);
        let mut up = vec![0u8; SLOT];
        let len = ChannelData {
            channel: CHANNEL,
            payload: &p,
        }
        .encode(&mut up, true)?;
        up.truncate(len);
        flows.push(Flow {
            conn: s.conn,
            client: s.client,
            relay_sa: net::sockaddr(relay),
            up,
            down: p,
            seq_up: 0,
            seq_down: 0,
            want_out: false,
            closed: false,
        });
    }
    let n = flows.len();
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    epoll.add(
        peer_sock.as_fd(),
        EpollEvent::new(EpollFlags::EPOLLIN, PEER),
    )?;
    for (i, f) in flows.iter().enumerate() {
        epoll.add(
            f.conn.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, i as u64),
        )?;
    }
    let mut events = vec![EpollEvent::empty(); n + 1];
    let mut rx = Receiver::new(cfg.gro);
    let mut tx = Sender::default();
    let mut dbuf = vec![0u8; SLOT * BATCH];
    let mut out = Vec::with_capacity(256);
    let mut up = Dir::new()?;
    let mut down = Dir::new()?;
    let mut stats = StreamStats {
        tls: o.tls,
        ..StreamStats::default()
    };
    let gen_port = peer_addr.port();
    let relay_ports: Vec<u16> = flows
        .iter()
        .map(|f| SocketAddrV4::from(f.relay_sa).port())
        .collect();
    let drops0 = proc::udp_drops()?;

    let mut m = Meter::new(cfg);
    let mut rr_up = 0usize;
    let mut rr_down = 0usize;
    let mut progress = Progress::default();
    loop {
        let now = Instant::now();
        let el = m.tick(now, &mut up, &mut down)?;
        let sending = el < m.end;
        if !sending && el >= m.end + DRAIN {
            break;
        }
        let mut did = 0u64;
        if sending {
            // Up: a burst of frames per connection in turn, one write each.
            let mut quota = due_now(cfg.rate, el, up.sent, burst);
            let mut guard = n;
            while quota > 0 && guard > 0 {
                guard -= 1;
                let fi = rr_up % n;
                rr_up = rr_up.wrapping_add(1);
                let f = &mut flows[fi];
                if f.closed {
                    continue;
                }
                if f.conn.backlog() >= MAX_BACKLOG {
                    if m.measuring() {
                        stats.blocked_bursts += 1;
                    }
                    continue;
                }
                let b = (quota as usize).min(burst);
                let now_ns = m.ns(Instant::now());
                for _ in 0..b {
                    let frame = f.conn.queue_mut(&f.up);
                    if let Some(p) = frame.get_mut(4..4 + cfg.size) {
                        payload::stamp(p, f.seq_up, now_ns);
                    }
                    f.seq_up += 1;
                }
                up.sent += b as u64;
                did += b as u64;
                quota -= b as u64;
                if let Err(e) = f.conn.flush() {
                    close_flow(&epoll, f, &mut stats, format!("send: {e}"));
                } else if f.conn.wants_out() && !f.want_out {
                    f.want_out = true;
                    epoll.modify(
                        f.conn.as_fd(),
                        &mut EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT, fi as u64),
                    )?;
                }
            }
            // Down: the peer socket → each flow's relay address.
            let mut quota = due_now(cfg.rate, el, down.sent, burst);
            while quota > 0 {
                let sent = send_down(
                    cfg,
                    &mut flows,
                    &mut rr_down,
                    quota as usize,
                    burst,
                    &peer_sock,
                    &mut dbuf,
                    &mut tx,
                    m.ns(Instant::now()),
                )?;
                down.sent += sent as u64;
                did += sent as u64;
                if sent == 0 {
                    break;
                }
                quota = quota.saturating_sub(sent as u64);
            }
        }

        let k = epoll.wait(&mut events, EpollTimeout::ZERO)?;
        for ev in events.iter().take(k) {
            let tok = ev.data();
            if tok == PEER {
                for _ in 0..PEER_ROUNDS {
                    let got = rx.recv(&peer_sock)?;
                    if got == 0 {
                        break;
                    }
                    did += got as u64;
                    let now_ns = m.ns(Instant::now());
                    for r in rx.meta.iter() {
                        if r.len > r.seg {
                            up.coalesced += r.len.div_ceil(r.seg) as u64;
                        }
                        for chunk in rx.data(r).chunks(r.seg) {
                            if let Some(st) = payload::read(chunk) {
                                up.record(now_ns, st.ts_ns);
                            }
                        }
                    }
                    if got < BATCH {
                        break;
                    }
                }
                continue;
            }
            let Some(f) = flows.get_mut(tok as usize) else {
                continue;
            };
            if f.closed {
                continue;
            }
            let flags = ev.events();
            if flags.contains(EpollFlags::EPOLLOUT) {
                if let Err(e) = f.conn.flush() {
                    close_flow(&epoll, f, &mut stats, format!("send: {e}"));
                    continue;
                }
                if !f.conn.wants_out() {
                    f.want_out = false;
                    epoll.modify(
                        f.conn.as_fd(),
                        &mut EpollEvent::new(EpollFlags::EPOLLIN, tok),
                    )?;
                }
            }
            if !flags.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR)
            {
                continue;
            }
            let mut why = None;
            for _ in 0..RX_ROUNDS {
                let fill = match f.conn.fill() {
                    Ok(x) => x,
                    Err(e) => {
                        why = Some(format!("receive: {e}"));
                        break;
                    }
                };
                let now_ns = m.ns(Instant::now());
                loop {
                    let r = match f.conn.next_frame() {
                        Ok(Some(r)) => r,
                        Ok(None) => break,
                        Err(e) => {
                            why = Some(format!("framing: {e}"));
                            break;
                        }
                    };
                    let frame = f.conn.frame(r);
                    if let Some(0x40..=0x4F) = frame.first() {
                        did += 1;
                        match ChannelData::parse(frame) {
                            Ok(cd) => {
                                if let Some(st) = payload::read(cd.payload) {
                                    down.record(now_ns, st.ts_ns);
                                }
                            }
                            Err(e) => {
                                why = Some(format!("bad ChannelData frame: {e}"));
                                break;
                            }
                        }
                    } else {
                        // STUN from the server (nothing is outstanding; a stray answer).
                        let _ = f.client.handle(0, frame, &mut out);
                    }
                }
                match fill {
                    _ if why.is_some() => break,
                    Fill::Read(_) => {}
                    Fill::WouldBlock => break,
                    Fill::Eof => {
                        why = Some("the server closed the connection".into());
                        break;
                    }
                }
            }
            if let Some(w) = why {
                close_flow(&epoll, f, &mut stats, w);
            }
        }
        if did > 0 {
            m.add_busy(now);
        }
        if cfg.progress {
            progress.tick(el, m.measuring(), &up, &down);
        }
    }
    let drops1 = proc::udp_drops()?;
    let gen_drops = proc::drops_between(&drops0, &drops1, |p| p == gen_port);
    let srv_drops = proc::drops_between(&drops0, &drops1, |p| relay_ports.contains(&p));
    for f in flows {
        // Closing the connection deletes its allocation (RFC 8656 §3.1).
        f.conn.close();
    }
    m.report(
        cfg,
        &up,
        &down,
        Extra {
            clients: n,
            burst,
            server_socket_drops: srv_drops,
            generator_socket_drops: gen_drops,
            stream: Some(stats),
        },
    )
}

fn close_flow(epoll: &Epoll, f: &mut Flow, stats: &mut StreamStats, why: String) {
    let _ = epoll.delete(f.conn.as_fd());
    f.closed = true;
    stats.closed += 1;
    stats.first_error.get_or_insert(why);
}

/// Datagrams due in one direction now, in whole bursts (as `relay.rs` paces them).
fn due_now(rate: u64, el: Duration, sent: u64, burst: usize) -> u64 {
    relay::due_now(rate, el, sent, burst)
}

/// Sends up to `quota` datagrams from the peer socket, bursts of `burst` to each
/// open flow's relay address in turn (one GSO message per burst unless the generator's
/// GSO is off), in one sendmmsg; returns how many went out.
#[allow(clippy::too_many_arguments)]
fn send_down(
    cfg: &relay::Config,
    flows: &mut [Flow],
    rr: &mut usize,
    quota: usize,
    burst: usize,
    sock: &std::net::UdpSocket,
    buf: &mut [u8],
    tx: &mut Sender,
    now_ns: u64,
) -> Result<usize> {
    let n = flows.len();
    let quota = quota.min(buf.len() / SLOT);
    // Messages of this call: (flow, first slot, datagrams).
    let mut plan: Vec<(usize, usize, usize)> = Vec::with_capacity(BATCH);
    let mut used = 0;
    let mut guard = n;
    while used < quota && plan.len() < BATCH && guard > 0 {
        let fi = *rr % n;
        *rr = rr.wrapping_add(1);
        let f = &mut flows[fi];
        if f.closed {
            guard -= 1;
            continue;
        }
        guard = n;
        let mut b = burst.min(quota - used);
        if !cfg.gen_gso {
            b = b.min(BATCH - plan.len());
        }
        for i in 0..b {
            let at = (used + i) * SLOT;
            let slot = &mut buf[at..at + f.down.len()];
            slot.copy_from_slice(&f.down);
            payload::stamp(slot, f.seq_down + i as u64, now_ns);
        }
        f.seq_down += b as u64;
        if cfg.gen_gso {
            plan.push((fi, used, b));
        } else {
            plan.extend((0..b).map(|i| (fi, used + i, 1)));
        }
        used += b;
    }
    if plan.is_empty() {
        return Ok(0);
    }
    let len = cfg.size;
    let iovs: Vec<io::IoSlice<'_>> = buf
        .chunks(SLOT)
        .take(used)
        .map(|s| io::IoSlice::new(&s[..len]))
        .collect();
    let groups: Vec<&[io::IoSlice<'_>]> = plan.iter().map(|&(_, a, k)| &iovs[a..a + k]).collect();
    let to: Vec<Option<SockaddrIn>> = plan
        .iter()
        .map(|&(fi, _, _)| Some(flows[fi].relay_sa))
        .collect();
    let seg = cfg.gen_gso.then_some(len as u16);
    Ok(match tx.send(sock, &groups, &to, seg)? {
        Sent::Messages(k) => plan[..k].iter().map(|p| p.2).sum(),
        Sent::WouldBlock => 0,
    })
}
