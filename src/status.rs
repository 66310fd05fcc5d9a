//! What `sitewire status` shows: built by the daemon, sent as JSON over the control
//! socket, rendered by the CLI.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::dataplane::wg::WgTunnel;
use crate::dataplane::Dataplane;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteStatus {
    pub site: String,
    pub interface: String,
    pub public_key: String,
    pub listen_port: u16,
    pub uptime_secs: u64,
    /// Drops not attributable to one tunnel, by reason.
    pub drops: BTreeMap<String, u64>,
    pub tunnels: Vec<TunnelStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelStatus {
    pub name: String,
    pub protocol: String,
    pub keying: String,
    pub state: String,
    pub endpoint: Option<String>,
    pub peer_public_key: String,
    pub local_subnets: Vec<String>,
    pub remote_subnets: Vec<String>,
    /// Unix time of the latest handshake.
    pub last_handshake: Option<u64>,
    pub last_handshake_age_secs: Option<u64>,
    pub handshakes: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_inner_packets: u64,
    pub tx_inner_packets: u64,
    pub handshake_rtt_ms: Option<u32>,
    pub estimated_loss: f32,
    pub persistent_keepalive_secs: Option<u16>,
    pub drops: BTreeMap<String, u64>,
}

fn to_strings<T: ToString>(v: &[T]) -> Vec<String> {
    v.iter().map(ToString::to_string).collect()
}

impl TunnelStatus {
    pub fn of(t: &WgTunnel, now: SystemTime) -> Self {
        let (hs_sec, hs_nsec) = t.last_handshake();
        let last = (hs_sec > 0).then_some(hs_sec);
        let age = last.map(|_| {
            let at = UNIX_EPOCH + std::time::Duration::new(hs_sec, hs_nsec);
            now.duration_since(at).map_or(0, |d| d.as_secs())
        });
        let (rtt, loss) = t.rtt_and_loss();
        let state = serde_json::to_value(t.state())
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        Self {
            name: t.spec.name.clone(),
            protocol: "wireguard".into(),
            keying: "static".into(),
            state,
            endpoint: t.endpoint().map(|e| e.to_string()),
            peer_public_key: t.spec.peer_public_key.to_base64(),
            local_subnets: to_strings(&t.spec.local_subnets),
            remote_subnets: to_strings(&t.spec.remote_subnets),
            last_handshake: last,
            last_handshake_age_secs: age,
            handshakes: t.stats.handshakes.load(Relaxed),
            rx_bytes: t.stats.rx_bytes.load(Relaxed),
            tx_bytes: t.stats.tx_bytes.load(Relaxed),
            rx_packets: t.stats.rx_packets.load(Relaxed),
            tx_packets: t.stats.tx_packets.load(Relaxed),
            rx_inner_packets: t.stats.rx_inner_packets.load(Relaxed),
            tx_inner_packets: t.stats.tx_inner_packets.load(Relaxed),
            handshake_rtt_ms: rtt,
            estimated_loss: loss,
            persistent_keepalive_secs: t.spec.persistent_keepalive,
            drops: owned(t.stats.drops.snapshot()),
        }
    }
}

fn owned(m: BTreeMap<&'static str, u64>) -> BTreeMap<String, u64> {
    m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl SiteStatus {
    pub fn of(site: &str, interface: &str, dp: &Dataplane, started: SystemTime) -> Self {
        let now = SystemTime::now();
        Self {
            site: site.to_owned(),
            interface: interface.to_owned(),
            public_key: dp.public.to_base64(),
            listen_port: dp.listen_port,
            uptime_secs: started.elapsed().map_or(0, |d| d.as_secs()),
            drops: owned(dp.drops.snapshot()),
            tunnels: dp
                .tunnels
                .load()
                .list
                .iter()
                .map(|t| TunnelStatus::of(t, now))
                .collect(),
        }
    }

    /// The human-readable table.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "site {} (interface {}, port {}, public key {}, up {})",
            self.site,
            self.interface,
            self.listen_port,
            self.public_key,
            human_duration(self.uptime_secs)
        );
        if !self.drops.is_empty() {
            let _ = writeln!(s, "  site drops: {}", fmt_map(&self.drops));
        }
        let _ = writeln!(
            s,
            "  {:<16} {:<10} {:<22} {:<12} {:>10} {:>10} {:>9} {:>9}",
            "TUNNEL", "STATE", "ENDPOINT", "HANDSHAKE", "RX", "TX", "RX PKTS", "TX PKTS"
        );
        for t in &self.tunnels {
            let hs = t.last_handshake_age_secs.map_or_else(
                || "never".to_owned(),
                |a| format!("{} ago", human_duration(a)),
            );
            let _ = writeln!(
                s,
                "  {:<16} {:<10} {:<22} {:<12} {:>10} {:>10} {:>9} {:>9}",
                t.name,
                t.state,
                t.endpoint.as_deref().unwrap_or("(none)"),
                hs,
                human_bytes(t.rx_bytes),
                human_bytes(t.tx_bytes),
                t.rx_packets,
                t.tx_packets
            );
            let _ = writeln!(
                s,
                "  {:<16} {} {} <-> {}{}{}",
                "",
                t.protocol,
                join_or(&t.local_subnets, "any"),
                t.remote_subnets.join(","),
                t.handshake_rtt_ms
                    .map_or_else(String::new, |r| format!(", handshake rtt {r} ms")),
                if t.drops.is_empty() {
                    String::new()
                } else {
                    format!(", drops: {}", fmt_map(&t.drops))
                }
            );
        }
        s
    }
}

fn join_or(v: &[String], empty: &str) -> String {
    if v.is_empty() {
        empty.to_owned()
    } else {
        v.join(",")
    }
}

fn fmt_map(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(125), "2m5s");
        assert_eq!(human_duration(7300), "2h1m");
        assert_eq!(human_duration(90000), "1d1h");
    }
}
