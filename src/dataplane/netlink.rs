//! Interface addresses, MTU and routes through rtnetlink.
//!
//! Routes sitewire installs carry their own routing protocol number
//! ([`ROUTE_PROTOCOL`]) so that `ip route show proto 77` lists exactly them, and a
//! restart after a crash can tell its leftovers from an operator's routes.

use std::net::IpAddr;

use anyhow::{anyhow, Context, Result};
use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// The `proto` number on every route sitewire adds (`ip route show proto 77`).
pub const ROUTE_PROTOCOL: u8 = 77;

pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Open a netlink connection; its driver runs as a task on the current runtime.
    pub fn connect() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn link_index(&self, name: &str) -> Result<u32> {
        let link = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await
            .with_context(|| format!("looking up interface {name}"))?
            .ok_or_else(|| anyhow!("interface {name} not found"))?;
        Ok(link.header.index)
    }

    pub async fn set_mtu_up(&self, index: u32, mtu: u16) -> Result<()> {
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .mtu(u32::from(mtu))
                    .up()
                    .build(),
            )
            .execute()
            .await
            .context("setting MTU and bringing the interface up")
    }

    pub async fn add_address(&self, index: u32, addr: IpNet) -> Result<()> {
        match self
            .handle
            .address()
            .add(index, addr.addr(), addr.prefix_len())
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_exists(&e) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("adding address {addr}")),
        }
    }

    fn route_message(
        index: u32,
        net: IpNet,
    ) -> Result<rtnetlink::packet_route::route::RouteMessage> {
        Ok(RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .map_err(|e| anyhow!("route {net}: {e}"))?
            .output_interface(index)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .build())
    }

    /// Add a route for `net` through the interface; an identical existing route is fine.
    pub async fn add_route(&self, index: u32, net: IpNet) -> Result<()> {
        let msg = Self::route_message(index, net)?;
        match self.handle.route().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_exists(&e) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("adding route {net}")),
        }
    }

    /// Remove a route; a route already gone (e.g. the interface went away) is fine.
    pub async fn del_route(&self, index: u32, net: IpNet) -> Result<()> {
        let mut msg = Self::route_message(index, net)?;
        // Match the route whatever its scope (`ip route add ... dev X` makes scope link).
        msg.header.scope = rtnetlink::packet_route::route::RouteScope::NoWhere;
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(m))
                if matches!(m.raw_code(), -3 /* ESRCH */ | -19 /* ENODEV */) =>
            {
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("removing route {net}")),
        }
    }
}

/// A link found by name: its index and whether it is a TUN/TAP device.
#[derive(Debug, Clone, Copy)]
pub struct LinkInfo {
    pub index: u32,
    pub is_tun: bool,
    pub mtu: Option<u32>,
    /// A TUN device has carrier while a process has it open.
    pub carrier: Option<bool>,
}

/// A route carrying sitewire's [`ROUTE_PROTOCOL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OurRoute {
    pub net: IpNet,
    pub oif: Option<u32>,
}

impl Netlink {
    /// The link called `name`, if there is one (in this network namespace).
    pub async fn find_link(&self, name: &str) -> Result<Option<LinkInfo>> {
        use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo as Info};
        let found = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await;
        let Some(link) = absent_if_no_device(found, name)? else {
            return Ok(None);
        };
        let mut info = LinkInfo {
            index: link.header.index,
            is_tun: false,
            mtu: None,
            carrier: None,
        };
        for a in &link.attributes {
            match a {
                LinkAttribute::LinkInfo(infos) => {
                    info.is_tun |= infos.iter().any(|i| matches!(i, Info::Kind(InfoKind::Tun)));
                }
                LinkAttribute::Mtu(m) => info.mtu = Some(*m),
                LinkAttribute::Carrier(c) => info.carrier = Some(*c != 0),
                _ => {}
            }
        }
        Ok(Some(info))
    }

    /// Name of the link with this index.
    pub async fn link_name(&self, index: u32) -> Result<Option<String>> {
        use rtnetlink::packet_route::link::LinkAttribute;
        let found = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await;
        let Some(link) = absent_if_no_device(found, index)? else {
            return Ok(None);
        };
        Ok(link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        }))
    }

    pub async fn del_link(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .with_context(|| format!("deleting interface {index}"))
    }

    /// Every route (IPv4 and IPv6, all tables) that carries [`ROUTE_PROTOCOL`].
    pub async fn our_routes(&self) -> Result<Vec<OurRoute>> {
        use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
        use std::net::{Ipv4Addr, Ipv6Addr};
        let mut out = Vec::new();
        let dumps = [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ];
        for msg in dumps {
            let mut routes = self.handle.route().get(msg).execute();
            while let Some(r) = routes.try_next().await.context("listing routes")? {
                if r.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
                    continue;
                }
                let len = r.header.destination_prefix_length;
                let mut dst: Option<IpAddr> = None;
                let mut oif = None;
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                            dst = Some(IpAddr::V4(*a))
                        }
                        RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                            dst = Some(IpAddr::V6(*a))
                        }
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                let dst = dst.unwrap_or(match r.header.address_family {
                    rtnetlink::packet_route::AddressFamily::Inet6 => {
                        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                    }
                    _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                });
                if let Ok(net) = IpNet::new(dst, len) {
                    out.push(OurRoute { net, oif });
                }
            }
        }
        Ok(out)
    }

    /// Addresses on the interface (with their prefix length).
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let mut out = Vec::new();
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(m) = addrs.try_next().await.context("listing addresses")? {
            let len = m.header.prefix_len;
            let addr = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    AddressAttribute::Local(a) => Some(*a),
                    _ => None,
                })
                .or_else(|| {
                    m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(a) => Some(*a),
                        _ => None,
                    })
                });
            if let Some(net) = addr.and_then(|a| IpNet::new(a, len).ok()) {
                out.push(net);
            }
        }
        Ok(out)
    }

    /// Remove an address from the interface; one already gone is fine.
    pub async fn del_address(&self, index: u32, addr: IpNet) -> Result<()> {
        use futures_util::StreamExt;
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(addr.addr())
            .set_prefix_length_filter(addr.prefix_len())
            .execute();
        while let Some(m) = addrs.next().await {
            let m = m.context("listing addresses")?;
            match self.handle.address().del(m).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e))
                    if matches!(
                        e.raw_code(),
                        -99 /* EADDRNOTAVAIL */ | -19 /* ENODEV */
                    ) => {}
                Err(e) => return Err(e).with_context(|| format!("removing address {addr}")),
            }
        }
        Ok(())
    }
}

fn is_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -17 /* EEXIST */)
}

/// A link lookup's answer: `None` when there is no such device (ENODEV), the error with
/// the interface named otherwise.
fn absent_if_no_device<T>(
    found: Result<Option<T>, rtnetlink::Error>,
    name: impl std::fmt::Display,
) -> Result<Option<T>> {
    match found {
        Ok(link) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -19 /* ENODEV */ => Ok(None),
        Err(e) => Err(e).with_context(|| format!("looking up interface {name}")),
    }
}
