//! Two sitewire sites in network namespaces: traffic, status, clean shutdown, endpoint
//! failover, and the shipped example configs.

mod support;

use std::time::Duration;

use support::site::{status, tunnel_status, wait_tunnel_up, SiteConfig, SitePair};
use support::{prereq, wait_until, Site, Topo};

struct Pair {
    topo: Topo,
    a: support::Proc,
    b: support::Proc,
    if_a: String,
    if_b: String,
}

/// Builds site a's endpoint list from the topology.
type Endpoints<'a> = &'a dyn Fn(&Topo) -> Vec<String>;

/// Two sites; `a_endpoints` lets a test give site a extra (dead) endpoints first.
fn two_sites(tag: &str, a_endpoints: Option<Endpoints<'_>>, b_has_endpoint: bool) -> Pair {
    two_sites_env(tag, a_endpoints, b_has_endpoint, &[])
}

/// [`two_sites`] with extra environment variables for site b's daemon.
fn two_sites_env(
    tag: &str,
    a_endpoints: Option<Endpoints<'_>>,
    b_has_endpoint: bool,
    b_env: &[(&str, &str)],
) -> Pair {
    let topo = Topo::new(tag);
    let (if_a, if_b) = (topo.ifname("sa"), topo.ifname("sb"));
    let (ka, kb) = (topo.sitewire_key("a"), topo.sitewire_key("b"));
    let (cfg_a, cfg_b) = SitePair {
        endpoints_a: a_endpoints.map(|f| f(&topo)),
        endpoints_b: (!b_has_endpoint).then(Vec::new),
        ..SitePair::new(&if_a, &if_b, &ka, &kb, topo.port(0))
    }
    .render(&topo);
    let b = topo.start_sitewire_env(Site::B, "b", &cfg_b, b_env);
    let a = topo.start_sitewire(Site::A, "a", &cfg_a);
    Pair {
        topo,
        a,
        b,
        if_a,
        if_b,
    }
}

#[test]
fn two_sites_pass_ping_and_tcp_both_ways() {
    if !prereq(&["ping", "iperf3"]) {
        return;
    }
    let p = two_sites("sites", None, true);
    let t = &p.topo;
    assert!(
        wait_tunnel_up(&p.if_a, "to-b", Duration::from_secs(10)),
        "tunnel not up:\n{}\n{}",
        p.a.log(),
        p.b.log()
    );
    assert!(t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_secs(5)));
    let ping = t.ping(&t.ns_a, t.host_a, t.host_b, 50, 0.02);
    assert_eq!(ping.received, 50, "a->b ping lost packets: {ping:?}");
    let ping = t.ping(&t.ns_b, t.host_b, t.host_a, 50, 0.02);
    assert_eq!(ping.received, 50, "b->a ping lost packets: {ping:?}");

    let before = tunnel_status(&p.if_a, "to-b");
    let fwd = t.iperf3_tcp(&t.ns_b, t.host_b, &t.ns_a, t.host_a, 2, 1, false);
    let rev = t.iperf3_tcp(&t.ns_b, t.host_b, &t.ns_a, t.host_a, 2, 1, true);
    assert!(fwd.bytes_received > 1_000_000, "a->b TCP: {fwd:?}");
    assert!(rev.bytes_received > 1_000_000, "b->a TCP: {rev:?}");
    let after = tunnel_status(&p.if_a, "to-b");
    let tx = after["tx_bytes"].as_u64().unwrap() - before["tx_bytes"].as_u64().unwrap();
    let rx = after["rx_bytes"].as_u64().unwrap() - before["rx_bytes"].as_u64().unwrap();
    // Wire bytes carry each TCP payload plus IP/TCP headers and 32 bytes of WireGuard.
    assert!(
        tx >= fwd.bytes_received,
        "tx {tx} < TCP bytes {}",
        fwd.bytes_received
    );
    assert!(
        rx >= rev.bytes_received,
        "rx {rx} < TCP bytes {}",
        rev.bytes_received
    );
    assert!(
        tx < fwd.bytes_received * 2 + rev.bytes_received,
        "tx {tx} implausibly large"
    );

    // The journal says when the tunnel came up, and to where.
    let up = format!(
        "tunnel up: handshake complete tunnel=to-b endpoint={}:{}",
        t.underlay_b,
        t.port(0)
    );
    assert!(p.a.log().contains(&up), "no {up:?} in:\n{}", p.a.log());

    let st = status(&p.if_a);
    assert_eq!(st["site"], "a");
    let tun = &st["tunnels"][0];
    assert_eq!(tun["state"], "up");
    assert_eq!(tun["endpoint"], format!("{}:{}", t.underlay_b, t.port(0)));
    assert!(tun["last_handshake"].as_u64().unwrap() > 1_700_000_000);
    assert!(tun["rx_inner_packets"].as_u64().unwrap() >= 100);
    // Human output names the tunnel and its state.
    let human = support::host_exec_ok(
        &[support::sitewire_bin(), "status", "--interface", &p.if_a],
        None,
    );
    assert!(human.contains("to-b") && human.contains("up"), "{human}");

    // Graceful stop: exit 0, routes, TUN and sockets gone.
    let code = p.a.stop(Duration::from_secs(5));
    assert!(
        code.success(),
        "sitewire exited with {code}:\n{}",
        p.a.log()
    );
    let routes = t.exec_ok(&t.ns_a, &["ip", "route", "show", "proto", "77"]);
    assert!(routes.trim().is_empty(), "routes left behind: {routes}");
    let link = t.exec(&t.ns_a, &["ip", "link", "show", "dev", &p.if_a]);
    assert!(!link.status.success(), "TUN {} left behind", p.if_a);
    assert!(!std::path::Path::new(&format!("/run/sitewire/{}.sock", p.if_a)).exists());
    assert!(!std::path::Path::new(&format!("/var/run/wireguard/{}.sock", p.if_a)).exists());
    drop(p.b);
}

/// CPUs this process may run on, when they are 0..n-1 (as the daemon's lanes want).
fn contiguous_cpus() -> Option<usize> {
    // SAFETY: a zeroed cpu_set_t is an empty set; sched_getaffinity fills it and
    // CPU_COUNT/CPU_ISSET read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        let n = libc::CPU_COUNT(&set) as usize;
        (0..n).all(|c| libc::CPU_ISSET(c, &set)).then_some(n)
    }
}

/// Threads of `pid` named udp-lane-N.
fn lane_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .filter(|comm| comm.starts_with("udp-lane-"))
                .count()
        })
        .unwrap_or(0)
}

/// Per-CPU lanes: site a has them (a socket and a pinned thread per CPU, up to 8), site b
/// runs without (`SITEWIRE_CPU_LANES=off`, the environment form of `--cpu-lanes off`).
/// Pings sent from every CPU cross both ways; a TCP stream moves the datagrams to the
/// main socket, and pings after it (once the lanes have them back) cross again.
#[test]
fn a_site_with_cpu_lanes_and_one_without_carry_pings_from_every_cpu_and_a_stream() {
    if !prereq(&["ping", "iperf3", "taskset"]) {
        return;
    }
    let p = two_sites_env("lanes", None, true, &[("SITEWIRE_CPU_LANES", "off")]);
    let (a, b) = (&p.a, &p.b);
    assert!(
        wait_tunnel_up(&p.if_a, "to-b", Duration::from_secs(10)),
        "tunnel not up:\n{}\n{}",
        a.log(),
        b.log()
    );
    let cpus = contiguous_cpus().unwrap_or(1);
    let expected = if (2..=8).contains(&cpus) { cpus } else { 0 };
    assert_eq!(
        lane_threads(a.pid),
        expected,
        "site a's lanes on {cpus} CPUs"
    );
    assert_eq!(
        lane_threads(b.pid),
        0,
        "site b's lanes with SITEWIRE_CPU_LANES=off"
    );

    let t = &p.topo;
    assert!(t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_secs(5)));
    let (src_a, dst_b) = (t.host_a.to_string(), t.host_b.to_string());
    let (src_b, dst_a) = (t.host_b.to_string(), t.host_a.to_string());
    let pings_from_every_cpu = |when: &str| {
        for cpu in 0..cpus.min(8) {
            let cpu_s = cpu.to_string();
            for (ns, src, dst) in [(&t.ns_a, &src_a, &dst_b), (&t.ns_b, &src_b, &dst_a)] {
                let out = t.exec_ok(
                    ns,
                    &[
                        "taskset", "-c", &cpu_s, "ping", "-n", "-q", "-c", "20", "-i", "0.01",
                        "-W", "1", "-w", "10", "-I", src, dst,
                    ],
                );
                assert!(
                    out.contains(" 20 received"),
                    "{when}: pings from CPU {cpu} in {ns}:\n{out}\n{}\n{}",
                    a.log(),
                    b.log()
                );
            }
        }
    };
    pings_from_every_cpu("before the stream");
    let fwd = t.iperf3_tcp(&t.ns_b, t.host_b, &t.ns_a, t.host_a, 2, 1, false);
    let rev = t.iperf3_tcp(&t.ns_b, t.host_b, &t.ns_a, t.host_a, 2, 1, true);
    assert!(fwd.bytes_received > 1_000_000, "a->b TCP: {fwd:?}");
    assert!(rev.bytes_received > 1_000_000, "b->a TCP: {rev:?}");
    // The main reader hands the datagrams back after 50 ms without one.
    std::thread::sleep(Duration::from_millis(300));
    pings_from_every_cpu("after the stream");
    let st = tunnel_status(&p.if_a, "to-b");
    assert_eq!(st["state"], "up");
}

/// On a host with IPv6 on, an IPv4-only site's TUN gets no IPv6 at all: it comes up
/// only after IPv6 is off on it, so it sends no router solicitation or MLD report that the
/// site would have to drop (and count) for want of a route.
#[test]
fn ipv4_only_site_sends_no_ipv6_on_a_host_with_ipv6() {
    if !prereq(&["ping", "sysctl"]) {
        return;
    }
    let t = Topo::new("nov6");
    for ns in [&t.ns_a, &t.ns_b] {
        t.exec_ok(
            ns,
            &[
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=0",
                "net.ipv6.conf.default.disable_ipv6=0",
            ],
        );
    }
    let (if_a, if_b) = (t.ifname("na"), t.ifname("nb"));
    let (ka, kb) = (t.sitewire_key("a"), t.sitewire_key("b"));
    let (cfg_a, cfg_b) = SitePair::new(&if_a, &if_b, &ka, &kb, t.port(0)).render(&t);
    let _b = t.start_sitewire(Site::B, "b", &cfg_b);
    let a = t.start_sitewire(Site::A, "a", &cfg_a);
    assert!(
        wait_tunnel_up(&if_a, "to-b", Duration::from_secs(10)),
        "{}",
        a.log()
    );
    assert!(t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_secs(5)));
    // A fresh IPv6 link sends its MLD report at once and a router solicitation within
    // about a second of duplicate address detection.
    std::thread::sleep(Duration::from_secs(3));
    for (ns, iface) in [(&t.ns_a, &if_a), (&t.ns_b, &if_b)] {
        let v6 = t.exec_ok(ns, &["ip", "-6", "addr", "show", "dev", iface]);
        assert!(v6.trim().is_empty(), "{iface} has IPv6: {v6}");
        let drops = &status(iface)["drops"];
        assert!(
            drops.as_object().is_none_or(|d| d.is_empty()),
            "{iface} dropped packets: {drops}"
        );
    }
}

#[test]
fn responder_without_endpoint_learns_it() {
    if !prereq(&["ping"]) {
        return;
    }
    let p = two_sites("learn", None, false);
    let t = &p.topo;
    assert!(
        wait_tunnel_up(&p.if_b, "to-a", Duration::from_secs(10)),
        "{}",
        p.b.log()
    );
    let st = tunnel_status(&p.if_b, "to-a");
    assert_eq!(st["endpoint"], format!("{}:{}", t.underlay_a, t.port(0)));
    // b can now reach a on its own.
    assert!(t.wait_ping(&t.ns_b, t.host_b, t.host_a, Duration::from_secs(5)));
}

#[test]
fn dead_first_endpoint_fails_over_to_the_next() {
    if !prereq(&["ping"]) {
        return;
    }
    // The first endpoint is a port on the peer's address that nobody listens on.
    let eps = |t: &Topo| {
        vec![
            format!("{}:{}", t.underlay_b, t.port(1)),
            format!("{}:{}", t.underlay_b, t.port(0)),
        ]
    };
    let p = two_sites("failover", Some(&eps), false);
    let t = &p.topo;
    let started = std::time::Instant::now();
    let up = wait_tunnel_up(&p.if_a, "to-b", Duration::from_secs(30));
    assert!(up, "no failover within 30 s:\n{}", p.a.log());
    let took = started.elapsed();
    let st = tunnel_status(&p.if_a, "to-b");
    assert_eq!(
        st["endpoint"],
        format!("{}:{}", t.underlay_b, t.port(0)),
        "{st}"
    );
    assert!(p.a.log().contains("trying next endpoint"), "{}", p.a.log());
    eprintln!("failover took {took:?}");
    assert!(t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_secs(5)));
}

#[test]
fn example_configs_work_together() {
    if !prereq(&["ping"]) {
        return;
    }
    let t = Topo::new("examples");
    // The examples' own addresses, inside this test's namespaces only.
    t.exec_ok(
        &t.ns_a,
        &["ip", "addr", "add", "198.51.100.1/24", "dev", &t.veth_a],
    );
    t.exec_ok(
        &t.ns_b,
        &["ip", "addr", "add", "198.51.100.2/24", "dev", &t.veth_b],
    );
    t.exec_ok(&t.ns_a, &["ip", "addr", "add", "10.10.0.1/24", "dev", "lo"]);
    t.exec_ok(
        &t.ns_b,
        &["ip", "addr", "add", "192.168.50.1/24", "dev", "lo"],
    );
    let dir = t.tempdir();
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    let (ka, kb) = (t.sitewire_key("lab"), t.sitewire_key("branch"));
    std::fs::rename(&ka.path, dir.join("keys/lab.key")).unwrap();
    std::fs::rename(&kb.path, dir.join("keys/branch.key")).unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let lab = std::fs::read_to_string(format!("{root}/examples/lab.toml")).unwrap();
    let branch = std::fs::read_to_string(format!("{root}/examples/branch.toml")).unwrap();
    // Only what must differ per machine changes: interface names (unique per test run) and
    // the keys generated above.
    let (if_a, if_b) = (t.ifname("lab"), t.ifname("br"));
    let lab = swap_line(
        &swap_line(&lab, "interface = ", &format!("\"{if_a}\"")),
        "peer_public_key = ",
        &format!("\"{}\"", kb.public),
    );
    let branch = swap_line(
        &swap_line(&branch, "interface = ", &format!("\"{if_b}\"")),
        "peer_public_key = ",
        &format!("\"{}\"", ka.public),
    );
    for (name, text) in [("lab", &lab), ("branch", &branch)] {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(support::sitewire_bin())
            .args(["check", "-c", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let a = t.start_sitewire(Site::A, "lab", &lab);
    let _b = t.start_sitewire(Site::B, "branch", &branch);
    assert!(
        wait_tunnel_up(&if_a, "branch", Duration::from_secs(10)),
        "{}",
        a.log()
    );
    let ping = t.ping(
        &t.ns_a,
        "10.10.0.1".parse().unwrap(),
        "192.168.50.1".parse().unwrap(),
        20,
        0.02,
    );
    assert_eq!(ping.received, 20, "{ping:?}");
    // The TUN carries the example's own address.
    let addrs = t.exec_ok(&t.ns_a, &["ip", "-o", "addr", "show", "dev", &if_a]);
    assert!(addrs.contains("10.77.0.1/24"), "{addrs}");
    assert!(wait_until(
        Duration::from_secs(2),
        Duration::from_millis(100),
        || { status(&if_b)["tunnels"][0]["state"] == "up" }
    ));
}

fn swap_line(text: &str, key: &str, value: &str) -> String {
    text.lines()
        .map(|l| {
            if l.starts_with(key) {
                format!("{key}{value}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn peer_that_moves_is_followed() {
    if !prereq(&["ping"]) {
        return;
    }
    let t = Topo::new("roam");
    let (if_a, if_b) = (t.ifname("sa"), t.ifname("sb"));
    let (ka, kb) = (t.sitewire_key("a"), t.sitewire_key("b"));
    let port = t.port(0);
    let ep_a = vec![format!("{}:{port}", t.underlay_b)];
    let ep_b = vec![format!("{}:{port}", t.underlay_a)];
    let site = |name, iface, key: &str, tunnel, peer: &str, eps, local, remote, extra| {
        SiteConfig {
            name,
            iface,
            port,
            key_path: key,
            tunnel,
            peer_public: peer,
            endpoints: eps,
            local,
            remote,
            extra,
        }
        .render()
    };
    let cfg_a = site(
        "a",
        &if_a,
        &ka.path,
        "to-b",
        &kb.public,
        &ep_a,
        &t.subnet_a,
        &t.subnet_b,
        "persistent_keepalive = \"1s\"",
    );
    let cfg_b = site(
        "b",
        &if_b,
        &kb.path,
        "to-a",
        &ka.public,
        &ep_b,
        &t.subnet_b,
        &t.subnet_a,
        "",
    );
    let _b = t.start_sitewire(Site::B, "b", &cfg_b);
    let a = t.start_sitewire(Site::A, "a", &cfg_a);
    assert!(
        wait_tunnel_up(&if_b, "to-a", Duration::from_secs(10)),
        "{}",
        a.log()
    );

    // Site a's underlay address changes (a new uplink, say).
    let o = t.underlay_a.octets();
    let moved = std::net::Ipv4Addr::new(o[0], o[1], o[2], 3);
    // (Deleting a primary address also deletes its secondaries: delete first, then add.)
    let dev = t.veth_a.as_str();
    let old = format!("{}/24", t.underlay_a);
    t.exec_ok(&t.ns_a, &["ip", "addr", "del", &old, "dev", dev]);
    t.exec_ok(
        &t.ns_a,
        &["ip", "addr", "add", &format!("{moved}/24"), "dev", dev],
    );
    let followed = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        tunnel_status(&if_b, "to-a")["endpoint"] == format!("{moved}:{port}")
    });
    assert!(
        followed,
        "b did not follow a: {}\na: {}\n{}",
        tunnel_status(&if_b, "to-a"),
        tunnel_status(&if_a, "to-b"),
        a.log()
    );
    let ping = t.ping(&t.ns_b, t.host_b, t.host_a, 10, 0.05);
    assert_eq!(ping.received, 10, "{ping:?}");
}
