//! Split mode with etcd: the control planes of a cell elect one leader (etcd's election
//! API, under `/turnpike/<fleet>/cells/<cell>/leader`, the value being the leader's
//! gRPC URL), and the data planes follow whoever leads.
//!
//! A leader holds its leadership with a lease of [`LEASE_TTL`] seconds. If it cannot
//! renew it (etcd unreachable, or the lease revoked) it exits at once: a control plane
//! that might no longer lead must not keep serving the cell, and a fresh process (the
//! supervisor restarts it) campaigns again with clean state. A follower refuses data
//! planes (`unavailable`). When the leader dies, its lease expires and the next
//! campaigner is elected; data planes move to it and send it their tables, from which it
//! rebuilds the cell, as after a restart. Relaying never depends on a leader.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tonic::transport::Endpoint;
use turnpike_controlplane::ControlPlaneHandle;
use turnpike_controlplane::etcd::{Etcd, LeaderKey};

use crate::config::FleetConfig;

/// Seconds a dead leader keeps its leadership.
pub const LEASE_TTL: i64 = 3;

/// The election of `f`'s cell.
fn election(f: &FleetConfig) -> String {
    format!("{}cells/{}/leader", crate::fleet::prefix(&f.name), f.cell)
}

/// The leadership held, to resign it at shutdown.
pub type Held = Arc<Mutex<Option<(Etcd, LeaderKey)>>>;

/// Campaigns until elected, then leads until the leadership is lost (then exits the
/// process). `cp` refuses data planes until elected.
pub async fn campaign(f: FleetConfig, url: String, cp: ControlPlaneHandle, held: Held) {
    cp.set_leader(false);
    let name = election(&f);
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = async {
            let etcd = Etcd::connect(&f.etcd).await?;
            let lease = etcd.lease_grant(LEASE_TTL).await?;
            let keep = etcd.keep_alive(lease).await?;
            tracing::info!(election = %name, "campaigning for the leadership of the cell");
            anyhow::Ok((etcd, lease, keep))
        };
        let (etcd, lease, mut keep) = match attempt.await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot campaign; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let won = tokio::select! {
            r = etcd.campaign(&name, url.as_bytes(), lease) => r,
            loss = keep.lost() => {
                tracing::warn!(%loss, "campaign lease lost; campaigning again");
                continue;
            }
        };
        let key = match won {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "campaign failed; retrying");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        *held.lock().await = Some((etcd.clone(), key));
        cp.set_leader(true);
        tracing::info!(election = %name, %url, "elected leader of the cell");
        println!("turnpike control plane: elected leader of cell {}", f.cell);
        let loss = keep.lost().await;
        cp.set_leader(false);
        tracing::error!(%loss, "leadership lost: exiting so that no two control planes lead the cell");
        eprintln!(
            "turnpike: leadership of cell {} lost ({loss}); exiting",
            f.cell
        );
        std::process::exit(75);
    }
}

/// Resigns a leadership held (at shutdown), so that another control plane takes over at
/// once rather than after the lease expires.
pub async fn resign(held: &Held) {
    if let Some((etcd, key)) = held.lock().await.take() {
        match etcd.resign(&key).await {
            Ok(()) => tracing::info!("leadership resigned"),
            Err(e) => {
                tracing::warn!(error = %e, "leadership not resigned; it expires with its lease")
            }
        }
    }
}

/// Follows the leader of `f`'s cell: `tx` gets the endpoint `make` builds for each new
/// leader's URL (`None` while nobody leads). Runs forever.
pub async fn follow(
    f: FleetConfig,
    tx: watch::Sender<Option<Endpoint>>,
    make: impl Fn(&str) -> anyhow::Result<Endpoint>,
) {
    let name = election(&f);
    let mut backoff = Duration::from_millis(200);
    loop {
        let etcd = match Etcd::connect(&f.etcd).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach etcd to follow the leader; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        let mut leaders = etcd.observe(&name);
        let mut current: Option<String> = None;
        if let Ok(Some(v)) = etcd.leader(&name).await {
            apply(&tx, &make, &mut current, &v);
        }
        while let Some(v) = leaders.recv().await {
            apply(&tx, &make, &mut current, &v);
        }
        tracing::warn!("leader observation ended; observing again");
        tokio::time::sleep(backoff).await;
    }
}

fn apply(
    tx: &watch::Sender<Option<Endpoint>>,
    make: &impl Fn(&str) -> anyhow::Result<Endpoint>,
    current: &mut Option<String>,
    value: &[u8],
) {
    let url = String::from_utf8_lossy(value).into_owned();
    if current.as_deref() == Some(url.as_str()) {
        return;
    }
    match make(&url) {
        Ok(ep) => {
            tracing::info!(leader = %url, "the cell's leader");
            *current = Some(url);
            let _ = tx.send(Some(ep));
        }
        Err(e) => {
            tracing::warn!(leader = %url, error = %format!("{e:#}"), "unusable leader address")
        }
    }
}
