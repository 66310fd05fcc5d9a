//! Known-answer tests of the IKEv2 codec and crypto against real strongSwan 5.9.8 captures
//! (`shared/interop/vectors/`, `shared/interop/strongswan/ike_sa_init.{pcap,keys.txt}`), plus
//! property tests: the decoder never panics, and encode→decode round-trips.
//!
//! The vectors live next to the checkout (`../shared`). If they are missing the tests print
//! SKIP, except under CI=true, where they fail.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use proptest::prelude::*;
use serde_json::Value;
use sitewire::proto::ike::crypto::{self, AeadAlg};
use sitewire::proto::ike::wire::{
    self, decode_payloads, encode_payloads, payload_type, Delete, ExchangeType, Header, Identity,
    Message, Notify, Payload, Proposal, TrafficSelector, Transform,
};

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/interop/vectors");
const STRONGSWAN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/interop/strongswan");
const SUITES: [&str; 4] = [
    "suite-a-aes256gcm16.json",
    "suite-b-chacha20poly1305.json",
    "suite-c-aes256gcm16-pfs-ike-rekey.json",
    "suite-d-python-initiator-aes256gcm16.json",
];
const ERRORS: &str = "strongswan-responder-errors.json";

/// The shared directory, or `None` after printing SKIP (a failure under CI=true).
fn shared_dir(dir: &str) -> Option<PathBuf> {
    let p = Path::new(dir);
    if p.is_dir() {
        return Some(p.to_path_buf());
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{dir} is missing: CI must have ../shared next to the checkout");
    }
    println!("SKIP: {dir} not found (the IKE known-answer vectors live in ../shared)");
    None
}

fn load(dir: &Path, name: &str) -> Value {
    let text = std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn suites(dir: &Path) -> Vec<(&'static str, Value)> {
    SUITES.iter().map(|s| (*s, load(dir, s))).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length: {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Hex string field as bytes.
fn h(v: &Value) -> Vec<u8> {
    unhex(
        v.as_str()
            .unwrap_or_else(|| panic!("not a hex string: {v}")),
    )
}

fn u(v: &Value) -> u64 {
    match v {
        Value::Number(n) => n.as_u64().expect("unsigned"),
        Value::String(s) if s.starts_with("0x") => u64::from_str_radix(&s[2..], 16).expect("0x"),
        _ => panic!("not a number: {v}"),
    }
}

fn be64(v: &Value) -> u64 {
    let b: [u8; 8] = h(v).try_into().expect("8 octets");
    u64::from_be_bytes(b)
}

fn arr(v: &Value) -> &Vec<Value> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}"))
}

/// The suite's IKE AEAD, from its config.
fn ike_aead(suite: &Value) -> AeadAlg {
    aead_of(&suite["config"]["ike_transforms"]["encr"])
}

fn aead_of(encr: &Value) -> AeadAlg {
    let t = Transform {
        ty: wire::transform_type::ENCR,
        id: u(&encr["id"]) as u16,
        key_len: encr
            .get("key_length_attribute")
            .filter(|v| !v.is_null())
            .map(|v| u(v) as u16),
    };
    AeadAlg::from_transform(&t).expect("supported ENCR")
}

/// Compare a decoded payload with the vector's `decoded` object.
fn check_payload(ctx: &str, p: &Payload, j: &Value) {
    let d = &j["decoded"];
    assert_eq!(p.type_code() as u64, u(&j["type"]), "{ctx}: type");
    match p {
        Payload::Sa(props) => {
            let jp = arr(&d["proposals"]);
            assert_eq!(props.len(), jp.len(), "{ctx}: proposal count");
            for (p, jp) in props.iter().zip(jp) {
                assert_eq!(p.num as u64, u(&jp["proposal_num"]), "{ctx}");
                assert_eq!(p.protocol as u64, u(&jp["protocol_id"]), "{ctx}");
                assert_eq!(p.spi, h(&jp["spi"]), "{ctx}: spi");
                assert_eq!(p.spi.len() as u64, u(&jp["spi_size"]), "{ctx}");
                let jt = arr(&jp["transforms"]);
                assert_eq!(p.transforms.len(), jt.len(), "{ctx}: transform count");
                for (t, jt) in p.transforms.iter().zip(jt) {
                    assert_eq!(t.ty as u64, u(&jt["type"]), "{ctx}");
                    assert_eq!(t.id as u64, u(&jt["id"]), "{ctx}");
                    let attrs = arr(&jt["attributes"]);
                    assert!(attrs.len() <= 1, "{ctx}: unexpected attributes");
                    let key_len = attrs.first().map(|a| {
                        assert_eq!(u(&a["type"]), 14, "{ctx}: only KEY_LENGTH expected");
                        u(&a["value"]) as u16
                    });
                    assert_eq!(t.key_len, key_len, "{ctx}: key length");
                }
            }
        }
        Payload::Ke { group, data } => {
            assert_eq!(*group as u64, u(&d["dh_group"]), "{ctx}");
            assert_eq!(*data, h(&d["key_data"]), "{ctx}");
        }
        Payload::Nonce(n) => assert_eq!(*n, h(&d["nonce"]), "{ctx}"),
        Payload::IdI(id) | Payload::IdR(id) => {
            assert_eq!(id.ty as u64, u(&d["id_type"]), "{ctx}");
            assert_eq!(id.data, h(&d["id_data"]), "{ctx}");
        }
        Payload::Auth { method, data } => {
            assert_eq!(*method as u64, u(&d["auth_method"]), "{ctx}");
            assert_eq!(*data, h(&d["auth_data"]), "{ctx}");
        }
        Payload::Notify(n) => {
            assert_eq!(n.protocol as u64, u(&d["protocol_id"]), "{ctx}");
            assert_eq!(n.spi.len() as u64, u(&d["spi_size"]), "{ctx}");
            assert_eq!(n.spi, h(&d["spi"]), "{ctx}");
            assert_eq!(n.ty as u64, u(&d["notify_type"]), "{ctx}");
            assert_eq!(n.data, h(&d["data"]), "{ctx}");
        }
        Payload::Delete(del) => {
            assert_eq!(del.protocol as u64, u(&d["protocol_id"]), "{ctx}");
            assert_eq!(del.spi_size as u64, u(&d["spi_size"]), "{ctx}");
            let spis: Vec<Vec<u8>> = arr(&d["spis"]).iter().map(h).collect();
            assert_eq!(del.spis, spis, "{ctx}");
        }
        Payload::TsI(ts) | Payload::TsR(ts) => {
            let js = arr(&d["selectors"]);
            assert_eq!(ts.len(), js.len(), "{ctx}");
            for (t, j) in ts.iter().zip(js) {
                let ty = if t.start.is_ipv4() { 7 } else { 8 };
                assert_eq!(ty, u(&j["ts_type"]), "{ctx}");
                assert_eq!(t.ip_proto as u64, u(&j["ip_protocol_id"]), "{ctx}");
                assert_eq!(t.start_port as u64, u(&j["start_port"]), "{ctx}");
                assert_eq!(t.end_port as u64, u(&j["end_port"]), "{ctx}");
                let ip = |k: &str| j[k].as_str().unwrap().parse::<IpAddr>().unwrap();
                assert_eq!(t.start, ip("start_address"), "{ctx}");
                assert_eq!(t.end, ip("end_address"), "{ctx}");
            }
        }
        other => panic!("{ctx}: unexpected payload in the vectors: {other:?}"),
    }
    assert_eq!(j["critical"].as_bool(), Some(false), "{ctx}");
}

/// Check a decoded chain against the vector list: decoded values equal, and each payload
/// re-encodes (with its chain's Next Payload) to its `raw` octets. `chain` may end with an SK
/// payload that the vector list leaves out.
fn check_chain(ctx: &str, chain: &[Payload], vectors: &[Value]) -> usize {
    let plain: Vec<&Payload> = chain
        .iter()
        .filter(|p| !matches!(p, Payload::Sk { .. }))
        .collect();
    assert_eq!(plain.len(), vectors.len(), "{ctx}: payload count");
    for (i, (p, j)) in plain.iter().zip(vectors).enumerate() {
        let ctx = format!("{ctx} payload {i} ({})", j["name"]);
        check_payload(&ctx, p, j);
        let next = chain.get(i + 1).map_or(0, Payload::type_code);
        let mut raw = Vec::new();
        p.encode(next, &mut raw);
        assert_eq!(raw, h(&j["raw"]), "{ctx}: re-encoding");
        assert_eq!(raw.len() as u64, u(&j["length"]), "{ctx}: length");
    }
    plain.len()
}

fn check_header(ctx: &str, hd: &Header, j: &Value) {
    assert_eq!(hd.spi_i, be64(&j["spi_i"]), "{ctx}: spi_i");
    assert_eq!(hd.spi_r, be64(&j["spi_r"]), "{ctx}: spi_r");
    assert_eq!(hd.next_payload as u64, u(&j["next_payload"]), "{ctx}");
    assert_eq!(hd.version as u64, u(&j["version"]), "{ctx}");
    assert_eq!(hd.exchange.to_u8() as u64, u(&j["exchange_type"]), "{ctx}");
    assert_eq!(hd.flags as u64, u(&j["flags"]), "{ctx}");
    assert_eq!(hd.message_id as u64, u(&j["message_id"]), "{ctx}");
    assert_eq!(hd.length as u64, u(&j["length"]), "{ctx}");
    let names: Vec<&str> = arr(&j["flag_names"])
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(hd.from_initiator(), names.contains(&"I"), "{ctx}");
    assert_eq!(hd.is_response(), names.contains(&"R"), "{ctx}");
}

fn ike_messages(suite: &Value) -> impl Iterator<Item = (usize, &Value)> {
    arr(&suite["messages"])
        .iter()
        .enumerate()
        .filter(|(_, m)| m["kind"] == "ike")
        .map(|(i, m)| (i, &m["ike"]))
}

#[test]
fn every_message_decodes_and_reencodes() {
    let Some(dir) = shared_dir(VECTORS) else {
        return;
    };
    let (mut messages, mut payloads, mut init) = (0, 0, 0);
    for (name, suite) in suites(&dir) {
        for (i, ike) in ike_messages(&suite) {
            let ctx = format!("{name} message {i}");
            let bytes = h(&ike["message"]);
            if ike["non_esp_marker"].as_bool() == Some(true) {
                let udp = h(&suite["messages"][i]["udp_payload"]);
                assert_eq!(&udp[..4], &[0; 4], "{ctx}");
                assert_eq!(&udp[4..], &bytes[..], "{ctx}");
            }
            let m = Message::decode(&bytes).unwrap_or_else(|e| panic!("{ctx}: {e:?}"));
            check_header(&ctx, &m.header, &ike["header"]);
            payloads += check_chain(&ctx, &m.payloads, arr(&ike["payloads"]));
            match ike.get("encrypted") {
                Some(e) => {
                    let Some(Payload::Sk { first_inner, .. }) = m.payloads.last() else {
                        panic!("{ctx}: no SK payload");
                    };
                    assert_eq!(*first_inner as u64, u(&e["first_inner_payload"]), "{ctx}");
                    let mut raw = Vec::new();
                    m.payloads.last().unwrap().encode(0, &mut raw);
                    assert_eq!(raw, h(&e["sk_payload"]), "{ctx}: SK payload");
                }
                None => {
                    assert!(!m.payloads.iter().any(|p| matches!(p, Payload::Sk { .. })));
                    assert_eq!(m.header.exchange, ExchangeType::IkeSaInit, "{ctx}");
                    let again = Message::encode_plain(m.header, &m.payloads);
                    assert_eq!(again, bytes, "{ctx}: encode_plain");
                    init += 1;
                }
            }
            messages += 1;
        }
    }
    println!("{messages} messages, {payloads} plaintext payloads, {init} IKE_SA_INIT re-encoded");
    assert_eq!((messages, init), (66, 8));
}

#[test]
fn key_schedule_of_every_ike_sa() {
    let Some(dir) = shared_dir(VECTORS) else {
        return;
    };
    let mut n = 0;
    for (name, suite) in suites(&dir) {
        let aead = ike_aead(&suite);
        let sas = suite["ike_sas"].as_object().unwrap();
        for (sa_name, sa) in sas {
            let ctx = format!("{name} {sa_name}");
            let (ni, nr, g_ir) = (h(&sa["ni"]), h(&sa["nr"]), h(&sa["g_ir"]));
            if let Some(pk) = sa.get("x25519_initiator_private_key") {
                let secret = crypto::X25519Secret::from_bytes(h(pk).try_into().unwrap());
                assert_eq!(secret.public().to_vec(), h(&sa["ke_i"]), "{ctx}: KEi");
                let shared = secret.diffie_hellman(&h(&sa["ke_r"])).expect("g^ir");
                assert_eq!(shared.to_vec(), g_ir, "{ctx}: g^ir from the private key");
            }
            let seed = match sa["rekey_of"].as_str() {
                None => crypto::skeyseed(&ni, &nr, &g_ir),
                Some(old) => {
                    let old_sk_d = h(&sas[old]["sk_d"]);
                    assert_eq!(h(&sa["skeyseed_prf_key"]), old_sk_d, "{ctx}");
                    crypto::skeyseed_rekey(&old_sk_d, &g_ir, &ni, &nr)
                }
            };
            assert_eq!(seed.to_vec(), h(&sa["skeyseed"]), "{ctx}: SKEYSEED");
            let prf_check =
                crypto::prf(&h(&sa["skeyseed_prf_key"]), &[&h(&sa["skeyseed_prf_data"])]);
            assert_eq!(prf_check.to_vec(), h(&sa["skeyseed"]), "{ctx}");
            let len = u(&sa["keymat_length"]) as usize;
            assert_eq!(len, 32 + 2 * aead.keymat_len() + 64, "{ctx}");
            let km = crypto::prf_plus(&seed[..], &[&h(&sa["prf_plus_seed"])], len);
            assert_eq!(*km, h(&sa["keymat"]), "{ctx}: keymat");
            let (spi_i, spi_r) = (be64(&sa["spi_i"]), be64(&sa["spi_r"]));
            let keys = crypto::derive_ike_keys(&seed[..], &ni, &nr, spi_i, spi_r, aead);
            assert_eq!(*keys.sk_d, h(&sa["sk_d"]), "{ctx}: SK_d");
            assert_eq!(*keys.sk_ei, h(&sa["sk_ei"]), "{ctx}: SK_ei");
            assert_eq!(*keys.sk_er, h(&sa["sk_er"]), "{ctx}: SK_er");
            assert_eq!(*keys.sk_pi, h(&sa["sk_pi"]), "{ctx}: SK_pi");
            assert_eq!(*keys.sk_pr, h(&sa["sk_pr"]), "{ctx}: SK_pr");
            assert_eq!(h(&sa["sk_ai"]), Vec::<u8>::new());
            assert_eq!(keys.sk_ei[32..].to_vec(), h(&sa["sk_ei_salt"]), "{ctx}");
            assert_eq!(keys.sk_er[..32].to_vec(), h(&sa["sk_er_key"]), "{ctx}");
            n += 1;
        }
    }
    println!("{n} IKE SAs");
    assert_eq!(n, 5);
}

#[test]
fn psk_auth_both_sides() {
    let Some(dir) = shared_dir(VECTORS) else {
        return;
    };
    let mut n = 0;
    for (name, suite) in suites(&dir) {
        for (sa_name, pa) in suite["psk_auth"].as_object().unwrap() {
            let psk = h(&pa["psk"]);
            assert_eq!(psk, suite["config"]["psk"].as_str().unwrap().as_bytes());
            assert_eq!(h(&pa["key_pad"]), crypto::KEY_PAD);
            let keys = &suite["ike_sas"][sa_name];
            for (side, sk_p) in [("initiator", "sk_pi"), ("responder", "sk_pr")] {
                let ctx = format!("{name} {sa_name} {side}");
                let s = &pa[side];
                assert_eq!(h(&s["sk_p"]), h(&keys[sk_p]), "{ctx}");
                let auth = crypto::psk_auth(
                    &psk,
                    &h(&s["real_message"]),
                    &h(&s["peer_nonce"]),
                    &h(&s["sk_p"]),
                    &h(&s["id_payload_body"]),
                    None,
                );
                assert_eq!(auth.to_vec(), h(&s["auth"]), "{ctx}: AUTH");
                assert_eq!(
                    auth.to_vec(),
                    h(&s["auth_payload_data"]),
                    "{ctx}: AUTH on the wire"
                );
                assert!(crypto::macs_equal(&auth, &h(&s["auth_payload_data"])));
                n += 1;
            }
        }
    }
    println!("{n} AUTH values");
    assert_eq!(n, 8);
}

#[test]
fn every_encrypted_payload_opens_and_reseals_byte_exactly() {
    let Some(dir) = shared_dir(VECTORS) else {
        return;
    };
    let mut n = 0;
    for (name, suite) in suites(&dir) {
        let aead = ike_aead(&suite);
        for (i, ike) in ike_messages(&suite) {
            let Some(e) = ike.get("encrypted") else {
                continue;
            };
            let ctx = format!("{name} message {i}");
            let raw = h(&ike["message"]);
            let key_name = e["key_used"].as_str().unwrap();
            let key = h(&suite["ike_sas"][e["ike_sa"].as_str().unwrap()][key_name]);
            let hd = Header::decode(&raw).unwrap();
            assert_eq!(
                key_name == "sk_ei",
                hd.from_initiator(),
                "{ctx}: key choice"
            );
            let opened = crypto::open_message_detailed(aead, &key, &raw)
                .unwrap_or_else(|err| panic!("{ctx}: {err:?}"));
            assert_eq!(opened.inner_bytes, h(&e["inner_payloads_bytes"]), "{ctx}");
            check_chain(&ctx, &opened.payloads, arr(&e["inner_payloads"]));
            assert_eq!(u(&e["pad_length"]), 0, "{ctx}: strongSwan pads with 0");
            let (hd2, inner) = crypto::open_message(aead, &key, &raw).unwrap();
            assert_eq!(hd2, hd);
            let iv = u64::from_be_bytes(h(&e["iv"]).try_into().unwrap());
            let resealed = crypto::seal_message(aead, &key, iv, hd, &inner);
            assert_eq!(resealed, raw, "{ctx}: seal_message");
            // the other direction's key must not open it
            let other = if key_name == "sk_ei" {
                "sk_er"
            } else {
                "sk_ei"
            };
            let wrong = h(&suite["ike_sas"][e["ike_sa"].as_str().unwrap()][other]);
            assert_eq!(
                crypto::open_message(aead, &wrong, &raw),
                Err(crypto::OpenError::Auth),
                "{ctx}"
            );
            n += 1;
        }
    }
    println!("{n} Encrypted payloads opened and resealed");
    assert_eq!(n, 58);
}

#[test]
fn child_sa_keymat() {
    let Some(dir) = shared_dir(VECTORS) else {
        return;
    };
    let mut n = 0;
    for (name, suite) in suites(&dir) {
        let esp = aead_of(&suite["config"]["esp_transforms"]["encr"]);
        for (child, c) in suite["child_sas"].as_object().unwrap() {
            let ctx = format!("{name} {child}");
            let ike = &suite["ike_sas"][c["ike_sa"].as_str().unwrap()];
            assert_eq!(h(&c["sk_d"]), h(&ike["sk_d"]), "{ctx}");
            let g = c["g_ir"].as_str().map(unhex);
            let shared: Vec<&[u8]> = g.iter().map(Vec::as_slice).collect();
            let (ni, nr) = (h(&c["ni"]), h(&c["nr"]));
            let mut seed = g.clone().unwrap_or_default();
            seed.extend_from_slice(&ni);
            seed.extend_from_slice(&nr);
            assert_eq!(seed, h(&c["keymat_seed"]), "{ctx}");
            let len = 2 * esp.keymat_len();
            let km = crypto::child_keymat(&h(&c["sk_d"]), &shared, &ni, &nr, len);
            assert_eq!(*km, h(&c["keymat"]), "{ctx}: KEYMAT");
            assert_eq!(km[..len / 2].to_vec(), h(&c["encr_i"]), "{ctx}: encr_i");
            assert_eq!(km[len / 2..].to_vec(), h(&c["encr_r"]), "{ctx}: encr_r");
            n += 1;
        }
    }
    println!("{n} CHILD SAs");
    assert_eq!(n, 8);
}

fn addr(v: &Value) -> SocketAddr {
    v.as_str().unwrap().parse().unwrap()
}

#[test]
fn nat_detection_hashes() {
    let Some(dir) = shared_dir(VECTORS) else {
        return;
    };
    let mut n = 0;
    for (name, suite) in suites(&dir) {
        for nd in arr(&suite["nat_detection"]) {
            let i = u(&nd["message"]) as usize;
            let msg = &suite["messages"][i];
            let hd = Header::decode(&h(&msg["ike"]["message"])).unwrap();
            for (kind, who) in [
                ("NAT_DETECTION_SOURCE_IP", "src"),
                ("NAT_DETECTION_DESTINATION_IP", "dst"),
            ] {
                let ctx = format!("{name} message {i} {kind}");
                let a = addr(&msg[who]);
                let hash = crypto::nat_detection_hash(hd.spi_i, hd.spi_r, a.ip(), a.port());
                let mut input = hd.spi_i.to_be_bytes().to_vec();
                input.extend_from_slice(&hd.spi_r.to_be_bytes());
                if let IpAddr::V4(v4) = a.ip() {
                    input.extend_from_slice(&v4.octets());
                }
                input.extend_from_slice(&a.port().to_be_bytes());
                assert_eq!(input, h(&nd[kind]["hash_input"]), "{ctx}");
                assert_eq!(hash.to_vec(), h(&nd[kind]["expected_hash"]), "{ctx}");
                let matches = hash.to_vec() == h(&nd[kind]["received"]);
                assert_eq!(Some(matches), nd[kind]["matches"].as_bool(), "{ctx}");
                n += 1;
            }
        }
    }
    println!("{n} NAT-D hashes");
    assert_eq!(n, 16);
}

fn notify_types(payloads: &[Payload]) -> Vec<u16> {
    payloads
        .iter()
        .filter_map(|p| match p {
            Payload::Notify(n) => Some(n.ty),
            _ => None,
        })
        .collect()
}

fn nonce_of(payloads: &[Payload]) -> Vec<u8> {
    payloads
        .iter()
        .find_map(|p| match p {
            Payload::Nonce(n) => Some(n.clone()),
            _ => None,
        })
        .expect("nonce")
}

fn ke_of(payloads: &[Payload]) -> Vec<u8> {
    payloads
        .iter()
        .find_map(|p| match p {
            Payload::Ke { data, .. } => Some(data.clone()),
            _ => None,
        })
        .expect("KE")
}

#[test]
fn strongswan_error_answers() {
    let Some(dir) = shared_dir(VECTORS) else {
        return;
    };
    let doc = load(&dir, ERRORS);
    let psk = doc["config"]["psk"].as_str().unwrap().as_bytes().to_vec();
    let aead = aead_of(&doc["config"]["ike_transforms"]["encr"]);
    let (mut n, mut resealed) = (0, 0);
    for s in arr(&doc["scenarios"]) {
        let name = s["name"].as_str().unwrap();
        let req_raw = h(&s["ike_sa_init_request"]);
        let resp_raw = h(&s["ike_sa_init_response"]);
        let req = Message::decode(&req_raw).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let resp = Message::decode(&resp_raw).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(
            Message::encode_plain(req.header, &req.payloads),
            req_raw,
            "{name}"
        );
        assert_eq!(
            Message::encode_plain(resp.header, &resp.payloads),
            resp_raw,
            "{name}"
        );
        assert!(
            resp.header.is_response() && !resp.header.from_initiator(),
            "{name}"
        );
        let resp_notifies = notify_types(&resp.payloads);
        match name {
            "no_proposal_chosen" => {
                assert_eq!(resp_notifies, [wire::notify::NO_PROPOSAL_CHOSEN]);
                assert_eq!(resp.header.spi_r, 0);
            }
            "invalid_ke_payload" => {
                let n = resp.notify(wire::notify::INVALID_KE_PAYLOAD).expect(name);
                assert_eq!(n.data, [0, 31]);
                assert_eq!(resp.payloads.len(), 1);
            }
            "cookie" => {
                let c = resp.notify(wire::notify::COOKIE).expect(name);
                assert_eq!(c.data, h(&s["cookie"]));
                let retry_raw = h(&s["retry_request"]);
                let retry = Message::decode(&retry_raw).unwrap();
                assert_eq!(
                    Message::encode_plain(retry.header, &retry.payloads),
                    retry_raw
                );
                assert_eq!(
                    retry.payloads[0],
                    Payload::Notify(c.clone()),
                    "COOKIE first"
                );
                assert_eq!(&retry.payloads[1..], &req.payloads[..], "same request");
                assert_eq!(retry.header.spi_i, req.header.spi_i);
                let rr_raw = h(&s["retry_response"]);
                let rr = Message::decode(&rr_raw).unwrap();
                assert_eq!(Message::encode_plain(rr.header, &rr.payloads), rr_raw);
                assert!(matches!(rr.payloads[0], Payload::Sa(_)));
            }
            _ => {}
        }
        if let Some(pk) = s.get("x25519_initiator_private_key") {
            let ctx = name;
            let secret = crypto::X25519Secret::from_bytes(h(pk).try_into().unwrap());
            assert_eq!(secret.public().to_vec(), ke_of(&req.payloads), "{ctx}");
            let g = secret.diffie_hellman(&ke_of(&resp.payloads)).unwrap();
            assert_eq!(g.to_vec(), h(&s["g_ir"]), "{ctx}: g^ir");
            let (ni, nr) = (nonce_of(&req.payloads), nonce_of(&resp.payloads));
            let seed = crypto::skeyseed(&ni, &nr, &g[..]);
            let keys = crypto::derive_ike_keys(
                &seed[..],
                &ni,
                &nr,
                resp.header.spi_i,
                resp.header.spi_r,
                aead,
            );
            let k = &s["keys"];
            assert_eq!(*keys.sk_d, h(&k["sk_d"]), "{ctx}");
            assert_eq!(*keys.sk_ei, h(&k["sk_ei"]), "{ctx}");
            assert_eq!(*keys.sk_er, h(&k["sk_er"]), "{ctx}");
            assert_eq!(*keys.sk_pi, h(&k["sk_pi"]), "{ctx}");
            assert_eq!(*keys.sk_pr, h(&k["sk_pr"]), "{ctx}");
            // IKE_AUTH request (built by the Python initiator) and charon's answer
            let areq_raw = h(&s["ike_auth_request"]);
            let aresp_raw = h(&s["ike_auth_response"]);
            let areq = crypto::open_message_detailed(aead, &keys.sk_ei, &areq_raw)
                .unwrap_or_else(|e| panic!("{ctx}: {e:?}"));
            let aresp = crypto::open_message_detailed(aead, &keys.sk_er, &aresp_raw)
                .unwrap_or_else(|e| panic!("{ctx}: {e:?}"));
            for (raw, o, key) in [
                (&areq_raw, &areq, &keys.sk_ei),
                (&aresp_raw, &aresp, &keys.sk_er),
            ] {
                // reseal when the sender used no padding
                let body_len = raw.len() - 32;
                let pad = body_len - 8 - 16 - o.inner_bytes.len() - 1;
                if pad == 0 {
                    let iv = u64::from_be_bytes(raw[32..40].try_into().unwrap());
                    let again = crypto::seal_message(aead, key, iv, o.header, &o.payloads);
                    assert_eq!(&again, raw, "{ctx}: reseal");
                    resealed += 1;
                }
            }
            // the initiator's AUTH with the PSK it used
            let idi = areq
                .payloads
                .iter()
                .find_map(|p| match p {
                    Payload::IdI(id) => Some(id.clone()),
                    _ => None,
                })
                .expect("IDi");
            let auth_i = areq
                .payloads
                .iter()
                .find_map(|p| match p {
                    Payload::Auth { data, .. } => Some(data.clone()),
                    _ => None,
                })
                .expect("AUTH");
            let used = s["psk_used_by_initiator"].as_str().unwrap().as_bytes();
            let expect = |psk: &[u8]| {
                crypto::psk_auth(psk, &req_raw, &nr, &keys.sk_pi, &idi.body(), None).to_vec()
            };
            assert_eq!(expect(used), auth_i, "{ctx}: initiator AUTH");
            assert_eq!(expect(&psk) == auth_i, used == psk.as_slice(), "{ctx}");
            let notifies = notify_types(&aresp.payloads);
            match name {
                "wrong_psk" | "unknown_idi" => {
                    assert_eq!(notifies, [wire::notify::AUTHENTICATION_FAILED], "{ctx}")
                }
                "ts_unacceptable" | "no_natd_stay_on_500" => {
                    let want = if name == "ts_unacceptable" {
                        wire::notify::TS_UNACCEPTABLE
                    } else {
                        wire::notify::NO_PROPOSAL_CHOSEN
                    };
                    assert_eq!(notifies, [want], "{ctx}");
                    // charon's AUTH verifies
                    let (idr, auth_r) = match &aresp.payloads[..] {
                        [Payload::IdR(id), Payload::Auth { data, .. }, ..] => (id, data),
                        other => panic!("{ctx}: {other:?}"),
                    };
                    let want_auth =
                        crypto::psk_auth(&psk, &resp_raw, &ni, &keys.sk_pr, &idr.body(), None);
                    assert_eq!(want_auth.to_vec(), *auth_r, "{ctx}: responder AUTH");
                }
                _ => panic!("unexpected scenario {name}"),
            }
        }
        n += 1;
    }
    println!("{n} error scenarios, {resealed} IKE_AUTH messages resealed byte-exactly");
    assert_eq!(n, 7);
}

/// Minimal pcap reader: classic libpcap (either byte order, µs or ns), Ethernet, IPv4, UDP.
/// Returns (source, destination, UDP payload) per packet.
fn read_pcap(data: &[u8]) -> Vec<(SocketAddr, SocketAddr, Vec<u8>)> {
    assert!(data.len() >= 24, "pcap header");
    let magic = [data[0], data[1], data[2], data[3]];
    let le = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => panic!("not a pcap file"),
    };
    let r32 = |b: &[u8]| {
        let a = [b[0], b[1], b[2], b[3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    assert_eq!(r32(&data[20..24]), 1, "linktype Ethernet");
    let mut out = Vec::new();
    let mut off = 24;
    while off + 16 <= data.len() {
        let incl = r32(&data[off + 8..]) as usize;
        let frame = &data[off + 16..off + 16 + incl];
        off += 16 + incl;
        assert_eq!(&frame[12..14], &[0x08, 0x00], "IPv4 ethertype");
        let ip = &frame[14..];
        assert_eq!(ip[0] >> 4, 4);
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        assert_eq!(ip[9], 17, "UDP");
        // IPv4 header checksum
        let sum = ip[..ihl]
            .chunks(2)
            .fold(0u32, |s, w| s + u32::from(u16::from_be_bytes([w[0], w[1]])));
        let folded = (sum & 0xffff) + (sum >> 16);
        assert_eq!(folded, 0xffff, "IPv4 checksum");
        let src_ip = IpAddr::from([ip[12], ip[13], ip[14], ip[15]]);
        let dst_ip = IpAddr::from([ip[16], ip[17], ip[18], ip[19]]);
        let udp = &ip[ihl..total];
        let sport = u16::from_be_bytes([udp[0], udp[1]]);
        let dport = u16::from_be_bytes([udp[2], udp[3]]);
        let ulen = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
        out.push((
            SocketAddr::new(src_ip, sport),
            SocketAddr::new(dst_ip, dport),
            udp[8..ulen].to_vec(),
        ));
    }
    assert_eq!(off, data.len(), "trailing pcap bytes");
    out
}

/// Parse charon's hex dumps: `NAME => N bytes @ addr` followed by `   0: AA BB ..  ascii` lines.
fn read_charon_dumps(text: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>, usize)> = Vec::new();
    for line in text.lines() {
        let Some(pos) = line.find("> ") else { continue };
        let rest = &line[pos + 2..];
        if let Some((name, tail)) = rest.split_once(" => ") {
            let n: usize = tail.split_whitespace().next().unwrap().parse().unwrap();
            out.push((name.trim().to_string(), Vec::new(), n));
        } else if let Some((off, hexpart)) = rest.trim_start().split_once(": ") {
            if off.chars().all(|c| c.is_ascii_digit()) {
                let cur = out.last_mut().expect("dump line before a name");
                let want = cur.2 - cur.1.len();
                let bytes: Vec<u8> = hexpart
                    .split_whitespace()
                    .take(want.min(16))
                    .map(|b| u8::from_str_radix(b, 16).unwrap())
                    .collect();
                cur.1.extend(bytes);
            }
        }
    }
    for (name, b, n) in &out {
        assert_eq!(b.len(), *n, "{name}: dump length");
    }
    out.into_iter().map(|(n, b, _)| (n, b)).collect()
}

#[test]
fn ike_sa_init_pcap_known_answer() {
    let Some(dir) = shared_dir(STRONGSWAN) else {
        return;
    };
    let packets = read_pcap(&std::fs::read(dir.join("ike_sa_init.pcap")).unwrap());
    assert_eq!(packets.len(), 2);
    let dumps =
        read_charon_dumps(&std::fs::read_to_string(dir.join("ike_sa_init.keys.txt")).unwrap());
    let get = |name: &str| -> Vec<u8> {
        dumps
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} not in keys.txt"))
            .1
            .clone()
    };
    let (req_from, req_to, req_raw) = &packets[0];
    let (resp_from, resp_to, resp_raw) = &packets[1];
    assert_eq!((req_from, req_to), (resp_to, resp_from));
    let req = Message::decode(req_raw).unwrap();
    let resp = Message::decode(resp_raw).unwrap();
    for (m, raw) in [(&req, req_raw), (&resp, resp_raw)] {
        assert_eq!(m.header.exchange, ExchangeType::IkeSaInit);
        assert_eq!(&Message::encode_plain(m.header, &m.payloads), raw);
    }
    assert!(!req.header.is_response() && req.header.from_initiator());
    assert!(resp.header.is_response() && !resp.header.from_initiator());
    assert_eq!(req.header.spi_r, 0);
    assert_eq!(req.header.spi_i, resp.header.spi_i);
    // the proposal is aes256gcm16-prfsha256-x25519, echoed by the responder
    let Payload::Sa(props) = &resp.payloads[0] else {
        panic!("SA first");
    };
    let aead =
        AeadAlg::from_transform(props[0].of_type(wire::transform_type::ENCR).next().unwrap())
            .expect("AES-GCM-256");
    assert_eq!(aead, AeadAlg::AesGcm16 { key_bits: 256 });
    // honest NAT-D destination hashes (the source ones are faked by charon)
    for (m, to) in [(&req, req_to), (&resp, resp_to)] {
        let n = m
            .notify(wire::notify::NAT_DETECTION_DESTINATION_IP)
            .unwrap();
        let want = crypto::nat_detection_hash(m.header.spi_i, m.header.spi_r, to.ip(), to.port());
        assert_eq!(n.data, want);
    }
    let (ni, nr) = (nonce_of(&req.payloads), nonce_of(&resp.payloads));
    let dh = get("shared Diffie Hellman secret");
    let seed = crypto::skeyseed(&ni, &nr, &dh);
    assert_eq!(seed.to_vec(), get("SKEYSEED"));
    let keys = crypto::derive_ike_keys(
        &seed[..],
        &ni,
        &nr,
        resp.header.spi_i,
        resp.header.spi_r,
        aead,
    );
    assert_eq!(*keys.sk_d, get("Sk_d secret"));
    assert_eq!(*keys.sk_ei, get("Sk_ei secret"));
    assert_eq!(*keys.sk_er, get("Sk_er secret"));
    assert_eq!(*keys.sk_pi, get("Sk_pi secret"));
    assert_eq!(*keys.sk_pr, get("Sk_pr secret"));
    println!(
        "pcap KAT: 2 messages, SKEYSEED and 5 SK_* keys of IKE SA {:016x}_i {:016x}_r",
        resp.header.spi_i, resp.header.spi_r
    );
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

/// Every captured IKE message (suites and error file), for mutation tests. Empty without vectors.
static CAPTURED: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    let Some(dir) = shared_dir(VECTORS) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (_, suite) in suites(&dir) {
        for (_, ike) in ike_messages(&suite) {
            out.push(h(&ike["message"]));
        }
    }
    for s in arr(&load(&dir, ERRORS)["scenarios"]) {
        for k in [
            "ike_sa_init_request",
            "ike_sa_init_response",
            "ike_auth_request",
            "ike_auth_response",
            "retry_request",
            "retry_response",
        ] {
            if let Some(v) = s.get(k) {
                out.push(h(v));
            }
        }
    }
    out
});

/// Exercise every decoding entry point; none may panic. If a message decodes, its re-encoding
/// must decode to the same value.
fn decode_everything(bytes: &[u8]) {
    if let Ok(m) = Message::decode(bytes) {
        let (first, body) = encode_payloads(&m.payloads);
        let again = decode_payloads(first, &body).expect("re-encoded chain decodes");
        assert_eq!(again, m.payloads);
        if !m.payloads.iter().any(|p| matches!(p, Payload::Sk { .. })) {
            // (the length may shrink: proposals we cannot accept are not re-encoded)
            let enc = Message::encode_plain(m.header, &m.payloads);
            let again = Message::decode(&enc).expect("re-encoded message decodes");
            assert_eq!(again.payloads, m.payloads);
            assert_eq!(
                Header {
                    length: m.header.length,
                    ..again.header
                },
                m.header
            );
        }
    }
    if let Some((&first, rest)) = bytes.split_first() {
        let _ = decode_payloads(first, rest);
    }
    let _ = Header::decode(bytes);
    for alg in [
        AeadAlg::AesGcm16 { key_bits: 256 },
        AeadAlg::ChaCha20Poly1305,
    ] {
        let _ = crypto::open_message(alg, &[7; 36], bytes);
    }
    let _ = crypto::int_auth_octets(bytes, &[]);
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Mutation::Remove(i, n)),
    ]
}

fn apply(mut m: Vec<u8>, muts: &[Mutation], fix_length: bool) -> Vec<u8> {
    for mu in muts {
        if m.is_empty() {
            break;
        }
        let len = m.len();
        match mu {
            Mutation::Flip(i, b) => m[i % len] ^= b,
            Mutation::Set(i, b) => m[i % len] = *b,
            Mutation::Truncate(i) => m.truncate(i % len),
            Mutation::Insert(i, v) => {
                let at = i % (len + 1);
                m.splice(at..at, v.iter().copied());
            }
            Mutation::Remove(i, n) => {
                let at = i % len;
                let end = (at + n).min(len);
                m.drain(at..end);
            }
        }
    }
    // keep the IKE Length consistent so the mutation reaches the payload decoders
    if fix_length && m.len() >= 28 {
        let l = m.len() as u32;
        m[24..28].copy_from_slice(&l.to_be_bytes());
        m[17] = 0x20;
    }
    m
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn ip_pair() -> impl Strategy<Value = (IpAddr, IpAddr)> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<[u8; 4]>()).prop_map(|(a, b)| (IpAddr::from(a), IpAddr::from(b))),
        (any::<[u8; 16]>(), any::<[u8; 16]>())
            .prop_map(|(a, b)| (IpAddr::from(a), IpAddr::from(b))),
    ]
}

fn selector() -> impl Strategy<Value = TrafficSelector> {
    (any::<u8>(), any::<u16>(), any::<u16>(), ip_pair()).prop_map(
        |(ip_proto, start_port, end_port, (start, end))| TrafficSelector {
            ip_proto,
            start_port,
            end_port,
            start,
            end,
        },
    )
}

fn proposal() -> impl Strategy<Value = Proposal> {
    let transform = (any::<u8>(), any::<u16>(), any::<Option<u16>>())
        .prop_map(|(ty, id, key_len)| Transform { ty, id, key_len });
    (
        any::<u8>(),
        any::<u8>(),
        bytes(9),
        prop::collection::vec(transform, 0..6),
    )
        .prop_map(|(num, protocol, spi, transforms)| Proposal {
            num,
            protocol,
            spi,
            transforms,
        })
}

fn delete() -> impl Strategy<Value = Delete> {
    prop_oneof![
        any::<u8>().prop_map(|protocol| Delete {
            protocol,
            spi_size: 0,
            spis: vec![],
        }),
        (any::<u8>(), 1u8..9, 0usize..5, any::<u8>()).prop_map(|(protocol, size, n, fill)| {
            Delete {
                protocol,
                spi_size: size,
                spis: (0..n)
                    .map(|i| vec![fill.wrapping_add(i as u8); usize::from(size)])
                    .collect(),
            }
        }),
    ]
}

fn unknown_type() -> impl Strategy<Value = u8> {
    any::<u8>().prop_filter(
        "not a type we decode",
        |t| !matches!(*t, 0 | 33..=36 | 39..=46 | 53),
    )
}

fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        prop::collection::vec(proposal(), 0..4).prop_map(Payload::Sa),
        (any::<u16>(), bytes(64)).prop_map(|(group, data)| Payload::Ke { group, data }),
        bytes(64).prop_map(Payload::Nonce),
        (any::<u8>(), bytes(40)).prop_map(|(ty, data)| Payload::IdI(Identity { ty, data })),
        (any::<u8>(), bytes(40)).prop_map(|(ty, data)| Payload::IdR(Identity { ty, data })),
        (any::<u8>(), bytes(40)).prop_map(|(method, data)| Payload::Auth { method, data }),
        (any::<u8>(), bytes(9), any::<u16>(), bytes(40)).prop_map(|(protocol, spi, ty, data)| {
            Payload::Notify(Notify {
                protocol,
                spi,
                ty,
                data,
            })
        }),
        delete().prop_map(Payload::Delete),
        bytes(20).prop_map(Payload::Vendor),
        prop::collection::vec(selector(), 0..4).prop_map(Payload::TsI),
        prop::collection::vec(selector(), 0..4).prop_map(Payload::TsR),
        (unknown_type(), any::<bool>(), bytes(40))
            .prop_map(|(ty, critical, body)| Payload::Unknown { ty, critical, body }),
    ]
}

fn payload_list() -> impl Strategy<Value = Vec<Payload>> {
    (
        prop::collection::vec(payload(), 0..10),
        prop::option::of((any::<u8>(), bytes(80))),
    )
        .prop_map(|(mut list, sk)| {
            if let Some((first_inner, body)) = sk {
                list.push(Payload::Sk { first_inner, body });
            }
            list
        })
}

fn header() -> impl Strategy<Value = Header> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u8>(),
        any::<u8>(),
        any::<u32>(),
    )
        .prop_map(|(spi_i, spi_r, ex, flags, message_id)| Header {
            spi_i,
            spi_r,
            next_payload: 0,
            version: 0x20,
            exchange: ExchangeType::from_u8(ex),
            flags,
            message_id,
            length: 0,
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn decode_never_panics_on_arbitrary_bytes(data in bytes(600)) {
        decode_everything(&data);
    }

    #[test]
    fn decode_never_panics_on_mutated_captures(
        pick in any::<usize>(),
        muts in prop::collection::vec(mutation(), 1..6),
        fix_length in any::<bool>(),
    ) {
        if !CAPTURED.is_empty() {
            let m = apply(CAPTURED[pick % CAPTURED.len()].clone(), &muts, fix_length);
            decode_everything(&m);
        }
    }

    #[test]
    fn payload_lists_round_trip(list in payload_list()) {
        let (first, body) = encode_payloads(&list);
        prop_assert_eq!(first, list.first().map_or(payload_type::NONE, Payload::type_code));
        let decoded = decode_payloads(first, &body);
        prop_assert_eq!(decoded.as_ref(), Ok(&list));
    }

    #[test]
    fn messages_round_trip(hd in header(), list in payload_list()) {
        let raw = Message::encode_plain(hd, &list);
        let m = Message::decode(&raw).expect("decodes");
        prop_assert_eq!(m.header.length as usize, raw.len());
        prop_assert_eq!(&m.payloads, &list);
        prop_assert_eq!(Message::encode_plain(m.header, &m.payloads), raw);
    }

    #[test]
    fn sealed_messages_round_trip(
        hd in header(),
        list in prop::collection::vec(payload(), 0..8),
        iv in any::<u64>(),
        chacha in any::<bool>(),
        key in prop::collection::vec(any::<u8>(), 36),
    ) {
        let alg = if chacha { AeadAlg::ChaCha20Poly1305 } else { AeadAlg::AesGcm16 { key_bits: 256 } };
        let raw = crypto::seal_message(alg, &key, iv, hd, &list);
        let (h2, inner) = crypto::open_message(alg, &key, &raw).expect("opens");
        prop_assert_eq!(&inner, &list);
        prop_assert_eq!(crypto::seal_message(alg, &key, iv, h2, &inner), raw);
    }
}
