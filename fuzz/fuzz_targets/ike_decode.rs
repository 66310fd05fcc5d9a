//! Feed arbitrary bytes to the IKE message decoder. Whatever decodes must re-encode to
//! something that decodes to the same payloads (and, for unencrypted messages, the same
//! header up to the Length). Also drives the payload-chain decoder and the SK opener.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run ike_decode -- -runs=100000`
//! (seed corpus: `fuzz/seed_corpus.sh` writes every captured message of the vectors).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sitewire::proto::ike::crypto::{self, AeadAlg};
use sitewire::proto::ike::wire::{decode_payloads, encode_payloads, Header, Message, Payload};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::decode(data) {
        let (first, body) = encode_payloads(&m.payloads);
        let again = decode_payloads(first, &body).expect("re-encoded payload chain decodes");
        assert_eq!(again, m.payloads);
        if !m.payloads.iter().any(|p| matches!(p, Payload::Sk { .. })) {
            let enc = Message::encode_plain(m.header, &m.payloads);
            assert!(enc.len() <= data.len(), "re-encoding never grows");
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
    // The same bytes as a bare payload chain (as found inside an SK payload).
    if let Some((&first, rest)) = data.split_first() {
        if let Ok(list) = decode_payloads(first, rest) {
            let (f2, body) = encode_payloads(&list);
            assert_eq!(decode_payloads(f2, &body).as_ref(), Ok(&list));
        }
    }
    // The SK opener must reject (not panic on) anything not sealed with its key.
    let _ = crypto::open_message(AeadAlg::AesGcm16 { key_bits: 256 }, &[0x42; 36], data);
    let _ = crypto::int_auth_octets(data, &[]);
});
