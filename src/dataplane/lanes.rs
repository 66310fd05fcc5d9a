//! Per-CPU lanes for light traffic: one socket and one pinned thread per CPU, so a
//! round trip through an idle tunnel stays on the CPU it started on.
//!
//! Waking a thread on another CPU is what an idle round trip mostly costs on a
//! virtual machine: an idle vCPU halts, and a wake-up aimed at it is an
//! inter-processor interrupt that the host has to turn into a running vCPU again (on
//! the 2-vCPU VMs sitewire is benchmarked on, a pipe round trip between two processes
//! takes 48 µs across the vCPUs and 7 µs on one). The scheduler places a woken thread on an idle CPU when
//! it can, so with one reader thread per direction a ping hops between the vCPUs at
//! almost every step. With lanes, the site's UDP port is a `SO_REUSEPORT` group with
//! one socket per CPU and a classic BPF program that hands each datagram to the socket
//! of the CPU that received it; each lane's thread is pinned to its CPU and serves the
//! TUN too while traffic is light ([`super::handover`]). A packet written into the TUN
//! on CPU *n* (by ping, say) wakes the lane of CPU *n* without an interrupt, its
//! datagram is received on CPU *n* by the peer (in the same kernel, the other site of
//! a lab), and the reply comes back the same way.
//!
//! Bulk traffic must not be pinned: a stream received on the sender's CPU would then
//! share that CPU with the sender. The first lane that sees datagrams come as a stream
//! ([`super::handover::Pace`]) swaps the group's program for one that sends everything
//! to the site's main socket, read by the unpinned UDP reader as before; that reader
//! swaps the per-CPU program back after [`LANES_AFTER_IDLE_MS`] without a datagram.
//! Datagrams already queued on a lane when the program changes are still read by it,
//! so at most those few can overtake each other at the switch.
//!
//! Lanes are used when the daemon may run on CPUs 0..n-1 (2 <= n <= [`MAX_LANES`]):
//! CPU *c* maps to lane *c* mod n. Anything else (one CPU, a cpuset with holes, a
//! kernel without reuse-port programs) keeps the single socket.

use std::io;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::Wire;

/// Most lanes. Every lane polls the TUN while traffic is light, so a packet written
/// into it wakes them all (the lane of its CPU to serve it, the others to find it
/// gone): beyond this many CPUs that costs more than the lanes save.
pub const MAX_LANES: usize = 8;

/// The main UDP reader gives the datagrams back to the lanes after this long without one.
pub const LANES_AFTER_IDLE_MS: u16 = 50;

/// The lanes of a site's port, or none.
#[derive(Default)]
pub struct Lanes {
    /// Lane `i` serves CPU `i`; its socket is index `i + 1` of the reuse-port group
    /// (index 0 is the site's main socket).
    wires: Vec<Wire>,
    /// Everything goes to the main socket (a stream is on).
    bulk: AtomicBool,
    /// A swap failed: the program stays as it is (and the failure is logged once).
    stuck: AtomicBool,
    /// Serialises program swaps, so `bulk` matches the program attached last.
    swap: Mutex<()>,
}

impl Lanes {
    pub fn len(&self) -> usize {
        self.wires.len()
    }

    pub fn is_empty(&self) -> bool {
        self.wires.is_empty()
    }

    pub fn wire(&self, lane: usize) -> Option<&Wire> {
        self.wires.get(lane)
    }

    /// Datagrams go to the main socket (true) or to the lanes.
    pub fn bulk(&self) -> bool {
        self.bulk.load(Ordering::Acquire)
    }

    /// Send every datagram to the main socket `main` (a stream has started).
    pub fn to_bulk(&self, main: &Wire) {
        self.steer(main, true);
    }

    /// Hand datagrams to the lanes by CPU again.
    pub fn to_lanes(&self, main: &Wire) {
        self.steer(main, false);
    }

    fn steer(&self, main: &Wire, bulk: bool) {
        if self.wires.is_empty() || self.bulk() == bulk || self.stuck.load(Ordering::Relaxed) {
            return;
        }
        let _guard = self.swap.lock().unwrap_or_else(|e| e.into_inner());
        if self.bulk() == bulk {
            return;
        }
        let lanes = if bulk { None } else { Some(self.wires.len()) };
        match attach(&main.sock, lanes) {
            Ok(()) => self.bulk.store(bulk, Ordering::Release),
            Err(e) => {
                // Datagrams still arrive either way, only on the current sockets.
                self.stuck.store(true, Ordering::Relaxed);
                tracing::warn!(error = %e, bulk, "switching the UDP lanes failed; they stay as they are");
            }
        }
    }
}

/// How many lanes this process can have: the CPUs it may run on, when they are
/// 0..n-1 with 2 <= n <= [`MAX_LANES`] and threads may be pinned; else 0.
pub fn usable() -> usize {
    // SAFETY: a zeroed cpu_set_t is an empty set; sched_getaffinity fills it and
    // CPU_ISSET reads it, both given its size.
    let (count, contiguous) = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return 0;
        }
        let count = libc::CPU_COUNT(&set) as usize;
        let contiguous = (0..count).all(|cpu| libc::CPU_ISSET(cpu, &set));
        // May threads be pinned here (a seccomp filter may say no)? Setting the mask
        // the thread has changes nothing.
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return 0;
        }
        (count, contiguous)
    };
    if contiguous && (2..=MAX_LANES).contains(&count) {
        count
    } else {
        0
    }
}

/// The site's main socket on `port` and `lanes` more in its reuse-port group, steered
/// by CPU. With `lanes` 0, or when the kernel refuses the program, the main socket
/// alone (bound without `SO_REUSEPORT`).
pub fn bind(port: u16, lanes: usize) -> io::Result<(Wire, Lanes)> {
    if lanes < 2 {
        return Ok((Wire::bind(port)?, Lanes::default()));
    }
    // A port somebody holds must fail as it does without lanes. Binding it without
    // SO_REUSEPORT fails if any socket has it, one in a reuse-port group included.
    if port != 0 {
        drop(Wire::bind(port)?);
    }
    let main = Wire::bind_reusable(port)?;
    let port = main.local_port()?;
    let wires = (0..lanes)
        .map(|_| Wire::bind_reusable(port))
        .collect::<io::Result<Vec<_>>>()?;
    if let Err(e) = attach(&main.sock, Some(lanes)) {
        tracing::info!(error = %e, "no per-CPU UDP lanes: the kernel refused the steering program");
        drop(wires);
        drop(main);
        return Ok((Wire::bind(port)?, Lanes::default()));
    }
    Ok((
        main,
        Lanes {
            wires,
            bulk: AtomicBool::new(false),
            stuck: AtomicBool::new(false),
            swap: Mutex::new(()),
        },
    ))
}

/// Pin the calling thread to `cpu`.
pub fn pin_to(cpu: usize) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity get it
    // and its size.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The group's program: with `lanes`, a datagram received on CPU c goes to socket
/// 1 + c mod lanes (lane c); without, to socket 0 (the main socket).
fn program(lanes: Option<usize>) -> Vec<libc::sock_filter> {
    let op = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    match lanes {
        Some(n) => vec![
            op(
                libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
                (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32,
            ),
            op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, n as u32),
            op(libc::BPF_ALU | libc::BPF_ADD | libc::BPF_K, 1),
            op(libc::BPF_RET | libc::BPF_A, 0),
        ],
        None => vec![op(libc::BPF_RET | libc::BPF_K, 0)],
    }
}

fn attach(sock: &UdpSocket, lanes: Option<usize>) -> io::Result<()> {
    let code = program(lanes);
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_ptr().cast_mut(),
    };
    // SAFETY: setsockopt on a socket we own with a live sock_fprog whose filter points
    // at `code`; the kernel copies the program before returning.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Which of `wires` (main first, then the lanes) holds a datagram, waiting up to 1 s.
    fn receiver(wires: &[&Wire]) -> Option<usize> {
        let mut buf = [0u8; 64];
        for _ in 0..100 {
            for (i, w) in wires.iter().enumerate() {
                if w.sock.recv_from(&mut buf).is_ok() {
                    return Some(i);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Send one datagram to `port` on loopback from a thread pinned to `cpu`.
    fn send_from(cpu: usize, port: u16) {
        std::thread::spawn(move || {
            pin_to(cpu).unwrap();
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.send_to(b"x", ("127.0.0.1", port)).unwrap();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn datagrams_reach_the_lane_of_the_cpu_that_received_them_until_a_stream_takes_them_to_the_main_socket(
    ) {
        let n = usable();
        if n < 2 {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but this process may run on fewer than 2 CPUs (or a cpuset with holes)"
            );
            eprintln!("skipped: fewer than 2 CPUs");
            return;
        }
        let (main, lanes) = bind(0, n).unwrap();
        assert_eq!(lanes.len(), n);
        let port = main.local_port().unwrap();
        let all: Vec<&Wire> = std::iter::once(&main)
            .chain((0..n).map(|i| lanes.wire(i).unwrap()))
            .collect();
        // Loopback delivers in the sender's softirq, on the sender's CPU.
        for cpu in 0..n {
            send_from(cpu, port);
            assert_eq!(receiver(&all), Some(cpu + 1), "sent from CPU {cpu}");
        }
        lanes.to_bulk(&main);
        assert!(lanes.bulk());
        for cpu in 0..n {
            send_from(cpu, port);
            assert_eq!(receiver(&all), Some(0), "sent from CPU {cpu} in bulk mode");
        }
        lanes.to_lanes(&main);
        assert!(!lanes.bulk());
        send_from(n - 1, port);
        assert_eq!(receiver(&all), Some(n));
    }

    #[test]
    fn a_port_in_use_is_refused_with_lanes_as_without() {
        let held = UdpSocket::bind("[::]:0")
            .or_else(|_| UdpSocket::bind("0.0.0.0:0"))
            .unwrap();
        let port = held.local_addr().unwrap().port();
        let err = bind(port, 2).err().expect("bound a port in use");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        // And a site's group cannot be joined by a second site on the same port.
        let (main, _lanes) = bind(0, 2).unwrap();
        let port = main.local_port().unwrap();
        let err = bind(port, 2).err().expect("joined another site's port");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }
}
