//! turnpike data plane: thread-per-core workers that forward TURN traffic.
//!
//! [`DataPlane::start`] spawns one pinned worker thread per core. Each owns an
//! SO_REUSEPORT socket on every listening address, the relay sockets of its allocations
//! and its shard of the relay table. Workers forward ChannelData and Send/Data
//! indications themselves, answer Binding requests (rate-limited per source, see
//! [`BindingLimit`]; an answer is at most 24 bytes larger than its request), and punt every other STUN request
//! to the control plane through the [`ControlSink`] given at start. The control plane's
//! answers come back through a [`DataPlaneHandle`]: datagrams to send, relay sockets to
//! bind, and table changes, each queued to the owning worker and applied between batches.
//!
//! # Where things are
//!
//! Two trees, one rule: `core/` is the sans-IO forwarding core (no socket, no clock,
//! no thread), `io/` drives it with sockets and threads. The core imports nothing from
//! `io/` (a test, `layers`, checks it), so every forwarding rule runs without sockets.
//!
//! ```text
//! src/
//!   lib.rs        this page, the configuration, the re-exports
//!   core/         sans-IO: time, datagrams and table changes in, `Output`s out
//!     mod.rs      `Core`, its inputs (`Received`, `Framed`) and `Output`, the `Token`
//!     path.rs     the per-datagram decisions (a `Forward`, or a drop counted by reason)
//!     table.rs    allocations, permissions, channels, bandwidth buckets, the sweep
//!     limit.rs    the Binding rate limit
//!     framer.rs   TCP/TLS byte stream → messages, the send queue, half-close
//!     proxy.rs    PROXY protocol v1/v2 headers
//!     counters.rs the per-worker counters (atomics only its worker writes)
//!     tests.rs    the core's deterministic tests (virtual clock, no sockets)
//!   io/           threads, sockets and system calls
//!     start.rs    `DataPlane::start` and the `DataPlaneHandle`
//!     worker.rs   what both backends share: clock, command queue, acting on outputs
//!     uring.rs    the io_uring backend
//!     mmsg.rs     the epoll + recvmmsg/sendmmsg backend
//!     batch.rs    GSO grouping and the refused-GSO fallback (both backends)
//!     slab.rs     socket creation; the worker's sockets by `Token`
//!     conns.rs    TCP/TLS client connections in the workers
//!     sys.rs      raw socket calls
//!   xdp/          the XDP fast path: loader, map mirror, generated ABI
//!   agent/        the gRPC side of the plane stream
//!   sim.rs        (tests) the core driven by the control plane's cluster
//! ```
//!
//! A datagram's way from arrival to forwarding:
//! 1. a backend (`io/uring.rs` or `io/mmsg.rs`) receives it into a 4 KiB slot on a
//!    socket of the worker's slab (`io/slab.rs`, which creates and owns every socket; a
//!    socket is a `Token` everywhere else) and hands it to the worker (`io/worker.rs`) as
//!    a `Received`, with the clock value the backend read once for this loop turn;
//! 2. the worker passes it to the sans-IO core (`core/mod.rs`: `Core::handle_datagram`,
//!    which owns no socket, reads no clock and sends nothing);
//! 3. the core looks up the socket's role and the allocation in its table
//!    (`core/table.rs`: allocations, permissions, channels, bandwidth buckets, deadlines
//!    and the sweep) and decides (`core/path.rs`: one function per direction, each check
//!    in order, every drop counted by reason, a `Forward` when it is sent);
//! 4. the decision comes out as one `Output`: a `Transmit` (a byte range of the same
//!    slot, from a socket to an address), a `Punt` for the control plane, a `Reply`, or
//!    a socket to close or to set DONT-FRAGMENT on;
//! 5. the worker acts on the others and returns the transmits to the backend, which
//!    sends them in batches: GSO groups and the GSO-refusal fallback are shared
//!    (`io/batch.rs`), the calls are its own (sendmmsg, or io_uring SendMsg).
//!
//! Control commands from the [`DataPlaneHandle`] take the same way: the worker binds
//! relay sockets in its slab and tells the core (`Core::relays_bound`), and passes
//! table changes (`Core::handle_change`) and control-plane answers (`Core::reply`).
//! The deterministic tests of the forwarding rules drive `Core` with a virtual clock
//! (`core/tests.rs`); `tests/forwarding.rs` runs the same rules end to end on both
//! backends.
//!
//! # Packet path
//!
//! Every receive buffer is a 4 KiB slot with the payload at offset 48
//! ([`turnpike_proto::turn::MAX_DATA_INDICATION_HEADER`]) and 4 spare bytes at the end.
//! Client → peer, the payload (ChannelData after its 4-byte header, or a Send
//! indication's DATA) is sent as a slice of that slot. Peer → client, the ChannelData
//! header or the Data indication header is written into the 48 bytes in front of the
//! payload and the padding after it, and the whole range is sent. A Binding response is
//! written into the same slot after the request. Nothing is copied in user space and
//! nothing is allocated per datagram; only punted requests are copied (to hand them
//! over).
//!
//! With io_uring the 48 bytes are where the kernel wrote `io_uring_recvmsg_out` (16)
//! and the fixed 32-byte name field, read before they are overwritten; with
//! recvmmsg the name goes elsewhere and the iovec starts at offset 48.
//!
//! # Ownership and threads
//!
//! A worker owns its sockets, table shard and buffers; the only shared state is the
//! per-worker command queue (std `mpsc`, plus an eventfd to wake the worker), the
//! per-worker counters (atomics written by their worker alone: a relaxed load and store,
//! no locked instruction), and the denied-peer set (an `ArcSwap` snapshot read for each
//! Send indication, ChannelData, peer datagram and channel installed). An
//! `AllocationAdd` names its worker (the one the control plane asked to bind its relay
//! sockets); the handle remembers it to route the allocation's later changes, in a map
//! behind a mutex on the control path only.
//!
//! # Time
//!
//! Deadlines are unix milliseconds ([`Millis`]). Each worker reads the clock once per
//! loop turn and passes it to the core, which compares every allocation, permission
//! and channel deadline against it, so an entry stops forwarding at its deadline even
//! if no one removes it (drops counted as `expired`). A sweep once a second removes expired entries, closes the relay sockets
//! of expired allocations, and closes relay sockets bound but not claimed by an
//! `AllocationAdd` within 30 s.
//!
//! # Backends
//!
//! [`Backend::Auto`] probes io_uring on a throwaway thread (ring with
//! SINGLE_ISSUER|DEFER_TASKRUN, opcodes, EXT_ARG, buffer-ring registration, Linux 6.10
//! features for multishot recvmsg) and falls back to [`Backend::Mmsg`]. Both backends
//! share the worker (`io/worker.rs`) and its core (`core/`) and differ only in I/O:
//! - io_uring: one provided buffer ring of 1024 slots, a multishot `RecvMsgMulti` per
//!   socket (re-armed when it ends, e.g. on ENOBUFS after the ring ran dry), a
//!   `SendMsg` per datagram or GSO group from a fixed arena of send slots, and one
//!   `io_uring_enter` per loop turn that submits and waits for a single completion
//!   (waiting for many under a flood starves the buffer ring). A buffer goes back to
//!   the ring when its send completes.
//! - mmsg: level-triggered epoll, up to 4 recvmmsg of 64 per ready socket per turn, and
//!   the outputs of each batch grouped per sending socket into sendmmsg calls.
//!
//! Consecutive outputs of one batch of equal size from one socket to one destination go
//! as one UDP GSO send (`UDP_SEGMENT` cmsg, at most 64 segments and 63 KiB). GSO is
//! probed per socket; when the kernel refuses a GSO send (EIO/EINVAL) it is disabled
//! for that socket and the group is re-sent one datagram at a time.
//!
//! # Peers
//!
//! The server's own sockets are never peers. The denied set holds
//! [`DataPlaneConfig::denied_peers`] (or what [`DataPlaneHandle::set_denied_peers`]
//! installed) and always the actual listening addresses (ports chosen for port 0
//! included; a wildcard listening address denies every IP of its family on its port).
//! A channel to a denied peer is refused when installed (counted as
//! `channels_refused`), whatever permission the allocation has; Send indications and
//! ChannelData to a denied peer, and datagrams from one arriving on a relay socket, are
//! dropped as `denied_peer`. A peer with an unspecified IP is always denied.
//!
//! ChannelData needs a live permission for the channel's peer in both directions, as
//! Send and Data indications do (RFC 8656 §12). Peer → client, a new channel is used
//! only once the worker has sent the client a ChannelBind success response; until then
//! the peer's data goes as Data indications (see `Channel` in `core/table.rs`).
//!
//! # Bandwidth
//!
//! An allocation with a non-zero `bandwidth` has a token bucket per direction (bytes per
//! second, burst one second's worth, exact at millisecond steps). Each datagram costs
//! its application bytes plus the IP and UDP headers of the datagram sent (28 bytes to
//! an IPv4 address, 48 to IPv6), so that empty datagrams are not free; one that does not
//! fit is dropped and counted as `bandwidth`. Usage counts application bytes only.
// `unsafe` is denied workspace-wide and allowed only on the modules that talk to the
// kernel (raw socket calls, recvmmsg/sendmmsg, io_uring); each block says why it holds.
#![warn(clippy::undocumented_unsafe_blocks)]

use std::net::SocketAddr;

pub mod agent;
mod core;
mod io;
#[cfg(test)]
mod sim;
#[allow(unsafe_code)]
pub mod xdp;

pub use crate::core::counters::{Drops, StreamStats, WorkerCounters};
pub use crate::core::front::{Decision, Route, WebRules, classify_plain, classify_tls};
pub use crate::io::conns::{StreamLimits, StreamListen};
pub use crate::io::handover::{Inherited, WorkerSockets};
/// The link between the two processes of an upgrade: a Unix socket pair carrying
/// messages and descriptors.
pub mod upgrade_link {
    pub use crate::io::handover::{MAX_FDS, link_pair, recv_fds, send_fds, take_link};
}
pub use crate::io::front::{
    BACKEND_CONNECT_MS, FrontDoor, FrontDoorConfig, FrontListen, FrontStats, FrontStatsHandle,
};
pub use crate::io::start::{DataPlane, DataPlaneHandle};
pub use crate::io::sys::release_free_memory;
/// The plane-to-plane contract the data plane speaks, re-exported for its users.
pub use turnpike_plane::{
    AllocationId, AllocationSnapshot, BindError, FiveTuple, Millis, TableChange, Traffic,
    Transport, Usage,
};

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
    /// Peers never relayed to or from (the server's own service sockets). The actual
    /// listening addresses are always added.
    pub denied_peers: Vec<SocketAddr>,
    /// SO_RCVBUF/SO_SNDBUF for every socket, in bytes.
    pub socket_buffer: usize,
    /// Accept ChannelData on RFC 5766 channel numbers 0x5000..=0x7FFF too (the control
    /// plane binds them only when configured to).
    pub legacy_channel_numbers: bool,
    /// How many Binding requests a worker answers per source.
    pub binding_limit: BindingLimit,
    /// A client's datagram to another allocation's relayed address on the same worker
    /// is delivered without the kernel's round trip (the hairpin; on by default).
    pub hairpin: bool,
    /// TCP and TLS addresses clients connect to (each worker has its own SO_REUSEPORT
    /// socket on each and serves the connections it accepts).
    pub streams: Vec<StreamListen>,
    /// The TLS server configuration of the TLS listeners; replace it (certificate
    /// reload) and new connections use the new one while open ones keep theirs.
    pub tls: Option<std::sync::Arc<arc_swap::ArcSwap<rustls::ServerConfig>>>,
    /// Limits of client connections.
    pub stream_limits: StreamLimits,
    /// The XDP fast path: interfaces to attach the program to (none: off).
    pub xdp: xdp::XdpConfig,
    /// NAT behaviour discovery (RFC 5780): the server's alternate IP. Every UDP listening
    /// address IP1:P1 of its family gets companions IP1:P2, IP2:P1 and IP2:P2 (P2 =
    /// P1 + 1, coturn's scheme) that answer Binding requests only; Binding answers then
    /// carry RESPONSE-ORIGIN and OTHER-ADDRESS and honour CHANGE-REQUEST. `None`: off,
    /// and CHANGE-REQUEST is answered with 420.
    pub alt_ip: Option<std::net::IpAddr>,
    /// Sockets handed over by the process this one upgrades (`SIGUSR2`): listening
    /// sockets are taken instead of bound, relay sockets when their address is bound.
    pub inherited: Option<std::sync::Arc<Inherited>>,
}

/// How many Binding requests each worker answers per source; the others are dropped
/// and counted as `rate_limited`. The limits are per worker: the kernel spreads one
/// IP's ports over the workers, so one IP gets at most `workers × ip_rate` answers per
/// second in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingLimit {
    /// Answers per second per source IP and port; 0 turns this limit off.
    pub rate: u32,
    /// Burst per source IP and port.
    pub burst: u32,
    /// Answers per second per source IP, all its ports together; 0 turns this limit off.
    pub ip_rate: u32,
    /// Burst per source IP.
    pub ip_burst: u32,
    /// Sources (IP and port) and, separately, IPs a worker tracks. When a table is full,
    /// sources whose buckets have refilled are forgotten; new sources that still find no
    /// room share one bucket.
    pub max_sources: usize,
}

impl Default for BindingLimit {
    fn default() -> Self {
        BindingLimit {
            rate: 50,
            burst: 100,
            ip_rate: 250,
            ip_burst: 500,
            max_sources: 16384,
        }
    }
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
            legacy_channel_numbers: false,
            binding_limit: BindingLimit::default(),
            hairpin: true,
            streams: Vec::new(),
            tls: None,
            stream_limits: StreamLimits::default(),
            xdp: xdp::XdpConfig::default(),
            alt_ip: None,
            inherited: None,
        }
    }
}

/// A STUN request a worker hands to the control plane.
#[derive(Debug, Clone)]
pub struct Punted {
    /// The worker that received it (and owns the 5-tuple).
    pub worker: usize,
    /// The 5-tuple.
    pub tuple: FiveTuple,
    /// The datagram.
    pub data: Vec<u8>,
}

/// Receives what workers hand to the control plane. Called from worker threads: keep it
/// cheap (push to a channel).
pub trait ControlSink: Send + Sync + 'static {
    /// A punted STUN request.
    fn punt(&self, p: Punted);
    /// The client connection (TCP or TLS) of `tuple` on worker `worker` closed: its
    /// allocation, if any, has ended (RFC 8656 §3.1); the data plane has removed it
    /// already.
    fn connection_closed(&self, worker: usize, tuple: FiveTuple);
}

#[cfg(test)]
mod layers {
    use std::path::Path;

    /// Every line of the Rust files under `dir` that names the I/O tree.
    fn io_imports(dir: &Path, found: &mut Vec<String>) {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
            if path.is_dir() {
                io_imports(&path, found);
            } else if path.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                found.extend(
                    text.lines()
                        .filter(|l| l.contains("crate::io") || l.contains("super::io"))
                        .map(|l| format!("{}: {l}", path.display())),
                );
            }
        }
    }

    /// The sans-IO core imports nothing from the I/O tree (see "Where things are").
    #[test]
    fn core_imports_nothing_from_io() {
        let mut found = Vec::new();
        io_imports(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core"),
            &mut found,
        );
        assert!(
            found.is_empty(),
            "the core names the I/O tree:\n{}",
            found.join("\n")
        );
    }
}
