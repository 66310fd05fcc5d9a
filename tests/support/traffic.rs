//! Traffic generators: iputils `ping` and `iperf3`, always run inside a test namespace.

use super::{Proc, Topo};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Summary of one `ping` run. RTT fields are NaN when no reply came back.
#[derive(Clone, Debug)]
pub struct PingStats {
    pub sent: u32,
    pub received: u32,
    pub loss_pct: f64,
    pub rtt_min_ms: f64,
    pub rtt_avg_ms: f64,
    pub rtt_max_ms: f64,
    /// The raw ping output (for assertion messages).
    pub output: String,
}

/// Parses the summary of iputils ping (`-q` or not).
pub fn parse_ping(output: &str) -> Option<PingStats> {
    let mut stats = PingStats {
        sent: 0,
        received: 0,
        loss_pct: f64::NAN,
        rtt_min_ms: f64::NAN,
        rtt_avg_ms: f64::NAN,
        rtt_max_ms: f64::NAN,
        output: output.to_string(),
    };
    let mut found = false;
    for line in output.lines() {
        let line = line.trim();
        if line.contains("packets transmitted") {
            // "5 packets transmitted, 5 received, +1 errors, 0% packet loss, time 4005ms"
            for part in line.split(',').map(str::trim) {
                let mut w = part.split_whitespace();
                let (Some(num), Some(what)) = (w.next(), w.next()) else {
                    continue;
                };
                match what {
                    "packets" => stats.sent = num.parse().ok()?,
                    "received" => stats.received = num.parse().ok()?,
                    _ if part.ends_with("packet loss") => {
                        stats.loss_pct = num.trim_end_matches('%').parse().ok()?
                    }
                    _ => {}
                }
            }
            found = true;
        } else if let Some(rest) = line
            .strip_prefix("rtt min/avg/max/mdev = ")
            .or_else(|| line.strip_prefix("round-trip min/avg/max/stddev = "))
        {
            // "0.041/0.052/0.071/0.011 ms"
            let v: Vec<f64> = rest
                .trim_end_matches("ms")
                .trim()
                .split('/')
                .filter_map(|x| x.parse().ok())
                .collect();
            if v.len() >= 3 {
                stats.rtt_min_ms = v[0];
                stats.rtt_avg_ms = v[1];
                stats.rtt_max_ms = v[2];
            }
        }
    }
    found.then_some(stats)
}

/// How many distinct sequence numbers 1..=`count` have a reply line
/// ("64 bytes from 10.0.0.2: icmp_seq=7 ttl=64 time=0.1 ms") in ping's output.
pub fn answered_seqs(output: &str, count: u32) -> u32 {
    let mut seen = vec![false; count as usize + 1];
    for line in output.lines().filter(|l| l.contains(" bytes from ")) {
        let seq = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("icmp_seq="))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(slot) = seq.and_then(|n| seen.get_mut(n)) {
            *slot = true;
        }
    }
    seen.iter().skip(1).filter(|&&s| s).count() as u32
}

/// Result of one iperf3 TCP test, from the client's `-J` output.
#[derive(Clone, Debug)]
pub struct IperfResult {
    /// `end.sum_received.bytes`: what the receiving side got.
    pub bytes_received: u64,
    /// `end.sum_received.bits_per_second`.
    pub bits_per_second: f64,
    /// `end.sum_sent.retransmits` (0 if absent).
    pub retransmits: u64,
    /// The whole JSON document.
    pub json: serde_json::Value,
}

static IPERF_SEQ: AtomicU16 = AtomicU16::new(0);

impl Topo {
    /// `ping -n -c COUNT -i INTERVAL -W 1 -w DEADLINE -I SRC DST` in `ns`: whether each of the
    /// COUNT requests was answered. Panics if ping produced no summary (e.g. SRC is not a
    /// local address); a lossy result is returned, not a panic.
    ///
    /// Plain `-c COUNT` is not enough: iputils stops as soon as the last request has been out
    /// for twice the slowest round trip so far (at least one interval) and counts a reply
    /// that is merely late, on a loaded machine, as lost; a tunnel that passed every packet
    /// both ways then looked lossy. With a deadline (the send time of all COUNT pings, half
    /// again, plus 3 s) ping waits, but it also keeps sending until it has COUNT replies, so
    /// its own summary would hide a loss. Hence `sent` is COUNT and `received` the number of
    /// sequence numbers 1..=COUNT answered, read from the reply lines; the RTTs are ping's.
    pub fn ping(
        &self,
        ns: &str,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        count: u32,
        interval: f64,
    ) -> PingStats {
        let deadline = (count as f64 * interval.max(0.0) * 1.5).ceil() as u64 + 3;
        let (count_s, interval_s, deadline_s, src_s, dst_s) = (
            count.to_string(),
            interval.to_string(),
            deadline.to_string(),
            src.to_string(),
            dst.to_string(),
        );
        let cmd = [
            "ping",
            "-n",
            "-c",
            &count_s,
            "-i",
            &interval_s,
            "-W",
            "1",
            "-w",
            &deadline_s,
            "-I",
            &src_s,
            &dst_s,
        ];
        let limit = Duration::from_secs(deadline + 15);
        let out = self
            .exec_timeout(ns, &cmd, limit)
            .unwrap_or_else(|| panic!("{cmd:?} in {ns} did not finish within {limit:?}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut stats = parse_ping(&text).unwrap_or_else(|| {
            panic!("{cmd:?} in {ns}: no ping summary ({}):\n{text}", out.status)
        });
        let answered = answered_seqs(&text, count);
        let replies = text.lines().filter(|l| l.contains(" bytes from ")).count();
        stats.output = text
            .lines()
            .filter(|l| !l.contains(" bytes from "))
            .chain(std::iter::once(
                format!("({replies} reply lines; {answered} of icmp_seq 1..={count} answered)")
                    .as_str(),
            ))
            .collect::<Vec<_>>()
            .join("\n");
        stats.sent = count;
        stats.received = answered;
        stats.loss_pct = 100.0 * f64::from(count - answered) / f64::from(count.max(1));
        stats
    }

    /// Single pings (1 s reply timeout each) until one is answered (-> true) or `timeout` passes.
    pub fn wait_ping(&self, ns: &str, src: Ipv4Addr, dst: Ipv4Addr, timeout: Duration) -> bool {
        let (src_s, dst_s) = (src.to_string(), dst.to_string());
        let cmd = [
            "ping", "-n", "-q", "-c", "1", "-W", "1", "-I", &src_s, &dst_s,
        ];
        let deadline = Instant::now() + timeout;
        loop {
            let started = Instant::now();
            let ok = self
                .exec_timeout(ns, &cmd, Duration::from_secs(5))
                .is_some_and(|o| o.status.success());
            if ok {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            // ping fails at once when there is no route yet: do not spin.
            let spent = started.elapsed();
            if spent < Duration::from_millis(200) {
                std::thread::sleep(Duration::from_millis(200) - spent);
            }
        }
    }

    /// One iperf3 TCP test: a one-shot server (`iperf3 -s -1 -B server_ip`) in `server_ns`, the
    /// client (`-J -C cubic -B client_src`) in `client_ns` for `secs` seconds with `streams`
    /// parallel streams. `reverse` = `-R` (the server sends), so "TCP both ways" is two calls.
    /// Panics when iperf3 fails.
    #[allow(clippy::too_many_arguments)]
    pub fn iperf3_tcp(
        &self,
        server_ns: &str,
        server_ip: Ipv4Addr,
        client_ns: &str,
        client_src: Ipv4Addr,
        secs: u32,
        streams: u32,
        reverse: bool,
    ) -> IperfResult {
        let port = self.port(8 + IPERF_SEQ.fetch_add(1, Ordering::Relaxed) % 8);
        let (port_s, sip, cip) = (
            port.to_string(),
            server_ip.to_string(),
            client_src.to_string(),
        );
        let server = self.spawn(
            server_ns,
            "iperf3-server",
            &["iperf3", "-s", "-1", "-B", &sip, "-p", &port_s],
        );
        self.wait_tcp_listen(server_ns, port, &server);
        let (secs_s, streams_s) = (secs.to_string(), streams.to_string());
        let mut cmd = vec![
            "iperf3",
            "-c",
            &sip,
            "-B",
            &cip,
            "-p",
            &port_s,
            "-t",
            &secs_s,
            "-P",
            &streams_s,
            "-J",
            "-C",
            "cubic",
            "--connect-timeout",
            "5000",
        ];
        if reverse {
            cmd.push("-R");
        }
        let limit = Duration::from_secs(secs as u64 + 30);
        let out = self.exec_timeout(client_ns, &cmd, limit);
        if server.wait_exit(Duration::from_secs(5)).is_none() {
            server.stop(Duration::from_secs(2));
        }
        let out = out.unwrap_or_else(|| panic!("iperf3 client {cmd:?} hung past {limit:?}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "iperf3 client {cmd:?}: bad JSON ({e}); status {}; stderr: {}; server log: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                server.log()
            )
        });
        if !out.status.success() || json.get("error").is_some() {
            panic!(
                "iperf3 client {cmd:?} failed ({}): {}; server log: {}",
                out.status,
                json.get("error").and_then(|e| e.as_str()).unwrap_or("?"),
                server.log()
            );
        }
        let recv = &json["end"]["sum_received"];
        IperfResult {
            bytes_received: recv["bytes"].as_f64().unwrap_or(0.0) as u64,
            bits_per_second: recv["bits_per_second"].as_f64().unwrap_or(0.0),
            retransmits: json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
            json,
        }
    }

    /// Waits until something listens on TCP `port` in `ns` (`ss -Hltn`); panics with the log of
    /// `proc` if it exits first or 10 s pass.
    pub fn wait_tcp_listen(&self, ns: &str, port: u16, proc: &Proc) {
        let filter = format!("sport = :{port}");
        let ok = super::wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            if !proc.alive() {
                panic!("{proc:?} exited before listening on {port}: {}", proc.log());
            }
            let out = self.exec(ns, &["ss", "-Hltn", &filter]);
            !String::from_utf8_lossy(&out.stdout).trim().is_empty()
        });
        assert!(
            ok,
            "{proc:?} not listening on TCP {port} in {ns} after 10 s: {}",
            proc.log()
        );
    }
}
