//! turnpike control plane: the TURN server logic (RFC 8656 over RFC 8489) as a sans-IO
//! state machine, with credentials, stateless nonces, port and allocation bookkeeping,
//! quotas and the peer policy.
//!
//! [`Server`] takes `(now, 5-tuple, datagram)` and appends [`Output`]s: responses to send,
//! relay sockets to bind, relay-table changes and lifecycle events. It reads no clock and
//! does no I/O (enforced by `clippy.toml`'s `disallowed-methods`). [`Cluster`] wraps it
//! for a cell of data planes (who owns what, drain, restore), also sans-IO; `service`
//! is the gRPC plumbing around the cluster, with the one clock read per turn. [`etcd`] is
//! a client of etcd's v3 API (registry, leases, watches, leader election).
#![forbid(unsafe_code)]

pub mod auth;
pub mod cluster;
pub mod etcd;
pub mod fleet;
pub mod policy;
pub mod ports;
pub mod ratelimit;
pub mod server;
pub mod service;
pub mod types;

pub use auth::{Credentials, rest_password};
pub use cluster::{Cluster, ClusterOutput, ConnId, DrainError, DrainState};
pub use policy::{Cidr, PeerPolicy, Verdict, canonical_ip};
pub use server::{AllocationInfo, Server, ServerConfig, Stats, Via, reason_phrase};
pub use service::{AdminAuth, ControlPlaneHandle, RequireClientCert};
pub use types::{
    AllocationId, AllocationSnapshot, BindError, BindRequest, EndReason, Event, FiveTuple, Millis,
    Output, TableChange, Transport,
};
