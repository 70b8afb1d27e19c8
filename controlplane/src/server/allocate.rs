//! Allocate and Refresh: relay addresses and their ports, the quotas, the bind round
//! trip with the data plane, reservations (EVEN-PORT, RESERVATION-TOKEN) and the relay
//! pool.

use std::net::{IpAddr, SocketAddr};

use ahash::AHashMap;
use rand::Rng;
use turnpike_plane::{RelayIp, advertised_addr};
use turnpike_proto::attr::{
    self, AdditionalAddressFamily, AddressErrorCode, DontFragment, ErrorCode, EvenPort, Family,
    Lifetime, RequestedAddressFamily, RequestedTransport, ReservationToken, XorMappedAddress,
    XorRelayedAddress,
};
use turnpike_proto::stun::{Class, Message, Method, TransactionId};

use super::auth::Authed;
use super::dispatch::Via;
use super::refusal::{Note, Refusal, Reject, reject};
use super::response::{Tail, build_response};
use super::timers::Timer;
use super::{Allocation, Server, reason_phrase};
use crate::types::{
    AllocationId, BindError, BindRequest, EndReason, Event, FiveTuple, Millis, Output, TableChange,
};

/// How long a RESERVATION-TOKEN holds its port (RFC 8656 §7.2 suggests about 30 s).
const RESERVATION_SECS: u64 = 30;
/// Binds tried with different ports before an Allocate fails with 508.
const BIND_ATTEMPTS: u32 = 4;
/// How long a bind may go unacknowledged (a data plane that went away) before the
/// Allocate fails with 508 and its ports are released.
const BIND_TIMEOUT_MS: u64 = 5_000;

#[derive(Debug, Clone)]
pub(super) struct PendingAllocate {
    pub(super) tuple: FiveTuple,
    pub(super) tid: TransactionId,
    pub(super) auth: Authed,
    pub(super) lifetime: u32,
    pub(super) relays: Vec<SocketAddr>,
    pub(super) families: Vec<Family>,
    pub(super) v6_error: bool,
    pub(super) even: bool,
    pub(super) reserve_next: bool,
    pub(super) token: Option<[u8; 8]>,
    pub(super) dont_fragment: bool,
    pub(super) attempts: u32,
    /// When the current bind times out (its timer key).
    pub(super) bind_deadline: Millis,
    /// The relay IPs to choose from (the receiving data plane's).
    pub(super) relay_ips: Vec<IpAddr>,
    /// Those of them behind a 1:1 NAT, with the address the client is given.
    pub(super) advertised: Vec<RelayIp>,
}

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

impl Server {
    pub(super) fn allocate(
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
        // A drained data plane (`via.alternate`) or a draining server sends new
        // allocations elsewhere.
        if self.draining || via.alternate.is_some() {
            return match via.alternate.or(self.alternate) {
                Some(alt) => {
                    let domain = via.alternate_domain_for(&tuple);
                    let data = self
                        .respond(msg, Class::Error, Some(auth), |w| {
                            w.add(&ErrorCode::standard(300))?;
                            w.add(&attr::AlternateServer(alt))?;
                            if let Some(d) = domain {
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

    pub(super) fn fail_pending(&self, p: &PendingAllocate, code: u16, out: &mut Vec<Output>) {
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
                dont_fragment: p.dont_fragment,
                permissions: AHashMap::new(),
                channels: AHashMap::new(),
                peer_channel: AHashMap::new(),
                allocate_tid: Some(p.tid),
                allocate_response: buf,
            },
        );
    }

    pub(super) fn refresh(
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
}
