//! The real `turnpike` binary: configuration errors, the no-argument development server,
//! the peer policy end to end, split mode surviving a control-plane restart, and the
//! admin API.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::{EchoPeer, Outcome, Proc, Turn, echo_round, field, free_tcp_port, free_udp_port};

fn exit_code(args: &[&str]) -> (i32, String) {
    let out = Command::new(common::bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configuration_exits_64_naming_the_option() {
    for (args, option) in [
        (vec!["serve", "--relay-ports", "5000-4000"], "relay_ports"),
        (vec!["serve", "--io-backend", "fast"], "io_backend"),
        (vec!["serve", "--listen", "localhost"], "listen"),
        (vec!["serve", "--allow-peer", "10.0.0.0/40"], "allow_peers"),
        (vec!["serve", "--user", "nopassword"], "users"),
        (vec!["serve", "--listen", "0.0.0.0:3478"], "relay_ips"),
        (vec!["serve", "--alt-ip", "not-an-ip"], "alt_ip"),
        (vec!["serve", "--alt-ip", "::1"], "alt_ip"),
    ] {
        let (code, err) = exit_code(&args);
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(err.contains(option), "{args:?}: {err}");
    }
    let dir = std::env::temp_dir().join(format!("turnpike-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        "listen = [\"127.0.0.1:3478\"]\nrelay_portz = \"1-2\"\n",
    )
    .unwrap();
    let (code, err) = exit_code(&["serve", "--config", file.to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("relay_portz"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn serve(extra: &[&str]) -> (Proc, SocketAddr, String) {
    let port = free_udp_port();
    let grpc = free_tcp_port();
    let listen = format!("127.0.0.1:{port}");
    let grpc = format!("127.0.0.1:{grpc}");
    let mut args = vec![
        "serve",
        "--listen",
        &listen,
        "--grpc-listen",
        "127.0.0.1:0",
        "--admin-listen",
        &grpc,
        "--admin-token",
        common::TOKEN,
        "--workers",
        "2",
        "--user",
        "u:p",
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::spawn(&args);
    p.wait_for("turnpike ready", Duration::from_secs(20));
    (p, listen.parse().unwrap(), format!("http://{grpc}"))
}

/// The README's run command: no arguments at all.
#[test]
fn serve_without_arguments_is_a_working_dev_server_with_default_peer_policy() {
    let mut p = Proc::spawn(&["serve"]);
    let cred = p.wait_for("dev credential", Duration::from_secs(20));
    p.wait_for("turnpike ready", Duration::from_secs(20));
    let user = field(&cred, "username");
    let password = field(&cred, "password");
    assert_eq!(user, "turnpike");
    assert!(password.len() >= 16);
    let server: SocketAddr = "127.0.0.1:3478".parse().unwrap();
    let mut t = Turn::new(server, &user, &password);
    let Outcome::Allocated(relays) = t.allocate() else {
        panic!("allocation failed: {}", p.seen.join("\n"));
    };
    assert_eq!(relays[0].ip().to_string(), "127.0.0.1");
    // With the default config, loopback peers are forbidden.
    assert_eq!(
        t.permit("127.0.0.1:9".parse().unwrap()),
        Outcome::Failed(403)
    );
    assert_eq!(
        t.permit("169.254.169.254:80".parse().unwrap()),
        Outcome::Failed(403)
    );
    // A wrong password fails.
    let mut bad = Turn::new(server, &user, "wrong");
    assert_eq!(bad.allocate(), Outcome::Failed(401));
    // Its Admin API is on loopback and needs the printed token.
    let token = p.wait_for("admin token", Duration::from_secs(1));
    assert!(
        p.seen
            .iter()
            .any(|l| l.contains("admin listening on http://127.0.0.1:3479"))
    );
    let token = token.split_whitespace().nth(3).unwrap().to_owned();
    let out = Command::new(common::bin())
        .args(["ctl", "--token", &token, "stats"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p.kill();
    // A control plane with no address configured listens on loopback (same port, so
    // this runs after serve has gone).
    let certs = common::Certs::new("default-listen");
    let mut args = vec![
        "controlplane".to_owned(),
        "--user".to_owned(),
        "u:p".to_owned(),
    ];
    args.extend(certs.control_plane());
    let mut cp = common::spawn_owned(&args);
    cp.wait_for(
        "turnpike grpc listening on 127.0.0.1:3479",
        Duration::from_secs(20),
    );
}

#[test]
fn relays_both_ways_on_both_backends() {
    for backend in ["mmsg", "uring"] {
        let (_p, server, _) = serve(&["--allow-peer", "127.0.0.0/8", "--io-backend", backend]);
        let peer = EchoPeer::start();
        let mut t = Turn::new(server, "u", "p");
        assert!(matches!(t.allocate(), Outcome::Allocated(_)), "{backend}");
        assert_eq!(t.bind(0x4000, peer.addr), Outcome::Ok, "{backend}");
        assert_eq!(echo_round(&mut t, 0x4000, 50), 50, "{backend}");
    }
}

/// Split mode: the control plane dies while traffic flows; relaying goes on; it comes
/// back, the data plane resyncs, and requests on the old allocation succeed.
#[test]
fn split_mode_survives_a_control_plane_restart() {
    let certs = common::Certs::new("split");
    let grpc = format!("127.0.0.1:{}", free_tcp_port());
    let control = format!("https://{grpc}");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let mut cp_args: Vec<String> = [
        "controlplane",
        "--grpc-listen",
        grpc.as_str(),
        "--user",
        "u:p",
        "--allow-peer",
        "127.0.0.0/8",
        "--listen",
        listen.as_str(),
    ]
    .map(String::from)
    .to_vec();
    cp_args.extend(certs.control_plane());
    let mut cp = common::spawn_owned(&cp_args);
    cp.wait_for("control plane ready", Duration::from_secs(20));
    let mut dp = certs.spawn_data_plane("dp1", &control, &listen, &["--workers", "2"]);
    dp.wait_for("turnpike ready", Duration::from_secs(20));
    let server: SocketAddr = listen.parse().unwrap();
    let peer = EchoPeer::start();
    let mut t = Turn::new(server, "u", "p");
    assert!(matches!(t.allocate(), Outcome::Allocated(_)));
    assert_eq!(t.bind(0x4001, peer.addr), Outcome::Ok);
    assert_eq!(echo_round(&mut t, 0x4001, 20), 20);

    cp.kill();
    // Headless: the allocation keeps relaying.
    assert_eq!(echo_round(&mut t, 0x4001, 20), 20);
    dp.wait_for("control plane stream lost", Duration::from_secs(10));

    let mut cp2 = common::spawn_owned(&cp_args);
    cp2.wait_for("control plane ready", Duration::from_secs(20));
    dp.wait_for("attached to control plane", Duration::from_secs(20));
    // The rebuilt control plane knows the allocation: requests on it succeed.
    assert_eq!(t.refresh(600), Outcome::Ok);
    assert_eq!(t.permit(peer.addr), Outcome::Ok);
    assert_eq!(t.bind(0x4001, peer.addr), Outcome::Ok);
    assert_eq!(echo_round(&mut t, 0x4001, 20), 20);
    // And a second Allocate on the same 5-tuple is still a mismatch.
    assert_eq!(t.allocate(), Outcome::Failed(437));
}

#[test]
fn admin_api_lists_revokes_and_watches() {
    use turnpike_api::v1::{self, admin_client::AdminClient};
    let (_p, server, grpc) = serve(&["--allow-peer", "127.0.0.0/8"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(grpc.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut admin = AdminClient::with_interceptor(ch, common::add_token);
        let mut events = admin
            .watch_events(v1::WatchEventsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let peer = EchoPeer::start();
        let mut t = tokio::task::spawn_blocking(move || {
            let mut t = Turn::new(server, "u", "p");
            assert!(matches!(t.allocate(), Outcome::Allocated(_)));
            assert_eq!(t.bind(0x4002, peer.addr), Outcome::Ok);
            assert_eq!(echo_round(&mut t, 0x4002, 10), 10);
            (t, peer)
        })
        .await
        .unwrap();
        let list = admin
            .list_allocations(v1::ListAllocationsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.allocations.len(), 1);
        let id = list.allocations[0]
            .state
            .as_ref()
            .unwrap()
            .allocation
            .as_ref()
            .unwrap()
            .allocation_id;
        assert_eq!(
            list.allocations[0].state.as_ref().unwrap().channels.len(),
            1
        );
        let stats = admin
            .get_stats(v1::GetStatsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stats.totals.unwrap().allocations, 1);
        assert_eq!(stats.data_planes.len(), 1);

        // Lifecycle events arrive: created, then (after usage reports) usage.
        let first = tokio::time::timeout(Duration::from_secs(5), events.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            matches!(first.body, Some(v1::event::Body::Created(_))),
            "{first:?}"
        );
        let mut saw_usage = false;
        for _ in 0..20 {
            let e = tokio::time::timeout(Duration::from_secs(5), events.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let Some(v1::event::Body::Usage(u)) = e.body {
                assert!(u.total.unwrap().client_to_peer.unwrap().packets >= 10);
                saw_usage = true;
                break;
            }
        }
        assert!(saw_usage, "no usage event");

        admin
            .revoke_allocation(v1::RevokeAllocationRequest {
                allocation_id: id,
                reason: "test".into(),
            })
            .await
            .unwrap();
        let list = admin
            .list_allocations(v1::ListAllocationsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(list.allocations.is_empty());
        // The revoked allocation no longer relays.
        let (t2, _peer) = &mut t;
        let t2 = std::mem::replace(t2, Turn::new(server, "u", "p"));
        let got = tokio::task::spawn_blocking(move || {
            let mut t2 = t2;
            echo_round(&mut t2, 0x4002, 3)
        })
        .await
        .unwrap();
        assert_eq!(got, 0);
    });
}

/// One control plane, two data planes: both serve; draining one sends its new clients to
/// the other with 300 Try Alternate; metrics are exported.
#[test]
fn cluster_of_two_data_planes_with_drain_and_metrics() {
    use turnpike_proto::attr::AlternateServer;
    use turnpike_proto::stun::Message;
    let certs = common::Certs::new("cluster");
    let grpc = format!("127.0.0.1:{}", free_tcp_port());
    let control = format!("https://{grpc}");
    let (l1, l2) = (
        format!("127.0.0.1:{}", free_udp_port()),
        format!("127.0.0.1:{}", free_udp_port()),
    );
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let mut args: Vec<String> = [
        "controlplane",
        "--grpc-listen",
        &grpc,
        "--user",
        "u:p",
        "--allow-peer",
        "127.0.0.0/8",
        "--metrics-listen",
        &metrics,
    ]
    .map(String::from)
    .to_vec();
    args.extend(certs.control_plane());
    let mut cp = common::spawn_owned(&args);
    cp.wait_for("control plane ready", Duration::from_secs(20));
    let dp_metrics = format!("127.0.0.1:{}", free_tcp_port());
    let one = ["--workers", "1", "--no-pin"];
    let mut d1 = certs.spawn_data_plane(
        "dp1",
        &control,
        &l1,
        &[&one[..], &["--metrics-listen", &dp_metrics]].concat(),
    );
    let mut d2 = certs.spawn_data_plane("dp2", &control, &l2, &one);
    d1.wait_for("turnpike ready", Duration::from_secs(20));
    d2.wait_for("turnpike ready", Duration::from_secs(20));
    let (s1, s2): (SocketAddr, SocketAddr) = (l1.parse().unwrap(), l2.parse().unwrap());
    let peer = EchoPeer::start();
    for s in [s1, s2] {
        let mut t = Turn::new(s, "u", "p");
        assert!(matches!(t.allocate(), Outcome::Allocated(_)), "{s}");
        assert_eq!(t.bind(0x4003, peer.addr), Outcome::Ok);
        assert_eq!(echo_round(&mut t, 0x4003, 5), 5);
    }
    // Drain the first data plane: new clients there are sent to the second.
    {
        let out = certs.ctl(&grpc, &["stats", "-o", "json"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}");
        let stats: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(stats["data_planes"].as_array().unwrap().len(), 2, "{text}");
    }
    // The data plane listening on l1: its id is its certificate's.
    let out = certs.ctl(&grpc, &["drain", "dp1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut t = Turn::new(s1, "u", "p");
    assert_eq!(t.allocate(), Outcome::Failed(300));
    let m = Message::parse(&t.last).unwrap();
    assert_eq!(m.attr::<AlternateServer>().unwrap().unwrap().0, s2);
    let mut t2 = Turn::new(s2, "u", "p");
    assert!(matches!(t2.allocate(), Outcome::Allocated(_)));

    // Metrics: the control plane's gauges.
    let text = http_get(&metrics);
    assert!(text.contains("turnpike_allocations 3"), "{text}");
    assert!(
        text.contains("# TYPE turnpike_auth_failures_total counter"),
        "{text}"
    );
    drop((d1, d2));
}

fn http_get(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn data_plane_metrics_count_relayed_packets_per_worker() {
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let (_p, server, _) = serve(&["--allow-peer", "127.0.0.0/8", "--metrics-listen", &metrics]);
    let peer = EchoPeer::start();
    let mut t = Turn::new(server, "u", "p");
    assert!(matches!(t.allocate(), Outcome::Allocated(_)));
    assert_eq!(t.bind(0x4004, peer.addr), Outcome::Ok);
    assert_eq!(echo_round(&mut t, 0x4004, 7), 7);
    let text = http_get(&metrics);
    let sum = |dir: &str| -> u64 {
        text.lines()
            .filter(|l| {
                l.starts_with("turnpike_relayed_packets_total{")
                    && l.contains(&format!("direction=\"{dir}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(sum("to_peer"), 7, "{text}");
    assert_eq!(sum("to_client"), 7, "{text}");
    assert!(text.contains("turnpike_allocations 1"), "{text}");
    assert!(
        text.contains("turnpike_dropped_packets_total{reason=\"no_permission\""),
        "{text}"
    );
    assert!(!text.contains("username"), "no per-user labels");
    assert!(
        text.contains("turnpike_quota_allocations{scope=\"user\"} 100"),
        "{text}"
    );
}

/// The annotated example config loads; flags override it, and environment variables
/// override the file too.
#[test]
fn example_config_loads_and_flags_and_env_override_it() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/turnpike.toml");
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = std::process::Command::new(common::bin())
        .args([
            "serve",
            "--config",
            cfg,
            "--listen",
            &listen,
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--user",
            "u:p",
        ])
        .env("TURNPIKE_REALM", "from-env.example")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let lines = std::io::BufRead::lines(std::io::BufReader::new(out));
    let mut ready = false;
    for l in lines.map_while(Result::ok) {
        if l.contains("turnpike ready") {
            assert!(l.contains(&listen), "{l}");
            ready = true;
            break;
        }
    }
    assert!(ready);
    // The realm in a 401 is the environment's.
    let mut t = Turn::new(listen.parse().unwrap(), "u", "p");
    assert!(matches!(t.allocate(), Outcome::Allocated(_)));
    assert_eq!(t.client.realm(), Some("from-env.example"));
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGTERM with a drain grace: new allocations are refused (508: no other instance is
/// known), the existing one keeps relaying, and the process exits as soon as it ends.
#[test]
fn sigterm_drains_then_exits_when_the_last_allocation_ends() {
    let (mut p, server, _admin) = serve(&["--drain-grace", "30", "--allow-peer", "127.0.0.0/8"]);
    let peer = EchoPeer::start();
    let mut t = Turn::new(server, "u", "p");
    assert!(matches!(t.allocate(), Outcome::Allocated(_)));
    assert_eq!(t.bind(0x4000, peer.addr), Outcome::Ok);
    assert_eq!(echo_round(&mut t, 0x4000, 5), 5);
    let pid = nix::unistd::Pid::from_raw(p.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    p.wait_for("turnpike draining: 1 allocations", Duration::from_secs(5));
    let mut late = Turn::new(server, "u", "p");
    assert_eq!(late.allocate(), Outcome::Failed(508));
    assert_eq!(
        echo_round(&mut t, 0x4000, 5),
        5,
        "relaying stopped while draining"
    );
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "exited with an allocation left"
    );
    assert_eq!(t.refresh(0), Outcome::Ok);
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if let Some(status) = p.child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("still running 5 s after its last allocation ended");
}

/// The fleet example parses (every key is known); it stops at the first thing this
/// machine lacks, its certificate files.
#[test]
fn fleet_example_config_parses() {
    let cfg = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/fleet/turnpike-fleet.toml"
    );
    let (code, err) = exit_code(&["serve", "--config", cfg]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("tls.cert"), "{err}");
    assert!(!err.contains("unknown field"), "{err}");
}

/// `--xdp` that cannot be honoured (an interface that does not exist here; the same path
/// as a build without the program or a kernel that refuses it): the server says why the
/// fast path is off, and relays exactly as without it.
#[test]
fn an_xdp_fast_path_that_cannot_start_leaves_a_working_server() {
    let (mut p, server, _) = serve(&["--xdp", "no-such-if0", "--allow-peer", "127.0.0.0/8"]);
    let off = p.wait_for("the XDP fast path is off", Duration::from_secs(5));
    assert!(
        off.contains("no-such-if0") || off.contains("no XDP program") || off.contains("refused"),
        "{off}"
    );
    let peer = EchoPeer::start();
    let mut t = Turn::new(server, "u", "p");
    assert!(matches!(t.allocate(), Outcome::Allocated(_)));
    assert_eq!(t.bind(0x4000, peer.addr), Outcome::Ok);
    assert_eq!(echo_round(&mut t, 0x4000, 20), 20);
}

/// Under a low open-files limit, `serve` says how many allocations fit and refuses the
/// next with 508, counted, instead of failing a bind in the kernel (issue #20 item 7).
#[test]
fn allocations_beyond_the_open_files_limit_get_508() {
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = std::process::Command::new("prlimit");
    cmd.args(["--nofile=300:300", "--"])
        .arg(common::bin())
        .args([
            "serve",
            "--listen",
            &listen,
            "--admin-listen",
            "127.0.0.1:0",
            "--user",
            "u:p",
            "--workers",
            "1",
            "--relay-pool",
            "0",
            "--user-quota",
            "0",
        ]);
    let mut p = common::Proc::spawn_command(cmd);
    let line = p.wait_for("total quota capped at", Duration::from_secs(20));
    let cap: usize = line
        .split("capped at ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no capacity in {line:?}"));
    assert!(
        (100..300).contains(&cap),
        "capacity {cap} under a limit of 300"
    );
    p.wait_for("turnpike ready", Duration::from_secs(20));
    let server: SocketAddr = listen.parse().unwrap();
    // Keep every client's socket: the test process has its own limit to mind.
    let mut clients = Vec::new();
    for i in 0..cap {
        let mut t = Turn::new(server, "u", "p");
        assert!(
            matches!(t.allocate(), Outcome::Allocated(_)),
            "allocation {i} of {cap}"
        );
        clients.push(t);
    }
    let mut one_more = Turn::new(server, "u", "p");
    assert_eq!(one_more.allocate(), Outcome::Failed(508));
    // The server is fine: a client that leaves makes room.
    assert_eq!(clients[0].refresh(0), Outcome::Ok);
    let mut next = Turn::new(server, "u", "p");
    assert!(matches!(next.allocate(), Outcome::Allocated(_)));
}
