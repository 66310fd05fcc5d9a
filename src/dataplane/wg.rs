//! One WireGuard tunnel: a boringtun `Tunn`, its endpoint and its counters.
//!
//! The packet threads and the timer task share a tunnel; the `Tunn` and the current
//! endpoint sit behind one mutex that is held only for the crypto and the send.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use ipnet::IpNet;

use super::batch::TxBatch;
use super::stats::{DropReason, RttSource, TunnelStats};
use super::{LocalKey, Wire};
use crate::config::{Dpd, DpdAction, Endpoint};
use crate::keys::{Psk, PublicKey};
use crate::probe::{Prober, Verdict};

/// WireGuard's REJECT_AFTER_TIME: a session older than this carries no data.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(180);
/// How long the initiator keeps trying one endpoint before it moves to the next
/// (three handshake retransmissions).
pub const FAILOVER_AFTER: Duration = Duration::from_secs(15);

/// Static description of a tunnel, from the configuration.
#[derive(Debug, Clone)]
pub struct WgTunnelSpec {
    pub name: String,
    pub peer_public_key: PublicKey,
    pub psk: Option<Psk>,
    pub endpoints: Vec<Endpoint>,
    pub local_subnets: Vec<IpNet>,
    pub remote_subnets: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
    /// The PSK's file, for its age (None: no PSK, or not from a file).
    pub psk_file: Option<std::path::PathBuf>,
    /// Keyed by IKE: sessions come and go with CHILD SAs.
    pub ike: bool,
    /// IKE-keyed: how often the CHILD SA (and so the WireGuard PSK) is renewed.
    pub rekey_interval: Duration,
    /// IKE-keyed: hybrid ML-KEM-768 key exchange when the IKE SA is made.
    pub post_quantum: bool,
    /// Data-path probe: (source address, target, interval).
    pub probe: Option<ProbeSpec>,
    /// Probe silence for `dpd.timeout` is a dead-peer event handled by `dpd.action`.
    pub dpd: Dpd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSpec {
    pub source: std::net::Ipv4Addr,
    pub target: std::net::Ipv4Addr,
    pub interval: Duration,
}

/// Passive dead-peer detection for static-keyed tunnels: WireGuard answers every data
/// packet within KEEPALIVE_TIMEOUT (10 s, with a keepalive if it has nothing to send), so
/// data sent and nothing received for the DPD timeout (at least 15 s) means the peer is gone.
pub const PASSIVE_DPD_MIN: Duration = Duration::from_secs(15);

struct PassiveDpd {
    rx_packets: u64,
    tx_inner: u64,
    /// First data packet sent since the peer was last heard from.
    unanswered_since: Option<Instant>,
    dead: bool,
}

/// Handshake initiations we sent and still wait for (sender index, when), newest last.
const PENDING_INITIATIONS: usize = 4;

/// Sessions per tunnel at once: a keyed tunnel holds the current PSK's session and the
/// one it replaces (make-before-break), with room to spare.
pub const SESSION_SLOTS: u32 = 4;

/// One boringtun `Tunn`: a WireGuard session under one preshared key.
struct Session {
    tunn: Tunn,
    /// Low bits of the receiver index (`tunnel.index | slot`).
    slot: u32,
    /// The IKE CHILD SA that keyed it (None: static keys).
    child: Option<u64>,
    /// Its preshared key (shown through the UAPI, as `wg` expects).
    psk: Option<zeroize::Zeroizing<[u8; 32]>>,
    /// Replaced by a newer key; dropped once the newer session carries traffic.
    retired_at: Option<Instant>,
    /// The static keys it was made with (ours, the peer's).
    local: PublicKey,
    peer: PublicKey,
}

/// Which session a WireGuard message is for.
pub enum Target {
    /// The session the receiver index names.
    Slot(u32),
    /// A handshake initiation to our static key `local` from `peer`; `fresh`: `local`
    /// is the site's key in use or the announced next one (not the replaced one).
    Initiation {
        local: Arc<LocalKey>,
        peer: PublicKey,
        fresh: bool,
    },
}

/// The static keys a tunnel uses now, and during rotations the peer's announced next key
/// and its replaced one (accepted in handshakes).
struct TunnelKeys {
    local: Arc<LocalKey>,
    peer: PublicKey,
    pending_peer: Option<PublicKey>,
    previous_peer: Option<PublicKey>,
}

fn has_session(t: &Tunn) -> bool {
    t.time_since_last_handshake()
        .is_some_and(|s| s < SESSION_LIFETIME)
}

struct Live {
    /// Oldest first; the newest answers handshake initiations.
    sessions: Vec<Session>,
    endpoint: Option<SocketAddr>,
}

impl Live {
    /// The session outbound packets use: the newest that has a live WireGuard session,
    /// else the newest (which then starts a handshake).
    fn sending(&mut self) -> Option<&mut Session> {
        let i = self.sending_index()?;
        Some(&mut self.sessions[i])
    }

    /// Index of [`sending`](Self::sending)'s session. With one session (nearly always)
    /// that is the one whatever its state: no clock read per packet.
    fn sending_index(&self) -> Option<usize> {
        match self.sessions.len() {
            0 => None,
            1 => Some(0),
            n => Some(
                self.sessions
                    .iter()
                    .rposition(|s| has_session(&s.tunn))
                    .unwrap_or(n - 1),
            ),
        }
    }

    /// Make room for a new session: drop the oldest if every slot is taken, retire the
    /// rest (they stay until the new one carries traffic) and return a free slot.
    fn free_slot(&mut self) -> u32 {
        if self.sessions.len() as u32 >= SESSION_SLOTS {
            // The oldest was replaced long ago.
            self.sessions.remove(0);
        }
        let used: Vec<u32> = self.sessions.iter().map(|s| s.slot).collect();
        let slot = (0..SESSION_SLOTS)
            .find(|s| !used.contains(s))
            .unwrap_or_default();
        let now = Instant::now();
        for s in &mut self.sessions {
            s.retired_at.get_or_insert(now);
        }
        slot
    }

    fn sending_ref(&self) -> Option<&Session> {
        let i = self.sending_index()?;
        Some(&self.sessions[i])
    }
}

/// Where to send: the configured candidates, their last resolution, and which one is in use.
struct Endpoints {
    /// Resolved address of each configured endpoint (None: not resolved yet / failed).
    resolved: Vec<Option<SocketAddr>>,
    current: usize,
    /// When the tunnel last had a session or switched candidates.
    trying_since: Instant,
    /// The peer moved and we follow it; cleared when we fail over.
    roamed: bool,
}

pub struct WgTunnel {
    pub spec: WgTunnelSpec,
    /// Our receiver index base (24 bits); boringtun puts it in the top bits of each
    /// session's index.
    pub index: u32,
    live: Mutex<Live>,
    endpoints: Mutex<Endpoints>,
    pub stats: TunnelStats,
    /// Unix time of the latest completed handshake, in nanoseconds (0 = never).
    last_handshake_ns: AtomicU64,
    /// boringtun reported ConnectionExpired: handshakes failed for 90 s.
    expired: AtomicBool,
    /// A session was up at the last tick (to log when the tunnel comes up or lapses).
    was_up: AtomicBool,
    /// Our unanswered initiations, to time the handshake RTT to the microsecond
    /// (boringtun's own `last_rtt` is whole milliseconds).
    initiations: Mutex<VecDeque<(u32, Instant)>>,
    pub probe: Option<Prober>,
    passive: Mutex<PassiveDpd>,
    keys: Mutex<TunnelKeys>,
    /// Inner source addresses accepted from the peer: the configured remote subnets, or
    /// for IKE-keyed tunnels the negotiated traffic selectors.
    allowed: arc_swap::ArcSwap<Vec<IpNet>>,
    /// IKE state as last published by the IKE driver (IKE-keyed tunnels).
    pub ike_status: Mutex<Option<crate::ikewg::IkeStatus>>,
}

/// Locks, recovering the guard if a holder panicked (shared by the WireGuard and ESP tunnels).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Connection state as shown by `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelState {
    /// A session younger than REJECT_AFTER_TIME exists.
    Up,
    /// No session; handshakes are being attempted.
    Connecting,
    /// No endpoint known: waiting for the peer to reach us.
    Waiting,
    /// Handshakes have failed for 90 s; still retrying on the next candidate.
    Down,
}

impl WgTunnel {
    pub fn new(spec: WgTunnelSpec, index: u32, local: Arc<LocalKey>, now: Instant) -> Self {
        let keys = TunnelKeys {
            local,
            peer: spec.peer_public_key,
            pending_peer: None,
            previous_peer: None,
        };
        // A tunnel keyed by IKE has no session until its first CHILD SA.
        let sessions = if spec.ike {
            Vec::new()
        } else {
            vec![new_session(
                &keys,
                index,
                0,
                spec.psk.as_ref().map(|p| *p.as_bytes()),
                spec.persistent_keepalive,
                None,
            )]
        };
        let endpoints = Endpoints {
            resolved: spec
                .endpoints
                .iter()
                .map(|e| match e {
                    Endpoint::Addr(a) => Some(*a),
                    Endpoint::Host { .. } => None,
                })
                .collect(),
            current: 0,
            trying_since: now,
            roamed: false,
        };
        let first = endpoints.resolved.first().copied().flatten();
        let spec_allowed = spec.remote_subnets.clone();
        let probe = spec
            .probe
            .map(|p| Prober::new(p.target, p.source, p.interval, now));
        Self {
            spec,
            index,
            live: Mutex::new(Live {
                sessions,
                endpoint: first,
            }),
            keys: Mutex::new(keys),
            allowed: arc_swap::ArcSwap::from_pointee(spec_allowed),
            ike_status: Mutex::new(None),
            endpoints: Mutex::new(endpoints),
            stats: TunnelStats::default(),
            last_handshake_ns: AtomicU64::new(0),
            expired: AtomicBool::new(false),
            was_up: AtomicBool::new(false),
            initiations: Mutex::new(VecDeque::new()),
            passive: Mutex::new(PassiveDpd {
                rx_packets: 0,
                tx_inner: 0,
                unanswered_since: None,
                dead: false,
            }),
            probe,
        }
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        lock(&self.live).endpoint
    }

    fn send(&self, wire: &Wire, to: Option<SocketAddr>, datagram: &[u8]) {
        self.send_via(wire, None, to, datagram);
    }

    /// Send now, or queue into `batch` (whose failures the packet thread counts).
    fn send_via(
        &self,
        wire: &Wire,
        batch: Option<&mut TxBatch>,
        to: Option<SocketAddr>,
        datagram: &[u8],
    ) {
        let Some(to) = to else {
            self.stats.drops.add(DropReason::NoEndpoint);
            return;
        };
        let sent = match batch {
            Some(batch) => {
                batch.push(wire, datagram, to);
                Ok(datagram.len())
            }
            None => wire.send_to(datagram, to),
        };
        match sent {
            Ok(_) => {
                self.stats.count_tx(datagram.len());
                if is_initiation(datagram) {
                    self.note_initiation(datagram);
                }
            }
            Err(_) => self.stats.drops.add(DropReason::IoError),
        }
    }

    fn note_initiation(&self, datagram: &[u8]) {
        let sender = u32::from_le_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]);
        let mut pending = lock(&self.initiations);
        // A new initiation means the previous one went unanswered.
        if !pending.is_empty() {
            self.stats.handshake_timeouts.fetch_add(1, Relaxed);
        }
        if pending.len() == PENDING_INITIATIONS {
            pending.pop_front();
        }
        pending.push_back((sender, Instant::now()));
    }

    /// A handshake response for this tunnel was accepted: time it against our initiation.
    fn note_response(&self, datagram: &[u8]) {
        let receiver = u32::from_le_bytes([datagram[8], datagram[9], datagram[10], datagram[11]]);
        let mut pending = lock(&self.initiations);
        if let Some(&(_, sent)) = pending.iter().find(|(idx, _)| *idx == receiver) {
            pending.clear();
            drop(pending);
            self.stats
                .rtt
                .get(RttSource::WireguardHandshake)
                .observe(sent.elapsed());
        }
    }

    /// A plaintext IP packet from the TUN, routed to this tunnel; the datagram joins `tx`.
    pub fn encapsulate(&self, wire: &Wire, packet: &[u8], out: &mut [u8], tx: &mut TxBatch) {
        self.stats.tx_inner_packets.fetch_add(1, Relaxed);
        self.seal(wire, packet, out, Some(tx));
    }

    fn seal(&self, wire: &Wire, packet: &[u8], out: &mut [u8], tx: Option<&mut TxBatch>) {
        if self.spec.dpd.action == DpdAction::Clear && !self.spec.ike && self.peer_dead() {
            // `clear`: the tunnel is down until the peer is heard from again.
            self.stats.drops.add(DropReason::NoEndpoint);
            return;
        }
        let mut live = lock(&self.live);
        let endpoint = live.endpoint;
        let Some(session) = live.sending() else {
            self.stats.drops.add(DropReason::NoKeys);
            return;
        };
        match session.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(d) => self.send_via(wire, tx, endpoint, d),
            TunnResult::Done => {} // queued until the handshake completes
            TunnResult::Err(_) => self.stats.drops.add(DropReason::Malformed),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
        }
    }

    /// A WireGuard datagram from `src` addressed to this tunnel. Decrypted packets whose
    /// inner source is inside the tunnel's remote subnets are handed to `deliver`.
    /// `target` is the session the receiver index names, or for handshake initiations
    /// the static keys they were made with (the newest session under those keys answers).
    pub fn decapsulate(
        &self,
        wire: &Wire,
        src: SocketAddr,
        target: Target,
        datagram: &[u8],
        out: &mut [u8],
        deliver: &mut dyn FnMut(&[u8]),
    ) {
        self.stats.count_rx(datagram.len());
        let mut live = lock(&self.live);
        let mut authenticated = true;
        let kind = datagram.first().copied().unwrap_or(0);
        let at = match target {
            Target::Slot(slot) => live.sessions.iter().position(|s| s.slot == slot),
            Target::Initiation { local, peer, fresh } => {
                let found = live
                    .sessions
                    .iter()
                    .rposition(|s| s.local == local.public && s.peer == peer);
                match found {
                    Some(i) => Some(i),
                    // The peer switched to a key pair we accept but have no session
                    // under yet (its rotation, or ours, announced and due): start one.
                    None if !self.spec.ike && fresh && self.accepts_peer(&peer) => {
                        self.adopt_keys(&mut live, Some(local), Some(peer));
                        live.sessions.len().checked_sub(1)
                    }
                    None => live.sessions.len().checked_sub(1),
                }
            }
        };
        let Some(session) = at.map(|i| &mut live.sessions[i]) else {
            self.stats.drops.add(DropReason::UnknownPeer);
            return;
        };
        let tunn = &mut session.tunn;
        let result = tunn.decapsulate(Some(src.ip()), datagram, out);
        match &result {
            TunnResult::Err(_) if matches!(kind, 1 | 2) => {
                self.stats.handshake_rejects.fetch_add(1, Relaxed);
            }
            TunnResult::Err(_) => {}
            _ if kind == 2 && datagram.len() >= 12 => self.note_response(datagram),
            _ => {}
        }
        match result {
            TunnResult::WriteToNetwork(d) => {
                let is_cookie = d.len() == 64 && d[0] == 3;
                authenticated = !is_cookie;
                match wire.send_to(d, src) {
                    Ok(_) => self.stats.count_tx(d.len()),
                    Err(_) => self.stats.drops.add(DropReason::IoError),
                }
                if is_cookie {
                    self.stats.drops.add(DropReason::RateLimited);
                } else {
                    // Flush packets queued while the handshake was in flight.
                    while let TunnResult::WriteToNetwork(d) = tunn.decapsulate(None, &[], out) {
                        match wire.send_to(d, src) {
                            Ok(_) => self.stats.count_tx(d.len()),
                            Err(_) => self.stats.drops.add(DropReason::IoError),
                        }
                    }
                }
            }
            TunnResult::WriteToTunnelV4(p, from) => {
                self.deliver_inner(IpAddr::V4(from), p, deliver);
            }
            TunnResult::WriteToTunnelV6(p, from) => {
                self.deliver_inner(IpAddr::V6(from), p, deliver);
            }
            TunnResult::Done => {}
            TunnResult::Err(e) => {
                authenticated = false;
                self.stats.drops.add(match e {
                    WireGuardError::UnderLoad => DropReason::RateLimited,
                    WireGuardError::IncorrectPacketLength
                    | WireGuardError::InvalidPacket
                    | WireGuardError::WrongPacketType => DropReason::Malformed,
                    _ => DropReason::DecryptFailed,
                });
            }
        }
        if authenticated && live.endpoint != Some(src) {
            // Roaming: follow an authenticated peer to its new address.
            live.endpoint = Some(src);
            drop(live);
            let mut eps = lock(&self.endpoints);
            eps.roamed = true;
            tracing::info!(tunnel = %self.spec.name, endpoint = %src, "peer endpoint changed");
        }
    }

    fn deliver_inner(&self, from: IpAddr, packet: &[u8], deliver: &mut dyn FnMut(&[u8])) {
        if packet.is_empty() {
            return; // keepalive
        }
        if !super::router::contains_any(&self.allowed.load(), from) {
            self.stats.drops.add(DropReason::SourceNotAllowed);
            return;
        }
        if let Some(probe) = &self.probe {
            match probe.handle(packet, Instant::now()) {
                Verdict::NotOurs => {}
                Verdict::Reply(rtt) => {
                    self.stats.rtt.get(RttSource::Probe).observe(rtt);
                    return;
                }
                Verdict::Stale | Verdict::Unmeasured => return,
            }
        }
        self.stats.rx_inner_packets.fetch_add(1, Relaxed);
        deliver(packet);
    }

    /// Periodic work (every ~250 ms): boringtun timers, handshake bookkeeping, endpoint
    /// failover. Returns true if the tunnel wants its host names re-resolved.
    pub fn tick(&self, wire: &Wire, out: &mut [u8], now: Instant, wall: SystemTime) -> bool {
        let mut live = lock(&self.live);
        let endpoint = live.endpoint;
        let newest = live.sessions.len().saturating_sub(1);
        for (i, session) in live.sessions.iter_mut().enumerate() {
            match session.tunn.update_timers(out) {
                TunnResult::WriteToNetwork(d) => self.send(wire, endpoint, d),
                TunnResult::Err(WireGuardError::ConnectionExpired)
                    if i == newest && !self.expired.swap(true, Relaxed) =>
                {
                    tracing::warn!(tunnel = %self.spec.name, "handshakes failing: peer not answering");
                }
                _ => {}
            }
        }
        // A replaced session goes once a newer one carries traffic (or it is useless).
        let newest_live = live.sessions.iter().rposition(|s| has_session(&s.tunn));
        let before = live.sessions.len();
        let mut idx = 0;
        live.sessions.retain(|s| {
            let keep = match s.retired_at {
                None => true,
                Some(at) => {
                    newest_live.is_none_or(|n| n <= idx)
                        && now.duration_since(at) < SESSION_LIFETIME
                }
            };
            idx += 1;
            keep
        });
        if live.sessions.len() != before {
            tracing::debug!(tunnel = %self.spec.name, sessions = live.sessions.len(), "replaced WireGuard session dropped");
        }
        let since = live
            .sending_ref()
            .and_then(|s| s.tunn.time_since_last_handshake());
        if let Some(since) = since {
            self.note_handshake(wall, since);
        }
        let has_session = since.is_some_and(|s| s < SESSION_LIFETIME);
        if has_session {
            self.expired.store(false, Relaxed);
        }
        if has_session != self.was_up.swap(has_session, Relaxed) {
            match (has_session, live.endpoint) {
                (true, Some(endpoint)) => {
                    tracing::info!(tunnel = %self.spec.name, %endpoint, "tunnel up: handshake complete")
                }
                (true, None) => {
                    tracing::info!(tunnel = %self.spec.name, "tunnel up: handshake complete")
                }
                // An idle tunnel's session lapses too; the next packet starts a handshake.
                (false, _) => tracing::debug!(tunnel = %self.spec.name, "session expired"),
            }
        }
        let restart = self.passive_dpd(now) && self.spec.dpd.action == DpdAction::Restart;
        let mut eps = lock(&self.endpoints);
        if has_session && !restart {
            eps.trying_since = now;
            return false;
        }
        // IKE-keyed tunnels fail over through their IKE SA.
        if self.spec.ike
            || eps.resolved.is_empty()
            || (!restart && now.duration_since(eps.trying_since) < FAILOVER_AFTER)
        {
            return false;
        }
        // No session for a while: move to the next configured endpoint and try again.
        eps.current = (eps.current + 1) % eps.resolved.len();
        eps.trying_since = now;
        eps.roamed = false;
        let next = eps.resolved[eps.current];
        drop(eps);
        if next.is_some() && next != live.endpoint {
            tracing::info!(tunnel = %self.spec.name, endpoint = ?next, "trying next endpoint");
        }
        if next.is_some() {
            live.endpoint = next;
        }
        let endpoint = live.endpoint;
        if let Some(s) = live.sessions.last_mut() {
            if let TunnResult::WriteToNetwork(d) = s.tunn.format_handshake_initiation(out, true) {
                self.send(wire, endpoint, d);
            }
        }
        // Host names are re-resolved whenever we fail over.
        self.spec
            .endpoints
            .iter()
            .any(|e| matches!(e, Endpoint::Host { .. }))
    }

    /// Passive DPD (static keys): true when the peer was just declared dead.
    fn passive_dpd(&self, now: Instant) -> bool {
        if self.spec.ike {
            return false;
        }
        let rx = self.stats.rx_packets.load(Relaxed);
        let tx = self.stats.tx_inner_packets.load(Relaxed);
        let mut p = lock(&self.passive);
        if rx != p.rx_packets {
            p.rx_packets = rx;
            p.tx_inner = tx;
            p.unanswered_since = None;
            if std::mem::replace(&mut p.dead, false) {
                tracing::info!(tunnel = %self.spec.name, "peer answering again");
            }
            return false;
        }
        if tx != p.tx_inner {
            p.tx_inner = tx;
            p.unanswered_since.get_or_insert(now);
        }
        let limit = self.spec.dpd.timeout.max(PASSIVE_DPD_MIN);
        let silent_too_long = p
            .unanswered_since
            .is_some_and(|t| now.duration_since(t) >= limit);
        if p.dead || !silent_too_long {
            return false;
        }
        p.dead = true;
        drop(p);
        self.stats.dpd_dead.fetch_add(1, Relaxed);
        tracing::warn!(
            tunnel = %self.spec.name,
            silent_for = ?limit,
            action = ?self.spec.dpd.action,
            "peer dead: data sent, nothing received"
        );
        true
    }

    /// The passive DPD declared the peer dead and it has not been heard from since.
    pub fn peer_dead(&self) -> bool {
        lock(&self.passive).dead
    }

    fn note_handshake(&self, wall: SystemTime, since: Duration) {
        let at = wall
            .checked_sub(since)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        let prev = self.last_handshake_ns.load(Relaxed);
        // boringtun's clock moves in tick steps: only a jump of more than a second
        // is a new handshake rather than rounding.
        if at.abs_diff(prev) > 1_000_000_000 {
            self.last_handshake_ns.store(at, Relaxed);
            self.stats.handshakes.fetch_add(1, Relaxed);
        }
    }

    /// Sends the data-path probe when it is due and acts on a dead peer (probe silence
    /// for the DPD timeout). Called from the timer task, without locks held.
    pub fn run_probe(&self, wire: &Wire, out: &mut [u8], now: Instant) {
        let Some(probe) = &self.probe else { return };
        let has_session = self.session_age().is_some_and(|a| a < SESSION_LIFETIME);
        // Without a session the probe still goes out (it starts a handshake and feeds
        // loss and DPD) but its reply time would include the handshake.
        if let Some(request) = probe.poll_send(now, has_session) {
            self.seal(wire, &request, out, None);
        }
        if !probe.dead_peer(now, self.spec.dpd.timeout) {
            return;
        }
        self.stats.dpd_dead.fetch_add(1, Relaxed);
        tracing::warn!(
            tunnel = %self.spec.name,
            target = %probe.target,
            timeout = ?self.spec.dpd.timeout,
            action = ?self.spec.dpd.action,
            "probe unanswered: peer considered dead"
        );
        if self.spec.dpd.action == DpdAction::Restart {
            let mut live = lock(&self.live);
            let endpoint = live.endpoint;
            if let Some(s) = live.sessions.last_mut() {
                if let TunnResult::WriteToNetwork(d) = s.tunn.format_handshake_initiation(out, true)
                {
                    self.send(wire, endpoint, d);
                }
            }
        }
    }

    /// Age of the current session (None: never had one).
    pub fn session_age(&self) -> Option<Duration> {
        lock(&self.live)
            .sending_ref()
            .and_then(|s| s.tunn.time_since_last_handshake())
    }

    /// Start a handshake now (at startup, or on operator request).
    pub fn initiate(&self, wire: &Wire, out: &mut [u8]) {
        let mut live = lock(&self.live);
        let Some(endpoint) = live.endpoint else {
            return;
        };
        if let Some(s) = live.sessions.last_mut() {
            if let TunnResult::WriteToNetwork(d) = s.tunn.format_handshake_initiation(out, false) {
                self.send(wire, Some(endpoint), d);
            }
        }
    }

    /// New resolution results for the configured endpoints (same order).
    pub fn set_resolved(&self, resolved: Vec<Option<SocketAddr>>) {
        let mut eps = lock(&self.endpoints);
        if resolved.len() != eps.resolved.len() {
            return;
        }
        eps.resolved = resolved;
        let current = eps.resolved[eps.current];
        let roamed = eps.roamed;
        drop(eps);
        let mut live = lock(&self.live);
        if !roamed && current.is_some() && live.endpoint != current {
            live.endpoint = current;
        }
    }

    /// Unix time of the last handshake (seconds, nanoseconds); (0, 0) if never.
    pub fn last_handshake(&self) -> (u64, u32) {
        let ns = self.last_handshake_ns.load(Relaxed);
        (ns / 1_000_000_000, (ns % 1_000_000_000) as u32)
    }

    pub fn state(&self) -> TunnelState {
        let live = lock(&self.live);
        let since = live
            .sending_ref()
            .and_then(|s| s.tunn.time_since_last_handshake());
        if self.peer_dead() {
            TunnelState::Down
        } else if since.is_some_and(|s| s < SESSION_LIFETIME) {
            TunnelState::Up
        } else if live.endpoint.is_none() {
            TunnelState::Waiting
        } else if self.expired.load(Relaxed) {
            TunnelState::Down
        } else {
            TunnelState::Connecting
        }
    }

    /// A new preshared key from an IKE CHILD SA: a new session beside the current one.
    /// `initiate`: start its handshake now (we made the CHILD SA, so the peer already
    /// has the key); otherwise the peer's initiation will arrive.
    pub fn install_psk(
        &self,
        child: u64,
        psk: &[u8; 32],
        initiate: bool,
        wire: &Wire,
        out: &mut [u8],
    ) {
        let mut live = lock(&self.live);
        let slot = live.free_slot();
        let keys = lock(&self.keys);
        let session = new_session(
            &keys,
            self.index,
            slot,
            Some(*psk),
            self.spec.persistent_keepalive,
            Some(child),
        );
        drop(keys);
        live.sessions.push(session);
        let endpoint = live.endpoint;
        if initiate {
            if let Some(s) = live.sessions.last_mut() {
                if let TunnResult::WriteToNetwork(d) =
                    s.tunn.format_handshake_initiation(out, false)
                {
                    self.send(wire, endpoint, d);
                }
            }
        }
    }

    /// The peer's public key in use.
    pub fn peer_public_key(&self) -> PublicKey {
        lock(&self.keys).peer
    }

    /// Every peer key accepted in handshakes: in use, announced next, replaced.
    pub fn peer_keys(&self) -> Vec<[u8; 32]> {
        let k = lock(&self.keys);
        std::iter::once(&k.peer)
            .chain(k.pending_peer.iter())
            .chain(k.previous_peer.iter())
            .map(|p| p.0)
            .collect()
    }

    fn accepts_peer(&self, peer: &PublicKey) -> bool {
        let k = lock(&self.keys);
        k.peer == *peer || k.pending_peer.as_ref() == Some(peer)
    }

    /// The peer announced its next public key: accept handshakes from it.
    pub fn announce_peer(&self, key: PublicKey) {
        let mut k = lock(&self.keys);
        if k.peer != key {
            k.pending_peer = Some(key);
        }
    }

    /// Switch to new static keys (ours and/or the peer's), make-before-break: a new
    /// session beside the current ones, which keep carrying traffic until it does, and a
    /// handshake at once. IKE-keyed tunnels use the keys from their next CHILD SA on.
    pub fn rekey_to(
        &self,
        local: Option<Arc<LocalKey>>,
        peer: Option<PublicKey>,
        wire: &Wire,
        out: &mut [u8],
    ) {
        let mut live = lock(&self.live);
        if !self.adopt_keys(&mut live, local, peer) || self.spec.ike {
            return;
        }
        let endpoint = live.endpoint;
        if let Some(s) = live.sessions.last_mut() {
            if let TunnResult::WriteToNetwork(d) = s.tunn.format_handshake_initiation(out, false) {
                self.send(wire, endpoint, d);
            }
        }
    }

    /// Makes (local, peer) the tunnel's keys and, for static-keyed tunnels, adds a
    /// session under them unless the newest already uses them. True if a session was added.
    fn adopt_keys(
        &self,
        live: &mut Live,
        local: Option<Arc<LocalKey>>,
        peer: Option<PublicKey>,
    ) -> bool {
        let mut k = lock(&self.keys);
        if let Some(l) = local {
            k.local = l;
        }
        if let Some(p) = peer {
            if p != k.peer {
                let old = std::mem::replace(&mut k.peer, p);
                k.previous_peer = Some(old);
            }
            if k.pending_peer.as_ref() == Some(&k.peer) {
                k.pending_peer = None;
            }
        }
        if self.spec.ike
            || live
                .sessions
                .last()
                .is_some_and(|s| s.local == k.local.public && s.peer == k.peer)
        {
            return false;
        }
        let slot = live.free_slot();
        live.sessions.push(new_session(
            &k,
            self.index,
            slot,
            self.spec.psk.as_ref().map(|p| *p.as_bytes()),
            self.spec.persistent_keepalive,
            None,
        ));
        tracing::info!(tunnel = %self.spec.name, "new static keys: handshake under them started");
        true
    }

    /// The CHILD SA behind a session is gone: retire the session (it stays until a newer
    /// one carries traffic).
    pub fn retire_child(&self, child: u64) {
        let mut live = lock(&self.live);
        let now = Instant::now();
        for s in live.sessions.iter_mut().filter(|s| s.child == Some(child)) {
            s.retired_at.get_or_insert(now);
        }
    }

    /// Forget every session (the IKE SA is gone and the DPD action is `clear`).
    pub fn clear_sessions(&self) {
        lock(&self.live).sessions.clear();
    }

    /// Inner source addresses accepted from the peer (negotiated selectors).
    pub fn set_allowed(&self, nets: Vec<IpNet>) {
        self.allowed.store(Arc::new(nets));
    }

    pub fn allowed(&self) -> Vec<IpNet> {
        self.allowed.load().as_ref().clone()
    }

    /// Use this endpoint (IKE found the peer there).
    pub fn set_endpoint(&self, ep: SocketAddr) {
        lock(&self.live).endpoint = Some(ep);
    }

    /// The preshared key of the session in use (for the root-only UAPI socket).
    pub fn current_psk(&self) -> Option<zeroize::Zeroizing<[u8; 32]>> {
        lock(&self.live).sending_ref().and_then(|s| s.psk.clone())
    }

    /// Number of WireGuard sessions (keys) held.
    pub fn session_count(&self) -> usize {
        lock(&self.live).sessions.len()
    }

    /// boringtun's view: (handshake RTT in ms, estimated loss 0..1).
    pub fn rtt_and_loss(&self) -> (Option<u32>, f32) {
        match lock(&self.live).sending_ref() {
            Some(s) => {
                let (_, _, _, loss, rtt) = s.tunn.stats();
                (rtt, loss)
            }
            None => (None, 0.0),
        }
    }
}

fn new_session(
    keys: &TunnelKeys,
    index: u32,
    slot: u32,
    psk: Option<[u8; 32]>,
    keepalive: Option<u16>,
    child: Option<u64>,
) -> Session {
    Session {
        tunn: Tunn::new(
            keys.local.private.to_static_secret(),
            keys.peer.to_dalek(),
            psk,
            keepalive,
            index | slot,
            Some(keys.local.limiter.clone()),
        ),
        slot,
        child,
        psk: psk.map(zeroize::Zeroizing::new),
        retired_at: None,
        local: keys.local.public,
        peer: keys.peer,
    }
}

/// A WireGuard handshake initiation (message type 1, 148 bytes).
fn is_initiation(datagram: &[u8]) -> bool {
    datagram.len() == 148 && datagram[..4] == [1, 0, 0, 0]
}
