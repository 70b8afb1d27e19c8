//! The reason phrases of STUN and TURN error codes (RFC 8489 §14.8, RFC 8656 §19): the
//! one table the server's error responses take their ERROR-CODE text from.
//!
//! One answer deliberately departs from it: the data plane's 420 to a Binding request
//! says just "Unknown". That answer is unauthenticated, and the short phrase keeps it at
//! most 24 bytes larger than the request, so that it cannot serve as an amplifier (see
//! `write_binding_answer` in the data plane's engine). Keep it short there.

/// The reason phrase of `code`, as the RFCs spell it; "Error" for a code the server
/// does not produce.
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        300 => "Try Alternate",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        420 => "Unknown Attribute",
        437 => "Allocation Mismatch",
        438 => "Stale Nonce",
        440 => "Address Family not Supported",
        441 => "Wrong Credentials",
        442 => "Unsupported Transport Protocol",
        443 => "Peer Address Family Mismatch",
        486 => "Allocation Quota Reached",
        500 => "Server Error",
        508 => "Insufficient Capacity",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::reason_phrase;

    #[test]
    fn every_code_the_server_produces_has_its_phrase() {
        let table = [
            (300, "Try Alternate"),
            (400, "Bad Request"),
            (401, "Unauthorized"),
            (403, "Forbidden"),
            (420, "Unknown Attribute"),
            (437, "Allocation Mismatch"),
            (438, "Stale Nonce"),
            (440, "Address Family not Supported"),
            (441, "Wrong Credentials"),
            (442, "Unsupported Transport Protocol"),
            (443, "Peer Address Family Mismatch"),
            (486, "Allocation Quota Reached"),
            (500, "Server Error"),
            (508, "Insufficient Capacity"),
        ];
        for (code, phrase) in table {
            assert_eq!(reason_phrase(code), phrase, "code {code}");
        }
    }

    #[test]
    fn other_codes_get_a_generic_phrase() {
        for code in [0, 299, 402, 487, 599, 699, u16::MAX] {
            assert_eq!(reason_phrase(code), "Error", "code {code}");
        }
    }
}
