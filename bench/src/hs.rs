//! TURN control traffic: many client sockets driven through authenticated Allocate,
//! CreatePermission and ChannelBind (and Refresh) with `turnpike_proto::client::Client`,
//! pipelined up to a window and bounded in count and time. Used to set up the relay
//! flows, and by the `alloc` and `idle` subcommands.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use serde::Serialize;
use turnpike_proto::client::{AllocateOptions, Client, Event};

use crate::ServerArgs;
use crate::proc;

/// The channel every flow binds (each flow is its own allocation).
pub const CHANNEL: u16 = 0x4000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Allocate,
    Permission,
    Channel,
    Refresh,
    Done,
    Failed,
}

/// One client socket and its TURN state.
#[derive(Debug)]
pub struct Session {
    pub sock: UdpSocket,
    pub client: Client,
    pub relay: Option<SocketAddr>,
    stage: Stage,
    started: Instant,
}

/// What to do with each new session.
#[derive(Debug, Clone)]
pub struct Plan {
    /// CreatePermission for this peer (and ChannelBind if `channel`).
    pub peer: Option<SocketAddr>,
    pub channel: bool,
    /// Handshakes to complete.
    pub count: usize,
    /// In flight at once.
    pub window: usize,
    /// Give up after this long.
    pub limit: Duration,
    /// Keep the sockets (relay flows, idle allocations) or close them when done.
    pub keep: bool,
    /// SO_RCVBUF/SO_SNDBUF of each client socket (0: the default).
    pub buffer: usize,
    /// The loopback address the client sockets bind (any of 127.0.0.0/8).
    pub source: IpAddr,
}

/// The outcome of a batch of handshakes.
#[derive(Debug)]
pub struct Outcome {
    pub sessions: Vec<Session>,
    pub completed: usize,
    pub failed: usize,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
    pub first_error: Option<String>,
}

fn hist() -> Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

fn send(sock: &UdpSocket, buf: &[u8]) {
    // A full socket buffer or an ICMP error only delays this handshake: the client
    // retransmits.
    let _ = sock.send(buf);
}

/// Drives `plan.count` new sessions through their handshakes against `server`.
pub fn handshakes(server: &ServerArgs, plan: &Plan) -> Result<Outcome> {
    crate::check_loopback(server.server)?;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let t0 = Instant::now();
    let ms = |t: Instant| t.duration_since(t0).as_millis() as u64;
    let mut slots: Vec<Option<Session>> = Vec::with_capacity(plan.count);
    let mut active: Vec<usize> = Vec::with_capacity(plan.window);
    let mut events = vec![EpollEvent::empty(); 256];
    let mut out = Vec::with_capacity(1500);
    let mut rbuf = vec![0u8; 2048];
    let mut completed = 0usize;
    let mut failed = 0usize;
    let mut first_error = None;
    let mut lat = hist()?;
    let mut last_scan = t0;
    let mut spent: Vec<UdpSocket> = Vec::new();
    let bind = SocketAddr::new(plan.source, 0);
    loop {
        let now = Instant::now();
        if now.duration_since(t0) > plan.limit {
            break;
        }
        // Start new handshakes up to the window.
        while active.len() < plan.window && slots.len() < plan.count {
            let idx = slots.len();
            let sock = crate::net::udp(bind, plan.buffer, false)?;
            sock.connect(server.server)?;
            let mut client = Client::new(&server.user, &server.password, 0x9E37_79B9 ^ idx as u64);
            client.allocate(ms(now), AllocateOptions::default(), &mut out)?;
            send(&sock, &out);
            epoll.add(
                sock.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, idx as u64),
            )?;
            slots.push(Some(Session {
                sock,
                client,
                relay: None,
                stage: Stage::Allocate,
                started: now,
            }));
            active.push(idx);
        }
        if active.is_empty() {
            break;
        }
        let n = epoll.wait(&mut events, EpollTimeout::from(5u8))?;
        let now = Instant::now();
        for ev in events.iter().take(n) {
            let idx = ev.data() as usize;
            let Some(Some(s)) = slots.get_mut(idx) else {
                continue;
            };
            // Drain the socket: responses and possibly stray retransmissions.
            while let Ok(len) = s.sock.recv(&mut rbuf) {
                let dgram = &rbuf[..len];
                let ev = s.client.handle(ms(now), dgram, &mut out);
                step(s, ev, plan, ms(now), &mut out, &mut first_error)?;
                if matches!(s.stage, Stage::Done | Stage::Failed) {
                    break;
                }
            }
        }
        // Retransmissions and timeouts, every 10 ms.
        if now.duration_since(last_scan) >= Duration::from_millis(10) {
            last_scan = now;
            for &idx in &active {
                let Some(Some(s)) = slots.get_mut(idx) else {
                    continue;
                };
                if s.client.poll_timeout().is_some_and(|t| t <= ms(now)) {
                    match s.client.handle_timeout(ms(now), &mut out) {
                        Event::Retry => send(&s.sock, &out),
                        Event::TimedOut { method } => {
                            s.stage = Stage::Failed;
                            first_error.get_or_insert(format!("{method:?} timed out"));
                        }
                        _ => {}
                    }
                }
            }
        }
        // Retire finished sessions.
        let mut i = 0;
        while i < active.len() {
            let idx = active[i];
            let stage = slots
                .get(idx)
                .and_then(|s| s.as_ref())
                .map(|s| s.stage)
                .unwrap_or(Stage::Failed);
            if matches!(stage, Stage::Done | Stage::Failed) {
                active.swap_remove(i);
                if let Some(slot) = slots.get_mut(idx) {
                    if let Some(s) = slot.as_ref() {
                        let _ = epoll.delete(s.sock.as_fd());
                        if stage == Stage::Done {
                            completed += 1;
                            lat.saturating_record(s.started.elapsed().as_micros() as u64);
                        } else {
                            failed += 1;
                        }
                    }
                    if (!plan.keep || stage == Stage::Failed)
                        && let Some(s) = slot.take()
                    {
                        // Closed only at the end: a port freed now could be handed to
                        // a later client socket, whose 5-tuple would then meet the
                        // old allocation (437).
                        spent.push(s.sock);
                    }
                }
            } else {
                i += 1;
            }
        }
    }
    let elapsed = t0.elapsed();
    drop(spent);
    failed += active.len();
    let sessions = slots
        .into_iter()
        .flatten()
        .filter(|s| s.stage == Stage::Done)
        .collect();
    Ok(Outcome {
        sessions,
        completed,
        failed,
        elapsed,
        latency_us: lat,
        first_error,
    })
}

/// Advances a session on a client event.
fn step(
    s: &mut Session,
    ev: Event<'_>,
    plan: &Plan,
    now_ms: u64,
    out: &mut Vec<u8>,
    first_error: &mut Option<String>,
) -> Result<()> {
    match ev {
        Event::Retry => send(&s.sock, out),
        Event::Allocated { relayed, .. } => {
            s.relay = relayed.into_iter().find(SocketAddr::is_ipv4);
            match plan.peer {
                Some(peer) => {
                    s.client.create_permission(now_ms, &[peer], out)?;
                    send(&s.sock, out);
                    s.stage = Stage::Permission;
                }
                None => s.stage = Stage::Done,
            }
        }
        Event::PermissionCreated => match plan.peer {
            Some(peer) if plan.channel => {
                s.client.channel_bind(now_ms, CHANNEL, peer, out)?;
                send(&s.sock, out);
                s.stage = Stage::Channel;
            }
            _ => s.stage = Stage::Done,
        },
        Event::ChannelBound { .. } | Event::Refreshed { .. } => s.stage = Stage::Done,
        Event::Failed {
            method,
            code,
            reason,
        } => {
            s.stage = Stage::Failed;
            first_error.get_or_insert(format!("{method:?} failed: {code} {reason}"));
        }
        Event::TimedOut { method } => {
            s.stage = Stage::Failed;
            first_error.get_or_insert(format!("{method:?} timed out"));
        }
        _ => {}
    }
    Ok(())
}

/// Sends one Refresh per session (pipelined up to `window`), waits for the answers.
/// Returns (refreshed, failed).
pub fn refresh_all(
    sessions: &mut [Session],
    lifetime: u32,
    window: usize,
    limit: Duration,
) -> Result<(usize, usize)> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let t0 = Instant::now();
    let ms = |t: Instant| t.duration_since(t0).as_millis() as u64 + 10_000_000;
    let mut out = Vec::with_capacity(1500);
    let mut rbuf = vec![0u8; 2048];
    let mut events = vec![EpollEvent::empty(); 256];
    let mut next = 0usize;
    let mut active: Vec<usize> = Vec::new();
    let (mut ok, mut bad) = (0usize, 0usize);
    let mut last_scan = t0;
    let mut first_error = None;
    let plan = Plan {
        peer: None,
        channel: false,
        count: 0,
        window,
        limit,
        keep: true,
        buffer: 0,
        source: IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    loop {
        let now = Instant::now();
        if now.duration_since(t0) > limit {
            break;
        }
        while active.len() < window && next < sessions.len() {
            let s = &mut sessions[next];
            s.client.refresh(ms(now), lifetime, &mut out)?;
            send(&s.sock, &out);
            s.stage = Stage::Refresh;
            epoll.add(
                s.sock.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, next as u64),
            )?;
            active.push(next);
            next += 1;
        }
        if active.is_empty() {
            break;
        }
        let n = epoll.wait(&mut events, EpollTimeout::from(5u8))?;
        let now = Instant::now();
        for ev in events.iter().take(n) {
            let Some(s) = sessions.get_mut(ev.data() as usize) else {
                continue;
            };
            while let Ok(len) = s.sock.recv(&mut rbuf) {
                let e = s.client.handle(ms(now), &rbuf[..len], &mut out);
                step(s, e, &plan, ms(now), &mut out, &mut first_error)?;
            }
        }
        if now.duration_since(last_scan) >= Duration::from_millis(10) {
            last_scan = now;
            for &i in &active {
                let s = &mut sessions[i];
                if s.client.poll_timeout().is_some_and(|t| t <= ms(now)) {
                    match s.client.handle_timeout(ms(now), &mut out) {
                        Event::Retry => send(&s.sock, &out),
                        Event::TimedOut { .. } => s.stage = Stage::Failed,
                        _ => {}
                    }
                }
            }
        }
        active.retain(|&i| {
            let s = &sessions[i];
            match s.stage {
                Stage::Done => {
                    ok += 1;
                    let _ = epoll.delete(s.sock.as_fd());
                    false
                }
                Stage::Failed => {
                    bad += 1;
                    let _ = epoll.delete(s.sock.as_fd());
                    false
                }
                _ => true,
            }
        });
    }
    bad += active.len() + (sessions.len() - next);
    if let Some(e) = first_error {
        eprintln!("refresh: first error: {e}");
    }
    Ok((ok, bad))
}

/// Result of the `alloc` subcommand.
#[derive(Debug, Clone, Serialize)]
pub struct AllocReport {
    pub completed: usize,
    pub failed: usize,
    pub seconds: f64,
    pub per_second: f64,
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    pub window: usize,
    pub first_error: Option<String>,
}

impl AllocReport {
    pub fn summary(&self) -> String {
        format!(
            "alloc: {} handshakes (Allocate+CreatePermission+ChannelBind, 401 included) in {:.2} s = {:.0}/s, {} failed, handshake p50 {} us p99 {} us (window {}){}",
            self.completed,
            self.seconds,
            self.per_second,
            self.failed,
            self.latency_p50_us,
            self.latency_p99_us,
            self.window,
            self.first_error
                .as_ref()
                .map(|e| format!("; first error: {e}"))
                .unwrap_or_default()
        )
    }
}

/// Complete handshakes per second: new socket, Allocate (401, then with credentials),
/// CreatePermission, ChannelBind; sockets closed as they finish.
pub fn alloc_rate(
    server: &ServerArgs,
    count: usize,
    window: usize,
    limit: Duration,
) -> Result<AllocReport> {
    let plan = Plan {
        peer: Some(SocketAddr::from(([127, 0, 0, 1], 9))),
        channel: true,
        count,
        window,
        limit,
        keep: false,
        buffer: 0,
        source: IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    let o = handshakes(server, &plan)?;
    let secs = o.elapsed.as_secs_f64();
    Ok(AllocReport {
        completed: o.completed,
        failed: o.failed,
        seconds: secs,
        per_second: o.completed as f64 / secs.max(1e-9),
        latency_p50_us: o.latency_us.value_at_quantile(0.5),
        latency_p99_us: o.latency_us.value_at_quantile(0.99),
        window,
        first_error: o.first_error,
    })
}

/// Result of the `idle` subcommand.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub allocations: usize,
    pub refreshed: usize,
    pub failed: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub bytes_per_allocation: f64,
    pub mib_per_10k: f64,
}

impl IdleReport {
    pub fn summary(&self) -> String {
        format!(
            "idle: {} allocations ({} refreshed, {} failed); server RSS {} KiB -> {} KiB: {:.0} bytes per allocation, {:.1} MiB per 10k",
            self.allocations,
            self.refreshed,
            self.failed,
            self.rss_before_kib,
            self.rss_after_kib,
            self.bytes_per_allocation,
            self.mib_per_10k
        )
    }
}

/// K allocations (each with a permission and a channel), one Refresh round, held;
/// the server's RSS before and after.
pub fn idle_rss(
    server: &ServerArgs,
    pid: u32,
    count: usize,
    window: usize,
    hold: Duration,
    limit: Duration,
) -> Result<IdleReport> {
    let before = proc::rss_kib(pid)?;
    let plan = Plan {
        peer: Some(SocketAddr::from(([127, 0, 0, 1], 9))),
        channel: true,
        count,
        window,
        limit,
        keep: true,
        buffer: 0,
        source: IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    let mut o = handshakes(server, &plan)?;
    if o.sessions.is_empty() {
        bail!(
            "no allocation succeeded: {}",
            o.first_error.unwrap_or_default()
        );
    }
    let (refreshed, rfail) = refresh_all(&mut o.sessions, 600, window, limit)?;
    std::thread::sleep(hold);
    let after = proc::rss_kib(pid).context("server gone")?;
    let n = o.sessions.len();
    let bytes = (after.saturating_sub(before) * 1024) as f64 / n as f64;
    let r = IdleReport {
        allocations: n,
        refreshed,
        failed: o.failed + rfail,
        rss_before_kib: before,
        rss_after_kib: after,
        bytes_per_allocation: bytes,
        mib_per_10k: bytes * 10_000.0 / (1024.0 * 1024.0),
    };
    // Free the allocations so that the server is left as it was.
    let _ = refresh_all(&mut o.sessions, 0, window, Duration::from_secs(10));
    Ok(r)
}
