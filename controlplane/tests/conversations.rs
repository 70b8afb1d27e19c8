//! Whole TURN conversations against the control-plane state machine on a virtual clock.
#![allow(clippy::unwrap_used)]

mod harness;

use std::net::SocketAddr;

use harness::{Ev, Harness, REALM, T0, config, error_code, tuple};
use turnpike_controlplane::{
    Cidr, Credentials, Millis, Output, PeerPolicy, ServerConfig, TableChange, Via, rest_password,
};
use turnpike_plane::RelayIp;
use turnpike_proto::attr::{
    self, AttrType, ChannelNumber, Family, Lifetime, Nonce, PasswordAlgorithm, PasswordAlgorithmId,
    PasswordAlgorithms, Realm, RequestedTransport, Userhash, Username, XorPeerAddress,
};
use turnpike_proto::auth::{long_term_key_md5, long_term_key_sha256, userhash};
use turnpike_proto::client::{AllocateOptions, Client};
use turnpike_proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

const PEER: &str = "198.51.100.20:7000";

fn peer() -> SocketAddr {
    PEER.parse().unwrap()
}

/// An authenticated request built by hand (MD5 key), for cases the client won't produce.
fn signed<F>(
    h: &Harness,
    t: turnpike_controlplane::FiveTuple,
    method: Method,
    user: &str,
    pass: &str,
    tid: u8,
    fill: F,
) -> Vec<u8>
where
    F: FnOnce(&mut MessageWriter<'_>),
{
    harness::signed_request(h, t.client, method, user, pass, REALM, tid, fill)
}

fn alice() -> Client {
    Client::new("alice", "wonderland", 1)
}

#[test]
fn full_conversation_401_allocate_permission_channel_refresh_expiry() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    let mut c = alice();

    // The first Allocate has no credentials: 401 with REALM and NONCE, then the client
    // retries with them.
    let mut req = Vec::new();
    c.allocate(h.now.0, AllocateOptions::default(), &mut req)
        .unwrap();
    let first = h.deliver(t, &req);
    assert_eq!(first.len(), 1);
    assert_eq!(error_code(&first[0]), Some(401));
    let m = Message::parse(&first[0]).unwrap();
    assert_eq!(m.attr::<Realm>().unwrap(), Some(Realm(REALM)));
    assert!(
        m.attr::<Nonce>()
            .unwrap()
            .unwrap()
            .0
            .starts_with("obMatJos2")
    );
    assert!(m.attr::<PasswordAlgorithms>().unwrap().is_some());
    // Unauthenticated requests leave no state behind.
    assert_eq!(h.server.stats().allocations, 0);

    let ev = h.run(&mut c, t, &req);
    let Ev::Allocated {
        relayed, lifetime, ..
    } = ev
    else {
        panic!("{ev:?}");
    };
    assert_eq!(lifetime, 600);
    assert_eq!(relayed.len(), 1);
    assert_eq!(relayed[0].ip().to_string(), "192.0.2.10");
    assert!((50000..=50099).contains(&relayed[0].port()));
    let changes = h.take_changes();
    let id = match &changes[..] {
        [
            TableChange::AllocationAdd {
                id,
                tuple: tt,
                relays,
                deadline,
                ..
            },
        ] => {
            assert_eq!(*tt, t);
            assert_eq!(relays, &relayed);
            assert_eq!(*deadline, T0.plus_secs(600));
            *id
        }
        other => panic!("{other:?}"),
    };

    let mut req = Vec::new();
    c.create_permission(h.now.0, &[peer()], &mut req).unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Permission);
    assert_eq!(
        h.take_changes(),
        vec![TableChange::PermissionSet {
            id,
            peer: peer().ip(),
            deadline: T0.plus_secs(300)
        }]
    );

    c.channel_bind(h.now.0, 0x4001, peer(), &mut req).unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Channel(0x4001));
    let changes = h.take_changes();
    assert!(changes.contains(&TableChange::ChannelSet {
        id,
        channel: 0x4001,
        peer: peer(),
        deadline: T0.plus_secs(600),
        confirmed: false,
    }));

    // The permission (300 s) expires at t+300 with its own table change.
    let expired = h.advance(500);
    assert_eq!(
        expired,
        vec![TableChange::PermissionRemove {
            id,
            peer: peer().ip()
        }]
    );
    // Refresh at t+500 s moves the deadline.
    c.refresh(h.now.0, 1200, &mut req).unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Refreshed(1200));
    assert!(h.take_changes().contains(&TableChange::AllocationRefresh {
        id,
        deadline: T0.plus_secs(500 + 1200)
    }));

    // The channel expires at t+600.
    let expired = h.advance(100);
    assert_eq!(
        expired,
        vec![TableChange::ChannelRemove {
            id,
            channel: 0x4001
        }]
    );
    // The allocation expires at t+1700 with its deadline.
    assert!(h.advance(1099).is_empty());
    assert_eq!(h.advance(1), vec![TableChange::AllocationRemove { id }]);
    assert_eq!(h.server.stats().allocations, 0);
    assert_eq!(h.server.poll_timeout(), None);
}

#[test]
fn refresh_zero_deletes_and_frees_the_port() {
    let mut cfg = config();
    cfg.relay_ports = (50000, 50000);
    let mut h = Harness::new(cfg);
    let t = tuple("203.0.113.1:40000");
    let mut c = alice();
    assert!(matches!(h.allocate(&mut c, t), Ev::Allocated { .. }));
    let mut req = Vec::new();
    c.refresh(h.now.0, 0, &mut req).unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Refreshed(0));
    // The one port is free again for another client.
    let mut b = Client::new("bob", "builder", 2);
    assert!(matches!(
        h.allocate(&mut b, tuple("203.0.113.2:1")),
        Ev::Allocated { .. }
    ));
    // A Refresh without allocation: 437.
    let mut req = Vec::new();
    c.refresh(h.now.0, 600, &mut req).unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Failed(437));
}

#[test]
fn retransmitted_allocate_gets_the_identical_response_and_a_new_one_gets_437() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    let req = signed(&h, t, Method::ALLOCATE, "alice", "wonderland", 9, |w| {
        w.add(&RequestedTransport(attr::PROTOCOL_UDP)).unwrap();
    });
    let r1 = h.deliver(t, &req);
    assert_eq!(r1.len(), 1);
    assert_eq!(error_code(&r1[0]), None);
    h.now = h.now.plus_ms(1500);
    let r2 = h.deliver(t, &req);
    assert_eq!(r1, r2, "a retransmission gets the same bytes");
    assert_eq!(h.server.stats().allocations, 1);
    let other = signed(&h, t, Method::ALLOCATE, "alice", "wonderland", 10, |w| {
        w.add(&RequestedTransport(attr::PROTOCOL_UDP)).unwrap();
    });
    assert_eq!(error_code(&h.deliver(t, &other)[0]), Some(437));
}

#[test]
fn stale_nonce_gets_438_and_a_fresh_nonce_that_works() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    let mut c = alice();
    assert!(matches!(h.allocate(&mut c, t), Ev::Allocated { .. }));
    // Ten minutes later the nonce is stale: the client is told 438, retries, succeeds.
    h.advance(599);
    let mut req = Vec::new();
    c.refresh(h.now.0, 600, &mut req).unwrap();
    h.now = h.now.plus_secs(2);
    let resp = h.deliver(t, &req);
    assert_eq!(error_code(&resp[0]), Some(438));
    let m = Message::parse(&resp[0]).unwrap();
    assert!(m.attr::<Nonce>().unwrap().is_some());
    assert!(!m.has_integrity(), "438 carries no integrity");
    assert_eq!(h.run(&mut c, t, &req), Ev::Refreshed(600));
}

#[test]
fn nonce_is_bound_to_the_client_address() {
    let mut h = Harness::new(config());
    let t1 = tuple("203.0.113.1:40000");
    let t2 = tuple("203.0.113.1:40001");
    // A request signed with a nonce minted for another address is stale.
    let nonce = h.server.mint_nonce(h.now, &t1.client);
    let mut buf = vec![0u8; 512];
    let mut w = MessageWriter::new(
        &mut buf,
        Method::ALLOCATE,
        Class::Request,
        TransactionId([1; 12]),
    )
    .unwrap();
    w.add(&RequestedTransport(17)).unwrap();
    w.add(&Username("alice")).unwrap();
    w.add(&Realm(REALM)).unwrap();
    w.add(&Nonce(&nonce)).unwrap();
    w.add_integrity(&long_term_key_md5("alice", REALM, "wonderland"))
        .unwrap();
    let n = w.finish();
    assert_eq!(error_code(&h.deliver(t2, &buf[..n])[0]), Some(438));
    assert_eq!(error_code(&h.deliver(t1, &buf[..n])[0]), None);
}

#[test]
fn wrong_password_and_unknown_user_get_401() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    let mut c = Client::new("alice", "not-her-password", 1);
    assert_eq!(h.allocate(&mut c, t), Ev::Failed(401));
    let mut c = Client::new("mallory", "x", 1);
    assert_eq!(h.allocate(&mut c, t), Ev::Failed(401));
    assert_eq!(h.server.stats().allocations, 0);
    assert!(h.server.stats().auth_failures >= 2);
}

#[test]
fn other_credentials_on_an_allocation_get_441() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    assert!(matches!(h.allocate(&mut alice(), t), Ev::Allocated { .. }));
    let mut bob = Client::new("bob", "builder", 5);
    let mut req = Vec::new();
    bob.refresh(h.now.0, 600, &mut req).unwrap();
    assert_eq!(h.run(&mut bob, t, &req), Ev::Failed(441));
}

#[test]
fn missing_requested_transport_is_400_and_tcp_is_442() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    let req = signed(&h, t, Method::ALLOCATE, "alice", "wonderland", 1, |_| {});
    assert_eq!(error_code(&h.deliver(t, &req)[0]), Some(400));
    let mut c = alice();
    let mut req = Vec::new();
    c.allocate(
        h.now.0,
        AllocateOptions {
            transport: Some(attr::PROTOCOL_TCP),
            ..Default::default()
        },
        &mut req,
    )
    .unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Failed(442));
}

#[test]
fn unknown_comprehension_required_attribute_gets_420_listing_it() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    let req = signed(&h, t, Method::ALLOCATE, "alice", "wonderland", 1, |w| {
        w.add(&RequestedTransport(17)).unwrap();
        w.add_raw(AttrType(0x7ABC), &[1, 2, 3, 4]).unwrap();
    });
    let resp = h.deliver(t, &req);
    assert_eq!(error_code(&resp[0]), Some(420));
    let m = Message::parse(&resp[0]).unwrap();
    let u = m.attr::<attr::UnknownAttributes>().unwrap().unwrap();
    assert_eq!(u.types().collect::<Vec<_>>(), vec![0x7ABC]);
    m.verify_integrity(&long_term_key_md5("alice", REALM, "wonderland"))
        .unwrap();
}

#[test]
fn address_families_440_dual_and_443() {
    // Only IPv4 relays: asking for IPv6 is 440.
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    let mut c = alice();
    let mut req = Vec::new();
    c.allocate(
        h.now.0,
        AllocateOptions {
            family: Some(Family::V6),
            ..Default::default()
        },
        &mut req,
    )
    .unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Failed(440));

    // Dual-stack relays: ADDITIONAL-ADDRESS-FAMILY gives two relayed addresses.
    let mut cfg = config();
    cfg.relay_ips.push("2001:db8::10".parse().unwrap());
    let mut h = Harness::new(cfg);
    let req = signed(&h, t, Method::ALLOCATE, "alice", "wonderland", 3, |w| {
        w.add(&RequestedTransport(17)).unwrap();
        w.add(&attr::AdditionalAddressFamily(Family::V6)).unwrap();
    });
    let resp = h.deliver(t, &req);
    let m = Message::parse(&resp[0]).unwrap();
    assert_eq!(m.class(), Class::Success);
    let relays: Vec<_> = m
        .attrs::<attr::XorRelayedAddress>()
        .map(|r| r.unwrap().0)
        .collect();
    assert_eq!(relays.len(), 2);
    assert!(relays[0].is_ipv4() && relays[1].is_ipv6());

    // An IPv4-only allocation and an IPv6 peer: 443.
    let t2 = tuple("203.0.113.2:40000");
    let mut c = Client::new("bob", "builder", 9);
    assert!(matches!(h.allocate(&mut c, t2), Ev::Allocated { .. }));
    let mut req = Vec::new();
    c.create_permission(h.now.0, &["[2001:db8:1::5]:9".parse().unwrap()], &mut req)
        .unwrap();
    assert_eq!(h.run(&mut c, t2, &req), Ev::Failed(443));
}

#[test]
fn even_port_with_reservation_token() {
    let mut h = Harness::new(config());
    let t1 = tuple("203.0.113.1:40000");
    let mut c = alice();
    let mut req = Vec::new();
    c.allocate(
        h.now.0,
        AllocateOptions {
            even_port: Some(true),
            ..Default::default()
        },
        &mut req,
    )
    .unwrap();
    let Ev::Allocated {
        relayed,
        reservation: Some(token),
        ..
    } = h.run(&mut c, t1, &req)
    else {
        panic!("no reservation token");
    };
    assert_eq!(relayed[0].port() % 2, 0);
    // The RTCP allocation uses the token and gets port + 1.
    let t2 = tuple("203.0.113.1:40001");
    let mut c2 = Client::new("alice", "wonderland", 77);
    let mut req = Vec::new();
    c2.allocate(
        h.now.0,
        AllocateOptions {
            reservation: Some(token),
            ..Default::default()
        },
        &mut req,
    )
    .unwrap();
    let Ev::Allocated { relayed: r2, .. } = h.run(&mut c2, t2, &req) else {
        panic!("token allocation failed");
    };
    assert_eq!(r2[0].port(), relayed[0].port() + 1);
    // The token is single-use: a second use gets 508.
    let t3 = tuple("203.0.113.1:40002");
    let mut c3 = Client::new("alice", "wonderland", 78);
    let mut req = Vec::new();
    c3.allocate(
        h.now.0,
        AllocateOptions {
            reservation: Some(token),
            ..Default::default()
        },
        &mut req,
    )
    .unwrap();
    assert_eq!(h.run(&mut c3, t3, &req), Ev::Failed(508));
    // EVEN-PORT together with RESERVATION-TOKEN is malformed: 400.
    let req = signed(&h, t3, Method::ALLOCATE, "alice", "wonderland", 4, |w| {
        w.add(&RequestedTransport(17)).unwrap();
        w.add(&attr::EvenPort { reserve: false }).unwrap();
        w.add(&attr::ReservationToken([1; 8])).unwrap();
    });
    assert_eq!(error_code(&h.deliver(t3, &req)[0]), Some(400));
}

#[test]
fn reservation_expires_and_frees_the_port() {
    let mut cfg = config();
    cfg.relay_ports = (50000, 50001);
    let mut h = Harness::new(cfg);
    let mut c = alice();
    let mut req = Vec::new();
    c.allocate(
        h.now.0,
        AllocateOptions {
            even_port: Some(true),
            ..Default::default()
        },
        &mut req,
    )
    .unwrap();
    let t = tuple("203.0.113.1:1");
    assert!(matches!(
        h.run(&mut c, t, &req),
        Ev::Allocated {
            reservation: Some(_),
            ..
        }
    ));
    // Both ports are taken (one bound, one reserved).
    let mut b = Client::new("bob", "builder", 3);
    assert_eq!(h.allocate(&mut b, tuple("203.0.113.2:1")), Ev::Failed(508));
    h.advance(31);
    let mut b = Client::new("bob", "builder", 4);
    assert!(matches!(
        h.allocate(&mut b, tuple("203.0.113.2:2")),
        Ev::Allocated { .. }
    ));
}

#[test]
fn no_free_port_is_508_and_failed_binds_are_retried() {
    let mut cfg = config();
    cfg.relay_ports = (50000, 50001);
    let mut h = Harness::new(cfg);
    // Two binds fail (something else holds the ports); the third attempt succeeds.
    h.fail_binds = 2;
    assert!(matches!(
        h.allocate(&mut alice(), tuple("203.0.113.1:1")),
        Ev::Allocated { .. }
    ));
    assert!(matches!(
        h.allocate(&mut alice(), tuple("203.0.113.1:2")),
        Ev::Allocated { .. }
    ));
    assert_eq!(
        h.allocate(&mut alice(), tuple("203.0.113.1:3")),
        Ev::Failed(508)
    );
    // Binds failing every time end in 508 too.
    let mut h = Harness::new(config());
    h.fail_binds = 100;
    assert_eq!(
        h.allocate(&mut alice(), tuple("203.0.113.1:4")),
        Ev::Failed(508)
    );
}

#[test]
fn quotas_486_per_user_and_508_in_total() {
    let mut cfg = config();
    cfg.user_quota = 2;
    cfg.total_quota = 3;
    let mut h = Harness::new(cfg);
    assert!(matches!(
        h.allocate(&mut alice(), tuple("203.0.113.1:1")),
        Ev::Allocated { .. }
    ));
    assert!(matches!(
        h.allocate(&mut alice(), tuple("203.0.113.1:2")),
        Ev::Allocated { .. }
    ));
    assert_eq!(
        h.allocate(&mut alice(), tuple("203.0.113.1:3")),
        Ev::Failed(486)
    );
    let mut bob = Client::new("bob", "builder", 1);
    assert!(matches!(
        h.allocate(&mut bob, tuple("203.0.113.2:1")),
        Ev::Allocated { .. }
    ));
    let mut bob = Client::new("bob", "builder", 2);
    assert_eq!(
        h.allocate(&mut bob, tuple("203.0.113.2:2")),
        Ev::Failed(508)
    );
}

#[test]
fn bandwidth_limit_is_carried_in_the_table_change() {
    let mut cfg = config();
    cfg.bandwidth_limit = 125_000;
    let mut h = Harness::new(cfg);
    h.allocate(&mut alice(), tuple("203.0.113.1:1"));
    assert!(h.take_changes().iter().any(|c| matches!(
        c,
        TableChange::AllocationAdd {
            bandwidth: 125_000,
            ..
        }
    )));
}

#[test]
fn create_permission_is_all_or_nothing_and_policy_gives_403() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    let mut c = alice();
    assert!(matches!(h.allocate(&mut c, t), Ev::Allocated { .. }));
    h.take_changes();
    let mut req = Vec::new();
    // One good peer and one loopback: the whole request fails, nothing is installed.
    c.create_permission(h.now.0, &[peer(), "127.0.0.1:9".parse().unwrap()], &mut req)
        .unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Failed(403));
    assert!(h.take_changes().is_empty());
    for forbidden in [
        "169.254.169.254:80",
        "[::ffff:127.0.0.1]:1",
        "[64:ff9b::a9fe:a9fe]:80",
        "10.1.2.3:5",
        "[2002:7f00:1::]:5",
    ] {
        let mut req = Vec::new();
        c.create_permission(h.now.0, &[forbidden.parse().unwrap()], &mut req)
            .unwrap();
        assert_eq!(h.run(&mut c, t, &req), Ev::Failed(403), "{forbidden}");
    }
    // ChannelBind to a forbidden peer: 403 too.
    let mut req = Vec::new();
    c.channel_bind(h.now.0, 0x4000, "127.0.0.1:9".parse().unwrap(), &mut req)
        .unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Failed(403));
    // CreatePermission without a peer: 400.
    let req = signed(
        &h,
        t,
        Method::CREATE_PERMISSION,
        "alice",
        "wonderland",
        5,
        |_| {},
    );
    assert_eq!(error_code(&h.deliver(t, &req)[0]), Some(400));
}

#[test]
fn operator_allow_list_overrides_defaults() {
    let mut cfg = config();
    cfg.policy = PeerPolicy::new(
        vec!["127.0.0.0/8".parse::<Cidr>().unwrap()],
        vec!["198.51.100.0/24".parse::<Cidr>().unwrap()],
        vec!["127.0.0.1:3478".parse().unwrap()],
    );
    let mut h = Harness::new(cfg);
    let t = tuple("203.0.113.1:40000");
    let mut c = alice();
    h.allocate(&mut c, t);
    let mut req = Vec::new();
    c.create_permission(h.now.0, &["127.0.0.1:9".parse().unwrap()], &mut req)
        .unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Permission);
    c.create_permission(h.now.0, &[peer()], &mut req).unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Failed(403));
    // The server's own listening socket is never a peer, even where its IP is allowed.
    c.channel_bind(h.now.0, 0x4000, "127.0.0.1:3478".parse().unwrap(), &mut req)
        .unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Failed(403));
    c.channel_bind(h.now.0, 0x4000, "127.0.0.1:3479".parse().unwrap(), &mut req)
        .unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Channel(0x4000));
}

#[test]
fn channel_bind_uniqueness_rules() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    let mut c = alice();
    h.allocate(&mut c, t);
    let mut req = Vec::new();
    c.refresh(h.now.0, 3600, &mut req).unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Refreshed(3600));
    let p2: SocketAddr = "198.51.100.21:7000".parse().unwrap();
    c.channel_bind(h.now.0, 0x4000, peer(), &mut req).unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Channel(0x4000));
    // Same channel, other peer: 400. Same peer, other channel: 400.
    c.channel_bind(h.now.0, 0x4000, p2, &mut req).unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Failed(400));
    c.channel_bind(h.now.0, 0x4001, peer(), &mut req).unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Failed(400));
    // Re-binding the same pair refreshes it.
    h.advance(500);
    c.channel_bind(h.now.0, 0x4000, peer(), &mut req).unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Channel(0x4000));
    // Refreshed at t+500, the channel outlives its first deadline (t+600).
    assert!(
        !h.advance(200)
            .iter()
            .any(|c| matches!(c, TableChange::ChannelRemove { .. }))
    );
    // After expiry, the channel can go to another peer.
    h.advance(600);
    c.channel_bind(h.now.0, 0x4000, p2, &mut req).unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Channel(0x4000));
    // Channel numbers outside 0x4000..=0x4FFF: 400.
    let bad = signed(&h, t, Method::CHANNEL_BIND, "alice", "wonderland", 6, |w| {
        w.add_raw(AttrType(attr::CHANNEL_NUMBER), &[0x50, 0x00, 0, 0])
            .unwrap();
        w.add(&XorPeerAddress(peer())).unwrap();
    });
    assert_eq!(error_code(&h.deliver(t, &bad)[0]), Some(400));
    let _ = ChannelNumber(0x4000);
}

#[test]
fn rest_credentials_before_and_after_expiry_and_across_rotation() {
    let creds = Credentials::new(REALM, &[], &["old-secret".into()]);
    let mut h = Harness::with_credentials(config(), creds);
    let expiry = T0.secs() + 3600;
    let user = format!("{expiry}:carol");
    let pass = rest_password("old-secret", &user);
    let t = tuple("203.0.113.1:40000");
    let mut c = Client::new(&user, &pass, 1);
    assert!(matches!(h.allocate(&mut c, t), Ev::Allocated { .. }));
    assert_eq!(h.server.allocations().next().unwrap().account, "carol");

    // Rotation: new secret first, old still accepted.
    h.server
        .credentials_mut()
        .set_secrets(vec!["new-secret".into(), "old-secret".into()]);
    let mut req = Vec::new();
    c.refresh(h.now.0, 600, &mut req).unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Refreshed(600));
    let pass2 = rest_password("new-secret", &user);
    let mut c2 = Client::new(&user, &pass2, 2);
    assert!(matches!(
        h.allocate(&mut c2, tuple("203.0.113.1:40001")),
        Ev::Allocated { .. }
    ));
    // The old secret retired: its credentials no longer work.
    h.server
        .credentials_mut()
        .set_secrets(vec!["new-secret".into()]);
    let mut c3 = Client::new(&user, &pass, 3);
    assert_eq!(
        h.allocate(&mut c3, tuple("203.0.113.1:40002")),
        Ev::Failed(401)
    );

    // Past its expiry time the username is refused.
    h.advance(3600);
    let mut c4 = Client::new(&user, &pass2, 4);
    assert_eq!(
        h.allocate(&mut c4, tuple("203.0.113.1:40003")),
        Ev::Failed(401)
    );
    // A username that is not a REST username (no number) is unknown.
    let mut c5 = Client::new("nobody", &pass2, 5);
    assert_eq!(
        h.allocate(&mut c5, tuple("203.0.113.1:40004")),
        Ev::Failed(401)
    );
}

#[test]
fn sha256_password_algorithm_and_integrity() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    let mut c = Client::new("alice", "wonderland", 1).prefer_sha256(true);
    let mut req = Vec::new();
    c.allocate(h.now.0, Default::default(), &mut req).unwrap();
    // Look at the retried request: it carries PASSWORD-ALGORITHM SHA-256 and
    // MESSAGE-INTEGRITY-SHA256.
    let challenge = h.deliver(t, &req);
    let mut retry = Vec::new();
    c.handle(h.now.0, &challenge[0], &mut retry);
    let m = Message::parse(&retry).unwrap();
    assert!(m.has_integrity_sha256());
    assert_eq!(
        m.attr::<PasswordAlgorithm>().unwrap().unwrap().algorithm,
        PasswordAlgorithmId::SHA256
    );
    let resp = h.deliver(t, &retry);
    let r = Message::parse(&resp[0]).unwrap();
    assert_eq!(r.class(), Class::Success);
    r.verify_integrity_sha256(&long_term_key_sha256("alice", REALM, "wonderland"))
        .unwrap();

    // PASSWORD-ALGORITHM without PASSWORD-ALGORITHMS: 400.
    let bad = signed(
        &h,
        tuple("203.0.113.9:1"),
        Method::ALLOCATE,
        "alice",
        "wonderland",
        8,
        |w| {
            w.add(&RequestedTransport(17)).unwrap();
            w.add(&PasswordAlgorithm {
                algorithm: PasswordAlgorithmId::MD5,
                params: &[],
            })
            .unwrap();
        },
    );
    assert_eq!(
        error_code(&h.deliver(tuple("203.0.113.9:1"), &bad)[0]),
        Some(400)
    );
}

#[test]
fn userhash_stands_in_for_username() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    let nonce = h.server.mint_nonce(h.now, &t.client);
    let mut buf = vec![0u8; 512];
    let mut w = MessageWriter::new(
        &mut buf,
        Method::ALLOCATE,
        Class::Request,
        TransactionId([3; 12]),
    )
    .unwrap();
    w.add(&RequestedTransport(17)).unwrap();
    w.add(&Userhash(userhash("alice", REALM))).unwrap();
    w.add(&Realm(REALM)).unwrap();
    w.add(&Nonce(&nonce)).unwrap();
    w.add_integrity(&long_term_key_md5("alice", REALM, "wonderland"))
        .unwrap();
    let n = w.finish();
    let resp = h.deliver(t, &buf[..n]);
    assert_eq!(Message::parse(&resp[0]).unwrap().class(), Class::Success);
    assert_eq!(h.server.allocations().next().unwrap().username, "alice");
}

#[test]
fn unauthenticated_requests_are_rate_limited_per_source() {
    let mut cfg = config();
    cfg.unauth_rate = 5;
    cfg.unauth_burst = 10;
    let mut h = Harness::new(cfg);
    let t = tuple("203.0.113.1:40000");
    let mut answered = 0;
    for i in 0..100u8 {
        let mut buf = [0u8; 64];
        let mut w = MessageWriter::new(
            &mut buf,
            Method::ALLOCATE,
            Class::Request,
            TransactionId([i; 12]),
        )
        .unwrap();
        w.add(&RequestedTransport(17)).unwrap();
        let n = w.finish();
        answered += h.deliver(t, &buf[..n]).len();
    }
    assert_eq!(answered, 10, "the burst, then silence");
    // Another source is not affected; the first recovers with time.
    let mut c = alice();
    assert!(matches!(
        h.allocate(&mut c, tuple("203.0.113.2:1")),
        Ev::Allocated { .. }
    ));
    h.advance(1);
    let mut buf = [0u8; 64];
    let mut w = MessageWriter::new(
        &mut buf,
        Method::BINDING,
        Class::Request,
        TransactionId([0; 12]),
    )
    .unwrap();
    w.add_fingerprint().unwrap();
    let n = w.finish();
    assert_eq!(h.deliver(t, &buf[..n]).len(), 1);
    assert!(h.server.stats().rate_limited >= 90);
}

#[test]
fn binding_request_answered_with_xor_mapped_address() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    let mut buf = [0u8; 64];
    let w = MessageWriter::new(
        &mut buf,
        Method::BINDING,
        Class::Request,
        TransactionId([5; 12]),
    )
    .unwrap();
    let n = w.finish();
    let resp = h.deliver(t, &buf[..n]);
    let m = Message::parse(&resp[0]).unwrap();
    assert_eq!(
        m.attr::<attr::XorMappedAddress>().unwrap().unwrap().0,
        t.client
    );
}

#[test]
fn malformed_request_gets_400_and_garbage_is_dropped() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    // A request whose attribute overruns: 400 with the same transaction id.
    let mut buf = [0u8; 64];
    let mut w = MessageWriter::new(
        &mut buf,
        Method::ALLOCATE,
        Class::Request,
        TransactionId([6; 12]),
    )
    .unwrap();
    w.add(&Lifetime(5)).unwrap();
    let n = w.finish();
    buf[23] = 40;
    let resp = h.deliver(t, &buf[..n]);
    assert_eq!(error_code(&resp[0]), Some(400));
    assert_eq!(
        Message::parse(&resp[0]).unwrap().transaction_id(),
        TransactionId([6; 12])
    );
    assert!(h.deliver(t, b"\xffgarbage").is_empty());
    assert!(h.deliver(t, &[]).is_empty());
}

#[test]
fn draining_sends_300_try_alternate() {
    let mut h = Harness::new(config());
    let alt: SocketAddr = "192.0.2.11:3478".parse().unwrap();
    h.server.set_draining(true, Some(alt));
    let t = tuple("203.0.113.1:40000");
    let req = signed(&h, t, Method::ALLOCATE, "alice", "wonderland", 1, |w| {
        w.add(&RequestedTransport(17)).unwrap();
    });
    let resp = h.deliver(t, &req);
    assert_eq!(error_code(&resp[0]), Some(300));
    let m = Message::parse(&resp[0]).unwrap();
    assert_eq!(m.attr::<attr::AlternateServer>().unwrap().unwrap().0, alt);
    m.verify_integrity(&long_term_key_md5("alice", REALM, "wonderland"))
        .unwrap();
}

#[test]
fn revoke_and_restore() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    let mut c = alice();
    h.allocate(&mut c, t);
    let mut req = Vec::new();
    c.channel_bind(h.now.0, 0x4002, peer(), &mut req).unwrap();
    h.run(&mut c, t, &req);
    let info = h.server.allocations().next().unwrap();

    // A new control plane rebuilt from the data plane's table serves the old allocation.
    let mut h2 = Harness::new(config());
    h2.now = h.now;
    h2.server.restore(harness::snapshot(&info, &info.username));
    let mut req = Vec::new();
    c.refresh(h2.now.0, 600, &mut req).unwrap();
    assert_eq!(h2.run(&mut c, t, &req), Ev::Refreshed(600));
    c.channel_bind(h2.now.0, 0x4002, peer(), &mut req).unwrap();
    assert_eq!(h2.run(&mut c, t, &req), Ev::Channel(0x4002));
    // Its relay port stays taken.
    let mut cfg1 = config();
    cfg1.relay_ports = (info.relays[0].port(), info.relays[0].port());
    let _ = cfg1;

    let mut out = Vec::new();
    assert!(h.server.revoke(info.id, &mut out));
    assert!(out.contains(&Output::Table(TableChange::AllocationRemove {
        id: info.id
    })));
    assert_eq!(h.server.stats().allocations, 0);
    let _ = (Millis(0), ServerConfig::default());
}

#[test]
fn legacy_channel_numbers_only_when_configured() {
    let bind = |h: &mut Harness| {
        let t = tuple("203.0.113.1:40000");
        let mut c = alice();
        h.allocate(&mut c, t);
        let req = signed(h, t, Method::CHANNEL_BIND, "alice", "wonderland", 6, |w| {
            w.add_raw(AttrType(attr::CHANNEL_NUMBER), &[0x59, 0x60, 0, 0])
                .unwrap();
            w.add(&XorPeerAddress(peer())).unwrap();
        });
        error_code(&h.deliver(t, &req)[0])
    };
    assert_eq!(bind(&mut Harness::new(config())), Some(400));
    let mut cfg = config();
    cfg.legacy_channel_numbers = true;
    let mut h = Harness::new(cfg);
    assert_eq!(bind(&mut h), None);
    assert!(h.take_changes().iter().any(|c| matches!(
        c,
        TableChange::ChannelSet {
            channel: 0x5960,
            ..
        }
    )));
}

#[test]
fn redirecting_instance_sends_new_allocations_elsewhere_but_serves_old_ones() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    let mut c = alice();
    assert!(matches!(h.allocate(&mut c, t), Ev::Allocated { .. }));
    let alt: SocketAddr = "192.0.2.12:3478".parse().unwrap();
    // A new client is redirected.
    let t2 = tuple("203.0.113.2:40000");
    let req = signed(&h, t2, Method::ALLOCATE, "bob", "builder", 2, |w| {
        w.add(&RequestedTransport(17)).unwrap();
    });
    let via = Via {
        relay_ips: &[],
        alternate: Some(alt),
        alternate_domain: None,
        pool: &[],
    };
    let mut out = Vec::new();
    h.server.handle_via(h.now, t2, &req, &via, &mut out);
    let Some(Output::Transmit { data, .. }) = out.first() else {
        panic!("{out:?}");
    };
    assert_eq!(error_code(data), Some(300));
    assert_eq!(
        Message::parse(data)
            .unwrap()
            .attr::<attr::AlternateServer>()
            .unwrap()
            .unwrap()
            .0,
        alt
    );
    // No ALTERNATE-DOMAIN for a UDP client; a TLS client gets the alternate's TLS name
    // (RFC 8489 §14.15), to verify the server it is sent to.
    assert!(
        Message::parse(data)
            .unwrap()
            .attr::<attr::AlternateDomain<'_>>()
            .unwrap()
            .is_none()
    );
    let t3 = turnpike_controlplane::FiveTuple {
        transport: turnpike_controlplane::Transport::Tls,
        ..tuple("203.0.113.3:40000")
    };
    let req = signed(&h, t3, Method::ALLOCATE, "bob", "builder", 3, |w| {
        w.add(&RequestedTransport(17)).unwrap();
    });
    let tls_via = Via {
        alternate_domain: Some("b.turn.example"),
        ..via
    };
    let mut out = Vec::new();
    h.server.handle_via(h.now, t3, &req, &tls_via, &mut out);
    let Some(Output::Transmit { data, .. }) = out.first() else {
        panic!("{out:?}");
    };
    let m = Message::parse(data).unwrap();
    assert_eq!(
        m.attr::<attr::AlternateDomain<'_>>().unwrap().map(|d| d.0),
        Some("b.turn.example")
    );
    // The existing allocation is refreshed as usual.
    let mut req = Vec::new();
    c.refresh(h.now.0, 600, &mut req).unwrap();
    let mut out = Vec::new();
    h.server.handle_via(h.now, t, &req, &via, &mut out);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Table(TableChange::AllocationRefresh { .. })))
    );
}

#[test]
fn unacknowledged_bind_times_out_with_508_and_frees_its_port() {
    let mut cfg = config();
    cfg.relay_ports = (50000, 50000);
    let mut h = Harness::new(cfg);
    let t = tuple("203.0.113.1:40000");
    let req = signed(&h, t, Method::ALLOCATE, "alice", "wonderland", 1, |w| {
        w.add(&RequestedTransport(17)).unwrap();
    });
    // The data plane never answers the bind.
    let mut out = Vec::new();
    h.server.handle(h.now, t, &req, &mut out);
    assert!(matches!(out.as_slice(), [Output::Bind(_)]));
    // A retransmission meanwhile is absorbed.
    let mut out = Vec::new();
    h.server.handle(h.now, t, &req, &mut out);
    assert!(out.is_empty());
    h.now = h.now.plus_ms(5_000);
    let mut out = Vec::new();
    h.server.handle_timeout(h.now, &mut out);
    let Some(Output::Transmit { data, .. }) = out.first() else {
        panic!("{out:?}");
    };
    assert_eq!(error_code(data), Some(508));
    // The only port is free again.
    assert!(matches!(
        h.allocate(&mut alice(), tuple("203.0.113.9:1")),
        Ev::Allocated { .. }
    ));
}

#[test]
fn relay_address_comes_from_the_receiving_data_plane() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    let req = signed(&h, t, Method::ALLOCATE, "alice", "wonderland", 1, |w| {
        w.add(&RequestedTransport(17)).unwrap();
    });
    let ips = [RelayIp::local("198.51.100.77".parse().unwrap())];
    let mut out = Vec::new();
    h.server.handle_via(
        h.now,
        t,
        &req,
        &Via {
            relay_ips: &ips,
            alternate: None,
            alternate_domain: None,
            pool: &[],
        },
        &mut out,
    );
    let Some(Output::Bind(b)) = out.first() else {
        panic!("{out:?}");
    };
    assert_eq!(b.relays[0].ip(), ips[0].ip);
    // A data plane with no IPv6 relay: an IPv6 allocation through it is 440.
    let t2 = tuple("203.0.113.2:40000");
    let req = signed(&h, t2, Method::ALLOCATE, "alice", "wonderland", 2, |w| {
        w.add(&RequestedTransport(17)).unwrap();
        w.add(&attr::RequestedAddressFamily(Family::V6)).unwrap();
    });
    let mut out = Vec::new();
    h.server.handle_via(
        h.now,
        t2,
        &req,
        &Via {
            relay_ips: &ips,
            alternate: None,
            alternate_domain: None,
            pool: &[],
        },
        &mut out,
    );
    let Some(Output::Transmit { data, .. }) = out.first() else {
        panic!("{out:?}");
    };
    assert_eq!(error_code(data), Some(440));
}

/// Behind a 1:1 NAT the client is given the public address; the bind, the table and the
/// snapshot keep the private one (the configured mapping, and a data plane's own).
#[test]
fn relayed_address_behind_a_nat_is_the_advertised_one() {
    let private: std::net::IpAddr = "192.0.2.10".parse().unwrap();
    let public: std::net::IpAddr = "203.0.113.10".parse().unwrap();
    let mut cfg = config();
    cfg.advertised_ips = vec![RelayIp {
        ip: private,
        advertised: public,
    }];
    let mut h = Harness::new(cfg);
    let t = tuple("198.51.100.1:40000");
    let mut c = Client::new("alice", "wonderland", T0.0);
    let Ev::Allocated { relayed, .. } = h.allocate(&mut c, t) else {
        panic!("no allocation");
    };
    assert_eq!(relayed.len(), 1);
    assert_eq!(relayed[0].ip(), public);
    let added = h.take_changes().into_iter().find_map(|c| match c {
        TableChange::AllocationAdd { relays, .. } => Some(relays),
        _ => None,
    });
    let relays = added.unwrap();
    assert_eq!(
        relays,
        vec![std::net::SocketAddr::new(private, relayed[0].port())]
    );
    let info = h.server.allocations().next().unwrap();
    assert_eq!(info.relays[0].ip(), private);

    // Through a data plane whose Hello maps its own relay IP: its mapping wins.
    let dp_private: std::net::IpAddr = "10.1.0.2".parse().unwrap();
    let dp_public: std::net::IpAddr = "203.0.113.99".parse().unwrap();
    let ips = [RelayIp {
        ip: dp_private,
        advertised: dp_public,
    }];
    let t2 = tuple("198.51.100.2:40000");
    let req = signed(&h, t2, Method::ALLOCATE, "alice", "wonderland", 3, |w| {
        w.add(&RequestedTransport(17)).unwrap();
    });
    let mut out = Vec::new();
    let via = Via {
        relay_ips: &ips,
        alternate: None,
        alternate_domain: None,
        pool: &[],
    };
    h.server.handle_via(h.now, t2, &req, &via, &mut out);
    let Some(Output::Bind(b)) = out.first() else {
        panic!("{out:?}");
    };
    assert_eq!(b.relays[0].ip(), dp_private);
    let (id, relay) = (b.id, b.relays[0]);
    let mut out = Vec::new();
    h.server.handle_bind_result(h.now, id, Ok(()), &mut out);
    let resp = out
        .iter()
        .find_map(|o| match o {
            Output::Transmit { data, .. } => Some(data.clone()),
            _ => None,
        })
        .unwrap();
    let m = Message::parse(&resp).unwrap();
    let got = m.attr::<attr::XorRelayedAddress>().unwrap().unwrap().0;
    assert_eq!(got, std::net::SocketAddr::new(dp_public, relay.port()));
}

/// A relay bind the data plane refuses is counted (and logged), then answered 508.
#[test]
fn refused_binds_are_counted_before_the_508() {
    let mut h = Harness::new(config());
    let t = tuple("198.51.100.3:40000");
    let req = signed(&h, t, Method::ALLOCATE, "alice", "wonderland", 4, |w| {
        w.add(&RequestedTransport(17)).unwrap();
    });
    let mut out = Vec::new();
    h.server.handle(h.now, t, &req, &mut out);
    let mut code = None;
    for _ in 0..8 {
        let Some(id) = out.iter().find_map(|o| match o {
            Output::Bind(b) => Some(b.id),
            _ => None,
        }) else {
            code = out.iter().find_map(|o| match o {
                Output::Transmit { data, .. } => error_code(data),
                _ => None,
            });
            break;
        };
        out.clear();
        h.server.handle_bind_result(
            h.now,
            id,
            Err(turnpike_controlplane::BindError::AddressNotAvailable),
            &mut out,
        );
    }
    assert_eq!(code, Some(508));
    assert_eq!(h.server.stats().bind_failures, 4);
}
