//! What `sitewire status` shows: built by the daemon, sent as JSON over the control
//! socket, rendered by the CLI.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::dataplane::stats::{RecentRtt, RttSource};
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
    /// IKE SA state, SPIs, suite, selectors, next rekey, DPD (IKE-keyed tunnels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ike: Option<crate::ikewg::IkeStatus>,
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
    /// Initiations that went unanswered / handshake messages rejected.
    #[serde(default)]
    pub handshake_timeouts: u64,
    #[serde(default)]
    pub handshake_rejects: u64,
    /// Recent RTT samples by source (`wireguard_handshake`, `probe`, `ike`), the same
    /// samples the `sitewire_tunnel_rtt_seconds` histogram counts.
    #[serde(default)]
    pub rtt: BTreeMap<String, RecentRtt>,
    /// Estimated loss 0..1 by source, as `sitewire_tunnel_loss_ratio` reports it.
    #[serde(default)]
    pub loss: BTreeMap<String, f64>,
    #[serde(default)]
    pub probe: Option<ProbeStatus>,
    /// Dead-peer events (probe silence for the DPD timeout).
    #[serde(default)]
    pub dpd_dead: u64,
}

/// The data-path probe of a tunnel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeStatus {
    pub target: String,
    pub source: String,
    pub interval_secs: f64,
    pub sent: u64,
    pub answered: u64,
    pub lost: u64,
}

fn to_strings<T: ToString>(v: &[T]) -> Vec<String> {
    v.iter().map(ToString::to_string).collect()
}

impl TunnelStatus {
    pub fn of(t: &WgTunnel, now: SystemTime) -> Self {
        let (last, age) = handshake_time(t.last_handshake(), now);
        let (rtt, loss) = t.rtt_and_loss();
        let snap = crate::metrics::wg_snapshot(t);
        let state = serde_json::to_value(t.state())
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        Self {
            name: t.spec.name.clone(),
            protocol: "wireguard".into(),
            keying: if t.spec.ike { "ike" } else { "static" }.into(),
            ike: t
                .ike_status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            state,
            endpoint: t.endpoint().map(|e| e.to_string()),
            peer_public_key: t.peer_public_key().to_base64(),
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
            handshake_timeouts: t.stats.handshake_timeouts.load(Relaxed),
            handshake_rejects: t.stats.handshake_rejects.load(Relaxed),
            rtt: RttSource::ALL
                .iter()
                .filter_map(|s| Some((s.as_str().to_owned(), t.stats.rtt.get(*s).recent()?)))
                .collect(),
            loss: snap
                .loss
                .iter()
                .map(|(s, v)| ((*s).to_owned(), *v))
                .collect(),
            probe: t.probe.as_ref().map(|p| {
                let c = p.counts();
                ProbeStatus {
                    target: p.target.to_string(),
                    source: p.source.to_string(),
                    interval_secs: p.interval.as_secs_f64(),
                    sent: c.sent,
                    answered: c.received,
                    lost: c.lost,
                }
            }),
            dpd_dead: t.stats.dpd_dead.load(Relaxed),
        }
    }
}

impl TunnelStatus {
    /// An IPsec tunnel, in the same shape (`peer_public_key` holds the peer's IKE id).
    pub fn of_esp(t: &crate::dataplane::esp::EspTunnel, now: SystemTime) -> Self {
        let (last, age) = handshake_time(t.last_handshake(), now);
        let ike = t
            .ike_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let state = if t.is_up() {
            "up"
        } else if ike.as_ref().is_some_and(|i| i.state == "connecting") {
            "connecting"
        } else if ike.as_ref().is_some_and(|i| i.state == "dead") {
            "down"
        } else {
            "waiting"
        };
        let s = &t.stats;
        Self {
            name: t.spec.name.clone(),
            protocol: "ipsec".into(),
            keying: "ike".into(),
            state: state.into(),
            endpoint: t.remote().or_else(|| t.endpoint()).map(|e| e.to_string()),
            peer_public_key: format!("id {}", t.spec.remote_id),
            local_subnets: to_strings(&t.spec.local_subnets),
            remote_subnets: to_strings(&t.spec.remote_subnets),
            last_handshake: last,
            last_handshake_age_secs: age,
            handshakes: s.handshakes.load(Relaxed),
            rx_bytes: s.rx_bytes.load(Relaxed),
            tx_bytes: s.tx_bytes.load(Relaxed),
            rx_packets: s.rx_packets.load(Relaxed),
            tx_packets: s.tx_packets.load(Relaxed),
            rx_inner_packets: s.rx_inner_packets.load(Relaxed),
            tx_inner_packets: s.tx_inner_packets.load(Relaxed),
            handshake_rtt_ms: None,
            estimated_loss: 0.0,
            persistent_keepalive_secs: None,
            drops: owned(s.drops.snapshot()),
            handshake_timeouts: s.handshake_timeouts.load(Relaxed),
            handshake_rejects: s.handshake_rejects.load(Relaxed),
            rtt: RttSource::ALL
                .iter()
                .filter_map(|r| Some((r.as_str().to_owned(), s.rtt.get(*r).recent()?)))
                .collect(),
            loss: BTreeMap::new(),
            probe: None,
            dpd_dead: s.dpd_dead.load(Relaxed),
            ike,
        }
    }
}

/// (Unix seconds, age in seconds) of the latest handshake given as (seconds, nanoseconds),
/// both None if there was none.
fn handshake_time((sec, nsec): (u64, u32), now: SystemTime) -> (Option<u64>, Option<u64>) {
    if sec == 0 {
        return (None, None);
    }
    let at = UNIX_EPOCH + std::time::Duration::new(sec, nsec);
    (
        Some(sec),
        Some(now.duration_since(at).map_or(0, |d| d.as_secs())),
    )
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
            public_key: dp.public().to_base64(),
            listen_port: dp.listen_port,
            uptime_secs: started.elapsed().map_or(0, |d| d.as_secs()),
            drops: owned(dp.drops.snapshot()),
            tunnels: dp
                .tunnels
                .load()
                .list
                .iter()
                .map(|t| TunnelStatus::of(t, now))
                .chain(
                    dp.tunnels
                        .load()
                        .esp
                        .iter()
                        .map(|t| TunnelStatus::of_esp(t, now)),
                )
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
            if let Some(line) = t.health_line() {
                let _ = writeln!(s, "  {:<16} {line}", "");
            }
            if let Some(ike) = &t.ike {
                let _ = writeln!(s, "  {:<16} {}", "", ike.render());
            }
        }
        s
    }
}

impl TunnelStatus {
    /// RTT quantiles, loss and probe results on one line (None if there are none).
    fn health_line(&self) -> Option<String> {
        let mut parts: Vec<String> = self
            .rtt
            .iter()
            .map(|(source, r)| {
                format!(
                    "rtt {source} p50 {} p99 {} ({} samples)",
                    ms(r.p50_ms),
                    ms(r.p99_ms),
                    r.samples
                )
            })
            .collect();
        if !self.loss.is_empty() {
            let loss: Vec<String> = self
                .loss
                .iter()
                .map(|(source, v)| format!("{source} {:.1}%", v * 100.0))
                .collect();
            parts.push(format!("loss {}", loss.join(" ")));
        }
        if let Some(p) = &self.probe {
            parts.push(format!(
                "probe {} answered {}/{}",
                p.target,
                p.answered,
                p.answered + p.lost
            ));
        }
        if self.dpd_dead > 0 {
            parts.push(format!("dead-peer events {}", self.dpd_dead));
        }
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}ms")
    } else {
        format!("{v:.0}ms")
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
