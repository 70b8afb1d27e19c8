//! The XDP program, run on crafted frames with `BPF_PROG_TEST_RUN`, with its maps
//! written by the real `Mirror::sync` from a real worker `Table`.
//!
//! A route lookup needs a device: each test makes a network namespace with a veth pair
//! (address 10.77.0.1 on `xa`, permanent neighbour entries for the client 10.77.0.2, the
//! peer 10.77.0.3 and another host 10.77.0.4, forwarding on) and runs the program from a
//! thread inside it. Needs root and a kernel that loads the program: elsewhere the tests
//! print `SKIPPED: reason`, or fail when `TURNPIKE_REQUIRE_XDP=1`.
#![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]
#![allow(clippy::indexing_slicing, reason = "test frames have known layouts")]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::*;
use crate::core::Output;
use crate::core::counters::Counters;
use crate::core::table::Table;
use crate::{FiveTuple, Millis, TableChange};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
const STRANGER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 4);
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];
const LISTEN_PORT: u16 = 3478;
const RELAY_PORT: u16 = 50000;
const CLIENT_PORT: u16 = 5000;
const PEER_PORT: u16 = 7000;
const CHANNEL: u16 = 0x4001;

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// Whether the XDP tests can run here; `None` (after printing why) when they are
/// skipped. With `TURNPIKE_REQUIRE_XDP=1` a skip is a failure.
fn load() -> Option<FastPath> {
    load_with(&[])
}

/// [`load`] with some maps made smaller.
fn load_with(limits: &[(&str, u32)]) -> Option<FastPath> {
    let why = match FastPath::start_with_limits(&XdpConfig::default(), limits) {
        Ok(fp) => return Some(fp),
        Err(e) => e.to_string(),
    };
    if std::env::var("TURNPIKE_REQUIRE_XDP").is_ok_and(|v| v == "1") {
        panic!("XDP required (TURNPIKE_REQUIRE_XDP=1) but unavailable: {why}");
    }
    eprintln!("SKIPPED: {why}");
    None
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A network namespace with the veth pair `xa`/`xb`; deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tpu-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        let n = ns.name.as_str();
        ip(&[
            "-n", n, "link", "add", "xa", "type", "veth", "peer", "name", "xb",
        ]);
        ip(&["-n", n, "addr", "add", "10.77.0.1/24", "dev", "xa"]);
        ip(&["-n", n, "link", "set", "xa", "up"]);
        ip(&["-n", n, "link", "set", "xb", "up"]);
        for (host, mac) in [
            ("10.77.0.2", "02:00:00:00:00:02"),
            ("10.77.0.3", "02:00:00:00:00:03"),
            ("10.77.0.4", "02:00:00:00:00:04"),
        ] {
            ip(&[
                "-n",
                n,
                "neigh",
                "add",
                host,
                "lladdr",
                mac,
                "dev",
                "xa",
                "nud",
                "permanent",
            ]);
        }
        ip(&[
            "netns",
            "exec",
            n,
            "sysctl",
            "-qw",
            "net.ipv4.conf.xa.forwarding=1",
            "net.ipv6.conf.xa.forwarding=1",
        ]);
        ip(&["-n", n, "addr", "add", "fd77::1/64", "dev", "xa", "nodad"]);
        for (host, mac) in [
            ("fd77::2", "02:00:00:00:00:02"),
            ("fd77::3", "02:00:00:00:00:03"),
        ] {
            ip(&[
                "-n",
                n,
                "-6",
                "neigh",
                "add",
                host,
                "lladdr",
                mac,
                "dev",
                "xa",
                "nud",
                "permanent",
            ]);
        }
        ns
    }

    /// Runs the program on `frame` as if it arrived on `xa`, from a thread inside the
    /// namespace.
    fn run(&self, fp: &FastPath, frame: &[u8]) -> (u32, Vec<u8>) {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let f = std::fs::File::open(&path).unwrap();
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let idx = nix::net::if_::if_nametoindex("xa").unwrap();
                fp.test_run(frame, idx).unwrap()
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The ones' complement sum of `b` as 16-bit big-endian words.
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

fn udp_checksum(src: Ipv4Addr, dst: Ipv4Addr, udp: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    let c = !fold(sum(udp, sum(&pseudo, 0)));
    if c == 0 { 0xffff } else { c }
}

/// An Ethernet frame with an IPv4/UDP datagram (valid checksums, or a UDP checksum of 0
/// with `no_csum`).
fn frame(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8], no_csum: bool) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[2, 0, 0, 0, 0, 0xaa]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let ulen = 8 + payload.len();
    let mut iph = vec![0x45, 0];
    iph.extend_from_slice(&((20 + ulen) as u16).to_be_bytes());
    iph.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 17, 0, 0]);
    iph.extend_from_slice(&src.ip().octets());
    iph.extend_from_slice(&dst.ip().octets());
    let c = !fold(sum(&iph, 0));
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&iph);
    let mut udp = Vec::new();
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&(ulen as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    if !no_csum {
        let c = udp_checksum(*src.ip(), *dst.ip(), &udp);
        udp[6..8].copy_from_slice(&c.to_be_bytes());
    }
    f.extend_from_slice(&udp);
    f
}

/// What a relayed frame carries, its checksums verified.
#[derive(Debug)]
struct Sent {
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ttl: u8,
    dont_fragment: bool,
    udp_csum: u16,
    payload: Vec<u8>,
}

fn parse(f: &[u8]) -> Sent {
    assert_eq!(&f[12..14], &[0x08, 0x00]);
    let iph = &f[14..34];
    assert_eq!(iph[0], 0x45);
    assert_eq!(fold(sum(iph, 0)), 0xffff, "IPv4 header checksum");
    let tot = usize::from(u16::from_be_bytes([iph[2], iph[3]]));
    assert_eq!(tot, f.len() - 14, "IP total length is the frame's");
    let src_ip = Ipv4Addr::new(iph[12], iph[13], iph[14], iph[15]);
    let dst_ip = Ipv4Addr::new(iph[16], iph[17], iph[18], iph[19]);
    let udp = &f[34..];
    let ulen = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    assert_eq!(ulen, udp.len(), "UDP length");
    let csum = u16::from_be_bytes([udp[6], udp[7]]);
    if csum != 0 {
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src_ip.octets());
        pseudo.extend_from_slice(&dst_ip.octets());
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&(ulen as u16).to_be_bytes());
        assert_eq!(fold(sum(udp, sum(&pseudo, 0))), 0xffff, "UDP checksum");
    }
    Sent {
        dst_mac: f[0..6].try_into().unwrap(),
        src: sa(src_ip, u16::from_be_bytes([udp[0], udp[1]])),
        dst: sa(dst_ip, u16::from_be_bytes([udp[2], udp[3]])),
        ttl: iph[8],
        dont_fragment: iph[6] & 0x40 != 0,
        udp_csum: csum,
        payload: udp[8..].to_vec(),
    }
}

fn channel_data(ch: u16, data: &[u8], pad: &[u8]) -> Vec<u8> {
    let mut v = ch.to_be_bytes().to_vec();
    v.extend_from_slice(&(data.len() as u16).to_be_bytes());
    v.extend_from_slice(data);
    v.extend_from_slice(pad);
    v
}

fn xor_peer(a: SocketAddrV4) -> Vec<u8> {
    let mut v = vec![0, 1];
    v.extend_from_slice(&(a.port() ^ 0x2112).to_be_bytes());
    v.extend_from_slice(&(u32::from(*a.ip()) ^ 0x2112_A442).to_be_bytes());
    v
}

/// A STUN message of `ty` with these attributes (padded), in order.
fn stun(ty: u16, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (t, v) in attrs {
        body.extend_from_slice(&t.to_be_bytes());
        body.extend_from_slice(&(v.len() as u16).to_be_bytes());
        body.extend_from_slice(v);
        body.resize(body.len().next_multiple_of(4), 0);
    }
    let mut m = ty.to_be_bytes().to_vec();
    m.extend_from_slice(&(body.len() as u16).to_be_bytes());
    m.extend_from_slice(&0x2112_A442u32.to_be_bytes());
    m.extend_from_slice(&[7; 12]);
    m.extend_from_slice(&body);
    m
}

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 1) as u8).collect()
}

/// A worker table with one UDP allocation (client 10.77.0.2:5000 → 10.77.0.1:3478,
/// relayed address 10.77.0.1:50000), a permission for the peer's IP and a channel to
/// the peer, mirrored into the maps.
struct Fixture {
    fp: Arc<FastPath>,
    mirror: Mirror,
    table: Table,
    denied: Denied,
    ctr: Counters,
    id: AllocationId,
    tuple: FiveTuple,
    now: u64,
}

fn unix_ms() -> u64 {
    crate::io::worker::unix_millis().0
}

impl Fixture {
    fn new(fp: FastPath) -> Fixture {
        Fixture::with(fp, 0, Denied::default())
    }

    fn with(fp: FastPath, bandwidth: u64, denied: Denied) -> Fixture {
        let fp = Arc::new(fp);
        let mirror = fp.mirror().unwrap();
        let now = unix_ms();
        let tuple = FiveTuple::udp(
            SocketAddr::V4(sa(CLIENT, CLIENT_PORT)),
            SocketAddr::V4(sa(SERVER, LISTEN_PORT)),
        );
        let mut f = Fixture {
            fp,
            mirror,
            table: Table::default(),
            denied,
            ctr: Counters::default(),
            id: AllocationId(7),
            tuple,
            now,
        };
        f.table.track = true;
        f.apply(TableChange::AllocationAdd {
            id: f.id,
            tuple,
            relays: vec![SocketAddr::V4(sa(SERVER, RELAY_PORT))],
            deadline: Millis(now + 600_000),
            bandwidth,
            user: "u".into(),
            username: "u".into(),
            dont_fragment: false,
        });
        f.apply(TableChange::PermissionSet {
            id: f.id,
            peer: PEER.into(),
            deadline: Millis(now + 300_000),
        });
        f.apply(TableChange::ChannelSet {
            id: f.id,
            channel: CHANNEL,
            peer: SocketAddr::V4(sa(PEER, PEER_PORT)),
            deadline: Millis(now + 600_000),
            confirmed: false,
        });
        f
    }

    fn apply(&mut self, c: TableChange) {
        let mut out: Vec<Output> = Vec::new();
        self.table
            .apply(0, self.now, c, &self.denied, &self.ctr, &mut out);
        self.sync();
    }

    fn sync(&mut self) {
        let mut touched = std::mem::take(&mut self.table.touched);
        self.mirror
            .sync_all(&mut touched, &mut self.table.allocs, &self.denied, self.now);
    }

    /// A second allocation `id` for the client's port `port` (relayed on RELAY_PORT + 1),
    /// with a permission for each of `peers`.
    fn add_second(&mut self, id: AllocationId, port: u16, peers: &[Ipv4Addr]) {
        self.apply(TableChange::AllocationAdd {
            id,
            tuple: FiveTuple::udp(
                SocketAddr::V4(sa(CLIENT, port)),
                SocketAddr::V4(sa(SERVER, LISTEN_PORT)),
            ),
            relays: vec![SocketAddr::V4(sa(SERVER, RELAY_PORT + 1))],
            deadline: Millis(self.now + 600_000),
            bandwidth: 0,
            user: "u".into(),
            username: "u".into(),
            dont_fragment: false,
        });
        for p in peers {
            self.apply(TableChange::PermissionSet {
                id,
                peer: (*p).into(),
                deadline: Millis(self.now + 300_000),
            });
        }
    }

    fn delta(&self, before: &XdpStats, name: &str) -> u64 {
        let i = STAT_NAMES.iter().position(|n| *n == name).unwrap();
        self.fp.stats().counters[i] - before.counters[i]
    }
}

fn up_channel(len: usize, pad: &[u8], no_csum: bool) -> Vec<u8> {
    frame(
        sa(CLIENT, CLIENT_PORT),
        sa(SERVER, LISTEN_PORT),
        &channel_data(CHANNEL, &data(len), pad),
        no_csum,
    )
}

fn from_peer(peer: Ipv4Addr, len: usize) -> Vec<u8> {
    frame(
        sa(peer, PEER_PORT),
        sa(SERVER, RELAY_PORT),
        &data(len),
        false,
    )
}

/// A Send indication to the peer from the client's port `port`.
fn send_from(port: u16) -> Vec<u8> {
    frame(
        sa(CLIENT, port),
        sa(SERVER, LISTEN_PORT),
        &stun(
            0x0016,
            &[(0x0012, xor_peer(sa(PEER, PEER_PORT))), (0x0013, data(10))],
        ),
        false,
    )
}

fn send_ind(attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
    frame(
        sa(CLIENT, CLIENT_PORT),
        sa(SERVER, LISTEN_PORT),
        &stun(0x0016, attrs),
        false,
    )
}

#[test]
fn without_a_device_everything_is_passed() {
    let Some(fp) = load() else { return };
    let f = Fixture::new(fp);
    let before = f.fp.stats();
    let (action, _) = f.fp.test_run(&up_channel(100, &[], false), 0).unwrap();
    assert_eq!(action, XDP_PASS);
    assert_eq!(f.fp.stats().passed_total() - before.passed_total(), 1);
}

#[test]
fn channel_data_up_is_relayed_with_its_header_and_padding_stripped() {
    let Some(fp) = load() else { return };
    let ns = Netns::new();
    let f = Fixture::new(fp);
    for (len, pad) in [
        (100, &[][..]),
        (101, &[0, 0, 0][..]),
        (1, &[0][..]),
        (0, &[][..]),
        (1200, &[][..]),
    ] {
        let before = f.fp.stats();
        let (action, out) = ns.run(&f.fp, &up_channel(len, pad, false));
        assert_eq!(action, XDP_TX, "len {len}");
        let s = parse(&out);
        assert_eq!(s.dst_mac, PEER_MAC);
        assert_eq!(s.src, sa(SERVER, RELAY_PORT));
        assert_eq!(s.dst, sa(PEER, PEER_PORT));
        assert_eq!(s.ttl, 64);
        assert!(!s.dont_fragment);
        assert_ne!(s.udp_csum, 0);
        assert_eq!(s.payload, data(len), "len {len}");
        assert_eq!(f.delta(&before, "relayed_channel_up"), 1);
        assert_eq!(f.delta(&before, "bytes_up"), len as u64);
    }
    // No checksum in, none out.
    let (action, out) = ns.run(&f.fp, &up_channel(33, &[0, 0, 0], true));
    assert_eq!(action, XDP_TX);
    let s = parse(&out);
    assert_eq!(s.udp_csum, 0);
    assert_eq!(s.payload, data(33));
}

#[test]
fn odd_channel_data_is_left_to_the_workers() {
    let Some(fp) = load() else { return };
    let ns = Netns::new();
    let f = Fixture::new(fp);
    let cases: [(&str, Vec<u8>); 4] = [
        ("unsupported", up_channel(10, &[1, 0], false)),
        ("malformed", {
            // The length field says more than the datagram holds.
            let mut cd = channel_data(CHANNEL, &data(10), &[]);
            cd[3] = 40;
            frame(sa(CLIENT, CLIENT_PORT), sa(SERVER, LISTEN_PORT), &cd, false)
        }),
        ("malformed", up_channel(10, &[0, 0, 0, 0], false)),
        ("no_entry", {
            let cd = channel_data(0x4002, &data(10), &[]);
            frame(sa(CLIENT, CLIENT_PORT), sa(SERVER, LISTEN_PORT), &cd, false)
        }),
    ];
    for (reason, fr) in cases {
        let before = f.fp.stats();
        let (action, out) = ns.run(&f.fp, &fr);
        assert_eq!(action, XDP_PASS, "{reason}");
        assert_eq!(out, fr, "a passed frame is unchanged");
        assert_eq!(f.delta(&before, reason), 1, "{reason}");
    }
}

#[test]
fn send_indications_are_relayed_whatever_the_attribute_order() {
    let Some(fp) = load() else { return };
    let ns = Netns::new();
    let f = Fixture::new(fp);
    let peer = xor_peer(sa(PEER, PEER_PORT));
    for len in [0usize, 1, 2, 3, 4, 101, 1000] {
        for (order, attrs) in [
            (
                "peer, data",
                vec![(0x0012, peer.clone()), (0x0013, data(len))],
            ),
            (
                // coturn's uclient and pion: DATA first, FINGERPRINT last.
                "data, peer, fingerprint",
                vec![
                    (0x0013, data(len)),
                    (0x0012, peer.clone()),
                    (0x8028, vec![1, 2, 3, 4]),
                ],
            ),
            (
                "software, dont-fragment, peer, data",
                vec![
                    (0x8022, b"x".to_vec()),
                    (0x001A, vec![]),
                    (0x0012, peer.clone()),
                    (0x0013, data(len)),
                ],
            ),
        ] {
            let before = f.fp.stats();
            let (action, out) = ns.run(&f.fp, &send_ind(&attrs));
            assert_eq!(action, XDP_TX, "{order}, {len} bytes");
            let s = parse(&out);
            assert_eq!(s.dst_mac, PEER_MAC);
            assert_eq!(s.src, sa(SERVER, RELAY_PORT));
            assert_eq!(s.dst, sa(PEER, PEER_PORT));
            assert_eq!(s.payload, data(len), "{order}, {len} bytes");
            assert_eq!(f.delta(&before, "relayed_send_up"), 1);
        }
    }
}

#[test]
fn send_indications_the_program_does_not_relay() {
    let Some(fp) = load() else { return };
    let ns = Netns::new();
    let f = Fixture::new(fp);
    let peer = xor_peer(sa(PEER, PEER_PORT));
    let mut v6 = vec![0, 2, 0x1b, 0x52];
    v6.extend_from_slice(&[0; 16]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "unsupported",
            send_ind(&[
                (0x0012, peer.clone()),
                (0x0013, data(8)),
                (0x0008, vec![0; 20]),
            ]),
        ),
        (
            "unsupported",
            send_ind(&[
                (0x0012, peer.clone()),
                (0x0013, data(8)),
                (0x7777, vec![0; 4]),
            ]),
        ),
        ("unsupported", send_ind(&[(0x0012, v6), (0x0013, data(8))])),
        ("unsupported", send_ind(&[(0x0013, data(8))])),
        (
            "no_entry",
            send_ind(&[(0x0012, xor_peer(sa(STRANGER, 9))), (0x0013, data(8))]),
        ),
        ("malformed", {
            let mut m = stun(0x0016, &[(0x0012, peer.clone()), (0x0013, data(8))]);
            m[3] += 4;
            frame(sa(CLIENT, CLIENT_PORT), sa(SERVER, LISTEN_PORT), &m, false)
        }),
    ];
    for (reason, fr) in cases {
        let before = f.fp.stats();
        let (action, out) = ns.run(&f.fp, &fr);
        assert_eq!(action, XDP_PASS, "{reason}");
        assert_eq!(out, fr);
        assert_eq!(f.delta(&before, reason), 1, "{reason}");
    }
}

/// Checks a Data indication from the peer carrying `payload`.
fn check_data_indication(msg: &[u8], payload: &[u8]) {
    assert_eq!(&msg[0..2], &[0x00, 0x17]);
    let mlen = usize::from(u16::from_be_bytes([msg[2], msg[3]]));
    assert_eq!(mlen + 20, msg.len());
    assert_eq!(msg.len() % 4, 0);
    assert_eq!(&msg[4..8], &0x2112_A442u32.to_be_bytes());
    assert_eq!(&msg[20..24], &[0x00, 0x12, 0x00, 0x08]);
    assert_eq!(&msg[24..32], &xor_peer(sa(PEER, PEER_PORT))[..]);
    assert_eq!(&msg[32..34], &[0x00, 0x13]);
    assert_eq!(
        usize::from(u16::from_be_bytes([msg[34], msg[35]])),
        payload.len()
    );
    assert_eq!(&msg[36..36 + payload.len()], payload);
    assert!(msg[36 + payload.len()..].iter().all(|&b| b == 0));
}

#[test]
fn peer_datagrams_go_as_data_indications_until_the_channel_is_confirmed() {
    let Some(fp) = load() else { return };
    let ns = Netns::new();
    let mut f = Fixture::new(fp);
    for len in [0usize, 1, 2, 3, 4, 99, 1300] {
        let before = f.fp.stats();
        let (action, out) = ns.run(&f.fp, &from_peer(PEER, len));
        assert_eq!(action, XDP_TX, "{len}");
        let s = parse(&out);
        assert_eq!(s.dst_mac, CLIENT_MAC);
        assert_eq!(s.src, sa(SERVER, LISTEN_PORT));
        assert_eq!(s.dst, sa(CLIENT, CLIENT_PORT));
        check_data_indication(&s.payload, &data(len));
        assert_eq!(f.delta(&before, "relayed_data_down"), 1);
    }
    // The client has been sent its ChannelBind success: ChannelData from now on.
    let tuple = f.tuple;
    f.table.confirm_channels(&tuple);
    f.sync();
    for len in [0usize, 5, 100] {
        let before = f.fp.stats();
        let (action, out) = ns.run(&f.fp, &from_peer(PEER, len));
        assert_eq!(action, XDP_TX);
        let s = parse(&out);
        assert_eq!(s.payload, channel_data(CHANNEL, &data(len), &[]));
        assert_eq!(f.delta(&before, "relayed_channel_down"), 1);
    }
    // Another port of the permitted IP has no channel: a Data indication.
    let fr = frame(
        sa(PEER, PEER_PORT + 1),
        sa(SERVER, RELAY_PORT),
        &data(9),
        false,
    );
    let (action, out) = ns.run(&f.fp, &fr);
    assert_eq!(action, XDP_TX);
    assert_eq!(&parse(&out).payload[0..2], &[0x00, 0x17]);
}

#[test]
fn a_wildcard_listener_is_relayed_both_ways_from_the_routes_source() {
    let Some(fp) = load() else { return };
    let ns = Netns::new();
    let mut f = Fixture::new(fp);
    // The fixture's allocation, again, but through a listener on 0.0.0.0.
    f.apply(TableChange::AllocationRemove { id: f.id });
    let tuple = FiveTuple::udp(
        SocketAddr::V4(sa(CLIENT, CLIENT_PORT)),
        SocketAddr::V4(sa(Ipv4Addr::UNSPECIFIED, LISTEN_PORT)),
    );
    let id = AllocationId(9);
    f.apply(TableChange::AllocationAdd {
        id,
        tuple,
        relays: vec![SocketAddr::V4(sa(SERVER, RELAY_PORT))],
        deadline: Millis(f.now + 600_000),
        bandwidth: 0,
        user: "u".into(),
        username: "u".into(),
        dont_fragment: false,
    });
    f.apply(TableChange::PermissionSet {
        id,
        peer: PEER.into(),
        deadline: Millis(f.now + 300_000),
    });
    f.apply(TableChange::ChannelSet {
        id,
        channel: CHANNEL,
        peer: SocketAddr::V4(sa(PEER, PEER_PORT)),
        deadline: Millis(f.now + 600_000),
        confirmed: false,
    });
    // Client to peer: as for a specific listener.
    let (action, out) = ns.run(&f.fp, &up_channel(50, &[], false));
    assert_eq!(action, XDP_TX);
    assert_eq!(parse(&out).src, sa(SERVER, RELAY_PORT));
    // Peer to client, twice (the second from the kept next hop): from the address the
    // route to the client prefers, which is what the workers' wildcard socket sends
    // from; the UDP checksum covers it.
    for _ in 0..2 {
        let before = f.fp.stats();
        let (action, out) = ns.run(&f.fp, &from_peer(PEER, 30));
        assert_eq!(action, XDP_TX);
        let s = parse(&out);
        assert_eq!(s.src, sa(SERVER, LISTEN_PORT));
        assert_eq!(s.dst, sa(CLIENT, CLIENT_PORT));
        check_data_indication(&s.payload, &data(30));
        assert_eq!(f.delta(&before, "relayed_data_down"), 1);
    }
}

#[test]
fn frames_the_program_passes() {
    let Some(fp) = load() else { return };
    let ns = Netns::new();
    let f = Fixture::new(fp);
    let good = up_channel(20, &[], false);
    let mut options = good.clone();
    options[14] = 0x46;
    let mut fragment = good.clone();
    fragment[20] = 0x20; // MF
    let mut offset = good.clone();
    offset[21] = 0x10;
    let mut tcp = good.clone();
    tcp[23] = 6;
    let mut v6 = good.clone();
    v6[12..14].copy_from_slice(&[0x86, 0xdd]);
    let mut short_udp = good.clone();
    short_udp[39] = 200; // UDP length beyond the frame
    let stranger = from_peer(STRANGER, 10);
    for (reason, fr) in [
        ("ip_options", options),
        ("fragment", fragment),
        ("fragment", offset),
        ("not_udp", tcp),
        ("not_udp", v6),
        ("malformed", short_udp),
        ("no_entry", stranger),
        ("malformed", good[..40].to_vec()),
    ] {
        let before = f.fp.stats();
        let (action, _) = ns.run(&f.fp, &fr);
        assert_eq!(action, XDP_PASS, "{reason}");
        assert_eq!(f.delta(&before, reason), 1, "{reason}");
    }
}

#[test]
fn removals_stop_forwarding_at_once() {
    let Some(fp) = load() else { return };
    let ns = Netns::new();
    let mut f = Fixture::new(fp);
    let send = send_ind(&[(0x0012, xor_peer(sa(PEER, PEER_PORT))), (0x0013, data(10))]);
    assert_eq!(ns.run(&f.fp, &up_channel(10, &[], false)).0, XDP_TX);
    assert_eq!(ns.run(&f.fp, &send).0, XDP_TX);
    assert_eq!(ns.run(&f.fp, &from_peer(PEER, 10)).0, XDP_TX);

    f.apply(TableChange::ChannelRemove {
        id: f.id,
        channel: CHANNEL,
    });
    assert_eq!(ns.run(&f.fp, &up_channel(10, &[], false)).0, XDP_PASS);
    assert_eq!(ns.run(&f.fp, &send).0, XDP_TX);

    f.apply(TableChange::PermissionRemove {
        id: f.id,
        peer: PEER.into(),
    });
    assert_eq!(ns.run(&f.fp, &send).0, XDP_PASS);
    assert_eq!(ns.run(&f.fp, &from_peer(PEER, 10)).0, XDP_PASS);

    // Permission back; then a Refresh with lifetime 0 (the deadline is now).
    f.apply(TableChange::PermissionSet {
        id: f.id,
        peer: PEER.into(),
        deadline: Millis(f.now + 300_000),
    });
    assert_eq!(ns.run(&f.fp, &send).0, XDP_TX);
    f.apply(TableChange::AllocationRefresh {
        id: f.id,
        deadline: Millis(f.now),
    });
    assert_eq!(ns.run(&f.fp, &send).0, XDP_PASS);
    assert_eq!(ns.run(&f.fp, &from_peer(PEER, 10)).0, XDP_PASS);
    assert_eq!(f.mirror.installed(), 0);

    // A new allocation, then removed: its entries are gone.
    f.apply(TableChange::AllocationRefresh {
        id: f.id,
        deadline: Millis(f.now + 60_000),
    });
    assert_eq!(ns.run(&f.fp, &send).0, XDP_TX);
    f.apply(TableChange::AllocationRemove { id: f.id });
    assert_eq!(ns.run(&f.fp, &send).0, XDP_PASS);
    assert_eq!(f.mirror.installed(), 0);
    assert_eq!(f.mirror.allocs.keys().count(), 0);
    assert_eq!(f.mirror.perms.keys().count(), 0);
    assert_eq!(f.mirror.chans.keys().count(), 0);
    assert_eq!(f.mirror.peers.keys().count(), 0);
}

#[test]
fn an_allocation_that_does_not_fit_stays_on_the_socket_path() {
    // Room for two permissions: the fixture's allocation takes one.
    let Some(fp) = load_with(&[("tp_perms", 2)]) else {
        return;
    };
    let ns = Netns::new();
    let mut f = Fixture::new(fp);
    let other_port = CLIENT_PORT + 1;
    let other = AllocationId(8);
    // The second allocation's second permission does not fit: it loses all its
    // entries (none stay half-installed) and its packets go to the workers.
    f.add_second(other, other_port, &[PEER, STRANGER]);
    assert_eq!(f.mirror.installed(), 1);
    assert_eq!(f.mirror.perms.keys().count(), 1);
    assert_eq!(f.mirror.allocs.keys().count(), 1);
    let before = f.fp.stats();
    assert_eq!(ns.run(&f.fp, &send_from(other_port)).0, XDP_PASS);
    assert_eq!(f.delta(&before, "no_entry"), 1);
    // The first is untouched.
    assert_eq!(ns.run(&f.fp, &send_from(CLIENT_PORT)).0, XDP_TX);

    // With room again (the first allocation gone), the next change installs it.
    f.apply(TableChange::AllocationRemove { id: f.id });
    assert_eq!(ns.run(&f.fp, &send_from(CLIENT_PORT)).0, XDP_PASS);
    f.apply(TableChange::AllocationRefresh {
        id: other,
        deadline: Millis(f.now + 600_000),
    });
    assert_eq!(f.mirror.installed(), 1);
    assert_eq!(f.mirror.perms.keys().count(), 2);
    assert_eq!(ns.run(&f.fp, &send_from(other_port)).0, XDP_TX);
}

#[test]
fn an_allocation_without_a_usage_slot_stays_on_the_socket_path() {
    // One usage slot: the fixture's allocation takes it.
    let Some(fp) = load_with(&[("tp_usage", 1)]) else {
        return;
    };
    let ns = Netns::new();
    let mut f = Fixture::new(fp);
    assert_eq!(f.mirror.installed(), 1);
    let other_port = CLIENT_PORT + 1;
    let other = AllocationId(8);
    f.add_second(other, other_port, &[PEER]);
    // No slot, no entries: nothing it relays could go uncounted.
    assert_eq!(f.mirror.installed(), 1);
    assert_eq!(f.mirror.allocs.keys().count(), 1);
    assert_eq!(ns.run(&f.fp, &send_from(other_port)).0, XDP_PASS);
    assert_eq!(ns.run(&f.fp, &send_from(CLIENT_PORT)).0, XDP_TX);
    // The slot freed by the first allocation's end goes to the next change.
    f.apply(TableChange::AllocationRemove { id: f.id });
    f.apply(TableChange::AllocationRefresh {
        id: other,
        deadline: Millis(f.now + 600_000),
    });
    assert_eq!(f.mirror.installed(), 1);
    assert_eq!(ns.run(&f.fp, &send_from(other_port)).0, XDP_TX);
}

/// How long the program keeps a next hop it looked up.
const HOP_TTL: Duration = Duration::from_nanos(abi::TP_HOP_TTL_NS);

#[test]
fn next_hops_are_kept_for_at_most_their_ttl_and_checked_against_the_mtu() {
    let Some(fp) = load() else { return };
    let ns = Netns::new();
    let f = Fixture::new(fp);
    let n = ns.name.as_str();
    let (action, out) = ns.run(&f.fp, &up_channel(100, &[], false));
    assert_eq!(action, XDP_TX);
    assert_eq!(parse(&out).dst_mac, PEER_MAC);

    // The peer's MAC changes: the hop the program keeps is used until its TTL ends,
    // then the new one.
    let new_mac = [2, 0, 0, 0, 0, 0x33];
    ip(&[
        "-n",
        n,
        "neigh",
        "replace",
        "10.77.0.3",
        "lladdr",
        "02:00:00:00:00:33",
        "dev",
        "xa",
        "nud",
        "permanent",
    ]);
    let t0 = monotonic_ns();
    let (_, out) = ns.run(&f.fp, &up_channel(100, &[], false));
    if monotonic_ns() - t0 < HOP_TTL.as_nanos() as u64 / 2 {
        assert_eq!(parse(&out).dst_mac, PEER_MAC, "the kept hop");
    }
    std::thread::sleep(HOP_TTL + Duration::from_millis(20));
    let (action, out) = ns.run(&f.fp, &up_channel(100, &[], false));
    assert_eq!(action, XDP_TX);
    assert_eq!(parse(&out).dst_mac, new_mac, "the hop after its TTL");

    // A packet larger than any the kept hop was looked up for is checked against the
    // MTU again (a smaller one still uses it).
    ip(&["-n", n, "link", "set", "xa", "mtu", "300"]);
    let before = f.fp.stats();
    assert_eq!(ns.run(&f.fp, &up_channel(400, &[], false)).0, XDP_PASS);
    assert_eq!(f.delta(&before, "too_big"), 1);
    assert_eq!(ns.run(&f.fp, &up_channel(100, &[], false)).0, XDP_TX);

    // The neighbour is gone: relayed no longer than the TTL.
    ip(&["-n", n, "neigh", "del", "10.77.0.3", "dev", "xa"]);
    std::thread::sleep(HOP_TTL + Duration::from_millis(20));
    let before = f.fp.stats();
    assert_eq!(ns.run(&f.fp, &up_channel(100, &[], false)).0, XDP_PASS);
    assert_eq!(f.delta(&before, "no_route"), 1);
}

#[test]
fn a_permission_expires_in_the_program_at_its_deadline() {
    let Some(fp) = load() else { return };
    let ns = Netns::new();
    let mut f = Fixture::new(fp);
    f.apply(TableChange::PermissionSet {
        id: f.id,
        peer: PEER.into(),
        deadline: Millis(f.now + 400),
    });
    assert_eq!(ns.run(&f.fp, &from_peer(PEER, 10)).0, XDP_TX);
    assert_eq!(ns.run(&f.fp, &up_channel(10, &[], false)).0, XDP_TX);
    std::thread::sleep(Duration::from_millis(600));
    // No sync since: the deadline in the map did it.
    let before = f.fp.stats();
    assert_eq!(ns.run(&f.fp, &from_peer(PEER, 10)).0, XDP_PASS);
    assert_eq!(ns.run(&f.fp, &up_channel(10, &[], false)).0, XDP_PASS);
    assert_eq!(f.delta(&before, "expired"), 2);
}

#[test]
fn what_the_program_relays_is_merged_into_usage() {
    let Some(fp) = load() else { return };
    let ns = Netns::new();
    let mut f = Fixture::new(fp);
    for _ in 0..5 {
        assert_eq!(ns.run(&f.fp, &up_channel(100, &[], false)).0, XDP_TX);
    }
    for _ in 0..3 {
        assert_eq!(ns.run(&f.fp, &from_peer(PEER, 40)).0, XDP_TX);
    }
    f.mirror.collect(&mut f.table.allocs);
    let u = f.table.allocs[&f.id].usage;
    assert_eq!((u.to_peer.packets, u.to_peer.bytes), (5, 500));
    assert_eq!((u.to_client.packets, u.to_client.bytes), (3, 120));
    // Merged once: a second collect adds nothing.
    f.mirror.collect(&mut f.table.allocs);
    assert_eq!(f.table.allocs[&f.id].usage, u);
}

#[test]
fn limited_allocations_get_no_entries_and_own_ports_are_refused() {
    let Some(fp) = load() else { return };
    let f = Fixture::with(fp, 1_000_000, Denied::default());
    assert_eq!(f.mirror.installed(), 0);
    assert_eq!(f.mirror.allocs.keys().count(), 0);

    let Some(fp) = load() else { return };
    // The peer's IP is one of the server's own (on another port): its permission is
    // written (another client's relayed address there is a peer like any other), and
    // the program refuses what comes from, or goes to, the port of the server's own
    // socket.
    let denied = Denied::new([SocketAddr::V4(sa(PEER, 3478))]);
    let f = Fixture::with(fp, 0, denied);
    f.fp.set_denied(&f.denied).unwrap();
    assert_eq!(f.mirror.installed(), 1);
    assert_eq!(f.mirror.perms.keys().count(), 1);
    assert_eq!(f.mirror.chans.keys().count(), 1);
    let ns = Netns::new();
    let before = f.fp.stats();
    let own = frame(sa(PEER, 3478), sa(SERVER, RELAY_PORT), &data(10), false);
    assert_eq!(ns.run(&f.fp, &own).0, XDP_PASS);
    assert_eq!(f.delta(&before, "denied_port"), 1);
}

#[test]
fn a_tcp_allocation_takes_no_slot() {
    let Some(fp) = load() else { return };
    let fp = Arc::new(fp);
    let mut m = fp.mirror().unwrap();
    let mut table = Table::default();
    table.track = true;
    let now = unix_ms();
    let tuple = FiveTuple {
        transport: crate::Transport::Tcp,
        ..FiveTuple::udp(
            SocketAddr::V4(sa(CLIENT, CLIENT_PORT)),
            SocketAddr::V4(sa(SERVER, LISTEN_PORT)),
        )
    };
    let mut out = Vec::new();
    for i in 0..3 {
        table.apply(
            0,
            now,
            TableChange::AllocationAdd {
                id: AllocationId(i),
                tuple,
                relays: vec![SocketAddr::V4(sa(SERVER, RELAY_PORT))],
                deadline: Millis(now + 600_000),
                bandwidth: 0,
                user: "u".into(),
                username: "u".into(),
                dont_fragment: false,
            },
            &Denied::default(),
            &Counters::default(),
            &mut out,
        );
        m.sync(
            AllocationId(i),
            table.allocs.get_mut(&AllocationId(i)),
            &Denied::default(),
            now,
        );
    }
    assert_eq!(m.installed(), 0);
    let slots = fp.slots.lock().unwrap();
    assert_eq!(slots.next, 0, "no slot taken");
}

#[test]
fn ethernet_padding_is_cut_and_dont_fragment_is_kept() {
    let Some(fp) = load() else { return };
    let ns = Netns::new();
    let mut f = Fixture::new(fp);
    // A short frame padded to Ethernet's 60 bytes: the IP length rules.
    let mut fr = up_channel(3, &[0], false);
    let real = fr.len();
    fr.resize(60, 0xee);
    assert!(real < 60);
    let (action, out) = ns.run(&f.fp, &fr);
    assert_eq!(action, XDP_TX);
    let s = parse(&out);
    assert_eq!(s.payload, data(3));
    assert!(!s.dont_fragment);
    let mut fr = from_peer(PEER, 2);
    fr.resize(60, 0xee);
    let (action, out) = ns.run(&f.fp, &fr);
    assert_eq!(action, XDP_TX);
    check_data_indication(&parse(&out).payload, &data(2));

    // An allocation that asked for DONT-FRAGMENT sends with DF set.
    f.apply(TableChange::AllocationAdd {
        id: AllocationId(3),
        tuple: f.tuple,
        relays: vec![SocketAddr::V4(sa(SERVER, RELAY_PORT + 1))],
        deadline: Millis(f.now + 600_000),
        bandwidth: 0,
        user: "u".into(),
        username: "u".into(),
        dont_fragment: true,
    });
    // A lower id than the one it replaces: the old entries (same client key, same
    // channel number) are deleted before the new ones are written.
    f.id = AllocationId(3);
    assert_eq!(
        f.mirror.allocs.keys().count(),
        1,
        "the new client entry survives"
    );
    f.apply(TableChange::PermissionSet {
        id: f.id,
        peer: PEER.into(),
        deadline: Millis(f.now + 300_000),
    });
    f.apply(TableChange::ChannelSet {
        id: f.id,
        channel: CHANNEL,
        peer: SocketAddr::V4(sa(PEER, PEER_PORT)),
        deadline: Millis(f.now + 600_000),
        confirmed: false,
    });
    let (action, out) = ns.run(&f.fp, &up_channel(50, &[], false));
    assert_eq!(action, XDP_TX);
    let s = parse(&out);
    assert!(s.dont_fragment);
    assert_eq!(s.src, sa(SERVER, RELAY_PORT + 1));
    // The replaced allocation's entries went with it; the new one's are all there.
    assert_eq!(f.mirror.installed(), 1);
    assert_eq!(f.mirror.allocs.keys().count(), 1);
    assert_eq!(f.mirror.chans.keys().count(), 1);
    let to_new = frame(
        sa(PEER, PEER_PORT),
        sa(SERVER, RELAY_PORT + 1),
        &data(10),
        false,
    );
    assert_eq!(ns.run(&f.fp, &to_new).0, XDP_TX);
    // The old relayed address is gone.
    assert_eq!(ns.run(&f.fp, &from_peer(PEER, 10)).0, XDP_PASS);
}

// ---- IPv6 (RFC 6156) ----------------------------------------------------------------

use std::net::{Ipv6Addr, SocketAddrV6};

const SERVER6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 3);

fn sa6(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}

fn udp6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, udp: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(udp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    let c = !fold(sum(udp, sum(&pseudo, 0)));
    if c == 0 { 0xffff } else { c }
}

fn frame6(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[2, 0, 0, 0, 0, 0xaa]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x86, 0xdd]);
    let ulen = 8 + payload.len();
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(ulen as u16).to_be_bytes());
    f.extend_from_slice(&[17, 64]);
    f.extend_from_slice(&src.ip().octets());
    f.extend_from_slice(&dst.ip().octets());
    let mut udp = Vec::new();
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&(ulen as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let c = udp6_checksum(src.ip(), dst.ip(), &udp);
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&udp);
    f
}

#[derive(Debug)]
struct Sent6 {
    dst_mac: [u8; 6],
    src: SocketAddrV6,
    dst: SocketAddrV6,
    hop_limit: u8,
    payload: Vec<u8>,
}

fn parse6(f: &[u8]) -> Sent6 {
    assert_eq!(&f[12..14], &[0x86, 0xdd]);
    let ip = &f[14..54];
    assert_eq!(ip[0] >> 4, 6);
    assert_eq!(ip[6], 17);
    let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    assert_eq!(plen, f.len() - 54, "IPv6 payload length");
    let src: [u8; 16] = ip[8..24].try_into().unwrap();
    let dst: [u8; 16] = ip[24..40].try_into().unwrap();
    let (src, dst) = (Ipv6Addr::from(src), Ipv6Addr::from(dst));
    let udp = &f[54..];
    assert_eq!(usize::from(u16::from_be_bytes([udp[4], udp[5]])), udp.len());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(udp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    assert_ne!(
        u16::from_be_bytes([udp[6], udp[7]]),
        0,
        "a UDP checksum over IPv6"
    );
    assert_eq!(fold(sum(udp, sum(&pseudo, 0))), 0xffff, "UDP checksum");
    Sent6 {
        dst_mac: f[0..6].try_into().unwrap(),
        src: sa6(src, u16::from_be_bytes([udp[0], udp[1]])),
        dst: sa6(dst, u16::from_be_bytes([udp[2], udp[3]])),
        hop_limit: ip[7],
        payload: udp[8..].to_vec(),
    }
}

/// XOR-PEER-ADDRESS of an IPv6 peer in a message with transaction id `tid`.
fn xor_peer6(a: SocketAddrV6, tid: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 2];
    v.extend_from_slice(&(a.port() ^ 0x2112).to_be_bytes());
    let mut mask = 0x2112_A442u32.to_be_bytes().to_vec();
    mask.extend_from_slice(tid);
    v.extend(a.ip().octets().iter().zip(&mask).map(|(b, m)| b ^ m));
    v
}

/// An IPv6 allocation (client [fd77::2]:5000 → [fd77::1]:3478, relayed address
/// [fd77::1]:50000) with a permission for fd77::3 and a channel to [fd77::3]:7000.
fn fixture6(fp: FastPath) -> Fixture {
    fixture6_on(fp, SERVER6)
}

/// [`fixture6`] with a listener on `listen` (`::`: a wildcard listener).
fn fixture6_on(fp: FastPath, listen: Ipv6Addr) -> Fixture {
    let fp = Arc::new(fp);
    let mirror = fp.mirror().unwrap();
    let now = unix_ms();
    let tuple = FiveTuple::udp(
        SocketAddr::V6(sa6(CLIENT6, CLIENT_PORT)),
        SocketAddr::V6(sa6(listen, LISTEN_PORT)),
    );
    let mut f = Fixture {
        fp,
        mirror,
        table: Table::default(),
        denied: Denied::default(),
        ctr: Counters::default(),
        id: AllocationId(9),
        tuple,
        now,
    };
    f.table.track = true;
    f.apply(TableChange::AllocationAdd {
        id: f.id,
        tuple,
        relays: vec![SocketAddr::V6(sa6(SERVER6, RELAY_PORT))],
        deadline: Millis(now + 600_000),
        bandwidth: 0,
        user: "u".into(),
        username: "u".into(),
        dont_fragment: false,
    });
    f.apply(TableChange::PermissionSet {
        id: f.id,
        peer: PEER6.into(),
        deadline: Millis(now + 300_000),
    });
    f.apply(TableChange::ChannelSet {
        id: f.id,
        channel: CHANNEL,
        peer: SocketAddr::V6(sa6(PEER6, PEER_PORT)),
        deadline: Millis(now + 600_000),
        confirmed: false,
    });
    f
}

#[test]
fn ipv6_allocations_are_relayed_both_ways() {
    let Some(fp) = load() else { return };
    let ns = Netns::new();
    let mut f = fixture6(fp);
    let client = sa6(CLIENT6, CLIENT_PORT);
    let listen = sa6(SERVER6, LISTEN_PORT);
    let relay = sa6(SERVER6, RELAY_PORT);
    let peer = sa6(PEER6, PEER_PORT);
    for (len, pad) in [(100usize, &[][..]), (101, &[0, 0, 0][..]), (0, &[][..])] {
        let before = f.fp.stats();
        let fr = frame6(client, listen, &channel_data(CHANNEL, &data(len), pad));
        let (action, out) = ns.run(&f.fp, &fr);
        assert_eq!(action, XDP_TX, "ChannelData {len}");
        let s = parse6(&out);
        assert_eq!(s.dst_mac, PEER_MAC);
        assert_eq!((s.src, s.dst, s.hop_limit), (relay, peer, 64));
        assert_eq!(s.payload, data(len));
        assert_eq!(f.delta(&before, "relayed_channel_up"), 1);
    }
    for len in [1usize, 2, 3, 4, 333] {
        let m = stun(
            0x0016,
            &[
                (0x0013, data(len)),
                (0x0012, xor_peer6(peer, &[7; 12])),
                (0x8028, vec![1, 2, 3, 4]),
            ],
        );
        let (action, out) = ns.run(&f.fp, &frame6(client, listen, &m));
        assert_eq!(action, XDP_TX, "Send {len}");
        let s = parse6(&out);
        assert_eq!((s.src, s.dst), (relay, peer));
        assert_eq!(s.payload, data(len));
    }
    for len in [0usize, 1, 2, 3, 77] {
        let (action, out) = ns.run(&f.fp, &frame6(peer, relay, &data(len)));
        assert_eq!(action, XDP_TX, "from the peer {len}");
        let s = parse6(&out);
        assert_eq!(s.dst_mac, CLIENT_MAC);
        assert_eq!((s.src, s.dst), (listen, client));
        let m = &s.payload;
        assert_eq!(&m[0..2], &[0x00, 0x17]);
        assert_eq!(usize::from(u16::from_be_bytes([m[2], m[3]])) + 20, m.len());
        assert_eq!(m.len() % 4, 0);
        assert_eq!(&m[20..24], &[0x00, 0x12, 0x00, 0x14]);
        assert_eq!(&m[24..44], &xor_peer6(peer, &m[8..20])[..]);
        assert_eq!(&m[44..46], &[0x00, 0x13]);
        assert_eq!(&m[48..48 + len], &data(len)[..]);
    }
    let tuple = f.tuple;
    f.table.confirm_channels(&tuple);
    f.sync();
    let (action, out) = ns.run(&f.fp, &frame6(peer, relay, &data(9)));
    assert_eq!(action, XDP_TX);
    assert_eq!(parse6(&out).payload, channel_data(CHANNEL, &data(9), &[]));

    // A peer without a permission, and a removal.
    let stranger = sa6(Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 4), PEER_PORT);
    assert_eq!(
        ns.run(&f.fp, &frame6(stranger, relay, &data(9))).0,
        XDP_PASS
    );
    f.apply(TableChange::AllocationRemove { id: f.id });
    assert_eq!(ns.run(&f.fp, &frame6(peer, relay, &data(9))).0, XDP_PASS);
    assert_eq!(f.mirror.allocs6.keys().count(), 0);
    assert_eq!(f.mirror.perms6.keys().count(), 0);
    assert_eq!(f.mirror.chans6.keys().count(), 0);
    assert_eq!(f.mirror.peers6.keys().count(), 0);
}

#[test]
fn mixed_family_allocations_get_no_entries() {
    let Some(fp) = load() else { return };
    let fp = Arc::new(fp);
    let mut m = fp.mirror().unwrap();
    let mut table = Table::default();
    table.track = true;
    let now = unix_ms();
    let mut out = Vec::new();
    // An IPv4 client whose relayed address is IPv6 (REQUESTED-ADDRESS-FAMILY).
    table.apply(
        0,
        now,
        TableChange::AllocationAdd {
            id: AllocationId(1),
            tuple: FiveTuple::udp(
                SocketAddr::V4(sa(CLIENT, CLIENT_PORT)),
                SocketAddr::V4(sa(SERVER, LISTEN_PORT)),
            ),
            relays: vec![SocketAddr::V6(sa6(SERVER6, RELAY_PORT))],
            deadline: Millis(now + 600_000),
            bandwidth: 0,
            user: "u".into(),
            username: "u".into(),
            dont_fragment: false,
        },
        &Denied::default(),
        &Counters::default(),
        &mut out,
    );
    m.sync(
        AllocationId(1),
        table.allocs.get_mut(&AllocationId(1)),
        &Denied::default(),
        now,
    );
    assert_eq!(m.installed(), 0);
}

#[test]
fn an_ipv6_wildcard_listener_is_relayed_both_ways_from_the_routes_source() {
    let Some(fp) = load() else { return };
    let ns = Netns::new();
    let mut f = fixture6_on(fp, Ipv6Addr::UNSPECIFIED);
    assert_eq!(f.mirror.installed(), 1);
    let client = sa6(CLIENT6, CLIENT_PORT);
    let listen = sa6(SERVER6, LISTEN_PORT);
    let relay = sa6(SERVER6, RELAY_PORT);
    let peer = sa6(PEER6, PEER_PORT);
    // Up: ChannelData and a Send indication, sent to the address the client uses.
    let (action, out) = ns.run(
        &f.fp,
        &frame6(client, listen, &channel_data(CHANNEL, &data(40), &[])),
    );
    assert_eq!(action, XDP_TX);
    assert_eq!((parse6(&out).src, parse6(&out).dst), (relay, peer));
    let m = stun(
        0x0016,
        &[(0x0012, xor_peer6(peer, &[7; 12])), (0x0013, data(8))],
    );
    let (action, out) = ns.run(&f.fp, &frame6(client, listen, &m));
    assert_eq!(action, XDP_TX);
    assert_eq!(parse6(&out).payload, data(8));
    // Down, twice (the second from the kept next hop): from the route's preferred
    // source, fd77::1, with the checksum over it (parse6 checks it).
    for _ in 0..2 {
        let (action, out) = ns.run(&f.fp, &frame6(peer, relay, &data(13)));
        assert_eq!(action, XDP_TX);
        let s = parse6(&out);
        assert_eq!((s.src, s.dst), (listen, client));
        assert_eq!(&s.payload[0..2], &[0x00, 0x17]);
    }
    let tuple = f.tuple;
    f.table.confirm_channels(&tuple);
    f.sync();
    let (action, out) = ns.run(&f.fp, &frame6(peer, relay, &data(9)));
    assert_eq!(action, XDP_TX);
    let s = parse6(&out);
    assert_eq!((s.src, s.dst), (listen, client));
    assert_eq!(s.payload, channel_data(CHANNEL, &data(9), &[]));
}

/// `f` (an IPv4 or IPv6 frame with a complete UDP checksum) as a sender on this host
/// hands it to a veth with transmit checksum offload (CHECKSUM_PARTIAL): the UDP
/// checksum field holds the pseudo-header's sum alone, not complemented, for the
/// "hardware" to complete.
fn partial(f: &[u8]) -> Vec<u8> {
    let mut f = f.to_vec();
    let (pseudo, at) = if f[12..14] == [0x08, 0x00] {
        let udp_len = u16::from_be_bytes([f[38], f[39]]);
        let mut p = f[26..34].to_vec();
        p.extend_from_slice(&[0, 17]);
        p.extend_from_slice(&udp_len.to_be_bytes());
        (p, 40)
    } else {
        let udp_len = u16::from_be_bytes([f[58], f[59]]);
        let mut p = f[22..54].to_vec();
        p.extend_from_slice(&u32::from(udp_len).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 17]);
        (p, 60)
    };
    let c = fold(sum(&pseudo, 0));
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
fn partial_checksums_from_senders_on_this_host_are_completed() {
    // Issue #25 N9: a veth's transmit checksum offload (its default) leaves a partial
    // checksum; updated incrementally, it went out wrong and the peer dropped it.
    let Some(fp) = load() else { return };
    let ns = Netns::new();
    let mut f = Fixture::new(fp);
    // Lengths around the 256-byte chunks the program sums in, odd and even.
    let lens = [
        0usize,
        1,
        2,
        3,
        99,
        100,
        243,
        244,
        245,
        500,
        501,
        1300,
        1472 - 8,
    ];
    for &len in &lens {
        let before = f.fp.stats();
        let (action, out) = ns.run(&f.fp, &partial(&up_channel(len, &[], false)));
        assert_eq!(action, XDP_TX, "ChannelData {len}");
        let s = parse(&out); // checks the UDP checksum
        assert_ne!(s.udp_csum, 0);
        assert_eq!(s.payload, data(len), "ChannelData {len}");
        assert_eq!(f.delta(&before, "csum_completed"), 1);
        assert_eq!(f.delta(&before, "relayed_channel_up"), 1);

        let ind = send_ind(&[(0x0012, xor_peer(sa(PEER, PEER_PORT))), (0x0013, data(len))]);
        let (action, out) = ns.run(&f.fp, &partial(&ind));
        assert_eq!(action, XDP_TX, "Send {len}");
        assert_eq!(parse(&out).payload, data(len), "Send {len}");

        // A Data indication adds 36 bytes: the largest datagram would not fit the MTU.
        let len = len.min(1400);
        let (action, out) = ns.run(&f.fp, &partial(&from_peer(PEER, len)));
        assert_eq!(action, XDP_TX, "Data {len}");
        check_data_indication(&parse(&out).payload, &data(len));
    }
    // A complete checksum is updated as before, not counted.
    let before = f.fp.stats();
    let (_, out) = ns.run(&f.fp, &up_channel(100, &[], false));
    parse(&out);
    assert_eq!(f.delta(&before, "csum_completed"), 0);

    let tuple = f.tuple;
    f.table.confirm_channels(&tuple);
    f.sync();
    for &len in &lens {
        let (action, out) = ns.run(&f.fp, &partial(&from_peer(PEER, len)));
        assert_eq!(action, XDP_TX, "ChannelData down {len}");
        assert_eq!(
            parse(&out).payload,
            channel_data(CHANNEL, &data(len), &[]),
            "ChannelData down {len}"
        );
    }
}

#[test]
fn partial_ipv6_checksums_are_completed() {
    let Some(fp) = load() else { return };
    let ns = Netns::new();
    let mut f = fixture6(fp);
    let client = sa6(CLIENT6, CLIENT_PORT);
    let listen = sa6(SERVER6, LISTEN_PORT);
    let relay = sa6(SERVER6, RELAY_PORT);
    let peer = sa6(PEER6, PEER_PORT);
    let lens = [0usize, 1, 3, 100, 243, 244, 257, 1000, 1452 - 8];
    for &len in &lens {
        let before = f.fp.stats();
        let fr = frame6(client, listen, &channel_data(CHANNEL, &data(len), &[]));
        let (action, out) = ns.run(&f.fp, &partial(&fr));
        assert_eq!(action, XDP_TX, "ChannelData {len}");
        let s = parse6(&out); // checks the UDP checksum
        assert_eq!((s.src, s.dst), (relay, peer));
        assert_eq!(s.payload, data(len));
        assert_eq!(f.delta(&before, "csum_completed"), 1);

        let m = stun(
            0x0016,
            &[(0x0012, xor_peer6(peer, &[7; 12])), (0x0013, data(len))],
        );
        let (action, out) = ns.run(&f.fp, &partial(&frame6(client, listen, &m)));
        assert_eq!(action, XDP_TX, "Send {len}");
        assert_eq!(parse6(&out).payload, data(len));

        // A Data indication adds 48 bytes: the largest datagram would not fit the MTU.
        let len = len.min(1380);
        let (action, out) = ns.run(&f.fp, &partial(&frame6(peer, relay, &data(len))));
        assert_eq!(action, XDP_TX, "Data {len}");
        let s = parse6(&out);
        assert_eq!((s.src, s.dst), (listen, client));
        assert_eq!(&s.payload[48..48 + len], &data(len)[..]);
    }
    let tuple = f.tuple;
    f.table.confirm_channels(&tuple);
    f.sync();
    for &len in &lens {
        let (action, out) = ns.run(&f.fp, &partial(&frame6(peer, relay, &data(len))));
        assert_eq!(action, XDP_TX, "ChannelData down {len}");
        assert_eq!(parse6(&out).payload, channel_data(CHANNEL, &data(len), &[]));
    }
}

// ---- The hairpin: both ends of a call on this relay ---------------------------------

/// A Data indication's XOR-PEER-ADDRESS (IPv4) and data, its lengths and padding checked.
fn data_indication_from(msg: &[u8]) -> (SocketAddrV4, Vec<u8>) {
    assert_eq!(&msg[0..2], &[0x00, 0x17]);
    let mlen = usize::from(u16::from_be_bytes([msg[2], msg[3]]));
    assert_eq!(mlen + 20, msg.len());
    assert_eq!(msg.len() % 4, 0);
    assert_eq!(&msg[4..8], &0x2112_A442u32.to_be_bytes());
    assert_eq!(&msg[20..24], &[0x00, 0x12, 0x00, 0x08]);
    let port = u16::from_be_bytes([msg[26], msg[27]]) ^ 0x2112;
    let ip = u32::from_be_bytes(msg[28..32].try_into().unwrap()) ^ 0x2112_A442;
    assert_eq!(&msg[32..34], &[0x00, 0x13]);
    let n = usize::from(u16::from_be_bytes([msg[34], msg[35]]));
    assert!(msg[36 + n..].iter().all(|&b| b == 0), "padding");
    (sa(Ipv4Addr::from(ip), port), msg[36..36 + n].to_vec())
}

/// A second worker's table and mirror, for allocation B of a hairpin.
struct Worker2 {
    mirror: Mirror,
    table: Table,
}

impl Worker2 {
    fn apply(&mut self, f: &Fixture, c: TableChange) {
        let mut out: Vec<Output> = Vec::new();
        self.table.apply(1, f.now, c, &f.denied, &f.ctr, &mut out);
        let mut touched = std::mem::take(&mut self.table.touched);
        self.mirror
            .sync_all(&mut touched, &mut self.table.allocs, &f.denied, f.now);
    }
}

#[test]
fn a_hairpin_is_delivered_by_the_program_to_the_other_client() {
    let Some(fp) = load() else { return };
    let ns = Netns::new();
    // The server listens on 10.77.0.1:3478, and relays from that IP: A's peer is B's
    // relayed address 10.77.0.1:50001 and B's is A's, 10.77.0.1:50000. B lives on
    // another worker (its own table and mirror): the maps are shared.
    let denied = Denied::new([SocketAddr::V4(sa(SERVER, LISTEN_PORT))]);
    let mut f = Fixture::with(fp, 0, denied);
    f.fp.set_denied(&f.denied).unwrap();
    let relay_a = sa(SERVER, RELAY_PORT);
    let relay_b = sa(SERVER, RELAY_PORT + 1);
    let client_b = sa(CLIENT, CLIENT_PORT + 1);
    let id_b = AllocationId(8);
    let mut w2 = Worker2 {
        mirror: f.fp.mirror().unwrap(),
        table: Table::default(),
    };
    w2.table.track = true;
    w2.apply(
        &f,
        TableChange::AllocationAdd {
            id: id_b,
            tuple: FiveTuple::udp(
                SocketAddr::V4(client_b),
                SocketAddr::V4(sa(SERVER, LISTEN_PORT)),
            ),
            relays: vec![SocketAddr::V4(relay_b)],
            deadline: Millis(f.now + 600_000),
            bandwidth: 0,
            user: "u".into(),
            username: "u".into(),
            dont_fragment: false,
        },
    );
    f.apply(TableChange::PermissionSet {
        id: f.id,
        peer: SERVER.into(),
        deadline: Millis(f.now + 300_000),
    });
    f.apply(TableChange::ChannelSet {
        id: f.id,
        channel: 0x4002,
        peer: SocketAddr::V4(relay_b),
        deadline: Millis(f.now + 600_000),
        confirmed: false,
    });
    let to_b = |len: usize, pad: &[u8], no_csum: bool| {
        frame(
            sa(CLIENT, CLIENT_PORT),
            sa(SERVER, LISTEN_PORT),
            &channel_data(0x4002, &data(len), pad),
            no_csum,
        )
    };
    let send_to_b = |len: usize| {
        let m = stun(
            0x0016,
            &[
                (0x0012, xor_peer(relay_b)),
                (0x0013, data(len)),
                (0x8028, vec![1, 2, 3, 4]),
            ],
        );
        frame(sa(CLIENT, CLIENT_PORT), sa(SERVER, LISTEN_PORT), &m, false)
    };

    // B has no permission for A's relayed IP: the program does not deliver it (the
    // workers then refuse it, as B's relay socket would).
    let before = f.fp.stats();
    assert_eq!(ns.run(&f.fp, &to_b(10, &[], false)).0, XDP_PASS);
    assert_eq!(ns.run(&f.fp, &send_to_b(10)).0, XDP_PASS);
    assert_eq!(f.fp.stats().hairpins() - before.hairpins(), 0);

    // With it: a Data indication from A's relayed address to B's client, from the
    // listening address, checksums valid (input with a checksum, without one, and
    // with a partial one from a sender on this host).
    w2.apply(
        &f,
        TableChange::PermissionSet {
            id: id_b,
            peer: SERVER.into(),
            deadline: Millis(f.now + 300_000),
        },
    );
    let mut sent = 0u64;
    let mut bytes = 0u64;
    for (len, pad) in [
        (100, &[][..]),
        (101, &[0, 0, 0][..]),
        (1, &[0][..]),
        (0, &[][..]),
        (1200, &[][..]),
    ] {
        for input in [
            to_b(len, pad, false),
            partial(&to_b(len, pad, false)),
            send_to_b(len),
        ] {
            let before = f.fp.stats();
            let (action, out) = ns.run(&f.fp, &input);
            assert_eq!(action, XDP_TX, "len {len}");
            let s = parse(&out);
            assert_eq!(s.dst_mac, CLIENT_MAC);
            assert_eq!((s.src, s.dst), (sa(SERVER, LISTEN_PORT), client_b));
            assert_ne!(s.udp_csum, 0);
            assert_eq!(data_indication_from(&s.payload), (relay_a, data(len)));
            assert_eq!(f.delta(&before, "relayed_hairpin_data"), 1);
            assert_eq!(f.delta(&before, "bytes_up"), len as u64);
            assert_eq!(f.delta(&before, "bytes_down"), len as u64);
            sent += 1;
            bytes += len as u64;
        }
    }
    let (action, out) = ns.run(&f.fp, &to_b(33, &[0, 0, 0], true));
    assert_eq!(action, XDP_TX);
    let s = parse(&out);
    assert_eq!(s.udp_csum, 0, "no checksum in, none out");
    assert_eq!(data_indication_from(&s.payload), (relay_a, data(33)));
    sent += 1;
    bytes += 33;

    // B binds a channel to A's relayed address and has seen its response: ChannelData.
    w2.apply(
        &f,
        TableChange::ChannelSet {
            id: id_b,
            channel: 0x4003,
            peer: SocketAddr::V4(relay_a),
            deadline: Millis(f.now + 600_000),
            confirmed: false,
        },
    );
    let tuple_b = w2.table.allocs[&id_b].tuple;
    w2.table.confirm_channels(&tuple_b);
    let mut touched = std::mem::take(&mut w2.table.touched);
    w2.mirror
        .sync_all(&mut touched, &mut w2.table.allocs, &f.denied, f.now);
    for len in [0usize, 5, 100, 1300] {
        for input in [
            to_b(len, &[], false),
            partial(&to_b(len, &[], false)),
            send_to_b(len),
        ] {
            let before = f.fp.stats();
            let (action, out) = ns.run(&f.fp, &input);
            assert_eq!(action, XDP_TX);
            let s = parse(&out);
            assert_eq!((s.src, s.dst), (sa(SERVER, LISTEN_PORT), client_b));
            assert_eq!(s.payload, channel_data(0x4003, &data(len), &[]));
            assert_eq!(f.delta(&before, "relayed_hairpin_channel"), 1);
            sent += 1;
            bytes += len as u64;
        }
    }

    // Usage, merged once into each allocation: A sent, B received.
    f.mirror.collect(&mut f.table.allocs);
    w2.mirror.collect(&mut w2.table.allocs);
    let (ua, ub) = (f.table.allocs[&f.id].usage, w2.table.allocs[&id_b].usage);
    assert_eq!((ua.to_peer.packets, ua.to_peer.bytes), (sent, bytes));
    assert_eq!((ub.to_client.packets, ub.to_client.bytes), (sent, bytes));
    assert_eq!((ua.to_client.packets, ub.to_peer.packets), (0, 0));
    f.mirror.collect(&mut f.table.allocs);
    w2.mirror.collect(&mut w2.table.allocs);
    assert_eq!(f.table.allocs[&f.id].usage, ua);
    assert_eq!(w2.table.allocs[&id_b].usage, ub);

    // B's permission expires: the program stops delivering at its deadline.
    w2.apply(
        &f,
        TableChange::PermissionSet {
            id: id_b,
            peer: SERVER.into(),
            deadline: Millis(unix_ms() + 400),
        },
    );
    assert_eq!(ns.run(&f.fp, &send_to_b(8)).0, XDP_TX);
    std::thread::sleep(Duration::from_millis(600));
    let before = f.fp.stats();
    assert_eq!(ns.run(&f.fp, &send_to_b(8)).0, XDP_PASS);
    assert_eq!(ns.run(&f.fp, &to_b(8, &[], false)).0, XDP_PASS);
    assert_eq!(f.delta(&before, "expired"), 2);
}

#[test]
fn an_ipv6_hairpin_is_delivered_by_the_program_to_the_other_client() {
    let Some(fp) = load() else { return };
    let ns = Netns::new();
    let mut f = fixture6(fp);
    let client = sa6(CLIENT6, CLIENT_PORT);
    let listen = sa6(SERVER6, LISTEN_PORT);
    let relay_a = sa6(SERVER6, RELAY_PORT);
    let relay_b = sa6(SERVER6, RELAY_PORT + 1);
    let client_b = sa6(CLIENT6, CLIENT_PORT + 1);
    let id_b = AllocationId(10);
    let tuple_b = FiveTuple::udp(SocketAddr::V6(client_b), SocketAddr::V6(listen));
    f.apply(TableChange::AllocationAdd {
        id: id_b,
        tuple: tuple_b,
        relays: vec![SocketAddr::V6(relay_b)],
        deadline: Millis(f.now + 600_000),
        bandwidth: 0,
        user: "u".into(),
        username: "u".into(),
        dont_fragment: false,
    });
    f.apply(TableChange::PermissionSet {
        id: f.id,
        peer: SERVER6.into(),
        deadline: Millis(f.now + 300_000),
    });
    f.apply(TableChange::ChannelSet {
        id: f.id,
        channel: 0x4002,
        peer: SocketAddr::V6(relay_b),
        deadline: Millis(f.now + 600_000),
        confirmed: false,
    });
    let cd =
        |len: usize, pad: &[u8]| frame6(client, listen, &channel_data(0x4002, &data(len), pad));
    let send = |len: usize| {
        let m = stun(
            0x0016,
            &[(0x0013, data(len)), (0x0012, xor_peer6(relay_b, &[7; 12]))],
        );
        frame6(client, listen, &m)
    };
    // No permission of B's for A's relayed IP: passed.
    assert_eq!(ns.run(&f.fp, &cd(10, &[])).0, XDP_PASS);
    assert_eq!(ns.run(&f.fp, &send(10)).0, XDP_PASS);
    f.apply(TableChange::PermissionSet {
        id: id_b,
        peer: SERVER6.into(),
        deadline: Millis(f.now + 300_000),
    });
    for (len, pad) in [
        (0usize, &[][..]),
        (1, &[0, 0, 0][..]),
        (2, &[][..]),
        (333, &[][..]),
    ] {
        for input in [cd(len, pad), partial(&cd(len, pad)), send(len)] {
            let before = f.fp.stats();
            let (action, out) = ns.run(&f.fp, &input);
            assert_eq!(action, XDP_TX, "len {len}");
            let s = parse6(&out);
            assert_eq!(s.dst_mac, CLIENT_MAC);
            assert_eq!((s.src, s.dst), (listen, client_b));
            let m = &s.payload;
            assert_eq!(&m[0..2], &[0x00, 0x17]);
            assert_eq!(usize::from(u16::from_be_bytes([m[2], m[3]])) + 20, m.len());
            assert_eq!(m.len() % 4, 0);
            assert_eq!(&m[20..24], &[0x00, 0x12, 0x00, 0x14]);
            assert_eq!(&m[24..44], &xor_peer6(relay_a, &m[8..20])[..]);
            assert_eq!(&m[44..46], &[0x00, 0x13]);
            assert_eq!(&m[48..48 + len], &data(len)[..]);
            assert_eq!(f.delta(&before, "relayed_hairpin_data"), 1);
        }
    }
    f.apply(TableChange::ChannelSet {
        id: id_b,
        channel: 0x4003,
        peer: SocketAddr::V6(relay_a),
        deadline: Millis(f.now + 600_000),
        confirmed: false,
    });
    f.table.confirm_channels(&tuple_b);
    f.sync();
    for input in [cd(9, &[0, 0, 0]), send(9)] {
        let before = f.fp.stats();
        let (action, out) = ns.run(&f.fp, &input);
        assert_eq!(action, XDP_TX);
        let s = parse6(&out);
        assert_eq!((s.src, s.dst), (listen, client_b));
        assert_eq!(s.payload, channel_data(0x4003, &data(9), &[]));
        assert_eq!(f.delta(&before, "relayed_hairpin_channel"), 1);
    }
    f.mirror.collect(&mut f.table.allocs);
    let (ua, ub) = (f.table.allocs[&f.id].usage, f.table.allocs[&id_b].usage);
    assert_eq!(ua.to_peer.packets, 14);
    assert_eq!(ub.to_client.packets, 14);
}
