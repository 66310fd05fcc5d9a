//! Hot reload (SIGHUP, `sitewire reload`): validate a new configuration, work out what
//! differs from the running one, and apply only that.
//!
//! * The new file is validated completely first (the same [`Config::load`] as `check`,
//!   plus loading its key material). Any problem refuses the whole reload and the running
//!   configuration stays as it is.
//! * `[site] name`, `interface`, `listen_port`, `private_key` (the reference or the key in
//!   the file) and `[metrics]` cannot change while running: such a reload is refused with a
//!   message saying a restart is required. `mtu` and `address` are applied in place.
//! * Tunnels are matched by name. A tunnel whose configuration and key material are
//!   identical keeps its `Arc<WgTunnel>`: its sessions, receiver index, endpoint and
//!   counters, so its traffic never notices. A changed tunnel is rebuilt (new session, new
//!   handshake), a removed one disappears with its routes, an added one gets its routes and
//!   an immediate handshake.
//! * The new [`TunnelTable`] is swapped in atomically; the packet threads never block.
//!   Routes are added before the swap and deleted after it, so a route that stays is never
//!   touched.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::{Config, Endpoint, Tunnel};
use crate::dataplane::netlink::Netlink;
use crate::dataplane::wg::{WgTunnel, WgTunnelSpec};
use crate::dataplane::{Dataplane, TunnelTable, MAX_PACKET};
use crate::keys::PrivateKey;

/// What a reload did (or why it did nothing). Sent back over the control socket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    /// The configuration file that was read.
    pub config: String,
    /// False: refused, the running configuration is unchanged.
    pub applied: bool,
    /// Why it was refused: every configuration problem, or what needs a restart.
    pub errors: Vec<String>,
    /// Problems while applying an accepted configuration (e.g. a route the kernel refused).
    pub warnings: Vec<String>,
    pub unchanged: Vec<String>,
    pub changed: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub routes_added: Vec<String>,
    pub routes_removed: Vec<String>,
    /// `[site]` settings changed in place (mtu, addresses).
    pub site_changes: Vec<String>,
}

impl ReloadOutcome {
    fn refused(config: &Path, errors: Vec<String>) -> Self {
        ReloadOutcome {
            config: config.display().to_string(),
            errors,
            ..Default::default()
        }
    }

    /// Human-readable summary, as `sitewire reload` prints it.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if !self.applied {
            let _ = writeln!(
                s,
                "{}: reload refused, the running configuration is unchanged:",
                self.config
            );
            for e in &self.errors {
                let _ = writeln!(s, "  {e}");
            }
            return s;
        }
        let _ = writeln!(s, "{}: reloaded", self.config);
        let list = |s: &mut String, what: &str, v: &[String]| {
            if !v.is_empty() {
                let _ = writeln!(s, "  {what:<15} {}", v.join(", "));
            }
        };
        list(&mut s, "unchanged:", &self.unchanged);
        list(&mut s, "changed:", &self.changed);
        list(&mut s, "added:", &self.added);
        list(&mut s, "removed:", &self.removed);
        list(&mut s, "routes added:", &self.routes_added);
        list(&mut s, "routes removed:", &self.routes_removed);
        list(&mut s, "site:", &self.site_changes);
        for w in &self.warnings {
            let _ = writeln!(s, "  warning: {w}");
        }
        if self.changed.is_empty()
            && self.added.is_empty()
            && self.removed.is_empty()
            && self.site_changes.is_empty()
        {
            let _ = writeln!(s, "  nothing changed");
        }
        s
    }
}

/// A reload asked for over the control socket; the daemon's main loop answers on `reply`.
pub struct ReloadRequest {
    /// Read this file (and keep using it for later reloads); None: the daemon's own file.
    pub config: Option<PathBuf>,
    pub reply: tokio::sync::oneshot::Sender<ReloadOutcome>,
}

/// The difference between the running configuration and a new, valid one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub unchanged: Vec<String>,
    pub changed: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub routes_add: Vec<IpNet>,
    pub routes_del: Vec<IpNet>,
    pub mtu: Option<u16>,
    pub addresses_add: Vec<IpNet>,
    pub addresses_del: Vec<IpNet>,
}

/// Tunnel configuration equality, ignoring where in the file it is.
fn same_tunnel(a: &Tunnel, b: &Tunnel) -> bool {
    let mut a = a.clone();
    a.line = 0;
    let mut b = b.clone();
    b.line = 0;
    a == b
}

/// Data-plane equality, including key material read from files (a rotated PSK file
/// behind an unchanged path is a change).
pub fn same_spec(a: &WgTunnelSpec, b: &WgTunnelSpec) -> bool {
    a.name == b.name
        && a.peer_public_key == b.peer_public_key
        && a.psk.as_ref().map(|p| *p.as_bytes()) == b.psk.as_ref().map(|p| *p.as_bytes())
        && a.endpoints == b.endpoints
        && a.local_subnets == b.local_subnets
        && a.remote_subnets == b.remote_subnets
        && a.persistent_keepalive == b.persistent_keepalive
        && a.ike == b.ike
        && a.rekey_interval == b.rekey_interval
        && a.post_quantum == b.post_quantum
        && a.dpd == b.dpd
        && a.probe == b.probe
}

fn routes_of(cfg: &Config) -> BTreeSet<IpNet> {
    cfg.tunnels
        .iter()
        .flat_map(|t| t.remote_subnets.iter().copied())
        .collect()
}

/// Compares `old` (running, with the specs and private key in use) with `new` (valid,
/// with its loaded specs and key). Err: the settings that need a restart.
pub fn plan(
    old: &Config,
    old_specs: &[WgTunnelSpec],
    old_private: &PrivateKey,
    new: &Config,
    new_specs: &[WgTunnelSpec],
    new_private: &PrivateKey,
) -> Result<Plan, Vec<String>> {
    let mut restart = Vec::new();
    let mut needs_restart = |what: &str, from: String, to: String| {
        restart.push(format!(
            "{what} changed ({from} -> {to}): this needs a restart \
             (systemctl restart sitewire@<name>, or stop and start `sitewire up`)"
        ));
    };
    let (o, n) = (&old.site, &new.site);
    if o.name != n.name {
        needs_restart(
            "site.name",
            format!("{:?}", o.name),
            format!("{:?}", n.name),
        );
    }
    if o.interface != n.interface {
        needs_restart(
            "site.interface",
            format!("{:?}", o.interface),
            format!("{:?}", n.interface),
        );
    }
    if o.listen_port != n.listen_port {
        needs_restart(
            "site.listen_port",
            o.listen_port.to_string(),
            n.listen_port.to_string(),
        );
    }
    if o.private_key != n.private_key {
        needs_restart(
            "site.private_key",
            "previous key".into(),
            "another key reference".into(),
        );
    } else if old_private.as_bytes() != new_private.as_bytes() {
        needs_restart(
            "site.private_key",
            "the key file's old key".into(),
            "a new key in the same file".into(),
        );
    }
    if old.metrics != new.metrics {
        let show = |m: &Option<crate::config::Metrics>| {
            m.as_ref()
                .map_or("no [metrics]".to_string(), |m| m.listen.to_string())
        };
        needs_restart("[metrics]", show(&old.metrics), show(&new.metrics));
    }
    if !restart.is_empty() {
        return Err(restart);
    }

    let mut p = Plan::default();
    if o.mtu != n.mtu {
        p.mtu = Some(n.mtu);
    }
    p.addresses_add = n
        .address
        .iter()
        .filter(|a| !o.address.contains(a))
        .copied()
        .collect();
    p.addresses_del = o
        .address
        .iter()
        .filter(|a| !n.address.contains(a))
        .copied()
        .collect();

    let old_spec: HashMap<&str, &WgTunnelSpec> =
        old_specs.iter().map(|s| (s.name.as_str(), s)).collect();
    let wireguard = |t: &&crate::config::Tunnel| t.protocol == crate::config::Protocol::WireGuard;
    for t in new.tunnels.iter().filter(|t| !wireguard(t)) {
        // IPsec tunnels: the IKE driver owns them; unchanged ones ride through.
        match old.tunnel(&t.name) {
            Some(ot) if same_tunnel(ot, t) => p.unchanged.push(t.name.clone()),
            Some(_) => p.changed.push(t.name.clone()),
            None => p.added.push(t.name.clone()),
        }
    }
    for (t, spec) in new.tunnels.iter().filter(wireguard).zip(new_specs) {
        match (old.tunnel(&t.name), old_spec.get(t.name.as_str())) {
            (Some(ot), Some(os)) if same_tunnel(ot, t) && same_spec(os, spec) => {
                p.unchanged.push(t.name.clone())
            }
            (Some(_), _) => p.changed.push(t.name.clone()),
            (None, _) => p.added.push(t.name.clone()),
        }
    }
    p.removed = old
        .tunnels
        .iter()
        .filter(|t| new.tunnel(&t.name).is_none())
        .map(|t| t.name.clone())
        .collect();
    // IKE-keyed tunnels are driven by the IKE engine built at start: only unchanged ones
    // can ride through a reload for now.
    let ike = |cfg: &Config, name: &str| {
        cfg.tunnel(name)
            .is_some_and(|t| t.keying == crate::config::Keying::Ike)
    };
    let blocked: Vec<String> = p
        .changed
        .iter()
        .chain(&p.added)
        .filter(|n| ike(new, n) || ike(old, n))
        .chain(p.removed.iter().filter(|n| ike(old, n)))
        .map(|n| {
            format!(
                "tunnel {n:?}: adding, changing or removing an IPsec tunnel or one with \
                 keying = \"ike\" needs a restart (unchanged ones reload fine)"
            )
        })
        .collect();
    if !blocked.is_empty() {
        return Err(blocked);
    }
    let (ro, rn) = (routes_of(old), routes_of(new));
    p.routes_add = rn.difference(&ro).copied().collect();
    p.routes_del = ro.difference(&rn).copied().collect();
    Ok(p)
}

/// What the daemon owns that a reload may change.
pub struct Live<'a> {
    pub dp: &'a Dataplane,
    pub netlink: &'a Netlink,
    pub ifindex: u32,
    /// Routes installed (removed again on shutdown).
    pub routes: &'a mut Vec<IpNet>,
    /// The running configuration; replaced when a reload is applied.
    pub config: &'a mut Config,
}

/// Reads `path`, and applies it if it is valid and needs no restart.
pub async fn reload(live: Live<'_>, path: &Path) -> ReloadOutcome {
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            return ReloadOutcome::refused(path, errors.0.iter().map(|e| e.to_string()).collect())
        }
    };
    // A Vault-held site key may have been rotated since startup: the key in use stands.
    let same_vault_key = matches!(&new.site.private_key, crate::config::KeyRef::Vault(_))
        && new.site.private_key == live.config.site.private_key;
    let new_private = if same_vault_key {
        live.dp.private()
    } else {
        match crate::daemon::load_private(&new.site.private_key, "site.private_key") {
            Ok(k) => k,
            Err(e) => return ReloadOutcome::refused(path, vec![format!("{e:#}")]),
        }
    };
    let new_specs = match crate::daemon::tunnel_specs(&new) {
        Ok(s) => s,
        Err(e) => return ReloadOutcome::refused(path, vec![format!("{e:#}")]),
    };
    let table = live.dp.tunnels.load_full();
    // Compared with the peer keys in use (a Vault-held peer key may have rotated since).
    let old_specs: Vec<WgTunnelSpec> = table
        .list
        .iter()
        .map(|t| WgTunnelSpec {
            peer_public_key: t.peer_public_key(),
            ..t.spec.clone()
        })
        .collect();
    let plan = match plan(
        live.config,
        &old_specs,
        &live.dp.private(),
        &new,
        &new_specs,
        &new_private,
    ) {
        Ok(p) => p,
        Err(errors) => return ReloadOutcome::refused(path, errors),
    };
    let mut out = ReloadOutcome {
        config: path.display().to_string(),
        applied: true,
        unchanged: plan.unchanged.clone(),
        changed: plan.changed.clone(),
        added: plan.added.clone(),
        removed: plan.removed.clone(),
        ..Default::default()
    };
    let wants_v6 = plan.routes_add.iter().any(|n| matches!(n, IpNet::V6(_)))
        || plan.addresses_add.iter().any(|n| matches!(n, IpNet::V6(_)));
    if wants_v6 {
        // `up` turns IPv6 off on the TUN when the first configuration had no use for it.
        let p = format!(
            "/proc/sys/net/ipv6/conf/{}/disable_ipv6",
            live.config.site.interface
        );
        if let Err(e) = std::fs::write(&p, "0") {
            out.warnings.push(format!("enabling IPv6 ({p}): {e}"));
        }
    }
    apply(
        live.dp,
        live.netlink,
        live.ifindex,
        live.routes,
        &table,
        &plan,
        new_specs,
        &mut out,
    )
    .await;
    *live.config = new;
    out
}

#[allow(clippy::too_many_arguments)]
async fn apply(
    dp: &Dataplane,
    netlink: &Netlink,
    ifindex: u32,
    routes: &mut Vec<IpNet>,
    old: &TunnelTable,
    plan: &Plan,
    new_specs: Vec<WgTunnelSpec>,
    out: &mut ReloadOutcome,
) {
    if let Some(mtu) = plan.mtu {
        match netlink.set_mtu_up(ifindex, mtu).await {
            Ok(()) => out.site_changes.push(format!("mtu {mtu}")),
            Err(e) => out.warnings.push(format!("mtu {mtu}: {e:#}")),
        }
    }
    for a in &plan.addresses_add {
        match netlink.add_address(ifindex, *a).await {
            Ok(()) => out.site_changes.push(format!("address +{a}")),
            Err(e) => out.warnings.push(format!("{e:#}")),
        }
    }

    // The new table: kept tunnels by Arc, new ones with fresh receiver indexes.
    let keep: HashSet<&str> = plan.unchanged.iter().map(String::as_str).collect();
    let mut used: HashSet<u32> = old.list.iter().map(|t| t.index).collect();
    let now = Instant::now();
    let mut fresh = Vec::new();
    let mut list = Vec::with_capacity(new_specs.len());
    for spec in new_specs {
        if keep.contains(spec.name.as_str()) {
            if let Some(t) = old.by_name(&spec.name) {
                list.push(t.clone());
                continue;
            }
        }
        let has_names = spec
            .endpoints
            .iter()
            .any(|e| matches!(e, Endpoint::Host { .. }));
        let endpoints = spec.endpoints.clone();
        let t = Arc::new(WgTunnel::new(
            spec,
            crate::dataplane::fresh_index(&mut used),
            dp.local_key(),
            now,
        ));
        if has_names {
            t.set_resolved(crate::daemon::resolve(&endpoints).await);
        }
        fresh.push(t.clone());
        list.push(t);
    }

    for net in &plan.routes_add {
        match netlink.add_route(ifindex, *net).await {
            Ok(()) => {
                routes.push(*net);
                out.routes_added.push(net.to_string());
            }
            Err(e) => out.warnings.push(format!("{e:#}")),
        }
    }
    dp.tunnels
        .store(Arc::new(TunnelTable::with_esp(list, old.esp.clone())));
    for net in &plan.routes_del {
        match netlink.del_route(ifindex, *net).await {
            Ok(()) => out.routes_removed.push(net.to_string()),
            Err(e) => out.warnings.push(format!("{e:#}")),
        }
        routes.retain(|r| r != net);
    }
    for a in &plan.addresses_del {
        match netlink.del_address(ifindex, *a).await {
            Ok(()) => out.site_changes.push(format!("address -{a}")),
            Err(e) => out.warnings.push(format!("{e:#}")),
        }
    }

    let mut buf = vec![0u8; MAX_PACKET];
    for t in &fresh {
        t.initiate(&dp.wire, &mut buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{PrivateKey, Psk};

    fn write_key(dir: &Path, name: &str, key: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, format!("{key}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    struct Fixture {
        dir: PathBuf,
        private: PrivateKey,
        peers: Vec<String>,
    }

    impl Fixture {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("sw-reload-unit-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let private = PrivateKey::generate();
            write_key(&dir, "site.key", &private.to_base64());
            write_key(&dir, "a.psk", &Psk::generate().to_base64());
            let peers = (0..4)
                .map(|_| PrivateKey::generate().public_key().to_base64())
                .collect();
            Fixture {
                dir,
                private,
                peers,
            }
        }

        fn config(
            &self,
            site_extra: &str,
            tunnels: &[(&str, usize, &str)],
        ) -> (Config, Vec<WgTunnelSpec>) {
            let mut text = format!(
                "[site]\nname = \"x\"\ninterface = \"swx0\"\nlisten_port = 51820\n\
                 private_key = \"site.key\"\n{site_extra}\n"
            );
            for (name, peer, extra) in tunnels {
                text += &format!(
                    "[[tunnel]]\nname = \"{name}\"\npeer_public_key = \"{}\"\n\
                     remote_subnets = [\"10.9.{peer}.0/24\"]\n{extra}\n",
                    self.peers[*peer]
                );
            }
            let cfg = Config::parse(&text, &self.dir).unwrap_or_else(|e| panic!("{e}\n{text}"));
            let specs = crate::daemon::tunnel_specs(&cfg).unwrap();
            (cfg, specs)
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn ike_tunnels_must_stay_unchanged_across_a_reload() {
        let f = Fixture::new("ike");
        let ike = "keying = \"ike\"";
        let (old, os) = f.config("", &[("wg", 0, ""), ("ike", 1, ike)]);
        // Unchanged IKE tunnel, edited static one: fine.
        let (new, ns) = f.config(
            "",
            &[("wg", 0, "persistent_keepalive = \"5s\""), ("ike", 1, ike)],
        );
        let p = plan(&old, &os, &f.private, &new, &ns, &f.private).unwrap();
        assert_eq!(p.unchanged, ["ike"]);
        // A changed rekey interval, an added IKE tunnel, a removed one: restart needed.
        for tunnels in [
            vec![
                ("wg", 0, ""),
                ("ike", 1, "keying = \"ike\"\nrekey_interval = \"1m\""),
            ],
            vec![("wg", 0, ""), ("ike", 1, ike), ("ike2", 2, ike)],
            vec![("wg", 0, "")],
        ] {
            let (new, ns) = f.config("", &tunnels);
            let errors = plan(&old, &os, &f.private, &new, &ns, &f.private).unwrap_err();
            assert!(
                errors.iter().all(|e| e.contains("needs a restart")),
                "{errors:?}"
            );
        }
    }

    #[test]
    fn classifies_unchanged_changed_added_removed() {
        let f = Fixture::new("classify");
        let (old, os) = f.config("", &[("keep", 0, ""), ("edit", 1, ""), ("gone", 2, "")]);
        let (new, ns) = f.config(
            "",
            &[
                ("add", 3, ""),
                ("edit", 1, "persistent_keepalive = \"5s\""),
                ("keep", 0, ""),
            ],
        );
        let p = plan(&old, &os, &f.private, &new, &ns, &f.private).unwrap();
        assert_eq!(p.unchanged, ["keep"]);
        assert_eq!(p.changed, ["edit"]);
        assert_eq!(p.added, ["add"]);
        assert_eq!(p.removed, ["gone"]);
        assert_eq!(p.routes_add, ["10.9.3.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(p.routes_del, ["10.9.2.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(p.mtu, None);
    }

    #[test]
    fn moving_a_tunnel_in_the_file_is_no_change() {
        let f = Fixture::new("move");
        let (old, os) = f.config("", &[("a", 0, ""), ("b", 1, "")]);
        let (new, ns) = f.config("# a comment\n\n", &[("b", 1, ""), ("a", 0, "")]);
        let p = plan(&old, &os, &f.private, &new, &ns, &f.private).unwrap();
        assert_eq!(p.unchanged.len(), 2);
        assert!(p.changed.is_empty() && p.routes_add.is_empty() && p.routes_del.is_empty());
    }

    #[test]
    fn a_rotated_psk_file_changes_the_tunnel() {
        let f = Fixture::new("psk");
        let (old, os) = f.config("", &[("a", 0, "psk = \"a.psk\"")]);
        write_key(&f.dir, "a.psk", &Psk::generate().to_base64());
        let (new, ns) = f.config("", &[("a", 0, "psk = \"a.psk\"")]);
        let p = plan(&old, &os, &f.private, &new, &ns, &f.private).unwrap();
        assert_eq!(p.changed, ["a"]);
    }

    #[test]
    fn site_identity_changes_need_a_restart_but_mtu_and_addresses_do_not() {
        let f = Fixture::new("site");
        let (old, os) = f.config("address = [\"10.1.0.1/24\"]", &[("a", 0, "")]);
        let (new, ns) = f.config("mtu = 1380\naddress = [\"10.2.0.1/24\"]", &[("a", 0, "")]);
        let p = plan(&old, &os, &f.private, &new, &ns, &f.private).unwrap();
        assert_eq!(p.mtu, Some(1380));
        assert_eq!(p.addresses_add, ["10.2.0.1/24".parse::<IpNet>().unwrap()]);
        assert_eq!(p.addresses_del, ["10.1.0.1/24".parse::<IpNet>().unwrap()]);

        let (mut new, ns) = f.config("", &[("a", 0, "")]);
        new.site.listen_port = 51821;
        new.site.interface = "swx1".into();
        let errs = plan(&old, &os, &f.private, &new, &ns, &f.private).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs.iter().all(|e| e.contains("needs a restart")),
            "{errs:?}"
        );

        let other = PrivateKey::generate();
        let (new, ns) = f.config("address = [\"10.1.0.1/24\"]", &[("a", 0, "")]);
        let errs = plan(&old, &os, &f.private, &new, &ns, &other).unwrap_err();
        assert!(errs[0].contains("site.private_key"), "{errs:?}");
    }

    #[test]
    fn refusal_renders_every_error() {
        let o = ReloadOutcome::refused(Path::new("/x.toml"), vec!["line 3: a".into(), "b".into()]);
        let r = o.render();
        assert!(
            r.contains("refused") && r.contains("line 3: a") && r.contains("  b"),
            "{r}"
        );
    }
}
