//! IPv4-embedded IPv6 addresses (RFC 6052 §2.2), as used by stateful NAT64 (RFC 6146) and
//! stateless translation (RFC 7915).
//!
//! The IPv4 address is written into the IPv6 address right after the prefix, skipping bits
//! 64–71 (the "u" octet, which must be zero), and the bits after it (the suffix) are zero:
//!
//! ```text
//! +--+---+---+---+---+---+---+---+---+---+---+---+---+---+---+---+---+
//! |PL| 0-------------32--40--48--56--64--72--80--88--96--104---------|
//! +--+---+---+---+---+---+---+---+---+---+---+---+---+---+---+---+---+
//! |32|     prefix    |v4(32)         | u | suffix                    |
//! |40|     prefix        |v4(24)     | u |(8)| suffix                |
//! |48|     prefix            |v4(16) | u | (16)  | suffix            |
//! |56|     prefix                |(8)| u |  v4(24)   | suffix        |
//! |64|     prefix                    | u |   v4(32)      | suffix    |
//! |96|     prefix                                    |    v4(32)     |
//! +--+---+---+---+---+---+---+---+---+---+---+---+---+---+---+---+---+
//! ```
//!
//! [`embed`] ignores any bits of the given prefix beyond its length. [`extract`] does not look at
//! the prefix (the caller has matched it already) and ignores the suffix, which RFC 6052 reserves
//! for future extensions; it does insist on a zero "u" octet.
//!
//! Whether an IPv4 address may be embedded at all (RFC 6052 §3.1 forbids the Well-Known Prefix
//! `64:ff9b::/96` for non-global IPv4 addresses) is policy for the caller, not checked here.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The "u" octet: byte 8 of the IPv6 address (bits 64–71).
const U_OCTET: usize = 8;

/// The prefix lengths RFC 6052 §2.2 allows.
pub const VALID_PREFIX_LENS: [u8; 6] = [32, 40, 48, 56, 64, 96];

/// The Well-Known Prefix `64:ff9b::/96` (RFC 6052 §2.1).
pub const WELL_KNOWN_PREFIX: Ipv6Addr = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0);

/// Errors of embedding and extraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rfc6052Error {
    /// The prefix length is not one of 32, 40, 48, 56, 64 or 96.
    #[error("invalid RFC 6052 prefix length /{0} (allowed: 32, 40, 48, 56, 64, 96)")]
    InvalidPrefixLen(u8),
    /// Bits 64–71 are not zero: in the /96 prefix given to [`embed`], or in the address given to
    /// [`extract`].
    #[error("bits 64-71 (the \"u\" octet) of {0} are not zero")]
    NonZeroUOctet(Ipv6Addr),
}

/// Whether `len` is a prefix length RFC 6052 allows.
pub fn is_valid_prefix_len(len: u8) -> bool {
    VALID_PREFIX_LENS.contains(&len)
}

/// The byte positions of the four IPv4 octets for a prefix length already validated.
fn v4_positions(prefix_len: u8) -> [usize; 4] {
    let start = usize::from(prefix_len / 8);
    let mut out = [0usize; 4];
    let mut pos = start;
    for slot in &mut out {
        if pos == U_OCTET {
            pos += 1;
        }
        *slot = pos;
        pos += 1;
    }
    out
}

/// Writes `v4` into `prefix`/`prefix_len` (RFC 6052 §2.2). Bits of `prefix` beyond `prefix_len`
/// are ignored; the "u" octet and the suffix come out zero.
///
/// A /96 prefix has the "u" octet inside the prefix itself; it must be zero there
/// ([`Rfc6052Error::NonZeroUOctet`] otherwise).
pub fn embed(prefix: Ipv6Addr, prefix_len: u8, v4: Ipv4Addr) -> Result<Ipv6Addr, Rfc6052Error> {
    if !is_valid_prefix_len(prefix_len) {
        return Err(Rfc6052Error::InvalidPrefixLen(prefix_len));
    }
    let p = prefix.octets();
    let keep = usize::from(prefix_len / 8);
    let mut out = [0u8; 16];
    for (o, b) in out.iter_mut().zip(p.iter()).take(keep) {
        *o = *b;
    }
    if out[U_OCTET] != 0 {
        return Err(Rfc6052Error::NonZeroUOctet(prefix));
    }
    for (pos, b) in v4_positions(prefix_len).into_iter().zip(v4.octets()) {
        out[pos] = b;
    }
    Ok(Ipv6Addr::from(out))
}

/// Reads the IPv4 address embedded in `v6` under a prefix of length `prefix_len`
/// (RFC 6052 §2.2). The prefix itself is not checked; the suffix is ignored; the "u" octet
/// must be zero.
pub fn extract(prefix_len: u8, v6: Ipv6Addr) -> Result<Ipv4Addr, Rfc6052Error> {
    if !is_valid_prefix_len(prefix_len) {
        return Err(Rfc6052Error::InvalidPrefixLen(prefix_len));
    }
    let a = v6.octets();
    if a[U_OCTET] != 0 {
        return Err(Rfc6052Error::NonZeroUOctet(v6));
    }
    let [p0, p1, p2, p3] = v4_positions(prefix_len);
    Ok(Ipv4Addr::new(a[p0], a[p1], a[p2], a[p3]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap_or(Ipv6Addr::UNSPECIFIED)
    }

    const V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 33);

    /// RFC 6052 §2.4, Table 1, written out by hand: (prefix, length, embedded address).
    fn rfc_table() -> Vec<(Ipv6Addr, u8, Ipv6Addr)> {
        vec![
            (
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0),
                32,
                Ipv6Addr::new(0x2001, 0xdb8, 0xc000, 0x221, 0, 0, 0, 0),
            ),
            (
                Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0),
                40,
                Ipv6Addr::new(0x2001, 0xdb8, 0x1c0, 0x2, 0x21, 0, 0, 0),
            ),
            (
                Ipv6Addr::new(0x2001, 0xdb8, 0x122, 0, 0, 0, 0, 0),
                48,
                Ipv6Addr::new(0x2001, 0xdb8, 0x122, 0xc000, 0x2, 0x2100, 0, 0),
            ),
            (
                Ipv6Addr::new(0x2001, 0xdb8, 0x122, 0x300, 0, 0, 0, 0),
                56,
                Ipv6Addr::new(0x2001, 0xdb8, 0x122, 0x3c0, 0, 0x221, 0, 0),
            ),
            (
                Ipv6Addr::new(0x2001, 0xdb8, 0x122, 0x344, 0, 0, 0, 0),
                64,
                Ipv6Addr::new(0x2001, 0xdb8, 0x122, 0x344, 0xc0, 0x2, 0x2100, 0),
            ),
            (
                Ipv6Addr::new(0x2001, 0xdb8, 0x122, 0x344, 0, 0, 0, 0),
                96,
                Ipv6Addr::new(0x2001, 0xdb8, 0x122, 0x344, 0, 0, 0xc000, 0x221),
            ),
        ]
    }

    #[test]
    fn rfc6052_table_embed_and_extract() {
        for (prefix, len, expected) in rfc_table() {
            assert_eq!(embed(prefix, len, V4), Ok(expected), "/{len}");
            assert_eq!(extract(len, expected), Ok(V4), "/{len}");
        }
    }

    #[test]
    fn rfc6052_table_textual_forms() {
        // The same table in the RFC's textual notation.
        let rows = [
            ("2001:db8::", 32, "2001:db8:c000:221::"),
            ("2001:db8:100::", 40, "2001:db8:1c0:2:21::"),
            ("2001:db8:122::", 48, "2001:db8:122:c000:2:2100::"),
            ("2001:db8:122:300::", 56, "2001:db8:122:3c0:0:221::"),
            ("2001:db8:122:344::", 64, "2001:db8:122:344:c0:2:2100:0"),
            ("2001:db8:122:344::", 96, "2001:db8:122:344::192.0.2.33"),
        ];
        for (p, len, e) in rows {
            assert_eq!(embed(v6(p), len, V4), Ok(v6(e)), "/{len}");
            assert_eq!(extract(len, v6(e)), Ok(V4), "/{len}");
        }
    }

    #[test]
    fn well_known_prefix() {
        let a = embed(WELL_KNOWN_PREFIX, 96, V4);
        assert_eq!(
            a,
            Ok(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0xc000, 0x221))
        );
        assert_eq!(a, Ok(v6("64:ff9b::c000:221")));
        assert_eq!(extract(96, v6("64:ff9b::c000:221")), Ok(V4));
    }

    #[test]
    fn invalid_lengths_are_refused() {
        for len in 0..=u8::MAX {
            let valid = matches!(len, 32 | 40 | 48 | 56 | 64 | 96);
            assert_eq!(is_valid_prefix_len(len), valid, "/{len}");
            if !valid {
                assert_eq!(
                    embed(WELL_KNOWN_PREFIX, len, V4),
                    Err(Rfc6052Error::InvalidPrefixLen(len))
                );
                assert_eq!(
                    extract(len, WELL_KNOWN_PREFIX),
                    Err(Rfc6052Error::InvalidPrefixLen(len))
                );
            }
        }
    }

    #[test]
    fn prefix_bits_beyond_length_are_ignored() {
        let dirty = v6("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff");
        assert_eq!(embed(dirty, 32, V4), Ok(v6("2001:db8:c000:221::")));
    }

    #[test]
    fn u_octet_must_be_zero() {
        let bad_prefix = v6("2001:db8:122:344:ff00::");
        assert_eq!(
            embed(bad_prefix, 96, V4),
            Err(Rfc6052Error::NonZeroUOctet(bad_prefix))
        );
        // For shorter prefixes byte 8 is past the prefix and simply ignored.
        assert_eq!(
            embed(bad_prefix, 64, V4),
            Ok(v6("2001:db8:122:344:c0:2:2100:0"))
        );
        let bad_addr = v6("2001:db8:c000:221:100::");
        assert_eq!(
            extract(32, bad_addr),
            Err(Rfc6052Error::NonZeroUOctet(bad_addr))
        );
    }

    #[test]
    fn suffix_is_ignored_by_extract() {
        assert_eq!(extract(32, v6("2001:db8:c000:221:ab:cd:ef:1")), Ok(V4));
    }

    proptest! {
        #[test]
        fn round_trip(p in any::<u128>(), v4 in any::<u32>(), li in 0usize..6) {
            let len = VALID_PREFIX_LENS[li];
            let mut prefix = Ipv6Addr::from(p).octets();
            prefix[U_OCTET] = 0;
            let prefix = Ipv6Addr::from(prefix);
            let v4 = Ipv4Addr::from(v4);
            let a = embed(prefix, len, v4);
            prop_assert!(a.is_ok());
            let a = a.unwrap_or(Ipv6Addr::UNSPECIFIED);
            prop_assert_eq!(extract(len, a), Ok(v4));
            let bits = u128::from(a);
            let mask = u128::MAX << (128 - u32::from(len));
            // The prefix bits survive.
            prop_assert_eq!(bits & mask, u128::from(prefix) & mask);
            // The "u" octet and the suffix are zero.
            prop_assert_eq!(a.octets()[U_OCTET], 0);
            let used = if len == 96 { 128 } else { u32::from(len) + 40 };
            if used < 128 {
                prop_assert_eq!(bits & (u128::MAX >> used), 0);
            }
        }

        #[test]
        fn never_panics(a in any::<u128>(), len in any::<u8>(), v4 in any::<u32>()) {
            let _ = embed(Ipv6Addr::from(a), len, Ipv4Addr::from(v4));
            let _ = extract(len, Ipv6Addr::from(a));
        }
    }
}
