//! IPsec tunnels (`protocol = "ipsec"`) between two sitewire sites in network namespaces:
//! IKE on 500 floating to 4500, ESP in UDP on 4500, rekeys without loss, clear errors for
//! a wrong PSK and for selectors that do not match.

mod metrics_support;
mod support;

use std::time::{Duration, Instant};

use support::site::{tunnel_status, wait_tunnel_up, IpsecSite};
use support::{prereq, wait_until, write_file_0600, Proc, Site, Topo};

struct Pair {
    t: Topo,
    a: Proc,
    b: Proc,
    if_a: String,
    if_b: String,
}

/// Site a initiates, site b waits (`start_action = "none"`).
fn pair(tag: &str, extra: &str, b_psk_differs: bool, b_local: Option<&str>) -> Pair {
    let t = Topo::new(tag);
    let (if_a, if_b) = (t.ifname("ia"), t.ifname("ib"));
    let (ka, kb) = (t.sitewire_key("a"), t.sitewire_key("b"));
    let psk_a = t.tempdir().join("a.psk");
    let psk_b = t.tempdir().join("b.psk");
    let psk = "c2l0ZXdpcmUtaXBzZWMtdGVzdC1wc2stMzItYnl0ZXM=\n";
    write_file_0600(&psk_a, psk);
    write_file_0600(
        &psk_b,
        if b_psk_differs {
            "b3RoZXItcHNrLW90aGVyLXBzay1vdGhlci1wc2stMzI=\n"
        } else {
            psk
        },
    );
    let port = t.port(0);
    let cfg_a = IpsecSite {
        name: "a",
        iface: &if_a,
        port,
        key: &ka.path,
        psk: &psk_a.to_string_lossy(),
        endpoint: Some(t.underlay_b.to_string()),
        local: &t.subnet_a,
        remote: &t.subnet_b,
        local_id: "a.sitewire.test",
        remote_id: "b.sitewire.test",
        extra: &format!(
            "{extra}\n\n[metrics]\nlisten = \"{}:{}\"",
            t.underlay_a,
            t.port(1)
        ),
    }
    .render();
    let cfg_b = IpsecSite {
        name: "b",
        iface: &if_b,
        port,
        key: &kb.path,
        psk: &psk_b.to_string_lossy(),
        endpoint: None,
        local: b_local.unwrap_or(&t.subnet_b),
        remote: &t.subnet_a,
        local_id: "b.sitewire.test",
        remote_id: "a.sitewire.test",
        extra: &format!(
            "{}\nstart_action = \"none\"",
            extra
                .lines()
                .filter(|l| !l.starts_with("start_action"))
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
    .render();
    let b = t.start_sitewire(Site::B, "b", &cfg_b);
    let a = t.start_sitewire(Site::A, "a", &cfg_a);
    Pair {
        t,
        a,
        b,
        if_a,
        if_b,
    }
}

const FAST: &str =
    "rekey_interval = \"5s\"\ndpd = { interval = \"1s\", timeout = \"3s\", action = \"restart\" }";

#[test]
fn esp_tunnel_carries_traffic_and_rekeys_without_loss() {
    if !prereq(&["ping", "iperf3", "ss"]) {
        return;
    }
    let p = pair("ipsec-sw", FAST, false, None);
    let t = &p.t;
    assert!(
        wait_tunnel_up(&p.if_a, "hq", Duration::from_secs(15)),
        "{}\n{}",
        p.a.log(),
        p.b.log()
    );
    assert!(t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_secs(5)));
    assert!(t.wait_ping(&t.ns_b, t.host_b, t.host_a, Duration::from_secs(5)));
    // IKE floated: both sides talk from and to 4500, and the status says so.
    assert!(wait_until(
        Duration::from_secs(3),
        Duration::from_millis(100),
        || !tunnel_status(&p.if_a, "hq")["ike"]["spi_in"].is_null()
    ));
    let st = tunnel_status(&p.if_a, "hq");
    assert_eq!(st["protocol"], "ipsec", "{st}");
    assert_eq!(st["ike"]["state"], "established", "{st}");
    assert_eq!(st["ike"]["esp"], "aes256gcm16", "{st}");
    assert_eq!(st["ike"]["suite"], "aes256gcm16-prfsha256-x25519", "{st}");
    assert_eq!(st["ike"]["peer"], format!("{}:4500", t.underlay_b), "{st}");
    let socks = t.exec_ok(&t.ns_b, &["ss", "-uan"]);
    assert!(
        socks.contains(":500 ") && socks.contains(":4500 "),
        "{socks}"
    );

    // 100+ pings/s across several CHILD SA rekeys: nothing lost.
    let before = st["ike"]["rekeys"].as_u64().unwrap();
    let (mut sent, mut received) = (0, 0);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        let block = t.ping(&t.ns_a, t.host_a, t.host_b, 1000, 0.007);
        sent += block.sent;
        received += block.received;
    }
    let after = tunnel_status(&p.if_a, "hq")["ike"]["rekeys"]
        .as_u64()
        .unwrap();
    let rate = f64::from(sent) / started.elapsed().as_secs_f64();
    eprintln!(
        "{received}/{sent} pings answered ({rate:.0}/s), {} rekeys",
        after - before
    );
    assert!(rate >= 90.0, "only {rate:.0} pings/s");
    assert!(after - before >= 3, "only {} rekeys", after - before);
    assert_eq!(
        received,
        sent,
        "lost {} pings across rekeys",
        sent - received
    );

    // Throughput (reported, not asserted beyond "it moves").
    let r = t.iperf3_tcp(&t.ns_b, t.host_b, &t.ns_a, t.host_a, 5, 1, false);
    let mbps = r.bits_per_second / 1e6;
    eprintln!("iperf3 TCP over ESP: {mbps:.0} Mbit/s");
    assert!(mbps > 10.0, "{mbps} Mbit/s");
    // Counters agree: what a sent, b received (ESP datagrams).
    let (sa, sb) = (tunnel_status(&p.if_a, "hq"), tunnel_status(&p.if_b, "hq"));
    assert!(sa["tx_packets"].as_u64().unwrap() > 2000, "{sa}");
    assert!(sb["rx_packets"].as_u64().unwrap() > 2000, "{sb}");
    assert_eq!(sa["drops"].get("decrypt_failed"), None, "{sa}");
    assert_eq!(sb["drops"].get("decrypt_failed"), None, "{sb}");

    // The same metric families as WireGuard tunnels, so one dashboard shows both.
    let addr = format!("{}:{}", t.underlay_a, t.port(1));
    let (status, _, body) = metrics_support::http_get(&t.ns_a, &addr, "/metrics", None);
    assert_eq!(status, 200, "{body}");
    let samples = metrics_support::parse_samples(&body);
    let get = |k: &str| {
        *samples
            .get(k)
            .unwrap_or_else(|| panic!("no {k} in:\n{body}"))
    };
    assert_eq!(
        get("sitewire_tunnel_info{tunnel=\"hq\",protocol=\"ipsec\",keying=\"ike\"}"),
        1.0
    );
    assert_eq!(get("sitewire_tunnel_up{tunnel=\"hq\"}"), 1.0);
    assert!(get("sitewire_tunnel_rekeys_total{tunnel=\"hq\",result=\"success\"}") >= 3.0);
    assert!(get("sitewire_tunnel_tx_packets_total{tunnel=\"hq\"}") > 2000.0);
    assert!(get("sitewire_tunnel_rtt_seconds_count{tunnel=\"hq\",source=\"ike\"}") >= 1.0);
}

#[test]
fn wrong_psk_and_selector_mismatch_give_clear_errors() {
    if !prereq(&["ping"]) {
        return;
    }
    let p = pair("ipsec-psk", FAST, true, None);
    assert!(wait_until(
        Duration::from_secs(10),
        Duration::from_millis(200),
        || tunnel_status(&p.if_a, "hq")["ike"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("authentication failed"))
    ));
    assert_ne!(tunnel_status(&p.if_a, "hq")["state"], "up");
    assert!(p.b.log().contains("authentication failed"), "{}", p.b.log());
    drop(p);

    // b only offers a different subnet: nothing in common with what a asks for.
    let p = pair("ipsec-ts", FAST, false, Some("10.99.0.0/24"));
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
            tunnel_status(&p.if_a, "hq")["ike"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("traffic selectors do not match"))
        }),
        "{}",
        p.a.log()
    );
    assert_ne!(tunnel_status(&p.if_a, "hq")["state"], "up");
}

#[test]
fn trap_waits_for_traffic_and_reload_keeps_the_tunnel() {
    if !prereq(&["ping"]) {
        return;
    }
    let p = pair("ipsec-trap", "start_action = \"trap\"", false, None);
    let t = &p.t;
    // Nothing is negotiated until a packet wants the tunnel.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(tunnel_status(&p.if_a, "hq")["ike"]["state"], "idle");
    assert_ne!(tunnel_status(&p.if_a, "hq")["state"], "up");
    assert!(
        t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_secs(10)),
        "{}",
        p.a.log()
    );
    assert_eq!(tunnel_status(&p.if_a, "hq")["state"], "up");
    // A reload that leaves the IPsec tunnel alone keeps it (and its SAs).
    assert!(wait_until(
        Duration::from_secs(3),
        Duration::from_millis(100),
        || !tunnel_status(&p.if_a, "hq")["ike"]["spi_in"].is_null()
    ));
    let spi = tunnel_status(&p.if_a, "hq")["ike"]["spi_in"].clone();
    let out = support::host_exec_ok(
        &[support::sitewire_bin(), "reload", "--interface", &p.if_a],
        None,
    );
    assert!(out.contains("unchanged") || out.contains("hq"), "{out}");
    let r = t.ping(&t.ns_a, t.host_a, t.host_b, 20, 0.05);
    assert_eq!(r.received, r.sent);
    assert_eq!(tunnel_status(&p.if_a, "hq")["ike"]["spi_in"], spi);
    let _ = &p.if_b;
}
