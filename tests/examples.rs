//! Every shipped example passes `sitewire check` (with the key files it names generated in
//! a temporary copy), and the files that belong together agree with each other.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{sitewire_bin, write_file_0600};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(examples_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn toml_of(name: &str) -> toml::Table {
    toml::from_str(&read(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Key file paths (not `vault:`) an example refers to: (path, is a private key).
fn key_refs(t: &toml::Table) -> Vec<(String, bool)> {
    let mut v = Vec::new();
    if let Some(k) = t["site"].get("private_key").and_then(|k| k.as_str()) {
        v.push((k.to_string(), true));
    }
    for tun in t
        .get("tunnel")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
    {
        if let Some(p) = tun.get("psk").and_then(|p| p.as_str()) {
            v.push((p.to_string(), false));
        }
    }
    v.retain(|(p, _)| !p.starts_with("vault:"));
    v
}

fn keygen() -> String {
    let out = Command::new(sitewire_bin()).arg("keygen").output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_example_config_passes_check() {
    let mut names: Vec<String> = std::fs::read_dir(examples_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    for want in [
        "lab.toml",
        "branch.toml",
        "vm-lab-branch.toml",
        "admin-server.toml",
        "metrics.toml",
    ] {
        assert!(names.iter().any(|n| n == want), "examples/{want} missing");
    }
    let dir = std::env::temp_dir().join(format!("sitewire-examples-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for name in &names {
        // Each example in its own copy, with exactly the key files it names.
        let sub = dir.join(name.trim_end_matches(".toml"));
        std::fs::create_dir_all(&sub).unwrap();
        let cfg = sub.join(name);
        std::fs::copy(examples_dir().join(name), &cfg).unwrap();
        for (key, _private) in key_refs(&toml_of(name)) {
            let p = sub.join(&key);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            // PSKs and private keys have the same format (base64 of 32 random bytes).
            write_file_0600(&p, keygen());
        }
        let out = Command::new(sitewire_bin())
            .args(["check", "-c", cfg.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sitewire check examples/{name}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lab_example_has_an_ike_wireguard_tunnel_and_an_ipsec_tunnel() {
    let t = toml_of("vm-lab-branch.toml");
    let tunnels = t["tunnel"].as_array().unwrap();
    assert!(tunnels
        .iter()
        .any(|x| x.get("keying").and_then(|k| k.as_str()) == Some("ike")));
    assert!(tunnels
        .iter()
        .any(|x| x.get("protocol").and_then(|k| k.as_str()) == Some("ipsec")));
}

#[test]
fn admin_laptop_file_matches_the_server_side() {
    let server = toml_of("admin-server.toml");
    let laptop = read("admin-laptop.wg-quick.conf");
    let value = |key: &str| {
        laptop
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == key).then(|| v.split('#').next().unwrap().trim().to_string())
            })
            .unwrap_or_else(|| panic!("no {key} in the laptop file"))
    };
    let tunnel = &server["tunnel"].as_array().unwrap()[0];
    assert!(
        tunnel.get("endpoint").is_none(),
        "the server waits for laptops"
    );
    let strs = |v: &toml::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    // The laptop's address is what the server accepts from it.
    assert_eq!(strs(&tunnel["remote_subnets"]), [value("Address")]);
    // The laptop routes the management subnet into the tunnel.
    let allowed = value("AllowedIPs");
    for net in strs(&tunnel["local_subnets"]) {
        assert!(allowed.contains(&net), "{allowed} lacks {net}");
    }
    // It talks to the server's port, and has the PSK the server requires.
    let port = server["site"]["listen_port"].as_integer().unwrap();
    assert!(value("Endpoint").ends_with(&format!(":{port}")));
    assert!(tunnel.get("psk").is_some() && laptop.contains("PresharedKey"));
}

#[test]
fn prometheus_scrapes_the_metrics_example() {
    let site = toml_of("metrics.toml");
    let listen = site["metrics"]["listen"].as_str().unwrap();
    assert_eq!(listen, "127.0.0.1:9586");
    let prom = read("prometheus.yml");
    assert!(
        prom.contains(&format!("\"{listen}\"")),
        "prometheus.yml does not scrape {listen}"
    );
}

/// The remote-admin example end to end: the server config in one namespace (sitewire), the
/// laptop's wg-quick file in the other (wireguard-go configured from `wg-quick strip`),
/// both unchanged except for keys and interface names; the laptop pings the management
/// subnet.
#[test]
fn admin_laptop_reaches_the_management_subnet() {
    use std::time::Duration;
    use support::{prereq, wait_until, Site, Topo};
    if !prereq(&["ping", "wireguard-go", "wg", "wg-quick"]) {
        return;
    }
    let t = Topo::new("admin");
    // The example's own addresses, inside this test's namespaces only.
    t.exec_ok(
        &t.ns_a,
        &["ip", "addr", "add", "198.51.100.20/24", "dev", &t.veth_a],
    );
    t.exec_ok(
        &t.ns_b,
        &["ip", "addr", "add", "198.51.100.21/24", "dev", &t.veth_b],
    );
    t.exec_ok(&t.ns_a, &["ip", "addr", "add", "10.20.0.1/24", "dev", "lo"]);

    let dir = t.tempdir();
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    let server_key = t.sitewire_key("admin-gw");
    std::fs::rename(&server_key.path, dir.join("keys/admin-gw.key")).unwrap();
    let psk = keygen();
    write_file_0600(dir.join("keys/alice.psk"), &psk);
    let (laptop_private, laptop_public) = support::wg_genkey();

    let server_if = t.ifname("adm");
    let server = read("admin-server.toml")
        .lines()
        .map(|l| {
            if l.starts_with("interface = ") {
                format!("interface = \"{server_if}\"")
            } else if l.starts_with("peer_public_key = ") {
                format!("peer_public_key = \"{laptop_public}\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let _server = t.start_sitewire(Site::A, "admin-server", &server);

    // The laptop: the wg-quick file with its three placeholders filled in.
    let laptop_if = t.ifname("lap");
    let laptop = read("admin-laptop.wg-quick.conf")
        .lines()
        .map(|l| match l.split_once('=').map(|(k, _)| k.trim()) {
            Some("PrivateKey") => format!("PrivateKey = {laptop_private}"),
            Some("PublicKey") => format!("PublicKey = {}", server_key.public),
            Some("PresharedKey") => format!("PresharedKey = {}", psk.trim()),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let conf = dir.join(format!("{laptop_if}.conf"));
    write_file_0600(&conf, &laptop);
    let stripped = support::host_exec_ok(&["wg-quick", "strip", conf.to_str().unwrap()], None);
    let stripped_path = dir.join("laptop-stripped.conf");
    write_file_0600(&stripped_path, &stripped);
    let wg_go = t.spawn_env(
        &t.ns_b,
        "wireguard-go-laptop",
        &[("WG_PROCESS_FOREGROUND", "1")],
        &["wireguard-go", "-f", &laptop_if],
    );
    let sock = format!("{}/{laptop_if}.sock", support::UAPI_DIR);
    assert!(
        wait_until(Duration::from_secs(15), Duration::from_millis(50), || {
            assert!(wg_go.alive(), "{}", wg_go.log());
            Path::new(&sock).exists()
        }),
        "{}",
        wg_go.log()
    );
    // What wg-quick itself would do with Address, MTU and AllowedIPs.
    let value = |key: &str| {
        laptop
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == key).then(|| v.split('#').next().unwrap().trim().to_string())
            })
            .unwrap()
    };
    t.exec_ok(
        &t.ns_b,
        &["wg", "setconf", &laptop_if, stripped_path.to_str().unwrap()],
    );
    t.exec_ok(
        &t.ns_b,
        &["ip", "addr", "add", &value("Address"), "dev", &laptop_if],
    );
    t.exec_ok(
        &t.ns_b,
        &["ip", "link", "set", &laptop_if, "mtu", &value("MTU"), "up"],
    );
    for net in value("AllowedIPs").split(',') {
        t.exec_ok(
            &t.ns_b,
            &["ip", "route", "add", net.trim(), "dev", &laptop_if],
        );
    }

    assert!(
        t.wait_ping(
            &t.ns_b,
            "10.99.0.10".parse().unwrap(),
            "10.20.0.1".parse().unwrap(),
            Duration::from_secs(10)
        ),
        "laptop cannot reach the management subnet:\n{}",
        wg_go.log_tail(20)
    );
    let ping = t.ping(
        &t.ns_b,
        "10.99.0.10".parse().unwrap(),
        "10.20.0.1".parse().unwrap(),
        10,
        0.05,
    );
    assert_eq!(ping.received, 10, "{ping:?}");
    // The server learned the laptop's address from its packets.
    let st = support::site::tunnel_status(&server_if, "alice-laptop");
    assert_eq!(
        st["endpoint"].as_str().unwrap().split(':').next(),
        Some("198.51.100.21")
    );
}
