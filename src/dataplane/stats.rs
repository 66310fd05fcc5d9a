//! Lock-free counters shared by the packet threads, the control socket and metrics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a packet was dropped. Small and fixed: it becomes a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Too short or not a packet of any protocol we speak.
    Malformed,
    /// Outbound: destination matches no tunnel's remote subnets.
    NoRoute,
    /// Outbound: the tunnel has no endpoint yet (waiting for its peer).
    NoEndpoint,
    /// Inbound: decrypted fine, but the inner source is outside the tunnel's remote subnets.
    SourceNotAllowed,
    /// Inbound: handshake from a key, or data for an index, that no tunnel knows.
    UnknownPeer,
    /// Inbound: authentication/decryption failed, replayed or stale.
    DecryptFailed,
    /// Inbound: a protocol this site does not run (IKE or ESP without such tunnels).
    UnsupportedProtocol,
    /// Handshake refused by the rate limiter (a cookie was sent instead).
    RateLimited,
    /// Writing to the TUN or the UDP socket failed.
    IoError,
}

impl DropReason {
    pub const ALL: [DropReason; 9] = [
        Self::Malformed,
        Self::NoRoute,
        Self::NoEndpoint,
        Self::SourceNotAllowed,
        Self::UnknownPeer,
        Self::DecryptFailed,
        Self::UnsupportedProtocol,
        Self::RateLimited,
        Self::IoError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::NoRoute => "no_route",
            Self::NoEndpoint => "no_endpoint",
            Self::SourceNotAllowed => "source_not_allowed",
            Self::UnknownPeer => "unknown_peer",
            Self::DecryptFailed => "decrypt_failed",
            Self::UnsupportedProtocol => "unsupported_protocol",
            Self::RateLimited => "rate_limited",
            Self::IoError => "io_error",
        }
    }
}

#[derive(Default)]
pub struct Drops([AtomicU64; DropReason::ALL.len()]);

impl Drops {
    pub fn add(&self, reason: DropReason) {
        self.0[reason as usize].fetch_add(1, Relaxed);
    }
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize].load(Relaxed)
    }
    /// Non-zero counters, by reason name.
    pub fn snapshot(&self) -> std::collections::BTreeMap<&'static str, u64> {
        DropReason::ALL
            .iter()
            .map(|r| (r.as_str(), self.get(*r)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// Per-tunnel traffic counters. Bytes are UDP payload bytes on the wire, as `wg show`
/// reports them; packets are datagrams.
#[derive(Default)]
pub struct TunnelStats {
    pub rx_bytes: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub tx_packets: AtomicU64,
    /// Inner (plaintext) IP packets delivered to / taken from the TUN.
    pub rx_inner_packets: AtomicU64,
    pub tx_inner_packets: AtomicU64,
    pub handshakes: AtomicU64,
    pub drops: Drops,
}

impl TunnelStats {
    pub fn count_rx(&self, bytes: usize) {
        self.rx_bytes.fetch_add(bytes as u64, Relaxed);
        self.rx_packets.fetch_add(1, Relaxed);
    }
    pub fn count_tx(&self, bytes: usize) {
        self.tx_bytes.fetch_add(bytes as u64, Relaxed);
        self.tx_packets.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_counters_by_reason() {
        let d = Drops::default();
        d.add(DropReason::NoRoute);
        d.add(DropReason::NoRoute);
        d.add(DropReason::IoError);
        assert_eq!(d.get(DropReason::NoRoute), 2);
        let snap = d.snapshot();
        assert_eq!(snap.len(), 2);
        assert_eq!(snap["io_error"], 1);
    }

    #[test]
    fn reason_names_are_unique() {
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::ALL.len());
    }
}
