#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! The pair's replication stream (`flow_offload::ha::sync`) in memory, every message through
//! the host↔DPU frame codec (`FrameCodec::default()`: postcard payload, CRC-32C, 12-byte
//! header) both ways, on one thread.
//!
//! `cargo bench -p bench --bench ha_sync`
//!
//! The record: a NAT session binding, `((vpc, proto, src, sport, dst, dport), (nat_ip,
//! nat_port, state, expires_ns))`: about 31 bytes per change in a framed batch of 256.
//! - `ha_sync/stream_64k`: 65 536 session changes (a 100k-session key space: 70 % upserts,
//!   30 % deletes of a live session) pushed in bursts of 256, batched (256 per batch), framed,
//!   decoded, applied by the receiver (its version map), acknowledged (the ack framed and
//!   decoded too). Issue 12's goal: at least 200k changes/s on one core.
//! - `ha_sync/catch_up_1m`: a fresh standby takes a snapshot of a 1M-session table: request,
//!   chunks of 1024 read from the active's table (8 in flight), framed, decoded, applied,
//!   acknowledged, until the receiver is Ready. Goal: at most 10 s.
//!
//! Applying the handed-out changes to the standby's own table is not included (the caller's
//! table, whatever it is). Besides criterion's estimates, the medians over the samples are
//! printed.

use std::cell::RefCell;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use flow_offload::ha::sync::{
    Event, SnapshotSource, SyncConfig, SyncMessage, SyncReceiver, SyncSender,
};
use flow_offload::wire::frame::FrameCodec;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

type Key = (u32, u8, u32, u16, u32, u16);
type Binding = (u32, u16, u8, u64);
type Session = (Key, Binding);

const KEYS: usize = 100_000;
const STREAM: usize = 1 << 16;
const BURST: usize = 256;
const TABLE: usize = 1_000_000;

fn key(i: usize) -> Key {
    let i = i as u32;
    (
        1 + (i % 4),
        if i.is_multiple_of(3) { 17 } else { 6 },
        0x0a00_0000 | (i * 7919) & 0x00ff_ffff,
        1024 + (i % 60_000) as u16,
        0xcb00_7100 | (i % 251),
        443,
    )
}

fn binding(i: usize, t: u64) -> Binding {
    (
        0xc633_6400 | (i as u32 % 4),
        1024 + (i % 64_000) as u16,
        (t % 5) as u8,
        t * 1_000_000_000,
    )
}

/// A stream of changes over the key space: 70 % upserts, 30 % deletes of a live key.
fn changes(n: usize, seed: u64) -> Vec<Event<Session>> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut live = vec![false; KEYS];
    (0..n)
        .map(|t| {
            let i = rng.gen_range(0..KEYS);
            if live[i] && rng.gen_ratio(3, 10) {
                live[i] = false;
                Event::Delete(key(i))
            } else {
                live[i] = true;
                Event::Upsert((key(i), binding(i, t as u64)))
            }
        })
        .collect()
}

/// The active's table as a snapshot source: a walk by index.
struct Table<'a> {
    rows: &'a [Session],
    pos: usize,
}

impl SnapshotSource<Session> for Table<'_> {
    fn rewind(&mut self) {
        self.pos = 0;
    }
    fn next_chunk(&mut self, max: usize, out: &mut Vec<Session>) -> bool {
        let end = (self.pos + max).min(self.rows.len());
        out.extend_from_slice(&self.rows[self.pos..end]);
        self.pos = end;
        end == self.rows.len()
    }
    fn len_hint(&self) -> Option<u64> {
        Some(self.rows.len() as u64)
    }
}

/// One hop over the wire: framed, then decoded from the frame.
fn hop(codec: &FrameCodec, buf: &mut Vec<u8>, msg: &SyncMessage<Session>) -> SyncMessage<Session> {
    buf.clear();
    codec.encode(msg, buf).unwrap();
    let (back, used) = codec.decode::<SyncMessage<Session>>(buf).unwrap().unwrap();
    debug_assert_eq!(used, buf.len());
    back
}

fn config() -> SyncConfig {
    SyncConfig {
        max_batch: 256,
        chunk_records: 1024,
        ..SyncConfig::default()
    }
}

/// A sender and a receiver that finished the (empty) initial snapshot.
fn pair() -> (SyncSender<Session>, SyncReceiver<Session>) {
    let codec = FrameCodec::default();
    let mut buf = Vec::new();
    let mut tx = SyncSender::new(config(), 1).unwrap();
    let mut rx = SyncReceiver::new(config(), 1).unwrap();
    let req = rx.poll(1).unwrap();
    tx.handle(hop(&codec, &mut buf, &SyncMessage::SnapshotRequest(req)))
        .unwrap();
    let mut empty = Table { rows: &[], pos: 0 };
    while let Some(m) = tx.poll_snapshot(&mut empty, 2) {
        let (_, reply) = rx.handle(hop(&codec, &mut buf, &m), 2);
        if let Some(r) = reply {
            tx.handle(hop(&codec, &mut buf, &r)).unwrap();
        }
    }
    assert!(rx.ready_state().is_ready() && tx.peer_state().is_ready());
    (tx, rx)
}

/// Pushes `events` in bursts and moves everything across until all is acknowledged; returns
/// the changes applied.
fn stream(
    tx: &mut SyncSender<Session>,
    rx: &mut SyncReceiver<Session>,
    codec: &FrameCodec,
    buf: &mut Vec<u8>,
    events: &[Event<Session>],
    now: &mut u64,
) -> usize {
    let mut applied = 0;
    for burst in events.chunks(BURST) {
        for e in burst {
            tx.push(e.clone()).unwrap();
        }
        *now += 1_000;
        while let Some(b) = tx.poll_transmit(*now) {
            let (out, ack) = rx.handle(hop(codec, buf, &SyncMessage::Batch(b)), *now);
            applied += out.len();
            black_box(&out);
            tx.handle(hop(codec, buf, &ack.unwrap())).unwrap();
        }
    }
    assert_eq!(tx.lag(*now).events, 0);
    applied
}

/// A fresh standby takes the whole table; returns the records applied.
fn catch_up(rows: &[Session], codec: &FrameCodec, buf: &mut Vec<u8>) -> usize {
    let mut tx = SyncSender::<Session>::new(config(), 7).unwrap();
    let mut rx = SyncReceiver::<Session>::new(config(), 1).unwrap();
    let mut table = Table { rows, pos: 0 };
    let mut applied = 0;
    let now = 10;
    let req = rx.poll(now).unwrap();
    tx.handle(hop(codec, buf, &SyncMessage::SnapshotRequest(req)))
        .unwrap();
    while !rx.ready_state().is_ready() {
        let mut sent = false;
        while let Some(m) = tx.poll_snapshot(&mut table, now) {
            sent = true;
            let (out, reply) = rx.handle(hop(codec, buf, &m), now);
            applied += out.len();
            black_box(&out);
            if let Some(r) = reply {
                tx.handle(hop(codec, buf, &r)).unwrap();
            }
        }
        assert!(sent, "snapshot stalled: {rx:?}");
    }
    applied
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn benches(c: &mut Criterion) {
    let codec = FrameCodec::default();
    let mut buf = Vec::with_capacity(64 << 10);

    // --- stream ---
    let events = changes(STREAM * 4, 0x5eed);
    let (mut tx, mut rx) = pair();
    let mut now = 10u64;
    let mut round = 0usize;
    let mut frame = Vec::new();
    codec
        .encode(
            &SyncMessage::Batch(flow_offload::ha::sync::Batch {
                term: 1,
                first_seq: 1,
                events: events[..256].to_vec(),
            }),
            &mut frame,
        )
        .unwrap();
    eprintln!(
        "ha_sync: a batch of 256 changes = {} bytes framed ({:.1} bytes/change)",
        frame.len(),
        frame.len() as f64 / 256.0
    );
    let per_change = RefCell::new(Vec::new());
    {
        let mut g = c.benchmark_group("ha_sync");
        g.throughput(Throughput::Elements(STREAM as u64));
        g.bench_function("stream_64k", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let slice = &events[(round % 4) * STREAM..(round % 4 + 1) * STREAM];
                    round += 1;
                    let t0 = Instant::now();
                    let n = stream(&mut tx, &mut rx, &codec, &mut buf, slice, &mut now);
                    total += t0.elapsed();
                    black_box(n);
                }
                per_change
                    .borrow_mut()
                    .push(total.as_secs_f64() / (iters as f64 * STREAM as f64));
                total
            })
        });
        g.finish();
    }
    let m = median(&mut per_change.borrow_mut());
    eprintln!(
        "ha_sync/stream_64k median: {:.0} ns/change, {:.0} changes/s (goal >= 200000); receiver holds {} sessions, {:?}",
        m * 1e9,
        1.0 / m,
        rx.len(),
        rx.stats()
    );
    drop((tx, rx, events));

    // --- catch-up ---
    let rows: Vec<Session> = (0..TABLE).map(|i| (key(i), binding(i, 1))).collect();
    let times = RefCell::new(Vec::new());
    {
        let mut g = c.benchmark_group("ha_sync");
        g.sample_size(10);
        g.sampling_mode(SamplingMode::Flat);
        g.throughput(Throughput::Elements(TABLE as u64));
        g.bench_function("catch_up_1m", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t0 = Instant::now();
                    let n = catch_up(&rows, &codec, &mut buf);
                    let dt = t0.elapsed();
                    total += dt;
                    assert_eq!(n, TABLE);
                    times.borrow_mut().push(dt.as_secs_f64());
                }
                total
            })
        });
        g.finish();
    }
    let m = median(&mut times.borrow_mut());
    eprintln!(
        "ha_sync/catch_up_1m median: {m:.3} s to Ready ({:.0} records/s; goal <= 10 s)",
        TABLE as f64 / m
    );
}

criterion_group!(ha_sync_benches, benches);
criterion_main!(ha_sync_benches);
