//! A real etcd on loopback for the fleet tests (Debian's `etcd-server`, installed by
//! `tests/scripts/setup-deps.sh`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_tcp_port;

const ETCD: &str = "/usr/bin/etcd";

pub fn in_ci() -> bool {
    std::env::var("CI")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Whether etcd is here; under CI its absence fails the test.
pub fn etcd_available() -> bool {
    if std::path::Path::new(ETCD).exists() {
        return true;
    }
    assert!(
        !in_ci(),
        "{ETCD} is missing: tests/scripts/setup-deps.sh installs etcd-server"
    );
    eprintln!("SKIP: {ETCD} is missing (tests/scripts/setup-deps.sh installs etcd-server)");
    false
}

/// A single-member etcd on loopback, killed and removed on drop.
pub struct EtcdProc {
    child: Option<Child>,
    dir: PathBuf,
    client: u16,
    peer: u16,
}

impl EtcdProc {
    pub fn start() -> EtcdProc {
        let dir = std::env::temp_dir().join(format!(
            "turnpike-fleet-etcd-{}-{}",
            std::process::id(),
            free_tcp_port()
        ));
        let mut e = EtcdProc {
            child: None,
            dir,
            client: free_tcp_port(),
            peer: free_tcp_port(),
        };
        e.run();
        e
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    pub fn run(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let child = Command::new(ETCD)
            .args([
                "--name",
                "default",
                "--data-dir",
                self.dir.to_str().unwrap(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("default={peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(15) {
            let ok = Command::new("/usr/bin/etcdctl")
                .args(["--endpoints", &client, "endpoint", "health"])
                .env("ETCDCTL_API", "3")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("etcd did not become healthy within 15 s");
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdProc {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `turnpike ctl fleet --etcd ETCD --fleet FLEET ARGS...`, which must succeed; its output.
pub fn ctl_fleet(etcd: &str, fleet: &str, args: &[&str]) -> String {
    let out = Command::new(super::bin())
        .args(["ctl", "fleet", "--etcd", etcd, "--fleet", fleet])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctl fleet {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fleet name of its own for a test (tests share nothing, not even a key prefix).
pub fn fleet_name(tag: &str) -> String {
    format!("{tag}-{}-{}", std::process::id(), free_tcp_port())
}
