//! A fleet of three `serve` instances (127.0.0.2, .3, .4) and one real etcd on loopback:
//! the registry and its leases, load-aware redirection followed by a real client,
//! secrets and revocations reaching every instance, and an etcd outage.
//!
//! Needs etcd (`tests/scripts/setup-deps.sh` installs Debian's `etcd-server`); without
//! it the tests say so and pass, except under CI (`CI` set), where they fail.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::etcd::{EtcdProc, ctl_fleet, etcd_available, fleet_name};
use common::{EchoPeer, Outcome, Proc, Turn, echo_round, free_udp_port};
use turnpike_proto::attr::AlternateServer;
use turnpike_proto::stun::Message;

/// One instance of the fleet.
struct Instance {
    proc: Proc,
    id: String,
    udp: SocketAddr,
}

fn instance(etcd: &str, fleet: &str, n: u8, extra: &[&str]) -> Instance {
    let id = format!("i{n}");
    let udp: SocketAddr = format!("127.0.0.{n}:{}", free_udp_port()).parse().unwrap();
    let listen = udp.to_string();
    let mut args = vec![
        "serve",
        "--listen",
        &listen,
        "--no-tcp",
        "--grpc-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--admin-token",
        common::TOKEN,
        "--workers",
        "1",
        "--user",
        "u:p",
        "--user",
        "v:q",
        "--allow-peer",
        "127.0.0.0/8",
        "--relay-pool",
        "0",
        "--etcd",
        etcd,
        "--fleet",
        fleet,
        "--instance-id",
        &id,
        "--region",
        "test",
    ];
    args.extend_from_slice(extra);
    let mut proc = Proc::spawn(&args);
    proc.wait_for("turnpike ready", Duration::from_secs(20));
    proc.wait_for("registered in the fleet", Duration::from_secs(10));
    Instance { proc, id, udp }
}

/// Waits (bounded) until `f` holds.
fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while started.elapsed() < limit {
        if f() {
            return started.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within {limit:?}");
}

/// The ALTERNATE-SERVER of the last response `t` got.
fn alternate(t: &Turn) -> Option<SocketAddr> {
    Message::parse(&t.last)
        .ok()?
        .attr::<AlternateServer>()
        .ok()
        .flatten()
        .map(|a| a.0)
}

#[test]
fn registry_leases_and_redirection_to_the_least_loaded() {
    if !etcd_available() {
        return;
    }
    let etcd = EtcdProc::start();
    let url = etcd.url();
    let fleet = fleet_name("redirect");
    let quota = ["--total-quota", "10"];
    let mut i2 = instance(&url, &fleet, 2, &quota);
    let i3 = instance(
        &url,
        &fleet,
        3,
        &["--total-quota", "10", "--redirect-load", "0.5"],
    );
    let i4 = instance(&url, &fleet, 4, &quota);

    // Every instance is in the registry, with its addresses (a record rewritten after a
    // lease renewal under load may be missing for a moment: read until all are there).
    let mut listing = String::new();
    eventually("every instance listed", Duration::from_secs(15), || {
        listing = ctl_fleet(&url, &fleet, &["instances"]);
        [&i2, &i3, &i4]
            .iter()
            .all(|i| listing.contains(&i.id) && listing.contains(&format!("udp:{}", i.udp)))
    });
    for i in [&i2, &i3, &i4] {
        assert!(
            listing.contains(&i.id) && listing.contains(&format!("udp:{}", i.udp)),
            "{listing}"
        );
    }

    // The same for scripts (turnpike/CTL.md).
    let json: serde_json::Value =
        serde_json::from_str(&ctl_fleet(&url, &fleet, &["instances", "-o", "json"])).unwrap();
    assert_eq!(json["kind"], "instance_list", "{json}");
    for i in [&i2, &i3, &i4] {
        let rec = json["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == i.id.as_str())
            .unwrap_or_else(|| panic!("no {} in {json}", i.id));
        assert_eq!(rec["udp"][0], i.udp.to_string(), "{json}");
        assert_eq!(rec["draining"], false, "{json}");
    }

    // i3 carries load (5 of 10): i4 is the least loaded.
    let peer = EchoPeer::start();
    let mut held: Vec<Turn> = (0..5)
        .map(|_| {
            let mut t = Turn::new(i3.udp, "v", "q");
            assert!(matches!(t.allocate(), Outcome::Allocated(_)));
            t
        })
        .collect();
    eventually("i3's load in the registry", Duration::from_secs(6), || {
        ctl_fleet(&url, &fleet, &["instances"])
            .lines()
            .any(|l| l.starts_with("i3 ") && l.split_whitespace().nth(2) == Some("5"))
    });

    // At its redirect load (0.5), i3 sends new clients to a lighter instance (i2 and i4
    // are equally idle).
    let waited = eventually("a 300 from the loaded i3", Duration::from_secs(5), || {
        let mut probe = Turn::new(i3.udp, "v", "q");
        probe.allocate() == Outcome::Failed(300) && alternate(&probe).is_some()
    });
    eprintln!("load redirect took effect within {waited:?}");
    let mut probe = Turn::new(i3.udp, "v", "q");
    assert_eq!(probe.allocate(), Outcome::Failed(300));
    let target = alternate(&probe).unwrap();
    assert!(target == i2.udp || target == i4.udp, "{target}");
    // Below its resume load it serves locally again.
    for t in held.iter_mut().take(3) {
        assert_eq!(t.refresh(0), Outcome::Ok);
    }
    eventually("i3 serving again", Duration::from_secs(5), || {
        let mut probe = Turn::new(i3.udp, "v", "q");
        let r = probe.allocate();
        if matches!(r, Outcome::Allocated(_)) {
            let _ = probe.refresh(0);
            true
        } else {
            false
        }
    });
    held.truncate(0);
    // Load i4 a little so that the least loaded is unambiguous for the drain below.
    let mut on_i4: Vec<Turn> = (0..2)
        .map(|_| {
            let mut t = Turn::new(i4.udp, "v", "q");
            assert!(matches!(t.allocate(), Outcome::Allocated(_)));
            t
        })
        .collect();
    eventually("i4's load in the registry", Duration::from_secs(6), || {
        ctl_fleet(&url, &fleet, &["instances"])
            .lines()
            .any(|l| l.starts_with("i4 ") && l.split_whitespace().nth(2) == Some("2"))
    });

    // Drained, i2 sends a new client to the least loaded live one (i3, now idle); the
    // client follows and relays there.
    ctl_fleet(&url, &fleet, &["drain", "i2"]);
    let mut c = Turn::new(i2.udp, "u", "p");
    let waited = eventually("a 300 from the drained i2", Duration::from_secs(3), || {
        let mut probe = Turn::new(i2.udp, "u", "p");
        probe.allocate() == Outcome::Failed(300)
    });
    eprintln!("drain took effect within {waited:?}");
    assert_eq!(c.allocate(), Outcome::Failed(300));
    assert_eq!(
        alternate(&c),
        Some(i3.udp),
        "not the least-loaded live instance"
    );
    let mut followed = Turn::new(alternate(&c).unwrap(), "u", "p");
    assert!(matches!(followed.allocate(), Outcome::Allocated(_)));
    assert_eq!(followed.bind(0x4000, peer.addr), Outcome::Ok);
    assert_eq!(echo_round(&mut followed, 0x4000, 5), 5);
    ctl_fleet(&url, &fleet, &["drain", "i2", "--undrain"]);
    eventually("i2 open again", Duration::from_secs(3), || {
        let mut probe = Turn::new(i2.udp, "u", "p");
        matches!(probe.allocate(), Outcome::Allocated(_))
    });

    // A dead instance leaves the registry when its lease expires, and is never a target.
    let _ = i2.proc.child.kill();
    let _ = i2.proc.child.wait();
    let gone = eventually("i2's record expiring", Duration::from_secs(20), || {
        !ctl_fleet(&url, &fleet, &["instances"]).contains("i2 ")
    });
    eprintln!("a killed instance left the registry after {gone:?}");
    for t in &mut on_i4 {
        assert_eq!(t.refresh(0), Outcome::Ok);
    }
    drop(i3);
    drop(i4);
}

#[test]
fn secrets_and_revocations_reach_every_instance() {
    if !etcd_available() {
        return;
    }
    let etcd = EtcdProc::start();
    let url = etcd.url();
    let fleet = fleet_name("config");
    let all: Vec<Instance> = (2..=4).map(|n| instance(&url, &fleet, n, &[])).collect();

    // A TURN REST secret written once works everywhere within 2 s.
    let secret = "fleet-secret-0123456789";
    let written = Instant::now();
    ctl_fleet(&url, &fleet, &["rotate-secrets", secret]);
    let user = format!("{}:alice", 4_000_000_000u64);
    let password = turnpike_controlplane::rest_password(secret, &user);
    for i in &all {
        let left = Duration::from_secs(2)
            .saturating_sub(written.elapsed())
            .max(Duration::from_millis(10));
        eventually("the new secret within 2 s", left, || {
            let mut t = Turn::new(i.udp, &user, &password);
            matches!(t.allocate(), Outcome::Allocated(_))
        });
    }
    eprintln!("secret live on 3 instances after {:?}", written.elapsed());

    // A revoked user loses its allocations everywhere and is refused, within 2 s.
    let mut held: Vec<Turn> = all
        .iter()
        .map(|i| {
            let mut t = Turn::new(i.udp, "u", "p");
            assert!(matches!(t.allocate(), Outcome::Allocated(_)));
            t
        })
        .collect();
    let written = Instant::now();
    ctl_fleet(&url, &fleet, &["revoke-user", "u"]);
    for (i, t) in all.iter().zip(&mut held) {
        eventually("the revocation", Duration::from_secs(2), || {
            let mut probe = Turn::new(i.udp, "u", "p");
            probe.allocate() == Outcome::Failed(401)
        });
        // Its allocation is gone: a refresh of it fails.
        assert!(matches!(t.refresh(600), Outcome::Failed(_)));
    }
    eprintln!(
        "revocation live on 3 instances after {:?}",
        written.elapsed()
    );
    ctl_fleet(&url, &fleet, &["unrevoke-user", "u"]);
    for i in &all {
        eventually("the user back", Duration::from_secs(2), || {
            let mut probe = Turn::new(i.udp, "u", "p");
            matches!(probe.allocate(), Outcome::Allocated(_))
        });
    }

    // Users, peer policy and quotas shared through etcd.
    ctl_fleet(&url, &fleet, &["set-users", "w:x"]);
    for i in &all {
        eventually("a fleet user", Duration::from_secs(2), || {
            let mut t = Turn::new(i.udp, "w", "x");
            let ok = matches!(t.allocate(), Outcome::Allocated(_));
            if ok {
                assert_eq!(t.refresh(0), Outcome::Ok);
            }
            ok
        });
    }
    // The instances allow loopback peers by configuration; the fleet's lists replace
    // that (no allow list: loopback is denied by default), and clearing them restores it.
    ctl_fleet(&url, &fleet, &["set-policy"]);
    let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for i in &all {
        eventually("the fleet's peer policy", Duration::from_secs(2), || {
            let mut t = Turn::new(i.udp, "w", "x");
            assert!(matches!(t.allocate(), Outcome::Allocated(_)));
            let denied = t.permit(peer) == Outcome::Failed(403);
            assert_eq!(t.refresh(0), Outcome::Ok);
            denied
        });
    }
    ctl_fleet(&url, &fleet, &["set-policy", "--clear"]);
    ctl_fleet(
        &url,
        &fleet,
        &["set-quotas", "--user", "1", "--total", "100"],
    );
    for i in &all {
        // (5 s: the previous instance's count of "w" lasts up to a report interval.)
        eventually(
            "the configured policy and the fleet's quota",
            Duration::from_secs(5),
            || {
                let mut t = Turn::new(i.udp, "w", "x");
                let Outcome::Allocated(_) = t.allocate() else {
                    return false;
                };
                let allowed = t.permit(peer) == Outcome::Ok;
                let mut second = Turn::new(i.udp, "w", "x");
                let capped = second.allocate() == Outcome::Failed(486);
                assert_eq!(t.refresh(0), Outcome::Ok);
                allowed && capped
            },
        );
    }
    ctl_fleet(&url, &fleet, &["set-quotas", "--clear"]);
    ctl_fleet(&url, &fleet, &["set-users"]);
    for i in &all {
        eventually("the fleet user gone", Duration::from_secs(2), || {
            let mut t = Turn::new(i.udp, "w", "x");
            t.allocate() == Outcome::Failed(401)
        });
    }
}

#[test]
fn an_etcd_outage_keeps_instances_serving_and_the_registry_heals() {
    if !etcd_available() {
        return;
    }
    let mut etcd = EtcdProc::start();
    let url = etcd.url();
    let fleet = fleet_name("outage");
    let mut a = instance(&url, &fleet, 2, &[]);
    let _b = instance(&url, &fleet, 3, &[]);
    let peer = EchoPeer::start();
    let mut before = Turn::new(a.udp, "u", "p");
    assert!(matches!(before.allocate(), Outcome::Allocated(_)));
    assert_eq!(before.bind(0x4000, peer.addr), Outcome::Ok);

    etcd.kill();
    a.proc
        .wait_for("fleet registry unavailable", Duration::from_secs(20));
    // Existing allocations relay; new local ones are made.
    assert_eq!(echo_round(&mut before, 0x4000, 5), 5);
    let mut during = Turn::new(a.udp, "u", "p");
    assert!(matches!(during.allocate(), Outcome::Allocated(_)));
    assert_eq!(during.bind(0x4001, peer.addr), Outcome::Ok);
    assert_eq!(echo_round(&mut during, 0x4001, 5), 5);

    // etcd back (same data, same ports): the instance that saw the outage registers
    // again under a new lease (the other may have kept its lease through a short
    // outage), and the registry lists both.
    etcd.run();
    let back = Instant::now();
    a.proc
        .wait_for_nth("registered in the fleet", 2, Duration::from_secs(20));
    eprintln!("re-registered {:?} after etcd came back", back.elapsed());
    let healed = eventually("the registry healing", Duration::from_secs(20), || {
        let out = Command::new(common::bin())
            .args([
                "ctl",
                "fleet",
                "--etcd",
                &url,
                "--fleet",
                &fleet,
                "instances",
            ])
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        s.contains("i2 ") && s.contains("i3 ")
    });
    eprintln!("registry healed {healed:?} after etcd came back");
    assert_eq!(echo_round(&mut before, 0x4000, 5), 5);
}

#[test]
fn fleet_wide_admin_and_per_user_quota() {
    if !etcd_available() {
        return;
    }
    let etcd = EtcdProc::start();
    let url = etcd.url();
    let fleet = fleet_name("admin");
    let quota = ["--user-quota", "4"];
    let all: Vec<Instance> = (2..=4).map(|n| instance(&url, &fleet, n, &quota)).collect();
    // Two allocations of "u" on i2 and two on i3: the quota of 4 is used up fleet-wide.
    let mut held = Vec::new();
    for i in &all[..2] {
        for _ in 0..2 {
            let mut t = Turn::new(i.udp, "u", "p");
            assert!(matches!(t.allocate(), Outcome::Allocated(_)));
            held.push(t);
        }
    }
    // Once the registry has the counts (within one report), i4 refuses a fifth.
    let waited = eventually("the fleet-wide quota on i4", Duration::from_secs(6), || {
        let mut t = Turn::new(all[2].udp, "u", "p");
        match t.allocate() {
            Outcome::Failed(486) => true,
            Outcome::Allocated(_) => {
                assert_eq!(t.refresh(0), Outcome::Ok);
                false
            }
            other => panic!("{other:?}"),
        }
    });
    eprintln!("fleet-wide quota enforced {waited:?} after the allocations");
    // Another user is not affected.
    let mut v = Turn::new(all[2].udp, "v", "q");
    assert!(matches!(v.allocate(), Outcome::Allocated(_)));

    // The fleet's allocations, listed through any instance's registry entry.
    let out = Command::new(common::bin())
        .args([
            "ctl",
            "--token",
            common::TOKEN,
            "fleet",
            "--etcd",
            &url,
            "--fleet",
            &fleet,
        ])
        .args(["list", "--user", "u"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for id in ["i2", "i3"] {
        assert_eq!(
            listing
                .lines()
                .filter(|l| l.starts_with(&format!("{id} ")))
                .count(),
            2,
            "{listing}"
        );
    }
    assert!(!listing.lines().any(|l| l.starts_with("i4 ")), "{listing}");
    let out = Command::new(common::bin())
        .args(["ctl", "--token", common::TOKEN, "fleet", "--etcd", &url])
        .args(["--fleet", &fleet, "list", "--user", "u", "-o", "json"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let all = json["allocations"].as_array().unwrap();
    assert_eq!(all.len(), 4, "{json}");
    assert!(
        all.iter()
            .all(|a| a["user"] == "u" && a["instance"] != "i4" && a["relayed"][0].is_string()),
        "{json}"
    );
    eventually(
        "fleet stats with 5 allocations",
        Duration::from_secs(6),
        || ctl_fleet(&url, &fleet, &["stats"]).contains("fleet: 3 instances, allocations 5"),
    );
    // Events from every instance, merged: the deletions below show up with their
    // instance's id.
    let mut watch = std::process::Command::new(common::bin())
        .args([
            "ctl",
            "--token",
            common::TOKEN,
            "fleet",
            "--etcd",
            &url,
            "--fleet",
            &fleet,
            "watch",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines = std::io::BufRead::lines(std::io::BufReader::new(watch.stdout.take().unwrap()));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    for t in &mut held {
        assert_eq!(t.refresh(0), Outcome::Ok);
    }
    assert_eq!(v.refresh(0), Outcome::Ok);
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.len() < 3 && Instant::now() < deadline {
        // Each line starts with its instance's id (after a header row).
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200))
            && let Some(id) = l.split_whitespace().next()
            && id != "INSTANCE"
        {
            seen.insert(id.to_owned());
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["i2", "i3", "i4"],
        "events from every instance"
    );
}

/// The "first 300" of a drained instance: how long it took to appear, and what the
/// last answer was while waiting (for the failure message).
fn first_redirect(at: SocketAddr, limit: Duration) -> (Duration, Outcome, Option<SocketAddr>) {
    let started = Instant::now();
    loop {
        let mut probe = Turn::new(at, "u", "p");
        let r = probe.allocate();
        if r == Outcome::Failed(300) || started.elapsed() >= limit {
            return (started.elapsed(), r, alternate(&probe));
        }
        eprintln!("{:?} after the drain: {r:?}", started.elapsed());
        if matches!(r, Outcome::Allocated(_)) {
            let _ = probe.refresh(0);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ctl_drain_and_sigterm_on_a_fleet_member_redirect_to_a_live_instance() {
    if !etcd_available() {
        return;
    }
    let etcd = EtcdProc::start();
    let url = etcd.url();
    let fleet = fleet_name("ctl-drain");
    let mut a = instance(&url, &fleet, 2, &["--drain-grace", "30"]);
    let b = instance(&url, &fleet, 3, &[]);
    let admin = a
        .proc
        .wait_for("admin listening on http://", Duration::from_secs(1));
    let admin = admin.rsplit("http://").next().unwrap().trim().to_owned();
    // Both registered, and A has reported since it saw B.
    eventually("both instances registered", Duration::from_secs(5), || {
        let l = ctl_fleet(&url, &fleet, &["instances"]);
        l.contains(&a.id) && l.contains(&b.id)
    });
    std::thread::sleep(fleet_report());

    // `ctl drain` on A: a new Allocate at A gets 300 naming B (not 508), as `ctl fleet
    // drain` does.
    let out = common::ctl_plain(&admin, &["drain"]);
    assert!(out.status.success(), "{out:?}");
    let (waited, r, alt) = first_redirect(a.udp, Duration::from_secs(3));
    assert_eq!(r, Outcome::Failed(300), "ctl drain answered {r:?}");
    assert_eq!(alt, Some(b.udp));
    eprintln!("ctl drain redirected within {waited:?}");
    // The registry says A is draining: nobody sends clients to it.
    eventually("A draining in the registry", Duration::from_secs(3), || {
        ctl_fleet(&url, &fleet, &["instances"])
            .lines()
            .any(|l| l.starts_with("i2 ") && l.contains("draining"))
    });
    let out = common::ctl_plain(&admin, &["drain", "--undrain"]);
    assert!(out.status.success(), "{out:?}");
    eventually("A open again", Duration::from_secs(3), || {
        let mut probe = Turn::new(a.udp, "u", "p");
        let ok = matches!(probe.allocate(), Outcome::Allocated(_));
        if ok {
            let _ = probe.refresh(0);
        }
        ok
    });

    // SIGTERM with --drain-grace: the same.
    let mut held = Turn::new(a.udp, "u", "p");
    assert!(matches!(held.allocate(), Outcome::Allocated(_)));
    let pid = nix::unistd::Pid::from_raw(a.proc.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    a.proc
        .wait_for("turnpike draining: 1 allocations", Duration::from_secs(5));
    let (waited, r, alt) = first_redirect(a.udp, Duration::from_secs(1));
    assert_eq!(r, Outcome::Failed(300), "SIGTERM drain answered {r:?}");
    assert_eq!(alt, Some(b.udp));
    eprintln!("SIGTERM redirected within {waited:?}");
    assert_eq!(held.refresh(0), Outcome::Ok);
    drop(b);
}

/// How often an instance rewrites its record (`turnpike/src/fleet.rs` REPORT), plus a
/// margin.
fn fleet_report() -> Duration {
    Duration::from_millis(2_500)
}
