//! Small traffic tools for `sitewire demo`, run inside its namespaces so the demo needs
//! nothing beyond root and iproute2: ICMP echo, and a TCP sender/sink. Each prints one
//! JSON line with its result.

use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Subcommand;
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

#[derive(Subcommand)]
pub enum Probe {
    /// ICMP echo requests from one address to another.
    Ping {
        #[arg(long)]
        from: Ipv4Addr,
        #[arg(long)]
        to: Ipv4Addr,
        #[arg(long, default_value_t = 10)]
        count: u32,
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
    },
    /// Accept one TCP connection and count what arrives.
    Sink {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Connect and send as fast as possible for a while.
    Send {
        #[arg(long)]
        from: Ipv4Addr,
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 3)]
        secs: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PingResult {
    pub sent: u32,
    pub received: u32,
    pub rtt_ms: Vec<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TransferResult {
    pub bytes: u64,
    pub secs: f64,
}

pub fn run(probe: Probe) -> Result<ExitCode> {
    let line = match probe {
        Probe::Ping {
            from,
            to,
            count,
            interval_ms,
        } => serde_json::to_string(&icmp_ping(
            from,
            to,
            count,
            Duration::from_millis(interval_ms),
        )?)?,
        Probe::Sink { listen } => serde_json::to_string(&tcp_sink(listen)?)?,
        Probe::Send { from, to, secs } => {
            serde_json::to_string(&tcp_send(from, to, Duration::from_secs(secs))?)?
        }
    };
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Build an ICMP echo request with a 32-byte payload.
pub fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![8, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend((0..32u8).map(|i| i.wrapping_mul(7)));
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

/// Parse an IPv4 packet carrying an ICMP echo reply; returns (id, seq).
pub fn parse_echo_reply(packet: &[u8]) -> Option<(u16, u16)> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let icmp = packet.get(ihl..)?;
    if icmp.len() < 8 || icmp[0] != 0 {
        return None;
    }
    Some((
        u16::from_be_bytes([icmp[4], icmp[5]]),
        u16::from_be_bytes([icmp[6], icmp[7]]),
    ))
}

fn icmp_ping(from: Ipv4Addr, to: Ipv4Addr, count: u32, interval: Duration) -> Result<PingResult> {
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
        .context("opening a raw ICMP socket (needs root)")?;
    sock.bind(&SockAddr::from(SocketAddr::from((from, 0))))
        .with_context(|| format!("binding {from}"))?;
    let dst = SockAddr::from(SocketAddr::from((to, 0)));
    let id = (std::process::id() & 0xffff) as u16;
    let mut res = PingResult {
        sent: 0,
        received: 0,
        rtt_ms: Vec::new(),
    };
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    for seq in 0..count {
        let seq = seq as u16;
        let t0 = Instant::now();
        sock.send_to(&echo_request(id, seq), &dst)?;
        res.sent += 1;
        let deadline = t0 + Duration::from_secs(1);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            let Ok(n) = sock.recv(&mut buf) else { break };
            // SAFETY: recv initialised the first n bytes.
            let bytes: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            if parse_echo_reply(&bytes) == Some((id, seq)) {
                res.received += 1;
                res.rtt_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
                break;
            }
        }
        if let Some(rest) = interval.checked_sub(t0.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    Ok(res)
}

fn tcp_sink(listen: SocketAddr) -> Result<TransferResult> {
    let l = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let (mut s, _) = l.accept()?;
    let t0 = Instant::now();
    let mut buf = vec![0u8; 128 * 1024];
    let mut bytes = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(TransferResult {
        bytes,
        secs: t0.elapsed().as_secs_f64(),
    })
}

fn tcp_send(from: Ipv4Addr, to: SocketAddr, secs: Duration) -> Result<TransferResult> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    sock.bind(&SockAddr::from(SocketAddr::from((from, 0))))?;
    sock.connect_timeout(&SockAddr::from(to), Duration::from_secs(5))
        .with_context(|| format!("connecting to {to}"))?;
    let mut s: TcpStream = sock.into();
    let buf = vec![0x5au8; 128 * 1024];
    let t0 = Instant::now();
    let mut bytes = 0u64;
    while t0.elapsed() < secs {
        bytes += s.write(&buf)? as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    // Wait for the sink to read everything (it closes after EOF).
    let _ = s.read(&mut [0u8; 1]);
    Ok(TransferResult {
        bytes,
        secs: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_checksum_verifies() {
        let p = echo_request(0x1234, 7);
        // A correct checksum makes the one's-complement sum of the whole message zero.
        assert_eq!(checksum(&p), 0);
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
    }

    #[test]
    fn parses_reply_behind_ip_header() {
        let mut pkt = vec![0x45u8; 1];
        pkt.extend_from_slice(&[0; 19]);
        let mut icmp = echo_request(9, 3);
        icmp[0] = 0;
        pkt.extend_from_slice(&icmp);
        assert_eq!(parse_echo_reply(&pkt), Some((9, 3)));
        assert_eq!(parse_echo_reply(&pkt[..22]), None);
        assert_eq!(parse_echo_reply(&[]), None);
    }
}
