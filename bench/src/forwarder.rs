//! The bare forwarder: the physical reference for the relay. It has what a TURN relay
//! must have to move a datagram (a listening socket, one relay socket per client
//! connected to the peer, a lookup from client address to relay socket, epoll and
//! recvmmsg/sendmmsg in batches of 64, optionally UDP GSO for runs of equal size to
//! one destination, as turnpike does) and no TURN logic: no framing, no permissions,
//! no authentication, no timers.
//!
//! client → listen socket → relay socket (connected) → peer;
//! peer → relay socket → listen socket → client.

use std::collections::HashMap;
use std::io::{IoSlice, Write};
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::SockaddrIn;

use crate::net::{self, BATCH, MAX_GSO_BYTES, MAX_GSO_SEGS, Receiver, Rx, Sender, Sent};

#[derive(Debug, Args)]
pub struct ForwarderArgs {
    /// Where clients send.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// The peer every client's datagrams go to.
    #[arg(long)]
    pub to: SocketAddr,
    /// Merge runs of equal-size datagrams to one destination into UDP GSO sends.
    #[arg(long)]
    pub gso: bool,
    /// SO_RCVBUF/SO_SNDBUF of every socket, bytes (turnpike's default: 4 MiB).
    #[arg(long, default_value_t = 4 << 20)]
    pub buffer: usize,
    /// Most relay sockets (clients).
    #[arg(long, default_value_t = 4096)]
    pub max_clients: usize,
    /// Exit after this many seconds.
    #[arg(long, default_value_t = 1800.0)]
    pub max_seconds: f64,
    /// Pin to this CPU.
    #[arg(long)]
    pub cpu: Option<usize>,
}

/// Epoll token of the listening socket.
const LISTEN: u64 = u64::MAX;
/// recvmmsg rounds per ready socket and turn (as turnpike's mmsg backend).
const ROUNDS: usize = 4;

struct Relay {
    sock: UdpSocket,
    client_sa: SockaddrIn,
}

pub fn run(a: &ForwarderArgs) -> Result<()> {
    if let Some(c) = a.cpu {
        crate::proc::pin_to(c)?;
    }
    let to = net::v4(a.to)?;
    net::v4(a.listen)?;
    let listen = net::udp(a.listen, a.buffer, false)?;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    epoll.add(listen.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, LISTEN))?;
    let mut relays: Vec<Relay> = Vec::new();
    let mut by_client: HashMap<SocketAddrV4, usize> = HashMap::new();
    let mut rx = Receiver::new(false);
    let mut tx = Sender::default();
    let mut events = vec![EpollEvent::empty(); 256];
    // Per received datagram: the relay it goes out of (listen batches).
    let mut dest: Vec<usize> = Vec::with_capacity(BATCH);
    let mut order: Vec<usize> = Vec::with_capacity(BATCH);
    println!("forwarder ready: listen={} to={to}", listen.local_addr()?);
    std::io::stdout().flush()?;
    let t0 = Instant::now();
    let limit = Duration::from_secs_f64(a.max_seconds);
    while t0.elapsed() < limit {
        let n = epoll.wait(&mut events, EpollTimeout::from(100u8))?;
        for ev in events.iter().take(n) {
            let tok = ev.data();
            for _ in 0..ROUNDS {
                let got = if tok == LISTEN {
                    let got = rx.recv(&listen)?;
                    dest.clear();
                    for m in rx.meta.iter() {
                        let idx = match by_client.get(&m.from) {
                            Some(&i) => i,
                            None => {
                                if relays.len() >= a.max_clients {
                                    dest.push(usize::MAX);
                                    continue;
                                }
                                let s = net::udp(
                                    SocketAddr::from(([127, 0, 0, 1], 0)),
                                    a.buffer,
                                    false,
                                )?;
                                s.connect(SocketAddr::V4(to))?;
                                let i = relays.len();
                                epoll.add(
                                    s.as_fd(),
                                    EpollEvent::new(EpollFlags::EPOLLIN, i as u64),
                                )?;
                                relays.push(Relay {
                                    sock: s,
                                    client_sa: net::sockaddr(m.from),
                                });
                                by_client.insert(m.from, i);
                                i
                            }
                        };
                        dest.push(idx);
                    }
                    // One sendmmsg per relay socket, in arrival order within it.
                    order.clear();
                    order.extend((0..dest.len()).filter(|&i| dest[i] != usize::MAX));
                    order.sort_by_key(|&i| dest[i]);
                    let mut i = 0;
                    while i < order.len() {
                        let r = dest[order[i]];
                        let mut j = i;
                        while j < order.len() && dest[order[j]] == r {
                            j += 1;
                        }
                        let msgs: Vec<Rx> = order[i..j].iter().map(|&k| rx.meta[k]).collect();
                        if let Some(relay) = relays.get(r) {
                            forward(&mut tx, &relay.sock, &rx, &msgs, None, a.gso)?;
                        }
                        i = j;
                    }
                    got
                } else {
                    let Some(relay) = relays.get(tok as usize) else {
                        break;
                    };
                    let got = rx.recv(&relay.sock)?;
                    let msgs: Vec<Rx> = rx.meta.iter().filter(|m| m.from == to).copied().collect();
                    forward(&mut tx, &listen, &rx, &msgs, Some(relay.client_sa), a.gso)?;
                    got
                };
                if got < BATCH {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Sends `msgs` (datagrams in `rx`'s buffer) from `sock`, to `to` or the connected
/// peer: one sendmmsg per up-to-64 messages, GSO groups of equal size when `gso`.
fn forward(
    tx: &mut Sender,
    sock: &UdpSocket,
    rx: &Receiver,
    msgs: &[Rx],
    to: Option<SockaddrIn>,
    gso: bool,
) -> Result<()> {
    let iovs: Vec<IoSlice<'_>> = msgs.iter().map(|m| IoSlice::new(rx.data(m))).collect();
    let mut i = 0;
    while i < iovs.len() {
        // Groups of this sendmmsg: (start, end) into iovs.
        let mut groups: Vec<(usize, usize)> = Vec::with_capacity(BATCH);
        let mut j = i;
        let mut seg_len = None;
        while j < iovs.len() && groups.len() < BATCH {
            let len = msgs[j].len;
            let mut k = j + 1;
            if gso {
                while k < iovs.len()
                    && msgs[k].len == len
                    && k - j < MAX_GSO_SEGS
                    && (k - j + 1) * len <= MAX_GSO_BYTES
                {
                    k += 1;
                }
            }
            // nix shares one control message across a sendmmsg: a GSO call carries
            // groups of one segment size only, and plain datagrams go in their own.
            let this = if gso && k - j > 1 { Some(len) } else { None };
            if !groups.is_empty() && this != seg_len {
                break;
            }
            seg_len = this;
            groups.push((j, k));
            j = k;
        }
        let slices: Vec<&[IoSlice<'_>]> = groups.iter().map(|&(a, b)| &iovs[a..b]).collect();
        let dests = vec![to; slices.len()];
        match tx.send(sock, &slices, &dests, seg_len.map(|l| l as u16))? {
            Sent::Messages(m) if m > 0 => {
                i = groups[m - 1].1;
            }
            // A full socket buffer drops the rest, as a relay would.
            Sent::Messages(_) | Sent::WouldBlock => return Ok(()),
        }
    }
    if i > iovs.len() {
        bail!("forwarder: send index past the batch");
    }
    Ok(())
}
