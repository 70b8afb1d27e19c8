//! Helpers for the data plane's fast path: the Data indication header written in front of
//! a payload that is already in place, and the Send indication's two attributes.

use std::net::SocketAddr;

use crate::attr::{self, Attribute, Data, MappedAddress, XorPeerAddress};
use crate::error::{DecodeError, EncodeError};
use crate::stun::{
    Class, ClassicBindingRequest, HEADER_LEN, Message, MessageWriter, Method, TransactionId, padded,
};

/// The most headroom a Data indication header needs (IPv6 peer): 20 (STUN header) + 24
/// (XOR-PEER-ADDRESS) + 4 (DATA attribute header).
pub const MAX_DATA_INDICATION_HEADER: usize = 48;

/// Length of the Data indication header for a peer of this address family.
pub fn data_indication_header_len(peer: &SocketAddr) -> usize {
    HEADER_LEN + 4 + XorPeerAddress(*peer).encoded_len() + 4
}

/// Writes a Data indication header for `payload_len` bytes from `peer` into `out`, which
/// must be exactly [`data_indication_header_len`] bytes, so that the payload following it
/// completes the message. The message length counts the DATA padding: the caller sends
/// `padded(payload_len) - payload_len` zero bytes after the payload.
pub fn write_data_indication_header(
    out: &mut [u8],
    tid: TransactionId,
    peer: &SocketAddr,
    payload_len: usize,
) -> Result<(), EncodeError> {
    let want = data_indication_header_len(peer);
    if out.len() != want {
        return Err(EncodeError::BufferTooSmall);
    }
    let body = want - HEADER_LEN + padded(payload_len);
    let body = u16::try_from(body).map_err(|_| EncodeError::MessageTooLong)?;
    let plen = u16::try_from(payload_len).map_err(|_| EncodeError::ValueTooLong)?;
    // XOR-PEER-ADDRESS fills all of `out` but the last 4 bytes, which take the DATA
    // attribute's header; its value is the payload already in place behind `out`.
    let mut w = MessageWriter::new(out, Method::DATA, Class::Indication, tid)?;
    w.add(&XorPeerAddress(*peer))?;
    let at = w.finish();
    out[at..at + 2].copy_from_slice(&attr::DATA.to_be_bytes());
    out[at + 2..at + 4].copy_from_slice(&plen.to_be_bytes());
    out[2..4].copy_from_slice(&body.to_be_bytes());
    Ok(())
}

/// A parsed Send indication: where to send and what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendIndication<'a> {
    /// XOR-PEER-ADDRESS.
    pub peer: SocketAddr,
    /// DATA.
    pub data: &'a [u8],
    /// DONT-FRAGMENT was present.
    pub dont_fragment: bool,
}

impl<'a> SendIndication<'a> {
    /// Reads a Send indication's peer and data; both are required (RFC 8656 §11.2).
    pub fn from_message(msg: &Message<'a>) -> Result<SendIndication<'a>, DecodeError> {
        if msg.method() != Method::SEND || msg.class() != Class::Indication {
            return Err(DecodeError::NotStun);
        }
        let peer = msg
            .attr::<XorPeerAddress>()?
            .ok_or(DecodeError::BadAttribute(XorPeerAddress::TYPE))?;
        let data = msg
            .attr::<Data<'a>>()?
            .ok_or(DecodeError::BadAttribute(Data::TYPE))?;
        Ok(SendIndication {
            peer: peer.0,
            data: data.0,
            dont_fragment: msg.has(attr::AttrType(attr::DONT_FRAGMENT)),
        })
    }
}

/// Answers a Binding request (RFC 8489 §7.3): a success response with
/// XOR-MAPPED-ADDRESS, or 420 listing unknown comprehension-required attributes. Used by
/// the data plane's fast path and the control plane alike. FINGERPRINT is added when the
/// request carried one. Returns the response's length.
pub fn write_binding_response(
    out: &mut [u8],
    req: &Message<'_>,
    mapped: SocketAddr,
) -> Result<usize, EncodeError> {
    let unknown = req.unknown_required();
    let class = if unknown.is_empty() {
        Class::Success
    } else {
        Class::Error
    };
    let mut w = MessageWriter::new(out, Method::BINDING, class, req.transaction_id())?;
    if unknown.is_empty() {
        w.add(&attr::XorMappedAddress(mapped))?;
    } else {
        w.add(&attr::ErrorCode::standard(420))?;
        w.add(&attr::UnknownAttributes::new(unknown))?;
    }
    if req.has_fingerprint() {
        w.add_fingerprint()?;
    }
    Ok(w.finish())
}

/// Answers a request with a 401 or 438 challenge (RFC 8489 §9.2.4): ERROR-CODE, REALM,
/// NONCE, PASSWORD-ALGORITHMS (the ones offered, [`crate::auth::OFFERED_ALGORITHMS`]) and
/// FINGERPRINT. Written alike by the control plane and by the data plane, which answers
/// the first request of a handshake itself. Returns the response's length.
pub fn write_challenge(
    out: &mut [u8],
    req: &Message<'_>,
    code: u16,
    realm: &str,
    nonce: &str,
) -> Result<usize, EncodeError> {
    let mut w = MessageWriter::new(out, req.method(), Class::Error, req.transaction_id())?;
    w.add(&attr::ErrorCode::standard(code))?;
    w.add(&attr::Realm(realm))?;
    w.add(&attr::Nonce(nonce))?;
    w.add(&attr::PasswordAlgorithms::new(
        &crate::auth::OFFERED_ALGORITHMS,
    ))?;
    w.add_fingerprint()?;
    Ok(w.finish())
}

/// Answers a classic RFC 3489 Binding request (RFC 5389 §12.2): a success response whose
/// header carries the request's 16-byte transaction id where the magic cookie would be,
/// with MAPPED-ADDRESS (not XOR-MAPPED-ADDRESS, which an RFC 3489 client does not know)
/// and nothing else: 32 bytes for an IPv4 `mapped`, 44 for IPv6 (family 0x02 of
/// RFC 5389; RFC 3489 defined IPv4 only). Returns the response's length.
pub fn write_classic_binding_response(
    out: &mut [u8],
    req: &ClassicBindingRequest,
    mapped: SocketAddr,
) -> Result<usize, EncodeError> {
    let [c0, c1, c2, c3, rest @ ..] = req.transaction_id().0;
    let mut w = MessageWriter::new(out, Method::BINDING, Class::Success, TransactionId(rest))?;
    // MAPPED-ADDRESS is not XORed, so the cookie the writer puts in bytes 4..8 matters to
    // nothing it writes: it is replaced by the first four bytes of the classic id.
    w.add(&MappedAddress(mapped))?;
    let n = w.finish();
    out.get_mut(4..8)
        .ok_or(EncodeError::BufferTooSmall)?
        .copy_from_slice(&[c0, c1, c2, c3]);
    Ok(n)
}

/// Answers a Binding request as an RFC 5780 server (one with an alternate address
/// and port): XOR-MAPPED-ADDRESS, RESPONSE-ORIGIN (`origin`, the address the response
/// is sent from) and OTHER-ADDRESS (`other`, the server's address differing in both IP
/// and port from the one the request reached), then FINGERPRINT when the request carried
/// one. The caller has checked the request's comprehension-required attributes (see
/// [`write_binding_response`]). Returns the response's length.
pub fn write_rfc5780_binding_response(
    out: &mut [u8],
    req: &Message<'_>,
    mapped: SocketAddr,
    origin: SocketAddr,
    other: SocketAddr,
) -> Result<usize, EncodeError> {
    let mut w = MessageWriter::new(out, Method::BINDING, Class::Success, req.transaction_id())?;
    w.add(&attr::XorMappedAddress(mapped))?;
    w.add(&attr::ResponseOrigin(origin))?;
    w.add(&attr::OtherAddress(other))?;
    if req.has_fingerprint() {
        w.add_fingerprint()?;
    }
    Ok(w.finish())
}
