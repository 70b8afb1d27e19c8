//! Sans-IO pieces of TURN over TCP and TLS (RFC 8656 §3.1, RFC 8489 §6.2): a [`Framer`]
//! that cuts the received byte stream into STUN messages and ChannelData frames, a
//! [`SendQueue`] that holds a connection's outgoing bytes in bounded memory, and a
//! [`HalfClose`] that decides when a connection whose client stopped sending may close.
//!
//! None reads a socket or a clock: the caller feeds the framer what it received, drains
//! the queue into its own sends (a synchronous `send()` or an io_uring `Send`), and
//! passes the time in.

/// Bytes every frame starts with that tell its type and length.
const HEADER: usize = 4;
/// The fixed STUN header (RFC 8489 §5).
const STUN_HEADER: usize = 20;

/// Why a stream cannot be framed any more. The connection must be closed: nothing says
/// where the next message starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    /// A message starts with a byte that is neither STUN (0x00..=0x03) nor ChannelData
    /// (0x40..=0x4F, or 0x40..=0x7F with the legacy channel numbers) (RFC 7983).
    #[error("neither STUN nor ChannelData: first byte {0:#04x}")]
    BadFirstByte(u8),
    /// A STUN message length that is not a multiple of 4 (RFC 8489 §5).
    #[error("STUN message length {0} not a multiple of 4")]
    StunLengthNotAligned(u16),
}

/// What one [`Framer::feed`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct FeedStats {
    /// Frames delivered.
    pub(crate) frames: usize,
    /// Frames longer than the framer's maximum whose header arrived in this feed; their
    /// bytes are skipped, in this feed and the next ones, and never delivered.
    pub(crate) oversize: usize,
}

/// The two kinds of message a TURN stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Stun,
    ChannelData,
}

/// How the first byte of a message classifies it (RFC 7983, RFC 8656 §12).
fn kind(first: u8, legacy: bool) -> Result<Kind, FrameError> {
    match first {
        0x00..=0x03 => Ok(Kind::Stun),
        0x40..=0x4F => Ok(Kind::ChannelData),
        0x50..=0x7F if legacy => Ok(Kind::ChannelData),
        other => Err(FrameError::BadFirstByte(other)),
    }
}

/// The size of a message as delivered and on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    /// The bytes delivered: the STUN message, or the ChannelData header and data.
    frame: usize,
    /// `frame` plus the ChannelData padding to a multiple of 4 (RFC 8656 §12.5).
    wire: usize,
}

/// The extent of the message whose first 4 bytes are `header`.
fn extent(header: [u8; HEADER], legacy: bool) -> Result<Extent, FrameError> {
    let [first, _, hi, lo] = header;
    let len = u16::from_be_bytes([hi, lo]);
    match kind(first, legacy)? {
        Kind::Stun if len % 4 != 0 => Err(FrameError::StunLengthNotAligned(len)),
        Kind::Stun => {
            let frame = STUN_HEADER + usize::from(len);
            Ok(Extent { frame, wire: frame })
        }
        Kind::ChannelData => {
            let frame = HEADER + usize::from(len);
            Ok(Extent {
                frame,
                wire: frame.next_multiple_of(4),
            })
        }
    }
}

/// `data` cut after at most `n` bytes.
fn split_at_most(data: &[u8], n: usize) -> (&[u8], &[u8]) {
    data.split_at(n.min(data.len()))
}

/// Cuts a TURN byte stream into STUN messages and ChannelData frames.
///
/// Call [`Framer::feed`] with each chunk received, in order; it calls back once per
/// complete frame. Frames that arrive whole in one chunk are handed over as slices of
/// that chunk; only a frame split across chunks is copied, into one buffer of at most
/// `max_frame` bytes allocated the first time it is needed and never grown. A frame
/// longer than `max_frame` is skipped as its bytes arrive (counted in
/// [`FeedStats::oversize`]) and framing goes on with the next message. ChannelData is
/// delivered without its padding. Once a feed fails the stream is lost: every later
/// feed returns the same error.
#[derive(Debug)]
pub(crate) struct Framer {
    max_frame: usize,
    legacy: bool,
    /// A frame whose first bytes arrived and the rest did not. Empty while `skip > 0`.
    buf: Vec<u8>,
    /// Bytes still to drop: padding after a frame, or the rest of an oversize frame.
    skip: usize,
    failed: Option<FrameError>,
}

impl Framer {
    /// A framer delivering frames of at most `max_frame` bytes (ChannelData without its
    /// padding); `legacy` accepts ChannelData with RFC 5766 channel numbers
    /// (first byte 0x50..=0x7F).
    pub(crate) fn new(max_frame: usize, legacy: bool) -> Framer {
        Framer {
            max_frame,
            legacy,
            buf: Vec::new(),
            skip: 0,
            failed: None,
        }
    }

    /// Frames what follows the bytes fed so far, calling `on_frame` for each complete
    /// frame in stream order. On an error the frames before the bad message have been
    /// delivered; the framer keeps the error and returns it from every later feed.
    pub(crate) fn feed(
        &mut self,
        data: &[u8],
        mut on_frame: impl FnMut(&[u8]),
    ) -> Result<FeedStats, FrameError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let mut stats = FeedStats::default();
        match self.run(data, &mut on_frame, &mut stats) {
            Ok(()) => Ok(stats),
            Err(e) => {
                self.failed = Some(e);
                self.buf.clear();
                self.skip = 0;
                Err(e)
            }
        }
    }

    /// Bytes of a partial frame held.
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether the bytes fed so far end at a message boundary (no partial frame held,
    /// no padding or oversize frame still being skipped).
    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        self.buf.is_empty() && self.skip == 0
    }

    fn run(
        &mut self,
        mut data: &[u8],
        on_frame: &mut impl FnMut(&[u8]),
        stats: &mut FeedStats,
    ) -> Result<(), FrameError> {
        loop {
            if self.skip > 0 {
                let (skipped, rest) = split_at_most(data, self.skip);
                self.skip -= skipped.len();
                data = rest;
            }
            if data.is_empty() {
                return Ok(());
            }
            if !self.buf.is_empty() {
                data = self.fill(data, on_frame, stats)?;
                continue;
            }
            // Zero copy: frames wholly in `data` are delivered from it.
            let Some(&header) = data.first_chunk::<HEADER>() else {
                if let Some(&first) = data.first() {
                    kind(first, self.legacy)?;
                }
                self.stash(data);
                return Ok(());
            };
            let extent = extent(header, self.legacy)?;
            if extent.frame > self.max_frame {
                stats.oversize += 1;
                self.skip = extent.wire;
                continue;
            }
            match data.split_at_checked(extent.frame) {
                Some((frame, rest)) => {
                    on_frame(frame);
                    stats.frames += 1;
                    self.skip = extent.wire - extent.frame;
                    data = rest;
                }
                None => {
                    self.stash(data);
                    return Ok(());
                }
            }
        }
    }

    /// Adds the start of `data` to the partial frame in the buffer, delivers it if it is
    /// complete, and returns the rest of `data`.
    fn fill<'d>(
        &mut self,
        data: &'d [u8],
        on_frame: &mut impl FnMut(&[u8]),
        stats: &mut FeedStats,
    ) -> Result<&'d [u8], FrameError> {
        let mut data = data;
        if self.buf.len() < HEADER {
            let (head, rest) = split_at_most(data, HEADER - self.buf.len());
            self.stash(head);
            data = rest;
        }
        let Some(&header) = self.buf.first_chunk::<HEADER>() else {
            // `data` is used up; the first byte was checked when it was stashed.
            return Ok(data);
        };
        let extent = extent(header, self.legacy)?;
        if extent.frame > self.max_frame {
            stats.oversize += 1;
            self.skip = extent.wire - self.buf.len();
            self.buf.clear();
            return Ok(data);
        }
        let (more, rest) = split_at_most(data, extent.frame - self.buf.len());
        self.stash(more);
        if self.buf.len() == extent.frame {
            on_frame(&self.buf);
            stats.frames += 1;
            self.skip = extent.wire - extent.frame;
            self.buf.clear();
        }
        Ok(rest)
    }

    /// Appends to the partial frame. Callers never take the buffer past the header or
    /// the frame's extent, which is at most `max_frame`: the one allocation suffices.
    fn stash(&mut self, bytes: &[u8]) {
        if self.buf.capacity() == 0 && !bytes.is_empty() {
            self.buf.reserve_exact(self.max_frame.max(HEADER));
        }
        self.buf.extend_from_slice(bytes);
    }
}

/// Capacity above which an emptied buffer of a [`SendQueue`] is shrunk.
const SHRINK_ABOVE: usize = 16 * 1024;
/// Capacity a [`SendQueue`] buffer is shrunk to: room for a few full-size frames, so a
/// connection with steady small traffic never reallocates.
const SHRINK_TO: usize = 4 * 1024;

/// A connection's outgoing bytes, bounded: what does not fit is refused (the caller
/// drops it and counts the drop; the newest data is the one dropped, and nothing
/// blocks).
///
/// Bytes are appended to `pending`. [`SendQueue::start`] hands out the next bytes to
/// send and marks a send outstanding; [`SendQueue::complete`] reports how many were
/// written. The bytes handed out live in `inflight`, which is neither moved nor changed
/// until the send completes (an io_uring send reads them asynchronously); appends go to
/// `pending` meanwhile. When `inflight` is fully sent, the next `start` swaps the two
/// buffers, so the steady state allocates nothing.
///
/// Memory: a buffer that empties with a capacity above 16 KiB is shrunk to 4 KiB, so a
/// burst does not leave an idle connection holding up to `cap` bytes twice (10 000 idle
/// connections hold at most 2 × 16 KiB each, usually 2 × 4 KiB). A connection that
/// bursts again regrows, with a few reallocations.
#[derive(Debug)]
pub(crate) struct SendQueue {
    cap: usize,
    pending: Vec<u8>,
    inflight: Vec<u8>,
    /// Bytes of `inflight` already sent.
    offset: usize,
    outstanding: bool,
}

impl SendQueue {
    /// An empty queue holding at most `cap` unsent bytes.
    pub(crate) fn new(cap: usize) -> SendQueue {
        SendQueue {
            cap,
            pending: Vec::new(),
            inflight: Vec::new(),
            offset: 0,
            outstanding: false,
        }
    }

    /// Bytes not yet sent (an outstanding send's bytes count until it completes).
    pub(crate) fn queued(&self) -> usize {
        self.pending.len() + (self.inflight.len() - self.offset)
    }

    /// Whether `n` more bytes fit.
    pub(crate) fn would_fit(&self, n: usize) -> bool {
        self.queued()
            .checked_add(n)
            .is_some_and(|total| total <= self.cap)
    }

    /// Appends `bytes` if they fit; otherwise appends nothing and returns false.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> bool {
        if !self.would_fit(bytes.len()) {
            return false;
        }
        self.pending.extend_from_slice(bytes);
        true
    }

    /// Appends `frame` and zeros up to a multiple of 4 bytes (ChannelData over a stream,
    /// RFC 8656 §12.5) if all of it fits; otherwise appends nothing and returns false.
    pub(crate) fn push_padded(&mut self, frame: &[u8]) -> bool {
        let padded = frame.len().next_multiple_of(4);
        if !self.would_fit(padded) {
            return false;
        }
        self.pending.extend_from_slice(frame);
        self.pending
            .resize(self.pending.len() + (padded - frame.len()), 0);
        true
    }

    /// The bytes to send next, with a send marked outstanding; `None` if a send is
    /// outstanding or nothing is queued. The slice stays where it is, unchanged, until
    /// [`SendQueue::complete`].
    pub(crate) fn start(&mut self) -> Option<&[u8]> {
        if self.outstanding {
            return None;
        }
        if self.offset == self.inflight.len() {
            if self.pending.is_empty() {
                return None;
            }
            // `inflight` is fully sent: it becomes the (cleared) pending buffer.
            self.inflight.clear();
            self.offset = 0;
            std::mem::swap(&mut self.pending, &mut self.inflight);
        }
        self.outstanding = true;
        self.inflight.get(self.offset..)
    }

    /// The outstanding send wrote `sent` bytes (0 when the socket would block); the
    /// rest goes first in the next [`SendQueue::start`].
    pub(crate) fn complete(&mut self, sent: usize) {
        debug_assert!(self.outstanding, "complete without start");
        self.outstanding = false;
        self.offset += sent.min(self.inflight.len() - self.offset);
        if self.offset == self.inflight.len() {
            self.inflight.clear();
            self.offset = 0;
            if self.inflight.capacity() > SHRINK_ABOVE {
                self.inflight.shrink_to(SHRINK_TO);
            }
        }
    }

    /// Whether a send is outstanding.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> bool {
        self.outstanding
    }

    /// Whether nothing is left to send.
    pub(crate) fn is_empty(&self) -> bool {
        self.queued() == 0
    }
}

/// How long a connection whose client stopped sending waits, once its queue is sent,
/// for the control plane to answer the requests it punted (milliseconds). The control
/// plane answers within a round trip or drops a request on purpose (a full punt queue,
/// a rate limit); a few seconds separate the two without holding the connection long.
pub(crate) const ANSWER_WAIT_MS: u64 = 5_000;

/// Whether a connection stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Keep it: the client still sends, or it is owed answers.
    Open,
    /// Close it, for this reason (the log line's words).
    Close(&'static str),
}

/// The end of a connection whose client has stopped sending (TCP FIN read, or a TLS
/// close_notify), while it may still read (RFC 9293 §3.6: a half-closed connection
/// still carries data the other way).
///
/// The client's last requests deserve their answers: a Binding answer is queued while
/// its request is read, but the control plane answers punted requests (Allocate,
/// Refresh, CreatePermission, ChannelBind) later. So the connection stops reading at
/// the end of the stream and closes once its queue is sent and every punted request
/// was answered; bounded twice, since neither the control plane nor the client is
/// trusted to finish: answers are awaited [`ANSWER_WAIT_MS`] at most, and a client
/// that does not take what is queued loses the connection after `linger_ms`.
///
/// Call order: [`HalfClose::punted`] for every request handed to the control plane,
/// [`HalfClose::answered`] for every answer it sends back, [`HalfClose::read_closed`]
/// at the end of the stream, then [`HalfClose::verdict`] whenever the queue may have
/// drained and at least once a second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct HalfClose {
    /// Requests handed to the control plane and not answered yet.
    awaited: u32,
    /// When the end of the client's stream was read (milliseconds), once it was.
    since: Option<u64>,
}

impl HalfClose {
    /// A request went to the control plane; its answer is awaited.
    pub(crate) fn punted(&mut self) {
        self.awaited = self.awaited.saturating_add(1);
    }

    /// The control plane answered a request. An answer nobody counted (to a request
    /// punted before a restart of the count, or a second answer) changes nothing.
    pub(crate) fn answered(&mut self) {
        self.awaited = self.awaited.saturating_sub(1);
    }

    /// The end of the client's stream was read at `now`; `true` the first time.
    pub(crate) fn read_closed(&mut self, now: u64) -> bool {
        if self.since.is_some() {
            return false;
        }
        self.since = Some(now);
        true
    }

    /// Whether the client may still send (no end of stream read yet).
    pub(crate) fn reading(&self) -> bool {
        self.since.is_none()
    }

    /// Whether the connection stays open at `now`; `drained`: nothing is left to send
    /// (queue, TLS records, a send in flight); `linger_ms`: the bound on a client that
    /// does not take what is queued.
    pub(crate) fn verdict(&self, now: u64, drained: bool, linger_ms: u64) -> Verdict {
        let Some(since) = self.since else {
            return Verdict::Open;
        };
        let waited = now.saturating_sub(since);
        if drained && self.awaited == 0 {
            Verdict::Close("closed by the client")
        } else if drained && waited >= ANSWER_WAIT_MS.min(linger_ms) {
            Verdict::Close("closed by the client; control-plane answers not awaited longer")
        } else if waited >= linger_ms {
            Verdict::Close("closed by the client; its answers were not taken in time")
        } else {
            Verdict::Open
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]

    use proptest::prelude::*;

    use super::*;

    const MAX: usize = 4044;

    /// A STUN Binding request with a SOFTWARE attribute of `n` bytes (padded).
    fn stun(n: usize) -> Vec<u8> {
        let attr_len = n.next_multiple_of(4);
        let len = 4 + attr_len;
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
        m.extend_from_slice(&0x2112_A442u32.to_be_bytes());
        m.extend_from_slice(&[7; 12]);
        m.extend_from_slice(&0x8022u16.to_be_bytes());
        m.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
        m.extend((0..n).map(|i| b'a' + (i % 26) as u8));
        m.resize(20 + len, 0);
        m
    }

    /// A ChannelData frame on `channel` with `n` data bytes (unpadded).
    fn cd(channel: u16, n: usize) -> Vec<u8> {
        let mut m = channel.to_be_bytes().to_vec();
        m.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
        m.extend((0..n).map(|i| (i * 7 + 3) as u8));
        m
    }

    /// `frame` as sent over a stream: ChannelData padded to a multiple of 4.
    fn wire(frame: &[u8]) -> Vec<u8> {
        let mut w = frame.to_vec();
        if frame.first().is_some_and(|&b| b & 0xC0 == 0x40) {
            w.resize(frame.len().next_multiple_of(4), 0);
        }
        w
    }

    fn stream(frames: &[Vec<u8>]) -> Vec<u8> {
        frames.iter().flat_map(|f| wire(f)).collect()
    }

    /// Feeds `chunks` in order; returns the frames, total stats, and the first error.
    fn run(f: &mut Framer, chunks: &[&[u8]]) -> (Vec<Vec<u8>>, FeedStats, Option<FrameError>) {
        let mut out = Vec::new();
        let mut total = FeedStats::default();
        for c in chunks {
            match f.feed(c, |fr| out.push(fr.to_vec())) {
                Ok(s) => {
                    total.frames += s.frames;
                    total.oversize += s.oversize;
                }
                Err(e) => return (out, total, Some(e)),
            }
            assert!(f.buffered() <= MAX.max(HEADER));
        }
        (out, total, None)
    }

    fn mixed() -> Vec<Vec<u8>> {
        vec![
            stun(11),
            cd(0x4001, 5),
            cd(0x4FFF, 0),
            stun(0),
            cd(0x4002, 1200),
            cd(0x4003, 3),
            stun(20),
        ]
    }

    #[test]
    fn every_split_point() {
        let frames = mixed();
        let s = stream(&frames);
        for i in 0..=s.len() {
            let mut f = Framer::new(MAX, false);
            let (a, b) = s.split_at(i);
            let (out, stats, err) = run(&mut f, &[a, b]);
            assert_eq!(err, None);
            assert_eq!(out, frames, "split at {i}");
            assert_eq!(stats.frames, frames.len());
            assert!(f.is_idle());
            assert_eq!(f.buffered(), 0);
        }
    }

    #[test]
    fn every_pair_of_split_points() {
        let frames = mixed()[..4].to_vec();
        let s = stream(&frames);
        for i in 0..=s.len() {
            for j in i..=s.len() {
                let mut f = Framer::new(MAX, false);
                let (out, _, err) = run(&mut f, &[&s[..i], &s[i..j], &s[j..]]);
                assert_eq!(err, None);
                assert_eq!(out, frames, "split at {i}, {j}");
            }
        }
    }

    #[test]
    fn fifty_messages_in_one_feed_are_not_copied() {
        let frames: Vec<Vec<u8>> = (0..50)
            .map(|i| {
                if i % 2 == 0 {
                    stun(i)
                } else {
                    cd(0x4000 + i as u16, i)
                }
            })
            .collect();
        let s = stream(&frames);
        let mut f = Framer::new(MAX, false);
        let range = s.as_ptr_range();
        let mut out = Vec::new();
        let stats = f
            .feed(&s, |fr| {
                assert!(range.contains(&fr.as_ptr()), "a copy was delivered");
                out.push(fr.to_vec());
            })
            .unwrap();
        assert_eq!(
            stats,
            FeedStats {
                frames: 50,
                oversize: 0
            }
        );
        assert_eq!(out, frames);
        assert_eq!(f.buffered(), 0);
        // Nothing was buffered, so nothing was allocated.
        assert_eq!(f.buf.capacity(), 0);
    }

    #[test]
    fn only_the_split_frame_is_copied() {
        let frames = [cd(0x4000, 8), cd(0x4001, 100), cd(0x4002, 8)];
        let s = stream(&frames);
        // The second frame is split; the first and third arrive whole.
        let cut = 12 + 50;
        let (a, b) = s.split_at(cut);
        let mut f = Framer::new(MAX, false);
        let mut from_data = 0;
        let mut copies = 0;
        for chunk in [a, b] {
            let range = chunk.as_ptr_range();
            f.feed(chunk, |fr| {
                if range.contains(&fr.as_ptr()) {
                    from_data += 1;
                } else {
                    copies += 1;
                }
            })
            .unwrap();
            if chunk == a {
                assert_eq!(f.buffered(), 50);
            }
        }
        assert_eq!((from_data, copies), (2, 1));
    }

    #[test]
    fn byte_by_byte() {
        let frames = mixed();
        let s = stream(&frames);
        let mut f = Framer::new(MAX, false);
        let chunks: Vec<&[u8]> = s.chunks(1).collect();
        let (out, stats, err) = run(&mut f, &chunks);
        assert_eq!(err, None);
        assert_eq!(out, frames);
        assert_eq!(stats.frames, frames.len());
    }

    #[test]
    fn padding_is_consumed_not_delivered() {
        let mut f = Framer::new(MAX, false);
        let frame = cd(0x4000, 5);
        let w = wire(&frame);
        assert_eq!(w.len(), 12);
        let (out, _, _) = run(&mut f, &[&w[..9]]);
        assert_eq!(out, vec![frame.clone()]);
        // Delivered, but the padding has not all arrived.
        assert!(!f.is_idle());
        assert_eq!(f.buffered(), 0);
        let (out, _, _) = run(&mut f, &[&w[9..11]]);
        assert!(out.is_empty());
        assert!(!f.is_idle());
        let (out, _, _) = run(&mut f, &[&w[11..], &cd(0x4000, 0)]);
        assert_eq!(out, vec![cd(0x4000, 0)]);
        assert!(f.is_idle());
    }

    #[test]
    fn oversize_frame_is_skipped_in_chunks() {
        let big = cd(0x4000, 65535);
        let next = stun(8);
        let mut s = wire(&big);
        s.extend_from_slice(&next);
        for size in [1, 2, 3, 4, 5, 7, 100, 1000, 4044, 4096, 65536, s.len()] {
            let mut f = Framer::new(MAX, false);
            let chunks: Vec<&[u8]> = s.chunks(size).collect();
            let (out, stats, err) = run(&mut f, &chunks);
            assert_eq!(err, None);
            assert_eq!(out, vec![next.clone()], "chunks of {size}");
            assert_eq!(
                stats,
                FeedStats {
                    frames: 1,
                    oversize: 1
                }
            );
            // The buffer held at most the header of the big frame.
            assert!(f.buf.capacity() <= MAX);
            assert!(f.is_idle());
        }
    }

    #[test]
    fn frame_of_exactly_max_is_delivered() {
        let mut f = Framer::new(MAX, false);
        let at = cd(0x4000, MAX - 4);
        let over = cd(0x4000, MAX - 3);
        let s = stream(&[at.clone(), over, at.clone()]);
        let chunks: Vec<&[u8]> = s.chunks(1000).collect();
        let (out, stats, err) = run(&mut f, &chunks);
        assert_eq!(err, None);
        assert_eq!(out, vec![at.clone(), at]);
        assert_eq!(stats.oversize, 1);
        assert!(f.buf.capacity() <= MAX);
    }

    #[test]
    fn oversize_stun_is_skipped() {
        let mut f = Framer::new(64, false);
        let s = stream(&[stun(100), cd(0x4000, 2), stun(41)]);
        let (out, stats, err) = run(&mut f, &[&s[..30], &s[30..]]);
        assert_eq!(err, None);
        assert_eq!(out, vec![cd(0x4000, 2)]);
        assert_eq!(
            stats,
            FeedStats {
                frames: 1,
                oversize: 2
            }
        );
    }

    #[test]
    fn bad_first_byte() {
        for b in [0x04, 0x20, 0x3F, 0x50, 0x7F, 0x80, 0xFF, b'P'] {
            let mut f = Framer::new(MAX, false);
            let (_, _, err) = run(&mut f, &[&[b]]);
            assert_eq!(err, Some(FrameError::BadFirstByte(b)));
        }
        // "GET " reads as ChannelData (channel 0x4745, 0x5420 bytes): not an error,
        // an oversize frame whose bytes are skipped.
        let mut f = Framer::new(MAX, false);
        let stats = f
            .feed(b"GET / HTTP/1.1\r\n", |_| panic!("delivered"))
            .unwrap();
        assert_eq!(stats.oversize, 1);
        assert!(!f.is_idle());
        // Frames before the bad byte were delivered; the error sticks.
        let mut s = stun(4);
        s.push(0xC0);
        let mut f = Framer::new(MAX, false);
        let (out, _, err) = run(&mut f, &[&s[..10], &s[10..]]);
        assert_eq!(out.len(), 1);
        assert_eq!(err, Some(FrameError::BadFirstByte(0xC0)));
        assert_eq!(
            f.feed(&stun(0), |_| panic!("delivered after an error")),
            Err(FrameError::BadFirstByte(0xC0))
        );
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn bad_first_byte_is_reported_before_the_header_is_complete() {
        let mut f = Framer::new(MAX, false);
        let (_, _, err) = run(&mut f, &[&stun(0), &[0x99]]);
        assert_eq!(err, Some(FrameError::BadFirstByte(0x99)));
    }

    #[test]
    fn stun_length_not_aligned() {
        let mut m = stun(0);
        m[3] = 5;
        m.extend_from_slice(&[0; 5]);
        let mut f = Framer::new(MAX, false);
        let (_, _, err) = run(&mut f, &[&m]);
        assert_eq!(err, Some(FrameError::StunLengthNotAligned(5)));
        assert_eq!(
            f.feed(&[], |_| {}),
            Err(FrameError::StunLengthNotAligned(5))
        );
        // The same when the header arrives in pieces.
        let mut f = Framer::new(MAX, false);
        let (_, _, err) = run(&mut f, &[&m[..2], &m[2..3], &m[3..]]);
        assert_eq!(err, Some(FrameError::StunLengthNotAligned(5)));
        assert_eq!(
            FrameError::StunLengthNotAligned(5).to_string(),
            "STUN message length 5 not a multiple of 4"
        );
    }

    #[test]
    fn legacy_channel_numbers() {
        let frames = vec![cd(0x5000, 3), cd(0x7FFF, 0), cd(0x4000, 1)];
        let s = stream(&frames);
        let mut f = Framer::new(MAX, true);
        let (out, _, err) = run(&mut f, &[&s]);
        assert_eq!(err, None);
        assert_eq!(out, frames);
        let mut f = Framer::new(MAX, false);
        let (_, _, err) = run(&mut f, &[&s]);
        assert_eq!(err, Some(FrameError::BadFirstByte(0x50)));
        let mut f = Framer::new(MAX, true);
        let (_, _, err) = run(&mut f, &[&[0x80]]);
        assert_eq!(err, Some(FrameError::BadFirstByte(0x80)));
    }

    #[test]
    fn empty_feed_changes_nothing() {
        let mut f = Framer::new(MAX, false);
        assert_eq!(f.feed(&[], |_| {}), Ok(FeedStats::default()));
        assert!(f.is_idle());
        let s = cd(0x4000, 8);
        let (out, _, _) = run(&mut f, &[&s[..3], &[], &s[3..]]);
        assert_eq!(out, vec![s]);
    }

    /// A message for the property test: STUN, ChannelData, or oversize ChannelData.
    fn message() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            (0usize..300).prop_map(stun),
            (0x4000u16..=0x4FFF, 0usize..300).prop_map(|(c, n)| cd(c, n)),
            (300usize..3000).prop_map(|n| cd(0x4000, n)),
        ]
    }

    proptest! {
        #[test]
        fn any_stream_any_cuts(
            frames in prop::collection::vec(message(), 0..20),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..30),
        ) {
            const SMALL: usize = 256;
            let s = stream(&frames);
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(s.len() + 1)).collect();
            points.sort_unstable();
            let mut f = Framer::new(SMALL, false);
            let mut out = Vec::new();
            let mut oversize = 0;
            let mut start = 0;
            let mut cap = None;
            for end in points.into_iter().chain([s.len()]) {
                let stats = f.feed(&s[start..end], |fr| out.push(fr.to_vec())).unwrap();
                oversize += stats.oversize;
                start = end;
                prop_assert!(f.buffered() <= SMALL);
                if f.buf.capacity() > 0 {
                    // Allocated once, never grown.
                    prop_assert!(*cap.get_or_insert(f.buf.capacity()) == f.buf.capacity());
                    prop_assert!(f.buf.capacity() <= SMALL + 8);
                }
            }
            let expected: Vec<Vec<u8>> = frames.iter().filter(|fr| fr.len() <= SMALL).cloned().collect();
            prop_assert_eq!(oversize, frames.len() - expected.len());
            prop_assert_eq!(out, expected);
            prop_assert!(f.is_idle());
        }
    }

    // SendQueue

    /// Drains `q` with sends of at most `chunk` bytes.
    fn drain(q: &mut SendQueue, chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(b) = q.start() {
            let n = b.len().min(chunk);
            out.extend_from_slice(&b[..n]);
            q.complete(n);
        }
        out
    }

    #[test]
    fn order_kept_across_partial_sends() {
        let mut q = SendQueue::new(1 << 20);
        let mut expected = Vec::new();
        let mut out = Vec::new();
        for i in 0..200u32 {
            let bytes: Vec<u8> = (0..(i % 37)).map(|j| (i + j) as u8).collect();
            assert!(q.push(&bytes));
            expected.extend_from_slice(&bytes);
            // Send a little while pushing, with partial writes.
            if i % 3 == 0
                && let Some(b) = q.start()
            {
                let n = b.len().min(11);
                out.extend_from_slice(&b[..n]);
                q.complete(n);
            }
        }
        out.extend(drain(&mut q, 7));
        assert_eq!(out, expected);
        assert!(q.is_empty());
        assert!(!q.in_flight());
        assert_eq!(q.queued(), 0);
    }

    #[test]
    fn inflight_stays_put_while_pushing() {
        let mut q = SendQueue::new(1 << 16);
        assert!(q.push(b"first"));
        let (ptr, len) = {
            let b = q.start().unwrap();
            (b.as_ptr(), b.len())
        };
        assert_eq!(ptr, q.inflight.as_ptr());
        assert_eq!(len, 5);
        assert!(q.in_flight());
        for _ in 0..1000 {
            assert!(q.push(b"more bytes"));
        }
        // The kernel's view of the in-flight buffer has not moved or changed.
        assert_eq!(q.inflight.as_ptr(), ptr);
        assert_eq!(&q.inflight[..], b"first");
        assert_eq!(q.pending.len(), 10_000);
        // No second send while one is outstanding.
        assert!(q.start().is_none());
        q.complete(2);
        let b = q.start().unwrap();
        assert_eq!(b, b"rst");
        assert_eq!(b.as_ptr(), ptr.wrapping_add(2));
        q.complete(3);
        let b = q.start().unwrap();
        assert_eq!(b.len(), 10_000);
        assert!(b.starts_with(b"more bytes"));
    }

    #[test]
    fn buffers_are_reused() {
        let mut q = SendQueue::new(1 << 16);
        assert!(q.push(&[1; 1000]));
        q.start().unwrap();
        assert!(q.push(&[2; 1000]));
        q.complete(1000);
        let a = q.inflight.as_ptr();
        let b = q.pending.as_ptr();
        for i in 0..10u8 {
            let sent = q.start().unwrap().len();
            assert!(q.push(&[i; 1000]));
            q.complete(sent);
            // The two allocations swap roles and are never replaced.
            let now = [q.inflight.as_ptr(), q.pending.as_ptr()];
            assert!(now == [a, b] || now == [b, a]);
        }
    }

    #[test]
    fn cap_drops_newest() {
        let mut q = SendQueue::new(10);
        assert!(q.push(&[1; 6]));
        assert!(q.would_fit(4));
        assert!(!q.would_fit(5));
        assert!(!q.push(&[2; 5]));
        assert_eq!(q.queued(), 6);
        assert!(q.push(&[3; 4]));
        assert!(!q.push(&[4]));
        assert!(q.push(&[]));
        // In-flight bytes count until they are sent.
        let b = q.start().unwrap();
        assert_eq!(b.len(), 10);
        assert!(!q.push(&[5]));
        q.complete(3);
        assert_eq!(q.queued(), 7);
        assert!(q.push(&[6; 3]));
        assert!(!q.push(&[7]));
        assert_eq!(drain(&mut q, 100), [&[1; 3][..], &[3; 4], &[6; 3]].concat());
        assert!(!q.would_fit(usize::MAX));
    }

    #[test]
    fn padding() {
        let mut q = SendQueue::new(16);
        assert!(q.push_padded(&[9; 5]));
        assert_eq!(q.queued(), 8);
        assert!(q.push_padded(&[8; 4]));
        assert_eq!(q.queued(), 12);
        // 1 byte would fit, its padding would not: nothing is appended.
        assert!(!q.push_padded(&[7; 5]));
        assert_eq!(q.queued(), 12);
        assert!(q.push_padded(&[]));
        assert!(q.push_padded(&[6; 3]));
        assert_eq!(
            drain(&mut q, 5),
            [&[9; 5][..], &[0; 3], &[8; 4], &[6; 3], &[0]].concat()
        );
    }

    #[test]
    fn eagain_then_retry() {
        let mut q = SendQueue::new(100);
        assert!(q.push(b"hello"));
        let ptr = q.start().unwrap().as_ptr();
        q.complete(0);
        assert!(!q.in_flight());
        assert_eq!(q.queued(), 5);
        assert!(q.push(b" world"));
        // The retry sends the same buffer, not the newer bytes.
        let b = q.start().unwrap();
        assert_eq!(b, b"hello");
        assert_eq!(b.as_ptr(), ptr);
        q.complete(5);
        assert_eq!(q.start().unwrap(), b" world");
        q.complete(6);
        assert!(q.is_empty());
        assert!(q.start().is_none());
        assert!(!q.in_flight());
    }

    #[test]
    fn nothing_to_send() {
        let mut q = SendQueue::new(100);
        assert!(q.is_empty());
        assert!(q.start().is_none());
        assert!(!q.in_flight());
    }

    #[test]
    fn big_buffers_shrink_when_emptied() {
        let mut q = SendQueue::new(1 << 20);
        assert!(q.push(&[1; 200_000]));
        let n = q.start().unwrap().len();
        q.complete(n - 1);
        // Not empty yet: kept.
        assert!(q.inflight.capacity() >= 200_000);
        q.start().unwrap();
        q.complete(1);
        assert!(q.inflight.capacity() <= SHRINK_ABOVE);
        // Small buffers are kept as they are.
        assert!(q.push(&[2; 3000]));
        let n = q.start().unwrap().len();
        q.complete(n);
        assert!(q.push(&[3; 3000]));
        let n = q.start().unwrap().len();
        q.complete(n);
        assert!(q.inflight.capacity() >= 3000);
        assert!(q.pending.capacity() >= 3000);
        assert!(q.inflight.capacity() + q.pending.capacity() <= 2 * SHRINK_ABOVE);
    }

    // HalfClose

    const LINGER: u64 = 30_000;

    #[test]
    fn open_until_the_end_of_stream() {
        let mut h = HalfClose::default();
        assert!(h.reading());
        // Nothing pending, but the client still sends.
        assert_eq!(h.verdict(1_000_000, true, LINGER), Verdict::Open);
        h.punted();
        assert_eq!(h.verdict(1_000_000, true, LINGER), Verdict::Open);
        assert!(h.read_closed(100));
        assert!(!h.reading());
        // A second end of stream (a FIN after close_notify) keeps the first time.
        assert!(!h.read_closed(5_000));
        assert_eq!(h.since, Some(100));
    }

    #[test]
    fn closes_once_drained_with_nothing_awaited() {
        let mut h = HalfClose::default();
        h.read_closed(0);
        // A Binding answer still queued.
        assert_eq!(h.verdict(10, false, LINGER), Verdict::Open);
        assert_eq!(
            h.verdict(20, true, LINGER),
            Verdict::Close("closed by the client")
        );
    }

    #[test]
    fn waits_for_punted_answers_then_for_their_sending() {
        let mut h = HalfClose::default();
        h.punted();
        h.punted();
        h.read_closed(1_000);
        assert_eq!(h.verdict(1_001, true, LINGER), Verdict::Open);
        h.answered();
        assert_eq!(h.verdict(1_002, true, LINGER), Verdict::Open);
        h.answered();
        // The last answer is queued, not sent yet.
        assert_eq!(h.verdict(1_003, false, LINGER), Verdict::Open);
        assert_eq!(
            h.verdict(1_004, true, LINGER),
            Verdict::Close("closed by the client")
        );
        // An extra answer does not count below zero.
        h.answered();
        h.punted();
        assert_eq!(h.verdict(1_005, true, LINGER), Verdict::Open);
    }

    #[test]
    fn unanswered_requests_are_awaited_a_few_seconds() {
        let mut h = HalfClose::default();
        h.punted();
        h.read_closed(1_000);
        assert_eq!(
            h.verdict(1_000 + ANSWER_WAIT_MS - 1, true, LINGER),
            Verdict::Open
        );
        assert!(matches!(
            h.verdict(1_000 + ANSWER_WAIT_MS, true, LINGER),
            Verdict::Close(_)
        ));
        // Never beyond the linger bound, if that is shorter.
        assert!(matches!(h.verdict(1_100, true, 100), Verdict::Close(_)));
    }

    #[test]
    fn a_client_that_does_not_read_is_closed_at_the_linger_bound() {
        let mut h = HalfClose::default();
        h.read_closed(1_000);
        // Past the answer wait, but still sending: kept.
        assert_eq!(
            h.verdict(1_000 + ANSWER_WAIT_MS, false, LINGER),
            Verdict::Open
        );
        assert_eq!(h.verdict(1_000 + LINGER - 1, false, LINGER), Verdict::Open);
        assert_eq!(
            h.verdict(1_000 + LINGER, false, LINGER),
            Verdict::Close("closed by the client; its answers were not taken in time")
        );
        h.punted();
        assert!(matches!(
            h.verdict(1_000 + LINGER, false, LINGER),
            Verdict::Close(_)
        ));
        // A clock that goes back does not underflow.
        assert_eq!(h.verdict(0, false, LINGER), Verdict::Open);
    }
}
