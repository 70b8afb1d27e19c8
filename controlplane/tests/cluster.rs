//! The cell as a sans-IO state machine: several data planes attached to one [`Cluster`],
//! driven with a virtual clock and real sans-IO TURN clients. No sockets, no sleeps.
#![allow(clippy::unwrap_used)]

mod harness;

use std::net::SocketAddr;

use harness::{REALM, T0, config};
use turnpike_controlplane::{
    AllocationSnapshot, Cluster, ClusterOutput, ConnId, Credentials, FiveTuple, Millis, Server,
    ServerConfig, Transport,
};
use turnpike_plane::{Bind, Down, Hello, LoadReport, Punted, RelayIp, Snapshot, TableChange, Up};
use turnpike_proto::attr::{AlternateServer, ErrorCode, XorRelayedAddress};
use turnpike_proto::client::{Client, Event};
use turnpike_proto::stun::Message;

const DP1: &str = "192.0.2.10:3478";
const DP2: &str = "192.0.2.20:3478";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn hello(id: &str, listen: &str, table: Vec<AllocationSnapshot>) -> Hello {
    let listen = addr(listen);
    Hello {
        id: id.to_owned(),
        listening: vec![(Transport::Udp, listen)],
        relay_ips: vec![RelayIp::local(listen.ip())],
        workers: 4,
        version: "test".into(),
        table: (!table.is_empty()).then_some(Snapshot {
            version: 10,
            allocations: table,
            complete: true,
        }),
        started: 0,
    }
}

/// The binds of a message down.
fn binds(m: &Down) -> &[Bind] {
    match m {
        Down::Batch(b) => &b.binds,
        _ => &[],
    }
}

/// The datagrams of a message down.
fn datagrams(m: &Down) -> &[turnpike_plane::Datagram] {
    match m {
        Down::Send { datagrams, .. } => datagrams,
        _ => &[],
    }
}

/// The last datagram sent.
fn last_datagram(sent: &[(ConnId, Down)]) -> Vec<u8> {
    sent.iter()
        .rev()
        .find_map(|(_, m)| datagrams(m).last().map(|d| d.data.clone()))
        .unwrap()
}

/// A cell and what it sent, per data-plane stream.
struct Cell {
    cluster: Cluster,
    now: Millis,
    sent: Vec<(ConnId, Down)>,
    /// Binds are acknowledged by this stream (normally the one asked).
    ack_from: Option<ConnId>,
}

fn cell(cfg: ServerConfig) -> Cell {
    let creds = Credentials::new(REALM, &[("alice".into(), "wonderland".into())], &[]);
    Cell {
        cluster: Cluster::new(Server::new(cfg, creds, [42; 32], 7)),
        now: T0,
        sent: Vec::new(),
        ack_from: None,
    }
}

impl Cell {
    /// What the cluster sent; every batch is acknowledged, as a data plane does.
    fn collect(&mut self) -> Vec<(ConnId, Down)> {
        let mut new = Vec::new();
        while let Some(o) = self.cluster.poll_output() {
            if let ClusterOutput::Send { conn, msg } = o {
                new.push((conn, msg));
            }
        }
        for (conn, m) in &new {
            if let Down::Batch(b) = m {
                self.cluster
                    .handle_message(self.now, *conn, Up::TableAck { version: b.version });
            }
        }
        self.sent.extend(new.iter().cloned());
        new
    }

    fn punt(&mut self, conn: ConnId, worker: u32, t: FiveTuple, data: &[u8]) {
        self.cluster.handle_message(
            self.now,
            conn,
            Up::Punted(vec![Punted {
                worker,
                tuple: t,
                data: data.to_vec(),
            }]),
        );
    }

    /// Delivers `req` through data plane `conn`, worker `worker`, acknowledges binds,
    /// feeds the datagrams sent back to `t` to the client, follows 401/438 retries.
    fn run(
        &mut self,
        c: &mut Client,
        conn: ConnId,
        worker: u32,
        t: FiveTuple,
        req: &[u8],
    ) -> Result<(), u16> {
        let mut req = req.to_vec();
        for _ in 0..8 {
            self.punt(conn, worker, t, &req);
            let mut answers = Vec::new();
            let mut pending = self.collect();
            while !pending.is_empty() {
                let mut next = Vec::new();
                for (to, m) in pending {
                    for b in binds(&m) {
                        if b.tuple.is_some() {
                            assert_eq!(to, conn, "the bind goes to the data plane of the request");
                            assert_eq!(b.worker, worker, "and to its worker");
                        }
                        let from = self.ack_from.unwrap_or(to);
                        self.cluster.handle_message(
                            self.now,
                            from,
                            Up::BindResult {
                                id: b.id,
                                result: Ok(()),
                            },
                        );
                        next.extend(self.collect());
                    }
                    for d in datagrams(&m) {
                        assert_eq!(to, conn, "answers go back where the request came from");
                        assert_eq!(d.worker, worker);
                        if d.tuple == t {
                            answers.push(d.data.clone());
                        }
                    }
                }
                pending = next;
            }
            let mut retry = Vec::new();
            for a in &answers {
                match c.handle(self.now.0, a, &mut retry) {
                    Event::Retry => {}
                    Event::Failed { code, .. } => return Err(code),
                    Event::None => {}
                    _ => return Ok(()),
                }
            }
            if retry.is_empty() {
                return Err(0);
            }
            req = retry;
        }
        Err(0)
    }

    fn allocate(
        &mut self,
        c: &mut Client,
        conn: ConnId,
        worker: u32,
        t: FiveTuple,
    ) -> Result<(), u16> {
        let mut req = Vec::new();
        c.allocate(self.now.0, Default::default(), &mut req)
            .unwrap();
        self.run(c, conn, worker, t, &req)
    }

    fn changes_to(&self, conn: ConnId) -> Vec<(TableChange, u32)> {
        self.sent
            .iter()
            .filter(|(to, _)| *to == conn)
            .filter_map(|(_, m)| match m {
                Down::Batch(b) => Some(b.changes.iter().map(|(w, c)| (c.clone(), *w))),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn advance(&mut self, secs: u64) {
        self.now = self.now.plus_secs(secs);
        self.cluster.handle_timeout(self.now);
        self.collect();
    }
}

fn tuple(client: &str, server: &str) -> FiveTuple {
    FiveTuple::udp(addr(client), addr(server))
}

fn alice() -> Client {
    Client::new("alice", "wonderland", 1)
}

#[test]
fn binds_answers_and_table_changes_go_to_the_data_plane_and_worker_of_the_client() {
    let mut cell = cell(config());
    let dp1 = cell.cluster.attach(T0, hello("dp1", DP1, vec![]));
    let dp2 = cell.cluster.attach(T0, hello("dp2", DP2, vec![]));
    let t1 = tuple("203.0.113.1:4000", DP1);
    let t2 = tuple("203.0.113.2:4000", DP2);
    let (mut a, mut b) = (alice(), Client::new("alice", "wonderland", 2));
    assert_eq!(cell.allocate(&mut a, dp1, 3, t1), Ok(()));
    assert_eq!(cell.allocate(&mut b, dp2, 1, t2), Ok(()));
    let adds = |cell: &Cell, conn| {
        cell.changes_to(conn)
            .into_iter()
            .filter_map(|(c, w)| match c {
                TableChange::AllocationAdd { tuple, relays, .. } => Some((tuple, relays, w)),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let (on1, on2) = (adds(&cell, dp1), adds(&cell, dp2));
    assert_eq!(on1.len(), 1);
    assert_eq!(on2.len(), 1);
    // Each data plane gets its own allocation, for the worker that holds the 5-tuple,
    // relayed from its own relay IP.
    assert_eq!(
        (on1[0].0, on1[0].2, on1[0].1[0].ip()),
        (t1, 3, addr(DP1).ip())
    );
    assert_eq!(
        (on2[0].0, on2[0].2, on2[0].1[0].ip()),
        (t2, 1, addr(DP2).ip())
    );
    assert_eq!(cell.cluster.routes(), 2);
}

#[test]
fn a_bind_acknowledged_by_another_data_plane_is_ignored() {
    let mut cell = cell(config());
    let dp1 = cell.cluster.attach(T0, hello("dp1", DP1, vec![]));
    let dp2 = cell.cluster.attach(T0, hello("dp2", DP2, vec![]));
    cell.ack_from = Some(dp2);
    let r = cell.allocate(&mut alice(), dp1, 0, tuple("203.0.113.1:4000", DP1));
    assert!(r.is_err(), "no allocation from a forged acknowledgement");
    assert!(cell.changes_to(dp1).is_empty() && cell.changes_to(dp2).is_empty());
    let stats = cell.cluster.stats();
    assert_eq!(stats.totals.ownership_violations, 1);
}

#[test]
fn unauthenticated_requests_leave_no_routes() {
    let mut cell = cell(config());
    let dp1 = cell.cluster.attach(T0, hello("dp1", DP1, vec![]));
    for i in 0..20_000u32 {
        let client = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 1024));
        let mut req = Vec::new();
        Client::new("x", "y", u64::from(i))
            .allocate(T0.0, Default::default(), &mut req)
            .unwrap();
        cell.punt(dp1, 0, FiveTuple::udp(client, addr(DP1)), &req);
        cell.collect();
    }
    assert_eq!(cell.cluster.routes(), 0);
}

#[test]
fn drain_sends_new_clients_to_the_least_loaded_open_data_plane() {
    let mut cell = cell(config());
    let dp1 = cell.cluster.attach(T0, hello("dp1", DP1, vec![]));
    let dp2 = cell.cluster.attach(T0, hello("dp2", DP2, vec![]));
    let dp3 = cell
        .cluster
        .attach(T0, hello("dp3", "192.0.2.30:3478", vec![]));
    let load = |n| {
        Up::Load(LoadReport {
            allocations: n,
            ..Default::default()
        })
    };
    cell.cluster.handle_message(T0, dp2, load(50));
    cell.cluster.handle_message(T0, dp3, load(5));
    assert_eq!(cell.cluster.drain(T0, "dp1", true).unwrap(), 0);
    assert!(
        cell.collect()
            .iter()
            .any(|(to, m)| *to == dp1 && matches!(m, Down::Batch(b) if b.drain == Some(true)))
    );
    // A new Allocate at dp1 is sent to dp3 (least loaded), with 300.
    let t = tuple("203.0.113.1:4000", DP1);
    let mut c = alice();
    assert_eq!(cell.allocate(&mut c, dp1, 0, t), Err(300));
    let last = last_datagram(&cell.sent);
    let m = Message::parse(&last).unwrap();
    assert_eq!(m.attr::<ErrorCode>().unwrap().unwrap().code, 300);
    assert_eq!(
        m.attr::<AlternateServer>().unwrap().unwrap().0,
        addr("192.0.2.30:3478")
    );
    // Undrained, it serves again; an unknown data plane is an error.
    cell.cluster.drain(T0, "dp1", false).unwrap();
    assert_eq!(cell.allocate(&mut alice(), dp1, 0, t), Ok(()));
    assert!(cell.cluster.drain(T0, "nope", true).is_err());
}

#[test]
fn a_reattached_data_plane_restores_its_allocations_and_routes() {
    let mut cell = cell(config());
    let dp1 = cell.cluster.attach(T0, hello("dp1", DP1, vec![]));
    let t = tuple("203.0.113.1:4000", DP1);
    let mut c = alice();
    assert_eq!(cell.allocate(&mut c, dp1, 2, t), Ok(()));
    let info = cell.cluster.list("", "")[0].clone();
    cell.cluster.detach(T0, dp1);
    assert_eq!(
        cell.cluster.routes(),
        0,
        "a detached data plane's routes go"
    );
    // It comes back (a new stream) with its table: requests on the allocation succeed
    // and are answered on the new stream, to the worker in the table.
    let state = info.row;
    let dp1b = cell
        .cluster
        .attach(T0.plus_secs(5), hello("dp1", DP1, vec![state]));
    cell.now = T0.plus_secs(5);
    let mut req = Vec::new();
    c.refresh(cell.now.0, 600, &mut req).unwrap();
    assert_eq!(cell.run(&mut c, dp1b, 2, t, &req), Ok(()));
    assert!(
        cell.changes_to(dp1b)
            .iter()
            .any(|(ch, _)| matches!(ch, TableChange::AllocationRefresh { .. }))
    );
}

#[test]
fn a_data_plane_cannot_restore_what_it_does_not_own() {
    let mut cell = cell(config());
    let dp1 = cell.cluster.attach(T0, hello("dp1", DP1, vec![]));
    let t = tuple("203.0.113.1:4000", DP1);
    assert_eq!(cell.allocate(&mut alice(), dp1, 0, t), Ok(()));
    let state = cell.cluster.list("", "")[0].row.clone();
    // dp2 claims dp1's allocation (its 5-tuple is on dp1's listening address).
    let _dp2 = cell
        .cluster
        .attach(T0, hello("dp2", DP2, vec![state.clone()]));
    assert_eq!(cell.cluster.stats().totals.ownership_violations, 1);
    // And an invented allocation on dp2's own address with someone else's relay IP.
    let mut fake = state.clone();
    fake.id = turnpike_controlplane::AllocationId(999);
    fake.tuple = tuple("203.0.113.9:1", DP2);
    let _dp2 = cell.cluster.attach(T0, hello("dp2", DP2, vec![fake]));
    assert_eq!(cell.cluster.stats().totals.ownership_violations, 2);
    assert_eq!(cell.cluster.list("", "").len(), 1);
}

#[test]
fn expiry_removes_the_allocation_on_its_owner_and_forgets_its_route() {
    let mut cfg = config();
    cfg.default_lifetime = 600;
    let mut cell = cell(cfg);
    let dp1 = cell.cluster.attach(T0, hello("dp1", DP1, vec![]));
    let t = tuple("203.0.113.1:4000", DP1);
    assert_eq!(cell.allocate(&mut alice(), dp1, 0, t), Ok(()));
    assert_eq!(cell.cluster.routes(), 1);
    cell.advance(599);
    assert!(
        !cell
            .changes_to(dp1)
            .iter()
            .any(|(c, _)| matches!(c, TableChange::AllocationRemove { .. }))
    );
    cell.advance(2);
    assert!(
        cell.changes_to(dp1)
            .iter()
            .any(|(c, _)| matches!(c, TableChange::AllocationRemove { .. }))
    );
    cell.advance(2);
    assert_eq!(cell.cluster.routes(), 0);
    // Batches are numbered per data plane, strictly increasing.
    let versions: Vec<u64> = cell
        .sent
        .iter()
        .filter_map(|(_, m)| match m {
            Down::Batch(b) => Some(b.version),
            _ => None,
        })
        .collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
}

#[test]
fn usage_reports_count_only_for_owned_allocations() {
    let mut cell = cell(config());
    let dp1 = cell.cluster.attach(T0, hello("dp1", DP1, vec![]));
    let dp2 = cell.cluster.attach(T0, hello("dp2", DP2, vec![]));
    assert_eq!(
        cell.allocate(&mut alice(), dp1, 0, tuple("203.0.113.1:4000", DP1)),
        Ok(())
    );
    let id = cell.cluster.list("", "")[0].row.id;
    let report = |bytes| {
        let u = turnpike_plane::Usage {
            to_peer: turnpike_plane::Traffic { packets: 1, bytes },
            ..Default::default()
        };
        Up::Usage(vec![(id, u)])
    };
    cell.cluster.handle_message(T0, dp2, report(1_000_000_000));
    cell.cluster.handle_message(T0, dp1, report(100));
    let usage = cell.cluster.list("", "")[0].usage.unwrap();
    assert_eq!(usage.to_peer.bytes, 100);
    assert_eq!(cell.cluster.stats().totals.ownership_violations, 1);
}

#[test]
fn a_batch_of_requests_is_answered_in_one_message() {
    let mut cell = cell(config());
    let dp1 = cell.cluster.attach(T0, hello("dp1", DP1, vec![]));
    // (Attaching sends the data plane its first batch: how to answer a 401 itself.)
    cell.collect();
    let requests = (0..3u16)
        .map(|i| {
            let mut req = Vec::new();
            Client::new("alice", "wonderland", u64::from(i))
                .allocate(T0.0, Default::default(), &mut req)
                .unwrap();
            Punted {
                worker: 1,
                tuple: tuple(&format!("203.0.113.1:{}", 4000 + i), DP1),
                data: req,
            }
        })
        .collect();
    cell.cluster.handle_message(T0, dp1, Up::Punted(requests));
    let sent = cell.collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let d = datagrams(&sent[0].1);
    assert_eq!(d.len(), 3);
    assert!(d.iter().all(|d| d.worker == 1));
}

#[test]
fn a_plain_allocate_takes_a_pooled_relay_without_a_bind_round_trip() {
    let mut cfg = config();
    cfg.relay_pool = 2;
    let mut cell = cell(cfg);
    let dp1 = cell.cluster.attach(T0, hello("dp1", DP1, vec![]));
    // Attaching asks each of its 4 workers for 2 pooled sockets (one relay IP).
    let asks: Vec<Bind> = cell
        .collect()
        .into_iter()
        .filter(|(to, _)| *to == dp1)
        .flat_map(|(_, m)| binds(&m).to_vec())
        .collect();
    assert_eq!(asks.len(), 8);
    assert!(
        asks.iter()
            .all(|b| b.tuple.is_none() && b.relays.len() == 1)
    );
    for b in &asks {
        cell.cluster.handle_message(
            T0,
            dp1,
            Up::BindResult {
                id: b.id,
                result: Ok(()),
            },
        );
    }
    assert_eq!(cell.cluster.pooled(), 8);
    let pooled_w3: Vec<SocketAddr> = asks
        .iter()
        .filter(|b| b.worker == 3)
        .map(|b| b.relays[0])
        .collect();
    // Worker 3's client allocates: no BindRequest for it, a pooled relay of worker 3.
    cell.sent.clear();
    let t = tuple("203.0.113.1:4000", DP1);
    assert_eq!(cell.allocate(&mut alice(), dp1, 3, t), Ok(()));
    assert!(
        !cell
            .sent
            .iter()
            .any(|(_, m)| binds(m).iter().any(|b| b.tuple.is_some()))
    );
    // The taken socket is replaced at once, off the allocation's path.
    assert_eq!(
        cell.sent
            .iter()
            .flat_map(|(_, m)| binds(m))
            .filter(|b| b.tuple.is_none() && b.worker == 3)
            .count(),
        1
    );
    let relays: Vec<SocketAddr> = cell
        .changes_to(dp1)
        .into_iter()
        .find_map(|(c, w)| match c {
            TableChange::AllocationAdd { relays, .. } => Some((relays, w)),
            _ => None,
        })
        .map(|(r, w)| {
            assert_eq!(w, 3);
            r
        })
        .unwrap();
    assert!(
        pooled_w3.contains(&relays[0]),
        "{relays:?} not from {pooled_w3:?}"
    );
    // (The harness acknowledged that bind: the pool is full again.)
    assert_eq!(cell.cluster.pooled(), 8);
    // Full pools: the sweep asks for nothing more.
    cell.sent.clear();
    cell.advance(1);
    assert!(!cell.sent.iter().any(|(_, m)| !binds(m).is_empty()));
    // A detached data plane's pool is gone (its ports are free again).
    cell.cluster.detach(T0, dp1);
    assert_eq!(cell.cluster.pooled(), 0);
}

/// A TCP client's allocation ends when its connection closes (RFC 8656 §3.1), on the
/// word of the data plane that owns it only.
#[test]
fn a_closed_connection_ends_its_allocation_on_its_owner_only() {
    let mut cell = cell(config());
    let dp1 = cell.cluster.attach(T0, hello("dp1", DP1, vec![]));
    let dp2 = cell.cluster.attach(T0, hello("dp2", DP2, vec![]));
    let t = FiveTuple {
        transport: Transport::Tcp,
        client: addr("203.0.113.1:4000"),
        server: addr(DP1),
    };
    assert_eq!(cell.allocate(&mut alice(), dp1, 1, t), Ok(()));
    assert_eq!(cell.cluster.routes(), 1);
    let closed = || Up::ConnectionClosed {
        worker: 1,
        tuple: t,
    };
    let removed = |cell: &Cell, conn| {
        cell.changes_to(conn)
            .iter()
            .any(|(c, _)| matches!(c, TableChange::AllocationRemove { .. }))
    };
    // Another data plane cannot end it.
    cell.cluster.handle_message(cell.now, dp2, closed());
    cell.collect();
    assert!(!removed(&cell, dp1) && !removed(&cell, dp2));
    assert_eq!(cell.cluster.stats().totals.ownership_violations, 1);
    // Its own data plane does: the allocation and its route are gone at once.
    cell.cluster.handle_message(cell.now, dp1, closed());
    cell.collect();
    assert!(removed(&cell, dp1));
    assert_eq!(cell.cluster.stats().totals.allocations, 0);
    cell.advance(1);
    assert_eq!(cell.cluster.routes(), 0);
    // A late or repeated notice is harmless.
    cell.cluster.handle_message(cell.now, dp1, closed());
    assert_eq!(cell.cluster.stats().totals.ownership_violations, 1);
}

/// A TCP or TLS client redirected by a drain is given the other data plane's address
/// for its own transport.
#[test]
fn drain_redirects_a_stream_client_to_the_same_transport() {
    let mut cell = cell(config());
    let with_streams = |id: &str, ip: &str| {
        let mut h = hello(id, &format!("{ip}:3478"), vec![]);
        for (transport, port) in [(Transport::Tcp, 3478), (Transport::Tls, 443)] {
            h.listening.push((transport, addr(&format!("{ip}:{port}"))));
        }
        h
    };
    let dp1 = cell.cluster.attach(T0, with_streams("dp1", "192.0.2.10"));
    let _dp2 = cell.cluster.attach(T0, with_streams("dp2", "192.0.2.20"));
    cell.cluster.drain(T0, "dp1", true).unwrap();
    cell.collect();
    let t = FiveTuple {
        transport: Transport::Tls,
        client: addr("203.0.113.1:4000"),
        server: addr("192.0.2.10:443"),
    };
    assert_eq!(cell.allocate(&mut alice(), dp1, 0, t), Err(300));
    let last = last_datagram(&cell.sent);
    let m = Message::parse(&last).unwrap();
    assert_eq!(
        m.attr::<AlternateServer>().unwrap().unwrap().0,
        addr("192.0.2.20:443")
    );
}

/// A user revoked fleet-wide loses its allocations and is refused afterwards, whatever
/// its credentials; taken off the list, it is served again.
#[test]
fn a_revoked_user_is_refused_and_loses_its_allocations() {
    let mut cell = cell(config());
    let dp1 = cell.cluster.attach(T0, hello("dp1", DP1, vec![]));
    let t = tuple("203.0.113.1:4000", DP1);
    assert_eq!(cell.allocate(&mut alice(), dp1, 0, t), Ok(()));
    assert_eq!(cell.cluster.set_revoked_users(T0, vec!["alice".into()]), 1);
    cell.collect();
    assert!(
        cell.changes_to(dp1)
            .iter()
            .any(|(c, _)| matches!(c, TableChange::AllocationRemove { .. }))
    );
    let t2 = tuple("203.0.113.2:4000", DP1);
    assert_eq!(
        cell.allocate(&mut Client::new("alice", "wonderland", 9), dp1, 0, t2),
        Err(401)
    );
    // Already revoked: nothing more ends.
    assert_eq!(cell.cluster.set_revoked_users(T0, vec!["alice".into()]), 0);
    cell.cluster.set_revoked_users(T0, Vec::new());
    assert_eq!(
        cell.allocate(&mut Client::new("alice", "wonderland", 10), dp1, 0, t2),
        Ok(())
    );
}

/// A data plane behind a 1:1 NAT (its Hello maps its private relay IP to a public one):
/// clients are given the public address, redirected to the public address, and cannot
/// use the public form of its listening socket as a peer; binds and the table keep the
/// private address.
#[test]
fn data_planes_behind_a_nat_are_advertised_by_their_public_addresses() {
    let nat = |id: &str, private: &str, public: &str| {
        let mut h = hello(id, private, vec![]);
        let ip = addr(private).ip();
        h.relay_ips = vec![RelayIp {
            ip,
            advertised: public.parse().unwrap(),
        }];
        h
    };
    let mut cell = cell(config());
    let dp1 = cell
        .cluster
        .attach(T0, nat("dp1", "10.0.0.1:3478", "203.0.113.1"));
    let dp2 = cell
        .cluster
        .attach(T0, nat("dp2", "10.0.0.2:3478", "203.0.113.2"));
    // Served at dp2: the relayed address is the public one, the table the private one.
    let t = tuple("198.51.100.1:4000", "10.0.0.2:3478");
    let mut c = alice();
    assert_eq!(cell.allocate(&mut c, dp2, 0, t), Ok(()));
    let last = last_datagram(&cell.sent);
    let m = Message::parse(&last).unwrap();
    let relayed = [m.attr::<XorRelayedAddress>().unwrap().unwrap().0];
    assert_eq!(relayed[0].ip(), addr("203.0.113.2:0").ip());
    let tabled = cell.changes_to(dp2).into_iter().find_map(|(c, _)| match c {
        TableChange::AllocationAdd { relays, .. } => Some(relays),
        _ => None,
    });
    assert_eq!(
        tabled.unwrap(),
        vec![SocketAddr::new(addr("10.0.0.2:0").ip(), relayed[0].port())]
    );
    // The public form of a listening socket is one of the server's own.
    let policy = &cell.cluster.server().config().policy;
    assert!(policy.own_sockets().contains(&addr("203.0.113.1:3478")));
    assert!(policy.own_sockets().contains(&addr("10.0.0.1:3478")));
    // dp1 drained: its new clients go to dp2's public address.
    cell.cluster.drain(T0, "dp1", true).unwrap();
    cell.collect();
    let t = tuple("198.51.100.2:4000", "10.0.0.1:3478");
    assert_eq!(cell.allocate(&mut alice(), dp1, 0, t), Err(300));
    let last = last_datagram(&cell.sent);
    let m = Message::parse(&last).unwrap();
    assert_eq!(
        m.attr::<AlternateServer>().unwrap().unwrap().0,
        addr("203.0.113.2:3478")
    );
}

#[test]
fn a_restarted_data_plane_is_handed_its_udp_allocations_back_and_tcp_ones_end() {
    let mut cell = cell(config());
    let dp1 = cell.cluster.attach(T0, hello("dp1", DP1, vec![]));
    let udp = tuple("203.0.113.1:4000", DP1);
    let tcp = FiveTuple {
        transport: Transport::Tcp,
        ..tuple("203.0.113.2:4000", DP1)
    };
    let peer = addr("198.51.100.7:9000");
    let mut a = alice();
    assert_eq!(cell.allocate(&mut a, dp1, 2, udp), Ok(()));
    let mut req = Vec::new();
    a.channel_bind(cell.now.0, 0x4001, peer, &mut req).unwrap();
    assert_eq!(cell.run(&mut a, dp1, 2, udp, &req), Ok(()));
    let mut b = Client::new("alice", "wonderland", 2);
    assert_eq!(cell.allocate(&mut b, dp1, 1, tcp), Ok(()));
    let before = cell.cluster.list("", "");
    let relays = |id| {
        before
            .iter()
            .find(|v| v.row.id == id)
            .map(|v| v.row.relays.clone())
            .unwrap()
    };
    let udp_id = before.iter().find(|v| v.row.tuple == udp).unwrap().row.id;

    // The process dies (its stream ends) and a new one attaches under its id with an
    // empty table.
    cell.cluster.detach(T0.plus_secs(20), dp1);
    cell.now = T0.plus_secs(21);
    let dp1b = cell.cluster.attach(cell.now, hello("dp1", DP1, vec![]));
    let sent = cell.collect();
    let batch = sent
        .iter()
        .find_map(|(to, m)| match m {
            Down::Batch(b) if *to == dp1b && !b.binds.is_empty() => Some(b.clone()),
            _ => None,
        })
        .expect("a batch handing the allocation back");
    // Its relayed address is bound again, on its worker, for its 5-tuple...
    let bind = batch
        .binds
        .iter()
        .find(|b| b.tuple == Some(udp))
        .expect("a bind of the UDP allocation");
    assert_eq!(bind.worker, 2);
    assert_eq!(bind.relays, relays(udp_id));
    // ...and its allocation, permission and channel installed with their remaining
    // lifetimes, the channel already confirmed.
    let mut kinds = Vec::new();
    for (w, c) in &batch.changes {
        assert_eq!(*w, 2);
        match c {
            TableChange::AllocationAdd { id, tuple, .. } => {
                assert_eq!((*id, *tuple), (udp_id, udp));
                kinds.push("allocation");
            }
            TableChange::PermissionSet { peer: p, .. } => {
                assert_eq!(*p, peer.ip());
                kinds.push("permission");
            }
            TableChange::ChannelSet {
                channel,
                confirmed,
                deadline,
                ..
            } => {
                assert_eq!(*channel, 0x4001);
                assert!(*confirmed);
                assert_eq!(
                    *deadline,
                    T0.plus_secs(600),
                    "its own deadline, not a new one"
                );
                kinds.push("channel");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(kinds, ["allocation", "permission", "channel"]);
    // The TCP allocation's connection went with the process: it ended.
    let after = cell.cluster.list("", "");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].row.id, udp_id);
    let seam = cell.cluster.seam_stats();
    assert_eq!(
        (seam.allocations_handed_back, seam.allocations_lost),
        (1, 1)
    );
    // Requests on the allocation are answered through the new stream.
    let mut req = Vec::new();
    a.refresh(cell.now.0, 600, &mut req).unwrap();
    assert_eq!(cell.run(&mut a, dp1b, 2, udp, &req), Ok(()));

    // It restarts again, and this time its relayed address cannot be bound: the
    // allocation ends rather than being kept with nothing relaying.
    cell.cluster.detach(cell.now, dp1b);
    let dp1c = cell.cluster.attach(cell.now, hello("dp1", DP1, vec![]));
    let mut failed = 0;
    while let Some(o) = cell.cluster.poll_output() {
        if let ClusterOutput::Send {
            msg: Down::Batch(b),
            ..
        } = o
        {
            for bind in b.binds.iter().filter(|b| b.tuple == Some(udp)) {
                cell.cluster.handle_message(
                    cell.now,
                    dp1c,
                    Up::BindResult {
                        id: bind.id,
                        result: Err(turnpike_plane::BindError::AddressInUse),
                    },
                );
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 1);
    assert!(cell.cluster.list("", "").is_empty());
    assert_eq!(cell.cluster.seam_stats().allocations_lost, 2);
}
