//! Bad configuration files: every problem is reported with its TOML path and line.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use sitewire::config::{Config, ConfigErrors};

const PEER_KEY: &str = "Wf7Z5Wc0b6B1XHq3G6wVQnDmZyqJ1cCkqk4kF4mOQ1E=";
const SECRET: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";

/// A scratch directory with `keys/lab.key` and `keys/hq.psk` (mode 0600).
struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sitewire-config-errors-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("keys")).unwrap();
        let f = Fixture { dir };
        f.write("keys/lab.key", &format!("{SECRET}\n"), 0o600);
        f.write("keys/hq.psk", &format!("{SECRET}\n"), 0o600);
        f
    }

    fn write(&self, name: &str, content: &str, mode: u32) -> PathBuf {
        let path = self.dir.join(name);
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    /// Writes `text` as a config file and loads it.
    fn load(&self, text: &str) -> Result<Config, ConfigErrors> {
        let path = self.write("sitewire.toml", text, 0o644);
        Config::load(&path)
    }

    fn errors(&self, text: &str) -> ConfigErrors {
        match self.load(text) {
            Ok(c) => panic!("config was accepted: {c:#?}\n{text}"),
            Err(e) => e,
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Asserts that one of the errors reads `line <line>: <path>: ...<needle>...`.
fn assert_reported(errors: &ConfigErrors, line: usize, path: &str, needle: &str) {
    let prefix = format!("line {line}: {path}: ");
    assert!(
        errors
            .0
            .iter()
            .map(ToString::to_string)
            .any(|e| e.starts_with(&prefix) && e.contains(needle)),
        "expected `{prefix}...{needle}...` among:\n{errors}"
    );
}

const SITE: &str = r#"[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"
"#;

/// `SITE` (lines 1-5) followed by `rest`, which therefore starts on line 6.
fn with_site(rest: &str) -> String {
    format!("{SITE}{}", rest.replace("PEER_KEY", PEER_KEY))
}

#[test]
fn the_base_config_is_valid() {
    let f = Fixture::new();
    let c = f
        .load(&with_site(
            "\n[[tunnel]]\nname = \"a\"\npeer_public_key = \"PEER_KEY\"\nremote_subnets = [\"10.1.0.0/16\"]\n",
        ))
        .unwrap();
    assert_eq!(c.tunnels.len(), 1);
    assert_eq!(c.path, f.dir.join("sitewire.toml"));
}

/// (config, line, path, message fragment)
const CASES: &[(&str, usize, &str, &str)] = &[
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_prot = 51820
private_key = "keys/lab.key"
"#,
        4,
        "site.listen_prot",
        "unknown key `listen_prot`, did you mean `listen_port`?",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
private_key = "keys/lab.key"
"#,
        1,
        "site.listen_port",
        "missing required key `listen_port`",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = "51820"
private_key = "keys/lab.key"
"#,
        4,
        "site.listen_port",
        "expected an integer, found a string",
    ),
    (
        r#"# sitewire
[site]
name = "lab site"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"
"#,
        3,
        "site.name",
        "invalid name \"lab site\"",
    ),
    (
        r#"[site]
name = "lab"
interface = "sitewire-lab-tun0"
listen_port = 51820
private_key = "keys/lab.key"
"#,
        3,
        "site.interface",
        "longer than 15 bytes",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = 0
private_key = "keys/lab.key"
"#,
        4,
        "site.listen_port",
        "invalid listen_port 0: expected 1 to 65535",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/nope.key"
"#,
        5,
        "site.private_key",
        "nope.key does not exist",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"
address = ["10.77.0.1/24", "fd77::1/64"]
mtu = 1000
"#,
        7,
        "site.mtu",
        "IPv6 needs at least 1280",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"

[metrics]
listen = "localhost:9586"
"#,
        8,
        "metrics.listen",
        "invalid listen address \"localhost:9586\"",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"

[[tunnel]]
name = "a"
peer_public_key = "Wf7Z5Wc0b6B1XHq3G6wVQnDmZyqJ1cCkqk4kF4mOQ1E="
remote_subnets = ["10.1.0.0/16"]

[[tunnel]]
name = "b"
peer_public_key = "Wf7Z5Wc0b6B1XHq3G6wVQnDmZyqJ1cCkqk4kF4mOQ1E="
remote_subnets = ["10.2.0.0/33"]
"#,
        15,
        "tunnel[1].remote_subnets[0]",
        "invalid CIDR \"10.2.0.0/33\"",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"

[[tunnel]]
name = "branch"
peer_public_key = "Wf7Z5Wc0b6B1XHq3G6wVQnDmZyqJ1cCkqk4kF4mOQ1E="
endpoint = [
  "198.51.100.7:51820",
  "198.51.100.8",
]
remote_subnets = ["10.1.0.0/16"]
"#,
        12,
        "tunnel[0].endpoint[1]",
        "a port is required for WireGuard",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"

[[tunnel]]
name = "branch"
peer_public_key = "Wf7Z5Wc0b6B1XHq3G6wVQnDmZyqJ1cCkqk4kF4mOQ1E="
remote_subnets = ["10.1.0.0/16"]

[[tunnel]]
name = "branch"
peer_public_key = "Wf7Z5Wc0b6B1XHq3G6wVQnDmZyqJ1cCkqk4kF4mOQ1E="
remote_subnets = ["10.2.0.0/16"]
"#,
        13,
        "tunnel[1].name",
        "duplicate tunnel name \"branch\" (first used at line 8)",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"

[[tunnel]]
name = "branch"
peer_public_key = "Wf7Z5Wc0b6B1XHq3G6wVQnDmZyqJ1cCkqk4kF4mOQ1E="
remote_subnets = ["192.168.0.0/16"]

[[tunnel]]
name = "laptop"
peer_public_key = "Wf7Z5Wc0b6B1XHq3G6wVQnDmZyqJ1cCkqk4kF4mOQ1E="
remote_subnets = ["10.9.0.0/24", "192.168.50.0/24"]
"#,
        15,
        "tunnel[1].remote_subnets[1]",
        "remote subnet 192.168.50.0/24 of tunnel \"laptop\" overlaps remote subnet 192.168.0.0/16 of tunnel \"branch\" (tunnel[0].remote_subnets[0], line 10)",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"

[[tunnel]]
name = "hq"
protocol = "ipsec"
peer_public_key = "Wf7Z5Wc0b6B1XHq3G6wVQnDmZyqJ1cCkqk4kF4mOQ1E="
local_subnets = ["10.10.0.0/24"]
remote_subnets = ["172.16.0.0/16"]
psk = "keys/hq.psk"
"#,
        10,
        "tunnel[0].peer_public_key",
        "`peer_public_key` is only valid for protocol = \"wireguard\"",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"

[[tunnel]]
name = "branch"
peer_public_key = "Wf7Z5Wc0b6B1XHq3G6wVQnDmZyqJ1cCkqk4kF4mOQ1E="
remote_subnets = ["10.1.0.0/16"]
start_action = "trap"
"#,
        11,
        "tunnel[0].start_action",
        "only valid for protocol = \"ipsec\"",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"

[[tunnel]]
name = "hq"
protocol = "ipsec"
local_subnets = ["10.10.0.0/24"]
remote_subnets = ["172.16.0.0/16"]
psk = "keys/hq.psk"
ike_proposals = ["aes256gcm16-prfsha256-x25519", "aes256gcm16-prfsha256-modp1024"]
"#,
        13,
        "tunnel[0].ike_proposals[1]",
        "unknown algorithm \"modp1024\"",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"

[[tunnel]]
name = "hq"
protocol = "ipsec"
local_subnets = ["10.10.0.0/24"]
remote_subnets = ["172.16.0.0/16"]
"#,
        7,
        "tunnel[0].psk",
        "missing required key `psk` for protocol = \"ipsec\"",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"

[[tunnel]]
name = "branch"
peer_public_key = "Wf7Z5Wc0b6B1XHq3G6wVQnDmZyqJ1cCkqk4kF4mOQ1E="
remote_subnets = ["10.1.0.0/16"]
dpd = { interval = "30s", timeout = "10s" }
"#,
        11,
        "tunnel[0].dpd.timeout",
        "dpd timeout (10s) must not be shorter than the interval (30s)",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"

[[tunnel]]
name = "branch"
peer_public_key = "Wf7Z5Wc0b6B1XHq3G6wVQnDmZyqJ1cCkqk4kF4mOQ1E="
remote_subnets = ["10.1.0.0/16"]
dpd = { interval = "30s", timout = "60s" }
"#,
        11,
        "tunnel[0].dpd.timout",
        "did you mean `timeout`?",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"

[[tunnel]]
name = "branch"
peer_public_key = "Wf7Z5Wc0b6B1XHq3G6wVQnDmZyqJ1cCkqk4kF4mOQ1E="
remote_subnets = ["10.1.0.0/16"]
persistent_keepalive = "2500ms"
"#,
        11,
        "tunnel[0].persistent_keepalive",
        "expected whole seconds",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"

[[tunnel]]
name = "branch"
peer_public_key = "Wf7Z5Wc0b6B1XHq3G6wVQnDmZyqJ1cCkqk4kF4mOQ1E"
remote_subnets = ["10.1.0.0/16"]
"#,
        9,
        "tunnel[0].peer_public_key",
        "expected base64 of 32 bytes",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"

[[tunnel]]
name = "branch"
peer_public_key = "Wf7Z5Wc0b6B1XHq3G6wVQnDmZyqJ1cCkqk4kF4mOQ1E="
remote_subnets = ["10.1.0.0/16"]
rekey_interval = "0s"
"#,
        11,
        "tunnel[0].rekey_interval",
        "must be greater than zero",
    ),
    (
        r#"tunnels = []

[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"
"#,
        1,
        "tunnels",
        "unknown key `tunnels`, did you mean `tunnel`?",
    ),
    (
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"
address = ["10.77.0.1/24"]

[[tunnel]]
name = "laptop"
peer_public_key = "Wf7Z5Wc0b6B1XHq3G6wVQnDmZyqJ1cCkqk4kF4mOQ1E="
local_subnets = ["10.10.0.0/24"]
remote_subnets = ["10.10.0.64/26", "10.77.0.1/32"]
"#,
        12,
        "tunnel[0].remote_subnets[1]",
        "is this site's own address 10.77.0.1/32 (site.address[0], line 6)",
    ),
];

#[test]
fn each_bad_config_is_reported_with_path_and_line() {
    assert!(CASES.len() >= 15);
    let f = Fixture::new();
    for &(text, line, path, needle) in CASES {
        let errors = f.errors(text);
        assert_reported(&errors, line, path, needle);
    }
}

#[test]
fn the_remote_subnet_overlapping_local_is_also_reported() {
    let f = Fixture::new();
    // The last case has a second problem: 10.10.0.64/26 is inside local 10.10.0.0/24.
    let errors = f.errors(CASES[CASES.len() - 1].0);
    assert_eq!(errors.0.len(), 2, "{errors}");
    assert_reported(
        &errors,
        12,
        "tunnel[0].remote_subnets[0]",
        "overlaps local subnet 10.10.0.0/24 of tunnel \"laptop\" (tunnel[0].local_subnets[0], line 11)",
    );
}

#[test]
fn syntax_errors_name_the_line() {
    let f = Fixture::new();
    let errors = f.errors(&with_site("\n[[tunnel]\nname = \"a\"\n"));
    assert_eq!(errors.0.len(), 1);
    let shown = errors.to_string();
    assert!(
        shown.starts_with("line 7: invalid TOML (column 10)"),
        "{shown}"
    );
}

#[test]
fn a_missing_site_section_is_reported() {
    let f = Fixture::new();
    let errors = f.errors("[metrics]\nlisten = \"127.0.0.1:9586\"\n");
    assert_eq!(errors.to_string(), "site: missing required section [site]");
}

#[test]
fn many_problems_are_reported_at_once() {
    let f = Fixture::new();
    let text = r#"[site]
name = "my lab"
interface = "sw0"
listen_port = 65536
private_key = "keys/missing.key"
mtu = 9001

[metrics]
listen = "127.0.0.1"

[[tunnel]]
name = "branch"
protocl = "wireguard"
peer_public_key = "not-a-key"
endpoint = "198.51.100.7"
remote_subnets = ["192.168.50.0/24", "192.168.50.1/24"]
persistent_keepalive = "0s"

[[tunnel]]
name = "hq"
protocol = "ipsec"
keying = "ike"
local_subnets = []
remote_subnets = ["192.168.0.0/16"]
psk = "vault:"
esp_proposals = ["aes256gcm16-prfsha256"]
start_action = "now"
"#;
    let errors = f.errors(text);
    let expected = [
        (2, "site.name", "invalid name \"my lab\""),
        (4, "site.listen_port", "invalid listen_port 65536"),
        (5, "site.private_key", "does not exist"),
        (6, "site.mtu", "expected 576 to 9000"),
        (9, "metrics.listen", "invalid listen address \"127.0.0.1\""),
        (13, "tunnel[0].protocl", "did you mean `protocol`?"),
        (
            14,
            "tunnel[0].peer_public_key",
            "invalid peer_public_key \"not-a-key\"",
        ),
        (15, "tunnel[0].endpoint", "a port is required for WireGuard"),
        (
            16,
            "tunnel[0].remote_subnets[1]",
            "duplicate entry \"192.168.50.1/24\"",
        ),
        (
            17,
            "tunnel[0].persistent_keepalive",
            "expected 1s to 65535s",
        ),
        (19, "tunnel[1].local_id", "missing required key `local_id`"),
        (
            19,
            "tunnel[1].remote_id",
            "missing required key `remote_id`",
        ),
        (
            22,
            "tunnel[1].keying",
            "only valid for protocol = \"wireguard\"",
        ),
        (
            23,
            "tunnel[1].local_subnets",
            "must list at least one subnet",
        ),
        (
            24,
            "tunnel[1].remote_subnets[0]",
            "overlaps remote subnet 192.168.50.0/24 of tunnel \"branch\"",
        ),
        (25, "tunnel[1].psk", "empty Vault path"),
        (
            26,
            "tunnel[1].esp_proposals[0]",
            "unknown algorithm \"prfsha256\"",
        ),
        (27, "tunnel[1].start_action", "invalid start_action \"now\""),
    ];
    for (line, path, needle) in expected {
        assert_reported(&errors, line, path, needle);
    }
    assert_eq!(errors.0.len(), expected.len(), "{errors}");
    // Sorted by line, one per line of output.
    assert_eq!(errors.to_string().lines().count(), expected.len());
    let lines: Vec<_> = errors.0.iter().map(|e| e.line.unwrap()).collect();
    assert!(lines.windows(2).all(|w| w[0] <= w[1]), "{lines:?}");
}

#[test]
fn world_readable_key_file_is_refused_without_leaking_it() {
    let f = Fixture::new();
    let key = f.write("keys/open.key", &format!("{SECRET}\n"), 0o644);
    let text = SITE.replace("keys/lab.key", "keys/open.key");
    let errors = f.errors(&text);
    let shown = errors.to_string();
    assert_eq!(errors.0.len(), 1, "{shown}");
    assert_reported(
        &errors,
        5,
        "site.private_key",
        &format!(
            "key file {} is readable by group/others (mode 0644); run chmod 600 {}",
            key.display(),
            key.display()
        ),
    );
    assert!(!shown.contains(SECRET), "{shown}");

    // Group-readable is refused too; 0400 is fine.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
    assert!(f.errors(&text).to_string().contains("(mode 0640)"));
    fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
    assert!(f.load(&text).is_ok());
}

#[test]
fn key_file_contents_never_appear_in_errors() {
    let f = Fixture::new();
    // A secret-looking but wrong-length value, and an open PSK file.
    let almost = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA==";
    f.write("keys/bad.key", &format!("{almost}\n"), 0o600);
    f.write("keys/open.psk", &format!("{SECRET}\n"), 0o666);
    let text = SITE.replace("keys/lab.key", "keys/bad.key")
        + "\n[[tunnel]]\nname = \"a\"\npeer_public_key = \"PEER\"\nremote_subnets = [\"10.1.0.0/16\"]\npsk = \"keys/open.psk\"\n"
            .replace("PEER", PEER_KEY)
            .as_str();
    let errors = f.errors(&text);
    let shown = errors.to_string();
    assert_reported(&errors, 5, "site.private_key", "does not hold a key");
    assert_reported(&errors, 11, "tunnel[0].psk", "(mode 0666)");
    assert!(
        !shown.contains(almost) && !shown.contains(SECRET),
        "{shown}"
    );

    // A key pasted inline instead of a path is not echoed either.
    let errors = f.errors(&SITE.replace("keys/lab.key", SECRET));
    assert_reported(&errors, 5, "site.private_key", "looks like a key itself");
    assert!(!errors.to_string().contains(SECRET));
}

#[test]
fn relative_key_paths_resolve_against_the_config_directory() {
    let f = Fixture::new();
    let sub = f.dir.join("etc");
    fs::create_dir_all(&sub).unwrap();
    let path = sub.join("sitewire.toml");
    fs::write(&path, SITE.replace("keys/lab.key", "../keys/lab.key")).unwrap();
    let c = Config::load(&path).unwrap();
    match &c.site.private_key {
        sitewire::config::KeyRef::File(p) => {
            assert!(p.is_absolute());
            assert_eq!(fs::read_to_string(p).unwrap().trim(), SECRET);
        }
        other => panic!("{other:?}"),
    }
    // The same text parsed in memory is resolved against the given base directory.
    let text = SITE.replace("keys/lab.key", "../keys/lab.key");
    let parsed = Config::parse(&text, &sub).unwrap();
    assert_eq!(parsed.site, c.site);
    assert_eq!(parsed.path, sub.join("<inline>"));
    let err = Config::parse(&text.replace("lab.key", "none.key"), &sub).unwrap_err();
    assert_reported(&err, 5, "site.private_key", "does not exist");
}

const VALID: &str = r#"[site]
name = "lab"
interface = "sw0"
listen_port = 51820
private_key = "keys/lab.key"
address = ["10.77.0.1/24", "fd77::1/64"]

[metrics]
listen = "127.0.0.1:9586"

[[tunnel]]
name = "branch"
peer_public_key = "Wf7Z5Wc0b6B1XHq3G6wVQnDmZyqJ1cCkqk4kF4mOQ1E="
endpoint = ["198.51.100.7:51820", "vpn.example.net:51820"]
local_subnets = ["10.10.0.0/24"]
remote_subnets = ["192.168.50.0/24"]
persistent_keepalive = "25s"
dpd = { interval = "10s", timeout = "30s", action = "restart" }

[[tunnel]]
name = "hq"
protocol = "ipsec"
endpoint = "203.0.113.9"
local_subnets = ["10.10.0.0/24"]
remote_subnets = ["172.16.0.0/16"]
psk = "keys/hq.psk"
local_id = "lab.example.net"
remote_id = "hq.example.net"
ike_proposals = ["aes256gcm16-prfsha256-x25519"]
esp_proposals = ["aes256gcm16"]
start_action = "start"
"#;

fn runner() -> TestRunner {
    TestRunner::new(ProptestConfig {
        cases: 512,
        ..ProptestConfig::default()
    })
}

/// Parsing must end in Ok or Err, never panic.
fn parse_quietly(text: &str, dir: &Path) {
    let _ = Config::parse(text, dir);
}

#[test]
fn valid_config_for_fuzzing_is_valid() {
    let f = Fixture::new();
    let c = Config::parse(VALID, &f.dir).unwrap();
    assert_eq!(c.tunnels.len(), 2);
}

#[test]
fn parse_never_panics_on_arbitrary_text() {
    let f = Fixture::new();
    runner()
        .run(&any::<String>(), |s| {
            parse_quietly(&s, &f.dir);
            Ok(())
        })
        .unwrap();
    runner()
        .run(&"[\\[\\]a-z_=\"{}, .:/\n0-9-]{0,200}", |s| {
            parse_quietly(&s, &f.dir);
            Ok(())
        })
        .unwrap();
}

#[derive(Debug, Clone)]
enum Edit {
    Delete(prop::sample::Index, usize),
    Insert(prop::sample::Index, String),
    DropLine(prop::sample::Index),
    DuplicateLine(prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let snippet = prop_oneof![
        "[\\[\\]\"=,.{}a-z0-9 :/#\n-]{1,8}",
        Just("\"".to_string()),
        Just("[[tunnel]]\n".to_string()),
        Just("0".to_string()),
        Just("::".to_string()),
        Just("é".to_string()),
    ];
    prop_oneof![
        (any::<prop::sample::Index>(), 1usize..12).prop_map(|(i, n)| Edit::Delete(i, n)),
        (any::<prop::sample::Index>(), snippet).prop_map(|(i, s)| Edit::Insert(i, s)),
        any::<prop::sample::Index>().prop_map(Edit::DropLine),
        any::<prop::sample::Index>().prop_map(Edit::DuplicateLine),
    ]
}

fn apply(text: &str, edit: &Edit) -> String {
    let bounds: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .collect();
    let mut lines: Vec<&str> = text.lines().collect();
    match edit {
        Edit::Delete(at, n) => {
            let start = at.index(bounds.len());
            let end = (start + n).min(bounds.len() - 1);
            format!("{}{}", &text[..bounds[start]], &text[bounds[end]..])
        }
        Edit::Insert(at, s) => {
            let at = bounds[at.index(bounds.len())];
            format!("{}{s}{}", &text[..at], &text[at..])
        }
        Edit::DropLine(at) if !lines.is_empty() => {
            lines.remove(at.index(lines.len()));
            lines.join("\n")
        }
        Edit::DuplicateLine(at) if !lines.is_empty() => {
            let i = at.index(lines.len());
            lines.insert(i, lines[i]);
            lines.join("\n")
        }
        _ => text.to_string(),
    }
}

#[test]
fn parse_never_panics_on_mutated_configs() {
    let f = Fixture::new();
    runner()
        .run(&prop::collection::vec(edit(), 1..6), |edits| {
            let text = edits.iter().fold(VALID.to_string(), |t, e| apply(&t, e));
            parse_quietly(&text, &f.dir);
            Ok(())
        })
        .unwrap();
}
