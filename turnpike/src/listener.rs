//! Accepting TCP connections for the gRPC and metrics ports without being the weak point:
//! a cap on open connections in all and per source, decided at accept time before any
//! TLS or HTTP/2 work (so that one source cannot take every slot and lock operators out
//! of Admin), a first-byte and an idle timeout, and an accept loop that backs off on
//! errors (at the descriptor limit `accept` fails at once, forever: retrying without a
//! pause spins a core) and keeps a spare descriptor to shed the connection that caused it.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; more are accepted and closed at once.
    pub max_connections: usize,
    /// Connections open at once from one source (an IPv4 address, an IPv6 /64: one
    /// host gets a whole /64); more are accepted and closed at once.
    pub max_per_source: usize,
    /// A connection with no byte read from the client for this long is closed.
    pub idle: Duration,
    /// A connection whose client has sent nothing yet is closed after this long (or
    /// `idle`, if shorter): a connection that never starts TLS or HTTP/2 holds a slot
    /// for seconds, not minutes.
    pub first_byte: Duration,
}

/// Counters of one listener.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted and served.
    pub accepted: AtomicU64,
    /// Connections closed at once because the cap was reached.
    pub refused: AtomicU64,
    /// Connections closed at once because their source held its share of the cap.
    pub refused_per_source: AtomicU64,
    /// `accept` errors (each followed by a pause).
    pub errors: AtomicU64,
    /// Connections closed for idleness.
    pub idle_closed: AtomicU64,
}

/// The source a per-source cap counts: an IPv4 address (an IPv4-mapped IPv6 one
/// counts as that IPv4 address), or the /64 of an IPv6 address.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// Open connections per source, bounded by the listener's cap (an entry exists only
/// while its source has a connection open).
#[derive(Debug, Default)]
struct Sources(Mutex<HashMap<IpAddr, usize>>);

impl Sources {
    /// A slot for `source` if it holds fewer than `max`.
    fn take(self: &Arc<Self>, source: IpAddr, max: usize) -> Option<SourceSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(source).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            sources: self.clone(),
            source,
        })
    }
}

/// One connection's share of its source's cap, given back on drop.
#[derive(Debug)]
struct SourceSlot {
    sources: Arc<Sources>,
    source: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.sources.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.source);
            }
        }
    }
}

/// An accepted connection: holds its slots under the caps, closes when idle.
#[derive(Debug)]
pub struct Guarded {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
    _source: SourceSlot,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    stats: Arc<Stats>,
}

impl Guarded {
    /// A byte came from the client: from now on the idle timeout applies (the first
    /// one ends the shorter first-byte timeout).
    fn touch(&mut self) {
        self.timer.as_mut().reset(Instant::now() + self.idle);
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.timer.as_mut().poll(cx).is_ready() {
            self.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "idle connection closed")
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                if self.expired(cx) {
                    Poll::Ready(Err(timed_out()))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Only bytes from the client count as activity: a server writing to a client
        // that has gone quiet does not keep its connection open.
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepts on `listener` forever, handing guarded connections to the returned channel.
pub fn accept(
    listener: TcpListener,
    limits: Limits,
    what: &'static str,
) -> (mpsc::Receiver<io::Result<Guarded>>, Arc<Stats>) {
    let (tx, rx) = mpsc::channel(64);
    let stats = Arc::new(Stats::default());
    let st = stats.clone();
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let sources = Arc::new(Sources::default());
        let mut last_source_log: Option<Instant> = None;
        // One descriptor held back: at EMFILE it is closed to accept and shed the
        // pending connection, then taken again.
        let mut spare = File::open("/dev/null").ok();
        let mut pause = Duration::from_millis(10);
        let mut last_log: Option<Instant> = None;
        loop {
            let (sock, peer) = match listener.accept().await {
                Ok(s) => {
                    pause = Duration::from_millis(10);
                    s
                }
                Err(e) => {
                    st.errors.fetch_add(1, Ordering::Relaxed);
                    if last_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(listener = what, error = %e, "accept failed; backing off");
                        last_log = Some(Instant::now());
                    }
                    // EMFILE, ENFILE
                    if matches!(e.raw_os_error(), Some(23 | 24)) && spare.take().is_some() {
                        if let Ok((s, _)) = listener.accept().await {
                            drop(s);
                        }
                        spare = File::open("/dev/null").ok();
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            // Per source first: a source at its share is refused even while the listener
            // has room, so the room stays for the others.
            let Some(source) = sources.take(source_of(peer.ip()), limits.max_per_source) else {
                st.refused_per_source.fetch_add(1, Ordering::Relaxed);
                if last_source_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(
                        listener = what,
                        source = %source_of(peer.ip()),
                        max = limits.max_per_source,
                        "per-source connection limit reached; closing its new connections"
                    );
                    last_source_log = Some(Instant::now());
                }
                drop(sock);
                continue;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                st.refused.fetch_add(1, Ordering::Relaxed);
                if last_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(
                        listener = what,
                        max = limits.max_connections,
                        "connection limit reached; closing new connections"
                    );
                    last_log = Some(Instant::now());
                }
                drop(sock);
                continue;
            };
            let _ = sock.set_nodelay(true);
            st.accepted.fetch_add(1, Ordering::Relaxed);
            let g = Guarded {
                inner: sock,
                _permit: permit,
                _source: source,
                idle: limits.idle,
                timer: Box::pin(tokio::time::sleep(limits.first_byte.min(limits.idle))),
                stats: st.clone(),
            };
            if tx.send(Ok(g)).await.is_err() {
                return;
            }
        }
    });
    (rx, stats)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_64s() {
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
        assert_eq!(source_of(v4), v4);
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap_or(v4);
        assert_eq!(source_of(mapped), v4);
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap_or(v4);
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap_or(v4);
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap_or(v4);
        assert_eq!(source_of(a), source_of(b));
        assert_ne!(source_of(a), source_of(c));
    }

    #[test]
    fn a_source_gets_its_share_and_its_slots_back() {
        let sources = Arc::new(Sources::default());
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
        let held: Vec<_> = (0..3).filter_map(|_| sources.take(ip, 3)).collect();
        assert_eq!(held.len(), 3);
        assert!(sources.take(ip, 3).is_none());
        assert!(sources.take(other, 3).is_some());
        drop(held);
        assert!(sources.take(ip, 3).is_some());
        // No entry is left behind for a source with nothing open.
        assert!(sources.0.lock().map(|m| m.is_empty()).unwrap_or(false));
    }
}
