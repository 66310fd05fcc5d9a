//! The packet path: TUN device, the site's UDP socket, routing and the tunnels.
//!
//! Two threads move packets (TUN -> UDP and UDP -> TUN), sleeping in `poll`; a
//! timer task drives handshakes and keepalives. Tunnel state is shared through an
//! [`ArcSwap`]ed table that is rebuilt whole when the configuration changes, so the
//! packet threads never wait on a table lock. Each direction works in batches: the TUN
//! reader takes a TSO super-packet split into segments (TUN offload) and sends the
//! encrypted segments to each endpoint as UDP GSO trains; the UDP reader takes up to
//! [`quinn_udp::BATCH_SIZE`] GRO-coalesced buffers per `recvmmsg` and writes the
//! decrypted packets with GRO coalescing back into the TUN. Per packet,
//! [`Dataplane::handle_tun_packet`] / [`Dataplane::handle_datagram`] do the work and
//! only queue into the thread's [`batch::TxBatch`] / [`batch::TunBatch`].
//!
//! While traffic is light the UDP reader also serves the TUN, so a round trip through
//! an idle tunnel wakes one thread less; the TUN reader takes the TUN over after a
//! burst ([`handover`]). On a machine with more than one CPU, light traffic goes
//! through per-CPU lanes instead, a socket and a pinned thread per CPU, so that a round
//! trip stays on one CPU ([`lanes`]); streams go back to the UDP reader.

pub mod batch;
pub mod esp;
pub mod gro;
pub mod handover;
pub mod lanes;
pub mod netlink;
pub mod router;
pub mod stats;
pub mod tunread;
pub mod wg;

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};

use crate::keys::{PrivateKey, PublicKey};
use crate::proto::demux::{self, Datagram};
use crate::proto::ike::engine::Via;
use batch::{TunBatch, TxBatch};
use esp::{EspTunnel, SpiMap};
use handover::{DryTun, Handover};
use router::Router;
use stats::{DropReason, Drops};
use wg::{Target, WgTunnel, WgTunnelSpec};

/// Handshakes per second the site answers before it demands cookies, at least. Counted
/// twice per handshake (once to route it, once inside boringtun), hence the factor of two.
const HANDSHAKE_RATE_LIMIT: u64 = 2 * 100;

/// Above [`HANDSHAKE_RATE_LIMIT`]: handshakes per tunnel and second, so that all peers of
/// a big hub can (re)connect within a second of its restart without cookie round trips.
const HANDSHAKES_PER_TUNNEL: u64 = 2;

/// Largest datagram or packet handled; buffers are this big so no `Tunn` call can panic.
pub const MAX_PACKET: usize = 65_536;

/// Packets the TUN reader takes before it sends what it has, even if more are waiting.
const TUN_DRAIN_MAX: usize = 256;

/// The site's UDP socket. Bound dual-stack when the host has IPv6, so v4 peers appear as
/// v4-mapped addresses that we normalise.
///
/// The socket is non-blocking underneath (so `recvmmsg` returns whatever is queued);
/// both directions wait in `poll` when the kernel has nothing or no room, which keeps
/// blocking semantics for the packet threads.
pub struct Wire {
    sock: UdpSocket,
    state: quinn_udp::UdpSocketState,
    dual_stack: bool,
}

impl Wire {
    pub fn bind(port: u16) -> io::Result<Self> {
        Self::bind_with(port, false)
    }

    /// Bound with `SO_REUSEPORT`, for a group of sockets on one port ([`lanes`]).
    pub(crate) fn bind_reusable(port: u16) -> io::Result<Self> {
        Self::bind_with(port, true)
    }

    fn bind_with(port: u16, reuse: bool) -> io::Result<Self> {
        use socket2::{Domain, Protocol, Socket, Type};
        let (sock, dual_stack) = match Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))
            .and_then(|s| {
                s.set_only_v6(false)?;
                s.set_reuse_port(reuse)?;
                s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
                Ok(s)
            }) {
            Ok(s) => (s, true),
            Err(_) => {
                let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
                s.set_reuse_port(reuse)?;
                s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
                (s, false)
            }
        };
        size_buffers(&sock);
        sock.set_nonblocking(true)?;
        let sock: UdpSocket = sock.into();
        // Turns on UDP GRO and reads the kernel's GSO limit.
        let state = quinn_udp::UdpSocketState::new((&sock).into())?;
        allow_fragmentation(&sock, dual_stack);
        Ok(Self {
            sock,
            state,
            dual_stack,
        })
    }

    /// Most datagrams one [`send_segments`](Self::send_segments) call may carry.
    pub fn max_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn wait(&self, flags: nix::poll::PollFlags) -> io::Result<()> {
        let mut fds = [nix::poll::PollFd::new(self.sock.as_fd(), flags)];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn peer_addr(&self, to: SocketAddr) -> SocketAddr {
        match to {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port()))
            }
            other => other,
        }
    }

    /// Send `contents` to `to` in one `sendmsg`: one datagram, or with `segment` a UDP
    /// GSO train of `segment`-byte datagrams (the last may be shorter).
    pub fn send_segments(
        &self,
        contents: &[u8],
        segment: Option<usize>,
        to: SocketAddr,
    ) -> io::Result<usize> {
        let transmit = quinn_udp::Transmit {
            destination: self.peer_addr(to),
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        loop {
            match self.state.try_send((&self.sock).into(), &transmit) {
                Ok(()) => return Ok(contents.len()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(nix::poll::PollFlags::POLLOUT)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Receive up to `bufs.len()` buffers (each possibly several GRO-coalesced datagrams
    /// of `meta.stride` bytes), waiting until at least one is there. Source addresses
    /// are normalised (no v4-mapped v6).
    pub fn recv_batch(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [quinn_udp::RecvMeta],
    ) -> io::Result<usize> {
        loop {
            match self.try_recv_batch(bufs, meta) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(nix::poll::PollFlags::POLLIN)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    /// [`recv_batch`](Self::recv_batch) without waiting: `WouldBlock` when empty.
    pub fn try_recv_batch(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [quinn_udp::RecvMeta],
    ) -> io::Result<usize> {
        let n = self.state.recv((&self.sock).into(), bufs, meta)?;
        for m in &mut meta[..n] {
            m.addr = SocketAddr::new(m.addr.ip().to_canonical(), m.addr.port());
        }
        Ok(n)
    }

    pub fn local_port(&self) -> io::Result<u16> {
        Ok(self.sock.local_addr()?.port())
    }

    pub fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.send_segments(datagram, None, to)
    }
}

/// Bytes asked for each of the site socket's receive and send buffers (the kernel
/// doubles them for its bookkeeping).
const SOCKET_BUFFER: usize = 4 << 20;

/// Size the socket's buffers so bursts from a fast peer, or a reader that waited for a
/// CPU, do not overflow the default ~200 KiB. With CAP_NET_ADMIN (the daemon has it for
/// the TUN) the `FORCE` options go past `net.core.rmem_max`/`wmem_max`, which are only
/// 208 KiB on a stock host; without it the request is capped there.
fn size_buffers(sock: &socket2::Socket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(sock, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    }
    if setsockopt(sock, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    }
}

/// `UdpSocketState::new` sets DF on every datagram (`IP_PMTUDISC_PROBE`). Restore the
/// kernel default, as other WireGuard implementations leave it: a datagram larger than
/// the path MTU is fragmented rather than dropped.
fn allow_fragmentation(sock: &UdpSocket, v6: bool) {
    use std::os::fd::AsRawFd;
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    set(
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_WANT,
    );
    if v6 {
        set(
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_WANT,
        );
    }
}

/// The IKE paths of a site (see [`Via`]): IKE with the non-ESP marker on the site port
/// (IKE-keyed WireGuard), plain IKE on UDP 500, and IKE, ESP and NAT keepalives on 4500.
pub const VIA_SITE: Via = 0;
pub const VIA_IKE: Via = 1;
pub const VIA_NATT: Via = 2;
/// The standard IKE and NAT-T ports (RFC 7296 §2, RFC 3948).
pub const IKE_PORT: u16 = 500;
pub const NATT_PORT: u16 = 4500;

/// Where a destination prefix leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Wg(usize),
    Esp(usize),
}

/// The tunnel table and the last destination looked up in it, for one drain of the
/// TUN: its packets (a TSO super-packet's segments, a UDP stream) mostly share one
/// destination, so they share one longest-prefix match and one load of the table.
pub struct RouteCache {
    table: Arc<TunnelTable>,
    last: Option<(IpAddr, Option<Route>)>,
}

/// All tunnels of a site, indexed for both directions.
#[derive(Default)]
pub struct TunnelTable {
    pub list: Vec<Arc<WgTunnel>>,
    /// IPsec tunnels (fixed for the daemon's life).
    pub esp: Vec<Arc<EspTunnel>>,
    by_index: HashMap<u32, usize>,
    by_key: HashMap<[u8; 32], usize>,
    router: Router<Route>,
}

impl TunnelTable {
    pub fn new(list: Vec<Arc<WgTunnel>>) -> Self {
        Self::with_esp(list, Vec::new())
    }

    pub fn with_esp(list: Vec<Arc<WgTunnel>>, esp: Vec<Arc<EspTunnel>>) -> Self {
        let mut t = Self::default();
        for (i, tun) in list.iter().enumerate() {
            t.by_index.insert(tun.index, i);
            for k in tun.peer_keys() {
                t.by_key.insert(k, i);
            }
            for net in &tun.spec.remote_subnets {
                t.router.insert(*net, Route::Wg(i));
            }
        }
        for (i, tun) in esp.iter().enumerate() {
            for net in &tun.spec.remote_subnets {
                t.router.insert(*net, Route::Esp(i));
            }
        }
        t.list = list;
        t.esp = esp;
        t
    }

    pub fn esp_by_name(&self, name: &str) -> Option<&Arc<EspTunnel>> {
        self.esp.iter().find(|t| t.spec.name == name)
    }

    /// The tunnel and session slot a receiver index names (boringtun puts our index in
    /// its top 24 bits; the low two of those select the session).
    fn session(&self, receiver_idx: u32) -> Option<(usize, Target)> {
        let index = receiver_idx >> 8;
        let slot = index & (wg::SESSION_SLOTS - 1);
        self.by_index
            .get(&(index & !(wg::SESSION_SLOTS - 1)))
            .map(|&i| (i, Target::Slot(slot)))
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<WgTunnel>> {
        self.list.iter().find(|t| t.spec.name == name)
    }
}

/// One static key of the site, with the rate limiter that checks handshakes' mac1
/// against its public key.
pub struct LocalKey {
    pub private: PrivateKey,
    pub public: PublicKey,
    pub limiter: Arc<RateLimiter>,
}

impl LocalKey {
    pub fn new(private: PrivateKey) -> Arc<Self> {
        Self::with_limit(private, HANDSHAKE_RATE_LIMIT)
    }

    /// With a handshake limit other than the default (counted twice per handshake).
    pub fn with_limit(private: PrivateKey, limit: u64) -> Arc<Self> {
        let public = private.public_key();
        let limiter = Arc::new(RateLimiter::new(&public.to_dalek(), limit));
        Arc::new(Self {
            private,
            public,
            limiter,
        })
    }
}

/// The site's static keys: the one in use, and during a rotation the announced next
/// key and the replaced one, both still accepted in handshakes (make-before-break).
#[derive(Clone)]
pub struct SiteKeys {
    pub current: Arc<LocalKey>,
    pub pending: Option<Arc<LocalKey>>,
    pub previous: Option<Arc<LocalKey>>,
}

impl SiteKeys {
    fn all(&self) -> impl Iterator<Item = (&Arc<LocalKey>, bool)> {
        std::iter::once((&self.current, true))
            .chain(self.pending.iter().map(|k| (k, true)))
            .chain(self.previous.iter().map(|k| (k, false)))
    }
}

pub struct Dataplane {
    pub wire: Wire,
    /// One more socket on the site's port per CPU, for light traffic ([`lanes`]).
    pub lanes: lanes::Lanes,
    pub tun: tun_rs::SyncDevice,
    pub tunnels: ArcSwap<TunnelTable>,
    /// The site's static keys (swapped whole by a key rotation).
    pub keys: ArcSwap<SiteKeys>,
    /// Unix time (s) the site key in use came into use, for keys held in Vault (0: not
    /// known yet); file keys are aged by their modification time instead.
    pub key_since: std::sync::atomic::AtomicU64,
    /// Handshake rate limit of the site's keys (see [`HANDSHAKES_PER_TUNNEL`]).
    handshake_limit: u64,
    pub listen_port: u16,
    /// Drops not attributable to a tunnel.
    pub drops: Drops,
    /// Where IKE messages go (the IKE driver task), once one runs.
    pub ike_tx: std::sync::OnceLock<tokio::sync::mpsc::Sender<(SocketAddr, Via, Vec<u8>)>>,
    /// UDP 500 and 4500, when the site has IPsec tunnels.
    pub ipsec: Option<IpsecWires>,
    /// Inbound ESP SPIs of the IPsec tunnels.
    pub spis: SpiMap,
    /// The TUN -> UDP direction's buffers, used by whichever thread owns the TUN.
    tun_path: Mutex<TunPath>,
    /// Which thread owns the TUN (see [`handover`]).
    handover: Handover,
}

/// Buffers of the TUN reader: one read (`raw`) and the segments of a super-packet, the
/// cipher output and the UDP trains being built (WireGuard to the site's port, ESP to NAT-T).
struct TunPath {
    raw: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    out: Vec<u8>,
    tx: TxBatch,
    esp_tx: TxBatch,
    /// Reads return `WouldBlock` when the TUN is empty (else they block).
    nonblocking: bool,
    /// How packets come out of the TUN, whichever thread reads it.
    pace: handover::Pace,
}

impl TunPath {
    fn new(tun: &tun_rs::SyncDevice) -> Self {
        let batch = if tun.tcp_gso() {
            tun_rs::IDEAL_BATCH_SIZE
        } else {
            1
        };
        Self {
            raw: vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + MAX_PACKET],
            bufs: (0..batch).map(|_| vec![0u8; MAX_PACKET]).collect(),
            sizes: vec![0usize; batch],
            out: vec![0u8; MAX_PACKET],
            tx: TxBatch::new(),
            esp_tx: TxBatch::new(),
            // Non-blocking reads drain what the TUN holds before the trains go out, so
            // single packets (UDP, ACKs) leave in batches too; `poll` waits when it is
            // empty.
            nonblocking: tun.set_nonblocking(true).is_ok(),
            pace: handover::Pace::default(),
        }
    }
}

/// The IKE (500) and NAT-T (4500) sockets of a site with IPsec tunnels.
pub struct IpsecWires {
    pub ike: Wire,
    pub natt: Wire,
}

impl IpsecWires {
    pub fn bind(ike_port: u16, natt_port: u16) -> io::Result<Self> {
        Ok(Self {
            ike: Wire::bind(ike_port)?,
            natt: Wire::bind(natt_port)?,
        })
    }
}

impl Dataplane {
    pub fn new(
        tun: tun_rs::SyncDevice,
        (wire, lanes): (Wire, lanes::Lanes),
        private: PrivateKey,
        specs: Vec<WgTunnelSpec>,
        ipsec: Option<(IpsecWires, Vec<esp::EspTunnelSpec>)>,
    ) -> io::Result<Self> {
        let (ipsec, esp_specs) = match ipsec {
            Some((w, s)) => (Some(w), s),
            None => (None, Vec::new()),
        };
        let handshake_limit =
            HANDSHAKE_RATE_LIMIT.max(2 * HANDSHAKES_PER_TUNNEL * specs.len() as u64);
        let local = LocalKey::with_limit(private, handshake_limit);
        let listen_port = wire.local_port()?;
        let path = TunPath::new(&tun);
        let handover = Handover::new(path.nonblocking, lanes.len())?;
        let dp = Self {
            tun_path: Mutex::new(path),
            handover,
            wire,
            lanes,
            tun,
            tunnels: ArcSwap::from_pointee(TunnelTable::default()),
            keys: ArcSwap::from_pointee(SiteKeys {
                current: local.clone(),
                pending: None,
                previous: None,
            }),
            key_since: std::sync::atomic::AtomicU64::new(0),
            handshake_limit,
            listen_port,
            drops: Drops::default(),
            ike_tx: std::sync::OnceLock::new(),
            ipsec,
            spis: SpiMap::default(),
        };
        let now = Instant::now();
        let mut used = std::collections::HashSet::new();
        let list = specs
            .into_iter()
            .map(|spec| {
                let index = fresh_index(&mut used);
                Arc::new(WgTunnel::new(spec, index, local.clone(), now))
            })
            .collect();
        let esp = esp_specs
            .into_iter()
            .map(|s| Arc::new(EspTunnel::new(s)))
            .collect();
        dp.tunnels.store(Arc::new(TunnelTable::with_esp(list, esp)));
        Ok(dp)
    }

    /// The site's private key in use.
    pub fn private(&self) -> PrivateKey {
        self.keys.load().current.private.clone()
    }

    /// The site's public key in use.
    pub fn public(&self) -> PublicKey {
        self.keys.load().current.public
    }

    /// The key in use, with its rate limiter (for new tunnels).
    pub fn local_key(&self) -> Arc<LocalKey> {
        self.keys.load().current.clone()
    }

    /// Resets the handshake rate limiters' counts (once a second).
    pub fn reset_limiters(&self) {
        for (k, _) in self.keys.load().all() {
            k.limiter.reset_count();
        }
    }

    /// Rotation, step 1: accept handshakes to `next` before its public key is published.
    pub fn announce_key(&self, next: PrivateKey) {
        let local = LocalKey::with_limit(next, self.handshake_limit);
        self.keys.rcu(|k| SiteKeys {
            current: k.current.clone(),
            pending: Some(local.clone()),
            previous: k.previous.clone(),
        });
    }

    /// The announced key will not be used (its rotation failed).
    pub fn cancel_announced_key(&self) {
        self.keys.rcu(|k| SiteKeys {
            current: k.current.clone(),
            pending: None,
            previous: k.previous.clone(),
        });
    }

    /// Rotation, step 2: use `next` from now on. Every static-keyed tunnel starts a
    /// session under it beside the current one, which carries traffic until the new one
    /// does; the replaced key is still accepted in handshakes.
    pub fn switch_key(&self, next: &PrivateKey, out: &mut [u8]) {
        let keys = self.keys.load_full();
        if keys.current.private.as_bytes() == next.as_bytes() {
            return;
        }
        let local = match &keys.pending {
            Some(p) if p.private.as_bytes() == next.as_bytes() => p.clone(),
            _ => LocalKey::with_limit(next.clone(), self.handshake_limit),
        };
        self.keys.store(Arc::new(SiteKeys {
            current: local.clone(),
            pending: None,
            previous: Some(keys.current.clone()),
        }));
        for t in &self.tunnels.load().list {
            t.rekey_to(Some(local.clone()), None, &self.wire, out);
        }
    }

    /// A peer announced its next public key: accept handshakes from it now.
    pub fn announce_peer_key(&self, tunnel: &str, key: PublicKey) {
        if let Some(t) = self.tunnels.load().by_name(tunnel) {
            t.announce_peer(key);
        }
        self.reindex();
    }

    /// A peer's next public key is due: a new session under it beside the current one.
    pub fn switch_peer_key(&self, tunnel: &str, key: PublicKey, out: &mut [u8]) {
        if let Some(t) = self.tunnels.load().by_name(tunnel) {
            t.rekey_to(None, Some(key), &self.wire, out);
        }
        self.reindex();
    }

    /// Rebuilds the peer-key index after a tunnel's peer keys changed.
    fn reindex(&self) {
        self.tunnels
            .rcu(|t| Arc::new(TunnelTable::new(t.list.clone())));
    }

    /// One plaintext packet read from the TUN; its datagram joins `tx` (WireGuard, to
    /// the site's port) or `esp_tx` (ESP, to the NAT-T port).
    pub fn handle_tun_packet(
        &self,
        routes: &mut RouteCache,
        packet: &[u8],
        out: &mut [u8],
        tx: &mut TxBatch,
        esp_tx: &mut TxBatch,
    ) {
        let Some(dst) = Tunn::dst_address(packet) else {
            self.drops.add(DropReason::Malformed);
            return;
        };
        let table = &routes.table;
        let route = match routes.last {
            Some((last, route)) if last == dst => route,
            _ => {
                let route = table.router.lookup(dst).copied();
                routes.last = Some((dst, route));
                route
            }
        };
        match route {
            Some(Route::Wg(i)) => table.list[i].encapsulate(&self.wire, packet, out, tx),
            Some(Route::Esp(i)) => match &self.ipsec {
                Some(w) => table.esp[i].encapsulate(&w.natt, packet, out, esp_tx),
                None => self.drops.add(DropReason::NoRoute),
            },
            None => self.drops.add(DropReason::NoRoute),
        }
    }

    /// The tunnel table as it is now, for the packets of one drain of the TUN.
    pub fn routes(&self) -> RouteCache {
        RouteCache {
            table: self.tunnels.load_full(),
            last: None,
        }
    }

    /// One datagram received on the site's UDP port; decrypted packets join `rx`.
    pub fn handle_datagram(
        &self,
        datagram: &[u8],
        src: SocketAddr,
        out: &mut [u8],
        rx: &mut TunBatch,
    ) {
        match demux::classify(datagram) {
            Ok(Datagram::WireGuard(_)) => self.handle_wireguard(datagram, src, out, rx),
            Ok(Datagram::NatKeepalive) => {}
            Ok(Datagram::Ike) => self.to_ike(src, VIA_SITE, &datagram[4..]),
            Ok(Datagram::Esp) => self.drops.add(DropReason::UnsupportedProtocol),
            Err(_) => self.drops.add(DropReason::Malformed),
        }
    }

    /// Hand an IKE message to the IKE driver.
    fn to_ike(&self, src: SocketAddr, via: Via, message: &[u8]) {
        match self.ike_tx.get() {
            // The driver keeps up with IKE's few messages; a full queue means a flood.
            Some(tx) => {
                if tx.try_send((src, via, message.to_vec())).is_err() {
                    self.drops.add(DropReason::RateLimited);
                }
            }
            None => self.drops.add(DropReason::UnsupportedProtocol),
        }
    }

    /// One datagram on UDP 500: plain IKE (RFC 7296 §2).
    pub fn handle_ike_datagram(&self, datagram: &[u8], src: SocketAddr) {
        if datagram.len() < 28 {
            self.drops.add(DropReason::Malformed);
            return;
        }
        self.to_ike(src, VIA_IKE, datagram);
    }

    /// One datagram on UDP 4500 (RFC 3948): IKE after the non-ESP marker, a NAT
    /// keepalive, or ESP; decrypted packets join `rx`.
    pub fn handle_natt_datagram(
        &self,
        datagram: &[u8],
        src: SocketAddr,
        out: &mut [u8],
        rx: &mut TunBatch,
    ) {
        match demux::classify(datagram) {
            Ok(Datagram::Ike) => self.to_ike(src, VIA_NATT, &datagram[4..]),
            Ok(Datagram::NatKeepalive) => {}
            // On 4500 there is no WireGuard: an SPI such as 0x02000000 only looks like it.
            Ok(Datagram::Esp | Datagram::WireGuard(_)) => {
                let spi = u32::from_be_bytes([datagram[0], datagram[1], datagram[2], datagram[3]]);
                let Some((tunnel, child)) = self.spis.get(spi) else {
                    self.drops.add(DropReason::UnknownPeer);
                    return;
                };
                let tun = &self.tun;
                tunnel.decapsulate(&child, datagram, out, &mut |p| rx.push(tun, p));
            }
            Err(_) => self.drops.add(DropReason::Malformed),
        }
    }

    fn handle_wireguard(
        &self,
        datagram: &[u8],
        src: SocketAddr,
        out: &mut [u8],
        rx: &mut TunBatch,
    ) {
        let table = self.tunnels.load();
        let slot = match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::HandshakeInit(_)) => self.route_initiation(&table, datagram, src, out),
            Ok(Packet::HandshakeResponse(p)) => table.session(p.receiver_idx),
            Ok(Packet::PacketCookieReply(p)) => table.session(p.receiver_idx),
            Ok(Packet::PacketData(p)) => table.session(p.receiver_idx),
            Err(_) => {
                self.drops.add(DropReason::Malformed);
                return;
            }
        };
        let Some((i, session)) = slot else {
            return;
        };
        let tun = &self.tun;
        table.list[i].decapsulate(&self.wire, src, session, datagram, out, &mut |p| {
            rx.push(tun, p)
        });
    }

    /// Find the tunnel a handshake initiation is for: check mac1 (and the load-dependent
    /// cookie) against each of the site's keys, then decrypt the initiator's static key.
    fn route_initiation(
        &self,
        table: &TunnelTable,
        datagram: &[u8],
        src: SocketAddr,
        out: &mut [u8],
    ) -> Option<(usize, Target)> {
        let keys = self.keys.load();
        for (key, fresh) in keys.all() {
            match key.limiter.verify_packet(Some(src.ip()), datagram, out) {
                Ok(Packet::HandshakeInit(init)) => {
                    let secret = key.private.to_static_secret();
                    return match parse_handshake_anon(&secret, &key.public.to_dalek(), &init) {
                        Ok(half) => {
                            let slot = table.by_key.get(&half.peer_static_public).copied();
                            if slot.is_none() {
                                self.drops.add(DropReason::UnknownPeer);
                            }
                            slot.map(|i| {
                                (
                                    i,
                                    Target::Initiation {
                                        local: key.clone(),
                                        peer: PublicKey(half.peer_static_public),
                                        fresh,
                                    },
                                )
                            })
                        }
                        Err(_) => {
                            self.drops.add(DropReason::DecryptFailed);
                            None
                        }
                    };
                }
                Ok(_) => return None,
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    let _ = self.wire.send_to(cookie, src);
                    self.drops.add(DropReason::RateLimited);
                    return None;
                }
                // mac1 is not for this key: try the next.
                Err(_) => {}
            }
        }
        self.drops.add(DropReason::DecryptFailed);
        None
    }

    /// Every ~250 ms. Returns the names of tunnels that want their host names resolved.
    pub fn tick(&self, out: &mut [u8]) -> Vec<String> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let table = self.tunnels.load();
        for t in &table.list {
            t.run_probe(&self.wire, out, now);
        }
        table
            .list
            .iter()
            .filter(|t| t.tick(&self.wire, out, now, wall))
            .map(|t| t.spec.name.clone())
            .collect()
    }

    /// Start handshakes on every tunnel with a known endpoint.
    pub fn initiate_all(&self, out: &mut [u8]) {
        for t in &self.tunnels.load().list {
            t.initiate(&self.wire, out);
        }
    }

    /// Blocking loop: TUN -> tunnels -> UDP. Runs on its own thread for the daemon's life.
    ///
    /// With TUN offload a read may be a TSO super-packet, split ([`tunread`]) into
    /// MTU-sized segments; their datagrams leave as UDP GSO trains once the TUN is
    /// drained (or every `TUN_DRAIN_MAX` packets).
    pub fn run_tun_reader(self: Arc<Self>) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let hand = &self.handover;
        let mut lone = handover::LoneDrains::default();
        // How long the last `poll` slept.
        let mut slept = Duration::MAX;
        loop {
            if !hand.heavy() {
                // The UDP reader serves the TUN; wait until it hands it over.
                let mut fds = [PollFd::new(hand.tun_reader.fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::NONE);
                hand.tun_reader.clear();
                lone.reset();
                // Deliveries while the UDP reader served the TUN do not count for the
                // first drain: `LoneDrains` wants those since the drain before.
                hand.take_delivered();
                slept = Duration::MAX;
                continue;
            }
            let drained = {
                let mut path = self.lock_tun_path();
                self.drain_tun(&mut path, DryTun::after_sleep(slept))
                    .map(|packets| (packets, path.pace.streaming()))
            };
            let (packets, streaming) = match drained {
                Ok(drained) => drained,
                Err(e) => {
                    tracing::error!(error = %e, "reading the TUN device failed; stopping the TUN reader");
                    return;
                }
            };
            if lone.after_drain(packets, streaming, hand.take_delivered()) {
                hand.to_light();
                continue;
            }
            let mut fds = [
                PollFd::new(self.tun.as_fd(), PollFlags::POLLIN),
                PollFd::new(hand.tun_reader.fd(), PollFlags::POLLIN),
            ];
            let asleep = Instant::now();
            match poll(&mut fds, PollTimeout::from(handover::LIGHT_AFTER_IDLE_MS)) {
                Ok(0) => hand.to_light(),
                _ => hand.tun_reader.clear(),
            }
            slept = asleep.elapsed();
        }
    }

    fn lock_tun_path(&self) -> std::sync::MutexGuard<'_, TunPath> {
        self.tun_path.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Read the TUN, encrypt and send until it has nothing more; everything read has
    /// left when this returns. Without a non-blocking TUN every read blocks: then one
    /// read per call. `dry` says whether an empty TUN gets more looks while packets
    /// come as a stream (see below). Returns the packets read.
    fn drain_tun(&self, path: &mut TunPath, dry: DryTun) -> io::Result<usize> {
        let TunPath {
            raw,
            bufs,
            sizes,
            out,
            tx,
            esp_tx,
            nonblocking,
            pace,
        } = path;
        let mut pending = 0;
        let mut total = 0;
        // Loaded at the first packet, not before a read that may block.
        let mut routes = None;
        let mut result = Ok(());
        // What an empty TUN gets: `dry` once the first packet shows a stream.
        let mut when_dry = DryTun::Stop;
        let mut looks = 0;
        let mut dry_since = None;
        loop {
            match tunread::read(&self.tun, raw, bufs, sizes) {
                Ok(packets) => {
                    if total == 0 {
                        pace.arrived(Instant::now());
                        if pace.streaming() {
                            when_dry = dry;
                        }
                    }
                    let routes = routes.get_or_insert_with(|| self.routes());
                    let n = match packets {
                        tunread::Packets::One(at) => {
                            self.handle_tun_packet(routes, &raw[at], out, tx, esp_tx);
                            1
                        }
                        tunread::Packets::Split(n) => {
                            for (buf, &len) in bufs.iter().zip(sizes.iter()).take(n) {
                                self.handle_tun_packet(routes, &buf[..len], out, tx, esp_tx);
                            }
                            n
                        }
                    };
                    pending += n;
                    total += n;
                    if !*nonblocking {
                        break;
                    }
                    if pending >= TUN_DRAIN_MAX {
                        self.flush_tx(tx, esp_tx);
                        pending = 0;
                        // A long drain still sees a new configuration soon.
                        *routes = self.routes();
                    }
                }
                // Empty: send what we have, then, under a stream, give the CPU to
                // whoever is ready to run (often the sender feeding the TUN) and look
                // again before sleeping. Under a stream of single packets (UDP) this
                // turns a sleep and wake-up per packet into batches.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.flush_tx(tx, esp_tx);
                    pending = 0;
                    let dry_for = match when_dry {
                        DryTun::Linger => {
                            let now = Instant::now();
                            now.saturating_duration_since(*dry_since.get_or_insert(now))
                        }
                        _ => Duration::ZERO,
                    };
                    if !when_dry.look_again(looks, dry_for) {
                        break;
                    }
                    looks += 1;
                    std::thread::yield_now();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A super-packet the splitter rejects (bad header, bad GSO size).
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::InvalidInput | io::ErrorKind::Other) =>
                {
                    self.drops.add(DropReason::Malformed);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.flush_tx(tx, esp_tx);
        result.map(|()| total)
    }

    fn flush_tx(&self, tx: &mut TxBatch, esp_tx: &mut TxBatch) {
        tx.flush(&self.wire);
        let mut failed = std::mem::take(&mut tx.failed);
        if let Some(w) = &self.ipsec {
            esp_tx.flush(&w.natt);
            failed += std::mem::take(&mut esp_tx.failed);
        }
        self.drops.add_n(DropReason::IoError, failed);
    }

    /// Blocking loop: UDP -> tunnels -> TUN.
    pub fn run_udp_reader(self: Arc<Self>) {
        self.udp_reader(VIA_SITE, None);
    }

    /// Blocking loop: lane `lane` of the site's port, pinned to CPU `lane` ([`lanes`]).
    pub fn run_lane(self: Arc<Self>, lane: usize) {
        if let Err(e) = lanes::pin_to(lane) {
            tracing::warn!(error = %e, lane, "pinning a UDP lane to its CPU failed");
        }
        self.udp_reader(VIA_SITE, Some(lane));
    }

    /// Blocking loop on UDP 500 (IPsec sites).
    pub fn run_ike_reader(self: Arc<Self>) {
        self.udp_reader(VIA_IKE, None);
    }

    /// Blocking loop on UDP 4500: ESP -> TUN, IKE -> the driver (IPsec sites).
    pub fn run_natt_reader(self: Arc<Self>) {
        self.udp_reader(VIA_NATT, None);
    }

    /// Batched: up to [`quinn_udp::BATCH_SIZE`] buffers per `recvmmsg`, each one GRO
    /// train of up to 64 datagrams; decrypted packets go to the TUN once per batch.
    /// The site's reader (or, with [`lanes`], each lane) also serves the TUN while
    /// traffic is light (see [`handover`]).
    fn udp_reader(&self, via: Via, lane: Option<usize>) {
        const BATCH: usize = quinn_udp::BATCH_SIZE;
        let wire = match (via, &self.ipsec, lane) {
            (VIA_IKE, Some(w), _) => &w.ike,
            (VIA_NATT, Some(w), _) => &w.natt,
            (VIA_SITE, _, None) => &self.wire,
            (VIA_SITE, _, Some(lane)) => match self.lanes.wire(lane) {
                Some(w) => w,
                None => return,
            },
            _ => return,
        };
        let serves_tun = via == VIA_SITE && (lane.is_some() || self.lanes.is_empty());
        // With lanes, the main reader only gets streams; it hands datagrams back to the
        // lanes once they stop.
        let gives_back = via == VIA_SITE && lane.is_none() && !self.lanes.is_empty();
        let bell = match lane {
            Some(lane) => hand_bell(&self.handover, lane),
            None => &self.handover.udp_reader,
        };
        let hand = &self.handover;
        let mut storage = vec![0u8; BATCH * MAX_PACKET];
        let mut meta = [quinn_udp::RecvMeta::default(); BATCH];
        let mut out = vec![0u8; MAX_PACKET];
        let mut rx = TunBatch::new();
        let mut yielded = false;
        let mut pace = handover::Pace::default();
        // The socket may hold datagrams: false once a receive has shown it empty, and
        // until `poll` says otherwise.
        let mut readable = true;
        loop {
            if !readable {
                readable = self.wait_for_work(wire, serves_tun, bell, gives_back);
                continue;
            }
            let n = {
                let mut chunks = storage.chunks_exact_mut(MAX_PACKET);
                let mut iovs: [IoSliceMut<'_>; BATCH] =
                    std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
                wire.try_recv_batch(&mut iovs, &mut meta)
            };
            match n {
                Ok(n) => {
                    yielded = false;
                    pace.arrived(Instant::now());
                    if lane.is_some() && pace.streaming() {
                        self.lanes.to_bulk(&self.wire);
                    }
                    for (i, m) in meta.iter().enumerate().take(n) {
                        let buf = &storage[i * MAX_PACKET..][..m.len];
                        for datagram in buf.chunks(m.stride.max(1)) {
                            match via {
                                VIA_IKE => self.handle_ike_datagram(datagram, m.addr),
                                VIA_NATT => {
                                    self.handle_natt_datagram(datagram, m.addr, &mut out, &mut rx)
                                }
                                _ => self.handle_datagram(datagram, m.addr, &mut out, &mut rx),
                            }
                        }
                    }
                    let wrote = !rx.is_empty();
                    rx.flush(&self.tun);
                    if wrote {
                        hand.delivered();
                    }
                    self.drops
                        .add_n(DropReason::IoError, std::mem::take(&mut rx.failed));
                    // The kernel often answers within the write (an echo reply, an
                    // ACK): while this thread serves the TUN, send that at once.
                    if wrote && serves_tun && !hand.heavy() {
                        if let Ok(packets) = self.drain_tun(&mut self.lock_tun_path(), DryTun::Stop)
                        {
                            hand.after_light_drain(packets);
                        }
                    }
                    // Fewer than a full batch: the socket was empty when the kernel
                    // filled it. Outside a stream go straight to `poll` (which returns at
                    // once if more has come) instead of a receive that finds nothing.
                    readable = n == BATCH || pace.streaming();
                }
                // Nothing queued. Under a stream, once: let the CPU go to whoever is
                // ready (the peer daemon or the application) and look again, which
                // turns datagrams arriving one by one into batches; then wait.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !yielded && pace.streaming() {
                        yielded = true;
                        std::thread::yield_now();
                        continue;
                    }
                    yielded = false;
                    readable = false;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => {
                    tracing::error!(error = %e, "reading the UDP socket failed; stopping the UDP reader");
                    return;
                }
            }
        }
    }

    /// Sleep until the socket, the TUN (while this thread serves it) or the doorbell
    /// `bell` has something; serve the TUN and the doorbell here. With `gives_back`
    /// (the main reader of a site with lanes), a sleep of [`lanes::LANES_AFTER_IDLE_MS`]
    /// while the datagrams come to it hands them back to the lanes. Returns whether
    /// the socket is readable.
    fn wait_for_work(
        &self,
        wire: &Wire,
        serves_tun: bool,
        bell: &handover::Doorbell,
        gives_back: bool,
    ) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let hand = &self.handover;
        let light = serves_tun && !hand.heavy();
        let mut fds = [
            PollFd::new(wire.sock.as_fd(), PollFlags::POLLIN),
            PollFd::new(bell.fd(), PollFlags::POLLIN),
            PollFd::new(self.tun.as_fd(), PollFlags::POLLIN),
        ];
        // Only a thread that serves the TUN (the site's reader, or each lane when there are
        // lanes) answers a doorbell and polls the TUN.
        let used = match (serves_tun, light) {
            (false, _) => 1,
            (true, false) => 2,
            (true, true) => 3,
        };
        let timeout = if gives_back && self.lanes.bulk() {
            PollTimeout::from(lanes::LANES_AFTER_IDLE_MS)
        } else {
            PollTimeout::NONE
        };
        match poll(&mut fds[..used], timeout) {
            Ok(0) => {
                self.lanes.to_lanes(&self.wire);
                return false;
            }
            Ok(_) => {}
            // EINTR: look at the socket again.
            Err(_) => return true,
        }
        let revents = |fd: &PollFd<'_>| fd.any().unwrap_or(false);
        if serves_tun && revents(&fds[1]) {
            bell.clear();
        }
        if light && revents(&fds[2]) {
            if let Ok(packets) = self.drain_tun(&mut self.lock_tun_path(), DryTun::YieldOnce) {
                hand.after_light_drain(packets);
            }
        }
        revents(&fds[0])
    }
}

/// Lane `lane`'s doorbell (it has one per lane).
fn hand_bell(hand: &Handover, lane: usize) -> &handover::Doorbell {
    hand.lanes.get(lane).unwrap_or(&hand.udp_reader)
}

/// A random, unused, non-zero 24-bit receiver index base whose low bits are free for
/// the session slot.
pub fn fresh_index(used: &mut std::collections::HashSet<u32>) -> u32 {
    loop {
        let mut b = [0u8; 4];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
        let idx = u32::from_le_bytes(b) & 0x00ff_ffff & !(wg::SESSION_SLOTS - 1);
        if idx != 0 && used.insert(idx) {
            return idx;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysctl(name: &str) -> usize {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn site_socket_buffers_are_not_capped_by_the_host_maximum_when_privileged() {
        use nix::sys::socket::{getsockopt, sockopt};
        let wire = Wire::bind(0).unwrap();
        let rcv = getsockopt(&wire.sock, sockopt::RcvBuf).unwrap();
        let snd = getsockopt(&wire.sock, sockopt::SndBuf).unwrap();
        // The kernel reports twice the size asked for.
        let (want_rcv, want_snd) = if nix::unistd::geteuid().is_root() {
            (2 * SOCKET_BUFFER, 2 * SOCKET_BUFFER)
        } else {
            (
                2 * SOCKET_BUFFER.min(sysctl("rmem_max")),
                2 * SOCKET_BUFFER.min(sysctl("wmem_max")),
            )
        };
        assert_eq!((rcv, snd), (want_rcv, want_snd));
    }
}
