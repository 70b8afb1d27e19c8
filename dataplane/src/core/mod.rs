//! The forwarding core of a worker, sans I/O: it owns no socket, reads no clock and
//! sends nothing. Every input carries `now`; what must happen comes out as [`Output`]s
//! pushed into a vector the caller owns. Nothing in this tree imports from the I/O
//! tree, `io/` (the `layers` test in `lib.rs` checks it): sockets are [`Token`]s here.
//!
//! Call order (the worker in `io/worker.rs` does this for both backends):
//! 1. [`Core::add_listen`] for every listening socket, [`Core::add_companion`] for every
//!    NAT discovery companion and [`Core::add_nat_group`] for every RFC 5780 group, at
//!    start;
//! 2. per received datagram, [`Core::handle_datagram`] with a [`Received`] (the receive
//!    slot it lies in, payload at [`HEADROOM`]); a [`Output::Transmit`] it produces
//!    names a range of that same slot, so nothing is copied; per message framed from a
//!    client connection, [`Core::handle_message`] with a [`Framed`], and
//!    [`Core::queued_to_client`] for what the worker then queued on a connection;
//! 3. per control command: [`Core::relays_bound`] once the worker bound relay sockets,
//!    [`Core::handle_change`] for table changes, [`Core::reply`] for a control-plane
//!    datagram to a client, [`Core::snapshot`];
//! 4. [`Core::handle_timeout`] when [`Core::poll_timeout`] has passed (the sweep);
//! 5. then act on every output: send transmits (batched by the backend), hand punts to
//!    the control plane, close sockets, set socket options.
//!
//! The per-datagram decisions are in [`path`], the table in [`table`], the Binding rate
//! limit in [`limit`]; [`framer`] and [`proxy`] are the sans-IO parts of TCP/TLS
//! connections (framing, send queue, half-close; PROXY headers), [`counters`] the
//! per-worker counters.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use turnpike_proto::turn::MAX_DATA_INDICATION_HEADER;

use crate::core::counters::{Counters, bump, bump_set};
use crate::core::path::is_channel_bind_success;
use crate::core::table::{Denied, Owner, Role, Table};
use crate::{AllocationSnapshot, BindingLimit, FiveTuple, Millis, Punted, TableChange};
use turnpike_plane::limit::{Limits, Rate, TwoLevelLimiter};

pub(crate) mod counters;
pub(crate) mod framer;
pub(crate) mod front;
pub(crate) mod path;
pub(crate) mod proxy;
pub(crate) mod table;

/// A socket, as the core knows it: an index the I/O side gives each socket it creates
/// (the worker's slab, `io/slab.rs`). The core names sockets only by token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Token(pub(crate) u32);

/// Bytes reserved in front of every received payload for the header written in place.
pub(crate) const HEADROOM: usize = MAX_DATA_INDICATION_HEADER;
/// Bytes kept free after the largest payload for a Data indication's padding.
pub(crate) const TAILROOM: usize = 4;
/// One receive buffer.
pub(crate) const SLOT: usize = 4096;
/// The largest datagram received whole.
pub(crate) const RECV_CAP: usize = SLOT - HEADROOM - TAILROOM;
/// Relay sockets bound but not claimed by an `AllocationAdd` for this long are closed.
pub(crate) const UNCLAIMED_BIND_MS: u64 = 30_000;
/// How often expired entries are swept.
pub(crate) const SWEEP_MS: u64 = 1_000;

/// A datagram to send: `len` bytes at `start` in receive slot `slot`, from socket `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transmit {
    pub(crate) from: Token,
    pub(crate) to: SocketAddr,
    pub(crate) slot: u32,
    pub(crate) start: u32,
    pub(crate) len: u32,
    /// Order of production, to keep per-socket order when transmits are grouped (set by
    /// the worker).
    pub(crate) seq: u32,
}

/// A datagram received on a socket of the worker: the input of
/// [`Core::handle_datagram`] (and of the worker's `on_datagram`).
#[derive(Debug)]
pub(crate) struct Received<'a> {
    /// The socket it arrived on.
    pub(crate) token: Token,
    /// Where it came from.
    pub(crate) src: SocketAddr,
    /// The receive slot it lies in, payload at [`HEADROOM`]; a [`Transmit`] decided on
    /// it names a range of this same slot.
    pub(crate) buf: &'a mut [u8],
    /// The payload's length.
    pub(crate) len: usize,
    /// The kernel cut it to fit the slot.
    pub(crate) truncated: bool,
    /// The slot's index, carried into the transmits.
    pub(crate) slot: u32,
}

/// One message (STUN or ChannelData) framed from a client connection's byte stream:
/// the input of [`Core::handle_message`].
#[derive(Debug)]
pub(crate) struct Framed<'a> {
    /// The connection's socket.
    pub(crate) conn: Token,
    /// The connection's 5-tuple (transport TCP or TLS).
    pub(crate) tuple: FiveTuple,
    /// A slot-sized scratch buffer, message at [`HEADROOM`].
    pub(crate) buf: &'a mut [u8],
    /// The message's length.
    pub(crate) len: usize,
    /// The index a [`Transmit`] decided on it names.
    pub(crate) slot: u32,
}

/// What the core asks its worker to do.
#[derive(Debug)]
pub(crate) enum Output {
    /// Send bytes of a receive slot: a relayed payload, with the ChannelData or Data
    /// indication header written in front of it, or a Binding answer.
    Transmit(Transmit),
    /// Hand a STUN request to the control plane.
    Punt(Punted),
    /// Send a control-plane datagram to a client from a listening socket.
    Reply {
        /// The listening socket.
        from: Token,
        /// The client.
        to: SocketAddr,
        /// The datagram.
        data: Vec<u8>,
    },
    /// Close this socket (a removed or expired allocation's relay, or one never claimed).
    Close(Token),
    /// Send with DF set from this relay socket (DONT-FRAGMENT).
    DontFragment(Token),
}

/// What a core starts with.
pub(crate) struct CoreConfig {
    /// The worker's index (in logs, punts and snapshots).
    pub(crate) id: usize,
    /// Accept RFC 5766 channel numbers (0x5000..=0x7FFF) as well.
    pub(crate) legacy_channels: bool,
    /// Deliver between this worker's allocations without the kernel (`path.rs`, the
    /// hairpin).
    pub(crate) hairpin: bool,
    pub(crate) binding_limit: BindingLimit,
    /// The denied peers, shared by every worker and replaced by the handle.
    pub(crate) denied: Arc<ArcSwap<Denied>>,
    pub(crate) ctr: Arc<Counters>,
}

/// A worker's forwarding state and decisions; see the module docs for the call order.
pub(crate) struct Core {
    pub(crate) id: usize,
    pub(crate) legacy_channels: bool,
    pub(crate) hairpin: bool,
    pub(crate) ctr: Arc<Counters>,
    pub(crate) denied: Arc<ArcSwap<Denied>>,
    pub(crate) table: Table,
    /// The `now` of the latest input, unix milliseconds.
    pub(crate) now: u64,
    next_sweep: u64,
    pub(crate) tid_state: u64,
    /// Binding answers (and 401 challenges) per source.
    pub(crate) binding_limit: TwoLevelLimiter,
    /// How to answer an unauthenticated Allocate (from the control plane): `None`
    /// punts it.
    pub(crate) challenge: Option<Arc<Challenger>>,
    /// Its limiter.
    pub(crate) challenge_limit: Option<TwoLevelLimiter>,
}

/// Answers the first, unauthenticated Allocate of a handshake as the control plane
/// would (a 401 with its realm and a nonce of its key), so that one of the four requests
/// of a handshake does not cross the seam.
#[derive(Debug)]
pub(crate) struct Challenger {
    pub(crate) realm: String,
    pub(crate) nonces: turnpike_proto::auth::NonceKey,
    /// The control plane's limit of unauthenticated answers.
    pub(crate) limits: Limits,
}

impl Challenger {
    /// From the control plane's configuration.
    pub(crate) fn new(c: &turnpike_plane::Challenge) -> Challenger {
        Challenger {
            realm: c.realm.clone(),
            nonces: turnpike_proto::auth::NonceKey::new(c.nonce_secret, c.nonce_lifetime_secs),
            limits: Limits {
                source: c.per_source,
                ip: c.per_ip,
                max_sources: 65_536,
                sweep_when_full: Some(10),
            },
        }
    }
}

impl Core {
    /// How to answer unauthenticated Allocates from now on (`None`: punt them), each
    /// worker with a limiter of its own at the control plane's rates.
    pub(crate) fn set_challenge(&mut self, c: Option<Arc<Challenger>>) {
        self.challenge_limit = c.as_ref().map(|c| TwoLevelLimiter::new(c.limits));
        self.challenge = c;
    }
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("id", &self.id)
            .field("allocs", &self.table.allocs.len())
            .finish_non_exhaustive()
    }
}

impl Core {
    pub(crate) fn new(now: Millis, cfg: CoreConfig) -> Core {
        Core {
            id: cfg.id,
            legacy_channels: cfg.legacy_channels,
            hairpin: cfg.hairpin,
            ctr: cfg.ctr,
            denied: cfg.denied,
            table: Table::default(),
            now: now.0,
            next_sweep: now.0.saturating_add(SWEEP_MS),
            binding_limit: TwoLevelLimiter::new(Limits {
                source: Rate::new(cfg.binding_limit.rate, cfg.binding_limit.burst),
                ip: Rate::new(cfg.binding_limit.ip_rate, cfg.binding_limit.ip_burst),
                max_sources: cfg.binding_limit.max_sources,
                // A full table is swept at most every 10 ms (as the data plane always did).
                sweep_when_full: Some(10),
            }),
            challenge: None,
            challenge_limit: None,
            tid_state: 0x9E37_79B9_7F4A_7C15
                ^ (cfg.id as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9)
                ^ now.0,
        }
    }

    /// Socket `t` listens on `local`.
    pub(crate) fn add_listen(&mut self, t: Token, local: SocketAddr) {
        self.table.add_listen(t, local);
    }

    /// Socket `t` is a NAT discovery companion on `local` (Binding only).
    pub(crate) fn add_companion(&mut self, t: Token, local: SocketAddr) {
        self.table.add_companion(t, local);
    }

    /// An RFC 5780 group of addresses: [IP1:P1, IP1:P2, IP2:P1, IP2:P2], each a
    /// listening socket or companion of this worker.
    pub(crate) fn add_nat_group(&mut self, group: crate::core::table::NatGroup) {
        self.table.add_nat_group(group);
    }

    /// The worker bound relay sockets (address asked, token) for `tuple`; a later
    /// `AllocationAdd` for the same 5-tuple and addresses claims them.
    pub(crate) fn relays_bound(
        &mut self,
        now: Millis,
        tuple: FiveTuple,
        relays: Vec<(SocketAddr, Token)>,
    ) {
        self.now = now.0;
        self.table.relays_bound(now.0, tuple, relays);
    }

    /// The worker bound relay sockets in advance (the pool): a later `AllocationAdd`
    /// naming their addresses claims them, whatever its 5-tuple.
    pub(crate) fn pool_bound(&mut self, now: Millis, relays: Vec<(SocketAddr, Token)>) {
        self.now = now.0;
        self.table.pool_bound(relays);
        bump_set(&self.ctr.relay_pool, self.table.pooled());
    }

    /// Closes the pooled relay sockets (the control plane that reserved their ports is
    /// gone).
    pub(crate) fn clear_pool(&mut self, out: &mut Vec<Output>) {
        self.table.clear_pool(out);
        bump_set(&self.ctr.relay_pool, 0);
    }

    /// A datagram arrived on a socket of the worker; pushes at most one output.
    pub(crate) fn handle_datagram(&mut self, now: Millis, rx: Received<'_>, out: &mut Vec<Output>) {
        let Received {
            token: t,
            src,
            buf,
            len,
            truncated,
            slot,
        } = rx;
        self.now = now.0;
        bump(&self.ctr.received, 1);
        if truncated || len > RECV_CAP || buf.len() < SLOT {
            bump(&self.ctr.malformed, 1);
            return;
        }
        let decision = match self.table.role(t) {
            Some(Role::Listen(local)) => {
                self.client_datagram(t, FiveTuple::udp(src, local), buf, len, out)
            }
            Some(Role::Companion(local)) => {
                self.companion_datagram(t, FiveTuple::udp(src, local), buf, len)
            }
            Some(Role::Relay(Owner::Alloc(id))) => self.peer_datagram(id, src, buf, len),
            // A relay not claimed yet, or a socket closed with datagrams still queued.
            Some(Role::Relay(Owner::Pending)) | None => {
                bump(&self.ctr.no_allocation, 1);
                None
            }
        };
        if let Some(forward) = decision {
            out.push(Output::Transmit(forward.in_slot(slot)));
        }
    }

    /// A client connection (TCP or TLS) `t` now carries `tuple`; `false` if another
    /// connection already has that 5-tuple.
    pub(crate) fn conn_opened(&mut self, t: Token, tuple: FiveTuple) -> bool {
        self.table.add_conn(tuple, t)
    }

    /// Client connection `t` of `tuple` closed: its allocation is removed at once (its
    /// relay sockets closed); returns it, for the control plane to be told.
    pub(crate) fn conn_closed(
        &mut self,
        t: Token,
        tuple: &FiveTuple,
        out: &mut Vec<Output>,
    ) -> Option<crate::AllocationId> {
        self.table.remove_conn(tuple, t, out)
    }

    /// Whether the 5-tuple has a live allocation (a connection without one is closed
    /// after the stream idle timeout).
    pub(crate) fn has_allocation(&self, tuple: &FiveTuple, now: Millis) -> bool {
        self.table.has_live_allocation(tuple, now.0)
    }

    /// One framed message from the client of a connection: decided exactly like a
    /// datagram on a listening socket. A [`Output::Transmit`] names the message's `slot`
    /// and a range of its buffer.
    pub(crate) fn handle_message(&mut self, now: Millis, msg: Framed<'_>, out: &mut Vec<Output>) {
        let Framed {
            conn: t,
            tuple,
            buf,
            len,
            slot,
        } = msg;
        self.now = now.0;
        bump(&self.ctr.received, 1);
        if len > RECV_CAP || buf.len() < SLOT {
            bump(&self.ctr.malformed, 1);
            return;
        }
        if let Some(forward) = self.client_datagram(t, tuple, buf, len, out) {
            out.push(Output::Transmit(forward.in_slot(slot)));
        }
    }

    /// A datagram relayed to the client of connection `tuple` (`payload` application
    /// bytes) is in the connection's send queue: it counts as relayed now, for the
    /// allocation's usage and the worker's counters. What goes to a connection is not
    /// counted when it is decided (`path.rs` `peer_datagram`), because a full send
    /// queue may still drop it; the worker reports only what it queued.
    pub(crate) fn queued_to_client(&mut self, tuple: &FiveTuple, payload: usize) {
        if let Some(a) = self.table.by_tuple_mut(tuple) {
            a.usage.to_client.packets += 1;
            a.usage.to_client.bytes += payload as u64;
        }
        bump(&self.ctr.to_client_packets, 1);
        bump(&self.ctr.to_client_bytes, payload as u64);
    }

    /// Applies a relay-table change.
    pub(crate) fn handle_change(
        &mut self,
        now: Millis,
        change: TableChange,
        out: &mut Vec<Output>,
    ) {
        self.now = now.0;
        let denied = self.denied.load();
        self.table
            .apply(self.id, now.0, change, &denied, &self.ctr, out);
        bump_set(&self.ctr.relay_pool, self.table.pooled());
    }

    /// The control plane answers the client of `tuple` with `data`: sent from the
    /// listening socket the client uses. A ChannelBind success response confirms the
    /// allocation's channels (see `Channel` in `table.rs`).
    pub(crate) fn reply(&mut self, tuple: FiveTuple, data: Vec<u8>, out: &mut Vec<Output>) {
        let Some(from) = self.table.client_token(&tuple) else {
            bump(&self.ctr.send_error, 1);
            return;
        };
        if is_channel_bind_success(&data) {
            self.table.confirm_channels(&tuple);
        }
        out.push(Output::Reply {
            from,
            to: tuple.client,
            data,
        });
    }

    /// When [`Core::handle_timeout`] next has work: the next sweep.
    pub(crate) fn poll_timeout(&self) -> Millis {
        Millis(self.next_sweep)
    }

    /// Runs the sweep if it is due: drops expired allocations (closing their sockets),
    /// permissions and channels, relay sockets never claimed, and forgotten rate-limit
    /// sources. Forwarding does not wait for it: every datagram checks the deadlines.
    pub(crate) fn handle_timeout(&mut self, now: Millis, out: &mut Vec<Output>) {
        self.now = now.0;
        if now.0 < self.next_sweep {
            return;
        }
        self.next_sweep = now.0.saturating_add(SWEEP_MS);
        self.binding_limit.sweep(now);
        if let Some(l) = &mut self.challenge_limit {
            l.sweep(now);
        }
        self.table.sweep(now.0, out);
    }

    /// Every allocation of this worker.
    pub(crate) fn snapshot(&self) -> Vec<AllocationSnapshot> {
        self.table.snapshot(self.id)
    }
}

#[cfg(test)]
mod tests;
