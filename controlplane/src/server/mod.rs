//! The TURN server as a sans-IO state machine.
//!
//! Call order: feed every STUN request the data plane punts with [`Server::handle`];
//! answer each [`Output::Bind`](crate::types::Output::Bind) with
//! [`Server::handle_bind_result`]; call [`Server::handle_timeout`] when
//! [`Server::poll_timeout`] says so. Each entry point
//! takes `now` and appends what must happen to the caller's `Vec<Output>`: datagrams to
//! send, relay-table changes for the data plane, relay sockets to bind, and lifecycle
//! events. Nothing here reads a clock or touches a socket.
//!
//! The module tree follows the concerns of a request: `dispatch` (entry points,
//! method routing, the rate limit of unauthenticated answers), `auth` (credentials,
//! nonces, integrity; 401, 438, 441), `allocate` (Allocate, Refresh, relay ports, quotas,
//! binds), `peers` (CreatePermission, ChannelBind and the peer checks), `timers` (expiry
//! and removal), `admin` (revocation, counters, restore, queries), with `response`
//! (writing answers) and `refusal` (error outcomes, counted and logged) shared by them.
//! What a request carries (its time, 5-tuple, message, credentials, data plane) is passed
//! down as arguments; the `Server` holds only state that outlives a call.

mod admin;
mod allocate;
mod auth;
mod config;
mod dispatch;
mod peers;
mod refusal;
mod response;
mod timers;

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};

use ahash::AHashMap;
use rand::SeedableRng;
use rand::rngs::StdRng;
use turnpike_plane::limit::{Limits, Rate, RefusalLog, TwoLevelLimiter};
use turnpike_proto::stun::TransactionId;

use crate::auth::{Credentials, NonceKey};
use crate::ports::Ports;
use crate::types::{AllocationId, FiveTuple, Millis};

pub use admin::{AllocationInfo, Stats};
pub use config::ServerConfig;
pub use dispatch::Via;
// The table lives in proto, next to ERROR-CODE; the control plane still exports it.
pub use turnpike_proto::reason::reason_phrase;

use allocate::PendingAllocate;
use refusal::{REFUSAL_LOGS_PER_SEC, Refusal};
use timers::Timer;

/// Sources tracked per rate-limiter level (a bound on memory: a few MB).
const RATE_LIMIT_SOURCES: usize = 65_536;

/// A live allocation.
#[derive(Debug, Clone)]
struct Allocation {
    tuple: FiveTuple,
    username: String,
    account: String,
    relays: Vec<SocketAddr>,
    expires: Millis,
    created_at: Millis,
    /// DONT-FRAGMENT was asked (handed to a data plane again with the allocation).
    dont_fragment: bool,
    permissions: AHashMap<IpAddr, Millis>,
    channels: AHashMap<u16, (SocketAddr, Millis)>,
    peer_channel: AHashMap<SocketAddr, u16>,
    /// The Allocate transaction and its success response, for retransmissions.
    allocate_tid: Option<TransactionId>,
    allocate_response: Vec<u8>,
}

/// The TURN server state machine. See the module docs for the call order.
#[derive(Debug)]
pub struct Server {
    cfg: ServerConfig,
    /// The wall clock minus the plane's clock, milliseconds (see [`Server::set_wall`]).
    wall_offset: i64,
    creds: Credentials,
    nonces: NonceKey,
    limiter: TwoLevelLimiter,
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
    /// Users refused whatever their credentials (revoked fleet-wide).
    revoked: HashSet<String>,
    /// When the rate limiter is next swept and refusal summaries written.
    next_sweep: Millis,
    /// One sampler per [`Refusal`] kind.
    refusal_logs: [RefusalLog; Refusal::COUNT],
    /// Users whose first 486 has been logged (at most [`QUOTA_LOGGED_USERS`]; emptied
    /// when full, so that each is logged again once).
    quota_logged: HashSet<String>,
}

impl Server {
    /// A server. `nonce_secret` keys the stateless nonces (use fresh random bytes; all
    /// control planes of a cluster may share one so nonces survive a failover); `seed`
    /// seeds the port choice and reservation tokens.
    pub fn new(cfg: ServerConfig, creds: Credentials, nonce_secret: [u8; 32], seed: u64) -> Server {
        let nonces = NonceKey::new(nonce_secret, u64::from(cfg.nonce_lifetime));
        let limiter = TwoLevelLimiter::new(Limits {
            source: Rate::new(cfg.unauth_rate, cfg.unauth_burst),
            ip: Rate::new(cfg.unauth_ip_rate, cfg.unauth_ip_burst),
            max_sources: RATE_LIMIT_SOURCES,
            // Room is made by the sweep of `handle_timeout`, once a second: admission
            // never walks the table.
            sweep_when_full: None,
        });
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
            revoked: HashSet::new(),
            next_sweep: Millis(0),
            refusal_logs: std::array::from_fn(|_| RefusalLog::new(REFUSAL_LOGS_PER_SEC)),
            quota_logged: HashSet::new(),
        }
    }
}
