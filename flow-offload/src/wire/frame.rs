//! Host↔DPU framing: length-prefixed, checksummed postcard payloads over a byte stream (TCP).
//!
//! # Frame layout
//!
//! Every frame is a fixed 12-byte header followed by the postcard encoding of one message.
//! All integers are big-endian.
//!
//! ```text
//!  byte  0      1      2         3          4 .. 8              8 .. 12             12 ..
//!       +------+------+---------+----------+-------------------+-------------------+-------------+
//!       | 'D'  | 'P'  | version | reserved | payload length    | CRC-32C(payload)  | payload     |
//!       | 0x44 | 0x50 |  0x01   |   0x00   | u32 big-endian    | u32 big-endian    | len bytes   |
//!       +------+------+---------+----------+-------------------+-------------------+-------------+
//!       |<------------------------ header: HEADER_LEN = 12 bytes ------------------>|
//! ```
//!
//! * `magic` is `b"DP"`; anything else is [`FrameError::BadMagic`].
//! * `version` is [`WIRE_VERSION`]; anything else is [`FrameError::UnsupportedVersion`].
//! * `reserved` must be zero ([`FrameError::ReservedNonZero`]).
//! * `payload length` must not exceed the codec's limit ([`FrameCodec::max_payload`], by default
//!   [`MAX_PAYLOAD`]); it is checked as soon as the first 8 header bytes are present, before any
//!   payload is buffered, so a peer cannot make us hold more than `max_payload + HEADER_LEN`
//!   bytes for one frame.
//! * The checksum is CRC-32C (Castagnoli, reflected polynomial `0x82F63B78`, the one used by
//!   iSCSI and ext4) over the payload bytes only.
//! * The payload must be consumed exactly by the message's decoder: trailing bytes are
//!   [`FrameError::TrailingBytes`].
//!
//! Header checks run in the order magic, version, reserved, length, so a frame from a future
//! protocol version is reported as [`FrameError::UnsupportedVersion`] even if it uses the
//! reserved byte.
//!
//! # Error severity
//!
//! Errors in the header or the checksum mean the byte stream can no longer be split into frames
//! (the length field itself may be garbage), so a [`FrameReader`] that sees one is *poisoned*:
//! every later call returns [`FrameError::Poisoned`] and the connection should be dropped. These
//! are the errors for which [`FrameError::is_fatal`] is true. A payload that has a correct
//! checksum but does not decode as the expected type ([`FrameError::Decode`],
//! [`FrameError::TrailingBytes`]) leaves framing intact: the reader skips that frame and carries
//! on with the next one.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The two magic bytes that start every frame.
pub const MAGIC: [u8; 2] = *b"DP";
/// The frame format version written by this crate and the only one it accepts.
pub const WIRE_VERSION: u8 = 1;
/// Length of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 12;
/// Default upper bound on a frame's payload length in bytes (64 MiB).
pub const MAX_PAYLOAD: usize = 64 << 20;

/// Everything that can go wrong while framing or unframing a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame does not start with [`MAGIC`].
    #[error("bad frame magic {got:02x?}, expected \"DP\"")]
    BadMagic {
        /// The two bytes found instead.
        got: [u8; 2],
    },
    /// The frame's version byte is not [`WIRE_VERSION`].
    #[error("unsupported wire version {got}, this side speaks {supported}")]
    UnsupportedVersion {
        /// The version in the frame.
        got: u8,
        /// The version this codec supports.
        supported: u8,
    },
    /// The reserved header byte is not zero.
    #[error("reserved header byte is {0:#04x}, expected 0")]
    ReservedNonZero(u8),
    /// The payload is longer than the configured limit (on encode or decode).
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The payload length, declared (decode) or actual (encode).
        len: usize,
        /// The effective limit.
        max: usize,
    },
    /// The payload's CRC-32C does not match the header.
    #[error(
        "payload checksum mismatch: header says {expected:#010x}, payload has {computed:#010x}"
    )]
    ChecksumMismatch {
        /// The checksum carried in the header.
        expected: u32,
        /// The checksum computed over the received payload.
        computed: u32,
    },
    /// The message could not be serialized.
    #[error("cannot encode payload: {0}")]
    Encode(postcard::Error),
    /// The payload is not a valid encoding of the expected message type.
    #[error("cannot decode payload: {0}")]
    Decode(postcard::Error),
    /// The payload decoded but left bytes unused inside the frame.
    #[error("{extra} trailing bytes after the payload's message")]
    TrailingBytes {
        /// How many bytes were left over.
        extra: usize,
    },
    /// A previous fatal error lost the framing of this stream; nothing more can be read.
    #[error("frame stream is poisoned by an earlier fatal error")]
    Poisoned,
}

impl FrameError {
    /// Whether this error loses the framing of a byte stream (the connection must be dropped).
    ///
    /// True for header and checksum errors and for [`FrameError::Poisoned`]; false for errors
    /// confined to one well-framed payload (encode, decode, trailing bytes).
    pub fn is_fatal(&self) -> bool {
        match self {
            FrameError::BadMagic { .. }
            | FrameError::UnsupportedVersion { .. }
            | FrameError::ReservedNonZero(_)
            | FrameError::TooLarge { .. }
            | FrameError::ChecksumMismatch { .. }
            | FrameError::Poisoned => true,
            FrameError::Encode(_) | FrameError::Decode(_) | FrameError::TrailingBytes { .. } => {
                false
            }
        }
    }
}

const CRC32C_POLY_REFLECTED: u32 = 0x82F6_3B78;

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ CRC32C_POLY_REFLECTED
            } else {
                c >> 1
            };
            bit += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// Slicing-by-8 tables: `TABLES[k][b]` is the CRC of byte `b` followed by `k` zero bytes.
const fn crc32c_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    t[0] = crc32c_table();
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    t
}

static CRC32C_TABLES: [[u32; 256]; 8] = crc32c_tables();

/// CRC-32C (Castagnoli) of `data`: reflected, initial value and final XOR `0xFFFF_FFFF`.
/// Eight bytes per step (slicing-by-8), portable and without `unsafe`.
///
/// The standard check value, the CRC of `b"123456789"`, is `0xE306_9283`.
pub fn crc32c(data: &[u8]) -> u32 {
    let t = &CRC32C_TABLES;
    let mut crc = !0u32;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
        crc = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][usize::from(c[4])]
            ^ t[2][usize::from(c[5])]
            ^ t[1][usize::from(c[6])]
            ^ t[0][usize::from(c[7])];
    }
    for &byte in chunks.remainder() {
        crc = t[0][usize::from((crc as u8) ^ byte)] ^ (crc >> 8);
    }
    !crc
}

/// Encodes and decodes frames under a configured payload limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameCodec {
    /// Largest payload accepted or produced, in bytes. Values above `u32::MAX` behave as
    /// `u32::MAX`, the most the length field can express.
    pub max_payload: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(MAX_PAYLOAD)
    }
}

/// A postcard output flavor that appends to a borrowed `Vec` but stops storing once the limit
/// is passed, only counting, so an oversized message never makes us allocate past the limit.
struct LimitedAppend<'a> {
    out: &'a mut Vec<u8>,
    written: usize,
    limit: usize,
}

impl LimitedAppend<'_> {
    fn account(&mut self, n: usize) -> bool {
        self.written = self.written.saturating_add(n);
        self.written <= self.limit
    }
}

impl postcard::ser_flavors::Flavor for LimitedAppend<'_> {
    type Output = usize;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        if self.account(data.len()) {
            self.out.extend_from_slice(data);
        }
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        if self.account(1) {
            self.out.push(data);
        }
        Ok(())
    }

    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.written)
    }
}

/// Decodes one payload, requiring that it is consumed exactly.
/// Decodes one frame's payload as a `T` that must consume it exactly.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes::<T>(payload).map_err(FrameError::Decode)?;
    if rest.is_empty() {
        Ok(msg)
    } else {
        Err(FrameError::TrailingBytes { extra: rest.len() })
    }
}

impl FrameCodec {
    /// A codec accepting payloads of up to `max_payload` bytes.
    pub const fn new(max_payload: usize) -> Self {
        Self { max_payload }
    }

    /// The limit actually enforced: `max_payload`, capped by what the u32 length can express.
    pub fn effective_max(&self) -> usize {
        self.max_payload
            .min(usize::try_from(u32::MAX).unwrap_or(usize::MAX))
    }

    /// Appends one frame carrying `msg` to `out`.
    ///
    /// On error `out` is left exactly as it was. A message whose encoding exceeds the limit is
    /// refused with [`FrameError::TooLarge`] (its full length is measured, but bytes past the
    /// limit are never stored).
    pub fn encode<T: Serialize>(&self, msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let start = out.len();
        let max = self.effective_max();
        out.extend_from_slice(&[0u8; HEADER_LEN]);
        let flavor = LimitedAppend {
            out,
            written: 0,
            limit: max,
        };
        let len = match postcard::serialize_with_flavor::<T, _, usize>(msg, flavor) {
            Ok(len) => len,
            Err(e) => {
                out.truncate(start);
                return Err(FrameError::Encode(e));
            }
        };
        let len_u32 = match u32::try_from(len) {
            Ok(l) if len <= max => l,
            _ => {
                out.truncate(start);
                return Err(FrameError::TooLarge { len, max });
            }
        };
        let payload_start = start.saturating_add(HEADER_LEN);
        let crc = crc32c(out.get(payload_start..).unwrap_or(&[]));
        let mut header = [0u8; HEADER_LEN];
        header[0..2].copy_from_slice(&MAGIC);
        header[2] = WIRE_VERSION;
        header[3] = 0;
        header[4..8].copy_from_slice(&len_u32.to_be_bytes());
        header[8..12].copy_from_slice(&crc.to_be_bytes());
        if let Some(slot) = out.get_mut(start..payload_start) {
            slot.copy_from_slice(&header);
        }
        Ok(())
    }

    /// Validates as much of a header as `buf` holds. Returns the declared payload length once
    /// the length field is present, `None` while the header is still incomplete.
    fn check_header(&self, buf: &[u8]) -> Result<Option<usize>, FrameError> {
        if let Some(magic) = buf.get(0..2) {
            if magic != MAGIC {
                let mut got = [0u8; 2];
                got.copy_from_slice(magic);
                return Err(FrameError::BadMagic { got });
            }
        }
        if let Some(&version) = buf.get(2) {
            if version != WIRE_VERSION {
                return Err(FrameError::UnsupportedVersion {
                    got: version,
                    supported: WIRE_VERSION,
                });
            }
        }
        if let Some(&reserved) = buf.get(3) {
            if reserved != 0 {
                return Err(FrameError::ReservedNonZero(reserved));
            }
        }
        let Some(len_bytes) = buf.get(4..8) else {
            return Ok(None);
        };
        let mut be = [0u8; 4];
        be.copy_from_slice(len_bytes);
        let declared = u32::from_be_bytes(be);
        let len = usize::try_from(declared).unwrap_or(usize::MAX);
        let max = self.effective_max();
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        Ok(Some(len))
    }

    /// Splits the first frame off `buf` without decoding its payload.
    ///
    /// Returns `Ok(None)` if more bytes are needed, otherwise the checksum-verified payload and
    /// the total number of bytes the frame occupies (header included).
    pub fn split_frame<'a>(&self, buf: &'a [u8]) -> Result<Option<(&'a [u8], usize)>, FrameError> {
        let Some(len) = self.check_header(buf)? else {
            return Ok(None);
        };
        let Some(crc_bytes) = buf.get(8..HEADER_LEN) else {
            return Ok(None);
        };
        let mut be = [0u8; 4];
        be.copy_from_slice(crc_bytes);
        let expected = u32::from_be_bytes(be);
        // `len <= u32::MAX`, so on 64-bit targets this cannot saturate; elsewhere saturation
        // just means "not enough bytes yet".
        let total = HEADER_LEN.saturating_add(len);
        let Some(payload) = buf.get(HEADER_LEN..total) else {
            return Ok(None);
        };
        let computed = crc32c(payload);
        if computed != expected {
            return Err(FrameError::ChecksumMismatch { expected, computed });
        }
        Ok(Some((payload, total)))
    }

    /// Decodes the first frame in `buf`.
    ///
    /// `Ok(None)` means `buf` holds only part of a frame (read more and call again);
    /// `Ok(Some((msg, consumed)))` gives the message and the frame's total length in bytes.
    pub fn decode<T: DeserializeOwned>(
        &self,
        buf: &[u8],
    ) -> Result<Option<(T, usize)>, FrameError> {
        match self.split_frame(buf)? {
            None => Ok(None),
            Some((payload, consumed)) => Ok(Some((decode_payload(payload)?, consumed))),
        }
    }
}

/// Reassembles frames from a byte stream delivered in arbitrary pieces.
///
/// Feed received bytes with [`push`](Self::push) and drain complete messages with
/// [`next`](Self::next) until it returns `Ok(None)`. Partial frames are kept across calls.
///
/// Memory: the buffer holds at most the unconsumed tail of the stream. The header of the frame
/// at the front is validated on every `push`, so an oversized or otherwise invalid frame is
/// never buffered past its header; if the caller drains after each push, the reader holds at
/// most `max_payload + HEADER_LEN` bytes plus the last pushed chunk.
#[derive(Debug, Default)]
pub struct FrameReader {
    codec: FrameCodec,
    buf: Vec<u8>,
    /// Offset in `buf` of the first unconsumed byte.
    start: usize,
    poisoned: bool,
}

impl FrameReader {
    /// A reader enforcing `codec`'s payload limit.
    pub fn new(codec: FrameCodec) -> Self {
        Self {
            codec,
            buf: Vec::new(),
            start: 0,
            poisoned: false,
        }
    }

    /// The codec (and so the limit) this reader uses.
    pub fn codec(&self) -> FrameCodec {
        self.codec
    }

    /// Whether a fatal error has ended this stream.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Number of received bytes not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len().saturating_sub(self.start)
    }

    /// Appends received bytes. Ignored once the stream is poisoned.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.poisoned || bytes.is_empty() {
            return;
        }
        if self.start > 0 {
            self.buf.drain(..self.start.min(self.buf.len()));
            self.start = 0;
        }
        // Already holding an invalid header: more bytes cannot help, keep what reproduces it.
        if self.codec.check_header(&self.buf).is_err() {
            return;
        }
        self.buf.extend_from_slice(bytes);
        if self.codec.check_header(&self.buf).is_err() {
            // Keep only the header bytes so `next` reports the error; drop the rest unbuffered.
            self.buf.truncate(HEADER_LEN);
        }
    }

    /// Returns the next complete message, `Ok(None)` if more bytes are needed.
    ///
    /// A fatal error (see [`FrameError::is_fatal`]) is returned once and then poisons the
    /// reader: its buffer is released and every later call returns [`FrameError::Poisoned`].
    /// A non-fatal error skips the offending frame; the next call continues after it.
    #[allow(clippy::should_implement_trait)] // generic over the message type; not an Iterator
    pub fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        self.next_payload(decode_payload::<T>)?.transpose()
    }

    /// Like [`next`](Self::next), but hands the next complete frame's payload to `read`, for a
    /// caller that wants to answer what it cannot decode (see [`crate::wire::read_message`]).
    /// Errors are framing errors only, all fatal.
    pub fn next_payload<R>(
        &mut self,
        read: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>, FrameError> {
        if self.poisoned {
            return Err(FrameError::Poisoned);
        }
        let pending = self.buf.get(self.start..).unwrap_or(&[]);
        let (result, consumed) = match self.codec.split_frame(pending) {
            Err(e) => {
                self.poisoned = true;
                self.buf = Vec::new();
                self.start = 0;
                return Err(e);
            }
            Ok(None) => return Ok(None),
            Ok(Some((payload, consumed))) => (read(payload), consumed),
        };
        self.start = self.start.saturating_add(consumed);
        if self.start >= self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(result))
    }
}

/// The fuzzers' way of delivering a byte stream: `data` cut into chunks whose sizes come from
/// the data itself (1 byte, up to 7, up to 64, or the rest), each with the byte that chose its
/// size, so that one input exercises many ways a socket can split the same stream.
pub fn fuzz_chunks(data: &[u8]) -> impl Iterator<Item = (&[u8], u8)> + '_ {
    let mut rest = data;
    let mut step: usize = 0;
    core::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let selector = data.get(step % data.len()).copied().unwrap_or(0);
        let size = match selector % 4 {
            0 => 1,
            1 => 1 + usize::from(selector >> 2) % 7,
            2 => 1 + usize::from(selector >> 2) % 64,
            _ => rest.len(),
        };
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        step = step.wrapping_add(1);
        Some((chunk, selector))
    })
}

/// Streams `data` through a [`FrameReader`] of `codec` in [`fuzz_chunks`], handing every frame
/// that decodes as a `T` to `on` with its chunk's selector byte, until the stream fails fatally
/// or the data runs out. For the fuzz targets of every framed decoder.
pub fn fuzz_stream<T: DeserializeOwned>(data: &[u8], codec: FrameCodec, mut on: impl FnMut(T, u8)) {
    let mut reader = FrameReader::new(codec);
    for (chunk, selector) in fuzz_chunks(data) {
        reader.push(chunk);
        loop {
            match reader.next::<T>() {
                Ok(Some(m)) => on(m, selector),
                Ok(None) => break,
                Err(e) if e.is_fatal() => return,
                Err(_) => {}
            }
        }
    }
}

/// Fuzzing entry point: streams `data` through a [`FrameReader`] in chunks whose sizes are
/// derived from the data itself, decoding every frame as [`crate::wire::Message`] the way the
/// agents do ([`crate::wire::read_message`], whose refusals peek at the payload), until the
/// stream fails fatally or the data runs out. Also decodes `data` once with
/// [`FrameCodec::decode`]. Never panics; memory stays bounded by `data.len()`.
pub fn fuzz_frames(data: &[u8]) {
    let codec = FrameCodec::default();
    let _ = codec.decode::<crate::wire::Message>(data);
    let mut reader = FrameReader::new(codec);
    for (chunk, _) in fuzz_chunks(data) {
        reader.push(chunk);
        while let Ok(Some(_)) = reader.next_payload(crate::wire::read_message) {}
        if reader.is_poisoned() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    /// Bit-at-a-time CRC-32C straight from the definition.
    fn crc32c_bitwise(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    proptest::proptest! {
        #[test]
        fn slicing_by_8_equals_the_definition(data in proptest::collection::vec(proptest::num::u8::ANY, 0..100)) {
            proptest::prop_assert_eq!(crc32c(&data), crc32c_bitwise(&data));
        }
    }

    #[test]
    fn push_after_bad_header_does_not_buffer() {
        let mut r = FrameReader::default();
        r.push(&[b'D', b'P', 1, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0]);
        r.push(&[0u8; 4096]);
        assert!(r.buffered() <= HEADER_LEN);
        assert!(matches!(r.next::<u8>(), Err(FrameError::TooLarge { .. })));
        assert_eq!(r.next::<u8>(), Err(FrameError::Poisoned));
    }
}
