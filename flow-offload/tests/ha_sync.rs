//! The pair's replication stream (`ha::sync`) over a simulated link with seeded loss,
//! reordering, duplication and delay, in virtual time: the standby ends equal to the active,
//! no older version ever overwrites a newer one, lost acks cause only duplicates, a term change
//! and a snapshot under live traffic converge, and the send window holds. Plus golden bytes of
//! every wire message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::ops::Bound::{Excluded, Unbounded};

use flow_offload::ha::sync::{
    Ack, Batch, Event, Heartbeat, ReadyState, Replicated, SnapshotChunk, SnapshotEnd,
    SnapshotRequest, SnapshotSource, Stamped, SyncConfig, SyncError, SyncMessage, SyncReceiver,
    SyncSender, Version,
};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------------

/// The simulation's record: a key and a value that changes with every upsert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Rec {
    id: u32,
    val: u64,
}

impl Replicated for Rec {
    type Key = u32;
    fn key(&self) -> u32 {
        self.id
    }
}

/// The golden tests' record: one byte of key, one of value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Tiny {
    id: u8,
    on: bool,
}

impl Replicated for Tiny {
    type Key = u8;
    fn key(&self) -> u8 {
        self.id
    }
}

// ---------------------------------------------------------------------------------------------
// Golden bytes (postcard: variant index and integers as varints, u8 and bool as one byte)
// ---------------------------------------------------------------------------------------------

fn golden(msg: SyncMessage<Tiny>, bytes: &[u8]) {
    let enc = postcard::to_allocvec(&msg).unwrap();
    assert_eq!(enc, bytes, "encoding of {msg:?}");
    let dec: SyncMessage<Tiny> = postcard::from_bytes(bytes).unwrap();
    assert_eq!(dec, msg);
}

#[test]
fn golden_batch() {
    golden(
        SyncMessage::Batch(Batch {
            term: 3,
            first_seq: 10,
            events: vec![Event::Upsert(Tiny { id: 7, on: true }), Event::Delete(9)],
        }),
        &[
            0x00, // variant 0: Batch
            0x03, // term
            0x0A, // first_seq
            0x02, // 2 events
            0x00, 0x07, 0x01, // Upsert(Tiny { id: 7, on: true })
            0x01, 0x09, // Delete(9)
        ],
    );
}

#[test]
fn golden_ack() {
    golden(
        SyncMessage::Ack(Ack {
            term: 3,
            upto_seq: 300,
        }),
        &[0x01, 0x03, 0xAC, 0x02], // variant 1, term, 300 as a varint
    );
}

#[test]
fn golden_snapshot_request() {
    golden(
        SyncMessage::SnapshotRequest(SnapshotRequest {
            id: 5,
            from_chunk: 2,
        }),
        &[0x02, 0x05, 0x02],
    );
}

#[test]
fn golden_snapshot_chunk() {
    golden(
        SyncMessage::SnapshotChunk(SnapshotChunk {
            id: 5,
            index: 1,
            start: Version::new(3, 10),
            read_at: Version::new(3, 12),
            expected: Some(2),
            records: vec![Tiny { id: 1, on: false }],
        }),
        &[
            0x03, // variant 3: SnapshotChunk
            0x05, // id
            0x01, // index
            0x03, 0x0A, // start (3, 10)
            0x03, 0x0C, // read_at (3, 12)
            0x01, 0x02, // expected Some(2)
            0x01, 0x01, 0x00, // 1 record: Tiny { id: 1, on: false }
        ],
    );
}

#[test]
fn golden_snapshot_end() {
    golden(
        SyncMessage::SnapshotEnd(SnapshotEnd {
            id: 5,
            index: 2,
            start: Version::new(3, 10),
            end: Version::new(3, 14),
            records: 2,
        }),
        &[0x04, 0x05, 0x02, 0x03, 0x0A, 0x03, 0x0E, 0x02],
    );
}

#[test]
fn golden_heartbeat() {
    golden(
        SyncMessage::Heartbeat(Heartbeat {
            term: 3,
            last_seq: 14,
            snapshot: 5,
            resync: true,
        }),
        &[0x05, 0x03, 0x0E, 0x05, 0x01],
    );
}

#[test]
fn golden_ready_state() {
    let s = ReadyState::Syncing {
        received: 1,
        expected: None,
        lag: 2,
    };
    assert_eq!(postcard::to_allocvec(&s).unwrap(), [0x00, 0x01, 0x00, 0x02]);
    assert_eq!(postcard::to_allocvec(&ReadyState::Ready).unwrap(), [0x01]);
}

// ---------------------------------------------------------------------------------------------
// Plain cases
// ---------------------------------------------------------------------------------------------

fn cfg() -> SyncConfig {
    SyncConfig {
        max_batch: 4,
        window: 8,
        max_queue: 16,
        rto_ns: 10,
        heartbeat_ns: 100,
        chunk_records: 4,
        snapshot_window: 2,
        reorder_window: 8,
        max_tombstones: 64,
    }
}

fn up(id: u32, val: u64) -> Event<Rec> {
    Event::Upsert(Rec { id, val })
}

#[test]
fn config_is_validated() {
    let bad = SyncConfig {
        max_queue: 4,
        ..cfg()
    };
    assert!(matches!(
        SyncSender::<Rec>::new(bad, 1),
        Err(SyncError::Config(_))
    ));
    let bad = SyncConfig {
        max_batch: 0,
        ..cfg()
    };
    assert!(SyncReceiver::<Rec>::new(bad, 0).is_err());
}

#[test]
fn full_queue_refuses_and_flags_resync() {
    let mut tx = SyncSender::<Rec>::new(cfg(), 1).unwrap();
    for i in 0..16 {
        assert_eq!(tx.push(up(i, 1)).unwrap(), u64::from(i) + 1);
    }
    assert_eq!(tx.push(up(99, 1)), Err(SyncError::Full { limit: 16 }));
    assert!(tx.needs_resync());
    assert_eq!(tx.stats().full, 1);
    assert!(tx.poll_heartbeat(0).unwrap().resync);
    // Only the window goes out: two batches of four.
    let b1 = tx.poll_transmit(0).unwrap();
    let b2 = tx.poll_transmit(0).unwrap();
    assert_eq!((b1.first_seq, b1.events.len()), (1, 4));
    assert_eq!((b2.first_seq, b2.events.len()), (5, 4));
    assert!(tx.poll_transmit(0).is_none());
    assert_eq!(tx.in_flight_events(), 8);
    let lag = tx.lag(7);
    assert_eq!((lag.events, lag.oldest_age_ns), (16, 7));
}

#[test]
fn selective_retransmission_and_cumulative_ack() {
    let mut tx = SyncSender::<Rec>::new(cfg(), 1).unwrap();
    let mut rx = SyncReceiver::<Rec>::new(cfg(), 0).unwrap();
    for i in 0..8 {
        tx.push(up(i, 1)).unwrap();
    }
    let b1 = tx.poll_transmit(0).unwrap();
    let b2 = tx.poll_transmit(5).unwrap();
    // b1 is lost; b2 arrives and is buffered.
    let (out, ack) = rx.on_batch(b2, 6);
    assert!(out.is_empty());
    assert_eq!(ack.upto_seq, 0);
    assert_eq!(rx.pending(), 4);
    tx.on_ack(ack).unwrap();
    // Only b1's timer has expired at 10: it alone is resent.
    let again = tx.poll_transmit(10).unwrap();
    assert_eq!(again, b1);
    assert!(tx.poll_transmit(10).is_none());
    let (out, ack) = rx.on_batch(again, 11);
    assert_eq!(out.len(), 8, "the resent batch unblocks the buffered one");
    assert_eq!(ack.upto_seq, 8);
    tx.on_ack(ack).unwrap();
    assert_eq!(tx.in_flight_events(), 0);
    assert!(tx.poll_transmit(100).is_none());
    assert_eq!(tx.stats().retransmitted_batches, 1);
}

#[test]
fn older_term_is_refused_and_newer_term_resets() {
    let mut rx = SyncReceiver::<Rec>::new(cfg(), 0).unwrap();
    let batch = |term, first_seq, events| Batch {
        term,
        first_seq,
        events,
    };
    let (out, ack) = rx.on_batch(batch(2, 1, vec![up(1, 1), up(2, 1)]), 0);
    assert_eq!(
        (out.len(), ack),
        (
            2,
            Ack {
                term: 2,
                upto_seq: 2
            }
        )
    );
    // A stale active's batch: refused, and the ack tells it the newer term.
    let (out, ack) = rx.on_batch(batch(1, 3, vec![up(1, 9)]), 1);
    assert!(out.is_empty());
    assert_eq!(
        ack,
        Ack {
            term: 2,
            upto_seq: 2
        }
    );
    assert_eq!(rx.stats().old_term, 1);
    let mut stale = SyncSender::<Rec>::new(cfg(), 1).unwrap();
    stale.push(up(1, 9)).unwrap();
    stale.poll_transmit(0).unwrap();
    assert_eq!(
        stale.on_ack(ack),
        Err(SyncError::StaleTerm { ours: 1, theirs: 2 })
    );
    // A new term starts at seq 1; what term 2 synced stays until overwritten.
    let (out, ack) = rx.on_batch(batch(3, 1, vec![up(1, 5)]), 2);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].version, Version::new(3, 1));
    assert_eq!(
        ack,
        Ack {
            term: 3,
            upto_seq: 1
        }
    );
    assert_eq!(rx.version_of(&2), Some(Version::new(2, 2)));
    assert_eq!(rx.version_of(&1), Some(Version::new(3, 1)));
}

#[test]
fn start_term_renumbers_unacknowledged_changes() {
    let mut tx = SyncSender::<Rec>::new(cfg(), 4).unwrap();
    for i in 0..6 {
        tx.push(up(i, 1)).unwrap();
    }
    tx.poll_transmit(0).unwrap();
    tx.on_ack(Ack {
        term: 4,
        upto_seq: 2,
    })
    .unwrap();
    assert_eq!(
        tx.start_term(4),
        Err(SyncError::TermNotNewer { current: 4, new: 4 })
    );
    tx.start_term(6).unwrap();
    assert_eq!(tx.version(), Version::new(6, 4));
    let b = tx.poll_transmit(1).unwrap();
    assert_eq!((b.term, b.first_seq), (6, 1));
    assert_eq!(b.events[0], up(2, 1));
}

/// Moves every message across (no loss) for `rounds` rounds of 1 ns each, from `now`.
fn exchange(
    tx: &mut SyncSender<Rec>,
    rx: &mut SyncReceiver<Rec>,
    table: &BTreeMap<u32, Rec>,
    pos: &mut Option<u32>,
    now: u64,
    mirror: &mut BTreeMap<u32, Rec>,
) {
    for now in now..now + 100 {
        let mut msgs = Vec::new();
        while let Some(b) = tx.poll_transmit(now) {
            msgs.push(SyncMessage::Batch(b));
        }
        let mut walk = Walk { table, pos };
        while let Some(m) = tx.poll_snapshot(&mut walk, now) {
            msgs.push(m);
        }
        if let Some(h) = tx.poll_heartbeat(now) {
            msgs.push(SyncMessage::Heartbeat(h));
        }
        for m in msgs {
            let (out, reply) = rx.handle(m, now);
            for st in out {
                match st.event {
                    Event::Upsert(r) => {
                        mirror.insert(r.id, r);
                    }
                    Event::Delete(k) => {
                        mirror.remove(&k);
                    }
                }
            }
            if let Some(r) = reply {
                tx.handle(r).unwrap();
            }
        }
        if let Some(r) = rx.poll(now) {
            tx.on_snapshot_request(r);
        }
    }
}

/// A change refused for a full queue changes the active's table without a seq. The snapshot
/// that follows must still carry it: its reads are newer than those of the snapshot before,
/// even though no change was numbered in between.
#[test]
fn refused_change_reaches_the_standby_through_the_next_snapshot() {
    let c = SyncConfig {
        heartbeat_ns: 1,
        ..cfg()
    };
    let mut tx = SyncSender::<Rec>::new(c.clone(), 1).unwrap();
    let mut rx = SyncReceiver::<Rec>::new(c, 1).unwrap();
    let mut table = BTreeMap::from([(1, Rec { id: 1, val: 1 })]);
    let (mut pos, mut mirror) = (None, BTreeMap::new());
    // The standby asks; the active fills its queue (nothing sent yet) before the walk reads
    // key 1, then changes key 1 once more: refused.
    tx.on_snapshot_request(rx.poll(0).unwrap());
    for i in 100..116 {
        table.insert(i, Rec { id: i, val: 1 });
        tx.push(up(i, 1)).unwrap();
    }
    let chunk = tx
        .poll_snapshot(
            &mut Walk {
                table: &table,
                pos: &mut pos,
            },
            0,
        )
        .unwrap();
    rx.handle(chunk, 0);
    let read = rx.version_of(&1).unwrap();
    table.insert(1, Rec { id: 1, val: 2 });
    assert!(tx.push(up(1, 2)).is_err());
    // The heartbeat tells the standby; it asks again and the new snapshot reads key 1 anew.
    exchange(&mut tx, &mut rx, &table, &mut pos, 10, &mut mirror);
    assert!(rx.ready_state().is_ready() && !tx.needs_resync());
    assert_eq!(mirror.get(&1), Some(&Rec { id: 1, val: 2 }));
    assert_eq!(rx.stats().snapshot_restarts, 1);
    assert!(rx.version_of(&1).unwrap() > read);
}

/// The standby's acknowledgement of a snapshot's end reaches the active after its term
/// changed: it must not start that snapshot again (which would cut the stream at a point the
/// standby, done with it, never skips to).
#[test]
fn end_acknowledged_across_a_term_change_does_not_restart_the_snapshot() {
    let c = SyncConfig {
        heartbeat_ns: 1,
        ..cfg()
    };
    let mut tx = SyncSender::<Rec>::new(c.clone(), 3).unwrap();
    let mut rx = SyncReceiver::<Rec>::new(c, 1).unwrap();
    let table: BTreeMap<u32, Rec> = (0..6).map(|i| (i, Rec { id: i, val: 1 })).collect();
    let (mut pos, mut mirror) = (None, BTreeMap::new());
    tx.on_snapshot_request(rx.poll(0).unwrap());
    let mut last_ack = None;
    let mut walk = Walk {
        table: &table,
        pos: &mut pos,
    };
    while let Some(m) = tx.poll_snapshot(&mut walk, 0) {
        let (out, reply) = rx.handle(m, 0);
        for st in out {
            if let Event::Upsert(r) = st.event {
                mirror.insert(r.id, r);
            }
        }
        match reply {
            Some(SyncMessage::SnapshotRequest(r)) if r.from_chunk >= 2 => last_ack = Some(r),
            Some(r) => tx.handle(r).unwrap(),
            None => {}
        }
        walk = Walk {
            table: &table,
            pos: &mut pos,
        };
    }
    assert!(rx.ready_state().is_ready());
    // The end's acknowledgement is late: the term changes first.
    tx.push(up(9, 1)).unwrap();
    tx.start_term(4).unwrap();
    let acked = tx.acked();
    tx.on_snapshot_request(last_ack.unwrap());
    assert_eq!(tx.acked(), acked, "the stream was cut");
    assert_eq!(tx.stats().snapshots, 1);
    let mut table = table;
    table.insert(9, Rec { id: 9, val: 1 });
    exchange(&mut tx, &mut rx, &table, &mut pos, 10, &mut mirror);
    assert!(rx.ready_state().is_ready() && tx.peer_state().is_ready());
    assert_eq!((rx.term(), rx.delivered()), (4, tx.last_seq()));
    assert_eq!(mirror, table);
}

// ---------------------------------------------------------------------------------------------
// The simulated link
// ---------------------------------------------------------------------------------------------

const MS: u64 = 1_000_000;

/// SplitMix64: tiny, seeded, good enough to drive a simulation.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    /// True with probability `per_mille` / 1000.
    fn chance(&mut self, per_mille: u32) -> bool {
        self.below(1000) < u64::from(per_mille)
    }
}

/// One direction: each message is encoded with postcard, then lost, duplicated and delayed
/// (uniformly in `[min_delay, max_delay]`, which reorders) by the seeded generator.
struct Link {
    rng: Rng,
    loss: u32,
    dup: u32,
    min_delay: u64,
    max_delay: u64,
    up: bool,
    order: u64,
    queue: BinaryHeap<Reverse<(u64, u64, Vec<u8>)>>,
}

impl Link {
    fn new(seed: u64, loss: u32, dup: u32, min_delay: u64, max_delay: u64) -> Self {
        Link {
            rng: Rng(seed),
            loss,
            dup,
            min_delay,
            max_delay: max_delay.max(min_delay),
            up: true,
            order: 0,
            queue: BinaryHeap::new(),
        }
    }

    fn send(&mut self, now: u64, msg: &SyncMessage<Rec>) {
        if !self.up {
            return;
        }
        let bytes = postcard::to_allocvec(msg).unwrap();
        let copies = if self.rng.chance(self.dup) { 2 } else { 1 };
        for _ in 0..copies {
            if self.rng.chance(self.loss) {
                continue;
            }
            let at = now + self.min_delay + self.rng.below(self.max_delay - self.min_delay + 1);
            self.order += 1;
            self.queue.push(Reverse((at, self.order, bytes.clone())));
        }
    }

    fn due(&mut self, now: u64) -> Vec<SyncMessage<Rec>> {
        let mut out = Vec::new();
        while self
            .queue
            .peek()
            .is_some_and(|Reverse((at, _, _))| *at <= now)
        {
            let Reverse((_, _, bytes)) = self.queue.pop().unwrap();
            out.push(postcard::from_bytes(&bytes).unwrap());
        }
        out
    }
}

/// The snapshot cursor: a position in the key order of the active's table.
struct Walk<'a> {
    table: &'a BTreeMap<u32, Rec>,
    pos: &'a mut Option<u32>,
}

impl SnapshotSource<Rec> for Walk<'_> {
    fn rewind(&mut self) {
        *self.pos = None;
    }
    fn next_chunk(&mut self, max: usize, out: &mut Vec<Rec>) -> bool {
        let from = match *self.pos {
            None => Unbounded,
            Some(p) => Excluded(p),
        };
        for (k, r) in self.table.range((from, Unbounded)).take(max) {
            out.push(r.clone());
            *self.pos = Some(*k);
        }
        match *self.pos {
            None => true,
            Some(p) => self.table.range((Excluded(p), Unbounded)).next().is_none(),
        }
    }
    fn len_hint(&self) -> Option<u64> {
        Some(self.table.len() as u64)
    }
}

#[derive(Debug, Clone)]
struct Params {
    seed: u64,
    loss_fwd: u32,
    loss_back: u32,
    dup: u32,
    max_delay_ms: u64,
    keys: u64,
    /// Per mille of changes that are deletes (of a present key).
    deletes: u32,
    cfg: SyncConfig,
}

/// Active and standby with a link each way, in 1 ms steps of virtual time.
struct Sim {
    cfg: SyncConfig,
    now: u64,
    rng: Rng,
    tx: SyncSender<Rec>,
    rx: Option<SyncReceiver<Rec>>,
    fwd: Link,
    back: Link,
    keys: u64,
    deletes: u32,
    counter: u64,
    cursor: Option<u32>,
    /// The active's table.
    truth: BTreeMap<u32, Rec>,
    /// The standby's table, built only from what the receiver hands out.
    mirror: BTreeMap<u32, Rec>,
    /// Newest version ever applied per key (never forgotten).
    applied: BTreeMap<u32, Version>,
    /// Every version applied, in order.
    log: Vec<Stamped<Rec>>,
    /// Last seq of the current term that touched each key.
    touched: BTreeMap<u32, Version>,
    /// The sender's last version when it emitted the end of each snapshot, by id.
    ends: BTreeMap<u64, Version>,
}

impl Sim {
    fn new(p: &Params, with_receiver: bool) -> Self {
        let mut rng = Rng(p.seed);
        let fwd = Link::new(rng.next(), p.loss_fwd, p.dup, MS, p.max_delay_ms * MS);
        let back = Link::new(rng.next(), p.loss_back, p.dup, MS, p.max_delay_ms * MS);
        Sim {
            cfg: p.cfg.clone(),
            now: 0,
            tx: SyncSender::new(p.cfg.clone(), 1 + rng.below(5)).unwrap(),
            rx: with_receiver.then(|| SyncReceiver::new(p.cfg.clone(), 1).unwrap()),
            rng,
            fwd,
            back,
            keys: p.keys.max(1),
            deletes: p.deletes,
            counter: 0,
            cursor: None,
            truth: BTreeMap::new(),
            mirror: BTreeMap::new(),
            applied: BTreeMap::new(),
            log: Vec::new(),
            touched: BTreeMap::new(),
            ends: BTreeMap::new(),
        }
    }

    fn op(&mut self) {
        let k = self.rng.below(self.keys) as u32;
        let event = if self.truth.contains_key(&k) && self.rng.chance(self.deletes) {
            self.truth.remove(&k);
            Event::Delete(k)
        } else {
            self.counter += 1;
            let r = Rec {
                id: k,
                val: self.counter,
            };
            self.truth.insert(k, r.clone());
            Event::Upsert(r)
        };
        match self.tx.push(event) {
            Ok(seq) => {
                self.touched.insert(k, Version::new(self.tx.term(), seq));
            }
            Err(SyncError::Full { .. }) => {}
            Err(e) => panic!("push: {e}"),
        }
    }

    fn apply(&mut self, out: Vec<Stamped<Rec>>) {
        for st in out {
            let k = st.event.key();
            if let Some(prev) = self.applied.get(&k) {
                assert!(
                    *prev < st.version,
                    "key {k}: version {:?} applied after {prev:?}",
                    st.version
                );
            }
            self.applied.insert(k, st.version);
            match &st.event {
                Event::Upsert(r) => {
                    self.mirror.insert(k, r.clone());
                }
                Event::Delete(_) => {
                    self.mirror.remove(&k);
                }
            }
            self.log.push(st);
        }
    }

    /// One millisecond: `ops` changes, then everything due on both sides.
    fn step(&mut self, ops: usize) {
        self.now += MS;
        let now = self.now;
        for _ in 0..ops {
            self.op();
        }
        while let Some(b) = self.tx.poll_transmit(now) {
            assert!(
                b.last_seq() - self.tx.acked() <= self.cfg.window as u64,
                "batch up to {} with {} acknowledged exceeds the window {}",
                b.last_seq(),
                self.tx.acked(),
                self.cfg.window
            );
            assert!(self.tx.in_flight_events() <= self.cfg.window);
            self.fwd.send(now, &SyncMessage::Batch(b));
        }
        let mut walk = Walk {
            table: &self.truth,
            pos: &mut self.cursor,
        };
        while let Some(m) = self.tx.poll_snapshot(&mut walk, now) {
            if let SyncMessage::SnapshotEnd(e) = &m {
                self.ends.entry(e.id).or_insert(self.tx.version());
            }
            self.fwd.send(now, &m);
        }
        if let Some(h) = self.tx.poll_heartbeat(now) {
            self.fwd.send(now, &SyncMessage::Heartbeat(h));
        }
        if let Some(rx) = self.rx.as_mut() {
            let mut applied = Vec::new();
            for m in self.fwd.due(now) {
                let (out, reply) = rx.handle(m, now);
                applied.extend(out);
                if let Some(r) = reply {
                    self.back.send(now, &r);
                }
            }
            if let Some(req) = rx.poll(now) {
                self.back.send(now, &SyncMessage::SnapshotRequest(req));
            }
            self.apply(applied);
        } else {
            self.fwd.due(now);
        }
        for m in self.back.due(now) {
            self.tx.handle(m).unwrap();
        }
    }

    fn rx(&self) -> &SyncReceiver<Rec> {
        self.rx.as_ref().unwrap()
    }

    fn converged(&self) -> bool {
        let rx = self.rx();
        self.tx.lag(self.now).events == 0
            && !self.tx.needs_resync()
            && self.tx.peer_state() == ReadyState::Ready
            && rx.ready_state() == ReadyState::Ready
            && rx.term() == self.tx.term()
            && rx.delivered() == self.tx.last_seq()
    }

    /// Runs without changes until both ends agree; at most `max_ms`.
    fn settle(&mut self, max_ms: u64) -> Result<(), TestCaseError> {
        for _ in 0..max_ms {
            if self.converged() {
                break;
            }
            self.step(0);
        }
        prop_assert!(
            self.converged(),
            "not converged after {max_ms} ms: {:?} / {:?}",
            self.tx,
            self.rx()
        );
        prop_assert_eq!(&self.mirror, &self.truth);
        Ok(())
    }

    /// At the moment the receiver turns Ready: every key no change beyond the applied seq
    /// touched equals the active's.
    fn check_ready_consistent(&self) -> Result<(), TestCaseError> {
        let rx = self.rx();
        let applied = Version::new(rx.term(), rx.delivered());
        let ended = self.ends.values().max().copied().unwrap_or_default();
        prop_assert!(
            applied >= ended,
            "Ready with the stream applied up to {:?}, before the snapshot's end {:?}",
            applied,
            ended
        );
        let keys = self.truth.keys().chain(self.mirror.keys());
        for k in keys {
            if self.touched.get(k).is_some_and(|v| *v > applied) {
                continue;
            }
            prop_assert_eq!(
                self.mirror.get(k),
                self.truth.get(k),
                "key {} differs at Ready (applied up to {:?})",
                k,
                applied
            );
        }
        Ok(())
    }
}

fn sync_config() -> impl Strategy<Value = SyncConfig> {
    (
        1usize..48,
        1usize..6,
        1usize..8,
        1u64..60,
        1usize..64,
        1usize..5,
    )
        .prop_map(|(max_batch, windows, queues, rto_ms, chunk, snap_win)| {
            let window = max_batch * windows;
            SyncConfig {
                max_batch,
                window,
                max_queue: window * queues * 4,
                rto_ns: rto_ms * MS,
                heartbeat_ns: 20 * MS,
                chunk_records: chunk,
                snapshot_window: snap_win,
                reorder_window: window,
                max_tombstones: 1 << 12,
            }
        })
}

fn params() -> impl Strategy<Value = Params> {
    (
        any::<u64>(),
        0u32..300,
        0u32..300,
        0u32..200,
        1u64..40,
        1u64..400,
        0u32..500,
        sync_config(),
    )
        .prop_map(
            |(seed, loss_fwd, loss_back, dup, max_delay_ms, keys, deletes, cfg)| Params {
                seed,
                loss_fwd,
                loss_back,
                dup,
                max_delay_ms,
                keys,
                deletes,
                cfg,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Changes flow under loss, reordering and duplication (acks too); the standby ends equal,
    /// versions only grow per key (checked on every applied change), the window holds.
    #[test]
    fn converges_under_loss_reordering_duplication(
        p in params(),
        steps in 100usize..1500,
        rate in 0usize..6,
        tombstones in prop_oneof![Just(2usize), Just(1 << 12)],
    ) {
        let mut p = p;
        p.cfg.max_tombstones = tombstones;
        let mut sim = Sim::new(&p, true);
        for _ in 0..steps {
            let ops = sim.rng.below(rate as u64 * 2 + 1) as usize;
            sim.step(ops);
        }
        sim.settle(600_000)?;
    }

    /// Only acks are lost (and the data is reordered): every change is applied exactly once,
    /// in seq order; the losses show only as duplicates at the receiver.
    #[test]
    fn lost_acks_cause_only_duplicates(
        p in params(),
        steps in 200usize..1500,
    ) {
        let mut p = p;
        p.loss_fwd = 0;
        p.dup = 0;
        p.loss_back = p.loss_back.max(100);
        p.cfg.max_queue = 1 << 20;
        let mut sim = Sim::new(&p, true);
        sim.settle(600_000)?; // the initial (empty) snapshot
        let before = sim.log.len();
        let first_seq = sim.tx.last_seq() + 1;
        for _ in 0..steps {
            let ops = sim.rng.below(4) as usize;
            sim.step(ops);
        }
        sim.settle(600_000)?;
        let term = sim.tx.term();
        let seqs: Vec<Version> = sim.log[before..].iter().map(|s| s.version).collect();
        let want: Vec<Version> =
            (first_seq..=sim.tx.last_seq()).map(|s| Version::new(term, s)).collect();
        prop_assert_eq!(seqs, want);
        let rx = sim.rx().stats();
        prop_assert_eq!(rx.snapshot_restarts, 0);
        prop_assert_eq!(rx.stale, 0);
        prop_assert_eq!(sim.tx.stats().full, 0);
    }

    /// The active's term changes once or twice mid-stream (same sender, new lease): the stream
    /// restarts at seq 1 of the new term and the standby still ends equal.
    #[test]
    fn term_change_midway(
        p in params(),
        steps in 200usize..1500,
        changes in proptest::collection::vec((0usize..1500, 1u64..4), 1..3),
    ) {
        let mut sim = Sim::new(&p, true);
        for i in 0..steps {
            for (at, by) in &changes {
                if *at == i {
                    let t = sim.tx.term() + by;
                    sim.tx.start_term(t).unwrap();
                }
            }
            let ops = sim.rng.below(6) as usize;
            sim.step(ops);
        }
        sim.settle(600_000)?;
    }

    /// A standby joins (fresh, or with stale records from an earlier role) while the active
    /// has a full table and changes keep coming: it reaches Ready while they flow, is
    /// consistent at that moment, and ends equal.
    #[test]
    fn snapshot_while_live_events_flow(
        p in params(),
        initial in 200usize..4000,
        stale in 0u64..300,
        small_queue in any::<bool>(),
    ) {
        let mut p = p;
        p.loss_fwd = p.loss_fwd.min(150);
        p.loss_back = p.loss_back.min(150);
        p.keys = p.keys.max(50) * 4;
        p.deletes = p.deletes.min(300);
        // Enough window for one change per millisecond over the slowest link.
        p.cfg.window = p.cfg.window.max(512);
        p.cfg.reorder_window = p.cfg.window;
        p.cfg.max_queue = if small_queue { p.cfg.window * 2 } else { 1 << 16 };
        p.cfg.chunk_records = p.cfg.chunk_records.max(16);
        let mut sim = Sim::new(&p, false);
        // The active alone: the link is down, its queue may overflow.
        sim.fwd.up = false;
        for _ in 0..initial {
            sim.op();
        }
        for _ in 0..50 {
            sim.step(1);
        }
        // The standby arrives, maybe with leftovers from an earlier role.
        sim.fwd.up = true;
        let mut rx = SyncReceiver::new(p.cfg.clone(), sim.now).unwrap();
        for i in 0..stale {
            let k = (sim.rng.below(p.keys * 2)) as u32;
            rx.seed(k, Version::default());
            sim.mirror.insert(k, Rec { id: k, val: u64::MAX - i });
            sim.applied.insert(k, Version::default());
        }
        sim.rx = Some(rx);
        let full_before = sim.tx.stats().full;
        let mut ready_at = None;
        for _ in 0..400_000 {
            sim.step(1);
            if sim.rx().ready_state().is_ready() {
                ready_at = Some(sim.now);
                break;
            }
        }
        prop_assert!(ready_at.is_some(), "never Ready under live changes: {:?}", sim.rx());
        if sim.tx.stats().full == full_before {
            sim.check_ready_consistent()?;
        }
        prop_assert!(!sim.ends.is_empty());
        // Changes keep flowing after Ready, then stop.
        for _ in 0..300 {
            sim.step(1);
        }
        sim.settle(600_000)?;
    }
}
