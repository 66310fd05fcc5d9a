//! The shipped dashboard and alert rules against the daemon's metric registry, and
//! promtool's checks. Needs no root; promtool (Debian `prometheus`) for the last part.

mod metrics_support;
mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use metrics_support::{
    dashboard, dashboard_targets, exposed_families, metric_names, panels, rules_exprs, GRAFANA_DIR,
};
use sitewire::dataplane::stats::{RttHistogram, RttSource};
use sitewire::metrics::{
    registry, render, KeyAge, SiteSnapshot, SnapshotSource, TunnelSnapshot, FAMILIES,
};

struct Fixed(SiteSnapshot);

impl SnapshotSource for Fixed {
    fn snapshot(&self) -> SiteSnapshot {
        self.0.clone()
    }
}

/// A site with one sample in every family that has a source today.
fn busy_site() -> SiteSnapshot {
    let h = RttHistogram::default();
    h.observe(Duration::from_micros(250));
    SiteSnapshot {
        tunnels: vec![TunnelSnapshot {
            name: "branch".into(),
            protocol: "wireguard",
            keying: "static",
            up: true,
            rx_bytes: 1,
            tx_bytes: 2,
            rx_packets: 1,
            tx_packets: 1,
            drops: vec![("no_endpoint", 0)],
            last_handshake: Some(1.7e9),
            handshakes: vec![("success", 1)],
            rekeys: vec![("success", 0)],
            dpd_dead: Some(0),
            rtt: vec![(RttSource::Probe, h.snapshot())],
            loss: vec![("probe", 0.0)],
            probes: vec![("answered", 1), ("lost", 0)],
            next_rekey_secs: Some(100.0),
        }],
        drops: vec![("no_route", 0)],
        keys: vec![KeyAge {
            key: "site",
            tunnel: None,
            age_secs: 10.0,
        }],
        vault: Some(Default::default()),
    }
}

fn exposition(site: SiteSnapshot) -> String {
    render(&registry(Arc::new(Fixed(site))), false)
}

fn promtool() -> bool {
    support::find_in_path("promtool").is_some()
        || support::skip_or_fail("needs binary `promtool` (apt: prometheus)")
}

#[test]
fn every_metric_the_dashboard_and_rules_use_is_registered() {
    // Even a site with nothing to report announces every family.
    let registered = exposed_families(&exposition(SiteSnapshot::default()));
    assert_eq!(registered.len(), FAMILIES.len());
    let mut used = BTreeSet::new();
    let targets = dashboard_targets();
    assert!(
        targets.len() >= 20,
        "only {} dashboard queries",
        targets.len()
    );
    for (panel, expr) in &targets {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{panel}: no sitewire metric in {expr}");
        for n in &names {
            assert!(
                registered.contains(n),
                "{panel}: {n} is not registered ({expr})"
            );
        }
        used.extend(names);
    }
    let rules = rules_exprs();
    assert!(rules.len() >= 8, "{rules:?}");
    for expr in &rules {
        for n in metric_names(expr) {
            assert!(
                registered.contains(&n),
                "alert rule uses unregistered {n}: {expr}"
            );
            used.insert(n);
        }
    }
    // And the other way round: every family is shown or alerted on somewhere.
    let unused: Vec<_> = registered
        .iter()
        .filter(|f| !used.contains(*f) && !f.ends_with("scrape_duration_seconds"))
        .collect();
    assert!(
        unused.is_empty(),
        "registered but on no panel or rule: {unused:?}"
    );
}

#[test]
fn the_name_check_catches_a_typo() {
    let registered = exposed_families(&exposition(SiteSnapshot::default()));
    let names = metric_names("rate(sitewire_tunnel_rx_byte_total{tunnel=~\"$tunnel\"}[5m])");
    assert!(names.iter().any(|n| !registered.contains(n)));
    // Histogram series map to their family.
    let names = metric_names("sum(rate(sitewire_tunnel_rtt_seconds_bucket[1m]))");
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["sitewire_tunnel_rtt_seconds"]
    );
}

#[test]
fn dashboard_has_tunnel_variable_rows_and_queries() {
    let d = dashboard();
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for v in ["datasource", "instance", "tunnel", "rtt_source"] {
        assert!(vars.contains(&v), "no ${v} variable: {vars:?}");
    }
    let rows: Vec<String> = panels()
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        rows,
        [
            "Overview",
            "Throughput",
            "Latency and loss",
            "Handshakes, rekeys and dead peers",
            "Vault"
        ]
    );
    let mut ids = BTreeSet::new();
    for p in panels() {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate id in {p}");
        if p["type"] == "row" {
            continue;
        }
        assert!(
            !p["targets"].as_array().unwrap().is_empty(),
            "{} has no query",
            p["title"]
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}");
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let per_tunnel = metric_names(expr)
                .iter()
                .any(|n| n.starts_with("sitewire_tunnel_"));
            assert!(
                !per_tunnel || expr.contains("tunnel=~\"$tunnel\""),
                "{}: per-tunnel query ignores $tunnel: {expr}",
                p["title"]
            );
        }
    }
    for f in ["dashboards/sitewire.yaml", "datasources/prometheus.yaml"] {
        let path = format!("{GRAFANA_DIR}/provisioning/{f}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("apiVersion: 1"), "{path}");
    }
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    if !promtool() {
        return;
    }
    let dir = format!("{GRAFANA_DIR}/alerts");
    for args in [
        vec!["check", "rules", "sitewire.rules.yml"],
        vec!["test", "rules", "sitewire.rules.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn promtool_check_metrics_is_clean() {
    if !promtool() {
        return;
    }
    for site in [SiteSnapshot::default(), busy_site()] {
        let text = exposition(site);
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run promtool");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool check metrics:\n{}{}\n---\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
