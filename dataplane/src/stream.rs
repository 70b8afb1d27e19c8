//! STUB (replaced by the real framer on merge).
#![allow(dead_code, missing_docs, clippy::all)]
#[derive(Debug)]
pub(crate) struct Framer;
#[derive(Debug, Default)]
pub(crate) struct FeedStats {
    pub(crate) frames: usize,
    pub(crate) oversize: usize,
}
#[derive(Debug)]
pub(crate) enum FrameError {
    BadFirstByte(u8),
}
impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "x")
    }
}
impl Framer {
    pub(crate) fn new(_max: usize, _legacy: bool) -> Framer {
        Framer
    }
    pub(crate) fn feed(
        &mut self,
        _d: &[u8],
        _f: impl FnMut(&[u8]),
    ) -> Result<FeedStats, FrameError> {
        Ok(FeedStats::default())
    }
}
#[derive(Debug)]
pub(crate) struct SendQueue;
impl SendQueue {
    pub(crate) fn new(_cap: usize) -> SendQueue {
        SendQueue
    }
    pub(crate) fn would_fit(&self, _n: usize) -> bool {
        true
    }
    pub(crate) fn push(&mut self, _b: &[u8]) -> bool {
        true
    }
    pub(crate) fn push_padded(&mut self, _b: &[u8]) -> bool {
        true
    }
    pub(crate) fn start(&mut self) -> Option<&[u8]> {
        None
    }
    pub(crate) fn complete(&mut self, _n: usize) {}
    pub(crate) fn is_empty(&self) -> bool {
        true
    }
}
