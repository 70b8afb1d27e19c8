//! STUN, TURN and ICE attributes: type codes as the RFCs spell them, and typed values
//! that decode from (and encode into) borrowed bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::error::DecodeError;
use crate::reason::reason_phrase;
use crate::stun::{MAGIC_COOKIE, TransactionId, be16, be32};

/// An attribute type code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttrType(pub u16);

impl AttrType {
    /// Comprehension-required attributes have codes below 0x8000 (RFC 8489 §14).
    pub fn comprehension_required(self) -> bool {
        self.0 < 0x8000
    }
}

/// MAPPED-ADDRESS (RFC 8489 §14.1).
pub const MAPPED_ADDRESS: u16 = 0x0001;
/// USERNAME (RFC 8489 §14.3).
pub const USERNAME: u16 = 0x0006;
/// CHANGE-REQUEST (RFC 5780 §7.2). Comprehension-required and deliberately not in
/// [`is_known`]: only a server with an alternate address understands it (RFC 5780 §6.1
/// wants 420 from one without), which the server decides, not the codec.
pub const CHANGE_REQUEST: u16 = 0x0003;
/// MESSAGE-INTEGRITY (RFC 8489 §14.5).
pub const MESSAGE_INTEGRITY: u16 = 0x0008;
/// ERROR-CODE (RFC 8489 §14.8).
pub const ERROR_CODE: u16 = 0x0009;
/// UNKNOWN-ATTRIBUTES (RFC 8489 §14.13).
pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
/// CHANNEL-NUMBER (RFC 8656 §18.1).
pub const CHANNEL_NUMBER: u16 = 0x000C;
/// LIFETIME (RFC 8656 §18.2).
pub const LIFETIME: u16 = 0x000D;
/// XOR-PEER-ADDRESS (RFC 8656 §18.3).
pub const XOR_PEER_ADDRESS: u16 = 0x0012;
/// DATA (RFC 8656 §18.4).
pub const DATA: u16 = 0x0013;
/// REALM (RFC 8489 §14.9).
pub const REALM: u16 = 0x0014;
/// NONCE (RFC 8489 §14.10).
pub const NONCE: u16 = 0x0015;
/// XOR-RELAYED-ADDRESS (RFC 8656 §18.5).
pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
/// REQUESTED-ADDRESS-FAMILY (RFC 8656 §18.6).
pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
/// EVEN-PORT (RFC 8656 §18.7).
pub const EVEN_PORT: u16 = 0x0018;
/// REQUESTED-TRANSPORT (RFC 8656 §18.8).
pub const REQUESTED_TRANSPORT: u16 = 0x0019;
/// DONT-FRAGMENT (RFC 8656 §18.9).
pub const DONT_FRAGMENT: u16 = 0x001A;
/// MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6).
pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
/// PASSWORD-ALGORITHM (RFC 8489 §14.12).
pub const PASSWORD_ALGORITHM: u16 = 0x001D;
/// USERHASH (RFC 8489 §14.4).
pub const USERHASH: u16 = 0x001E;
/// XOR-MAPPED-ADDRESS (RFC 8489 §14.2).
pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// RESERVATION-TOKEN (RFC 8656 §18.10).
pub const RESERVATION_TOKEN: u16 = 0x0022;
/// PRIORITY (RFC 8445 §16.1).
pub const PRIORITY: u16 = 0x0024;
/// USE-CANDIDATE (RFC 8445 §16.1).
pub const USE_CANDIDATE: u16 = 0x0025;
/// ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §18.11).
pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
/// ADDRESS-ERROR-CODE (RFC 8656 §18.12).
pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
/// PASSWORD-ALGORITHMS (RFC 8489 §14.11).
pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
/// ALTERNATE-DOMAIN (RFC 8489 §14.16).
pub const ALTERNATE_DOMAIN: u16 = 0x8003;
/// ICMP (RFC 8656 §18.13).
pub const ICMP: u16 = 0x8004;
/// SOFTWARE (RFC 8489 §14.14).
pub const SOFTWARE: u16 = 0x8022;
/// ALTERNATE-SERVER (RFC 8489 §14.15).
pub const ALTERNATE_SERVER: u16 = 0x8023;
/// FINGERPRINT (RFC 8489 §14.7).
pub const FINGERPRINT: u16 = 0x8028;
/// ICE-CONTROLLED (RFC 8445 §16.1).
pub const ICE_CONTROLLED: u16 = 0x8029;
/// ICE-CONTROLLING (RFC 8445 §16.1).
pub const ICE_CONTROLLING: u16 = 0x802A;
/// RESPONSE-ORIGIN (RFC 5780 §7.3).
pub const RESPONSE_ORIGIN: u16 = 0x802B;
/// OTHER-ADDRESS (RFC 5780 §7.4).
pub const OTHER_ADDRESS: u16 = 0x802C;

/// Whether this codec knows the comprehension-required attribute `t`.
pub fn is_known(t: u16) -> bool {
    matches!(
        t,
        MAPPED_ADDRESS
            | USERNAME
            | MESSAGE_INTEGRITY
            | ERROR_CODE
            | UNKNOWN_ATTRIBUTES
            | CHANNEL_NUMBER
            | LIFETIME
            | XOR_PEER_ADDRESS
            | DATA
            | REALM
            | NONCE
            | XOR_RELAYED_ADDRESS
            | REQUESTED_ADDRESS_FAMILY
            | EVEN_PORT
            | REQUESTED_TRANSPORT
            | DONT_FRAGMENT
            | MESSAGE_INTEGRITY_SHA256
            | PASSWORD_ALGORITHM
            | USERHASH
            | XOR_MAPPED_ADDRESS
            | RESERVATION_TOKEN
            | PRIORITY
            | USE_CANDIDATE
    )
}

/// A typed attribute: how its value decodes from and encodes into bytes.
pub trait Attribute<'a>: Sized {
    /// The attribute's type code.
    const TYPE: AttrType;
    /// Decodes the value (padding excluded). `tid` is needed by the XOR-ed addresses.
    fn decode(value: &'a [u8], tid: &TransactionId) -> Result<Self, DecodeError>;
    /// Length of the encoded value, padding excluded.
    fn encoded_len(&self) -> usize;
    /// Writes the value into `out`, which is exactly `encoded_len()` bytes long.
    fn encode(&self, out: &mut [u8], tid: &TransactionId);
}

fn bad(t: u16) -> DecodeError {
    DecodeError::BadAttribute(AttrType(t))
}

const FAMILY_V4: u8 = 0x01;
const FAMILY_V6: u8 = 0x02;

fn addr_len(a: &SocketAddr) -> usize {
    match a {
        SocketAddr::V4(_) => 8,
        SocketAddr::V6(_) => 20,
    }
}

fn xor_mask(tid: &TransactionId) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    m[4..].copy_from_slice(&tid.0);
    m
}

fn decode_addr(t: u16, v: &[u8], xor: Option<&TransactionId>) -> Result<SocketAddr, DecodeError> {
    let family = *v.get(1).ok_or(bad(t))?;
    let mut port = be16(v, 2).ok_or(bad(t))?;
    let mask = xor.map(xor_mask).unwrap_or([0; 16]);
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    match (family, v.len()) {
        (FAMILY_V4, 8) => {
            let mut ip = [0u8; 4];
            for (i, o) in ip.iter_mut().enumerate() {
                *o = v.get(4 + i).copied().unwrap_or(0) ^ mask[i];
            }
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        (FAMILY_V6, 20) => {
            let mut ip = [0u8; 16];
            for (i, o) in ip.iter_mut().enumerate() {
                *o = v.get(4 + i).copied().unwrap_or(0) ^ mask[i];
            }
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => Err(bad(t)),
    }
}

fn encode_addr(a: &SocketAddr, out: &mut [u8], xor: Option<&TransactionId>) {
    let mask = xor.map(xor_mask).unwrap_or([0; 16]);
    let port_mask = if xor.is_some() {
        (MAGIC_COOKIE >> 16) as u16
    } else {
        0
    };
    out[0] = 0;
    out[2..4].copy_from_slice(&(a.port() ^ port_mask).to_be_bytes());
    match a.ip() {
        IpAddr::V4(ip) => {
            out[1] = FAMILY_V4;
            for (i, b) in ip.octets().iter().enumerate() {
                out[4 + i] = b ^ mask[i];
            }
        }
        IpAddr::V6(ip) => {
            out[1] = FAMILY_V6;
            for (i, b) in ip.octets().iter().enumerate() {
                out[4 + i] = b ^ mask[i];
            }
        }
    }
}

macro_rules! address_attr {
    ($(#[$doc:meta])* $name:ident, $code:expr, $xor:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub SocketAddr);

        impl<'a> Attribute<'a> for $name {
            const TYPE: AttrType = AttrType($code);
            fn decode(value: &'a [u8], tid: &TransactionId) -> Result<Self, DecodeError> {
                decode_addr($code, value, if $xor { Some(tid) } else { None }).map($name)
            }
            fn encoded_len(&self) -> usize {
                addr_len(&self.0)
            }
            fn encode(&self, out: &mut [u8], tid: &TransactionId) {
                encode_addr(&self.0, out, if $xor { Some(tid) } else { None })
            }
        }
    };
}

address_attr!(
    /// MAPPED-ADDRESS: the reflexive address, in the clear (RFC 3489 compatibility).
    MappedAddress, MAPPED_ADDRESS, false
);
address_attr!(
    /// XOR-MAPPED-ADDRESS: the reflexive transport address.
    XorMappedAddress, XOR_MAPPED_ADDRESS, true
);
address_attr!(
    /// XOR-PEER-ADDRESS: a peer's address (repeatable in CreatePermission).
    XorPeerAddress, XOR_PEER_ADDRESS, true
);
address_attr!(
    /// XOR-RELAYED-ADDRESS: an allocation's relayed address (one per family).
    XorRelayedAddress, XOR_RELAYED_ADDRESS, true
);
address_attr!(
    /// RESPONSE-ORIGIN (RFC 5780 §7.3): the address a Binding response was sent from.
    ResponseOrigin, RESPONSE_ORIGIN, false
);
address_attr!(
    /// OTHER-ADDRESS (RFC 5780 §7.4): the server's address differing from the one the
    /// request reached in both IP and port.
    OtherAddress, OTHER_ADDRESS, false
);
address_attr!(
    /// ALTERNATE-SERVER: where a client should go instead (with 300 Try Alternate).
    AlternateServer, ALTERNATE_SERVER, false
);

macro_rules! text_attr {
    ($(#[$doc:meta])* $name:ident, $code:expr, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name<'a>(pub &'a str);

        impl<'a> Attribute<'a> for $name<'a> {
            const TYPE: AttrType = AttrType($code);
            fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
                if value.len() > $max {
                    return Err(bad($code));
                }
                std::str::from_utf8(value).map($name).map_err(|_| bad($code))
            }
            fn encoded_len(&self) -> usize {
                self.0.len()
            }
            fn encode(&self, out: &mut [u8], _: &TransactionId) {
                out.copy_from_slice(self.0.as_bytes())
            }
        }
    };
}

text_attr!(
    /// USERNAME: UTF-8, fewer than 513 bytes.
    Username, USERNAME, 512
);
text_attr!(
    /// REALM: fewer than 128 characters (763 bytes).
    Realm, REALM, 763
);
text_attr!(
    /// NONCE: fewer than 128 characters (763 bytes).
    Nonce, NONCE, 763
);
text_attr!(
    /// SOFTWARE: a description of the sender's software.
    Software, SOFTWARE, 763
);
text_attr!(
    /// ALTERNATE-DOMAIN: the TLS name of the ALTERNATE-SERVER.
    AlternateDomain, ALTERNATE_DOMAIN, 255
);

macro_rules! fixed_bytes_attr {
    ($(#[$doc:meta])* $name:ident, $code:expr, $len:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub [u8; $len]);

        impl<'a> Attribute<'a> for $name {
            const TYPE: AttrType = AttrType($code);
            fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
                value.try_into().map($name).map_err(|_| bad($code))
            }
            fn encoded_len(&self) -> usize {
                $len
            }
            fn encode(&self, out: &mut [u8], _: &TransactionId) {
                out.copy_from_slice(&self.0)
            }
        }
    };
}

fixed_bytes_attr!(
    /// USERHASH: SHA-256 of `username ":" realm`.
    Userhash, USERHASH, 32
);
fixed_bytes_attr!(
    /// RESERVATION-TOKEN: names a relay port the server holds back for a later Allocate.
    ReservationToken, RESERVATION_TOKEN, 8
);

macro_rules! u32_attr {
    ($(#[$doc:meta])* $name:ident, $code:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub u32);

        impl<'a> Attribute<'a> for $name {
            const TYPE: AttrType = AttrType($code);
            fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
                if value.len() != 4 {
                    return Err(bad($code));
                }
                be32(value, 0).map($name).ok_or(bad($code))
            }
            fn encoded_len(&self) -> usize {
                4
            }
            fn encode(&self, out: &mut [u8], _: &TransactionId) {
                out.copy_from_slice(&self.0.to_be_bytes())
            }
        }
    };
}

u32_attr!(
    /// LIFETIME: seconds an allocation should live.
    Lifetime, LIFETIME
);
u32_attr!(
    /// FINGERPRINT: CRC-32 of the message XOR 0x5354554e. Written by
    /// [`crate::stun::MessageWriter::add_fingerprint`]; decode it to read the raw value.
    Fingerprint, FINGERPRINT
);
u32_attr!(
    /// PRIORITY (ICE).
    Priority, PRIORITY
);

macro_rules! u64_attr {
    ($(#[$doc:meta])* $name:ident, $code:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub u64);

        impl<'a> Attribute<'a> for $name {
            const TYPE: AttrType = AttrType($code);
            fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
                let b: [u8; 8] = value.try_into().map_err(|_| bad($code))?;
                Ok($name(u64::from_be_bytes(b)))
            }
            fn encoded_len(&self) -> usize {
                8
            }
            fn encode(&self, out: &mut [u8], _: &TransactionId) {
                out.copy_from_slice(&self.0.to_be_bytes())
            }
        }
    };
}

u64_attr!(
    /// ICE-CONTROLLED: the agent's tie-breaker.
    IceControlled, ICE_CONTROLLED
);
u64_attr!(
    /// ICE-CONTROLLING: the agent's tie-breaker.
    IceControlling, ICE_CONTROLLING
);

macro_rules! flag_attr {
    ($(#[$doc:meta])* $name:ident, $code:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name;

        impl<'a> Attribute<'a> for $name {
            const TYPE: AttrType = AttrType($code);
            fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
                if value.is_empty() { Ok($name) } else { Err(bad($code)) }
            }
            fn encoded_len(&self) -> usize {
                0
            }
            fn encode(&self, _: &mut [u8], _: &TransactionId) {}
        }
    };
}

flag_attr!(
    /// DONT-FRAGMENT: asks the server to set DF on relayed packets.
    DontFragment, DONT_FRAGMENT
);
flag_attr!(
    /// USE-CANDIDATE (ICE).
    UseCandidate, USE_CANDIDATE
);

/// CHANGE-REQUEST (RFC 5780 §7.2): asks for the Binding response to be sent from the
/// server's alternate IP, alternate port, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ChangeRequest {
    /// The "A" flag (0x4): send from the alternate IP address.
    pub change_ip: bool,
    /// The "B" flag (0x2): send from the alternate port.
    pub change_port: bool,
}

impl ChangeRequest {
    const CHANGE_IP: u32 = 0x4;
    const CHANGE_PORT: u32 = 0x2;
}

impl<'a> Attribute<'a> for ChangeRequest {
    const TYPE: AttrType = AttrType(CHANGE_REQUEST);
    fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
        let v: [u8; 4] = value.try_into().map_err(|_| bad(CHANGE_REQUEST))?;
        let flags = u32::from_be_bytes(v);
        // Other bits are zero when sent and ignored when received (RFC 5780 §7.2).
        Ok(ChangeRequest {
            change_ip: flags & Self::CHANGE_IP != 0,
            change_port: flags & Self::CHANGE_PORT != 0,
        })
    }
    fn encoded_len(&self) -> usize {
        4
    }
    fn encode(&self, out: &mut [u8], _: &TransactionId) {
        let mut flags = 0;
        if self.change_ip {
            flags |= Self::CHANGE_IP;
        }
        if self.change_port {
            flags |= Self::CHANGE_PORT;
        }
        out.copy_from_slice(&flags.to_be_bytes());
    }
}

/// MESSAGE-INTEGRITY's raw value (HMAC-SHA1). Use [`crate::stun::Message::verify_integrity`]
/// to check it and [`crate::stun::MessageWriter::add_integrity`] to write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageIntegrity(pub [u8; 20]);

impl<'a> Attribute<'a> for MessageIntegrity {
    const TYPE: AttrType = AttrType(MESSAGE_INTEGRITY);
    fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
        value
            .try_into()
            .map(MessageIntegrity)
            .map_err(|_| bad(MESSAGE_INTEGRITY))
    }
    fn encoded_len(&self) -> usize {
        20
    }
    fn encode(&self, out: &mut [u8], _: &TransactionId) {
        out.copy_from_slice(&self.0)
    }
}

/// MESSAGE-INTEGRITY-SHA256's raw value (16 to 32 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageIntegritySha256<'a>(pub &'a [u8]);

impl<'a> Attribute<'a> for MessageIntegritySha256<'a> {
    const TYPE: AttrType = AttrType(MESSAGE_INTEGRITY_SHA256);
    fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
        if (16..=32).contains(&value.len()) && value.len().is_multiple_of(4) {
            Ok(MessageIntegritySha256(value))
        } else {
            Err(bad(MESSAGE_INTEGRITY_SHA256))
        }
    }
    fn encoded_len(&self) -> usize {
        self.0.len()
    }
    fn encode(&self, out: &mut [u8], _: &TransactionId) {
        out.copy_from_slice(self.0)
    }
}

/// DATA: the application payload of a Send or Data indication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Data<'a>(pub &'a [u8]);

impl<'a> Attribute<'a> for Data<'a> {
    const TYPE: AttrType = AttrType(DATA);
    fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
        Ok(Data(value))
    }
    fn encoded_len(&self) -> usize {
        self.0.len()
    }
    fn encode(&self, out: &mut [u8], _: &TransactionId) {
        out.copy_from_slice(self.0)
    }
}

/// ERROR-CODE: a code from 300 to 699 and a reason phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode<'a> {
    /// The code, 300..=699.
    pub code: u16,
    /// The reason phrase, UTF-8, fewer than 128 characters.
    pub reason: &'a str,
}

impl ErrorCode<'static> {
    /// ERROR-CODE `code` with its reason phrase from [`reason_phrase`].
    pub fn standard(code: u16) -> Self {
        ErrorCode {
            code,
            reason: reason_phrase(code),
        }
    }
}

impl<'a> Attribute<'a> for ErrorCode<'a> {
    const TYPE: AttrType = AttrType(ERROR_CODE);
    fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
        let class = u16::from(*value.get(2).ok_or(bad(ERROR_CODE))? & 0x07);
        let number = u16::from(*value.get(3).ok_or(bad(ERROR_CODE))?);
        let code = class * 100 + number;
        if !(300..700).contains(&code) || number > 99 || value.len() > 4 + 763 {
            return Err(bad(ERROR_CODE));
        }
        let reason =
            std::str::from_utf8(value.get(4..).unwrap_or_default()).map_err(|_| bad(ERROR_CODE))?;
        Ok(ErrorCode { code, reason })
    }
    fn encoded_len(&self) -> usize {
        4 + self.reason.len()
    }
    fn encode(&self, out: &mut [u8], _: &TransactionId) {
        out[0] = 0;
        out[1] = 0;
        out[2] = ((self.code / 100) & 0x07) as u8;
        out[3] = (self.code % 100) as u8;
        out[4..].copy_from_slice(self.reason.as_bytes());
    }
}

/// UNKNOWN-ATTRIBUTES: the comprehension-required types a request carried that the
/// server did not understand. Decoding borrows the raw list; encoding takes a slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownAttributes<'a> {
    raw: &'a [u8],
    list: &'a [u16],
}

impl<'a> UnknownAttributes<'a> {
    /// An attribute listing `types`, for encoding.
    pub fn new(types: &'a [u16]) -> Self {
        UnknownAttributes {
            raw: &[],
            list: types,
        }
    }

    /// The listed attribute types.
    pub fn types(&self) -> impl Iterator<Item = u16> + '_ {
        let decoded = self
            .raw
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]));
        decoded.chain(self.list.iter().copied())
    }
}

impl<'a> Attribute<'a> for UnknownAttributes<'a> {
    const TYPE: AttrType = AttrType(UNKNOWN_ATTRIBUTES);
    fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
        if !value.len().is_multiple_of(2) {
            return Err(bad(UNKNOWN_ATTRIBUTES));
        }
        Ok(UnknownAttributes {
            raw: value,
            list: &[],
        })
    }
    fn encoded_len(&self) -> usize {
        self.raw.len() + 2 * self.list.len()
    }
    fn encode(&self, out: &mut [u8], _: &TransactionId) {
        let (a, b) = out.split_at_mut(self.raw.len());
        a.copy_from_slice(self.raw);
        for (c, t) in b.chunks_exact_mut(2).zip(self.list) {
            c.copy_from_slice(&t.to_be_bytes());
        }
    }
}

/// CHANNEL-NUMBER: a channel in 0x4000..=0x4FFF (RFC 8656 §12). Other values are a
/// decoding error, which a server answers with 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelNumber(pub u16);

/// The lowest valid channel number.
pub const CHANNEL_MIN: u16 = 0x4000;
/// The highest valid channel number (RFC 8656).
pub const CHANNEL_MAX: u16 = 0x4FFF;
/// The highest channel number RFC 5766 allowed (0x5000..=0x7FFF are reserved since
/// RFC 8656; some older clients, coturn's `turnutils_uclient` among them, still use them).
pub const CHANNEL_MAX_LEGACY: u16 = 0x7FFF;

/// Reads a CHANNEL-NUMBER value in the RFC 5766 range 0x4000..=0x7FFF, for servers that
/// accept legacy clients; [`ChannelNumber`] itself is strict.
pub fn legacy_channel_number(value: &[u8]) -> Option<u16> {
    if value.len() != 4 {
        return None;
    }
    be16(value, 0).filter(|n| (CHANNEL_MIN..=CHANNEL_MAX_LEGACY).contains(n))
}

impl<'a> Attribute<'a> for ChannelNumber {
    const TYPE: AttrType = AttrType(CHANNEL_NUMBER);
    fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
        if value.len() != 4 {
            return Err(bad(CHANNEL_NUMBER));
        }
        let n = be16(value, 0).ok_or(bad(CHANNEL_NUMBER))?;
        if (CHANNEL_MIN..=CHANNEL_MAX).contains(&n) {
            Ok(ChannelNumber(n))
        } else {
            Err(bad(CHANNEL_NUMBER))
        }
    }
    fn encoded_len(&self) -> usize {
        4
    }
    fn encode(&self, out: &mut [u8], _: &TransactionId) {
        out[0..2].copy_from_slice(&self.0.to_be_bytes());
        out[2..4].copy_from_slice(&[0, 0]);
    }
}

/// An address family as REQUESTED-ADDRESS-FAMILY and friends encode it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// 0x01.
    V4,
    /// 0x02.
    V6,
    /// Any other value (a server answers 440).
    Other(u8),
}

impl Family {
    fn from_byte(b: u8) -> Family {
        match b {
            FAMILY_V4 => Family::V4,
            FAMILY_V6 => Family::V6,
            x => Family::Other(x),
        }
    }

    fn byte(self) -> u8 {
        match self {
            Family::V4 => FAMILY_V4,
            Family::V6 => FAMILY_V6,
            Family::Other(x) => x,
        }
    }

    /// The family of an address.
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

macro_rules! family_attr {
    ($(#[$doc:meta])* $name:ident, $code:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub Family);

        impl<'a> Attribute<'a> for $name {
            const TYPE: AttrType = AttrType($code);
            fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
                if value.len() != 4 {
                    return Err(bad($code));
                }
                value.first().map(|b| $name(Family::from_byte(*b))).ok_or(bad($code))
            }
            fn encoded_len(&self) -> usize {
                4
            }
            fn encode(&self, out: &mut [u8], _: &TransactionId) {
                out.copy_from_slice(&[self.0.byte(), 0, 0, 0]);
            }
        }
    };
}

family_attr!(
    /// REQUESTED-ADDRESS-FAMILY: the family of the relayed address asked for.
    RequestedAddressFamily, REQUESTED_ADDRESS_FAMILY
);
family_attr!(
    /// ADDITIONAL-ADDRESS-FAMILY: asks for a second relayed address (IPv6) as well.
    AdditionalAddressFamily, ADDITIONAL_ADDRESS_FAMILY
);

/// EVEN-PORT: asks for an even relay port, and with the R bit to reserve the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EvenPort {
    /// The R bit: reserve port + 1 as well.
    pub reserve: bool,
}

impl<'a> Attribute<'a> for EvenPort {
    const TYPE: AttrType = AttrType(EVEN_PORT);
    fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
        // RFC 8656 §18.7: one byte; some clients send it padded to 4 bytes of value.
        match value.first() {
            Some(b) if value.len() == 1 || value.len() == 4 => Ok(EvenPort {
                reserve: b & 0x80 != 0,
            }),
            _ => Err(bad(EVEN_PORT)),
        }
    }
    fn encoded_len(&self) -> usize {
        1
    }
    fn encode(&self, out: &mut [u8], _: &TransactionId) {
        out[0] = if self.reserve { 0x80 } else { 0 };
    }
}

/// REQUESTED-TRANSPORT: the IANA protocol number of the relay transport (17 = UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestedTransport(pub u8);

/// The protocol number of UDP.
pub const PROTOCOL_UDP: u8 = 17;
/// The protocol number of TCP (RFC 6062).
pub const PROTOCOL_TCP: u8 = 6;

impl<'a> Attribute<'a> for RequestedTransport {
    const TYPE: AttrType = AttrType(REQUESTED_TRANSPORT);
    fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
        match value.first() {
            Some(p) if value.len() == 4 => Ok(RequestedTransport(*p)),
            _ => Err(bad(REQUESTED_TRANSPORT)),
        }
    }
    fn encoded_len(&self) -> usize {
        4
    }
    fn encode(&self, out: &mut [u8], _: &TransactionId) {
        out.copy_from_slice(&[self.0, 0, 0, 0]);
    }
}

/// A password algorithm number (RFC 8489 §18.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PasswordAlgorithmId(pub u16);

impl PasswordAlgorithmId {
    /// MD5 (the RFC 5389 key).
    pub const MD5: PasswordAlgorithmId = PasswordAlgorithmId(0x0001);
    /// SHA-256.
    pub const SHA256: PasswordAlgorithmId = PasswordAlgorithmId(0x0002);
}

/// PASSWORD-ALGORITHM: the algorithm the client picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordAlgorithm<'a> {
    /// The algorithm.
    pub algorithm: PasswordAlgorithmId,
    /// Its parameters (none for MD5 and SHA-256).
    pub params: &'a [u8],
}

fn read_algorithm(v: &[u8], at: usize) -> Option<(PasswordAlgorithm<'_>, usize)> {
    let alg = be16(v, at)?;
    let plen = usize::from(be16(v, at + 2)?);
    let params = v.get(at + 4..at + 4 + plen)?;
    Some((
        PasswordAlgorithm {
            algorithm: PasswordAlgorithmId(alg),
            params,
        },
        at + 4 + crate::stun::padded(plen),
    ))
}

impl<'a> Attribute<'a> for PasswordAlgorithm<'a> {
    const TYPE: AttrType = AttrType(PASSWORD_ALGORITHM);
    fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
        match read_algorithm(value, 0) {
            Some((a, end)) if end >= value.len() => Ok(a),
            _ => Err(bad(PASSWORD_ALGORITHM)),
        }
    }
    fn encoded_len(&self) -> usize {
        4 + crate::stun::padded(self.params.len())
    }
    fn encode(&self, out: &mut [u8], _: &TransactionId) {
        write_algorithm(self, out);
    }
}

fn write_algorithm(a: &PasswordAlgorithm<'_>, out: &mut [u8]) -> usize {
    out[0..2].copy_from_slice(&a.algorithm.0.to_be_bytes());
    out[2..4].copy_from_slice(&(a.params.len() as u16).to_be_bytes());
    out[4..4 + a.params.len()].copy_from_slice(a.params);
    let end = 4 + crate::stun::padded(a.params.len());
    out[4 + a.params.len()..end].fill(0);
    end
}

/// PASSWORD-ALGORITHMS: the algorithms a server offers, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordAlgorithms<'a> {
    raw: &'a [u8],
    list: &'a [PasswordAlgorithmId],
}

impl<'a> PasswordAlgorithms<'a> {
    /// An attribute offering `algorithms` (without parameters), for encoding.
    pub fn new(algorithms: &'a [PasswordAlgorithmId]) -> Self {
        PasswordAlgorithms {
            raw: &[],
            list: algorithms,
        }
    }

    /// The offered algorithms.
    pub fn algorithms(&self) -> impl Iterator<Item = PasswordAlgorithm<'a>> + '_ {
        let raw = self.raw;
        let mut at = 0;
        let decoded = std::iter::from_fn(move || {
            let (a, next) = read_algorithm(raw, at)?;
            at = next;
            Some(a)
        });
        decoded.chain(self.list.iter().map(|id| PasswordAlgorithm {
            algorithm: *id,
            params: &[],
        }))
    }

    /// The value's bytes as sent; compared with the server's own when checking that a
    /// client echoed PASSWORD-ALGORITHMS unchanged (RFC 8489 §9.2.4).
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }
}

impl<'a> Attribute<'a> for PasswordAlgorithms<'a> {
    const TYPE: AttrType = AttrType(PASSWORD_ALGORITHMS);
    fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
        let mut at = 0;
        while at < value.len() {
            at = read_algorithm(value, at).ok_or(bad(PASSWORD_ALGORITHMS))?.1;
        }
        Ok(PasswordAlgorithms {
            raw: value,
            list: &[],
        })
    }
    fn encoded_len(&self) -> usize {
        self.raw.len() + 4 * self.list.len()
    }
    fn encode(&self, out: &mut [u8], _: &TransactionId) {
        let (a, mut b) = out.split_at_mut(self.raw.len());
        a.copy_from_slice(self.raw);
        for id in self.list {
            let n = write_algorithm(
                &PasswordAlgorithm {
                    algorithm: *id,
                    params: &[],
                },
                b,
            );
            b = &mut b[n..];
        }
    }
}

/// ADDRESS-ERROR-CODE: why one family of a dual allocation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressErrorCode<'a> {
    /// The family the error is about.
    pub family: Family,
    /// The error code, 300..=699.
    pub code: u16,
    /// The reason phrase.
    pub reason: &'a str,
}

impl<'a> Attribute<'a> for AddressErrorCode<'a> {
    const TYPE: AttrType = AttrType(ADDRESS_ERROR_CODE);
    fn decode(value: &'a [u8], tid: &TransactionId) -> Result<Self, DecodeError> {
        let family = Family::from_byte(*value.first().ok_or(bad(ADDRESS_ERROR_CODE))?);
        let e = ErrorCode::decode(value, tid).map_err(|_| bad(ADDRESS_ERROR_CODE))?;
        Ok(AddressErrorCode {
            family,
            code: e.code,
            reason: e.reason,
        })
    }
    fn encoded_len(&self) -> usize {
        4 + self.reason.len()
    }
    fn encode(&self, out: &mut [u8], tid: &TransactionId) {
        ErrorCode {
            code: self.code,
            reason: self.reason,
        }
        .encode(out, tid);
        out[0] = self.family.byte();
    }
}

/// ICMP: an ICMP error the relay received for a peer (RFC 8656 §18.13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Icmp {
    /// The ICMP type.
    pub typ: u8,
    /// The ICMP code.
    pub code: u8,
    /// The error data (for example the MTU of a "fragmentation needed").
    pub data: u32,
}

impl<'a> Attribute<'a> for Icmp {
    const TYPE: AttrType = AttrType(ICMP);
    fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
        if value.len() != 8 {
            return Err(bad(ICMP));
        }
        Ok(Icmp {
            typ: *value.get(2).ok_or(bad(ICMP))?,
            code: *value.get(3).ok_or(bad(ICMP))?,
            data: be32(value, 4).ok_or(bad(ICMP))?,
        })
    }
    fn encoded_len(&self) -> usize {
        8
    }
    fn encode(&self, out: &mut [u8], _: &TransactionId) {
        out[0] = 0;
        out[1] = 0;
        out[2] = self.typ;
        out[3] = self.code;
        out[4..8].copy_from_slice(&self.data.to_be_bytes());
    }
}
