//! What an operator's tooling reads from the real `turnpike` binary: `/healthz` and
//! `/readyz` on the metrics listener (drain, SIGTERM, a control plane that goes away, a
//! control plane alone), the quota start-up line and the first 486 of a user in the log,
//! and the Grafana dashboard in `deploy/` against the metric names a server serves.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Outcome, Proc, Turn, ctl_plain, free_tcp_port, free_udp_port};

/// `GET path` on `addr`: (status code, body).
fn get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// Waits (bounded) until `/readyz` on `addr` answers `code`; returns its body.
fn readyz_becomes(addr: &str, code: u16, limit: Duration) -> String {
    let started = Instant::now();
    loop {
        let (c, body) = get(addr, "/readyz");
        if c == code {
            return body;
        }
        assert!(
            started.elapsed() < limit,
            "/readyz still {c} ({body:?}) after {limit:?}, wanted {code}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `serve` on loopback with metrics; (process, TURN address, Admin address, metrics).
fn serve(extra: &[&str]) -> (Proc, SocketAddr, String, String) {
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let admin = format!("127.0.0.1:{}", free_tcp_port());
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let mut args = vec![
        "serve",
        "--listen",
        &listen,
        "--grpc-listen",
        "127.0.0.1:0",
        "--admin-listen",
        &admin,
        "--admin-token",
        common::TOKEN,
        "--metrics-listen",
        &metrics,
        "--workers",
        "1",
        "--user",
        "u:p",
        "--allow-peer",
        "127.0.0.0/8",
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::spawn(&args);
    p.wait_for("turnpike ready", Duration::from_secs(20));
    (p, listen.parse().unwrap(), admin, metrics)
}

#[test]
fn readyz_is_503_while_drained_by_ctl_or_sigterm_and_200_otherwise() {
    let (mut p, server, admin, metrics) = serve(&["--drain-grace", "30"]);
    assert_eq!(get(&metrics, "/healthz"), (200, "ok\n".to_owned()));
    let (code, body) = get(&metrics, "/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("ready"), "{body}");
    assert_eq!(body.lines().count(), 1, "{body:?}");

    // `ctl drain`: not ready (a Service stops sending new clients), still healthy.
    let out = ctl_plain(&admin, &["drain"]);
    assert!(out.status.success(), "{out:?}");
    let body = readyz_becomes(&metrics, 503, Duration::from_secs(3));
    assert!(body.contains("draining"), "{body}");
    assert_eq!(get(&metrics, "/healthz").0, 200);
    let out = ctl_plain(&admin, &["drain", "--undrain"]);
    assert!(out.status.success(), "{out:?}");
    readyz_becomes(&metrics, 200, Duration::from_secs(3));

    // SIGTERM with a grace: draining while an allocation holds the process up.
    let mut t = Turn::new(server, "u", "p");
    assert!(matches!(t.allocate(), Outcome::Allocated(_)));
    let pid = nix::unistd::Pid::from_raw(p.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    p.wait_for("turnpike draining: 1 allocations", Duration::from_secs(5));
    let body = readyz_becomes(&metrics, 503, Duration::from_secs(3));
    assert!(body.contains("SIGTERM"), "{body}");
    assert_eq!(get(&metrics, "/healthz").0, 200);
    assert_eq!(t.refresh(0), Outcome::Ok);
}

#[test]
fn readyz_of_a_data_plane_is_503_once_its_control_plane_is_gone() {
    let certs = common::Certs::new("readyz-split");
    let grpc = format!("127.0.0.1:{}", free_tcp_port());
    let control = format!("https://{grpc}");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let cp_metrics = format!("127.0.0.1:{}", free_tcp_port());
    let dp_metrics = format!("127.0.0.1:{}", free_tcp_port());
    let mut cp_args: Vec<String> = [
        "controlplane",
        "--grpc-listen",
        grpc.as_str(),
        "--user",
        "u:p",
        "--listen",
        listen.as_str(),
        "--metrics-listen",
        cp_metrics.as_str(),
    ]
    .map(String::from)
    .to_vec();
    cp_args.extend(certs.control_plane());
    let mut cp = common::spawn_owned(&cp_args);
    cp.wait_for("control plane ready", Duration::from_secs(20));
    // A control plane without an election is ready, and says so.
    let (code, body) = get(&cp_metrics, "/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("no election"), "{body}");

    let mut dp = certs.spawn_data_plane(
        "dp1",
        &control,
        &listen,
        &["--workers", "1", "--metrics-listen", &dp_metrics],
    );
    dp.wait_for("turnpike ready", Duration::from_secs(20));
    readyz_becomes(&dp_metrics, 200, Duration::from_secs(5));

    cp.kill();
    let started = Instant::now();
    let body = readyz_becomes(&dp_metrics, 503, Duration::from_secs(10));
    eprintln!(
        "data plane not ready {:?} after its control plane died",
        started.elapsed()
    );
    assert!(body.contains("not attached"), "{body}");
    assert_eq!(get(&dp_metrics, "/healthz").0, 200);

    // Back when a control plane is.
    let mut cp2 = common::spawn_owned(&cp_args);
    cp2.wait_for("control plane ready", Duration::from_secs(20));
    readyz_becomes(&dp_metrics, 200, Duration::from_secs(20));
}

#[test]
fn quotas_are_in_the_start_up_lines_and_a_users_first_486_is_logged_once() {
    let (mut p, server, _admin, _metrics) = serve(&["--user-quota", "2"]);
    let line = p.wait_for("turnpike quotas:", Duration::from_secs(1));
    assert!(line.contains("2 allocations per user"), "{line}");
    assert!(line.contains("--user-quota"), "{line}");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut t = Turn::new(server, "u", "p");
        assert!(matches!(t.allocate(), Outcome::Allocated(_)));
        held.push(t);
    }
    for _ in 0..4 {
        let mut t = Turn::new(server, "u", "p");
        assert_eq!(t.allocate(), Outcome::Failed(486));
    }
    let first = "reached the per-user allocation quota";
    let line = p.wait_for(first, Duration::from_secs(5));
    assert!(
        line.contains("\"u\"") && line.contains("--user-quota"),
        "{line}"
    );
    // Let every later line arrive: the next Allocate's answer comes after them.
    let mut t = Turn::new(server, "u", "p");
    assert_eq!(t.allocate(), Outcome::Failed(486));
    std::thread::sleep(Duration::from_millis(300));
    while let Ok(l) = p.lines.try_recv() {
        p.seen.push(l);
    }
    let n = p.seen.iter().filter(|l| l.contains(first)).count();
    assert_eq!(n, 1, "{}", p.seen.join("\n"));
}

/// The metric names in the PromQL of a Grafana dashboard: every `turnpike_...` token
/// of every `expr`.
fn dashboard_metrics(v: &serde_json::Value, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                if k == "expr"
                    && let Some(e) = v.as_str()
                {
                    let bytes = e.as_bytes();
                    let mut i = 0;
                    while let Some(at) = e[i..].find("turnpike_") {
                        let start = i + at;
                        let before_ok = start == 0
                            || !(bytes[start - 1].is_ascii_alphanumeric()
                                || bytes[start - 1] == b'_');
                        let end = e[start..]
                            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                            .map_or(e.len(), |n| start + n);
                        if before_ok {
                            out.insert(e[start..end].to_owned());
                        }
                        i = end;
                    }
                } else {
                    dashboard_metrics(v, out);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_metrics(v, out)),
        _ => {}
    }
}

#[test]
fn every_metric_of_the_grafana_dashboard_is_served() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/turnpike.json"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut used = BTreeSet::new();
    dashboard_metrics(&json, &mut used);
    assert!(used.len() >= 10, "too few metrics found: {used:?}");

    let (_p, _server, _admin, metrics) = serve(&[]);
    let (code, text) = get(&metrics, "/metrics");
    assert_eq!(code, 200);
    // Served: a family the server declares (`# TYPE`), or a sample's name.
    let mut served = BTreeSet::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            served.extend(rest.split_whitespace().next().map(str::to_owned));
        } else if !l.starts_with('#') {
            served.extend(
                l.split(['{', ' '])
                    .next()
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned),
            );
        }
    }
    let missing: Vec<&String> = used
        .iter()
        .filter(|n| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n);
            !served.contains(n.as_str()) && !served.contains(base)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard uses metrics the server does not serve: {missing:?}\nserved: {served:?}"
    );
}
