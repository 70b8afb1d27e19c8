//! The front door (issue #23): TURN over TLS and TCP sharing their ports with a web
//! server. On loopback, against a small web backend of the test's own that reads the
//! PROXY protocol v2 header and answers HTTP (over TLS with its own certificate): the
//! routing rules, the client address the backend is given, the backend being down, and
//! slow-loris on the shared port; on both I/O backends. The same with Debian's nginx
//! and headless Chromium in a network namespace is `nginx_and_chromium_share_443_and_80`
//! (see its doc).

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::stream::TurnStream;
use common::tls::{ALPN, CertFiles, Leaf, SERVER_NAME, TestCa, client_config, turn_tls};
use common::{EchoPeer, Outcome, Proc, free_tcp_port, free_udp_port};

const USER: &str = "u";
const PASS: &str = "p";
/// A web host name routed on SNI alone (`--web-host`).
const WEB_HOST: &str = "www.test";

/// One test function per backend: `uring::name` and `mmsg::name` call `name(backend)`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $(#[test] fn $name() { super::$name("uring") })*
        }
        mod mmsg {
            $(#[test] fn $name() { super::$name("mmsg") })*
        }
    };
}

on_both_backends!(
    tls_port_routes_turn_and_web,
    tcp_port_routes_turn_and_http,
    backend_down_closes_web_cleanly_and_turn_keeps_working,
    slow_loris_on_the_shared_port_is_bounded,
);

/// What the test's web backend saw of one connection.
#[derive(Debug, Clone)]
struct Seen {
    /// The client address of the PROXY v2 header.
    client: SocketAddr,
    /// The TCP peer of the backend's connection (turnpike).
    peer: SocketAddr,
    /// The request line.
    request: String,
}

/// A web backend on loopback: PROXY v2 header, then HTTP/1.1 (over TLS with `tls`),
/// answered with "web" and recorded.
struct Web {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Web {
    fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Web {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                let (s, tls) = (Arc::clone(&s), tls.clone());
                std::thread::spawn(move || {
                    let _ = Web::serve(c, tls, &s);
                });
            }
        });
        Web { addr, seen }
    }

    fn serve(
        mut c: TcpStream,
        tls: Option<Arc<rustls::ServerConfig>>,
        seen: &Mutex<Vec<Seen>>,
    ) -> std::io::Result<()> {
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        let peer = c.peer_addr()?;
        let client = read_proxy_v2(&mut c)?;
        let mut io: Box<dyn ReadWrite> = match tls {
            Some(cfg) => {
                let conn = rustls::ServerConnection::new(cfg).map_err(std::io::Error::other)?;
                Box::new(rustls::StreamOwned::new(conn, c))
            }
            None => Box::new(c),
        };
        let mut r = BufReader::new(&mut io);
        let mut request = String::new();
        r.read_line(&mut request)?;
        loop {
            let mut l = String::new();
            if r.read_line(&mut l)? == 0 || l == "\r\n" {
                break;
            }
        }
        seen.lock().unwrap().push(Seen {
            client,
            peer,
            request: request.trim().to_owned(),
        });
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nweb")?;
        io.flush()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Reads a PROXY v2 header (TCP over IPv4) and returns its source.
fn read_proxy_v2(c: &mut TcpStream) -> std::io::Result<SocketAddr> {
    let mut h = [0u8; 16];
    c.read_exact(&mut h)?;
    assert_eq!(
        &h[..12],
        b"\r\n\r\n\0\r\nQUIT\n",
        "a PROXY v2 signature first"
    );
    assert_eq!(h[12], 0x21, "version 2, PROXY");
    assert_eq!(h[13], 0x11, "TCP over IPv4");
    let len = u16::from_be_bytes([h[14], h[15]]) as usize;
    let mut block = vec![0u8; len];
    c.read_exact(&mut block)?;
    let ip = std::net::Ipv4Addr::new(block[0], block[1], block[2], block[3]);
    let port = u16::from_be_bytes([block[8], block[9]]);
    Ok(SocketAddr::from((ip, port)))
}

fn server_config(leaf: &Leaf) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der.clone()], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// A `serve` process whose TLS and TCP listeners share their ports with `web`.
struct Server {
    proc: Proc,
    tls: SocketAddr,
    tcp: SocketAddr,
    metrics: String,
    _files: CertFiles,
    _config: Option<tempfile_path::TempFile>,
}

mod tempfile_path {
    /// A file removed on drop.
    pub struct TempFile(pub std::path::PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl Server {
    fn start(
        backend: &str,
        leaf: &Leaf,
        https: SocketAddr,
        http: SocketAddr,
        streams_toml: Option<&str>,
    ) -> Server {
        let files = CertFiles::write(&format!("front-{backend}-{}", free_udp_port()), leaf);
        let udp = format!("127.0.0.1:{}", free_udp_port());
        let metrics = format!("127.0.0.1:{}", free_tcp_port());
        let (https, http) = (https.to_string(), http.to_string());
        let mut args = vec![
            "serve",
            "--listen",
            &udp,
            "--listen-tcp",
            "127.0.0.1:0",
            "--listen-tls",
            "127.0.0.1:0",
            "--tls-cert",
            files.cert_str(),
            "--tls-key",
            files.key_str(),
            "--https-backend",
            &https,
            "--http-backend",
            &http,
            "--backend-proxy-protocol",
            "--web-host",
            WEB_HOST,
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            &metrics,
            "--workers",
            "2",
            "--no-pin",
            "--user",
            "u:p",
            "--allow-peer",
            "127.0.0.0/8",
            "--io-backend",
            backend,
        ];
        let config = streams_toml.map(|t| {
            let p = std::env::temp_dir().join(format!(
                "turnpike-front-{}-{}.toml",
                std::process::id(),
                free_udp_port()
            ));
            std::fs::write(&p, t).unwrap();
            tempfile_path::TempFile(p)
        });
        let config_s = config.as_ref().map(|c| c.0.to_str().unwrap().to_owned());
        if let Some(c) = &config_s {
            args.extend(["--config", c.as_str()]);
        }
        let mut proc = Proc::spawn(&args);
        let ready = proc.wait_for("turnpike ready:", Duration::from_secs(30));
        let field = |k: &str| common::field(&ready, k);
        assert!(field("backend").eq_ignore_ascii_case(backend), "{ready}");
        Server {
            tls: field("tls").parse().unwrap(),
            tcp: field("tcp").parse().unwrap(),
            metrics,
            proc,
            _files: files,
            _config: config,
        }
    }

    /// The sum of the samples of `name` whose labels contain `label`.
    fn metric(&self, name: &str, label: &str) -> u64 {
        let page = http_get(&self.metrics);
        page.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    fn front_event(&self, event: &str) -> u64 {
        self.metric(
            "turnpike_front_door_events_total",
            &format!("event=\"{event}\""),
        )
    }

    fn output(&mut self) -> String {
        while let Ok(l) = self.proc.lines.try_recv() {
            self.proc.seen.push(l);
        }
        self.proc.seen.join("\n")
    }
}

fn http_get(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A rustls client that accepts any certificate (for a client that sends no SNI, whose
/// certificate check by IP address would fail): the test compares the DER itself.
fn any_cert_config(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
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
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
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
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Any))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// A TLS session to `addr` named `name` (None: by IP address, no SNI).
fn tls_to(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    name: Option<&str>,
) -> std::io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let mut sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    let server_name = match name {
        Some(n) => rustls::pki_types::ServerName::try_from(n.to_owned()).unwrap(),
        None => rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
    };
    let mut conn = rustls::ClientConnection::new(cfg, server_name).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    Ok(rustls::StreamOwned::new(conn, sock))
}

/// An HTTP/1.1 GET over `io`; the whole answer.
fn get(io: &mut (impl Read + Write)) -> String {
    io.write_all(b"GET /front HTTP/1.1\r\nHost: www.test\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = io.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn allocated(o: Outcome, what: &str) {
    assert!(
        matches!(o, Outcome::Allocated(ref a) if !a.is_empty()),
        "{what}: {o:?}"
    );
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Rule by rule on the TLS port: ALPN `stun.turn` (even with a web host's SNI) and no
/// ALPN (with or without SNI) reach TURN with turnpike's certificate; a browser's ALPN
/// and a web host's SNI reach the backend, TLS untouched (the backend's certificate),
/// behind a PROXY v2 header naming the client; garbage is closed and counted.
fn tls_port_routes_turn_and_web(backend: &str) {
    let ca = TestCa::new();
    let turn_leaf = ca.issue(SERVER_NAME, 1);
    let web_leaf = ca.issue(WEB_HOST, 2);
    let web = Web::start(Some(server_config(&web_leaf)));
    let http = Web::start(None);
    let mut s = Server::start(backend, &turn_leaf, web.addr, http.addr, None);
    let addr = s.tls;

    // 1. ALPN stun.turn with the web host's SNI: TURN.
    let io = tls_to(addr, any_cert_config(&[b"h2", ALPN]), Some(WEB_HOST)).unwrap();
    assert_eq!(io.conn.alpn_protocol(), Some(ALPN));
    assert_eq!(io.conn.peer_certificates().unwrap()[0], turn_leaf.der);
    let mut t = TurnStream::over(io, USER, PASS);
    allocated(t.allocate(), "ALPN stun.turn + web SNI");

    // 4. No SNI, no ALPN (Firefox's TURNS): TURN.
    let io = tls_to(addr, any_cert_config(&[]), None).unwrap();
    assert_eq!(io.conn.peer_certificates().unwrap()[0], turn_leaf.der);
    let mut t2 = TurnStream::over(io, USER, PASS);
    allocated(t2.allocate(), "no SNI, no ALPN");

    // 4. SNI turn.test, no ALPN (Chromium's TURNS), verified against the CA: TURN.
    let mut t3 = turn_tls(addr, client_config(&ca.cert, &[], None), USER, PASS);
    allocated(t3.allocate(), "SNI turn.test, no ALPN");
    let peer = EchoPeer::start();
    assert_eq!(t3.permit(peer.addr), Outcome::Ok);

    // 3. A browser's ALPN: the web, with its own certificate, verified.
    let mut w = tls_to(
        addr,
        client_config(&ca.cert, &[], Some(b"h2")),
        Some(WEB_HOST),
    )
    .unwrap();
    assert_eq!(w.conn.peer_certificates().unwrap()[0], web_leaf.der);
    let local = w.sock.local_addr().unwrap();
    let answer = get(&mut w);
    assert!(answer.ends_with("web"), "{answer}");

    // 2. The web host's SNI without ALPN: the web.
    let mut w2 = tls_to(addr, any_cert_config(&[]), Some(WEB_HOST)).unwrap();
    assert_eq!(w2.conn.peer_certificates().unwrap()[0], web_leaf.der);
    let local2 = w2.sock.local_addr().unwrap();
    assert!(get(&mut w2).ends_with("web"));

    let seen = web.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (i, l) in [local, local2].iter().enumerate() {
        assert!(
            seen.iter().any(|x| x.client == *l),
            "connection {i}: the backend was not told its client {l}: {seen:?}"
        );
    }
    assert!(
        seen.iter()
            .all(|x| x.peer.ip().is_loopback() && x.client != x.peer)
    );
    assert!(seen.iter().all(|x| x.request == "GET /front HTTP/1.1"));

    // Not TLS on the TLS port: closed, counted.
    let mut g = TcpStream::connect(addr).unwrap();
    g.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    g.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut b = [0u8; 16];
    assert!(
        matches!(g.read(&mut b), Ok(0) | Err(_)),
        "garbage was answered"
    );

    wait_until("the counters", Duration::from_secs(5), || {
        s.front_event("web") == 2 && s.front_event("turn") == 3 && s.front_event("unknown") == 1
    });
    assert_eq!(s.front_event("accepted_tls"), 6);
    let open = s.metric("turnpike_connections", "kind=\"turn\",worker");
    assert!(open >= 3, "three TURN connections open, {open} counted");
    assert!(
        s.output()
            .contains("front door: TURN and web share this port")
    );
}

/// The plain TCP port: an HTTP/1.x request reaches the HTTP backend behind a PROXY v2
/// header; STUN reaches TURN; other first bytes are closed and counted.
fn tcp_port_routes_turn_and_http(backend: &str) {
    let ca = TestCa::new();
    let turn_leaf = ca.issue(SERVER_NAME, 1);
    let web = Web::start(Some(server_config(&ca.issue(WEB_HOST, 2))));
    let http = Web::start(None);
    let s = Server::start(backend, &turn_leaf, web.addr, http.addr, None);

    let mut c = TcpStream::connect(s.tcp).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let local = c.local_addr().unwrap();
    // Sent in two pieces: the method alone does not decide.
    c.write_all(b"GE").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let answer = get(&mut c);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("web"),
        "{answer}"
    );
    let seen = http.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].client, local);
    assert_eq!(seen[0].request, "GEGET /front HTTP/1.1");

    let mut t = TurnStream::tcp(s.tcp, USER, PASS);
    allocated(t.allocate(), "TURN over TCP on the shared port");
    let peer = EchoPeer::start();
    assert_eq!(t.permit(peer.addr), Outcome::Ok);

    let mut g = TcpStream::connect(s.tcp).unwrap();
    g.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    g.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
    let mut b = [0u8; 16];
    assert!(matches!(g.read(&mut b), Ok(0) | Err(_)));
    wait_until("the counters", Duration::from_secs(5), || {
        s.front_event("web") == 1 && s.front_event("turn") == 1 && s.front_event("unknown") == 1
    });
    assert!(web.seen().is_empty());
}

/// Backends that refuse connections: HTTP clients get a 502 and TLS clients an
/// `internal_error` alert at once (no stuck connection), counted; TURN on both ports
/// works all the same.
fn backend_down_closes_web_cleanly_and_turn_keeps_working(backend: &str) {
    let ca = TestCa::new();
    let turn_leaf = ca.issue(SERVER_NAME, 1);
    // Ports nothing listens on.
    let down: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let s = Server::start(backend, &turn_leaf, down, down, None);

    let t0 = Instant::now();
    let mut c = TcpStream::connect(s.tcp).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let answer = get(&mut c);
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer:?}");

    let cfg = client_config(&ca.cert, &[], Some(b"h2"));
    let Err(err) = tls_to(s.tls, cfg, Some(WEB_HOST)) else {
        panic!("a TLS session with a backend that is down");
    };
    let msg = err.to_string();
    assert!(
        msg.contains("InternalError") || msg.contains("internal"),
        "expected an internal_error alert: {msg}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    let mut t = turn_tls(s.tls, client_config(&ca.cert, &[], Some(ALPN)), USER, PASS);
    allocated(t.allocate(), "TURN over TLS with the backend down");
    let mut t2 = TurnStream::tcp(s.tcp, USER, PASS);
    allocated(t2.allocate(), "TURN over TCP with the backend down");
    wait_until("backend errors counted", Duration::from_secs(5), || {
        s.front_event("backend_error") == 2
    });
}

/// Slow-loris on the shared ports: connections that send a byte and no more are closed
/// after the handshake timeout, before any route; over the per-IP cap a connection is
/// closed at once; a TURN client still gets through once they are gone.
fn slow_loris_on_the_shared_port_is_bounded(backend: &str) {
    let ca = TestCa::new();
    let turn_leaf = ca.issue(SERVER_NAME, 1);
    let web = Web::start(Some(server_config(&ca.issue(WEB_HOST, 2))));
    let http = Web::start(None);
    let s = Server::start(
        backend,
        &turn_leaf,
        web.addr,
        http.addr,
        Some("[streams]\nhandshake_timeout = 1\nmax_per_ip = 4\n"),
    );
    let (tx, rx) = mpsc::channel();
    let mut slow = Vec::new();
    for (addr, first) in [(s.tcp, &b"G"[..]), (s.tls, &[0x16, 0x03][..])] {
        for _ in 0..2 {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(first).unwrap();
            slow.push(c);
        }
    }
    // Over the cap of 4 from 127.0.0.1: closed at once.
    let mut over = TcpStream::connect(s.tcp).unwrap();
    over.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut b = [0u8; 8];
    assert!(matches!(over.read(&mut b), Ok(0) | Err(_)));
    let t0 = Instant::now();
    for c in slow {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut c = c;
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut b = [0u8; 8];
            let r = c.read(&mut b);
            let _ = c.shutdown(Shutdown::Both);
            tx.send(matches!(r, Ok(0)) || r.is_err()).unwrap();
        });
    }
    for _ in 0..4 {
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "closed");
    }
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "slow-loris closed after {took:?}"
    );
    wait_until(
        "timeouts and refusals counted",
        Duration::from_secs(5),
        || s.front_event("timeout") == 4 && s.front_event("refused") >= 1,
    );
    let mut t = TurnStream::tcp(s.tcp, USER, PASS);
    allocated(t.allocate(), "TURN after the slow-loris");
}

// ---------------------------------------------------------------------------------
// nginx and Chromium in a network namespace.

/// The namespace's address (one end of a veth pair within it): turnpike's 443 and 80, and the client
/// address of everything run in the namespace.
const NS_IP: &str = "10.89.0.1";
/// nginx's loopback ports (HTTPS, HTTP), both `proxy_protocol`.
const NGINX_HTTPS: u16 = 8443;
const NGINX_HTTP: u16 = 8080;
/// Messages the page echoes over its data channel.
const MESSAGES: usize = 1000;
const PAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether the nginx test can run: `Err(what is missing)`.
fn nginx_test_usable() -> Result<(), String> {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !root {
        return Err("not root (network namespaces need it)".into());
    }
    for path in [
        "/usr/sbin/nginx",
        "/usr/bin/chromium",
        "/usr/bin/certutil",
        "/usr/bin/curl",
        "/usr/bin/openssl",
        "/usr/bin/ip",
    ] {
        if !std::path::Path::new(path).exists() {
            return Err(format!("{path} is missing (tests/scripts/setup-deps.sh)"));
        }
    }
    Ok(())
}

/// A network namespace with `lo` and a veth pair, one end holding [`NS_IP`]; removed on
/// drop (after the processes in it, which the test owns, are gone).
struct Ns {
    name: String,
}

impl Ns {
    fn new() -> Ns {
        let name = format!("tpf-{}", std::process::id());
        let _ = common::netns::run("ip", &["netns", "del", &name]);
        common::netns::run("ip", &["netns", "add", &name]).unwrap();
        let ns = Ns { name };
        for args in [
            vec!["link", "set", "lo", "up"],
            // A veth pair within the namespace (no dummy driver everywhere).
            vec!["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
            vec!["addr", "add", "10.89.0.1/24", "dev", "d0"],
            vec!["link", "set", "d1", "up"],
            vec!["link", "set", "d0", "up"],
            vec!["route", "add", "default", "dev", "d0"],
        ] {
            let mut a = vec!["-n", ns.name.as_str()];
            a.extend(args);
            common::netns::run("ip", &a).unwrap();
        }
        ns
    }

    /// A command run in the namespace.
    fn command(&self, program: &str) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `program args` in the namespace to its end (bounded by `limit`): exit
    /// code, stdout, stderr.
    fn run(&self, program: &str, args: &[&str], limit: Duration) -> (i32, String, String) {
        let mut c = self.command("timeout");
        c.arg(limit.as_secs().to_string()).arg(program).args(args);
        let o = c.output().unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = common::netns::run("ip", &["netns", "del", &self.name]);
    }
}

/// A process group the test started; SIGTERM then SIGKILL to the group on drop.
struct Group(std::process::Child);

impl Group {
    fn spawn(mut c: std::process::Command) -> Group {
        use std::os::unix::process::CommandExt;
        c.process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        Group(c.spawn().unwrap())
    }

    fn stop(&mut self) {
        use nix::sys::signal::{Signal, killpg};
        use nix::unistd::Pid;
        let pid = Pid::from_raw(self.0.id() as i32);
        let _ = killpg(pid, Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if self.0.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The page's POSTs (`/result`, `/log`), which nginx forwards here: a listener in the
/// namespace's loopback; each result arrives on the channel.
fn page_collector(ns: &Ns) -> (u16, mpsc::Receiver<String>) {
    let l = common::netns::in_ns(&ns.name, || TcpListener::bind("127.0.0.1:0").unwrap());
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len.min(1 << 20)];
            let _ = r.read_exact(&mut body);
            let _ =
                c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            if line.starts_with("POST /result") {
                let _ = tx.send(String::from_utf8_lossy(&body).into_owned());
            }
        }
    });
    (port, rx)
}

/// nginx's configuration: the server blocks of `deploy/front-door/nginx.conf` as written,
/// with this test's files (certificate, page root) and the page's POSTs forwarded to
/// the collector, in an `http` block of the test's own (logs, temporary files).
fn nginx_conf(dir: &std::path::Path, collector: u16) -> String {
    let d = dir.display();
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/front-door/nginx.conf"
    );
    let servers = std::fs::read_to_string(example)
        .unwrap()
        .replace("/etc/ssl/turn.example.com.pem", &format!("{d}/nginx.pem"))
        .replace("/etc/ssl/turn.example.com.key", &format!("{d}/nginx.key"))
        .replace(
            "root /var/www/html;",
            &format!(
                "root {d}/www; index index.html; default_type application/json;\n\
                 location = /result {{ proxy_pass http://127.0.0.1:{collector}; }}\n\
                 location = /log {{ proxy_pass http://127.0.0.1:{collector}; }}"
            ),
        );
    assert!(servers.contains(&format!(
        "listen 127.0.0.1:{NGINX_HTTPS} ssl http2 proxy_protocol;"
    )));
    assert!(servers.contains(&format!("listen 127.0.0.1:{NGINX_HTTP} proxy_protocol;")));
    format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n\
         types {{ text/html html; }}\n\
         log_format front '$proxy_protocol_addr $remote_addr $realip_remote_addr $server_port $status \"$request\" \"$http_user_agent\"';\n\
         access_log {d}/access.log front;\n\
         client_body_temp_path {d}/tmp-body; proxy_temp_path {d}/tmp-proxy;\n\
         fastcgi_temp_path {d}/tmp-fcgi; uwsgi_temp_path {d}/tmp-uwsgi; scgi_temp_path {d}/tmp-scgi;\n\
         {servers}\n}}\n"
    )
}

/// Runs the e2e page in headless Chromium in the namespace, trusting `ca_pem` through
/// an NSS database in a fresh HOME; the page's result (JSON).
fn chromium_page(
    ns: &Ns,
    dir: &std::path::Path,
    url: &str,
    results: &mpsc::Receiver<String>,
    tag: &str,
) -> serde_json::Value {
    let home = dir.join(format!("home-{tag}"));
    let db = home.join(".pki/nssdb");
    std::fs::create_dir_all(&db).unwrap();
    let db_arg = format!("sql:{}", db.display());
    let ca = dir.join("ca.pem");
    for args in [
        vec!["-N", "-d", &db_arg, "--empty-password"],
        vec![
            "-A",
            "-d",
            &db_arg,
            "-t",
            "C,,",
            "-n",
            "turnpike-test-ca",
            "-i",
            ca.to_str().unwrap(),
        ],
    ] {
        common::netns::run("certutil", &args).unwrap();
    }
    let tmp = home.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut c = ns.command("/usr/bin/chromium");
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--disable-default-apps",
        "--mute-audio",
        "--no-default-browser-check",
        "--no-pings",
        "--disable-domain-reliability",
        "--disable-breakpad",
        "--disable-client-side-phishing-detection",
        "--metrics-recording-only",
        &format!("--host-resolver-rules=MAP {SERVER_NAME} {NS_IP}, MAP * ~NOTFOUND"),
        &format!("--user-data-dir={}", home.join("profile").display()),
        url,
    ])
    .env("HOME", &home)
    .env("TMPDIR", &tmp);
    let mut chromium = Group::spawn(c);
    let got = results.recv_timeout(PAGE_TIMEOUT + Duration::from_secs(30));
    chromium.stop();
    let text = got.unwrap_or_else(|_| panic!("{tag}: no result from the page at {url}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{tag}: {e}: {text}"))
}

/// Checks a page result: every message echoed, relay<->relay selected over `relay`
/// ("tls" or "tcp").
fn check_page(r: &serde_json::Value, relay: &str, tag: &str) {
    assert_eq!(r["echoed"].as_u64(), Some(MESSAGES as u64), "{tag}: {r}");
    for pair in ["pair1", "pair2"] {
        assert_eq!(r[pair]["local"]["type"], "relay", "{tag} {pair}: {r}");
        assert_eq!(r[pair]["remote"]["type"], "relay", "{tag} {pair}: {r}");
        assert_eq!(
            r[pair]["local"]["relayProtocol"], relay,
            "{tag} {pair}: {r}"
        );
    }
}

/// Debian's nginx and headless Chromium through turnpike's 443 and 80, in a network
/// namespace: nginx, configured with the server blocks of `deploy/front-door/nginx.conf`,
/// serves a page over HTTPS and HTTP on loopback ports with `proxy_protocol`; turnpike listens on 10.89.0.1:443 (TLS) and :80 (TCP) in front of
/// them (`--https-backend`, `--http-backend`, `--backend-proxy-protocol`), with a
/// test-CA certificate for turn.test (nginx has its own, serial 2).
/// - `curl --http2` and `curl --http1.1` get nginx's page through 443 (nginx's
///   certificate: serial 2), `curl` through 80; nginx logs the client's address (the
///   PROXY header), its TCP peer being turnpike's 127.0.0.1;
/// - Chromium loads `https://turn.test/` through 443 (verified against the test CA in
///   an NSS database) and that page opens two relay-only RTCPeerConnections with
///   `turns:turn.test:443?transport=tcp`, echoing 1,000 data-channel messages; then
///   `http://turn.test/` through 80 with `turn:turn.test:80?transport=tcp`;
/// - nginx stopped: curl fails at once over both ports (an alert, a 502), and TURN over
///   443 and 80 still allocates.
#[test]
fn nginx_and_chromium_share_443_and_80() {
    if let Err(why) = nginx_test_usable() {
        if std::env::var_os("CI").is_some() {
            panic!("CI: the nginx front-door test cannot run: {why}");
        }
        eprintln!("SKIPPED: {why}");
        return;
    }
    let ns = Ns::new();
    let dir = std::env::temp_dir().join(format!("turnpike-front-nginx-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("www")).unwrap();
    let ca = TestCa::new();
    let turn_leaf = ca.issue(SERVER_NAME, 1);
    let nginx_leaf = ca.issue(SERVER_NAME, 2);
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem).unwrap();
    std::fs::write(dir.join("nginx.pem"), &nginx_leaf.cert_pem).unwrap();
    std::fs::write(dir.join("nginx.key"), &nginx_leaf.key_pem).unwrap();
    std::fs::write(dir.join("turn.pem"), &turn_leaf.cert_pem).unwrap();
    std::fs::write(dir.join("turn.key"), &turn_leaf.key_pem).unwrap();
    let page = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/chromium_page.html");
    std::fs::copy(&page, dir.join("www/index.html")).unwrap();
    let config = |url: &str| {
        let c = serde_json::json!({
            "url": url, "username": USER, "credential": PASS,
            "messages": MESSAGES, "timeoutMs": PAGE_TIMEOUT.as_millis() as u64,
        });
        std::fs::write(dir.join("www/config"), c.to_string()).unwrap();
    };

    let (collector, results) = page_collector(&ns);
    std::fs::write(dir.join("nginx.conf"), nginx_conf(&dir, collector)).unwrap();
    let mut nginx_cmd = ns.command("/usr/sbin/nginx");
    nginx_cmd.args(["-e", dir.join("error.log").to_str().unwrap()]);
    nginx_cmd.args(["-c", dir.join("nginx.conf").to_str().unwrap()]);
    let mut nginx = Group::spawn(nginx_cmd);

    let (https, http) = (
        format!("127.0.0.1:{NGINX_HTTPS}"),
        format!("127.0.0.1:{NGINX_HTTP}"),
    );
    let (cert, key) = (dir.join("turn.pem"), dir.join("turn.key"));
    let mut cmd = ns.command(common::bin().to_str().unwrap());
    cmd.args([
        "serve",
        "--listen",
        &format!("{NS_IP}:3478"),
        "--listen-tcp",
        &format!("{NS_IP}:80"),
        "--listen-tls",
        &format!("{NS_IP}:443"),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--https-backend",
        &https,
        "--http-backend",
        &http,
        "--backend-proxy-protocol",
        "--grpc-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--no-pin",
        "--user",
        "u:p",
        "--realm",
        "turn.test",
        "--allow-peer",
        "10.89.0.0/24",
    ]);
    let mut turnpike = Proc::spawn_command(cmd);
    turnpike.wait_for("turnpike ready:", Duration::from_secs(30));
    // nginx is up once its HTTP port answers (through turnpike's 80).
    let curl_http = |extra: &[&str]| {
        let mut a = vec![
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
        ];
        a.extend_from_slice(extra);
        ns.run("curl", &a, Duration::from_secs(15))
    };
    let ca_s = dir.join("ca.pem").to_str().unwrap().to_owned();
    let resolve = format!("{SERVER_NAME}:443:{NS_IP}");
    wait_until(
        "nginx answers through port 80",
        Duration::from_secs(15),
        || curl_http(&["http://10.89.0.1/"]).1 == "200 1.1",
    );

    // curl through 443: HTTP/2 and HTTP/1.1, nginx's certificate verified.
    for (flag, version) in [("--http2", "200 2"), ("--http1.1", "200 1.1")] {
        let (rc, out, err) = curl_http(&[
            flag,
            "--cacert",
            &ca_s,
            "--resolve",
            &resolve,
            "https://turn.test/",
        ]);
        assert_eq!((rc, out.as_str()), (0, version), "curl {flag}: {err}");
    }
    let (_, serial, _) = ns.run(
        "sh",
        &[
            "-c",
            &format!(
                "openssl s_client -connect {NS_IP}:443 -servername turn.test -alpn h2 </dev/null 2>/dev/null | openssl x509 -noout -serial"
            ),
        ],
        Duration::from_secs(15),
    );
    assert_eq!(
        serial.trim(),
        "serial=02",
        "nginx's certificate through 443"
    );
    let (_, serial, _) = ns.run(
        "sh",
        &[
            "-c",
            &format!(
                "openssl s_client -connect {NS_IP}:443 -servername turn.test </dev/null 2>/dev/null | openssl x509 -noout -serial"
            ),
        ],
        Duration::from_secs(15),
    );
    assert_eq!(
        serial.trim(),
        "serial=01",
        "turnpike's certificate without ALPN"
    );

    // Chromium: the page from nginx over HTTPS, TURNS through the same port.
    config("turns:turn.test:443?transport=tcp");
    let r = chromium_page(&ns, &dir, "https://turn.test/", &results, "https");
    check_page(&r, "tls", "https + turns:443");
    // And over HTTP with TURN over TCP on 80.
    config("turn:turn.test:80?transport=tcp");
    let r = chromium_page(&ns, &dir, "http://turn.test/", &results, "http");
    check_page(&r, "tcp", "http + turn:80");

    // nginx's log: the client address (the PROXY header's, and $remote_addr through
    // real_ip_header) is the namespace's, Chromium's; the TCP peer is turnpike's loopback
    // connection.
    let log = std::fs::read_to_string(dir.join("access.log")).unwrap();
    let chromium_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("HeadlessChrome") && l.contains("\"GET / "))
        .collect();
    assert_eq!(chromium_lines.len(), 2, "{log}");
    for l in &chromium_lines {
        assert!(l.starts_with(&format!("{NS_IP} {NS_IP} 127.0.0.1 ")), "{l}");
    }
    assert!(
        chromium_lines
            .iter()
            .any(|l| l.contains(&format!(" {NGINX_HTTPS} 200 \"GET / HTTP/2.0\"")))
            && chromium_lines
                .iter()
                .any(|l| l.contains(&format!(" {NGINX_HTTP} 200 \"GET / HTTP/1.1\""))),
        "{log}"
    );

    // nginx stopped: a clean, immediate failure for web clients; TURN goes on.
    nginx.stop();
    let t0 = Instant::now();
    let (rc, _, err) = curl_http(&[
        "--cacert",
        &ca_s,
        "--resolve",
        &resolve,
        "https://turn.test/",
    ]);
    assert_eq!(rc, 35, "curl over TLS with nginx down: {err}");
    assert!(err.contains("internal error"), "{err}");
    let (_, out, _) = curl_http(&["http://10.89.0.1/"]);
    assert_eq!(out, "502 1.1");
    assert!(t0.elapsed() < Duration::from_secs(5));
    let tls_cfg = client_config(&ca.cert, &[], None);
    common::netns::in_ns(&ns.name, || {
        let mut t = turn_tls(format!("{NS_IP}:443").parse().unwrap(), tls_cfg, USER, PASS);
        allocated(t.allocate(), "TURNS on 443 with nginx down");
        let mut t = TurnStream::tcp(format!("{NS_IP}:80").parse().unwrap(), USER, PASS);
        allocated(t.allocate(), "TURN on 80 with nginx down");
    });
    turnpike.kill();
    drop(nginx);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `deploy/front-door/turnpike.toml` as written, with this machine's addresses, ports and
/// files put in for the example's: it starts, HTTPS and HTTP reach the web backend (the
/// PROXY header naming the client), TURN over TLS and TCP allocates.
#[test]
fn deploy_example_works_as_written() {
    let ca = TestCa::new();
    let turn_leaf = ca.issue(SERVER_NAME, 1);
    let files = CertFiles::write(&format!("front-deploy-{}", free_udp_port()), &turn_leaf);
    let web = Web::start(Some(server_config(&ca.issue(WEB_HOST, 2))));
    let http = Web::start(None);
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/front-door/turnpike.toml"
    );
    let text = std::fs::read_to_string(example).unwrap();
    let udp = format!("127.0.0.1:{}", free_udp_port());
    let mut edited = text.clone();
    for (from, to) in [
        ("203.0.113.10:3478", udp.as_str()),
        ("203.0.113.10:80", "127.0.0.1:0"),
        ("203.0.113.10:443", "127.0.0.1:0"),
        ("\"203.0.113.10\"", "\"127.0.0.1\""),
        ("/etc/turnpike/tls/turn.example.com.pem", files.cert_str()),
        ("/etc/turnpike/tls/turn.example.com.key", files.key_str()),
        ("127.0.0.1:8443", &web.addr.to_string()),
        ("127.0.0.1:8080", &http.addr.to_string()),
    ] {
        assert!(edited.contains(from), "the example no longer has {from}");
        edited = edited.replace(from, to);
    }
    let path = std::env::temp_dir().join(format!(
        "turnpike-front-deploy-{}-{}.toml",
        std::process::id(),
        free_udp_port()
    ));
    std::fs::write(&path, edited).unwrap();
    let _cleanup = tempfile_path::TempFile(path.clone());
    let mut proc = Proc::spawn(&[
        "serve",
        "--config",
        path.to_str().unwrap(),
        "--grpc-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--user",
        "u:p",
        "--no-pin",
    ]);
    let ready = proc.wait_for("turnpike ready:", Duration::from_secs(30));
    let tls: SocketAddr = common::field(&ready, "tls").parse().unwrap();
    let tcp: SocketAddr = common::field(&ready, "tcp").parse().unwrap();

    let mut w = tls_to(
        tls,
        client_config(&ca.cert, &[], Some(b"h2")),
        Some(WEB_HOST),
    )
    .unwrap();
    let local = w.sock.local_addr().unwrap();
    assert!(get(&mut w).ends_with("web"));
    assert_eq!(web.seen()[0].client, local);
    let mut c = TcpStream::connect(tcp).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let local = c.local_addr().unwrap();
    assert!(get(&mut c).ends_with("web"));
    assert_eq!(http.seen()[0].client, local);

    let mut t = turn_tls(tls, client_config(&ca.cert, &[], None), USER, PASS);
    allocated(t.allocate(), "TURNS through the example's 443");
    let mut t = TurnStream::tcp(tcp, USER, PASS);
    allocated(t.allocate(), "TURN over TCP through the example's 80");
}

/// Front-door settings that cannot work stop the start with exit code 64, naming the
/// option and why (the config is validated before anything binds).
#[test]
fn bad_front_door_configuration_exits_64_naming_the_option() {
    let tcp = format!("127.0.0.1:{}", free_tcp_port());
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec!["--https-backend", "127.0.0.1:8443"],
            "front_door.https_backend",
            "needs a TURN TLS listener",
        ),
        (
            vec!["--http-backend", "127.0.0.1:8080", "--no-tcp"],
            "front_door.http_backend",
            "needs a TURN TCP listener",
        ),
        (
            vec!["--http-backend", "nginx:80"],
            "front_door.http_backend",
            "not an IP:PORT",
        ),
        (
            vec!["--http-backend", "0.0.0.0:80"],
            "front_door.http_backend",
            "needs an IP address and a port",
        ),
        (
            vec!["--listen-tcp", &tcp, "--http-backend", &tcp],
            "front_door.http_backend",
            "turnpike's own listener",
        ),
        (
            vec![
                "--listen-tcp",
                &tcp,
                "--proxy-protocol",
                &tcp,
                "--http-backend",
                "127.0.0.1:8080",
            ],
            "front_door.http_backend",
            "PROXY header",
        ),
        (
            vec!["--web-host", "www.test"],
            "front_door",
            "need https_backend",
        ),
        (
            vec!["--http-backend", "127.0.0.1:8080", "--web-host", "bad name"],
            "front_door.web_hosts",
            "not a DNS name",
        ),
    ];
    for (extra, option, why) in cases {
        let mut args = vec!["serve", "--admin-listen", "127.0.0.1:0"];
        args.extend(&extra);
        let out = std::process::Command::new(common::bin())
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{extra:?}: {err}");
        assert!(
            err.contains(option) && err.contains(why),
            "{extra:?}: {err}"
        );
    }
    let path =
        std::env::temp_dir().join(format!("turnpike-front-alpn-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "[front_door]\nhttp_backend = \"127.0.0.1:8080\"\nweb_alpn = [\"stun.turn\"]\n",
    )
    .unwrap();
    let _cleanup = tempfile_path::TempFile(path.clone());
    let out = std::process::Command::new(common::bin())
        .args([
            "serve",
            "--admin-listen",
            "127.0.0.1:0",
            "--config",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("front_door.web_alpn"), "{err}");
}
