//! The control plane's I/O around the sans-IO [`turnpike_controlplane::Cluster`]: one
//! task (the actor) owns the cluster, reads the plane's [`turnpike_plane::Clock`] once
//! per turn, and carries the cluster's [`turnpike_plane::Down`] messages to the data
//! planes: over the gRPC `ControlPlane` service (split mode, mutual TLS), or over the
//! in-process link ([`ControlPlaneHandle::attach_local`]) that `serve` uses for its own
//! data plane. The `Admin` service is here too, and [`etcd`], a client of etcd's v3 API
//! (registry, leases, watches, leader election).
#![forbid(unsafe_code)]

pub mod etcd;
pub mod service;

pub use service::{
    AdminAuth, ControlPlaneHandle, DOWN_QUEUE, LocalDown, LocalRefused, LocalUp, RequireClientCert,
};
