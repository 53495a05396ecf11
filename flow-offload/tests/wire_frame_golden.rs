//! Golden bytes and error cases for the host↔DPU frame codec.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use flow_offload::wire::frame::{
    crc32c, FrameCodec, FrameError, FrameReader, HEADER_LEN, MAGIC, MAX_PAYLOAD, WIRE_VERSION,
};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Probe {
    id: u16,
    flag: bool,
    name: String,
}

fn probe() -> Probe {
    Probe {
        id: 0x1234,
        flag: true,
        name: "dpu".to_owned(),
    }
}

/// The frame for `probe()`, written out by hand.
const GOLDEN: [u8; 19] = [
    b'D', b'P', // magic
    0x01, // version
    0x00, // reserved
    0x00, 0x00, 0x00, 0x07, // payload length 7, big-endian
    0x64, 0x4D, 0x54, 0x7D, // CRC-32C of the payload, big-endian
    // payload (postcard): id 0x1234 as varint, flag, name length 3, "dpu"
    0xB4, 0x24, 0x01, 0x03, b'd', b'p', b'u',
];

fn codec() -> FrameCodec {
    FrameCodec::default()
}

fn frame_with_payload(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&MAGIC);
    f.push(WIRE_VERSION);
    f.push(0);
    f.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    f.extend_from_slice(&crc32c(payload).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn crc32c_standard_check_value() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(&GOLDEN[HEADER_LEN..]), 0x644D_547D);
}

#[test]
fn golden_encode() {
    let mut out = Vec::new();
    codec().encode(&probe(), &mut out).unwrap();
    assert_eq!(out, GOLDEN);
    // Appends after existing content.
    let mut out = vec![0xAA];
    codec().encode(&probe(), &mut out).unwrap();
    assert_eq!(out[0], 0xAA);
    assert_eq!(out[1..], GOLDEN);
}

#[test]
fn golden_decode() {
    let (msg, used) = codec().decode::<Probe>(&GOLDEN).unwrap().unwrap();
    assert_eq!(msg, probe());
    assert_eq!(used, GOLDEN.len());
    // Extra bytes after the frame are left for the next call.
    let mut two = GOLDEN.to_vec();
    two.extend_from_slice(&GOLDEN);
    let (msg, used) = codec().decode::<Probe>(&two).unwrap().unwrap();
    assert_eq!((msg, used), (probe(), GOLDEN.len()));
    let (payload, used) = codec().split_frame(&GOLDEN).unwrap().unwrap();
    assert_eq!(payload, &GOLDEN[HEADER_LEN..]);
    assert_eq!(used, GOLDEN.len());
}

#[test]
fn every_strict_prefix_needs_more() {
    for n in 0..GOLDEN.len() {
        assert_eq!(
            codec().decode::<Probe>(&GOLDEN[..n]),
            Ok(None),
            "prefix {n}"
        );
    }
}

#[test]
fn empty_payload_frame() {
    let mut out = Vec::new();
    codec().encode(&(), &mut out).unwrap();
    assert_eq!(out, [b'D', b'P', 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(codec().decode::<()>(&out), Ok(Some(((), HEADER_LEN))));
}

#[test]
fn bad_magic() {
    let mut f = GOLDEN;
    f[1] = b'Q';
    assert_eq!(
        codec().decode::<Probe>(&f),
        Err(FrameError::BadMagic { got: [b'D', b'Q'] })
    );
    // Detected as soon as two bytes are present.
    assert_eq!(
        codec().decode::<Probe>(b"HT"),
        Err(FrameError::BadMagic { got: *b"HT" })
    );
}

#[test]
fn unsupported_version() {
    let mut f = GOLDEN;
    f[2] = 2;
    f[3] = 0xFF; // version is checked before reserved
    assert_eq!(
        codec().decode::<Probe>(&f[..3]),
        Err(FrameError::UnsupportedVersion {
            got: 2,
            supported: WIRE_VERSION
        })
    );
    assert!(matches!(
        codec().decode::<Probe>(&f),
        Err(FrameError::UnsupportedVersion { got: 2, .. })
    ));
}

#[test]
fn reserved_nonzero() {
    let mut f = GOLDEN;
    f[3] = 0x80;
    assert_eq!(
        codec().decode::<Probe>(&f),
        Err(FrameError::ReservedNonZero(0x80))
    );
}

#[test]
fn too_large_on_decode_before_payload_arrives() {
    let header = [b'D', b'P', 1, 0, 0xFF, 0xFF, 0xFF, 0xFF];
    assert_eq!(
        codec().decode::<Probe>(&header),
        Err(FrameError::TooLarge {
            len: 0xFFFF_FFFF,
            max: MAX_PAYLOAD
        })
    );
    let small = FrameCodec::new(6);
    assert_eq!(
        small.decode::<Probe>(&GOLDEN),
        Err(FrameError::TooLarge { len: 7, max: 6 })
    );
    assert!(FrameCodec::new(7)
        .decode::<Probe>(&GOLDEN)
        .unwrap()
        .is_some());
}

#[test]
fn too_large_on_encode_leaves_output_untouched() {
    let small = FrameCodec::new(6);
    let mut out = vec![1, 2, 3];
    assert_eq!(
        small.encode(&probe(), &mut out),
        Err(FrameError::TooLarge { len: 7, max: 6 })
    );
    assert_eq!(out, [1, 2, 3]);
    let big = vec![0u8; 1000];
    assert_eq!(
        FrameCodec::new(100).encode(&big, &mut out),
        Err(FrameError::TooLarge {
            len: 1002,
            max: 100
        })
    );
    assert_eq!(out, [1, 2, 3]);
}

#[test]
fn checksum_mismatch() {
    let mut f = GOLDEN;
    f[HEADER_LEN + 4] ^= 0x01;
    let computed = crc32c(&f[HEADER_LEN..]);
    assert_eq!(
        codec().decode::<Probe>(&f),
        Err(FrameError::ChecksumMismatch {
            expected: 0x644D_547D,
            computed
        })
    );
    let mut f = GOLDEN;
    f[8] ^= 0xFF;
    assert!(matches!(
        codec().decode::<Probe>(&f),
        Err(FrameError::ChecksumMismatch { .. })
    ));
}

struct Unencodable;

impl Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("refused"))
    }
}

#[test]
fn encode_error_leaves_output_untouched() {
    let mut out = vec![9];
    assert_eq!(
        codec().encode(&Unencodable, &mut out),
        Err(FrameError::Encode(postcard::Error::SerdeSerCustom))
    );
    assert_eq!(out, [9]);
}

#[test]
fn decode_error() {
    // `flag` must be 0 or 1.
    let f = frame_with_payload(&[0xB4, 0x24, 0x02, 0x00]);
    assert_eq!(
        codec().decode::<Probe>(&f),
        Err(FrameError::Decode(postcard::Error::DeserializeBadBool))
    );
    // Payload ends early.
    let f = frame_with_payload(&[0xB4, 0x24, 0x01, 0x05, b'd']);
    assert_eq!(
        codec().decode::<Probe>(&f),
        Err(FrameError::Decode(
            postcard::Error::DeserializeUnexpectedEnd
        ))
    );
}

#[test]
fn trailing_bytes() {
    let f = frame_with_payload(&[0xB4, 0x24, 0x01, 0x03, b'd', b'p', b'u', 0, 0]);
    assert_eq!(
        codec().decode::<Probe>(&f),
        Err(FrameError::TrailingBytes { extra: 2 })
    );
}

#[test]
fn fatal_classification() {
    assert!(FrameError::BadMagic { got: [0, 0] }.is_fatal());
    assert!(FrameError::ChecksumMismatch {
        expected: 0,
        computed: 1
    }
    .is_fatal());
    assert!(FrameError::Poisoned.is_fatal());
    assert!(!FrameError::TrailingBytes { extra: 1 }.is_fatal());
    assert!(!FrameError::Decode(postcard::Error::DeserializeBadBool).is_fatal());
}

fn stream_of(msgs: &[Probe]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        codec().encode(m, &mut out).unwrap();
    }
    out
}

fn sample_msgs() -> Vec<Probe> {
    (0..5)
        .map(|i| Probe {
            id: i * 1000,
            flag: i % 2 == 0,
            name: "x".repeat(usize::from(i) * 7),
        })
        .collect()
}

#[test]
fn reader_one_byte_at_a_time() {
    let msgs = sample_msgs();
    let bytes = stream_of(&msgs);
    let mut r = FrameReader::default();
    let mut got = Vec::new();
    for b in &bytes {
        r.push(std::slice::from_ref(b));
        while let Some(m) = r.next::<Probe>().unwrap() {
            got.push(m);
        }
    }
    assert_eq!(got, msgs);
    assert_eq!(r.buffered(), 0);
}

#[test]
fn reader_all_at_once_and_partial_tail() {
    let msgs = sample_msgs();
    let mut bytes = stream_of(&msgs);
    bytes.extend_from_slice(&GOLDEN[..5]);
    let mut r = FrameReader::new(FrameCodec::default());
    r.push(&bytes);
    for m in &msgs {
        assert_eq!(r.next::<Probe>().unwrap().as_ref(), Some(m));
    }
    assert_eq!(r.next::<Probe>(), Ok(None));
    assert_eq!(r.buffered(), 5);
    r.push(&GOLDEN[5..]);
    assert_eq!(r.next::<Probe>(), Ok(Some(probe())));
    assert_eq!(r.next::<Probe>(), Ok(None));
}

#[test]
fn reader_poisoned_after_fatal_error() {
    let mut bytes = GOLDEN.to_vec();
    let mut bad = GOLDEN;
    bad[HEADER_LEN] ^= 0x40;
    bytes.extend_from_slice(&bad);
    bytes.extend_from_slice(&GOLDEN);
    let mut r = FrameReader::default();
    r.push(&bytes);
    assert_eq!(r.next::<Probe>(), Ok(Some(probe())));
    assert!(matches!(
        r.next::<Probe>(),
        Err(FrameError::ChecksumMismatch { .. })
    ));
    assert!(r.is_poisoned());
    assert_eq!(r.next::<Probe>(), Err(FrameError::Poisoned));
    r.push(&GOLDEN);
    assert_eq!(r.next::<Probe>(), Err(FrameError::Poisoned));
    assert_eq!(r.buffered(), 0);
}

#[test]
fn reader_poisoned_by_each_header_error() {
    let cases: [(usize, u8); 3] = [(0, b'X'), (2, 9), (3, 1)];
    for (at, value) in cases {
        let mut f = GOLDEN;
        f[at] = value;
        let mut r = FrameReader::default();
        r.push(&f);
        let err = r.next::<Probe>().unwrap_err();
        assert!(err.is_fatal() && err != FrameError::Poisoned, "{err:?}");
        assert_eq!(r.next::<Probe>(), Err(FrameError::Poisoned));
    }
}

#[test]
fn reader_oversize_is_not_buffered() {
    let mut r = FrameReader::new(FrameCodec::new(1024));
    r.push(&[b'D', b'P', 1, 0, 0, 0, 0x04, 0x01]);
    for _ in 0..100 {
        r.push(&[0u8; 1024]);
    }
    assert!(r.buffered() <= HEADER_LEN);
    assert_eq!(
        r.next::<Probe>(),
        Err(FrameError::TooLarge {
            len: 1025,
            max: 1024
        })
    );
    assert_eq!(r.next::<Probe>(), Err(FrameError::Poisoned));
}

#[test]
fn reader_skips_undecodable_frame() {
    let mut bytes = frame_with_payload(&[0xB4, 0x24, 0x07]);
    bytes.extend_from_slice(&frame_with_payload(&[
        0xB4, 0x24, 0x01, 0x03, b'd', b'p', b'u', 0xEE,
    ]));
    bytes.extend_from_slice(&GOLDEN);
    let mut r = FrameReader::default();
    r.push(&bytes);
    assert_eq!(
        r.next::<Probe>(),
        Err(FrameError::Decode(postcard::Error::DeserializeBadBool))
    );
    assert_eq!(
        r.next::<Probe>(),
        Err(FrameError::TrailingBytes { extra: 1 })
    );
    assert!(!r.is_poisoned());
    assert_eq!(r.next::<Probe>(), Ok(Some(probe())));
    assert_eq!(r.next::<Probe>(), Ok(None));
}

fn arb_probe() -> impl Strategy<Value = Probe> {
    (any::<u16>(), any::<bool>(), ".{0,40}").prop_map(|(id, flag, name)| Probe { id, flag, name })
}

proptest! {
    #[test]
    fn random_messages_round_trip(msgs in proptest::collection::vec(arb_probe(), 0..8), split in any::<prop::sample::Index>()) {
        let bytes = stream_of(&msgs);
        // Slice API, frame by frame.
        let mut rest = &bytes[..];
        let mut decoded = Vec::new();
        while let Some((m, used)) = codec().decode::<Probe>(rest).unwrap() {
            decoded.push(m);
            rest = &rest[used..];
        }
        prop_assert!(rest.is_empty());
        prop_assert_eq!(&decoded, &msgs);
        // Streaming, split at an arbitrary point.
        let cut = if bytes.is_empty() { 0 } else { split.index(bytes.len() + 1) };
        let mut r = FrameReader::default();
        let mut streamed = Vec::new();
        for part in [&bytes[..cut], &bytes[cut..]] {
            r.push(part);
            while let Some(m) = r.next::<Probe>().unwrap() {
                streamed.push(m);
            }
        }
        prop_assert_eq!(&streamed, &msgs);
    }

    #[test]
    fn any_single_bit_flip_in_payload_is_detected(msg in arb_probe(), bit in any::<prop::sample::Index>()) {
        let mut f = Vec::new();
        codec().encode(&msg, &mut f).unwrap();
        let payload_bits = (f.len() - HEADER_LEN) * 8;
        let b = bit.index(payload_bits);
        f[HEADER_LEN + b / 8] ^= 1 << (b % 8);
        let is_checksum_mismatch = matches!(
            codec().decode::<Probe>(&f),
            Err(FrameError::ChecksumMismatch { .. })
        );
        prop_assert!(is_checksum_mismatch);
    }
}
