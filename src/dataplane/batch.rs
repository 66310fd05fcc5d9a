//! Batches that turn many packets into few syscalls.
//!
//! * [`TxBatch`]: encrypted datagrams to one endpoint, sent with one `sendmsg` as a UDP
//!   GSO train (equal-sized segments, only the last may be shorter).
//! * [`TunBatch`]: decrypted packets written to the TUN with `send_multiple`, which
//!   coalesces TCP/UDP flows into GRO super-packets when the device has offload on.
//!
//! Both own their buffers for the life of a packet thread: nothing on the hot path
//! allocates. Failed sends are counted in `failed` for the thread to report as drops.

use std::io;
use std::net::SocketAddr;

use tun_rs::{GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

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

/// Decrypted packets waiting for one `send_multiple` to the TUN.
pub struct TunBatch {
    bufs: Vec<Vec<u8>>,
    len: usize,
    gro: GROTable,
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
            // Capacity for a whole GRO super-packet: coalescing grows the first buffer
            // of a flow in place. Pages are only touched as far as they are used.
            bufs: (0..IDEAL_BATCH_SIZE)
                .map(|_| Vec::with_capacity(VIRTIO_NET_HDR_LEN + super::MAX_PACKET))
                .collect(),
            len: 0,
            gro: GROTable::new(),
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
        let sent = if n == 1 {
            // A lone packet (a ping, an ACK, a DNS answer) has nothing to coalesce
            // with: write it as it is, behind the all-zero virtio-net header (no
            // offload asked) when the device takes one, and skip the GRO table.
            let b = &self.bufs[0];
            let frame = if tun.tcp_gso() {
                &b[..]
            } else {
                &b[VIRTIO_NET_HDR_LEN..]
            };
            tun.send(frame)
        } else {
            tun.send_multiple(&mut self.gro, &mut self.bufs[..n], VIRTIO_NET_HDR_LEN)
        };
        if let Err(e) = sent {
            // Part of the batch may have gone out; count the whole batch conservatively
            // unless the device is gone.
            if e.kind() != io::ErrorKind::Interrupted {
                self.failed += n as u64;
            }
        }
    }
}
