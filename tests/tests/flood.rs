//! Issue #25 N4: a flood of unauthenticated Allocates and Bindings from random spoofed
//! sources (127.x.y.z and random ports, through a raw socket on loopback) costs `serve`
//! little RSS (target 10 MiB, measured 6 to 9.3; asserted at most 16 here, which the code
//! before the fix exceeded), and it still serves a real client during and after it. Before
//! the fix the queues between the planes held the flood's requests and answers by the
//! hundred thousand (+51 MiB after 0.6 M requests).
//! Needs root (raw sockets); elsewhere it reports itself skipped.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use common::{Outcome, Proc, Turn, free_udp_port};
use socket2::{Domain, Protocol, Socket, Type};

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn sum(b: &[u8], mut s: u32) -> u32 {
    for c in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    s
}

fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// A small xorshift generator: the flood's sources and transaction ids.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// An IPv4/UDP packet from `src` to `dst` carrying a STUN request of `method` (Allocate
/// with REQUESTED-TRANSPORT, or Binding), no credentials.
fn packet(src: SocketAddrV4, dst: SocketAddrV4, method: u16, tid: &[u8; 12]) -> Vec<u8> {
    let mut msg = Vec::new();
    let attrs: &[u8] = if method == 0x0003 {
        &[0x00, 0x19, 0x00, 0x04, 17, 0, 0, 0]
    } else {
        &[]
    };
    msg.extend_from_slice(&method.to_be_bytes());
    msg.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    msg.extend_from_slice(&0x2112_A442u32.to_be_bytes());
    msg.extend_from_slice(tid);
    msg.extend_from_slice(attrs);
    let ulen = 8 + msg.len();
    let mut udp = Vec::new();
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&(ulen as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&msg);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(ulen as u16).to_be_bytes());
    let c = !fold(sum(&udp, sum(&pseudo, 0)));
    udp[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + ulen) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.ip().octets());
    ip.extend_from_slice(&dst.ip().octets());
    ip.extend_from_slice(&udp);
    ip
}

/// Sends `n` spoofed requests, or as many as fit in `budget`; returns how many went
/// out. One packet is built and its source, port and transaction id rewritten in place
/// (UDP checksum 0: none, as IPv4 allows).
fn flood(
    sock: &Socket,
    dst: SocketAddrV4,
    method: u16,
    n: usize,
    budget: Duration,
    rng: &mut Rng,
) -> usize {
    let to: socket2::SockAddr = SocketAddr::V4(SocketAddrV4::new(*dst.ip(), 0)).into();
    let mut pkt = packet(
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1),
        dst,
        method,
        &[0; 12],
    );
    pkt[26..28].copy_from_slice(&[0, 0]);
    let t0 = Instant::now();
    let mut sent = 0;
    for i in 0..n {
        let r = rng.next();
        pkt[13] = (r >> 8) as u8 | 1;
        pkt[14] = (r >> 16) as u8;
        pkt[15] = (r >> 24) as u8 | 1;
        let port = 1024 + (r >> 32) as u16 % 60000;
        pkt[20..22].copy_from_slice(&port.to_be_bytes());
        pkt[36..44].copy_from_slice(&rng.next().to_le_bytes());
        if sock.send_to(&pkt, &to).is_ok() {
            sent += 1;
        }
        if i % 1024 == 0 && t0.elapsed() > budget {
            break;
        }
    }
    sent
}

#[test]
fn spoofed_floods_cost_serve_little_memory() {
    let sock = match Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255))) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("SKIPPED: no raw socket ({e}): needs root");
            return;
        }
    };
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let mut p = Proc::spawn(&[
        "serve",
        "--listen",
        &listen,
        "--no-tcp",
        "--admin-listen",
        "127.0.0.1:0",
        "--user",
        "u:p",
        "--workers",
        "2",
        "--no-pin",
    ]);
    p.wait_for("turnpike ready", Duration::from_secs(20));
    let pid = p.child.id();
    let dst = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let server: SocketAddr = listen.parse().unwrap();
    // A real client first: its allocation must outlive the flood.
    let mut t = Turn::new(server, "u", "p");
    assert!(matches!(t.allocate(), Outcome::Allocated(_)));
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_kib(pid);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut peak = before;
    let mut sent = 0;
    for (method, n) in [(0x0003, 200_000), (0x0003, 200_000), (0x0001, 100_000)] {
        sent += flood(&sock, dst, method, n, Duration::from_secs(12), &mut rng);
        peak = peak.max(rss_kib(pid));
    }
    eprintln!(
        "serve RSS: {before} KiB before {sent} spoofed requests, peak {peak} KiB (+{} KiB)",
        peak - before
    );
    // The target is 10 MiB (measured 6 to 9.3 MiB, bench/RESULTS.md); the test's bound
    // has room for a loaded CI machine and still fails the code before the fix (+30 MiB).
    assert!(
        peak <= before + 16 * 1024,
        "a flood of {sent} spoofed requests grew serve's RSS by {} KiB (more than 16 MiB)",
        peak - before
    );
    // Still serving: a refresh on the old allocation and a new allocation.
    assert_eq!(t.refresh(600), Outcome::Ok);
    let mut t2 = Turn::new(server, "u", "p");
    assert!(matches!(t2.allocate(), Outcome::Allocated(_)));
}
