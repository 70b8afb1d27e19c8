//! The entry points of requests and their routing by method, with the rate limit of the
//! answers given before authentication.

use std::net::SocketAddr;

use turnpike_plane::RelayIp;
use turnpike_proto::attr::{ErrorCode, UnknownAttributes};
use turnpike_proto::stun::{
    self, Class, HEADER_LEN, Message, MessageWriter, Method, TransactionId,
};

use super::Server;
use super::refusal::{Refusal, reject};
use crate::types::{FiveTuple, Millis, Output, Transport};

/// The data plane a request arrived through, in a cluster.
#[derive(Debug, Clone, Copy, Default)]
pub struct Via<'a> {
    /// That data plane's relay IPs with their advertised addresses (empty: the
    /// configured ones, [`ServerConfig::relay_ips`](super::ServerConfig::relay_ips) and
    /// [`ServerConfig::advertised_ips`](super::ServerConfig::advertised_ips)).
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

impl Via<'_> {
    /// The ALTERNATE-DOMAIN for a client on `tuple`: only one on TLS can use it.
    pub(super) fn alternate_domain_for(&self, tuple: &FiveTuple) -> Option<&str> {
        self.alternate_domain
            .filter(|_| tuple.transport == Transport::Tls)
    }
}

impl Server {
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
    pub(super) fn limit(&mut self, client: SocketAddr, now: Millis) -> bool {
        let ok = self.limiter.allow(client, now);
        if !ok {
            self.stats.rate_limited += 1;
            if self.sample(Refusal::RateLimited, now) {
                tracing::info!(%client, "unauthenticated request dropped by the rate limiter");
            }
        }
        ok
    }
}
