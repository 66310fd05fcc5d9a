//! Key types: WireGuard-compatible X25519 keys and 32-byte preshared keys.
//!
//! Text form is the one `wg genkey` / `wg pubkey` use: standard base64 with padding of
//! exactly 32 bytes, one line. Secret types zeroize on drop and never print their value:
//! `Debug` is redacted and there is no `Display`.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not a valid key: expected base64 of 32 bytes (44 characters, as `wg genkey` writes)")]
    Format,
    #[error(
        "key file {path} is readable by group or others (mode {mode:04o}); run `chmod 600 {path}`"
    )]
    Permissions { path: String, mode: u32 },
    #[error("cannot read key file {path}: {reason}")]
    Io { path: String, reason: String },
}

/// Decode a base64 key of exactly 32 bytes. The input is trimmed of surrounding whitespace.
pub fn decode_key(text: &str) -> Result<[u8; 32], KeyError> {
    let text = text.trim();
    // 44 chars of base64 with one '=' of padding encode exactly 32 bytes.
    if text.len() != 44 {
        return Err(KeyError::Format);
    }
    let mut out = [0u8; 32];
    let decoded = Zeroizing::new(STANDARD.decode(text).map_err(|_| KeyError::Format)?);
    if decoded.len() != 32 {
        return Err(KeyError::Format);
    }
    out.copy_from_slice(&decoded);
    Ok(out)
}

pub fn encode_key(bytes: &[u8; 32]) -> String {
    STANDARD.encode(bytes)
}

/// An X25519 private key (a WireGuard static key).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    /// A fresh key from the OS RNG, clamped as `wg genkey` does.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        let key = Self::from_bytes(bytes);
        bytes.zeroize();
        key
    }

    /// Clamp as RFC 7748 / `wg genkey` do. X25519 clamps internally anyway, so clamping
    /// only changes the stored form, which keeps `wg` and `sitewire` output identical.
    pub fn from_bytes(mut bytes: [u8; 32]) -> Self {
        bytes[0] &= 248;
        bytes[31] = (bytes[31] & 127) | 64;
        let key = Self(bytes);
        bytes.zeroize();
        key
    }

    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        // Keep a key as given (`wg pubkey` does not require clamped input).
        Ok(Self(decode_key(text)?))
    }

    pub fn public_key(&self) -> PublicKey {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.0))
    }

    pub fn to_static_secret(&self) -> x25519_dalek::StaticSecret {
        x25519_dalek::StaticSecret::from(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Load from a key file, refusing files readable by group or others.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = read_secret_file(path)?;
        Self::from_base64(&text)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// An X25519 public key. Not secret: prints as base64.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        Ok(Self(decode_key(text)?))
    }
    pub fn to_base64(&self) -> String {
        encode_key(&self.0)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    pub fn to_dalek(&self) -> x25519_dalek::PublicKey {
        x25519_dalek::PublicKey::from(self.0)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// A 32-byte symmetric preshared key (WireGuard PSK, or an IPsec PSK).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Psk([u8; 32]);

impl Psk {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        Ok(Self(decode_key(text)?))
    }
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        Self(bytes)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.0))
    }
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = read_secret_file(path)?;
        Self::from_base64(&text)
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(<redacted>)")
    }
}

/// Read a secret file after checking that only its owner can read it.
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<String>, KeyError> {
    let shown = path.display().to_string();
    let io = |e: std::io::Error| KeyError::Io {
        path: shown.clone(),
        reason: e.to_string(),
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mode = file.metadata().map_err(io)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions { path: shown, mode });
    }
    let mut text = Zeroizing::new(String::new());
    // A key file is one short line; refuse to slurp anything large.
    file.by_ref()
        .take(4096)
        .read_to_string(&mut text)
        .map_err(io)?;
    Ok(text)
}

/// Write a secret file with mode 0600 from the start (never briefly world-readable).
pub fn write_secret_file(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7748 §6.1 test vector (Alice).
    const ALICE_PRIV: &str = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
    const ALICE_PUB: &str = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn rfc7748_public_key() {
        let k = PrivateKey(hex32(ALICE_PRIV));
        assert_eq!(k.public_key().0, hex32(ALICE_PUB));
    }

    #[test]
    fn base64_round_trip_and_clamping() {
        let k = PrivateKey::generate();
        let b = k.as_bytes();
        assert_eq!(b[0] & 7, 0);
        assert_eq!(b[31] & 0x80, 0);
        assert_eq!(b[31] & 0x40, 0x40);
        let text = k.to_base64();
        assert_eq!(text.len(), 44);
        let back = PrivateKey::from_base64(&format!("{}\n", &*text)).unwrap();
        assert_eq!(back.as_bytes(), k.as_bytes());
        assert_eq!(back.public_key(), k.public_key());
    }

    #[test]
    fn rejects_bad_encodings() {
        for bad in [
            "",
            "abc",
            "not base64 at all, not base64 at all, not b=",
            // 33 bytes
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            // 31 bytes, padded
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==",
        ] {
            assert_eq!(
                PublicKey::from_base64(bad),
                Err(KeyError::Format),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn debug_is_redacted() {
        let k = PrivateKey::generate();
        let shown = format!("{k:?} {:?}", Psk::generate());
        assert!(!shown.contains(&*k.to_base64()));
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn key_file_permissions_enforced() {
        let dir = std::env::temp_dir().join(format!("sitewire-keys-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k.key");
        let k = PrivateKey::generate();
        write_secret_file(&path, &k.to_base64()).unwrap();
        assert_eq!(PrivateKey::load(&path).unwrap().as_bytes(), k.as_bytes());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = PrivateKey::load(&path).unwrap_err();
        assert!(matches!(err, KeyError::Permissions { mode: 0o644, .. }));
        assert!(!err.to_string().contains(&*k.to_base64()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
