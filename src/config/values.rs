//! Parsers for single values. Each returns a human message on failure; the
//! caller adds the TOML path and line.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::{Endpoint, IpNet};

/// Port used for IPsec endpoints given without one (IKE; floats to 4500).
pub const IKE_PORT: u16 = 500;

/// `s` as a quoted string for messages, shortened if long.
pub fn quote(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}...", &s[..cut]),
        None => format!("{s:?}"),
    }
}

/// Site and tunnel names: they end up in metric labels and Vault paths.
pub fn name(s: &str) -> Result<String, String> {
    let ok = (1..=32).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid name {}: expected 1 to 32 characters from A-Z a-z 0-9 _ . -",
            quote(s)
        ))
    }
}

/// A Linux network interface name, as the kernel's `dev_valid_name` accepts.
pub fn interface(s: &str) -> Result<String, String> {
    let problem = if s.is_empty() {
        Some("it is empty")
    } else if s.len() > 15 {
        Some("it is longer than 15 bytes")
    } else if s == "." || s == ".." {
        Some("it cannot be \".\" or \"..\"")
    } else if s
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Some("it cannot contain '/', ':', whitespace or control characters")
    } else {
        None
    };
    match problem {
        None => Ok(s.to_string()),
        Some(p) => Err(format!("invalid interface name {}: {p}", quote(s))),
    }
}

/// A CIDR such as `10.1.2.0/24`. Host bits are kept; callers truncate.
pub fn cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    let hint = match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => format!("add a prefix length, e.g. \"{s}/32\""),
        Ok(IpAddr::V6(_)) => format!("add a prefix length, e.g. \"{s}/128\""),
        Err(_) => "expected an address with prefix length, e.g. \"10.1.0.0/24\"".to_string(),
    };
    Err(format!("invalid CIDR {}: {hint}", quote(s)))
}

/// A humantime duration ("25s", "2m", "250ms").
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| {
        format!(
            "invalid duration {}: {e}; expected e.g. \"25s\", \"2m\", \"250ms\"",
            quote(s)
        )
    })
}

/// A WireGuard key: standard base64 of 32 bytes (44 characters with padding).
pub fn key32(s: &str) -> Option<[u8; 32]> {
    let bytes = STANDARD.decode(s.trim()).ok()?;
    bytes.try_into().ok()
}

/// `vault:<path>` -> the path; `Ok(None)` if `s` is not a vault reference.
pub fn vault_ref(s: &str) -> Result<Option<String>, String> {
    match s.strip_prefix("vault:") {
        None => Ok(None),
        Some(path) if path.trim().is_empty() => {
            Err("empty Vault path: expected \"vault:<kv path>\"".to_string())
        }
        Some(path) => Ok(Some(path.to_string())),
    }
}

/// `IP:port`, `[v6]:port`, `host:port`; for IPsec also `IP`, `[v6]` and `host`
/// (port 500).
pub fn endpoint(s: &str, port_optional: bool) -> Result<Endpoint, String> {
    let expected = if port_optional {
        "expected IP, IP:port, host or host:port"
    } else {
        "expected IP:port or host:port"
    };
    let fail = |why: &str| Err(format!("invalid endpoint {}: {why}", quote(s)));
    let no_port = || {
        format!(
            "invalid endpoint {}: a port is required for WireGuard, e.g. \"{s}:51820\"",
            quote(s)
        )
    };

    if let Ok(addr) = s.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return fail("port 0 is not allowed");
        }
        return Ok(Endpoint::Addr(addr));
    }
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return if port_optional {
            Ok(Endpoint::Addr(SocketAddr::new(ip, IKE_PORT)))
        } else {
            Err(no_port())
        };
    }
    if s.starts_with('[') {
        return fail(&format!("bad bracketed IPv6 address; {expected}"));
    }

    let (host, port) = match s.rsplit_once(':') {
        Some((host, port)) => {
            if host.contains(':') {
                return fail("IPv6 addresses with a port need brackets, e.g. \"[fd00::1]:51820\"");
            }
            match port.parse::<u16>() {
                Ok(0) => return fail("port 0 is not allowed"),
                Ok(p) => (host, p),
                Err(_) => return fail(&format!("bad port {}; {expected}", quote(port))),
            }
        }
        None if !hostname(s) => return fail(expected),
        None if port_optional => (s, IKE_PORT),
        None => return Err(no_port()),
    };
    if !hostname(host) {
        return fail(expected);
    }
    if host
        .split('.')
        .all(|l| l.chars().all(|c| c.is_ascii_digit()))
    {
        return fail(&format!("{} is not a valid IP address", quote(host)));
    }
    Ok(Endpoint::Host {
        host: host.to_string(),
        port,
    })
}

/// An RFC 1123 host name (a trailing dot is allowed).
fn hostname(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// The kind and body of an IKE identity written as strongSwan writes `id`: an IPv4 or
/// IPv6 address, `@#<hex>` (KEY_ID), `@fqdn` or `fqdn` (FQDN), `user@domain` (RFC 822).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IkeIdentity {
    Ipv4(std::net::Ipv4Addr),
    Ipv6(std::net::Ipv6Addr),
    Fqdn(String),
    Email(String),
    KeyId(Vec<u8>),
}

pub fn ike_identity(s: &str) -> Result<IkeIdentity, String> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(match ip {
            std::net::IpAddr::V4(a) => IkeIdentity::Ipv4(a),
            std::net::IpAddr::V6(a) => IkeIdentity::Ipv6(a),
        });
    }
    if s.starts_with('%') {
        return Err(format!(
            "{} is not supported: give the peer's exact identity",
            quote(s)
        ));
    }
    if s.contains('=') {
        return Err(format!(
            "distinguished names ({}) need certificates, which sitewire does not do; use an FQDN, address, email or @#hex key id",
            quote(s)
        ));
    }
    if let Some(hex) = s.strip_prefix("@#") {
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|b| u8::from_str_radix(b, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .filter(|b| !b.is_empty());
        return bytes
            .map(IkeIdentity::KeyId)
            .ok_or_else(|| format!("{} is not an even number of hex digits after @#", quote(s)));
    }
    if let Some(fqdn) = s.strip_prefix('@') {
        if fqdn.is_empty() {
            return Err("empty FQDN after @".into());
        }
        return Ok(IkeIdentity::Fqdn(fqdn.to_string()));
    }
    if s.contains('@') {
        return Ok(IkeIdentity::Email(s.to_string()));
    }
    if s.chars().any(char::is_whitespace) {
        return Err(format!("{} contains white space", quote(s)));
    }
    Ok(IkeIdentity::Fqdn(s.to_string()))
}

const ENCRYPTION: &[&str] = &[
    "aes128gcm16",
    "aes256gcm16",
    "aes128gcm",
    "aes256gcm",
    "chacha20poly1305",
];
// What sitewire's IKE engine implements: PRF HMAC-SHA2-256 and X25519 (a proposal naming
// anything else is refused here rather than failing to negotiate at run time).
const PRF: &[&str] = &["prfsha256"];
const DH: &[&str] = &["x25519", "curve25519"];
const ESN: &[&str] = &["esn", "noesn"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProposalKind {
    Ike,
    Esp,
}

/// A strongSwan proposal string such as `aes256gcm16-prfsha256-x25519`.
pub fn proposal(s: &str, kind: ProposalKind) -> Result<String, String> {
    let what = match kind {
        ProposalKind::Ike => "IKE proposal",
        ProposalKind::Esp => "ESP proposal",
    };
    if s.is_empty() {
        return Err(format!("empty {what}"));
    }
    let (mut enc, mut prf, mut dh) = (0, 0, 0);
    for token in s.split('-') {
        if ENCRYPTION.contains(&token) {
            enc += 1;
        } else if DH.contains(&token) {
            dh += 1;
        } else if kind == ProposalKind::Ike && PRF.contains(&token) {
            prf += 1;
        } else if !(kind == ProposalKind::Esp && ESN.contains(&token)) {
            let mut known: Vec<&str> = ENCRYPTION.to_vec();
            if kind == ProposalKind::Ike {
                known.extend(PRF);
            }
            known.extend(DH);
            if kind == ProposalKind::Esp {
                known.extend(ESN);
            }
            return Err(format!(
                "unknown algorithm {} in {what} {}; supported: {}",
                quote(token),
                quote(s),
                known.join(", ")
            ));
        }
    }
    let missing = if enc == 0 {
        Some("an encryption algorithm (e.g. aes256gcm16)")
    } else if kind == ProposalKind::Ike && prf == 0 {
        Some("a PRF (e.g. prfsha256)")
    } else if kind == ProposalKind::Ike && dh == 0 {
        Some("a DH group (e.g. x25519)")
    } else {
        None
    };
    match missing {
        Some(m) => Err(format!("{what} {} lacks {m}", quote(s))),
        None => Ok(s.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let sa = |s: &str| Endpoint::Addr(s.parse().unwrap());
        assert_eq!(endpoint("1.2.3.4:51820", false), Ok(sa("1.2.3.4:51820")));
        assert_eq!(
            endpoint("[fd00::1]:51820", false),
            Ok(sa("[fd00::1]:51820"))
        );
        assert_eq!(
            endpoint("vpn.example.net:51820", false),
            Ok(Endpoint::Host {
                host: "vpn.example.net".into(),
                port: 51820
            })
        );
        assert_eq!(endpoint("1.2.3.4", true), Ok(sa("1.2.3.4:500")));
        assert_eq!(endpoint("fd00::1", true), Ok(sa("[fd00::1]:500")));
        assert_eq!(endpoint("[fd00::1]", true), Ok(sa("[fd00::1]:500")));
        assert_eq!(
            endpoint("gw.example", true),
            Ok(Endpoint::Host {
                host: "gw.example".into(),
                port: 500
            })
        );
        for bad in [
            "1.2.3.4",
            "gw.example",
            "fd00::1",
            "1.2.3.4:0",
            "1.2.3.4:70000",
            "fd00::1:51820",
            "999.1.1.1:80",
            "-bad.example:1",
            "a b:1",
            "",
            ":51820",
            "[fd00::1:5",
        ] {
            assert!(endpoint(bad, false).is_err(), "{bad}");
        }
        assert!(endpoint("1.2.3.4", false)
            .unwrap_err()
            .contains("port is required"));
        assert!(endpoint("fd00::1:51820", true)
            .unwrap_err()
            .contains("brackets"));
    }

    #[test]
    fn names_and_interfaces() {
        assert!(name("lab-1.a_b").is_ok());
        assert!(name("").is_err());
        assert!(name(&"a".repeat(33)).is_err());
        assert!(name("a b").is_err());
        assert!(name("ü").is_err());
        assert!(interface("sw0").is_ok());
        assert!(interface("wg-branch-office").is_err());
        for bad in ["", ".", "..", "a/b", "a b", "a:1", "a\tb"] {
            assert!(interface(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn proposals() {
        use ProposalKind::*;
        assert!(proposal("aes256gcm16-prfsha256-x25519", Ike).is_ok());
        assert!(proposal("chacha20poly1305-prfsha256-curve25519", Ike).is_ok());
        assert!(proposal("aes256gcm16-prfsha512-x25519", Ike)
            .unwrap_err()
            .contains("supported: "));
        assert!(proposal("aes256gcm16-prfsha256-ecp256", Ike).is_err());
        assert!(proposal("aes256gcm16", Esp).is_ok());
        assert!(proposal("aes128gcm16-x25519-esn", Esp).is_ok());
        assert!(proposal("aes256gcm16-x25519", Ike)
            .unwrap_err()
            .contains("lacks a PRF"));
        assert!(proposal("aes256gcm16-prfsha256", Ike)
            .unwrap_err()
            .contains("DH group"));
        assert!(proposal("aes256-sha256-modp2048", Ike)
            .unwrap_err()
            .contains("\"aes256\""));
        assert!(proposal("aes256gcm16-prfsha256", Esp).is_err());
        assert!(proposal("aes256gcm16-esn-prfsha256-x25519", Ike).is_err());
        assert!(proposal("", Esp).is_err());
        assert!(proposal("x25519", Esp).is_err());
    }

    #[test]
    fn identities() {
        use IkeIdentity::*;
        assert_eq!(
            ike_identity("10.1.2.3"),
            Ok(Ipv4("10.1.2.3".parse().unwrap()))
        );
        assert_eq!(
            ike_identity("fd00::1"),
            Ok(Ipv6("fd00::1".parse().unwrap()))
        );
        assert_eq!(
            ike_identity("gw.example.net"),
            Ok(Fqdn("gw.example.net".into()))
        );
        assert_eq!(ike_identity("@gw"), Ok(Fqdn("gw".into())));
        assert_eq!(
            ike_identity("admin@example.net"),
            Ok(Email("admin@example.net".into()))
        );
        assert_eq!(ike_identity("@#0aff"), Ok(KeyId(vec![0x0a, 0xff])));
        assert!(ike_identity("@#abc").is_err());
        assert!(ike_identity("%any").unwrap_err().contains("exact identity"));
        assert!(ike_identity("C=CH, O=x, CN=y")
            .unwrap_err()
            .contains("certificates"));
    }

    #[test]
    fn misc() {
        assert_eq!(quote("a\"b"), "\"a\\\"b\"");
        assert!(quote(&"é".repeat(100)).ends_with("..."));
        assert!(cidr("10.0.0.1").unwrap_err().contains("10.0.0.1/32"));
        assert!(cidr("10.0.0.0/33").is_err());
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert!(duration("2").is_err());
        assert_eq!(vault_ref("vault:a/b"), Ok(Some("a/b".into())));
        assert!(vault_ref("vault:").is_err());
        assert_eq!(vault_ref("keys/a.key"), Ok(None));
        assert!(key32(&STANDARD.encode([7u8; 32])).is_some());
        assert!(key32(&STANDARD.encode([7u8; 31])).is_none());
    }
}
