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
        "8.8.8.8",
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

#[test]
fn operator_deny_rules_on_ipv6_transition_prefixes_match() {
    // Each rule names a transition prefix as written; the address it is checked against
    // canonicalizes to a public IPv4 address, which used to hide it from the rule.
    let cases = [
        ("64:ff9b::/96", "64:ff9b::808:808"),
        ("2002::/16", "2002:808:808::1"),
        ("2001::/32", "2001:0:4136:e378:8000:63bf:f7f7:f7f7"),
        ("::ffff:0:0/96", "::ffff:8.8.8.8"),
    ];
    for (rule, addr) in cases {
        let open = PeerPolicy::default();
        assert_eq!(open.check_ip(ip(addr)), Verdict::Allow, "{addr}");
        let p = PeerPolicy::new(vec![], vec![rule.parse().unwrap()], vec![]);
        assert_eq!(p.check_ip(ip(addr)), Verdict::Deny, "{rule} {addr}");
        assert_eq!(
            p.check(SocketAddr::new(ip(addr), 443)),
            Verdict::Deny,
            "{rule} {addr}"
        );
        // The plain IPv4 address is not under the IPv6 rule.
        assert_eq!(p.check_ip(ip("8.8.8.8")), Verdict::Allow, "{rule}");
    }
}

#[test]
fn an_allow_on_one_form_does_not_lift_a_deny_on_the_other() {
    // Allowing the NAT64 prefix opens public IPv4 through it, not loopback or private
    // ranges spelled through it.
    let p = PeerPolicy::new(vec!["64:ff9b::/96".parse().unwrap()], vec![], vec![]);
    assert_eq!(p.check_ip(ip("64:ff9b::808:808")), Verdict::Allow);
    assert_eq!(p.check_ip(ip("64:ff9b::7f00:1")), Verdict::Deny);
    assert_eq!(p.check_ip(ip("64:ff9b::a00:1")), Verdict::Deny);
    // An IPv4 allow does not lift an operator deny on the IPv6 spelling.
    let p = PeerPolicy::new(
        vec!["10.0.0.0/8".parse().unwrap()],
        vec!["64:ff9b::/96".parse().unwrap()],
        vec![],
    );
    assert_eq!(p.check_ip(ip("10.1.2.3")), Verdict::Allow);
    assert_eq!(p.check_ip(ip("::ffff:10.1.2.3")), Verdict::Allow);
    assert_eq!(p.check_ip(ip("64:ff9b::a01:203")), Verdict::Deny);
    // ...and an IPv4 allow still covers the other spellings of an allowed address.
    assert_eq!(p.check_ip(ip("2002:a01:203::")), Verdict::Allow);
}

#[test]
fn nat64_local_use_prefix_is_decoded_with_rfc6052_layouts() {
    // RFC 6052 /48 layout under 64:ff9b:1::/48: 10.0 in bits 48..63, the u octet, then
    // 0.1. Read with the /96 layout it looked like 8.8.8.8.
    let addr = ip("64:ff9b:1:a00:0:100:808:808");
    assert_eq!(canonical_ip(addr), ip("10.0.0.1"));
    let p = PeerPolicy::default();
    assert_eq!(p.check_ip(addr), Verdict::Deny);
    assert_eq!(p.check(SocketAddr::new(addr, 3478)), Verdict::Deny);
    // The /48 layout of a public address.
    let public = ip("64:ff9b:1:808:8:800::");
    assert_eq!(canonical_ip(public), ip("8.8.8.8"));
    assert_eq!(p.check_ip(public), Verdict::Allow);
    // A /96 carved from the local-use prefix: the /48 field is empty, the /96 one counts.
    assert_eq!(canonical_ip(ip("64:ff9b:1::808:808")), ip("8.8.8.8"));
    assert_eq!(p.check_ip(ip("64:ff9b:1::808:808")), Verdict::Allow);
    assert_eq!(p.check_ip(ip("64:ff9b:1::7f00:1")), Verdict::Deny);
    // A /64 carved from it: 127.0.0.1 after the u octet.
    assert_eq!(canonical_ip(ip("64:ff9b:1:0:7f:0:100::")), ip("127.0.0.1"));
    assert_eq!(p.check_ip(ip("64:ff9b:1:0:7f:0:100::")), Verdict::Deny);
    // A /96 inside a sub-prefix whose /48 field looks public still reaches 10.0.0.1:
    // every layout is judged.
    assert_eq!(p.check_ip(ip("64:ff9b:1:abcd::a00:1")), Verdict::Deny);
}

/// Issue #25 N3: the default deny list is the IANA IPv4 and IPv6 Special-Purpose Address
/// Registries minus what is globally reachable; one address of each range (and of the
/// exceptions inside them), checked.
#[test]
fn the_default_list_is_the_iana_special_purpose_registries() {
    let p = PeerPolicy::default();
    let denied = [
        ("0.1.2.3", "0.0.0.0/8 this network"),
        ("10.1.2.3", "10.0.0.0/8 private"),
        ("100.64.1.2", "100.64.0.0/10 shared address space"),
        ("127.0.0.2", "127.0.0.0/8 loopback"),
        ("169.254.1.2", "169.254.0.0/16 link local"),
        ("172.16.1.2", "172.16.0.0/12 private"),
        ("192.0.0.1", "192.0.0.0/24 IETF protocol assignments"),
        ("192.0.0.8", "192.0.0.8/32 IPv4 dummy address"),
        ("192.0.0.170", "192.0.0.170/32 NAT64/DNS64 discovery"),
        ("192.0.2.1", "192.0.2.0/24 documentation"),
        ("192.88.99.1", "192.88.99.0/24 6to4 relay anycast"),
        ("192.168.1.2", "192.168.0.0/16 private"),
        ("198.18.0.1", "198.18.0.0/15 benchmarking"),
        ("198.19.255.1", "198.18.0.0/15 benchmarking"),
        ("198.51.100.1", "198.51.100.0/24 documentation"),
        ("203.0.113.1", "203.0.113.0/24 documentation"),
        ("224.1.2.3", "224.0.0.0/4 multicast"),
        ("240.1.2.3", "240.0.0.0/4 reserved"),
        ("255.255.255.255", "limited broadcast"),
        ("::", "::/128 unspecified"),
        ("::1", "::1/128 loopback"),
        ("::ffff:1:0:7f00:1", "::/8 reserved"),
        ("::1:7f00:1", "::/8 reserved"),
        ("::2:0:0:1", "::/8 reserved"),
        ("ff::1", "::/8 reserved"),
        ("100::1", "100::/64 discard only"),
        ("100:0:0:1::1", "100:0:0:1::/64 dummy prefix"),
        ("2001:1::4", "2001::/23 IETF protocol assignments"),
        ("2001:2::1", "2001:2::/48 benchmarking"),
        ("2001:10::1", "2001:10::/28 deprecated ORCHID"),
        ("2001:20::1", "2001:20::/28 ORCHIDv2"),
        ("2001:30::1", "2001:30::/28 drone remote ID entity tags"),
        ("2001:1ff::1", "2001::/23 IETF protocol assignments"),
        ("2001:db8::1", "2001:db8::/32 documentation"),
        ("3fff::1", "3fff::/20 documentation"),
        ("3fff:fff::1", "3fff::/20 documentation"),
        ("5f00::1", "5f00::/16 segment routing SIDs"),
        ("fc00::1", "fc00::/7 unique local"),
        ("fdff::1", "fc00::/7 unique local"),
        ("fe80::1", "fe80::/10 link local"),
        ("fec0::1", "fec0::/10 site local"),
        ("ff0e::1", "ff00::/8 multicast"),
        ("::ffff:192.88.99.1", "6to4 relay anycast, IPv4-mapped"),
        ("2002:c058:6301::", "6to4 relay anycast, as 6to4"),
    ];
    for (s, range) in denied {
        assert_eq!(p.check_ip(ip(s)), Verdict::Deny, "{s} ({range})");
    }
    let allowed = [
        ("192.0.0.9", "192.0.0.9/32 PCP anycast"),
        ("192.0.0.10", "192.0.0.10/32 TURN anycast"),
        ("192.31.196.1", "192.31.196.0/24 AS112-v4"),
        ("192.52.193.1", "192.52.193.0/24 AMT"),
        ("192.175.48.1", "192.175.48.0/24 direct delegation AS112"),
        ("198.17.255.1", "just below benchmarking"),
        ("198.20.0.1", "just above benchmarking"),
        ("1.1.1.1", "global unicast"),
        ("::ffff:8.8.8.8", "IPv4-mapped global"),
        ("::8.8.8.8", "IPv4-compatible global"),
        ("64:ff9b::808:808", "NAT64 well-known prefix, global"),
        ("64:ff9b:1::808:808", "NAT64 local use, global IPv4"),
        (
            "2001:0:4136:e378:8000:63bf:f7f7:f7f7",
            "Teredo, client 8.8.8.8",
        ),
        ("2001:1::1", "2001:1::1/128 PCP anycast"),
        ("2001:1::2", "2001:1::2/128 TURN anycast"),
        ("2001:1::3", "2001:1::3/128 DNS-SD SRP anycast"),
        ("2001:3::1", "2001:3::/32 AMT"),
        ("2001:4:112::1", "2001:4:112::/48 AS112-v6"),
        ("2001:200::1", "global unicast just above 2001::/23"),
        (
            "2620:4f:8000::1",
            "2620:4f:8000::/48 direct delegation AS112",
        ),
        ("2606:4700::1111", "global unicast"),
        ("3fff:1000::1", "just above 3fff::/20"),
    ];
    for (s, what) in allowed {
        assert_eq!(p.check_ip(ip(s)), Verdict::Allow, "{s} ({what})");
    }
    // An operator who relays to a lab on a documentation range allows it explicitly.
    let lab = PeerPolicy::new(
        vec![
            "2001:db8::/32".parse().unwrap(),
            "198.51.100.0/24".parse().unwrap(),
        ],
        Vec::new(),
        Vec::new(),
    );
    assert_eq!(lab.check_ip(ip("2001:db8::1")), Verdict::Allow);
    assert_eq!(lab.check_ip(ip("198.51.100.1")), Verdict::Allow);
    assert_eq!(lab.check_ip(ip("::1")), Verdict::Deny);
}

/// Both ends of a call on one relay (the hairpin, issue #26): another client's relayed
/// address on this server is a peer like any other by default, while the server's
/// service sockets on the same IP are not; the operator's lists and the default deny
/// list apply to it as to any peer.
#[test]
fn the_servers_own_relayed_addresses_are_peers_subject_to_the_policy() {
    let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
    // A public address (a documentation range would be denied by default).
    let own = vec![sa("93.184.216.10:3478"), sa("0.0.0.0:9100")];
    let p = PeerPolicy::new(vec![], vec![], own.clone());
    // A relayed address (same IP, a relay port): allowed.
    assert_eq!(p.check(sa("93.184.216.10:50000")), Verdict::Allow);
    assert_eq!(p.check_ip(ip("93.184.216.10")), Verdict::Allow);
    // The service sockets themselves: denied, whatever the spelling.
    assert_eq!(p.check(sa("93.184.216.10:3478")), Verdict::Deny);
    assert_eq!(p.check(sa("[::ffff:93.184.216.10]:3478")), Verdict::Deny);
    assert_eq!(p.check(sa("93.184.216.10:9100")), Verdict::Deny);
    // An operator deny rule covering the relay IP denies its relayed addresses too.
    let p = PeerPolicy::new(
        vec![],
        vec!["93.184.216.0/24".parse().unwrap()],
        own.clone(),
    );
    assert_eq!(p.check(sa("93.184.216.10:50000")), Verdict::Deny);
    // A relay on a private address is denied by default, like any private peer, until
    // the operator allows its range.
    let p = PeerPolicy::new(vec![], vec![], vec![sa("10.88.0.1:3478")]);
    assert_eq!(p.check(sa("10.88.0.1:50000")), Verdict::Deny);
    let p = PeerPolicy::new(
        vec!["10.88.0.0/24".parse().unwrap()],
        vec![],
        vec![sa("10.88.0.1:3478")],
    );
    assert_eq!(p.check(sa("10.88.0.1:50000")), Verdict::Allow);
    assert_eq!(p.check(sa("10.88.0.1:3478")), Verdict::Deny);
}
