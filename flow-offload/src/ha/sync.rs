//! State replication from the active member of a pair to the standby: an ordered, batched,
//! acknowledged stream of versioned records, plus a bulk snapshot for a standby that joins.
//!
//! Generic over the record ([`Replicated`]): NAT bindings today, anything keyed tomorrow. Pure
//! like the rest of the crate: the agent moves [`SyncMessage`]s over its link (postcard frames)
//! and passes the time in.
//!
//! # Versions
//! Every change carries a [`Version`] `(term, seq)`, ordered lexicographically: `term` is the
//! leadership epoch from etcd, `seq` counts the changes of one term from 1. The receiver keeps
//! per key the newest version it applied and ignores anything older or equal, so a late,
//! duplicated or reordered change never overwrites newer state. A new active starts its own
//! stream at `(new term, 1)`: whatever was synced under an older term stays (its versions are
//! older than any of the new term, so the new stream overwrites it key by key) until a snapshot
//! removes what the new active does not have.
//!
//! # The stream
//! - [`SyncSender::push`] numbers a change; [`SyncSender::poll_transmit`] cuts [`Batch`]es of at
//!   most [`SyncConfig::max_batch`] changes while at most [`SyncConfig::window`] changes are in
//!   flight (sent, not acknowledged). At most [`SyncConfig::max_queue`] changes are held
//!   (unsent and in flight); beyond that `push` fails with [`SyncError::Full`] and the sender
//!   asks the standby for a new snapshot through [`Heartbeat::resync`] (the change is in the
//!   active's table, not in the stream).
//! - **Retransmission is selective, by timer**: each batch keeps its boundaries and its own
//!   timer; a batch not acknowledged [`SyncConfig::rto_ns`] after it was last sent is sent
//!   again, alone. Acknowledgements are cumulative ([`Ack`] `upto_seq`). Since the receiver
//!   buffers what arrives out of order, resending the batch that fills the hole moves the
//!   cumulative ack past everything behind it before their timers expire (if `rto_ns` exceeds
//!   a round trip); nothing is resent that was not possibly lost. A lost ack only causes a
//!   duplicate, which the receiver drops and acknowledges again.
//! - **Out of order**: the receiver applies changes strictly in seq order. It buffers changes
//!   up to [`SyncConfig::reorder_window`] seqs ahead of the next expected one and drops those
//!   further ahead (the sender's timer brings them back). With `reorder_window >= window`
//!   nothing the sender may have in flight is ever dropped.
//! - A batch of an older term is refused (counted) and answered with an [`Ack`] of the
//!   receiver's newer term, which tells a stale sender that it is stale
//!   ([`SyncError::StaleTerm`]). A batch of a newer term resets the expected seq to 1.
//!
//! # Terms
//! The same active re-acquiring its lease calls [`SyncSender::start_term`]: its
//! unacknowledged changes are renumbered from seq 1 of the new term, in order, so nothing is
//! lost (the standby may get some twice, under newer versions). A receiver seeing a newer
//! term keeps everything it applied, expects seq 1, drops what it buffered, and restarts a
//! snapshot it had not finished (the sender abandons a snapshot in progress at `start_term`,
//! and flags [`Heartbeat::resync`] unless the standby was Ready); a Ready receiver stays
//! Ready. A member that becomes standby under a *different* active starts a fresh receiver
//! (with [`SyncReceiver::seed`] for what its table still holds): it is not Ready before its
//! snapshot, which also removes what the new active does not have.
//!
//! # Snapshot
//! A standby that joins or rejoins asks for one ([`SnapshotRequest`]; a fresh
//! [`SyncReceiver`] asks by itself). The sender then:
//! 1. takes the next seq for itself, `start`, and drops every change it still held: the
//!    snapshot covers them (the table it walks already contains them). Because of that seq,
//!    everything the snapshot reads is strictly newer than anything read or sent before, even
//!    where refused changes ([`SyncError::Full`]) changed the table without a seq of their
//!    own (an equal version would be ignored);
//! 2. walks the table through a caller-supplied cursor ([`SnapshotSource`]), chunk by chunk,
//!    each chunk stamped with `read_at`, the version the table was at when it was read; the
//!    live stream continues meanwhile, from `start + 1`;
//! 3. ends with [`SnapshotEnd`] carrying `end`, its last assigned version at that moment.
//!
//! The receiver applies a chunk's records as upserts at `read_at`, so a live change of the
//! same key and a chunk record are ordered by version whichever arrives first. On the first
//! chunk it skips its expected seq forward past `start`. At the end it removes every key
//! whose version is older than `start`: the sender's table did not have it when the walk
//! started, and nothing since re-created it. It is **Ready** ([`ReadyState::Ready`]) once the
//! snapshot is complete *and* the stream is applied up to `end`; Ready stays until a new
//! snapshot is needed. Chunks travel with their own index, acknowledged cumulatively by the
//! receiver's next [`SnapshotRequest`] (`from_chunk`), retransmitted by the sender's per-chunk
//! timers; the receiver takes chunks in order only (go-back-N: a chunk is large, and at most
//! [`SyncConfig::snapshot_window`] are in flight).
//!
//! Snapshot ids come from the receiver and only grow (a new receiver starts from its creation
//! time). The sender starts a snapshot only for an id above every one it started, with
//! `from_chunk` 0: starting cuts the stream at `start`, so a late duplicate, or an
//! acknowledgement that crossed a term change, must never start one the receiver is done with.
//!
//! # Tombstones
//! A delete leaves a tombstone (its key and version) only while a snapshot is in progress:
//! its one purpose is to stop a chunk record read *before* the delete from resurrecting the
//! key. Stream changes cannot do that: they are applied in seq order, and anything at or below
//! the acknowledged watermark, or of an older term, is dropped before the version check. So a
//! tombstone is dropped once the chunks have passed it (a chunk with `read_at` at or above the
//! tombstone's version: later chunks are read later still), and all of them when the snapshot
//! ends; outside snapshots a delete simply forgets the key. Deletes that arrived before the
//! request need none (the walk starts after them). At most [`SyncConfig::max_tombstones`] are
//! kept: beyond, the receiver restarts the snapshot rather than forget one it may need.
//!
//! # Memory
//! Sender: at most `max_queue` changes and `snapshot_window` chunks. Receiver: one entry per
//! live key, at most `reorder_window` buffered changes and `max_tombstones` tombstones.

use core::fmt;
use std::collections::btree_map::Entry as MapEntry;
use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// A record replicated from the active member to the standby.
pub trait Replicated: Clone {
    /// What identifies the record: a later version of the same key replaces it.
    type Key: Ord + Clone;
    /// The record's key.
    fn key(&self) -> Self::Key;
}

/// A key with its value, the shape of a map entry, is a record keyed by its first element.
impl<K: Ord + Clone, V: Clone> Replicated for (K, V) {
    type Key = K;
    fn key(&self) -> K {
        self.0.clone()
    }
}

/// When a change was made: ordered by term (leadership epoch), then seq (change number within
/// the term, from 1).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Version {
    /// Leadership epoch (the etcd leader key's revision).
    pub term: u64,
    /// Change number within the term, from 1; 0 means "before any change of the term".
    pub seq: u64,
}

impl Version {
    /// A version.
    pub const fn new(term: u64, seq: u64) -> Self {
        Version { term, seq }
    }
}

/// One change of the replicated table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(
    serialize = "R: Serialize, R::Key: Serialize",
    deserialize = "R: Deserialize<'de>, R::Key: Deserialize<'de>"
))]
pub enum Event<R: Replicated> {
    /// The record is created or replaced.
    Upsert(R),
    /// The record of this key is removed.
    Delete(R::Key),
}

impl<R: Replicated> Event<R> {
    /// The key the change is about.
    pub fn key(&self) -> R::Key {
        match self {
            Event::Upsert(r) => r.key(),
            Event::Delete(k) => k.clone(),
        }
    }
}

/// A change with its version: what the receiver hands to the caller to apply.
#[derive(Clone, PartialEq, Eq)]
pub struct Stamped<R: Replicated> {
    /// The change's version.
    pub version: Version,
    /// The change.
    pub event: Event<R>,
}

impl<R: Replicated + fmt::Debug> fmt::Debug for Stamped<R>
where
    R::Key: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stamped")
            .field("version", &self.version)
            .field("event", &self.event)
            .finish()
    }
}

/// Consecutive changes of one term: the `i`-th has seq `first_seq + i`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(
    serialize = "R: Serialize, R::Key: Serialize",
    deserialize = "R: Deserialize<'de>, R::Key: Deserialize<'de>"
))]
pub struct Batch<R: Replicated> {
    /// The sender's term.
    pub term: u64,
    /// Seq of the first change.
    pub first_seq: u64,
    /// The changes, in seq order.
    pub events: Vec<Event<R>>,
}

impl<R: Replicated> Batch<R> {
    /// Seq of the last change (`first_seq - 1` when empty).
    pub fn last_seq(&self) -> u64 {
        (self.first_seq + self.events.len() as u64).saturating_sub(1)
    }
}

impl<R: Replicated + fmt::Debug> fmt::Debug for Batch<R>
where
    R::Key: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("term", &self.term)
            .field("first_seq", &self.first_seq)
            .field("events", &self.events)
            .finish()
    }
}

/// Receiver → sender: every change of `term` up to `upto_seq` is applied (cumulative).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The receiver's term.
    pub term: u64,
    /// Highest seq applied in order.
    pub upto_seq: u64,
}

/// Receiver → sender: start snapshot `id`, or (same `id`) chunks before `from_chunk` arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// Chosen by the receiver, increasing: an id above every one the sender started, with
    /// `from_chunk` 0, starts a snapshot (replacing the one in progress).
    pub id: u64,
    /// Index of the next chunk the receiver needs (cumulative acknowledgement).
    pub from_chunk: u32,
}

/// Sender → receiver: records of snapshot `id` as they were at `read_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotChunk<R> {
    /// The snapshot.
    pub id: u64,
    /// Position in the snapshot, from 0.
    pub index: u32,
    /// The version the snapshot took when it started (newer than anything before it).
    pub start: Version,
    /// The sender's last version when these records were read.
    pub read_at: Version,
    /// Records the walk is expected to visit in all, if the source knows.
    pub expected: Option<u64>,
    /// The records.
    pub records: Vec<R>,
}

/// Sender → receiver: snapshot `id` is complete after `index` chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEnd {
    /// The snapshot.
    pub id: u64,
    /// Its position (the number of chunks before it).
    pub index: u32,
    /// The version the snapshot took when it started (newer than anything before it).
    pub start: Version,
    /// The sender's last version when the walk ended: Ready needs the stream up to here.
    pub end: Version,
    /// Records sent in all.
    pub records: u64,
}

/// Sender → receiver, every [`SyncConfig::heartbeat_ns`]: liveness and where the stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The sender's term.
    pub term: u64,
    /// Its last assigned seq.
    pub last_seq: u64,
    /// The id of the last snapshot it started (0: none).
    pub snapshot: u64,
    /// Changes were refused ([`SyncError::Full`]) since that snapshot started: the receiver
    /// needs a new one.
    pub resync: bool,
}

/// Everything on the sync link. New variants go at the end (postcard encodes the index).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(
    serialize = "R: Serialize, R::Key: Serialize",
    deserialize = "R: Deserialize<'de>, R::Key: Deserialize<'de>"
))]
pub enum SyncMessage<R: Replicated> {
    /// Sender → receiver: changes.
    Batch(Batch<R>),
    /// Receiver → sender: cumulative acknowledgement.
    Ack(Ack),
    /// Receiver → sender: start, or acknowledge, a snapshot.
    SnapshotRequest(SnapshotRequest),
    /// Sender → receiver: snapshot records.
    SnapshotChunk(SnapshotChunk<R>),
    /// Sender → receiver: the snapshot is complete.
    SnapshotEnd(SnapshotEnd),
    /// Sender → receiver: liveness.
    Heartbeat(Heartbeat),
}

impl<R: Replicated + fmt::Debug> fmt::Debug for SyncMessage<R>
where
    R::Key: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyncMessage::Batch(b) => f.debug_tuple("Batch").field(b).finish(),
            SyncMessage::Ack(a) => f.debug_tuple("Ack").field(a).finish(),
            SyncMessage::SnapshotRequest(r) => f.debug_tuple("SnapshotRequest").field(r).finish(),
            SyncMessage::SnapshotChunk(c) => f.debug_tuple("SnapshotChunk").field(c).finish(),
            SyncMessage::SnapshotEnd(e) => f.debug_tuple("SnapshotEnd").field(e).finish(),
            SyncMessage::Heartbeat(h) => f.debug_tuple("Heartbeat").field(h).finish(),
        }
    }
}

/// Whether a standby holds what the active holds, with the numbers an operator needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadyState {
    /// Not yet (or no longer).
    Syncing {
        /// Snapshot records received so far.
        received: u64,
        /// Snapshot records expected, if the sender's source knows.
        expected: Option<u64>,
        /// Stream changes the sender made that are not applied (acknowledged) yet.
        lag: u64,
    },
    /// Snapshot complete and the stream applied past its end: a switchover may proceed.
    Ready,
}

impl ReadyState {
    /// `true` for [`ReadyState::Ready`].
    pub fn is_ready(&self) -> bool {
        matches!(self, ReadyState::Ready)
    }
}

/// What can go wrong on the sync link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// The sender holds `limit` unacknowledged changes; the change was not queued.
    #[error("sync queue full ({limit} changes held): the standby needs a snapshot")]
    Full {
        /// [`SyncConfig::max_queue`].
        limit: usize,
    },
    /// The peer has seen a newer term: this member is not the active any more.
    #[error("peer is at term {theirs}, newer than ours ({ours})")]
    StaleTerm {
        /// Our term.
        ours: u64,
        /// The peer's.
        theirs: u64,
    },
    /// [`SyncSender::start_term`] with a term that is not newer.
    #[error("term {new} is not newer than the current term {current}")]
    TermNotNewer {
        /// The current term.
        current: u64,
        /// The refused one.
        new: u64,
    },
    /// A configuration value out of range.
    #[error("invalid sync configuration: {0}")]
    Config(&'static str),
}

/// Tuning of both ends of the link (each end reads the fields it needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncConfig {
    /// Changes per batch, at most: chosen so that a batch of the largest records fits a frame.
    pub max_batch: usize,
    /// Changes in flight (sent, not acknowledged), at most.
    pub window: usize,
    /// Changes held by the sender (unsent and in flight), at most; `push` beyond is
    /// [`SyncError::Full`].
    pub max_queue: usize,
    /// A batch or chunk not acknowledged this long after it was sent is sent again; the
    /// receiver also repeats an unanswered snapshot request after this long.
    pub rto_ns: u64,
    /// Heartbeat period of the sender.
    pub heartbeat_ns: u64,
    /// Records per snapshot chunk, at most (sized to a frame, like `max_batch`).
    pub chunk_records: usize,
    /// Snapshot chunks in flight, at most.
    pub snapshot_window: usize,
    /// Receiver: changes buffered ahead of the next expected seq, at most.
    pub reorder_window: usize,
    /// Receiver: tombstones kept during a snapshot, at most (beyond, the snapshot restarts).
    pub max_tombstones: usize,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            max_batch: 256,
            window: 8192,
            max_queue: 1 << 16,
            rto_ns: 200_000_000,
            heartbeat_ns: 1_000_000_000,
            chunk_records: 1024,
            snapshot_window: 8,
            reorder_window: 8192,
            max_tombstones: 1 << 16,
        }
    }
}

impl SyncConfig {
    /// Checks that every bound is usable.
    pub fn validate(&self) -> Result<(), SyncError> {
        let checks = [
            (self.max_batch == 0, "max_batch must be at least 1"),
            (self.window == 0, "window must be at least 1"),
            (
                self.max_queue < self.window,
                "max_queue must be at least window",
            ),
            (self.rto_ns == 0, "rto_ns must be positive"),
            (self.heartbeat_ns == 0, "heartbeat_ns must be positive"),
            (self.chunk_records == 0, "chunk_records must be at least 1"),
            (
                self.snapshot_window == 0,
                "snapshot_window must be at least 1",
            ),
            (
                self.max_tombstones == 0,
                "max_tombstones must be at least 1",
            ),
        ];
        match checks.iter().find(|(bad, _)| *bad) {
            Some((_, why)) => Err(SyncError::Config(why)),
            None => Ok(()),
        }
    }
}

/// The table a snapshot walks, seen through the caller's cursor. The cursor keeps its own
/// position (it must not borrow the table across calls the table changes between).
///
/// The walk must return every key present for its whole duration at least once, each as it is
/// at the time of the call; keys created or deleted during the walk may be returned or not
/// (the live stream carries them).
pub trait SnapshotSource<R> {
    /// Starts a new walk from the beginning.
    fn rewind(&mut self);
    /// Appends at most `max` records to `out`; returns `true` when the walk is complete.
    fn next_chunk(&mut self, max: usize, out: &mut Vec<R>) -> bool;
    /// Records the walk will visit in all, if known (shown to operators).
    fn len_hint(&self) -> Option<u64> {
        None
    }
}

/// How far behind the standby is, as the sender sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lag {
    /// Changes pushed but not acknowledged.
    pub events: u64,
    /// Time since the oldest unacknowledged change was first sent (0 if none was sent).
    pub oldest_age_ns: u64,
}

/// What a sender has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SenderStats {
    /// Changes accepted by `push`.
    pub pushed: u64,
    /// Changes refused by `push` ([`SyncError::Full`]).
    pub full: u64,
    /// Batches sent the first time.
    pub batches: u64,
    /// Batches sent again after their timer expired.
    pub retransmitted_batches: u64,
    /// Changes in those.
    pub retransmitted_events: u64,
    /// Acks that moved the watermark.
    pub acks: u64,
    /// Acks at or below the watermark (lost or reordered acks, duplicates).
    pub duplicate_acks: u64,
    /// Acks of an older term, ignored.
    pub old_term_acks: u64,
    /// Acks of a seq never sent, ignored.
    pub bogus_acks: u64,
    /// Acks of a newer term ([`SyncError::StaleTerm`]).
    pub newer_term_acks: u64,
    /// Terms started with [`SyncSender::start_term`].
    pub term_changes: u64,
    /// Changes dropped because a snapshot covers them.
    pub covered_by_snapshot: u64,
    /// Snapshots started.
    pub snapshots: u64,
    /// Snapshot chunks (and ends) sent the first time.
    pub snapshot_chunks: u64,
    /// Snapshot chunks (and ends) sent again.
    pub snapshot_retransmits: u64,
    /// Snapshot requests of an older id, ignored.
    pub stale_snapshot_requests: u64,
    /// Messages a sender does not take (batches, chunks, heartbeats), ignored.
    pub unexpected: u64,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    first: u64,
    len: usize,
    sent_at: u64,
    first_sent_at: u64,
}

struct ChunkInFlight<R: Replicated> {
    index: u32,
    records: u64,
    sent_at: u64,
    msg: SyncMessage<R>,
}

struct SnapshotTx<R: Replicated> {
    id: u64,
    start: Version,
    rewound: bool,
    walk_done: bool,
    end: Option<Version>,
    next_index: u32,
    acked_upto: u32,
    records_sent: u64,
    records_acked: u64,
    expected: Option<u64>,
    in_flight: VecDeque<ChunkInFlight<R>>,
    done: bool,
}

/// The active member's end of the link.
pub struct SyncSender<R: Replicated> {
    cfg: SyncConfig,
    term: u64,
    /// Highest acknowledged seq; `events[i]` has seq `acked + 1 + i`.
    acked: u64,
    /// First seq never sent.
    next_send: u64,
    events: VecDeque<Event<R>>,
    in_flight: VecDeque<InFlight>,
    in_flight_events: usize,
    snapshot: Option<SnapshotTx<R>>,
    last_snapshot_id: u64,
    resync: bool,
    peer_ready: bool,
    last_heartbeat: Option<u64>,
    stats: SenderStats,
}

impl<R: Replicated> fmt::Debug for SyncSender<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncSender")
            .field("term", &self.term)
            .field("acked", &self.acked)
            .field("last_seq", &self.last_seq())
            .field("in_flight_events", &self.in_flight_events)
            .field("snapshot", &self.snapshot.as_ref().map(|s| s.id))
            .field("resync", &self.resync)
            .field("peer_ready", &self.peer_ready)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<R: Replicated> SyncSender<R> {
    /// A sender for leadership epoch `term`; its first change gets seq 1.
    pub fn new(config: SyncConfig, term: u64) -> Result<Self, SyncError> {
        config.validate()?;
        Ok(SyncSender {
            cfg: config,
            term,
            acked: 0,
            next_send: 1,
            events: VecDeque::new(),
            in_flight: VecDeque::new(),
            in_flight_events: 0,
            snapshot: None,
            last_snapshot_id: 0,
            resync: false,
            peer_ready: false,
            last_heartbeat: None,
            stats: SenderStats::default(),
        })
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// The last assigned version.
    pub fn version(&self) -> Version {
        Version::new(self.term, self.last_seq())
    }

    /// The last assigned seq.
    pub fn last_seq(&self) -> u64 {
        self.acked + self.events.len() as u64
    }

    /// The acknowledged watermark.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Changes sent and not acknowledged (never more than [`SyncConfig::window`]).
    pub fn in_flight_events(&self) -> usize {
        self.in_flight_events
    }

    /// Changes refused since the last snapshot started: the standby misses something.
    pub fn needs_resync(&self) -> bool {
        self.resync
    }

    /// Counters.
    pub fn stats(&self) -> &SenderStats {
        &self.stats
    }

    /// Queues a change after the caller applied it to its table; returns its seq.
    ///
    /// A full queue refuses it ([`SyncError::Full`]) and marks the standby as needing a
    /// snapshot ([`Heartbeat::resync`]); the caller counts it and carries on.
    pub fn push(&mut self, event: Event<R>) -> Result<u64, SyncError> {
        if self.events.len() >= self.cfg.max_queue {
            self.stats.full += 1;
            self.resync = true;
            self.peer_ready = false;
            return Err(SyncError::Full {
                limit: self.cfg.max_queue,
            });
        }
        self.events.push_back(event);
        self.stats.pushed += 1;
        Ok(self.last_seq())
    }

    /// The next batch to send, if any: first a batch whose timer expired, else new changes as
    /// far as the window allows. Call until `None`.
    pub fn poll_transmit(&mut self, now_ns: u64) -> Option<Batch<R>> {
        let rto = self.cfg.rto_ns;
        if let Some(f) = self
            .in_flight
            .iter_mut()
            .find(|f| now_ns >= f.sent_at.saturating_add(rto))
        {
            f.sent_at = now_ns;
            let (first, len) = (f.first, f.len);
            self.stats.retransmitted_batches += 1;
            self.stats.retransmitted_events += len as u64;
            return Some(self.batch(first, len));
        }
        let unsent = (self.last_seq() + 1).saturating_sub(self.next_send) as usize;
        let room = self.cfg.window.saturating_sub(self.in_flight_events);
        let len = self.cfg.max_batch.min(unsent).min(room);
        if len == 0 {
            return None;
        }
        let first = self.next_send;
        self.next_send += len as u64;
        self.in_flight.push_back(InFlight {
            first,
            len,
            sent_at: now_ns,
            first_sent_at: now_ns,
        });
        self.in_flight_events += len;
        self.stats.batches += 1;
        Some(self.batch(first, len))
    }

    fn batch(&self, first: u64, len: usize) -> Batch<R> {
        let off = (first - self.acked - 1) as usize;
        Batch {
            term: self.term,
            first_seq: first,
            events: self.events.range(off..off + len).cloned().collect(),
        }
    }

    /// Takes a cumulative acknowledgement. An ack of a newer term means the peer follows a
    /// newer active: [`SyncError::StaleTerm`], and this member must stop acting as active.
    pub fn on_ack(&mut self, ack: Ack) -> Result<(), SyncError> {
        if ack.term > self.term {
            self.stats.newer_term_acks += 1;
            return Err(SyncError::StaleTerm {
                ours: self.term,
                theirs: ack.term,
            });
        }
        if ack.term < self.term {
            self.stats.old_term_acks += 1;
            return Ok(());
        }
        if ack.upto_seq >= self.next_send {
            self.stats.bogus_acks += 1;
            return Ok(());
        }
        if ack.upto_seq <= self.acked {
            self.stats.duplicate_acks += 1;
            return Ok(());
        }
        self.stats.acks += 1;
        self.release_upto(ack.upto_seq);
        self.check_peer_ready();
        Ok(())
    }

    /// Forgets every change up to `seq` (acknowledged or covered by a snapshot).
    fn release_upto(&mut self, seq: u64) {
        let n = (seq - self.acked) as usize;
        self.events.drain(..n.min(self.events.len()));
        self.acked = seq;
        self.next_send = self.next_send.max(seq + 1);
        while let Some(f) = self.in_flight.front_mut() {
            let last = f.first + f.len as u64 - 1;
            if last <= seq {
                self.in_flight_events -= f.len;
                self.in_flight.pop_front();
            } else {
                if f.first <= seq {
                    let cut = (seq + 1 - f.first) as usize;
                    f.first += cut as u64;
                    f.len -= cut;
                    self.in_flight_events -= cut;
                }
                break;
            }
        }
    }

    /// How far behind the standby is.
    pub fn lag(&self, now_ns: u64) -> Lag {
        Lag {
            events: self.events.len() as u64,
            oldest_age_ns: self
                .in_flight
                .front()
                .map_or(0, |f| now_ns.saturating_sub(f.first_sent_at)),
        }
    }

    /// Starts a new leadership epoch on the same sender (the lease was re-acquired). The
    /// unacknowledged changes are renumbered, in order, as the first changes of the new term,
    /// so the standby misses nothing (those it already has arrive again as duplicates of
    /// content, under newer versions). A snapshot in progress is abandoned and, unless the
    /// standby was Ready, [`Heartbeat::resync`] asks it for a new one.
    pub fn start_term(&mut self, term: u64) -> Result<(), SyncError> {
        if term <= self.term {
            return Err(SyncError::TermNotNewer {
                current: self.term,
                new: term,
            });
        }
        self.term = term;
        self.acked = 0;
        self.next_send = 1;
        self.in_flight.clear();
        self.in_flight_events = 0;
        // The run in progress cannot continue (its versions are of the old term): the standby
        // needs a new one, unless it is Ready already.
        if self.snapshot.take().is_some() && !self.peer_ready {
            self.resync = true;
        }
        self.stats.term_changes += 1;
        Ok(())
    }

    /// Takes a snapshot request: an id above every one started before (with `from_chunk` 0)
    /// starts a snapshot, replacing one in progress; the current id acknowledges chunks;
    /// anything else is stale.
    pub fn on_snapshot_request(&mut self, req: SnapshotRequest) {
        match &mut self.snapshot {
            Some(s) if req.id == s.id => {
                // Nothing beyond what was sent can be acknowledged.
                let upto = req.from_chunk.min(s.next_index);
                while s.in_flight.front().is_some_and(|c| c.index < upto) {
                    if let Some(c) = s.in_flight.pop_front() {
                        s.records_acked += c.records;
                    }
                }
                s.acked_upto = s.acked_upto.max(upto);
                if s.end.is_some() && s.acked_upto >= s.next_index {
                    s.done = true;
                }
                self.check_peer_ready();
            }
            // Ids are never reused: whatever is not new is a late duplicate, or the
            // acknowledgement of a run `start_term` abandoned.
            _ if req.id > self.last_snapshot_id && req.from_chunk == 0 => {
                self.start_snapshot(req.id)
            }
            _ => self.stats.stale_snapshot_requests += 1,
        }
    }

    fn start_snapshot(&mut self, id: u64) {
        // The snapshot takes a seq of its own: whatever it reads is then strictly newer than
        // anything read or sent before it, even where refused changes ([`SyncError::Full`])
        // changed the table without a seq. The receiver skips that seq.
        let last = self.last_seq();
        self.stats.covered_by_snapshot += self.events.len() as u64;
        self.release_upto(last);
        self.acked = last + 1;
        self.next_send = last + 2;
        let start = Version::new(self.term, last + 1);
        self.resync = false;
        self.peer_ready = false;
        self.last_snapshot_id = id;
        self.stats.snapshots += 1;
        self.snapshot = Some(SnapshotTx {
            id,
            start,
            rewound: false,
            walk_done: false,
            end: None,
            next_index: 0,
            acked_upto: 0,
            records_sent: 0,
            records_acked: 0,
            expected: None,
            in_flight: VecDeque::new(),
            done: false,
        });
    }

    /// The next snapshot message to send, if a snapshot is in progress: a chunk whose timer
    /// expired, else the next chunk read from `source` (or the end), as far as
    /// [`SyncConfig::snapshot_window`] allows. Call until `None`, after
    /// [`SyncSender::poll_transmit`] (the live stream goes first).
    pub fn poll_snapshot(
        &mut self,
        source: &mut impl SnapshotSource<R>,
        now_ns: u64,
    ) -> Option<SyncMessage<R>> {
        let version = self.version();
        let (rto, window, max) = (
            self.cfg.rto_ns,
            self.cfg.snapshot_window,
            self.cfg.chunk_records,
        );
        let s = self.snapshot.as_mut()?;
        if s.done {
            return None;
        }
        if !s.rewound {
            source.rewind();
            s.rewound = true;
            s.expected = source.len_hint();
        }
        if let Some(c) = s
            .in_flight
            .iter_mut()
            .find(|c| now_ns >= c.sent_at.saturating_add(rto))
        {
            c.sent_at = now_ns;
            self.stats.snapshot_retransmits += 1;
            return Some(c.msg.clone());
        }
        if s.end.is_some() || s.in_flight.len() >= window {
            return None;
        }
        let mut records = Vec::new();
        if !s.walk_done {
            s.walk_done = source.next_chunk(max, &mut records);
        }
        let index = s.next_index;
        let msg = if !records.is_empty() {
            SyncMessage::SnapshotChunk(SnapshotChunk {
                id: s.id,
                index,
                start: s.start,
                read_at: version,
                expected: s.expected,
                records,
            })
        } else if s.walk_done {
            s.end = Some(version);
            SyncMessage::SnapshotEnd(SnapshotEnd {
                id: s.id,
                index,
                start: s.start,
                end: version,
                records: s.records_sent,
            })
        } else {
            return None;
        };
        let n = match &msg {
            SyncMessage::SnapshotChunk(c) => c.records.len() as u64,
            _ => 0,
        };
        s.records_sent += n;
        s.next_index += 1;
        s.in_flight.push_back(ChunkInFlight {
            index,
            records: n,
            sent_at: now_ns,
            msg: msg.clone(),
        });
        self.stats.snapshot_chunks += 1;
        Some(msg)
    }

    /// A heartbeat, if one is due.
    pub fn poll_heartbeat(&mut self, now_ns: u64) -> Option<Heartbeat> {
        if self
            .last_heartbeat
            .is_some_and(|t| now_ns < t.saturating_add(self.cfg.heartbeat_ns))
        {
            return None;
        }
        self.last_heartbeat = Some(now_ns);
        Some(Heartbeat {
            term: self.term,
            last_seq: self.last_seq(),
            snapshot: self.last_snapshot_id,
            resync: self.resync,
        })
    }

    /// Takes a message from the receiver.
    pub fn handle(&mut self, msg: SyncMessage<R>) -> Result<(), SyncError> {
        match msg {
            SyncMessage::Ack(a) => self.on_ack(a),
            SyncMessage::SnapshotRequest(r) => {
                self.on_snapshot_request(r);
                Ok(())
            }
            _ => {
                self.stats.unexpected += 1;
                Ok(())
            }
        }
    }

    fn check_peer_ready(&mut self) {
        if let Some(s) = &self.snapshot {
            if s.done
                && s.end
                    .is_some_and(|e| Version::new(self.term, self.acked) >= e)
            {
                self.peer_ready = true;
            }
        }
    }

    /// The standby's state as this end sees it (what the active's role machine is fed):
    /// Ready once the snapshot's end is acknowledged and the stream is acknowledged up to it.
    pub fn peer_state(&self) -> ReadyState {
        if self.peer_ready {
            return ReadyState::Ready;
        }
        let (received, expected) = self
            .snapshot
            .as_ref()
            .map_or((0, None), |s| (s.records_acked, s.expected));
        ReadyState::Syncing {
            received,
            expected,
            lag: self.events.len() as u64,
        }
    }
}

/// What a receiver has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Batches taken (any outcome).
    pub batches: u64,
    /// Changes and snapshot records applied.
    pub applied: u64,
    /// Changes and records ignored because the key holds an equal or newer version.
    pub stale: u64,
    /// Changes at or below the applied seq (retransmitted, duplicated).
    pub duplicates: u64,
    /// Batches, chunks and heartbeats of an older term, refused.
    pub old_term: u64,
    /// Changes too far ahead to buffer, dropped (they come back by retransmission).
    pub out_of_window: u64,
    /// Changes buffered out of order.
    pub buffered: u64,
    /// Newer terms seen.
    pub term_changes: u64,
    /// Snapshots requested (including restarts).
    pub snapshots_requested: u64,
    /// Snapshots restarted: tombstone overflow, term change, inconsistent chunk, resync.
    pub snapshot_restarts: u64,
    /// Chunks applied.
    pub chunks: u64,
    /// Chunks and ends not taken (other snapshot, duplicate, out of order).
    pub stray_chunks: u64,
    /// Keys removed at a snapshot's end (the sender did not have them).
    pub swept: u64,
    /// Tombstones dropped once no chunk could need them.
    pub tombstones_pruned: u64,
    /// Messages a receiver does not take (acks, requests), ignored.
    pub unexpected: u64,
}

#[derive(Debug, Clone, Copy)]
struct KeyState {
    version: Version,
    live: bool,
}

#[derive(Debug, Clone)]
struct SnapshotRx {
    id: u64,
    requested_at: Option<u64>,
    progress_at: u64,
    next_chunk: u32,
    start: Option<Version>,
    received: u64,
    expected: Option<u64>,
    end: Option<Version>,
}

/// The standby member's end of the link. It keeps the newest version per key (not the
/// records: the caller's table holds those) and hands every change to apply back as
/// [`Stamped`] events, in the order to apply them.
pub struct SyncReceiver<R: Replicated> {
    cfg: SyncConfig,
    term: u64,
    /// Highest seq of `term` applied in order.
    delivered: u64,
    /// Highest seq of `term` the sender is known to have assigned.
    sender_seq: u64,
    pending: BTreeMap<u64, Event<R>>,
    versions: BTreeMap<R::Key, KeyState>,
    tombstones: VecDeque<(Version, R::Key)>,
    snapshot: SnapshotRx,
    next_snapshot_id: u64,
    ready: bool,
    last_heard: Option<u64>,
    stats: ReceiverStats,
}

impl<R: Replicated> fmt::Debug for SyncReceiver<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncReceiver")
            .field("term", &self.term)
            .field("delivered", &self.delivered)
            .field("keys", &self.versions.len())
            .field("pending", &self.pending.len())
            .field("tombstones", &self.tombstones.len())
            .field("snapshot", &self.snapshot)
            .field("ready", &self.ready)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<R: Replicated> SyncReceiver<R> {
    /// A receiver that holds nothing; it asks for a snapshot at the first
    /// [`SyncReceiver::poll`]. Snapshot ids start at `now_ns`, so the requests of a restarted
    /// receiver supersede those of its predecessor (given a clock that does not go back).
    pub fn new(config: SyncConfig, now_ns: u64) -> Result<Self, SyncError> {
        config.validate()?;
        let first = now_ns.max(1);
        let mut r = SyncReceiver {
            cfg: config,
            term: 0,
            delivered: 0,
            sender_seq: 0,
            pending: BTreeMap::new(),
            versions: BTreeMap::new(),
            tombstones: VecDeque::new(),
            snapshot: SnapshotRx::new(first),
            next_snapshot_id: first + 1,
            ready: false,
            last_heard: None,
            stats: ReceiverStats::default(),
        };
        r.stats.snapshots_requested = 1;
        Ok(r)
    }

    /// Declares a key the caller's table already holds (from an earlier role, at `version`,
    /// `Version::default()` if unknown), so that the snapshot removes it if the active does not
    /// have it. Call before the first snapshot completes.
    pub fn seed(&mut self, key: R::Key, version: Version) {
        self.versions.entry(key).or_insert(KeyState {
            version,
            live: true,
        });
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Highest seq of the current term applied in order.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The newest version applied to a live key.
    pub fn version_of(&self, key: &R::Key) -> Option<Version> {
        self.versions.get(key).filter(|k| k.live).map(|k| k.version)
    }

    /// Live keys held.
    pub fn len(&self) -> usize {
        self.versions.values().filter(|k| k.live).count()
    }

    /// `true` if no live key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tombstones held (only during a snapshot).
    pub fn tombstones(&self) -> usize {
        self.tombstones.len()
    }

    /// Changes buffered out of order.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// When the sender was last heard from (any message of the current or a newer term).
    pub fn last_heard(&self) -> Option<u64> {
        self.last_heard
    }

    /// Counters.
    pub fn stats(&self) -> &ReceiverStats {
        &self.stats
    }

    /// The acknowledgement of what is applied.
    pub fn ack(&self) -> Ack {
        Ack {
            term: self.term,
            upto_seq: self.delivered,
        }
    }

    /// Whether this member holds what the active holds.
    pub fn ready_state(&self) -> ReadyState {
        if self.ready {
            return ReadyState::Ready;
        }
        ReadyState::Syncing {
            received: self.snapshot.received,
            expected: self.snapshot.expected,
            lag: self.sender_seq.saturating_sub(self.delivered),
        }
    }

    /// Starts a new snapshot (replacing any), e.g. after the agent reconnects to a new active;
    /// the request is sent by the next [`SyncReceiver::poll`].
    pub fn request_snapshot(&mut self) {
        self.begin_snapshot();
    }

    fn restart_snapshot(&mut self) {
        self.stats.snapshot_restarts += 1;
        self.begin_snapshot();
    }

    fn begin_snapshot(&mut self) {
        let id = self.next_snapshot_id;
        self.next_snapshot_id += 1;
        self.snapshot = SnapshotRx::new(id);
        self.ready = false;
        self.clear_tombstones();
        self.stats.snapshots_requested += 1;
    }

    fn clear_tombstones(&mut self) {
        for (v, k) in self.tombstones.drain(..) {
            if let MapEntry::Occupied(e) = self.versions.entry(k) {
                if !e.get().live && e.get().version == v {
                    e.remove();
                }
            }
        }
    }

    fn snapshot_in_progress(&self) -> bool {
        self.snapshot.end.is_none()
    }

    /// The snapshot request to send now, if any: the first one, or a repeat when the snapshot
    /// made no progress for [`SyncConfig::rto_ns`].
    pub fn poll(&mut self, now_ns: u64) -> Option<SnapshotRequest> {
        let s = &mut self.snapshot;
        if s.end.is_some() {
            return None;
        }
        let due = match s.requested_at {
            None => true,
            Some(t) => {
                now_ns >= t.saturating_add(self.cfg.rto_ns)
                    && now_ns >= s.progress_at.saturating_add(self.cfg.rto_ns)
            }
        };
        if !due {
            return None;
        }
        s.requested_at = Some(now_ns);
        Some(s.request())
    }

    /// Takes a message from the sender; returns the changes to apply and the answer to send.
    pub fn handle(
        &mut self,
        msg: SyncMessage<R>,
        now_ns: u64,
    ) -> (Vec<Stamped<R>>, Option<SyncMessage<R>>) {
        match msg {
            SyncMessage::Batch(b) => {
                let (out, ack) = self.on_batch(b, now_ns);
                (out, Some(SyncMessage::Ack(ack)))
            }
            SyncMessage::SnapshotChunk(c) => {
                let (out, req) = self.on_snapshot_chunk(c, now_ns);
                (out, req.map(SyncMessage::SnapshotRequest))
            }
            SyncMessage::SnapshotEnd(e) => {
                let (out, req) = self.on_snapshot_end(e, now_ns);
                (out, req.map(SyncMessage::SnapshotRequest))
            }
            SyncMessage::Heartbeat(h) => {
                self.on_heartbeat(h, now_ns);
                (Vec::new(), None)
            }
            SyncMessage::Ack(_) | SyncMessage::SnapshotRequest(_) => {
                self.stats.unexpected += 1;
                (Vec::new(), None)
            }
        }
    }

    /// Takes a batch: applies what is in order (and what it unblocks from the buffer),
    /// buffers what is ahead, drops duplicates; always answers with the cumulative ack.
    pub fn on_batch(&mut self, batch: Batch<R>, now_ns: u64) -> (Vec<Stamped<R>>, Ack) {
        self.stats.batches += 1;
        let mut out = Vec::new();
        if batch.term < self.term {
            self.stats.old_term += 1;
            return (out, self.ack());
        }
        if batch.term > self.term {
            self.new_term(batch.term, false);
        }
        self.heard(now_ns);
        let last = batch.last_seq();
        self.sender_seq = self.sender_seq.max(last);
        if last <= self.delivered {
            self.stats.duplicates += batch.events.len() as u64;
            return (out, self.ack());
        }
        let term = self.term;
        if batch.first_seq <= self.delivered + 1 {
            let skip = (self.delivered + 1 - batch.first_seq) as usize;
            self.stats.duplicates += skip as u64;
            out.reserve(batch.events.len() - skip);
            for (i, e) in batch.events.into_iter().enumerate().skip(skip) {
                self.apply(Version::new(term, batch.first_seq + i as u64), e, &mut out);
            }
            self.delivered = last;
            self.drain_pending(&mut out);
        } else {
            let limit = self.delivered + self.cfg.reorder_window as u64;
            for (i, e) in batch.events.into_iter().enumerate() {
                let seq = batch.first_seq + i as u64;
                if seq > limit {
                    self.stats.out_of_window += 1;
                } else if let MapEntry::Vacant(v) = self.pending.entry(seq) {
                    v.insert(e);
                    self.stats.buffered += 1;
                } else {
                    self.stats.duplicates += 1;
                }
            }
        }
        self.after_change();
        (out, self.ack())
    }

    fn drain_pending(&mut self, out: &mut Vec<Stamped<R>>) {
        while let Some(e) = self.pending.first_entry() {
            let seq = *e.key();
            if seq <= self.delivered {
                e.remove();
                self.stats.duplicates += 1;
            } else if seq == self.delivered + 1 {
                let ev = e.remove();
                self.apply(Version::new(self.term, seq), ev, out);
                self.delivered = seq;
            } else {
                break;
            }
        }
    }

    /// Applies one change if it is newer than what the key holds.
    fn apply(&mut self, version: Version, event: Event<R>, out: &mut Vec<Stamped<R>>) {
        let key = event.key();
        let live = matches!(event, Event::Upsert(_));
        let keep_tombstone = !live && self.snapshot_in_progress();
        match self.versions.entry(key) {
            MapEntry::Occupied(mut o) => {
                if o.get().version >= version {
                    self.stats.stale += 1;
                    return;
                }
                if live || keep_tombstone {
                    *o.get_mut() = KeyState { version, live };
                } else {
                    o.remove();
                }
            }
            MapEntry::Vacant(v) => {
                if live || keep_tombstone {
                    v.insert(KeyState { version, live });
                }
            }
        }
        if keep_tombstone {
            self.tombstones.push_back((version, event.key()));
        }
        self.stats.applied += 1;
        out.push(Stamped { version, event });
    }

    /// `keep`: the message bringing the term is the first chunk of the snapshot this receiver
    /// waits for (that run began under the new term).
    fn new_term(&mut self, term: u64, keep: bool) {
        let first = self.term == 0;
        self.term = term;
        self.delivered = 0;
        self.sender_seq = 0;
        self.pending.clear();
        self.stats.term_changes += 1;
        // A snapshot not finished under an older term cannot be finished or judged under this
        // one (the sender abandoned it; its end refers to the old stream): start over. Ready
        // stays: the new stream continues from what is applied. A fresh receiver's first term
        // changes nothing (should its request have been served and abandoned under an older
        // term, the sender's resync flag says so).
        if !self.ready && !first && !keep {
            self.restart_snapshot();
        }
    }

    fn heard(&mut self, now_ns: u64) {
        self.last_heard = Some(self.last_heard.map_or(now_ns, |t| t.max(now_ns)));
    }

    fn after_change(&mut self) {
        if self.tombstones.len() > self.cfg.max_tombstones {
            self.restart_snapshot();
            return;
        }
        if let Some(end) = self.snapshot.end {
            if !self.ready && Version::new(self.term, self.delivered) >= end {
                self.ready = true;
            }
        }
    }

    /// Checks a chunk or end against the snapshot in progress; on the first one, skips the
    /// stream forward to the snapshot's start. `Err` carries the answer for a message not
    /// taken.
    fn accept_snapshot_part(
        &mut self,
        id: u64,
        index: u32,
        start: Version,
        now_ns: u64,
        out: &mut Vec<Stamped<R>>,
    ) -> Result<(), Option<SnapshotRequest>> {
        if start.term < self.term {
            self.stats.old_term += 1;
            return Err(None);
        }
        if start.term > self.term {
            let s = &self.snapshot;
            let keep = id == s.id && index == 0 && s.start.is_none();
            self.new_term(start.term, keep);
        }
        self.heard(now_ns);
        let s = &self.snapshot;
        if id != s.id {
            self.stats.stray_chunks += 1;
            return Err(None);
        }
        if s.end.is_some() || index != s.next_chunk {
            self.stats.stray_chunks += 1;
            return Err(Some(s.request()));
        }
        match s.start {
            None => {
                self.snapshot.start = Some(start);
                if start.seq > self.delivered {
                    self.delivered = start.seq;
                    self.sender_seq = self.sender_seq.max(start.seq);
                    self.drain_pending(out);
                }
            }
            Some(st) if st != start => {
                self.restart_snapshot();
                return Err(None);
            }
            Some(_) => {}
        }
        let s = &mut self.snapshot;
        s.next_chunk += 1;
        s.progress_at = now_ns;
        s.requested_at = Some(now_ns);
        Ok(())
    }

    /// Takes a snapshot chunk; returns the changes to apply and the progress to report.
    pub fn on_snapshot_chunk(
        &mut self,
        chunk: SnapshotChunk<R>,
        now_ns: u64,
    ) -> (Vec<Stamped<R>>, Option<SnapshotRequest>) {
        let mut out = Vec::new();
        if chunk.read_at.term != chunk.start.term {
            self.stats.stray_chunks += 1;
            return (out, None);
        }
        if let Err(answer) =
            self.accept_snapshot_part(chunk.id, chunk.index, chunk.start, now_ns, &mut out)
        {
            return (out, answer);
        }
        self.stats.chunks += 1;
        self.snapshot.received += chunk.records.len() as u64;
        self.snapshot.expected = chunk.expected;
        out.reserve(chunk.records.len());
        for r in chunk.records {
            self.apply(chunk.read_at, Event::Upsert(r), &mut out);
        }
        // Later chunks are read at or after `read_at`: older tombstones are of no more use.
        while let Some((v, _)) = self.tombstones.front() {
            if *v > chunk.read_at {
                break;
            }
            if let Some((v, k)) = self.tombstones.pop_front() {
                if let MapEntry::Occupied(e) = self.versions.entry(k) {
                    if !e.get().live && e.get().version == v {
                        e.remove();
                    }
                }
                self.stats.tombstones_pruned += 1;
            }
        }
        self.after_change();
        let req = self.snapshot.request();
        (out, Some(req))
    }

    /// Takes the end of a snapshot: removes what the sender did not have; Ready once the
    /// stream has reached the end's version.
    pub fn on_snapshot_end(
        &mut self,
        end: SnapshotEnd,
        now_ns: u64,
    ) -> (Vec<Stamped<R>>, Option<SnapshotRequest>) {
        let mut out = Vec::new();
        if end.end.term != end.start.term {
            self.stats.stray_chunks += 1;
            return (out, None);
        }
        if let Err(answer) =
            self.accept_snapshot_part(end.id, end.index, end.start, now_ns, &mut out)
        {
            return (out, answer);
        }
        let start = end.start;
        let mut swept = 0;
        self.versions.retain(|k, st| {
            if !st.live {
                return false;
            }
            if st.version < start {
                out.push(Stamped {
                    version: start,
                    event: Event::Delete(k.clone()),
                });
                swept += 1;
                return false;
            }
            true
        });
        self.tombstones.clear();
        self.stats.swept += swept;
        self.stats.applied += swept;
        self.snapshot.end = Some(end.end);
        self.after_change();
        let req = self.snapshot.request();
        (out, Some(req))
    }

    /// Takes a heartbeat: learns how far the stream is, and starts a new snapshot when the
    /// sender refused changes after the last snapshot this receiver asked for started.
    pub fn on_heartbeat(&mut self, hb: Heartbeat, now_ns: u64) {
        if hb.term < self.term {
            self.stats.old_term += 1;
            return;
        }
        if hb.term > self.term {
            self.new_term(hb.term, false);
        }
        self.heard(now_ns);
        self.sender_seq = self.sender_seq.max(hb.last_seq);
        if hb.resync && hb.snapshot >= self.snapshot.id {
            self.restart_snapshot();
        }
        self.after_change();
    }
}

impl SnapshotRx {
    fn new(id: u64) -> Self {
        SnapshotRx {
            id,
            requested_at: None,
            progress_at: 0,
            next_chunk: 0,
            start: None,
            received: 0,
            expected: None,
            end: None,
        }
    }

    fn request(&self) -> SnapshotRequest {
        SnapshotRequest {
            id: self.id,
            from_chunk: self.next_chunk,
        }
    }
}
