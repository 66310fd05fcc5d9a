//! Configuration: TOML text -> validated [`Config`].
//!
//! The file is parsed into toml's spanned document tree, then walked by hand so
//! that every problem (unknown key, wrong type, missing key, bad value, conflicts
//! between tunnels, unreadable key files) is collected with its TOML path and
//! line instead of stopping at the first one.

mod build;
mod doc;
mod keyfile;
pub mod values;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use ipnet::IpNet;

/// A loaded and fully validated configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file loaded, absolute (`<base_dir>/<inline>` for [`Config::parse`]).
    pub path: PathBuf,
    pub site: Site,
    pub metrics: Option<Metrics>,
    pub vault: Option<Vault>,
    pub tunnels: Vec<Tunnel>,
}

/// `[vault]`: where `vault:<path>` key references are read from (KV v2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vault {
    /// `None`: `$VAULT_ADDR` at run time.
    pub address: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub mount: String,
    pub prefix: String,
    /// `None` (and no AppRole): `$VAULT_TOKEN` at run time.
    pub token_file: Option<PathBuf>,
    pub role_id_file: Option<PathBuf>,
    pub secret_id_file: Option<PathBuf>,
    /// Rotate the site's static key this often (None: only on `sitewire rotate --key`).
    pub rotate_every: Option<Duration>,
    /// How often published public keys (the peers' and our own) are read.
    pub poll_every: Duration,
    /// Enables the encrypted key cache under `site.state_dir`; the cache key is derived
    /// from this file's contents (which must not live beside the cache).
    pub cache_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub name: String,
    pub interface: String,
    pub listen_port: u16,
    pub private_key: KeyRef,
    /// Addresses for the TUN device, host bits kept (`10.77.0.1/24`).
    pub address: Vec<IpNet>,
    pub mtu: u16,
    /// Where the daemon keeps state (the encrypted Vault key cache).
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metrics {
    pub listen: SocketAddr,
}

/// Where a secret lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    /// A key file, already resolved against the config file's directory and
    /// checked (exists, mode 0600, base64 of 32 bytes).
    File(PathBuf),
    /// `vault:<path>`: a KV path, not checked here.
    Vault(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerKey {
    Inline([u8; 32]),
    Vault(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    WireGuard,
    Ipsec,
}

/// For `protocol = "ipsec"` this is always [`Keying::Ike`] (the `keying` key
/// itself is rejected there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Keying {
    Static,
    Ike,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Addr(SocketAddr),
    /// A DNS name, re-resolved by the daemon.
    Host {
        host: String,
        port: u16,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DpdAction {
    Restart,
    Clear,
    Hold,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dpd {
    pub interval: Duration,
    pub timeout: Duration,
    pub action: DpdAction,
}

impl Default for Dpd {
    fn default() -> Self {
        Dpd {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
            action: DpdAction::Restart,
        }
    }
}

/// `probe = { target = "192.168.50.1", interval = "5s" }`: an ICMP echo sent by the
/// daemon itself through the tunnel, timed when the reply comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// A host inside the tunnel's remote subnets (IPv4).
    pub target: std::net::Ipv4Addr,
    /// Source address of the echo requests, inside the local subnets. Replies to it are
    /// consumed by the daemon and never reach the TUN. `None`: see [`Probe::source_for`].
    pub source: Option<std::net::Ipv4Addr>,
    pub interval: Duration,
}

impl Probe {
    /// The configured source, else the site's first IPv4 address inside the local
    /// subnets (any, if there are none), else the first host of the first IPv4 local
    /// subnet.
    pub fn source_for(&self, site: &Site, local_subnets: &[IpNet]) -> Option<std::net::Ipv4Addr> {
        use std::net::IpAddr;
        if let Some(s) = self.source {
            return Some(s);
        }
        let inside =
            |a: &IpAddr| local_subnets.is_empty() || local_subnets.iter().any(|n| n.contains(a));
        let from_site = site.address.iter().find_map(|a| match a.addr() {
            IpAddr::V4(v4) if inside(&a.addr()) => Some(v4),
            _ => None,
        });
        from_site.or_else(|| {
            local_subnets.iter().find_map(|n| match n {
                IpNet::V4(v4) => v4.hosts().next(),
                IpNet::V6(_) => None,
            })
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StartAction {
    Start,
    Trap,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    pub name: String,
    pub protocol: Protocol,
    pub keying: Keying,
    /// Always `Some` for WireGuard, always `None` for IPsec.
    pub peer_public_key: Option<PeerKey>,
    /// Empty: wait for the peer to connect.
    pub endpoint: Vec<Endpoint>,
    /// Truncated to the network. Empty (WireGuard only): any local source.
    pub local_subnets: Vec<IpNet>,
    /// Truncated to the network, never empty.
    pub remote_subnets: Vec<IpNet>,
    pub persistent_keepalive: Option<Duration>,
    pub rekey_interval: Duration,
    /// IPsec: IKE SA rekey interval (default 4 h); `None` for WireGuard.
    pub ike_rekey_interval: Option<Duration>,
    /// IKE keying: run the hybrid ML-KEM-768 exchange (RFC 9370); default true.
    pub post_quantum: bool,
    pub dpd: Dpd,
    /// Optional for WireGuard, always `Some` for IPsec.
    pub psk: Option<KeyRef>,
    pub local_id: Option<String>,
    pub remote_id: Option<String>,
    /// Defaults filled in for IPsec; empty for WireGuard.
    pub ike_proposals: Vec<String>,
    pub esp_proposals: Vec<String>,
    pub start_action: StartAction,
    pub probe: Option<Probe>,
    /// Line of the `[[tunnel]]` header.
    pub line: usize,
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// TOML path such as `tunnel[0].endpoint[1]`; empty for file-level problems.
    pub path: String,
    /// 1-based line number.
    pub line: Option<usize>,
    pub message: String,
}

impl ConfigError {
    fn file(message: impl Into<String>) -> Self {
        ConfigError {
            path: String::new(),
            line: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found, ordered by line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Reads, parses and validates `path`, including the key files it refers to.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let text = std::fs::read_to_string(&path).map_err(|e| {
            ConfigErrors(vec![ConfigError::file(format!(
                "cannot read config file {}: {e}",
                path.display()
            ))])
        })?;
        let base_dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        build::build(&text, &base_dir, path)
    }

    /// Like [`Config::load`] for text already in memory; relative key file paths
    /// are resolved against `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, ConfigErrors> {
        let base_dir = std::path::absolute(base_dir).unwrap_or_else(|_| base_dir.to_path_buf());
        let path = base_dir.join("<inline>");
        build::build(text, &base_dir, path)
    }

    pub fn tunnel(&self, name: &str) -> Option<&Tunnel> {
        self.tunnels.iter().find(|t| t.name == name)
    }
}
