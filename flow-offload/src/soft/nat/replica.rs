//! What an A/B pair replicates of its NAT state: one session of one NAT rule, of either
//! family, as a [`crate::ha::sync::Replicated`] record keyed by the rule and the session's
//! flow. The pipeline's sync methods ([`crate::soft::pipeline::Pipeline::drain_nat_changes`],
//! [`crate::soft::pipeline::Pipeline::export_nat_replicas`],
//! [`crate::soft::pipeline::Pipeline::apply_nat_replica`]) speak these types; this module holds
//! the per-table halves of them.
//!
//! The record is the [`SessionRecord`] (relative ages, no versions: the sync stream versions
//! it) with the rule's name; postcard puts a NAPT44 session in about 30 to 60 bytes.

use std::fmt::Debug;
use std::hash::Hash;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use super::log::{ChangeKind, ChangeLogOverflow, SessionChange};
use super::sync::{ExportCursor, SessionRecord};
use super::{NatTable, Proto};
use crate::ha::sync::{Event, Replicated};
use crate::model::Name;

/// A session record of either family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NatSessionRecord {
    /// A NAPT44 session.
    Napt44(SessionRecord<Ipv4Addr>),
    /// A NAT64 session.
    Nat64(SessionRecord<Ipv6Addr>),
}

/// What identifies a session within its rule's table: protocol, inside and remote endpoints
/// (remote port 0 for ICMP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum NatFlowKey {
    /// A NAPT44 session's flow.
    Napt44 {
        /// The protocol.
        proto: Proto,
        /// The inside endpoint.
        inside: (Ipv4Addr, u16),
        /// The remote endpoint.
        remote: (Ipv4Addr, u16),
    },
    /// A NAT64 session's flow.
    Nat64 {
        /// The protocol.
        proto: Proto,
        /// The inside endpoint.
        inside: (Ipv6Addr, u16),
        /// The remote endpoint.
        remote: (Ipv4Addr, u16),
    },
}

/// One NAT session of one rule: the record an A/B pair replicates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicatedSession {
    /// The NAT rule.
    pub rule: Name,
    /// The session.
    pub session: NatSessionRecord,
}

impl Replicated for ReplicatedSession {
    type Key = (Name, NatFlowKey);

    fn key(&self) -> (Name, NatFlowKey) {
        let flow = match &self.session {
            NatSessionRecord::Napt44(r) => NatFlowKey::Napt44 {
                proto: r.proto,
                inside: r.inside,
                remote: r.remote,
            },
            NatSessionRecord::Nat64(r) => NatFlowKey::Nat64 {
                proto: r.proto,
                inside: r.inside,
                remote: r.remote,
            },
        };
        (self.rule.clone(), flow)
    }
}

/// The inside address types a replicated table can have, with how their records and keys are
/// tagged.
pub trait ReplicaFamily: Copy + Eq + Hash + Debug {
    /// Tags a record.
    fn wrap(rec: SessionRecord<Self>) -> NatSessionRecord;
    /// Tags a flow.
    fn flow_key(proto: Proto, inside: (Self, u16), remote: (Ipv4Addr, u16)) -> NatFlowKey;
}

impl ReplicaFamily for Ipv4Addr {
    fn wrap(rec: SessionRecord<Self>) -> NatSessionRecord {
        NatSessionRecord::Napt44(rec)
    }
    fn flow_key(proto: Proto, inside: (Self, u16), remote: (Ipv4Addr, u16)) -> NatFlowKey {
        NatFlowKey::Napt44 {
            proto,
            inside,
            remote,
        }
    }
}

impl ReplicaFamily for Ipv6Addr {
    fn wrap(rec: SessionRecord<Self>) -> NatSessionRecord {
        NatSessionRecord::Nat64(rec)
    }
    fn flow_key(proto: Proto, inside: (Self, u16), remote: (Ipv4Addr, u16)) -> NatFlowKey {
        NatFlowKey::Nat64 {
            proto,
            inside,
            remote,
        }
    }
}

/// Where a walk over every NAT rule of a pipeline goes on
/// ([`crate::soft::pipeline::Pipeline::export_nat_replicas`]): the rules as they were when the
/// walk started (by name, so that a pipeline rebuilt meanwhile is walked correctly: a rule
/// gone since is skipped, its sessions are gone; a rule added since is new, its sessions are
/// all newer than the walk), the rule being walked and the slot within its table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaCursor {
    /// The rules to walk: `false` for NAPT44, `true` for NAT64.
    pub(crate) rules: Vec<(bool, Name)>,
    /// Index into `rules`.
    pub(crate) pos: usize,
    /// Slot within the current rule's table.
    pub(crate) slot: ExportCursor,
}

impl ReplicaCursor {
    /// `true` once every rule has been walked.
    pub fn is_done(&self) -> bool {
        self.pos >= self.rules.len()
    }

    /// Rules in the walk.
    pub fn rules(&self) -> usize {
        self.rules.len()
    }
}

impl<I: ReplicaFamily> NatTable<I> {
    /// Drains at most `max` entries of the change log and turns them into sync events of rule
    /// `rule`, appended to `out`: a created or changed session becomes an upsert of its
    /// current record at `now_ns` (nothing if it is gone or dead by now: its deletion is or
    /// will be in the log), a deleted one a delete of its flow. `scratch` is working space
    /// (cleared, reused). Returns how many log entries were drained, or the overflow (see
    /// [`NatTable::drain_changes`]).
    pub fn drain_replica_events(
        &mut self,
        rule: &Name,
        now_ns: u64,
        max: usize,
        scratch: &mut Vec<SessionChange<I>>,
        out: &mut Vec<Event<ReplicatedSession>>,
    ) -> Result<usize, ChangeLogOverflow> {
        scratch.clear();
        let n = self.drain_changes(max, scratch)?;
        out.reserve(n);
        for c in scratch.drain(..) {
            match c.kind {
                ChangeKind::Created | ChangeKind::Changed => {
                    if let Some(rec) = self.export(c.session, now_ns) {
                        out.push(Event::Upsert(ReplicatedSession {
                            rule: rule.clone(),
                            session: I::wrap(rec),
                        }));
                    }
                }
                ChangeKind::Deleted => out.push(Event::Delete((
                    rule.clone(),
                    I::flow_key(c.proto, c.inside, c.remote),
                ))),
            }
        }
        Ok(n)
    }

    /// [`NatTable::export_batch`] as replicated records of rule `rule`.
    pub fn export_replicas(
        &self,
        rule: &Name,
        cursor: ExportCursor,
        budget: usize,
        now_ns: u64,
        out: &mut Vec<ReplicatedSession>,
    ) -> Option<ExportCursor> {
        let mut recs = Vec::new();
        let next = self.export_batch(cursor, budget, now_ns, &mut recs);
        out.extend(recs.into_iter().map(|r| ReplicatedSession {
            rule: rule.clone(),
            session: I::wrap(r),
        }));
        next
    }
}
