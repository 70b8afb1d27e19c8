#![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]
use super::*;

#[test]
fn map_layouts_match_relay_h() {
    use std::mem::size_of;
    assert_eq!(size_of::<ClientKey>(), 12);
    assert_eq!(size_of::<AllocVal>(), 24);
    assert_eq!(size_of::<ChanKey>(), 16);
    assert_eq!(size_of::<ChanVal>(), 32);
    assert_eq!(size_of::<PermKey>(), 12);
    assert_eq!(size_of::<PermVal>(), 24);
    assert_eq!(size_of::<PeerKey>(), 12);
    assert_eq!(size_of::<PeerVal>(), 16);
    assert_eq!(size_of::<UsageVal>(), 32);
}
