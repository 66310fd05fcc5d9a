//! ESP (RFC 4303) in tunnel mode with the AEAD ciphers of the IKE SA (RFC 4106 AES-GCM-16,
//! RFC 7634 ChaCha20-Poly1305), sans-IO. The caller does the UDP encapsulation (RFC 3948):
//! what goes in and out here is the UDP payload, starting at the SPI.
//!
//! ```text
//! ESP   = SPI(4) | Seq(4) | IV(8) | ciphertext | ICV(16)
//! pt    = inner IP packet | padding 01 02 .. | pad length(1) | next header(1)
//! nonce = salt(4) | IV(8)          AAD = SPI | Seq (no ESN)
//! ```
//!
//! No allocation per packet: [`EspSa::seal`] and [`EspSa::open`] write into caller buffers,
//! and [`EspSa::seal_in_place`] / [`EspSa::open_in_place`] avoid even the copy. Crypto is
//! `ring`'s. Nothing here reads a clock or an RNG: the IV is the sequence number (XOR an
//! optional per-SA mask, see [`EspSa::set_iv_mask`]), which is unique per SA because the
//! sequence number never repeats. Every rejected packet is a typed error with a stable
//! [`OpenError::kind`] label.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};

use ring::aead::{self, Aad, LessSafeKey, Nonce, Tag, UnboundKey};

use super::ike::crypto::{AeadAlg, SALT_LEN};
use super::ike::wire::TrafficSelector;

/// SPI plus sequence number.
pub const HEADER_LEN: usize = 8;
/// The explicit IV carried in each packet (RFC 4106 §3.1, RFC 7634 §2).
pub const IV_LEN: usize = 8;
/// The integrity check value (16 octets for both AEADs).
pub const ICV_LEN: usize = 16;
/// Where the inner packet starts in a sealed ESP packet (SPI | Seq | IV).
pub const PAYLOAD_OFFSET: usize = HEADER_LEN + IV_LEN;
/// Largest per-packet overhead: header, IV, 3 padding octets, pad length, next header, ICV.
pub const MAX_OVERHEAD: usize = PAYLOAD_OFFSET + 3 + 2 + ICV_LEN;
/// Smallest valid ESP packet: header, IV, pad length + next header, ICV.
pub const MIN_PACKET_LEN: usize = PAYLOAD_OFFSET + 2 + ICV_LEN;

/// Next header: IPv4 in tunnel mode.
pub const NEXT_HEADER_IPV4: u8 = 4;
/// Next header: IPv6 in tunnel mode.
pub const NEXT_HEADER_IPV6: u8 = 41;
/// Next header: TFC dummy packet (RFC 4303 §2.6), to be dropped.
pub const NEXT_HEADER_DUMMY: u8 = 59;

/// Sequence number from which [`EspSa::needs_rekey`] is true: 2^32 - 2^24.
pub const SEQ_SOFT_LIMIT: u64 = (1 << 32) - (1 << 24);
/// The last sequence number usable without ESN (RFC 4303 §3.3.3: never wrap).
pub const SEQ_HARD_LIMIT: u64 = u32::MAX as u64;

/// Octets written by [`EspSa::seal`] for an inner packet of `inner_len` octets.
pub fn sealed_len(inner_len: usize) -> usize {
    PAYLOAD_OFFSET + inner_len + pad_len(inner_len) + 2 + ICV_LEN
}

/// Padding so that `inner_len + padding + 2` is a multiple of 4 (RFC 4303 §2.4).
fn pad_len(inner_len: usize) -> usize {
    (4 - (inner_len + 2) % 4) % 4
}

/// The padding octets 1, 2, 3 (RFC 4303 §2.4), of which the first `n` are used.
const PAD_BYTES: [u8; 3] = [1, 2, 3];

/// Building an [`EspSa`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    /// `key | salt` has the wrong length for the algorithm.
    BadKeyLength,
    /// An AES-GCM key size other than 128 or 256 bits.
    UnsupportedAlg,
}

impl KeyError {
    /// Stable snake_case name, usable as a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            KeyError::BadKeyLength => "bad_key_length",
            KeyError::UnsupportedAlg => "unsupported_alg",
        }
    }
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ESP key: {}", self.kind())
    }
}

impl std::error::Error for KeyError {}

/// Sealing a packet failed; nothing was sent and no sequence number was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealError {
    /// The 32-bit sequence number is used up: the SA must be replaced by a rekey.
    SeqExhausted,
    /// The output buffer is smaller than [`sealed_len`].
    BufferTooSmall,
    /// The inner packet is neither IPv4 nor IPv6 (by its version nibble), or empty.
    BadInnerPacket,
    /// The AEAD refused the input (too long for the cipher).
    Crypto,
}

impl SealError {
    /// Stable snake_case name, usable as a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            SealError::SeqExhausted => "seq_exhausted",
            SealError::BufferTooSmall => "buffer_too_small",
            SealError::BadInnerPacket => "bad_inner_packet",
            SealError::Crypto => "crypto",
        }
    }

    /// Every variant, for pre-registering counter labels.
    pub const ALL: [SealError; 4] = [
        SealError::SeqExhausted,
        SealError::BufferTooSmall,
        SealError::BadInnerPacket,
        SealError::Crypto,
    ];
}

impl std::fmt::Display for SealError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ESP seal: {}", self.kind())
    }
}

impl std::error::Error for SealError {}

/// A received packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// Shorter than [`MIN_PACKET_LEN`].
    Truncated,
    /// The SPI is not this SA's inbound SPI.
    UnknownSpi,
    /// The sequence number was already received (anti-replay window).
    Replayed,
    /// The sequence number is left of the anti-replay window (or 0).
    TooOld,
    /// The output buffer is smaller than the ciphertext.
    BufferTooSmall,
    /// The ICV did not verify (wrong key, tampered, or not for this SA).
    AuthFailed,
    /// Authentic, but the pad length runs past the plaintext or the pad octets are not 1, 2, ...
    BadPadding,
    /// Authentic, but the next header is neither IPv4 (4) nor IPv6 (41).
    BadNextHeader,
    /// Authentic TFC dummy packet (next header 59): counted, then dropped.
    Dummy,
}

impl OpenError {
    /// Stable snake_case name, usable as a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            OpenError::Truncated => "truncated",
            OpenError::UnknownSpi => "unknown_spi",
            OpenError::Replayed => "replayed",
            OpenError::TooOld => "too_old",
            OpenError::BufferTooSmall => "buffer_too_small",
            OpenError::AuthFailed => "auth_failed",
            OpenError::BadPadding => "bad_padding",
            OpenError::BadNextHeader => "bad_next_header",
            OpenError::Dummy => "dummy",
        }
    }

    /// Every variant, for pre-registering counter labels.
    pub const ALL: [OpenError; 9] = [
        OpenError::Truncated,
        OpenError::UnknownSpi,
        OpenError::Replayed,
        OpenError::TooOld,
        OpenError::BufferTooSmall,
        OpenError::AuthFailed,
        OpenError::BadPadding,
        OpenError::BadNextHeader,
        OpenError::Dummy,
    ];
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ESP packet dropped: {}", self.kind())
    }
}

impl std::error::Error for OpenError {}

impl From<ReplayError> for OpenError {
    fn from(e: ReplayError) -> Self {
        match e {
            ReplayError::Replayed => OpenError::Replayed,
            ReplayError::TooOld => OpenError::TooOld,
        }
    }
}

/// One direction's cipher: the ring key and the 4-octet salt.
struct DirKey {
    key: LessSafeKey,
    salt: [u8; SALT_LEN],
}

impl DirKey {
    fn new(aead: AeadAlg, keymat: &[u8]) -> Result<Self, KeyError> {
        let alg: &'static aead::Algorithm = match aead {
            AeadAlg::AesGcm16 { key_bits: 128 } => &aead::AES_128_GCM,
            AeadAlg::AesGcm16 { key_bits: 256 } => &aead::AES_256_GCM,
            AeadAlg::AesGcm16 { .. } => return Err(KeyError::UnsupportedAlg),
            AeadAlg::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
        };
        if keymat.len() != aead.keymat_len() || keymat.len() < SALT_LEN {
            return Err(KeyError::BadKeyLength);
        }
        let (k, s) = keymat.split_at(keymat.len() - SALT_LEN);
        let key = UnboundKey::new(alg, k).map_err(|_| KeyError::BadKeyLength)?;
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(s);
        Ok(Self {
            key: LessSafeKey::new(key),
            salt,
        })
    }

    fn nonce(&self, iv: &[u8; IV_LEN]) -> Nonce {
        let mut n = [0u8; aead::NONCE_LEN];
        n[..SALT_LEN].copy_from_slice(&self.salt);
        n[SALT_LEN..].copy_from_slice(iv);
        Nonce::assume_unique_for_key(n)
    }
}

/// A pair of ESP SAs (one CHILD SA): outbound `spi_out`/`key_out`, inbound `spi_in`/`key_in`,
/// the outbound sequence counter and the inbound anti-replay window.
pub struct EspSa {
    spi_out: u32,
    spi_in: u32,
    out: DirKey,
    inb: DirKey,
    /// The next outbound sequence number (1 on a new SA; > [`SEQ_HARD_LIMIT`] when used up).
    next_seq: AtomicU64,
    iv_mask: u64,
    /// Locked only to check and move it: decryption runs outside, so one thread can seal
    /// while another opens.
    replay: Mutex<ReplayWindow>,
}

impl std::fmt::Debug for EspSa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EspSa")
            .field("spi_out", &format_args!("{:08x}", self.spi_out))
            .field("spi_in", &format_args!("{:08x}", self.spi_in))
            .field("next_seq", &self.next_seq())
            .field("replay_top", &self.window().top())
            .finish_non_exhaustive()
    }
}

impl EspSa {
    /// `key_out` and `key_in` are `key | salt` (as in `ChildKeys::Esp`): we send on the peer's
    /// SPI `spi_out` and receive on our own `spi_in`.
    pub fn new(
        spi_out: u32,
        key_out: &[u8],
        spi_in: u32,
        key_in: &[u8],
        aead: AeadAlg,
    ) -> Result<Self, KeyError> {
        Ok(Self {
            spi_out,
            spi_in,
            out: DirKey::new(aead, key_out)?,
            inb: DirKey::new(aead, key_in)?,
            next_seq: AtomicU64::new(1),
            iv_mask: 0,
            replay: Mutex::new(ReplayWindow::new()),
        })
    }

    /// Use IV = `mask` XOR sequence number (default mask 0: IV = sequence number). Any fixed
    /// mask keeps IVs unique within the SA; strongSwan's libipsec does the same with a random
    /// mask. Set it before the first [`seal`](Self::seal) and never change it afterwards.
    pub fn set_iv_mask(&mut self, mask: u64) {
        self.iv_mask = mask;
    }

    pub fn spi_out(&self) -> u32 {
        self.spi_out
    }

    pub fn spi_in(&self) -> u32 {
        self.spi_in
    }

    /// Continue the outbound sequence at `seq` (tests of exhaustion; never lower it on a
    /// live SA: a receiver would drop the repeats as replays).
    pub fn set_next_seq(&self, seq: u64) {
        self.next_seq.store(seq, Relaxed);
    }

    /// The sequence number the next [`seal`](Self::seal) will use.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.load(Relaxed)
    }

    /// The outbound sequence number is past [`SEQ_SOFT_LIMIT`]: rekey now, before
    /// [`SealError::SeqExhausted`].
    pub fn needs_rekey(&self) -> bool {
        self.next_seq() >= SEQ_SOFT_LIMIT
    }

    /// A copy of the inbound anti-replay window.
    pub fn replay_window(&self) -> ReplayWindow {
        self.window().clone()
    }

    fn window(&self) -> MutexGuard<'_, ReplayWindow> {
        self.replay.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Encrypt `inner_ip_packet` (IPv4 or IPv6, by its version nibble) into `out`; returns the
    /// ESP packet's length ([`sealed_len`]).
    pub fn seal(&self, inner_ip_packet: &[u8], out: &mut [u8]) -> Result<usize, SealError> {
        let nh = next_header_of(inner_ip_packet).ok_or(SealError::BadInnerPacket)?;
        self.seal_with(nh, inner_ip_packet, out)
    }

    /// Like [`seal`](Self::seal) with an explicit next header (e.g. [`NEXT_HEADER_DUMMY`] for
    /// a TFC dummy packet); `payload` may be empty.
    pub fn seal_with(
        &self,
        next_header: u8,
        payload: &[u8],
        out: &mut [u8],
    ) -> Result<usize, SealError> {
        if self.next_seq() > SEQ_HARD_LIMIT {
            return Err(SealError::SeqExhausted);
        }
        let total = sealed_len(payload.len());
        if out.len() < total {
            return Err(SealError::BufferTooSmall);
        }
        out[PAYLOAD_OFFSET..PAYLOAD_OFFSET + payload.len()].copy_from_slice(payload);
        self.seal_in_place_with(next_header, &mut out[..total], payload.len())
    }

    /// Zero-copy variant: the inner packet is already at `buf[PAYLOAD_OFFSET..][..inner_len]`
    /// and `buf` has room for [`sealed_len`]`(inner_len)` octets. The next header comes from
    /// the version nibble.
    pub fn seal_in_place(&self, buf: &mut [u8], inner_len: usize) -> Result<usize, SealError> {
        let inner = buf
            .get(PAYLOAD_OFFSET..PAYLOAD_OFFSET.saturating_add(inner_len))
            .ok_or(SealError::BufferTooSmall)?;
        let nh = next_header_of(inner).ok_or(SealError::BadInnerPacket)?;
        self.seal_in_place_with(nh, buf, inner_len)
    }

    /// [`seal_in_place`](Self::seal_in_place) with an explicit next header.
    pub fn seal_in_place_with(
        &self,
        next_header: u8,
        buf: &mut [u8],
        inner_len: usize,
    ) -> Result<usize, SealError> {
        let pad = pad_len(inner_len);
        let total = inner_len
            .checked_add(PAYLOAD_OFFSET + pad + 2 + ICV_LEN)
            .ok_or(SealError::BufferTooSmall)?;
        if buf.len() < total {
            return Err(SealError::BufferTooSmall);
        }
        // Each sequence number is taken once, also with several sealing threads.
        let seq = self.next_seq.fetch_add(1, Relaxed);
        if seq > SEQ_HARD_LIMIT {
            self.next_seq.store(SEQ_HARD_LIMIT + 1, Relaxed);
            return Err(SealError::SeqExhausted);
        }
        let iv = (seq ^ self.iv_mask).to_be_bytes();
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&self.spi_out.to_be_bytes());
        header[4..].copy_from_slice(&(seq as u32).to_be_bytes());

        buf[..HEADER_LEN].copy_from_slice(&header);
        buf[HEADER_LEN..PAYLOAD_OFFSET].copy_from_slice(&iv);
        let trailer = PAYLOAD_OFFSET + inner_len;
        buf[trailer..trailer + pad].copy_from_slice(&PAD_BYTES[..pad]);
        buf[trailer + pad] = pad as u8;
        buf[trailer + pad + 1] = next_header;
        let ct_end = trailer + pad + 2;

        let tag = self
            .out
            .key
            .seal_in_place_separate_tag(
                self.out.nonce(&iv),
                Aad::from(header),
                &mut buf[PAYLOAD_OFFSET..ct_end],
            )
            .map_err(|_| SealError::Crypto)?;
        buf[ct_end..ct_end + ICV_LEN].copy_from_slice(tag.as_ref());
        Ok(total)
    }

    /// Check, decrypt and verify an ESP packet (the UDP payload) into `out`; returns the inner
    /// packet's length (at `out[..len]`) and its next header (4 or 41).
    ///
    /// The anti-replay window is updated only once the ICV verifies. An authentic dummy packet
    /// (next header 59) is reported as [`OpenError::Dummy`] after the window update.
    pub fn open(&self, esp: &[u8], out: &mut [u8]) -> Result<(usize, u8), OpenError> {
        let (seq, ct) = self.precheck(esp)?;
        let ct_len = ct.len();
        if out.len() < ct_len {
            return Err(OpenError::BufferTooSmall);
        }
        out[..ct_len].copy_from_slice(ct);
        let icv = &esp[esp.len() - ICV_LEN..];
        self.decrypt(esp, seq, icv, &mut out[..ct_len], 0)
    }

    /// Zero-copy variant of [`open`](Self::open): decrypts inside `esp` (the plaintext moves
    /// to the front, over the header); on success the inner packet is `esp[range]`
    /// (currently always starting at 0).
    pub fn open_in_place(&self, esp: &mut [u8]) -> Result<(Range<usize>, u8), OpenError> {
        let (seq, _) = self.precheck(esp)?;
        let icv_at = esp.len() - ICV_LEN;
        let mut icv = [0u8; ICV_LEN];
        icv.copy_from_slice(&esp[icv_at..]);
        let mut header = [0u8; PAYLOAD_OFFSET];
        header.copy_from_slice(&esp[..PAYLOAD_OFFSET]);
        let (n, nh) = self.decrypt(&header, seq, &icv, &mut esp[..icv_at], PAYLOAD_OFFSET)?;
        Ok((0..n, nh))
    }

    /// Length, SPI and the cheap replay check; returns the sequence number and the ciphertext.
    fn precheck<'a>(&self, esp: &'a [u8]) -> Result<(u32, &'a [u8]), OpenError> {
        if esp.len() < MIN_PACKET_LEN {
            return Err(OpenError::Truncated);
        }
        let spi = u32::from_be_bytes([esp[0], esp[1], esp[2], esp[3]]);
        if spi != self.spi_in {
            return Err(OpenError::UnknownSpi);
        }
        let seq = u32::from_be_bytes([esp[4], esp[5], esp[6], esp[7]]);
        self.window().check(u64::from(seq))?;
        Ok((seq, &esp[PAYLOAD_OFFSET..esp.len() - ICV_LEN]))
    }

    /// Decrypt `buf[ct_start..]` to `buf[..]`; `head` starts with SPI | Seq | IV.
    fn decrypt(
        &self,
        head: &[u8],
        seq: u32,
        icv: &[u8],
        buf: &mut [u8],
        ct_start: usize,
    ) -> Result<(usize, u8), OpenError> {
        let mut aad = [0u8; HEADER_LEN];
        aad.copy_from_slice(&head[..HEADER_LEN]);
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&head[HEADER_LEN..PAYLOAD_OFFSET]);
        let tag = Tag::try_from(icv).map_err(|_| OpenError::Truncated)?;
        let pt_len = match self.inb.key.open_in_place_separate_tag(
            self.inb.nonce(&iv),
            Aad::from(aad),
            tag,
            buf,
            ct_start..,
        ) {
            Ok(pt) => pt.len(),
            Err(_) => {
                // Don't leave unauthenticated plaintext in the caller's buffer.
                buf.fill(0);
                return Err(OpenError::AuthFailed);
            }
        };
        // Authentic: now the window moves (RFC 4303 §3.4.3).
        self.window().accept(u64::from(seq))?;
        let pt = &buf[..pt_len];
        if pt_len < 2 {
            return Err(OpenError::BadPadding);
        }
        let nh = pt[pt_len - 1];
        let pad = usize::from(pt[pt_len - 2]);
        let inner_len = pt_len.checked_sub(pad + 2).ok_or(OpenError::BadPadding)?;
        let padding = &pt[inner_len..inner_len + pad];
        if !padding
            .iter()
            .enumerate()
            .all(|(i, &b)| usize::from(b) == i + 1)
        {
            return Err(OpenError::BadPadding);
        }
        match nh {
            NEXT_HEADER_IPV4 | NEXT_HEADER_IPV6 => Ok((inner_len, nh)),
            NEXT_HEADER_DUMMY => Err(OpenError::Dummy),
            _ => Err(OpenError::BadNextHeader),
        }
    }
}

/// The ESP next header for an IP packet, by its version nibble.
fn next_header_of(packet: &[u8]) -> Option<u8> {
    match packet.first()? >> 4 {
        4 => Some(NEXT_HEADER_IPV4),
        6 => Some(NEXT_HEADER_IPV6),
        _ => None,
    }
}

/// A packet's sequence number could not be accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayError {
    /// Already received.
    Replayed,
    /// Left of the window (or 0, which is never sent).
    TooOld,
}

impl ReplayError {
    /// Stable snake_case name, usable as a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            ReplayError::Replayed => "replayed",
            ReplayError::TooOld => "too_old",
        }
    }
}

/// Words in the replay bitmap; one more than the window needs (RFC 6479), so sliding only
/// ever clears whole words.
const REPLAY_WORDS: usize = 17;

/// Anti-replay window (RFC 4303 §3.4.3) over 64-bit sequence numbers (ESN-ready; without
/// ESN the caller passes the 32-bit number). A ring bitmap of u64 words as in RFC 6479: bit
/// `seq % (64 * REPLAY_WORDS)` records `seq`, and the window covers the last
/// [`ReplayWindow::SIZE`] numbers up to the highest one accepted.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// Highest sequence number accepted so far (0 = none).
    top: u64,
    bitmap: [u64; REPLAY_WORDS],
}

// RFC 4303 asks for at least 32, the brief for at least 1024.
const _: () = assert!(ReplayWindow::SIZE >= 1024);

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// Window size in packets: `top - SIZE + 1 ..= top` can still be accepted once.
    pub const SIZE: u64 = 64 * (REPLAY_WORDS as u64 - 1);

    pub const fn new() -> Self {
        Self {
            top: 0,
            bitmap: [0; REPLAY_WORDS],
        }
    }

    /// Highest sequence number accepted so far (0 before the first).
    pub fn top(&self) -> u64 {
        self.top
    }

    fn slot(seq: u64) -> (usize, u64) {
        let word = ((seq >> 6) % REPLAY_WORDS as u64) as usize;
        (word, 1u64 << (seq & 63))
    }

    /// Would `seq` be accepted? Changes nothing: run it before decrypting.
    pub fn check(&self, seq: u64) -> Result<(), ReplayError> {
        if seq == 0 {
            return Err(ReplayError::TooOld);
        }
        if seq > self.top {
            return Ok(());
        }
        if self.top - seq >= Self::SIZE {
            return Err(ReplayError::TooOld);
        }
        let (w, bit) = Self::slot(seq);
        if self.bitmap[w] & bit != 0 {
            Err(ReplayError::Replayed)
        } else {
            Ok(())
        }
    }

    /// Record `seq` (after its ICV verified): checks again, then slides the window if `seq`
    /// is new highest and marks it received.
    pub fn accept(&mut self, seq: u64) -> Result<(), ReplayError> {
        self.check(seq)?;
        if seq > self.top {
            let cur = self.top >> 6;
            let new = seq >> 6;
            let n = (new - cur).min(REPLAY_WORDS as u64);
            for i in 1..=n {
                self.bitmap[((cur + i) % REPLAY_WORDS as u64) as usize] = 0;
            }
            self.top = seq;
        }
        let (w, bit) = Self::slot(seq);
        self.bitmap[w] |= bit;
        Ok(())
    }
}

/// Is the decrypted inner packet allowed by the SA's remote traffic selectors? Its source
/// address must lie in one of them, and where a selector restricts the protocol or the ports,
/// so must the packet's protocol and source port (for ICMP/ICMPv6: type << 8 | code, RFC 7296
/// §3.13.1). Non-first fragments and truncated transport headers never match a selector that
/// restricts ports. Malformed packets are not allowed.
pub fn inner_allowed(packet: &[u8], remote_ts: &[TrafficSelector]) -> bool {
    let Some(info) = parse_inner(packet) else {
        return false;
    };
    remote_ts.iter().any(|ts| selector_matches(ts, &info))
}

struct InnerInfo {
    src: IpAddr,
    proto: u8,
    /// Source port (or ICMP type/code); `None` for non-first fragments or a short header.
    port: Option<u16>,
}

fn selector_matches(ts: &TrafficSelector, p: &InnerInfo) -> bool {
    let in_range = match (ts.start, ts.end, p.src) {
        (IpAddr::V4(s), IpAddr::V4(e), IpAddr::V4(a)) => s <= a && a <= e,
        (IpAddr::V6(s), IpAddr::V6(e), IpAddr::V6(a)) => s <= a && a <= e,
        _ => false,
    };
    if !in_range {
        return false;
    }
    if ts.ip_proto != 0 && ts.ip_proto != p.proto {
        return false;
    }
    if ts.start_port == 0 && ts.end_port == u16::MAX {
        return true;
    }
    match p.port {
        Some(port) => ts.start_port <= port && port <= ts.end_port,
        None => false,
    }
}

fn port_of(proto: u8, l4: &[u8]) -> Option<u16> {
    match proto {
        // TCP, UDP, SCTP, UDP-Lite, DCCP: source port first.
        6 | 17 | 132 | 136 | 33 if l4.len() >= 2 => Some(u16::from_be_bytes([l4[0], l4[1]])),
        // ICMP, ICMPv6: type, code.
        1 | 58 if l4.len() >= 2 => Some(u16::from_be_bytes([l4[0], l4[1]])),
        _ => None,
    }
}

fn parse_inner(p: &[u8]) -> Option<InnerInfo> {
    match p.first()? >> 4 {
        4 => {
            if p.len() < 20 {
                return None;
            }
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if ihl < 20 || p.len() < ihl {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
            let end = total.clamp(ihl, p.len());
            let proto = p[9];
            let frag_offset = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
            let src = IpAddr::V4(Ipv4Addr::new(p[12], p[13], p[14], p[15]));
            let port = if frag_offset == 0 {
                port_of(proto, &p[ihl..end])
            } else {
                None
            };
            Some(InnerInfo { src, proto, port })
        }
        6 => {
            if p.len() < 40 {
                return None;
            }
            let mut a = [0u8; 16];
            a.copy_from_slice(&p[8..24]);
            let src = IpAddr::V6(Ipv6Addr::from(a));
            let mut nh = p[6];
            let mut at = 40usize;
            let mut first_fragment = true;
            // Skip extension headers (bounded).
            for _ in 0..8 {
                let ext = p.get(at..);
                match nh {
                    0 | 43 | 60 => {
                        let h = ext?;
                        if h.len() < 2 {
                            return None;
                        }
                        nh = h[0];
                        at += (usize::from(h[1]) + 1) * 8;
                    }
                    44 => {
                        let h = ext?;
                        if h.len() < 8 {
                            return None;
                        }
                        nh = h[0];
                        if u16::from_be_bytes([h[2], h[3]]) >> 3 != 0 {
                            first_fragment = false;
                        }
                        at += 8;
                    }
                    51 => {
                        let h = ext?;
                        if h.len() < 2 {
                            return None;
                        }
                        nh = h[0];
                        at += (usize::from(h[1]) + 2) * 4;
                    }
                    _ => break,
                }
            }
            let port = match p.get(at..) {
                Some(l4) if first_fragment => port_of(nh, l4),
                _ => None,
            };
            Some(InnerInfo {
                src,
                proto: nh,
                port,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w() -> ReplayWindow {
        ReplayWindow::new()
    }

    #[test]
    fn esp_replay_in_order() {
        let mut r = w();
        for s in 1..=5000u64 {
            assert_eq!(r.check(s), Ok(()));
            assert_eq!(r.accept(s), Ok(()));
            assert_eq!(r.top(), s);
            assert_eq!(r.check(s), Err(ReplayError::Replayed));
        }
    }

    #[test]
    fn esp_replay_zero_never_valid() {
        let mut r = w();
        assert_eq!(r.check(0), Err(ReplayError::TooOld));
        assert_eq!(r.accept(0), Err(ReplayError::TooOld));
        r.accept(7).unwrap();
        assert_eq!(r.accept(0), Err(ReplayError::TooOld));
    }

    #[test]
    fn esp_replay_reorder_within_window() {
        let mut r = w();
        r.accept(1000).unwrap();
        // Everything from 1000 - SIZE + 1 up is still acceptable, once.
        for s in (1..1000).rev() {
            assert_eq!(r.accept(s), Ok(()), "seq {s}");
        }
        for s in 1..=1000 {
            assert_eq!(r.check(s), Err(ReplayError::Replayed), "seq {s}");
        }
        assert_eq!(r.top(), 1000);
    }

    #[test]
    fn esp_replay_window_edges() {
        let mut r = w();
        let top = 10_000u64;
        r.accept(top).unwrap();
        let oldest = top - ReplayWindow::SIZE + 1;
        assert_eq!(r.check(oldest - 1), Err(ReplayError::TooOld));
        assert_eq!(r.accept(oldest), Ok(()));
        assert_eq!(r.accept(oldest), Err(ReplayError::Replayed));
    }

    #[test]
    fn esp_replay_duplicates_out_of_order() {
        let mut r = w();
        for s in [5u64, 3, 9, 4, 1, 2, 8, 6, 7] {
            r.accept(s).unwrap();
        }
        for s in 1..=9 {
            assert_eq!(r.accept(s), Err(ReplayError::Replayed));
        }
        assert_eq!(r.accept(10), Ok(()));
    }

    #[test]
    fn esp_replay_too_old_after_jump() {
        let mut r = w();
        r.accept(1).unwrap();
        r.accept(2).unwrap();
        r.accept(2 + ReplayWindow::SIZE).unwrap();
        // 2 is exactly SIZE behind: out of the window.
        assert_eq!(r.check(2), Err(ReplayError::TooOld));
        assert_eq!(r.check(1), Err(ReplayError::TooOld));
        // 3 is inside and was never seen.
        assert_eq!(r.accept(3), Ok(()));
    }

    #[test]
    fn esp_replay_big_jumps_clear_stale_bits() {
        let mut r = w();
        // Fill the whole bitmap.
        for s in 1..=2000u64 {
            r.accept(s).unwrap();
        }
        // Jumps of every size: numbers inside the new window that were never seen must be
        // accepted (stale bits from earlier laps cleared), seen ones refused.
        let mut top = 2000u64;
        for jump in [
            1u64,
            63,
            64,
            65,
            127,
            500,
            1023,
            1024,
            1025,
            1088,
            1089,
            5000,
            1 << 40,
        ] {
            let new = top + jump;
            r.accept(new).unwrap();
            for back in 1..ReplayWindow::SIZE.min(jump) {
                assert_eq!(r.check(new - back), Ok(()), "jump {jump} back {back}");
            }
            for back in jump..ReplayWindow::SIZE {
                assert_eq!(
                    r.check(new - back),
                    Err(ReplayError::Replayed),
                    "jump {jump} back {back}"
                );
            }
            // Mark the gap as seen again so the next round starts from a full window.
            for back in 1..ReplayWindow::SIZE.min(jump) {
                r.accept(new - back).unwrap();
            }
            top = new;
        }
    }

    #[test]
    fn esp_replay_bitmap_wraps_many_laps() {
        let mut r = w();
        let lap = 64 * REPLAY_WORDS as u64;
        // Accept only even numbers for many laps of the ring; odd ones within the window stay
        // acceptable, even ones are replays.
        for s in (2..=20 * lap).step_by(2) {
            r.accept(s).unwrap();
        }
        let top = r.top();
        for back in 0..ReplayWindow::SIZE {
            let s = top - back;
            let want = if s.is_multiple_of(2) {
                Err(ReplayError::Replayed)
            } else {
                Ok(())
            };
            assert_eq!(r.check(s), want, "seq {s}");
        }
        assert_eq!(r.check(top - ReplayWindow::SIZE), Err(ReplayError::TooOld));
    }

    #[test]
    fn esp_replay_u64_range() {
        let mut r = w();
        r.accept(u64::MAX - 5).unwrap();
        r.accept(u64::MAX).unwrap();
        assert_eq!(r.accept(u64::MAX), Err(ReplayError::Replayed));
        assert_eq!(r.accept(u64::MAX - 1), Ok(()));
        assert_eq!(r.check(1), Err(ReplayError::TooOld));
    }

    #[test]
    fn esp_padding_lengths() {
        assert_eq!(pad_len(84), 2);
        assert_eq!(pad_len(0), 2);
        assert_eq!(pad_len(1), 1);
        assert_eq!(pad_len(2), 0);
        assert_eq!(pad_len(3), 3);
        assert_eq!(sealed_len(84), 16 + 84 + 2 + 2 + 16);
    }

    fn sa_pair(alg: AeadAlg) -> (EspSa, EspSa) {
        let n = alg.keymat_len();
        let k1: Vec<u8> = (0..n as u8).collect();
        let k2: Vec<u8> = (0..n as u8).map(|b| b ^ 0x5a).collect();
        let a = EspSa::new(0x1111, &k1, 0x2222, &k2, alg).unwrap();
        let b = EspSa::new(0x2222, &k2, 0x1111, &k1, alg).unwrap();
        (a, b)
    }

    #[test]
    fn esp_key_errors() {
        let alg = AeadAlg::AesGcm16 { key_bits: 256 };
        assert_eq!(
            EspSa::new(1, &[0; 35], 2, &[0; 36], alg).unwrap_err(),
            KeyError::BadKeyLength
        );
        assert_eq!(
            EspSa::new(
                1,
                &[0; 28],
                2,
                &[0; 28],
                AeadAlg::AesGcm16 { key_bits: 192 }
            )
            .unwrap_err(),
            KeyError::UnsupportedAlg
        );
    }

    fn ipv4(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len.max(20)];
        p[0] = 0x45;
        p
    }

    #[test]
    fn esp_seal_open_and_errors() {
        for alg in [
            AeadAlg::AesGcm16 { key_bits: 128 },
            AeadAlg::AesGcm16 { key_bits: 256 },
            AeadAlg::ChaCha20Poly1305,
        ] {
            let (a, b) = sa_pair(alg);
            let inner = ipv4(84);
            let mut buf = [0u8; 2048];
            let mut out = [0u8; 2048];
            let n = a.seal(&inner, &mut buf).unwrap();
            assert_eq!(n, sealed_len(84));
            assert_eq!(&buf[..4], &0x1111u32.to_be_bytes());
            assert_eq!(&buf[4..8], &1u32.to_be_bytes());
            assert_eq!(&buf[8..16], &1u64.to_be_bytes());
            let (m, nh) = b.open(&buf[..n], &mut out).unwrap();
            assert_eq!((&out[..m], nh), (&inner[..], 4));
            assert_eq!(b.open(&buf[..n], &mut out), Err(OpenError::Replayed));
            // Wrong direction.
            assert_eq!(a.open(&buf[..n], &mut out), Err(OpenError::UnknownSpi));
            // Small buffers.
            assert_eq!(
                a.seal(&inner, &mut buf[..n - 1]),
                Err(SealError::BufferTooSmall)
            );
            let n2 = a.seal(&inner, &mut buf).unwrap();
            assert_eq!(
                b.open(&buf[..n2], &mut out[..10]),
                Err(OpenError::BufferTooSmall)
            );
            assert_eq!(b.open(&buf[..10], &mut out), Err(OpenError::Truncated));
            // Not IP.
            assert_eq!(
                a.seal(&[0x10; 30], &mut buf),
                Err(SealError::BadInnerPacket)
            );
            assert_eq!(a.seal(&[], &mut buf), Err(SealError::BadInnerPacket));
            // Dummy.
            let n3 = a.seal_with(NEXT_HEADER_DUMMY, &[], &mut buf).unwrap();
            assert_eq!(b.open(&buf[..n3], &mut out), Err(OpenError::Dummy));
            assert_eq!(b.open(&buf[..n3], &mut out), Err(OpenError::Replayed));
            // Unknown next header.
            let n4 = a.seal_with(17, &[1, 2, 3], &mut buf).unwrap();
            assert_eq!(b.open(&buf[..n4], &mut out), Err(OpenError::BadNextHeader));
            // In place.
            let mut pkt = vec![0u8; 2048];
            let n5 = a.seal(&inner, &mut pkt).unwrap();
            let (r, nh) = b.open_in_place(&mut pkt[..n5]).unwrap();
            assert_eq!((&pkt[r], nh), (&inner[..], 4));
            pkt[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 84].copy_from_slice(&inner);
            let n6 = a.seal_in_place(&mut pkt, 84).unwrap();
            let (m, _) = b.open(&pkt[..n6], &mut out).unwrap();
            assert_eq!(&out[..m], &inner[..]);
        }
    }

    /// Seal a plaintext built by hand (bad padding) with the SA's outbound key.
    fn seal_raw(sa: &EspSa, pt: &[u8], buf: &mut [u8]) -> usize {
        let seq = sa.next_seq.fetch_add(1, Relaxed);
        let iv = seq.to_be_bytes();
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&sa.spi_out.to_be_bytes());
        header[4..].copy_from_slice(&(seq as u32).to_be_bytes());
        buf[..8].copy_from_slice(&header);
        buf[8..16].copy_from_slice(&iv);
        buf[16..16 + pt.len()].copy_from_slice(pt);
        let tag = sa
            .out
            .key
            .seal_in_place_separate_tag(
                sa.out.nonce(&iv),
                Aad::from(header),
                &mut buf[16..16 + pt.len()],
            )
            .unwrap();
        buf[16 + pt.len()..32 + pt.len()].copy_from_slice(tag.as_ref());
        32 + pt.len()
    }

    #[test]
    fn esp_open_checks_padding() {
        let (a, b) = sa_pair(AeadAlg::ChaCha20Poly1305);
        let mut buf = [0u8; 256];
        let mut out = [0u8; 256];
        let mut pt = ipv4(20);
        pt.extend_from_slice(&[1, 3, 2, 4]); // pad octets 1, 3: wrong
        let n = seal_raw(&a, &pt, &mut buf);
        assert_eq!(b.open(&buf[..n], &mut out), Err(OpenError::BadPadding));
        // Authentic, so the window moved anyway.
        assert_eq!(b.open(&buf[..n], &mut out), Err(OpenError::Replayed));
        let n = seal_raw(&a, &[9, 4], &mut buf); // pad length 9 > 0 octets
        assert_eq!(b.open(&buf[..n], &mut out), Err(OpenError::BadPadding));
        let n = seal_raw(&a, &[4], &mut buf); // one octet only
        assert_eq!(b.open(&buf[..n], &mut out), Err(OpenError::Truncated));
        let mut ok = ipv4(21);
        ok.extend_from_slice(&[1, 1, 4]);
        let n = seal_raw(&a, &ok, &mut buf);
        assert_eq!(b.open(&buf[..n], &mut out).map(|x| x.0), Ok(21));
    }

    #[test]
    fn esp_tamper_fails_without_moving_window() {
        let (a, b) = sa_pair(AeadAlg::AesGcm16 { key_bits: 256 });
        let mut buf = [0u8; 256];
        let mut out = [0u8; 256];
        let n = a.seal(&ipv4(40), &mut buf).unwrap();
        for i in 0..n {
            let mut t = buf;
            t[i] ^= 0x01;
            assert!(b.open(&t[..n], &mut out).is_err(), "byte {i}");
        }
        assert_eq!(b.replay_window().top(), 0);
        assert!(b.open(&buf[..n], &mut out).is_ok());
    }

    #[test]
    fn esp_sequence_limits() {
        let (a, b) = sa_pair(AeadAlg::ChaCha20Poly1305);
        let mut buf = [0u8; 256];
        let mut out = [0u8; 256];
        assert!(!a.needs_rekey());
        a.set_next_seq(SEQ_SOFT_LIMIT);
        assert!(a.needs_rekey());
        a.set_next_seq(SEQ_HARD_LIMIT);
        let n = a.seal(&ipv4(20), &mut buf).unwrap();
        assert_eq!(&buf[4..8], &[0xff; 4]);
        assert_eq!(a.seal(&ipv4(20), &mut buf), Err(SealError::SeqExhausted));
        assert_eq!(a.seal(&ipv4(20), &mut buf), Err(SealError::SeqExhausted));
        assert_eq!(b.open(&buf[..n], &mut out).map(|x| x.0), Ok(20));
    }

    #[test]
    fn esp_iv_mask() {
        let (mut a, b) = sa_pair(AeadAlg::AesGcm16 { key_bits: 256 });
        a.set_iv_mask(0xfa95_3251_7e6e_4bf3);
        let mut buf = [0u8; 256];
        let mut out = [0u8; 256];
        let n = a.seal(&ipv4(20), &mut buf).unwrap();
        assert_eq!(&buf[8..16], &0xfa95_3251_7e6e_4bf2u64.to_be_bytes());
        assert!(b.open(&buf[..n], &mut out).is_ok());
    }

    #[test]
    fn esp_error_kinds_unique() {
        let mut k: Vec<&str> = OpenError::ALL.iter().map(|e| e.kind()).collect();
        k.sort();
        k.dedup();
        assert_eq!(k.len(), OpenError::ALL.len());
        let mut k: Vec<&str> = SealError::ALL.iter().map(|e| e.kind()).collect();
        k.sort();
        k.dedup();
        assert_eq!(k.len(), SealError::ALL.len());
    }

    fn ts4(a: [u8; 4], b: [u8; 4], proto: u8, ports: (u16, u16)) -> TrafficSelector {
        TrafficSelector {
            ip_proto: proto,
            start_port: ports.0,
            end_port: ports.1,
            start: IpAddr::from(a),
            end: IpAddr::from(b),
        }
    }

    fn v4_packet(src: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        let total = (20 + l4.len()) as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[9] = proto;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&[10, 211, 1, 1]);
        p.extend_from_slice(l4);
        p
    }

    #[test]
    fn esp_inner_allowed_v4() {
        let any = [ts4([10, 211, 2, 0], [10, 211, 2, 255], 0, (0, 65535))];
        let icmp = v4_packet([10, 211, 2, 1], 1, &[0, 0, 0, 0]);
        assert!(inner_allowed(&icmp, &any));
        assert!(!inner_allowed(
            &v4_packet([10, 211, 3, 1], 1, &[0; 4]),
            &any
        ));
        assert!(!inner_allowed(&icmp, &[]));
        assert!(!inner_allowed(&icmp[..19], &any));
        assert!(!inner_allowed(&[], &any));

        let udp53 = [ts4([10, 211, 2, 0], [10, 211, 2, 255], 17, (53, 53))];
        let dns = v4_packet([10, 211, 2, 9], 17, &[0, 53, 0x30, 0x39, 0, 8, 0, 0]);
        let other = v4_packet([10, 211, 2, 9], 17, &[0x30, 0x39, 0, 53, 0, 8, 0, 0]);
        let tcp = v4_packet([10, 211, 2, 9], 6, &[0, 53, 0, 53]);
        assert!(inner_allowed(&dns, &udp53));
        assert!(!inner_allowed(&other, &udp53));
        assert!(!inner_allowed(&tcp, &udp53));
        // Non-first fragment: ports unknown.
        let mut frag = dns.clone();
        frag[7] = 10;
        assert!(!inner_allowed(&frag, &udp53));
        // Protocol-only selector still matches a fragment.
        assert!(inner_allowed(
            &frag,
            &[ts4([10, 211, 2, 0], [10, 211, 2, 255], 17, (0, 65535))]
        ));
        // Truncated UDP header.
        assert!(!inner_allowed(
            &v4_packet([10, 211, 2, 9], 17, &[0]),
            &udp53
        ));
        // ICMP echo request: type 8 code 0 => 0x0800.
        let echo = [ts4([10, 211, 2, 0], [10, 211, 2, 255], 1, (0x0800, 0x0800))];
        assert!(inner_allowed(
            &v4_packet([10, 211, 2, 1], 1, &[8, 0, 0, 0]),
            &echo
        ));
        assert!(!inner_allowed(
            &v4_packet([10, 211, 2, 1], 1, &[0, 0, 0, 0]),
            &echo
        ));
        // Family mismatch.
        let v6 = TrafficSelector {
            ip_proto: 0,
            start_port: 0,
            end_port: 65535,
            start: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            end: IpAddr::V6(Ipv6Addr::from(u128::MAX)),
        };
        assert!(!inner_allowed(&icmp, &[v6]));
    }

    #[test]
    fn esp_inner_allowed_v6() {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[6] = 44; // fragment header
        let src: Ipv6Addr = "fd00::5".parse().unwrap();
        p[8..24].copy_from_slice(&src.octets());
        p.extend_from_slice(&[17, 0, 0, 0, 0, 0, 0, 1]); // first fragment, UDP
        p.extend_from_slice(&[0x01, 0xbb, 0, 0, 0, 8, 0, 0]);
        let ts = TrafficSelector {
            ip_proto: 17,
            start_port: 443,
            end_port: 443,
            start: "fd00::".parse().unwrap(),
            end: "fd00::ffff".parse().unwrap(),
        };
        assert!(inner_allowed(&p, &[ts]));
        let mut later = p.clone();
        later[42] = 0x01; // offset != 0
        assert!(!inner_allowed(&later, &[ts]));
        let mut other = p.clone();
        other[8] = 0xfe;
        assert!(!inner_allowed(&other, &[ts]));
        assert!(!inner_allowed(&p[..39], &[ts]));
    }
}
