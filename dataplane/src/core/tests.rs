//! The forwarding rules, driven with a virtual clock: no sockets, no sleeps. Tokens
//! stand for the sockets a worker would have bound.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use turnpike_proto::attr::{Data, ErrorCode, UnknownAttributes, XorMappedAddress, XorPeerAddress};
use turnpike_proto::channel::ChannelData;
use turnpike_proto::client::Client;
use turnpike_proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

use super::*;
use crate::core::path::write_binding_answer;
use crate::{AllocationId, Drops};

const LISTEN: Token = Token(0);
const RELAY: Token = Token(1);
const T0: u64 = 1_700_000_000_000;
const ID: AllocationId = AllocationId(1);

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|_| unreachable!())
}

fn server() -> SocketAddr {
    addr("198.51.100.1:3478")
}
fn client() -> SocketAddr {
    addr("203.0.113.5:40000")
}
fn relay() -> SocketAddr {
    addr("198.51.100.1:50000")
}
fn peer() -> SocketAddr {
    addr("192.0.2.7:6000")
}
fn tuple() -> FiveTuple {
    FiveTuple::udp(client(), server())
}

/// What the core asked for, with the bytes of a transmit copied out of its slot.
#[derive(Debug, PartialEq, Eq)]
enum Did {
    Send(Token, SocketAddr, Vec<u8>),
    Other(String),
}

/// A core with one listening socket, driven at a virtual `now`.
struct H {
    core: Core,
    now: u64,
}

impl H {
    fn new(denied: Denied, limit: BindingLimit) -> H {
        let mut core = Core::new(
            Millis(T0),
            CoreConfig {
                id: 0,
                legacy_channels: false,
                hairpin: true,
                binding_limit: limit,
                denied: Arc::new(ArcSwap::from_pointee(denied)),
                ctr: Arc::new(Counters::default()),
            },
        );
        core.add_listen(LISTEN, server());
        H { core, now: T0 }
    }

    /// With an allocation for [`tuple`] on relay socket [`RELAY`], until `deadline`.
    fn allocated(deadline: u64, bandwidth: u64) -> H {
        let mut h = H::new(Denied::new([server()]), BindingLimit::default());
        h.core
            .relays_bound(Millis(T0), tuple(), vec![(relay(), RELAY)]);
        let out = h.change(add(deadline, bandwidth, false));
        assert!(out.is_empty(), "{out:?}");
        h
    }

    fn change(&mut self, c: TableChange) -> Vec<Output> {
        let mut out = Vec::new();
        self.core.handle_change(Millis(self.now), c, &mut out);
        out
    }

    fn permit(&mut self, peer: SocketAddr, deadline: u64) {
        self.change(TableChange::PermissionSet {
            id: ID,
            peer: peer.ip(),
            deadline: Millis(deadline),
        });
    }

    fn channel(&mut self, channel: u16, peer: SocketAddr, deadline: u64) {
        self.change(TableChange::ChannelSet {
            id: ID,
            channel,
            peer,
            deadline: Millis(deadline),
            confirmed: false,
        });
    }

    fn feed(&mut self, t: Token, src: SocketAddr, pkt: &[u8]) -> Vec<Did> {
        let mut buf = vec![0u8; SLOT];
        buf[HEADROOM..HEADROOM + pkt.len()].copy_from_slice(pkt);
        let mut out = Vec::new();
        let rx = Received {
            token: t,
            src,
            buf: &mut buf,
            len: pkt.len(),
            truncated: false,
            slot: 0,
        };
        self.core.handle_datagram(Millis(self.now), rx, &mut out);
        out.into_iter()
            .map(|o| match o {
                Output::Transmit(tx) => {
                    let at = tx.start as usize;
                    Did::Send(tx.from, tx.to, buf[at..at + tx.len as usize].to_vec())
                }
                o => Did::Other(format!("{o:?}")),
            })
            .collect()
    }

    fn client_sends(&mut self, pkt: &[u8]) -> Vec<Did> {
        self.feed(LISTEN, client(), pkt)
    }

    fn peer_sends(&mut self, peer: SocketAddr, data: &[u8]) -> Vec<Did> {
        self.feed(RELAY, peer, data)
    }

    fn timeout(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        self.core.handle_timeout(Millis(self.now), &mut out);
        out
    }

    fn drops(&self) -> Drops {
        self.core.ctr.snapshot().dropped
    }
}

/// AllocationAdd of allocation [`ID`] for [`tuple`] on [`relay`].
fn add(deadline: u64, bandwidth: u64, dont_fragment: bool) -> TableChange {
    TableChange::AllocationAdd {
        id: ID,
        tuple: tuple(),
        relays: vec![relay()],
        deadline: Millis(deadline),
        bandwidth,
        user: "u".into(),
        username: "name".into(),
        dont_fragment,
    }
}

fn channel_data(channel: u16, data: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; data.len() + 8];
    let n = Client::channel_data(channel, data, &mut buf).unwrap_or_else(|e| panic!("{e:?}"));
    buf.truncate(n);
    buf
}

fn send_indication(peer: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; data.len() + 64];
    let n = Client::new("u", "p", 1)
        .send_indication(peer, data, &mut buf)
        .unwrap_or_else(|e| panic!("{e:?}"));
    buf.truncate(n);
    buf
}

fn message(method: Method, class: Class) -> Vec<u8> {
    let mut buf = [0u8; 64];
    let w = MessageWriter::new(&mut buf, method, class, TransactionId([3; 12]))
        .unwrap_or_else(|e| panic!("{e:?}"));
    let n = w.finish();
    buf[..n].to_vec()
}

/// A Data indication's peer and data.
fn data_indication(d: &[u8]) -> (SocketAddr, Vec<u8>) {
    assert_eq!(d.len() % 4, 0, "not padded");
    let m = Message::parse(d).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!((m.method(), m.class()), (Method::DATA, Class::Indication));
    let p = m.attr::<XorPeerAddress>().ok().flatten().map(|p| p.0);
    let data = m.attr::<Data<'_>>().ok().flatten().map(|d| d.0.to_vec());
    (
        p.unwrap_or_else(|| panic!("no peer")),
        data.unwrap_or_default(),
    )
}

const FAR: u64 = T0 + 600_000;

#[test]
fn channel_data_needs_a_channel_and_a_permission() {
    let mut h = H::allocated(FAR, 0);
    assert!(h.client_sends(&channel_data(0x4000, b"hi")).is_empty());
    assert_eq!(h.drops().no_channel, 1);
    h.channel(0x4000, peer(), FAR);
    assert!(h.client_sends(&channel_data(0x4000, b"hi")).is_empty());
    assert_eq!(h.drops().no_permission, 1);
    h.permit(peer(), FAR);
    assert_eq!(
        h.client_sends(&channel_data(0x4000, b"hi")),
        vec![Did::Send(RELAY, peer(), b"hi".to_vec())]
    );
    // Another 5-tuple has no allocation.
    let other = h.feed(LISTEN, addr("203.0.113.6:1"), &channel_data(0x4000, b"hi"));
    assert!(other.is_empty());
    assert_eq!(h.drops().no_allocation, 1);
    let usage = h.core.snapshot()[0].usage;
    assert_eq!((usage.to_peer.packets, usage.to_peer.bytes), (1, 2));
}

#[test]
fn send_indication_needs_a_permission() {
    let mut h = H::allocated(FAR, 0);
    assert!(h.client_sends(&send_indication(peer(), b"data")).is_empty());
    assert_eq!(h.drops().no_permission, 1);
    // A permission is per IP: any port of the peer.
    h.permit(addr("192.0.2.7:1"), FAR);
    assert_eq!(
        h.client_sends(&send_indication(peer(), b"data")),
        vec![Did::Send(RELAY, peer(), b"data".to_vec())]
    );
    // No IPv6 relay for an IPv6 peer.
    let v6 = addr("[2001:db8::7]:1");
    h.permit(v6, FAR);
    assert!(h.client_sends(&send_indication(v6, b"data")).is_empty());
    assert_eq!(h.drops().send_error, 1);
}

#[test]
fn peer_data_goes_as_data_indications_until_the_channel_is_confirmed() {
    let mut h = H::allocated(FAR, 0);
    // No permission: nothing reaches the client.
    assert!(h.peer_sends(peer(), b"x").is_empty());
    assert_eq!(h.drops().no_permission, 1);
    h.permit(peer(), FAR);
    h.channel(0x4001, peer(), FAR);
    let [Did::Send(from, to, d)] = &h.peer_sends(peer(), b"abc")[..] else {
        panic!("one transmit expected");
    };
    assert_eq!((*from, *to), (LISTEN, client()));
    assert_eq!(data_indication(d), (peer(), b"abc".to_vec()));
    // The control plane's ChannelBind success response confirms the channel.
    let mut out = Vec::new();
    let ok = message(Method::CHANNEL_BIND, Class::Success);
    h.core.reply(tuple(), ok.clone(), &mut out);
    assert!(
        matches!(&out[..], [Output::Reply { from, to, data }] if (*from, *to, data) == (LISTEN, client(), &ok))
    );
    let [Did::Send(_, _, d)] = &h.peer_sends(peer(), b"abc")[..] else {
        panic!("one transmit expected");
    };
    let cd = ChannelData::parse(d).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!((cd.channel, cd.payload), (0x4001, &b"abc"[..]));
    // Another port of the same IP has no channel: Data indication.
    let [Did::Send(_, _, d)] = &h.peer_sends(addr("192.0.2.7:6001"), b"z")[..] else {
        panic!("one transmit expected");
    };
    assert_eq!(data_indication(d).0, addr("192.0.2.7:6001"));
    // Client → peer, a channel forwards before it is confirmed.
    h.channel(0x4002, addr("192.0.2.7:6002"), FAR);
    assert_eq!(h.client_sends(&channel_data(0x4002, b"q")).len(), 1);
}

#[test]
fn entries_stop_at_their_deadlines() {
    let mut h = H::allocated(T0 + 10_000, 0);
    h.permit(peer(), T0 + 2_000);
    h.channel(0x4000, peer(), T0 + 1_000);
    h.now = T0 + 999;
    assert_eq!(h.client_sends(&channel_data(0x4000, b"a")).len(), 1);
    // The channel expires at its deadline, before any sweep.
    h.now = T0 + 1_000;
    assert!(h.client_sends(&channel_data(0x4000, b"a")).is_empty());
    assert_eq!(h.drops().expired, 1);
    assert_eq!(h.client_sends(&send_indication(peer(), b"a")).len(), 1);
    assert_eq!(h.peer_sends(peer(), b"a").len(), 1);
    // Then the permission, both ways.
    h.now = T0 + 2_000;
    assert!(h.client_sends(&send_indication(peer(), b"a")).is_empty());
    assert!(h.peer_sends(peer(), b"a").is_empty());
    assert_eq!(h.drops().expired, 3);
    // The sweep is due once a second and removes what expired.
    assert!(h.timeout().is_empty());
    let snap = h.core.snapshot();
    assert_eq!((snap[0].permissions.len(), snap[0].channels.len()), (0, 0));
    // A refresh moves the allocation's deadline.
    h.change(TableChange::AllocationRefresh {
        id: ID,
        deadline: Millis(T0 + 20_000),
    });
    h.permit(peer(), T0 + 30_000);
    h.now = T0 + 19_999;
    assert_eq!(h.peer_sends(peer(), b"a").len(), 1);
    h.now = T0 + 20_000;
    assert!(h.peer_sends(peer(), b"a").is_empty());
    assert!(h.client_sends(&send_indication(peer(), b"a")).is_empty());
    assert_eq!(h.drops().expired, 5);
    // The sweep closes its relay socket.
    assert!(matches!(&h.timeout()[..], [Output::Close(RELAY)]));
    assert!(h.core.snapshot().is_empty());
    assert!(h.peer_sends(peer(), b"a").is_empty());
    assert_eq!(h.drops().no_allocation, 1);
}

#[test]
fn sweep_closes_unclaimed_relays() {
    let mut h = H::new(Denied::default(), BindingLimit::default());
    h.core
        .relays_bound(Millis(T0), tuple(), vec![(relay(), RELAY)]);
    // Bound, not claimed: nothing relayed.
    assert!(h.peer_sends(peer(), b"a").is_empty());
    assert_eq!(h.drops().no_allocation, 1);
    h.now = T0 + UNCLAIMED_BIND_MS - 1;
    assert!(h.timeout().is_empty());
    // The next sweep is a second later.
    h.now = T0 + UNCLAIMED_BIND_MS;
    assert!(h.timeout().is_empty());
    h.now = T0 + UNCLAIMED_BIND_MS - 1 + SWEEP_MS;
    assert!(matches!(&h.timeout()[..], [Output::Close(RELAY)]));
    // An AllocationAdd after that finds no relay socket.
    let out = h.change(add(FAR, 0, true));
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn allocation_add_claims_relays_and_asks_for_dont_fragment() {
    let mut h = H::new(Denied::default(), BindingLimit::default());
    h.core
        .relays_bound(Millis(T0), tuple(), vec![(relay(), RELAY)]);
    let out = h.change(add(FAR, 0, true));
    assert!(matches!(&out[..], [Output::DontFragment(RELAY)]), "{out:?}");
    assert!(h.core.snapshot()[0].dont_fragment);
    // Removing it closes the relay.
    let out = h.change(TableChange::AllocationRemove { id: ID });
    assert!(matches!(&out[..], [Output::Close(RELAY)]), "{out:?}");
}

#[test]
fn bandwidth_limit_per_direction() {
    // 1000 B/s: a 100-byte payload to an IPv4 peer costs 128 bytes.
    let mut h = H::allocated(FAR, 1000);
    h.permit(peer(), FAR);
    let data = [7u8; 100];
    for _ in 0..7 {
        assert_eq!(h.client_sends(&send_indication(peer(), &data)).len(), 1);
    }
    assert!(h.client_sends(&send_indication(peer(), &data)).is_empty());
    assert_eq!(h.drops().bandwidth, 1);
    // The other direction has its own bucket.
    assert_eq!(h.peer_sends(peer(), &data).len(), 1);
    // 104 bytes left; 24 more come back in 24 ms.
    h.now += 23;
    assert!(h.client_sends(&send_indication(peer(), &data)).is_empty());
    h.now += 1;
    assert_eq!(h.client_sends(&send_indication(peer(), &data)).len(), 1);
    assert_eq!(h.drops().bandwidth, 2);
}

#[test]
fn denied_peers_are_never_relayed() {
    let mut h = H::allocated(FAR, 0);
    // The server's own listening address, with a permission for its IP.
    h.permit(server(), FAR);
    assert!(h.client_sends(&send_indication(server(), b"a")).is_empty());
    assert_eq!(h.drops().denied_peer, 1);
    assert!(h.peer_sends(server(), b"a").is_empty());
    assert_eq!(h.drops().denied_peer, 2);
    // A channel to it is refused when installed.
    h.channel(0x4000, server(), FAR);
    assert_eq!(h.core.ctr.snapshot().channels_refused, 1);
    assert!(h.core.snapshot()[0].channels.is_empty());
    // The handle replaces the set: a channel installed before stops forwarding.
    h.permit(peer(), FAR);
    h.channel(0x4001, peer(), FAR);
    assert_eq!(h.client_sends(&channel_data(0x4001, b"a")).len(), 1);
    h.core.denied.store(Arc::new(Denied::new([peer()])));
    assert!(h.client_sends(&channel_data(0x4001, b"a")).is_empty());
    assert_eq!(h.drops().denied_peer, 3);
}

#[test]
fn channel_to_denied_peer_refused() {
    // A wildcard listen on port 3478: any IP on that port is the server's own.
    let mut h = H::allocated(FAR, 0);
    h.core
        .denied
        .store(Arc::new(Denied::new([addr("0.0.0.0:3478")])));
    for p in ["192.0.2.1:3478", "0.0.0.0:9", "[::ffff:10.0.0.1]:3478"] {
        h.channel(0x4000, addr(p), u64::MAX);
    }
    h.channel(0x4001, addr("192.0.2.1:3479"), u64::MAX);
    let snap = h.core.snapshot();
    assert_eq!(
        snap[0].channels,
        vec![(0x4001, addr("192.0.2.1:3479"), Millis(u64::MAX))]
    );
    assert_eq!(snap[0].username, "name");
    assert_eq!(h.core.ctr.snapshot().channels_refused, 3);
}

#[test]
fn channels_confirmed_by_bind_response() {
    let mut h = H::allocated(FAR, 0);
    let confirmed = |h: &H, c| h.core.table.allocs[&ID].channels[&c].confirmed;
    h.channel(0x4000, addr("192.0.2.1:1"), FAR);
    assert!(!confirmed(&h, 0x4000));
    // Any other answer confirms nothing.
    let mut out = Vec::new();
    h.core
        .reply(tuple(), message(Method::REFRESH, Class::Success), &mut out);
    h.core.reply(
        tuple(),
        message(Method::CHANNEL_BIND, Class::Error),
        &mut out,
    );
    assert!(!confirmed(&h, 0x4000));
    h.core.reply(
        tuple(),
        message(Method::CHANNEL_BIND, Class::Success),
        &mut out,
    );
    assert!(confirmed(&h, 0x4000));
    assert_eq!(out.len(), 3);
    // A refresh keeps the state; a new channel, or a number moved to another peer,
    // starts over.
    h.channel(0x4000, addr("192.0.2.1:1"), FAR);
    h.channel(0x4001, addr("192.0.2.2:1"), FAR);
    assert!(confirmed(&h, 0x4000) && !confirmed(&h, 0x4001));
    h.channel(0x4000, addr("192.0.2.3:1"), FAR);
    assert!(!confirmed(&h, 0x4000));
    // A reply to a 5-tuple on an address not listened on is a send error.
    h.core.reply(
        FiveTuple::udp(client(), addr("198.51.100.2:3478")),
        vec![1],
        &mut out,
    );
    assert_eq!(out.len(), 3);
    assert_eq!(h.drops().send_error, 1);
}

#[test]
fn binding_requests_answered_within_the_rate_limit() {
    let limit = BindingLimit {
        rate: 1,
        burst: 2,
        ..BindingLimit::default()
    };
    let mut h = H::new(Denied::default(), limit);
    let req = message(Method::BINDING, Class::Request);
    for _ in 0..2 {
        let [Did::Send(from, to, d)] = &h.client_sends(&req)[..] else {
            panic!("one answer expected");
        };
        assert_eq!((*from, *to), (LISTEN, client()));
        let m = Message::parse(d).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((m.method(), m.class()), (Method::BINDING, Class::Success));
        assert_eq!(m.transaction_id(), TransactionId([3; 12]));
        let mapped = m.attr::<XorMappedAddress>().ok().flatten().map(|a| a.0);
        assert_eq!(mapped, Some(client()));
    }
    assert!(h.client_sends(&req).is_empty());
    assert_eq!(h.drops().rate_limited, 1);
    // One answer a second refills.
    h.now += 1000;
    assert_eq!(h.client_sends(&req).len(), 1);
}

#[test]
fn other_requests_are_punted_and_the_rest_dropped() {
    let mut h = H::new(Denied::default(), BindingLimit::default());
    let req = message(Method::ALLOCATE, Class::Request);
    let out = h.client_sends(&req);
    assert_eq!(out.len(), 1);
    let Did::Other(punt) = &out[0] else {
        panic!("{out:?}");
    };
    assert!(punt.starts_with("Punt("), "{punt}");
    assert_eq!(h.core.ctr.snapshot().punted, 1);
    // A response, an indication other than Send, and noise.
    assert!(
        h.client_sends(&message(Method::BINDING, Class::Success))
            .is_empty()
    );
    assert!(h.client_sends(&[0xFF; 20]).is_empty());
    assert_eq!(h.drops().unexpected, 2);
    // A truncated ChannelData frame.
    assert!(h.client_sends(&[0x40, 0x00, 0x00, 0x09, 1]).is_empty());
    assert_eq!(h.drops().malformed, 1);
}

/// A Binding request: `unknown` comprehension-required attributes this codec does not
/// know, then FINGERPRINT if asked.
fn binding_request(unknown: u16, fingerprint: bool) -> Vec<u8> {
    let mut buf = [0u8; 512];
    let mut w = MessageWriter::new(
        &mut buf,
        Method::BINDING,
        Class::Request,
        TransactionId([7; 12]),
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    for i in 0..unknown {
        w.add_raw(turnpike_proto::attr::AttrType(0x7F00 + i), &[])
            .unwrap_or_else(|e| panic!("{e:?}"));
    }
    if fingerprint {
        w.add_fingerprint().unwrap_or_else(|e| panic!("{e:?}"));
    }
    let n = w.finish();
    buf[..n].to_vec()
}

#[test]
fn binding_answers_barely_larger_than_requests() {
    let v4 = addr("192.0.2.1:1");
    let v6 = addr("[2001:db8::1]:1");
    for unknown in [0, 1, 2, 7, 8, 9, 20] {
        for fp in [false, true] {
            let req = binding_request(unknown, fp);
            let msg = Message::parse(&req).unwrap_or_else(|e| panic!("{e:?}"));
            assert_eq!(msg.has_fingerprint(), fp);
            for src in [v4, v6] {
                let mut out = [0u8; 512];
                let n = write_binding_answer(&mut out, &msg, src, None)
                    .unwrap_or_else(|e| panic!("{e:?}"));
                let ans = Message::parse(&out[..n]).unwrap_or_else(|e| panic!("{e:?}"));
                let class = if unknown == 0 {
                    Class::Success
                } else {
                    Class::Error
                };
                assert_eq!((ans.method(), ans.class()), (Method::BINDING, class));
                if unknown > 0 {
                    let e = ans.attr::<ErrorCode<'_>>().ok().flatten();
                    assert_eq!(e.map(|e| e.code), Some(420));
                    let listed = ans.attr::<UnknownAttributes<'_>>().ok().flatten();
                    assert_eq!(
                        listed.map(|u| u.types().count()),
                        Some(usize::from(unknown).min(turnpike_proto::stun::MAX_UNKNOWN))
                    );
                }
                assert!(
                    n <= req.len() + 24,
                    "{unknown} unknown, fingerprint {fp}, {src}: {n} bytes answer {}",
                    req.len()
                );
            }
        }
    }
}

#[test]
fn a_pooled_relay_is_claimed_by_address_kept_by_the_sweep_and_closed_on_clear() {
    let mut h = H::new(Denied::default(), BindingLimit::default());
    let other = addr("192.0.2.10:50001");
    h.core
        .pool_bound(Millis(T0), vec![(relay(), RELAY), (other, Token(2))]);
    assert_eq!(
        h.core
            .ctr
            .relay_pool
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    // The sweep leaves pooled sockets alone, however long they wait.
    h.now = T0 + 10 * UNCLAIMED_BIND_MS;
    assert!(h.timeout().is_empty());
    // An AllocationAdd naming a pooled address claims it, for any 5-tuple.
    let out = h.change(add(FAR, 0, false));
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(h.core.snapshot()[0].relays, vec![relay()]);
    assert_eq!(
        h.core
            .ctr
            .relay_pool
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Clearing the pool closes what is left, not the allocation's relay.
    let mut out = Vec::new();
    h.core.clear_pool(&mut out);
    assert!(
        matches!(&out[..], [Output::Close(t)] if *t != RELAY),
        "{out:?}"
    );
    assert_eq!(h.core.snapshot().len(), 1);
}

/// A TCP client's allocation: its messages come from the connection, everything to it
/// goes out on the connection's token, and closing the connection ends it at once.
#[test]
fn tcp_connection_carries_its_allocation_and_ends_it() {
    const CONN: Token = Token(7);
    let tcp = FiveTuple {
        transport: crate::Transport::Tcp,
        client: client(),
        server: server(),
    };
    let mut h = H::new(Denied::new([server()]), BindingLimit::default());
    assert!(h.core.conn_opened(CONN, tcp));
    // Another connection cannot claim the same 5-tuple (a PROXY header lying).
    assert!(!h.core.conn_opened(Token(8), tcp));
    h.core.relays_bound(Millis(T0), tcp, vec![(relay(), RELAY)]);
    let out = h.change(TableChange::AllocationAdd {
        id: ID,
        tuple: tcp,
        relays: vec![relay()],
        deadline: Millis(FAR),
        bandwidth: 0,
        user: "u".into(),
        username: "name".into(),
        dont_fragment: false,
    });
    assert!(out.is_empty(), "{out:?}");
    h.permit(peer(), FAR);
    h.channel(0x4000, peer(), FAR);

    // Client → peer: the message, framed by the worker, goes through the same rules.
    let cd = channel_data(0x4000, b"hello");
    let mut buf = vec![0u8; SLOT];
    buf[HEADROOM..HEADROOM + cd.len()].copy_from_slice(&cd);
    let mut out = Vec::new();
    let msg = Framed {
        conn: CONN,
        tuple: tcp,
        buf: &mut buf,
        len: cd.len(),
        slot: 0,
    };
    h.core.handle_message(Millis(h.now), msg, &mut out);
    match out.as_slice() {
        [Output::Transmit(tx)] => {
            assert_eq!((tx.from, tx.to), (RELAY, peer()));
            let at = tx.start as usize;
            assert_eq!(&buf[at..at + tx.len as usize], b"hello");
        }
        o => panic!("{o:?}"),
    }
    // The same bytes on the UDP listening socket belong to another 5-tuple.
    assert!(h.client_sends(&cd).is_empty());

    // Peer → client: out on the connection (a Data indication until the bind is
    // confirmed by a ChannelBind success sent on that connection).
    match h.peer_sends(peer(), b"back").as_slice() {
        [Did::Send(t, to, d)] => {
            assert_eq!((*t, *to), (CONN, client()));
            assert_eq!(data_indication(d), (peer(), b"back".to_vec()));
        }
        o => panic!("{o:?}"),
    }
    // Relayed to a connection, it counts once the worker has queued it (a full send
    // queue drops it): not at the decision.
    let to_client = |h: &H| {
        let u = h.core.snapshot()[0].usage.to_client;
        let c = h.core.ctr.snapshot();
        (u.packets, u.bytes, c.to_client_packets, c.to_client_bytes)
    };
    assert_eq!(to_client(&h), (0, 0, 0, 0));
    h.core.queued_to_client(&tcp, 4);
    assert_eq!(to_client(&h), (1, 4, 1, 4));
    // A control-plane answer to the TCP client goes out on the connection too.
    let mut out = Vec::new();
    h.core
        .reply(tcp, message(Method::REFRESH, Class::Success), &mut out);
    assert!(
        matches!(out.as_slice(), [Output::Reply { from: CONN, .. }]),
        "{out:?}"
    );

    // The connection closes: the allocation ends now, its relay socket closes.
    let mut out = Vec::new();
    assert_eq!(h.core.conn_closed(CONN, &tcp, &mut out), Some(ID));
    assert!(matches!(out.as_slice(), [Output::Close(RELAY)]), "{out:?}");
    assert!(!h.core.has_allocation(&tcp, Millis(h.now)));
    assert!(h.peer_sends(peer(), b"late").is_empty());
    // Closing again, or closing a connection that never had the tuple, does nothing.
    assert_eq!(h.core.conn_closed(CONN, &tcp, &mut out), None);
    assert_eq!(h.core.conn_closed(Token(8), &tcp, &mut out), None);
}

fn change_request(change_ip: bool, change_port: bool) -> Vec<u8> {
    let mut buf = [0u8; 64];
    let mut w = MessageWriter::new(
        &mut buf,
        Method::BINDING,
        Class::Request,
        TransactionId([5; 12]),
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    w.add(&turnpike_proto::attr::ChangeRequest {
        change_ip,
        change_port,
    })
    .unwrap_or_else(|e| panic!("{e:?}"));
    let n = w.finish();
    buf[..n].to_vec()
}

#[test]
fn change_request_without_an_alternate_address_is_420() {
    let mut h = H::new(Denied::default(), BindingLimit::default());
    let [Did::Send(from, _, d)] = &h.client_sends(&change_request(true, true))[..] else {
        panic!("one answer expected");
    };
    assert_eq!(*from, LISTEN);
    let m = Message::parse(d).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(m.class(), Class::Error);
    let unknown = m
        .attr::<turnpike_proto::attr::UnknownAttributes>()
        .ok()
        .flatten()
        .map(|u| u.types().collect::<Vec<_>>());
    assert_eq!(unknown, Some(vec![turnpike_proto::attr::CHANGE_REQUEST]));
    // And a plain Binding answer carries no RFC 5780 attribute.
    let [Did::Send(_, _, d)] = &h.client_sends(&message(Method::BINDING, Class::Request))[..]
    else {
        panic!("one answer expected");
    };
    let m = Message::parse(d).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(!m.has(turnpike_proto::attr::AttrType(
        turnpike_proto::attr::OTHER_ADDRESS
    )));
}

#[test]
fn rfc5780_answers_leave_from_the_socket_change_request_names() {
    use turnpike_proto::attr::{OtherAddress, ResponseOrigin};
    let mut h = H::new(Denied::default(), BindingLimit::default());
    let group = [
        server(),
        addr("198.51.100.1:3479"),
        addr("198.51.100.2:3478"),
        addr("198.51.100.2:3479"),
    ];
    let tokens = [LISTEN, Token(10), Token(11), Token(12)];
    for i in 1..4 {
        h.core.add_companion(tokens[i], group[i]);
    }
    h.core.add_nat_group(group);
    for i in 0..4 {
        for (ci, cp) in [(false, false), (true, false), (false, true), (true, true)] {
            let req = change_request(ci, cp);
            let [Did::Send(from, to, d)] = &h.feed(tokens[i], client(), &req)[..] else {
                panic!("one answer expected");
            };
            let j = i ^ (usize::from(ci) << 1) ^ usize::from(cp);
            assert_eq!((*from, *to), (tokens[j], client()));
            let m = Message::parse(d).unwrap_or_else(|e| panic!("{e:?}"));
            assert_eq!(m.class(), Class::Success);
            assert_eq!(
                m.attr::<ResponseOrigin>().ok().flatten(),
                Some(ResponseOrigin(group[j]))
            );
            assert_eq!(
                m.attr::<OtherAddress>().ok().flatten(),
                Some(OtherAddress(group[i ^ 3]))
            );
            assert_eq!(
                m.attr::<XorMappedAddress>().ok().flatten(),
                Some(XorMappedAddress(client()))
            );
        }
    }
    // A companion serves Binding only: nothing is punted from it.
    let alloc = message(Method::ALLOCATE, Class::Request);
    assert!(h.feed(tokens[1], client(), &alloc).is_empty());
    assert!(!h.feed(LISTEN, client(), &alloc).is_empty());
}

/// Two clients of this worker, A and B, each the other's peer: A's relayed address is
/// B's peer and B's is A's (both ends of a call on this relay). IPv4 or IPv6.
struct Pair {
    h: H,
    a: FiveTuple,
    b: FiveTuple,
    relay_a: SocketAddr,
    relay_b: SocketAddr,
}

const ID_B: AllocationId = AllocationId(2);
const RELAY_B: Token = Token(2);

impl Pair {
    fn new(v6: bool) -> Pair {
        let (server, ca, cb, ra, rb) = if v6 {
            (
                addr("[2001:db8::1]:3478"),
                addr("[2001:db8:5::5]:40000"),
                addr("[2001:db8:6::6]:40001"),
                addr("[2001:db8::1]:50000"),
                addr("[2001:db8::1]:50001"),
            )
        } else {
            (
                server(),
                client(),
                addr("203.0.113.6:40001"),
                relay(),
                addr("198.51.100.1:50001"),
            )
        };
        let mut h = H::new(Denied::new([server]), BindingLimit::default());
        h.core.add_listen(Token(9), server);
        let (a, b) = (FiveTuple::udp(ca, server), FiveTuple::udp(cb, server));
        for (id, tuple, relay, token) in [(ID, a, ra, RELAY), (ID_B, b, rb, RELAY_B)] {
            h.core.relays_bound(Millis(T0), tuple, vec![(relay, token)]);
            h.change(TableChange::AllocationAdd {
                id,
                tuple,
                relays: vec![relay],
                deadline: Millis(FAR),
                bandwidth: 0,
                user: "u".into(),
                username: "name".into(),
                dont_fragment: false,
            });
        }
        Pair {
            h,
            a,
            b,
            relay_a: ra,
            relay_b: rb,
        }
    }

    /// Allocation `id` permits `peer`'s IP until `deadline`.
    fn permit(&mut self, id: AllocationId, peer: SocketAddr, deadline: u64) {
        self.h.change(TableChange::PermissionSet {
            id,
            peer: peer.ip(),
            deadline: Millis(deadline),
        });
    }

    fn channel(&mut self, id: AllocationId, channel: u16, peer: SocketAddr) {
        self.h.change(TableChange::ChannelSet {
            id,
            channel,
            peer,
            deadline: Millis(FAR),
            confirmed: false,
        });
    }

    /// A's client sends `pkt`.
    fn a_sends(&mut self, pkt: &[u8]) -> Vec<Did> {
        let listen = self.h.core.table.client_token(&self.a);
        self.h.feed(listen.unwrap_or(LISTEN), self.a.client, pkt)
    }

    fn usage(&self, id: AllocationId) -> crate::Usage {
        self.h.core.table.allocs[&id].usage
    }
}

#[test]
fn hairpin_delivers_to_the_other_client_as_its_relay_would() {
    for v6 in [false, true] {
        let mut p = Pair::new(v6);
        let (relay_a, relay_b) = (p.relay_a, p.relay_b);
        let listen = p.h.core.table.client_token(&p.b).unwrap_or(LISTEN);
        p.permit(ID, relay_b, FAR);
        p.channel(ID, 0x4000, relay_b);
        // B has no permission for A's relayed IP: B gets nothing, as if the datagram had
        // left A's relay and been refused by B's. It left A: A counts it.
        assert!(p.a_sends(&channel_data(0x4000, b"hello")).is_empty());
        assert_eq!(p.h.drops().no_permission, 1, "v6 {v6}");
        assert_eq!(p.usage(ID).to_peer.packets, 1);
        assert_eq!(p.usage(ID_B).to_client.packets, 0);
        p.permit(ID_B, relay_a, FAR);
        // ChannelData from A: a Data indication from A's relayed address to B (B has no
        // channel for it), sent from B's listening socket.
        let [Did::Send(from, to, d)] = &p.a_sends(&channel_data(0x4000, b"hello"))[..] else {
            panic!("one transmit expected (v6 {v6})");
        };
        assert_eq!((*from, *to), (listen, p.b.client));
        assert_eq!(data_indication(d), (relay_a, b"hello".to_vec()));
        // A Send indication from A: the same.
        let [Did::Send(_, to, d)] = &p.a_sends(&send_indication(relay_b, b"abcdef"))[..] else {
            panic!("one transmit expected (v6 {v6})");
        };
        assert_eq!(*to, p.b.client);
        assert_eq!(data_indication(d), (relay_a, b"abcdef".to_vec()));
        // B binds a channel to A's relayed address; once confirmed, ChannelData on it.
        p.channel(ID_B, 0x4005, relay_a);
        let mut out = Vec::new();
        p.h.core
            .reply(p.b, message(Method::CHANNEL_BIND, Class::Success), &mut out);
        for pkt in [
            channel_data(0x4000, b"xyz"),
            send_indication(relay_b, b"xyz"),
        ] {
            let [Did::Send(_, to, d)] = &p.a_sends(&pkt)[..] else {
                panic!("one transmit expected (v6 {v6})");
            };
            assert_eq!(*to, p.b.client);
            let cd = ChannelData::parse(d).unwrap_or_else(|e| panic!("{e:?}"));
            assert_eq!((cd.channel, cd.payload), (0x4005, &b"xyz"[..]));
        }
        // Usage is counted once on each side: A sent, B received.
        let (ua, ub) = (p.usage(ID), p.usage(ID_B));
        assert_eq!(
            (ua.to_peer.packets, ua.to_peer.bytes),
            (5, 5 + 5 + 6 + 3 + 3)
        );
        assert_eq!(
            (ub.to_client.packets, ub.to_client.bytes),
            (4, 5 + 6 + 3 + 3)
        );
        assert_eq!((ua.to_client.packets, ub.to_peer.packets), (0, 0));
        let c = p.h.core.ctr.snapshot();
        assert_eq!(
            (c.hairpinned, c.to_peer_packets, c.to_client_packets),
            (4, 5, 4)
        );
    }
}

#[test]
fn hairpin_keeps_the_receivers_deadlines_and_bandwidth() {
    let mut p = Pair::new(false);
    let (relay_a, relay_b) = (p.relay_a, p.relay_b);
    p.permit(ID, relay_b, FAR);
    p.permit(ID_B, relay_a, T0 + 1_000);
    let send = send_indication(relay_b, b"data");
    assert_eq!(p.a_sends(&send).len(), 1);
    // B's permission expires: nothing more reaches B.
    p.h.now = T0 + 1_000;
    assert!(p.a_sends(&send).is_empty());
    assert_eq!(p.h.drops().expired, 1);
    // B's permission again, but B's allocation expired.
    p.permit(ID_B, relay_a, FAR);
    p.h.change(TableChange::AllocationRefresh {
        id: ID_B,
        deadline: Millis(T0 + 2_000),
    });
    assert_eq!(p.a_sends(&send).len(), 1);
    p.h.now = T0 + 2_000;
    assert!(p.a_sends(&send).is_empty());
    assert_eq!(p.h.drops().expired, 2);
    // B gone: the datagram goes out to B's former relayed address, as to any peer.
    p.h.change(TableChange::AllocationRemove { id: ID_B });
    assert_eq!(
        p.a_sends(&send),
        vec![Did::Send(RELAY, relay_b, b"data".to_vec())]
    );
    // B's bandwidth limit applies to what A sends it.
    let mut p = Pair::new(false);
    p.h.change(TableChange::AllocationRemove { id: ID_B });
    p.h.core
        .relays_bound(Millis(p.h.now), p.b, vec![(relay_b, RELAY_B)]);
    p.h.change(TableChange::AllocationAdd {
        id: ID_B,
        tuple: p.b,
        relays: vec![relay_b],
        deadline: Millis(FAR),
        bandwidth: 100,
        user: "u".into(),
        username: "name".into(),
        dont_fragment: false,
    });
    p.permit(ID, relay_b, FAR);
    p.permit(ID_B, relay_a, FAR);
    let big = send_indication(relay_b, &[7; 60]);
    assert_eq!(p.a_sends(&big).len(), 1);
    assert!(p.a_sends(&big).is_empty());
    assert_eq!(p.h.drops().bandwidth, 1);
}

#[test]
fn hairpin_only_to_this_workers_udp_allocations() {
    // A peer that is another worker's relayed address (not in this table) goes out
    // through the kernel, as before.
    let mut p = Pair::new(false);
    let other = addr("198.51.100.1:50002");
    p.permit(ID, other, FAR);
    assert_eq!(
        p.a_sends(&send_indication(other, b"x")),
        vec![Did::Send(RELAY, other, b"x".to_vec())]
    );
    assert_eq!(p.h.core.ctr.snapshot().hairpinned, 0);
    // With the hairpin off (`--no-hairpin`), B's relayed address is reached through
    // the kernel, as before.
    let relay_b = p.relay_b;
    p.permit(ID_B, p.relay_a, FAR);
    p.permit(ID, relay_b, FAR);
    p.h.core.hairpin = false;
    assert_eq!(
        p.a_sends(&send_indication(relay_b, b"y")),
        vec![Did::Send(RELAY, relay_b, b"y".to_vec())]
    );
    p.h.core.hairpin = true;
    assert_eq!(p.a_sends(&send_indication(relay_b, b"y")).len(), 1);
    assert_eq!(p.h.core.ctr.snapshot().hairpinned, 1);
}
