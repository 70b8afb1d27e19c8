//! The per-datagram forwarding decisions, in the order a datagram meets them.
//!
//! On a listening socket (client → server):
//! - ChannelData: the 5-tuple's live allocation, a channel bound under that number and
//!   live, a live permission for the channel's peer, a peer that is not denied, the
//!   relay socket of the peer's family, the bandwidth limit; then the payload is sent
//!   from the relay socket as is (a range of the receive slot).
//! - Send indication: the same, with the peer from XOR-PEER-ADDRESS and DATA sent.
//! - Binding request: answered in place (rate-limited per source).
//! - any other request: punted to the control plane; anything else is dropped.
//!
//! On a relay socket (peer → client): a peer that is not denied, the live allocation,
//! a live permission for the peer's IP, the bandwidth limit; then ChannelData if a
//! confirmed, live channel is bound to the peer, else a Data indication, its header
//! written into the headroom in front of the payload.
//!
//! A datagram from a client to the relayed address of another allocation of the same
//! worker (both ends of a call on this relay) is the hairpin: it is checked and counted
//! for the sender's allocation as it leaves, then for the receiver's as if it had come
//! back through the kernel, and delivered to the receiver's client at once
//! ([`Core::hairpin`]).
//!
//! Every drop is counted under its reason (see [`crate::Drops`]).

use std::net::SocketAddr;

use turnpike_proto::attr::{ChangeRequest, ErrorCode, UnknownAttributes};
use turnpike_proto::channel::{CHANNEL_HEADER_LEN, ChannelData};
use turnpike_proto::demux::{PacketKind, classify};
use turnpike_proto::stun::{
    Class, ClassicBindingRequest, Message, MessageWriter, Method, TransactionId, padded,
};
use turnpike_proto::turn::{
    SendIndication, data_indication_header_len, write_binding_response,
    write_classic_binding_response, write_data_indication_header, write_rfc5780_binding_response,
};

use crate::core::Token;
use crate::core::counters::bump;
use crate::core::table::{Channel, canonical};
use crate::core::{Core, HEADROOM, Output, Transmit};
use crate::{AllocationId, FiveTuple, Punted, Transport};

/// A decision to send: `len` bytes at `start` of the receive slot, from socket `from`
/// to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Forward {
    pub(crate) from: Token,
    pub(crate) to: SocketAddr,
    pub(crate) start: usize,
    pub(crate) len: usize,
}

impl Forward {
    /// The transmit of these bytes of receive slot number `slot`.
    pub(crate) fn in_slot(self, slot: u32) -> Transmit {
        Transmit {
            from: self.from,
            to: self.to,
            slot,
            start: self.start as u32,
            len: self.len as u32,
            seq: 0,
        }
    }
}

/// What the bandwidth limit charges per datagram on top of its application bytes: the
/// IP and UDP headers of the datagram sent to `to`, so that empty datagrams are not free.
pub(crate) const fn wire_overhead(to: &SocketAddr) -> usize {
    match to {
        SocketAddr::V4(_) => 20 + 8,
        SocketAddr::V6(_) => 40 + 8,
    }
}

/// Whether a datagram the control plane sends is a ChannelBind success response.
pub(crate) fn is_channel_bind_success(d: &[u8]) -> bool {
    Message::parse(d)
        .is_ok_and(|m| (m.method(), m.class()) == (Method::CHANNEL_BIND, Class::Success))
}

/// The server's addresses for an RFC 5780 Binding answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rfc5780 {
    /// RESPONSE-ORIGIN: the address the answer is sent from.
    pub(crate) origin: SocketAddr,
    /// OTHER-ADDRESS: the address differing in IP and port from the one asked.
    pub(crate) other: SocketAddr,
}

/// Answers a Binding request (RFC 8489 §7.3) into `out`: the success response (with
/// RESPONSE-ORIGIN and OTHER-ADDRESS when the server does NAT behaviour discovery,
/// `nat`), or a 420 with a short reason phrase so that the answer to a request with
/// unknown comprehension-required attributes (each at least 4 bytes of the request, at
/// most [`turnpike_proto::stun::MAX_UNKNOWN`] listed) is at most 24 bytes larger than the
/// request, as the success response to an IPv6 source is: an unauthenticated answer
/// must not amplify much. CHANGE-REQUEST is understood only with `nat`: a server
/// without an alternate address answers it with 420 (RFC 5780 §6.1).
pub(crate) fn write_binding_answer(
    out: &mut [u8],
    req: &Message<'_>,
    mapped: SocketAddr,
    nat: Option<Rfc5780>,
) -> Result<usize, turnpike_proto::error::EncodeError> {
    let mut unknown = [0u16; turnpike_proto::stun::MAX_UNKNOWN];
    let mut n = 0;
    for &t in req.unknown_required() {
        if nat.is_some() && t == turnpike_proto::attr::CHANGE_REQUEST {
            continue;
        }
        if let Some(u) = unknown.get_mut(n) {
            *u = t;
            n += 1;
        }
    }
    let unknown = unknown.get(..n).unwrap_or_default();
    if unknown.is_empty() {
        return match nat {
            Some(Rfc5780 { origin, other }) => {
                write_rfc5780_binding_response(out, req, mapped, origin, other)
            }
            None => write_binding_response(out, req, mapped),
        };
    }
    let mut w = MessageWriter::new(out, Method::BINDING, Class::Error, req.transaction_id())?;
    w.add(&ErrorCode {
        code: 420,
        reason: "Unknown",
    })?;
    w.add(&UnknownAttributes::new(unknown))?;
    if req.has_fingerprint() {
        w.add_fingerprint()?;
    }
    Ok(w.finish())
}

impl Core {
    fn next_tid(&mut self) -> TransactionId {
        // xorshift64*: transaction ids of Data indications need only be unlikely to
        // repeat, not unpredictable.
        let mut next = || {
            let mut x = self.tid_state;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.tid_state = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let a = next().to_ne_bytes();
        let b = next().to_ne_bytes();
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&a);
        t[8..].copy_from_slice(&b[..4]);
        TransactionId(t)
    }

    fn max_channel(&self) -> u16 {
        if self.legacy_channels {
            turnpike_proto::attr::CHANNEL_MAX_LEGACY
        } else {
            turnpike_proto::attr::CHANNEL_MAX
        }
    }

    /// Client → peer, or the worker's own answer, or a punt.
    pub(crate) fn client_datagram(
        &mut self,
        listen: Token,
        tuple: FiveTuple,
        buf: &mut [u8],
        len: usize,
        out: &mut Vec<Output>,
    ) -> Option<Forward> {
        let now = self.now;
        let pkt = buf.get(HEADROOM..HEADROOM + len)?;
        let kind = match (classify(pkt), pkt.first()) {
            (PacketKind::Other, Some(0x50..=0x7F)) if self.legacy_channels => {
                PacketKind::ChannelData
            }
            (k, _) => k,
        };
        match kind {
            PacketKind::ChannelData => {
                let Ok(cd) = ChannelData::parse_up_to(pkt, self.max_channel()) else {
                    bump(&self.ctr.malformed, 1);
                    return None;
                };
                let (channel, n) = (cd.channel, cd.payload.len());
                let a = self.table.live_by_tuple(&tuple, now, &self.ctr)?;
                let Some(&Channel { peer, deadline, .. }) = a.channels.get(&channel) else {
                    bump(&self.ctr.no_channel, 1);
                    return None;
                };
                if now >= deadline {
                    bump(&self.ctr.expired, 1);
                    return None;
                }
                // A channel's peer needs a live permission too (RFC 8656 §12), and the
                // server's own sockets are never peers, whatever the table says.
                if !a.permits(&peer.ip(), now, &self.ctr) {
                    return None;
                }
                if self.denied.load().contains(&peer) {
                    bump(&self.ctr.denied_peer, 1);
                    return None;
                }
                let from = self.admit_to_peer(&tuple, &peer, n)?;
                let start = HEADROOM + CHANNEL_HEADER_LEN;
                if let Some(delivered) = self.hairpin(&tuple, &peer, buf, start, n) {
                    return delivered;
                }
                Some(Forward {
                    from,
                    to: peer,
                    start,
                    len: n,
                })
            }
            PacketKind::Stun => {
                let Ok(msg) = Message::parse(pkt) else {
                    // RFC 5389 §12.2: an RFC 3489 client's Binding request (no magic
                    // cookie) is answered too; any other message without it is dropped.
                    if ClassicBindingRequest::parse(pkt).is_some() {
                        return self.answer_binding(listen, tuple, buf, len);
                    }
                    bump(&self.ctr.malformed, 1);
                    return None;
                };
                match (msg.method(), msg.class()) {
                    (Method::BINDING, Class::Request) => {
                        self.answer_binding(listen, tuple, buf, len)
                    }
                    (Method::SEND, Class::Indication) => {
                        let Ok(ind) = SendIndication::from_message(&msg) else {
                            bump(&self.ctr.malformed, 1);
                            return None;
                        };
                        let peer = canonical(ind.peer);
                        let n = ind.data.len();
                        // Where DATA lies in the slot: its offset from the slot's start.
                        let start = ind.data.as_ptr() as usize - buf.as_ptr() as usize;
                        let a = self.table.live_by_tuple(&tuple, now, &self.ctr)?;
                        if self.denied.load().contains(&peer) {
                            bump(&self.ctr.denied_peer, 1);
                            return None;
                        }
                        if !a.permits(&peer.ip(), now, &self.ctr) {
                            return None;
                        }
                        let from = self.admit_to_peer(&tuple, &peer, n)?;
                        if let Some(delivered) = self.hairpin(&tuple, &peer, buf, start, n) {
                            return delivered;
                        }
                        Some(Forward {
                            from,
                            to: peer,
                            start,
                            len: n,
                        })
                    }
                    (Method::ALLOCATE, Class::Request)
                        if self.challenge.is_some()
                            && !msg.has_integrity()
                            && !msg.has_integrity_sha256()
                            && msg.verify_fingerprint().is_ok() =>
                    {
                        self.answer_challenge(listen, tuple, buf, len)
                    }
                    (_, Class::Request) => {
                        bump(&self.ctr.punted, 1);
                        out.push(Output::Punt(Punted {
                            worker: self.id,
                            tuple,
                            data: pkt.to_vec(),
                        }));
                        None
                    }
                    _ => {
                        bump(&self.ctr.unexpected, 1);
                        None
                    }
                }
            }
            _ => {
                bump(&self.ctr.unexpected, 1);
                None
            }
        }
    }

    /// The last checks before relaying `n` bytes to `peer`: the relay socket of the
    /// peer's family and the bandwidth limit; accounts the packet.
    fn admit_to_peer(&mut self, tuple: &FiveTuple, peer: &SocketAddr, n: usize) -> Option<Token> {
        let now = self.now;
        let a = self.table.by_tuple_mut(tuple)?;
        let Some(from) = a.relay_for(peer) else {
            bump(&self.ctr.send_error, 1);
            return None;
        };
        if !a.up.take(a.bandwidth, now, n + wire_overhead(peer)) {
            bump(&self.ctr.bandwidth, 1);
            return None;
        }
        a.usage.to_peer.packets += 1;
        a.usage.to_peer.bytes += n as u64;
        bump(&self.ctr.to_peer_packets, 1);
        bump(&self.ctr.to_peer_bytes, n as u64);
        Some(from)
    }

    /// A datagram on a NAT discovery companion: Binding requests are answered as on a
    /// listening socket; nothing else is served there (no TURN, no relaying).
    pub(crate) fn companion_datagram(
        &mut self,
        at: Token,
        tuple: FiveTuple,
        buf: &mut [u8],
        len: usize,
    ) -> Option<Forward> {
        let pkt = buf.get(HEADROOM..HEADROOM + len)?;
        let binding = Message::parse(pkt)
            .is_ok_and(|m| (m.method(), m.class()) == (Method::BINDING, Class::Request));
        if !binding {
            bump(&self.ctr.unexpected, 1);
            return None;
        }
        self.answer_binding(at, tuple, buf, len)
    }

    /// Answers the first, unauthenticated Allocate of a handshake with the control
    /// plane's 401 (its realm, a nonce of its key, the password algorithms), within the
    /// control plane's limit of unauthenticated answers.
    fn answer_challenge(
        &mut self,
        listen: Token,
        tuple: FiveTuple,
        buf: &mut [u8],
        len: usize,
    ) -> Option<Forward> {
        let c = self.challenge.clone()?;
        let now = crate::Millis(self.now);
        if !self
            .challenge_limit
            .as_mut()
            .is_none_or(|l| l.allow(tuple.client, now))
        {
            bump(&self.ctr.rate_limited, 1);
            return None;
        }
        let at = padded(HEADROOM + len);
        let (head, tail) = buf.split_at_mut_checked(at)?;
        let msg = Message::parse(head.get(HEADROOM..HEADROOM + len)?).ok()?;
        let nonce = c.nonces.mint(self.now / 1000, &tuple.client);
        match turnpike_proto::turn::write_challenge(tail, &msg, 401, &c.realm, &nonce) {
            Ok(n) => {
                bump(&self.ctr.challenged, 1);
                Some(Forward {
                    from: listen,
                    to: tuple.client,
                    start: at,
                    len: n,
                })
            }
            Err(_) => {
                // Too long for the slot (a long realm): the control plane answers it.
                bump(&self.ctr.punted, 1);
                None
            }
        }
    }

    /// Answers a Binding request, RFC 5389 or classic RFC 3489, if its source is within
    /// the Binding rate limit. With NAT behaviour discovery, the answer carries
    /// RESPONSE-ORIGIN and OTHER-ADDRESS and leaves from the socket CHANGE-REQUEST
    /// names.
    fn answer_binding(
        &mut self,
        listen: Token,
        tuple: FiveTuple,
        buf: &mut [u8],
        len: usize,
    ) -> Option<Forward> {
        if !self
            .binding_limit
            .allow(tuple.client, crate::Millis(self.now))
        {
            bump(&self.ctr.rate_limited, 1);
            return None;
        }
        // The answer goes in the slot right after the request.
        let at = padded(HEADROOM + len);
        let (head, tail) = buf.split_at_mut_checked(at)?;
        let req = head.get(HEADROOM..HEADROOM + len)?;
        let mut from = listen;
        let answer = match Message::parse(req) {
            Ok(msg) => {
                let Ok(change) = msg.attr::<ChangeRequest>() else {
                    bump(&self.ctr.malformed, 1);
                    return None;
                };
                let change = change.unwrap_or_default();
                let nat = self
                    .table
                    .nat_answer(&tuple.server, change.change_ip, change.change_port)
                    .map(|(t, origin, other)| {
                        from = t;
                        Rfc5780 { origin, other }
                    });
                write_binding_answer(tail, &msg, tuple.client, nat)
            }
            Err(_) => write_classic_binding_response(
                tail,
                &ClassicBindingRequest::parse(req)?,
                tuple.client,
            ),
        };
        match answer {
            Ok(n) => {
                bump(&self.ctr.binding_answered, 1);
                Some(Forward {
                    from,
                    to: tuple.client,
                    start: at,
                    len: n,
                })
            }
            Err(_) => {
                bump(&self.ctr.malformed, 1);
                None
            }
        }
    }

    /// The hairpin: client A relays `n` bytes (at `start` in `buf`) to `peer`, which is
    /// the relayed address of allocation B of this worker. Instead of sending them out
    /// of A's relay socket for the kernel to bring back to B's, they are delivered to
    /// B's client here, decided exactly as [`Core::peer_datagram`] decides a datagram
    /// from A's relayed address: B's deadline, B's permission for A's relayed IP, B's
    /// bandwidth limit, B's channel (confirmed) or a Data indication, B's usage. A's
    /// side (permission, denied peers, A's bandwidth and usage) was checked and counted
    /// by the caller, as for any datagram leaving A's relay socket.
    ///
    /// `None` when this is not a hairpin the worker completes: the peer is no relayed
    /// address of this worker (another worker's, reached through the kernel, or not
    /// this server's), or B's client is on a connection (whose sends the worker counts
    /// itself). `Some(decision)` otherwise, `Some(None)` when B's rules drop it.
    fn hairpin(
        &mut self,
        a: &FiveTuple,
        peer: &SocketAddr,
        buf: &mut [u8],
        start: usize,
        n: usize,
    ) -> Option<Option<Forward>> {
        if !self.hairpin {
            return None;
        }
        let b = self.table.by_relay(peer)?;
        if self.table.allocs.get(&b)?.tuple.transport != Transport::Udp {
            return None;
        }
        let src = self
            .table
            .by_tuple_mut(a)
            .and_then(|a| a.relayed_addr_for(peer))?;
        let delivered = self.deliver(b, src, buf, start, n);
        if delivered.is_some() {
            bump(&self.ctr.hairpinned, 1);
        }
        Some(delivered)
    }

    /// Peer → client: ChannelData if a confirmed channel is bound to the peer, else a
    /// Data indication, its header written into the headroom in front of the payload.
    pub(crate) fn peer_datagram(
        &mut self,
        id: AllocationId,
        peer: SocketAddr,
        buf: &mut [u8],
        len: usize,
    ) -> Option<Forward> {
        self.deliver(id, peer, buf, HEADROOM, len)
    }

    /// `len` bytes at `at` in `buf` from `peer` to the client of allocation `id`, as
    /// [`Core::peer_datagram`] describes; the header goes in front of `at`, a Data
    /// indication's padding after the payload.
    fn deliver(
        &mut self,
        id: AllocationId,
        peer: SocketAddr,
        buf: &mut [u8],
        at: usize,
        len: usize,
    ) -> Option<Forward> {
        let now = self.now;
        let tid = self.next_tid();
        let peer = canonical(peer);
        // Nothing from the server's own sockets is relayed: a datagram from a listening
        // socket to a relay socket is a loop (the server answering its own relay).
        if self.denied.load().contains(&peer) {
            bump(&self.ctr.denied_peer, 1);
            return None;
        }
        let Some(a) = self.table.allocs.get_mut(&id) else {
            bump(&self.ctr.no_allocation, 1);
            return None;
        };
        if now >= a.deadline {
            bump(&self.ctr.expired, 1);
            return None;
        }
        if !a.permits(&peer.ip(), now, &self.ctr) {
            return None;
        }
        let Some(listen) = a.listen else {
            bump(&self.ctr.send_error, 1);
            return None;
        };
        if !a
            .down
            .take(a.bandwidth, now, len + wire_overhead(&a.tuple.client))
        {
            bump(&self.ctr.bandwidth, 1);
            return None;
        }
        // Unconfirmed channels are not used in this direction yet (see `Channel`).
        let channel = a.peer_channel.get(&peer).copied().filter(|c| {
            a.channels
                .get(c)
                .is_some_and(|ch| ch.peer == peer && ch.confirmed && now < ch.deadline)
        });
        let (start, total) = match channel {
            Some(c) => {
                let header = ChannelData::header(c, len).ok()?;
                let start = at.checked_sub(CHANNEL_HEADER_LEN)?;
                buf.get_mut(start..at)?.copy_from_slice(&header);
                (start, CHANNEL_HEADER_LEN + len)
            }
            None => {
                let hlen = data_indication_header_len(&peer);
                let start = at.checked_sub(hlen)?;
                write_data_indication_header(buf.get_mut(start..at)?, tid, &peer, len).ok()?;
                let end = at + padded(len);
                buf.get_mut(at + len..end)?.fill(0);
                (start, end - start)
            }
        };
        // A client connection's send queue may still refuse it: the worker counts it
        // once queued (`Core::queued_to_client`).
        if a.tuple.transport == Transport::Udp {
            a.usage.to_client.packets += 1;
            a.usage.to_client.bytes += len as u64;
            bump(&self.ctr.to_client_packets, 1);
            bump(&self.ctr.to_client_bytes, len as u64);
        }
        Some(Forward {
            from: listen,
            to: a.tuple.client,
            start,
            len: total,
        })
    }
}
