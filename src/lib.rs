//! sitewire: a site-to-site tunnel daemon (WireGuard and IPsec, IKEv2 keying).

pub mod assets;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod demo;
pub mod doctor;
pub mod ikewg;
pub mod keys;
pub mod metrics;
pub mod netprobe;
pub mod probe;
pub mod proto;
pub mod reload;
pub mod rotation;
pub mod sdnotify;
pub mod status;
pub mod vault;
