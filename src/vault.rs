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
            let text = errors.join("; ");
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

/// A logged-in client.
pub struct Vault {
    client: VaultClient,
    pub address: String,
    pub mount: String,
    pub prefix: String,
    stats: Arc<VaultStats>,
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
        let mut client = VaultClient::new(settings).map_err(|e| {
            anyhow!(
                "Vault at {address}: cannot create a client: {}",
                describe(&e)
            )
        })?;

        let approle =
            cfg.and_then(|c| Some((c.role_id_file.as_ref()?, c.secret_id_file.as_ref()?)));
        if let Some((role_file, secret_file)) = approle {
            let role = read_trimmed(role_file, "role_id_file")?;
            let secret = read_trimmed(secret_file, "secret_id_file")?;
            match vaultrs::auth::approle::login(&client, APPROLE_MOUNT, &role, &secret).await {
                Ok(auth) => {
                    stats.count("login", "ok");
                    client.set_token(&auth.client_token);
                    let _ = Zeroizing::new(auth.client_token);
                }
                Err(e) => {
                    stats.count("login", classify(&e));
                    stats.up.store(false, Ordering::Relaxed);
                    bail!(
                        "Vault at {address}: AppRole login (auth/{APPROLE_MOUNT}) failed: {}",
                        describe(&e)
                    );
                }
            }
        } else {
            let token = match cfg.and_then(|c| c.token_file.as_ref()) {
                Some(f) => read_trimmed(f, "token_file")?,
                None => Zeroizing::new(
                    std::env::var("VAULT_TOKEN")
                        .ok()
                        .filter(|t| !t.is_empty())
                        .ok_or_else(|| {
                            anyhow!(
                                "no Vault credentials for {address}: set [vault] token_file, \
                                 role_id_file + secret_id_file, or VAULT_TOKEN"
                            )
                        })?,
                ),
            };
            client.set_token(&token);
        }
        let v = Vault {
            client,
            address,
            mount,
            prefix,
            stats,
        };
        v.check_login().await?;
        Ok(v)
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
        let r = vaultrs::kv2::read::<HashMap<String, serde_json::Value>>(
            &self.client,
            &self.mount,
            path,
        )
        .await;
        self.record("read", &r);
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
/// [`resolved_key`]. Fails (naming the address and the path) if Vault cannot be reached.
pub async fn resolve(cfg: &Config) -> Result<()> {
    let refs = vault_refs(cfg);
    if refs.is_empty() {
        return Ok(());
    }
    let v = Vault::connect(cfg.vault.as_ref()).await.with_context(|| {
        let paths: Vec<String> = refs.iter().map(|(p, _)| format!("vault:{p}")).collect();
        format!("loading {} from Vault", paths.join(", "))
    })?;
    for (path, field) in refs {
        let key = v.read_key(&path, field).await?;
        resolved()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((path, field), key);
    }
    tracing::info!(address = %v.address, "keys loaded from Vault");
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
