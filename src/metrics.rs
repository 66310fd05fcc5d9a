//! Prometheus metrics: one registry per site, filled at scrape time from per-tunnel
//! snapshots, served on `[metrics] listen`.
//!
//! Nothing here runs on the packet path. The data plane keeps plain atomic counters
//! ([`crate::dataplane::stats`]); on each scrape a [`Collector`] asks a
//! [`SnapshotSource`] for a [`SiteSnapshot`] and encodes it. Counters are therefore true
//! counters (they only reset with the process), and any tunnel kind that can describe
//! itself as a [`TunnelSnapshot`] gets the same metric schema.
//!
//! Every family in [`FAMILIES`] is announced (HELP and TYPE) on every scrape, even with
//! no samples, so dashboards and alert rules can be checked against the names. Samples
//! are emitted only where the daemon has a source for them: no fake zeros for Vault or
//! IKE rekeys before those exist, no handshake timestamp before the first handshake.
//!
//! Labels: `tunnel` (the configured name) and small fixed enums only, never addresses
//! or keys.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::config::{Config, KeyRef};
use crate::dataplane::stats::{DropReason, HistogramSnapshot, RttSource};
use crate::dataplane::wg::{TunnelState, WgTunnel};
use crate::dataplane::Dataplane;

/// Prefix of every metric name.
pub const PREFIX: &str = "sitewire";

/// WireGuard's REKEY_AFTER_TIME: the initiator renegotiates a session this old.
const WG_REKEY_AFTER: Duration = Duration::from_secs(120);

/// Content type of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One metric family: name without the prefix (counters without `_total`), type, help.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub name: &'static str,
    pub kind: MetricType,
    pub help: &'static str,
}

const fn family(name: &'static str, kind: MetricType, help: &'static str) -> Family {
    Family { name, kind, help }
}

use MetricType::{Counter, Gauge, Histogram};

pub const TUNNEL_INFO: Family = family(
    "tunnel_info",
    Gauge,
    "Configured tunnels (always 1), with protocol and keying",
);
pub const TUNNEL_UP: Family = family(
    "tunnel_up",
    Gauge,
    "1 if the tunnel has a session that can carry data, else 0",
);
pub const RX_BYTES: Family = family(
    "tunnel_rx_bytes",
    Counter,
    "Bytes received from the peer (UDP payload on the wire, as wg show counts them)",
);
pub const TX_BYTES: Family = family(
    "tunnel_tx_bytes",
    Counter,
    "Bytes sent to the peer (UDP payload on the wire, as wg show counts them)",
);
pub const RX_PACKETS: Family = family(
    "tunnel_rx_packets",
    Counter,
    "Datagrams received from the peer",
);
pub const TX_PACKETS: Family = family("tunnel_tx_packets", Counter, "Datagrams sent to the peer");
pub const TUNNEL_DROPS: Family = family(
    "tunnel_dropped_packets",
    Counter,
    "Packets of this tunnel dropped, by reason",
);
pub const SITE_DROPS: Family = family(
    "site_dropped_packets",
    Counter,
    "Packets dropped before any tunnel could be identified, by reason",
);
pub const LAST_HANDSHAKE: Family = family(
    "tunnel_last_handshake_timestamp_seconds",
    Gauge,
    "Unix time of the latest completed handshake (absent until the first)",
);
pub const HANDSHAKES: Family = family(
    "tunnel_handshakes",
    Counter,
    "Handshakes by result: success (completed, either side initiated), timeout (our initiation went unanswered), rejected (failed authentication or replay checks)",
);
pub const REKEYS: Family = family(
    "tunnel_rekeys",
    Counter,
    "IKE rekeys by result (IKE-keyed tunnels only)",
);
pub const DPD_DEAD: Family = family(
    "tunnel_dpd_dead",
    Counter,
    "Dead-peer detections (IKE DPD, or probe silence for the DPD timeout)",
);
pub const RTT: Family = family(
    "tunnel_rtt_seconds",
    Histogram,
    "Round-trip time by source: ike (request/response), wireguard_handshake (initiation to response), probe (ICMP echo through the tunnel)",
);
pub const LOSS: Family = family(
    "tunnel_loss_ratio",
    Gauge,
    "Estimated packet loss 0..1 by source: probe (last 20 probes), wireguard (receive counter gaps of the current sessions)",
);
pub const PROBES: Family = family(
    "tunnel_probes",
    Counter,
    "Data-path probes by result: answered, lost",
);
pub const NEXT_REKEY: Family = family(
    "tunnel_next_rekey_seconds",
    Gauge,
    "Seconds until the current keys are due for renegotiation; negative when overdue (WireGuard: session age vs REKEY_AFTER_TIME, renegotiated on the next packet)",
);
pub const KEY_AGE: Family = family(
    "key_age_seconds",
    Gauge,
    "Age of key material: key=site (the site private key), key=psk (a tunnel's preshared key); file keys by modification time, a Vault-held site key since it came into use",
);
pub const VAULT_UP: Family = family(
    "vault_up",
    Gauge,
    "1 if the last Vault/OpenBao request succeeded (only with Vault key references)",
);
pub const VAULT_REQUESTS: Family = family(
    "vault_requests",
    Counter,
    "Vault/OpenBao requests by operation and result",
);

/// Every family the daemon registers, in output order.
pub const FAMILIES: [Family; 20] = [
    TUNNEL_INFO,
    TUNNEL_UP,
    RX_BYTES,
    TX_BYTES,
    RX_PACKETS,
    TX_PACKETS,
    TUNNEL_DROPS,
    SITE_DROPS,
    LAST_HANDSHAKE,
    HANDSHAKES,
    REKEYS,
    DPD_DEAD,
    RTT,
    LOSS,
    PROBES,
    NEXT_REKEY,
    KEY_AGE,
    VAULT_UP,
    VAULT_REQUESTS,
    family(
        "scrape_duration_seconds",
        Gauge,
        "Time the previous scrape of this endpoint took to collect",
    ),
];

impl Family {
    /// The exposed family name, as the Prometheus text format prints it in HELP/TYPE
    /// (counters with `_total`).
    pub fn exposed_name(&self) -> String {
        match self.kind {
            Counter => format!("{PREFIX}_{}_total", self.name),
            _ => format!("{PREFIX}_{}", self.name),
        }
    }
}

/// Everything a scrape reports about one tunnel, whatever its kind. `None` / empty
/// means "no source for this", and produces no sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TunnelSnapshot {
    pub name: String,
    /// `wireguard` | `ipsec`
    pub protocol: &'static str,
    /// `static` | `ike`
    pub keying: &'static str,
    pub up: bool,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// By reason (every reason of the kind, zeros included).
    pub drops: Vec<(&'static str, u64)>,
    /// Unix seconds of the latest handshake.
    pub last_handshake: Option<f64>,
    /// By result.
    pub handshakes: Vec<(&'static str, u64)>,
    /// By result.
    pub rekeys: Vec<(&'static str, u64)>,
    pub dpd_dead: Option<u64>,
    pub rtt: Vec<(RttSource, HistogramSnapshot)>,
    /// By source (`probe`, `wireguard`, `ike`).
    pub loss: Vec<(&'static str, f64)>,
    /// By result (`answered`, `lost`).
    pub probes: Vec<(&'static str, u64)>,
    pub next_rekey_secs: Option<f64>,
}

/// Age of one piece of key material.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyAge {
    /// `site` | `psk`
    pub key: &'static str,
    /// None for site-wide keys.
    pub tunnel: Option<String>,
    pub age_secs: f64,
}

/// Vault client figures (when a Vault client exists).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VaultSnapshot {
    pub up: bool,
    /// (op, result, count)
    pub requests: Vec<(&'static str, &'static str, u64)>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SiteSnapshot {
    pub tunnels: Vec<TunnelSnapshot>,
    pub drops: Vec<(&'static str, u64)>,
    pub keys: Vec<KeyAge>,
    pub vault: Option<VaultSnapshot>,
}

/// Anything that can describe a site at scrape time.
pub trait SnapshotSource: Send + Sync + 'static {
    fn snapshot(&self) -> SiteSnapshot;
}

/// The collector behind the registry: reads a fresh snapshot on every scrape.
struct SiteCollector {
    source: Arc<dyn SnapshotSource>,
    /// Nanoseconds the previous collection took.
    last_duration_ns: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for SiteCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SiteCollector")
    }
}

/// The site's registry: all of [`FAMILIES`], read from `source` on each scrape.
pub fn registry(source: Arc<dyn SnapshotSource>) -> Registry {
    let mut reg = Registry::with_prefix(PREFIX);
    reg.register_collector(Box::new(SiteCollector {
        source,
        last_duration_ns: Default::default(),
    }));
    reg
}

/// Encodes the registry as OpenMetrics text (`openmetrics`) or Prometheus text 0.0.4.
pub fn render(registry: &Registry, openmetrics: bool) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let res = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
    };
    if let Err(e) = res {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    out
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// Writes one family: the descriptor always, then each sample.
fn write_family<'a>(
    enc: &mut DescriptorEncoder<'_>,
    fam: &Family,
    samples: impl IntoIterator<Item = (Labels<'a>, Sample<'a>)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = enc.encode_descriptor(fam.name, fam.help, None, fam.kind)?;
    for (labels, sample) in samples {
        let mut m = metric.encode_family(&labels)?;
        match sample {
            Sample::Counter(v) => m.encode_counter::<NoLabelSet, u64, u64>(&v, None)?,
            Sample::Gauge(v) => m.encode_gauge(&v)?,
            Sample::Histogram(h) => {
                m.encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?
            }
        }
    }
    Ok(())
}

/// A sample with one extra label besides `tunnel`: (label, value, sample).
type LabelledSample<'a> = (&'static str, &'a str, Sample<'a>);

fn per_tunnel<'a>(
    ts: &'a [TunnelSnapshot],
    f: &dyn Fn(&'a TunnelSnapshot) -> Option<Sample<'a>>,
) -> Vec<(Labels<'a>, Sample<'a>)> {
    ts.iter()
        .filter_map(|t| f(t).map(|s| (vec![("tunnel", t.name.as_str())], s)))
        .collect()
}

fn by_label<'a>(
    ts: &'a [TunnelSnapshot],
    f: &dyn Fn(&'a TunnelSnapshot) -> Vec<LabelledSample<'a>>,
) -> Vec<(Labels<'a>, Sample<'a>)> {
    ts.iter()
        .flat_map(|t| {
            f(t).into_iter()
                .map(|(k, v, s)| (vec![("tunnel", t.name.as_str()), (k, v)], s))
        })
        .collect()
}

enum Sample<'a> {
    Counter(u64),
    Gauge(f64),
    Histogram(&'a HistogramSnapshot),
}

impl Collector for SiteCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let started = std::time::Instant::now();
        let snap = self.source.snapshot();
        let ts = &snap.tunnels;
        let per = |f: &dyn Fn(&TunnelSnapshot) -> Option<Sample<'_>>| per_tunnel(ts, f);
        let by = |f: &dyn Fn(&TunnelSnapshot) -> Vec<LabelledSample<'_>>| by_label(ts, f);

        write_family(
            &mut enc,
            &TUNNEL_INFO,
            ts.iter().map(|t| {
                (
                    vec![
                        ("tunnel", t.name.as_str()),
                        ("protocol", t.protocol),
                        ("keying", t.keying),
                    ],
                    Sample::Gauge(1.0),
                )
            }),
        )?;
        write_family(
            &mut enc,
            &TUNNEL_UP,
            per(&|t| Some(Sample::Gauge(if t.up { 1.0 } else { 0.0 }))),
        )?;
        write_family(
            &mut enc,
            &RX_BYTES,
            per(&|t| Some(Sample::Counter(t.rx_bytes))),
        )?;
        write_family(
            &mut enc,
            &TX_BYTES,
            per(&|t| Some(Sample::Counter(t.tx_bytes))),
        )?;
        write_family(
            &mut enc,
            &RX_PACKETS,
            per(&|t| Some(Sample::Counter(t.rx_packets))),
        )?;
        write_family(
            &mut enc,
            &TX_PACKETS,
            per(&|t| Some(Sample::Counter(t.tx_packets))),
        )?;
        write_family(
            &mut enc,
            &TUNNEL_DROPS,
            by(&|t| {
                t.drops
                    .iter()
                    .map(|&(r, n)| ("reason", r, Sample::Counter(n)))
                    .collect()
            }),
        )?;
        write_family(
            &mut enc,
            &SITE_DROPS,
            snap.drops
                .iter()
                .map(|&(r, n)| (vec![("reason", r)], Sample::Counter(n))),
        )?;
        write_family(
            &mut enc,
            &LAST_HANDSHAKE,
            per(&|t| t.last_handshake.map(Sample::Gauge)),
        )?;
        write_family(
            &mut enc,
            &HANDSHAKES,
            by(&|t| {
                t.handshakes
                    .iter()
                    .map(|&(r, n)| ("result", r, Sample::Counter(n)))
                    .collect()
            }),
        )?;
        write_family(
            &mut enc,
            &REKEYS,
            by(&|t| {
                t.rekeys
                    .iter()
                    .map(|&(r, n)| ("result", r, Sample::Counter(n)))
                    .collect()
            }),
        )?;
        write_family(
            &mut enc,
            &DPD_DEAD,
            per(&|t| t.dpd_dead.map(Sample::Counter)),
        )?;
        write_family(
            &mut enc,
            &RTT,
            by(&|t| {
                t.rtt
                    .iter()
                    .map(|(s, h)| ("source", s.as_str(), Sample::Histogram(h)))
                    .collect()
            }),
        )?;
        write_family(
            &mut enc,
            &LOSS,
            by(&|t| {
                t.loss
                    .iter()
                    .map(|&(s, v)| ("source", s, Sample::Gauge(v)))
                    .collect()
            }),
        )?;
        write_family(
            &mut enc,
            &PROBES,
            by(&|t| {
                t.probes
                    .iter()
                    .map(|&(r, n)| ("result", r, Sample::Counter(n)))
                    .collect()
            }),
        )?;
        write_family(
            &mut enc,
            &NEXT_REKEY,
            per(&|t| t.next_rekey_secs.map(Sample::Gauge)),
        )?;
        write_family(
            &mut enc,
            &KEY_AGE,
            snap.keys.iter().map(|k| {
                let mut labels = vec![("key", k.key)];
                if let Some(t) = &k.tunnel {
                    labels.push(("tunnel", t.as_str()));
                }
                (labels, Sample::Gauge(k.age_secs))
            }),
        )?;
        let vault = snap.vault.as_ref();
        write_family(
            &mut enc,
            &VAULT_UP,
            vault.map(|v| (vec![], Sample::Gauge(if v.up { 1.0 } else { 0.0 }))),
        )?;
        write_family(
            &mut enc,
            &VAULT_REQUESTS,
            vault.into_iter().flat_map(|v| {
                v.requests
                    .iter()
                    .map(|&(op, res, n)| (vec![("op", op), ("result", res)], Sample::Counter(n)))
            }),
        )?;
        let previous = self.last_duration_ns.load(Relaxed);
        write_family(
            &mut enc,
            &FAMILIES[FAMILIES.len() - 1],
            (previous > 0).then(|| (vec![], Sample::Gauge(previous as f64 / 1e9))),
        )?;
        let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_duration_ns.store(took.max(1), Relaxed);
        Ok(())
    }
}

// ---- the data plane as a snapshot source ----

/// The running site: tunnels from the data plane (whatever a reload made of them), key
/// ages from the key files' modification times.
pub struct DataplaneSource {
    dp: Arc<Dataplane>,
    site_key: Option<PathBuf>,
    vault: bool,
}

impl DataplaneSource {
    pub fn new(dp: Arc<Dataplane>, cfg: &Config) -> Self {
        let site_key = match &cfg.site.private_key {
            KeyRef::File(p) => Some(p.clone()),
            KeyRef::Vault(_) => None,
        };
        Self {
            dp,
            site_key,
            vault: crate::vault::used(cfg),
        }
    }
}

fn file_age(path: &std::path::Path, now: SystemTime) -> Option<f64> {
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
    Some(now.duration_since(mtime).map_or(0.0, |d| d.as_secs_f64()))
}

impl SnapshotSource for DataplaneSource {
    fn snapshot(&self) -> SiteSnapshot {
        let now = SystemTime::now();
        let table = self.dp.tunnels.load();
        let site = match self.site_key.as_deref() {
            Some(p) => file_age(p, now),
            // A Vault-held key: since it came into use (rotation or publication).
            None => match self.dp.key_since.load(std::sync::atomic::Ordering::Relaxed) {
                0 => None,
                since => now
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|n| n.as_secs_f64() - since as f64),
            },
        }
        .map(|age_secs| KeyAge {
            key: "site",
            tunnel: None,
            age_secs: age_secs.max(0.0),
        });
        let psks = table.list.iter().filter_map(|t| {
            Some(KeyAge {
                key: "psk",
                tunnel: Some(t.spec.name.clone()),
                age_secs: file_age(t.spec.psk_file.as_deref()?, now)?,
            })
        });
        let keys = site.into_iter().chain(psks).collect();
        SiteSnapshot {
            tunnels: table
                .list
                .iter()
                .map(|t| wg_snapshot(t))
                .chain(table.esp.iter().map(|t| esp_snapshot(t)))
                .collect(),
            drops: DropReason::ALL
                .iter()
                .map(|r| (r.as_str(), self.dp.drops.get(*r)))
                .collect(),
            keys,
            vault: self.vault.then(|| crate::vault::stats().snapshot()),
        }
    }
}

/// What an IPsec tunnel reports (same families as WireGuard tunnels: one dashboard).
pub fn esp_snapshot(t: &crate::dataplane::esp::EspTunnel) -> TunnelSnapshot {
    let s = &t.stats;
    let (sec, nsec) = t.last_handshake();
    let ike = t
        .ike_status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    TunnelSnapshot {
        name: t.spec.name.clone(),
        protocol: "ipsec",
        keying: "ike",
        up: t.is_up(),
        rekeys: vec![
            ("success", s.rekeys_ok.load(Relaxed)),
            ("failure", s.rekeys_failed.load(Relaxed)),
        ],
        dpd_dead: Some(s.dpd_dead.load(Relaxed)),
        rtt: vec![(RttSource::Ike, s.rtt.get(RttSource::Ike).snapshot())],
        loss: Vec::new(),
        probes: Vec::new(),
        next_rekey_secs: ike
            .and_then(|i| i.next_rekey_secs)
            .filter(|_| t.is_up())
            .map(|n| n as f64),
        ..counters(s, (sec, nsec))
    }
}

/// The traffic, drop and handshake counters every kind of tunnel reports; callers fill
/// in the rest.
fn counters(s: &crate::dataplane::stats::TunnelStats, (sec, nsec): (u64, u32)) -> TunnelSnapshot {
    TunnelSnapshot {
        name: String::new(),
        protocol: "",
        keying: "",
        up: false,
        rx_bytes: s.rx_bytes.load(Relaxed),
        tx_bytes: s.tx_bytes.load(Relaxed),
        rx_packets: s.rx_packets.load(Relaxed),
        tx_packets: s.tx_packets.load(Relaxed),
        drops: DropReason::ALL
            .iter()
            .map(|r| (r.as_str(), s.drops.get(*r)))
            .collect(),
        last_handshake: (sec > 0).then(|| sec as f64 + f64::from(nsec) / 1e9),
        handshakes: vec![
            ("success", s.handshakes.load(Relaxed)),
            ("timeout", s.handshake_timeouts.load(Relaxed)),
            ("rejected", s.handshake_rejects.load(Relaxed)),
        ],
        rekeys: Vec::new(),
        dpd_dead: Some(s.dpd_dead.load(Relaxed)),
        rtt: Vec::new(),
        loss: Vec::new(),
        probes: Vec::new(),
        next_rekey_secs: None,
    }
}

/// What a WireGuard tunnel reports.
pub fn wg_snapshot(t: &WgTunnel) -> TunnelSnapshot {
    let s = &t.stats;
    let (sec, nsec) = t.last_handshake();
    let age = t.session_age();
    let has_session = age.is_some_and(|a| a < crate::dataplane::wg::SESSION_LIFETIME);
    let mut rtt = vec![(
        RttSource::WireguardHandshake,
        s.rtt.get(RttSource::WireguardHandshake).snapshot(),
    )];
    let mut loss = Vec::new();
    let mut probes = Vec::new();
    if let Some(p) = &t.probe {
        rtt.push((RttSource::Probe, s.rtt.get(RttSource::Probe).snapshot()));
        if let Some(l) = p.loss_ratio() {
            loss.push(("probe", l));
        }
        let c = p.counts();
        probes = vec![("answered", c.received), ("lost", c.lost)];
    }
    if has_session {
        loss.push(("wireguard", f64::from(t.rtt_and_loss().1)));
    }
    TunnelSnapshot {
        name: t.spec.name.clone(),
        protocol: "wireguard",
        keying: if t.spec.ike { "ike" } else { "static" },
        up: t.state() == TunnelState::Up,
        rekeys: if t.spec.ike {
            vec![
                ("success", s.rekeys_ok.load(Relaxed)),
                ("failure", s.rekeys_failed.load(Relaxed)),
            ]
        } else {
            Vec::new()
        },
        // Every tunnel has DPD: IKE liveness, the probe, or the passive WireGuard check.
        dpd_dead: Some(s.dpd_dead.load(Relaxed)),
        rtt,
        loss,
        probes,
        next_rekey_secs: age
            .filter(|_| has_session)
            .map(|a| WG_REKEY_AFTER.as_secs_f64() - a.as_secs_f64()),
        ..counters(s, (sec, nsec))
    }
}

// ---- HTTP ----

/// Does the scraper accept OpenMetrics? (Prometheus asks for it first; curl and
/// promtool get the classic text format.)
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut params = part.split(';').map(str::trim);
            let media = params.next().unwrap_or("");
            let q_zero = params.any(|p| p.replace(' ', "") == "q=0");
            media.eq_ignore_ascii_case("application/openmetrics-text") && !q_zero
        })
    })
}

async fn metrics_handler(
    State(registry): State<Arc<Registry>>,
    headers: HeaderMap,
) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let openmetrics = wants_openmetrics(accept);
    // Collection takes locks the packet threads also take: keep it off the runtime.
    let body = tokio::task::spawn_blocking(move || render(&registry, openmetrics)).await;
    match body {
        Ok(body) => {
            let ct = if openmetrics {
                OPENMETRICS_CONTENT_TYPE
            } else {
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE
            };
            (StatusCode::OK, [(header::CONTENT_TYPE, ct)], body)
        }
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "collecting metrics failed\n".to_string(),
        ),
    }
}

async fn index() -> &'static str {
    "sitewire: metrics at /metrics\n"
}

/// Binds `[metrics] listen` (if configured) and serves it in the background. Fails
/// when the address cannot be bound, so a typo does not go unnoticed.
pub async fn start(cfg: &Config, dp: Arc<Dataplane>) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let Some(m) = &cfg.metrics else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(m.listen)
        .await
        .with_context(|| format!("metrics.listen: binding {}", m.listen))?;
    let source = Arc::new(DataplaneSource::new(dp, cfg));
    let registry = Arc::new(registry(source));
    tracing::info!(listen = %m.listen, "serving Prometheus metrics at /metrics");
    tokio::spawn(serve(listener, registry));
    Ok(())
}

/// Serves `/metrics` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>) {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics_handler))
        .route("/", axum::routing::get(index))
        .with_state(registry);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics endpoint stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(SiteSnapshot);

    impl SnapshotSource for Fixed {
        fn snapshot(&self) -> SiteSnapshot {
            self.0.clone()
        }
    }

    fn sample_site() -> SiteSnapshot {
        let h = crate::dataplane::stats::RttHistogram::default();
        h.observe(Duration::from_micros(300));
        SiteSnapshot {
            tunnels: vec![TunnelSnapshot {
                name: "branch".into(),
                protocol: "wireguard",
                keying: "static",
                up: true,
                rx_bytes: 1000,
                tx_bytes: 2000,
                rx_packets: 10,
                tx_packets: 20,
                drops: vec![("no_route", 3)],
                last_handshake: Some(1_700_000_000.5),
                handshakes: vec![("success", 2), ("timeout", 1)],
                rekeys: vec![],
                dpd_dead: None,
                rtt: vec![(RttSource::Probe, h.snapshot())],
                loss: vec![("probe", 0.25)],
                probes: vec![("answered", 3), ("lost", 1)],
                next_rekey_secs: Some(-5.0),
            }],
            drops: vec![("malformed", 4)],
            keys: vec![KeyAge {
                key: "site",
                tunnel: None,
                age_secs: 86400.0,
            }],
            vault: None,
        }
    }

    fn text(site: SiteSnapshot, openmetrics: bool) -> String {
        render(&registry(Arc::new(Fixed(site))), openmetrics)
    }

    #[test]
    fn every_family_is_announced_even_without_samples() {
        for om in [false, true] {
            let out = text(SiteSnapshot::default(), om);
            for f in FAMILIES {
                let name = if om {
                    format!("{PREFIX}_{}", f.name)
                } else {
                    f.exposed_name()
                };
                assert!(
                    out.contains(&format!("# HELP {name} ")),
                    "no HELP for {name} (openmetrics={om}):\n{out}"
                );
                assert!(
                    out.contains(&format!("# TYPE {name} ")),
                    "no TYPE for {name}"
                );
            }
            // ...and nothing else: no samples at all.
            let samples: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
            assert!(samples.is_empty(), "{samples:?}");
        }
    }

    /// prometheus-client skips a registered `Family` that has no samples (HELP and TYPE
    /// too), which is why the site uses a collector that writes descriptors itself.
    #[test]
    fn registered_empty_family_is_silent_upstream() {
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::family::Family as PcFamily;
        let mut reg = Registry::default();
        let f = PcFamily::<Vec<(String, String)>, Counter>::default();
        reg.register("lonely", "no samples", f);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert_eq!(out, "# EOF\n");
    }

    #[test]
    fn samples_in_both_formats() {
        let prom = text(sample_site(), false);
        for line in [
            "sitewire_tunnel_info{tunnel=\"branch\",protocol=\"wireguard\",keying=\"static\"} 1.0",
            "sitewire_tunnel_up{tunnel=\"branch\"} 1.0",
            "sitewire_tunnel_rx_bytes_total{tunnel=\"branch\"} 1000",
            "sitewire_tunnel_dropped_packets_total{tunnel=\"branch\",reason=\"no_route\"} 3",
            "sitewire_site_dropped_packets_total{reason=\"malformed\"} 4",
            "sitewire_tunnel_last_handshake_timestamp_seconds{tunnel=\"branch\"} 1700000000.5",
            "sitewire_tunnel_handshakes_total{tunnel=\"branch\",result=\"timeout\"} 1",
            "sitewire_tunnel_rtt_seconds_bucket{tunnel=\"branch\",source=\"probe\",le=\"0.0002\"} 0",
            "sitewire_tunnel_rtt_seconds_bucket{tunnel=\"branch\",source=\"probe\",le=\"0.0005\"} 1",
            "sitewire_tunnel_rtt_seconds_bucket{tunnel=\"branch\",source=\"probe\",le=\"+Inf\"} 1",
            "sitewire_tunnel_rtt_seconds_count{tunnel=\"branch\",source=\"probe\"} 1",
            "sitewire_tunnel_loss_ratio{tunnel=\"branch\",source=\"probe\"} 0.25",
            "sitewire_tunnel_probes_total{tunnel=\"branch\",result=\"lost\"} 1",
            "sitewire_tunnel_next_rekey_seconds{tunnel=\"branch\"} -5.0",
            "sitewire_key_age_seconds{key=\"site\"} 86400.0",
        ] {
            assert!(prom.lines().any(|l| l == line), "missing {line:?} in:\n{prom}");
        }
        assert!(!prom.contains("# EOF"));
        assert!(
            !prom.lines().any(|l| l.starts_with("sitewire_vault_up")),
            "no Vault, no sample"
        );
        assert!(!prom.contains("sitewire_tunnel_dpd_dead_total{"));

        let om = text(sample_site(), true);
        assert!(om.ends_with("# EOF\n"));
        assert!(om.contains("# TYPE sitewire_tunnel_rx_bytes counter"));
        assert!(om.contains("sitewire_tunnel_rx_bytes_total{tunnel=\"branch\"} 1000"));
    }

    #[test]
    fn content_negotiation() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(Some(
            "application/openmetrics-text; q=0"
        )));
        assert!(!wants_openmetrics(None));
    }
}
