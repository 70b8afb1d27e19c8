//! The agent's state for one attachment, without I/O: the table version with its gap
//! check, the Hello and its snapshot parts, and the batching of punted requests.
//!
//! The control plane numbers its batches one by one. A batch is applied only if it is
//! the next one; a repeat (at or below what is applied) is acknowledged again and
//! ignored; a batch beyond the next one means one was lost: it is ignored and the
//! control plane is asked to send again what followed ([`Up::Resync`]), at most once a
//! second while nothing moves. So batches apply in order, exactly once.

use std::collections::VecDeque;

use turnpike_plane::{AllocationSnapshot, Datagram, Hello, Millis, Punted, Snapshot, Up};

/// Allocations per snapshot message: a large table goes as a Hello and several
/// [`Up::Snapshot`] messages, each far below the control plane's message size cap.
pub const TABLE_CHUNK: usize = 2000;

/// Most punted requests in one message up.
pub const PUNT_BATCH: usize = 64;

/// Answers held at most while a lost batch is awaited; beyond, they are dropped (and
/// counted): their clients retransmit.
pub const HELD_MAX: usize = 4096;

/// How long a gap may stay before the control plane is asked again.
const RESYNC_AGAIN_MS: u64 = 1_000;

/// What to do with a received batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The next one: apply it, then acknowledge its version.
    Apply,
    /// Seen before: acknowledge what is applied (the message says it) and drop it.
    Repeat(Up),
    /// One was lost before it: drop it; send the message, if any (a request to send
    /// again what followed the last applied batch).
    Gap(Option<Up>),
}

/// The table version of one attachment.
#[derive(Debug, Clone)]
pub struct Session {
    applied: u64,
    /// Answers waiting for the batch they follow: (after, datagrams).
    held: VecDeque<(u64, Vec<Datagram>)>,
    held_count: usize,
    held_dropped: u64,
    /// The last Resync: what was applied then, and when it was asked.
    asked: Option<(u64, Millis)>,
    gaps: u64,
}

impl Session {
    /// A session whose table is at `applied` (the version its Hello reports).
    pub fn new(applied: u64) -> Session {
        Session {
            applied,
            held: VecDeque::new(),
            held_count: 0,
            held_dropped: 0,
            asked: None,
            gaps: 0,
        }
    }

    /// The last version applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Gaps seen (lost batches detected).
    pub fn gaps(&self) -> u64 {
        self.gaps
    }

    /// Judges a batch numbered `version`, received at `now`.
    pub fn on_batch(&mut self, version: u64, now: Millis) -> Verdict {
        if version == self.applied + 1 {
            return Verdict::Apply;
        }
        if version <= self.applied {
            return Verdict::Repeat(Up::TableAck {
                version: self.applied,
            });
        }
        let ask = match self.asked {
            Some((at, when)) => at != self.applied || now.0 >= when.0 + RESYNC_AGAIN_MS,
            None => true,
        };
        if !ask {
            return Verdict::Gap(None);
        }
        self.gaps += 1;
        self.asked = Some((self.applied, now));
        Verdict::Gap(Some(Up::Resync {
            applied: self.applied,
        }))
    }

    /// The batch `version` judged [`Verdict::Apply`] is applied: the acknowledgement.
    /// Answers it releases are in [`Session::release`].
    pub fn applied_now(&mut self, version: u64) -> Up {
        self.applied = version;
        Up::TableAck { version }
    }

    /// Answers that follow batch `after`: returned to send now if it is applied, else
    /// held until it is (see [`Session::release`]).
    pub fn answers(&mut self, after: u64, datagrams: Vec<Datagram>) -> Vec<Datagram> {
        if after <= self.applied {
            return datagrams;
        }
        if self.held_count + datagrams.len() > HELD_MAX {
            self.held_dropped += datagrams.len() as u64;
            return Vec::new();
        }
        self.held_count += datagrams.len();
        self.held.push_back((after, datagrams));
        Vec::new()
    }

    /// The held answers whose batch is now applied, in order.
    pub fn release(&mut self) -> Vec<Datagram> {
        let mut out = Vec::new();
        while let Some((after, _)) = self.held.front() {
            if *after > self.applied {
                break;
            }
            if let Some((_, d)) = self.held.pop_front() {
                self.held_count -= d.len();
                out.extend(d);
            }
        }
        out
    }

    /// Answers dropped because too many were held.
    pub fn held_dropped(&self) -> u64 {
        self.held_dropped
    }
}

/// The messages that open an attachment: the Hello with the first part of the table,
/// then the rest in parts of [`TABLE_CHUNK`], back to back.
pub fn opening(mut hello: Hello, version: u64, mut table: Vec<AllocationSnapshot>) -> Vec<Up> {
    let mut parts = Vec::new();
    while table.len() > TABLE_CHUNK {
        let rest = table.split_off(TABLE_CHUNK);
        parts.push(std::mem::replace(&mut table, rest));
    }
    parts.push(table);
    let n = parts.len();
    let mut out = Vec::with_capacity(n);
    for (i, allocations) in parts.into_iter().enumerate() {
        let part = Snapshot {
            version,
            allocations,
            complete: i + 1 == n,
        };
        if i == 0 {
            hello.table = Some(part);
        } else {
            out.push(Up::Snapshot(part));
        }
    }
    out.insert(0, Up::Hello(hello));
    out
}

/// Gathers punted requests into messages of at most [`PUNT_BATCH`].
#[derive(Debug, Default)]
pub struct PuntBatch {
    batch: Vec<Punted>,
}

impl PuntBatch {
    /// Adds one; returns a full batch to send.
    pub fn push(&mut self, p: Punted) -> Option<Vec<Punted>> {
        self.batch.push(p);
        (self.batch.len() >= PUNT_BATCH).then(|| std::mem::take(&mut self.batch))
    }

    /// What is gathered, if anything.
    pub fn take(&mut self) -> Option<Vec<Punted>> {
        (!self.batch.is_empty()).then(|| std::mem::take(&mut self.batch))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn batches_apply_in_order_once_and_a_gap_asks_once_a_second() {
        let mut s = Session::new(4);
        assert_eq!(s.on_batch(5, Millis(0)), Verdict::Apply);
        assert_eq!(s.applied_now(5), Up::TableAck { version: 5 });
        // A repeat is acknowledged, not applied.
        assert_eq!(
            s.on_batch(5, Millis(1)),
            Verdict::Repeat(Up::TableAck { version: 5 })
        );
        // 6 was lost: 7 and 8 are not applied; one request, then quiet for a second.
        assert_eq!(
            s.on_batch(7, Millis(10)),
            Verdict::Gap(Some(Up::Resync { applied: 5 }))
        );
        assert_eq!(s.on_batch(8, Millis(20)), Verdict::Gap(None));
        assert_eq!(
            s.on_batch(8, Millis(1_010)),
            Verdict::Gap(Some(Up::Resync { applied: 5 }))
        );
        // Sent again in order: they apply.
        for v in 6..=8 {
            assert_eq!(s.on_batch(v, Millis(1_100)), Verdict::Apply);
            s.applied_now(v);
        }
        assert_eq!(s.applied(), 8);
        assert_eq!(s.gaps(), 2);
    }

    #[test]
    fn a_large_table_opens_as_a_hello_and_parts() {
        let hello = Hello {
            id: "dp".into(),
            listening: vec![],
            relay_ips: vec![],
            workers: 1,
            version: "0".into(),
            table: None,
            started: 0,
        };
        let row = AllocationSnapshot {
            id: turnpike_plane::AllocationId(1),
            worker: 0,
            tuple: turnpike_plane::FiveTuple::udp(
                "192.0.2.1:1".parse().unwrap(),
                "192.0.2.2:2".parse().unwrap(),
            ),
            relays: vec![],
            deadline: Millis(1),
            bandwidth: 0,
            user: String::new(),
            username: String::new(),
            dont_fragment: false,
            permissions: vec![],
            channels: vec![],
            usage: Default::default(),
        };
        let msgs = opening(hello.clone(), 9, vec![row; 2 * TABLE_CHUNK + 1]);
        assert_eq!(msgs.len(), 3);
        let Up::Hello(h) = &msgs[0] else {
            panic!("not a Hello first")
        };
        let t = h.table.as_ref().unwrap();
        assert_eq!(
            (t.version, t.allocations.len(), t.complete),
            (9, TABLE_CHUNK, false)
        );
        let Up::Snapshot(last) = &msgs[2] else {
            panic!("not a snapshot part")
        };
        assert_eq!((last.allocations.len(), last.complete), (1, true));
        // An empty table still says its version, complete.
        let msgs = opening(hello, 3, vec![]);
        let Up::Hello(h) = &msgs[0] else {
            panic!("not a Hello")
        };
        assert_eq!(
            h.table.as_ref().map(|t| (t.version, t.complete)),
            Some((3, true))
        );
    }
}
