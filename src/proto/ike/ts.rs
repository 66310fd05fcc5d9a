//! Traffic-selector arithmetic (RFC 7296 §2.9): narrowing a peer's proposal to what our
//! policy allows, and checking that a narrowed answer stays within what we proposed.

use std::net::IpAddr;

use super::wire::TrafficSelector;

fn key(a: IpAddr) -> (u8, u128) {
    match a {
        IpAddr::V4(v4) => (4, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => (6, u128::from(v6)),
    }
}

fn same_family(a: &TrafficSelector, b: &TrafficSelector) -> bool {
    key(a.start).0 == key(b.start).0
}

fn addr_from(family: u8, v: u128) -> IpAddr {
    if family == 4 {
        IpAddr::from(std::net::Ipv4Addr::from(v as u32))
    } else {
        IpAddr::from(std::net::Ipv6Addr::from(v))
    }
}

/// The intersection of two selectors, if they overlap.
pub fn intersect(a: &TrafficSelector, b: &TrafficSelector) -> Option<TrafficSelector> {
    if !same_family(a, b) {
        return None;
    }
    let proto = match (a.ip_proto, b.ip_proto) {
        (0, p) | (p, 0) => p,
        (p, q) if p == q => p,
        _ => return None,
    };
    let (fam, a_start) = key(a.start);
    let (_, a_end) = key(a.end);
    let (_, b_start) = key(b.start);
    let (_, b_end) = key(b.end);
    let start = a_start.max(b_start);
    let end = a_end.min(b_end);
    let start_port = a.start_port.max(b.start_port);
    let end_port = a.end_port.min(b.end_port);
    if start > end || start_port > end_port {
        return None;
    }
    Some(TrafficSelector {
        ip_proto: proto,
        start_port,
        end_port,
        start: addr_from(fam, start),
        end: addr_from(fam, end),
    })
}

/// Narrow the peer's selectors to our policy: every non-empty intersection of one of
/// theirs with one of ours (duplicates removed). Empty means TS_UNACCEPTABLE.
pub fn narrow(theirs: &[TrafficSelector], policy: &[TrafficSelector]) -> Vec<TrafficSelector> {
    let mut out: Vec<TrafficSelector> = Vec::new();
    for t in theirs {
        for p in policy {
            if let Some(x) = intersect(t, p) {
                if !out.contains(&x) {
                    out.push(x);
                }
            }
        }
    }
    out
}

/// `a` is contained in `b`.
pub fn contains(b: &TrafficSelector, a: &TrafficSelector) -> bool {
    intersect(a, b).is_some_and(|x| x == *a)
}

/// Every selector of `answer` lies inside one of `proposed`.
pub fn within(answer: &[TrafficSelector], proposed: &[TrafficSelector]) -> bool {
    !answer.is_empty()
        && answer
            .iter()
            .all(|a| proposed.iter().any(|p| contains(p, a)))
}

/// Render for logs and status: "10.0.0.0/24" when the range is a prefix, else "a-b";
/// with protocol/ports when restricted.
pub fn display(ts: &TrafficSelector) -> String {
    let (fam, s) = key(ts.start);
    let (_, e) = key(ts.end);
    let bits = if fam == 4 { 32 } else { 128 };
    let span = e.wrapping_sub(s).wrapping_add(1);
    let range = if s <= e && (span == 0 || span.is_power_of_two()) && (span == 0 || s % span == 0) {
        let len = if span == 0 {
            0
        } else {
            bits - span.trailing_zeros()
        };
        format!("{}/{}", ts.start, len)
    } else {
        format!("{}-{}", ts.start, ts.end)
    };
    let mut out = range;
    if ts.ip_proto != 0 {
        out.push_str(&format!(" proto {}", ts.ip_proto));
    }
    if (ts.start_port, ts.end_port) != (0, 65535) {
        out.push_str(&format!(" ports {}-{}", ts.start_port, ts.end_port));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ike::wire::ts_from_subnet;

    fn ts(s: &str) -> TrafficSelector {
        ts_from_subnet(s.parse().unwrap())
    }

    #[test]
    fn narrowing_picks_the_overlap() {
        let theirs = [ts("10.0.0.0/16")];
        let ours = [ts("10.0.5.0/24"), ts("192.168.0.0/24")];
        assert_eq!(narrow(&theirs, &ours), vec![ts("10.0.5.0/24")]);
        assert!(narrow(&[ts("172.16.0.0/12")], &ours).is_empty());
        // v4 never intersects v6
        assert!(narrow(&[ts("fd00::/8")], &ours).is_empty());
    }

    #[test]
    fn ports_and_protocols_intersect() {
        let mut a = ts("10.0.0.0/24");
        a.ip_proto = 6;
        a.start_port = 1000;
        a.end_port = 2000;
        let mut b = ts("10.0.0.128/25");
        b.start_port = 1500;
        let x = intersect(&a, &b).unwrap();
        assert_eq!((x.ip_proto, x.start_port, x.end_port), (6, 1500, 2000));
        let mut c = b;
        c.ip_proto = 17;
        assert!(intersect(&a, &c).is_none());
    }

    #[test]
    fn within_checks_containment() {
        assert!(within(&[ts("10.0.5.0/24")], &[ts("10.0.0.0/16")]));
        assert!(!within(&[ts("10.1.0.0/24")], &[ts("10.0.0.0/16")]));
        assert!(!within(&[], &[ts("10.0.0.0/16")]));
    }

    #[test]
    fn display_prefers_prefixes() {
        assert_eq!(display(&ts("10.0.5.0/24")), "10.0.5.0/24");
        assert_eq!(display(&ts("0.0.0.0/0")), "0.0.0.0/0");
        assert_eq!(display(&ts("fd00::/64")), "fd00::/64");
        let mut odd = ts("10.0.0.0/24");
        odd.end = "10.0.0.9".parse().unwrap();
        assert_eq!(display(&odd), "10.0.0.0-10.0.0.9");
    }
}
