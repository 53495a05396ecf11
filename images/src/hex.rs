//! Lower-case hex encoding for hashes and keys (manifests and key files are text).

use thiserror::Error;

/// A hex string that does not decode.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HexError {
    /// Odd number of digits.
    #[error("hex string has an odd length ({0})")]
    OddLength(usize),
    /// A character that is not a hex digit.
    #[error("invalid hex digit at position {0}")]
    BadDigit(usize),
    /// Decoded to the wrong number of bytes.
    #[error("expected {expected} bytes of hex, got {got}")]
    WrongLength {
        /// Bytes expected.
        expected: usize,
        /// Bytes found.
        got: usize,
    },
}

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Encodes bytes as lower-case hex.
pub fn encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

fn nibble(c: u8, pos: usize) -> Result<u8, HexError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(HexError::BadDigit(pos)),
    }
}

/// Decodes hex (either case) into bytes.
pub fn decode(s: &str) -> Result<Vec<u8>, HexError> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return Err(HexError::OddLength(b.len()));
    }
    b.chunks_exact(2)
        .enumerate()
        .map(|(i, pair)| Ok((nibble(pair[0], 2 * i)? << 4) | nibble(pair[1], 2 * i + 1)?))
        .collect()
}

/// Decodes hex into exactly `N` bytes.
pub fn decode_array<const N: usize>(s: &str) -> Result<[u8; N], HexError> {
    let v = decode(s)?;
    <[u8; N]>::try_from(v.as_slice()).map_err(|_| HexError::WrongLength {
        expected: N,
        got: v.len(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        assert_eq!(encode(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(decode("00ABff").unwrap(), vec![0x00, 0xab, 0xff]);
        assert_eq!(decode("abc"), Err(HexError::OddLength(3)));
        assert_eq!(decode("zz"), Err(HexError::BadDigit(0)));
        assert_eq!(
            decode_array::<2>("aabbcc"),
            Err(HexError::WrongLength {
                expected: 2,
                got: 3
            })
        );
    }
}
