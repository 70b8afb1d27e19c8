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
//!
//! The plane contract (`turnpike-plane`, in `proto/plane`) and the gRPC API
//! (`turnpike-api`, in `proto/api`) are crates of their own: this one depends on no RPC,
//! async or TLS crate, so the fuzz target and the load generator build without them.
//!
//! # Fuzzing
//!
//! `proto/fuzz` holds a libFuzzer target for the parsers; see its README for the command
//! that runs it on the stable toolchain.
#![forbid(unsafe_code)]

pub mod attr;
pub mod auth;
pub mod channel;
pub mod client;
pub mod demux;
pub mod error;
pub mod reason;
pub mod stun;
pub mod turn;

pub use error::{DecodeError, EncodeError};
