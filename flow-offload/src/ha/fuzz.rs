//! The pair's sync input path as one function of bytes, for the `ha_sync` fuzz target and the
//! corpus test: frames from the peer decoded as [`SyncMessage`]s of NAT session records, handed
//! to a receiver and a sender, and every record the receiver delivers imported into a NAT
//! table. A hostile or broken peer must not panic the agent nor grow its memory without bound.

use core::net::Ipv4Addr;

use crate::ha::link::PairFrame;
use crate::ha::sync::{Event, SyncConfig, SyncMessage, SyncReceiver, SyncSender};
use crate::soft::nat::ReplicatedSession;
use crate::soft::nat::{AllocBlock, NatConfig, NatTable, SessionRecord, Timeouts, XorShift32};
use crate::wire::frame::{fuzz_stream, FrameCodec};

/// The record type on the sync link in the fuzz target: a key and one NAPT44 session.
pub type FuzzRecord = (u32, SessionRecord<Ipv4Addr>);

/// Decodes `data` as messages and hands each to a [`SyncReceiver`] and a [`SyncSender`],
/// importing delivered upserts into a small NAT table; time advances by a data-derived step
/// per message. Data starting with the frame magic `D` goes through a frame reader in chunks
/// (sizes derived from the data); anything else is read as back-to-back postcard messages, so
/// that the fuzzer reaches the state machines without having to forge CRCs.
pub fn fuzz_sync(data: &[u8]) {
    let cfg = SyncConfig::default();
    let Ok(mut rx) = SyncReceiver::<FuzzRecord>::new(cfg.clone(), 0) else {
        return;
    };
    let Ok(mut tx) = SyncSender::<FuzzRecord>::new(cfg, 1) else {
        return;
    };
    let nat_cfg = NatConfig {
        max_mappings: 256,
        max_sessions: 256,
        pool: vec![Ipv4Addr::new(203, 0, 113, 1), Ipv4Addr::new(203, 0, 113, 2)],
        port_range: (1024, 65535),
        timeouts: Timeouts::default(),
        block: AllocBlock::new(1, 2),
    };
    let Ok(mut nat) = NatTable::<Ipv4Addr>::new(nat_cfg, &mut XorShift32(7)) else {
        return;
    };
    let mut now = 0u64;
    let mut feed = |m: SyncMessage<FuzzRecord>, step: u8| {
        now = now.saturating_add(u64::from(step) * 1_000_000);
        let _ = tx.handle(m.clone());
        let (delivered, _reply) = rx.handle(m, now);
        for d in delivered {
            if let Event::Upsert((_, rec)) = d.event {
                let _ = nat.import(&rec, now);
            }
        }
        let _ = rx.poll(now);
        let _ = tx.poll_transmit(now);
    };
    if data.first() != Some(&b'D') {
        let mut rest = data;
        while let Ok((m, tail)) = postcard::take_from_bytes::<SyncMessage<FuzzRecord>>(rest) {
            if tail.len() == rest.len() {
                break;
            }
            feed(m, tail.first().copied().unwrap_or(1));
            rest = tail;
        }
        return;
    }
    fuzz_stream::<SyncMessage<FuzzRecord>>(data, FrameCodec::default(), feed);
}

/// The real pair connection's decoder, as the DPU agent runs it: `data` as frames of
/// [`PairFrame`]s (in [`crate::wire::frame::fuzz_chunks`]) under the agent's frame limit; the
/// replication stream of [`ReplicatedSession`]s goes to a receiver and a sender, hellos and
/// reports are read. A hostile peer must not panic the agent nor grow its memory without bound.
pub fn fuzz_pair(data: &[u8]) {
    let cfg = SyncConfig::default();
    let Ok(mut rx) = SyncReceiver::<ReplicatedSession>::new(cfg.clone(), 0) else {
        return;
    };
    let Ok(mut tx) = SyncSender::<ReplicatedSession>::new(cfg, 1) else {
        return;
    };
    let mut now = 0u64;
    fuzz_stream::<PairFrame>(data, FrameCodec::new(PAIR_MAX_FRAME), |f, step| {
        now = now.saturating_add(u64::from(step) * 1_000_000);
        match f {
            // Decoding them is the test; the runtime only compares their fields.
            PairFrame::Hello(_) | PairFrame::Standby(_) => {}
            PairFrame::Sync(m) => {
                let _ = tx.handle(m.clone());
                let (delivered, _reply) = rx.handle(m, now);
                for d in delivered {
                    let _ = d.event.key();
                }
                let _ = rx.poll(now);
                let _ = tx.poll_transmit(now);
            }
        }
    });
}

/// The largest pair frame the agent accepts (its `MAX_FRAME`).
pub const PAIR_MAX_FRAME: usize = 4 << 20;
