//! IPsec tunnels in the packet path: ESP (RFC 4303) sealed and opened in userspace and
//! carried in UDP on port 4500 (RFC 3948). The IKE driver installs and removes CHILD SAs;
//! the packet threads only look them up.
//!
//! - Every live CHILD SA keeps receiving until IKE deletes it. Outbound moves to a new
//!   CHILD SA at once when we made it (the peer had its keys first); when the peer made
//!   it, only once the peer's first packet arrives on it (or after [`SWITCH_AFTER`]),
//!   since our answer may still be on its way to the peer. A rekey loses nothing.
//! - Inbound packets are found by SPI in a site-wide map, checked against the CHILD SA's
//!   negotiated selectors after decryption, then written to the TUN.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use super::wg::lock;
use std::time::{Duration, Instant};

/// A CHILD SA the peer made carries our outbound traffic after this long even if nothing
/// arrived on it.
pub const SWITCH_AFTER: Duration = Duration::from_secs(1);

use arc_swap::{ArcSwap, ArcSwapOption};
use ipnet::IpNet;

use super::batch::TxBatch;
use super::stats::{DropReason, TunnelStats};
use super::Wire;
use crate::config::{Dpd, Endpoint, StartAction};
use crate::proto::esp::{self, EspSa, OpenError, SealError};
use crate::proto::ike::crypto::AeadAlg;
use crate::proto::ike::wire::TrafficSelector;

/// What an IPsec tunnel is configured to be (keys already loaded).
#[derive(Clone)]
pub struct EspTunnelSpec {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    pub local_subnets: Vec<IpNet>,
    pub remote_subnets: Vec<IpNet>,
    pub psk: zeroize::Zeroizing<Vec<u8>>,
    pub local_id: String,
    pub remote_id: String,
    /// IKE SA ciphers in preference order (PRF HMAC-SHA2-256, X25519).
    pub ike_aeads: Vec<AeadAlg>,
    /// ESP ciphers in preference order.
    pub esp_aeads: Vec<AeadAlg>,
    /// A fresh X25519 exchange in every CHILD SA rekey (an ESP proposal named a DH group).
    pub esp_pfs: bool,
    pub rekey_interval: Duration,
    pub ike_rekey_interval: Duration,
    pub dpd: Dpd,
    pub start_action: StartAction,
    /// Config line, for messages.
    pub line: usize,
}

impl std::fmt::Debug for EspTunnelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EspTunnelSpec")
            .field("name", &self.name)
            .field("endpoints", &self.endpoints)
            .field("local_subnets", &self.local_subnets)
            .field("remote_subnets", &self.remote_subnets)
            .field("psk", &"<redacted>")
            .field("local_id", &self.local_id)
            .field("remote_id", &self.remote_id)
            .finish_non_exhaustive()
    }
}

/// One CHILD SA in the data plane.
pub struct ChildSa {
    /// The IKE engine's id of the CHILD SA.
    pub id: u64,
    pub spi_in: u32,
    pub spi_out: u32,
    pub aead: AeadAlg,
    /// Sealed by the TUN thread and opened by the UDP thread at the same time (no lock).
    sa: EspSa,
    /// Inner sources accepted from the peer (its negotiated selectors).
    remote_ts: Vec<TrafficSelector>,
    /// Inner sources we may send from (our negotiated selectors).
    local_ts: Vec<TrafficSelector>,
    installed: Instant,
}

impl ChildSa {
    pub fn new(
        id: u64,
        sa: EspSa,
        aead: AeadAlg,
        local_ts: Vec<TrafficSelector>,
        remote_ts: Vec<TrafficSelector>,
    ) -> Self {
        Self {
            id,
            spi_in: sa.spi_in(),
            spi_out: sa.spi_out(),
            aead,
            sa,
            remote_ts,
            local_ts,
            installed: Instant::now(),
        }
    }

    /// Sequence numbers sent so far.
    pub fn sent(&self) -> u64 {
        self.sa.next_seq() - 1
    }
}

/// An IPsec tunnel.
pub struct EspTunnel {
    pub spec: EspTunnelSpec,
    pub stats: TunnelStats,
    /// Live CHILD SAs, newest last.
    children: ArcSwap<Vec<Arc<ChildSa>>>,
    /// The CHILD SA that carries outbound traffic (the newest if it is gone).
    out_id: AtomicU64,
    /// Where ESP goes: the IKE SA's peer address on port 4500.
    remote: ArcSwapOption<SocketAddr>,
    resolved: Mutex<Vec<Option<SocketAddr>>>,
    /// Traffic wanted a CHILD SA that is not there (`start_action = "trap"`).
    pub wants_sa: AtomicBool,
    /// The outbound sequence number nears its limit: rekey now.
    pub wants_rekey: AtomicBool,
    /// `dpd.action = "clear"` fired: the tunnel stays down until the peer comes back.
    pub cleared: AtomicBool,
    /// IKE state as last published by the IKE driver.
    pub ike_status: Mutex<Option<crate::ikewg::IkeStatus>>,
    /// Unix time of the latest CHILD SA installed, in nanoseconds (0 = never).
    last_child_ns: std::sync::atomic::AtomicU64,
}

impl EspTunnel {
    pub fn new(spec: EspTunnelSpec) -> Self {
        let resolved = spec
            .endpoints
            .iter()
            .map(|e| match e {
                Endpoint::Addr(a) => Some(*a),
                Endpoint::Host { .. } => None,
            })
            .collect();
        Self {
            spec,
            stats: TunnelStats::default(),
            children: ArcSwap::from_pointee(Vec::new()),
            out_id: AtomicU64::new(0),
            remote: ArcSwapOption::empty(),
            resolved: Mutex::new(resolved),
            wants_sa: AtomicBool::new(false),
            wants_rekey: AtomicBool::new(false),
            cleared: AtomicBool::new(false),
            ike_status: Mutex::new(None),
            last_child_ns: Default::default(),
        }
    }

    /// The first configured endpoint that resolves (IKE_SA_INIT goes there).
    pub fn endpoint(&self) -> Option<SocketAddr> {
        lock(&self.resolved).iter().flatten().next().copied()
    }

    pub fn set_resolved(&self, resolved: Vec<Option<SocketAddr>>) {
        *lock(&self.resolved) = resolved;
    }

    /// The peer address ESP is sent to (None: no IKE SA).
    pub fn remote(&self) -> Option<SocketAddr> {
        self.remote.load().as_deref().copied()
    }

    pub fn set_remote(&self, addr: Option<SocketAddr>) {
        if self.remote() != addr {
            self.remote.store(addr.map(Arc::new));
        }
    }

    pub fn children(&self) -> Arc<Vec<Arc<ChildSa>>> {
        self.children.load_full()
    }

    /// Unix time of the newest CHILD SA (seconds, nanoseconds); (0, 0) if never.
    pub fn last_handshake(&self) -> (u64, u32) {
        let ns = self.last_child_ns.load(Relaxed);
        (ns / 1_000_000_000, (ns % 1_000_000_000) as u32)
    }

    /// Up: a CHILD SA carries traffic.
    pub fn is_up(&self) -> bool {
        !self.children.load().is_empty()
    }

    /// A new CHILD SA. `ours`: we made it, so the peer has its keys and outbound traffic
    /// moves to it now; otherwise it moves once the peer uses it.
    pub fn install(&self, child: Arc<ChildSa>, ours: bool) {
        let first = self.children.load().is_empty();
        if ours || first {
            self.out_id.store(child.id, Relaxed);
        }
        self.children.rcu(|cur| {
            let mut v: Vec<Arc<ChildSa>> =
                cur.iter().filter(|c| c.id != child.id).cloned().collect();
            v.push(child.clone());
            v
        });
        self.wants_rekey.store(false, Relaxed);
        self.wants_sa.store(false, Relaxed);
        self.cleared.store(false, Relaxed);
        let ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        self.last_child_ns.store(ns, Relaxed);
    }

    /// The peer deleted CHILD SA `id`: if it carries our outbound traffic, move to the
    /// newest other one now (the peer only receives on it for a short grace).
    pub fn retire(&self, id: u64) {
        if self.out_id.load(Relaxed) == id {
            if let Some(c) = self.children.load().iter().rev().find(|c| c.id != id) {
                self.out_id.store(c.id, Relaxed);
            }
        }
    }

    /// A CHILD SA is gone; returns its inbound SPI.
    pub fn remove(&self, id: u64) -> Option<u32> {
        let mut spi = None;
        self.children.rcu(|cur| {
            spi = cur.iter().find(|c| c.id == id).map(|c| c.spi_in);
            cur.iter()
                .filter(|c| c.id != id)
                .cloned()
                .collect::<Vec<_>>()
        });
        spi
    }

    /// Every CHILD SA is gone; returns their inbound SPIs.
    pub fn clear(&self) -> Vec<u32> {
        let old = self.children.swap(Arc::new(Vec::new()));
        old.iter().map(|c| c.spi_in).collect()
    }

    /// Move outbound traffic to the newest CHILD SA if the peer made it more than
    /// [`SWITCH_AFTER`] ago (called about once a second).
    pub fn switch_to_newest(&self) {
        if let Some(c) = self.children.load().last() {
            if c.id > self.out_id.load(Relaxed) && c.installed.elapsed() >= SWITCH_AFTER {
                self.out_id.store(c.id, Relaxed);
            }
        }
    }

    /// A plaintext IP packet from the TUN, routed to this tunnel.
    pub fn encapsulate(&self, wire: &Wire, packet: &[u8], out: &mut [u8], tx: &mut TxBatch) {
        self.stats.tx_inner_packets.fetch_add(1, Relaxed);
        let children = self.children.load();
        let out_id = self.out_id.load(Relaxed);
        let chosen = children
            .iter()
            .rev()
            .find(|c| c.id == out_id)
            .or(children.last());
        let Some(child) = chosen else {
            if self.spec.start_action == StartAction::Trap && !self.cleared.load(Relaxed) {
                self.wants_sa.store(true, Relaxed);
            }
            self.stats.drops.add(DropReason::NoKeys);
            return;
        };
        let Some(dst) = self.remote() else {
            self.stats.drops.add(DropReason::NoEndpoint);
            return;
        };
        if !esp::inner_allowed(packet, &child.local_ts) {
            // The negotiated selectors are narrower than the route that led here.
            self.stats.drops.add(DropReason::NoRoute);
            return;
        }
        let sealed = child.sa.seal(packet, out);
        if child.sa.needs_rekey() {
            self.wants_rekey.store(true, Relaxed);
        }
        match sealed {
            // A failed send is counted by the packet thread that flushes `tx`.
            Ok(n) => {
                tx.push(wire, &out[..n], dst);
                self.stats.count_tx(n);
            }
            Err(SealError::SeqExhausted) => {
                self.wants_rekey.store(true, Relaxed);
                self.stats.drops.add(DropReason::NoKeys);
            }
            Err(_) => self.stats.drops.add(DropReason::Malformed),
        }
    }

    /// An ESP packet (the UDP payload) for `child` of this tunnel. Authentic packets whose
    /// inner source is inside the peer's selectors are handed to `deliver`.
    pub fn decapsulate(
        &self,
        child: &ChildSa,
        datagram: &[u8],
        out: &mut [u8],
        deliver: &mut dyn FnMut(&[u8]),
    ) {
        let opened = child.sa.open(datagram, out);
        match opened {
            Ok((n, _)) => {
                self.stats.count_rx(datagram.len());
                if child.id > self.out_id.load(Relaxed) {
                    // The peer sends on the CHILD SA it made: it has our answer, follow.
                    self.out_id.fetch_max(child.id, Relaxed);
                }
                let inner = &out[..n];
                if !esp::inner_allowed(inner, &child.remote_ts) {
                    self.stats.drops.add(DropReason::SourceNotAllowed);
                    return;
                }
                self.stats.rx_inner_packets.fetch_add(1, Relaxed);
                deliver(inner);
            }
            // Authentic traffic-flow-confidentiality padding: the peer is alive.
            Err(OpenError::Dummy) => self.stats.count_rx(datagram.len()),
            Err(OpenError::Truncated | OpenError::BadNextHeader | OpenError::BadPadding) => {
                self.stats.drops.add(DropReason::Malformed)
            }
            Err(_) => self.stats.drops.add(DropReason::DecryptFailed),
        }
    }
}

/// A CHILD SA and the tunnel it belongs to.
type Inbound = (Arc<EspTunnel>, Arc<ChildSa>);

/// Inbound SPIs of every IPsec tunnel of the site, for the UDP thread.
#[derive(Default)]
pub struct SpiMap(ArcSwap<HashMap<u32, Inbound>>);

impl SpiMap {
    pub fn get(&self, spi: u32) -> Option<Inbound> {
        self.0.load().get(&spi).cloned()
    }

    pub fn insert(&self, tunnel: &Arc<EspTunnel>, child: &Arc<ChildSa>) {
        self.0.rcu(|cur| {
            let mut m = HashMap::clone(cur);
            m.insert(child.spi_in, (tunnel.clone(), child.clone()));
            m
        });
    }

    pub fn remove(&self, spis: &[u32]) {
        if spis.is_empty() {
            return;
        }
        self.0.rcu(|cur| {
            let mut m = HashMap::clone(cur);
            for s in spis {
                m.remove(s);
            }
            m
        });
    }

    pub fn len(&self) -> usize {
        self.0.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DpdAction;
    use crate::proto::ike::wire::ts_from_subnet;

    fn tunnel() -> EspTunnel {
        EspTunnel::new(EspTunnelSpec {
            name: "hq".into(),
            endpoints: Vec::new(),
            local_subnets: vec!["10.1.0.0/24".parse().unwrap()],
            remote_subnets: vec!["10.2.0.0/24".parse().unwrap()],
            psk: zeroize::Zeroizing::new(vec![7; 32]),
            local_id: "a".into(),
            remote_id: "b".into(),
            ike_aeads: vec![AeadAlg::AesGcm16 { key_bits: 256 }],
            esp_aeads: vec![AeadAlg::AesGcm16 { key_bits: 256 }],
            esp_pfs: false,
            rekey_interval: Duration::from_secs(60),
            ike_rekey_interval: Duration::from_secs(3600),
            dpd: Dpd {
                interval: Duration::from_secs(10),
                timeout: Duration::from_secs(30),
                action: DpdAction::Restart,
            },
            start_action: StartAction::Start,
            line: 1,
        })
    }

    fn child(id: u64, spi_in: u32, spi_out: u32, seq: u64) -> Arc<ChildSa> {
        let aead = AeadAlg::AesGcm16 { key_bits: 256 };
        let sa = EspSa::new(spi_out, &[1; 36], spi_in, &[2; 36], aead).unwrap();
        sa.set_next_seq(seq);
        Arc::new(ChildSa::new(
            id,
            sa,
            aead,
            vec![ts_from_subnet("10.1.0.0/24".parse().unwrap())],
            vec![ts_from_subnet("10.2.0.0/24".parse().unwrap())],
        ))
    }

    /// A minimal IPv4/UDP packet from 10.1.0.1 to 10.2.0.1.
    fn packet() -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 1, 0, 1]);
        p[16..20].copy_from_slice(&[10, 2, 0, 1]);
        p
    }

    /// Encapsulate one packet and send it at once.
    fn send(t: &EspTunnel, w: &Wire, out: &mut [u8]) {
        let mut tx = TxBatch::new();
        t.encapsulate(w, &packet(), out, &mut tx);
        tx.flush(w);
        assert_eq!(tx.failed, 0);
    }

    /// Loopback socket pair: our wire and the "peer" that receives the ESP.
    fn wire() -> (Wire, std::net::UdpSocket) {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        (Wire::bind(0).unwrap(), peer)
    }

    #[test]
    fn sequence_numbers_running_out_ask_for_a_rekey_then_stop_sending() {
        let t = tunnel();
        let (w, peer) = wire();
        t.set_remote(Some(peer.local_addr().unwrap()));
        let mut out = vec![0u8; 2048];
        t.install(child(1, 0x1000, 0x2000, esp::SEQ_SOFT_LIMIT - 1), true);
        send(&t, &w, &mut out);
        assert_eq!(t.stats.tx_packets.load(Relaxed), 1);
        assert!(
            t.wants_rekey.load(Relaxed),
            "soft limit reached: rekey wanted"
        );
        // At the hard limit nothing more goes out on this SA.
        t.install(child(2, 0x1001, 0x2001, esp::SEQ_HARD_LIMIT + 1), true);
        send(&t, &w, &mut out);
        assert_eq!(t.stats.tx_packets.load(Relaxed), 1);
        assert_eq!(t.stats.drops.get(DropReason::NoKeys), 1);
        // A fresh CHILD SA clears the request and carries traffic again.
        t.install(child(3, 0x1002, 0x2002, 1), true);
        assert!(!t.wants_rekey.load(Relaxed));
        send(&t, &w, &mut out);
        assert_eq!(t.stats.tx_packets.load(Relaxed), 2);
    }

    #[test]
    fn outbound_follows_a_peer_made_sa_only_once_the_peer_uses_it() {
        let t = tunnel();
        let (w, peer) = wire();
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        t.set_remote(Some(peer.local_addr().unwrap()));
        let mut out = vec![0u8; 2048];
        let old = child(1, 0x1000, 0x2000, 1);
        t.install(old, true);
        // The peer made SA 2 (we answered its CREATE_CHILD_SA).
        let new = child(2, 0x1001, 0x2001, 1);
        t.install(new.clone(), false);
        let mut buf = [0u8; 2048];
        send(&t, &w, &mut out);
        let (n, _) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..4], &0x2000u32.to_be_bytes(), "still on the old SA");
        // A packet from the peer on SA 2 (sealed with the peer's keys = our inbound key).
        let aead = AeadAlg::AesGcm16 { key_bits: 256 };
        let peer_sa = EspSa::new(0x1001, &[2; 36], 0x2001, &[1; 36], aead).unwrap();
        let mut inner = packet();
        inner[12..16].copy_from_slice(&[10, 2, 0, 1]);
        inner[16..20].copy_from_slice(&[10, 1, 0, 1]);
        let mut esp_pkt = vec![0u8; 2048];
        let len = peer_sa.seal(&inner, &mut esp_pkt).unwrap();
        let mut delivered = 0;
        t.decapsulate(&new, &esp_pkt[..len], &mut out, &mut |_| delivered += 1);
        assert_eq!(delivered, 1);
        send(&t, &w, &mut out);
        let (m, _) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(
            &buf[..4],
            &0x2001u32.to_be_bytes(),
            "moved to the peer's SA"
        );
        assert!(n > 0 && m > 0);
        // An inner source outside the selectors is dropped after decryption.
        let mut stray = packet();
        stray[12..16].copy_from_slice(&[192, 168, 9, 9]);
        let len = peer_sa.seal(&stray, &mut esp_pkt).unwrap();
        t.decapsulate(&new, &esp_pkt[..len], &mut out, &mut |_| delivered += 1);
        assert_eq!(delivered, 1);
        assert_eq!(t.stats.drops.get(DropReason::SourceNotAllowed), 1);
        // A replay is counted as a decryption failure, not delivered.
        t.decapsulate(&new, &esp_pkt[..len], &mut out, &mut |_| delivered += 1);
        assert_eq!(t.stats.drops.get(DropReason::DecryptFailed), 1);
    }
}
