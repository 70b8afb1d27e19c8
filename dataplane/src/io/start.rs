//! Starting and stopping the workers, and the handle the control plane drives them with.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use nix::sys::eventfd::{EfdFlags, EventFd};
use socket2::Socket;

use crate::core::counters::{Counters, WorkerCounters};
use crate::core::table::Denied;
use crate::io::conns::{ListenerKind, StreamShared};
use crate::io::slab::{tcp_listener, udp_socket};
use crate::io::worker::{Command, Worker, WorkerInit};
use crate::io::{mmsg, uring};
use crate::xdp::{FastPath, XdpState};
use crate::{
    AllocationSnapshot, Backend, BindError, ControlSink, DataPlaneConfig, FiveTuple, StreamListen,
    TableChange,
};

/// How long [`DataPlaneHandle::snapshot`] waits for a worker's answer.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(5);

/// The running data plane: its worker threads and their sockets.
///
/// Dropping it stops the workers as [`DataPlane::shutdown`] does.
#[derive(Debug)]
pub struct DataPlane {
    handle: DataPlaneHandle,
    threads: Vec<JoinHandle<()>>,
    local: Vec<SocketAddr>,
    stream_local: Vec<StreamListen>,
    backend: Backend,
}

/// A cheap, cloneable handle for the control plane: sends datagrams, binds relay sockets
/// and changes the relay table, each queued to the owning worker; reads counters and
/// snapshots. Every call returns without waiting for the worker, except
/// [`DataPlaneHandle::snapshot`].
#[derive(Clone)]
pub struct DataPlaneHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DataPlaneHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlaneHandle")
            .field("workers", &self.shared.queues.len())
            .finish_non_exhaustive()
    }
}

struct Queue {
    tx: mpsc::Sender<Command>,
    wake: Arc<EventFd>,
    /// Whether the worker has been woken and not yet drained its queue: a burst of
    /// commands costs one eventfd write, not one each.
    notified: Arc<AtomicBool>,
}

struct Shared {
    queues: Vec<Queue>,
    counters: Vec<Arc<Counters>>,
    denied: Arc<ArcSwap<Denied>>,
    /// The server's own listening addresses, UDP and TCP/TLS: never a peer.
    own: Vec<SocketAddr>,
    /// The XDP fast path, when it is on; else why it is off.
    xdp: FastPathState,
    /// Its control plane drained it (`ctl drain`): for readiness.
    drained: std::sync::atomic::AtomicBool,
    /// The worker the next adopted connection goes to (round robin).
    next_adopt: std::sync::atomic::AtomicUsize,
}

/// The XDP fast path of a data plane: not asked for, off (and why), or on.
enum FastPathState {
    NotAsked,
    Off(String),
    On(Arc<FastPath>),
}

impl FastPathState {
    /// The fast path, when it is on.
    fn on(&self) -> Option<&Arc<FastPath>> {
        match self {
            FastPathState::On(fp) => Some(fp),
            FastPathState::NotAsked | FastPathState::Off(_) => None,
        }
    }
}

impl DataPlane {
    /// Binds the listening sockets (one SO_REUSEPORT socket per worker on every
    /// address; a port 0 is chosen once and reused by every worker), picks the backend
    /// and starts the workers. Returns when every worker is ready to receive.
    pub fn start(cfg: DataPlaneConfig, sink: Arc<dyn ControlSink>) -> io::Result<DataPlane> {
        if cfg.listen.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no listening address",
            ));
        }
        let n = match cfg.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let backend = match cfg.backend {
            Backend::Auto => match uring::probe() {
                Ok(()) => Backend::Uring,
                Err(e) => {
                    tracing::info!(error = %e, "io_uring unusable, falling back to recvmmsg/sendmmsg");
                    Backend::Mmsg
                }
            },
            Backend::Uring => {
                uring::probe().map_err(|e| {
                    io::Error::new(e.kind(), format!("io_uring backend unusable: {e}"))
                })?;
                Backend::Uring
            }
            Backend::Mmsg => Backend::Mmsg,
        };
        tracing::info!(?backend, workers = n, "data plane I/O backend");

        let mut per_worker: Vec<Vec<Socket>> = (0..n).map(|_| Vec::new()).collect();
        let mut local = Vec::with_capacity(cfg.listen.len());
        let inherited = cfg.inherited.clone();
        for (index, &addr) in cfg.listen.iter().enumerate() {
            let mut actual = addr;
            for (worker, socks) in per_worker.iter_mut().enumerate() {
                let s = match inherited
                    .as_ref()
                    .and_then(|i| i.take_listen(index, worker))
                {
                    Some(s) => s,
                    None => udp_socket(actual, true, cfg.socket_buffer)?,
                };
                if actual.port() == 0 {
                    actual = s.local_addr()?.as_socket().ok_or_else(|| {
                        io::Error::other("listening socket without an IP address")
                    })?;
                }
                socks.push(s);
            }
            local.push(actual);
        }

        let nat_groups = nat_groups(&local, cfg.alt_ip)?;
        let mut companions: Vec<Vec<Socket>> = (0..n).map(|_| Vec::new()).collect();
        for addr in nat_groups.iter().flat_map(|g| g.iter().skip(1)) {
            for socks in companions.iter_mut() {
                let s = udp_socket(*addr, true, cfg.socket_buffer).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot bind the NAT discovery address {addr} (alt_ip): {e}"),
                    )
                })?;
                socks.push(s);
            }
        }
        if !nat_groups.is_empty() {
            tracing::info!(groups = ?nat_groups, "NAT behaviour discovery (RFC 5780) on");
        }

        let mut stream_socks: Vec<Vec<(Socket, ListenerKind)>> =
            (0..n).map(|_| Vec::new()).collect();
        let mut stream_local = Vec::with_capacity(cfg.streams.len());
        for (index, l) in cfg.streams.iter().enumerate() {
            if l.tls && cfg.tls.is_none() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "TLS listener {} without a TLS configuration (certificate)",
                        l.addr
                    ),
                ));
            }
            let kind = ListenerKind {
                tls: l.tls,
                proxy: l.proxy_protocol,
            };
            let mut actual = l.addr;
            for (worker, socks) in stream_socks.iter_mut().enumerate() {
                let s = match inherited
                    .as_ref()
                    .and_then(|i| i.take_stream(index, worker))
                {
                    Some(s) => s,
                    None => tcp_listener(actual, 1024).map_err(|e| {
                        io::Error::new(e.kind(), format!("cannot listen on TCP {actual}: {e}"))
                    })?,
                };
                if actual.port() == 0 {
                    actual = s.local_addr()?.as_socket().ok_or_else(|| {
                        io::Error::other("listening socket without an IP address")
                    })?;
                }
                socks.push((s, kind));
            }
            stream_local.push(StreamListen { addr: actual, ..*l });
        }
        let streams = Arc::new(StreamShared::new(
            cfg.tls.clone(),
            cfg.stream_limits,
            cfg.legacy_channel_numbers,
        ));

        // Every listening address of this data plane, UDP and TCP/TLS (which may have
        // ports of their own): a Send indication or ChannelData to one is never relayed.
        let own: Vec<SocketAddr> = local
            .iter()
            .copied()
            .chain(stream_local.iter().map(|l| l.addr))
            .chain(nat_groups.iter().flat_map(|g| g.iter().skip(1).copied()))
            .collect();
        let denied = Arc::new(ArcSwap::from_pointee(Denied::new(
            cfg.denied_peers.iter().chain(&own).copied(),
        )));
        let xdp = if cfg.xdp.interfaces.is_empty() {
            FastPathState::NotAsked
        } else {
            match FastPath::start(&cfg.xdp) {
                Ok(fp) => match fp.set_denied(&denied.load()) {
                    Ok(()) => FastPathState::On(Arc::new(fp)),
                    Err(e) => FastPathState::Off(e.to_string()),
                },
                Err(e) => FastPathState::Off(e.to_string()),
            }
        };
        if let FastPathState::Off(why) = &xdp {
            tracing::warn!(reason = %why, "the XDP fast path is off: relaying on the socket path only");
        }
        let cores = if cfg.pin {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };

        let mut queues = Vec::with_capacity(n);
        let mut counters = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        let mut readies = Vec::with_capacity(n);
        for (id, ((listen, listen_streams), companions)) in per_worker
            .into_iter()
            .zip(stream_socks)
            .zip(companions)
            .enumerate()
        {
            let (tx, rx) = mpsc::channel();
            let wake = Arc::new(EventFd::from_flags(
                EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC,
            )?);
            let ctr = Arc::new(Counters::default());
            let (ready_tx, ready_rx) = mpsc::sync_channel(1);
            let notified = Arc::new(AtomicBool::new(false));
            let init = WorkerInit {
                id,
                listen,
                companions,
                nat_groups: nat_groups.clone(),
                rx,
                notified: Arc::clone(&notified),
                sink: Arc::clone(&sink),
                denied: Arc::clone(&denied),
                ctr: Arc::clone(&ctr),
                buffers: cfg.socket_buffer,
                legacy_channels: cfg.legacy_channel_numbers,
                hairpin: cfg.hairpin,
                binding_limit: cfg.binding_limit,
                listen_streams,
                streams: Arc::clone(&streams),
                fast_path: xdp.on().cloned(),
                inherited: inherited.clone(),
            };
            let core_id = (!cores.is_empty()).then(|| cores[id % cores.len()]);
            let worker_wake = Arc::clone(&wake);
            let spawned = std::thread::Builder::new()
                .name(format!("turnpike-dp-{id}"))
                .spawn(move || {
                    if let Some(c) = core_id
                        && !core_affinity::set_for_current(c)
                    {
                        tracing::warn!(worker = id, core = c.id, "could not pin worker");
                    }
                    let core = match Worker::new(init) {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let r = match backend {
                        Backend::Uring => uring::run(core, worker_wake, ready_tx),
                        _ => mmsg::run(core, worker_wake, ready_tx),
                    };
                    if let Err(e) = r {
                        tracing::error!(worker = id, error = %e, "data plane worker failed");
                    }
                });
            let thread = match spawned {
                Ok(t) => t,
                Err(e) => {
                    stop(&queues, threads);
                    return Err(e);
                }
            };
            queues.push(Queue { tx, wake, notified });
            counters.push(ctr);
            threads.push(thread);
            readies.push(ready_rx);
        }
        for r in readies {
            let res = r
                .recv()
                .unwrap_or_else(|_| Err(io::Error::other("data plane worker exited during start")));
            if let Err(e) = res {
                stop(&queues, threads);
                return Err(e);
            }
        }
        Ok(DataPlane {
            handle: DataPlaneHandle {
                shared: Arc::new(Shared {
                    queues,
                    counters,
                    denied,
                    own,
                    xdp,
                    drained: std::sync::atomic::AtomicBool::new(false),
                    next_adopt: std::sync::atomic::AtomicUsize::new(0),
                }),
            },
            threads,
            local,
            stream_local,
            backend,
        })
    }

    /// A handle for the control plane.
    pub fn handle(&self) -> DataPlaneHandle {
        self.handle.clone()
    }

    /// The listening addresses, port 0 resolved to the port chosen.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.local.clone()
    }

    /// The TCP and TLS listening addresses, port 0 resolved to the port chosen.
    pub fn stream_addrs(&self) -> Vec<StreamListen> {
        self.stream_local.clone()
    }

    /// The backend in use: [`Backend::Uring`] or [`Backend::Mmsg`].
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Stops the workers (each finishes its batch, closes its sockets) and joins them.
    pub fn shutdown(mut self) {
        self.stop_workers();
    }

    fn stop_workers(&mut self) {
        let threads = std::mem::take(&mut self.threads);
        stop(&self.handle.shared.queues, threads);
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

fn stop(queues: &[Queue], threads: Vec<JoinHandle<()>>) {
    for q in queues {
        let _ = q.tx.send(Command::Shutdown);
        let _ = q.wake.write(1);
    }
    for t in threads {
        let _ = t.join();
    }
}

impl DataPlaneHandle {
    fn push(&self, worker: usize, cmd: Command) -> Result<(), Command> {
        let Some(q) = self.shared.queues.get(worker) else {
            return Err(cmd);
        };
        q.tx.send(cmd).map_err(|e| e.0)?;
        if !q.notified.swap(true, Ordering::SeqCst) {
            // A failed wake means the counter is saturated: the worker is awake anyway.
            let _ = q.wake.write(1);
        }
        Ok(())
    }

    /// Records whether its control plane drained it (new allocations arriving here are
    /// redirected or refused by the control plane; this is for readiness).
    pub fn set_drained(&self, drained: bool) {
        self.shared.drained.store(drained, Ordering::Relaxed);
    }

    /// Whether its control plane drained it, as last told.
    pub fn drained(&self) -> bool {
        self.shared.drained.load(Ordering::Relaxed)
    }

    /// Hands a TURN connection over to a worker (round robin), as if that worker had
    /// accepted it on a TCP (`tls`: TLS) listener: the front door's route to TURN.
    /// Nothing of it must have been read (a peek is fine). The worker applies its
    /// connection limits as to any connection.
    pub fn adopt_stream(&self, sock: std::net::TcpStream, tls: bool) -> io::Result<()> {
        let n = self.shared.queues.len().max(1);
        let worker = self.shared.next_adopt.fetch_add(1, Ordering::Relaxed) % n;
        let sock = Socket::from(sock);
        self.push(worker, Command::Adopt { sock, tls })
            .map_err(|_| io::Error::other("the data plane is stopped"))
    }

    /// How many workers there are.
    pub fn workers(&self) -> usize {
        self.shared.queues.len()
    }

    /// Sends a control-plane answer to `tuple.client` from the listening socket on
    /// `tuple.server` of `worker`.
    pub fn send(&self, worker: usize, tuple: FiveTuple, data: Vec<u8>) {
        if self.push(worker, Command::Send { tuple, data }).is_err() {
            tracing::debug!(worker, "send to a missing or stopped worker dropped");
        }
    }

    /// Binds UDP relay sockets on `relays` (all or none) on `worker`, for the allocation
    /// of `tuple` that a later [`TableChange::AllocationAdd`] installs; `done` is called
    /// from the worker with the outcome. Sockets not claimed within 30 s are closed.
    pub fn bind(
        &self,
        worker: usize,
        tuple: FiveTuple,
        relays: Vec<SocketAddr>,
        done: Box<dyn FnOnce(Result<(), BindError>) + Send>,
    ) {
        self.bind_for(worker, Some(tuple), relays, done);
    }

    /// Binds UDP relay sockets on `relays` (each on its own) on `worker` in advance, for
    /// the pool: a later [`TableChange::AllocationAdd`] naming their addresses claims
    /// them, whatever its 5-tuple. Pooled sockets stay until [`Self::clear_pool`].
    pub fn bind_pool(
        &self,
        worker: usize,
        relays: Vec<SocketAddr>,
        done: Box<dyn FnOnce(Result<(), BindError>) + Send>,
    ) {
        self.bind_for(worker, None, relays, done);
    }

    /// Closes every worker's pooled relay sockets (a control plane that reserved their
    /// ports is gone; the next one fills the pools again).
    pub fn clear_pool(&self) {
        for w in 0..self.workers() {
            let _ = self.push(w, Command::ClearPool);
        }
    }

    /// How the workers answer the first, unauthenticated Allocate of a handshake: with
    /// the control plane's 401 (`Some`, from the control plane), or by punting it.
    pub fn set_challenge(&self, c: Option<&turnpike_plane::Challenge>) {
        let c = c.map(|c| Arc::new(crate::core::Challenger::new(c)));
        for w in 0..self.workers() {
            let _ = self.push(w, Command::Challenge(c.clone()));
        }
    }

    fn bind_for(
        &self,
        worker: usize,
        tuple: Option<FiveTuple>,
        relays: Vec<SocketAddr>,
        done: Box<dyn FnOnce(Result<(), BindError>) + Send>,
    ) {
        if let Err(Command::Bind { done, .. }) = self.push(
            worker,
            Command::Bind {
                tuple,
                relays,
                done,
            },
        ) {
            done(Err(BindError::Invalid(format!(
                "no running worker {worker}"
            ))));
        }
    }

    /// Applies table changes, each on the worker that owns its allocation (the worker
    /// every change carries: the one its allocation's AllocationAdd named). Changes for a
    /// worker that does not exist are dropped (and logged).
    pub fn apply(&self, changes: impl IntoIterator<Item = (u32, TableChange)>) {
        let n = self.workers();
        let mut per: Vec<Vec<TableChange>> = (0..n).map(|_| Vec::new()).collect();
        for (worker, c) in changes {
            match per.get_mut(worker as usize) {
                Some(v) => v.push(c),
                None => {
                    tracing::warn!(worker, change = ?c, "table change for a worker that does not exist: dropped")
                }
            }
        }
        for (w, changes) in per.into_iter().enumerate() {
            if !changes.is_empty() {
                let _ = self.push(w, Command::Apply(changes));
            }
        }
    }

    /// Every worker's counters, read without stopping it.
    pub fn counters(&self) -> Vec<WorkerCounters> {
        self.shared.counters.iter().map(|c| c.snapshot()).collect()
    }

    /// Every live allocation of every worker, with its permissions, channels, deadlines
    /// and usage. Waits for each worker to answer between two batches (at most a few
    /// seconds for one that does not).
    pub fn snapshot(&self) -> Vec<AllocationSnapshot> {
        let mut waiting = Vec::with_capacity(self.workers());
        for w in 0..self.workers() {
            let (tx, rx) = mpsc::channel();
            if self.push(w, Command::Snapshot(tx)).is_ok() {
                waiting.push(rx);
            }
        }
        let mut all = Vec::new();
        for rx in waiting {
            if let Ok(mut v) = rx.recv_timeout(SNAPSHOT_WAIT) {
                all.append(&mut v);
            }
        }
        all
    }

    /// Duplicates of every worker's listening and relay sockets, for the process that
    /// takes over from this one (`SIGUSR2`). This process keeps its own and goes on
    /// serving until it stops.
    pub fn handover(&self) -> io::Result<Vec<crate::WorkerSockets>> {
        let mut waiting = Vec::with_capacity(self.workers());
        for w in 0..self.workers() {
            let (tx, rx) = mpsc::channel();
            self.push(w, Command::Handover(tx))
                .map_err(|_| io::Error::other(format!("worker {w} has stopped")))?;
            waiting.push((w, rx));
        }
        let mut all = Vec::with_capacity(waiting.len());
        for (w, rx) in waiting {
            let socks = rx
                .recv_timeout(SNAPSHOT_WAIT)
                .map_err(|_| io::Error::other(format!("worker {w} did not hand its sockets")))??;
            all.push(socks);
        }
        Ok(all)
    }

    /// Stops reading the UDP sockets and accepting connections (the process that took
    /// over from this one reads them now); open TCP/TLS connections are served on.
    pub fn retire(&self) {
        for w in 0..self.workers() {
            let _ = self.push(w, Command::Retire);
        }
    }

    /// Starts reading the sockets inherited from the process this one upgrades, once
    /// the table they serve is in place.
    pub fn resume(&self) {
        for w in 0..self.workers() {
            let _ = self.push(w, Command::Resume);
        }
    }

    /// Replaces the peers never relayed to (the listening addresses, UDP and TCP/TLS,
    /// stay denied).
    pub fn set_denied_peers(&self, peers: Vec<SocketAddr>) {
        let d = Denied::new(peers.into_iter().chain(self.shared.own.iter().copied()));
        if let Some(fp) = self.shared.xdp.on()
            && let Err(e) = fp.set_denied(&d)
        {
            tracing::warn!(error = %e, "the XDP program's denied ports not updated");
        }
        self.shared.denied.store(Arc::new(d));
    }

    /// For an upgrade: pins the XDP program's links under `dir` for the new process
    /// (none when the fast path is off).
    pub fn xdp_pin_links(
        &self,
        dir: &std::path::Path,
    ) -> Result<Vec<(String, &'static str, std::path::PathBuf)>, crate::xdp::XdpError> {
        match self.shared.xdp.on() {
            Some(fp) => fp.pin_links(dir),
            None => Ok(Vec::new()),
        }
    }

    /// The upgrade failed: the XDP links stay with this process's program.
    pub fn xdp_unpin(&self) {
        if let Some(fp) = self.shared.xdp.on() {
            fp.unpin();
        }
    }

    /// For the process that takes over: swaps its XDP program into the links the old
    /// one pinned (its maps are filled by then); how many.
    pub fn xdp_take_over(&self) -> Result<usize, crate::xdp::XdpError> {
        match self.shared.xdp.on() {
            Some(fp) => fp.take_over(),
            None => Ok(0),
        }
    }

    /// The XDP fast path: the interfaces it is attached to, or why it is off.
    pub fn xdp_status(&self) -> XdpState {
        match &self.shared.xdp {
            FastPathState::NotAsked => XdpState::NotAsked,
            FastPathState::Off(why) => XdpState::Off(why.clone()),
            FastPathState::On(fp) => XdpState::On(fp.attached().to_vec()),
        }
    }

    /// What the XDP program relayed and passed, when it is on.
    pub fn xdp_stats(&self) -> Option<crate::xdp::XdpStats> {
        self.shared.xdp.on().map(|fp| fp.stats())
    }
}

/// The RFC 5780 groups for the listening addresses `local` with the alternate IP
/// `alt`: [IP1:P1, IP1:P2, IP2:P1, IP2:P2] with P2 = P1 + 1 for every listening address
/// of `alt`'s family. A wildcard listening address cannot say which address a response
/// leaves from (RESPONSE-ORIGIN), so it gets none; an `alt` that fits no listening
/// address is a configuration error.
fn nat_groups(
    local: &[SocketAddr],
    alt: Option<std::net::IpAddr>,
) -> io::Result<Vec<crate::core::table::NatGroup>> {
    let Some(alt) = alt else {
        return Ok(Vec::new());
    };
    let groups: Vec<_> = local
        .iter()
        .filter(|a| !a.ip().is_unspecified() && a.is_ipv4() == alt.is_ipv4() && a.ip() != alt)
        .filter_map(|&a| {
            let p2 = a.port().checked_add(1)?;
            Some([
                a,
                SocketAddr::new(a.ip(), p2),
                SocketAddr::new(alt, a.port()),
                SocketAddr::new(alt, p2),
            ])
        })
        .collect();
    // A companion on a listening address would join that address's SO_REUSEPORT group.
    if let Some(a) = groups
        .iter()
        .flat_map(|g| g.iter().skip(1))
        .find(|a| local.contains(a))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("alt_ip {alt}: the NAT discovery address {a} is also a listening address"),
        ));
    }
    if groups.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "alt_ip {alt}: NAT behaviour discovery needs a UDP listening address of the same \
                 family that is not a wildcard, not {alt} itself, and whose port is below 65535"
            ),
        ));
    }
    Ok(groups)
}
