//! The control-plane core alone, on one core: complete authenticated Allocate handshakes
//! (401 challenge, then the authenticated Allocate and its bind acknowledgement) and
//! CreatePermission requests per second.
#![allow(clippy::unwrap_used)]
// The benchmark times the core with the wall clock; the core itself never reads it.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use turnpike_controlplane::{
    Credentials, FiveTuple, Millis, Output, Server, ServerConfig, Transport,
};
use turnpike_proto::client::{Client, Event};

const NOW: Millis = Millis(1_767_225_600_000);

fn server() -> Server {
    let cfg = ServerConfig {
        relay_ips: vec!["192.0.2.10".parse().unwrap()],
        relay_ports: (1024, 65535),
        unauth_rate: 0,
        unauth_ip_rate: 0,
        // One user makes 20k allocations per server here: no quotas.
        user_quota: 0,
        total_quota: 0,
        ..ServerConfig::default()
    };
    let creds = Credentials::new("bench", &[("user".into(), "password".into())], &[]);
    Server::new(cfg, creds, [1; 32], 1)
}

fn tuple(i: u32) -> FiveTuple {
    FiveTuple {
        transport: Transport::Udp,
        client: SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 40000)),
        server: "192.0.2.10:3478".parse().unwrap(),
    }
}

/// Feeds `req` and acknowledges binds; returns the last response.
fn exchange(s: &mut Server, t: FiveTuple, req: &[u8], out: &mut Vec<Output>) -> Vec<u8> {
    out.clear();
    s.handle(NOW, t, req, out);
    let mut resp = Vec::new();
    let mut i = 0;
    while i < out.len() {
        match &out[i] {
            Output::Bind(b) => {
                let id = b.id;
                let mut more = Vec::new();
                s.handle_bind_result(NOW, id, Ok(()), &mut more);
                out.extend(more);
            }
            Output::Transmit { data, .. } => resp = data.clone(),
            _ => {}
        }
        i += 1;
    }
    resp
}

fn allocate_handshake(c: &mut Criterion) {
    let mut g = c.benchmark_group("controlplane");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("allocate_handshake", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0u64;
            while done < iters {
                // A fresh server per 20k allocations keeps ports available.
                let mut s = server();
                let mut out = Vec::new();
                let chunk = (iters - done).min(20_000);
                let start = Instant::now();
                for i in 0..chunk as u32 {
                    let t = tuple(i);
                    let mut cl = Client::new("user", "password", u64::from(i));
                    let mut req = Vec::new();
                    cl.allocate(0, Default::default(), &mut req).unwrap();
                    let challenge = exchange(&mut s, t, &req, &mut out);
                    let mut retry = Vec::new();
                    assert!(matches!(cl.handle(0, &challenge, &mut retry), Event::Retry));
                    let ok = exchange(&mut s, t, &retry, &mut out);
                    assert!(matches!(
                        cl.handle(0, &ok, &mut retry),
                        Event::Allocated { .. }
                    ));
                }
                total += start.elapsed();
                done += chunk;
            }
            total
        })
    });

    let mut s = server();
    let t = tuple(1);
    let mut out = Vec::new();
    let mut cl = Client::new("user", "password", 9);
    let mut req = Vec::new();
    cl.allocate(0, Default::default(), &mut req).unwrap();
    let ch = exchange(&mut s, t, &req, &mut out);
    let mut retry = Vec::new();
    cl.handle(0, &ch, &mut retry);
    let ok = exchange(&mut s, t, &retry, &mut out);
    assert!(matches!(
        cl.handle(0, &ok, &mut retry),
        Event::Allocated { .. }
    ));
    let peers: Vec<SocketAddr> = (0..64u8)
        .map(|i| SocketAddr::from(([198, 51, 100, i], 5000)))
        .collect();
    let mut i = 0usize;
    g.bench_function("create_permission", |b| {
        b.iter(|| {
            let mut req = Vec::new();
            cl.create_permission(0, &peers[i % 64..i % 64 + 1], &mut req)
                .unwrap();
            i += 1;
            let resp = exchange(&mut s, t, &req, &mut out);
            let mut none = Vec::new();
            assert!(matches!(
                cl.handle(0, &resp, &mut none),
                Event::PermissionCreated
            ));
        })
    });
    g.finish();
}

criterion_group!(benches, allocate_handshake);
criterion_main!(benches);
