//! `turnpike ctl` for people and for scripts, against a real `serve` holding allocations
//! with permissions and channels: `list`, `get` and `stats` print readable tables, and
//! `--output json` parses back with the fields turnpike/CTL.md documents.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{EchoPeer, Outcome, Proc, TOKEN, Turn, ctl_plain, echo_round, free_udp_port};
use serde_json::Value;

/// Runs `ctl ARGS` against `admin`; stdout, after checking it succeeded.
fn ctl(admin: &str, args: &[&str]) -> String {
    let out = ctl_plain(admin, args);
    assert!(
        out.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What a debug dump of the API structs would show, and a table must not.
fn assert_readable(text: &str) {
    for raw in [
        "[127, 0, 0, 1]",
        "deadline_unix_millis",
        "created_unix_millis",
        "Some(",
        "{ ip:",
    ] {
        assert!(!text.contains(raw), "{raw:?} in:\n{text}");
    }
}

fn json(text: &str, kind: &str) -> Value {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(v["schema"], "turnpike.ctl/v1", "{v}");
    assert_eq!(v["kind"], kind, "{v}");
    assert!(v["now"].as_str().unwrap().ends_with('Z'), "{v}");
    v
}

#[test]
fn list_get_and_stats_print_tables_and_json_that_parses_back() {
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let mut p = Proc::spawn(&[
        "serve",
        "--listen",
        &listen,
        "--grpc-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--admin-token",
        TOKEN,
        "--workers",
        "1",
        "--no-pin",
        "--user",
        "alice:pw",
        "--user",
        "bob:pw",
        "--allow-peer",
        "127.0.0.0/8",
    ]);
    let line = p.wait_for("admin listening on http://", Duration::from_secs(20));
    let admin = line.rsplit("http://").next().unwrap().trim().to_owned();
    p.wait_for("turnpike ready", Duration::from_secs(20));
    let server: SocketAddr = listen.parse().unwrap();

    // alice: channels to two peers on one IP (so one permission), some traffic; bob: bare.
    let (peer, peer2) = (EchoPeer::start(), EchoPeer::start());
    let mut alice = Turn::new(server, "alice", "pw");
    let Outcome::Allocated(relayed) = alice.allocate() else {
        panic!("alice's Allocate failed")
    };
    assert_eq!(alice.permit(peer.addr), Outcome::Ok);
    assert_eq!(alice.bind(0x4000, peer.addr), Outcome::Ok);
    assert_eq!(alice.bind(0x4001, peer2.addr), Outcome::Ok);
    assert_eq!(echo_round(&mut alice, 0x4000, 5), 5);
    let mut bob = Turn::new(server, "bob", "pw");
    assert!(matches!(bob.allocate(), Outcome::Allocated(_)));
    let alice_client = alice.sock.local_addr().unwrap();

    // `ctl list`: a header and one line per allocation, addresses as ip:port.
    let table = ctl(&admin, &["list"]);
    assert_readable(&table);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID", "USER", "CLIENT", "RELAYED", "PEERS", "CHANNELS", "UP", "DOWN", "AGE", "EXPIRES",
            "DATA", "PLANE"
        ],
        "{table}"
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2, "{table}");
    let alice_row = rows
        .iter()
        .find(|l| l.split_whitespace().nth(1) == Some("alice"))
        .unwrap_or_else(|| panic!("no row of alice in:\n{table}"));
    assert!(
        alice_row.contains(&format!("udp:{alice_client}")),
        "{table}"
    );
    assert!(alice_row.contains(&relayed[0].to_string()), "{table}");
    assert!(alice_row.contains(" in "), "no remaining lifetime: {table}");
    let cells: Vec<&str> = alice_row.split_whitespace().collect();
    assert_eq!((cells[4], cells[5]), ("1", "2"), "peers, channels: {table}");
    let id = cells[0];

    // `ctl get ID`, with the id `ctl list` printed: a key: value page with the
    // permissions and channels and their lifetimes.
    let page = ctl(&admin, &["get", id]);
    assert_readable(&page);
    for want in [
        "ID:".to_owned(),
        "User:".to_owned(),
        format!("udp:{alice_client}"),
        relayed[0].to_string(),
        "Permissions (1):".to_owned(),
        "Channels (2):".to_owned(),
        "0x4000".to_owned(),
        "0x4001".to_owned(),
        peer.addr.to_string(),
        peer2.addr.to_string(),
    ] {
        assert!(page.contains(&want), "no {want:?} in:\n{page}");
    }
    assert!(
        page.lines()
            .any(|l| l.starts_with("ID:") && l.ends_with(&format!(" {id}"))),
        "{page}"
    );
    assert!(
        page.lines().filter(|l| l.contains(" in ")).count() >= 5,
        "{page}"
    );
    let missing = ctl_plain(&admin, &["get", "999999"]);
    assert!(!missing.status.success());

    // `ctl stats`: key: value counters, a data-plane table, the relay paths.
    let stats = ctl(&admin, &["stats"]);
    assert_readable(&stats);
    for want in [
        "allocations: 2",
        "users: 2",
        "data_planes_attached: 1",
        "user_quota: ",
        "ownership_violations: 0",
        "DATA PLANE",
        "XDP not asked for",
    ] {
        assert!(stats.contains(want), "no {want:?} in:\n{stats}");
    }

    // The same through -o json, parsed back.
    let list = json(&ctl(&admin, &["list", "-o", "json"]), "allocation_list");
    let all = list["allocations"].as_array().unwrap();
    assert_eq!(all.len(), 2, "{list}");
    let a = all.iter().find(|a| a["user"] == "alice").unwrap();
    assert_eq!(a["id"].to_string(), id, "{a}");
    assert_eq!(a["transport"], "udp");
    assert_eq!(a["client"], alice_client.to_string());
    assert_eq!(a["relayed"][0], relayed[0].to_string());
    assert!(a["expires_in_s"].as_u64().unwrap() > 0, "{a}");
    assert!(a["age_s"].is_u64(), "{a}");
    assert!(a["created_at"].as_str().unwrap().ends_with('Z'), "{a}");
    assert_eq!(a["permissions"].as_array().unwrap().len(), 1, "{a}");
    let ch: Vec<(u64, &str)> = a["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["number"].as_u64().unwrap(), c["peer"].as_str().unwrap()))
        .collect();
    assert!(
        ch.contains(&(0x4000, peer.addr.to_string().as_str())),
        "{a}"
    );
    assert!(
        ch.contains(&(0x4001, peer2.addr.to_string().as_str())),
        "{a}"
    );
    for p in a["permissions"].as_array().unwrap() {
        assert!(p["peer"].as_str().unwrap().starts_with("127."), "{a}");
        assert!(p["expires_in_s"].as_u64().unwrap() > 0, "{a}");
    }

    let got = json(&ctl(&admin, &["get", id, "--output", "json"]), "allocation");
    assert_eq!(got["allocation"]["id"].to_string(), id);
    assert_eq!(got["allocation"]["channels"], a["channels"]);

    // The relayed traffic reaches the counters with the next usage report.
    let t0 = std::time::Instant::now();
    loop {
        let v = json(&ctl(&admin, &["-o", "json", "get", id]), "allocation");
        if v["allocation"]["traffic"]["up"]["packets"].as_u64() >= Some(5) {
            assert!(v["allocation"]["traffic"]["down"]["bytes"].as_u64() > Some(0));
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no traffic: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let s = json(&ctl(&admin, &["stats", "-o", "json"]), "stats");
    assert_eq!(s["totals"]["allocations"], 2, "{s}");
    assert_eq!(s["totals"]["data_planes_attached"], 1, "{s}");
    assert!(s["totals"]["drops"].is_object(), "{s}");
    let dps = s["data_planes"].as_array().unwrap();
    assert_eq!(dps.len(), 1, "{s}");
    assert_eq!(dps[0]["attached"], true);
    assert_eq!(
        dps[0]["listening"][0]["address"].as_str(),
        Some(listen.as_str()),
        "{s}"
    );
    p.kill();
}
