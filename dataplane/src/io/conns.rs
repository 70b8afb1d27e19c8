//! Client connections over TCP and TLS (RFC 8656 §3.1, RFC 8489 §6.2), served by the
//! same workers as UDP.
//!
//! Each worker owns an SO_REUSEPORT listening socket on every TCP and TLS address and
//! the connections it accepted, so a connection's allocation lives on the worker that
//! owns the connection and both directions of its traffic stay on one core. A
//! connection's bytes go: (PROXY protocol header, if the listener expects one) → TLS
//! (rustls, sans-IO: `read_tls`/`process_new_packets`/`reader`) → the framer
//! (`core::framer::Framer`: STUN messages and ChannelData, padded over streams) → each
//! message, copied into a slot-sized scratch buffer, through the same sans-IO core as a
//! UDP datagram (`Core::handle_message`). Towards the client, everything (relayed data,
//! Binding answers, control-plane answers) goes into the connection's bounded send
//! queue (`core::framer::SendQueue`), through TLS when the connection has it; the
//! backend sends the queues of the connections marked dirty at the end of each turn.
//! Relaying to peers stays UDP, sent at once from the allocation's relay socket.
//!
//! Hostile and slow clients: a connection without a live allocation is closed after
//! [`StreamLimits::idle_ms`] (a slow-loris or a connection that never allocates), a TLS
//! handshake or PROXY header not complete after [`StreamLimits::handshake_ms`] is
//! closed, connections are capped in total and per source IP, TCP keepalive and
//! `TCP_USER_TIMEOUT` find half-open peers, and a client that does not read loses the
//! newest relayed messages once its send queue holds [`StreamLimits::send_buffer`]
//! bytes (counted; the worker never blocks and the queue never grows beyond it).
//! Malformed framing closes the connection with a log line and a counter.
//!
//! Half-close: at the end of the client's stream (FIN, or a TLS close_notify) the
//! connection is read no more but stays open until the answers to what the client sent
//! are sent, within bounds (`core::framer::HalfClose`); a reset closes it at once.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ahash::AHashMap;
use arc_swap::ArcSwap;
use socket2::{SockAddr, Socket, TcpKeepalive};

use crate::core::Token;
use crate::core::counters::{bump, bump_set};
use crate::core::framer::{Framer, HalfClose, SendQueue, Verdict};
use crate::core::proxy;
use crate::core::{Framed, HEADROOM, Output, RECV_CAP};
use crate::io::slab::Kind;
use crate::io::worker::{IoOp, Worker};
use crate::{FiveTuple, Transport};

/// Connections accepted per listener and loop turn before other sockets get their turn.
const ACCEPT_BATCH: usize = 64;
/// Reads per connection and loop turn (mmsg backend).
const READ_ROUNDS: usize = 4;
/// What TLS adds to a record at most (header, MAC/tag, padding): room kept in the send
/// queue before a message is encrypted.
const TLS_OVERHEAD: usize = 64;
/// Plaintext read out of a TLS session at a time.
const PLAIN: usize = 16 * 1024;
/// The ALPN protocol of TURN (RFC 7443).
const ALPN_TURN: &[u8] = b"stun.turn";
/// How long an accept that failed for lack of descriptors or memory pauses its listener.
const ACCEPT_BACKOFF_MS: u64 = 100;

/// A TCP or TLS listening address of the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamListen {
    /// The address (port 0: chosen once, the same for every worker).
    pub addr: SocketAddr,
    /// TLS on this listener (needs [`crate::DataPlaneConfig::tls`]).
    pub tls: bool,
    /// Every connection starts with a PROXY protocol v1 or v2 header (behind an L4
    /// load balancer): the client address is the header's source.
    pub proxy_protocol: bool,
}

/// Limits of client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Connections open at once, all workers together; more are refused.
    pub max_connections: usize,
    /// Connections open at once from one client IP; 0 turns the limit off.
    pub max_per_ip: usize,
    /// A connection without a live allocation for this long is closed (milliseconds).
    pub idle_ms: u64,
    /// A TLS handshake or PROXY header not complete after this long closes the
    /// connection (milliseconds).
    pub handshake_ms: u64,
    /// Bytes queued towards one client at most; what does not fit is dropped.
    pub send_buffer: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_connections: 10_000,
            max_per_ip: 64,
            idle_ms: 30_000,
            handshake_ms: 10_000,
            send_buffer: 256 * 1024,
        }
    }
}

/// What a TCP listening socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ListenerKind {
    pub(crate) tls: bool,
    pub(crate) proxy: bool,
}

/// What every worker shares about connections: the TLS configuration (swapped on
/// reload; a connection keeps the one it started with) and the connection counts.
#[derive(Debug)]
pub(crate) struct StreamShared {
    pub(crate) tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    pub(crate) limits: StreamLimits,
    pub(crate) legacy_channels: bool,
    open: AtomicUsize,
    per_ip: Mutex<AHashMap<IpAddr, usize>>,
    /// The current configuration without ALPN, for clients that offer ALPN protocols
    /// other than `stun.turn` (made once per configuration: (source, derived)).
    no_alpn: Mutex<Option<(Arc<rustls::ServerConfig>, Arc<rustls::ServerConfig>)>>,
}

impl StreamShared {
    pub(crate) fn new(
        tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
        limits: StreamLimits,
        legacy_channels: bool,
    ) -> StreamShared {
        StreamShared {
            tls,
            limits,
            legacy_channels,
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(AHashMap::new()),
            no_alpn: Mutex::new(None),
        }
    }

    /// The configuration for a ClientHello: as configured (ALPN `stun.turn`, RFC 7443)
    /// when the client offers `stun.turn` or no ALPN at all; without ALPN when it offers
    /// only other protocols, so that it is served rather than refused with
    /// `no_application_protocol`.
    fn config_for(
        &self,
        hello: &rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::ServerConfig>> {
        let cfg = self.tls.as_ref()?.load_full();
        let turn_or_none = hello
            .alpn()
            .is_none_or(|mut offered| offered.any(|p| p == ALPN_TURN));
        if turn_or_none || cfg.alpn_protocols.is_empty() {
            return Some(cfg);
        }
        let mut cache = self.no_alpn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((src, derived)) = cache.as_ref()
            && Arc::ptr_eq(src, &cfg)
        {
            return Some(Arc::clone(derived));
        }
        let mut plain = (*cfg).clone();
        plain.alpn_protocols.clear();
        let plain = Arc::new(plain);
        *cache = Some((cfg, Arc::clone(&plain)));
        Some(plain)
    }

    /// Counts a new connection against the total; `false` if it is full.
    fn admit(&self) -> bool {
        let max = self.limits.max_connections;
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        let _ = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Counts a connection of `ip`; `false` if that IP has its maximum already.
    fn admit_ip(&self, ip: IpAddr) -> bool {
        let max = self.limits.max_per_ip;
        if max == 0 {
            return true;
        }
        let mut m = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip.to_canonical()).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    fn release_ip(&self, ip: IpAddr) {
        if self.limits.max_per_ip == 0 {
            return;
        }
        let mut m = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let ip = ip.to_canonical();
        if let Some(n) = m.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

/// One client connection.
pub(crate) struct Conn {
    transport: Transport,
    peer: SocketAddr,
    local: SocketAddr,
    /// Set once the client address is known (at once, or after the PROXY header).
    tuple: Option<FiveTuple>,
    /// The PROXY header's bytes so far, while it is expected.
    proxy: Option<Vec<u8>>,
    /// Reading the ClientHello of a TLS connection (to pick its configuration).
    accepting: Option<Box<rustls::server::Acceptor>>,
    tls: Option<Box<rustls::ServerConnection>>,
    handshaken: bool,
    framer: Framer,
    pub(crate) out: SendQueue,
    opened: u64,
    /// When the connection last had a live allocation (or opened).
    idle_since: u64,
    /// The IP counted against the per-IP limit.
    ip: Option<IpAddr>,
    /// A request was punted for it: the control plane is told when it closes.
    punted: bool,
    /// Punted requests still to be answered, and the end of the client's stream once
    /// read: a connection that stopped reading closes when its answers are sent.
    half: HalfClose,
    /// In the worker's dirty list.
    dirty: bool,
    /// Waiting for the socket to become writable (mmsg backend).
    pub(crate) want_write: bool,
}

impl Conn {
    /// Whether the client may still send: no end of stream (FIN, TLS close_notify) yet.
    pub(crate) fn reading(&self) -> bool {
        self.half.reading()
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("transport", &self.transport)
            .field("peer", &self.peer)
            .field("tuple", &self.tuple)
            .finish_non_exhaustive()
    }
}

/// Datagrams relayed from client connections to peers, gathered while the frames of one
/// read are decided and sent together at its end: consecutive datagrams from one relay
/// socket to one peer go as UDP GSO segments (one syscall for up to [`MAX_SEGS`]), the
/// way the UDP path batches. A stream read often holds a burst of equal-size frames.
#[derive(Debug, Default)]
pub(crate) struct RelayBatch {
    data: Vec<u8>,
    runs: Vec<Run>,
}

/// Consecutive datagrams of a [`RelayBatch`]: `count` segments of `seg` bytes (the last
/// `last` bytes) at `start` of its data.
#[derive(Debug, Clone, Copy)]
struct Run {
    from: Token,
    to: SocketAddr,
    start: usize,
    seg: usize,
    count: usize,
    last: usize,
}

/// Segments per GSO send at most.
const MAX_SEGS: usize = crate::io::batch::MAX_SEGS;
/// Bytes per GSO send at most.
const MAX_GSO_BYTES: usize = 63 * 1024;

impl RelayBatch {
    /// Adds one datagram; `gso`: whether its socket may send GSO segments.
    fn push(&mut self, from: Token, to: SocketAddr, bytes: &[u8], gso: bool) {
        let start = self.data.len();
        self.data.extend_from_slice(bytes);
        if gso
            && let Some(r) = self.runs.last_mut()
            && r.from == from
            && r.to == to
            && r.last == r.seg
            && bytes.len() <= r.seg
            && r.count < MAX_SEGS
            && start - r.start + bytes.len() <= MAX_GSO_BYTES
        {
            r.count += 1;
            r.last = bytes.len();
            return;
        }
        self.runs.push(Run {
            from,
            to,
            start,
            seg: bytes.len(),
            count: 1,
            last: bytes.len(),
        });
    }
}

/// Why a connection is closed (the log line's words).
type CloseReason = &'static str;

/// Writes into a send queue what rustls has to send; refuses (WouldBlock) what does not
/// fit, which rustls then keeps until the next call.
struct QueueWriter<'a>(&'a mut SendQueue);

impl Write for QueueWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0.push(buf) {
            Ok(buf.len())
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Moves rustls's pending records into the queue.
fn pump_tls(tls: &mut rustls::ServerConnection, out: &mut SendQueue) {
    while tls.wants_write() {
        match tls.write_tls(&mut QueueWriter(out)) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// Queues one message towards the client (ChannelData padded to 4 bytes, RFC 8656
/// §12.5; STUN messages are multiples of 4 already); `false` if the queue is full.
fn write_message(
    tls: Option<&mut rustls::ServerConnection>,
    out: &mut SendQueue,
    msg: &[u8],
) -> bool {
    let pad = (4 - msg.len() % 4) % 4;
    match tls {
        None => out.push_padded(msg),
        Some(tls) => {
            if !out.would_fit(msg.len() + pad + TLS_OVERHEAD) {
                return false;
            }
            let mut w = tls.writer();
            if w.write_all(msg).is_err() || w.write_all(&[0u8; 3][..pad]).is_err() {
                return false;
            }
            pump_tls(tls, out);
            true
        }
    }
}

impl Worker {
    /// Connections are waiting on listener `t` (mmsg backend): accepts a batch.
    pub(crate) fn accept_ready(&mut self, t: Token) {
        for _ in 0..ACCEPT_BATCH {
            let r = match self.socks.get(t) {
                Some(e) => e.sock.accept(),
                None => return,
            };
            match r {
                Ok((sock, addr)) => match addr.as_socket() {
                    Some(peer) => self.on_accept(t, sock, peer),
                    None => bump(&self.ctr.streams.refused, 1),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    let _ = self.accept_failed(t, &e);
                    return;
                }
            }
        }
    }

    /// An accept on listener `t` failed: out of descriptors or memory pauses the
    /// listener briefly (it would fail again at once); other errors (the client gave up
    /// before it was accepted) are only counted. Returns whether the listener paused.
    pub(crate) fn accept_failed(&mut self, t: Token, e: &io::Error) -> bool {
        bump(&self.ctr.streams.accept_errors, 1);
        let pause = matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        );
        if pause {
            tracing::warn!(worker = self.id, error = %e, "accept failed; listener paused for {ACCEPT_BACKOFF_MS} ms");
            self.pause_listener(t, ACCEPT_BACKOFF_MS);
        } else {
            tracing::debug!(worker = self.id, error = %e, "accept failed");
        }
        pause
    }

    /// A connection accepted on listener `t` from `peer`.
    pub(crate) fn on_accept(&mut self, listener: Token, sock: Socket, peer: SocketAddr) {
        let Some(Kind::Listener(lk)) = self.socks.kind(listener) else {
            return;
        };
        self.admit_stream(lk, sock, peer);
    }

    /// A connection from `peer`, accepted by one of this worker's listeners of kind
    /// `lk` or handed over by the front door: counted against the limits, then served.
    pub(crate) fn admit_stream(&mut self, lk: ListenerKind, sock: Socket, peer: SocketAddr) {
        let transport = if lk.tls {
            Transport::Tls
        } else {
            Transport::Tcp
        };
        let shared = Arc::clone(&self.streams);
        if !shared.admit() {
            bump(&self.ctr.streams.refused, 1);
            if let Some(n) = self.refusals.admit_counting(self.now) {
                tracing::warn!(%peer, not_logged = n, "connection refused: connection limit reached");
            }
            return;
        }
        let ip = peer.ip();
        if !lk.proxy && !shared.admit_ip(ip) {
            shared.release();
            bump(&self.ctr.streams.refused, 1);
            if let Some(n) = self.refusals.admit_counting(self.now) {
                tracing::warn!(%peer, not_logged = n, "connection refused: per-IP connection limit reached");
            }
            return;
        }
        let release = |ip_counted: bool| {
            shared.release();
            if ip_counted {
                shared.release_ip(ip);
            }
        };
        if lk.tls && shared.tls.is_none() {
            release(!lk.proxy);
            bump(&self.ctr.streams.refused, 1);
            return;
        }
        let accepting = lk
            .tls
            .then(|| Box::new(rustls::server::Acceptor::default()));
        // Small messages must not wait for more (Nagle); dead peers are found by
        // keepalive, and unacknowledged data to a vanished peer times out.
        let _ = sock.set_nonblocking(true);
        let _ = sock.set_tcp_nodelay(true);
        let _ = sock.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(Duration::from_secs(30))
                .with_interval(Duration::from_secs(10))
                .with_retries(3),
        );
        let _ = sock.set_tcp_user_timeout(Some(Duration::from_secs(60)));
        let (t, local) = match self.socks.insert_kind(sock, Kind::Stream) {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "accepted connection dropped");
                release(!lk.proxy);
                return;
            }
        };
        let now = self.now.0;
        let mut conn = Conn {
            transport,
            peer,
            local,
            tuple: None,
            proxy: lk.proxy.then(Vec::new),
            accepting,
            tls: None,
            handshaken: !lk.tls,
            framer: Framer::new(RECV_CAP, shared.legacy_channels),
            out: SendQueue::new(shared.limits.send_buffer),
            opened: now,
            idle_since: now,
            ip: (!lk.proxy).then_some(ip),
            punted: false,
            half: HalfClose::default(),
            dirty: false,
            want_write: false,
        };
        if !lk.proxy {
            let tuple = FiveTuple {
                transport,
                client: peer,
                server: local,
            };
            if !self.core.conn_opened(t, tuple) {
                // Only a proxied address can collide; not here.
                release(true);
                self.socks.release(t);
                return;
            }
            conn.tuple = Some(tuple);
        }
        if let Some(e) = self.socks.get_mut(t) {
            e.stream = Some(Box::new(conn));
        }
        let c = &self.ctr.streams;
        match transport {
            Transport::Tls => bump(&c.accepted_tls, 1),
            _ => bump(&c.accepted_tcp, 1),
        }
        self.open_streams[usize::from(transport == Transport::Tls)] += 1;
        self.update_stream_gauges();
        self.io_ops.push(IoOp::Register(t));
    }

    fn update_stream_gauges(&self) {
        bump_set(&self.ctr.streams.open_tcp, self.open_streams[0]);
        bump_set(&self.ctr.streams.open_tls, self.open_streams[1]);
    }

    /// Connection `t` is readable or hung up (mmsg backend; `hangup`: EPOLLHUP or
    /// EPOLLERR): reads into `scratch` and handles what came; at the end of the stream
    /// stops reading (see [`HalfClose`]), on an error closes the connection.
    pub(crate) fn stream_readable(&mut self, t: Token, scratch: &mut [u8], hangup: bool) {
        for _ in 0..READ_ROUNDS {
            let r = match self.socks.get(t) {
                Some(e) if !e.closing => match e.stream.as_deref() {
                    Some(c) if !c.reading() => {
                        // No longer polled for input: only a hang-up (a reset) wakes
                        // it, and nothing can be sent on it any more.
                        if hangup {
                            self.close_stream(t, "connection error");
                        }
                        return;
                    }
                    _ => (&e.sock).read(scratch),
                },
                _ => return,
            };
            match r {
                Ok(0) => {
                    self.stream_read_closed(t);
                    return;
                }
                Ok(n) => {
                    self.on_stream_data(t, scratch.get(..n).unwrap_or_default());
                    // A TLS close_notify ends the reading too.
                    let reading = self
                        .socks
                        .get(t)
                        .and_then(|e| e.stream.as_deref())
                        .is_some_and(Conn::reading);
                    if n < scratch.len() || !reading {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close_stream(t, "connection error");
                    return;
                }
            }
        }
    }

    /// The client closed its side of connection `t` (end of stream), or reading failed
    /// (`error`: the connection is gone both ways).
    pub(crate) fn stream_eof(&mut self, t: Token, error: bool) {
        if error {
            self.close_stream(t, "connection error");
        } else {
            self.stream_read_closed(t);
        }
    }

    /// The client of connection `t` sends no more (TCP FIN, or a TLS close_notify): it
    /// is no longer read, and it closes once what it is owed is sent ([`HalfClose`]).
    /// Closing at once would lose the answers to its last requests (issue #25 N8).
    fn stream_read_closed(&mut self, t: Token) {
        let now = self.now.0;
        let Some(c) = self
            .socks
            .get_mut(t)
            .filter(|e| !e.closing)
            .and_then(|e| e.stream.as_deref_mut())
        else {
            return;
        };
        if c.half.read_closed(now) {
            self.io_ops.push(IoOp::StopReading(t));
        }
        // The flush that follows decides (`settle_stream`), even with nothing queued.
        self.mark_dirty(t);
    }

    /// A control-plane answer for the client of connection `t` is about to be queued.
    pub(crate) fn stream_answered(&mut self, t: Token) {
        let Some(c) = self.socks.get_mut(t).and_then(|e| e.stream.as_deref_mut()) else {
            return;
        };
        c.half.answered();
        if !c.reading() {
            // The last answer may let it close, even one its queue has no room for.
            self.mark_dirty(t);
        }
    }

    /// Closes connection `t` if its client stopped sending and it owes nothing more
    /// (or waited long enough: [`HalfClose::verdict`]). Called by the backends when a
    /// flush found nothing more to send, and by the once-a-second sweep.
    pub(crate) fn settle_stream(&mut self, t: Token) {
        let Some(e) = self.socks.get(t).filter(|e| !e.closing) else {
            return;
        };
        let Some(c) = e.stream.as_deref() else {
            return;
        };
        if c.reading() {
            return;
        }
        let drained = c.out.is_empty() && !c.tls.as_ref().is_some_and(|s| s.wants_write());
        let linger = self.streams.limits.idle_ms;
        if let Verdict::Close(reason) = c.half.verdict(self.now.0, drained, linger) {
            if !drained {
                bump(&self.ctr.streams.idle_closed, 1);
            }
            self.close_stream(t, reason);
        }
    }

    /// Bytes arrived on connection `t`.
    pub(crate) fn on_stream_data(&mut self, t: Token, data: &[u8]) {
        // Bytes that arrive after the worker decided to close, or after the client's
        // TLS close_notify, are ignored.
        let Some(mut conn) = self
            .socks
            .get_mut(t)
            .filter(|e| !e.closing && e.stream.as_deref().is_some_and(Conn::reading))
            .and_then(|e| e.stream.take())
        else {
            return;
        };
        let r = self.stream_input(t, &mut conn, data);
        let notified = !conn.reading();
        self.flush_relays();
        let queued = !conn.out.is_empty() || conn.tls.as_ref().is_some_and(|s| s.wants_write());
        if let Some(e) = self.socks.get_mut(t) {
            e.stream = Some(conn);
        }
        match r {
            Ok(()) => {
                if notified {
                    // A close_notify: the half-close of TLS.
                    self.stream_read_closed(t);
                } else if queued {
                    self.mark_dirty(t);
                }
            }
            Err(reason) => {
                // What the session still has to say (a TLS alert) goes first.
                self.flush_before_close(t);
                self.close_stream(t, reason);
            }
        }
    }

    fn stream_input(&mut self, t: Token, conn: &mut Conn, data: &[u8]) -> Result<(), CloseReason> {
        let mut data = data;
        if let Some(buf) = conn.proxy.as_mut() {
            // The header is at most a few hundred bytes: collect until it parses.
            let take = data.len().min(proxy::MAX_HEADER.saturating_sub(buf.len()));
            buf.extend_from_slice(data.get(..take).unwrap_or_default());
            match proxy::parse(buf) {
                Ok(proxy::Parsed::Incomplete) => {
                    if take < data.len() {
                        bump(&self.ctr.streams.framing_errors, 1);
                        return Err("PROXY header too long");
                    }
                    return Ok(());
                }
                Ok(proxy::Parsed::Header { len, addrs }) => {
                    if let Some((src, _)) = addrs {
                        let local = crate::core::table::canonical(conn.local);
                        let denied = self.core.denied.load();
                        let own = |a: &std::net::SocketAddr| *a == local || denied.has_exact(a);
                        if let Err(e) = proxy::check_source(src, own) {
                            bump(&self.ctr.streams.proxy_refused, 1);
                            tracing::debug!(peer = %conn.peer, declared = %src, error = %e, "PROXY header declares a source that cannot be a client");
                            return Err("PROXY header declares an impossible source");
                        }
                    }
                    let client = addrs.map_or(conn.peer, |(src, _)| src);
                    if !self.streams.admit_ip(client.ip()) {
                        bump(&self.ctr.streams.refused, 1);
                        return Err("per-IP connection limit reached");
                    }
                    conn.ip = Some(client.ip());
                    let tuple = FiveTuple {
                        transport: conn.transport,
                        client,
                        server: conn.local,
                    };
                    if !self.core.conn_opened(t, tuple) {
                        bump(&self.ctr.streams.refused, 1);
                        return Err("PROXY header names a client address already connected");
                    }
                    conn.tuple = Some(tuple);
                    // What followed the header in `buf`, then the rest of `data`.
                    let rest = buf.split_off(len.min(buf.len()));
                    conn.proxy = None;
                    data = data.get(take..).unwrap_or_default();
                    if !rest.is_empty() {
                        self.stream_bytes(t, conn, &rest)?;
                    }
                }
                Err(e) => {
                    if e.is_refusal() {
                        bump(&self.ctr.streams.proxy_refused, 1);
                    } else {
                        bump(&self.ctr.streams.framing_errors, 1);
                    }
                    tracing::debug!(peer = %conn.peer, error = %e, "bad PROXY protocol header");
                    return Err("bad PROXY protocol header");
                }
            }
        }
        if data.is_empty() {
            return Ok(());
        }
        self.stream_bytes(t, conn, data)
    }

    /// Bytes after the PROXY header: through TLS if the connection has it, then framed.
    fn stream_bytes(&mut self, t: Token, conn: &mut Conn, data: &[u8]) -> Result<(), CloseReason> {
        let mut rd = data;
        if conn.accepting.is_some() {
            self.accept_tls(conn, &mut rd)?;
            if rd.is_empty() {
                return Ok(());
            }
        }
        if conn.tls.is_none() {
            return self.frames(t, conn, rd);
        }
        let mut plain = std::mem::take(&mut self.plain);
        plain.resize(PLAIN, 0);
        let r = self.tls_bytes(t, conn, &mut rd, &mut plain);
        self.plain = plain;
        if let Some(tls) = conn.tls.as_deref_mut() {
            pump_tls(tls, &mut conn.out);
        }
        r
    }

    /// Reads a TLS connection's ClientHello and starts its session with the
    /// configuration it calls for; `rd` keeps what follows the ClientHello.
    fn accept_tls(&mut self, conn: &mut Conn, rd: &mut &[u8]) -> Result<(), CloseReason> {
        let Some(acc) = conn.accepting.as_mut() else {
            return Ok(());
        };
        let accepted = loop {
            if acc.read_tls(rd).is_err() {
                bump(&self.ctr.streams.tls_failures, 1);
                return Err("TLS input refused");
            }
            match acc.accept() {
                Ok(Some(a)) => break a,
                Ok(None) if rd.is_empty() => return Ok(()),
                Ok(None) => {}
                Err((e, mut alert)) => {
                    let _ = alert.write_all(&mut QueueWriter(&mut conn.out));
                    bump(&self.ctr.streams.tls_failures, 1);
                    tracing::debug!(peer = %conn.peer, error = %e, "TLS ClientHello refused");
                    return Err("TLS handshake failed");
                }
            }
        };
        conn.accepting = None;
        let Some(cfg) = self.streams.config_for(&accepted.client_hello()) else {
            return Err("TLS without a configuration");
        };
        match accepted.into_connection(cfg) {
            Ok(mut c) => {
                pump_tls(&mut c, &mut conn.out);
                conn.tls = Some(Box::new(c));
                Ok(())
            }
            Err((e, mut alert)) => {
                let _ = alert.write_all(&mut QueueWriter(&mut conn.out));
                bump(&self.ctr.streams.tls_failures, 1);
                tracing::debug!(peer = %conn.peer, error = %e, "TLS handshake failed");
                Err("TLS handshake failed")
            }
        }
    }

    fn tls_bytes(
        &mut self,
        t: Token,
        conn: &mut Conn,
        rd: &mut &[u8],
        plain: &mut [u8],
    ) -> Result<(), CloseReason> {
        loop {
            let Some(tls) = conn.tls.as_deref_mut() else {
                return Ok(());
            };
            if !rd.is_empty() && tls.read_tls(rd).is_err() {
                return Err("TLS input refused");
            }
            if let Err(e) = tls.process_new_packets() {
                pump_tls(tls, &mut conn.out);
                if !conn.handshaken {
                    bump(&self.ctr.streams.tls_failures, 1);
                    tracing::debug!(peer = %conn.peer, error = %e, "TLS handshake failed");
                    return Err("TLS handshake failed");
                }
                tracing::debug!(peer = %conn.peer, error = %e, "TLS error");
                return Err("TLS error");
            }
            if !conn.handshaken && !tls.is_handshaking() {
                conn.handshaken = true;
                bump(&self.ctr.streams.tls_handshakes, 1);
            }
            loop {
                let Some(tls) = conn.tls.as_deref_mut() else {
                    return Ok(());
                };
                let n = match tls.reader().read(plain) {
                    Ok(0) => {
                        // close_notify: the client sends no more, but may still read
                        // the answers to what it sent before (as after a TCP FIN).
                        conn.half.read_closed(self.now.0);
                        return Ok(());
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return Err("TLS stream ended without close_notify"),
                };
                self.frames(t, conn, plain.get(..n).unwrap_or_default())?;
            }
            if let Some(tls) = conn.tls.as_deref_mut() {
                pump_tls(tls, &mut conn.out);
            }
            if rd.is_empty() {
                return Ok(());
            }
        }
    }

    /// Cuts `data` into messages and handles each like a datagram.
    fn frames(&mut self, t: Token, conn: &mut Conn, data: &[u8]) -> Result<(), CloseReason> {
        let Some(tuple) = conn.tuple else {
            return Ok(());
        };
        let Conn {
            framer,
            out,
            tls,
            punted,
            half,
            ..
        } = conn;
        let mut outputs = std::mem::take(&mut self.outputs);
        let mut scratch = std::mem::take(&mut self.scratch);
        let ctr = Arc::clone(&self.ctr);
        let r = framer.feed(data, |frame| {
            let n = frame.len();
            let Some(dst) = scratch.get_mut(HEADROOM..HEADROOM + n) else {
                return;
            };
            dst.copy_from_slice(frame);
            let msg = Framed {
                conn: t,
                tuple,
                buf: &mut scratch,
                len: n,
                slot: 0,
            };
            self.core.handle_message(self.now, msg, &mut outputs);
            for o in outputs.drain(..) {
                match o {
                    Output::Transmit(tx) => {
                        let range = tx.start as usize..(tx.start + tx.len) as usize;
                        let Some(bytes) = scratch.get(range) else {
                            continue;
                        };
                        if tx.from == t {
                            if !write_message(tls.as_deref_mut(), out, bytes) {
                                bump(&ctr.streams.send_dropped, 1);
                            }
                        } else {
                            // Client → peer: UDP from the allocation's relay socket, sent
                            // with the others of this read (`flush_relays`).
                            match self.socks.get(tx.from) {
                                Some(e) => self.relay_batch.push(tx.from, tx.to, bytes, e.gso),
                                None => bump(&ctr.send_error, 1),
                            }
                        }
                    }
                    Output::Punt(p) => {
                        *punted = true;
                        half.punted();
                        self.sink.punt(p);
                    }
                    // Not produced by a client's message.
                    Output::Reply { .. } | Output::Close(_) | Output::DontFragment(_) => {}
                }
            }
        });
        self.outputs = outputs;
        self.scratch = scratch;
        match r {
            Ok(stats) => {
                if stats.oversize > 0 {
                    bump(&ctr.streams.oversize, stats.oversize as u64);
                }
                Ok(())
            }
            Err(e) => {
                bump(&ctr.streams.framing_errors, 1);
                tracing::debug!(worker = self.id, ?tuple, error = %e, "malformed framing");
                Err("malformed framing")
            }
        }
    }

    /// Sends the datagrams gathered in the relay batch: each run in one GSO send, or one
    /// by one where the kernel refuses GSO (then disabled for that socket).
    fn flush_relays(&mut self) {
        if self.relay_batch.runs.is_empty() {
            return;
        }
        let mut batch = std::mem::take(&mut self.relay_batch);
        for r in batch.runs.drain(..) {
            let end = r.start + r.seg * (r.count - 1) + r.last;
            let Some(bytes) = batch.data.get(r.start..end) else {
                continue;
            };
            let Some(e) = self.socks.get(r.from) else {
                bump(&self.ctr.send_error, r.count as u64);
                continue;
            };
            match crate::io::sys::send_segments(e.sock.as_fd(), &r.to, bytes, r.seg) {
                Ok(_) => {
                    if r.count > 1 {
                        bump(&self.ctr.gso_sends, 1);
                    }
                }
                Err(err) if crate::io::batch::gso_refused(self, r.from, r.count, &err) => {
                    // One at a time from the same bytes.
                    for chunk in bytes.chunks(r.seg) {
                        let ok = self
                            .socks
                            .get(r.from)
                            .is_some_and(|e| e.sock.send_to(chunk, &SockAddr::from(r.to)).is_ok());
                        if !ok {
                            bump(&self.ctr.send_error, 1);
                        }
                    }
                }
                Err(_) => bump(&self.ctr.send_error, r.count as u64),
            }
        }
        batch.data.clear();
        // Keep the buffers for the next read, unless a burst made them large.
        if batch.data.capacity() > 1 << 20 {
            batch.data = Vec::new();
        }
        self.relay_batch = batch;
    }

    /// The 5-tuple of connection `t`, once known.
    pub(crate) fn stream_tuple(&self, t: Token) -> Option<FiveTuple> {
        self.socks.get(t)?.stream.as_ref()?.tuple
    }

    /// Queues `msg` (a relayed datagram with its TURN header, a Binding answer or a
    /// control-plane answer) towards the client of connection `t`; `false` when it was
    /// dropped (a full queue: counted as `send_dropped`; or no such connection).
    pub(crate) fn stream_send(&mut self, t: Token, msg: &[u8]) -> bool {
        let ok = match self.socks.get_mut(t) {
            Some(e) if !e.closing => match e.stream.as_deref_mut() {
                Some(c) => write_message(c.tls.as_deref_mut(), &mut c.out, msg),
                None => false,
            },
            _ => {
                bump(&self.ctr.send_error, 1);
                return false;
            }
        };
        if ok {
            self.mark_dirty(t);
        } else {
            bump(&self.ctr.streams.send_dropped, 1);
        }
        ok
    }

    pub(crate) fn mark_dirty(&mut self, t: Token) {
        if let Some(c) = self.socks.get_mut(t).and_then(|e| e.stream.as_deref_mut())
            && !c.dirty
        {
            c.dirty = true;
            self.dirty.push(t);
        }
    }

    /// The connections with something to send since the last call.
    pub(crate) fn take_dirty(&mut self, into: &mut Vec<Token>) {
        into.clear();
        std::mem::swap(into, &mut self.dirty);
        for &t in into.iter() {
            if let Some(c) = self.socks.get_mut(t).and_then(|e| e.stream.as_deref_mut()) {
                c.dirty = false;
            }
        }
    }

    /// Sends what connection `t` has queued with plain `send` calls (mmsg backend);
    /// `Ok(true)` when all of it went, `Ok(false)` when the socket is full (wait for
    /// it to be writable).
    pub(crate) fn flush_stream(&mut self, t: Token) -> Result<bool, CloseReason> {
        let Some(e) = self.socks.get_mut(t) else {
            return Ok(true);
        };
        if e.closing {
            return Ok(true);
        }
        let Some(c) = e.stream.as_deref_mut() else {
            return Ok(true);
        };
        loop {
            if let Some(tls) = c.tls.as_deref_mut() {
                pump_tls(tls, &mut c.out);
            }
            let Some(bytes) = c.out.start() else {
                return Ok(true);
            };
            match e.sock.send_with_flags(bytes, libc::MSG_NOSIGNAL) {
                Ok(n) => c.out.complete(n),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    c.out.complete(0);
                    return Ok(false);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => c.out.complete(0),
                Err(_) => {
                    c.out.complete(0);
                    return Err("send failed");
                }
            }
        }
    }

    /// The next bytes to send on connection `t` (io_uring backend): the descriptor,
    /// and the queue's in-flight buffer, which stays put until [`Worker::stream_sent`].
    pub(crate) fn stream_send_start(
        &mut self,
        t: Token,
    ) -> Option<(std::os::fd::RawFd, *const u8, usize)> {
        use std::os::fd::AsRawFd;
        let e = self.socks.get_mut(t)?;
        if e.closing {
            return None;
        }
        let fd = e.sock.as_raw_fd();
        let c = e.stream.as_deref_mut()?;
        if let Some(tls) = c.tls.as_deref_mut() {
            pump_tls(tls, &mut c.out);
        }
        let bytes = c.out.start()?;
        Some((fd, bytes.as_ptr(), bytes.len()))
    }

    /// The send started by [`Worker::stream_send_start`] completed with `res` (bytes
    /// sent, or a negative errno).
    pub(crate) fn stream_sent(&mut self, t: Token, res: i32) {
        let Some(c) = self.socks.get_mut(t).and_then(|e| e.stream.as_deref_mut()) else {
            return;
        };
        if res >= 0 {
            c.out.complete(res as usize);
            if !c.out.is_empty() || c.tls.as_ref().is_some_and(|s| s.wants_write()) {
                self.mark_dirty(t);
            } else if !c.reading() {
                // The socket is the worker's alone again: a half-closed connection
                // whose last answer went may close now.
                self.settle_stream(t);
            }
        } else {
            c.out.complete(0);
            if -res == libc::EAGAIN || -res == libc::EINTR {
                self.mark_dirty(t);
            } else {
                self.close_stream(t, "send failed");
            }
        }
    }

    /// Best effort: what is queued (a TLS alert) goes out before a close.
    fn flush_before_close(&mut self, t: Token) {
        let _ = self.flush_stream(t);
    }

    /// Closes connection `t`: its allocation ends (the control plane is told), its
    /// counts are released, the backend lets go of the socket.
    pub(crate) fn close_stream(&mut self, t: Token, reason: CloseReason) {
        let Some(e) = self.socks.get_mut(t) else {
            return;
        };
        if e.closing || e.kind != Kind::Stream {
            return;
        }
        let Some(conn) = e.stream.as_deref() else {
            return;
        };
        let (tuple, ip, punted, transport, peer) =
            (conn.tuple, conn.ip, conn.punted, conn.transport, conn.peer);
        let mut out = std::mem::take(&mut self.outputs);
        if let Some(tuple) = tuple {
            let removed = self.core.conn_closed(t, &tuple, &mut out);
            if removed.is_some() || punted {
                self.sink.connection_closed(self.id, tuple);
            }
        }
        self.outputs = out;
        let out = std::mem::take(&mut self.outputs);
        self.act_control(out);
        self.streams.release();
        if let Some(ip) = ip {
            self.streams.release_ip(ip);
        }
        bump(&self.ctr.streams.closed, 1);
        let i = usize::from(transport == Transport::Tls);
        self.open_streams[i] = self.open_streams[i].saturating_sub(1);
        self.update_stream_gauges();
        tracing::debug!(worker = self.id, %peer, ?transport, reason, "connection closed");
        self.close(t);
    }

    /// Once a second: closes connections without a live allocation for too long, and
    /// those whose TLS handshake or PROXY header is late.
    pub(crate) fn sweep_streams(&mut self) {
        let now = self.now;
        let limits = self.streams.limits;
        let mut doomed: Vec<(Token, CloseReason)> = Vec::new();
        let mut half_closed = Vec::new();
        for t in self.socks.tokens().collect::<Vec<_>>() {
            let Some(e) = self.socks.get_mut(t) else {
                continue;
            };
            if e.kind != Kind::Stream || e.closing {
                continue;
            }
            let Some(c) = e.stream.as_deref_mut() else {
                continue;
            };
            if !c.reading() {
                half_closed.push(t);
            }
            let late = !c.handshaken || c.proxy.is_some();
            if late && now.0.saturating_sub(c.opened) >= limits.handshake_ms {
                if !c.handshaken {
                    bump(&self.ctr.streams.tls_failures, 1);
                }
                doomed.push((t, "handshake or PROXY header timed out"));
                continue;
            }
            let live = c.tuple.is_some_and(|tu| self.core.has_allocation(&tu, now));
            if live {
                c.idle_since = now.0;
            } else if now.0.saturating_sub(c.idle_since) >= limits.idle_ms {
                doomed.push((t, "no allocation within the idle timeout"));
            }
        }
        for (t, why) in doomed {
            bump(&self.ctr.streams.idle_closed, 1);
            self.close_stream(t, why);
        }
        // Their bounds (answers awaited, a client that does not read) pass with no
        // event of their own.
        for t in half_closed {
            self.settle_stream(t);
        }
    }
}
