//! The data plane on loopback, tables installed directly through the handle (no control
//! plane). Every test runs on both backends.

#![allow(clippy::unwrap_used)]
// End to end on real sockets: these tests wait on the real clock.
#![allow(clippy::disallowed_methods)]

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use turnpike_dataplane::{
    AllocationId, Backend, ControlSink, DataPlane, DataPlaneConfig, DataPlaneHandle, FiveTuple,
    Millis, Punted, TableChange, WorkerCounters,
};
use turnpike_proto::attr::{Attribute, Data, MappedAddress, XorMappedAddress, XorPeerAddress};
use turnpike_proto::channel::ChannelData;
use turnpike_proto::client::Client;
use turnpike_proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

const WAIT: Duration = Duration::from_secs(5);

struct Sink(mpsc::Sender<Punted>);

impl ControlSink for Sink {
    fn punt(&self, p: Punted) {
        let _ = self.0.send(p);
    }

    fn connection_closed(&self, _: usize, _: FiveTuple) {}
}

/// Now on the data plane's clock.
fn now_ms() -> u64 {
    turnpike_plane::Clock::new().now().0
}

fn far() -> u64 {
    now_ms() + 600_000
}

struct Server {
    dp: Option<DataPlane>,
    h: DataPlaneHandle,
    punts: mpsc::Receiver<Punted>,
    addr: SocketAddr,
    /// The worker each allocation was added on: every change names its worker.
    owners: std::cell::RefCell<std::collections::HashMap<AllocationId, u32>>,
}

impl Server {
    fn start(backend: Backend, ip: &str, denied: Vec<SocketAddr>) -> Server {
        Server::start_with(backend, ip, denied, false)
    }

    fn start_with(backend: Backend, ip: &str, denied: Vec<SocketAddr>, legacy: bool) -> Server {
        let (tx, punts) = mpsc::channel();
        let cfg = DataPlaneConfig {
            listen: vec![SocketAddr::new(ip.parse().unwrap(), 0)],
            workers: 2,
            backend,
            pin: false,
            denied_peers: denied,
            socket_buffer: 1 << 20,
            legacy_channel_numbers: legacy,
            ..DataPlaneConfig::default()
        };
        let dp = DataPlane::start(cfg, Arc::new(Sink(tx))).unwrap();
        assert_eq!(dp.backend(), backend);
        let addr = dp.local_addrs()[0];
        assert_ne!(addr.port(), 0);
        Server {
            h: dp.handle(),
            dp: Some(dp),
            punts,
            owners: Default::default(),
            addr,
        }
    }

    fn v4(backend: Backend) -> Server {
        Server::start(backend, "127.0.0.1", Vec::new())
    }

    /// The counters of all workers added up.
    fn total(&self) -> WorkerCounters {
        let mut t = WorkerCounters::default();
        for c in self.h.counters() {
            t.to_peer_packets += c.to_peer_packets;
            t.to_peer_bytes += c.to_peer_bytes;
            t.to_client_packets += c.to_client_packets;
            t.to_client_bytes += c.to_client_bytes;
            t.punted += c.punted;
            t.binding_answered += c.binding_answered;
            t.control_sent += c.control_sent;
            t.gso_sends += c.gso_sends;
            t.channels_refused += c.channels_refused;
            t.dropped.malformed += c.dropped.malformed;
            t.dropped.unexpected += c.dropped.unexpected;
            t.dropped.no_allocation += c.dropped.no_allocation;
            t.dropped.no_permission += c.dropped.no_permission;
            t.dropped.no_channel += c.dropped.no_channel;
            t.dropped.bandwidth += c.dropped.bandwidth;
            t.dropped.denied_peer += c.dropped.denied_peer;
            t.dropped.send_error += c.dropped.send_error;
            t.dropped.expired += c.dropped.expired;
            t.dropped.rate_limited += c.dropped.rate_limited;
        }
        t
    }

    /// Waits (bounded) until the summed counters satisfy `f`.
    fn wait_counters(&self, what: &str, f: impl Fn(&WorkerCounters) -> bool) -> WorkerCounters {
        let deadline = Instant::now() + WAIT;
        loop {
            let t = self.total();
            if f(&t) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {t:?}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The worker owning `client`'s 5-tuple, found as the control plane would: from the
    /// worker id of a punted request.
    fn owner(&self, client: &UdpSocket) -> usize {
        let mut buf = [0u8; 64];
        let w = MessageWriter::new(
            &mut buf,
            Method::ALLOCATE,
            Class::Request,
            TransactionId([7; 12]),
        )
        .unwrap();
        let n = w.finish();
        client.send_to(&buf[..n], self.addr).unwrap();
        let p = self.punts.recv_timeout(WAIT).unwrap();
        assert_eq!(p.tuple.client, client.local_addr().unwrap());
        assert_eq!(p.tuple.server, self.addr);
        assert_eq!(p.data, &buf[..n]);
        p.worker
    }

    /// Binds a relay for `client` and installs an allocation (no permission, no channel).
    fn allocate(&self, client: &UdpSocket, id: u64, deadline: u64, bandwidth: u64) -> Alloc {
        let id = AllocationId(id);
        let worker = self.owner(client);
        let tuple = FiveTuple::udp(client.local_addr().unwrap(), self.addr);
        let relay = self.bind_relay(worker, tuple);
        let add = TableChange::AllocationAdd {
            id,
            tuple,
            relays: vec![relay],
            deadline: Millis(deadline),
            bandwidth,
            user: "alice".into(),
            username: "alice@example.org".into(),
            dont_fragment: false,
        };
        self.owners.borrow_mut().insert(id, worker as u32);
        self.h.apply([(worker as u32, add)]);
        self.sync();
        Alloc {
            id,
            relay,
            worker,
            tuple,
        }
    }

    /// Sends `client` a ChannelBind success response from the worker owning `a`, as the
    /// control plane does after installing a channel, and receives it: from then on the
    /// allocation's channels carry the peers' data as ChannelData.
    fn confirm(&self, a: &Alloc, client: &UdpSocket) {
        let r = channel_bind_success(TransactionId([3; 12]));
        self.h.send(a.worker, a.tuple, r.clone());
        assert_eq!(recv(client), (r, self.addr));
    }

    /// Binds a free relay port (found by binding port 0 and letting go of it; retried if
    /// something else takes it meanwhile).
    fn bind_relay(&self, worker: usize, tuple: FiveTuple) -> SocketAddr {
        for _ in 0..20 {
            let relay = UdpSocket::bind(SocketAddr::new(self.addr.ip(), 0))
                .unwrap()
                .local_addr()
                .unwrap();
            let (tx, rx) = mpsc::channel();
            self.h.bind(
                worker,
                tuple,
                vec![relay],
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            );
            if rx.recv_timeout(WAIT).unwrap().is_ok() {
                return relay;
            }
        }
        panic!("no free relay port");
    }

    /// Applies changes other than `AllocationAdd`, each on its allocation's worker.
    fn apply(&self, changes: Vec<TableChange>) {
        let owners = self.owners.borrow();
        self.h.apply(
            changes
                .into_iter()
                .map(|c| (owners.get(&c.allocation()).copied().unwrap_or(0), c)),
        );
    }

    /// Returns once every worker has applied every command queued before.
    fn sync(&self) {
        let _ = self.h.snapshot();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(dp) = self.dp.take() {
            dp.shutdown();
        }
    }
}

struct Alloc {
    id: AllocationId,
    relay: SocketAddr,
    worker: usize,
    tuple: FiveTuple,
}

fn channel_bind_success(tid: TransactionId) -> Vec<u8> {
    let mut buf = [0u8; 64];
    let w = MessageWriter::new(&mut buf, Method::CHANNEL_BIND, Class::Success, tid).unwrap();
    let n = w.finish();
    buf[..n].to_vec()
}

fn socket(ip: &str) -> UdpSocket {
    let s = UdpSocket::bind(SocketAddr::new(ip.parse().unwrap(), 0)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 65536];
    let (n, from) = s.recv_from(&mut buf).unwrap();
    buf.truncate(n);
    (buf, from)
}

/// Asserts nothing is waiting on `s` (call after the counters showed the drop).
fn assert_silent(s: &UdpSocket) {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 2048];
    let r = s.recv_from(&mut buf);
    assert!(r.is_err(), "unexpected datagram: {r:?}");
    s.set_nonblocking(false).unwrap();
}

fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn send_cd(client: &UdpSocket, server: SocketAddr, channel: u16, data: &[u8]) {
    let mut buf = vec![0u8; data.len() + 8];
    let n = Client::channel_data(channel, data, &mut buf).unwrap();
    client.send_to(&buf[..n], server).unwrap();
}

fn send_ind(client: &UdpSocket, server: SocketAddr, peer: SocketAddr, data: &[u8]) {
    let mut c = Client::new("u", "p", 1);
    let mut buf = vec![0u8; data.len() + 64];
    let n = c.send_indication(peer, data, &mut buf).unwrap();
    client.send_to(&buf[..n], server).unwrap();
}

/// Receives a ChannelData frame: (channel, payload).
fn recv_cd(client: &UdpSocket) -> (u16, Vec<u8>) {
    let (d, _) = recv(client);
    let cd = ChannelData::parse(&d).unwrap();
    (cd.channel, cd.payload.to_vec())
}

/// Receives a Data indication: (peer, payload); checks the padding.
fn recv_data_ind(client: &UdpSocket) -> (SocketAddr, Vec<u8>) {
    let (d, _) = recv(client);
    assert_eq!(d.len() % 4, 0, "Data indication not padded");
    let m = Message::parse(&d).unwrap();
    assert_eq!((m.method(), m.class()), (Method::DATA, Class::Indication));
    assert_eq!(m.as_bytes().len(), d.len());
    let peer = m.attr::<XorPeerAddress>().unwrap().unwrap().0;
    let data = m.attr::<Data<'_>>().unwrap().unwrap().0.to_vec();
    let pad = (4 - data.len() % 4) % 4;
    assert!(
        d[d.len() - pad..].iter().all(|&b| b == 0),
        "padding not zero"
    );
    (peer, data)
}

fn perm(id: AllocationId, peer: &SocketAddr, deadline: u64) -> TableChange {
    TableChange::PermissionSet {
        id,
        peer: peer.ip(),
        deadline: Millis(deadline),
    }
}

fn chan(id: AllocationId, channel: u16, peer: SocketAddr, deadline: u64) -> TableChange {
    TableChange::ChannelSet {
        id,
        channel,
        peer,
        deadline: Millis(deadline),
        confirmed: false,
    }
}

fn channel_data_both_ways(b: Backend) {
    let s = Server::v4(b);
    let client = socket("127.0.0.1");
    let peer = socket("127.0.0.1");
    let pa = peer.local_addr().unwrap();
    let a = s.allocate(&client, 1, far(), 0);
    s.apply(vec![perm(a.id, &pa, far()), chan(a.id, 0x4000, pa, far())]);
    s.sync();
    s.confirm(&a, &client);
    let mut bytes = 0;
    for (i, n) in [1usize, 1400, 2, 3].into_iter().enumerate() {
        let p = payload(n, i as u8);
        send_cd(&client, s.addr, 0x4000, &p);
        let (got, from) = recv(&peer);
        assert_eq!(got, p);
        assert_eq!(from, a.relay);
        peer.send_to(&p, a.relay).unwrap();
        assert_eq!(recv_cd(&client), (0x4000, p));
        bytes += n as u64;
    }
    let t = s.wait_counters("to_client", |t| t.to_client_packets == 4);
    assert_eq!(
        (t.to_peer_packets, t.to_peer_bytes, t.to_client_bytes),
        (4, bytes, bytes)
    );
    let snap = s.h.snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].usage.to_peer.packets, 4);
    assert_eq!(snap[0].usage.to_client.bytes, bytes);
    assert_eq!(snap[0].channels, vec![(0x4000, pa, snap[0].channels[0].2)]);
}

fn send_and_data_indications_on(b: Backend, ip: &str) {
    let s = Server::start(b, ip, Vec::new());
    let client = socket(ip);
    let peer = socket(ip);
    let pa = peer.local_addr().unwrap();
    let a = s.allocate(&client, 2, far(), 0);
    s.apply(vec![perm(a.id, &pa, far())]);
    s.sync();
    for (i, n) in [1usize, 1400, 3, 4, 5].into_iter().enumerate() {
        let p = payload(n, i as u8);
        send_ind(&client, s.addr, pa, &p);
        let (got, from) = recv(&peer);
        assert_eq!(got, p);
        assert_eq!(from, a.relay);
        peer.send_to(&p, a.relay).unwrap();
        assert_eq!(recv_data_ind(&client), (pa, p));
    }
    s.wait_counters("to_client", |t| {
        t.to_client_packets == 5 && t.to_peer_packets == 5
    });
}

fn send_and_data_indications(b: Backend) {
    send_and_data_indications_on(b, "127.0.0.1");
}

fn send_and_data_indications_v6(b: Backend) {
    send_and_data_indications_on(b, "::1");
}

fn no_permission_dropped(b: Backend) {
    let s = Server::v4(b);
    let client = socket("127.0.0.1");
    let peer = socket("127.0.0.1");
    let pa = peer.local_addr().unwrap();
    let a = s.allocate(&client, 3, far(), 0);
    send_ind(&client, s.addr, pa, b"hello");
    s.wait_counters("no_permission (send)", |t| t.dropped.no_permission == 1);
    peer.send_to(b"hi", a.relay).unwrap();
    s.wait_counters("no_permission (peer)", |t| t.dropped.no_permission == 2);
    send_cd(&client, s.addr, 0x4001, b"x");
    let t = s.wait_counters("no_channel", |t| t.dropped.no_channel == 1);
    assert_eq!((t.to_peer_packets, t.to_client_packets), (0, 0));
    assert_silent(&peer);
    assert_silent(&client);
    // A client without allocation.
    let stranger = socket("127.0.0.1");
    send_ind(&stranger, s.addr, pa, b"hello");
    s.wait_counters("no_allocation", |t| t.dropped.no_allocation == 1);
}

fn expired_entries_dropped(b: Backend) {
    let s = Server::v4(b);
    let client = socket("127.0.0.1");
    let peer = socket("127.0.0.1");
    let pa = peer.local_addr().unwrap();
    let a = s.allocate(&client, 4, far(), 0);
    let past = now_ms() - 1;
    // An expired permission drops Send and peer data.
    s.apply(vec![perm(a.id, &pa, past)]);
    s.sync();
    send_ind(&client, s.addr, pa, b"late");
    s.wait_counters("expired permission", |t| t.dropped.expired == 1);
    peer.send_to(b"late", a.relay).unwrap();
    s.wait_counters("expired permission (peer)", |t| t.dropped.expired == 2);
    // An expired channel drops ChannelData; the peer's data then comes as a Data
    // indication.
    s.apply(vec![perm(a.id, &pa, far()), chan(a.id, 0x4002, pa, past)]);
    s.sync();
    send_cd(&client, s.addr, 0x4002, b"late");
    s.wait_counters("expired channel", |t| t.dropped.expired == 3);
    peer.send_to(b"back", a.relay).unwrap();
    assert_eq!(recv_data_ind(&client), (pa, b"back".to_vec()));
    // An expired allocation drops everything, even before any sweep.
    s.apply(vec![TableChange::AllocationRefresh {
        id: a.id,
        deadline: Millis(past),
    }]);
    s.sync();
    send_ind(&client, s.addr, pa, b"gone");
    peer.send_to(b"gone", a.relay).unwrap();
    s.wait_counters("expired allocation", |t| t.dropped.expired == 5);
    assert_silent(&peer);
}

fn channel_rebinding(b: Backend) {
    let s = Server::v4(b);
    let client = socket("127.0.0.1");
    let pa = socket("127.0.0.1");
    let pb = socket("127.0.0.1");
    let (aa, ab) = (pa.local_addr().unwrap(), pb.local_addr().unwrap());
    let a = s.allocate(&client, 5, far(), 0);
    s.apply(vec![
        perm(a.id, &aa, far()),
        perm(a.id, &ab, far()),
        chan(a.id, 0x4abc, aa, far()),
    ]);
    s.sync();
    s.confirm(&a, &client);
    send_cd(&client, s.addr, 0x4abc, b"to a");
    assert_eq!(recv(&pa).0, b"to a");
    s.apply(vec![chan(a.id, 0x4abc, ab, far())]);
    s.sync();
    s.confirm(&a, &client);
    send_cd(&client, s.addr, 0x4abc, b"to b");
    assert_eq!(recv(&pb).0, b"to b");
    // A lost its channel: its data comes as a Data indication; B's on the channel.
    pa.send_to(b"from a", a.relay).unwrap();
    assert_eq!(recv_data_ind(&client), (aa, b"from a".to_vec()));
    pb.send_to(b"from b", a.relay).unwrap();
    assert_eq!(recv_cd(&client), (0x4abc, b"from b".to_vec()));
    // Removing the channel falls back to Data indications too.
    s.apply(vec![TableChange::ChannelRemove {
        id: a.id,
        channel: 0x4abc,
    }]);
    s.sync();
    pb.send_to(b"from b", a.relay).unwrap();
    assert_eq!(recv_data_ind(&client), (ab, b"from b".to_vec()));
    assert_silent(&pa);
}

fn channel_data_padding_and_length(b: Backend) {
    let s = Server::v4(b);
    let client = socket("127.0.0.1");
    let peer = socket("127.0.0.1");
    let pa = peer.local_addr().unwrap();
    let a = s.allocate(&client, 6, far(), 0);
    s.apply(vec![perm(a.id, &pa, far()), chan(a.id, 0x4000, pa, far())]);
    s.sync();
    // Padded to a multiple of four (as over streams): accepted, padding not relayed.
    client
        .send_to(&[0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0], s.addr)
        .unwrap();
    assert_eq!(recv(&peer).0, vec![1, 2, 3, 4, 5]);
    // Length beyond the datagram.
    client
        .send_to(&[0x40, 0x00, 0x00, 0x0a, 1, 2, 3, 4, 5], s.addr)
        .unwrap();
    // More after the length than padding.
    client
        .send_to(&[0x40, 0x00, 0x00, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 9], s.addr)
        .unwrap();
    // Shorter than a header.
    client.send_to(&[0x40, 0x00], s.addr).unwrap();
    let t = s.wait_counters("malformed", |t| t.dropped.malformed == 3);
    assert_eq!(t.to_peer_packets, 1);
    assert_silent(&peer);
}

fn binding_answered(b: Backend) {
    let s = Server::v4(b);
    let client = socket("127.0.0.1");
    let mut buf = [0u8; 64];
    let tid = TransactionId([9; 12]);
    let mut w = MessageWriter::new(&mut buf, Method::BINDING, Class::Request, tid).unwrap();
    w.add_fingerprint().unwrap();
    let n = w.finish();
    client.send_to(&buf[..n], s.addr).unwrap();
    let (d, from) = recv(&client);
    assert_eq!(from, s.addr);
    let m = Message::parse(&d).unwrap();
    assert_eq!(
        (m.method(), m.class(), m.transaction_id()),
        (Method::BINDING, Class::Success, tid)
    );
    assert_eq!(
        m.attr::<XorMappedAddress>().unwrap().unwrap().0,
        client.local_addr().unwrap()
    );
    assert!(m.verify_fingerprint().unwrap());
    let t = s.wait_counters("binding", |t| t.binding_answered == 1);
    assert_eq!(t.punted, 0);
}

/// A classic RFC 3489 Binding request (no magic cookie, a 16-byte transaction id, a
/// CHANGE-REQUEST that is ignored) is answered with MAPPED-ADDRESS and the id echoed, on
/// IPv4 and IPv6; other messages without the cookie are dropped, not punted.
fn classic_binding_answered(b: Backend) {
    for ip in ["127.0.0.1", "::1"] {
        let s = Server::start(b, ip, Vec::new());
        let client = socket(ip);
        let tid: [u8; 16] = std::array::from_fn(|i| 0x30 + i as u8);
        let mut req = vec![0x00, 0x01, 0x00, 0x08];
        req.extend(tid);
        req.extend([0x00, 0x03, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00]);
        client.send_to(&req, s.addr).unwrap();
        let (d, from) = recv(&client);
        assert_eq!(from, s.addr);
        let me = client.local_addr().unwrap();
        let alen = if me.is_ipv4() { 8 } else { 20 };
        assert_eq!(d.len(), 20 + 4 + alen, "{d:02x?}");
        assert_eq!(d[..4], [0x01, 0x01, 0x00, 4 + alen as u8]);
        assert_eq!(d[4..20], tid);
        assert_eq!(d[20..24], [0x00, 0x01, 0x00, alen as u8]);
        let mapped = MappedAddress::decode(&d[24..], &TransactionId::default()).unwrap();
        assert_eq!(mapped.0, me);
        s.wait_counters("classic binding", |t| t.binding_answered == 1);

        // An Allocate request and a Binding success response without the cookie.
        for typ in [[0x00, 0x03], [0x01, 0x01]] {
            req[..2].copy_from_slice(&typ);
            client.send_to(&req, s.addr).unwrap();
        }
        let t = s.wait_counters("malformed", |t| t.dropped.malformed == 2);
        assert_eq!((t.binding_answered, t.punted), (1, 0));
        assert!(s.punts.try_recv().is_err());
        assert_silent(&client);
    }
}

fn other_stun_punted(b: Backend) {
    let s = Server::v4(b);
    let client = socket("127.0.0.1");
    let worker = s.owner(&client);
    assert!(worker < s.h.workers());
    let tuple = FiveTuple::udp(client.local_addr().unwrap(), s.addr);
    // The control plane's answer goes back from the same worker.
    let mut buf = [0u8; 64];
    let w = MessageWriter::new(
        &mut buf,
        Method::ALLOCATE,
        Class::Error,
        TransactionId([7; 12]),
    )
    .unwrap();
    let n = w.finish();
    s.h.send(worker, tuple, buf[..n].to_vec());
    let (d, from) = recv(&client);
    assert_eq!((d.as_slice(), from), (&buf[..n], s.addr));
    // Responses and indications other than Send are not the data plane's.
    let w = MessageWriter::new(
        &mut buf,
        Method::BINDING,
        Class::Indication,
        TransactionId([8; 12]),
    )
    .unwrap();
    let n = w.finish();
    client.send_to(&buf[..n], s.addr).unwrap();
    client.send_to(&[0x80, 1, 2, 3], s.addr).unwrap();
    let t = s.wait_counters("unexpected", |t| t.dropped.unexpected == 2);
    assert_eq!((t.punted, t.control_sent), (1, 1));
    assert!(s.punts.try_recv().is_err());
}

fn denied_peer_dropped(b: Backend) {
    let peer = socket("127.0.0.1");
    let pa = peer.local_addr().unwrap();
    let s = Server::start(b, "127.0.0.1", vec![pa]);
    let client = socket("127.0.0.1");
    let a = s.allocate(&client, 7, far(), 0);
    s.apply(vec![perm(a.id, &pa, far())]);
    s.sync();
    send_ind(&client, s.addr, pa, b"no");
    s.wait_counters("denied", |t| t.dropped.denied_peer == 1);
    // The server's own listening address is denied too.
    s.apply(vec![perm(a.id, &s.addr, far())]);
    s.sync();
    send_ind(&client, s.addr, s.addr, b"loop");
    s.wait_counters("denied self", |t| t.dropped.denied_peer == 2);
    assert_silent(&peer);
    s.h.set_denied_peers(Vec::new());
    send_ind(&client, s.addr, pa, b"yes");
    assert_eq!(recv(&peer).0, b"yes");
}

fn bandwidth_limited(b: Backend) {
    let s = Server::v4(b);
    let client = socket("127.0.0.1");
    let peer = socket("127.0.0.1");
    let pa = peer.local_addr().unwrap();
    // 1000 B/s, burst 1000 bytes: of five 400-byte datagrams sent at once, two or
    // (with a little refill) three pass.
    let a = s.allocate(&client, 8, far(), 1000);
    s.apply(vec![perm(a.id, &pa, far()), chan(a.id, 0x4000, pa, far())]);
    s.sync();
    for i in 0..5 {
        send_cd(&client, s.addr, 0x4000, &payload(400, i));
    }
    let t = s.wait_counters("bandwidth", |t| {
        t.to_peer_packets + t.dropped.bandwidth == 5
    });
    assert!(t.dropped.bandwidth >= 2, "{t:?}");
    for _ in 0..t.to_peer_packets {
        assert_eq!(recv(&peer).0.len(), 400);
    }
    // The other direction has its own bucket.
    let up_drops = t.dropped.bandwidth;
    for i in 0..5 {
        peer.send_to(&payload(400, i), a.relay).unwrap();
    }
    let t = s.wait_counters("bandwidth (down)", |t| {
        t.to_client_packets + t.dropped.bandwidth - up_drops == 5
    });
    assert!(t.dropped.bandwidth - up_drops >= 2, "{t:?}");
}

fn snapshot_and_remove(b: Backend) {
    let s = Server::v4(b);
    let client = socket("127.0.0.1");
    let peer = socket("127.0.0.1");
    let pa = peer.local_addr().unwrap();
    let deadline = far();
    let a = s.allocate(&client, 9, deadline, 5000);
    s.apply(vec![
        perm(a.id, &pa, deadline),
        chan(a.id, 0x4fff, pa, deadline),
    ]);
    let snap = s.h.snapshot();
    assert_eq!(snap.len(), 1);
    let e = &snap[0];
    assert_eq!(
        (
            e.id,
            e.deadline,
            e.bandwidth,
            e.user.as_str(),
            e.username.as_str()
        ),
        (
            AllocationId(9),
            Millis(deadline),
            5000,
            "alice",
            "alice@example.org"
        )
    );
    assert_eq!(Some(e.tuple.client), client.local_addr().ok());
    assert_eq!(e.relays, vec![a.relay]);
    assert_eq!(e.permissions, vec![(pa.ip(), Millis(deadline))]);
    assert_eq!(e.channels, vec![(0x4fff, pa, Millis(deadline))]);
    s.apply(vec![TableChange::AllocationRemove { id: a.id }]);
    assert!(s.h.snapshot().is_empty());
    // The relay socket is closed: its port can be bound again.
    let deadline = Instant::now() + WAIT;
    while UdpSocket::bind(a.relay).is_err() {
        assert!(Instant::now() < deadline, "relay socket still open");
        std::thread::sleep(Duration::from_millis(2));
    }
    // Changes for a removed allocation are ignored.
    s.apply(vec![perm(a.id, &pa, far())]);
    assert!(s.h.snapshot().is_empty());
}

fn burst_in_order(b: Backend) {
    let s = Server::v4(b);
    let client = socket("127.0.0.1");
    let peer = socket("127.0.0.1");
    let pa = peer.local_addr().unwrap();
    let a = s.allocate(&client, 10, far(), 0);
    s.apply(vec![perm(a.id, &pa, far()), chan(a.id, 0x4000, pa, far())]);
    s.sync();
    s.confirm(&a, &client);
    // Within the peer's default receive buffer.
    const N: u8 = 50;
    for i in 0..N {
        send_cd(&client, s.addr, 0x4000, &payload(1000, i));
    }
    for i in 0..N {
        assert_eq!(recv(&peer).0, payload(1000, i), "datagram {i}");
    }
    for i in 0..N {
        peer.send_to(&payload(1000, i), a.relay).unwrap();
    }
    for i in 0..N {
        assert_eq!(recv_cd(&client), (0x4000, payload(1000, i)), "datagram {i}");
    }
    let t = s.total();
    assert_eq!(
        (t.to_peer_packets, t.to_client_packets, t.dropped.send_error),
        (N as u64, N as u64, 0)
    );
}

/// Equal-size datagrams of one batch to one destination leave as one GSO send; the
/// receiver still gets them one by one, in order. How many land in one batch depends on
/// timing, so bursts are repeated (bounded) until one was merged.
fn gso_bursts(b: Backend) {
    let s = Server::v4(b);
    let client = socket("127.0.0.1");
    let peer = socket("127.0.0.1");
    let pa = peer.local_addr().unwrap();
    let a = s.allocate(&client, 11, far(), 0);
    s.apply(vec![perm(a.id, &pa, far()), chan(a.id, 0x4000, pa, far())]);
    s.sync();
    s.confirm(&a, &client);
    const N: u8 = 32;
    for round in 0..50u8 {
        for i in 0..N {
            send_cd(&client, s.addr, 0x4000, &payload(500, i ^ round));
        }
        for i in 0..N {
            assert_eq!(
                recv(&peer).0,
                payload(500, i ^ round),
                "round {round} datagram {i}"
            );
        }
        for i in 0..N {
            peer.send_to(&payload(500, i ^ round), a.relay).unwrap();
        }
        for i in 0..N {
            assert_eq!(
                recv_cd(&client),
                (0x4000, payload(500, i ^ round)),
                "round {round} datagram {i}"
            );
        }
        if s.total().gso_sends > 0 {
            break;
        }
    }
    let t = s.wait_counters("a GSO send", |t| t.gso_sends > 0);
    assert_eq!(t.dropped.send_error, 0);
}

/// Sends `marker` with `send` until it is seen on `rx` (draining what came before it):
/// after a flood, the path still forwards.
fn until_marker(send: impl Fn(), rx: &UdpSocket, is_marker: impl Fn(&[u8]) -> bool) {
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 65536];
    for _ in 0..100 {
        send();
        loop {
            match rx.recv_from(&mut buf) {
                Ok((n, _)) if is_marker(&buf[..n]) => return,
                Ok(_) => {}
                Err(_) => break,
            }
            assert!(Instant::now() < deadline, "marker never arrived");
        }
    }
    panic!("marker never arrived");
}

/// A bounded flood both ways (far more than the receive buffers hold), then the relay
/// still forwards both ways.
fn flood_then_still_forwarding(b: Backend) {
    let s = Server::v4(b);
    let client = socket("127.0.0.1");
    let peer = socket("127.0.0.1");
    let pa = peer.local_addr().unwrap();
    let a = s.allocate(&client, 12, far(), 0);
    s.apply(vec![perm(a.id, &pa, far()), chan(a.id, 0x4000, pa, far())]);
    s.sync();
    s.confirm(&a, &client);
    let mut frame = vec![0u8; 68];
    let n = Client::channel_data(0x4000, &[0xAA; 64], &mut frame).unwrap();
    let start = Instant::now();
    let mut sent = 0;
    while sent < 20_000 && start.elapsed() < Duration::from_secs(3) {
        let _ = client.send_to(&frame[..n], s.addr);
        let _ = peer.send_to(&[0xBB; 64], a.relay);
        sent += 1;
    }
    until_marker(
        || send_cd(&client, s.addr, 0x4000, b"marker"),
        &peer,
        |d| d == b"marker",
    );
    until_marker(
        || {
            peer.send_to(b"marker", a.relay).unwrap();
        },
        &client,
        |d| ChannelData::parse(d).is_ok_and(|cd| cd.payload == b"marker"),
    );
    let t = s.total();
    assert!(t.to_peer_packets > 0 && t.to_client_packets > 0, "{t:?}");
}

fn unknown_relay_data_dropped(b: Backend) {
    let s = Server::v4(b);
    let client = socket("127.0.0.1");
    let peer = socket("127.0.0.1");
    let worker = s.owner(&client);
    let tuple = FiveTuple::udp(client.local_addr().unwrap(), s.addr);
    // Bound but not yet claimed: nothing is relayed.
    let relay = s.bind_relay(worker, tuple);
    peer.send_to(b"early", relay).unwrap();
    s.wait_counters("no_allocation", |t| t.dropped.no_allocation == 1);
    // A bind to a port in use fails, all or none.
    let (tx, rx) = mpsc::channel();
    let free = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    s.h.bind(
        worker,
        tuple,
        vec![free, relay],
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    assert!(rx.recv_timeout(WAIT).unwrap().is_err());
    UdpSocket::bind(free).unwrap();
}

fn shutdown_closes_sockets(b: Backend) {
    let mut s = Server::v4(b);
    let addr = s.addr;
    s.dp.take().unwrap().shutdown();
    UdpSocket::bind(addr).unwrap();
    // The handle outlives the data plane harmlessly.
    s.h.send(0, FiveTuple::udp(addr, addr), vec![1]);
    assert!(s.h.snapshot().is_empty());
}

/// RFC 5766 channel numbers (0x5000..=0x7FFF) are dropped unless the data plane is
/// configured to accept them; then they relay both ways.
fn legacy_channel_numbers(b: Backend) {
    for legacy in [false, true] {
        let s = Server::start_with(b, "127.0.0.1", Vec::new(), legacy);
        let client = socket("127.0.0.1");
        let peer = socket("127.0.0.1");
        let pa = peer.local_addr().unwrap();
        let a = s.allocate(&client, 1, far(), 0);
        s.apply(vec![perm(a.id, &pa, far()), chan(a.id, 0x5960, pa, far())]);
        s.sync();
        s.confirm(&a, &client);
        let frame = [0x59, 0x60, 0x00, 0x03, b'a', b'b', b'c'];
        client.send_to(&frame, s.addr).unwrap();
        if legacy {
            assert_eq!(recv(&peer).0, b"abc");
            peer.send_to(b"xyz", a.relay).unwrap();
            let (got, _) = recv(&client);
            assert_eq!(got, [0x59, 0x60, 0x00, 0x03, b'x', b'y', b'z']);
        } else {
            assert_silent(&peer);
        }
    }
}

fn binding_request(tid: TransactionId) -> Vec<u8> {
    let mut buf = [0u8; 64];
    let w = MessageWriter::new(&mut buf, Method::BINDING, Class::Request, tid).unwrap();
    let n = w.finish();
    buf[..n].to_vec()
}

/// The server's own listening socket is never a peer: a channel to it is refused even
/// with a permission for its IP, and what the listening socket sends to a relay socket
/// (the server answering its own relay) is not relayed.
fn own_listening_address_unreachable(b: Backend) {
    let s = Server::v4(b);
    let client = socket("127.0.0.1");
    let a = s.allocate(&client, 13, far(), 0);
    s.apply(vec![
        perm(a.id, &s.addr, far()),
        chan(a.id, 0x4000, s.addr, far()),
    ]);
    s.sync();
    s.confirm(&a, &client);
    s.wait_counters("channel refused", |t| t.channels_refused == 1);
    assert!(s.h.snapshot()[0].channels.is_empty());
    // A Binding request wrapped in ChannelData to the server itself goes nowhere.
    let binding = binding_request(TransactionId([5; 12]));
    send_cd(&client, s.addr, 0x4000, &binding);
    s.wait_counters("no_channel", |t| t.dropped.no_channel == 1);
    // A Send indication to it neither.
    send_ind(&client, s.addr, s.addr, &binding);
    s.wait_counters("denied (send)", |t| t.dropped.denied_peer == 1);
    // The listening socket sending to the relay: dropped at the relay.
    let looped = FiveTuple::udp(a.relay, s.addr);
    s.h.send(a.worker, looped, binding.clone());
    s.wait_counters("denied (from own socket)", |t| t.dropped.denied_peer == 2);
    let t = s.total();
    assert_eq!(
        (t.binding_answered, t.to_peer_packets, t.to_client_packets),
        (0, 0, 0),
        "{t:?}"
    );
    assert_silent(&client);
}

/// A peer denied after its channel was installed is no longer reachable through it, and
/// what it sends is not relayed.
fn denied_after_channel_install(b: Backend) {
    let s = Server::v4(b);
    let client = socket("127.0.0.1");
    let peer = socket("127.0.0.1");
    let pa = peer.local_addr().unwrap();
    let a = s.allocate(&client, 14, far(), 0);
    s.apply(vec![perm(a.id, &pa, far()), chan(a.id, 0x4000, pa, far())]);
    s.sync();
    s.confirm(&a, &client);
    send_cd(&client, s.addr, 0x4000, b"before");
    assert_eq!(recv(&peer).0, b"before");
    s.h.set_denied_peers(vec![pa]);
    send_cd(&client, s.addr, 0x4000, b"after");
    s.wait_counters("denied (channel)", |t| t.dropped.denied_peer == 1);
    peer.send_to(b"after", a.relay).unwrap();
    s.wait_counters("denied (from peer)", |t| t.dropped.denied_peer == 2);
    assert_silent(&peer);
    assert_silent(&client);
}

/// ChannelData needs a live permission for the channel's peer, both ways: a channel
/// outliving its permission stops forwarding at the permission's deadline.
fn channel_needs_live_permission(b: Backend) {
    let s = Server::v4(b);
    let client = socket("127.0.0.1");
    let peer = socket("127.0.0.1");
    let pa = peer.local_addr().unwrap();
    let a = s.allocate(&client, 15, far(), 0);
    let short = now_ms() + 1000;
    s.apply(vec![perm(a.id, &pa, short), chan(a.id, 0x4000, pa, far())]);
    s.sync();
    s.confirm(&a, &client);
    send_cd(&client, s.addr, 0x4000, b"in time");
    assert_eq!(recv(&peer).0, b"in time");
    peer.send_to(b"in time", a.relay).unwrap();
    assert_eq!(recv_cd(&client), (0x4000, b"in time".to_vec()));
    // Bounded: the deadline is at most a second away.
    while now_ms() <= short + 5 {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Expired, or already swept away (then counted as missing).
    let gone = |t: &WorkerCounters| t.dropped.expired + t.dropped.no_permission;
    send_cd(&client, s.addr, 0x4000, b"late");
    s.wait_counters("expired permission", |t| gone(t) == 1);
    peer.send_to(b"late", a.relay).unwrap();
    s.wait_counters("expired permission (peer)", |t| gone(t) == 2);
    // No permission at all, the channel still bound.
    s.apply(vec![TableChange::PermissionRemove {
        id: a.id,
        peer: pa.ip(),
    }]);
    s.sync();
    send_cd(&client, s.addr, 0x4000, b"none");
    s.wait_counters("no permission", |t| gone(t) == 3);
    peer.send_to(b"none", a.relay).unwrap();
    s.wait_counters("no permission (peer)", |t| gone(t) == 4);
    assert_silent(&peer);
    assert_silent(&client);
    let t = s.total();
    assert_eq!((t.to_peer_packets, t.to_client_packets), (1, 1));
}

/// Relays `n` datagrams with `send` in rounds of 100, each round waiting until the
/// worker has accounted for it (relayed or dropped for bandwidth), so that no datagram
/// is lost in a socket buffer.
fn in_rounds(s: &Server, n: u64, send: impl Fn(), done: impl Fn(&WorkerCounters) -> u64) {
    let base = done(&s.total());
    let mut sent = 0;
    while sent < n {
        for _ in 0..100.min(n - sent) {
            send();
            sent += 1;
        }
        s.wait_counters("a round accounted for", |t| done(t) - base == sent);
    }
}

/// Empty datagrams cost their IP and UDP headers against the bandwidth limit: at
/// 1000 B/s, a flood of empty ChannelData, Send indications and peer datagrams relays
/// about one datagram per 28 bytes of budget, not all of them.
fn bandwidth_counts_empty_datagrams(b: Backend) {
    let s = Server::v4(b);
    let client = socket("127.0.0.1");
    let peer = socket("127.0.0.1");
    let pa = peer.local_addr().unwrap();
    let start = Instant::now();
    let a = s.allocate(&client, 16, far(), 1000);
    s.apply(vec![perm(a.id, &pa, far()), chan(a.id, 0x4000, pa, far())]);
    s.sync();
    s.confirm(&a, &client);
    // The budget so far: a burst of 1000 bytes plus 1000 per second, 28 per datagram.
    let budget = || (1000 + start.elapsed().as_millis() as u64) / 28 + 1;
    in_rounds(
        &s,
        1000,
        || send_cd(&client, s.addr, 0x4000, &[]),
        |t| t.to_peer_packets + t.dropped.bandwidth,
    );
    in_rounds(
        &s,
        1000,
        || send_ind(&client, s.addr, pa, &[]),
        |t| t.to_peer_packets + t.dropped.bandwidth,
    );
    let up = s.total();
    assert!(
        up.to_peer_packets >= 1 && up.to_peer_packets <= budget(),
        "{} relayed, budget {}",
        up.to_peer_packets,
        budget()
    );
    for _ in 0..up.to_peer_packets {
        assert_eq!(recv(&peer).0, b"");
    }
    assert_silent(&peer);
    in_rounds(
        &s,
        2000,
        || {
            peer.send_to(&[], a.relay).unwrap();
        },
        |t| t.to_client_packets + t.dropped.bandwidth,
    );
    let down = s.total();
    assert!(
        down.to_client_packets >= 1 && down.to_client_packets <= budget(),
        "{} relayed, budget {}",
        down.to_client_packets,
        budget()
    );
    assert_eq!(down.to_client_bytes, 0);
}

/// What a libnice client keeps of what it receives: ChannelData only once it has seen
/// its ChannelBind confirmed, Data indications always.
#[derive(Default)]
struct Libnice {
    confirmed: bool,
    kept: Vec<Vec<u8>>,
    lost: usize,
}

impl Libnice {
    fn recv(&mut self, s: &UdpSocket) {
        let (d, _) = recv(s);
        if let Ok(cd) = ChannelData::parse(&d) {
            if self.confirmed {
                self.kept.push(cd.payload.to_vec());
            } else {
                self.lost += 1;
            }
            return;
        }
        let m = Message::parse(&d).unwrap();
        match (m.method(), m.class()) {
            (Method::CHANNEL_BIND, Class::Success) => self.confirmed = true,
            (Method::DATA, Class::Indication) => self
                .kept
                .push(m.attr::<Data<'_>>().unwrap().unwrap().0.to_vec()),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A new channel carries the peer's data as Data indications until the client has been
/// sent the ChannelBind success response, then as ChannelData; nothing of a burst sent
/// right after the bind is lost to a client that drops ChannelData on unconfirmed
/// channels. A refresh keeps the channel confirmed; another new channel starts over.
fn new_channel_waits_for_bind_response(b: Backend) {
    let s = Server::v4(b);
    let client = socket("127.0.0.1");
    let peer = socket("127.0.0.1");
    let pa = peer.local_addr().unwrap();
    let a = s.allocate(&client, 17, far(), 0);
    // The control plane installs the channel, then answers: the answer not sent yet.
    s.apply(vec![perm(a.id, &pa, far()), chan(a.id, 0x4000, pa, far())]);
    s.sync();
    // Client → peer works at once.
    send_cd(&client, s.addr, 0x4000, b"up");
    assert_eq!(recv(&peer).0, b"up");
    peer.send_to(b"early", a.relay).unwrap();
    assert_eq!(recv_data_ind(&client), (pa, b"early".to_vec()));
    // The answer, and a burst from the peer right behind it.
    let mut nice = Libnice::default();
    s.h.send(
        a.worker,
        a.tuple,
        channel_bind_success(TransactionId([4; 12])),
    );
    const N: u8 = 32;
    for i in 0..N {
        peer.send_to(&payload(100, i), a.relay).unwrap();
    }
    for _ in 0..=N {
        nice.recv(&client);
    }
    assert!(nice.confirmed);
    assert_eq!(nice.lost, 0);
    let sent: Vec<Vec<u8>> = (0..N).map(|i| payload(100, i)).collect();
    assert_eq!(nice.kept, sent);
    // From now on, ChannelData.
    peer.send_to(b"late", a.relay).unwrap();
    assert_eq!(recv_cd(&client), (0x4000, b"late".to_vec()));
    // A refresh keeps it confirmed.
    s.apply(vec![chan(a.id, 0x4000, pa, far())]);
    s.sync();
    peer.send_to(b"refreshed", a.relay).unwrap();
    assert_eq!(recv_cd(&client), (0x4000, b"refreshed".to_vec()));
    // A new channel starts unconfirmed.
    let other = socket("127.0.0.1");
    let oa = other.local_addr().unwrap();
    s.apply(vec![perm(a.id, &oa, far()), chan(a.id, 0x4001, oa, far())]);
    s.sync();
    other.send_to(b"new", a.relay).unwrap();
    assert_eq!(recv_data_ind(&client), (oa, b"new".to_vec()));
    s.confirm(&a, &client);
    other.send_to(b"confirmed", a.relay).unwrap();
    assert_eq!(recv_cd(&client), (0x4001, b"confirmed".to_vec()));
}

/// A burst of Binding requests from one source, every other one a classic RFC 3489
/// request, gets at most the burst of the default limit (100, then 50/s) answered;
/// another source is answered meanwhile.
fn binding_rate_limited(b: Backend) {
    let s = Server::v4(b);
    let client = socket("127.0.0.1");
    let start = Instant::now();
    let req = binding_request(TransactionId([6; 12]));
    let classic = [&[0, 1, 0, 0][..], &[6; 16]].concat();
    let sent = std::cell::Cell::new(0u32);
    in_rounds(
        &s,
        300,
        || {
            sent.set(sent.get() + 1);
            let d = if sent.get().is_multiple_of(2) {
                &classic
            } else {
                &req
            };
            client.send_to(d, s.addr).unwrap();
        },
        |t| t.binding_answered + t.dropped.rate_limited,
    );
    let t = s.total();
    let budget = 100 + 50 * start.elapsed().as_millis() as u64 / 1000 + 1;
    assert!(
        t.binding_answered >= 100 && t.binding_answered <= budget,
        "{} answered, budget {budget}",
        t.binding_answered
    );
    assert_eq!(t.dropped.rate_limited, 300 - t.binding_answered);
    let mut classic_answers = 0;
    for _ in 0..t.binding_answered {
        let (d, _) = recv(&client);
        assert!(d.len() <= req.len() + 24);
        classic_answers += usize::from(d[4..20] == classic[4..20]);
    }
    assert!(classic_answers >= 50, "{classic_answers} classic answers");
    assert_silent(&client);
    let other = socket("127.0.0.1");
    other.send_to(&req, s.addr).unwrap();
    assert_eq!(recv(&other).0.len(), 32);
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $( #[test] fn $name() { super::$name(turnpike_dataplane::Backend::Uring) } )*
        }
        mod mmsg {
            $( #[test] fn $name() { super::$name(turnpike_dataplane::Backend::Mmsg) } )*
        }
    };
}

on_both_backends!(
    channel_data_both_ways,
    send_and_data_indications,
    send_and_data_indications_v6,
    no_permission_dropped,
    expired_entries_dropped,
    channel_rebinding,
    channel_data_padding_and_length,
    binding_answered,
    classic_binding_answered,
    other_stun_punted,
    denied_peer_dropped,
    bandwidth_limited,
    snapshot_and_remove,
    burst_in_order,
    gso_bursts,
    flood_then_still_forwarding,
    unknown_relay_data_dropped,
    shutdown_closes_sockets,
    legacy_channel_numbers,
    own_listening_address_unreachable,
    denied_after_channel_install,
    channel_needs_live_permission,
    bandwidth_counts_empty_datagrams,
    new_channel_waits_for_bind_response,
    binding_rate_limited,
);
