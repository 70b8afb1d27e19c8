//! Thin wrappers around the socket calls the standard library and socket2 do not offer:
//! forced buffer sizes, UDP GSO, and the raw socket-address bytes that `recvmmsg`,
//! `sendmmsg` and io_uring's `RecvMsgMulti` read and write.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};

/// Room for one socket address as the kernel writes it (`sockaddr_in6` is 28 bytes).
pub(crate) const NAME_LEN: usize = 32;

/// A socket address in the kernel's layout, 8-byte aligned so that it may be handed to
/// the kernel as a `sockaddr` directly.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(8))]
pub(crate) struct RawName(pub(crate) [u8; NAME_LEN]);

const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;

/// `UDP_SEGMENT` (linux/udp.h): the GSO segment size, as a socket option or a cmsg.
pub(crate) use libc::UDP_SEGMENT;
use libc::{SO_RCVBUFFORCE, SO_SNDBUFFORCE};

/// Reads a socket address the kernel wrote (`sockaddr_in` or `sockaddr_in6`) from bytes.
/// IPv4-mapped IPv6 addresses are returned as IPv4.
pub(crate) fn parse_name(b: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*b.first()?, *b.get(1)?]);
    let port = u16::from_be_bytes([*b.get(2)?, *b.get(3)?]);
    match family {
        AF_INET => {
            let ip: [u8; 4] = b.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
        }
        AF_INET6 => {
            let flow: [u8; 4] = b.get(4..8)?.try_into().ok()?;
            let ip: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            let scope: [u8; 4] = b.get(24..28)?.try_into().ok()?;
            let ip = Ipv6Addr::from(ip);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    port,
                    u32::from_ne_bytes(flow),
                    u32::from_ne_bytes(scope),
                )),
            })
        }
        _ => None,
    }
}

/// Writes `addr` in the kernel's layout; returns the length to pass as `msg_namelen`.
pub(crate) fn write_name(addr: &SocketAddr, out: &mut RawName) -> u32 {
    let b = &mut out.0;
    b.fill(0);
    match addr {
        SocketAddr::V4(a) => {
            b[0..2].copy_from_slice(&AF_INET.to_ne_bytes());
            b[2..4].copy_from_slice(&a.port().to_be_bytes());
            b[4..8].copy_from_slice(&a.ip().octets());
            16
        }
        SocketAddr::V6(a) => {
            b[0..2].copy_from_slice(&AF_INET6.to_ne_bytes());
            b[2..4].copy_from_slice(&a.port().to_be_bytes());
            b[4..8].copy_from_slice(&a.flowinfo().to_ne_bytes());
            b[8..24].copy_from_slice(&a.ip().octets());
            b[24..28].copy_from_slice(&a.scope_id().to_ne_bytes());
            28
        }
    }
}

fn setsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `fd` is a live descriptor for the duration of the borrow, and the option
    // value is a plain int whose address and size are passed together.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets both socket buffers to `bytes`, past `net.core.{r,w}mem_max` when we may
/// (`CAP_NET_ADMIN`), else as far as the sysctls allow.
pub(crate) fn set_buffers(sock: &socket2::Socket, bytes: usize) {
    if bytes == 0 {
        return;
    }
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let fd = std::os::fd::AsFd::as_fd(sock);
    if setsockopt_int(fd, libc::SOL_SOCKET, SO_RCVBUFFORCE, v).is_err() {
        let _ = sock.set_recv_buffer_size(bytes);
    }
    if setsockopt_int(fd, libc::SOL_SOCKET, SO_SNDBUFFORCE, v).is_err() {
        let _ = sock.set_send_buffer_size(bytes);
    }
}

fn getsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is live; `v` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut v).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether the kernel knows UDP GSO on this socket (Linux 4.18+).
pub(crate) fn gso_supported(fd: BorrowedFd<'_>) -> bool {
    getsockopt_int(fd, libc::SOL_UDP, UDP_SEGMENT).is_ok()
}

/// Sends every datagram of this socket with the DF bit set and no local fragmentation
/// (RFC 8656 §7.2 DONT-FRAGMENT): `IP_MTU_DISCOVER = IP_PMTUDISC_DO` on IPv4,
/// `IPV6_DONTFRAG` on IPv6 (which has no DF bit: the sender just never fragments).
pub(crate) fn set_dont_fragment(fd: BorrowedFd<'_>, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1)
    } else {
        setsockopt_int(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
    }
}

/// Whether [`set_dont_fragment`] is in effect on this socket.
#[cfg(test)]
pub(crate) fn dont_fragment(fd: BorrowedFd<'_>, ipv6: bool) -> io::Result<bool> {
    Ok(if ipv6 {
        getsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG)? == 1
    } else {
        getsockopt_int(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER)? == libc::IP_PMTUDISC_DO
    })
}

/// Space for one `UDP_SEGMENT` control message (a u16 value), 8-byte aligned.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(8))]
pub(crate) struct GsoCmsg(pub(crate) [u8; GSO_CMSG_SPACE]);

/// `CMSG_SPACE(sizeof(u16))` on 64-bit Linux: a 16-byte header and the value padded to 8.
pub(crate) const GSO_CMSG_SPACE: usize = 24;

impl GsoCmsg {
    /// Fills in a `UDP_SEGMENT` control message for segments of `size` bytes; returns the
    /// length to pass as `msg_controllen`.
    pub(crate) fn set(&mut self, size: u16) -> usize {
        let b = &mut self.0;
        b.fill(0);
        // struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; } then data.
        let cmsg_len = (16 + 2) as u64;
        b[0..8].copy_from_slice(&cmsg_len.to_ne_bytes());
        b[8..12].copy_from_slice(&libc::SOL_UDP.to_ne_bytes());
        b[12..16].copy_from_slice(&UDP_SEGMENT.to_ne_bytes());
        b[16..18].copy_from_slice(&size.to_ne_bytes());
        GSO_CMSG_SPACE
    }
}

/// A zeroed `msghdr`.
pub(crate) fn empty_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is plain old data (pointers and integers); all-zero is its empty value.
    unsafe { std::mem::zeroed() }
}

/// A zeroed `mmsghdr`.
pub(crate) fn empty_mmsghdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is plain old data; all-zero is its empty value.
    unsafe { std::mem::zeroed() }
}

/// An empty `iovec`.
pub(crate) fn empty_iovec() -> libc::iovec {
    libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }
}

/// `recvmmsg` without blocking. Returns the number of messages received (0 when the
/// socket is drained).
///
/// # Safety
///
/// Every `mmsghdr` must point at names and iovecs that are valid for writes for the
/// duration of the call.
pub(crate) unsafe fn recvmmsg(fd: BorrowedFd<'_>, hdrs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    let n = libc::c_uint::try_from(hdrs.len()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: the caller guarantees the buffers; the header array is valid for `n`.
    let rc = unsafe {
        libc::recvmmsg(
            fd.as_raw_fd(),
            hdrs.as_mut_ptr(),
            n,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if rc >= 0 {
        Ok(rc as usize)
    } else {
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => Ok(0),
            _ => Err(e),
        }
    }
}

/// `sendmmsg` without blocking. Returns how many messages were sent (at least one), or
/// the error of the first.
///
/// # Safety
///
/// Every `mmsghdr` must point at names, iovecs, data and control messages that are valid
/// for reads for the duration of the call.
pub(crate) unsafe fn sendmmsg(fd: BorrowedFd<'_>, hdrs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    let n = libc::c_uint::try_from(hdrs.len()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: the caller guarantees the buffers; the header array is valid for `n`.
    let rc = unsafe { libc::sendmmsg(fd.as_raw_fd(), hdrs.as_mut_ptr(), n, libc::MSG_DONTWAIT) };
    if rc >= 0 {
        Ok(rc as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `buf` from `fd` to `to` in one `sendmsg` without blocking: as UDP GSO segments
/// of `seg` bytes (the last may be shorter) when `buf` is longer than `seg`, else as one
/// datagram. Returns the bytes sent.
pub(crate) fn send_segments(
    fd: BorrowedFd<'_>,
    to: &SocketAddr,
    buf: &[u8],
    seg: usize,
) -> io::Result<usize> {
    let mut name = RawName::default();
    let namelen = write_name(to, &mut name);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cmsg = GsoCmsg::default();
    let mut hdr = empty_msghdr();
    hdr.msg_name = name.0.as_mut_ptr().cast();
    hdr.msg_namelen = namelen;
    hdr.msg_iov = &raw mut iov;
    hdr.msg_iovlen = 1;
    if buf.len() > seg {
        let size = u16::try_from(seg)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment too large"))?;
        hdr.msg_control = cmsg.0.as_mut_ptr().cast();
        hdr.msg_controllen = cmsg.set(size);
    }
    // SAFETY: the header points at `name`, `iov` (over `buf`) and `cmsg`, all alive and
    // unmoved for the duration of the call; the kernel only reads them.
    let rc = unsafe { libc::sendmsg(fd.as_raw_fd(), &raw const hdr, libc::MSG_DONTWAIT) };
    if rc >= 0 {
        Ok(rc as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in [
            "127.0.0.1:3478"
                .parse::<SocketAddr>()
                .unwrap_or_else(|_| unreachable!()),
            "[2001:db8::1]:9".parse().unwrap_or_else(|_| unreachable!()),
        ] {
            let mut raw = RawName::default();
            let len = write_name(&a, &mut raw) as usize;
            assert_eq!(parse_name(&raw.0[..len]), Some(a));
        }
        let mut raw = RawName::default();
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:5"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        write_name(&mapped, &mut raw);
        assert_eq!(parse_name(&raw.0), "10.0.0.1:5".parse().ok());
        assert_eq!(parse_name(&[0u8; 3]), None);
    }
}

/// `union bpf_attr` as `BPF_PROG_TEST_RUN` reads it (`test` member).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `struct xdp_md`, as a test run's context.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Runs an XDP program once on `frame`, as if it arrived on `ifindex` (0: no device);
/// returns its action and the frame it left.
pub(crate) fn bpf_test_run_xdp(
    prog: BorrowedFd<'_>,
    frame: &[u8],
    ifindex: u32,
) -> io::Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 512];
    let ctx = XdpMd {
        data_end: frame.len() as u32,
        ingress_ifindex: ifindex,
        ..XdpMd::default()
    };
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ..TestRunAttr::default()
    };
    if ifindex != 0 {
        attr.ctx_size_in = std::mem::size_of::<XdpMd>() as u32;
        attr.ctx_in = &ctx as *const XdpMd as u64;
    }
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed; the buffers it
    // points to (`frame`, `out`, `ctx`) outlive the call and have the sizes given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok((attr.retval, out))
}

/// Returns the allocator's free memory to the kernel (glibc keeps what a burst freed,
/// e.g. a flood's queued answers, in its arenas: RSS would never come down). Elsewhere a
/// no-op.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims glibc's own arenas, under their locks; it
    // takes no pointer and frees nothing that is in use.
    unsafe {
        libc::malloc_trim(0);
    }
}
