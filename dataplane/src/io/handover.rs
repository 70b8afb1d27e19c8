//! Sockets carried from one process to the next across a binary upgrade (`SIGUSR2`).
//!
//! The old process's workers hand out duplicates of their listening and relay sockets
//! ([`crate::DataPlaneHandle::handover`]); the new process starts with them
//! ([`Inherited`] in [`crate::DataPlaneConfig`]): its workers take the listening sockets
//! instead of binding new ones, and a relay bind for an address it inherited takes that
//! socket. A datagram queued in a socket's receive buffer is read by whichever process
//! reads next: none is lost across the switch.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use socket2::{Domain, Socket, Type};

/// One worker's sockets, duplicated for a new process.
#[derive(Debug, Default)]
pub struct WorkerSockets {
    /// The worker.
    pub worker: usize,
    /// Its UDP listening sockets, in the order of the configured listening addresses.
    pub listen: Vec<Socket>,
    /// Its TCP/TLS listening sockets, in the order of the configured stream listeners.
    pub streams: Vec<Socket>,
    /// Its relay sockets (allocations' and pooled), with their local addresses.
    pub relays: Vec<(SocketAddr, Socket)>,
}

/// The sockets a new process inherited, taken as its workers start and its relays are
/// bound again.
#[derive(Debug, Default)]
pub struct Inherited {
    /// UDP listening sockets by (listening address index, worker).
    listen: Mutex<HashMap<(usize, usize), Socket>>,
    /// TCP/TLS listening sockets by (stream listener index, worker).
    streams: Mutex<HashMap<(usize, usize), Socket>>,
    /// Relay sockets by local address.
    relays: Mutex<HashMap<SocketAddr, Socket>>,
}

impl Inherited {
    /// Nothing inherited yet.
    pub fn new() -> Inherited {
        Inherited::default()
    }

    /// Adds UDP listening socket `index` of `worker`.
    pub fn add_listen(&self, index: usize, worker: usize, s: Socket) {
        lock(&self.listen).insert((index, worker), s);
    }

    /// Adds TCP/TLS listening socket `index` of `worker`.
    pub fn add_stream(&self, index: usize, worker: usize, s: Socket) {
        lock(&self.streams).insert((index, worker), s);
    }

    /// Adds a relay socket bound to `local`.
    pub fn add_relay(&self, local: SocketAddr, s: Socket) {
        lock(&self.relays).insert(local, s);
    }

    pub(crate) fn take_listen(&self, index: usize, worker: usize) -> Option<Socket> {
        lock(&self.listen).remove(&(index, worker))
    }

    pub(crate) fn take_stream(&self, index: usize, worker: usize) -> Option<Socket> {
        lock(&self.streams).remove(&(index, worker))
    }

    pub(crate) fn take_relay(&self, local: SocketAddr) -> Option<Socket> {
        lock(&self.relays).remove(&local)
    }

    /// How many relay sockets are still unclaimed.
    pub fn relays_left(&self) -> usize {
        lock(&self.relays).len()
    }

    /// Closes what nothing claimed (pooled sockets, allocations that ended meanwhile);
    /// returns how many relay sockets that was.
    pub fn release_unclaimed(&self) -> usize {
        lock(&self.listen).clear();
        lock(&self.streams).clear();
        let mut r = lock(&self.relays);
        let n = r.len();
        r.clear();
        n
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// At most this many descriptors travel in one message.
pub const MAX_FDS: usize = 200;

/// The largest message [`recv_fds`] takes.
const MAX_MESSAGE: usize = 64 << 10;

/// A Unix `SOCK_SEQPACKET` pair: this process's end (closed on exec) and the end a child
/// inherits across exec (name its descriptor to the child; close it here after the
/// spawn).
pub fn link_pair() -> io::Result<(Socket, Socket)> {
    let (mine, theirs) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None)?;
    mine.set_cloexec(true)?;
    theirs.set_cloexec(false)?;
    Ok((mine, theirs))
}

/// Sends one message with `fds` (at most [`MAX_FDS`]) attached.
pub fn send_fds(link: &Socket, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(
        link.as_raw_fd(),
        &[IoSlice::new(bytes)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// Receives one message and the descriptors attached to it (owned by the caller from
/// here on). An empty message is the other end closing.
pub fn recv_fds(link: &Socket) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, raw) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            link.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut raw = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                raw.extend(fds);
            }
        }
        (msg.bytes, raw)
    };
    // SAFETY: each descriptor was just installed in this process by the kernel
    // (SCM_RIGHTS); nothing else here knows or closes it.
    let fds = raw
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    buf.truncate(n);
    Ok((buf, fds))
}

/// This process's end of the link its parent named in environment variable `var`, if
/// any: taken once (a second call finds it already taken and returns an error). The
/// descriptor must be a Unix `SOCK_SEQPACKET` socket.
pub fn take_link(var: &str) -> io::Result<Option<Socket>> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Some(v) = std::env::var_os(var) else {
        return Ok(None);
    };
    let fd: RawFd = v
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|n| *n > 2)
        .ok_or_else(|| io::Error::other(format!("{var}: not a descriptor number")))?;
    if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Err(io::Error::other(format!("{var}: taken already")));
    }
    // SAFETY: only looked at (not owned) until it is known to be an open socket of the
    // expected type.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let kind = nix::sys::socket::getsockopt(&borrowed, nix::sys::socket::sockopt::SockType)
        .map_err(|e| io::Error::other(format!("{var}: descriptor {fd}: {e}")))?;
    if kind != nix::sys::socket::SockType::SeqPacket {
        return Err(io::Error::other(format!(
            "{var}: descriptor {fd} is not the upgrade link"
        )));
    }
    // SAFETY: an open socket our parent left us for this purpose (it closed its copy),
    // taken once (TAKEN above), and not used elsewhere in this process.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let s = Socket::from(owned);
    s.set_cloexec(true)?;
    Ok(Some(s))
}
