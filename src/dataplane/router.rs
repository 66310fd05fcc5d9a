//! Longest-prefix-match table from destination address to tunnel slot.

use std::net::IpAddr;

use ip_network::IpNetwork;
use ip_network_table::IpNetworkTable;
use ipnet::IpNet;

/// Maps destination prefixes to a value (a tunnel index). Built once per configuration
/// and swapped whole, so lookups never contend with updates.
pub struct Router<T> {
    table: IpNetworkTable<T>,
}

impl<T> Default for Router<T> {
    fn default() -> Self {
        Self {
            table: IpNetworkTable::new(),
        }
    }
}

pub fn to_network(net: IpNet) -> IpNetwork {
    match IpNetwork::new_truncate(net.network(), net.prefix_len()) {
        Ok(n) => n,
        // ipnet already guarantees a valid prefix length for the family.
        Err(_) => unreachable!("invalid prefix length from ipnet"),
    }
}

impl<T> Router<T> {
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        self.table.insert(to_network(net), value)
    }

    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        self.table.longest_match(addr).map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        let (v4, v6) = self.table.len();
        v4 + v6
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether `addr` lies in any of `nets` (cryptokey routing check on inbound packets).
pub fn contains_any(nets: &[IpNet], addr: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut r = Router::default();
        r.insert(net("10.0.0.0/8"), "wide");
        r.insert(net("10.1.0.0/16"), "mid");
        r.insert(net("10.1.2.0/24"), "narrow");
        r.insert(net("fd00::/8"), "v6");
        assert_eq!(r.lookup(ip("10.1.2.3")), Some(&"narrow"));
        assert_eq!(r.lookup(ip("10.1.3.3")), Some(&"mid"));
        assert_eq!(r.lookup(ip("10.9.9.9")), Some(&"wide"));
        assert_eq!(r.lookup(ip("11.0.0.1")), None);
        assert_eq!(r.lookup(ip("fd12::1")), Some(&"v6"));
        assert_eq!(r.lookup(ip("fe80::1")), None);
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn host_bits_are_ignored() {
        let mut r = Router::default();
        r.insert(net("192.168.50.7/24"), 1);
        assert_eq!(r.lookup(ip("192.168.50.200")), Some(&1));
    }

    #[test]
    fn default_route_and_host_route() {
        let mut r = Router::default();
        r.insert(net("0.0.0.0/0"), 0);
        r.insert(net("192.0.2.1/32"), 1);
        assert_eq!(r.lookup(ip("192.0.2.1")), Some(&1));
        assert_eq!(r.lookup(ip("192.0.2.2")), Some(&0));
    }

    #[test]
    fn contains_any_checks_all() {
        let nets = [net("10.0.0.0/24"), net("fd00::/64")];
        assert!(contains_any(&nets, ip("10.0.0.9")));
        assert!(contains_any(&nets, ip("fd00::9")));
        assert!(!contains_any(&nets, ip("10.0.1.9")));
    }
}
