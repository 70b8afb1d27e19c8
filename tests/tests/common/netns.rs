//! Two network namespaces joined by a veth pair, for the XDP tests: `S` (the server,
//! `vs`, 10.88.0.1/24) and `C` (clients and peers, `vc`, 10.88.0.2-4/24). Transmit
//! checksum offload is off on both ends and `vc` runs the pass program (NAPI mode), the
//! two conditions for frames sent with XDP_TX to arrive (see ARCHITECTURE.md, "The XDP
//! fast path"); IPv4 and IPv6 forwarding are on for `vs` (bpf_fib_lookup needs it).
//! IPv6: fd88::1 on `vs`, fd88::2 and fd88::3 on `vc`. Everything is
//! removed on drop, also when a test panics.
#![allow(dead_code, clippy::unwrap_used, clippy::disallowed_methods)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
pub const PEER: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 3);
pub const STRANGER: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 4);

/// Whether the XDP tests can run; `Err(reason)` to skip. Under `TURNPIKE_REQUIRE_XDP=1`
/// the caller must fail instead (see [`skip`]).
pub fn usable() -> Result<(), String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !root {
        return Err("not root (network namespaces and XDP need it)".into());
    }
    for tool in [
        "ip",
        "ethtool",
        "curl",
        "turnutils_uclient",
        "turnutils_peer",
    ] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(format!("{tool} is missing (tests/scripts/setup-deps.sh)"));
        }
    }
    Ok(())
}

/// Reports a skipped test, or fails it when XDP is required.
pub fn skip(why: &str) {
    if std::env::var("TURNPIKE_REQUIRE_XDP").is_ok_and(|v| v == "1") {
        panic!("XDP required (TURNPIKE_REQUIRE_XDP=1) but: {why}");
    }
    eprintln!("SKIPPED: {why}");
}

/// Runs `cmd` to its end; its stdout, or its stderr as the error.
pub fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Loads nftables `rules` (an `nft -f` script) in namespace `ns`.
pub fn nft(ns: &str, rules: &str) -> Result<(), String> {
    let mut nft = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    std::io::Write::write_all(&mut nft.stdin.take().unwrap(), rules.as_bytes())
        .map_err(|e| e.to_string())?;
    let o = nft.wait_with_output().map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(format!("nft: {}", String::from_utf8_lossy(&o.stderr)));
    }
    Ok(())
}

/// Moves the calling thread into network namespace `ns` (`ip netns` names it): sockets
/// it makes from then on live there.
pub fn enter(ns: &str) {
    let ns = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
}

/// Runs `f` on a thread inside namespace `ns`: sockets it makes live there.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|sc| {
        sc.spawn(move || {
            enter(ns);
            f()
        })
        .join()
        .unwrap()
    })
}

/// A process started inside a namespace; killed (SIGKILL) on drop.
pub struct NsProc {
    pub child: Child,
}

impl Drop for NsProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Topology {
    pub s: String,
    pub c: String,
    pass: Option<NsProc>,
    tx_offload: bool,
}

impl Topology {
    /// Makes the namespaces; `Err` when the pass program cannot be attached (the build
    /// has no XDP program, or the kernel refuses it).
    pub fn new() -> Result<Topology, String> {
        Topology::with_tx_offload(true)
    }

    /// [`Topology::new`] with transmit checksum offload on or off on both veth ends.
    pub fn with_tx_offload(tx_offload: bool) -> Result<Topology, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let base = format!("tpx-{}-{n}", std::process::id());
        let t = Topology {
            s: format!("{base}-s"),
            c: format!("{base}-c"),
            pass: None,
            tx_offload,
        };
        t.setup()?;
        let mut t = t;
        let mut pass = t.spawn_c(&[
            crate::common::bin().to_str().unwrap(),
            "xdp-tool",
            "pass",
            "vc",
        ]);
        let out = pass.child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)
            .map_err(|e| e.to_string())?;
        if !line.contains("attached") {
            let mut err = String::new();
            if let Some(mut e) = pass.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return Err(format!(
                "the XDP pass program does not attach: {}",
                err.trim()
            ));
        }
        t.pass = Some(pass);
        Ok(t)
    }

    fn setup(&self) -> Result<(), String> {
        let (s, c) = (self.s.as_str(), self.c.as_str());
        run("ip", &["netns", "add", s])?;
        run("ip", &["netns", "add", c])?;
        run(
            "ip",
            &[
                "link", "add", "vs", "netns", s, "type", "veth", "peer", "name", "vc", "netns", c,
            ],
        )?;
        for (ns, args) in [
            (s, vec!["addr", "add", "10.88.0.1/24", "dev", "vs"]),
            (c, vec!["addr", "add", "10.88.0.2/24", "dev", "vc"]),
            (c, vec!["addr", "add", "10.88.0.3/24", "dev", "vc"]),
            (c, vec!["addr", "add", "10.88.0.4/24", "dev", "vc"]),
            (s, vec!["addr", "add", "fd88::1/64", "dev", "vs", "nodad"]),
            (c, vec!["addr", "add", "fd88::2/64", "dev", "vc", "nodad"]),
            (c, vec!["addr", "add", "fd88::3/64", "dev", "vc", "nodad"]),
            (s, vec!["link", "set", "vs", "up"]),
            (c, vec!["link", "set", "vc", "up"]),
            (s, vec!["link", "set", "lo", "up"]),
            (c, vec!["link", "set", "lo", "up"]),
        ] {
            let mut a = vec!["-n", ns];
            a.extend(args);
            run("ip", &a)?;
        }
        let tx = if self.tx_offload { "on" } else { "off" };
        run("ip", &["netns", "exec", s, "ethtool", "-K", "vs", "tx", tx])?;
        run("ip", &["netns", "exec", c, "ethtool", "-K", "vc", "tx", tx])?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                s,
                "sysctl",
                "-qw",
                "net.ipv4.conf.vs.forwarding=1",
                "net.ipv6.conf.vs.forwarding=1",
            ],
        )?;
        Ok(())
    }

    fn spawn_in(ns: &str, args: &[&str]) -> NsProc {
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

    /// Starts a command in S (`ip netns exec` execs it: its pid is the command's).
    pub fn spawn_s(&self, args: &[&str]) -> NsProc {
        Topology::spawn_in(&self.s, args)
    }

    /// Starts a command in C.
    pub fn spawn_c(&self, args: &[&str]) -> NsProc {
        Topology::spawn_in(&self.c, args)
    }

    /// Runs a command in C to its end; its stdout and stderr.
    pub fn run_c(&self, args: &[&str]) -> String {
        let o = Command::new("ip")
            .args(["netns", "exec", &self.c])
            .args(args)
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// Runs `f` on a thread inside C: sockets it makes live in C.
    pub fn in_c<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        Topology::in_ns(&self.c, f)
    }

    /// Runs `f` on a thread inside S (for the Admin API on S's loopback).
    pub fn in_s<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        Topology::in_ns(&self.s, f)
    }

    fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
        in_ns(ns, f)
    }

    /// A UDP socket in C on `ip` (any port).
    pub fn udp_c(&self, ip: Ipv4Addr) -> UdpSocket {
        self.in_c(|| UdpSocket::bind(SocketAddr::from((ip, 0))).unwrap())
    }

    /// The value of every metric line starting with `prefix`, summed (turnpike's
    /// metrics on 10.88.0.1:9100, scraped from C).
    pub fn metric(&self, prefix: &str) -> f64 {
        let text = self.run_c(&[
            "curl",
            "-s",
            "--max-time",
            "3",
            "http://10.88.0.1:9100/metrics",
        ]);
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits (bounded) until the metrics endpoint answers.
    pub fn wait_metrics(&self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            let text = self.run_c(&[
                "curl",
                "-s",
                "--max-time",
                "1",
                "http://10.88.0.1:9100/metrics",
            ]);
            if text.contains("turnpike_xdp_enabled") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("turnpike's metrics did not answer in 10 s");
    }

    /// The peer IPs with an entry in the permission map (`tp_perms`) of the program
    /// attached to `vs`.
    pub fn permitted_in_program(&self) -> Vec<Ipv4Addr> {
        let json = |args: &[&str]| -> serde_json::Value {
            let out = run(
                "ip",
                &[&["netns", "exec", &self.s, "bpftool", "--json"][..], args].concat(),
            )
            .unwrap();
            serde_json::from_str(&out).unwrap()
        };
        let net = json(&["net", "show", "dev", "vs"]);
        let prog = net[0]["xdp"][0]["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("no XDP program on vs: {net}"));
        let info = json(&["prog", "show", "id", &prog.to_string()]);
        let maps = info["map_ids"].as_array().unwrap().clone();
        for m in maps {
            let id = m.as_u64().unwrap().to_string();
            if json(&["map", "show", "id", &id])["name"] != "tp_perms" {
                continue;
            }
            let dump = json(&["map", "dump", "id", &id]);
            return dump
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    let b: Vec<u8> = e["key"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| {
                            u8::from_str_radix(x.as_str().unwrap().trim_start_matches("0x"), 16)
                                .unwrap()
                        })
                        .collect();
                    // struct tp_perm_key { relay_ip, peer_ip, relay_port, _pad }
                    Ipv4Addr::new(b[4], b[5], b[6], b[7])
                })
                .collect();
        }
        panic!("no tp_perms map in program {prog}");
    }

    /// UDP datagrams C's kernel dropped for a bad checksum (IPv4 and IPv6 together):
    /// what a relay that gets checksums wrong costs, silently.
    pub fn csum_errors_c(&self) -> u64 {
        let snmp = self.run_c(&["cat", "/proc/net/snmp", "/proc/net/snmp6"]);
        // IPv4: a header line and a value line, both starting "Udp:".
        let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
        let v4 = udp
            .first()
            .zip(udp.get(1))
            .and_then(|(h, v)| {
                let i = h.split_whitespace().position(|f| f == "InCsumErrors")?;
                v.split_whitespace().nth(i)?.parse::<u64>().ok()
            })
            .unwrap_or_else(|| panic!("no Udp InCsumErrors in /proc/net/snmp:\n{snmp}"));
        let v6 = snmp
            .lines()
            .find_map(|l| l.strip_prefix("Udp6InCsumErrors"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no Udp6InCsumErrors in /proc/net/snmp6"));
        v4 + v6
    }

    /// Whether `vs` has an XDP program attached.
    pub fn vs_has_xdp(&self) -> bool {
        run("ip", &["-n", &self.s, "link", "show", "vs"])
            .map(|o| o.contains("prog/xdp"))
            .unwrap_or(false)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.pass.take();
        let _ = run("ip", &["netns", "del", &self.s]);
        let _ = run("ip", &["netns", "del", &self.c]);
    }
}
