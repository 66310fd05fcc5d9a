//! `sitewire doctor -c FILE`: the troubleshooting an admin would do by hand, automated.
//!
//! Every check prints `ok`, `warn` or `fail`, what it looked at, and for anything not ok
//! a one-line fix. The exit code is non-zero when any check fails. The file is read
//! leniently (plain TOML), so the checks still run when `sitewire check` would refuse it.
//!
//! Checks, all in the current network namespace:
//! * `config`  the full validation of `sitewire check`;
//! * `tun`     `/dev/net/tun` can be opened; `privs`: CAP_NET_ADMIN in the effective set;
//! * `iface`   the interface name is free (or is this site's own running daemon);
//! * `port`    the UDP listen port can be bound (or is this site's own running daemon);
//! * `keys`    key files: present, regular, mode 0600 or stricter, owned by us, a key;
//! * `dns`     endpoint host names resolve;
//! * `routes`  remote subnets against the host's routes (main table via /proc/net/route
//!   and /proc/net/ipv6_route); endpoints inside their own tunnel's subnets;
//! * `mtu`     site MTU + encapsulation overhead against the MTU of the interface the
//!   route to each endpoint leaves by;
//! * `clock`   the system clock against a fixed floor and the modification times of the
//!   config and key files, plus the kernel's NTP-synchronised flag. No time server
//!   is asked: the output says so.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;

use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` (not write_str) so that width specifiers line the columns up.
        f.pad(match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    pub check: &'static str,
    pub message: String,
    pub fix: Option<String>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<4}  {:<6}  {}", self.level, self.check, self.message)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n              fix: {fix}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Report(Vec<Finding>);

impl Report {
    fn ok(&mut self, check: &'static str, message: impl Into<String>) {
        self.push(Level::Ok, check, message.into(), None);
    }
    fn warn(&mut self, check: &'static str, message: impl Into<String>, fix: impl Into<String>) {
        self.push(Level::Warn, check, message.into(), Some(fix.into()));
    }
    fn fail(&mut self, check: &'static str, message: impl Into<String>, fix: impl Into<String>) {
        self.push(Level::Fail, check, message.into(), Some(fix.into()));
    }
    fn push(&mut self, level: Level, check: &'static str, message: String, fix: Option<String>) {
        self.0.push(Finding {
            level,
            check,
            message,
            fix,
        });
    }
}

// ---- the configuration, read leniently ----

#[derive(Debug, Clone)]
struct RawTunnel {
    name: String,
    ipsec: bool,
    endpoints: Vec<String>,
    remote: Vec<IpNet>,
    psk: Option<String>,
}

#[derive(Debug, Clone, Default)]
struct Raw {
    interface: Option<String>,
    listen_port: Option<u16>,
    private_key: Option<String>,
    mtu: u16,
    tunnels: Vec<RawTunnel>,
}

fn raw(table: &toml::Table) -> Raw {
    let site = table.get("site").and_then(|s| s.as_table());
    let s = |k: &str| {
        site.and_then(|t| t.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let nets = |t: &toml::Table, k: &str| -> Vec<IpNet> {
        t.get(k)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str()?.parse::<IpNet>().ok().map(|n| n.trunc()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let tunnels = table
        .get("tunnel")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_table())
                .enumerate()
                .map(|(i, t)| RawTunnel {
                    name: t
                        .get("name")
                        .and_then(|v| v.as_str())
                        .map_or(format!("tunnel[{i}]"), str::to_string),
                    ipsec: t.get("protocol").and_then(|v| v.as_str()) == Some("ipsec"),
                    endpoints: t
                        .get("endpoint")
                        .and_then(|v| v.as_array())
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default(),
                    remote: nets(t, "remote_subnets"),
                    psk: t.get("psk").and_then(|v| v.as_str()).map(str::to_string),
                })
                .collect()
        })
        .unwrap_or_default();
    Raw {
        interface: s("interface"),
        listen_port: site
            .and_then(|t| t.get("listen_port"))
            .and_then(|v| v.as_integer())
            .and_then(|p| u16::try_from(p).ok()),
        private_key: s("private_key"),
        mtu: site
            .and_then(|t| t.get("mtu"))
            .and_then(|v| v.as_integer())
            .and_then(|m| u16::try_from(m).ok())
            .unwrap_or(1420),
        tunnels,
    }
}

/// An endpoint as written: `ip:port`, `[v6]:port`, `host:port`, or (IPsec) without port.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ep {
    Addr(SocketAddr),
    Host(String, u16),
}

fn parse_endpoint(s: &str, default_port: u16) -> Option<Ep> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(Ep::Addr(a));
    }
    if let Ok(ip) = s.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Some(Ep::Addr(SocketAddr::new(ip, default_port)));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Some(Ep::Host(h.to_string(), p.parse().ok()?)),
        None if !s.is_empty() => Some(Ep::Host(s.to_string(), default_port)),
        None => None,
    }
}

// ---- host routes ----

#[derive(Debug, Clone, PartialEq, Eq)]
struct HostRoute {
    net: IpNet,
    iface: String,
}

fn hex_u32_le(s: &str) -> Option<u32> {
    u32::from_str_radix(s, 16).ok().map(u32::from_be)
}

/// The main routing table of this network namespace, from procfs.
fn host_routes() -> Vec<HostRoute> {
    let mut out = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/proc/net/route") {
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                continue;
            }
            let (Some(dst), Some(mask)) = (hex_u32_le(f[1]), hex_u32_le(f[7])) else {
                continue;
            };
            let len = mask.count_ones() as u8;
            if let Ok(net) = IpNet::new(IpAddr::V4(dst.into()), len) {
                out.push(HostRoute {
                    net: net.trunc(),
                    iface: f[0].to_string(),
                });
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string("/proc/net/ipv6_route") {
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[0].len() != 32 {
                continue;
            }
            let (Ok(bits), Ok(len)) =
                (u128::from_str_radix(f[0], 16), u8::from_str_radix(f[1], 16))
            else {
                continue;
            };
            let iface = f[9].to_string();
            if iface == "lo" {
                continue; // local and unreachable entries
            }
            let addr = std::net::Ipv6Addr::from(bits);
            if addr.is_unicast_link_local() || addr.is_multicast() {
                continue;
            }
            if let Ok(net) = IpNet::new(IpAddr::V6(addr), len) {
                out.push(HostRoute {
                    net: net.trunc(),
                    iface,
                });
            }
        }
    }
    out
}

/// Longest-prefix match over the host routes.
fn route_for(routes: &[HostRoute], ip: IpAddr) -> Option<&HostRoute> {
    routes
        .iter()
        .filter(|r| r.net.contains(&ip))
        .max_by_key(|r| r.net.prefix_len())
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn is_default(n: &IpNet) -> bool {
    n.prefix_len() == 0
}

// ---- the checks ----

/// Runs every check on `path`; the findings in order.
pub async fn run(path: &Path) -> Vec<Finding> {
    let mut r = Report::default();
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let base = path.parent().unwrap_or(Path::new("/")).to_path_buf();

    // config
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            r.fail(
                "config",
                format!("cannot read {}: {e}", path.display()),
                "give the path of an existing site configuration with -c",
            );
            return r.0;
        }
    };
    let table = match toml::from_str::<toml::Table>(&text) {
        Ok(t) => t,
        Err(e) => {
            r.fail(
                "config",
                format!("{} is not valid TOML: {}", path.display(), e.message()),
                format!("sitewire check -c {} shows the line", path.display()),
            );
            return r.0;
        }
    };
    let cfg = match Config::load(&path) {
        Ok(c) => {
            r.ok(
                "config",
                format!(
                    "{} is valid (site {:?}, {} tunnel(s))",
                    path.display(),
                    c.site.name,
                    c.tunnels.len()
                ),
            );
            Some(c)
        }
        Err(errors) => {
            for e in &errors.0 {
                r.fail(
                    "config",
                    e.to_string(),
                    "edit the file; `sitewire check -c FILE` re-checks it",
                );
            }
            None
        }
    };
    let raw = raw(&table);
    let running = raw
        .interface
        .as_deref()
        .is_some_and(crate::cleanup::daemon_running);

    check_tun(&mut r);
    check_privileges(&mut r);
    check_interface(&mut r, &raw, running).await;
    check_port(&mut r, &raw, running);
    let key_files = check_keys(&mut r, &raw, &base);
    let resolved = check_dns(&mut r, &raw).await;
    let routes = host_routes();
    check_routes(&mut r, &raw, &routes, &resolved);
    check_mtu(&mut r, &raw, cfg.as_ref(), &routes, &resolved).await;
    let mut files = vec![path.clone()];
    files.extend(key_files);
    check_clock(&mut r, &files, SystemTime::now());
    r.0
}

fn check_tun(r: &mut Report) {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(_) => r.ok("tun", "/dev/net/tun opens read-write"),
        Err(e) => r.fail(
            "tun",
            format!("/dev/net/tun cannot be opened: {e}"),
            "load the tun module (modprobe tun); in a container pass --device /dev/net/tun; \
             under systemd keep DeviceAllow=/dev/net/tun rw",
        ),
    }
}

fn check_privileges(r: &mut Report) {
    const CAP_NET_ADMIN: u32 = 12;
    let eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        });
    match eff {
        Some(caps) if caps & (1 << CAP_NET_ADMIN) != 0 => {
            r.ok("privs", "CAP_NET_ADMIN is in the effective set")
        }
        _ => r.warn(
            "privs",
            "this process lacks CAP_NET_ADMIN, which `sitewire up` needs for the TUN, addresses and routes",
            "run as root, or through the systemd unit (AmbientCapabilities=CAP_NET_ADMIN)",
        ),
    }
}

async fn check_interface(r: &mut Report, raw: &Raw, running: bool) {
    let Some(iface) = &raw.interface else { return };
    if running {
        r.ok(
            "iface",
            format!("{iface} belongs to this site's running daemon"),
        );
        return;
    }
    let netlink = match crate::dataplane::netlink::Netlink::connect() {
        Ok(n) => n,
        Err(e) => {
            r.warn(
                "iface",
                format!("cannot ask the kernel about {iface}: {e:#}"),
                "run as root",
            );
            return;
        }
    };
    match netlink.find_link(iface).await {
        Ok(None) => r.ok(
            "iface",
            format!("no interface called {iface} yet: it is free"),
        ),
        Ok(Some(l)) if !l.is_tun => r.fail(
            "iface",
            format!("{iface} already exists and is not a TUN device"),
            "pick another [site] interface name",
        ),
        Ok(Some(l)) if l.carrier == Some(true) => r.fail(
            "iface",
            format!("TUN device {iface} exists and another process holds it open"),
            "stop that process (a WireGuard implementation?) or pick another interface name",
        ),
        Ok(Some(_)) => r.warn(
            "iface",
            format!("TUN device {iface} is left over from an earlier run"),
            "nothing: `sitewire up` removes it at start (or: ip link del {iface})",
        ),
        Err(e) => r.warn(
            "iface",
            format!("cannot ask the kernel about {iface}: {e:#}"),
            "run as root",
        ),
    }
}

fn check_port(r: &mut Report, raw: &Raw, running: bool) {
    let mut ports: Vec<(u16, &str)> = Vec::new();
    if let Some(port) = raw.listen_port.filter(|&p| p != 0) {
        ports.push((port, "choose another listen_port"));
    }
    if raw.tunnels.iter().any(|t| t.ipsec) {
        // IPsec peers expect IKE on 500 and NAT-T on 4500; another IKE daemon (strongSwan,
        // libreswan) on this host is the usual culprit.
        let hint = "stop the other IKE daemon (e.g. strongSwan's charon) on this host: IPsec tunnels need UDP 500 and 4500";
        ports.push((crate::dataplane::IKE_PORT, hint));
        ports.push((crate::dataplane::NATT_PORT, hint));
    }
    for (port, other) in ports {
        match crate::dataplane::Wire::bind(port) {
            Ok(_) => r.ok("port", format!("UDP port {port} is free")),
            Err(_) if running => r.ok(
                "port",
                format!("UDP port {port} is in use by this site's running daemon"),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => r.fail(
                "port",
                format!("UDP port {port} is already taken by another process"),
                format!("{other} (find it: ss -ulpn 'sport = :{port}')"),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => r.fail(
                "port",
                format!("UDP port {port} cannot be bound: {e}"),
                "ports below 1024 need CAP_NET_BIND_SERVICE (the shipped units grant it)",
            ),
            Err(e) => r.fail(
                "port",
                format!("UDP port {port} cannot be bound: {e}"),
                other.to_string(),
            ),
        }
    }
}

/// Checks every key file; returns the paths found (for the clock check).
fn check_keys(r: &mut Report, raw: &Raw, base: &Path) -> Vec<PathBuf> {
    let mut refs: Vec<(String, &str, bool)> = Vec::new();
    if let Some(k) = &raw.private_key {
        refs.push(("site.private_key".into(), k.as_str(), true));
    }
    for t in &raw.tunnels {
        if let Some(p) = &t.psk {
            refs.push((format!("tunnel {:?} psk", t.name), p.as_str(), false));
        }
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mut found = Vec::new();
    for (what, value, private) in refs {
        if let Some(v) = value.strip_prefix("vault:") {
            r.ok(
                "keys",
                format!("{what}: vault:{v} is fetched from Vault at start (not checked here)"),
            );
            continue;
        }
        let path = base.join(value);
        let shown = path.display();
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                let gen = if private {
                    format!("(umask 077; sitewire keygen > {shown})")
                } else {
                    format!("(umask 077; wg genpsk > {shown}) and give the peer the same PSK")
                };
                r.fail("keys", format!("{what}: {shown}: {e}"), gen);
                continue;
            }
        };
        found.push(path.clone());
        if !meta.is_file() {
            r.fail(
                "keys",
                format!("{what}: {shown} is not a regular file"),
                "point it at a key file",
            );
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            r.fail(
                "keys",
                format!("{what}: {shown} has mode {mode:04o}: group/others can read the key"),
                format!("chmod 600 {shown} (and consider the key exposed: rotate it)"),
            );
            continue;
        }
        if meta.uid() != me {
            r.warn(
                "keys",
                format!(
                    "{what}: {shown} is owned by uid {}, not by uid {me} running sitewire",
                    meta.uid()
                ),
                format!("chown {me} {shown}"),
            );
            continue;
        }
        let loaded = if private {
            crate::keys::PrivateKey::load(&path).map(|_| ())
        } else {
            crate::keys::Psk::load(&path).map(|_| ())
        };
        match loaded {
            Ok(()) => r.ok(
                "keys",
                format!("{what}: {shown} (mode {mode:04o}) holds a key"),
            ),
            Err(e) => r.fail(
                "keys",
                format!("{what}: {shown}: {e}"),
                "the file must hold one line of base64 for 32 bytes, as `wg genkey` writes",
            ),
        }
    }
    found
}

/// Resolves every endpoint; (tunnel index, endpoint text, address if known).
async fn check_dns(r: &mut Report, raw: &Raw) -> Vec<(usize, String, Option<SocketAddr>)> {
    let mut out = Vec::new();
    let mut names = 0;
    for (i, t) in raw.tunnels.iter().enumerate() {
        let default_port = if t.ipsec { 500 } else { 51820 };
        for e in &t.endpoints {
            match parse_endpoint(e, default_port) {
                Some(Ep::Addr(a)) => out.push((i, e.clone(), Some(a))),
                Some(Ep::Host(h, p)) => {
                    names += 1;
                    let lookup = tokio::net::lookup_host((h.as_str(), p));
                    let res = tokio::time::timeout(Duration::from_secs(5), lookup).await;
                    let addr = match res {
                        Ok(Ok(mut addrs)) => addrs.next(),
                        Ok(Err(e)) => {
                            r.fail(
                                "dns",
                                format!("tunnel {:?}: endpoint {h} does not resolve: {e}", t.name),
                                "fix the name or DNS (/etc/resolv.conf, /etc/hosts), or use an IP address",
                            );
                            None
                        }
                        Err(_) => {
                            r.fail(
                                "dns",
                                format!("tunnel {:?}: endpoint {h}: no answer within 5 s", t.name),
                                "check the DNS servers in /etc/resolv.conf are reachable",
                            );
                            None
                        }
                    };
                    if let Some(a) = addr {
                        r.ok(
                            "dns",
                            format!("tunnel {:?}: {h} resolves to {}", t.name, a.ip()),
                        );
                    }
                    out.push((i, e.clone(), addr));
                }
                None => {}
            }
        }
    }
    if names == 0 {
        r.ok("dns", "no endpoint host names to resolve");
    }
    out
}

fn check_routes(
    r: &mut Report,
    raw: &Raw,
    routes: &[HostRoute],
    resolved: &[(usize, String, Option<SocketAddr>)],
) {
    let own = raw.interface.as_deref().unwrap_or("");
    let host: Vec<&HostRoute> = routes
        .iter()
        .filter(|h| h.iface != own && !is_default(&h.net))
        .collect();
    let mut bad = 0;
    for t in &raw.tunnels {
        for net in &t.remote {
            for h in host.iter().filter(|h| overlaps(net, &h.net)) {
                bad += 1;
                if h.net == *net {
                    r.fail(
                        "routes",
                        format!(
                            "tunnel {:?}: remote subnet {net} is already routed via {} on this host",
                            t.name, h.iface
                        ),
                        format!("remove that route (ip route del {net} dev {}) or renumber one side", h.iface),
                    );
                } else if net.contains(&h.net.network()) {
                    r.fail(
                        "routes",
                        format!(
                            "tunnel {:?}: host route {} via {} lies inside remote subnet {net}: \
                             traffic to it would bypass the tunnel",
                            t.name, h.net, h.iface
                        ),
                        "renumber the remote site or narrow remote_subnets so they do not overlap local networks",
                    );
                } else {
                    r.warn(
                        "routes",
                        format!(
                            "tunnel {:?}: remote subnet {net} is part of {} via {} on this host; \
                             the tunnel's more specific route takes it over",
                            t.name, h.net, h.iface
                        ),
                        "make sure nothing in that network is expected on the local side",
                    );
                }
            }
        }
    }
    for (i, text, addr) in resolved {
        let t = &raw.tunnels[*i];
        if let Some(a) = addr {
            if let Some(net) = t.remote.iter().find(|n| n.contains(&a.ip())) {
                bad += 1;
                r.fail(
                    "routes",
                    format!(
                        "tunnel {:?}: endpoint {text} is inside its own remote subnet {net}: \
                         its packets would be routed into the tunnel",
                        t.name
                    ),
                    "use the peer's public (underlay) address as endpoint",
                );
            }
        }
    }
    if bad == 0 {
        r.ok(
            "routes",
            format!(
                "no remote subnet overlaps the host's {} route(s) (main table)",
                host.len()
            ),
        );
    }
}

async fn check_mtu(
    r: &mut Report,
    raw: &Raw,
    cfg: Option<&Config>,
    routes: &[HostRoute],
    resolved: &[(usize, String, Option<SocketAddr>)],
) {
    let mtu = cfg.map_or(raw.mtu, |c| c.site.mtu);
    let netlink = crate::dataplane::netlink::Netlink::connect().ok();
    let mut checked = 0;
    for (i, text, addr) in resolved {
        let Some(a) = addr else { continue };
        let t = &raw.tunnels[*i];
        let ip = a.ip();
        let Some(route) = route_for(routes, ip) else {
            r.fail(
                "mtu",
                format!("tunnel {:?}: no route to endpoint {text}", t.name),
                "add a route (or a default gateway) towards the peer",
            );
            continue;
        };
        let link_mtu = match &netlink {
            Some(n) => n
                .find_link(&route.iface)
                .await
                .ok()
                .flatten()
                .and_then(|l| l.mtu),
            None => None,
        }
        .or_else(|| {
            std::fs::read_to_string(format!("/sys/class/net/{}/mtu", route.iface))
                .ok()
                .and_then(|s| s.trim().parse().ok())
        });
        let Some(link_mtu) = link_mtu else {
            r.warn(
                "mtu",
                format!("tunnel {:?}: MTU of {} unknown", t.name, route.iface),
                "check `ip link show` by hand",
            );
            continue;
        };
        checked += 1;
        // IP + UDP + WireGuard data header + tag; ESP-in-UDP with padding is close to IPv6's.
        let overhead: u32 = if t.ipsec || ip.is_ipv6() { 80 } else { 60 };
        let need = u32::from(mtu) + overhead;
        if need > link_mtu {
            r.fail(
                "mtu",
                format!(
                    "tunnel {:?}: site mtu {mtu} + {overhead} bytes overhead = {need} > MTU {link_mtu} \
                     of {} (the route to {text}): large packets would be fragmented or dropped",
                    t.name, route.iface
                ),
                format!("set mtu = {} in [site]", link_mtu.saturating_sub(overhead)),
            );
        } else if !t.ipsec && ip.is_ipv4() && u32::from(mtu) + 80 > link_mtu {
            r.warn(
                "mtu",
                format!(
                    "tunnel {:?}: mtu {mtu} fits {} ({link_mtu}) over IPv4, but not if the peer \
                     moves to IPv6 (80 bytes overhead)",
                    t.name, route.iface
                ),
                format!(
                    "set mtu = {} in [site] to be safe on both",
                    link_mtu.saturating_sub(80)
                ),
            );
        } else {
            r.ok(
                "mtu",
                format!(
                    "tunnel {:?}: mtu {mtu} + {overhead} <= {link_mtu} on {} (towards {text})",
                    t.name, route.iface
                ),
            );
        }
    }
    if checked == 0 && !raw.tunnels.is_empty() {
        r.ok(
            "mtu",
            "no endpoint with a known address to check the path MTU against",
        );
    }
}

/// The kernel's view (adjtimex): Some(true) if NTP-synchronised.
fn kernel_ntp_synced() -> Option<bool> {
    // SAFETY: adjtimex with modes = 0 only reads the kernel's clock state into our struct.
    unsafe {
        let mut tx: libc::timex = std::mem::zeroed();
        let state = libc::adjtimex(&mut tx);
        if state < 0 {
            return None;
        }
        Some(state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0)
    }
}

/// Clocks before this are certainly wrong (2025-01-01T00:00:00Z).
const CLOCK_FLOOR: u64 = 1_735_689_600;

fn check_clock(r: &mut Report, files: &[PathBuf], now: SystemTime) {
    let now_s = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let what = format!(
        "compared the system clock with {} file modification time(s) and a 2025-01-01 floor; \
         no time server was asked",
        files.len()
    );
    if now_s < CLOCK_FLOOR {
        r.fail(
            "clock",
            format!("the system clock says {now_s} (Unix time), before 2025: it is far off"),
            "set the time (timedatectl set-ntp true, or chrony/ntpd); WireGuard peers reject \
             handshakes whose timestamps go backwards",
        );
        return;
    }
    let mut worst: Option<(u64, &Path)> = None;
    for f in files {
        if let Ok(m) = std::fs::metadata(f).and_then(|m| m.modified()) {
            if let Ok(ahead) = m.duration_since(now) {
                if worst.is_none_or(|(w, _)| ahead.as_secs() > w) {
                    worst = Some((ahead.as_secs(), f));
                }
            }
        }
    }
    match worst {
        Some((ahead, f)) if ahead > 86_400 => {
            r.fail(
                "clock",
                format!(
                    "{} was modified {} in the future: the system clock is behind by at least that ({what})",
                    f.display(),
                    humantime::format_duration(Duration::from_secs(ahead))
                ),
                "set the time (timedatectl set-ntp true, or chrony/ntpd); WireGuard peers reject \
                 handshakes whose timestamps go backwards",
            );
            return;
        }
        Some((ahead, f)) if ahead > 300 => {
            r.warn(
                "clock",
                format!(
                    "{} was modified {} in the future ({what})",
                    f.display(),
                    humantime::format_duration(Duration::from_secs(ahead))
                ),
                "check the time source (timedatectl, chronyc tracking)",
            );
            return;
        }
        _ => {}
    }
    match kernel_ntp_synced() {
        Some(true) => r.ok(
            "clock",
            format!("nothing in the future; the kernel reports NTP synchronisation ({what})"),
        ),
        _ => r.warn(
            "clock",
            format!(
                "nothing in the future, but the kernel reports the clock as not NTP-synchronised, \
                 so how far off it is cannot be told ({what})"
            ),
            "run an NTP client (systemd-timesyncd, chrony) so the clock stays right",
        ),
    }
}

/// `sitewire doctor`: prints the findings; true if none failed.
pub async fn main(path: &Path) -> bool {
    let findings = run(path).await;
    for f in &findings {
        println!("{f}");
    }
    let count = |l| findings.iter().filter(|f| f.level == l).count();
    let (fails, warns) = (count(Level::Fail), count(Level::Warn));
    println!(
        "{} check(s): {} ok, {warns} warning(s), {fails} failure(s)",
        findings.len(),
        count(Level::Ok)
    );
    fails == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_in_every_written_form() {
        assert_eq!(
            parse_endpoint("198.51.100.7:51820", 1),
            Some(Ep::Addr("198.51.100.7:51820".parse().unwrap()))
        );
        assert_eq!(
            parse_endpoint("[2001:db8::1]:51820", 1),
            Some(Ep::Addr("[2001:db8::1]:51820".parse().unwrap()))
        );
        assert_eq!(
            parse_endpoint("203.0.113.9", 500),
            Some(Ep::Addr("203.0.113.9:500".parse().unwrap()))
        );
        assert_eq!(
            parse_endpoint("gw.example.net:4500", 500),
            Some(Ep::Host("gw.example.net".into(), 4500))
        );
        assert_eq!(
            parse_endpoint("gw.example.net", 500),
            Some(Ep::Host("gw.example.net".into(), 500))
        );
    }

    #[test]
    fn longest_prefix_wins_and_overlap_is_symmetric() {
        let routes = vec![
            HostRoute {
                net: "0.0.0.0/0".parse().unwrap(),
                iface: "eth0".into(),
            },
            HostRoute {
                net: "10.0.0.0/8".parse().unwrap(),
                iface: "eth1".into(),
            },
        ];
        assert_eq!(
            route_for(&routes, "10.1.2.3".parse().unwrap())
                .unwrap()
                .iface,
            "eth1"
        );
        assert_eq!(
            route_for(&routes, "8.8.8.8".parse().unwrap())
                .unwrap()
                .iface,
            "eth0"
        );
        let a: IpNet = "10.1.0.0/16".parse().unwrap();
        let b: IpNet = "10.1.2.0/24".parse().unwrap();
        let c: IpNet = "10.2.0.0/16".parse().unwrap();
        assert!(overlaps(&a, &b) && overlaps(&b, &a) && !overlaps(&a, &c));
    }

    #[test]
    fn clock_far_behind_the_files_fails() {
        let dir = std::env::temp_dir().join(format!("sw-doctor-clock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("k");
        std::fs::write(&f, "x").unwrap();
        let mut r = Report::default();
        // A clock two days behind the file's mtime.
        check_clock(
            &mut r,
            std::slice::from_ref(&f),
            SystemTime::now() - Duration::from_secs(2 * 86_400),
        );
        assert_eq!(r.0[0].level, Level::Fail, "{:?}", r.0);
        assert!(r.0[0].message.contains("no time server was asked"));
        let mut r = Report::default();
        check_clock(&mut r, &[f], UNIX_EPOCH + Duration::from_secs(1_000_000));
        assert_eq!(r.0[0].level, Level::Fail);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn proc_route_hex_is_little_endian() {
        // 0102A8C0 is 192.168.2.1; 00FFFFFF is 255.255.255.0.
        assert_eq!(
            hex_u32_le("0102A8C0"),
            Some(u32::from(std::net::Ipv4Addr::new(192, 168, 2, 1)))
        );
        assert_eq!(hex_u32_le("00FFFFFF").unwrap().count_ones(), 24);
    }
}
