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

/// The gRPC form of a table change, for the data plane worker `worker` (carried by
/// AllocationAdd; the other changes are routed by allocation id).
pub fn table_change_to_api(change: &TableChange, worker: u32) -> v1::TableChange {
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
                deadline_unix_millis: deadline.0,
                bandwidth_limit_bytes_per_second: *bandwidth,
                user_id: user.clone(),
                dont_fragment: *dont_fragment,
                username: username.clone(),
            }),
        }),
        TableChange::AllocationRefresh { id, deadline } => {
            C::AllocationRefresh(v1::AllocationRefresh {
                allocation_id: id.0,
                deadline_unix_millis: deadline.0,
            })
        }
        TableChange::AllocationRemove { id } => C::AllocationRemove(v1::AllocationRemove {
            allocation_id: id.0,
        }),
        TableChange::PermissionSet { id, peer, deadline } => C::PermissionAdd(v1::PermissionAdd {
            allocation_id: id.0,
            permission: Some(v1::Permission {
                peer_ip: ip_to_bytes(*peer),
                deadline_unix_millis: deadline.0,
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
        } => C::ChannelAdd(v1::ChannelAdd {
            allocation_id: id.0,
            channel: Some(v1::Channel {
                channel_number: u32::from(*channel),
                peer: Some((*peer).into()),
                deadline_unix_millis: deadline.0,
            }),
        }),
        TableChange::ChannelRemove { id, channel } => C::ChannelRemove(v1::ChannelRemove {
            allocation_id: id.0,
            channel_number: u32::from(*channel),
        }),
    };
    v1::TableChange {
        change: Some(change),
    }
}

/// From the gRPC form: the change, and the worker an AllocationAdd names (0 for the
/// other changes).
pub fn table_change_from_api(c: &v1::TableChange) -> Result<(TableChange, u32), ConvertError> {
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
                    deadline: Millis(a.deadline_unix_millis),
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
                deadline: Millis(r.deadline_unix_millis),
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
                    deadline: Millis(perm.deadline_unix_millis),
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
                    deadline: Millis(c.deadline_unix_millis),
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

impl From<&AllocationSnapshot> for v1::AllocationState {
    fn from(s: &AllocationSnapshot) -> v1::AllocationState {
        v1::AllocationState {
            allocation: Some(v1::Allocation {
                allocation_id: s.id.0,
                worker_id: s.worker,
                five_tuple: Some((&s.tuple).into()),
                relay_addresses: s.relays.iter().map(|r| (*r).into()).collect(),
                deadline_unix_millis: s.deadline.0,
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
                    deadline_unix_millis: t.0,
                })
                .collect(),
            channels: s
                .channels
                .iter()
                .map(|(c, p, t)| v1::Channel {
                    channel_number: u32::from(*c),
                    peer: Some((*p).into()),
                    deadline_unix_millis: t.0,
                })
                .collect(),
        }
    }
}

impl TryFrom<&v1::AllocationState> for AllocationSnapshot {
    type Error = ConvertError;
    fn try_from(s: &v1::AllocationState) -> Result<AllocationSnapshot, ConvertError> {
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
            deadline: Millis(a.deadline_unix_millis),
            bandwidth: a.bandwidth_limit_bytes_per_second,
            user: a.user_id.clone(),
            username: a.username.clone(),
            dont_fragment: a.dont_fragment,
            permissions: s
                .permissions
                .iter()
                .map(|p| Ok((peer_ip(&p.peer_ip)?, Millis(p.deadline_unix_millis))))
                .collect::<Result<_, ConvertError>>()?,
            channels: s
                .channels
                .iter()
                .map(|c| {
                    Ok((
                        channel_number(c.channel_number)?,
                        socket(c.peer.as_ref(), "channel.peer")?,
                        Millis(c.deadline_unix_millis),
                    ))
                })
                .collect::<Result<_, ConvertError>>()?,
            usage: Usage::default(),
        })
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
            },
            TableChange::ChannelRemove {
                id,
                channel: 0x4001,
            },
        ];
        for c in changes {
            let worker = if matches!(c, TableChange::AllocationAdd { .. }) {
                3
            } else {
                0
            };
            let back = table_change_from_api(&table_change_to_api(&c, worker)).unwrap();
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
        let api = v1::AllocationState::from(&s);
        assert_eq!(AllocationSnapshot::try_from(&api).unwrap(), s);
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
        assert!(table_change_from_api(&v1::TableChange { change: None }).is_err());
        let bad = v1::TableChange {
            change: Some(table_change::Change::ChannelRemove(v1::ChannelRemove {
                allocation_id: 1,
                channel_number: 70_000,
            })),
        };
        assert_eq!(
            table_change_from_api(&bad),
            Err(ConvertError::Invalid("channel_number"))
        );
        assert!(tuple_from_api(None).is_err());
    }
}
