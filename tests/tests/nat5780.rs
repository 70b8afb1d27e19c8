//! NAT behaviour discovery (RFC 5780) through real NATs, against turnpike and coturn:
//!
//! ```text
//!   server (S)                     router (R)                          client (C)
//!   vs 10.90.0.1/24 ─── vr0 10.90.0.254 │ vr1 192.168.90.254 ─── vc 192.168.90.2
//!      10.90.0.2/24                     │   nftables SNAT of C to 10.90.0.254
//! ```
//!
//! turnpike listens on 10.90.0.1:3478 with `--alt-ip 10.90.0.2` (companions on
//! 10.90.0.1:3479, 10.90.0.2:3478 and 10.90.0.2:3479); coturn on 10.90.0.1 and 10.90.0.2
//! port 5478 (alternate port 5479), both at once. Two NATs, one topology each:
//!
//! - `snat to 10.90.0.254`: conntrack keeps the client's source port for every
//!   destination, so the mapping is endpoint-independent; conntrack lets in only replies
//!   from the address and port a flow was sent to, so the filtering is address- and
//!   port-dependent (a full-cone filter is not something conntrack does).
//! - `snat to 10.90.0.254 random`: a fresh random port per destination, a symmetric NAT:
//!   address- and port-dependent mapping, and the same filtering.
//!
//! `turnutils_natdiscovery -m -f` runs in C against each server; what it concludes about
//! mapping and filtering must be the same for turnpike as for coturn, and the two NATs
//! must differ in mapping. From R (not behind the NAT) the answers are also checked on
//! the wire, on both I/O backends: RESPONSE-ORIGIN is the address the answer came from,
//! OTHER-ADDRESS is 10.90.0.2:3479, CHANGE-REQUEST moves the answer to the companion.
//!
//! Needs root, `ip`, `nft`, `turnutils_natdiscovery` and `turnserver`; reports
//! `SKIPPED: reason` otherwise.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::netns::NsProc;
use turnpike_proto::attr::{ChangeRequest, OtherAddress, ResponseOrigin, XorMappedAddress};
use turnpike_proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

const IP1: &str = "10.90.0.1";
const IP2: &str = "10.90.0.2";
const TURNPIKE_PORT: u16 = 3478;
const COTURN_PORT: u16 = 5478;

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

/// Why this test cannot run here, if it cannot.
fn unusable() -> Option<String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !root {
        return Some("not root (network namespaces need it)".into());
    }
    ["ip", "nft", "turnutils_natdiscovery", "turnserver"]
        .into_iter()
        .find(|t| !has(t))
        .map(|t| format!("{t} is missing (tests/scripts/setup-deps.sh)"))
}

/// Which NAT R does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NatKind {
    /// Port-preserving SNAT: endpoint-independent mapping.
    EndpointIndependent,
    /// SNAT with a random port per flow: a symmetric NAT.
    Symmetric,
}

/// The three namespaces; removed (with what runs in them) on drop.
struct Topo {
    s: String,
    r: String,
    c: String,
}

impl Drop for Topo {
    fn drop(&mut self) {
        for ns in [&self.s, &self.r, &self.c] {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

impl Topo {
    fn new(kind: NatKind) -> Topo {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let base = format!("tp5780-{}-{n}", std::process::id());
        let t = Topo {
            s: format!("{base}-s"),
            r: format!("{base}-r"),
            c: format!("{base}-c"),
        };
        if let Err(e) = t.setup(kind) {
            panic!("topology: {e}");
        }
        t
    }

    fn setup(&self, kind: NatKind) -> Result<(), String> {
        let (s, r, c) = (self.s.as_str(), self.r.as_str(), self.c.as_str());
        for ns in [s, r, c] {
            run(&["ip", "netns", "add", ns])?;
        }
        run(&[
            "ip", "link", "add", "vs", "netns", s, "type", "veth", "peer", "name", "vr0", "netns",
            r,
        ])?;
        run(&[
            "ip", "link", "add", "vc", "netns", c, "type", "veth", "peer", "name", "vr1", "netns",
            r,
        ])?;
        for (ns, args) in [
            (s, "addr add 10.90.0.1/24 dev vs"),
            (s, "addr add 10.90.0.2/24 dev vs"),
            (r, "addr add 10.90.0.254/24 dev vr0"),
            (r, "addr add 192.168.90.254/24 dev vr1"),
            (c, "addr add 192.168.90.2/24 dev vc"),
            (s, "link set lo up"),
            (r, "link set lo up"),
            (c, "link set lo up"),
            (s, "link set vs up"),
            (r, "link set vr0 up"),
            (r, "link set vr1 up"),
            (c, "link set vc up"),
            (c, "route add default via 192.168.90.254"),
        ] {
            let mut a = vec!["ip", "-n", ns];
            a.extend(args.split(' '));
            run(&a)?;
        }
        run(&[
            "ip",
            "netns",
            "exec",
            r,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        let flags = match kind {
            NatKind::EndpointIndependent => "",
            NatKind::Symmetric => " random",
        };
        let rules = format!(
            "table ip tp5780 {{
  chain post {{ type nat hook postrouting priority srcnat; policy accept;
    ip saddr 192.168.90.0/24 oifname \"vr0\" snat to 10.90.0.254{flags}
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
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn in namespace");
        NsProc { child }
    }

    /// A UDP socket in namespace `ns`, on any address.
    fn udp_in(&self, ns: &str) -> UdpSocket {
        let path = format!("/run/netns/{ns}");
        std::thread::scope(|sc| {
            sc.spawn(move || {
                let f = std::fs::File::open(&path).unwrap();
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                UdpSocket::bind("0.0.0.0:0").unwrap()
            })
            .join()
            .unwrap()
        })
    }

    /// turnpike in S on IP1:3478 with IP2 as its alternate address.
    fn turnpike(&self, backend: &str) -> NsProc {
        let bin = common::bin().to_str().unwrap().to_owned();
        let listen = format!("{IP1}:{TURNPIKE_PORT}");
        let p = self.spawn(
            &self.s,
            &[
                &bin,
                "serve",
                "--listen",
                &listen,
                "--alt-ip",
                IP2,
                "--no-tcp",
                "--relay-ip",
                IP1,
                "--realm",
                "nat5780.test",
                "--user",
                "u:p",
                "--grpc-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--admin-token",
                common::TOKEN,
                "--workers",
                "2",
                "--no-pin",
                "--io-backend",
                backend,
            ],
        );
        self.await_binding(&self.r, SocketAddr::from(([10, 90, 0, 1], TURNPIKE_PORT)));
        p
    }

    /// coturn in S on IP1 and IP2, port 5478 (RFC 5780 on: two listening IPs of a family).
    fn coturn(&self) -> NsProc {
        let port = COTURN_PORT.to_string();
        // coturn up to 4.6 turns RFC 5780 on by itself with two listening IPs of a
        // family; later releases want `--rfc5780` (and refuse unknown options).
        let help = Command::new("turnserver")
            .arg("-h")
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default();
        let enable = help
            .lines()
            .any(|l| l.trim_start().starts_with("--rfc5780"));
        let mut args = vec![
            "turnserver",
            "-n",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--no-tcp",
            "-L",
            IP1,
            "-L",
            IP2,
            "-p",
            &port,
            "--min-port",
            "51000",
            "--max-port",
            "51999",
            "-r",
            "nat5780.test",
            "--log-file",
            "stdout",
        ];
        if enable {
            args.push("--rfc5780");
        }
        let p = self.spawn(&self.s, &args);
        self.await_binding(&self.r, SocketAddr::from(([10, 90, 0, 1], COTURN_PORT)));
        p
    }

    /// Waits until `server` answers a Binding request sent from `ns`.
    fn await_binding(&self, ns: &str, server: SocketAddr) {
        let sock = self.udp_in(ns);
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let t0 = Instant::now();
        loop {
            if binding(&sock, server, None).is_some() {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "{server} never answered a Binding request"
            );
        }
    }

    /// `turnutils_natdiscovery -m -f` in C against `port` on IP1: its conclusions
    /// (the lines between its `====` rules) and its whole output.
    fn natdiscovery(&self, port: u16) -> (Vec<String>, String) {
        let port = port.to_string();
        let o = Command::new("ip")
            .args(["netns", "exec", &self.c])
            .args(["turnutils_natdiscovery", "-m", "-f", "-p", &port, IP1])
            .output()
            .unwrap();
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let verdicts = out
            .lines()
            .filter(|l| l.starts_with("NAT with") || l.starts_with("No NAT"))
            .map(str::to_owned)
            .collect();
        (verdicts, out)
    }

    /// `turnpike probe --json` in C against `port` on IP1: the `nat` object of its
    /// report ({mapping, filtering, other_address}), whether the rest of the probe
    /// passed or not (relaying between private addresses is not what is tested here).
    fn probe_nat(&self, port: u16) -> serde_json::Value {
        let url = format!("turn:{IP1}:{port}");
        let o = Command::new("ip")
            .args(["netns", "exec", &self.c])
            .arg(common::bin())
            .args([
                "probe",
                &url,
                "--user",
                "u",
                "--password",
                "p",
                "--json",
                "-n",
                "5",
            ])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!(
                "probe output is not JSON ({e}):\n{out}\n{}",
                String::from_utf8_lossy(&o.stderr)
            )
        });
        v["targets"][0]["nat"].clone()
    }
}

/// natdiscovery's verdicts in the probe's words.
fn words(verdict: &str) -> &'static str {
    match verdict {
        v if v.contains("Endpoint Independent") => "endpoint-independent",
        v if v.contains("Address and Port Dependent") => "address-and-port-dependent",
        v if v.contains("Address Dependent") => "address-dependent",
        _ => "?",
    }
}

/// Sends a Binding request (with CHANGE-REQUEST when `change` is given) and returns
/// the answer and where it came from.
fn binding(
    sock: &UdpSocket,
    server: SocketAddr,
    change: Option<ChangeRequest>,
) -> Option<(Vec<u8>, SocketAddr)> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let mut t = [0u8; 12];
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    t[..8].copy_from_slice(&nanos.to_be_bytes());
    t[8..].copy_from_slice(&SEQ.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    let tid = TransactionId(t);
    let mut req = [0u8; 64];
    let mut w = MessageWriter::new(&mut req, Method::BINDING, Class::Request, tid).unwrap();
    if let Some(c) = change {
        w.add(&c).unwrap();
    }
    let n = w.finish();
    sock.send_to(&req[..n], server).unwrap();
    let mut buf = [0u8; 1500];
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        let Ok((len, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        match Message::parse(&buf[..len]) {
            Ok(m) if m.transaction_id() == tid => return Some((buf[..len].to_vec(), from)),
            _ => continue,
        }
    }
    None
}

/// On the wire, from R: each of the four addresses answers, RESPONSE-ORIGIN is where
/// the answer came from, OTHER-ADDRESS is IP2:P2, and CHANGE-REQUEST moves the answer.
fn check_wire(t: &Topo, port: u16) {
    let sock = t.udp_in(&t.r);
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let ip1: std::net::IpAddr = IP1.parse().unwrap();
    let ip2: std::net::IpAddr = IP2.parse().unwrap();
    let group = [
        SocketAddr::new(ip1, port),
        SocketAddr::new(ip1, port + 1),
        SocketAddr::new(ip2, port),
        SocketAddr::new(ip2, port + 1),
    ];
    for (i, &to) in group.iter().enumerate() {
        for (change_ip, change_port) in [(false, false), (true, false), (false, true), (true, true)]
        {
            let change = ChangeRequest {
                change_ip,
                change_port,
            };
            let (resp, from) = binding(&sock, to, Some(change))
                .unwrap_or_else(|| panic!("no answer from {to} to {change:?}"));
            let m = Message::parse(&resp).unwrap();
            assert_eq!(m.class(), Class::Success, "{to} {change:?}");
            let j = i ^ (usize::from(change_ip) << 1) ^ usize::from(change_port);
            assert_eq!(from, group[j], "{to} {change:?}: the answer's source");
            assert_eq!(
                m.attr::<ResponseOrigin>().unwrap(),
                Some(ResponseOrigin(group[j])),
                "{to} {change:?}"
            );
            assert_eq!(
                m.attr::<OtherAddress>().unwrap(),
                Some(OtherAddress(group[i ^ 3])),
                "{to} {change:?}"
            );
            let mapped = m.attr::<XorMappedAddress>().unwrap().unwrap().0;
            assert_eq!(mapped.port(), sock.local_addr().unwrap().port());
        }
    }
}

#[test]
fn rfc5780_answers_on_the_wire_on_both_backends() {
    if let Some(why) = unusable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let t = Topo::new(NatKind::EndpointIndependent);
    for backend in ["uring", "mmsg"] {
        let server = t.turnpike(backend);
        check_wire(&t, TURNPIKE_PORT);
        drop(server);
    }
}

#[test]
fn natdiscovery_sees_the_same_nat_through_turnpike_as_through_coturn() {
    if let Some(why) = unusable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let mut mappings = Vec::new();
    for kind in [NatKind::EndpointIndependent, NatKind::Symmetric] {
        let t = Topo::new(kind);
        let _turnpike = t.turnpike("auto");
        let _coturn = t.coturn();
        let (ours, ours_out) = t.natdiscovery(TURNPIKE_PORT);
        let (theirs, theirs_out) = t.natdiscovery(COTURN_PORT);
        eprintln!("{kind:?}: turnpike {ours:?}, coturn {theirs:?}");
        assert_eq!(
            ours.len(),
            2,
            "{kind:?}: natdiscovery against turnpike concluded nothing:\n{ours_out}"
        );
        assert_eq!(
            ours, theirs,
            "{kind:?}: turnpike\n{ours_out}\ncoturn\n{theirs_out}"
        );
        // `turnpike probe` reports the same NAT, against either server.
        for port in [TURNPIKE_PORT, COTURN_PORT] {
            let nat = t.probe_nat(port);
            assert_eq!(
                nat["mapping"],
                words(&ours[0]),
                "{kind:?} probe of {port}: {nat}"
            );
            assert_eq!(
                nat["filtering"],
                words(&ours[1]),
                "{kind:?} probe of {port}: {nat}"
            );
        }
        mappings.push(ours);
    }
    let [eim, symmetric] = &mappings[..] else {
        unreachable!()
    };
    assert_eq!(eim[0], "NAT with Endpoint Independent Mapping!");
    assert_eq!(
        symmetric[0], "NAT with Address and Port Dependent Mapping!",
        "the symmetric NAT"
    );
    // conntrack filters replies by address and port, whatever the mapping.
    for v in [eim, symmetric] {
        assert_eq!(v[1], "NAT with Address and Port Dependent Filtering!");
    }
}
