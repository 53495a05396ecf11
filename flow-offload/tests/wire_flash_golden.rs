//! The image-flash messages of the host↔DPU link: golden bytes (variant indexes are appended
//! after `Heartbeat`, so older messages keep their encoding) and round trips.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use flow_offload::wire::frame::FrameCodec;
use flow_offload::wire::{
    BootOutcome, BootReport, FlashFailure, FlashImage, FlashPhase, FlashStatus, Message, SlotName,
};

#[test]
fn flash_progress_golden_bytes() {
    let m = Message::Flash(FlashStatus {
        image_id: [1; 32],
        phase: FlashPhase::Progress { done: 3, total: 9 },
    });
    let mut want = vec![7u8]; // Message::Flash
    want.extend_from_slice(&[1; 32]); // the id, a fixed array: no length
    want.extend_from_slice(&[1, 3, 9]); // FlashPhase::Progress, done, total (varints)
    assert_eq!(postcard::to_allocvec(&m).unwrap(), want);
    // The messages before them did not move.
    assert_eq!(
        postcard::to_allocvec(&Message::Heartbeat { seq: 1 }).unwrap(),
        [5, 1]
    );
}

#[test]
fn flash_messages_round_trip_through_frames() {
    let msgs = vec![
        Message::FlashImage(FlashImage {
            image_id: [9; 32],
            manifest: b"{\"format\":1}".to_vec(),
            signature: vec![0xAB; 64],
            server_port: 40_000,
            streams: 4,
            tries: 3,
            activate: true,
        }),
        Message::Flash(FlashStatus {
            image_id: [2; 32],
            phase: FlashPhase::Started {
                slot: SlotName::B,
                total: 100,
                resumed: 40,
            },
        }),
        Message::Flash(FlashStatus {
            image_id: [2; 32],
            phase: FlashPhase::Flashed {
                slot: SlotName::A,
                tries: 2,
                fetches: 61,
                refetches: 1,
                resumed: 40,
            },
        }),
        Message::Flash(FlashStatus {
            image_id: [2; 32],
            phase: FlashPhase::Failed {
                failure: FlashFailure::Refused,
                message: "unknown key".into(),
            },
        }),
        Message::Boot(BootReport {
            running: SlotName::A,
            active: SlotName::A,
            pending: Some((SlotName::B, 2)),
            last: BootOutcome::RolledBack {
                failed: SlotName::B,
                to: SlotName::A,
                reason: "health command exit status: 1".into(),
            },
            images: vec![(SlotName::A, [3; 32])],
        }),
    ];
    let codec = FrameCodec::default();
    for m in msgs {
        let mut buf = Vec::new();
        codec.encode(&m, &mut buf).unwrap();
        let (back, used) = codec.decode::<Message>(&buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(back, m);
    }
}
