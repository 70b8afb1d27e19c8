//! Regression tests for security findings: rate-limiter keying, default quotas,
//! FINGERPRINT and REALM checks, usernames across a restart, and refusal accounting.
//! Everything runs on the harness's virtual clock.
#![allow(clippy::unwrap_used)]

mod harness;

use harness::{Ev, Harness, REALM, config, error_code, tuple};
use turnpike_controlplane::{
    AllocationSnapshot, Cidr, Credentials, FiveTuple, PeerPolicy, ServerConfig, TableChange,
    rest_password,
};
use turnpike_proto::attr::{Lifetime, Nonce, Realm, RequestedTransport};
use turnpike_proto::client::Client;
use turnpike_proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

/// `config()` with the rate limits at their defaults (the harness turns them off).
fn limited() -> ServerConfig {
    let d = ServerConfig::default();
    ServerConfig {
        unauth_rate: d.unauth_rate,
        unauth_burst: d.unauth_burst,
        unauth_ip_rate: d.unauth_ip_rate,
        unauth_ip_burst: d.unauth_ip_burst,
        ..config()
    }
}

/// A request with no credentials (answered 401 or 400: rate-limited).
fn unsigned(method: Method, tid: u32) -> Vec<u8> {
    let mut id = [0u8; 12];
    id[..4].copy_from_slice(&tid.to_be_bytes());
    let mut buf = vec![0u8; 64];
    let mut w = MessageWriter::new(&mut buf, method, Class::Request, TransactionId(id)).unwrap();
    if method == Method::ALLOCATE {
        w.add(&RequestedTransport(17)).unwrap();
    }
    w.add_fingerprint().unwrap();
    let n = w.finish();
    buf.truncate(n);
    buf
}

fn alice() -> Client {
    Client::new("alice", "wonderland", 1)
}

// ----- finding 4: rate limiter keying ---------------------------------------------------

#[test]
fn spoofed_flood_from_a_victims_ip_does_not_starve_the_victim() {
    let mut h = Harness::new(limited());
    // 100 packets a second for five seconds, spoofed from the victim's IP on ports the
    // attacker guesses.
    for s in 0..5u32 {
        for i in 0..100u32 {
            let port = 1024 + (s * 100 + i) as u16;
            let from = tuple(&format!("203.0.113.1:{port}"));
            h.deliver(from, &unsigned(Method::ALLOCATE, s * 100 + i));
        }
        h.advance(1);
    }
    // The victim's own port has its own bucket, and the IP's is far from empty.
    let mut c = alice();
    assert!(matches!(
        h.allocate(&mut c, tuple("203.0.113.1:40000")),
        Ev::Allocated { .. }
    ));
    assert_eq!(h.server.stats().rate_limited, 0);
}

#[test]
fn flood_from_one_port_is_limited_per_port() {
    let mut h = Harness::new(limited());
    let burst = ServerConfig::default().unauth_burst as usize;
    let t = tuple("203.0.113.1:5000");
    let answered: usize = (0..200u32)
        .map(|i| h.deliver(t, &unsigned(Method::ALLOCATE, i)).len())
        .sum();
    assert_eq!(answered, burst, "the burst, then silence");
    assert_eq!(h.server.stats().rate_limited, 200 - burst as u64);
    // Another port of the same IP is served.
    let mut c = alice();
    assert!(matches!(
        h.allocate(&mut c, tuple("203.0.113.1:5001")),
        Ev::Allocated { .. }
    ));
}

#[test]
fn two_hundred_clients_behind_one_nat_address_are_not_throttled() {
    let mut cfg = limited();
    cfg.user_quota = 0;
    cfg.relay_ports = (50_000, 50_999);
    let mut h = Harness::new(cfg);
    // All 200 start within the same second: a Binding, the 401 challenge of their
    // Allocate, the authenticated Allocate, and another Binding.
    for i in 0..200u16 {
        let t = tuple(&format!("198.51.100.7:{}", 10_000 + i));
        let resp = h.deliver(t, &unsigned(Method::BINDING, u32::from(i)));
        assert_eq!(resp.len(), 1, "binding {i}");
        let mut c = Client::new("alice", "wonderland", u64::from(i));
        assert!(
            matches!(h.allocate(&mut c, t), Ev::Allocated { .. }),
            "client {i}"
        );
        let resp = h.deliver(t, &unsigned(Method::BINDING, 1000 + u32::from(i)));
        assert_eq!(resp.len(), 1, "second binding {i}");
    }
    assert_eq!(h.server.stats().allocations, 200);
    assert_eq!(h.server.stats().rate_limited, 0);
}

#[test]
fn a_held_allocation_always_gets_its_stale_nonce_challenge() {
    let mut cfg = config();
    cfg.unauth_rate = 1;
    cfg.unauth_burst = 1;
    cfg.unauth_ip_rate = 1;
    cfg.unauth_ip_burst = 1;
    cfg.nonce_lifetime = 60;
    let mut h = Harness::new(cfg);
    let t = tuple("203.0.113.1:40000");
    let mut c = alice();
    assert!(matches!(h.allocate(&mut c, t), Ev::Allocated { .. }));
    // The nonce goes stale; meanwhile someone spoofing the client empties its buckets.
    h.advance(61);
    for i in 0..10 {
        h.deliver(t, &unsigned(Method::ALLOCATE, i));
    }
    assert!(h.server.stats().rate_limited > 0);
    let mut req = Vec::new();
    c.refresh(h.now.0, 600, &mut req).unwrap();
    let resp = h.deliver(t, &req);
    assert_eq!(resp.len(), 1, "the 438 is answered");
    assert_eq!(error_code(&resp[0]), Some(438));
    assert_eq!(h.run(&mut c, t, &req), Ev::Refreshed(600));
    // The exemption is for the holder of the allocation only.
    let other = tuple("203.0.113.1:40001");
    let mut d = Client::new("bob", "builder", 3);
    assert_eq!(h.allocate(&mut d, other), Ev::Nothing);
}

#[test]
fn rate_limiter_is_swept_on_a_timer() {
    let mut h = Harness::new(limited());
    assert_eq!(h.server.poll_timeout(), None);
    h.deliver(tuple("203.0.113.1:1"), &unsigned(Method::BINDING, 1));
    // Buckets exist: the server wants a timeout to sweep them.
    let due = h.server.poll_timeout().expect("a sweep is due");
    assert!(due <= h.now.plus_secs(1));
    // Once the buckets have refilled (burst / rate seconds) the sweep drops them, and an
    // idle server asks for no more wake-ups.
    for _ in 0..10 {
        h.advance(1);
    }
    assert_eq!(h.server.poll_timeout(), None);
}

// ----- finding 5: default quotas --------------------------------------------------------

#[test]
fn default_quotas_are_bounded_and_below_the_port_range() {
    let d = ServerConfig::default();
    assert!(d.user_quota > 0);
    assert!(d.total_quota > 0);
    let ports = u32::from(d.relay_ports.1 - d.relay_ports.0) + 1;
    assert!(
        d.total_quota < ports,
        "one relay IP's ports are not exhausted"
    );
    assert!(d.user_quota * 10 < ports, "one user takes a small share");
}

#[test]
fn one_credential_cannot_take_every_relay_port_by_default() {
    let mut cfg = config();
    cfg.relay_ports = (50_000, 50_999);
    let quota = ServerConfig::default().user_quota;
    let mut h = Harness::new(cfg);
    for i in 0..quota {
        let mut c = Client::new("alice", "wonderland", u64::from(i));
        let t = tuple(&format!("203.0.113.1:{}", 1000 + i));
        assert!(matches!(h.allocate(&mut c, t), Ev::Allocated { .. }), "{i}");
    }
    let mut c = alice();
    assert_eq!(
        h.allocate(&mut c, tuple("203.0.113.1:9999")),
        Ev::Failed(486)
    );
    assert_eq!(h.server.stats().quota_rejected, 1);
    // Other users are served.
    let mut b = Client::new("bob", "builder", 1);
    assert!(matches!(
        h.allocate(&mut b, tuple("203.0.113.2:1")),
        Ev::Allocated { .. }
    ));
    // 0 still means unlimited.
    let mut cfg = config();
    cfg.user_quota = 0;
    cfg.total_quota = 0;
    cfg.relay_ports = (50_000, 50_999);
    let mut h = Harness::new(cfg);
    for i in 0..quota + 1 {
        let mut c = Client::new("alice", "wonderland", u64::from(i));
        let t = tuple(&format!("203.0.113.1:{}", 1000 + i));
        assert!(matches!(h.allocate(&mut c, t), Ev::Allocated { .. }), "{i}");
    }
}

// ----- finding 12: FINGERPRINT and REALM ------------------------------------------------

#[test]
fn a_wrong_fingerprint_is_discarded_silently() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    let mut req = harness::signed_request(
        &h,
        t.client,
        Method::ALLOCATE,
        "alice",
        "wonderland",
        REALM,
        1,
        |w| {
            w.add(&RequestedTransport(17)).unwrap();
        },
    );
    // The integrity is intact (FINGERPRINT follows it); only the CRC is wrong.
    *req.last_mut().unwrap() ^= 0x01;
    assert!(h.deliver(t, &req).is_empty());
    assert_eq!(h.server.stats().allocations, 0);
    let mut binding = unsigned(Method::BINDING, 7);
    *binding.last_mut().unwrap() ^= 0x80;
    assert!(h.deliver(t, &binding).is_empty());
    // Repaired, both are answered.
    *req.last_mut().unwrap() ^= 0x01;
    assert_eq!(error_code(&h.deliver(t, &req)[0]), None);
    assert_eq!(h.server.stats().allocations, 1);
    *binding.last_mut().unwrap() ^= 0x80;
    assert_eq!(h.deliver(t, &binding).len(), 1);
}

#[test]
fn another_realm_gets_401_with_ours() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    // Signed with the right key, but claiming another realm.
    let req = harness::signed_request(
        &h,
        t.client,
        Method::ALLOCATE,
        "alice",
        "wonderland",
        "evil.example",
        1,
        |w| {
            w.add(&RequestedTransport(17)).unwrap();
        },
    );
    let resp = h.deliver(t, &req);
    assert_eq!(error_code(&resp[0]), Some(401));
    let m = Message::parse(&resp[0]).unwrap();
    assert_eq!(m.attr::<Realm>().unwrap(), Some(Realm(REALM)));
    assert!(m.attr::<Nonce>().unwrap().is_some());
    assert_eq!(h.server.stats().allocations, 0);
    assert_eq!(h.server.stats().auth_failures, 1);
}

// ----- finding 10: usernames across a restart -------------------------------------------

fn restored(h: &Harness, username: &str) -> AllocationSnapshot {
    harness::snapshot(&h.server.allocations().next().unwrap(), username)
}

fn refresh_as(h: &mut Harness, t: FiveTuple, user: &str, pass: &str, tid: u8) -> Option<u16> {
    let req = harness::signed_request(h, t.client, Method::REFRESH, user, pass, REALM, tid, |w| {
        w.add(&Lifetime(600)).unwrap();
    });
    error_code(&h.deliver(t, &req)[0])
}

#[test]
fn a_restored_allocation_still_refuses_other_credentials_with_441() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    assert!(matches!(h.allocate(&mut alice(), t), Ev::Allocated { .. }));
    let add = h.take_changes().into_iter().find_map(|c| match c {
        TableChange::AllocationAdd { username, .. } => Some(username),
        _ => None,
    });
    assert_eq!(add.as_deref(), Some("alice"), "the data plane is told");

    let mut h2 = Harness::new(config());
    h2.now = h.now;
    h2.server.restore(restored(&h, "alice"));
    assert_eq!(h2.server.allocations().next().unwrap().username, "alice");
    assert_eq!(refresh_as(&mut h2, t, "bob", "builder", 1), Some(441));
    assert_eq!(h2.server.stats().auth_failures, 1);
    assert_eq!(refresh_as(&mut h2, t, "alice", "wonderland", 2), None);
}

#[test]
fn an_unknown_restored_username_is_set_by_its_own_user_only() {
    let mut h = Harness::new(config());
    let t = tuple("203.0.113.1:40000");
    assert!(matches!(h.allocate(&mut alice(), t), Ev::Allocated { .. }));
    let mut h2 = Harness::new(config());
    h2.now = h.now;
    // An old data plane kept no username.
    h2.server.restore(restored(&h, ""));
    // Another user may not adopt it.
    assert_eq!(refresh_as(&mut h2, t, "bob", "builder", 1), Some(441));
    // Its accounting user re-establishes the username, which then holds.
    assert_eq!(refresh_as(&mut h2, t, "alice", "wonderland", 2), None);
    assert_eq!(h2.server.allocations().next().unwrap().username, "alice");
    assert_eq!(refresh_as(&mut h2, t, "bob", "builder", 3), Some(441));
}

#[test]
fn rest_allocations_carry_the_full_username_to_the_data_plane() {
    let creds = Credentials::new(REALM, &[], &["s3cret".into()]);
    let mut h = Harness::with_credentials(config(), creds);
    let user = format!("{}:carol", h.now.secs() + 3600);
    let mut c = Client::new(&user, &rest_password("s3cret", &user), 1);
    assert!(matches!(
        h.allocate(&mut c, tuple("203.0.113.1:1")),
        Ev::Allocated { .. }
    ));
    let add = h.take_changes().into_iter().find_map(|c| match c {
        TableChange::AllocationAdd { user, username, .. } => Some((user, username)),
        _ => None,
    });
    assert_eq!(add, Some(("carol".to_owned(), user)));
}

// ----- finding 13: refusal accounting and log sampling ----------------------------------

// The sampler itself is tested where it lives (`turnpike_plane::limit`).

#[test]
fn refusals_are_counted_by_kind() {
    let mut cfg = config();
    cfg.user_quota = 1;
    cfg.policy = PeerPolicy::new(
        vec![],
        vec!["198.51.100.0/24".parse::<Cidr>().unwrap()],
        vec![],
    );
    let mut h = Harness::new(cfg);
    let t = tuple("203.0.113.1:40000");
    let mut c = alice();
    assert!(matches!(h.allocate(&mut c, t), Ev::Allocated { .. }));
    // Policy: 403.
    let mut req = Vec::new();
    c.create_permission(h.now.0, &["198.51.100.20:7000".parse().unwrap()], &mut req)
        .unwrap();
    assert_eq!(h.run(&mut c, t, &req), Ev::Failed(403));
    // Quota: 486.
    assert_eq!(
        h.allocate(&mut alice(), tuple("203.0.113.1:40001")),
        Ev::Failed(486)
    );
    // Stale nonce: 438.
    h.advance(601);
    let mut req = Vec::new();
    c.refresh(h.now.0, 600, &mut req).unwrap();
    assert_eq!(error_code(&h.deliver(t, &req)[0]), Some(438));
    // Wrong password: 401.
    let mut m = Client::new("alice", "guess", 9);
    assert_eq!(h.allocate(&mut m, tuple("203.0.113.9:1")), Ev::Failed(401));
    let s = h.server.stats();
    assert_eq!(s.policy_denied, 1);
    assert_eq!(s.quota_rejected, 1);
    assert_eq!(s.stale_nonces, 1);
    assert_eq!(s.auth_failures, 1);
}
