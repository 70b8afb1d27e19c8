//! Values that cross the control plane's boundary: the plane-to-plane contract (time,
//! 5-tuples, table changes, snapshots, binds: defined once in `turnpike_plane`)
//! and the outputs of the state machine.

use std::net::SocketAddr;

pub use turnpike_plane::{
    AllocationId, AllocationSnapshot, BindError, BindRequest, FiveTuple, Millis, TableChange,
    Transport,
};

pub use turnpike_plane::admin::EndReason;

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
        /// When it expires.
        deadline: Millis,
    },
    /// A channel was bound.
    ChannelBound {
        /// The allocation.
        id: AllocationId,
        /// The channel.
        channel: u16,
        /// The peer.
        peer: SocketAddr,
        /// When it expires.
        deadline: Millis,
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
