//! ARP announcements (RFC 5227 §2.3, RFC 826 layout), as a pair member sends them when it
//! becomes active: a broadcast from the shared router MAC makes the bridges and switches on
//! every port learn where that MAC is now. An emitter only: the gateway never parses ARP here.
//!
//! ```text
//!  0      6      12   14   16   18  19  20   22          28          32          38        42..60
//! | dst  | src  |0806|0001|0800| 6 | 4 |0001| sender MAC | sender IP  | target MAC| target IP | pad
//! ```

use core::net::Ipv4Addr;

/// An announcement frame's length: the Ethernet minimum without the FCS (the 42 bytes of
/// Ethernet + ARP, padded with zeros).
pub const ANNOUNCEMENT_LEN: usize = 60;

/// An ARP announcement from `mac`: a broadcast request whose sender and target address are
/// both `ip`. With `ip` = 0.0.0.0 no host updates a cache entry from it (the form to send
/// where the address must not be advertised, e.g. on a tenant port), and every bridge still
/// learns `mac` from its source address.
pub fn announcement(mac: [u8; 6], ip: Ipv4Addr) -> [u8; ANNOUNCEMENT_LEN] {
    let mut f = [0u8; ANNOUNCEMENT_LEN];
    let ip = ip.octets();
    let fields: [&[u8]; 12] = [
        &[0xff; 6],    // destination: broadcast
        &mac,          // source
        &[0x08, 0x06], // EtherType ARP
        &[0x00, 0x01], // hardware type Ethernet
        &[0x08, 0x00], // protocol type IPv4
        &[6, 4],       // address lengths
        &[0x00, 0x01], // operation: request
        &mac,          // sender hardware address
        &ip,           // sender protocol address
        &[0; 6],       // target hardware address: unknown
        &ip,           // target protocol address
        &[],           // padding follows (zeros)
    ];
    let mut at = 0;
    for field in fields {
        if let Some(dst) = f.get_mut(at..at + field.len()) {
            dst.copy_from_slice(field);
        }
        at += field.len();
    }
    f
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn golden_bytes() {
        let f = announcement([2, 0xdc, 0, 0, 1, 1], Ipv4Addr::new(192, 0, 2, 1));
        let want: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0xdc, 0x00, 0x00, 0x01, 0x01, 0x08, 0x06,
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, 0x02, 0xdc, 0x00, 0x00, 0x01, 0x01,
            192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 192, 0, 2, 1,
        ];
        assert_eq!(&f[..42], &want[..]);
        assert!(f[42..].iter().all(|b| *b == 0));
        assert_eq!(f.len(), 60);
    }

    #[test]
    fn unspecified_address_advertises_nothing() {
        let f = announcement([2, 0, 0, 0, 0, 9], Ipv4Addr::UNSPECIFIED);
        assert_eq!(&f[28..32], &[0, 0, 0, 0]);
        assert_eq!(&f[38..42], &[0, 0, 0, 0]);
        assert_eq!(&f[6..12], &[2, 0, 0, 0, 0, 9]);
    }
}
