//! Receive coalescing for the TUN: decrypted packets of one TCP or UDP flow that arrive
//! in one batch are written into the TUN as one GSO super-packet behind a virtio-net
//! header, so the kernel's receiving stack handles one packet of up to 64 KB instead of
//! dozens.
//!
//! The packets stay where they were decrypted: [`Coalescer::plan`] only groups them,
//! rewrites the first packet's headers into the super-packet's and writes its virtio-net
//! header; the writer then hands the kernel the first packet followed by the payloads of
//! the others in one `writev`. Nothing is copied or allocated per packet.
//!
//! A packet joins the newest group of its flow only where the kernel could have built
//! the same super-packet itself: the same addresses, ports, TOS/TTL (traffic class, flow
//! label, hop limit), no IP options or fragments; for TCP the next sequence number, the
//! same acknowledgement and TCP options, only ACK and PSH set; every segment as long as
//! the first but the last; at most [`MAX_SEGMENTS`] and 64 KB; a checksum that is right.
//! Everything else is written as it came, in order.

/// Length of the virtio-net header in front of every packet on an offload TUN.
pub const HDR_LEN: usize = 10;

/// Most segments in one super-packet (the kernel takes up to 128 for UDP).
pub const MAX_SEGMENTS: u16 = 64;

/// Virtio-net header flag and GSO types (`linux/virtio_net.h`).
pub(super) const HDR_F_NEEDS_CSUM: u8 = 1;
pub(super) const GSO_TCPV4: u8 = 1;
pub(super) const GSO_TCPV6: u8 = 4;
pub(super) const GSO_UDP_L4: u8 = 5;

const TCP: u8 = 6;
const UDP: u8 = 17;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

/// Marks the end of a group's member chain.
const END: u16 = u16::MAX;

/// What must be equal for two packets to share a super-packet.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
struct FlowKey {
    v6: bool,
    proto: u8,
    /// Source and destination address (IPv4: the first 8 bytes).
    addrs: [u8; 32],
    /// Source and destination port.
    ports: [u8; 4],
    /// IPv4: TOS, TTL and the DF bit; IPv6: traffic class, flow label and hop limit.
    ip: [u8; 5],
    /// TCP header length (options are compared against the group's first packet).
    l4: u8,
    /// TCP acknowledgement number.
    ack: u32,
}

/// A packet that could be coalesced.
struct Candidate {
    key: FlowKey,
    l3: usize,
    payload: usize,
    seq: u32,
    psh: bool,
    id: u16,
    df: bool,
}

/// Packets written as one: a super-packet, or a single packet as it came.
#[derive(Default)]
struct Group {
    head: u16,
    tail: u16,
    count: u16,
    /// Can take more packets of its flow.
    open: bool,
    key: FlowKey,
    /// Payload bytes of each segment (the last may be shorter).
    seg: u16,
    /// Payload bytes of all members.
    bytes: u32,
    next_seq: u32,
    first_id: u16,
    psh: bool,
}

impl Group {
    /// IP header length: candidates have no IPv4 options.
    fn l3(&self) -> usize {
        if self.key.v6 {
            40
        } else {
            20
        }
    }

    fn headers(&self) -> usize {
        self.l3() + self.key.l4 as usize
    }
}

/// Groups one batch of packets into super-packets; keeps its tables between batches.
#[derive(Default)]
pub struct Coalescer {
    groups: Vec<Group>,
    /// Next member of the same group, per packet index.
    next: Vec<u16>,
}

impl Coalescer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Group `bufs` (each a zeroed virtio-net header and an IP packet) in order. Rewrites
    /// the headers of each group's first packet where the group has more than one;
    /// single packets keep their all-zero virtio-net header. `udp`: the TUN takes UDP
    /// super-packets (USO, Linux 6.2 and later).
    pub fn plan<B: AsMut<[u8]> + AsRef<[u8]>>(&mut self, bufs: &mut [B], udp: bool) {
        self.groups.clear();
        self.next.clear();
        self.next.resize(bufs.len(), END);
        for i in 0..bufs.len() {
            let idx = i as u16;
            let Some(c) = candidate(&bufs[i].as_ref()[HDR_LEN..], udp) else {
                self.groups.push(single(idx));
                continue;
            };
            // Only the newest group of a flow takes more, so the flow keeps its order.
            if let Some(g) = self.groups.iter().rposition(|g| g.open && g.key == c.key) {
                if self.try_join(g, idx, &c, bufs) {
                    continue;
                }
            }
            // Its checksum is checked when a second packet joins.
            self.groups.push(Group {
                head: idx,
                tail: idx,
                count: 1,
                // A segment with PSH ends its group.
                open: !c.psh,
                key: c.key,
                seg: c.payload as u16,
                bytes: c.payload as u32,
                next_seq: c.seq.wrapping_add(c.payload as u32),
                first_id: c.id,
                psh: c.psh,
            });
        }
        for g in &self.groups {
            if g.count > 1 {
                finish(g, bufs[g.head as usize].as_mut());
            }
        }
    }

    /// The groups of the last [`plan`](Self::plan), in the order to write them: for each,
    /// the index of its first packet (written whole, virtio-net header included) and of
    /// the packets whose payloads follow it, with the range of their bytes to write.
    pub fn groups(&self) -> impl Iterator<Item = (usize, Members<'_>)> {
        self.groups.iter().map(|g| {
            (
                g.head as usize,
                Members {
                    next: &self.next,
                    at: self.next[g.head as usize],
                    skip: HDR_LEN + g.headers(),
                },
            )
        })
    }

    /// `c` (packet `idx`) joins group `g` if the kernel could have built the result.
    fn try_join<B: AsMut<[u8]> + AsRef<[u8]>>(
        &mut self,
        g: usize,
        idx: u16,
        c: &Candidate,
        bufs: &[B],
    ) -> bool {
        let grp = &self.groups[g];
        let tcp = c.key.proto == TCP;
        let ok = grp.count < MAX_SEGMENTS
            && c.payload <= grp.seg as usize
            && grp.headers() + grp.bytes as usize + c.payload <= u16::MAX as usize
            && (!tcp || c.seq == grp.next_seq)
            && (c.key.v6 || c.df || c.id == grp.first_id.wrapping_add(grp.count))
            && (!tcp || {
                // TCP options (timestamps included) as in the group's first packet.
                let opts = HDR_LEN + c.l3 + 20..HDR_LEN + c.l3 + c.key.l4 as usize;
                bufs[grp.head as usize].as_ref()[opts.clone()] == bufs[idx as usize].as_ref()[opts]
            });
        if !ok {
            return false;
        }
        if grp.count == 1 {
            let head = &bufs[grp.head as usize].as_ref()[HDR_LEN..];
            if !checksum_ok(head, grp.l3(), grp.key.proto) {
                self.groups[g].open = false;
                return false;
            }
        }
        if !checksum_ok(&bufs[idx as usize].as_ref()[HDR_LEN..], c.l3, c.key.proto) {
            return false;
        }
        let grp = &mut self.groups[g];
        self.next[grp.tail as usize] = idx;
        grp.tail = idx;
        grp.count += 1;
        grp.bytes += c.payload as u32;
        grp.next_seq = c.seq.wrapping_add(c.payload as u32);
        if c.payload < grp.seg as usize || c.psh {
            grp.open = false;
        }
        grp.psh |= c.psh;
        true
    }
}

/// The packets whose payloads follow a group's first packet.
pub struct Members<'a> {
    next: &'a [u16],
    at: u16,
    skip: usize,
}

impl Iterator for Members<'_> {
    /// Packet index and the offset of its payload in its buffer.
    type Item = (usize, usize);
    fn next(&mut self) -> Option<(usize, usize)> {
        if self.at == END {
            return None;
        }
        let i = self.at as usize;
        self.at = self.next[i];
        Some((i, self.skip))
    }
}

fn single(idx: u16) -> Group {
    Group {
        head: idx,
        tail: idx,
        count: 1,
        ..Group::default()
    }
}

/// Parse `p` as a packet that could join a super-packet.
fn candidate(p: &[u8], udp: bool) -> Option<Candidate> {
    let mut key = FlowKey::default();
    let (l3, id, df) = match p.first()? >> 4 {
        4 => {
            // No options (IHL 5), the whole packet, not a fragment.
            if p.len() < 20 || p[0] != 0x45 || be16(p, 2) as usize != p.len() {
                return None;
            }
            let frag = be16(p, 6);
            if frag & 0x3fff != 0 {
                return None;
            }
            key.proto = p[9];
            key.addrs[..8].copy_from_slice(&p[12..20]);
            key.ip = [p[1], p[8], (frag >> 8) as u8 & 0x40, 0, 0];
            (20, be16(p, 4), frag & 0x4000 != 0)
        }
        6 => {
            if p.len() < 40 || be16(p, 4) as usize + 40 != p.len() {
                return None;
            }
            key.v6 = true;
            key.proto = p[6];
            key.addrs.copy_from_slice(&p[8..40]);
            key.ip = [p[0], p[1], p[2], p[3], p[7]];
            (40, 0, false)
        }
        _ => return None,
    };
    let t = &p[l3..];
    let (l4, seq, psh) = match key.proto {
        TCP => {
            if t.len() < 20 {
                return None;
            }
            let l4 = (t[12] >> 4) as usize * 4;
            let flags = t[13];
            if l4 < 20 || t.len() < l4 || flags & !TCP_PSH != TCP_ACK || t[12] & 0x0f != 0 {
                return None;
            }
            key.ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
            let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
            (l4, seq, flags & TCP_PSH != 0)
        }
        UDP if udp => {
            // A zero checksum (IPv4: none sent) would become a computed one.
            if t.len() < 8 || be16(t, 4) as usize != t.len() || be16(t, 6) == 0 {
                return None;
            }
            (8, 0, false)
        }
        _ => return None,
    };
    let payload = t.len() - l4;
    if payload == 0 {
        return None;
    }
    key.ports.copy_from_slice(&t[..4]);
    key.l4 = l4 as u8;
    Some(Candidate {
        key,
        l3,
        payload,
        seq,
        psh,
        id,
        df,
    })
}

/// Turn group `g`'s first packet `b` (virtio-net header and packet) into the header of
/// its super-packet.
fn finish(g: &Group, b: &mut [u8]) {
    let l3 = g.l3();
    let l4 = g.key.l4 as usize;
    let tcp = g.key.proto == TCP;
    let (hdr, p) = b.split_at_mut(HDR_LEN);
    let l4_len = l4 + g.bytes as usize;
    if g.key.v6 {
        p[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    } else {
        p[2..4].copy_from_slice(&((l3 + l4_len) as u16).to_be_bytes());
        p[10..12].fill(0);
        let sum = checksum(&p[..20]);
        p[10..12].copy_from_slice(&sum.to_ne_bytes());
    }
    let check_at = if tcp {
        if g.psh {
            p[l3 + 13] |= TCP_PSH;
        }
        l3 + 16
    } else {
        p[l3 + 4..l3 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        l3 + 6
    };
    // For an offloaded checksum the field holds the pseudo-header's sum, not inverted.
    let pseudo = fold(pseudo_sum(p, l3, g.key.proto, l4_len));
    p[check_at..check_at + 2].copy_from_slice(&pseudo.to_ne_bytes());

    let gso_type = match (tcp, g.key.v6) {
        (true, false) => GSO_TCPV4,
        (true, true) => GSO_TCPV6,
        (false, _) => GSO_UDP_L4,
    };
    hdr[0] = HDR_F_NEEDS_CSUM;
    hdr[1] = gso_type;
    hdr[2..4].copy_from_slice(&((l3 + l4) as u16).to_ne_bytes());
    hdr[4..6].copy_from_slice(&g.seg.to_ne_bytes());
    hdr[6..8].copy_from_slice(&(l3 as u16).to_ne_bytes());
    hdr[8..10].copy_from_slice(&((check_at - l3) as u16).to_ne_bytes());
}

/// The Internet checksum of `data`, in the machine's byte order (store with `to_ne_bytes`).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data, 0))
}

/// The transport checksum of IP packet `p` (header length `l3`) is right.
fn checksum_ok(p: &[u8], l3: usize, proto: u8) -> bool {
    let l4_len = p.len() - l3;
    fold(sum(&p[l3..], pseudo_sum(p, l3, proto, l4_len))) == 0xffff
}

/// The unfolded sum of the pseudo-header of IP packet `p` for a transport segment of
/// `l4_len` bytes.
fn pseudo_sum(p: &[u8], l3: usize, proto: u8, l4_len: usize) -> u64 {
    let addrs = if l3 == 40 { &p[8..40] } else { &p[12..20] };
    let len = if l3 == 40 {
        (l4_len as u32).to_be_bytes()
    } else {
        let l = (l4_len as u16).to_be_bytes();
        [0, 0, l[0], l[1]]
    };
    sum(&[0, 0, 0, proto], sum(&len, sum(addrs, 0)))
}

/// Add `data` to a ones'-complement sum taken in the machine's byte order (RFC 1071:
/// the sum is the same up to a byte swap, which storing it with `to_ne_bytes` undoes).
fn sum(data: &[u8], acc: u64) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { sum_avx2(data, acc) };
    }
    sum_words(data, acc)
}

/// [`sum_words`] compiled for AVX2: the loop becomes wide vector adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(data: &[u8], acc: u64) -> u64 {
    sum_words(data, acc)
}

#[inline(always)]
fn sum_words(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u32::from_ne_bytes([w[0], w[1], w[2], w[3]]) as u64;
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 4];
        w[..rest.len()].copy_from_slice(rest);
        acc += u32::from_ne_bytes(w) as u64;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// RFC 1071 the plain way, independent of `sum`: 16-bit big-endian words.
    pub(crate) fn csum16(parts: &[&[u8]]) -> u16 {
        let mut acc: u32 = 0;
        for part in parts {
            for w in part.chunks(2) {
                acc += u32::from(w[0]) << 8 | u32::from(*w.get(1).unwrap_or(&0));
            }
        }
        while acc >> 16 != 0 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    }

    pub(crate) fn pseudo(p: &[u8], l3: usize, proto: u8, l4_len: usize) -> Vec<u8> {
        let mut v = if l3 == 40 {
            p[8..40].to_vec()
        } else {
            p[12..20].to_vec()
        };
        if l3 == 40 {
            v.extend_from_slice(&(l4_len as u32).to_be_bytes());
            v.extend_from_slice(&[0, 0, 0, proto]);
        } else {
            v.extend_from_slice(&[0, proto]);
            v.extend_from_slice(&(l4_len as u16).to_be_bytes());
        }
        v
    }

    /// Fill in lengths and checksums of IP packet `p` the way a sender's stack does.
    fn seal(p: &mut [u8], l3: usize, proto: u8) {
        let len = p.len();
        if l3 == 20 {
            p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            p[10..12].fill(0);
            let c = csum16(&[&p[..20]]);
            p[10..12].copy_from_slice(&c.to_be_bytes());
        } else {
            p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        }
        let at = l3 + if proto == TCP { 16 } else { 6 };
        if proto == UDP {
            p[l3 + 4..l3 + 6].copy_from_slice(&((len - l3) as u16).to_be_bytes());
        }
        p[at..at + 2].fill(0);
        let ps = pseudo(p, l3, proto, len - l3);
        let c = csum16(&[&ps, &p[l3..]]);
        p[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }

    pub(crate) struct Pkt {
        v6: bool,
        proto: u8,
        sport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        id: u16,
        df: bool,
        options: Vec<u8>,
        payload: Vec<u8>,
    }

    impl Pkt {
        pub(crate) fn udp(sport: u16, id: u16, len: usize) -> Self {
            Pkt {
                v6: false,
                proto: UDP,
                sport,
                seq: 0,
                ack: 0,
                flags: 0,
                id,
                df: false,
                options: vec![],
                payload: (0..len).map(|i| (i * 7 + id as usize) as u8).collect(),
            }
        }

        fn tcp(seq: u32, len: usize) -> Self {
            Pkt {
                proto: TCP,
                seq,
                ack: 0x1000,
                flags: TCP_ACK,
                df: true,
                options: vec![1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 5],
                ..Pkt::udp(40000, 0, len)
            }
        }

        pub(crate) fn bytes(&self) -> Vec<u8> {
            let l3 = if self.v6 { 40 } else { 20 };
            let mut p = vec![0u8; l3];
            if self.v6 {
                p[0] = 0x60;
                p[6] = self.proto;
                p[7] = 64;
                p[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
                p[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
            } else {
                p[0] = 0x45;
                p[4..6].copy_from_slice(&self.id.to_be_bytes());
                p[6] = if self.df { 0x40 } else { 0 };
                p[8] = 64;
                p[9] = self.proto;
                p[12..16].copy_from_slice(&[10, 201, 0, 1]);
                p[16..20].copy_from_slice(&[10, 201, 0, 2]);
            }
            p.extend_from_slice(&self.sport.to_be_bytes());
            p.extend_from_slice(&5201u16.to_be_bytes());
            if self.proto == TCP {
                p.extend_from_slice(&self.seq.to_be_bytes());
                p.extend_from_slice(&self.ack.to_be_bytes());
                p.push((((20 + self.options.len()) / 4) as u8) << 4);
                p.push(self.flags);
                p.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
                p.extend_from_slice(&self.options);
            } else {
                p.extend_from_slice(&[0; 4]);
            }
            p.extend_from_slice(&self.payload);
            seal(&mut p, l3, self.proto);
            p
        }
    }

    fn buffers(pkts: &[Vec<u8>]) -> Vec<Vec<u8>> {
        pkts.iter()
            .map(|p| {
                let mut b = vec![0u8; HDR_LEN];
                b.extend_from_slice(p);
                b
            })
            .collect()
    }

    /// What the writer hands the kernel: per group, one buffer.
    fn written(c: &Coalescer, bufs: &[Vec<u8>]) -> Vec<Vec<u8>> {
        c.groups()
            .map(|(head, members)| {
                let mut w = bufs[head].clone();
                for (i, from) in members {
                    w.extend_from_slice(&bufs[i][from..]);
                }
                w
            })
            .collect()
    }

    /// Split a written buffer back into packets the way the kernel's GSO does, checking
    /// the virtio-net header and the offloaded checksum on the way.
    fn segment(w: &[u8]) -> Vec<Vec<u8>> {
        let (hdr, p) = w.split_at(HDR_LEN);
        if hdr[1] == 0 {
            assert_eq!(hdr, &[0; HDR_LEN], "a single packet has an all-zero header");
            return vec![p.to_vec()];
        }
        assert_eq!(hdr[0], HDR_F_NEEDS_CSUM);
        let hlen = u16::from_ne_bytes([hdr[2], hdr[3]]) as usize;
        let gso = u16::from_ne_bytes([hdr[4], hdr[5]]) as usize;
        let start = u16::from_ne_bytes([hdr[6], hdr[7]]) as usize;
        let off = u16::from_ne_bytes([hdr[8], hdr[9]]) as usize;
        let v6 = p[0] >> 4 == 6;
        let l3 = if v6 { 40 } else { 20 };
        let proto = if v6 { p[6] } else { p[9] };
        assert_eq!(start, l3);
        assert_eq!(off, if proto == TCP { 16 } else { 6 });
        let expect_type = match (proto, v6) {
            (TCP, false) => GSO_TCPV4,
            (TCP, true) => GSO_TCPV6,
            _ => GSO_UDP_L4,
        };
        assert_eq!(hdr[1], expect_type);
        // The super-packet's own lengths and its checksum field: the pseudo-header sum.
        if v6 {
            assert_eq!(be16(p, 4) as usize, p.len() - 40);
        } else {
            assert_eq!(be16(p, 2) as usize, p.len());
            assert_eq!(csum16(&[&p[..20]]), 0, "IPv4 header checksum");
        }
        let ps = pseudo(p, l3, proto, p.len() - l3);
        assert_eq!(
            !csum16(&[&ps]),
            be16(p, start + off),
            "offloaded checksum field holds the pseudo-header sum"
        );
        let data = &p[hlen..];
        let n = data.len().div_ceil(gso);
        let mut out = Vec::new();
        for (k, chunk) in data.chunks(gso).enumerate() {
            let mut s = p[..hlen].to_vec();
            s.extend_from_slice(chunk);
            if !v6 {
                let id = be16(p, 4).wrapping_add(k as u16);
                s[4..6].copy_from_slice(&id.to_be_bytes());
            }
            if proto == TCP {
                let seq = u32::from_be_bytes([p[l3 + 4], p[l3 + 5], p[l3 + 6], p[l3 + 7]]);
                s[l3 + 4..l3 + 8]
                    .copy_from_slice(&seq.wrapping_add((k * gso) as u32).to_be_bytes());
                if k + 1 < n {
                    s[l3 + 13] &= !TCP_PSH;
                }
            }
            seal(&mut s, l3, proto);
            out.push(s);
        }
        out
    }

    fn run(pkts: &[Vec<u8>], udp: bool) -> (Vec<Vec<u8>>, Vec<usize>) {
        let mut bufs = buffers(pkts);
        let mut c = Coalescer::new();
        c.plan(&mut bufs, udp);
        let w = written(&c, &bufs);
        let counts = w.iter().map(|w| segment(w).len()).collect();
        let back: Vec<Vec<u8>> = w.iter().flat_map(|w| segment(w)).collect();
        (back, counts)
    }

    #[test]
    fn sum_matches_plain_rfc1071() {
        for len in [0usize, 1, 2, 3, 5, 63, 1392, 1393] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            let ours = !fold(sum(&data, 0));
            assert_eq!(
                ours.to_ne_bytes(),
                csum16(&[&data]).to_be_bytes(),
                "len {len}"
            );
        }
    }

    #[test]
    fn udp_flow_becomes_one_super_packet_that_segments_back() {
        let mut pkts: Vec<Vec<u8>> = (0..5)
            .map(|i| Pkt::udp(40000, 100 + i, 1364).bytes())
            .collect();
        pkts.push(Pkt::udp(40000, 105, 200).bytes());
        let (back, counts) = run(&pkts, true);
        assert_eq!(counts, vec![6]);
        assert_eq!(back, pkts);
    }

    #[test]
    fn udp_is_left_alone_without_uso() {
        let pkts: Vec<Vec<u8>> = (0..3).map(|i| Pkt::udp(40000, i, 1000).bytes()).collect();
        let (back, counts) = run(&pkts, false);
        assert_eq!(counts, vec![1, 1, 1]);
        assert_eq!(back, pkts);
    }

    #[test]
    fn a_short_segment_ends_its_group() {
        let pkts = vec![
            Pkt::udp(40000, 1, 1000).bytes(),
            Pkt::udp(40000, 2, 500).bytes(),
            Pkt::udp(40000, 3, 1000).bytes(),
            Pkt::udp(40000, 4, 1000).bytes(),
            Pkt::udp(40000, 5, 1200).bytes(),
        ];
        let (back, counts) = run(&pkts, true);
        assert_eq!(counts, vec![2, 2, 1]);
        assert_eq!(back, pkts);
    }

    #[test]
    fn interleaved_flows_keep_their_own_order() {
        let pkts: Vec<Vec<u8>> = (0..8)
            .map(|i| Pkt::udp(40000 + (i % 2), 10 + i / 2, 900).bytes())
            .collect();
        let (back, counts) = run(&pkts, true);
        assert_eq!(counts, vec![4, 4]);
        let want: Vec<Vec<u8>> = [0, 2, 4, 6, 1, 3, 5, 7]
            .iter()
            .map(|&i| pkts[i].clone())
            .collect();
        assert_eq!(back, want);
    }

    #[test]
    fn ipv4_ids_must_count_up_unless_df() {
        let pkts = vec![
            Pkt::udp(40000, 7, 800).bytes(),
            Pkt::udp(40000, 9, 800).bytes(),
        ];
        assert_eq!(run(&pkts, true).1, vec![1, 1]);
        let df = |id| {
            Pkt {
                df: true,
                ..Pkt::udp(40000, id, 800)
            }
            .bytes()
        };
        let mut bufs = buffers(&[df(7), df(7)]);
        let mut c = Coalescer::new();
        c.plan(&mut bufs, true);
        assert_eq!(c.groups().count(), 1, "DF packets with a fixed ID coalesce");
    }

    #[test]
    fn tcp_stream_coalesces_and_psh_ends_it() {
        let mss = 1368;
        let mut pkts: Vec<Vec<u8>> = Vec::new();
        for k in 0..4u32 {
            let mut p = Pkt::tcp(1000 + k * mss as u32, mss);
            p.id = k as u16;
            if k == 3 {
                p.flags |= TCP_PSH;
            }
            pkts.push(p.bytes());
        }
        pkts.push(Pkt::tcp(1000 + 4 * mss as u32, mss).bytes());
        let (back, counts) = run(&pkts, true);
        assert_eq!(counts, vec![4, 1]);
        assert_eq!(back, pkts);
    }

    #[test]
    fn tcp_gaps_acks_options_and_flags_split_groups() {
        let mss = 1000;
        let a = Pkt::tcp(0, mss).bytes();
        let gap = Pkt::tcp(2 * mss as u32, mss).bytes();
        assert_eq!(run(&[a.clone(), gap.clone()], true).1, vec![1, 1]);
        let other_ack = Pkt {
            ack: 7,
            ..Pkt::tcp(mss as u32, mss)
        }
        .bytes();
        assert_eq!(run(&[a.clone(), other_ack], true).1, vec![1, 1]);
        let mut ts = Pkt::tcp(mss as u32, mss);
        ts.options[11] = 6; // another timestamp
        assert_eq!(run(&[a.clone(), ts.bytes()], true).1, vec![1, 1]);
        let fin = Pkt {
            flags: TCP_ACK | 1,
            ..Pkt::tcp(mss as u32, mss)
        }
        .bytes();
        assert_eq!(run(&[a.clone(), fin], true).1, vec![1, 1]);
        let pure_ack = Pkt::tcp(mss as u32, 0).bytes();
        let (back, counts) = run(&[a.clone(), pure_ack.clone()], true);
        assert_eq!(counts, vec![1, 1]);
        assert_eq!(back, vec![a, pure_ack]);
    }

    #[test]
    fn ipv6_tcp_and_udp() {
        let mss = 1300;
        let tcp: Vec<Vec<u8>> = (0..3)
            .map(|k| {
                Pkt {
                    v6: true,
                    ..Pkt::tcp(k * mss as u32, mss)
                }
                .bytes()
            })
            .collect();
        let (back, counts) = run(&tcp, true);
        assert_eq!((back, counts), (tcp, vec![3]));
        let udp: Vec<Vec<u8>> = (0..3)
            .map(|i| {
                Pkt {
                    v6: true,
                    ..Pkt::udp(40000, i, 1200)
                }
                .bytes()
            })
            .collect();
        let (back, counts) = run(&udp, true);
        assert_eq!((back, counts), (udp, vec![3]));
    }

    #[test]
    fn wrong_checksums_are_never_coalesced() {
        let mut pkts: Vec<Vec<u8>> = (0..4).map(|i| Pkt::udp(40000, i, 700).bytes()).collect();
        pkts[2][30] ^= 0xff; // payload corrupted after the checksum was taken
        let (back, counts) = run(&pkts, true);
        assert_eq!(counts, vec![2, 1, 1]);
        assert_eq!(
            back, pkts,
            "the bad one goes out as it came, for the kernel to drop"
        );
        let mut pkts: Vec<Vec<u8>> = (0..3).map(|i| Pkt::udp(40000, i, 700).bytes()).collect();
        pkts[0][30] ^= 0xff;
        let (back, counts) = run(&pkts, true);
        assert_eq!(counts, vec![1, 2]);
        assert_eq!(back, pkts);
    }

    #[test]
    fn groups_stop_at_the_segment_and_size_limits() {
        let pkts: Vec<Vec<u8>> = (0..70).map(|i| Pkt::udp(40000, i, 100).bytes()).collect();
        assert_eq!(run(&pkts, true).1, vec![64, 6]);
        let pkts: Vec<Vec<u8>> = (0..50).map(|i| Pkt::udp(40000, i, 1400).bytes()).collect();
        let (back, counts) = run(&pkts, true);
        assert_eq!(counts, vec![46, 4]); // 28 + 46 * 1400 <= 65535
        assert_eq!(back, pkts);
    }

    #[test]
    fn anything_else_passes_through_whole() {
        let mut pkts = vec![
            vec![],
            vec![0x45],
            vec![0x60; 39],
            vec![0xff; 100],
            Pkt::udp(40000, 0, 10).bytes()[..30].to_vec(),
        ];
        let mut frag = Pkt::udp(40000, 1, 300).bytes();
        frag[6] = 0x20; // more fragments
        pkts.push(frag);
        let mut bufs = buffers(&pkts);
        let mut c = Coalescer::new();
        c.plan(&mut bufs, true);
        let w = written(&c, &bufs);
        assert_eq!(w.len(), pkts.len());
        for (w, p) in w.iter().zip(&pkts) {
            assert_eq!(&w[HDR_LEN..], &p[..]);
            assert_eq!(&w[..HDR_LEN], &[0; HDR_LEN]);
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut c = Coalescer::new();
        for _ in 0..2000 {
            let base = Pkt::tcp(0, 200).bytes();
            let mut bufs: Vec<Vec<u8>> = (0..8)
                .map(|_| {
                    let mut p = base.clone();
                    let cut = (rnd() % (p.len() as u64 + 1)) as usize;
                    p.truncate(cut);
                    for _ in 0..3 {
                        if !p.is_empty() {
                            let at = (rnd() % p.len() as u64) as usize;
                            p[at] = rnd() as u8;
                        }
                    }
                    let mut b = vec![0u8; HDR_LEN];
                    b.extend_from_slice(&p);
                    b
                })
                .collect();
            c.plan(&mut bufs, true);
            let total: usize = c.groups().map(|(_, m)| 1 + m.count()).sum();
            assert_eq!(total, 8);
        }
    }
}
