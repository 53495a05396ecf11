//! zebra's FPM framing: `u8 version = 1`, `u8 type = 1` (netlink), `u16` total length
//! (big-endian, including this 4-byte header), then the payload.

/// The only FPM protocol version zebra speaks.
pub const FPM_VERSION: u8 = 1;
/// Frame type: the payload is netlink (host byte order).
pub const FPM_TYPE_NETLINK: u8 = 1;
/// Frame type: protobuf (zebra's other encoding; we skip it).
pub const FPM_TYPE_PROTOBUF: u8 = 2;
/// Size of the frame header.
pub const HEADER_LEN: usize = 4;
/// The largest frame the 16-bit length can describe.
pub const MAX_FRAME_LEN: usize = u16::MAX as usize;

/// A framing error. Every variant means the byte stream can no longer be trusted: the
/// connection must be reset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The version byte is not 1.
    #[error("FPM frame version {0}, expected {FPM_VERSION}")]
    BadVersion(u8),
    /// The length field is shorter than the header itself.
    #[error("FPM frame length {0} is shorter than the {HEADER_LEN}-byte header")]
    BadLength(u16),
    /// A payload too large for one frame (encoder side).
    #[error("payload of {0} bytes does not fit one FPM frame")]
    TooLong(usize),
}

/// Parse one frame header at the start of `buf`: `Ok(None)` if more bytes are needed,
/// otherwise the frame type and total length.
pub fn parse_header(buf: &[u8]) -> Result<Option<(u8, usize)>, FrameError> {
    let [version, kind, hi, lo, ..] = *buf else {
        // Check the version as soon as it is there, not only once 4 bytes arrived.
        if let Some(&v) = buf.first() {
            if v != FPM_VERSION {
                return Err(FrameError::BadVersion(v));
            }
        }
        return Ok(None);
    };
    if version != FPM_VERSION {
        return Err(FrameError::BadVersion(version));
    }
    let len = u16::from_be_bytes([hi, lo]);
    if usize::from(len) < HEADER_LEN {
        return Err(FrameError::BadLength(len));
    }
    Ok(Some((kind, usize::from(len))))
}

/// A streaming decoder: feed it bytes as they arrive, take complete netlink payloads out.
/// Frames of an unknown type with a sane length are skipped and counted.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    frames: u64,
    skipped: u64,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Append received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(bytes);
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }

    /// The next complete netlink payload, `Ok(None)` when more bytes are needed. After an
    /// error the decoder stays failed: reset the connection and start a new decoder.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        loop {
            let rest = &self.buf[self.start..];
            let Some((kind, len)) = parse_header(rest)? else {
                return Ok(None);
            };
            if rest.len() < len {
                return Ok(None);
            }
            let begin = self.start;
            self.start += len;
            if kind == FPM_TYPE_NETLINK {
                self.frames += 1;
                return Ok(Some(&self.buf[begin + HEADER_LEN..begin + len]));
            }
            self.skipped += 1;
        }
    }

    /// Netlink frames returned so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Frames of another type skipped so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Bytes received but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// Append one netlink frame carrying `payload` to `out`.
pub fn encode_frame(payload: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    let total = payload.len() + HEADER_LEN;
    let len = u16::try_from(total).map_err(|_| FrameError::TooLong(payload.len()))?;
    out.push(FPM_VERSION);
    out.push(FPM_TYPE_NETLINK);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn round_trip_byte_by_byte() {
        let mut wire = Vec::new();
        encode_frame(b"abcd", &mut wire).unwrap();
        encode_frame(b"", &mut wire).unwrap();
        encode_frame(&[7u8; 300], &mut wire).unwrap();
        assert_eq!(&wire[..8], &[1, 1, 0, 8, b'a', b'b', b'c', b'd']);
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &wire {
            d.extend(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f.to_vec());
            }
        }
        assert_eq!(got, vec![b"abcd".to_vec(), vec![], vec![7u8; 300]]);
        assert_eq!(d.frames(), 3);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn unknown_type_is_skipped_and_counted() {
        let mut d = FrameDecoder::new();
        d.extend(&[1, 2, 0, 6, 0xaa, 0xbb, 1, 1, 0, 5, 0x42]);
        assert_eq!(d.next_frame().unwrap(), Some(&[0x42u8][..]));
        assert_eq!(d.skipped(), 1);
        assert_eq!(d.next_frame().unwrap(), None);
    }

    #[test]
    fn bad_version_and_length_are_errors() {
        let mut d = FrameDecoder::new();
        d.extend(&[2]);
        assert_eq!(d.next_frame(), Err(FrameError::BadVersion(2)));
        let mut d = FrameDecoder::new();
        d.extend(&[1, 1, 0, 3]);
        assert_eq!(d.next_frame(), Err(FrameError::BadLength(3)));
        let mut d = FrameDecoder::new();
        d.extend(&[1, 1, 0]);
        assert_eq!(d.next_frame(), Ok(None));
    }

    #[test]
    fn oversized_payload_is_refused() {
        let mut out = Vec::new();
        assert_eq!(
            encode_frame(&vec![0; MAX_FRAME_LEN], &mut out),
            Err(FrameError::TooLong(MAX_FRAME_LEN))
        );
        assert!(out.is_empty());
    }
}

#[cfg(test)]
mod props {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Arbitrary bytes in arbitrary chunks: no panic, and once an error is returned the
        /// decoder keeps returning it.
        #[test]
        fn arbitrary_stream(buf in proptest::collection::vec(any::<u8>(), 0..2048),
                            cut in 1usize..300) {
            let mut d = FrameDecoder::new();
            let mut err = None;
            for chunk in buf.chunks(cut) {
                d.extend(chunk);
                loop {
                    match d.next_frame() {
                        Ok(Some(f)) => prop_assert!(f.len() + HEADER_LEN <= MAX_FRAME_LEN),
                        Ok(None) => break,
                        Err(e) => { err = Some(e); break; }
                    }
                }
                if err.is_some() { break; }
            }
            if let Some(e) = err {
                prop_assert_eq!(d.next_frame(), Err(e));
            }
        }
    }
}
