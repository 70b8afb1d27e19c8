//! What both backends do the same way around their sends and start: grouping a batch's
//! transmits into UDP GSO sends, giving up GSO on a socket whose kernel or device
//! refuses it, and reporting readiness to [`crate::DataPlane::start`].

use std::io;
use std::sync::mpsc;

use crate::core::Token;
use crate::core::Transmit;
use crate::io::worker::Worker;

/// Most GSO segments in one send (the kernel's UDP_MAX_SEGMENTS is 64 on older kernels).
pub(crate) const MAX_SEGS: usize = 64;
/// Most bytes in one GSO send (a UDP datagram's payload limit, with margin).
pub(crate) const GSO_MAX_BYTES: usize = 63 * 1024;

/// The end of the group of transmits starting at `i` (before `end`) that one send can
/// carry: with `gso`, consecutive datagrams of the same size from the same socket to the
/// same destination.
pub(crate) fn group_end(outs: &[Transmit], i: usize, end: usize, gso: bool) -> usize {
    let Some(first) = outs.get(i) else {
        return end;
    };
    let mut j = i + 1;
    if gso && first.len > 0 {
        let len = first.len as usize;
        while j < end
            && j - i < MAX_SEGS
            && (j - i + 1) * len <= GSO_MAX_BYTES
            && outs
                .get(j)
                .is_some_and(|o| o.from == first.from && o.to == first.to && o.len == first.len)
        {
            j += 1;
        }
    }
    j
}

/// A send of `segments` datagrams from `from` failed with `e`: if that was a GSO send
/// the kernel or device refuses (EIO, EINVAL), GSO is turned off for the socket and
/// `true` returned, and the caller re-sends the group one datagram at a time.
pub(crate) fn gso_refused(
    worker: &mut Worker,
    from: Token,
    segments: usize,
    e: &io::Error,
) -> bool {
    if segments < 2 || !matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL)) {
        return false;
    }
    let Some(entry) = worker.socks.get_mut(from) else {
        return false;
    };
    entry.gso = false;
    tracing::info!(worker = worker.id, error = %e, "UDP GSO refused: disabled on this socket");
    true
}

/// Sends a backend's start outcome to the thread waiting in `DataPlane::start`, and
/// returns it.
pub(crate) fn report_ready<T>(
    ready: &mpsc::SyncSender<io::Result<()>>,
    r: io::Result<T>,
) -> io::Result<T> {
    let _ = ready.send(match &r {
        Ok(_) => Ok(()),
        // io::Error is not Clone: the waiting thread gets its kind and message.
        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
    });
    r
}
