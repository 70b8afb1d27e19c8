//! The TURN server as a sans-IO state machine.
//!
//! Call order: feed every STUN request the data plane punts with [`Server::handle`];
//! answer each [`Output::Bind`] with [`Server::handle_bind_result`]; call
//! [`Server::handle_timeout`] when [`Server::poll_timeout`] says so. Each entry point
//! takes `now` and appends what must happen to the caller's `Vec<Output>`: datagrams to
//! send, relay-table changes for the data plane, relay sockets to bind, and lifecycle
//! events. Nothing here reads a clock or touches a socket.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use ahash::AHashMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use turnpike_plane::{RelayIp, advertised_addr};
use turnpike_proto::attr::{
    self, AdditionalAddressFamily, AddressErrorCode, ChannelNumber, DontFragment, ErrorCode,
    EvenPort, Family, Lifetime, Nonce, PasswordAlgorithm, PasswordAlgorithmId, PasswordAlgorithms,
    Realm, RequestedAddressFamily, RequestedTransport, ReservationToken, UnknownAttributes,
    Userhash, Username, XorMappedAddress, XorPeerAddress, XorRelayedAddress,
};
use turnpike_proto::auth::IntegrityKey;
use turnpike_proto::stun::{
    self, Class, HEADER_LEN, Message, MessageWriter, Method, TransactionId,
};
use turnpike_proto::{DecodeError, EncodeError};

use crate::auth::{AuthError, Credentials, NonceCheck, NonceKey};
use crate::policy::{PeerPolicy, Verdict};
use crate::ports::Ports;
use crate::ratelimit::{LogSampler, RateLimiter};
use crate::types::{
    AllocationId, AllocationSnapshot, BindError, BindRequest, EndReason, Event, FiveTuple, Millis,
    Output, TableChange,
};

// The table lives in proto, next to ERROR-CODE; the control plane still exports it.
pub use turnpike_proto::reason::reason_phrase;

/// A relay socket of `pool` a plain Allocate can take: one family, no EVEN-PORT, on one
/// of its relay IPs.
fn pooled(p: &PendingAllocate, pool: &[SocketAddr]) -> Option<SocketAddr> {
    if p.even || p.token.is_some() || p.families.len() != 1 {
        return None;
    }
    let f = *p.families.first()?;
    pool.iter()
        .copied()
        .find(|a| Family::of(&a.ip()) == f && p.relay_ips.contains(&a.ip()))
}

/// The password algorithms offered, in order of preference (RFC 8489 §9.2.1).
const OFFERED_ALGORITHMS: [PasswordAlgorithmId; 2] =
    [PasswordAlgorithmId::SHA256, PasswordAlgorithmId::MD5];
/// How long a RESERVATION-TOKEN holds its port (RFC 8656 §7.2 suggests about 30 s).
const RESERVATION_SECS: u64 = 30;
/// Binds tried with different ports before an Allocate fails with 508.
const BIND_ATTEMPTS: u32 = 4;
/// How long a bind may go unacknowledged (a data plane that went away) before the
/// Allocate fails with 508 and its ports are released.
const BIND_TIMEOUT_MS: u64 = 5_000;
/// How often idle rate-limiter buckets are dropped and suppressed refusal log lines are
/// summarized.
const SWEEP_INTERVAL_MS: u64 = 1_000;
/// Sources tracked per rate-limiter level (a bound on memory: a few MB).
const RATE_LIMIT_SOURCES: usize = 65_536;
/// Refusal log lines written per second and kind; the rest are summarized once a second.
const REFUSAL_LOGS_PER_SEC: u32 = 5;
/// Users whose first 486 is remembered as logged (a bound on memory). The first 486 of
/// a user is always logged, whatever the sampler says: a platform that hands one
/// username to every client learns from it why allocations stop.
const QUOTA_LOGGED_USERS: usize = 10_000;

/// The server's settings. Every field has a default; see [`ServerConfig::default`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Relay IPs (at least one per family to be served).
    pub relay_ips: Vec<IpAddr>,
    /// Behind a 1:1 NAT: the address clients are given (XOR-RELAYED-ADDRESS) for relay
    /// IPs of `relay_ips`; those not listed are given as they are. Used when the data
    /// plane of a request sent no relay IPs of its own (see [`Via::relay_ips`]).
    pub advertised_ips: Vec<RelayIp>,
    /// Relay port range, inclusive.
    pub relay_ports: (u16, u16),
    /// Lifetime granted when the client asks for less or nothing (s). RFC default 600.
    pub default_lifetime: u32,
    /// Most lifetime granted (s). Default 3600.
    pub max_lifetime: u32,
    /// Permission lifetime (s). RFC: 300.
    pub permission_lifetime: u32,
    /// Channel binding lifetime (s). RFC: 600.
    pub channel_lifetime: u32,
    /// How long a nonce stays valid (s). Default 600.
    pub nonce_lifetime: u32,
    /// Allocations per user (the accounting user: for REST credentials the part after
    /// `:`); 0 is unlimited. Default 100: far more than one client needs (an ICE agent
    /// allocates once per component and candidate family, a conference client a few
    /// dozen at most), and small enough that one leaked or abused credential holds under
    /// 1 % of the default relay port range, so it cannot starve other users.
    pub user_quota: u32,
    /// Allocations in all; 0 is unlimited. Default 15 000: below the 16 384 ports of the
    /// default relay range on one relay IP, so that ports stay free for EVEN-PORT
    /// reservations (which hold a second port) and for binds being retried, and the
    /// random port choice does not degrade into a search of a nearly full range. Lower it
    /// with a narrower `relay_ports`, raise it with more relay IPs.
    pub total_quota: u32,
    /// Bandwidth limit per allocation and direction in bytes/s, enforced by the data plane;
    /// 0 is unlimited.
    pub bandwidth_limit: u64,
    /// Permissions per allocation (a bound on memory); further ones get 508.
    pub max_permissions: usize,
    /// Channels per allocation; further ones get 508.
    pub max_channels: usize,
    /// Unauthenticated requests (401/438 challenges, 400s, Binding) answered per second
    /// per client transport address (IP and port); 0 disables this level. Default 20.
    /// Answers a client holding an allocation (or awaiting one) needs to keep it, such as
    /// a 438 on Refresh, are never limited.
    pub unauth_rate: u32,
    /// Burst of unauthenticated requests per client transport address. Default 64: a
    /// client needs two or three per allocation, so this only bites a flood.
    pub unauth_burst: u32,
    /// Unauthenticated requests answered per second per client IP, across all its ports;
    /// 0 disables this level. Default 200: far above one client's needs, so that many
    /// clients behind one NAT address are not throttled, yet a host spraying source ports
    /// (or spoofing a victim's address at up to this rate) does not starve the victim.
    pub unauth_ip_rate: u32,
    /// Burst of unauthenticated requests per client IP. Default 1000: 200 clients behind
    /// one address starting at once, each with two or three unauthenticated exchanges
    /// (Binding, the 401 challenge, a 438), fit in it.
    pub unauth_ip_burst: u32,
    /// The peer policy.
    pub policy: PeerPolicy,
    /// SOFTWARE sent in authenticated responses.
    pub software: Option<String>,
    /// Accept the RFC 5766 channel range 0x4000..=0x7FFF (RFC 8656 allows only
    /// 0x4000..=0x4FFF). Off by default.
    pub legacy_channel_numbers: bool,
    /// Relay sockets each data-plane worker keeps bound in advance per relay IP, so that
    /// a plain Allocate needs no bind round trip (refilled once a second). 0 turns the
    /// pool off. Default 8.
    pub relay_pool: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            relay_ips: vec![IpAddr::from([127, 0, 0, 1])],
            advertised_ips: Vec::new(),
            relay_ports: (49152, 65535),
            default_lifetime: 600,
            max_lifetime: 3600,
            permission_lifetime: 300,
            channel_lifetime: 600,
            nonce_lifetime: 600,
            user_quota: 100,
            total_quota: 15_000,
            bandwidth_limit: 0,
            max_permissions: 256,
            max_channels: 256,
            unauth_rate: 20,
            unauth_burst: 64,
            unauth_ip_rate: 200,
            unauth_ip_burst: 1000,
            policy: PeerPolicy::default(),
            software: Some(concat!("turnpike ", env!("CARGO_PKG_VERSION")).to_owned()),
            legacy_channel_numbers: false,
            relay_pool: 8,
        }
    }
}

/// The outcome of a successful authentication.
#[derive(Debug, Clone)]
struct Authed {
    username: String,
    account: String,
    /// The key that verified the request, for the integrity attribute it came with:
    /// responses are sealed with the same one.
    key: IntegrityKey,
}

#[derive(Debug, Clone)]
struct Allocation {
    tuple: FiveTuple,
    username: String,
    account: String,
    relays: Vec<SocketAddr>,
    expires: Millis,
    created_at: Millis,
    permissions: AHashMap<IpAddr, Millis>,
    channels: AHashMap<u16, (SocketAddr, Millis)>,
    peer_channel: AHashMap<SocketAddr, u16>,
    /// The Allocate transaction and its success response, for retransmissions.
    allocate_tid: Option<TransactionId>,
    allocate_response: Vec<u8>,
}

#[derive(Debug, Clone)]
struct PendingAllocate {
    tuple: FiveTuple,
    tid: TransactionId,
    auth: Authed,
    lifetime: u32,
    relays: Vec<SocketAddr>,
    families: Vec<Family>,
    v6_error: bool,
    even: bool,
    reserve_next: bool,
    token: Option<[u8; 8]>,
    dont_fragment: bool,
    attempts: u32,
    /// When the current bind times out (its timer key).
    bind_deadline: Millis,
    /// The relay IPs to choose from (the receiving data plane's).
    relay_ips: Vec<IpAddr>,
    /// Those of them behind a 1:1 NAT, with the address the client is given.
    advertised: Vec<RelayIp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Bind(u64),
    Allocation(AllocationId),
    Permission(AllocationId, IpAddr),
    Channel(AllocationId, u16),
    Reservation([u8; 8]),
}

/// A summary of one allocation, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationInfo {
    /// The allocation.
    pub id: AllocationId,
    /// The client 5-tuple.
    pub tuple: FiveTuple,
    /// The username it authenticated with.
    pub username: String,
    /// The user it is accounted to.
    pub account: String,
    /// Relayed addresses.
    pub relays: Vec<SocketAddr>,
    /// When it was created.
    pub created_at: Millis,
    /// When it expires.
    pub expires: Millis,
    /// Permitted peer IPs.
    pub permissions: Vec<(IpAddr, Millis)>,
    /// Bound channels.
    pub channels: Vec<(u16, SocketAddr, Millis)>,
}

/// Counters of the control plane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Live allocations.
    pub allocations: u64,
    /// Live permissions.
    pub permissions: u64,
    /// Live channels.
    pub channels: u64,
    /// Requests that failed authentication (401 after integrity was tried, 441).
    pub auth_failures: u64,
    /// Unauthenticated requests dropped by the rate limiter.
    pub rate_limited: u64,
    /// Peers refused by the peer policy (403 on CreatePermission or ChannelBind).
    pub policy_denied: u64,
    /// Allocates refused by a quota (486 per user, 508 in total).
    pub quota_rejected: u64,
    /// Requests answered 438 Stale Nonce (a steady rate is normal; a jump points at
    /// clock or secret trouble between control planes).
    pub stale_nonces: u64,
    /// Requests answered.
    pub requests: u64,
    /// Relay binds the data plane refused (each retried on other ports, then 508).
    pub bind_failures: u64,
    /// Replies to UDP clients shed because the data plane was too far behind to send
    /// them (a flood: the clients retransmit).
    pub replies_shed: u64,
}

/// The TURN server state machine. See the module docs for the call order.
#[derive(Debug)]
pub struct Server {
    cfg: ServerConfig,
    /// The wall clock minus the plane's clock, milliseconds (see [`Server::set_wall`]).
    wall_offset: i64,
    creds: Credentials,
    nonces: NonceKey,
    limiter: RateLimiter,
    rng: StdRng,
    ports: Ports,
    allocations: AHashMap<AllocationId, Allocation>,
    by_tuple: AHashMap<FiveTuple, AllocationId>,
    per_user: AHashMap<String, u32>,
    /// Allocations of each user on the other instances of the fleet (as far as the
    /// registry says; see `fleet.rs`), counted against the per-user quota too.
    fleet_users: AHashMap<String, u32>,
    pending: AHashMap<u64, PendingAllocate>,
    pending_by_tuple: AHashMap<FiveTuple, u64>,
    reservations: AHashMap<[u8; 8], (SocketAddr, Millis)>,
    timers: BTreeSet<(Millis, Timer)>,
    next_id: u64,
    next_bind: u64,
    stats: Stats,
    draining: bool,
    alternate: Option<SocketAddr>,
    /// Set for the duration of one `handle_via` call.
    redirect: Option<SocketAddr>,
    redirect_domain: Option<String>,
    /// Users refused whatever their credentials (revoked fleet-wide).
    revoked: std::collections::HashSet<String>,
    /// When the rate limiter is next swept and refusal summaries written.
    next_sweep: Millis,
    /// One sampler per [`Refusal`] kind.
    refusal_logs: [LogSampler; Refusal::COUNT],
    /// Users whose first 486 has been logged (at most [`QUOTA_LOGGED_USERS`]; emptied
    /// when full, so that each is logged again once).
    quota_logged: std::collections::HashSet<String>,
}

/// Kinds of refusal that are logged (sampled: see [`REFUSAL_LOGS_PER_SEC`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Unknown user, expired or wrong credentials, wrong realm, 441.
    Auth,
    /// Dropped by the rate limiter.
    RateLimited,
    /// A peer denied by the policy.
    Policy,
    /// A quota reached.
    Quota,
    /// A relay bind the data plane refused.
    Bind,
}

impl Refusal {
    const COUNT: usize = 5;
    const ALL: [Refusal; Refusal::COUNT] = [
        Refusal::Auth,
        Refusal::RateLimited,
        Refusal::Policy,
        Refusal::Quota,
        Refusal::Bind,
    ];

    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Refusal::Auth => "authentication failure",
            Refusal::RateLimited => "rate-limited request",
            Refusal::Policy => "peer denied by policy",
            Refusal::Quota => "allocation quota reached",
            Refusal::Bind => "relay bind failure",
        }
    }
}

/// The data plane a request arrived through, in a cluster.
#[derive(Debug, Clone, Copy, Default)]
pub struct Via<'a> {
    /// That data plane's relay IPs with their advertised addresses (empty: the
    /// configured ones, [`ServerConfig::relay_ips`] and
    /// [`ServerConfig::advertised_ips`]).
    pub relay_ips: &'a [RelayIp],
    /// Set when that data plane takes no new allocations: where to send them instead.
    pub alternate: Option<SocketAddr>,
    /// The name of the alternate's TLS certificate: sent as ALTERNATE-DOMAIN to a
    /// client on TLS (RFC 8489 §14.15), so that it can verify the server it is sent to.
    pub alternate_domain: Option<&'a str>,
    /// Relay sockets the worker of the request holds bound in advance (reserved with
    /// [`Server::reserve_relay`]): a plain Allocate takes one and needs no bind round
    /// trip; the caller sees which in the `AllocationAdd`'s relays.
    pub pool: &'a [SocketAddr],
}

/// Where a request's processing stopped with an error response.
struct Reject {
    /// The ERROR-CODE; its phrase comes from [`reason_phrase`].
    code: u16,
    /// What to count and log about it, beyond the response.
    note: Note,
}

/// Why a refusal is worth counting and logging.
#[derive(Debug, Clone, Copy)]
enum Note {
    None,
    /// The peer policy denied this peer.
    Policy(SocketAddr),
    /// A quota (per user or in total) was reached.
    Quota,
}

fn reject(code: u16) -> Reject {
    Reject {
        code,
        note: Note::None,
    }
}

impl From<DecodeError> for Reject {
    fn from(_: DecodeError) -> Reject {
        reject(400)
    }
}

impl Server {
    /// A server. `nonce_secret` keys the stateless nonces (use fresh random bytes; all
    /// control planes of a cluster may share one so nonces survive a failover); `seed`
    /// seeds the port choice and reservation tokens.
    pub fn new(cfg: ServerConfig, creds: Credentials, nonce_secret: [u8; 32], seed: u64) -> Server {
        let nonces = NonceKey::new(nonce_secret, u64::from(cfg.nonce_lifetime));
        let limiter = RateLimiter::new(
            cfg.unauth_rate,
            cfg.unauth_burst,
            cfg.unauth_ip_rate,
            cfg.unauth_ip_burst,
            RATE_LIMIT_SOURCES,
        );
        let ports = Ports::new(cfg.relay_ports.0, cfg.relay_ports.1);
        Server {
            cfg,
            wall_offset: 0,
            creds,
            nonces,
            limiter,
            rng: StdRng::seed_from_u64(seed),
            ports,
            allocations: AHashMap::new(),
            by_tuple: AHashMap::new(),
            per_user: AHashMap::new(),
            fleet_users: AHashMap::new(),
            pending: AHashMap::new(),
            pending_by_tuple: AHashMap::new(),
            reservations: AHashMap::new(),
            timers: BTreeSet::new(),
            next_id: 1,
            next_bind: 1,
            stats: Stats::default(),
            draining: false,
            alternate: None,
            redirect: None,
            redirect_domain: None,
            revoked: std::collections::HashSet::new(),
            next_sweep: Millis(0),
            refusal_logs: std::array::from_fn(|_| LogSampler::new(REFUSAL_LOGS_PER_SEC)),
            quota_logged: std::collections::HashSet::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// The credentials (for rotating REST secrets).
    pub fn credentials_mut(&mut self) -> &mut Credentials {
        &mut self.creds
    }

    /// Replaces the peer policy.
    pub fn set_policy(&mut self, policy: PeerPolicy) {
        self.cfg.policy = policy;
    }

    /// Replaces the allocation quotas: per user and in all (0: unlimited).
    pub fn set_quotas(&mut self, user: u32, total: u32) {
        self.cfg.user_quota = user;
        self.cfg.total_quota = total;
    }

    /// Stops accepting new allocations: new Allocates get 300 Try Alternate towards
    /// Counts replies the caller shed instead of queueing them (see [`Stats::replies_shed`]).
    pub fn count_replies_shed(&mut self, n: u64) {
        self.stats.replies_shed += n;
    }

    /// The wall clock read at `now` (unix milliseconds): what TURN REST usernames, whose
    /// expiry is a wall-clock time, are checked against. Nothing else depends on it, so
    /// a step of the wall clock changes no lifetime. Until set, the plane's clock is
    /// taken for the wall clock (it starts at the wall time of the process's start).
    pub fn set_wall(&mut self, now: Millis, wall: u64) {
        self.wall_offset = (wall as i64).saturating_sub(now.0 as i64);
    }

    /// `alternate` if given, else 508. Existing allocations carry on.
    pub fn set_draining(&mut self, draining: bool, alternate: Option<SocketAddr>) {
        self.draining = draining;
        self.alternate = alternate;
    }

    /// Whether the server is draining.
    pub fn draining(&self) -> bool {
        self.draining
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats;
        s.allocations = self.allocations.len() as u64;
        s.permissions = self
            .allocations
            .values()
            .map(|a| a.permissions.len() as u64)
            .sum();
        s.channels = self
            .allocations
            .values()
            .map(|a| a.channels.len() as u64)
            .sum();
        s
    }

    /// The next instant [`Server::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let timer = self.timers.first().map(|(t, _)| *t);
        // The sweep only matters while there is something to sweep or summarize; an idle
        // server is not woken every second.
        let housekeeping =
            self.limiter.tracked() > 0 || self.refusal_logs.iter().any(LogSampler::has_suppressed);
        let sweep = housekeeping.then_some(self.next_sweep);
        match (timer, sweep) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Every allocation, summarized.
    pub fn allocations(&self) -> impl Iterator<Item = AllocationInfo> + '_ {
        self.allocations.iter().map(|(id, a)| Self::info(*id, a))
    }

    /// One allocation, summarized.
    pub fn allocation(&self, id: AllocationId) -> Option<AllocationInfo> {
        self.allocations.get(&id).map(|a| Self::info(id, a))
    }

    /// The user an allocation is accounted to (cheap: no summary is built).
    pub fn account_of(&self, id: AllocationId) -> Option<&str> {
        self.allocations.get(&id).map(|a| a.account.as_str())
    }

    /// When an allocation expires.
    pub fn expiry_of(&self, id: AllocationId) -> Option<Millis> {
        self.allocations.get(&id).map(|a| a.expires)
    }

    /// The allocation of a 5-tuple.
    pub fn allocation_of(&self, tuple: &FiveTuple) -> Option<AllocationId> {
        self.by_tuple.get(tuple).copied()
    }

    fn info(id: AllocationId, a: &Allocation) -> AllocationInfo {
        let mut permissions: Vec<_> = a.permissions.iter().map(|(k, v)| (*k, *v)).collect();
        permissions.sort();
        let mut channels: Vec<_> = a.channels.iter().map(|(c, (p, t))| (*c, *p, *t)).collect();
        channels.sort();
        AllocationInfo {
            id,
            tuple: a.tuple,
            username: a.username.clone(),
            account: a.account.clone(),
            relays: a.relays.clone(),
            created_at: a.created_at,
            expires: a.expires,
            permissions,
            channels,
        }
    }

    // ----- request handling -------------------------------------------------------------

    /// Handles one datagram the data plane punted: a STUN message from `tuple`.
    pub fn handle(&mut self, now: Millis, tuple: FiveTuple, data: &[u8], out: &mut Vec<Output>) {
        self.handle_via(now, tuple, data, &Via::default(), out);
    }

    /// As [`Server::handle`], for a request that reached a particular data plane of a
    /// cluster: relay addresses for a new allocation are chosen from `via.relay_ips` (that
    /// data plane's; empty means the configured ones), and when `via.alternate` is set
    /// (that data plane is drained) a new Allocate is answered 300 Try Alternate with
    /// ALTERNATE-SERVER `alternate`. Requests on existing allocations are served as usual.
    pub fn handle_via(
        &mut self,
        now: Millis,
        tuple: FiveTuple,
        data: &[u8],
        via: &Via<'_>,
        out: &mut Vec<Output>,
    ) {
        self.redirect = via.alternate;
        self.redirect_domain = via
            .alternate_domain
            .filter(|_| tuple.transport == crate::types::Transport::Tls)
            .map(str::to_owned);
        self.dispatch(now, tuple, data, via, out);
        self.redirect = None;
        self.redirect_domain = None;
    }

    fn dispatch(
        &mut self,
        now: Millis,
        tuple: FiveTuple,
        data: &[u8],
        via: &Via<'_>,
        out: &mut Vec<Output>,
    ) {
        let msg = match Message::parse(data) {
            Ok(m) => m,
            Err(_) => {
                self.bad_request(now, tuple, data, out);
                return;
            }
        };
        if msg.class() != Class::Request {
            // Indications reach the data plane's fast path; responses are not for us.
            return;
        }
        // RFC 8489 §7.3: a message whose FINGERPRINT is wrong is discarded silently (it
        // is not STUN, or was damaged; answering could make us an echo for other
        // protocols).
        if msg.verify_fingerprint().is_err() {
            return;
        }
        self.stats.requests += 1;
        match msg.method() {
            Method::BINDING => {
                if !self.limit(tuple.client, now) {
                    return;
                }
                let mut buf = [0u8; 128];
                if let Ok(n) =
                    turnpike_proto::turn::write_binding_response(&mut buf, &msg, tuple.client)
                {
                    out.push(Output::Transmit {
                        tuple,
                        data: buf[..n].to_vec(),
                    });
                }
            }
            Method::ALLOCATE
            | Method::REFRESH
            | Method::CREATE_PERMISSION
            | Method::CHANNEL_BIND => {
                let Some(auth) = self.authenticate(now, tuple, &msg, out) else {
                    return;
                };
                if !msg.unknown_required().is_empty() {
                    let unknown = msg.unknown_required().to_vec();
                    self.respond_error(tuple, &msg, Some(&auth), reject(420), out, |w| {
                        w.add(&UnknownAttributes::new(&unknown)).map(|_| ())
                    });
                    return;
                }
                let result = match msg.method() {
                    Method::ALLOCATE => self.allocate(now, tuple, &msg, &auth, via, out),
                    Method::REFRESH => self.refresh(now, tuple, &msg, &auth, out),
                    Method::CREATE_PERMISSION => {
                        self.create_permission(now, tuple, &msg, &auth, out)
                    }
                    _ => self.channel_bind(now, tuple, &msg, &auth, out),
                };
                if let Err(r) = result {
                    self.note_refusal(now, tuple, &auth, &r);
                    self.respond_error(tuple, &msg, Some(&auth), r, out, |_| Ok(()));
                }
            }
            _ => {
                if self.limit(tuple.client, now) {
                    self.respond_error(tuple, &msg, None, reject(400), out, |_| Ok(()));
                }
            }
        }
    }

    /// A request that does not parse: answer 400 if the header is sound enough to know it
    /// is a request and to echo its transaction id; drop anything else.
    fn bad_request(&mut self, now: Millis, tuple: FiveTuple, data: &[u8], out: &mut Vec<Output>) {
        let Some(header) = data.get(..HEADER_LEN) else {
            return;
        };
        if !stun::looks_like_stun(data) {
            return;
        }
        let t = u16::from_be_bytes([header[0], header[1]]);
        let (method, class) = stun::split_message_type(t);
        if class != Class::Request || !self.limit(tuple.client, now) {
            return;
        }
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&header[8..20]);
        let mut buf = [0u8; 64];
        let Ok(mut w) = MessageWriter::new(&mut buf, method, Class::Error, TransactionId(tid))
        else {
            return;
        };
        if w.add(&ErrorCode::standard(400)).is_ok() {
            let n = w.finish();
            out.push(Output::Transmit {
                tuple,
                data: buf[..n].to_vec(),
            });
        }
    }

    /// Whether an unauthenticated answer to `client` may be sent now.
    fn limit(&mut self, client: SocketAddr, now: Millis) -> bool {
        let ok = self.limiter.allow(client, now);
        if !ok {
            self.stats.rate_limited += 1;
            if self.sample(Refusal::RateLimited, now) {
                tracing::info!(%client, "unauthenticated request dropped by the rate limiter");
            }
        }
        ok
    }

    /// As [`Server::limit`], for the answers of the authentication step. A 5-tuple that
    /// holds an allocation, or awaits one, is always answered when it tries to
    /// authenticate: a 438 on Refresh that went unanswered would cost it the allocation,
    /// and spoofed floods in its name must not be able to cause that. Only requests that
    /// carry an integrity attribute qualify: those are at least 44 bytes and, to reach a
    /// 401/438, also carry USERNAME, REALM and NONCE, so the unlimited answers stay within
    /// about twice the request's size and make a poor reflection amplifier.
    fn limit_auth(&mut self, tuple: FiveTuple, msg: &Message<'_>, now: Millis) -> bool {
        let signed = msg.has_integrity() || msg.has_integrity_sha256();
        let holder =
            self.by_tuple.contains_key(&tuple) || self.pending_by_tuple.contains_key(&tuple);
        (signed && holder) || self.limit(tuple.client, now)
    }

    /// Whether a refusal line of `kind` may be logged now (sampled, so that floods cannot
    /// fill the disk; what is held back is summarized by [`Server::handle_timeout`]).
    fn sample(&mut self, kind: Refusal, now: Millis) -> bool {
        self.refusal_logs
            .get_mut(kind.index())
            .is_some_and(|l| l.admit(now))
    }

    /// Counts and logs the policy and quota refusals of an authenticated request.
    fn note_refusal(&mut self, now: Millis, tuple: FiveTuple, auth: &Authed, r: &Reject) {
        match r.note {
            Note::None => {}
            Note::Policy(peer) => {
                self.stats.policy_denied += 1;
                if self.sample(Refusal::Policy, now) {
                    tracing::warn!(client = %tuple.client, user = %auth.account, %peer, "peer denied by policy (403)");
                }
            }
            Note::Quota => {
                self.stats.quota_rejected += 1;
                if r.code == 486 && !self.quota_logged.contains(&auth.account) {
                    if self.quota_logged.len() >= QUOTA_LOGGED_USERS {
                        self.quota_logged.clear();
                    }
                    self.quota_logged.insert(auth.account.clone());
                    let quota = self.cfg.user_quota;
                    tracing::warn!(
                        client = %tuple.client,
                        user = %auth.account,
                        quota,
                        "user {:?} reached the per-user allocation quota ({quota}): Allocate refused with 486; \
                         raise it with user_quota (--user-quota, TURNPIKE_USER_QUOTA; 0: unlimited). \
                         Further refusals are counted in turnpike_quota_rejected_total and logged sampled",
                        auth.account
                    );
                } else if self.sample(Refusal::Quota, now) {
                    let setting = if r.code == 486 {
                        "user_quota (--user-quota)"
                    } else {
                        "total_quota (--total-quota)"
                    };
                    tracing::warn!(client = %tuple.client, user = %auth.account, code = r.code, setting, "allocation quota reached");
                }
            }
        }
    }

    /// Counts and logs an authentication failure.
    fn auth_failed(&mut self, now: Millis, tuple: FiveTuple, username: &str, why: &str) {
        self.stats.auth_failures += 1;
        if self.sample(Refusal::Auth, now) {
            // Debug formatting escapes control characters: the username is the client's.
            tracing::warn!(client = %tuple.client, username = ?username, reason = why, "authentication failed");
        }
    }

    /// Checks long-term credentials (RFC 8489 §9.2.4). On failure the error response is
    /// pushed and `None` returned.
    fn authenticate(
        &mut self,
        now: Millis,
        tuple: FiveTuple,
        msg: &Message<'_>,
        out: &mut Vec<Output>,
    ) -> Option<Authed> {
        if !msg.has_integrity() && !msg.has_integrity_sha256() {
            self.challenge(now, tuple, msg, 401, out);
            return None;
        }
        let parts = (|| -> Result<_, DecodeError> {
            let user = match msg.attr::<Username>()? {
                Some(u) => Some(u.0.to_owned()),
                None => match msg.attr::<Userhash>()? {
                    Some(h) => Some(self.creds.user_by_hash(&h.0).unwrap_or("").to_owned()),
                    None => None,
                },
            };
            Ok((user, msg.attr::<Realm>()?, msg.attr::<Nonce>()?))
        })();
        let (user, realm, nonce) = match parts {
            Ok((Some(u), Some(r), Some(n))) => (u, r, n),
            _ => {
                if self.limit_auth(tuple, msg, now) {
                    self.respond_error(tuple, msg, None, reject(400), out, |_| Ok(()));
                }
                return None;
            }
        };
        if self.nonces.check(nonce.0, now, &tuple.client) != NonceCheck::Valid {
            self.stats.stale_nonces += 1;
            self.challenge(now, tuple, msg, 438, out);
            return None;
        }
        let algorithm = match self.negotiated_algorithm(msg) {
            Ok(a) => a,
            Err(r) => {
                if self.limit_auth(tuple, msg, now) {
                    self.respond_error(tuple, msg, None, r, out, |_| Ok(()));
                }
                return None;
            }
        };
        // RFC 8489 §9.2.4: the key is "the password associated with the username ... in
        // the REALM attribute". We serve one realm and know no password in any other, so
        // another REALM is an invalid credential: 401 carrying our REALM and a NONCE, as
        // for an unknown username (not 400, which is for a REALM that is missing).
        if realm.0 != self.creds.realm() {
            self.auth_failed(now, tuple, &user, "wrong realm");
            self.challenge(now, tuple, msg, 401, out);
            return None;
        }
        // MESSAGE-INTEGRITY-SHA256 is checked when present, even next to MESSAGE-INTEGRITY.
        let integrity_key = if msg.has_integrity_sha256() {
            IntegrityKey::Sha256
        } else {
            IntegrityKey::Sha1
        };
        // TURN REST usernames carry a wall-clock expiry: checked against the wall clock.
        let wall = Millis(now.0.saturating_add_signed(self.wall_offset));
        let candidates = match self.creds.candidates(&user, algorithm, wall) {
            Ok(c) => c,
            Err(e) => {
                let why = match e {
                    AuthError::UnknownUser => "unknown user",
                    AuthError::Expired => "credential expired",
                };
                self.auth_failed(now, tuple, &user, why);
                self.challenge(now, tuple, msg, 401, out);
                return None;
            }
        };
        let key = candidates
            .keys
            .into_iter()
            .map(integrity_key)
            .find(|k| msg.verify(k).is_ok());
        let Some(key) = key else {
            self.auth_failed(now, tuple, &user, "wrong password");
            self.challenge(now, tuple, msg, 401, out);
            return None;
        };
        // A revoked user (by username or accounting user) is refused like a wrong
        // credential, whatever it signed with.
        if !self.revoked.is_empty()
            && (self.revoked.contains(&user) || self.revoked.contains(&candidates.account))
        {
            self.auth_failed(now, tuple, &user, "revoked user");
            self.challenge(now, tuple, msg, 401, out);
            return None;
        }
        let authed = Authed {
            username: user,
            account: candidates.account,
            key,
        };
        // An allocation's later requests must come with the same credentials (RFC 8656
        // §5). An allocation restored from a data plane that did not keep usernames has
        // none: the first request of its accounting user re-establishes it.
        if let Some(id) = self.by_tuple.get(&tuple)
            && let Some(a) = self.allocations.get_mut(id)
        {
            let same = if a.username.is_empty() {
                a.account == authed.account
            } else {
                a.username == authed.username
            };
            if !same {
                self.auth_failed(now, tuple, &authed.username, "other credentials (441)");
                self.respond_error(tuple, msg, Some(&authed), reject(441), out, |_| Ok(()));
                return None;
            }
            if a.username.is_empty() {
                a.username.clone_from(&authed.username);
            }
        }
        Some(authed)
    }

    fn negotiated_algorithm(&self, msg: &Message<'_>) -> Result<PasswordAlgorithmId, Reject> {
        let chosen = msg.attr::<PasswordAlgorithm>()?;
        let offered = msg.attr::<PasswordAlgorithms>()?;
        match (chosen, offered) {
            (None, None) => Ok(PasswordAlgorithmId::MD5),
            (Some(c), Some(o)) => {
                let mut ours = [0u8; 8];
                let mut w_ok = true;
                for (i, a) in OFFERED_ALGORITHMS.iter().enumerate() {
                    match ours.get_mut(i * 4..i * 4 + 2) {
                        Some(s) => s.copy_from_slice(&a.0.to_be_bytes()),
                        None => w_ok = false,
                    }
                }
                let echoed_right = w_ok && o.raw() == ours;
                if echoed_right && OFFERED_ALGORITHMS.contains(&c.algorithm) && c.params.is_empty()
                {
                    Ok(c.algorithm)
                } else {
                    Err(reject(400))
                }
            }
            _ => Err(reject(400)),
        }
    }

    /// 401 or 438 with REALM, a fresh NONCE and PASSWORD-ALGORITHMS; rate-limited.
    fn challenge(
        &mut self,
        now: Millis,
        tuple: FiveTuple,
        msg: &Message<'_>,
        code: u16,
        out: &mut Vec<Output>,
    ) {
        if !self.limit_auth(tuple, msg, now) {
            return;
        }
        let nonce = self.nonces.mint(now, &tuple.client);
        let realm = self.creds.realm().to_owned();
        self.respond_error(tuple, msg, None, reject(code), out, |w| {
            w.add(&Realm(&realm))?;
            w.add(&Nonce(&nonce))?;
            w.add(&PasswordAlgorithms::new(&OFFERED_ALGORITHMS))?;
            Ok(())
        });
    }

    fn respond<F>(
        &self,
        msg: &Message<'_>,
        class: Class,
        auth: Option<&Authed>,
        fill: F,
    ) -> Result<Vec<u8>, EncodeError>
    where
        F: FnOnce(&mut MessageWriter<'_>) -> Result<(), EncodeError>,
    {
        build_response(
            msg.method(),
            class,
            msg.transaction_id(),
            1024,
            auth.map(|a| self.tail(a)),
            fill,
        )
    }

    /// The tail of responses to an authenticated request: SOFTWARE and its key.
    fn tail<'a>(&'a self, auth: &'a Authed) -> Tail<'a> {
        Tail {
            software: self.cfg.software.as_deref(),
            key: &auth.key,
        }
    }

    fn respond_error<F>(
        &self,
        tuple: FiveTuple,
        msg: &Message<'_>,
        auth: Option<&Authed>,
        r: Reject,
        out: &mut Vec<Output>,
        fill: F,
    ) where
        F: FnOnce(&mut MessageWriter<'_>) -> Result<(), EncodeError>,
    {
        if r.code != 401 && r.code != 438 {
            tracing::debug!(
                client = %tuple.client,
                method = format_args!("{:#05x}", msg.method().0),
                code = r.code,
                attributes = ?msg.raw_attributes().map(|a| (a.typ.0, a.value)).collect::<Vec<_>>(),
                "request refused"
            );
        }
        let res = self.respond(msg, Class::Error, auth, |w| {
            w.add(&ErrorCode::standard(r.code))?;
            fill(w)
        });
        if let Ok(data) = res {
            out.push(Output::Transmit { tuple, data });
        }
    }

    fn respond_success<F>(
        &self,
        tuple: FiveTuple,
        msg: &Message<'_>,
        auth: &Authed,
        out: &mut Vec<Output>,
        fill: F,
    ) -> Option<Vec<u8>>
    where
        F: FnOnce(&mut MessageWriter<'_>) -> Result<(), EncodeError>,
    {
        let data = self.respond(msg, Class::Success, Some(auth), fill).ok()?;
        out.push(Output::Transmit {
            tuple,
            data: data.clone(),
        });
        Some(data)
    }

    // ----- Allocate ---------------------------------------------------------------------

    fn allocate(
        &mut self,
        now: Millis,
        tuple: FiveTuple,
        msg: &Message<'_>,
        auth: &Authed,
        via: &Via<'_>,
        out: &mut Vec<Output>,
    ) -> Result<(), Reject> {
        if let Some(id) = self.by_tuple.get(&tuple) {
            if let Some(a) = self.allocations.get(id)
                && a.allocate_tid == Some(msg.transaction_id())
                && !a.allocate_response.is_empty()
            {
                out.push(Output::Transmit {
                    tuple,
                    data: a.allocate_response.clone(),
                });
                return Ok(());
            }
            return Err(reject(437));
        }
        if let Some(req) = self.pending_by_tuple.get(&tuple) {
            // A retransmission while the relay socket is being bound: the answer follows.
            let same = self
                .pending
                .get(req)
                .is_some_and(|p| p.tid == msg.transaction_id());
            return if same { Ok(()) } else { Err(reject(437)) };
        }
        let transport = msg.attr::<RequestedTransport>()?.ok_or(reject(400))?;
        if transport.0 != attr::PROTOCOL_UDP {
            return Err(reject(442));
        }
        let token = msg.attr::<ReservationToken>()?;
        let even = msg.attr::<EvenPort>()?;
        let requested = msg.attr::<RequestedAddressFamily>()?;
        let additional = msg.attr::<AdditionalAddressFamily>()?;
        let dont_fragment = msg.attr::<DontFragment>()?.is_some();
        if token.is_some() && (even.is_some() || requested.is_some() || additional.is_some()) {
            return Err(reject(400));
        }
        if requested.is_some() && additional.is_some() {
            return Err(reject(400));
        }
        if let Some(a) = additional
            && a.0 != Family::V6
        {
            return Err(reject(400));
        }
        if self.draining || self.redirect.is_some() {
            return match self.redirect.or(self.alternate) {
                Some(alt) => {
                    let domain = self.redirect_domain.take();
                    let data = self
                        .respond(msg, Class::Error, Some(auth), |w| {
                            w.add(&ErrorCode::standard(300))?;
                            w.add(&attr::AlternateServer(alt))?;
                            if let Some(d) = domain.as_deref() {
                                w.add(&attr::AlternateDomain(d))?;
                            }
                            Ok(())
                        })
                        .map_err(|_| reject(500))?;
                    out.push(Output::Transmit { tuple, data });
                    Ok(())
                }
                None => Err(reject(508)),
            };
        }
        if self.cfg.user_quota > 0
            && self.per_user.get(&auth.account).copied().unwrap_or(0)
                + self.fleet_users.get(&auth.account).copied().unwrap_or(0)
                >= self.cfg.user_quota
        {
            return Err(Reject {
                note: Note::Quota,
                ..reject(486)
            });
        }
        if self.cfg.total_quota > 0
            && (self.allocations.len() + self.pending.len()) as u64
                >= u64::from(self.cfg.total_quota)
        {
            return Err(Reject {
                note: Note::Quota,
                ..reject(508)
            });
        }
        let lifetime = match msg.attr::<Lifetime>()? {
            Some(l) => l.0.clamp(self.cfg.default_lifetime, self.cfg.max_lifetime),
            None => self.cfg.default_lifetime,
        };
        // Relays are chosen, bound and tabled by their private IPs; only the response
        // names the advertised ones.
        let (relay_ips, advertised) = if via.relay_ips.is_empty() {
            (self.cfg.relay_ips.clone(), self.cfg.advertised_ips.clone())
        } else {
            (
                via.relay_ips.iter().map(|r| r.ip).collect(),
                via.relay_ips
                    .iter()
                    .filter(|r| r.is_nat())
                    .copied()
                    .collect(),
            )
        };
        let has_family = |f: Family| relay_ips.iter().any(|ip| Family::of(ip) == f);
        let mut families = match (requested, additional) {
            (Some(RequestedAddressFamily(f)), _) => vec![f],
            (None, Some(_)) => vec![Family::V4, Family::V6],
            (None, None) => vec![Family::V4],
        };
        let mut v6_error = false;
        for f in &families {
            if matches!(f, Family::Other(_)) {
                return Err(reject(440));
            }
        }
        // A dual request where only IPv4 can be served: IPv4 alone, with
        // ADDRESS-ERROR-CODE for IPv6 (RFC 8656 §7.2).
        if families.len() == 2 && !has_family(Family::V6) {
            families.truncate(1);
            v6_error = true;
        }
        if families.iter().any(|f| !has_family(*f)) {
            return Err(reject(440));
        }

        let mut pending = PendingAllocate {
            tuple,
            tid: msg.transaction_id(),
            auth: auth.clone(),
            lifetime,
            relays: Vec::new(),
            families,
            v6_error,
            even: even.is_some(),
            reserve_next: even.is_some_and(|e| e.reserve),
            token: None,
            dont_fragment,
            attempts: 0,
            bind_deadline: now,
            relay_ips,
            advertised,
        };
        if let Some(t) = token {
            let Some((addr, until)) = self.reservations.remove(&t.0) else {
                return Err(reject(508));
            };
            self.timers.remove(&(until, Timer::Reservation(t.0)));
            // The port stays marked used: it moves from the reservation to this allocation.
            pending.relays = vec![addr];
            pending.token = Some(t.0);
        } else if let Some(addr) = pooled(&pending, via.pool) {
            // A socket bound in advance on the worker: no bind round trip. Its port was
            // marked used when it was reserved for the pool.
            pending.relays = vec![addr];
            self.finish_allocate(now, pending, out);
            return Ok(());
        } else if !self.pick_relays(&mut pending) {
            return Err(reject(508));
        }
        self.start_bind(now, pending, out);
        Ok(())
    }

    /// Reserves a free relay port on `ip` (marked used) for a socket a data plane binds in
    /// advance; see [`Via::pool`]. `None` when the range is full.
    pub fn reserve_relay(&mut self, ip: IpAddr) -> Option<SocketAddr> {
        let port = self.ports.pick(&mut self.rng, ip, false, false)?;
        let addr = SocketAddr::new(ip, port);
        self.ports.take(addr);
        Some(addr)
    }

    /// Gives back a port reserved with [`Server::reserve_relay`] and never used by an
    /// allocation (its bind failed, or its data plane went away).
    pub fn release_relay(&mut self, addr: SocketAddr) {
        self.ports.release(&addr);
    }

    /// Chooses relay addresses for every family of `p` and marks them used.
    fn pick_relays(&mut self, p: &mut PendingAllocate) -> bool {
        let mut chosen = Vec::new();
        for f in p.families.clone() {
            let ip = p
                .relay_ips
                .iter()
                .filter(|ip| Family::of(ip) == f)
                .min_by_key(|ip| self.ports.used_on(ip))
                .copied();
            let Some(ip) = ip else {
                return false;
            };
            let (even, pair) = if chosen.is_empty() {
                (p.even, p.reserve_next)
            } else {
                (false, false)
            };
            let Some(port) = self.ports.pick(&mut self.rng, ip, even, pair) else {
                for a in &chosen {
                    self.ports.release(a);
                }
                return false;
            };
            let addr = SocketAddr::new(ip, port);
            self.ports.take(addr);
            chosen.push(addr);
        }
        p.relays = chosen;
        true
    }

    fn start_bind(&mut self, now: Millis, mut p: PendingAllocate, out: &mut Vec<Output>) {
        let id = self.next_bind;
        self.next_bind += 1;
        p.bind_deadline = now.plus_ms(BIND_TIMEOUT_MS);
        self.timers.insert((p.bind_deadline, Timer::Bind(id)));
        p.attempts += 1;
        out.push(Output::Bind(BindRequest {
            id,
            tuple: p.tuple,
            relays: p.relays.clone(),
        }));
        self.pending_by_tuple.insert(p.tuple, id);
        self.pending.insert(id, p);
    }

    /// The data plane's answer to [`Output::Bind`] `id`: `Ok` with the sockets bound, or
    /// `Err` (address in use, no permission...). A failed bind is retried on other ports,
    /// then answered with 508.
    pub fn handle_bind_result(
        &mut self,
        now: Millis,
        id: u64,
        result: Result<(), BindError>,
        out: &mut Vec<Output>,
    ) {
        let Some(mut p) = self.pending.remove(&id) else {
            return;
        };
        self.timers.remove(&(p.bind_deadline, Timer::Bind(id)));
        self.pending_by_tuple.remove(&p.tuple);
        if let Err(e) = &result {
            // Not silent: a relay IP that cannot be bound (not on the host, for one)
            // would otherwise show only as 508s at the clients.
            self.stats.bind_failures += 1;
            if self.sample(Refusal::Bind, now) {
                tracing::warn!(client = %p.tuple.client, relays = ?p.relays, attempt = p.attempts, error = %e, "relay bind failed (508 after the last attempt)");
            }
            for a in &p.relays {
                self.ports.release(a);
            }
            // A reserved port that cannot be bound is not retried elsewhere: the token
            // promised that very port.
            if p.token.is_none() && p.attempts < BIND_ATTEMPTS && self.pick_relays(&mut p) {
                self.start_bind(now, p, out);
            } else {
                self.fail_pending(&p, 508, out);
            }
            return;
        }
        self.finish_allocate(now, p, out);
    }

    fn fail_pending(&self, p: &PendingAllocate, code: u16, out: &mut Vec<Output>) {
        // This answer has never carried SOFTWARE.
        let tail = Tail {
            software: None,
            key: &p.auth.key,
        };
        let built = build_response(
            Method::ALLOCATE,
            Class::Error,
            p.tid,
            256,
            Some(tail),
            |w| w.add(&ErrorCode::standard(code)).map(|_| ()),
        );
        if let Ok(data) = built {
            out.push(Output::Transmit {
                tuple: p.tuple,
                data,
            });
        }
    }

    fn finish_allocate(&mut self, now: Millis, p: PendingAllocate, out: &mut Vec<Output>) {
        let id = AllocationId(self.next_id);
        self.next_id += 1;
        let expires = now.plus_secs(u64::from(p.lifetime));
        // EVEN-PORT with R: hold port + 1 behind a token.
        let mut token = None;
        if p.reserve_next
            && let Some(first) = p.relays.first()
        {
            let next = SocketAddr::new(first.ip(), first.port().wrapping_add(1));
            let mut t = [0u8; 8];
            self.rng.fill(&mut t);
            self.ports.take(next);
            let until = now.plus_secs(RESERVATION_SECS);
            self.reservations.insert(t, (next, until));
            self.timers.insert((until, Timer::Reservation(t)));
            token = Some(t);
        }
        // Build the response (kept for retransmissions of this Allocate).
        let built = build_response(
            Method::ALLOCATE,
            Class::Success,
            p.tid,
            512,
            Some(self.tail(&p.auth)),
            |w| {
                for r in &p.relays {
                    w.add(&XorRelayedAddress(advertised_addr(&p.advertised, *r)))?;
                }
                if p.v6_error {
                    w.add(&AddressErrorCode {
                        family: Family::V6,
                        code: 440,
                        reason: reason_phrase(440),
                    })?;
                }
                w.add(&Lifetime(p.lifetime))?;
                if let Some(t) = token {
                    w.add(&ReservationToken(t))?;
                }
                w.add(&XorMappedAddress(p.tuple.client))?;
                Ok(())
            },
        );
        let Ok(buf) = built else {
            for a in &p.relays {
                self.ports.release(a);
            }
            return;
        };
        *self.per_user.entry(p.auth.account.clone()).or_insert(0) += 1;
        self.by_tuple.insert(p.tuple, id);
        self.timers.insert((expires, Timer::Allocation(id)));
        out.push(Output::Table(TableChange::AllocationAdd {
            id,
            tuple: p.tuple,
            relays: p.relays.clone(),
            deadline: expires,
            bandwidth: self.cfg.bandwidth_limit,
            user: p.auth.account.clone(),
            username: p.auth.username.clone(),
            dont_fragment: p.dont_fragment,
        }));
        out.push(Output::Event(Event::Created {
            id,
            user: p.auth.account.clone(),
            tuple: p.tuple,
            relays: p.relays.clone(),
        }));
        out.push(Output::Transmit {
            tuple: p.tuple,
            data: buf.clone(),
        });
        self.allocations.insert(
            id,
            Allocation {
                tuple: p.tuple,
                username: p.auth.username,
                account: p.auth.account,
                relays: p.relays,
                expires,
                created_at: now,
                permissions: AHashMap::new(),
                channels: AHashMap::new(),
                peer_channel: AHashMap::new(),
                allocate_tid: Some(p.tid),
                allocate_response: buf,
            },
        );
    }

    // ----- Refresh ----------------------------------------------------------------------

    fn refresh(
        &mut self,
        now: Millis,
        tuple: FiveTuple,
        msg: &Message<'_>,
        auth: &Authed,
        out: &mut Vec<Output>,
    ) -> Result<(), Reject> {
        let id = *self.by_tuple.get(&tuple).ok_or(reject(437))?;
        let requested = msg.attr::<Lifetime>()?.map(|l| l.0);
        if let Some(RequestedAddressFamily(f)) = msg.attr::<RequestedAddressFamily>()? {
            let a = self.allocations.get(&id).ok_or(reject(437))?;
            if !a.relays.iter().any(|r| Family::of(&r.ip()) == f) {
                return Err(reject(443));
            }
        }
        let lifetime = match requested {
            Some(0) => 0,
            Some(l) => l.min(self.cfg.max_lifetime),
            None => self.cfg.default_lifetime,
        };
        if lifetime == 0 {
            self.remove_allocation(id, EndReason::Deleted, out);
        } else {
            let expires = now.plus_secs(u64::from(lifetime));
            let a = self.allocations.get_mut(&id).ok_or(reject(437))?;
            self.timers.remove(&(a.expires, Timer::Allocation(id)));
            a.expires = expires;
            self.timers.insert((expires, Timer::Allocation(id)));
            out.push(Output::Table(TableChange::AllocationRefresh {
                id,
                deadline: expires,
            }));
            out.push(Output::Event(Event::Refreshed {
                id,
                deadline: expires,
            }));
        }
        self.respond_success(tuple, msg, auth, out, |w| {
            w.add(&Lifetime(lifetime)).map(|_| ())
        });
        Ok(())
    }

    // ----- CreatePermission and ChannelBind ---------------------------------------------

    /// Checks one peer against the allocation's families (443) and the policy (403).
    fn check_peer(&self, a: &Allocation, peer: SocketAddr, with_port: bool) -> Result<(), Reject> {
        let canon = crate::policy::canonical_ip(peer.ip());
        let family_ok = a
            .relays
            .iter()
            .any(|r| r.is_ipv4() == peer.is_ipv4() || r.is_ipv4() == canon.is_ipv4());
        if !family_ok {
            return Err(reject(443));
        }
        let verdict = if with_port {
            self.cfg.policy.check(peer)
        } else {
            self.cfg.policy.check_ip(peer.ip())
        };
        if verdict == Verdict::Deny {
            return Err(Reject {
                note: Note::Policy(peer),
                ..reject(403)
            });
        }
        Ok(())
    }

    fn create_permission(
        &mut self,
        now: Millis,
        tuple: FiveTuple,
        msg: &Message<'_>,
        auth: &Authed,
        out: &mut Vec<Output>,
    ) -> Result<(), Reject> {
        let id = *self.by_tuple.get(&tuple).ok_or(reject(437))?;
        let a = self.allocations.get(&id).ok_or(reject(437))?;
        let mut peers = Vec::new();
        for p in msg.attrs::<XorPeerAddress>() {
            let p = p?.0;
            self.check_peer(a, p, false)?;
            peers.push(p.ip());
        }
        if peers.is_empty() {
            return Err(reject(400));
        }
        let new = peers
            .iter()
            .filter(|p| !a.permissions.contains_key(p))
            .count();
        if a.permissions.len() + new > self.cfg.max_permissions {
            return Err(reject(508));
        }
        let deadline = now.plus_secs(u64::from(self.cfg.permission_lifetime));
        for ip in peers {
            self.set_permission(id, ip, deadline, out);
        }
        self.respond_success(tuple, msg, auth, out, |_| Ok(()));
        Ok(())
    }

    fn set_permission(
        &mut self,
        id: AllocationId,
        ip: IpAddr,
        deadline: Millis,
        out: &mut Vec<Output>,
    ) {
        let Some(a) = self.allocations.get_mut(&id) else {
            return;
        };
        let old = a.permissions.insert(ip, deadline);
        if let Some(old) = old {
            self.timers.remove(&(old, Timer::Permission(id, ip)));
        } else {
            out.push(Output::Event(Event::PermissionAdded {
                id,
                peer: ip,
                deadline,
            }));
        }
        self.timers.insert((deadline, Timer::Permission(id, ip)));
        out.push(Output::Table(TableChange::PermissionSet {
            id,
            peer: ip,
            deadline,
        }));
    }

    fn channel_bind(
        &mut self,
        now: Millis,
        tuple: FiveTuple,
        msg: &Message<'_>,
        auth: &Authed,
        out: &mut Vec<Output>,
    ) -> Result<(), Reject> {
        let id = *self.by_tuple.get(&tuple).ok_or(reject(437))?;
        let channel = match msg.attr::<ChannelNumber>() {
            Ok(c) => c.ok_or(reject(400))?.0,
            Err(_) if self.cfg.legacy_channel_numbers => msg
                .raw(attr::AttrType(attr::CHANNEL_NUMBER))
                .and_then(attr::legacy_channel_number)
                .ok_or(reject(400))?,
            Err(_) => return Err(reject(400)),
        };
        let peer = msg.attr::<XorPeerAddress>()?.ok_or(reject(400))?.0;
        let a = self.allocations.get(&id).ok_or(reject(437))?;
        self.check_peer(a, peer, true)?;
        // A channel is bound to one peer and a peer to one channel (§11.2).
        if let Some((bound, _)) = a.channels.get(&channel)
            && *bound != peer
        {
            return Err(reject(400));
        }
        if let Some(c) = a.peer_channel.get(&peer)
            && *c != channel
        {
            return Err(reject(400));
        }
        let is_new = !a.channels.contains_key(&channel);
        if is_new && a.channels.len() >= self.cfg.max_channels {
            return Err(reject(508));
        }
        if !a.permissions.contains_key(&peer.ip())
            && a.permissions.len() >= self.cfg.max_permissions
        {
            return Err(reject(508));
        }
        let deadline = now.plus_secs(u64::from(self.cfg.channel_lifetime));
        let a = self.allocations.get_mut(&id).ok_or(reject(437))?;
        if let Some((_, old)) = a.channels.insert(channel, (peer, deadline)) {
            self.timers.remove(&(old, Timer::Channel(id, channel)));
        } else {
            out.push(Output::Event(Event::ChannelBound {
                id,
                channel,
                peer,
                deadline,
            }));
        }
        a.peer_channel.insert(peer, channel);
        self.timers.insert((deadline, Timer::Channel(id, channel)));
        let perm_deadline = now.plus_secs(u64::from(self.cfg.permission_lifetime));
        self.set_permission(id, peer.ip(), perm_deadline, out);
        out.push(Output::Table(TableChange::ChannelSet {
            id,
            channel,
            peer,
            deadline,
        }));
        self.respond_success(tuple, msg, auth, out, |_| Ok(()));
        Ok(())
    }

    // ----- expiry, removal, admin -------------------------------------------------------

    /// Expires everything whose deadline is at or before `now`.
    pub fn handle_timeout(&mut self, now: Millis, out: &mut Vec<Output>) {
        while let Some(&(at, timer)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            match timer {
                Timer::Allocation(id) => self.remove_allocation(id, EndReason::Expired, out),
                Timer::Permission(id, ip) => {
                    if let Some(a) = self.allocations.get_mut(&id) {
                        a.permissions.remove(&ip);
                        out.push(Output::Table(TableChange::PermissionRemove {
                            id,
                            peer: ip,
                        }));
                    }
                }
                Timer::Channel(id, channel) => {
                    if let Some(a) = self.allocations.get_mut(&id) {
                        if let Some((peer, _)) = a.channels.remove(&channel) {
                            a.peer_channel.remove(&peer);
                        }
                        out.push(Output::Table(TableChange::ChannelRemove { id, channel }));
                    }
                }
                Timer::Bind(id) => {
                    if let Some(p) = self.pending.remove(&id) {
                        self.pending_by_tuple.remove(&p.tuple);
                        for a in &p.relays {
                            self.ports.release(a);
                        }
                        self.fail_pending(&p, 508, out);
                    }
                }
                Timer::Reservation(t) => {
                    if let Some((addr, _)) = self.reservations.remove(&t) {
                        self.ports.release(&addr);
                    }
                }
            }
        }
        if now >= self.next_sweep {
            self.next_sweep = now.plus_ms(SWEEP_INTERVAL_MS);
            self.limiter.sweep(now);
            for (kind, log) in Refusal::ALL.iter().zip(self.refusal_logs.iter_mut()) {
                if let Some(n) = log.take_suppressed() {
                    tracing::warn!(
                        kind = kind.name(),
                        suppressed = n,
                        "{n} similar refusal log lines suppressed"
                    );
                }
            }
        }
    }

    fn remove_allocation(&mut self, id: AllocationId, reason: EndReason, out: &mut Vec<Output>) {
        let Some(a) = self.allocations.remove(&id) else {
            return;
        };
        self.timers.remove(&(a.expires, Timer::Allocation(id)));
        for (ip, t) in &a.permissions {
            self.timers.remove(&(*t, Timer::Permission(id, *ip)));
        }
        for (c, (_, t)) in &a.channels {
            self.timers.remove(&(*t, Timer::Channel(id, *c)));
        }
        for r in &a.relays {
            self.ports.release(r);
        }
        self.by_tuple.remove(&a.tuple);
        if let Some(n) = self.per_user.get_mut(&a.account) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_user.remove(&a.account);
            }
        }
        out.push(Output::Table(TableChange::AllocationRemove { id }));
        out.push(Output::Event(Event::Ended { id, reason }));
    }

    /// Revokes one allocation (admin). Returns whether it existed.
    pub fn revoke(&mut self, id: AllocationId, out: &mut Vec<Output>) -> bool {
        let existed = self.allocations.contains_key(&id);
        self.remove_allocation(id, EndReason::Revoked, out);
        existed
    }

    /// The client's TCP or TLS connection of allocation `id` closed: the allocation
    /// ends (RFC 8656 §3.1).
    pub fn connection_closed(&mut self, id: AllocationId, out: &mut Vec<Output>) {
        self.remove_allocation(id, EndReason::ConnectionClosed, out);
    }

    /// The allocations each user holds on the other instances of the fleet, replacing
    /// the previous counts: the per-user quota counts them with this server's own.
    pub fn set_fleet_user_counts(&mut self, counts: impl IntoIterator<Item = (String, u32)>) {
        self.fleet_users = counts.into_iter().collect();
    }

    /// The users holding at least `min` allocations here, with their counts, at most
    /// `limit` of them, the largest first (what this instance tells the fleet).
    pub fn heavy_users(&self, min: u32, limit: usize) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = self
            .per_user
            .iter()
            .filter(|(_, n)| **n >= min.max(1))
            .map(|(u, n)| (u.clone(), *n))
            .collect();
        v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(limit);
        v
    }

    /// Users refused from now on, whatever their credentials (username or accounting
    /// user), replacing the previous set; their allocations are revoked separately
    /// ([`Server::revoke_user`]).
    pub fn set_revoked_users(&mut self, users: impl IntoIterator<Item = String>) {
        self.revoked = users.into_iter().collect();
    }

    /// Revokes every allocation of a user (admin). Returns how many.
    pub fn revoke_user(&mut self, account: &str, out: &mut Vec<Output>) -> usize {
        let ids: Vec<_> = self
            .allocations
            .iter()
            .filter(|(_, a)| a.account == account || a.username == account)
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            self.remove_allocation(*id, EndReason::Revoked, out);
        }
        ids.len()
    }

    /// Rebuilds an allocation a data plane reported after a control-plane restart. Its
    /// ports are marked used and its timers armed; ids above it are not reused. An empty
    /// `username` is unknown (a data plane from before usernames were kept): then the
    /// first authenticated request of the same accounting user sets it.
    pub fn restore(&mut self, r: AllocationSnapshot) {
        if self.allocations.contains_key(&r.id) || self.by_tuple.contains_key(&r.tuple) {
            return;
        }
        self.next_id = self.next_id.max(r.id.0 + 1);
        for addr in &r.relays {
            self.ports.take(*addr);
        }
        let mut a = Allocation {
            tuple: r.tuple,
            username: r.username,
            account: r.user.clone(),
            relays: r.relays,
            expires: r.deadline,
            created_at: Millis(0),
            permissions: AHashMap::new(),
            channels: AHashMap::new(),
            peer_channel: AHashMap::new(),
            allocate_tid: None,
            allocate_response: Vec::new(),
        };
        self.timers.insert((r.deadline, Timer::Allocation(r.id)));
        for (ip, t) in r.permissions {
            a.permissions.insert(ip, t);
            self.timers.insert((t, Timer::Permission(r.id, ip)));
        }
        for (c, p, t) in r.channels {
            a.channels.insert(c, (p, t));
            a.peer_channel.insert(p, c);
            self.timers.insert((t, Timer::Channel(r.id, c)));
        }
        *self.per_user.entry(r.user).or_insert(0) += 1;
        self.by_tuple.insert(r.tuple, r.id);
        self.allocations.insert(r.id, a);
    }

    /// A fresh nonce for `client` (for tests and tools).
    pub fn mint_nonce(&self, now: Millis, client: &SocketAddr) -> String {
        self.nonces.mint(now, client)
    }

    /// The peer policy.
    pub fn policy(&self) -> &PeerPolicy {
        &self.cfg.policy
    }

    /// The realm.
    pub fn realm(&self) -> &str {
        self.creds.realm()
    }
}

/// What closes a response to an authenticated request.
struct Tail<'a> {
    /// SOFTWARE, when configured.
    software: Option<&'a str>,
    /// The key of the request's integrity attribute, for the same attribute here.
    key: &'a IntegrityKey,
}

/// Builds a response in a buffer of `capacity` bytes: the header, the attributes `fill`
/// adds, then with `tail` (an authenticated request) SOFTWARE and MESSAGE-INTEGRITY or
/// MESSAGE-INTEGRITY-SHA256, and FINGERPRINT. Every response the server writes is closed
/// here but two: Binding responses (`turn::write_binding_response`, shared with the data
/// plane) and the 400 to a request that does not parse, which has no FINGERPRINT.
fn build_response<F>(
    method: Method,
    class: Class,
    tid: TransactionId,
    capacity: usize,
    tail: Option<Tail<'_>>,
    fill: F,
) -> Result<Vec<u8>, EncodeError>
where
    F: FnOnce(&mut MessageWriter<'_>) -> Result<(), EncodeError>,
{
    let mut buf = vec![0u8; capacity];
    let mut w = MessageWriter::new(&mut buf, method, class, tid)?;
    fill(&mut w)?;
    if let Some(t) = tail {
        if let Some(s) = t.software {
            w.add(&attr::Software(s))?;
        }
        w.add_integrity_with(t.key)?;
    }
    w.add_fingerprint()?;
    let n = w.finish();
    buf.truncate(n);
    // Responses wait in queues (a flood's 401s by the ten thousand): keep each the size
    // of its message, not of the buffer it was written in.
    buf.shrink_to_fit();
    Ok(buf)
}
