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
        let msg = Self::route_message(index, net)?;
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

fn is_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -17 /* EEXIST */)
}
