//! A deterministic harness: the control plane and sans-IO TURN clients driven against each
//! other on a virtual clock. No sockets, no sleeps.
#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

use std::net::SocketAddr;

use turnpike_controlplane::{
    Credentials, FiveTuple, Millis, Output, Server, ServerConfig, TableChange, Transport,
};
use turnpike_proto::attr::{Nonce, Realm, Username};
use turnpike_proto::auth::long_term_key_md5;
use turnpike_proto::client::{Client, Event};
use turnpike_proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

/// The start of the virtual clock: 2026-01-01T00:00:00Z.
pub const T0: Millis = Millis(1_767_225_600_000);
pub const REALM: &str = "turnpike.test";
pub const SERVER: &str = "192.0.2.10:3478";

/// Owned form of a client event (the harness has no peer data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ev {
    Allocated {
        relayed: Vec<SocketAddr>,
        lifetime: u32,
        reservation: Option<[u8; 8]>,
    },
    Refreshed(u32),
    Permission,
    Channel(u16),
    Failed(u16),
    TimedOut,
    Nothing,
}

fn owned(e: Event<'_>) -> Ev {
    match e {
        Event::Allocated {
            relayed,
            lifetime,
            reservation,
            ..
        } => Ev::Allocated {
            relayed,
            lifetime,
            reservation,
        },
        Event::Refreshed { lifetime } => Ev::Refreshed(lifetime),
        Event::PermissionCreated => Ev::Permission,
        Event::ChannelBound { channel } => Ev::Channel(channel),
        Event::Failed { code, .. } => Ev::Failed(code),
        Event::TimedOut { .. } => Ev::TimedOut,
        _ => Ev::Nothing,
    }
}

pub fn tuple(client: &str) -> FiveTuple {
    FiveTuple {
        transport: Transport::Udp,
        client: client.parse().expect("address"),
        server: SERVER.parse().expect("address"),
    }
}

pub fn config() -> ServerConfig {
    ServerConfig {
        relay_ips: vec!["192.0.2.10".parse().expect("ip")],
        relay_ports: (50000, 50099),
        unauth_rate: 0,
        relay_pool: 0,
        // The tests' peers are in the documentation ranges, which the default policy
        // denies (as every address that is not globally reachable).
        policy: turnpike_controlplane::PeerPolicy::new(
            [
                "192.0.2.0/24",
                "198.51.100.0/24",
                "203.0.113.0/24",
                "2001:db8::/32",
            ]
            .iter()
            .map(|c| c.parse().expect("cidr"))
            .collect(),
            Vec::new(),
            Vec::new(),
        ),
        ..ServerConfig::default()
    }
}

pub struct Harness {
    pub server: Server,
    pub now: Millis,
    /// Fail this many upcoming binds (as a data plane would on EADDRINUSE).
    pub fail_binds: u32,
    /// Every output seen, in order.
    pub log: Vec<Output>,
}

impl Harness {
    pub fn new(cfg: ServerConfig) -> Harness {
        let creds = Credentials::new(
            REALM,
            &[
                ("alice".into(), "wonderland".into()),
                ("bob".into(), "builder".into()),
            ],
            &["s3cret".into()],
        );
        Harness::with_credentials(cfg, creds)
    }

    pub fn with_credentials(cfg: ServerConfig, creds: Credentials) -> Harness {
        Harness {
            server: Server::new(cfg, creds, [42; 32], 7),
            now: T0,
            fail_binds: 0,
            log: Vec::new(),
        }
    }

    /// Delivers one datagram from `tuple`, acknowledges binds, returns what the server
    /// transmitted back.
    pub fn deliver(&mut self, tuple: FiveTuple, data: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        self.server.handle(self.now, tuple, data, &mut out);
        self.settle(out)
    }

    fn settle(&mut self, mut out: Vec<Output>) -> Vec<Vec<u8>> {
        let mut sent = Vec::new();
        while !out.is_empty() {
            let mut next = Vec::new();
            for o in out.drain(..) {
                match &o {
                    Output::Bind(b) => {
                        let r = if self.fail_binds > 0 {
                            self.fail_binds -= 1;
                            Err(turnpike_controlplane::BindError::AddressInUse)
                        } else {
                            Ok(())
                        };
                        self.server.handle_bind_result(self.now, b.id, r, &mut next);
                    }
                    Output::Transmit { data, .. } => sent.push(data.clone()),
                    _ => {}
                }
                self.log.push(o);
            }
            out = next;
        }
        sent
    }

    /// Runs the client's outstanding transaction to its end: delivers `req`, feeds every
    /// response back, follows 401/438 retries.
    pub fn run(&mut self, client: &mut Client, t: FiveTuple, req: &[u8]) -> Ev {
        let mut req = req.to_vec();
        for _ in 0..8 {
            let responses = self.deliver(t, &req);
            let mut next = Vec::new();
            let mut result = Ev::Nothing;
            for r in &responses {
                match client.handle(self.now.0, r, &mut next) {
                    Event::Retry => {}
                    e => result = owned(e),
                }
            }
            if result != Ev::Nothing {
                return result;
            }
            if next.is_empty() {
                return Ev::Nothing;
            }
            req = next;
        }
        Ev::Nothing
    }

    /// Advances the virtual clock by `secs`, firing timers; returns the table changes.
    pub fn advance(&mut self, secs: u64) -> Vec<TableChange> {
        self.now = self.now.plus_secs(secs);
        let mut out = Vec::new();
        self.server.handle_timeout(self.now, &mut out);
        let mut changes = Vec::new();
        for o in &out {
            if let Output::Table(c) = o {
                changes.push(c.clone());
            }
        }
        self.log.extend(out);
        changes
    }

    /// Table changes logged so far, and clears the log.
    pub fn take_changes(&mut self) -> Vec<TableChange> {
        let changes = self
            .log
            .iter()
            .filter_map(|o| match o {
                Output::Table(c) => Some(c.clone()),
                _ => None,
            })
            .collect();
        self.log.clear();
        changes
    }

    pub fn allocate(&mut self, client: &mut Client, t: FiveTuple) -> Ev {
        let mut req = Vec::new();
        client
            .allocate(self.now.0, Default::default(), &mut req)
            .expect("request");
        self.run(client, t, &req)
    }
}

/// The error code of a response datagram, if it is an error.
pub fn error_code(resp: &[u8]) -> Option<u16> {
    let m = Message::parse(resp).ok()?;
    m.attr::<turnpike_proto::attr::ErrorCode>()
        .ok()
        .flatten()
        .map(|e| e.code)
}

/// An authenticated request built by hand (MD5 key, a fresh nonce for `client`, REALM
/// `realm`), for cases the sans-IO client won't produce. `fill` adds attributes before
/// the credentials.
#[allow(clippy::too_many_arguments)]
pub fn signed_request<F>(
    h: &Harness,
    client: SocketAddr,
    method: Method,
    user: &str,
    pass: &str,
    realm: &str,
    tid: u8,
    fill: F,
) -> Vec<u8>
where
    F: FnOnce(&mut MessageWriter<'_>),
{
    let nonce = h.server.mint_nonce(h.now, &client);
    let mut buf = vec![0u8; 1024];
    let mut w =
        MessageWriter::new(&mut buf, method, Class::Request, TransactionId([tid; 12])).unwrap();
    fill(&mut w);
    w.add(&Username(user)).unwrap();
    w.add(&Realm(realm)).unwrap();
    w.add(&Nonce(&nonce)).unwrap();
    w.add_integrity(&long_term_key_md5(user, REALM, pass))
        .unwrap();
    w.add_fingerprint().unwrap();
    let n = w.finish();
    buf.truncate(n);
    buf
}

/// What a data plane would report for allocation `info` in a resync, with `username`.
pub fn snapshot(
    info: &turnpike_controlplane::AllocationInfo,
    username: &str,
) -> turnpike_controlplane::AllocationSnapshot {
    turnpike_controlplane::AllocationSnapshot {
        id: info.id,
        worker: 0,
        tuple: info.tuple,
        relays: info.relays.clone(),
        deadline: info.expires,
        bandwidth: 0,
        user: info.account.clone(),
        username: username.to_owned(),
        dont_fragment: false,
        permissions: info.permissions.clone(),
        channels: info.channels.clone(),
        usage: Default::default(),
    }
}
