//! Lock-free counters shared by the packet threads, the control socket and metrics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

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
    /// Outbound: a keyed tunnel has no keys yet (its IKE SA is not up).
    NoKeys,
}

impl DropReason {
    pub const ALL: [DropReason; 10] = [
        Self::Malformed,
        Self::NoRoute,
        Self::NoEndpoint,
        Self::SourceNotAllowed,
        Self::UnknownPeer,
        Self::DecryptFailed,
        Self::UnsupportedProtocol,
        Self::RateLimited,
        Self::IoError,
        Self::NoKeys,
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
            Self::NoKeys => "no_keys",
        }
    }
}

#[derive(Default)]
pub struct Drops([AtomicU64; DropReason::ALL.len()]);

impl Drops {
    pub fn add(&self, reason: DropReason) {
        self.0[reason as usize].fetch_add(1, Relaxed);
    }
    pub fn add_n(&self, reason: DropReason, n: u64) {
        if n > 0 {
            self.0[reason as usize].fetch_add(n, Relaxed);
        }
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
    /// Completed handshakes (either side initiated).
    pub handshakes: AtomicU64,
    /// Initiations we sent that were superseded (retransmitted, failed over) unanswered.
    pub handshake_timeouts: AtomicU64,
    /// Handshake messages for this tunnel that failed authentication or were malformed.
    pub handshake_rejects: AtomicU64,
    /// Dead-peer events (probe silence for the DPD timeout, or IKE liveness failing).
    pub dpd_dead: AtomicU64,
    /// IKE CHILD SA rekeys (IKE-keyed tunnels).
    pub rekeys_ok: AtomicU64,
    pub rekeys_failed: AtomicU64,
    pub drops: Drops,
    pub rtt: RttStats,
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

/// Where an RTT sample came from. Small and fixed: it becomes the `source` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RttSource {
    /// IKE request/response pairs (DPD, rekey).
    Ike,
    /// WireGuard handshake initiation -> response, measured by the initiator.
    WireguardHandshake,
    /// The data-path ICMP probe through the tunnel.
    Probe,
}

impl RttSource {
    pub const ALL: [RttSource; 3] = [Self::Ike, Self::WireguardHandshake, Self::Probe];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ike => "ike",
            Self::WireguardHandshake => "wireguard_handshake",
            Self::Probe => "probe",
        }
    }
}

/// Upper bounds (seconds) of the RTT histogram buckets: 1-2-5 steps from 100 µs to 10 s.
pub const RTT_BUCKETS: [f64; 16] = [
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
    10.0,
];

/// How many recent samples `status` computes its quantiles from.
const RECENT: usize = 128;

/// An RTT histogram that is cheap to update from any thread, plus the most recent
/// samples for exact short-term quantiles.
pub struct RttHistogram {
    /// One per bound in [`RTT_BUCKETS`], then +Inf. Not cumulative.
    buckets: [AtomicU64; RTT_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
    recent: Mutex<Recent>,
}

struct Recent {
    ns: [u64; RECENT],
    next: usize,
    len: usize,
}

/// A consistent copy of a histogram, in the shape exporters want.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound, samples in this bucket only); the last bound is +Inf.
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

/// Quantiles over the most recent samples (at most 128), in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RecentRtt {
    pub samples: usize,
    pub last_ms: f64,
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Default for RttHistogram {
    fn default() -> Self {
        Self {
            buckets: Default::default(),
            sum_ns: AtomicU64::new(0),
            recent: Mutex::new(Recent {
                ns: [0; RECENT],
                next: 0,
                len: 0,
            }),
        }
    }
}

impl RttHistogram {
    pub fn observe(&self, rtt: Duration) {
        let secs = rtt.as_secs_f64();
        let i = RTT_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(RTT_BUCKETS.len());
        let ns = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Relaxed);
        self.buckets[i].fetch_add(1, Relaxed);
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let next = r.next;
        r.ns[next] = ns;
        r.next = (next + 1) % RECENT;
        r.len = (r.len + 1).min(RECENT);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    /// The count is the sum of the buckets read, so `+Inf` always equals `_count`.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = RTT_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.buckets.iter().map(|b| b.load(Relaxed)))
            .collect();
        HistogramSnapshot {
            count: buckets.iter().map(|(_, n)| n).sum(),
            sum: self.sum_ns.load(Relaxed) as f64 / 1e9,
            buckets,
        }
    }

    /// Exact quantiles (nearest rank) of the recent samples; None before the first.
    pub fn recent(&self) -> Option<RecentRtt> {
        let r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if r.len == 0 {
            return None;
        }
        let last = r.ns[(r.next + RECENT - 1) % RECENT];
        let mut v: Vec<u64> = if r.len < RECENT {
            r.ns[..r.len].to_vec()
        } else {
            r.ns.to_vec()
        };
        drop(r);
        v.sort_unstable();
        let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        let ms = |ns: u64| ns as f64 / 1e6;
        Some(RecentRtt {
            samples: v.len(),
            last_ms: ms(last),
            min_ms: ms(v[0]),
            p50_ms: ms(rank(0.5)),
            p99_ms: ms(rank(0.99)),
            max_ms: ms(v[v.len() - 1]),
        })
    }
}

/// One RTT histogram per [`RttSource`].
#[derive(Default)]
pub struct RttStats([RttHistogram; RttSource::ALL.len()]);

impl RttStats {
    pub fn get(&self, source: RttSource) -> &RttHistogram {
        &self.0[source as usize]
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

    #[test]
    fn rtt_histogram_buckets_and_quantiles() {
        let h = RttHistogram::default();
        assert_eq!(h.recent(), None);
        for us in [50, 150, 150, 900, 3_000_000] {
            h.observe(Duration::from_micros(us));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.buckets.len(), RTT_BUCKETS.len() + 1);
        assert_eq!(s.buckets[0], (0.0001, 1));
        assert_eq!(s.buckets[1], (0.0002, 2));
        assert_eq!(s.buckets[3], (0.001, 1));
        assert_eq!(s.buckets[14], (5.0, 1));
        assert!(s.buckets[16].0.is_infinite());
        assert!((s.sum - 3.00125).abs() < 1e-9);
        let r = h.recent().unwrap();
        assert_eq!(r.samples, 5);
        assert_eq!(r.last_ms, 3000.0);
        assert_eq!(r.min_ms, 0.05);
        assert_eq!(r.p50_ms, 0.15);
        assert_eq!(r.p99_ms, 3000.0);
        // Only the most recent samples feed the quantiles.
        for _ in 0..RECENT {
            h.observe(Duration::from_millis(2));
        }
        assert_eq!(h.recent().unwrap().max_ms, 2.0);
        assert_eq!(h.count(), 5 + RECENT as u64);
    }
}
