//! Demultiplexing of the site's single UDP port.
//!
//! One port carries three protocols (RFC 3948 §2.2 for the IKE/ESP split):
//! - IKE: the four-byte non-ESP marker (all zeros) precedes the IKE header;
//! - WireGuard: a message type 1..=4 followed by three reserved zero bytes;
//! - ESP: anything else of at least 8 bytes (a non-zero SPI, then the sequence number).
//!
//! A single 0xFF byte is a NAT-T keepalive (RFC 3948 §2.3).

/// What a datagram on the site port is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram {
    /// IKE message; the payload starts after the 4-byte non-ESP marker.
    Ike,
    /// WireGuard message of the given type (1 init, 2 response, 3 cookie, 4 data).
    WireGuard(u8),
    /// ESP packet (SPI first).
    Esp,
    /// RFC 3948 NAT-keepalive.
    NatKeepalive,
}

/// Why a datagram was rejected before any protocol looked at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemuxError {
    TooShort,
}

pub const NON_ESP_MARKER: [u8; 4] = [0; 4];

pub fn classify(datagram: &[u8]) -> Result<Datagram, DemuxError> {
    match datagram {
        [0xff] => Ok(Datagram::NatKeepalive),
        [0, 0, 0, 0, ..] => Ok(Datagram::Ike),
        [t @ 1..=4, 0, 0, 0, ..] => Ok(Datagram::WireGuard(*t)),
        d if d.len() >= 8 => Ok(Datagram::Esp),
        _ => Err(DemuxError::TooShort),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_each_protocol() {
        assert_eq!(classify(&[0, 0, 0, 0, 1, 2, 3]), Ok(Datagram::Ike));
        for t in 1..=4u8 {
            let mut d = vec![t, 0, 0, 0];
            d.extend_from_slice(&[9; 28]);
            assert_eq!(classify(&d), Ok(Datagram::WireGuard(t)));
        }
        // An ESP SPI can start with a byte in 1..=4 as long as the next three are not all zero.
        assert_eq!(classify(&[1, 0, 0, 7, 0, 0, 0, 1]), Ok(Datagram::Esp));
        assert_eq!(classify(&[0xc0, 1, 2, 3, 0, 0, 0, 1]), Ok(Datagram::Esp));
        assert_eq!(classify(&[0xff]), Ok(Datagram::NatKeepalive));
    }

    #[test]
    fn short_datagrams_are_errors() {
        assert_eq!(classify(&[]), Err(DemuxError::TooShort));
        assert_eq!(classify(&[5, 1]), Err(DemuxError::TooShort));
        assert_eq!(classify(&[0, 0, 0]), Err(DemuxError::TooShort));
    }

    #[test]
    fn never_panics_on_any_prefix() {
        let data: Vec<u8> = (0..=255u8).collect();
        for n in 0..data.len() {
            let _ = classify(&data[..n]);
            let _ = classify(&data[n..]);
        }
    }
}
