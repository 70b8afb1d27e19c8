//! The conversions between the plane contract (`turnpike_plane`) and the gRPC messages
//! of [`crate::v1`]: written here and nowhere else.

use std::net::{IpAddr, SocketAddr};

use turnpike_plane::{
    AllocationId, AllocationSnapshot, BindError, FiveTuple, Millis, RelayIp, TableChange, Traffic,
    Transport, Usage,
};

use crate::v1::{self, table_change};
use crate::{ip_from_bytes, ip_to_bytes};

/// A gRPC message that does not make a valid contract value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// A required field is missing.
    #[error("missing field {0}")]
    Missing(&'static str),
    /// A field has a value out of range.
    #[error("invalid field {0}")]
    Invalid(&'static str),
}

impl From<Transport> for v1::Transport {
    fn from(t: Transport) -> v1::Transport {
        match t {
            Transport::Udp => v1::Transport::Udp,
            Transport::Tcp => v1::Transport::Tcp,
            Transport::Tls => v1::Transport::Tls,
        }
    }
}

impl From<&FiveTuple> for v1::FiveTuple {
    fn from(t: &FiveTuple) -> v1::FiveTuple {
        v1::FiveTuple {
            transport: v1::Transport::from(t.transport) as i32,
            client: Some(t.client.into()),
            server: Some(t.server.into()),
        }
    }
}

impl TryFrom<&v1::FiveTuple> for FiveTuple {
    type Error = ConvertError;
    fn try_from(t: &v1::FiveTuple) -> Result<FiveTuple, ConvertError> {
        let transport = match v1::Transport::try_from(t.transport) {
            Ok(v1::Transport::Udp) => Transport::Udp,
            Ok(v1::Transport::Tcp) => Transport::Tcp,
            Ok(v1::Transport::Tls) => Transport::Tls,
            _ => return Err(ConvertError::Invalid("five_tuple.transport")),
        };
        let addr = |a: Option<&v1::SocketAddress>, name| {
            SocketAddr::try_from(a.ok_or(ConvertError::Missing(name))?)
                .map_err(|_| ConvertError::Invalid(name))
        };
        Ok(FiveTuple {
            transport,
            client: addr(t.client.as_ref(), "five_tuple.client")?,
            server: addr(t.server.as_ref(), "five_tuple.server")?,
        })
    }
}

/// A 5-tuple field that must be present.
pub fn tuple_from_api(t: Option<&v1::FiveTuple>) -> Result<FiveTuple, ConvertError> {
    FiveTuple::try_from(t.ok_or(ConvertError::Missing("five_tuple"))?)
}

impl From<Usage> for v1::Usage {
    fn from(u: Usage) -> v1::Usage {
        let t = |t: Traffic| {
            Some(v1::TrafficCounters {
                packets: t.packets,
                bytes: t.bytes,
            })
        };
        v1::Usage {
            client_to_peer: t(u.to_peer),
            peer_to_client: t(u.to_client),
        }
    }
}

impl From<&v1::Usage> for Usage {
    fn from(u: &v1::Usage) -> Usage {
        let t = |t: &Option<v1::TrafficCounters>| {
            let t = t.unwrap_or_default();
            Traffic {
                packets: t.packets,
                bytes: t.bytes,
            }
        };
        Usage {
            to_peer: t(&u.client_to_peer),
            to_client: t(&u.peer_to_client),
        }
    }
}

fn channel_number(n: u32) -> Result<u16, ConvertError> {
    u16::try_from(n).map_err(|_| ConvertError::Invalid("channel_number"))
}

fn peer_ip(b: &[u8]) -> Result<IpAddr, ConvertError> {
    ip_from_bytes(b).map_err(|_| ConvertError::Invalid("peer_ip"))
}

fn socket(a: Option<&v1::SocketAddress>, name: &'static str) -> Result<SocketAddr, ConvertError> {
    SocketAddr::try_from(a.ok_or(ConvertError::Missing(name))?)
        .map_err(|_| ConvertError::Invalid(name))
}

/// The clock readings a conversion needs. Deadlines cross between the planes as the
/// milliseconds that remain at `now` (the converting side's [`turnpike_plane::Clock`]);
/// for people (the Admin API) they are also shown as wall-clock times, from `wall` (the
/// wall clock at the same moment, unix milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    /// Now on the converting plane's clock.
    pub now: Millis,
    /// Now on the wall clock, unix milliseconds.
    pub wall: u64,
}

impl At {
    /// Readings of `clock`. The plane's clock starts at the wall time of the process's
    /// start, so the two agree until the wall clock is stepped: within a second they are
    /// taken as equal, so that a deadline shows as the same wall time in every answer
    /// (two readings of two clocks would differ by a millisecond now and then).
    pub fn of(clock: &turnpike_plane::Clock) -> At {
        let now = clock.now();
        let wall = clock.wall();
        let wall = if wall.abs_diff(now.0) < 1_000 {
            now.0
        } else {
            wall
        };
        At { now, wall }
    }

    /// What remains of `deadline`.
    pub fn remaining(&self, deadline: Millis) -> u64 {
        deadline.remaining(self.now)
    }

    /// `deadline` on the wall clock, for display.
    pub fn unix(&self, deadline: Millis) -> u64 {
        self.wall.saturating_add(deadline.remaining(self.now))
    }

    /// A past (or future) moment of this side's clock on the wall clock, for display.
    pub fn wall_of(&self, t: Millis) -> u64 {
        if t >= self.now {
            self.wall.saturating_add(t.0 - self.now.0)
        } else {
            self.wall.saturating_sub(self.now.0 - t.0)
        }
    }

    /// A received duration as a deadline on this side's clock.
    pub fn deadline(&self, remaining_millis: u64) -> Millis {
        self.now.plus_ms(remaining_millis)
    }
}

/// The gRPC form of a table change, for the data plane worker `worker` (carried by
/// AllocationAdd; the other changes are routed by allocation id).
pub fn table_change_to_api(change: &TableChange, worker: u32, at: At) -> v1::TableChange {
    use table_change::Change as C;
    let change = match change {
        TableChange::AllocationAdd {
            id,
            tuple,
            relays,
            deadline,
            bandwidth,
            user,
            username,
            dont_fragment,
        } => C::AllocationAdd(v1::AllocationAdd {
            allocation: Some(v1::Allocation {
                allocation_id: id.0,
                worker_id: worker,
                five_tuple: Some(tuple.into()),
                relay_addresses: relays.iter().map(|r| (*r).into()).collect(),
                deadline_unix_millis: at.unix(*deadline),
                remaining_millis: at.remaining(*deadline),
                bandwidth_limit_bytes_per_second: *bandwidth,
                user_id: user.clone(),
                dont_fragment: *dont_fragment,
                username: username.clone(),
            }),
        }),
        TableChange::AllocationRefresh { id, deadline } => {
            C::AllocationRefresh(v1::AllocationRefresh {
                allocation_id: id.0,
                remaining_millis: at.remaining(*deadline),
            })
        }
        TableChange::AllocationRemove { id } => C::AllocationRemove(v1::AllocationRemove {
            allocation_id: id.0,
        }),
        TableChange::PermissionSet { id, peer, deadline } => C::PermissionAdd(v1::PermissionAdd {
            allocation_id: id.0,
            permission: Some(v1::Permission {
                peer_ip: ip_to_bytes(*peer),
                deadline_unix_millis: at.unix(*deadline),
                remaining_millis: at.remaining(*deadline),
            }),
        }),
        TableChange::PermissionRemove { id, peer } => C::PermissionRemove(v1::PermissionRemove {
            allocation_id: id.0,
            peer_ip: ip_to_bytes(*peer),
        }),
        TableChange::ChannelSet {
            id,
            channel,
            peer,
            deadline,
            confirmed,
        } => C::ChannelAdd(v1::ChannelAdd {
            allocation_id: id.0,
            confirmed: *confirmed,
            channel: Some(v1::Channel {
                channel_number: u32::from(*channel),
                peer: Some((*peer).into()),
                deadline_unix_millis: at.unix(*deadline),
                remaining_millis: at.remaining(*deadline),
            }),
        }),
        TableChange::ChannelRemove { id, channel } => C::ChannelRemove(v1::ChannelRemove {
            allocation_id: id.0,
            channel_number: u32::from(*channel),
        }),
    };
    v1::TableChange {
        change: Some(change),
        worker_id: worker,
    }
}

/// From the gRPC form: the change, and the worker an AllocationAdd names (0 for the
/// other changes).
pub fn table_change_from_api(
    c: &v1::TableChange,
    at: At,
) -> Result<(TableChange, u32), ConvertError> {
    let (change, add_worker) = change_from_api(c, at)?;
    // An AllocationAdd names its worker in the allocation; every change names it too.
    let worker = match change {
        TableChange::AllocationAdd { .. } => add_worker,
        _ => c.worker_id,
    };
    Ok((change, worker))
}

fn change_from_api(c: &v1::TableChange, at: At) -> Result<(TableChange, u32), ConvertError> {
    use table_change::Change as C;
    let missing = ConvertError::Missing;
    Ok(match c.change.as_ref().ok_or(missing("change"))? {
        C::AllocationAdd(a) => {
            let a = a.allocation.as_ref().ok_or(missing("allocation"))?;
            (
                TableChange::AllocationAdd {
                    id: AllocationId(a.allocation_id),
                    tuple: tuple_from_api(a.five_tuple.as_ref())?,
                    relays: a
                        .relay_addresses
                        .iter()
                        .map(|r| socket(Some(r), "relay_addresses"))
                        .collect::<Result<_, _>>()?,
                    deadline: at.deadline(a.remaining_millis),
                    bandwidth: a.bandwidth_limit_bytes_per_second,
                    user: a.user_id.clone(),
                    username: a.username.clone(),
                    dont_fragment: a.dont_fragment,
                },
                a.worker_id,
            )
        }
        C::AllocationRefresh(r) => (
            TableChange::AllocationRefresh {
                id: AllocationId(r.allocation_id),
                deadline: at.deadline(r.remaining_millis),
            },
            0,
        ),
        C::AllocationRemove(r) => (
            TableChange::AllocationRemove {
                id: AllocationId(r.allocation_id),
            },
            0,
        ),
        C::PermissionAdd(p) => {
            let perm = p.permission.as_ref().ok_or(missing("permission"))?;
            (
                TableChange::PermissionSet {
                    id: AllocationId(p.allocation_id),
                    peer: peer_ip(&perm.peer_ip)?,
                    deadline: at.deadline(perm.remaining_millis),
                },
                0,
            )
        }
        C::PermissionRemove(p) => (
            TableChange::PermissionRemove {
                id: AllocationId(p.allocation_id),
                peer: peer_ip(&p.peer_ip)?,
            },
            0,
        ),
        C::ChannelAdd(ch) => {
            let c = ch.channel.as_ref().ok_or(missing("channel"))?;
            (
                TableChange::ChannelSet {
                    id: AllocationId(ch.allocation_id),
                    channel: channel_number(c.channel_number)?,
                    peer: socket(c.peer.as_ref(), "channel.peer")?,
                    deadline: at.deadline(c.remaining_millis),
                    confirmed: ch.confirmed,
                },
                0,
            )
        }
        C::ChannelRemove(ch) => (
            TableChange::ChannelRemove {
                id: AllocationId(ch.allocation_id),
                channel: channel_number(ch.channel_number)?,
            },
            0,
        ),
    })
}

/// The gRPC form of a table row.
pub fn snapshot_to_api(s: &AllocationSnapshot, at: At) -> v1::AllocationState {
    v1::AllocationState {
        allocation: Some(v1::Allocation {
            allocation_id: s.id.0,
            worker_id: s.worker,
            five_tuple: Some((&s.tuple).into()),
            relay_addresses: s.relays.iter().map(|r| (*r).into()).collect(),
            deadline_unix_millis: at.unix(s.deadline),
            remaining_millis: at.remaining(s.deadline),
            bandwidth_limit_bytes_per_second: s.bandwidth,
            user_id: s.user.clone(),
            dont_fragment: s.dont_fragment,
            username: s.username.clone(),
        }),
        permissions: s
            .permissions
            .iter()
            .map(|(ip, t)| v1::Permission {
                peer_ip: ip_to_bytes(*ip),
                deadline_unix_millis: at.unix(*t),
                remaining_millis: at.remaining(*t),
            })
            .collect(),
        channels: s
            .channels
            .iter()
            .map(|(c, p, t)| v1::Channel {
                channel_number: u32::from(*c),
                peer: Some((*p).into()),
                deadline_unix_millis: at.unix(*t),
                remaining_millis: at.remaining(*t),
            })
            .collect(),
    }
}

/// A table row from its gRPC form.
pub fn snapshot_from_api(
    s: &v1::AllocationState,
    at: At,
) -> Result<AllocationSnapshot, ConvertError> {
    let a = s
        .allocation
        .as_ref()
        .ok_or(ConvertError::Missing("allocation"))?;
    Ok(AllocationSnapshot {
        id: AllocationId(a.allocation_id),
        worker: a.worker_id,
        tuple: tuple_from_api(a.five_tuple.as_ref())?,
        relays: a
            .relay_addresses
            .iter()
            .map(|r| socket(Some(r), "relay_addresses"))
            .collect::<Result<_, _>>()?,
        deadline: at.deadline(a.remaining_millis),
        bandwidth: a.bandwidth_limit_bytes_per_second,
        user: a.user_id.clone(),
        username: a.username.clone(),
        dont_fragment: a.dont_fragment,
        permissions: s
            .permissions
            .iter()
            .map(|p| Ok((peer_ip(&p.peer_ip)?, at.deadline(p.remaining_millis))))
            .collect::<Result<_, ConvertError>>()?,
        channels: s
            .channels
            .iter()
            .map(|c| {
                Ok((
                    channel_number(c.channel_number)?,
                    socket(c.peer.as_ref(), "channel.peer")?,
                    at.deadline(c.remaining_millis),
                ))
            })
            .collect::<Result<_, ConvertError>>()?,
        usage: Usage::default(),
    })
}

impl From<&RelayIp> for v1::RelayIp {
    fn from(r: &RelayIp) -> v1::RelayIp {
        v1::RelayIp {
            ip: ip_to_bytes(r.ip),
            // Empty unless NATed: a Hello without NAT is what it always was.
            advertised_ip: if r.is_nat() {
                ip_to_bytes(r.advertised)
            } else {
                Vec::new()
            },
        }
    }
}

impl TryFrom<&v1::RelayIp> for RelayIp {
    type Error = ConvertError;
    fn try_from(r: &v1::RelayIp) -> Result<RelayIp, ConvertError> {
        let ip = ip_from_bytes(&r.ip).map_err(|_| ConvertError::Invalid("relay_ip.ip"))?;
        if r.advertised_ip.is_empty() {
            return Ok(RelayIp::local(ip));
        }
        let advertised = ip_from_bytes(&r.advertised_ip)
            .map_err(|_| ConvertError::Invalid("relay_ip.advertised_ip"))?;
        // XOR-RELAYED-ADDRESS must have the family the client asked for.
        if advertised.is_ipv4() != ip.is_ipv4() {
            return Err(ConvertError::Invalid("relay_ip.advertised_ip"));
        }
        Ok(RelayIp { ip, advertised })
    }
}

impl From<&BindError> for v1::BindError {
    fn from(e: &BindError) -> v1::BindError {
        let code = match e {
            BindError::AddressInUse => v1::BindErrorCode::AddressInUse,
            BindError::AddressNotAvailable => v1::BindErrorCode::AddressNotAvailable,
            BindError::Invalid(_) => v1::BindErrorCode::InvalidRequest,
            BindError::NoDataPlane => v1::BindErrorCode::UnknownWorker,
            BindError::System(_) => v1::BindErrorCode::System,
        };
        v1::BindError {
            code: code as i32,
            reason: e.to_string(),
        }
    }
}

impl From<&v1::BindError> for BindError {
    fn from(e: &v1::BindError) -> BindError {
        match v1::BindErrorCode::try_from(e.code) {
            Ok(v1::BindErrorCode::AddressInUse) => BindError::AddressInUse,
            Ok(v1::BindErrorCode::AddressNotAvailable) => BindError::AddressNotAvailable,
            Ok(v1::BindErrorCode::InvalidRequest) => BindError::Invalid(e.reason.clone()),
            Ok(v1::BindErrorCode::UnknownWorker) => BindError::NoDataPlane,
            _ => BindError::System(e.reason.clone()),
        }
    }
}

// ----- the seam's messages ----------------------------------------------------------------

use turnpike_plane::{
    Batch, Bind, Datagram, Down, DropReason, FastPathReport, Hello, LoadReport, Punted, Snapshot,
    Up, WorkerLoad,
};
use v1::{control_plane_message as cpm, data_plane_message as dpm};

fn tuple_to_api(t: &FiveTuple) -> Option<v1::FiveTuple> {
    Some(t.into())
}

/// A table snapshot's gRPC form.
pub fn table_to_api(t: &Snapshot, at: At) -> v1::TableSnapshot {
    v1::TableSnapshot {
        table_version: t.version,
        allocations: t
            .allocations
            .iter()
            .map(|a| snapshot_to_api(a, at))
            .collect(),
        complete: t.complete,
    }
}

/// A table snapshot from its gRPC form: rows that do not convert are left out (and
/// counted in the returned number).
pub fn table_from_api(t: &v1::TableSnapshot, at: At) -> (Snapshot, usize) {
    let mut bad = 0;
    let allocations = t
        .allocations
        .iter()
        .filter_map(|a| match snapshot_from_api(a, at) {
            Ok(a) => Some(a),
            Err(_) => {
                bad += 1;
                None
            }
        })
        .collect();
    (
        Snapshot {
            version: t.table_version,
            allocations,
            complete: t.complete,
        },
        bad,
    )
}

/// The gRPC form of a drop reason.
pub fn drop_reason_to_api(r: DropReason) -> v1::DropReason {
    match r {
        DropReason::Other => v1::DropReason::Unspecified,
        DropReason::Malformed => v1::DropReason::Malformed,
        DropReason::NoAllocation => v1::DropReason::NoAllocation,
        DropReason::NoPermission => v1::DropReason::NoPermission,
        DropReason::NoChannel => v1::DropReason::NoChannel,
        DropReason::Bandwidth => v1::DropReason::BandwidthLimit,
        DropReason::PeerPolicy => v1::DropReason::PeerPolicy,
        DropReason::RateLimited => v1::DropReason::RateLimited,
        DropReason::QueueFull => v1::DropReason::QueueFull,
        DropReason::SendError => v1::DropReason::SendError,
    }
}

fn drop_reason_from_api(r: i32) -> DropReason {
    match v1::DropReason::try_from(r) {
        Ok(v1::DropReason::Malformed) => DropReason::Malformed,
        Ok(v1::DropReason::NoAllocation) => DropReason::NoAllocation,
        Ok(v1::DropReason::NoPermission) => DropReason::NoPermission,
        Ok(v1::DropReason::NoChannel) => DropReason::NoChannel,
        Ok(v1::DropReason::BandwidthLimit) => DropReason::Bandwidth,
        Ok(v1::DropReason::PeerPolicy) => DropReason::PeerPolicy,
        Ok(v1::DropReason::RateLimited) => DropReason::RateLimited,
        Ok(v1::DropReason::QueueFull) => DropReason::QueueFull,
        Ok(v1::DropReason::SendError) => DropReason::SendError,
        _ => DropReason::Other,
    }
}

fn counts_to_api(c: &[(String, u64)]) -> Vec<v1::PathCount> {
    c.iter()
        .map(|(name, packets)| v1::PathCount {
            name: name.clone(),
            packets: *packets,
        })
        .collect()
}

fn counts_from_api(c: &[v1::PathCount]) -> Vec<(String, u64)> {
    c.iter().map(|p| (p.name.clone(), p.packets)).collect()
}

/// A load report's gRPC form; `sampled_unix_millis` is set by whoever shows it.
pub fn load_to_api(l: &LoadReport, sampled_unix_millis: u64) -> v1::LoadReport {
    v1::LoadReport {
        sampled_unix_millis,
        allocations: l.allocations,
        traffic: Some(l.traffic.into()),
        drops: l
            .drops
            .iter()
            .map(|&(r, packets)| v1::DropCount {
                reason: drop_reason_to_api(r) as i32,
                packets,
            })
            .collect(),
        workers: l
            .workers
            .iter()
            .enumerate()
            .map(|(w, l)| v1::WorkerLoad {
                worker_id: w as u32,
                allocations: l.allocations,
                received_packets: l.received_packets,
            })
            .collect(),
        fast_path: l.fast_path.as_ref().map(|f| v1::FastPathReport {
            interfaces: f.interfaces.clone(),
            off_reason: f.off_reason.clone(),
            traffic: Some(f.traffic.into()),
            relayed: counts_to_api(&f.relayed),
            passed: counts_to_api(&f.passed),
            allocations: f.allocations,
        }),
    }
}

/// A load report from its gRPC form.
pub fn load_from_api(l: &v1::LoadReport) -> LoadReport {
    let mut workers = vec![WorkerLoad::default(); l.workers.len().min(4096)];
    for w in &l.workers {
        if let Some(slot) = workers.get_mut(w.worker_id as usize) {
            *slot = WorkerLoad {
                allocations: w.allocations,
                received_packets: w.received_packets,
            };
        }
    }
    LoadReport {
        allocations: l.allocations,
        traffic: l.traffic.as_ref().map(Usage::from).unwrap_or_default(),
        drops: l
            .drops
            .iter()
            .map(|d| (drop_reason_from_api(d.reason), d.packets))
            .collect(),
        workers,
        fast_path: l.fast_path.as_ref().map(|f| FastPathReport {
            interfaces: f.interfaces.clone(),
            off_reason: f.off_reason.clone(),
            traffic: f.traffic.as_ref().map(Usage::from).unwrap_or_default(),
            relayed: counts_from_api(&f.relayed),
            passed: counts_from_api(&f.passed),
            allocations: f.allocations,
        }),
    }
}

/// A Hello's gRPC form.
pub fn hello_to_api(h: &Hello, at: At) -> v1::Hello {
    v1::Hello {
        data_plane_id: h.id.clone(),
        listening_addresses: h
            .listening
            .iter()
            .map(|(t, a)| v1::ListeningAddress {
                transport: v1::Transport::from(*t) as i32,
                address: Some((*a).into()),
            })
            .collect(),
        relay_ips: h.relay_ips.iter().map(v1::RelayIp::from).collect(),
        worker_count: h.workers,
        version: h.version.clone(),
        table: h.table.as_ref().map(|t| table_to_api(t, at)),
        started_unix_millis: h.started,
    }
}

/// A Hello from its gRPC form (listening addresses and relay IPs that do not convert are
/// left out).
pub fn hello_from_api(h: &v1::Hello, at: At) -> Hello {
    Hello {
        id: h.data_plane_id.clone(),
        listening: h
            .listening_addresses
            .iter()
            .filter_map(|l| {
                let t = match v1::Transport::try_from(l.transport) {
                    Ok(v1::Transport::Udp) => Transport::Udp,
                    Ok(v1::Transport::Tcp) => Transport::Tcp,
                    Ok(v1::Transport::Tls) => Transport::Tls,
                    _ => return None,
                };
                Some((t, SocketAddr::try_from(l.address.as_ref()?).ok()?))
            })
            .collect(),
        relay_ips: h
            .relay_ips
            .iter()
            .filter_map(|r| RelayIp::try_from(r).ok())
            .collect(),
        workers: h.worker_count,
        version: h.version.clone(),
        started: h.started_unix_millis,
        table: h.table.as_ref().map(|t| table_from_api(t, at).0),
    }
}

fn bind_to_api(b: &Bind) -> v1::BindRequest {
    v1::BindRequest {
        request_id: b.id,
        worker_id: b.worker,
        relay_addresses: b.relays.iter().map(|r| (*r).into()).collect(),
        five_tuple: b.tuple.as_ref().and_then(tuple_to_api),
    }
}

fn bind_from_api(b: &v1::BindRequest) -> Result<Bind, ConvertError> {
    Ok(Bind {
        id: b.request_id,
        worker: b.worker_id,
        relays: b
            .relay_addresses
            .iter()
            .map(|r| socket(Some(r), "relay_addresses"))
            .collect::<Result<_, _>>()?,
        tuple: match &b.five_tuple {
            None => None,
            Some(t) => Some(FiveTuple::try_from(t)?),
        },
    })
}

fn punted_to_api(p: &Punted) -> v1::PuntedRequest {
    v1::PuntedRequest {
        worker_id: p.worker,
        five_tuple: tuple_to_api(&p.tuple),
        datagram: p.data.clone().into(),
    }
}

fn punted_from_api(p: &v1::PuntedRequest) -> Result<Punted, ConvertError> {
    Ok(Punted {
        worker: p.worker_id,
        tuple: tuple_from_api(p.five_tuple.as_ref())?,
        data: p.datagram.to_vec(),
    })
}

/// The gRPC form of a message up.
pub fn up_to_api(m: Up, at: At) -> v1::DataPlaneMessage {
    let m = match m {
        Up::Hello(h) => dpm::Message::Hello(hello_to_api(&h, at)),
        Up::Snapshot(t) => dpm::Message::TableSnapshot(table_to_api(&t, at)),
        Up::Punted(mut p) if p.len() == 1 => {
            dpm::Message::PuntedRequest(punted_to_api(&p.remove(0)))
        }
        Up::Punted(p) => dpm::Message::PuntedRequests(v1::PuntedRequests {
            requests: p.iter().map(punted_to_api).collect(),
        }),
        Up::BindResult { id, result } => dpm::Message::BindAck(v1::BindAck {
            request_id: id,
            outcome: Some(match result {
                Ok(()) => v1::bind_ack::Outcome::Success(v1::BindSuccess {}),
                Err(e) => v1::bind_ack::Outcome::Error(v1::BindError::from(&e)),
            }),
        }),
        Up::TableAck { version } => dpm::Message::TableAck(v1::TableAck {
            table_version: version,
        }),
        Up::Resync { applied } => dpm::Message::Resync(v1::Resync { applied }),
        Up::Load(l) => dpm::Message::LoadReport(load_to_api(&l, 0)),
        Up::Usage(u) => dpm::Message::UsageReport(v1::UsageReport {
            allocations: u
                .iter()
                .map(|(id, usage)| v1::AllocationUsage {
                    allocation_id: id.0,
                    usage: Some((*usage).into()),
                })
                .collect(),
        }),
        Up::ConnectionClosed { worker, tuple } => {
            dpm::Message::ConnectionClosed(v1::ConnectionClosed {
                worker_id: worker,
                five_tuple: tuple_to_api(&tuple),
            })
        }
    };
    v1::DataPlaneMessage { message: Some(m) }
}

/// A message up from its gRPC form.
pub fn up_from_api(m: &v1::DataPlaneMessage, at: At) -> Result<Up, ConvertError> {
    let m = m.message.as_ref().ok_or(ConvertError::Missing("message"))?;
    Ok(match m {
        dpm::Message::Hello(h) => Up::Hello(hello_from_api(h, at)),
        dpm::Message::TableSnapshot(t) => Up::Snapshot(table_from_api(t, at).0),
        dpm::Message::PuntedRequest(p) => Up::Punted(vec![punted_from_api(p)?]),
        // A request that does not convert is left out, as a malformed datagram is.
        dpm::Message::PuntedRequests(p) => Up::Punted(
            p.requests
                .iter()
                .filter_map(|p| punted_from_api(p).ok())
                .collect(),
        ),
        dpm::Message::BindAck(a) => Up::BindResult {
            id: a.request_id,
            result: match &a.outcome {
                Some(v1::bind_ack::Outcome::Success(_)) => Ok(()),
                Some(v1::bind_ack::Outcome::Error(e)) => Err(BindError::from(e)),
                None => Err(BindError::Invalid("empty bind acknowledgement".to_owned())),
            },
        },
        dpm::Message::TableAck(a) => Up::TableAck {
            version: a.table_version,
        },
        dpm::Message::Resync(r) => Up::Resync { applied: r.applied },
        dpm::Message::LoadReport(l) => Up::Load(load_from_api(l)),
        dpm::Message::UsageReport(u) => Up::Usage(
            u.allocations
                .iter()
                .map(|a| {
                    (
                        AllocationId(a.allocation_id),
                        a.usage.as_ref().map(Usage::from).unwrap_or_default(),
                    )
                })
                .collect(),
        ),
        dpm::Message::ConnectionClosed(c) => Up::ConnectionClosed {
            worker: c.worker_id,
            tuple: tuple_from_api(c.five_tuple.as_ref())?,
        },
    })
}

fn datagram_to_api(d: Datagram) -> v1::SendDatagram {
    v1::SendDatagram {
        worker_id: d.worker,
        five_tuple: tuple_to_api(&d.tuple),
        datagram: d.data.into(),
    }
}

fn datagram_from_api(d: &v1::SendDatagram) -> Result<Datagram, ConvertError> {
    Ok(Datagram {
        worker: d.worker_id,
        tuple: tuple_from_api(d.five_tuple.as_ref())?,
        data: d.datagram.to_vec(),
    })
}

/// The gRPC form of a message down.
pub fn down_to_api(m: Down, at: At) -> v1::ControlPlaneMessage {
    let m = match m {
        Down::Batch(b) => cpm::Message::TableChanges(v1::TableChangeBatch {
            table_version: b.version,
            changes: b
                .changes
                .iter()
                .map(|(w, c)| table_change_to_api(c, *w, at))
                .collect(),
            binds: b.binds.iter().map(bind_to_api).collect(),
            drain: b.drain.map(|draining| v1::Drain { draining }),
            challenge: b.challenge.map(|c| v1::Challenge {
                realm: c.realm,
                nonce_secret: c.nonce_secret.to_vec(),
                nonce_lifetime_secs: c.nonce_lifetime_secs,
                source_rate: c.per_source.per_sec(),
                source_burst: c.per_source.burst(),
                ip_rate: c.per_ip.per_sec(),
                ip_burst: c.per_ip.burst(),
            }),
        }),
        Down::Send { after, datagrams } => cpm::Message::SendDatagrams(v1::SendDatagrams {
            datagrams: datagrams.into_iter().map(datagram_to_api).collect(),
            after_table_version: after,
        }),
    };
    v1::ControlPlaneMessage { message: Some(m) }
}

/// A message down from its gRPC form. A batch with a change or bind that does not
/// convert is an error as a whole: applying part of it would leave the table between
/// two versions.
pub fn down_from_api(m: &v1::ControlPlaneMessage, at: At) -> Result<Down, ConvertError> {
    let m = m.message.as_ref().ok_or(ConvertError::Missing("message"))?;
    Ok(match m {
        cpm::Message::TableChanges(b) => {
            let mut changes = Vec::with_capacity(b.changes.len());
            for c in &b.changes {
                let (change, worker) = table_change_from_api(c, at)?;
                changes.push((worker, change));
            }
            Down::Batch(Batch {
                version: b.table_version,
                binds: b
                    .binds
                    .iter()
                    .map(bind_from_api)
                    .collect::<Result<_, _>>()?,
                changes,
                drain: b.drain.map(|d| d.draining),
                challenge: match &b.challenge {
                    None => None,
                    Some(c) => Some(turnpike_plane::Challenge {
                        realm: c.realm.clone(),
                        nonce_secret: <[u8; 32]>::try_from(c.nonce_secret.as_slice())
                            .map_err(|_| ConvertError::Invalid("challenge.nonce_secret"))?,
                        nonce_lifetime_secs: c.nonce_lifetime_secs,
                        per_source: turnpike_plane::limit::Rate::new(c.source_rate, c.source_burst),
                        per_ip: turnpike_plane::limit::Rate::new(c.ip_rate, c.ip_burst),
                    }),
                },
            })
        }
        cpm::Message::SendDatagram(d) => Down::Send {
            after: 0,
            datagrams: vec![datagram_from_api(d)?],
        },
        cpm::Message::SendDatagrams(d) => Down::Send {
            after: d.after_table_version,
            datagrams: d
                .datagrams
                .iter()
                .filter_map(|d| datagram_from_api(d).ok())
                .collect(),
        },
    })
}

// ----- the Admin API's views ----------------------------------------------------------------

use turnpike_plane::admin::{AdminEvent, AllocationView, CellStats, EndReason, EventBody};

/// An allocation's Admin API form.
pub fn allocation_view_to_api(v: &AllocationView, at: At) -> v1::AllocationInfo {
    v1::AllocationInfo {
        data_plane_id: v.data_plane.clone(),
        state: Some(snapshot_to_api(&v.row, at)),
        usage: v.usage.map(Into::into),
        created_unix_millis: at.wall_of(v.created),
    }
}

/// The cell's statistics in their Admin API form.
pub fn stats_to_api(s: &CellStats, at: At) -> v1::GetStatsResponse {
    let t = &s.totals;
    v1::GetStatsResponse {
        totals: Some(v1::ServerStats {
            allocations: t.allocations,
            users: t.users,
            data_planes_attached: t.data_planes_attached,
            traffic: Some(t.traffic.into()),
            drops: t
                .drops
                .iter()
                .map(|&(r, packets)| v1::DropCount {
                    reason: drop_reason_to_api(r) as i32,
                    packets,
                })
                .collect(),
            punted_requests: t.punted_requests,
            auth_failures: t.auth_failures,
            rate_limited: t.rate_limited,
            policy_denied: t.policy_denied,
            quota_rejected: t.quota_rejected,
            ownership_violations: t.ownership_violations,
            user_quota: t.user_quota,
            total_quota: t.total_quota,
        }),
        data_planes: s
            .data_planes
            .iter()
            .map(|d| v1::DataPlaneStats {
                data_plane_id: d.id.clone(),
                version: d.version.clone(),
                attached: d.attached,
                draining: d.draining,
                worker_count: d.workers,
                listening_addresses: d
                    .listening
                    .iter()
                    .map(|(t, a)| v1::ListeningAddress {
                        transport: v1::Transport::from(*t) as i32,
                        address: Some((*a).into()),
                    })
                    .collect(),
                acked_table_version: d.acked_version,
                load: d
                    .load
                    .as_ref()
                    .map(|(l, when)| load_to_api(l, at.wall_of(*when))),
                attached_changed_unix_millis: at.wall_of(d.changed),
                relay_ips: d.relay_ips.iter().map(v1::RelayIp::from).collect(),
                started_unix_millis: d.started,
            })
            .collect(),
    }
}

/// A lifecycle event's Admin API form.
pub fn event_to_api(e: &AdminEvent, at: At) -> v1::Event {
    use v1::event::Body;
    let body = match &e.body {
        EventBody::Created {
            tuple,
            relays,
            deadline,
        } => Body::Created(v1::AllocationCreated {
            five_tuple: Some(tuple.into()),
            relay_addresses: relays.iter().map(|r| (*r).into()).collect(),
            deadline_unix_millis: deadline.map(|d| at.unix(d)).unwrap_or(0),
        }),
        EventBody::Refreshed { deadline } => Body::Refreshed(v1::AllocationRefreshed {
            deadline_unix_millis: at.unix(*deadline),
        }),
        EventBody::PermissionAdded { peer, deadline } => {
            Body::PermissionAdded(v1::PermissionAdded {
                permission: Some(v1::Permission {
                    peer_ip: ip_to_bytes(*peer),
                    deadline_unix_millis: at.unix(*deadline),
                    remaining_millis: at.remaining(*deadline),
                }),
            })
        }
        EventBody::ChannelAdded {
            channel,
            peer,
            deadline,
        } => Body::ChannelAdded(v1::ChannelAdded {
            channel: Some(v1::Channel {
                channel_number: u32::from(*channel),
                peer: Some((*peer).into()),
                deadline_unix_millis: at.unix(*deadline),
                remaining_millis: at.remaining(*deadline),
            }),
        }),
        EventBody::Deleted {
            reason,
            detail,
            usage,
        } => Body::Deleted(v1::AllocationDeleted {
            reason: match reason {
                EndReason::Deleted => v1::DeletionReason::Released,
                EndReason::Expired => v1::DeletionReason::Expired,
                EndReason::Revoked => v1::DeletionReason::Revoked,
                EndReason::ConnectionClosed => v1::DeletionReason::ConnectionClosed,
            } as i32,
            detail: detail.clone(),
            usage: usage.map(Into::into),
        }),
        EventBody::Usage { total, delta } => Body::Usage(v1::UsageUpdate {
            total: Some((*total).into()),
            delta: Some((*delta).into()),
        }),
    };
    v1::Event {
        sequence: e.sequence,
        timestamp_unix_millis: at.wall_of(e.at),
        allocation_id: e.allocation.0,
        user_id: e.user.clone(),
        data_plane_id: e.data_plane.clone(),
        body: Some(body),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Before every deadline below: they cross as durations and come back the same.
    fn at() -> At {
        At {
            now: Millis(1),
            wall: 1_700_000_000_000,
        }
    }

    fn tuple() -> FiveTuple {
        FiveTuple {
            transport: Transport::Tls,
            client: "198.51.100.1:5000".parse().unwrap(),
            server: "[2001:db8::1]:443".parse().unwrap(),
        }
    }

    #[test]
    fn relay_ip_round_trips_and_checks_the_family() {
        let nat = RelayIp {
            ip: "10.0.0.2".parse().unwrap(),
            advertised: "203.0.113.2".parse().unwrap(),
        };
        let plain = RelayIp::local("2001:db8::2".parse().unwrap());
        for r in [nat, plain] {
            assert_eq!(RelayIp::try_from(&v1::RelayIp::from(&r)), Ok(r));
        }
        assert!(v1::RelayIp::from(&plain).advertised_ip.is_empty());
        let mixed = v1::RelayIp {
            ip: ip_to_bytes(nat.ip),
            advertised_ip: ip_to_bytes(plain.ip),
        };
        assert!(RelayIp::try_from(&mixed).is_err());
    }

    #[test]
    fn every_table_change_round_trips() {
        let id = AllocationId(7);
        let changes = [
            TableChange::AllocationAdd {
                id,
                tuple: tuple(),
                relays: vec!["192.0.2.1:50000".parse().unwrap()],
                deadline: Millis(9),
                bandwidth: 1000,
                user: "u".into(),
                username: "1700000000:u".into(),
                dont_fragment: true,
            },
            TableChange::AllocationRefresh {
                id,
                deadline: Millis(10),
            },
            TableChange::AllocationRemove { id },
            TableChange::PermissionSet {
                id,
                peer: "203.0.113.9".parse().unwrap(),
                deadline: Millis(11),
            },
            TableChange::PermissionRemove {
                id,
                peer: "2001:db8::9".parse().unwrap(),
            },
            TableChange::ChannelSet {
                id,
                channel: 0x4001,
                peer: "203.0.113.9:7".parse().unwrap(),
                deadline: Millis(12),
                confirmed: true,
            },
            TableChange::ChannelRemove {
                id,
                channel: 0x4001,
            },
        ];
        for c in changes {
            let worker = 3;
            let back = table_change_from_api(&table_change_to_api(&c, worker, at()), at()).unwrap();
            assert_eq!(back, (c.clone(), worker));
            assert_eq!(back.0.allocation(), id);
        }
    }

    #[test]
    fn snapshots_and_bind_errors_round_trip() {
        let s = AllocationSnapshot {
            id: AllocationId(5),
            worker: 1,
            tuple: tuple(),
            relays: vec!["192.0.2.1:50000".parse().unwrap()],
            deadline: Millis(99),
            bandwidth: 0,
            user: "u".into(),
            username: "u".into(),
            dont_fragment: false,
            permissions: vec![("203.0.113.9".parse().unwrap(), Millis(5))],
            channels: vec![(0x4000, "203.0.113.9:7".parse().unwrap(), Millis(6))],
            usage: Usage::default(),
        };
        let api = snapshot_to_api(&s, at());
        assert_eq!(snapshot_from_api(&api, at()).unwrap(), s);
        for e in [
            BindError::AddressInUse,
            BindError::AddressNotAvailable,
            BindError::Invalid("x".into()),
            BindError::NoDataPlane,
        ] {
            let api = v1::BindError::from(&e);
            let back = BindError::from(&api);
            assert_eq!(std::mem::discriminant(&back), std::mem::discriminant(&e));
        }
    }

    #[test]
    fn bad_messages_are_errors_not_panics() {
        assert!(
            table_change_from_api(
                &v1::TableChange {
                    change: None,
                    worker_id: 0
                },
                at()
            )
            .is_err()
        );
        let bad = v1::TableChange {
            change: Some(table_change::Change::ChannelRemove(v1::ChannelRemove {
                allocation_id: 1,
                channel_number: 70_000,
            })),
            worker_id: 0,
        };
        assert_eq!(
            table_change_from_api(&bad, at()),
            Err(ConvertError::Invalid("channel_number"))
        );
        assert!(tuple_from_api(None).is_err());
    }
}
