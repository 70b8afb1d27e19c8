//! turnpike behind a 1:1 NAT, as on a cloud host: three network namespaces,
//!
//! ```text
//!   server (S)              router (R)                         internet (I)
//!   vs 10.89.0.1/24 ─── vr0 10.89.0.254 │ vr1 203.0.113.254 ─── vi 203.0.113.2 (clients)
//!      10.89.0.2/24                     │                          203.0.113.3 (peer)
//! ```
//!
//! R does nftables 1:1 NAT: 198.51.100.10 ⇄ 10.89.0.1 and 198.51.100.11 ⇄ 10.89.0.2
//! (DNAT towards S, SNAT from S). turnpike binds the private addresses and is told the
//! public ones with `--external-ip`; clients and peers in I only ever see the public ones.
//! The documentation ranges stand in for public addresses, so the servers allow them
//! as peers (`--allow-peer`), which the default policy would refuse.
//!
//! Needs root, `ip`, `nft`, coturn's uclient/peer and (for XDP) the program; reports
//! `SKIPPED: reason` otherwise, or fails under `TURNPIKE_REQUIRE_XDP=1` (CI).
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::netns::{self, NsProc};
use common::{Outcome, Turn};
use turnpike_proto::attr::AlternateServer;
use turnpike_proto::stun::Message;

const PRIVATE: &str = "10.89.0.1";
const PRIVATE2: &str = "10.89.0.2";
const PUBLIC: &str = "198.51.100.10";
const PUBLIC2: &str = "198.51.100.11";
const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const PEER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);
/// The "public" ranges the servers must allow as peers: the internet namespace and the
/// NAT's public addresses (relay-to-relay through the NAT, as two browsers do).
const ALLOW: &str = "203.0.113.0/24,198.51.100.0/24";

fn run(args: &[&str]) -> Result<String, String> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if !o.status.success() {
        return Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn has(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The three namespaces; removed (with what runs in them) on drop.
struct Nat {
    s: String,
    r: String,
    i: String,
    /// The pass program on `vr0` (XDP_TX from `vs` reaches R only in NAPI mode).
    pass: Option<NsProc>,
}

impl Nat {
    /// Makes the topology; `None` (after reporting the skip) where it cannot run. With
    /// `xdp`, also the pass program on `vr0`.
    fn new(xdp: bool) -> Option<Nat> {
        let why = netns::usable().err().or_else(|| {
            (!has("nft")).then(|| "nft is missing (tests/scripts/setup-deps.sh)".to_owned())
        });
        if let Some(why) = why {
            netns::skip(&why);
            return None;
        }
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let base = format!("tpn-{}-{n}", std::process::id());
        let mut t = Nat {
            s: format!("{base}-s"),
            r: format!("{base}-r"),
            i: format!("{base}-i"),
            pass: None,
        };
        if let Err(e) = t.setup() {
            panic!("NAT topology: {e}");
        }
        if xdp {
            // Transmit checksum offload stays on (the veth default): what R forwards
            // to S keeps the senders' partial UDP checksums, which the program
            // completes (issue 25 N9).
            let mut pass = t.spawn(
                &t.r,
                &[common::bin().to_str().unwrap(), "xdp-tool", "pass", "vr0"],
            );
            let out = pass.child.stdout.take().unwrap();
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line);
            if !line.contains("attached") {
                netns::skip("the XDP pass program does not attach");
                return None;
            }
            t.pass = Some(pass);
        }
        Some(t)
    }

    fn setup(&self) -> Result<(), String> {
        let (s, r, i) = (self.s.as_str(), self.r.as_str(), self.i.as_str());
        for ns in [s, r, i] {
            run(&["ip", "netns", "add", ns])?;
        }
        run(&[
            "ip", "link", "add", "vs", "netns", s, "type", "veth", "peer", "name", "vr0", "netns",
            r,
        ])?;
        run(&[
            "ip", "link", "add", "vi", "netns", i, "type", "veth", "peer", "name", "vr1", "netns",
            r,
        ])?;
        for (ns, args) in [
            (s, "addr add 10.89.0.1/24 dev vs"),
            (s, "addr add 10.89.0.2/24 dev vs"),
            (r, "addr add 10.89.0.254/24 dev vr0"),
            (r, "addr add 203.0.113.254/24 dev vr1"),
            (i, "addr add 203.0.113.2/24 dev vi"),
            (i, "addr add 203.0.113.3/24 dev vi"),
            (s, "link set lo up"),
            (r, "link set lo up"),
            (i, "link set lo up"),
            (s, "link set vs up"),
            (r, "link set vr0 up"),
            (r, "link set vr1 up"),
            (i, "link set vi up"),
            (s, "route add default via 10.89.0.254"),
            (i, "route add default via 203.0.113.254"),
        ] {
            let mut a = vec!["ip", "-n", ns];
            a.extend(args.split(' '));
            run(&a)?;
        }
        // R routes; relay-to-relay traffic turns back out of vr0 (hairpin), which must
        // not earn ICMP redirects. S forwards on vs for the XDP program's route lookup.
        run(&[
            "ip",
            "netns",
            "exec",
            r,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.vr0.send_redirects=0",
        ])?;
        run(&[
            "ip",
            "netns",
            "exec",
            s,
            "sysctl",
            "-qw",
            "net.ipv4.conf.vs.forwarding=1",
        ])?;
        let rules = format!(
            "table ip tpnat {{
  chain pre {{ type nat hook prerouting priority dstnat; policy accept;
    ip daddr {PUBLIC} dnat to {PRIVATE}
    ip daddr {PUBLIC2} dnat to {PRIVATE2}
  }}
  chain post {{ type nat hook postrouting priority srcnat; policy accept;
    ip saddr {PRIVATE} snat to {PUBLIC}
    ip saddr {PRIVATE2} snat to {PUBLIC2}
  }}
}}
"
        );
        common::netns::nft(r, &rules)?;
        Ok(())
    }

    fn spawn(&self, ns: &str, args: &[&str]) -> NsProc {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn in namespace");
        NsProc { child }
    }

    /// Runs a command in `ns` to its end: (success, stdout and stderr).
    fn run_in(&self, ns: &str, args: &[&str]) -> (bool, String) {
        let o = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    }

    /// A UDP socket in I on `ip`.
    fn udp_i(&self, ip: Ipv4Addr) -> UdpSocket {
        let path = format!("/run/netns/{}", self.i);
        std::thread::scope(|sc| {
            sc.spawn(move || {
                let ns = std::fs::File::open(&path).unwrap();
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                UdpSocket::bind(SocketAddr::from((ip, 0))).unwrap()
            })
            .join()
            .unwrap()
        })
    }

    /// The sum of the metric lines of the server at `private` starting with `prefix`.
    fn metric(&self, private: &str, prefix: &str) -> f64 {
        let url = format!("http://{private}:9100/metrics");
        let (_, text) = self.run_in(&self.s, &["curl", "-s", "--max-time", "3", &url]);
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// turnpike in S on `private` (listening and relaying), advertised as `public`.
    fn server(&self, private: &str, public: &str, xdp: bool, more: &[&str]) -> NsProc {
        let bin = common::bin().to_str().unwrap().to_owned();
        let listen = format!("{private}:3478");
        let metrics = format!("{private}:9100");
        let external = format!("{public}/{private}");
        let mut args = vec![
            bin.as_str(),
            "serve",
            "--listen",
            &listen,
            "--no-tcp",
            "--relay-ip",
            private,
            "--external-ip",
            &external,
            "--relay-ports",
            "50000-50999",
            "--realm",
            "nat.test",
            "--user",
            "u:p",
            "--allow-peer",
            ALLOW,
            "--legacy-channel-numbers",
            "--metrics-listen",
            &metrics,
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--admin-token",
            common::TOKEN,
            "--workers",
            "2",
            "--no-pin",
        ];
        if xdp {
            args.extend(["--xdp", "vs", "--xdp-mode", "native"]);
        }
        args.extend_from_slice(more);
        let p = self.spawn(&self.s, &args);
        let url = format!("http://{metrics}/metrics");
        let t0 = Instant::now();
        while !self
            .run_in(&self.s, &["curl", "-s", "--max-time", "1", &url])
            .1
            .contains("turnpike_xdp_enabled")
        {
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "turnpike at {private} did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            self.metric(private, "turnpike_xdp_enabled"),
            if xdp { 1.0 } else { 0.0 },
            "XDP attached as asked"
        );
        p
    }

    /// coturn's uclient in I through `server` to the peer at 203.0.113.3:3480, 4
    /// sessions of `n` packets: (sent, lost).
    fn uclient(&self, flags: &[&str], n: usize, server: &str) -> (usize, usize) {
        let n_s = n.to_string();
        let mut args = vec!["timeout", "60", "turnutils_uclient"];
        args.extend_from_slice(flags);
        args.extend([
            "-e",
            "203.0.113.3",
            "-r",
            "3480",
            "-n",
            &n_s,
            "-m",
            "4",
            "-l",
            "171",
            "-u",
            "u",
            "-w",
            "p",
            server,
        ]);
        let (_, out) = self.run_in(&self.i, &args);
        let lost = out
            .lines()
            .find_map(|l| {
                let rest = l.split("Total lost packets ").nth(1)?;
                rest.split_whitespace().next()?.parse::<usize>().ok()
            })
            .unwrap_or_else(|| panic!("no uclient summary:\n{out}"));
        (4 * n, lost)
    }

    fn peer(&self) -> NsProc {
        let p = self.spawn(
            &self.i,
            &["turnutils_peer", "-L", "203.0.113.3", "-p", "3480"],
        );
        std::thread::sleep(Duration::from_millis(300));
        p
    }
}

impl Drop for Nat {
    fn drop(&mut self) {
        self.pass.take();
        for ns in [&self.s, &self.r, &self.i] {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

/// A UDP echo peer in I; stops when the returned flag is set (or after 60 s).
fn echo_peer(t: &Nat, ip: Ipv4Addr) -> (SocketAddr, Arc<AtomicBool>) {
    let sock = t.udp_i(ip);
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let addr = sock.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let t0 = Instant::now();
        while !s2.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    });
    (addr, stop)
}

fn public(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().unwrap(), port)
}

/// A client in I allocates at the public address: XOR-RELAYED-ADDRESS is the public
/// address, and a channel echoes through it (the peer sees the relay's public address).
fn relayed_is_public_and_echoes(t: &Nat) -> SocketAddr {
    let (peer, stop) = echo_peer(t, PEER);
    let mut c = Turn::with_socket(t.udp_i(CLIENT), public(PUBLIC, 3478), "u", "p");
    let Outcome::Allocated(relayed) = c.allocate() else {
        panic!("allocate through the NAT failed: {:?}", c.last)
    };
    assert_eq!(relayed.len(), 1);
    assert_eq!(
        relayed[0].ip(),
        PUBLIC.parse::<IpAddr>().unwrap(),
        "XOR-RELAYED-ADDRESS is the public address"
    );
    assert_eq!(c.bind(0x4000, peer), Outcome::Ok);
    let got = common::echo_round(&mut c, 0x4000, 50);
    assert!(got >= 49, "{got} of 50 echoes through the NAT");
    stop.store(true, Ordering::Relaxed);
    relayed[0]
}

#[test]
fn relayed_address_is_public_and_uclient_relays_through_the_nat() {
    let Some(t) = Nat::new(false) else { return };
    let _srv = t.server(PRIVATE, PUBLIC, false, &[]);
    relayed_is_public_and_echoes(&t);
    let _peer = t.peer();
    for flags in [&["-c"][..], &["-c", "-s"][..]] {
        let (sent, lost) = t.uclient(flags, 300, PUBLIC);
        assert_eq!(
            lost, 0,
            "uclient {flags:?} through the NAT lost {lost} of {sent}"
        );
    }
}

#[test]
fn uclient_relays_through_the_nat_with_xdp() {
    let Some(t) = Nat::new(true) else { return };
    let _srv = t.server(PRIVATE, PUBLIC, true, &[]);
    relayed_is_public_and_echoes(&t);
    let _peer = t.peer();
    let n = 300;
    let xdp0 = t.metric(PRIVATE, "turnpike_xdp_relayed_packets_total");
    for flags in [&["-c"][..], &["-c", "-s"][..]] {
        let (sent, lost) = t.uclient(flags, n, PUBLIC);
        assert_eq!(
            lost, 0,
            "uclient {flags:?} through the NAT lost {lost} of {sent}"
        );
    }
    // Two runs, 4n packets each way each: the program wrote the private relay address
    // on the wire and R's NAT made it public, or nothing would have come back.
    let relayed = t.metric(PRIVATE, "turnpike_xdp_relayed_packets_total") - xdp0;
    let all = (2 * 2 * 4 * n) as f64;
    eprintln!("xdp through the NAT: {relayed} of {all}");
    assert!(relayed >= 0.9 * all, "XDP relayed {relayed} of {all}");
}

/// Chromium in I, relay only, through the public address: see tests/e2e/nat_chromium.py.
fn chromium(t: &Nat) {
    if !has("chromium") && std::env::var("CHROMIUM").is_err() {
        if common::etcd::in_ci() {
            panic!("chromium is missing (tests/scripts/setup-deps.sh)");
        }
        eprintln!("SKIPPED: chromium is missing");
        return;
    }
    let e2e = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e");
    let venv = e2e.join(".venv/bin/python");
    let python = if venv.exists() {
        venv.to_str().unwrap().to_owned()
    } else {
        "python3".to_owned()
    };
    // Short: Chromium's singleton socket path (under it) has at most 107 bytes.
    let work = std::path::PathBuf::from(format!(
        "/tmp/tpn-{}-{}",
        std::process::id(),
        common::free_tcp_port()
    ));
    std::fs::create_dir_all(&work).unwrap();
    let url = format!("turn:{PUBLIC}:3478?transport=udp");
    let script = e2e.join("nat_chromium.py");
    let (ok, out) = t.run_in(
        &t.i,
        &[
            "timeout",
            "120",
            &python,
            script.to_str().unwrap(),
            &url,
            "u",
            "p",
            PUBLIC,
            work.to_str().unwrap(),
        ],
    );
    eprintln!(
        "chromium through the NAT: {}",
        out.lines().last().unwrap_or("")
    );
    let log = std::fs::read_to_string(work.join("chromium-nat.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&work);
    assert!(
        ok,
        "chromium through the NAT:\n{out}\n--- chromium log (tail) ---\n{}",
        {
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        }
    );
}

#[test]
fn chromium_relays_through_the_nat() {
    let Some(t) = Nat::new(false) else { return };
    let _srv = t.server(PRIVATE, PUBLIC, false, &[]);
    chromium(&t);
}

#[test]
fn chromium_relays_through_the_nat_with_xdp() {
    let Some(t) = Nat::new(true) else { return };
    let _srv = t.server(PRIVATE, PUBLIC, true, &[]);
    chromium(&t);
}

/// Two instances behind the NAT with one etcd (in S): the drained one redirects a
/// client in I to the other's public address, where the client then allocates.
#[test]
fn a_fleet_redirect_names_the_public_address() {
    if !common::etcd::etcd_available() {
        return;
    }
    let Some(t) = Nat::new(false) else { return };
    // etcd on S's own loopback: the namespace is the test's, so fixed ports are free.
    let dir = std::env::temp_dir().join(format!(
        "turnpike-nat-etcd-{}-{}",
        std::process::id(),
        common::free_tcp_port()
    ));
    let etcd_url = "http://127.0.0.1:2379";
    let _etcd = t.spawn(
        &t.s,
        &[
            "/usr/bin/etcd",
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen-client-urls",
            etcd_url,
            "--advertise-client-urls",
            etcd_url,
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "default=http://127.0.0.1:2380",
        ],
    );
    let t0 = Instant::now();
    while !t
        .run_in(
            &t.s,
            &["etcdctl", "--endpoints", etcd_url, "endpoint", "health"],
        )
        .0
    {
        assert!(t0.elapsed() < Duration::from_secs(15), "etcd did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let fleet = ["--etcd", etcd_url, "--fleet", "nat", "--region", "r"];
    let mut a1 = fleet.to_vec();
    a1.extend(["--instance-id", "a"]);
    let mut a2 = fleet.to_vec();
    a2.extend(["--instance-id", "b"]);
    let _a = t.server(PRIVATE, PUBLIC, false, &a1);
    let _b = t.server(PRIVATE2, PUBLIC2, false, &a2);
    let bin = common::bin().to_str().unwrap().to_owned();
    let ctl = |args: &[&str]| {
        let mut v = vec![
            bin.as_str(),
            "ctl",
            "fleet",
            "--etcd",
            etcd_url,
            "--fleet",
            "nat",
        ];
        v.extend_from_slice(args);
        t.run_in(&t.s, &v)
    };
    // Both registered, with their public addresses.
    let t0 = Instant::now();
    loop {
        let (_, listing) = ctl(&["instances"]);
        if listing.contains(&format!("udp:{PUBLIC}:3478"))
            && listing.contains(&format!("udp:{PUBLIC2}:3478"))
        {
            assert!(
                !listing.contains(PRIVATE),
                "a private address registered:\n{listing}"
            );
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "instances not registered with public addresses:\n{listing}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ctl(&["drain", "b"]).0, "ctl fleet drain b");
    // A client in I at b's public address is sent to a's.
    let t0 = Instant::now();
    let alternate = loop {
        let mut c = Turn::with_socket(t.udp_i(CLIENT), public(PUBLIC2, 3478), "u", "p");
        match c.allocate() {
            Outcome::Failed(300) => {
                break Message::parse(&c.last)
                    .unwrap()
                    .attr::<AlternateServer>()
                    .unwrap()
                    .map(|a| a.0);
            }
            other => assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no redirect from the drained instance: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(alternate, Some(public(PUBLIC, 3478)));
    // Following it works: allocated at a, relayed from a's public address.
    let mut c = Turn::with_socket(t.udp_i(CLIENT), public(PUBLIC, 3478), "u", "p");
    let Outcome::Allocated(relayed) = c.allocate() else {
        panic!("allocate at the alternate failed")
    };
    assert_eq!(relayed[0].ip(), PUBLIC.parse::<IpAddr>().unwrap());
    drop(_etcd);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A relay IP that is not an address of the host (the public side of a NAT) is a
/// start-up error naming the option, not a stream of silent 508s; so is a mapping
/// whose private side is no relay IP.
#[test]
fn a_relay_ip_that_cannot_be_bound_is_a_start_up_error() {
    let out = Command::new(common::bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--relay-ip",
            PUBLIC,
            "--no-tcp",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("--relay-ip") && err.contains(PUBLIC), "{err}");
    assert!(err.contains("--external-ip PUBLIC/PRIVATE"), "{err}");

    let out = Command::new(common::bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--external-ip",
            &format!("{PUBLIC}/127.0.0.2"),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("--external-ip") && err.contains("127.0.0.2"),
        "{err}"
    );
}
