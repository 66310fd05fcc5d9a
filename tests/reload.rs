//! Hot reload, readiness notification and crash recovery of a running site.
//!
//! Site "hub" runs in namespace a with up to three tunnels; each tunnel's peer is its own
//! sitewire site in namespace b (own interface, port and subnet on b's `lo`). Every tunnel
//! also has its own source subnet on a's `lo`, so that the peers in b never need a route
//! to the same subnet.
//!
//! ```text
//!   ns a: hub (port 0)                         ns b
//!     10.X.1.1 (keep)   --- tunnel "keep" ---  peer1 (port 1) 10.X.2.1
//!     10.X.6.1 (gone)   --- tunnel "gone" ---  peer2 (port 2) 10.X.4.1
//!     10.X.7.1 (new)    --- tunnel "new"  ---  peer3 (port 3) 10.X.5.1
//! ```

mod support;

use std::net::Ipv4Addr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::site::{tunnel_status, wait_tunnel_up, SiteKey};
use support::{parse_ping, prereq, sitewire_bin, wait_until, Proc, Site, Topo};

/// One hub tunnel and the peer site behind it.
struct Peer {
    tunnel: &'static str,
    /// 1..=3: port index of the peer, and which subnets it uses.
    n: u16,
    key: SiteKey,
    iface: String,
    /// Hub-side source subnet (on a's lo) and peer subnet (on b's lo), as (net, host .1).
    hub_net: String,
    hub_host: Ipv4Addr,
    peer_net: String,
    peer_host: Ipv4Addr,
}

struct Hub {
    topo: Topo,
    key: SiteKey,
    iface: String,
    peers: Vec<Peer>,
    peer_procs: Vec<Proc>,
}

/// Third octets of (hub subnet, peer subnet) for peer n.
fn octets(n: u16) -> (u8, u8) {
    match n {
        1 => (1, 2),
        2 => (6, 4),
        3 => (7, 5),
        _ => unreachable!(),
    }
}

impl Hub {
    /// Topology, keys, per-peer subnets, and every peer site started in namespace b
    /// (peers have no endpoint: the hub initiates, which is also what an added tunnel must do).
    fn new(tag: &str, tunnels: &[(&'static str, u16)]) -> Hub {
        let topo = Topo::new(tag);
        let key = topo.sitewire_key("hub");
        let iface = topo.ifname("hub");
        let second = topo.underlay_a.octets()[1];
        let mut peers = Vec::new();
        for &(tunnel, n) in tunnels {
            let (ho, po) = octets(n);
            let hub_host = Ipv4Addr::new(10, second, ho, 1);
            let peer_host = Ipv4Addr::new(10, second, po, 1);
            if n != 1 {
                // Subnets 1 and 2 are the harness's own (already on lo).
                let a = format!("{hub_host}/24");
                topo.exec_ok(&topo.ns_a, &["ip", "addr", "add", &a, "dev", "lo"]);
                let b = format!("{peer_host}/24");
                topo.exec_ok(&topo.ns_b, &["ip", "addr", "add", &b, "dev", "lo"]);
            }
            peers.push(Peer {
                tunnel,
                n,
                key: topo.sitewire_key(&format!("peer{n}")),
                iface: topo.ifname(&format!("p{n}")),
                hub_net: format!("10.{second}.{ho}.0/24"),
                hub_host,
                peer_net: format!("10.{second}.{po}.0/24"),
                peer_host,
            });
        }
        let mut hub = Hub {
            topo,
            key,
            iface,
            peers,
            peer_procs: Vec::new(),
        };
        for i in 0..hub.peers.len() {
            let p = &hub.peers[i];
            let cfg = format!(
                "[site]\nname = \"peer{n}\"\ninterface = \"{iface}\"\nlisten_port = {port}\n\
                 private_key = \"{key}\"\n\n[[tunnel]]\nname = \"to-hub\"\n\
                 peer_public_key = \"{hubpub}\"\nlocal_subnets = [\"{pnet}\"]\n\
                 remote_subnets = [\"{hnet}\"]\n",
                n = p.n,
                iface = p.iface,
                port = hub.topo.port(p.n),
                key = p.key.path,
                hubpub = hub.key.public,
                pnet = p.peer_net,
                hnet = p.hub_net,
            );
            let proc = hub
                .topo
                .start_sitewire(Site::B, &format!("peer{}", p.n), &cfg);
            hub.peer_procs.push(proc);
        }
        hub
    }

    fn peer(&self, tunnel: &str) -> &Peer {
        self.peers.iter().find(|p| p.tunnel == tunnel).unwrap()
    }

    /// The hub's config with the named tunnels (in this order), plus `site_extra` lines.
    fn config(&self, tunnels: &[&str], site_extra: &str) -> String {
        let mut s = format!(
            "[site]\nname = \"hub\"\ninterface = \"{}\"\nlisten_port = {}\nprivate_key = \"{}\"\n{site_extra}\n",
            self.iface,
            self.topo.port(0),
            self.key.path
        );
        for name in tunnels {
            let p = self.peer(name);
            s += &format!(
                "\n[[tunnel]]\nname = \"{}\"\npeer_public_key = \"{}\"\nendpoint = [\"{}:{}\"]\n\
                 local_subnets = [\"{}\"]\nremote_subnets = [\"{}\"]\n",
                p.tunnel,
                p.key.public,
                self.topo.underlay_b,
                self.topo.port(p.n),
                p.hub_net,
                p.peer_net
            );
        }
        s
    }

    fn config_path(&self) -> std::path::PathBuf {
        self.topo.tempdir().join("hub.toml")
    }

    fn ping(&self, tunnel: &str, count: u32, interval: f64) -> support::PingStats {
        let p = self.peer(tunnel);
        self.topo
            .ping(&self.topo.ns_a, p.hub_host, p.peer_host, count, interval)
    }

    fn wait_ping(&self, tunnel: &str) -> bool {
        let p = self.peer(tunnel);
        self.topo.wait_ping(
            &self.topo.ns_a,
            p.hub_host,
            p.peer_host,
            Duration::from_secs(10),
        )
    }

    fn routes(&self) -> String {
        self.topo
            .exec_ok(&self.topo.ns_a, &["ip", "route", "show", "proto", "77"])
    }
}

/// Status of a tunnel once it is up and its handshake time is recorded (the daemon
/// notes it on its next 250 ms tick).
fn settled_status(iface: &str, tunnel: &str) -> serde_json::Value {
    let mut st = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        st = tunnel_status(iface, tunnel);
        st["state"] == "up" && st["last_handshake"].is_u64()
    });
    assert!(ok, "tunnel {tunnel} not settled: {st}");
    st
}

fn sitewire(args: &[&str]) -> Output {
    Command::new(sitewire_bin())
        .args(args)
        .output()
        .expect("run sitewire")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn reload_adds_and_removes_tunnels_without_losing_a_packet_on_the_unchanged_one() {
    if !prereq(&["ping"]) {
        return;
    }
    let h = Hub::new("reload", &[("keep", 1), ("gone", 2), ("new", 3)]);
    let hub = h
        .topo
        .start_sitewire(Site::A, "hub", &h.config(&["keep", "gone"], ""));
    for t in ["keep", "gone"] {
        assert!(
            wait_tunnel_up(&h.iface, t, Duration::from_secs(10)),
            "{t} not up:\n{}",
            hub.log()
        );
        assert!(h.wait_ping(t), "no ping through {t}:\n{}", hub.log());
    }
    let gone_net = h.peer("gone").peer_net.clone();
    let new_net = h.peer("new").peer_net.clone();
    assert!(h.routes().contains(&gone_net), "{}", h.routes());
    let keep_before = settled_status(&h.iface, "keep");

    // 100 pings/s through "keep" for 6 s, while the hub is reloaded twice.
    let keep = h.peer("keep");
    let (src, dst) = (keep.hub_host.to_string(), keep.peer_host.to_string());
    let pinger = h.topo.spawn(
        &h.topo.ns_a,
        "ping-keep",
        &[
            "ping", "-n", "-q", "-c", "600", "-i", "0.01", "-W", "1", "-I", &src, &dst,
        ],
    );
    std::thread::sleep(Duration::from_millis(1500));

    // 1. `sitewire reload -c FILE`: "new" added, "gone" removed, "keep" untouched.
    std::fs::write(h.config_path(), h.config(&["new", "keep"], "")).unwrap();
    let t0 = Instant::now();
    let out = sitewire(&["reload", "-c", h.config_path().to_str().unwrap(), "--json"]);
    let took = t0.elapsed();
    assert!(out.status.success(), "reload failed:\n{}", text(&out));
    let o: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(o["applied"], true, "{o}");
    assert_eq!(o["unchanged"], serde_json::json!(["keep"]), "{o}");
    assert_eq!(o["added"], serde_json::json!(["new"]), "{o}");
    assert_eq!(o["removed"], serde_json::json!(["gone"]), "{o}");
    assert_eq!(o["routes_added"], serde_json::json!([new_net]), "{o}");
    assert_eq!(o["routes_removed"], serde_json::json!([gone_net]), "{o}");
    eprintln!("reload (add + remove) answered in {took:?}");

    // 2. SIGHUP with the same file: nothing to do, nothing disturbed.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(hub.signal(libc::SIGHUP));
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || hub
            .log()
            .matches("configuration reloaded")
            .count()
            >= 2),
        "no second reload after SIGHUP:\n{}",
        hub.log_tail(30)
    );

    let st = pinger
        .wait_exit(Duration::from_secs(30))
        .expect("ping did not finish");
    let ping = parse_ping(&pinger.log()).unwrap_or_else(|| panic!("{st}: {}", pinger.log()));
    eprintln!(
        "unchanged tunnel during reloads: {} sent, {} received, {}% loss",
        ping.sent, ping.received, ping.loss_pct
    );
    assert_eq!(ping.sent, 600, "{ping:?}");
    assert_eq!(
        ping.received, ping.sent,
        "packets lost on the unchanged tunnel: {ping:?}"
    );

    // The unchanged tunnel kept its session (no new handshake) and its counters.
    let keep_after = tunnel_status(&h.iface, "keep");
    assert_eq!(
        keep_after["last_handshake"], keep_before["last_handshake"],
        "before {keep_before}\nafter {keep_after}"
    );
    assert!(
        keep_after["rx_inner_packets"].as_u64().unwrap()
            >= keep_before["rx_inner_packets"].as_u64().unwrap() + 600
    );

    // The added tunnel comes up (the hub initiated: its peer has no endpoint) and passes traffic.
    assert!(
        wait_tunnel_up(&h.iface, "new", Duration::from_secs(10)),
        "{}",
        hub.log()
    );
    let ping = h.ping("new", 20, 0.02);
    assert_eq!(ping.received, 20, "{ping:?}");

    // The removed tunnel's route is gone and it is no longer in status.
    let routes = h.routes();
    assert!(
        !routes.contains(&gone_net),
        "route of removed tunnel left: {routes}"
    );
    assert!(routes.contains(&new_net), "{routes}");
    let names: Vec<String> = support::site::status(&h.iface)["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["new", "keep"]);
    let gone = h.peer("gone");
    let out = h.topo.exec(
        &h.topo.ns_a,
        &[
            "ping",
            "-n",
            "-c",
            "1",
            "-W",
            "1",
            "-I",
            &gone.hub_host.to_string(),
            &gone.peer_host.to_string(),
        ],
    );
    assert!(!out.status.success(), "removed tunnel still passes traffic");
    drop(hub);
}

/// A notification socket for `NOTIFY_SOCKET`, and its messages.
struct Notify {
    sock: UnixDatagram,
    path: String,
}

impl Notify {
    fn new(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Notify {
            sock,
            path: path.to_string_lossy().into_owned(),
        }
    }

    /// Waits for a message containing `what`; returns it.
    fn expect(&self, what: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                if m.contains(what) {
                    return m;
                }
                seen.push(m);
            }
        }
        panic!("no notification with {what:?} within {timeout:?}; got {seen:?}");
    }
}

#[test]
fn bad_config_on_reload_is_refused_and_systemd_is_told() {
    if !prereq(&["ping"]) {
        return;
    }
    let h = Hub::new("badreload", &[("keep", 1)]);
    let notify = Notify::new(&h.topo.tempdir());
    let good = h.config(&["keep"], "");
    let hub = h.topo.start_sitewire_env(
        Site::A,
        "hub",
        &good,
        &[("NOTIFY_SOCKET", notify.path.as_str())],
    );
    let ready = notify.expect("READY=1", Duration::from_secs(10));
    assert!(ready.contains("STATUS="), "{ready}");
    // Readiness comes after the routes are in place.
    assert!(h.routes().contains(&h.peer("keep").peer_net));
    assert!(wait_tunnel_up(&h.iface, "keep", Duration::from_secs(10)));
    assert!(h.wait_ping("keep"));
    let before = settled_status(&h.iface, "keep");
    let routes_before = h.routes();

    // Three problems at once: an unknown key, a bad subnet, a world-readable key file.
    let loose_key = h.topo.tempdir().join("loose.key");
    std::fs::write(&loose_key, format!("{}\n", h.key.private)).unwrap();
    let bad = good
        .replace(
            &format!("private_key = \"{}\"", h.key.path),
            &format!("private_key = \"{}\"", loose_key.display()),
        )
        .replace("[[tunnel]]", "[[tunnel]]\ncolour = \"blue\"")
        .replace(&h.peer("keep").peer_net, "10.300.0.0/24");
    std::fs::write(h.config_path(), &bad).unwrap();
    let out = sitewire(&["reload", "-c", h.config_path().to_str().unwrap()]);
    let t = text(&out);
    assert!(!out.status.success(), "bad reload accepted:\n{t}");
    assert!(t.contains("refused"), "{t}");
    assert!(t.contains("colour"), "{t}");
    assert!(t.contains("10.300.0.0/24"), "{t}");
    assert!(t.contains("chmod 600"), "{t}");
    notify.expect("RELOADING=1", Duration::from_secs(5));
    let again = notify.expect("READY=1", Duration::from_secs(5));
    assert!(again.contains("refused"), "{again}");

    // SIGHUP with the same bad file: refused, logged, the daemon stays.
    assert!(hub.signal(libc::SIGHUP));
    let reloading = notify.expect("RELOADING=1", Duration::from_secs(5));
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    notify.expect("READY=1", Duration::from_secs(5));
    assert!(hub.log().contains("reload refused"), "{}", hub.log_tail(20));
    assert!(hub.alive());

    // A change that needs a restart is refused with a message saying so.
    let moved = good.replace(
        &format!("listen_port = {}", h.topo.port(0)),
        &format!("listen_port = {}", h.topo.port(9)),
    );
    std::fs::write(h.config_path(), &moved).unwrap();
    let out = sitewire(&["reload", "--interface", &h.iface]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("listen_port") && t.contains("restart"), "{t}");

    // Nothing moved: same session, same routes, traffic flows.
    let after = tunnel_status(&h.iface, "keep");
    assert_eq!(after["last_handshake"], before["last_handshake"]);
    assert_eq!(h.routes(), routes_before);
    let ping = h.ping("keep", 20, 0.02);
    assert_eq!(ping.received, 20, "{ping:?}");

    // Graceful stop says STOPPING=1.
    assert!(hub.stop(Duration::from_secs(5)).success());
    notify.expect("STOPPING=1", Duration::from_secs(2));
}

#[test]
fn sigkill_then_restart_cleans_up_and_works() {
    if !prereq(&["ping"]) {
        return;
    }
    let h = Hub::new("crash", &[("keep", 1)]);
    let cfg = h.config(&["keep"], "");
    let hub = h.topo.start_sitewire(Site::A, "hub", &cfg);
    assert!(wait_tunnel_up(&h.iface, "keep", Duration::from_secs(10)));
    assert!(h.wait_ping("keep"));

    hub.signal(libc::SIGKILL);
    hub.wait_exit(Duration::from_secs(5)).expect("SIGKILL");
    let ctl = format!("/run/sitewire/{}.sock", h.iface);
    let uapi = format!("/var/run/wireguard/{}.sock", h.iface);
    assert!(
        Path::new(&ctl).exists(),
        "a SIGKILLed daemon leaves its socket"
    );

    // What a crash can leave besides the sockets: the TUN itself (here made persistent, as
    // when the kernel keeps it), with its address and sitewire routes, one of them for a
    // subnet the configuration no longer has; and a sitewire route for our subnet on
    // another, dead interface.
    let (ns, i) = (h.topo.ns_a.as_str(), h.iface.as_str());
    let second = h.topo.underlay_a.octets()[1];
    let stale_net = format!("10.{second}.9.0/24");
    let keep_net = h.peer("keep").peer_net.clone();
    let other = h.topo.ifname("old");
    for cmd in [
        vec!["ip", "tuntap", "add", "dev", i, "mode", "tun"],
        vec!["ip", "link", "set", i, "up"],
        vec!["ip", "addr", "add", "10.250.250.1/32", "dev", i],
        vec!["ip", "route", "add", &stale_net, "dev", i, "proto", "77"],
        vec!["ip", "tuntap", "add", "dev", &other, "mode", "tun"],
        vec!["ip", "link", "set", &other, "up"],
        vec![
            "ip", "route", "add", &keep_net, "dev", &other, "proto", "77",
        ],
    ] {
        h.topo.exec_ok(ns, &cmd);
    }

    // (start_sitewire returns at once: the stale socket file is still there.)
    let hub = h.topo.start_sitewire(Site::A, "hub2", &cfg);
    let answers = wait_until(Duration::from_secs(15), Duration::from_millis(50), || {
        assert!(hub.alive(), "restart failed:\n{}", hub.log());
        std::os::unix::net::UnixStream::connect(&ctl).is_ok()
    });
    assert!(answers, "restarted daemon does not answer:\n{}", hub.log());
    assert!(
        wait_tunnel_up(&h.iface, "keep", Duration::from_secs(10)),
        "{}",
        hub.log()
    );
    let ok = h.wait_ping("keep");
    assert!(
        ok,
        "no ping after restart\nroutes: {}\nlinks: {}\nhub: {}\npeer: {}\n{}",
        h.routes(),
        h.topo.exec_ok(&h.topo.ns_a, &["ip", "-o", "link"]),
        support::site::status(&h.iface),
        support::site::status(&h.peer("keep").iface),
        hub.log()
    );
    let ping = h.ping("keep", 20, 0.02);
    assert_eq!(ping.received, 20, "{ping:?}\n{}", hub.log());
    let log = hub.log();
    assert!(log.contains("left behind by an earlier run"), "{log}");
    let routes = h.routes();
    assert!(!routes.contains(&stale_net), "stale route kept: {routes}");
    assert!(
        !routes.contains(&other),
        "stale route on {other} kept: {routes}"
    );
    assert_eq!(routes.lines().count(), 1, "{routes}");
    let addrs = h.topo.exec_ok(ns, &["ip", "-o", "addr", "show", "dev", i]);
    assert!(!addrs.contains("10.250.250.1"), "{addrs}");

    // And a clean stop after that leaves nothing.
    assert!(hub.stop(Duration::from_secs(5)).success(), "{}", hub.log());
    assert!(h.routes().trim().is_empty(), "{}", h.routes());
    assert!(!h
        .topo
        .exec(ns, &["ip", "link", "show", "dev", i])
        .status
        .success());
    assert!(!Path::new(&ctl).exists());
    assert!(!Path::new(&uapi).exists());
    // The harness removes the namespaces (and the unrelated dead TUN with them).
}
