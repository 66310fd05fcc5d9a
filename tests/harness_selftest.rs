//! Proves the network-namespace harness in tests/support works, without the daemon:
//! topology setup and teardown (also on panic and after a killed run), process handling,
//! ping/iperf3 helpers, and the wireguard-go peer that interop tests use.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::Topo;

fn assert_gone(prefix: &str, tempdir: &Path) {
    let left = support::netns_with_prefix(prefix);
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(
        !tempdir.exists(),
        "temp dir left behind: {}",
        tempdir.display()
    );
    let socks: Vec<_> = std::fs::read_dir(support::UAPI_DIR)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    assert!(socks.is_empty(), "UAPI sockets left behind: {socks:?}");
}

/// Parsers used by the helpers (no root needed).
#[test]
fn parsers() {
    let ok = "PING 10.1.0.2 (10.1.0.2) from 10.1.0.1 : 56(84) bytes of data.\n\n\
              --- 10.1.0.2 ping statistics ---\n\
              5 packets transmitted, 5 received, 0% packet loss, time 204ms\n\
              rtt min/avg/max/mdev = 0.031/0.048/0.072/0.014 ms\n";
    let s = support::parse_ping(ok).expect("parse ok output");
    assert_eq!((s.sent, s.received), (5, 5));
    assert_eq!(s.loss_pct, 0.0);
    assert_eq!(
        (s.rtt_min_ms, s.rtt_avg_ms, s.rtt_max_ms),
        (0.031, 0.048, 0.072)
    );

    let lossy = "--- 10.1.2.1 ping statistics ---\n\
                 4 packets transmitted, 1 received, +2 errors, 75% packet loss, time 3050ms\n\
                 rtt min/avg/max/mdev = 1.500/1.500/1.500/0.000 ms, pipe 3\n";
    let s = support::parse_ping(lossy).expect("parse lossy output");
    assert_eq!((s.sent, s.received, s.loss_pct), (4, 1, 75.0));
    assert_eq!(s.rtt_max_ms, 1.5);

    let none = "--- 10.1.2.1 ping statistics ---\n\
                3 packets transmitted, 0 received, 100% packet loss, time 2040ms\n";
    let s = support::parse_ping(none).expect("parse 100% loss");
    assert_eq!((s.sent, s.received, s.loss_pct), (3, 0, 100.0));
    assert!(s.rtt_avg_ms.is_nan());
    assert!(support::parse_ping("ping: connect: Network is unreachable\n").is_none());

    // With -w ping sends past COUNT until it has COUNT replies: seq 2 lost, 4 and 5 extra,
    // 3 duplicated, 0 and 9 out of range.
    let deadline = "PING 10.1.0.2 (10.1.0.2) from 10.1.0.1 : 56(84) bytes of data.\n\
                    64 bytes from 10.1.0.2: icmp_seq=1 ttl=64 time=0.1 ms\n\
                    64 bytes from 10.1.0.2: icmp_seq=3 ttl=64 time=0.1 ms\n\
                    64 bytes from 10.1.0.2: icmp_seq=3 ttl=64 time=0.2 ms (DUP!)\n\
                    64 bytes from 10.1.0.2: icmp_seq=4 ttl=64 time=0.1 ms\n\
                    64 bytes from 10.1.0.2: icmp_seq=0 ttl=64 time=0.1 ms\n\
                    64 bytes from 10.1.0.2: icmp_seq=9 ttl=64 time=0.1 ms\n";
    assert_eq!(support::answered_seqs(deadline, 3), 2);
    assert_eq!(support::answered_seqs(deadline, 4), 3);
    assert_eq!(support::answered_seqs("", 3), 0);

    let dump = "cHJpdg==\tcHVi\t51820\toff\n\
                UEVFUg==\t(none)\t10.1.0.2:51821\t10.1.2.0/24,10.1.3.2/32\t1700000000\t1234\t5678\toff\n\
                UEVFUjI=\t(none)\t(none)\t(none)\t0\t0\t0\toff\n";
    let peers = support::parse_wg_dump(dump);
    assert_eq!(peers.len(), 2);
    assert_eq!(peers[0].public_key, "UEVFUg==");
    assert_eq!(peers[0].endpoint.as_deref(), Some("10.1.0.2:51821"));
    assert_eq!(peers[0].allowed_ips, ["10.1.2.0/24", "10.1.3.2/32"]);
    assert_eq!(
        (
            peers[0].latest_handshake,
            peers[0].rx_bytes,
            peers[0].tx_bytes
        ),
        (1_700_000_000, 1234, 5678)
    );
    assert_eq!(peers[1].endpoint, None);
    assert!(peers[1].allowed_ips.is_empty());
    assert_eq!(peers[1].latest_handshake, 0);

    assert!(support::within_connected("10.1.3.2/32", "10.1.3.1/24"));
    assert!(support::within_connected("10.1.3.0/24", "10.1.3.1/24"));
    assert!(!support::within_connected("10.1.2.0/24", "10.1.3.1/24"));
    assert!(!support::within_connected("10.1.0.0/16", "10.1.3.1/24"));

    let mut n = 0;
    assert!(support::wait_until(
        Duration::from_secs(5),
        Duration::from_millis(1),
        || {
            n += 1;
            n == 3
        }
    ));
    assert!(!support::wait_until(
        Duration::from_millis(30),
        Duration::from_millis(5),
        || false
    ));
}

/// Two namespaces joined by veth: underlay ping, isolation, unique names, cleanup on drop.
#[test]
fn topology_underlay_and_cleanup() {
    if !support::prereq(&["ping", "ss"]) {
        return;
    }
    let t = Topo::new("underlay");
    let t2 = Topo::new("second");
    assert_ne!(t.prefix, t2.prefix, "prefixes must be unique");
    assert!(t.ifname("wg-branch").len() <= 15);
    for ns in [&t.ns_a, &t.ns_b, &t2.ns_a, &t2.ns_b] {
        assert!(support::netns_exists(ns), "{ns} missing");
    }
    // veth ends live only inside the namespaces
    let root = Command::new("ip")
        .args(["link", "show", "dev", &t.veth_a])
        .output()
        .unwrap();
    assert!(
        !root.status.success(),
        "{} must not exist in the root namespace",
        t.veth_a
    );
    assert!(t
        .exec_ok(&t.ns_a, &["ip", "-o", "addr", "show", "dev", "lo"])
        .contains(&format!("{}/24", t.host_a)));
    assert_eq!(
        t.exec_ok(&t.ns_b, &["sysctl", "-n", "net.ipv6.conf.all.disable_ipv6"])
            .trim(),
        "1"
    );
    // no default route: nothing can leave the pair
    assert!(t
        .exec_ok(&t.ns_a, &["ip", "route", "show", "default"])
        .trim()
        .is_empty());

    let s = t.ping(&t.ns_a, t.underlay_a, t.underlay_b, 5, 0.05);
    assert_eq!(s.received, 5, "{}", s.output);
    assert_eq!(s.loss_pct, 0.0, "{}", s.output);
    assert!(s.rtt_avg_ms > 0.0 && s.rtt_avg_ms < 100.0, "{}", s.output);
    assert!(t.wait_ping(&t.ns_b, t.underlay_b, t.underlay_a, Duration::from_secs(3)));
    // site subnets are not routed without a tunnel
    assert!(!t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_millis(300)));

    let tempdir = t.tempdir();
    assert!(tempdir.is_dir());
    support::write_file_0600(tempdir.join("k"), "secret\n");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(tempdir.join("k"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(&tempdir).unwrap().permissions().mode() & 0o777,
        0o700
    );

    let (p, p2, d2) = (t.prefix.clone(), t2.prefix.clone(), t2.tempdir());
    drop(t);
    assert_gone(&p, &tempdir);
    assert!(
        support::netns_exists(&t2.ns_a),
        "dropping one topo must not touch another"
    );
    drop(t2);
    assert_gone(&p2, &d2);
}

/// Processes: `ip netns exec` PID is the command's own, it runs in the namespace, logs are
/// captured, signals work, and drop stops what is still running.
#[test]
fn processes_signals_and_logs() {
    if !support::prereq(&["sleep", "sh"]) {
        return;
    }
    let t = Topo::new("procs");
    let p = t.spawn(
        &t.ns_a,
        "talker",
        &[
            "sh",
            "-c",
            "echo to-stdout; echo to-stderr >&2; exec sleep 60",
        ],
    );
    assert!(support::wait_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || p.log().contains("to-stdout") && p.log().contains("to-stderr")
    ));
    // `ip netns exec` execs: the PID is the command itself (sh, which exec'd sleep)
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", p.pid)).unwrap();
    assert_eq!(comm.trim(), "sleep");
    let ident = Command::new("ip")
        .args(["netns", "identify", &p.pid.to_string()])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&ident.stdout).trim(), t.ns_a);

    let state = || {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", p.pid)).unwrap();
        s[s.rfind(')').unwrap() + 2..].chars().next().unwrap()
    };
    assert!(p.signal(libc::SIGSTOP));
    assert!(support::wait_until(
        Duration::from_secs(2),
        Duration::from_millis(10),
        || state() == 'T'
    ));
    assert!(p.alive());
    assert!(p.signal(libc::SIGCONT));
    assert!(support::wait_until(
        Duration::from_secs(2),
        Duration::from_millis(10),
        || state() != 'T'
    ));
    assert!(p.wait_exit(Duration::from_millis(100)).is_none());
    assert!(p.signal(libc::SIGTERM));
    let st = p
        .wait_exit(Duration::from_secs(5))
        .expect("exit after SIGTERM");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGTERM));
    assert!(!p.alive());
    assert!(!p.signal(libc::SIGTERM), "no signal after exit");

    // exit code of a normal command
    let q = t.spawn(&t.ns_b, "exit3", &["sh", "-c", "exit 3"]);
    assert_eq!(q.wait_exit(Duration::from_secs(5)).unwrap().code(), Some(3));
    let out = t.exec(&t.ns_b, &["sh", "-c", "echo hi; exit 1"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert!(t
        .exec_timeout(&t.ns_b, &["sleep", "10"], Duration::from_millis(200))
        .is_none());

    // one that ignores SIGTERM is SIGKILLed by drop after 3 s; a stopped one is continued
    let stubborn = t.spawn(
        &t.ns_b,
        "stubborn",
        &["sh", "-c", "trap '' TERM; exec sleep 60"],
    );
    let stopped = t.spawn(&t.ns_a, "stopped", &["sleep", "60"]);
    assert!(support::wait_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || std::fs::read_to_string(format!("/proc/{}/comm", stubborn.pid))
            .is_ok_and(|c| c.trim() == "sleep")
    ));
    assert!(stopped.signal(libc::SIGSTOP));
    let (pfx, dir) = (t.prefix.clone(), t.tempdir());
    let started = std::time::Instant::now();
    drop(t);
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(!stubborn.alive() && !stopped.alive());
    assert_eq!(
        stubborn.wait_exit(Duration::ZERO).and_then(|s| s.signal()),
        Some(libc::SIGKILL)
    );
    assert_eq!(
        stopped.wait_exit(Duration::ZERO).and_then(|s| s.signal()),
        Some(libc::SIGTERM)
    );
    assert_gone(&pfx, &dir);
}

/// A panicking test still deletes its namespaces (Drop runs while unwinding).
#[test]
fn cleanup_on_panic() {
    if !support::prereq(&["sleep"]) {
        return;
    }
    let seen = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let t = Topo::new("panics");
        let p = t.spawn(&t.ns_a, "sleeper", &["sleep", "60"]);
        *seen.lock().unwrap() = Some((t.prefix.clone(), t.tempdir(), p));
        panic!("deliberate panic inside a test using Topo");
    }));
    assert!(r.is_err());
    let (prefix, dir, p) = seen.lock().unwrap().take().expect("topo was built");
    assert!(!p.alive(), "process of the panicking test still running");
    assert_gone(&prefix, &dir);
}

/// Leftovers of a test process that was killed without unwinding are swept by the next run:
/// recorded children are killed (PID + start time checked), namespaces deleted.
#[test]
fn sweep_after_killed_run() {
    if !support::prereq(&["sleep"]) {
        return;
    }
    // a PID that is certainly not running any more
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let fake = format!("sx{:04x}", std::process::id() & 0xffff);
    let ns = format!("{fake}a");
    assert!(Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap()
        .success());
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns, "sleep", "60"])
        .spawn()
        .unwrap();
    let start = support::wait_until(Duration::from_secs(2), Duration::from_millis(10), || {
        std::fs::read_to_string(format!("/proc/{}/comm", child.id()))
            .is_ok_and(|c| c.trim() == "sleep")
    });
    assert!(start);
    let st = support::proc_starttime(child.id()).unwrap();
    let dir = Path::new(support::STATE_DIR);
    std::fs::create_dir_all(dir).unwrap();
    let tmp = dir.join(format!("{fake}.tmp"));
    std::fs::write(
        &tmp,
        format!("owner {dead_pid} 1\nchild {} {st}\n", child.id()),
    )
    .unwrap();
    std::fs::rename(&tmp, dir.join(format!("{fake}.state"))).unwrap();

    support::sweep_stale();
    use std::os::unix::process::ExitStatusExt;
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(!support::netns_exists(&ns), "{ns} not swept");
    assert!(!dir.join(format!("{fake}.state")).exists());
}

/// iperf3 helper on the underlay, both directions.
#[test]
fn iperf3_underlay() {
    if !support::prereq(&["iperf3", "ss"]) {
        return;
    }
    let t = Topo::new("iperf");
    let fwd = t.iperf3_tcp(&t.ns_b, t.underlay_b, &t.ns_a, t.underlay_a, 1, 1, false);
    assert!(fwd.bytes_received > 0, "{fwd:?}");
    assert!(fwd.bits_per_second > 0.0);
    let rev = t.iperf3_tcp(&t.ns_b, t.underlay_b, &t.ns_a, t.underlay_a, 1, 2, true);
    assert!(rev.bytes_received > 0);
    assert_eq!(rev.json["start"]["test_start"]["reverse"], 1);
    assert_eq!(rev.json["start"]["test_start"]["num_streams"], 2);
}

/// wireguard-go in both namespaces, peered with each other: site subnets (on lo) reach each
/// other through the tunnel, `wg show dump` reports the handshake and the bytes.
#[test]
fn wireguard_go_pair() {
    if !support::prereq(&["wireguard-go", "wg", "ping", "iperf3", "ss"]) {
        return;
    }
    let t = Topo::new("wggo");
    let (priv_a, pub_a) = support::wg_genkey();
    let (priv_b, pub_b) = support::wg_genkey();
    assert_eq!(pub_a.len(), 44);
    assert_ne!(pub_a, pub_b);
    let (if_a, if_b) = (t.ifname("wa"), t.ifname("wb"));
    let (port_a, port_b) = (t.port(0), t.port(1));
    let ov_b = format!("{}/32", t.overlay_b);
    let ov_a = format!("{}/32", t.overlay_a);
    let wa = t.start_wireguard_go(
        &t.ns_a,
        &if_a,
        port_a,
        &priv_a,
        &pub_b,
        Some(SocketAddr::new(t.underlay_b.into(), port_b)),
        &[&t.subnet_b, &ov_b],
        Some(&format!("{}/24", t.overlay_a)),
    );
    let wb = t.start_wireguard_go(
        &t.ns_b,
        &if_b,
        port_b,
        &priv_b,
        &pub_a,
        Some(SocketAddr::new(t.underlay_a.into(), port_a)),
        &[&t.subnet_a, &ov_a],
        Some(&format!("{}/24", t.overlay_b)),
    );
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{}/comm", wa.pid))
            .unwrap()
            .trim(),
        "wireguard-go"
    );
    let sock_a = Path::new(support::UAPI_DIR).join(format!("{if_a}.sock"));
    assert!(sock_a.exists());
    let routes = t.exec_ok(&t.ns_a, &["ip", "route"]);
    assert!(
        routes.contains(&format!("{} dev {if_a}", t.subnet_b)),
        "{routes}"
    );

    assert!(
        t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_secs(20)),
        "no ping through wireguard-go\nA:\n{}\nB:\n{}",
        wa.log_tail(30),
        wb.log_tail(30)
    );
    let s = t.ping(&t.ns_a, t.host_a, t.host_b, 20, 0.02);
    assert_eq!(s.loss_pct, 0.0, "{}", s.output);
    let s = t.ping(&t.ns_b, t.overlay_b, t.overlay_a, 5, 0.02);
    assert_eq!(s.loss_pct, 0.0, "{}", s.output);

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for (ns, ifn, peer) in [(&t.ns_a, &if_a, &pub_b), (&t.ns_b, &if_b, &pub_a)] {
        let hs = t.wg_latest_handshake(ns, ifn, peer);
        assert!(hs > 0 && hs.abs_diff(now) < 120, "handshake {hs} on {ifn}");
    }

    // TCP both ways through the tunnel; the bytes show up in wg's counters
    let fwd = t.iperf3_tcp(&t.ns_b, t.host_b, &t.ns_a, t.host_a, 1, 1, false);
    let rev = t.iperf3_tcp(&t.ns_b, t.host_b, &t.ns_a, t.host_a, 1, 1, true);
    assert!(fwd.bytes_received > 0 && rev.bytes_received > 0);
    let peer = t
        .wg_dump(&t.ns_a, &if_a)
        .into_iter()
        .find(|p| p.public_key == pub_b)
        .expect("peer b on a");
    assert_eq!(peer.endpoint, Some(format!("{}:{port_b}", t.underlay_b)));
    assert!(peer.tx_bytes >= fwd.bytes_received, "{peer:?} vs {fwd:?}");
    assert!(peer.rx_bytes >= rev.bytes_received, "{peer:?} vs {rev:?}");

    let (pfx, dir) = (t.prefix.clone(), t.tempdir());
    drop(t);
    assert!(!wa.alive() && !wb.alive());
    assert!(!sock_a.exists());
    assert_gone(&pfx, &dir);
}
