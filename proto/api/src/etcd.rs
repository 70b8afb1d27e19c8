//! The client side of etcd's v3 gRPC API, generated from the `.proto` files
//! vendored from etcd 3.4 into `proto/api/proto/etcd` (Apache-2.0, see the
//! `LICENSE` and `NOTICE` there).
//!
//! Only what turnpike uses is kept: the `KV` (`Range`, `Put`, `DeleteRange`,
//! `Txn`), `Watch` and `Lease` services of [`etcdserverpb`], with the messages
//! of [`mvccpb`], and the `Election` service of [`v3electionpb`]. Packages,
//! services, methods and field numbers are etcd's own, so these clients talk to
//! a real etcd server. As with [`v1`](crate::v1), there are no `connect`
//! constructors: hand a `tonic::transport::Channel` to `*Client::new`
//! (`turnpike_controlplane::etcd` wraps them).

/// Package `etcdserverpb`: the `KV`, `Watch` and `Lease` clients and their
/// messages.
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// Package `mvccpb`: [`KeyValue`](mvccpb::KeyValue) and
/// [`Event`](mvccpb::Event).
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

/// Package `v3electionpb`: the `Election` client and its messages.
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}
