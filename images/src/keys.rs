//! Signing keys and the set of public keys a DPU trusts.
//!
//! Files are text: the secret key file holds the 32-byte Ed25519 seed in hex and is created
//! with mode 0600; the public key file holds the 32-byte public key in hex. A trust directory
//! is every `*.pub` file in it. A key is named by its id: hex of the first 8 bytes of the
//! SHA-256 of the public key, which manifests carry.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::hex::{self, HexError};

/// File name of the secret key written by [`keygen`].
pub const SECRET_FILE: &str = "image-signing.key";
/// File name of the public key written by [`keygen`].
pub const PUBLIC_FILE: &str = "image-signing.pub";

/// Key handling and signature checks.
#[derive(Debug, Error)]
pub enum KeyError {
    /// A key file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A key file does not hold 32 bytes of hex.
    #[error("{path}: not a key file: {source}")]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: HexError,
    },
    /// 32 bytes that are not a valid Ed25519 public key.
    #[error("{0}: not a valid Ed25519 public key")]
    InvalidPublicKey(PathBuf),
    /// No public key found where trust was to be loaded.
    #[error("{0}: no public keys (*.pub) found")]
    NoKeys(PathBuf),
    /// The manifest names a key that is not trusted.
    #[error("image is signed by key {0}, which is not trusted")]
    UnknownKey(String),
    /// The signature does not verify under the named key.
    #[error("bad signature (key {key_id})")]
    BadSignature {
        /// The key the manifest names.
        key_id: String,
    },
}

/// The key id: hex of the first 8 bytes of SHA-256 of the public key.
pub fn key_id(key: &VerifyingKey) -> String {
    let d = Sha256::digest(key.as_bytes());
    hex::encode(&d[..8])
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Generates a key pair into `dir` ([`SECRET_FILE`] mode 0600, [`PUBLIC_FILE`]); refuses to
/// overwrite existing files. Returns the key id.
pub fn keygen(dir: &Path) -> Result<String, KeyError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let key = SigningKey::generate(&mut rand_core::OsRng);
    let secret = dir.join(SECRET_FILE);
    let public = dir.join(PUBLIC_FILE);
    if public.exists() {
        return Err(KeyError::Io {
            path: public,
            source: std::io::ErrorKind::AlreadyExists.into(),
        });
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&secret)
        .map_err(io_err(&secret))?;
    writeln!(f, "{}", hex::encode(&key.to_bytes())).map_err(io_err(&secret))?;
    f.sync_all().map_err(io_err(&secret))?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&public)
        .map_err(io_err(&public))?;
    writeln!(f, "{}", hex::encode(key.verifying_key().as_bytes())).map_err(io_err(&public))?;
    f.sync_all().map_err(io_err(&public))?;
    Ok(key_id(&key.verifying_key()))
}

fn read_hex32(path: &Path) -> Result<[u8; 32], KeyError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    hex::decode_array::<32>(text.trim()).map_err(|source| KeyError::BadKeyFile {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a secret key file written by [`keygen`].
pub fn read_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    Ok(SigningKey::from_bytes(&read_hex32(path)?))
}

/// Reads a public key file.
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    VerifyingKey::from_bytes(&read_hex32(path)?)
        .map_err(|_| KeyError::InvalidPublicKey(path.to_path_buf()))
}

/// The public keys a DPU accepts images from, by key id.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<String, VerifyingKey>,
}

impl TrustedKeys {
    /// Loads one public key file, or every `*.pub` file of a directory. An empty set is an
    /// error: a DPU that trusts nothing can never be updated, which is a configuration mistake.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let mut t = Self::default();
        t.load_into(path)?;
        if t.keys.is_empty() {
            return Err(KeyError::NoKeys(path.to_path_buf()));
        }
        Ok(t)
    }

    /// Loads from several files or directories.
    pub fn load_all<P: AsRef<Path>>(paths: &[P]) -> Result<Self, KeyError> {
        let mut t = Self::default();
        for p in paths {
            t.load_into(p.as_ref())?;
        }
        if t.keys.is_empty() {
            let first = paths.first().map(|p| p.as_ref().to_path_buf());
            return Err(KeyError::NoKeys(first.unwrap_or_default()));
        }
        Ok(t)
    }

    fn load_into(&mut self, path: &Path) -> Result<(), KeyError> {
        let meta = fs::metadata(path).map_err(io_err(path))?;
        if meta.is_dir() {
            let mut files = Vec::new();
            for entry in fs::read_dir(path).map_err(io_err(path))? {
                let p = entry.map_err(io_err(path))?.path();
                if p.extension().is_some_and(|e| e == "pub") {
                    files.push(p);
                }
            }
            files.sort();
            for f in files {
                self.add(read_public_key(&f)?);
            }
        } else {
            self.add(read_public_key(path)?);
        }
        Ok(())
    }

    /// Trusts one more key.
    pub fn add(&mut self, key: VerifyingKey) {
        self.keys.insert(key_id(&key), key);
    }

    /// Number of trusted keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Ids of the trusted keys.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Verifies `signature` over `message` with the trusted key `key_id` (strict Ed25519:
    /// rejects malleable and small-order forms).
    pub fn verify(
        &self,
        key_id: &str,
        message: &[u8],
        signature: &[u8; 64],
    ) -> Result<(), KeyError> {
        let key = self
            .keys
            .get(key_id)
            .ok_or_else(|| KeyError::UnknownKey(key_id.to_string()))?;
        key.verify_strict(message, &Signature::from_bytes(signature))
            .map_err(|_| KeyError::BadSignature {
                key_id: key_id.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use ed25519_dalek::Signer;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keygen_files_modes_and_trust() {
        let dir = tempfile::tempdir().unwrap();
        let id = keygen(dir.path()).unwrap();
        assert_eq!(id.len(), 16);
        let sk = dir.path().join(SECRET_FILE);
        let mode = fs::metadata(&sk).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Refuses to overwrite.
        assert!(matches!(keygen(dir.path()), Err(KeyError::Io { .. })));
        let key = read_signing_key(&sk).unwrap();
        // Loading the directory picks up only *.pub files.
        let trust = TrustedKeys::load(dir.path()).unwrap();
        assert_eq!(trust.ids().collect::<Vec<_>>(), vec![id.as_str()]);
        let sig = key.sign(b"msg").to_bytes();
        trust.verify(&id, b"msg", &sig).unwrap();
        assert!(matches!(
            trust.verify(&id, b"msh", &sig),
            Err(KeyError::BadSignature { .. })
        ));
        assert!(matches!(
            trust.verify("0011223344556677", b"msg", &sig),
            Err(KeyError::UnknownKey(_))
        ));
        // A single file works too.
        let one = TrustedKeys::load(&dir.path().join(PUBLIC_FILE)).unwrap();
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn bad_key_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            TrustedKeys::load(dir.path()),
            Err(KeyError::NoKeys(_))
        ));
        let p = dir.path().join("x.pub");
        fs::write(&p, "abcd\n").unwrap();
        assert!(matches!(
            TrustedKeys::load(dir.path()),
            Err(KeyError::BadKeyFile { .. })
        ));
        assert!(matches!(
            TrustedKeys::load(&dir.path().join("missing")),
            Err(KeyError::Io { .. })
        ));
    }
}
