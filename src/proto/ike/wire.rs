//! IKEv2 wire codec (RFC 7296 §3): header, generic payload chain, and the payload bodies
//! sitewire needs. Pure byte manipulation: no I/O, clock or randomness.
//!
//! Decoding never panics. Every length field is checked against the bytes actually present,
//! and counts are capped, so a hostile message costs at most O(len) work and memory.
//! Malformed input yields a [`DecodeError`], whose [`DecodeError::kind`] is a stable
//! `&'static str` usable as a metrics label.
//!
//! Encoding writes exactly what strongSwan 5.9.8 writes for the same values (verified
//! byte-for-byte against the captured vectors in `shared/interop/vectors/`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Length of the fixed IKE header (§3.1).
pub const HEADER_LEN: usize = 28;
/// The four zero octets in front of an IKE message on port 4500 (RFC 3948 §2.2).
pub const NON_ESP_MARKER_LEN: usize = 4;
/// Length of the generic payload header (§3.2).
pub const GENERIC_HEADER_LEN: usize = 4;
/// Largest IKE message accepted or produced (the IKE Length field of anything bigger is refused).
pub const MAX_MESSAGE_LEN: usize = 65_535;
/// Most payloads in one chain (strongSwan sends at most ~13).
pub const MAX_PAYLOADS: usize = 128;
/// Most proposals in one SA payload, transforms in one proposal, and selectors in one TS payload.
pub const MAX_PROPOSALS: usize = 64;
pub const MAX_TRANSFORMS: usize = 64;
pub const MAX_SELECTORS: usize = 64;
/// IKE version octet: major 2, minor 0.
pub const VERSION_2_0: u8 = 0x20;

/// Exchange types (§3.1; RFC 9242 for IKE_INTERMEDIATE, RFC 9370 for IKE_FOLLOWUP_KE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeType {
    IkeSaInit,
    IkeAuth,
    CreateChildSa,
    Informational,
    IkeIntermediate,
    IkeFollowupKe,
    Other(u8),
}

impl ExchangeType {
    pub fn to_u8(self) -> u8 {
        match self {
            ExchangeType::IkeSaInit => 34,
            ExchangeType::IkeAuth => 35,
            ExchangeType::CreateChildSa => 36,
            ExchangeType::Informational => 37,
            ExchangeType::IkeIntermediate => 43,
            ExchangeType::IkeFollowupKe => 44,
            ExchangeType::Other(v) => v,
        }
    }

    pub fn from_u8(v: u8) -> Self {
        match v {
            34 => ExchangeType::IkeSaInit,
            35 => ExchangeType::IkeAuth,
            36 => ExchangeType::CreateChildSa,
            37 => ExchangeType::Informational,
            43 => ExchangeType::IkeIntermediate,
            44 => ExchangeType::IkeFollowupKe,
            other => ExchangeType::Other(other),
        }
    }
}

/// Header flags (§3.1).
pub mod flags {
    /// Set in every message sent by the original initiator of the IKE SA.
    pub const INITIATOR: u8 = 0x08;
    /// Version bit: must be 0 for IKEv2.
    pub const VERSION: u8 = 0x10;
    /// Set in responses.
    pub const RESPONSE: u8 = 0x20;
}

/// Payload type codes (§3.2; RFC 7383 for SKF).
pub mod payload_type {
    pub const NONE: u8 = 0;
    pub const SA: u8 = 33;
    pub const KE: u8 = 34;
    pub const IDI: u8 = 35;
    pub const IDR: u8 = 36;
    pub const CERT: u8 = 37;
    pub const CERTREQ: u8 = 38;
    pub const AUTH: u8 = 39;
    pub const NONCE: u8 = 40;
    pub const NOTIFY: u8 = 41;
    pub const DELETE: u8 = 42;
    pub const VENDOR: u8 = 43;
    pub const TSI: u8 = 44;
    pub const TSR: u8 = 45;
    pub const SK: u8 = 46;
    pub const CP: u8 = 47;
    pub const EAP: u8 = 48;
    pub const SKF: u8 = 53;
}

/// Transform types (§3.3.2; RFC 9370 §2.2.1 for the additional key exchanges).
pub mod transform_type {
    pub const ENCR: u8 = 1;
    pub const PRF: u8 = 2;
    pub const INTEG: u8 = 3;
    /// "Diffie-Hellman group", renamed "Key Exchange Method" by RFC 9370.
    pub const KE: u8 = 4;
    pub const ESN: u8 = 5;
    pub const ADDKE1: u8 = 6;
    pub const ADDKE2: u8 = 7;
    pub const ADDKE3: u8 = 8;
    pub const ADDKE4: u8 = 9;
    pub const ADDKE5: u8 = 10;
    pub const ADDKE6: u8 = 11;
    pub const ADDKE7: u8 = 12;
}

/// Assigned numbers used by sitewire (IANA "IKEv2 Parameters").
pub mod ids {
    /// ENCR (transform type 1): RFC 5282.
    pub const ENCR_AES_GCM_16: u16 = 20;
    /// ENCR: RFC 7634.
    pub const ENCR_CHACHA20_POLY1305: u16 = 28;
    /// PRF (transform type 2): RFC 4868.
    pub const PRF_HMAC_SHA2_256: u16 = 5;
    /// Key exchange method (transform types 4, 6..12): RFC 8031.
    pub const DH_CURVE25519: u16 = 31;
    /// Key exchange method "ML-KEM-768" (IANA; draft-ietf-ipsecme-ikev2-mlkem).
    pub const KE_ML_KEM_768: u16 = 36;
    /// Key exchange method NONE: only in ADDKE transforms ("this additional exchange is optional").
    pub const KE_NONE: u16 = 0;
    pub const ESN_NONE: u16 = 0;
    pub const ESN_YES: u16 = 1;
    /// Security protocol IDs (§3.3.1).
    pub const PROTO_IKE: u8 = 1;
    pub const PROTO_AH: u8 = 2;
    pub const PROTO_ESP: u8 = 3;
    /// ID types (§3.5).
    pub const ID_IPV4: u8 = 1;
    pub const ID_FQDN: u8 = 2;
    pub const ID_RFC822: u8 = 3;
    pub const ID_IPV6: u8 = 5;
    pub const ID_DER_ASN1_DN: u8 = 9;
    pub const ID_KEY_ID: u8 = 11;
    /// AUTH method (§3.8): Shared Key Message Integrity Code.
    pub const AUTH_PSK: u8 = 2;
    /// Traffic selector types (§3.13.1).
    pub const TS_IPV4_RANGE: u8 = 7;
    pub const TS_IPV6_RANGE: u8 = 8;
    /// Transform attribute KEY_LENGTH (§3.3.5), always in TV format.
    pub const ATTR_KEY_LENGTH: u16 = 14;
}

/// Notify message types (§3.10.1 and the RFCs named).
pub mod notify {
    pub const UNSUPPORTED_CRITICAL_PAYLOAD: u16 = 1;
    pub const INVALID_IKE_SPI: u16 = 4;
    pub const INVALID_MAJOR_VERSION: u16 = 5;
    pub const INVALID_SYNTAX: u16 = 7;
    pub const INVALID_MESSAGE_ID: u16 = 9;
    pub const INVALID_SPI: u16 = 11;
    pub const NO_PROPOSAL_CHOSEN: u16 = 14;
    pub const INVALID_KE_PAYLOAD: u16 = 17;
    pub const AUTHENTICATION_FAILED: u16 = 24;
    pub const SINGLE_PAIR_REQUIRED: u16 = 34;
    pub const NO_ADDITIONAL_SAS: u16 = 35;
    pub const INTERNAL_ADDRESS_FAILURE: u16 = 36;
    pub const FAILED_CP_REQUIRED: u16 = 37;
    pub const TS_UNACCEPTABLE: u16 = 38;
    pub const INVALID_SELECTORS: u16 = 39;
    pub const TEMPORARY_FAILURE: u16 = 43;
    pub const CHILD_SA_NOT_FOUND: u16 = 44;
    /// Status types start here; unknown ones must be ignored.
    pub const FIRST_STATUS: u16 = 16384;
    pub const INITIAL_CONTACT: u16 = 16384;
    pub const NAT_DETECTION_SOURCE_IP: u16 = 16388;
    pub const NAT_DETECTION_DESTINATION_IP: u16 = 16389;
    pub const COOKIE: u16 = 16390;
    pub const USE_TRANSPORT_MODE: u16 = 16391;
    pub const REKEY_SA: u16 = 16393;
    pub const ESP_TFC_PADDING_NOT_SUPPORTED: u16 = 16394;
    pub const NON_FIRST_FRAGMENTS_ALSO: u16 = 16395;
    /// RFC 4555.
    pub const MOBIKE_SUPPORTED: u16 = 16396;
    pub const NO_ADDITIONAL_ADDRESSES: u16 = 16399;
    /// RFC 4739.
    pub const MULTIPLE_AUTH_SUPPORTED: u16 = 16404;
    /// RFC 5685.
    pub const REDIRECT_SUPPORTED: u16 = 16406;
    /// RFC 5998.
    pub const EAP_ONLY_AUTHENTICATION: u16 = 16417;
    /// RFC 6023.
    pub const CHILDLESS_IKEV2_SUPPORTED: u16 = 16418;
    /// RFC 6311.
    pub const IKEV2_MESSAGE_ID_SYNC_SUPPORTED: u16 = 16420;
    /// RFC 7383.
    pub const IKEV2_FRAGMENTATION_SUPPORTED: u16 = 16430;
    /// RFC 7427.
    pub const SIGNATURE_HASH_ALGORITHMS: u16 = 16431;
    /// RFC 9242 §3.1.
    pub const INTERMEDIATE_EXCHANGE_SUPPORTED: u16 = 16438;
    /// RFC 9370 §3.2.
    pub const ADDITIONAL_KEY_EXCHANGE: u16 = 16441;
}

/// Why a message (or payload chain) could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer octets than a fixed-size field or header needs.
    Truncated,
    /// The IKE header's Length differs from the datagram, or is below 28.
    BadLength,
    /// Major version is not 2 (answer INVALID_MAJOR_VERSION).
    BadVersion,
    /// A generic payload header's Payload Length is below 4 or runs past the data.
    BadPayloadLength,
    /// A payload body is shorter than its fixed part (e.g. a KE payload under 4 octets).
    ShortBody,
    /// Octets left after the payload whose Next Payload is 0.
    TrailingBytes,
    /// An SK (or SKF) payload that is not the last payload.
    SkNotLast,
    /// An SK payload inside an Encrypted payload.
    NestedSk,
    /// More than [`MAX_PAYLOADS`] payloads, or too many proposals/transforms/selectors.
    TooManyPayloads,
    /// Traffic selector of an unknown type, wrong length, or a count that doesn't match.
    BadTrafficSelector,
    /// Proposal or transform substructure malformed (lengths, counts, last-substructure flags).
    BadProposal,
    /// Malformed transform attribute (TLV overrunning, KEY_LENGTH twice).
    BadAttribute,
    /// Notify SPI size runs past the payload.
    BadNotify,
    /// Delete payload whose SPI count and size don't fill the body exactly.
    BadDelete,
    /// Message larger than [`MAX_MESSAGE_LEN`].
    TooLarge,
    /// Encrypted payload: pad length larger than the plaintext.
    BadPadding,
}

impl DecodeError {
    /// Stable snake_case name, usable as a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Truncated => "truncated",
            DecodeError::BadLength => "bad_length",
            DecodeError::BadVersion => "bad_version",
            DecodeError::BadPayloadLength => "bad_payload_length",
            DecodeError::ShortBody => "short_body",
            DecodeError::TrailingBytes => "trailing_bytes",
            DecodeError::SkNotLast => "sk_not_last",
            DecodeError::NestedSk => "nested_sk",
            DecodeError::TooManyPayloads => "too_many_payloads",
            DecodeError::BadTrafficSelector => "bad_traffic_selector",
            DecodeError::BadProposal => "bad_proposal",
            DecodeError::BadAttribute => "bad_attribute",
            DecodeError::BadNotify => "bad_notify",
            DecodeError::BadDelete => "bad_delete",
            DecodeError::TooLarge => "too_large",
            DecodeError::BadPadding => "bad_padding",
        }
    }

    /// Every variant, for pre-registering counter labels.
    pub const ALL: [DecodeError; 16] = [
        DecodeError::Truncated,
        DecodeError::BadLength,
        DecodeError::BadVersion,
        DecodeError::BadPayloadLength,
        DecodeError::ShortBody,
        DecodeError::TrailingBytes,
        DecodeError::SkNotLast,
        DecodeError::NestedSk,
        DecodeError::TooManyPayloads,
        DecodeError::BadTrafficSelector,
        DecodeError::BadProposal,
        DecodeError::BadAttribute,
        DecodeError::BadNotify,
        DecodeError::BadDelete,
        DecodeError::TooLarge,
        DecodeError::BadPadding,
    ];
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed IKE message: {}", self.kind())
    }
}

impl std::error::Error for DecodeError {}

/// The fixed IKE header (§3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub spi_i: u64,
    pub spi_r: u64,
    pub next_payload: u8,
    /// Major version in the high nibble (2), minor in the low one (0 on send, ignored on receipt).
    pub version: u8,
    pub exchange: ExchangeType,
    pub flags: u8,
    pub message_id: u32,
    pub length: u32,
}

impl Header {
    pub fn is_response(&self) -> bool {
        self.flags & flags::RESPONSE != 0
    }

    /// The message was sent by the original initiator of the IKE SA (I flag).
    pub fn from_initiator(&self) -> bool {
        self.flags & flags::INITIATOR != 0
    }

    /// Decode the first 28 octets. Does not check `length` against anything (see [`Message::decode`]).
    pub fn decode(b: &[u8]) -> Result<Header, DecodeError> {
        let h: &[u8; HEADER_LEN] = b
            .get(..HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(DecodeError::Truncated)?;
        let version = h[17];
        if version >> 4 != 2 {
            return Err(DecodeError::BadVersion);
        }
        Ok(Header {
            spi_i: u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]),
            spi_r: u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]),
            next_payload: h[16],
            version,
            exchange: ExchangeType::from_u8(h[18]),
            flags: h[19],
            message_id: u32::from_be_bytes([h[20], h[21], h[22], h[23]]),
            length: u32::from_be_bytes([h[24], h[25], h[26], h[27]]),
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.spi_i.to_be_bytes());
        out.extend_from_slice(&self.spi_r.to_be_bytes());
        out.push(self.next_payload);
        out.push(self.version);
        out.push(self.exchange.to_u8());
        out.push(self.flags);
        out.extend_from_slice(&self.message_id.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }
}

/// One transform (§3.3.2). `key_len` is the KEY_LENGTH attribute in bits (§3.3.5), if present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transform {
    pub ty: u8,
    pub id: u16,
    pub key_len: Option<u16>,
}

/// One proposal (§3.3.1).
///
/// Decoding note: a proposal with a transform carrying an attribute other than KEY_LENGTH is
/// unacceptable to us (§3.3.6) and is left out of the decoded SA payload, as if not offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub num: u8,
    pub protocol: u8,
    pub spi: Vec<u8>,
    pub transforms: Vec<Transform>,
}

impl Proposal {
    /// Transforms of one type, in the order offered.
    pub fn of_type(&self, ty: u8) -> impl Iterator<Item = &Transform> {
        self.transforms.iter().filter(move |t| t.ty == ty)
    }
}

/// An ID payload body (§3.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub ty: u8,
    pub data: Vec<u8>,
}

impl Identity {
    /// The body from the ID Type octet on (`[ty, 0, 0, 0] | data`): "RestOfIDPayload" in AUTH (§2.15).
    pub fn body(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(4 + self.data.len());
        v.extend_from_slice(&[self.ty, 0, 0, 0]);
        v.extend_from_slice(&self.data);
        v
    }

    pub fn fqdn(name: &str) -> Self {
        Identity {
            ty: ids::ID_FQDN,
            data: name.as_bytes().to_vec(),
        }
    }
}

/// A Notify payload body (§3.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notify {
    pub protocol: u8,
    pub spi: Vec<u8>,
    pub ty: u16,
    pub data: Vec<u8>,
}

impl Notify {
    /// A notify about the IKE SA (protocol 0, no SPI).
    pub fn new(ty: u16, data: &[u8]) -> Self {
        Notify {
            protocol: 0,
            spi: Vec::new(),
            ty,
            data: data.to_vec(),
        }
    }

    /// Error types are below 16384 (§3.10.1).
    pub fn is_error(&self) -> bool {
        self.ty < notify::FIRST_STATUS
    }
}

/// A Delete payload body (§3.11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub protocol: u8,
    pub spi_size: u8,
    pub spis: Vec<Vec<u8>>,
}

/// An address-range traffic selector (§3.13.1). IPv4 ranges encode as type 7, IPv6 as type 8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrafficSelector {
    pub ip_proto: u8,
    pub start_port: u16,
    pub end_port: u16,
    pub start: IpAddr,
    pub end: IpAddr,
}

/// A decoded payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Sa(Vec<Proposal>),
    Ke {
        group: u16,
        data: Vec<u8>,
    },
    Nonce(Vec<u8>),
    IdI(Identity),
    IdR(Identity),
    Auth {
        method: u8,
        data: Vec<u8>,
    },
    Notify(Notify),
    Delete(Delete),
    Vendor(Vec<u8>),
    TsI(Vec<TrafficSelector>),
    TsR(Vec<TrafficSelector>),
    /// Encrypted payload: only in decoded outer messages; `first_inner` = its Next Payload field,
    /// `body` = IV | ciphertext | ICV.
    Sk {
        first_inner: u8,
        body: Vec<u8>,
    },
    /// Any other payload type, body kept verbatim. An SKF (53) fragment decodes to this too;
    /// it must be last like SK, and its Next Payload field is not kept.
    Unknown {
        ty: u8,
        critical: bool,
        body: Vec<u8>,
    },
}

impl Payload {
    pub fn type_code(&self) -> u8 {
        use payload_type as pt;
        match self {
            Payload::Sa(_) => pt::SA,
            Payload::Ke { .. } => pt::KE,
            Payload::Nonce(_) => pt::NONCE,
            Payload::IdI(_) => pt::IDI,
            Payload::IdR(_) => pt::IDR,
            Payload::Auth { .. } => pt::AUTH,
            Payload::Notify(_) => pt::NOTIFY,
            Payload::Delete(_) => pt::DELETE,
            Payload::Vendor(_) => pt::VENDOR,
            Payload::TsI(_) => pt::TSI,
            Payload::TsR(_) => pt::TSR,
            Payload::Sk { .. } => pt::SK,
            Payload::Unknown { ty, .. } => *ty,
        }
    }

    /// A notify about the IKE SA (protocol 0, no SPI).
    pub fn notify(ty: u16, data: &[u8]) -> Self {
        Payload::Notify(Notify::new(ty, data))
    }

    /// Encode this payload, generic header included, with `next` as its Next Payload field
    /// (ignored for SK, whose field is `first_inner`). Bodies longer than 65531 octets cannot be
    /// represented; the caller must not build them (nothing decoded ever is).
    pub fn encode(&self, next: u8, out: &mut Vec<u8>) {
        let start = out.len();
        let (next, critical) = match self {
            Payload::Sk { first_inner, .. } => (*first_inner, false),
            Payload::Unknown { critical, .. } => (next, *critical),
            _ => (next, false),
        };
        out.push(next);
        out.push(if critical { 0x80 } else { 0 });
        out.extend_from_slice(&[0, 0]);
        self.encode_body(out);
        let len = u16::try_from(out.len() - start).unwrap_or(u16::MAX);
        debug_assert!(
            out.len() - start <= usize::from(u16::MAX),
            "payload too long"
        );
        out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Encode the body only (no generic header).
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Payload::Sa(props) => encode_sa(props, out),
            Payload::Ke { group, data } => {
                out.extend_from_slice(&group.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(data);
            }
            Payload::Nonce(n) => out.extend_from_slice(n),
            Payload::IdI(id) | Payload::IdR(id) => {
                out.extend_from_slice(&[id.ty, 0, 0, 0]);
                out.extend_from_slice(&id.data);
            }
            Payload::Auth { method, data } => {
                out.extend_from_slice(&[*method, 0, 0, 0]);
                out.extend_from_slice(data);
            }
            Payload::Notify(n) => {
                out.push(n.protocol);
                out.push(u8::try_from(n.spi.len()).unwrap_or(u8::MAX));
                out.extend_from_slice(&n.ty.to_be_bytes());
                out.extend_from_slice(&n.spi[..n.spi.len().min(255)]);
                out.extend_from_slice(&n.data);
            }
            Payload::Delete(d) => {
                out.push(d.protocol);
                out.push(d.spi_size);
                let n = u16::try_from(d.spis.len()).unwrap_or(u16::MAX);
                out.extend_from_slice(&n.to_be_bytes());
                for spi in d.spis.iter().take(usize::from(n)) {
                    out.extend_from_slice(spi);
                }
            }
            Payload::Vendor(v) => out.extend_from_slice(v),
            Payload::TsI(ts) | Payload::TsR(ts) => {
                let n = u8::try_from(ts.len()).unwrap_or(u8::MAX);
                out.extend_from_slice(&[n, 0, 0, 0]);
                for t in ts.iter().take(usize::from(n)) {
                    encode_ts(t, out);
                }
            }
            Payload::Sk { body, .. } => out.extend_from_slice(body),
            Payload::Unknown { body, .. } => out.extend_from_slice(body),
        }
    }
}

fn encode_sa(props: &[Proposal], out: &mut Vec<u8>) {
    let props = &props[..props.len().min(255)];
    for (i, p) in props.iter().enumerate() {
        let start = out.len();
        out.push(if i + 1 == props.len() { 0 } else { 2 });
        out.extend_from_slice(&[0, 0, 0]);
        let spi = &p.spi[..p.spi.len().min(255)];
        let transforms = &p.transforms[..p.transforms.len().min(255)];
        out.extend_from_slice(&[p.num, p.protocol, spi.len() as u8, transforms.len() as u8]);
        out.extend_from_slice(spi);
        for (j, t) in transforms.iter().enumerate() {
            let last = if j + 1 == transforms.len() { 0 } else { 3 };
            let len: u16 = if t.key_len.is_some() { 12 } else { 8 };
            out.extend_from_slice(&[last, 0]);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&[t.ty, 0]);
            out.extend_from_slice(&t.id.to_be_bytes());
            if let Some(k) = t.key_len {
                out.extend_from_slice(&(0x8000 | ids::ATTR_KEY_LENGTH).to_be_bytes());
                out.extend_from_slice(&k.to_be_bytes());
            }
        }
        let len = u16::try_from(out.len() - start).unwrap_or(u16::MAX);
        out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
    }
}

fn encode_ts(t: &TrafficSelector, out: &mut Vec<u8>) {
    let (ty, len, start, end): (u8, u16, Vec<u8>, Vec<u8>) = match (t.start, t.end) {
        (IpAddr::V4(s), IpAddr::V4(e)) => (
            ids::TS_IPV4_RANGE,
            16,
            s.octets().to_vec(),
            e.octets().to_vec(),
        ),
        (s, e) => (
            ids::TS_IPV6_RANGE,
            40,
            to_v6(s).octets().to_vec(),
            to_v6(e).octets().to_vec(),
        ),
    };
    out.push(ty);
    out.push(t.ip_proto);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&t.start_port.to_be_bytes());
    out.extend_from_slice(&t.end_port.to_be_bytes());
    out.extend_from_slice(&start);
    out.extend_from_slice(&end);
}

fn to_v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Encode a payload chain; returns the type code of the first payload (0 if empty) and the bytes
/// (generic headers included). An SK payload, if any, should be last.
pub fn encode_payloads(payloads: &[Payload]) -> (u8, Vec<u8>) {
    let mut out = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        let next = payloads.get(i + 1).map_or(0, Payload::type_code);
        p.encode(next, &mut out);
    }
    (payloads.first().map_or(0, Payload::type_code), out)
}

/// One generic payload header plus its body, as found in a chain.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawPayload<'a> {
    pub ty: u8,
    pub next: u8,
    pub critical: bool,
    /// Offset of the generic header within the chain bytes.
    pub offset: usize,
    pub body: &'a [u8],
}

/// Walk a payload chain's generic headers (no body decoding). Stops after an SK/SKF payload,
/// which must be last.
pub(crate) fn walk_payloads(first: u8, bytes: &[u8]) -> Result<Vec<RawPayload<'_>>, DecodeError> {
    let mut out = Vec::new();
    let mut ty = first;
    let mut off = 0usize;
    while ty != payload_type::NONE {
        if out.len() >= MAX_PAYLOADS {
            return Err(DecodeError::TooManyPayloads);
        }
        let rest = &bytes[off..];
        if rest.len() < GENERIC_HEADER_LEN {
            return Err(DecodeError::Truncated);
        }
        let next = rest[0];
        let critical = rest[1] & 0x80 != 0;
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        if len < GENERIC_HEADER_LEN || len > rest.len() {
            return Err(DecodeError::BadPayloadLength);
        }
        out.push(RawPayload {
            ty,
            next,
            critical,
            offset: off,
            body: &rest[GENERIC_HEADER_LEN..len],
        });
        off += len;
        if ty == payload_type::SK || ty == payload_type::SKF {
            if off != bytes.len() {
                return Err(DecodeError::SkNotLast);
            }
            return Ok(out);
        }
        ty = next;
    }
    if off != bytes.len() {
        return Err(DecodeError::TrailingBytes);
    }
    Ok(out)
}

/// Decode a payload chain starting with type `first`. Unknown payloads become
/// [`Payload::Unknown`] (the state machine rejects critical ones). An SK payload must be last.
pub fn decode_payloads(first: u8, bytes: &[u8]) -> Result<Vec<Payload>, DecodeError> {
    walk_payloads(first, bytes)?
        .into_iter()
        .map(|r| decode_body(r.ty, r.next, r.critical, r.body))
        .collect()
}

fn decode_body(ty: u8, next: u8, critical: bool, b: &[u8]) -> Result<Payload, DecodeError> {
    use payload_type as pt;
    Ok(match ty {
        pt::SA => Payload::Sa(decode_sa(b)?),
        pt::KE => {
            let (fixed, data) = split(b, 4)?;
            Payload::Ke {
                group: u16::from_be_bytes([fixed[0], fixed[1]]),
                data: data.to_vec(),
            }
        }
        pt::NONCE => Payload::Nonce(b.to_vec()),
        pt::IDI | pt::IDR => {
            let (fixed, data) = split(b, 4)?;
            let id = Identity {
                ty: fixed[0],
                data: data.to_vec(),
            };
            if ty == pt::IDI {
                Payload::IdI(id)
            } else {
                Payload::IdR(id)
            }
        }
        pt::AUTH => {
            let (fixed, data) = split(b, 4)?;
            Payload::Auth {
                method: fixed[0],
                data: data.to_vec(),
            }
        }
        pt::NOTIFY => {
            let (fixed, rest) = split(b, 4)?;
            let spi_size = usize::from(fixed[1]);
            if rest.len() < spi_size {
                return Err(DecodeError::BadNotify);
            }
            let (spi, data) = rest.split_at(spi_size);
            Payload::Notify(Notify {
                protocol: fixed[0],
                spi: spi.to_vec(),
                ty: u16::from_be_bytes([fixed[2], fixed[3]]),
                data: data.to_vec(),
            })
        }
        pt::DELETE => {
            let (fixed, rest) = split(b, 4)?;
            let spi_size = usize::from(fixed[1]);
            let n = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
            let ok = if spi_size == 0 {
                n == 0 && rest.is_empty()
            } else {
                n.checked_mul(spi_size) == Some(rest.len())
            };
            if !ok {
                return Err(DecodeError::BadDelete);
            }
            Payload::Delete(Delete {
                protocol: fixed[0],
                spi_size: fixed[1],
                spis: if spi_size == 0 {
                    Vec::new()
                } else {
                    rest.chunks_exact(spi_size).map(<[u8]>::to_vec).collect()
                },
            })
        }
        pt::VENDOR => Payload::Vendor(b.to_vec()),
        pt::TSI => Payload::TsI(decode_ts(b)?),
        pt::TSR => Payload::TsR(decode_ts(b)?),
        pt::SK => Payload::Sk {
            first_inner: next,
            body: b.to_vec(),
        },
        _ => Payload::Unknown {
            ty,
            critical,
            body: b.to_vec(),
        },
    })
}

/// Split off a fixed-size prefix of a payload body.
fn split(b: &[u8], n: usize) -> Result<(&[u8], &[u8]), DecodeError> {
    if b.len() < n {
        Err(DecodeError::ShortBody)
    } else {
        Ok(b.split_at(n))
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn decode_sa(b: &[u8]) -> Result<Vec<Proposal>, DecodeError> {
    let mut out = Vec::new();
    let mut rest = b;
    let mut seen = 0usize;
    // An empty SA payload decodes to no proposals (the state machine answers NO_PROPOSAL_CHOSEN).
    while !rest.is_empty() {
        seen += 1;
        if seen > MAX_PROPOSALS {
            return Err(DecodeError::TooManyPayloads);
        }
        if rest.len() < 8 {
            return Err(DecodeError::BadProposal);
        }
        let last = rest[0];
        let len = usize::from(be16(rest, 2));
        if len < 8 || len > rest.len() {
            return Err(DecodeError::BadProposal);
        }
        let (this, tail) = rest.split_at(len);
        match (last, tail.is_empty()) {
            (0, true) | (2, false) => {}
            _ => return Err(DecodeError::BadProposal),
        }
        rest = tail;
        let num = this[4];
        let protocol = this[5];
        let spi_size = usize::from(this[6]);
        let n_transforms = usize::from(this[7]);
        if n_transforms > MAX_TRANSFORMS {
            return Err(DecodeError::TooManyPayloads);
        }
        let body = &this[8..];
        if body.len() < spi_size {
            return Err(DecodeError::BadProposal);
        }
        let (spi, mut tb) = body.split_at(spi_size);
        let mut transforms = Vec::with_capacity(n_transforms);
        let mut acceptable = true;
        for i in 0..n_transforms {
            if tb.len() < 8 {
                return Err(DecodeError::BadProposal);
            }
            let tlast = tb[0];
            let tlen = usize::from(be16(tb, 2));
            if tlen < 8 || tlen > tb.len() {
                return Err(DecodeError::BadProposal);
            }
            let final_one = i + 1 == n_transforms;
            match (tlast, final_one) {
                (0, true) | (3, false) => {}
                _ => return Err(DecodeError::BadProposal),
            }
            let (t, ttail) = tb.split_at(tlen);
            tb = ttail;
            let (key_len, understood) = decode_attributes(&t[8..])?;
            acceptable &= understood;
            transforms.push(Transform {
                ty: t[4],
                id: be16(t, 6),
                key_len,
            });
        }
        if !tb.is_empty() {
            return Err(DecodeError::BadProposal);
        }
        if acceptable {
            out.push(Proposal {
                num,
                protocol,
                spi: spi.to_vec(),
                transforms,
            });
        }
    }
    Ok(out)
}

/// Parse transform attributes (§3.3.5). Returns the KEY_LENGTH value and whether every
/// attribute was understood (only a single TV KEY_LENGTH is).
fn decode_attributes(mut b: &[u8]) -> Result<(Option<u16>, bool), DecodeError> {
    let mut key_len = None;
    let mut understood = true;
    while !b.is_empty() {
        if b.len() < 4 {
            return Err(DecodeError::BadAttribute);
        }
        let af_type = be16(b, 0);
        let tv = af_type & 0x8000 != 0;
        let ty = af_type & 0x7fff;
        let used = if tv {
            if ty == ids::ATTR_KEY_LENGTH {
                if key_len.is_some() {
                    return Err(DecodeError::BadAttribute);
                }
                key_len = Some(be16(b, 2));
            } else {
                understood = false;
            }
            4
        } else {
            understood = false;
            let vlen = usize::from(be16(b, 2));
            if 4 + vlen > b.len() {
                return Err(DecodeError::BadAttribute);
            }
            4 + vlen
        };
        b = &b[used..];
    }
    Ok((key_len, understood))
}

fn decode_ts(b: &[u8]) -> Result<Vec<TrafficSelector>, DecodeError> {
    let (fixed, mut rest) = split(b, 4)?;
    let n = usize::from(fixed[0]);
    if n > MAX_SELECTORS {
        return Err(DecodeError::TooManyPayloads);
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if rest.len() < 8 {
            return Err(DecodeError::BadTrafficSelector);
        }
        let ty = rest[0];
        let len = usize::from(be16(rest, 2));
        let want = match ty {
            ids::TS_IPV4_RANGE => 16,
            ids::TS_IPV6_RANGE => 40,
            _ => return Err(DecodeError::BadTrafficSelector),
        };
        if len != want || rest.len() < len {
            return Err(DecodeError::BadTrafficSelector);
        }
        let s = &rest[..len];
        let (start, end) = if ty == ids::TS_IPV4_RANGE {
            let a: [u8; 4] = [s[8], s[9], s[10], s[11]];
            let e: [u8; 4] = [s[12], s[13], s[14], s[15]];
            (IpAddr::V4(Ipv4Addr::from(a)), IpAddr::V4(Ipv4Addr::from(e)))
        } else {
            let mut a = [0u8; 16];
            let mut e = [0u8; 16];
            a.copy_from_slice(&s[8..24]);
            e.copy_from_slice(&s[24..40]);
            (IpAddr::V6(Ipv6Addr::from(a)), IpAddr::V6(Ipv6Addr::from(e)))
        };
        out.push(TrafficSelector {
            ip_proto: s[1],
            start_port: be16(s, 4),
            end_port: be16(s, 6),
            start,
            end,
        });
        rest = &rest[len..];
    }
    if !rest.is_empty() {
        return Err(DecodeError::BadTrafficSelector);
    }
    Ok(out)
}

/// A whole IKE message: header plus the outer (unencrypted) payloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub header: Header,
    pub payloads: Vec<Payload>,
}

impl Message {
    /// Decode header + outer payloads. The header's Length must equal `bytes.len()`, and the
    /// message may not exceed [`MAX_MESSAGE_LEN`]. `bytes` starts at the IKE header (strip the
    /// non-ESP marker first).
    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        let header = check_header(bytes)?;
        let payloads = decode_payloads(header.next_payload, &bytes[HEADER_LEN..])?;
        Ok(Message { header, payloads })
    }

    /// Encode an unencrypted message (IKE_SA_INIT): fills `next_payload` and `length`.
    pub fn encode_plain(mut header: Header, payloads: &[Payload]) -> Vec<u8> {
        let (first, body) = encode_payloads(payloads);
        header.next_payload = first;
        header.length = u32::try_from(HEADER_LEN + body.len()).unwrap_or(u32::MAX);
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        header.encode(&mut out);
        out.extend_from_slice(&body);
        out
    }

    /// The first notify of type `ty` among the outer payloads.
    pub fn notify(&self, ty: u16) -> Option<&Notify> {
        find_notify(&self.payloads, ty)
    }
}

/// The first notify of type `ty` in a payload list.
pub fn find_notify(payloads: &[Payload], ty: u16) -> Option<&Notify> {
    payloads.iter().find_map(|p| match p {
        Payload::Notify(n) if n.ty == ty => Some(n),
        _ => None,
    })
}

/// Decode the header and check the message-level lengths.
pub(crate) fn check_header(bytes: &[u8]) -> Result<Header, DecodeError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(DecodeError::TooLarge);
    }
    let header = Header::decode(bytes)?;
    if header.length as usize != bytes.len() || bytes.len() < HEADER_LEN {
        return Err(DecodeError::BadLength);
    }
    Ok(header)
}

/// Traffic selector covering a whole subnet: any protocol, ports 0..65535, first..last address.
pub fn ts_from_subnet(net: ipnet::IpNet) -> TrafficSelector {
    TrafficSelector {
        ip_proto: 0,
        start_port: 0,
        end_port: 65535,
        start: net.network(),
        end: net.broadcast(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr() -> Header {
        Header {
            spi_i: 0x0102030405060708,
            spi_r: 0,
            next_payload: 0,
            version: VERSION_2_0,
            exchange: ExchangeType::IkeSaInit,
            flags: flags::INITIATOR,
            message_id: 0,
            length: 0,
        }
    }

    #[test]
    fn exchange_type_round_trip() {
        for v in 0..=255u8 {
            assert_eq!(ExchangeType::from_u8(v).to_u8(), v);
        }
        assert_eq!(ExchangeType::from_u8(43), ExchangeType::IkeIntermediate);
        assert_eq!(ExchangeType::from_u8(44), ExchangeType::IkeFollowupKe);
    }

    #[test]
    fn header_rejects_bad_version_and_lengths() {
        let mut m = Message::encode_plain(hdr(), &[Payload::Nonce(vec![7; 32])]);
        assert!(Message::decode(&m).is_ok());
        m[17] = 0x10;
        assert_eq!(Message::decode(&m), Err(DecodeError::BadVersion));
        m[17] = 0x21; // minor version is ignored
        assert!(Message::decode(&m).is_ok());
        assert_eq!(
            Message::decode(&m[..m.len() - 1]),
            Err(DecodeError::BadLength)
        );
        assert_eq!(Message::decode(&m[..10]), Err(DecodeError::Truncated));
        let big = vec![0u8; MAX_MESSAGE_LEN + 1];
        assert_eq!(Message::decode(&big), Err(DecodeError::TooLarge));
    }

    #[test]
    fn sk_must_be_last_and_trailing_bytes_rejected() {
        let (_, mut chain) = encode_payloads(&[Payload::Sk {
            first_inner: 41,
            body: vec![1; 25],
        }]);
        chain.extend_from_slice(&[0, 0, 0, 4]);
        assert_eq!(
            decode_payloads(payload_type::SK, &chain),
            Err(DecodeError::SkNotLast)
        );
        let (first, mut chain) = encode_payloads(&[Payload::Vendor(vec![1, 2])]);
        chain.push(0);
        assert_eq!(
            decode_payloads(first, &chain),
            Err(DecodeError::TrailingBytes)
        );
    }

    #[test]
    fn proposal_with_unknown_attribute_is_dropped() {
        // One proposal, one transform with KEY_LENGTH and an extra TV attribute 0x8001.
        let mut chain = vec![0, 0, 0, 28];
        chain.extend_from_slice(&[0, 0, 0, 24, 1, 1, 0, 1]);
        chain.extend_from_slice(&[0, 0, 0, 16, 1, 0, 0, 20, 0x80, 14, 1, 0, 0x80, 1, 0, 1]);
        assert_eq!(
            decode_payloads(payload_type::SA, &chain),
            Ok(vec![Payload::Sa(vec![])])
        );
        // duplicate KEY_LENGTH is an error
        chain[24..28].copy_from_slice(&[0x80, 14, 1, 0]);
        assert_eq!(
            decode_payloads(payload_type::SA, &chain),
            Err(DecodeError::BadAttribute)
        );
    }

    #[test]
    fn ts_from_subnet_v4_v6() {
        let ts = ts_from_subnet("10.211.1.7/24".parse().unwrap());
        assert_eq!(ts.start, "10.211.1.0".parse::<IpAddr>().unwrap());
        assert_eq!(ts.end, "10.211.1.255".parse::<IpAddr>().unwrap());
        assert_eq!((ts.ip_proto, ts.start_port, ts.end_port), (0, 0, 65535));
        let mut out = Vec::new();
        encode_ts(&ts, &mut out);
        assert_eq!(
            out,
            [7, 0, 0, 16, 0, 0, 0xff, 0xff, 10, 211, 1, 0, 10, 211, 1, 255]
        );
        let ts6 = ts_from_subnet("fd00:1::/64".parse().unwrap());
        let p = Payload::TsR(vec![ts6]);
        let (first, bytes) = encode_payloads(std::slice::from_ref(&p));
        assert_eq!(decode_payloads(first, &bytes), Ok(vec![p]));
    }

    #[test]
    fn delete_shapes() {
        let ike = Payload::Delete(Delete {
            protocol: ids::PROTO_IKE,
            spi_size: 0,
            spis: vec![],
        });
        let esp = Payload::Delete(Delete {
            protocol: ids::PROTO_ESP,
            spi_size: 4,
            spis: vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8]],
        });
        let (first, bytes) = encode_payloads(&[ike.clone(), esp.clone()]);
        assert_eq!(decode_payloads(first, &bytes), Ok(vec![ike, esp]));
        // spi size 0 with a count: refused (would allocate without bound)
        let bad = [0, 0, 0, 8, 1, 0, 0xff, 0xff];
        assert_eq!(
            decode_payloads(payload_type::DELETE, &bad),
            Err(DecodeError::BadDelete)
        );
    }

    #[test]
    fn error_kinds_are_distinct() {
        let mut kinds: Vec<_> = DecodeError::ALL.iter().map(DecodeError::kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), DecodeError::ALL.len());
    }
}
