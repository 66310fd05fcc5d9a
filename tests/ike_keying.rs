//! WireGuard tunnels keyed by IKE between two sitewire sites, in network namespaces:
//! rekeys without loss, dead-peer detection, restart, selector mismatch.

mod support;

use std::time::{Duration, Instant};

use support::site::{tunnel_status, wait_tunnel_up, SitePair};
use support::{prereq, wait_until, Proc, Site, Topo};

struct Pair {
    t: Topo,
    a: Proc,
    b: Proc,
    if_a: String,
    if_b: String,
    cfg_b: String,
}

const IKE: &str = "keying = \"ike\"\nrekey_interval = \"5s\"\ndpd = { interval = \"1s\", timeout = \"3s\", action = \"restart\" }";

fn pair(tag: &str, b_local: Option<&str>) -> Pair {
    let t = Topo::new(tag);
    let (if_a, if_b) = (t.ifname("ia"), t.ifname("ib"));
    let (ka, kb) = (t.sitewire_key("a"), t.sitewire_key("b"));
    let (cfg_a, cfg_b) = SitePair {
        local_b: b_local,
        extra_a: IKE,
        extra_b: IKE,
        ..SitePair::new(&if_a, &if_b, &ka, &kb, t.port(0))
    }
    .render(&t);
    let b = t.start_sitewire(Site::B, "b", &cfg_b);
    let a = t.start_sitewire(Site::A, "a", &cfg_a);
    Pair {
        t,
        a,
        b,
        if_a,
        if_b,
        cfg_b,
    }
}

fn ike(iface: &str, tunnel: &str) -> serde_json::Value {
    tunnel_status(iface, tunnel)["ike"].clone()
}

#[test]
fn rekeys_every_five_seconds_without_losing_a_packet() {
    if !prereq(&["ping"]) {
        return;
    }
    let p = pair("ike-rekey", None);
    let t = &p.t;
    assert!(
        wait_tunnel_up(&p.if_a, "to-b", Duration::from_secs(15)),
        "{}\n{}",
        p.a.log(),
        p.b.log()
    );
    assert!(t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_secs(5)));
    // The IKE view is published once a second.
    assert!(wait_until(
        Duration::from_secs(3),
        Duration::from_millis(100),
        || ike(&p.if_a, "to-b")["child_sas"] == 1
    ));
    let st = ike(&p.if_a, "to-b");
    assert_eq!(st["state"], "established", "{st}");
    assert_eq!(st["suite"], "chacha20poly1305-prfsha256-x25519");
    assert_eq!(st["pq"], true, "hybrid ML-KEM-768 is on by default: {st}");
    assert_eq!(st["local_ts"][0], t.subnet_a);
    assert_eq!(st["remote_ts"][0], t.subnet_b);
    // Both sides count each rekey; site a's count is the number of rekeys.
    let before = st["rekeys"].as_u64().unwrap();
    // 100 pings/s for 60 s.
    // (In blocks of 1000, so a slow machine does not trip the per-command time limit.)
    let (mut sent, mut received) = (0, 0);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        // iputils ping does not keep its -i exactly here (about 67/s at 0.01, 143/s at 0.007):
        // 0.007 gives at least the 100 pings/s the test wants; the rate is checked below.
        let block = t.ping(&t.ns_a, t.host_a, t.host_b, 1000, 0.007);
        sent += block.sent;
        received += block.received;
    }
    let after = ike(&p.if_a, "to-b")["rekeys"].as_u64().unwrap();
    let rate = f64::from(sent) / started.elapsed().as_secs_f64();
    eprintln!(
        "{received}/{sent} pings answered ({rate:.0}/s); rekeys seen {}",
        after - before
    );
    assert!(rate >= 90.0, "only {rate:.0} pings/s");
    assert!(
        after - before >= 10,
        "only {} rekeys in 60 s",
        after - before
    );
    assert_eq!(
        received,
        sent,
        "lost {} of {sent} pings across rekeys",
        sent - received
    );
    // The WireGuard view follows: the PSK is installed (wg show hides it).
    let dump = t.exec_ok(&t.ns_a, &["wg", "show", &p.if_a, "dump"]);
    let psk_col = dump
        .lines()
        .nth(1)
        .and_then(|l| l.split('\t').nth(1))
        .unwrap_or("");
    assert_eq!(psk_col.len(), 44, "no PSK in wg show: {dump}");
    // `sitewire rotate` forces one more.
    let out = support::host_exec_ok(
        &[
            support::sitewire_bin(),
            "rotate",
            "--tunnel",
            "to-b",
            "--interface",
            &p.if_a,
        ],
        None,
    );
    assert!(out.contains("rekey started"), "{out}");
    let n = ike(&p.if_a, "to-b")["rekeys"].as_u64().unwrap();
    assert!(wait_until(
        Duration::from_secs(3),
        Duration::from_millis(50),
        || ike(&p.if_a, "to-b")["rekeys"].as_u64().unwrap() > n
    ));
}

#[test]
fn frozen_peer_is_declared_dead_and_returns() {
    if !prereq(&["ping"]) {
        return;
    }
    let p = pair("ike-dpd", None);
    let t = &p.t;
    assert!(
        wait_tunnel_up(&p.if_a, "to-b", Duration::from_secs(15)),
        "{}",
        p.a.log()
    );
    assert!(t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_secs(5)));
    let dead_before = tunnel_status(&p.if_a, "to-b")["dpd_dead"]
        .as_u64()
        .unwrap_or(0);
    p.b.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let detected = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        tunnel_status(&p.if_a, "to-b")["dpd_dead"]
            .as_u64()
            .unwrap_or(0)
            > dead_before
    });
    let took = frozen.elapsed();
    assert!(detected, "no dead-peer detection:\n{}", p.a.log());
    eprintln!("dead peer detected after {took:?} (timeout 3 s)");
    // DPD timeout 3 s, plus up to the 1 s interval before the first check.
    assert!(took <= Duration::from_secs(3 + 1 + 1), "took {took:?}");
    p.b.signal(libc::SIGCONT);
    let back = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), Duration::from_millis(100), || t
            .wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_millis(300))),
        "tunnel did not return after SIGCONT:\n{}",
        p.a.log()
    );
    eprintln!("tunnel back {:?} after SIGCONT", back.elapsed());
}

#[test]
fn restarted_peer_comes_back_within_the_dpd_timeout() {
    if !prereq(&["ping"]) {
        return;
    }
    let p = pair("ike-restart", None);
    let t = &p.t;
    assert!(
        wait_tunnel_up(&p.if_a, "to-b", Duration::from_secs(15)),
        "{}",
        p.a.log()
    );
    assert!(t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_secs(5)));
    p.b.signal(libc::SIGKILL);
    p.b.wait_exit(Duration::from_secs(5));
    let restarted = Instant::now();
    let _b2 = t.start_sitewire(Site::B, "b2", &p.cfg_b);
    let ok = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_millis(300))
    });
    assert!(ok, "tunnel did not return:\n{}", p.a.log());
    let took = restarted.elapsed();
    eprintln!("tunnel back {took:?} after the restart");
    assert!(took <= Duration::from_secs(3 + 2), "took {took:?}");
    let _ = &p.if_b;
}

#[test]
fn selector_mismatch_is_named_on_both_sides() {
    if !prereq(&[]) {
        return;
    }
    // Site b claims a local subnet site a does not route to it.
    let p = pair("ike-ts", Some("10.199.77.0/24"));
    let ok = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        ike(&p.if_a, "to-b")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("traffic selectors"))
            && ike(&p.if_b, "to-a")["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("traffic selectors"))
    });
    assert!(
        ok,
        "a: {}\nb: {}\n{}",
        ike(&p.if_a, "to-b"),
        ike(&p.if_b, "to-a"),
        p.a.log()
    );
    let err = ike(&p.if_a, "to-b")["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&p.t.subnet_b) || err.contains("10.199.77.0/24"),
        "{err}"
    );
    assert_ne!(tunnel_status(&p.if_a, "to-b")["state"], "up");
}
