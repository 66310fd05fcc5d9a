//! Interop with a WireGuard implementation not written here: Debian's wireguard-go,
//! configured with `wg`. Also checks what `wg show` reads from sitewire's UAPI socket.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::site::{tunnel_status, wait_tunnel_up, SiteConfig};
use support::wg::{parse_wg_dump, wg_genkey};
use support::{prereq, wait_until, Proc, Site, Topo};

struct Interop {
    t: Topo,
    sw: Proc,
    _wg: Proc,
    sw_if: String,
    wg_if: String,
    sw_pub: String,
    wg_pub: String,
}

/// sitewire in namespace a, wireguard-go in namespace b. `sitewire_initiates` decides
/// which side knows the other's endpoint.
fn setup(tag: &str, sitewire_initiates: bool) -> Interop {
    let t = Topo::new(tag);
    let (sw_if, wg_if) = (t.ifname("sw"), t.ifname("wg"));
    let key = t.sitewire_key("sw");
    let (wg_priv, wg_pub) = wg_genkey();
    let port = t.port(0);
    let sw_eps = if sitewire_initiates {
        vec![format!("{}:{port}", t.underlay_b)]
    } else {
        vec![]
    };
    let cfg = SiteConfig {
        name: "a",
        iface: &sw_if,
        port,
        key_path: &key.path,
        tunnel: "wggo",
        peer_public: &wg_pub,
        endpoints: &sw_eps,
        local: &t.subnet_a,
        remote: &t.subnet_b,
        extra: "",
    }
    .render();
    let wg_ep = (!sitewire_initiates).then(|| SocketAddr::from((t.underlay_a, port)));
    let wg = t.start_wireguard_go(
        &t.ns_b,
        &wg_if,
        port,
        &wg_priv,
        &key.public,
        wg_ep,
        &[&t.subnet_a],
        None,
    );
    let sw = t.start_sitewire(Site::A, "sw", &cfg);
    Interop {
        sw_pub: key.public,
        t,
        sw,
        _wg: wg,
        sw_if,
        wg_if,
        wg_pub,
    }
}

fn traffic_both_ways(i: &Interop, first_from_b: bool) {
    let t = &i.t;
    if first_from_b {
        assert!(
            t.wait_ping(&t.ns_b, t.host_b, t.host_a, Duration::from_secs(10)),
            "wireguard-go could not reach sitewire:\n{}",
            i.sw.log()
        );
    } else {
        assert!(
            wait_tunnel_up(&i.sw_if, "wggo", Duration::from_secs(10)),
            "handshake with wireguard-go failed:\n{}",
            i.sw.log()
        );
    }
    let ab = t.ping(&t.ns_a, t.host_a, t.host_b, 30, 0.02);
    assert_eq!(ab.received, 30, "sitewire -> wireguard-go: {ab:?}");
    let ba = t.ping(&t.ns_b, t.host_b, t.host_a, 30, 0.02);
    assert_eq!(ba.received, 30, "wireguard-go -> sitewire: {ba:?}");
    let fwd = t.iperf3_tcp(&t.ns_b, t.host_b, &t.ns_a, t.host_a, 2, 1, false);
    let rev = t.iperf3_tcp(&t.ns_b, t.host_b, &t.ns_a, t.host_a, 2, 1, true);
    assert!(
        fwd.bytes_received > 1_000_000,
        "TCP sitewire -> wireguard-go: {fwd:?}"
    );
    assert!(
        rev.bytes_received > 1_000_000,
        "TCP wireguard-go -> sitewire: {rev:?}"
    );
    eprintln!(
        "TCP sitewire->wireguard-go {:.0} Mbit/s, wireguard-go->sitewire {:.0} Mbit/s",
        fwd.bits_per_second / 1e6,
        rev.bits_per_second / 1e6
    );
}

#[test]
fn sitewire_initiates_to_wireguard_go() {
    if !prereq(&["wireguard-go", "wg", "ping", "iperf3"]) {
        return;
    }
    let i = setup("wgo-sw-init", true);
    traffic_both_ways(&i, false);
}

#[test]
fn wireguard_go_initiates_to_sitewire() {
    if !prereq(&["wireguard-go", "wg", "ping", "iperf3"]) {
        return;
    }
    let i = setup("wgo-wg-init", false);
    traffic_both_ways(&i, true);
    // sitewire learned wireguard-go's endpoint from its handshake.
    let st = tunnel_status(&i.sw_if, "wggo");
    assert_eq!(
        st["endpoint"],
        format!("{}:{}", i.t.underlay_b, i.t.port(0))
    );
}

#[test]
fn wg_show_reads_sitewire() {
    if !prereq(&["wireguard-go", "wg", "ping"]) {
        return;
    }
    let i = setup("wgo-show", true);
    let t = &i.t;
    assert!(
        wait_tunnel_up(&i.sw_if, "wggo", Duration::from_secs(10)),
        "{}",
        i.sw.log()
    );
    let ping = t.ping(&t.ns_a, t.host_a, t.host_b, 20, 0.02);
    assert_eq!(ping.received, 20);

    // Counters settle once the pings are answered; no keepalives are configured.
    std::thread::sleep(Duration::from_millis(300));
    let dump = t.exec_ok(&t.ns_a, &["wg", "show", &i.sw_if, "dump"]);
    let iface: Vec<&str> = dump.lines().next().unwrap().split('\t').collect();
    assert_eq!(iface[1], i.sw_pub, "interface public key: {dump}");
    assert_eq!(iface[2], t.port(0).to_string(), "listen port: {dump}");
    let peers = parse_wg_dump(&dump);
    assert_eq!(peers.len(), 1, "{dump}");
    let sw = &peers[0];
    assert_eq!(sw.public_key, i.wg_pub);
    assert_eq!(
        sw.endpoint.as_deref(),
        Some(format!("{}:{}", t.underlay_b, t.port(0)).as_str())
    );
    assert_eq!(sw.allowed_ips, vec![t.subnet_b.clone()]);

    // The latest handshake is a Unix timestamp, and agrees with wireguard-go's.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        sw.latest_handshake <= now && now - sw.latest_handshake < 60,
        "latest handshake {} is not a recent Unix time (now {now})",
        sw.latest_handshake
    );
    let wg = &t.wg_dump(&t.ns_b, &i.wg_if)[0];
    assert!(
        sw.latest_handshake.abs_diff(wg.latest_handshake) <= 2,
        "sitewire says {} wireguard-go says {}",
        sw.latest_handshake,
        wg.latest_handshake
    );
    // What one side sent, the other received (same wire-byte accounting as wg).
    assert!(sw.tx_bytes > 20 * 100 && sw.rx_bytes > 20 * 100, "{sw:?}");
    assert_eq!(sw.tx_bytes, wg.rx_bytes, "sitewire tx vs wireguard-go rx");
    assert_eq!(sw.rx_bytes, wg.tx_bytes, "sitewire rx vs wireguard-go tx");

    let human = t.exec_ok(&t.ns_a, &["wg", "show", &i.sw_if]);
    assert!(human.contains("latest handshake:"), "{human}");
    assert!(
        !human.contains("years"),
        "handshake shown as an age, not a time: {human}"
    );
    // `wg set` is refused: the config file is the source of truth.
    let set = t.exec(&t.ns_a, &["wg", "set", &i.sw_if, "listen-port", "1"]);
    assert!(!set.status.success());
}

#[test]
fn inner_source_outside_remote_subnets_is_dropped() {
    if !prereq(&["wireguard-go", "wg", "ping"]) {
        return;
    }
    let i = setup("wgo-spoof", true);
    let t = &i.t;
    assert!(
        wait_tunnel_up(&i.sw_if, "wggo", Duration::from_secs(10)),
        "{}",
        i.sw.log()
    );
    // An address on b outside sitewire's remote_subnets for this tunnel.
    let o = t.host_b.octets();
    let rogue = Ipv4Addr::new(o[0], o[1], 9, 1);
    t.exec_ok(
        &t.ns_b,
        &["ip", "addr", "add", &format!("{rogue}/32"), "dev", "lo"],
    );
    let ping = t.ping(&t.ns_b, rogue, t.host_a, 5, 0.05);
    assert_eq!(ping.received, 0, "spoofed source got through: {ping:?}");
    let dropped = wait_until(Duration::from_secs(2), Duration::from_millis(100), || {
        tunnel_status(&i.sw_if, "wggo")["drops"]["source_not_allowed"]
            .as_u64()
            .unwrap_or(0)
            >= 5
    });
    assert!(dropped, "{}", tunnel_status(&i.sw_if, "wggo"));
    // Legitimate traffic still flows.
    assert_eq!(t.ping(&t.ns_b, t.host_b, t.host_a, 5, 0.05).received, 5);
}
