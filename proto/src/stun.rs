//! STUN messages (RFC 8489 §5, §14): a borrowed zero-copy parser and a writer into a
//! caller-owned buffer.
//!
//! Parsing borrows the datagram and allocates nothing: [`Message::parse`] validates the
//! framing once and records where each attribute lies in a fixed-size index; typed lookups
//! ([`Message::attr`], [`Message::attrs`]) decode on demand. Building goes through
//! [`MessageWriter`], which writes straight into the caller's buffer and appends the
//! integrity and fingerprint attributes last, as §14 requires.

use crate::attr::{self, AttrType, Attribute};
use crate::auth::{self, IntegrityKey};
use crate::error::{DecodeError, EncodeError};

/// The fixed magic cookie of every RFC 5389/8489 message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Size of the STUN header.
pub const HEADER_LEN: usize = 20;
/// Most attributes one message may carry; a real message has fewer than 20. More is
/// treated as an attack on the parser rather than a message.
pub const MAX_ATTRIBUTES: usize = 40;
/// Most unknown comprehension-required attributes reported back in a 420 response.
pub const MAX_UNKNOWN: usize = 8;

/// A STUN method (the 12 method bits of the message type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Method(pub u16);

impl Method {
    /// Binding (RFC 8489).
    pub const BINDING: Method = Method(0x001);
    /// Allocate (RFC 8656).
    pub const ALLOCATE: Method = Method(0x003);
    /// Refresh (RFC 8656).
    pub const REFRESH: Method = Method(0x004);
    /// Send (indication only, RFC 8656).
    pub const SEND: Method = Method(0x006);
    /// Data (indication only, RFC 8656).
    pub const DATA: Method = Method(0x007);
    /// CreatePermission (RFC 8656).
    pub const CREATE_PERMISSION: Method = Method(0x008);
    /// ChannelBind (RFC 8656).
    pub const CHANNEL_BIND: Method = Method(0x009);
}

/// The class bits of the message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// A request: an answer is expected.
    Request,
    /// An indication: no answer.
    Indication,
    /// A success response.
    Success,
    /// An error response.
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::Success => 0b10,
            Class::Error => 0b11,
        }
    }

    fn from_bits(bits: u16) -> Class {
        match bits & 0b11 {
            0b00 => Class::Request,
            0b01 => Class::Indication,
            0b10 => Class::Success,
            _ => Class::Error,
        }
    }
}

/// Packs method and class into the 14-bit message type (RFC 8489 §5, figure 3).
pub fn message_type(method: Method, class: Class) -> u16 {
    let m = method.0 & 0x0FFF;
    let c = class.bits();
    (m & 0x000F) | ((c & 0b01) << 4) | ((m & 0x0070) << 1) | ((c & 0b10) << 7) | ((m & 0x0F80) << 2)
}

/// Splits a 14-bit message type into method and class.
pub fn split_message_type(t: u16) -> (Method, Class) {
    let method = (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2);
    let class = ((t >> 4) & 0b01) | ((t >> 7) & 0b10);
    (Method(method), Class::from_bits(class))
}

/// The 96-bit transaction id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TransactionId(pub [u8; 12]);

/// Rounds a length up to the 4-byte boundary that STUN attributes and stream framing use.
pub const fn padded(len: usize) -> usize {
    (len + 3) & !3
}

/// Reads a big-endian u16 at `at`, if the bytes are there.
pub(crate) fn be16(buf: &[u8], at: usize) -> Option<u16> {
    let b = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
}

/// Reads a big-endian u32 at `at`, if the bytes are there.
pub(crate) fn be32(buf: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = buf.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_be_bytes(b))
}

/// Cheap check that a datagram looks like STUN: top two bits zero, the magic cookie in
/// place and a length that is a multiple of four and fits. Used by the demultiplexer and
/// the stream framer; [`Message::parse`] does the full validation.
pub fn looks_like_stun(buf: &[u8]) -> bool {
    match (buf.first(), be16(buf, 2), be32(buf, 4)) {
        (Some(b0), Some(len), Some(cookie)) => {
            b0 & 0xC0 == 0 && cookie == MAGIC_COOKIE && len % 4 == 0 && buf.len() >= HEADER_LEN
        }
        _ => false,
    }
}

/// The 128-bit transaction id of a classic RFC 3489 message: bytes 4..20 of the header,
/// whose first four RFC 5389 turned into the magic cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ClassicTransactionId(pub [u8; 16]);

/// A classic RFC 3489 Binding request: a Binding request without the magic cookie, which
/// RFC 5389 §12.2 says a server SHOULD still answer, with MAPPED-ADDRESS and the request's
/// 16-byte transaction id ([`crate::turn::write_classic_binding_response`]).
///
/// Only the header is read. The attributes are not looked at, so RFC 3489's
/// CHANGE-REQUEST and RESPONSE-ADDRESS are not supported: the answer always goes from the
/// address the request reached to the address it came from, and carries neither
/// SOURCE-ADDRESS nor CHANGED-ADDRESS. An RFC 3489 client's NAT-type tests that rely on
/// them are not meaningful against this server; the mapped address is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassicBindingRequest {
    tid: ClassicTransactionId,
}

impl ClassicBindingRequest {
    /// Recognises a classic Binding request that is exactly the datagram `buf`: message
    /// type 0x0001, a length that is a multiple of 4 and accounts for every byte after the
    /// header, and no magic cookie (a message with the cookie is RFC 5389 or later: parse
    /// it with [`Message::parse`]). Anything else, including a classic message of another
    /// type, is `None`.
    pub fn parse(buf: &[u8]) -> Option<ClassicBindingRequest> {
        let typ = be16(buf, 0)?;
        let len = usize::from(be16(buf, 2)?);
        let tid: [u8; 16] = buf.get(4..HEADER_LEN)?.try_into().ok()?;
        let classic = typ == message_type(Method::BINDING, Class::Request)
            && len % 4 == 0
            && HEADER_LEN + len == buf.len()
            && be32(buf, 4) != Some(MAGIC_COOKIE);
        classic.then_some(ClassicBindingRequest {
            tid: ClassicTransactionId(tid),
        })
    }

    /// The 16-byte transaction id the response echoes.
    pub fn transaction_id(&self) -> ClassicTransactionId {
        self.tid
    }
}

/// Where one attribute lies in the message: type, and the value's offset and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct AttrSlot {
    typ: u16,
    value_at: u16,
    value_len: u16,
}

/// A raw attribute: its type and its value bytes (without padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawAttribute<'a> {
    /// The attribute type.
    pub typ: AttrType,
    /// The value, padding excluded.
    pub value: &'a [u8],
}

/// A parsed STUN message borrowing its datagram.
///
/// Attributes after MESSAGE-INTEGRITY are ignored except MESSAGE-INTEGRITY-SHA256 and
/// FINGERPRINT, attributes after MESSAGE-INTEGRITY-SHA256 are ignored except FINGERPRINT,
/// and nothing may follow FINGERPRINT (RFC 8489 §14.5, §14.6, §14.7).
#[derive(Clone)]
pub struct Message<'a> {
    buf: &'a [u8],
    method: Method,
    class: Class,
    tid: TransactionId,
    slots: [AttrSlot; MAX_ATTRIBUTES],
    n_slots: u8,
    integrity: Option<u16>,
    integrity_sha256: Option<u16>,
    fingerprint: Option<u16>,
    unknown: [u16; MAX_UNKNOWN],
    n_unknown: u8,
}

impl std::fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        struct Attrs<'m, 'a>(&'m Message<'a>);
        impl std::fmt::Debug for Attrs<'_, '_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_list()
                    .entries(
                        self.0
                            .raw_attributes()
                            .map(|a| format!("{:#06x}[{}]", a.typ.0, a.value.len())),
                    )
                    .finish()
            }
        }
        f.debug_struct("Message")
            .field("method", &self.method)
            .field("class", &self.class)
            .field("tid", &self.tid)
            .field("len", &self.buf.len())
            .field("attributes", &Attrs(self))
            .finish()
    }
}

impl<'a> Message<'a> {
    /// Parses and validates one STUN message at the start of `buf`. Bytes after the length
    /// the header announces are not part of the message and are ignored (a UDP datagram
    /// holds exactly one message; on a stream the framer cuts it first).
    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Err(DecodeError::Truncated);
        }
        let t = be16(buf, 0).ok_or(DecodeError::Truncated)?;
        if t & 0xC000 != 0 {
            return Err(DecodeError::NotStun);
        }
        if be32(buf, 4) != Some(MAGIC_COOKIE) {
            return Err(DecodeError::BadMagicCookie);
        }
        let len = usize::from(be16(buf, 2).ok_or(DecodeError::Truncated)?);
        if len % 4 != 0 {
            return Err(DecodeError::UnalignedLength);
        }
        let total = HEADER_LEN + len;
        let buf = buf.get(..total).ok_or(DecodeError::Truncated)?;
        let tid: [u8; 12] = buf
            .get(8..20)
            .and_then(|s| s.try_into().ok())
            .ok_or(DecodeError::Truncated)?;
        let (method, class) = split_message_type(t);
        let mut msg = Message {
            buf,
            method,
            class,
            tid: TransactionId(tid),
            slots: [AttrSlot::default(); MAX_ATTRIBUTES],
            n_slots: 0,
            integrity: None,
            integrity_sha256: None,
            fingerprint: None,
            unknown: [0; MAX_UNKNOWN],
            n_unknown: 0,
        };
        msg.index()?;
        Ok(msg)
    }

    fn index(&mut self) -> Result<(), DecodeError> {
        let buf = self.buf;
        let mut at = HEADER_LEN;
        let mut seen = 0usize;
        while at < buf.len() {
            let typ = be16(buf, at).ok_or(DecodeError::Truncated)?;
            let vlen = usize::from(be16(buf, at + 2).ok_or(DecodeError::Truncated)?);
            let value_at = at + 4;
            let next = value_at + padded(vlen);
            if next > buf.len() {
                return Err(DecodeError::AttributeOverrun);
            }
            seen += 1;
            if seen > MAX_ATTRIBUTES {
                return Err(DecodeError::TooManyAttributes);
            }
            if self.fingerprint.is_some() {
                return Err(DecodeError::AfterFingerprint);
            }
            // §14.5/§14.6: what follows the integrity attributes is ignored, except the
            // attributes that may legitimately follow them.
            let ignored = match typ {
                attr::FINGERPRINT => false,
                attr::MESSAGE_INTEGRITY_SHA256 => self.integrity_sha256.is_some(),
                _ => self.integrity.is_some() || self.integrity_sha256.is_some(),
            };
            if !ignored {
                let slot = AttrSlot {
                    typ,
                    // Both fit: the message is at most 20 + 65535 bytes long, and `value_at`
                    // is below that; lengths came from a u16.
                    value_at: u16::try_from(value_at).map_err(|_| DecodeError::AttributeOverrun)?,
                    value_len: vlen as u16,
                };
                match typ {
                    attr::MESSAGE_INTEGRITY => {
                        if vlen != 20 {
                            return Err(DecodeError::BadAttribute(AttrType(typ)));
                        }
                        self.integrity = Some(slot.value_at - 4);
                    }
                    attr::MESSAGE_INTEGRITY_SHA256 => {
                        if !(16..=32).contains(&vlen) || vlen % 4 != 0 {
                            return Err(DecodeError::BadAttribute(AttrType(typ)));
                        }
                        self.integrity_sha256 = Some(slot.value_at - 4);
                    }
                    attr::FINGERPRINT => {
                        if vlen != 4 {
                            return Err(DecodeError::BadAttribute(AttrType(typ)));
                        }
                        self.fingerprint = Some(slot.value_at - 4);
                    }
                    t if t < 0x8000 && !attr::is_known(t) => {
                        let n = usize::from(self.n_unknown);
                        if let Some(u) = self.unknown.get_mut(n) {
                            *u = t;
                            self.n_unknown += 1;
                        }
                    }
                    _ => {}
                }
                let n = usize::from(self.n_slots);
                // `seen <= MAX_ATTRIBUTES` above keeps `n` in range.
                if let Some(s) = self.slots.get_mut(n) {
                    *s = slot;
                    self.n_slots += 1;
                }
            }
            at = next;
        }
        Ok(())
    }

    /// The method.
    pub fn method(&self) -> Method {
        self.method
    }

    /// The class.
    pub fn class(&self) -> Class {
        self.class
    }

    /// The transaction id.
    pub fn transaction_id(&self) -> TransactionId {
        self.tid
    }

    /// The message's bytes (header and attributes, nothing after).
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }

    /// Every attribute that counts (ignored ones left out), in order.
    pub fn raw_attributes(&self) -> impl Iterator<Item = RawAttribute<'a>> + '_ {
        let buf = self.buf;
        self.slots
            .iter()
            .take(usize::from(self.n_slots))
            .filter_map(move |s| {
                let at = usize::from(s.value_at);
                let value = buf.get(at..at + usize::from(s.value_len))?;
                Some(RawAttribute {
                    typ: AttrType(s.typ),
                    value,
                })
            })
    }

    /// The first attribute of type `typ`, raw.
    pub fn raw(&self, typ: AttrType) -> Option<&'a [u8]> {
        self.raw_attributes()
            .find(|a| a.typ == typ)
            .map(|a| a.value)
    }

    /// Whether the message carries an attribute of type `typ`.
    pub fn has(&self, typ: AttrType) -> bool {
        self.raw(typ).is_some()
    }

    /// The first attribute of type `T`, decoded. `Ok(None)` if absent, an error if present
    /// but malformed (the server answers 400).
    pub fn attr<T: Attribute<'a>>(&self) -> Result<Option<T>, DecodeError> {
        match self.raw(T::TYPE) {
            Some(v) => T::decode(v, &self.tid).map(Some),
            None => Ok(None),
        }
    }

    /// Every attribute of type `T` (for repeatable ones such as XOR-PEER-ADDRESS).
    pub fn attrs<T: Attribute<'a>>(&self) -> impl Iterator<Item = Result<T, DecodeError>> + '_ {
        let tid = self.tid;
        self.raw_attributes()
            .filter(|a| a.typ == T::TYPE)
            .map(move |a| T::decode(a.value, &tid))
    }

    /// Comprehension-required attributes this codec does not know (for a 420 response's
    /// UNKNOWN-ATTRIBUTES). At most [`MAX_UNKNOWN`] are reported.
    pub fn unknown_required(&self) -> &[u16] {
        self.unknown
            .get(..usize::from(self.n_unknown))
            .unwrap_or_default()
    }

    /// Whether MESSAGE-INTEGRITY is present.
    pub fn has_integrity(&self) -> bool {
        self.integrity.is_some()
    }

    /// Whether MESSAGE-INTEGRITY-SHA256 is present.
    pub fn has_integrity_sha256(&self) -> bool {
        self.integrity_sha256.is_some()
    }

    /// Whether FINGERPRINT is present.
    pub fn has_fingerprint(&self) -> bool {
        self.fingerprint.is_some()
    }

    /// Verifies MESSAGE-INTEGRITY (HMAC-SHA1) with `key`, in constant time.
    pub fn verify_integrity(&self, key: &[u8]) -> Result<(), DecodeError> {
        let at = usize::from(self.integrity.ok_or(DecodeError::MissingIntegrity)?);
        let got = self
            .buf
            .get(at + 4..at + 24)
            .ok_or(DecodeError::Truncated)?;
        let covered = self.buf.get(..at).ok_or(DecodeError::Truncated)?;
        let mac = auth::hmac_sha1_stun(key, covered, at + 24 - HEADER_LEN);
        if auth::ct_eq(&mac, got) {
            Ok(())
        } else {
            Err(DecodeError::IntegrityMismatch)
        }
    }

    /// Verifies MESSAGE-INTEGRITY-SHA256 with `key`, in constant time; a truncated value
    /// (16..32 bytes) is compared against the same prefix of the HMAC.
    pub fn verify_integrity_sha256(&self, key: &[u8]) -> Result<(), DecodeError> {
        let at = usize::from(self.integrity_sha256.ok_or(DecodeError::MissingIntegrity)?);
        let vlen = usize::from(be16(self.buf, at + 2).ok_or(DecodeError::Truncated)?);
        let got = self
            .buf
            .get(at + 4..at + 4 + vlen)
            .ok_or(DecodeError::Truncated)?;
        let covered = self.buf.get(..at).ok_or(DecodeError::Truncated)?;
        let mac = auth::hmac_sha256_stun(key, covered, at + 4 + vlen - HEADER_LEN);
        let want = mac.get(..vlen).ok_or(DecodeError::Truncated)?;
        if auth::ct_eq(want, got) {
            Ok(())
        } else {
            Err(DecodeError::IntegrityMismatch)
        }
    }

    /// Verifies with whichever integrity attribute `key` is for.
    pub fn verify(&self, key: &IntegrityKey) -> Result<(), DecodeError> {
        match key {
            IntegrityKey::Sha1(k) => self.verify_integrity(k),
            IntegrityKey::Sha256(k) => self.verify_integrity_sha256(k),
        }
    }

    /// Verifies FINGERPRINT if present: `Ok(true)` when present and right, `Ok(false)`
    /// when absent, an error when wrong.
    pub fn verify_fingerprint(&self) -> Result<bool, DecodeError> {
        let Some(at) = self.fingerprint else {
            return Ok(false);
        };
        let at = usize::from(at);
        let got = be32(self.buf, at + 4).ok_or(DecodeError::Truncated)?;
        let covered = self.buf.get(..at).ok_or(DecodeError::Truncated)?;
        if auth::fingerprint(covered, at + 8 - HEADER_LEN) == got {
            Ok(true)
        } else {
            Err(DecodeError::FingerprintMismatch)
        }
    }
}

/// Builds a STUN message into a caller-owned buffer.
///
/// Call order: [`MessageWriter::new`], any number of [`MessageWriter::add`], then
/// optionally [`MessageWriter::add_integrity`] and/or
/// [`MessageWriter::add_integrity_sha256`], optionally
/// [`MessageWriter::add_fingerprint`], then [`MessageWriter::finish`]. Adding an ordinary
/// attribute after an integrity attribute or the fingerprint is refused.
#[derive(Debug)]
pub struct MessageWriter<'b> {
    buf: &'b mut [u8],
    len: usize,
    tid: TransactionId,
    sealed: u8,
}

impl<'b> MessageWriter<'b> {
    /// Starts a message of `method`/`class` with transaction id `tid` in `buf`.
    pub fn new(
        buf: &'b mut [u8],
        method: Method,
        class: Class,
        tid: TransactionId,
    ) -> Result<MessageWriter<'b>, EncodeError> {
        let header = buf
            .get_mut(..HEADER_LEN)
            .ok_or(EncodeError::BufferTooSmall)?;
        header[0..2].copy_from_slice(&message_type(method, class).to_be_bytes());
        header[2..4].copy_from_slice(&[0, 0]);
        header[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        header[8..20].copy_from_slice(&tid.0);
        Ok(MessageWriter {
            buf,
            len: HEADER_LEN,
            tid,
            sealed: 0,
        })
    }

    /// The transaction id being written.
    pub fn transaction_id(&self) -> TransactionId {
        self.tid
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether only the header has been written.
    pub fn is_empty(&self) -> bool {
        self.len == HEADER_LEN
    }

    fn put_raw(&mut self, typ: u16, vlen: usize) -> Result<&mut [u8], EncodeError> {
        let vlen16 = u16::try_from(vlen).map_err(|_| EncodeError::ValueTooLong)?;
        let start = self.len;
        let end = start + 4 + padded(vlen);
        if end - HEADER_LEN > usize::from(u16::MAX) {
            return Err(EncodeError::MessageTooLong);
        }
        if self.buf.len() < end {
            return Err(EncodeError::BufferTooSmall);
        }
        self.buf[start..start + 2].copy_from_slice(&typ.to_be_bytes());
        self.buf[start + 2..start + 4].copy_from_slice(&vlen16.to_be_bytes());
        // Zero the padding; the value itself is written by the caller.
        self.buf[start + 4 + vlen..end].fill(0);
        self.len = end;
        // Fits: checked against u16::MAX above.
        let body_len = (end - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&body_len.to_be_bytes());
        Ok(&mut self.buf[start + 4..start + 4 + vlen])
    }

    /// Appends one attribute.
    pub fn add<'x, T: Attribute<'x>>(&mut self, a: &T) -> Result<&mut Self, EncodeError> {
        if self.sealed != 0 {
            return Err(EncodeError::AfterIntegrity);
        }
        let vlen = a.encoded_len();
        let tid = self.tid;
        let out = self.put_raw(T::TYPE.0, vlen)?;
        a.encode(out, &tid);
        Ok(self)
    }

    /// Appends a raw attribute (used for attributes this codec does not model, and tests).
    pub fn add_raw(&mut self, typ: AttrType, value: &[u8]) -> Result<&mut Self, EncodeError> {
        if self.sealed != 0 {
            return Err(EncodeError::AfterIntegrity);
        }
        let out = self.put_raw(typ.0, value.len())?;
        out.copy_from_slice(value);
        Ok(self)
    }

    /// Appends MESSAGE-INTEGRITY computed with `key` (HMAC-SHA1 over the message so far).
    pub fn add_integrity(&mut self, key: &[u8]) -> Result<&mut Self, EncodeError> {
        if self.sealed >= 1 {
            return Err(EncodeError::AfterIntegrity);
        }
        let at = self.len;
        self.put_raw(attr::MESSAGE_INTEGRITY, 20)?;
        let mac = auth::hmac_sha1_stun(key, &self.buf[..at], self.len - HEADER_LEN);
        self.buf[at + 4..at + 24].copy_from_slice(&mac);
        self.sealed = 1;
        Ok(self)
    }

    /// Appends MESSAGE-INTEGRITY-SHA256 (full 32 bytes) computed with `key`.
    pub fn add_integrity_sha256(&mut self, key: &[u8]) -> Result<&mut Self, EncodeError> {
        if self.sealed >= 2 {
            return Err(EncodeError::AfterIntegrity);
        }
        let at = self.len;
        self.put_raw(attr::MESSAGE_INTEGRITY_SHA256, 32)?;
        let mac = auth::hmac_sha256_stun(key, &self.buf[..at], self.len - HEADER_LEN);
        self.buf[at + 4..at + 36].copy_from_slice(&mac);
        self.sealed = 2;
        Ok(self)
    }

    /// Appends the integrity attribute `key` is for.
    pub fn add_integrity_with(&mut self, key: &IntegrityKey) -> Result<&mut Self, EncodeError> {
        match key {
            IntegrityKey::Sha1(k) => self.add_integrity(k),
            IntegrityKey::Sha256(k) => self.add_integrity_sha256(k),
        }
    }

    /// Appends FINGERPRINT; nothing may be added after it.
    pub fn add_fingerprint(&mut self) -> Result<&mut Self, EncodeError> {
        if self.sealed >= 3 {
            return Err(EncodeError::AfterIntegrity);
        }
        let at = self.len;
        self.put_raw(attr::FINGERPRINT, 4)?;
        let crc = auth::fingerprint(&self.buf[..at], self.len - HEADER_LEN);
        self.buf[at + 4..at + 8].copy_from_slice(&crc.to_be_bytes());
        self.sealed = 3;
        Ok(self)
    }

    /// Ends the message: returns its length in bytes.
    pub fn finish(self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_type_round_trips() {
        for m in [0x001u16, 0x003, 0x009, 0xFFF, 0x0AB] {
            for c in [
                Class::Request,
                Class::Indication,
                Class::Success,
                Class::Error,
            ] {
                let t = message_type(Method(m), c);
                assert_eq!(t & 0xC000, 0);
                assert_eq!(split_message_type(t), (Method(m), c));
            }
        }
        assert_eq!(message_type(Method::ALLOCATE, Class::Error), 0x0113);
        assert_eq!(message_type(Method::SEND, Class::Indication), 0x0016);
        assert_eq!(message_type(Method::BINDING, Class::Success), 0x0101);
    }
}
