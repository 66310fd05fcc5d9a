//! Batches that turn many packets into few syscalls.
//!
//! * [`TxBatch`]: encrypted datagrams to one endpoint, sent with one `sendmsg` as a UDP
//!   GSO train (equal-sized segments, only the last may be shorter).
//! * [`TunBatch`]: decrypted packets written to the TUN, each TCP/UDP flow coalesced
//!   into GSO super-packets ([`super::gro`]) when the device has offload on.
//!
//! Both own their buffers for the life of a packet thread: nothing on the hot path
//! allocates. Failed sends are counted in `failed` for the thread to report as drops.

use std::io::{self, IoSlice};
use std::net::SocketAddr;

use tun_rs::{SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::gro::{self, Coalescer};
use super::Wire;

/// Largest UDP payload of one GSO train (the kernel limit is 64 KiB minus headers).
const GSO_MAX_BYTES: usize = 60_000;

/// Datagrams queued for one UDP GSO `sendmsg`.
pub struct TxBatch {
    buf: Vec<u8>,
    to: Option<SocketAddr>,
    segment: usize,
    count: usize,
    /// The last segment was shorter than `segment`: nothing may follow it.
    closed: bool,
    /// Datagrams lost to failed sends since the owner last looked.
    pub failed: u64,
}

impl Default for TxBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl TxBatch {
    pub fn new() -> Self {
        Self {
            buf: Vec::with_capacity(GSO_MAX_BYTES + super::MAX_PACKET),
            to: None,
            segment: 0,
            count: 0,
            closed: false,
            failed: 0,
        }
    }

    /// Queue `datagram` for `to`, sending what is queued first if it cannot join.
    pub fn push(&mut self, wire: &Wire, datagram: &[u8], to: SocketAddr) {
        if self.count > 0
            && (self.to != Some(to)
                || self.closed
                || datagram.len() > self.segment
                || self.buf.len() + datagram.len() > GSO_MAX_BYTES
                || self.count >= wire.max_segments())
        {
            self.flush(wire);
        }
        if self.count == 0 {
            self.to = Some(to);
            self.segment = datagram.len();
        }
        self.buf.extend_from_slice(datagram);
        self.count += 1;
        self.closed = datagram.len() < self.segment;
    }

    /// Send everything queued.
    pub fn flush(&mut self, wire: &Wire) {
        let Some(to) = self.to.take() else {
            return;
        };
        if self.count > 0 {
            let segment = (self.count > 1).then_some(self.segment);
            if wire.send_segments(&self.buf, segment, to).is_err() {
                self.failed += self.count as u64;
            }
        }
        self.buf.clear();
        self.count = 0;
        self.closed = false;
    }
}

/// Decrypted packets waiting to be written to the TUN.
pub struct TunBatch {
    bufs: Vec<Vec<u8>>,
    len: usize,
    gro: Coalescer,
    /// Packets lost to failed writes since the owner last looked.
    pub failed: u64,
}

impl Default for TunBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl TunBatch {
    pub fn new() -> Self {
        Self {
            // Pages are only touched as far as they are used.
            bufs: (0..IDEAL_BATCH_SIZE)
                .map(|_| Vec::with_capacity(VIRTIO_NET_HDR_LEN + super::MAX_PACKET))
                .collect(),
            len: 0,
            gro: Coalescer::new(),
            failed: 0,
        }
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queue one IP packet, writing out the batch first if it is full.
    pub fn push(&mut self, tun: &SyncDevice, packet: &[u8]) {
        if self.len == self.bufs.len() {
            self.flush(tun);
        }
        let b = &mut self.bufs[self.len];
        b.clear();
        b.resize(VIRTIO_NET_HDR_LEN, 0);
        b.extend_from_slice(packet);
        self.len += 1;
    }

    /// Write everything queued.
    pub fn flush(&mut self, tun: &SyncDevice) {
        if self.len == 0 {
            return;
        }
        let n = self.len;
        self.len = 0;
        // A failed write counts its packets as lost (EINTR aside: nothing was written).
        let lost = |r: io::Result<usize>| r.is_err_and(|e| e.kind() != io::ErrorKind::Interrupted);
        let mut failed = 0;
        if n == 1 || !tun.tcp_gso() {
            // A lone packet (a ping, an ACK, a DNS answer) has nothing to coalesce
            // with: write it as it is, behind the all-zero virtio-net header (no
            // offload asked) when the device takes one.
            let skip = if tun.tcp_gso() { 0 } else { VIRTIO_NET_HDR_LEN };
            for b in &self.bufs[..n] {
                failed += u64::from(lost(tun.send(&b[skip..])));
            }
            self.failed += failed;
            return;
        }
        self.gro.plan(&mut self.bufs[..n], tun.udp_gso());
        let mut iov = [IoSlice::new(&[]); gro::MAX_SEGMENTS as usize];
        for (head, members) in self.gro.groups() {
            iov[0] = IoSlice::new(&self.bufs[head]);
            let mut k = 1;
            for (i, from) in members {
                iov[k] = IoSlice::new(&self.bufs[i][from..]);
                k += 1;
            }
            let sent = if k == 1 {
                tun.send(&self.bufs[head])
            } else {
                tun.send_vectored(&iov[..k])
            };
            if lost(sent) {
                failed += k as u64;
            }
        }
        self.failed += failed;
    }
}
