//! DPU images: a payload plus a signed manifest of chunk hashes, and the A/B slots they are
//! flashed into.
//!
//! The path of an image from the build host to a DPU:
//! 1. [`format::build_image`] (or `dpu-image build`) writes one file: header, canonical JSON
//!    manifest, Ed25519 signature, payload.
//! 2. A host serves it with [`flash::ChunkServer`]; the DPU side fetches the manifest, checks it
//!    against its [`keys::TrustedKeys`] and its own target ([`format::verify_manifest`]), which
//!    yields the only type a [`slot::SlotWriter`] accepts ([`format::VerifiedManifest`]).
//! 3. [`flash::flash`] fetches chunks in parallel, verifies each against the manifest before it
//!    touches the inactive slot, journals progress so an interrupted flash resumes, and reads the
//!    slot back to verify the whole payload.
//! 4. [`boot::mark_pending`] arms the new slot; after the reboot [`boot::on_start`] commits it or
//!    rolls back.
#![forbid(unsafe_code)]

pub mod boot;
pub mod flash;
pub mod format;
mod fsutil;
pub mod hex;
pub mod keys;
pub mod slot;
