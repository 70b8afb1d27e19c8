//! The PROXY protocol header a load balancer puts in front of a TCP connection to tell
//! the client's address (HAProxy's proxy-protocol.txt, versions 1 and 2).
//!
//! [`parse`] is called with the bytes received so far, from the start of the
//! connection, until it returns a header or an error; the header's bytes are then
//! dropped from the stream and what follows is TURN. Nothing is copied or allocated.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// How a version 1 header starts.
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// The longest version 1 header, CRLF included.
const V1_MAX: usize = 107;
/// How a version 2 header starts.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The signature, version and command, family, and length of a version 2 header.
const V2_FIXED: usize = 16;
/// The longest version 2 address block (addresses and TLVs) accepted, which bounds the
/// bytes held before the header is complete.
const V2_MAX_BLOCK: usize = 2048;
/// The longest header accepted, either version: what a connection buffers at most
/// before its header is complete.
pub(crate) const MAX_HEADER: usize = V2_FIXED + V2_MAX_BLOCK;

/// What the bytes received so far hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// A valid header may still follow: read more.
    Incomplete,
    /// A complete header.
    Header {
        /// Its length: the stream proper starts after it.
        len: usize,
        /// The client's address (source) and the address it connected to
        /// (destination); `None` when the connection's own endpoints stand (a v2
        /// LOCAL command, a v1 UNKNOWN or a v2 UNSPEC family).
        addrs: Option<(SocketAddr, SocketAddr)>,
    },
}

/// Why the bytes received cannot start with a valid PROXY protocol header. The
/// connection must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProxyError {
    /// The bytes start with neither the version 1 nor the version 2 signature.
    #[error("no PROXY protocol header")]
    Missing,
    /// No CRLF within the first 107 bytes of a version 1 header.
    #[error("PROXY v1 header longer than 107 bytes")]
    V1TooLong,
    /// A version 1 header that does not follow the grammar; says which part.
    #[error("malformed PROXY v1 header: bad {0}")]
    V1Malformed(&'static str),
    /// A version 2 signature followed by another version than 2.
    #[error("unsupported PROXY v2 version {0}")]
    V2Version(u8),
    /// A command other than LOCAL (0) and PROXY (1).
    #[error("unknown PROXY v2 command {0:#x}")]
    V2Command(u8),
    /// A PROXY command with an address family other than UNSPEC, TCP or UDP over IPv4
    /// or IPv6 (UNIX sockets included: they name no client address).
    #[error("unsupported PROXY v2 address family {0:#04x}")]
    V2Family(u8),
    /// An address block shorter than the family's addresses.
    #[error("PROXY v2 address block of {len} bytes too short for family {family:#04x}")]
    V2TooShort {
        /// The family byte.
        family: u8,
        /// The block's length.
        len: u16,
    },
    /// An address block longer than 2048 bytes.
    #[error("PROXY v2 address block of {0} bytes longer than 2048")]
    V2TooLong(u16),
    /// A PROXY command for a datagram (UDP) connection: every PROXY listener here is a
    /// stream (TCP or TLS) one, so the header describes some other connection.
    #[error("PROXY v2 header for a datagram connection ({0:#04x}) on a stream listener")]
    V2Datagram(u8),
}

impl ProxyError {
    /// Whether the header was well formed but declares what cannot be this connection
    /// (counted as a refusal, not a framing error).
    pub(crate) fn is_refusal(self) -> bool {
        matches!(self, ProxyError::V2Datagram(_))
    }
}

/// Why a declared source address cannot be a client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadSource {
    /// An unspecified address (0.0.0.0, ::, or 0.0.0.0/8 "this network").
    #[error("unspecified source address")]
    Unspecified,
    /// Port 0: no TCP connection comes from it.
    #[error("source port 0")]
    PortZero,
    /// The limited broadcast address or a multicast group: never a connection's source.
    #[error("broadcast or multicast source address")]
    Broadcast,
    /// One of the server's own listening addresses.
    #[error("the server's own address as source")]
    Own,
}

/// Checks a source address a PROXY header declares. `own` says whether an address (an
/// IPv4-mapped one given as IPv4) is one of the server's own listening sockets; answers
/// to such a "client" would go to the server itself.
pub(crate) fn check_source(
    src: SocketAddr,
    own: impl Fn(&SocketAddr) -> bool,
) -> Result<(), BadSource> {
    let src = SocketAddr::new(src.ip().to_canonical(), src.port());
    match src.ip() {
        IpAddr::V4(v4) if v4.octets()[0] == 0 => return Err(BadSource::Unspecified),
        IpAddr::V4(v4) if v4.is_broadcast() || v4.is_multicast() => {
            return Err(BadSource::Broadcast);
        }
        IpAddr::V6(v6) if v6.is_unspecified() => return Err(BadSource::Unspecified),
        IpAddr::V6(v6) if v6.is_multicast() => return Err(BadSource::Broadcast),
        _ => {}
    }
    if src.port() == 0 {
        return Err(BadSource::PortZero);
    }
    if own(&src) {
        return Err(BadSource::Own);
    }
    Ok(())
}

/// Parses the PROXY protocol header at the start of `buf`, the bytes received so far.
/// Returns [`Parsed::Incomplete`] as long as more bytes could still make a valid header,
/// and an error as soon as they cannot.
pub(crate) fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if starts_like(buf, V2_SIGNATURE) {
        parse_v2(buf)
    } else if starts_like(buf, V1_PREFIX) {
        parse_v1(buf)
    } else {
        Err(ProxyError::Missing)
    }
}

/// Whether `buf` and `signature` agree on their common length.
fn starts_like(buf: &[u8], signature: &[u8]) -> bool {
    let n = buf.len().min(signature.len());
    buf.get(..n) == signature.get(..n)
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let Some((_, rest)) = buf.split_first_chunk::<{ V2_SIGNATURE.len() }>() else {
        return Ok(Parsed::Incomplete);
    };
    // Each byte is checked as soon as it is there.
    let Some((&ver_cmd, rest)) = rest.split_first() else {
        return Ok(Parsed::Incomplete);
    };
    let version = ver_cmd >> 4;
    if version != 2 {
        return Err(ProxyError::V2Version(version));
    }
    let local = match ver_cmd & 0x0F {
        0x0 => true,
        0x1 => false,
        other => return Err(ProxyError::V2Command(other)),
    };
    let Some((&family, rest)) = rest.split_first() else {
        return Ok(Parsed::Incomplete);
    };
    // LOCAL: the family and addresses are ignored (the spec's "discard the protocol
    // block including the family").
    let addresses = if local {
        0
    } else {
        match family {
            0x00 => 0,
            0x11 => 12,
            0x21 => 36,
            0x12 | 0x22 => return Err(ProxyError::V2Datagram(family)),
            other => return Err(ProxyError::V2Family(other)),
        }
    };
    let Some((&len, _)) = rest.split_first_chunk::<2>() else {
        return Ok(Parsed::Incomplete);
    };
    let len = u16::from_be_bytes(len);
    if usize::from(len) > V2_MAX_BLOCK {
        return Err(ProxyError::V2TooLong(len));
    }
    if usize::from(len) < addresses {
        return Err(ProxyError::V2TooShort { family, len });
    }
    let total = V2_FIXED + usize::from(len);
    let Some(block) = buf.get(V2_FIXED..total) else {
        return Ok(Parsed::Incomplete);
    };
    let addrs = if local { None } else { v2_addrs(family, block) };
    Ok(Parsed::Header { len: total, addrs })
}

/// The source and destination in a v2 address block (TLVs after them are ignored);
/// `None` for UNSPEC. The block's length was checked against the family.
fn v2_addrs(family: u8, block: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    match family {
        0x11 => {
            let (src, rest) = block.split_first_chunk::<4>()?;
            let (dst, rest) = rest.split_first_chunk::<4>()?;
            let (sport, rest) = rest.split_first_chunk::<2>()?;
            let (dport, _) = rest.split_first_chunk::<2>()?;
            Some((
                SocketAddr::new(Ipv4Addr::from(*src).into(), u16::from_be_bytes(*sport)),
                SocketAddr::new(Ipv4Addr::from(*dst).into(), u16::from_be_bytes(*dport)),
            ))
        }
        0x21 => {
            let (src, rest) = block.split_first_chunk::<16>()?;
            let (dst, rest) = rest.split_first_chunk::<16>()?;
            let (sport, rest) = rest.split_first_chunk::<2>()?;
            let (dport, _) = rest.split_first_chunk::<2>()?;
            Some((
                SocketAddr::new(Ipv6Addr::from(*src).into(), u16::from_be_bytes(*sport)),
                SocketAddr::new(Ipv6Addr::from(*dst).into(), u16::from_be_bytes(*dport)),
            ))
        }
        _ => None,
    }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let window = buf.get(..V1_MAX).unwrap_or(buf);
    let line = window.get(V1_PREFIX.len()..).unwrap_or_default();
    match line.windows(2).position(|w| w == b"\r\n") {
        Some(end) => {
            let addrs = v1_line(line.get(..end).unwrap_or_default())?;
            Ok(Parsed::Header {
                len: V1_PREFIX.len() + end + 2,
                addrs,
            })
        }
        None if buf.len() >= V1_MAX => Err(ProxyError::V1TooLong),
        None => {
            v1_viable(line)?;
            Ok(Parsed::Incomplete)
        }
    }
}

/// The addresses of a complete v1 line (after "PROXY ", before the CRLF).
fn v1_line(line: &[u8]) -> Result<Option<(SocketAddr, SocketAddr)>, ProxyError> {
    let mut fields = line.split(|&b| b == b' ');
    let v6 = match fields.next() {
        // Whatever follows UNKNOWN up to the CRLF is ignored.
        Some(b"UNKNOWN") => return Ok(None),
        Some(b"TCP4") => false,
        Some(b"TCP6") => true,
        _ => return Err(ProxyError::V1Malformed("protocol")),
    };
    let src = v1_ip(fields.next(), v6)?;
    let dst = v1_ip(fields.next(), v6)?;
    let sport = v1_port(fields.next())?;
    let dport = v1_port(fields.next())?;
    if fields.next().is_some() {
        return Err(ProxyError::V1Malformed("trailing field"));
    }
    Ok(Some((
        SocketAddr::new(src, sport),
        SocketAddr::new(dst, dport),
    )))
}

/// An address of a v1 line: dotted decimal without leading zeros for TCP4, the
/// standard text form for TCP6.
fn v1_ip(field: Option<&[u8]>, v6: bool) -> Result<IpAddr, ProxyError> {
    let text = field
        .and_then(|f| std::str::from_utf8(f).ok())
        .ok_or(ProxyError::V1Malformed("address"))?;
    let ip = if v6 {
        text.parse::<Ipv6Addr>().map(IpAddr::from)
    } else {
        text.parse::<Ipv4Addr>().map(IpAddr::from)
    };
    ip.map_err(|_| ProxyError::V1Malformed("address"))
}

/// A port of a v1 line: decimal digits only, no leading zero, at most 65535.
fn v1_port(field: Option<&[u8]>) -> Result<u16, ProxyError> {
    let bad = ProxyError::V1Malformed("port");
    let field = field.ok_or(bad)?;
    if field.is_empty()
        || field.len() > 5
        || !field.iter().all(u8::is_ascii_digit)
        || (field.len() > 1 && field.first() == Some(&b'0'))
    {
        return Err(bad);
    }
    std::str::from_utf8(field)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(bad)
}

/// Checks that the start of a v1 line, with no CRLF yet, can still become a valid
/// line: every complete field is valid and the last one, cut short, uses only the
/// characters and length its field allows.
fn v1_viable(partial: &[u8]) -> Result<(), ProxyError> {
    // A CR at the end may be the start of the CRLF.
    let partial = partial.strip_suffix(b"\r").unwrap_or(partial);
    let mut fields = partial.split(|&b| b == b' ').peekable();
    let mut v6 = false;
    let mut index = 0;
    while let Some(field) = fields.next() {
        let last = fields.peek().is_none();
        match (index, last) {
            (0, _) if field == b"UNKNOWN" => return Ok(()),
            (0, true) => {
                if !["TCP4", "TCP6", "UNKNOWN"]
                    .iter()
                    .any(|p| p.as_bytes().starts_with(field))
                {
                    return Err(ProxyError::V1Malformed("protocol"));
                }
            }
            (0, false) => {
                v6 = match field {
                    b"TCP4" => false,
                    b"TCP6" => true,
                    _ => return Err(ProxyError::V1Malformed("protocol")),
                };
            }
            (1 | 2, true) => {
                let (max, allowed): (usize, fn(&u8) -> bool) = if v6 {
                    (45, |b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.')
                } else {
                    (15, |b| b.is_ascii_digit() || *b == b'.')
                };
                if field.len() > max || !field.iter().all(allowed) {
                    return Err(ProxyError::V1Malformed("address"));
                }
            }
            (1 | 2, false) => {
                v1_ip(Some(field), v6)?;
            }
            (3 | 4, true) => {
                if !field.is_empty() {
                    v1_port(Some(field))?;
                }
            }
            (3 | 4, false) => {
                v1_port(Some(field))?;
            }
            _ => return Err(ProxyError::V1Malformed("trailing field")),
        }
        index += 1;
    }
    Ok(())
}

/// A v1 PROXY header (TCP4 or TCP6, after `src`'s family) for `src` and `dst`.
#[cfg(test)]
pub(crate) fn v1_header(src: SocketAddr, dst: SocketAddr) -> String {
    let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
}

/// A v2 PROXY header (TCP, command PROXY) for `src` and `dst`: IPv4 when both are
/// IPv4, else IPv6 (an IPv4 address mapped). The front door sends it to web backends.
pub(crate) fn v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.push(0x21);
    let mut block = Vec::new();
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            h.push(0x11);
            block.extend_from_slice(&s.octets());
            block.extend_from_slice(&d.octets());
        }
        (s, d) => {
            h.push(0x21);
            block.extend_from_slice(&v6(s).octets());
            block.extend_from_slice(&v6(d).octets());
        }
    }
    block.extend_from_slice(&src.port().to_be_bytes());
    block.extend_from_slice(&dst.port().to_be_bytes());
    h.extend_from_slice(&(block.len() as u16).to_be_bytes());
    h.extend_from_slice(&block);
    h
}

/// `ip` as IPv6, an IPv4 address mapped.
fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]

    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn header(len: usize, src: &str, dst: &str) -> Result<Parsed, ProxyError> {
        Ok(Parsed::Header {
            len,
            addrs: Some((a(src), a(dst))),
        })
    }

    /// Every proper prefix of `h` is incomplete, `h` itself a header of its length
    /// (with or without bytes after it).
    fn check_prefixes(h: &[u8]) -> Parsed {
        for i in 0..h.len() {
            assert_eq!(
                parse(&h[..i]),
                Ok(Parsed::Incomplete),
                "prefix of {i} bytes"
            );
        }
        let whole = parse(h).unwrap();
        let Parsed::Header { len, .. } = whole else {
            panic!("not a header: {whole:?}");
        };
        assert_eq!(len, h.len());
        let mut more = h.to_vec();
        more.extend_from_slice(&[0x00, 0x01, 0x00, 0x00, b'\r', b'\n']);
        assert_eq!(parse(&more), Ok(whole));
        whole
    }

    #[test]
    fn v1_tcp4() {
        let h = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 3478\r\n";
        assert_eq!(
            check_prefixes(h),
            header(h.len(), "192.0.2.1:56324", "198.51.100.2:3478").unwrap()
        );
    }

    #[test]
    fn v1_tcp6() {
        let h = b"PROXY TCP6 2001:db8::1 2001:DB8:0:0:0:0:0:2 0 65535\r\n";
        assert_eq!(
            check_prefixes(h),
            header(h.len(), "[2001:db8::1]:0", "[2001:db8::2]:65535").unwrap()
        );
        let h =
            b"PROXY TCP6 ::ffff:192.0.2.1 ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255 1 2\r\n";
        assert!(matches!(
            check_prefixes(h),
            Parsed::Header { addrs: Some(_), .. }
        ));
    }

    #[test]
    fn v1_longest_headers() {
        let full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let h = format!("PROXY TCP6 {full} {full} 65535 65535\r\n");
        assert_eq!(h.len(), 104);
        check_prefixes(h.as_bytes());
        // The spec's worst case: 107 bytes.
        let h = format!("PROXY UNKNOWN {full} {full} 65535 65535\r\n");
        assert_eq!(h.len(), V1_MAX);
        check_prefixes(h.as_bytes());
    }

    #[test]
    fn v1_unknown() {
        for h in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
            b"PROXY UNKNOWN \x01\xFF anything\r\n",
        ] {
            assert_eq!(
                check_prefixes(h),
                Parsed::Header {
                    len: h.len(),
                    addrs: None
                }
            );
        }
    }

    #[test]
    fn v1_helper_round_trips() {
        for (s, d) in [
            ("192.0.2.1:1", "192.0.2.2:3478"),
            ("[2001:db8::1]:40000", "[::1]:5349"),
        ] {
            let h = v1_header(a(s), a(d));
            assert_eq!(parse(h.as_bytes()), header(h.len(), s, d));
        }
    }

    #[test]
    fn v1_without_crlf_in_107_bytes() {
        let mut h = b"PROXY UNKNOWN ".to_vec();
        h.resize(106, b'x');
        assert_eq!(parse(&h), Ok(Parsed::Incomplete));
        h.push(b'\r');
        // The LF would be byte 108.
        assert_eq!(parse(&h), Err(ProxyError::V1TooLong));
        h.push(b'\n');
        assert_eq!(parse(&h), Err(ProxyError::V1TooLong));
        let mut h = b"PROXY UNKNOWN ".to_vec();
        h.resize(105, b'x');
        h.extend_from_slice(b"\r\n");
        assert_eq!(
            parse(&h),
            Ok(Parsed::Header {
                len: 107,
                addrs: None
            })
        );
    }

    #[test]
    fn v1_bad_fields() {
        for (line, what) in [
            ("PROXY TCP4 192.0.2.1 192.0.2.2 +1 2\r\n", "port"),
            ("PROXY TCP4 192.0.2.1 192.0.2.2 1 65536\r\n", "port"),
            ("PROXY TCP4 192.0.2.1 192.0.2.2 1 080\r\n", "port"),
            ("PROXY TCP4 192.0.2.1 192.0.2.2 1 -1\r\n", "port"),
            ("PROXY TCP4 192.0.2.1 192.0.2.2 1 \r\n", "port"),
            ("PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n", "port"),
            ("PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3\r\n", "trailing field"),
            ("PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n", "trailing field"),
            ("PROXY TCP4 192.0.2.1  192.0.2.2 1 2\r\n", "address"),
            ("PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n", "address"),
            ("PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n", "address"),
            ("PROXY TCP4 192.0.2.256 192.0.2.2 1 2\r\n", "address"),
            ("PROXY TCP4 192.0.02.1 192.0.2.2 1 2\r\n", "address"),
            ("PROXY TCP4 192.0.2 192.0.2.2 1 2\r\n", "address"),
            ("PROXY TCP6 2001:db8::1%eth0 ::1 1 2\r\n", "address"),
            ("PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n", "protocol"),
            ("PROXY tcp4 192.0.2.1 192.0.2.2 1 2\r\n", "protocol"),
            ("PROXY UNKNOWNX\r\n", "protocol"),
            ("PROXY \r\n", "protocol"),
            ("PROXY  TCP4 192.0.2.1 192.0.2.2 1 2\r\n", "protocol"),
        ] {
            assert_eq!(
                parse(line.as_bytes()),
                Err(ProxyError::V1Malformed(what)),
                "{line:?}"
            );
        }
    }

    #[test]
    fn v1_bad_prefixes_fail_early() {
        for (partial, what) in [
            ("PROXY TCP5", "protocol"),
            ("PROXY X", "protocol"),
            ("PROXY TCP4 1.2.3.a", "address"),
            ("PROXY TCP4 1.2.3.4\n", "address"),
            ("PROXY TCP4 1.2.3.4\r ", "address"),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 +", "port"),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 01", "port"),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 123456", "port"),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 99999", "port"),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ", "trailing field"),
            ("PROXY TCP6 2001:db8::g", "address"),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rx", "port"),
        ] {
            assert_eq!(
                parse(partial.as_bytes()),
                Err(ProxyError::V1Malformed(what)),
                "{partial:?}"
            );
        }
    }

    fn v2(ver_cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[ver_cmd, family]);
        h.extend_from_slice(&(block.len() as u16).to_be_bytes());
        h.extend_from_slice(block);
        h
    }

    #[test]
    fn v2_ipv4_and_ipv6() {
        let h = v2_header(a("192.0.2.1:56324"), a("198.51.100.2:3478"));
        assert_eq!(h.len(), 28);
        assert_eq!(
            check_prefixes(&h),
            header(28, "192.0.2.1:56324", "198.51.100.2:3478").unwrap()
        );
        let h = v2_header(a("[2001:db8::1]:1"), a("[2001:db8::2]:65535"));
        assert_eq!(h.len(), 52);
        assert_eq!(
            check_prefixes(&h),
            header(52, "[2001:db8::1]:1", "[2001:db8::2]:65535").unwrap()
        );
    }

    /// Issue 25, N6: a UDP (DGRAM) header describes no connection of a stream
    /// listener; refused as soon as the family byte is there.
    #[test]
    fn v2_udp_families_are_refused_on_stream_listeners() {
        let mut h = v2_header(a("192.0.2.1:1"), a("192.0.2.2:2"));
        h[13] = 0x12;
        assert_eq!(parse(&h), Err(ProxyError::V2Datagram(0x12)));
        assert_eq!(parse(&h[..14]), Err(ProxyError::V2Datagram(0x12)));
        let mut h = v2_header(a("[::1]:1"), a("[::2]:2"));
        h[13] = 0x22;
        assert_eq!(parse(&h), Err(ProxyError::V2Datagram(0x22)));
        assert!(ProxyError::V2Datagram(0x12).is_refusal());
        assert!(!ProxyError::Missing.is_refusal());
        // LOCAL ignores the family, as the spec says.
        let mut h = v2_header(a("192.0.2.1:1"), a("192.0.2.2:2"));
        h[12] = 0x20;
        h[13] = 0x12;
        assert_eq!(
            parse(&h),
            Ok(Parsed::Header {
                len: 28,
                addrs: None
            })
        );
    }

    /// Issue 25, N6: declared sources that cannot be a client are refused.
    #[test]
    fn impossible_sources_are_refused() {
        let own = |x: &SocketAddr| *x == a("198.51.100.2:3478") || *x == a("[2001:db8::2]:3478");
        let check = |src: &str| check_source(a(src), own);
        assert_eq!(check("192.0.2.1:56324"), Ok(()));
        assert_eq!(check("[2001:db8::1]:56324"), Ok(()));
        // The server's IP on another port is a client on the same host.
        assert_eq!(check("198.51.100.2:40000"), Ok(()));
        assert_eq!(check("0.0.0.0:0"), Err(BadSource::Unspecified));
        assert_eq!(check("0.0.0.0:1234"), Err(BadSource::Unspecified));
        assert_eq!(check("0.1.2.3:1234"), Err(BadSource::Unspecified));
        assert_eq!(check("[::]:1234"), Err(BadSource::Unspecified));
        assert_eq!(check("[::ffff:0.0.0.0]:1234"), Err(BadSource::Unspecified));
        assert_eq!(check("192.0.2.1:0"), Err(BadSource::PortZero));
        assert_eq!(check("255.255.255.255:65535"), Err(BadSource::Broadcast));
        assert_eq!(check("224.0.0.1:1234"), Err(BadSource::Broadcast));
        assert_eq!(check("[ff02::1]:1234"), Err(BadSource::Broadcast));
        assert_eq!(
            check("[::ffff:255.255.255.255]:1"),
            Err(BadSource::Broadcast)
        );
        assert_eq!(check("198.51.100.2:3478"), Err(BadSource::Own));
        assert_eq!(check("[::ffff:198.51.100.2]:3478"), Err(BadSource::Own));
        assert_eq!(check("[2001:db8::2]:3478"), Err(BadSource::Own));
    }

    #[test]
    fn v2_tlvs_are_skipped() {
        let mut h = v2_header(a("192.0.2.1:1"), a("192.0.2.2:2"));
        // PP2_TYPE_ALPN "h2" and a PP2_TYPE_NOOP.
        let tlvs = [0x01, 0x00, 0x02, b'h', b'2', 0x04, 0x00, 0x03, 0, 0, 0];
        h.extend_from_slice(&tlvs);
        h[15] += tlvs.len() as u8;
        assert_eq!(
            check_prefixes(&h),
            header(28 + tlvs.len(), "192.0.2.1:1", "192.0.2.2:2").unwrap()
        );
    }

    #[test]
    fn v2_local_and_unspec() {
        // LOCAL: the addresses, and the family, are ignored.
        let mut h = v2_header(a("192.0.2.1:1"), a("192.0.2.2:2"));
        h[12] = 0x20;
        assert_eq!(
            check_prefixes(&h),
            Parsed::Header {
                len: 28,
                addrs: None
            }
        );
        for h in [
            v2(0x20, 0x00, &[]),
            v2(0x20, 0x31, &[]),
            v2(0x20, 0x21, &[1, 2, 3]),
            v2(0x21, 0x00, &[]),
            v2(0x21, 0x00, &[9; 7]),
        ] {
            assert_eq!(
                check_prefixes(&h),
                Parsed::Header {
                    len: h.len(),
                    addrs: None
                }
            );
        }
    }

    #[test]
    fn v2_errors() {
        assert_eq!(
            parse(&v2(0x11, 0x11, &[0; 12])),
            Err(ProxyError::V2Version(1))
        );
        assert_eq!(
            parse(&v2(0x31, 0x11, &[0; 12])),
            Err(ProxyError::V2Version(3))
        );
        assert_eq!(
            parse(&v2(0x22, 0x11, &[0; 12])),
            Err(ProxyError::V2Command(2))
        );
        assert_eq!(
            parse(&v2(0x2F, 0x11, &[0; 12])),
            Err(ProxyError::V2Command(0xF))
        );
        for family in [0x01, 0x10, 0x13, 0x31, 0x32, 0x41, 0xFF] {
            assert_eq!(
                parse(&v2(0x21, family, &[0; 216])),
                Err(ProxyError::V2Family(family))
            );
        }
        assert_eq!(
            parse(&v2(0x21, 0x11, &[0; 11])),
            Err(ProxyError::V2TooShort {
                family: 0x11,
                len: 11
            })
        );
        assert_eq!(
            parse(&v2(0x21, 0x21, &[0; 12])),
            Err(ProxyError::V2TooShort {
                family: 0x21,
                len: 12
            })
        );
        // The largest block is accepted; one byte more is refused from the length alone.
        let h = v2(0x21, 0x11, &[0; V2_MAX_BLOCK]);
        assert!(matches!(parse(&h), Ok(Parsed::Header { len: 2064, .. })));
        let h = v2(0x21, 0x11, &[0; V2_MAX_BLOCK + 1]);
        assert_eq!(parse(&h[..16]), Err(ProxyError::V2TooLong(2049)));
        assert_eq!(
            parse(&h[..16]).unwrap_err().to_string(),
            "PROXY v2 address block of 2049 bytes longer than 2048"
        );
        let mut h = v2(0x21, 0x11, &[]);
        h[14..16].copy_from_slice(&[0xFF, 0xFF]);
        assert_eq!(parse(&h), Err(ProxyError::V2TooLong(0xFFFF)));
    }

    #[test]
    fn v2_errors_come_as_soon_as_the_byte_is_there() {
        let h = v2(0x31, 0x11, &[0; 12]);
        assert_eq!(parse(&h[..13]), Err(ProxyError::V2Version(3)));
        let h = v2(0x21, 0x31, &[0; 216]);
        assert_eq!(parse(&h[..14]), Err(ProxyError::V2Family(0x31)));
        let h = v2(0x21, 0x21, &[0; 12]);
        assert_eq!(
            parse(&h[..16]),
            Err(ProxyError::V2TooShort {
                family: 0x21,
                len: 12
            })
        );
    }

    #[test]
    fn missing_header_is_seen_at_once() {
        for s in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"G",
            // A STUN Binding request.
            &[0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42],
            &[0x00],
            // ChannelData.
            &[0x40, 0x00, 0x00, 0x04],
            // A TLS ClientHello.
            &[0x16, 0x03, 0x01],
            b"PROXY\r\n",
            b"PROXYTCP4",
            b"proxy TCP4",
            b"\r\n\r\n\0\r\nQUIT\r",
            b"\r\n\r\n\x01",
            b"\r\r",
        ] {
            assert_eq!(parse(s), Err(ProxyError::Missing), "{s:?}");
        }
        // Prefixes of either signature are not.
        for s in [&b""[..], b"P", b"PROX", b"\r", b"\r\n\r\n\0\r\nQUI"] {
            assert_eq!(parse(s), Ok(Parsed::Incomplete), "{s:?}");
        }
    }
}
