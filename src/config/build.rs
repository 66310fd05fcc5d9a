//! Walks the parsed document into a [`Config`], collecting every error.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::de::DeTable;

use super::doc::{Ctx, Section, Str, StrList};
use super::values::{self, quote, ProposalKind};
use super::{
    Config, ConfigError, ConfigErrors, Dpd, DpdAction, Endpoint, IpNet, KeyRef, Keying, Metrics,
    PeerKey, Probe, Protocol, Site, StartAction, Tunnel, Vault,
};

const ROOT_KEYS: &[&str] = &["site", "metrics", "vault", "tunnel"];
const VAULT_KEYS: &[&str] = &[
    "address",
    "ca_cert",
    "mount",
    "prefix",
    "token_file",
    "role_id_file",
    "secret_id_file",
    "rotate_every",
    "poll_every",
    "cache_key_file",
];
const SITE_KEYS: &[&str] = &[
    "name",
    "interface",
    "listen_port",
    "private_key",
    "address",
    "mtu",
    "state_dir",
];
const METRICS_KEYS: &[&str] = &["listen"];
const DPD_KEYS: &[&str] = &["interval", "timeout", "action"];
const PROBE_KEYS: &[&str] = &["target", "interval", "source"];
const WIREGUARD_ONLY: &[&str] = &["peer_public_key", "keying", "persistent_keepalive"];
const IPSEC_ONLY: &[&str] = &[
    "ike_rekey_interval",
    "local_id",
    "remote_id",
    "ike_proposals",
    "esp_proposals",
    "start_action",
];
const TUNNEL_KEYS: &[&str] = &[
    "name",
    "protocol",
    "keying",
    "peer_public_key",
    "endpoint",
    "local_subnets",
    "remote_subnets",
    "persistent_keepalive",
    "rekey_interval",
    "ike_rekey_interval",
    "post_quantum",
    "dpd",
    "psk",
    "local_id",
    "remote_id",
    "ike_proposals",
    "esp_proposals",
    "start_action",
    "probe",
];

const DEFAULT_MTU: u16 = 1420;
const DEFAULT_STATE_DIR: &str = "/var/lib/sitewire";
const DEFAULT_VAULT_POLL: Duration = Duration::from_secs(60);
const DEFAULT_REKEY: Duration = Duration::from_secs(120);
/// IPsec IKE SA lifetime before a rekey (strongSwan's default `rekey_time`).
const DEFAULT_IKE_REKEY: Duration = Duration::from_secs(4 * 3600);
const DEFAULT_IKE_PROPOSAL: &str = "aes256gcm16-prfsha256-x25519";
const DEFAULT_ESP_PROPOSAL: &str = "aes256gcm16";
const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// A value with the place it came from.
#[derive(Debug, Clone)]
struct Located<T> {
    value: T,
    path: String,
    span: Range<usize>,
}

/// What the cross-tunnel checks need to know about a tunnel, even a broken one.
struct TunnelInfo {
    /// `tunnel "name"` or `tunnel[i]` if the name is invalid.
    label: String,
    name: Option<Located<String>>,
    local: Vec<Located<IpNet>>,
    remote: Vec<Located<IpNet>>,
}

pub(super) fn build(text: &str, base_dir: &Path, path: PathBuf) -> Result<Config, ConfigErrors> {
    let (doc, syntax) = DeTable::parse_recoverable(text);
    let mut b = Builder {
        ctx: Ctx::new(text),
        base_dir,
    };
    // After a syntax error the recovered tree is unreliable (and later errors are
    // usually echoes of the first), so report only the earliest one.
    if let Some(e) = syntax
        .iter()
        .min_by_key(|e| e.span().map_or(usize::MAX, |s| s.start))
    {
        let (line, message) = match e.span() {
            Some(s) => {
                let mut message = format!(
                    "invalid TOML (column {}): {}",
                    b.ctx.column(s.start),
                    e.message()
                );
                if e.message() == "duplicate key" {
                    if let Some(key) = text.get(s.clone()) {
                        message.push_str(&format!(" {}", quote(key)));
                    }
                }
                (Some(b.ctx.line(s.start)), message)
            }
            None => (None, format!("invalid TOML: {}", e.message())),
        };
        return Err(ConfigErrors(vec![ConfigError {
            path: String::new(),
            line,
            message,
        }]));
    }

    let root = Section::new(String::new(), doc.span(), doc.get_ref());
    root.check_unknown(&mut b.ctx, ROOT_KEYS);

    let site_section = root.table(&mut b.ctx, "site");
    if !root.has("site") {
        b.ctx
            .error_at("site", None, "missing required section [site]");
    }
    let (site, site_nets) = match &site_section {
        Some(s) => b.site(s),
        None => (None, Vec::new()),
    };
    let metrics = root.table(&mut b.ctx, "metrics").map(|m| b.metrics(&m));
    let vault = root.table(&mut b.ctx, "vault").map(|v| b.vault(&v));
    let mut tunnels = Vec::new();
    let mut infos = Vec::new();
    for (i, section) in root.tables(&mut b.ctx, "tunnel").iter().enumerate() {
        let (tunnel, info) = b.tunnel(section, i);
        tunnels.push(tunnel);
        infos.push(info);
    }
    b.cross_checks(&site_nets, &infos);

    let mut errors = b.ctx.errors;
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.line.unwrap_or(0));
        return Err(ConfigErrors(errors));
    }
    // No errors means every part was built; stay defensive anyway.
    let incomplete = || ConfigErrors(vec![ConfigError::file("incomplete configuration")]);
    Ok(Config {
        path,
        site: site.ok_or_else(incomplete)?,
        metrics: metrics.map(|m| m.ok_or_else(incomplete)).transpose()?,
        vault: vault.map(|v| v.ok_or_else(incomplete)).transpose()?,
        tunnels: tunnels
            .into_iter()
            .map(|t| t.ok_or_else(incomplete))
            .collect::<Result<_, _>>()?,
    })
}

struct Builder<'p> {
    ctx: Ctx,
    base_dir: &'p Path,
}

impl Builder<'_> {
    /// Parses a string value with `parse`, reporting failure at its location.
    fn parse<T>(
        &mut self,
        s: &Str<'_>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        match parse(s.text) {
            Ok(v) => Some(v),
            Err(message) => {
                self.ctx.error(&s.path, s.span.clone(), message);
                None
            }
        }
    }

    fn located<T>(
        &mut self,
        s: &Str<'_>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<Located<T>> {
        let value = self.parse(s, parse)?;
        Some(Located {
            value,
            path: s.path.clone(),
            span: s.span.clone(),
        })
    }

    /// Parses every element; reports elements whose `key` repeats an earlier one.
    /// The flag is false if anything was wrong.
    fn list<T, K: PartialEq>(
        &mut self,
        list: &StrList<'_>,
        mut parse: impl FnMut(&str) -> Result<T, String>,
        key: impl Fn(&T) -> K,
    ) -> (Vec<Located<T>>, bool) {
        let mut ok = !list.had_errors;
        let mut out: Vec<Located<T>> = Vec::new();
        for s in &list.items {
            let Some(item) = self.located(s, &mut parse) else {
                ok = false;
                continue;
            };
            if let Some(first) = out.iter().find(|o| key(&o.value) == key(&item.value)) {
                let message = format!("duplicate entry {}: same as {}", quote(s.text), first.path);
                self.ctx.error(&s.path, s.span.clone(), message);
                ok = false;
                continue;
            }
            out.push(item);
        }
        (out, ok)
    }

    /// An optional keyword: `Some(default)` if absent, `None` if invalid.
    fn choice<T: Copy>(
        &mut self,
        sec: &Section<'_, '_>,
        key: &str,
        options: &[(&str, T)],
        default: T,
    ) -> Option<T> {
        if !sec.has(key) {
            return Some(default);
        }
        let s = sec.string(&mut self.ctx, key)?;
        self.parse(&s, |text| {
            options
                .iter()
                .find(|(name, _)| *name == text)
                .map(|&(_, v)| v)
                .ok_or_else(|| {
                    let names: Vec<String> = options.iter().map(|(n, _)| quote(n)).collect();
                    format!(
                        "invalid {key} {}: expected {}",
                        quote(text),
                        names.join(" or ")
                    )
                })
        })
    }

    /// An optional duration: `Some(None)` if absent, `None` if invalid.
    fn duration(
        &mut self,
        sec: &Section<'_, '_>,
        key: &str,
        check: impl FnOnce(Duration) -> Result<(), String>,
    ) -> Option<Option<Duration>> {
        if !sec.has(key) {
            return Some(None);
        }
        let s = sec.string(&mut self.ctx, key)?;
        self.parse(&s, |text| {
            let d = values::duration(text)?;
            check(d).map_err(|why| format!("invalid {key} {}: {why}", quote(text)))?;
            Ok(d)
        })
        .map(Some)
    }

    /// `private_key` / `psk`: `vault:<path>` or a key file, which is checked.
    fn key_ref(&mut self, s: &Str<'_>) -> Option<KeyRef> {
        let base_dir = self.base_dir;
        self.parse(s, |text| {
            if let Some(path) = values::vault_ref(text)? {
                return Ok(KeyRef::Vault(path));
            }
            if text.trim().is_empty() {
                return Err("empty value: expected a key file path or \"vault:<kv path>\"".into());
            }
            if values::key32(text).is_some() {
                // Do not echo it: it is probably a secret.
                return Err(
                    "this looks like a key itself; put it in a file (mode 0600) and \
                            give the file's path, or use \"vault:<kv path>\""
                        .into(),
                );
            }
            let joined = base_dir.join(text);
            let path = std::path::absolute(&joined).unwrap_or(joined);
            match super::keyfile::check(&path).as_slice() {
                [] => Ok(KeyRef::File(path)),
                problems => Err(problems.join("; ")),
            }
        })
    }

    fn site(&mut self, sec: &Section<'_, '_>) -> (Option<Site>, Vec<Located<IpNet>>) {
        sec.check_unknown(&mut self.ctx, SITE_KEYS);
        let name = sec
            .required_string(&mut self.ctx, "name")
            .and_then(|s| self.parse(&s, values::name));
        let interface = sec
            .required_string(&mut self.ctx, "interface")
            .and_then(|s| self.parse(&s, values::interface));
        if !sec.has("listen_port") {
            sec.missing(&mut self.ctx, "listen_port", "");
        }
        let listen_port = sec
            .integer(&mut self.ctx, "listen_port")
            .and_then(|(n, span)| {
                let port = u16::try_from(n).ok().filter(|&p| p != 0);
                if port.is_none() {
                    self.ctx.error(
                        &sec.child_path("listen_port"),
                        span,
                        format!("invalid listen_port {n}: expected 1 to 65535"),
                    );
                }
                port
            });
        let private_key = sec
            .required_string(&mut self.ctx, "private_key")
            .and_then(|s| self.key_ref(&s));

        let (address, address_ok) = match sec.strings(&mut self.ctx, "address", true) {
            Some(list) => self.list(&list, values::cidr, IpNet::addr),
            None => (Vec::new(), true),
        };
        let mtu = match sec.integer(&mut self.ctx, "mtu") {
            None if sec.has("mtu") => None,
            None => Some(DEFAULT_MTU),
            Some((n, span)) => {
                let mtu = u16::try_from(n).ok().filter(|m| (576..=9000).contains(m));
                match mtu {
                    None => self.ctx.error(
                        &sec.child_path("mtu"),
                        span,
                        format!("invalid mtu {n}: expected 576 to 9000"),
                    ),
                    Some(m) if m < 1280 => {
                        if let Some(v6) = address.iter().find(|a| matches!(a.value, IpNet::V6(_))) {
                            self.ctx.error(
                                &sec.child_path("mtu"),
                                span,
                                format!(
                                    "mtu {m} is too small for IPv6 address {} ({}): IPv6 needs at least 1280",
                                    v6.value, v6.path
                                ),
                            );
                        }
                    }
                    Some(_) => {}
                }
                mtu
            }
        };

        let nets = address
            .iter()
            .map(|a| Located {
                // The site's own address as a host route: a remote subnet may share the
                // site's network (a road warrior's /32 in the overlay), but must not claim
                // the site's own address.
                value: IpNet::from(a.value.addr()),
                path: a.path.clone(),
                span: a.span.clone(),
            })
            .collect();
        let base_dir = self.base_dir;
        let state_dir = match sec.string(&mut self.ctx, "state_dir") {
            Some(s) => self.parse(&s, |text| {
                if text.trim().is_empty() {
                    return Err("empty state_dir: expected a directory path".to_string());
                }
                let joined = base_dir.join(text);
                Ok(std::path::absolute(&joined).unwrap_or(joined))
            }),
            None if sec.has("state_dir") => None,
            None => Some(PathBuf::from(DEFAULT_STATE_DIR)),
        };
        let site = (|| {
            Some(Site {
                name: name?,
                interface: interface?,
                listen_port: listen_port?,
                private_key: private_key?,
                address: unlocate(address, address_ok)?,
                mtu: mtu?,
                state_dir: state_dir?,
            })
        })();
        (site, nets)
    }

    fn metrics(&mut self, sec: &Section<'_, '_>) -> Option<Metrics> {
        sec.check_unknown(&mut self.ctx, METRICS_KEYS);
        let s = sec.required_string(&mut self.ctx, "listen")?;
        let listen = self.parse(&s, |text| {
            text.parse::<SocketAddr>().map_err(|_| {
                format!(
                    "invalid listen address {}: expected IP:port, e.g. \"127.0.0.1:9586\"",
                    quote(text)
                )
            })
        })?;
        Some(Metrics { listen })
    }

    fn vault(&mut self, sec: &Section<'_, '_>) -> Option<Vault> {
        sec.check_unknown(&mut self.ctx, VAULT_KEYS);
        let mut ok = true;
        let address = match sec.string(&mut self.ctx, "address") {
            Some(s) => {
                let a = self.parse(&s, |text| {
                    if text.starts_with("http://") || text.starts_with("https://") {
                        Ok(text.trim_end_matches('/').to_string())
                    } else {
                        Err(format!(
                            "invalid address {}: expected an http:// or https:// URL",
                            quote(text)
                        ))
                    }
                });
                ok &= a.is_some();
                a
            }
            None => {
                ok &= !sec.has("address");
                None
            }
        };
        let word = |b: &mut Self, key: &str, default: &str| -> Option<String> {
            match sec.string(&mut b.ctx, key) {
                Some(s) => b.parse(&s, |text| {
                    let t = text.trim_matches('/');
                    if t.is_empty() || t.contains(char::is_whitespace) || t.contains("//") {
                        Err(format!("invalid {key} {}: expected a KV path", quote(text)))
                    } else {
                        Ok(t.to_string())
                    }
                }),
                None if sec.has(key) => None,
                None => Some(default.to_string()),
            }
        };
        let mount = word(self, "mount", "secret");
        let prefix = word(self, "prefix", "sitewire");
        let base_dir = self.base_dir;
        let file = |b: &mut Self, key: &str| -> Option<Option<PathBuf>> {
            match sec.string(&mut b.ctx, key) {
                Some(s) => b
                    .parse(&s, |text| {
                        if text.trim().is_empty() {
                            return Err(format!("empty {key}: expected a file path"));
                        }
                        let joined = base_dir.join(text);
                        let path = std::path::absolute(&joined).unwrap_or(joined);
                        if !path.is_file() {
                            return Err(format!("{key} {}: no such file", path.display()));
                        }
                        Ok(path)
                    })
                    .map(Some),
                None if sec.has(key) => None,
                None => Some(None),
            }
        };
        let ca_cert = file(self, "ca_cert");
        let token_file = file(self, "token_file");
        let role_id_file = file(self, "role_id_file");
        let secret_id_file = file(self, "secret_id_file");
        let cache_key_file = file(self, "cache_key_file");
        let rotate_every = self.duration(sec, "rotate_every", |d| {
            if d < Duration::from_secs(1) {
                Err("expected at least 1s".into())
            } else {
                Ok(())
            }
        });
        let poll_every = self
            .duration(sec, "poll_every", |d| {
                if d < Duration::from_millis(100) {
                    Err("expected at least 100ms".into())
                } else {
                    Ok(())
                }
            })
            .map(|d| d.unwrap_or(DEFAULT_VAULT_POLL));
        if let (Some(r), Some(s)) = (&role_id_file, &secret_id_file) {
            if r.is_some() != s.is_some() {
                let key = if r.is_some() {
                    "secret_id_file"
                } else {
                    "role_id_file"
                };
                sec.missing(
                    &mut self.ctx,
                    key,
                    " (AppRole needs role_id_file and secret_id_file)",
                );
                ok = false;
            }
            if let (Some(Some(_)), true) = (&token_file, r.is_some()) {
                self.ctx.error(
                    &sec.child_path("token_file"),
                    sec.key_span("token_file").unwrap_or(sec.span.clone()),
                    "give either token_file or role_id_file/secret_id_file, not both",
                );
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        Some(Vault {
            address,
            ca_cert: ca_cert?,
            mount: mount?,
            prefix: prefix?,
            token_file: token_file?,
            role_id_file: role_id_file?,
            secret_id_file: secret_id_file?,
            rotate_every: rotate_every?,
            poll_every: poll_every?,
            cache_key_file: cache_key_file?,
        })
    }

    fn tunnel(&mut self, sec: &Section<'_, '_>, index: usize) -> (Option<Tunnel>, TunnelInfo) {
        sec.check_unknown(&mut self.ctx, TUNNEL_KEYS);
        let line = self.ctx.line(sec.span.start);
        let name = sec
            .required_string(&mut self.ctx, "name")
            .and_then(|s| self.located(&s, values::name));
        let protocol = self.choice(
            sec,
            "protocol",
            &[
                ("wireguard", Protocol::WireGuard),
                ("ipsec", Protocol::Ipsec),
            ],
            Protocol::WireGuard,
        );
        let is_wg = protocol == Some(Protocol::WireGuard);
        let is_ipsec = protocol == Some(Protocol::Ipsec);

        // Keys of the other protocol are reported once, and not read further.
        let mut forbidden: &[&str] = &[];
        if let Some(p) = protocol {
            let (keys, owner) = match p {
                Protocol::WireGuard => (IPSEC_ONLY, "ipsec"),
                Protocol::Ipsec => (WIREGUARD_ONLY, "wireguard"),
            };
            forbidden = keys;
            for key in keys {
                if let Some(span) = sec.key_span(key) {
                    self.ctx.error(
                        &sec.child_path(key),
                        span,
                        format!("`{key}` is only valid for protocol = \"{owner}\""),
                    );
                }
            }
        }
        let present = |key: &str| sec.has(key) && !forbidden.contains(&key);

        let keying = if is_ipsec {
            Some(Keying::Ike)
        } else {
            self.choice(
                sec,
                "keying",
                &[("static", Keying::Static), ("ike", Keying::Ike)],
                Keying::Static,
            )
        };

        let peer_public_key = if present("peer_public_key") {
            sec.string(&mut self.ctx, "peer_public_key")
                .and_then(|s| self.parse(&s, peer_key))
                .map(Some)
        } else {
            if is_wg {
                sec.missing(
                    &mut self.ctx,
                    "peer_public_key",
                    " for protocol = \"wireguard\"",
                );
            }
            (!is_wg).then_some(None)
        };

        let (endpoint, endpoint_ok) = match sec.strings(&mut self.ctx, "endpoint", true) {
            Some(list) => self.list(&list, |s| values::endpoint(s, !is_wg), Endpoint::clone),
            None => (Vec::new(), true),
        };

        let (local, local_ok) = self.subnets(sec, "local_subnets", is_ipsec);
        let (remote, remote_ok) = self.subnets(sec, "remote_subnets", true);

        let persistent_keepalive = if present("persistent_keepalive") {
            self.duration(sec, "persistent_keepalive", |d| {
                if d.subsec_nanos() != 0 {
                    Err("expected whole seconds".into())
                } else if !(1..=65535).contains(&d.as_secs()) {
                    Err("expected 1s to 65535s (omit the key to disable keepalives)".into())
                } else {
                    Ok(())
                }
            })
        } else {
            Some(None)
        };
        let rekey_interval = self
            .duration(sec, "rekey_interval", nonzero)
            .map(|d| d.unwrap_or(DEFAULT_REKEY));
        let ike_rekey_interval = if present("ike_rekey_interval") {
            self.duration(sec, "ike_rekey_interval", nonzero)
                .map(|d| d.or(Some(DEFAULT_IKE_REKEY)))
        } else {
            Some(is_ipsec.then_some(DEFAULT_IKE_REKEY))
        };
        let post_quantum = match sec.boolean(&mut self.ctx, "post_quantum") {
            Some(b) => Some(b),
            None if sec.has("post_quantum") => None,
            None => Some(true),
        };
        let dpd = match sec.table(&mut self.ctx, "dpd") {
            Some(d) => self.dpd(&d),
            None if sec.has("dpd") => None,
            None => Some(Dpd::default()),
        };

        let psk = if sec.has("psk") {
            sec.string(&mut self.ctx, "psk")
                .and_then(|s| self.key_ref(&s))
                .map(Some)
        } else {
            if is_ipsec {
                sec.missing(&mut self.ctx, "psk", " for protocol = \"ipsec\"");
            }
            (!is_ipsec).then_some(None)
        };

        let local_id = self.identity(sec, "local_id", is_ipsec, &present);
        let remote_id = self.identity(sec, "remote_id", is_ipsec, &present);
        let ike_proposals =
            self.proposals(sec, "ike_proposals", ProposalKind::Ike, is_ipsec, &present);
        let esp_proposals =
            self.proposals(sec, "esp_proposals", ProposalKind::Esp, is_ipsec, &present);
        let start_action = if present("start_action") {
            self.choice(
                sec,
                "start_action",
                &[
                    ("start", StartAction::Start),
                    ("trap", StartAction::Trap),
                    ("none", StartAction::None),
                ],
                StartAction::Start,
            )
        } else {
            Some(StartAction::Start)
        };

        let probe = match sec.table(&mut self.ctx, "probe") {
            Some(p) => self.probe(&p, &local, &remote).map(Some),
            None if sec.has("probe") => None,
            None => Some(None),
        };

        let info = TunnelInfo {
            label: match &name {
                Some(n) => format!("tunnel {}", quote(&n.value)),
                None => format!("tunnel[{index}]"),
            },
            name: name.clone(),
            local: local.clone(),
            remote: remote.clone(),
        };
        let tunnel = (|| {
            Some(Tunnel {
                name: name?.value,
                protocol: protocol?,
                keying: keying?,
                peer_public_key: peer_public_key?,
                endpoint: unlocate(endpoint, endpoint_ok)?,
                local_subnets: unlocate(local, local_ok)?,
                remote_subnets: unlocate(remote, remote_ok)?,
                persistent_keepalive: persistent_keepalive?,
                rekey_interval: rekey_interval?,
                ike_rekey_interval: ike_rekey_interval?,
                post_quantum: post_quantum?,
                dpd: dpd?,
                psk: psk?,
                local_id: local_id?,
                remote_id: remote_id?,
                ike_proposals: ike_proposals?,
                esp_proposals: esp_proposals?,
                start_action: start_action?,
                probe: probe?,
                line,
            })
        })();
        (tunnel, info)
    }

    /// A subnet list, truncated to networks. `required` means present and non-empty.
    fn subnets(
        &mut self,
        sec: &Section<'_, '_>,
        key: &str,
        required: bool,
    ) -> (Vec<Located<IpNet>>, bool) {
        let Some(list) = sec.strings(&mut self.ctx, key, false) else {
            if required {
                sec.missing(&mut self.ctx, key, "");
            }
            return (Vec::new(), !required);
        };
        let (nets, ok) = self.list(&list, |s| values::cidr(s).map(|n| n.trunc()), |n| *n);
        if required && list.items.is_empty() && !list.had_errors {
            if let Some(value) = sec.get(key) {
                self.ctx.error(
                    &sec.child_path(key),
                    value.span(),
                    format!("{key} must list at least one subnet"),
                );
            }
            return (nets, false);
        }
        (nets, ok)
    }

    fn dpd(&mut self, sec: &Section<'_, '_>) -> Option<Dpd> {
        sec.check_unknown(&mut self.ctx, DPD_KEYS);
        let default = Dpd::default();
        let interval = self.duration(sec, "interval", nonzero);
        let timeout = self.duration(sec, "timeout", nonzero);
        let action = self.choice(
            sec,
            "action",
            &[
                ("restart", DpdAction::Restart),
                ("clear", DpdAction::Clear),
                ("hold", DpdAction::Hold),
            ],
            DpdAction::Restart,
        );
        let (interval, timeout) = (interval?, timeout?);
        let dpd = Dpd {
            interval: interval.unwrap_or(default.interval),
            timeout: timeout.unwrap_or(default.timeout),
            action: action?,
        };
        if dpd.timeout < dpd.interval {
            let describe = |d: Duration, given: bool| {
                let d = humantime::format_duration(d);
                if given {
                    d.to_string()
                } else {
                    format!("{d}, the default")
                }
            };
            let (path, span) = match (timeout, sec.get("timeout")) {
                (Some(_), Some(v)) => (sec.child_path("timeout"), v.span()),
                _ => (sec.path.clone(), sec.span.clone()),
            };
            self.ctx.error(
                &path,
                span,
                format!(
                    "dpd timeout ({}) must not be shorter than the interval ({})",
                    describe(dpd.timeout, timeout.is_some()),
                    describe(dpd.interval, interval.is_some()),
                ),
            );
            return None;
        }
        Some(dpd)
    }

    /// `probe = { target, interval, source }`. Subnets that failed to parse are simply
    /// not checked against (their own errors are already reported).
    fn probe(
        &mut self,
        sec: &Section<'_, '_>,
        local: &[Located<IpNet>],
        remote: &[Located<IpNet>],
    ) -> Option<Probe> {
        sec.check_unknown(&mut self.ctx, PROBE_KEYS);
        let ipv4 = |key: &'static str| {
            move |text: &str| match text.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(a)) => Ok(a),
                Ok(std::net::IpAddr::V6(_)) => Err(format!(
                    "probe {key} {}: IPv6 probes are not supported yet",
                    quote(text)
                )),
                Err(_) => Err(format!(
                    "invalid probe {key} {}: expected an IPv4 address",
                    quote(text)
                )),
            }
        };
        let target = sec.required_string(&mut self.ctx, "target").and_then(|s| {
            let a = self.parse(&s, ipv4("target"))?;
            let ip = std::net::IpAddr::V4(a);
            if !remote.is_empty() && !remote.iter().any(|n| n.value.contains(&ip)) {
                let nets: Vec<String> = remote.iter().map(|n| n.value.to_string()).collect();
                self.ctx.error(
                    &s.path,
                    s.span.clone(),
                    format!(
                        "probe target {a} is not inside the tunnel's remote_subnets ({}): \
                             the probe must travel through the tunnel",
                        nets.join(", ")
                    ),
                );
                return None;
            }
            Some(a)
        });
        let source = match sec.string(&mut self.ctx, "source") {
            None if sec.has("source") => None,
            None => Some(None),
            Some(s) => self.parse(&s, ipv4("source")).and_then(|a| {
                let ip = std::net::IpAddr::V4(a);
                if !local.is_empty() && !local.iter().any(|n| n.value.contains(&ip)) {
                    let nets: Vec<String> = local.iter().map(|n| n.value.to_string()).collect();
                    self.ctx.error(
                        &s.path,
                        s.span.clone(),
                        format!(
                            "probe source {a} is not inside the tunnel's local_subnets ({}): \
                             the peer would drop the probe",
                            nets.join(", ")
                        ),
                    );
                    return None;
                }
                Some(Some(a))
            }),
        };
        let interval = self.duration(sec, "interval", |d| {
            if d < Duration::from_secs(1) {
                Err("expected at least 1s".into())
            } else if d > Duration::from_secs(3600) {
                Err("expected at most 1h".into())
            } else {
                Ok(())
            }
        });
        let has_v4_local =
            local.is_empty() || local.iter().any(|n| matches!(n.value, IpNet::V4(_)));
        if source == Some(None) && !has_v4_local {
            self.ctx.error(
                &sec.path,
                sec.span.clone(),
                "probe needs an IPv4 source: add `source` or an IPv4 local subnet",
            );
            return None;
        }
        Some(Probe {
            target: target?,
            source: source?,
            interval: interval?.unwrap_or(DEFAULT_PROBE_INTERVAL),
        })
    }

    fn identity(
        &mut self,
        sec: &Section<'_, '_>,
        key: &str,
        is_ipsec: bool,
        present: &dyn Fn(&str) -> bool,
    ) -> Option<Option<String>> {
        if !present(key) {
            if is_ipsec {
                sec.missing(
                    &mut self.ctx,
                    key,
                    " for protocol = \"ipsec\" (an FQDN, IP address, email or @#hex key id, as in strongSwan's `id`)",
                );
                return None;
            }
            return Some(None);
        }
        let s = sec.string(&mut self.ctx, key)?;
        self.parse(&s, |text| {
            if text.trim().is_empty() {
                Err(format!("{key} must not be empty"))
            } else if text.len() > 255 {
                Err(format!("{key} is longer than 255 bytes"))
            } else {
                values::ike_identity(text).map(|_| Some(text.to_string()))
            }
        })
    }

    fn proposals(
        &mut self,
        sec: &Section<'_, '_>,
        key: &str,
        kind: ProposalKind,
        is_ipsec: bool,
        present: &dyn Fn(&str) -> bool,
    ) -> Option<Vec<String>> {
        if !present(key) {
            let default = match kind {
                ProposalKind::Ike => DEFAULT_IKE_PROPOSAL,
                ProposalKind::Esp => DEFAULT_ESP_PROPOSAL,
            };
            return Some(if is_ipsec {
                vec![default.to_string()]
            } else {
                Vec::new()
            });
        }
        let list = sec.strings(&mut self.ctx, key, false)?;
        let (proposals, ok) = self.list(&list, |s| values::proposal(s, kind), String::clone);
        if list.items.is_empty() && !list.had_errors {
            if let Some(value) = sec.get(key) {
                self.ctx.error(
                    &sec.child_path(key),
                    value.span(),
                    format!(
                        "{key} must list at least one proposal (or omit the key for the default)"
                    ),
                );
            }
            return None;
        }
        unlocate(proposals, ok)
    }

    fn cross_checks(&mut self, site_nets: &[Located<IpNet>], tunnels: &[TunnelInfo]) {
        let mut names: HashMap<&str, usize> = HashMap::new();
        for t in tunnels {
            let Some(name) = &t.name else { continue };
            let line = self.ctx.line(name.span.start);
            match names.get(name.value.as_str()) {
                Some(first) => self.ctx.error(
                    &name.path,
                    name.span.clone(),
                    format!(
                        "duplicate tunnel name {} (first used at line {first})",
                        quote(&name.value)
                    ),
                ),
                None => {
                    names.insert(&name.value, line);
                }
            }
        }

        let overlaps = |a: &IpNet, b: &IpNet| a.contains(b) || b.contains(a);
        for (j, t) in tunnels.iter().enumerate() {
            for r in &t.remote {
                let mut problems = Vec::new();
                for other in &tunnels[..j] {
                    for q in other.remote.iter().filter(|q| overlaps(&r.value, &q.value)) {
                        problems.push(format!(
                            "remote subnet {} of {} overlaps remote subnet {} of {} ({}, line {})",
                            r.value,
                            t.label,
                            q.value,
                            other.label,
                            q.path,
                            self.ctx.line(q.span.start)
                        ));
                    }
                }
                for other in tunnels {
                    for l in other.local.iter().filter(|l| overlaps(&r.value, &l.value)) {
                        problems.push(format!(
                            "remote subnet {} of {} overlaps local subnet {} of {} ({}, line {})",
                            r.value,
                            t.label,
                            l.value,
                            other.label,
                            l.path,
                            self.ctx.line(l.span.start)
                        ));
                    }
                }
                for a in site_nets.iter().filter(|a| r.value == a.value) {
                    problems.push(format!(
                        "remote subnet {} of {} is this site's own address {} ({}, line {})",
                        r.value,
                        t.label,
                        a.value,
                        a.path,
                        self.ctx.line(a.span.start)
                    ));
                }
                for p in problems {
                    self.ctx.error(&r.path, r.span.clone(), p);
                }
            }
        }
    }
}

/// The plain values of a list that was read without errors.
fn unlocate<T>(list: Vec<Located<T>>, ok: bool) -> Option<Vec<T>> {
    ok.then(|| list.into_iter().map(|l| l.value).collect())
}

fn nonzero(d: Duration) -> Result<(), String> {
    if d.is_zero() {
        Err("must be greater than zero".into())
    } else {
        Ok(())
    }
}

fn peer_key(text: &str) -> Result<PeerKey, String> {
    if let Some(path) = values::vault_ref(text)? {
        return Ok(PeerKey::Vault(path));
    }
    values::key32(text).map(PeerKey::Inline).ok_or_else(|| {
        format!(
            "invalid peer_public_key {}: expected base64 of 32 bytes (44 characters, as printed \
             by `wg pubkey`) or \"vault:<kv path>\"",
            quote(text)
        )
    })
}
