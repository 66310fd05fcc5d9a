//! Passive dead-peer detection on a static-keyed tunnel, against wireguard-go.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::site::{tunnel_status, wait_tunnel_up, SiteConfig};
use support::wg::wg_genkey;
use support::{prereq, wait_until, Site, Topo};

#[test]
fn silent_static_peer_is_declared_dead_and_comes_back() {
    if !prereq(&["wireguard-go", "wg", "ping"]) {
        return;
    }
    let t = Topo::new("pdpd");
    let (sw_if, wg_if) = (t.ifname("sw"), t.ifname("wg"));
    let key = t.sitewire_key("sw");
    let (wg_priv, wg_pub) = wg_genkey();
    let port = t.port(0);
    let eps = vec![format!("{}:{port}", t.underlay_b)];
    let cfg = SiteConfig {
        name: "a",
        iface: &sw_if,
        port,
        key_path: &key.path,
        tunnel: "peer",
        peer_public: &wg_pub,
        endpoints: &eps,
        local: &t.subnet_a,
        remote: &t.subnet_b,
        extra: "dpd = { interval = \"1s\", timeout = \"3s\", action = \"restart\" }",
    }
    .render();
    let wg = t.start_wireguard_go(
        &t.ns_b,
        &wg_if,
        port,
        &wg_priv,
        &key.public,
        None::<SocketAddr>,
        &[&t.subnet_a],
        None,
    );
    let sw = t.start_sitewire(Site::A, "sw", &cfg);
    assert!(
        wait_tunnel_up(&sw_if, "peer", Duration::from_secs(10)),
        "{}",
        sw.log()
    );
    assert!(t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_secs(5)));

    wg.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    // Traffic towards the silent peer: pings that go unanswered.
    let dead = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let _ = t.exec_timeout(
            &t.ns_a,
            &[
                "ping",
                "-c",
                "1",
                "-W",
                "1",
                "-I",
                &t.host_a.to_string(),
                &t.host_b.to_string(),
            ],
            Duration::from_secs(3),
        );
        tunnel_status(&sw_if, "peer")["dpd_dead"]
            .as_u64()
            .unwrap_or(0)
            > 0
    });
    let took = frozen.elapsed();
    assert!(dead, "no dead-peer event:\n{}", sw.log());
    eprintln!("passive DPD: peer declared dead {took:?} after it went silent (min 15 s)");
    assert!(
        took >= Duration::from_secs(14) && took <= Duration::from_secs(20),
        "took {took:?}"
    );
    assert_eq!(tunnel_status(&sw_if, "peer")["state"], "down");
    assert!(sw.log().contains("peer dead"), "{}", sw.log());

    wg.signal(libc::SIGCONT);
    assert!(
        wait_until(Duration::from_secs(20), Duration::from_millis(200), || t
            .wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_millis(500))),
        "no recovery:\n{}",
        sw.log()
    );
    assert!(wait_until(
        Duration::from_secs(3),
        Duration::from_millis(100),
        || tunnel_status(&sw_if, "peer")["state"] == "up"
    ));
}
