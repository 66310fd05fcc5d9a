//! A deterministic two-site simulator for the IKE engine: virtual clock, latency, jitter
//! (reordering), loss and duplication. Every scenario is reproducible from its seed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sitewire::proto::ike::crypto::AeadAlg;
use sitewire::proto::ike::engine::{
    ChildInfo, ChildKeys, ChildKind, Endpoint, Event, Failure, PeerConfig, Rng, Timers,
};
use sitewire::proto::ike::wire::{ts_from_subnet, Identity, TrafficSelector};

/// splitmix64: small, seedable, good enough for a simulation.
struct SimRng(u64);

impl SimRng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p && p > 0.0
    }
}

impl Rng for SimRng {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[derive(Clone, Copy)]
struct Link {
    latency: Duration,
    jitter: Duration,
    loss: f64,
    dup: f64,
}

impl Link {
    fn clean() -> Self {
        Self {
            latency: Duration::from_millis(10),
            jitter: Duration::ZERO,
            loss: 0.0,
            dup: 0.0,
        }
    }
    fn rough() -> Self {
        Self {
            latency: Duration::from_millis(20),
            jitter: Duration::from_millis(30),
            loss: 0.15,
            dup: 0.1,
        }
    }
}

struct Side {
    ep: Endpoint,
    addr: SocketAddr,
    events: Vec<(Duration, Event)>,
    /// Frozen sides neither receive nor run timers (SIGSTOP).
    frozen: bool,
}

/// A datagram on the simulated wire: (to side, from addr, path, data).
type InFlight = (usize, SocketAddr, u8, Vec<u8>);

struct Sim {
    t0: Instant,
    now: Instant,
    rng: SimRng,
    net_rng: SimRng,
    link: Link,
    sides: [Side; 2],
    /// (deliver at, seq) -> (to side, from addr, path, data)
    wire: BTreeMap<(Instant, u64), InFlight>,
    /// Every datagram sent: (side, path, destination port, exchange type, is response).
    sent: Vec<(usize, u8, u16, u8, bool)>,
    seq: u64,
    delivered: u64,
}

const A: usize = 0;
const B: usize = 1;

fn id(s: &str) -> Identity {
    Identity::fqdn(s)
}

fn ts(s: &str) -> TrafficSelector {
    ts_from_subnet(s.parse().unwrap())
}

fn peer(
    name: &str,
    local: &str,
    remote: &str,
    local_ts: &[&str],
    remote_ts: &[&str],
    remote_addr: Option<SocketAddr>,
    timers: Timers,
) -> PeerConfig {
    PeerConfig {
        name: name.into(),
        local_id: id(local),
        remote_id: id(remote),
        psk: zeroize::Zeroizing::new(b"simulated-psk-of-32-bytes-length".to_vec()),
        ike_aeads: vec![
            AeadAlg::ChaCha20Poly1305,
            AeadAlg::AesGcm16 { key_bits: 256 },
        ],
        child_aeads: vec![AeadAlg::ChaCha20Poly1305],
        child_pfs: true,
        pq: true,
        local_ts: local_ts.iter().map(|s| ts(s)).collect(),
        remote_ts: remote_ts.iter().map(|s| ts(s)).collect(),
        child_kind: ChildKind::WireGuardPsk,
        timers,
        remote_addr,
        via: 0,
        nat_t: None,
    }
}

fn fast_timers() -> Timers {
    Timers {
        retransmit_base: Duration::from_millis(300),
        retransmit_factor: 1.5,
        retransmit_tries: 6,
        dpd_interval: Duration::from_secs(2),
        dpd_timeout: Duration::from_secs(6),
        child_rekey: Duration::from_secs(5),
        ike_rekey: Duration::from_secs(3600),
    }
}

impl Sim {
    fn new(seed: u64, link: Link, timers: Timers) -> Self {
        Self::with_peers(seed, link, |a, b| {
            (
                peer(
                    "to-b",
                    "a.sitewire",
                    "b.sitewire",
                    &["10.1.0.0/24"],
                    &["10.2.0.0/24"],
                    Some(b),
                    timers.clone(),
                ),
                peer(
                    "to-a",
                    "b.sitewire",
                    "a.sitewire",
                    &["10.2.0.0/24"],
                    &["10.1.0.0/24"],
                    Some(a),
                    timers.clone(),
                ),
            )
        })
    }

    fn with_peers(
        seed: u64,
        link: Link,
        make: impl Fn(SocketAddr, SocketAddr) -> (PeerConfig, PeerConfig),
    ) -> Self {
        let a: SocketAddr = "192.0.2.1:500".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:500".parse().unwrap();
        let (pa, pb) = make(a, b);
        let t0 = Instant::now();
        Self {
            t0,
            now: t0,
            rng: SimRng(seed),
            net_rng: SimRng(seed ^ 0xdead_beef),
            link,
            sides: [
                Side {
                    ep: Endpoint::new(vec![pa], a),
                    addr: a,
                    events: Vec::new(),
                    frozen: false,
                },
                Side {
                    ep: Endpoint::new(vec![pb], b),
                    addr: b,
                    events: Vec::new(),
                    frozen: false,
                },
            ],
            wire: BTreeMap::new(),
            seq: 0,
            delivered: 0,
            sent: Vec::new(),
        }
    }

    fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    /// Move everything the endpoints want to send onto the wire; collect events.
    fn drain(&mut self) {
        for s in 0..2 {
            while let Some(tx) = self.sides[s].ep.poll_transmit() {
                let to = if tx.dst.ip() == self.sides[A].addr.ip() {
                    A
                } else {
                    B
                };
                // Path 2 is the NAT-T socket (port 4500), anything else port 500.
                let from = SocketAddr::new(
                    self.sides[s].addr.ip(),
                    if tx.via == 2 {
                        4500
                    } else {
                        self.sides[s].addr.port()
                    },
                );
                self.sent.push((
                    s,
                    tx.via,
                    tx.dst.port(),
                    tx.data[18],
                    tx.data[19] & 0x20 != 0,
                ));
                if self.net_rng.chance(self.link.loss) {
                    continue;
                }
                let copies = if self.net_rng.chance(self.link.dup) {
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    let jitter = if self.link.jitter.is_zero() {
                        Duration::ZERO
                    } else {
                        Duration::from_nanos(
                            self.net_rng.next() % self.link.jitter.as_nanos() as u64,
                        )
                    };
                    self.seq += 1;
                    self.wire.insert(
                        (self.now + self.link.latency + jitter, self.seq),
                        (to, from, tx.via, tx.data.clone()),
                    );
                }
            }
            let el = self.elapsed();
            while let Some(e) = self.sides[s].ep.poll_event() {
                self.sides[s].events.push((el, e));
            }
        }
    }

    /// Run the world until `until` (relative to start).
    fn run_until(&mut self, until: Duration) {
        let end = self.t0 + until;
        loop {
            self.drain();
            let mut next = end;
            if let Some((&(t, _), _)) = self.wire.iter().next() {
                next = next.min(t);
            }
            for s in &self.sides {
                if !s.frozen {
                    if let Some(t) = s.ep.poll_timeout() {
                        next = next.min(t.max(self.now));
                    }
                }
            }
            if next >= end && self.wire.keys().next().is_none_or(|(t, _)| *t > end) {
                self.now = end;
                for s in 0..2 {
                    if !self.sides[s].frozen {
                        self.sides[s].ep.handle_timeout(self.now, &mut self.rng);
                    }
                }
                self.drain();
                return;
            }
            self.now = next;
            // Deliver everything due now.
            while let Some((&k, _)) = self.wire.iter().next() {
                if k.0 > self.now {
                    break;
                }
                let (to, from, via, data) = self.wire.remove(&k).unwrap();
                if self.sides[to].frozen {
                    continue;
                }
                self.delivered += 1;
                self.sides[to]
                    .ep
                    .handle_datagram_via(self.now, from, via, &data, &mut self.rng);
            }
            for s in 0..2 {
                if !self.sides[s].frozen
                    && self.sides[s]
                        .ep
                        .poll_timeout()
                        .is_some_and(|t| t <= self.now)
                {
                    self.sides[s].ep.handle_timeout(self.now, &mut self.rng);
                }
            }
        }
    }

    fn events(&self, s: usize) -> impl Iterator<Item = &Event> {
        self.sides[s].events.iter().map(|(_, e)| e)
    }

    fn child_ups(&self, s: usize) -> Vec<ChildInfo> {
        self.events(s)
            .filter_map(|e| match e {
                Event::ChildUp { child, .. } => Some(child.clone()),
                _ => None,
            })
            .collect()
    }

    fn live_children(&self, s: usize) -> Vec<ChildInfo> {
        self.sides[s].ep.children(0).cloned().collect()
    }
}

fn psk(c: &ChildInfo) -> [u8; 32] {
    match &c.keys {
        ChildKeys::WireGuardPsk(k) => **k,
        other => panic!("unexpected keys {other:?}"),
    }
}

/// Both sides agree on the live CHILD SAs: same keys, crossed SPIs, mirrored selectors.
fn assert_children_agree(sim: &Sim) {
    let a = sim.live_children(A);
    let b = sim.live_children(B);
    assert!(!a.is_empty(), "a has no live CHILD SA");
    assert_eq!(a.len(), b.len(), "a: {a:?}\nb: {b:?}");
    for ca in &a {
        let cb = b
            .iter()
            .find(|cb| cb.spi_in == ca.spi_out)
            .unwrap_or_else(|| panic!("no twin of {ca:?} in {b:?}"));
        assert_eq!(cb.spi_out, ca.spi_in);
        assert_eq!(psk(ca), psk(cb), "keys differ");
        assert_eq!(ca.local_ts, cb.remote_ts);
        assert_eq!(ca.remote_ts, cb.local_ts);
    }
}

#[test]
fn establishes_and_agrees_on_keys() {
    let mut sim = Sim::new(
        1,
        Link::clean(),
        Timers {
            child_rekey: Duration::from_secs(600),
            ..fast_timers()
        },
    );
    sim.sides[A].ep.initiate(0, sim.now, &mut sim.rng);
    sim.run_until(Duration::from_secs(1));
    assert!(
        sim.sides[A].ep.is_established(0),
        "A {:?}\nB {:?}",
        sim.sides[A].events,
        sim.sides[B].events
    );
    assert!(sim.sides[B].ep.is_established(0));
    assert_children_agree(&sim);
    let a = &sim.live_children(A)[0];
    assert_eq!(a.local_ts, vec![ts("10.1.0.0/24")]);
    assert_eq!(a.remote_ts, vec![ts("10.2.0.0/24")]);
    assert!(!a.pfs, "the IKE_AUTH CHILD SA has no extra key exchange");
    // 3 round trips over a 10 ms link: IKE_SA_INIT, IKE_INTERMEDIATE (ML-KEM), IKE_AUTH.
    let up_at = sim.sides[A]
        .events
        .iter()
        .find(|(_, e)| matches!(e, Event::ChildUp { .. }))
        .unwrap()
        .0;
    assert_eq!(up_at, Duration::from_millis(60));
    let rtts: Vec<Duration> = sim
        .events(A)
        .filter_map(|e| match e {
            Event::RttSample { rtt, .. } => Some(*rtt),
            _ => None,
        })
        .collect();
    assert_eq!(rtts, vec![Duration::from_millis(20); 3]);
}

#[test]
fn child_rekeys_make_before_break_with_pfs() {
    let mut sim = Sim::new(2, Link::clean(), fast_timers());
    sim.sides[A].ep.initiate(0, sim.now, &mut sim.rng);
    // Check at every 100 ms that both sides always hold a usable CHILD SA.
    let mut t = Duration::from_secs(1);
    sim.run_until(t);
    while t < Duration::from_secs(62) {
        t += Duration::from_millis(100);
        sim.run_until(t);
        assert!(
            !sim.live_children(A).is_empty() && !sim.live_children(B).is_empty(),
            "gap at {t:?}"
        );
    }
    assert_children_agree(&sim);
    let ups = sim.child_ups(A);
    // One every 5 s for 60 s, plus the first.
    assert!(ups.len() >= 12, "only {} CHILD SAs", ups.len());
    assert!(ups[1..].iter().all(|c| c.pfs && c.rekey_of.is_some()));
    let keys: std::collections::HashSet<[u8; 32]> = ups.iter().map(psk).collect();
    assert_eq!(keys.len(), ups.len(), "a key repeated");
    // Every replaced SA was eventually torn down on both sides.
    let downs_a = sim
        .events(A)
        .filter(|e| matches!(e, Event::ChildDown { .. }))
        .count();
    let downs_b = sim
        .events(B)
        .filter(|e| matches!(e, Event::ChildDown { .. }))
        .count();
    assert!(
        downs_a >= ups.len() - 2 && downs_b >= ups.len() - 2,
        "{downs_a} {downs_b} of {}",
        ups.len()
    );
    let bad: Vec<&Event> = sim
        .events(A)
        .chain(sim.events(B))
        .filter(|e| matches!(e, Event::Failed { .. } | Event::PeerDead { .. }))
        .collect();
    assert!(
        bad.is_empty(),
        "{bad:?}\nA {:?}\nB {:?}",
        &sim.sides[A].events[..40.min(sim.sides[A].events.len())],
        &sim.sides[B].events[..40.min(sim.sides[B].events.len())]
    );
}

#[test]
fn ike_sa_rekey_keeps_children() {
    let mut sim = Sim::new(
        3,
        Link::clean(),
        Timers {
            ike_rekey: Duration::from_secs(8),
            child_rekey: Duration::from_secs(600),
            ..fast_timers()
        },
    );
    sim.sides[A].ep.initiate(0, sim.now, &mut sim.rng);
    sim.run_until(Duration::from_secs(1));
    let child = sim.live_children(A)[0].id;
    let spis = sim.sides[A].ep.ike_sa_info(0).unwrap();
    sim.run_until(Duration::from_secs(30));
    let rekeys = sim
        .events(A)
        .filter(|e| matches!(e, Event::IkeUp { rekey: true, .. }))
        .count();
    assert!(rekeys >= 3, "{rekeys} IKE rekeys");
    assert_ne!(sim.sides[A].ep.ike_sa_info(0).unwrap(), spis);
    assert_eq!(
        sim.sides[A].ep.ike_sa_info(0).map(|i| (i.0, i.1)),
        sim.sides[B].ep.ike_sa_info(0).map(|i| (i.0, i.1))
    );
    // The CHILD SA lived through every IKE rekey.
    assert_eq!(
        sim.live_children(A)
            .iter()
            .map(|c| c.id)
            .collect::<Vec<_>>(),
        vec![child]
    );
    assert!(!sim.events(A).any(|e| matches!(e, Event::ChildDown { .. })));
    assert_children_agree(&sim);
    // And the new IKE SA carries further CHILD rekeys.
    sim.sides[A].ep.rekey_child(0, sim.now, &mut sim.rng);
    sim.run_until(Duration::from_secs(31));
    assert_children_agree(&sim);
    assert_eq!(sim.child_ups(A).len(), 2);
}

#[test]
fn simultaneous_child_rekey_leaves_one_sa() {
    for seed in 10..20 {
        let mut sim = Sim::new(
            seed,
            Link::clean(),
            Timers {
                child_rekey: Duration::from_secs(600),
                ..fast_timers()
            },
        );
        sim.sides[A].ep.initiate(0, sim.now, &mut sim.rng);
        sim.run_until(Duration::from_secs(1));
        let now = sim.now;
        sim.sides[A].ep.rekey_child(0, now, &mut sim.rng);
        sim.sides[B].ep.rekey_child(0, now, &mut sim.rng);
        sim.run_until(Duration::from_secs(10));
        assert_eq!(
            sim.live_children(A).len(),
            1,
            "seed {seed}: {:?}",
            sim.live_children(A)
        );
        assert_children_agree(&sim);
        // Both exchanges completed: two new SAs were made on each side, one survived.
        assert_eq!(sim.child_ups(A).len(), 3, "seed {seed}");
    }
}

#[test]
fn survives_loss_reordering_and_duplication() {
    for seed in 100..110 {
        let mut sim = Sim::new(
            seed,
            Link::rough(),
            Timers {
                dpd_timeout: Duration::from_secs(30),
                ..fast_timers()
            },
        );
        sim.sides[A].ep.initiate(0, sim.now, &mut sim.rng);
        sim.run_until(Duration::from_secs(60));
        assert!(
            sim.sides[A].ep.is_established(0),
            "seed {seed}: {:?}",
            sim.sides[A].events
        );
        assert_children_agree(&sim);
        assert!(
            sim.child_ups(A).len() >= 5,
            "seed {seed}: {} CHILD SAs",
            sim.child_ups(A).len()
        );
        assert!(
            sim.events(A).all(|e| !matches!(e, Event::PeerDead { .. })),
            "seed {seed}"
        );
    }
}

#[test]
fn dead_peer_is_detected_within_the_timeout() {
    let timers = fast_timers();
    let mut sim = Sim::new(
        4,
        Link::clean(),
        Timers {
            child_rekey: Duration::from_secs(600),
            ..timers.clone()
        },
    );
    sim.sides[A].ep.initiate(0, sim.now, &mut sim.rng);
    sim.run_until(Duration::from_secs(1));
    sim.sides[B].frozen = true;
    let frozen_at = sim.elapsed();
    sim.run_until(Duration::from_secs(30));
    let (at, _) = sim.sides[A]
        .events
        .iter()
        .find(|(_, e)| matches!(e, Event::PeerDead { .. }))
        .expect("no PeerDead");
    let took = *at - frozen_at;
    // Nothing heard for dpd_interval -> probe; dead once dpd_timeout passed since the last message.
    assert!(
        took <= timers.dpd_timeout + Duration::from_millis(500),
        "took {took:?}"
    );
    assert!(
        took >= timers.dpd_timeout - Duration::from_secs(1),
        "too eager: {took:?}"
    );
    assert!(sim.live_children(A).is_empty());
    assert!(!sim.sides[A].ep.is_established(0));
}

#[test]
fn restart_with_initial_contact_replaces_old_sas() {
    let mut sim = Sim::new(
        5,
        Link::clean(),
        Timers {
            child_rekey: Duration::from_secs(600),
            ..fast_timers()
        },
    );
    sim.sides[A].ep.initiate(0, sim.now, &mut sim.rng);
    sim.run_until(Duration::from_secs(20));
    let old = sim.live_children(A)[0].id;
    // B restarts: a fresh endpoint with the same configuration, which initiates.
    let cfg = sim.sides[B].ep.peer_config(0).clone();
    sim.sides[B].ep = Endpoint::new(vec![cfg], sim.sides[B].addr);
    sim.sides[B].events.clear();
    sim.sides[B].ep.initiate(0, sim.now, &mut sim.rng);
    sim.run_until(Duration::from_secs(21));
    assert!(sim
        .events(A)
        .any(|e| matches!(e, Event::PeerRestarted { .. })));
    assert!(sim
        .events(A)
        .any(|e| matches!(e, Event::ChildDown { id, .. } if *id == old)));
    assert_children_agree(&sim);
    assert_ne!(sim.live_children(A)[0].id, old);
}

#[test]
fn simultaneous_ike_rekey_converges() {
    for seed in 50..60 {
        let mut sim = Sim::new(
            seed,
            Link::clean(),
            Timers {
                child_rekey: Duration::from_secs(600),
                ..fast_timers()
            },
        );
        sim.sides[A].ep.initiate(0, sim.now, &mut sim.rng);
        sim.run_until(Duration::from_secs(1));
        let before = sim.sides[A].ep.ike_sa_info(0).map(|i| (i.0, i.1));
        let now = sim.now;
        sim.sides[A].ep.rekey_ike(0, now, &mut sim.rng);
        sim.sides[B].ep.rekey_ike(0, now, &mut sim.rng);
        sim.run_until(Duration::from_secs(10));
        let a = sim.sides[A].ep.ike_sa_info(0).map(|i| (i.0, i.1));
        assert_ne!(a, before, "seed {seed}: no rekey happened");
        assert_eq!(
            a,
            sim.sides[B].ep.ike_sa_info(0).map(|i| (i.0, i.1)),
            "seed {seed}"
        );
        assert_children_agree(&sim);
        // The surviving SA carries on: a CHILD rekey over it works.
        sim.sides[B].ep.rekey_child(0, sim.now, &mut sim.rng);
        sim.run_until(Duration::from_secs(12));
        assert_children_agree(&sim);
        assert!(
            sim.events(A)
                .chain(sim.events(B))
                .all(|e| !matches!(e, Event::PeerDead { .. })),
            "seed {seed}"
        );
    }
}

#[test]
fn simultaneous_initiation_converges() {
    for seed in 30..40 {
        let mut sim = Sim::new(
            seed,
            Link::clean(),
            Timers {
                child_rekey: Duration::from_secs(600),
                ..fast_timers()
            },
        );
        let now = sim.now;
        sim.sides[A].ep.initiate(0, now, &mut sim.rng);
        sim.sides[B].ep.initiate(0, now, &mut sim.rng);
        sim.run_until(Duration::from_secs(15));
        assert!(
            sim.sides[A].ep.is_established(0) && sim.sides[B].ep.is_established(0),
            "seed {seed}:\nA {:?}\nB {:?}",
            sim.sides[A].events,
            sim.sides[B].events
        );
        assert_eq!(
            sim.sides[A].ep.ike_sa_info(0).map(|i| (i.0, i.1)),
            sim.sides[B].ep.ike_sa_info(0).map(|i| (i.0, i.1)),
            "seed {seed}"
        );
        assert_eq!(sim.live_children(A).len(), 1, "seed {seed}");
        assert_children_agree(&sim);
    }
}

#[test]
fn post_quantum_exchange_runs_in_ike_intermediate() {
    let mut sim = Sim::new(
        41,
        Link::clean(),
        Timers {
            child_rekey: Duration::from_secs(4),
            ike_rekey: Duration::from_secs(9),
            ..fast_timers()
        },
    );
    sim.sides[A].ep.initiate(0, sim.now, &mut sim.rng);
    sim.run_until(Duration::from_secs(1));
    assert!(sim.sides[A].ep.ike_sa_pq(0) && sim.sides[B].ep.ike_sa_pq(0));
    assert_children_agree(&sim);
    // IKE_SA_INIT, IKE_INTERMEDIATE, IKE_AUTH: three round trips over a 10 ms link.
    let up_at = sim.sides[A]
        .events
        .iter()
        .find(|(_, e)| matches!(e, Event::ChildUp { .. }))
        .unwrap()
        .0;
    assert_eq!(up_at, Duration::from_millis(60));
    // Rekeys of both kinds keep working on the post-quantum SA.
    sim.run_until(Duration::from_secs(20));
    assert!(sim.sides[A].ep.ike_sa_pq(0));
    assert!(sim.child_ups(A).len() >= 4);
    assert_children_agree(&sim);
}

#[test]
fn post_quantum_downgrade_is_refused() {
    let t = fast_timers();
    // a requires the ML-KEM exchange, b does not offer it.
    let mut sim = Sim::with_peers(42, Link::clean(), |a, b| {
        let pa = peer(
            "to-b",
            "a.sitewire",
            "b.sitewire",
            &["10.1.0.0/24"],
            &["10.2.0.0/24"],
            Some(b),
            t.clone(),
        );
        let mut pb = peer(
            "to-a",
            "b.sitewire",
            "a.sitewire",
            &["10.2.0.0/24"],
            &["10.1.0.0/24"],
            Some(a),
            t.clone(),
        );
        pb.pq = false;
        (pa, pb)
    });
    sim.sides[B].ep.initiate(0, sim.now, &mut sim.rng);
    sim.run_until(Duration::from_secs(1));
    assert!(sim.events(A).any(|e| matches!(e, Event::Failed { failure: Failure::Protocol(m), .. } if m.contains("post-quantum"))), "{:?}", sim.sides[A].events);
    assert!(sim.live_children(A).is_empty());
    // Both without it: classic exchange, two round trips.
    let mut sim = Sim::with_peers(43, Link::clean(), |a, b| {
        let mut pa = peer(
            "to-b",
            "a.sitewire",
            "b.sitewire",
            &["10.1.0.0/24"],
            &["10.2.0.0/24"],
            Some(b),
            t.clone(),
        );
        let mut pb = peer(
            "to-a",
            "b.sitewire",
            "a.sitewire",
            &["10.2.0.0/24"],
            &["10.1.0.0/24"],
            Some(a),
            t.clone(),
        );
        pa.pq = false;
        pb.pq = false;
        (pa, pb)
    });
    sim.sides[A].ep.initiate(0, sim.now, &mut sim.rng);
    sim.run_until(Duration::from_secs(1));
    assert!(!sim.sides[A].ep.ike_sa_pq(0));
    assert_children_agree(&sim);
}

#[test]
fn responder_narrows_traffic_selectors() {
    let t = Timers {
        child_rekey: Duration::from_secs(600),
        ..fast_timers()
    };
    let mut sim = Sim::with_peers(6, Link::clean(), |a, b| {
        (
            peer(
                "to-b",
                "a.sitewire",
                "b.sitewire",
                &["10.1.0.0/16"],
                &["10.2.0.0/16"],
                Some(b),
                t.clone(),
            ),
            peer(
                "to-a",
                "b.sitewire",
                "a.sitewire",
                &["10.2.3.0/24"],
                &["10.1.5.0/24"],
                Some(a),
                t.clone(),
            ),
        )
    });
    sim.sides[A].ep.initiate(0, sim.now, &mut sim.rng);
    sim.run_until(Duration::from_secs(1));
    assert_children_agree(&sim);
    let a = &sim.live_children(A)[0];
    assert_eq!(a.local_ts, vec![ts("10.1.5.0/24")]);
    assert_eq!(a.remote_ts, vec![ts("10.2.3.0/24")]);
}

#[test]
fn traffic_selector_mismatch_is_reported_on_both_sides() {
    let t = fast_timers();
    let mut sim = Sim::with_peers(7, Link::clean(), |a, b| {
        (
            peer(
                "to-b",
                "a.sitewire",
                "b.sitewire",
                &["10.1.0.0/24"],
                &["10.2.0.0/24"],
                Some(b),
                t.clone(),
            ),
            peer(
                "to-a",
                "b.sitewire",
                "a.sitewire",
                &["10.9.0.0/24"],
                &["10.1.0.0/24"],
                Some(a),
                t.clone(),
            ),
        )
    });
    sim.sides[A].ep.initiate(0, sim.now, &mut sim.rng);
    sim.run_until(Duration::from_secs(1));
    for s in [A, B] {
        assert!(
            sim.events(s).any(|e| matches!(
                e,
                Event::Failed {
                    failure: Failure::TsUnacceptable { .. },
                    ..
                }
            )),
            "side {s}: {:?}",
            sim.sides[s].events
        );
        assert!(sim.live_children(s).is_empty());
    }
    // The IKE SA itself is up (RFC 7296: only the CHILD SA failed).
    assert!(sim.sides[A].ep.is_established(0));
}

#[test]
fn wrong_psk_fails_authentication_on_both_sides() {
    let t = fast_timers();
    let mut sim = Sim::with_peers(8, Link::clean(), |a, b| {
        let pa = peer(
            "to-b",
            "a.sitewire",
            "b.sitewire",
            &["10.1.0.0/24"],
            &["10.2.0.0/24"],
            Some(b),
            t.clone(),
        );
        let mut pb = peer(
            "to-a",
            "b.sitewire",
            "a.sitewire",
            &["10.2.0.0/24"],
            &["10.1.0.0/24"],
            Some(a),
            t.clone(),
        );
        pb.psk = zeroize::Zeroizing::new(b"another-psk-entirely-32-bytes-ok".to_vec());
        (pa, pb)
    });
    sim.sides[A].ep.initiate(0, sim.now, &mut sim.rng);
    sim.run_until(Duration::from_secs(2));
    for s in [A, B] {
        assert!(
            sim.events(s).any(|e| matches!(
                e,
                Event::Failed {
                    failure: Failure::AuthenticationFailed,
                    ..
                }
            )),
            "side {s}"
        );
        assert!(sim.live_children(s).is_empty());
    }
}

#[test]
fn garbage_never_panics_and_is_counted() {
    let mut sim = Sim::new(9, Link::clean(), fast_timers());
    sim.sides[A].ep.initiate(0, sim.now, &mut sim.rng);
    sim.run_until(Duration::from_secs(1));
    let from = sim.sides[B].addr;
    let mut rng = SimRng(99);
    for n in 0..5000usize {
        let mut buf = vec![0u8; (rng.next() % 300) as usize];
        rng.fill(&mut buf);
        if n % 3 == 0 && buf.len() >= 28 {
            // Valid-looking header with our SPIs, random rest.
            let (i, r, ..) = sim.sides[A].ep.ike_sa_info(0).unwrap();
            buf[..8].copy_from_slice(&i.to_be_bytes());
            buf[8..16].copy_from_slice(&r.to_be_bytes());
            buf[17] = 0x20;
        }
        let now = sim.now;
        sim.sides[A]
            .ep
            .handle_datagram(now, from, &buf, &mut sim.rng);
    }
    sim.drain();
    let dropped = sim
        .events(A)
        .filter(|e| matches!(e, Event::Dropped { .. }))
        .count();
    assert!(dropped > 4000, "{dropped}");
    // The real SA is unharmed.
    sim.run_until(Duration::from_secs(3));
    assert!(sim.sides[A].ep.is_established(0));
    assert_children_agree(&sim);
}

/// Until IKE_SA_INIT is answered the initiator's SA has no keys. Messages that name it
/// (IKE_AUTH, CREATE_CHILD_SA, INFORMATIONAL; requests and responses; any message ID)
/// are each dropped and counted, never a panic, and the real exchange completes after.
#[test]
fn messages_for_a_half_open_sa_are_dropped_and_counted() {
    let mut sim = Sim::new(13, Link::clean(), fast_timers());
    sim.sides[A].ep.initiate(0, sim.now, &mut sim.rng);
    // Take A's IKE_SA_INIT off the wire: B answers only its retransmission, later.
    let init = sim.sides[A]
        .ep
        .poll_transmit()
        .expect("initiate sends IKE_SA_INIT");
    assert_eq!(init.data[18], 34);
    let spi_i = u64::from_be_bytes(init.data[..8].try_into().unwrap());
    let from = sim.sides[B].addr;
    let mut rng = SimRng(7);
    const N: u32 = 3000;
    for n in 0..N {
        let mut buf = vec![0u8; 28 + (rng.next() % 200) as usize];
        rng.fill(&mut buf);
        buf[..8].copy_from_slice(&spi_i.to_be_bytes());
        buf[15] |= 1; // some responder SPI
        buf[16] = 46; // SK
        buf[17] = 0x20;
        buf[18] = [35, 36, 37][n as usize % 3];
        buf[19] = if n % 2 == 0 { 0x20 } else { 0 }; // response / request, from the responder
        buf[20..24].copy_from_slice(&(n % 4).to_be_bytes());
        let len = buf.len() as u32;
        buf[24..28].copy_from_slice(&len.to_be_bytes());
        let now = sim.now;
        sim.sides[A]
            .ep
            .handle_datagram(now, from, &buf, &mut sim.rng);
    }
    let before = sim.sent.len();
    sim.drain();
    let dropped = sim
        .events(A)
        .filter(|e| matches!(e, Event::Dropped { .. }))
        .count();
    assert_eq!(dropped, N as usize);
    assert_eq!(
        sim.sent
            .iter()
            .skip(before)
            .filter(|&&(s, ..)| s == A)
            .count(),
        0,
        "A answers none of them"
    );
    sim.run_until(Duration::from_secs(3));
    assert!(sim.sides[A].ep.is_established(0) && sim.sides[B].ep.is_established(0));
    assert_children_agree(&sim);
}

/// IPsec: the initiator starts on port 500 and floats to 4500 after IKE_SA_INIT; the
/// responder answers on the path each request came in on; both sides end up with ESP keys
/// that mirror each other.
#[test]
fn ipsec_floats_to_nat_t_and_keys_esp() {
    let mut sim = Sim::with_peers(11, Link::clean(), |a, b| {
        let mut pa = peer(
            "to-b",
            "a.sitewire",
            "b.sitewire",
            &["10.1.0.0/24"],
            &["10.2.0.0/24"],
            Some(b),
            fast_timers(),
        );
        let mut pb = peer(
            "to-a",
            "b.sitewire",
            "a.sitewire",
            &["10.2.0.0/24"],
            &["10.1.0.0/24"],
            Some(a),
            fast_timers(),
        );
        for p in [&mut pa, &mut pb] {
            p.child_kind = ChildKind::Esp;
            p.pq = false;
            p.child_pfs = false;
            p.child_aeads = vec![AeadAlg::AesGcm16 { key_bits: 256 }];
            p.via = 1;
            p.nat_t = Some((2, 4500));
        }
        pb.remote_addr = None;
        (pa, pb)
    });
    sim.sides[A].ep.initiate(0, sim.now, &mut sim.rng);
    sim.run_until(Duration::from_secs(12));
    assert!(sim.sides[A].ep.is_established(0) && sim.sides[B].ep.is_established(0));
    // IKE_SA_INIT (34) both ways on path 1 / port 500; everything after on path 2 / 4500.
    for &(side, via, port, exchange, _) in &sim.sent {
        if exchange == 34 {
            assert_eq!((via, port), (1, 500), "IKE_SA_INIT from side {side}");
        } else {
            assert_eq!(
                (via, port),
                (2, 4500),
                "exchange {exchange} from side {side}"
            );
        }
    }
    assert!(sim.sent.iter().any(|&(s, _, _, x, _)| s == B && x == 35));
    let (a, b) = (sim.child_ups(A), sim.child_ups(B));
    let (ca, cb) = (a.last().unwrap(), b.last().unwrap());
    assert_eq!(ca.spi_in, cb.spi_out);
    assert_eq!(ca.spi_out, cb.spi_in);
    match (&ca.keys, &cb.keys) {
        (
            ChildKeys::Esp {
                aead,
                key_in,
                key_out,
            },
            ChildKeys::Esp {
                key_in: bi,
                key_out: bo,
                ..
            },
        ) => {
            assert_eq!(*aead, AeadAlg::AesGcm16 { key_bits: 256 });
            assert_eq!(key_in.len(), 36);
            assert_eq!(&key_in[..], &bo[..]);
            assert_eq!(&key_out[..], &bi[..]);
            assert_ne!(&key_in[..], &key_out[..]);
        }
        other => panic!("expected ESP keys, got {other:?}"),
    }
    assert_eq!(
        sim.sides[A].ep.remote_of(0).map(|(a, v)| (a.port(), v)),
        Some((4500, 2))
    );
    assert_eq!(
        sim.sides[B].ep.remote_of(0).map(|(a, v)| (a.port(), v)),
        Some((4500, 2))
    );
}

/// A private-use notify reaches the peer over the IKE SA; after both sides change their
/// identities and PSK, the next IKE SA authenticates with the new ones (and only those).
#[test]
fn private_notify_and_new_credentials_for_the_next_ike_sa() {
    let mut sim = Sim::new(5, Link::clean(), fast_timers());
    sim.sides[A].ep.initiate(0, sim.now, &mut sim.rng);
    sim.run_until(Duration::from_secs(1));
    assert!(sim.sides[A].ep.is_established(0));
    let now = sim.now;
    assert!(sim.sides[A].ep.notify(0, 40961, b"next key".to_vec(), now));
    sim.run_until(Duration::from_secs(2));
    let got: Vec<_> = sim
        .events(B)
        .filter_map(|e| match e {
            Event::PeerNotify { ty, data, .. } => Some((*ty, data.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(got, vec![(40961, b"next key".to_vec())]);
    // New identities and PSK on both sides, then a fresh IKE SA.
    let psk = || zeroize::Zeroizing::new(b"the-new-psk-after-a-key-rotation".to_vec());
    sim.sides[A]
        .ep
        .set_auth(0, id("a2.sitewire"), id("b2.sitewire"), psk());
    sim.sides[B]
        .ep
        .set_auth(0, id("b2.sitewire"), id("a2.sitewire"), psk());
    let now = sim.now;
    sim.sides[A].ep.close(0, now);
    sim.sides[B].ep.close(0, now);
    sim.sides[A].ep.initiate(0, now, &mut sim.rng);
    sim.run_until(Duration::from_secs(4));
    assert!(sim.sides[A].ep.is_established(0) && sim.sides[B].ep.is_established(0));
    // A side left on the old PSK cannot authenticate any more.
    sim.sides[B].ep.set_auth(
        0,
        id("b2.sitewire"),
        id("a2.sitewire"),
        zeroize::Zeroizing::new(b"simulated-psk-of-32-bytes-length".to_vec()),
    );
    let now = sim.now;
    sim.sides[A].ep.close(0, now);
    sim.sides[B].ep.close(0, now);
    sim.sides[A].ep.initiate(0, now, &mut sim.rng);
    sim.run_until(Duration::from_secs(6));
    assert!(!sim.sides[A].ep.is_established(0));
    assert!(sim.events(A).any(|e| matches!(
        e,
        Event::Failed {
            failure: Failure::AuthenticationFailed,
            ..
        }
    )));
}
