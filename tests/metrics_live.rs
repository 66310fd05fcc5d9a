//! Metrics against reality: two sitewire sites in network namespaces with traffic, a real
//! Prometheus (Debian's `prometheus`) scraping both, the shipped dashboard's queries run
//! through Prometheus' HTTP API, and the counters and probe RTT checked against iperf3
//! and ping measured in the same run.
//!
//! Reachability: each site serves `/metrics` on its underlay (veth) address; Prometheus
//! runs inside site a's namespace on 127.0.0.1 and scrapes both over the veth pair. The
//! test process talks to it (and to the metrics endpoints) from a thread that has
//! joined that namespace (`setns` is per thread). Nothing leaves the test's namespaces.

mod metrics_support;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use metrics_support::{
    dashboard_targets, exposed_families, http_get, metric_names, parse_samples, prom_query,
    rules_exprs, substitute_grafana_vars, variable_queries, GRAFANA_DIR,
};
use support::site::{wait_tunnel_up, SitePair};
use support::{prereq, wait_until, Site, Topo};

/// Families this build announces but has no source for yet (no Vault client): their
/// panels may be empty. The test fails if one of them starts emitting samples, so the
/// list cannot go stale.
const UNSOURCED: &[&str] = &["sitewire_vault_up", "sitewire_vault_requests_total"];

struct Sites {
    topo: Topo,
    a: support::Proc,
    b: support::Proc,
    if_a: String,
    metrics_a: String,
    metrics_b: String,
}

fn two_sites_with_metrics(tag: &str) -> Sites {
    let topo = Topo::new(tag);
    let (if_a, if_b) = (topo.ifname("ma"), topo.ifname("mb"));
    let (ka, kb) = (topo.sitewire_key("a"), topo.sitewire_key("b"));
    let port = topo.port(0);
    let mport = topo.port(1);
    let metrics_a = format!("{}:{mport}", topo.underlay_a);
    let metrics_b = format!("{}:{mport}", topo.underlay_b);
    let extra = |listen: &str, target: Ipv4Addr| {
        format!(
            "persistent_keepalive = \"5s\"\nprobe = {{ target = \"{target}\", interval = \"1s\" }}\n\n\
             [metrics]\nlisten = \"{listen}\"\n"
        )
    };
    let (extra_a, extra_b) = (
        extra(&metrics_a, topo.host_b),
        extra(&metrics_b, topo.host_a),
    );
    let (cfg_a, cfg_b) = SitePair {
        extra_a: &extra_a,
        extra_b: &extra_b,
        ..SitePair::new(&if_a, &if_b, &ka, &kb, port)
    }
    .render(&topo);
    let b = topo.start_sitewire(Site::B, "b", &cfg_b);
    let a = topo.start_sitewire(Site::A, "a", &cfg_a);
    Sites {
        topo,
        a,
        b,
        if_a,
        metrics_a,
        metrics_b,
    }
}

/// GET /metrics of a site (from inside namespace a, which reaches both over the veth).
fn scrape(ns: &str, addr: &str) -> String {
    let (status, _ct, body) = http_get(ns, addr, "/metrics", None);
    assert_eq!(status, 200, "GET http://{addr}/metrics: {body}");
    body
}

fn value(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key} in {:#?}", samples.keys()))
}

/// Runs iperf3 (TCP, `-n bytes`, client in a, server in b); returns (bytes the client
/// wrote, bytes the server received, retransmits). A client can finish with data still
/// in its socket buffer that never crosses, so "written" is only an upper bound.
fn iperf_bytes(t: &Topo, bytes: u64) -> (u64, u64, u64) {
    let port = t.port(9);
    let (port_s, sip, cip, n) = (
        port.to_string(),
        t.host_b.to_string(),
        t.host_a.to_string(),
        bytes.to_string(),
    );
    let server = t.spawn(
        &t.ns_b,
        "iperf3-server",
        &["iperf3", "-s", "-1", "-B", &sip, "-p", &port_s],
    );
    t.wait_tcp_listen(&t.ns_b, port, &server);
    let out = t
        .exec_timeout(
            &t.ns_a,
            &[
                "iperf3", "-c", &sip, "-B", &cip, "-p", &port_s, "-n", &n, "-J", "-C", "cubic",
            ],
            Duration::from_secs(60),
        )
        .expect("iperf3 finished");
    let _ = server.wait_exit(Duration::from_secs(5));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    assert!(
        out.status.success() && json.get("error").is_none(),
        "iperf3 failed: {json}"
    );
    let sent = json["end"]["sum_sent"]["bytes"].as_f64().unwrap_or(0.0) as u64;
    let received = json["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0) as u64;
    let retrans = json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    (sent, received, retrans)
}

#[test]
fn prometheus_scrapes_two_sites_and_every_dashboard_query_has_data() {
    if !prereq(&["ping", "iperf3", "prometheus", "promtool"]) {
        return;
    }
    let s = two_sites_with_metrics("metrics");
    let t = &s.topo;
    assert!(
        wait_tunnel_up(&s.if_a, "to-b", Duration::from_secs(10)),
        "tunnel not up:\n{}\n{}",
        s.a.log(),
        s.b.log()
    );
    assert!(t.wait_ping(&t.ns_a, t.host_a, t.host_b, Duration::from_secs(5)));

    // ---- Prometheus in namespace a, scraping both sites every second ----
    let prom_port = support::free_loopback_port();
    let prom_addr = format!("127.0.0.1:{prom_port}");
    let dir = t.tempdir();
    let rules = format!("{GRAFANA_DIR}/alerts/sitewire.rules.yml");
    let prom_cfg = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {rules}\n\
         scrape_configs:\n  - job_name: sitewire\n    static_configs:\n      - targets: [\"{}\", \"{}\"]\n",
        s.metrics_a, s.metrics_b
    );
    let cfg_path = dir.join("prometheus.yml");
    std::fs::write(&cfg_path, prom_cfg).unwrap();
    let prom = t.spawn(
        &t.ns_a,
        "prometheus",
        &[
            "prometheus",
            &format!("--config.file={}", cfg_path.display()),
            &format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
            &format!("--web.listen-address={prom_addr}"),
            "--log.level=warn",
        ],
    );

    // ---- counters match reality: N bytes through the tunnel ----
    let before_a = parse_samples(&scrape(&t.ns_a, &s.metrics_a));
    let before_b = parse_samples(&scrape(&t.ns_a, &s.metrics_b));
    let n: u64 = 20 * 1024 * 1024;
    let (sent, received, retrans) = iperf_bytes(t, n);
    // Let in-flight ACKs and keepalives settle before reading the counters.
    std::thread::sleep(Duration::from_millis(500));
    let after_a = parse_samples(&scrape(&t.ns_a, &s.metrics_a));
    let after_b = parse_samples(&scrape(&t.ns_a, &s.metrics_b));
    let delta = |after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>, k: &str| {
        (value(after, k) - value(before, k)) as u64
    };
    let tx_a = delta(
        &after_a,
        &before_a,
        "sitewire_tunnel_tx_bytes_total{tunnel=\"to-b\"}",
    );
    let rx_b = delta(
        &after_b,
        &before_b,
        "sitewire_tunnel_rx_bytes_total{tunnel=\"to-a\"}",
    );
    let txp_a = delta(
        &after_a,
        &before_a,
        "sitewire_tunnel_tx_packets_total{tunnel=\"to-b\"}",
    );
    let rxp_b = delta(
        &after_b,
        &before_b,
        "sitewire_tunnel_rx_packets_total{tunnel=\"to-a\"}",
    );
    // Bounds. Lower: every byte the server received crossed the tunnel in TCP segments
    // of at most 1380 payload bytes (TUN MTU 1420 - IPv4 20 - TCP 20), each adding at
    // least IPv4 20 + TCP 20 + WireGuard 32 = 72 bytes. Upper: at most what the client
    // wrote plus retransmissions, plus IPv4 20 + TCP 32 (timestamps) + WireGuard 32 +
    // padding 15 = 99 bytes per segment of >= 1000 payload bytes (<= 10 %), plus 64 KiB
    // for the iperf3 control connection, handshakes, keepalives and probes.
    let slack = 64 * 1024;
    let lower = received + 72 * received.div_ceil(1380);
    let upper = (sent + retrans * 1380) * 110 / 100 + slack;
    eprintln!(
        "iperf3 wrote {sent} B, server received {received} B ({retrans} retransmits): \
         a tx {tx_a} B / {txp_a} datagrams, b rx {rx_b} B / {rxp_b} datagrams \
         (wire overhead {:.2} % over received); bounds {lower}..={upper}",
        (tx_a as f64 / received as f64 - 1.0) * 100.0
    );
    assert!(
        received >= n / 2,
        "iperf3 server received only {received} of {n} bytes"
    );
    for (what, v) in [("a tx", tx_a), ("b rx", rx_b)] {
        assert!(
            (lower..=upper).contains(&v),
            "{what} moved by {v} bytes; expected {lower}..={upper}"
        );
    }
    assert!(
        tx_a.abs_diff(rx_b) <= slack,
        "a sent {tx_a} bytes but b received {rx_b}"
    );
    assert!(
        txp_a >= received.div_ceil(1380),
        "a tx packets {txp_a} for {received} bytes"
    );
    assert!(
        txp_a.abs_diff(rxp_b) <= 64,
        "datagrams: a tx {txp_a}, b rx {rxp_b}"
    );

    // ---- probe RTT vs ping, same run, concurrently ----
    let probe_key = "sitewire_tunnel_rtt_seconds_sum{tunnel=\"to-b\",source=\"probe\"}";
    let count_key = "sitewire_tunnel_rtt_seconds_count{tunnel=\"to-b\",source=\"probe\"}";
    let before = parse_samples(&scrape(&t.ns_a, &s.metrics_a));
    let ping = t.ping(&t.ns_a, t.host_a, t.host_b, 100, 0.2);
    let after = parse_samples(&scrape(&t.ns_a, &s.metrics_a));
    let probes = value(&after, count_key) - value(&before, count_key);
    let mean_ms = (value(&after, probe_key) - value(&before, probe_key)) / probes * 1000.0;
    let status = support::site::tunnel_status(&s.if_a, "to-b");
    eprintln!(
        "ping a->b: min {:.3} avg {:.3} max {:.3} ms ({} replies); probe over the same 20 s: \
         mean {mean_ms:.3} ms of {probes} probes; status rtt: {}",
        ping.rtt_min_ms, ping.rtt_avg_ms, ping.rtt_max_ms, ping.received, status["rtt"]
    );
    assert_eq!(ping.received, 100, "ping lost packets: {}", ping.output);
    assert!(probes >= 15.0, "only {probes} probes answered in 20 s");
    // Tolerance: 10 % of ping's range, at least 20 µs, for the timer granularity of the
    // two clocks (ping prints microseconds).
    let tol = ((ping.rtt_max_ms - ping.rtt_min_ms) * 0.1).max(0.02);
    assert!(
        mean_ms >= ping.rtt_min_ms - tol && mean_ms <= ping.rtt_max_ms + tol,
        "probe mean RTT {mean_ms:.3} ms outside ping's [{:.3}, {:.3}] ms (tolerance {tol:.3})",
        ping.rtt_min_ms,
        ping.rtt_max_ms
    );
    let st_probe = &status["rtt"]["probe"];
    assert!(st_probe["p50_ms"].as_f64().unwrap() > 0.0, "{status}");
    assert!(st_probe["p99_ms"].as_f64().unwrap() >= st_probe["p50_ms"].as_f64().unwrap());
    assert_eq!(status["probe"]["lost"], 0, "{status}");
    assert_eq!(status["loss"]["probe"], 0.0, "{status}");

    // ---- promtool check metrics on the live output ----
    let live_a = scrape(&t.ns_a, &s.metrics_a);
    let out = support::output_with_timeout(
        {
            let mut c = std::process::Command::new("sh");
            let file = dir.join("metrics-a.txt");
            std::fs::write(&file, &live_a).unwrap();
            c.args([
                "-c",
                &format!("promtool check metrics < {}", file.display()),
            ]);
            c
        },
        Duration::from_secs(30),
    )
    .expect("promtool finished");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{live_a}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // OpenMetrics for whoever asks for it (Prometheus does).
    let (_, ct, om) = http_get(
        &t.ns_a,
        &s.metrics_a,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0"),
    );
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(om.ends_with("# EOF\n"));

    // ---- every metric used by the dashboard and the rules exists in /metrics ----
    let families_a = exposed_families(&live_a);
    let families_b = exposed_families(&scrape(&t.ns_a, &s.metrics_b));
    assert_eq!(families_a, families_b);
    let mut used = BTreeSet::new();
    for (_, expr) in dashboard_targets() {
        used.extend(metric_names(&expr));
    }
    for expr in rules_exprs() {
        used.extend(metric_names(&expr));
    }
    let missing: Vec<_> = used.difference(&families_a).collect();
    assert!(missing.is_empty(), "used but not exposed: {missing:?}");

    // ---- Prometheus has both targets up and the rules loaded ----
    let ok = wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        assert!(prom.alive(), "prometheus exited:\n{}", prom.log());
        prom_query(&t.ns_a, &prom_addr, "sum(up{job=\"sitewire\"})")
            .ok()
            .and_then(|r| r.first().map(|(_, v)| *v == 2.0))
            .unwrap_or(false)
    });
    assert!(
        ok,
        "prometheus did not see both targets up:\n{}",
        prom.log()
    );
    // Enough history for rate() over the dashboard's windows.
    let started = Instant::now();
    // Traffic while Prometheus watches, so throughput panels have something to show.
    let _ = iperf_bytes(t, 4 * 1024 * 1024);
    let wait = Duration::from_secs(25).saturating_sub(started.elapsed());
    std::thread::sleep(wait);

    let (status, _, body) = http_get(&t.ns_a, &prom_addr, "/api/v1/rules", None);
    assert_eq!(status, 200);
    let rules: serde_json::Value = serde_json::from_str(&body).unwrap();
    let groups = rules["data"]["groups"].as_array().expect("rule groups");
    let loaded: Vec<&serde_json::Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .collect();
    assert!(loaded.len() >= 6, "rules not loaded: {body}");
    for r in &loaded {
        assert_eq!(r["health"], "ok", "rule unhealthy: {r}");
    }
    // Healthy tunnels: nothing fires.
    let firing: Vec<_> = loaded
        .iter()
        .filter(|r| r["state"] == "firing" || r["state"] == "pending")
        .map(|r| r["name"].as_str().unwrap_or("?"))
        .collect();
    assert!(
        firing.is_empty(),
        "alerts pending/firing on healthy tunnels: {firing:?}"
    );

    // ---- every dashboard query returns data ----
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (panel, expr) in dashboard_targets() {
        let q = substitute_grafana_vars(&expr);
        match prom_query(&t.ns_a, &prom_addr, &q) {
            Ok(v) if v.iter().any(|(_, x)| x.is_finite()) => {
                report.push(format!("ok   {panel}: {} series", v.len()))
            }
            Ok(v) => {
                let names = metric_names(&expr);
                let unsourced =
                    !names.is_empty() && names.iter().all(|n| UNSOURCED.contains(&n.as_str()));
                if unsourced {
                    report.push(format!("n/a  {panel}: no source in this build ({q})"));
                } else {
                    failures.push(format!("{panel}: {q} -> {v:?}"));
                }
            }
            Err(e) => failures.push(format!("{panel}: {q} -> error {e}")),
        }
    }
    eprintln!("dashboard queries:\n{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "dashboard queries without data:\n{}",
        failures.join("\n")
    );
    // The exemption above must not hide a family that now has samples.
    let live = parse_samples(&scrape(&t.ns_a, &s.metrics_a));
    for fam in UNSOURCED {
        assert!(
            !live
                .keys()
                .any(|k| k.starts_with(&format!("{fam}{{")) || k == fam),
            "{fam} has samples now: remove it from UNSOURCED"
        );
    }
    for (name, q) in variable_queries() {
        let q = q
            .strip_prefix("label_values(")
            .and_then(|r| r.rsplit_once(','))
            .map_or(q.clone(), |(m, _)| m.to_string());
        let v = prom_query(&t.ns_a, &prom_addr, &substitute_grafana_vars(&q)).unwrap();
        assert!(!v.is_empty(), "variable {name}: {q} has no series");
    }
}
