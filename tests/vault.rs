//! Keys from a real OpenBao dev server (`bao server -dev`, started here inside site A's
//! namespace so that both sites reach it over the underlay and nothing leaves the test's
//! namespaces): `sitewire vault init` for two sites, a tunnel whose keys come only from
//! Vault, clear errors for a wrong token and an unreachable Vault, no secrets in logs.

mod support;

use std::time::{Duration, Instant};

use support::site::{wait_tunnel_up, SiteConfig};
use support::{prereq, wait_until, write_file_0600, Site, Topo};

fn vault_section(address: &str, token_file: &str) -> String {
    format!("\n[vault]\naddress = \"{address}\"\ntoken_file = \"{token_file}\"\n")
}

fn site_config(t: &Topo, site: Site, port: u16, vault: &str) -> String {
    let (name, peer, iface, ep, local, remote) = match site {
        Site::A => (
            "a",
            "b",
            t.ifname("ia"),
            format!("{}:{port}", t.underlay_b),
            &t.subnet_a,
            &t.subnet_b,
        ),
        Site::B => (
            "b",
            "a",
            t.ifname("ib"),
            format!("{}:{port}", t.underlay_a),
            &t.subnet_b,
            &t.subnet_a,
        ),
    };
    let key = format!("vault:sitewire/sites/{name}/private");
    let peer_key = format!("vault:sitewire/sites/{peer}/public");
    let eps = [ep];
    let tunnel = format!("to-{peer}");
    let mut cfg = SiteConfig {
        name,
        iface: &iface,
        port,
        key_path: &key,
        tunnel: &tunnel,
        peer_public: &peer_key,
        endpoints: &eps,
        local,
        remote,
        extra: "",
    }
    .render();
    cfg.push_str(vault);
    cfg
}

fn write(t: &Topo, name: &str, text: &str) -> String {
    let p = t.tempdir().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn two_sites_keyed_from_openbao() {
    if !prereq(&["ping", "bao"]) {
        return;
    }
    let t = Topo::new("vault");
    let bao_port = t.port(4); // cluster port: bao_port + 1
    let token = format!("sw-test-root-{}-{}", t.id, std::process::id());
    let token_file = t.tempdir().join("token");
    write_file_0600(&token_file, format!("{token}\n"));
    let token_file = token_file.to_string_lossy().into_owned();
    let home = t.tempdir().to_string_lossy().into_owned();
    let bao = t.spawn_env(
        &t.ns_a,
        "bao",
        &[
            ("HOME", home.as_str()),
            ("BAO_ADDR", ""),
            ("VAULT_ADDR", ""),
        ],
        &[
            "bao",
            "server",
            "-dev",
            &format!("-dev-root-token-id={token}"),
            &format!("-dev-listen-address=0.0.0.0:{bao_port}"),
        ],
    );
    let addr_a = format!("http://127.0.0.1:{bao_port}");
    let addr_b = format!("http://{}:{bao_port}", t.underlay_a);
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
            assert!(bao.alive(), "bao exited:\n{}", bao.log());
            t.exec(&t.ns_a, &["bao", "status", &format!("-address={addr_a}")])
                .status
                .success()
        }),
        "OpenBao not ready after 30 s:\n{}",
        bao.log()
    );
    eprintln!("OpenBao ready after {:?}", started.elapsed());

    let port = t.port(0);
    let cfg_a = write(
        &t,
        "a.toml",
        &site_config(&t, Site::A, port, &vault_section(&addr_a, &token_file)),
    );
    let cfg_b_text = site_config(&t, Site::B, port, &vault_section(&addr_b, &token_file));
    let cfg_b = write(&t, "b-init.toml", &cfg_b_text);
    let sw = support::sitewire_bin();

    // Bootstrap both sites, each from its own namespace.
    let mut publics = Vec::new();
    for (ns, cfg, site) in [(&t.ns_a, &cfg_a, "a"), (&t.ns_b, &cfg_b, "b")] {
        let out = t.exec_ok(ns, &[sw, "vault", "init", "-c", cfg]);
        assert!(out.contains("check-and-set"), "{out}");
        assert!(
            out.contains(&format!(
                "path \"secret/data/sitewire/sites/{site}/private\""
            )),
            "policy missing: {out}"
        );
        assert!(
            out.contains("path \"secret/data/sitewire/sites/+/public\""),
            "{out}"
        );
        let public = out
            .lines()
            .find_map(|l| l.strip_prefix("public key "))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no public key in: {out}"))
            .to_string();
        publics.push(public);
    }
    // A second init never overwrites the key.
    let again = t.exec(&t.ns_a, &[sw, "vault", "init", "-c", &cfg_a]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success(), "second init succeeded");
    assert!(
        err.contains("already exists") && err.contains("not overwritten"),
        "{err}"
    );

    // The private keys as stored, to grep the logs for.
    let mut secrets = vec![token.clone()];
    for site in ["a", "b"] {
        let env_token = format!("VAULT_TOKEN={token}");
        let out = t.exec_ok(
            &t.ns_a,
            &[
                "env",
                &env_token,
                "bao",
                "kv",
                "get",
                &format!("-address={addr_a}"),
                "-field=private_key",
                &format!("secret/sitewire/sites/{site}/private"),
            ],
        );
        let k = out.trim().to_string();
        assert_eq!(k.len(), 44, "private key of {site}");
        secrets.push(k);
    }

    // A wrong token: a clear error naming the address, without the token.
    let wrong = format!("sw-wrong-{}", t.id);
    let wrong_file = t.tempdir().join("wrong-token");
    write_file_0600(&wrong_file, format!("{wrong}\n"));
    let bad_cfg = write(
        &t,
        "bad-token.toml",
        &site_config(
            &t,
            Site::A,
            port,
            &vault_section(&addr_a, &wrong_file.to_string_lossy()),
        ),
    );
    let out = t
        .exec_timeout(
            &t.ns_a,
            &[sw, "up", "-c", &bad_cfg],
            Duration::from_secs(30),
        )
        .expect("sitewire up with a wrong token did not exit");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains("rejected the token") && err.contains(&addr_a),
        "{err}"
    );
    assert!(!err.contains(&wrong) && !err.contains(&token), "{err}");

    // Vault unreachable: the address and the paths are named.
    let dead = format!("http://127.0.0.1:{}", t.port(7));
    let dead_cfg = write(
        &t,
        "dead.toml",
        &site_config(&t, Site::A, port, &vault_section(&dead, &token_file)),
    );
    let out = t
        .exec_timeout(
            &t.ns_a,
            &[sw, "up", "-c", &dead_cfg],
            Duration::from_secs(30),
        )
        .expect("sitewire up with Vault down did not exit");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains("cannot reach Vault at")
            && err.contains(&dead)
            && err.contains("vault:sitewire/sites/a/private"),
        "{err}"
    );
    assert!(!err.contains(&token), "{err}");

    // Both sites up with keys from Vault only.
    let text_a = std::fs::read_to_string(&cfg_a).unwrap();
    let a = t.start_sitewire(Site::A, "a", &text_a);
    let b = t.start_sitewire(Site::B, "b", &cfg_b_text);
    let (if_a, if_b) = (t.ifname("ia"), t.ifname("ib"));
    assert!(
        wait_tunnel_up(&if_a, "to-b", Duration::from_secs(15)),
        "{}\n{}",
        a.log(),
        b.log()
    );
    assert!(
        t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_secs(10)),
        "{}\n{}",
        a.log(),
        b.log()
    );
    let block = t.ping(&t.ns_a, t.host_a, t.host_b, 50, 0.02);
    assert_eq!(block.received, block.sent, "pings lost");
    let _ = wait_tunnel_up(&if_b, "to-a", Duration::from_secs(5));
    // Each site runs with the other's published public key.
    let status_b = support::site::tunnel_status(&if_b, "to-a").to_string();
    let status_a = support::site::tunnel_status(&if_a, "to-b").to_string();
    eprintln!("published keys a={} b={}", publics[0], publics[1]);

    // No key material or token in any daemon log or command output we produced.
    let logs = [a.log(), b.log(), err, status_a, status_b];
    for (i, log) in logs.iter().enumerate() {
        for s in &secrets {
            assert!(!log.contains(s.as_str()), "log {i} contains a secret");
        }
    }
}
