//! One read from the TUN. A packet that comes alone (every UDP datagram, every ACK) is
//! used where it was read, its checksum completed in place when the sender's stack left
//! it to the device's offload; only a GSO super-packet (a TCP burst) is split into
//! MTU-sized segments, by tun-rs's `gso_split`.

use std::io;
use std::ops::Range;

use tun_rs::{SyncDevice, VirtioNetHdr};

use super::gro::{self, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, HDR_F_NEEDS_CSUM, HDR_LEN};

const GSO_NONE: u8 = 0;
const GSO_ECN: u8 = 0x80;

/// Where the packets of one read are.
#[derive(Debug, PartialEq, Eq)]
pub enum Packets {
    /// One packet: this range of the read buffer.
    One(Range<usize>),
    /// A super-packet split into the first `n` of the segment buffers.
    Split(usize),
}

/// Read once from `tun` into `raw`; a super-packet is split into `bufs`/`sizes`.
/// `InvalidInput` for a frame that cannot be a packet (counted as malformed by the
/// caller); `WouldBlock` when the TUN is empty.
pub fn read(
    tun: &SyncDevice,
    raw: &mut [u8],
    bufs: &mut [Vec<u8>],
    sizes: &mut [usize],
) -> io::Result<Packets> {
    let n = tun.recv(raw)?;
    if !tun.tcp_gso() {
        return Ok(Packets::One(0..n));
    }
    match prepare(&mut raw[..n])? {
        None => Ok(Packets::One(HDR_LEN..n)),
        Some((hdr, v6)) => {
            tun_rs::gso_split(&mut raw[HDR_LEN..n], hdr, bufs, sizes, 0, v6).map(Packets::Split)
        }
    }
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// Look at a frame (virtio-net header and packet) read from the TUN: a lone packet gets
/// its checksum completed and `None`; a super-packet gives the header to split it with
/// (its `hdr_len` taken from the packet, not from the kernel, which may put the whole
/// first segment there on a forwarding path) and whether it is IPv6.
fn prepare(frame: &mut [u8]) -> io::Result<Option<(VirtioNetHdr, bool)>> {
    if frame.len() <= HDR_LEN {
        return Err(invalid("frame shorter than its virtio-net header"));
    }
    let mut hdr = VirtioNetHdr::decode(&frame[..HDR_LEN])?;
    let p = &mut frame[HDR_LEN..];
    if hdr.gso_type == GSO_NONE {
        if hdr.flags & HDR_F_NEEDS_CSUM != 0 {
            complete_checksum(p, hdr.csum_start.into(), hdr.csum_offset.into())?;
        }
        return Ok(None);
    }
    let v6 = match p[0] >> 4 {
        4 => false,
        6 => true,
        _ => return Err(invalid("super-packet is not IP")),
    };
    let start = usize::from(hdr.csum_start);
    let l4 = match (hdr.gso_type & !GSO_ECN, v6) {
        (GSO_TCPV4, false) | (GSO_TCPV6, true) => {
            let doff = p.get(start + 12).ok_or(invalid("TCP header cut short"))? >> 4;
            let l4 = usize::from(doff) * 4;
            if l4 < 20 {
                return Err(invalid("TCP header shorter than 20 bytes"));
            }
            l4
        }
        (GSO_UDP_L4, _) => 8,
        _ => return Err(invalid("GSO type does not fit the packet")),
    };
    hdr.hdr_len = u16::try_from(start + l4).map_err(|_| invalid("headers too long"))?;
    Ok(Some((hdr, v6)))
}

/// Fill in the transport checksum the sender's stack left to the device: the field at
/// `start + offset` holds the pseudo-header's sum, the sum runs from `start` to the end.
fn complete_checksum(p: &mut [u8], start: usize, offset: usize) -> io::Result<()> {
    let at = start + offset;
    if start >= p.len() || at + 2 > p.len() {
        return Err(invalid("checksum offsets outside the packet"));
    }
    let sum = gro::checksum(&p[start..]);
    p[at..at + 2].copy_from_slice(&sum.to_ne_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::dataplane::gro::tests::{csum16, pseudo, Pkt};

    /// An IPv4 UDP packet as the sender's stack hands it to an offload device (the
    /// checksum field holds the pseudo-header sum), and its complete checksum.
    fn partial_udp(payload: usize) -> (Vec<u8>, u16) {
        let mut p = Pkt::udp(40000, 1, payload).bytes();
        let full = u16::from_be_bytes([p[26], p[27]]);
        let sum = !csum16(&[&pseudo(&p, 20, 17, p.len() - 20)]);
        p[26..28].copy_from_slice(&sum.to_be_bytes());
        (p, full)
    }

    fn frame(hdr: [u8; HDR_LEN], p: &[u8]) -> Vec<u8> {
        let mut f = hdr.to_vec();
        f.extend_from_slice(p);
        f
    }

    fn hdr(flags: u8, gso: u8, gso_size: u16, start: u16, offset: u16) -> [u8; HDR_LEN] {
        let mut h = [0u8; HDR_LEN];
        h[0] = flags;
        h[1] = gso;
        h[4..6].copy_from_slice(&gso_size.to_ne_bytes());
        h[6..8].copy_from_slice(&start.to_ne_bytes());
        h[8..10].copy_from_slice(&offset.to_ne_bytes());
        h
    }

    #[test]
    fn a_lone_packet_is_used_in_place_with_its_checksum_completed() {
        for payload in [1, 2, 3, 1364] {
            let (p, full) = partial_udp(payload);
            let mut f = frame(hdr(HDR_F_NEEDS_CSUM, GSO_NONE, 0, 20, 6), &p);
            assert!(prepare(&mut f).unwrap().is_none());
            assert_eq!(&f[HDR_LEN + 26..HDR_LEN + 28], &full.to_be_bytes());
            assert_eq!(&f[HDR_LEN..HDR_LEN + 26], &p[..26], "nothing else changes");
            assert_eq!(&f[HDR_LEN + 28..], &p[28..]);
        }
        // Without NEEDS_CSUM nothing is touched.
        let (p, _) = partial_udp(100);
        let mut f = frame([0; HDR_LEN], &p);
        assert!(prepare(&mut f).unwrap().is_none());
        assert_eq!(&f[HDR_LEN..], &p[..]);
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let (p, _) = partial_udp(50);
        for f in [
            vec![],
            vec![0; HDR_LEN],
            frame(hdr(HDR_F_NEEDS_CSUM, GSO_NONE, 0, 74, 6), &p),
            frame(hdr(HDR_F_NEEDS_CSUM, GSO_NONE, 0, 78, 0), &p),
            frame(hdr(HDR_F_NEEDS_CSUM, GSO_NONE, 0, 20, 60), &p),
            frame(hdr(HDR_F_NEEDS_CSUM, GSO_NONE, 0, 65535, 65535), &p),
            frame(hdr(HDR_F_NEEDS_CSUM, GSO_TCPV6, 1000, 20, 16), &p),
            frame(hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 1000, 70, 16), &p),
            frame(hdr(HDR_F_NEEDS_CSUM, 3, 1000, 20, 6), &p),
            frame(hdr(HDR_F_NEEDS_CSUM, GSO_UDP_L4, 1000, 20, 6), &[0x15; 40]),
        ] {
            let mut f = f;
            let e = prepare(&mut f).expect_err("a bad frame");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn a_udp_super_packet_is_split() {
        // Three 100-byte segments behind one UDP header, as the stack sends with USO.
        let (mut p, _) = partial_udp(300);
        p[2..4].copy_from_slice(&328u16.to_be_bytes());
        let mut f = frame(hdr(HDR_F_NEEDS_CSUM, GSO_UDP_L4, 100, 20, 6), &p);
        let (h, v6) = prepare(&mut f).unwrap().expect("a super-packet");
        assert!(!v6);
        assert_eq!(h.hdr_len, 28);
        let mut bufs = vec![vec![0u8; 2048]; 8];
        let mut sizes = vec![0usize; 8];
        let n = tun_rs::gso_split(&mut f[HDR_LEN..], h, &mut bufs, &mut sizes, 0, v6).unwrap();
        assert_eq!((n, &sizes[..3]), (3, &[128, 128, 128][..]));
        for (k, b) in bufs.iter().take(3).enumerate() {
            assert_eq!(&b[28..128], &p[28 + 100 * k..128 + 100 * k]);
            assert_eq!(csum16(&[&b[..20]]), 0, "IPv4 header checksum");
        }
    }
}
