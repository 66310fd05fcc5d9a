use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::*;

const PEER_KEY: &str = "Wf7Z5Wc0b6B1XHq3G6wVQnDmZyqJ1cCkqk4kF4mOQ1E=";
const KEY_CONTENT: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n";

/// A temporary directory holding key files; removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sitewire-config-unit-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("keys")).unwrap();
        let d = Dir(dir);
        d.key("keys/lab.key", KEY_CONTENT, 0o600);
        d.key("keys/hq.psk", KEY_CONTENT, 0o600);
        d
    }

    fn key(&self, name: &str, content: &str, mode: u32) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn parse(&self, text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(text, &self.0)
    }

    fn errors(&self, text: &str) -> Vec<ConfigError> {
        match self.parse(text) {
            Ok(c) => panic!("expected errors, got {c:#?}"),
            Err(e) => e.0,
        }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn site() -> String {
    "[site]\nname = \"lab\"\ninterface = \"sw0\"\nlisten_port = 51820\nprivate_key = \"keys/lab.key\"\n"
        .to_string()
}

fn wg_tunnel(name: &str, remote: &str) -> String {
    format!(
        "\n[[tunnel]]\nname = \"{name}\"\npeer_public_key = \"{PEER_KEY}\"\nremote_subnets = [\"{remote}\"]\n"
    )
}

/// Asserts exactly one error, at `path` and `line`, whose message contains `needle`.
fn one_error(errors: &[ConfigError], path: &str, line: usize, needle: &str) {
    assert_eq!(errors.len(), 1, "{errors:#?}");
    has_error(errors, path, line, needle);
}

fn has_error(errors: &[ConfigError], path: &str, line: usize, needle: &str) {
    assert!(
        errors
            .iter()
            .any(|e| e.path == path && e.line == Some(line) && e.message.contains(needle)),
        "no error at {path} line {line} containing {needle:?} in {errors:#?}"
    );
}

const FULL: &str = r#"
[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"
address = ["10.77.0.1/24", "fd77::1/64"]
mtu = 1420

[metrics]
listen = "127.0.0.1:9586"

[[tunnel]]
name = "branch"
protocol = "wireguard"
keying = "static"
peer_public_key = "Wf7Z5Wc0b6B1XHq3G6wVQnDmZyqJ1cCkqk4kF4mOQ1E="
endpoint = ["198.51.100.7:51820", "vpn.example.net:51820", "[2001:db8::7]:51820"]
local_subnets = ["10.10.0.0/24"]
remote_subnets = ["192.168.50.7/24"]
persistent_keepalive = "25s"
rekey_interval = "2m"
dpd = { interval = "10s", timeout = "30s", action = "restart" }

[[tunnel]]
name = "hq-firewall"
protocol = "ipsec"
endpoint = ["203.0.113.9"]
local_subnets = ["10.10.0.0/24"]
remote_subnets = ["172.16.0.0/16"]
psk = "keys/hq.psk"
local_id = "lab.example.net"
remote_id = "hq.example.net"
ike_proposals = ["aes256gcm16-prfsha256-x25519"]
esp_proposals = ["aes256gcm16"]
start_action = "trap"
"#;

#[test]
fn full_example_parses() {
    let d = Dir::new();
    let c = d.parse(FULL).unwrap();
    assert_eq!(c.path, d.0.join("<inline>"));
    assert_eq!(c.site.name, "lab");
    assert_eq!(c.site.private_key, KeyRef::File(d.0.join("keys/lab.key")));
    assert_eq!(
        c.site.address,
        vec![
            "10.77.0.1/24".parse::<IpNet>().unwrap(),
            "fd77::1/64".parse().unwrap()
        ]
    );
    assert_eq!(
        c.metrics.as_ref().unwrap().listen,
        "127.0.0.1:9586".parse().unwrap()
    );

    let b = c.tunnel("branch").unwrap();
    assert_eq!(b.line, 13);
    assert_eq!(b.protocol, Protocol::WireGuard);
    assert_eq!(b.keying, Keying::Static);
    assert!(matches!(b.peer_public_key, Some(PeerKey::Inline(_))));
    assert_eq!(
        b.endpoint,
        vec![
            Endpoint::Addr("198.51.100.7:51820".parse().unwrap()),
            Endpoint::Host {
                host: "vpn.example.net".into(),
                port: 51820
            },
            Endpoint::Addr("[2001:db8::7]:51820".parse().unwrap()),
        ]
    );
    assert_eq!(b.remote_subnets, vec!["192.168.50.0/24".parse().unwrap()]);
    assert_eq!(b.persistent_keepalive, Some(Duration::from_secs(25)));
    assert!(b.ike_proposals.is_empty());

    let hq = c.tunnel("hq-firewall").unwrap();
    assert_eq!(hq.protocol, Protocol::Ipsec);
    assert_eq!(hq.keying, Keying::Ike);
    assert_eq!(hq.peer_public_key, None);
    assert_eq!(
        hq.endpoint,
        vec![Endpoint::Addr("203.0.113.9:500".parse().unwrap())]
    );
    assert_eq!(hq.psk, Some(KeyRef::File(d.0.join("keys/hq.psk"))));
    assert_eq!(hq.local_id.as_deref(), Some("lab.example.net"));
    assert_eq!(hq.start_action, StartAction::Trap);
    assert!(c.tunnel("nope").is_none());
}

#[test]
fn minimal_config_gets_defaults() {
    let d = Dir::new();
    let c = d.parse(&(site() + &wg_tunnel("a", "10.1.0.0/16"))).unwrap();
    assert_eq!(c.site.mtu, 1420);
    assert!(c.site.address.is_empty());
    assert!(c.metrics.is_none());
    let t = &c.tunnels[0];
    assert_eq!(t.keying, Keying::Static);
    assert!(t.endpoint.is_empty());
    assert!(t.local_subnets.is_empty());
    assert_eq!(t.rekey_interval, Duration::from_secs(120));
    assert_eq!(t.dpd, Dpd::default());
    assert_eq!(t.dpd.action, DpdAction::Restart);
    assert_eq!(t.psk, None);
    assert_eq!(t.start_action, StartAction::Start);
    assert_eq!(t.line, 7);

    let ipsec = "\n[[tunnel]]\nname = \"hq\"\nprotocol = \"ipsec\"\npsk = \"vault:sitewire/hq\"\n\
                 local_subnets = [\"10.10.0.0/24\"]\nremote_subnets = [\"172.16.0.0/16\"]\n\
                 local_id = \"lab.example.net\"\nremote_id = \"10.0.0.9\"\n";
    let c = d.parse(&(site() + ipsec)).unwrap();
    let t = &c.tunnels[0];
    assert_eq!(t.psk, Some(KeyRef::Vault("sitewire/hq".into())));
    assert_eq!(t.ike_proposals, vec!["aes256gcm16-prfsha256-x25519"]);
    assert_eq!(t.esp_proposals, vec!["aes256gcm16"]);
    assert_eq!(t.ike_rekey_interval, Some(Duration::from_secs(4 * 3600)));
    let c = d
        .parse(&(site() + ipsec + "ike_rekey_interval = \"30m\"\n"))
        .unwrap();
    assert_eq!(
        c.tunnels[0].ike_rekey_interval,
        Some(Duration::from_secs(1800))
    );
}

#[test]
fn no_tunnels_is_allowed() {
    let d = Dir::new();
    assert!(d.parse(&site()).unwrap().tunnels.is_empty());
}

#[test]
fn single_strings_for_endpoint_and_address() {
    let d = Dir::new();
    let text = site().replace("[site]\n", "[site]\naddress = \"10.77.0.1/24\"\n")
        + &wg_tunnel("a", "10.1.0.0/16")
        + "endpoint = \"gw.example:51820\"\n";
    let c = d.parse(&text).unwrap();
    assert_eq!(c.site.address.len(), 1);
    assert_eq!(c.tunnels[0].endpoint.len(), 1);
}

#[test]
fn unknown_keys_with_suggestions() {
    let d = Dir::new();
    let text = site().replace("listen_port", "listen_prot")
        + &wg_tunnel("a", "10.1.0.0/16")
        + "dpd = { intervall = \"5s\", zzz = 1 }\n\n[metric]\nlisten = \"127.0.0.1:1\"\n";
    let errors = d.errors(&text);
    has_error(
        &errors,
        "site.listen_prot",
        4,
        "did you mean `listen_port`?",
    );
    has_error(&errors, "site.listen_port", 1, "missing required key");
    has_error(
        &errors,
        "tunnel[0].dpd.intervall",
        11,
        "did you mean `interval`?",
    );
    has_error(
        &errors,
        "tunnel[0].dpd.zzz",
        11,
        "expected one of `interval`",
    );
    has_error(&errors, "metric", 13, "did you mean `metrics`?");
    assert_eq!(errors.len(), 5, "{errors:#?}");
}

#[test]
fn wrong_types() {
    let d = Dir::new();
    let text = "[site]\nname = 5\ninterface = \"sw0\"\nlisten_port = \"51820\"\nprivate_key = \"keys/lab.key\"\n\
                mtu = 1.5\naddress = [1]\n"
        .to_string()
        + &wg_tunnel("a", "10.1.0.0/16")
        + "endpoint = 7\ndpd = \"10s\"\npost_quantum = \"yes\"\n";
    let errors = d.errors(&text);
    has_error(
        &errors,
        "site.name",
        2,
        "expected a string, found an integer",
    );
    has_error(
        &errors,
        "site.listen_port",
        4,
        "expected an integer, found a string",
    );
    has_error(&errors, "site.mtu", 6, "expected an integer, found a float");
    has_error(
        &errors,
        "site.address[0]",
        7,
        "expected a string, found an integer",
    );
    has_error(
        &errors,
        "tunnel[0].endpoint",
        13,
        "expected a string or an array of strings",
    );
    has_error(
        &errors,
        "tunnel[0].dpd",
        14,
        "expected a table, found a string",
    );
    has_error(
        &errors,
        "tunnel[0].post_quantum",
        15,
        "expected true or false, found a string",
    );
    assert_eq!(errors.len(), 7, "{errors:#?}");

    let errors = d.errors(&("tunnel = 3\n".to_string() + &site()));
    one_error(&errors, "tunnel", 1, "array of tables");
    let errors = d.errors(&(site() + "[tunnel]\nname = \"a\"\n"));
    one_error(&errors, "tunnel", 6, "write each one as [[tunnel]]");
}

#[test]
fn missing_keys() {
    let d = Dir::new();
    let errors = d.errors("");
    one_error_no_line(&errors, "site", "missing required section [site]");

    let errors = d.errors("\n[site]\n\n[[tunnel]]\nprotocol = \"ipsec\"\n");
    for key in ["name", "interface", "listen_port", "private_key"] {
        has_error(&errors, &format!("site.{key}"), 2, "missing required key");
    }
    for key in [
        "name",
        "remote_subnets",
        "local_subnets",
        "psk",
        "local_id",
        "remote_id",
    ] {
        has_error(
            &errors,
            &format!("tunnel[0].{key}"),
            4,
            "missing required key",
        );
    }
    assert_eq!(errors.len(), 10, "{errors:#?}");

    let errors =
        d.errors(&(site() + "\n[[tunnel]]\nname = \"a\"\nremote_subnets = [\"10.1.0.0/16\"]\n"));
    one_error(
        &errors,
        "tunnel[0].peer_public_key",
        7,
        "missing required key `peer_public_key` for protocol = \"wireguard\"",
    );

    let errors = d.errors(&(site() + "[metrics]\n"));
    one_error(&errors, "metrics.listen", 6, "missing required key");
}

fn one_error_no_line(errors: &[ConfigError], path: &str, needle: &str) {
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].path, path);
    assert_eq!(errors[0].line, None);
    assert!(errors[0].message.contains(needle), "{errors:#?}");
}

#[test]
fn site_values() {
    let d = Dir::new();
    let text = "[site]\nname = \"a b\"\ninterface = \"this-is-too-long0\"\nlisten_port = 0\n\
                private_key = \"keys/lab.key\"\nmtu = 100\n";
    let errors = d.errors(text);
    has_error(&errors, "site.name", 2, "invalid name \"a b\"");
    has_error(&errors, "site.interface", 3, "longer than 15");
    has_error(&errors, "site.listen_port", 4, "expected 1 to 65535");
    has_error(&errors, "site.mtu", 6, "expected 576 to 9000");
    assert_eq!(errors.len(), 4);

    for port in ["51_820", "0xCA6C", "+51820"] {
        let text = site().replace("51820", port);
        assert_eq!(d.parse(&text).unwrap().site.listen_port, 51820, "{port}");
    }
    let text = site().replace("51820", "-1");
    one_error(
        &d.errors(&text),
        "site.listen_port",
        4,
        "invalid listen_port -1",
    );

    let text = site() + "address = [\"fd00::1/64\"]\nmtu = 1200\n";
    one_error(&d.errors(&text), "site.mtu", 7, "IPv6 needs at least 1280");
    let text = site() + "address = [\"10.0.0.1/24\"]\nmtu = 1200\n";
    assert_eq!(d.parse(&text).unwrap().site.mtu, 1200);
    let text = site() + "listen_port = 70000\n";
    assert!(d.errors(&text)[0].message.contains("duplicate key"));
    let text = site().replace("51820", "70000");
    one_error(
        &d.errors(&text),
        "site.listen_port",
        4,
        "invalid listen_port 70000",
    );
    let text = site() + "address = [\"10.0.0.1/24\", \"10.0.0.1/16\", \"10.0.0.300/24\"]\n";
    let errors = d.errors(&text);
    has_error(
        &errors,
        "site.address[1]",
        6,
        "duplicate entry \"10.0.0.1/16\": same as site.address[0]",
    );
    has_error(
        &errors,
        "site.address[2]",
        6,
        "invalid CIDR \"10.0.0.300/24\"",
    );
}

#[test]
fn key_files() {
    let d = Dir::new();
    let vault = site().replace("keys/lab.key", "vault:sitewire/lab");
    assert_eq!(
        d.parse(&vault).unwrap().site.private_key,
        KeyRef::Vault("sitewire/lab".into())
    );
    let errors = d.errors(&site().replace("keys/lab.key", "vault:"));
    one_error(&errors, "site.private_key", 5, "empty Vault path");

    let errors = d.errors(&site().replace("keys/lab.key", "keys/missing.key"));
    one_error(&errors, "site.private_key", 5, "missing.key does not exist");

    d.key("keys/open.key", KEY_CONTENT, 0o644);
    let errors = d.errors(&site().replace("keys/lab.key", "keys/open.key"));
    one_error(
        &errors,
        "site.private_key",
        5,
        "readable by group/others (mode 0644)",
    );
    assert!(errors[0].message.contains("chmod 600"));
    assert!(!errors[0].to_string().contains(KEY_CONTENT.trim()));

    d.key("keys/bad.key", "not a key at all\n", 0o600);
    let errors = d.errors(&site().replace("keys/lab.key", "keys/bad.key"));
    one_error(&errors, "site.private_key", 5, "does not hold a key");
    assert!(!errors[0].message.contains("not a key at all"));

    d.key("keys/short.key", "AAAA\n", 0o400);
    let errors = d.errors(&site().replace("keys/lab.key", "keys/short.key"));
    one_error(&errors, "site.private_key", 5, "does not hold a key");

    let errors = d.errors(&site().replace("keys/lab.key", "keys"));
    one_error(&errors, "site.private_key", 5, "not a regular file");

    let errors = d.errors(&site().replace("keys/lab.key", KEY_CONTENT.trim()));
    one_error(&errors, "site.private_key", 5, "looks like a key itself");
    assert!(!errors[0].message.contains(KEY_CONTENT.trim()));

    // Absolute paths are used as they are.
    let abs = d.0.join("keys/lab.key");
    let c = d
        .parse(&site().replace("keys/lab.key", abs.to_str().unwrap()))
        .unwrap();
    assert_eq!(c.site.private_key, KeyRef::File(abs));
}

#[test]
fn peer_keys() {
    let d = Dir::new();
    let text = site() + &wg_tunnel("a", "10.1.0.0/16").replace(PEER_KEY, "vault:peers/a");
    assert_eq!(
        d.parse(&text).unwrap().tunnels[0].peer_public_key,
        Some(PeerKey::Vault("peers/a".into()))
    );
    let text = site() + &wg_tunnel("a", "10.1.0.0/16").replace(PEER_KEY, "AAAA");
    one_error(
        &d.errors(&text),
        "tunnel[0].peer_public_key",
        9,
        "invalid peer_public_key \"AAAA\"",
    );
}

#[test]
fn subnets() {
    let d = Dir::new();
    let text = site()
        + &wg_tunnel("a", "10.1.2.3/16")
        + "local_subnets = [\"10.10.0.0/24\", \"10.10.0.9/24\", \"10.20.0.1\"]\n";
    let errors = d.errors(&text);
    has_error(
        &errors,
        "tunnel[0].local_subnets[1]",
        11,
        "same as tunnel[0].local_subnets[0]",
    );
    has_error(
        &errors,
        "tunnel[0].local_subnets[2]",
        11,
        "\"10.20.0.1/32\"",
    );
    assert_eq!(errors.len(), 2);

    let text = site() + &wg_tunnel("a", "10.1.2.3/16").replace("[\"10.1.2.3/16\"]", "[]");
    one_error(
        &d.errors(&text),
        "tunnel[0].remote_subnets",
        10,
        "at least one subnet",
    );

    let text =
        site() + &wg_tunnel("a", "10.1.2.3/16").replace("[\"10.1.2.3/16\"]", "\"10.1.0.0/16\"");
    one_error(
        &d.errors(&text),
        "tunnel[0].remote_subnets",
        10,
        "expected an array of strings",
    );

    let c = d.parse(&(site() + &wg_tunnel("a", "10.1.2.3/16"))).unwrap();
    assert_eq!(
        c.tunnels[0].remote_subnets,
        vec!["10.1.0.0/16".parse().unwrap()]
    );
}

#[test]
fn tunnel_conflicts() {
    let d = Dir::new();
    let text = site().replace("[site]\n", "[site]\naddress = \"10.77.0.1/24\"\n")
        + &wg_tunnel("a", "10.1.0.0/16")
        + &wg_tunnel("a", "10.1.2.0/24")
        + "local_subnets = [\"10.10.0.0/24\"]\n"
        + &wg_tunnel("c", "10.10.0.128/25")
        + &wg_tunnel("d", "10.77.0.1/32")
        + &wg_tunnel("e", "10.77.0.5/32");
    let errors = d.errors(&text);
    has_error(
        &errors,
        "tunnel[1].name",
        14,
        "duplicate tunnel name \"a\" (first used at line 9)",
    );
    has_error(
        &errors,
        "tunnel[1].remote_subnets[0]",
        16,
        "remote subnet 10.1.2.0/24 of tunnel \"a\" overlaps remote subnet 10.1.0.0/16 of tunnel \"a\" (tunnel[0].remote_subnets[0], line 11)",
    );
    has_error(
        &errors,
        "tunnel[2].remote_subnets[0]",
        22,
        "overlaps local subnet 10.10.0.0/24 of tunnel \"a\" (tunnel[1].local_subnets[0], line 17)",
    );
    has_error(
        &errors,
        "tunnel[3].remote_subnets[0]",
        27,
        "is this site's own address 10.77.0.1/32 (site.address, line 2)",
    );
    assert_eq!(errors.len(), 4, "{errors:#?}");
}

#[test]
fn protocol_specific_keys() {
    let d = Dir::new();
    let text = site()
        + &wg_tunnel("a", "10.1.0.0/16")
        + "local_id = \"x\"\nstart_action = \"trap\"\nike_proposals = 5\n";
    let errors = d.errors(&text);
    has_error(
        &errors,
        "tunnel[0].local_id",
        11,
        "only valid for protocol = \"ipsec\"",
    );
    has_error(
        &errors,
        "tunnel[0].start_action",
        12,
        "only valid for protocol = \"ipsec\"",
    );
    has_error(
        &errors,
        "tunnel[0].ike_proposals",
        13,
        "only valid for protocol = \"ipsec\"",
    );
    assert_eq!(errors.len(), 3, "{errors:#?}");

    let text = site()
        + &wg_tunnel("a", "10.1.0.0/16")
        + "protocol = \"ipsec\"\nkeying = \"ike\"\npersistent_keepalive = \"5s\"\npsk = \"keys/hq.psk\"\n\
           local_subnets = [\"10.10.0.0/24\"]\nendpoint = \"gw.example\"\n\
           local_id = \"a.example\"\nremote_id = \"gw.example\"\n";
    let errors = d.errors(&text);
    has_error(
        &errors,
        "tunnel[0].peer_public_key",
        9,
        "only valid for protocol = \"wireguard\"",
    );
    has_error(
        &errors,
        "tunnel[0].keying",
        12,
        "only valid for protocol = \"wireguard\"",
    );
    has_error(&errors, "tunnel[0].persistent_keepalive", 13, "only valid");
    assert_eq!(errors.len(), 3, "{errors:#?}");

    let text =
        site() + &wg_tunnel("a", "10.1.0.0/16") + "protocol = \"IPsec\"\nkeying = \"dynamic\"\n";
    let errors = d.errors(&text);
    has_error(
        &errors,
        "tunnel[0].protocol",
        11,
        "expected \"wireguard\" or \"ipsec\"",
    );
    has_error(
        &errors,
        "tunnel[0].keying",
        12,
        "expected \"static\" or \"ike\"",
    );
    assert_eq!(errors.len(), 2, "{errors:#?}");

    let text = site() + &wg_tunnel("a", "10.1.0.0/16") + "keying = \"ike\"\n";
    assert_eq!(d.parse(&text).unwrap().tunnels[0].keying, Keying::Ike);
}

#[test]
fn endpoints_depend_on_protocol() {
    let d = Dir::new();
    let text = site()
        + &wg_tunnel("a", "10.1.0.0/16")
        + "endpoint = [\"1.2.3.4\", \"x\", \"1.2.3.4:1\", \"1.2.3.4:1\"]\n";
    let errors = d.errors(&text);
    has_error(
        &errors,
        "tunnel[0].endpoint[0]",
        11,
        "a port is required for WireGuard",
    );
    has_error(&errors, "tunnel[0].endpoint[1]", 11, "a port is required");
    has_error(&errors, "tunnel[0].endpoint[3]", 11, "duplicate entry");
    assert_eq!(errors.len(), 3, "{errors:#?}");
    let e = &errors[0];
    assert_eq!(e.to_string(), format!("line 11: {}: {}", e.path, e.message));
}

#[test]
fn ipsec_proposals_and_ids() {
    let d = Dir::new();
    let base = "\n[[tunnel]]\nname = \"hq\"\nprotocol = \"ipsec\"\npsk = \"keys/hq.psk\"\n\
                local_subnets = [\"10.10.0.0/24\"]\nremote_subnets = [\"172.16.0.0/16\"]\n";
    let text = site()
        + base
        + "ike_proposals = [\"aes256gcm16-prfsha256-x25519\", \"aes256-sha1-modp1024\"]\n\
           esp_proposals = []\nlocal_id = \"\"\nstart_action = \"later\"\nremote_id = \"%any\"\n";
    let errors = d.errors(&text);
    has_error(
        &errors,
        "tunnel[0].ike_proposals[1]",
        13,
        "unknown algorithm \"aes256\"",
    );
    has_error(
        &errors,
        "tunnel[0].esp_proposals",
        14,
        "at least one proposal",
    );
    has_error(&errors, "tunnel[0].local_id", 15, "must not be empty");
    has_error(
        &errors,
        "tunnel[0].start_action",
        16,
        "expected \"start\" or \"trap\" or \"none\"",
    );
    has_error(&errors, "tunnel[0].remote_id", 17, "exact identity");
    assert_eq!(errors.len(), 5, "{errors:#?}");

    let text = site()
        + base
        + "esp_proposals = [\"chacha20poly1305-x25519-esn\"]\nstart_action = \"none\"\n\
           local_id = \"@#0a0b\"\nremote_id = \"hq@example.net\"\n";
    let c = d.parse(&text).unwrap();
    assert_eq!(
        c.tunnels[0].esp_proposals,
        vec!["chacha20poly1305-x25519-esn"]
    );
    assert_eq!(c.tunnels[0].start_action, StartAction::None);
}

#[test]
fn durations() {
    let d = Dir::new();
    let text = site()
        + &wg_tunnel("a", "10.1.0.0/16")
        + "persistent_keepalive = \"1500ms\"\nrekey_interval = \"0s\"\ndpd = { interval = \"1m\" }\n"
        + &wg_tunnel("b", "10.2.0.0/16")
        + "persistent_keepalive = \"0s\"\nrekey_interval = \"soon\"\n\
           dpd = { interval = \"10s\", timeout = \"5s\", action = \"panic\" }\n"
        + &wg_tunnel("c", "10.3.0.0/16")
        + "dpd = { interval = \"10s\", timeout = \"5s\" }\npersistent_keepalive = \"65536s\"\n";
    let errors = d.errors(&text);
    has_error(
        &errors,
        "tunnel[0].persistent_keepalive",
        11,
        "whole seconds",
    );
    has_error(&errors, "tunnel[0].rekey_interval", 12, "greater than zero");
    has_error(
        &errors,
        "tunnel[0].dpd",
        13,
        "dpd timeout (30s, the default) must not be shorter than the interval (1m)",
    );
    has_error(
        &errors,
        "tunnel[1].persistent_keepalive",
        19,
        "expected 1s to 65535s",
    );
    has_error(
        &errors,
        "tunnel[1].rekey_interval",
        20,
        "invalid duration \"soon\"",
    );
    has_error(
        &errors,
        "tunnel[1].dpd.action",
        21,
        "expected \"restart\" or \"clear\" or \"hold\"",
    );
    has_error(
        &errors,
        "tunnel[2].dpd.timeout",
        27,
        "dpd timeout (5s) must not be shorter than the interval (10s)",
    );
    has_error(
        &errors,
        "tunnel[2].persistent_keepalive",
        28,
        "expected 1s to 65535s",
    );
    assert_eq!(errors.len(), 8, "{errors:#?}");

    let text = site()
        + &wg_tunnel("a", "10.1.0.0/16")
        + "dpd = { interval = \"2s\", action = \"hold\" }\n";
    let t = &d.parse(&text).unwrap().tunnels[0];
    assert_eq!(t.dpd.interval, Duration::from_secs(2));
    assert_eq!(t.dpd.timeout, Duration::from_secs(30));
    assert_eq!(t.dpd.action, DpdAction::Hold);
}

#[test]
fn metrics_listen() {
    let d = Dir::new();
    let errors = d.errors(&(site() + "[metrics]\nlisten = \"localhost\"\n"));
    one_error(
        &errors,
        "metrics.listen",
        7,
        "invalid listen address \"localhost\"",
    );
    let c = d
        .parse(&(site() + "[metrics]\nlisten = \"[::1]:9586\"\n"))
        .unwrap();
    assert_eq!(c.metrics.unwrap().listen, "[::1]:9586".parse().unwrap());
}

#[test]
fn syntax_error_has_a_line() {
    let d = Dir::new();
    let errors = d.errors("[site]\nname = \"lab\"\nname = \"x\"\n");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].line, Some(3));
    assert!(errors[0].message.contains("duplicate key"));

    let errors = d.errors("[site]\nname = \"lab\ninterface = 1\n[tunnel\n");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].line, Some(2));
    assert_eq!(errors[0].path, "");
    assert!(
        errors[0]
            .to_string()
            .starts_with("line 2: invalid TOML (column 12)"),
        "{}",
        errors[0]
    );
}

#[test]
fn errors_are_sorted_and_displayed_one_per_line() {
    let d = Dir::new();
    let text = site().replace("sw0", "a/b").replace("lab\"", "x y\"") + "bogus = 1\n";
    let err = d.parse(&text).unwrap_err();
    let lines: Vec<usize> = err.0.iter().map(|e| e.line.unwrap()).collect();
    assert_eq!(lines, vec![2, 3, 6]);
    let shown = err.to_string();
    assert_eq!(shown.lines().count(), 3);
    assert!(
        shown.starts_with("line 2: site.name: invalid name \"x y\""),
        "{shown}"
    );
}

#[test]
fn load_reads_files() {
    let d = Dir::new();
    let file = d.0.join("sitewire.toml");
    fs::write(&file, site()).unwrap();
    let c = Config::load(&file).unwrap();
    assert_eq!(c.path, file);

    let err = Config::load(Path::new("/nonexistent/sitewire.toml")).unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert_eq!(err.0[0].path, "");
    assert_eq!(err.0[0].line, None);
    assert!(err.0[0]
        .to_string()
        .starts_with("cannot read config file /nonexistent/sitewire.toml"));
}

#[test]
fn probes() {
    let d = Dir::new();
    let text = site()
        + &wg_tunnel("a", "10.1.0.0/16")
        + "local_subnets = [\"10.9.0.0/24\"]\n\
           probe = { target = \"10.1.2.3\", interval = \"2s\", source = \"10.9.0.7\" }\n"
        + &wg_tunnel("b", "10.2.0.0/16")
        + "probe = { target = \"10.2.0.1\" }\n";
    let c = d.parse(&text).unwrap();
    let p = c.tunnels[0].probe.unwrap();
    assert_eq!(p.target, "10.1.2.3".parse::<std::net::Ipv4Addr>().unwrap());
    assert_eq!(p.source, Some("10.9.0.7".parse().unwrap()));
    assert_eq!(p.interval, Duration::from_secs(2));
    let p = c.tunnels[1].probe.unwrap();
    assert_eq!(p.interval, Duration::from_secs(5));
    assert_eq!(p.source, None);
    assert_eq!(c.tunnels[1].probe, c.tunnel("b").unwrap().probe);
    assert_eq!(
        c.tunnels[0]
            .probe
            .unwrap()
            .source_for(&c.site, &c.tunnels[0].local_subnets),
        p.source.or("10.9.0.7".parse().ok())
    );

    let text = site()
        + &wg_tunnel("a", "10.1.0.0/16")
        + "local_subnets = [\"10.9.0.0/24\"]\n\
           probe = { target = \"10.7.0.1\", interval = \"100ms\", source = \"10.8.0.1\" }\n"
        + &wg_tunnel("b", "10.2.0.0/16")
        + "probe = { target = \"fd00::1\", tagret = \"x\" }\n"
        + &wg_tunnel("c", "10.3.0.0/16")
        + "probe = { interval = \"1s\", source = \"nope\" }\n"
        + &wg_tunnel("d", "10.4.0.0/16")
        + "probe = \"10.4.0.1\"\n";
    let errors = d.errors(&text);
    has_error(
        &errors,
        "tunnel[0].probe.target",
        12,
        "probe target 10.7.0.1 is not inside the tunnel's remote_subnets (10.1.0.0/16)",
    );
    has_error(
        &errors,
        "tunnel[0].probe.interval",
        12,
        "expected at least 1s",
    );
    has_error(
        &errors,
        "tunnel[0].probe.source",
        12,
        "probe source 10.8.0.1 is not inside the tunnel's local_subnets (10.9.0.0/24)",
    );
    has_error(
        &errors,
        "tunnel[1].probe.target",
        18,
        "IPv6 probes are not supported yet",
    );
    has_error(
        &errors,
        "tunnel[1].probe.tagret",
        18,
        "unknown key `tagret`, did you mean `target`?",
    );
    has_error(
        &errors,
        "tunnel[2].probe.target",
        24,
        "missing required key `target`",
    );
    has_error(
        &errors,
        "tunnel[2].probe.source",
        24,
        "invalid probe source \"nope\": expected an IPv4 address",
    );
    has_error(
        &errors,
        "tunnel[3].probe",
        30,
        "expected a table, found a string",
    );
    assert_eq!(errors.len(), 8, "{errors:#?}");
}

#[test]
fn probe_source_defaults() {
    let d = Dir::new();
    let text = site().replace(
        "private_key",
        "address = [\"fd00::1/64\", \"10.9.0.1/24\"]\nprivate_key",
    ) + &wg_tunnel("a", "10.1.0.0/16")
        + "local_subnets = [\"10.9.0.0/24\"]\nprobe = { target = \"10.1.0.1\" }\n"
        + &wg_tunnel("b", "10.2.0.0/16")
        + "local_subnets = [\"10.5.0.0/24\"]\nprobe = { target = \"10.2.0.1\" }\n";
    let c = d.parse(&text).unwrap();
    let src = |i: usize| {
        let t = &c.tunnels[i];
        t.probe
            .unwrap()
            .source_for(&c.site, &t.local_subnets)
            .unwrap()
            .to_string()
    };
    // The site's own address if it is inside the local subnets, else the first host.
    assert_eq!(src(0), "10.9.0.1");
    assert_eq!(src(1), "10.5.0.1");
}

#[test]
fn vault_section_defaults_and_files() {
    let d = Dir::new();
    d.key("keys/vault.token", "not-a-real-token\n", 0o600);
    let text = format!(
        "{}\n[vault]\naddress = \"https://vault.example:8200/\"\ntoken_file = \"keys/vault.token\"\n",
        site()
    );
    let cfg = d.parse(&text).unwrap();
    let v = cfg.vault.unwrap();
    assert_eq!(v.address.as_deref(), Some("https://vault.example:8200"));
    assert_eq!(v.mount, "secret");
    assert_eq!(v.prefix, "sitewire");
    assert_eq!(v.token_file, Some(d.0.join("keys/vault.token")));
    assert_eq!(v.role_id_file, None);
    assert_eq!(v.rotate_every, None);
    assert_eq!(v.poll_every, std::time::Duration::from_secs(60));
    assert_eq!(v.cache_key_file, None);
    assert_eq!(
        cfg.site.state_dir,
        std::path::PathBuf::from("/var/lib/sitewire")
    );
    // No [vault]: none (VAULT_ADDR / VAULT_TOKEN are read at run time).
    assert_eq!(d.parse(&site()).unwrap().vault, None);
}

#[test]
fn vault_section_errors_have_path_and_line() {
    let d = Dir::new();
    d.key("keys/role", "r\n", 0o600);
    let text = format!(
        "{}\n[vault]\naddress = \"vault:8200\"\nmount = \"\"\ntoken_fiel = \"x\"\nrole_id_file = \"keys/role\"\nca_cert = \"missing.pem\"\n",
        site()
    );
    let errs = d.errors(&text);
    let shown: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    let has = |path: &str, what: &str| {
        assert!(
            errs.iter()
                .any(|e| e.path == path && e.line.is_some() && e.message.contains(what)),
            "no {path}: {what} in {shown:#?}"
        )
    };
    has("vault.address", "expected an http:// or https:// URL");
    has("vault.mount", "invalid mount");
    has("vault.token_fiel", "");
    has("vault.ca_cert", "no such file");
    has(
        "vault.secret_id_file",
        "AppRole needs role_id_file and secret_id_file",
    );
}

#[test]
fn vault_rotation_and_cache_keys() {
    let d = Dir::new();
    d.key("keys/cache.key", "not-a-real-cache-key\n", 0o600);
    let text = format!(
        "{}\n[vault]\nrotate_every = \"30d\"\npoll_every = \"500ms\"\ncache_key_file = \"keys/cache.key\"\n",
        site().replace("[site]\n", "[site]\nstate_dir = \"state\"\n")
    );
    let cfg = d.parse(&text).unwrap();
    let v = cfg.vault.unwrap();
    assert_eq!(
        v.rotate_every,
        Some(std::time::Duration::from_secs(30 * 86400))
    );
    assert_eq!(v.poll_every, std::time::Duration::from_millis(500));
    assert_eq!(v.cache_key_file, Some(d.0.join("keys/cache.key")));
    assert_eq!(cfg.site.state_dir, d.0.join("state"));

    let bad = format!(
        "{}\n[vault]\nrotate_every = \"100ms\"\npoll_every = \"soon\"\ncache_key_file = \"keys/none\"\n",
        site().replace("[site]\n", "[site]\nstate_dir = \"\"\n")
    );
    let errs = d.errors(&bad);
    let shown: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    for (path, what) in [
        ("vault.rotate_every", "at least 1s"),
        ("vault.poll_every", ""),
        ("vault.cache_key_file", "no such file"),
        ("site.state_dir", "empty state_dir"),
    ] {
        assert!(
            errs.iter()
                .any(|e| e.path == path && e.line.is_some() && e.message.contains(what)),
            "no {path}: {what} in {shown:#?}"
        );
    }
}
