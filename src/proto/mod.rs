//! sans-IO protocol core: no sockets, files, clocks or async runtime in here.
//!
//! Everything takes bytes (and, where time matters, a `now` supplied by the caller) and
//! returns decisions, so it can be driven by a simulator and fuzzed.

pub mod demux;
pub mod esp;
pub mod ike;
