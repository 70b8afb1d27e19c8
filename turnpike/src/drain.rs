//! Stopping for maintenance: SIGTERM drains (no new allocations — redirected to another
//! instance of the fleet when one is known, else refused with 508 — while the existing
//! ones keep relaying until they end or `drain_grace` passes), then the process exits.
//! SIGINT, a second signal, or a grace of 0 stop at once.

use std::time::Duration;

use tokio::sync::watch;
use turnpike_controlplane_runtime::ControlPlaneHandle;

/// How the process was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGINT (Ctrl-C): at once.
    Now,
    /// SIGTERM: drain first.
    Drain,
    /// SIGUSR2: hand over to a new process of the binary at this one's path, then stop
    /// (`serve`; see `upgrade.rs`).
    Upgrade,
}

/// The signals a server waits for, listened to from its start: a signal that arrives
/// before the server waits for it is kept, not lost (nor does SIGUSR2's default action,
/// ending the process, apply).
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts listening (call within the runtime, before the server says it is ready).
    pub fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// The next of SIGINT, SIGTERM or SIGUSR2.
    pub async fn next(&mut self) -> Stop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => Stop::Now,
            _ = self.term.recv() => Stop::Drain,
            _ = self.usr2.recv() => Stop::Upgrade,
        }
    }
}

/// Waits for SIGINT, SIGTERM or SIGUSR2.
pub async fn signal() -> Stop {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut usr2)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::user_defined2()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return Stop::Now;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => Stop::Now,
        _ = term.recv() => Stop::Drain,
        _ = usr2.recv() => Stop::Upgrade,
    }
}

/// How long a drained process waits before stopping, so that the answers to the last
/// requests (a Refresh 0) are sent.
const REPLY_SETTLE: Duration = Duration::from_millis(500);

/// Drains the instance of `cp` for at most `grace`: marks it drained (`draining` tells
/// the fleet registry, which redirects its new clients), then waits until it holds no
/// allocation, the grace passes, or another signal arrives.
pub async fn drain(cp: &ControlPlaneHandle, grace: Duration, draining: &watch::Sender<bool>) {
    let _ = draining.send(true);
    // New allocations go where the fleet last said a drained instance's clients go
    // (300 Try Alternate), at once; 508 when it knows no other instance. The fleet task
    // publishes the drain in the registry.
    if cp.set_self_draining(true).await.is_err() {
        return;
    }
    let left =
        |s: &turnpike_api::v1::GetStatsResponse| s.totals.as_ref().map_or(0, |t| t.allocations);
    let start = left(&cp.stats().await.unwrap_or_default());
    tracing::info!(
        allocations = start,
        grace_secs = grace.as_secs(),
        "draining: new allocations go elsewhere; waiting for the existing ones to end"
    );
    println!(
        "turnpike draining: {start} allocations, up to {} s",
        grace.as_secs()
    );
    let deadline = tokio::time::Instant::now() + grace;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!("drain grace over; stopping with allocations left");
                return;
            }
            _ = signal() => {
                tracing::warn!("second signal: stopping now");
                return;
            }
        }
        let n = left(&cp.stats().await.unwrap_or_default());
        if n == 0 {
            tracing::info!("drained: no allocation left");
            // The last allocation usually ends with a Refresh 0 (or a TCP close) whose
            // answer the control plane has just made: let it reach the data plane and
            // leave before the process stops.
            tokio::time::sleep(REPLY_SETTLE).await;
            return;
        }
    }
}
