//! The peer policy over many spellings of the same forbidden address.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr, SocketAddrV6};

use turnpike_controlplane::{Cidr, PeerPolicy, Verdict, canonical_ip};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn every_encoding_of_loopback_and_metadata_is_denied() {
    let p = PeerPolicy::default();
    let forbidden = [
        // 127.0.0.1
        "127.0.0.1",
        "127.1.2.3",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:7f00:1",
        "::127.0.0.1",        // IPv4-compatible
        "::ffff:0:127.0.0.1", // IPv4-translated
        "64:ff9b::7f00:1",    // NAT64 well-known prefix
        "64:ff9b:1::7f00:1",  // NAT64 local-use prefix
        "2002:7f00:1::",      // 6to4
        "2002:7f00:1:1234::5",
        "2001:0:4136:e378:8000:63bf:80ff:fffe", // Teredo, client 127.0.0.1 (inverted)
        // 169.254.169.254, the cloud metadata service
        "169.254.169.254",
        "::ffff:169.254.169.254",
        "::ffff:a9fe:a9fe",
        "64:ff9b::a9fe:a9fe",
        "2002:a9fe:a9fe::1",
        "2001:0:1:2:3:4:5601:5601",
        // private, CGN, unspecified, multicast, broadcast, ULA, link-local
        "10.0.0.1",
        "172.16.5.4",
        "172.31.255.255",
        "192.168.1.1",
        "100.64.0.1",
        "0.0.0.0",
        "0.1.2.3",
        "::",
        "224.0.0.1",
        "239.255.255.250",
        "255.255.255.255",
        "240.0.0.1",
        "fd00::1",
        "fc00::1",
        "fe80::1",
        "ff02::1",
        "::ffff:10.0.0.1",
        "::ffff:192.168.0.1",
        "64:ff9b::a00:1",
        "2002:c0a8:101::",
    ];
    for s in forbidden {
        assert_eq!(p.check_ip(ip(s)), Verdict::Deny, "{s}");
        assert_eq!(p.check(SocketAddr::new(ip(s), 80)), Verdict::Deny, "{s}");
    }
    let allowed = [
        "198.51.100.1",
        "8.8.8.8",
        "2001:db8::1",
        "2606:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
    ];
    for s in allowed {
        assert_eq!(p.check_ip(ip(s)), Verdict::Allow, "{s}");
    }
}

#[test]
fn canonical_forms() {
    assert_eq!(canonical_ip(ip("::ffff:1.2.3.4")), ip("1.2.3.4"));
    assert_eq!(canonical_ip(ip("64:ff9b::102:304")), ip("1.2.3.4"));
    assert_eq!(canonical_ip(ip("2002:102:304::")), ip("1.2.3.4"));
    assert_eq!(canonical_ip(ip("2001:0:1:2:3:4:fefd:fcfb")), ip("1.2.3.4"));
    assert_eq!(canonical_ip(ip("::1")), ip("::1"));
    assert_eq!(canonical_ip(ip("::")), ip("::"));
    assert_eq!(canonical_ip(ip("2001:db8::1")), ip("2001:db8::1"));
}

#[test]
fn scoped_addresses_are_denied() {
    let p = PeerPolicy::new(vec!["::/0".parse().unwrap()], vec![], vec![]);
    let scoped = SocketAddr::V6(SocketAddrV6::new("2001:db8::1".parse().unwrap(), 5, 0, 3));
    assert_eq!(p.check(scoped), Verdict::Deny);
    let plain = SocketAddr::V6(SocketAddrV6::new("2001:db8::1".parse().unwrap(), 5, 0, 0));
    assert_eq!(p.check(plain), Verdict::Allow);
}

#[test]
fn operator_lists_override_and_deny_beats_allow() {
    let p = PeerPolicy::new(
        vec!["10.0.0.0/8".parse().unwrap(), "127.0.0.1".parse().unwrap()],
        vec![
            "10.9.0.0/16".parse().unwrap(),
            "203.0.113.0/24".parse().unwrap(),
        ],
        vec![
            "10.0.0.5:3478".parse().unwrap(),
            "0.0.0.0:9090".parse().unwrap(),
        ],
    );
    assert_eq!(p.check_ip(ip("10.1.1.1")), Verdict::Allow);
    assert_eq!(p.check_ip(ip("::ffff:10.1.1.1")), Verdict::Allow);
    assert_eq!(p.check_ip(ip("10.9.1.1")), Verdict::Deny);
    assert_eq!(p.check_ip(ip("203.0.113.9")), Verdict::Deny);
    assert_eq!(
        p.check_ip(ip("64:ff9b::cb00:7109")),
        Verdict::Deny,
        "deny list sees through NAT64"
    );
    assert_eq!(p.check_ip(ip("127.0.0.1")), Verdict::Allow);
    assert_eq!(p.check_ip(ip("127.0.0.2")), Verdict::Deny);
    // Own service sockets: exact, and any address on a wildcard-bound port.
    assert_eq!(p.check("10.0.0.5:3478".parse().unwrap()), Verdict::Deny);
    assert_eq!(
        p.check("[::ffff:10.0.0.5]:3478".parse().unwrap()),
        Verdict::Deny
    );
    assert_eq!(p.check("10.0.0.5:3479".parse().unwrap()), Verdict::Allow);
    assert_eq!(p.check("10.1.1.1:9090".parse().unwrap()), Verdict::Deny);
}

#[test]
fn cidr_parsing() {
    assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    assert!("nonsense".parse::<Cidr>().is_err());
    assert_eq!(
        "10.1.2.3/8".parse::<Cidr>().unwrap().to_string(),
        "10.0.0.0/8"
    );
    assert_eq!("fd12::1/8".parse::<Cidr>().unwrap().to_string(), "fd00::/8");
}
