//! A small client for etcd's v3 API: the fleet registry (keys under leases), configuration
//! watches, transactions, and the election of a control-plane leader.
//!
//! [`Etcd`] wraps the generated clients of [`turnpike_api::etcd`] over one
//! `tonic::transport::Channel`. Every unary call carries a timeout
//! ([`CALL_TIMEOUT`] unless [`Etcd::with_call_timeout`] says otherwise); the calls that
//! wait by design ([`Etcd::campaign`]) do not, and are abandoned by dropping their future.
//! Three things run as tasks of their own and report through channels:
//!
//! - [`Etcd::keep_alive`] renews a lease every third of its TTL; its [`KeepAlive`] handle
//!   says when the lease is lost (etcd no longer knows it, or no renewal was confirmed
//!   for a whole TTL). Dropping the handle stops the renewals.
//! - [`Etcd::watch_prefix`] streams [`WatchEvent`]s in revision order and, when the
//!   stream breaks (etcd restarted, connection lost), watches again from the revision
//!   after the last one delivered, so that no event is lost or repeated. If etcd has
//!   compacted that history away, the stream ends with [`WatchEvent::Compacted`]: read
//!   the prefix again ([`Etcd::get_prefix`]) and watch from its revision + 1.
//! - [`Etcd::observe`] streams the values proclaimed by an election's leaders.
//!
//! Keys are strings (turnpike's schema); a key that is not UTF-8, written by some other
//! tool, is read with its invalid bytes replaced (`String::from_utf8_lossy`).
//!
//! ```no_run
//! use turnpike_controlplane_runtime::etcd::{Etcd, WatchEvent};
//!
//! # async fn example() -> Result<(), turnpike_controlplane_runtime::etcd::EtcdError> {
//! let etcd = Etcd::connect(&["http://127.0.0.1:2379".to_string()]).await?;
//! // Register this node under a lease that lives while the process renews it.
//! let lease = etcd.lease_grant(10).await?;
//! etcd.put("/turnpike/nodes/a", b"192.0.2.1:3478", Some(lease)).await?;
//! let mut alive = etcd.keep_alive(lease).await?;
//! // Read the configuration, then follow its changes.
//! let config = etcd.get_prefix("/turnpike/config/").await?;
//! let mut changes = etcd.watch_prefix("/turnpike/config/", config.revision + 1).await?;
//! tokio::select! {
//!     loss = alive.lost() => println!("registration lost: {loss}"),
//!     Some(WatchEvent::Put { key, .. }) = changes.recv() => println!("{key} changed"),
//! }
//! # Ok(())
//! # }
//! ```

use std::error::Error as _;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status, Streaming};
use turnpike_api::etcd::etcdserverpb::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseRevokeRequest, LeaseTimeToLiveRequest, PutRequest, RangeRequest, RequestOp,
    ResponseHeader, TxnRequest, WatchCreateRequest, WatchRequest, WatchResponse, compare,
    kv_client::KvClient, lease_client::LeaseClient, request_op, watch_client::WatchClient,
    watch_request,
};
use turnpike_api::etcd::mvccpb::{self, event::EventType};
use turnpike_api::etcd::v3electionpb::{
    self as electionpb, CampaignRequest, LeaderRequest, ProclaimRequest, ResignRequest,
    election_client::ElectionClient,
};

/// How long connecting to one endpoint may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a unary call may take, unless [`Etcd::with_call_timeout`] says otherwise.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys read per request by [`Etcd::get_prefix`] (each page at the same revision).
const PAGE_KEYS: i64 = 512;
/// The largest response accepted: a page of [`PAGE_KEYS`] keys with large values.
const MAX_MESSAGE: usize = 64 << 20;
/// Events buffered between a watch task and its receiver.
const EVENT_BUFFER: usize = 256;
/// HTTP/2 pings on a connection with calls open, so that a watch on a dead connection
/// fails instead of waiting forever. etcd refuses pings more often than every 5 s
/// (`--grpc-keepalive-min-time`) and pings without calls open, hence not while idle.
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection counts as dead.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// The first and the longest wait before a broken stream is opened again.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// The shortest interval between two renewals of a lease.
const MIN_RENEW_INTERVAL: Duration = Duration::from_millis(200);

/// What can go wrong talking to etcd.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtcdError {
    /// [`Etcd::connect`] was given no endpoint.
    #[error("no etcd endpoint given")]
    NoEndpoints,
    /// An endpoint is not a valid URL.
    #[error("invalid etcd endpoint {url:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        url: String,
        /// Why it does not parse.
        reason: String,
    },
    /// No endpoint accepted a connection, or the connection in use broke.
    #[error("etcd unreachable at {endpoints}: {reason}")]
    Unreachable {
        /// The endpoints tried, comma-separated.
        endpoints: String,
        /// What failed, per endpoint.
        reason: String,
    },
    /// A call got no answer in time.
    #[error("etcd {call} at {endpoint} timed out after {after:?}")]
    Timeout {
        /// The call.
        call: &'static str,
        /// The endpoint in use.
        endpoint: String,
        /// The time allowed.
        after: Duration,
    },
    /// etcd refused or failed a call.
    #[error("etcd {call} failed: {message} ({code:?})")]
    Rpc {
        /// The call.
        call: &'static str,
        /// The gRPC status code.
        code: Code,
        /// etcd's message, such as `etcdserver: request is too large`.
        message: String,
    },
    /// The lease does not exist: it expired or was revoked.
    #[error("etcd lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// The leadership given is no longer held.
    #[error("not the leader of election {0:?} any more")]
    NotLeader(String),
    /// A response stream ended before answering.
    #[error("etcd {call} stream ended unexpectedly")]
    StreamEnded {
        /// The call.
        call: &'static str,
    },
    /// A response lacks a field etcd always sets.
    #[error("malformed etcd {call} response: no {missing}")]
    Malformed {
        /// The call.
        call: &'static str,
        /// The field missing.
        missing: &'static str,
    },
}

/// The ID of an etcd lease. It displays in hexadecimal, as `etcdctl` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// The keys and values under a prefix, as of one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The keys with their values, in key order.
    pub entries: Vec<(String, Vec<u8>)>,
    /// The store revision of the read: watch from `revision + 1` to follow the changes.
    pub revision: i64,
}

/// A change seen by [`Etcd::watch_prefix`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key was created or changed.
    Put {
        /// The key.
        key: String,
        /// Its new value.
        value: Vec<u8>,
        /// The revision of the change.
        revision: i64,
    },
    /// A key was deleted, or its lease expired or was revoked.
    Delete {
        /// The key.
        key: String,
        /// The revision of the deletion.
        revision: i64,
    },
    /// etcd no longer has the history the watch needs (it was compacted): events were
    /// missed, and this is the last item of the stream. Read the prefix again and watch
    /// from the revision after that read.
    Compacted {
        /// The oldest revision etcd still has.
        compact_revision: i64,
    },
}

/// Why a lease kept alive by a [`KeepAlive`] is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseLoss {
    /// etcd says the lease does not exist: it expired or was revoked, and the keys
    /// attached to it are gone.
    NotFound,
    /// No renewal was confirmed for a whole TTL (etcd unreachable): the lease may have
    /// expired, and nothing attached to it can be relied on any more.
    Unconfirmed,
}

impl fmt::Display for LeaseLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotFound => "the lease expired or was revoked",
            Self::Unconfirmed => "no renewal of the lease was confirmed for a whole TTL",
        })
    }
}

/// The state of a lease kept alive by a [`KeepAlive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// The last renewal was confirmed, with this TTL.
    Alive {
        /// The TTL granted by the last renewal.
        ttl: Duration,
    },
    /// The lease is lost; no more renewals are sent. This state is final.
    Lost(LeaseLoss),
}

/// The leadership of an election, won by [`Etcd::campaign`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    /// The election.
    pub name: String,
    /// The key that holds the leadership: leadership ends when it is deleted.
    pub key: Vec<u8>,
    /// The creation revision of `key`.
    pub rev: i64,
    /// The lease of the leadership.
    pub lease: LeaseId,
}

impl LeaderKey {
    fn to_proto(&self) -> electionpb::LeaderKey {
        electionpb::LeaderKey {
            name: self.name.clone().into_bytes(),
            key: self.key.clone(),
            rev: self.rev,
            lease: self.lease.0,
        }
    }
}

/// A connection to etcd. Cloning is cheap: the clones share the connection.
#[derive(Debug, Clone)]
pub struct Etcd {
    kv: KvClient<Channel>,
    watch: WatchClient<Channel>,
    lease: LeaseClient<Channel>,
    election: ElectionClient<Channel>,
    /// The endpoint in use, for messages.
    endpoint: String,
    call_timeout: Duration,
}

impl Etcd {
    /// Connects to the first of `urls` (such as `http://127.0.0.1:2379`) that accepts a
    /// connection within [`CONNECT_TIMEOUT`], trying them in order. The connection stays
    /// with that member and is re-established to it after a break; list every member so
    /// that a later `connect` finds one that is up.
    pub async fn connect(urls: &[String]) -> Result<Etcd, EtcdError> {
        if urls.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        let endpoints = urls
            .iter()
            .map(|url| endpoint(url).map(|e| (url, e)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut failures = Vec::new();
        for (url, endpoint) in endpoints {
            match timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
                Ok(Ok(channel)) => return Ok(Self::new(channel, url.clone())),
                Ok(Err(e)) => failures.push(format!("{url}: {}", error_chain(&e))),
                Err(_) => failures.push(format!("{url}: no answer within {CONNECT_TIMEOUT:?}")),
            }
        }
        Err(EtcdError::Unreachable {
            endpoints: urls.join(", "),
            reason: failures.join("; "),
        })
    }

    fn new(channel: Channel, endpoint: String) -> Self {
        Self {
            kv: KvClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE),
            watch: WatchClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE),
            lease: LeaseClient::new(channel.clone()),
            election: ElectionClient::new(channel).max_decoding_message_size(MAX_MESSAGE),
            endpoint,
            call_timeout: CALL_TIMEOUT,
        }
    }

    /// Sets how long each unary call may take (default [`CALL_TIMEOUT`]).
    pub fn with_call_timeout(mut self, call_timeout: Duration) -> Self {
        self.call_timeout = call_timeout;
        self
    }

    /// The endpoint connected to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The value of `key` and the revision of its last change, or `None` if there is no
    /// such key.
    pub async fn get(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, EtcdError> {
        let request = RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        let response = self
            .unary("range", None, self.kv.clone().range(self.request(request)))
            .await?;
        Ok(response
            .kvs
            .into_iter()
            .next()
            .map(|kv| (kv.value, kv.mod_revision)))
    }

    /// Every key under `prefix` with its value, in key order, read at one revision
    /// (a page of keys at a time).
    pub async fn get_prefix(&self, prefix: &str) -> Result<Listing, EtcdError> {
        let (mut key, range_end) = prefix_range(prefix.as_bytes());
        let mut listing = Listing::default();
        loop {
            let request = RangeRequest {
                key: key.clone(),
                range_end: range_end.clone(),
                limit: PAGE_KEYS,
                // The first page fixes the revision for the others.
                revision: listing.revision,
                ..Default::default()
            };
            let response = self
                .unary("range", None, self.kv.clone().range(self.request(request)))
                .await?;
            if listing.revision == 0 {
                listing.revision = header_revision("range", response.header.as_ref())?;
            }
            let next = response.kvs.last().map(|kv| {
                // The smallest key after the last one read.
                let mut next = kv.key.clone();
                next.push(0);
                next
            });
            listing.entries.extend(
                response
                    .kvs
                    .into_iter()
                    .map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), kv.value)),
            );
            match next {
                Some(next) if response.more => key = next,
                _ => return Ok(listing),
            }
        }
    }

    /// Sets `key` to `value`, attached to `lease` if given (the key is deleted when the
    /// lease ends). Returns the revision of the change.
    pub async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<i64, EtcdError> {
        let request = PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.to_vec(),
            lease: lease.map_or(0, |l| l.0),
            ..Default::default()
        };
        let response = self
            .unary("put", lease, self.kv.clone().put(self.request(request)))
            .await?;
        header_revision("put", response.header.as_ref())
    }

    /// Sets `key` to `value` (attached to `lease` if given) only if the key does not
    /// exist, in one transaction. Returns whether it was set: of several callers racing,
    /// exactly one gets `true`.
    pub async fn put_if_absent(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<bool, EtcdError> {
        let key = key.as_bytes().to_vec();
        let request = TxnRequest {
            // A key that does not exist has creation revision 0.
            compare: vec![Compare {
                result: compare::CompareResult::Equal.into(),
                target: compare::CompareTarget::Create.into(),
                key: key.clone(),
                target_union: Some(compare::TargetUnion::CreateRevision(0)),
                range_end: Vec::new(),
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key,
                    value: value.to_vec(),
                    lease: lease.map_or(0, |l| l.0),
                    ..Default::default()
                })),
            }],
            failure: Vec::new(),
        };
        let response = self
            .unary("txn", lease, self.kv.clone().txn(self.request(request)))
            .await?;
        Ok(response.succeeded)
    }

    /// Deletes `key`. Returns whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, EtcdError> {
        let request = DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        let response = self
            .unary(
                "delete",
                None,
                self.kv.clone().delete_range(self.request(request)),
            )
            .await?;
        Ok(response.deleted > 0)
    }

    /// Deletes every key under `prefix`, in one revision. Returns how many there were.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<u64, EtcdError> {
        let (key, range_end) = prefix_range(prefix.as_bytes());
        let request = DeleteRangeRequest {
            key,
            range_end,
            ..Default::default()
        };
        let response = self
            .unary(
                "delete",
                None,
                self.kv.clone().delete_range(self.request(request)),
            )
            .await?;
        Ok(u64::try_from(response.deleted).unwrap_or(0))
    }

    /// Creates a lease of `ttl_secs` seconds (etcd may raise a very short TTL to its
    /// minimum). It ends when not renewed in time ([`Etcd::keep_alive`]) or when revoked.
    pub async fn lease_grant(&self, ttl_secs: i64) -> Result<LeaseId, EtcdError> {
        let request = LeaseGrantRequest {
            ttl: ttl_secs,
            id: 0,
        };
        let response = self
            .unary(
                "lease grant",
                None,
                self.lease.clone().lease_grant(self.request(request)),
            )
            .await?;
        if !response.error.is_empty() {
            return Err(EtcdError::Rpc {
                call: "lease grant",
                code: Code::Unknown,
                message: response.error,
            });
        }
        Ok(LeaseId(response.id))
    }

    /// Revokes a lease: the keys attached to it are deleted now.
    pub async fn lease_revoke(&self, id: LeaseId) -> Result<(), EtcdError> {
        let request = LeaseRevokeRequest { id: id.0 };
        self.unary(
            "lease revoke",
            Some(id),
            self.lease.clone().lease_revoke(self.request(request)),
        )
        .await?;
        Ok(())
    }

    /// The remaining time to live of a lease, or `None` if it does not exist (expired or
    /// revoked). etcd counts in whole seconds: the lease ends in under TTL + 1 s.
    pub async fn lease_time_to_live(&self, id: LeaseId) -> Result<Option<Duration>, EtcdError> {
        let request = LeaseTimeToLiveRequest {
            id: id.0,
            keys: false,
        };
        let response = self
            .unary(
                "lease time-to-live",
                None,
                self.lease.clone().lease_time_to_live(self.request(request)),
            )
            .await?;
        Ok(u64::try_from(response.ttl).ok().map(Duration::from_secs))
    }

    /// Renews the lease now, then every third of its TTL from a task, until the returned
    /// handle is dropped or the lease is lost (see [`KeepAlive`]). Fails with
    /// [`EtcdError::LeaseNotFound`] if the lease does not exist.
    pub async fn keep_alive(&self, id: LeaseId) -> Result<KeepAlive, EtcdError> {
        let mut renewer = Renewer {
            client: self.lease.clone(),
            id,
            call_timeout: self.call_timeout,
            endpoint: self.endpoint.clone(),
        };
        let sent = Instant::now();
        let (stream, ttl) = renewer.open(self.call_timeout).await?;
        let Some(ttl) = ttl else {
            return Err(EtcdError::LeaseNotFound(id));
        };
        let (state_tx, state) = watch::channel(LeaseState::Alive { ttl });
        let task = tokio::spawn(renewer.run(stream, sent, ttl, state_tx));
        Ok(KeepAlive { id, state, task })
    }

    /// Streams the changes to the keys under `prefix` from `start_revision` on (0 for
    /// "from now"), in revision order. The watch is in place when this returns.
    ///
    /// The stream survives etcd restarts and broken connections: it is opened again
    /// from the revision after the last event delivered. It ends when the receiver is
    /// dropped, or after a [`WatchEvent::Compacted`].
    pub async fn watch_prefix(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<mpsc::Receiver<WatchEvent>, EtcdError> {
        let (key, range_end) = prefix_range(prefix.as_bytes());
        let next_revision = if start_revision > 0 {
            start_revision
        } else {
            // "Now", made explicit so that a watch opened again starts from the same
            // point.
            let request = RangeRequest {
                key: key.clone(),
                limit: 1,
                keys_only: true,
                ..Default::default()
            };
            let response = self
                .unary("range", None, self.kv.clone().range(self.request(request)))
                .await?;
            header_revision("range", response.header.as_ref())? + 1
        };
        let mut watcher = Watcher {
            client: self.watch.clone(),
            key,
            range_end,
            next_revision,
            call_timeout: self.call_timeout,
            endpoint: self.endpoint.clone(),
        };
        let stream = watcher.open().await?;
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        tokio::spawn(watcher.run(stream, tx));
        Ok(rx)
    }

    /// Campaigns in election `name` with `lease`, and waits until elected: then `value`
    /// is the election's proclamation. The leadership ends with [`Etcd::resign`], or when
    /// the lease ends (keep it alive while leading). A campaign is abandoned by dropping
    /// this future. Each campaigner needs a lease of its own: campaigns under one lease
    /// are one candidacy.
    pub async fn campaign(
        &self,
        name: &str,
        value: &[u8],
        lease: LeaseId,
    ) -> Result<LeaderKey, EtcdError> {
        let request = CampaignRequest {
            name: name.as_bytes().to_vec(),
            lease: lease.0,
            value: value.to_vec(),
        };
        let response = self
            .election
            .clone()
            .campaign(request)
            .await
            .map_err(|status| self.status_error("campaign", Some(lease), status))?
            .into_inner();
        let leader = response.leader.ok_or(EtcdError::Malformed {
            call: "campaign",
            missing: "leader",
        })?;
        Ok(LeaderKey {
            name: String::from_utf8_lossy(&leader.name).into_owned(),
            key: leader.key,
            rev: leader.rev,
            lease: LeaseId(leader.lease),
        })
    }

    /// Replaces the value proclaimed by the leader. Fails with [`EtcdError::NotLeader`]
    /// if the leadership is lost.
    pub async fn proclaim(&self, leader: &LeaderKey, value: &[u8]) -> Result<(), EtcdError> {
        let request = ProclaimRequest {
            leader: Some(leader.to_proto()),
            value: value.to_vec(),
        };
        self.unary(
            "proclaim",
            None,
            self.election.clone().proclaim(self.request(request)),
        )
        .await
        .map_err(|e| not_leader(e, &leader.name))?;
        Ok(())
    }

    /// The value proclaimed by the leader of election `name`, or `None` if it has no
    /// leader.
    pub async fn leader(&self, name: &str) -> Result<Option<Vec<u8>>, EtcdError> {
        let request = LeaderRequest {
            name: name.as_bytes().to_vec(),
        };
        match self
            .unary(
                "leader",
                None,
                self.election.clone().leader(self.request(request)),
            )
            .await
        {
            Ok(response) => Ok(response.kv.map(|kv| kv.value)),
            Err(EtcdError::Rpc { message, .. }) if message.contains(NO_LEADER) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Streams the values proclaimed by the leaders of election `name`: the current
    /// leader's first (as soon as there is one), then each new leader's and each new
    /// proclamation. A broken stream is opened again without repeating a value already
    /// delivered. It ends when the receiver is dropped.
    pub fn observe(&self, name: &str) -> mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let observer = Observer {
            client: self.election.clone(),
            name: name.as_bytes().to_vec(),
        };
        tokio::spawn(observer.run(tx));
        rx
    }

    /// Gives up a leadership, so that the next campaigner is elected. Resigning a
    /// leadership already lost does nothing.
    pub async fn resign(&self, leader: &LeaderKey) -> Result<(), EtcdError> {
        let request = ResignRequest {
            leader: Some(leader.to_proto()),
        };
        self.unary(
            "resign",
            None,
            self.election.clone().resign(self.request(request)),
        )
        .await
        .map_err(|e| not_leader(e, &leader.name))?;
        Ok(())
    }

    /// A request that etcd gives up on when the caller does.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.call_timeout);
        request
    }

    /// Awaits a unary call within the call timeout. `lease` is the lease the call names,
    /// for [`EtcdError::LeaseNotFound`].
    async fn unary<T>(
        &self,
        call: &'static str,
        lease: Option<LeaseId>,
        response: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, EtcdError> {
        match timeout(self.call_timeout, response).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(self.status_error(call, lease, status)),
            Err(_) => Err(EtcdError::Timeout {
                call,
                endpoint: self.endpoint.clone(),
                after: self.call_timeout,
            }),
        }
    }

    fn status_error(
        &self,
        call: &'static str,
        lease: Option<LeaseId>,
        status: Status,
    ) -> EtcdError {
        status_error(call, &self.endpoint, lease, status)
    }
}

/// The message of etcd's election service when an election has no leader.
const NO_LEADER: &str = "election: no leader";
/// The message of etcd's election service when a leadership is not held.
const NOT_LEADER: &str = "election: not leader";
/// The message of etcd when a lease does not exist.
const LEASE_NOT_FOUND: &str = "requested lease not found";

/// The endpoint for `url`, with the timeouts and pings of every connection.
fn endpoint(url: &str) -> Result<Endpoint, EtcdError> {
    let endpoint =
        Endpoint::from_shared(url.to_string()).map_err(|e| EtcdError::InvalidEndpoint {
            url: url.to_string(),
            reason: error_chain(&e),
        })?;
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(PING_INTERVAL)
        .keep_alive_timeout(PING_TIMEOUT))
}

/// The typed error for a failed call. A transport failure is [`EtcdError::Unreachable`]:
/// a status made on this side from an I/O, HTTP/2 or hyper error (it has a source; one
/// received from a server has none), or an UNAVAILABLE that etcd did not produce (its
/// own messages start with `etcdserver:` or `election:`).
fn status_error(
    call: &'static str,
    endpoint: &str,
    lease: Option<LeaseId>,
    status: Status,
) -> EtcdError {
    let message = status.message();
    if let Some(id) = lease
        && message.contains(LEASE_NOT_FOUND)
    {
        return EtcdError::LeaseNotFound(id);
    }
    let from_etcd = message.starts_with("etcdserver:") || message.starts_with("election:");
    let local = status.source().is_some();
    if local || (status.code() == Code::Unavailable && !from_etcd) {
        let mut reason = message.to_string();
        if let Some(source) = status.source() {
            reason = format!("{reason}: {}", error_chain(source));
        }
        return EtcdError::Unreachable {
            endpoints: endpoint.to_string(),
            reason,
        };
    }
    EtcdError::Rpc {
        call,
        code: status.code(),
        message: message.to_string(),
    }
}

/// [`EtcdError::NotLeader`] for etcd's "not leader" answer.
fn not_leader(error: EtcdError, name: &str) -> EtcdError {
    match error {
        EtcdError::Rpc { message, .. } if message.contains(NOT_LEADER) => {
            EtcdError::NotLeader(name.to_string())
        }
        other => other,
    }
}

/// An error and its sources, as one line (tonic's transport errors say little at the top).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !line.contains(&text) {
            line = format!("{line}: {text}");
        }
        source = e.source();
    }
    line
}

fn header_revision(call: &'static str, header: Option<&ResponseHeader>) -> Result<i64, EtcdError> {
    header.map(|h| h.revision).ok_or(EtcdError::Malformed {
        call,
        missing: "header",
    })
}

/// The range `[key, range_end)` of the keys under `prefix`: `range_end` is the prefix
/// with its last byte below 0xff incremented (and what follows dropped). With no such
/// byte, or an empty prefix, the range extends to the end of the key space ("\0").
fn prefix_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if prefix.is_empty() {
        return (vec![0], vec![0]);
    }
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return (prefix.to_vec(), end);
        }
    }
    (prefix.to_vec(), vec![0])
}

/// Waits that double from [`BACKOFF_MIN`] up to [`BACKOFF_MAX`].
#[derive(Debug)]
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(BACKOFF_MIN)
    }

    fn next(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        wait
    }

    fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
}

/// A lease kept alive by a task ([`Etcd::keep_alive`]). Dropping the handle stops the
/// renewals; the lease then ends after its TTL (revoke it to end it now).
///
/// The lease is lost, and [`KeepAlive::lost`] returns, when etcd says it no longer
/// exists, or when no renewal was confirmed for a whole TTL: register again under a new
/// lease then.
#[derive(Debug)]
pub struct KeepAlive {
    id: LeaseId,
    state: watch::Receiver<LeaseState>,
    task: JoinHandle<()>,
}

impl KeepAlive {
    /// The lease kept alive.
    pub fn id(&self) -> LeaseId {
        self.id
    }

    /// The state after the last renewal.
    pub fn state(&self) -> LeaseState {
        *self.state.borrow()
    }

    /// Waits until the lease is lost, and says why.
    pub async fn lost(&mut self) -> LeaseLoss {
        let state = match self
            .state
            .wait_for(|s| matches!(s, LeaseState::Lost(_)))
            .await
        {
            Ok(state) => *state,
            // The task ended without saying: it cannot vouch for the lease any more.
            Err(_) => LeaseState::Lost(LeaseLoss::Unconfirmed),
        };
        match state {
            LeaseState::Lost(loss) => loss,
            LeaseState::Alive { .. } => LeaseLoss::Unconfirmed,
        }
    }

    /// A receiver of the state, for waiting on it elsewhere.
    pub fn subscribe(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The renewal stream of one lease: requests go into the sender.
struct RenewStream {
    requests: mpsc::Sender<LeaseKeepAliveRequest>,
    responses: Streaming<LeaseKeepAliveResponse>,
}

/// The task behind a [`KeepAlive`].
struct Renewer {
    client: LeaseClient<Channel>,
    id: LeaseId,
    call_timeout: Duration,
    endpoint: String,
}

impl Renewer {
    /// Opens a renewal stream and renews once on it, waiting at most `wait` in all:
    /// returns the stream and the new TTL, or `None` if the lease does not exist. (etcd
    /// answers the call only with its first response, hence the request queued first.)
    async fn open(&mut self, wait: Duration) -> Result<(RenewStream, Option<Duration>), EtcdError> {
        let (requests, rx) = mpsc::channel(1);
        // The channel has room for this one request.
        let _ = requests.try_send(LeaseKeepAliveRequest { id: self.id.0 });
        let opening = async {
            let mut responses = self
                .client
                .lease_keep_alive(ReceiverStream::new(rx))
                .await
                .map_err(|status| self.status_error(status))?
                .into_inner();
            let ttl = self.answer(&mut responses).await?;
            Ok((responses, ttl))
        };
        let (responses, ttl) = timeout(wait, opening)
            .await
            .unwrap_or_else(|_| Err(self.timeout(wait)))?;
        let stream = RenewStream {
            requests,
            responses,
        };
        Ok((stream, ttl))
    }

    /// Renews once on an open stream, waiting at most `wait` for the answer: the new
    /// TTL, or `None` if the lease does not exist.
    async fn renew(
        &self,
        stream: &mut RenewStream,
        wait: Duration,
    ) -> Result<Option<Duration>, EtcdError> {
        let exchange = async {
            stream
                .requests
                .send(LeaseKeepAliveRequest { id: self.id.0 })
                .await
                .map_err(|_| EtcdError::StreamEnded {
                    call: "lease keep-alive",
                })?;
            self.answer(&mut stream.responses).await
        };
        timeout(wait, exchange)
            .await
            .unwrap_or_else(|_| Err(self.timeout(wait)))
    }

    /// The next answer on the stream: the new TTL, or `None` if the lease does not
    /// exist (etcd answers TTL 0).
    async fn answer(
        &self,
        responses: &mut Streaming<LeaseKeepAliveResponse>,
    ) -> Result<Option<Duration>, EtcdError> {
        match responses.message().await {
            Ok(Some(response)) => Ok(u64::try_from(response.ttl)
                .ok()
                .filter(|&ttl| ttl > 0)
                .map(Duration::from_secs)),
            Ok(None) => Err(EtcdError::StreamEnded {
                call: "lease keep-alive",
            }),
            Err(status) => Err(self.status_error(status)),
        }
    }

    fn status_error(&self, status: Status) -> EtcdError {
        status_error("lease keep-alive", &self.endpoint, Some(self.id), status)
    }

    fn timeout(&self, after: Duration) -> EtcdError {
        EtcdError::Timeout {
            call: "lease keep-alive",
            endpoint: self.endpoint.clone(),
            after,
        }
    }

    /// Renews every third of the TTL. `confirmed` is when the last confirmed renewal
    /// was sent: etcd renewed the lease after that, so it lives at least until
    /// `confirmed + ttl`.
    async fn run(
        mut self,
        stream: RenewStream,
        mut confirmed: Instant,
        mut ttl: Duration,
        state: watch::Sender<LeaseState>,
    ) {
        let mut stream = Some(stream);
        let mut backoff = Backoff::new();
        sleep(renew_interval(ttl)).await;
        loop {
            let sent = Instant::now();
            let deadline = confirmed + ttl;
            if sent >= deadline {
                tracing::warn!(lease = %self.id, "etcd lease lost: no renewal confirmed within its TTL");
                state.send_replace(LeaseState::Lost(LeaseLoss::Unconfirmed));
                return;
            }
            let wait = self.call_timeout.min(deadline - sent);
            let renewed = match stream.as_mut() {
                Some(live) => self.renew(live, wait).await,
                None => match self.open(wait).await {
                    Ok((opened, renewed)) => {
                        stream = Some(opened);
                        Ok(renewed)
                    }
                    Err(e) => Err(e),
                },
            };
            match renewed {
                Ok(Some(renewed)) => {
                    confirmed = sent;
                    ttl = renewed;
                    backoff.reset();
                    state.send_replace(LeaseState::Alive { ttl });
                    sleep(renew_interval(ttl)).await;
                }
                Ok(None) | Err(EtcdError::LeaseNotFound(_)) => {
                    tracing::warn!(lease = %self.id, "etcd lease lost: it expired or was revoked");
                    state.send_replace(LeaseState::Lost(LeaseLoss::NotFound));
                    return;
                }
                Err(e) => {
                    tracing::debug!(lease = %self.id, error = %e, "etcd lease renewal failed");
                    stream = None;
                    let left = deadline.saturating_duration_since(Instant::now());
                    sleep(backoff.next().min(left)).await;
                }
            }
        }
    }
}

fn renew_interval(ttl: Duration) -> Duration {
    (ttl / 3).max(MIN_RENEW_INTERVAL)
}

/// An open watch stream: requests (only the creation) go into the sender, which is kept
/// so that the stream stays open.
struct WatchStream {
    _requests: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
}

/// The task behind [`Etcd::watch_prefix`].
struct Watcher {
    client: WatchClient<Channel>,
    key: Vec<u8>,
    range_end: Vec<u8>,
    /// The revision to watch from: the one after the last delivered.
    next_revision: i64,
    call_timeout: Duration,
    endpoint: String,
}

impl Watcher {
    /// Opens a stream and creates the watch from `next_revision`.
    async fn open(&mut self) -> Result<WatchStream, EtcdError> {
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: self.key.clone(),
                    range_end: self.range_end.clone(),
                    start_revision: self.next_revision,
                    // Progress responses move `next_revision` on while nothing changes,
                    // so that a watch opened again does not ask for compacted history.
                    progress_notify: true,
                    ..Default::default()
                },
            )),
        };
        let (requests, rx) = mpsc::channel(1);
        // The channel has room for this one request.
        let _ = requests.try_send(create);
        let mut request = Request::new(ReceiverStream::new(rx));
        // etcd cancels the watch if its member loses the raft leader (as etcd's own
        // client asks), instead of leaving it silent on a partitioned member.
        request.metadata_mut().insert(
            "hasleader",
            tonic::metadata::MetadataValue::from_static("true"),
        );
        let opening = async {
            let mut responses = self
                .client
                .watch(request)
                .await
                .map_err(|s| status_error("watch", &self.endpoint, None, s))?
                .into_inner();
            match responses.message().await {
                Ok(Some(response)) if response.created && !response.canceled => Ok(responses),
                Ok(Some(response)) => Err(EtcdError::Rpc {
                    call: "watch",
                    code: Code::Unknown,
                    message: format!("watch not created: {}", response.cancel_reason),
                }),
                Ok(None) => Err(EtcdError::StreamEnded { call: "watch" }),
                Err(status) => Err(status_error("watch", &self.endpoint, None, status)),
            }
        };
        let responses = timeout(self.call_timeout, opening)
            .await
            .unwrap_or_else(|_| {
                Err(EtcdError::Timeout {
                    call: "watch",
                    endpoint: self.endpoint.clone(),
                    after: self.call_timeout,
                })
            })?;
        Ok(WatchStream {
            _requests: requests,
            responses,
        })
    }

    async fn run(mut self, stream: WatchStream, events: mpsc::Sender<WatchEvent>) {
        let mut stream = Some(stream);
        let mut backoff = Backoff::new();
        loop {
            let live = match stream.as_mut() {
                Some(live) => live,
                None => {
                    let opened = tokio::select! {
                        () = events.closed() => return,
                        opened = self.open() => opened,
                    };
                    match opened {
                        Ok(opened) => {
                            tracing::info!(from = self.next_revision, "etcd watch resumed");
                            backoff.reset();
                            stream.insert(opened)
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "etcd watch not resumed yet");
                            tokio::select! {
                                () = events.closed() => return,
                                () = sleep(backoff.next()) => continue,
                            }
                        }
                    }
                }
            };
            let message = tokio::select! {
                () = events.closed() => return,
                message = live.responses.message() => message,
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) | Err(_) => {
                    if let Err(status) = message {
                        tracing::warn!(error = %status, "etcd watch stream broken; resuming");
                    }
                    stream = None;
                    continue;
                }
            };
            if response.compact_revision > 0 {
                tracing::warn!(
                    wanted = self.next_revision,
                    compact_revision = response.compact_revision,
                    "etcd watch history compacted"
                );
                let _ = events
                    .send(WatchEvent::Compacted {
                        compact_revision: response.compact_revision,
                    })
                    .await;
                return;
            }
            if response.canceled {
                tracing::warn!(reason = %response.cancel_reason, "etcd watch canceled; resuming");
                stream = None;
                tokio::select! {
                    () = events.closed() => return,
                    () = sleep(backoff.next()) => continue,
                }
            }
            if response.events.is_empty() {
                // A progress response: every event up to its revision has been sent.
                if let Some(header) = &response.header {
                    self.next_revision = self.next_revision.max(header.revision + 1);
                }
                continue;
            }
            for event in response.events {
                let Some(event) = watch_event(event) else {
                    continue;
                };
                if let WatchEvent::Put { revision, .. } | WatchEvent::Delete { revision, .. } =
                    event
                {
                    self.next_revision = self.next_revision.max(revision + 1);
                }
                if events.send(event).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The [`WatchEvent`] of an etcd event (`None` for a kind this code does not know).
fn watch_event(event: mvccpb::Event) -> Option<WatchEvent> {
    let kv = event.kv?;
    let key = String::from_utf8_lossy(&kv.key).into_owned();
    match EventType::try_from(event.r#type) {
        Ok(EventType::Put) => Some(WatchEvent::Put {
            key,
            value: kv.value,
            revision: kv.mod_revision,
        }),
        Ok(EventType::Delete) => Some(WatchEvent::Delete {
            key,
            revision: kv.mod_revision,
        }),
        Err(_) => {
            tracing::warn!(
                kind = event.r#type,
                "etcd watch event of an unknown kind ignored"
            );
            None
        }
    }
}

/// The task behind [`Etcd::observe`].
struct Observer {
    client: ElectionClient<Channel>,
    name: Vec<u8>,
}

impl Observer {
    async fn run(mut self, values: mpsc::Sender<Vec<u8>>) {
        // The last proclamation delivered (its key and revision), not delivered again
        // when a new stream starts with it.
        let mut last: Option<(Vec<u8>, i64)> = None;
        let mut backoff = Backoff::new();
        loop {
            let request = LeaderRequest {
                name: self.name.clone(),
            };
            // No timeout: etcd answers only once the election has a leader. A dead
            // connection is found by the HTTP/2 pings.
            let opened = tokio::select! {
                () = values.closed() => return,
                opened = self.client.observe(request) => opened,
            };
            let mut responses = match opened {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    tracing::debug!(error = %status, "etcd observe not (re)opened yet");
                    tokio::select! {
                        () = values.closed() => return,
                        () = sleep(backoff.next()) => continue,
                    }
                }
            };
            loop {
                let message = tokio::select! {
                    () = values.closed() => return,
                    message = responses.message() => message,
                };
                match message {
                    Ok(Some(response)) => {
                        backoff.reset();
                        let Some(kv) = response.kv else { continue };
                        let seen = (kv.key, kv.mod_revision);
                        if last.as_ref() == Some(&seen) {
                            continue;
                        }
                        last = Some(seen);
                        if values.send(kv.value).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) | Err(_) => {
                        tracing::debug!("etcd observe stream ended; resuming");
                        break;
                    }
                }
            }
            tokio::select! {
                () = values.closed() => return,
                () = sleep(backoff.next()) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges() {
        assert_eq!(prefix_range(b"/a/"), (b"/a/".to_vec(), b"/a0".to_vec()));
        assert_eq!(prefix_range(b"a\xff"), (b"a\xff".to_vec(), b"b".to_vec()));
        assert_eq!(prefix_range(b"\xff\xff"), (b"\xff\xff".to_vec(), vec![0]));
        assert_eq!(prefix_range(b""), (vec![0], vec![0]));
    }

    #[test]
    fn lease_ids_display_in_hex() {
        assert_eq!(
            LeaseId(0x694d_7f3a_0c1b_2d05).to_string(),
            "694d7f3a0c1b2d05"
        );
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut backoff = Backoff::new();
        let waits: Vec<_> = (0..7).map(|_| backoff.next()).collect();
        assert_eq!(waits[0], BACKOFF_MIN);
        assert_eq!(waits[1], BACKOFF_MIN * 2);
        assert_eq!(waits[6], BACKOFF_MAX);
        backoff.reset();
        assert_eq!(backoff.next(), BACKOFF_MIN);
    }

    #[test]
    fn etcd_errors_are_typed() {
        let lease = status_error(
            "put",
            "http://e",
            Some(LeaseId(1)),
            Status::not_found("etcdserver: requested lease not found"),
        );
        assert_eq!(lease, EtcdError::LeaseNotFound(LeaseId(1)));
        let down = status_error(
            "put",
            "http://e",
            None,
            Status::unavailable("tcp connect error"),
        );
        assert!(matches!(down, EtcdError::Unreachable { .. }));
        assert!(down.to_string().starts_with("etcd unreachable at http://e"));
        let no_leader = status_error(
            "put",
            "http://e",
            None,
            Status::unavailable("etcdserver: no leader"),
        );
        assert!(matches!(
            no_leader,
            EtcdError::Rpc {
                code: Code::Unavailable,
                ..
            }
        ));
        // A connection reset surfaces as an UNKNOWN status made here, with its cause.
        let reset = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )));
        let reset = status_error("get", "http://e", None, reset);
        assert!(matches!(reset, EtcdError::Unreachable { .. }), "{reset:?}");
    }
}
