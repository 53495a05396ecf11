//! Session export and import, for the state sync of a redundancy group (an active/standby pair
//! of gateways): the active exports its sessions as [`SessionRecord`]s (one by one as they
//! change, or in bounded batches for a bulk snapshot), the standby imports them, so that after
//! a failover the same flows find the same outside endpoints and the same filtering.
//!
//! The rules are documented on [`SessionRecord`] and [`NatTable::import`].

use std::fmt::Debug;
use std::hash::Hash;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::{
    deadline, normalize_remote, FlowKey, Mapping, NatTable, PortBitmaps, Proto, Session, SessionId,
    SessionView, TcpState, Timeouts, NIL, RECLAIM_BUDGET,
};

/// Which of the [`Timeouts`] applies to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LifetimeClass {
    /// TCP in an established state (`Established`, `FinOutbound`, `FinInbound`).
    TcpEstablished,
    /// TCP in a transitory state (`Opening`, `Closing`, `Reset`).
    TcpTransitory,
    /// UDP.
    Udp,
    /// ICMP query.
    Icmp,
}

impl LifetimeClass {
    /// The class of a session of `proto` in `tcp_state`; `None` if they do not fit together
    /// (TCP needs a state, UDP and ICMP have none).
    pub const fn of(proto: Proto, tcp_state: Option<TcpState>) -> Option<Self> {
        match (proto, tcp_state) {
            (Proto::Tcp, Some(s)) if s.is_transitory() => Some(LifetimeClass::TcpTransitory),
            (Proto::Tcp, Some(_)) => Some(LifetimeClass::TcpEstablished),
            (Proto::Udp, None) => Some(LifetimeClass::Udp),
            (Proto::Icmp, None) => Some(LifetimeClass::Icmp),
            _ => None,
        }
    }

    /// The lifetime of this class under `t`.
    pub const fn lifetime_ns(self, t: &Timeouts) -> u64 {
        match self {
            LifetimeClass::TcpEstablished => t.tcp_established_ns,
            LifetimeClass::TcpTransitory => t.tcp_transitory_ns,
            LifetimeClass::Udp => t.udp_ns,
            LifetimeClass::Icmp => t.icmp_ns,
        }
    }
}

/// One session as exported by [`NatTable::export`] and consumed by [`NatTable::import`]. `I` is
/// the inside address type.
///
/// A plain value without a version: the flow (protocol, inside, outside and remote
/// endpoints), the TCP state, the lifetime class, and ages relative to the moment of export
/// (`idle_ns` since the last packet, `established_for_ns` since the session became
/// established), so the two members' clocks need not agree. Counters and the offload mark are
/// not carried: they belong to the member that saw the packets and owns the hardware rules.
/// With postcard a NAPT44 record takes 20 to 46 bytes (a NAT64 one 12 more).
///
/// The field order is the wire order (postcard encodes fields in order, without names), so it
/// must not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SessionRecord<I> {
    /// The protocol.
    pub proto: Proto,
    /// The inside endpoint (for ICMP the echo identifier as port).
    pub inside: (I, u16),
    /// The outside endpoint the mapping uses.
    pub outside: (Ipv4Addr, u16),
    /// The remote endpoint (port 0 for ICMP).
    pub remote: (Ipv4Addr, u16),
    /// The TCP state (`None` for UDP and ICMP).
    pub tcp_state: Option<TcpState>,
    /// The lifetime class (consistent with `proto` and `tcp_state`).
    pub lifetime: LifetimeClass,
    /// Time since the last packet (or refresh), at export.
    pub idle_ns: u64,
    /// Time since the session became established (TCP: entered `Established`; UDP and ICMP:
    /// first packet from outside), at export; `None` if it never was.
    pub established_for_ns: Option<u64>,
}

impl<I> SessionRecord<I> {
    /// The lifetime left at export under `timeouts` (0: the session is dead).
    pub const fn remaining_ns(&self, timeouts: &Timeouts) -> u64 {
        self.lifetime
            .lifetime_ns(timeouts)
            .saturating_sub(self.idle_ns)
    }
}

/// Where a bulk export ([`NatTable::export_batch`]) goes on: a slot number. Sessions never
/// change slots, so a bulk export over any number of calls, with packets handled in between,
/// yields every session that lives through it exactly once (sessions created meanwhile may
/// or may not be included: the event stream carries them).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct ExportCursor(u32);

impl ExportCursor {
    /// The start of a bulk export.
    pub const START: ExportCursor = ExportCursor(0);
}

/// Why [`NatTable::import`] refused a record. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// The outside address is not in this table's pool.
    #[error("outside address {addr} is not in the pool")]
    NotInPool {
        /// The record's outside address.
        addr: Ipv4Addr,
    },
    /// The outside address is in the pool but not the one this table pairs the inside host
    /// with: the members' pools differ.
    #[error("outside address {outside} is not the one the inside host is paired with here ({paired}); are the pools the same?")]
    NotPaired {
        /// The record's outside address.
        outside: Ipv4Addr,
        /// The address this table pairs the inside host with.
        paired: Ipv4Addr,
    },
    /// The outside port is not in this table's port range.
    #[error("outside port {port} is outside the port range {lo}..={hi}")]
    PortOutOfRange {
        /// The record's outside port.
        port: u16,
        /// First port of the range.
        lo: u16,
        /// Last port of the range.
        hi: u16,
    },
    /// The record contradicts itself.
    #[error("inconsistent session record: {0}")]
    Inconsistent(&'static str),
    /// The session was idle for its whole lifetime: it is dead, not imported.
    #[error("the session expired before it was imported")]
    Expired,
    /// The inside endpoint is already mapped to another outside endpoint here.
    #[error("the inside endpoint is mapped to {existing:?} here, the record says {record:?}")]
    MappingConflict {
        /// The protocol.
        proto: Proto,
        /// The outside endpoint of the mapping here.
        existing: (Ipv4Addr, u16),
        /// The record's outside endpoint.
        record: (Ipv4Addr, u16),
    },
    /// The outside endpoint is already bound to another inside endpoint here.
    #[error("outside endpoint {outside:?} is bound to another inside endpoint here")]
    OutsideInUse {
        /// The protocol.
        proto: Proto,
        /// The record's outside endpoint.
        outside: (Ipv4Addr, u16),
    },
    /// No room for another session (after the bounded reclaim).
    #[error("session table full ({capacity} sessions)")]
    SessionTableFull {
        /// The table's capacity.
        capacity: usize,
    },
    /// No room for another mapping (after the bounded reclaim).
    #[error("mapping table full ({capacity} mappings)")]
    MappingTableFull {
        /// The table's capacity.
        capacity: usize,
    },
}

/// Why a sync call on a [`crate::soft::pipeline::Pipeline`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatSyncError {
    /// The pipeline has no stateful NAT rule of that name and family.
    #[error("no stateful NAT rule of that name")]
    UnknownRule,
    /// The rule's table refused the record.
    #[error(transparent)]
    Import(#[from] ImportError),
}

impl<I> NatTable<I>
where
    I: Copy + Eq + Hash + Debug,
{
    fn record_of(&self, s: &Session<I>, now_ns: u64) -> Option<SessionRecord<I>> {
        if now_ns >= deadline(&self.cfg.timeouts, s) {
            return None;
        }
        let tcp_state = (s.proto == Proto::Tcp).then_some(s.tcp);
        Some(SessionRecord {
            proto: s.proto,
            inside: s.inside,
            outside: s.outside,
            remote: s.remote,
            tcp_state,
            lifetime: LifetimeClass::of(s.proto, tcp_state)?,
            idle_ns: now_ns.saturating_sub(s.last_ns),
            established_for_ns: s.established_since_ns.map(|t| now_ns.saturating_sub(t)),
        })
    }

    /// The record of a session, if it is in the table and alive at `now_ns`.
    pub fn export(&self, id: SessionId, now_ns: u64) -> Option<SessionRecord<I>> {
        let idx = self.resolve(id)?;
        let s = self.sessions.get(idx)?.s.as_ref()?;
        self.record_of(s, now_ns)
    }

    /// The records of every session alive at `now_ns`, in the order of the dense list. To
    /// be consumed at once: the table cannot change meanwhile (see
    /// [`NatTable::export_batch`] for a snapshot spread over many calls).
    pub fn sessions_export(&self, now_ns: u64) -> impl Iterator<Item = SessionRecord<I>> + '_ {
        self.live.iter().filter_map(move |&idx| {
            let s = self.sessions.get(idx as usize)?.s.as_ref()?;
            self.record_of(s, now_ns)
        })
    }

    /// A bounded step of a bulk export: visits at most `budget` session slots from `cursor`
    /// and appends the record of each live session among them to `out` (which allocates only
    /// if its capacity is exceeded). Returns where to go on, or `None` when every slot has
    /// been visited. See [`ExportCursor`] for what a bulk export covers.
    pub fn export_batch(
        &self,
        cursor: ExportCursor,
        budget: usize,
        now_ns: u64,
        out: &mut Vec<SessionRecord<I>>,
    ) -> Option<ExportCursor> {
        let start = (cursor.0 as usize).min(self.sessions.len());
        let end = start.saturating_add(budget).min(self.sessions.len());
        let slots = self.sessions.get(start..end).unwrap_or_default();
        out.extend(
            slots
                .iter()
                .filter_map(|slot| self.record_of(slot.s.as_ref()?, now_ns)),
        );
        (end < self.sessions.len()).then_some(ExportCursor(end as u32))
    }

    /// Removes the session of a flow (a delete event from the peer, or an operator's
    /// request), and its mapping if it was the last one, whether alive or not. Returns what
    /// it was, or `None` if there is no such session. For ICMP the remote port is ignored.
    pub fn remove_session(
        &mut self,
        proto: Proto,
        inside: (I, u16),
        remote: (Ipv4Addr, u16),
    ) -> Option<SessionView<I>> {
        let key = FlowKey {
            proto,
            inside,
            remote: normalize_remote(proto, remote),
        };
        let idx = self.find_flow(self.hash_out(&key), &key)?;
        let v = self.unlink_slot(idx)?;
        self.stats.removed += 1;
        Some(v)
    }

    /// Checks a record against this table (not against its contents); returns the pool index
    /// of its outside address and the session's last packet time on this table's clock.
    fn check_record(&self, rec: &SessionRecord<I>, now_ns: u64) -> Result<(u32, u64), ImportError> {
        let class = LifetimeClass::of(rec.proto, rec.tcp_state).ok_or(
            ImportError::Inconsistent("the TCP state does not fit the protocol"),
        )?;
        if class != rec.lifetime {
            return Err(ImportError::Inconsistent(
                "the lifetime class does not fit the protocol and TCP state",
            ));
        }
        if rec.proto == Proto::Icmp && rec.remote.1 != 0 {
            return Err(ImportError::Inconsistent(
                "an ICMP session with a remote port",
            ));
        }
        let (lo, hi) = self.cfg.port_range;
        let port = rec.outside.1;
        if port < lo || port > hi {
            return Err(ImportError::PortOutOfRange { port, lo, hi });
        }
        let addr_idx = self.paired_addr(rec.inside.0);
        let paired = self.cfg.pool.get(addr_idx as usize).copied();
        if paired != Some(rec.outside.0) {
            // Error path only: a scan of at most MAX_POOL addresses.
            return Err(match paired {
                Some(paired) if self.cfg.pool.contains(&rec.outside.0) => ImportError::NotPaired {
                    outside: rec.outside.0,
                    paired,
                },
                _ => ImportError::NotInPool {
                    addr: rec.outside.0,
                },
            });
        }
        if rec.idle_ns >= class.lifetime_ns(&self.cfg.timeouts) {
            return Err(ImportError::Expired);
        }
        Ok((addr_idx, now_ns.saturating_sub(rec.idle_ns)))
    }

    /// Creates (or refreshes) the session of `rec`, with its mapping, and returns its id here.
    ///
    /// The mapping gets exactly the record's outside endpoint (the port is marked used even
    /// when it lies outside this table's [`super::AllocBlock`]: it came from the peer's block),
    /// the session the record's remote, TCP state and remaining lifetime, computed with this
    /// table's [`Timeouts`]: it dies at `now_ns + lifetime(class) − idle_ns` unless refreshed.
    ///
    /// - **Idempotent**: a record of a session that is already here, bound to the same
    ///   outside endpoint, refreshes it and returns its id. The newest last packet wins: the
    ///   record's state and ages are taken only if its last packet (`now_ns − idle_ns`) is
    ///   later than the session's here, so an older record (a bulk snapshot overtaking an
    ///   event, a duplicate) changes nothing. Ages are relative, so a record delayed in transit
    ///   by more than the time between the two packets looks newer than it is: a transport
    ///   that reorders must order records itself (versions) before importing them.
    /// - **Conflicts are errors, never overwrites**: the inside endpoint mapped to another
    ///   outside endpoint by a live session here ([`ImportError::MappingConflict`]), or the
    ///   outside endpoint bound to another inside endpoint with a live session here
    ///   ([`ImportError::OutsideInUse`]). Within a group with disjoint blocks neither happens
    ///   unless the members disagree (both active in a split brain, or diverging
    ///   configurations); the caller decides, for example by removing its own session first
    ///   with [`NatTable::remove_session`]. A conflicting binding whose sessions are all dead
    ///   (at most [`RECLAIM_BUDGET`] of them) is not a conflict: the peer may reuse a port, or
    ///   re-map an inside endpoint, as soon as its own copy expired, before this table's sweep
    ///   got to it. It is removed (counted as expired) and the record imported.
    /// - **Expired records are refused** ([`ImportError::Expired`]: `idle_ns` is at least the
    ///   lifetime of its class here), so a dead session never comes back to life. A session
    ///   here that is dead but not swept yet is replaced, as [`NatTable::outbound`] does.
    /// - **Validated** against this table: the outside address must be in the pool and be the
    ///   one this table pairs the inside host with (pairing is keyed by the pool, so members
    ///   with the same pool agree; [`ImportError::NotPaired`] means the pools differ), the port
    ///   in the configured port range, and protocol, TCP state and lifetime class consistent.
    /// - **Bounded and allocation-free**: a few index lookups, the slabs preallocated by
    ///   [`NatTable::new`], and when a slab is full the bounded reclaim of an outbound packet
    ///   ([`RECLAIM_BUDGET`] sessions).
    ///
    /// On error nothing changes, except that dead sessions may have been swept (as by any
    /// call that makes room).
    ///
    /// If this table's clock reads less than `idle_ns` (it started less than that long ago),
    /// the last packet time is clamped to 0: that lengthens the remaining lifetime by at most
    /// `idle_ns − now_ns`, never shortens it.
    pub fn import(
        &mut self,
        rec: &SessionRecord<I>,
        now_ns: u64,
    ) -> Result<SessionId, ImportError> {
        self.import_with(rec, now_ns, false)
    }

    /// [`NatTable::import`] for a caller that orders records itself (the pair's sync stream
    /// delivers them by version, newest last): the record's TCP state and ages are taken even
    /// when its last packet does not look later than the session's here. Relative ages make
    /// "newest last packet wins" unreliable between two records of one session a few
    /// microseconds apart (a FIN right after data): a record delayed in transit looks newer
    /// than it is, and the state change would be lost. Everything else is as for
    /// [`NatTable::import`].
    pub fn import_ordered(
        &mut self,
        rec: &SessionRecord<I>,
        now_ns: u64,
    ) -> Result<SessionId, ImportError> {
        self.import_with(rec, now_ns, true)
    }

    fn import_with(
        &mut self,
        rec: &SessionRecord<I>,
        now_ns: u64,
        ordered: bool,
    ) -> Result<SessionId, ImportError> {
        let (addr_idx, last_ns) = self.check_record(rec, now_ns)?;
        let established_since_ns = rec
            .established_for_ns
            .map(|a| now_ns.saturating_sub(a).min(last_ns));
        let key = FlowKey {
            proto: rec.proto,
            inside: rec.inside,
            remote: rec.remote,
        };
        let h_out = self.hash_out(&key);
        if let Some(idx) = self.find_flow(h_out, &key) {
            let timeouts = self.cfg.timeouts;
            let slot = self.sessions.get_mut(idx as usize);
            let gen = slot.as_ref().map_or(0, |slot| slot.gen);
            if let Some(s) = slot.and_then(|slot| slot.s.as_mut()) {
                if now_ns < deadline(&timeouts, s) {
                    if s.outside != rec.outside {
                        return Err(ImportError::MappingConflict {
                            proto: rec.proto,
                            existing: s.outside,
                            record: rec.outside,
                        });
                    }
                    if ordered || last_ns > s.last_ns {
                        s.last_ns = last_ns;
                        if let Some(t) = rec.tcp_state {
                            s.tcp = t;
                        }
                        s.established_since_ns = established_since_ns;
                    }
                    return Ok(self.make_id(idx, gen));
                }
            }
            // Dead but not swept yet: replace it.
            self.remove_slot(idx);
        }
        let h_map = self.hash_map(rec.proto, rec.inside);
        let set = PortBitmaps::set_of(addr_idx, rec.proto);
        if self.free_sessions.is_empty() || self.free_mappings.is_empty() {
            // Reclaim dead sessions before refusing, as an outbound packet does.
            self.expire(now_ns, RECLAIM_BUDGET);
        }
        let found = self.resolve_binding(h_map, &key, set, rec, now_ns)?;
        if self.free_sessions.is_empty() {
            return Err(ImportError::SessionTableFull {
                capacity: self.cfg.max_sessions,
            });
        }
        let midx = match found {
            Some(m) => m,
            None => {
                let Some(&midx) = self.free_mappings.last() else {
                    return Err(ImportError::MappingTableFull {
                        capacity: self.cfg.max_mappings,
                    });
                };
                if !self.ports.claim(set, rec.outside.1) {
                    return Err(ImportError::OutsideInUse {
                        proto: rec.proto,
                        outside: rec.outside,
                    });
                }
                self.free_mappings.pop();
                self.insert_mapping(
                    midx,
                    h_map,
                    Mapping {
                        proto: rec.proto,
                        inside: rec.inside,
                        addr_idx,
                        outside: rec.outside,
                        sessions: 0,
                        first: NIL,
                    },
                );
                midx
            }
        };
        // Nothing can fail from here on: a free session slot and the mapping exist.
        let Some(sidx) = self.free_sessions.pop() else {
            return Err(ImportError::SessionTableFull {
                capacity: self.cfg.max_sessions,
            });
        };
        if let Some(m) = self
            .mappings
            .get_mut(midx as usize)
            .and_then(Option::as_mut)
        {
            m.sessions += 1;
        }
        let s = Session {
            mapping: midx,
            proto: rec.proto,
            inside: rec.inside,
            outside: rec.outside,
            remote: rec.remote,
            tcp: rec.tcp_state.unwrap_or(TcpState::Opening),
            last_ns,
            established_since_ns,
            packets: 0,
            bytes: 0,
            offloaded: false,
            live_pos: self.live.len() as u32,
            map_prev: NIL,
            map_next: NIL,
        };
        let gen = self.link_session(sidx, s, h_out);
        self.stats.imported += 1;
        Ok(self.make_id(sidx, gen))
    }

    /// The mapping the record's session joins: the inside endpoint's own mapping if it has
    /// the record's outside endpoint, or `None` if a new one is to be made (the outside port
    /// then is free). A conflicting binding whose sessions are all dead (a race with the
    /// sweep: the peer reused a port or re-mapped an inside endpoint after its own copy
    /// expired) is removed first; a live one is an error.
    fn resolve_binding(
        &mut self,
        h_map: u64,
        key: &FlowKey<I>,
        set: usize,
        rec: &SessionRecord<I>,
        now_ns: u64,
    ) -> Result<Option<u32>, ImportError> {
        if let Some(midx) = self.find_mapping(h_map, key) {
            let existing = self
                .mappings
                .get(midx as usize)
                .and_then(Option::as_ref)
                .map(|m| m.outside);
            match existing {
                Some(o) if o == rec.outside => return Ok(Some(midx)),
                Some(o) if !self.clear_dead_mapping(midx, now_ns) => {
                    return Err(ImportError::MappingConflict {
                        proto: rec.proto,
                        existing: o,
                        record: rec.outside,
                    })
                }
                _ => {}
            }
        }
        if self.ports.port_free(set, rec.outside.1) {
            return Ok(None);
        }
        match self.find_binding(rec.proto, rec.outside) {
            Some(holder)
                if self.clear_dead_mapping(holder, now_ns)
                    && self.ports.port_free(set, rec.outside.1) =>
            {
                Ok(None)
            }
            _ => Err(ImportError::OutsideInUse {
                proto: rec.proto,
                outside: rec.outside,
            }),
        }
    }

    /// Removes mapping `midx` with its sessions if it has at most [`RECLAIM_BUDGET`] of them
    /// and all are dead at `now_ns` (they count as expired). Returns whether it did.
    fn clear_dead_mapping(&mut self, midx: u32, now_ns: u64) -> bool {
        let timeouts = self.cfg.timeouts;
        let Some(m) = self.mappings.get(midx as usize).and_then(Option::as_ref) else {
            return false;
        };
        if m.sessions as usize > RECLAIM_BUDGET {
            return false;
        }
        let mut dead = [NIL; RECLAIM_BUDGET];
        let mut n = 0;
        let mut cur = m.first;
        while let Some(s) = self
            .sessions
            .get(cur as usize)
            .and_then(|slot| slot.s.as_ref())
        {
            if now_ns < deadline(&timeouts, s) {
                return false;
            }
            let Some(d) = dead.get_mut(n) else {
                return false;
            };
            *d = cur;
            n += 1;
            cur = s.map_next;
        }
        for &idx in dead.iter().take(n) {
            self.remove_slot(idx);
        }
        true
    }
}
