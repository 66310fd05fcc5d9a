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

// ---- rotation, outages, AppRole, races ----

/// A running OpenBao dev server in namespace a, reachable from b over the underlay.
struct Bao {
    proc: support::Proc,
    addr_a: String,
    addr_b: String,
    token: String,
    token_file: String,
}

fn start_bao(t: &Topo) -> Bao {
    let bao_port = t.port(4);
    let token = format!("sw-test-root-{}-{}", t.id, std::process::id());
    let token_file = t.tempdir().join("token");
    write_file_0600(&token_file, format!("{token}\n"));
    let home = t.tempdir().to_string_lossy().into_owned();
    let proc = t.spawn_env(
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
    assert!(
        wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
            assert!(proc.alive(), "bao exited:\n{}", proc.log());
            t.exec(&t.ns_a, &["bao", "status", &format!("-address={addr_a}")])
                .status
                .success()
        }),
        "OpenBao not ready after 30 s:\n{}",
        proc.log()
    );
    Bao {
        proc,
        addr_b: format!("http://{}:{bao_port}", t.underlay_a),
        addr_a,
        token,
        token_file: token_file.to_string_lossy().into_owned(),
    }
}

impl Bao {
    /// `bao <args>` with the root token, in namespace a (args: subcommand words, then
    /// flags, then positional arguments; the address flag is added after `words`).
    fn run(&self, t: &Topo, words: &[&str], rest: &[&str]) -> std::process::Output {
        let env_token = format!("VAULT_TOKEN={}", self.token);
        let addr = format!("-address={}", self.addr_a);
        let mut cmd = vec!["env", env_token.as_str(), "bao"];
        cmd.extend_from_slice(words);
        cmd.push(&addr);
        cmd.extend_from_slice(rest);
        t.exec(&t.ns_a, &cmd)
    }

    fn ok(&self, t: &Topo, words: &[&str], rest: &[&str]) -> String {
        let out = self.run(t, words, rest);
        assert!(
            out.status.success(),
            "bao {words:?} {rest:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every version of a site's private key stored so far.
    fn private_versions(&self, t: &Topo, site: &str) -> Vec<String> {
        let path = format!("secret/sitewire/sites/{site}/private");
        let meta = self.ok(t, &["kv", "metadata", "get"], &["-format=json", &path]);
        let v: serde_json::Value = serde_json::from_str(&meta).unwrap();
        let current = v["data"]["current_version"].as_u64().unwrap();
        (1..=current)
            .map(|n| {
                let ver = format!("-version={n}");
                self.ok(t, &["kv", "get"], &["-field=private_key", &ver, &path])
                    .trim()
                    .to_string()
            })
            .collect()
    }

    fn published(&self, t: &Topo, site: &str) -> String {
        let path = format!("secret/sitewire/sites/{site}/public");
        self.ok(t, &["kv", "get"], &["-field=public_key", &path])
            .trim()
            .to_string()
    }
}

/// Pings at 100/s or more for `secs` seconds: (sent, received, rate per second).
fn ping_flood(t: &Topo, secs: u64) -> (u32, u32, f64) {
    let (mut sent, mut received) = (0, 0);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        // iputils ping keeps about 143/s at -i 0.007 here (67/s at 0.01); in blocks so a
        // slow machine does not trip the per-command time limit.
        let block = t.ping(&t.ns_a, t.host_a, t.host_b, 500, 0.007);
        sent += block.sent;
        received += block.received;
    }
    (
        sent,
        received,
        f64::from(sent) / started.elapsed().as_secs_f64(),
    )
}

/// Writes both sites' configs (with `extra_a` / `extra_b` added to [vault]) and runs
/// `sitewire vault init` for each.
fn init_sites(t: &Topo, bao: &Bao, port: u16, extra_a: &str, extra_b: &str) -> (String, String) {
    let a = site_config(
        t,
        Site::A,
        port,
        &(vault_section(&bao.addr_a, &bao.token_file) + extra_a),
    );
    let b = site_config(
        t,
        Site::B,
        port,
        &(vault_section(&bao.addr_b, &bao.token_file) + extra_b),
    );
    let sw = support::sitewire_bin();
    for (ns, name, text) in [(&t.ns_a, "a-init.toml", &a), (&t.ns_b, "b-init.toml", &b)] {
        let cfg = write(t, name, text);
        t.exec_ok(ns, &[sw, "vault", "init", "-c", &cfg]);
    }
    (a, b)
}

fn wg_public_key(t: &Topo, iface: &str) -> String {
    t.exec_ok(&t.ns_a, &["wg", "show", iface, "public-key"])
        .trim()
        .to_string()
}

fn wg_peers(t: &Topo, iface: &str) -> String {
    t.exec_ok(&t.ns_a, &["wg", "show", iface, "peers"])
        .trim()
        .to_string()
}

fn assert_no_secrets(logs: &[String], secrets: &[String]) {
    for (i, log) in logs.iter().enumerate() {
        for s in secrets {
            assert!(!s.is_empty());
            assert!(!log.contains(s.as_str()), "log {i} contains a secret");
        }
    }
}

fn count(log: &str, what: &str) -> usize {
    log.lines().filter(|l| l.contains(what)).count()
}

#[test]
fn key_rotation_under_traffic() {
    if !prereq(&["ping", "bao", "wg"]) {
        return;
    }
    let t = Topo::new("vrot");
    let bao = start_bao(&t);
    let port = t.port(0);
    let (cfg_a, cfg_b) = init_sites(
        &t,
        &bao,
        port,
        "rotate_every = \"5s\"\npoll_every = \"1s\"\n",
        "poll_every = \"1s\"\n",
    );
    let a = t.start_sitewire(Site::A, "a", &cfg_a);
    let b = t.start_sitewire(Site::B, "b", &cfg_b);
    let (if_a, if_b) = (t.ifname("ia"), t.ifname("ib"));
    assert!(
        wait_tunnel_up(&if_a, "to-b", Duration::from_secs(15)),
        "{}\n{}",
        a.log(),
        b.log()
    );
    assert!(t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_secs(10)));
    let first_key = wg_public_key(&t, &if_a);
    assert_eq!(first_key, bao.published(&t, "a"));

    // 100 pings/s for 30 s; A rotates every ~5 s (+2 s announcement), and once on request.
    let pinger = {
        let (ns, src, dst) = (t.ns_a.clone(), t.host_a, t.host_b);
        let t2 = &t;
        std::thread::scope(|s| {
            let _ = (ns, src, dst);
            let h = s.spawn(move || ping_flood(t2, 30));
            std::thread::sleep(Duration::from_secs(12));
            // A rotation may be in progress (announced, not yet used): retry until one starts.
            let mut out = String::new();
            let asked = Instant::now();
            while asked.elapsed() < Duration::from_secs(10) {
                let o = t.exec(
                    &t.ns_a,
                    &[
                        support::sitewire_bin(),
                        "rotate",
                        "--key",
                        "--interface",
                        &if_a,
                    ],
                );
                out = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                if o.status.success() {
                    break;
                }
                assert!(out.contains("rotation is in progress"), "{out}");
                std::thread::sleep(Duration::from_millis(300));
            }
            eprintln!("rotate --key: {out}");
            assert!(out.contains("stored and published"), "{out}");
            h.join().unwrap()
        })
    };
    // Let the last announced switch happen.
    std::thread::sleep(Duration::from_secs(3));
    let log_a = a.log();
    let rotations = count(&log_a, "site key switched");
    let adopted = count(&b.log(), "peer key switched");
    let (sent, received, rate) = pinger;
    let lost = sent - received;
    eprintln!(
        "rotations {rotations} (b adopted {adopted}), pings {received}/{sent} answered \
         ({rate:.0}/s), lost {lost} ({:.2} per rotation)",
        lost as f64 / rotations.max(1) as f64
    );
    assert!(rate >= 90.0, "only {rate:.0} pings/s");
    assert!(rotations >= 3, "only {rotations} rotations:\n{log_a}");
    assert!(adopted >= 3, "b adopted {adopted}:\n{}", b.log());
    // Static keys: at most one handshake's worth per rotation (a handshake takes well
    // under 10 ms here, i.e. at most one ping at 100/s).
    assert!(
        lost as usize <= rotations,
        "lost {lost} over {rotations} rotations"
    );
    // The tunnel runs on the newest key: `wg show` on both sides, and Vault (rotation
    // goes on: between a publication and its switch the published key is ahead).
    let mut now_key = String::new();
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            now_key = wg_public_key(&t, &if_a);
            now_key == bao.published(&t, "a") && wg_peers(&t, &if_b) == now_key
        }),
        "wg show never matched the published key"
    );
    assert_ne!(now_key, first_key);
    let versions = bao.private_versions(&t, "a");
    assert!(versions.len() > rotations, "{} versions", versions.len());
    // A reload of the unchanged files keeps the rotated keys and the tunnel as they are.
    for iface in [&if_a, &if_b] {
        let out = t.exec_ok(
            &t.ns_a,
            &[
                support::sitewire_bin(),
                "reload",
                "--json",
                "--interface",
                iface,
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["applied"], true, "{out}");
        assert!(
            v["changed"].as_array().is_some_and(|c| c.is_empty()),
            "{out}"
        );
    }
    let block = t.ping(&t.ns_a, t.host_a, t.host_b, 50, 0.01);
    assert_eq!(block.received, block.sent, "after the rotations");

    let mut secrets = versions;
    secrets.extend(bao.private_versions(&t, "b"));
    secrets.push(bao.token.clone());
    let status_a = support::site::tunnel_status(&if_a, "to-b").to_string();
    assert_no_secrets(&[log_a, b.log(), status_a], &secrets);
}

fn metric(t: &Topo, ns: &str, addr: &str, name: &str) -> Option<f64> {
    let out = t.exec(
        ns,
        &["curl", "-s", "-m", "3", &format!("http://{addr}/metrics")],
    );
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// `[site] state_dir` and `[metrics]` added to a rendered site config.
fn with_state_and_metrics(cfg: &str, state_dir: &str, metrics: &str) -> String {
    cfg.replacen(
        "\n\n[[tunnel]]",
        &format!("\nstate_dir = \"{state_dir}\"\n\n[[tunnel]]"),
        1,
    ) + &format!("\n[metrics]\nlisten = \"{metrics}\"\n")
}

#[test]
fn vault_outage_and_key_cache() {
    if !prereq(&["ping", "bao", "wg", "curl"]) {
        return;
    }
    let t = Topo::new("vout");
    let bao = start_bao(&t);
    let port = t.port(0);
    let cache_key = t.tempdir().join("cache.key");
    write_file_0600(
        &cache_key,
        format!("cache-key-{}-{}\n", t.id, std::process::id()),
    );
    let cache_key = cache_key.to_string_lossy().into_owned();
    let extra = format!("poll_every = \"1s\"\ncache_key_file = \"{cache_key}\"\n");
    let (cfg_a, cfg_b) = init_sites(
        &t,
        &bao,
        port,
        &format!("rotate_every = \"4s\"\n{extra}"),
        &extra,
    );
    let state_a = t.tempdir().join("state-a");
    let state_b = t.tempdir().join("state-b");
    let metrics_a = format!("127.0.0.1:{}", t.port(6));
    let cfg_a = with_state_and_metrics(&cfg_a, &state_a.to_string_lossy(), &metrics_a);
    let cfg_b = with_state_and_metrics(
        &cfg_b,
        &state_b.to_string_lossy(),
        &format!("127.0.0.1:{}", t.port(6)),
    );
    let a = t.start_sitewire(Site::A, "a", &cfg_a);
    let b = t.start_sitewire(Site::B, "b", &cfg_b);
    let (if_a, if_b) = (t.ifname("ia"), t.ifname("ib"));
    assert!(wait_tunnel_up(&if_a, "to-b", Duration::from_secs(15)));
    assert!(t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_secs(10)));
    assert!(
        wait_until(
            Duration::from_secs(30),
            Duration::from_millis(200),
            || count(&a.log(), "site key switched") >= 1
        ),
        "no rotation before the outage:\n{}",
        a.log()
    );
    assert_eq!(
        metric(&t, &t.ns_a, &metrics_a, "sitewire_vault_up"),
        Some(1.0)
    );

    // OpenBao stopped (SIGSTOP) for 30 s under 100+ pings/s.
    let (sent, received, rate, down_seen, before_resume, resumed_after) = std::thread::scope(|s| {
        let h = s.spawn(|| ping_flood(&t, 45));
        std::thread::sleep(Duration::from_secs(3));
        assert!(bao.proc.signal(libc::SIGSTOP));
        let stopped = Instant::now();
        let mut down_seen = false;
        while stopped.elapsed() < Duration::from_secs(30) {
            if metric(&t, &t.ns_a, &metrics_a, "sitewire_vault_up") == Some(0.0) {
                down_seen = true;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        let before_resume = count(&a.log(), "site key switched");
        assert!(bao.proc.signal(libc::SIGCONT));
        let resumed = Instant::now();
        let ok = wait_until(Duration::from_secs(60), Duration::from_millis(250), || {
            count(&a.log(), "site key switched") > before_resume
        });
        let resumed_after = ok.then(|| resumed.elapsed());
        let (sent, received, rate) = h.join().unwrap();
        (
            sent,
            received,
            rate,
            down_seen,
            before_resume,
            resumed_after,
        )
    });
    eprintln!(
        "outage: {received}/{sent} pings answered ({rate:.0}/s); vault_up 0 seen: {down_seen}; \
         rotations before resume {before_resume}; first rotation {resumed_after:?} after \
         OpenBao was continued"
    );
    assert!(down_seen, "sitewire_vault_up never 0 during the outage");
    assert!(
        resumed_after.is_some(),
        "no rotation after OpenBao came back:\n{}",
        a.log_tail(60)
    );
    assert!(rate >= 90.0, "only {rate:.0} pings/s");
    // At most one rotation (announced before the stop) falls into the window.
    assert!(sent - received <= 1, "lost {} pings", sent - received);
    assert!(
        wait_until(
            Duration::from_secs(10),
            Duration::from_millis(250),
            || metric(&t, &t.ns_a, &metrics_a, "sitewire_vault_up") == Some(1.0)
        ),
        "sitewire_vault_up not back to 1"
    );
    // The site key's age restarts with each rotation (rotate_every 4 s + 2 s announcement).
    let age = metric(
        &t,
        &t.ns_a,
        &metrics_a,
        "sitewire_key_age_seconds{key=\"site\"}",
    )
    .expect("no site key age");
    assert!(age < 15.0, "site key age {age} s");
    let unreachable = t.exec_ok(
        &t.ns_a,
        &["curl", "-s", &format!("http://{metrics_a}/metrics")],
    );
    assert!(
        unreachable.contains("result=\"unreachable\""),
        "no unreachable requests counted:\n{unreachable}"
    );

    // Start while Vault is down: from the cache, or a clear error without one.
    std::thread::sleep(Duration::from_secs(3)); // let a pending switch land
    let key_a = wg_public_key(&t, &if_a);
    a.stop(Duration::from_secs(10));
    b.stop(Duration::from_secs(10));
    let cache_file = state_a.join("a.vault-cache");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&cache_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "cache mode {mode:o}");
    assert!(bao.proc.signal(libc::SIGSTOP));
    let empty = t.tempdir().join("state-empty");
    let no_cache = write(
        &t,
        "b-nocache.toml",
        &cfg_b.replace(&*state_b.to_string_lossy(), &empty.to_string_lossy()),
    );
    let out = t
        .exec_timeout(
            &t.ns_b,
            &[support::sitewire_bin(), "up", "-c", &no_cache],
            Duration::from_secs(40),
        )
        .expect("sitewire up without a cache did not exit");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains("no key cache to start from") && err.contains("cannot reach Vault"),
        "{err}"
    );
    let a2 = t.start_sitewire(Site::A, "a2", &cfg_a);
    let b2 = t.start_sitewire(Site::B, "b2", &cfg_b);
    assert!(
        wait_tunnel_up(&if_a, "to-b", Duration::from_secs(30)),
        "{}\n{}",
        a2.log(),
        b2.log()
    );
    assert!(a2.log().contains("starting from the cached keys"));
    assert_eq!(wg_public_key(&t, &if_a), key_a, "not the last key");
    assert_eq!(wg_peers(&t, &if_b), key_a);
    let block = t.ping(&t.ns_a, t.host_a, t.host_b, 50, 0.01);
    assert_eq!(block.received, block.sent, "from the cache");
    assert!(bao.proc.signal(libc::SIGCONT));

    let mut secrets = bao.private_versions(&t, "a");
    secrets.extend(bao.private_versions(&t, "b"));
    secrets.push(bao.token.clone());
    let cache_text = std::fs::read_to_string(&cache_file).unwrap();
    assert_no_secrets(
        &[a.log(), b.log(), a2.log(), b2.log(), err, cache_text],
        &secrets,
    );
}

/// The policy `sitewire vault init` printed.
fn printed_policy(init_out: &str) -> String {
    init_out
        .split_once("policy for this site:")
        .map(|(_, p)| p.trim().to_string())
        .unwrap_or_else(|| panic!("no policy in: {init_out}"))
}

/// An AppRole with `policy`: (role_id file, secret_id file), both 0600.
fn approle(t: &Topo, bao: &Bao, name: &str, policy: &str) -> (String, String) {
    let policy_file = t.tempdir().join(format!("{name}.hcl"));
    std::fs::write(&policy_file, policy).unwrap();
    bao.ok(
        t,
        &["policy", "write"],
        &[name, &policy_file.to_string_lossy()],
    );
    let role = format!("auth/approle/role/{name}");
    bao.ok(
        t,
        &["write"],
        &[
            &role,
            &format!("token_policies={name}"),
            "token_ttl=12s",
            "token_max_ttl=30s",
        ],
    );
    let role_id = bao.ok(
        t,
        &["read"],
        &["-field=role_id", &format!("{role}/role-id")],
    );
    let secret_id = bao.ok(
        t,
        &["write"],
        &["-f", "-field=secret_id", &format!("{role}/secret-id")],
    );
    let (rf, sf) = (
        t.tempdir().join(format!("{name}.role")),
        t.tempdir().join(format!("{name}.secret")),
    );
    write_file_0600(&rf, role_id.trim());
    write_file_0600(&sf, secret_id.trim());
    (
        rf.to_string_lossy().into_owned(),
        sf.to_string_lossy().into_owned(),
    )
}

fn rotate_key(t: &Topo, ns: &str, iface: &str) -> (bool, String) {
    let o = t.exec(
        ns,
        &[
            support::sitewire_bin(),
            "rotate",
            "--key",
            "--interface",
            iface,
        ],
    );
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn approle_least_privilege() {
    if !prereq(&["ping", "bao", "wg", "curl"]) {
        return;
    }
    let t = Topo::new("vapp");
    let bao = start_bao(&t);
    bao.ok(&t, &["auth", "enable"], &["approle"]);
    let port = t.port(0);
    let (cfg_a, cfg_b) = init_sites(
        &t,
        &bao,
        port,
        "poll_every = \"1s\"\n",
        "poll_every = \"1s\"\n",
    );
    // The policy init prints for site a, as printed (init refuses a second write, so
    // render it from a fresh init of a throwaway site with a's name under another prefix).
    let probe_cfg = write(
        &t,
        "a-policy.toml",
        &cfg_a.replace("[vault]\n", "[vault]\nprefix = \"policy-probe\"\n"),
    );
    let init = t.exec_ok(
        &t.ns_a,
        &[support::sitewire_bin(), "vault", "init", "-c", &probe_cfg],
    );
    let policy = printed_policy(&init).replace("policy-probe", "sitewire");
    assert!(
        policy.contains("path \"secret/data/sitewire/sites/a/private\""),
        "{policy}"
    );
    let (role, secret) = approle(&t, &bao, "sw-a", &policy);
    let approle_section = |role: &str, secret: &str| {
        format!(
            "\n[vault]\naddress = \"{}\"\nrole_id_file = \"{role}\"\nsecret_id_file = \"{secret}\"\npoll_every = \"1s\"\n",
            bao.addr_a
        )
    };
    let cfg_a_app =
        cfg_a[..cfg_a.find("\n[vault]").unwrap()].to_string() + &approle_section(&role, &secret);
    let metrics_a = format!("127.0.0.1:{}", t.port(6));
    let cfg_a_app = cfg_a_app + &format!("\n[metrics]\nlisten = \"{metrics_a}\"\n");
    let a = t.start_sitewire(Site::A, "a", &cfg_a_app);
    let b = t.start_sitewire(Site::B, "b", &cfg_b);
    let (if_a, if_b) = (t.ifname("ia"), t.ifname("ib"));
    assert!(
        wait_tunnel_up(&if_a, "to-b", Duration::from_secs(15)),
        "{}",
        a.log()
    );
    assert!(t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_secs(10)));

    // The least-privilege policy is enough to rotate.
    let before = wg_public_key(&t, &if_a);
    let (ok, out) = rotate_key(&t, &t.ns_a, &if_a);
    assert!(
        ok && out.contains("stored and published"),
        "{out}\n{}",
        a.log_tail(30)
    );
    assert!(
        wait_until(Duration::from_secs(15), Duration::from_millis(200), || {
            wg_public_key(&t, &if_a) != before && wg_peers(&t, &if_b) == wg_public_key(&t, &if_a)
        }),
        "rotation not applied:\n{}",
        a.log_tail(40)
    );
    // Run past the token's 12 s TTL and 30 s max TTL: renewed, then logged in again.
    std::thread::sleep(Duration::from_secs(35));
    let m = t.exec_ok(
        &t.ns_a,
        &["curl", "-s", &format!("http://{metrics_a}/metrics")],
    );
    let sample = |op: &str| {
        m.lines()
            .find(|l| {
                l.starts_with("sitewire_vault_requests_total")
                    && l.contains(&format!("op=\"{op}\""))
                    && l.contains("result=\"ok\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    eprintln!("renewals {} logins {}", sample("renew"), sample("login"));
    assert!(sample("renew") >= 1.0, "no token renewal:\n{m}");
    assert!(
        sample("login") >= 2.0,
        "no re-login after the max TTL:\n{m}"
    );
    assert_eq!(
        metric(&t, &t.ns_a, &metrics_a, "sitewire_vault_up"),
        Some(1.0)
    );
    let block = t.ping(&t.ns_a, t.host_a, t.host_b, 50, 0.01);
    assert_eq!(block.received, block.sent);
    a.stop(Duration::from_secs(10));

    // A policy without write access: the daemon runs, rotation fails clearly, and the
    // tunnel keeps its key.
    let read_only = "path \"secret/data/sitewire/sites/*\" {\n  capabilities = [\"read\"]\n}\n\
                     path \"secret/metadata/sitewire/sites/*\" {\n  capabilities = [\"read\"]\n}\n";
    let (role, secret) = approle(&t, &bao, "sw-a-ro", read_only);
    // (Scheduled rotation too: it fails once, then waits a minute before trying again.)
    let cfg_ro = cfg_a[..cfg_a.find("\n[vault]").unwrap()].to_string()
        + &approle_section(&role, &secret)
        + "rotate_every = \"1s\"\n";
    let a2 = t.start_sitewire(Site::A, "a-ro", &cfg_ro);
    assert!(
        wait_tunnel_up(&if_a, "to-b", Duration::from_secs(15)),
        "{}",
        a2.log()
    );
    let key = wg_public_key(&t, &if_a);
    let (ok, out) = rotate_key(&t, &t.ns_a, &if_a);
    eprintln!("read-only rotate: {out}");
    assert!(!ok, "{out}");
    assert!(
        out.contains("permission denied") && out.contains("current key stays in use"),
        "{out}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(wg_public_key(&t, &if_a), key);
    let scheduled_failures = count(&a2.log(), "scheduled key rotation failed");
    assert_eq!(scheduled_failures, 1, "{}", a2.log_tail(40));
    assert!(a2.log().contains("retry_in=60s"), "{}", a2.log_tail(40));
    assert!(t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_secs(10)));
    let block = t.ping(&t.ns_a, t.host_a, t.host_b, 50, 0.01);
    assert_eq!(block.received, block.sent);

    let mut secrets = bao.private_versions(&t, "a");
    secrets.extend(bao.private_versions(&t, "b"));
    secrets.push(bao.token.clone());
    secrets.push(std::fs::read_to_string(&secret).unwrap().trim().to_string());
    assert_no_secrets(&[a.log(), a2.log(), b.log(), out], &secrets);
}

/// Publishing is a check-and-set write on what was read. Two daemons sharing a site key can
/// each store a version (the second on top of the first) and publish in either order; the
/// one that publishes last must not put the older version back. Driven here with the daemon's
/// own Vault client against OpenBao, in the namespace OpenBao listens in.
#[test]
fn a_publication_never_goes_backwards() {
    if !prereq(&["bao"]) {
        return;
    }
    let t = Topo::new("vpub");
    let bao = start_bao(&t);
    let text = site_config(
        &t,
        Site::A,
        t.port(0),
        &vault_section(&bao.addr_a, &bao.token_file),
    );
    let dir = t.tempdir();
    let cfg = sitewire::config::Config::parse(&text, &dir).expect("config");
    let ns_path = format!("/run/netns/{}", t.ns_a);
    let results = std::thread::spawn(move || {
        let f = std::fs::File::open(&ns_path).expect("open netns");
        // SAFETY: setns on this thread only, with a namespace fd we hold open.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let v = sitewire::vault::Vault::connect(cfg.vault.as_ref())
                .await
                .expect("connect");
            let path = v.site_path("race", "public");
            let publication = |version| sitewire::vault::Published {
                key: sitewire::keys::PrivateKey::generate().public_key(),
                version,
                not_before: 0,
            };
            let (p7, p6, p8) = (publication(7), publication(6), publication(8));
            let mut out = Vec::new();
            for p in [p7, p6, p8, p8] {
                let r = v.publish(&path, &p).await.expect("publish");
                out.push((p, r, v.read_published(&path).await.expect("read")));
            }
            out
        })
    })
    .join()
    .expect("vault thread");
    let [(p7, r7, now7), (_, r6, now6), (p8, r8, now8), (_, again, now_again)] =
        <[_; 4]>::try_from(results).expect("four publications");
    // Into an empty path, then on top of an older version: written.
    assert_eq!((r7, now7), (None, p7));
    assert_eq!((r8, now8), (None, p8));
    // An older version after a newer one: not written, the newer one is returned.
    assert_eq!((r6, now6), (Some(p7), p7));
    // The same version again is not "newer": written (a retried publication).
    assert_eq!((again, now_again), (None, p8));
}

#[test]
fn two_daemons_race_a_rotation() {
    if !prereq(&["ping", "bao", "wg"]) {
        return;
    }
    let t = Topo::new("vcas");
    let bao = start_bao(&t);
    let port = t.port(0);
    let (cfg_a, cfg_b) = init_sites(
        &t,
        &bao,
        port,
        "poll_every = \"1s\"\n",
        "poll_every = \"1s\"\n",
    );
    let a = t.start_sitewire(Site::A, "a", &cfg_a);
    let b = t.start_sitewire(Site::B, "b", &cfg_b);
    let (if_a, if_b) = (t.ifname("ia"), t.ifname("ib"));
    assert!(wait_tunnel_up(&if_a, "to-b", Duration::from_secs(15)));
    // A second daemon for site a (same Vault paths), in namespace b with its own
    // interface, port and an unused peer endpoint and subnet.
    let if_c = t.ifname("ic");
    let o = t.overlay_b.octets();
    let cfg_c = SiteConfig {
        name: "a",
        iface: &if_c,
        port: t.port(1),
        key_path: "vault:sitewire/sites/a/private",
        tunnel: "to-b",
        peer_public: "vault:sitewire/sites/b/public",
        endpoints: &[format!("127.0.0.1:{}", t.port(9))],
        local: &format!("{}.{}.{}.128/25", o[0], o[1], o[2]),
        remote: &format!("{}.{}.{}.0/25", o[0], o[1], o[2]),
        extra: "",
    }
    .render()
        + &vault_section(&bao.addr_b, &bao.token_file)
        + "poll_every = \"1s\"\n";
    let c = t.start_sitewire(Site::B, "a-second", &cfg_c);

    let mut conflicts = 0;
    for round in 0..3 {
        let v0 = bao.private_versions(&t, "a").len();
        // Both daemons asked at the same instant over their control sockets.
        let barrier = std::sync::Barrier::new(2);
        let answers: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = [if_a.clone(), if_c.clone()]
                .into_iter()
                .map(|iface| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        use std::io::{BufRead, Write};
                        let path = format!("/run/sitewire/{iface}.sock");
                        let mut sock = std::os::unix::net::UnixStream::connect(&path).unwrap();
                        barrier.wait();
                        sock.write_all(b"{\"cmd\":\"rotate_key\"}\n").unwrap();
                        let mut line = String::new();
                        std::io::BufReader::new(sock).read_line(&mut line).unwrap();
                        line
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        eprintln!("round {round}: {answers:?}");
        let won = answers
            .iter()
            .filter(|a| a.contains("stored and published"))
            .count();
        let lost = answers
            .iter()
            .filter(|a| a.contains("another daemon"))
            .count();
        assert!(won >= 1, "{answers:?}");
        if won == 1 && lost == 1 {
            conflicts += 1;
            // One write won: exactly one new version.
            assert_eq!(bao.private_versions(&t, "a").len(), v0 + 1);
        }
        // Both daemons end on the newest stored key, which is the published one.
        let published = bao.published(&t, "a");
        assert!(
            wait_until(Duration::from_secs(15), Duration::from_millis(200), || {
                wg_public_key(&t, &if_a) == published && wg_public_key(&t, &if_c) == published
            }),
            "daemons not on the published key:\n{}\n{}",
            a.log_tail(30),
            c.log_tail(30)
        );
        let versions = bao.private_versions(&t, "a");
        let newest = versions.last().unwrap();
        let derived = t.exec_ok(
            &t.ns_a,
            &["sh", "-c", &format!("echo {newest} | wg pubkey")],
        );
        assert_eq!(
            derived.trim(),
            published,
            "published key is not the newest version's"
        );
        assert_eq!(wg_peers(&t, &if_b), published);
    }
    eprintln!("check-and-set conflicts: {conflicts} of 3 rounds");
    assert!(conflicts >= 1, "the daemons never raced");
    assert!(t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_secs(10)));
    let block = t.ping(&t.ns_a, t.host_a, t.host_b, 50, 0.01);
    assert_eq!(block.received, block.sent);
    let mut secrets = bao.private_versions(&t, "a");
    secrets.push(bao.token.clone());
    assert_no_secrets(&[a.log(), b.log(), c.log()], &secrets);
}

#[test]
fn ike_keyed_rotation_is_announced_over_ike_without_loss() {
    if !prereq(&["ping", "bao", "wg"]) {
        return;
    }
    let t = Topo::new("vrotike");
    let bao = start_bao(&t);
    let port = t.port(0);
    let (cfg_a, cfg_b) = init_sites(
        &t,
        &bao,
        port,
        "rotate_every = \"6s\"\npoll_every = \"1s\"\n",
        "poll_every = \"1s\"\n",
    );
    // Both ends keyed by IKE: the identities and the IKE PSK come from the static keys.
    let ike = |cfg: &str, tunnel: &str| {
        cfg.replace(
            &format!("name = \"{tunnel}\"\n"),
            &format!("name = \"{tunnel}\"\nkeying = \"ike\"\nrekey_interval = \"1m\"\n"),
        )
    };
    let (cfg_a, cfg_b) = (ike(&cfg_a, "to-b"), ike(&cfg_b, "to-a"));
    assert!(cfg_a.contains("keying = \"ike\"") && cfg_b.contains("keying = \"ike\""));
    let a = t.start_sitewire(Site::A, "a", &cfg_a);
    let b = t.start_sitewire(Site::B, "b", &cfg_b);
    let (if_a, if_b) = (t.ifname("ia"), t.ifname("ib"));
    assert!(
        wait_tunnel_up(&if_a, "to-b", Duration::from_secs(15)),
        "{}\n{}",
        a.log(),
        b.log()
    );
    assert!(t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_secs(10)));
    let first_key = wg_public_key(&t, &if_a);
    let (sent, received, rate) = ping_flood(&t, 30);
    std::thread::sleep(Duration::from_secs(3));
    let (log_a, log_b) = (a.log(), b.log());
    let rotations = count(&log_a, "site key switched");
    let announced = count(&log_b, "peer announced its next static key over IKE");
    let adopted = count(&log_b, "peer static key switched (announced over IKE)");
    eprintln!(
        "IKE-keyed: rotations {rotations}, announced {announced}, adopted {adopted}, pings \
         {received}/{sent} ({rate:.0}/s)"
    );
    assert!(rate >= 90.0, "only {rate:.0} pings/s");
    assert!(rotations >= 3, "only {rotations} rotations:\n{log_a}");
    assert!(adopted >= 3, "b adopted {adopted}:\n{log_b}");
    assert_eq!(received, sent, "lost {} pings", sent - received);
    // Both sides run on the newest key and the IKE SA is still up.
    let mut now_key = String::new();
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            now_key = wg_public_key(&t, &if_a);
            wg_peers(&t, &if_b) == now_key
        }),
        "b never used a's new key"
    );
    assert_ne!(now_key, first_key);
    assert_eq!(
        support::site::tunnel_status(&if_a, "to-b")["ike"]["state"],
        "established"
    );
    let mut secrets = bao.private_versions(&t, "a");
    secrets.extend(bao.private_versions(&t, "b"));
    secrets.push(bao.token.clone());
    assert_no_secrets(&[log_a, log_b], &secrets);
}
