//! Helpers for the metrics tests: HTTP from inside a namespace, Prometheus queries,
//! parsing the exposition format, and reading the shipped dashboard and alert rules.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// The shipped dashboard, provisioning files and alert rules.
pub const GRAFANA_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana");

/// Runs `f` on a thread that joined network namespace `ns` (setns is per thread), so
/// sockets it opens live in that namespace.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// HTTP/1.1 GET from inside `ns`: (status, content type, body). Panics on I/O errors.
pub fn http_get(ns: &str, addr: &str, path: &str, accept: Option<&str>) -> (u16, String, String) {
    let (addr, path) = (addr.to_string(), path.to_string());
    let accept = accept.map(str::to_string);
    in_netns(ns, move || {
        let mut s = TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        if let Some(a) = accept {
            req.push_str(&format!("Accept: {a}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .unwrap_or_else(|e| panic!("read {addr}{path}: {e}"));
        parse_response(&raw)
    })
}

fn parse_response(raw: &[u8]) -> (u16, String, String) {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP header end");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("HTTP status");
    let header = |name: &str| {
        head.lines()
            .skip(1)
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    if header("transfer-encoding").eq_ignore_ascii_case("chunked") {
        body = dechunk(&body);
    }
    (
        status,
        header("content-type"),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_s = String::from_utf8_lossy(&b[..eol]);
        let size =
            usize::from_str_radix(size_s.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        if size == 0 || b.len() < eol + 2 + size {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[(eol + 4 + size).min(b.len())..];
    }
}

/// Percent-encodes a query parameter value.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query through Prometheus' HTTP API: each series' labels (as JSON text)
/// and value. Err with Prometheus' error message.
pub fn prom_query(ns: &str, prom: &str, q: &str) -> Result<Vec<(String, f64)>, String> {
    let (status, _, body) = http_get(
        ns,
        prom,
        &format!("/api/v1/query?query={}", urlencode(q)),
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| format!("HTTP {status}, bad JSON ({e}): {body}"))?;
    if v["status"] != "success" {
        return Err(format!("HTTP {status}: {}", v["error"]));
    }
    let data = &v["data"];
    let num = |x: &serde_json::Value| {
        x.as_str()
            .map(|s| match s {
                "NaN" => f64::NAN,
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                s => s.parse().unwrap_or(f64::NAN),
            })
            .unwrap_or(f64::NAN)
    };
    Ok(match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| (r["metric"].to_string(), num(&r["value"][1])))
                    .collect()
            })
            .unwrap_or_default(),
        Some("scalar") => vec![(String::new(), num(&data["result"][1]))],
        other => return Err(format!("unexpected result type {other:?}")),
    })
}

/// Samples of a Prometheus text exposition, keyed by `name{labels}` as printed.
pub fn parse_samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Family names announced by `# TYPE` lines.
pub fn exposed_families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// `sitewire_*` metric names in a PromQL expression, histogram series suffixes removed.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("sitewire_") {
        let start = i + pos;
        let boundary = start == 0 || {
            let c = bytes[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_' || c == b'"' || c == b'$')
        };
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            let mut name = &expr[start..end];
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix) {
                    name = base;
                }
            }
            out.insert(name.to_string());
        }
        i = end;
    }
    out
}

/// The dashboard JSON.
pub fn dashboard() -> serde_json::Value {
    let path = format!("{GRAFANA_DIR}/dashboards/sitewire.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every panel (rows' nested panels included) with its title.
pub fn panels() -> Vec<serde_json::Value> {
    fn walk(v: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
        for p in v["panels"].as_array().into_iter().flatten() {
            out.push(p.clone());
            walk(p, out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard(), &mut out);
    out
}

/// (panel title + refId, PromQL) of every query in the dashboard.
pub fn dashboard_targets() -> Vec<(String, String)> {
    panels()
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |t| {
                    let expr = t["expr"].as_str()?.to_string();
                    Some((
                        format!("{title} [{}]", t["refId"].as_str().unwrap_or("?")),
                        expr,
                    ))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Template variable queries of the dashboard (they must work too).
pub fn variable_queries() -> Vec<(String, String)> {
    dashboard()["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "query")
        .filter_map(|v| {
            let q = match &v["query"] {
                serde_json::Value::String(s) => s.clone(),
                o => o["query"].as_str()?.to_string(),
            };
            Some((v["name"].as_str()?.to_string(), q))
        })
        .collect()
}

/// `expr:` values of the alert rules file (single-line or block scalars).
pub fn rules_exprs() -> Vec<String> {
    let path = format!("{GRAFANA_DIR}/alerts/sitewire.rules.yml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let indent = line.len() - line.trim_start().len();
        if let Some(rest) = line.trim_start().strip_prefix("expr:") {
            let rest = rest.trim();
            if rest.starts_with('|') || rest.starts_with('>') {
                let mut block = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    let ni = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && ni <= indent {
                        break;
                    }
                    block.push(next.trim());
                    i += 1;
                }
                out.push(block.join(" "));
            } else {
                out.push(rest.trim_matches(|c| c == '\'' || c == '"').to_string());
            }
        }
        i += 1;
    }
    out
}

/// Grafana's template variables replaced the way Grafana would for "All" selections
/// and a short time range.
pub fn substitute_grafana_vars(expr: &str) -> String {
    [
        ("${__rate_interval}", "1m"),
        ("$__rate_interval", "1m"),
        ("${__interval}", "5s"),
        ("$__interval", "5s"),
        ("${__range}", "5m"),
        ("$__range", "5m"),
        ("${instance}", ".*"),
        ("$instance", ".*"),
        ("${tunnel}", ".*"),
        ("$tunnel", ".*"),
        ("${rtt_source}", "probe"),
        ("$rtt_source", "probe"),
    ]
    .iter()
    .fold(expr.to_string(), |e, (from, to)| e.replace(from, to))
}
