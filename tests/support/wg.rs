//! WireGuard peers not written here: Debian `wireguard-go` configured with `wg`.

use super::{host_exec_ok, wait_until, write_file_0600, Proc, Topo, UAPI_DIR};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

/// A fresh key pair `(private, public)`, base64 as `wg genkey` / `wg pubkey` print them.
pub fn wg_genkey() -> (String, String) {
    let private = host_exec_ok(&["wg", "genkey"], None).trim().to_string();
    let public = host_exec_ok(&["wg", "pubkey"], Some(&format!("{private}\n")))
        .trim()
        .to_string();
    (private, public)
}

/// One peer line of `wg show IFACE dump`.
#[derive(Clone, Debug)]
pub struct WgPeer {
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Unix seconds of the latest handshake, 0 = never.
    pub latest_handshake: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Parses the peer lines of `wg show IFACE dump` (the first line is the interface itself).
pub fn parse_wg_dump(dump: &str) -> Vec<WgPeer> {
    dump.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            if f.len() < 8 {
                return None;
            }
            let none_if = |s: &str| (s != "(none)").then(|| s.to_string());
            Some(WgPeer {
                public_key: f[0].to_string(),
                endpoint: none_if(f[2]),
                allowed_ips: f[3]
                    .split(',')
                    .filter(|s| !s.is_empty() && *s != "(none)")
                    .map(str::to_string)
                    .collect(),
                latest_handshake: f[4].parse().unwrap_or(0),
                rx_bytes: f[5].parse().unwrap_or(0),
                tx_bytes: f[6].parse().unwrap_or(0),
            })
        })
        .collect()
}

/// "a.b.c.d/len" -> (address, prefix length); None for anything else (IPv6, host names).
fn parse_cidr4(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, l) = s.split_once('/').unwrap_or((s, "32"));
    let len: u8 = l.parse().ok().filter(|l| *l <= 32)?;
    Some((a.parse().ok()?, len))
}

fn mask(a: Ipv4Addr, len: u8) -> u32 {
    let m = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(a) & m
}

/// Is `net` inside the connected network of interface address `addr` (so the kernel already
/// has a route for it)?
pub fn within_connected(net: &str, addr: &str) -> bool {
    match (parse_cidr4(net), parse_cidr4(addr)) {
        (Some((n, nl)), Some((a, al))) => nl >= al && mask(n, al) == mask(a, al),
        _ => false,
    }
}

impl Topo {
    /// Starts `wireguard-go -f IFNAME` in `ns` (foreground, registered for cleanup), waits for
    /// its UAPI socket, then configures it with `wg set` (private key from a 0600 file), adds
    /// `addr_cidr` if given, sets the link up with MTU 1420, and routes every allowed IP via the
    /// interface (except those inside `addr_cidr`'s own network). `ifname` should come from
    /// [`Topo::ifname`] so UAPI sockets of parallel tests do not collide.
    #[allow(clippy::too_many_arguments)]
    pub fn start_wireguard_go(
        &self,
        ns: &str,
        ifname: &str,
        listen_port: u16,
        private_key_b64: &str,
        peer_pub_b64: &str,
        peer_endpoint: Option<SocketAddr>,
        allowed_ips: &[&str],
        addr_cidr: Option<&str>,
    ) -> Proc {
        assert!(
            ifname.len() <= super::IFNAMSIZ_MAX,
            "ifname {ifname:?} too long"
        );
        let sock = Path::new(UAPI_DIR).join(format!("{ifname}.sock"));
        assert!(
            !sock.exists(),
            "{} exists already (name collision?)",
            sock.display()
        );
        let proc = self.spawn_env(
            ns,
            &format!("wireguard-go-{ifname}"),
            &[
                ("WG_PROCESS_FOREGROUND", "1"),
                // Only matters on kernels with built-in WireGuard, where wireguard-go refuses to
                // run without it.
                ("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1"),
                ("LOG_LEVEL", "debug"),
            ],
            &["wireguard-go", "-f", ifname],
        );
        let up = wait_until(Duration::from_secs(15), Duration::from_millis(50), || {
            if !proc.alive() {
                panic!(
                    "wireguard-go for {ifname} exited during startup:\n{}",
                    proc.log()
                );
            }
            sock.exists()
                && self
                    .exec(ns, &["ip", "link", "show", "dev", ifname])
                    .status
                    .success()
        });
        assert!(
            up,
            "wireguard-go {ifname}: no {} after 15 s:\n{}",
            sock.display(),
            proc.log()
        );

        let key_file = self.tempdir().join(format!("{ifname}.key"));
        write_file_0600(&key_file, format!("{private_key_b64}\n"));
        let (port_s, key_s) = (
            listen_port.to_string(),
            key_file.to_string_lossy().into_owned(),
        );
        let allowed = allowed_ips.join(",");
        let endpoint = peer_endpoint.map(|e| e.to_string());
        let mut cmd = vec![
            "wg",
            "set",
            ifname,
            "listen-port",
            &port_s,
            "private-key",
            &key_s,
            "peer",
            peer_pub_b64,
            "allowed-ips",
            &allowed,
        ];
        if let Some(e) = &endpoint {
            cmd.extend(["endpoint", e.as_str()]);
        }
        self.exec_ok(ns, &cmd);
        if let Some(addr) = addr_cidr {
            self.exec_ok(ns, &["ip", "addr", "add", addr, "dev", ifname]);
        }
        self.exec_ok(
            ns,
            &["ip", "link", "set", "dev", ifname, "mtu", "1420", "up"],
        );
        for net in allowed_ips {
            if addr_cidr.is_some_and(|a| within_connected(net, a)) {
                continue;
            }
            self.exec_ok(ns, &["ip", "route", "replace", net, "dev", ifname]);
        }
        proc
    }

    /// `wg show IFACE dump` in `ns`, parsed.
    pub fn wg_dump(&self, ns: &str, ifname: &str) -> Vec<WgPeer> {
        parse_wg_dump(&self.exec_ok(ns, &["wg", "show", ifname, "dump"]))
    }

    /// Latest handshake (Unix seconds, 0 = never) of peer `peer_pub` on `ifname` in `ns`.
    pub fn wg_latest_handshake(&self, ns: &str, ifname: &str, peer_pub: &str) -> u64 {
        self.wg_dump(ns, ifname)
            .into_iter()
            .find(|p| p.public_key == peer_pub)
            .map(|p| p.latest_handshake)
            .unwrap_or(0)
    }
}
