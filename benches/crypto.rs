//! Per-packet cost of the two data-plane ciphers, without any I/O: WireGuard through
//! boringtun's `Tunn` (what `WgTunnel` calls per packet) and ESP AES-256-GCM through
//! `EspSa` seal/open (copying and in place).
//!
//! `cargo bench --bench crypto`; throughput is reported per inner IP packet.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sitewire::proto::esp::{sealed_len, EspSa};
use sitewire::proto::ike::crypto::AeadAlg;

/// Inner packet sizes: a TCP ACK and a full 1420-MTU segment.
const SIZES: [usize; 2] = [64, 1420];

/// An IPv4 packet of `len` bytes from 10.201.0.1 to 10.201.0.2.
fn ipv4_packet(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 201, 0, 1]);
    p[16..20].copy_from_slice(&[10, 201, 0, 2]);
    p
}

/// Two `Tunn`s with a completed handshake (the responder has seen a data packet, so both
/// directions have a confirmed session).
fn wireguard_pair() -> (Tunn, Tunn) {
    let a_sk = StaticSecret::from([0x11; 32]);
    let b_sk = StaticSecret::from([0x22; 32]);
    let (a_pk, b_pk) = (PublicKey::from(&a_sk), PublicKey::from(&b_sk));
    let mut a = Tunn::new(a_sk, b_pk, None, None, 0x100, None);
    let mut b = Tunn::new(b_sk, a_pk, None, None, 0x200, None);
    let src = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let (mut m1, mut m2, mut m3) = (vec![0u8; 2048], vec![0u8; 2048], vec![0u8; 2048]);
    let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut m1, false) else {
        panic!("no handshake initiation");
    };
    let TunnResult::WriteToNetwork(resp) = b.decapsulate(src, init, &mut m2) else {
        panic!("no handshake response");
    };
    let TunnResult::WriteToNetwork(keepalive) = a.decapsulate(src, resp, &mut m3) else {
        panic!("no keepalive after the response");
    };
    let keepalive = keepalive.to_vec();
    let _ = b.decapsulate(src, &keepalive, &mut m2);
    (a, b)
}

fn wireguard(c: &mut Criterion) {
    let mut g = c.benchmark_group("wireguard");
    for len in SIZES {
        let packet = ipv4_packet(len);
        g.throughput(Throughput::Bytes(len as u64));

        let (mut a, _b) = wireguard_pair();
        let mut out = vec![0u8; 65_536];
        g.bench_function(format!("encapsulate/{len}"), |bench| {
            bench.iter(|| match a.encapsulate(black_box(&packet), &mut out) {
                TunnResult::WriteToNetwork(d) => d.len(),
                _ => panic!("encapsulate did not produce a datagram"),
            })
        });

        let (mut a, mut b) = wireguard_pair();
        let mut sealed = vec![0u8; 65_536];
        let mut out = vec![0u8; 65_536];
        let src = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        g.bench_function(format!("decapsulate/{len}"), |bench| {
            bench.iter_batched(
                || match a.encapsulate(&packet, &mut sealed) {
                    TunnResult::WriteToNetwork(d) => d.to_vec(),
                    _ => panic!("encapsulate did not produce a datagram"),
                },
                |datagram| match b.decapsulate(src, &datagram, &mut out) {
                    TunnResult::WriteToTunnelV4(p, _) => p.len(),
                    _ => panic!("decapsulate did not return the packet"),
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn esp_pair() -> (EspSa, EspSa) {
    let alg = AeadAlg::AesGcm16 { key_bits: 256 };
    let (k1, k2) = ([0x33u8; 36], [0x44u8; 36]);
    let tx = EspSa::new(0x1000, &k1, 0x2000, &k2, alg).expect("tx SA");
    let rx = EspSa::new(0x2000, &k2, 0x1000, &k1, alg).expect("rx SA");
    (tx, rx)
}

fn esp(c: &mut Criterion) {
    let mut g = c.benchmark_group("esp_aes256gcm");
    for len in SIZES {
        let packet = ipv4_packet(len);
        g.throughput(Throughput::Bytes(len as u64));

        let (tx, _) = esp_pair();
        let mut out = vec![0u8; sealed_len(len)];
        g.bench_function(format!("seal/{len}"), |bench| {
            bench.iter(|| tx.seal(black_box(&packet), &mut out).expect("seal"))
        });

        let (tx, _) = esp_pair();
        let mut buf = vec![0u8; sealed_len(len)];
        g.bench_function(format!("seal_in_place/{len}"), |bench| {
            bench.iter(|| {
                buf[sitewire::proto::esp::PAYLOAD_OFFSET..][..len].copy_from_slice(&packet);
                tx.seal_in_place(&mut buf, len).expect("seal")
            })
        });

        let (tx, rx) = esp_pair();
        let mut out = vec![0u8; sealed_len(len)];
        g.bench_function(format!("open/{len}"), |bench| {
            bench.iter_batched(
                || {
                    let mut s = vec![0u8; sealed_len(len)];
                    let n = tx.seal(&packet, &mut s).expect("seal");
                    s.truncate(n);
                    s
                },
                |esp| rx.open(&esp, &mut out).expect("open").0,
                BatchSize::SmallInput,
            )
        });

        let (tx, rx) = esp_pair();
        g.bench_function(format!("open_in_place/{len}"), |bench| {
            bench.iter_batched(
                || {
                    let mut s = vec![0u8; sealed_len(len)];
                    let n = tx.seal(&packet, &mut s).expect("seal");
                    s.truncate(n);
                    s
                },
                |mut esp| rx.open_in_place(&mut esp).expect("open").0.len(),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, wireguard, esp);
criterion_main!(benches);
