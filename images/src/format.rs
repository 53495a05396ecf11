//! The image file: a fixed header, a canonical JSON manifest, its Ed25519 signature, the payload.
//!
//! ```text
//! offset  size  field
//! 0       8     magic  "DPUIMG\0\x01"   (the last byte is the container version)
//! 8       4     manifest length M, u32 big-endian
//! 12      4     signature length, u32 big-endian, always 64
//! 16      M     manifest: canonical JSON (serde_json of [`Manifest`], fields in declaration
//!               order, no whitespace); the signature covers exactly these bytes
//! 16+M    64    Ed25519 signature of the manifest bytes
//! 80+M    P     payload, P = manifest.payload_size bytes, nothing after it
//! ```
//!
//! The payload is cut into `chunk_size` pieces (the last may be shorter); the manifest carries
//! the SHA-256 of every chunk and of the whole payload. Chunks are the unit of transfer, of
//! verification before a write, and of resumption. The image id is the SHA-256 of the manifest
//! bytes: it names one exact signed image.
//!
//! Parsing is in two layers, as in smoltcp: [`ImageView::new_checked`] only checks that the
//! header and the sections it announces are present (no allocation, borrowed slices);
//! [`Image::parse`] then decodes the manifest and checks it against the payload.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::hex;
use crate::keys::{key_id, KeyError, TrustedKeys};

/// First 8 bytes of every image file.
pub const MAGIC: [u8; 8] = *b"DPUIMG\0\x01";
/// Length of the fixed header.
pub const HEADER_LEN: usize = 16;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// The manifest format version this code writes and accepts.
pub const FORMAT_VERSION: u32 = 1;
/// Largest manifest accepted (a 16 MiB manifest lists ~230k chunks).
pub const MAX_MANIFEST_LEN: u32 = 16 << 20;
/// Largest chunk size accepted: bounds every allocation made for one chunk.
pub const MAX_CHUNK_SIZE: u32 = 256 << 20;

/// A SHA-256 digest, written as 64 lower-case hex digits in manifests.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    /// The SHA-256 of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }
    /// Hex form.
    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <&str>::deserialize(d)?;
        hex::decode_array::<32>(s)
            .map(Self)
            .map_err(serde::de::Error::custom)
    }
}

/// What an image is and how to check it. Signed as canonical JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The DPU model this image is built for (e.g. `bluefield-3`); flashing checks it.
    pub target: String,
    /// Version of the dpu-agent inside the image.
    pub agent_version: String,
    /// Payload length in bytes.
    pub payload_size: u64,
    /// Chunk length in bytes (the last chunk may be shorter).
    pub chunk_size: u32,
    /// SHA-256 of every chunk, in order.
    pub chunk_sha256: Vec<Sha256Digest>,
    /// SHA-256 of the whole payload.
    pub payload_sha256: Sha256Digest,
    /// Creation time, unix seconds.
    pub created_unix: u64,
    /// Signing key id: hex of the first 8 bytes of SHA-256 of the public key.
    pub key_id: String,
}

/// Every way image bytes can be malformed.
#[derive(Debug, Error)]
pub enum FormatError {
    /// The first 8 bytes are not [`MAGIC`].
    #[error("bad magic: not a DPU image (or an unknown container version)")]
    BadMagic,
    /// Fewer than [`HEADER_LEN`] bytes.
    #[error("truncated header: {0} of {HEADER_LEN} bytes")]
    TruncatedHeader(usize),
    /// Manifest length over [`MAX_MANIFEST_LEN`].
    #[error("manifest length {0} exceeds the {MAX_MANIFEST_LEN}-byte limit")]
    ManifestTooLong(u32),
    /// Signature length field is not 64.
    #[error("signature length {0}, expected {SIGNATURE_LEN}")]
    BadSignatureLength(u32),
    /// The manifest announced by the header is cut short.
    #[error("truncated manifest: header announces {expected} bytes, {available} present")]
    TruncatedManifest {
        /// Announced length.
        expected: usize,
        /// Bytes present.
        available: usize,
    },
    /// The signature is cut short.
    #[error("truncated signature: {available} of {SIGNATURE_LEN} bytes")]
    TruncatedSignature {
        /// Bytes present.
        available: usize,
    },
    /// The manifest is not valid JSON of the expected shape.
    #[error("manifest is not valid JSON: {0}")]
    BadJson(#[from] serde_json::Error),
    /// The manifest parses but is not in canonical form (so its bytes are not the ones we sign).
    #[error("manifest is not in canonical form")]
    NonCanonicalManifest,
    /// A manifest format version this code does not know.
    #[error("unknown manifest format version {0} (this build knows {FORMAT_VERSION})")]
    UnknownFormatVersion(u32),
    /// Chunk size zero or over [`MAX_CHUNK_SIZE`].
    #[error("chunk size {0} out of range 1..={MAX_CHUNK_SIZE}")]
    BadChunkSize(u32),
    /// The number of chunk hashes does not match payload size / chunk size.
    #[error("manifest lists {found} chunk hashes, payload size and chunk size need {expected}")]
    ChunkCountMismatch {
        /// Chunks implied by payload and chunk size.
        expected: u64,
        /// Hashes listed.
        found: usize,
    },
    /// Fewer payload bytes than the manifest announces.
    #[error("truncated payload: manifest announces {expected} bytes, {available} present")]
    TruncatedPayload {
        /// Announced size.
        expected: u64,
        /// Bytes present.
        available: u64,
    },
    /// More payload bytes than the manifest announces.
    #[error("payload size mismatch: manifest announces {expected} bytes, {available} present")]
    PayloadSizeMismatch {
        /// Announced size.
        expected: u64,
        /// Bytes present.
        available: u64,
    },
    /// The image does not fit in this machine's address space.
    #[error("image too large for this platform")]
    TooLarge,
    /// Building: the target or agent version is empty.
    #[error("{0} must not be empty")]
    EmptyField(&'static str),
}

/// Reading an image file failed.
#[derive(Debug, Error)]
pub enum ImageError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a valid image.
    #[error("{path}: {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: FormatError,
    },
}

/// Verification of a manifest, a payload or a chunk failed.
#[derive(Debug, Error)]
pub enum VerifyError {
    /// The manifest bytes are malformed.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// Unknown key or bad signature.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The image is for another DPU model.
    #[error("image is for target {found:?}, this DPU is {expected:?}")]
    WrongTarget {
        /// The target asked for.
        expected: String,
        /// The image's target.
        found: String,
    },
    /// A chunk's bytes do not match its hash (or length) in the manifest.
    #[error("chunk {index} does not match the manifest")]
    ChunkMismatch {
        /// Chunk index.
        index: u32,
    },
    /// The payload as a whole does not match the manifest.
    #[error("payload SHA-256 does not match the manifest")]
    PayloadMismatch,
}

impl Manifest {
    /// Parses and checks manifest bytes: shape, version, canonical form, chunk count.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FormatError> {
        // Peek at the version first so a future format with other fields is reported as an
        // unknown version rather than as bad JSON.
        #[derive(Deserialize)]
        struct Version {
            format_version: u32,
        }
        let v: Version = serde_json::from_slice(bytes)?;
        if v.format_version != FORMAT_VERSION {
            return Err(FormatError::UnknownFormatVersion(v.format_version));
        }
        let m: Manifest = serde_json::from_slice(bytes)?;
        if m.to_bytes()? != bytes {
            return Err(FormatError::NonCanonicalManifest);
        }
        m.check()?;
        Ok(m)
    }

    /// Canonical bytes: the exact bytes that are signed.
    pub fn to_bytes(&self) -> Result<Vec<u8>, FormatError> {
        Ok(serde_json::to_vec(self)?)
    }

    fn check(&self) -> Result<(), FormatError> {
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return Err(FormatError::BadChunkSize(self.chunk_size));
        }
        let expected = self.payload_size.div_ceil(u64::from(self.chunk_size));
        if expected != self.chunk_sha256.len() as u64 || expected > u64::from(u32::MAX) {
            return Err(FormatError::ChunkCountMismatch {
                expected,
                found: self.chunk_sha256.len(),
            });
        }
        Ok(())
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u32 {
        // check() bounds the count to u32.
        u32::try_from(self.chunk_sha256.len()).unwrap_or(u32::MAX)
    }

    /// Byte range of chunk `index` within the payload (`None` past the end).
    pub fn chunk_range(&self, index: u32) -> Option<Range<u64>> {
        if index >= self.chunk_count() {
            return None;
        }
        let start = u64::from(index) * u64::from(self.chunk_size);
        let end = (start + u64::from(self.chunk_size)).min(self.payload_size);
        Some(start..end)
    }

    /// Length of chunk `index` (0 past the end).
    pub fn chunk_len(&self, index: u32) -> usize {
        self.chunk_range(index).map_or(0, |r| {
            usize::try_from(r.end - r.start).unwrap_or(usize::MAX)
        })
    }

    /// Checks one chunk's bytes against the manifest (length and SHA-256).
    pub fn verify_chunk(&self, index: u32, data: &[u8]) -> Result<(), VerifyError> {
        let want = self
            .chunk_sha256
            .get(index as usize)
            .ok_or(VerifyError::ChunkMismatch { index })?;
        if data.len() != self.chunk_len(index) || Sha256Digest::of(data) != *want {
            return Err(VerifyError::ChunkMismatch { index });
        }
        Ok(())
    }

    /// Checks a whole payload: every chunk, then the whole-payload hash.
    pub fn verify_payload(&self, payload: &[u8]) -> Result<(), VerifyError> {
        if payload.len() as u64 != self.payload_size {
            return Err(VerifyError::PayloadMismatch);
        }
        for i in 0..self.chunk_count() {
            let r = self
                .chunk_range(i)
                .ok_or(VerifyError::ChunkMismatch { index: i })?;
            let slice = payload
                .get(r.start as usize..r.end as usize)
                .ok_or(VerifyError::ChunkMismatch { index: i })?;
            self.verify_chunk(i, slice)?;
        }
        if Sha256Digest::of(payload) != self.payload_sha256 {
            return Err(VerifyError::PayloadMismatch);
        }
        Ok(())
    }
}

/// A borrowed, length-checked view of image bytes. Nothing is decoded or copied.
#[derive(Debug, Clone, Copy)]
pub struct ImageView<'a> {
    buf: &'a [u8],
    manifest_len: usize,
}

impl<'a> ImageView<'a> {
    /// Checks the header and that the manifest and signature it announces are present.
    /// The payload is checked against the manifest by [`Image::parse`].
    pub fn new_checked(buf: &'a [u8]) -> Result<Self, FormatError> {
        let header = buf
            .get(..HEADER_LEN)
            .ok_or(FormatError::TruncatedHeader(buf.len()))?;
        if header[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let manifest_len = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
        let sig_len = u32::from_be_bytes([header[12], header[13], header[14], header[15]]);
        if manifest_len > MAX_MANIFEST_LEN {
            return Err(FormatError::ManifestTooLong(manifest_len));
        }
        if sig_len as usize != SIGNATURE_LEN {
            return Err(FormatError::BadSignatureLength(sig_len));
        }
        let manifest_len = manifest_len as usize;
        let after_header = buf.len() - HEADER_LEN;
        if after_header < manifest_len {
            return Err(FormatError::TruncatedManifest {
                expected: manifest_len,
                available: after_header,
            });
        }
        let after_manifest = after_header - manifest_len;
        if after_manifest < SIGNATURE_LEN {
            return Err(FormatError::TruncatedSignature {
                available: after_manifest,
            });
        }
        Ok(Self { buf, manifest_len })
    }

    /// Length of everything before the payload.
    pub fn prefix_len(&self) -> usize {
        HEADER_LEN + self.manifest_len + SIGNATURE_LEN
    }

    /// The manifest bytes (what the signature covers).
    pub fn manifest_bytes(&self) -> &'a [u8] {
        &self.buf[HEADER_LEN..HEADER_LEN + self.manifest_len]
    }

    /// The signature bytes.
    pub fn signature_bytes(&self) -> [u8; SIGNATURE_LEN] {
        let mut sig = [0u8; SIGNATURE_LEN];
        sig.copy_from_slice(&self.buf[HEADER_LEN + self.manifest_len..self.prefix_len()]);
        sig
    }

    /// Everything after the signature.
    pub fn payload(&self) -> &'a [u8] {
        &self.buf[self.prefix_len()..]
    }
}

/// A manifest whose signature was checked against a trusted key and whose target matches.
/// It is the only thing a [`crate::slot::SlotWriter`] accepts.
#[derive(Debug, Clone)]
pub struct VerifiedManifest {
    manifest: Manifest,
    id: Sha256Digest,
}

impl VerifiedManifest {
    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// The image id: SHA-256 of the signed manifest bytes.
    pub fn id(&self) -> Sha256Digest {
        self.id
    }
}

/// Checks manifest bytes and their signature against `trust`, and (when given) the target.
pub fn verify_manifest(
    manifest_bytes: &[u8],
    signature: &[u8; SIGNATURE_LEN],
    trust: &TrustedKeys,
    expected_target: Option<&str>,
) -> Result<VerifiedManifest, VerifyError> {
    let manifest = Manifest::from_bytes(manifest_bytes)?;
    trust.verify(&manifest.key_id, manifest_bytes, signature)?;
    if let Some(t) = expected_target {
        if manifest.target != t {
            return Err(VerifyError::WrongTarget {
                expected: t.to_string(),
                found: manifest.target,
            });
        }
    }
    Ok(VerifiedManifest {
        manifest,
        id: Sha256Digest::of(manifest_bytes),
    })
}

/// A whole image in memory, parsed and structurally checked (not yet verified). Cheap to share
/// behind an `Arc`: chunks are slices of the one buffer.
#[derive(Debug)]
pub struct Image {
    bytes: Vec<u8>,
    manifest: Manifest,
    manifest_len: usize,
    id: Sha256Digest,
}

impl Image {
    /// Parses image bytes: header, manifest, and that the payload has exactly the announced size.
    pub fn parse(bytes: Vec<u8>) -> Result<Self, FormatError> {
        let view = ImageView::new_checked(&bytes)?;
        let manifest = Manifest::from_bytes(view.manifest_bytes())?;
        let available = view.payload().len() as u64;
        if available < manifest.payload_size {
            return Err(FormatError::TruncatedPayload {
                expected: manifest.payload_size,
                available,
            });
        }
        if available > manifest.payload_size {
            return Err(FormatError::PayloadSizeMismatch {
                expected: manifest.payload_size,
                available,
            });
        }
        let id = Sha256Digest::of(view.manifest_bytes());
        let manifest_len = view.manifest_bytes().len();
        Ok(Self {
            bytes,
            manifest,
            manifest_len,
            id,
        })
    }

    /// Reads and parses an image file.
    pub fn read(path: &Path) -> Result<Self, ImageError> {
        let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(bytes).map_err(|source| ImageError::Format {
            path: path.to_path_buf(),
            source,
        })
    }

    fn view(&self) -> ImageView<'_> {
        ImageView {
            buf: &self.bytes,
            manifest_len: self.manifest_len,
        }
    }

    /// The decoded manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// The signed manifest bytes.
    pub fn manifest_bytes(&self) -> &[u8] {
        self.view().manifest_bytes()
    }
    /// The signature.
    pub fn signature(&self) -> [u8; SIGNATURE_LEN] {
        self.view().signature_bytes()
    }
    /// Header, manifest and signature: what a client needs before fetching chunks.
    pub fn prefix(&self) -> &[u8] {
        &self.bytes[..self.view().prefix_len()]
    }
    /// The payload.
    pub fn payload(&self) -> &[u8] {
        self.view().payload()
    }
    /// Chunk `index` of the payload.
    pub fn chunk(&self, index: u32) -> Option<&[u8]> {
        let r = self.manifest.chunk_range(index)?;
        self.payload().get(r.start as usize..r.end as usize)
    }
    /// The image id (SHA-256 of the manifest bytes).
    pub fn id(&self) -> Sha256Digest {
        self.id
    }
    /// The whole file.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Verifies signature, target (if given), every chunk and the whole payload.
    pub fn verify(
        &self,
        trust: &TrustedKeys,
        expected_target: Option<&str>,
    ) -> Result<VerifiedManifest, VerifyError> {
        let vm = verify_manifest(
            self.manifest_bytes(),
            &self.signature(),
            trust,
            expected_target,
        )?;
        vm.manifest.verify_payload(self.payload())?;
        Ok(vm)
    }
}

/// What goes into a manifest besides the payload-derived fields.
#[derive(Debug, Clone)]
pub struct BuildParams {
    /// DPU model.
    pub target: String,
    /// dpu-agent version in the image.
    pub agent_version: String,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Creation time, unix seconds.
    pub created_unix: u64,
}

/// Builds and signs the manifest for `payload`.
pub fn build_manifest(
    payload: &[u8],
    params: &BuildParams,
    key: &SigningKey,
) -> Result<Manifest, FormatError> {
    if params.target.is_empty() {
        return Err(FormatError::EmptyField("target"));
    }
    if params.agent_version.is_empty() {
        return Err(FormatError::EmptyField("agent version"));
    }
    if params.chunk_size == 0 || params.chunk_size > MAX_CHUNK_SIZE {
        return Err(FormatError::BadChunkSize(params.chunk_size));
    }
    let m = Manifest {
        format_version: FORMAT_VERSION,
        target: params.target.clone(),
        agent_version: params.agent_version.clone(),
        payload_size: payload.len() as u64,
        chunk_size: params.chunk_size,
        chunk_sha256: payload
            .chunks(params.chunk_size as usize)
            .map(Sha256Digest::of)
            .collect(),
        payload_sha256: Sha256Digest::of(payload),
        created_unix: params.created_unix,
        key_id: key_id(&key.verifying_key()),
    };
    m.check()?;
    Ok(m)
}

/// Assembles image bytes from a manifest, its signature and the payload.
pub fn assemble(
    manifest_bytes: &[u8],
    signature: &[u8; SIGNATURE_LEN],
    payload: &[u8],
) -> Result<Vec<u8>, FormatError> {
    let mlen = u32::try_from(manifest_bytes.len())
        .ok()
        .filter(|l| *l <= MAX_MANIFEST_LEN)
        .ok_or(FormatError::ManifestTooLong(u32::MAX))?;
    let mut out =
        Vec::with_capacity(HEADER_LEN + manifest_bytes.len() + SIGNATURE_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&mlen.to_be_bytes());
    out.extend_from_slice(&(SIGNATURE_LEN as u32).to_be_bytes());
    out.extend_from_slice(manifest_bytes);
    out.extend_from_slice(signature);
    out.extend_from_slice(payload);
    Ok(out)
}

/// Builds a complete signed image file in memory.
pub fn build_image(
    payload: &[u8],
    params: &BuildParams,
    key: &SigningKey,
) -> Result<Vec<u8>, FormatError> {
    let m = build_manifest(payload, params, key)?;
    let mb = m.to_bytes()?;
    let sig: Signature = key.sign(&mb);
    assemble(&mb, &sig.to_bytes(), payload)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn params(chunk: u32) -> BuildParams {
        BuildParams {
            target: "bf3".into(),
            agent_version: "0.1.0".into(),
            chunk_size: chunk,
            created_unix: 1_700_000_000,
        }
    }

    fn tiny() -> Vec<u8> {
        build_image(b"hello", &params(4), &key()).unwrap()
    }

    fn trust() -> TrustedKeys {
        let mut t = TrustedKeys::default();
        t.add(key().verifying_key());
        t
    }

    #[test]
    fn golden_tiny_image() {
        let img = tiny();
        let manifest = concat!(
            r#"{"format_version":1,"target":"bf3","agent_version":"0.1.0","payload_size":5,"#,
            r#""chunk_size":4,"chunk_sha256":["#,
            r#""0ebdc3317b75839f643387d783535adc360ca01f33c75f7c1e7373adcd675c0b","#,
            r#""65c74c15a686187bb6bbf9958f494fc6b80068034a659a9ad44991b08c58f2d2"],"#,
            r#""payload_sha256":"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824","#,
            r#""created_unix":1700000000,"key_id":"#
        );
        // Header: magic, manifest length (BE), signature length 64 (BE).
        let mlen = img.len() - HEADER_LEN - SIGNATURE_LEN - 5;
        assert_eq!(mlen, 0x017c);
        assert_eq!(
            &img[..HEADER_LEN],
            &[b'D', b'P', b'U', b'I', b'M', b'G', 0, 1, 0, 0, 0x01, 0x7c, 0, 0, 0, 64]
        );
        let m = &img[HEADER_LEN..HEADER_LEN + mlen];
        assert!(m.starts_with(manifest.as_bytes()));
        let kid = key_id(&key().verifying_key());
        assert!(m.ends_with(format!("\"{kid}\"}}").as_bytes()));
        assert_eq!(&img[img.len() - 5..], b"hello");
        let parsed = Image::parse(img.clone()).unwrap();
        assert_eq!(parsed.chunk(0), Some(&b"hell"[..]));
        assert_eq!(parsed.chunk(1), Some(&b"o"[..]));
        assert_eq!(parsed.chunk(2), None);
        parsed.verify(&trust(), Some("bf3")).unwrap();
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let img = tiny();
        let mlen = img.len() - HEADER_LEN - SIGNATURE_LEN - 5;
        for cut in 0..img.len() {
            let err = Image::parse(img[..cut].to_vec()).unwrap_err();
            let ok = match err {
                FormatError::TruncatedHeader(n) => cut < HEADER_LEN && n == cut,
                FormatError::TruncatedManifest { .. } => cut < HEADER_LEN + mlen,
                FormatError::TruncatedSignature { .. } => cut < HEADER_LEN + mlen + SIGNATURE_LEN,
                FormatError::TruncatedPayload {
                    expected,
                    available,
                } => expected == 5 && available < 5,
                _ => false,
            };
            assert!(ok, "cut at {cut}: {err:?}");
        }
    }

    #[test]
    fn bad_inputs() {
        let img = tiny();
        let mut bad = img.clone();
        bad[0] = b'X';
        assert!(matches!(Image::parse(bad), Err(FormatError::BadMagic)));
        let mut bad = img.clone();
        bad[7] = 2; // unknown container version
        assert!(matches!(Image::parse(bad), Err(FormatError::BadMagic)));
        let mut bad = img.clone();
        bad[15] = 65;
        assert!(matches!(
            Image::parse(bad),
            Err(FormatError::BadSignatureLength(65))
        ));
        let mut bad = img.clone();
        bad[8] = 0x7f;
        assert!(matches!(
            Image::parse(bad),
            Err(FormatError::ManifestTooLong(_))
        ));
        let mut bad = img.clone();
        bad.push(0);
        assert!(matches!(
            Image::parse(bad),
            Err(FormatError::PayloadSizeMismatch {
                expected: 5,
                available: 6
            })
        ));
    }

    fn with_manifest(m: &[u8]) -> Result<Image, FormatError> {
        Image::parse(assemble(m, &[0; 64], b"hello").unwrap())
    }

    #[test]
    fn manifest_errors() {
        let m = Image::parse(tiny()).unwrap().manifest().clone();
        assert!(matches!(
            with_manifest(b"{not json"),
            Err(FormatError::BadJson(_))
        ));
        let mut v2 = m.clone();
        v2.format_version = 2;
        assert!(matches!(
            with_manifest(&v2.to_bytes().unwrap()),
            Err(FormatError::UnknownFormatVersion(2))
        ));
        let mut short = m.clone();
        short.chunk_sha256.pop();
        assert!(matches!(
            with_manifest(&short.to_bytes().unwrap()),
            Err(FormatError::ChunkCountMismatch {
                expected: 2,
                found: 1
            })
        ));
        let mut zero = m.clone();
        zero.chunk_size = 0;
        assert!(matches!(
            with_manifest(&zero.to_bytes().unwrap()),
            Err(FormatError::BadChunkSize(0))
        ));
        let mut sized = m.clone();
        sized.payload_size = 9;
        sized.chunk_sha256.push(Sha256Digest([0; 32]));
        assert!(matches!(
            with_manifest(&sized.to_bytes().unwrap()),
            Err(FormatError::TruncatedPayload {
                expected: 9,
                available: 5
            })
        ));
        let mut spaced = b" ".to_vec();
        spaced.extend(m.to_bytes().unwrap());
        assert!(matches!(
            with_manifest(&spaced),
            Err(FormatError::NonCanonicalManifest)
        ));
    }

    #[test]
    fn verify_detects_payload_and_target_problems() {
        let mut img = tiny();
        let n = img.len();
        img[n - 1] ^= 1;
        let parsed = Image::parse(img).unwrap();
        assert!(matches!(
            parsed.verify(&trust(), None),
            Err(VerifyError::ChunkMismatch { index: 1 })
        ));
        let parsed = Image::parse(tiny()).unwrap();
        assert!(matches!(
            parsed.verify(&trust(), Some("bf2")),
            Err(VerifyError::WrongTarget { .. })
        ));
        let mut sig_bad = tiny();
        let sig_at = sig_bad.len() - 5 - SIGNATURE_LEN;
        sig_bad[sig_at] ^= 1;
        assert!(matches!(
            Image::parse(sig_bad).unwrap().verify(&trust(), None),
            Err(VerifyError::Key(KeyError::BadSignature { .. }))
        ));
        assert!(matches!(
            parsed.verify(&TrustedKeys::default(), None),
            Err(VerifyError::Key(KeyError::UnknownKey(_)))
        ));
    }

    proptest::proptest! {
        #[test]
        fn prop_build_parse_verify(payload in proptest::collection::vec(proptest::num::u8::ANY, 0..3000), chunk in 1u32..700) {
            let img = build_image(&payload, &params(chunk), &key()).unwrap();
            let p = Image::parse(img).unwrap();
            proptest::prop_assert_eq!(p.payload(), &payload[..]);
            let joined: Vec<u8> = (0..p.manifest().chunk_count()).flat_map(|i| p.chunk(i).unwrap().to_vec()).collect();
            proptest::prop_assert_eq!(joined, payload);
            p.verify(&trust(), Some("bf3")).unwrap();
        }

        #[test]
        fn prop_garbage_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let mut b = MAGIC.to_vec();
            b.extend(bytes);
            let _ = Image::parse(b);
        }
    }
}
