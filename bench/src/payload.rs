//! The application payload the generator relays: a 24-byte header (magic, flow,
//! sequence number, send timestamp) followed by filler, so that the receiver can count
//! loss and measure one-way latency on the generator's own clock.

/// Bytes of header at the start of every payload.
pub const HEADER: usize = 24;
/// Smallest payload that carries the header.
pub const MIN_PAYLOAD: usize = HEADER;
const MAGIC: [u8; 4] = *b"TPKB";

/// A fresh payload of `len` bytes for `flow` (seq and time written per packet).
pub fn template(len: usize, flow: u32) -> Vec<u8> {
    let mut v = vec![0xA5u8; len.max(MIN_PAYLOAD)];
    v[..4].copy_from_slice(&MAGIC);
    v[4..8].copy_from_slice(&flow.to_le_bytes());
    v
}

/// Writes the sequence number and timestamp into a payload made by [`template`].
#[inline]
pub fn stamp(p: &mut [u8], seq: u64, ts_ns: u64) {
    if let Some(h) = p.get_mut(8..HEADER) {
        h[..8].copy_from_slice(&seq.to_le_bytes());
        h[8..].copy_from_slice(&ts_ns.to_le_bytes());
    }
}

/// What a received payload says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub flow: u32,
    pub seq: u64,
    pub ts_ns: u64,
}

/// Reads a payload's header (None if it is not one of ours).
#[inline]
pub fn read(p: &[u8]) -> Option<Stamp> {
    let h = p.get(..HEADER)?;
    if h[..4] != MAGIC {
        return None;
    }
    let u32_at = |i: usize| {
        h.get(i..i + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |i: usize| {
        h.get(i..i + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    Some(Stamp {
        flow: u32_at(4)?,
        seq: u64_at(8)?,
        ts_ns: u64_at(16)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut p = template(100, 7);
        stamp(&mut p, 42, 123_456);
        assert_eq!(
            read(&p),
            Some(Stamp {
                flow: 7,
                seq: 42,
                ts_ns: 123_456
            })
        );
        assert_eq!(read(&p[..10]), None);
        p[0] = 0;
        assert_eq!(read(&p), None);
    }
}
