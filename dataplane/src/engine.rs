//! What a worker does, whatever its I/O backend: the socket slab, the relay table, the
//! per-datagram forwarding decision and the control commands.
//!
//! A backend receives each datagram into a buffer slot of [`SLOT`] bytes with the
//! payload starting at [`HEADROOM`], calls [`Core::on_datagram`], and sends the [`Out`]s
//! it produced: each names a byte range of that same slot (the payload, with any header
//! written in place in front of it), so nothing is copied in user space.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, mpsc};

use ahash::AHashMap;
use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use turnpike_proto::attr::{ErrorCode, UnknownAttributes};
use turnpike_proto::channel::{CHANNEL_HEADER_LEN, ChannelData};
use turnpike_proto::demux::{PacketKind, classify};
use turnpike_proto::stun::{Class, Message, MessageWriter, Method, TransactionId, padded};
use turnpike_proto::turn::{
    MAX_DATA_INDICATION_HEADER, SendIndication, data_indication_header_len, write_binding_response,
    write_data_indication_header,
};

use crate::counters::{Counters, bump};
use crate::limit::Limiter;
use crate::sys;
use crate::{
    AllocationId, AllocationSnapshot, BindError, BindingLimit, ControlSink, FiveTuple, Millis,
    Punted, TableChange, Usage,
};

/// Bytes reserved in front of every received payload for the header written in place.
pub(crate) const HEADROOM: usize = MAX_DATA_INDICATION_HEADER;
/// Bytes kept free after the largest payload for a Data indication's padding.
pub(crate) const TAILROOM: usize = 4;
/// One receive buffer.
pub(crate) const SLOT: usize = 4096;
/// The largest datagram received whole.
pub(crate) const RECV_CAP: usize = SLOT - HEADROOM - TAILROOM;
/// Relay sockets bound but not claimed by an `AllocationAdd` for this long are closed.
pub(crate) const UNCLAIMED_BIND_MS: u64 = 30_000;
/// How often expired entries are swept.
pub(crate) const SWEEP_MS: u64 = 1_000;

/// What the bandwidth limit charges per datagram on top of its application bytes: the
/// IP and UDP headers of the datagram sent to `to`, so that empty datagrams are not free.
pub(crate) const fn wire_overhead(to: &SocketAddr) -> usize {
    match to {
        SocketAddr::V4(_) => 20 + 8,
        SocketAddr::V6(_) => 40 + 8,
    }
}

/// Whether a datagram the control plane sends is a ChannelBind success response.
fn is_channel_bind_success(d: &[u8]) -> bool {
    Message::parse(d)
        .is_ok_and(|m| (m.method(), m.class()) == (Method::CHANNEL_BIND, Class::Success))
}

/// Answers a Binding request (RFC 8489 §7.3) into `out`: the success response, or a
/// 420 with a short reason phrase so that the answer to a request with unknown
/// comprehension-required attributes (each at least 4 bytes of the request, at most
/// [`turnpike_proto::stun::MAX_UNKNOWN`] listed) is at most 24 bytes larger than the
/// request, as the success response to an IPv6 source is: an unauthenticated answer
/// must not amplify much.
fn write_binding_answer(
    out: &mut [u8],
    req: &Message<'_>,
    mapped: SocketAddr,
) -> Result<usize, turnpike_proto::error::EncodeError> {
    let unknown = req.unknown_required();
    if unknown.is_empty() {
        return write_binding_response(out, req, mapped);
    }
    let mut w = MessageWriter::new(out, Method::BINDING, Class::Error, req.transaction_id())?;
    w.add(&ErrorCode {
        code: 420,
        reason: "Unknown",
    })?;
    w.add(&UnknownAttributes::new(unknown))?;
    if req.has_fingerprint() {
        w.add_fingerprint()?;
    }
    Ok(w.finish())
}

/// Unix time in milliseconds.
pub(crate) fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A socket's index in its worker's slab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Token(pub(crate) u32);

/// A datagram to send: `len` bytes at `start` in receive slot `slot`, from socket `from`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Out {
    pub(crate) from: Token,
    pub(crate) to: SocketAddr,
    pub(crate) slot: u32,
    pub(crate) start: u32,
    pub(crate) len: u32,
    /// Order of production, to keep per-socket order when outputs are grouped.
    pub(crate) seq: u32,
}

/// A socket change the backend must reflect in its poller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoOp {
    /// Start receiving on this socket.
    Register(Token),
    /// Stop receiving and call [`Sockets::release`] once the kernel holds no more
    /// reference to the socket's pending operations.
    Close(Token),
}

/// Who a relay socket belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// Bound by `bind`, not yet claimed by an `AllocationAdd`.
    Pending,
    /// Claimed by this allocation.
    Alloc(AllocationId),
}

/// What a socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A listening socket clients send to.
    Listen,
    /// An allocation's relay socket peers send to.
    Relay(Owner),
}

/// One socket of the worker.
#[derive(Debug)]
pub(crate) struct SockEntry {
    pub(crate) sock: Socket,
    pub(crate) local: SocketAddr,
    pub(crate) role: Role,
    /// UDP GSO may be used (probed at creation, cleared when the kernel refuses).
    pub(crate) gso: bool,
    /// Closed by the table; the backend still has to let go of it.
    pub(crate) closing: bool,
}

/// The worker's sockets, indexed by [`Token`].
#[derive(Debug, Default)]
pub(crate) struct Sockets {
    entries: Vec<Option<SockEntry>>,
    free: Vec<u32>,
}

impl Sockets {
    fn insert(&mut self, e: SockEntry) -> Token {
        match self.free.pop() {
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
        }
    }

    pub(crate) fn get(&self, t: Token) -> Option<&SockEntry> {
        self.entries.get(t.0 as usize).and_then(Option::as_ref)
    }

    pub(crate) fn get_mut(&mut self, t: Token) -> Option<&mut SockEntry> {
        self.entries.get_mut(t.0 as usize).and_then(Option::as_mut)
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

/// A token bucket in milli-bytes, so that refills are exact at millisecond steps.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    milli: u64,
    last: u64,
}

impl Bucket {
    fn full(rate: u64, now: u64) -> Bucket {
        Bucket {
            milli: rate.saturating_mul(1000),
            last: now,
        }
    }

    /// Takes `n` bytes at `rate` bytes/s (burst one second's worth); `false` when empty.
    fn take(&mut self, rate: u64, now: u64, n: usize) -> bool {
        if rate == 0 {
            return true;
        }
        let cap = rate.saturating_mul(1000);
        let elapsed = now.saturating_sub(self.last);
        self.milli = cap.min(self.milli.saturating_add(rate.saturating_mul(elapsed)));
        self.last = self.last.max(now);
        let want = (n as u64).saturating_mul(1000);
        if self.milli >= want {
            self.milli -= want;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
struct Alloc {
    tuple: FiveTuple,
    relays: Vec<SocketAddr>,
    relay_tokens: Vec<Token>,
    relay_v4: Option<Token>,
    relay_v6: Option<Token>,
    /// The listening socket the client uses.
    listen: Option<Token>,
    deadline: u64,
    bandwidth: u64,
    user: String,
    username: String,
    /// DONT-FRAGMENT was asked: its relay sockets send with DF set.
    dont_fragment: bool,
    perms: AHashMap<IpAddr, u64>,
    /// Bound channels by number; see [`Channel`] for when the peer → client direction
    /// may use them.
    channels: AHashMap<u16, Channel>,
    peer_channel: AHashMap<SocketAddr, u16>,
    up: Bucket,
    down: Bucket,
    usage: Usage,
}

/// A bound channel.
///
/// Client → peer, a channel forwards as soon as it is installed. Peer → client, a
/// channel installed by a new [`TableChange::ChannelSet`] starts unconfirmed and the peer's
/// data goes out as Data indications (which every client accepts) until the worker has
/// sent this allocation's client a ChannelBind success response; then it goes out as
/// ChannelData. Some clients (libnice) drop ChannelData on a channel whose bind they
/// have not seen confirmed, and the control plane installs the channel before it
/// answers, so forwarding ChannelData at once would lose the first burst of a call.
/// A `ChannelSet` for the same number and the same peer (a refresh) keeps the state; a
/// channel already in the table when the data plane reattaches to a control plane stays
/// as it was (those the control plane restores from the `Hello` are not reinstalled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Channel {
    peer: SocketAddr,
    deadline: u64,
    /// The client has been sent a ChannelBind success response since it was installed.
    confirmed: bool,
}

impl Alloc {
    /// Whether a permission for `ip` is installed and live; counts the drop if not.
    fn permits(&self, ip: &IpAddr, now: u64, ctr: &Counters) -> bool {
        match self.perms.get(ip) {
            None => {
                bump(&ctr.no_permission, 1);
                false
            }
            Some(&d) if now >= d => {
                bump(&ctr.expired, 1);
                false
            }
            Some(_) => true,
        }
    }

    fn relay_for(&self, peer: &SocketAddr) -> Option<Token> {
        match peer {
            SocketAddr::V4(_) => self.relay_v4,
            SocketAddr::V6(_) => self.relay_v6,
        }
    }
}

/// Relay sockets bound for a 5-tuple, waiting for their `AllocationAdd`.
#[derive(Debug)]
struct PendingBind {
    relays: Vec<SocketAddr>,
    tokens: Vec<Token>,
    since: u64,
}

/// A request from the handle to a worker.
pub(crate) enum Command {
    /// Send a control-plane datagram to a client.
    Send { tuple: FiveTuple, data: Vec<u8> },
    /// Bind relay sockets.
    Bind {
        tuple: FiveTuple,
        relays: Vec<SocketAddr>,
        done: Box<dyn FnOnce(Result<(), BindError>) + Send>,
    },
    /// Apply table changes.
    Apply(Vec<TableChange>),
    /// Report every allocation.
    Snapshot(mpsc::Sender<Vec<AllocationSnapshot>>),
    /// Stop.
    Shutdown,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Send { tuple, data } => write!(f, "Send({tuple:?}, {} bytes)", data.len()),
            Command::Bind { tuple, relays, .. } => write!(f, "Bind({tuple:?}, {relays:?})"),
            Command::Apply(c) => write!(f, "Apply({} changes)", c.len()),
            Command::Snapshot(_) => f.write_str("Snapshot"),
            Command::Shutdown => f.write_str("Shutdown"),
        }
    }
}

/// Peers the data plane never relays to.
#[derive(Debug, Default)]
pub(crate) struct Denied {
    exact: ahash::AHashSet<SocketAddr>,
    /// (is IPv6, port) of denied wildcard addresses: any IP of that family on that port.
    any_ip: Vec<(bool, u16)>,
}

impl Denied {
    pub(crate) fn new(addrs: impl IntoIterator<Item = SocketAddr>) -> Denied {
        let mut d = Denied::default();
        for a in addrs {
            let a = canonical(a);
            if a.ip().is_unspecified() {
                d.any_ip.push((a.is_ipv6(), a.port()));
            } else {
                d.exact.insert(a);
            }
        }
        d
    }

    /// Whether `a` (canonical) is denied. An unspecified IP (0.0.0.0, ::) is always
    /// denied: sent to, it reaches this host.
    pub(crate) fn contains(&self, a: &SocketAddr) -> bool {
        a.ip().is_unspecified()
            || self.exact.contains(a)
            || self
                .any_ip
                .iter()
                .any(|&(v6, port)| v6 == a.is_ipv6() && port == a.port())
    }
}

/// The address with an IPv4-mapped IPv6 IP turned into IPv4.
pub(crate) fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
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

/// A worker's state apart from its I/O backend.
pub(crate) struct Core {
    pub(crate) id: usize,
    /// Accept RFC 5766 channel numbers (0x5000..=0x7FFF) as well.
    legacy_channels: bool,
    pub(crate) socks: Sockets,
    pub(crate) ctr: Arc<Counters>,
    pub(crate) io_ops: Vec<IoOp>,
    /// The coarse clock, read once per batch.
    pub(crate) now: u64,
    rx: mpsc::Receiver<Command>,
    sink: Arc<dyn ControlSink>,
    denied: Arc<ArcSwap<Denied>>,
    buffers: usize,
    listens: Vec<(SocketAddr, Token)>,
    allocs: AHashMap<AllocationId, Alloc>,
    by_tuple: AHashMap<FiveTuple, AllocationId>,
    pending: AHashMap<FiveTuple, Vec<PendingBind>>,
    next_sweep: u64,
    tid_state: u64,
    /// Binding answers per source.
    binding_limit: Limiter,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("id", &self.id)
            .field("allocs", &self.allocs.len())
            .finish_non_exhaustive()
    }
}

/// Everything a worker starts with.
pub(crate) struct CoreInit {
    pub(crate) id: usize,
    pub(crate) listen: Vec<Socket>,
    pub(crate) rx: mpsc::Receiver<Command>,
    pub(crate) sink: Arc<dyn ControlSink>,
    pub(crate) denied: Arc<ArcSwap<Denied>>,
    pub(crate) ctr: Arc<Counters>,
    pub(crate) buffers: usize,
    pub(crate) legacy_channels: bool,
    pub(crate) binding_limit: BindingLimit,
}

impl Core {
    pub(crate) fn new(init: CoreInit) -> io::Result<Core> {
        let now = unix_millis();
        let mut core = Core {
            id: init.id,
            legacy_channels: init.legacy_channels,
            socks: Sockets::default(),
            ctr: init.ctr,
            io_ops: Vec::with_capacity(64),
            now,
            rx: init.rx,
            sink: init.sink,
            denied: init.denied,
            buffers: init.buffers,
            listens: Vec::new(),
            allocs: AHashMap::new(),
            by_tuple: AHashMap::new(),
            pending: AHashMap::new(),
            next_sweep: now + SWEEP_MS,
            binding_limit: Limiter::new(&init.binding_limit),
            tid_state: 0x9E37_79B9_7F4A_7C15
                ^ (init.id as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9)
                ^ now,
        };
        for sock in init.listen {
            let local = sock
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("listening socket without an IP address"))?;
            let gso = sys::gso_supported(sock.as_fd());
            let t = core.socks.insert(SockEntry {
                sock,
                local,
                role: Role::Listen,
                gso,
                closing: false,
            });
            core.listens.push((local, t));
            core.io_ops.push(IoOp::Register(t));
        }
        Ok(core)
    }

    fn listen_token(&self, local: &SocketAddr) -> Option<Token> {
        self.listens
            .iter()
            .find(|(a, _)| a == local)
            .map(|&(_, t)| t)
    }

    fn next_tid(&mut self) -> TransactionId {
        // xorshift64*: transaction ids of Data indications need only be unlikely to
        // repeat, not unpredictable.
        let mut next = || {
            let mut x = self.tid_state;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.tid_state = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let a = next().to_ne_bytes();
        let b = next().to_ne_bytes();
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&a);
        t[8..].copy_from_slice(&b[..4]);
        TransactionId(t)
    }

    /// Decides what to do with a datagram of `len` bytes received on `token` from `src`
    /// into `buf` (one slot, payload at [`HEADROOM`]); pushes at most one [`Out`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_datagram(
        &mut self,
        token: Token,
        src: SocketAddr,
        buf: &mut [u8],
        len: usize,
        truncated: bool,
        slot: u32,
        outs: &mut Vec<Out>,
    ) {
        bump(&self.ctr.received, 1);
        if truncated || len > RECV_CAP || buf.len() < SLOT {
            bump(&self.ctr.malformed, 1);
            return;
        }
        let Some(entry) = self.socks.get(token) else {
            return;
        };
        let local = entry.local;
        let out = match entry.role {
            Role::Listen => self.client_datagram(token, FiveTuple::udp(src, local), buf, len),
            Role::Relay(Owner::Alloc(id)) => self.peer_datagram(id, src, buf, len),
            Role::Relay(Owner::Pending) => {
                bump(&self.ctr.no_allocation, 1);
                None
            }
        };
        if let Some((from, to, start, n)) = out {
            let seq = outs.len() as u32;
            outs.push(Out {
                from,
                to,
                slot,
                start: start as u32,
                len: n as u32,
                seq,
            });
        }
    }

    fn max_channel(&self) -> u16 {
        if self.legacy_channels {
            turnpike_proto::attr::CHANNEL_MAX_LEGACY
        } else {
            turnpike_proto::attr::CHANNEL_MAX
        }
    }

    /// Client → peer (or the worker's own answer). Returns (socket, destination, start,
    /// length).
    fn client_datagram(
        &mut self,
        listen: Token,
        tuple: FiveTuple,
        buf: &mut [u8],
        len: usize,
    ) -> Option<(Token, SocketAddr, usize, usize)> {
        let pkt = buf.get(HEADROOM..HEADROOM + len)?;
        let kind = match (classify(pkt), pkt.first()) {
            (PacketKind::Other, Some(0x50..=0x7F)) if self.legacy_channels => {
                PacketKind::ChannelData
            }
            (k, _) => k,
        };
        match kind {
            PacketKind::ChannelData => {
                let Ok(cd) = ChannelData::parse_up_to(pkt, self.max_channel()) else {
                    bump(&self.ctr.malformed, 1);
                    return None;
                };
                let (channel, n) = (cd.channel, cd.payload.len());
                let a = self.live_alloc_by_tuple(&tuple)?;
                let Some(&Channel { peer, deadline, .. }) = a.channels.get(&channel) else {
                    bump(&self.ctr.no_channel, 1);
                    return None;
                };
                if self.now >= deadline {
                    bump(&self.ctr.expired, 1);
                    return None;
                }
                // A channel's peer needs a live permission too (RFC 8656 §12), and the
                // server's own sockets are never peers, whatever the table says.
                if !a.permits(&peer.ip(), self.now, &self.ctr) {
                    return None;
                }
                if self.denied.load().contains(&peer) {
                    bump(&self.ctr.denied_peer, 1);
                    return None;
                }
                let from = self.admit_to_peer(&tuple, &peer, n)?;
                Some((from, peer, HEADROOM + CHANNEL_HEADER_LEN, n))
            }
            PacketKind::Stun => {
                let Ok(msg) = Message::parse(pkt) else {
                    bump(&self.ctr.malformed, 1);
                    return None;
                };
                match (msg.method(), msg.class()) {
                    (Method::BINDING, Class::Request) => {
                        self.answer_binding(listen, tuple, buf, len)
                    }
                    (Method::SEND, Class::Indication) => {
                        let Ok(ind) = SendIndication::from_message(&msg) else {
                            bump(&self.ctr.malformed, 1);
                            return None;
                        };
                        let peer = canonical(ind.peer);
                        let n = ind.data.len();
                        // Where DATA lies in the slot: its offset from the slot's start.
                        let start = ind.data.as_ptr() as usize - buf.as_ptr() as usize;
                        let a = self.live_alloc_by_tuple(&tuple)?;
                        if self.denied.load().contains(&peer) {
                            bump(&self.ctr.denied_peer, 1);
                            return None;
                        }
                        if !a.permits(&peer.ip(), self.now, &self.ctr) {
                            return None;
                        }
                        let from = self.admit_to_peer(&tuple, &peer, n)?;
                        Some((from, peer, start, n))
                    }
                    (_, Class::Request) => {
                        bump(&self.ctr.punted, 1);
                        self.sink.punt(Punted {
                            worker: self.id,
                            tuple,
                            data: pkt.to_vec(),
                        });
                        None
                    }
                    _ => {
                        bump(&self.ctr.unexpected, 1);
                        None
                    }
                }
            }
            _ => {
                bump(&self.ctr.unexpected, 1);
                None
            }
        }
    }

    /// The allocation of a 5-tuple, counted as a drop if it is missing or expired.
    fn live_alloc_by_tuple(&self, tuple: &FiveTuple) -> Option<&Alloc> {
        let Some(a) = self.by_tuple.get(tuple).and_then(|id| self.allocs.get(id)) else {
            bump(&self.ctr.no_allocation, 1);
            return None;
        };
        if self.now >= a.deadline {
            bump(&self.ctr.expired, 1);
            return None;
        }
        Some(a)
    }

    /// The last checks before relaying `n` bytes to `peer`: the relay socket of the
    /// peer's family and the bandwidth limit; accounts the packet.
    fn admit_to_peer(&mut self, tuple: &FiveTuple, peer: &SocketAddr, n: usize) -> Option<Token> {
        let now = self.now;
        let a = self
            .by_tuple
            .get(tuple)
            .and_then(|id| self.allocs.get_mut(id))?;
        let Some(from) = a.relay_for(peer) else {
            bump(&self.ctr.send_error, 1);
            return None;
        };
        if !a.up.take(a.bandwidth, now, n + wire_overhead(peer)) {
            bump(&self.ctr.bandwidth, 1);
            return None;
        }
        a.usage.to_peer.packets += 1;
        a.usage.to_peer.bytes += n as u64;
        bump(&self.ctr.to_peer_packets, 1);
        bump(&self.ctr.to_peer_bytes, n as u64);
        Some(from)
    }

    fn answer_binding(
        &mut self,
        listen: Token,
        tuple: FiveTuple,
        buf: &mut [u8],
        len: usize,
    ) -> Option<(Token, SocketAddr, usize, usize)> {
        if !self.binding_limit.allow(tuple.client, self.now) {
            bump(&self.ctr.rate_limited, 1);
            return None;
        }
        // The answer goes in the slot right after the request.
        let at = padded(HEADROOM + len);
        let (head, tail) = buf.split_at_mut_checked(at)?;
        let msg = Message::parse(head.get(HEADROOM..HEADROOM + len)?).ok()?;
        match write_binding_answer(tail, &msg, tuple.client) {
            Ok(n) => {
                bump(&self.ctr.binding_answered, 1);
                Some((listen, tuple.client, at, n))
            }
            Err(_) => {
                bump(&self.ctr.malformed, 1);
                None
            }
        }
    }

    /// Peer → client: ChannelData if a channel is bound to the peer, else a Data
    /// indication, its header written into the headroom in front of the payload.
    fn peer_datagram(
        &mut self,
        id: AllocationId,
        peer: SocketAddr,
        buf: &mut [u8],
        len: usize,
    ) -> Option<(Token, SocketAddr, usize, usize)> {
        let now = self.now;
        let tid = self.next_tid();
        let peer = canonical(peer);
        // Nothing from the server's own sockets is relayed: a datagram from a listening
        // socket to a relay socket is a loop (the server answering its own relay).
        if self.denied.load().contains(&peer) {
            bump(&self.ctr.denied_peer, 1);
            return None;
        }
        let Some(a) = self.allocs.get_mut(&id) else {
            bump(&self.ctr.no_allocation, 1);
            return None;
        };
        if now >= a.deadline {
            bump(&self.ctr.expired, 1);
            return None;
        }
        if !a.permits(&peer.ip(), now, &self.ctr) {
            return None;
        }
        let Some(listen) = a.listen else {
            bump(&self.ctr.send_error, 1);
            return None;
        };
        if !a
            .down
            .take(a.bandwidth, now, len + wire_overhead(&a.tuple.client))
        {
            bump(&self.ctr.bandwidth, 1);
            return None;
        }
        // Unconfirmed channels are not used in this direction yet (see `Channel`).
        let channel = a.peer_channel.get(&peer).copied().filter(|c| {
            a.channels
                .get(c)
                .is_some_and(|ch| ch.peer == peer && ch.confirmed && now < ch.deadline)
        });
        let (start, total) = match channel {
            Some(c) => {
                let header = ChannelData::header(c, len).ok()?;
                let start = HEADROOM - CHANNEL_HEADER_LEN;
                buf.get_mut(start..HEADROOM)?.copy_from_slice(&header);
                (start, CHANNEL_HEADER_LEN + len)
            }
            None => {
                let hlen = data_indication_header_len(&peer);
                let start = HEADROOM - hlen;
                write_data_indication_header(buf.get_mut(start..HEADROOM)?, tid, &peer, len)
                    .ok()?;
                let end = HEADROOM + padded(len);
                buf.get_mut(HEADROOM + len..end)?.fill(0);
                (start, end - start)
            }
        };
        a.usage.to_client.packets += 1;
        a.usage.to_client.bytes += len as u64;
        bump(&self.ctr.to_client_packets, 1);
        bump(&self.ctr.to_client_bytes, len as u64);
        Some((listen, a.tuple.client, start, total))
    }

    /// Applies every queued command; `true` when the worker must stop.
    pub(crate) fn handle_commands(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(Command::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => return true,
                Ok(cmd) => self.command(cmd),
                Err(mpsc::TryRecvError::Empty) => return false,
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Send { tuple, data } => {
                let ok = self
                    .listen_token(&tuple.server)
                    .and_then(|t| self.socks.get(t))
                    .is_some_and(|e| e.sock.send_to(&data, &SockAddr::from(tuple.client)).is_ok());
                if ok && is_channel_bind_success(&data) {
                    self.confirm_channels(&tuple);
                }
                bump(
                    if ok {
                        &self.ctr.control_sent
                    } else {
                        &self.ctr.send_error
                    },
                    1,
                );
            }
            Command::Bind {
                tuple,
                relays,
                done,
            } => done(self.bind(tuple, relays)),
            Command::Apply(changes) => {
                for c in changes {
                    self.apply(c);
                }
            }
            Command::Snapshot(tx) => {
                let _ = tx.send(self.snapshot());
            }
            Command::Shutdown => {}
        }
    }

    /// The client of `tuple` has been sent a ChannelBind success response: its
    /// allocation's channels may carry ChannelData to it from now on.
    fn confirm_channels(&mut self, tuple: &FiveTuple) {
        if let Some(a) = self
            .by_tuple
            .get(tuple)
            .and_then(|id| self.allocs.get_mut(id))
        {
            for ch in a.channels.values_mut() {
                ch.confirmed = true;
            }
        }
    }

    fn bind(&mut self, tuple: FiveTuple, relays: Vec<SocketAddr>) -> Result<(), BindError> {
        if relays.is_empty() {
            return Err(BindError::Invalid("no relay address to bind".into()));
        }
        let mut socks = Vec::with_capacity(relays.len());
        for &r in &relays {
            match udp_socket(r, false, self.buffers) {
                Ok(s) => socks.push(s),
                // The sockets bound so far close as `socks` drops: all or none.
                Err(e) => {
                    tracing::debug!(worker = self.id, relay = %r, error = %e, "relay bind failed");
                    return Err(BindError::from_io(&e));
                }
            }
        }
        let mut tokens = Vec::with_capacity(socks.len());
        for (sock, &local) in socks.into_iter().zip(&relays) {
            let gso = sys::gso_supported(sock.as_fd());
            let t = self.socks.insert(SockEntry {
                sock,
                local,
                role: Role::Relay(Owner::Pending),
                gso,
                closing: false,
            });
            self.io_ops.push(IoOp::Register(t));
            tokens.push(t);
        }
        self.pending.entry(tuple).or_default().push(PendingBind {
            relays,
            tokens,
            since: self.now,
        });
        Ok(())
    }

    fn close(&mut self, t: Token) {
        if let Some(e) = self.socks.get_mut(t)
            && !e.closing
        {
            e.closing = true;
            self.io_ops.push(IoOp::Close(t));
        }
    }

    fn remove_alloc(&mut self, id: AllocationId) {
        if let Some(a) = self.allocs.remove(&id) {
            if self.by_tuple.get(&a.tuple) == Some(&id) {
                self.by_tuple.remove(&a.tuple);
            }
            for t in a.relay_tokens {
                self.close(t);
            }
        }
    }

    pub(crate) fn apply(&mut self, change: TableChange) {
        let now = self.now;
        match change {
            TableChange::AllocationAdd {
                id,
                tuple,
                relays,
                deadline,
                bandwidth,
                user,
                username,
                dont_fragment,
            } => {
                let deadline = deadline.0;
                self.remove_alloc(id);
                if let Some(&old) = self.by_tuple.get(&tuple) {
                    self.remove_alloc(old);
                }
                let tokens = self.claim(&tuple, &relays);
                if tokens.is_empty() && !relays.is_empty() {
                    tracing::warn!(
                        worker = self.id,
                        id = id.0,
                        ?tuple,
                        ?relays,
                        "AllocationAdd without bound relay sockets"
                    );
                }
                let mut relay_v4 = None;
                let mut relay_v6 = None;
                for &t in &tokens {
                    if let Some(e) = self.socks.get_mut(t) {
                        e.role = Role::Relay(Owner::Alloc(id));
                        if dont_fragment
                            && let Err(err) =
                                sys::set_dont_fragment(e.sock.as_fd(), e.local.is_ipv6())
                        {
                            tracing::warn!(worker = self.id, id = id.0, relay = %e.local, error = %err, "DONT-FRAGMENT not set on relay socket");
                        }
                        match e.local {
                            SocketAddr::V4(_) => relay_v4 = Some(t),
                            SocketAddr::V6(_) => relay_v6 = Some(t),
                        }
                    }
                }
                let listen = self.listen_token(&tuple.server);
                if listen.is_none() {
                    tracing::warn!(
                        worker = self.id,
                        id = id.0,
                        ?tuple,
                        "AllocationAdd for a local address not listened on"
                    );
                }
                self.by_tuple.insert(tuple, id);
                self.allocs.insert(
                    id,
                    Alloc {
                        tuple,
                        relays,
                        relay_tokens: tokens,
                        relay_v4,
                        relay_v6,
                        listen,
                        deadline,
                        bandwidth,
                        user,
                        username,
                        dont_fragment,
                        perms: AHashMap::new(),
                        channels: AHashMap::new(),
                        peer_channel: AHashMap::new(),
                        up: Bucket::full(bandwidth, now),
                        down: Bucket::full(bandwidth, now),
                        usage: Usage::default(),
                    },
                );
            }
            TableChange::AllocationRefresh { id, deadline } => {
                if let Some(a) = self.allocs.get_mut(&id) {
                    a.deadline = deadline.0;
                }
            }
            TableChange::AllocationRemove { id } => self.remove_alloc(id),
            TableChange::PermissionSet { id, peer, deadline } => {
                if let Some(a) = self.allocs.get_mut(&id) {
                    a.perms.insert(peer.to_canonical(), deadline.0);
                }
            }
            TableChange::PermissionRemove { id, peer } => {
                if let Some(a) = self.allocs.get_mut(&id) {
                    a.perms.remove(&peer.to_canonical());
                }
            }
            TableChange::ChannelSet {
                id,
                channel,
                peer,
                deadline,
            } => {
                let peer = canonical(peer);
                let deadline = deadline.0;
                if self.denied.load().contains(&peer) {
                    bump(&self.ctr.channels_refused, 1);
                    tracing::warn!(
                        worker = self.id,
                        id = id.0,
                        channel,
                        %peer,
                        "channel to a denied peer (one of the server's own sockets) refused"
                    );
                } else if let Some(a) = self.allocs.get_mut(&id) {
                    // A refresh (same number, same peer) keeps its confirmation.
                    let confirmed = a
                        .channels
                        .get(&channel)
                        .is_some_and(|c| c.peer == peer && c.confirmed);
                    let new = Channel {
                        peer,
                        deadline,
                        confirmed,
                    };
                    if let Some(old) = a.channels.insert(channel, new)
                        && old.peer != peer
                        && a.peer_channel.get(&old.peer) == Some(&channel)
                    {
                        a.peer_channel.remove(&old.peer);
                    }
                    // A peer is bound to one channel at most: the newest wins.
                    if let Some(old) = a.peer_channel.insert(peer, channel)
                        && old != channel
                    {
                        a.channels.remove(&old);
                    }
                }
            }
            TableChange::ChannelRemove { id, channel } => {
                if let Some(a) = self.allocs.get_mut(&id)
                    && let Some(Channel { peer, .. }) = a.channels.remove(&channel)
                    && a.peer_channel.get(&peer) == Some(&channel)
                {
                    a.peer_channel.remove(&peer);
                }
            }
        }
    }

    /// Takes the pending relay sockets bound for `tuple` with exactly these addresses.
    fn claim(&mut self, tuple: &FiveTuple, relays: &[SocketAddr]) -> Vec<Token> {
        let Some(list) = self.pending.get_mut(tuple) else {
            return Vec::new();
        };
        let same = |p: &PendingBind| {
            p.relays.len() == relays.len() && relays.iter().all(|r| p.relays.contains(r))
        };
        let tokens = match list.iter().position(same) {
            Some(i) => list.swap_remove(i).tokens,
            None => Vec::new(),
        };
        if list.is_empty() {
            self.pending.remove(tuple);
        }
        tokens
    }

    /// Runs the periodic sweep if it is due: drops expired allocations (closing their
    /// sockets), permissions and channels, and relay sockets never claimed.
    pub(crate) fn maybe_sweep(&mut self) {
        if self.now < self.next_sweep {
            return;
        }
        self.next_sweep = self.now + SWEEP_MS;
        self.sweep(self.now);
    }

    fn sweep(&mut self, now: u64) {
        self.binding_limit.sweep(now);
        let expired: Vec<AllocationId> = self
            .allocs
            .iter()
            .filter(|(_, a)| now >= a.deadline)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            self.remove_alloc(id);
        }
        for a in self.allocs.values_mut() {
            a.perms.retain(|_, &mut d| now < d);
            a.channels.retain(|_, c| now < c.deadline);
            let channels = &a.channels;
            a.peer_channel.retain(|_, c| channels.contains_key(c));
        }
        let mut stale = Vec::new();
        self.pending.retain(|_, list| {
            list.retain(|p| {
                let keep = now.saturating_sub(p.since) < UNCLAIMED_BIND_MS;
                if !keep {
                    stale.extend_from_slice(&p.tokens);
                }
                keep
            });
            !list.is_empty()
        });
        for t in stale {
            self.close(t);
        }
    }

    fn snapshot(&self) -> Vec<AllocationSnapshot> {
        self.allocs
            .iter()
            .map(|(&id, a)| AllocationSnapshot {
                id,
                worker: self.id as u32,
                tuple: Some(a.tuple),
                relays: a.relays.clone(),
                deadline: Millis(a.deadline),
                bandwidth: a.bandwidth,
                user: a.user.clone(),
                username: a.username.clone(),
                dont_fragment: a.dont_fragment,
                permissions: a.perms.iter().map(|(&ip, &d)| (ip, Millis(d))).collect(),
                channels: a
                    .channels
                    .iter()
                    .map(|(&c, ch)| (c, ch.peer, Millis(ch.deadline)))
                    .collect(),
                usage: a.usage,
            })
            .collect()
    }

    /// Closes everything at shutdown.
    pub(crate) fn close_all(&mut self) {
        let all: Vec<Token> = self.socks.tokens().collect();
        for t in all {
            self.close(t);
        }
    }

    /// The unix-millis deadline of the next sweep.
    pub(crate) fn next_sweep(&self) -> u64 {
        self.next_sweep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_exactly() {
        let mut b = Bucket::full(1000, 0);
        assert!(b.take(1000, 0, 1000));
        assert!(!b.take(1000, 0, 1));
        // 1 ms at 1000 B/s is one byte.
        assert!(b.take(1000, 1, 1));
        assert!(!b.take(1000, 1, 1));
        assert!(b.take(1000, 500, 499));
        // Burst is capped at one second's worth.
        assert!(!b.take(1000, 10_000, 1001));
        assert!(b.take(1000, 10_000, 1000));
        // Unlimited.
        assert!(b.take(0, 0, usize::MAX));
    }

    struct NoSink;

    impl ControlSink for NoSink {
        fn punt(&self, _: Punted) {}
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| unreachable!())
    }

    fn core() -> (Core, mpsc::Sender<Command>) {
        core_denying(Denied::default())
    }

    fn core_denying(denied: Denied) -> (Core, mpsc::Sender<Command>) {
        let (tx, rx) = mpsc::channel();
        let c = Core::new(CoreInit {
            id: 0,
            listen: Vec::new(),
            rx,
            sink: Arc::new(NoSink),
            denied: Arc::new(ArcSwap::from_pointee(denied)),
            ctr: Arc::new(Counters::default()),
            buffers: 0,
            legacy_channels: false,
            binding_limit: BindingLimit::default(),
        });
        (c.unwrap_or_else(|e| panic!("{e}")), tx)
    }

    #[test]
    fn sweep_closes_unclaimed_relays_and_expired_entries() {
        let (mut c, _tx) = core();
        let t1 = FiveTuple::udp(addr("127.0.0.1:1"), addr("127.0.0.1:2"));
        let t2 = FiveTuple::udp(addr("127.0.0.1:3"), addr("127.0.0.1:2"));
        let any = vec![addr("127.0.0.1:0")];
        c.now = 1_000;
        assert_eq!(c.bind(t1, any.clone()), Ok(()));
        assert_eq!(c.bind(t2, any.clone()), Ok(()));
        let [IoOp::Register(r1), IoOp::Register(r2)] = c.io_ops[..] else {
            panic!("{:?}", c.io_ops);
        };
        c.io_ops.clear();
        c.apply(TableChange::AllocationAdd {
            id: AllocationId(7),
            tuple: t2,
            relays: any,
            deadline: Millis(100_000),
            bandwidth: 0,
            user: String::new(),
            username: String::new(),
            dont_fragment: false,
        });
        let peer = addr("192.0.2.1:9");
        c.apply(TableChange::PermissionSet {
            id: AllocationId(7),
            peer: peer.ip(),
            deadline: Millis(2_000),
        });
        c.apply(TableChange::ChannelSet {
            id: AllocationId(7),
            channel: 0x4000,
            peer,
            deadline: Millis(2_000),
        });
        c.sweep(1_999);
        assert_eq!(
            (
                c.snapshot()[0].permissions.len(),
                c.snapshot()[0].channels.len()
            ),
            (1, 1)
        );
        c.sweep(2_000);
        assert_eq!(
            (
                c.snapshot()[0].permissions.len(),
                c.snapshot()[0].channels.len()
            ),
            (0, 0)
        );
        assert!(c.io_ops.is_empty());
        // The unclaimed relay goes after 30 s; the claimed one stays.
        c.sweep(1_000 + UNCLAIMED_BIND_MS - 1);
        assert!(c.io_ops.is_empty());
        c.sweep(1_000 + UNCLAIMED_BIND_MS);
        assert_eq!(c.io_ops, vec![IoOp::Close(r1)]);
        c.io_ops.clear();
        // The allocation goes at its deadline, with its relay socket.
        c.sweep(99_999);
        assert!(c.io_ops.is_empty());
        c.sweep(100_000);
        assert_eq!(c.io_ops, vec![IoOp::Close(r2)]);
        assert!(c.snapshot().is_empty());
    }

    #[test]
    fn dont_fragment_reaches_relay_sockets() {
        let (mut c, _tx) = core();
        let mut next = 1;
        for (relay, v6) in [("127.0.0.1:0", false), ("[::1]:0", true)] {
            for df in [false, true] {
                let tuple = FiveTuple::udp(addr(&format!("192.0.2.1:{next}")), addr("127.0.0.1:2"));
                let relays = vec![addr(relay)];
                if c.bind(tuple, relays.clone()).is_err() {
                    // No IPv6 loopback here.
                    assert!(v6);
                    continue;
                }
                let Some(&IoOp::Register(t)) = c.io_ops.last() else {
                    panic!("{:?}", c.io_ops);
                };
                c.apply(TableChange::AllocationAdd {
                    id: AllocationId(next),
                    tuple,
                    relays,
                    deadline: Millis(u64::MAX),
                    bandwidth: 0,
                    user: String::new(),
                    username: String::new(),
                    dont_fragment: df,
                });
                next += 1;
                let fd = c.socks.fd(t).unwrap_or_else(|| panic!("no socket"));
                assert_eq!(sys::dont_fragment(fd, v6).ok(), Some(df), "{relay} {df}");
            }
        }
        let snap = c.snapshot();
        assert_eq!(
            snap.iter().filter(|s| s.dont_fragment).count(),
            snap.len() / 2
        );
    }

    #[test]
    fn denied_wildcards() {
        let d = Denied::new([
            "10.0.0.1:3478".parse().unwrap_or_else(|_| unreachable!()),
            "0.0.0.0:5349".parse().unwrap_or_else(|_| unreachable!()),
        ]);
        let a = |s: &str| s.parse::<SocketAddr>().unwrap_or_else(|_| unreachable!());
        assert!(d.contains(&a("10.0.0.1:3478")));
        assert!(!d.contains(&a("10.0.0.1:3479")));
        assert!(d.contains(&a("192.0.2.1:5349")));
        assert!(!d.contains(&a("[2001:db8::1]:5349")));
        // Unspecified IPs reach this host, whatever the port.
        assert!(d.contains(&a("0.0.0.0:1")));
        assert!(d.contains(&a("[::]:1")));
    }

    /// An allocation with no relay socket, for table-only tests.
    fn bare_alloc(c: &mut Core, id: AllocationId) -> FiveTuple {
        let tuple = FiveTuple::udp(addr("192.0.2.9:1000"), addr("127.0.0.1:3478"));
        c.apply(TableChange::AllocationAdd {
            id,
            tuple,
            relays: Vec::new(),
            deadline: Millis(u64::MAX),
            bandwidth: 0,
            user: "u".into(),
            username: "name".into(),
            dont_fragment: false,
        });
        tuple
    }

    #[test]
    fn channel_to_denied_peer_refused() {
        // A wildcard listen on port 3478: any IP on that port is the server's own.
        let (mut c, _tx) = core_denying(Denied::new([addr("0.0.0.0:3478")]));
        bare_alloc(&mut c, AllocationId(1));
        for peer in ["192.0.2.1:3478", "0.0.0.0:9", "[::ffff:10.0.0.1]:3478"] {
            c.apply(TableChange::ChannelSet {
                id: AllocationId(1),
                channel: 0x4000,
                peer: addr(peer),
                deadline: Millis(u64::MAX),
            });
        }
        c.apply(TableChange::ChannelSet {
            id: AllocationId(1),
            channel: 0x4001,
            peer: addr("192.0.2.1:3479"),
            deadline: Millis(u64::MAX),
        });
        let snap = c.snapshot();
        assert_eq!(
            snap[0].channels,
            vec![(0x4001, addr("192.0.2.1:3479"), Millis(u64::MAX))]
        );
        assert_eq!(snap[0].username, "name");
        assert_eq!(c.ctr.snapshot().channels_refused, 3);
    }

    #[test]
    fn channels_confirmed_by_bind_response() {
        let (mut c, _tx) = core();
        let tuple = bare_alloc(&mut c, AllocationId(1));
        let set = |c: &mut Core, channel, peer: &str| {
            c.apply(TableChange::ChannelSet {
                id: AllocationId(1),
                channel,
                peer: addr(peer),
                deadline: Millis(u64::MAX),
            })
        };
        let confirmed = |c: &Core, channel| c.allocs[&AllocationId(1)].channels[&channel].confirmed;
        set(&mut c, 0x4000, "192.0.2.1:1");
        assert!(!confirmed(&c, 0x4000));
        c.confirm_channels(&tuple);
        assert!(confirmed(&c, 0x4000));
        // A refresh keeps the state; a new channel, or a number moved to another peer,
        // starts over.
        set(&mut c, 0x4000, "192.0.2.1:1");
        set(&mut c, 0x4001, "192.0.2.2:1");
        assert!(confirmed(&c, 0x4000) && !confirmed(&c, 0x4001));
        set(&mut c, 0x4000, "192.0.2.3:1");
        assert!(!confirmed(&c, 0x4000));
    }

    /// A Binding request: `unknown` comprehension-required attributes this codec does
    /// not know, then FINGERPRINT if asked.
    fn binding_request(unknown: u16, fingerprint: bool) -> Vec<u8> {
        let mut buf = [0u8; 512];
        let mut w = MessageWriter::new(
            &mut buf,
            Method::BINDING,
            Class::Request,
            TransactionId([7; 12]),
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        for i in 0..unknown {
            w.add_raw(turnpike_proto::attr::AttrType(0x7F00 + i), &[])
                .unwrap_or_else(|e| panic!("{e:?}"));
        }
        if fingerprint {
            w.add_fingerprint().unwrap_or_else(|e| panic!("{e:?}"));
        }
        let n = w.finish();
        buf[..n].to_vec()
    }

    #[test]
    fn binding_answers_barely_larger_than_requests() {
        let v4 = addr("192.0.2.1:1");
        let v6 = addr("[2001:db8::1]:1");
        for unknown in [0, 1, 2, 7, 8, 9, 20] {
            for fp in [false, true] {
                let req = binding_request(unknown, fp);
                let msg = Message::parse(&req).unwrap_or_else(|e| panic!("{e:?}"));
                assert_eq!(msg.has_fingerprint(), fp);
                for src in [v4, v6] {
                    let mut out = [0u8; 512];
                    let n = write_binding_answer(&mut out, &msg, src)
                        .unwrap_or_else(|e| panic!("{e:?}"));
                    let ans = Message::parse(&out[..n]).unwrap_or_else(|e| panic!("{e:?}"));
                    let class = if unknown == 0 {
                        Class::Success
                    } else {
                        Class::Error
                    };
                    assert_eq!((ans.method(), ans.class()), (Method::BINDING, class));
                    if unknown > 0 {
                        let e = ans.attr::<ErrorCode<'_>>().ok().flatten();
                        assert_eq!(e.map(|e| e.code), Some(420));
                        let listed = ans.attr::<UnknownAttributes<'_>>().ok().flatten();
                        assert_eq!(
                            listed.map(|u| u.types().count()),
                            Some(usize::from(unknown).min(turnpike_proto::stun::MAX_UNKNOWN))
                        );
                    }
                    assert!(
                        n <= req.len() + 24,
                        "{unknown} unknown, fingerprint {fp}, {src}: {n} bytes answer {}",
                        req.len()
                    );
                }
            }
        }
    }

    #[test]
    fn channel_bind_success_recognised() {
        let mut buf = [0u8; 64];
        let tid = TransactionId([1; 12]);
        let mut msg = |method, class| {
            let w = turnpike_proto::stun::MessageWriter::new(&mut buf, method, class, tid)
                .unwrap_or_else(|_| unreachable!());
            let n = w.finish();
            buf[..n].to_vec()
        };
        assert!(is_channel_bind_success(&msg(
            Method::CHANNEL_BIND,
            Class::Success
        )));
        assert!(!is_channel_bind_success(&msg(
            Method::CHANNEL_BIND,
            Class::Error
        )));
        assert!(!is_channel_bind_success(&msg(
            Method::REFRESH,
            Class::Success
        )));
        assert!(!is_channel_bind_success(&[0x01, 0x09]));
    }
}
