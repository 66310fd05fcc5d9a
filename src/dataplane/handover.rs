//! Who reads the TUN: the site's UDP reader while traffic is light, the TUN reader
//! under load.
//!
//! With one thread per direction, every round trip through an idle tunnel costs an
//! extra thread wake-up at each end: the UDP reader writes a packet into the TUN, the
//! kernel answers within that write (an echo reply, a TCP ACK, the next request), and
//! the TUN reader has to be woken to send the answer. While traffic is light the UDP
//! reader therefore polls the TUN too and sends such answers itself; nobody else is
//! waiting on the TUN, so nobody is woken. Once a drain of the TUN brings a burst
//! (a TSO super-packet, a stream of datagrams), the TUN reader takes over so both
//! directions run on their own cores again, and it hands back after the TUN has been
//! quiet for a while or its packets come one at a time again ([`LoneDrains`]).
//!
//! Only the current owner reads the TUN, and it flips the owner itself (light -> heavy
//! by the UDP reader, heavy -> light by the TUN reader), under the lock of the TUN
//! path: packets keep their order across a handover. On a site with per-CPU lanes
//! ([`super::lanes`]) the lanes take the UDP reader's part here: each serves the TUN
//! while traffic is light (one at a time, under the same lock), so a packet written
//! into the TUN wakes the lane of its own CPU.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A drain of at least this many packets moves the TUN to the TUN reader.
pub const HEAVY_AFTER_PACKETS: usize = 8;
/// The TUN reader hands the TUN back after this long without a packet...
pub const LIGHT_AFTER_IDLE_MS: u16 = 50;
/// ...or after this many drains in a row of one lone packet each (see [`LoneDrains`]).
pub const LIGHT_AFTER_LONE_DRAINS: u32 = 64;

/// Packets closer together than this make a stream (see [`Pace`]).
pub const STREAM_GAP: Duration = Duration::from_micros(200);

/// Whether packets arrive as a stream or one at a time.
///
/// Before going to sleep a thread that has just found its socket or TUN empty may
/// yield the CPU once and look again: under a stream that turns a wake-up per packet
/// into batches, because the sender gets to queue more. For a lone packet (a ping, a
/// DNS query, a keepalive) it only adds system calls and context switches to the
/// round trip, so a thread yields only while the packets it takes come less than
/// [`STREAM_GAP`] apart.
#[derive(Debug, Default)]
pub struct Pace {
    last: Option<Instant>,
    streaming: bool,
}

impl Pace {
    /// Something arrived at `now`.
    pub fn arrived(&mut self, now: Instant) {
        self.streaming = self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < STREAM_GAP);
        self.last = Some(now);
    }

    /// The last two arrivals were part of a stream.
    pub fn streaming(&self) -> bool {
        self.streaming
    }
}

/// How long the TUN reader keeps looking after the TUN runs dry under a stream
/// (see [`DryTun::Linger`]).
pub const LINGER: Duration = Duration::from_micros(40);

/// What a drain of the TUN does when it finds the TUN empty, after sending what it read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DryTun {
    /// Return.
    Stop,
    /// Under a stream, yield the CPU once and look again (see [`Pace`]).
    YieldOnce,
    /// Under a stream, keep yielding and looking for up to [`LINGER`] after the first
    /// empty look, sending whatever comes as it comes.
    ///
    /// A local sender writes a stream into the TUN a packet at a time, often a little
    /// slower than the TUN reader takes them, so the TUN runs dry between packets.
    /// Sleeping in `poll` there costs more than it saves on a virtual machine: the
    /// sender's write has to wake the reader (an inter-processor interrupt, a halted
    /// vCPU resumed), and the receiving daemon gets the packets one wake-up at a time
    /// too. Looking again after `sched_yield` (which hands the CPU to anyone ready on
    /// it, the sender first) catches the next packet instead. Measured on a 2-vCPU VM
    /// with iperf3 UDP streams (5 interleaved pairs per rate), in daemon CPU per
    /// packet: sending daemon -11 % at 0.1 Gbit/s, -34 % at 0.7, -8 % at 1.8, -4 % at
    /// 2.0; receiving daemon -8 %, -33 %, -1.5 %, -1.5 % (it gets trains instead of
    /// single datagrams). Packets are not held back: each look that finds the TUN
    /// empty sends what was read before it.
    Linger,
}

impl DryTun {
    /// For the TUN reader, after `slept` in `poll` before the drain: linger only when
    /// that sleep was short enough that lingering would have caught the packet that
    /// ended it. A stream of evenly spaced packets further apart than [`LINGER`] (or
    /// the first packet of a burst) then costs no looks that find nothing.
    pub fn after_sleep(slept: Duration) -> Self {
        if slept < LINGER {
            Self::Linger
        } else {
            Self::YieldOnce
        }
    }

    /// After `looks` empty looks in this drain, the first `dry_for` ago: look again?
    pub fn look_again(self, looks: u32, dry_for: Duration) -> bool {
        match self {
            Self::Stop => false,
            Self::YieldOnce => looks == 0,
            Self::Linger => looks == 0 || dry_for < LINGER,
        }
    }
}

/// The TUN reader's count of drains that found one packet on its own: traffic that
/// is sparse, not quiet (a ping every 10 ms never lets the TUN go idle for
/// [`LIGHT_AFTER_IDLE_MS`]), and that the UDP reader serves with one wake-up less.
///
/// A drain of one packet out of a one-way stream does not count: a paced sender (a
/// UDP stream at 100,000 packets/s) is often read one packet per wake-up, and handing
/// such a stream to the UDP reader, only to take it back at its next burst, cost the
/// sending side about 6 % of its CPU per packet in thread switches and handovers. One
/// packet out of a fast exchange (a ping flood, request/response), where the UDP
/// reader delivered something into the TUN since the drain before, does count: that
/// is the traffic the UDP reader answers without waking anyone.
#[derive(Debug, Default)]
pub struct LoneDrains(u32);

impl LoneDrains {
    /// After a drain of `packets`, the first of which came `streaming` (less than
    /// [`STREAM_GAP`] after the drain before), and with `answering` when a UDP reader
    /// wrote into the TUN since that drain. Returns whether to hand the TUN back.
    pub fn after_drain(&mut self, packets: usize, streaming: bool, answering: bool) -> bool {
        self.0 = if packets <= 1 && (answering || !streaming) {
            self.0 + 1
        } else {
            0
        };
        if self.0 >= LIGHT_AFTER_LONE_DRAINS {
            self.0 = 0;
            return true;
        }
        false
    }

    /// The TUN reader took the TUN (again).
    pub fn reset(&mut self) {
        self.0 = 0;
    }
}

/// A wake-up a thread can poll for next to its sockets.
pub struct Doorbell {
    ring: UnixStream,
    bell: UnixStream,
}

impl Doorbell {
    pub fn new() -> io::Result<Self> {
        let (ring, bell) = UnixStream::pair()?;
        ring.set_nonblocking(true)?;
        bell.set_nonblocking(true)?;
        Ok(Self { ring, bell })
    }

    /// Wake whoever polls [`fd`](Self::fd). A full buffer means a wake-up is pending.
    pub fn ring(&self) {
        let _ = (&self.ring).write(&[1]);
    }

    /// The descriptor to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.bell.as_fd()
    }

    /// Take the pending wake-ups.
    pub fn clear(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.bell).read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// The owner of the TUN and the doorbells of both threads.
pub struct Handover {
    heavy: AtomicBool,
    /// The TUN reader's doorbell: the TUN is its now.
    pub tun_reader: Doorbell,
    /// The UDP reader's doorbell: the TUN is its again.
    pub udp_reader: Doorbell,
    /// The same for each of the site's lanes, which serve the TUN instead of the UDP
    /// reader when there are any ([`super::lanes`]).
    pub lanes: Vec<Doorbell>,
    /// False when the TUN cannot be read without blocking: then it stays with the TUN
    /// reader.
    enabled: bool,
    /// A UDP reader wrote into the TUN since the TUN reader last looked.
    delivered: AtomicBool,
}

impl Handover {
    pub fn new(enabled: bool, lanes: usize) -> io::Result<Self> {
        Ok(Self {
            heavy: AtomicBool::new(!enabled),
            tun_reader: Doorbell::new()?,
            udp_reader: Doorbell::new()?,
            lanes: (0..lanes)
                .map(|_| Doorbell::new())
                .collect::<io::Result<_>>()?,
            enabled,
            delivered: AtomicBool::new(false),
        })
    }

    /// The TUN reader owns the TUN.
    pub fn heavy(&self) -> bool {
        self.heavy.load(Ordering::Acquire)
    }

    /// Called by the UDP reader after a drain of `packets`.
    pub fn after_light_drain(&self, packets: usize) {
        if packets >= HEAVY_AFTER_PACKETS {
            self.heavy.store(true, Ordering::Release);
            self.tun_reader.ring();
        }
    }

    /// Called by a UDP reader that wrote packets into the TUN. Written only when it
    /// changes, so a stream of writes does not keep the flag's cache line moving.
    pub fn delivered(&self) {
        if !self.delivered.load(Ordering::Relaxed) {
            self.delivered.store(true, Ordering::Relaxed);
        }
    }

    /// Whether a UDP reader wrote into the TUN since the last call (by the TUN reader).
    pub fn take_delivered(&self) -> bool {
        self.delivered.load(Ordering::Relaxed) && self.delivered.swap(false, Ordering::Relaxed)
    }

    /// Called by the TUN reader when the TUN went quiet.
    pub fn to_light(&self) {
        if self.enabled {
            self.heavy.store(false, Ordering::Release);
            if self.lanes.is_empty() {
                self.udp_reader.ring();
            }
            for bell in &self.lanes {
                bell.ring();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rung(d: &Doorbell) -> bool {
        let mut fds = [nix::poll::PollFd::new(d.fd(), nix::poll::PollFlags::POLLIN)];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap() == 1
    }

    #[test]
    fn only_a_short_sleep_makes_the_tun_reader_linger() {
        assert_eq!(DryTun::after_sleep(Duration::ZERO), DryTun::Linger);
        assert_eq!(DryTun::after_sleep(LINGER), DryTun::YieldOnce);
        assert_eq!(DryTun::after_sleep(Duration::MAX), DryTun::YieldOnce);
        assert!(!DryTun::Stop.look_again(0, Duration::ZERO));
        assert!(DryTun::YieldOnce.look_again(0, Duration::ZERO));
        assert!(!DryTun::YieldOnce.look_again(1, Duration::ZERO));
        assert!(DryTun::Linger.look_again(0, Duration::ZERO));
        assert!(
            DryTun::Linger.look_again(50, LINGER / 2),
            "looks until the time is up"
        );
        assert!(!DryTun::Linger.look_again(1, LINGER));
    }

    #[test]
    fn the_tun_moves_on_a_burst_and_back_when_quiet() {
        let h = Handover::new(true, 0).unwrap();
        assert!(!h.heavy(), "starts with the UDP reader");
        h.after_light_drain(HEAVY_AFTER_PACKETS - 1);
        assert!(
            !h.heavy() && !rung(&h.tun_reader),
            "small drains stay light"
        );
        h.after_light_drain(HEAVY_AFTER_PACKETS);
        assert!(
            h.heavy() && rung(&h.tun_reader),
            "a burst wakes the TUN reader"
        );
        h.tun_reader.clear();
        assert!(!rung(&h.tun_reader), "cleared");
        h.to_light();
        assert!(
            !h.heavy() && rung(&h.udp_reader),
            "handed back, UDP reader woken"
        );
    }

    #[test]
    fn with_lanes_the_tun_goes_back_to_every_lane() {
        let h = Handover::new(true, 3).unwrap();
        h.after_light_drain(HEAVY_AFTER_PACKETS);
        assert!(h.heavy());
        assert!(h.lanes.iter().all(|b| !rung(b)));
        h.to_light();
        assert!(!h.heavy());
        assert!(h.lanes.iter().all(rung), "every lane woken");
        assert!(
            !rung(&h.udp_reader),
            "the main reader does not serve the TUN"
        );
    }

    #[test]
    fn only_close_arrivals_are_a_stream() {
        let t0 = Instant::now();
        let mut pace = Pace::default();
        assert!(!pace.streaming(), "nothing yet");
        pace.arrived(t0);
        assert!(!pace.streaming(), "one packet is no stream");
        pace.arrived(t0 + STREAM_GAP / 4);
        assert!(pace.streaming(), "two close together are");
        pace.arrived(t0 + STREAM_GAP / 4 + Duration::from_millis(10));
        assert!(!pace.streaming(), "a ping every 10 ms is not");
        pace.arrived(t0 + STREAM_GAP / 4 + Duration::from_millis(10) + STREAM_GAP / 2);
        assert!(pace.streaming(), "and a new burst is again");
    }

    #[test]
    fn lone_packets_hand_the_tun_back_and_a_one_way_stream_does_not() {
        let mut lone = LoneDrains::default();
        for _ in 0..10 * LIGHT_AFTER_LONE_DRAINS {
            assert!(
                !lone.after_drain(1, true, false),
                "one packet per read out of a one-way stream"
            );
        }
        for _ in 1..LIGHT_AFTER_LONE_DRAINS {
            assert!(!lone.after_drain(1, false, false));
        }
        assert!(
            lone.after_drain(0, false, false),
            "enough lone packets in a row"
        );
        for _ in 1..LIGHT_AFTER_LONE_DRAINS {
            assert!(!lone.after_drain(1, true, true), "a ping flood");
        }
        assert!(lone.after_drain(1, true, true), "is answered one by one");
        for _ in 1..LIGHT_AFTER_LONE_DRAINS {
            assert!(!lone.after_drain(1, false, true));
        }
        assert!(
            !lone.after_drain(2, false, true),
            "a burst starts the count again"
        );
        assert!(!lone.after_drain(1, false, false));
        lone.reset();
        for _ in 1..LIGHT_AFTER_LONE_DRAINS {
            assert!(!lone.after_drain(1, false, false));
        }
        assert!(lone.after_drain(1, false, false));
    }

    #[test]
    fn deliveries_are_seen_once() {
        let h = Handover::new(true, 0).unwrap();
        assert!(!h.take_delivered());
        h.delivered();
        h.delivered();
        assert!(h.take_delivered());
        assert!(!h.take_delivered(), "taken");
    }

    #[test]
    fn a_blocking_tun_stays_with_the_tun_reader() {
        let h = Handover::new(false, 0).unwrap();
        assert!(h.heavy());
        h.to_light();
        assert!(h.heavy() && !rung(&h.udp_reader));
    }

    #[test]
    fn many_rings_do_not_block_and_one_clear_takes_them() {
        let d = Doorbell::new().unwrap();
        for _ in 0..100_000 {
            d.ring();
        }
        assert!(rung(&d));
        d.clear();
        assert!(!rung(&d));
    }
}
