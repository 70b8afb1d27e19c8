//! Split mode with etcd: two control planes elect a leader for their cell, two data
//! planes follow it. The leader is killed (`kill -9`) while traffic flows: relaying
//! goes on, the other control plane takes over and rebuilds the cell from the data
//! planes' tables, and new allocations succeed again after the failover time measured.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::etcd::{EtcdProc, etcd_available};
use common::{Certs, EchoPeer, Outcome, Proc, Turn, echo_round, free_tcp_port, free_udp_port};

fn control_plane(certs: &Certs, etcd: &str, fleet: &str, grpc: &str) -> Proc {
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
    p.wait_for("control plane ready", Duration::from_secs(20));
    p
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

#[test]
fn the_leader_dies_relaying_goes_on_and_the_cell_fails_over() {
    if !etcd_available() {
        return;
    }
    let etcd = EtcdProc::start();
    let url = etcd.url();
    let fleet = format!("failover-{}-{}", std::process::id(), free_tcp_port());
    let certs = Certs::new("failover");
    let (g1, g2) = (
        format!("127.0.0.1:{}", free_tcp_port()),
        format!("127.0.0.1:{}", free_tcp_port()),
    );
    let mut cp1 = control_plane(&certs, &url, &fleet, &g1);
    cp1.wait_for("elected leader", Duration::from_secs(10));
    let mut cp2 = control_plane(&certs, &url, &fleet, &g2);
    let l1: SocketAddr = format!("127.0.0.2:{}", free_udp_port()).parse().unwrap();
    let l2: SocketAddr = format!("127.0.0.3:{}", free_udp_port()).parse().unwrap();
    let _d1 = data_plane(&certs, "dp1", &url, &fleet, &l1.to_string());
    let _d2 = data_plane(&certs, "dp2", &url, &fleet, &l2.to_string());

    let peer = EchoPeer::start();
    let stop = Arc::new(AtomicBool::new(false));
    let mut flows = Vec::new();
    for server in [l1, l2] {
        let mut t = Turn::new(server, "u", "p");
        assert!(matches!(t.allocate(), Outcome::Allocated(_)));
        assert_eq!(t.bind(0x4000, peer.addr), Outcome::Ok);
        assert_eq!(echo_round(&mut t, 0x4000, 5), 5);
        flows.push(traffic(t, stop.clone()));
    }
    std::thread::sleep(Duration::from_millis(300));

    // The leader dies.
    let killed = Instant::now();
    cp1.kill();
    // New allocations succeed again once the other control plane leads and the data
    // planes have attached to it.
    let mut fresh = None;
    while killed.elapsed() < Duration::from_secs(30) {
        let mut t = Turn::new(l1, "u", "p");
        if matches!(t.allocate(), Outcome::Allocated(_)) {
            fresh = Some(t);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let failover = killed.elapsed();
    assert!(
        fresh.is_some(),
        "no new allocation within 30 s of the leader's death"
    );
    cp2.wait_for("elected leader", Duration::from_secs(1));
    eprintln!("failover: new Allocate succeeded {failover:?} after kill -9 of the leader");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    for f in flows {
        let (sent, got, mut t) = f.join().unwrap();
        eprintln!("flow: {sent} echoes sent, {got} received across the failover");
        assert_eq!(
            got, sent,
            "packets lost while the control plane failed over"
        );
        // The new leader rebuilt the allocation from the data plane's table.
        assert_eq!(t.refresh(600), Outcome::Ok);
        assert_eq!(t.refresh(0), Outcome::Ok);
    }
    if let Some(mut t) = fresh {
        assert_eq!(t.refresh(0), Outcome::Ok);
    }
    // The new leader registers the cell in the fleet, with its data planes' addresses.
    let started = Instant::now();
    loop {
        let out = std::process::Command::new(common::bin())
            .args([
                "ctl",
                "fleet",
                "--etcd",
                &url,
                "--fleet",
                &fleet,
                "instances",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
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
