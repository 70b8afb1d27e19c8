//! The front door: one TCP or TLS port shared by TURN and a web server (issue #23).
//!
//! A front-door listener replaces the workers' own listener on its address. It runs on
//! the async (tokio) side, so that TURN's fast path in the workers is unchanged:
//! 1. accept, and count the connection against the front door's total and per-IP caps
//!    (those of the TURN listeners, [`StreamLimits`]); over a cap it is closed at once;
//! 2. peek (`MSG_PEEK`: nothing is consumed) until the first bytes decide the route
//!    (`core::front`: the ClientHello's ALPN and SNI on TLS, the request line or STUN
//!    header on TCP), within the handshake timeout (slow-loris), looking at
//!    `core::front::MAX_PEEK` bytes at most;
//! 3. TURN: the socket, its bytes still unread, goes to a worker
//!    ([`DataPlaneHandle::adopt_stream`]), which serves it exactly like one it accepted
//!    (its PROXY-less TLS or TCP path, its limits and timeouts);
//!    web: a connection to the backend, a PROXY protocol v2 header first when asked,
//!    then both directions spliced (`splice(2)` through a pipe: the bytes never enter
//!    user space; the peeked ClientHello or request goes first, as the client sent it;
//!    TLS is not terminated); unknown: closed and counted.
//!
//! A backend that cannot be reached within [`BACKEND_CONNECT_MS`] closes the client
//! cleanly (a TLS `internal_error` alert, or an HTTP 502) and is counted.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ahash::AHashMap;
use nix::fcntl::{OFlag, SpliceFFlags, splice};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};

use crate::DataPlaneHandle;
use crate::core::front::{self, Decision, Route, WebRules};
use crate::core::proxy;
use crate::io::conns::StreamLimits;
use crate::io::slab::tcp_listener;

/// How long the connection to a web backend may take.
pub const BACKEND_CONNECT_MS: u64 = 5_000;
/// Bytes moved per `splice` call at most (a pipe's default capacity).
const SPLICE_CHUNK: usize = 64 * 1024;
/// The first peek's buffer; it grows up to `core::front::MAX_PEEK` while a large
/// ClientHello arrives.
const FIRST_PEEK: usize = 2048;
/// The longest pause between two peeks while the first bytes are incomplete.
const MAX_PEEK_PAUSE_MS: u64 = 50;
/// A fatal TLS `internal_error` alert (RFC 8446 §6), sent in clear before any
/// handshake message: the client's TLS stack reports it rather than a reset.
const TLS_INTERNAL_ERROR: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x50];
/// What an HTTP client gets when the backend is down.
const HTTP_BAD_GATEWAY: &[u8] =
    b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// A listening address shared by TURN and a web backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrontListen {
    /// The address (port 0: one is chosen).
    pub addr: SocketAddr,
    /// TLS (web: HTTPS, routed on the ClientHello) or plain TCP (web: HTTP/1.x).
    pub tls: bool,
    /// Where web connections go.
    pub backend: SocketAddr,
    /// Send the backend a PROXY protocol v2 header with the client's address first.
    pub backend_proxy: bool,
}

/// The front door's configuration.
#[derive(Debug, Clone)]
pub struct FrontDoorConfig {
    /// The shared addresses.
    pub listen: Vec<FrontListen>,
    /// The TLS routing rules.
    pub rules: WebRules,
    /// Caps and the handshake timeout (those of the TURN listeners).
    pub limits: StreamLimits,
}

/// The front door's counters.
#[derive(Debug, Default)]
struct Counters {
    accepted_tcp: AtomicU64,
    accepted_tls: AtomicU64,
    refused: AtomicU64,
    timeouts: AtomicU64,
    closed_early: AtomicU64,
    to_turn: AtomicU64,
    to_web: AtomicU64,
    unknown: AtomicU64,
    backend_errors: AtomicU64,
    handoff_errors: AtomicU64,
    web_bytes: AtomicU64,
    web_open_tcp: AtomicU64,
    web_open_tls: AtomicU64,
    routing: AtomicU64,
}

/// A snapshot of the front door's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrontStats {
    /// Connections accepted on plain TCP front-door listeners.
    pub accepted_tcp: u64,
    /// Connections accepted on TLS front-door listeners.
    pub accepted_tls: u64,
    /// Refused over the total or per-IP cap.
    pub refused: u64,
    /// Closed because the first bytes did not decide a route within the handshake
    /// timeout (slow-loris).
    pub timeouts: u64,
    /// Closed by the client (or reset) before a route was decided.
    pub closed_early: u64,
    /// Handed to the TURN workers.
    pub to_turn: u64,
    /// Passed through to a web backend.
    pub to_web: u64,
    /// Closed: neither TURN nor web.
    pub unknown: u64,
    /// Web connections closed because the backend could not be reached.
    pub backend_errors: u64,
    /// TURN connections lost because no worker took them (stopping).
    pub handoff_errors: u64,
    /// Bytes passed through, both directions.
    pub web_bytes: u64,
    /// Web connections open now, plain TCP.
    pub web_open_tcp: u64,
    /// Web connections open now, TLS.
    pub web_open_tls: u64,
    /// Connections whose route is being decided now.
    pub routing: u64,
}

/// Reads the front door's counters (cheap to clone).
#[derive(Debug, Clone)]
pub struct FrontStatsHandle(Arc<Counters>);

impl FrontStatsHandle {
    /// The counters now.
    pub fn stats(&self) -> FrontStats {
        let c = &self.0;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FrontStats {
            accepted_tcp: r(&c.accepted_tcp),
            accepted_tls: r(&c.accepted_tls),
            refused: r(&c.refused),
            timeouts: r(&c.timeouts),
            closed_early: r(&c.closed_early),
            to_turn: r(&c.to_turn),
            to_web: r(&c.to_web),
            unknown: r(&c.unknown),
            backend_errors: r(&c.backend_errors),
            handoff_errors: r(&c.handoff_errors),
            web_bytes: r(&c.web_bytes),
            web_open_tcp: r(&c.web_open_tcp),
            web_open_tls: r(&c.web_open_tls),
            routing: r(&c.routing),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// A gauge held up while its guard lives.
struct Up<'a>(&'a AtomicU64);

impl<'a> Up<'a> {
    fn new(a: &'a AtomicU64) -> Up<'a> {
        a.fetch_add(1, Ordering::Relaxed);
        Up(a)
    }
}

impl Drop for Up<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The total and per-IP connection caps of the front door.
#[derive(Debug)]
struct Caps {
    max: usize,
    max_per_ip: usize,
    open: AtomicUsize,
    per_ip: Mutex<AHashMap<IpAddr, usize>>,
}

/// A connection counted against the caps until dropped.
#[derive(Debug)]
struct Permit {
    caps: Arc<Caps>,
    ip: IpAddr,
}

impl Caps {
    fn admit(caps: &Arc<Caps>, ip: IpAddr) -> Option<Permit> {
        let ip = ip.to_canonical();
        caps.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < caps.max).then_some(n + 1)
            })
            .ok()?;
        if caps.max_per_ip > 0 {
            let mut m = caps.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(ip).or_insert(0);
            if *n >= caps.max_per_ip {
                drop(m);
                caps.open.fetch_sub(1, Ordering::AcqRel);
                return None;
            }
            *n += 1;
        }
        Some(Permit {
            caps: Arc::clone(caps),
            ip,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let caps = &self.caps;
        if caps.max_per_ip > 0 {
            let mut m = caps.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = m.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.ip);
                }
            }
        }
        caps.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Warnings at most once per interval (a flood logs one line, not one per connection).
#[derive(Debug)]
struct Quiet(Mutex<Option<u64>>);

impl Quiet {
    fn ready(&self) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // The data plane's clock (milliseconds), read only when there is a warning.
        let now = crate::io::worker::unix_millis().0;
        if last.is_some_and(|t| now.saturating_sub(t) < 5_000) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// What every connection task shares.
#[derive(Debug)]
struct Ctx {
    rules: WebRules,
    handshake: Duration,
    caps: Arc<Caps>,
    ctr: Arc<Counters>,
    quiet: Quiet,
}

/// The bound front-door listeners, not yet serving.
#[derive(Debug)]
pub struct FrontDoor {
    listeners: Vec<(std::net::TcpListener, FrontListen)>,
    ctx: Arc<Ctx>,
}

impl FrontDoor {
    /// Binds every front-door address (so that the data plane can be told they are the
    /// server's own before it starts).
    pub fn bind(cfg: FrontDoorConfig) -> io::Result<FrontDoor> {
        let mut listeners = Vec::with_capacity(cfg.listen.len());
        for l in cfg.listen {
            let s = tcp_listener(l.addr, 1024).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot listen on TCP {}: {e}", l.addr))
            })?;
            let addr = s
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("listening socket without an IP address"))?;
            listeners.push((s.into(), FrontListen { addr, ..l }));
        }
        let limits = cfg.limits;
        Ok(FrontDoor {
            listeners,
            ctx: Arc::new(Ctx {
                rules: cfg.rules,
                handshake: Duration::from_millis(limits.handshake_ms.max(1)),
                caps: Arc::new(Caps {
                    max: limits.max_connections,
                    max_per_ip: limits.max_per_ip,
                    open: AtomicUsize::new(0),
                    per_ip: Mutex::new(AHashMap::new()),
                }),
                ctr: Arc::new(Counters::default()),
                quiet: Quiet(Mutex::new(None)),
            }),
        })
    }

    /// The listening addresses, a port 0 resolved.
    pub fn local(&self) -> Vec<FrontListen> {
        self.listeners.iter().map(|(_, l)| *l).collect()
    }

    /// Reads the counters.
    pub fn stats(&self) -> FrontStatsHandle {
        FrontStatsHandle(Arc::clone(&self.ctx.ctr))
    }

    /// Starts serving on the current tokio runtime; TURN connections go to `dp`.
    pub fn spawn(self, dp: DataPlaneHandle) -> io::Result<()> {
        for (std, l) in self.listeners {
            let listener = TcpListener::from_std(std)?;
            tracing::info!(addr = %l.addr, tls = l.tls, backend = %l.backend, proxy_protocol = l.backend_proxy, "front door: TURN and web share this port");
            tokio::spawn(accept_loop(listener, l, Arc::clone(&self.ctx), dp.clone()));
        }
        Ok(())
    }
}

async fn accept_loop(listener: TcpListener, l: FrontListen, ctx: Arc<Ctx>, dp: DataPlaneHandle) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors or memory: pause rather than spin.
                if ctx.quiet.ready() {
                    tracing::warn!(addr = %l.addr, error = %e, "front door: accept failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        bump(if l.tls {
            &ctx.ctr.accepted_tls
        } else {
            &ctx.ctr.accepted_tcp
        });
        let Some(permit) = Caps::admit(&ctx.caps, peer.ip()) else {
            bump(&ctx.ctr.refused);
            if ctx.quiet.ready() {
                tracing::warn!(%peer, "front door: connection refused: total or per-IP connection limit reached");
            }
            continue;
        };
        tokio::spawn(serve(stream, peer, l, Arc::clone(&ctx), dp.clone(), permit));
    }
}

/// One connection: route, then hand over, pass through or close.
async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    l: FrontListen,
    ctx: Arc<Ctx>,
    dp: DataPlaneHandle,
    permit: Permit,
) {
    let routed = {
        let _routing = Up::new(&ctx.ctr.routing);
        tokio::time::timeout(ctx.handshake, peek_route(&stream, l.tls, &ctx.rules)).await
    };
    let (route, why) = match routed {
        Err(_) => {
            bump(&ctx.ctr.timeouts);
            tracing::debug!(%peer, "front door: closed: no route within the handshake timeout");
            return;
        }
        Ok(Err(e)) => {
            bump(&ctx.ctr.closed_early);
            tracing::debug!(%peer, error = %e, "front door: closed before a route was decided");
            return;
        }
        Ok(Ok(r)) => r,
    };
    tracing::trace!(%peer, ?route, why, "front door: routed");
    match route {
        Route::Turn => {
            bump(&ctx.ctr.to_turn);
            // The worker counts it against the same caps from now on.
            drop(permit);
            let handed = stream.into_std().and_then(|s| dp.adopt_stream(s, l.tls));
            if let Err(e) = handed {
                bump(&ctx.ctr.handoff_errors);
                tracing::debug!(%peer, error = %e, "front door: TURN connection not handed over");
            }
        }
        Route::Web => {
            bump(&ctx.ctr.to_web);
            let open = if l.tls {
                &ctx.ctr.web_open_tls
            } else {
                &ctx.ctr.web_open_tcp
            };
            let _open = Up::new(open);
            pass_through(stream, peer, &l, &ctx).await;
            drop(permit);
        }
        Route::Unknown => {
            bump(&ctx.ctr.unknown);
            tracing::debug!(%peer, tls = l.tls, why, "front door: closed: neither TURN nor web");
            close_quietly(&stream);
        }
    }
}

/// Peeks until the first bytes decide a route. Nothing is consumed.
async fn peek_route(
    stream: &TcpStream,
    tls: bool,
    rules: &WebRules,
) -> io::Result<(Route, &'static str)> {
    let mut buf = vec![0u8; FIRST_PEEK];
    let mut pause = Duration::from_millis(1);
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let seen = buf.get(..n).unwrap_or_default();
        let d = if tls {
            front::classify_tls(seen, rules)
        } else {
            front::classify_plain(seen)
        };
        match d {
            Decision::Route(r, why) => return Ok((r, why)),
            Decision::NeedMore if n == buf.len() && buf.len() < front::MAX_PEEK => {
                let len = (buf.len() * 2).min(front::MAX_PEEK);
                buf.resize(len, 0);
            }
            Decision::NeedMore => {
                // A peek returns the same bytes at once while they are unread: wait a
                // little for more (the caller's timeout bounds the whole).
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(MAX_PEEK_PAUSE_MS));
            }
        }
    }
}

/// Reads and drops what the client sent (unread, since only peeked), as much as is
/// there: a close then sends a FIN, not a reset.
fn drain(stream: &TcpStream) {
    let mut sink = [0u8; 4096];
    for _ in 0..(front::MAX_PEEK / sink.len() + 1) {
        match stream.try_read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

/// Closes with a FIN rather than a reset.
fn close_quietly(stream: &TcpStream) {
    drain(stream);
    let _ = SockRef::from(stream).shutdown(std::net::Shutdown::Write);
}

/// The backend is down: tells the client cleanly, then closes.
fn refuse(stream: &TcpStream, tls: bool) {
    drain(stream);
    let msg: &[u8] = if tls {
        &TLS_INTERNAL_ERROR
    } else {
        HTTP_BAD_GATEWAY
    };
    // The connection is new and its send buffer empty: one write takes it all.
    let _ = stream.try_write(msg);
    let _ = SockRef::from(stream).shutdown(std::net::Shutdown::Write);
}

async fn pass_through(client: TcpStream, peer: SocketAddr, l: &FrontListen, ctx: &Ctx) {
    let connect = TcpStream::connect(l.backend);
    let backend =
        match tokio::time::timeout(Duration::from_millis(BACKEND_CONNECT_MS), connect).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return backend_down(&client, l, ctx, &e.to_string()).await,
            Err(_) => return backend_down(&client, l, ctx, "connect timed out").await,
        };
    let _ = client.set_nodelay(true);
    let _ = backend.set_nodelay(true);
    if l.backend_proxy {
        let local = client.local_addr().unwrap_or(l.addr);
        let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        let header = proxy::v2_header(canon(peer), canon(local));
        if let Err(e) = write_all(&backend, &header).await {
            return backend_down(&client, l, ctx, &e.to_string()).await;
        }
    }
    let up = one_way(&client, &backend, &ctx.ctr.web_bytes);
    let down = one_way(&backend, &client, &ctx.ctr.web_bytes);
    if let Err(e) = tokio::try_join!(up, down) {
        tracing::debug!(%peer, error = %e, "front door: web connection ended with an error");
    }
}

async fn backend_down(client: &TcpStream, l: &FrontListen, ctx: &Ctx, error: &str) {
    bump(&ctx.ctr.backend_errors);
    if ctx.quiet.ready() {
        tracing::warn!(backend = %l.backend, error, "front door: web backend unreachable; web connections are closed");
    }
    refuse(client, l.tls);
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Moves `from`'s bytes to `to` through a pipe with `splice(2)` until `from` ends,
/// then shuts `to`'s sending side down (the half-close carries through).
async fn one_way(from: &TcpStream, to: &TcpStream, moved: &AtomicU64) -> io::Result<()> {
    let (pipe_r, pipe_w): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        from.readable().await?;
        // The pipe is empty here: EAGAIN can only be the socket's.
        let n = match from.try_io(Interest::READABLE, || {
            splice(
                from.as_fd(),
                None,
                pipe_w.as_fd(),
                None,
                SPLICE_CHUNK,
                flags,
            )
            .map_err(io::Error::from)
        }) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe_r.as_fd(), None, to.as_fd(), None, left, flags).map_err(io::Error::from)
            }) {
                Ok(m) => left = left.saturating_sub(m),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        moved.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = SockRef::from(to).shutdown(std::net::Shutdown::Write);
    Ok(())
}
