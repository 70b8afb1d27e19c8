//! The container image holds everything the binary needs. `deploy/build-image.sh` builds
//! it with buildah from scratch (no base image); these machines cannot start OCI
//! containers (crun and runc fail on `setrlimit`), so the test does what a runtime does
//! with `--network host`: it mounts the image's root filesystem (`buildah from` +
//! `buildah mount`), gives it a `/proc` as every runtime does, and runs the image's
//! entrypoint chrooted into it as the image's user. coturn's uclient then relays through
//! it with no loss, and `turnpike probe` run from the image finds the image's CA bundle.
//!
//! Needs root, buildah and coturn's uclient/peer (tests/scripts/setup-deps.sh installs
//! them); reports `SKIPPED: reason` without them, except under CI, where a missing tool
//! fails the test.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Proc;

const BUILDAH: &str = "/usr/bin/buildah";
const UCLIENT: &str = "/usr/bin/turnutils_uclient";
const PEER: &str = "/usr/bin/turnutils_peer";

/// Why the test cannot run here, or `None`; under CI a missing tool fails instead.
fn missing() -> Option<String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return Some("not root (buildah's storage, mount and chroot need it)".into());
    }
    for tool in [BUILDAH, UCLIENT, PEER] {
        if !Path::new(tool).exists() {
            assert!(
                !common::etcd::in_ci(),
                "{tool} is missing: tests/scripts/setup-deps.sh installs it"
            );
            return Some(format!(
                "{tool} is missing (tests/scripts/setup-deps.sh installs it)"
            ));
        }
    }
    None
}

/// Runs `program args` bounded by `secs`; its stdout, or a panic with both streams.
fn run(secs: u32, program: &str, args: &[&str]) -> String {
    let started = Instant::now();
    let out = Command::new("timeout")
        .arg(secs.to_string())
        .arg(program)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({:?}, after {:?}):\n{}{}",
        out.status.code(),
        started.elapsed(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The built image, a working container from it and its mounted root filesystem; all
/// removed on drop (also when an assertion fails half-way).
struct Image {
    tag: String,
    container: Option<String>,
    rootfs: Option<PathBuf>,
    proc_mounted: bool,
}

impl Image {
    /// Builds the image with `deploy/build-image.sh` from the debug binary.
    fn build() -> Image {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let tag = format!("localhost/turnpike-image-test:{}", std::process::id());
        let script = repo.join("deploy/build-image.sh");
        run(
            300,
            script.to_str().unwrap(),
            &[common::bin().to_str().unwrap(), &tag],
        );
        Image {
            tag,
            container: None,
            rootfs: None,
            proc_mounted: false,
        }
    }

    /// The image's OCI config (`Entrypoint`, `Cmd`, `User`, `Labels`, ...).
    fn config(&self) -> serde_json::Value {
        let out = run(60, BUILDAH, &["inspect", "--type", "image", &self.tag]);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: buildah inspect:\n{out}"));
        v["OCIv1"]["config"].clone()
    }

    /// `buildah from` + `buildah mount`, and a /proc inside as a runtime would mount it.
    fn mount(&mut self) -> PathBuf {
        let name = format!("turnpike-image-test-{}", std::process::id());
        run(60, BUILDAH, &["from", "--name", &name, &self.tag]);
        self.container = Some(name.clone());
        let rootfs = PathBuf::from(run(60, BUILDAH, &["mount", &name]).trim());
        assert!(rootfs.is_dir(), "buildah mount gave {rootfs:?}");
        self.rootfs = Some(rootfs.clone());
        let proc_dir = rootfs.join("proc");
        run(
            30,
            "mount",
            &["-t", "proc", "proc", proc_dir.to_str().unwrap()],
        );
        self.proc_mounted = true;
        rootfs
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let quiet = |program: &str, args: &[&str]| {
            let _ = Command::new("timeout")
                .arg("60")
                .arg(program)
                .args(args)
                .output();
        };
        if let Some(rootfs) = &self.rootfs
            && self.proc_mounted
        {
            quiet("umount", &[rootfs.join("proc").to_str().unwrap()]);
        }
        if let Some(c) = &self.container {
            quiet(BUILDAH, &["umount", c]);
            quiet(BUILDAH, &["rm", c]);
        }
        quiet(BUILDAH, &["rmi", "--force", &self.tag]);
    }
}

/// `turnutils_peer` on loopback, killed on drop.
struct Peer(std::process::Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// coturn's uclient through `server_port` to the peer: (packets sent, lost).
fn uclient(flags: &[&str], server_port: u16, peer_port: u16, n: usize) -> (usize, usize) {
    let (n_s, port, peer) = (
        n.to_string(),
        server_port.to_string(),
        peer_port.to_string(),
    );
    let mut args = vec![UCLIENT];
    args.extend_from_slice(flags);
    args.extend([
        "-e",
        "127.0.0.1",
        "-r",
        &peer,
        "-n",
        &n_s,
        "-m",
        "4",
        "-l",
        "171",
        "-u",
        "u",
        "-w",
        "p",
        "-p",
        &port,
        "127.0.0.1",
    ]);
    let out = run(90, args[0], &args[1..]);
    let lost = out
        .lines()
        .find_map(|l| {
            let rest = l.split("Total lost packets ").nth(1)?;
            rest.split_whitespace().next()?.parse::<usize>().ok()
        })
        .unwrap_or_else(|| panic!("no uclient summary:\n{out}"));
    (4 * n, lost)
}

/// The entrypoint and user the image declares, run chrooted into `rootfs`.
fn chrooted(rootfs: &Path, user: &str, entrypoint: &str, args: &[&str]) -> Command {
    // chroot execs the entrypoint, so the child's pid is turnpike's own: killing it (as
    // `Proc` does on drop, also when the test panics) stops the server. A `timeout`
    // wrapper here would be what got killed, leaving the server orphaned.
    let mut cmd = Command::new("/usr/sbin/chroot");
    cmd.arg(format!("--userspec={user}"))
        .arg(rootfs)
        .arg(entrypoint)
        .args(args)
        // Nothing of the host's environment: only what the test gives.
        .env_clear()
        .env("PATH", "/usr/bin");
    cmd
}

#[test]
fn the_image_built_from_scratch_relays_uclient_traffic_chrooted() {
    if let Some(why) = missing() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let mut image = Image::build();

    // What a runtime would run: the image's own entrypoint, as its own user.
    let config = image.config();
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/bin/turnpike"]),
        "{config}"
    );
    assert_eq!(config["Cmd"][0], "serve", "{config}");
    let user = config["User"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        user, "65532:65532",
        "the image runs as a non-root user: {config}"
    );
    assert!(
        config["Labels"]["org.opencontainers.image.version"].is_string(),
        "{config}"
    );
    let entrypoint = "/usr/bin/turnpike";

    let rootfs = image.mount();
    // Nothing but the image's files: no shell, no coreutils, no distribution.
    assert!(!rootfs.join("bin/sh").exists() && !rootfs.join("usr/bin/env").exists());

    let version = chrooted(&rootfs, &user, entrypoint, &["--version"])
        .output()
        .unwrap();
    assert!(
        version.status.success() && String::from_utf8_lossy(&version.stdout).contains("turnpike"),
        "--version in the image: {version:?}"
    );

    let port = common::free_udp_port();
    let tls_port = common::free_tcp_port();
    let listen = format!("127.0.0.1:{port}");
    let listen_tls = format!("127.0.0.1:{tls_port}");
    // The host network: chroot keeps the host's network namespace, as --network host.
    let mut server = Proc::spawn_command(chrooted(
        &rootfs,
        &user,
        entrypoint,
        &[
            "serve",
            "--listen",
            &listen,
            "--listen-tls",
            &listen_tls,
            "--tls-self-signed",
            "--relay-ip",
            "127.0.0.1",
            "--allow-peer",
            "127.0.0.0/8",
            "--user",
            "u:p",
            "--legacy-channel-numbers",
            "--workers",
            "2",
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
    ));
    server.wait_for("turnpike ready", Duration::from_secs(30));

    let peer_port = common::free_udp_port();
    let peer = Command::new(PEER)
        .args(["-L", "127.0.0.1", "-p", &peer_port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _peer = Peer(peer);
    std::thread::sleep(Duration::from_millis(300));

    for flags in [&["-c"][..], &["-c", "-s"][..]] {
        let (sent, lost) = uclient(flags, port, peer_port, 200);
        eprintln!("uclient {flags:?} through the image: {sent} sent, {lost} lost");
        assert_eq!(
            lost, 0,
            "uclient {flags:?} through the image lost {lost} of {sent}"
        );
    }

    // `turnpike probe` from inside the image: over UDP the whole check passes; over TLS
    // it reads the image's CA bundle (the self-signed certificate is then refused, which
    // is right: no public CA signed it).
    let udp = format!("turn:127.0.0.1:{port}");
    let out = chrooted(
        &rootfs,
        &user,
        entrypoint,
        &["probe", &udp, "--user", "u", "--password", "p"],
    )
    .output()
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "probe over UDP from the image:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tls = format!("turns:127.0.0.1:{tls_port}");
    let out = chrooted(
        &rootfs,
        &user,
        entrypoint,
        &["probe", &tls, "--user", "u", "--password", "p", "--json"],
    )
    .output()
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: probe over TLS from the image:\n{text}"));
    let target = &report["targets"][0];
    assert_eq!(
        target["tls"]["trust"], "/etc/ssl/certs/ca-certificates.crt",
        "the probe in the image did not use its CA bundle:\n{text}"
    );
    // Refused at the chain, after it had read the bundle and seen the certificate.
    let failed: Vec<_> = target["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "fail")
        .map(|c| c["step"].clone())
        .collect();
    assert_eq!(failed, ["tls-chain"], "{text}");

    server.kill();
}
