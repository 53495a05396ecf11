//! Bad input end to end through the path an agent takes (parse, verify manifest, open the
//! inactive slot, flash, read back). Every test checks that the ACTIVE slot's bytes are
//! untouched, and the inactive slot is not written where that is the promise.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use ed25519_dalek::{Signer, SigningKey};
use images::boot::{BootState, SlotId};
use images::flash::{flash, ChunkSource, FetchError, FlashError, FlashOptions, FlashReport};
use images::format::{
    assemble, build_image, build_manifest, verify_manifest, BuildParams, FormatError, Image,
    VerifyError,
};
use images::keys::{KeyError, TrustedKeys};
use images::slot::{Slot, SlotError, SlotSet, SlotWriter};

const ACTIVE_BYTE: u8 = 0xA5;
const SLOT_CAP: u64 = 1 << 20;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

fn trust() -> TrustedKeys {
    let mut t = TrustedKeys::default();
    t.add(key().verifying_key());
    t
}

fn params(chunk: u32) -> BuildParams {
    BuildParams {
        target: "bluefield-3".into(),
        agent_version: "1.2.3".into(),
        chunk_size: chunk,
        created_unix: 1_700_000_000,
    }
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A DPU with slot A active (filled with a known pattern) and slot B inactive.
struct Dpu {
    dir: tempfile::TempDir,
    slots: SlotSet,
    boot: BootState,
}

impl Dpu {
    fn new() -> Self {
        Self::with_b(None, SLOT_CAP)
    }

    fn with_b(b_path: Option<PathBuf>, b_cap: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("slot-a.img");
        std::fs::write(&a, vec![ACTIVE_BYTE; SLOT_CAP as usize]).unwrap();
        let b = b_path.unwrap_or_else(|| dir.path().join("slot-b.img"));
        let slots = SlotSet {
            a: Slot::file(a, SLOT_CAP),
            b: Slot::file(b, b_cap),
            state_dir: dir.path().join("state"),
        };
        Self {
            dir,
            slots,
            boot: BootState::new(SlotId::A),
        }
    }

    fn assert_active_untouched(&self) {
        let a = std::fs::read(&self.slots.a.path).unwrap();
        assert_eq!(a.len(), SLOT_CAP as usize);
        assert!(a.iter().all(|b| *b == ACTIVE_BYTE), "active slot changed");
    }

    /// True when slot B holds no written data (absent, empty, or all zero).
    fn inactive_unwritten(&self) -> bool {
        match std::fs::read(&self.slots.b.path) {
            Ok(b) => b.iter().all(|x| *x == 0),
            Err(_) => true,
        }
    }

    fn b_bytes(&self, len: usize) -> Vec<u8> {
        std::fs::read(&self.slots.b.path).unwrap()[..len].to_vec()
    }

    /// The agent's path for a local image file's bytes.
    fn deploy(
        &self,
        image_bytes: Vec<u8>,
        source: Option<&dyn ChunkSource>,
    ) -> Result<FlashReport, Failure> {
        let img = Image::parse(image_bytes).map_err(Failure::Format)?;
        let vm = verify_manifest(
            img.manifest_bytes(),
            &img.signature(),
            &trust(),
            Some("bluefield-3"),
        )
        .map_err(Failure::Verify)?;
        let w = SlotWriter::open(&self.slots, &self.boot, SlotId::B, vm)
            .map_err(|e| Failure::Flash(e.into()))?;
        let src: &dyn ChunkSource = source.unwrap_or(&img);
        flash(src, w, &FlashOptions::default(), &|_| {}).map_err(Failure::Flash)
    }
}

#[derive(Debug)]
enum Failure {
    Format(FormatError),
    Verify(VerifyError),
    Flash(FlashError),
}

#[test]
fn good_image_flashes_and_active_is_untouched() {
    let dpu = Dpu::new();
    let p = payload(300_000, 1);
    let r = dpu
        .deploy(build_image(&p, &params(64 << 10), &key()).unwrap(), None)
        .unwrap();
    assert_eq!(r.written, 5);
    assert_eq!(dpu.b_bytes(p.len()), p);
    dpu.assert_active_untouched();
    let _ = &dpu.dir;
}

#[test]
fn bad_signature_is_refused_before_any_write() {
    let dpu = Dpu::new();
    let mut img = build_image(&payload(100_000, 2), &params(16 << 10), &key()).unwrap();
    let sig_at = img.len() - 100_000 - 64;
    img[sig_at + 10] ^= 0x01;
    let e = dpu.deploy(img, None).unwrap_err();
    assert!(
        matches!(
            e,
            Failure::Verify(VerifyError::Key(KeyError::BadSignature { .. }))
        ),
        "{e:?}"
    );
    // A tampered manifest (target edited, old signature kept) is a bad signature too.
    let mut img = build_image(&payload(1000, 2), &params(512), &key()).unwrap();
    let at = img.windows(11).position(|w| w == b"bluefield-3").unwrap();
    img[at + 10] = b'4';
    let e = dpu.deploy(img, None);
    // The edit keeps every length, so only the signature check can catch it.
    assert!(
        matches!(
            e,
            Err(Failure::Verify(VerifyError::Key(
                KeyError::BadSignature { .. }
            )))
        ),
        "{e:?}"
    );
    assert!(dpu.inactive_unwritten());
    dpu.assert_active_untouched();
}

#[test]
fn unknown_key_is_refused() {
    let dpu = Dpu::new();
    let stranger = SigningKey::from_bytes(&[7; 32]);
    let img = build_image(&payload(50_000, 3), &params(4096), &stranger).unwrap();
    let e = dpu.deploy(img, None).unwrap_err();
    assert!(
        matches!(
            e,
            Failure::Verify(VerifyError::Key(KeyError::UnknownKey(_)))
        ),
        "{e:?}"
    );
    assert!(dpu.inactive_unwritten());
    dpu.assert_active_untouched();
}

#[test]
fn wrong_target_is_refused() {
    let dpu = Dpu::new();
    let mut p = params(4096);
    p.target = "bluefield-2".into();
    let img = build_image(&payload(50_000, 4), &p, &key()).unwrap();
    let e = dpu.deploy(img, None).unwrap_err();
    assert!(
        matches!(e, Failure::Verify(VerifyError::WrongTarget { ref found, .. }) if found == "bluefield-2"),
        "{e:?}"
    );
    assert!(dpu.inactive_unwritten());
    dpu.assert_active_untouched();
}

#[test]
fn truncated_payload_is_refused() {
    let dpu = Dpu::new();
    let img = build_image(&payload(50_000, 5), &params(4096), &key()).unwrap();
    for cut in [1, 100, 4096, 49_999] {
        let e = dpu
            .deploy(img[..img.len() - cut].to_vec(), None)
            .unwrap_err();
        assert!(
            matches!(e, Failure::Format(FormatError::TruncatedPayload { .. })),
            "{e:?}"
        );
    }
    // A source that serves a short last chunk: rejected every time, never written.
    let full = Image::parse(img).unwrap();
    struct Short<'a>(&'a Image);
    impl ChunkSource for Short<'_> {
        fn fetch(&self, i: u32) -> Result<Vec<u8>, FetchError> {
            let c = self.0.chunk(i).ok_or(FetchError::NoSuchChunk(i))?;
            Ok(if i == 12 {
                c[..c.len() - 1].to_vec()
            } else {
                c.to_vec()
            })
        }
    }
    let e = dpu
        .deploy(full.as_bytes().to_vec(), Some(&Short(&full)))
        .unwrap_err();
    assert!(
        matches!(
            e,
            Failure::Flash(FlashError::Corrupt {
                index: 12,
                attempts: 3
            })
        ),
        "{e:?}"
    );
    // Chunk 12's range of slot B was never written.
    let b = std::fs::read(&dpu.slots.b.path).unwrap();
    assert!(b.len() <= 12 * 4096 || b[12 * 4096..].iter().all(|x| *x == 0));
    dpu.assert_active_untouched();
}

/// Corrupts the first fetch of one chunk; counts fetches per chunk.
struct CorruptOnce {
    image: Image,
    victim: u32,
    fetches: Mutex<Vec<u32>>,
}

impl ChunkSource for CorruptOnce {
    fn fetch(&self, i: u32) -> Result<Vec<u8>, FetchError> {
        let mut f = self.fetches.lock().unwrap();
        f.push(i);
        let first = f.iter().filter(|x| **x == i).count() == 1;
        drop(f);
        let mut c = self
            .image
            .chunk(i)
            .ok_or(FetchError::NoSuchChunk(i))?
            .to_vec();
        if i == self.victim && first {
            c[7] ^= 0x80;
        }
        Ok(c)
    }
}

#[test]
fn corrupt_chunk_is_refetched_and_never_written() {
    let dpu = Dpu::new();
    let p = payload(200_000, 6);
    let bytes = build_image(&p, &params(8192), &key()).unwrap();
    let src = CorruptOnce {
        image: Image::parse(bytes.clone()).unwrap(),
        victim: 9,
        fetches: Mutex::new(Vec::new()),
    };
    let r = dpu.deploy(bytes, Some(&src)).unwrap();
    let chunks = 200_000u64.div_ceil(8192);
    assert_eq!(
        r.written, chunks,
        "one write per chunk: the corrupt copy was not written"
    );
    assert_eq!(r.rejected, 1);
    assert_eq!(r.refetches, 1);
    let f = src.fetches.lock().unwrap();
    assert_eq!(f.iter().filter(|x| **x == 9).count(), 2);
    assert_eq!(f.len() as u64, chunks + 1);
    assert_eq!(dpu.b_bytes(p.len()), p);
    dpu.assert_active_untouched();
}

#[test]
fn manifest_payload_mismatch_is_refused() {
    let dpu = Dpu::new();
    // (a) more payload bytes than the manifest announces.
    let mut img = build_image(&payload(10_000, 7), &params(4096), &key()).unwrap();
    img.extend_from_slice(b"extra");
    let e = dpu.deploy(img, None).unwrap_err();
    assert!(
        matches!(e, Failure::Format(FormatError::PayloadSizeMismatch { .. })),
        "{e:?}"
    );
    // (b) a validly signed manifest describing other bytes of the same size: every chunk is
    // rejected, nothing reaches the slot.
    let good = payload(10_000, 7);
    let other = payload(10_000, 8);
    let m = build_manifest(&good, &params(4096), &key()).unwrap();
    let mb = m.to_bytes().unwrap();
    let sig = key().sign(&mb).to_bytes();
    let img = assemble(&mb, &sig, &other).unwrap();
    let e = dpu.deploy(img, None).unwrap_err();
    assert!(
        matches!(e, Failure::Flash(FlashError::Corrupt { attempts: 3, .. })),
        "{e:?}"
    );
    assert!(dpu.inactive_unwritten());
    dpu.assert_active_untouched();
}

#[test]
fn slot_too_small_is_refused_before_writing() {
    let dpu = Dpu::with_b(None, 100_000);
    let e = dpu
        .deploy(
            build_image(&payload(100_001, 9), &params(4096), &key()).unwrap(),
            None,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Failure::Flash(FlashError::Slot(SlotError::TooSmall {
                need: 100_001,
                capacity: 100_000,
                ..
            }))
        ),
        "{e:?}"
    );
    assert!(!dpu.slots.b.path.exists(), "slot B never even opened");
    dpu.assert_active_untouched();
}

/// Mounts a tmpfs of `size` at a fresh directory; unmounts on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self { dir })
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn real_enospc_is_a_typed_error() {
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    });
    if !root {
        println!("SKIPPED real_enospc_is_a_typed_error: needs root to mount a tmpfs");
        return;
    }
    let Some(fs) = Tmpfs::mount("1M") else {
        println!("SKIPPED real_enospc_is_a_typed_error: mount -t tmpfs failed");
        return;
    };
    // The slot is configured larger than the filesystem really is.
    let dpu = Dpu::with_b(Some(fs.path().join("slot-b.img")), 4 << 20);
    let e = dpu
        .deploy(
            build_image(&payload(2 << 20, 10), &params(64 << 10), &key()).unwrap(),
            None,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Failure::Flash(FlashError::Slot(SlotError::NoSpace {
                slot: SlotId::B,
                ..
            }))
        ),
        "{e:?}"
    );
    dpu.assert_active_untouched();
    drop(dpu);
    drop(fs);
}

/// Serves chunks until `budget` fetches succeeded, then fails every fetch.
struct FailAfter {
    image: Arc<Image>,
    budget: AtomicU32,
    served: Mutex<BTreeSet<u32>>,
}

impl ChunkSource for FailAfter {
    fn fetch(&self, i: u32) -> Result<Vec<u8>, FetchError> {
        let ok = self
            .budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .is_ok();
        if !ok {
            return Err(FetchError::Unavailable(i));
        }
        self.served.lock().unwrap().insert(i);
        self.image.fetch(i)
    }
}

#[test]
fn interrupted_flash_resumes_fetching_only_missing_chunks() {
    let p = payload(500_000, 11);
    let bytes = build_image(&p, &params(16 << 10), &key()).unwrap();
    let image = Arc::new(Image::parse(bytes).unwrap());
    let vm = image.verify(&trust(), Some("bluefield-3")).unwrap();
    let total = vm.manifest().chunk_count();
    for (k, parallel) in [(0, 1), (1, 1), (7, 4), (total - 1, 3), (15, 2)] {
        let dpu = Dpu::new();
        let first = FailAfter {
            image: image.clone(),
            budget: AtomicU32::new(k),
            served: Mutex::new(BTreeSet::new()),
        };
        let opts = FlashOptions {
            parallel,
            max_attempts: 3,
        };
        let w = SlotWriter::open(&dpu.slots, &dpu.boot, SlotId::B, vm.clone()).unwrap();
        let e = flash(&first, w, &opts, &|_| {}).unwrap_err();
        assert!(matches!(
            e,
            FlashError::Fetch {
                source: FetchError::Unavailable(_),
                ..
            }
        ));
        let served = first.served.into_inner().unwrap();
        assert_eq!(served.len(), k as usize);
        dpu.assert_active_untouched();

        let w = SlotWriter::open(&dpu.slots, &dpu.boot, SlotId::B, vm.clone()).unwrap();
        let missing: BTreeSet<u32> = w.missing().into_iter().collect();
        assert_eq!(missing.len(), (total - k) as usize, "k={k}");
        assert!(missing.is_disjoint(&served));
        let second = FailAfter {
            image: image.clone(),
            budget: AtomicU32::new(u32::MAX),
            served: Mutex::new(BTreeSet::new()),
        };
        let r = flash(&second, w, &opts, &|_| {}).unwrap();
        assert_eq!(r.resumed, k);
        assert_eq!(
            second.served.into_inner().unwrap(),
            missing,
            "only missing chunks fetched"
        );
        assert_eq!(dpu.b_bytes(p.len()), p);
        dpu.assert_active_untouched();
    }
}

/// Blocks every fetch until released, so a flash stays in progress.
struct Gate {
    image: Arc<Image>,
    started: Barrier,
    release: Barrier,
    first: AtomicU32,
}

impl ChunkSource for Gate {
    fn fetch(&self, i: u32) -> Result<Vec<u8>, FetchError> {
        if self.first.fetch_add(1, Ordering::SeqCst) == 0 {
            self.started.wait();
            self.release.wait();
        }
        self.image.fetch(i)
    }
}

#[test]
fn second_flash_of_the_same_dpu_is_refused() {
    let dpu = Dpu::new();
    let p = payload(100_000, 12);
    let image = Arc::new(Image::parse(build_image(&p, &params(8192), &key()).unwrap()).unwrap());
    let vm = image.verify(&trust(), None).unwrap();
    let gate = Gate {
        image: image.clone(),
        started: Barrier::new(2),
        release: Barrier::new(2),
        first: AtomicU32::new(0),
    };
    let opts = FlashOptions {
        parallel: 1,
        max_attempts: 1,
    };
    std::thread::scope(|s| {
        let w = SlotWriter::open(&dpu.slots, &dpu.boot, SlotId::B, vm.clone()).unwrap();
        let running = s.spawn(|| flash(&gate, w, &opts, &|_| {}));
        gate.started.wait();
        // The first flash is mid-way: a second one is refused, whatever it carries.
        let e = SlotWriter::open(&dpu.slots, &dpu.boot, SlotId::B, vm.clone()).unwrap_err();
        assert!(matches!(e, SlotError::Busy(_)), "{e:?}");
        gate.release.wait();
        running.join().unwrap().unwrap();
    });
    assert_eq!(dpu.b_bytes(p.len()), p);
    // Once the first is done, the lock is free again.
    let w = SlotWriter::open(&dpu.slots, &dpu.boot, SlotId::B, vm).unwrap();
    drop(w);
    dpu.assert_active_untouched();
}

#[test]
fn active_slot_is_never_opened() {
    let dpu = Dpu::new();
    let image =
        Image::parse(build_image(&payload(1000, 13), &params(512), &key()).unwrap()).unwrap();
    let vm = image.verify(&trust(), None).unwrap();
    let e = SlotWriter::open(&dpu.slots, &dpu.boot, SlotId::A, vm).unwrap_err();
    assert!(matches!(e, SlotError::ActiveSlot(SlotId::A)));
    dpu.assert_active_untouched();
}

#[test]
fn full_ab_cycle_flash_arm_commit_then_rollback() {
    use images::boot::{arm_flashed, start_up, BootControl, Decision, FileBootControl};
    let mut dpu = Dpu::new();
    let ctrl = FileBootControl::new(dpu.dir.path().join("boot.json"));
    ctrl.store(&dpu.boot).unwrap();
    let v1 = payload(100_000, 20);
    let img = Image::parse(build_image(&v1, &params(8192), &key()).unwrap()).unwrap();
    let vm = img.verify(&trust(), Some("bluefield-3")).unwrap();
    let w = SlotWriter::open(&dpu.slots, &dpu.boot, SlotId::B, vm.clone()).unwrap();
    let r = flash(&img, w, &FlashOptions::default(), &|_| {}).unwrap();
    let armed = arm_flashed(&ctrl, &r.flashed, 2).unwrap();
    assert_eq!(armed.next_boot(), SlotId::B);
    // While B is on trial it cannot be flashed again.
    assert!(matches!(
        SlotWriter::open(&dpu.slots, &armed, SlotId::B, vm.clone()),
        Err(SlotError::PendingSlot(SlotId::B))
    ));
    // Boot into B, healthy: commit.
    let (d, s) = start_up(&ctrl, SlotId::B, true).unwrap();
    assert_eq!(d, Decision::Commit(SlotId::B));
    assert_eq!(ctrl.load().unwrap().active, SlotId::B);
    dpu.boot = s;
    // Now A is the inactive slot and B is protected.
    assert!(matches!(
        SlotWriter::open(&dpu.slots, &dpu.boot, SlotId::B, vm.clone()),
        Err(SlotError::ActiveSlot(SlotId::B))
    ));
    let v2 = payload(90_000, 21);
    let img2 = Image::parse(build_image(&v2, &params(8192), &key()).unwrap()).unwrap();
    let vm2 = img2.verify(&trust(), Some("bluefield-3")).unwrap();
    let w = SlotWriter::open(&dpu.slots, &dpu.boot, SlotId::A, vm2).unwrap();
    let r = flash(&img2, w, &FlashOptions::default(), &|_| {}).unwrap();
    arm_flashed(&ctrl, &r.flashed, 1).unwrap();
    // A never comes up healthy: one retry, then rollback to B, whose bytes are intact.
    let (d, _) = start_up(&ctrl, SlotId::A, false).unwrap();
    assert_eq!(
        d,
        Decision::Retry {
            slot: SlotId::A,
            tries_left: 0
        }
    );
    let (d, s) = start_up(&ctrl, SlotId::A, false).unwrap();
    assert_eq!(
        d,
        Decision::Rollback {
            failed: SlotId::A,
            to: SlotId::B
        }
    );
    assert_eq!(s.next_boot(), SlotId::B);
    assert_eq!(dpu.b_bytes(v1.len()), v1);
}

const CRASH_ENV: &str = "DPUCP_IMAGES_CRASH_CHILD_DIR";
const CRASH_AFTER: u32 = 5;

fn crash_image() -> Image {
    Image::parse(build_image(&payload(200_000, 30), &params(8192), &key()).unwrap()).unwrap()
}

fn crash_slots(dir: &Path) -> SlotSet {
    SlotSet {
        a: Slot::file(dir.join("slot-a.img"), SLOT_CAP),
        b: Slot::file(dir.join("slot-b.img"), SLOT_CAP),
        state_dir: dir.join("state"),
    }
}

/// The parent re-runs this test binary as a child that flashes and dies (exit, no unwinding,
/// no destructors) right after chunk `CRASH_AFTER` lands; the parent then resumes.
#[test]
fn process_death_mid_flash_resumes_and_releases_the_lock() {
    if let Ok(dir) = std::env::var(CRASH_ENV) {
        let img = crash_image();
        let vm = img.verify(&trust(), None).unwrap();
        let slots = crash_slots(Path::new(&dir));
        let w = SlotWriter::open(&slots, &BootState::new(SlotId::A), SlotId::B, vm)
            .unwrap()
            .with_checkpoint_bytes(1);
        let opts = FlashOptions {
            parallel: 1,
            max_attempts: 1,
        };
        let _ = flash(&img, w, &opts, &|p| {
            if p.done == CRASH_AFTER {
                std::process::exit(17);
            }
        });
        unreachable!("the child exits mid-flash");
    }
    let dpu = Dpu::new();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "process_death_mid_flash_resumes_and_releases_the_lock",
            "--exact",
            "--nocapture",
        ])
        .env(CRASH_ENV, dpu.dir.path())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(17), "child died where planned");
    let img = crash_image();
    let vm = img.verify(&trust(), None).unwrap();
    let slots = crash_slots(dpu.dir.path());
    // The dead process's lock is gone with it; its journal survived.
    let w = SlotWriter::open(&slots, &dpu.boot, SlotId::B, vm).unwrap();
    assert_eq!(w.stats().resumed, CRASH_AFTER);
    let r = flash(&img, w, &FlashOptions::default(), &|_| {}).unwrap();
    assert_eq!(
        r.fetches,
        u64::from(img.manifest().chunk_count() - CRASH_AFTER)
    );
    assert_eq!(dpu.b_bytes(200_000), img.payload());
    dpu.assert_active_untouched();
}

/// A loop device over a file; detached on drop.
struct Loop {
    dev: String,
    _backing: tempfile::NamedTempFile,
}

impl Loop {
    fn attach(size: u64) -> Option<Self> {
        let backing = tempfile::NamedTempFile::new().unwrap();
        backing.as_file().set_len(size).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing.path())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let dev = String::from_utf8(out.stdout).ok()?.trim().to_string();
        Some(Self {
            dev,
            _backing: backing,
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}

#[test]
fn block_device_slot_capacity_and_flash() {
    let Some(lo) = Loop::attach(1 << 20) else {
        println!("SKIPPED block_device_slot_capacity_and_flash: losetup unavailable (needs root)");
        return;
    };
    let mut dpu = Dpu::new();
    dpu.slots.b = Slot::block_device(&lo.dev).unwrap();
    assert_eq!(dpu.slots.b.capacity, 1 << 20);
    let too_big =
        Image::parse(build_image(&payload((1 << 20) + 1, 40), &params(65536), &key()).unwrap())
            .unwrap();
    let vm = too_big.verify(&trust(), None).unwrap();
    assert!(matches!(
        SlotWriter::open(&dpu.slots, &dpu.boot, SlotId::B, vm),
        Err(SlotError::TooSmall { .. })
    ));
    let p = payload(700_000, 41);
    let r = dpu
        .deploy(build_image(&p, &params(65536), &key()).unwrap(), None)
        .unwrap();
    assert_eq!(r.flashed.slot, SlotId::B);
    let mut dev = vec![0u8; p.len()];
    std::io::Read::read_exact(&mut std::fs::File::open(&lo.dev).unwrap(), &mut dev).unwrap();
    assert_eq!(dev, p);
    dpu.assert_active_untouched();
}
