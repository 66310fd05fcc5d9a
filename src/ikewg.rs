//! IKE keying for WireGuard tunnels (`keying = "ike"`): drives the sans-IO IKE engine
//! with the clock, the site's UDP socket and the OS RNG, and turns its events into
//! WireGuard sessions.
//!
//! - Identities are the sites' WireGuard public keys (ID_KEY_ID); the IKE PSK is derived
//!   from the static-static X25519 result bound to both keys, so nothing extra is
//!   configured and only the holder of a tunnel's static key can authenticate.
//! - Every CHILD SA yields a 32-byte WireGuard preshared key. A new one starts a new
//!   session beside the current one; whoever made the CHILD SA (and so knows the peer has
//!   the key too) sends the first handshake. Outbound traffic moves once the new session
//!   is up; the old one keeps receiving until then (make-before-break).
//! - Dead-peer detection is IKE liveness; data received on the tunnel counts as liveness.
//!
//! The same driver runs the site's IPsec tunnels (`protocol = "ipsec"`): IKE on UDP 500,
//! floating to 4500, and every CHILD SA installed as a pair of ESP SAs in the data plane.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::sync::mpsc;

use crate::config::values::{ike_identity, IkeIdentity};
use crate::config::{DpdAction, StartAction};
use crate::dataplane::esp::{ChildSa, EspTunnel};
use crate::dataplane::stats::{RttSource, TunnelStats};
use crate::dataplane::wg::WgTunnel;
use crate::dataplane::{Dataplane, MAX_PACKET, NATT_PORT, VIA_IKE, VIA_NATT, VIA_SITE};
use crate::keys::{PrivateKey, PublicKey};
use crate::proto::esp::EspSa;
use crate::proto::ike::crypto::{self, AeadAlg};
use crate::proto::ike::engine::{
    ChildKeys, ChildKind, Endpoint, Event, Failure, PeerConfig, Rng, Timers, Via,
};
use crate::proto::ike::ts;
use crate::proto::ike::wire::{ids, ts_from_subnet, Identity, TrafficSelector};

/// OS randomness for the engine.
pub struct OsRng;

impl Rng for OsRng {
    fn fill(&mut self, buf: &mut [u8]) {
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, buf);
    }
}

/// Queue of IKE datagrams from the UDP thread.
pub const QUEUE: usize = 256;

fn key_id(k: &PublicKey) -> Identity {
    Identity {
        ty: ids::ID_KEY_ID,
        data: k.as_bytes().to_vec(),
    }
}

/// The IKE PSK of a tunnel: prf(X25519(ours, theirs), label | lower key | higher key).
/// Both sites compute the same value; nobody else can.
pub fn derive_psk(private: &PrivateKey, peer: &PublicKey) -> Option<zeroize::Zeroizing<Vec<u8>>> {
    let ours = private.public_key();
    let dh =
        crypto::X25519Secret::from_bytes(*private.as_bytes()).diffie_hellman(peer.as_bytes())?;
    let (lo, hi) = if ours.as_bytes() < peer.as_bytes() {
        (ours, *peer)
    } else {
        (*peer, ours)
    };
    let psk = crypto::prf(
        &dh[..],
        &[
            b"sitewire ike-keyed wireguard psk v1",
            lo.as_bytes(),
            hi.as_bytes(),
        ],
    );
    Some(zeroize::Zeroizing::new(psk.to_vec()))
}

/// An identity written as strongSwan writes `id` (validated by the config reader).
pub fn identity(s: &str) -> Identity {
    let (ty, data) = match ike_identity(s) {
        Ok(IkeIdentity::Ipv4(a)) => (ids::ID_IPV4, a.octets().to_vec()),
        Ok(IkeIdentity::Ipv6(a)) => (ids::ID_IPV6, a.octets().to_vec()),
        Ok(IkeIdentity::Email(e)) => (ids::ID_RFC822, e.into_bytes()),
        Ok(IkeIdentity::KeyId(k)) => (ids::ID_KEY_ID, k),
        Ok(IkeIdentity::Fqdn(f)) => (ids::ID_FQDN, f.into_bytes()),
        Err(_) => (ids::ID_FQDN, s.as_bytes().to_vec()),
    };
    Identity { ty, data }
}

/// Private-use notify (RFC 7296 §3.10.1) announcing the sender's next static key:
/// 32-byte X25519 public key | 8-byte big-endian Unix time it is used from.
pub const NOTIFY_STATIC_KEY: u16 = 40961;
/// After our static key switched, the CHILD SA is rekeyed this much later, so the peer
/// (which switches on its once-a-second check) uses the new key too.
const REKEY_AFTER_SWITCH: Duration = Duration::from_secs(2);

/// An idle IPsec tunnel sends a NAT-T keepalive this often (strongSwan's default).
const NATT_KEEPALIVE: Duration = Duration::from_secs(20);

/// Pause after a failed negotiation before the tunnel initiates again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

fn selectors(nets: &[IpNet]) -> Vec<TrafficSelector> {
    if nets.is_empty() {
        // "any local source", as for plain WireGuard tunnels.
        return vec![
            ts_from_subnet(IpNet::V4(ipnet::Ipv4Net::default())),
            ts_from_subnet(IpNet::V6(ipnet::Ipv6Net::default())),
        ];
    }
    nets.iter().map(|n| ts_from_subnet(*n)).collect()
}

/// Address ranges back to prefixes (a narrowed range need not be one prefix).
pub fn ts_to_nets(sel: &[TrafficSelector]) -> Vec<IpNet> {
    let mut out = Vec::new();
    for s in sel {
        match (s.start, s.end) {
            (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b)) => {
                out.extend(ipnet::Ipv4Subnets::new(a, b, 0).map(IpNet::V4));
            }
            (std::net::IpAddr::V6(a), std::net::IpAddr::V6(b)) => {
                out.extend(ipnet::Ipv6Subnets::new(a, b, 0).map(IpNet::V6));
            }
            _ => {}
        }
    }
    out
}

/// What `status` shows about a tunnel's IKE side.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct IkeStatus {
    pub state: String,
    pub spi_i: Option<String>,
    pub spi_r: Option<String>,
    pub suite: Option<String>,
    pub initiator: Option<bool>,
    pub child_sas: usize,
    pub pfs: bool,
    /// The IKE SA (and so every PSK) includes the ML-KEM-768 exchange.
    pub pq: bool,
    pub local_ts: Vec<String>,
    pub remote_ts: Vec<String>,
    pub next_rekey_secs: Option<u64>,
    pub rekeys: u64,
    pub last_error: Option<String>,
    pub dpd: String,
    /// IPsec: the newest CHILD SA's ESP cipher and SPIs (ours inbound, the peer's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub esp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spi_in: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spi_out: Option<String>,
    /// IPsec: where IKE and ESP go (after the float to 4500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

impl IkeStatus {
    /// One line for the status table.
    pub fn render(&self) -> String {
        let mut parts = vec![format!("ike {}", self.state)];
        if let (Some(i), Some(r), Some(suite)) = (&self.spi_i, &self.spi_r, &self.suite) {
            parts.push(format!("spi {i}/{r} {suite}"));
        }
        if let (Some(esp), Some(i), Some(o)) = (&self.esp, &self.spi_in, &self.spi_out) {
            parts.push(format!("esp {esp} spi in {i} out {o}"));
        }
        if let Some(peer) = &self.peer {
            parts.push(format!("peer {peer}"));
        }
        parts.push(format!(
            "pfs {}, pq {}",
            if self.pfs { "on" } else { "off" },
            if self.pq { "on" } else { "off" }
        ));
        if !self.local_ts.is_empty() {
            parts.push(format!(
                "ts {} <-> {}",
                self.local_ts.join(","),
                self.remote_ts.join(",")
            ));
        }
        if let Some(n) = self.next_rekey_secs {
            parts.push(format!("rekey in {n}s ({} done)", self.rekeys));
        }
        parts.push(format!("dpd {}", self.dpd));
        if let Some(e) = &self.last_error {
            parts.push(format!("error: {e}"));
        }
        parts.join(", ")
    }
}

/// The data-plane side of an IKE-driven tunnel.
enum Kind {
    Wg(Arc<WgTunnel>),
    Esp(Arc<EspTunnel>),
}

struct Tunnel {
    name: String,
    kind: Kind,
    action: DpdAction,
    start: StartAction,
    last_rx_packets: u64,
    rekeys: u64,
    last_error: Option<String>,
    dead: bool,
    /// No new initiation before this (after a failure).
    retry_at: Option<Instant>,
    /// IPsec: ESP datagrams sent as of the last check, and when that count last moved
    /// (NAT-T keepalives go out when it stands still).
    last_tx: (u64, Instant),
    /// IKE-keyed WireGuard: the peer's next static key and when (Unix seconds) it is used.
    pending_peer: Option<(PublicKey, u64)>,
    /// Rekey the CHILD SA at this time (after a static key switch).
    rekey_at: Option<Instant>,
}

impl Tunnel {
    fn new(name: &str, kind: Kind, action: DpdAction, start: StartAction) -> Self {
        Self {
            name: name.to_string(),
            kind,
            action,
            start,
            last_rx_packets: 0,
            rekeys: 0,
            last_error: None,
            dead: false,
            retry_at: None,
            last_tx: (0, Instant::now()),
            pending_peer: None,
            rekey_at: None,
        }
    }

    fn stats(&self) -> &TunnelStats {
        match &self.kind {
            Kind::Wg(t) => &t.stats,
            Kind::Esp(t) => &t.stats,
        }
    }

    fn endpoint(&self) -> Option<SocketAddr> {
        match &self.kind {
            Kind::Wg(t) => t.endpoint(),
            Kind::Esp(t) => t.endpoint(),
        }
    }

    fn publish(&self, st: IkeStatus) {
        let slot = match &self.kind {
            Kind::Wg(t) => &t.ike_status,
            Kind::Esp(t) => &t.ike_status,
        };
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(st);
    }

    /// Whether housekeeping should (re)start the IKE SA now.
    fn wants_ike(&self, now: Instant) -> bool {
        if self.retry_at.is_some_and(|t| now < t) {
            return false;
        }
        if self.dead && self.action == DpdAction::Clear {
            return false;
        }
        match (&self.kind, self.start) {
            (_, StartAction::Start) => true,
            (Kind::Esp(t), StartAction::Trap) => t.wants_sa.load(Relaxed),
            _ => false,
        }
    }
}

/// Commands from the control socket.
pub enum Command {
    /// The site's static key is replaced at `not_before` (Unix seconds): tell every
    /// IKE-keyed peer over its IKE SA.
    AnnounceKey { public: PublicKey, not_before: u64 },
    /// The site's static key was just replaced: new IKE identity and PSK, then a CHILD SA
    /// rekey so that a WireGuard session under the new keys takes over.
    KeySwitched,
    Rotate {
        tunnel: String,
        reply: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    Status {
        reply: tokio::sync::oneshot::Sender<Vec<(String, IkeStatus)>>,
    },
}

pub struct Driver {
    ep: Endpoint,
    tunnels: Vec<Tunnel>,
    dp: Arc<Dataplane>,
    rng: OsRng,
    out: Vec<u8>,
}

fn esp_name(a: AeadAlg) -> String {
    match a {
        AeadAlg::ChaCha20Poly1305 => "chacha20poly1305".into(),
        AeadAlg::AesGcm16 { key_bits } => format!("aes{key_bits}gcm16"),
    }
}

fn suite_name(a: AeadAlg) -> String {
    match a {
        AeadAlg::ChaCha20Poly1305 => "chacha20poly1305-prfsha256-x25519".into(),
        AeadAlg::AesGcm16 { key_bits } => format!("aes{key_bits}gcm16-prfsha256-x25519"),
    }
}

impl Driver {
    /// A driver for the site's IKE-keyed and IPsec tunnels; None if there are none.
    pub fn new(dp: Arc<Dataplane>) -> Option<Self> {
        let table = dp.tunnels.load();
        let mut peers = Vec::new();
        let mut tunnels = Vec::new();
        for t in table.list.iter().filter(|t| t.spec.ike) {
            let Some(psk) = derive_psk(&dp.private(), &t.peer_public_key()) else {
                tracing::error!(tunnel = %t.spec.name, "peer public key is a low-order point: IKE keying impossible");
                continue;
            };
            let dpd = t.spec.dpd;
            peers.push(PeerConfig {
                name: t.spec.name.clone(),
                local_id: key_id(&dp.public()),
                remote_id: key_id(&t.peer_public_key()),
                psk,
                ike_aeads: vec![
                    AeadAlg::ChaCha20Poly1305,
                    AeadAlg::AesGcm16 { key_bits: 256 },
                ],
                child_aeads: vec![AeadAlg::ChaCha20Poly1305],
                child_pfs: true,
                pq: t.spec.post_quantum,
                local_ts: selectors(&t.spec.local_subnets),
                remote_ts: selectors(&t.spec.remote_subnets),
                child_kind: ChildKind::WireGuardPsk,
                timers: timers(dpd, t.spec.rekey_interval),
                remote_addr: t.endpoint(),
                via: VIA_SITE,
                nat_t: None,
            });
            tunnels.push(Tunnel::new(
                &t.spec.name,
                Kind::Wg(t.clone()),
                dpd.action,
                StartAction::Start,
            ));
        }
        for t in &table.esp {
            let spec = &t.spec;
            peers.push(PeerConfig {
                name: spec.name.clone(),
                local_id: identity(&spec.local_id),
                remote_id: identity(&spec.remote_id),
                psk: spec.psk.clone(),
                ike_aeads: spec.ike_aeads.clone(),
                child_aeads: spec.esp_aeads.clone(),
                child_pfs: spec.esp_pfs,
                pq: false,
                local_ts: selectors(&spec.local_subnets),
                remote_ts: selectors(&spec.remote_subnets),
                child_kind: ChildKind::Esp,
                timers: Timers {
                    ike_rekey: spec.ike_rekey_interval,
                    ..timers(spec.dpd, spec.rekey_interval)
                },
                remote_addr: t.endpoint(),
                via: VIA_IKE,
                nat_t: Some((VIA_NATT, NATT_PORT)),
            });
            tunnels.push(Tunnel::new(
                &spec.name,
                Kind::Esp(t.clone()),
                spec.dpd.action,
                spec.start_action,
            ));
        }
        if peers.is_empty() {
            return None;
        }
        let local = SocketAddr::from(([0, 0, 0, 0], dp.listen_port));
        Some(Self {
            ep: Endpoint::new(peers, local),
            tunnels,
            dp,
            rng: OsRng,
            out: vec![0u8; MAX_PACKET],
        })
    }

    fn start(&mut self, now: Instant) {
        for p in 0..self.tunnels.len() {
            if self.tunnels[p].start == StartAction::Start {
                self.initiate(p, now);
            }
        }
    }

    fn initiate(&mut self, p: usize, now: Instant) {
        self.ep.set_remote_addr(p, self.tunnels[p].endpoint());
        self.ep.initiate(p, now, &mut self.rng);
    }

    /// Run until the process ends.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<(SocketAddr, Via, Vec<u8>)>,
        mut cmds: mpsc::Receiver<Command>,
    ) {
        self.start(Instant::now());
        self.flush();
        let mut second = tokio::time::interval(Duration::from_secs(1));
        loop {
            let deadline = self
                .ep
                .poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                msg = rx.recv() => {
                    let Some((from, via, data)) = msg else { return };
                    self.ep.handle_datagram_via(Instant::now(), from, via, &data, &mut self.rng);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    self.ep.handle_timeout(Instant::now(), &mut self.rng);
                }
                _ = second.tick() => self.housekeeping(Instant::now()),
                Some(cmd) = cmds.recv() => self.command(cmd),
            }
            self.flush();
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::AnnounceKey { public, not_before } => {
                let mut data = public.as_bytes().to_vec();
                data.extend_from_slice(&not_before.to_be_bytes());
                for p in 0..self.tunnels.len() {
                    if matches!(self.tunnels[p].kind, Kind::Wg(_)) {
                        let told =
                            self.ep
                                .notify(p, NOTIFY_STATIC_KEY, data.clone(), Instant::now());
                        tracing::info!(tunnel = %self.tunnels[p].name, told, public_key = %public, not_before, "next static key announced over IKE");
                    }
                }
            }
            Command::KeySwitched => {
                let now = Instant::now();
                for p in 0..self.tunnels.len() {
                    let Kind::Wg(wg) = &self.tunnels[p].kind else {
                        continue;
                    };
                    let peer_key = wg.peer_public_key();
                    self.set_auth(p, peer_key);
                    self.tunnels[p].rekey_at = Some(now + REKEY_AFTER_SWITCH);
                }
            }
            Command::Rotate { tunnel, reply } => {
                let r = match self.tunnels.iter().position(|t| t.name == tunnel) {
                    Some(p) if self.ep.is_established(p) => {
                        self.ep.rekey_child(p, Instant::now(), &mut self.rng);
                        Ok(())
                    }
                    Some(_) => Err(format!("tunnel {tunnel}: no IKE SA established yet")),
                    None => Err(format!("tunnel {tunnel} is neither keyed by IKE nor IPsec")),
                };
                let _ = reply.send(r);
            }
            Command::Status { reply } => {
                let _ = reply.send(
                    (0..self.tunnels.len())
                        .map(|p| (self.tunnels[p].name.clone(), self.status(p)))
                        .collect(),
                );
            }
        }
    }

    fn status(&self, p: usize) -> IkeStatus {
        let t = &self.tunnels[p];
        let info = self.ep.ike_sa_info(p);
        let child = self.ep.children(p).last().cloned();
        IkeStatus {
            state: if self.ep.is_established(p) {
                "established".into()
            } else if self.ep.is_active(p) {
                "connecting".into()
            } else if t.dead {
                "dead".into()
            } else {
                "idle".into()
            },
            spi_i: info.map(|i| format!("{:016x}", i.0)),
            spi_r: info.map(|i| format!("{:016x}", i.1)),
            suite: info.map(|i| suite_name(i.2)),
            initiator: info.map(|i| i.3),
            child_sas: self.ep.children(p).count(),
            pfs: child.as_ref().is_some_and(|c| c.pfs),
            pq: self.ep.ike_sa_pq(p),
            local_ts: child
                .as_ref()
                .map(|c| c.local_ts.iter().map(ts::display).collect())
                .unwrap_or_default(),
            remote_ts: child
                .as_ref()
                .map(|c| c.remote_ts.iter().map(ts::display).collect())
                .unwrap_or_default(),
            next_rekey_secs: self
                .ep
                .next_child_rekey(p)
                .map(|t| t.saturating_duration_since(Instant::now()).as_secs()),
            rekeys: t.rekeys,
            last_error: t.last_error.clone(),
            dpd: format!("{:?}", t.action).to_lowercase(),
            esp: match (&t.kind, &child) {
                (Kind::Esp(_), Some(c)) => match &c.keys {
                    ChildKeys::Esp { aead, .. } => Some(esp_name(*aead)),
                    ChildKeys::WireGuardPsk(_) => None,
                },
                _ => None,
            },
            spi_in: matches!(t.kind, Kind::Esp(_))
                .then(|| child.as_ref().map(|c| format!("{:08x}", c.spi_in)))
                .flatten(),
            spi_out: matches!(t.kind, Kind::Esp(_))
                .then(|| child.as_ref().map(|c| format!("{:08x}", c.spi_out)))
                .flatten(),
            peer: matches!(t.kind, Kind::Esp(_))
                .then(|| self.esp_remote(p).map(|a| a.to_string()))
                .flatten(),
        }
    }

    /// Once a second: data-plane liveness, (re)starting tunnels that have no IKE SA, and
    /// the status the control socket shows.
    fn housekeeping(&mut self, now: Instant) {
        for p in 0..self.tunnels.len() {
            let st = self.status(p);
            self.tunnels[p].publish(st);
            if let Some((key, at)) = self.tunnels[p].pending_peer {
                if crate::status::unix_now() >= at {
                    self.tunnels[p].pending_peer = None;
                    self.dp
                        .switch_peer_key(&self.tunnels[p].name, key, &mut self.out);
                    self.set_auth(p, key);
                    tracing::info!(tunnel = %self.tunnels[p].name, public_key = %key, "peer static key switched (announced over IKE)");
                }
            }
            if self.tunnels[p].rekey_at.is_some_and(|t| now >= t) {
                self.tunnels[p].rekey_at = None;
                self.ep.rekey_child(p, now, &mut self.rng);
            }
            let rx = self.tunnels[p].stats().rx_packets.load(Relaxed);
            if rx != self.tunnels[p].last_rx_packets {
                self.tunnels[p].last_rx_packets = rx;
                self.ep.note_peer_activity(p, now);
            }
            if let Kind::Esp(t) = &self.tunnels[p].kind {
                let remote = self.esp_remote(p);
                t.set_remote(remote);
                t.switch_to_newest();
                // RFC 3948 §4: keep NAT mappings for the 4500 flow alive while idle.
                let tx = t.stats.tx_packets.load(Relaxed);
                let (seen, since) = self.tunnels[p].last_tx;
                if tx != seen {
                    self.tunnels[p].last_tx = (tx, now);
                } else if now.duration_since(since) >= NATT_KEEPALIVE && t.is_up() {
                    if let (Some(w), Some(to)) = (&self.dp.ipsec, remote) {
                        let _ = w.natt.send_to(&[0xff], to);
                    }
                    self.tunnels[p].last_tx = (tx, now);
                }
                let Kind::Esp(t) = &self.tunnels[p].kind else {
                    continue;
                };
                if t.wants_rekey.swap(false, Relaxed) && self.ep.is_established(p) {
                    tracing::info!(tunnel = %t.spec.name, "ESP sequence numbers nearly used up: rekeying the CHILD SA");
                    self.ep.rekey_child(p, now, &mut self.rng);
                }
            }
            if !self.ep.is_active(p) && self.tunnels[p].wants_ike(now) {
                self.initiate(p, now);
            }
        }
    }

    /// The IKE identities and PSK of an IKE-keyed WireGuard tunnel for the site's current
    /// static key and `peer_key`.
    fn set_auth(&mut self, p: usize, peer_key: PublicKey) {
        let private = self.dp.private();
        if let Some(psk) = derive_psk(&private, &peer_key) {
            self.ep
                .set_auth(p, key_id(&private.public_key()), key_id(&peer_key), psk);
        }
    }

    /// Where the tunnel's ESP goes: the IKE SA's peer on the NAT-T port.
    fn esp_remote(&self, p: usize) -> Option<SocketAddr> {
        self.ep.remote_of(p).map(|(addr, via)| {
            if via == VIA_NATT {
                addr
            } else {
                SocketAddr::new(addr.ip(), NATT_PORT)
            }
        })
    }

    fn flush(&mut self) {
        // Events first: a CHILD SA the engine has just made goes into the data plane
        // before the message that completes its exchange leaves. The peer may send on
        // the new SA as soon as it has our answer (strongSwan does when it initiated the
        // rekey), and a packet that overtook the install would be dropped as an unknown
        // SPI. What handling an event queues (a DPD restart's IKE_SA_INIT) leaves below
        // with the rest, in this same flush.
        while let Some(e) = self.ep.poll_event() {
            self.event(e);
        }
        while let Some(tx) = self.ep.poll_transmit() {
            let (wire, marker) = match (tx.via, &self.dp.ipsec) {
                (VIA_IKE, Some(w)) => (&w.ike, false),
                (VIA_NATT, Some(w)) => (&w.natt, true),
                _ => (&self.dp.wire, true),
            };
            let sent = if marker {
                let mut d = Vec::with_capacity(tx.data.len() + 4);
                d.extend_from_slice(&[0, 0, 0, 0]);
                d.extend_from_slice(&tx.data);
                wire.send_to(&d, tx.dst)
            } else {
                wire.send_to(&tx.data, tx.dst)
            };
            if sent.is_err() {
                tracing::debug!(to = %tx.dst, "sending an IKE message failed");
            }
        }
    }

    fn event(&mut self, e: Event) {
        match e {
            Event::IkeUp {
                peer,
                spi_i,
                spi_r,
                initiator,
                rekey,
                aead,
            } => {
                let t = &mut self.tunnels[peer];
                t.dead = false;
                t.retry_at = None;
                let pq = self.ep.ike_sa_pq(peer);
                tracing::info!(tunnel = %t.name, spi_i = format!("{spi_i:016x}"), spi_r = format!("{spi_r:016x}"), initiator, rekey, suite = %suite_name(aead), pq, "IKE SA established");
            }
            Event::IkeDown { peer, spi_i, spi_r } => {
                tracing::info!(tunnel = %self.tunnels[peer].name, spi_i = format!("{spi_i:016x}"), spi_r = format!("{spi_r:016x}"), "IKE SA closed");
            }
            Event::ChildUp { peer, child } => {
                let remote = self.esp_remote(peer);
                let t = &mut self.tunnels[peer];
                t.last_error = None;
                if child.rekey_of.is_some() {
                    t.rekeys += 1;
                    t.stats().rekeys_ok.fetch_add(1, Relaxed);
                }
                match (&t.kind, &child.keys) {
                    (Kind::Wg(wg), ChildKeys::WireGuardPsk(psk)) => {
                        wg.set_allowed(ts_to_nets(&child.remote_ts));
                        wg.install_psk(
                            child.id.0,
                            psk,
                            child.initiator,
                            &self.dp.wire,
                            &mut self.out,
                        );
                    }
                    (
                        Kind::Esp(esp),
                        ChildKeys::Esp {
                            aead,
                            key_in,
                            key_out,
                        },
                    ) => {
                        let mut sa = match EspSa::new(
                            child.spi_out,
                            key_out,
                            child.spi_in,
                            key_in,
                            *aead,
                        ) {
                            Ok(sa) => sa,
                            Err(e) => {
                                tracing::error!(tunnel = %t.name, error = %e, "cannot install the ESP SA");
                                return;
                            }
                        };
                        let mut mask = [0u8; 8];
                        self.rng.fill(&mut mask);
                        sa.set_iv_mask(u64::from_be_bytes(mask));
                        let c = Arc::new(ChildSa::new(
                            child.id.0,
                            sa,
                            *aead,
                            child.local_ts.clone(),
                            child.remote_ts.clone(),
                        ));
                        // Inbound first, so the peer's first packets on the new SA land.
                        self.dp.spis.insert(esp, &c);
                        esp.stats.handshakes.fetch_add(1, Relaxed);
                        esp.set_remote(remote);
                        esp.install(c, child.initiator);
                    }
                    _ => return,
                }
                tracing::info!(
                    tunnel = %t.name,
                    child = child.id.0,
                    pfs = child.pfs,
                    rekey = child.rekey_of.is_some(),
                    spi_in = format!("{:08x}", child.spi_in),
                    spi_out = format!("{:08x}", child.spi_out),
                    local_ts = ?child.local_ts.iter().map(ts::display).collect::<Vec<_>>(),
                    remote_ts = ?child.remote_ts.iter().map(ts::display).collect::<Vec<_>>(),
                    "CHILD SA installed"
                );
            }
            Event::ChildRetiring { peer, id } => {
                if let Kind::Esp(esp) = &self.tunnels[peer].kind {
                    esp.retire(id.0);
                }
            }
            Event::ChildDown { peer, id } => match &self.tunnels[peer].kind {
                Kind::Wg(wg) => wg.retire_child(id.0),
                Kind::Esp(esp) => {
                    if let Some(spi) = esp.remove(id.0) {
                        self.dp.spis.remove(&[spi]);
                    }
                }
            },
            Event::PeerDead { peer } => {
                let t = &mut self.tunnels[peer];
                t.dead = true;
                t.stats().dpd_dead.fetch_add(1, Relaxed);
                tracing::warn!(tunnel = %t.name, action = ?t.action, "peer dead: no answer to IKE liveness checks");
                let clear = |t: &Tunnel, dp: &Dataplane| match &t.kind {
                    Kind::Wg(wg) => wg.clear_sessions(),
                    Kind::Esp(esp) => {
                        dp.spis.remove(&esp.clear());
                        esp.cleared.store(true, Relaxed);
                    }
                };
                match t.action {
                    DpdAction::Clear => clear(t, &self.dp),
                    // restart: initiate again at once (housekeeping does it for hold on
                    // the next second too; hold keeps the old sessions meanwhile).
                    DpdAction::Restart => {
                        clear(t, &self.dp);
                        self.initiate(peer, Instant::now());
                    }
                    DpdAction::Hold => {}
                }
            }
            Event::PeerNotify { peer, ty, data } => {
                let t = &mut self.tunnels[peer];
                if ty != NOTIFY_STATIC_KEY || !matches!(t.kind, Kind::Wg(_)) || data.len() != 40 {
                    tracing::debug!(tunnel = %t.name, ty, "private notify ignored");
                    return;
                }
                let mut k = [0u8; 32];
                k.copy_from_slice(&data[..32]);
                let key = PublicKey(k);
                let mut at = [0u8; 8];
                at.copy_from_slice(&data[32..]);
                let at = u64::from_be_bytes(at);
                // Accept handshakes from it now; use it from `at` on.
                self.dp.announce_peer_key(&t.name, key);
                t.pending_peer = Some((key, at));
                tracing::info!(tunnel = %t.name, public_key = %key, not_before = at, "peer announced its next static key over IKE");
            }
            Event::PeerRestarted { peer } => {
                tracing::info!(tunnel = %self.tunnels[peer].name, "peer restarted (INITIAL_CONTACT): old SAs dropped");
            }
            Event::Failed { peer, failure } => {
                let msg = match &failure {
                    Failure::TsUnacceptable { offered_local, offered_remote } => format!(
                        "traffic selectors do not match: peer side {:?}, our side {:?} (check local_subnets/remote_subnets on both sites)",
                        offered_remote.iter().map(ts::display).collect::<Vec<_>>(),
                        offered_local.iter().map(ts::display).collect::<Vec<_>>()
                    ),
                    Failure::AuthenticationFailed => "authentication failed: the peer's AUTH did not verify or it rejected ours (check psk and local_id/remote_id on both sides)".to_string(),
                    Failure::NoProposalChosen => "no proposal chosen: the peer accepts none of our ike_proposals/esp_proposals".to_string(),
                    other => format!("{other:?}"),
                };
                match peer {
                    Some(p) => {
                        let t = &mut self.tunnels[p];
                        t.stats()
                            .rekeys_failed
                            .fetch_add(u64::from(matches!(failure, Failure::Notify(_))), Relaxed);
                        tracing::warn!(tunnel = %t.name, "IKE: {msg}");
                        t.last_error = Some(msg);
                        t.retry_at = Some(Instant::now() + RETRY_AFTER_FAILURE);
                    }
                    None => tracing::warn!("IKE: {msg}"),
                }
            }
            Event::RttSample { peer, rtt } => self.tunnels[peer]
                .stats()
                .rtt
                .get(RttSource::Ike)
                .observe(rtt),
            Event::Dropped { reason } => tracing::debug!(reason, "IKE message dropped"),
        }
    }
}

fn timers(dpd: crate::config::Dpd, rekey: Duration) -> Timers {
    Timers {
        retransmit_base: Duration::from_millis(500),
        retransmit_factor: 1.6,
        retransmit_tries: 30,
        dpd_interval: dpd.interval,
        dpd_timeout: dpd.timeout,
        child_rekey: rekey,
        ike_rekey: (rekey * 30).max(Duration::from_secs(3600)),
    }
}
