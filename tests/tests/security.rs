//! Regression tests for the findings of the attack run (issue #10) that need the real
//! binary: authentication on the gRPC ports, bounded memory under a spoofed flood, the
//! listeners' limits, and the data plane's own sockets as peers in split mode.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{Certs, Outcome, Proc, TOKEN, Turn, free_tcp_port, free_udp_port, spawn_owned};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use turnpike_api::v1::{
    self, admin_client::AdminClient, control_plane_client::ControlPlaneClient, data_plane_message,
};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A control plane with the fleet certificates; Admin on the same (TLS) port.
fn control_plane(certs: &Certs, extra: &[&str]) -> (Proc, String) {
    let grpc = format!("127.0.0.1:{}", free_tcp_port());
    let mut args: Vec<String> = ["controlplane", "--grpc-listen", &grpc, "--user", "u:p"]
        .map(String::from)
        .to_vec();
    args.extend(certs.control_plane());
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut p = spawn_owned(&args);
    p.wait_for("control plane ready", Duration::from_secs(20));
    (p, grpc)
}

/// A TLS channel to `addr` trusting `ca`, presenting `identity` if given.
async fn channel(
    addr: &str,
    ca: &str,
    identity: Option<(String, String)>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read_to_string(ca).unwrap()))
        .domain_name("turnpike-controlplane");
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read_to_string(c).unwrap(),
            std::fs::read_to_string(k).unwrap(),
        ));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

fn hello(id: &str, listen: SocketAddr) -> v1::DataPlaneMessage {
    v1::DataPlaneMessage {
        message: Some(data_plane_message::Message::Hello(v1::Hello {
            data_plane_id: id.to_owned(),
            listening_addresses: vec![v1::ListeningAddress {
                transport: v1::Transport::Udp as i32,
                address: Some(listen.into()),
            }],
            worker_count: 1,
            ..Default::default()
        })),
    }
}

fn is_unauthenticated<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> bool {
    matches!(r, Err(ref s) if s.code() == tonic::Code::Unauthenticated)
}

/// Finding 1: no token, no client certificate → `Unauthenticated` on every Admin and
/// ControlPlane method; a wrong token too; a data plane with a certificate from another
/// CA cannot even connect; plain HTTP/2 gets nothing.
#[test]
fn grpc_refuses_unauthenticated_callers_and_foreign_data_planes() {
    let certs = Certs::new("unauth");
    let other = Certs::new("other-ca");
    let (_cp, grpc) = control_plane(&certs, &[]);
    rt().block_on(async {
        let ch = channel(&grpc, &certs.path("ca.pem"), None).await.unwrap();
        let mut admin = AdminClient::new(ch.clone());
        assert!(is_unauthenticated(
            admin
                .list_allocations(v1::ListAllocationsRequest::default())
                .await
        ));
        assert!(is_unauthenticated(
            admin
                .get_allocation(v1::GetAllocationRequest { allocation_id: 1 })
                .await
        ));
        assert!(is_unauthenticated(
            admin
                .revoke_allocation(v1::RevokeAllocationRequest::default())
                .await
        ));
        assert!(is_unauthenticated(
            admin
                .revoke_user_allocations(v1::RevokeUserAllocationsRequest {
                    user_id: "u".into(),
                    reason: String::new()
                })
                .await
        ));
        assert!(is_unauthenticated(
            admin.get_stats(v1::GetStatsRequest {}).await
        ));
        assert!(is_unauthenticated(
            admin
                .drain_data_plane(v1::DrainDataPlaneRequest::default())
                .await
        ));
        assert!(is_unauthenticated(
            admin
                .rotate_secrets(v1::RotateSecretsRequest {
                    secrets: vec![b"attacker".to_vec()]
                })
                .await
        ));
        assert!(is_unauthenticated(
            admin.watch_events(v1::WatchEventsRequest::default()).await
        ));
        // A wrong token.
        let bad: tonic::metadata::MetadataValue<_> =
            "Bearer not-the-token-at-all-0000".parse().unwrap();
        let mut admin_bad =
            AdminClient::with_interceptor(ch.clone(), move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", bad.clone());
                Ok(r)
            });
        assert!(is_unauthenticated(
            admin_bad.get_stats(v1::GetStatsRequest {}).await
        ));
        // ControlPlane.Attach without a client certificate.
        let mut cpc = ControlPlaneClient::new(ch);
        let up = tokio_stream::iter(vec![hello("rogue", "127.0.0.1:3478".parse().unwrap())]);
        assert!(is_unauthenticated(cpc.attach(up).await));
        // A client certificate from another CA: the handshake fails.
        let foreign = channel(
            &grpc,
            &certs.path("ca.pem"),
            Some((
                other.path("dataplane-dp1.pem"),
                other.path("dataplane-dp1.key"),
            )),
        )
        .await;
        match foreign {
            Err(_) => {}
            Ok(ch) => {
                let mut cpc = ControlPlaneClient::new(ch);
                let up =
                    tokio_stream::iter(vec![hello("foreign", "127.0.0.1:3478".parse().unwrap())]);
                assert!(
                    cpc.attach(up).await.is_err(),
                    "a foreign CA's data plane attached"
                );
            }
        }
        // Plain HTTP/2 on the TLS port: no answer.
        let plain = Endpoint::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await;
        if let Ok(ch) = plain {
            let mut admin = AdminClient::new(ch);
            assert!(admin.get_stats(v1::GetStatsRequest {}).await.is_err());
        }
    });
    // The real token works, over TLS with the fleet CA.
    let out = certs.ctl(&grpc, &["stats"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("user_quota: 100"));
    // A data plane with a foreign certificate never attaches.
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let mut dp = other.spawn_data_plane(
        "dp1",
        &format!("https://{grpc}"),
        &listen,
        &["--workers", "1", "--no-pin"],
    );
    dp.wait_for("turnpike ready", Duration::from_secs(30));
    let out = certs.ctl(&grpc, &["stats"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("data_planes_attached: 0"), "{text}");
}

/// `serve`'s Admin needs the token; `ctl` exits quietly when its reader goes away.
#[test]
fn serve_admin_needs_its_token_and_ctl_survives_a_closed_pipe() {
    let admin = format!("127.0.0.1:{}", free_tcp_port());
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let mut p = Proc::spawn(&[
        "serve",
        "--listen",
        &listen,
        "--admin-listen",
        &admin,
        "--admin-token",
        TOKEN,
        "--grpc-listen",
        "127.0.0.1:0",
    ]);
    p.wait_for("turnpike ready", Duration::from_secs(20));
    let out = std::process::Command::new(common::bin())
        .args([
            "ctl",
            "--server",
            &format!("http://{admin}"),
            "--token",
            "wrong-token-wrong-token",
            "stats",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("authorization"));
    // `ctl stats | head -1`: no panic, no backtrace.
    let mut child = std::process::Command::new(common::bin())
        .args([
            "ctl",
            "--server",
            &format!("http://{admin}"),
            "--token",
            TOKEN,
            "stats",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

/// Finding 3: in split mode the control plane learns the data plane's listening socket
/// from its Hello and refuses it as a peer, even with loopback allowed.
#[test]
fn data_plane_listening_socket_is_never_a_peer_in_split_mode() {
    let certs = Certs::new("own");
    let (_cp, grpc) = control_plane(&certs, &["--allow-peer", "127.0.0.0/8"]);
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let mut dp = certs.spawn_data_plane(
        "dp1",
        &format!("https://{grpc}"),
        &listen,
        &["--workers", "1", "--no-pin"],
    );
    dp.wait_for("attached to control plane", Duration::from_secs(30));
    let server: SocketAddr = listen.parse().unwrap();
    let mut t = Turn::new(server, "u", "p");
    assert!(matches!(t.allocate(), Outcome::Allocated(_)));
    assert_eq!(t.bind(0x4000, server), Outcome::Failed(403));
    assert_eq!(t.permit("127.0.0.1:9".parse().unwrap()), Outcome::Ok);
}

/// Issue #25 N2: the server's TCP and TLS listeners on ports of their own are its own
/// sockets too: a Send indication (or ChannelData) to one is never relayed, even with a
/// permission for its IP and loopback allowed. A UDP socket on the TCP listener's port
/// number stands for whatever would receive it; a Send to another port arrives.
#[test]
fn send_indications_never_reach_the_servers_own_tcp_and_tls_listeners() {
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let tcp_port = free_tcp_port();
    let tls_port = free_tcp_port();
    let dir = std::env::temp_dir().join(format!("tp-own-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let mut p = Proc::spawn(&[
        "serve",
        "--listen",
        &listen,
        "--listen-tcp",
        &format!("127.0.0.1:{tcp_port}"),
        "--listen-tls",
        &format!("127.0.0.1:{tls_port}"),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--allow-peer",
        "127.0.0.0/8",
        "--user",
        "u:p",
        "--workers",
        "1",
        "--no-pin",
    ]);
    p.wait_for("turnpike ready", Duration::from_secs(20));
    let server: SocketAddr = listen.parse().unwrap();
    let mut t = Turn::new(server, "u", "p");
    assert!(matches!(t.allocate(), Outcome::Allocated(_)));
    assert_eq!(t.permit("127.0.0.1:9".parse().unwrap()), Outcome::Ok);
    let recv = |s: &std::net::UdpSocket| {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 64];
        s.recv_from(&mut b).is_ok()
    };
    for port in [tcp_port, tls_port] {
        let own: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let Ok(victim) = std::net::UdpSocket::bind(own) else {
            continue; // the UDP port of that number is taken: nothing to observe there
        };
        assert_eq!(
            t.bind(0x4001, own),
            Outcome::Failed(403),
            "ChannelBind to {own}"
        );
        for _ in 0..3 {
            t.send_indication(own, b"to our own listener");
        }
        assert!(!recv(&victim), "a Send indication to {own} was relayed");
    }
    // The same Send to a port that is not ours arrives: the path itself works.
    let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    t.send_indication(other.local_addr().unwrap(), b"to a peer");
    assert!(recv(&other), "a Send indication to a peer was not relayed");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 25, N5: a data plane's id is the name of its certificate. One holding dp2's
/// certificate and claiming id dp1 is refused (and counted); the real dp1 stays attached,
/// with no detach and re-attach.
#[test]
fn data_plane_id_is_bound_to_its_certificate() {
    let certs = Certs::new("idbind");
    let (_cp, grpc) = control_plane(&certs, &[]);
    let control = format!("https://{grpc}");
    let one = ["--workers", "1", "--no-pin"];
    let l1 = format!("127.0.0.1:{}", free_udp_port());
    // No id configured: it is read from the certificate (dp1).
    let mut dp1 = certs.spawn_data_plane("dp1", &control, &l1, &one);
    dp1.wait_for("attached to control plane", Duration::from_secs(30));
    let stats = || {
        let out = certs.ctl(&grpc, &["stats"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = stats();
    assert!(text.contains("data_planes_attached: 1"), "{text}");
    assert!(text.contains("dp1"), "{text}");
    // The impostor: dp2's certificate, id dp1 in its configuration.
    let dir = std::env::temp_dir().join(format!("turnpike-idbind-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("impostor.toml");
    std::fs::write(&cfg, "data_plane_id = \"dp1\"\n").unwrap();
    let l2 = format!("127.0.0.1:{}", free_udp_port());
    let mut impostor = certs.spawn_data_plane(
        "dp2",
        &control,
        &l2,
        &[&one[..], &["--config", cfg.to_str().unwrap()]].concat(),
    );
    let refused = impostor.wait_for("attach refused", Duration::from_secs(30));
    assert!(refused.contains("dp1"), "{refused}");
    // Give a flap time to show: the real dp1 would be detached and re-attach.
    std::thread::sleep(Duration::from_secs(3));
    while let Ok(l) = dp1.lines.try_recv() {
        dp1.seen.push(l);
    }
    let attaches = dp1
        .seen
        .iter()
        .filter(|l| l.contains("attached to control plane"))
        .count();
    assert_eq!(attaches, 1, "dp1 re-attached:\n{}", dp1.seen.join("\n"));
    let text = stats();
    assert!(text.contains("data_planes_attached: 1"), "{text}");
    let violations: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("ownership_violations: "))
        .and_then(|v| v.trim_end_matches(',').parse().ok())
        .unwrap_or(0);
    assert!(violations >= 1, "refusal not counted:\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn refresh_request(i: u64) -> Vec<u8> {
    let mut m = vec![0x00, 0x04, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    m.extend_from_slice(&i.to_be_bytes());
    m.extend_from_slice(&[0x5a; 4]);
    m
}

/// Finding 2 (and issue #9's done-when): a million unauthenticated requests from distinct
/// spoofed sources leave the control plane's memory where it was (no per-source state).
/// Sent through an authenticated data-plane stream, the way a data plane punts them.
#[test]
fn spoofed_flood_leaves_control_plane_memory_flat() {
    let total: u64 = std::env::var("TURNPIKE_FLOOD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let certs = Certs::new("flood");
    let (cp, grpc) = control_plane(&certs, &[]);
    let pid = cp.child.id();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    rt().block_on(async {
        let ch = channel(
            &grpc,
            &certs.path("ca.pem"),
            Some((certs.path("dataplane-dp1.pem"), certs.path("dataplane-dp1.key"))),
        )
        .await
        .unwrap();
        let admin_ch = channel(&grpc, &certs.path("ca.pem"), None).await.unwrap();
        let mut admin = AdminClient::with_interceptor(admin_ch, common::add_token);
        let (tx, rx) = tokio::sync::mpsc::channel::<v1::DataPlaneMessage>(4096);
        // dp1's certificate: the id must be the one it names.
        tx.send(hello("dp1", listen)).await.unwrap();
        let mut down = ControlPlaneClient::new(ch)
            .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        // Answers (401 challenges) are read and dropped, as a data plane would send them.
        tokio::spawn(async move { while let Ok(Some(_)) = down.message().await {} });
        let punted = |from: u64, to: u64, tx: tokio::sync::mpsc::Sender<v1::DataPlaneMessage>| async move {
            for i in from..to {
                let client = SocketAddr::from((
                    [127, (i >> 16) as u8 | 1, (i >> 8) as u8, i as u8],
                    1024 + (i % 60000) as u16,
                ));
                let m = v1::DataPlaneMessage {
                    message: Some(data_plane_message::Message::PuntedRequest(v1::PuntedRequest {
                        worker_id: 0,
                        five_tuple: Some(v1::FiveTuple {
                            transport: v1::Transport::Udp as i32,
                            client: Some(client.into()),
                            server: Some(listen.into()),
                        }),
                        datagram: refresh_request(i).into(),
                    })),
                };
                tx.send(m).await.unwrap();
            }
        };
        let wait_for = |n: u64, admin: &mut AdminClient<_>| {
            let started = Instant::now();
            let mut admin = admin.clone();
            async move {
                loop {
                    let s = admin.get_stats(v1::GetStatsRequest {}).await.unwrap().into_inner();
                    let got = s.totals.unwrap().punted_requests;
                    if got >= n {
                        return;
                    }
                    assert!(started.elapsed() < Duration::from_secs(300), "only {got} of {n} processed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        // Warm up (allocator arenas, buffers), then measure.
        let warm = total / 20;
        punted(0, warm, tx.clone()).await;
        wait_for(warm, &mut admin).await;
        let before = rss_kib(pid);
        let t0 = Instant::now();
        punted(warm, warm + total, tx.clone()).await;
        wait_for(warm + total, &mut admin).await;
        let after = rss_kib(pid);
        eprintln!(
            "flood: {total} spoofed requests in {:.1}s, control plane RSS {before} KiB -> {after} KiB",
            t0.elapsed().as_secs_f64()
        );
        assert!(after <= before + 10 * 1024, "RSS grew from {before} KiB to {after} KiB");
    });
}

/// Findings 1 and 11: a connection cap (excess connections closed at once) and an idle
/// timeout on the Admin port.
#[test]
fn listeners_cap_connections_and_close_idle_ones() {
    let dir = std::env::temp_dir().join(format!("turnpike-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("limits.toml");
    std::fs::write(&cfg, "max_connections = 3\nidle_timeout = 2\n").unwrap();
    let admin = format!("127.0.0.1:{}", free_tcp_port());
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let mut p = Proc::spawn(&[
        "serve",
        "--config",
        cfg.to_str().unwrap(),
        "--listen",
        &listen,
        "--admin-listen",
        &admin,
        "--admin-token",
        TOKEN,
        "--grpc-listen",
        "127.0.0.1:0",
    ]);
    p.wait_for("turnpike ready", Duration::from_secs(20));
    let held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(&admin).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // The fourth is closed at once, before the server says anything.
    let (bytes, eof, took) = drain(TcpStream::connect(&admin).unwrap(), Duration::from_secs(2));
    assert!(
        eof && bytes == 0 && took < Duration::from_secs(1),
        "{bytes} bytes, eof {eof}, {took:?}"
    );
    // The silent ones are closed after the idle timeout (2 s), whatever the server sent.
    for s in held {
        let (_, eof, took) = drain(s, Duration::from_secs(8));
        assert!(
            eof && took < Duration::from_secs(6),
            "eof {eof} after {took:?}"
        );
    }
    // With the slots free again, a client gets served.
    let mut s = TcpStream::connect(&admin).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TCP connection to `to` from source address `from` (any port).
fn connect_from(from: [u8; 4], to: &str) -> TcpStream {
    rt().block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::from((from, 0))).unwrap();
        let s = s
            .connect(to.parse().unwrap())
            .await
            .unwrap()
            .into_std()
            .unwrap();
        s.set_nonblocking(false).unwrap();
        s
    })
}

/// Issue 25, N1: one source holding its share of the Admin listener's connections does
/// not lock another source out: its extra connections are closed at once, another
/// source's Admin call succeeds, and its idle connections are closed within the limits.
#[test]
fn one_source_cannot_take_every_admin_connection() {
    let dir = std::env::temp_dir().join(format!("turnpike-persource-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("limits.toml");
    std::fs::write(
        &cfg,
        "max_connections = 6\nmax_connections_per_ip = 3\nidle_timeout = 2\n",
    )
    .unwrap();
    let admin = format!("127.0.0.1:{}", free_tcp_port());
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let mut p = Proc::spawn(&[
        "serve",
        "--config",
        cfg.to_str().unwrap(),
        "--listen",
        &listen,
        "--admin-listen",
        &admin,
        "--admin-token",
        TOKEN,
        "--grpc-listen",
        "127.0.0.1:0",
    ]);
    p.wait_for("turnpike ready", Duration::from_secs(20));
    // 127.0.0.2 tries to hold every slot of the listener.
    let mut held: Vec<TcpStream> = (0..6)
        .map(|_| connect_from([127, 0, 0, 2], &admin))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Beyond its share of 3, its connections are closed at once.
    let extra = held.split_off(3);
    for s in extra {
        let (bytes, eof, took) = drain(s, Duration::from_secs(2));
        assert!(
            eof && bytes == 0 && took < Duration::from_secs(1),
            "a connection beyond the source's share: {bytes} bytes, eof {eof}, {took:?}"
        );
    }
    // Another source's Admin call goes through while those are held.
    let out = common::ctl_plain(&admin, &["stats"]);
    assert!(
        out.status.success(),
        "ctl stats from 127.0.0.1 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The held ones (silent) are closed within the idle limit (2 s).
    for s in held {
        let (_, eof, took) = drain(s, Duration::from_secs(8));
        assert!(
            eof && took < Duration::from_secs(5),
            "eof {eof} after {took:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reads until EOF (or reset) or `limit`: (bytes read, whether it ended, when).
fn drain(mut s: TcpStream, limit: Duration) -> (usize, bool, Duration) {
    let t = Instant::now();
    let mut total = 0;
    let mut b = [0u8; 256];
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while t.elapsed() < limit {
        match s.read(&mut b) {
            Ok(0) => return (total, true, t.elapsed()),
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (total, true, t.elapsed());
            }
            Err(_) => {}
        }
    }
    (total, false, t.elapsed())
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Finding 11: at the descriptor limit the accept loops back off instead of spinning.
#[test]
fn accept_loop_does_not_spin_at_the_descriptor_limit() {
    let certs = Certs::new("emfile");
    let grpc = format!("127.0.0.1:{}", free_tcp_port());
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let mut args = format!(
        "ulimit -n 40 && exec {} controlplane --grpc-listen {grpc} --metrics-listen {metrics} --user u:p",
        common::bin().display()
    );
    for a in certs.control_plane() {
        args.push(' ');
        args.push_str(&a);
    }
    let mut child = std::process::Command::new("sh")
        .args(["-c", &args])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(out));
    assert!(lines.any(|l| l.is_ok_and(|l| l.contains("control plane ready"))));
    let pid = child.id();
    // Hold more connections than there are descriptors (silent: each waits in the TLS
    // handshake or the metrics request for seconds).
    let mut held = Vec::new();
    for i in 0..80 {
        let addr = if i % 2 == 0 { &grpc } else { &metrics };
        if let Ok(s) =
            TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(200))
        {
            held.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - t0;
    // Clock ticks are 1/100 s: a spinning loop would use about 200 in 2 s.
    assert!(
        used < 40,
        "the control plane used {used} ticks in 2 s at the descriptor limit"
    );
    drop(held);
    let _ = child.kill();
    let _ = child.wait();
}

/// Finding 13: logs to a pipe carry no colour codes; `--log-format json` writes JSON lines.
#[test]
fn logs_have_no_escape_codes_off_a_terminal_and_json_is_available() {
    for json in [false, true] {
        let listen = format!("127.0.0.1:{}", free_udp_port());
        let mut args = vec![
            "serve",
            "--listen",
            &listen,
            "--admin-listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
        ];
        if json {
            args.extend(["--log-format", "json"]);
        }
        let mut p = Proc::spawn(&args);
        p.wait_for("turnpike ready", Duration::from_secs(20));
        let line = p.wait_for("data plane attached", Duration::from_secs(10));
        assert!(!line.contains('\u{1b}'), "{line:?}");
        if json {
            assert!(
                line.starts_with('{') && line.contains("\"level\":\"INFO\""),
                "{line}"
            );
        }
    }
}
