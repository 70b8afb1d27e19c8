//! TURN over TCP and TLS against the real binary (RFC 8656 §3.1 and §12.5, RFC 8489 §6.2,
//! RFC 7443): relaying both ways with padded ChannelData, framing edge cases, the
//! allocation's life bound to its connection, slow and idle clients, the PROXY protocol
//! and certificate reload. Every test runs on both I/O backends (`uring::*`, `mmsg::*`).

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::stream::{
    Ended, Relayed, TurnStream, binding_request, channel_data_padded, odd_payload, padded,
    tcp_connect,
};
use common::tls::{
    ALPN, CertFiles, SERVER_NAME, TestCa, client_config, connect as tls_connect, turn_tls,
};
use common::{EchoPeer, Outcome, Proc, TOKEN, free_tcp_port, free_udp_port};
use turnpike_api::v1::{self, admin_client::AdminClient};
use turnpike_proto::client::{AllocateOptions, Client};

const USER: &str = "u";
const PASS: &str = "p";
const CHANNEL: u16 = 0x4000;
const SHORT: Duration = Duration::from_secs(2);

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
    tcp_relays_channel_data_and_indications,
    tls_relays_and_negotiates_alpn_and_versions,
    tcp_binding_reports_the_tcp_source_address,
    framing_survives_one_byte_writes,
    framing_relays_fifty_messages_from_one_write,
    framing_skips_an_oversize_message_and_goes_on,
    framing_garbage_first_byte_closes_the_connection,
    legacy_channel_numbers_are_framed,
    closing_the_connection_deletes_the_allocation,
    half_closed_connection_gets_its_binding_answer,
    half_closed_connection_gets_its_allocate_answer,
    half_closed_tls_connection_gets_its_answers,
    slow_reader_loses_messages_not_memory,
    idle_connections_without_allocation_are_closed,
    late_handshakes_and_proxy_headers_are_closed,
    proxy_protocol_v2_and_v1_set_the_client_address,
    proxy_protocol_refuses_sources_that_cannot_be_a_client,
    tls_certificate_reload_on_sighup,
    connections_per_ip_are_capped,
);

/// A `serve` process with TCP (and optionally TLS) listeners.
struct Server {
    proc: Proc,
    udp: SocketAddr,
    tcp: Vec<SocketAddr>,
    tls: Vec<SocketAddr>,
    admin: String,
    metrics: String,
}

fn addrs(list: &str) -> Vec<SocketAddr> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect()
}

impl Server {
    fn start(backend: &str, extra: &[&str]) -> Server {
        let udp = format!("127.0.0.1:{}", free_udp_port());
        let admin = format!("127.0.0.1:{}", free_tcp_port());
        let metrics = format!("127.0.0.1:{}", free_tcp_port());
        let mut args = vec![
            "serve",
            "--listen",
            &udp,
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            &admin,
            "--admin-token",
            TOKEN,
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
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn(&args);
        let ready = proc.wait_for("turnpike ready:", Duration::from_secs(30));
        let field = |k: &str| common::field(&ready, k);
        assert!(
            field("backend").eq_ignore_ascii_case(backend),
            "asked for {backend}, runs {ready}"
        );
        Server {
            udp: udp.parse().unwrap(),
            tcp: addrs(&field("tcp")),
            tls: addrs(&field("tls")),
            proc,
            admin,
            metrics,
        }
    }

    fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// The server's output so far, for failure messages.
    fn output(&mut self) -> String {
        while let Ok(l) = self.proc.lines.try_recv() {
            self.proc.seen.push(l);
        }
        self.proc.seen.join("\n")
    }

    fn alive(&mut self) -> bool {
        self.proc.child.try_wait().unwrap().is_none()
    }

    /// The allocations the Admin API lists.
    fn allocations(&self) -> Vec<v1::AllocationInfo> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", self.admin))
                .unwrap()
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .unwrap();
            let mut admin = AdminClient::with_interceptor(ch, common::add_token);
            admin
                .list_allocations(v1::ListAllocationsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .allocations
        })
    }

    /// The listed allocation whose client is `client`, with its transport.
    fn allocation_of(&self, client: SocketAddr) -> Option<(u64, v1::Transport)> {
        self.allocations().into_iter().find_map(|a| {
            let alloc = a.state?.allocation?;
            let ft = alloc.five_tuple?;
            let c = SocketAddr::try_from(ft.client.as_ref()?).ok()?;
            (c == client).then(|| (alloc.allocation_id, ft.transport()))
        })
    }

    fn metrics(&self) -> Metrics {
        Metrics(http_get(&self.metrics))
    }
}

fn http_get(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A Prometheus text page.
struct Metrics(String);

impl Metrics {
    /// The sum over the samples of `name` whose labels contain `label` (e.g.
    /// `direction="to_client"`; "" for all).
    fn sum(&self, name: &str, label: &str) -> u64 {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                let metric = l.split(['{', ' ']).next().unwrap_or_default();
                metric == name && l.contains(label)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// A connection event counter (`accepted_tcp`, `oversize`, `send_dropped`...),
    /// summed over workers.
    fn connection_events(&self, event: &str) -> u64 {
        assert!(
            self.0.contains(&format!("event=\"{event}\"")),
            "no connection event {event:?} exported:\n{}",
            self.0
        );
        self.sum(
            "turnpike_connection_events_total",
            &format!("event=\"{event}\""),
        )
    }
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Sends `n` short payloads on `channel` one after another; each must come back intact.
fn echo<S: Read + Write>(t: &mut TurnStream<S>, channel: u16, n: usize, tag: &str) {
    for i in 0..n {
        let payload = format!("{tag} ping {i}");
        t.send_channel(channel, payload.as_bytes()).unwrap();
        let got = t.recv_relayed(SHORT);
        assert_eq!(
            got.as_ref().ok().and_then(Option::as_ref),
            Some(&Relayed::Channel {
                channel,
                data: payload.clone().into_bytes()
            }),
            "{tag}: echo {i}: {got:?}"
        );
    }
}

/// Allocates, binds CHANNEL to `peer` and echoes a few messages.
fn quick_relay<S: Read + Write>(t: &mut TurnStream<S>, peer: &EchoPeer, tag: &str) {
    assert!(
        matches!(t.allocate(), Outcome::Allocated(_)),
        "{tag}: Allocate"
    );
    assert_eq!(
        t.bind(CHANNEL, peer.addr),
        Outcome::Ok,
        "{tag}: ChannelBind"
    );
    echo(t, CHANNEL, 5, tag);
}

/// The relay checks of a stream client at `local`: 401 then Allocate, CreatePermission,
/// ChannelBind, 200 ChannelData messages of odd sizes echoed through `peer` with padded
/// framing both ways, a Send indication to `peer2` coming back as a Data indication, and
/// one to the channel's peer coming back on the channel.
fn relay_checks<S: Read + Write>(
    t: &mut TurnStream<S>,
    local: SocketAddr,
    peer: &EchoPeer,
    peer2: &EchoPeer,
) {
    let relayed = t.allocate_after_challenge().unwrap();
    assert_eq!(relayed.len(), 1, "{relayed:?}");
    assert_eq!(relayed[0].ip().to_string(), "127.0.0.1");
    assert_eq!(
        t.mapped,
        Some(local),
        "XOR-MAPPED-ADDRESS is the connection's source"
    );
    assert_eq!(t.permit(peer2.addr), Outcome::Ok, "CreatePermission");
    assert_eq!(t.bind(CHANNEL, peer.addr), Outcome::Ok, "ChannelBind");

    let (frames0, pad0) = (t.channel_frames, t.padding_bytes);
    let mut want_padding = 0;
    for i in 0..200 {
        let payload = odd_payload(i);
        want_padding += padded(4 + payload.len()) - (4 + payload.len());
        t.send_channel(CHANNEL, &payload).unwrap();
        let got = t.recv_relayed(SHORT);
        match got {
            Ok(Some(Relayed::Channel { channel, data })) => {
                assert_eq!(channel, CHANNEL, "message {i}");
                assert_eq!(
                    data,
                    payload,
                    "message {i} ({} bytes) came back altered",
                    payload.len()
                );
            }
            other => panic!(
                "message {i} ({} bytes): {other:?} instead of its echo",
                payload.len()
            ),
        }
    }
    assert_eq!(t.channel_frames - frames0, 200);
    assert_eq!(
        t.padding_bytes - pad0,
        want_padding,
        "ChannelData from the server is padded to a multiple of 4"
    );

    // A Send indication to a peer without a channel comes back as a Data indication.
    t.send_indication(peer2.addr, b"by Send indication")
        .unwrap();
    assert_eq!(
        t.recv_relayed(SHORT).unwrap(),
        Some(Relayed::Data {
            peer: peer2.addr,
            data: b"by Send indication".to_vec()
        })
    );
    // To the channel's peer, the answer comes on the channel.
    t.send_indication(peer.addr, b"odd-sized via Send").unwrap();
    assert_eq!(
        t.recv_relayed(SHORT).unwrap(),
        Some(Relayed::Channel {
            channel: CHANNEL,
            data: b"odd-sized via Send".to_vec()
        })
    );
}

// Relaying over TCP.

fn tcp_relays_channel_data_and_indications(backend: &str) {
    let s = Server::start(backend, &[]);
    assert_eq!(
        s.tcp,
        vec![s.udp],
        "TCP listens on the UDP address by default"
    );
    let (peer, peer2) = (EchoPeer::start(), EchoPeer::start());
    let mut t = TurnStream::tcp(s.tcp[0], USER, PASS);
    let local = t.local_addr();
    relay_checks(&mut t, local, &peer, &peer2);
    assert_eq!(
        s.allocation_of(local).map(|a| a.1),
        Some(v1::Transport::Tcp),
        "the Admin API lists the allocation as TCP"
    );
    let m = s.metrics();
    assert!(m.connection_events("accepted_tcp") >= 1);
    assert_eq!(
        m.sum("turnpike_connections", "transport=\"tcp\""),
        1,
        "open TCP connections"
    );
    assert!(m.sum("turnpike_relayed_packets_total", "to_client") >= 202);
}

// Relaying over TLS; ALPN, versions, certificate names.

fn tls_relays_and_negotiates_alpn_and_versions(backend: &str) {
    let ca = TestCa::new();
    let leaf = ca.issue(SERVER_NAME, 1);
    let files = CertFiles::write(&format!("relay-{backend}"), &leaf);
    let tls_addr = format!("127.0.0.1:{}", free_tcp_port());
    let mut s = Server::start(
        backend,
        &[
            "--tls-cert",
            files.cert_str(),
            "--tls-key",
            files.key_str(),
            "--listen-tls",
            &tls_addr,
        ],
    );
    assert_eq!(s.tls, vec![tls_addr.parse().unwrap()]);
    let addr = s.tls[0];
    let (peer, peer2) = (EchoPeer::start(), EchoPeer::start());

    // ALPN offered: "stun.turn" negotiated; the full relay checks.
    let mut t = turn_tls(addr, client_config(&ca.cert, &[], Some(ALPN)), USER, PASS);
    assert_eq!(t.io.conn.alpn_protocol(), Some(ALPN));
    assert_eq!(
        t.io.conn.peer_certificates().map(|c| c[0].clone()),
        Some(leaf.der.clone())
    );
    let local = t.io.sock.local_addr().unwrap();
    relay_checks(&mut t, local, &peer, &peer2);
    assert_eq!(
        s.allocation_of(local).map(|a| a.1),
        Some(v1::Transport::Tls),
        "the Admin API lists the allocation as TLS"
    );

    // No ALPN: served all the same.
    let mut t = turn_tls(addr, client_config(&ca.cert, &[], None), USER, PASS);
    assert_eq!(t.io.conn.alpn_protocol(), None);
    quick_relay(&mut t, &peer, "no ALPN");

    // Other protocols only (plain rustls would refuse with no_application_protocol):
    // served, without ALPN.
    let mut t = turn_tls(addr, client_config(&ca.cert, &[], Some(b"h2")), USER, PASS);
    assert_eq!(t.io.conn.alpn_protocol(), None);
    quick_relay(&mut t, &peer, "ALPN h2 only");

    // TLS 1.2 only, TLS 1.3 only.
    for (version, want) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let cfg = client_config(&ca.cert, &[version], Some(ALPN));
        let mut t = turn_tls(addr, cfg, USER, PASS);
        assert_eq!(t.io.conn.protocol_version(), Some(want));
        assert_eq!(t.io.conn.alpn_protocol(), Some(ALPN), "{want:?}");
        quick_relay(&mut t, &peer, &format!("{want:?}"));
    }

    // A client expecting another name refuses the certificate.
    let err = tls_connect(addr, client_config(&ca.cert, &[], Some(ALPN)), "other.test")
        .expect_err("a certificate for turn.test was accepted as other.test");
    assert!(
        format!("{err:?}").contains("NotValidForName"),
        "unexpected error: {err:?}"
    );
    // A client that does not trust the server's CA refuses it too.
    let stranger = TestCa::new();
    assert!(
        tls_connect(addr, client_config(&stranger.cert, &[], None), SERVER_NAME).is_err(),
        "a certificate from an unknown CA was accepted"
    );
    // And the server goes on serving.
    let mut t = turn_tls(addr, client_config(&ca.cert, &[], Some(ALPN)), USER, PASS);
    quick_relay(&mut t, &peer, "after failed handshakes");
    let m = s.metrics();
    assert!(m.connection_events("accepted_tls") >= 7);
    assert!(m.connection_events("tls_handshakes") >= 5);
    assert!(
        m.connection_events("tls_failures") >= 2,
        "two handshakes failed on the client's side"
    );
    assert!(s.alive(), "{}", s.output());
}

// Binding over TCP.

fn tcp_binding_reports_the_tcp_source_address(backend: &str) {
    let s = Server::start(backend, &[]);
    let mut t = TurnStream::tcp(s.tcp[0], USER, PASS);
    let local = t.local_addr();
    assert_eq!(t.binding(), Ok(local));
    // Twice on one connection, and on a second connection.
    assert_eq!(t.binding(), Ok(local));
    let mut t2 = TurnStream::tcp(s.tcp[0], USER, PASS);
    let local2 = t2.local_addr();
    assert_eq!(t2.binding(), Ok(local2));
}

fn connections_per_ip_are_capped(backend: &str) {
    let dir = std::env::temp_dir().join(format!("turnpike-cap-{backend}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("streams.toml");
    std::fs::write(&cfg, "[streams]\nmax_per_ip = 3\n").unwrap();
    let s = Server::start(backend, &["--config", cfg.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    let before = s.metrics().connection_events("refused");
    let mut open: Vec<_> = (0..3)
        .map(|_| {
            let mut t = TurnStream::tcp(s.tcp[0], USER, PASS);
            let local = t.local_addr();
            assert_eq!(t.binding(), Ok(local));
            t
        })
        .collect();
    // The fourth from the same IP is closed at once, unanswered.
    let mut fourth = TurnStream::tcp(s.tcp[0], USER, PASS);
    let _ = fourth.send_raw(&binding_request([4; 12]));
    assert!(
        matches!(fourth.wait_closed(SHORT), Ended::Closed(_)),
        "a fourth connection from one IP was served"
    );
    assert_eq!(s.metrics().connection_events("refused"), before + 1);
    // The three keep working; when one goes, a new one is served.
    for t in &mut open {
        let local = t.local_addr();
        assert_eq!(t.binding(), Ok(local));
    }
    drop(open.pop());
    let started = Instant::now();
    loop {
        let mut t = TurnStream::tcp(s.tcp[0], USER, PASS);
        let local = t.local_addr();
        if t.binding() == Ok(local) {
            break;
        }
        assert!(
            started.elapsed() < SHORT,
            "no room after a connection closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// Framing.

/// Writes `bytes` one at a time, each in its own segment as far as the sender can make
/// it (TCP_NODELAY, a pause after each).
fn write_bytewise<S: Read + Write>(t: &mut TurnStream<S>, bytes: &[u8]) {
    for b in bytes {
        t.send_raw(std::slice::from_ref(b)).unwrap();
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn framing_survives_one_byte_writes(backend: &str) {
    let s = Server::start(backend, &[]);
    let peer = EchoPeer::start();
    let mut t = TurnStream::tcp(s.tcp[0], USER, PASS);
    // The unauthenticated Allocate, then the authenticated one, each byte by byte.
    let req = t.allocate_request();
    write_bytewise(&mut t, &req);
    let challenge = t.next_frame(SHORT).unwrap().expect("no 401");
    let mut retry = Vec::new();
    assert_eq!(
        t.client.handle(0, &challenge.bytes, &mut retry),
        turnpike_proto::client::Event::Retry,
        "{:02x?}",
        challenge.bytes
    );
    write_bytewise(&mut t, &retry);
    assert!(
        matches!(t.outcome(), Outcome::Allocated(_)),
        "bytewise Allocate"
    );
    assert_eq!(t.bind(CHANNEL, peer.addr), Outcome::Ok);
    // ChannelData of every padding length, split at every byte (padding included).
    for (i, len) in [1usize, 2, 3, 4, 5, 6, 7, 13].into_iter().enumerate() {
        let payload: Vec<u8> = (0..len).map(|k| (i * 16 + k) as u8).collect();
        write_bytewise(&mut t, &channel_data_padded(CHANNEL, &payload));
        assert_eq!(
            t.recv_relayed(SHORT).unwrap(),
            Some(Relayed::Channel {
                channel: CHANNEL,
                data: payload
            }),
            "payload of {len} bytes written bytewise"
        );
    }
    // A Binding request split the same way.
    let local = t.local_addr();
    let binding = binding_request(*b"bytewise-bnd");
    write_bytewise(&mut t, &binding[..binding.len() - 1]);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(t.next_frame(Duration::from_millis(100)).unwrap(), None);
    t.send_raw(&binding[binding.len() - 1..]).unwrap();
    let answer = t.next_frame(SHORT).unwrap().expect("no Binding answer");
    let m = turnpike_proto::stun::Message::parse(&answer.bytes).unwrap();
    assert_eq!(
        m.attr::<turnpike_proto::attr::XorMappedAddress>()
            .unwrap()
            .map(|a| a.0),
        Some(local)
    );
}

fn framing_relays_fifty_messages_from_one_write(backend: &str) {
    let s = Server::start(backend, &[]);
    let peer = EchoPeer::start();
    let mut t = TurnStream::tcp(s.tcp[0], USER, PASS);
    quick_relay(&mut t, &peer, "setup");
    let payloads: Vec<Vec<u8>> = (0..50).map(odd_payload).collect();
    let burst: Vec<u8> = payloads
        .iter()
        .flat_map(|p| channel_data_padded(CHANNEL, p))
        .collect();
    t.send_raw(&burst).unwrap();
    let mut got = Vec::new();
    while got.len() < payloads.len() {
        match t.recv_relayed(SHORT) {
            Ok(Some(r)) => got.push(r.data().to_vec()),
            other => panic!(
                "{} of 50 came back, then {other:?}; sizes back: {:?}",
                got.len(),
                got.iter().map(Vec::len).collect::<Vec<_>>()
            ),
        }
    }
    assert!(got == payloads, "the 50 messages came back altered");
}

fn framing_skips_an_oversize_message_and_goes_on(backend: &str) {
    let s = Server::start(backend, &[]);
    let peer = EchoPeer::start();
    let mut t = TurnStream::tcp(s.tcp[0], USER, PASS);
    quick_relay(&mut t, &peer, "setup");
    let before = s.metrics();
    // Length 65535: 65535 bytes of payload and one of padding.
    let mut big = vec![0x40, 0x00, 0xFF, 0xFF];
    big.extend((0..65535u32).map(|i| (i % 251) as u8));
    big.push(0);
    assert_eq!(big.len() % 4, 0);
    t.send_raw(&big).unwrap();
    t.send_channel(CHANNEL, b"after the big one").unwrap();
    assert_eq!(
        t.recv_relayed(SHORT).unwrap(),
        Some(Relayed::Channel {
            channel: CHANNEL,
            data: b"after the big one".to_vec()
        }),
        "the message after an oversize one"
    );
    assert_eq!(
        t.recv_relayed(Duration::from_millis(300)).unwrap(),
        None,
        "something else came back"
    );
    // A long STUN message (a Send indication of 8000 bytes) is skipped as well.
    t.send_indication(peer.addr, &[7u8; 8000]).unwrap();
    echo(&mut t, CHANNEL, 3, "after the long indication");
    assert_eq!(t.recv_relayed(Duration::from_millis(200)).unwrap(), None);
    let after = s.metrics();
    let sent_to_peer = |m: &Metrics| m.sum("turnpike_relayed_packets_total", "to_peer");
    assert_eq!(
        sent_to_peer(&after) - sent_to_peer(&before),
        4,
        "only the 4 normal messages reached the peer"
    );
    assert_eq!(
        after.connection_events("oversize") - before.connection_events("oversize"),
        2,
        "oversize messages counted"
    );
}

fn framing_garbage_first_byte_closes_the_connection(backend: &str) {
    let s = Server::start(backend, &[]);
    let peer = EchoPeer::start();
    // A healthy connection first, to check it is left alone.
    let mut good = TurnStream::tcp(s.tcp[0], USER, PASS);
    quick_relay(&mut good, &peer, "bystander");
    for garbage in [
        &[0xFFu8, 0xFF, 0xFF, 0xFF][..],
        // 'P' (0x50) is ChannelData only with the legacy channel numbers.
        b"PUT / HTTP/1.1\r\n\r\n",
        // A TLS ClientHello's record header on the plain TCP port.
        &[0x16, 0x03, 0x01, 0x00, 0x04, 1, 0, 0, 0],
        &[0x80, 0, 0, 4, 1, 2, 3, 4],
    ] {
        let mut bad = TurnStream::tcp(s.tcp[0], USER, PASS);
        bad.send_raw(garbage).unwrap();
        match bad.wait_closed(Duration::from_secs(3)) {
            Ended::Closed(_) => {}
            Ended::Open => panic!("{garbage:02x?}: the connection stayed open"),
        }
    }
    // Garbage after a good message on a connection.
    let mut t = TurnStream::tcp(s.tcp[0], USER, PASS);
    assert!(t.binding().is_ok());
    t.send_raw(&[0xC0, 0, 0, 0]).unwrap();
    assert!(matches!(
        t.wait_closed(Duration::from_secs(3)),
        Ended::Closed(_)
    ));
    // A second connection works, and so does the bystander.
    let mut t2 = TurnStream::tcp(s.tcp[0], USER, PASS);
    quick_relay(&mut t2, &peer, "after garbage");
    echo(&mut good, CHANNEL, 3, "bystander after garbage");
    let n = s.metrics().connection_events("framing_errors");
    assert!(n >= 4, "framing_errors {n}");
}

/// With `--legacy-channel-numbers`, ChannelData on 0x5000..=0x7FFE (RFC 5766) is framed
/// over TCP like any other, both ways.
fn legacy_channel_numbers_are_framed(backend: &str) {
    const LEGACY: u16 = 0x7FFE;
    let s = Server::start(backend, &["--legacy-channel-numbers"]);
    let peer = EchoPeer::start();
    let mut t = TurnStream::tcp(s.tcp[0], USER, PASS);
    assert!(matches!(t.allocate(), Outcome::Allocated(_)));
    assert_eq!(t.bind(LEGACY, peer.addr), Outcome::Ok);
    for i in 0..8 {
        let payload = odd_payload(i);
        t.send_channel(LEGACY, &payload).unwrap();
        let frame = t.next_frame(SHORT).unwrap().expect("no echo");
        let mut want = LEGACY.to_be_bytes().to_vec();
        want.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
        want.extend_from_slice(&payload);
        assert!(
            frame.bytes == want,
            "message {i}: {:02x?}",
            &frame.bytes[..4]
        );
        assert_eq!(frame.padding, padded(want.len()) - want.len());
    }
}

// An allocation lives as long as its connection.

fn closing_the_connection_deletes_the_allocation(backend: &str) {
    let s = Server::start(backend, &[]);
    let peer = EchoPeer::start();
    let mut t = TurnStream::tcp(s.tcp[0], USER, PASS);
    let local = t.local_addr();
    let Outcome::Allocated(relayed) = t.allocate() else {
        panic!("Allocate")
    };
    assert_eq!(t.bind(CHANNEL, peer.addr), Outcome::Ok);
    echo(&mut t, CHANNEL, 3, "before close");
    // Data from a permitted address reaches the client through the relayed address.
    let prober = UdpSocket::bind("127.0.0.1:0").unwrap();
    prober.send_to(b"probe while open", relayed[0]).unwrap();
    assert_eq!(
        t.recv_relayed(SHORT).unwrap().map(|r| r.data().to_vec()),
        Some(b"probe while open".to_vec())
    );
    assert!(s.allocation_of(local).is_some(), "not listed while open");

    drop(t);
    let closed = Instant::now();
    while s.allocation_of(local).is_some() {
        assert!(
            closed.elapsed() < Duration::from_secs(2),
            "still listed 2 s after the connection closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The relayed address delivers nothing any more.
    let to_client = |s: &Server| {
        s.metrics()
            .sum("turnpike_relayed_packets_total", "to_client")
    };
    let before = to_client(&s);
    for _ in 0..5 {
        prober.send_to(b"probe after close", relayed[0]).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        to_client(&s),
        before,
        "datagrams to the old relayed address were relayed"
    );
    let m = s.metrics();
    assert_eq!(
        m.sum("turnpike_connections", ""),
        0,
        "connections still open"
    );
    assert!(m.connection_events("closed") >= 1);
}

// Half-close: a client that sends its last requests and then shuts its side down
// (`shutdown(SHUT_WR)`, or a TLS close_notify) still gets their answers, then the close.

/// Waits until the allocation of `client` is gone (the connection closed).
fn wait_unlisted(s: &Server, client: SocketAddr, what: &str) {
    let t = Instant::now();
    while s.allocation_of(client).is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{what}: the allocation is still listed 5 s after the server closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn half_closed_connection_gets_its_binding_answer(backend: &str) {
    let s = Server::start(backend, &[]);
    for round in 0..3 {
        let mut t = TurnStream::tcp(s.tcp[0], USER, PASS);
        let local = t.local_addr();
        let tid = *b"halfclosebnd";
        // The request and the FIN in one go: the server reads both before it answers.
        t.send_raw(&binding_request(tid)).unwrap();
        t.io.shutdown(Shutdown::Write).unwrap();
        assert_eq!(t.binding_answer(tid), Ok(local), "round {round}");
        assert!(
            matches!(t.wait_closed(Duration::from_secs(5)), Ended::Closed(_)),
            "round {round}: still open 5 s after the answer"
        );
    }
    let m = s.metrics();
    assert_eq!(
        m.sum("turnpike_connections", ""),
        0,
        "connections still open"
    );
}

fn half_closed_connection_gets_its_allocate_answer(backend: &str) {
    let s = Server::start(backend, &[]);
    let mut t = TurnStream::tcp(s.tcp[0], USER, PASS);
    let local = t.local_addr();
    // The 401 round trip first; then the authenticated Allocate, answered by the control
    // plane after the server has read the end of the stream.
    let req = t.authenticated_allocate().unwrap();
    t.send_raw(&req).unwrap();
    t.io.shutdown(Shutdown::Write).unwrap();
    let outcome = t.outcome();
    assert!(
        matches!(outcome, Outcome::Allocated(_)),
        "authenticated Allocate then SHUT_WR: {outcome:?}"
    );
    assert!(
        matches!(t.wait_closed(Duration::from_secs(5)), Ended::Closed(_)),
        "still open 5 s after the answer"
    );
    // The allocation ends with its connection, as for any closed connection.
    wait_unlisted(&s, local, "TCP");
}

fn half_closed_tls_connection_gets_its_answers(backend: &str) {
    let ca = TestCa::new();
    let leaf = ca.issue(SERVER_NAME, 1);
    let files = CertFiles::write(&format!("halfclose-{backend}"), &leaf);
    let tls_addr = format!("127.0.0.1:{}", free_tcp_port());
    let s = Server::start(
        backend,
        &[
            "--tls-cert",
            files.cert_str(),
            "--tls-key",
            files.key_str(),
            "--listen-tls",
            &tls_addr,
        ],
    );
    let cfg = client_config(&ca.cert, &[], Some(ALPN));
    let mut t = turn_tls(s.tls[0], cfg, USER, PASS);
    let local = t.io.sock.local_addr().unwrap();
    let req = t.authenticated_allocate().unwrap();
    let tid = *b"tlshalfclose";
    // Binding, Allocate, close_notify and FIN in that order: the Binding is answered by
    // the worker at once, the Allocate by the control plane later.
    t.io.write_all(&binding_request(tid)).unwrap();
    t.io.write_all(&req).unwrap();
    t.io.conn.send_close_notify();
    t.io.flush().unwrap();
    t.io.sock.shutdown(Shutdown::Write).unwrap();
    assert_eq!(t.binding_answer(tid), Ok(local));
    let outcome = t.outcome();
    assert!(
        matches!(outcome, Outcome::Allocated(_)),
        "authenticated Allocate then close_notify: {outcome:?}"
    );
    assert!(
        matches!(t.wait_closed(Duration::from_secs(5)), Ended::Closed(_)),
        "still open 5 s after the answers"
    );
    wait_unlisted(&s, local, "TLS");
}

// Slow readers.

fn slow_reader_loses_messages_not_memory(backend: &str) {
    const FLOOD: usize = 40_000;
    const SIZE: usize = 1000;
    let mut s = Server::start(backend, &[]);
    let flooder = UdpSocket::bind("127.0.0.1:0").unwrap();
    // A: allocates, permits the flooder, then never reads again.
    let mut a = TurnStream::tcp(s.tcp[0], USER, PASS);
    let Outcome::Allocated(relayed) = a.allocate() else {
        panic!("A: Allocate")
    };
    assert_eq!(a.permit(flooder.local_addr().unwrap()), Outcome::Ok);
    // B: relays through its own peer.
    let peer = EchoPeer::start();
    let mut b = TurnStream::tcp(s.tcp[0], USER, PASS);
    quick_relay(&mut b, &peer, "B before");
    let before = s.metrics();
    let rss_before = rss_kib(s.pid());

    let target = relayed[0];
    let flood = std::thread::spawn(move || {
        let payload = vec![0xABu8; SIZE];
        let started = Instant::now();
        let mut sent = 0;
        while sent < FLOOD && started.elapsed() < Duration::from_secs(30) {
            for _ in 0..100 {
                if flooder.send_to(&payload, target).is_ok() {
                    sent += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(4));
        }
        (sent, started.elapsed())
    });
    let mut rounds = 0;
    while !flood.is_finished() {
        echo(
            &mut b,
            CHANNEL,
            10,
            &format!("B during flood, round {rounds}"),
        );
        rounds += 1;
    }
    let (sent, took) = flood.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let rss_after = rss_kib(s.pid());
    let after = s.metrics();
    let delta = |name: &str, label: &str| after.sum(name, label) - before.sum(name, label);
    eprintln!(
        "{backend}: flood of {sent} x {SIZE} B in {took:?}; relayed to clients {}, \
         RSS {rss_before} -> {rss_after} KiB; send_dropped {}; B echo rounds {rounds}",
        delta("turnpike_relayed_packets_total", "to_client"),
        after.connection_events("send_dropped"),
    );
    assert!(s.alive(), "the server died: {}", s.output());
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    echo(&mut b, CHANNEL, 10, "B after flood");
    let dropped =
        after.connection_events("send_dropped") - before.connection_events("send_dropped");
    assert!(dropped > 0, "a client that reads nothing lost nothing");
    // What was dropped is not counted as relayed: relayed to clients (A's share and B's
    // echoes) plus dropped is at most what the flood and B's rounds brought in.
    let relayed = delta("turnpike_relayed_packets_total", "to_client");
    let b_echoes = (rounds as u64 + 1) * 10;
    assert!(
        relayed + dropped <= sent as u64 + b_echoes,
        "relayed {relayed} + dropped {dropped} > flood {sent} + B's {b_echoes}: drops counted as relayed"
    );
    drop(a);
}

// Idle and late connections.

fn idle_connections_without_allocation_are_closed(backend: &str) {
    let dir = std::env::temp_dir().join(format!("turnpike-idle-{backend}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("streams.toml");
    std::fs::write(&cfg, "[streams]\nidle_timeout = 2\n").unwrap();
    let s = Server::start(backend, &["--config", cfg.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    let server = s.tcp[0];

    // A client with an allocation, silent for longer than the timeout, is kept.
    let peer = EchoPeer::start();
    let mut kept = TurnStream::tcp(server, USER, PASS);
    quick_relay(&mut kept, &peer, "allocated");

    // A slow loris: one byte of an Allocate every 500 ms, reading in between.
    let loris = std::thread::spawn(move || {
        let mut sock = tcp_connect(server);
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut req = Vec::new();
        Client::new(USER, PASS, 7)
            .allocate(0, AllocateOptions::default(), &mut req)
            .unwrap();
        let start = Instant::now();
        let mut answered = 0;
        let mut buf = [0u8; 512];
        for (i, b) in req.iter().enumerate() {
            if sock.write_all(std::slice::from_ref(b)).is_err() {
                return (Some(start.elapsed()), i, answered);
            }
            match sock.read(&mut buf) {
                Ok(0) => return (Some(start.elapsed()), i + 1, answered),
                Ok(n) => answered += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return (Some(start.elapsed()), i + 1, answered),
            }
        }
        (None, req.len(), answered)
    });

    // A connection that sends nothing.
    let mut silent = TurnStream::tcp(server, USER, PASS);
    let silent_end = silent.wait_closed(Duration::from_secs(6));

    let (loris_end, loris_bytes, loris_answered) = loris.join().unwrap();
    match silent_end {
        Ended::Closed(d) => assert!(
            d >= Duration::from_millis(1500) && d <= Duration::from_secs(4),
            "the silent connection was closed after {d:?} (idle_timeout = 2)"
        ),
        Ended::Open => panic!("the silent connection is open after 6 s (idle_timeout = 2)"),
    }
    let d = loris_end.unwrap_or_else(|| {
        panic!("the slow loris sent its whole Allocate ({loris_bytes} bytes) and is still open")
    });
    assert!(
        d <= Duration::from_millis(4500),
        "the slow loris was closed after {d:?}"
    );
    assert_eq!(loris_answered, 0, "the slow loris got an answer");
    // The allocated client, silent all this time, is still served.
    echo(&mut kept, CHANNEL, 3, "allocated, after the idle timeout");
    let n = s.metrics().connection_events("idle_closed");
    assert!(n >= 2, "idle_closed {n}");
}

/// A TLS handshake or PROXY header not done within `handshake_timeout` closes the
/// connection (whatever `idle_timeout` says).
fn late_handshakes_and_proxy_headers_are_closed(backend: &str) {
    let dir = std::env::temp_dir().join(format!("turnpike-hs-{backend}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("streams.toml");
    std::fs::write(
        &cfg,
        "[streams]\nhandshake_timeout = 2\nidle_timeout = 30\n",
    )
    .unwrap();
    let ca = TestCa::new();
    let files = CertFiles::write(&format!("late-{backend}"), &ca.issue(SERVER_NAME, 1));
    let (tls_addr, proxy_addr) = (
        format!("127.0.0.1:{}", free_tcp_port()),
        format!("127.0.0.1:{}", free_tcp_port()),
    );
    let s = Server::start(
        backend,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--tls-cert",
            files.cert_str(),
            "--tls-key",
            files.key_str(),
            "--listen-tls",
            &tls_addr,
            "--listen-tcp",
            &proxy_addr,
            "--proxy-protocol",
            &proxy_addr,
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
    let (tls, proxy): (SocketAddr, SocketAddr) =
        (tls_addr.parse().unwrap(), proxy_addr.parse().unwrap());
    // Silent on the TLS port; half a PROXY header; half a ClientHello.
    let mut silent = TurnStream::over(tcp_connect(tls), USER, PASS);
    let mut half_proxy = TurnStream::over(tcp_connect(proxy), USER, PASS);
    half_proxy.send_raw(b"PROXY TCP4 192.0.2.1 ").unwrap();
    let mut half_hello = TurnStream::over(tcp_connect(tls), USER, PASS);
    half_hello
        .send_raw(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .unwrap();
    for (name, t) in [
        ("silent TLS", &mut silent),
        ("half a PROXY header", &mut half_proxy),
        ("half a ClientHello", &mut half_hello),
    ] {
        match t.wait_closed(Duration::from_secs(6)) {
            // The three started together; the first waits for the whole timeout.
            Ended::Closed(d) => assert!(d <= Duration::from_secs(4), "{name}: closed after {d:?}"),
            Ended::Open => panic!("{name}: open after 6 s (handshake_timeout = 2)"),
        }
    }
    // A complete handshake in time is served.
    let peer = EchoPeer::start();
    let mut t = turn_tls(tls, client_config(&ca.cert, &[], Some(ALPN)), USER, PASS);
    quick_relay(&mut t, &peer, "TLS in time");
    let m = s.metrics();
    assert!(m.connection_events("tls_failures") >= 2);
    assert!(m.connection_events("idle_closed") >= 3);
}

// PROXY protocol.

/// A PROXY protocol v2 header (PROXY command, TCP over IPv4) for `src` -> `dst`.
fn proxy_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (src, dst) else {
        panic!("IPv4 only")
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // AF_INET, STREAM
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&src.ip().octets());
    h.extend_from_slice(&dst.ip().octets());
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

fn proxy_protocol_v2_and_v1_set_the_client_address(backend: &str) {
    let addr = format!("127.0.0.1:{}", free_tcp_port());
    let s = Server::start(backend, &["--listen-tcp", &addr, "--proxy-protocol", &addr]);
    let server: SocketAddr = addr.parse().unwrap();
    assert_eq!(s.tcp, vec![server]);
    let peer = EchoPeer::start();

    // v2, header and Binding request in one write.
    let client: SocketAddr = "203.0.113.7:40000".parse().unwrap();
    let mut t = TurnStream::tcp(server, USER, PASS);
    let mut first = proxy_v2(client, server);
    first.extend(binding_request(*b"proxy-v2-bnd"));
    t.send_raw(&first).unwrap();
    let answer = t.next_frame(SHORT).unwrap().expect("no Binding answer");
    let m = turnpike_proto::stun::Message::parse(&answer.bytes).unwrap();
    assert_eq!(
        m.attr::<turnpike_proto::attr::XorMappedAddress>()
            .unwrap()
            .map(|a| a.0),
        Some(client)
    );
    // The allocation is the proxied client's, and relays.
    quick_relay(&mut t, &peer, "v2");
    assert_eq!(t.mapped, Some(client));
    assert_eq!(
        s.allocation_of(client).map(|a| a.1),
        Some(v1::Transport::Tcp)
    );

    // v1, header in its own write.
    let mut t = TurnStream::tcp(server, USER, PASS);
    t.send_raw(
        format!(
            "PROXY TCP4 198.51.100.9 127.0.0.1 40001 {}\r\n",
            server.port()
        )
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(t.binding(), Ok("198.51.100.9:40001".parse().unwrap()));
    quick_relay(&mut t, &peer, "v1");

    // No header: the connection is closed, unanswered.
    let mut t = TurnStream::tcp(server, USER, PASS);
    t.send_raw(&binding_request(*b"no-proxy-hdr")).unwrap();
    match t.next_frame(Duration::from_secs(3)) {
        Err(e) if e.kind() != std::io::ErrorKind::InvalidData => {}
        other => panic!("without a PROXY header: {other:?}"),
    }
}

/// Issue 25, N6: a PROXY header declaring a source no client can have (unspecified,
/// broadcast, port 0, the server's own address) or a UDP connection is refused: the
/// connection is closed unanswered and counted (`proxy_refused`); a real client still
/// gets through.
fn proxy_protocol_refuses_sources_that_cannot_be_a_client(backend: &str) {
    let addr = format!("127.0.0.1:{}", free_tcp_port());
    let s = Server::start(backend, &["--listen-tcp", &addr, "--proxy-protocol", &addr]);
    let server: SocketAddr = addr.parse().unwrap();
    let before = s.metrics().connection_events("proxy_refused");
    let mut udp4 = proxy_v2("203.0.113.8:40000".parse().unwrap(), server);
    udp4[13] = 0x12; // AF_INET, DGRAM
    let headers: Vec<(&str, Vec<u8>)> = vec![
        ("0.0.0.0:0", proxy_v2("0.0.0.0:0".parse().unwrap(), server)),
        (
            "255.255.255.255:65535",
            proxy_v2("255.255.255.255:65535".parse().unwrap(), server),
        ),
        ("the server's own address", proxy_v2(server, server)),
        ("port 0", proxy_v2("203.0.113.8:0".parse().unwrap(), server)),
        ("a v2 UDP4 header", udp4),
        (
            "v1 from 0.0.0.0",
            format!("PROXY TCP4 0.0.0.0 127.0.0.1 0 {}\r\n", server.port()).into_bytes(),
        ),
    ];
    let n = headers.len() as u64;
    for (what, header) in headers {
        let mut t = TurnStream::tcp(server, USER, PASS);
        let mut first = header;
        first.extend(binding_request(*b"proxy-refuse"));
        t.send_raw(&first).unwrap();
        match t.next_frame(Duration::from_secs(3)) {
            Err(e) if e.kind() != std::io::ErrorKind::InvalidData => {}
            other => panic!("PROXY header declaring {what}: {other:?}"),
        }
    }
    let after = s.metrics().connection_events("proxy_refused");
    assert_eq!(after, before + n, "proxy_refused");
    // A real client is still served.
    let client: SocketAddr = "203.0.113.9:40002".parse().unwrap();
    let mut t = TurnStream::tcp(server, USER, PASS);
    t.send_raw(&proxy_v2(client, server)).unwrap();
    assert_eq!(t.binding(), Ok(client));
}

// Certificate reload.

fn tls_certificate_reload_on_sighup(backend: &str) {
    let ca = TestCa::new();
    let first = ca.issue(SERVER_NAME, 1);
    let files = CertFiles::write(&format!("reload-{backend}"), &first);
    let tls_addr = format!("127.0.0.1:{}", free_tcp_port());
    let mut s = Server::start(
        backend,
        &[
            "--tls-cert",
            files.cert_str(),
            "--tls-key",
            files.key_str(),
            "--listen-tls",
            &tls_addr,
        ],
    );
    let addr = s.tls[0];
    let cfg = client_config(&ca.cert, &[], Some(ALPN));
    let peer = EchoPeer::start();
    let mut c1 = turn_tls(addr, cfg.clone(), USER, PASS);
    assert_eq!(
        c1.io.conn.peer_certificates().map(|c| c[0].clone()),
        Some(first.der.clone())
    );
    quick_relay(&mut c1, &peer, "client 1");

    let second = ca.issue(SERVER_NAME, 2);
    assert_ne!(first.der, second.der);
    files.replace(&second);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(s.pid()).unwrap()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();

    let sent = Instant::now();
    let mut c2 = loop {
        let c = turn_tls(addr, cfg.clone(), USER, PASS);
        let der = c.io.conn.peer_certificates().map(|c| c[0].clone());
        if der.as_ref() == Some(&second.der) {
            break c;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "still the old certificate 5 s after SIGHUP; alive: {}; output:\n{}",
            s.alive(),
            s.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    echo(&mut c1, CHANNEL, 20, "client 1 after reload");
    quick_relay(&mut c2, &peer, "client 2");
    let m = s.metrics();
    assert!(
        m.sum("turnpike_tls_reloads_total", "outcome=\"ok\"") >= 1,
        "no successful reload counted"
    );
    assert_eq!(m.sum("turnpike_tls_reloads_total", "outcome=\"failed\""), 0);
    assert!(s.alive(), "{}", s.output());
}
