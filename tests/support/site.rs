//! sitewire sites inside a [`Topo`]: config writing, start/stop, status.

use super::{sitewire_bin, wait_until, write_file_0600, Proc, Site, Topo};
use std::time::Duration;

/// A generated site key pair, written to `<tempdir>/<name>.key` (0600).
pub struct SiteKey {
    pub path: String,
    pub public: String,
    pub private: String,
}

impl Topo {
    /// `sitewire keygen` + `sitewire pubkey`, key file in the topology's temp dir.
    pub fn sitewire_key(&self, name: &str) -> SiteKey {
        let out = std::process::Command::new(sitewire_bin())
            .arg("keygen")
            .output()
            .expect("sitewire keygen");
        assert!(out.status.success());
        let private = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let public =
            super::host_exec_ok(&[sitewire_bin(), "pubkey"], Some(&format!("{private}\n")))
                .trim()
                .to_string();
        let path = self.tempdir().join(format!("{name}.key"));
        write_file_0600(&path, format!("{private}\n"));
        SiteKey {
            path: path.to_string_lossy().into_owned(),
            public,
            private,
        }
    }

    /// Writes `<tempdir>/<name>.toml` and runs `sitewire up -c` in the site's namespace;
    /// waits for its control socket.
    pub fn start_sitewire(&self, site: Site, name: &str, config: &str) -> Proc {
        self.start_sitewire_env(site, name, config, &[])
    }

    /// [`Topo::start_sitewire`] with extra environment variables (e.g. `NOTIFY_SOCKET`).
    pub fn start_sitewire_env(
        &self,
        site: Site,
        name: &str,
        config: &str,
        env: &[(&str, &str)],
    ) -> Proc {
        let path = self.tempdir().join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let path_s = path.to_string_lossy().into_owned();
        let proc = self.spawn_env(
            self.ns(site),
            &format!("sitewire-{name}"),
            env,
            &[sitewire_bin(), "up", "-c", &path_s, "--log-level", "debug"],
        );
        let iface = config
            .lines()
            .find_map(|l| l.trim().strip_prefix("interface = "))
            .map(|s| s.trim_matches('"').to_string())
            .expect("config has an interface line");
        let sock = format!("/run/sitewire/{iface}.sock");
        let ok = wait_until(Duration::from_secs(15), Duration::from_millis(50), || {
            assert!(proc.alive(), "sitewire {name} exited:\n{}", proc.log());
            std::path::Path::new(&sock).exists()
        });
        assert!(ok, "sitewire {name}: no {sock} after 15 s:\n{}", proc.log());
        proc
    }
}

/// `sitewire status --json --interface IF`, parsed.
pub fn status(iface: &str) -> serde_json::Value {
    let out = std::process::Command::new(sitewire_bin())
        .args(["status", "--json", "--interface", iface])
        .output()
        .expect("sitewire status");
    assert!(
        out.status.success(),
        "sitewire status -i {iface}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// The status of one tunnel of a site.
pub fn tunnel_status(iface: &str, tunnel: &str) -> serde_json::Value {
    let st = status(iface);
    st["tunnels"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["name"] == tunnel).cloned())
        .unwrap_or_else(|| panic!("no tunnel {tunnel} in status of {iface}: {st}"))
}

/// Waits until the tunnel reports state "up".
pub fn wait_tunnel_up(iface: &str, tunnel: &str, timeout: Duration) -> bool {
    wait_until(timeout, Duration::from_millis(100), || {
        tunnel_status(iface, tunnel)["state"] == "up"
    })
}

/// A minimal one-tunnel site config.
pub struct SiteConfig<'a> {
    pub name: &'a str,
    pub iface: &'a str,
    pub port: u16,
    pub key_path: &'a str,
    pub tunnel: &'a str,
    pub peer_public: &'a str,
    pub endpoints: &'a [String],
    pub local: &'a str,
    pub remote: &'a str,
    pub extra: &'a str,
}

impl SiteConfig<'_> {
    pub fn render(&self) -> String {
        let eps = self
            .endpoints
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "[site]\nname = \"{}\"\ninterface = \"{}\"\nlisten_port = {}\nprivate_key = \"{}\"\n\n\
             [[tunnel]]\nname = \"{}\"\npeer_public_key = \"{}\"\nendpoint = [{eps}]\n\
             local_subnets = [\"{}\"]\nremote_subnets = [\"{}\"]\n{}\n",
            self.name,
            self.iface,
            self.port,
            self.key_path,
            self.tunnel,
            self.peer_public,
            self.local,
            self.remote,
            self.extra
        )
    }
}

/// Sites a and b joined by one WireGuard tunnel (`to-b` at a, `to-a` at b) on one port.
/// Each names the other's underlay address as its endpoint unless told otherwise.
pub struct SitePair<'a> {
    pub if_a: &'a str,
    pub if_b: &'a str,
    pub key_a: &'a SiteKey,
    pub key_b: &'a SiteKey,
    pub port: u16,
    /// Site a's endpoints instead of b's underlay address.
    pub endpoints_a: Option<Vec<String>>,
    /// Site b's endpoints instead of a's underlay address (empty: b waits to be reached).
    pub endpoints_b: Option<Vec<String>>,
    /// Site b's local subnet instead of `subnet_b` (a traffic-selector mismatch).
    pub local_b: Option<&'a str>,
    pub extra_a: &'a str,
    pub extra_b: &'a str,
}

impl<'a> SitePair<'a> {
    /// Both sites with default endpoints and subnets and no extra keys.
    pub fn new(
        if_a: &'a str,
        if_b: &'a str,
        key_a: &'a SiteKey,
        key_b: &'a SiteKey,
        port: u16,
    ) -> Self {
        Self {
            if_a,
            if_b,
            key_a,
            key_b,
            port,
            endpoints_a: None,
            endpoints_b: None,
            local_b: None,
            extra_a: "",
            extra_b: "",
        }
    }

    /// The rendered configs of site a and site b.
    pub fn render(&self, t: &Topo) -> (String, String) {
        let to = |addr| vec![format!("{addr}:{}", self.port)];
        let ep_a = self.endpoints_a.clone().unwrap_or_else(|| to(t.underlay_b));
        let ep_b = self.endpoints_b.clone().unwrap_or_else(|| to(t.underlay_a));
        let a = SiteConfig {
            name: "a",
            iface: self.if_a,
            port: self.port,
            key_path: &self.key_a.path,
            tunnel: "to-b",
            peer_public: &self.key_b.public,
            endpoints: &ep_a,
            local: &t.subnet_a,
            remote: &t.subnet_b,
            extra: self.extra_a,
        };
        let b = SiteConfig {
            name: "b",
            iface: self.if_b,
            port: self.port,
            key_path: &self.key_b.path,
            tunnel: "to-a",
            peer_public: &self.key_a.public,
            endpoints: &ep_b,
            local: self.local_b.unwrap_or(&t.subnet_b),
            remote: &t.subnet_a,
            extra: self.extra_b,
        };
        (a.render(), b.render())
    }
}

/// A site with one IPsec tunnel named `hq` (`extra` adds keys to the tunnel).
pub struct IpsecSite<'a> {
    pub name: &'a str,
    pub iface: &'a str,
    pub port: u16,
    pub key: &'a str,
    pub psk: &'a str,
    pub endpoint: Option<String>,
    pub local: &'a str,
    pub remote: &'a str,
    pub local_id: &'a str,
    pub remote_id: &'a str,
    pub extra: &'a str,
}

impl IpsecSite<'_> {
    pub fn render(&self) -> String {
        let endpoint = self
            .endpoint
            .as_ref()
            .map(|e| format!("endpoint = [\"{e}\"]\n"))
            .unwrap_or_default();
        format!(
            "[site]\nname = \"{}\"\ninterface = \"{}\"\nlisten_port = {}\nprivate_key = \"{}\"\n\n\
             [[tunnel]]\nname = \"hq\"\nprotocol = \"ipsec\"\n{endpoint}\
             local_subnets = [\"{}\"]\nremote_subnets = [\"{}\"]\npsk = \"{}\"\n\
             local_id = \"{}\"\nremote_id = \"{}\"\n{}\n",
            self.name,
            self.iface,
            self.port,
            self.key,
            self.local,
            self.remote,
            self.psk,
            self.local_id,
            self.remote_id,
            self.extra
        )
    }
}
