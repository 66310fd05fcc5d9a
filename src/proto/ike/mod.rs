//! IKEv2 (RFC 7296): wire codec, crypto primitives, traffic selectors and the engine that
//! keys both IPsec and WireGuard tunnels.

pub mod crypto;
pub mod engine;
pub mod ts;
pub mod wire;

pub use crypto::{AeadAlg, IkeKeys, OpenError};
pub use wire::{DecodeError, Header, Message, Payload};
