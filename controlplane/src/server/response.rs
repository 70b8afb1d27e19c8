//! Writing responses: every response the server writes is closed in [`build_response`],
//! but two (see there).

use turnpike_proto::EncodeError;
use turnpike_proto::attr::{self, ErrorCode};
use turnpike_proto::auth::IntegrityKey;
use turnpike_proto::stun::{Class, Message, MessageWriter, Method, TransactionId};

use super::Server;
use super::auth::Authed;
use super::refusal::Reject;
use crate::types::{FiveTuple, Output};

impl Server {
    pub(super) fn respond<F>(
        &self,
        msg: &Message<'_>,
        class: Class,
        auth: Option<&Authed>,
        fill: F,
    ) -> Result<Vec<u8>, EncodeError>
    where
        F: FnOnce(&mut MessageWriter<'_>) -> Result<(), EncodeError>,
    {
        build_response(
            msg.method(),
            class,
            msg.transaction_id(),
            1024,
            auth.map(|a| self.tail(a)),
            fill,
        )
    }

    /// The tail of responses to an authenticated request: SOFTWARE and its key.
    pub(super) fn tail<'a>(&'a self, auth: &'a Authed) -> Tail<'a> {
        Tail {
            software: self.cfg.software.as_deref(),
            key: &auth.key,
        }
    }

    pub(super) fn respond_error<F>(
        &self,
        tuple: FiveTuple,
        msg: &Message<'_>,
        auth: Option<&Authed>,
        r: Reject,
        out: &mut Vec<Output>,
        fill: F,
    ) where
        F: FnOnce(&mut MessageWriter<'_>) -> Result<(), EncodeError>,
    {
        if r.code != 401 && r.code != 438 {
            tracing::debug!(
                client = %tuple.client,
                method = format_args!("{:#05x}", msg.method().0),
                code = r.code,
                attributes = ?msg.raw_attributes().map(|a| (a.typ.0, a.value)).collect::<Vec<_>>(),
                "request refused"
            );
        }
        let res = self.respond(msg, Class::Error, auth, |w| {
            w.add(&ErrorCode::standard(r.code))?;
            fill(w)
        });
        if let Ok(data) = res {
            out.push(Output::Transmit { tuple, data });
        }
    }

    pub(super) fn respond_success<F>(
        &self,
        tuple: FiveTuple,
        msg: &Message<'_>,
        auth: &Authed,
        out: &mut Vec<Output>,
        fill: F,
    ) -> Option<Vec<u8>>
    where
        F: FnOnce(&mut MessageWriter<'_>) -> Result<(), EncodeError>,
    {
        let data = self.respond(msg, Class::Success, Some(auth), fill).ok()?;
        out.push(Output::Transmit {
            tuple,
            data: data.clone(),
        });
        Some(data)
    }
}

/// What closes a response to an authenticated request.
pub(super) struct Tail<'a> {
    /// SOFTWARE, when configured.
    pub(super) software: Option<&'a str>,
    /// The key of the request's integrity attribute, for the same attribute here.
    pub(super) key: &'a IntegrityKey,
}

/// Builds a response in a buffer of `capacity` bytes: the header, the attributes `fill`
/// adds, then with `tail` (an authenticated request) SOFTWARE and MESSAGE-INTEGRITY or
/// MESSAGE-INTEGRITY-SHA256, and FINGERPRINT. Every response the server writes is closed
/// here but two: Binding responses (`turn::write_binding_response`, shared with the data
/// plane) and the 400 to a request that does not parse, which has no FINGERPRINT.
pub(super) fn build_response<F>(
    method: Method,
    class: Class,
    tid: TransactionId,
    capacity: usize,
    tail: Option<Tail<'_>>,
    fill: F,
) -> Result<Vec<u8>, EncodeError>
where
    F: FnOnce(&mut MessageWriter<'_>) -> Result<(), EncodeError>,
{
    let mut buf = vec![0u8; capacity];
    let mut w = MessageWriter::new(&mut buf, method, class, tid)?;
    fill(&mut w)?;
    if let Some(t) = tail {
        if let Some(s) = t.software {
            w.add(&attr::Software(s))?;
        }
        w.add_integrity_with(t.key)?;
    }
    w.add_fingerprint()?;
    let n = w.finish();
    buf.truncate(n);
    // Responses wait in queues (a flood's 401s by the ten thousand): keep each the size
    // of its message, not of the buffer it was written in.
    buf.shrink_to_fit();
    Ok(buf)
}
