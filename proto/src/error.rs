//! Codec errors. All are `Copy` values: decoding never panics and never allocates.

use crate::attr::AttrType;

/// Why bytes from the wire are not an acceptable message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the header or a length field announces.
    #[error("truncated message")]
    Truncated,
    /// The top two bits of a STUN message are not zero.
    #[error("not a STUN message")]
    NotStun,
    /// Neither STUN nor ChannelData (stream framing).
    #[error("neither STUN nor ChannelData")]
    NotTurn,
    /// The magic cookie is not 0x2112A442.
    #[error("bad magic cookie")]
    BadMagicCookie,
    /// The STUN length is not a multiple of four.
    #[error("message length not a multiple of 4")]
    UnalignedLength,
    /// An attribute runs past the end of the message.
    #[error("attribute overruns the message")]
    AttributeOverrun,
    /// More attributes than [`crate::stun::MAX_ATTRIBUTES`].
    #[error("too many attributes")]
    TooManyAttributes,
    /// Something follows FINGERPRINT, which must be last.
    #[error("attribute after FINGERPRINT")]
    AfterFingerprint,
    /// An attribute's value is malformed for its type.
    #[error("malformed attribute {:#06x}", .0.0)]
    BadAttribute(AttrType),
    /// Integrity was to be checked but the attribute is absent.
    #[error("no MESSAGE-INTEGRITY")]
    MissingIntegrity,
    /// MESSAGE-INTEGRITY(-SHA256) does not match.
    #[error("integrity check failed")]
    IntegrityMismatch,
    /// FINGERPRINT does not match.
    #[error("fingerprint check failed")]
    FingerprintMismatch,
    /// A ChannelData channel number outside 0x4000..=0x4FFF.
    #[error("channel number out of range")]
    BadChannelNumber,
    /// A ChannelData length field that disagrees with the datagram.
    #[error("ChannelData length disagrees with the datagram")]
    ChannelLengthMismatch,
}

/// Why a message could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The caller's buffer is too small.
    #[error("buffer too small")]
    BufferTooSmall,
    /// A value longer than 65535 bytes.
    #[error("attribute value too long")]
    ValueTooLong,
    /// The message would exceed 65535 bytes of attributes.
    #[error("message too long")]
    MessageTooLong,
    /// An attribute added after MESSAGE-INTEGRITY or FINGERPRINT.
    #[error("attribute after integrity or fingerprint")]
    AfterIntegrity,
    /// A channel number outside 0x4000..=0x4FFF.
    #[error("channel number out of range")]
    BadChannelNumber,
}
