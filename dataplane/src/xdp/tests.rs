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

#[test]
fn loads_and_passes_a_frame_it_does_not_know() {
    let fp = match FastPath::start(&XdpConfig::default()) {
        Ok(fp) => fp,
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            return;
        }
    };
    let mut frame = vec![0u8; 60];
    frame[12] = 0x08; // IPv4
    frame[13] = 0x00;
    let (action, _) = fp.test_run(&frame, 0).unwrap();
    assert_eq!(action, 2); // XDP_PASS
    assert_eq!(fp.stats().passed_total(), 1);
}
