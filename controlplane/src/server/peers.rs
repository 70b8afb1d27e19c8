//! CreatePermission and ChannelBind: which peers a client may reach through its
//! allocation, checked against the allocation's families, the peer policy and the bounds
//! per allocation.

use std::net::{IpAddr, SocketAddr};

use turnpike_proto::attr::{self, ChannelNumber, XorPeerAddress};
use turnpike_proto::stun::Message;

use super::auth::Authed;
use super::refusal::{Note, Reject, reject};
use super::timers::Timer;
use super::{Allocation, Server};
use crate::policy::Verdict;
use crate::types::{AllocationId, Event, FiveTuple, Millis, Output, TableChange};

impl Server {
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

    pub(super) fn create_permission(
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

    pub(super) fn channel_bind(
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
            confirmed: false,
        }));
        self.respond_success(tuple, msg, auth, out, |_| Ok(()));
        Ok(())
    }
}
