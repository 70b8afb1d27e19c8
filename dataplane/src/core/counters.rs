//! Per-worker counters: written by one worker, read by anyone at any time.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a datagram was dropped, counted per reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drops {
    /// Not a well-formed STUN message or ChannelData frame (bad length, bad channel
    /// number, truncated, bad attribute).
    pub malformed: u64,
    /// Well-formed but not something the data plane handles (a STUN response, an
    /// indication other than Send, a non-TURN first byte).
    pub unexpected: u64,
    /// No allocation for the 5-tuple or relay socket.
    pub no_allocation: u64,
    /// No permission for the peer's IP.
    pub no_permission: u64,
    /// No channel bound under that number.
    pub no_channel: u64,
    /// The allocation's bandwidth limit was exhausted.
    pub bandwidth: u64,
    /// The peer is denied (one of the server's own sockets): a Send indication or
    /// ChannelData to it, or a datagram from it to a relay socket.
    pub denied_peer: u64,
    /// The kernel refused the send (or no socket was there to send from).
    pub send_error: u64,
    /// The allocation, permission or channel had passed its deadline.
    pub expired: u64,
    /// A Binding request over its source's rate limit ([`crate::BindingLimit`]).
    pub rate_limited: u64,
}

/// A snapshot of one worker's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerCounters {
    /// Datagrams relayed from clients to peers.
    pub to_peer_packets: u64,
    /// Application bytes relayed from clients to peers.
    pub to_peer_bytes: u64,
    /// Datagrams relayed from peers to clients.
    pub to_client_packets: u64,
    /// Application bytes relayed from peers to clients.
    pub to_client_bytes: u64,
    /// STUN requests handed to the control plane.
    pub punted: u64,
    /// Binding requests answered by the worker.
    pub binding_answered: u64,
    /// Unauthenticated Allocates answered by the worker with the control plane's 401.
    pub challenged: u64,
    /// Datagrams sent for the control plane ([`crate::DataPlaneHandle::send`]).
    pub control_sent: u64,
    /// Sends that carried several segments with UDP GSO.
    pub gso_sends: u64,
    /// Channel bindings refused because their peer is denied (one of the server's own
    /// sockets).
    pub channels_refused: u64,
    /// Datagrams received, on listening and relay sockets, whatever became of them.
    pub received_packets: u64,
    /// Relay sockets held bound in advance for the next allocations (a gauge).
    pub relay_pool: u64,
    /// Allocations with entries in the XDP program's maps (a gauge).
    pub xdp_allocations: u64,
    /// Datagrams from a client to the relayed address of another allocation of the
    /// same worker, delivered without the kernel's round trip (the hairpin); counted
    /// as relayed in both directions as well, when delivered.
    pub hairpinned: u64,
    /// Drops, by reason.
    pub dropped: Drops,
    /// Client connections over TCP and TLS.
    pub streams: StreamStats,
}

/// A snapshot of one worker's connection counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// TCP connections accepted.
    pub accepted_tcp: u64,
    /// TLS connections accepted.
    pub accepted_tls: u64,
    /// TCP connections open now (a gauge).
    pub open_tcp: u64,
    /// TLS connections open now (a gauge).
    pub open_tls: u64,
    /// Connections closed, for whatever reason.
    pub closed: u64,
    /// Connections refused (connection limits) and accepts that failed.
    pub refused: u64,
    /// Accepts that failed (out of descriptors, or the client gave up).
    pub accept_errors: u64,
    /// TLS handshakes completed.
    pub tls_handshakes: u64,
    /// TLS handshakes that failed or timed out.
    pub tls_failures: u64,
    /// Connections closed for malformed framing or a bad PROXY header.
    pub framing_errors: u64,
    /// Connections closed because their PROXY header declared what cannot be a client:
    /// an unspecified, broadcast or multicast source, port 0, the server's own address,
    /// or a datagram (UDP) connection.
    pub proxy_refused: u64,
    /// Messages larger than the largest relayed datagram, skipped.
    pub oversize: u64,
    /// Messages to a client dropped because its send queue was full (a slow client).
    pub send_dropped: u64,
    /// Connections closed for idleness (no allocation) or a late handshake.
    pub idle_closed: u64,
}

impl StreamStats {
    /// Every counter with its metric name (`snake_case`); the gauges are not included.
    pub fn counters(&self) -> [(&'static str, u64); 12] {
        [
            ("accepted_tcp", self.accepted_tcp),
            ("accepted_tls", self.accepted_tls),
            ("closed", self.closed),
            ("refused", self.refused),
            ("accept_errors", self.accept_errors),
            ("tls_handshakes", self.tls_handshakes),
            ("tls_failures", self.tls_failures),
            ("framing_errors", self.framing_errors),
            ("proxy_refused", self.proxy_refused),
            ("oversize", self.oversize),
            ("send_dropped", self.send_dropped),
            ("idle_closed", self.idle_closed),
        ]
    }
}

/// The live connection counters of one worker (see [`StreamStats`]).
#[derive(Debug, Default)]
pub(crate) struct StreamCounters {
    pub(crate) accepted_tcp: AtomicU64,
    pub(crate) accepted_tls: AtomicU64,
    pub(crate) open_tcp: AtomicU64,
    pub(crate) open_tls: AtomicU64,
    pub(crate) closed: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) accept_errors: AtomicU64,
    pub(crate) tls_handshakes: AtomicU64,
    pub(crate) tls_failures: AtomicU64,
    pub(crate) framing_errors: AtomicU64,
    pub(crate) proxy_refused: AtomicU64,
    pub(crate) oversize: AtomicU64,
    pub(crate) send_dropped: AtomicU64,
    pub(crate) idle_closed: AtomicU64,
}

impl StreamCounters {
    fn snapshot(&self) -> StreamStats {
        let r = |c: &AtomicU64| c.load(Relaxed);
        StreamStats {
            accepted_tcp: r(&self.accepted_tcp),
            accepted_tls: r(&self.accepted_tls),
            open_tcp: r(&self.open_tcp),
            open_tls: r(&self.open_tls),
            closed: r(&self.closed),
            refused: r(&self.refused),
            accept_errors: r(&self.accept_errors),
            tls_handshakes: r(&self.tls_handshakes),
            tls_failures: r(&self.tls_failures),
            framing_errors: r(&self.framing_errors),
            proxy_refused: r(&self.proxy_refused),
            oversize: r(&self.oversize),
            send_dropped: r(&self.send_dropped),
            idle_closed: r(&self.idle_closed),
        }
    }
}

impl Drops {
    /// Every reason with its count, named as in metrics (`snake_case`).
    pub fn by_reason(&self) -> [(&'static str, u64); 10] {
        [
            ("malformed", self.malformed),
            ("unexpected", self.unexpected),
            ("no_allocation", self.no_allocation),
            ("no_permission", self.no_permission),
            ("no_channel", self.no_channel),
            ("bandwidth", self.bandwidth),
            ("denied_peer", self.denied_peer),
            ("send_error", self.send_error),
            ("expired", self.expired),
            ("rate_limited", self.rate_limited),
        ]
    }
}

impl WorkerCounters {
    /// Drops by reason: [`Drops::by_reason`] of [`WorkerCounters::dropped`].
    pub fn drops(&self) -> [(&'static str, u64); 10] {
        self.dropped.by_reason()
    }
}

/// The live counters of one worker. Only the owning worker writes, so an increment is a
/// relaxed load and store: no locked instruction on the fast path.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Counters {
    pub(crate) to_peer_packets: AtomicU64,
    pub(crate) to_peer_bytes: AtomicU64,
    pub(crate) to_client_packets: AtomicU64,
    pub(crate) to_client_bytes: AtomicU64,
    pub(crate) punted: AtomicU64,
    pub(crate) binding_answered: AtomicU64,
    pub(crate) challenged: AtomicU64,
    pub(crate) control_sent: AtomicU64,
    pub(crate) gso_sends: AtomicU64,
    pub(crate) channels_refused: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) relay_pool: AtomicU64,
    pub(crate) xdp_allocations: AtomicU64,
    pub(crate) hairpinned: AtomicU64,
    pub(crate) malformed: AtomicU64,
    pub(crate) unexpected: AtomicU64,
    pub(crate) no_allocation: AtomicU64,
    pub(crate) no_permission: AtomicU64,
    pub(crate) no_channel: AtomicU64,
    pub(crate) bandwidth: AtomicU64,
    pub(crate) denied_peer: AtomicU64,
    pub(crate) send_error: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) streams: StreamCounters,
}

/// Adds `n` to a counter that only the calling thread writes.
#[inline]
pub(crate) fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
}

/// Sets a gauge that only the calling thread writes.
#[inline]
pub(crate) fn bump_set(c: &AtomicU64, v: usize) {
    c.store(v as u64, Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self) -> WorkerCounters {
        let r = |c: &AtomicU64| c.load(Relaxed);
        WorkerCounters {
            to_peer_packets: r(&self.to_peer_packets),
            to_peer_bytes: r(&self.to_peer_bytes),
            to_client_packets: r(&self.to_client_packets),
            to_client_bytes: r(&self.to_client_bytes),
            punted: r(&self.punted),
            binding_answered: r(&self.binding_answered),
            challenged: r(&self.challenged),
            control_sent: r(&self.control_sent),
            gso_sends: r(&self.gso_sends),
            channels_refused: r(&self.channels_refused),
            received_packets: r(&self.received),
            relay_pool: r(&self.relay_pool),
            xdp_allocations: r(&self.xdp_allocations),
            hairpinned: r(&self.hairpinned),
            dropped: Drops {
                malformed: r(&self.malformed),
                unexpected: r(&self.unexpected),
                no_allocation: r(&self.no_allocation),
                no_permission: r(&self.no_permission),
                no_channel: r(&self.no_channel),
                bandwidth: r(&self.bandwidth),
                denied_peer: r(&self.denied_peer),
                send_error: r(&self.send_error),
                expired: r(&self.expired),
                rate_limited: r(&self.rate_limited),
            },
            streams: self.streams.snapshot(),
        }
    }
}
