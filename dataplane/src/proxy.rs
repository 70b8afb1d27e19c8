//! STUB
#![allow(dead_code, missing_docs, clippy::all)]
use std::net::SocketAddr;
pub(crate) const MAX_HEADER: usize = 16 + 2048;
pub(crate) enum Parsed {
    Incomplete,
    Header {
        len: usize,
        addrs: Option<(SocketAddr, SocketAddr)>,
    },
}
#[derive(Debug)]
pub(crate) struct ProxyError;
impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "x")
    }
}
pub(crate) fn parse(_b: &[u8]) -> Result<Parsed, ProxyError> {
    Ok(Parsed::Incomplete)
}
