//! Helpers for end-to-end tests against the real `turnpike` binary.
#![allow(dead_code, clippy::unwrap_used, clippy::disallowed_methods)]

pub mod etcd;
pub mod netns;
pub mod stream;
pub mod tls;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use turnpike_proto::client::{AllocateOptions, Client, Event};

/// The binary under test.
pub fn bin() -> &'static std::path::Path {
    turnpike_tests::turnpike_bin()
}

/// A running turnpike process; killed on drop.
pub struct Proc {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        let mut cmd = Command::new(bin());
        cmd.args(args);
        Proc::spawn_command(cmd)
    }

    /// Runs `cmd` (which execs turnpike, e.g. through `chroot`) and collects its output.
    pub fn spawn_command(mut cmd: Command) -> Proc {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn turnpike");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(l);
            }
        });
        Proc {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits (bounded) for a line containing `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no line with {needle:?} within {timeout:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits (bounded) until `n` lines containing `needle` have been seen.
    pub fn wait_for_nth(&mut self, needle: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.seen.iter().filter(|l| l.contains(needle)).count() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!(
                    "fewer than {n} lines with {needle:?} within {timeout:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A value after `key=` in a line.
pub fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_default()
        .to_owned()
}

/// A free UDP port on loopback (bound, then released).
pub fn free_udp_port() -> u16 {
    free_port()
}

/// A free TCP port on loopback.
pub fn free_tcp_port() -> u16 {
    free_port()
}

/// A port free for both UDP and TCP on loopback, below the kernel's ephemeral range
/// (32768-60999 here), so that no outgoing connection of a concurrent test is given it
/// between this check and the server's bind (a server listens on UDP and TCP on the same
/// port by default).
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    // Below the ephemeral range if there is room, else above it.
    let (start, span) = if lo > 12_000 {
        (10_000, lo - 10_000)
    } else {
        (hi + 1, 65_535 - hi)
    };
    let seed = std::process::id().wrapping_mul(7919)
        ^ (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0));
    for _ in 0..1000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (start + (seed.wrapping_add(n.wrapping_mul(2_654_435_761)) % span)) as u16;
        let udp = UdpSocket::bind(("127.0.0.1", port)).is_ok();
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        if udp && tcp {
            return port;
        }
    }
    panic!("no free port found below the ephemeral range");
}

/// A TURN client over a real UDP socket, driving the sans-IO client.
pub struct Turn {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub client: Client,
    start: Instant,
    /// The last datagram received from the server.
    pub last: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Allocated(Vec<SocketAddr>),
    Ok,
    Failed(u16),
    TimedOut,
}

impl Turn {
    pub fn new(server: SocketAddr, user: &str, password: &str) -> Turn {
        Turn::with_socket(
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            server,
            user,
            password,
        )
    }

    /// A client on a socket of the caller's (e.g. one made inside a network namespace).
    pub fn with_socket(sock: UdpSocket, server: SocketAddr, user: &str, password: &str) -> Turn {
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Turn {
            sock,
            server,
            client: Client::new(user, password, rand_seed()),
            start: Instant::now(),
            last: Vec::new(),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Runs the outstanding transaction whose first request is `req` to completion.
    pub fn finish(&mut self, req: Vec<u8>) -> Outcome {
        self.sock.send_to(&req, self.server).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            let mut out = Vec::new();
            match self.sock.recv_from(&mut buf) {
                Ok((n, _)) => {
                    let now = self.now();
                    self.last = buf[..n].to_vec();
                    match self.client.handle(now, &buf[..n], &mut out) {
                        Event::Retry => {
                            self.sock.send_to(&out, self.server).unwrap();
                        }
                        Event::Allocated { relayed, .. } => return Outcome::Allocated(relayed),
                        Event::Refreshed { .. }
                        | Event::PermissionCreated
                        | Event::ChannelBound { .. } => {
                            return Outcome::Ok;
                        }
                        Event::Failed { code, .. } => return Outcome::Failed(code),
                        Event::TimedOut { .. } => return Outcome::TimedOut,
                        _ => {}
                    }
                }
                Err(_) => {
                    let now = self.now();
                    if self.client.poll_timeout().is_some_and(|t| t <= now) {
                        match self.client.handle_timeout(now, &mut out) {
                            Event::Retry => {
                                self.sock.send_to(&out, self.server).unwrap();
                            }
                            Event::TimedOut { .. } => return Outcome::TimedOut,
                            _ => {}
                        }
                    }
                }
            }
        }
        Outcome::TimedOut
    }

    pub fn allocate(&mut self) -> Outcome {
        let mut req = Vec::new();
        let now = self.now();
        self.client
            .allocate(now, AllocateOptions::default(), &mut req)
            .unwrap();
        self.finish(req)
    }

    pub fn refresh(&mut self, lifetime: u32) -> Outcome {
        let mut req = Vec::new();
        let now = self.now();
        self.client.refresh(now, lifetime, &mut req).unwrap();
        self.finish(req)
    }

    pub fn permit(&mut self, peer: SocketAddr) -> Outcome {
        let mut req = Vec::new();
        let now = self.now();
        self.client
            .create_permission(now, &[peer], &mut req)
            .unwrap();
        self.finish(req)
    }

    pub fn bind(&mut self, channel: u16, peer: SocketAddr) -> Outcome {
        let mut req = Vec::new();
        let now = self.now();
        self.client
            .channel_bind(now, channel, peer, &mut req)
            .unwrap();
        self.finish(req)
    }

    /// Sends `data` on `channel`.
    pub fn send_channel(&self, channel: u16, data: &[u8]) {
        let mut buf = [0u8; 2048];
        let n = Client::channel_data(channel, data, &mut buf).unwrap();
        self.sock.send_to(&buf[..n], self.server).unwrap();
    }

    /// Sends `data` to `peer` in a Send indication.
    pub fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) {
        let mut buf = vec![0u8; data.len() + 128];
        let n = self.client.send_indication(peer, data, &mut buf).unwrap();
        self.sock.send_to(&buf[..n], self.server).unwrap();
    }

    /// Receives one relayed payload (ChannelData or Data indication), bounded in time.
    pub fn recv_data(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                let mut out = Vec::new();
                match self.client.handle(0, &buf[..n], &mut out) {
                    Event::ChannelData { data, .. } | Event::Data { data, .. } => {
                        return Some(data.to_vec());
                    }
                    _ => {}
                }
            }
        }
        None
    }
}

fn rand_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    t.as_nanos() as u64 ^ u64::from(std::process::id())
}

/// A UDP peer on loopback that echoes what it receives.
pub struct EchoPeer {
    pub addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl EchoPeer {
    pub fn start() -> EchoPeer {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        EchoPeer { addr, stop }
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Sends `n` numbered payloads on `channel` and counts the echoes that come back.
pub fn echo_round(t: &mut Turn, channel: u16, n: usize) -> usize {
    let mut got = 0;
    for i in 0..n {
        let payload = format!("ping {i}");
        t.send_channel(channel, payload.as_bytes());
        if t.recv_data(Duration::from_secs(2)).as_deref() == Some(payload.as_bytes()) {
            got += 1;
        }
    }
    got
}

/// The Admin token the tests configure.
pub const TOKEN: &str = "test-admin-token-0123456789abcdef";

/// A fresh fleet certificate set (`turnpike ctl certs`) with data planes `dp1`, `dp2`.
pub struct Certs {
    pub dir: std::path::PathBuf,
}

impl Certs {
    pub fn new(tag: &str) -> Certs {
        let dir = std::env::temp_dir().join(format!("turnpike-certs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new(bin())
            .args(["ctl", "certs", "--out"])
            .arg(&dir)
            .args(["--data-plane", "dp1", "--data-plane", "dp2"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Certs { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// Flags for the control plane.
    pub fn control_plane(&self) -> Vec<String> {
        vec![
            "--grpc-ca".into(),
            self.path("ca.pem"),
            "--grpc-cert".into(),
            self.path("controlplane.pem"),
            "--grpc-key".into(),
            self.path("controlplane.key"),
            "--admin-token".into(),
            TOKEN.into(),
        ]
    }

    /// Flags for data plane `id` (dp1 or dp2).
    pub fn data_plane(&self, id: &str) -> Vec<String> {
        vec![
            "--grpc-ca".into(),
            self.path("ca.pem"),
            "--grpc-cert".into(),
            self.path(&format!("dataplane-{id}.pem")),
            "--grpc-key".into(),
            self.path(&format!("dataplane-{id}.key")),
        ]
    }

    /// Starts `turnpike dataplane` as `id` (dp1 or dp2), attached to `control`
    /// (https://ADDR), listening on `listen`, with `extra` flags.
    pub fn spawn_data_plane(&self, id: &str, control: &str, listen: &str, extra: &[&str]) -> Proc {
        let mut args: Vec<String> = ["dataplane", "--control", control, "--listen", listen]
            .map(String::from)
            .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(self.data_plane(id));
        spawn_owned(&args)
    }

    /// `turnpike ctl` against a TLS Admin port at `addr`.
    pub fn ctl(&self, addr: &str, args: &[&str]) -> std::process::Output {
        Command::new(bin())
            .args([
                "ctl",
                "--server",
                &format!("https://{addr}"),
                "--ca",
                &self.path("ca.pem"),
                "--token",
                TOKEN,
            ])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `turnpike ctl` against a plain (loopback `serve`) Admin address.
pub fn ctl_plain(addr: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args([
            "ctl",
            "--server",
            &format!("http://{addr}"),
            "--token",
            TOKEN,
        ])
        .args(args)
        .output()
        .unwrap()
}

/// Spawns `turnpike` with owned arguments.
pub fn spawn_owned(args: &[String]) -> Proc {
    let v: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::spawn(&v)
}

/// An Admin client interceptor that carries [`TOKEN`].
pub fn add_token(mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    let bearer = format!("Bearer {TOKEN}").parse().unwrap();
    r.metadata_mut().insert("authorization", bearer);
    Ok(r)
}

/// A control plane alone (split mode) with mutual TLS from `certs`, the user u:p,
/// loopback peers allowed and `listen` as its data planes' address; ready. Returns it
/// and the URL its data planes attach to.
pub fn split_control_plane(certs: &Certs, listen: &str) -> (Proc, String) {
    let grpc = format!("127.0.0.1:{}", free_tcp_port());
    let mut args: Vec<String> = [
        "controlplane",
        "--grpc-listen",
        grpc.as_str(),
        "--user",
        "u:p",
        "--allow-peer",
        "127.0.0.0/8",
        "--listen",
        listen,
        "--admin-listen",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    args.extend(certs.control_plane());
    let mut cp = spawn_owned(&args);
    cp.wait_for("control plane ready", Duration::from_secs(20));
    (cp, format!("https://{grpc}"))
}

/// The Prometheus page of the metrics listener at `addr`.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

/// The value of the first sample of `page` whose line starts with `name`.
pub fn metric_in(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
}
