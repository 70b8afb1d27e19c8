//! A sans-IO TURN client (RFC 8656 §7-§12) with long-term credentials: the state machine
//! that tests, the load generator and the benchmark harness drive against any TURN
//! server.
//!
//! Call order: start a transaction ([`Client::allocate`], [`Client::refresh`],
//! [`Client::create_permission`], [`Client::channel_bind`]) and send the datagram it
//! wrote; feed every datagram from the server to [`Client::handle`]; call
//! [`Client::handle_timeout`] when [`Client::poll_timeout`] says so, and send what it
//! writes. One request is outstanding at a time. A 401 or 438 is answered by resending
//! the request with credentials, which `handle` writes into its output buffer.
//!
//! Time is a caller-supplied millisecond count; the client reads no clock.

use std::net::SocketAddr;

use crate::attr::{
    self, ChannelNumber, Data, ErrorCode, EvenPort, Family, Lifetime, Nonce, PROTOCOL_UDP,
    PasswordAlgorithm, PasswordAlgorithmId, PasswordAlgorithms, Realm, RequestedAddressFamily,
    RequestedTransport, ReservationToken, Username, XorMappedAddress, XorPeerAddress,
    XorRelayedAddress,
};
use crate::auth;
use crate::channel::ChannelData;
use crate::error::{DecodeError, EncodeError};
use crate::stun::{Class, Message, MessageWriter, Method, TransactionId};

/// Initial retransmission timeout over UDP (RFC 8489 §6.2.1).
pub const RTO_MS: u64 = 500;
/// Requests sent before giving up (Rc).
pub const MAX_SENDS: u32 = 7;

/// What a completed transaction or an incoming datagram produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// The Allocate succeeded.
    Allocated {
        /// The relayed addresses (one per family).
        relayed: Vec<SocketAddr>,
        /// The client's reflexive address as the server saw it.
        mapped: Option<SocketAddr>,
        /// Granted lifetime in seconds.
        lifetime: u32,
        /// RESERVATION-TOKEN, when EVEN-PORT with the R bit was asked.
        reservation: Option<[u8; 8]>,
    },
    /// A Refresh succeeded with this lifetime (0: the allocation is gone).
    Refreshed {
        /// Granted lifetime in seconds.
        lifetime: u32,
    },
    /// A CreatePermission succeeded.
    PermissionCreated,
    /// A ChannelBind succeeded.
    ChannelBound {
        /// The bound channel.
        channel: u16,
    },
    /// The transaction failed with this error response.
    Failed {
        /// The method of the failed request.
        method: Method,
        /// The STUN error code.
        code: u16,
        /// The reason phrase.
        reason: String,
    },
    /// The transaction timed out.
    TimedOut {
        /// The method of the request that got no answer.
        method: Method,
    },
    /// Data from a peer, in a Data indication.
    Data {
        /// The peer.
        peer: SocketAddr,
        /// The payload, borrowed from the datagram.
        data: &'a [u8],
    },
    /// Data from a peer, on a channel.
    ChannelData {
        /// The channel.
        channel: u16,
        /// The payload, borrowed from the datagram.
        data: &'a [u8],
    },
    /// The server asked us to retry (401/438): a new request is in the output buffer.
    Retry,
    /// Nothing for the caller (a stray or duplicate datagram).
    None,
}

/// Options of an Allocate request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllocateOptions {
    /// LIFETIME to ask for.
    pub lifetime: Option<u32>,
    /// REQUESTED-ADDRESS-FAMILY.
    pub family: Option<Family>,
    /// EVEN-PORT, with the R bit if `Some(true)`.
    pub even_port: Option<bool>,
    /// RESERVATION-TOKEN from an earlier EVEN-PORT allocation.
    pub reservation: Option<[u8; 8]>,
    /// REQUESTED-TRANSPORT protocol number (default UDP).
    pub transport: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    Allocate(AllocateOptions),
    Refresh(u32),
    CreatePermission(Vec<SocketAddr>),
    ChannelBind(u16, SocketAddr),
}

impl Request {
    fn method(&self) -> Method {
        match self {
            Request::Allocate(_) => Method::ALLOCATE,
            Request::Refresh(_) => Method::REFRESH,
            Request::CreatePermission(_) => Method::CREATE_PERMISSION,
            Request::ChannelBind(..) => Method::CHANNEL_BIND,
        }
    }
}

#[derive(Debug, Clone)]
struct Pending {
    req: Request,
    tid: TransactionId,
    bytes: Vec<u8>,
    sends: u32,
    next_at: u64,
    rto: u64,
    retried_auth: bool,
}

/// The long-term credential state and the one outstanding transaction.
#[derive(Debug, Clone)]
pub struct Client {
    username: String,
    password: String,
    realm: Option<String>,
    nonce: Option<String>,
    key: Option<Vec<u8>>,
    algorithms: Option<Vec<u8>>,
    use_sha256: bool,
    pending: Option<Pending>,
    tid_seed: u64,
}

impl Client {
    /// A client for `username`/`password`. `tid_seed` makes transaction ids distinct
    /// across clients (and deterministic in tests).
    pub fn new(username: &str, password: &str, tid_seed: u64) -> Client {
        Client {
            username: username.to_owned(),
            password: password.to_owned(),
            realm: None,
            nonce: None,
            key: None,
            algorithms: None,
            use_sha256: false,
            pending: None,
            tid_seed,
        }
    }

    /// Use PASSWORD-ALGORITHM SHA-256 and MESSAGE-INTEGRITY-SHA256 when the server offers
    /// them (RFC 8489 §9.2); by default the client behaves like an RFC 5389 client.
    pub fn prefer_sha256(mut self, yes: bool) -> Client {
        self.use_sha256 = yes;
        self
    }

    /// Whether a transaction is outstanding.
    pub fn busy(&self) -> bool {
        self.pending.is_some()
    }

    /// The realm learnt from the server.
    pub fn realm(&self) -> Option<&str> {
        self.realm.as_deref()
    }

    /// The next transaction id (a counter mixed with the seed: distinct, not secret).
    fn next_tid(&mut self) -> TransactionId {
        self.tid_seed = self
            .tid_seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&self.tid_seed.to_be_bytes());
        t[8..].copy_from_slice(&(self.tid_seed >> 17).to_be_bytes()[4..]);
        TransactionId(t)
    }

    fn encode(&self, req: &Request, tid: TransactionId) -> Result<Vec<u8>, EncodeError> {
        let mut buf = vec![0u8; 1500];
        let mut w = MessageWriter::new(&mut buf, req.method(), Class::Request, tid)?;
        match req {
            Request::Allocate(o) => {
                w.add(&RequestedTransport(o.transport.unwrap_or(PROTOCOL_UDP)))?;
                if let Some(l) = o.lifetime {
                    w.add(&Lifetime(l))?;
                }
                if let Some(f) = o.family {
                    w.add(&RequestedAddressFamily(f))?;
                }
                if let Some(r) = o.even_port {
                    w.add(&EvenPort { reserve: r })?;
                }
                if let Some(t) = o.reservation {
                    w.add(&ReservationToken(t))?;
                }
            }
            Request::Refresh(l) => {
                w.add(&Lifetime(*l))?;
            }
            Request::CreatePermission(peers) => {
                for p in peers {
                    w.add(&XorPeerAddress(*p))?;
                }
            }
            Request::ChannelBind(c, p) => {
                w.add(&ChannelNumber(*c))?;
                w.add(&XorPeerAddress(*p))?;
            }
        }
        if let (Some(realm), Some(nonce), Some(key)) = (&self.realm, &self.nonce, &self.key) {
            w.add(&Username(&self.username))?;
            w.add(&Realm(realm))?;
            w.add(&Nonce(nonce))?;
            if let Some(algs) = &self.algorithms {
                w.add_raw(attr::AttrType(attr::PASSWORD_ALGORITHMS), algs)?;
                w.add(&PasswordAlgorithm {
                    algorithm: PasswordAlgorithmId::SHA256,
                    params: &[],
                })?;
                w.add_integrity_sha256(key)?;
            } else {
                w.add_integrity(key)?;
            }
        }
        w.add_fingerprint()?;
        let n = w.finish();
        buf.truncate(n);
        Ok(buf)
    }

    fn start(&mut self, now: u64, req: Request, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let tid = self.next_tid();
        let bytes = self.encode(&req, tid)?;
        out.clear();
        out.extend_from_slice(&bytes);
        self.pending = Some(Pending {
            req,
            tid,
            bytes,
            sends: 1,
            next_at: now + RTO_MS,
            rto: RTO_MS,
            retried_auth: false,
        });
        Ok(())
    }

    /// Starts an Allocate; the request is written to `out`.
    pub fn allocate(
        &mut self,
        now: u64,
        opts: AllocateOptions,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        self.start(now, Request::Allocate(opts), out)
    }

    /// Starts a Refresh asking for `lifetime` seconds (0 deletes the allocation).
    pub fn refresh(
        &mut self,
        now: u64,
        lifetime: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        self.start(now, Request::Refresh(lifetime), out)
    }

    /// Starts a CreatePermission for `peers`.
    pub fn create_permission(
        &mut self,
        now: u64,
        peers: &[SocketAddr],
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        self.start(now, Request::CreatePermission(peers.to_vec()), out)
    }

    /// Starts a ChannelBind of `channel` to `peer`.
    pub fn channel_bind(
        &mut self,
        now: u64,
        channel: u16,
        peer: SocketAddr,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        self.start(now, Request::ChannelBind(channel, peer), out)
    }

    /// Writes a Send indication carrying `data` to `peer`; returns its length.
    pub fn send_indication(
        &mut self,
        peer: SocketAddr,
        data: &[u8],
        out: &mut [u8],
    ) -> Result<usize, EncodeError> {
        let tid = self.next_tid();
        let mut w = MessageWriter::new(out, Method::SEND, Class::Indication, tid)?;
        w.add(&XorPeerAddress(peer))?;
        w.add(&Data(data))?;
        Ok(w.finish())
    }

    /// Writes a ChannelData frame (unpadded, for UDP); returns its length.
    pub fn channel_data(channel: u16, data: &[u8], out: &mut [u8]) -> Result<usize, EncodeError> {
        ChannelData {
            channel,
            payload: data,
        }
        .encode(out, false)
    }

    /// When [`Client::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.pending.as_ref().map(|p| p.next_at)
    }

    /// Retransmits or times out the outstanding request. Writes a retransmission into
    /// `out` (and returns `Event::Retry`) or returns `Event::TimedOut`.
    pub fn handle_timeout(&mut self, now: u64, out: &mut Vec<u8>) -> Event<'static> {
        let Some(p) = self.pending.as_mut() else {
            return Event::None;
        };
        if now < p.next_at {
            return Event::None;
        }
        if p.sends >= MAX_SENDS {
            let method = p.req.method();
            self.pending = None;
            return Event::TimedOut { method };
        }
        p.sends += 1;
        p.rto *= 2;
        p.next_at = now + p.rto;
        out.clear();
        out.extend_from_slice(&p.bytes);
        Event::Retry
    }

    /// Handles a datagram from the server. A new request (after 401/438) is written into
    /// `out` and `Event::Retry` returned; `out` is untouched otherwise.
    pub fn handle<'a>(&mut self, now: u64, datagram: &'a [u8], out: &mut Vec<u8>) -> Event<'a> {
        if let Some(0x40..=0x4F) = datagram.first() {
            return match ChannelData::parse(datagram) {
                Ok(cd) => Event::ChannelData {
                    channel: cd.channel,
                    data: cd.payload,
                },
                Err(_) => Event::None,
            };
        }
        let Ok(msg) = Message::parse(datagram) else {
            return Event::None;
        };
        if msg.method() == Method::DATA && msg.class() == Class::Indication {
            return match (msg.attr::<XorPeerAddress>(), msg.attr::<Data<'a>>()) {
                (Ok(Some(p)), Ok(Some(d))) => Event::Data {
                    peer: p.0,
                    data: d.0,
                },
                _ => Event::None,
            };
        }
        let Some(p) = self.pending.as_ref() else {
            return Event::None;
        };
        if msg.transaction_id() != p.tid || msg.method() != p.req.method() {
            return Event::None;
        }
        let method = p.req.method();
        match self.on_response(now, &msg, out) {
            Ok(ev) => ev,
            Err(_) => {
                self.pending = None;
                Event::Failed {
                    method,
                    code: 0,
                    reason: "malformed response".into(),
                }
            }
        }
    }

    fn on_response(
        &mut self,
        now: u64,
        msg: &Message<'_>,
        out: &mut Vec<u8>,
    ) -> Result<Event<'static>, DecodeError> {
        let Some(p) = self.pending.take() else {
            return Ok(Event::None);
        };
        let method = p.req.method();
        if msg.class() == Class::Error {
            let err = msg.attr::<ErrorCode>()?.ok_or(DecodeError::Truncated)?;
            let can_retry = !p.retried_auth || err.code == 438;
            if (err.code == 401 || err.code == 438)
                && can_retry
                && let (Some(realm), Some(nonce)) = (msg.attr::<Realm>()?, msg.attr::<Nonce>()?)
            {
                self.learn(realm.0, nonce.0, msg.attr::<PasswordAlgorithms>()?);
                let tid = self.next_tid();
                let bytes = self
                    .encode(&p.req, tid)
                    .map_err(|_| DecodeError::Truncated)?;
                out.clear();
                out.extend_from_slice(&bytes);
                self.pending = Some(Pending {
                    req: p.req,
                    tid,
                    bytes,
                    sends: 1,
                    next_at: now + RTO_MS,
                    rto: RTO_MS,
                    retried_auth: true,
                });
                return Ok(Event::Retry);
            }
            return Ok(Event::Failed {
                method,
                code: err.code,
                reason: err.reason.to_owned(),
            });
        }
        if msg.class() != Class::Success {
            self.pending = Some(p);
            return Ok(Event::None);
        }
        if let Some(key) = &self.key {
            let ok = if msg.has_integrity_sha256() {
                msg.verify_integrity_sha256(key).is_ok()
            } else {
                msg.verify_integrity(key).is_ok()
            };
            if !ok {
                // A forged or corrupted response: keep waiting for the real one.
                self.pending = Some(p);
                return Ok(Event::None);
            }
        }
        Ok(match p.req {
            Request::Allocate(_) => Event::Allocated {
                relayed: msg
                    .attrs::<XorRelayedAddress>()
                    .filter_map(|r| r.ok().map(|a| a.0))
                    .collect(),
                mapped: msg.attr::<XorMappedAddress>()?.map(|a| a.0),
                lifetime: msg.attr::<Lifetime>()?.map(|l| l.0).unwrap_or(0),
                reservation: msg.attr::<ReservationToken>()?.map(|t| t.0),
            },
            Request::Refresh(_) => Event::Refreshed {
                lifetime: msg.attr::<Lifetime>()?.map(|l| l.0).unwrap_or(0),
            },
            Request::CreatePermission(_) => Event::PermissionCreated,
            Request::ChannelBind(c, _) => Event::ChannelBound { channel: c },
        })
    }

    fn learn(&mut self, realm: &str, nonce: &str, algs: Option<PasswordAlgorithms<'_>>) {
        let sha = self.use_sha256
            && algs
                .map(|a| {
                    a.algorithms()
                        .any(|x| x.algorithm == PasswordAlgorithmId::SHA256)
                })
                .unwrap_or(false);
        self.key = Some(if sha {
            auth::long_term_key_sha256(&self.username, realm, &self.password).to_vec()
        } else {
            auth::long_term_key_md5(&self.username, realm, &self.password).to_vec()
        });
        self.algorithms = if sha {
            algs.map(|a| a.raw().to_vec())
        } else {
            None
        };
        self.realm = Some(realm.to_owned());
        self.nonce = Some(nonce.to_owned());
    }
}
