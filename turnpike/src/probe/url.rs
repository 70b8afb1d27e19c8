//! TURN URLs (RFC 7065): `turn:host[:port][?transport=udp|tcp]` and
//! `turns:host[:port][?transport=tcp]`.

use std::fmt;
use std::str::FromStr;

/// The default port of `turn:` (RFC 8656 §17).
pub const TURN_PORT: u16 = 3478;
/// The default port of `turns:`.
pub const TURNS_PORT: u16 = 5349;

/// How the probe reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// TURN over UDP.
    Udp,
    /// TURN over TCP.
    Tcp,
    /// TURN over TLS over TCP.
    Tls,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        })
    }
}

/// A parsed `turn:` or `turns:` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnUrl {
    /// The host: a DNS name or an IP literal (without brackets).
    pub host: String,
    /// The port (the scheme's default when the URL has none).
    pub port: u16,
    /// The transport: `turns:` is TLS; `turn:` is UDP unless `?transport=tcp`.
    pub transport: Transport,
}

/// Why a URL is not a TURN URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// The scheme is neither `turn:` nor `turns:`.
    #[error("{0:?}: not a turn: or turns: URL")]
    Scheme(String),
    /// No host.
    #[error("{0:?}: no host")]
    NoHost(String),
    /// The port is not a number from 1 to 65535.
    #[error("{0:?}: bad port")]
    Port(String),
    /// An unbracketed IPv6 literal, or an unterminated bracket.
    #[error("{0:?}: an IPv6 address is written in brackets, e.g. turn:[2001:db8::1]:3478")]
    Ipv6(String),
    /// A transport other than udp/tcp (or udp with `turns:`, which would be DTLS).
    #[error("{0:?}: transport must be udp or tcp (turns: only tcp; DTLS is not supported)")]
    Transport(String),
    /// A query parameter other than `transport`.
    #[error("{0:?}: unknown parameter (only ?transport=udp|tcp)")]
    Query(String),
}

impl FromStr for TurnUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<TurnUrl, UrlError> {
        let err = |f: fn(String) -> UrlError| f(s.to_owned());
        let (secure, rest) = if let Some(r) = strip_prefix_ci(s, "turns:") {
            (true, r)
        } else if let Some(r) = strip_prefix_ci(s, "turn:") {
            (false, r)
        } else {
            return Err(err(UrlError::Scheme));
        };
        // RFC 7065 has no authority slashes; people write them anyway.
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let (hostport, query) = match rest.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (rest, None),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| err(UrlError::Ipv6))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| err(UrlError::Port))?),
            };
            (host, port)
        } else {
            match hostport.split_once(':') {
                Some((_, p)) if p.contains(':') => return Err(err(UrlError::Ipv6)),
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(err(UrlError::NoHost));
        }
        let port = match port {
            None => {
                if secure {
                    TURNS_PORT
                } else {
                    TURN_PORT
                }
            }
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(err(UrlError::Port)),
            },
        };
        let mut transport = if secure {
            Transport::Tls
        } else {
            Transport::Udp
        };
        if let Some(q) = query {
            for kv in q.split('&').filter(|kv| !kv.is_empty()) {
                let Some(v) = strip_prefix_ci(kv, "transport=") else {
                    return Err(err(UrlError::Query));
                };
                transport = match (secure, v.to_ascii_lowercase().as_str()) {
                    (false, "udp") => Transport::Udp,
                    (false, "tcp") => Transport::Tcp,
                    (true, "tcp") => Transport::Tls,
                    _ => return Err(err(UrlError::Transport)),
                };
            }
        }
        Ok(TurnUrl {
            host: host.to_owned(),
            port,
            transport,
        })
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| s.get(prefix.len()..))
        .flatten()
}

impl fmt::Display for TurnUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.transport {
            Transport::Tls => write!(f, "turns:{host}:{}?transport=tcp", self.port),
            t => write!(f, "turn:{host}:{}?transport={t}", self.port),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn url(s: &str) -> TurnUrl {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_follow_the_scheme() {
        assert_eq!(
            url("turn:example.com"),
            TurnUrl {
                host: "example.com".into(),
                port: 3478,
                transport: Transport::Udp
            }
        );
        let u = url("turns:example.com");
        assert_eq!((u.port, u.transport), (5349, Transport::Tls));
    }

    #[test]
    fn ports_transports_and_ipv6() {
        let u = url("turn:10.0.0.1:3479?transport=tcp");
        assert_eq!(
            (u.host.as_str(), u.port, u.transport),
            ("10.0.0.1", 3479, Transport::Tcp)
        );
        let u = url("TURNS:[2001:db8::1]:443?transport=TCP");
        assert_eq!(
            (u.host.as_str(), u.port, u.transport),
            ("2001:db8::1", 443, Transport::Tls)
        );
        assert_eq!(url("turn:[::1]").port, 3478);
        assert_eq!(url("turn://h:1").host, "h");
        assert_eq!(
            url("turn:[::1]:9?transport=udp").to_string(),
            "turn:[::1]:9?transport=udp"
        );
        assert_eq!(url("turns:h").to_string(), "turns:h:5349?transport=tcp");
    }

    #[test]
    fn rejects_what_is_not_a_turn_url() {
        for (s, e) in [
            ("stun:h", UrlError::Scheme("stun:h".into())),
            ("turn:", UrlError::NoHost("turn:".into())),
            ("turn:h:0", UrlError::Port("turn:h:0".into())),
            ("turn:h:x", UrlError::Port("turn:h:x".into())),
            ("turn:::1", UrlError::Ipv6("turn:::1".into())),
            ("turn:[::1", UrlError::Ipv6("turn:[::1".into())),
            (
                "turns:h?transport=udp",
                UrlError::Transport("turns:h?transport=udp".into()),
            ),
            ("turn:h?foo=1", UrlError::Query("turn:h?foo=1".into())),
        ] {
            assert_eq!(s.parse::<TurnUrl>(), Err(e), "{s}");
        }
    }
}
