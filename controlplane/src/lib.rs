//! turnpike control plane: the TURN server logic (RFC 8656 over RFC 8489) as a sans-IO
//! state machine, with credentials, stateless nonces, port and allocation bookkeeping,
//! quotas and the peer policy.
//!
//! [`Server`] takes `(now, 5-tuple, datagram)` and appends [`Output`]s: responses to send,
//! relay sockets to bind, relay-table changes and lifecycle events. It reads no clock and
//! does no I/O (enforced by `clippy.toml`'s `disallowed-methods`). [`Cluster`] wraps it
//! for a cell of data planes (who owns what, drain, restore, the numbered batches of the
//! seam), also sans-IO: it takes [`turnpike_plane::Up`] and emits
//! [`turnpike_plane::Down`], and names no generated gRPC type. The actor, the gRPC
//! services, the in-process link and the etcd client are `turnpike-controlplane-runtime`.
#![forbid(unsafe_code)]

pub mod auth;
pub mod cluster;
pub mod fleet;
pub mod policy;
pub mod ports;
pub mod ratelimit;
pub mod server;
pub mod types;

pub use auth::{Credentials, rest_password};
pub use cluster::{Cluster, ClusterOutput, ConnId, DrainError, DrainState};
pub use policy::{Cidr, PeerPolicy, Verdict, canonical_ip};
pub use server::{AllocationInfo, Server, ServerConfig, Stats, Via, reason_phrase};
pub use types::{
    AllocationId, AllocationSnapshot, BindError, BindRequest, EndReason, Event, FiveTuple, Millis,
    Output, TableChange, Transport,
};
