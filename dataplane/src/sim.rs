//! The whole relay, simulated: the control plane's [`Cluster`], several data planes'
//! agent sessions and forwarding cores, sans-IO TURN clients and peers, on one virtual
//! clock. No sockets, no threads, no sleeps: a scenario runs in milliseconds.
//!
//! The seam between the planes is modelled as the shells build it: the cluster's
//! [`Down`] messages wait in a bounded queue per data plane (a full queue drops, as the
//! control plane's shell does), and a data plane may run on a clock skewed from the
//! control plane's, in which case every message crosses the gRPC conversions of
//! `turnpike-api` (deadlines as durations) as in split mode. Cross-plane bugs get their
//! regression tests here.
#![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use turnpike_api::convert::{At, down_from_api, down_to_api, up_from_api, up_to_api};
use turnpike_controlplane::{
    Cluster, ClusterOutput, ConnId, Credentials, PeerPolicy, Server, ServerConfig,
};
use turnpike_plane::{Down, Hello, Millis, Punted, RelayIp, Transport, Up};
use turnpike_proto::attr::{AlternateServer, ErrorCode};
use turnpike_proto::client::{Client, Event};
use turnpike_proto::stun::Message;

use crate::agent::session::{self, Session, Verdict};
use crate::core::Token;
use crate::core::counters::Counters;
use crate::core::table::Denied;
use crate::core::{Core, CoreConfig, HEADROOM, Output, Received, SLOT};
use crate::{BindingLimit, FiveTuple};

/// The start of the virtual clock.
const T0: Millis = Millis(1_767_225_600_000);
const REALM: &str = "sim.test";
/// Every core's listening socket.
const LISTEN: Token = Token(0);

/// One data plane: its agent's session and its workers' cores.
struct Plane {
    id: String,
    listen: SocketAddr,
    cores: Vec<Core>,
    session: Session,
    /// The last batch applied (survives reattachment, as the agent's does).
    version: u64,
    conn: Option<ConnId>,
    /// Relay sockets bound: address → (worker, token).
    sockets: HashMap<SocketAddr, (usize, Token)>,
    next_token: u32,
    /// This plane's clock minus the control plane's, milliseconds.
    skew: i64,
    drained: bool,
}

impl Plane {
    fn now(&self, cp_now: Millis) -> Millis {
        Millis(cp_now.0.saturating_add_signed(self.skew))
    }

    /// The worker a client's datagrams reach (SO_REUSEPORT's hash, here a simple one).
    fn worker_of(&self, client: SocketAddr) -> usize {
        (client.port() as usize) % self.cores.len()
    }

    fn token_addr(&self, worker: usize, t: Token) -> SocketAddr {
        if t == LISTEN {
            return self.listen;
        }
        *self
            .sockets
            .iter()
            .find(|(_, v)| **v == (worker, t))
            .unwrap()
            .0
    }
}

/// A datagram that arrived at an address of the simulated network.
type Inbox = HashMap<SocketAddr, VecDeque<(SocketAddr, Vec<u8>)>>;

/// The simulated relay.
struct Sim {
    now: Millis,
    cluster: Cluster,
    planes: Vec<Plane>,
    /// Messages down, queued per data plane connection.
    queues: HashMap<ConnId, VecDeque<Down>>,
    /// Messages a queue holds at most: beyond, a message is dropped, as the shell does.
    capacity: usize,
    /// Batches to lose on the way (a fault injected by a test).
    lose: usize,
    /// Batches lost (dropped by a full queue or by `lose`).
    lost: u64,
    inbox: Inbox,
}

fn config() -> ServerConfig {
    ServerConfig {
        relay_ips: vec![],
        relay_ports: (50000, 50999),
        unauth_rate: 0,
        relay_pool: 0,
        policy: PeerPolicy::new(
            ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"]
                .iter()
                .map(|c| c.parse().unwrap())
                .collect(),
            Vec::new(),
            Vec::new(),
        ),
        ..ServerConfig::default()
    }
}

fn cluster(cfg: ServerConfig) -> Cluster {
    let creds = Credentials::new(REALM, &[("alice".into(), "wonderland".into())], &[]);
    Cluster::new(Server::new(cfg, creds, [42; 32], 7))
}

fn core(id: usize, now: Millis) -> Core {
    Core::new(
        now,
        CoreConfig {
            id,
            legacy_channels: false,
            hairpin: true,
            binding_limit: BindingLimit::default(),
            denied: Arc::new(ArcSwap::from_pointee(Denied::new([]))),
            ctr: Arc::new(Counters::default()),
        },
    )
}

impl Sim {
    fn new(cfg: ServerConfig) -> Sim {
        Sim {
            now: T0,
            cluster: cluster(cfg),
            planes: Vec::new(),
            queues: HashMap::new(),
            capacity: usize::MAX,
            lose: 0,
            lost: 0,
            inbox: HashMap::new(),
        }
    }

    /// Adds a data plane listening on `listen` with `workers` cores, its clock `skew`
    /// milliseconds off the control plane's, and attaches it.
    fn plane(&mut self, id: &str, listen: &str, workers: usize, skew: i64) -> usize {
        let listen: SocketAddr = listen.parse().unwrap();
        let now = Millis(self.now.0.saturating_add_signed(skew));
        let cores = (0..workers)
            .map(|w| {
                let mut c = core(w, now);
                c.add_listen(LISTEN, listen);
                c
            })
            .collect();
        self.planes.push(Plane {
            id: id.to_owned(),
            listen,
            cores,
            session: Session::new(0),
            version: 0,
            conn: None,
            sockets: HashMap::new(),
            next_token: 1,
            skew,
            drained: false,
        });
        let i = self.planes.len() - 1;
        self.attach(i);
        i
    }

    /// Data plane `i` attaches (again): its Hello carries its whole table.
    fn attach(&mut self, i: usize) {
        let p = &mut self.planes[i];
        let mut out = Vec::new();
        let mut table = Vec::new();
        for c in &mut p.cores {
            // Pooled sockets belong to the control plane that reserved them.
            c.clear_pool(&mut out);
            table.extend(c.snapshot());
        }
        let hello = Hello {
            id: p.id.clone(),
            listening: vec![(Transport::Udp, p.listen)],
            relay_ips: vec![RelayIp::local(p.listen.ip())],
            workers: p.cores.len() as u32,
            version: "sim".into(),
            table: None,
            started: 0,
        };
        let mut opening = session::opening(hello, p.version, table).into_iter();
        p.session = Session::new(p.version);
        let Some(Up::Hello(h)) = opening.next().map(|m| self.up_wire(i, m)) else {
            unreachable!("an attachment opens with a Hello")
        };
        let conn = self.cluster.attach(self.now, h);
        self.planes[i].conn = Some(conn);
        for m in opening {
            let m = self.up_wire(i, m);
            self.cluster.handle_message(self.now, conn, m);
        }
        self.step();
    }

    /// Data plane `i`'s link goes down: what was queued for it is lost with it.
    fn detach(&mut self, i: usize) {
        if let Some(conn) = self.planes[i].conn.take() {
            self.queues.remove(&conn);
            self.cluster.detach(self.now, conn);
        }
    }

    /// The control plane restarts: a new cluster, which knows nothing; every data plane
    /// attaches to it again.
    fn restart_control_plane(&mut self, cfg: ServerConfig) {
        self.cluster = cluster(cfg);
        self.queues.clear();
        for i in 0..self.planes.len() {
            self.planes[i].conn = None;
            self.attach(i);
        }
    }

    /// A message up as the control plane receives it: through the wire's conversions
    /// when the planes' clocks differ (split mode across hosts).
    fn up_wire(&self, i: usize, m: Up) -> Up {
        let p = &self.planes[i];
        if p.skew == 0 {
            return m;
        }
        let sent = up_to_api(m, at(p.now(self.now)));
        up_from_api(&sent, at(self.now)).unwrap()
    }

    fn down_wire(&self, i: usize, m: Down) -> Down {
        let p = &self.planes[i];
        if p.skew == 0 {
            return m;
        }
        let sent = down_to_api(m, at(self.now));
        down_from_api(&sent, at(p.now(self.now))).unwrap()
    }

    fn plane_of_conn(&self, conn: ConnId) -> Option<usize> {
        self.planes.iter().position(|p| p.conn == Some(conn))
    }

    /// Runs both planes until neither has anything left to say.
    fn step(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            self.queue_outputs();
            let conns: Vec<ConnId> = self.queues.keys().copied().collect();
            for conn in conns {
                let Some(m) = self.queues.get_mut(&conn).and_then(VecDeque::pop_front) else {
                    continue;
                };
                moved = true;
                if let Some(i) = self.plane_of_conn(conn) {
                    let m = self.down_wire(i, m);
                    let ups = self.on_down(i, m);
                    for u in ups {
                        let u = self.up_wire(i, u);
                        self.cluster.handle_message(self.now, conn, u);
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the planes never went quiet");
    }

    /// What data plane `i` does with a message down; returns its messages up.
    fn on_down(&mut self, i: usize, m: Down) -> Vec<Up> {
        let now = self.planes[i].now(self.now);
        let mut ups = Vec::new();
        let mut outs = Vec::new();
        match m {
            Down::Batch(b) => {
                let p = &mut self.planes[i];
                match p.session.on_batch(b.version, now) {
                    Verdict::Apply => {
                        for bind in b.binds {
                            let w = bind.worker as usize;
                            let mut bound = Vec::new();
                            for a in bind.relays {
                                let t = Token(p.next_token);
                                p.next_token += 1;
                                p.sockets.insert(a, (w, t));
                                bound.push((a, t));
                            }
                            match bind.tuple {
                                Some(t) => p.cores[w].relays_bound(now, t, bound),
                                None => p.cores[w].pool_bound(now, bound),
                            }
                            ups.push(Up::BindResult {
                                id: bind.id,
                                result: Ok(()),
                            });
                        }
                        for (w, c) in b.changes {
                            let mut out = Vec::new();
                            p.cores[w as usize].handle_change(now, c, &mut out);
                            outs.push((w as usize, out));
                        }
                        if let Some(d) = b.drain {
                            p.drained = d;
                        }
                        if let Some(c) = &b.challenge {
                            let c = Arc::new(crate::core::Challenger::new(c));
                            for core in &mut p.cores {
                                core.set_challenge(Some(Arc::clone(&c)));
                            }
                        }
                        p.version = b.version;
                        ups.push(p.session.applied_now(b.version));
                        for d in p.session.release() {
                            let mut out = Vec::new();
                            p.cores[d.worker as usize].reply(d.tuple, d.data, &mut out);
                            outs.push((d.worker as usize, out));
                        }
                    }
                    Verdict::Repeat(m) => ups.push(m),
                    Verdict::Gap(m) => ups.extend(m),
                }
            }
            Down::Send { after, datagrams } => {
                let p = &mut self.planes[i];
                for d in p.session.answers(after, datagrams) {
                    let mut out = Vec::new();
                    p.cores[d.worker as usize].reply(d.tuple, d.data, &mut out);
                    outs.push((d.worker as usize, out));
                }
            }
        }
        for (w, out) in outs {
            ups.extend(self.outputs(i, w, out, &[]));
        }
        ups
    }

    /// Carries out a core's outputs: datagrams onto the network, punts up.
    fn outputs(&mut self, i: usize, w: usize, out: Vec<Output>, buf: &[u8]) -> Vec<Up> {
        let mut ups = Vec::new();
        for o in out {
            match o {
                Output::Transmit(t) => {
                    let from = self.planes[i].token_addr(w, t.from);
                    let data = buf[t.start as usize..(t.start + t.len) as usize].to_vec();
                    self.inbox.entry(t.to).or_default().push_back((from, data));
                }
                Output::Reply { from, to, data } => {
                    let from = self.planes[i].token_addr(w, from);
                    self.inbox.entry(to).or_default().push_back((from, data));
                }
                Output::Punt(p) => ups.push(Up::Punted(vec![Punted {
                    worker: p.worker as u32,
                    tuple: p.tuple,
                    data: p.data,
                }])),
                Output::Close(t) => self.planes[i].sockets.retain(|_, v| *v != (w, t)),
                Output::DontFragment(_) => {}
            }
        }
        ups
    }

    /// A datagram from `from` to `to` (a listening or a relay address).
    fn send(&mut self, from: SocketAddr, to: SocketAddr, data: &[u8]) {
        self.arrive(from, to, data);
        self.step();
    }

    /// Datagrams that arrive faster than the data planes take what comes down: the
    /// control plane answers each in a turn of its own, and the turns' messages queue
    /// up (and overflow a small queue) before a data plane reads any.
    fn burst(&mut self, datagrams: &[(SocketAddr, SocketAddr, Vec<u8>)]) {
        for (from, to, data) in datagrams {
            self.arrive(*from, *to, data);
            self.queue_outputs();
        }
        self.step();
    }

    /// Moves what the cluster emitted onto the queues down, dropping what does not fit
    /// (as the control plane's shell does).
    fn queue_outputs(&mut self) {
        while let Some(o) = self.cluster.poll_output() {
            let ClusterOutput::Send { conn, msg } = o else {
                continue;
            };
            let q = self.queues.entry(conn).or_default();
            let batch = matches!(msg, Down::Batch(_));
            if q.len() >= self.capacity || (batch && self.lose > 0) {
                if batch {
                    // A full queue is the shell's drop, which it tells the cluster of; a
                    // loss on the way (`lose`) nobody sees.
                    if self.lose > 0 {
                        self.lose -= 1;
                    } else {
                        self.cluster.batch_dropped(conn);
                    }
                    self.lost += 1;
                }
                continue;
            }
            q.push_back(msg);
        }
    }

    fn arrive(&mut self, from: SocketAddr, to: SocketAddr, data: &[u8]) {
        let cp_now = self.now;
        let target = self.planes.iter().enumerate().find_map(|(i, p)| {
            if p.listen == to {
                Some((i, p.worker_of(from), LISTEN))
            } else {
                p.sockets.get(&to).map(|&(w, t)| (i, w, t))
            }
        });
        let Some((i, w, t)) = target else {
            return;
        };
        let mut buf = vec![0u8; SLOT];
        buf[HEADROOM..HEADROOM + data.len()].copy_from_slice(data);
        let mut out = Vec::new();
        let now = self.planes[i].now(cp_now);
        let rx = Received {
            token: t,
            src: from,
            buf: &mut buf,
            len: data.len(),
            truncated: false,
            slot: 0,
        };
        self.planes[i].cores[w].handle_datagram(now, rx, &mut out);
        let ups = self.outputs(i, w, out, &buf);
        if let Some(conn) = self.planes[i].conn {
            for u in ups {
                let u = self.up_wire(i, u);
                self.cluster.handle_message(self.now, conn, u);
            }
        }
    }

    /// What arrived at `addr`, oldest first.
    fn take(&mut self, addr: SocketAddr) -> Vec<(SocketAddr, Vec<u8>)> {
        self.inbox
            .get_mut(&addr)
            .map(|q| q.drain(..).collect())
            .unwrap_or_default()
    }

    /// Moves the clock: timers of both planes run.
    fn advance(&mut self, ms: u64) {
        self.now = self.now.plus_ms(ms);
        self.cluster.handle_timeout(self.now);
        for p in &mut self.planes {
            let now = p.now(self.now);
            for c in &mut p.cores {
                c.handle_timeout(now, &mut Vec::new());
            }
        }
        self.step();
    }
}

fn at(now: Millis) -> At {
    At { now, wall: now.0 }
}

/// Half-seconds a client waits for an answer, retransmitting.
const PATIENCE: u32 = 40;

/// A TURN client of the simulation.
struct Peer {
    addr: SocketAddr,
    turn: Client,
    /// The server address it talks to.
    server: SocketAddr,
}

/// What a transaction ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Done {
    Allocated(SocketAddr),
    Ok,
    Failed(u16, Option<SocketAddr>),
    NoAnswer,
}

impl Peer {
    fn new(addr: &str, server: SocketAddr, seed: u64) -> Peer {
        Peer {
            addr: addr.parse().unwrap(),
            turn: Client::new("alice", "wonderland", seed),
            server,
        }
    }

    /// Runs the request in `req` to its end: follows 401/438, and retransmits as a
    /// client does while the virtual clock moves, waiting `patience` half-seconds at
    /// most.
    fn run(&mut self, sim: &mut Sim, mut req: Vec<u8>, patience: u32) -> Done {
        let mut waits = 0;
        loop {
            sim.send(self.addr, self.server, &req);
            loop {
                let mut next = Vec::new();
                let done = self.collect(sim, &mut next);
                if !next.is_empty() {
                    req = next;
                    break;
                }
                if done != Done::NoAnswer {
                    return done;
                }
                if waits >= patience {
                    return Done::NoAnswer;
                }
                waits += 1;
                sim.advance(500);
                let done = self.collect(sim, &mut next);
                if !next.is_empty() {
                    req = next;
                    break;
                }
                if done != Done::NoAnswer {
                    return done;
                }
                match self.turn.handle_timeout(sim.now.0, &mut next) {
                    Event::Retry => {
                        req = next;
                        break;
                    }
                    Event::TimedOut { .. } => return Done::NoAnswer,
                    _ => {}
                }
            }
        }
    }

    /// Handles what arrived for this client: the end of its transaction, if any; a new
    /// request to send (after 401/438) is written into `next`.
    fn collect(&mut self, sim: &mut Sim, next: &mut Vec<u8>) -> Done {
        let mut done = Done::NoAnswer;
        for (_, d) in sim.take(self.addr) {
            match self.turn.handle(sim.now.0, &d, next) {
                Event::Allocated { relayed, .. } => done = Done::Allocated(relayed[0]),
                Event::Refreshed { .. } | Event::PermissionCreated => done = Done::Ok,
                Event::ChannelBound { .. } => done = Done::Ok,
                Event::Failed { code, .. } => {
                    let alt = Message::parse(&d)
                        .ok()
                        .and_then(|m| m.attr::<AlternateServer>().ok().flatten())
                        .map(|a| a.0);
                    let code = Message::parse(&d)
                        .ok()
                        .and_then(|m| m.attr::<ErrorCode>().ok().flatten())
                        .map_or(code, |e| e.code);
                    done = Done::Failed(code, alt);
                }
                _ => {}
            }
        }
        done
    }

    fn allocate(&mut self, sim: &mut Sim) -> Done {
        let mut req = Vec::new();
        self.turn
            .allocate(sim.now.0, Default::default(), &mut req)
            .unwrap();
        self.run(sim, req, PATIENCE)
    }

    fn permit(&mut self, sim: &mut Sim, peer: SocketAddr) -> Done {
        let mut req = Vec::new();
        self.turn
            .create_permission(sim.now.0, &[peer], &mut req)
            .unwrap();
        self.run(sim, req, PATIENCE)
    }

    fn bind(&mut self, sim: &mut Sim, channel: u16, peer: SocketAddr) -> Done {
        let mut req = Vec::new();
        self.turn
            .channel_bind(sim.now.0, channel, peer, &mut req)
            .unwrap();
        self.run(sim, req, PATIENCE)
    }

    fn refresh(&mut self, sim: &mut Sim, lifetime: u32) -> Done {
        let mut req = Vec::new();
        self.turn.refresh(sim.now.0, lifetime, &mut req).unwrap();
        self.run(sim, req, PATIENCE)
    }

    /// ChannelData on `channel` reaches `peer` from `relay`, and the peer's answer comes
    /// back on the channel.
    fn relays(&mut self, sim: &mut Sim, channel: u16, relay: SocketAddr, peer: SocketAddr) -> bool {
        let mut frame = [0u8; 64];
        let n = Client::channel_data(channel, b"ping", &mut frame).unwrap();
        sim.take(peer);
        sim.send(self.addr, self.server, &frame[..n]);
        let at_peer = sim.take(peer);
        if at_peer != [(relay, b"ping".to_vec())] {
            return false;
        }
        sim.take(self.addr);
        sim.send(peer, relay, b"pong");
        let back = sim.take(self.addr);
        back.len() == 1
            && matches!(
                self.turn.handle(sim.now.0, &back[0].1, &mut Vec::new()),
                Event::ChannelData { channel: c, data } if c == channel && data == b"pong"
            )
    }

    /// A Send indication reaches `peer`, and the peer's answer comes back as a Data
    /// indication.
    fn indicates(&mut self, sim: &mut Sim, relay: SocketAddr, peer: SocketAddr) -> bool {
        let mut frame = [0u8; 128];
        let n = self.turn.send_indication(peer, b"hi", &mut frame).unwrap();
        sim.take(peer);
        sim.send(self.addr, self.server, &frame[..n]);
        if sim.take(peer) != [(relay, b"hi".to_vec())] {
            return false;
        }
        sim.send(peer, relay, b"yo");
        let back = sim.take(self.addr);
        // A Data indication, or ChannelData when a channel is bound to the peer.
        back.len() == 1
            && match self.turn.handle(sim.now.0, &back[0].1, &mut Vec::new()) {
                Event::Data { peer: p, data } => p == peer && data == b"yo",
                Event::ChannelData { data, .. } => data == b"yo",
                _ => false,
            }
    }
}

const DP1: &str = "192.0.2.10:3478";
const DP2: &str = "192.0.2.20:3478";
const PEER: &str = "198.51.100.7:9000";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A client of `dp` with an allocation, a permission and a channel to [`PEER`].
fn relaying(sim: &mut Sim, client: &str, dp: &str, seed: u64) -> (Peer, SocketAddr) {
    let mut c = Peer::new(client, addr(dp), seed);
    let Done::Allocated(relay) = c.allocate(sim) else {
        panic!("no allocation for {client}")
    };
    assert_eq!(c.permit(sim, addr(PEER)), Done::Ok);
    assert_eq!(c.bind(sim, 0x4000, addr(PEER)), Done::Ok);
    (c, relay)
}

#[test]
fn allocate_permit_bind_and_relay_both_ways() {
    let mut sim = Sim::new(config());
    sim.plane("dp1", DP1, 2, 0);
    let (mut c, relay) = relaying(&mut sim, "203.0.113.1:4000", DP1, 1);
    assert_eq!(relay.ip(), addr(DP1).ip());
    assert!(c.relays(&mut sim, 0x4000, relay, addr(PEER)));
    assert!(c.indicates(&mut sim, relay, addr(PEER)));
    // Another peer has no permission: nothing reaches it.
    let other = addr("198.51.100.8:9000");
    let mut frame = [0u8; 128];
    let n = c.turn.send_indication(other, b"no", &mut frame).unwrap();
    sim.send(c.addr, c.server, &frame[..n]);
    assert!(sim.take(other).is_empty());
}

#[test]
fn a_data_plane_reattaches_and_a_restarted_control_plane_restores_its_table() {
    let mut sim = Sim::new(config());
    sim.plane("dp1", DP1, 2, 0);
    let (mut c, relay) = relaying(&mut sim, "203.0.113.1:4001", DP1, 2);
    // The link goes down: the data plane relays headless.
    sim.detach(0);
    sim.advance(5_000);
    assert!(c.relays(&mut sim, 0x4000, relay, addr(PEER)));
    // It reattaches: the control plane answers on the allocation again.
    sim.attach(0);
    assert_eq!(c.refresh(&mut sim, 600), Done::Ok);
    // The control plane restarts: rebuilt from the data plane's table.
    sim.restart_control_plane(config());
    assert_eq!(sim.cluster.stats().totals.allocations, 1);
    assert_eq!(c.refresh(&mut sim, 600), Done::Ok);
    assert_eq!(c.permit(&mut sim, addr(PEER)), Done::Ok);
    assert_eq!(c.bind(&mut sim, 0x4000, addr(PEER)), Done::Ok);
    assert!(c.relays(&mut sim, 0x4000, relay, addr(PEER)));
    // A second Allocate on the same 5-tuple is still a mismatch.
    assert_eq!(c.allocate(&mut sim), Done::Failed(437, None));
}

#[test]
fn a_drained_data_plane_sends_new_clients_to_another_with_300() {
    let mut sim = Sim::new(config());
    sim.plane("dp1", DP1, 1, 0);
    sim.plane("dp2", DP2, 1, 0);
    let (mut old, relay) = relaying(&mut sim, "203.0.113.1:4002", DP1, 3);
    assert_eq!(sim.cluster.drain(sim.now, "dp1", true).unwrap(), 1);
    sim.step();
    assert!(sim.planes[0].drained, "the drain reached the data plane");
    let mut c = Peer::new("203.0.113.2:4002", addr(DP1), 4);
    assert_eq!(c.allocate(&mut sim), Done::Failed(300, Some(addr(DP2))));
    // Its allocations carry on.
    assert!(old.relays(&mut sim, 0x4000, relay, addr(PEER)));
    // Undrained, it takes new clients again.
    sim.cluster.drain(sim.now, "dp1", false).unwrap();
    sim.step();
    assert!(!sim.planes[0].drained);
    assert!(matches!(c.allocate(&mut sim), Done::Allocated(_)));
}

#[test]
fn pools_are_bound_taken_and_refilled() {
    let mut cfg = config();
    cfg.relay_pool = 2;
    let mut sim = Sim::new(cfg);
    sim.plane("dp1", DP1, 2, 0);
    // Attaching filled 2 sockets per worker.
    assert_eq!(sim.cluster.pooled(), 4);
    let before: Vec<SocketAddr> = sim.planes[0].sockets.keys().copied().collect();
    let (mut c, relay) = relaying(&mut sim, "203.0.113.1:4003", DP1, 5);
    assert!(
        before.contains(&relay),
        "the allocation took a pooled socket"
    );
    assert!(c.relays(&mut sim, 0x4000, relay, addr(PEER)));
    // The taken socket was replaced.
    assert_eq!(sim.cluster.pooled(), 4);
    assert_eq!(sim.planes[0].sockets.len(), 5);
}

#[test]
fn a_lost_batch_is_sent_again_and_the_tables_converge() {
    let mut sim = Sim::new(config());
    sim.plane("dp1", DP1, 2, 0);
    // The batch with the allocation's bind is lost: nothing follows it, so no gap
    // shows; the control plane sends it again after its silence, and the client (which
    // retransmits meanwhile) gets its allocation.
    let mut c = Peer::new("203.0.113.1:4004", addr(DP1), 6);
    sim.lose = 1;
    let Done::Allocated(relay) = c.allocate(&mut sim) else {
        panic!("no allocation")
    };
    assert_eq!(sim.lost, 1);
    // The batch with the permission is lost; the channel's batch reveals the gap.
    sim.lose = 1;
    assert_eq!(c.permit(&mut sim, addr(PEER)), Done::Ok);
    assert_eq!(c.bind(&mut sim, 0x4000, addr(PEER)), Done::Ok);
    assert_eq!(sim.planes[0].session.gaps(), 1);
    assert!(c.relays(&mut sim, 0x4000, relay, addr(PEER)));
    assert!(sim.cluster.seam_stats().batches_resent >= 2);
}

/// Runs one transaction per client, all at once: every request goes out before any is
/// answered; clients retransmit as the clock moves. `start` writes a client's request.
fn concurrently(
    sim: &mut Sim,
    clients: &mut [Peer],
    start: impl Fn(&mut Client, u64, &mut Vec<u8>),
) -> Vec<Done> {
    let mut done = vec![Done::NoAnswer; clients.len()];
    let mut out: Vec<(SocketAddr, SocketAddr, Vec<u8>)> = clients
        .iter_mut()
        .map(|c| {
            let mut req = Vec::new();
            start(&mut c.turn, sim.now.0, &mut req);
            (c.addr, c.server, req)
        })
        .collect();
    for _ in 0..2_000 {
        sim.burst(&out);
        out.clear();
        for (i, c) in clients.iter_mut().enumerate() {
            if done[i] != Done::NoAnswer {
                continue;
            }
            let mut next = Vec::new();
            done[i] = c.collect(sim, &mut next);
            if !next.is_empty() {
                out.push((c.addr, c.server, next));
            }
        }
        if done.iter().all(|d| *d != Done::NoAnswer) {
            return done;
        }
        if out.is_empty() {
            sim.advance(500);
            for (i, c) in clients.iter_mut().enumerate() {
                if done[i] != Done::NoAnswer {
                    continue;
                }
                let mut next = Vec::new();
                done[i] = c.collect(sim, &mut next);
                if done[i] != Done::NoAnswer {
                    continue;
                }
                if next.is_empty() {
                    match c.turn.handle_timeout(sim.now.0, &mut next) {
                        Event::Retry => {}
                        // Timed out: the application tries again (a new transaction).
                        Event::TimedOut { .. } => start(&mut c.turn, sim.now.0, &mut next),
                        _ => continue,
                    }
                }
                out.push((c.addr, c.server, next));
            }
        }
    }
    done
}

#[test]
fn a_queue_of_four_loses_nothing_for_good() {
    let mut sim = Sim::new(config());
    sim.plane("dp1", DP1, 2, 0);
    // Four messages: a burst of requests makes more (a turn each), and so do the
    // batches sent again after a loss: they are lost until the data plane catches up.
    // (Answers lost with them are retransmitted by their clients.)
    sim.capacity = 4;
    let mut clients: Vec<Peer> = (0..20u16)
        .map(|i| {
            Peer::new(
                &format!("203.0.113.{}:{}", 1 + i % 50, 5000 + i),
                addr(DP1),
                100 + u64::from(i),
            )
        })
        .collect();
    let allocated = concurrently(&mut sim, &mut clients, |c, now, req| {
        c.allocate(now, Default::default(), req).unwrap()
    });
    let relays: Vec<SocketAddr> = allocated
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Done::Allocated(r) => *r,
            other => panic!("client {i}: {other:?} ({} batches lost)", sim.lost),
        })
        .collect();
    let permitted = concurrently(&mut sim, &mut clients, |c, now, req| {
        c.create_permission(now, &[addr(PEER)], req).unwrap()
    });
    assert!(permitted.iter().all(|d| *d == Done::Ok), "{permitted:?}");
    let bound = concurrently(&mut sim, &mut clients, |c, now, req| {
        c.channel_bind(now, 0x4000, addr(PEER), req).unwrap()
    });
    assert!(bound.iter().all(|d| *d == Done::Ok), "{bound:?}");
    assert!(
        sim.lost > 0,
        "the queue never overflowed: the test tests nothing"
    );
    sim.advance(3_000);
    let mut relayed = 0;
    for (c, relay) in clients.iter_mut().zip(&relays) {
        relayed += usize::from(c.relays(&mut sim, 0x4000, *relay, addr(PEER)));
    }
    assert_eq!(relayed, 20, "{} batches lost on the way", sim.lost);
}

#[test]
fn a_data_plane_thirty_seconds_off_expires_permissions_on_time() {
    for skew in [30_000i64, -30_000] {
        let mut sim = Sim::new(config());
        sim.plane("dp1", DP1, 1, skew);
        let (mut c, relay) = relaying(&mut sim, "203.0.113.1:4006", DP1, 7);
        // Permissions last 300 s (RFC 8656); the channel 600 s, the allocation 600 s.
        sim.advance(299_000);
        assert!(
            c.indicates(&mut sim, relay, addr(PEER)),
            "skew {skew}: expired early"
        );
        sim.advance(2_000);
        assert!(
            !c.indicates(&mut sim, relay, addr(PEER)),
            "skew {skew}: expired late"
        );
    }
}

#[test]
fn a_wall_clock_step_changes_no_lifetime() {
    for step in [3_600_000i64, -3_600_000] {
        let mut sim = Sim::new(config());
        sim.plane("dp1", DP1, 1, 0);
        let (mut c, relay) = relaying(&mut sim, "203.0.113.1:4007", DP1, 8);
        // The wall clock jumps; the planes' clocks do not (they are monotonic).
        let wall = (sim.now.0 as i64 + step) as u64;
        sim.cluster.set_wall(sim.now, wall);
        sim.advance(1_000);
        assert!(c.relays(&mut sim, 0x4000, relay, addr(PEER)), "step {step}");
        assert_eq!(c.refresh(&mut sim, 600), Done::Ok, "step {step}");
        // The permission (300 s from its creation) expires on time, not an hour off.
        sim.advance(298_000);
        assert!(c.indicates(&mut sim, relay, addr(PEER)), "step {step}");
        sim.advance(2_000);
        assert!(!c.indicates(&mut sim, relay, addr(PEER)), "step {step}");
        // The allocation, refreshed for 600 s, lives on; renewed, the permission works.
        assert_eq!(c.permit(&mut sim, addr(PEER)), Done::Ok, "step {step}");
        assert!(c.indicates(&mut sim, relay, addr(PEER)), "step {step}");
    }
}

#[test]
fn planes_on_different_hosts_agree_on_a_refresh() {
    let mut sim = Sim::new(config());
    sim.plane("dp1", DP1, 1, 45_000);
    let (mut c, relay) = relaying(&mut sim, "203.0.113.1:4008", DP1, 9);
    sim.advance(500_000);
    assert_eq!(c.refresh(&mut sim, 600), Done::Ok);
    assert_eq!(c.permit(&mut sim, addr(PEER)), Done::Ok);
    assert_eq!(c.bind(&mut sim, 0x4000, addr(PEER)), Done::Ok);
    // Past the first lifetime, within the refreshed one: still relaying.
    sim.advance(200_000);
    assert!(c.relays(&mut sim, 0x4000, relay, addr(PEER)));
}

#[test]
fn batches_lost_with_a_link_are_sent_again_on_the_next() {
    let mut sim = Sim::new(config());
    sim.plane("dp1", DP1, 2, 0);
    let (mut c, relay) = relaying(&mut sim, "203.0.113.1:4009", DP1, 10);
    // A new peer's permission and channel: their batches are lost, and the link goes
    // before the control plane sends them again (the answers wait on the data plane).
    let peer2 = addr("198.51.100.9:9000");
    sim.lose = 2;
    let mut req = Vec::new();
    c.turn
        .create_permission(sim.now.0, &[peer2], &mut req)
        .unwrap();
    sim.send(c.addr, c.server, &req);
    let mut req = Vec::new();
    c.turn
        .channel_bind(sim.now.0, 0x4001, peer2, &mut req)
        .unwrap();
    sim.send(c.addr, c.server, &req);
    assert_eq!(sim.lost, 2);
    sim.detach(0);
    sim.attach(0);
    // The permission and the channel are on the data plane: ChannelData on 0x4001
    // reaches the new peer, and the new peer's data reaches the client.
    let mut frame = [0u8; 64];
    let n = Client::channel_data(0x4001, b"ping", &mut frame).unwrap();
    sim.send(c.addr, c.server, &frame[..n]);
    assert_eq!(sim.take(peer2), [(relay, b"ping".to_vec())], "replayed");
    assert!(c.indicates(&mut sim, relay, peer2));
    assert!(c.relays(&mut sim, 0x4000, relay, addr(PEER)));
}

/// Data plane `i` restarts: a new process with an empty table and no sockets, under
/// the same id (its certificate's), which attaches again.
fn restart_data_plane(sim: &mut Sim, i: usize) {
    sim.detach(i);
    let now = sim.now;
    let p = &mut sim.planes[i];
    let workers = p.cores.len();
    p.cores = (0..workers).map(|w| core(w, now)).collect();
    for c in &mut p.cores {
        c.add_listen(LISTEN, p.listen);
    }
    p.sockets.clear();
    p.version = 0;
    sim.attach(i);
}

#[test]
fn a_restarted_data_plane_gets_its_allocations_back() {
    let mut sim = Sim::new(config());
    sim.plane("dp1", DP1, 2, 0);
    let (mut a, relay_a) = relaying(&mut sim, "203.0.113.1:4010", DP1, 11);
    let (mut b, relay_b) = relaying(&mut sim, "203.0.113.2:4010", DP1, 14);
    assert_eq!(sim.cluster.stats().totals.allocations, 2);
    sim.advance(10_000);
    restart_data_plane(&mut sim, 0);
    // Both are bound again on their relayed addresses, on their workers, with their
    // permissions and channels: they relay at once, both ways, with no request.
    assert_eq!(sim.cluster.seam_stats().allocations_handed_back, 2);
    assert_eq!(sim.cluster.stats().totals.allocations, 2);
    assert!(a.relays(&mut sim, 0x4000, relay_a, addr(PEER)));
    assert!(b.relays(&mut sim, 0x4000, relay_b, addr(PEER)));
    assert!(a.indicates(&mut sim, relay_a, addr(PEER)));
    // Their lifetimes went on: a Refresh works, and the permission still expires on
    // time (300 s after it was made, not after the restart).
    assert_eq!(a.refresh(&mut sim, 600), Done::Ok);
    sim.advance(291_000);
    assert!(!a.indicates(&mut sim, relay_a, addr(PEER)));
    // The 5-tuple is still taken.
    assert_eq!(b.allocate(&mut sim), Done::Failed(437, None));
}

#[test]
fn a_data_plane_restarted_twice_and_one_that_lost_batches_agree_again() {
    let mut sim = Sim::new(config());
    sim.plane("dp1", DP1, 1, 0);
    let (mut c, relay) = relaying(&mut sim, "203.0.113.1:4013", DP1, 15);
    restart_data_plane(&mut sim, 0);
    restart_data_plane(&mut sim, 0);
    assert_eq!(sim.cluster.seam_stats().allocations_handed_back, 2);
    assert!(c.relays(&mut sim, 0x4000, relay, addr(PEER)));
    // A new allocation after the restarts relays too.
    let (mut d, relay_d) = relaying(&mut sim, "203.0.113.1:4014", DP1, 16);
    assert!(d.relays(&mut sim, 0x4000, relay_d, addr(PEER)));
    assert_eq!(sim.cluster.stats().totals.allocations, 2);
}

#[test]
fn a_pooled_allocation_lost_with_a_link_relays_after_the_next() {
    let mut cfg = config();
    cfg.relay_pool = 2;
    let mut sim = Sim::new(cfg);
    sim.plane("dp1", DP1, 1, 0);
    assert_eq!(sim.cluster.pooled(), 2);
    // The allocation takes a pooled socket; its batch is lost, then the link.
    let mut c = Peer::new("203.0.113.1:4012", addr(DP1), 13);
    let mut req = Vec::new();
    c.turn
        .allocate(sim.now.0, Default::default(), &mut req)
        .unwrap();
    sim.lose = 1;
    sim.send(c.addr, c.server, &req);
    let mut next = Vec::new();
    c.collect(&mut sim, &mut next);
    sim.send(c.addr, c.server, &next);
    assert_eq!(sim.lost, 1);
    // Reattaching closes the pool; the allocation's socket is bound again.
    sim.detach(0);
    sim.attach(0);
    let Done::Allocated(relay) = c.run(&mut sim, next, PATIENCE) else {
        panic!("no allocation")
    };
    assert_eq!(c.permit(&mut sim, addr(PEER)), Done::Ok);
    assert!(c.indicates(&mut sim, relay, addr(PEER)));
}

#[test]
fn the_data_plane_answers_the_first_allocate_as_the_control_plane_would() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(config());
    sim.plane("dp1", DP1, 1, 0);
    let (mut c, relay) = relaying(&mut sim, "203.0.113.1:4013", DP1, 14);
    assert!(c.relays(&mut sim, 0x4000, relay, addr(PEER)));
    // The 401 came from the worker: the control plane saw three requests, not four.
    assert_eq!(sim.planes[0].cores[0].ctr.challenged.load(Relaxed), 1);
    assert_eq!(sim.cluster.stats().totals.punted_requests, 3);
    // Byte for byte the control plane's 401 for the same request at the same time.
    let client: SocketAddr = "203.0.113.1:4014".parse().unwrap();
    let mut req = Vec::new();
    Client::new("alice", "wonderland", 15)
        .allocate(sim.now.0, Default::default(), &mut req)
        .unwrap();
    sim.send(client, addr(DP1), &req);
    let from_dp = sim.take(client);
    assert_eq!(from_dp.len(), 1);
    let mut server = Server::new(
        config(),
        Credentials::new(REALM, &[("alice".into(), "wonderland".into())], &[]),
        [42; 32],
        7,
    );
    let mut out = Vec::new();
    server.handle(sim.now, FiveTuple::udp(client, addr(DP1)), &req, &mut out);
    let [turnpike_controlplane::Output::Transmit { data, .. }] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(&from_dp[0].1, data);
}

/// What a client got: the channel and data of one ChannelData or Data indication
/// (channel 0 for the latter, with its peer).
fn got(c: &mut Peer, sim: &mut Sim) -> Vec<(u16, Option<SocketAddr>, Vec<u8>)> {
    let now = sim.now.0;
    sim.take(c.addr)
        .into_iter()
        .filter_map(|(_, d)| match c.turn.handle(now, &d, &mut Vec::new()) {
            Event::ChannelData { channel, data } => Some((channel, None, data.to_vec())),
            Event::Data { peer, data } => Some((0, Some(peer), data.to_vec())),
            _ => None,
        })
        .collect()
}

/// Two clients of one relay, each the other's peer (both ends of a call fell back to
/// TURN on the same server): on one worker, what A sends to B's relayed address reaches
/// B without going out of A's relay socket; on two workers, it goes through the kernel
/// (here the simulated network) and reaches B the same way.
#[test]
fn two_clients_of_one_relay_reach_each_other_through_the_hairpin() {
    for workers in [1, 2] {
        let mut sim = Sim::new(config());
        sim.plane("dp1", DP1, workers, 0);
        // Ports 4000 and 4001: one worker each when there are two.
        let mut a = Peer::new("203.0.113.1:4000", addr(DP1), 1);
        let mut b = Peer::new("203.0.113.2:4001", addr(DP1), 2);
        let Done::Allocated(ra) = a.allocate(&mut sim) else {
            panic!("no allocation for A")
        };
        let Done::Allocated(rb) = b.allocate(&mut sim) else {
            panic!("no allocation for B")
        };
        // The server's own relayed addresses are peers like any other (the policy
        // allows them by default).
        assert_eq!(a.permit(&mut sim, rb), Done::Ok);
        assert_eq!(a.bind(&mut sim, 0x4000, rb), Done::Ok);
        // Both ends are now checked: B has no permission for A's relayed address yet.
        let mut frame = [0u8; 64];
        let n = Client::channel_data(0x4000, b"ping", &mut frame).unwrap();
        let deliver = |sim: &mut Sim| {
            // Through the kernel: what reached B's relayed address arrives there.
            for (from, d) in sim.take(rb) {
                assert_eq!(workers, 2, "the hairpin went through the kernel");
                sim.send(from, rb, &d);
            }
            for (from, d) in sim.take(ra) {
                assert_eq!(workers, 2, "the hairpin went through the kernel");
                sim.send(from, ra, &d);
            }
        };
        sim.send(a.addr, a.server, &frame[..n]);
        deliver(&mut sim);
        assert!(got(&mut b, &mut sim).is_empty(), "{workers} workers");
        assert_eq!(b.permit(&mut sim, ra), Done::Ok);
        sim.send(a.addr, a.server, &frame[..n]);
        deliver(&mut sim);
        assert_eq!(
            got(&mut b, &mut sim),
            [(0, Some(ra), b"ping".to_vec())],
            "{workers} workers"
        );
        // With B's channel to A bound (and confirmed by its response): ChannelData.
        assert_eq!(b.bind(&mut sim, 0x4001, ra), Done::Ok);
        sim.send(a.addr, a.server, &frame[..n]);
        deliver(&mut sim);
        assert_eq!(got(&mut b, &mut sim), [(0x4001, None, b"ping".to_vec())]);
        // B answers with a Send indication: on A's channel.
        let mut frame = [0u8; 128];
        let n = b.turn.send_indication(ra, b"pong", &mut frame).unwrap();
        sim.send(b.addr, b.server, &frame[..n]);
        deliver(&mut sim);
        assert_eq!(got(&mut a, &mut sim), [(0x4000, None, b"pong".to_vec())]);
        let hairpinned: u64 = sim.planes[0]
            .cores
            .iter()
            .map(|c| c.ctr.snapshot().hairpinned)
            .sum();
        assert_eq!(hairpinned, if workers == 1 { 3 } else { 0 });
    }
}
