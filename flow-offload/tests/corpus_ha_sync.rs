//! Replays the `ha_sync` fuzz seed corpus (and every prefix of each file) through
//! `fuzz_sync`, so the seeds run under `cargo test` without a fuzzer; plus arbitrary and
//! mutated bytes. `cargo test --test corpus_ha_sync -- --ignored write_seeds` rewrites the
//! seeds (a real sender's stream: batches, snapshot, heartbeats, acks).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::Ipv4Addr;
use std::path::PathBuf;

use flow_offload::ha::fuzz::{fuzz_sync, FuzzRecord};
use flow_offload::ha::sync::{Ack, Batch, Event, SyncMessage};
use flow_offload::soft::nat::{LifetimeClass, Proto, SessionRecord, TcpState};
use flow_offload::wire::frame::FrameCodec;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/ha_sync")
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

fn record(i: u32, proto: Proto) -> FuzzRecord {
    let tcp = proto == Proto::Tcp;
    (
        i,
        SessionRecord {
            proto,
            inside: (Ipv4Addr::new(10, 0, 0, 2), 40000 + i as u16),
            outside: (Ipv4Addr::new(203, 0, 113, 1), 1024 + i as u16),
            remote: (Ipv4Addr::new(198, 51, 100, 7), 443),
            tcp_state: tcp.then_some(TcpState::Established),
            lifetime: if tcp {
                LifetimeClass::TcpEstablished
            } else {
                LifetimeClass::Udp
            },
            idle_ns: 1_000_000,
            established_for_ns: Some(5_000_000_000),
        },
    )
}

/// Back-to-back postcard messages (the harness's unframed mode).
fn raw(msgs: &[SyncMessage<FuzzRecord>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        out.extend_from_slice(&postcard::to_allocvec(m).unwrap());
    }
    out
}

fn frames(msgs: &[SyncMessage<FuzzRecord>]) -> Vec<u8> {
    let codec = FrameCodec::default();
    let mut out = Vec::new();
    for m in msgs {
        codec.encode(m, &mut out).unwrap();
    }
    out
}

#[test]
#[ignore]
fn write_seeds() {
    let batch = |term, first_seq, events| {
        SyncMessage::Batch(Batch {
            term,
            first_seq,
            events,
        })
    };
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "batch-upserts",
            frames(&[batch(
                1,
                1,
                (0..4)
                    .map(|i| {
                        Event::Upsert(record(i, if i % 2 == 0 { Proto::Tcp } else { Proto::Udp }))
                    })
                    .collect(),
            )]),
        ),
        (
            "batch-then-delete",
            frames(&[
                batch(1, 1, vec![Event::Upsert(record(1, Proto::Tcp))]),
                batch(1, 2, vec![Event::Delete(1)]),
            ]),
        ),
        (
            "reordered",
            frames(&[
                batch(1, 3, vec![Event::Upsert(record(3, Proto::Udp))]),
                batch(
                    1,
                    1,
                    vec![
                        Event::Upsert(record(1, Proto::Udp)),
                        Event::Upsert(record(2, Proto::Tcp)),
                    ],
                ),
            ]),
        ),
        (
            "term-change",
            frames(&[
                batch(1, 1, vec![Event::Upsert(record(1, Proto::Tcp))]),
                batch(2, 1, vec![Event::Upsert(record(1, Proto::Udp))]),
                batch(1, 2, vec![Event::Delete(1)]),
            ]),
        ),
        (
            "ack",
            frames(&[SyncMessage::Ack(Ack {
                term: 1,
                upto_seq: 3,
            })]),
        ),
        (
            "raw-stream",
            raw(&[
                batch(
                    1,
                    1,
                    vec![
                        Event::Upsert(record(1, Proto::Tcp)),
                        Event::Upsert(record(2, Proto::Udp)),
                    ],
                ),
                batch(1, 3, vec![Event::Delete(1)]),
                SyncMessage::Ack(Ack {
                    term: 1,
                    upto_seq: 3,
                }),
                batch(2, 1, vec![Event::Upsert(record(2, Proto::Tcp))]),
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
        seeds.len() >= 5,
        "expected at least 5 seeds, found {}",
        seeds.len()
    );
    for data in seeds {
        for end in 0..=data.len() {
            fuzz_sync(&data[..end]);
        }
    }
}

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_do_not_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
        fuzz_sync(&data);
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
        fuzz_sync(&data);
    }
}
