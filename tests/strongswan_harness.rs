//! Proves the strongSwan harness in tests/support/strongswan.rs, without sitewire: two charons
//! (one per namespace of a Topo, running at the same time) bring up an IKEv2/PSK tunnel between
//! the site subnets, traffic flows through it, DPD notices a frozen peer, and nothing is left
//! behind afterwards.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};
use support::strongswan::{self, Charon, ConnSpec, DpdAction, SaList};
use support::{Site, Topo};

/// The `swanctl --list-sas` parser (no root needed).
#[test]
fn list_sas_parser() {
    let text = "\
s2s: #3, ESTABLISHED, IKEv2, f40c3eeeee28ebeb_i* 30167a0a944facce_r
  local  'site-a.sitewire.test' @ 10.210.0.1[4500]
  remote 'site-b.sitewire.test' @ 10.210.0.2[4500]
  AES_GCM_16-256/PRF_HMAC_SHA2_256/CURVE_25519
  established 1s ago, rekeying in 44s
  net: #2, reqid 1, INSTALLED, TUNNEL-in-UDP, ESP:AES_GCM_16-256
    installed 1s ago, rekeying in 19s, expires in 21s
    in  a6384942,    840 bytes,    10 packets,     0s ago
    out 1789f8f2,    840 bytes,    10 packets,     1s ago
    local  10.211.1.0/24 10.211.5.0/24
    remote 10.211.2.0/24
  net: #1, reqid 1, REKEYED, TUNNEL-in-UDP, ESP:AES_GCM_16-256
    in  c0000001,      0 bytes,     0 packets
    out c0000002,      0 bytes,     0 packets
    local  10.211.1.0/24
    remote 10.211.2.0/24
other: #4, CONNECTING, IKEv2, 0123456789abcdef_i* 0000000000000000_r
  local  'x' @ 10.0.0.1[500]
  remote '%any' @ 10.0.0.2[500]
";
    let sas = SaList::parse(text);
    assert_eq!(sas.ikes.len(), 2);
    let ike = sas.ike("s2s").expect("s2s");
    assert_eq!((ike.unique_id, ike.state.as_str()), (3, "ESTABLISHED"));
    assert_eq!(ike.local_id, "site-a.sitewire.test");
    assert_eq!(ike.local_host, "10.210.0.1[4500]");
    assert_eq!(ike.remote_id, "site-b.sitewire.test");
    assert_eq!(ike.remote_host, "10.210.0.2[4500]");
    assert_eq!(
        ike.algorithms,
        "AES_GCM_16-256/PRF_HMAC_SHA2_256/CURVE_25519"
    );
    assert_eq!(ike.children.len(), 2);
    let c = &ike.children[0];
    assert_eq!((c.name.as_str(), c.unique_id, c.reqid), ("net", 2, 1));
    assert_eq!(
        (c.state.as_str(), c.mode.as_str(), c.proposal.as_str()),
        ("INSTALLED", "TUNNEL-in-UDP", "ESP:AES_GCM_16-256")
    );
    assert_eq!((c.spi_in, c.spi_out), (0xa638_4942, 0x1789_f8f2));
    assert_eq!(
        (c.bytes_in, c.packets_in, c.bytes_out, c.packets_out),
        (840, 10, 840, 10)
    );
    assert_eq!(c.local_ts, ["10.211.1.0/24", "10.211.5.0/24"]);
    assert_eq!(c.remote_ts, ["10.211.2.0/24"]);
    assert_eq!(ike.installed().len(), 1);
    assert!(sas.established());
    assert_eq!(sas.installed_children().len(), 1);
    let other = sas.ike("other").expect("other");
    assert!(!other.established());
    assert_eq!(other.remote_id, "%any");
    assert!(!SaList::parse("").established());
}

/// Generated configuration (no root needed).
#[test]
fn swanctl_conf_text() {
    let mut spec = ConnSpec {
        name: "s2s".into(),
        child: "net".into(),
        local_addr: "10.1.0.1".into(),
        remote_addr: "10.1.0.2".into(),
        remote_port: 4501,
        local_id: "a.test".into(),
        remote_id: "b.test".into(),
        psk: vec![0x00, 0xab, 0xff],
        local_ts: vec!["10.1.1.0/24".into(), "10.1.5.0/24".into()],
        remote_ts: vec!["10.1.2.0/24".into()],
        ike_proposal: "aes256gcm16-prfsha256-x25519".into(),
        esp_proposal: "aes256gcm16".into(),
        child_rekey_time: Duration::from_secs(20),
        ike_rekey_time: Duration::ZERO,
        dpd_delay: Duration::from_secs(2),
        dpd_action: DpdAction::Restart,
        start_action: strongswan::StartAction::Trap,
        encap: true,
        retransmit_tries: 2,
        retransmit_timeout: Duration::from_secs(1),
        retransmit_base: 1.5,
        keyingtries: 0,
    };
    let conf = spec.swanctl_conf();
    for want in [
        "remote_port = 4501",
        "secret = 0x00abff",
        "local_ts = 10.1.1.0/24,10.1.5.0/24",
        "rekey_time = 20s",
        "rekey_time = 0\n",
        "dpd_delay = 2s",
        "dpd_action = restart",
        "start_action = trap",
        "encap = yes",
        "keyingtries = 0",
        "id = \"a.test\"",
    ] {
        assert!(conf.contains(want), "missing {want:?} in:\n{conf}");
    }
    // 1 + 1.5 + 2.25 s
    assert_eq!(spec.give_up_after(), Duration::from_secs_f64(4.75));
    spec.retransmit_tries = 0;
    assert_eq!(spec.give_up_after(), Duration::from_secs(1));
}

/// Two charons, tunnel subnet_a <-> subnet_b, ping through it, counters on both sides, DPD
/// giving up on a SIGSTOPped peer, clean teardown.
#[test]
fn two_charons_tunnel_and_dpd() {
    if !strongswan::prereq() {
        return;
    }
    let t = Topo::new("strongswan");
    let (prefix, tempdir) = (t.prefix.clone(), t.tempdir());
    let mut spec_a = ConnSpec::for_site(&t, Site::A);
    let mut spec_b = ConnSpec::for_site(&t, Site::B);
    for s in [&mut spec_a, &mut spec_b] {
        s.dpd_delay = Duration::from_secs(2);
        s.dpd_action = DpdAction::Clear;
        s.retransmit_tries = 2;
        s.retransmit_timeout = Duration::from_secs(1);
        s.retransmit_base = 1.5;
    }
    let started = Instant::now();
    let a = Charon::start(&t, Site::A, &spec_a);
    let mut b = Charon::start(&t, Site::B, &spec_b);
    assert_ne!(a.pid(), b.pid());
    assert_ne!(a.vici_uri(), b.vici_uri());
    eprintln!(
        "charons up in {:?}: a pid {} ({}), b pid {} ({})",
        started.elapsed(),
        a.pid(),
        a.vici_uri(),
        b.pid(),
        b.vici_uri()
    );

    let t0 = Instant::now();
    a.initiate("net")
        .unwrap_or_else(|e| panic!("initiate: {e}\nlog a:\n{}", a.log_tail(40)));
    let sas_a = a.wait_established(Duration::from_secs(10));
    b.wait_established(Duration::from_secs(10));
    eprintln!("established in {:?}", t0.elapsed());
    let ike_a = sas_a.ike("s2s").expect("IKE_SA s2s on a");
    assert_eq!(
        ike_a.algorithms,
        "AES_GCM_16-256/PRF_HMAC_SHA2_256/CURVE_25519"
    );
    assert_eq!(ike_a.remote_id, spec_a.remote_id);
    assert!(
        ike_a.remote_host.ends_with("[4500]"),
        "libipsec forces NAT-T: {ike_a:?}"
    );

    // charon's route to the remote subnet lives in table 220 of its own namespace only.
    let routes_a = t.exec_ok(&t.ns_a, &["ip", "route", "show", "table", "220"]);
    assert!(
        routes_a.contains(&t.subnet_b) && routes_a.contains("ipsec0"),
        "route to {} in table 220 of {}: {routes_a}",
        t.subnet_b,
        t.ns_a
    );
    let root = Command::new("ip")
        .args(["route", "show", "table", "220"])
        .output()
        .expect("ip route (root, read-only)");
    let root = String::from_utf8_lossy(&root.stdout);
    assert!(
        !root.contains(&t.subnet_b) && !root.contains(&t.subnet_a),
        "root namespace table 220 touched: {root}"
    );

    let ping = t.ping(&t.ns_a, t.host_a, t.host_b, 10, 0.2);
    eprintln!("ping host_a -> host_b through the tunnel: {ping:?}");
    assert_eq!(ping.received, 10, "{ping:?}");

    let sas_a = a.sas();
    let sas_b = b.sas();
    let ca = sas_a.installed_children();
    let cb = sas_b.installed_children();
    assert_eq!((ca.len(), cb.len()), (1, 1), "a:\n{sas_a:?}\nb:\n{sas_b:?}");
    let (ca, cb) = (ca[0], cb[0]);
    eprintln!("CHILD_SA a: {ca:?}\nCHILD_SA b: {cb:?}");
    assert_eq!(ca.proposal, "ESP:AES_GCM_16-256");
    assert_eq!(ca.mode, "TUNNEL-in-UDP");
    assert_eq!(ca.spi_in, cb.spi_out, "SPIs must pair up");
    assert_eq!(ca.spi_out, cb.spi_in, "SPIs must pair up");
    for (side, c) in [("a", ca), ("b", cb)] {
        assert!(
            c.packets_in >= 10 && c.packets_out >= 10 && c.bytes_in > 0 && c.bytes_out > 0,
            "{side}: counters {c:?}"
        );
    }
    assert_eq!(ca.local_ts, std::slice::from_ref(&t.subnet_a));
    assert_eq!(ca.remote_ts, std::slice::from_ref(&t.subnet_b));

    // DPD: freeze b; a probes after dpd_delay of silence and gives up after the retransmits.
    let mark = a.log_mark();
    assert!(b.signal(libc::SIGSTOP));
    let frozen = Instant::now();
    let bound = spec_a.dpd_delay * 2 + spec_a.give_up_after() + Duration::from_secs(6);
    let line = a
        .wait_log(mark, "giving up after", bound)
        .unwrap_or_else(|| panic!("no DPD give-up within {bound:?}:\n{}", a.log_tail(40)));
    let gave_up = frozen.elapsed();
    eprintln!(
        "DPD gave up {gave_up:?} after SIGSTOP (bound {bound:?}, retransmits {:?}): {line}",
        spec_a.give_up_after()
    );
    let dpd_sent = a
        .log()
        .get(mark..)
        .unwrap_or("")
        .contains("sending DPD request");
    assert!(dpd_sent, "no DPD request logged:\n{}", a.log_tail(30));
    // dpd_action = clear: the IKE_SA goes away on a.
    assert!(
        support::wait_until(Duration::from_secs(5), Duration::from_millis(200), || {
            a.sas().ike("s2s").is_none()
        }),
        "IKE_SA still listed on a after DPD:\n{}",
        a.list_sas()
    );
    assert!(b.alive(), "a SIGSTOPped charon is still alive");
    assert!(b.signal(libc::SIGCONT));

    // restart: same configuration and VICI socket path, new PID; the tunnel comes up again.
    let (uri_b, old_pid_b) = (b.vici_uri(), b.pid());
    b.restart();
    assert_eq!(b.vici_uri(), uri_b);
    assert_ne!(b.pid(), old_pid_b);
    a.initiate("net")
        .unwrap_or_else(|e| panic!("initiate after restart: {e}\nlog b:\n{}", b.log_tail(40)));
    b.wait_established(Duration::from_secs(10));
    let ping = t.ping(&t.ns_a, t.host_a, t.host_b, 3, 0.2);
    assert_eq!(ping.received, 3, "after restart: {ping:?}");
    assert!(
        b.log().contains("Starting IKE charon daemon")
            && b.log().matches("Starting IKE").count() == 2,
        "log kept across restart"
    );

    // Stop everything: charons exit on SIGTERM, nothing is left in the namespaces.
    let (pid_a, pid_b) = (a.pid(), b.pid());
    let st = a.stop();
    eprintln!("charon a exit: {st}");
    b.stop();
    for ns in [&t.ns_a, &t.ns_b] {
        let out = Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .expect("ip netns pids");
        let pids = String::from_utf8_lossy(&out.stdout);
        assert!(pids.trim().is_empty(), "processes left in {ns}: {pids}");
    }
    drop(a);
    drop(b);
    drop(t);
    let left = support::netns_with_prefix(&prefix);
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    if std::env::var_os("SITEWIRE_KEEP_TEST_DIRS").is_none() {
        assert!(!tempdir.exists(), "{} left behind", tempdir.display());
    }
    for pid in [pid_a, pid_b] {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_ne!(comm.trim(), "charon", "charon pid {pid} still running");
    }
}
