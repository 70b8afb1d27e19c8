//! The peer policy: one function that canonicalizes a peer address and decides whether a
//! client may reach it. It gates CreatePermission, ChannelBind and (through permissions)
//! every later relay path.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// An IP network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// A CIDR string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CIDR {0:?}: expected ADDRESS/PREFIX, e.g. 10.0.0.0/8 or fd00::/8")]
pub struct CidrError(pub String);

impl Cidr {
    /// A network; the address is masked to the prefix.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then(|| Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// Whether `ip` is in the network. IPv4 networks match IPv4 addresses only; canonicalize
    /// first to match IPv4 embedded in IPv6.
    pub fn contains(&self, ip: &IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(*ip, self.prefix) == self.addr
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let err = || CidrError(s.to_owned());
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| err())?;
        let prefix = match p {
            Some(p) => p.trim().parse().map_err(|_| err())?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Cidr::new(addr, prefix).ok_or_else(err)
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

fn cidr(s: &str) -> Cidr {
    // Only called on the constant lists below, which are valid.
    s.parse().unwrap_or(Cidr {
        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        prefix: 32,
    })
}

/// Ranges no client may reach unless the operator allows them: the IANA IPv4 and IPv6
/// Special-Purpose Address Registries' entries that are not globally reachable (the
/// exceptions inside them are [`DEFAULT_REACHABLE`]), multicast, the IPv4 reserved
/// block with the limited broadcast address, deprecated site-local, and the rest of
/// `::/8`, which IANA reserves (an address there is no host's).
const DEFAULT_DENY: &[&str] = &[
    "0.0.0.0/8",       // "this network", unspecified
    "10.0.0.0/8",      // private
    "100.64.0.0/10",   // carrier-grade NAT
    "127.0.0.0/8",     // loopback
    "169.254.0.0/16",  // link-local, the cloud metadata service
    "172.16.0.0/12",   // private
    "192.0.0.0/24",    // IETF protocol assignments (but see DEFAULT_REACHABLE)
    "192.0.2.0/24",    // documentation (TEST-NET-1)
    "192.88.99.0/24",  // 6to4 relay anycast (deprecated, RFC 7526)
    "192.168.0.0/16",  // private
    "198.18.0.0/15",   // benchmarking
    "198.51.100.0/24", // documentation (TEST-NET-2)
    "203.0.113.0/24",  // documentation (TEST-NET-3)
    "224.0.0.0/4",     // multicast
    "240.0.0.0/4",     // reserved, and 255.255.255.255 broadcast
    "::/8",            // reserved by IETF (but see DEFAULT_REACHABLE)
    "::/127",          // unspecified and loopback (more specific than ::/96 below)
    "100::/64",        // discard-only
    "100:0:0:1::/64",  // dummy prefix (RFC 9780)
    "2001::/23",       // IETF protocol assignments (but see DEFAULT_REACHABLE)
    "2001:db8::/32",   // documentation
    "3fff::/20",       // documentation
    "5f00::/16",       // segment routing (SRv6) SIDs
    "fc00::/7",        // unique local
    "fe80::/10",       // link-local
    "fec0::/10",       // site-local (deprecated)
    "ff00::/8",        // multicast
];

/// Globally reachable entries of the registries inside [`DEFAULT_DENY`]'s ranges, and the
/// IPv6 forms whose embedded IPv4 address decides. The most specific entry of the two
/// lists that contains an address decides, as in a routing table (judged by that address, see
/// [`canonical_ip`]). ORCHIDv2 (2001:20::/28) and DETs (2001:30::/28) are marked globally
/// reachable but are identifiers, not routable at the IP layer (RFC 7343, RFC 9374), so
/// they stay denied, as do benchmarking (2001:2::/48) and deprecated ORCHID (2001:10::/28).
const DEFAULT_REACHABLE: &[&str] = &[
    "192.0.0.9/32",    // PCP anycast
    "192.0.0.10/32",   // TURN anycast
    "::/96",           // IPv4-compatible: judged by the IPv4 address
    "::ffff:0:0/96",   // IPv4-mapped: judged by the IPv4 address
    "::ffff:0:0:0/96", // IPv4-translated: judged by the IPv4 address
    "64:ff9b::/96",    // NAT64 well-known prefix: judged by the IPv4 address
    "64:ff9b:1::/48",  // NAT64 local use: judged by the IPv4 address
    "2001::/32",       // Teredo: judged by the client's IPv4 address
    "2001:1::1/128",   // PCP anycast
    "2001:1::2/128",   // TURN anycast
    "2001:1::3/128",   // DNS-SD service registration protocol anycast
    "2001:3::/32",     // AMT
    "2001:4:112::/48", // AS112-v6
];

/// The decision for one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The client may reach it.
    Allow,
    /// It is forbidden (403).
    Deny,
}

/// The peer policy: default deny ranges, the operator's allow and deny lists, and the
/// server's own service sockets.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    default_deny: Vec<Cidr>,
    default_reachable: Vec<Cidr>,
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    own: Vec<SocketAddr>,
}

impl Default for PeerPolicy {
    fn default() -> Self {
        PeerPolicy::new(Vec::new(), Vec::new(), Vec::new())
    }
}

impl PeerPolicy {
    /// A policy with the operator's `allow` and `deny` lists and the server's own service
    /// sockets (listening, gRPC, metrics), which are never a valid peer.
    pub fn new(allow: Vec<Cidr>, deny: Vec<Cidr>, own: Vec<SocketAddr>) -> PeerPolicy {
        PeerPolicy {
            default_deny: DEFAULT_DENY.iter().map(|s| cidr(s)).collect(),
            default_reachable: DEFAULT_REACHABLE.iter().map(|s| cidr(s)).collect(),
            allow,
            deny,
            own: own
                .into_iter()
                .map(|s| SocketAddr::new(canonical_ip(s.ip()), s.port()))
                .collect(),
        }
    }

    /// Adds service sockets learned at run time (a data plane's real listening addresses,
    /// from its Hello: in split mode the control plane's configuration does not know them,
    /// and a configured port 0 is not the port in use).
    pub fn add_own_sockets(&mut self, extra: impl IntoIterator<Item = SocketAddr>) {
        for s in extra {
            let s = SocketAddr::new(canonical_ip(s.ip()), s.port());
            if s.port() != 0 && !self.own.contains(&s) {
                self.own.push(s);
            }
        }
    }

    /// The operator's allow and deny lists.
    pub fn lists(&self) -> (Vec<Cidr>, Vec<Cidr>) {
        (self.allow.clone(), self.deny.clone())
    }

    /// This policy with other operator lists (the defaults and own sockets kept).
    pub fn with_lists(&self, allow: Vec<Cidr>, deny: Vec<Cidr>) -> PeerPolicy {
        PeerPolicy {
            allow,
            deny,
            ..self.clone()
        }
    }

    /// The server's own service sockets, canonical.
    pub fn own_sockets(&self) -> &[SocketAddr] {
        &self.own
    }

    /// Decides for a peer IP (CreatePermission).
    ///
    /// An address is judged in every form it has: as written, and as the IPv4 address it
    /// embeds (see [`canonical_ip`]; for the NAT64 local-use prefix, under each layout it
    /// may be deployed with). An operator deny rule on any form denies, so a rule written
    /// for `64:ff9b::/96` or `2002::/16` matches as well as one for the IPv4 range. A
    /// default-denied form is denied unless an operator allow rule covers that same form:
    /// allowing `64:ff9b::/96` opens NAT64 to public IPv4, not to 127.0.0.1 through it.
    /// Everything else is allowed.
    pub fn check_ip(&self, ip: IpAddr) -> Verdict {
        let forms = forms(ip);
        if forms
            .iter()
            .any(|f| self.deny.iter().any(|c| c.contains(f)))
        {
            return Verdict::Deny;
        }
        let default_denied = |f: &IpAddr| {
            (self.default_denied(f) || is_broadcast(f)) && !self.allow.iter().any(|c| c.contains(f))
        };
        if forms.iter().any(default_denied) {
            return Verdict::Deny;
        }
        Verdict::Allow
    }

    /// Whether the default lists deny `ip`: the most specific range of [`DEFAULT_DENY`]
    /// and [`DEFAULT_REACHABLE`] that contains it decides.
    fn default_denied(&self, ip: &IpAddr) -> bool {
        let longest = |list: &[Cidr]| {
            list.iter()
                .filter(|c| c.contains(ip))
                .map(|c| c.prefix)
                .max()
        };
        match (
            longest(&self.default_deny),
            longest(&self.default_reachable),
        ) {
            (Some(d), Some(r)) => d > r,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// Decides for a peer transport address (ChannelBind, Send): as [`Self::check_ip`],
    /// and the server's own service sockets and scoped IPv6 addresses are always denied.
    pub fn check(&self, peer: SocketAddr) -> Verdict {
        if let SocketAddr::V6(v6) = peer
            && v6.scope_id() != 0
        {
            return Verdict::Deny;
        }
        let canon = SocketAddr::new(canonical_ip(peer.ip()), peer.port());
        if self.own.iter().any(|o| {
            *o == canon
                || (o.port() == canon.port()
                    && o.ip().is_unspecified()
                    && o.is_ipv4() == canon.is_ipv4())
        }) {
            return Verdict::Deny;
        }
        self.check_ip(peer.ip())
    }
}

fn is_broadcast(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

/// The forms `ip` is judged in: itself, its canonical form, and for the NAT64 local-use
/// prefix the IPv4 addresses the other layouts would decode.
fn forms(ip: IpAddr) -> Vec<IpAddr> {
    let mut forms = vec![ip];
    let mut push = |f: IpAddr| {
        if !forms.contains(&f) {
            forms.push(f);
        }
    };
    push(canonical_ip(ip));
    if let IpAddr::V6(v6) = ip
        && is_nat64_local(&v6)
    {
        for len in NAT64_LOCAL_LAYOUTS {
            if let Some(v4) = nat64_embedded(&v6, len)
                && !in_this_network(&v4)
            {
                push(IpAddr::V4(v4));
            }
        }
    }
    forms
}

/// 0.0.0.0/8: under a NAT64 layout, a field that starts with a zero octet is (almost
/// always) the zero padding of another layout, not an address; such decodes are skipped,
/// or a /96 layout's 8.8.8.8 read as /64 (0.0.0.8) would deny it. The canonical form is
/// still judged whatever it is.
fn in_this_network(v4: &Ipv4Addr) -> bool {
    v4.octets()[0] == 0
}

/// The NAT64 local-use prefix 64:ff9b:1::/48 (RFC 8215).
fn is_nat64_local(v6: &Ipv6Addr) -> bool {
    let s = v6.segments();
    s[0] == 0x0064 && s[1] == 0xFF9B && s[2] == 0x0001
}

/// The RFC 6052 layouts a network may use inside 64:ff9b:1::/48: the /48 itself, or a
/// longer prefix carved from it. Which one a deployment uses is not visible in the
/// address, so the policy decides on all of them.
const NAT64_LOCAL_LAYOUTS: [u8; 4] = [48, 56, 64, 96];

/// The IPv4 address embedded in `v6` under the RFC 6052 §2.2 layout for a prefix of `len`
/// bits: the 32 bits follow the prefix, skipping bits 64..71 (the "u" octet, which must be
/// zero). `None` for a length RFC 6052 does not define.
fn nat64_embedded(v6: &Ipv6Addr, len: u8) -> Option<Ipv4Addr> {
    let o = v6.octets();
    let at: &[usize; 4] = match len {
        32 => &[4, 5, 6, 7],
        40 => &[5, 6, 7, 9],
        48 => &[6, 7, 9, 10],
        56 => &[7, 9, 10, 11],
        64 => &[9, 10, 11, 12],
        96 => &[12, 13, 14, 15],
        _ => return None,
    };
    let mut v4 = [0u8; 4];
    for (d, i) in v4.iter_mut().zip(at) {
        *d = *o.get(*i)?;
    }
    Some(Ipv4Addr::from(v4))
}

/// Canonicalizes an address: IPv4 carried inside IPv6 (IPv4-mapped, IPv4-compatible,
/// IPv4-translated, NAT64 under the well-known prefix 64:ff9b::/96 and the local-use
/// 64:ff9b:1::/48, 6to4 2002::/16, Teredo 2001::/32) becomes the IPv4 address packets
/// actually reach, so that one rule covers every spelling of it.
///
/// The local-use prefix is decoded with the RFC 6052 /48 layout (the IPv4 address in bits
/// 48..63 and 72..87); when that yields no address (0.0.0.0/8), the deployment evidently
/// uses a longer prefix carved from the /48, and the first of the /56, /64 and /96 layouts
/// that yields one is taken. [`PeerPolicy::check_ip`] goes further and denies if any
/// layout's address is denied.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    let s = v6.segments();
    let o = v6.octets();
    let tail_v4 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    // ::ffff:a.b.c.d (mapped)
    if s[..5] == [0, 0, 0, 0, 0] && s[5] == 0xFFFF {
        return IpAddr::V4(tail_v4);
    }
    // ::ffff:0:a.b.c.d (translated, RFC 2765)
    if s[..4] == [0, 0, 0, 0] && s[4] == 0xFFFF && s[5] == 0 {
        return IpAddr::V4(tail_v4);
    }
    // ::a.b.c.d (compatible, deprecated); :: and ::1 stay IPv6.
    if s[..6] == [0, 0, 0, 0, 0, 0] && u32::from(tail_v4) > 1 {
        return IpAddr::V4(tail_v4);
    }
    // NAT64 well-known prefix 64:ff9b::/96 (RFC 6052: only ever the /96 layout).
    if s[0] == 0x0064 && s[1] == 0xFF9B && s[2..6] == [0, 0, 0, 0] {
        return IpAddr::V4(tail_v4);
    }
    // NAT64 local-use prefix 64:ff9b:1::/48 (RFC 8215).
    if is_nat64_local(&v6) {
        let v4 = NAT64_LOCAL_LAYOUTS
            .iter()
            .filter_map(|len| nat64_embedded(&v6, *len))
            .find(|v4| !in_this_network(v4))
            .or_else(|| nat64_embedded(&v6, 48))
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        return IpAddr::V4(v4);
    }
    // 6to4: 2002:AABB:CCDD::/48 carries AA.BB.CC.DD.
    if s[0] == 0x2002 {
        return IpAddr::V4(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    // Teredo: 2001:0000::/32; the client's IPv4 is the last 32 bits inverted.
    if s[0] == 0x2001 && s[1] == 0 {
        return IpAddr::V4(Ipv4Addr::from(!u32::from(tail_v4)));
    }
    ip
}
