//! Binary upgrade without loss: `SIGUSR2` to `turnpike serve`.
//!
//! The running process (the old one) starts the binary found at its own path with its
//! own arguments and hands it, over a Unix socket pair (`SOCK_SEQPACKET`, the new
//! process's end named by `TURNPIKE_UPGRADE_FD`):
//!
//! 1. a header: the Admin token, the generated dev credential if there is one, the
//!    nonce key (nonces the old process minted stay valid), the number of upgrades so far;
//! 2. every allocation as its table row (5-tuple, relayed addresses, remaining lifetimes,
//!    permissions, channels, credentials, usage);
//! 3. duplicates of the UDP listening sockets, the TCP/TLS listening sockets and the relay
//!    sockets (`SCM_RIGHTS`).
//!
//! From the moment it takes its state, the old process answers no request (its clients
//! retransmit to the new one: STUN retransmits after 500 ms), so no allocation changes
//! behind the copy; it keeps relaying. The new process starts with the inherited sockets
//! instead of binding new ones, its control plane takes over the allocations, and its data
//! plane gets them back as a restarted data plane does (bound on the same relayed
//! addresses: the inherited sockets, with what their receive buffers hold). When its
//! table is in place it reports ready; the old process then stops reading and exits. Both
//! processes read the same sockets until then, so a datagram is read by one of them and
//! relayed: none is lost.
//!
//! If the new process exits, reports an error, or is not ready within
//! [`READY_WAIT`], the old one kills it, takes requests again and carries on (rollback),
//! and logs why.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use serde::{Deserialize, Serialize};
use socket2::Socket;
use turnpike_api::convert::{At, snapshot_from_api, snapshot_to_api};
use turnpike_api::v1;
use turnpike_dataplane::upgrade_link::{MAX_FDS, link_pair, recv_fds, send_fds, take_link};
use turnpike_dataplane::{AllocationSnapshot, Inherited, Traffic, Usage, WorkerSockets};

/// The environment variable naming the new process's end of the socket pair.
pub const ENV_FD: &str = "TURNPIKE_UPGRADE_FD";

/// Where the old process pins its XDP links for the new one (a BPF file system).
pub const BPF_FS: &str = "/sys/fs/bpf";

/// How long the old process waits for the new one to report ready.
pub const READY_WAIT: Duration = Duration::from_secs(30);

/// Upgrades this process has been through (the new one counts on from the old one's),
/// and upgrades that failed here: for the metrics.
pub static UPGRADES: AtomicU64 = AtomicU64::new(0);
/// Upgrades attempted by this process that failed (it carried on).
pub static UPGRADES_FAILED: AtomicU64 = AtomicU64::new(0);

/// The Admin, gRPC and metrics listeners of this process by configured address:
/// duplicates kept for an upgrade, and those a new process inherited until taken.
static KEPT_TCP: Mutex<Vec<(SocketAddr, std::net::TcpListener)>> = Mutex::new(Vec::new());
static INHERITED_TCP: Mutex<Vec<(SocketAddr, std::net::TcpListener)>> = Mutex::new(Vec::new());

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Keeps a duplicate of service listener `l` (configured as `addr`) for an upgrade.
pub fn keep_tcp(addr: SocketAddr, l: &tokio::net::TcpListener) {
    let dup = socket2::SockRef::from(l).try_clone();
    match dup {
        Ok(s) => locked(&KEPT_TCP).push((addr, s.into())),
        Err(e) => tracing::warn!(%addr, error = %e, "listener not kept for upgrades"),
    }
}

/// Closes the service listeners inherited and not taken (the configuration changed).
pub fn release_tcp() {
    locked(&INHERITED_TCP).clear();
}

/// The service listener configured as `addr` that the process this one upgrades handed
/// over, if any.
pub fn take_tcp(addr: SocketAddr) -> Option<std::net::TcpListener> {
    let mut v = locked(&INHERITED_TCP);
    let i = v.iter().position(|(a, _)| *a == addr)?;
    Some(v.swap_remove(i).1)
}

/// What the old process hands over besides its allocations and sockets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    /// The old process's id.
    pub pid: u32,
    /// Upgrades before this one.
    pub upgrades: u64,
    /// The Admin token in use.
    pub admin_token: String,
    /// The dev credential the old process generated (no user configured), if any.
    pub dev_users: Vec<(String, String)>,
    /// The nonce key.
    pub nonce_secret: Vec<u8>,
    /// Its data plane's id.
    pub data_plane: String,
    /// Its workers.
    pub workers: usize,
    /// Its UDP allocations: the new process is ready when its table holds as many.
    pub udp_allocations: usize,
    /// The XDP program's links it pinned, by interface with their mode: the new
    /// process swaps its program into them once its maps are filled.
    #[serde(default)]
    pub xdp_links: Vec<(String, String, std::path::PathBuf)>,
}

/// Where a handed socket goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Slot {
    /// UDP listening socket `index` of `worker`.
    Listen { index: usize, worker: usize },
    /// TCP/TLS listening socket `index` of `worker`.
    Stream { index: usize, worker: usize },
    /// A relay socket bound to this address.
    Relay { addr: SocketAddr },
    /// The Admin, gRPC or metrics listener configured as this address.
    Service { addr: SocketAddr },
}

/// What the new process received.
#[derive(Debug)]
pub struct Handed {
    /// The header.
    pub header: Header,
    /// Every allocation (deadlines on this process's clock).
    pub rows: Vec<AllocationSnapshot>,
    /// The sockets, for the data plane.
    pub inherited: Arc<Inherited>,
    /// The socket pair's end: [`Handed::ready`] reports on it.
    link: Socket,
}

fn send(link: &Socket, bytes: &[u8]) -> std::io::Result<()> {
    send_fds(link, bytes, &[])
}

fn usage_bytes(u: &Usage) -> [u8; 32] {
    let mut b = [0u8; 32];
    for (i, v) in [
        u.to_peer.packets,
        u.to_peer.bytes,
        u.to_client.packets,
        u.to_client.bytes,
    ]
    .into_iter()
    .enumerate()
    {
        b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    b
}

fn usage_from(b: &[u8]) -> Usage {
    let v = |i: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[i * 8..i * 8 + 8]);
        u64::from_le_bytes(x)
    };
    Usage {
        to_peer: Traffic {
            packets: v(0),
            bytes: v(1),
        },
        to_client: Traffic {
            packets: v(2),
            bytes: v(3),
        },
    }
}

/// Sends the state down the old process's end.
fn hand(
    link: &Socket,
    header: &Header,
    rows: &[AllocationSnapshot],
    socks: Vec<WorkerSockets>,
    at: At,
) -> anyhow::Result<()> {
    let mut h = vec![b'H'];
    h.extend(serde_json::to_vec(header)?);
    send(link, &h)?;
    for r in rows {
        let mut m = vec![b'A'];
        m.extend(usage_bytes(&r.usage));
        m.extend(snapshot_to_api(r, at).encode_to_vec());
        send(link, &m)?;
    }
    let mut handed: Vec<(Slot, Socket)> = Vec::new();
    for w in socks {
        for (index, s) in w.listen.into_iter().enumerate() {
            handed.push((
                Slot::Listen {
                    index,
                    worker: w.worker,
                },
                s,
            ));
        }
        for (index, s) in w.streams.into_iter().enumerate() {
            handed.push((
                Slot::Stream {
                    index,
                    worker: w.worker,
                },
                s,
            ));
        }
        for (addr, s) in w.relays {
            handed.push((Slot::Relay { addr }, s));
        }
    }
    for (addr, l) in locked(&KEPT_TCP).iter() {
        handed.push((Slot::Service { addr: *addr }, Socket::from(l.try_clone()?)));
    }
    for chunk in handed.chunks(MAX_FDS) {
        let slots: Vec<&Slot> = chunk.iter().map(|(s, _)| s).collect();
        let fds: Vec<_> = chunk.iter().map(|(_, s)| s.as_fd()).collect();
        let mut m = vec![b'F'];
        m.extend(serde_json::to_vec(&slots)?);
        send_fds(link, &m, &fds)?;
    }
    send(link, b"E")?;
    Ok(())
}

/// In the new process: takes what the old one hands over, when this process was started
/// by an upgrade (`TURNPIKE_UPGRADE_FD` set).
pub fn inherit(at: At) -> anyhow::Result<Option<Handed>> {
    let Some(link) = take_link(ENV_FD)? else {
        return Ok(None);
    };
    let mut header = None;
    let mut rows = Vec::new();
    let inherited = Arc::new(Inherited::new());
    loop {
        let (m, fds) = recv_fds(&link)?;
        match m.first() {
            Some(b'H') => header = Some(serde_json::from_slice::<Header>(&m[1..])?),
            Some(b'A') if m.len() >= 33 => {
                let state = v1::AllocationState::decode(&m[33..])?;
                let mut row = snapshot_from_api(&state, at)?;
                row.usage = usage_from(&m[1..33]);
                rows.push(row);
            }
            Some(b'F') => {
                let slots: Vec<Slot> = serde_json::from_slice(&m[1..])?;
                anyhow::ensure!(
                    slots.len() == fds.len(),
                    "{} sockets named, {} received",
                    slots.len(),
                    fds.len()
                );
                for (slot, fd) in slots.into_iter().zip(fds) {
                    let s = Socket::from(fd);
                    match slot {
                        Slot::Listen { index, worker } => inherited.add_listen(index, worker, s),
                        Slot::Stream { index, worker } => inherited.add_stream(index, worker, s),
                        Slot::Relay { addr } => inherited.add_relay(addr, s),
                        Slot::Service { addr } => {
                            locked(&INHERITED_TCP).push((addr, std::net::TcpListener::from(s)));
                        }
                    }
                }
            }
            Some(b'E') => break,
            _ => anyhow::bail!("unexpected message from the process being upgraded"),
        }
    }
    let header = header.ok_or_else(|| anyhow::anyhow!("no header from the old process"))?;
    UPGRADES.store(header.upgrades + 1, Ordering::Relaxed);
    Ok(Some(Handed {
        header,
        rows,
        inherited,
        link,
    }))
}

impl Handed {
    /// Tells the old process that this one serves now (it stops and exits).
    pub fn ready(&self) -> std::io::Result<()> {
        send(&self.link, b"R")
    }
}

/// The path of the running binary: after a package upgrade replaced the file, the new
/// one at the same path (`/proc/self/exe` then names the old, deleted, file).
fn own_binary() -> std::io::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let s = exe.to_string_lossy();
    Ok(match s.strip_suffix(" (deleted)") {
        Some(p) => p.into(),
        None => exe,
    })
}

/// In the old process: starts the new binary and hands it `header`, `rows` and
/// `socks`; returns the new process's id once it reports ready. On failure the new
/// process has been stopped and the error says why.
pub fn start_successor(
    header: &Header,
    rows: &[AllocationSnapshot],
    socks: Vec<WorkerSockets>,
    at: At,
) -> anyhow::Result<u32> {
    let (mine, theirs) = link_pair()?;
    let theirs_fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
    let exe = own_binary()?;
    let mut child = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(ENV_FD, theirs_fd.to_string())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", exe.display()))?;
    drop(theirs);
    let pid = child.id();
    let result = (|| -> anyhow::Result<()> {
        hand(&mine, header, rows, socks, at)?;
        // Wait for its word, watching that it is still alive.
        let deadline = Instant::now() + READY_WAIT;
        let poll_ms = 200u64;
        loop {
            mine.set_read_timeout(Some(Duration::from_millis(poll_ms)))?;
            let got = match recv_fds(&mine) {
                Ok(m) => Some(m),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    None
                }
                Err(e) => return Err(e.into()),
            };
            if let Some((m, _)) = got {
                return match m.first() {
                    Some(b'R') => Ok(()),
                    Some(b'X') => Err(anyhow::anyhow!(
                        "the new process refused: {}",
                        String::from_utf8_lossy(&m[1..])
                    )),
                    _ => Err(anyhow::anyhow!(
                        "the new process exited before it was ready"
                    )),
                };
            }
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("the new process exited before it was ready ({status})");
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "the new process was not ready within {} s",
                    READY_WAIT.as_secs()
                );
            }
        }
    })();
    match result {
        Ok(()) => Ok(pid),
        Err(e) => {
            // Said plainly when it simply exited (a send to it then fails too; its end
            // closes a moment before it is reaped).
            let t = Instant::now();
            let mut exited = None;
            while exited.is_none() && t.elapsed() < Duration::from_secs(1) {
                exited = child.try_wait().ok().flatten();
                if exited.is_none() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
            match exited {
                Some(status) if !e.to_string().contains("exited") => Err(anyhow::anyhow!(
                    "the new process exited before it was ready ({status}): {e}"
                )),
                _ => Err(e),
            }
        }
    }
}
