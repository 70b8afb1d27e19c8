//! What both backends share around the sans-IO [`Core`]: the socket slab, the clock
//! read once per loop turn, the command queue from the handle, and acting on the core's
//! outputs (punts to the control plane, control-plane replies, closes, socket options).
//! A backend receives into its slots, calls [`Worker::on_datagram`], and sends the
//! [`Transmit`]s it gets back in its own batches.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::{Arc, mpsc};

use arc_swap::ArcSwap;
use socket2::{SockAddr, Socket};

use crate::core::Token;
use crate::core::counters::{Counters, bump, bump_set};
use crate::core::table::Denied;
use crate::core::{Core, CoreConfig, Output, Received, SLOT, Transmit};
use crate::io::conns::{ListenerKind, StreamShared};
use crate::io::slab::{Kind, Sockets};
use crate::io::sys;
use crate::{
    AllocationSnapshot, BindError, BindingLimit, ControlSink, FiveTuple, Millis, TableChange,
};

/// The data plane's clock (the process's monotonic [`turnpike_plane::Clock`]): the
/// workers read it once per loop turn.
pub(crate) fn unix_millis() -> Millis {
    turnpike_plane::Clock::new().now()
}

/// A socket change the backend must reflect in its poller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoOp {
    /// Start receiving on this socket.
    Register(Token),
    /// Stop receiving and call [`Sockets::release`] once the kernel holds no more
    /// reference to the socket's pending operations.
    Close(Token),
    /// Stop accepting on this listener for a while (accepts fail for lack of
    /// descriptors); a `Register` resumes it.
    Pause(Token),
    /// Stop reading this connection (its client sent its end of stream); it is still
    /// written to until it closes.
    StopReading(Token),
}

/// A request from the handle to a worker.
pub(crate) enum Command {
    /// Send a control-plane datagram to a client.
    Send { tuple: FiveTuple, data: Vec<u8> },
    /// Bind relay sockets: for the allocation of `tuple`, or for the pool (`None`).
    Bind {
        tuple: Option<FiveTuple>,
        relays: Vec<SocketAddr>,
        done: Box<dyn FnOnce(Result<(), BindError>) + Send>,
    },
    /// Apply table changes.
    Apply(Vec<TableChange>),
    /// Close the pooled relay sockets.
    ClearPool,
    /// How to answer unauthenticated Allocates (`None`: punt them).
    Challenge(Option<Arc<crate::core::Challenger>>),
    /// Report every allocation.
    Snapshot(mpsc::Sender<Vec<AllocationSnapshot>>),
    /// Duplicate the listening and relay sockets for a new process.
    Handover(mpsc::Sender<std::io::Result<crate::WorkerSockets>>),
    /// Start reading the sockets inherited from the process this one upgrades (its
    /// table is in place now).
    Resume,
    /// The process that took over from this one serves now: stop reading the UDP
    /// sockets and accepting connections; keep serving the open TCP/TLS connections
    /// (and their allocations' relay sockets) until they close.
    Retire,
    /// Serve a TURN connection the front door accepted and routed here (nothing of it
    /// read yet).
    Adopt { sock: Socket, tls: bool },
    /// Stop.
    Shutdown,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Send { tuple, data } => write!(f, "Send({tuple:?}, {} bytes)", data.len()),
            Command::Bind { tuple, relays, .. } => write!(f, "Bind({tuple:?}, {relays:?})"),
            Command::Apply(c) => write!(f, "Apply({} changes)", c.len()),
            Command::ClearPool => f.write_str("ClearPool"),
            Command::Challenge(c) => write!(f, "Challenge({})", c.is_some()),
            Command::Snapshot(_) => f.write_str("Snapshot"),
            Command::Handover(_) => f.write_str("Handover"),
            Command::Resume => f.write_str("Resume"),
            Command::Retire => f.write_str("Retire"),
            Command::Adopt { tls, .. } => write!(f, "Adopt(tls: {tls})"),
            Command::Shutdown => f.write_str("Shutdown"),
        }
    }
}

/// Everything a worker starts with.
pub(crate) struct WorkerInit {
    pub(crate) id: usize,
    pub(crate) listen: Vec<Socket>,
    /// NAT discovery companions of the listening sockets (Binding only, RFC 5780).
    pub(crate) companions: Vec<Socket>,
    /// The RFC 5780 groups the listening sockets and companions form.
    pub(crate) nat_groups: Vec<crate::core::table::NatGroup>,
    pub(crate) rx: mpsc::Receiver<Command>,
    /// Set by a producer that has written the wake eventfd; cleared before the queue is
    /// drained (see [`Worker::handle_commands`]).
    pub(crate) notified: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) sink: Arc<dyn ControlSink>,
    pub(crate) denied: Arc<ArcSwap<Denied>>,
    pub(crate) ctr: Arc<Counters>,
    pub(crate) buffers: usize,
    pub(crate) legacy_channels: bool,
    /// Deliver between this worker's allocations without the kernel (the hairpin).
    pub(crate) hairpin: bool,
    pub(crate) binding_limit: BindingLimit,
    /// TCP/TLS listening sockets (this worker's own SO_REUSEPORT ones).
    pub(crate) listen_streams: Vec<(Socket, ListenerKind)>,
    pub(crate) streams: Arc<StreamShared>,
    /// The XDP fast path, when it is on: the worker mirrors its table into its maps.
    pub(crate) fast_path: Option<Arc<crate::xdp::FastPath>>,
    /// Sockets handed over by the process this one upgrades.
    pub(crate) inherited: Option<Arc<crate::Inherited>>,
}

/// One worker, whatever its backend: the core, the sockets and the control queue.
pub(crate) struct Worker {
    pub(crate) id: usize,
    pub(crate) socks: Sockets,
    pub(crate) ctr: Arc<Counters>,
    /// Socket changes for the backend's poller.
    pub(crate) io_ops: Vec<IoOp>,
    /// The clock of this loop turn, set by the backend.
    pub(crate) now: Millis,
    pub(crate) core: Core,
    rx: mpsc::Receiver<Command>,
    notified: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) sink: Arc<dyn ControlSink>,
    buffers: usize,
    pub(crate) outputs: Vec<Output>,
    /// What connections share (TLS configuration, limits, counts).
    pub(crate) streams: Arc<StreamShared>,
    /// Refusals of connections: a line at most every 5 s, with how many were not logged.
    pub(crate) refusals: turnpike_plane::limit::RefusalLog,
    /// Open connections: TCP, TLS.
    pub(crate) open_streams: [usize; 2],
    /// Connections with something to send (see `conns.rs`).
    pub(crate) dirty: Vec<Token>,
    /// A slot-sized buffer a connection's message is copied into for the core.
    pub(crate) scratch: Vec<u8>,
    /// Plaintext read out of TLS sessions.
    pub(crate) plain: Vec<u8>,
    /// Datagrams from client connections to peers, sent at the end of each read.
    pub(crate) relay_batch: crate::io::conns::RelayBatch,
    /// Listeners paused until a time (accept backoff).
    paused: Vec<(Token, u64)>,
    next_stream_sweep: u64,
    /// This worker's side of the XDP maps, when the fast path is on.
    xdp: Option<crate::xdp::Mirror>,
    /// The UDP listening sockets, in their configured order.
    listen_tokens: Vec<Token>,
    /// The TCP/TLS listening sockets, in their configured order.
    stream_tokens: Vec<Token>,
    /// UDP sockets that are neither listening nor relay sockets (NAT discovery).
    special: Vec<Token>,
    /// Sockets handed over by the process this one upgrades.
    inherited: Option<Arc<crate::Inherited>>,
    /// While this process takes over from the one it upgrades: the inherited sockets,
    /// not read until its table is in place ([`Command::Resume`]); the old process
    /// reads them meanwhile.
    deferred: Option<Vec<Token>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl Worker {
    pub(crate) fn new(init: WorkerInit) -> io::Result<Worker> {
        let now = unix_millis();
        let core = Core::new(
            now,
            CoreConfig {
                id: init.id,
                legacy_channels: init.legacy_channels,
                hairpin: init.hairpin,
                binding_limit: init.binding_limit,
                denied: init.denied,
                ctr: Arc::clone(&init.ctr),
            },
        );
        let mut w = Worker {
            id: init.id,
            socks: Sockets::default(),
            ctr: init.ctr,
            io_ops: Vec::with_capacity(64),
            now,
            core,
            rx: init.rx,
            notified: init.notified,
            sink: init.sink,
            buffers: init.buffers,
            outputs: Vec::with_capacity(64),
            streams: init.streams,
            refusals: turnpike_plane::limit::RefusalLog::with_window(1, 5_000),
            open_streams: [0; 2],
            dirty: Vec::new(),
            scratch: vec![0; SLOT],
            plain: Vec::new(),
            relay_batch: Default::default(),
            paused: Vec::new(),
            next_stream_sweep: now.0.saturating_add(1_000),
            xdp: None,
            listen_tokens: Vec::new(),
            stream_tokens: Vec::new(),
            special: Vec::new(),
            deferred: init.inherited.as_ref().map(|_| Vec::new()),
            inherited: init.inherited,
        };
        if let Some(fp) = &init.fast_path {
            match fp.mirror() {
                Ok(m) => {
                    w.xdp = Some(m);
                    w.core.table.track = true;
                }
                Err(e) => {
                    tracing::warn!(worker = init.id, error = %e, "this worker's allocations stay on the socket path")
                }
            }
        }
        for sock in init.listen {
            let (t, local) = w.socks.insert(sock)?;
            w.core.add_listen(t, local);
            match &mut w.deferred {
                Some(d) => d.push(t),
                None => w.io_ops.push(IoOp::Register(t)),
            }
            w.listen_tokens.push(t);
        }
        for sock in init.companions {
            let (t, local) = w.socks.insert(sock)?;
            w.core.add_companion(t, local);
            w.io_ops.push(IoOp::Register(t));
            w.special.push(t);
        }
        for g in init.nat_groups {
            w.core.add_nat_group(g);
        }
        for (sock, kind) in init.listen_streams {
            let (t, _) = w.socks.insert_kind(sock, Kind::Listener(kind))?;
            w.io_ops.push(IoOp::Register(t));
            w.stream_tokens.push(t);
        }
        Ok(w)
    }

    /// A datagram received into a receive slot; what must be sent from that slot is
    /// pushed to `transmits`, in order.
    pub(crate) fn on_datagram(&mut self, rx: Received<'_>, transmits: &mut Vec<Transmit>) {
        let mut outputs = std::mem::take(&mut self.outputs);
        let (buf, len) = (rx.buf, rx.len);
        self.core.handle_datagram(
            self.now,
            Received {
                buf: &mut *buf,
                ..rx
            },
            &mut outputs,
        );
        self.act(&mut outputs, transmits, buf, len);
        self.outputs = outputs;
    }

    /// Acts on the core's outputs; transmits (which name receive slots) go to
    /// `transmits` for the backend to batch, except those to a client connection, whose
    /// bytes (in `slot`) go into its send queue; one queued is counted as relayed
    /// (`payload` bytes, `Core::queued_to_client`), one its queue has no room for is
    /// dropped.
    fn act(
        &mut self,
        outputs: &mut Vec<Output>,
        transmits: &mut Vec<Transmit>,
        slot: &[u8],
        payload: usize,
    ) {
        for o in outputs.drain(..) {
            match o {
                Output::Transmit(mut tx) => {
                    if self.socks.kind(tx.from) == Some(Kind::Stream) {
                        let range = tx.start as usize..(tx.start + tx.len) as usize;
                        let sent = match slot.get(range) {
                            Some(bytes) => self.stream_send(tx.from, bytes),
                            None => false,
                        };
                        if sent && let Some(tuple) = self.stream_tuple(tx.from) {
                            self.core.queued_to_client(&tuple, payload);
                        }
                        continue;
                    }
                    tx.seq = transmits.len() as u32;
                    transmits.push(tx);
                }
                Output::Punt(p) => self.sink.punt(p),
                Output::Reply { from, data, .. } if self.socks.kind(from) == Some(Kind::Stream) => {
                    self.stream_answered(from);
                    self.stream_send(from, &data);
                    bump(&self.ctr.control_sent, 1);
                }
                Output::Reply { from, to, data } => {
                    // Rare (control-plane answers) and owning its bytes: sent at once
                    // rather than through the backend's batches of receive slots.
                    let ok = self
                        .socks
                        .get(from)
                        .is_some_and(|e| e.sock.send_to(&data, &SockAddr::from(to)).is_ok());
                    bump(
                        if ok {
                            &self.ctr.control_sent
                        } else {
                            &self.ctr.send_error
                        },
                        1,
                    );
                }
                Output::Close(t) => self.close(t),
                Output::DontFragment(t) => {
                    if let Some(e) = self.socks.get(t)
                        && let Err(err) = sys::set_dont_fragment(e.sock.as_fd(), e.local.is_ipv6())
                    {
                        tracing::warn!(worker = self.id, relay = %e.local, error = %err, "DONT-FRAGMENT not set on relay socket");
                    }
                }
            }
        }
    }

    /// Outputs that cannot carry transmits (control commands, timeouts).
    pub(crate) fn act_control(&mut self, mut outputs: Vec<Output>) {
        let mut none = Vec::new();
        self.act(&mut outputs, &mut none, &[], 0);
        debug_assert!(none.is_empty());
        self.outputs = outputs;
    }

    pub(crate) fn close(&mut self, t: Token) {
        if let Some(e) = self.socks.get_mut(t)
            && !e.closing
        {
            e.closing = true;
            self.io_ops.push(IoOp::Close(t));
        }
    }

    /// Applies every queued command; `true` when the worker must stop.
    pub(crate) fn handle_commands(&mut self) -> bool {
        // Cleared before draining: a command queued after this point sets it again and
        // wakes the worker; one queued before is seen by the loop below.
        self.notified
            .store(false, std::sync::atomic::Ordering::SeqCst);
        loop {
            match self.rx.try_recv() {
                Ok(Command::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => return true,
                Ok(cmd) => self.command(cmd),
                Err(mpsc::TryRecvError::Empty) => return false,
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        let mut out = std::mem::take(&mut self.outputs);
        match cmd {
            Command::Send { tuple, data } => self.core.reply(tuple, data, &mut out),
            Command::Handover(reply) => {
                let _ = reply.send(self.handover());
            }
            Command::Retire => {
                let keep = self.core.table.stream_relay_tokens();
                let stop: Vec<Token> = self
                    .socks
                    .tokens()
                    .filter(|t| {
                        matches!(self.socks.kind(*t), Some(Kind::Udp | Kind::Listener(_)))
                            && !keep.contains(t)
                    })
                    .collect();
                self.paused.clear();
                self.io_ops.extend(stop.into_iter().map(IoOp::Pause));
            }
            Command::Resume => {
                for t in self.deferred.take().unwrap_or_default() {
                    if self.socks.get(t).is_some_and(|e| !e.closing) {
                        self.io_ops.push(IoOp::Register(t));
                    }
                }
            }
            Command::Bind {
                tuple,
                relays,
                done,
            } => match self.socks.bind_relays(
                &relays,
                self.buffers,
                self.inherited
                    .as_deref()
                    .filter(|_| self.deferred.is_some()),
            ) {
                Ok(tokens) => {
                    match &mut self.deferred {
                        Some(d) => d.extend(&tokens),
                        None => self
                            .io_ops
                            .extend(tokens.iter().map(|&t| IoOp::Register(t))),
                    }
                    let bound = relays.into_iter().zip(tokens).collect();
                    match tuple {
                        Some(tuple) => self.core.relays_bound(self.now, tuple, bound),
                        None => self.core.pool_bound(self.now, bound),
                    }
                    done(Ok(()));
                }
                Err(e) => done(Err(e)),
            },
            Command::Apply(changes) => {
                for c in changes {
                    self.core.handle_change(self.now, c, &mut out);
                }
            }
            Command::ClearPool => self.core.clear_pool(&mut out),
            Command::Challenge(c) => self.core.set_challenge(c),
            Command::Snapshot(tx) => {
                if let Some(m) = &mut self.xdp {
                    m.collect(&mut self.core.table.allocs);
                }
                let _ = tx.send(self.core.snapshot());
            }
            Command::Adopt { sock, tls } => match sock.peer_addr().ok().and_then(|a| a.as_socket())
            {
                Some(peer) => {
                    let kind = ListenerKind { tls, proxy: false };
                    self.admit_stream(kind, sock, peer);
                }
                None => bump(&self.ctr.streams.refused, 1),
            },
            Command::Shutdown => {}
        }
        self.mirror();
        self.act_control(out);
    }

    /// Duplicates of this worker's listening sockets (in their configured order) and
    /// relay sockets, for a new process.
    fn handover(&self) -> std::io::Result<crate::WorkerSockets> {
        let dup = |t: Token| -> std::io::Result<Socket> {
            self.socks
                .get(t)
                .ok_or_else(|| std::io::Error::other("listening socket gone"))?
                .sock
                .try_clone()
        };
        let mut out = crate::WorkerSockets {
            worker: self.id,
            ..Default::default()
        };
        for &t in &self.listen_tokens {
            out.listen.push(dup(t)?);
        }
        for &t in &self.stream_tokens {
            out.streams.push(dup(t)?);
        }
        for t in self.socks.tokens() {
            let Some(e) = self.socks.get(t) else { continue };
            if e.kind == Kind::Udp
                && !e.closing
                && !self.listen_tokens.contains(&t)
                && !self.special.contains(&t)
            {
                out.relays.push((e.local, e.sock.try_clone()?));
            }
        }
        Ok(out)
    }

    /// Brings the XDP maps in step with the allocations the core changed.
    fn mirror(&mut self) {
        let Some(m) = &mut self.xdp else { return };
        if self.core.table.touched.is_empty() {
            return;
        }
        let mut touched = std::mem::take(&mut self.core.table.touched);
        let denied = self.core.denied.load();
        m.sync_all(
            &mut touched,
            &mut self.core.table.allocs,
            &denied,
            self.now.0,
        );
        self.core.table.touched = touched;
        bump_set(&self.ctr.xdp_allocations, m.installed());
    }

    /// Runs the core's timers if due (the sweep), the connections' sweep, and resumes
    /// paused listeners.
    pub(crate) fn handle_timeout(&mut self) {
        let mut out = std::mem::take(&mut self.outputs);
        self.core.handle_timeout(self.now, &mut out);
        self.mirror();
        self.act_control(out);
        if self.now.0 >= self.next_stream_sweep {
            self.next_stream_sweep = self.now.0.saturating_add(1_000);
            self.sweep_streams();
        }
        if !self.paused.is_empty() {
            let now = self.now.0;
            let mut resume = Vec::new();
            self.paused.retain(|&(t, until)| {
                let due = now >= until;
                if due {
                    resume.push(t);
                }
                !due
            });
            for t in resume {
                if self.socks.get(t).is_some_and(|e| !e.closing) {
                    self.io_ops.push(IoOp::Register(t));
                }
            }
        }
    }

    /// Stops accepting on listener `t` for `ms` milliseconds.
    pub(crate) fn pause_listener(&mut self, t: Token, ms: u64) {
        if self.paused.iter().any(|&(p, _)| p == t) {
            return;
        }
        self.paused.push((t, self.now.0.saturating_add(ms)));
        self.io_ops.push(IoOp::Pause(t));
    }

    /// When [`Worker::handle_timeout`] next has work.
    pub(crate) fn poll_timeout(&self) -> Millis {
        let core = self.core.poll_timeout().0.min(self.next_stream_sweep);
        let paused = self
            .paused
            .iter()
            .map(|&(_, u)| u)
            .min()
            .unwrap_or(u64::MAX);
        Millis(core.min(paused))
    }

    /// Closes everything at shutdown.
    pub(crate) fn close_all(&mut self) {
        let all: Vec<Token> = self.socks.tokens().collect();
        for t in all {
            self.close(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AllocationId, Punted};

    struct NoSink;

    impl ControlSink for NoSink {
        fn punt(&self, _: Punted) {}
        fn connection_closed(&self, _: usize, _: FiveTuple) {}
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| unreachable!())
    }

    fn worker() -> (Worker, mpsc::Sender<Command>) {
        let (tx, rx) = mpsc::channel();
        let w = Worker::new(WorkerInit {
            id: 0,
            listen: Vec::new(),
            companions: Vec::new(),
            nat_groups: Vec::new(),
            rx,
            notified: Arc::default(),
            sink: Arc::new(NoSink),
            denied: Arc::new(ArcSwap::from_pointee(Denied::default())),
            ctr: Arc::new(Counters::default()),
            buffers: 0,
            legacy_channels: false,
            hairpin: true,
            binding_limit: BindingLimit::default(),
            listen_streams: Vec::new(),
            streams: Arc::new(StreamShared::new(None, Default::default(), false)),
            fast_path: None,
            inherited: None,
        });
        (w.unwrap_or_else(|e| panic!("{e}")), tx)
    }

    /// Binds `relay` for `tuple` through the command queue; the token bound, if any.
    fn bind(
        w: &mut Worker,
        tx: &mpsc::Sender<Command>,
        tuple: FiveTuple,
        relay: &str,
    ) -> Option<Token> {
        let (done_tx, done_rx) = mpsc::channel();
        let _ = tx.send(Command::Bind {
            tuple: Some(tuple),
            relays: vec![addr(relay)],
            done: Box::new(move |r| {
                let _ = done_tx.send(r);
            }),
        });
        assert!(!w.handle_commands());
        done_rx.recv().ok()?.ok()?;
        match w.io_ops.pop() {
            Some(IoOp::Register(t)) => Some(t),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn dont_fragment_reaches_relay_sockets() {
        let (mut w, tx) = worker();
        let mut next = 1;
        let mut with_df = 0;
        for (relay, v6) in [("127.0.0.1:0", false), ("[::1]:0", true)] {
            for df in [false, true] {
                let tuple = FiveTuple::udp(addr(&format!("192.0.2.1:{next}")), addr("127.0.0.1:2"));
                let Some(t) = bind(&mut w, &tx, tuple, relay) else {
                    // No IPv6 loopback here.
                    assert!(v6);
                    continue;
                };
                let add = TableChange::AllocationAdd {
                    id: AllocationId(next),
                    tuple,
                    relays: vec![addr(relay)],
                    deadline: Millis(u64::MAX),
                    bandwidth: 0,
                    user: String::new(),
                    username: String::new(),
                    dont_fragment: df,
                };
                let _ = tx.send(Command::Apply(vec![add]));
                assert!(!w.handle_commands());
                next += 1;
                with_df += u32::from(df);
                let fd = w.socks.fd(t).unwrap_or_else(|| panic!("no socket"));
                assert_eq!(sys::dont_fragment(fd, v6).ok(), Some(df), "{relay} {df}");
            }
        }
        let snap = w.core.snapshot();
        assert_eq!(
            snap.iter().filter(|s| s.dont_fragment).count() as u32,
            with_df
        );
    }

    #[test]
    fn failed_bind_is_all_or_none_and_typed() {
        let (mut w, tx) = worker();
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let taken = taken.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (done_tx, done_rx) = mpsc::channel();
        let _ = tx.send(Command::Bind {
            tuple: Some(FiveTuple::udp(addr("192.0.2.1:1"), addr("127.0.0.1:2"))),
            relays: vec![addr("127.0.0.1:0"), taken],
            done: Box::new(move |r| {
                let _ = done_tx.send(r);
            }),
        });
        assert!(!w.handle_commands());
        assert_eq!(done_rx.recv().ok(), Some(Err(BindError::AddressInUse)));
        assert!(w.io_ops.is_empty());
        assert_eq!(w.socks.tokens().count(), 0);
    }
}
