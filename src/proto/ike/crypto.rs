//! IKEv2 crypto primitives: PRF and key schedule (RFC 7296 §2.13–2.18, RFC 9370 §2.2.2), PSK
//! AUTH (§2.15, RFC 9242 §3.3.2 IntAuth), NAT-D (§2.23), the AEAD Encrypted payload
//! (§3.14, RFC 5282, RFC 7634), X25519 (RFC 8031) and ML-KEM-768 (FIPS 203).
//!
//! No hand-written cryptography: HMAC, SHA-1 and the AEADs come from `ring`, X25519 from
//! `x25519-dalek`, ML-KEM from `ml-kem`. Nothing here draws randomness or reads a clock: keys
//! are built from caller-supplied seed bytes and the IV is a caller-supplied counter.
//!
//! Only PRF_HMAC_SHA2_256 and AEAD ciphers are supported, so there are no SK_ai/SK_ar keys.

use std::net::IpAddr;

use ring::{aead, digest, hmac};
use zeroize::Zeroizing;

use super::wire::{
    self, check_header, decode_payloads, encode_payloads, ids, payload_type, transform_type,
    walk_payloads, DecodeError, Header, Payload, GENERIC_HEADER_LEN, HEADER_LEN, MAX_MESSAGE_LEN,
};

/// Output (and preferred key) length of PRF_HMAC_SHA2_256.
pub const PRF_LEN: usize = 32;
/// The AEAD IV carried in the Encrypted payload (RFC 5282 §3.1, RFC 7634 §2).
pub const IV_LEN: usize = 8;
/// The AEAD tag length (16 octets for AES-GCM-16 and ChaCha20-Poly1305).
pub const ICV_LEN: usize = 16;
/// Salt appended to each AEAD key in the keying material (RFC 5282 §7.1, RFC 7634 §3).
pub const SALT_LEN: usize = 4;
/// Longest prf+ output: the counter octet runs 1..=255 (§2.13).
pub const PRF_PLUS_MAX: usize = 255 * PRF_LEN;
/// "Key Pad for IKEv2" (§2.15), 17 ASCII octets, no NUL.
pub const KEY_PAD: &[u8] = b"Key Pad for IKEv2";

/// `prf(key, data[0] | data[1] | ...)` with HMAC-SHA-256.
pub fn prf(key: &[u8], data: &[&[u8]]) -> [u8; PRF_LEN] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&key);
    for d in data {
        ctx.update(d);
    }
    let mut out = [0u8; PRF_LEN];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// prf+(K, S) = T1 | T2 | ..., T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n) (§2.13), with S
/// the concatenation of `seed`. At most [`PRF_PLUS_MAX`] octets exist; a larger `len` is cut
/// to that (no algorithm here needs more than 168).
pub fn prf_plus(key: &[u8], seed: &[&[u8]], len: usize) -> Zeroizing<Vec<u8>> {
    let len = len.min(PRF_PLUS_MAX);
    let hkey = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut out = Zeroizing::new(Vec::with_capacity(len + PRF_LEN));
    let mut prev = Zeroizing::new([0u8; PRF_LEN]);
    let mut n: u8 = 1;
    while out.len() < len {
        let mut ctx = hmac::Context::with_key(&hkey);
        if n > 1 {
            ctx.update(&prev[..]);
        }
        for s in seed {
            ctx.update(s);
        }
        ctx.update(&[n]);
        prev.copy_from_slice(ctx.sign().as_ref());
        out.extend_from_slice(&prev[..]);
        n = n.wrapping_add(1);
    }
    out.truncate(len);
    out
}

/// The AEAD used for the IKE SA's Encrypted payloads (and, with the same layout, for ESP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AeadAlg {
    /// ENCR_AES_GCM_16 (20) with KEY_LENGTH 128 or 256.
    AesGcm16 { key_bits: u16 },
    /// ENCR_CHACHA20_POLY1305 (28), no KEY_LENGTH attribute.
    ChaCha20Poly1305,
}

impl AeadAlg {
    /// Cipher key length in octets (16 or 32).
    pub fn key_len(&self) -> usize {
        match self {
            AeadAlg::AesGcm16 { key_bits } => usize::from(*key_bits) / 8,
            AeadAlg::ChaCha20Poly1305 => 32,
        }
    }

    /// Keying material per direction: key plus the 4-octet salt.
    pub fn keymat_len(&self) -> usize {
        self.key_len() + SALT_LEN
    }

    /// The algorithm named by an ENCR transform, if we implement it.
    pub fn from_transform(t: &wire::Transform) -> Option<Self> {
        if t.ty != transform_type::ENCR {
            return None;
        }
        match (t.id, t.key_len) {
            (ids::ENCR_AES_GCM_16, Some(bits @ (128 | 256))) => {
                Some(AeadAlg::AesGcm16 { key_bits: bits })
            }
            (ids::ENCR_CHACHA20_POLY1305, None) => Some(AeadAlg::ChaCha20Poly1305),
            _ => None,
        }
    }

    pub fn to_transform(&self) -> wire::Transform {
        match self {
            AeadAlg::AesGcm16 { key_bits } => wire::Transform {
                ty: transform_type::ENCR,
                id: ids::ENCR_AES_GCM_16,
                key_len: Some(*key_bits),
            },
            AeadAlg::ChaCha20Poly1305 => wire::Transform {
                ty: transform_type::ENCR,
                id: ids::ENCR_CHACHA20_POLY1305,
                key_len: None,
            },
        }
    }

    fn ring_alg(&self) -> Option<&'static aead::Algorithm> {
        match self {
            AeadAlg::AesGcm16 { key_bits: 128 } => Some(&aead::AES_128_GCM),
            AeadAlg::AesGcm16 { key_bits: 256 } => Some(&aead::AES_256_GCM),
            AeadAlg::AesGcm16 { .. } => None,
            AeadAlg::ChaCha20Poly1305 => Some(&aead::CHACHA20_POLY1305),
        }
    }

    /// Build the ring key and the salt from `key | salt` keying material.
    fn key_and_salt(&self, keymat: &[u8]) -> Option<(aead::LessSafeKey, [u8; SALT_LEN])> {
        let alg = self.ring_alg()?;
        if keymat.len() != self.keymat_len() {
            return None;
        }
        let (k, s) = keymat.split_at(self.key_len());
        let key = aead::UnboundKey::new(alg, k).ok()?;
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(s);
        Some((aead::LessSafeKey::new(key), salt))
    }
}

/// The IKE SA's keys (§2.14). AEAD only: SK_ai/SK_ar are empty and left out.
/// SK_ei/SK_er are `key | salt`.
pub struct IkeKeys {
    pub sk_d: Zeroizing<Vec<u8>>,
    pub sk_ei: Zeroizing<Vec<u8>>,
    pub sk_er: Zeroizing<Vec<u8>>,
    pub sk_pi: Zeroizing<Vec<u8>>,
    pub sk_pr: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for IkeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IkeKeys { .. }")
    }
}

/// SKEYSEED = prf(Ni | Nr, g^ir) (§2.14). Nonce data only, no payload headers.
pub fn skeyseed(ni: &[u8], nr: &[u8], shared: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut key = Zeroizing::new(Vec::with_capacity(ni.len() + nr.len()));
    key.extend_from_slice(ni);
    key.extend_from_slice(nr);
    Zeroizing::new(prf(&key, &[shared]))
}

/// SKEYSEED of a rekeyed IKE SA: prf(SK_d (old), g^ir (new) | Ni | Nr) (§2.18). With RFC 9370
/// additional key exchanges in the rekey, `shared` is the concatenation of all their secrets.
pub fn skeyseed_rekey(old_sk_d: &[u8], shared: &[u8], ni: &[u8], nr: &[u8]) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(prf(old_sk_d, &[shared, ni, nr]))
}

/// RFC 9370 §2.2.2: after the n-th additional key exchange of the initial IKE SA,
/// SKEYSEED(n) = prf(SK_d(n-1), SK(n) | Ni | Nr); then derive the keys as usual with
/// [`derive_ike_keys`] (same nonces and SPIs).
pub fn skeyseed_additional(
    prev_sk_d: &[u8],
    shared: &[u8],
    ni: &[u8],
    nr: &[u8],
) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(prf(prev_sk_d, &[shared, ni, nr]))
}

/// {SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr).
pub fn derive_ike_keys(
    skeyseed: &[u8],
    ni: &[u8],
    nr: &[u8],
    spi_i: u64,
    spi_r: u64,
    aead: AeadAlg,
) -> IkeKeys {
    let e = aead.keymat_len();
    let total = PRF_LEN + 2 * e + 2 * PRF_LEN;
    let km = prf_plus(
        skeyseed,
        &[ni, nr, &spi_i.to_be_bytes(), &spi_r.to_be_bytes()],
        total,
    );
    let take = |from: usize, len: usize| Zeroizing::new(km[from..from + len].to_vec());
    IkeKeys {
        sk_d: take(0, PRF_LEN),
        sk_ei: take(PRF_LEN, e),
        sk_er: take(PRF_LEN + e, e),
        sk_pi: take(PRF_LEN + 2 * e, PRF_LEN),
        sk_pr: take(2 * PRF_LEN + 2 * e, PRF_LEN),
    }
}

/// CHILD_SA KEYMAT (§2.17): prf+(SK_d, [shared |] Ni | Nr); `shared` = the (EC)DH / KEM secrets
/// of the exchange in order (empty without PFS). The first `keymat_len` octets protect
/// initiator→responder traffic, the next ones responder→initiator.
pub fn child_keymat(
    sk_d: &[u8],
    shared: &[&[u8]],
    ni: &[u8],
    nr: &[u8],
    len: usize,
) -> Zeroizing<Vec<u8>> {
    let mut seed: Vec<&[u8]> = shared.to_vec();
    seed.push(ni);
    seed.push(nr);
    prf_plus(sk_d, &seed, len)
}

/// PSK AUTH (§2.15, method 2):
/// prf(prf(PSK, "Key Pad for IKEv2"), RealMessage | peer nonce | prf(SK_p, ID body) [| IntAuth]).
/// `int_auth` is [`int_auth`]'s output when IKE_INTERMEDIATE exchanges took place (RFC 9242).
pub fn psk_auth(
    psk: &[u8],
    real_message: &[u8],
    peer_nonce: &[u8],
    sk_p: &[u8],
    id_body: &[u8],
    int_auth: Option<&[u8]>,
) -> [u8; 32] {
    let padded = Zeroizing::new(prf(psk, &[KEY_PAD]));
    let maced_id = prf(sk_p, &[id_body]);
    prf(
        &padded[..],
        &[real_message, peer_nonce, &maced_id, int_auth.unwrap_or(&[])],
    )
}

/// Constant-time comparison of two MACs (for checking a received AUTH).
pub fn macs_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// NAT-D notify data: SHA-1(SPIi | SPIr | IP | port) (§2.23), SPIs as in the message header.
pub fn nat_detection_hash(spi_i: u64, spi_r: u64, ip: IpAddr, port: u16) -> [u8; 20] {
    let mut ctx = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(&spi_i.to_be_bytes());
    ctx.update(&spi_r.to_be_bytes());
    match ip {
        IpAddr::V4(a) => ctx.update(&a.octets()),
        IpAddr::V6(a) => ctx.update(&a.octets()),
    }
    ctx.update(&port.to_be_bytes());
    let mut out = [0u8; 20];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Why [`try_seal_message`] could not build a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealError {
    /// The key is not `key | salt` of the algorithm's size, or the algorithm isn't supported.
    BadKey,
    /// The result would exceed 65535 octets.
    TooLarge,
}

/// Why an Encrypted message could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// The outer message or the decrypted inner payloads are malformed.
    Decode(DecodeError),
    /// The message carries no Encrypted payload.
    NoSkPayload,
    /// The ICV did not verify (or the key does not fit the algorithm): drop silently.
    Auth,
}

impl OpenError {
    /// Stable snake_case name, usable as a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            OpenError::Decode(e) => e.kind(),
            OpenError::NoSkPayload => "no_sk_payload",
            OpenError::Auth => "auth_failed",
        }
    }
}

impl From<DecodeError> for OpenError {
    fn from(e: DecodeError) -> Self {
        OpenError::Decode(e)
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot open IKE message: {}", self.kind())
    }
}

impl std::error::Error for OpenError {}

/// Seal an SK message: header (with final length) + SK payload (IV = `iv_counter` as 8 octets
/// big-endian, pad length 0) around the encoded inner payloads. AAD = header | SK generic
/// header, nonce = salt | IV. `key` = SK_ei or SK_er (`key | 4-octet salt`).
///
/// Returns an empty vector if the key does not fit `aead` or the message would exceed 64 KiB
/// (neither happens with keys from [`derive_ike_keys`] and real payloads); use
/// [`try_seal_message`] to get the reason.
pub fn seal_message(
    aead: AeadAlg,
    key: &[u8],
    iv_counter: u64,
    header: Header,
    inner: &[Payload],
) -> Vec<u8> {
    try_seal_message(aead, key, iv_counter, header, inner).unwrap_or_default()
}

/// [`seal_message`], with the failure reason.
pub fn try_seal_message(
    aead: AeadAlg,
    key: &[u8],
    iv_counter: u64,
    mut header: Header,
    inner: &[Payload],
) -> Result<Vec<u8>, SealError> {
    let (lkey, salt) = aead.key_and_salt(key).ok_or(SealError::BadKey)?;
    let (first_inner, mut plaintext) = encode_payloads(inner);
    plaintext.push(0); // pad length 0, no padding (as strongSwan)
    let sk_len = GENERIC_HEADER_LEN + IV_LEN + plaintext.len() + ICV_LEN;
    let total = HEADER_LEN + sk_len;
    if total > MAX_MESSAGE_LEN {
        return Err(SealError::TooLarge);
    }
    header.next_payload = payload_type::SK;
    header.length = total as u32;
    let mut out = Vec::with_capacity(total);
    header.encode(&mut out);
    out.push(first_inner);
    out.push(0);
    out.extend_from_slice(&(sk_len as u16).to_be_bytes());
    let iv = iv_counter.to_be_bytes();
    let tag = lkey
        .seal_in_place_separate_tag(
            nonce(&salt, &iv),
            aead::Aad::from(&out[..HEADER_LEN + GENERIC_HEADER_LEN]),
            &mut plaintext,
        )
        .map_err(|_| SealError::BadKey)?;
    out.extend_from_slice(&iv);
    out.extend_from_slice(&plaintext);
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

fn nonce(salt: &[u8; SALT_LEN], iv: &[u8; IV_LEN]) -> aead::Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[..SALT_LEN].copy_from_slice(salt);
    n[SALT_LEN..].copy_from_slice(iv);
    aead::Nonce::assume_unique_for_key(n)
}

/// An opened Encrypted message, with what IntAuth (RFC 9242) needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub header: Header,
    /// The SK payload's Next Payload field.
    pub first_inner: u8,
    /// The decrypted inner payload octets (no padding, no pad length): IntAuth_*_P.
    pub inner_bytes: Vec<u8>,
    pub payloads: Vec<Payload>,
}

/// Open an Encrypted message: verify the tag, strip the padding (up to 255 octets accepted),
/// decode the inner payloads. `raw` is the whole IKE message (no non-ESP marker). Unencrypted
/// payloads before the SK payload are checked but not returned.
pub fn open_message(
    aead: AeadAlg,
    key: &[u8],
    raw: &[u8],
) -> Result<(Header, Vec<Payload>), OpenError> {
    open_message_detailed(aead, key, raw).map(|o| (o.header, o.payloads))
}

/// [`open_message`], also returning the decrypted inner octets.
pub fn open_message_detailed(aead: AeadAlg, key: &[u8], raw: &[u8]) -> Result<Opened, OpenError> {
    let (header, sk_at, first_inner) = locate_sk(raw)?;
    let body = &raw[sk_at + GENERIC_HEADER_LEN..];
    if body.len() < IV_LEN + ICV_LEN + 1 {
        return Err(OpenError::Decode(DecodeError::ShortBody));
    }
    let (lkey, salt) = aead.key_and_salt(key).ok_or(OpenError::Auth)?;
    let mut iv = [0u8; IV_LEN];
    iv.copy_from_slice(&body[..IV_LEN]);
    let mut buf = body[IV_LEN..].to_vec();
    let plain_len = lkey
        .open_in_place(
            nonce(&salt, &iv),
            aead::Aad::from(&raw[..sk_at + GENERIC_HEADER_LEN]),
            &mut buf,
        )
        .map_err(|_| OpenError::Auth)?
        .len();
    buf.truncate(plain_len);
    let pad = match buf.last() {
        Some(&p) => usize::from(p),
        None => return Err(OpenError::Decode(DecodeError::BadPadding)),
    };
    if pad + 1 > buf.len() {
        return Err(OpenError::Decode(DecodeError::BadPadding));
    }
    buf.truncate(buf.len() - 1 - pad);
    let payloads = decode_payloads(first_inner, &buf)?;
    if payloads
        .iter()
        .any(|p| matches!(p, Payload::Sk { .. }) || p.type_code() == payload_type::SKF)
    {
        return Err(OpenError::Decode(DecodeError::NestedSk));
    }
    Ok(Opened {
        header,
        first_inner,
        inner_bytes: buf,
        payloads,
    })
}

/// Find the SK payload: returns the header, the SK generic header's offset in `raw`, and the
/// SK payload's Next Payload field.
fn locate_sk(raw: &[u8]) -> Result<(Header, usize, u8), OpenError> {
    let header = check_header(raw)?;
    let chain = walk_payloads(header.next_payload, &raw[HEADER_LEN..])?;
    match chain.last() {
        Some(p) if p.ty == payload_type::SK => Ok((header, HEADER_LEN + p.offset, p.next)),
        _ => Err(OpenError::NoSkPayload),
    }
}

/// RFC 9242 §3.3.2: the octets one IKE_INTERMEDIATE message contributes to its IntAuth chain,
/// IntAuth_*_A | IntAuth_*_P. IntAuth_*_A runs from the IKE header to the end of the SK generic
/// header, with the header's Length and the SK Payload Length replaced by the "adjusted" values
/// that leave out the IV, padding, pad length and ICV; IntAuth_*_P is the plaintext inner
/// payloads. `raw` is the sealed message as sent or received (unfragmented), `inner_bytes`
/// its decrypted inner payloads (see [`Opened::inner_bytes`]).
pub fn int_auth_octets(raw: &[u8], inner_bytes: &[u8]) -> Result<Vec<u8>, OpenError> {
    let (_, sk_at, _) = locate_sk(raw)?;
    let a_len = sk_at + GENERIC_HEADER_LEN;
    let adjusted_len =
        u32::try_from(a_len + inner_bytes.len()).map_err(|_| DecodeError::TooLarge)?;
    let adjusted_payload_len =
        u16::try_from(GENERIC_HEADER_LEN + inner_bytes.len()).map_err(|_| DecodeError::TooLarge)?;
    let mut out = Vec::with_capacity(a_len + inner_bytes.len());
    out.extend_from_slice(&raw[..a_len]);
    out[24..28].copy_from_slice(&adjusted_len.to_be_bytes());
    out[sk_at + 2..sk_at + 4].copy_from_slice(&adjusted_payload_len.to_be_bytes());
    out.extend_from_slice(inner_bytes);
    Ok(out)
}

/// One link of an IntAuth chain (RFC 9242 §3.3.2):
/// IntAuth_1 = prf(SK_p1, octets_1), IntAuth_n = prf(SK_pn, IntAuth_(n-1) | octets_n).
/// `sk_p` is SK_pi for messages sent by the initiator, SK_pr for the responder's, taken from the
/// keys that protected this exchange (before any update it causes); `octets` from
/// [`int_auth_octets`].
pub fn int_auth_step(sk_p: &[u8], prev: Option<&[u8]>, octets: &[u8]) -> [u8; 32] {
    prf(sk_p, &[prev.unwrap_or(&[]), octets])
}

/// IntAuth = IntAuth_iN | IntAuth_rN | IKE_AUTH_MID (RFC 9242 §3.3.2): appended to both sides'
/// signed octets (pass it as `int_auth` to [`psk_auth`]). `ike_auth_mid` is the Message ID of
/// the first IKE_AUTH request.
pub fn int_auth(int_auth_i: &[u8], int_auth_r: &[u8], ike_auth_mid: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(int_auth_i.len() + int_auth_r.len() + 4);
    out.extend_from_slice(int_auth_i);
    out.extend_from_slice(int_auth_r);
    out.extend_from_slice(&ike_auth_mid.to_be_bytes());
    out
}

/// An X25519 private key (RFC 7748, RFC 8031), built from caller-supplied random bytes.
pub struct X25519Secret(x25519_dalek::StaticSecret);

impl X25519Secret {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        X25519Secret(x25519_dalek::StaticSecret::from(bytes))
    }

    /// The KE payload data for group 31.
    pub fn public(&self) -> [u8; 32] {
        x25519_dalek::PublicKey::from(&self.0).to_bytes()
    }

    /// g^ir, or `None` if the peer's value is not 32 octets or the result is all zero
    /// (RFC 8031 §2: the peer sent a low-order point).
    pub fn diffie_hellman(&self, peer: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
        let peer: [u8; 32] = peer.try_into().ok()?;
        let shared = self.0.diffie_hellman(&x25519_dalek::PublicKey::from(peer));
        if !shared.was_contributory() {
            return None;
        }
        Some(Zeroizing::new(shared.to_bytes()))
    }
}

impl std::fmt::Debug for X25519Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("X25519Secret(..)")
    }
}

/// ML-KEM-768 encapsulation key length (the initiator's KE data).
pub const MLKEM768_EK_LEN: usize = 1184;
/// ML-KEM-768 ciphertext length (the responder's KE data).
pub const MLKEM768_CT_LEN: usize = 1088;

/// An ML-KEM-768 decapsulation key (FIPS 203), zeroized on drop.
pub struct MlKemDecapsKey(ml_kem::ml_kem_768::DecapsulationKey);

impl std::fmt::Debug for MlKemDecapsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MlKemDecapsKey(..)")
    }
}

/// Deterministic ML-KEM-768 key generation from the 64-octet seed `d | z` (FIPS 203
/// ML-KEM.KeyGen_internal). Returns the decapsulation key and the 1184-octet encapsulation key.
pub fn mlkem_keygen(seed: &[u8; 64]) -> (MlKemDecapsKey, Vec<u8>) {
    use ml_kem::KeyExport;
    let dk = ml_kem::ml_kem_768::DecapsulationKey::from_seed(ml_kem::Seed::from(*seed));
    let ek = dk.encapsulation_key().to_bytes().to_vec();
    (MlKemDecapsKey(dk), ek)
}

/// Deterministic encapsulation (FIPS 203 ML-KEM.Encaps_internal with the 32-octet message `m`
/// = `seed`) to the peer's encapsulation key. `None` if `ek` is not a valid 1184-octet key
/// (wrong length or failing the modulus check). Returns the 1088-octet ciphertext and the
/// shared secret.
pub fn mlkem_encaps(ek: &[u8], seed: &[u8; 32]) -> Option<(Vec<u8>, Zeroizing<[u8; 32]>)> {
    let key = ml_kem::Key::<ml_kem::ml_kem_768::EncapsulationKey>::try_from(ek).ok()?;
    let ek = ml_kem::ml_kem_768::EncapsulationKey::new(&key).ok()?;
    let (ct, k) = ek.encapsulate_deterministic(&ml_kem::B32::from(*seed));
    let mut shared = Zeroizing::new([0u8; 32]);
    shared.copy_from_slice(k.as_slice());
    Some((ct.to_vec(), shared))
}

impl MlKemDecapsKey {
    /// The 1184-octet encapsulation key.
    pub fn encaps_key(&self) -> Vec<u8> {
        use ml_kem::KeyExport;
        self.0.encapsulation_key().to_bytes().to_vec()
    }

    /// The shared secret for a ciphertext; `None` if it isn't 1088 octets. (A wrong ciphertext
    /// of the right size yields an unrelated secret: ML-KEM's implicit rejection.)
    pub fn decaps(&self, ct: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
        use ml_kem::Decapsulate;
        let ct = ml_kem::Ciphertext::<ml_kem::MlKem768>::try_from(ct).ok()?;
        let k = self.0.decapsulate(&ct);
        let mut shared = Zeroizing::new([0u8; 32]);
        shared.copy_from_slice(k.as_slice());
        Some(shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ike::wire::{flags, ExchangeType, Notify};

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn hmac_sha256_rfc4231_case2() {
        let out = prf(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            out.to_vec(),
            hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        );
    }

    #[test]
    fn prf_plus_is_chained() {
        let k = [7u8; 32];
        let out = prf_plus(&k, &[b"ab", b"c"], 70);
        let t1 = prf(&k, &[b"abc", &[1]]);
        let t2 = prf(&k, &[&t1, b"abc", &[2]]);
        let t3 = prf(&k, &[&t2, b"abc", &[3]]);
        assert_eq!(&out[..32], &t1);
        assert_eq!(&out[32..64], &t2);
        assert_eq!(&out[64..], &t3[..6]);
        assert_eq!(prf_plus(&k, &[], 100_000).len(), PRF_PLUS_MAX);
    }

    #[test]
    fn aead_transforms() {
        for alg in [
            AeadAlg::AesGcm16 { key_bits: 128 },
            AeadAlg::AesGcm16 { key_bits: 256 },
            AeadAlg::ChaCha20Poly1305,
        ] {
            assert_eq!(AeadAlg::from_transform(&alg.to_transform()), Some(alg));
        }
        let gcm192 = wire::Transform {
            ty: transform_type::ENCR,
            id: ids::ENCR_AES_GCM_16,
            key_len: Some(192),
        };
        assert_eq!(AeadAlg::from_transform(&gcm192), None);
        let chacha_with_len = wire::Transform {
            key_len: Some(256),
            ..AeadAlg::ChaCha20Poly1305.to_transform()
        };
        assert_eq!(AeadAlg::from_transform(&chacha_with_len), None);
        assert_eq!(AeadAlg::AesGcm16 { key_bits: 128 }.keymat_len(), 20);
        assert_eq!(AeadAlg::ChaCha20Poly1305.keymat_len(), 36);
    }

    fn header() -> Header {
        Header {
            spi_i: 1,
            spi_r: 2,
            next_payload: 0,
            version: wire::VERSION_2_0,
            exchange: ExchangeType::Informational,
            flags: flags::INITIATOR,
            message_id: 5,
            length: 0,
        }
    }

    #[test]
    fn seal_open_round_trip_and_tamper() {
        for alg in [
            AeadAlg::AesGcm16 { key_bits: 128 },
            AeadAlg::AesGcm16 { key_bits: 256 },
            AeadAlg::ChaCha20Poly1305,
        ] {
            let key = vec![0x42; alg.keymat_len()];
            let inner = vec![Payload::Notify(Notify::new(16384, &[]))];
            let m = seal_message(alg, &key, 9, header(), &inner);
            assert!(!m.is_empty());
            let (h, p) = open_message(alg, &key, &m).unwrap();
            assert_eq!(p, inner);
            assert_eq!(h.length as usize, m.len());
            for i in [0, 20, 24, 30, 40, m.len() - 1] {
                let mut bad = m.clone();
                bad[i] ^= 1;
                assert!(open_message(alg, &key, &bad).is_err(), "byte {i}");
            }
            // empty DPD: 57 octets
            assert_eq!(seal_message(alg, &key, 1, header(), &[]).len(), 57);
            // wrong key size
            assert_eq!(
                try_seal_message(alg, &key[1..], 1, header(), &[]),
                Err(SealError::BadKey)
            );
            assert_eq!(open_message(alg, &key[1..], &m), Err(OpenError::Auth));
        }
    }

    #[test]
    fn open_accepts_padding_and_rejects_bad_pad_length() {
        let alg = AeadAlg::AesGcm16 { key_bits: 256 };
        let key = vec![3u8; 36];
        let build = |plain: &[u8]| {
            let (lkey, salt) = alg.key_and_salt(&key).unwrap();
            let sk_len = 4 + 8 + plain.len() + 16;
            let mut h = header();
            h.next_payload = payload_type::SK;
            h.length = (28 + sk_len) as u32;
            let mut out = Vec::new();
            h.encode(&mut out);
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(sk_len as u16).to_be_bytes());
            let iv = [9u8; 8];
            let mut buf = plain.to_vec();
            let tag = lkey
                .seal_in_place_separate_tag(
                    nonce(&salt, &iv),
                    aead::Aad::from(&out[..32]),
                    &mut buf,
                )
                .unwrap();
            out.extend_from_slice(&iv);
            out.extend_from_slice(&buf);
            out.extend_from_slice(tag.as_ref());
            out
        };
        let mut plain = vec![0xAA; 255];
        plain.push(255);
        assert_eq!(open_message(alg, &key, &build(&plain)).unwrap().1, vec![]);
        assert_eq!(
            open_message(alg, &key, &build(&[1])),
            Err(OpenError::Decode(DecodeError::BadPadding))
        );
    }

    #[test]
    fn int_auth_octets_use_adjusted_lengths() {
        let alg = AeadAlg::ChaCha20Poly1305;
        let key = vec![1u8; 36];
        let inner = vec![Payload::Nonce(vec![5; 32])];
        let m = seal_message(alg, &key, 1, header(), &inner);
        let o = open_message_detailed(alg, &key, &m).unwrap();
        let oct = int_auth_octets(&m, &o.inner_bytes).unwrap();
        let (first, inner_bytes) = encode_payloads(&inner);
        assert_eq!(o.inner_bytes, inner_bytes);
        assert_eq!(oct.len(), 32 + inner_bytes.len());
        assert_eq!(&oct[..24], &m[..24]);
        assert_eq!(
            u32::from_be_bytes(oct[24..28].try_into().unwrap()) as usize,
            oct.len()
        );
        assert_eq!(oct[28], first);
        assert_eq!(
            u16::from_be_bytes([oct[30], oct[31]]) as usize,
            4 + inner_bytes.len()
        );
        assert_eq!(&oct[32..], &inner_bytes[..]);
        let i1 = int_auth_step(&[2; 32], None, &oct);
        assert_eq!(i1, prf(&[2; 32], &[&oct]));
        let i2 = int_auth_step(&[2; 32], Some(&i1), &oct);
        assert_eq!(i2, prf(&[2; 32], &[&i1, &oct]));
        let ia = int_auth(&i1, &i2, 2);
        assert_eq!(&ia[64..], &[0, 0, 0, 2]);
    }

    #[test]
    fn x25519_rfc7748_vector_and_low_order() {
        // RFC 7748 §6.1
        let a = X25519Secret::from_bytes(
            hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .try_into()
                .unwrap(),
        );
        let b = X25519Secret::from_bytes(
            hex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
                .try_into()
                .unwrap(),
        );
        assert_eq!(
            a.public().to_vec(),
            hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        let k = a.diffie_hellman(&b.public()).unwrap();
        assert_eq!(
            k.to_vec(),
            hex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
        );
        assert!(a.diffie_hellman(&[0u8; 32]).is_none());
        assert!(a.diffie_hellman(&[9u8; 31]).is_none());
    }

    #[test]
    fn mlkem_deterministic_round_trip() {
        let (dk, ek) = mlkem_keygen(&[7u8; 64]);
        assert_eq!(ek.len(), MLKEM768_EK_LEN);
        assert_eq!(dk.encaps_key(), ek);
        let (dk2, ek2) = mlkem_keygen(&[7u8; 64]);
        assert_eq!(ek, ek2);
        let (ct, k) = mlkem_encaps(&ek, &[9u8; 32]).unwrap();
        assert_eq!(ct.len(), MLKEM768_CT_LEN);
        let (ct_again, k_again) = mlkem_encaps(&ek, &[9u8; 32]).unwrap();
        assert_eq!((&ct, &*k), (&ct_again, &*k_again));
        assert_eq!(*dk.decaps(&ct).unwrap(), *k);
        assert_eq!(*dk2.decaps(&ct).unwrap(), *k);
        // wrong sizes
        assert!(mlkem_encaps(&ek[1..], &[0; 32]).is_none());
        assert!(dk.decaps(&ct[1..]).is_none());
        // a modified ciphertext gives a different (implicitly rejected) secret
        let mut bad = ct.clone();
        bad[0] ^= 1;
        assert_ne!(*dk.decaps(&bad).unwrap(), *k);
        // an encapsulation key failing the modulus check is refused
        assert!(mlkem_encaps(&[0xff; MLKEM768_EK_LEN], &[0; 32]).is_none());
    }

    #[test]
    fn nat_d_ipv4() {
        // suite a, message 0, NAT_DETECTION_DESTINATION_IP
        let h = nat_detection_hash(0xe45f9e27bd6aed0e, 0, "10.210.0.2".parse().unwrap(), 500);
        assert_eq!(h.to_vec(), hex("7847a17fdf6104b8a33ada84cfeaca2b0f5957a3"));
    }
}
