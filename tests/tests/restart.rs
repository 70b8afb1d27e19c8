//! Restarts that lose nothing (issue #21): a data plane killed with SIGKILL and started
//! again under its id gets its allocations back from its control plane, on the same
//! relayed addresses, with their permissions and channels.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::stream::TurnStream;
use common::{Outcome, Turn, free_tcp_port, free_udp_port};

/// A UDP peer that echoes what it receives and remembers where it came from.
struct Peer {
    addr: SocketAddr,
    seen: Arc<Mutex<HashSet<SocketAddr>>>,
    stop: Arc<AtomicBool>,
}

impl Peer {
    fn start() -> Peer {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    s.lock().unwrap().insert(from);
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Peer { addr, seen, stop }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A client relaying to the peer on a channel (`Some`) or with Send indications.
struct Flow {
    turn: Turn,
    channel: Option<u16>,
    relay: SocketAddr,
}

impl Flow {
    /// One payload out and its echo back, within `wait`.
    fn echo(&mut self, peer: SocketAddr, i: usize, wait: Duration) -> bool {
        let payload = format!("ping {i}");
        match self.channel {
            Some(c) => self.turn.send_channel(c, payload.as_bytes()),
            None => self.turn.send_indication(peer, payload.as_bytes()),
        }
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            match self.turn.recv_data(deadline - Instant::now()) {
                Some(d) if d == payload.as_bytes() => return true,
                Some(_) => continue,
                None => return false,
            }
        }
        false
    }
}

#[test]
fn a_killed_data_plane_restarts_and_relays_again_on_the_same_addresses() {
    let certs = common::Certs::new("restart");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let (mut cp, control) = common::split_control_plane(&certs, &listen);
    let dp_flags = ["--workers", "2"];
    let mut dp = certs.spawn_data_plane("dp1", &control, &listen, &dp_flags);
    dp.wait_for("attached to control plane", Duration::from_secs(20));

    let server: SocketAddr = listen.parse().unwrap();
    let peer = Peer::start();
    let mut flows = Vec::new();
    for i in 0..12u16 {
        let mut turn = Turn::new(server, "u", "p");
        let Outcome::Allocated(relays) = turn.allocate() else {
            panic!("client {i}: no allocation")
        };
        let channel = if i % 2 == 0 {
            let c = 0x4000 + i;
            assert_eq!(turn.bind(c, peer.addr), Outcome::Ok);
            Some(c)
        } else {
            assert_eq!(turn.permit(peer.addr), Outcome::Ok);
            None
        };
        flows.push(Flow {
            turn,
            channel,
            relay: relays[0],
        });
    }
    for (i, f) in flows.iter_mut().enumerate() {
        for n in 0..5 {
            assert!(
                f.echo(peer.addr, n, Duration::from_secs(2)),
                "flow {i} before"
            );
        }
    }
    let relays: HashSet<SocketAddr> = flows.iter().map(|f| f.relay).collect();
    assert_eq!(*peer.seen.lock().unwrap(), relays);

    // The data plane dies without a word; its relay sockets close with it.
    dp.kill();
    assert!(!flows[0].echo(peer.addr, 100, Duration::from_millis(300)));
    // Its supervisor starts it again, under the same id (its certificate's).
    let restarted = Instant::now();
    let mut dp = certs.spawn_data_plane("dp1", &control, &listen, &dp_flags);
    let mut gap = None;
    for n in 0..400 {
        if flows[0].echo(peer.addr, 1000 + n, Duration::from_millis(50)) {
            gap = Some(restarted.elapsed());
            break;
        }
    }
    let gap = gap.expect("the first flow relays again within 20 s of the restart");
    eprintln!(
        "restart to the first relayed datagram: {} ms",
        gap.as_millis()
    );
    dp.wait_for("attached to control plane", Duration::from_secs(5));

    // Every flow relays again, with no request of its own, and nothing is lost now.
    peer.seen.lock().unwrap().clear();
    for (i, f) in flows.iter_mut().enumerate() {
        for n in 0..20 {
            assert!(
                f.echo(peer.addr, 2000 + n, Duration::from_secs(2)),
                "flow {i} after the restart, datagram {n}"
            );
        }
    }
    // On the relayed addresses its clients were given.
    assert_eq!(*peer.seen.lock().unwrap(), relays);
    // The allocations are whole: a Refresh, a new channel, and a second Allocate on
    // the same 5-tuple is still a mismatch.
    for f in &mut flows {
        assert_eq!(f.turn.refresh(600), Outcome::Ok);
    }
    assert_eq!(flows[1].turn.bind(0x4fff, peer.addr), Outcome::Ok);
    flows[1].channel = Some(0x4fff);
    assert!(flows[1].echo(peer.addr, 3000, Duration::from_secs(2)));
    assert_eq!(flows[0].turn.allocate(), Outcome::Failed(437));
    cp.wait_for("allocations handed back", Duration::from_secs(1));
}

/// A process by pid that is not our child (a successor started by an upgrade): killed
/// on drop.
struct Successor(i32);

impl Drop for Successor {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn usr2(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .unwrap();
}

fn alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The pid in the n-th "handed over to pid N" line.
fn successor(p: &mut common::Proc, n: usize) -> i32 {
    p.wait_for_nth("turnpike handed over to pid", n, Duration::from_secs(40));
    let line = p
        .seen
        .iter()
        .filter(|l| l.contains("turnpike handed over to pid"))
        .nth(n - 1)
        .unwrap()
        .clone();
    line.rsplit(' ').next().unwrap().trim().parse().unwrap()
}

/// `serve` with fixed Admin and metrics ports (an upgrade hands them over: the new
/// process could not bind them while the old one holds them).
fn serve_for_upgrades(bin: &std::path::Path, listen: &str, backend: &str) -> common::Proc {
    serve_with_ports(bin, listen, backend).0
}

fn serve_with_ports(bin: &std::path::Path, listen: &str, backend: &str) -> (common::Proc, String) {
    let admin = format!("127.0.0.1:{}", free_tcp_port());
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let mut cmd = std::process::Command::new(bin);
    cmd.args([
        "serve",
        "--listen",
        listen,
        "--user",
        "u:p",
        "--allow-peer",
        "127.0.0.0/8",
        "--admin-listen",
        &admin,
        "--metrics-listen",
        &metrics,
        "--workers",
        "2",
        "--io-backend",
        backend,
        "--drain-grace",
        "30",
        // coturn's uclient binds channels above 0x4FFF.
        "--legacy-channel-numbers",
    ]);
    let mut p = common::Proc::spawn_command(cmd);
    p.wait_for("turnpike ready", Duration::from_secs(20));
    (p, metrics)
}

fn flows(server: SocketAddr, peer: &Peer, n: u16) -> Vec<Flow> {
    (0..n)
        .map(|i| {
            let mut turn = Turn::new(server, "u", "p");
            let Outcome::Allocated(relays) = turn.allocate() else {
                panic!("client {i}: no allocation")
            };
            let channel = if i % 2 == 0 {
                assert_eq!(turn.bind(0x4000 + i, peer.addr), Outcome::Ok);
                Some(0x4000 + i)
            } else {
                assert_eq!(turn.permit(peer.addr), Outcome::Ok);
                None
            };
            Flow {
                turn,
                channel,
                relay: relays[0],
            }
        })
        .collect()
}

/// One ChannelData out on a TCP client and its echo back.
fn tcp_echo(t: &mut TurnStream<std::net::TcpStream>, channel: u16, i: usize) -> bool {
    let payload = format!("tcp {i}");
    t.send_channel(channel, payload.as_bytes()).unwrap();
    t.recv_data(Duration::from_secs(2)).as_deref() == Some(payload.as_bytes())
}

/// Echoes on every flow, round after round, until `stop`; returns (sent, echoed) and
/// the flows.
fn keep_echoing(
    mut flows: Vec<Flow>,
    peer: SocketAddr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(usize, usize, Vec<Flow>)> {
    std::thread::spawn(move || {
        let (mut sent, mut echoed) = (0, 0);
        while !stop.load(Ordering::Relaxed) {
            for f in &mut flows {
                sent += 1;
                if f.echo(peer, sent, Duration::from_secs(2)) {
                    echoed += 1;
                }
            }
        }
        (sent, echoed, flows)
    })
}

#[test]
fn sigusr2_hands_serve_over_to_a_new_process_without_losing_a_datagram() {
    for backend in ["uring", "mmsg"] {
        let listen = format!("127.0.0.1:{}", free_udp_port());
        let server: SocketAddr = listen.parse().unwrap();
        let (mut old, metrics) = serve_with_ports(common::bin(), &listen, backend);
        let old_pid = old.child.id() as i32;
        let peer = Peer::start();
        let fl = flows(server, &peer, 12);
        let relays: HashSet<SocketAddr> = fl.iter().map(|f| f.relay).collect();
        // A client over TCP (the listener shares the UDP port).
        let mut tcp = TurnStream::tcp(server, "u", "p");
        assert!(matches!(tcp.allocate(), Outcome::Allocated(_)));
        assert_eq!(tcp.bind(0x4100, peer.addr), Outcome::Ok);
        assert!(tcp_echo(&mut tcp, 0x4100, 0), "{backend}: TCP before");
        let stop = Arc::new(AtomicBool::new(false));
        let load = keep_echoing(fl, peer.addr, stop.clone());
        std::thread::sleep(Duration::from_millis(500));
        usr2(old_pid);
        let new_pid = successor(&mut old, 1);
        let _guard = Successor(new_pid);
        old.wait_for("took over 12 allocations", Duration::from_secs(5));
        // The old process serves its open TCP connection on, requests included; a new
        // TCP client lands on the new process.
        assert!(
            tcp_echo(&mut tcp, 0x4100, 1),
            "{backend}: TCP after, through the old process"
        );
        assert_eq!(tcp.refresh(600), Outcome::Ok, "{backend}");
        let mut tcp2 = TurnStream::tcp(server, "u", "p");
        assert!(
            matches!(tcp2.allocate(), Outcome::Allocated(_)),
            "{backend}"
        );
        assert_eq!(tcp2.bind(0x4101, peer.addr), Outcome::Ok);
        assert!(
            alive(old_pid),
            "{backend}: the old process waits for its connection"
        );
        drop(tcp);
        let t = Instant::now();
        while alive(old_pid) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = old.child.wait();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{backend}: the old process stopped once its TCP client left"
        );
        assert!(alive(new_pid), "{backend}: the new process runs");
        assert!(
            tcp_echo(&mut tcp2, 0x4101, 2),
            "{backend}: the new TCP client relays through the new process"
        );
        // Relaying goes on through the new process alone.
        std::thread::sleep(Duration::from_millis(700));
        stop.store(true, Ordering::Relaxed);
        let (sent, echoed, mut fl) = load.join().unwrap();
        eprintln!("{backend}: {sent} echoes asked across the upgrade, {echoed} answered");
        assert!(sent > 100, "{backend}: {sent}");
        assert_eq!(
            echoed, sent,
            "{backend}: no datagram lost across the upgrade"
        );
        // The same relayed addresses (the two TCP clients' relays are the others).
        assert!(
            relays.is_subset(&peer.seen.lock().unwrap()),
            "{backend}: same relayed addresses"
        );
        assert_eq!(
            peer.seen.lock().unwrap().len(),
            relays.len() + 2,
            "{backend}"
        );
        // The allocations are whole in the new process: refresh, a new channel, and a
        // second Allocate on a 5-tuple is still a mismatch; a new client allocates.
        for f in &mut fl {
            assert_eq!(f.turn.refresh(600), Outcome::Ok, "{backend}");
        }
        assert_eq!(fl[1].turn.bind(0x4fff, peer.addr), Outcome::Ok);
        fl[1].channel = Some(0x4fff);
        assert!(fl[1].echo(peer.addr, 1, Duration::from_secs(2)));
        assert_eq!(fl[0].turn.allocate(), Outcome::Failed(437));
        let mut more = flows(server, &peer, 1);
        assert!(more[0].echo(peer.addr, 2, Duration::from_secs(2)));
        // The new process serves the metrics (and Admin) ports it took over, and counts
        // the upgrade.
        let page = common::scrape(&metrics);
        assert_eq!(
            common::metric_in(&page, "turnpike_upgrades_total "),
            1.0,
            "{backend}"
        );
        assert_eq!(
            common::metric_in(&page, "turnpike_allocations "),
            14.0,
            "{backend}"
        );
    }
}

#[test]
fn an_upgrade_to_a_binary_that_fails_leaves_the_old_process_serving() {
    // The running binary's path is what an upgrade starts: a copy here, replaced below
    // by a program that exits at once.
    let dir = std::env::temp_dir().join(format!("turnpike-rollback-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("turnpike");
    std::fs::copy(common::bin(), &path).unwrap();
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let server: SocketAddr = listen.parse().unwrap();
    let mut p = serve_for_upgrades(&path, &listen, "uring");
    let peer = Peer::start();
    let mut fl = flows(server, &peer, 2);
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, "#!/bin/sh\nexit 3\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    usr2(p.child.id() as i32);
    let line = p.wait_for(
        "upgrade failed; this process carries on",
        Duration::from_secs(40),
    );
    assert!(line.contains("exited"), "{line}");
    // It takes requests again and relays.
    for f in &mut fl {
        assert!(f.echo(peer.addr, 1, Duration::from_secs(2)));
        assert_eq!(f.turn.refresh(600), Outcome::Ok);
    }
    let mut more = flows(server, &peer, 1);
    assert!(more[0].echo(peer.addr, 2, Duration::from_secs(2)));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ten_upgrades_in_a_row_leak_no_descriptor_and_no_memory() {
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let server: SocketAddr = listen.parse().unwrap();
    let mut p = serve_for_upgrades(common::bin(), &listen, "uring");
    let peer = Peer::start();
    let mut fl = flows(server, &peer, 4);
    let first = p.child.id() as i32;
    let fds_before = open_fds(first);
    let mut pid = first;
    let mut guards = Vec::new();
    let mut rss_first = 0;
    for n in 1..=10 {
        usr2(pid);
        let next = successor(&mut p, n);
        guards.push(Successor(next));
        p.wait_for_nth(
            "turnpike upgraded: took over 4 allocations",
            n,
            Duration::from_secs(20),
        );
        let t = Instant::now();
        while alive(pid) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(pid), "upgrade {n}: the old process stopped");
        pid = next;
        for f in &mut fl {
            assert!(f.echo(peer.addr, n, Duration::from_secs(2)), "upgrade {n}");
        }
        if n == 1 {
            rss_first = rss_kib(pid);
        }
    }
    let fds_after = open_fds(pid);
    // What a process carries over does not grow with the upgrades behind it.
    let rss_last = rss_kib(pid);
    eprintln!("RSS after the first upgrade {rss_first} KiB, after the tenth {rss_last} KiB");
    assert!(
        rss_last <= rss_first + rss_first / 2 + 2048,
        "RSS {rss_first} KiB after the first upgrade, {rss_last} KiB after the tenth"
    );
    eprintln!("open descriptors: {fds_before} before, {fds_after} after ten upgrades");
    // The same sockets, listeners and rings; a few descriptors of slack (timers, a
    // pool refilled at a different moment).
    assert!(
        fds_after <= fds_before + 8,
        "{fds_before} descriptors before, {fds_after} after ten upgrades"
    );
}

#[test]
fn systemd_is_told_ready_and_then_the_new_main_pid() {
    let dir = std::env::temp_dir().join(format!("turnpike-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock_path = dir.join("notify");
    let _ = std::fs::remove_file(&sock_path);
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let mut cmd = std::process::Command::new(common::bin());
    cmd.args([
        "serve",
        "--listen",
        &listen,
        "--user",
        "u:p",
        "--admin-listen",
        "127.0.0.1:0",
    ])
    .env("NOTIFY_SOCKET", &sock_path);
    let mut p = common::Proc::spawn_command(cmd);
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    usr2(p.child.id() as i32);
    let new_pid = successor(&mut p, 1);
    let _guard = Successor(new_pid);
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&buf[..n]),
        format!("MAINPID={new_pid}\nREADY=1")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigusr2_hands_a_data_plane_over_without_losing_a_datagram() {
    let certs = common::Certs::new("upgrade-dp");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let (mut cp, control) = common::split_control_plane(&certs, &listen);
    let mut dp = certs.spawn_data_plane("dp1", &control, &listen, &["--workers", "2"]);
    dp.wait_for("attached to control plane", Duration::from_secs(20));
    let server: SocketAddr = listen.parse().unwrap();
    let peer = Peer::start();
    let fl = flows(server, &peer, 8);
    let relays: HashSet<SocketAddr> = fl.iter().map(|f| f.relay).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let load = keep_echoing(fl, peer.addr, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let old_pid = dp.child.id() as i32;
    usr2(old_pid);
    let new_pid = successor(&mut dp, 1);
    let _guard = Successor(new_pid);
    dp.wait_for("took over 8 allocations", Duration::from_secs(5));
    let _ = dp.child.wait();
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    let (sent, echoed, mut fl) = load.join().unwrap();
    eprintln!("data plane: {sent} echoes asked across the upgrade, {echoed} answered");
    assert!(sent > 100);
    assert_eq!(
        echoed, sent,
        "no datagram lost across the data plane's upgrade"
    );
    assert_eq!(*peer.seen.lock().unwrap(), relays, "same relayed addresses");
    // The control plane answers through the new process: the allocations are whole.
    for f in &mut fl {
        assert_eq!(f.turn.refresh(600), Outcome::Ok);
    }
    assert_eq!(fl[0].turn.allocate(), Outcome::Failed(437));
    let mut more = flows(server, &peer, 1);
    assert!(more[0].echo(peer.addr, 1, Duration::from_secs(2)));
    cp.wait_for("allocations handed back", Duration::from_secs(1));
}

/// coturn's test client relays through an upgrade: `turnutils_uclient` (channels, then
/// Send indications) runs while `serve` is upgraded mid-run, and loses nothing.
#[test]
fn uclient_keeps_relaying_across_an_upgrade() {
    if std::process::Command::new("turnutils_uclient")
        .arg("-h")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "turnutils_uclient missing (tests/scripts/setup-deps.sh installs it)"
        );
        eprintln!("SKIPPED: turnutils_uclient not installed");
        return;
    }
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let port = listen.rsplit(':').next().unwrap().to_owned();
    let mut p = serve_for_upgrades(common::bin(), &listen, "uring");
    let peer_port = free_udp_port().to_string();
    let mut peer = std::process::Command::new("turnutils_peer")
        .args(["-L", "127.0.0.1", "-p", &peer_port])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut guards = Vec::new();
    let mut pid = p.child.id() as i32;
    for (n, flags) in [vec!["-c"], vec!["-c", "-s"]].into_iter().enumerate() {
        // 4 clients × 300 messages, one every 20 ms each: about 6 s.
        let mut args: Vec<&str> = vec!["60", "turnutils_uclient"];
        args.extend(&flags);
        args.extend([
            "-e",
            "127.0.0.1",
            "-r",
            &peer_port,
            "-n",
            "300",
            "-m",
            "4",
            "-l",
            "171",
            "-u",
            "u",
            "-w",
            "p",
            "-p",
            &port,
            "127.0.0.1",
        ]);
        let client = std::process::Command::new("timeout")
            .args(&args)
            .output_in_background();
        std::thread::sleep(Duration::from_millis(2500));
        usr2(pid);
        let next = successor(&mut p, n + 1);
        guards.push(Successor(next));
        pid = next;
        let out = client.join().unwrap();
        let lost = out
            .lines()
            .find_map(|l| {
                let rest = l.split("Total lost packets ").nth(1)?;
                rest.split_whitespace().next()?.parse::<usize>().ok()
            })
            .unwrap_or_else(|| panic!("no uclient summary:\n{out}"));
        assert_eq!(
            lost, 0,
            "uclient {flags:?} lost {lost} of 1200 across an upgrade"
        );
    }
    let _ = peer.kill();
    let _ = peer.wait();
}

trait Background {
    fn output_in_background(&mut self) -> std::thread::JoinHandle<String>;
}

impl Background for std::process::Command {
    fn output_in_background(&mut self) -> std::thread::JoinHandle<String> {
        let child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::spawn(move || {
            let o = child.wait_with_output().unwrap();
            format!(
                "{}{}(exit: {})",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
                o.status
            )
        })
    }
}
