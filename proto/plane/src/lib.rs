//! The plane-to-plane contract, typed once: what the control plane and the data plane say
//! to each other about 5-tuples, allocations, relay-table changes, table snapshots and
//! relay-port binds. Both planes use these types; the gRPC messages they travel in and
//! the conversions to them live in `turnpike-api`, and nowhere else.
//!
//! Times are [`Millis`], unix milliseconds: deadlines cross the wire as absolute times so
//! that they survive reconnects and restarts.

use std::net::{IpAddr, SocketAddr};

/// A point in time: milliseconds since the Unix epoch. Sans-IO code never reads a clock;
/// the caller passes `now` in, and tests pass a virtual clock.
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
