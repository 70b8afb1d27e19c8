//! First-byte demultiplexing of packets sharing a port (RFC 7983, updated by RFC 9443).

/// What the first byte says a packet is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketKind {
    /// 0..=3: STUN.
    Stun,
    /// 16..=19: ZRTP.
    Zrtp,
    /// 20..=63: DTLS.
    Dtls,
    /// 64..=79: TURN ChannelData.
    ChannelData,
    /// 128..=191: RTP or RTCP.
    Rtp,
    /// 192..=255 and the unassigned ranges: QUIC (RFC 9443) or nothing known.
    Other,
}

/// Classifies a packet by its first byte; an empty packet is [`PacketKind::Other`].
pub fn classify(packet: &[u8]) -> PacketKind {
    match packet.first() {
        Some(0..=3) => PacketKind::Stun,
        Some(16..=19) => PacketKind::Zrtp,
        Some(20..=63) => PacketKind::Dtls,
        Some(64..=79) => PacketKind::ChannelData,
        Some(128..=191) => PacketKind::Rtp,
        _ => PacketKind::Other,
    }
}
