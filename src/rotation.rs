//! The daemon's Vault task: keeps the Vault login alive, follows the public keys the
//! peers publish, rotates the site's static key (on schedule or on request) and rides out
//! Vault outages on the keys it holds.
//!
//! Rotation protocol (static-keyed WireGuard tunnels), make-before-break:
//!
//! 1. The rotating site generates a key and accepts handshakes to it at once.
//! 2. It writes the key as the next version of its private secret with check-and-set on
//!    the version it read: of two daemons rotating the same key, one write fails, and
//!    that daemon adopts the winner's version instead (nothing is lost).
//! 3. It publishes `{public_key, version, not_before}` with `not_before` at least two
//!    polls ahead, so that every peer has read it before it is used.
//! 4. Peers polling the published key accept handshakes from the new key as soon as they
//!    see it; at `not_before` both sides start a session under the new keys beside the
//!    current one, which keeps carrying traffic until the new one does. The replaced key
//!    is still accepted in handshakes until the next rotation.
//!
//! IKE-keyed tunnels (`keying = "ike"`) learn the new key over their authenticated IKE SA
//! instead (a private-use notify with the key and `not_before`); at the switch both sides
//! move their IKE identity and PSK to the new keys, and a CHILD SA rekey brings a
//! WireGuard session under the new static keys, make-before-break like every rekey.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::config::{Config, KeyRef, PeerKey};
use crate::dataplane::{Dataplane, MAX_PACKET};
use crate::keys::PrivateKey;
use crate::vault::{unix_now, CasWrite, Published, Vault};

const STEP: Duration = Duration::from_millis(250);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const ROTATE_RETRY_MAX: Duration = Duration::from_secs(3600);

/// Requests from the control socket.
pub enum Command {
    /// `sitewire rotate --key`: rotate the site's static key now.
    RotateKey {
        reply: oneshot::Sender<Result<String, String>>,
    },
}

struct PeerWatch {
    tunnel: String,
    path: String,
    /// Announced, switched to at its `not_before`.
    pending: Option<Published>,
}

pub struct Task {
    cfg: Config,
    dp: Arc<Dataplane>,
    vault: Option<Vault>,
    /// The site key's secret and published paths (None: the site key is not in Vault).
    own: Option<(String, String)>,
    /// What we last saw (or wrote) at our published path.
    published: Option<Published>,
    /// Our next key, switched to at its `not_before`.
    scheduled: Option<(PrivateKey, Published)>,
    /// Written to Vault but not published yet (publishing is retried).
    unpublished: Option<(PrivateKey, u64)>,
    peers: Vec<PeerWatch>,
    backoff: Duration,
    next_poll: Instant,
    /// After a failed scheduled rotation: when to try again, and the wait used.
    rotate_retry: Option<(Instant, Duration)>,
    down_since: Option<Instant>,
    out: Vec<u8>,
    /// The IKE driver, which tells IKE-keyed peers about our next key.
    ike: Option<mpsc::Sender<crate::ikewg::Command>>,
    /// Version of the scheduled key announced over IKE.
    ike_announced: Option<u64>,
}

/// What publishing a new site key came to.
enum PublishOutcome {
    /// Ours is published.
    Ours,
    /// A newer version (another daemon's) is published; ours was not.
    Newer(Published),
}

/// The published path that goes with the private path `p`.
fn public_path_of(p: &str, vault_prefix: &str, site: &str) -> String {
    match p.strip_suffix("/private") {
        Some(base) => format!("{base}/public"),
        None => format!("{vault_prefix}/sites/{site}/public"),
    }
}

impl Task {
    pub fn new(
        cfg: Config,
        dp: Arc<Dataplane>,
        vault: Option<Vault>,
        ike: Option<mpsc::Sender<crate::ikewg::Command>>,
    ) -> Self {
        let prefix = cfg.vault.as_ref().map_or("sitewire", |v| &v.prefix);
        let own = match &cfg.site.private_key {
            KeyRef::Vault(p) => Some((p.clone(), public_path_of(p, prefix, &cfg.site.name))),
            KeyRef::File(_) => None,
        };
        let table = dp.tunnels.load();
        let peers = cfg
            .tunnels
            .iter()
            .filter_map(|t| match &t.peer_public_key {
                Some(PeerKey::Vault(p)) => {
                    if table.by_name(&t.name).is_some_and(|w| w.spec.ike) {
                        tracing::info!(tunnel = %t.name, "peer key changes of IKE-keyed tunnels arrive over the IKE SA, not from Vault");
                        None
                    } else {
                        Some(PeerWatch {
                            tunnel: t.name.clone(),
                            path: p.clone(),
                            pending: None,
                        })
                    }
                }
                _ => None,
            })
            .collect();
        drop(table);
        Self {
            cfg,
            dp,
            vault,
            own,
            published: None,
            scheduled: None,
            unpublished: None,
            peers,
            backoff: BACKOFF_MIN,
            next_poll: Instant::now(),
            rotate_retry: None,
            down_since: None,
            out: vec![0u8; MAX_PACKET],
            ike,
            ike_announced: None,
        }
    }

    fn poll_every(&self) -> Duration {
        self.cfg
            .vault
            .as_ref()
            .map_or(Duration::from_secs(60), |v| v.poll_every)
    }

    fn rotate_every(&self) -> Option<Duration> {
        self.cfg.vault.as_ref().and_then(|v| v.rotate_every)
    }

    /// How far ahead a new key's `not_before` lies: two polls, at least 2 s.
    fn grace(&self) -> u64 {
        (self.poll_every() * 2)
            .max(Duration::from_secs(2))
            .as_secs_f64()
            .ceil() as u64
    }

    pub async fn run(mut self, mut cmds: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(STEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(cmd) = cmds.recv() => match cmd {
                    Command::RotateKey { reply } => {
                        let r = self.rotate_now("requested").await;
                        if let Err(e) = &r {
                            tracing::error!(error = %format!("{e:#}"), "key rotation failed");
                        }
                        let _ = reply.send(r.map_err(|e| format!("{e:#}")));
                    }
                },
            }
            self.announce_over_ike();
            self.switch_due();
            if Instant::now() >= self.next_poll {
                match self.poll().await {
                    Ok(()) => {
                        if let Some(since) = self.down_since.take() {
                            tracing::info!(down_for = ?since.elapsed(), "Vault reachable again");
                        }
                        self.backoff = BACKOFF_MIN;
                        self.next_poll = Instant::now() + self.poll_every();
                    }
                    Err(e) => {
                        self.down_since.get_or_insert_with(Instant::now);
                        tracing::warn!(
                            error = %format!("{e:#}"),
                            retry_in = ?self.backoff,
                            "Vault request failed; running on the keys held"
                        );
                        self.next_poll = Instant::now() + self.backoff;
                        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
        }
    }

    async fn connected(&mut self) -> Result<&mut Vault> {
        if self.vault.is_none() {
            self.vault = Some(Vault::connect(self.cfg.vault.as_ref()).await?);
        }
        self.vault
            .as_mut()
            .ok_or_else(|| anyhow!("no Vault client"))
    }

    /// One round: login, our own published key, the peers' keys, a due rotation.
    async fn poll(&mut self) -> Result<()> {
        // Renewed at half its TTL, or when fewer than three polls are left.
        let margin = self.poll_every() * 3;
        self.connected().await?.keep_login(margin).await?;
        if let Some((key, version)) = self.unpublished.take() {
            match self.publish_and_schedule(key.clone(), version).await {
                // A newer one is adopted by follow_own() below.
                Ok(_) => {}
                Err(e) => {
                    self.unpublished = Some((key, version));
                    return Err(e);
                }
            }
        }
        self.follow_own().await?;
        self.follow_peers().await?;
        if let (Some(every), Some(p)) = (self.rotate_every(), &self.published) {
            let due = p.not_before.saturating_add(every.as_secs().max(1));
            let retry_ok = self.rotate_retry.is_none_or(|(at, _)| Instant::now() >= at);
            if self.scheduled.is_none()
                && self.unpublished.is_none()
                && unix_now() >= due
                && retry_ok
            {
                match self.rotate_now("scheduled").await {
                    Ok(_) => self.rotate_retry = None,
                    Err(e) if !crate::vault::stats().is_up() => {
                        // Vault went away: retried with the polls' backoff.
                        tracing::warn!(error = %format!("{e:#}"), "scheduled key rotation failed");
                    }
                    Err(e) => {
                        // Retried after 1 min, doubling up to 1 h (a denied write stays denied).
                        let wait = self.rotate_retry.map_or(Duration::from_secs(60), |(_, w)| {
                            (w * 2).min(ROTATE_RETRY_MAX)
                        });
                        self.rotate_retry = Some((Instant::now() + wait, wait));
                        tracing::error!(error = %format!("{e:#}"), retry_in = ?wait, "scheduled key rotation failed");
                    }
                }
            }
        }
        Ok(())
    }

    /// Adopts a site key another daemon (sharing our Vault path) published.
    async fn follow_own(&mut self) -> Result<()> {
        let Some((private_path, public_path)) = self.own.clone() else {
            return Ok(());
        };
        let ours = self.dp.public();
        let Some(p) = self.read_own_published(&private_path, &public_path).await? else {
            return Ok(());
        };
        let scheduled = self.scheduled.as_ref().map(|(_, s)| s.key);
        if p.key == ours || Some(p.key) == scheduled {
            if p.key == ours {
                let _ = self.dp.key_since.compare_exchange(
                    0,
                    p.not_before.min(unix_now()),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            self.published = Some(p);
            return Ok(());
        }
        if self.published.is_some_and(|old| p.version < old.version) {
            return Ok(()); // an older publication: ignore
        }
        let key = self
            .connected()
            .await?
            .read_private(&private_path, p.version)
            .await?;
        if key.public_key() != p.key {
            bail!(
                "vault:{public_path} names version {} of vault:{private_path}, whose key does not \
                 match the published public key: not adopted",
                p.version
            );
        }
        tracing::info!(
            version = p.version,
            public_key = %p.key,
            not_before = p.not_before,
            "a new site key was published by another daemon: adopting it"
        );
        self.dp.announce_key(key.clone());
        self.scheduled = Some((key, p));
        self.published = Some(p);
        Ok(())
    }

    /// Our publication; if there is none (a key written by hand), the key in use is
    /// published now.
    async fn read_own_published(
        &mut self,
        private_path: &str,
        public_path: &str,
    ) -> Result<Option<Published>> {
        let ours = self.dp.public();
        let v = self.connected().await?;
        if let Some(p) = v.read_published_opt(public_path).await? {
            return Ok(Some(p));
        }
        let p = Published {
            key: ours,
            version: v.current_version(private_path).await?,
            not_before: unix_now(),
        };
        if let Some(newer) = v.publish(public_path, &p).await? {
            return Ok(Some(newer));
        }
        tracing::info!(path = %public_path, public_key = %p.key, "nothing published for the site key: published the key in use");
        self.published = Some(p);
        Ok(None)
    }

    async fn follow_peers(&mut self) -> Result<()> {
        let mut seen = Vec::new();
        let paths: Vec<String> = self.peers.iter().map(|w| w.path.clone()).collect();
        let v = self.connected().await?;
        for path in &paths {
            // A peer that publishes nothing (yet) keeps the key it has.
            seen.push(v.read_published_opt(path).await?);
        }
        let table = self.dp.tunnels.load_full();
        for (w, p) in self.peers.iter_mut().zip(seen) {
            let (Some(t), Some(p)) = (table.by_name(&w.tunnel), p) else {
                continue;
            };
            if t.peer_public_key() == p.key || w.pending.is_some_and(|q| q.key == p.key) {
                continue;
            }
            tracing::info!(
                tunnel = %w.tunnel,
                public_key = %p.key,
                version = p.version,
                not_before = p.not_before,
                "peer published a new public key"
            );
            self.dp.announce_peer_key(&w.tunnel, p.key);
            w.pending = Some(p);
        }
        Ok(())
    }

    /// Tells the IKE driver about a scheduled key it has not announced yet.
    fn announce_over_ike(&mut self) {
        let (Some(ike), Some((_, p))) = (&self.ike, &self.scheduled) else {
            return;
        };
        if self.ike_announced != Some(p.version) {
            let cmd = crate::ikewg::Command::AnnounceKey {
                public: p.key,
                not_before: p.not_before,
            };
            if ike.try_send(cmd).is_ok() {
                self.ike_announced = Some(p.version);
            }
        }
    }

    /// Switches to announced keys whose time has come.
    fn switch_due(&mut self) {
        let now = unix_now();
        let mut changed = false;
        if self
            .scheduled
            .as_ref()
            .is_some_and(|(_, p)| now >= p.not_before)
        {
            if let Some((key, p)) = self.scheduled.take() {
                self.dp.switch_key(&key, &mut self.out);
                self.dp.key_since.store(now, Ordering::Relaxed);
                if let Some((private_path, _)) = &self.own {
                    crate::vault::set_resolved(
                        private_path,
                        "private_key",
                        Zeroizing::new(*key.as_bytes()),
                    );
                }
                tracing::info!(version = p.version, public_key = %p.key, "site key switched");
                if let Some(ike) = &self.ike {
                    let _ = ike.try_send(crate::ikewg::Command::KeySwitched);
                }
                changed = true;
            }
        }
        for w in &mut self.peers {
            if w.pending.is_some_and(|p| now >= p.not_before) {
                if let Some(p) = w.pending.take() {
                    self.dp.switch_peer_key(&w.tunnel, p.key, &mut self.out);
                    crate::vault::set_resolved(&w.path, "public_key", Zeroizing::new(p.key.0));
                    tracing::info!(tunnel = %w.tunnel, public_key = %p.key, version = p.version, "peer key switched");
                    changed = true;
                }
            }
        }
        if changed {
            if let Err(e) = crate::vault::save_cache(&self.cfg) {
                tracing::warn!(error = %format!("{e:#}"), "could not update the Vault key cache");
            }
        }
    }

    /// Rotates the site key: generate, check-and-set write, publish, schedule the switch.
    async fn rotate_now(&mut self, why: &str) -> Result<String> {
        let Some((private_path, public_path)) = self.own.clone() else {
            bail!("site.private_key is not a vault: reference: there is no Vault key to rotate");
        };
        if let Some((_, p)) = &self.scheduled {
            bail!(
                "a rotation is in progress: version {} is used in {} s",
                p.version,
                p.not_before.saturating_sub(unix_now())
            );
        }
        if self.unpublished.is_some() {
            bail!("a new key is stored but not published yet (retried with each poll)");
        }
        let v = self.connected().await?;
        let current = v.current_version(&private_path).await?;
        let key = PrivateKey::generate();
        // Accept handshakes to the new key before anyone can learn it.
        self.dp.announce_key(key.clone());
        let v = self.connected().await?;
        let written = v.write_private(&private_path, &key, current).await;
        let version = match written {
            Ok(CasWrite::Written(version)) => version,
            Ok(CasWrite::Conflict) => {
                self.dp.cancel_announced_key();
                return self.adopt_winner(&private_path, &public_path).await;
            }
            Err(e) => {
                self.dp.cancel_announced_key();
                return Err(e.context("key rotation failed; the current key stays in use"));
            }
        };
        tracing::info!(version, why, "new site key stored in Vault");
        match self.publish_and_schedule(key.clone(), version).await {
            Ok(PublishOutcome::Ours) => {}
            Ok(PublishOutcome::Newer(q)) => {
                // A second daemon on this Vault path stored a version on top of ours and
                // published it first: ours is never used.
                tracing::info!(
                    version,
                    newer = q.version,
                    "a newer site key was published before ours: adopting it"
                );
                self.follow_own().await?;
                return Ok(format!(
                    "site key version {version} stored, but version {} (stored after it, from a \
                     second daemon on this Vault path) is published: adopting version {} (used \
                     from {} on)",
                    q.version, q.version, q.not_before
                ));
            }
            Err(e) => {
                self.unpublished = Some((key, version));
                return Err(e.context(format!(
                    "version {version} is stored but not published; publishing is retried and \
                     the current key stays in use until then"
                )));
            }
        }
        let p = self.published.unwrap_or(Published {
            key: key.public_key(),
            version,
            not_before: 0,
        });
        Ok(format!(
            "site key version {version} stored and published (public key {}); used from {} on \
             (in {} s)",
            p.key,
            p.not_before,
            p.not_before.saturating_sub(unix_now())
        ))
    }

    /// Announces and publishes our new key and schedules the switch to it, unless a newer
    /// version is published already (then the announcement is withdrawn and nothing is
    /// scheduled).
    async fn publish_and_schedule(
        &mut self,
        key: PrivateKey,
        version: u64,
    ) -> Result<PublishOutcome> {
        let Some((_, public_path)) = self.own.clone() else {
            return Ok(PublishOutcome::Ours);
        };
        let p = Published {
            key: key.public_key(),
            version,
            not_before: unix_now() + self.grace(),
        };
        self.dp.announce_key(key.clone());
        if let Some(newer) = self.connected().await?.publish(&public_path, &p).await? {
            self.dp.cancel_announced_key();
            return Ok(PublishOutcome::Newer(newer));
        }
        self.published = Some(p);
        self.scheduled = Some((key, p));
        Ok(PublishOutcome::Ours)
    }

    /// Lost a check-and-set race: use the version the other daemon wrote.
    async fn adopt_winner(&mut self, private_path: &str, public_path: &str) -> Result<String> {
        let v = self.connected().await?;
        let latest = v.current_version(private_path).await?;
        // The winner publishes right after its write.
        let mut p = v.read_published(public_path).await?;
        for _ in 0..20 {
            if p.version >= latest {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            p = v.read_published(public_path).await?;
        }
        if p.version < latest {
            return Ok(format!(
                "another daemon stored version {latest} first; it is adopted once published"
            ));
        }
        let key = v.read_private(private_path, p.version).await?;
        if key.public_key() != p.key {
            bail!("the published key does not match version {}", p.version);
        }
        tracing::info!(
            version = p.version,
            "another daemon rotated the site key first: adopting its version"
        );
        self.dp.announce_key(key.clone());
        self.scheduled = Some((key, p));
        self.published = Some(p);
        Ok(format!(
            "another daemon rotated first: adopting its version {} (used from {} on)",
            p.version, p.not_before
        ))
    }
}

/// Starts the task if the site has Vault references; returns its command channel.
pub fn spawn(
    cfg: &Config,
    dp: Arc<Dataplane>,
    vault: Option<Vault>,
    ike: Option<mpsc::Sender<crate::ikewg::Command>>,
) -> Option<mpsc::Sender<Command>> {
    if crate::vault::vault_refs(cfg).is_empty() {
        return None;
    }
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(Task::new(cfg.clone(), dp, vault, ike).run(rx));
    Some(tx)
}
