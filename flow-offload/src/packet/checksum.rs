//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! Partial sums are `u32` values; [`sum`] and the pseudo-header functions return them already
//! folded to 16 bits, so a few of them can be added without overflow before [`fold`]. The
//! checksum field carries the ones' complement of the folded sum: `!fold(..)`. A received
//! header is correct when the folded sum over it (checksum field included) is `0xFFFF`.
//!
//! Partial sums of pieces can be added only when every piece but the last has an even length
//! (as all header boundaries are).

use core::net::{Ipv4Addr, Ipv6Addr};

/// The ones' complement sum of `data` taken as big-endian 16-bit words, an odd last byte
/// padded with a zero byte; folded to at most `0xFFFF`.
pub fn sum(data: &[u8]) -> u32 {
    // Summing 32-bit words and folding later gives the same ones' complement result, since
    // 2^16 ≡ 1 (mod 2^16 - 1). A u64 holds 2^32 such words without overflow.
    let mut acc: u64 = 0;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        if let &[a, b, c, d] = w {
            acc += u64::from(u32::from_be_bytes([a, b, c, d]));
        }
    }
    match *words.remainder() {
        [a, b, c] => acc += u64::from(u16::from_be_bytes([a, b])) + (u64::from(c) << 8),
        [a, b] => acc += u64::from(u16::from_be_bytes([a, b])),
        [a] => acc += u64::from(a) << 8,
        _ => {}
    }
    // Fold 64 → 32 → 16 bits with end-around carry.
    while acc > 0xFFFF {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    acc as u32
}

/// Folds a partial sum to 16 bits with end-around carry. This is the ones' complement sum,
/// not yet complemented: the checksum field is `!fold(s)`.
pub fn fold(mut s: u32) -> u16 {
    while s > 0xFFFF {
        s = (s & 0xFFFF) + (s >> 16);
    }
    s as u16
}

/// The checksum field value for a partial sum: `!fold(s)`.
pub fn finish(s: u32) -> u16 {
    !fold(s)
}

/// Partial sum of the IPv4 pseudo-header (RFC 768, RFC 793): source, destination, zero,
/// protocol, upper-layer length.
pub fn pseudo_header_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: u16) -> u32 {
    let s = u32::from(src);
    let d = u32::from(dst);
    let acc = (s >> 16) + (s & 0xFFFF) + (d >> 16) + (d & 0xFFFF);
    u32::from(fold(acc + u32::from(protocol) + u32::from(len)))
}

/// Partial sum of the IPv6 pseudo-header (RFC 8200 §8.1): source, destination, 32-bit
/// upper-layer length, zeros, next header.
pub fn pseudo_header_v6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, len: u32) -> u32 {
    let acc = sum(&src.octets()) + sum(&dst.octets());
    u32::from(fold(
        acc + (len >> 16) + (len & 0xFFFF) + u32::from(next_header),
    ))
}

/// RFC 1624 eqn. 3: the checksum after one 16-bit word of the covered data changes from `old`
/// to `new`: `HC' = ~(~HC + ~m + m')`.
///
/// Unlike eqn. 2 this never yields the negative zero `0xFFFF` unless all covered data are zero,
/// so the result equals a full recomputation. For UDP, where `0` means "no checksum", the
/// caller leaves a zero checksum alone and transmits a computed `0` as `0xFFFF`
/// (see [`udp_nonzero`]).
pub fn update16(csum: u16, old: u16, new: u16) -> u16 {
    !fold(u32::from(!csum) + u32::from(!old) + u32::from(new))
}

/// [`update16`] for an aligned 32-bit word (an IPv4 address, a TCP sequence number).
pub fn update32(csum: u16, old: u32, new: u32) -> u16 {
    let acc = u32::from(!csum)
        + u32::from(!(old >> 16) as u16)
        + u32::from(!(old as u16))
        + (new >> 16)
        + (new & 0xFFFF);
    !fold(acc)
}

/// [`update16`] for equal-length byte strings at an even offset of the covered data (e.g.
/// 16-byte IPv6 addresses). Each slice is summed as by [`sum`], so an odd length is treated as
/// zero-padded, which is right only if the slice ends the covered data.
pub fn update_bytes(csum: u16, old: &[u8], new: &[u8]) -> u16 {
    !fold(u32::from(!csum) + u32::from(!fold(sum(old))) + sum(new))
}

/// UDP transmits a computed checksum of `0` as `0xFFFF` (RFC 768), since `0` means "none".
pub fn udp_nonzero(csum: u16) -> u16 {
    if csum == 0 {
        0xFFFF
    } else {
        csum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(data: &[u8]) -> u32 {
        let mut s: u32 = 0;
        for pair in data.chunks(2) {
            let w = match *pair {
                [a, b] => u16::from_be_bytes([a, b]),
                [a] => u16::from_be_bytes([a, 0]),
                _ => 0,
            };
            s += u32::from(w);
            s = (s & 0xFFFF) + (s >> 16);
        }
        s
    }

    #[test]
    fn sum_matches_naive_for_all_lengths() {
        let data: [u8; 23] = [
            0xff, 0xfe, 0x01, 0x80, 0x7f, 0x00, 0x12, 0x34, 0xab, 0xcd, 0xef, 0xff, 0xff, 0xff,
            0x00, 0x01, 0x99, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33,
        ];
        for n in 0..=data.len() {
            assert_eq!(sum(&data[..n]), naive(&data[..n]), "len {n}");
        }
        assert_eq!(sum(&[0xff; 1000]), 0xFFFF);
        assert_eq!(sum(&[]), 0);
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: 0001 f203 f4f5 f6f7 sums to ddf2 (with carries 2).
        assert_eq!(
            fold(sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7])),
            0xddf2
        );
    }

    #[test]
    fn rfc1624_example() {
        // RFC 1624 §4: HC = 0xDD2F, m = 0x5555 → m' = 0x3285 gives HC' = 0x0000.
        assert_eq!(update16(0xDD2F, 0x5555, 0x3285), 0x0000);
        assert_eq!(update16(0x0000, 0x3285, 0x5555), 0xDD2F);
    }

    #[test]
    fn update32_is_two_update16() {
        let c = 0x1234;
        let (o, n) = (0xdead_beef_u32, 0x0a0b_0c0d_u32);
        let two = update16(
            update16(c, (o >> 16) as u16, (n >> 16) as u16),
            o as u16,
            n as u16,
        );
        assert_eq!(fold(u32::from(!update32(c, o, n))), fold(u32::from(!two)));
    }

    #[test]
    fn udp_zero() {
        assert_eq!(udp_nonzero(0), 0xFFFF);
        assert_eq!(udp_nonzero(7), 7);
    }
}
