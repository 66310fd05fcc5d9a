//! Keys in Vault / OpenBao (KV v2), read through `vaultrs`.
//!
//! Layout under the `[vault]` mount and prefix (defaults `secret`, `sitewire`):
//!
//! * `<prefix>/sites/<site>/private`: `{"private_key": "<base64>", "version": ...}`
//! * `<prefix>/sites/<site>/public`: `{"public_key": "<base64>", "version": ..., "not_before": ...}`
//!
//! A reference `vault:<path>` names a KV path relative to the mount. The field read is
//! `private_key` (site key), `public_key` (a peer's key) or `psk` (a tunnel's PSK); a
//! secret holding a single `key` field works for all three.
//!
//! Secrets never appear in errors or logs: error messages name the address, the path
//! and the field, never the token or a value.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use vaultrs::client::{Client, VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;
use zeroize::Zeroizing;

use crate::config::{Config, KeyRef, PeerKey, Vault as VaultConfig};
use crate::keys::{self, PrivateKey};
use crate::metrics::VaultSnapshot;

const TIMEOUT: Duration = Duration::from_secs(5);
const APPROLE_MOUNT: &str = "approle";

/// Request counters and up/down state, shared with the metrics.
#[derive(Default)]
pub struct VaultStats {
    up: AtomicBool,
    requests: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl VaultStats {
    fn count(&self, op: &'static str, result: &'static str) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((op, result)).or_default() += 1;
    }

    /// Did the last request reach Vault?
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> VaultSnapshot {
        let m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        VaultSnapshot {
            up: self.up.load(Ordering::Relaxed),
            requests: m.iter().map(|(&(op, r), &n)| (op, r, n)).collect(),
        }
    }
}

/// The process's Vault statistics (there is one Vault per site).
pub fn stats() -> &'static Arc<VaultStats> {
    static STATS: OnceLock<Arc<VaultStats>> = OnceLock::new();
    STATS.get_or_init(Default::default)
}

/// True if the configuration has a `[vault]` section or any `vault:` reference.
pub fn used(cfg: &Config) -> bool {
    cfg.vault.is_some() || !vault_refs(cfg).is_empty()
}

/// (path, field) of every `vault:` reference in the configuration.
pub fn vault_refs(cfg: &Config) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    if let KeyRef::Vault(p) = &cfg.site.private_key {
        out.push((p.clone(), "private_key"));
    }
    for t in &cfg.tunnels {
        if let Some(PeerKey::Vault(p)) = &t.peer_public_key {
            out.push((p.clone(), "public_key"));
        }
        if let Some(KeyRef::Vault(p)) = &t.psk {
            out.push((p.clone(), "psk"));
        }
    }
    out
}

fn classify(e: &ClientError) -> &'static str {
    match e {
        ClientError::APIError { code: 404, .. } => "not_found",
        ClientError::APIError { code: 400, .. } => "conflict",
        ClientError::APIError {
            code: 401 | 403, ..
        } => "denied",
        ClientError::APIError { .. } => "error",
        _ => "unreachable",
    }
}

/// A description of a client error with no secret in it.
fn describe(e: &ClientError) -> String {
    match e {
        ClientError::APIError { code, errors } => {
            // Vault's own messages ("permission denied", "check-and-set parameter did
            // not match") name no secrets.
            let text = errors
                .join("; ")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            if text.is_empty() {
                format!("HTTP {code}")
            } else {
                format!("HTTP {code}: {text}")
            }
        }
        ClientError::RestClientError { source } => {
            let mut s = format!("request failed: {source}");
            let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(source);
            while let Some(c) = cur {
                s.push_str(&format!(": {c}"));
                cur = c.source();
            }
            s
        }
        other => other.to_string(),
    }
}

/// How the client logs in (kept for re-login when a token cannot be renewed).
enum Login {
    AppRole {
        role_id_file: std::path::PathBuf,
        secret_id_file: std::path::PathBuf,
    },
    TokenFile(std::path::PathBuf),
    Env,
}

/// A logged-in client.
pub struct Vault {
    client: VaultClient,
    pub address: String,
    pub mount: String,
    pub prefix: String,
    stats: Arc<VaultStats>,
    login: Login,
}

/// A public key as published at `<prefix>/sites/<site>/public`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub key: crate::keys::PublicKey,
    /// The private key's KV version (0 if not given).
    pub version: u64,
    /// Unix time (s) from which the key is used (0 if not given: at once).
    pub not_before: u64,
}

/// The result of a check-and-set write of a new site key.
pub enum CasWrite {
    Written(u64),
    /// Another writer got there first (two daemons rotating the same key).
    Conflict,
}

impl Vault {
    /// Builds a client from `[vault]` (or the environment) and checks the login with a
    /// token lookup-self (`sys/health` does not parse against OpenBao).
    pub async fn connect(cfg: Option<&VaultConfig>) -> Result<Vault> {
        // Must be in place before the first client; a second install is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let stats = stats().clone();
        let address = cfg
            .and_then(|c| c.address.clone())
            .or_else(|| std::env::var("VAULT_ADDR").ok().filter(|a| !a.is_empty()))
            .ok_or_else(|| anyhow!("no Vault address: set [vault] address or VAULT_ADDR"))?;
        let address = address.trim_end_matches('/').to_string();
        if !(address.starts_with("http://") || address.starts_with("https://"))
            || reqwest_url_invalid(&address)
        {
            bail!("invalid Vault address {address:?}: expected an http:// or https:// URL");
        }
        let mount = cfg.map_or("secret", |c| &c.mount).to_string();
        let prefix = cfg.map_or("sitewire", |c| &c.prefix).to_string();

        let mut settings = VaultClientSettingsBuilder::default();
        settings
            .address(&address)
            .token("")
            .timeout(Some(TIMEOUT))
            .verify(true);
        if let Some(ca) = cfg.and_then(|c| c.ca_cert.as_ref()) {
            settings.ca_certs(vec![ca.display().to_string()]);
        }
        let settings = settings
            .build()
            .map_err(|e| anyhow!("Vault at {address}: invalid client settings: {e}"))?;
        let client = VaultClient::new(settings).map_err(|e| {
            anyhow!(
                "Vault at {address}: cannot create a client: {}",
                describe(&e)
            )
        })?;

        let approle = cfg.and_then(|c| Some((c.role_id_file.clone()?, c.secret_id_file.clone()?)));
        let login = match (approle, cfg.and_then(|c| c.token_file.clone())) {
            (Some((role_id_file, secret_id_file)), _) => Login::AppRole {
                role_id_file,
                secret_id_file,
            },
            (None, Some(f)) => Login::TokenFile(f),
            (None, None) => Login::Env,
        };
        let mut v = Vault {
            client,
            address,
            mount,
            prefix,
            stats,
            login,
        };
        v.login().await?;
        v.check_login().await?;
        Ok(v)
    }

    /// Logs in (AppRole) or reads the token (token_file, VAULT_TOKEN) again.
    async fn login(&mut self) -> Result<()> {
        let address = &self.address;
        match &self.login {
            Login::AppRole {
                role_id_file,
                secret_id_file,
            } => {
                let role = read_trimmed(role_id_file, "role_id_file")?;
                let secret = read_trimmed(secret_id_file, "secret_id_file")?;
                match vaultrs::auth::approle::login(&self.client, APPROLE_MOUNT, &role, &secret)
                    .await
                {
                    Ok(auth) => {
                        self.stats.count("login", "ok");
                        self.client.set_token(&auth.client_token);
                        let _ = Zeroizing::new(auth.client_token);
                    }
                    Err(e) => {
                        let class = classify(&e);
                        self.stats.count("login", class);
                        self.stats.up.store(false, Ordering::Relaxed);
                        if class == "unreachable" {
                            bail!("cannot reach Vault at {address}: {}", describe(&e));
                        }
                        bail!(
                            "Vault at {address}: AppRole login (auth/{APPROLE_MOUNT}) failed: {}",
                            describe(&e)
                        );
                    }
                }
            }
            Login::TokenFile(f) => {
                let token = read_trimmed(f, "token_file")?;
                self.client.set_token(&token);
            }
            Login::Env => {
                let token = Zeroizing::new(
                    std::env::var("VAULT_TOKEN")
                        .ok()
                        .filter(|t| !t.is_empty())
                        .ok_or_else(|| {
                            anyhow!(
                                "no Vault credentials for {address}: set [vault] token_file, \
                                 role_id_file + secret_id_file, or VAULT_TOKEN"
                            )
                        })?,
                );
                self.client.set_token(&token);
            }
        }
        Ok(())
    }

    /// Keeps the login alive: renews the token once less than half its TTL is left
    /// (or less than `margin`), and logs in again when renewal fails.
    pub async fn keep_login(&mut self, margin: Duration) -> Result<()> {
        let r = vaultrs::token::lookup_self(&self.client).await;
        self.record("lookup", &r);
        let (ttl, creation_ttl, renewable) = match r {
            Ok(info) => (info.ttl, info.creation_ttl, info.renewable.unwrap_or(false)),
            Err(e) if classify(&e) == "unreachable" => {
                bail!("cannot reach Vault at {}: {}", self.address, describe(&e))
            }
            Err(_) => {
                // Expired or revoked: log in again.
                self.login().await?;
                return self.check_login().await;
            }
        };
        // ttl 0: a token that does not expire (a root token).
        if ttl == 0 || (ttl * 2 > creation_ttl && Duration::from_secs(ttl) > margin) {
            return Ok(());
        }
        if renewable {
            let r = vaultrs::token::renew_self(&self.client, None).await;
            self.record("renew", &r);
            match r {
                Ok(auth) => {
                    let _ = Zeroizing::new(auth.client_token);
                    tracing::debug!(address = %self.address, "Vault token renewed");
                    return Ok(());
                }
                Err(e) if classify(&e) == "unreachable" => {
                    bail!("cannot reach Vault at {}: {}", self.address, describe(&e))
                }
                Err(e) => {
                    tracing::warn!(address = %self.address, error = %describe(&e), "Vault token renewal failed; logging in again");
                }
            }
        }
        self.login().await?;
        self.check_login().await?;
        tracing::info!(address = %self.address, "logged in to Vault again");
        Ok(())
    }

    /// Reads the KV v2 secret at `path` (a given version, or the latest) as a map.
    async fn read_map(
        &self,
        path: &str,
        version: Option<u64>,
    ) -> Result<HashMap<String, serde_json::Value>> {
        let r = match version {
            Some(v) => vaultrs::kv2::read_version(&self.client, &self.mount, path, v).await,
            None => vaultrs::kv2::read(&self.client, &self.mount, path).await,
        };
        self.record("read", &r);
        r.map_err(|e| match e {
            ClientError::APIError { code: 404, .. } => anyhow!(
                "vault:{path} (Vault at {}, mount {}): no such secret",
                self.address,
                self.mount
            ),
            e => anyhow!(
                "vault:{path} (Vault at {}, mount {}): read failed: {}",
                self.address,
                self.mount,
                describe(&e)
            ),
        })
    }

    /// The published public key at `path`; None if nothing is published there.
    /// (A read of the data path only: the policy grants no metadata access there.)
    pub async fn read_published_opt(&self, path: &str) -> Result<Option<Published>> {
        let r = self.read_data(path).await;
        match r {
            Ok(data) => published_from(path, &data).map(Some),
            Err(ClientError::APIError { code: 404, .. }) => Ok(None),
            Err(e) => bail!(
                "vault:{path} (Vault at {}, mount {}): read failed: {}",
                self.address,
                self.mount,
                describe(&e)
            ),
        }
    }

    /// The published public key at `path`.
    pub async fn read_published(&self, path: &str) -> Result<Published> {
        let data = self.read_map(path, None).await?;
        published_from(path, &data)
    }

    /// The current version of the KV v2 secret at `path` (0: none).
    pub async fn current_version(&self, path: &str) -> Result<u64> {
        let r = vaultrs::kv2::read_metadata(&self.client, &self.mount, path).await;
        self.record("read", &r);
        match r {
            Ok(m) => Ok(m.current_version),
            Err(ClientError::APIError { code: 404, .. }) => Ok(0),
            Err(e) => bail!(
                "vault:{path} (Vault at {}): reading its metadata failed: {}",
                self.address,
                describe(&e)
            ),
        }
    }

    /// The site key stored as `version` at `path`.
    pub async fn read_private(&self, path: &str, version: u64) -> Result<PrivateKey> {
        let data = self.read_map(path, Some(version)).await?;
        let text = Zeroizing::new(
            data.get("private_key")
                .or_else(|| data.get("key"))
                .and_then(|v| v.as_str())
                .ok_or_else(|| anyhow!("vault:{path} version {version}: no private_key field"))?
                .to_string(),
        );
        drop(data);
        PrivateKey::from_base64(&text).map_err(|_| {
            anyhow!("vault:{path} version {version}: private_key is not base64 of 32 bytes")
        })
    }

    /// Writes a new site key at `path` only if its current version is `cas`.
    pub async fn write_private(&self, path: &str, key: &PrivateKey, cas: u64) -> Result<CasWrite> {
        let b64 = key.to_base64();
        let secret = PrivateSecret {
            private_key: &b64,
            public_key: key.public_key().to_base64(),
            created: unix_now(),
        };
        match self.write_cas(path, &secret, cas as u32).await {
            Ok(v) => Ok(CasWrite::Written(v)),
            Err(e) if is_cas_conflict(&e) => Ok(CasWrite::Conflict),
            Err(e) => bail!(
                "writing a new site key to {}/{path} (Vault at {}) failed: {}",
                self.mount,
                self.address,
                describe(&e)
            ),
        }
    }

    /// Publishes the site's public key, unless a newer version of the site key is published
    /// there already: then returns that one and writes nothing.
    ///
    /// Two daemons sharing a site key can both store a new version (the second one's
    /// check-and-set write builds on the first's) and then publish in either order, so the
    /// publication itself is a check-and-set write on what was read: the published version
    /// never goes backwards.
    pub async fn publish(&self, path: &str, p: &Published) -> Result<Option<Published>> {
        let failed = |e: &ClientError| {
            anyhow!(
                "publishing the public key at {}/{path} (Vault at {}) failed: {}",
                self.mount,
                self.address,
                describe(e)
            )
        };
        let published = serde_json::json!({
            "public_key": p.key.to_base64(),
            "version": p.version,
            "not_before": p.not_before,
        });
        for _ in 0..10 {
            let endpoint = vaultrs::api::kv2::requests::ReadSecretRequest::builder()
                .mount(&self.mount)
                .path(path)
                .build()
                .map_err(|e| anyhow!("publishing at {}/{path}: {e}", self.mount))?;
            let r = vaultrs::api::exec_with_result(&self.client, endpoint).await;
            self.record("read", &r);
            let cas = match r {
                Ok(current) => {
                    // A publication we cannot read is overwritten.
                    let there = serde_json::from_value(current.data)
                        .ok()
                        .and_then(|data| published_from(path, &data).ok());
                    if let Some(q) = there.filter(|q| q.version > p.version) {
                        return Ok(Some(q));
                    }
                    current.metadata.version
                }
                Err(ClientError::APIError { code: 404, .. }) => 0,
                Err(e) => return Err(failed(&e)),
            };
            match self.write_cas(path, &published, cas as u32).await {
                Ok(_) => return Ok(None),
                // Someone published between our read and write: look again.
                Err(e) if is_cas_conflict(&e) => {}
                Err(e) => return Err(failed(&e)),
            }
        }
        bail!(
            "publishing the public key at {}/{path} (Vault at {}) failed: it kept changing under \
             10 check-and-set writes",
            self.mount,
            self.address
        )
    }

    async fn check_login(&self) -> Result<()> {
        match self.client.lookup().await {
            Ok(_) => {
                self.stats.count("lookup", "ok");
                self.stats.up.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                let class = classify(&e);
                self.stats.count("lookup", class);
                self.stats.up.store(false, Ordering::Relaxed);
                match class {
                    "unreachable" => {
                        bail!("cannot reach Vault at {}: {}", self.address, describe(&e))
                    }
                    "denied" => bail!(
                        "Vault at {} rejected the token (token lookup-self: {}); \
                         check token_file / VAULT_TOKEN",
                        self.address,
                        describe(&e)
                    ),
                    _ => bail!(
                        "Vault at {}: token lookup-self failed: {}",
                        self.address,
                        describe(&e)
                    ),
                }
            }
        }
    }

    /// The fields of the KV v2 secret at `path`, the outcome recorded.
    async fn read_data(
        &self,
        path: &str,
    ) -> Result<HashMap<String, serde_json::Value>, ClientError> {
        let r = vaultrs::kv2::read(&self.client, &self.mount, path).await;
        self.record("read", &r);
        r
    }

    fn record<T>(&self, op: &'static str, r: &Result<T, ClientError>) {
        let class = match r {
            Ok(_) => "ok",
            Err(e) => classify(e),
        };
        self.stats.count(op, class);
        self.stats
            .up
            .store(class != "unreachable", Ordering::Relaxed);
    }

    /// Reads `field` (or `key`) of the KV v2 secret at `path` and decodes it as a
    /// 32-byte base64 key.
    pub async fn read_key(&self, path: &str, field: &str) -> Result<Zeroizing<[u8; 32]>> {
        let r = self.read_data(path).await;
        let where_ = format!(
            "vault:{path} (Vault at {}, mount {})",
            self.address, self.mount
        );
        let data = match r {
            Ok(d) => d,
            Err(ClientError::APIError { code: 404, .. }) => {
                bail!("{where_}: no such secret")
            }
            Err(e) => bail!("{where_}: read failed: {}", describe(&e)),
        };
        let value = data
            .get(field)
            .or_else(|| data.get("key"))
            .ok_or_else(|| anyhow!("{where_}: the secret has no {field:?} (or \"key\") field"))?;
        let text = Zeroizing::new(
            value
                .as_str()
                .ok_or_else(|| anyhow!("{where_}: field {field:?} is not a string"))?
                .to_string(),
        );
        // Wipe the parsed map's copies as far as we can.
        drop(data);
        let bytes = keys::decode_key(&text)
            .map_err(|_| anyhow!("{where_}: field {field:?} is not base64 of 32 bytes"))?;
        Ok(Zeroizing::new(bytes))
    }

    pub fn site_path(&self, site: &str, which: &str) -> String {
        format!("{}/sites/{site}/{which}", self.prefix)
    }

    /// Writes `data` at `path` with check-and-set `cas` (0: only if absent).
    async fn write_cas<T: serde::Serialize>(
        &self,
        path: &str,
        data: &T,
        cas: u32,
    ) -> Result<u64, ClientError> {
        let r = vaultrs::kv2::set_with_options(
            &self.client,
            &self.mount,
            path,
            data,
            vaultrs::api::kv2::requests::SetSecretRequestOptions { cas },
        )
        .await;
        self.record("write", &r);
        r.map(|m| m.version)
    }
}

/// Vault refused a write because the secret's version was not the check-and-set one.
fn is_cas_conflict(e: &ClientError) -> bool {
    matches!(e, ClientError::APIError { code: 400, errors }
        if errors.iter().any(|e| e.contains("check-and-set")))
}

fn published_from(path: &str, data: &HashMap<String, serde_json::Value>) -> Result<Published> {
    let text = data
        .get("public_key")
        .or_else(|| data.get("key"))
        .and_then(|v| v.as_str())
        .ok_or_else(|| anyhow!("vault:{path}: no \"public_key\" string field"))?;
    let key = crate::keys::PublicKey::from_base64(text)
        .map_err(|_| anyhow!("vault:{path}: public_key is not base64 of 32 bytes"))?;
    let num = |k: &str| data.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    Ok(Published {
        key,
        version: num("version"),
        not_before: num("not_before"),
    })
}

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn reqwest_url_invalid(address: &str) -> bool {
    // Reject what would make the settings builder panic: no host after the scheme.
    let rest = address.split_once("://").map_or("", |(_, r)| r);
    rest.is_empty() || rest.starts_with('/') || rest.contains(char::is_whitespace)
}

fn read_trimmed(path: &Path, what: &str) -> Result<Zeroizing<String>> {
    let text = keys::read_secret_file(path)
        .with_context(|| format!("[vault] {what} {}", path.display()))?;
    let t = Zeroizing::new(text.trim().to_string());
    if t.is_empty() {
        bail!("[vault] {what} {}: the file is empty", path.display());
    }
    Ok(t)
}

// ---- keys resolved at startup ----

/// (path, field) -> key.
type Resolved = Mutex<HashMap<(String, &'static str), Zeroizing<[u8; 32]>>>;

fn resolved() -> &'static Resolved {
    static KEYS: OnceLock<Resolved> = OnceLock::new();
    KEYS.get_or_init(Default::default)
}

/// Reads every `vault:` reference of `cfg` from Vault and keeps the keys in memory for
/// [`resolved_key`]; returns the client for the daemon's Vault task. If Vault cannot be
/// reached and `[vault] cache_key_file` is set, the keys come from the encrypted cache
/// the last run left (`Ok(None)`, the task connects later); without a cache the error
/// names the address and the paths.
pub async fn resolve(cfg: &Config) -> Result<Option<Vault>> {
    let refs = vault_refs(cfg);
    if refs.is_empty() {
        return Ok(None);
    }
    match resolve_from_vault(cfg, &refs).await {
        Ok(v) => {
            if let Err(e) = save_cache(cfg) {
                tracing::warn!(error = %format!("{e:#}"), "could not write the Vault key cache");
            }
            Ok(Some(v))
        }
        Err(e) => {
            let Some(cache) = cache_paths(cfg) else {
                return Err(e.context(
                    "no key cache to start from (set [vault] cache_key_file to keep one)",
                ));
            };
            if !cache.0.exists() {
                return Err(e.context(format!(
                    "no key cache to start from yet ({} does not exist)",
                    cache.0.display()
                )));
            }
            load_cache(cfg).with_context(|| format!("{e:#}; and the key cache"))?;
            tracing::warn!(
                error = %format!("{e:#}"),
                cache = %cache.0.display(),
                "Vault unavailable: starting from the cached keys; retrying Vault in the background"
            );
            Ok(None)
        }
    }
}

async fn resolve_from_vault(cfg: &Config, refs: &[(String, &'static str)]) -> Result<Vault> {
    let v = Vault::connect(cfg.vault.as_ref()).await.with_context(|| {
        let paths: Vec<String> = refs.iter().map(|(p, _)| format!("vault:{p}")).collect();
        format!("loading {} from Vault", paths.join(", "))
    })?;
    for (path, field) in refs {
        let key = v.read_key(path, field).await?;
        set_resolved(path, field, key);
    }
    tracing::info!(address = %v.address, "keys loaded from Vault");
    Ok(v)
}

/// Replaces a key loaded from Vault (after a rotation).
pub fn set_resolved(path: &str, field: &'static str, key: Zeroizing<[u8; 32]>) {
    resolved()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert((path.to_string(), field), key);
}

// ---- the encrypted key cache ----

const CACHE_MAGIC: &str = "sitewire-vault-cache-v1";

/// (cache file, cache key file), when the cache is enabled.
fn cache_paths(cfg: &Config) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let key_file = cfg.vault.as_ref()?.cache_key_file.clone()?;
    Some((
        cfg.site
            .state_dir
            .join(format!("{}.vault-cache", cfg.site.name)),
        key_file,
    ))
}

/// The cache's AEAD key: HKDF-SHA256 over the cache key file's contents, bound to the
/// site name.
fn cache_key(cfg: &Config, key_file: &Path) -> Result<ring::aead::LessSafeKey> {
    let ikm = read_trimmed(key_file, "cache_key_file")?;
    if ikm.len() < 16 {
        bail!(
            "[vault] cache_key_file {}: too short (give at least 32 random bytes, e.g. base64)",
            key_file.display()
        );
    }
    let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, CACHE_MAGIC.as_bytes());
    let prk = salt.extract(ikm.as_bytes());
    let info = [cfg.site.name.as_bytes()];
    let okm = prk
        .expand(&info, &ring::aead::CHACHA20_POLY1305)
        .map_err(|_| anyhow!("cache key derivation failed"))?;
    Ok(ring::aead::LessSafeKey::new(ring::aead::UnboundKey::from(
        okm,
    )))
}

#[derive(serde::Serialize, serde::Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
struct CacheEntry {
    path: String,
    field: String,
    key: String,
}

/// Writes every key loaded from Vault, encrypted, to `<state_dir>/<site>.vault-cache`
/// (0600, written beside and renamed into place). No-op without `cache_key_file`.
pub fn save_cache(cfg: &Config) -> Result<()> {
    use base64::Engine as _;
    let Some((file, key_file)) = cache_paths(cfg) else {
        return Ok(());
    };
    let key = cache_key(cfg, &key_file)?;
    let entries: Vec<CacheEntry> = resolved()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|((path, field), k)| CacheEntry {
            path: path.clone(),
            field: field.to_string(),
            key: keys::encode_key(k),
        })
        .collect();
    let mut plain = Zeroizing::new(serde_json::to_vec(&entries)?);
    drop(entries);
    let mut nonce = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .map_err(|_| anyhow!("no randomness for the cache nonce"))?;
    let mut sealed = std::mem::take(&mut *plain);
    key.seal_in_place_append_tag(
        ring::aead::Nonce::assume_unique_for_key(nonce),
        ring::aead::Aad::from(CACHE_MAGIC.as_bytes()),
        &mut sealed,
    )
    .map_err(|_| anyhow!("sealing the cache failed"))?;
    let mut blob = nonce.to_vec();
    blob.extend_from_slice(&sealed);
    let text = format!(
        "{CACHE_MAGIC}\n{}",
        base64::engine::general_purpose::STANDARD.encode(&blob)
    );
    std::fs::create_dir_all(&cfg.site.state_dir)
        .with_context(|| format!("creating state_dir {}", cfg.site.state_dir.display()))?;
    let tmp = file.with_extension("vault-cache.new");
    keys::write_secret_file(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &file).with_context(|| format!("renaming to {}", file.display()))?;
    Ok(())
}

/// Loads the keys from the encrypted cache into memory for [`resolved_key`].
fn load_cache(cfg: &Config) -> Result<()> {
    use base64::Engine as _;
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;
    let Some((file, key_file)) = cache_paths(cfg) else {
        bail!("no key cache configured");
    };
    let shown = file.display().to_string();
    let mut f = std::fs::File::open(&file).with_context(|| format!("opening {shown}"))?;
    let mode = f.metadata()?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        bail!("{shown}: mode {mode:04o}: the key cache must be readable by its owner only (0600)");
    }
    let mut text = Zeroizing::new(String::new());
    f.by_ref().take(1 << 20).read_to_string(&mut text)?;
    let body = text
        .strip_prefix(CACHE_MAGIC)
        .map(str::trim)
        .ok_or_else(|| anyhow!("{shown}: not a sitewire Vault key cache"))?;
    let blob = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|_| anyhow!("{shown}: damaged (not base64)"))?;
    if blob.len() < 12 + 16 {
        bail!("{shown}: damaged (too short)");
    }
    let key = cache_key(cfg, &key_file)?;
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&blob[..12]);
    let mut sealed = Zeroizing::new(blob[12..].to_vec());
    let plain = key
        .open_in_place(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::from(CACHE_MAGIC.as_bytes()),
            &mut sealed,
        )
        .map_err(|_| {
            anyhow!(
                "{shown}: cannot be decrypted with cache_key_file {} (another key, or damaged)",
                key_file.display()
            )
        })?;
    let entries: Vec<CacheEntry> =
        serde_json::from_slice(plain).map_err(|_| anyhow!("{shown}: damaged contents"))?;
    for (path, field) in vault_refs(cfg) {
        let e = entries
            .iter()
            .find(|e| e.path == path && e.field == field)
            .ok_or_else(|| anyhow!("{shown}: has no key for vault:{path} (new reference?)"))?;
        let k = keys::decode_key(&e.key)
            .map_err(|_| anyhow!("{shown}: damaged key for vault:{path}"))?;
        set_resolved(&path, field, Zeroizing::new(k));
    }
    Ok(())
}

/// A key read by [`resolve`].
pub fn resolved_key(path: &str, field: &'static str) -> Result<Zeroizing<[u8; 32]>> {
    resolved()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&(path.to_string(), field))
        .cloned()
        .ok_or_else(|| {
            anyhow!("vault:{path} was not loaded from Vault at startup (restart the daemon to read new Vault references)")
        })
}

// ---- sitewire vault init ----

/// The private secret as written (the borrowed key text is zeroized by its owner).
#[derive(serde::Serialize)]
struct PrivateSecret<'a> {
    private_key: &'a str,
    public_key: String,
    created: u64,
}

/// What `sitewire vault init` did.
pub struct InitOutcome {
    pub private_path: String,
    pub public_path: String,
    pub public_key: String,
    pub version: u64,
    pub policy: String,
}

/// Generates the site key, writes it with check-and-set 0 (never overwriting an existing
/// key), publishes the public key and returns the policy the site needs.
pub async fn init(cfg: &Config) -> Result<InitOutcome> {
    let v = Vault::connect(cfg.vault.as_ref()).await?;
    let site = &cfg.site.name;
    let private_path = v.site_path(site, "private");
    let public_path = v.site_path(site, "public");
    let key = PrivateKey::generate();
    let public = key.public_key();
    let not_before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let private_b64 = key.to_base64();
    let secret = PrivateSecret {
        private_key: &private_b64,
        public_key: public.to_base64(),
        created: not_before,
    };
    let version = match v.write_cas(&private_path, &secret, 0).await {
        Ok(version) => version,
        Err(ClientError::APIError {
            code: 400,
            ref errors,
        }) if errors.iter().any(|e| e.contains("check-and-set")) => {
            bail!(
                "a site key already exists at {}/{private_path} (Vault at {}): not overwritten \
                 (check-and-set write with cas=0); use key rotation to replace it",
                v.mount,
                v.address
            )
        }
        Err(e) => bail!(
            "writing the site key to {}/{private_path} (Vault at {}) failed: {}",
            v.mount,
            v.address,
            describe(&e)
        ),
    };
    drop(private_b64);
    let published = serde_json::json!({
        "public_key": public.to_base64(),
        "version": version,
        "not_before": not_before,
    });
    let r = vaultrs::kv2::set(&v.client, &v.mount, &public_path, &published).await;
    v.record("write", &r);
    if let Err(e) = r {
        bail!(
            "the site key was written ({}/{private_path} version {version}) but publishing the \
             public key at {}/{public_path} (Vault at {}) failed: {}",
            v.mount,
            v.mount,
            v.address,
            describe(&e)
        );
    }
    let policy = policy(cfg, &v.mount, &v.prefix);
    Ok(InitOutcome {
        private_path,
        public_path,
        public_key: public.to_base64(),
        version,
        policy,
    })
}

/// The least-privilege policy (HCL) a site needs.
pub fn policy(cfg: &Config, mount: &str, prefix: &str) -> String {
    let site = &cfg.site.name;
    let mut out = format!(
        "# sitewire site {site:?}: its own key (read, check-and-set writes for rotation),\n\
         # its published public key, and the peers' published public keys (read only).\n\
         path \"{mount}/data/{prefix}/sites/{site}/private\" {{\n  capabilities = [\"create\", \"read\", \"update\"]\n}}\n\
         path \"{mount}/metadata/{prefix}/sites/{site}/private\" {{\n  capabilities = [\"read\"]\n}}\n\
         path \"{mount}/data/{prefix}/sites/{site}/public\" {{\n  capabilities = [\"create\", \"read\", \"update\"]\n}}\n\
         path \"{mount}/data/{prefix}/sites/+/public\" {{\n  capabilities = [\"read\"]\n}}\n"
    );
    let own = [
        format!("{prefix}/sites/{site}/private"),
        format!("{prefix}/sites/{site}/public"),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for (path, _) in vault_refs(cfg) {
        let covered = own.contains(&path)
            || (path.starts_with(&format!("{prefix}/sites/")) && path.ends_with("/public"));
        if !covered && seen.insert(path.clone()) {
            out.push_str(&format!(
                "path \"{mount}/data/{path}\" {{\n  capabilities = [\"read\"]\n}}\n"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn site(dir: &Path, site: &str, key_file: &Path) -> Config {
        let text = format!(
            "[site]\nname = \"{site}\"\ninterface = \"sw0\"\nlisten_port = 51820\n\
             private_key = \"vault:cache-unit/{site}/private\"\nstate_dir = \"state\"\n\n\
             [[tunnel]]\nname = \"peer\"\npeer_public_key = \"vault:cache-unit/{site}-peer/public\"\n\
             remote_subnets = [\"10.9.0.0/24\"]\n\n[vault]\ncache_key_file = \"{}\"\n",
            key_file.display()
        );
        Config::parse(&text, dir).unwrap()
    }

    #[test]
    fn key_cache_round_trip_and_refusals() {
        let dir = std::env::temp_dir().join(format!("sitewire-cache-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key_file = dir.join("cache.key");
        keys::write_secret_file(&key_file, "a-cache-key-of-enough-length").unwrap();
        // Site names unique to this test keep the process-wide key map apart.
        let cfg = site(&dir, "cacheunit", &key_file);
        let (own, peer) = ([7u8; 32], [9u8; 32]);
        set_resolved(
            "cache-unit/cacheunit/private",
            "private_key",
            Zeroizing::new(own),
        );
        set_resolved(
            "cache-unit/cacheunit-peer/public",
            "public_key",
            Zeroizing::new(peer),
        );
        save_cache(&cfg).unwrap();
        let file = dir.join("state/cacheunit.vault-cache");
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.starts_with(CACHE_MAGIC));
        assert!(
            !text.contains(&keys::encode_key(&own)) && !text.contains(&keys::encode_key(&peer))
        );
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );

        set_resolved(
            "cache-unit/cacheunit/private",
            "private_key",
            Zeroizing::new([0; 32]),
        );
        load_cache(&cfg).unwrap();
        assert_eq!(
            *resolved_key("cache-unit/cacheunit/private", "private_key").unwrap(),
            own
        );
        assert_eq!(
            *resolved_key("cache-unit/cacheunit-peer/public", "public_key").unwrap(),
            peer
        );

        // Another cache key: refused, naming the file.
        keys::write_secret_file(&key_file, "another-cache-key-of-enough-length").unwrap();
        let e = format!("{:#}", load_cache(&cfg).unwrap_err());
        assert!(
            e.contains("cannot be decrypted") && e.contains("cache.key"),
            "{e}"
        );
        // Readable by others: refused.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = format!("{:#}", load_cache(&cfg).unwrap_err());
        assert!(e.contains("0600"), "{e}");
        // The cache of another site does not open (the key is bound to the site name).
        keys::write_secret_file(&key_file, "a-cache-key-of-enough-length").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let other = site(&dir, "cacheunit2", &key_file);
        std::fs::copy(&file, dir.join("state/cacheunit2.vault-cache")).unwrap();
        assert!(load_cache(&other).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
