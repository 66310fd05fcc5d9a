//! systemd's readiness protocol (`sd_notify(3)`), without libsystemd: one datagram per
//! message to the Unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the
//! abstract namespace). Outside systemd the variable is unset and every call is a no-op.
//!
//! The daemon sends `READY=1` once every tunnel is configured, `RELOADING=1` with
//! `MONOTONIC_USEC` when a reload starts (followed by `READY=1` when it is done, applied or
//! refused), `STOPPING=1` on shutdown, and `STATUS=` lines that `systemctl status` shows.

use std::io;
use std::os::unix::net::UnixDatagram;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `msg` (newline-separated `KEY=value` assignments) to `$NOTIFY_SOCKET`.
/// Returns Ok(false) when the variable is not set (not started by systemd).
pub fn notify(msg: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(addr) if !addr.is_empty() => {
            notify_to(&addr.to_string_lossy(), msg)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Sends `msg` to the notification socket `addr` (`/path` or `@abstract`).
pub fn notify_to(addr: &str, msg: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    if let Some(name) = addr.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let a = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        sock.send_to_addr(msg.as_bytes(), &a)?;
    } else if addr.starts_with('/') {
        sock.send_to(msg.as_bytes(), addr)?;
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unsupported {NOTIFY_SOCKET} address {addr:?}"),
        ));
    }
    Ok(())
}

/// CLOCK_MONOTONIC in microseconds, as `MONOTONIC_USEC=` wants it.
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// Status text must stay on one line.
fn one_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

fn send(msg: String) {
    if let Err(e) = notify(&msg) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

pub fn ready(status: &str) {
    send(format!("READY=1\nSTATUS={}", one_line(status)));
}

pub fn reloading() {
    send(format!(
        "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the configuration",
        monotonic_usec()
    ));
}

pub fn stopping() {
    send("STOPPING=1\nSTATUS=shutting down".to_string());
}

pub fn status(status: &str) {
    send(format!("STATUS={}", one_line(status)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("sw-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1\nSTATUS=ok").unwrap();
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=ok");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("sw-notify-test-{}", std::process::id());
        let a = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&a).unwrap();
        notify_to(&format!("@{name}"), "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn rejects_relative_addresses_and_keeps_status_on_one_line() {
        assert!(notify_to("relative/path", "READY=1").is_err());
        assert_eq!(one_line("a\nb"), "a b");
        assert!(monotonic_usec() > 0);
    }
}
