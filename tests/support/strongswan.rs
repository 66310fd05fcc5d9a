//! strongSwan `charon` as an IPsec peer inside a [`Topo`] namespace.
//!
//! Data plane: `kernel-libipsec` (userspace ESP on a TUN device `ipsec0`), because this kernel
//! has no ESP. With kernel-libipsec, strongSwan 5.9 always encapsulates ESP in UDP (RFC 3948):
//! IKE floats to port 4500 after IKE_SA_INIT and every ESP packet is ESP-in-UDP/4500, even with
//! `encap = no`. `kernel-netlink` only provides interface/address discovery and the route to the
//! remote traffic selectors (table 220, rule priority 220) inside the charon's namespace.
//!
//! One charon per namespace, several at once: charon's pid file is compiled in
//! (`/var/run/charon.pid`), so every instance runs in a private mount namespace
//! (`unshare --mount`) with its own directory bind-mounted over `/run`. Inside, the VICI socket
//! is `unix:///run/charon.vici`; from outside it is `<instance dir>/run/charon.vici`. `swanctl`
//! runs inside the same network namespace and talks to charon over that unix socket only.
//!
//! ```ignore
//! if !support::strongswan::prereq() { return; }
//! let t = Topo::new("swan");
//! let a = Charon::start(&t, Site::A, &ConnSpec::for_site(&t, Site::A));
//! let b = Charon::start(&t, Site::B, &ConnSpec::for_site(&t, Site::B));
//! a.initiate("net").expect("initiate");
//! let sas = b.wait_established(Duration::from_secs(10));
//! ```
//!
//! Logs never contain key material (no subsystem is logged above level 2).

use super::{
    netns_command, output_with_timeout, skip_or_fail, wait_until, write_file_0600, Proc, Site, Topo,
};
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// charon is not on PATH on Debian.
pub const CHARON_BIN: &str = "/usr/lib/ipsec/charon";
/// Where Debian keeps the plugins loaded below.
pub const PLUGIN_DIR: &str = "/usr/lib/ipsec/plugins";
/// Plugins charon loads (`load_modular = no`). kernel-libipsec must come before kernel-netlink:
/// the first plugin registering the kernel-ipsec interface wins. `!` = charon refuses to start
/// without it (so a missing kernel-libipsec never silently falls back to kernel XFRM).
/// (kernel-netlink cannot be marked critical: its own kernel-ipsec feature is refused once
/// kernel-libipsec provides that interface, and a critical plugin must load every feature.)
const CHARON_PLUGINS: &str = "random nonce openssl! gcm! aes sha1 sha2 hmac kdf \
     kernel-libipsec! kernel-netlink socket-default! vici!";
/// Plugin files that must exist (Debian package in the message).
const PLUGIN_FILES: &[(&str, &str)] = &[
    ("kernel-libipsec", "libcharon-extra-plugins"),
    ("openssl", "libstrongswan-standard-plugins"),
    ("gcm", "libstrongswan-standard-plugins"),
    ("kernel-netlink", "strongswan-libcharon"),
    ("socket-default", "strongswan-libcharon"),
    ("vici", "strongswan-libcharon"),
];
/// swanctl's own plugins (keeps it from trying, and complaining about, every installed one).
const SWANCTL_PLUGINS: &str = "pem pkcs1 x509 pubkey openssl random nonce";
/// Time allowed for charon to create its VICI socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Default `swanctl` command timeout (process level).
const SWANCTL_TIMEOUT: Duration = Duration::from_secs(30);

static INSTANCE_SEQ: AtomicU32 = AtomicU32::new(0);

/// Checks root/netns (see [`super::prereq`]), `unshare`, `swanctl`, charon and its plugins.
/// Returns false (after printing `SKIP: ...`) when something is missing outside CI; panics
/// under `CI=true`.
pub fn prereq() -> bool {
    if !super::prereq(&["ping", "unshare", "swanctl", CHARON_BIN]) {
        return false;
    }
    let missing: Vec<String> = PLUGIN_FILES
        .iter()
        .filter(|(p, _)| {
            !Path::new(PLUGIN_DIR)
                .join(format!("libstrongswan-{p}.so"))
                .exists()
        })
        .map(|(p, pkg)| format!("strongSwan plugin {p} (apt: {pkg})"))
        .collect();
    if missing.is_empty() {
        return true;
    }
    skip_or_fail(&format!(
        "needs {} (run scripts/install-test-deps.sh)",
        missing.join(", ")
    ))
}

// ---------------------------------------------------------------------------------------------
// connection spec
// ---------------------------------------------------------------------------------------------

/// `dpd_action` of the CHILD_SA: what charon does when DPD declares the peer dead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DpdAction {
    Clear,
    Restart,
    Trap,
    None,
}

/// `start_action` of the CHILD_SA: what charon does once the config is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAction {
    None,
    Start,
    Trap,
}

impl DpdAction {
    fn as_str(self) -> &'static str {
        match self {
            DpdAction::Clear => "clear",
            DpdAction::Restart => "restart",
            DpdAction::Trap => "trap",
            DpdAction::None => "none",
        }
    }
}

impl StartAction {
    fn as_str(self) -> &'static str {
        match self {
            StartAction::None => "none",
            StartAction::Start => "start",
            StartAction::Trap => "trap",
        }
    }
}

/// One IKEv2/PSK site-to-site connection with one tunnel-mode CHILD_SA, as seen from the charon
/// that loads it. Durations of zero disable the timer (rekeying, DPD). `rand_time` is always 0,
/// so timers fire when configured.
#[derive(Clone, Debug)]
pub struct ConnSpec {
    /// swanctl connection name (`--ike`).
    pub name: String,
    /// CHILD_SA name (`--child`).
    pub child: String,
    /// Underlay address of this charon (`local_addrs`).
    pub local_addr: String,
    /// Underlay address of the peer (`remote_addrs`).
    pub remote_addr: String,
    /// IKE port of the peer (`remote_port`, default 500).
    pub remote_port: u16,
    pub local_id: String,
    pub remote_id: String,
    /// Pre-shared key (written as `0x<hex>`).
    pub psk: Vec<u8>,
    pub local_ts: Vec<String>,
    pub remote_ts: Vec<String>,
    /// IKE proposal, e.g. `aes256gcm16-prfsha256-x25519`.
    pub ike_proposal: String,
    /// ESP proposal, e.g. `aes256gcm16` (add a DH group for PFS).
    pub esp_proposal: String,
    /// CHILD_SA `rekey_time` (0 = never).
    pub child_rekey_time: Duration,
    /// IKE_SA `rekey_time` (0 = never).
    pub ike_rekey_time: Duration,
    /// `dpd_delay` (0 = no DPD).
    pub dpd_delay: Duration,
    pub dpd_action: DpdAction,
    /// CHILD_SA `start_action`.
    pub start_action: StartAction,
    /// Force UDP encapsulation (`encap`); with kernel-libipsec ESP is UDP-encapsulated anyway.
    pub encap: bool,
    /// charon-wide `retransmit_tries` (DPD gives up after this many retransmits).
    pub retransmit_tries: u32,
    /// charon-wide `retransmit_timeout`.
    pub retransmit_timeout: Duration,
    /// charon-wide `retransmit_base`.
    pub retransmit_base: f64,
    /// `keyingtries` (0 = forever).
    pub keyingtries: u32,
}

impl ConnSpec {
    /// Site-to-site defaults for the charon in `site` of `t`: underlay addresses, ids
    /// `site-a.sitewire.test`/`site-b.sitewire.test`, a fixed 32-byte PSK, `subnet_a <->
    /// subnet_b`, aes256gcm16-prfsha256-x25519 / aes256gcm16, no rekeying, no DPD (action
    /// clear), start_action none, remote port 500, keyingtries 1, and a short retransmission
    /// schedule (3 tries, 2 s, base 1.4: about 14 s until charon gives up).
    pub fn for_site(t: &Topo, site: Site) -> ConnSpec {
        let (me, peer, lts, rts, lid, rid) = match site {
            Site::A => (
                t.underlay_a,
                t.underlay_b,
                &t.subnet_a,
                &t.subnet_b,
                "a",
                "b",
            ),
            Site::B => (
                t.underlay_b,
                t.underlay_a,
                &t.subnet_b,
                &t.subnet_a,
                "b",
                "a",
            ),
        };
        ConnSpec {
            name: "s2s".into(),
            child: "net".into(),
            local_addr: me.to_string(),
            remote_addr: peer.to_string(),
            remote_port: 500,
            local_id: format!("site-{lid}.sitewire.test"),
            remote_id: format!("site-{rid}.sitewire.test"),
            psk: b"sitewire-strongswan-test-psk-32b".to_vec(),
            local_ts: vec![lts.clone()],
            remote_ts: vec![rts.clone()],
            ike_proposal: "aes256gcm16-prfsha256-x25519".into(),
            esp_proposal: "aes256gcm16".into(),
            child_rekey_time: Duration::ZERO,
            ike_rekey_time: Duration::ZERO,
            dpd_delay: Duration::ZERO,
            dpd_action: DpdAction::Clear,
            start_action: StartAction::None,
            encap: false,
            retransmit_tries: 3,
            retransmit_timeout: Duration::from_secs(2),
            retransmit_base: 1.4,
            keyingtries: 1,
        }
    }

    /// Sum of the retransmission timeouts: how long charon waits for an answer to a request
    /// (e.g. a DPD probe) before "giving up after N retransmits".
    pub fn give_up_after(&self) -> Duration {
        let t = self.retransmit_timeout.as_secs_f64();
        let total: f64 = (0..=self.retransmit_tries)
            .map(|i| t * self.retransmit_base.powi(i as i32))
            .sum();
        Duration::from_secs_f64(total)
    }

    /// The swanctl.conf text for this connection.
    pub fn swanctl_conf(&self) -> String {
        let psk_hex = self.psk.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        });
        format!(
            "# sitewire test peer: generated by tests/support/strongswan.rs\n\
             connections {{\n\
             \x20   {name} {{\n\
             \x20       version = 2\n\
             \x20       local_addrs = {local_addr}\n\
             \x20       remote_addrs = {remote_addr}\n\
             \x20       remote_port = {remote_port}\n\
             \x20       proposals = {ike}\n\
             \x20       encap = {encap}\n\
             \x20       dpd_delay = {dpd}\n\
             \x20       rekey_time = {ike_rekey}\n\
             \x20       rand_time = 0\n\
             \x20       keyingtries = {keyingtries}\n\
             \x20       unique = replace\n\
             \x20       local {{\n\
             \x20           auth = psk\n\
             \x20           id = \"{local_id}\"\n\
             \x20       }}\n\
             \x20       remote {{\n\
             \x20           auth = psk\n\
             \x20           id = \"{remote_id}\"\n\
             \x20       }}\n\
             \x20       children {{\n\
             \x20           {child} {{\n\
             \x20               mode = tunnel\n\
             \x20               local_ts = {lts}\n\
             \x20               remote_ts = {rts}\n\
             \x20               esp_proposals = {esp}\n\
             \x20               rekey_time = {child_rekey}\n\
             \x20               rand_time = 0\n\
             \x20               dpd_action = {dpd_action}\n\
             \x20               start_action = {start_action}\n\
             \x20           }}\n\
             \x20       }}\n\
             \x20   }}\n\
             }}\n\
             secrets {{\n\
             \x20   ike-{name} {{\n\
             \x20       id-local = \"{local_id}\"\n\
             \x20       id-remote = \"{remote_id}\"\n\
             \x20       secret = 0x{psk_hex}\n\
             \x20   }}\n\
             }}\n",
            name = self.name,
            child = self.child,
            local_addr = self.local_addr,
            remote_addr = self.remote_addr,
            remote_port = self.remote_port,
            ike = self.ike_proposal,
            esp = self.esp_proposal,
            encap = if self.encap { "yes" } else { "no" },
            dpd = secs(self.dpd_delay),
            ike_rekey = secs(self.ike_rekey_time),
            child_rekey = secs(self.child_rekey_time),
            keyingtries = self.keyingtries,
            local_id = self.local_id,
            remote_id = self.remote_id,
            lts = self.local_ts.join(","),
            rts = self.remote_ts.join(","),
            dpd_action = self.dpd_action.as_str(),
            start_action = self.start_action.as_str(),
        )
    }

    /// The strongswan.conf text for a charon whose instance directory is `dir` (its log goes to
    /// `dir/charon.log`).
    fn strongswan_conf(&self, dir: &Path) -> String {
        format!(
            "# sitewire test peer: generated by tests/support/strongswan.rs\n\
             # charon runs with {dir}/run bind-mounted over /run (private mount namespace).\n\
             charon {{\n\
             \x20   load_modular = no\n\
             \x20   load = {plugins}\n\
             \x20   retransmit_tries = {tries}\n\
             \x20   retransmit_timeout = {timeout:.3}\n\
             \x20   retransmit_base = {base}\n\
             \x20   install_routes = yes\n\
             \x20   routing_table = 220\n\
             \x20   routing_table_prio = 220\n\
             \x20   plugins {{\n\
             \x20       vici {{\n\
             \x20           socket = unix:///run/charon.vici\n\
             \x20       }}\n\
             \x20       socket-default {{\n\
             \x20           use_ipv6 = no\n\
             \x20       }}\n\
             \x20   }}\n\
             \x20   filelog {{\n\
             \x20       main {{\n\
             \x20           path = {dir}/charon.log\n\
             \x20           append = yes\n\
             \x20           flush_line = yes\n\
             \x20           time_format = %H:%M:%S\n\
             \x20           time_add_ms = yes\n\
             \x20           ike_name = yes\n\
             \x20           default = 1\n\
             \x20           ike = 2\n\
             \x20           cfg = 1\n\
             \x20           net = 1\n\
             \x20           enc = 0\n\
             \x20       }}\n\
             \x20       stderr {{\n\
             \x20           default = 0\n\
             \x20       }}\n\
             \x20   }}\n\
             \x20   syslog {{\n\
             \x20       daemon {{\n\
             \x20           default = -1\n\
             \x20       }}\n\
             \x20       auth {{\n\
             \x20           default = -1\n\
             \x20       }}\n\
             \x20   }}\n\
             }}\n\
             swanctl {{\n\
             \x20   load = {swanctl_plugins}\n\
             }}\n",
            dir = dir.display(),
            plugins = CHARON_PLUGINS,
            tries = self.retransmit_tries,
            timeout = self.retransmit_timeout.as_secs_f64(),
            base = self.retransmit_base,
            swanctl_plugins = SWANCTL_PLUGINS,
        )
    }
}

/// swanctl time value: whole seconds ("0" disables).
fn secs(d: Duration) -> String {
    if d.is_zero() {
        "0".into()
    } else {
        format!("{}s", d.as_secs().max(1))
    }
}

// ---------------------------------------------------------------------------------------------
// parsed `swanctl --list-sas`
// ---------------------------------------------------------------------------------------------

/// `swanctl --list-sas`, parsed (only what tests look at).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SaList {
    pub ikes: Vec<IkeSa>,
}

/// One IKE_SA of [`SaList`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IkeSa {
    pub name: String,
    pub unique_id: u32,
    /// ESTABLISHED, CONNECTING, REKEYING, DELETING, ...
    pub state: String,
    pub local_id: String,
    /// `addr[port]` as printed, e.g. `10.210.0.1[4500]`.
    pub local_host: String,
    pub remote_id: String,
    pub remote_host: String,
    /// e.g. `AES_GCM_16-256/PRF_HMAC_SHA2_256/CURVE_25519`.
    pub algorithms: String,
    pub children: Vec<ChildSa>,
}

/// One CHILD_SA of an [`IkeSa`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChildSa {
    pub name: String,
    pub unique_id: u32,
    pub reqid: u32,
    /// INSTALLED, REKEYED, DELETING, ...
    pub state: String,
    /// e.g. `TUNNEL-in-UDP` (UDP encapsulation is always on with kernel-libipsec).
    pub mode: String,
    /// e.g. `ESP:AES_GCM_16-256`.
    pub proposal: String,
    /// Inbound SPI (chosen by this charon).
    pub spi_in: u32,
    /// Outbound SPI (chosen by the peer).
    pub spi_out: u32,
    pub bytes_in: u64,
    pub packets_in: u64,
    pub bytes_out: u64,
    pub packets_out: u64,
    pub local_ts: Vec<String>,
    pub remote_ts: Vec<String>,
}

impl SaList {
    /// Parses the text of `swanctl --list-sas`.
    pub fn parse(text: &str) -> SaList {
        let mut ikes: Vec<IkeSa> = Vec::new();
        for line in text.lines() {
            let indent = line.len() - line.trim_start().len();
            let l = line.trim();
            if l.is_empty() {
                continue;
            }
            match indent {
                0 => {
                    // "name: #1, ESTABLISHED, IKEv2, spi_i* spi_r"
                    let Some((name, rest)) = l.split_once(": #") else {
                        continue;
                    };
                    let f: Vec<&str> = rest.split(", ").collect();
                    ikes.push(IkeSa {
                        name: name.to_string(),
                        unique_id: f[0].parse().unwrap_or(0),
                        state: f.get(1).unwrap_or(&"").to_string(),
                        ..IkeSa::default()
                    });
                }
                2 => {
                    let Some(ike) = ikes.last_mut() else { continue };
                    if let Some(r) = l.strip_prefix("local ") {
                        (ike.local_id, ike.local_host) = id_at_host(r);
                    } else if let Some(r) = l.strip_prefix("remote ") {
                        (ike.remote_id, ike.remote_host) = id_at_host(r);
                    } else if let Some((name, rest)) = l.split_once(": #") {
                        // "net: #1, reqid 1, INSTALLED, TUNNEL-in-UDP, ESP:AES_GCM_16-256"
                        let f: Vec<&str> = rest.split(", ").collect();
                        ike.children.push(ChildSa {
                            name: name.to_string(),
                            unique_id: f[0].parse().unwrap_or(0),
                            reqid: f
                                .get(1)
                                .and_then(|s| s.strip_prefix("reqid "))
                                .and_then(|s| s.parse().ok())
                                .unwrap_or(0),
                            state: f.get(2).unwrap_or(&"").to_string(),
                            mode: f.get(3).unwrap_or(&"").to_string(),
                            proposal: f.get(4).unwrap_or(&"").to_string(),
                            ..ChildSa::default()
                        });
                    } else if ike.algorithms.is_empty()
                        && l.contains('/')
                        && !l.contains(' ')
                        && l.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                    {
                        ike.algorithms = l.to_string();
                    }
                }
                _ => {
                    let Some(child) = ikes.last_mut().and_then(|i| i.children.last_mut()) else {
                        continue;
                    };
                    let mut words = l.split_whitespace();
                    match words.next() {
                        Some("in") => {
                            (child.spi_in, child.bytes_in, child.packets_in) = spi_counters(l)
                        }
                        Some("out") => {
                            (child.spi_out, child.bytes_out, child.packets_out) = spi_counters(l)
                        }
                        Some("local") => child.local_ts = words.map(str::to_string).collect(),
                        Some("remote") => child.remote_ts = words.map(str::to_string).collect(),
                        _ => {}
                    }
                }
            }
        }
        SaList { ikes }
    }

    /// The IKE_SA with this connection name (the first one, if several).
    pub fn ike(&self, name: &str) -> Option<&IkeSa> {
        self.ikes.iter().find(|i| i.name == name)
    }

    /// Is there an ESTABLISHED IKE_SA with at least one INSTALLED CHILD_SA?
    pub fn established(&self) -> bool {
        self.ikes
            .iter()
            .any(|i| i.established() && !i.installed().is_empty())
    }

    /// All INSTALLED CHILD_SAs of ESTABLISHED IKE_SAs.
    pub fn installed_children(&self) -> Vec<&ChildSa> {
        self.ikes
            .iter()
            .filter(|i| i.established())
            .flat_map(|i| i.installed())
            .collect()
    }
}

impl IkeSa {
    pub fn established(&self) -> bool {
        self.state == "ESTABLISHED"
    }

    /// CHILD_SAs in state INSTALLED.
    pub fn installed(&self) -> Vec<&ChildSa> {
        self.children
            .iter()
            .filter(|c| c.state == "INSTALLED")
            .collect()
    }
}

/// `'site-a.x' @ 10.0.0.1[4500]` -> (`site-a.x`, `10.0.0.1[4500]`).
fn id_at_host(s: &str) -> (String, String) {
    let s = s.trim();
    match s.rsplit_once(" @ ") {
        Some((id, host)) => (
            id.trim().trim_matches('\'').to_string(),
            host.trim().to_string(),
        ),
        None => (s.trim_matches('\'').to_string(), String::new()),
    }
}

/// `in  c2b1a0f3 (-|0x...),    84 bytes,     1 packets,     0s ago` -> (spi, bytes, packets).
fn spi_counters(l: &str) -> (u32, u64, u64) {
    let words: Vec<&str> = l
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .collect();
    let spi = words
        .get(1)
        .and_then(|w| u32::from_str_radix(w, 16).ok())
        .unwrap_or(0);
    let before = |unit: &str| {
        words
            .windows(2)
            .find(|w| w[1] == unit)
            .and_then(|w| w[0].parse().ok())
            .unwrap_or(0)
    };
    (spi, before("bytes"), before("packets"))
}

// ---------------------------------------------------------------------------------------------
// charon
// ---------------------------------------------------------------------------------------------

/// A strongSwan charon running in one namespace of a [`Topo`], with its configuration loaded.
/// Stopped (by its PID) when dropped, and in any case when the topology is dropped.
pub struct Charon<'t> {
    topo: &'t Topo,
    pub site: Site,
    pub ns: String,
    pub spec: ConnSpec,
    /// Instance directory: strongswan.conf, swanctl.conf, charon.log, run/ (mounted on /run).
    pub dir: PathBuf,
    proc: Proc,
    name: String,
}

impl<'t> Charon<'t> {
    /// Writes the configuration into `<tempdir>/charon-<site>-<n>/`, starts charon in the
    /// site's namespace (private /run), waits for its VICI socket and runs
    /// `swanctl --load-all`. Panics (with charon's log) if any step fails.
    pub fn start(topo: &'t Topo, site: Site, conn: &ConnSpec) -> Charon<'t> {
        let seq = INSTANCE_SEQ.fetch_add(1, Ordering::Relaxed);
        let tag = match site {
            Site::A => "a",
            Site::B => "b",
        };
        let name = format!("charon-{tag}-{seq}");
        let dir = topo.tempdir().join(&name);
        assert!(
            !dir.starts_with("/run") && !dir.starts_with("/var/run"),
            "{}: the charon instance dir must not be under /run (it is hidden by the /run bind \
             mount); set TMPDIR elsewhere",
            dir.display()
        );
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join("run"))
            .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        write_file_0600(dir.join("strongswan.conf"), conn.strongswan_conf(&dir));
        write_file_0600(dir.join("swanctl.conf"), conn.swanctl_conf());
        let proc = Self::spawn(topo, site, &name, &dir);
        let charon = Charon {
            topo,
            site,
            ns: topo.ns(site).to_string(),
            spec: conn.clone(),
            dir,
            proc,
            name,
        };
        charon.wait_vici();
        charon.load_all();
        charon
    }

    fn spawn(topo: &Topo, site: Site, name: &str, dir: &Path) -> Proc {
        let run = dir.join("run");
        // A pid file left by a killed instance would make charon refuse to start.
        let _ = fs::remove_file(run.join("charon.pid"));
        let _ = fs::remove_file(run.join("charon.vici"));
        let conf = dir.join("strongswan.conf");
        let (run_s, conf_s) = (
            run.to_string_lossy().into_owned(),
            conf.to_string_lossy().into_owned(),
        );
        // ip netns exec, unshare and sh all exec: the registered PID is charon's own.
        topo.spawn_env(
            topo.ns(site),
            name,
            &[("STRONGSWAN_CONF", &conf_s)],
            &[
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                "mount --bind \"$0\" /run && exec \"$1\"",
                &run_s,
                CHARON_BIN,
            ],
        )
    }

    /// Waits until charon has written its pid file (our PID) and created the VICI socket, which
    /// it does once initialisation succeeded. Panics with the logs if charon exits or times out.
    fn wait_vici(&self) {
        let run = self.dir.join("run");
        let (sock, pid_file) = (run.join("charon.vici"), run.join("charon.pid"));
        let pid = self.proc.pid.to_string();
        let ready = || {
            sock.exists()
                && fs::read_to_string(&pid_file).is_ok_and(|p| p.trim() == pid)
                && self.proc.alive()
        };
        wait_until(START_TIMEOUT, Duration::from_millis(50), || {
            ready() || !self.proc.alive()
        });
        if !ready() {
            panic!(
                "{}: charon (pid {pid}) not ready after {START_TIMEOUT:?} (alive: {}, VICI socket \
                 {}: {}, pid file: {:?})\nstderr:\n{}\nlog:\n{}",
                self.name,
                self.proc.alive(),
                sock.display(),
                sock.exists(),
                fs::read_to_string(&pid_file).unwrap_or_default().trim(),
                self.proc.log_tail(20),
                self.log_tail(40)
            );
        }
    }

    /// `unix://<dir>/run/charon.vici` (the VICI socket as seen from outside charon).
    pub fn vici_uri(&self) -> String {
        format!(
            "unix://{}",
            self.dir.join("run").join("charon.vici").display()
        )
    }

    /// charon's PID.
    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// The registered process (its captured stderr holds level-0 messages only).
    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Runs `swanctl ARGS --uri <vici>` in the charon's namespace; None if it hung past
    /// `timeout` (it is killed then).
    pub fn swanctl_timeout(&self, args: &[&str], timeout: Duration) -> Option<Output> {
        let uri = self.vici_uri();
        let mut cmd = vec!["swanctl"];
        cmd.extend_from_slice(args);
        cmd.extend_from_slice(&["--uri", &uri]);
        let mut c = netns_command(&self.ns, &cmd);
        c.env("STRONGSWAN_CONF", self.dir.join("strongswan.conf"));
        output_with_timeout(c, timeout)
    }

    /// [`Charon::swanctl_timeout`] with 30 s; Ok(stdout) on success, Err(stdout+stderr) else.
    pub fn swanctl(&self, args: &[&str]) -> Result<String, String> {
        let Some(out) = self.swanctl_timeout(args, SWANCTL_TIMEOUT) else {
            return Err(format!("swanctl {args:?} hung for {SWANCTL_TIMEOUT:?}"));
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "swanctl {args:?} failed ({}):\n{stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// `swanctl --load-all` with the instance's swanctl.conf. Panics on failure.
    pub fn load_all(&self) {
        let file = self.dir.join("swanctl.conf");
        let file_s = file.to_string_lossy().into_owned();
        if let Err(e) = self.swanctl(&["--load-all", "--noprompt", "--file", &file_s]) {
            panic!("{}: {e}\nlog:\n{}", self.name, self.log_tail(30));
        }
    }

    /// `swanctl --initiate --child CHILD --timeout 20` (blocks until established or failed).
    pub fn initiate(&self, child: &str) -> Result<String, String> {
        self.swanctl(&["--initiate", "--child", child, "--timeout", "20"])
    }

    /// `swanctl --terminate --ike <conn name> --timeout 10`.
    pub fn terminate_ike(&self) -> Result<String, String> {
        self.swanctl(&["--terminate", "--ike", &self.spec.name, "--timeout", "10"])
    }

    /// Raw text of `swanctl --list-sas` (panics if swanctl fails).
    pub fn list_sas(&self) -> String {
        self.swanctl(&["--list-sas"])
            .unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    /// [`Charon::list_sas`], parsed.
    pub fn sas(&self) -> SaList {
        SaList::parse(&self.list_sas())
    }

    /// Polls until an IKE_SA is ESTABLISHED with an INSTALLED CHILD_SA; None after `timeout`.
    pub fn try_wait_established(&self, timeout: Duration) -> Option<SaList> {
        let mut last = None;
        let ok = wait_until(timeout, Duration::from_millis(200), || {
            let sas = self.sas();
            let done = sas.established();
            last = Some(sas);
            done
        });
        if ok {
            last
        } else {
            None
        }
    }

    /// [`Charon::try_wait_established`], panicking with the SA list and log on timeout.
    pub fn wait_established(&self, timeout: Duration) -> SaList {
        self.try_wait_established(timeout).unwrap_or_else(|| {
            panic!(
                "{}: not established after {timeout:?}\n{}\nlog:\n{}",
                self.name,
                self.list_sas(),
                self.log_tail(40)
            )
        })
    }

    /// Path of charon's log file (ike 2, cfg/net/others 1, enc 0; no key material).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("charon.log")
    }

    /// charon's log so far (kept across [`Charon::restart`]).
    pub fn log(&self) -> String {
        fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines of [`Charon::log`].
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Current length of the log in bytes: a mark for [`Charon::wait_log`].
    pub fn log_mark(&self) -> usize {
        fs::metadata(self.log_path())
            .map(|m| m.len() as usize)
            .unwrap_or(0)
    }

    /// Waits until a log line written after byte offset `since` contains `needle`; returns that
    /// line, or None after `timeout`.
    pub fn wait_log(&self, since: usize, needle: &str, timeout: Duration) -> Option<String> {
        let mut found = None;
        wait_until(timeout, Duration::from_millis(100), || {
            let log = self.log();
            let tail = log.get(since..).unwrap_or("");
            found = tail
                .lines()
                .find(|l| l.contains(needle))
                .map(str::to_string);
            found.is_some()
        });
        found
    }

    /// Is charon running (a SIGSTOPped charon is)?
    pub fn alive(&self) -> bool {
        self.proc.alive()
    }

    /// Sends `sig` to charon (by its PID; false if it has exited).
    pub fn signal(&self, sig: i32) -> bool {
        self.proc.signal(sig)
    }

    /// SIGTERM (SIGKILL after 5 s); returns the exit status.
    pub fn stop(&self) -> ExitStatus {
        self.proc.stop(Duration::from_secs(5))
    }

    /// Stops charon and starts it again with the same configuration and instance directory
    /// (same VICI socket path), then loads the configuration again.
    pub fn restart(&mut self) {
        self.stop();
        self.proc = Self::spawn(self.topo, self.site, &self.name, &self.dir);
        self.wait_vici();
        self.load_all();
    }

    /// Waits up to `timeout` for charon to exit.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.wait_exit(timeout)
    }
}

impl Drop for Charon<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- {} ({}) charon.log, last 60 lines ----\n{}",
                self.name,
                self.ns,
                self.log_tail(60)
            );
        }
        self.proc.stop(Duration::from_secs(5));
    }
}
