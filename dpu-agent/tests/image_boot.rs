//! The DPU agent's image slots without DPDK: boot attempts counted at start, the health gate
//! (commit, retry, rollback with the reason), and flash orders refused before anything is
//! written. File slots and the file boot control in a scratch directory; the full flow with the
//! real binaries is `tests/tests/image_flash_e2e.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use dpu_agent::config::ImageConfig;
use dpu_agent::image::{Gate, Images};
use flow_offload::wire::{BootOutcome, FlashFailure, FlashImage, FlashPhase, SlotName};
use images::boot::{BootControl, BootState, FileBootControl, Pending, SlotId};
use images::format::{build_image, BuildParams, Image};
use images::keys::{keygen, read_signing_key, SECRET_FILE};

static SEQ: AtomicU32 = AtomicU32::new(0);

struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let p = std::env::temp_dir().join(format!(
            "dpu-agent-image-boot-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        keygen(&p.join("keys")).unwrap();
        keygen(&p.join("other")).unwrap();
        Scratch(p)
    }

    fn config(&self, health: &[&str]) -> ImageConfig {
        ImageConfig {
            slot_a: self.0.join("slot-a"),
            slot_b: self.0.join("slot-b"),
            slot_capacity: 1 << 20,
            state_dir: self.0.join("state"),
            trusted_keys: vec![self.0.join("keys")],
            target: "t1".into(),
            health_command: health.iter().map(|s| (*s).to_owned()).collect(),
            health_timeout_secs: 5,
            checkpoint_bytes: 1 << 20,
        }
    }

    fn control(&self) -> FileBootControl {
        FileBootControl::new(self.0.join("state/boot-state.json"))
    }

    fn put_on_trial(&self, slot: SlotId, tries: u8) {
        std::fs::create_dir_all(self.0.join("state")).unwrap();
        self.control()
            .store(&BootState {
                active: slot.other(),
                pending: Some(Pending {
                    slot,
                    tries_left: tries,
                }),
            })
            .unwrap();
    }

    fn image(&self, key_dir: &str, target: &str) -> Image {
        let key = read_signing_key(&self.0.join(key_dir).join(SECRET_FILE)).unwrap();
        let p = BuildParams {
            target: target.into(),
            agent_version: "1".into(),
            chunk_size: 4096,
            created_unix: 0,
        };
        Image::parse(build_image(&[7u8; 20_000], &p, &key).unwrap()).unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn order(img: &Image, port: u16) -> FlashImage {
    FlashImage {
        image_id: img.id().0,
        manifest: img.manifest_bytes().to_vec(),
        signature: img.signature().to_vec(),
        server_port: port,
        streams: 2,
        tries: 2,
        activate: false,
    }
}

#[test]
fn unhealthy_trial_is_retried_then_rolled_back_with_its_reason() {
    let s = Scratch::new();
    s.put_on_trial(SlotId::B, 2);
    let cfg = s.config(&["false"]);
    // Boot 1 and 2: B on trial, a try used up at start, unhealthy: restart.
    for left in [1u8, 0] {
        let mut im = Images::open(&cfg).unwrap();
        assert_eq!(im.running(), SlotId::B);
        assert_eq!(
            im.report().last,
            BootOutcome::Retry {
                slot: SlotName::B,
                tries_left: left
            }
        );
        assert!(matches!(im.health_gate().unwrap(), Gate::Restart { .. }));
    }
    // Boot 3: out of tries, back on A, and the report says why.
    let mut im = Images::open(&cfg).unwrap();
    assert_eq!(im.running(), SlotId::A);
    let r = im.report();
    assert_eq!(r.active, SlotName::A);
    assert_eq!(r.pending, None);
    match &r.last {
        BootOutcome::RolledBack { failed, to, reason } => {
            assert_eq!((*failed, *to), (SlotName::B, SlotName::A));
            assert!(reason.contains("health command false"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // On the active slot a failing check is logged, never a restart loop.
    assert_eq!(im.health_gate().unwrap(), Gate::Serve);
    // The outcome survives further restarts.
    let im = Images::open(&cfg).unwrap();
    assert!(matches!(im.report().last, BootOutcome::RolledBack { .. }));
}

#[test]
fn healthy_trial_commits() {
    let s = Scratch::new();
    s.put_on_trial(SlotId::B, 1);
    let mut im = Images::open(&s.config(&["sh", "-c", "test \"$DPUCP_SLOT\" = B"])).unwrap();
    assert_eq!(im.running(), SlotId::B);
    assert_eq!(im.health_gate().unwrap(), Gate::Serve);
    let r = im.report();
    assert_eq!(r.last, BootOutcome::Committed(SlotName::B));
    assert_eq!((r.active, r.pending), (SlotName::B, None));
    assert_eq!(s.control().load().unwrap(), BootState::new(SlotId::B));
}

#[test]
fn a_crash_before_the_health_check_still_uses_up_a_try() {
    let s = Scratch::new();
    s.put_on_trial(SlotId::B, 1);
    let cfg = s.config(&[]);
    // Started, then "crashed" (dropped) before the health gate.
    drop(Images::open(&cfg).unwrap());
    let im = Images::open(&cfg).unwrap();
    assert_eq!(
        im.running(),
        SlotId::A,
        "out of tries: the boot loader picks A"
    );
    assert!(matches!(
        im.report().last,
        BootOutcome::RolledBack {
            failed: SlotName::B,
            ..
        }
    ));
}

#[test]
fn bad_orders_are_refused_before_anything_is_written() {
    let s = Scratch::new();
    let mut im = Images::open(&s.config(&[])).unwrap();
    let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let refused = |r: Result<(), flow_offload::wire::FlashStatus>| match r {
        Err(st) => match st.phase {
            FlashPhase::Failed { failure, message } => (failure, message),
            other => panic!("{other:?}"),
        },
        Ok(()) => panic!("accepted"),
    };
    let good = s.image("keys", "t1");
    // Untrusted key.
    let (f, m) = refused(im.start_flash(&order(&s.image("other", "t1"), 1), host));
    assert_eq!(f, FlashFailure::Refused);
    assert!(m.contains("key"), "{m}");
    // Wrong target.
    let (f, m) = refused(im.start_flash(&order(&s.image("keys", "t2"), 1), host));
    assert_eq!(f, FlashFailure::Refused);
    assert!(m.contains("t2"), "{m}");
    // Signature tampered with.
    let mut o = order(&good, 1);
    o.signature[0] ^= 1;
    assert_eq!(refused(im.start_flash(&o, host)).0, FlashFailure::Refused);
    // Short signature.
    let mut o = order(&good, 1);
    o.signature.truncate(10);
    assert_eq!(refused(im.start_flash(&o, host)).0, FlashFailure::Refused);
    // Manifest not the one the id names.
    let mut o = order(&good, 1);
    o.image_id[0] ^= 1;
    assert_eq!(refused(im.start_flash(&o, host)).0, FlashFailure::Refused);
    // Zero tries.
    let mut o = order(&good, 1);
    o.tries = 0;
    assert_eq!(refused(im.start_flash(&o, host)).0, FlashFailure::Refused);
    assert!(!s.0.join("slot-a").exists() && !s.0.join("slot-b").exists());
    assert!(im.drain().is_empty(), "a refusal starts nothing");

    // A server that accepts and never answers keeps a flash running: a second one is busy.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    im.start_flash(&order(&good, port), host).unwrap();
    let started = im.drain();
    assert!(
        matches!(
            started.first().map(|s| &s.phase),
            Some(FlashPhase::Started {
                slot: SlotName::B,
                ..
            })
        ),
        "{started:?}"
    );
    let (f, _) = refused(im.start_flash(&order(&good, port), host));
    assert_eq!(f, FlashFailure::Busy);
    assert!(
        !s.0.join("slot-a").exists(),
        "the active slot is never opened"
    );
}
