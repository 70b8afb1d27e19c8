//! turnpike data plane: thread-per-core workers that forward TURN traffic.
//!
//! [`DataPlane::start`] spawns one pinned worker thread per core. Each owns an
//! SO_REUSEPORT socket on every listening address, the relay sockets of its allocations
//! and its shard of the relay table. Workers forward ChannelData and Send/Data
//! indications themselves, answer Binding requests, and punt every other STUN request
//! to the control plane through the [`ControlSink`] given at start. The control plane's
//! answers come back through a [`DataPlaneHandle`]: datagrams to send, relay sockets to
//! bind, and table changes, each queued to the owning worker and applied between batches.
#![allow(unsafe_code)]

use std::net::{IpAddr, SocketAddr};

mod counters;
mod engine;
mod mmsg;
mod plane;
mod sys;
mod uring;

pub use counters::{Drops, WorkerCounters};
pub use plane::{DataPlane, DataPlaneHandle};

/// Which I/O backend the workers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// io_uring if the kernel supports what we need, else `Mmsg`.
    #[default]
    Auto,
    /// io_uring: multishot RecvMsgMulti over a provided buffer ring, batched SendMsg.
    Uring,
    /// epoll + recvmmsg/sendmmsg.
    Mmsg,
}

/// Settings of the data plane.
#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    /// UDP addresses clients reach the server on.
    pub listen: Vec<SocketAddr>,
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    /// The I/O backend.
    pub backend: Backend,
    /// Pin workers to cores.
    pub pin: bool,
    /// Peers never relayed to (the server's own service sockets), checked on Send.
    pub denied_peers: Vec<SocketAddr>,
    /// SO_RCVBUF/SO_SNDBUF for every socket, in bytes.
    pub socket_buffer: usize,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        DataPlaneConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 3478))],
            workers: 0,
            backend: Backend::Auto,
            pin: true,
            denied_peers: Vec::new(),
            socket_buffer: 4 << 20,
        }
    }
}

/// A client 5-tuple as the data plane sees it (UDP only for now).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple {
    /// The client's address.
    pub client: SocketAddr,
    /// The local (listening) address it sent to.
    pub local: SocketAddr,
}

/// A STUN request a worker hands to the control plane.
#[derive(Debug, Clone)]
pub struct Punted {
    /// The worker that received it (and owns the 5-tuple).
    pub worker: usize,
    /// The 5-tuple.
    pub tuple: Tuple,
    /// The datagram.
    pub data: Vec<u8>,
}

/// Receives what workers hand to the control plane. Called from worker threads: keep it
/// cheap (push to a channel).
pub trait ControlSink: Send + Sync + 'static {
    /// A punted STUN request.
    fn punt(&self, p: Punted);
}

/// An allocation's identity (the control plane's id).
pub type AllocationKey = u64;

/// A relay-table change, applied by the worker that owns the allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Install an allocation whose relay sockets were bound by [`DataPlaneHandle::bind`].
    AllocationAdd {
        /// The allocation.
        id: AllocationKey,
        /// The client 5-tuple.
        tuple: Tuple,
        /// Relay addresses (bound earlier under the same 5-tuple).
        relays: Vec<SocketAddr>,
        /// Unix millis at which forwarding stops.
        deadline: u64,
        /// Bytes per second per direction; 0 unlimited.
        bandwidth: u64,
        /// Accounting user.
        user: String,
    },
    /// New deadline.
    AllocationRefresh {
        /// The allocation.
        id: AllocationKey,
        /// Unix millis.
        deadline: u64,
    },
    /// Remove and close its relay sockets.
    AllocationRemove {
        /// The allocation.
        id: AllocationKey,
    },
    /// Install or refresh a permission.
    PermissionSet {
        /// The allocation.
        id: AllocationKey,
        /// Peer IP.
        peer: IpAddr,
        /// Unix millis.
        deadline: u64,
    },
    /// Remove a permission.
    PermissionRemove {
        /// The allocation.
        id: AllocationKey,
        /// Peer IP.
        peer: IpAddr,
    },
    /// Bind or refresh a channel.
    ChannelSet {
        /// The allocation.
        id: AllocationKey,
        /// Channel number.
        channel: u16,
        /// Peer.
        peer: SocketAddr,
        /// Unix millis.
        deadline: u64,
    },
    /// Remove a channel.
    ChannelRemove {
        /// The allocation.
        id: AllocationKey,
        /// Channel number.
        channel: u16,
    },
}

/// What an allocation has relayed so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Datagrams relayed from the client to peers.
    pub to_peer_packets: u64,
    /// Application bytes relayed from the client to peers.
    pub to_peer_bytes: u64,
    /// Datagrams relayed from peers to the client.
    pub to_client_packets: u64,
    /// Application bytes relayed from peers to the client.
    pub to_client_bytes: u64,
}

/// One live allocation as a worker holds it: what the control plane needs to rebuild its
/// state after a restart, and to report usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationSnapshot {
    /// The allocation.
    pub id: AllocationKey,
    /// The worker that owns it.
    pub worker: usize,
    /// The client 5-tuple.
    pub tuple: Tuple,
    /// Relay addresses.
    pub relays: Vec<SocketAddr>,
    /// Unix millis at which forwarding stops.
    pub deadline: u64,
    /// Bytes per second per direction; 0 unlimited.
    pub bandwidth: u64,
    /// Accounting user.
    pub user: String,
    /// Installed permissions: peer IP and deadline (unix millis).
    pub permissions: Vec<(IpAddr, u64)>,
    /// Bound channels: number, peer and deadline (unix millis).
    pub channels: Vec<(u16, SocketAddr, u64)>,
    /// Traffic relayed so far.
    pub usage: Usage,
}
