//! The server's settings.

use std::net::IpAddr;

use turnpike_plane::RelayIp;

use crate::policy::PeerPolicy;

/// The server's settings. Every field has a default; see [`ServerConfig::default`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Relay IPs (at least one per family to be served).
    pub relay_ips: Vec<IpAddr>,
    /// Behind a 1:1 NAT: the address clients are given (XOR-RELAYED-ADDRESS) for relay
    /// IPs of `relay_ips`; those not listed are given as they are. Used when the data
    /// plane of a request sent no relay IPs of its own (see
    /// [`Via::relay_ips`](super::Via::relay_ips)).
    pub advertised_ips: Vec<RelayIp>,
    /// Relay port range, inclusive.
    pub relay_ports: (u16, u16),
    /// Lifetime granted when the client asks for less or nothing (s). RFC default 600.
    pub default_lifetime: u32,
    /// Most lifetime granted (s). Default 3600.
    pub max_lifetime: u32,
    /// Permission lifetime (s). RFC: 300.
    pub permission_lifetime: u32,
    /// Channel binding lifetime (s). RFC: 600.
    pub channel_lifetime: u32,
    /// How long a nonce stays valid (s). Default 600.
    pub nonce_lifetime: u32,
    /// Allocations per user (the accounting user: for REST credentials the part after
    /// `:`); 0 is unlimited. Default 100: far more than one client needs (an ICE agent
    /// allocates once per component and candidate family, a conference client a few
    /// dozen at most), and small enough that one leaked or abused credential holds under
    /// 1 % of the default relay port range, so it cannot starve other users.
    pub user_quota: u32,
    /// Allocations in all; 0 is unlimited. Default 15 000: below the 16 384 ports of the
    /// default relay range on one relay IP, so that ports stay free for EVEN-PORT
    /// reservations (which hold a second port) and for binds being retried, and the
    /// random port choice does not degrade into a search of a nearly full range. Lower it
    /// with a narrower `relay_ports`, raise it with more relay IPs.
    pub total_quota: u32,
    /// Bandwidth limit per allocation and direction in bytes/s, enforced by the data plane;
    /// 0 is unlimited.
    pub bandwidth_limit: u64,
    /// Permissions per allocation (a bound on memory); further ones get 508.
    pub max_permissions: usize,
    /// Channels per allocation; further ones get 508.
    pub max_channels: usize,
    /// Unauthenticated requests (401/438 challenges, 400s, Binding) answered per second
    /// per client transport address (IP and port); 0 disables this level. Default 20.
    /// Answers a client holding an allocation (or awaiting one) needs to keep it, such as
    /// a 438 on Refresh, are never limited.
    pub unauth_rate: u32,
    /// Burst of unauthenticated requests per client transport address. Default 64: a
    /// client needs two or three per allocation, so this only bites a flood.
    pub unauth_burst: u32,
    /// Unauthenticated requests answered per second per client IP, across all its ports;
    /// 0 disables this level. Default 200: far above one client's needs, so that many
    /// clients behind one NAT address are not throttled, yet a host spraying source ports
    /// (or spoofing a victim's address at up to this rate) does not starve the victim.
    pub unauth_ip_rate: u32,
    /// Burst of unauthenticated requests per client IP. Default 1000: 200 clients behind
    /// one address starting at once, each with two or three unauthenticated exchanges
    /// (Binding, the 401 challenge, a 438), fit in it.
    pub unauth_ip_burst: u32,
    /// The peer policy.
    pub policy: PeerPolicy,
    /// SOFTWARE sent in authenticated responses.
    pub software: Option<String>,
    /// Accept the RFC 5766 channel range 0x4000..=0x7FFF (RFC 8656 allows only
    /// 0x4000..=0x4FFF). Off by default.
    pub legacy_channel_numbers: bool,
    /// Relay sockets each data-plane worker keeps bound in advance per relay IP, so that
    /// a plain Allocate needs no bind round trip (refilled once a second). 0 turns the
    /// pool off. Default 8.
    pub relay_pool: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            relay_ips: vec![IpAddr::from([127, 0, 0, 1])],
            advertised_ips: Vec::new(),
            relay_ports: (49152, 65535),
            default_lifetime: 600,
            max_lifetime: 3600,
            permission_lifetime: 300,
            channel_lifetime: 600,
            nonce_lifetime: 600,
            user_quota: 100,
            total_quota: 15_000,
            bandwidth_limit: 0,
            max_permissions: 256,
            max_channels: 256,
            unauth_rate: 20,
            unauth_burst: 64,
            unauth_ip_rate: 200,
            unauth_ip_burst: 1000,
            policy: PeerPolicy::default(),
            software: Some(concat!("turnpike ", env!("CARGO_PKG_VERSION")).to_owned()),
            legacy_channel_numbers: false,
            relay_pool: 8,
        }
    }
}
