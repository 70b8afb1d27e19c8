//! `turnpike_controlplane_runtime::etcd` against a real etcd: each test starts its own etcd
//! (`/usr/bin/etcd`, or `$ETCD_BIN`) on free loopback ports with a data directory of its
//! own, waits until it answers, and kills it and removes the directory when done.
//!
//! Without etcd the tests print SKIP and pass, except when `CI` is set to a true value
//! (`true`, `1`, `yes`, `on`), where they fail: a green CI run means etcd really ran.
//! `tests/scripts/setup-deps.sh` installs it (Debian's `etcd-server` and `etcd-client`).
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use std::{env, fs};

use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout};
use turnpike_controlplane_runtime::etcd::{Etcd, EtcdError, LeaseLoss, LeaseState, WatchEvent};

/// How long etcd may take to answer after it is started.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// How long a test waits for something that should happen.
const WAIT: Duration = Duration::from_secs(10);
/// Attempts at starting etcd on ports found free: such a port can be taken before etcd
/// binds it (by another test's etcd, or as the source port of a connection).
const PORT_ATTEMPTS: usize = 5;

/// A running etcd, killed (by its PID) and its directory removed on drop.
struct EtcdProcess {
    bin: PathBuf,
    /// Holds the data directory `data` and the log `etcd.log`.
    root: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdProcess {
    /// Starts etcd, or returns `None` (after printing SKIP) if it is not installed and
    /// `CI` is not set.
    async fn start() -> Option<Self> {
        let bin = etcd_binary()?;
        for attempt in 1..=PORT_ATTEMPTS {
            // Two ports at once, so that they differ.
            let client = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let peer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client_port = client.local_addr().unwrap().port();
            let peer_port = peer.local_addr().unwrap().port();
            drop((client, peer));
            let root = env::temp_dir().join(format!(
                "turnpike-etcd-test-{}-{client_port}",
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(&root).unwrap();
            let mut etcd = Self {
                bin: bin.clone(),
                root,
                client_port,
                peer_port,
                child: None,
            };
            match etcd.spawn().await {
                Ok(()) => return Some(etcd),
                Err(log) => eprintln!("etcd: a port was taken (attempt {attempt}): {log}"),
            }
        }
        panic!("etcd: no free ports in {PORT_ATTEMPTS} attempts");
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn urls(&self) -> Vec<String> {
        vec![self.url()]
    }

    /// Starts etcd and waits until it answers. Fails with etcd's log if one of its ports
    /// is taken; any other failure panics.
    async fn spawn(&mut self) -> Result<(), String> {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("etcd.log"))
            .unwrap();
        let child = Command::new(&self.bin)
            .arg("--name=default")
            .arg(format!("--data-dir={}", self.root.join("data").display()))
            .arg(format!("--listen-client-urls={}", self.url()))
            .arg(format!("--advertise-client-urls={}", self.url()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=default={peer}"))
            .args(["--logger=zap", "--log-outputs=stderr", "--log-level=warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
        self.wait_ready().await
    }

    /// Waits until a linearizable read succeeds (the member has elected itself).
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                let log = self.log_tail();
                if log.contains("address already in use") {
                    return Err(log);
                }
                panic!("etcd exited with {status}; log:\n{log}");
            }
            if let Ok(etcd) = Etcd::connect(&self.urls()).await
                && etcd.get("readiness-probe").await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                panic!(
                    "etcd at {} not ready within {READY_WITHIN:?}; log:\n{}",
                    self.url(),
                    self.log_tail()
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills etcd (SIGKILL: nothing is flushed on the way out) and waits for it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd and starts it again on the same ports and data.
    async fn restart(&mut self) {
        self.kill();
        for attempt in 1..=PORT_ATTEMPTS {
            match self.spawn().await {
                Ok(()) => return,
                Err(log) => {
                    eprintln!("etcd: a port is still taken (attempt {attempt}): {log}");
                    sleep(Duration::from_millis(500)).await;
                }
            }
        }
        panic!("etcd: its ports stayed taken for {PORT_ATTEMPTS} attempts");
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.root.join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// The etcd binary, or `None` (SKIP) if it is missing and `CI` is not set.
fn etcd_binary() -> Option<PathBuf> {
    let bin = env::var_os("ETCD_BIN").map_or_else(|| PathBuf::from("/usr/bin/etcd"), PathBuf::from);
    if bin.is_file() {
        return Some(bin);
    }
    let ci = env::var("CI").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "true" | "1" | "yes" | "on"
        )
    });
    assert!(
        !ci,
        "{} not found and CI is set: install etcd-server (tests/scripts/setup-deps.sh)",
        bin.display()
    );
    eprintln!(
        "SKIP: {} not found (install etcd-server, or run tests/scripts/setup-deps.sh)",
        bin.display()
    );
    None
}

/// `etcdctl`, beside the etcd binary or in /usr/bin.
fn etcdctl(etcd: &EtcdProcess) -> Option<PathBuf> {
    let beside = etcd.bin.with_file_name("etcdctl");
    [beside.as_path(), Path::new("/usr/bin/etcdctl")]
        .into_iter()
        .find(|p| p.is_file())
        .map(Path::to_path_buf)
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
}

async fn next_event(events: &mut mpsc::Receiver<WatchEvent>) -> WatchEvent {
    within("watch", events.recv())
        .await
        .expect("the watch stream ended")
}

/// Polls `check` until it holds, for at most `limit`.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        sleep(Duration::from_millis(100)).await;
    }
}

fn put(key: &str, value: &str, revision: i64) -> WatchEvent {
    WatchEvent::Put {
        key: key.to_string(),
        value: value.as_bytes().to_vec(),
        revision,
    }
}

fn delete(key: &str, revision: i64) -> WatchEvent {
    WatchEvent::Delete {
        key: key.to_string(),
        revision,
    }
}

#[tokio::test]
async fn connect_reports_unreachable_endpoints_and_skips_them() {
    let Some(etcd) = EtcdProcess::start().await else {
        return;
    };
    // A port nobody listens on.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);

    let error = Etcd::connect(std::slice::from_ref(&dead))
        .await
        .unwrap_err();
    assert!(matches!(error, EtcdError::Unreachable { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("etcd unreachable at {dead}")),
        "{message}"
    );
    assert_eq!(
        Etcd::connect(&[]).await.unwrap_err(),
        EtcdError::NoEndpoints
    );
    assert!(matches!(
        Etcd::connect(&["not a url".to_string()]).await.unwrap_err(),
        EtcdError::InvalidEndpoint { .. }
    ));

    let client = Etcd::connect(&[dead, etcd.url()]).await.unwrap();
    assert_eq!(client.endpoint(), etcd.url());
    client.put("k", b"v", None).await.unwrap();
}

#[tokio::test]
async fn put_get_prefix_delete() {
    let Some(etcd) = EtcdProcess::start().await else {
        return;
    };
    let client = Etcd::connect(&etcd.urls()).await.unwrap();

    let rev_a = client.put("/kv/a", b"1", None).await.unwrap();
    let rev_b = client.put("/kv/b", b"2", None).await.unwrap();
    client.put("/kv/c/d", b"3", None).await.unwrap();
    client.put("/kw", b"outside", None).await.unwrap();
    assert!(rev_b > rev_a);
    assert_eq!(
        client.get("/kv/a").await.unwrap(),
        Some((b"1".to_vec(), rev_a))
    );
    assert_eq!(client.get("/kv/missing").await.unwrap(), None);

    let listing = client.get_prefix("/kv/").await.unwrap();
    let keys: Vec<&str> = listing.entries.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["/kv/a", "/kv/b", "/kv/c/d"]);
    assert_eq!(listing.entries[2].1, b"3");
    assert_eq!(listing.revision, rev_b + 2);

    // An overwrite moves the revision on.
    let rev_a2 = client.put("/kv/a", b"1bis", None).await.unwrap();
    assert_eq!(
        client.get("/kv/a").await.unwrap(),
        Some((b"1bis".to_vec(), rev_a2))
    );

    assert!(client.delete("/kv/a").await.unwrap());
    assert!(!client.delete("/kv/a").await.unwrap());
    assert_eq!(client.delete_prefix("/kv/").await.unwrap(), 2);
    assert!(client.get_prefix("/kv/").await.unwrap().entries.is_empty());
    assert!(client.get("/kw").await.unwrap().is_some());

    // More keys than one page: every key, once, in order.
    let mut puts = tokio::task::JoinSet::new();
    for i in 0..1100 {
        let client = client.clone();
        puts.spawn(async move {
            client
                .put(&format!("/many/{i:04}"), i.to_string().as_bytes(), None)
                .await
        });
    }
    while let Some(done) = puts.join_next().await {
        done.unwrap().unwrap();
    }
    let many = client.get_prefix("/many/").await.unwrap();
    assert_eq!(many.entries.len(), 1100);
    for (i, (key, value)) in many.entries.iter().enumerate() {
        assert_eq!(key, &format!("/many/{i:04}"));
        assert_eq!(value, i.to_string().as_bytes());
    }
    assert_eq!(client.delete_prefix("/many/").await.unwrap(), 1100);
}

#[tokio::test]
async fn put_if_absent_has_one_winner() {
    let Some(etcd) = EtcdProcess::start().await else {
        return;
    };
    let first = Etcd::connect(&etcd.urls()).await.unwrap();
    let second = Etcd::connect(&etcd.urls()).await.unwrap();
    for round in 0..20 {
        let key = format!("/claim/{round}");
        let (a, b) = tokio::join!(
            first.put_if_absent(&key, b"first", None),
            second.put_if_absent(&key, b"second", None)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(a != b, "round {round}: exactly one caller wins ({a}, {b})");
        let winner: &[u8] = if a { b"first" } else { b"second" };
        assert_eq!(first.get(&key).await.unwrap().unwrap().0, winner);
    }
    assert!(
        !first
            .put_if_absent("/claim/0", b"late", None)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn leases_expire_without_keep_alive_and_last_with_it() {
    let Some(mut etcd) = EtcdProcess::start().await else {
        return;
    };
    let client = Etcd::connect(&etcd.urls()).await.unwrap();

    let idle = client.lease_grant(2).await.unwrap();
    let kept = client.lease_grant(2).await.unwrap();
    client.put("/lease/idle", b"x", Some(idle)).await.unwrap();
    client.put("/lease/kept", b"y", Some(kept)).await.unwrap();
    let mut keep_alive = client.keep_alive(kept).await.unwrap();
    assert_eq!(keep_alive.id(), kept);
    assert!(matches!(keep_alive.state(), LeaseState::Alive { .. }));
    let started = Instant::now();

    eventually("the key of the idle lease is deleted", WAIT, || async {
        client.get("/lease/idle").await.unwrap().is_none()
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "expired too early"
    );
    assert_eq!(client.lease_time_to_live(idle).await.unwrap(), None);
    assert_eq!(
        client
            .put("/lease/late", b"z", Some(idle))
            .await
            .unwrap_err(),
        EtcdError::LeaseNotFound(idle)
    );
    assert_eq!(
        client.keep_alive(idle).await.unwrap_err(),
        EtcdError::LeaseNotFound(idle)
    );

    // Three TTLs on, the kept key is still there.
    sleep(Duration::from_secs(6).saturating_sub(started.elapsed())).await;
    assert_eq!(client.get("/lease/kept").await.unwrap().unwrap().0, b"y");
    assert!(
        matches!(keep_alive.state(), LeaseState::Alive { ttl } if ttl <= Duration::from_secs(2))
    );
    assert!(client.lease_time_to_live(kept).await.unwrap().is_some());

    // Revoked: the key goes at once and the keep-alive reports the loss.
    client.lease_revoke(kept).await.unwrap();
    assert!(client.get("/lease/kept").await.unwrap().is_none());
    assert_eq!(
        within("lease loss", keep_alive.lost()).await,
        LeaseLoss::NotFound
    );
    assert_eq!(keep_alive.state(), LeaseState::Lost(LeaseLoss::NotFound));

    // Dropping the handle stops the renewals: the lease then expires.
    let dropped = client.lease_grant(2).await.unwrap();
    client
        .put("/lease/dropped", b"w", Some(dropped))
        .await
        .unwrap();
    let keep_alive = client.keep_alive(dropped).await.unwrap();
    sleep(Duration::from_secs(3)).await;
    assert!(client.get("/lease/dropped").await.unwrap().is_some());
    drop(keep_alive);
    eventually(
        "the key of the dropped keep-alive is deleted",
        WAIT,
        || async { client.get("/lease/dropped").await.unwrap().is_none() },
    )
    .await;

    // etcd gone: calls fail as unreachable, and within a TTL the keep-alive can no
    // longer vouch for its lease.
    let orphan = client.lease_grant(2).await.unwrap();
    let mut keep_alive = client.keep_alive(orphan).await.unwrap();
    etcd.kill();
    let error = client.get("/lease/kept").await.unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with(&format!("etcd unreachable at {}", etcd.url())),
        "{error}"
    );
    assert_eq!(
        within("lease loss", keep_alive.lost()).await,
        LeaseLoss::Unconfirmed
    );
}

#[tokio::test]
async fn watch_sees_changes_in_order_and_resumes_after_a_restart() {
    let Some(mut etcd) = EtcdProcess::start().await else {
        return;
    };
    let client = Etcd::connect(&etcd.urls()).await.unwrap();
    let before = client.put("/w/before", b"0", None).await.unwrap();
    let mut events = client.watch_prefix("/w/", 0).await.unwrap();
    // From an earlier revision, the history is replayed.
    let mut replay = client.watch_prefix("/w/", before).await.unwrap();

    let r1 = client.put("/w/a", b"1", None).await.unwrap();
    let r2 = client.put("/w/b", b"2", None).await.unwrap();
    client.put("/x/outside", b"-", None).await.unwrap();
    assert!(client.delete("/w/a").await.unwrap());
    let r4 = r2 + 2;
    assert!(client.put_if_absent("/w/c", b"3", None).await.unwrap());
    let r5 = r4 + 1;
    let expected = [
        put("/w/a", "1", r1),
        put("/w/b", "2", r2),
        delete("/w/a", r4),
        put("/w/c", "3", r5),
    ];
    for want in &expected {
        assert_eq!(&next_event(&mut events).await, want);
    }
    assert_eq!(next_event(&mut replay).await, put("/w/before", "0", before));
    for want in &expected {
        assert_eq!(&next_event(&mut replay).await, want);
    }

    // etcd goes away and comes back: writes made before the watch is resumed, right
    // after the restart, still arrive, once and in order.
    etcd.restart().await;
    let writer = Etcd::connect(&etcd.urls()).await.unwrap();
    let r6 = writer.put("/w/d", b"4", None).await.unwrap();
    assert!(writer.delete("/w/b").await.unwrap());
    let r8 = writer.put("/w/e", b"5", None).await.unwrap();
    assert_eq!(r8, r6 + 2);
    let expected = [
        put("/w/d", "4", r6),
        delete("/w/b", r6 + 1),
        put("/w/e", "5", r8),
    ];
    for want in &expected {
        assert_eq!(&next_event(&mut events).await, want);
    }
    // The first client's own connection comes back too.
    eventually("the first client works again", WAIT, || async {
        client.get("/w/e").await.is_ok()
    })
    .await;
    let r9 = client.put("/w/f", b"6", None).await.unwrap();
    assert_eq!(next_event(&mut events).await, put("/w/f", "6", r9));
    assert!(events.try_recv().is_err(), "no event twice");
}

#[tokio::test]
async fn watch_reports_compacted_history() {
    let Some(etcd) = EtcdProcess::start().await else {
        return;
    };
    let Some(etcdctl) = etcdctl(&etcd) else {
        eprintln!("SKIP: etcdctl not found (install etcd-client)");
        return;
    };
    let client = Etcd::connect(&etcd.urls()).await.unwrap();
    let first = client.put("/c/k", b"1", None).await.unwrap();
    client.put("/c/k", b"2", None).await.unwrap();
    let last = client.put("/c/k", b"3", None).await.unwrap();
    let status = Command::new(&etcdctl)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.url(), "compact", &last.to_string()])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "etcdctl compact failed");

    let mut events = client.watch_prefix("/c/", first).await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        WatchEvent::Compacted {
            compact_revision: last
        }
    );
    assert!(within("end of stream", events.recv()).await.is_none());
}

#[tokio::test]
async fn election_passes_on_resign_and_on_lease_loss() {
    let Some(etcd) = EtcdProcess::start().await else {
        return;
    };
    let client = Etcd::connect(&etcd.urls()).await.unwrap();
    let mut leases = Vec::new();
    let mut keep_alives = Vec::new();
    for _ in 0..3 {
        let lease = client.lease_grant(5).await.unwrap();
        keep_alives.push(client.keep_alive(lease).await.unwrap());
        leases.push(lease);
    }
    let (la, lb, lc) = (leases[0], leases[1], leases[2]);

    assert_eq!(client.leader("ctl").await.unwrap(), None);
    let mut observed = client.observe("ctl");

    let a = client.campaign("ctl", b"a", la).await.unwrap();
    assert_eq!(a.name, "ctl");
    assert_eq!(a.lease, la);
    assert_eq!(
        client.leader("ctl").await.unwrap().as_deref(),
        Some(&b"a"[..])
    );
    assert_eq!(within("observe", observed.recv()).await.unwrap(), b"a");

    let campaigner = client.clone();
    let mut b = tokio::spawn(async move { campaigner.campaign("ctl", b"b", lb).await });
    assert!(
        timeout(Duration::from_secs(1), &mut b).await.is_err(),
        "b is elected while a leads"
    );
    client.proclaim(&a, b"a2").await.unwrap();
    assert_eq!(within("observe", observed.recv()).await.unwrap(), b"a2");

    client.resign(&a).await.unwrap();
    let b = within("b elected", b).await.unwrap().unwrap();
    assert_eq!(b.lease, lb);
    assert_eq!(
        client.leader("ctl").await.unwrap().as_deref(),
        Some(&b"b"[..])
    );
    assert_eq!(within("observe", observed.recv()).await.unwrap(), b"b");
    assert_eq!(
        client.proclaim(&a, b"stale").await.unwrap_err(),
        EtcdError::NotLeader("ctl".to_string())
    );

    let campaigner = client.clone();
    let mut c = tokio::spawn(async move { campaigner.campaign("ctl", b"c", lc).await });
    assert!(
        timeout(Duration::from_secs(1), &mut c).await.is_err(),
        "c is elected while b leads"
    );
    client.lease_revoke(lb).await.unwrap();
    let c = within("c elected", c).await.unwrap().unwrap();
    assert_eq!(c.lease, lc);
    assert_eq!(
        client.leader("ctl").await.unwrap().as_deref(),
        Some(&b"c"[..])
    );
    assert_eq!(within("observe", observed.recv()).await.unwrap(), b"c");

    // Resigning a leadership already lost (by resignation or with its lease) is no error.
    client.resign(&a).await.unwrap();
    client.resign(&b).await.unwrap();
    client.resign(&c).await.unwrap();
    assert_eq!(client.leader("ctl").await.unwrap(), None);
}
