//! The seam between the planes, on the real binary: a tiny queue towards the data plane
//! loses no table change for good, and lifetimes run on monotonic clocks (a step of the
//! wall clock, or a data plane whose wall clock is 30 s off its control plane's, changes
//! no lifetime). The wall clock is moved with libfaketime (`faketime`, installed by
//! `tests/scripts/setup-deps.sh`), the monotonic clock left alone.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    EchoPeer, Outcome, Proc, Turn, echo_round, free_tcp_port, free_udp_port, metric_in as metric,
    scrape,
};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// Whether libfaketime is here; without it the clock tests fail under CI and are skipped
/// (saying so) elsewhere.
fn faketime_or_skip() -> bool {
    if std::path::Path::new(LIBFAKETIME).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{LIBFAKETIME} missing: tests/scripts/setup-deps.sh installs faketime"
    );
    eprintln!("skipped: {LIBFAKETIME} missing (apt-get install faketime)");
    false
}

/// `turnpike ARGS` with its wall clock offset as libfaketime's `spec` says (a file
/// `stamp` holding e.g. "+1h", read again at every clock read, so it can be changed
/// while the process runs); the monotonic clock is the real one.
fn spawn_faked(args: &[String], stamp: &std::path::Path) -> Proc {
    let mut cmd = Command::new(common::bin());
    cmd.args(args)
        .env("LD_PRELOAD", LIBFAKETIME)
        .env("FAKETIME_TIMESTAMP_FILE", stamp)
        .env("FAKETIME_NO_CACHE", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("RUST_LOG", "info");
    Proc::spawn_command(cmd)
}

fn stamp_file(tag: &str, spec: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("turnpike-faketime-{tag}-{}", std::process::id()));
    std::fs::write(&p, format!("{spec}\n")).unwrap();
    p
}

/// A client with an allocation, a permission and a channel 0x4000 to `peer`.
fn relaying(server: SocketAddr, peer: SocketAddr) -> Result<Turn, String> {
    let mut t = Turn::new(server, "u", "p");
    match t.allocate() {
        Outcome::Allocated(_) => {}
        o => return Err(format!("Allocate: {o:?}")),
    }
    match t.permit(peer) {
        Outcome::Ok => {}
        o => return Err(format!("CreatePermission: {o:?}")),
    }
    match t.bind(0x4000, peer) {
        Outcome::Ok => {}
        o => return Err(format!("ChannelBind: {o:?}")),
    }
    Ok(t)
}

/// Split mode whose control plane queues one batch of table changes towards its data
/// plane (over gRPC): under 320 clients at once, batches are dropped on the way (the
/// metrics count them) and sent again; every client told "success" relays.
#[test]
fn a_tiny_plane_queue_loses_no_table_change() {
    let certs = common::Certs::new("tinyq");
    let grpc = format!("127.0.0.1:{}", free_tcp_port());
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let mut cp_args: Vec<String> = [
        "controlplane",
        "--grpc-listen",
        grpc.as_str(),
        "--metrics-listen",
        metrics.as_str(),
        "--user",
        "u:p",
        "--allow-peer",
        "127.0.0.0/8",
        "--listen",
        listen.as_str(),
        "--relay-ports",
        "30000-32000",
        "--plane-queue",
        "1",
        "--user-quota",
        "0",
    ]
    .map(String::from)
    .to_vec();
    cp_args.extend(certs.control_plane());
    let mut cp = common::spawn_owned(&cp_args);
    cp.wait_for("control plane ready", Duration::from_secs(20));
    let mut p = certs.spawn_data_plane(
        "dp1",
        &format!("https://{grpc}"),
        &listen,
        &["--workers", "2"],
    );
    p.wait_for("turnpike ready", Duration::from_secs(20));
    let server: SocketAddr = listen.parse().unwrap();
    let peer = EchoPeer::start();
    let started = Instant::now();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let peer = peer.addr;
            std::thread::spawn(move || {
                // Every client keeps its socket to the end: a port given again to the next
                // client would be the 5-tuple of a live allocation (437).
                let mut kept = Vec::new();
                let results = (0..20)
                    .map(|_| {
                        let mut t = relaying(server, peer)?;
                        // A few rounds: a channel may still be on its way.
                        let got = echo_round(&mut t, 0x4000, 3);
                        kept.push(t);
                        if got == 0 {
                            return Err("told success, relays nothing".to_owned());
                        }
                        Ok(())
                    })
                    .collect::<Vec<Result<(), String>>>();
                drop(kept);
                results
            })
        })
        .collect();
    let results: Vec<Result<(), String>> = threads
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let page = scrape(&metrics);
    let dropped = metric(&page, "turnpike_plane_batches_dropped_total");
    let resent = metric(&page, "turnpike_plane_batches_resent_total");
    let shed = metric(&page, "turnpike_replies_shed_total");
    eprintln!(
        "320 clients in {:?}: {} failed; batches dropped {dropped}, sent again {resent}; replies shed {shed}",
        started.elapsed(),
        failed.len()
    );
    assert!(failed.is_empty(), "{} of 320: {failed:?}", failed.len());
    assert!(
        dropped > 0.0 && resent > 0.0,
        "the queue never dropped a batch: the test tested nothing (dropped {dropped}, resent {resent})"
    );
}

/// The wall clock of `serve` jumps an hour ahead, then back: the allocation relays
/// throughout and is refreshed; nothing expires early (the workers and the control plane
/// run on the monotonic clock).
#[test]
fn a_wall_clock_step_of_an_hour_changes_no_lifetime() {
    if !faketime_or_skip() {
        return;
    }
    let stamp = stamp_file("step", "+0");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let args: Vec<String> = [
        "serve",
        "--listen",
        &listen,
        "--admin-listen",
        "127.0.0.1:0",
        "--user",
        "u:p",
        "--allow-peer",
        "127.0.0.0/8",
        "--relay-ports",
        "32001-32100",
        "--workers",
        "2",
    ]
    .map(String::from)
    .to_vec();
    let mut p = spawn_faked(&args, &stamp);
    p.wait_for("turnpike ready", Duration::from_secs(20));
    let server: SocketAddr = listen.parse().unwrap();
    let peer = EchoPeer::start();
    let mut t = relaying(server, peer.addr).unwrap();
    assert_eq!(echo_round(&mut t, 0x4000, 5), 5);
    for (spec, what) in [("+1h", "an hour ahead"), ("-1h", "an hour behind")] {
        std::fs::write(&stamp, format!("{spec}\n")).unwrap();
        // Past a sweep of the workers (once a second) and a turn of the control plane.
        std::thread::sleep(Duration::from_millis(2_500));
        assert_eq!(
            echo_round(&mut t, 0x4000, 5),
            5,
            "wall clock {what}: relaying"
        );
        assert_eq!(t.refresh(600), Outcome::Ok, "wall clock {what}: Refresh");
        assert_eq!(
            t.permit(peer.addr),
            Outcome::Ok,
            "wall clock {what}: permission"
        );
        assert_eq!(
            echo_round(&mut t, 0x4000, 5),
            5,
            "wall clock {what}: relaying"
        );
    }
    let _ = std::fs::remove_file(&stamp);
}

/// Split mode with the data plane's wall clock 30 s ahead of (then behind) its control
/// plane's, allocations of 6 s: they relay at once and stop 6 s later, not 30 s early or
/// late (deadlines cross the seam as durations).
#[test]
fn a_data_plane_thirty_seconds_off_expires_allocations_on_time() {
    if !faketime_or_skip() {
        return;
    }
    for skew in ["+30s", "-30s"] {
        let certs = common::Certs::new(&format!("skew{}", &skew[..1].replace('+', "p")));
        let config = std::env::temp_dir().join(format!(
            "turnpike-skew-{}-{}.toml",
            std::process::id(),
            &skew[..1].replace('+', "p")
        ));
        std::fs::write(&config, "default_lifetime = 6\n").unwrap();
        let grpc = format!("127.0.0.1:{}", free_tcp_port());
        let listen = format!("127.0.0.1:{}", free_udp_port());
        let mut cp_args: Vec<String> = [
            "controlplane",
            "--config",
            config.to_str().unwrap(),
            "--grpc-listen",
            grpc.as_str(),
            "--user",
            "u:p",
            "--allow-peer",
            "127.0.0.0/8",
            "--listen",
            listen.as_str(),
        ]
        .map(String::from)
        .to_vec();
        cp_args.extend(certs.control_plane());
        let mut cp = common::spawn_owned(&cp_args);
        cp.wait_for("control plane ready", Duration::from_secs(20));
        let stamp = stamp_file("skew", skew);
        let mut dp_args: Vec<String> = [
            "dataplane",
            "--control",
            &format!("https://{grpc}"),
            "--listen",
            &listen,
            "--workers",
            "1",
        ]
        .map(String::from)
        .to_vec();
        dp_args.extend(certs.data_plane("dp1"));
        let mut dp = spawn_faked(&dp_args, &stamp);
        dp.wait_for("turnpike ready", Duration::from_secs(20));
        dp.wait_for("attached to control plane", Duration::from_secs(20));
        let server: SocketAddr = listen.parse().unwrap();
        let peer = EchoPeer::start();
        let allocated = Instant::now();
        let mut t = relaying(server, peer.addr).unwrap();
        assert_eq!(
            echo_round(&mut t, 0x4000, 3),
            3,
            "data plane {skew}: relays at once"
        );
        std::thread::sleep(Duration::from_secs(3).saturating_sub(allocated.elapsed()));
        assert!(
            echo_round(&mut t, 0x4000, 3) > 0,
            "data plane {skew}: relays until its allocation expires"
        );
        std::thread::sleep(Duration::from_millis(8_500).saturating_sub(allocated.elapsed()));
        assert_eq!(
            echo_round(&mut t, 0x4000, 2),
            0,
            "data plane {skew}: relays past its allocation's lifetime"
        );
        let _ = std::fs::remove_file(&stamp);
        let _ = std::fs::remove_file(&config);
    }
}

/// `serve` without `--grpc-listen` attaches its data plane in process: it listens on TCP
/// for TURN, Admin and metrics only (no plane port), and says where it is attached.
#[test]
fn serve_without_grpc_listen_opens_no_plane_port() {
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let mut p = Proc::spawn(&[
        "serve",
        "--listen",
        &listen,
        "--admin-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        &metrics,
        "--relay-ports",
        "32101-32200",
    ]);
    let ready = p.wait_for("turnpike ready", Duration::from_secs(20));
    assert!(ready.contains("control=in-process"), "{ready}");
    let admin = p.wait_for("admin listening on http://", Duration::from_secs(5));
    let admin_port = admin.rsplit(':').next().unwrap().trim().to_owned();
    let out = Command::new("ss").args(["-H", "-ltnp"]).output().unwrap();
    let pid = format!("pid={},", p.child.id());
    let mut ports: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&pid))
        .filter_map(|l| {
            let local = l.split_whitespace().nth(3)?;
            Some(local.rsplit(':').next()?.to_owned())
        })
        .collect();
    // One TURN-over-TCP listener per worker (SO_REUSEPORT): the same port.
    ports.sort();
    ports.dedup();
    let mut want = vec![
        listen.rsplit(':').next().unwrap().to_owned(),
        admin_port,
        metrics.rsplit(':').next().unwrap().to_owned(),
    ];
    want.sort();
    assert_eq!(
        ports, want,
        "TCP listeners of serve (TURN over TCP, Admin, metrics)"
    );
    assert!(!p.seen.iter().any(|l| l.contains("grpc listening")));
}
