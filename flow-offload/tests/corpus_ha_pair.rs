//! Replays the `ha_pair` fuzz seed corpus (and every prefix of each file) through `fuzz_pair`,
//! the decoder of the DPU agents' pair connection, so the seeds run under `cargo test` without
//! a fuzzer; plus arbitrary and mutated bytes. `cargo test --test corpus_ha_pair -- --ignored
//! write_seeds` rewrites the seeds (hellos, a standby report, batches of NAPT44 and NAT64
//! sessions, a snapshot, heartbeats).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use flow_offload::ha::fuzz::{fuzz_pair, PAIR_MAX_FRAME};
use flow_offload::ha::link::{Member, PairFrame, PairHello, StandbyReport, PROTOCOL};
use flow_offload::ha::sync::{
    Batch, Event, Heartbeat, Replicated, SnapshotChunk, SnapshotEnd, SyncMessage, Version,
};
use flow_offload::model::Name;
use flow_offload::soft::nat::{
    LifetimeClass, NatSessionRecord, Proto, ReplicatedSession, SessionRecord, TcpState,
};
use flow_offload::wire::frame::FrameCodec;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/ha_pair")
}

fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut files = std::fs::read_dir(dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect::<Vec<_>>();
        files.sort();
        files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
    })
}

fn napt(i: u16) -> ReplicatedSession {
    ReplicatedSession {
        rule: Name::new("snat-a").unwrap(),
        session: NatSessionRecord::Napt44(SessionRecord {
            proto: Proto::Tcp,
            inside: (Ipv4Addr::new(10, 1, 1, 10), 40000 + i),
            outside: (Ipv4Addr::new(198, 51, 100, 16), 1024 + i),
            remote: (Ipv4Addr::new(203, 0, 113, 1), 443),
            tcp_state: Some(TcpState::Established),
            lifetime: LifetimeClass::TcpEstablished,
            idle_ns: 1_000_000,
            established_for_ns: Some(5_000_000_000),
        }),
    }
}

fn nat64(i: u16) -> ReplicatedSession {
    ReplicatedSession {
        rule: Name::new("nat64-a").unwrap(),
        session: NatSessionRecord::Nat64(SessionRecord {
            proto: Proto::Udp,
            inside: ("fd00:1::10".parse::<Ipv6Addr>().unwrap(), 50000 + i),
            outside: (Ipv4Addr::new(198, 51, 100, 24), 33000 + i),
            remote: (Ipv4Addr::new(203, 0, 113, 1), 53),
            tcp_state: None,
            lifetime: LifetimeClass::Udp,
            idle_ns: 2_000_000,
            established_for_ns: None,
        }),
    }
}

fn frames(fs: &[PairFrame]) -> Vec<u8> {
    let codec = FrameCodec::new(PAIR_MAX_FRAME);
    let mut out = Vec::new();
    for f in fs {
        codec.encode(f, &mut out).unwrap();
    }
    out
}

#[test]
#[ignore]
fn write_seeds() {
    let hello = |member, active, epoch| {
        PairFrame::Hello(PairHello {
            protocol: PROTOCOL,
            member,
            epoch,
            active,
        })
    };
    let batch = |term, first_seq, events| {
        PairFrame::Sync(SyncMessage::Batch(Batch {
            term,
            first_seq,
            events,
        }))
    };
    let v = |term, seq| Version { term, seq };
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "active-stream",
            frames(&[
                hello(Member::A, true, 7),
                batch(
                    7,
                    1,
                    vec![
                        Event::Upsert(napt(1)),
                        Event::Upsert(nat64(1)),
                        Event::Upsert(napt(2)),
                    ],
                ),
                batch(7, 4, vec![Event::Delete(napt(1).key())]),
                PairFrame::Sync(SyncMessage::Heartbeat(Heartbeat {
                    term: 7,
                    last_seq: 4,
                    snapshot: 0,
                    resync: false,
                })),
            ]),
        ),
        (
            "snapshot",
            frames(&[
                hello(Member::B, true, 9),
                PairFrame::Sync(SyncMessage::SnapshotChunk(SnapshotChunk {
                    id: 1,
                    index: 0,
                    start: v(9, 1),
                    read_at: v(9, 1),
                    expected: Some(2),
                    records: vec![napt(3), nat64(3)],
                })),
                PairFrame::Sync(SyncMessage::SnapshotEnd(SnapshotEnd {
                    id: 1,
                    index: 1,
                    start: v(9, 1),
                    end: v(9, 1),
                    records: 2,
                })),
            ]),
        ),
        (
            "standby",
            frames(&[
                hello(Member::B, false, 7),
                PairFrame::Standby(StandbyReport { ready: false }),
                PairFrame::Standby(StandbyReport { ready: true }),
            ]),
        ),
        (
            "term-change",
            frames(&[
                batch(7, 1, vec![Event::Upsert(napt(5))]),
                batch(8, 1, vec![Event::Upsert(napt(5))]),
                batch(7, 2, vec![Event::Delete(napt(5).key())]),
            ]),
        ),
    ];
    std::fs::create_dir_all(dir()).unwrap();
    for (name, bytes) in seeds {
        std::fs::write(dir().join(name), bytes).unwrap();
    }
}

#[test]
fn corpus_files_and_prefixes_do_not_panic() {
    let seeds = seeds();
    assert!(
        seeds.len() >= 4,
        "expected at least 4 seeds, found {}",
        seeds.len()
    );
    for data in seeds {
        for end in 0..=data.len() {
            fuzz_pair(&data[..end]);
        }
    }
}

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_do_not_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
        fuzz_pair(&data);
    }

    #[test]
    fn mutated_seeds_do_not_panic(
        a in proptest::prelude::any::<proptest::sample::Index>(),
        b in proptest::prelude::any::<proptest::sample::Index>(),
        edits in proptest::collection::vec(
            (proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()),
            0..6,
        ),
    ) {
        let seeds = seeds();
        let mut data = a.get(seeds).clone();
        for (at, byte) in &edits {
            if !data.is_empty() {
                let i = at.index(data.len());
                data[i] = *byte;
            }
        }
        let tail: &Vec<u8> = b.get(seeds);
        data.extend_from_slice(tail);
        fuzz_pair(&data);
    }
}
