//! Known-answer tests of the ESP core (`sitewire::proto::esp`) against the real strongSwan
//! 5.9.8 kernel-libipsec ESP packets in `shared/interop/vectors/` (AES-256-GCM-16 in suites
//! a, c, d; ChaCha20-Poly1305 in suite b), plus property tests: open never panics, and
//! seal→open round-trips with both AEADs.
//!
//! The vectors live next to the checkout (`../shared`). If they are missing the vector tests
//! print SKIP, except under CI=true, where they fail.
//!
//! About the IV: strongSwan's libipsec draws a random 64-bit value per SA and sends
//! IV = value XOR sequence number (suite c, child2: seq 1 → ..4bf2, seq 2 → ..4bf1). Our
//! default IV is the sequence number itself; with `EspSa::set_iv_mask(iv ^ seq)` taken from
//! the first captured packet of a direction, sealing reproduces every captured packet byte for
//! byte, including the second packet of suite c's child2 (which checks the XOR hypothesis).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use proptest::prelude::*;
use serde_json::Value;
use sitewire::proto::esp::{
    inner_allowed, sealed_len, EspSa, OpenError, SealError, NEXT_HEADER_IPV4, NEXT_HEADER_IPV6,
};
use sitewire::proto::ike::crypto::AeadAlg;
use sitewire::proto::ike::wire::TrafficSelector;

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/interop/vectors");
const SUITES: [&str; 4] = [
    "suite-a-aes256gcm16.json",
    "suite-b-chacha20poly1305.json",
    "suite-c-aes256gcm16-pfs-ike-rekey.json",
    "suite-d-python-initiator-aes256gcm16.json",
];
/// ESP packets across the four suites: a 4, b 4, c 6, d 2.
const EXPECTED_PACKETS: usize = 16;

fn shared_dir(dir: &str) -> Option<PathBuf> {
    let p = Path::new(dir);
    if p.is_dir() {
        return Some(p.to_path_buf());
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{dir} is missing: CI must have ../shared next to the checkout");
    }
    println!("SKIP: {dir} not found (the ESP known-answer vectors live in ../shared)");
    None
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length: {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn h(v: &Value) -> Vec<u8> {
    unhex(
        v.as_str()
            .unwrap_or_else(|| panic!("not a hex string: {v}")),
    )
}

fn be32(v: &Value) -> u32 {
    u32::from_be_bytes(h(v).try_into().expect("4 octets"))
}

fn be64(v: &Value) -> u64 {
    u64::from_be_bytes(h(v).try_into().expect("8 octets"))
}

/// "10.211.1.0/24" as a range selector (any protocol, any port).
fn ts_of(cidr: &str) -> TrafficSelector {
    let (addr, len) = cidr.split_once('/').expect("cidr");
    let a: Ipv4Addr = addr.parse().expect("addr");
    let len: u32 = len.parse().expect("prefix");
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    let start = u32::from(a) & mask;
    TrafficSelector {
        ip_proto: 0,
        start_port: 0,
        end_port: 65535,
        start: IpAddr::V4(Ipv4Addr::from(start)),
        end: IpAddr::V4(Ipv4Addr::from(start | !mask)),
    }
}

#[derive(Debug, Clone)]
struct Packet {
    index: u64,
    /// initiator -> responder (of the exchange that made the CHILD SA).
    i2r: bool,
    spi: u32,
    seq: u32,
    iv: u64,
    udp_payload: Vec<u8>,
    inner: Vec<u8>,
    next_header: u8,
    icmp_data: Vec<u8>,
}

#[derive(Debug, Clone)]
struct Child {
    name: String,
    alg: AeadAlg,
    spi_initiator_inbound: u32,
    spi_responder_inbound: u32,
    encr_i: Vec<u8>,
    encr_r: Vec<u8>,
    initiator_ts: TrafficSelector,
    responder_ts: TrafficSelector,
    pattern: Vec<u8>,
    packets: Vec<Packet>,
}

impl Child {
    /// The exchange initiator's SA: sends i→r on the responder's inbound SPI with `encr_i`.
    fn initiator_sa(&self) -> EspSa {
        EspSa::new(
            self.spi_responder_inbound,
            &self.encr_i,
            self.spi_initiator_inbound,
            &self.encr_r,
            self.alg,
        )
        .expect("initiator SA")
    }

    fn responder_sa(&self) -> EspSa {
        EspSa::new(
            self.spi_initiator_inbound,
            &self.encr_r,
            self.spi_responder_inbound,
            &self.encr_i,
            self.alg,
        )
        .expect("responder SA")
    }

    /// (sender, receiver) for a packet's direction.
    fn sas_for(&self, i2r: bool) -> (EspSa, EspSa) {
        if i2r {
            (self.initiator_sa(), self.responder_sa())
        } else {
            (self.responder_sa(), self.initiator_sa())
        }
    }
}

fn load_children(dir: &Path) -> Vec<Child> {
    let mut out = Vec::new();
    for suite in SUITES {
        let text = std::fs::read_to_string(dir.join(suite)).unwrap_or_else(|e| panic!("{e}"));
        let d: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{suite}: {e}"));
        let encr = &d["config"]["esp_transforms"]["encr"];
        let alg = match encr["id"].as_u64() {
            Some(20) => AeadAlg::AesGcm16 {
                key_bits: encr["key_length_attribute"].as_u64().expect("key length") as u16,
            },
            Some(28) => AeadAlg::ChaCha20Poly1305,
            other => panic!("{suite}: unexpected ESP encr {other:?}"),
        };
        let pattern = h(&d["config"]["ping_pattern"]);
        let initiator_ts = ts_of(
            d["config"]["initiator"]["traffic_selector"]
                .as_str()
                .unwrap(),
        );
        let responder_ts = ts_of(
            d["config"]["responder"]["traffic_selector"]
                .as_str()
                .unwrap(),
        );
        let messages = d["messages"].as_array().expect("messages");
        let children = d["child_sas"].as_object().expect("child_sas");
        for (name, c) in children {
            let packets = c["esp_packets"]
                .as_array()
                .expect("esp_packets")
                .iter()
                .map(|i| {
                    let i = i.as_u64().expect("index");
                    let m = &messages[i as usize];
                    assert_eq!(m["index"].as_u64(), Some(i));
                    assert_eq!(m["kind"], "esp");
                    let e = &m["esp"];
                    assert_eq!(e["child_sa"].as_str(), Some(name.as_str()));
                    let dir = e["direction"].as_str().expect("direction");
                    Packet {
                        index: i,
                        i2r: match dir {
                            "initiator->responder" => true,
                            "responder->initiator" => false,
                            _ => panic!("direction {dir}"),
                        },
                        spi: be32(&e["spi"]),
                        seq: e["seq"].as_u64().expect("seq") as u32,
                        iv: be64(&e["iv"]),
                        udp_payload: h(&m["udp_payload"]),
                        inner: h(&e["inner_packet"]),
                        next_header: e["next_header"].as_u64().expect("nh") as u8,
                        icmp_data: h(&e["inner_decoded"]["icmp"]["data"]),
                    }
                })
                .collect();
            out.push(Child {
                name: format!("{suite}:{name}"),
                alg,
                spi_initiator_inbound: be32(&c["spi_initiator_inbound"]),
                spi_responder_inbound: be32(&c["spi_responder_inbound"]),
                encr_i: h(&c["encr_i"]),
                encr_r: h(&c["encr_r"]),
                initiator_ts,
                responder_ts,
                pattern: pattern.clone(),
                packets,
            });
        }
    }
    out
}

static CHILDREN: LazyLock<Option<Vec<Child>>> =
    LazyLock::new(|| shared_dir(VECTORS).map(|d| load_children(&d)));

fn children() -> &'static [Child] {
    CHILDREN.as_deref().unwrap_or(&[])
}

fn all_packets() -> impl Iterator<Item = (&'static Child, &'static Packet)> {
    children()
        .iter()
        .flat_map(|c| c.packets.iter().map(move |p| (c, p)))
}

#[test]
fn vectors_present() {
    if CHILDREN.is_none() {
        return;
    }
    assert_eq!(all_packets().count(), EXPECTED_PACKETS);
    // Both AEADs are covered, in both directions.
    assert!(children()
        .iter()
        .any(|c| c.alg == AeadAlg::ChaCha20Poly1305 && !c.packets.is_empty()));
    assert!(children()
        .iter()
        .any(|c| c.alg == AeadAlg::AesGcm16 { key_bits: 256 } && !c.packets.is_empty()));
    assert!(all_packets().any(|(_, p)| p.i2r));
    assert!(all_packets().any(|(_, p)| !p.i2r));
}

#[test]
fn vectors_open_every_packet_to_the_logged_plaintext() {
    let mut opened = 0;
    for c in children() {
        let (mut at_i, mut at_r) = (c.initiator_sa(), c.responder_sa());
        for p in &c.packets {
            let (rx, remote_ts) = if p.i2r {
                (&mut at_r, c.initiator_ts)
            } else {
                (&mut at_i, c.responder_ts)
            };
            assert_eq!(p.spi, rx.spi_in(), "{} #{}", c.name, p.index);
            let mut out = [0u8; 2048];
            let (n, nh) = rx
                .open(&p.udp_payload, &mut out)
                .unwrap_or_else(|e| panic!("{} #{}: {e}", c.name, p.index));
            assert_eq!(&out[..n], &p.inner[..], "{} #{}", c.name, p.index);
            assert_eq!(nh, p.next_header);
            assert_eq!(nh, NEXT_HEADER_IPV4);
            assert_eq!(rx.replay_window().top(), u64::from(p.seq));

            // ICMP echo with the ping pattern: IPv4 (IHL 5), protocol 1, data after the
            // 8-octet ICMP header = 16-octet timestamp then "sitewire-vectors" repeated.
            let inner = &out[..n];
            assert_eq!(inner[0], 0x45);
            assert_eq!(inner[9], 1, "ICMP");
            let data = &inner[28..];
            assert_eq!(data, &p.icmp_data[..]);
            let tail = &data[16..];
            assert!(!tail.is_empty());
            for (i, b) in tail.iter().enumerate() {
                assert_eq!(
                    *b,
                    c.pattern[i % c.pattern.len()],
                    "{} #{}",
                    c.name,
                    p.index
                );
            }
            // The inner source is within the sender's traffic selector, not the other one.
            assert!(inner_allowed(inner, &[remote_ts]));
            let wrong = if p.i2r {
                c.responder_ts
            } else {
                c.initiator_ts
            };
            assert!(!inner_allowed(inner, &[wrong]));
            opened += 1;
        }
    }
    if CHILDREN.is_some() {
        assert_eq!(opened, EXPECTED_PACKETS);
    }
}

#[test]
fn vectors_open_in_place() {
    for (c, p) in all_packets() {
        let (_, rx) = c.sas_for(p.i2r);
        let mut buf = p.udp_payload.clone();
        if p.seq > 1 {
            // Later packets of the SA: the window starts empty, they are still new.
            assert_eq!(rx.replay_window().top(), 0);
        }
        let (r, nh) = rx.open_in_place(&mut buf).expect("open in place");
        assert_eq!(&buf[r], &p.inner[..]);
        assert_eq!(nh, NEXT_HEADER_IPV4);
    }
}

#[test]
fn vectors_seal_reproduces_captured_bytes() {
    let mut exact = 0;
    for c in children() {
        for i2r in [true, false] {
            let pkts: Vec<&Packet> = c.packets.iter().filter(|p| p.i2r == i2r).collect();
            let Some(first) = pkts.first() else { continue };
            let (mut tx, rx) = c.sas_for(i2r);
            // strongSwan's IV is a per-SA random value XOR the sequence number.
            tx.set_iv_mask(first.iv ^ u64::from(first.seq));
            for p in pkts {
                assert_eq!(tx.next_seq(), u64::from(p.seq), "{} #{}", c.name, p.index);
                let mut out = [0u8; 2048];
                let n = tx.seal(&p.inner, &mut out).expect("seal");
                assert_eq!(n, sealed_len(p.inner.len()));
                assert_eq!(
                    &out[..n],
                    &p.udp_payload[..],
                    "{} #{} (seq {})",
                    c.name,
                    p.index,
                    p.seq
                );
                let mut plain = [0u8; 2048];
                let (m, _) = rx.open(&out[..n], &mut plain).expect("peer opens");
                assert_eq!(&plain[..m], &p.inner[..]);
                exact += 1;
            }
        }
    }
    if CHILDREN.is_some() {
        assert_eq!(exact, EXPECTED_PACKETS);
    }
}

#[test]
fn vectors_seal_with_default_iv_matches_layout() {
    for c in children() {
        for i2r in [true, false] {
            let (tx, rx) = c.sas_for(i2r);
            for p in c.packets.iter().filter(|p| p.i2r == i2r) {
                let mut out = [0u8; 2048];
                let n = tx.seal(&p.inner, &mut out).expect("seal");
                // Same length (same padding 01 02, pad length 2, next header 4), same SPI and
                // sequence number; IV = sequence number, so ciphertext and ICV differ.
                assert_eq!(n, p.udp_payload.len());
                assert_eq!(&out[..8], &p.udp_payload[..8]);
                assert_eq!(&out[8..16], &u64::from(p.seq).to_be_bytes());
                let mut plain = [0u8; 2048];
                let (m, nh) = rx.open(&out[..n], &mut plain).expect("peer opens");
                assert_eq!((&plain[..m], nh), (&p.inner[..], NEXT_HEADER_IPV4));
            }
        }
    }
}

#[test]
fn vectors_tampering_any_byte_fails() {
    let mut checked = 0;
    for (c, p) in all_packets() {
        let (_, rx) = c.sas_for(p.i2r);
        let mut out = [0u8; 2048];
        for i in 0..p.udp_payload.len() {
            for flip in [0x01u8, 0x80] {
                let mut t = p.udp_payload.clone();
                t[i] ^= flip;
                let err = rx.open(&t, &mut out).expect_err("tampered packet opened");
                let want = match i {
                    0..4 => OpenError::UnknownSpi,
                    _ => OpenError::AuthFailed,
                };
                // Flipping the sequence number to 0 is refused before decryption.
                if !(4..8).contains(&i) || err != OpenError::TooOld {
                    assert_eq!(err, want, "{} #{} byte {i}", c.name, p.index);
                }
                checked += 1;
            }
        }
        // Truncation and extension fail too.
        for cut in 1..p.udp_payload.len() {
            assert!(rx.open(&p.udp_payload[..cut], &mut out).is_err());
        }
        let mut longer = p.udp_payload.clone();
        longer.push(0);
        assert_eq!(rx.open(&longer, &mut out), Err(OpenError::AuthFailed));
        // None of that moved the window: the genuine packet still opens.
        assert_eq!(rx.replay_window().top(), 0);
        rx.open(&p.udp_payload, &mut out).expect("genuine packet");
    }
    if CHILDREN.is_some() {
        assert!(checked > 0);
    }
}

#[test]
fn vectors_replay_is_refused() {
    for (c, p) in all_packets() {
        let (_, rx) = c.sas_for(p.i2r);
        let mut out = [0u8; 2048];
        rx.open(&p.udp_payload, &mut out).expect("first");
        assert_eq!(rx.open(&p.udp_payload, &mut out), Err(OpenError::Replayed));
        let mut again = p.udp_payload.clone();
        assert_eq!(rx.open_in_place(&mut again), Err(OpenError::Replayed));
        // The in-place refusal left the buffer untouched.
        assert_eq!(again, p.udp_payload);
    }
}

#[test]
fn vectors_swapped_keys_fail() {
    // Pitfall 4: using encr_r for i→r packets (or the other way) fails the tag.
    for (c, p) in all_packets() {
        let spi_in = p.spi;
        let wrong_key = if p.i2r { &c.encr_r } else { &c.encr_i };
        let rx = EspSa::new(0, wrong_key, spi_in, wrong_key, c.alg).expect("sa");
        let mut out = [0u8; 2048];
        assert_eq!(
            rx.open(&p.udp_payload, &mut out),
            Err(OpenError::AuthFailed)
        );
        // And the other cipher with the right key bytes fails as well.
        let other = match c.alg {
            AeadAlg::ChaCha20Poly1305 => AeadAlg::AesGcm16 { key_bits: 256 },
            _ => AeadAlg::ChaCha20Poly1305,
        };
        let right_key = if p.i2r { &c.encr_i } else { &c.encr_r };
        let rx = EspSa::new(0, right_key, spi_in, right_key, other).expect("sa");
        assert_eq!(
            rx.open(&p.udp_payload, &mut out),
            Err(OpenError::AuthFailed)
        );
    }
}

#[test]
fn error_kinds_are_metric_labels() {
    for k in OpenError::ALL
        .iter()
        .map(|e| e.kind())
        .chain(SealError::ALL.iter().map(|e| e.kind()))
    {
        assert!(!k.is_empty());
        assert!(k
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit()));
    }
}

fn alg_strategy() -> impl Strategy<Value = AeadAlg> {
    prop_oneof![
        Just(AeadAlg::AesGcm16 { key_bits: 256 }),
        Just(AeadAlg::AesGcm16 { key_bits: 128 }),
        Just(AeadAlg::ChaCha20Poly1305),
    ]
}

fn keymat(alg: AeadAlg, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..alg.keymat_len())
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn pair(alg: AeadAlg, seed: u64) -> (EspSa, EspSa) {
    let (k1, k2) = (keymat(alg, seed), keymat(alg, seed ^ 0xdead_beef));
    (
        EspSa::new(0xa1a1_a1a1, &k1, 0xb2b2_b2b2, &k2, alg).expect("a"),
        EspSa::new(0xb2b2_b2b2, &k2, 0xa1a1_a1a1, &k1, alg).expect("b"),
    )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn open_never_panics_on_arbitrary_bytes(
        alg in alg_strategy(),
        data in prop::collection::vec(any::<u8>(), 0..2100),
        our_spi in any::<bool>(),
        out_len in 0usize..2100,
    ) {
        let (_, b) = pair(alg, 7);
        let mut data = data;
        if our_spi && data.len() >= 4 {
            data[..4].copy_from_slice(&0xa1a1_a1a1u32.to_be_bytes());
        }
        let mut out = vec![0u8; out_len];
        let r = b.open(&data, &mut out);
        prop_assert!(r.is_err());
        let _ = r.map_err(|e| e.kind());
        let r = b.open_in_place(&mut data);
        prop_assert!(r.is_err());
    }

    #[test]
    fn open_never_panics_on_mutated_captures(
        pick in any::<usize>(),
        muts in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
    ) {
        let pkts: Vec<_> = all_packets().collect();
        if !pkts.is_empty() {
            let (c, p) = pkts[pick % pkts.len()];
            let (_, rx) = c.sas_for(p.i2r);
            let mut t = p.udp_payload.clone();
            for (at, x) in &muts {
                let i = at % t.len();
                t[i] ^= x;
            }
            let keep = t.len() - cut % 8;
            t.truncate(keep);
            let mut out = [0u8; 2048];
            let r = rx.open(&t, &mut out);
            if t != p.udp_payload {
                prop_assert!(r.is_err());
            }
        }
    }

    #[test]
    fn seal_open_round_trip(
        alg in alg_strategy(),
        seed in any::<u64>(),
        mask in any::<u64>(),
        payload in prop::collection::vec(any::<u8>(), 0..1500),
        v6 in any::<bool>(),
        count in 1usize..4,
    ) {
        let (mut a, b) = pair(alg, seed);
        a.set_iv_mask(mask);
        let mut buf = vec![0u8; 1600];
        let mut out = vec![0u8; 1600];
        for _ in 0..count {
            let mut pkt = payload.clone();
            let want_nh = if v6 { NEXT_HEADER_IPV6 } else { NEXT_HEADER_IPV4 };
            let n = if pkt.is_empty() {
                a.seal_with(want_nh, &pkt, &mut buf).expect("seal empty")
            } else {
                pkt[0] = (pkt[0] & 0x0f) | if v6 { 0x60 } else { 0x40 };
                a.seal(&pkt, &mut buf).expect("seal")
            };
            prop_assert_eq!(n, sealed_len(pkt.len()));
            prop_assert_eq!((n - 16 - 16) % 4, 0);
            let (m, nh) = b.open(&buf[..n], &mut out).expect("open");
            prop_assert_eq!(&out[..m], &pkt[..]);
            prop_assert_eq!(nh, want_nh);
            prop_assert_eq!(b.open(&buf[..n], &mut out), Err(OpenError::Replayed));
        }
    }
}
