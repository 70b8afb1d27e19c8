//! The io_uring backend: a multishot `RecvMsgMulti` per socket over one provided buffer
//! ring, a `SendMsg` per outgoing datagram (or GSO group), and one `io_uring_enter` per
//! loop turn that both submits and waits.
//!
//! Buffer lifecycle (monoio's rule: a buffer handed to the kernel lives until its
//! completion arrives):
//! - every receive buffer is a [`SLOT`] of one page-aligned region registered as a
//!   provided buffer ring; the kernel owns it from the moment it is in the ring until a
//!   receive completion names it;
//! - a buffer whose datagram produced a send stays out of the ring until that send's
//!   completion (`refs`), then goes back; others go back at once;
//! - send headers, iovecs, addresses and control messages live in a fixed arena of
//!   [`SendSlot`]s, each reserved from submission to completion;
//! - sockets are closed only after their multishot receive has ended (cancelled) and
//!   after the next submission, so no queued entry names a closed or reused descriptor;
//! - at shutdown everything is cancelled and drained before the memory is freed; if the
//!   drain does not finish, the memory is leaked rather than freed under the kernel.

use std::alloc::Layout;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, Fd, SubmitArgs, Timespec};
use io_uring::{IoUring, Probe, cqueue, opcode, squeue};
use nix::sys::eventfd::EventFd;

use crate::core::Token;
use crate::core::counters::bump;
use crate::core::{HEADROOM, Received, SLOT, TAILROOM, Transmit};
use crate::io::batch::{MAX_SEGS, group_end, gso_refused, report_ready};
use crate::io::slab::Kind;
use crate::io::sys::{self, GsoCmsg, NAME_LEN, RawName};
use crate::io::worker::{IoOp, Worker, unix_millis};

/// Provided receive buffers per worker (a power of two). With DEFER_TASKRUN one enter
/// completes at most ~33 receives per socket, and sends give their buffers back at the
/// next turn, so this covers a burst on a few dozen busy sockets.
const NBUF: u16 = 1024;
/// The provided buffer group.
const BGID: u16 = 0;
/// Sends in flight per worker.
const SEND_SLOTS: usize = 1024;
const SQ_ENTRIES: u32 = 1024;
const CQ_ENTRIES: u32 = 16384;
/// Completions handled before their sends are flushed.
const CQE_BATCH: usize = 64;
/// How long shutdown waits for the kernel to give everything back.
const DRAIN: Duration = Duration::from_secs(2);

/// `struct io_uring_recvmsg_out`: what a multishot recvmsg writes before the name.
const RECVMSG_OUT: usize = 16;
// The payload must land exactly at HEADROOM: header, then the fixed-size name field.
const _: () = assert!(RECVMSG_OUT + NAME_LEN == HEADROOM);

const KIND_RECV: u64 = 1;
const KIND_SEND: u64 = 2;
const KIND_WAKE: u64 = 3;
const KIND_CANCEL: u64 = 4;
/// A `Send` of a client connection's queued bytes.
const KIND_STREAM_SEND: u64 = 5;

fn user_data(kind: u64, gen_: u32, idx: u32) -> u64 {
    (kind << 56) | ((u64::from(gen_) & 0xFF_FFFF) << 32) | u64::from(idx)
}

fn split_user_data(ud: u64) -> (u64, u32, u32) {
    (ud >> 56, ((ud >> 32) & 0xFF_FFFF) as u32, ud as u32)
}

/// Zeroed, page-aligned memory the kernel may read and write.
struct PageMem {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl PageMem {
    fn new(size: usize) -> io::Result<PageMem> {
        let layout = Layout::from_size_align(size.max(4096), 4096)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // Fault every page in now. The buffer ring hands its buffers out in turn, so any
        // traffic touches all of them within NBUF datagrams: resident from the start,
        // they are the worker's fixed working set, and a burst or a flood does not show
        // as growth (issue #25 N4 measured them as up to 8 MiB of it).
        for off in (0..layout.size()).step_by(4096) {
            // SAFETY: `off` is below the size of the allocation just made, which is
            // writable and not yet shared with the kernel.
            unsafe { raw.add(off).write_volatile(0) };
        }
        Ok(PageMem { ptr, layout })
    }

    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for PageMem {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// The provided buffer ring and the buffers it hands out.
struct BufRing {
    ring: PageMem,
    bufs: PageMem,
    tail: u16,
}

impl BufRing {
    fn new() -> io::Result<BufRing> {
        let mut r = BufRing {
            ring: PageMem::new(usize::from(NBUF) * std::mem::size_of::<BufRingEntry>())?,
            bufs: PageMem::new(usize::from(NBUF) * SLOT)?,
            tail: 0,
        };
        for bid in 0..NBUF {
            r.push(bid);
        }
        r.publish();
        Ok(r)
    }

    /// Queues buffer `bid` for the kernel (visible at the next [`BufRing::publish`]).
    fn push(&mut self, bid: u16) {
        let idx = usize::from(self.tail & (NBUF - 1));
        let base = self.ring.as_ptr().cast::<BufRingEntry>();
        let addr = self.bufs.as_ptr() as u64 + u64::from(bid) * SLOT as u64;
        // SAFETY: `idx < NBUF` entries fit the ring allocation; the entry at the tail
        // is not the kernel's until the tail moves past it, and the setters write only
        // its addr, len and bid fields (entry 0's `resv` is the shared tail).
        let e = unsafe { &mut *base.add(idx) };
        e.set_addr(addr);
        e.set_len((SLOT - TAILROOM) as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the pushed buffers visible to the kernel.
    fn publish(&self) {
        // SAFETY: the ring is a page-aligned allocation of initialized entries, so
        // `BufRingEntry::tail` of its base is entry 0's `resv`, the shared tail, a
        // 2-aligned u16; the kernel reads it concurrently, hence atomic.
        let tail = unsafe {
            &*BufRingEntry::tail(self.ring.as_ptr().cast::<BufRingEntry>()).cast::<AtomicU16>()
        };
        tail.store(self.tail, Ordering::Release);
    }

    /// Buffer `bid` as a whole slot.
    ///
    /// # Safety
    ///
    /// The kernel must have handed `bid` back (a completion named it) and no other
    /// reference to it may be live.
    unsafe fn slot(&mut self, bid: u16) -> &mut [u8] {
        // SAFETY: `bid < NBUF` slots fit the allocation; the caller guarantees the
        // kernel is not writing this slot and nothing else refers to it.
        unsafe {
            std::slice::from_raw_parts_mut(self.bufs.as_ptr().add(usize::from(bid) * SLOT), SLOT)
        }
    }
}

/// Everything one `SendMsg` points at, reserved until its completion.
#[repr(C)]
struct SendSlot {
    hdr: libc::msghdr,
    name: RawName,
    cmsg: GsoCmsg,
    iovs: [libc::iovec; MAX_SEGS],
    bids: [u16; MAX_SEGS],
    nseg: usize,
    from: Token,
    from_gen: u32,
}

impl SendSlot {
    fn new() -> SendSlot {
        SendSlot {
            hdr: sys::empty_msghdr(),
            name: RawName::default(),
            cmsg: GsoCmsg::default(),
            iovs: [sys::empty_iovec(); MAX_SEGS],
            bids: [0; MAX_SEGS],
            nseg: 0,
            from: Token(0),
            from_gen: 0,
        }
    }
}

/// The receive state of one socket token.
#[derive(Debug, Clone, Copy, Default)]
struct RecvState {
    gen_: u32,
    armed: bool,
    closing: bool,
    /// A connection's `Send` is in flight (its queue's buffer is the kernel's).
    sending: bool,
    /// A listener paused after failed accepts: not re-armed until registered again.
    paused: bool,
}

struct Uring {
    ring: IoUring,
    bufs: BufRing,
    refs: Vec<u16>,
    recycled: bool,
    slots: Box<[SendSlot]>,
    free_slots: Vec<usize>,
    recv_hdr: Box<libc::msghdr>,
    recv: Vec<RecvState>,
    rearm: Vec<Token>,
    release: Vec<Token>,
    outs: Vec<Transmit>,
    dirty: Vec<Token>,
    cqes: Vec<(u64, i32, u32)>,
    wake_fd: RawFd,
    wake_armed: bool,
    in_flight_sends: usize,
}

fn build_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(CQ_ENTRIES)
        .build(SQ_ENTRIES)
}

/// Whether this kernel offers what the backend needs: a ring with DEFER_TASKRUN, the
/// opcodes, extended enter arguments (a wait timeout), provided buffer rings, and
/// multishot recvmsg (implied by RECVSEND_BUNDLE, Linux 6.10).
///
/// The probe ring lives on a thread of its own: tearing down a DEFER_TASKRUN ring may
/// post task work to the thread that created it, which interrupts that thread's next
/// blocking socket call with EINTR; the caller's thread must not be that one.
pub(crate) fn probe() -> io::Result<()> {
    std::thread::Builder::new()
        .name("turnpike-uring-probe".into())
        .spawn(probe_here)?
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("io_uring probe panicked")))
}

fn probe_here() -> io::Result<()> {
    let ring = build_ring()?;
    let mut p = Probe::new();
    ring.submitter().register_probe(&mut p)?;
    for (name, code) in [
        ("RecvMsg", opcode::RecvMsgMulti::CODE),
        ("SendMsg", opcode::SendMsg::CODE),
        ("PollAdd", opcode::PollAdd::CODE),
        ("Accept", opcode::AcceptMulti::CODE),
        ("Recv", opcode::RecvMulti::CODE),
        ("Send", opcode::Send::CODE),
        ("AsyncCancel", opcode::AsyncCancel::CODE),
    ] {
        if !p.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("no {name} opcode"),
            ));
        }
    }
    let params = ring.params();
    if !params.is_feature_ext_arg() || !params.is_feature_recvsend_bundle() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "kernel lacks EXT_ARG or multishot recvmsg (need Linux 6.10+)",
        ));
    }
    let mem = PageMem::new(4096)?;
    // SAFETY: `mem` is page-aligned, large enough for 8 entries, and outlives the
    // registration (unregistered just below; the ring is dropped before `mem`).
    unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(mem.as_ptr() as u64, 8, BGID, 0)?;
    }
    ring.submitter().unregister_buf_ring(BGID)?;
    drop(ring);
    drop(mem);
    Ok(())
}

/// Runs a worker on io_uring until it is told to stop.
pub(crate) fn run(
    mut worker: Worker,
    wake: Arc<EventFd>,
    ready: mpsc::SyncSender<io::Result<()>>,
) -> io::Result<()> {
    let started = Uring::new(&wake).map(|mut u| {
        u.apply_io_ops(&mut worker);
        u
    });
    let mut u = report_ready(&ready, started)?;
    let r = u.serve(&mut worker);
    u.quiesce(&mut worker);
    worker.close_all();
    u.apply_io_ops(&mut worker);
    let drained = u.drain(&mut worker);
    if drained {
        let _ = u.ring.submitter().unregister_buf_ring(BGID);
        drop(u);
    } else {
        tracing::warn!(
            worker = worker.id,
            "io_uring did not drain at shutdown: leaking its buffers"
        );
        std::mem::forget(u);
    }
    r
}

impl Uring {
    fn new(wake: &EventFd) -> io::Result<Uring> {
        let ring = build_ring()?;
        let bufs = BufRing::new()?;
        // SAFETY: the ring memory is page-aligned, holds NBUF entries and lives in
        // `self.bufs` until after the ring is dropped or unregistered (see `run`).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                bufs.ring.as_ptr() as u64,
                NBUF,
                BGID,
                0,
            )?;
        }
        let mut recv_hdr = Box::new(sys::empty_msghdr());
        recv_hdr.msg_namelen = NAME_LEN as libc::socklen_t;
        let mut u = Uring {
            ring,
            bufs,
            refs: vec![0; usize::from(NBUF)],
            recycled: false,
            slots: (0..SEND_SLOTS).map(|_| SendSlot::new()).collect(),
            free_slots: (0..SEND_SLOTS).rev().collect(),
            recv_hdr,
            recv: Vec::new(),
            rearm: Vec::new(),
            release: Vec::new(),
            outs: Vec::with_capacity(CQE_BATCH),
            dirty: Vec::new(),
            cqes: Vec::with_capacity(CQE_BATCH),
            wake_fd: wake.as_raw_fd(),
            wake_armed: false,
            in_flight_sends: 0,
        };
        u.arm_wake();
        Ok(u)
    }

    fn push(&mut self, e: squeue::Entry) {
        loop {
            // SAFETY: every entry points only at memory that outlives its completion:
            // the receive header (boxed in `self`), buffers of the registered ring,
            // reserved send slots, or nothing (poll, cancel).
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return;
            }
            // Full: hand what is queued to the kernel to make room.
            if let Err(err) = self.ring.submit() {
                tracing::warn!(error = %err, "io_uring submit failed");
                return;
            }
        }
    }

    fn arm_wake(&mut self) {
        let e = opcode::PollAdd::new(Fd(self.wake_fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(user_data(KIND_WAKE, 0, 0));
        self.push(e);
        self.wake_armed = true;
    }

    fn arm_recv(&mut self, worker: &Worker, t: Token) {
        let Some(fd) = worker.socks.fd(t).map(|f| f.as_raw_fd()) else {
            return;
        };
        let Some(st) = self.recv.get_mut(t.0 as usize) else {
            return;
        };
        st.armed = true;
        let ud = user_data(KIND_RECV, st.gen_, t.0);
        let e = match worker.socks.kind(t) {
            Some(Kind::Listener(_)) => opcode::AcceptMulti::new(Fd(fd))
                .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
                .build(),
            // Stream bytes land at the start of a provided buffer.
            Some(Kind::Stream) => opcode::RecvMulti::new(Fd(fd), BGID).build(),
            _ => opcode::RecvMsgMulti::new(Fd(fd), &raw const *self.recv_hdr, BGID).build(),
        };
        self.push(e.user_data(ud));
    }

    /// Starts a `Send` for every connection with bytes queued and none in flight.
    fn flush_streams(&mut self, worker: &mut Worker) {
        worker.take_dirty(&mut self.dirty);
        for i in 0..self.dirty.len() {
            let t = self.dirty[i];
            let Some(st) = self.recv.get(t.0 as usize).copied() else {
                continue;
            };
            if st.sending || st.closing {
                // Its completion marks it dirty again if more is queued.
                continue;
            }
            let Some((fd, ptr, len)) = worker.stream_send_start(t) else {
                // Nothing left to send: a half-closed connection may close (no Send is
                // in flight, so its socket can go).
                worker.settle_stream(t);
                continue;
            };
            if let Some(st) = self.recv.get_mut(t.0 as usize) {
                st.sending = true;
            }
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            // SAFETY (for `push`): `ptr..ptr+len` is the connection's in-flight send
            // buffer, which its queue neither moves nor changes until `stream_sent`, and
            // the socket (and the connection with it) is released only after this
            // completion (`sending`).
            let e = opcode::Send::new(Fd(fd), ptr, len)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(user_data(KIND_STREAM_SEND, st.gen_, t.0));
            self.push(e);
        }
    }

    fn complete_stream_send(&mut self, worker: &mut Worker, t: Token, gen_: u32, res: i32) {
        let Some(st) = self.recv.get_mut(t.0 as usize) else {
            return;
        };
        if st.gen_ != gen_ {
            return;
        }
        st.sending = false;
        if st.closing {
            if !st.armed {
                self.release.push(t);
            }
            return;
        }
        worker.stream_sent(t, res);
    }

    fn apply_io_ops(&mut self, worker: &mut Worker) {
        if worker.io_ops.is_empty() {
            // Most turns: keep the queue's capacity rather than take and free it.
            return;
        }
        for op in std::mem::take(&mut worker.io_ops) {
            match op {
                IoOp::Register(t) => {
                    let i = t.0 as usize;
                    if self.recv.len() <= i {
                        self.recv.resize(i + 1, RecvState::default());
                    }
                    let st = &mut self.recv[i];
                    if st.armed && st.paused {
                        // A resumed listener whose accept was never cancelled.
                        st.paused = false;
                        continue;
                    }
                    st.gen_ = st.gen_.wrapping_add(1) & 0xFF_FFFF;
                    st.closing = false;
                    st.paused = false;
                    st.sending = false;
                    self.arm_recv(worker, t);
                }
                IoOp::Pause(t) => {
                    if let Some(st) = self.recv.get_mut(t.0 as usize) {
                        st.paused = true;
                        // Stop now, not at the next completion: what the receive (or
                        // accept) already took in is still handled, as it is not
                        // closing.
                        if st.armed && !st.closing {
                            let e = opcode::AsyncCancel::new(user_data(KIND_RECV, st.gen_, t.0))
                                .build()
                                .user_data(user_data(KIND_CANCEL, 0, 0));
                            self.push(e);
                        }
                    }
                }
                // A FIN ended the connection's multishot receive, which is not armed
                // again; after a TLS close_notify it stays armed and what it brings is
                // ignored, so that a reset is still seen.
                IoOp::StopReading(_) => {}
                IoOp::Close(t) => {
                    let Some(st) = self.recv.get_mut(t.0 as usize) else {
                        self.release.push(t);
                        continue;
                    };
                    st.closing = true;
                    let (armed, sending, gen_) = (st.armed, st.sending, st.gen_);
                    if armed {
                        let target = user_data(KIND_RECV, gen_, t.0);
                        let e = opcode::AsyncCancel::new(target)
                            .build()
                            .user_data(user_data(KIND_CANCEL, 0, 0));
                        self.push(e);
                    }
                    if sending {
                        // A send to a client that stopped reading may never finish.
                        let target = user_data(KIND_STREAM_SEND, gen_, t.0);
                        let e = opcode::AsyncCancel::new(target)
                            .build()
                            .user_data(user_data(KIND_CANCEL, 0, 0));
                        self.push(e);
                    }
                    if !armed && !sending {
                        self.release.push(t);
                    }
                }
            }
        }
    }

    fn serve(&mut self, worker: &mut Worker) -> io::Result<()> {
        loop {
            let wait_ms = worker
                .poll_timeout()
                .0
                .saturating_sub(unix_millis().0)
                .clamp(1, 1000);
            let ts = Timespec::from(Duration::from_millis(wait_ms));
            let args = SubmitArgs::new().timespec(&ts);
            // Sockets waiting to be closed need only this enter to pass, not a wait.
            let want = usize::from(self.release.is_empty());
            match self.ring.submitter().submit_with_args(want, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                    ) => {}
                Err(e) => return Err(e),
            }
            // Everything queued before this enter is now the kernel's: descriptors of
            // closed sockets may go.
            for t in self.release.drain(..) {
                worker.socks.release(t);
            }
            worker.now = unix_millis();
            self.reap(worker);
            if worker.handle_commands() {
                return Ok(());
            }
            worker.handle_timeout();
            self.flush_streams(worker);
            self.apply_io_ops(worker);
            let mut i = 0;
            while let Some(&t) = self.rearm.get(i) {
                if self
                    .recv
                    .get(t.0 as usize)
                    .is_some_and(|s| !s.closing && !s.armed && !s.paused)
                {
                    self.arm_recv(worker, t);
                }
                i += 1;
            }
            self.rearm.clear();
            if !self.wake_armed {
                self.arm_wake();
            }
        }
    }

    /// Handles every completion, flushing the sends they cause every [`CQE_BATCH`].
    fn reap(&mut self, worker: &mut Worker) {
        loop {
            self.cqes.clear();
            {
                let mut cq = self.ring.completion();
                cq.sync();
                for c in cq.by_ref().take(CQE_BATCH) {
                    self.cqes.push((c.user_data(), c.result(), c.flags()));
                }
            }
            if self.cqes.is_empty() {
                break;
            }
            let cqes = std::mem::take(&mut self.cqes);
            for &(ud, res, flags) in &cqes {
                self.complete(worker, ud, res, flags);
            }
            self.cqes = cqes;
            self.flush(worker);
            self.flush_streams(worker);
        }
        if self.recycled {
            self.bufs.publish();
            self.recycled = false;
        }
    }

    fn recycle(&mut self, bid: u16) {
        self.bufs.push(bid);
        self.recycled = true;
    }

    fn unref(&mut self, bid: u16) {
        if let Some(r) = self.refs.get_mut(usize::from(bid)) {
            *r = r.saturating_sub(1);
            if *r == 0 {
                self.recycle(bid);
            }
        }
    }

    fn complete(&mut self, worker: &mut Worker, ud: u64, res: i32, flags: u32) {
        let (kind, gen_, idx) = split_user_data(ud);
        match kind {
            KIND_RECV => self.complete_recv(worker, Token(idx), gen_, res, flags),
            KIND_SEND => self.complete_send(worker, idx as usize, res),
            KIND_STREAM_SEND => self.complete_stream_send(worker, Token(idx), gen_, res),
            KIND_WAKE => {
                let mut v = [0u8; 8];
                // SAFETY: reads 8 bytes into an 8-byte buffer from our eventfd
                // (non-blocking); only resets its counter.
                let _ = unsafe { libc::read(self.wake_fd, v.as_mut_ptr().cast(), 8) };
                if !cqueue::more(flags) {
                    self.wake_armed = false;
                }
            }
            _ => {}
        }
    }

    fn complete_recv(&mut self, worker: &mut Worker, t: Token, gen_: u32, res: i32, flags: u32) {
        match worker.socks.kind(t) {
            Some(Kind::Listener(_)) => return self.complete_accept(worker, t, gen_, res, flags),
            Some(Kind::Stream) => return self.complete_stream_recv(worker, t, gen_, res, flags),
            _ => {}
        }
        let st = self.recv.get(t.0 as usize).copied().unwrap_or_default();
        let current = st.gen_ == gen_;
        if let Some(bid) = cqueue::buffer_select(flags) {
            if res > 0 && current && !st.closing {
                self.deliver(worker, t, bid, res as usize);
            } else {
                self.recycle(bid);
            }
        }
        if !cqueue::more(flags) && current {
            if let Some(s) = self.recv.get_mut(t.0 as usize) {
                s.armed = false;
            }
            if st.closing {
                self.release.push(t);
            } else {
                if res < 0 && res != -libc::ENOBUFS {
                    tracing::debug!(worker = worker.id, error = %io::Error::from_raw_os_error(-res), "multishot recvmsg ended");
                }
                self.rearm.push(t);
            }
        }
    }

    /// A multishot accept on listener `t` completed: `res` is a new connection's
    /// descriptor, or an error.
    fn complete_accept(&mut self, worker: &mut Worker, t: Token, gen_: u32, res: i32, flags: u32) {
        let st = self.recv.get(t.0 as usize).copied().unwrap_or_default();
        let current = st.gen_ == gen_;
        if res >= 0 {
            // SAFETY: a successful accept completion hands us a new descriptor that
            // nothing else owns.
            let sock = unsafe { <socket2::Socket as std::os::fd::FromRawFd>::from_raw_fd(res) };
            if current && !st.closing {
                match sock.peer_addr().ok().and_then(|a| a.as_socket()) {
                    Some(peer) => worker.on_accept(t, sock, peer),
                    None => bump(&worker.ctr.streams.accept_errors, 1),
                }
            }
        }
        if !cqueue::more(flags) && current {
            if let Some(s) = self.recv.get_mut(t.0 as usize) {
                s.armed = false;
            }
            if st.closing {
                self.release.push(t);
                return;
            }
            // An accept cancelled by a pause (`IoOp::Pause`) is no failure.
            let cancelled = st.paused && res == -libc::ECANCELED;
            let paused = res < 0
                && !cancelled
                && worker.accept_failed(t, &io::Error::from_raw_os_error(-res));
            if !paused {
                self.rearm.push(t);
            }
        }
    }

    /// Bytes of connection `t` in buffer `bid` (at its start), its end of stream
    /// (`res` 0), or an error.
    fn complete_stream_recv(
        &mut self,
        worker: &mut Worker,
        t: Token,
        gen_: u32,
        res: i32,
        flags: u32,
    ) {
        let st = self.recv.get(t.0 as usize).copied().unwrap_or_default();
        let current = st.gen_ == gen_;
        if let Some(bid) = cqueue::buffer_select(flags) {
            if res > 0 && current && !st.closing {
                // SAFETY: the completion just handed `bid` back; nothing else refers
                // to it until it is recycled below.
                let slot = unsafe { self.bufs.slot(bid) };
                worker.on_stream_data(t, slot.get(..res as usize).unwrap_or_default());
            }
            self.recycle(bid);
        }
        if !cqueue::more(flags) && current {
            if let Some(s) = self.recv.get_mut(t.0 as usize) {
                s.armed = false;
            }
            if st.closing {
                if !st.sending {
                    self.release.push(t);
                }
            } else if res == 0 {
                worker.stream_eof(t, false);
            } else if res < 0 && res != -libc::ENOBUFS {
                worker.stream_eof(t, true);
            } else {
                self.rearm.push(t);
            }
        }
    }

    /// A datagram in buffer `bid`: `[recvmsg_out][name][payload]`, payload at HEADROOM.
    fn deliver(&mut self, worker: &mut Worker, t: Token, bid: u16, written: usize) {
        // SAFETY: the completion just handed `bid` back; nothing else refers to it.
        let slot = unsafe { self.bufs.slot(bid) };
        let word = |at: usize| {
            slot.get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_ne_bytes) as usize
        };
        let (namelen, payloadlen, mflags) = (word(0), word(8), word(12));
        let truncated = mflags & libc::MSG_TRUNC as usize != 0 || HEADROOM + payloadlen > written;
        let src = sys::parse_name(&slot[RECVMSG_OUT..RECVMSG_OUT + namelen.min(NAME_LEN)]);
        let Some(src) = src else {
            bump(&worker.ctr.malformed, 1);
            self.recycle(bid);
            return;
        };
        let before = self.outs.len();
        let rx = Received {
            token: t,
            src,
            buf: slot,
            len: payloadlen,
            truncated,
            slot: u32::from(bid),
        };
        worker.on_datagram(rx, &mut self.outs);
        if self.outs.len() > before {
            self.refs[usize::from(bid)] += 1;
        } else {
            self.recycle(bid);
        }
    }

    /// Turns the batch's outputs into SendMsg entries, GSO groups merged.
    fn flush(&mut self, worker: &mut Worker) {
        if self.outs.is_empty() {
            return;
        }
        let mut outs = std::mem::take(&mut self.outs);
        outs.sort_unstable_by_key(|o| (o.from, o.seq));
        let mut i = 0;
        while i < outs.len() {
            let gso = worker.socks.get(outs[i].from).map(|e| e.gso);
            let g = group_end(&outs, i, outs.len(), gso.unwrap_or(false));
            self.send(worker, &outs[i..g]);
            i = g;
        }
        outs.clear();
        self.outs = outs;
    }

    /// Submits one SendMsg for a group of outputs from one socket to one destination.
    fn send(&mut self, worker: &mut Worker, group: &[Transmit]) {
        let Some(first) = group.first() else {
            return;
        };
        let fd = worker
            .socks
            .get(first.from)
            .filter(|e| !e.closing)
            .map(|e| e.sock.as_raw_fd());
        let (Some(fd), Some(idx)) = (fd, self.free_slots.pop()) else {
            bump(&worker.ctr.send_error, group.len() as u64);
            for o in group {
                self.unref(o.slot as u16);
            }
            return;
        };
        let base = self.bufs.bufs.as_ptr();
        let from_gen = self.recv.get(first.from.0 as usize).map_or(0, |s| s.gen_);
        let s = &mut self.slots[idx];
        for (k, o) in group.iter().enumerate() {
            s.iovs[k] = libc::iovec {
                // In bounds: the engine's ranges lie within slot `o.slot`.
                iov_base: base
                    .wrapping_add(o.slot as usize * SLOT + o.start as usize)
                    .cast(),
                iov_len: o.len as usize,
            };
            s.bids[k] = o.slot as u16;
        }
        s.nseg = group.len();
        s.from = first.from;
        s.from_gen = from_gen;
        s.hdr = sys::empty_msghdr();
        let namelen = sys::write_name(&first.to, &mut s.name);
        s.hdr.msg_name = s.name.0.as_mut_ptr().cast();
        s.hdr.msg_namelen = namelen;
        s.hdr.msg_iov = s.iovs.as_mut_ptr();
        s.hdr.msg_iovlen = group.len();
        if group.len() > 1 {
            let clen = s.cmsg.set(first.len as u16);
            s.hdr.msg_control = s.cmsg.0.as_mut_ptr().cast();
            s.hdr.msg_controllen = clen;
        }
        let e = opcode::SendMsg::new(Fd(fd), &raw const s.hdr)
            .build()
            .user_data(user_data(KIND_SEND, 0, idx as u32));
        self.in_flight_sends += 1;
        self.push(e);
    }

    fn complete_send(&mut self, worker: &mut Worker, idx: usize, res: i32) {
        let Some(s) = self.slots.get(idx) else {
            return;
        };
        self.in_flight_sends = self.in_flight_sends.saturating_sub(1);
        let (nseg, from, from_gen) = (s.nseg, s.from, s.from_gen);
        let mut bids = [0u16; MAX_SEGS];
        bids[..nseg].copy_from_slice(&s.bids[..nseg]);
        let seg_len = s.iovs[0].iov_len as u32;
        let to = sys::parse_name(&s.name.0);
        self.free_slots.push(idx);
        if res >= 0 {
            if nseg > 1 {
                bump(&worker.ctr.gso_sends, 1);
            }
        } else if self
            .recv
            .get(from.0 as usize)
            .is_some_and(|st| st.gen_ == from_gen)
            && let Some(to) = to
            && gso_refused(worker, from, nseg, &io::Error::from_raw_os_error(-res))
        {
            // This group goes out one datagram at a time from the same buffers.
            let base = self.bufs.bufs.as_ptr() as usize;
            let iovs: Vec<(u16, u32)> = (0..nseg)
                .map(|k| {
                    let at = self.slots[idx].iovs[k].iov_base as usize - base;
                    (bids[k], (at % SLOT) as u32)
                })
                .collect();
            for (k, (bid, start)) in iovs.into_iter().enumerate() {
                let o = Transmit {
                    from,
                    to,
                    slot: u32::from(bid),
                    start,
                    len: seg_len,
                    seq: k as u32,
                };
                self.send(worker, &[o]);
            }
            return;
        } else {
            bump(&worker.ctr.send_error, nseg as u64);
        }
        for &bid in &bids[..nseg] {
            self.unref(bid);
        }
    }

    /// Stops receiving on every UDP socket before they close, relaying what the
    /// receives already took in: the kernel may have written datagrams into the buffer
    /// ring that no completion has reported yet, and after an upgrade (`SIGUSR2`) the
    /// new process shares these sockets: a datagram this one took must still go out.
    // A wall-clock bound on shutdown, not forwarding time.
    #[allow(clippy::disallowed_methods)]
    fn quiesce(&mut self, worker: &mut Worker) {
        let deadline = Instant::now() + DRAIN;
        let udp: Vec<Token> = worker
            .socks
            .tokens()
            .filter(|t| worker.socks.kind(*t) == Some(Kind::Udp))
            .collect();
        for &t in &udp {
            let Some(st) = self.recv.get_mut(t.0 as usize) else {
                continue;
            };
            st.paused = true;
            if st.armed && !st.closing {
                let e = opcode::AsyncCancel::new(user_data(KIND_RECV, st.gen_, t.0))
                    .build()
                    .user_data(user_data(KIND_CANCEL, 0, 0));
                self.push(e);
            }
        }
        loop {
            let armed = udp
                .iter()
                .any(|t| self.recv.get(t.0 as usize).is_some_and(|s| s.armed));
            if !armed || Instant::now() >= deadline {
                break;
            }
            if !self.settle(worker) {
                break;
            }
        }
    }

    /// At shutdown: submits, waits up to 50 ms for a completion and handles what
    /// completed, without re-arming; `false` when the ring failed.
    fn settle(&mut self, worker: &mut Worker) -> bool {
        let ts = Timespec::from(Duration::from_millis(50));
        let args = SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(_) => return false,
        }
        self.reap(worker);
        self.rearm.clear();
        true
    }

    /// Waits until every receive has ended and every send completed; `true` if so.
    // A wall-clock bound on shutdown, not forwarding time.
    #[allow(clippy::disallowed_methods)]
    fn drain(&mut self, worker: &mut Worker) -> bool {
        let deadline = Instant::now() + DRAIN;
        // The eventfd poll too.
        let e = opcode::AsyncCancel::new(user_data(KIND_WAKE, 0, 0))
            .build()
            .user_data(user_data(KIND_CANCEL, 0, 0));
        self.push(e);
        loop {
            let armed = self.recv.iter().any(|s| s.armed || s.sending);
            if !armed && self.in_flight_sends == 0 && !self.wake_armed {
                break;
            }
            if Instant::now() >= deadline {
                return false;
            }
            // No re-arming while draining.
            if !self.settle(worker) {
                return false;
            }
        }
        for t in self.release.drain(..) {
            worker.socks.release(t);
        }
        true
    }
}
