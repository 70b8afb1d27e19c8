//! `turnpike probe` against turnpike (UDP, TCP, TLS) and Debian's coturn: a report with
//! RTT and exit 0; a wrong password, a wrong TLS name, an unreachable port and a peer the
//! server refuses each exit 1 naming the failed step.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::tls::{CertFiles, SERVER_NAME, TestCa};
use common::{Proc, bin, free_tcp_port, free_udp_port};
use turnpike_proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

const USER: &str = "prober";
const PASS: &str = "probe-pass";
const SECRET: &str = "probe-rest-secret";

/// A `serve` process with UDP, TCP and TLS listeners.
struct Server {
    _proc: Proc,
    udp: SocketAddr,
    tcp: SocketAddr,
    tls: SocketAddr,
    _files: CertFiles,
    ca_file: std::path::PathBuf,
}

impl Server {
    fn start(tag: &str, allow_loopback: bool) -> Server {
        let ca = TestCa::new();
        let leaf = ca.issue(SERVER_NAME, 1);
        let files = CertFiles::write(&format!("probe-{tag}"), &leaf);
        let ca_file = std::env::temp_dir().join(format!(
            "turnpike-probe-ca-{tag}-{}.pem",
            std::process::id()
        ));
        std::fs::write(&ca_file, &ca.cert_pem).unwrap();
        let udp = format!("127.0.0.1:{}", free_udp_port());
        let tls = format!("127.0.0.1:{}", free_tcp_port());
        let admin = format!("127.0.0.1:{}", free_tcp_port());
        let metrics = format!("127.0.0.1:{}", free_tcp_port());
        let user = format!("{USER}:{PASS}");
        let mut args = vec![
            "serve",
            "--listen",
            &udp,
            "--listen-tls",
            &tls,
            "--tls-cert",
            files.cert_str(),
            "--tls-key",
            files.key_str(),
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            &admin,
            "--admin-token",
            common::TOKEN,
            "--metrics-listen",
            &metrics,
            "--workers",
            "1",
            "--no-pin",
            "--user",
            &user,
            "--auth-secret",
            SECRET,
            "--realm",
            "probe.test",
        ];
        if allow_loopback {
            args.extend(["--allow-peer", "127.0.0.0/8"]);
        }
        let mut proc = Proc::spawn(&args);
        let ready = proc.wait_for("turnpike ready:", Duration::from_secs(30));
        let first = |k: &str| -> SocketAddr {
            common::field(&ready, k)
                .split(',')
                .next()
                .unwrap()
                .parse()
                .unwrap_or_else(|e| panic!("{k} in {ready:?}: {e}"))
        };
        Server {
            udp: udp.parse().unwrap(),
            tcp: first("tcp"),
            tls: first("tls"),
            _proc: proc,
            _files: files,
            ca_file,
        }
    }

    fn urls(&self) -> [String; 3] {
        [
            format!("turn:{}", self.udp),
            format!("turn:{}?transport=tcp", self.tcp),
            format!("turns:{}", self.tls),
        ]
    }

    fn ca(&self) -> &str {
        self.ca_file.to_str().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.ca_file);
    }
}

/// Runs `turnpike probe ARGS` (bounded: the probe bounds every step itself).
fn probe(args: &[&str]) -> Output {
    let started = Instant::now();
    let out = Command::new(bin())
        .arg("probe")
        .args(args)
        .output()
        .unwrap();
    eprintln!("probe {args:?}: {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "the probe took {:?}",
        started.elapsed()
    );
    out
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The probe failed (exit 1) and named `step` on stderr.
fn assert_fails_at(out: &Output, step: &str) {
    let all = text(out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with(&format!("FAIL {step}:"))),
        "expected FAIL {step}:\n{all}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FAILED:") && stdout.contains(step), "{all}");
}

#[test]
fn probe_passes_against_turnpike_on_udp_tcp_and_tls() {
    let s = Server::start("ok", true);
    let [udp, tcp, tls] = s.urls();
    let common_args = [
        "--user",
        USER,
        "--password",
        PASS,
        "--ca",
        s.ca(),
        "--tls-name",
        SERVER_NAME,
        "-n",
        "50",
    ];

    // The table.
    let mut args = vec![udp.as_str(), tcp.as_str(), tls.as_str()];
    args.extend(common_args);
    let out = probe(&args);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "all checks passed (3 targets)",
        "rtt p50",
        "echo",
        "max-datagram",
        "channel-bind",
        "create-permission",
        "tls-name",
        "stun.turn negotiated",
        "realm \"probe.test\"",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} in\n{all}");
    }

    // JSON, parsed back.
    args.push("--json");
    let out = probe(&args);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {all}"));
    assert_eq!(v["schema"], 1);
    assert_eq!(v["ok"], true, "{all}");
    let targets = v["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 3);
    for (t, transport) in targets.iter().zip(["udp", "tcp", "tls"]) {
        assert_eq!(t["transport"], transport, "{t}");
        assert_eq!(t["ok"], true, "{t}");
        assert_eq!(t["realm"], "probe.test", "{t}");
        let echo = &t["echo"];
        assert_eq!(echo["sent"], 50, "{t}");
        assert!(echo["received"].as_u64().unwrap() >= 45, "{t}");
        let p50 = echo["rtt_p50_ms"].as_f64().unwrap();
        let p99 = echo["rtt_p99_ms"].as_f64().unwrap();
        assert!(p50 > 0.0 && p50 <= p99, "{t}");
        assert!(echo["jitter_ms"].as_f64().is_some(), "{t}");
        assert!(t["max_datagram"].as_u64().unwrap() >= 1200, "{t}");
        assert_eq!(t["relayed"].as_array().unwrap().len(), 2, "{t}");
        let steps: Vec<&str> = t["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["step"].as_str().unwrap())
            .collect();
        for step in [
            "reachability",
            "authentication",
            "allocate",
            "create-permission",
            "channel-bind",
            "echo",
            "max-datagram",
        ] {
            assert!(steps.contains(&step), "{step} missing in {steps:?}");
        }
    }
    let tls_facts = &targets[2]["tls"];
    assert_eq!(tls_facts["alpn"], "stun.turn", "{tls_facts}");
    let cert = &tls_facts["certificate"];
    assert_eq!(cert["names"][0], SERVER_NAME, "{cert}");
    assert!(cert["days_to_expiry"].as_i64().unwrap() > 0, "{cert}");

    // A TURN REST credential made from the shared secret.
    let out = probe(&[&udp, "--secret", SECRET, "--user", "alice", "-n", "10"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn probe_names_the_failed_step() {
    let s = Server::start("fail", true);
    let [udp, tcp, tls] = s.urls();

    // A wrong password, on each transport.
    for url in [&udp, &tcp, &tls] {
        let out = probe(&[
            url,
            "--user",
            USER,
            "--password",
            "wrong",
            "--ca",
            s.ca(),
            "--tls-name",
            SERVER_NAME,
        ]);
        assert_fails_at(&out, "authentication");
    }

    // A certificate for another name.
    let out = probe(&[
        &tls,
        "--user",
        USER,
        "--password",
        PASS,
        "--ca",
        s.ca(),
        "--tls-name",
        "wrong.example",
    ]);
    assert_fails_at(&out, "tls-name");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("certificate is for turn.test, not wrong.example"),
        "{}",
        text(&out)
    );

    // A CA that did not sign the certificate.
    let other = TestCa::new();
    let other_file = std::env::temp_dir().join(format!(
        "turnpike-probe-other-ca-{}.pem",
        std::process::id()
    ));
    std::fs::write(&other_file, &other.cert_pem).unwrap();
    let out = probe(&[
        &tls,
        "--user",
        USER,
        "--password",
        PASS,
        "--ca",
        other_file.to_str().unwrap(),
        "--tls-name",
        SERVER_NAME,
    ]);
    let _ = std::fs::remove_file(&other_file);
    assert_fails_at(&out, "tls-chain");

    // Ports nobody listens on, over UDP and TCP.
    let closed_udp = format!("turn:127.0.0.1:{}", free_udp_port());
    let closed_tcp = format!("turn:127.0.0.1:{}?transport=tcp", free_tcp_port());
    for url in [&closed_udp, &closed_tcp] {
        let out = probe(&[url, "--user", USER, "--password", PASS, "--timeout", "2"]);
        assert_fails_at(&out, "reachability");
    }

    // Bad arguments: exit 64.
    let out = probe(&["stun:127.0.0.1", "--user", USER, "--password", PASS]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let out = probe(&[&udp]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
}

#[test]
fn probe_reports_a_refused_peer() {
    // The default peer policy: loopback peers (the probe's own relayed addresses) refused.
    let s = Server::start("refused", false);
    let [udp, ..] = s.urls();
    let out = probe(&[&udp, "--user", USER, "--password", PASS]);
    assert_fails_at(&out, "create-permission");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("403") && stderr.contains("refuses this peer"),
        "{}",
        text(&out)
    );
}

/// Debian's coturn, or `None` (with a note) where it is not installed; under CI its
/// absence fails the test.
fn turnserver() -> Option<&'static str> {
    let path = "/usr/bin/turnserver";
    if std::path::Path::new(path).exists() {
        Some(path)
    } else {
        assert!(
            !common::etcd::in_ci(),
            "{path} is missing: tests/scripts/setup-deps.sh installs coturn"
        );
        eprintln!("SKIP: {path} is not installed (tests/scripts/setup-deps.sh installs it)");
        None
    }
}

/// Waits (bounded) until a STUN Binding request to `addr` is answered.
fn wait_stun(addr: SocketAddr, limit: Duration) -> bool {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut req = [0u8; 64];
    let mut w = MessageWriter::new(
        &mut req,
        Method::BINDING,
        Class::Request,
        TransactionId(*b"probe-ready!"),
    )
    .unwrap();
    w.add_fingerprint().unwrap();
    let n = w.finish();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let _ = sock.send_to(&req[..n], addr);
        if let Ok((len, _)) = sock.recv_from(&mut buf)
            && Message::parse(&buf[..len]).is_ok_and(|m| m.class() == Class::Success)
        {
            return true;
        }
    }
    false
}

/// coturn, killed on drop.
struct Coturn {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn probe_passes_against_coturn_on_udp_and_tcp() {
    let Some(turnserver) = turnserver() else {
        return;
    };
    let port = free_udp_port();
    // A relay range of its own below the ephemeral ports (free_udp_port stays out of it
    // only by chance; 100 ports make a clash unlikely and would show as an Allocate error).
    let min = 30_000 + (std::process::id() % 20) as u16 * 100;
    let dir = std::env::temp_dir().join(format!("turnpike-probe-coturn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new(turnserver)
        .args([
            "-n",
            "--listening-ip",
            "127.0.0.1",
            "--relay-ip",
            "127.0.0.1",
        ])
        .arg(format!("--listening-port={port}"))
        .arg(format!("--min-port={min}"))
        .arg(format!("--max-port={}", min + 99))
        .args([
            "--realm=probe.test",
            &format!("--user={USER}:{PASS}"),
            "--lt-cred-mech",
            "--fingerprint",
            "--allow-loopback-peers",
            "--no-cli",
            "--no-dtls",
            "--no-tls",
            "--no-tcp-relay",
            "--simple-log",
            "--log-file=stdout",
        ])
        .arg(format!("--pidfile={}/turnserver.pid", dir.display()))
        .arg(format!("--userdb={}/turndb", dir.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _coturn = Coturn { child, dir };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        wait_stun(addr, Duration::from_secs(20)),
        "coturn does not answer on {addr}"
    );

    let udp = format!("turn:{addr}");
    let tcp = format!("turn:{addr}?transport=tcp");
    let out = probe(&[
        &udp,
        &tcp,
        "--user",
        USER,
        "--password",
        PASS,
        "-n",
        "50",
        "--json",
    ]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for t in v["targets"].as_array().unwrap() {
        assert!(t["echo"]["rtt_p50_ms"].as_f64().is_some(), "{t}");
        assert!(
            t["software"]
                .as_str()
                .unwrap_or_default()
                .contains("Coturn"),
            "{t}"
        );
        assert_eq!(t["realm"], "probe.test", "{t}");
    }
    // And the table, for a person.
    let out = probe(&[&udp, "--user", USER, "--password", PASS, "-n", "20"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("rtt p50"),
        "{}",
        text(&out)
    );
    // A wrong password against coturn too.
    let out = probe(&[&udp, "--user", USER, "--password", "wrong"]);
    assert_fails_at(&out, "authentication");
}

#[test]
fn probe_checks_every_instance_of_a_fleet() {
    use common::etcd::{EtcdProc, etcd_available};
    if !etcd_available() {
        return;
    }
    let etcd = EtcdProc::start();
    let url = etcd.url();
    let fleet = format!("probe{}", std::process::id());
    let user = format!("{USER}:{PASS}");
    let mut members = Vec::new();
    for n in [2u8, 3] {
        let listen = format!("127.0.0.{n}:{}", free_udp_port());
        let id = format!("i{n}");
        let args = [
            "serve",
            "--listen",
            &listen,
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--admin-token",
            common::TOKEN,
            "--workers",
            "1",
            "--no-pin",
            "--user",
            &user,
            "--allow-peer",
            "127.0.0.0/8",
            "--etcd",
            &url,
            "--fleet",
            &fleet,
            "--instance-id",
            &id,
            "--region",
            "test",
        ];
        let mut p = Proc::spawn(&args);
        p.wait_for("turnpike ready", Duration::from_secs(30));
        p.wait_for("registered in the fleet", Duration::from_secs(15));
        members.push(p);
    }
    let out = probe(&[
        "--etcd",
        &url,
        "--fleet",
        &fleet,
        "--user",
        USER,
        "--password",
        PASS,
        "-n",
        "20",
        "--json",
    ]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut seen: Vec<(String, String)> = v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert!(t["echo"]["rtt_p50_ms"].as_f64().is_some(), "{t}");
            (
                t["instance"].as_str().unwrap().to_owned(),
                t["transport"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    seen.sort();
    let want: Vec<(String, String)> = [("i2", "tcp"), ("i2", "udp"), ("i3", "tcp"), ("i3", "udp")]
        .iter()
        .map(|(i, t)| (i.to_string(), t.to_string()))
        .collect();
    assert_eq!(seen, want, "{all}");

    // A fleet nobody registered in: nothing to probe, a usage error.
    let out = probe(&[
        "--etcd",
        &url,
        "--fleet",
        "nobody-here",
        "--user",
        USER,
        "--password",
        PASS,
    ]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
}
