//! `sitewire up`: owns the TUN, the socket, routes and the local sockets; reads the clock.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use ipnet::IpNet;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::{self, Config, Endpoint, KeyRef, Keying, PeerKey, Protocol};
use crate::control::{self, SiteView};
use crate::dataplane::esp::EspTunnelSpec;
use crate::dataplane::netlink::Netlink;
use crate::dataplane::wg::{ProbeSpec, WgTunnelSpec};
use crate::dataplane::{Dataplane, IpsecWires, IKE_PORT, MAX_PACKET, NATT_PORT};
use crate::keys::{PrivateKey, Psk, PublicKey};
use crate::proto::ike::crypto::AeadAlg;
use crate::reload::{self, ReloadOutcome, ReloadRequest};

const TICK: Duration = Duration::from_millis(250);
/// Host-name endpoints are re-resolved this often even when nothing fails.
const RERESOLVE_EVERY: Duration = Duration::from_secs(300);
/// Packets the TUN device queues for the TUN reader (the kernel default is 500).
///
/// When the host is busy the packet threads wait their turn for a CPU like any other
/// thread: on a loaded 2-core host the TUN reader is often runnable but not running for
/// 3-5 ms at a time, sometimes for 12 ms, while a local sender keeps writing. At
/// 1.5 Gbit/s of 1392-byte datagrams that is up to ~1,600 packets per stall, and stalls
/// come in runs: 2000 slots dropped 1-5 % of a UDP stream that the daemon kept up with
/// on average. 16384 slots (bench/run.sh udp_search, medians of 3-6 rounds: loss-free
/// rate 1.22-1.51 Gbit/s at 2000, 1.33 at 8192, 1.59-1.60 at 16384, 1.62 at 32768) ride
/// those stalls out. The ring holds pointers (128 KiB); packets only occupy it while the
/// reader is behind. Under a sustained overload a full queue adds at most ~120 ms at
/// that rate (TCP through the tunnel showed the same ping under load as with 2000).
/// An admin can still change it on the running device: `ip link set DEV txqueuelen N`.
const TUN_QUEUE_LEN: u32 = 16384;

pub(crate) fn load_private(r: &KeyRef, what: &str) -> Result<PrivateKey> {
    match r {
        KeyRef::File(p) => PrivateKey::load(p).with_context(|| what.to_string()),
        KeyRef::Vault(p) => Ok(PrivateKey::from_bytes(
            *crate::vault::resolved_key(p, "private_key").with_context(|| what.to_string())?,
        )),
    }
}

fn load_psk(r: &KeyRef, what: &str) -> Result<Psk> {
    match r {
        KeyRef::File(p) => Psk::load(p).with_context(|| what.to_string()),
        KeyRef::Vault(p) => Ok(Psk::from_bytes(
            *crate::vault::resolved_key(p, "psk").with_context(|| what.to_string())?,
        )),
    }
}

/// The ciphers of strongSwan-style proposals, in order, and whether any names a DH group
/// (for ESP proposals: PFS in CHILD SA rekeys). The config reader has checked the tokens.
pub fn proposal_aeads(proposals: &[String]) -> (Vec<AeadAlg>, bool) {
    let mut aeads = Vec::new();
    let mut dh = false;
    for p in proposals {
        for token in p.split('-') {
            let a = match token {
                "aes128gcm16" | "aes128gcm" => Some(AeadAlg::AesGcm16 { key_bits: 128 }),
                "aes256gcm16" | "aes256gcm" => Some(AeadAlg::AesGcm16 { key_bits: 256 }),
                "chacha20poly1305" => Some(AeadAlg::ChaCha20Poly1305),
                "x25519" | "curve25519" => {
                    dh = true;
                    None
                }
                _ => None,
            };
            if let Some(a) = a.filter(|a| !aeads.contains(a)) {
                aeads.push(a);
            }
        }
    }
    (aeads, dh)
}

/// The IPsec tunnels of a configuration, with their PSKs loaded.
pub fn ipsec_specs(cfg: &Config) -> Result<Vec<EspTunnelSpec>> {
    cfg.tunnels
        .iter()
        .filter(|t| t.protocol == Protocol::Ipsec)
        .map(|t| {
            let what = format!("tunnel {:?} (line {}): psk", t.name, t.line);
            let psk = match &t.psk {
                Some(r) => load_psk(r, &what)?,
                None => bail!("{what} is required"),
            };
            let (ike_aeads, _) = proposal_aeads(&t.ike_proposals);
            let (esp_aeads, esp_pfs) = proposal_aeads(&t.esp_proposals);
            Ok(EspTunnelSpec {
                name: t.name.clone(),
                endpoints: t.endpoint.clone(),
                local_subnets: t.local_subnets.clone(),
                remote_subnets: t.remote_subnets.clone(),
                psk: zeroize::Zeroizing::new(psk.as_bytes().to_vec()),
                local_id: t.local_id.clone().unwrap_or_default(),
                remote_id: t.remote_id.clone().unwrap_or_default(),
                ike_aeads,
                esp_aeads,
                esp_pfs,
                rekey_interval: t.rekey_interval,
                ike_rekey_interval: t
                    .ike_rekey_interval
                    .unwrap_or(Duration::from_secs(4 * 3600)),
                dpd: t.dpd,
                start_action: t.start_action,
                line: t.line,
            })
        })
        .collect()
}

/// Turn validated WireGuard tunnel configuration into data-plane specs, loading key
/// material (IPsec tunnels: [`ipsec_specs`]).
pub fn tunnel_specs(cfg: &Config) -> Result<Vec<WgTunnelSpec>> {
    cfg.tunnels
        .iter()
        .filter(|t| t.protocol == Protocol::WireGuard)
        .map(|t| {
            let peer = match &t.peer_public_key {
                Some(PeerKey::Inline(k)) => PublicKey(*k),
                Some(PeerKey::Vault(p)) => PublicKey(
                    *crate::vault::resolved_key(p, "public_key")
                        .with_context(|| format!("tunnel {:?}: peer_public_key", t.name))?,
                ),
                None => bail!("tunnel {:?}: peer_public_key is required", t.name),
            };
            let psk = t
                .psk
                .as_ref()
                .map(|r| load_psk(r, &format!("tunnel {:?}: psk", t.name)))
                .transpose()?;
            Ok(WgTunnelSpec {
                name: t.name.clone(),
                peer_public_key: peer,
                psk,
                endpoints: t.endpoint.clone(),
                local_subnets: t.local_subnets.clone(),
                remote_subnets: t.remote_subnets.clone(),
                persistent_keepalive: t
                    .persistent_keepalive
                    .map(|d| d.as_secs().min(u64::from(u16::MAX)) as u16),
                psk_file: match &t.psk {
                    Some(KeyRef::File(p)) => Some(p.clone()),
                    _ => None,
                },
                probe: t.probe.map(|p| probe_spec(cfg, t, p)).transpose()?,
                dpd: t.dpd,
                ike: t.keying == Keying::Ike,
                rekey_interval: t.rekey_interval,
                post_quantum: t.post_quantum,
            })
        })
        .collect()
}

fn probe_spec(cfg: &Config, t: &config::Tunnel, p: config::Probe) -> Result<ProbeSpec> {
    let Some(source) = p.source_for(&cfg.site, &t.local_subnets) else {
        bail!(
            "tunnel {:?} (line {}): probe needs a source address: set probe.source, \
             an IPv4 site.address or IPv4 local_subnets",
            t.name,
            t.line
        );
    };
    Ok(ProbeSpec {
        source,
        target: p.target,
        interval: p.interval,
    })
}

/// Resolve each configured endpoint to one address (the first the resolver gives).
pub async fn resolve(endpoints: &[Endpoint]) -> Vec<Option<SocketAddr>> {
    let mut out = Vec::with_capacity(endpoints.len());
    for e in endpoints {
        out.push(match e {
            Endpoint::Addr(a) => Some(*a),
            Endpoint::Host { host, port } => {
                match tokio::net::lookup_host((host.as_str(), *port)).await {
                    Ok(mut addrs) => addrs.next(),
                    Err(err) => {
                        tracing::warn!(host = %host, error = %err, "endpoint name does not resolve");
                        None
                    }
                }
            }
        });
    }
    out
}

/// Everything `up` created that must be undone on the way out.
struct Installed {
    netlink: Netlink,
    ifindex: u32,
    routes: Vec<IpNet>,
    sockets: Vec<std::path::PathBuf>,
}

impl Installed {
    async fn remove(&self) {
        for net in &self.routes {
            if let Err(e) = self.netlink.del_route(self.ifindex, *net).await {
                tracing::warn!(route = %net, error = %e, "could not remove route");
            }
        }
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}

fn disable_ipv6(interface: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{interface}/disable_ipv6");
    let _ = std::fs::write(path, "1");
}

/// Run the site of `config_path`; with `lanes`, its UDP port gets a per-CPU lane per CPU
/// the daemon may run on where that works ([`crate::dataplane::lanes`]).
pub async fn up(config_path: &Path, lanes: bool) -> Result<()> {
    let cfg = Config::load(config_path).map_err(|e| anyhow!("{}:\n{e}", config_path.display()))?;
    if crate::vault::used(&cfg) {
        // Key material must not end up in core dumps.
        // SAFETY: prctl(PR_SET_DUMPABLE) takes no pointers.
        unsafe {
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        }
    }
    let vault = crate::vault::resolve(&cfg).await?;
    let private = load_private(&cfg.site.private_key, "site.private_key")?;
    let specs = tunnel_specs(&cfg)?;
    let esp_specs = ipsec_specs(&cfg)?;
    let started = SystemTime::now();

    let netlink = Netlink::connect()?;
    crate::cleanup::before_tun(&netlink, &cfg.site.interface).await?;
    // Offload (virtio-net headers, TSO/USO) lets one read carry a whole TCP burst; a
    // kernel without it gets a plain device and one packet per read.
    let build = |offload: bool| {
        tun_rs::DeviceBuilder::new()
            .name(&cfg.site.interface)
            .mtu(cfg.site.mtu)
            .tx_queue_len(TUN_QUEUE_LEN)
            // Down until its addresses and IPv6 setting are in place (below): a TUN that
            // comes up at once sends IPv6 router solicitations and MLD reports first.
            .enable(false)
            .offload(offload)
            .build_sync()
    };
    let tun = build(true)
        .or_else(|e| {
            tracing::info!(error = %e, "TUN offload unavailable; using a plain TUN device");
            build(false)
        })
        .with_context(|| format!("creating TUN device {}", cfg.site.interface))?;
    let ifindex = netlink.link_index(&cfg.site.interface).await?;
    crate::cleanup::after_tun(&netlink, &cfg, ifindex).await?;
    let wants_v6 = cfg.site.address.iter().any(|a| a.addr().is_ipv6())
        || cfg
            .tunnels
            .iter()
            .flat_map(|t| &t.remote_subnets)
            .any(|n| matches!(n, IpNet::V6(_)));
    if !wants_v6 {
        // Keeps a fresh TUN from emitting router solicitations nobody routes.
        disable_ipv6(&cfg.site.interface);
    }
    for a in &cfg.site.address {
        netlink.add_address(ifindex, *a).await?;
    }
    netlink.set_mtu_up(ifindex, cfg.site.mtu).await?;

    let wire = crate::dataplane::lanes::bind(
        cfg.site.listen_port,
        if lanes {
            crate::dataplane::lanes::usable()
        } else {
            0
        },
    )
    .with_context(|| format!("binding UDP port {}", cfg.site.listen_port))?;
    let ipsec = if esp_specs.is_empty() {
        None
    } else {
        let wires = IpsecWires::bind(IKE_PORT, NATT_PORT).with_context(|| {
            format!("binding UDP ports {IKE_PORT} and {NATT_PORT} for the IPsec tunnels")
        })?;
        Some((wires, esp_specs))
    };
    let dp = Arc::new(Dataplane::new(tun, wire, private, specs, ipsec)?);

    let mut installed = Installed {
        netlink,
        ifindex,
        routes: Vec::new(),
        sockets: Vec::new(),
    };
    let result = run(cfg, config_path, dp, &mut installed, started, vault).await;
    crate::sdnotify::stopping();
    installed.remove().await;
    result
}

async fn run(
    mut cfg: Config,
    config_path: &Path,
    dp: Arc<Dataplane>,
    installed: &mut Installed,
    started: SystemTime,
    vault: Option<crate::vault::Vault>,
) -> Result<()> {
    let mut config_path = std::path::absolute(config_path)?;
    for t in &cfg.tunnels {
        for net in &t.remote_subnets {
            installed.netlink.add_route(installed.ifindex, *net).await?;
            installed.routes.push(*net);
        }
    }

    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<ReloadRequest>(4);
    // IKE-keyed tunnels: the driver gets IKE datagrams from the UDP thread.
    let ike_cmd = match crate::ikewg::Driver::new(dp.clone()) {
        Some(driver) => {
            let (tx, rx) = tokio::sync::mpsc::channel(crate::ikewg::QUEUE);
            let (cmd_tx, cmd_rx) = tokio::sync::mpsc::channel(8);
            let _ = dp.ike_tx.set(tx);
            tokio::spawn(driver.run(rx, cmd_rx));
            Some(cmd_tx)
        }
        None => None,
    };
    let view = Arc::new(SiteView {
        site: cfg.site.name.clone(),
        interface: cfg.site.interface.clone(),
        dataplane: dp.clone(),
        started,
        reload: Some(reload_tx),
        keys: crate::rotation::spawn(&cfg, dp.clone(), vault, ike_cmd.clone()),
        ike: ike_cmd,
    });
    let ctl_path = control::control_socket_path(&cfg.site.interface);
    let ctl = control::bind_private(&ctl_path, 0o700)?;
    installed.sockets.push(ctl_path);
    let uapi_path = control::uapi_socket_path(&cfg.site.interface);
    let uapi = control::bind_private(&uapi_path, 0o755)?;
    installed.sockets.push(uapi_path);
    tokio::spawn(control::serve_control(ctl, view.clone()));
    tokio::spawn(control::serve_uapi(uapi, view.clone()));
    crate::metrics::start(&cfg, dp.clone()).await?;

    let mut threads = vec![
        (
            "tun-reader",
            Dataplane::run_tun_reader as fn(Arc<Dataplane>),
        ),
        ("udp-reader", Dataplane::run_udp_reader),
    ];
    if dp.ipsec.is_some() {
        threads.push(("ike-reader", Dataplane::run_ike_reader));
        threads.push(("natt-reader", Dataplane::run_natt_reader));
    }
    for (name, f) in threads {
        let dp = dp.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(dp))
            .context("starting a packet thread")?;
    }
    for lane in 0..dp.lanes.len() {
        let dp = dp.clone();
        std::thread::Builder::new()
            .name(format!("udp-lane-{lane}"))
            .spawn(move || dp.run_lane(lane))
            .context("starting a packet thread")?;
    }
    if !dp.lanes.is_empty() {
        tracing::debug!(lanes = dp.lanes.len(), "per-CPU UDP lanes");
    }

    // Resolve host names before the first handshake, then keep them fresh.
    resolve_tunnels(&dp, None).await;
    let mut out = vec![0u8; MAX_PACKET];
    dp.initiate_all(&mut out);

    tracing::info!(
        site = %cfg.site.name,
        interface = %cfg.site.interface,
        port = dp.listen_port,
        public_key = %dp.public(),
        tunnels = cfg.tunnels.len(),
        "site up"
    );
    crate::sdnotify::ready(&ready_status(&cfg));

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    let mut last_resolve = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                ticks += 1;
                if ticks.is_multiple_of(4) {
                    // A shared limiter is not reset by boringtun's own timers.
                    dp.reset_limiters();
                }
                let wants = dp.tick(&mut out);
                if !wants.is_empty() {
                    resolve_tunnels(&dp, Some(&wants)).await;
                } else if last_resolve.elapsed() >= RERESOLVE_EVERY {
                    last_resolve = tokio::time::Instant::now();
                    resolve_tunnels(&dp, None).await;
                }
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = sighup.recv() => {
                tracing::info!(config = %config_path.display(), "SIGHUP: reloading the configuration");
                let path = config_path.clone();
                do_reload(&mut cfg, &mut config_path, &path, &dp, installed).await;
            }
            Some(req) = reload_rx.recv() => {
                let path = req.config.clone().unwrap_or_else(|| config_path.clone());
                let path = std::path::absolute(&path).unwrap_or(path);
                tracing::info!(config = %path.display(), "reload requested over the control socket");
                let outcome = do_reload(&mut cfg, &mut config_path, &path, &dp, installed).await;
                let _ = req.reply.send(outcome);
            }
        }
    }
    Ok(())
}

/// One reload, with systemd told before and after; logs and returns the outcome.
async fn do_reload(
    cfg: &mut Config,
    config_path: &mut std::path::PathBuf,
    path: &Path,
    dp: &Dataplane,
    installed: &mut Installed,
) -> ReloadOutcome {
    crate::sdnotify::reloading();
    let outcome = reload::reload(
        reload::Live {
            dp,
            netlink: &installed.netlink,
            ifindex: installed.ifindex,
            routes: &mut installed.routes,
            config: cfg,
        },
        path,
    )
    .await;
    if outcome.applied {
        *config_path = path.to_path_buf();
        tracing::info!(
            unchanged = ?outcome.unchanged,
            changed = ?outcome.changed,
            added = ?outcome.added,
            removed = ?outcome.removed,
            site = ?outcome.site_changes,
            "configuration reloaded"
        );
        for w in &outcome.warnings {
            tracing::warn!("reload: {w}");
        }
        crate::sdnotify::ready(&ready_status(cfg));
    } else {
        for e in &outcome.errors {
            tracing::error!("reload refused: {e}");
        }
        crate::sdnotify::ready(&format!(
            "{} (last reload of {} refused: {} problem(s))",
            ready_status(cfg),
            path.display(),
            outcome.errors.len()
        ));
    }
    outcome
}

fn ready_status(cfg: &Config) -> String {
    format!(
        "site {} on {}: {} tunnel(s) configured",
        cfg.site.name,
        cfg.site.interface,
        cfg.tunnels.len()
    )
}

async fn resolve_tunnels(dp: &Dataplane, only: Option<&[String]>) {
    let table = dp.tunnels.load();
    for t in &table.esp {
        if only.is_none()
            && t.spec
                .endpoints
                .iter()
                .any(|e| matches!(e, config::Endpoint::Host { .. }))
        {
            t.set_resolved(resolve(&t.spec.endpoints).await);
        }
    }
    for t in &table.list {
        if only.is_some_and(|names| !names.contains(&t.spec.name)) {
            continue;
        }
        if t.spec
            .endpoints
            .iter()
            .any(|e| matches!(e, config::Endpoint::Host { .. }))
        {
            let resolved = resolve(&t.spec.endpoints).await;
            t.set_resolved(resolved);
        }
    }
}
