//! ChannelData frames (RFC 8656 §12.4) and stream framing (§12.5, RFC 8489 §6.2.2).

use crate::attr::{CHANNEL_MAX, CHANNEL_MAX_LEGACY, CHANNEL_MIN};
use crate::error::{DecodeError, EncodeError};
use crate::stun::{HEADER_LEN, MAGIC_COOKIE, be16, be32, padded};

/// Size of the ChannelData header (channel number and length).
pub const CHANNEL_HEADER_LEN: usize = 4;

/// A ChannelData frame borrowing its payload from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelData<'a> {
    /// The channel number, 0x4000..=0x4FFF.
    pub channel: u16,
    /// The application data.
    pub payload: &'a [u8],
}

impl<'a> ChannelData<'a> {
    /// Parses a ChannelData datagram received over UDP. The length field is honoured: the
    /// datagram must hold at least that many bytes, and at most the padding to a multiple
    /// of four after them (padding is optional over UDP); anything else is an error and the
    /// frame is dropped.
    pub fn parse(buf: &'a [u8]) -> Result<ChannelData<'a>, DecodeError> {
        Self::parse_up_to(buf, CHANNEL_MAX)
    }

    /// As [`ChannelData::parse`], accepting channel numbers up to `max`: [`CHANNEL_MAX`]
    /// (RFC 8656) or [`CHANNEL_MAX_LEGACY`] (RFC 5766) for servers that opt in.
    pub fn parse_up_to(buf: &'a [u8], max: u16) -> Result<ChannelData<'a>, DecodeError> {
        let channel = be16(buf, 0).ok_or(DecodeError::Truncated)?;
        if !(CHANNEL_MIN..=max.min(CHANNEL_MAX_LEGACY)).contains(&channel) {
            return Err(DecodeError::BadChannelNumber);
        }
        let len = usize::from(be16(buf, 2).ok_or(DecodeError::Truncated)?);
        let end = CHANNEL_HEADER_LEN + len;
        if buf.len() < end {
            return Err(DecodeError::Truncated);
        }
        if buf.len() > padded(end) {
            return Err(DecodeError::ChannelLengthMismatch);
        }
        let payload = buf
            .get(CHANNEL_HEADER_LEN..end)
            .ok_or(DecodeError::Truncated)?;
        Ok(ChannelData { channel, payload })
    }

    /// Writes the 4-byte header for `channel` and a payload of `len` bytes.
    /// Channel numbers up to [`CHANNEL_MAX_LEGACY`] are accepted: a server only writes
    /// numbers it has bound, and binds legacy ones only when configured to.
    pub fn header(channel: u16, len: usize) -> Result<[u8; CHANNEL_HEADER_LEN], EncodeError> {
        if !(CHANNEL_MIN..=CHANNEL_MAX_LEGACY).contains(&channel) {
            return Err(EncodeError::BadChannelNumber);
        }
        let len = u16::try_from(len).map_err(|_| EncodeError::ValueTooLong)?;
        let c = channel.to_be_bytes();
        let l = len.to_be_bytes();
        Ok([c[0], c[1], l[0], l[1]])
    }

    /// Writes a whole frame into `out`; with `pad` (stream transports) zero padding to a
    /// multiple of four follows. Returns the bytes written.
    pub fn encode(&self, out: &mut [u8], pad: bool) -> Result<usize, EncodeError> {
        if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&self.channel) {
            return Err(EncodeError::BadChannelNumber);
        }
        let header = Self::header(self.channel, self.payload.len())?;
        let end = CHANNEL_HEADER_LEN + self.payload.len();
        let total = if pad { padded(end) } else { end };
        let out = out.get_mut(..total).ok_or(EncodeError::BufferTooSmall)?;
        out[..CHANNEL_HEADER_LEN].copy_from_slice(&header);
        out[CHANNEL_HEADER_LEN..end].copy_from_slice(self.payload);
        out[end..].fill(0);
        Ok(total)
    }
}

/// What a stream (TCP/TLS) framer sees at the front of its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A complete frame of this many bytes (ChannelData counted with its padding).
    Complete(usize),
    /// Not enough bytes yet: at least this many are needed in all.
    Incomplete(usize),
}

/// Cuts the next STUN message or ChannelData frame from a byte stream. An error means
/// the stream is not TURN and should be closed.
pub fn next_frame(buf: &[u8]) -> Result<Frame, DecodeError> {
    let Some(&b0) = buf.first() else {
        return Ok(Frame::Incomplete(CHANNEL_HEADER_LEN));
    };
    match b0 {
        0x00..=0x3F => {
            let Some(len) = be16(buf, 2) else {
                return Ok(Frame::Incomplete(HEADER_LEN));
            };
            if len % 4 != 0 {
                return Err(DecodeError::UnalignedLength);
            }
            match be32(buf, 4) {
                Some(MAGIC_COOKIE) => {}
                Some(_) => return Err(DecodeError::BadMagicCookie),
                None => return Ok(Frame::Incomplete(HEADER_LEN)),
            }
            let total = HEADER_LEN + usize::from(len);
            Ok(if buf.len() >= total {
                Frame::Complete(total)
            } else {
                Frame::Incomplete(total)
            })
        }
        0x40..=0x4F => {
            let Some(len) = be16(buf, 2) else {
                return Ok(Frame::Incomplete(CHANNEL_HEADER_LEN));
            };
            let total = padded(CHANNEL_HEADER_LEN + usize::from(len));
            Ok(if buf.len() >= total {
                Frame::Complete(total)
            } else {
                Frame::Incomplete(total)
            })
        }
        _ => Err(DecodeError::NotTurn),
    }
}
