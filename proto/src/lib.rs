//! turnpike wire formats: everything that defines bytes on a wire, and nothing that does
//! I/O or reads a clock.
//!
//! - [`stun`]: STUN messages (RFC 8489): a borrowed zero-copy [`stun::Message`] parser and a
//!   [`stun::MessageWriter`] into caller-owned buffers.
//! - [`attr`]: STUN/TURN/ICE attributes, typed.
//! - [`auth`]: long-term credential keys, MESSAGE-INTEGRITY(-SHA256), FINGERPRINT.
//! - [`reason`]: the reason phrases of error codes.
//! - [`channel`]: TURN ChannelData frames and stream framing.
//! - [`demux`]: the RFC 7983 first-byte demultiplexer.
//! - [`turn`]: fast-path helpers for Send and Data indications and Binding responses.
//! - [`client`]: a sans-IO TURN client, reused by tests and the load generator.
//! - [`plane`]: the plane-to-plane contract, typed once (5-tuple, allocation id, table
//!   change, table snapshot, bind error), with its conversions to the gRPC messages.
//! - [`api`]: the gRPC API (`turnpike.v1`): the control-plane/data-plane stream and the
//!   admin service, generated from `proto/proto/turnpike/v1/*.proto`.
//! - [`etcd`]: the client side of etcd's v3 gRPC API (KV, Watch, Lease, Election), from
//!   the `.proto` files vendored into `proto/proto/etcd`.
//!
//! # Fuzzing
//!
//! `proto/fuzz` holds a libFuzzer target for the parsers; see its README for the command
//! that runs it on the stable toolchain.
#![forbid(unsafe_code)]

pub mod api;
pub mod attr;
pub mod auth;
pub mod channel;
pub mod client;
pub mod demux;
pub mod error;
pub mod etcd;
pub mod plane;
pub mod reason;
pub mod stun;
pub mod turn;

pub use error::{DecodeError, EncodeError};
