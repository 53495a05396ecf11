//! A/B slots and the writer that flashes a verified image into the inactive one.
//!
//! Guarantees of [`SlotWriter`]:
//! - it opens only the slot that is neither active nor on trial, and only after taking the
//!   DPU's flash lock (`flock` on `<state_dir>/flash.lock`, released by the kernel if the process
//!   dies), so two flashes of one DPU cannot interleave;
//! - it refuses an image larger than the slot before writing anything;
//! - a chunk is written (at `index * chunk_size`) only after its length and SHA-256 match the
//!   signed manifest; a corrupt chunk is rejected and the caller re-fetches it;
//! - progress (image id + bitmap of chunks done) is kept in a journal
//!   (`<state_dir>/flash-<slot>.journal`), replaced atomically, and only after the slot data it
//!   describes is synced: an interrupted flash resumes where it stopped, a flash of another image
//!   starts from scratch;
//! - [`SlotWriter::finish`] reads the whole payload range back from the slot and checks the
//!   whole-payload SHA-256. The read-back hash advances in chunk order as chunks land (see
//!   [`SlotWriter::read_back_ready`]), so on a multi-core DPU it overlaps the transfer.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::boot::{BootState, SlotId};
use crate::format::{Sha256Digest, VerifiedManifest};
use crate::{fsutil, hex};

/// Slot data is synced and the journal rewritten after this many new bytes by default.
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 32 << 20;

/// Read-back granularity.
const READ_BACK_PIECE: u64 = 128 << 10;

/// Where a slot lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotKind {
    /// A regular file, created if missing (tests, hosts, loop devices).
    File,
    /// An existing block device (never created).
    BlockDevice,
}

/// One slot: a path and how many bytes it can hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// File or device path.
    pub path: PathBuf,
    /// Capacity in bytes.
    pub capacity: u64,
    /// File or block device.
    pub kind: SlotKind,
}

impl Slot {
    /// A file slot with a configured capacity.
    pub fn file(path: impl Into<PathBuf>, capacity: u64) -> Self {
        Self {
            path: path.into(),
            capacity,
            kind: SlotKind::File,
        }
    }

    /// A block device slot; its capacity is the device size.
    pub fn block_device(path: impl Into<PathBuf>) -> Result<Self, SlotError> {
        let path = path.into();
        let capacity = File::open(&path)
            .and_then(|mut f| f.seek(SeekFrom::End(0)))
            .map_err(|source| SlotError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Self {
            path,
            capacity,
            kind: SlotKind::BlockDevice,
        })
    }
}

/// The two slots of one DPU and the directory for its flash lock and journals.
#[derive(Debug, Clone)]
pub struct SlotSet {
    /// Slot A.
    pub a: Slot,
    /// Slot B.
    pub b: Slot,
    /// Lock and journals live here (next to file slots; on persistent storage for devices).
    pub state_dir: PathBuf,
}

impl SlotSet {
    /// The slot called `id`.
    pub fn slot(&self, id: SlotId) -> &Slot {
        match id {
            SlotId::A => &self.a,
            SlotId::B => &self.b,
        }
    }
    /// The resume journal of slot `id`.
    pub fn journal_path(&self, id: SlotId) -> PathBuf {
        self.state_dir.join(format!("flash-{id}.journal"))
    }
    /// The flash lock of this DPU.
    pub fn lock_path(&self) -> PathBuf {
        self.state_dir.join("flash.lock")
    }
}

/// Slot errors.
#[derive(Debug, Error)]
pub enum SlotError {
    /// The target slot is the active one.
    #[error("slot {0} is active: refusing to flash it")]
    ActiveSlot(SlotId),
    /// The target slot is on trial; clear the trial first.
    #[error("slot {0} is pending (on trial): clear the trial before flashing it")]
    PendingSlot(SlotId),
    /// Another flash of this DPU holds the lock.
    #[error("another flash of this DPU is in progress (lock {0} held)")]
    Busy(PathBuf),
    /// The payload does not fit.
    #[error("image needs {need} bytes, slot {slot} holds {capacity}")]
    TooSmall {
        /// The slot.
        slot: SlotId,
        /// Payload size.
        need: u64,
        /// Slot capacity.
        capacity: u64,
    },
    /// The filesystem or device ran out of space while writing.
    #[error("no space left writing slot {slot} ({path})")]
    NoSpace {
        /// The slot.
        slot: SlotId,
        /// Its path.
        path: PathBuf,
    },
    /// Any other I/O error.
    #[error("{path}: {source}")]
    Io {
        /// File involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A chunk does not match the manifest; it was not written.
    #[error("chunk {0} does not match the manifest: rejected, not written")]
    ChunkRejected(u32),
    /// `finish` before every chunk was written.
    #[error("{0} chunks still missing")]
    Incomplete(usize),
    /// Read-back found chunks that differ from the manifest; they are marked missing again.
    #[error("read-back of the slot does not match the manifest (chunks {0:?} marked missing)")]
    ReadBackMismatch(Vec<u32>),
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Journal {
    image_id: Sha256Digest,
    slot: SlotId,
    chunk_count: u32,
    /// Bitmap, bit `i % 8` of byte `i / 8` set when chunk `i` is on the slot (and synced).
    done: String,
}

#[derive(Debug)]
struct Progress {
    done: Vec<bool>,
    done_count: u32,
    unsynced_bytes: u64,
}

#[derive(Debug)]
struct ReadBack {
    hasher: Sha256,
    next: u32,
    buf: Vec<u8>,
}

/// Counters of one writer (for tests and progress reports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Chunks already on the slot when the writer opened (resumed).
    pub resumed: u32,
    /// Chunks written by this writer.
    pub written: u64,
    /// Chunks rejected (hash or length mismatch), never written.
    pub rejected: u64,
}

/// The result of a successful flash: the slot now holds the image, verified by read-back.
#[derive(Debug, Clone)]
pub struct Flashed {
    /// The slot written.
    pub slot: SlotId,
    /// The image now in it.
    pub manifest: VerifiedManifest,
}

/// Writes one verified image into the inactive slot. Shareable across worker threads
/// (`write_chunk` takes `&self`).
#[derive(Debug)]
pub struct SlotWriter {
    slot_id: SlotId,
    path: PathBuf,
    file: File,
    journal_path: PathBuf,
    manifest: VerifiedManifest,
    progress: Mutex<Progress>,
    landed: Condvar,
    read_back: Mutex<ReadBack>,
    checkpoint_bytes: u64,
    written: AtomicU64,
    rejected: AtomicU64,
    resumed: u32,
    _lock: Flock<File>,
}

fn lock_poisoned<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker that panicked cannot leave the bitmap half-updated (single bool stores), so
    // the data is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SlotWriter {
    /// Opens slot `target` of `slots` for `manifest`, resuming a journal of the same image.
    pub fn open(
        slots: &SlotSet,
        boot: &BootState,
        target: SlotId,
        manifest: VerifiedManifest,
    ) -> Result<Self, SlotError> {
        if target == boot.active {
            return Err(SlotError::ActiveSlot(target));
        }
        if boot.pending.is_some_and(|p| p.slot == target) {
            return Err(SlotError::PendingSlot(target));
        }
        let lock_path = slots.lock_path();
        let io_at = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SlotError::Io { path, source }
        };
        std::fs::create_dir_all(&slots.state_dir).map_err(io_at(&slots.state_dir))?;
        let lock_file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_at(&lock_path))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            if e == nix::errno::Errno::EWOULDBLOCK {
                SlotError::Busy(lock_path.clone())
            } else {
                SlotError::Io {
                    path: lock_path.clone(),
                    source: e.into(),
                }
            }
        })?;

        let slot = slots.slot(target);
        let m = manifest.manifest();
        if m.payload_size > slot.capacity {
            return Err(SlotError::TooSmall {
                slot: target,
                need: m.payload_size,
                capacity: slot.capacity,
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(slot.kind == SlotKind::File)
            .truncate(false)
            .open(&slot.path)
            .map_err(io_at(&slot.path))?;

        let journal_path = slots.journal_path(target);
        let count = m.chunk_count();
        let done = read_journal(&journal_path, &manifest, target, count);
        let done = match done {
            Some(d) => d,
            None => {
                // Absent, unreadable or for another image: start clean.
                fsutil::remove_durably(&journal_path).map_err(io_at(&journal_path))?;
                vec![false; count as usize]
            }
        };
        let done_count = u32::try_from(done.iter().filter(|d| **d).count()).unwrap_or(u32::MAX);
        Ok(Self {
            slot_id: target,
            path: slot.path.clone(),
            file,
            journal_path,
            progress: Mutex::new(Progress {
                done,
                done_count,
                unsynced_bytes: 0,
            }),
            landed: Condvar::new(),
            read_back: Mutex::new(ReadBack {
                hasher: Sha256::new(),
                next: 0,
                buf: Vec::new(),
            }),
            checkpoint_bytes: DEFAULT_CHECKPOINT_BYTES,
            written: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            resumed: done_count,
            manifest,
            _lock: lock,
        })
    }

    /// Syncs and journals after every `bytes` written (default [`DEFAULT_CHECKPOINT_BYTES`]):
    /// the most a crash can make a resumed flash fetch again.
    pub fn with_checkpoint_bytes(mut self, bytes: u64) -> Self {
        self.checkpoint_bytes = bytes;
        self
    }

    /// The slot being written.
    pub fn slot(&self) -> SlotId {
        self.slot_id
    }

    /// The image being written.
    pub fn manifest(&self) -> &VerifiedManifest {
        &self.manifest
    }

    /// Chunks not yet on the slot, in order.
    pub fn missing(&self) -> Vec<u32> {
        let p = lock_poisoned(&self.progress);
        (0..self.manifest.manifest().chunk_count())
            .filter(|i| !p.done[*i as usize])
            .collect()
    }

    /// Chunks on the slot so far.
    pub fn done_count(&self) -> u32 {
        lock_poisoned(&self.progress).done_count
    }

    /// Counters.
    pub fn stats(&self) -> WriterStats {
        WriterStats {
            resumed: self.resumed,
            written: self.written.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }

    fn io(&self, source: io::Error) -> SlotError {
        if source.kind() == io::ErrorKind::StorageFull {
            SlotError::NoSpace {
                slot: self.slot_id,
                path: self.path.clone(),
            }
        } else {
            SlotError::Io {
                path: self.path.clone(),
                source,
            }
        }
    }

    /// Verifies chunk `index` against the manifest and, only if it matches, writes it.
    pub fn write_chunk(&self, index: u32, data: &[u8]) -> Result<(), SlotError> {
        let m = self.manifest.manifest();
        if m.verify_chunk(index, data).is_err() {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(SlotError::ChunkRejected(index));
        }
        let offset = u64::from(index) * u64::from(m.chunk_size);
        self.file
            .write_all_at(data, offset)
            .map_err(|e| self.io(e))?;
        self.written.fetch_add(1, Ordering::Relaxed);
        let mut p = lock_poisoned(&self.progress);
        if !p.done[index as usize] {
            p.done[index as usize] = true;
            p.done_count += 1;
        }
        p.unsynced_bytes += data.len() as u64;
        if p.unsynced_bytes >= self.checkpoint_bytes {
            self.checkpoint_locked(&mut p)?;
        }
        drop(p);
        self.landed.notify_all();
        Ok(())
    }

    /// Makes everything written so far durable and records it in the journal.
    pub fn checkpoint(&self) -> Result<(), SlotError> {
        let mut p = lock_poisoned(&self.progress);
        self.checkpoint_locked(&mut p)
    }

    fn checkpoint_locked(&self, p: &mut Progress) -> Result<(), SlotError> {
        // Data first, then the journal that claims it: a journal never runs ahead of the slot.
        self.file.sync_data().map_err(|e| self.io(e))?;
        let mut bitmap = vec![0u8; p.done.len().div_ceil(8)];
        for (i, d) in p.done.iter().enumerate() {
            if *d {
                bitmap[i / 8] |= 1 << (i % 8);
            }
        }
        let j = Journal {
            image_id: self.manifest.id(),
            slot: self.slot_id,
            chunk_count: self.manifest.manifest().chunk_count(),
            done: hex::encode(&bitmap),
        };
        let bytes = serde_json::to_vec(&j).map_err(|e| SlotError::Io {
            path: self.journal_path.clone(),
            source: e.into(),
        })?;
        fsutil::atomic_write(&self.journal_path, &bytes).map_err(|source| SlotError::Io {
            path: self.journal_path.clone(),
            source,
        })?;
        p.unsynced_bytes = 0;
        Ok(())
    }

    /// Advances the read-back hash over every chunk that has landed, in order, without
    /// waiting. Returns true when the whole payload has been read back.
    pub fn read_back_ready(&self) -> Result<bool, SlotError> {
        self.read_back_until(|_| false)
    }

    /// Read-back loop for a helper thread: hashes chunks in order as they land, waiting for
    /// the next one, until the payload is read back or `stop()` turns true.
    pub fn read_back_follow(&self, stop: &dyn Fn() -> bool) -> Result<bool, SlotError> {
        loop {
            if self.read_back_ready()? {
                return Ok(true);
            }
            if stop() {
                return Ok(false);
            }
            let next = lock_poisoned(&self.read_back).next;
            let p = lock_poisoned(&self.progress);
            if !p.done.get(next as usize).copied().unwrap_or(true) {
                // Bounded wait: stop() is polled even if no notification comes.
                let _ = self
                    .landed
                    .wait_timeout(p, std::time::Duration::from_millis(20));
            }
        }
    }

    fn read_back_until(&self, stop: impl Fn(u32) -> bool) -> Result<bool, SlotError> {
        let m = self.manifest.manifest();
        let count = m.chunk_count();
        let mut rb = lock_poisoned(&self.read_back);
        let rb = &mut *rb;
        while rb.next < count && !stop(rb.next) {
            if !lock_poisoned(&self.progress).done[rb.next as usize] {
                return Ok(false);
            }
            // Read in pieces that stay in cache between the copy and the hash.
            let len = m.chunk_len(rb.next) as u64;
            let start = u64::from(rb.next) * u64::from(m.chunk_size);
            let mut off = 0;
            while off < len {
                let n = (len - off).min(READ_BACK_PIECE) as usize;
                rb.buf.resize(n, 0);
                self.file
                    .read_exact_at(&mut rb.buf, start + off)
                    .map_err(|e| self.io(e))?;
                rb.hasher.update(&rb.buf);
                off += n as u64;
            }
            rb.next += 1;
        }
        Ok(rb.next >= count)
    }

    /// Completes the flash: syncs, reads the whole payload range back and checks the
    /// whole-payload SHA-256; then removes the journal. On a mismatch the chunks that differ
    /// are marked missing again (journal updated) so a retry re-fetches only them.
    pub fn finish(self) -> Result<Flashed, SlotError> {
        let missing = self.missing().len();
        if missing > 0 {
            self.checkpoint()?;
            return Err(SlotError::Incomplete(missing));
        }
        self.checkpoint()?;
        self.read_back_ready()?;
        let digest: [u8; 32] = {
            let mut rb = lock_poisoned(&self.read_back);
            std::mem::take(&mut rb.hasher).finalize().into()
        };
        let m = self.manifest.manifest();
        if Sha256Digest(digest) != m.payload_sha256 {
            let bad = self.find_bad_chunks()?;
            {
                let mut p = lock_poisoned(&self.progress);
                for i in &bad {
                    p.done[*i as usize] = false;
                }
                if bad.is_empty() {
                    // Chunks all match but the whole does not: the manifest is inconsistent
                    // (signed that way); nothing on the slot can be trusted.
                    p.done.iter_mut().for_each(|d| *d = false);
                }
                p.done_count = u32::try_from(p.done.iter().filter(|d| **d).count()).unwrap_or(0);
                self.checkpoint_locked(&mut p)?;
            }
            return Err(SlotError::ReadBackMismatch(bad));
        }
        fsutil::remove_durably(&self.journal_path).map_err(|source| SlotError::Io {
            path: self.journal_path.clone(),
            source,
        })?;
        Ok(Flashed {
            slot: self.slot_id,
            manifest: self.manifest,
        })
    }

    fn find_bad_chunks(&self) -> Result<Vec<u32>, SlotError> {
        let m = self.manifest.manifest();
        let mut buf = Vec::new();
        let mut bad = Vec::new();
        for i in 0..m.chunk_count() {
            buf.resize(m.chunk_len(i), 0);
            self.file
                .read_exact_at(&mut buf, u64::from(i) * u64::from(m.chunk_size))
                .map_err(|e| self.io(e))?;
            if m.verify_chunk(i, &buf).is_err() {
                bad.push(i);
            }
        }
        Ok(bad)
    }
}

/// The done-bitmap of a journal that belongs to this very image and slot; `None` otherwise.
fn read_journal(
    path: &Path,
    manifest: &VerifiedManifest,
    slot: SlotId,
    count: u32,
) -> Option<Vec<bool>> {
    let bytes = std::fs::read(path).ok()?;
    let j: Journal = serde_json::from_slice(&bytes).ok()?;
    if j.image_id != manifest.id() || j.slot != slot || j.chunk_count != count {
        return None;
    }
    let bitmap = hex::decode(&j.done).ok()?;
    if bitmap.len() != (count as usize).div_ceil(8) {
        return None;
    }
    Some(
        (0..count as usize)
            .map(|i| bitmap[i / 8] & (1 << (i % 8)) != 0)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::format::{build_image, BuildParams, Image};
    use crate::keys::TrustedKeys;
    use ed25519_dalek::SigningKey;

    struct Fixture {
        dir: tempfile::TempDir,
        slots: SlotSet,
        image: Image,
        vm: VerifiedManifest,
    }

    fn fixture(payload_len: usize, chunk: u32, capacity: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[3; 32]);
        let payload: Vec<u8> = (0..payload_len).map(|i| (i * 7 % 251) as u8).collect();
        let params = BuildParams {
            target: "t".into(),
            agent_version: "1".into(),
            chunk_size: chunk,
            created_unix: 1,
        };
        let image = Image::parse(build_image(&payload, &params, &key).unwrap()).unwrap();
        let mut trust = TrustedKeys::default();
        trust.add(key.verifying_key());
        let vm = image.verify(&trust, Some("t")).unwrap();
        let slots = SlotSet {
            a: Slot::file(dir.path().join("a.img"), capacity),
            b: Slot::file(dir.path().join("b.img"), capacity),
            state_dir: dir.path().to_path_buf(),
        };
        Fixture {
            dir,
            slots,
            image,
            vm,
        }
    }

    #[test]
    fn writes_verified_chunks_and_finishes() {
        let f = fixture(10_000, 1024, 1 << 20);
        let w = SlotWriter::open(
            &f.slots,
            &BootState::new(SlotId::A),
            SlotId::B,
            f.vm.clone(),
        )
        .unwrap();
        assert_eq!(w.missing().len(), 10);
        for i in (0..10).rev() {
            w.write_chunk(i, f.image.chunk(i).unwrap()).unwrap();
        }
        let done = w.finish().unwrap();
        assert_eq!(done.slot, SlotId::B);
        let on_disk = std::fs::read(&f.slots.b.path).unwrap();
        assert_eq!(&on_disk[..10_000], f.image.payload());
        assert!(!f.slots.journal_path(SlotId::B).exists());
        assert!(!f.slots.a.path.exists(), "active slot never opened");
    }

    #[test]
    fn refuses_active_pending_busy_too_small() {
        let f = fixture(10_000, 1024, 1 << 20);
        let boot = BootState::new(SlotId::A);
        assert!(matches!(
            SlotWriter::open(&f.slots, &boot, SlotId::A, f.vm.clone()),
            Err(SlotError::ActiveSlot(SlotId::A))
        ));
        let pending = crate::boot::mark_pending(boot, SlotId::B, 1).unwrap();
        assert!(matches!(
            SlotWriter::open(&f.slots, &pending, SlotId::B, f.vm.clone()),
            Err(SlotError::PendingSlot(SlotId::B))
        ));
        let w = SlotWriter::open(&f.slots, &boot, SlotId::B, f.vm.clone()).unwrap();
        assert!(matches!(
            SlotWriter::open(&f.slots, &boot, SlotId::B, f.vm.clone()),
            Err(SlotError::Busy(_))
        ));
        drop(w);
        let small = fixture(10_000, 1024, 9_999);
        assert!(matches!(
            SlotWriter::open(&small.slots, &boot, SlotId::B, small.vm.clone()),
            Err(SlotError::TooSmall {
                need: 10_000,
                capacity: 9_999,
                ..
            })
        ));
        assert!(!small.slots.b.path.exists(), "nothing created or written");
        drop(f.dir);
    }

    #[test]
    fn corrupt_chunk_is_not_written() {
        let f = fixture(4096, 1024, 1 << 20);
        let w = SlotWriter::open(
            &f.slots,
            &BootState::new(SlotId::A),
            SlotId::B,
            f.vm.clone(),
        )
        .unwrap();
        let mut bad = f.image.chunk(1).unwrap().to_vec();
        bad[0] ^= 0xff;
        assert!(matches!(
            w.write_chunk(1, &bad),
            Err(SlotError::ChunkRejected(1))
        ));
        assert!(matches!(
            w.write_chunk(1, &f.image.chunk(1).unwrap()[..10]),
            Err(SlotError::ChunkRejected(1))
        ));
        assert!(matches!(
            w.write_chunk(4, b"x"),
            Err(SlotError::ChunkRejected(4))
        ));
        assert_eq!(std::fs::metadata(&f.slots.b.path).unwrap().len(), 0);
        assert_eq!(w.stats().written, 0);
        assert_eq!(w.stats().rejected, 3);
    }

    #[test]
    fn resume_same_image_and_restart_other_image() {
        let f = fixture(8192, 1024, 1 << 20);
        let boot = BootState::new(SlotId::A);
        let w = SlotWriter::open(&f.slots, &boot, SlotId::B, f.vm.clone()).unwrap();
        for i in [0, 1, 5] {
            w.write_chunk(i, f.image.chunk(i).unwrap()).unwrap();
        }
        w.checkpoint().unwrap();
        drop(w);
        let w = SlotWriter::open(&f.slots, &boot, SlotId::B, f.vm.clone()).unwrap();
        assert_eq!(w.missing(), vec![2, 3, 4, 6, 7]);
        assert_eq!(w.stats().resumed, 3);
        assert!(matches!(w.finish(), Err(SlotError::Incomplete(5))));
        // Another image into the same slot starts from scratch.
        let other = fixture(8192, 512, 1 << 20);
        let w = SlotWriter::open(&f.slots, &boot, SlotId::B, other.vm.clone()).unwrap();
        assert_eq!(w.missing().len(), 16);
        // A corrupt journal also restarts cleanly.
        drop(w);
        std::fs::write(f.slots.journal_path(SlotId::B), b"{garbage").unwrap();
        let w = SlotWriter::open(&f.slots, &boot, SlotId::B, f.vm.clone()).unwrap();
        assert_eq!(w.missing().len(), 8);
    }

    #[test]
    fn read_back_catches_a_slot_changed_behind_our_back() {
        let f = fixture(4096, 1024, 1 << 20);
        let boot = BootState::new(SlotId::A);
        let w = SlotWriter::open(&f.slots, &boot, SlotId::B, f.vm.clone()).unwrap();
        for i in 0..4 {
            w.write_chunk(i, f.image.chunk(i).unwrap()).unwrap();
        }
        // Something else scribbles on chunk 2 after it was written.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f.slots.b.path)
            .unwrap()
            .write_all_at(b"XX", 2048 + 10)
            .unwrap();
        assert!(matches!(w.finish(), Err(SlotError::ReadBackMismatch(ref v)) if v == &[2]));
        let w = SlotWriter::open(&f.slots, &boot, SlotId::B, f.vm.clone()).unwrap();
        assert_eq!(w.missing(), vec![2]);
        w.write_chunk(2, f.image.chunk(2).unwrap()).unwrap();
        w.finish().unwrap();
    }
}
