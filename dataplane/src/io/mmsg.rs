//! The portable backend: epoll, and recvmmsg/sendmmsg in batches of up to [`BATCH`].

use std::io;
use std::os::fd::AsFd;
use std::sync::{Arc, mpsc};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::EventFd;

use crate::core::Token;
use crate::core::counters::bump;
use crate::core::{HEADROOM, RECV_CAP, Received, SLOT, Transmit};
use crate::io::batch::{group_end, gso_refused, report_ready};
use crate::io::slab::Kind;
use crate::io::sys::{self, GsoCmsg, NAME_LEN, RawName};
use crate::io::worker::{IoOp, Worker, unix_millis};

/// Datagrams per recvmmsg/sendmmsg call.
pub(crate) const BATCH: usize = 64;
/// recvmmsg rounds per ready socket and loop turn before others get their turn.
const ROUNDS: usize = 4;
/// The epoll token of the wake-up eventfd.
const WAKE: u64 = u64::MAX;
/// Bytes read from a connection at a time (into the receive buffers, free between
/// batches).
const STREAM_READ: usize = 64 * 1024;
const _: () = assert!(STREAM_READ <= BATCH * SLOT);

struct Mmsg {
    epoll: Epoll,
    bufs: Box<[u8]>,
    names: Box<[RawName]>,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    outs: Vec<Transmit>,
    s_hdrs: Box<[libc::mmsghdr]>,
    s_iovs: Box<[libc::iovec]>,
    s_names: Box<[RawName]>,
    s_cmsgs: Box<[GsoCmsg]>,
    s_groups: Box<[(usize, usize)]>,
    dirty: Vec<Token>,
}

/// Runs a worker on epoll + recvmmsg/sendmmsg until it is told to stop.
pub(crate) fn run(
    mut worker: Worker,
    wake: Arc<EventFd>,
    ready: mpsc::SyncSender<io::Result<()>>,
) -> io::Result<()> {
    let started = Mmsg::new(&wake).and_then(|mut m| {
        m.apply_io_ops(&mut worker)?;
        Ok(m)
    });
    let mut m = report_ready(&ready, started)?;
    let mut events = vec![EpollEvent::empty(); 64];
    loop {
        let wait = worker
            .poll_timeout()
            .0
            .saturating_sub(unix_millis().0)
            .min(1000) as u16;
        let n = match m.epoll.wait(&mut events, EpollTimeout::from(wait)) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        worker.now = unix_millis();
        for ev in events.iter().take(n) {
            if ev.data() == WAKE {
                let _ = wake.read();
                continue;
            }
            let t = Token(ev.data() as u32);
            match worker.socks.kind(t) {
                Some(Kind::Udp) => {
                    for _ in 0..ROUNDS {
                        if m.recv_batch(&mut worker, t) < BATCH {
                            break;
                        }
                    }
                }
                Some(Kind::Listener(_)) => worker.accept_ready(t),
                Some(Kind::Stream) => {
                    let f = ev.events();
                    if f.contains(EpollFlags::EPOLLOUT) {
                        worker.mark_dirty(t);
                    }
                    let hangup = f.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR);
                    if hangup || f.contains(EpollFlags::EPOLLIN) {
                        let scratch = m.bufs.get_mut(..STREAM_READ).unwrap_or_default();
                        worker.stream_readable(t, scratch, hangup);
                    }
                }
                None => {}
            }
        }
        if worker.handle_commands() {
            break;
        }
        worker.handle_timeout();
        m.flush_streams(&mut worker);
        m.apply_io_ops(&mut worker)?;
    }
    worker.close_all();
    m.apply_io_ops(&mut worker)
}

/// What a connection is polled for: input until its end of stream, room to write
/// while its queue waits for it (EPOLLHUP and EPOLLERR come regardless).
fn interest(c: &crate::io::conns::Conn) -> EpollFlags {
    let mut flags = EpollFlags::empty();
    if c.reading() {
        flags |= EpollFlags::EPOLLIN;
    }
    if c.want_write {
        flags |= EpollFlags::EPOLLOUT;
    }
    flags
}

impl Mmsg {
    fn new(wake: &EventFd) -> io::Result<Mmsg> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE))?;
        Ok(Mmsg {
            epoll,
            bufs: vec![0u8; BATCH * SLOT].into_boxed_slice(),
            names: vec![RawName::default(); BATCH].into_boxed_slice(),
            iovs: vec![sys::empty_iovec(); BATCH].into_boxed_slice(),
            hdrs: (0..BATCH).map(|_| sys::empty_mmsghdr()).collect(),
            outs: Vec::with_capacity(BATCH),
            s_hdrs: (0..BATCH).map(|_| sys::empty_mmsghdr()).collect(),
            s_iovs: vec![sys::empty_iovec(); BATCH].into_boxed_slice(),
            s_names: vec![RawName::default(); BATCH].into_boxed_slice(),
            s_cmsgs: vec![GsoCmsg::default(); BATCH].into_boxed_slice(),
            s_groups: vec![(0, 0); BATCH].into_boxed_slice(),
            dirty: Vec::new(),
        })
    }

    fn apply_io_ops(&mut self, worker: &mut Worker) -> io::Result<()> {
        if worker.io_ops.is_empty() {
            // Most turns: keep the queue's capacity rather than take and free it.
            return Ok(());
        }
        for op in std::mem::take(&mut worker.io_ops) {
            match op {
                IoOp::Register(t) => {
                    if let Some(fd) = worker.socks.fd(t) {
                        self.epoll
                            .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, u64::from(t.0)))?;
                    }
                }
                IoOp::Pause(t) => {
                    if let Some(fd) = worker.socks.fd(t) {
                        let _ = self.epoll.delete(fd);
                    }
                }
                IoOp::StopReading(t) => {
                    // Level-triggered EPOLLIN stays set at the end of a stream: keep
                    // polling for it and the worker would spin.
                    if let Some(e) = worker.socks.get(t).filter(|e| !e.closing)
                        && let Some(c) = e.stream.as_deref()
                    {
                        let mut ev = EpollEvent::new(interest(c), u64::from(t.0));
                        if let Err(err) = self.epoll.modify(e.sock.as_fd(), &mut ev) {
                            tracing::debug!(error = %err, "epoll modify failed");
                        }
                    }
                }
                IoOp::Close(t) => {
                    if let Some(fd) = worker.socks.fd(t) {
                        let _ = self.epoll.delete(fd);
                    }
                    worker.socks.release(t);
                }
            }
        }
        Ok(())
    }

    /// Sends what the connections marked dirty have queued; a connection whose socket is
    /// full waits for EPOLLOUT, one that drained stops waiting for it.
    fn flush_streams(&mut self, worker: &mut Worker) {
        worker.take_dirty(&mut self.dirty);
        for i in 0..self.dirty.len() {
            let t = self.dirty[i];
            let done = match worker.flush_stream(t) {
                Ok(done) => done,
                Err(reason) => {
                    worker.close_stream(t, reason);
                    continue;
                }
            };
            if done {
                // A half-closed connection whose answers are all sent closes here.
                worker.settle_stream(t);
            }
            let Some(e) = worker.socks.get_mut(t) else {
                continue;
            };
            let Some(c) = e.stream.as_deref_mut() else {
                continue;
            };
            if e.closing {
                continue;
            }
            if c.want_write == done {
                c.want_write = !done;
                let mut ev = EpollEvent::new(interest(c), u64::from(t.0));
                if let Err(err) = self.epoll.modify(e.sock.as_fd(), &mut ev) {
                    tracing::debug!(error = %err, "epoll modify failed");
                }
            }
        }
    }

    /// One recvmmsg on `t` and the sends it causes; returns the datagrams received.
    fn recv_batch(&mut self, worker: &mut Worker, t: Token) -> usize {
        let base = self.bufs.as_mut_ptr();
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec {
                // In bounds: slot i spans [i * SLOT, (i + 1) * SLOT) of `bufs`.
                iov_base: base.wrapping_add(i * SLOT + HEADROOM).cast(),
                iov_len: RECV_CAP,
            };
            let h = &mut self.hdrs[i];
            h.msg_len = 0;
            h.msg_hdr = sys::empty_msghdr();
            h.msg_hdr.msg_name = self.names[i].0.as_mut_ptr().cast();
            h.msg_hdr.msg_namelen = NAME_LEN as libc::socklen_t;
            h.msg_hdr.msg_iov = &raw mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
        }
        let Some(fd) = worker.socks.fd(t) else {
            return 0;
        };
        // SAFETY: every header points at its own name and iovec in `self`, and each
        // iovec at its own slot of `self.bufs`; all outlive the call.
        let n = match unsafe { sys::recvmmsg(fd, &mut self.hdrs) } {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(worker = worker.id, error = %e, "recvmmsg failed");
                return 0;
            }
        };
        for i in 0..n {
            let h = &self.hdrs[i];
            let len = h.msg_len as usize;
            let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let namelen = (h.msg_hdr.msg_namelen as usize).min(NAME_LEN);
            let Some(src) = sys::parse_name(&self.names[i].0[..namelen]) else {
                bump(&worker.ctr.malformed, 1);
                continue;
            };
            let slot = &mut self.bufs[i * SLOT..(i + 1) * SLOT];
            let rx = Received {
                token: t,
                src,
                buf: slot,
                len,
                truncated,
                slot: i as u32,
            };
            worker.on_datagram(rx, &mut self.outs);
        }
        self.flush(worker);
        n
    }

    /// Sends every output of the batch: grouped by socket, one sendmmsg per socket and
    /// up to [`BATCH`] messages, equal-size runs to one destination merged with GSO.
    fn flush(&mut self, worker: &mut Worker) {
        self.outs.sort_unstable_by_key(|o| (o.from, o.seq));
        let mut i = 0;
        while i < self.outs.len() {
            let from = self.outs[i].from;
            let end = i + self.outs[i..].iter().take_while(|o| o.from == from).count();
            self.send_run(worker, from, i, end);
            i = end;
        }
        self.outs.clear();
    }

    fn send_run(&mut self, worker: &mut Worker, from: Token, start: usize, end: usize) {
        let base = self.bufs.as_ptr();
        let mut i = start;
        while i < end {
            let Some(entry) = worker.socks.get(from) else {
                bump(&worker.ctr.send_error, (end - i) as u64);
                return;
            };
            let gso = entry.gso;
            let mut nmsg = 0;
            let mut j = i;
            while j < end && nmsg < BATCH {
                let g = group_end(&self.outs, j, end, gso);
                for k in j..g {
                    let o = &self.outs[k];
                    self.s_iovs[k] = libc::iovec {
                        // In bounds: the engine's ranges lie within slot `o.slot`.
                        iov_base: base.wrapping_add(o.slot as usize * SLOT + o.start as usize)
                            as *mut _,
                        iov_len: o.len as usize,
                    };
                }
                let o = self.outs[j];
                let h = &mut self.s_hdrs[nmsg];
                h.msg_len = 0;
                h.msg_hdr = sys::empty_msghdr();
                let namelen = sys::write_name(&o.to, &mut self.s_names[nmsg]);
                h.msg_hdr.msg_name = self.s_names[nmsg].0.as_mut_ptr().cast();
                h.msg_hdr.msg_namelen = namelen;
                h.msg_hdr.msg_iov = &raw mut self.s_iovs[j];
                h.msg_hdr.msg_iovlen = g - j;
                if g - j > 1 {
                    let clen = self.s_cmsgs[nmsg].set(o.len as u16);
                    h.msg_hdr.msg_control = self.s_cmsgs[nmsg].0.as_mut_ptr().cast();
                    h.msg_hdr.msg_controllen = clen;
                }
                self.s_groups[nmsg] = (j, g);
                nmsg += 1;
                j = g;
            }
            // SAFETY: each header points at its own name, control message and iovecs in
            // `self`, and the iovecs at bytes of `self.bufs`; all outlive the call.
            let r = unsafe { sys::sendmmsg(entry.sock.as_fd(), &mut self.s_hdrs[..nmsg]) };
            match r {
                Ok(sent) => {
                    let sent = sent.clamp(1, nmsg);
                    for &(a, b) in &self.s_groups[..sent] {
                        if b - a > 1 {
                            bump(&worker.ctr.gso_sends, 1);
                        }
                    }
                    i = self.s_groups[sent - 1].1;
                }
                Err(e) => {
                    let (a, b) = self.s_groups[0];
                    if gso_refused(worker, from, b - a, &e) {
                        continue;
                    }
                    if e.kind() == io::ErrorKind::WouldBlock {
                        bump(&worker.ctr.send_error, (end - i) as u64);
                        return;
                    }
                    bump(&worker.ctr.send_error, (b - a) as u64);
                    i = b;
                }
            }
        }
    }
}
