//! Leftovers of a run that did not shut down cleanly (SIGKILL, a crash, a power cut of
//! the process), removed at the next start.
//!
//! What can be left behind, and what happens to it:
//! * control and UAPI sockets nobody listens on: replaced by [`crate::control::bind_private`];
//! * the site's TUN device, if it outlived the process (a persistent device, or one still
//!   being torn down): deleted when it has no carrier (no process holds it open), together
//!   with its addresses and routes;
//! * routes with sitewire's protocol number ([`ROUTE_PROTOCOL`]) for the subnets this site
//!   routes, on another interface that no running sitewire owns: deleted.
//!
//! Anything that belongs to a live daemon (its control socket answers, or the TUN has
//! carrier) is left alone and the start is refused with a message saying why.

use anyhow::{bail, Result};

use crate::config::Config;
use crate::control;
use crate::dataplane::netlink::{Netlink, ROUTE_PROTOCOL};

/// Does a daemon answer on the control socket of `interface`?
pub fn daemon_running(interface: &str) -> bool {
    std::os::unix::net::UnixStream::connect(control::control_socket_path(interface)).is_ok()
}

/// Before creating the TUN: refuse if another daemon runs this interface, remove a
/// leftover device of the same name.
pub async fn before_tun(netlink: &Netlink, interface: &str) -> Result<()> {
    if daemon_running(interface) {
        bail!(
            "another sitewire daemon runs interface {interface} ({} answers); \
             stop it first or pick another interface name",
            control::control_socket_path(interface).display()
        );
    }
    let Some(link) = netlink.find_link(interface).await? else {
        return Ok(());
    };
    if !link.is_tun {
        bail!(
            "interface {interface} exists and is not a TUN device; \
             pick another [site] interface name"
        );
    }
    if link.carrier == Some(true) {
        bail!(
            "TUN device {interface} exists and another process has it open \
             (a WireGuard implementation, or another tunnel daemon); \
             stop it first or pick another interface name"
        );
    }
    tracing::warn!(
        interface,
        "removing TUN device {interface} left behind by an earlier run (with its addresses and routes)"
    );
    netlink.del_link(link.index).await?;
    Ok(())
}

/// After creating the TUN (index `ifindex`): remove stale sitewire routes for the subnets
/// this site will route.
pub async fn after_tun(netlink: &Netlink, cfg: &Config, ifindex: u32) -> Result<()> {
    let wanted: Vec<_> = cfg
        .tunnels
        .iter()
        .flat_map(|t| t.remote_subnets.iter().copied())
        .collect();
    for r in netlink.our_routes().await? {
        let Some(oif) = r.oif else { continue };
        if oif != ifindex && !wanted.contains(&r.net) {
            continue;
        }
        if oif != ifindex {
            let owner = netlink.link_name(oif).await?.unwrap_or_default();
            if !owner.is_empty() && daemon_running(&owner) {
                bail!(
                    "route {} (proto {ROUTE_PROTOCOL}) belongs to the sitewire site running on {owner}; \
                     two sites on one host cannot route the same subnet",
                    r.net
                );
            }
            tracing::warn!(route = %r.net, interface = %owner, "removing a stale sitewire route left behind by an earlier run");
        }
        netlink.del_route(oif, r.net).await?;
    }
    Ok(())
}
