//! The agent's gRPC adapter (split mode): attaches to a fixed control plane, or to the
//! cell's elected leader as etcd names it, over mutual TLS; converts [`Up`] and
//! [`Down`] to and from the wire (deadlines leave and arrive as durations, on this
//! plane's clock).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Endpoint;
use turnpike_api::convert::{At, down_from_api, up_to_api};
use turnpike_api::v1::{self, control_plane_client::ControlPlaneClient};
use turnpike_plane::{Clock, Down, Punted, Up};

use super::{AttachError, Connect, DownLink, Refused, UpLink};

/// Punt messages (each up to [`super::session::PUNT_BATCH`] requests) queued towards
/// the control plane at most; beyond, punts are dropped and counted as the queue's
/// drops, so that a flood is shed here instead of filling the stream's queue with half a
/// million requests (issue #25 N4).
const PUNTS_QUEUED: usize = 32;

/// Messages queued on the stream up at most.
const UP_QUEUE: usize = 8192;

/// Reaches the control plane `control` names, over gRPC.
#[derive(Debug)]
pub struct Grpc {
    control: watch::Receiver<Option<Endpoint>>,
    /// Kept so that a fixed control plane's channel stays open.
    _keep: Option<watch::Sender<Option<Endpoint>>>,
    endpoint: Option<Endpoint>,
    backoff: Duration,
    /// Whether `control` can still change (its sender is alive).
    follow: bool,
}

impl Grpc {
    /// The control plane at `control` (with its TLS configuration: the control plane
    /// refuses a stream without a client certificate).
    pub fn fixed(control: Endpoint) -> Grpc {
        let (keep, rx) = watch::channel(Some(control));
        let mut g = Grpc::following(rx);
        g._keep = Some(keep);
        g
    }

    /// Whichever control plane `control` names (the leader of the cell, followed
    /// through etcd): when it changes, the stream to the previous one is dropped and the
    /// agent attaches to the new one at once, sending its whole table. `None`: no
    /// control plane is known; existing allocations keep relaying.
    pub fn following(control: watch::Receiver<Option<Endpoint>>) -> Grpc {
        Grpc {
            control,
            _keep: None,
            endpoint: None,
            backoff: BACKOFF_MIN,
            follow: true,
        }
    }
}

/// The stream up.
#[derive(Debug)]
pub struct GrpcUp {
    tx: mpsc::Sender<Up>,
    punts_queued: Arc<AtomicUsize>,
}

impl UpLink for GrpcUp {
    fn try_punts(&self, p: Vec<Punted>) -> Result<(), Refused> {
        if self.punts_queued.load(Ordering::Relaxed) >= PUNTS_QUEUED {
            return Err(Refused::Full);
        }
        self.punts_queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Up::Punted(p)) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.punts_queued.fetch_sub(1, Ordering::Relaxed);
                match e {
                    mpsc::error::TrySendError::Full(_) => Err(Refused::Full),
                    mpsc::error::TrySendError::Closed(_) => Err(Refused::Closed),
                }
            }
        }
    }

    async fn send(&self, m: Up) -> Result<(), Refused> {
        self.tx.send(m).await.map_err(|_| Refused::Closed)
    }
}

/// The stream down.
#[derive(Debug)]
pub struct GrpcDown {
    stream: Streaming<v1::ControlPlaneMessage>,
}

impl DownLink for GrpcDown {
    async fn recv(&mut self) -> Option<Down> {
        loop {
            let m = self.stream.message().await.ok()??;
            match down_from_api(&m, At::of(&Clock::new())) {
                Ok(d) => return Some(d),
                // A batch left out here shows as a gap, and comes again.
                Err(e) => {
                    tracing::warn!(error = %e, "invalid message from the control plane; ignored")
                }
            }
        }
    }
}

impl Connect for Grpc {
    type Up = GrpcUp;
    type Down = GrpcDown;

    fn target(&mut self) -> Option<String> {
        self.endpoint = self.control.borrow_and_update().clone();
        self.endpoint.as_ref().map(|e| e.uri().to_string())
    }

    async fn attach(&mut self, opening: Vec<Up>) -> Result<(GrpcUp, GrpcDown), AttachError> {
        let endpoint = self
            .endpoint
            .clone()
            .ok_or_else(|| AttachError::Unreachable("no control plane known".to_owned()))?;
        // HTTP/2 keepalives notice a control plane that vanished without closing the
        // connection (a crashed host, a partition) within a few seconds.
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| AttachError::Unreachable(e.to_string()))?;
        let (tx, rx) = mpsc::channel::<Up>(UP_QUEUE);
        for m in opening {
            tx.send(m)
                .await
                .map_err(|e| AttachError::Unreachable(e.to_string()))?;
        }
        let punts_queued = Arc::new(AtomicUsize::new(0));
        let taken = Arc::clone(&punts_queued);
        let clock = Clock::new();
        // Deadlines leave as durations, measured as each message is taken for sending.
        let up = ReceiverStream::new(rx).map(move |m| {
            if matches!(m, Up::Punted(_)) {
                taken.fetch_sub(1, Ordering::Relaxed);
            }
            up_to_api(m, At::of(&clock))
        });
        let mut client = ControlPlaneClient::new(channel).max_decoding_message_size(16 << 20);
        let stream = client
            .attach(up)
            .await
            .map_err(|e| AttachError::Refused(e.to_string()))?
            .into_inner();
        Ok((GrpcUp { tx, punts_queued }, GrpcDown { stream }))
    }

    async fn changed(&mut self) {
        if !self.follow {
            return std::future::pending().await;
        }
        let current = self.endpoint.as_ref().map(|e| e.uri().to_string());
        loop {
            if self.control.changed().await.is_err() {
                self.follow = false;
                return std::future::pending().await;
            }
            let now = self.control.borrow().as_ref().map(|e| e.uri().to_string());
            if now != current {
                self.backoff = BACKOFF_AFTER_CHANGE;
                return;
            }
        }
    }

    async fn backoff(&mut self) {
        wait_or_change(&mut self.control, &mut self.backoff, &mut self.follow).await;
    }

    fn attached(&mut self) {
        self.backoff = BACKOFF_MIN;
    }
}

/// The first wait before attaching again.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The first wait after a change of control plane: a new leader refuses until it knows
/// it leads (it reads the fleet's configuration first), which takes milliseconds.
const BACKOFF_AFTER_CHANGE: Duration = Duration::from_millis(25);
/// The longest wait before attaching again.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Waits `backoff` before the next attempt, or less if `control` names another control
/// plane meanwhile; then sets the next wait. A new control plane (a new leader) is
/// tried at once and, if it refuses (it may not know yet that it leads), again after
/// [`BACKOFF_AFTER_CHANGE`]: the backoff built up against the previous one does not
/// carry over.
async fn wait_or_change(
    control: &mut watch::Receiver<Option<Endpoint>>,
    backoff: &mut Duration,
    follow: &mut bool,
) {
    let wait = *backoff;
    *backoff = (wait * 2).min(BACKOFF_MAX);
    if !*follow {
        tokio::time::sleep(wait).await;
        return;
    }
    let start = tokio::time::Instant::now();
    match tokio::time::timeout(wait, control.changed()).await {
        Ok(Ok(())) => *backoff = BACKOFF_AFTER_CHANGE,
        Ok(Err(_)) => {
            *follow = false;
            tokio::time::sleep_until(start + wait).await;
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]
    use super::*;

    fn endpoint(port: u16) -> Endpoint {
        Endpoint::from_shared(format!("https://127.0.0.1:{port}")).unwrap()
    }

    #[tokio::test]
    async fn a_new_control_plane_cuts_the_wait_and_resets_the_backoff() {
        let (tx, mut rx) = watch::channel(Some(endpoint(1)));
        rx.borrow_and_update();
        let (mut backoff, mut follow) = (BACKOFF_MAX, true);
        let started = tokio::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx.send(Some(endpoint(2)));
            // Keep the sender: the agent still follows.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        wait_or_change(&mut rx, &mut backoff, &mut follow).await;
        assert!(started.elapsed() < BACKOFF_MAX / 2);
        assert_eq!(backoff, BACKOFF_AFTER_CHANGE);
        assert!(follow);
    }

    #[tokio::test]
    async fn without_a_change_the_backoff_doubles_up_to_its_bound() {
        let (_tx, mut rx) = watch::channel(Some(endpoint(1)));
        rx.borrow_and_update();
        let (mut backoff, mut follow) = (Duration::from_millis(10), true);
        wait_or_change(&mut rx, &mut backoff, &mut follow).await;
        assert_eq!(backoff, Duration::from_millis(20));
        let mut backoff = Duration::from_millis(1500);
        wait_or_change(&mut rx, &mut backoff, &mut follow).await;
        assert_eq!(backoff, BACKOFF_MAX);
    }

    #[tokio::test]
    async fn a_fixed_control_plane_just_waits() {
        let (tx, mut rx) = watch::channel(Some(endpoint(1)));
        drop(tx);
        let (mut backoff, mut follow) = (Duration::from_millis(10), true);
        let started = tokio::time::Instant::now();
        wait_or_change(&mut rx, &mut backoff, &mut follow).await;
        assert!(started.elapsed() >= Duration::from_millis(10));
        assert!(!follow);
        assert_eq!(backoff, Duration::from_millis(20));
    }
}
