//! The IKEv2 engine (RFC 7296): a site-level endpoint that owns every IKE SA and CHILD SA
//! of the site's keyed tunnels.
//!
//! sans-IO: the shell feeds datagrams ([`Endpoint::handle_datagram`]), the time
//! ([`Endpoint::handle_timeout`]) and commands ([`Endpoint::initiate`],
//! [`Endpoint::rekey_child`], ...), and drains datagrams ([`Endpoint::poll_transmit`]),
//! the next deadline ([`Endpoint::poll_timeout`]) and events ([`Endpoint::poll_event`]).
//! Randomness comes from the caller's [`Rng`]; nothing here reads a clock.
//!
//! What is implemented: IKE_SA_INIT (with COOKIE and INVALID_KE retries as initiator),
//! IKE_AUTH with PSK authentication, one CHILD SA per tunnel created in IKE_AUTH,
//! CREATE_CHILD_SA for CHILD SA rekey (with PFS) and IKE SA rekey, simultaneous CHILD SA
//! rekey resolved by the lowest nonce (§2.8.1), INFORMATIONAL liveness checks, DELETE of
//! CHILD and IKE SAs, INITIAL_CONTACT, retransmission with exponential back-off, window
//! size one with a cached last response, and traffic-selector narrowing (§2.9).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::crypto::{self, AeadAlg, IkeKeys, X25519Secret};
use super::ts;
use super::wire::{
    self, flags, ids, notify, Delete, ExchangeType, Header, Identity, Message, Notify, Payload,
    Proposal, TrafficSelector, Transform,
};

/// Randomness supplied by the shell (OS RNG) or a test (seeded).
pub trait Rng {
    fn fill(&mut self, buf: &mut [u8]);
}

fn rand_u64(rng: &mut dyn Rng) -> u64 {
    let mut b = [0u8; 8];
    rng.fill(&mut b);
    u64::from_be_bytes(b)
}

fn rand_nonzero_u64(rng: &mut dyn Rng) -> u64 {
    loop {
        let v = rand_u64(rng);
        if v != 0 {
            return v;
        }
    }
}

fn rand_spi(rng: &mut dyn Rng) -> u32 {
    loop {
        let mut b = [0u8; 4];
        rng.fill(&mut b);
        let v = u32::from_be_bytes(b);
        // SPIs 1..=255 are reserved (RFC 4303 §2.1).
        if v > 255 {
            return v;
        }
    }
}

fn rand_bytes<const N: usize>(rng: &mut dyn Rng) -> [u8; N] {
    let mut b = [0u8; N];
    rng.fill(&mut b);
    b
}

const NONCE_LEN: usize = 32;
/// Status notify types from here on are for private use (RFC 7296 §3.10.1).
pub const PRIVATE_NOTIFY_MIN: u16 = 40960;
/// Half-open IKE SAs (responder side) are forgotten after this long.
const HALF_OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Half-open SAs above which new IKE_SA_INIT requests are refused.
const MAX_HALF_OPEN: usize = 1024;
/// Two IKE SAs for one tunnel established this close together are a simultaneous
/// initiation, resolved by identity; further apart, the newer one replaces the older.
const SIMULTANEOUS_WINDOW: Duration = Duration::from_secs(10);
/// A rekeyed-away CHILD SA keeps working this long after its replacement is up, so
/// packets in flight are not lost.
pub const OLD_CHILD_GRACE: Duration = Duration::from_secs(5);

/// Retransmission, liveness and rekey timing for one tunnel.
#[derive(Debug, Clone)]
pub struct Timers {
    /// First retransmission after this long; then multiplied by `retransmit_factor`.
    pub retransmit_base: Duration,
    pub retransmit_factor: f64,
    /// Retransmissions before the peer is declared dead (the last one is waited out too).
    pub retransmit_tries: u32,
    /// Send a liveness check when nothing was received for this long.
    pub dpd_interval: Duration,
    /// Declare the peer dead when nothing was received for this long while a request is
    /// outstanding.
    pub dpd_timeout: Duration,
    /// CHILD SA lifetime before the original initiator rekeys it (the responder rekeys at
    /// 1.1x as a fallback, which keeps collisions rare).
    pub child_rekey: Duration,
    /// IKE SA lifetime before it is rekeyed (same rule).
    pub ike_rekey: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            retransmit_base: Duration::from_millis(500),
            retransmit_factor: 1.8,
            retransmit_tries: 5,
            dpd_interval: Duration::from_secs(10),
            dpd_timeout: Duration::from_secs(30),
            child_rekey: Duration::from_secs(120),
            ike_rekey: Duration::from_secs(4 * 3600),
        }
    }
}

/// What the CHILD SA keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildKind {
    /// ESP SAs (IPsec tunnels).
    Esp,
    /// A 32-byte WireGuard preshared key (WireGuard tunnels keyed by IKE).
    WireGuardPsk,
}

/// One tunnel's IKE configuration.
#[derive(Clone)]
pub struct PeerConfig {
    pub name: String,
    pub local_id: Identity,
    pub remote_id: Identity,
    pub psk: Zeroizing<Vec<u8>>,
    /// IKE SA proposals, in preference order (PRF is HMAC-SHA2-256, DH is X25519).
    pub ike_aeads: Vec<AeadAlg>,
    /// CHILD SA proposals (for WireGuard keying the cipher only names the SA).
    pub child_aeads: Vec<AeadAlg>,
    /// Fresh X25519 in every CHILD SA rekey.
    pub child_pfs: bool,
    /// Require the ML-KEM-768 additional key exchange (RFC 9370) when the IKE SA is made.
    pub pq: bool,
    pub local_ts: Vec<TrafficSelector>,
    pub remote_ts: Vec<TrafficSelector>,
    pub child_kind: ChildKind,
    pub timers: Timers,
    /// Where to send IKE_SA_INIT when initiating (None: wait for the peer).
    pub remote_addr: Option<SocketAddr>,
    /// The shell's path (socket) IKE_SA_INIT goes out on when we initiate; see [`Via`].
    pub via: Via,
    /// NAT traversal (RFC 7296 §2.23, RFC 3948): once IKE_SA_INIT is answered, the
    /// initiator moves to this path and remote port (4500) for the rest of the IKE SA,
    /// and ESP travels UDP-encapsulated beside it.
    pub nat_t: Option<(Via, u16)>,
}

/// Which of the shell's sockets an IKE message came in on or goes out of (e.g. the
/// site port, UDP 500, UDP 4500). The engine only remembers it per IKE SA, so answers
/// leave on the path their request arrived on, and requests follow the peer's last
/// authenticated message.
pub type Via = u8;

impl std::fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConfig")
            .field("name", &self.name)
            .field("local_id", &self.local_id)
            .field("remote_id", &self.remote_id)
            .field("psk", &"<redacted>")
            .field("remote_addr", &self.remote_addr)
            .finish_non_exhaustive()
    }
}

/// Index of a tunnel in the endpoint's configuration.
pub type PeerId = usize;

/// Identifies one CHILD SA for the life of the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChildId(pub u64);

/// Key material of a CHILD SA.
#[derive(Clone)]
pub enum ChildKeys {
    WireGuardPsk(Zeroizing<[u8; 32]>),
    Esp {
        aead: AeadAlg,
        /// key | salt for packets we receive (on `spi_in`).
        key_in: Zeroizing<Vec<u8>>,
        /// key | salt for packets we send (on `spi_out`).
        key_out: Zeroizing<Vec<u8>>,
    },
}

impl std::fmt::Debug for ChildKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::WireGuardPsk(_) => f.write_str("WireGuardPsk(<redacted>)"),
            Self::Esp { aead, .. } => write!(f, "Esp({aead:?}, <redacted>)"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ChildInfo {
    pub id: ChildId,
    pub spi_in: u32,
    pub spi_out: u32,
    pub keys: ChildKeys,
    pub local_ts: Vec<TrafficSelector>,
    pub remote_ts: Vec<TrafficSelector>,
    /// The CHILD SA this one replaces.
    pub rekey_of: Option<ChildId>,
    /// Whether a fresh key exchange went into this SA's keys.
    pub pfs: bool,
    /// We initiated the exchange that made it, so the peer already has its keys.
    pub initiator: bool,
}

/// Why an IKE SA or a tunnel's negotiation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    NoProposalChosen,
    AuthenticationFailed,
    /// The peer's selectors and ours do not overlap.
    TsUnacceptable {
        offered_local: Vec<TrafficSelector>,
        offered_remote: Vec<TrafficSelector>,
    },
    InvalidKe,
    /// An error notify we do not handle, by number.
    Notify(u16),
    Protocol(&'static str),
}

#[derive(Debug, Clone)]
pub enum Event {
    /// An IKE SA for the tunnel is established (initial or after a rekey).
    IkeUp {
        peer: PeerId,
        spi_i: u64,
        spi_r: u64,
        initiator: bool,
        rekey: bool,
        aead: AeadAlg,
    },
    IkeDown {
        peer: PeerId,
        spi_i: u64,
        spi_r: u64,
    },
    ChildUp {
        peer: PeerId,
        child: ChildInfo,
    },
    /// The CHILD SA is gone: stop using its keys.
    ChildDown {
        peer: PeerId,
        id: ChildId,
    },
    /// The peer deleted the CHILD SA (it still receives for a short grace, see
    /// [`OLD_CHILD_GRACE`]): stop sending on it now. After a rekey the peer made, this is
    /// the sign that it has the new CHILD SA installed.
    ChildRetiring {
        peer: PeerId,
        id: ChildId,
    },
    /// Retransmissions or the DPD timeout ran out.
    PeerDead {
        peer: PeerId,
    },
    Failed {
        peer: Option<PeerId>,
        failure: Failure,
    },
    /// Round-trip time of a request/response pair that needed no retransmission.
    RttSample {
        peer: PeerId,
        rtt: Duration,
    },
    /// The peer restarted (INITIAL_CONTACT): its old SAs were dropped.
    PeerRestarted {
        peer: PeerId,
    },
    /// A private-use status notify (type 40960 and up) arrived in an authenticated
    /// INFORMATIONAL request (see [`Endpoint::notify`]).
    PeerNotify {
        peer: PeerId,
        ty: u16,
        data: Vec<u8>,
    },
    /// A message was dropped; the reason is a small fixed string (a metric label).
    Dropped {
        reason: &'static str,
    },
}

/// A datagram to send: the IKE message (the shell adds the non-ESP marker).
#[derive(Debug, Clone)]
pub struct Transmit {
    pub dst: SocketAddr,
    pub via: Via,
    pub data: Vec<u8>,
}

/// State of one IKE SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SaState {
    /// We sent IKE_SA_INIT.
    InitSent,
    /// We sent IKE_AUTH.
    AuthSent,
    /// We answered IKE_SA_INIT and wait for IKE_AUTH.
    AwaitAuth,
    Established,
    /// Replaced by a rekey or being deleted: only finishes its exchanges.
    Retiring,
}

/// What a pending request of ours is about.
#[derive(Debug, Clone)]
enum RequestKind {
    Init,
    /// RFC 9370 additional key exchange (ML-KEM-768) in IKE_INTERMEDIATE.
    Intermediate {
        dk: MlKemBox,
        ek: Vec<u8>,
    },
    Auth {
        spi_in: u32,
    },
    RekeyChild {
        old: ChildId,
        spi_in: u32,
        ni: Vec<u8>,
        ke: Option<X25519SecretBox>,
    },
    RekeyIke {
        new_spi_i: u64,
        ni: Vec<u8>,
        ke: X25519SecretBox,
    },
    Liveness,
    /// A private-use status notify for the peer (INFORMATIONAL).
    Notify {
        ty: u16,
        data: Vec<u8>,
    },
    DeleteChild {
        id: ChildId,
    },
    DeleteIke,
}

/// An ML-KEM decapsulation key that can sit in a `Clone` enum.
#[derive(Clone)]
struct MlKemBox(std::sync::Arc<crypto::MlKemDecapsKey>);

impl std::fmt::Debug for MlKemBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MlKemDecapsKey(<redacted>)")
    }
}

/// An X25519 secret that can sit in a `Clone` enum.
#[derive(Clone)]
struct X25519SecretBox(std::sync::Arc<X25519Secret>);

impl std::fmt::Debug for X25519SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("X25519Secret(<redacted>)")
    }
}

#[derive(Debug)]
struct Pending {
    id: u32,
    kind: RequestKind,
    bytes: Vec<u8>,
    first_sent: Instant,
    next_at: Instant,
    retransmits: u32,
}

struct IkeSa {
    peer: Option<PeerId>,
    /// We are the original initiator of this IKE SA.
    initiator: bool,
    spi_i: u64,
    spi_r: u64,
    state: SaState,
    remote: SocketAddr,
    via: Via,
    aead: AeadAlg,
    keys: Option<IkeKeys>,
    ni: Vec<u8>,
    nr: Vec<u8>,
    /// IKE_SA_INIT request and response as sent (AUTH input).
    init_req: Vec<u8>,
    init_resp: Vec<u8>,
    /// Our X25519 secret while IKE_SA_INIT is in flight.
    dh: Option<X25519SecretBox>,
    cookie: Option<Vec<u8>>,
    next_id: u32,
    pending: Option<Pending>,
    queue: VecDeque<RequestKind>,
    peer_next_id: u32,
    last_response: Option<(u32, Vec<u8>)>,
    iv: u64,
    created: Instant,
    last_rx: Instant,
    /// The ML-KEM-768 additional key exchange was negotiated for this SA.
    pq: bool,
    /// RFC 9242 IntAuth: the initiator's value while our IKE_INTERMEDIATE is in flight,
    /// then (initiator's, responder's) once it ran.
    int_auth_i: Option<[u8; 32]>,
    int_auth: Option<([u8; 32], [u8; 32])>,
    /// Message ID of IKE_AUTH (part of the IntAuth octets).
    auth_mid: u32,
    /// Raw bytes and decrypted inner octets of the last IKE_INTERMEDIATE received.
    rx_intermediate: Option<(Vec<u8>, Vec<u8>)>,
}

impl IkeSa {
    /// An SA with nothing exchanged yet; callers fill in keys, nonces and messages.
    #[allow(clippy::too_many_arguments)]
    fn blank(
        peer: Option<PeerId>,
        initiator: bool,
        spi_i: u64,
        spi_r: u64,
        state: SaState,
        remote: SocketAddr,
        aead: AeadAlg,
        now: Instant,
    ) -> Self {
        Self {
            peer,
            initiator,
            spi_i,
            spi_r,
            state,
            remote,
            via: 0,
            aead,
            keys: None,
            ni: Vec::new(),
            nr: Vec::new(),
            init_req: Vec::new(),
            init_resp: Vec::new(),
            dh: None,
            cookie: None,
            next_id: 0,
            pending: None,
            queue: VecDeque::new(),
            peer_next_id: 0,
            last_response: None,
            iv: 0,
            created: now,
            last_rx: now,
            pq: false,
            int_auth_i: None,
            int_auth: None,
            auth_mid: 1,
            rx_intermediate: None,
        }
    }

    /// The IntAuth octets AUTH covers (None without IKE_INTERMEDIATE).
    fn int_auth_octets(&self) -> Option<Vec<u8>> {
        self.int_auth
            .map(|(i, r)| crypto::int_auth(&i, &r, self.auth_mid))
    }

    /// One IntAuth link (RFC 9242) for an IKE_INTERMEDIATE message, `raw` as sent or
    /// received and `inner` its plaintext payloads, keyed with SK_pi (sent by the original
    /// initiator) or SK_pr, of the keys that protected it.
    fn int_auth_link(&self, by_initiator: bool, raw: &[u8], inner: &[u8]) -> Option<[u8; 32]> {
        let keys = self.keys.as_ref()?;
        let sk_p = if by_initiator {
            &keys.sk_pi
        } else {
            &keys.sk_pr
        };
        let octets = crypto::int_auth_octets(raw, inner).ok()?;
        Some(crypto::int_auth_step(sk_p, None, &octets))
    }

    /// End of IKE_INTERMEDIATE: record IntAuth with the responder's message, then update
    /// the keys with the ML-KEM secret.
    fn finish_intermediate(
        &mut self,
        int_i: [u8; 32],
        raw_r: &[u8],
        inner_r: &[u8],
        shared: &[u8],
    ) -> bool {
        let Some(int_r) = self.int_auth_link(false, raw_r, inner_r) else {
            return false;
        };
        self.int_auth = Some((int_i, int_r));
        self.mix_additional(shared);
        true
    }

    /// RFC 9370 key update after the additional key exchange (same SPIs).
    fn mix_additional(&mut self, shared: &[u8]) {
        let Some(keys) = &self.keys else { return };
        let skeyseed = crypto::skeyseed_additional(&keys.sk_d, shared, &self.ni, &self.nr);
        self.keys = Some(crypto::derive_ike_keys(
            &*skeyseed, &self.ni, &self.nr, self.spi_i, self.spi_r, self.aead,
        ));
    }

    /// A request of this kind is in flight or queued.
    fn has_request(&self, f: impl Fn(&RequestKind) -> bool) -> bool {
        self.pending.as_ref().is_some_and(|p| f(&p.kind)) || self.queue.iter().any(&f)
    }

    fn our_spi(&self) -> u64 {
        if self.initiator {
            self.spi_i
        } else {
            self.spi_r
        }
    }

    fn flags(&self, response: bool) -> u8 {
        let mut f = if self.initiator { flags::INITIATOR } else { 0 };
        if response {
            f |= flags::RESPONSE;
        }
        f
    }

    /// The key that protects what we send; `None` until IKE_SA_INIT has derived keys.
    fn send_key(&self) -> Option<&[u8]> {
        let k = self.keys.as_ref()?;
        Some(if self.initiator { &k.sk_ei } else { &k.sk_er })
    }

    /// The key that protects what the peer sends; `None` until IKE_SA_INIT is done.
    fn recv_key(&self) -> Option<&[u8]> {
        let k = self.keys.as_ref()?;
        Some(if self.initiator { &k.sk_er } else { &k.sk_ei })
    }

    fn seal(
        &mut self,
        exchange: ExchangeType,
        id: u32,
        response: bool,
        inner: &[Payload],
    ) -> Option<Vec<u8>> {
        let header = Header {
            spi_i: self.spi_i,
            spi_r: self.spi_r,
            next_payload: 0,
            version: 0x20,
            exchange,
            flags: self.flags(response),
            message_id: id,
            length: 0,
        };
        // The IV advances only for a message that is sealed.
        let iv = self.iv + 1;
        let message = crypto::seal_message(self.aead, self.send_key()?, iv, header, inner);
        self.iv = iv;
        Some(message)
    }
}

/// What a new CHILD SA is derived from (RFC 7296 §2.17) and what it carries.
struct NewChild<'a> {
    /// Our SPI of the IKE SA it belongs to.
    ike: u64,
    sk_d: &'a [u8],
    /// The Diffie-Hellman shared secrets of a PFS exchange (empty: none).
    shared: &'a [&'a [u8]],
    ni: &'a [u8],
    nr: &'a [u8],
    /// We sent the request that created it.
    initiator: bool,
    spi_in: u32,
    spi_out: u32,
    aead: AeadAlg,
    local_ts: Vec<TrafficSelector>,
    remote_ts: Vec<TrafficSelector>,
    /// The CHILD SA it replaces, for a rekey.
    rekey_of: Option<ChildId>,
}

impl<'a> NewChild<'a> {
    /// The CHILD SA IKE_AUTH creates along with the IKE SA: keyed from SK_d and the
    /// IKE_SA_INIT nonces, without a Diffie-Hellman exchange of its own (§2.17).
    fn with_ike_sa(
        sa: &'a IkeSa,
        initiator: bool,
        spi_in: u32,
        spi_out: u32,
        aead: AeadAlg,
        local_ts: Vec<TrafficSelector>,
        remote_ts: Vec<TrafficSelector>,
    ) -> Option<Self> {
        let keys = sa.keys.as_ref()?;
        Some(Self {
            ike: sa.our_spi(),
            sk_d: &keys.sk_d,
            shared: &[],
            ni: &sa.ni,
            nr: &sa.nr,
            initiator,
            spi_in,
            spi_out,
            aead,
            local_ts,
            remote_ts,
            rekey_of: None,
        })
    }
}

struct Child {
    info: ChildInfo,
    /// Our SPI of the IKE SA it belongs to (follows IKE rekeys).
    ike: u64,
    created: Instant,
    /// We created it as initiator of its exchange (we rekey it first).
    initiator: bool,
    /// Retired by a rekey: deleted at this time.
    expires: Option<Instant>,
    /// Its rekey is in progress (our request pending).
    rekeying: bool,
    /// A newer CHILD SA replaced it; it only waits for its DELETE.
    replaced: bool,
    /// Nonces of the exchange that created it (for §2.8.1).
    nonces: (Vec<u8>, Vec<u8>),
}

struct PeerState {
    cfg: PeerConfig,
    /// Our SPI of the current IKE SA.
    current: Option<u64>,
    children: Vec<Child>,
    /// INITIAL_CONTACT goes into our first IKE_AUTH towards this peer.
    first_contact: bool,
}

/// All IKE state of a site.
pub struct Endpoint {
    peers: Vec<PeerState>,
    /// IKE SAs by our SPI.
    sas: HashMap<u64, IkeSa>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    next_child: u64,
    /// Our address as the shell knows it (NAT detection); unspecified is fine.
    local: SocketAddr,
    /// The path of the datagram being handled (answers go back on it).
    rx_via: Via,
}

/// IKE proposals; `pq` adds ML-KEM-768 as additional key exchange 1 (RFC 9370).
fn ike_proposals(aeads: &[AeadAlg], spi: Option<u64>, pq: bool) -> Vec<Proposal> {
    aeads
        .iter()
        .enumerate()
        .map(|(i, a)| Proposal {
            num: (i + 1) as u8,
            protocol: ids::PROTO_IKE,
            spi: spi.map(|s| s.to_be_bytes().to_vec()).unwrap_or_default(),
            transforms: [
                a.to_transform(),
                Transform {
                    ty: wire::transform_type::PRF,
                    id: ids::PRF_HMAC_SHA2_256,
                    key_len: None,
                },
                Transform {
                    ty: wire::transform_type::KE,
                    id: ids::DH_CURVE25519,
                    key_len: None,
                },
            ]
            .into_iter()
            .chain(pq.then_some(Transform {
                ty: wire::transform_type::ADDKE1,
                id: ids::KE_ML_KEM_768,
                key_len: None,
            }))
            .collect(),
        })
        .collect()
}

fn child_proposals(aeads: &[AeadAlg], spi: u32, pfs: bool) -> Vec<Proposal> {
    aeads
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut transforms = vec![a.to_transform()];
            if pfs {
                transforms.push(Transform {
                    ty: wire::transform_type::KE,
                    id: ids::DH_CURVE25519,
                    key_len: None,
                });
            }
            transforms.push(Transform {
                ty: wire::transform_type::ESN,
                id: ids::ESN_NONE,
                key_len: None,
            });
            Proposal {
                num: (i + 1) as u8,
                protocol: ids::PROTO_ESP,
                spi: spi.to_be_bytes().to_vec(),
                transforms,
            }
        })
        .collect()
}

/// The SPI of an IKE SA proposal (rekeying, RFC 7296 §3.3.1): exactly 8 bytes.
fn ike_spi(p: &Proposal) -> Option<u64> {
    <[u8; 8]>::try_from(p.spi.as_slice())
        .ok()
        .map(u64::from_be_bytes)
}

/// The AEAD of an IKE proposal we can accept (PRF SHA2-256, DH X25519, no INTEG), and
/// whether it runs the ML-KEM-768 additional key exchange (only if `pq_ok`; an ADDKE1
/// that offers nothing else we support, and no NONE, rejects the proposal).
fn accept_ike_proposal(p: &Proposal, allowed: &[AeadAlg], pq_ok: bool) -> Option<(AeadAlg, bool)> {
    if p.protocol != ids::PROTO_IKE {
        return None;
    }
    let addke: Vec<u16> = p
        .of_type(wire::transform_type::ADDKE1)
        .map(|t| t.id)
        .collect();
    let pq = if addke.is_empty() {
        false
    } else if pq_ok && addke.contains(&ids::KE_ML_KEM_768) {
        true
    } else if addke.contains(&0) {
        false
    } else {
        return None;
    };
    let mut aead = None;
    let (mut prf_ok, mut dh_ok) = (false, false);
    for t in &p.transforms {
        match t.ty {
            wire::transform_type::ENCR if aead.is_none() => {
                aead = AeadAlg::from_transform(t).filter(|a| allowed.contains(a));
            }
            wire::transform_type::PRF => prf_ok |= t.id == ids::PRF_HMAC_SHA2_256,
            wire::transform_type::KE => dh_ok |= t.id == ids::DH_CURVE25519,
            _ => {}
        }
    }
    if prf_ok && dh_ok {
        aead.map(|a| (a, pq))
    } else {
        None
    }
}

/// Picks an acceptable CHILD proposal: (aead, peer's SPI, proposal number, pfs).
fn accept_child_proposal(
    ps: &[Proposal],
    allowed: &[AeadAlg],
    need_pfs: bool,
) -> Option<(AeadAlg, u32, u8, bool)> {
    for p in ps {
        if p.protocol != ids::PROTO_ESP || p.spi.len() != 4 {
            continue;
        }
        let spi = u32::from_be_bytes([p.spi[0], p.spi[1], p.spi[2], p.spi[3]]);
        let aead = p
            .transforms
            .iter()
            .filter(|t| t.ty == wire::transform_type::ENCR)
            .find_map(|t| AeadAlg::from_transform(t).filter(|a| allowed.contains(a)));
        let dh: Vec<u16> = p
            .transforms
            .iter()
            .filter(|t| t.ty == wire::transform_type::KE)
            .map(|t| t.id)
            .collect();
        let esn_ok = p
            .transforms
            .iter()
            .filter(|t| t.ty == wire::transform_type::ESN)
            .any(|t| t.id == ids::ESN_NONE)
            || !p
                .transforms
                .iter()
                .any(|t| t.ty == wire::transform_type::ESN);
        let pfs = dh.contains(&ids::DH_CURVE25519);
        if need_pfs && !pfs {
            continue;
        }
        if !dh.is_empty() && !pfs {
            continue;
        }
        if let (Some(a), true) = (aead, esn_ok) {
            return Some((a, spi, p.num, pfs));
        }
    }
    None
}

fn find<'a, T>(payloads: &'a [Payload], f: impl Fn(&'a Payload) -> Option<T>) -> Option<T> {
    payloads.iter().find_map(f)
}

fn notify_of(payloads: &[Payload], ty: u16) -> Option<&Notify> {
    payloads.iter().find_map(|p| match p {
        Payload::Notify(n) if n.ty == ty => Some(n),
        _ => None,
    })
}

/// An error notify (type < 16384) in a response, if any.
fn error_notify(payloads: &[Payload]) -> Option<u16> {
    payloads.iter().find_map(|p| match p {
        Payload::Notify(n) if n.ty < 16384 => Some(n.ty),
        _ => None,
    })
}

fn nonce_of(payloads: &[Payload]) -> Option<&[u8]> {
    find(payloads, |p| match p {
        Payload::Nonce(n) if (16..=256).contains(&n.len()) => Some(n.as_slice()),
        _ => None,
    })
}

fn ke_of(payloads: &[Payload]) -> Option<(u16, &[u8])> {
    find(payloads, |p| match p {
        Payload::Ke { group, data } => Some((*group, data.as_slice())),
        _ => None,
    })
}

fn sa_of(payloads: &[Payload]) -> Option<&[Proposal]> {
    find(payloads, |p| match p {
        Payload::Sa(ps) => Some(ps.as_slice()),
        _ => None,
    })
}

fn ts_of(payloads: &[Payload]) -> (Option<&[TrafficSelector]>, Option<&[TrafficSelector]>) {
    (
        find(payloads, |p| match p {
            Payload::TsI(t) => Some(t.as_slice()),
            _ => None,
        }),
        find(payloads, |p| match p {
            Payload::TsR(t) => Some(t.as_slice()),
            _ => None,
        }),
    )
}

fn nat_notifies(spi_i: u64, spi_r: u64, local: SocketAddr, remote: SocketAddr) -> [Payload; 2] {
    let n = |ty, addr: SocketAddr| {
        Payload::Notify(Notify {
            protocol: 0,
            spi: Vec::new(),
            ty,
            data: crypto::nat_detection_hash(spi_i, spi_r, addr.ip(), addr.port()).to_vec(),
        })
    };
    [
        n(notify::NAT_DETECTION_SOURCE_IP, local),
        n(notify::NAT_DETECTION_DESTINATION_IP, remote),
    ]
}

/// INVALID_KE_PAYLOAD naming the group we want (§1.2).
fn invalid_ke(group: u16) -> Payload {
    Payload::Notify(Notify {
        protocol: 0,
        spi: vec![],
        ty: notify::INVALID_KE_PAYLOAD,
        data: group.to_be_bytes().to_vec(),
    })
}

fn status(ty: u16) -> Payload {
    Payload::Notify(Notify {
        protocol: 0,
        spi: Vec::new(),
        ty,
        data: Vec::new(),
    })
}

fn min_nonce<'a>(ns: impl IntoIterator<Item = &'a [u8]>) -> Option<&'a [u8]> {
    ns.into_iter().min()
}

impl Endpoint {
    pub fn new(peers: Vec<PeerConfig>, local: SocketAddr) -> Self {
        Self {
            peers: peers
                .into_iter()
                .map(|cfg| PeerState {
                    cfg,
                    current: None,
                    children: Vec::new(),
                    first_contact: true,
                })
                .collect(),
            sas: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            next_child: 1,
            local: if local.ip().is_unspecified() {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), local.port())
            } else {
                local
            },
            rx_via: 0,
        }
    }

    pub fn peer_config(&self, peer: PeerId) -> &PeerConfig {
        &self.peers[peer].cfg
    }

    pub fn set_remote_addr(&mut self, peer: PeerId, addr: Option<SocketAddr>) {
        self.peers[peer].cfg.remote_addr = addr;
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether the tunnel has an established IKE SA.
    pub fn is_established(&self, peer: PeerId) -> bool {
        self.peers[peer]
            .current
            .and_then(|s| self.sas.get(&s))
            .is_some_and(|sa| sa.state == SaState::Established)
    }

    /// Whether an IKE SA for the tunnel is being negotiated or up.
    pub fn is_active(&self, peer: PeerId) -> bool {
        self.sas
            .values()
            .any(|sa| sa.peer == Some(peer) && sa.state != SaState::Retiring)
    }

    /// SPIs and age of the tunnel's current IKE SA.
    /// Whether the tunnel's current IKE SA ran the post-quantum key exchange.
    pub fn ike_sa_pq(&self, peer: PeerId) -> bool {
        self.peers[peer]
            .current
            .and_then(|s| self.sas.get(&s))
            .is_some_and(|sa| sa.pq)
    }

    /// Where the tunnel's current IKE SA talks to the peer (after any float), and on
    /// which path: UDP-encapsulated ESP goes to the same address.
    pub fn remote_of(&self, peer: PeerId) -> Option<(SocketAddr, Via)> {
        let sa = self.sas.get(&self.peers[peer].current?)?;
        Some((sa.remote, sa.via))
    }

    pub fn ike_sa_info(&self, peer: PeerId) -> Option<(u64, u64, AeadAlg, bool)> {
        let sa = self.sas.get(&self.peers[peer].current?)?;
        Some((sa.spi_i, sa.spi_r, sa.aead, sa.initiator))
    }

    /// The tunnel's live CHILD SAs (newest last).
    pub fn children(&self, peer: PeerId) -> impl Iterator<Item = &ChildInfo> {
        self.peers[peer]
            .children
            .iter()
            .filter(|c| c.expires.is_none() && !c.replaced)
            .map(|c| &c.info)
    }

    /// When the tunnel's current CHILD SA will be rekeyed.
    pub fn next_child_rekey(&self, peer: PeerId) -> Option<Instant> {
        let p = &self.peers[peer];
        p.children
            .iter()
            .filter(|c| c.expires.is_none() && !c.replaced)
            .map(|c| c.created + rekey_after(p.cfg.timers.child_rekey, c.initiator))
            .min()
    }

    /// The earliest time `handle_timeout` has work to do. Only deadlines that
    /// `handle_timeout` will act on are reported, so a caller never spins.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut at = |x: Instant| t = Some(t.map_or(x, |t| t.min(x)));
        for (spi, sa) in &self.sas {
            if let Some(p) = &sa.pending {
                at(p.next_at);
                if let Some(peer) = sa.peer {
                    if sa.state != SaState::InitSent {
                        at(sa.last_rx + self.peers[peer].cfg.timers.dpd_timeout);
                    }
                }
            }
            match sa.state {
                SaState::AwaitAuth => at(sa.created + HALF_OPEN_TIMEOUT),
                SaState::Established => {
                    let Some(peer) = sa.peer else { continue };
                    if self.peers[peer].current != Some(*spi) {
                        continue;
                    }
                    let timers = &self.peers[peer].cfg.timers;
                    if sa.pending.is_none() {
                        at(sa.last_rx + timers.dpd_interval);
                    }
                    if !sa.has_request(|k| matches!(k, RequestKind::RekeyIke { .. })) {
                        at(sa.created + rekey_after(timers.ike_rekey, sa.initiator));
                    }
                }
                _ => {}
            }
        }
        for (peer, p) in self.peers.iter().enumerate() {
            let can_rekey = self.is_established(peer);
            for c in &p.children {
                match c.expires {
                    Some(e) => at(e),
                    None if can_rekey && !c.rekeying && !c.replaced => {
                        at(c.created + rekey_after(p.cfg.timers.child_rekey, c.initiator))
                    }
                    None => {}
                }
            }
        }
        t
    }

    /// An SA lacks what its stage guarantees (keys after IKE_SA_INIT, an initiator's
    /// peer or DH secret). No message can cause that, only a bug in this engine: debug
    /// builds stop here, a release daemon drops the message and keeps running.
    fn broken_sa(&mut self, what: &'static str) {
        if cfg!(debug_assertions) {
            panic!("IKE SA state: {what}");
        }
        self.event(Event::Dropped {
            reason: "broken_sa",
        });
    }

    /// The keys of an SA past IKE_SA_INIT; a missing one is a [`broken_sa`](Self::broken_sa).
    fn keys_of<'a>(&mut self, sa: &'a IkeSa) -> Option<&'a IkeKeys> {
        let keys = sa.keys.as_ref();
        if keys.is_none() {
            self.broken_sa("authenticated SA without keys");
        }
        keys
    }

    fn event(&mut self, e: Event) {
        self.events.push_back(e);
    }

    fn send(&mut self, dst: SocketAddr, via: Via, data: Vec<u8>) {
        self.transmits.push_back(Transmit { dst, via, data });
    }

    // ---------------------------------------------------------------- commands

    /// Start IKE_SA_INIT towards the tunnel's configured address (no-op if one is
    /// already in progress or up, or no address is known).
    pub fn initiate(&mut self, peer: PeerId, now: Instant, rng: &mut dyn Rng) {
        if self.is_active(peer) {
            return;
        }
        let Some(remote) = self.peers[peer].cfg.remote_addr else {
            return;
        };
        let spi_i = self.fresh_ike_spi(rng);
        let ni = rand_bytes::<NONCE_LEN>(rng).to_vec();
        let dh = X25519Secret::from_bytes(rand_bytes::<32>(rng));
        let aead = self.peers[peer].cfg.ike_aeads[0];
        let mut sa = IkeSa {
            ni,
            dh: Some(X25519SecretBox(std::sync::Arc::new(dh))),
            ..IkeSa::blank(
                Some(peer),
                true,
                spi_i,
                0,
                SaState::InitSent,
                remote,
                aead,
                now,
            )
        };
        sa.via = self.peers[peer].cfg.via;
        let Some(bytes) = self.build_init_request(&sa, peer) else {
            self.broken_sa("initiator SA without a DH secret");
            return;
        };
        sa.init_req = bytes.clone();
        self.start_request(&mut sa, RequestKind::Init, bytes, now);
        self.sas.insert(spi_i, sa);
    }

    /// The IKE_SA_INIT request of an SA we initiate for `peer`; `None` without our DH
    /// secret (an initiator's SA always has one).
    fn build_init_request(&self, sa: &IkeSa, peer: PeerId) -> Option<Vec<u8>> {
        let cfg = &self.peers[peer].cfg;
        let dh = sa.dh.as_ref()?;
        let mut payloads = Vec::new();
        if let Some(c) = &sa.cookie {
            payloads.push(Payload::Notify(Notify {
                protocol: 0,
                spi: Vec::new(),
                ty: notify::COOKIE,
                data: c.clone(),
            }));
        }
        payloads.push(Payload::Sa(ike_proposals(&cfg.ike_aeads, None, cfg.pq)));
        payloads.push(Payload::Ke {
            group: ids::DH_CURVE25519,
            data: dh.0.public().to_vec(),
        });
        payloads.push(Payload::Nonce(sa.ni.clone()));
        payloads.extend(nat_notifies(sa.spi_i, 0, self.local, sa.remote));
        let header = Header {
            spi_i: sa.spi_i,
            spi_r: 0,
            next_payload: 0,
            version: 0x20,
            exchange: ExchangeType::IkeSaInit,
            flags: flags::INITIATOR,
            message_id: 0,
            length: 0,
        };
        Some(Message::encode_plain(header, &payloads))
    }

    /// Rekey the tunnel's newest CHILD SA now (operator `rotate`, or a test).
    pub fn rekey_child(&mut self, peer: PeerId, now: Instant, rng: &mut dyn Rng) {
        let newest = self.peers[peer]
            .children
            .iter()
            .filter(|c| c.expires.is_none() && !c.rekeying && !c.replaced)
            .map(|c| c.info.id)
            .max();
        if let Some(id) = newest {
            self.queue_child_rekey(peer, id, now, rng);
        }
    }

    /// Rekey the tunnel's IKE SA now.
    pub fn rekey_ike(&mut self, peer: PeerId, now: Instant, rng: &mut dyn Rng) {
        if let Some(spi) = self.peers[peer].current {
            self.queue_ike_rekey(spi, now, rng);
        }
    }

    /// Delete the tunnel's SAs (shutdown): sends DELETE for the IKE SA, forgets everything.
    pub fn close(&mut self, peer: PeerId, now: Instant) {
        if let Some(spi) = self.peers[peer].current.take() {
            if let Some(mut sa) = self.sas.remove(&spi) {
                if sa.state == SaState::Established {
                    let id = sa.next_id;
                    let delete = sa.seal(
                        ExchangeType::Informational,
                        id,
                        false,
                        &[Payload::Delete(Delete {
                            protocol: ids::PROTO_IKE,
                            spi_size: 0,
                            spis: vec![],
                        })],
                    );
                    if let Some(bytes) = delete {
                        self.send(sa.remote, sa.via, bytes);
                    }
                }
                self.event(Event::IkeDown {
                    peer,
                    spi_i: sa.spi_i,
                    spi_r: sa.spi_r,
                });
            }
        }
        self.sas.retain(|_, sa| sa.peer != Some(peer));
        self.drop_children(peer);
        let _ = now;
    }

    /// Send a private-use status notify (type 40960 and up, RFC 7296 §3.10.1) to the peer
    /// over the tunnel's established IKE SA; false if there is none. The peer sees
    /// [`Event::PeerNotify`].
    pub fn notify(&mut self, peer: PeerId, ty: u16, data: Vec<u8>, now: Instant) -> bool {
        debug_assert!(ty >= PRIVATE_NOTIFY_MIN);
        if !self.is_established(peer) {
            return false;
        }
        let Some(spi) = self.peers[peer].current else {
            return false;
        };
        self.queue_request(spi, RequestKind::Notify { ty, data }, now);
        true
    }

    /// New identities and PSK for the tunnel's next IKE_AUTH (the SAs up now stay).
    pub fn set_auth(
        &mut self,
        peer: PeerId,
        local_id: Identity,
        remote_id: Identity,
        psk: Zeroizing<Vec<u8>>,
    ) {
        let cfg = &mut self.peers[peer].cfg;
        cfg.local_id = local_id;
        cfg.remote_id = remote_id;
        cfg.psk = psk;
    }

    /// Data-plane traffic from the peer counts as liveness (no DPD probe needed).
    pub fn note_peer_activity(&mut self, peer: PeerId, now: Instant) {
        if let Some(sa) = self.peers[peer].current.and_then(|s| self.sas.get_mut(&s)) {
            if sa.pending.is_none() {
                sa.last_rx = sa.last_rx.max(now);
            }
        }
    }

    fn drop_children(&mut self, peer: PeerId) {
        let ids: Vec<ChildId> = self.peers[peer]
            .children
            .drain(..)
            .map(|c| c.info.id)
            .collect();
        for id in ids {
            self.event(Event::ChildDown { peer, id });
        }
    }

    fn queue_child_rekey(&mut self, peer: PeerId, old: ChildId, now: Instant, rng: &mut dyn Rng) {
        let Some(spi) = self.peers[peer].current else {
            return;
        };
        if !self
            .sas
            .get(&spi)
            .is_some_and(|sa| sa.state == SaState::Established)
        {
            return;
        }
        let Some(c) = self.peers[peer]
            .children
            .iter_mut()
            .find(|c| c.info.id == old)
        else {
            return;
        };
        if c.rekeying || c.replaced || c.expires.is_some() {
            return;
        }
        c.rekeying = true;
        let pfs = self.peers[peer].cfg.child_pfs;
        let spi_in = self.fresh_spi(rng);
        let kind = RequestKind::RekeyChild {
            old,
            spi_in,
            ni: rand_bytes::<NONCE_LEN>(rng).to_vec(),
            ke: pfs.then(|| {
                X25519SecretBox(std::sync::Arc::new(X25519Secret::from_bytes(rand_bytes::<
                    32,
                >(
                    rng
                ))))
            }),
        };
        self.queue_request(spi, kind, now);
    }

    fn queue_ike_rekey(&mut self, spi: u64, now: Instant, rng: &mut dyn Rng) {
        if !self
            .sas
            .get(&spi)
            .is_some_and(|sa| sa.state == SaState::Established)
        {
            return;
        }
        if self.sas[&spi].has_request(|k| matches!(k, RequestKind::RekeyIke { .. })) {
            return;
        }
        let new_spi_i = self.fresh_ike_spi(rng);
        let kind = RequestKind::RekeyIke {
            new_spi_i,
            ni: rand_bytes::<NONCE_LEN>(rng).to_vec(),
            ke: X25519SecretBox(std::sync::Arc::new(X25519Secret::from_bytes(rand_bytes::<
                32,
            >(
                rng
            )))),
        };
        self.queue_request(spi, kind, now);
    }

    fn queue_request(&mut self, spi: u64, kind: RequestKind, now: Instant) {
        let Some(mut sa) = self.sas.remove(&spi) else {
            return;
        };
        sa.queue.push_back(kind);
        self.pump(&mut sa, now);
        self.sas.insert(spi, sa);
    }

    /// Send the next queued request if the window (size one) is free.
    fn pump(&mut self, sa: &mut IkeSa, now: Instant) {
        while sa.pending.is_none() {
            let Some(kind) = sa.queue.pop_front() else {
                return;
            };
            if let Some(bytes) = self.build_request(sa, &kind) {
                self.start_request(sa, kind, bytes, now);
            }
        }
    }

    fn start_request(&mut self, sa: &mut IkeSa, kind: RequestKind, bytes: Vec<u8>, now: Instant) {
        let base = sa.peer.map_or(Timers::default().retransmit_base, |p| {
            self.peers[p].cfg.timers.retransmit_base
        });
        let id = if matches!(kind, RequestKind::Init) {
            0
        } else {
            sa.next_id
        };
        sa.pending = Some(Pending {
            id,
            kind,
            bytes: bytes.clone(),
            first_sent: now,
            next_at: now + base,
            retransmits: 0,
        });
        self.send(sa.remote, sa.via, bytes);
    }

    fn build_request(&mut self, sa: &mut IkeSa, kind: &RequestKind) -> Option<Vec<u8>> {
        let peer = sa.peer?;
        let id = sa.next_id;
        let cfg = self.peers[peer].cfg.clone();
        let (exchange, inner): (ExchangeType, Vec<Payload>) = match kind {
            RequestKind::Init => return None,
            RequestKind::Intermediate { ek, .. } => {
                let inner = [Payload::Ke {
                    group: ids::KE_ML_KEM_768,
                    data: ek.clone(),
                }];
                let bytes = sa.seal(ExchangeType::IkeIntermediate, id, false, &inner)?;
                // IntAuth_i1 = prf(SK_pi, our message as RFC 9242 adjusts it), keys of now.
                sa.int_auth_i =
                    Some(sa.int_auth_link(true, &bytes, &wire::encode_payloads(&inner).1)?);
                return Some(bytes);
            }
            RequestKind::Auth { spi_in } => {
                let spi_in = *spi_in;
                sa.auth_mid = id;
                let int_auth = sa.int_auth_octets();
                let keys = sa.keys.as_ref()?;
                let idi = cfg.local_id.clone();
                let auth = crypto::psk_auth(
                    &cfg.psk,
                    &sa.init_req,
                    &sa.nr,
                    &keys.sk_pi,
                    &idi.body(),
                    int_auth.as_deref(),
                );
                let mut inner = vec![Payload::IdI(idi)];
                if self.peers[peer].first_contact {
                    inner.push(status(notify::INITIAL_CONTACT));
                }
                inner.push(Payload::IdR(cfg.remote_id.clone()));
                inner.push(Payload::Auth {
                    method: ids::AUTH_PSK,
                    data: auth.to_vec(),
                });
                inner.push(Payload::Sa(child_proposals(
                    &cfg.child_aeads,
                    spi_in,
                    false,
                )));
                inner.push(Payload::TsI(cfg.local_ts.clone()));
                inner.push(Payload::TsR(cfg.remote_ts.clone()));
                (ExchangeType::IkeAuth, inner)
            }
            RequestKind::RekeyChild {
                old,
                spi_in,
                ni,
                ke,
            } => {
                let c = self.peers[peer]
                    .children
                    .iter()
                    .find(|c| c.info.id == *old)?;
                let mut inner = vec![
                    Payload::Notify(Notify {
                        protocol: ids::PROTO_ESP,
                        spi: c.info.spi_in.to_be_bytes().to_vec(),
                        ty: notify::REKEY_SA,
                        data: Vec::new(),
                    }),
                    Payload::Sa(child_proposals(&cfg.child_aeads, *spi_in, ke.is_some())),
                    Payload::Nonce(ni.clone()),
                ];
                if let Some(k) = ke {
                    inner.push(Payload::Ke {
                        group: ids::DH_CURVE25519,
                        data: k.0.public().to_vec(),
                    });
                }
                inner.push(Payload::TsI(c.info.local_ts.clone()));
                inner.push(Payload::TsR(c.info.remote_ts.clone()));
                (ExchangeType::CreateChildSa, inner)
            }
            RequestKind::RekeyIke { new_spi_i, ni, ke } => (
                ExchangeType::CreateChildSa,
                vec![
                    Payload::Sa(ike_proposals(&[sa.aead], Some(*new_spi_i), false)),
                    Payload::Nonce(ni.clone()),
                    Payload::Ke {
                        group: ids::DH_CURVE25519,
                        data: ke.0.public().to_vec(),
                    },
                ],
            ),
            RequestKind::Liveness => (ExchangeType::Informational, vec![]),
            RequestKind::Notify { ty, data } => (
                ExchangeType::Informational,
                vec![Payload::Notify(Notify {
                    protocol: 0,
                    spi: Vec::new(),
                    ty: *ty,
                    data: data.clone(),
                })],
            ),
            RequestKind::DeleteChild { id: child } => {
                let c = self.peers[peer]
                    .children
                    .iter()
                    .find(|c| c.info.id == *child)?;
                (
                    ExchangeType::Informational,
                    vec![Payload::Delete(Delete {
                        protocol: ids::PROTO_ESP,
                        spi_size: 4,
                        spis: vec![c.info.spi_in.to_be_bytes().to_vec()],
                    })],
                )
            }
            RequestKind::DeleteIke => (
                ExchangeType::Informational,
                vec![Payload::Delete(Delete {
                    protocol: ids::PROTO_IKE,
                    spi_size: 0,
                    spis: vec![],
                })],
            ),
        };
        sa.seal(exchange, id, false, &inner)
    }

    /// A fresh IKE SPI of ours, unique on this endpoint.
    fn fresh_ike_spi(&self, rng: &mut dyn Rng) -> u64 {
        loop {
            let s = rand_nonzero_u64(rng);
            if !self.sas.contains_key(&s) {
                return s;
            }
        }
    }

    /// A fresh inbound CHILD SPI, unique on this endpoint.
    fn fresh_spi(&self, rng: &mut dyn Rng) -> u32 {
        loop {
            let spi = rand_spi(rng);
            if !self
                .peers
                .iter()
                .flat_map(|p| &p.children)
                .any(|c| c.info.spi_in == spi)
            {
                return spi;
            }
        }
    }

    // ---------------------------------------------------------------- timers

    pub fn handle_timeout(&mut self, now: Instant, rng: &mut dyn Rng) {
        let spis: Vec<u64> = self.sas.keys().copied().collect();
        for spi in spis {
            let Some(mut sa) = self.sas.remove(&spi) else {
                continue;
            };
            let keep = self.sa_timeout(&mut sa, now);
            if keep {
                self.sas.insert(spi, sa);
            }
        }
        // Rekeys and expiries of CHILD SAs; IKE SA rekeys; liveness.
        for peer in 0..self.peers.len() {
            let timers = self.peers[peer].cfg.timers.clone();
            let mut expired = Vec::new();
            let mut due = Vec::new();
            for c in &self.peers[peer].children {
                match c.expires {
                    Some(e) if e <= now => expired.push(c.info.id),
                    None if !c.rekeying
                        && !c.replaced
                        && c.created + rekey_after(timers.child_rekey, c.initiator) <= now =>
                    {
                        due.push(c.info.id)
                    }
                    _ => {}
                }
            }
            for id in expired {
                self.peers[peer].children.retain(|c| c.info.id != id);
                self.event(Event::ChildDown { peer, id });
            }
            for id in due {
                self.queue_child_rekey(peer, id, now, rng);
            }
            if let Some(spi) = self.peers[peer].current {
                let (rekey_due, liveness_due) = match self.sas.get(&spi) {
                    Some(sa) if sa.state == SaState::Established => (
                        sa.created + rekey_after(timers.ike_rekey, sa.initiator) <= now,
                        sa.pending.is_none()
                            && sa.queue.is_empty()
                            && sa.last_rx + timers.dpd_interval <= now,
                    ),
                    _ => (false, false),
                };
                if rekey_due {
                    self.queue_ike_rekey(spi, now, rng);
                }
                if liveness_due {
                    self.queue_request(spi, RequestKind::Liveness, now);
                }
            }
        }
    }

    /// Retransmission and timeouts of one SA. Returns false if the SA is gone.
    fn sa_timeout(&mut self, sa: &mut IkeSa, now: Instant) -> bool {
        if sa.state == SaState::AwaitAuth && sa.created + HALF_OPEN_TIMEOUT <= now {
            return false;
        }
        let Some(p) = sa.pending.as_mut() else {
            return true;
        };
        let timers = sa
            .peer
            .map_or_else(Timers::default, |peer| self.peers[peer].cfg.timers.clone());
        let silent_too_long =
            sa.last_rx + timers.dpd_timeout <= now && sa.state != SaState::InitSent;
        if p.next_at > now && !silent_too_long {
            return true;
        }
        if p.retransmits >= timers.retransmit_tries || silent_too_long {
            // Give up: the peer is dead.
            self.sa_dead(sa);
            return false;
        }
        p.retransmits += 1;
        let wait = timers
            .retransmit_base
            .mul_f64(timers.retransmit_factor.powi(p.retransmits as i32));
        p.next_at = now + wait;
        let bytes = p.bytes.clone();
        self.send(sa.remote, sa.via, bytes);
        true
    }

    fn sa_dead(&mut self, sa: &IkeSa) {
        let Some(peer) = sa.peer else { return };
        let current = self.peers[peer].current == Some(sa.our_spi());
        if current || sa.state == SaState::InitSent || sa.state == SaState::AuthSent {
            if current {
                self.peers[peer].current = None;
                self.event(Event::IkeDown {
                    peer,
                    spi_i: sa.spi_i,
                    spi_r: sa.spi_r,
                });
                self.drop_children(peer);
            }
            // Everything else of this peer goes too (retiring SAs, half-open ones).
            let ours = sa.our_spi();
            self.sas
                .retain(|s, other| *s == ours || other.peer != Some(peer));
            self.event(Event::PeerDead { peer });
        }
    }

    // ---------------------------------------------------------------- input

    /// An IKE message received from `from` (without the non-ESP marker) on path 0.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
        rng: &mut dyn Rng,
    ) {
        self.handle_datagram_via(now, from, 0, data, rng);
    }

    /// An IKE message received from `from` on the shell's path `via`.
    pub fn handle_datagram_via(
        &mut self,
        now: Instant,
        from: SocketAddr,
        via: Via,
        data: &[u8],
        rng: &mut dyn Rng,
    ) {
        self.rx_via = via;
        let header = match Header::decode(data) {
            Ok(h) => h,
            Err(e) => {
                self.event(Event::Dropped { reason: e.kind() });
                return;
            }
        };
        if header.version >> 4 != 2 {
            self.event(Event::Dropped {
                reason: "bad_version",
            });
            return;
        }
        // Our SPI: the initiator's if the sender is the responder of the SA, and vice versa.
        let our_spi = if header.from_initiator() {
            header.spi_r
        } else {
            header.spi_i
        };
        if header.exchange == ExchangeType::IkeSaInit && !header.is_response() {
            self.init_request(now, from, data, header, rng);
            return;
        }
        let Some(mut sa) = self.sas.remove(&our_spi) else {
            self.event(Event::Dropped {
                reason: "unknown_spi",
            });
            return;
        };
        let keep = if header.exchange == ExchangeType::IkeSaInit {
            self.init_response(&mut sa, now, from, data, header, rng)
        } else {
            self.encrypted(&mut sa, now, from, data, header, rng)
        };
        if keep {
            let spi = sa.our_spi();
            self.sas.insert(spi, sa);
        }
    }

    fn init_request(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
        header: Header,
        rng: &mut dyn Rng,
    ) {
        if header.message_id != 0 || header.spi_r != 0 || header.spi_i == 0 {
            self.event(Event::Dropped {
                reason: "bad_ike_sa_init",
            });
            return;
        }
        // A retransmitted IKE_SA_INIT: answer with the same response.
        if let Some(sa) = self
            .sas
            .values()
            .find(|sa| !sa.initiator && sa.spi_i == header.spi_i && sa.remote == from)
        {
            if sa.init_req == data {
                let resp = sa.init_resp.clone();
                self.send(from, self.rx_via, resp);
            }
            return;
        }
        let half_open = self
            .sas
            .values()
            .filter(|sa| sa.state == SaState::AwaitAuth)
            .count();
        if half_open >= MAX_HALF_OPEN {
            self.event(Event::Dropped {
                reason: "too_many_half_open",
            });
            return;
        }
        let msg = match Message::decode(data) {
            Ok(m) => m,
            Err(e) => {
                self.event(Event::Dropped { reason: e.kind() });
                return;
            }
        };
        let answer_error = |this: &mut Self, ty: u16, data: Vec<u8>| {
            let h = Header {
                spi_i: header.spi_i,
                spi_r: 0,
                next_payload: 0,
                version: 0x20,
                exchange: ExchangeType::IkeSaInit,
                flags: flags::RESPONSE,
                message_id: 0,
                length: 0,
            };
            let bytes = Message::encode_plain(
                h,
                &[Payload::Notify(Notify {
                    protocol: 0,
                    spi: Vec::new(),
                    ty,
                    data,
                })],
            );
            this.send(from, this.rx_via, bytes);
        };
        if msg
            .payloads
            .iter()
            .any(|p| matches!(p, Payload::Unknown { critical: true, .. }))
        {
            answer_error(self, notify::UNSUPPORTED_CRITICAL_PAYLOAD, Vec::new());
            return;
        }
        let allowed: Vec<AeadAlg> = self
            .peers
            .iter()
            .flat_map(|p| p.cfg.ike_aeads.iter().copied())
            .collect();
        let pq_ok = self.peers.iter().any(|p| p.cfg.pq);
        let chosen = sa_of(&msg.payloads).and_then(|ps| {
            ps.iter()
                .find_map(|p| accept_ike_proposal(p, &allowed, pq_ok).map(|(a, pq)| (p.num, a, pq)))
        });
        let Some((num, aead, pq)) = chosen else {
            answer_error(self, notify::NO_PROPOSAL_CHOSEN, Vec::new());
            self.event(Event::Failed {
                peer: None,
                failure: Failure::NoProposalChosen,
            });
            return;
        };
        let (Some((group, ke)), Some(ni)) = (ke_of(&msg.payloads), nonce_of(&msg.payloads)) else {
            answer_error(self, notify::INVALID_SYNTAX, Vec::new());
            return;
        };
        if group != ids::DH_CURVE25519 {
            answer_error(
                self,
                notify::INVALID_KE_PAYLOAD,
                ids::DH_CURVE25519.to_be_bytes().to_vec(),
            );
            return;
        }
        let dh = X25519Secret::from_bytes(rand_bytes::<32>(rng));
        let Some(shared) = dh.diffie_hellman(ke) else {
            answer_error(self, notify::INVALID_SYNTAX, Vec::new());
            return;
        };
        let spi_r = self.fresh_ike_spi(rng);
        let nr = rand_bytes::<NONCE_LEN>(rng).to_vec();
        let skeyseed = crypto::skeyseed(ni, &nr, &*shared);
        let keys = crypto::derive_ike_keys(&*skeyseed, ni, &nr, header.spi_i, spi_r, aead);
        let mut chosen_proposal = ike_proposals(&[aead], None, pq);
        chosen_proposal[0].num = num;
        let mut payloads = vec![
            Payload::Sa(chosen_proposal),
            Payload::Ke {
                group: ids::DH_CURVE25519,
                data: dh.public().to_vec(),
            },
            Payload::Nonce(nr.clone()),
        ];
        payloads.extend(nat_notifies(header.spi_i, spi_r, self.local, from));
        let h = Header {
            spi_i: header.spi_i,
            spi_r,
            next_payload: 0,
            version: 0x20,
            exchange: ExchangeType::IkeSaInit,
            flags: flags::RESPONSE,
            message_id: 0,
            length: 0,
        };
        let resp = Message::encode_plain(h, &payloads);
        self.send(from, self.rx_via, resp.clone());
        self.sas.insert(
            spi_r,
            IkeSa {
                keys: Some(keys),
                ni: ni.to_vec(),
                nr,
                init_req: data.to_vec(),
                init_resp: resp,
                peer_next_id: 1,
                pq,
                via: self.rx_via,
                ..IkeSa::blank(
                    None,
                    false,
                    header.spi_i,
                    spi_r,
                    SaState::AwaitAuth,
                    from,
                    aead,
                    now,
                )
            },
        );
    }

    fn init_response(
        &mut self,
        sa: &mut IkeSa,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
        header: Header,
        rng: &mut dyn Rng,
    ) -> bool {
        if sa.state != SaState::InitSent || !sa.initiator || header.message_id != 0 {
            self.event(Event::Dropped {
                reason: "unexpected_ike_sa_init",
            });
            return true;
        }
        let msg = match Message::decode(data) {
            Ok(m) => m,
            Err(e) => {
                self.event(Event::Dropped { reason: e.kind() });
                return true;
            }
        };
        let Some(peer) = sa.peer else {
            self.broken_sa("initiator SA without a peer");
            return false;
        };
        if let Some(c) = notify_of(&msg.payloads, notify::COOKIE) {
            if c.data.is_empty() || c.data.len() > 64 {
                self.event(Event::Dropped {
                    reason: "bad_cookie",
                });
                return true;
            }
            sa.cookie = Some(c.data.clone());
            let Some(bytes) = self.build_init_request(sa, peer) else {
                self.broken_sa("initiator SA without a DH secret");
                return false;
            };
            sa.init_req = bytes.clone();
            sa.pending = None;
            self.start_request(sa, RequestKind::Init, bytes, now);
            return true;
        }
        if let Some(err) = error_notify(&msg.payloads) {
            let failure = match err {
                notify::NO_PROPOSAL_CHOSEN => Failure::NoProposalChosen,
                notify::INVALID_KE_PAYLOAD => Failure::InvalidKe,
                other => Failure::Notify(other),
            };
            self.event(Event::Failed {
                peer: Some(peer),
                failure,
            });
            return false;
        }
        let cfg_pq = self.peers[peer].cfg.pq;
        let chosen = sa_of(&msg.payloads)
            .filter(|ps| ps.len() == 1)
            .and_then(|ps| accept_ike_proposal(&ps[0], &self.peers[peer].cfg.ike_aeads, cfg_pq));
        if chosen.is_some_and(|(_, pq)| cfg_pq && !pq) {
            // We only offered ML-KEM as mandatory: a responder dropping it is a downgrade.
            self.event(Event::Failed {
                peer: Some(peer),
                failure: Failure::Protocol("responder refused the post-quantum key exchange"),
            });
            return false;
        }
        let (Some((aead, pq)), Some((ids::DH_CURVE25519, ke)), Some(nr)) =
            (chosen, ke_of(&msg.payloads), nonce_of(&msg.payloads))
        else {
            self.event(Event::Failed {
                peer: Some(peer),
                failure: Failure::Protocol("malformed IKE_SA_INIT response"),
            });
            return false;
        };
        let Some(shared) = sa.dh.as_ref().and_then(|d| d.0.diffie_hellman(ke)) else {
            self.event(Event::Failed {
                peer: Some(peer),
                failure: Failure::Protocol("invalid KE"),
            });
            return false;
        };
        if header.spi_r == 0 {
            self.event(Event::Dropped {
                reason: "zero_responder_spi",
            });
            return true;
        }
        self.rtt_sample(sa, now);
        sa.spi_r = header.spi_r;
        sa.aead = aead;
        sa.nr = nr.to_vec();
        let skeyseed = crypto::skeyseed(&sa.ni, &sa.nr, &*shared);
        sa.keys = Some(crypto::derive_ike_keys(
            &*skeyseed, &sa.ni, &sa.nr, sa.spi_i, sa.spi_r, aead,
        ));
        sa.dh = None;
        sa.init_resp = data.to_vec();
        sa.remote = from;
        if let Some((via, port)) = self.peers[peer].cfg.nat_t {
            // Float (RFC 7296 §2.23): everything after IKE_SA_INIT uses the NAT-T port.
            sa.via = via;
            sa.remote.set_port(port);
        }
        sa.last_rx = now;
        sa.pending = None;
        sa.next_id = 1;
        sa.state = SaState::AuthSent;
        sa.pq = pq;
        let spi_in = self.fresh_spi(rng);
        sa.queue.push_front(RequestKind::Auth { spi_in });
        if pq {
            // RFC 9370: the ML-KEM exchange runs in IKE_INTERMEDIATE before IKE_AUTH.
            let (dk, ek) = crypto::mlkem_keygen(&rand_bytes::<64>(rng));
            sa.queue.push_front(RequestKind::Intermediate {
                dk: MlKemBox(std::sync::Arc::new(dk)),
                ek,
            });
        }
        self.pump(sa, now);
        true
    }

    fn rtt_sample(&mut self, sa: &IkeSa, now: Instant) {
        if let (Some(p), Some(peer)) = (&sa.pending, sa.peer) {
            if p.retransmits == 0 {
                self.event(Event::RttSample {
                    peer,
                    rtt: now.saturating_duration_since(p.first_sent),
                });
            }
        }
    }

    /// A message protected by the SK payload.
    fn encrypted(
        &mut self,
        sa: &mut IkeSa,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
        header: Header,
        rng: &mut dyn Rng,
    ) -> bool {
        // The sender's role must be the opposite of ours.
        if header.from_initiator() == sa.initiator {
            self.event(Event::Dropped {
                reason: "bad_flags",
            });
            return true;
        }
        if header.is_response() {
            let Some(p) = &sa.pending else {
                self.event(Event::Dropped {
                    reason: "unexpected_response",
                });
                return true;
            };
            if p.id != header.message_id {
                self.event(Event::Dropped {
                    reason: "stale_response",
                });
                return true;
            }
        } else {
            // A retransmitted request gets the cached response again.
            if let Some((id, resp)) = &sa.last_response {
                if header.message_id == *id {
                    let resp = resp.clone();
                    self.send(from, self.rx_via, resp);
                    return true;
                }
            }
            if header.message_id != sa.peer_next_id {
                self.event(Event::Dropped {
                    reason: "bad_message_id",
                });
                return true;
            }
        }
        let Some(recv_key) = sa.recv_key() else {
            self.event(Event::Dropped { reason: "no_keys" });
            return true;
        };
        let inner = match crypto::open_message_detailed(sa.aead, recv_key, data) {
            Ok(o) => {
                if header.exchange == ExchangeType::IkeIntermediate {
                    sa.rx_intermediate = Some((data.to_vec(), o.inner_bytes));
                }
                o.payloads
            }
            Err(_) => {
                // Possibly forged: drop silently, timers keep running.
                self.event(Event::Dropped {
                    reason: "integrity",
                });
                return true;
            }
        };
        sa.last_rx = now;
        if let Some(peer) = sa.peer {
            if self.peers[peer].current == Some(sa.our_spi()) {
                sa.remote = from;
                sa.via = self.rx_via;
            }
        }
        if inner
            .iter()
            .any(|p| matches!(p, Payload::Unknown { critical: true, .. }))
        {
            if !header.is_response() {
                self.respond(
                    sa,
                    header,
                    from,
                    &[status(notify::UNSUPPORTED_CRITICAL_PAYLOAD)],
                );
            }
            return true;
        }
        if header.is_response() {
            let Some(p) = sa.pending.take() else {
                self.broken_sa("response matched without a pending request");
                return true;
            };
            self.rtt_sample_p(sa, &p, now);
            sa.next_id = sa.next_id.wrapping_add(1);
            let keep = self.response(sa, p.kind, &inner, now, rng);
            if keep {
                self.pump(sa, now);
            }
            keep
        } else {
            self.request(sa, header, from, &inner, now, rng)
        }
    }

    fn rtt_sample_p(&mut self, sa: &IkeSa, p: &Pending, now: Instant) {
        if let Some(peer) = sa.peer {
            if p.retransmits == 0 {
                self.event(Event::RttSample {
                    peer,
                    rtt: now.saturating_duration_since(p.first_sent),
                });
            }
        }
    }

    /// Send a response and cache it for retransmitted requests.
    fn respond(&mut self, sa: &mut IkeSa, header: Header, to: SocketAddr, inner: &[Payload]) {
        let Some(bytes) = sa.seal(header.exchange, header.message_id, true, inner) else {
            self.broken_sa("response on an SA without keys");
            return;
        };
        sa.last_response = Some((header.message_id, bytes.clone()));
        sa.peer_next_id = header.message_id.wrapping_add(1);
        self.send(to, self.rx_via, bytes);
    }

    // ---------------------------------------------------------------- responses to our requests

    fn response(
        &mut self,
        sa: &mut IkeSa,
        kind: RequestKind,
        inner: &[Payload],
        now: Instant,
        rng: &mut dyn Rng,
    ) -> bool {
        let Some(peer) = sa.peer else { return true };
        match kind {
            RequestKind::Init => true,
            RequestKind::Intermediate { dk, .. } => {
                self.intermediate_response(sa, peer, &dk, inner)
            }
            RequestKind::Auth { spi_in } => self.auth_response(sa, peer, spi_in, inner, now),
            RequestKind::RekeyChild {
                old,
                spi_in,
                ni,
                ke,
            } => {
                self.child_rekey_response(sa, peer, old, spi_in, &ni, ke, inner, now, rng);
                true
            }
            RequestKind::RekeyIke { new_spi_i, ni, ke } => {
                self.ike_rekey_response(sa, peer, new_spi_i, &ni, &ke, inner, now)
            }
            RequestKind::Liveness | RequestKind::Notify { .. } => true,
            RequestKind::DeleteChild { id } => {
                if let Some(c) = self.peers[peer]
                    .children
                    .iter_mut()
                    .find(|c| c.info.id == id)
                {
                    // Packets in flight still arrive on the old SA for a moment.
                    c.expires
                        .get_or_insert(now + OLD_CHILD_GRACE.min(Duration::from_secs(1)));
                }
                true
            }
            RequestKind::DeleteIke => {
                self.forget_ike_sa(sa, peer);
                false
            }
        }
    }

    fn auth_response(
        &mut self,
        sa: &mut IkeSa,
        peer: PeerId,
        spi_in: u32,
        inner: &[Payload],
        now: Instant,
    ) -> bool {
        let cfg = self.peers[peer].cfg.clone();
        let idr = find(inner, |p| match p {
            Payload::IdR(i) => Some(i),
            _ => None,
        });
        let auth = find(inner, |p| match p {
            Payload::Auth { method, data } => Some((*method, data.as_slice())),
            _ => None,
        });
        let (Some(idr), Some((ids::AUTH_PSK, auth))) = (idr, auth) else {
            let failure = match error_notify(inner) {
                Some(notify::AUTHENTICATION_FAILED) => Failure::AuthenticationFailed,
                Some(notify::NO_PROPOSAL_CHOSEN) => Failure::NoProposalChosen,
                Some(n) => Failure::Notify(n),
                None => Failure::Protocol("IKE_AUTH response without IDr/AUTH"),
            };
            self.event(Event::Failed {
                peer: Some(peer),
                failure,
            });
            return false;
        };
        let int_auth = sa.int_auth_octets();
        let Some(keys) = self.keys_of(sa) else {
            return true;
        };
        let expected = crypto::psk_auth(
            &cfg.psk,
            &sa.init_resp,
            &sa.ni,
            &keys.sk_pr,
            &idr.body(),
            int_auth.as_deref(),
        );
        if *idr != cfg.remote_id || !constant_time_eq(&expected, auth) {
            self.event(Event::Failed {
                peer: Some(peer),
                failure: Failure::AuthenticationFailed,
            });
            return false;
        }
        sa.state = SaState::Established;
        sa.created = now;
        self.peers[peer].first_contact = false;
        if !self.install_ike_sa(sa, peer, false, now) {
            return true;
        }
        // The CHILD SA (or why there is none).
        match error_notify(inner) {
            Some(notify::TS_UNACCEPTABLE) => {
                self.event(Event::Failed {
                    peer: Some(peer),
                    failure: Failure::TsUnacceptable {
                        offered_local: cfg.local_ts.clone(),
                        offered_remote: cfg.remote_ts.clone(),
                    },
                });
                return true;
            }
            Some(n) => {
                self.event(Event::Failed {
                    peer: Some(peer),
                    failure: if n == notify::NO_PROPOSAL_CHOSEN {
                        Failure::NoProposalChosen
                    } else {
                        Failure::Notify(n)
                    },
                });
                return true;
            }
            None => {}
        }
        let accepted = sa_of(inner)
            .filter(|ps| ps.len() == 1)
            .and_then(|ps| accept_child_proposal(ps, &cfg.child_aeads, false));
        let (ts_i, ts_r) = ts_of(inner);
        let (Some((aead, spi_out, _, _)), Some(ts_i), Some(ts_r)) = (accepted, ts_i, ts_r) else {
            self.event(Event::Failed {
                peer: Some(peer),
                failure: Failure::Protocol("IKE_AUTH response without a usable CHILD SA"),
            });
            return true;
        };
        // The narrowed selectors must lie within what we proposed.
        if !ts::within(ts_i, &cfg.local_ts) || !ts::within(ts_r, &cfg.remote_ts) {
            self.event(Event::Failed {
                peer: Some(peer),
                failure: Failure::Protocol("responder widened the traffic selectors"),
            });
            return true;
        }
        let Some(first) = NewChild::with_ike_sa(
            sa,
            true,
            spi_in,
            spi_out,
            aead,
            ts_i.to_vec(),
            ts_r.to_vec(),
        ) else {
            self.broken_sa("authenticated SA without keys");
            return true;
        };
        let child = self.make_child(peer, first, now);
        self.event(Event::ChildUp { peer, child });
        true
    }

    /// Make `sa` the tunnel's current IKE SA.
    ///
    /// A rekey moves the CHILD SAs to the new IKE SA. Otherwise a second IKE SA for the
    /// same tunnel means either both sides initiated at once (then both keep the SA whose
    /// original initiator has the lower identity, so they agree without talking) or the
    /// peer came back without INITIAL_CONTACT (then the new one wins).
    fn install_ike_sa(&mut self, sa: &mut IkeSa, peer: PeerId, rekey: bool, now: Instant) -> bool {
        let ours = sa.our_spi();
        let old = self.peers[peer].current;
        if rekey {
            if let Some(old) = old {
                for c in &mut self.peers[peer].children {
                    if c.ike == old {
                        c.ike = ours;
                    }
                }
            }
        } else if let Some(old) = old.filter(|o| *o != ours) {
            if let Some(o) = self.sas.get(&old) {
                let race = o.state == SaState::Established
                    && now.saturating_duration_since(o.created) < SIMULTANEOUS_WINDOW;
                let cfg = &self.peers[peer].cfg;
                let initiator_id = |initiator: bool| {
                    if initiator {
                        cfg.local_id.body()
                    } else {
                        cfg.remote_id.body()
                    }
                };
                if race && initiator_id(o.initiator) < initiator_id(sa.initiator) {
                    // The existing SA wins; the new one is redundant. Its initiator deletes it.
                    if sa.initiator {
                        sa.queue.push_back(RequestKind::DeleteIke);
                    }
                    sa.state = SaState::Retiring;
                    self.drop_children_of(peer, ours);
                    return false;
                }
            }
            self.retire_ike_sa(peer, old);
        }
        self.peers[peer].current = Some(ours);
        self.event(Event::IkeUp {
            peer,
            spi_i: sa.spi_i,
            spi_r: sa.spi_r,
            initiator: sa.initiator,
            rekey,
            aead: sa.aead,
        });
        true
    }

    /// Stop using an IKE SA and its CHILD SAs; its initiator sends the DELETE.
    fn retire_ike_sa(&mut self, peer: PeerId, spi: u64) {
        if let Some(o) = self.sas.get_mut(&spi) {
            if o.state == SaState::Established {
                o.state = SaState::Retiring;
                o.queue.clear();
                if o.initiator {
                    o.queue.push_back(RequestKind::DeleteIke);
                }
                let (i, r) = (o.spi_i, o.spi_r);
                self.event(Event::IkeDown {
                    peer,
                    spi_i: i,
                    spi_r: r,
                });
            }
        }
        self.drop_children_of(peer, spi);
    }

    /// A deleted IKE SA: its CHILD SAs go with it.
    fn forget_ike_sa(&mut self, sa: &IkeSa, peer: PeerId) {
        let ours = sa.our_spi();
        if self.peers[peer].current == Some(ours) {
            self.peers[peer].current = None;
            self.event(Event::IkeDown {
                peer,
                spi_i: sa.spi_i,
                spi_r: sa.spi_r,
            });
        }
        self.drop_children_of(peer, ours);
    }

    fn drop_children_of(&mut self, peer: PeerId, ike: u64) {
        let gone: Vec<ChildId> = self.peers[peer]
            .children
            .iter()
            .filter(|c| c.ike == ike)
            .map(|c| c.info.id)
            .collect();
        self.peers[peer].children.retain(|c| c.ike != ike);
        for id in gone {
            self.event(Event::ChildDown { peer, id });
        }
    }

    /// Derive and record a new CHILD SA (RFC 7296 §2.17 keying material).
    fn make_child(&mut self, peer: PeerId, new: NewChild<'_>, now: Instant) -> ChildInfo {
        let NewChild {
            ike,
            sk_d,
            shared,
            ni,
            nr,
            initiator,
            spi_in,
            spi_out,
            aead,
            local_ts,
            remote_ts,
            rekey_of,
        } = new;
        let kind = self.peers[peer].cfg.child_kind;
        let keys = match kind {
            ChildKind::WireGuardPsk => {
                let km = crypto::child_keymat(sk_d, shared, ni, nr, 32);
                let mut psk = Zeroizing::new([0u8; 32]);
                psk.copy_from_slice(&km[..32]);
                ChildKeys::WireGuardPsk(psk)
            }
            ChildKind::Esp => {
                let n = aead.keymat_len();
                let km = crypto::child_keymat(sk_d, shared, ni, nr, 2 * n);
                let (i2r, r2i) = (
                    Zeroizing::new(km[..n].to_vec()),
                    Zeroizing::new(km[n..2 * n].to_vec()),
                );
                let (key_in, key_out) = if initiator { (r2i, i2r) } else { (i2r, r2i) };
                ChildKeys::Esp {
                    aead,
                    key_in,
                    key_out,
                }
            }
        };
        let id = ChildId(self.next_child);
        self.next_child += 1;
        if let Some(old) = rekey_of {
            if let Some(c) = self.peers[peer]
                .children
                .iter_mut()
                .find(|c| c.info.id == old)
            {
                c.replaced = true;
            }
        }
        let info = ChildInfo {
            id,
            spi_in,
            spi_out,
            keys,
            local_ts,
            remote_ts,
            rekey_of,
            pfs: !shared.is_empty(),
            initiator,
        };
        self.peers[peer].children.push(Child {
            info: info.clone(),
            ike,
            created: now,
            initiator,
            expires: None,
            rekeying: false,
            replaced: false,
            nonces: (ni.to_vec(), nr.to_vec()),
        });
        info
    }

    #[allow(clippy::too_many_arguments)]
    fn child_rekey_response(
        &mut self,
        sa: &mut IkeSa,
        peer: PeerId,
        old: ChildId,
        spi_in: u32,
        ni: &[u8],
        ke: Option<X25519SecretBox>,
        inner: &[Payload],
        now: Instant,
        rng: &mut dyn Rng,
    ) {
        let cfg = self.peers[peer].cfg.clone();
        if let Some(c) = self.peers[peer]
            .children
            .iter_mut()
            .find(|c| c.info.id == old)
        {
            c.rekeying = false;
        }
        if let Some(n) = error_notify(inner) {
            if n == notify::TEMPORARY_FAILURE {
                // The peer is busy (a collision it does not resolve): retry shortly.
                if let Some(c) = self.peers[peer]
                    .children
                    .iter_mut()
                    .find(|c| c.info.id == old)
                {
                    c.created = c.created.min(now);
                }
            }
            if n != notify::CHILD_SA_NOT_FOUND {
                self.event(Event::Failed {
                    peer: Some(peer),
                    failure: Failure::Notify(n),
                });
            }
            return;
        }
        let accepted = sa_of(inner)
            .filter(|ps| ps.len() == 1)
            .and_then(|ps| accept_child_proposal(ps, &cfg.child_aeads, ke.is_some()));
        let (ts_i, ts_r) = ts_of(inner);
        let (Some((aead, spi_out, _, _)), Some(nr), Some(ts_i), Some(ts_r)) =
            (accepted, nonce_of(inner), ts_i, ts_r)
        else {
            self.event(Event::Failed {
                peer: Some(peer),
                failure: Failure::Protocol("malformed CREATE_CHILD_SA response"),
            });
            return;
        };
        let shared = match &ke {
            Some(k) => match ke_of(inner)
                .filter(|(g, _)| *g == ids::DH_CURVE25519)
                .and_then(|(_, d)| k.0.diffie_hellman(d))
            {
                Some(s) => Some(s),
                None => {
                    self.event(Event::Failed {
                        peer: Some(peer),
                        failure: Failure::InvalidKe,
                    });
                    return;
                }
            },
            None => None,
        };
        let Some(sk_d) = self.keys_of(sa).map(|k| k.sk_d.clone()) else {
            return;
        };
        let shared_parts: Vec<&[u8]> = shared.iter().map(|s| s.as_slice()).collect();
        let child = self.make_child(
            peer,
            NewChild {
                ike: sa.our_spi(),
                sk_d: &sk_d,
                shared: &shared_parts,
                ni,
                nr,
                initiator: true,
                spi_in,
                spi_out,
                aead,
                local_ts: ts_i.to_vec(),
                remote_ts: ts_r.to_vec(),
                rekey_of: Some(old),
            },
            now,
        );
        let new_id = child.id;
        self.event(Event::ChildUp { peer, child });
        // §2.8.1: if the peer rekeyed the same SA at the same time, the exchange with the
        // lowest nonce made the redundant SA, and its initiator deletes it.
        let twin = self.peers[peer]
            .children
            .iter()
            .find(|c| c.info.rekey_of == Some(old) && c.info.id != new_id && !c.initiator)
            .map(|c| (c.info.id, c.nonces.clone()));
        if let Some((_, (tni, tnr))) = twin {
            let lowest_ours = min_nonce([ni, nr]);
            let lowest_theirs = min_nonce([tni.as_slice(), tnr.as_slice()]);
            if lowest_ours < lowest_theirs {
                // Ours is redundant: delete it; the peer deletes the old SA.
                self.queue_request_inline(sa, RequestKind::DeleteChild { id: new_id }, now);
                return;
            }
        }
        self.queue_request_inline(sa, RequestKind::DeleteChild { id: old }, now);
        let _ = rng;
    }

    /// Queue a request on an SA we currently hold outside the table.
    fn queue_request_inline(&mut self, sa: &mut IkeSa, kind: RequestKind, _now: Instant) {
        sa.queue.push_back(kind);
    }

    #[allow(clippy::too_many_arguments)]
    fn ike_rekey_response(
        &mut self,
        sa: &mut IkeSa,
        peer: PeerId,
        new_spi_i: u64,
        ni: &[u8],
        ke: &X25519SecretBox,
        inner: &[Payload],
        now: Instant,
    ) -> bool {
        if let Some(n) = error_notify(inner) {
            self.event(Event::Failed {
                peer: Some(peer),
                failure: Failure::Notify(n),
            });
            return true;
        }
        let prop = sa_of(inner).filter(|ps| ps.len() == 1).map(|ps| &ps[0]);
        let Some(new_spi_r) = prop
            .filter(|p| accept_ike_proposal(p, &[sa.aead], false).is_some())
            .and_then(ike_spi)
        else {
            self.event(Event::Failed {
                peer: Some(peer),
                failure: Failure::Protocol("malformed IKE rekey response"),
            });
            return true;
        };
        let (Some(nr), Some(shared)) = (
            nonce_of(inner),
            ke_of(inner)
                .filter(|(g, _)| *g == ids::DH_CURVE25519)
                .and_then(|(_, d)| ke.0.diffie_hellman(d)),
        ) else {
            self.event(Event::Failed {
                peer: Some(peer),
                failure: Failure::InvalidKe,
            });
            return true;
        };
        let Some(old_sk_d) = self.keys_of(sa).map(|k| k.sk_d.clone()) else {
            return true;
        };
        let skeyseed = crypto::skeyseed_rekey(&old_sk_d, &*shared, ni, nr);
        let keys = crypto::derive_ike_keys(&*skeyseed, ni, nr, new_spi_i, new_spi_r, sa.aead);
        let mut new = IkeSa {
            keys: Some(keys),
            // Keys descend from the old SK_d: a post-quantum SA stays one.
            pq: sa.pq,
            via: sa.via,
            ni: ni.to_vec(),
            nr: nr.to_vec(),
            ..IkeSa::blank(
                Some(peer),
                true,
                new_spi_i,
                new_spi_r,
                SaState::Established,
                sa.remote,
                sa.aead,
                now,
            )
        };
        self.install_ike_sa(&mut new, peer, true, now);
        self.sas.insert(new_spi_i, new);
        // The old SA only deletes itself now.
        sa.state = SaState::Retiring;
        sa.queue.clear();
        sa.queue.push_back(RequestKind::DeleteIke);
        true
    }

    // ---------------------------------------------------------------- requests from the peer

    fn request(
        &mut self,
        sa: &mut IkeSa,
        header: Header,
        from: SocketAddr,
        inner: &[Payload],
        now: Instant,
        rng: &mut dyn Rng,
    ) -> bool {
        match header.exchange {
            ExchangeType::IkeIntermediate
                if sa.state == SaState::AwaitAuth && sa.pq && sa.int_auth.is_none() =>
            {
                self.intermediate_request(sa, header, from, inner, rng)
            }
            ExchangeType::IkeAuth
                if sa.state == SaState::AwaitAuth && (!sa.pq || sa.int_auth.is_some()) =>
            {
                self.auth_request(sa, header, from, inner, now, rng)
            }
            ExchangeType::CreateChildSa if sa.state == SaState::Established => {
                self.create_child_request(sa, header, from, inner, now, rng);
                true
            }
            ExchangeType::Informational
                if matches!(sa.state, SaState::Established | SaState::Retiring) =>
            {
                self.informational_request(sa, header, from, inner, now)
            }
            _ => {
                self.event(Event::Dropped {
                    reason: "unexpected_request",
                });
                true
            }
        }
    }

    /// Responder side of the RFC 9370 additional key exchange: encapsulate to the
    /// initiator's ML-KEM key, answer, record both IntAuth values, then update the keys.
    fn intermediate_request(
        &mut self,
        sa: &mut IkeSa,
        header: Header,
        from: SocketAddr,
        inner: &[Payload],
        rng: &mut dyn Rng,
    ) -> bool {
        let Some((raw, inner_bytes)) = sa.rx_intermediate.take() else {
            return true;
        };
        let ek = ke_of(inner).filter(|(g, _)| *g == ids::KE_ML_KEM_768);
        let encapsulated = ek.and_then(|(_, ek)| crypto::mlkem_encaps(ek, &rand_bytes::<32>(rng)));
        let Some((ct, shared)) = encapsulated else {
            self.respond(sa, header, from, &[invalid_ke(ids::KE_ML_KEM_768)]);
            return false;
        };
        let Some(int_i) = sa.int_auth_link(true, &raw, &inner_bytes) else {
            return false;
        };
        let out = [Payload::Ke {
            group: ids::KE_ML_KEM_768,
            data: ct,
        }];
        self.respond(sa, header, from, &out);
        let sent = sa
            .last_response
            .as_ref()
            .map(|(_, b)| b.clone())
            .unwrap_or_default();
        sa.finish_intermediate(int_i, &sent, &wire::encode_payloads(&out).1, &shared[..])
    }

    /// Initiator side: decapsulate, record IntAuth_r, update the keys; IKE_AUTH follows.
    fn intermediate_response(
        &mut self,
        sa: &mut IkeSa,
        peer: PeerId,
        dk: &MlKemBox,
        inner: &[Payload],
    ) -> bool {
        let ct = ke_of(inner).filter(|(g, _)| *g == ids::KE_ML_KEM_768);
        let shared = ct.and_then(|(_, ct)| dk.0.decaps(ct));
        let (Some(shared), Some((raw, inner_bytes)), Some(int_i)) =
            (shared, sa.rx_intermediate.take(), sa.int_auth_i)
        else {
            self.event(Event::Failed {
                peer: Some(peer),
                failure: Failure::Protocol("bad IKE_INTERMEDIATE response (ML-KEM)"),
            });
            return false;
        };
        sa.finish_intermediate(int_i, &raw, &inner_bytes, &shared[..])
    }

    fn auth_request(
        &mut self,
        sa: &mut IkeSa,
        header: Header,
        from: SocketAddr,
        inner: &[Payload],
        now: Instant,
        rng: &mut dyn Rng,
    ) -> bool {
        let idi = find(inner, |p| match p {
            Payload::IdI(i) => Some(i.clone()),
            _ => None,
        });
        let idr = find(inner, |p| match p {
            Payload::IdR(i) => Some(i.clone()),
            _ => None,
        });
        let auth = find(inner, |p| match p {
            Payload::Auth { method, data } => Some((*method, data.clone())),
            _ => None,
        });
        let (Some(idi), Some((ids::AUTH_PSK, auth))) = (idi, auth) else {
            self.respond(sa, header, from, &[status(notify::AUTHENTICATION_FAILED)]);
            self.event(Event::Failed {
                peer: None,
                failure: Failure::AuthenticationFailed,
            });
            return false;
        };
        // The tunnel this peer is: its identity (and our identity, if it named one).
        let peer = self.peers.iter().position(|p| {
            p.cfg.remote_id == idi && idr.as_ref().is_none_or(|r| *r == p.cfg.local_id)
        });
        sa.auth_mid = header.message_id;
        let int_auth = sa.int_auth_octets();
        let Some(keys) = self.keys_of(sa) else {
            return true;
        };
        let verified = peer.filter(|&p| {
            let expected = crypto::psk_auth(
                &self.peers[p].cfg.psk,
                &sa.init_req,
                &sa.nr,
                &keys.sk_pi,
                &idi.body(),
                int_auth.as_deref(),
            );
            constant_time_eq(&expected, &auth)
        });
        let Some(peer) = verified else {
            self.respond(sa, header, from, &[status(notify::AUTHENTICATION_FAILED)]);
            self.event(Event::Failed {
                peer,
                failure: Failure::AuthenticationFailed,
            });
            return false;
        };
        let cfg = self.peers[peer].cfg.clone();
        sa.peer = Some(peer);
        if cfg.pq && !sa.pq {
            // This tunnel requires the post-quantum exchange; the initiator skipped it.
            self.respond(sa, header, from, &[status(notify::NO_PROPOSAL_CHOSEN)]);
            self.event(Event::Failed {
                peer: Some(peer),
                failure: Failure::Protocol("peer did not negotiate the post-quantum key exchange"),
            });
            return false;
        }
        if notify_of(inner, notify::INITIAL_CONTACT).is_some() {
            // The peer restarted: the SAs we had established with it are stale (§2.4).
            // Our own negotiations in progress are not: both sides may have started at once.
            let ours = sa.our_spi();
            let stale: Vec<u64> = self
                .sas
                .iter()
                .filter(|(s, o)| {
                    **s != ours
                        && o.peer == Some(peer)
                        && matches!(o.state, SaState::Established | SaState::Retiring)
                })
                .map(|(s, _)| *s)
                .collect();
            let had = self.peers[peer].current.is_some();
            for s in stale {
                if let Some(o) = self.sas.remove(&s) {
                    if o.state == SaState::Established {
                        self.event(Event::IkeDown {
                            peer,
                            spi_i: o.spi_i,
                            spi_r: o.spi_r,
                        });
                    }
                }
            }
            self.peers[peer].current = None;
            self.drop_children(peer);
            if had {
                self.event(Event::PeerRestarted { peer });
            }
        }
        let Some(keys) = self.keys_of(sa) else {
            return true;
        };
        let our_auth = crypto::psk_auth(
            &cfg.psk,
            &sa.init_resp,
            &sa.ni,
            &keys.sk_pr,
            &cfg.local_id.body(),
            int_auth.as_deref(),
        );
        let mut out = vec![
            Payload::IdR(cfg.local_id.clone()),
            Payload::Auth {
                method: ids::AUTH_PSK,
                data: our_auth.to_vec(),
            },
        ];
        sa.state = SaState::Established;
        sa.created = now;
        sa.remote = from;
        sa.via = self.rx_via;
        // The CHILD SA.
        let (ts_i, ts_r) = ts_of(inner);
        let proposal =
            sa_of(inner).and_then(|ps| accept_child_proposal(ps, &cfg.child_aeads, false));
        let mut child = None;
        match (proposal, ts_i, ts_r) {
            (Some((aead, spi_out, num, _)), Some(ts_i), Some(ts_r)) => {
                // TSi is the initiator's side (remote for us), TSr ours.
                let narrowed_i = ts::narrow(ts_i, &cfg.remote_ts);
                let narrowed_r = ts::narrow(ts_r, &cfg.local_ts);
                if narrowed_i.is_empty() || narrowed_r.is_empty() {
                    out.push(status(notify::TS_UNACCEPTABLE));
                    self.event(Event::Failed {
                        peer: Some(peer),
                        failure: Failure::TsUnacceptable {
                            offered_local: ts_r.to_vec(),
                            offered_remote: ts_i.to_vec(),
                        },
                    });
                } else {
                    let spi_in = self.fresh_spi(rng);
                    let mut chosen = child_proposals(&[aead], spi_in, false);
                    chosen[0].num = num;
                    out.push(Payload::Sa(chosen));
                    out.push(Payload::TsI(narrowed_i.clone()));
                    out.push(Payload::TsR(narrowed_r.clone()));
                    child = Some((aead, spi_in, spi_out, narrowed_r, narrowed_i));
                }
            }
            (None, _, _) if sa_of(inner).is_some() => {
                out.push(status(notify::NO_PROPOSAL_CHOSEN));
                self.event(Event::Failed {
                    peer: Some(peer),
                    failure: Failure::NoProposalChosen,
                });
            }
            _ => {}
        }
        self.respond(sa, header, from, &out);
        if !self.install_ike_sa(sa, peer, false, now) {
            return true;
        }
        if let Some((aead, spi_in, spi_out, local_ts, remote_ts)) = child {
            let Some(first) =
                NewChild::with_ike_sa(sa, false, spi_in, spi_out, aead, local_ts, remote_ts)
            else {
                self.broken_sa("authenticated SA without keys");
                return true;
            };
            let info = self.make_child(peer, first, now);
            self.event(Event::ChildUp { peer, child: info });
        }
        true
    }

    fn create_child_request(
        &mut self,
        sa: &mut IkeSa,
        header: Header,
        from: SocketAddr,
        inner: &[Payload],
        now: Instant,
        rng: &mut dyn Rng,
    ) {
        let Some(peer) = sa.peer else { return };
        let cfg = self.peers[peer].cfg.clone();
        let Some(props) = sa_of(inner) else {
            self.respond(sa, header, from, &[status(notify::INVALID_SYNTAX)]);
            return;
        };
        let Some(ni) = nonce_of(inner) else {
            self.respond(sa, header, from, &[status(notify::INVALID_SYNTAX)]);
            return;
        };
        if props.iter().any(|p| p.protocol == ids::PROTO_IKE) {
            self.ike_rekey_request(sa, peer, header, from, props, ni, inner, now, rng);
            return;
        }
        let rekey = notify_of(inner, notify::REKEY_SA)
            .filter(|n| n.protocol == ids::PROTO_ESP && n.spi.len() == 4);
        let old = match rekey {
            Some(n) => {
                let spi = u32::from_be_bytes([n.spi[0], n.spi[1], n.spi[2], n.spi[3]]);
                match self.peers[peer]
                    .children
                    .iter()
                    .find(|c| c.info.spi_out == spi)
                {
                    Some(c) if c.expires.is_some() => {
                        self.respond(sa, header, from, &[status(notify::TEMPORARY_FAILURE)]);
                        return;
                    }
                    Some(c) => Some(c.info.id),
                    None => {
                        self.respond(
                            sa,
                            header,
                            from,
                            &[Payload::Notify(Notify {
                                protocol: ids::PROTO_ESP,
                                spi: n.spi.clone(),
                                ty: notify::CHILD_SA_NOT_FOUND,
                                data: vec![],
                            })],
                        );
                        return;
                    }
                }
            }
            None => None,
        };
        let Some((aead, spi_out, num, pfs)) =
            accept_child_proposal(props, &cfg.child_aeads, cfg.child_pfs)
        else {
            self.respond(sa, header, from, &[status(notify::NO_PROPOSAL_CHOSEN)]);
            return;
        };
        let (ts_i, ts_r) = ts_of(inner);
        let (Some(ts_i), Some(ts_r)) = (ts_i, ts_r) else {
            self.respond(sa, header, from, &[status(notify::INVALID_SYNTAX)]);
            return;
        };
        let narrowed_i = ts::narrow(ts_i, &cfg.remote_ts);
        let narrowed_r = ts::narrow(ts_r, &cfg.local_ts);
        if narrowed_i.is_empty() || narrowed_r.is_empty() {
            self.respond(sa, header, from, &[status(notify::TS_UNACCEPTABLE)]);
            return;
        }
        let mut shared = None;
        let mut our_ke = None;
        if pfs {
            let Some((group, theirs)) = ke_of(inner) else {
                self.respond(sa, header, from, &[status(notify::INVALID_SYNTAX)]);
                return;
            };
            if group != ids::DH_CURVE25519 {
                self.respond(sa, header, from, &[invalid_ke(ids::DH_CURVE25519)]);
                return;
            }
            let dh = X25519Secret::from_bytes(rand_bytes::<32>(rng));
            let Some(s) = dh.diffie_hellman(theirs) else {
                self.respond(sa, header, from, &[status(notify::INVALID_SYNTAX)]);
                return;
            };
            our_ke = Some(dh.public());
            shared = Some(s);
        }
        let nr = rand_bytes::<NONCE_LEN>(rng).to_vec();
        let spi_in = self.fresh_spi(rng);
        let mut chosen = child_proposals(&[aead], spi_in, pfs);
        chosen[0].num = num;
        let mut out = vec![Payload::Sa(chosen), Payload::Nonce(nr.clone())];
        if let Some(k) = our_ke {
            out.push(Payload::Ke {
                group: ids::DH_CURVE25519,
                data: k.to_vec(),
            });
        }
        out.push(Payload::TsI(narrowed_i.clone()));
        out.push(Payload::TsR(narrowed_r.clone()));
        self.respond(sa, header, from, &out);
        let Some(sk_d) = self.keys_of(sa).map(|k| k.sk_d.clone()) else {
            return;
        };
        let parts: Vec<&[u8]> = shared.iter().map(|s| s.as_slice()).collect();
        let info = self.make_child(
            peer,
            NewChild {
                ike: sa.our_spi(),
                sk_d: &sk_d,
                shared: &parts,
                ni,
                nr: &nr,
                initiator: false,
                spi_in,
                spi_out,
                aead,
                local_ts: narrowed_r,
                remote_ts: narrowed_i,
                rekey_of: old,
            },
            now,
        );
        // §2.8.1, seen from this side: we already finished our own rekey of the same SA.
        if let Some(old) = old {
            let ours = self.peers[peer]
                .children
                .iter()
                .find(|c| c.info.rekey_of == Some(old) && c.initiator && c.expires.is_none())
                .map(|c| (c.info.id, c.nonces.clone()));
            if let Some((our_id, (oni, onr))) = ours {
                if min_nonce([oni.as_slice(), onr.as_slice()]) < min_nonce([ni, nr.as_slice()]) {
                    sa.queue.push_back(RequestKind::DeleteChild { id: our_id });
                    self.pump(sa, now);
                }
            }
        }
        self.event(Event::ChildUp { peer, child: info });
    }

    #[allow(clippy::too_many_arguments)]
    fn ike_rekey_request(
        &mut self,
        sa: &mut IkeSa,
        peer: PeerId,
        header: Header,
        from: SocketAddr,
        props: &[Proposal],
        ni: &[u8],
        inner: &[Payload],
        now: Instant,
        rng: &mut dyn Rng,
    ) {
        // A simultaneous IKE rekey of our own: refuse theirs, ours goes on (§2.25).
        if sa
            .pending
            .as_ref()
            .is_some_and(|p| matches!(p.kind, RequestKind::RekeyIke { .. }))
            && sa.initiator
        {
            self.respond(sa, header, from, &[status(notify::TEMPORARY_FAILURE)]);
            return;
        }
        let chosen = props.iter().find_map(|p| {
            let spi = ike_spi(p)?;
            accept_ike_proposal(p, &[sa.aead], false).map(|_| (p, spi))
        });
        let Some((prop, new_spi_i)) = chosen else {
            self.respond(sa, header, from, &[status(notify::NO_PROPOSAL_CHOSEN)]);
            return;
        };
        let Some((ids::DH_CURVE25519, theirs)) = ke_of(inner) else {
            self.respond(sa, header, from, &[invalid_ke(ids::DH_CURVE25519)]);
            return;
        };
        let dh = X25519Secret::from_bytes(rand_bytes::<32>(rng));
        let Some(shared) = dh.diffie_hellman(theirs) else {
            self.respond(sa, header, from, &[status(notify::INVALID_SYNTAX)]);
            return;
        };
        let new_spi_r = self.fresh_ike_spi(rng);
        let nr = rand_bytes::<NONCE_LEN>(rng).to_vec();
        let mut answer = ike_proposals(&[sa.aead], Some(new_spi_r), false);
        answer[0].num = prop.num;
        self.respond(
            sa,
            header,
            from,
            &[
                Payload::Sa(answer),
                Payload::Nonce(nr.clone()),
                Payload::Ke {
                    group: ids::DH_CURVE25519,
                    data: dh.public().to_vec(),
                },
            ],
        );
        let Some(old_sk_d) = self.keys_of(sa).map(|k| k.sk_d.clone()) else {
            return;
        };
        let skeyseed = crypto::skeyseed_rekey(&old_sk_d, &*shared, ni, &nr);
        let keys = crypto::derive_ike_keys(&*skeyseed, ni, &nr, new_spi_i, new_spi_r, sa.aead);
        let mut new = IkeSa {
            keys: Some(keys),
            // Keys descend from the old SK_d: a post-quantum SA stays one.
            pq: sa.pq,
            via: self.rx_via,
            ni: ni.to_vec(),
            nr,
            ..IkeSa::blank(
                Some(peer),
                false,
                new_spi_i,
                new_spi_r,
                SaState::Established,
                from,
                sa.aead,
                now,
            )
        };
        self.install_ike_sa(&mut new, peer, true, now);
        self.sas.insert(new_spi_r, new);
        // The initiator of the rekey deletes the old SA; we stop using it.
        sa.state = SaState::Retiring;
        sa.queue.clear();
    }

    fn informational_request(
        &mut self,
        sa: &mut IkeSa,
        header: Header,
        from: SocketAddr,
        inner: &[Payload],
        now: Instant,
    ) -> bool {
        let peer = sa.peer;
        let mut out = Vec::new();
        let mut delete_ike = false;
        let mut retiring = Vec::new();
        for p in inner {
            let Payload::Delete(d) = p else { continue };
            match d.protocol {
                ids::PROTO_IKE => delete_ike = true,
                ids::PROTO_ESP => {
                    let Some(peer) = peer else { continue };
                    let mut ours = Vec::new();
                    for spi in d.spis.iter().filter(|s| s.len() == 4) {
                        let spi = u32::from_be_bytes([spi[0], spi[1], spi[2], spi[3]]);
                        if let Some(c) = self.peers[peer]
                            .children
                            .iter_mut()
                            .find(|c| c.info.spi_out == spi)
                        {
                            // If we are deleting it too, the peer already knows (§1.4.1).
                            let we_delete = sa.pending.as_ref().is_some_and(|p| matches!(p.kind, RequestKind::DeleteChild { id } if id == c.info.id));
                            if !we_delete {
                                ours.push(c.info.spi_in.to_be_bytes().to_vec());
                            }
                            c.expires.get_or_insert(now + OLD_CHILD_GRACE);
                            retiring.push(c.info.id);
                        }
                    }
                    if !ours.is_empty() {
                        out.push(Payload::Delete(Delete {
                            protocol: ids::PROTO_ESP,
                            spi_size: 4,
                            spis: ours,
                        }));
                    }
                }
                _ => {}
            }
        }
        if delete_ike {
            self.respond(sa, header, from, &[]);
            if let Some(peer) = peer {
                self.forget_ike_sa(sa, peer);
            }
            return false;
        }
        self.respond(sa, header, from, &out);
        if let Some(peer) = peer {
            for id in retiring {
                self.event(Event::ChildRetiring { peer, id });
            }
            for p in inner {
                if let Payload::Notify(n) = p {
                    if n.ty >= PRIVATE_NOTIFY_MIN {
                        self.event(Event::PeerNotify {
                            peer,
                            ty: n.ty,
                            data: n.data.clone(),
                        });
                    }
                }
            }
        }
        true
    }
}

/// The original initiator rekeys at the configured time; the responder waits 10% longer,
/// so both rarely start at once (collisions are still handled).
fn rekey_after(interval: Duration, initiator: bool) -> Duration {
    if initiator {
        interval
    } else {
        interval + interval / 10
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
