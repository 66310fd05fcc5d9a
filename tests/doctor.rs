//! `sitewire doctor` inside a test namespace: a healthy site passes, and each check that
//! can fail does fail (with its fix) when the namespace is broken in that one way.

mod support;

use std::path::Path;
use std::time::Duration;

use support::site::SiteConfig;
use support::{prereq, sitewire_bin, Site, Topo};

struct Doc {
    ok: bool,
    out: String,
}

impl Doc {
    /// Lines of one level and check, e.g. ("fail", "routes").
    fn lines(&self, level: &str, check: &str) -> Vec<&str> {
        self.out
            .lines()
            .filter(|l| {
                let mut w = l.split_whitespace();
                w.next() == Some(level) && w.next() == Some(check)
            })
            .collect()
    }

    fn fails(&self, check: &str, with: &str) {
        assert!(!self.ok, "doctor passed:\n{}", self.out);
        let l = self.lines("fail", check);
        assert!(
            l.iter().any(|l| l.contains(with)),
            "no `fail {check}` line with {with:?}:\n{}",
            self.out
        );
        // Every failure comes with a fix on the next line.
        let lines: Vec<&str> = self.out.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.starts_with("fail") {
                assert!(
                    lines
                        .get(i + 1)
                        .is_some_and(|n| n.trim_start().starts_with("fix: ")),
                    "failure without a fix: {line}\n{}",
                    self.out
                );
            }
        }
    }
}

fn doctor(t: &Topo, cfg: &Path) -> Doc {
    doctor_cmd(t, &[sitewire_bin(), "doctor", "-c", cfg.to_str().unwrap()])
}

fn doctor_cmd(t: &Topo, cmd: &[&str]) -> Doc {
    let out = t.exec(&t.ns_a, cmd);
    Doc {
        ok: out.status.success(),
        out: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn doctor_passes_a_healthy_site_and_fails_each_broken_thing() {
    if !prereq(&["unshare", "mount", "touch"]) {
        return;
    }
    let t = Topo::new("doctor");
    let key = t.sitewire_key("site");
    let peer = t.sitewire_key("peer");
    let iface = t.ifname("dr");
    let port = t.port(0);
    let endpoint = vec![format!("{}:{}", t.underlay_b, t.port(1))];
    let render = |iface: &str, port: u16, endpoints: &[String]| {
        SiteConfig {
            name: "dr",
            iface,
            port,
            key_path: &key.path,
            tunnel: "to-b",
            peer_public: &peer.public,
            endpoints,
            local: &t.subnet_a,
            remote: &t.subnet_b,
            extra: "",
        }
        .render()
    };
    let cfg = t.tempdir().join("dr.toml");
    std::fs::write(&cfg, render(&iface, port, &endpoint)).unwrap();

    // Healthy: every check reports, none fails.
    let d = doctor(&t, &cfg);
    assert!(d.ok, "{}", d.out);
    for check in [
        "config", "tun", "privs", "iface", "port", "keys", "dns", "routes", "mtu", "clock",
    ] {
        assert!(
            d.out
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(check)),
            "no {check} line:\n{}",
            d.out
        );
    }
    assert!(d.lines("fail", "mtu").is_empty(), "{}", d.out);
    assert!(!d.lines("ok", "mtu").is_empty(), "{}", d.out);
    eprintln!("healthy site:\n{}", d.out);

    // A host route inside the remote subnet.
    let o = t.subnet_b.split('.').collect::<Vec<_>>();
    let inner = format!("{}.{}.{}.128/25", o[0], o[1], o[2]);
    t.exec_ok(&t.ns_a, &["ip", "route", "add", &inner, "dev", &t.veth_a]);
    doctor(&t, &cfg).fails("routes", "inside remote subnet");
    t.exec_ok(&t.ns_a, &["ip", "route", "del", &inner, "dev", &t.veth_a]);

    // The underlay's MTU is too small for mtu 1420 + 60.
    t.exec_ok(&t.ns_a, &["ip", "link", "set", &t.veth_a, "mtu", "1400"]);
    doctor(&t, &cfg).fails("mtu", &t.veth_a);
    assert!(doctor(&t, &cfg).out.contains("set mtu = 1340"));
    t.exec_ok(&t.ns_a, &["ip", "link", "set", &t.veth_a, "mtu", "1500"]);

    // An endpoint name that does not resolve.
    let bad_dns = t.tempdir().join("dns.toml");
    std::fs::write(
        &bad_dns,
        render(&iface, port, &["doctor-test.invalid:51820".to_string()]),
    )
    .unwrap();
    doctor(&t, &bad_dns).fails("dns", "doctor-test.invalid");

    // The UDP port is taken by another process (here another site); the running site's
    // own config is fine.
    let other_iface = t.ifname("run");
    let running = render(&other_iface, port, &endpoint);
    let proc = t.start_sitewire(Site::A, "running", &running);
    doctor(&t, &cfg).fails("port", "already taken");
    let own = doctor(&t, &t.tempdir().join("running.toml"));
    assert!(!own.lines("ok", "port").is_empty(), "{}", own.out);
    assert!(!own.lines("ok", "iface").is_empty(), "{}", own.out);
    proc.stop(Duration::from_secs(5));

    // A key file others can read.
    let key_path = key.path.as_str();
    t.exec_ok(&t.ns_a, &["chmod", "644", key_path]);
    let d = doctor(&t, &cfg);
    d.fails("keys", "mode 0644");
    assert!(d.out.contains("fix: chmod 600"), "{}", d.out);
    t.exec_ok(&t.ns_a, &["chmod", "600", key_path]);

    // A clock far behind: the key file was written "3 days from now".
    t.exec_ok(&t.ns_a, &["touch", "-d", "+3 days", key_path]);
    let d = doctor(&t, &cfg);
    d.fails("clock", "in the future");
    assert!(d.out.contains("no time server was asked"), "{}", d.out);
    t.exec_ok(&t.ns_a, &["touch", key_path]);

    // No TUN device (hidden in a private mount namespace).
    let script = format!(
        "mount -t tmpfs tmpfs /dev/net && exec {} doctor -c {}",
        sitewire_bin(),
        cfg.display()
    );
    doctor_cmd(&t, &["unshare", "-m", "sh", "-c", &script]).fails("tun", "/dev/net/tun");

    // And healthy again.
    let d = doctor(&t, &cfg);
    assert!(d.ok, "{}", d.out);
}
