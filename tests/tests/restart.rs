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
    let grpc = format!("127.0.0.1:{}", free_tcp_port());
    let control = format!("https://{grpc}");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let mut cp_args: Vec<String> = [
        "controlplane",
        "--grpc-listen",
        grpc.as_str(),
        "--user",
        "u:p",
        "--allow-peer",
        "127.0.0.0/8",
        "--listen",
        listen.as_str(),
        "--admin-listen",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    cp_args.extend(certs.control_plane());
    let mut cp = common::spawn_owned(&cp_args);
    cp.wait_for("control plane ready", Duration::from_secs(20));
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
            assert!(f.echo(peer.addr, n, Duration::from_secs(2)), "flow {i} before");
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
    eprintln!("restart to the first relayed datagram: {} ms", gap.as_millis());
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
