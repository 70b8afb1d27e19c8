//! The relay load: N flows, each a client socket with an allocation (a channel, or Send
//! indications) to one peer socket owned by the generator, or (`--forwarder`) a client
//! socket whose datagrams the bare forwarder carries to the same peer socket. Both
//! directions at a paced rate (or as fast as the loop goes), from one thread: sendmmsg
//! and UDP GSO out, recvmmsg (with UDP GRO) in. Every payload carries its flow,
//! sequence number and send time, so the receiver counts delivered packets and one-way
//! latency on one clock.

use std::io::IoSlice;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use hdrhistogram::Histogram;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::SockaddrIn;
use serde::Serialize;
use turnpike_proto::client::{Client, Event};

use crate::ServerArgs;
use crate::hs::{self, CHANNEL, Plan};
use crate::net::{self, BATCH, MAX_GSO_BYTES, MAX_GSO_SEGS, Receiver, Sender, Sent};
use crate::payload;
use crate::proc;
use crate::stream::{self, StreamArgs, StreamStats, Transport};

/// How the client side talks to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// TURN ChannelData both ways.
    Channel,
    /// TURN Send indications up, Data indications down.
    Indication,
    /// Raw payloads through the bare forwarder.
    Forwarder,
    /// Raw payloads to a reflector (`turnpike xdp-tool reflect`), which sends each back
    /// to its sender: client sockets get their own datagrams back, the peer socket its
    /// own. The physical floor of one pass through an XDP program.
    Echo,
}

#[derive(Debug, Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub stream: StreamArgs,
    /// The target is the bare forwarder (`turnpike-bench forwarder`), not a TURN server.
    #[arg(long, conflicts_with = "transport")]
    pub forwarder: bool,
    /// The target is a reflector (`turnpike xdp-tool reflect`, UDP port 7) that sends
    /// every datagram back to its sender.
    #[arg(long, conflicts_with_all = ["transport", "forwarder"])]
    pub echo: bool,
    /// The IP the client sockets bind to (loopback, or an address of a network
    /// namespace the generator runs in).
    #[arg(long, default_value = "127.0.0.1")]
    pub source: std::net::IpAddr,
    /// Send indications (and Data indications back) instead of a channel.
    #[arg(long, conflicts_with = "forwarder")]
    pub send_indications: bool,
    /// Both ends on the server (the hairpin): flows in pairs, each one's peer the other's
    /// relayed address; up is the first of each pair to the second, down the second to
    /// the first, both as clients (no peer socket).
    #[arg(long, conflicts_with_all = ["transport", "forwarder", "echo"])]
    pub hairpin: bool,
    /// Flows (allocations), each with its own client socket.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Application payload bytes per packet (at least 24).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Alternate payload sizes SIZE and SIZE+4 in every flow, so no two consecutive
    /// datagrams of a flow have the same size: the server cannot merge them into UDP
    /// GSO sends (turnpike has no switch to turn GSO off).
    #[arg(long)]
    pub alternate_sizes: bool,
    /// Offered packets per second per direction (0: as fast as the loop goes).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Warm-up seconds, not measured.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Packets sent back to back per flow and direction (a video frame's packets).
    #[arg(long, default_value_t = 8)]
    pub burst: usize,
    /// The peer socket's address (the forwarder's `--to`).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub peer: SocketAddr,
    /// Send without UDP GSO from the generator (one datagram per message).
    #[arg(long)]
    pub no_gen_gso: bool,
    /// Receive without UDP GRO on the generator's sockets.
    #[arg(long)]
    pub no_gro: bool,
    /// SO_RCVBUF/SO_SNDBUF of the generator's sockets, bytes.
    #[arg(long, default_value_t = 8 << 20)]
    pub buffer: usize,
    /// The server's pid: its CPU time over the measured window is reported.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The server's CPU (its /proc/stat busy share is reported).
    #[arg(long, default_value_t = 0)]
    pub server_cpu: usize,
    /// Pin the generator to this CPU.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// No progress line each second.
    #[arg(long)]
    pub quiet: bool,
    /// Microseconds to sleep after a loop turn with nothing to send or receive (0:
    /// spin): the generator's CPU then counts its work, not its polling.
    #[arg(long, default_value_t = 0)]
    pub nap_us: u64,
    /// Write the result as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl RelayArgs {
    pub fn to_config(&self) -> Result<Config> {
        if self.stream.transport != Transport::Udp && self.send_indications {
            bail!("--send-indications: only over UDP (streams carry ChannelData)");
        }
        Ok(Config {
            source: self.source,
            server: self.server.clone(),
            transport: self.stream.transport,
            tls: self.stream.client_config()?,
            mode: if self.echo {
                Mode::Echo
            } else if self.forwarder {
                Mode::Forwarder
            } else if self.send_indications {
                Mode::Indication
            } else {
                Mode::Channel
            },
            clients: self.clients,
            hairpin: self.hairpin,
            size: self.size,
            alternate: self.alternate_sizes,
            rate: self.rate,
            duration: Duration::from_secs_f64(self.duration),
            warmup: Duration::from_secs_f64(self.warmup),
            burst: self.burst,
            peer: self.peer,
            gen_gso: !self.no_gen_gso,
            gro: !self.no_gro,
            buffer: self.buffer,
            server_pid: self.server_pid,
            server_cpu: self.server_cpu,
            gen_cpu: self.cpu,
            progress: !self.quiet,
            nap: Duration::from_micros(self.nap_us),
            label: String::new(),
        })
    }
}

/// A relay run, as the CLI or the compare harness describes it.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerArgs,
    pub mode: Mode,
    /// The IP the client sockets bind to.
    pub source: std::net::IpAddr,
    /// How the client side reaches the server (`server.server` is its address for
    /// that transport).
    pub transport: Transport,
    /// The TLS client configuration (with [`Transport::Tls`]).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub clients: usize,
    /// Flows in pairs, each one's peer the other's relayed address (`--hairpin`).
    pub hairpin: bool,
    pub size: usize,
    pub alternate: bool,
    pub rate: u64,
    pub duration: Duration,
    pub warmup: Duration,
    pub burst: usize,
    pub peer: SocketAddr,
    pub gen_gso: bool,
    pub gro: bool,
    pub buffer: usize,
    pub server_pid: Option<u32>,
    pub server_cpu: usize,
    pub gen_cpu: Option<usize>,
    pub progress: bool,
    /// Sleep this long after a loop turn with nothing to do (zero: spin), so that the
    /// generator's CPU counts its work, not its polling.
    pub nap: Duration,
    pub label: String,
}

/// Figures of one direction over the measured window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DirReport {
    /// Datagrams the generator sent per second.
    pub sent_pps: f64,
    /// Datagrams delivered per second.
    pub delivered_pps: f64,
    /// Fraction of all datagrams sent (warm-up included) that never arrived.
    pub loss: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// Share of delivered datagrams that arrived inside a UDP GRO super-datagram,
    /// i.e. that the sender (the server) sent with UDP GSO.
    pub coalesced: f64,
}

/// The outcome of a relay run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub label: String,
    pub mode: Mode,
    pub transport: Transport,
    pub size: usize,
    pub alternate_sizes: bool,
    pub clients: usize,
    pub burst: usize,
    /// Offered packets/s per direction (0: as fast as possible).
    pub offered_pps: u64,
    pub seconds: f64,
    /// client → peer.
    pub up: DirReport,
    /// peer → client.
    pub down: DirReport,
    /// Mean of the two directions' delivered packets/s.
    pub delivered_pps: f64,
    /// Both directions together.
    pub p50_us: f64,
    pub p99_us: f64,
    /// Server process CPU (utime+stime of all threads) in cores, if its pid was given.
    pub server_cpu_cores: Option<f64>,
    /// Busy share of the server's CPU and of the generator's CPU from /proc/stat
    /// (includes softirq time and anything else running there).
    pub server_core_busy: f64,
    pub generator_core_busy: f64,
    /// Share of the window the server's threads, and the generator's, spent waiting on a
    /// run queue: above a few percent, something else competed for their core.
    pub server_rq_wait: f64,
    pub generator_rq_wait: f64,
    /// Share of the generator loop's time spent on iterations that sent or received
    /// something (the rest it spun idle).
    pub generator_loop_busy: f64,
    /// Datagrams dropped by full socket buffers during the run: at the server's
    /// sockets (listening and relay ports) and at the generator's.
    pub server_socket_drops: u64,
    pub generator_socket_drops: u64,
    /// What happened on the client connections (TCP and TLS runs).
    pub stream: Option<StreamStats>,
    /// Latency CDF of both directions: (fraction, microseconds).
    pub cdf: Vec<(f64, f64)>,
}

impl Report {
    pub fn summary(&self) -> String {
        format!(
            "{} {:?}{} {}B offered {}/dir: up {:.0} pps (loss {:.3}%), down {:.0} pps (loss {:.3}%); p50 {:.1} us p99 {:.1} us; server cpu {} core busy {:.0}%; gen loop busy {:.0}%; drops server {} gen {}",
            self.label,
            self.mode,
            if self.transport == Transport::Udp {
                String::new()
            } else {
                format!(" over {}", self.transport.name())
            },
            self.size,
            if self.offered_pps == 0 {
                "max".to_owned()
            } else {
                self.offered_pps.to_string()
            },
            self.up.delivered_pps,
            self.up.loss * 100.0,
            self.down.delivered_pps,
            self.down.loss * 100.0,
            self.p50_us,
            self.p99_us,
            self.server_cpu_cores
                .map(|c| format!("{c:.2}"))
                .unwrap_or_else(|| "-".into()),
            self.server_core_busy * 100.0,
            self.generator_loop_busy * 100.0,
            self.server_socket_drops,
            self.generator_socket_drops,
        )
    }
}

/// Slot size of a frame in the send buffers.
const FRAME_SLOT: usize = 2048;
/// Datagrams per direction one loop turn may send in max mode.
const MAX_PER_TURN: u64 = 128;
/// recvmmsg rounds per ready socket per turn.
const RX_ROUNDS: usize = 4;
/// Epoll token of the peer socket.
const PEER: u64 = u64::MAX;

struct Flow {
    sock: UdpSocket,
    client: Option<Client>,
    relay: SocketAddrV4,
    relay_sa: SockaddrIn,
    /// Up frames (client → server) of the two sizes, and where the payload starts.
    up: [Vec<u8>; 2],
    up_off: [usize; 2],
    /// Down payloads (peer → relay) of the two sizes.
    down: [Vec<u8>; 2],
    seq_up: u64,
    seq_down: u64,
}

/// Counters of one direction.
#[derive(Default)]
pub(crate) struct Dir {
    /// Packets sent (for a stream: handed to the connection).
    pub(crate) sent: u64,
    pub(crate) recv: u64,
    /// Packets that arrived inside a GRO super-datagram.
    pub(crate) coalesced: u64,
    win_sent: u64,
    win_recv: u64,
    hist: Option<Histogram<u64>>,
}

impl Dir {
    pub(crate) fn new() -> Result<Dir> {
        Ok(Dir {
            hist: Some(Histogram::new_with_bounds(1, 60_000_000_000, 3)?),
            ..Dir::default()
        })
    }
    pub(crate) fn record(&mut self, now_ns: u64, ts_ns: u64) {
        self.recv += 1;
        if let Some(h) = self.hist.as_mut() {
            h.saturating_record(now_ns.saturating_sub(ts_ns).max(1));
        }
    }
}

/// Runs one relay measurement.
pub fn run(cfg: &Config) -> Result<Report> {
    if cfg.transport != Transport::Udp {
        return stream::relay(cfg);
    }
    net::v4(cfg.server.server)?;
    let peer_bind = net::v4(cfg.peer)?;
    if cfg.size < payload::MIN_PAYLOAD {
        bail!("--size must be at least {}", payload::MIN_PAYLOAD);
    }
    if cfg.size + 48 > FRAME_SLOT {
        bail!("--size must be at most {}", FRAME_SLOT - 48);
    }
    if cfg.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let burst = cfg.burst.clamp(1, MAX_GSO_SEGS);
    let peer_sock = net::udp(SocketAddr::V4(peer_bind), cfg.buffer, cfg.gro)?;
    let peer_addr = peer_sock.local_addr()?;
    let mut flows = match cfg.mode {
        Mode::Forwarder => setup_forwarder(cfg, &peer_sock)?,
        Mode::Echo => setup_echo(cfg)?,
        _ if cfg.hairpin => setup_hairpin(cfg)?,
        _ => setup_turn(cfg, peer_addr)?,
    };
    for i in 0..flows.len() {
        // A hairpin flow's peer is its partner's relayed address.
        let peer = if cfg.hairpin {
            SocketAddr::V4(flows[i ^ 1].relay)
        } else {
            peer_addr
        };
        build_templates(cfg, &mut flows[i], i as u32, peer)?;
    }
    let n = flows.len();

    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    epoll.add(
        peer_sock.as_fd(),
        EpollEvent::new(EpollFlags::EPOLLIN, PEER),
    )?;
    for (i, f) in flows.iter().enumerate() {
        epoll.add(
            f.sock.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, i as u64),
        )?;
    }
    let mut events = vec![EpollEvent::empty(); n + 1];
    let mut rx = Receiver::new(cfg.gro);
    let mut tx = Sender::default();
    let mut sbuf = vec![0u8; FRAME_SLOT * MAX_GSO_SEGS.max(BATCH)];
    let mut dbuf = vec![0u8; FRAME_SLOT * BATCH * 4];
    let mut out = Vec::with_capacity(64);
    let mut msgs: Vec<usize> = Vec::with_capacity(BATCH);
    let mut up = Dir::new()?;
    let mut down = Dir::new()?;
    let gen_ports: Vec<u16> = std::iter::once(peer_addr.port())
        .chain(
            flows
                .iter()
                .filter_map(|f| f.sock.local_addr().ok().map(|a| a.port())),
        )
        .collect();
    let server_ports: Vec<u16> = std::iter::once(cfg.server.server.port())
        .chain(flows.iter().map(|f| f.relay.port()))
        .collect();
    let drops0 = proc::udp_drops()?;

    let mut m = Meter::new(cfg);
    let mut rr_up = 0usize;
    let mut rr_down = 0usize;
    let mut progress = Progress::default();

    loop {
        let now = Instant::now();
        let el = m.tick(now, &mut up, &mut down)?;
        let sending = el < m.end;
        if !sending && el >= m.end + DRAIN {
            break;
        }
        let mut did = 0u64;

        if sending && cfg.hairpin {
            // Up: the first client of each pair, down: the second, one burst per flow
            // in turn.
            for (parity, d, rr) in [(0, &mut up, &mut rr_up), (1, &mut down, &mut rr_down)] {
                let mut quota = due_now(cfg.rate, el, d.sent, burst);
                let mut guard = n / 2;
                while quota > 0 && guard > 0 {
                    guard -= 1;
                    let f = &mut flows[(*rr % (n / 2)) * 2 + parity];
                    *rr = rr.wrapping_add(1);
                    let b = (quota as usize).min(burst);
                    let sent = send_up(
                        cfg,
                        f,
                        b,
                        &mut sbuf,
                        &mut tx,
                        &mut msgs,
                        m.ns(Instant::now()),
                    )?;
                    d.sent += sent as u64;
                    did += sent as u64;
                    quota = quota.saturating_sub(sent as u64);
                    if sent < b {
                        break;
                    }
                }
            }
        } else if sending {
            // Up: client sockets → server, one burst per flow in turn.
            let mut quota = due_now(cfg.rate, el, up.sent, burst);
            let mut guard = n;
            while quota > 0 && guard > 0 {
                guard -= 1;
                let f = &mut flows[rr_up % n];
                rr_up = rr_up.wrapping_add(1);
                let b = (quota as usize).min(burst);
                let sent = send_up(
                    cfg,
                    f,
                    b,
                    &mut sbuf,
                    &mut tx,
                    &mut msgs,
                    m.ns(Instant::now()),
                )?;
                up.sent += sent as u64;
                did += sent as u64;
                quota = quota.saturating_sub(sent as u64);
                if sent < b {
                    break;
                }
            }
            // Down: the peer socket → each flow's relay address.
            let mut quota = due_now(cfg.rate, el, down.sent, burst);
            while quota > 0 {
                let sent = send_down(
                    cfg,
                    &mut flows,
                    &mut rr_down,
                    quota as usize,
                    burst,
                    &peer_sock,
                    &mut dbuf,
                    &mut tx,
                    &mut msgs,
                    m.ns(Instant::now()),
                )?;
                down.sent += sent as u64;
                did += sent as u64;
                if sent == 0 {
                    break;
                }
                quota = quota.saturating_sub(sent as u64);
            }
        }

        // Receive whatever is ready.
        let k = epoll.wait(&mut events, EpollTimeout::ZERO)?;
        for ev in events.iter().take(k) {
            let tok = ev.data();
            for _ in 0..RX_ROUNDS {
                let got = if tok == PEER {
                    rx.recv(&peer_sock)?
                } else {
                    match flows.get(tok as usize) {
                        Some(f) => rx.recv(&f.sock)?,
                        None => 0,
                    }
                };
                if got == 0 {
                    break;
                }
                did += got as u64;
                let now_ns = m.ns(Instant::now());
                // What arrives at the second client of a hairpin pair went up.
                let arrived_up = tok == PEER || (cfg.hairpin && tok % 2 == 1);
                for r in rx.meta.iter() {
                    let data = rx.data(r);
                    if r.len > r.seg {
                        let d = if arrived_up { &mut up } else { &mut down };
                        d.coalesced += r.len.div_ceil(r.seg) as u64;
                    }
                    for chunk in data.chunks(r.seg) {
                        if cfg.mode == Mode::Echo {
                            if let Some(st) = payload::read(chunk) {
                                let d = if tok == PEER { &mut down } else { &mut up };
                                d.record(now_ns, st.ts_ns);
                            }
                        } else if tok == PEER {
                            if let Some(st) = payload::read(chunk) {
                                up.record(now_ns, st.ts_ns);
                            }
                        } else if let Some(f) = flows.get_mut(tok as usize)
                            && let Some(p) = client_payload(cfg.mode, f, chunk, &mut out)
                            && let Some(st) = payload::read(p)
                        {
                            let d = if arrived_up { &mut up } else { &mut down };
                            d.record(now_ns, st.ts_ns);
                        }
                    }
                }
                if got < BATCH {
                    break;
                }
            }
        }
        if did > 0 {
            m.add_busy(now);
        } else if cfg.nap > Duration::ZERO {
            std::thread::sleep(cfg.nap);
        }
        if cfg.progress {
            progress.tick(el, m.measuring(), &up, &down);
        }
    }

    let drops1 = proc::udp_drops()?;
    release(&mut flows);
    let gen_drops = proc::drops_between(&drops0, &drops1, |p| gen_ports.contains(&p));
    let srv_drops = proc::drops_between(&drops0, &drops1, |p| server_ports.contains(&p));
    m.report(
        cfg,
        &up,
        &down,
        Extra {
            clients: n,
            burst,
            server_socket_drops: srv_drops,
            generator_socket_drops: gen_drops,
            stream: None,
        },
    )
}

/// How long the receivers keep counting after the senders stop.
pub(crate) const DRAIN: Duration = Duration::from_millis(300);

/// The measured window of a run: what is read from /proc at its start and end, and
/// the generator loop's busy time. [`Meter::tick`] once per loop turn, then
/// [`Meter::report`].
pub(crate) struct Meter {
    t0: Instant,
    warm_end: Duration,
    /// End of the measured window (and of sending), from the start.
    pub(crate) end: Duration,
    measuring: bool,
    win_start: Instant,
    server_pid: Option<u32>,
    server_cpu: usize,
    gen_cpu: usize,
    me: u32,
    cpu_srv0: f64,
    sched_srv0: (f64, f64),
    sched_gen0: (f64, f64),
    core_srv0: proc::CpuTimes,
    core_gen0: proc::CpuTimes,
    busy_ns: u64,
    busy_ns_win0: u64,
    win: Option<Window>,
}

/// What the window measured, taken when it closes.
struct Window {
    secs: f64,
    up_sent: f64,
    up_recv: f64,
    down_sent: f64,
    down_recv: f64,
    srv_cpu: Option<f64>,
    core_srv: f64,
    core_gen: f64,
    loop_busy: f64,
    up_hist: Option<Histogram<u64>>,
    down_hist: Option<Histogram<u64>>,
    srv_wait: f64,
    gen_wait: f64,
}

/// What a run adds to its report besides the window's figures.
pub(crate) struct Extra {
    pub(crate) clients: usize,
    pub(crate) burst: usize,
    pub(crate) server_socket_drops: u64,
    pub(crate) generator_socket_drops: u64,
    pub(crate) stream: Option<StreamStats>,
}

impl Meter {
    pub(crate) fn new(cfg: &Config) -> Meter {
        let t0 = Instant::now();
        Meter {
            t0,
            warm_end: cfg.warmup,
            end: cfg.warmup + cfg.duration,
            measuring: false,
            win_start: t0,
            server_pid: cfg.server_pid,
            server_cpu: cfg.server_cpu,
            gen_cpu: cfg.gen_cpu.unwrap_or(1 - cfg.server_cpu.min(1)),
            me: std::process::id(),
            cpu_srv0: 0.0,
            sched_srv0: (0.0, 0.0),
            sched_gen0: (0.0, 0.0),
            core_srv0: proc::CpuTimes::default(),
            core_gen0: proc::CpuTimes::default(),
            busy_ns: 0,
            busy_ns_win0: 0,
            win: None,
        }
    }

    /// Nanoseconds since the run started (the payloads' clock).
    pub(crate) fn ns(&self, t: Instant) -> u64 {
        t.duration_since(self.t0).as_nanos() as u64
    }

    pub(crate) fn measuring(&self) -> bool {
        self.measuring
    }

    /// Counts the loop turn that started at `since` as busy.
    pub(crate) fn add_busy(&mut self, since: Instant) {
        self.busy_ns += Instant::now().duration_since(since).as_nanos() as u64;
    }

    /// Opens the window after the warm-up and closes it at the end; returns the time
    /// since the start.
    pub(crate) fn tick(&mut self, now: Instant, up: &mut Dir, down: &mut Dir) -> Result<Duration> {
        let el = now.duration_since(self.t0);
        if !self.measuring && el >= self.warm_end {
            self.measuring = true;
            self.win_start = now;
            for d in [&mut *up, &mut *down] {
                d.win_sent = d.sent;
                d.win_recv = d.recv;
                if let Some(h) = d.hist.as_mut() {
                    h.reset();
                }
            }
            if let Some(pid) = self.server_pid {
                self.cpu_srv0 = proc::cpu_seconds(pid)?;
                self.sched_srv0 = proc::sched(pid)?;
            }
            self.sched_gen0 = proc::sched(self.me)?;
            self.core_srv0 = proc::cpu_times(self.server_cpu)?;
            self.core_gen0 = proc::cpu_times(self.gen_cpu)?;
            self.busy_ns_win0 = self.busy_ns;
        }
        if self.measuring && self.win.is_none() && el >= self.end {
            let secs = now.duration_since(self.win_start).as_secs_f64();
            let srv_cpu = match self.server_pid {
                Some(pid) => Some((proc::cpu_seconds(pid)? - self.cpu_srv0) / secs),
                None => None,
            };
            let srv_wait = match self.server_pid {
                Some(pid) => (proc::sched(pid)?.1 - self.sched_srv0.1) / secs,
                None => 0.0,
            };
            self.win = Some(Window {
                secs,
                up_sent: (up.sent - up.win_sent) as f64 / secs,
                up_recv: (up.recv - up.win_recv) as f64 / secs,
                down_sent: (down.sent - down.win_sent) as f64 / secs,
                down_recv: (down.recv - down.win_recv) as f64 / secs,
                srv_cpu,
                core_srv: proc::cpu_times(self.server_cpu)?.busy_since(&self.core_srv0),
                core_gen: proc::cpu_times(self.gen_cpu)?.busy_since(&self.core_gen0),
                loop_busy: (self.busy_ns - self.busy_ns_win0) as f64 / 1e9 / secs,
                up_hist: up.hist.clone(),
                down_hist: down.hist.clone(),
                srv_wait,
                gen_wait: (proc::sched(self.me)?.1 - self.sched_gen0.1) / secs,
            });
        }
        Ok(el)
    }

    /// The report of a finished run.
    pub(crate) fn report(self, cfg: &Config, up: &Dir, down: &Dir, x: Extra) -> Result<Report> {
        let Some(w) = self.win else {
            bail!("the run ended before its measured window")
        };
        let mk = |sent_pps: f64, rate: f64, d: &Dir, h: &Option<Histogram<u64>>| -> DirReport {
            let q = |x: f64| h.as_ref().map(|h| h.value_at_quantile(x) as f64 / 1000.0);
            DirReport {
                sent_pps,
                delivered_pps: rate,
                loss: if d.sent == 0 {
                    0.0
                } else {
                    d.sent.saturating_sub(d.recv) as f64 / d.sent as f64
                },
                p50_us: q(0.5).unwrap_or(0.0),
                p90_us: q(0.9).unwrap_or(0.0),
                p99_us: q(0.99).unwrap_or(0.0),
                p999_us: q(0.999).unwrap_or(0.0),
                max_us: h.as_ref().map(|h| h.max() as f64 / 1000.0).unwrap_or(0.0),
                coalesced: if d.recv == 0 {
                    0.0
                } else {
                    d.coalesced as f64 / d.recv as f64
                },
            }
        };
        let upr = mk(w.up_sent, w.up_recv, up, &w.up_hist);
        let dnr = mk(w.down_sent, w.down_recv, down, &w.down_hist);
        let mut both = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
        for h in [&w.up_hist, &w.down_hist].into_iter().flatten() {
            both.add(h)?;
        }
        let q = |x: f64| both.value_at_quantile(x) as f64 / 1000.0;
        let mut cdf = Vec::new();
        if !both.is_empty() {
            for i in 0..=100 {
                let f = i as f64 / 100.0;
                cdf.push((f, q(f)));
            }
            for f in [0.995, 0.999, 0.9995, 0.9999] {
                cdf.push((f, q(f)));
            }
            cdf.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        Ok(Report {
            label: cfg.label.clone(),
            mode: cfg.mode,
            transport: cfg.transport,
            size: cfg.size,
            alternate_sizes: cfg.alternate,
            clients: x.clients,
            burst: x.burst,
            offered_pps: cfg.rate,
            seconds: w.secs,
            delivered_pps: (upr.delivered_pps + dnr.delivered_pps) / 2.0,
            p50_us: q(0.5),
            p99_us: q(0.99),
            up: upr,
            down: dnr,
            server_cpu_cores: w.srv_cpu,
            server_core_busy: w.core_srv,
            generator_core_busy: w.core_gen,
            server_rq_wait: w.srv_wait,
            generator_rq_wait: w.gen_wait,
            generator_loop_busy: w.loop_busy,
            server_socket_drops: x.server_socket_drops,
            generator_socket_drops: x.generator_socket_drops,
            stream: x.stream,
            cdf,
        })
    }
}

/// The progress line printed each second.
#[derive(Default)]
pub(crate) struct Progress {
    next: Duration,
    last: (u64, u64, u64, u64),
}

impl Progress {
    pub(crate) fn tick(&mut self, el: Duration, measuring: bool, up: &Dir, down: &Dir) {
        if self.next.is_zero() {
            self.next = Duration::from_secs(1);
        }
        if el < self.next {
            return;
        }
        self.next += Duration::from_secs(1);
        eprintln!(
            "[{:>3}s] up sent {:>7} recv {:>7} | down sent {:>7} recv {:>7} (per s){}",
            el.as_secs(),
            up.sent - self.last.0,
            up.recv - self.last.1,
            down.sent - self.last.2,
            down.recv - self.last.3,
            if measuring { "" } else { " warm-up" }
        );
        self.last = (up.sent, up.recv, down.sent, down.recv);
    }
}

/// Datagrams due in one direction now, in whole bursts: a flow's packets leave back to
/// back, `burst` at a time, as a video frame's do (at most [`MAX_PER_TURN`] per turn
/// in max mode).
pub(crate) fn due_now(rate: u64, el: Duration, sent: u64, burst: usize) -> u64 {
    if rate == 0 {
        return MAX_PER_TURN;
    }
    let due = (rate as u128 * el.as_nanos() / 1_000_000_000) as u64;
    let q = due.saturating_sub(sent).min(MAX_PER_TURN * 4);
    q / burst as u64 * burst as u64
}

/// Builds each flow's frame templates.
fn build_templates(cfg: &Config, f: &mut Flow, flow: u32, peer: SocketAddr) -> Result<()> {
    for (k, extra) in [0usize, 4].into_iter().enumerate() {
        let p = payload::template(cfg.size + extra, flow);
        let mut frame = vec![0u8; FRAME_SLOT];
        let (len, off) = match cfg.mode {
            Mode::Channel => (Client::channel_data(CHANNEL, &p, &mut frame)?, 4),
            Mode::Indication => {
                let c = f.client.as_mut().context("TURN flow without a client")?;
                let len = c.send_indication(peer, &p, &mut frame)?;
                let off = frame[..len]
                    .windows(8)
                    .position(|w| w == &p[..8])
                    .context("payload not found in the Send indication")?;
                (len, off)
            }
            Mode::Forwarder | Mode::Echo => {
                frame[..p.len()].copy_from_slice(&p);
                (p.len(), 0)
            }
        };
        frame.truncate(len);
        f.up[k] = frame;
        f.up_off[k] = off;
        f.down[k] = p;
    }
    Ok(())
}

/// Which of the two sizes packet `seq` of a flow uses: with `alternate`, the larger
/// (SIZE+4) at even sequence numbers, so that a GSO message of two segments (the last
/// of a GSO message may be shorter) carries one of each.
#[inline]
fn size_index(alternate: bool, seq: u64) -> usize {
    if alternate { 1 - (seq & 1) as usize } else { 0 }
}

/// How the generator packs a burst of datagrams into messages. Whatever the packing,
/// the server receives the same datagrams in the same order; the generator only
/// spends less per datagram with fewer, larger sends:
/// - equal sizes with GSO: one message per burst;
/// - alternating sizes with GSO: messages of two segments, large then small;
/// - without GSO: one datagram per message.
///
/// Returns the message lengths in datagrams, and the GSO segment size.
fn pack(cfg: &Config, lens: &[usize], msgs: &mut Vec<usize>) -> Option<u16> {
    msgs.clear();
    if !cfg.gen_gso || lens.is_empty() {
        msgs.extend(std::iter::repeat_n(1, lens.len()));
        return None;
    }
    let seg = lens.iter().copied().max().unwrap_or(0);
    if !cfg.alternate {
        let per = MAX_GSO_SEGS.min(MAX_GSO_BYTES / seg.max(1)).max(1);
        let mut left = lens.len();
        while left > 0 {
            let k = left.min(per);
            msgs.push(k);
            left -= k;
        }
    } else {
        let mut i = 0;
        while i < lens.len() {
            let pair = i + 1 < lens.len() && lens[i] == seg && lens[i + 1] < seg;
            let k = if pair { 2 } else { 1 };
            msgs.push(k);
            i += k;
        }
    }
    Some(seg as u16)
}

/// Sends up to `b` datagrams of flow `f` to the server; returns how many went out.
fn send_up(
    cfg: &Config,
    f: &mut Flow,
    b: usize,
    buf: &mut [u8],
    tx: &mut Sender,
    msgs: &mut Vec<usize>,
    now_ns: u64,
) -> Result<usize> {
    let mut lens = [0usize; MAX_GSO_SEGS];
    let b = b.min(MAX_GSO_SEGS);
    for (i, (slot, len)) in buf
        .chunks_mut(FRAME_SLOT)
        .zip(lens.iter_mut())
        .take(b)
        .enumerate()
    {
        let k = size_index(cfg.alternate, f.seq_up + i as u64);
        let t = &f.up[k];
        slot[..t.len()].copy_from_slice(t);
        payload::stamp(&mut slot[f.up_off[k]..t.len()], f.seq_up + i as u64, now_ns);
        *len = t.len();
    }
    let iovs: Vec<IoSlice<'_>> = buf
        .chunks(FRAME_SLOT)
        .zip(lens.iter())
        .take(b)
        .map(|(s, &l)| IoSlice::new(&s[..l]))
        .collect();
    let seg = pack(cfg, &lens[..b], msgs);
    let mut groups: Vec<&[IoSlice<'_>]> = Vec::with_capacity(msgs.len());
    let mut at = 0;
    for &k in msgs.iter() {
        groups.push(&iovs[at..at + k]);
        at += k;
    }
    let sent = match tx.send(&f.sock, &groups, &[None; MAX_GSO_SEGS][..groups.len()], seg)? {
        Sent::Messages(m) => msgs[..m].iter().sum(),
        Sent::WouldBlock => 0,
    };
    f.seq_up += sent as u64;
    Ok(sent)
}

/// Sends up to `quota` datagrams from the peer socket, bursts of `burst` to each flow's
/// relay address in turn, in one sendmmsg; returns how many went out.
#[allow(clippy::too_many_arguments)]
fn send_down(
    cfg: &Config,
    flows: &mut [Flow],
    rr: &mut usize,
    quota: usize,
    burst: usize,
    sock: &UdpSocket,
    buf: &mut [u8],
    tx: &mut Sender,
    msgs: &mut Vec<usize>,
    now_ns: u64,
) -> Result<usize> {
    let n = flows.len();
    let quota = quota.min(buf.len() / FRAME_SLOT);
    // Messages of this call: (flow, first slot, datagrams).
    let mut plan: Vec<(usize, usize, usize)> = Vec::with_capacity(BATCH);
    let mut all_lens: Vec<usize> = Vec::with_capacity(quota);
    let mut lens = [0usize; MAX_GSO_SEGS];
    let mut seg = None;
    while all_lens.len() < quota && plan.len() < BATCH {
        let used = all_lens.len();
        let fi = *rr % n;
        let f = &mut flows[fi];
        let b = burst.min(quota - used).min(MAX_GSO_SEGS);
        for (i, len) in lens.iter_mut().enumerate().take(b) {
            let k = size_index(cfg.alternate, f.seq_down + i as u64);
            let t = &f.down[k];
            let at = (used + i) * FRAME_SLOT;
            let slot = &mut buf[at..at + t.len()];
            slot.copy_from_slice(t);
            payload::stamp(slot, f.seq_down + i as u64, now_ns);
            *len = t.len();
        }
        let s = pack(cfg, &lens[..b], msgs);
        if plan.len() + msgs.len() > BATCH || (seg.is_some() && s != seg) {
            // This burst does not fit in the call (or needs another segment size): it
            // goes next time, its sequence numbers not taken.
            break;
        }
        seg = s;
        *rr = rr.wrapping_add(1);
        f.seq_down += b as u64;
        let mut at = used;
        for &k in msgs.iter() {
            plan.push((fi, at, k));
            at += k;
        }
        all_lens.extend_from_slice(&lens[..b]);
    }
    if plan.is_empty() {
        return Ok(0);
    }
    let iovs: Vec<IoSlice<'_>> = buf
        .chunks(FRAME_SLOT)
        .zip(all_lens.iter())
        .map(|(s, &l)| IoSlice::new(&s[..l]))
        .collect();
    let groups: Vec<&[IoSlice<'_>]> = plan.iter().map(|&(_, a, k)| &iovs[a..a + k]).collect();
    let to: Vec<Option<SockaddrIn>> = plan
        .iter()
        .map(|&(fi, _, _)| Some(flows[fi].relay_sa))
        .collect();
    Ok(match tx.send(sock, &groups, &to, seg)? {
        Sent::Messages(m) => plan[..m].iter().map(|p| p.2).sum(),
        Sent::WouldBlock => 0,
    })
}

/// The application payload of a datagram a flow's client socket received.
fn client_payload<'a>(
    mode: Mode,
    f: &mut Flow,
    dgram: &'a [u8],
    out: &mut Vec<u8>,
) -> Option<&'a [u8]> {
    match mode {
        Mode::Forwarder | Mode::Echo => Some(dgram),
        _ => match f.client.as_mut()?.handle(0, dgram, out) {
            Event::ChannelData { data, .. } | Event::Data { data, .. } => Some(data),
            _ => None,
        },
    }
}

/// TURN flows: N allocations with a permission (and a channel) for the peer socket.
/// Handshakes that fail are tried again on new sockets (a few times): a client port
/// the kernel hands out again can still have an allocation of an earlier run on the
/// server (437 Allocation Mismatch) if its release was lost.
fn setup_turn(cfg: &Config, peer: SocketAddr) -> Result<Vec<Flow>> {
    let mut sessions = Vec::with_capacity(cfg.clients);
    let mut last_error = None;
    for _ in 0..3 {
        let missing = cfg.clients - sessions.len();
        if missing == 0 {
            break;
        }
        let plan = Plan {
            peer: Some(peer),
            channel: cfg.mode == Mode::Channel,
            count: missing,
            window: missing.min(256),
            limit: Duration::from_secs(20),
            keep: true,
            buffer: cfg.buffer,
            source: cfg.source,
        };
        let o = hs::handshakes(&cfg.server, &plan)?;
        sessions.extend(o.sessions);
        last_error = o.first_error.or(last_error);
    }
    if sessions.len() < cfg.clients {
        bail!(
            "only {} of {} allocations succeeded: {}",
            sessions.len(),
            cfg.clients,
            last_error.unwrap_or_default()
        );
    }
    let mut flows = Vec::with_capacity(sessions.len());
    for s in sessions {
        let relay = net::v4(
            s.relay
                .context("allocation without an IPv4 relay address")?,
        )?;
        if cfg.gro {
            nix::sys::socket::setsockopt(&s.sock, nix::sys::socket::sockopt::UdpGroSegment, &true)?;
        }
        flows.push(Flow {
            sock: s.sock,
            client: Some(s.client),
            relay,
            relay_sa: net::sockaddr(relay),
            up: Default::default(),
            up_off: [0; 2],
            down: Default::default(),
            seq_up: 0,
            seq_down: 0,
        });
    }
    Ok(flows)
}

/// Hairpin flows: allocations in pairs, each with a permission (and a channel) for its
/// partner's relayed address, so that both ends of each pair are clients of the server.
fn setup_hairpin(cfg: &Config) -> Result<Vec<Flow>> {
    if cfg.clients < 2 || !cfg.clients.is_multiple_of(2) {
        bail!("--hairpin needs an even number of --clients");
    }
    let plan = Plan {
        peer: None,
        channel: false,
        count: cfg.clients,
        window: cfg.clients.min(256),
        limit: Duration::from_secs(20),
        keep: true,
        buffer: cfg.buffer,
        source: cfg.source,
    };
    let o = hs::handshakes(&cfg.server, &plan)?;
    if o.sessions.len() < cfg.clients {
        bail!(
            "only {} of {} allocations succeeded: {}",
            o.sessions.len(),
            cfg.clients,
            o.first_error.unwrap_or_default()
        );
    }
    let mut flows = Vec::with_capacity(cfg.clients);
    for s in o.sessions {
        let relay = net::v4(
            s.relay
                .context("allocation without an IPv4 relay address")?,
        )?;
        flows.push(Flow {
            sock: s.sock,
            client: Some(s.client),
            relay,
            relay_sa: net::sockaddr(relay),
            up: Default::default(),
            up_off: [0; 2],
            down: Default::default(),
            seq_up: 0,
            seq_down: 0,
        });
    }
    let t0 = Instant::now();
    for i in 0..flows.len() {
        let partner = SocketAddr::V4(flows[i ^ 1].relay);
        let f = &mut flows[i];
        let c = f.client.as_mut().context("TURN flow without a client")?;
        let mut out = Vec::new();
        c.create_permission(t0.elapsed().as_millis() as u64, &[partner], &mut out)?;
        transact(&f.sock, c, out, t0, |e| {
            matches!(e, Event::PermissionCreated)
        })?;
        if cfg.mode == Mode::Channel {
            let mut out = Vec::new();
            c.channel_bind(t0.elapsed().as_millis() as u64, CHANNEL, partner, &mut out)?;
            transact(&f.sock, c, out, t0, |e| {
                matches!(e, Event::ChannelBound { .. })
            })?;
        }
    }
    for f in &flows {
        if cfg.gro {
            nix::sys::socket::setsockopt(&f.sock, nix::sys::socket::sockopt::UdpGroSegment, &true)?;
        }
    }
    Ok(flows)
}

/// Sends the request in `req` on `sock` (connected to the server) and waits for the
/// event `done` answers it with, following 401/438 and retransmitting as the client
/// asks (10 s at most). The socket is blocking meanwhile, non-blocking again after.
fn transact(
    sock: &UdpSocket,
    c: &mut Client,
    req: Vec<u8>,
    t0: Instant,
    done: impl Fn(&Event<'_>) -> bool,
) -> Result<()> {
    let mut buf = vec![0u8; 2048];
    sock.set_nonblocking(false)?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let end = Instant::now() + Duration::from_secs(10);
    let _ = sock.send(&req);
    let result = loop {
        if Instant::now() >= end {
            break Err(anyhow::anyhow!("no answer from the server in 10 s"));
        }
        let now = t0.elapsed().as_millis() as u64;
        let mut next = Vec::new();
        match sock.recv(&mut buf) {
            Ok(n) => match c.handle(now, &buf[..n], &mut next) {
                e if done(&e) => break Ok(()),
                Event::Failed { code, reason, .. } => {
                    break Err(anyhow::anyhow!("{code} {reason}"));
                }
                Event::Retry => {
                    let _ = sock.send(&next);
                }
                _ => {}
            },
            Err(_) => {
                if let Event::Retry = c.handle_timeout(now, &mut next) {
                    let _ = sock.send(&next);
                }
            }
        }
    };
    sock.set_read_timeout(None)?;
    sock.set_nonblocking(true)?;
    result
}

/// Forwarder flows: each client socket says hello until the peer socket has seen the
/// forwarder's relay address for it.
fn setup_forwarder(cfg: &Config, peer: &UdpSocket) -> Result<Vec<Flow>> {
    let bind = SocketAddr::new(cfg.source, 0);
    let mut socks = Vec::with_capacity(cfg.clients);
    for _ in 0..cfg.clients {
        let s = net::udp(bind, cfg.buffer, cfg.gro)?;
        s.connect(cfg.server.server)?;
        socks.push(s);
    }
    let mut relays: Vec<Option<SocketAddrV4>> = vec![None; cfg.clients];
    let t0 = Instant::now();
    let mut buf = vec![0u8; 65536];
    while relays.iter().any(Option::is_none) {
        if t0.elapsed() > Duration::from_secs(5) {
            bail!("the forwarder at {} does not forward", cfg.server.server);
        }
        for (i, s) in socks.iter().enumerate() {
            if relays[i].is_none() {
                let mut p = payload::template(payload::MIN_PAYLOAD, i as u32);
                payload::stamp(&mut p, u64::MAX, 0);
                let _ = s.send(&p);
            }
        }
        let until = Instant::now() + Duration::from_millis(50);
        while Instant::now() < until {
            match peer.recv_from(&mut buf) {
                Ok((len, SocketAddr::V4(from))) => {
                    if let Some(st) = payload::read(&buf[..len])
                        && let Some(r) = relays.get_mut(st.flow as usize)
                    {
                        *r = Some(from);
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }
    Ok(socks
        .into_iter()
        .zip(relays)
        .filter_map(|(sock, r)| {
            let relay = r?;
            Some(Flow {
                sock,
                client: None,
                relay,
                relay_sa: net::sockaddr(relay),
                up: Default::default(),
                up_off: [0; 2],
                down: Default::default(),
                seq_up: 0,
                seq_down: 0,
            })
        })
        .collect())
}

/// Echo flows: client sockets connected to the reflector, whose "relay" address (where
/// the peer socket sends) is the reflector too.
fn setup_echo(cfg: &Config) -> Result<Vec<Flow>> {
    let to = net::v4(cfg.server.server)?;
    (0..cfg.clients)
        .map(|_| {
            let sock = net::udp(SocketAddr::new(cfg.source, 0), cfg.buffer, cfg.gro)?;
            sock.connect(cfg.server.server)?;
            Ok(Flow {
                sock,
                client: None,
                relay: to,
                relay_sa: net::sockaddr(to),
                up: Default::default(),
                up_off: [0; 2],
                down: Default::default(),
                seq_up: 0,
                seq_down: 0,
            })
        })
        .collect()
}

/// Deletes the flows' allocations (Refresh with lifetime 0), so that a server used for
/// many runs does not pile them up; best effort, bounded.
fn release(flows: &mut [Flow]) {
    let t0 = Instant::now();
    let ms = |t: Instant| t.duration_since(t0).as_millis() as u64 + 20_000_000;
    let mut out = Vec::with_capacity(256);
    let mut buf = vec![0u8; 65536];
    for f in flows.iter_mut() {
        if let Some(c) = f.client.as_mut()
            && c.refresh(ms(Instant::now()), 0, &mut out).is_ok()
        {
            let _ = f.sock.send(&out);
        }
    }
    // Collect the answers (and anything still in flight) for up to 500 ms.
    let mut pending: Vec<usize> = (0..flows.len())
        .filter(|&i| flows[i].client.is_some())
        .collect();
    while !pending.is_empty() && t0.elapsed() < Duration::from_millis(500) {
        pending.retain(|&i| {
            let f = &mut flows[i];
            let Some(c) = f.client.as_mut() else {
                return false;
            };
            while let Ok(n) = f.sock.recv(&mut buf) {
                if let Event::Refreshed { .. } | Event::Failed { .. } =
                    c.handle(ms(Instant::now()), &buf[..n], &mut out)
                {
                    return false;
                }
            }
            true
        });
        std::thread::sleep(Duration::from_millis(2));
    }
}
