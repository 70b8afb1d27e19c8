//! Values that cross the control plane's boundary: time, 5-tuples, table changes and the
//! outputs of the state machine.

use std::net::SocketAddr;

/// A point in time: milliseconds since the Unix epoch. The core never reads a clock; the
/// caller passes `now` in, and tests pass a virtual clock.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP.
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

/// An allocation's identity, unique within one control plane's lifetime (and carried
/// through resyncs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocationId(pub u64);

/// A change to the data plane's relay table. Every entry carries the deadline at which the
/// data plane stops forwarding for it, even if no removal arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableChange {
    /// A new allocation.
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
        peer: std::net::IpAddr,
        /// When it expires.
        deadline: Millis,
    },
    /// A permission expired.
    PermissionRemove {
        /// The allocation.
        id: AllocationId,
        /// The peer IP.
        peer: std::net::IpAddr,
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

/// A request to the data plane to open relay sockets for an allocation.
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

/// Why an allocation ended, for lifecycle events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The client sent Refresh with LIFETIME 0.
    Deleted,
    /// Its lifetime ran out.
    Expired,
    /// An operator revoked it.
    Revoked,
}

/// Lifecycle events (for the admin API's watch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An allocation was created.
    Created {
        /// The allocation.
        id: AllocationId,
        /// Its user.
        user: String,
        /// The client 5-tuple.
        tuple: FiveTuple,
        /// Its relayed addresses.
        relays: Vec<SocketAddr>,
    },
    /// An allocation was refreshed.
    Refreshed {
        /// The allocation.
        id: AllocationId,
        /// Its new deadline.
        deadline: Millis,
    },
    /// A permission was installed.
    PermissionAdded {
        /// The allocation.
        id: AllocationId,
        /// The peer IP.
        peer: std::net::IpAddr,
    },
    /// A channel was bound.
    ChannelBound {
        /// The allocation.
        id: AllocationId,
        /// The channel.
        channel: u16,
        /// The peer.
        peer: SocketAddr,
    },
    /// An allocation ended.
    Ended {
        /// The allocation.
        id: AllocationId,
        /// Why.
        reason: EndReason,
    },
}

/// Something the caller must do, produced by the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send `data` to the client of `tuple` (from the server address in the tuple).
    Transmit {
        /// The client 5-tuple.
        tuple: FiveTuple,
        /// The datagram.
        data: Vec<u8>,
    },
    /// Ask the data plane to bind relay sockets; answer with
    /// [`crate::Server::handle_bind_result`].
    Bind(BindRequest),
    /// Apply this change to the data plane's table.
    Table(TableChange),
    /// A lifecycle event.
    Event(Event),
}
