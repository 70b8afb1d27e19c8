//! Split mode with etcd: the control planes of a cell elect one leader (etcd's election
//! API, under `/turnpike/<fleet>/cells/<cell>/leader`, the value being the leader's
//! gRPC URL), and the data planes follow whoever leads.
//!
//! A leader holds its leadership with a lease of [`LEASE_TTL`] seconds. If it cannot
//! renew it (etcd unreachable, or the lease revoked) it exits at once: a control plane
//! that might no longer lead must not keep serving the cell, and a fresh process (the
//! supervisor restarts it) campaigns again with clean state. (Staying up would mean
//! leading again with the cell as it was: the cluster keeps a detached data plane's
//! allocations for its return, while another leader may have ended them and given their
//! ports and ids to others.) A follower refuses data planes and Admin calls
//! (`unavailable`, naming the leader it observes). When the leader dies, its lease
//! expires and the next campaigner is elected: it reads the fleet's shared configuration,
//! then accepts data planes, which move to it and send it their tables, from which it
//! rebuilds the cell, as after a restart. Relaying never depends on a leader.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tonic::transport::Endpoint;
use turnpike_controlplane_runtime::ControlPlaneHandle;
use turnpike_controlplane_runtime::etcd::{Etcd, LeaderKey, LeaseState, WatchEvent};

use crate::config::FleetConfig;

/// Seconds a dead leader keeps its leadership. etcd raises a shorter TTL to its minimum,
/// 1.5 election timeouts rounded up (2 s with etcd's default 1 s election timeout), and
/// the keep-alive counts with the TTL etcd actually granted.
pub const LEASE_TTL: i64 = 3;

/// The election of `f`'s cell.
fn election(f: &FleetConfig) -> String {
    format!("{}cells/{}/leader", crate::fleet::prefix(&f.name), f.cell)
}

/// The leadership held, to resign it at shutdown.
pub type Held = Arc<Mutex<Option<(Etcd, LeaderKey)>>>;

/// Campaigns until elected, then leads until the leadership is lost (then exits the
/// process). `cp` refuses data planes until elected, naming the leader it observes.
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
        backoff = Duration::from_millis(200);
        let observer = tokio::spawn(observe(etcd.clone(), name.clone(), cp.clone()));
        let won = tokio::select! {
            r = etcd.campaign(&name, url.as_bytes(), lease) => Some(r),
            loss = keep.lost() => {
                tracing::warn!(%loss, "campaign lease lost; campaigning again");
                None
            }
        };
        observer.abort();
        let key = match won {
            Some(Ok(k)) => k,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "campaign failed; retrying");
                // Withdraw the candidacy now rather than when its lease expires: a
                // candidacy nobody answers for could be elected meanwhile.
                let _ = etcd.lease_revoke(lease).await;
                tokio::time::sleep(backoff).await;
                continue;
            }
            None => continue,
        };
        // The fleet's secrets and revoked users before the first data plane: a new
        // leader answers as the old one did.
        if let Err(e) = crate::fleet::load_shared(&etcd, &f.name, &cp).await {
            tracing::warn!(error = %e, "fleet configuration not read; leading with the local one");
        }
        *held.lock().await = Some((etcd.clone(), key.clone()));
        if matches!(keep.state(), LeaseState::Alive { .. }) {
            cp.set_known_leader(Some(url.clone()));
            cp.set_leader(true);
            tracing::info!(election = %name, %url, "elected leader of the cell");
            println!("turnpike control plane: elected leader of cell {}", f.cell);
        }
        let loss = tokio::select! {
            loss = keep.lost() => loss.to_string(),
            () = deleted(&etcd, &key) => "its election key was deleted".to_owned(),
        };
        if held.lock().await.is_none() {
            // Resigned here (shutdown): the process is on its way out.
            return;
        }
        cp.set_leader(false);
        tracing::error!(%loss, "leadership lost: exiting so that no two control planes lead the cell");
        eprintln!(
            "turnpike: leadership of cell {} lost ({loss}); exiting",
            f.cell
        );
        std::process::exit(75);
    }
}

/// Returns when the key that holds `leader` is deleted (resigned, or its lease revoked):
/// etcd's watch says so at once, the keep-alive only at its next renewal. While it cannot
/// watch it retries, and the keep-alive guards the lease meanwhile.
async fn deleted(etcd: &Etcd, leader: &LeaderKey) {
    let key = String::from_utf8_lossy(&leader.key).into_owned();
    let mut from = leader.rev + 1;
    loop {
        if let Ok(mut events) = etcd.watch_prefix(&key, from).await {
            while let Some(ev) = events.recv().await {
                if matches!(&ev, WatchEvent::Delete { key: k, .. } if *k == key) {
                    return;
                }
            }
        }
        // The watch failed or lost its history (compaction): look, then watch again.
        match etcd.get_prefix(&key).await {
            Ok(l) if !l.entries.iter().any(|(k, _)| *k == key) => return,
            Ok(l) => from = l.revision + 1,
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Keeps `cp` told who leads election `name` (a follower's refusals name the leader).
async fn observe(etcd: Etcd, name: String, cp: ControlPlaneHandle) {
    let mut leaders = etcd.observe(&name);
    while let Some(v) = leaders.recv().await {
        cp.set_known_leader(Some(String::from_utf8_lossy(&v).into_owned()));
    }
}

/// Resigns a leadership held (at shutdown), so that another control plane takes over at
/// once rather than after the lease expires. The data planes' streams are closed first:
/// once resigned, another control plane may lead at once, and two never serve the cell
/// together.
pub async fn resign(held: &Held, cp: &ControlPlaneHandle) {
    if let Some((etcd, key)) = held.lock().await.take() {
        cp.step_down().await;
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
