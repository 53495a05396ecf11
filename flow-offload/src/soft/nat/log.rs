//! Change capture for the state sync of a redundancy group: a bounded log of the sessions a
//! table created, moved to another state, or removed, so that the active member learns what to
//! send to its standby without scanning its sessions.
//!
//! # What is recorded
//! - [`ChangeKind::Created`]: a session created by an outbound packet (also one replacing a dead
//!   session of the same flow: that one is recorded as deleted first).
//! - [`ChangeKind::Changed`]: a packet moved a session to another TCP state (which includes
//!   every change of lifetime class), or a UDP/ICMP session saw its first packet from outside
//!   (it became established, which makes it an offload candidate).
//! - [`ChangeKind::Deleted`]: a session left the table: swept or found dead
//!   ([`super::NatTable::expire`], a packet), reclaimed to make room, cleared as a dead conflict
//!   by an import, or removed by [`super::NatTable::remove_session`].
//!
//! **Not recorded**: packets that only refresh a session (no state change), hardware refreshes
//! ([`super::NatTable::refresh`]), counters, offload marks, and imports (replicated input: a
//! standby does not echo what it is sent). A standby's copy of a session therefore lives on the
//! age the last record carried (`idle_ns`, see [`super::SessionRecord`]): its deadline is the
//! active's deadline *as of that export*. The sync runtime keeps the copies alive by exporting
//! again, periodically, every session that saw a packet since its previous pass (a keepalive
//! walk over [`super::NatTable::export_batch`]), with a period well below the shortest lifetime;
//! a session idle since then needs nothing, its copy already dies when the original does.
//!
//! # Entries
//! An entry names the session's flow (`proto`, inside and remote endpoints: what identifies a
//! session in its table) and its [`super::SessionId`] at the time. The log does not copy the
//! session's state: the reader exports the session's *current* state
//! ([`super::NatTable::export`] by id) when it drains the log, so several changes of one session
//! between two drains cost one record each but all carry the newest state, and an id whose
//! session is gone resolves to nothing (its [`ChangeKind::Deleted`] entry follows in the log).
//!
//! # Bounds
//! The log holds at most `capacity` entries, allocated once when it is enabled; recording never
//! allocates. When it is full, a new entry is **not** stored: the log counts it as lost and
//! flags an overflow, which the next [`ChangeLog::drain`] reports as [`ChangeLogOverflow`]
//! (and clears the log: the reader must now send the standby a full snapshot, which covers
//! everything the log held or lost). Nothing is lost silently.
//!
//! # Cost
//! Off by default. Disabled, the data path pays one predictable branch on an empty `Option`
//! per session creation, state check and removal. Enabled, a packet of an established flow pays
//! a comparison of its session's state before and after.

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use super::{Proto, SessionId};

/// Largest accepted change log capacity (entries).
pub const MAX_CHANGE_LOG: usize = 1 << 24;

/// What happened to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// It was created (by an outbound packet).
    Created,
    /// Its TCP state changed, or it became established.
    Changed,
    /// It left the table.
    Deleted,
}

/// One entry of the change log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionChange<I> {
    /// What happened.
    pub kind: ChangeKind,
    /// The session's handle when it happened (never resolves again once it is deleted).
    pub session: SessionId,
    /// The protocol.
    pub proto: Proto,
    /// The inside endpoint.
    pub inside: (I, u16),
    /// The remote endpoint (port 0 for ICMP).
    pub remote: (Ipv4Addr, u16),
}

/// The change log overflowed since the last drain: `lost` changes were not recorded. The log
/// was cleared; the standby needs a full snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("NAT change log overflowed ({lost} changes not recorded, capacity {capacity}): a full resync is needed")]
pub struct ChangeLogOverflow {
    /// Changes not recorded since the previous drain.
    pub lost: u64,
    /// The log's capacity.
    pub capacity: usize,
}

/// Counters of a change log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ChangeLogStats {
    /// Entries held now.
    pub pending: usize,
    /// The capacity.
    pub capacity: usize,
    /// Changes recorded since the log was enabled.
    pub recorded: u64,
    /// Changes not recorded because the log was full.
    pub lost: u64,
    /// Drains that reported an overflow.
    pub overflows: u64,
}

/// A bounded FIFO of session changes (see the module documentation).
#[derive(Debug, Clone)]
pub struct ChangeLog<I> {
    entries: VecDeque<SessionChange<I>>,
    capacity: usize,
    /// Changes lost since the last drain.
    lost_since_drain: u64,
    stats: ChangeLogStats,
}

impl<I: Copy> ChangeLog<I> {
    /// An empty log of at most `capacity` entries (clamped to `1..=MAX_CHANGE_LOG`), allocated
    /// now.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, MAX_CHANGE_LOG);
        ChangeLog {
            entries: VecDeque::with_capacity(capacity),
            capacity,
            lost_since_drain: 0,
            stats: ChangeLogStats {
                capacity,
                ..ChangeLogStats::default()
            },
        }
    }

    /// The capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// `true` if no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records a change; when full, counts it as lost instead (never allocates).
    #[inline]
    pub fn record(&mut self, change: SessionChange<I>) {
        if self.entries.len() >= self.capacity {
            self.lost_since_drain += 1;
            self.stats.lost += 1;
            return;
        }
        self.entries.push_back(change);
        self.stats.recorded += 1;
    }

    /// Moves at most `max` entries, oldest first, to the end of `out`; returns how many.
    ///
    /// If changes were lost since the previous drain, nothing is moved: the log is cleared and
    /// the overflow returned (the caller resyncs the standby with a snapshot, which covers
    /// what was held too).
    pub fn drain(
        &mut self,
        max: usize,
        out: &mut Vec<SessionChange<I>>,
    ) -> Result<usize, ChangeLogOverflow> {
        if self.lost_since_drain > 0 {
            let lost = self.lost_since_drain;
            self.lost_since_drain = 0;
            self.entries.clear();
            self.stats.overflows += 1;
            return Err(ChangeLogOverflow {
                lost,
                capacity: self.capacity,
            });
        }
        let n = max.min(self.entries.len());
        out.extend(self.entries.drain(..n));
        Ok(n)
    }

    /// Forgets every entry (and any overflow): the caller is about to resync anyway.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.lost_since_drain = 0;
    }

    /// The counters.
    pub fn stats(&self) -> ChangeLogStats {
        ChangeLogStats {
            pending: self.entries.len(),
            ..self.stats
        }
    }
}

impl<I> super::NatTable<I>
where
    I: Copy + Eq + std::hash::Hash + std::fmt::Debug,
{
    /// Records a change of the session in slot `idx` (generation `gen`), if the log is on.
    pub(super) fn log_change(
        &mut self,
        kind: ChangeKind,
        idx: u32,
        gen: u32,
        s: &super::Session<I>,
    ) {
        let session = self.make_id(idx, gen);
        if let Some(log) = self.log.as_deref_mut() {
            log.record(SessionChange {
                kind,
                session,
                proto: s.proto,
                inside: s.inside,
                remote: s.remote,
            });
        }
    }

    /// Starts recording changes in a log of `capacity` entries (clamped to
    /// `1..=MAX_CHANGE_LOG`), allocated now. A log already on is replaced by an empty one
    /// when the capacity differs, and kept as it is otherwise. Sessions already in the table
    /// are not recorded: a standby that starts following needs a snapshot anyway.
    pub fn enable_change_log(&mut self, capacity: usize) {
        let capacity = capacity.clamp(1, MAX_CHANGE_LOG);
        if self.log.as_ref().is_some_and(|l| l.capacity() == capacity) {
            return;
        }
        self.log = Some(Box::new(ChangeLog::new(capacity)));
    }

    /// Stops recording and frees the log.
    pub fn disable_change_log(&mut self) {
        self.log = None;
    }

    /// The change log's capacity, if it is on.
    pub fn change_log_capacity(&self) -> Option<usize> {
        self.log.as_ref().map(|l| l.capacity())
    }

    /// Moves at most `max` changes, oldest first, to `out` (see [`ChangeLog::drain`]). `Ok(0)`
    /// when the log is off or empty; [`ChangeLogOverflow`] when changes were lost since the
    /// previous drain (the log is cleared: resync the standby with a snapshot).
    pub fn drain_changes(
        &mut self,
        max: usize,
        out: &mut Vec<SessionChange<I>>,
    ) -> Result<usize, ChangeLogOverflow> {
        match self.log.as_deref_mut() {
            Some(log) => log.drain(max, out),
            None => Ok(0),
        }
    }

    /// Forgets every change held (and any overflow), e.g. when a snapshot is about to cover
    /// them.
    pub fn clear_changes(&mut self) {
        if let Some(log) = self.log.as_deref_mut() {
            log.clear();
        }
    }

    /// The change log's counters, if it is on.
    pub fn change_log_stats(&self) -> Option<ChangeLogStats> {
        self.log.as_ref().map(|l| l.stats())
    }
}
