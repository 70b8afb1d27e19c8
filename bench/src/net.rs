//! UDP sockets and batched I/O for the generator and the forwarder: recvmmsg into a
//! fixed buffer (with UDP GRO when asked), sendmmsg of many datagrams, and UDP GSO
//! sends of equal-size runs. IPv4 loopback only.

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::sys::socket::{
    self, ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrIn, sockopt,
};

/// Datagrams per recvmmsg / sendmmsg.
pub const BATCH: usize = 64;
/// Receive slot size without GRO (any datagram we relay fits).
const SLOT: usize = 2048;
/// Receive slot size with GRO (a coalesced super-datagram is at most 64 KiB).
const GRO_SLOT: usize = 65536;
/// Most segments in one GSO send (UDP_MAX_SEGMENTS is 64 on older kernels).
pub const MAX_GSO_SEGS: usize = 64;
/// Most bytes in one GSO send.
pub const MAX_GSO_BYTES: usize = 63 * 1024;

/// The IPv4 form of a loopback socket address.
pub fn v4(a: SocketAddr) -> Result<SocketAddrV4> {
    crate::check_loopback(a)?;
    match a {
        SocketAddr::V4(v) => Ok(v),
        SocketAddr::V6(_) => bail!("{a}: only IPv4 is supported"),
    }
}

/// A non-blocking UDP socket on `bind`, with `buffer` bytes of send and receive buffer
/// (forced past rmem_max/wmem_max when we may), GRO on if `gro`.
pub fn udp(bind: SocketAddr, buffer: usize, gro: bool) -> Result<UdpSocket> {
    let s = UdpSocket::bind(bind).with_context(|| format!("bind {bind}"))?;
    s.set_nonblocking(true)?;
    set_buffers(&s, buffer);
    if gro {
        socket::setsockopt(&s, sockopt::UdpGroSegment, &true).context("UDP_GRO")?;
    }
    Ok(s)
}

/// Sets SO_RCVBUF/SO_SNDBUF, forcing past the sysctl limits when privileged.
pub fn set_buffers(s: &impl AsFd, bytes: usize) {
    if bytes == 0 {
        return;
    }
    if socket::setsockopt(s, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = socket::setsockopt(s, sockopt::RcvBuf, &bytes);
    }
    if socket::setsockopt(s, sockopt::SndBufForce, &bytes).is_err() {
        let _ = socket::setsockopt(s, sockopt::SndBuf, &bytes);
    }
}

/// One received datagram (or GRO super-datagram): where it lies in the receive
/// buffer, its segment size (== len without GRO), and its source.
#[derive(Debug, Clone, Copy)]
pub struct Rx {
    pub off: usize,
    pub len: usize,
    pub seg: usize,
    pub from: SocketAddrV4,
}

/// recvmmsg into a buffer owned here.
#[derive(Debug)]
pub struct Receiver {
    buf: Vec<u8>,
    slot: usize,
    gro: bool,
    hdrs: MultiHeaders<SockaddrIn>,
    pub meta: Vec<Rx>,
}

impl Receiver {
    pub fn new(gro: bool) -> Receiver {
        let slot = if gro { GRO_SLOT } else { SLOT };
        Receiver {
            buf: vec![0u8; slot * BATCH],
            slot,
            gro,
            hdrs: MultiHeaders::preallocate(BATCH, None),
            meta: Vec::with_capacity(BATCH),
        }
    }

    /// One recvmmsg on `sock` (non-blocking); fills `meta`, returns how many arrived.
    pub fn recv(&mut self, sock: &impl AsRawFd) -> Result<usize> {
        let Receiver {
            buf,
            slot,
            gro,
            hdrs,
            meta,
        } = self;
        meta.clear();
        // nix leaves msg_controllen as the kernel wrote it, so headers that carry a
        // control buffer are made afresh for each call.
        let mut fresh;
        let h = if *gro {
            fresh = MultiHeaders::<SockaddrIn>::preallocate(BATCH, Some(nix::cmsg_space!(i32)));
            &mut fresh
        } else {
            hdrs
        };
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> = buf
            .chunks_mut(*slot)
            .map(|c| [IoSliceMut::new(c)])
            .collect();
        let res = socket::recvmmsg(
            sock.as_raw_fd(),
            h,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        );
        let it = match res {
            Ok(it) => it,
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => return Ok(0),
            // An ICMP error queued on the socket (e.g. a closed peer port): not ours
            // to fail on.
            Err(Errno::ECONNREFUSED) => return Ok(0),
            Err(e) => return Err(e).context("recvmmsg"),
        };
        for (i, m) in it.enumerate() {
            let mut seg = m.bytes;
            if *gro && let Ok(cm) = m.cmsgs() {
                for c in cm {
                    if let ControlMessageOwned::UdpGroSegments(s) = c
                        && s > 0
                    {
                        seg = s as usize;
                    }
                }
            }
            let Some(from) = m.address else { continue };
            meta.push(Rx {
                off: i * *slot,
                len: m.bytes,
                seg: seg.max(1),
                from: SocketAddrV4::from(from),
            });
        }
        Ok(meta.len())
    }

    /// The bytes of a received datagram.
    pub fn data(&self, rx: &Rx) -> &[u8] {
        self.buf.get(rx.off..rx.off + rx.len).unwrap_or(&[])
    }
}

/// sendmmsg of datagrams laid out by the caller.
#[derive(Debug)]
pub struct Sender {
    plain: MultiHeaders<SockaddrIn>,
    gso: MultiHeaders<SockaddrIn>,
}

impl Default for Sender {
    fn default() -> Self {
        Sender {
            plain: MultiHeaders::preallocate(BATCH, None),
            gso: MultiHeaders::preallocate(BATCH, Some(nix::cmsg_space!(u16))),
        }
    }
}

/// Outcome of a batched send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// This many messages went out.
    Messages(usize),
    /// The socket buffer is full.
    WouldBlock,
}

impl Sender {
    /// Sends each group of `iovs` as one message (to `to[i]`, or the connected peer
    /// when None), with UDP GSO of `gso` bytes per segment when given. At most
    /// [`BATCH`] groups.
    pub fn send(
        &mut self,
        sock: &impl AsRawFd,
        groups: &[&[IoSlice<'_>]],
        to: &[Option<SockaddrIn>],
        gso: Option<u16>,
    ) -> Result<Sent> {
        let n = groups.len().min(to.len()).min(BATCH);
        if n == 0 {
            return Ok(Sent::Messages(0));
        }
        let seg;
        let cmsgs: Vec<ControlMessage<'_>> = match gso {
            Some(s) => {
                seg = s;
                vec![ControlMessage::UdpGsoSegments(&seg)]
            }
            None => Vec::new(),
        };
        let hdrs = if gso.is_some() {
            &mut self.gso
        } else {
            &mut self.plain
        };
        match socket::sendmmsg(
            sock.as_raw_fd(),
            hdrs,
            groups[..n].iter(),
            &to[..n],
            &cmsgs,
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(r) => Ok(Sent::Messages(r.count())),
            Err(Errno::EAGAIN) | Err(Errno::ENOBUFS) => Ok(Sent::WouldBlock),
            // An ICMP port unreachable from an earlier datagram surfaces here.
            Err(Errno::ECONNREFUSED) => Ok(Sent::Messages(0)),
            Err(e) => Err(e).context("sendmmsg"),
        }
    }
}

/// Converts a loopback address for nix.
pub fn sockaddr(a: SocketAddrV4) -> SockaddrIn {
    SockaddrIn::from(a)
}
