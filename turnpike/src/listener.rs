//! Accepting TCP connections for the gRPC and metrics ports without being the weak point:
//! a cap on open connections, an idle timeout, and an accept loop that backs off on
//! errors (at the descriptor limit `accept` fails at once, forever: retrying without a
//! pause spins a core) and keeps a spare descriptor to shed the connection that caused it.

use std::fs::File;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// A connection with no byte read or written for this long is closed.
    pub idle: Duration,
}

/// Counters of one listener.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted and served.
    pub accepted: AtomicU64,
    /// Connections closed at once because the cap was reached.
    pub refused: AtomicU64,
    /// `accept` errors (each followed by a pause).
    pub errors: AtomicU64,
    /// Connections closed for idleness.
    pub idle_closed: AtomicU64,
}

/// An accepted connection: holds its slot under the cap, closes when idle.
#[derive(Debug)]
pub struct Guarded {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    stats: Arc<Stats>,
}

impl Guarded {
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
        // One descriptor held back: at EMFILE it is closed to accept and shed the
        // pending connection, then taken again.
        let mut spare = File::open("/dev/null").ok();
        let mut pause = Duration::from_millis(10);
        let mut last_log: Option<Instant> = None;
        loop {
            let (sock, _) = match listener.accept().await {
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
                idle: limits.idle,
                timer: Box::pin(tokio::time::sleep(limits.idle)),
                stats: st.clone(),
            };
            if tx.send(Ok(g)).await.is_err() {
                return;
            }
        }
    });
    (rx, stats)
}
