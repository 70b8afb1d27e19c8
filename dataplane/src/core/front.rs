//! The front door's routing, sans-IO: whether a new connection on a port shared with a
//! web server is for TURN or for the web, decided from its first bytes (which the
//! caller peeks, so that they are still in the socket for whoever gets it).
//!
//! TLS (a TURN TLS listener with an HTTPS backend), first matching rule wins:
//! 1. ALPN offers `stun.turn` (RFC 7443) → TURN;
//! 2. SNI is one of the configured web host names → web;
//! 3. ALPN offers one of the web protocols (default `h2`, `http/1.1`) → web;
//! 4. anything else, in particular no ALPN at all (Chromium's and Firefox's TURNS) →
//!    TURN.
//!
//! A ClientHello that does not parse, or is larger than [`MAX_PEEK`], is
//! [`Route::Unknown`] (closed and counted by the caller).
//!
//! Plain TCP (a TURN TCP listener with an HTTP backend): an HTTP/1.x request line (an
//! upper-case method token and a space) → web; a STUN header (first two bits 0, the
//! magic cookie) or ChannelData (first byte 0x40..=0x4F, not a method token) → TURN;
//! anything else → [`Route::Unknown`].

use rustls::server::Acceptor;

/// Bytes looked at at most before a decision: a ClientHello of up to 16 KiB in
/// records (a TLS record header is 5 bytes).
pub(crate) const MAX_PEEK: usize = 16 * 1024 + 5;
/// The longest HTTP method token taken for a request line.
const MAX_METHOD: usize = 16;
/// The ALPN protocol of TURN (RFC 7443).
const ALPN_TURN: &[u8] = b"stun.turn";
/// STUN's magic cookie (RFC 8489 §5).
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// Where a connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// To the data plane's TURN workers.
    Turn,
    /// Passed through to the web backend.
    Web,
    /// Neither: closed.
    Unknown,
}

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Not enough bytes yet.
    NeedMore,
    /// Decided, with the rule that decided (for the log line).
    Route(Route, &'static str),
}

/// The TLS routing rules an operator configures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebRules {
    /// SNI names routed to the web (compared without case), unless the client offers
    /// ALPN `stun.turn`.
    pub web_hosts: Vec<String>,
    /// ALPN protocols that route to the web when `stun.turn` is not offered.
    pub web_alpn: Vec<Vec<u8>>,
}

impl Default for WebRules {
    fn default() -> Self {
        WebRules {
            web_hosts: Vec::new(),
            web_alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        }
    }
}

/// Routes a TLS connection from the bytes it sent so far (its ClientHello).
pub fn classify_tls(buf: &[u8], rules: &WebRules) -> Decision {
    let mut acc = Acceptor::default();
    let mut rd = buf;
    while !rd.is_empty() {
        if acc.read_tls(&mut rd).is_err() {
            return Decision::Route(Route::Unknown, "TLS input refused");
        }
        match acc.accept() {
            Ok(Some(accepted)) => return route_hello(&accepted.client_hello(), rules),
            Ok(None) => {}
            Err(_) => return Decision::Route(Route::Unknown, "not a TLS ClientHello"),
        }
    }
    if buf.len() >= MAX_PEEK {
        return Decision::Route(Route::Unknown, "ClientHello too large");
    }
    Decision::NeedMore
}

/// The rules applied to a parsed ClientHello.
fn route_hello(hello: &rustls::server::ClientHello<'_>, rules: &WebRules) -> Decision {
    let alpn: Vec<&[u8]> = hello.alpn().map(Iterator::collect).unwrap_or_default();
    if alpn.contains(&ALPN_TURN) {
        return Decision::Route(Route::Turn, "ALPN stun.turn");
    }
    if let Some(sni) = hello.server_name()
        && rules.web_hosts.iter().any(|h| h.eq_ignore_ascii_case(sni))
    {
        return Decision::Route(Route::Web, "SNI is a web host");
    }
    if alpn
        .iter()
        .any(|p| rules.web_alpn.iter().any(|w| w.as_slice() == *p))
    {
        return Decision::Route(Route::Web, "web ALPN");
    }
    if alpn.is_empty() {
        Decision::Route(Route::Turn, "no ALPN")
    } else {
        Decision::Route(Route::Turn, "ALPN of no web protocol")
    }
}

/// Routes a plain TCP connection from its first bytes.
pub fn classify_plain(buf: &[u8]) -> Decision {
    let Some(&first) = buf.first() else {
        return Decision::NeedMore;
    };
    if first.is_ascii_uppercase() {
        // A request line starts with its method token and a space (RFC 9112 §3).
        for &c in buf.iter().take(MAX_METHOD + 1) {
            if c == b' ' {
                return Decision::Route(Route::Web, "HTTP request line");
            }
            if !c.is_ascii_uppercase() {
                // Not a method: ChannelData whose first byte is a letter, if any.
                return if is_channel_data(first) {
                    Decision::Route(Route::Turn, "ChannelData")
                } else {
                    Decision::Route(Route::Unknown, "neither HTTP nor TURN")
                };
            }
        }
        if buf.len() > MAX_METHOD {
            return Decision::Route(Route::Unknown, "neither HTTP nor TURN");
        }
        return Decision::NeedMore;
    }
    match first {
        0x00..=0x3F => match buf.get(4..8) {
            None => Decision::NeedMore,
            Some(c) if c == MAGIC_COOKIE => Decision::Route(Route::Turn, "STUN"),
            Some(_) => Decision::Route(Route::Unknown, "neither HTTP nor TURN"),
        },
        f if is_channel_data(f) => Decision::Route(Route::Turn, "ChannelData"),
        _ => Decision::Route(Route::Unknown, "neither HTTP nor TURN"),
    }
}

/// The first byte of a ChannelData message (channel numbers 0x4000..=0x4FFF, RFC 8656
/// §12).
fn is_channel_data(first: u8) -> bool {
    (0x40..=0x4F).contains(&first)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A ClientHello as a rustls client sends it, with `sni` (None: an IP address,
    /// which sends none) and `alpn`.
    fn hello(sni: Option<&str>, alpn: &[&[u8]]) -> Vec<u8> {
        #[derive(Debug)]
        struct Any;
        impl rustls::client::danger::ServerCertVerifier for Any {
            fn verify_server_cert(
                &self,
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &[rustls::pki_types::CertificateDer<'_>],
                _: &rustls::pki_types::ServerName<'_>,
                _: &[u8],
                _: rustls::pki_types::UnixTime,
            ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            fn verify_tls12_signature(
                &self,
                _: &[u8],
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error>
            {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn verify_tls13_signature(
                &self,
                _: &[u8],
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error>
            {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
                rustls::crypto::ring::default_provider()
                    .signature_verification_algorithms
                    .supported_schemes()
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Any))
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = match sni {
            Some(s) => rustls::pki_types::ServerName::try_from(s.to_owned()).expect("name"),
            None => rustls::pki_types::ServerName::IpAddress(
                std::net::IpAddr::from([192, 0, 2, 1]).into(),
            ),
        };
        let mut c = rustls::ClientConnection::new(Arc::new(cfg), name).expect("client");
        let mut out = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut out).expect("write");
        }
        out
    }

    fn rules() -> WebRules {
        WebRules {
            web_hosts: vec!["www.example.test".into()],
            ..WebRules::default()
        }
    }

    fn route(d: Decision) -> Route {
        match d {
            Decision::Route(r, _) => r,
            Decision::NeedMore => panic!("undecided"),
        }
    }

    #[test]
    fn tls_rules_in_order() {
        let r = rules();
        // 1: stun.turn wins, even with a web host's SNI and web protocols.
        let h = hello(Some("www.example.test"), &[b"h2", b"stun.turn"]);
        assert_eq!(route(classify_tls(&h, &r)), Route::Turn);
        // 2: a web host's SNI without ALPN.
        let h = hello(Some("WWW.example.test"), &[]);
        assert_eq!(route(classify_tls(&h, &r)), Route::Web);
        // 3: a browser's ALPN, any name.
        let h = hello(Some("turn.test"), &[b"h2", b"http/1.1"]);
        assert_eq!(route(classify_tls(&h, &r)), Route::Web);
        let h = hello(Some("turn.test"), &[b"http/1.1"]);
        assert_eq!(route(classify_tls(&h, &r)), Route::Web);
        // 4: browsers' TURNS: no ALPN, with or without SNI.
        let h = hello(Some("turn.test"), &[]);
        assert_eq!(route(classify_tls(&h, &r)), Route::Turn);
        let h = hello(None, &[]);
        assert_eq!(route(classify_tls(&h, &r)), Route::Turn);
        // Another protocol: TURN, as the listener served it before.
        let h = hello(Some("turn.test"), &[b"xmpp-client"]);
        assert_eq!(route(classify_tls(&h, &r)), Route::Turn);
    }

    #[test]
    fn tls_web_alpn_is_configurable() {
        let r = WebRules {
            web_hosts: Vec::new(),
            web_alpn: vec![b"acme-tls/1".to_vec()],
        };
        let h = hello(Some("turn.test"), &[b"acme-tls/1"]);
        assert_eq!(route(classify_tls(&h, &r)), Route::Web);
        let h = hello(Some("turn.test"), &[b"h2"]);
        assert_eq!(route(classify_tls(&h, &r)), Route::Turn);
    }

    #[test]
    fn tls_partial_hello_needs_more_at_every_cut() {
        let r = rules();
        let h = hello(Some("turn.test"), &[b"h2"]);
        for cut in 0..h.len() {
            assert_eq!(classify_tls(&h[..cut], &r), Decision::NeedMore, "cut {cut}");
        }
    }

    #[test]
    fn tls_garbage_is_unknown() {
        let r = rules();
        assert_eq!(
            route(classify_tls(b"GET / HTTP/1.1\r\n\r\n", &r)),
            Route::Unknown
        );
        assert_eq!(
            route(classify_tls(&[0x16, 3, 1, 0, 4, 9, 9, 9, 9], &r)),
            Route::Unknown
        );
        // A record header announcing more than is ever read.
        let mut big = vec![0x16, 3, 1, 0xFF, 0xFF];
        big.resize(MAX_PEEK, 0);
        assert_eq!(route(classify_tls(&big, &r)), Route::Unknown);
    }

    #[test]
    fn plain_rules() {
        for req in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /x HTTP/1.0\r\n",
            b"OPTIONS * ",
        ] {
            assert_eq!(route(classify_plain(req)), Route::Web);
        }
        // A Binding request header.
        let stun = [0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4];
        assert_eq!(route(classify_plain(&stun)), Route::Turn);
        // ChannelData 0x4000 and 0x4745 ("GE" then binary).
        assert_eq!(
            route(classify_plain(&[0x40, 0x00, 0x00, 0x04])),
            Route::Turn
        );
        assert_eq!(
            route(classify_plain(&[0x47, 0x45, 0x00, 0x04])),
            Route::Turn
        );
        // Unknown.
        assert_eq!(
            route(classify_plain(&[0x16, 3, 1, 0, 0xC8, 1, 0, 0, 0xC4])),
            Route::Unknown
        );
        assert_eq!(
            route(classify_plain(b"SSH-2.0-OpenSSH\r\n")),
            Route::Unknown
        );
        let stun_bad_cookie = [0x00, 0x01, 0x00, 0x00, 1, 2, 3, 4];
        assert_eq!(route(classify_plain(&stun_bad_cookie)), Route::Unknown);
        assert_eq!(
            route(classify_plain(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")),
            Route::Unknown
        );
        // Undecided.
        assert_eq!(classify_plain(b""), Decision::NeedMore);
        assert_eq!(classify_plain(b"GE"), Decision::NeedMore);
        assert_eq!(classify_plain(&[0x00, 0x01, 0x00]), Decision::NeedMore);
    }
}
