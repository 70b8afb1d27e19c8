//! Split mode with etcd: two control planes elect a leader for their cell, data planes
//! follow it. The leader is killed (`kill -9`) while traffic flows: relaying goes on,
//! the other control plane takes over and rebuilds the cell from the data planes'
//! tables, and new allocations succeed again after the failover time measured. A leader
//! stopped with SIGTERM resigns, so the next one takes over at once; a leader whose lease
//! is revoked exits at once.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::etcd::{EtcdProc, ctl_fleet, etcd_available};
use common::{Certs, EchoPeer, Outcome, Proc, Turn, echo_round, free_tcp_port, free_udp_port};
use turnpike_proto::client::{AllocateOptions, Client, Event};

/// The TURN REST secret the fleet shares through etcd (no control plane has it in its
/// configuration).
const SECRET: &str = "failover-secret-0123456789";

/// A user of the fleet's TURN REST secret, and its password.
fn rest_user(name: &str) -> (String, String) {
    let user = format!("{}:{name}", 4_000_000_000u64);
    let password = turnpike_controlplane::rest_password(SECRET, &user);
    (user, password)
}

/// A control plane of cell c1 with its gRPC on `grpc`; (process, Admin address).
fn control_plane(certs: &Certs, etcd: &str, fleet: &str, grpc: &str) -> (Proc, String) {
    let mut args: Vec<String> = [
        "controlplane",
        "--grpc-listen",
        grpc,
        "--admin-listen",
        "127.0.0.1:0",
        "--user",
        "u:p",
        "--allow-peer",
        "127.0.0.0/8",
        "--listen",
        "127.0.0.2:3478",
        "--relay-pool",
        "0",
        "--etcd",
        etcd,
        "--fleet",
        fleet,
        "--cell",
        "c1",
    ]
    .map(String::from)
    .to_vec();
    args.extend(certs.control_plane());
    let mut p = common::spawn_owned(&args);
    let admin = p.wait_for("admin listening on https://", Duration::from_secs(20));
    let admin = admin.rsplit("https://").next().unwrap().trim().to_owned();
    p.wait_for("control plane ready", Duration::from_secs(20));
    (p, admin)
}

fn data_plane(certs: &Certs, id: &str, etcd: &str, fleet: &str, listen: &str) -> Proc {
    let mut args: Vec<String> = [
        "dataplane",
        "--listen",
        listen,
        "--no-tcp",
        "--workers",
        "1",
        "--etcd",
        etcd,
        "--fleet",
        fleet,
        "--cell",
        "c1",
    ]
    .map(String::from)
    .to_vec();
    args.extend(certs.data_plane(id));
    let mut p = common::spawn_owned(&args);
    p.wait_for("turnpike ready", Duration::from_secs(20));
    p.wait_for("attached to control plane", Duration::from_secs(20));
    p
}

/// A fleet name of its own for each test (they share nothing, not even etcd).
fn fleet_name(tag: &str) -> String {
    common::etcd::fleet_name(&format!("failover-{tag}"))
}

/// An allocation through `server` with a channel to `peer` that echoes.
fn flow(server: SocketAddr, peer: &EchoPeer) -> Turn {
    let mut t = Turn::new(server, "u", "p");
    assert!(matches!(t.allocate(), Outcome::Allocated(_)));
    assert_eq!(t.bind(0x4000, peer.addr), Outcome::Ok);
    assert_eq!(echo_round(&mut t, 0x4000, 5), 5);
    t
}

/// Echoes on `t`'s channel until `stop`; (sent, echoed).
fn traffic(mut t: Turn, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(usize, usize, Turn)> {
    std::thread::spawn(move || {
        let (mut sent, mut got) = (0, 0);
        while !stop.load(Ordering::SeqCst) {
            got += echo_round(&mut t, 0x4000, 1);
            sent += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        (sent, got, t)
    })
}

/// Stops the flows and checks that none lost an echo; the allocations, rebuilt by the new
/// leader from the data planes' tables, are refreshed and deleted there.
fn no_echo_lost(flows: Vec<std::thread::JoinHandle<(usize, usize, Turn)>>, stop: &AtomicBool) {
    stop.store(true, Ordering::SeqCst);
    for f in flows {
        let (sent, got, mut t) = f.join().unwrap();
        eprintln!("flow: {sent} echoes sent, {got} received across the failover");
        assert_eq!(
            got, sent,
            "packets lost while the control plane failed over"
        );
        assert_eq!(t.refresh(600), Outcome::Ok);
        assert_eq!(t.refresh(0), Outcome::Ok);
    }
}

/// One Allocate with the fleet's REST secret, polled without blocking.
struct Probe {
    sock: UdpSocket,
    client: Client,
    started: Instant,
}

/// How often a new probe starts, and how long each is given (less than the client's
/// first retransmission timeout: a probe measures the cell, not a client's backoff).
const PROBE_EVERY: Duration = Duration::from_millis(50);
const PROBE_FOR: Duration = Duration::from_millis(450);

/// Starts a new Allocate through `server` every [`PROBE_EVERY`], each given
/// [`PROBE_FOR`], until one succeeds (bounded); returns the time from `since` to that
/// success. A request the control plane answers with an error fails the test: a new
/// leader must answer as the old one did.
fn first_new_allocation(server: SocketAddr, since: Instant) -> Duration {
    let (user, password) = rest_user("probe");
    let mut probes: Vec<Probe> = Vec::new();
    let mut next = Instant::now();
    let mut buf = [0u8; 2048];
    let mut seed = u64::from(std::process::id()) << 20;
    while since.elapsed() < Duration::from_secs(30) {
        if Instant::now() >= next {
            next += PROBE_EVERY;
            seed += 1;
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            sock.set_nonblocking(true).unwrap();
            let mut client = Client::new(&user, &password, seed);
            let mut req = Vec::new();
            client
                .allocate(0, AllocateOptions::default(), &mut req)
                .unwrap();
            sock.send_to(&req, server).unwrap();
            probes.push(Probe {
                sock,
                client,
                started: Instant::now(),
            });
        }
        probes.retain(|p| p.started.elapsed() < PROBE_FOR);
        for p in &mut probes {
            while let Ok((n, _)) = p.sock.recv_from(&mut buf) {
                let now = p.started.elapsed().as_millis() as u64;
                let mut out = Vec::new();
                match p.client.handle(now, &buf[..n], &mut out) {
                    Event::Retry => {
                        p.sock.send_to(&out, server).unwrap();
                    }
                    Event::Allocated { .. } => return since.elapsed(),
                    Event::Failed { code, reason, .. } => panic!(
                        "a new Allocate {:?} after the failover began: {code} {reason}",
                        since.elapsed()
                    ),
                    _ => {}
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("no new allocation within 30 s");
}

/// How many allocations the control plane with Admin at `admin` lists (`filter`: flags
/// of `ctl list`).
fn listed(certs: &Certs, admin: &str, filter: &[&str]) -> usize {
    let out = certs.ctl(admin, &[&["list", "-o", "json"], filter].concat());
    assert!(
        out.status.success(),
        "ctl list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list["allocations"].as_array().unwrap().len()
}

/// A cell on a fresh etcd with the fleet's REST secret: two control planes, `cp1`
/// elected leader first, `cp2` following.
struct Cell {
    _etcd: EtcdProc,
    url: String,
    fleet: String,
    certs: Certs,
    g1: String,
    cp1: Proc,
    cp2: Proc,
    admin2: String,
}

fn cell(tag: &str) -> Cell {
    let etcd = EtcdProc::start();
    let url = etcd.url();
    let fleet = fleet_name(tag);
    ctl_fleet(&url, &fleet, &["rotate-secrets", SECRET]);
    let certs = Certs::new(&format!("failover-{tag}"));
    let (g1, g2) = (
        format!("127.0.0.1:{}", free_tcp_port()),
        format!("127.0.0.1:{}", free_tcp_port()),
    );
    let (mut cp1, _) = control_plane(&certs, &url, &fleet, &g1);
    cp1.wait_for("elected leader", Duration::from_secs(10));
    let (cp2, admin2) = control_plane(&certs, &url, &fleet, &g2);
    Cell {
        _etcd: etcd,
        url,
        fleet,
        certs,
        g1,
        cp1,
        cp2,
        admin2,
    }
}

#[test]
fn the_leader_dies_relaying_goes_on_and_the_cell_fails_over() {
    if !etcd_available() {
        return;
    }
    let Cell {
        _etcd,
        url,
        fleet,
        certs,
        g1,
        mut cp1,
        mut cp2,
        admin2,
    } = cell("kill");
    let l1: SocketAddr = format!("127.0.0.2:{}", free_udp_port()).parse().unwrap();
    let l2: SocketAddr = format!("127.0.0.3:{}", free_udp_port()).parse().unwrap();
    let _d1 = data_plane(&certs, "dp1", &url, &fleet, &l1.to_string());
    let _d2 = data_plane(&certs, "dp2", &url, &fleet, &l2.to_string());

    // The follower serves no one: its Admin API names the leader.
    let out = certs.ctl(&admin2, &["stats"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "not the leader of its cell; the leader is https://{g1}"
        )),
        "{err}"
    );

    let peer = EchoPeer::start();
    let stop = Arc::new(AtomicBool::new(false));
    let flows: Vec<_> = [l1, l2]
        .into_iter()
        .map(|server| traffic(flow(server, &peer), stop.clone()))
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    // The leader dies. New allocations succeed again once the other control plane leads
    // and the data planes have attached to it.
    let killed = Instant::now();
    cp1.kill();
    let failover = first_new_allocation(l1, killed);
    cp2.wait_for("elected leader", Duration::from_secs(1));
    eprintln!("failover: new Allocate succeeded {failover:?} after kill -9 of the leader");
    // The new leader rebuilt the cell from the data planes' tables: both flows (and the
    // probes' new allocations, made there).
    // The other data plane may reattach (and report its table) a little after the one
    // that served the first new Allocate: wait for both, bounded.
    let waited = Instant::now();
    let (mut probes, mut flows_listed);
    loop {
        probes = listed(&certs, &admin2, &["--user", &rest_user("probe").0]);
        flows_listed = listed(&certs, &admin2, &[]) - probes;
        if flows_listed >= 2 || waited.elapsed() > Duration::from_secs(10) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(probes >= 1);
    assert_eq!(flows_listed, 2);
    no_echo_lost(flows, &stop);

    // The new leader registers the cell in the fleet, with its data planes' addresses.
    let started = Instant::now();
    loop {
        let text = ctl_fleet(&url, &fleet, &["instances"]);
        if text.contains(&format!("udp:{l1}")) && text.contains(&format!("udp:{l2}")) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the cell is not in the registry: {text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_leader_stopped_with_sigterm_resigns_and_the_next_takes_over_at_once() {
    if !etcd_available() {
        return;
    }
    let Cell {
        _etcd,
        url,
        fleet,
        certs,
        g1: _,
        mut cp1,
        mut cp2,
        admin2: _,
    } = cell("term");
    let l1: SocketAddr = format!("127.0.0.2:{}", free_udp_port()).parse().unwrap();
    let _d1 = data_plane(&certs, "dp1", &url, &fleet, &l1.to_string());

    let peer = EchoPeer::start();
    let stop = Arc::new(AtomicBool::new(false));
    let flows = vec![traffic(flow(l1, &peer), stop.clone())];
    std::thread::sleep(Duration::from_millis(300));

    let stopped = Instant::now();
    let pid = nix::unistd::Pid::from_raw(cp1.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let failover = first_new_allocation(l1, stopped);
    cp2.wait_for("elected leader", Duration::from_secs(1));
    eprintln!("failover: new Allocate succeeded {failover:?} after SIGTERM to the leader");
    // Without the resignation the next leader would wait for the 3 s lease.
    assert!(failover < Duration::from_millis(1500), "{failover:?}");
    let status = cp1.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    std::thread::sleep(Duration::from_millis(300));
    no_echo_lost(flows, &stop);
}

#[test]
fn a_leader_whose_lease_is_revoked_stops_at_once() {
    if !etcd_available() {
        return;
    }
    let Cell {
        _etcd,
        url,
        fleet,
        certs,
        g1,
        mut cp1,
        mut cp2,
        admin2: _,
    } = cell("revoke");
    let l1: SocketAddr = format!("127.0.0.2:{}", free_udp_port()).parse().unwrap();
    let _d1 = data_plane(&certs, "dp1", &url, &fleet, &l1.to_string());
    let peer = EchoPeer::start();
    let stop = Arc::new(AtomicBool::new(false));
    let flows = vec![traffic(flow(l1, &peer), stop.clone())];

    // Revoke the leader's lease, as an operator (or an etcd that expired it) would: the
    // election key holding cp1's URL is named after its lease, in hex.
    let election = format!("/turnpike/{fleet}/cells/c1/leader/");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let revoked = rt.block_on(async {
        use turnpike_controlplane_runtime::etcd::{Etcd, LeaseId};
        let e = Etcd::connect(std::slice::from_ref(&url)).await.unwrap();
        let keys = e.get_prefix(&election).await.unwrap();
        let (key, _) = keys
            .entries
            .iter()
            .find(|(_, v)| *v == format!("https://{g1}").as_bytes())
            .expect("cp1's candidacy");
        let hex = key.rsplit('/').next().unwrap();
        let lease = LeaseId(i64::from_str_radix(hex, 16).unwrap());
        let revoked = Instant::now();
        e.lease_revoke(lease).await.unwrap();
        revoked
    });
    // It exits (75) at once: it might no longer lead, and two must never serve the cell.
    let status = loop {
        if let Some(s) = cp1.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(5),
            "the old leader is still up"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let exited = revoked.elapsed();
    assert_eq!(status.code(), Some(75));
    eprintln!("failover: the leader exited {exited:?} after its lease was revoked");
    // The lease would be renewed (and found gone) only after a second: the deletion is
    // seen through the watch.
    assert!(exited < Duration::from_millis(800), "{exited:?}");
    let failover = first_new_allocation(l1, revoked);
    cp2.wait_for("elected leader", Duration::from_secs(1));
    eprintln!("failover: new Allocate succeeded {failover:?} after the leader's lease was revoked");
    std::thread::sleep(Duration::from_millis(300));
    no_echo_lost(flows, &stop);
}
