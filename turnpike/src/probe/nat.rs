//! NAT behaviour discovery (RFC 5780 §4.3 and §4.4) against a server that offers it
//! (OTHER-ADDRESS in its Binding answers), as `turnutils_natdiscovery -m -f` does.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use turnpike_proto::attr::{ChangeRequest, OtherAddress, XorMappedAddress};
use turnpike_proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

/// What the probe learnt about the NAT between it and the server.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NatReport {
    /// Mapping behaviour: "endpoint-independent", "address-dependent" or
    /// "address-and-port-dependent".
    pub mapping: &'static str,
    /// Filtering behaviour, in the same words.
    pub filtering: &'static str,
    /// The server's OTHER-ADDRESS.
    pub other_address: String,
}

const WAIT: Duration = Duration::from_millis(1200);

/// One Binding transaction from `sock` to `to`: the answer, or `None` after [`WAIT`]
/// (the request sent twice).
fn binding(
    sock: &UdpSocket,
    to: SocketAddr,
    change: Option<ChangeRequest>,
) -> io::Result<Option<(SocketAddr, Option<SocketAddr>)>> {
    let tid = TransactionId(rand::random());
    let mut req = [0u8; 64];
    let mut w = MessageWriter::new(&mut req, Method::BINDING, Class::Request, tid)
        .map_err(|e| io::Error::other(format!("{e:?}")))?;
    if let Some(c) = change {
        w.add(&c).map_err(|e| io::Error::other(format!("{e:?}")))?;
    }
    let n = w.finish();
    let req = req.get(..n).unwrap_or_default();
    let start = Instant::now();
    let mut sent = 0;
    let mut buf = [0u8; 1500];
    while start.elapsed() < WAIT {
        if sent == 0 || (sent == 1 && start.elapsed() >= WAIT / 2) {
            sock.send_to(req, to)?;
            sent += 1;
        }
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let Ok((len, _)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let Ok(m) = Message::parse(buf.get(..len).unwrap_or_default()) else {
            continue;
        };
        if m.transaction_id() != tid || m.class() != Class::Success {
            continue;
        }
        let Some(mapped) = m.attr::<XorMappedAddress>().ok().flatten() else {
            continue;
        };
        let other = m.attr::<OtherAddress>().ok().flatten().map(|o| o.0);
        return Ok(Some((mapped.0, other)));
    }
    Ok(None)
}

/// Runs the mapping and filtering tests against `server`; `None` when the server
/// does not offer NAT behaviour discovery (or does not answer).
pub fn discover(server: SocketAddr) -> io::Result<Option<NatReport>> {
    let any: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // Mapping: the same local socket towards the primary address, the alternate IP on
    // the primary port, then the alternate IP and port (RFC 5780 §4.3).
    let sock = UdpSocket::bind(any)?;
    let Some((m1, Some(other))) = binding(&sock, server, None)? else {
        return Ok(None);
    };
    let Some((m2, _)) = binding(&sock, SocketAddr::new(other.ip(), server.port()), None)? else {
        return Ok(None);
    };
    let mapping = if m1 == m2 {
        "endpoint-independent"
    } else {
        match binding(&sock, other, None)? {
            Some((m3, _)) if m3 == m2 => "address-dependent",
            Some(_) => "address-and-port-dependent",
            None => return Ok(None),
        }
    };
    // Filtering: a fresh mapping, then answers asked from elsewhere (§4.4).
    let sock = UdpSocket::bind(any)?;
    if binding(&sock, server, None)?.is_none() {
        return Ok(None);
    }
    let both = ChangeRequest {
        change_ip: true,
        change_port: true,
    };
    let port = ChangeRequest {
        change_ip: false,
        change_port: true,
    };
    let filtering = if binding(&sock, server, Some(both))?.is_some() {
        "endpoint-independent"
    } else if binding(&sock, server, Some(port))?.is_some() {
        "address-dependent"
    } else {
        "address-and-port-dependent"
    };
    Ok(Some(NatReport {
        mapping,
        filtering,
        other_address: other.to_string(),
    }))
}
