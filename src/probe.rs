//! The data-path probe: an ICMP echo the daemon itself sends *through* a tunnel to a
//! host inside the remote subnets, timed when the reply comes back through the tunnel.
//!
//! It measures the path users' packets take (both tunnel ends and the remote network),
//! not just the peer's UDP socket. The request is handed to the tunnel as if it had been
//! read from the TUN; the reply is recognised on the way in (protocol, addresses, ICMP
//! id) and consumed, so it never reaches the TUN and needs no local address or raw
//! socket. Tunnel kinds own a [`Prober`], call [`Prober::poll_send`] from their timer and
//! [`Prober::handle`] for each decrypted packet, and record the RTT it returns.
//!
//! Loss is the share of the last [`WINDOW`] probes not answered within the reply timeout
//! (the interval, at most 5 s). Silence for the DPD timeout is a "dead peer" event.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Outcomes the loss ratio is computed over.
pub const WINDOW: usize = 20;
/// Longest a probe waits for its reply before it counts as lost.
pub const MAX_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Marks our echo payloads (the rest is the sequence number, repeated).
const MAGIC: &[u8; 8] = b"sitewire";
const PAYLOAD_LEN: usize = 32;
const IP_HEADER: usize = 20;
const ICMP_HEADER: usize = 8;
const ICMP_PROTO: u8 = 1;

/// What [`Prober::handle`] made of a decrypted packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not a reply to this prober: deliver it as usual.
    NotOurs,
    /// A reply to one of our probes, answered in time: RTT measured. Do not deliver.
    Reply(Duration),
    /// A reply in time to a probe sent while the tunnel had no session (it waited for
    /// the handshake, so its time is not a path RTT). Counts as answered.
    Unmeasured,
    /// A reply to one of our probes that came too late or twice. Do not deliver.
    Stale,
}

/// Counters of one prober.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeCounts {
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
}

pub struct Prober {
    pub target: Ipv4Addr,
    pub source: Ipv4Addr,
    pub interval: Duration,
    id: u16,
    state: Mutex<State>,
}

struct State {
    next_seq: u16,
    /// When the next request is due; None: now.
    next_due: Option<Instant>,
    /// Requests in flight, oldest first: (seq, sent, time it).
    pending: VecDeque<(u16, Instant, bool)>,
    /// Recent outcomes, true = answered in time.
    outcomes: VecDeque<bool>,
    counts: ProbeCounts,
    /// Last reply, or start, or last dead-peer event: what the DPD timeout counts from.
    alive_mark: Instant,
    /// A request was sent since `alive_mark` (silence without asking proves nothing).
    asked_since_mark: bool,
}

impl Prober {
    pub fn new(target: Ipv4Addr, source: Ipv4Addr, interval: Duration, now: Instant) -> Self {
        let mut b = [0u8; 2];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
        Self {
            target,
            source,
            interval,
            id: u16::from_le_bytes(b),
            state: Mutex::new(State {
                next_seq: 0,
                next_due: None,
                pending: VecDeque::new(),
                outcomes: VecDeque::with_capacity(WINDOW),
                counts: ProbeCounts::default(),
                alive_mark: now,
                asked_since_mark: false,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn reply_timeout(&self) -> Duration {
        self.interval.min(MAX_REPLY_TIMEOUT)
    }

    /// Expires unanswered requests; returns the next request (a whole IPv4 packet) if
    /// one is due. Call it at least a few times per interval. `measure`: the tunnel has
    /// a session, so the reply time is a round trip (otherwise it includes a handshake).
    pub fn poll_send(&self, now: Instant, measure: bool) -> Option<Vec<u8>> {
        let timeout = self.reply_timeout();
        let mut st = self.state();
        while let Some(&(_, sent, _)) = st.pending.front() {
            if now.saturating_duration_since(sent) < timeout {
                break;
            }
            st.pending.pop_front();
            st.counts.lost += 1;
            push_outcome(&mut st.outcomes, false);
        }
        if st.next_due.is_some_and(|due| now < due) {
            return None;
        }
        // Keep the schedule steady; after a long stall start over from now.
        let next = st.next_due.map_or(now, |d| d + self.interval);
        st.next_due = Some(if next <= now {
            now + self.interval
        } else {
            next
        });
        let seq = st.next_seq;
        st.next_seq = seq.wrapping_add(1);
        st.pending.push_back((seq, now, measure));
        st.counts.sent += 1;
        st.asked_since_mark = true;
        Some(echo_request(self.source, self.target, self.id, seq))
    }

    /// Looks at a decrypted inbound packet; see [`Verdict`]. Cheap for other traffic.
    pub fn handle(&self, packet: &[u8], now: Instant) -> Verdict {
        let Some((id, seq)) = parse_echo_reply(packet, self.target, self.source) else {
            return Verdict::NotOurs;
        };
        if id != self.id {
            return Verdict::NotOurs;
        }
        let mut st = self.state();
        let Some(pos) = st.pending.iter().position(|&(s, _, _)| s == seq) else {
            return Verdict::Stale;
        };
        let (_, sent, measure) = st.pending.remove(pos).unwrap_or((seq, now, false));
        st.counts.received += 1;
        push_outcome(&mut st.outcomes, true);
        st.alive_mark = now;
        st.asked_since_mark = false;
        if measure {
            Verdict::Reply(now.saturating_duration_since(sent))
        } else {
            Verdict::Unmeasured
        }
    }

    /// Share of the last [`WINDOW`] probes that went unanswered; None before the first
    /// outcome.
    pub fn loss_ratio(&self) -> Option<f64> {
        let st = self.state();
        if st.outcomes.is_empty() {
            return None;
        }
        let lost = st.outcomes.iter().filter(|ok| !**ok).count();
        Some(lost as f64 / st.outcomes.len() as f64)
    }

    pub fn counts(&self) -> ProbeCounts {
        self.state().counts
    }

    /// True once per `timeout` of silence: no reply for `timeout` although probes were
    /// sent. The silence clock restarts at each such event.
    pub fn dead_peer(&self, now: Instant, timeout: Duration) -> bool {
        let mut st = self.state();
        if st.asked_since_mark && now.saturating_duration_since(st.alive_mark) >= timeout {
            st.alive_mark = now;
            st.asked_since_mark = false;
            return true;
        }
        false
    }
}

fn push_outcome(outcomes: &mut VecDeque<bool>, ok: bool) {
    if outcomes.len() == WINDOW {
        outcomes.pop_front();
    }
    outcomes.push_back(ok);
}

/// The Internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet carrying an ICMP echo request with our marked payload.
pub fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Vec<u8> {
    let total = IP_HEADER + ICMP_HEADER + PAYLOAD_LEN;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes()); // identification
    p.extend_from_slice(&[0x40, 0, 64, ICMP_PROTO, 0, 0]); // DF, TTL 64, checksum later
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    let icmp = p.len();
    p.extend_from_slice(&[8, 0, 0, 0]);
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(MAGIC);
    while p.len() < total {
        p.extend_from_slice(&seq.to_be_bytes());
    }
    let c = checksum(&p[icmp..]);
    p[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
    p
}

/// (id, seq) of an IPv4 ICMP echo reply from `from` to `to` that carries our payload.
pub fn parse_echo_reply(packet: &[u8], from: Ipv4Addr, to: Ipv4Addr) -> Option<(u16, u16)> {
    let first = *packet.first()?;
    if first >> 4 != 4 || packet.get(9) != Some(&ICMP_PROTO) {
        return None;
    }
    if packet.get(12..16)? != from.octets() || packet.get(16..20)? != to.octets() {
        return None;
    }
    let ihl = usize::from(first & 0x0f) * 4;
    let icmp = packet.get(ihl..)?;
    if icmp.len() < ICMP_HEADER + MAGIC.len() || icmp[0] != 0 || icmp[1] != 0 {
        return None;
    }
    if &icmp[ICMP_HEADER..ICMP_HEADER + MAGIC.len()] != MAGIC {
        return None;
    }
    Some((
        u16::from_be_bytes([icmp[4], icmp[5]]),
        u16::from_be_bytes([icmp[6], icmp[7]]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
    const DST: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);

    /// What a host answering `request` sends back.
    fn reply_to(request: &[u8]) -> Vec<u8> {
        let mut r = request.to_vec();
        r[12..16].copy_from_slice(&request[16..20]);
        r[16..20].copy_from_slice(&request[12..16]);
        r[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(&r[..20]);
        r[10..12].copy_from_slice(&c.to_be_bytes());
        r[20] = 0;
        r[22..24].copy_from_slice(&[0, 0]);
        let c = checksum(&r[20..]);
        r[22..24].copy_from_slice(&c.to_be_bytes());
        r
    }

    #[test]
    fn request_is_a_valid_ipv4_icmp_echo() {
        let p = echo_request(SRC, DST, 0xabcd, 7);
        assert_eq!(p.len(), 60);
        assert_eq!(checksum(&p[..20]), 0, "IP header checksum");
        assert_eq!(checksum(&p[20..]), 0, "ICMP checksum");
        assert_eq!(&p[20..28], &[8, 0, p[22], p[23], 0xab, 0xcd, 0, 7]);
        let r = reply_to(&p);
        assert_eq!(parse_echo_reply(&r, DST, SRC), Some((0xabcd, 7)));
        // Wrong direction, our own request, other traffic.
        assert_eq!(parse_echo_reply(&r, SRC, DST), None);
        assert_eq!(parse_echo_reply(&p, SRC, DST), None);
        assert_eq!(parse_echo_reply(&r[..30], DST, SRC), None);
        assert_eq!(parse_echo_reply(&[0x60; 40], DST, SRC), None);
        assert_eq!(parse_echo_reply(&[], DST, SRC), None);
    }

    impl Prober {
        fn poll_send_m(&self, now: Instant) -> Option<Vec<u8>> {
            self.poll_send(now, true)
        }
    }

    #[test]
    fn probe_without_session_is_answered_but_not_timed() {
        let t0 = Instant::now();
        let p = Prober::new(DST, SRC, Duration::from_secs(1), t0);
        let req = p.poll_send(t0, false).unwrap();
        let later = t0 + Duration::from_millis(40);
        assert_eq!(p.handle(&reply_to(&req), later), Verdict::Unmeasured);
        assert_eq!(p.counts().received, 1);
        assert_eq!(p.loss_ratio(), Some(0.0));
    }

    #[test]
    fn schedule_rtt_loss_and_dead_peer() {
        let t0 = Instant::now();
        let s = |ms: u64| t0 + Duration::from_millis(ms);
        let p = Prober::new(DST, SRC, Duration::from_secs(1), t0);
        let first = p.poll_send_m(s(0)).expect("first probe at once");
        assert_eq!(p.poll_send_m(s(500)), None, "not due yet");
        // Someone else's ping reply is not ours.
        let mut foreign = reply_to(&echo_request(SRC, DST, p.id.wrapping_add(1), 0));
        assert_eq!(p.handle(&foreign, s(600)), Verdict::NotOurs);
        foreign[9] = 6;
        assert_eq!(p.handle(&foreign, s(600)), Verdict::NotOurs);
        assert_eq!(
            p.handle(&reply_to(&first), s(3)),
            Verdict::Reply(Duration::from_millis(3))
        );
        assert_eq!(p.handle(&reply_to(&first), s(4)), Verdict::Stale);
        assert_eq!(p.loss_ratio(), Some(0.0));

        // The second probe goes unanswered: lost once the reply timeout passed.
        let second = p.poll_send_m(s(1000)).expect("due after one interval");
        assert!(p.poll_send_m(s(1999)).is_none());
        let _third = p.poll_send_m(s(2000)).expect("third");
        assert_eq!(p.loss_ratio(), Some(0.5));
        assert_eq!(p.handle(&reply_to(&second), s(2001)), Verdict::Stale);
        assert_eq!(
            p.counts(),
            ProbeCounts {
                sent: 3,
                received: 1,
                lost: 1
            }
        );

        // Dead peer: silence for the timeout while asking; once per timeout.
        assert!(!p.dead_peer(s(2500), Duration::from_secs(3)));
        assert!(p.dead_peer(s(3003), Duration::from_secs(3)));
        assert!(!p.dead_peer(s(3004), Duration::from_secs(3)));
        let _ = p.poll_send_m(s(3004));
        assert!(p.dead_peer(s(6004), Duration::from_secs(3)));
    }

    #[test]
    fn loss_window_is_bounded() {
        let t0 = Instant::now();
        let p = Prober::new(DST, SRC, Duration::from_secs(1), t0);
        for i in 0..(WINDOW as u64 + 5) {
            let req = p.poll_send(t0 + Duration::from_secs(i), true).unwrap();
            if i >= 5 {
                p.handle(&reply_to(&req), t0 + Duration::from_secs(i));
            }
        }
        // The first five (lost) fell out of the window.
        let _ = p.poll_send(t0 + Duration::from_secs(WINDOW as u64 + 5), true);
        assert_eq!(p.loss_ratio(), Some(0.0));
    }
}
