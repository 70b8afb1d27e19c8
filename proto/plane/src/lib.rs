//! The plane-to-plane contract, typed once: what the control plane and the data plane say
//! to each other about 5-tuples, allocations, relay-table changes, table snapshots and
//! relay-port binds. Both planes use these types; the gRPC messages they travel in and
//! the conversions to them live in `turnpike-api`, and nowhere else.
//!
//! The seam itself is two enums: [`Up`] (data plane → control plane) and [`Down`]
//! (control plane → data plane). `serve` passes them through an in-process channel; split
//! mode through the gRPC adapters of both planes, which convert them with `turnpike-api`.
//!
//! Time: a [`Millis`] is a reading of the [`Clock`] of the plane that holds it: a
//! monotonic clock (so a step of the wall clock changes no lifetime), started at the wall
//! time of the process's start (so readings read like unix milliseconds in logs and stay
//! near those of other hosts). Deadlines in these types are on the holder's clock; on the
//! wire they travel as durations (what remains), each side converting with its own
//! clock, so two hosts whose clocks disagree still agree on lifetimes.

use std::net::{IpAddr, SocketAddr};

pub mod admin;
pub mod limit;

/// A point in time on a plane's [`Clock`], in milliseconds. Sans-IO code never reads a
/// clock; the caller passes `now` in, and tests pass a virtual clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub u64);

impl Millis {
    /// `self + secs` seconds.
    pub fn plus_secs(self, secs: u64) -> Millis {
        Millis(self.0.saturating_add(secs.saturating_mul(1000)))
    }

    /// `self + ms` milliseconds.
    pub fn plus_ms(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }

    /// Whole seconds since the epoch.
    pub fn secs(self) -> u64 {
        self.0 / 1000
    }

    /// Milliseconds from `now` until `self` (0 when it is past): a deadline as the
    /// duration that crosses the wire.
    pub fn remaining(self, now: Millis) -> u64 {
        self.0.saturating_sub(now.0)
    }
}

/// A plane's one source of time: monotonic, so that a step of the wall clock (NTP, an
/// operator) changes no lifetime; its readings start at the wall-clock time of the
/// clock's creation, so that they read like unix milliseconds. Wall time proper
/// ([`Clock::wall`]) is read only where a protocol defines it: TURN REST usernames, and
/// times shown to people.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: std::time::Instant,
    base: u64,
}

// The clock is the one place the planes read time: this is its exception to the
// sans-IO rule of the crates around it.
#[allow(clippy::disallowed_methods)]
impl Clock {
    /// The process's clock: every plane of one process (`serve` runs both) reads the
    /// same one, so a deadline handed from one to the other in memory means the same.
    pub fn new() -> Clock {
        static PROCESS: std::sync::OnceLock<Clock> = std::sync::OnceLock::new();
        *PROCESS.get_or_init(|| Clock {
            start: std::time::Instant::now(),
            base: wall_millis(std::time::SystemTime::now()),
        })
    }

    /// Now, on this clock.
    pub fn now(&self) -> Millis {
        Millis(
            self.base
                .saturating_add(self.start.elapsed().as_millis() as u64),
        )
    }

    /// The wall-clock time, unix milliseconds (for protocols that define it, and display).
    pub fn wall(&self) -> u64 {
        wall_millis(std::time::SystemTime::now())
    }

    /// The wall-clock time the clock (the process) started at, unix milliseconds.
    pub fn started_unix_millis(&self) -> u64 {
        self.base
    }
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::new()
    }
}

fn wall_millis(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The transport a client reached the server over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Transport {
    /// UDP.
    #[default]
    Udp,
    /// TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
}

/// A client's 5-tuple: transport, the client's address and the server address it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    /// The transport.
    pub transport: Transport,
    /// The client's (reflexive) address.
    pub client: SocketAddr,
    /// The server's listening address the client sent to.
    pub server: SocketAddr,
}

impl FiveTuple {
    /// A UDP 5-tuple.
    pub fn udp(client: SocketAddr, server: SocketAddr) -> FiveTuple {
        FiveTuple {
            transport: Transport::Udp,
            client,
            server,
        }
    }
}

/// An allocation's identity, chosen by the control plane, unique within a cell and never
/// reused; carried through resyncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct AllocationId(pub u64);

/// A change to a data plane's relay table. Every entry carries the deadline at which the
/// data plane stops forwarding for it, even if no removal arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableChange {
    /// A new allocation, on relay sockets bound earlier for the same 5-tuple.
    AllocationAdd {
        /// The allocation.
        id: AllocationId,
        /// The client's 5-tuple.
        tuple: FiveTuple,
        /// Its relayed addresses (one per family).
        relays: Vec<SocketAddr>,
        /// When it expires.
        deadline: Millis,
        /// Bandwidth limit in bytes per second per direction; 0 is unlimited.
        bandwidth: u64,
        /// The accounting user (not secret; used for usage events).
        user: String,
        /// The username the allocation was created with (for a REST credential it embeds
        /// the expiry, so it differs from `user`). Kept by the data plane and reported
        /// back in a resync, so that a restarted control plane still refuses other
        /// credentials on this allocation with 441.
        username: String,
        /// DONT-FRAGMENT was asked: relay with the DF bit set.
        dont_fragment: bool,
    },
    /// A Refresh moved the deadline.
    AllocationRefresh {
        /// The allocation.
        id: AllocationId,
        /// The new deadline.
        deadline: Millis,
    },
    /// The allocation is gone: its relay sockets are closed.
    AllocationRemove {
        /// The allocation.
        id: AllocationId,
    },
    /// A permission was installed or refreshed.
    PermissionSet {
        /// The allocation.
        id: AllocationId,
        /// The peer IP.
        peer: IpAddr,
        /// When it expires.
        deadline: Millis,
    },
    /// A permission expired.
    PermissionRemove {
        /// The allocation.
        id: AllocationId,
        /// The peer IP.
        peer: IpAddr,
    },
    /// A channel was bound or refreshed.
    ChannelSet {
        /// The allocation.
        id: AllocationId,
        /// The channel number.
        channel: u16,
        /// The peer.
        peer: SocketAddr,
        /// When it expires.
        deadline: Millis,
        /// The client has already been sent this ChannelBind's success response (a
        /// channel handed back to a data plane that restarted): peer data may go to it
        /// as ChannelData at once. A new bind is `false`: the data plane confirms it when
        /// it sends the response.
        confirmed: bool,
    },
    /// A channel expired.
    ChannelRemove {
        /// The allocation.
        id: AllocationId,
        /// The channel number.
        channel: u16,
    },
}

impl TableChange {
    /// The allocation the change is about.
    pub fn allocation(&self) -> AllocationId {
        match self {
            TableChange::AllocationAdd { id, .. }
            | TableChange::AllocationRefresh { id, .. }
            | TableChange::AllocationRemove { id }
            | TableChange::PermissionSet { id, .. }
            | TableChange::PermissionRemove { id, .. }
            | TableChange::ChannelSet { id, .. }
            | TableChange::ChannelRemove { id, .. } => *id,
        }
    }
}

/// Packets and bytes relayed in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Traffic {
    /// Datagrams.
    pub packets: u64,
    /// Application bytes (payload, without TURN framing).
    pub bytes: u64,
}

/// Traffic relayed for an allocation, cumulative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Client → peer.
    pub to_peer: Traffic,
    /// Peer → client.
    pub to_client: Traffic,
}

impl Usage {
    /// What `self` counts beyond `prev` (counters are cumulative).
    pub fn since(&self, prev: &Usage) -> Usage {
        let d = |a: Traffic, b: Traffic| Traffic {
            packets: a.packets.saturating_sub(b.packets),
            bytes: a.bytes.saturating_sub(b.bytes),
        };
        Usage {
            to_peer: d(self.to_peer, prev.to_peer),
            to_client: d(self.to_client, prev.to_client),
        }
    }

    /// Adds `other` to `self`.
    pub fn add(&mut self, other: &Usage) {
        self.to_peer.packets += other.to_peer.packets;
        self.to_peer.bytes += other.to_peer.bytes;
        self.to_client.packets += other.to_client.packets;
        self.to_client.bytes += other.to_client.bytes;
    }
}

/// One row of a data plane's relay table, as it reports it after (re)attaching: what a
/// control plane rebuilds its state from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationSnapshot {
    /// The allocation.
    pub id: AllocationId,
    /// The worker that owns it.
    pub worker: u32,
    /// The client 5-tuple.
    pub tuple: FiveTuple,
    /// Relay addresses.
    pub relays: Vec<SocketAddr>,
    /// When forwarding stops.
    pub deadline: Millis,
    /// Bytes per second per direction; 0 unlimited.
    pub bandwidth: u64,
    /// The accounting user.
    pub user: String,
    /// The username the allocation authenticated with (empty: unknown).
    pub username: String,
    /// DONT-FRAGMENT.
    pub dont_fragment: bool,
    /// Installed permissions: peer IP and deadline.
    pub permissions: Vec<(IpAddr, Millis)>,
    /// Bound channels: number, peer and deadline.
    pub channels: Vec<(u16, SocketAddr, Millis)>,
    /// Traffic relayed so far.
    pub usage: Usage,
}

/// A relay IP of a data plane and the address clients are given for it.
///
/// Behind a 1:1 NAT (a cloud VM's public address) the host can bind only its private
/// address: relay sockets bind `ip`, and the table, snapshots, binds and the XDP program
/// all use it; only what clients and other instances are told (XOR-RELAYED-ADDRESS,
/// ALTERNATE-SERVER, the fleet registry) carries `advertised`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RelayIp {
    /// The local address relay sockets bind.
    pub ip: IpAddr,
    /// The address clients reach it at: the NAT's public address, or `ip` itself.
    pub advertised: IpAddr,
}

impl RelayIp {
    /// A relay IP clients reach directly (no NAT).
    pub fn local(ip: IpAddr) -> RelayIp {
        RelayIp { ip, advertised: ip }
    }

    /// Whether clients are given another address than the one bound.
    pub fn is_nat(&self) -> bool {
        self.ip != self.advertised
    }
}

/// `addr`, a local address of this host (a relay or listening address), as clients and
/// other instances must be told it: its IP replaced by the advertised one when it is a
/// relay IP behind a 1:1 NAT. A wildcard IP (a listener on `0.0.0.0` or `::`) becomes
/// the advertised IP when exactly one relay IP of its family is behind a NAT, since the
/// NAT then has one public address for the host; otherwise it is returned unchanged.
pub fn advertised_addr(relay_ips: &[RelayIp], addr: SocketAddr) -> SocketAddr {
    let ip = addr.ip();
    if let Some(r) = relay_ips.iter().find(|r| r.ip == ip) {
        return SocketAddr::new(r.advertised, addr.port());
    }
    if ip.is_unspecified() {
        let mut nat = relay_ips
            .iter()
            .filter(|r| r.is_nat() && r.ip.is_ipv4() == ip.is_ipv4());
        if let (Some(r), None) = (nat.next(), nat.next()) {
            return SocketAddr::new(r.advertised, addr.port());
        }
    }
    addr
}

/// A request to a data plane to open relay sockets for an allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindRequest {
    /// Echoed in the acknowledgement.
    pub id: u64,
    /// The client whose allocation this is (the data plane gives the sockets to the worker
    /// that owns this 5-tuple).
    pub tuple: FiveTuple,
    /// The relay addresses to bind (all or none).
    pub relays: Vec<SocketAddr>,
}

/// Why a data plane could not bind relay sockets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// The port is taken (another process, or a socket not yet closed): try another.
    #[error("address in use")]
    AddressInUse,
    /// The relay IP is not on this host.
    #[error("address not available")]
    AddressNotAvailable,
    /// The request named no worker or addresses this data plane can serve.
    #[error("invalid bind request: {0}")]
    Invalid(String),
    /// No data plane to ask (detached, or it never answered).
    #[error("no data plane")]
    NoDataPlane,
    /// Any other system error.
    #[error("system error: {0}")]
    System(String),
}

impl BindError {
    /// The error of a failed `bind(2)`.
    pub fn from_io(e: &std::io::Error) -> BindError {
        match e.kind() {
            std::io::ErrorKind::AddrInUse => BindError::AddressInUse,
            std::io::ErrorKind::AddrNotAvailable => BindError::AddressNotAvailable,
            _ => BindError::System(e.to_string()),
        }
    }
}

// ----- the seam: what the planes say to each other ---------------------------------------

/// A message from a data plane to its control plane.
#[derive(Debug, Clone, PartialEq)]
pub enum Up {
    /// The first message of every attachment: who the data plane is, and the first part
    /// of its table.
    Hello(Hello),
    /// A further part of the table snapshot begun by [`Hello::table`].
    Snapshot(Snapshot),
    /// STUN requests the workers punted, in order.
    Punted(Vec<Punted>),
    /// The outcome of a bind of [`Batch::binds`].
    BindResult {
        /// The bind's id.
        id: u64,
        /// Whether the sockets are bound.
        result: Result<(), BindError>,
    },
    /// Every batch up to `version` is applied (cumulative).
    TableAck {
        /// The version.
        version: u64,
    },
    /// The data plane received a batch beyond the next one: a batch was lost on the way.
    /// It applied everything up to `applied` and ignores later batches until the control
    /// plane sends again what followed `applied`.
    Resync {
        /// The last version applied.
        applied: u64,
    },
    /// Load and traffic, periodic.
    Load(LoadReport),
    /// Per-allocation traffic (cumulative), periodic.
    Usage(Vec<(AllocationId, Usage)>),
    /// A client connection (TCP or TLS) closed: its allocation has ended.
    ConnectionClosed {
        /// The worker that held it.
        worker: u32,
        /// Its 5-tuple.
        tuple: FiveTuple,
    },
}

/// A message from a control plane to one of its data planes.
#[derive(Debug, Clone, PartialEq)]
pub enum Down {
    /// The next numbered batch of binds and table changes. Batches are numbered
    /// consecutively per attachment: a data plane applies them in order, exactly once,
    /// and asks for what it missed ([`Up::Resync`]).
    Batch(Batch),
    /// Datagrams for workers to send to clients, in order (answers to punted requests),
    /// once every batch up to `after` is applied: an answer never overtakes the table
    /// change it reports (a client told "ChannelBind succeeded" may use the channel at
    /// once), even when a batch was lost and comes again later.
    Send {
        /// The batch the answers follow.
        after: u64,
        /// The datagrams.
        datagrams: Vec<Datagram>,
    },
}

/// A numbered batch: what one turn of the control plane changed for one data plane.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    /// Its version: one above the previous batch's.
    pub version: u64,
    /// Relay sockets to bind, before the changes are applied.
    pub binds: Vec<Bind>,
    /// Table changes, in order, each with the worker that owns its allocation.
    pub changes: Vec<(u32, TableChange)>,
    /// Start (`true`) or stop draining.
    pub drain: Option<bool>,
    /// How to answer the first request of a handshake (sent once per attachment).
    pub challenge: Option<Challenge>,
}

/// What a data plane needs to answer an unauthenticated Allocate itself, as the control
/// plane would: 401 with the realm and a stateless nonce minted with the control plane's
/// nonce key (which the control plane then checks). Crosses only the planes' own link.
#[derive(Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The realm.
    pub realm: String,
    /// The nonce key's secret.
    pub nonce_secret: [u8; 32],
    /// How long a nonce lives, seconds.
    pub nonce_lifetime_secs: u64,
    /// The control plane's limit of unauthenticated answers per source IP and port
    /// (a rate of 0: none), which the data plane applies to the 401s it writes.
    pub per_source: limit::Rate,
    /// The same per source IP.
    pub per_ip: limit::Rate,
}

impl std::fmt::Debug for Challenge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenge")
            .field("realm", &self.realm)
            .field("nonce_lifetime_secs", &self.nonce_lifetime_secs)
            .finish_non_exhaustive()
    }
}

impl Batch {
    /// Whether it carries nothing.
    pub fn is_empty(&self) -> bool {
        self.binds.is_empty()
            && self.changes.is_empty()
            && self.drain.is_none()
            && self.challenge.is_none()
    }
}

/// A request to bind relay sockets on a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Echoed in [`Up::BindResult`].
    pub id: u64,
    /// The worker that will own the sockets.
    pub worker: u32,
    /// The addresses to bind, all or none.
    pub relays: Vec<SocketAddr>,
    /// The client the allocation will serve; `None` for a socket of the worker's pool.
    pub tuple: Option<FiveTuple>,
}

/// A datagram for a worker to send to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// The worker to send it from.
    pub worker: u32,
    /// The client and the listening address to send from.
    pub tuple: FiveTuple,
    /// One UDP datagram, or one STUN message for a stream.
    pub data: Vec<u8>,
}

/// A STUN request a worker did not answer itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Punted {
    /// The worker that received it.
    pub worker: u32,
    /// Where it came from and on which listening address.
    pub tuple: FiveTuple,
    /// The datagram, or one framed STUN message.
    pub data: Vec<u8>,
}

/// Who a data plane is, said first on every attachment.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    /// Its id, stable across restarts.
    pub id: String,
    /// Where clients reach it.
    pub listening: Vec<(Transport, SocketAddr)>,
    /// The IPs it binds relay sockets on.
    pub relay_ips: Vec<RelayIp>,
    /// Its workers (ids 0 to workers - 1).
    pub workers: u32,
    /// Its software version.
    pub version: String,
    /// The first part of its table (`None` on a first start with an empty table).
    pub table: Option<Snapshot>,
    /// When its process started, unix milliseconds (display only; 0: not said).
    pub started: u64,
}

/// A data plane's table, or a part of it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    /// The last batch version applied: the control plane numbers on from it.
    pub version: u64,
    /// Allocations with their permissions and channels.
    pub allocations: Vec<AllocationSnapshot>,
    /// The last part.
    pub complete: bool,
}

/// Why a data plane dropped packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Another reason.
    Other,
    /// Not STUN, not ChannelData, or failed to parse.
    Malformed,
    /// No allocation for the 5-tuple.
    NoAllocation,
    /// No permission for the peer.
    NoPermission,
    /// ChannelData on an unbound channel.
    NoChannel,
    /// The bandwidth limit.
    Bandwidth,
    /// The peer policy.
    PeerPolicy,
    /// A rate limit of unauthenticated requests.
    RateLimited,
    /// A queue was full.
    QueueFull,
    /// The system refused to send.
    SendError,
}

/// A data plane's load, periodic.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoadReport {
    /// Allocations in its table.
    pub allocations: u64,
    /// Relayed traffic, cumulative.
    pub traffic: Usage,
    /// Dropped packets by reason, cumulative (non-zero only).
    pub drops: Vec<(DropReason, u64)>,
    /// Per worker: allocations and received packets.
    pub workers: Vec<WorkerLoad>,
    /// The XDP fast path, when it was asked for.
    pub fast_path: Option<FastPathReport>,
}

/// One worker's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkerLoad {
    /// Its allocations.
    pub allocations: u64,
    /// Packets it received, cumulative.
    pub received_packets: u64,
}

/// The XDP fast path's part of a load report.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FastPathReport {
    /// Where it is attached, as "name (mode)"; empty when off.
    pub interfaces: Vec<String>,
    /// Why it is off, when it is.
    pub off_reason: String,
    /// What it relayed (included in [`LoadReport::traffic`]).
    pub traffic: Usage,
    /// Packets relayed, by path.
    pub relayed: Vec<(String, u64)>,
    /// Frames passed to the workers, by reason.
    pub passed: Vec<(String, u64)>,
    /// Allocations with entries in its maps.
    pub allocations: u64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn advertised_addr_maps_relay_and_wildcard_addresses() {
        let nat = RelayIp {
            ip: "10.0.0.2".parse().unwrap(),
            advertised: "203.0.113.2".parse().unwrap(),
        };
        let v6 = RelayIp::local("2001:db8::2".parse().unwrap());
        let ips = [nat, v6];
        let map = |a: &str| advertised_addr(&ips, a.parse().unwrap()).to_string();
        assert_eq!(map("10.0.0.2:3478"), "203.0.113.2:3478");
        assert_eq!(map("0.0.0.0:3478"), "203.0.113.2:3478");
        // No IPv6 NAT: the wildcard stays; other addresses are left alone.
        assert_eq!(map("[::]:3478"), "[::]:3478");
        assert_eq!(map("10.0.0.3:3478"), "10.0.0.3:3478");
        // Two NATed IPv4 relay IPs: a wildcard listener has no one public address.
        let two = [
            nat,
            RelayIp {
                ip: "10.0.0.3".parse().unwrap(),
                advertised: "203.0.113.3".parse().unwrap(),
            },
        ];
        let a = "0.0.0.0:3478".parse().unwrap();
        assert_eq!(advertised_addr(&two, a), a);
    }
}
