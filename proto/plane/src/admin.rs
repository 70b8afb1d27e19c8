//! What the control plane tells its operators (the Admin API), as values: allocations,
//! the cell's statistics and lifecycle events. Times are on the control plane's clock;
//! `turnpike-api` shows them as wall-clock times.

use std::net::{IpAddr, SocketAddr};

use crate::{AllocationId, Usage};
use crate::{AllocationSnapshot, DropReason, FiveTuple, LoadReport, Millis, RelayIp, Transport};

/// An allocation as the Admin API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct AllocationView {
    /// The data plane it lives on.
    pub data_plane: String,
    /// The allocation with its permissions and channels.
    pub row: AllocationSnapshot,
    /// Its traffic as last reported.
    pub usage: Option<Usage>,
    /// When it was created.
    pub created: Millis,
}

/// The cell's statistics.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CellStats {
    /// Totals over the data planes.
    pub totals: Totals,
    /// Every known data plane, attached or not.
    pub data_planes: Vec<DataPlaneView>,
}

/// Totals over the cell.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Totals {
    /// Live allocations.
    pub allocations: u64,
    /// Distinct users with an allocation.
    pub users: u64,
    /// Data planes attached.
    pub data_planes_attached: u32,
    /// Relayed traffic, summed over the data planes' last reports.
    pub traffic: Usage,
    /// Drops by reason, summed over the data planes' last reports.
    pub drops: Vec<(DropReason, u64)>,
    /// Requests punted to the control plane.
    pub punted_requests: u64,
    /// Failed authentications.
    pub auth_failures: u64,
    /// Requests dropped by the unauthenticated rate limit.
    pub rate_limited: u64,
    /// Peers refused by policy.
    pub policy_denied: u64,
    /// Quota and capacity refusals.
    pub quota_rejected: u64,
    /// Messages of data planes that touched what they do not own.
    pub ownership_violations: u64,
    /// The per-user quota.
    pub user_quota: u32,
    /// The total quota.
    pub total_quota: u32,
}

/// A data plane, attached or gone.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DataPlaneView {
    /// Its id.
    pub id: String,
    /// Its software version.
    pub version: String,
    /// Whether it is attached now.
    pub attached: bool,
    /// Whether it is drained.
    pub draining: bool,
    /// Its workers.
    pub workers: u32,
    /// Where clients reach it.
    pub listening: Vec<(Transport, SocketAddr)>,
    /// The last batch version it acknowledged.
    pub acked_version: u64,
    /// Its last load report and when it arrived.
    pub load: Option<(LoadReport, Millis)>,
    /// When it attached or went away.
    pub changed: Millis,
    /// Its relay IPs.
    pub relay_ips: Vec<RelayIp>,
    /// When its process started, unix milliseconds (0: not said).
    pub started: u64,
}

/// Why an allocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The client sent Refresh with LIFETIME 0.
    Deleted,
    /// Its lifetime ran out.
    Expired,
    /// An operator revoked it.
    Revoked,
    /// The client's TCP or TLS connection closed.
    ConnectionClosed,
}

/// A lifecycle event for the Admin API's watchers.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminEvent {
    /// One more than the previous event's.
    pub sequence: u64,
    /// When it happened.
    pub at: Millis,
    /// The allocation.
    pub allocation: AllocationId,
    /// Its user.
    pub user: String,
    /// The data plane it lives on.
    pub data_plane: String,
    /// What happened.
    pub body: EventBody,
}

/// What happened to an allocation.
#[derive(Debug, Clone, PartialEq)]
pub enum EventBody {
    /// Created.
    Created {
        /// The client side.
        tuple: FiveTuple,
        /// Its relayed addresses.
        relays: Vec<SocketAddr>,
        /// When it expires unless refreshed (`None`: unknown).
        deadline: Option<Millis>,
    },
    /// Refreshed.
    Refreshed {
        /// The new deadline.
        deadline: Millis,
    },
    /// A permission was installed.
    PermissionAdded {
        /// The peer.
        peer: IpAddr,
        /// When it expires.
        deadline: Millis,
    },
    /// A channel was bound.
    ChannelAdded {
        /// The channel number.
        channel: u16,
        /// The peer.
        peer: SocketAddr,
        /// When it expires.
        deadline: Millis,
    },
    /// It ended.
    Deleted {
        /// Why.
        reason: EndReason,
        /// A detail (an operator's reason).
        detail: String,
        /// Its final traffic.
        usage: Option<Usage>,
    },
    /// Its traffic counters changed.
    Usage {
        /// Cumulative.
        total: Usage,
        /// Since the previous update.
        delta: Usage,
    },
}
