//! Stateful NAT state shared by NAPT44 and stateful NAT64 (RFC 6146): the mapping table (the
//! BIB of RFC 6146) and the session table, keyed by addresses and ports. Header rewriting is
//! done elsewhere; this module only answers "which outside endpoint does this flow use" and
//! "which inside endpoint may this packet go to".
//!
//! # Behaviour
//!
//! - **Endpoint-independent mapping** (RFC 4787 REQ-1, RFC 6146 §3.5.1): a mapping is keyed by
//!   `(proto, inside addr, inside port)` and reused for every remote that inside endpoint talks
//!   to.
//! - **Address-and-port-dependent filtering**: an inbound packet is let in only if a session
//!   from that exact remote `(addr, port)` to that outside endpoint exists. Inbound packets
//!   never create state.
//! - **Paired pooling** (RFC 4787 REQ-2): the outside address of a new mapping is chosen by a
//!   hash of the inside address keyed by the pool, so one inside host always appears behind
//!   one outside address, on every member of a redundancy group that has the same pool (and
//!   across restarts). When that address has no free port for the protocol the packet fails
//!   with [`NatError::PortsExhausted`]; there is no fallback to another address (which would
//!   break pairing).
//! - **Port choice** (RFC 6056 in spirit): a uniformly random port of the table's allocation
//!   block ([`NatConfig::block`]; the whole configured range by default), [`PORT_PROBES`]
//!   tries against a per-(outside address, protocol) free-port bitmap, then a word-wise scan
//!   of that bitmap from a random word — bounded by the block size. ICMP query
//!   identifiers are allocated the same way; for [`Proto::Icmp`] the "port" is the echo
//!   identifier and the remote port is ignored (treated as 0), because echo replies carry the
//!   same identifier.
//! - **TCP** (simplified RFC 6146 §3.5.2, RFC 7857), see [`TcpState`]: a session opened
//!   from inside is *transitory* until the remote answers, *established* afterwards, and
//!   transitory again after FIN from both sides or a RST. A session may be opened by any
//!   outbound TCP packet (not only a SYN) so flows survive a NAT restart; until the remote
//!   answers it only gets the transitory lifetime.
//! - **UDP** sessions are refreshed by packets in both directions (RFC 4787 REQ-6); **ICMP**
//!   query sessions likewise, with their own shorter lifetime.
//! - A mapping lives while it has sessions; when its last session is removed, the mapping and
//!   its port are freed.
//!
//! # Time and expiry
//!
//! Time comes in as `now_ns`. A session whose `last_seen + lifetime(state) <= now` is dead even
//! before the sweep reaches it: [`NatTable::inbound`] refuses it (filtering stays exact) and
//! removes it, and [`NatTable::outbound`] replaces it by a fresh session (new [`SessionId`],
//! state and counters reset). [`NatTable::expire`] is the incremental sweep: a cursor over the
//! dense list of sessions, visiting at most `budget` of them per call. When an outbound packet
//! would be refused for lack of a session, mapping or port, the sweep first runs for
//! [`RECLAIM_BUDGET`] sessions to make room. Time going backwards is tolerated (timestamps
//! never decrease).
//!
//! # Storage
//!
//! Everything is allocated in [`NatTable::new`]: slabs of mappings and sessions with free
//! lists, the dense list of live sessions (for the sweep and iteration), each mapping's list
//! of sessions (linked through the session slab), the port bitmaps (`ports`) and four
//! open-addressing indexes (`index`) with linear probing and backward-shift deletion (no
//! tombstones), each at most half full:
//!
//! - mapping index: `(proto, inside addr, inside port)` → mapping;
//! - binding index: `(proto, outside addr, outside port)` → mapping;
//! - outbound index: `(proto, inside addr, inside port, remote addr, remote port)` → session;
//! - inbound index: `(proto, outside addr, outside port, remote addr, remote port)` → session.
//!
//! A packet of a known flow costs one index lookup. `outbound`, `inbound` and `expire` never
//! allocate. Keys are attacker-influenced, so the hash (`hash`: a multiply-xorshift over the
//! key's words with a murmur-style finaliser, written here) starts from a per-table seed drawn
//! from [`Random`] at construction. It is not a cryptographic PRF; it makes collisions
//! unpredictable to an outsider, and probe lengths are bounded by the index size in any case.
//! (Paired pooling uses the same hasher keyed by the pool instead, see above: which outside
//! address a host gets is not a secret, only the index layout is.)
//!
//! # Redundancy: allocation blocks and session sync
//!
//! Two (or more) gateways can serve the same NAT rule as a group, the active streaming its
//! sessions to the standby so that a failover keeps established flows:
//!
//! - **Disjoint allocation** ([`AllocBlock`], [`NatConfig::block`]): the port range is cut
//!   into `count` contiguous, near-equal blocks and each member allocates new ports only from
//!   its own block, on every address of the pool. Two members therefore never hand out the
//!   same `(outside addr, port, proto)`, even when both believe they are active. The split is
//!   within each address's port space, not between addresses, because paired pooling ties an
//!   inside host to one address whichever member serves it. The price: a member has `1/count`
//!   of each address's ports for its new mappings.
//! - **Export** ([`NatTable::export`], [`NatTable::sessions_export`],
//!   [`NatTable::export_batch`]) turns live sessions into [`SessionRecord`]s, plain values with
//!   ages relative to the export time.
//! - **Import** ([`NatTable::import`]) recreates a session with exactly the record's outside
//!   endpoint (the port marked used even though it lies in the peer's block), remote, TCP
//!   state and remaining lifetime; it is idempotent ("newest last packet wins"), refuses
//!   conflicts with live bindings and expired records with typed [`ImportError`]s, and clears
//!   conflicting bindings whose sessions are all dead (the peer may legitimately reuse a port
//!   its own copy already swept). [`NatTable::remove_session`] applies a delete. The details
//!   are on [`SessionRecord`] and [`NatTable::import`].
//!
//! Counters and the offload mark are not synced: after a failover the new active starts with
//! every session in software and offloads the established ones again.
//!
//! # Offloading established sessions
//!
//! Long-lived flows should not cost an lcore per packet. A session that is established (TCP in
//! [`TcpState::Established`], or UDP that has seen traffic both ways) and older than some
//! minimum age is reported by [`NatTable::offload_candidates`] (one by one:
//! [`NatTable::session_at`], [`SessionView::is_offload_candidate`]). What is built on this, for
//! NAPT44 only (NAT64 sessions stay in software: no target has the RFC 7915 translation):
//!
//! - [`crate::soft::pipeline::Pipeline::session_candidates`] /
//!   [`crate::soft::pipeline::Pipeline::scan_candidates`] resolve a candidate's path both ways
//!   through the pipeline's own tables and offer it when a rule can reproduce it;
//! - [`crate::compile::session_rules`] turns an offer into exact-match rules in group 0, one per
//!   direction and ingress port: outbound `IPV4 src=inside dst=remote / TCP|UDP sport=inside
//!   dport=remote` → `[METER, MARK,] SET_IPV4_SRC outside, SET_TP_SRC outside port, DEC_TTL,
//!   COUNT`, MAC rewrite, `PORT`; inbound `IPV4 src=remote dst=outside / TCP|UDP sport=remote
//!   dport=outside port` → `SET_IPV4_DST inside, SET_TP_DST inside port, DEC_TTL, COUNT`, MAC
//!   rewrite, `PORT`;
//! - [`crate::sessions::SessionOffload`] installs them, then calls [`NatTable::mark_offloaded`]
//!   (offloaded sessions are no longer candidates).
//!
//! Teardown still reaches the state machine: shared rules at a higher priority than the
//! per-session rules match TCP with `FIN` (resp. `RST`) in `tcp_flags` and send the packet to
//! software without rewriting (see [`crate::compile::RuleId::TeardownTrap`]). Software translates
//! it as usual and the session leaves `Established`; the driver then removes the session's rules
//! (a marked session whose [`SessionView::tcp_state`] is no longer `Established` is the signal),
//! so the remaining teardown packets also take the software path. Only FIN and RST move an
//! established session (a SYN does not), so the packets hardware handles would not have changed
//! its state.
//!
//! Aging: packets handled by hardware do not reach [`NatTable::outbound`]/[`NatTable::inbound`],
//! so the driver polls the rules' `COUNT` actions and, when a counter moved since the last poll,
//! calls [`NatTable::refresh`] and [`NatTable::record_many`] with the deltas. The poll period must
//! be well below the shortest offloaded lifetime (UDP, 5 minutes by default), because a session
//! past its deadline is dead and cannot be refreshed; the driver hands a session whose counters
//! stand still back to software some time before its deadline, where it expires like any other
//! (or is refreshed by the software path if traffic resumes). (Where a NIC has
//! `RTE_FLOW_ACTION_TYPE_AGE`, a rule's AGE timeout could replace polling; not used yet.)
//!
//! Removal: [`NatTable::expire_with`] reports every session it removes, so the driver destroys
//! the rules of those that were offloaded. Sessions can also disappear without a report — found
//! dead by a packet, or reclaimed when a table is full — so the driver also checks its installed
//! rules against [`NatTable::session`] when it polls: a [`SessionId`] carries a generation, so
//! the id of a removed session never resolves again, even when its slot has been reused.
//!
//! A packet that reaches software while its session's rules are being installed or removed is
//! translated identically, so the order of rule updates against traffic does not matter.

use std::fmt;
use std::fmt::Debug;
use std::hash::Hash;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

mod hash;
mod index;
mod log;
mod ports;
mod replica;
mod sync;
mod tcp;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;

use index::Index;
pub use log::{
    ChangeKind, ChangeLog, ChangeLogOverflow, ChangeLogStats, SessionChange, MAX_CHANGE_LOG,
};
pub use ports::AllocBlock;
use ports::PortBitmaps;
pub use replica::{NatFlowKey, NatSessionRecord, ReplicaCursor, ReplicaFamily, ReplicatedSession};
pub use sync::{ExportCursor, ImportError, LifetimeClass, NatSyncError, SessionRecord};
use tcp::{tcp_next, Dir};
pub use tcp::{TcpState, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// Random probes of the port bitmap before the bounded linear scan.
pub const PORT_PROBES: u32 = 8;
/// Largest accepted `max_sessions` and `max_mappings` (session ids keep at least 8 generation
/// bits).
pub const MAX_CAPACITY: usize = 1 << 24;
/// Largest accepted outside address pool.
pub const MAX_POOL: usize = 4096;
/// Sessions the sweep visits to make room before an outbound packet is refused for lack of
/// a session, mapping or port.
pub const RECLAIM_BUDGET: usize = 16;

/// The transport protocols the NAT keeps state for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP query messages (echo); the identifier plays the port.
    Icmp,
}

impl Proto {
    /// All protocols.
    pub const ALL: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Icmp];

    const fn index(self) -> usize {
        match self {
            Proto::Tcp => 0,
            Proto::Udp => 1,
            Proto::Icmp => 2,
        }
    }

    const fn tag(self) -> u64 {
        self.index() as u64 + 1
    }
}

/// The source of randomness: port choice and the hash seed.
pub trait Random {
    /// The next uniformly distributed 32-bit value.
    fn next_u32(&mut self) -> u32;
}

/// Marsaglia's xorshift32: tiny and deterministic, for tests and benches (not for production
/// port randomisation). A zero state is replaced by a fixed non-zero one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XorShift32(pub u32);

impl Random for XorShift32 {
    fn next_u32(&mut self) -> u32 {
        let mut x = if self.0 == 0 { 0x9E37_79B9 } else { self.0 };
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        x
    }
}

/// Session lifetimes by protocol and TCP state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Timeouts {
    /// Established TCP (and one-sided FIN): 2 h 4 min (RFC 5382 REQ-5, RFC 6146).
    pub tcp_established_ns: u64,
    /// Transitory TCP (opening, closing, reset): 4 min (RFC 6146 §4).
    pub tcp_transitory_ns: u64,
    /// UDP: 5 min (RFC 4787 REQ-5).
    pub udp_ns: u64,
    /// ICMP query: 60 s (RFC 5508 REQ-1).
    pub icmp_ns: u64,
}

const SEC: u64 = 1_000_000_000;

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_established_ns: (2 * 3600 + 4 * 60) * SEC,
            tcp_transitory_ns: 4 * 60 * SEC,
            udp_ns: 5 * 60 * SEC,
            icmp_ns: 60 * SEC,
        }
    }
}

/// The NAT's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatConfig {
    /// Most mappings held at once (`1..=MAX_CAPACITY`).
    pub max_mappings: usize,
    /// Most sessions held at once (`1..=MAX_CAPACITY`).
    pub max_sessions: usize,
    /// The outside addresses (non-empty, distinct, at most [`MAX_POOL`]).
    pub pool: Vec<Ipv4Addr>,
    /// The outside ports (and ICMP identifiers), inclusive, e.g. `(1024, 65535)`; must not
    /// include 0.
    pub port_range: (u16, u16),
    /// Session lifetimes (all non-zero).
    pub timeouts: Timeouts,
    /// The part of `port_range` this table allocates new ports from (see [`AllocBlock`]);
    /// [`AllocBlock::WHOLE`] (the default) for a table that is not part of a redundancy group.
    pub block: AllocBlock,
}

/// A configuration problem found by [`NatTable::new`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatConfigError {
    /// The outside address pool is empty.
    #[error("the outside address pool is empty")]
    EmptyPool,
    /// The pool has more addresses than [`MAX_POOL`].
    #[error("the outside address pool has {len} addresses, more than {max}")]
    PoolTooLarge {
        /// Addresses given.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// An address appears twice in the pool.
    #[error("outside address {0} appears more than once in the pool")]
    DuplicatePoolAddress(Ipv4Addr),
    /// The port range is empty or includes port 0.
    #[error("invalid port range {lo}..={hi} (must be non-empty and exclude 0)")]
    BadPortRange {
        /// First port.
        lo: u16,
        /// Last port.
        hi: u16,
    },
    /// `max_mappings` is zero.
    #[error("max_mappings must be at least 1")]
    ZeroMappings,
    /// `max_sessions` is zero.
    #[error("max_sessions must be at least 1")]
    ZeroSessions,
    /// `max_mappings` is above [`MAX_CAPACITY`].
    #[error("max_mappings {requested} exceeds the maximum {max}")]
    TooManyMappings {
        /// Requested.
        requested: usize,
        /// The maximum.
        max: usize,
    },
    /// `max_sessions` is above [`MAX_CAPACITY`].
    #[error("max_sessions {requested} exceeds the maximum {max}")]
    TooManySessions {
        /// Requested.
        requested: usize,
        /// The maximum.
        max: usize,
    },
    /// A lifetime is zero.
    #[error("timeout {0} must not be zero")]
    ZeroTimeout(&'static str),
    /// The allocation block does not exist: `count` is 0 or `index` is not below it.
    #[error("allocation block {index} of {count} does not exist (need 0 <= index < count)")]
    BadBlock {
        /// The block asked for.
        index: u8,
        /// Blocks in the group.
        count: u8,
    },
    /// The port range has fewer ports than blocks, so some block would be empty.
    #[error("the port range has {ports} ports, too few for {count} allocation blocks")]
    EmptyBlock {
        /// The block asked for.
        index: u8,
        /// Blocks in the group.
        count: u8,
        /// Ports in the range.
        ports: u32,
    },
}

/// Errors of the NAT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatError {
    /// The configuration was refused.
    #[error("invalid NAT configuration: {0}")]
    Config(#[from] NatConfigError),
    /// No room for another session.
    #[error("session table full ({capacity} sessions)")]
    SessionTableFull {
        /// The table's capacity.
        capacity: usize,
    },
    /// No room for another mapping.
    #[error("mapping table full ({capacity} mappings)")]
    MappingTableFull {
        /// The table's capacity.
        capacity: usize,
    },
    /// The outside address paired with the inside host has no free port for the protocol in
    /// this table's allocation block (ports of other blocks are never used, even when free).
    #[error("no free port left on outside address {addr}")]
    PortsExhausted {
        /// The paired outside address.
        addr: Ipv4Addr,
    },
    /// New sessions are stopped ([`NatTable::set_allocation`]): this member of a redundancy
    /// group is standby or fenced. Established sessions keep working.
    #[error("new NAT sessions are stopped on this member (standby or fenced)")]
    AllocationStopped,
}

/// A session's handle: its slot plus a generation, so the handle of a removed session never
/// resolves again (until the generation wraps: at least 2^8 reuses of the same slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionId(u32);

impl SessionId {
    /// The raw value, for logs and wire messages.
    pub const fn to_raw(self) -> u32 {
        self.0
    }

    /// From a raw value (an unknown value simply resolves to no session).
    pub const fn from_raw(raw: u32) -> Self {
        SessionId(raw)
    }
}

/// The answer to a translated packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Translation<I> {
    /// The session the packet belongs to.
    pub session: SessionId,
    /// The inside endpoint.
    pub inside: (I, u16),
    /// The outside endpoint (what the inside endpoint looks like from outside).
    pub outside: (Ipv4Addr, u16),
    /// The remote endpoint (port 0 for ICMP).
    pub remote: (Ipv4Addr, u16),
}

/// A snapshot of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionView<I> {
    /// Its handle.
    pub id: SessionId,
    /// Its protocol.
    pub proto: Proto,
    /// The inside endpoint.
    pub inside: (I, u16),
    /// The outside endpoint.
    pub outside: (Ipv4Addr, u16),
    /// The remote endpoint (port 0 for ICMP).
    pub remote: (Ipv4Addr, u16),
    /// The TCP state (`None` for UDP and ICMP).
    pub tcp_state: Option<TcpState>,
    /// When a packet (or [`NatTable::refresh`]) last kept it alive.
    pub last_seen_ns: u64,
    /// When it dies unless refreshed (it is dead from this instant on).
    pub expires_at_ns: u64,
    /// Since when it is established: TCP since entering [`TcpState::Established`], UDP and ICMP
    /// since the first packet from outside.
    pub established_since_ns: Option<u64>,
    /// Packets counted by [`NatTable::record`]/[`NatTable::record_many`].
    pub packets: u64,
    /// Bytes counted likewise.
    pub bytes: u64,
    /// Whether the agent marked it as offloaded to hardware.
    pub offloaded: bool,
}

impl<I> SessionView<I> {
    /// What [`NatTable::offload_candidates`] reports: an established TCP session or a UDP
    /// session that has seen traffic both ways, alive at `now_ns`, established for at least
    /// `min_age_ns` and not marked offloaded.
    pub fn is_offload_candidate(&self, now_ns: u64, min_age_ns: u64) -> bool {
        let kind_ok = match self.proto {
            Proto::Tcp => self.tcp_state == Some(TcpState::Established),
            Proto::Udp => true,
            Proto::Icmp => false,
        };
        kind_ok
            && !self.offloaded
            && now_ns < self.expires_at_ns
            && self
                .established_since_ns
                .is_some_and(|t| now_ns.saturating_sub(t) >= min_age_ns)
    }
}

/// Counters of a [`NatTable`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NatStats {
    /// Mappings held now.
    pub mappings: usize,
    /// Sessions held now.
    pub sessions: usize,
    /// Sessions created.
    pub created: u64,
    /// Sessions removed because they expired (by the sweep or found dead by a packet).
    pub expired: u64,
    /// Mappings created.
    pub mappings_created: u64,
    /// Outbound packets refused with [`NatError::PortsExhausted`].
    pub port_exhausted: u64,
    /// Outbound packets refused with a full session or mapping table.
    pub table_full: u64,
    /// Inbound packets without a live session.
    pub inbound_dropped: u64,
    /// Sessions created by [`NatTable::import`] (not counted in `created`).
    pub imported: u64,
    /// Sessions removed by [`NatTable::remove_session`] (not counted in `expired`).
    pub removed: u64,
    /// Outbound packets refused with [`NatError::AllocationStopped`].
    pub alloc_stopped: u64,
}

// ---------------------------------------------------------------------------------------------
// The table

#[derive(Debug, Clone, Copy)]
struct Mapping<I> {
    proto: Proto,
    inside: (I, u16),
    addr_idx: u32,
    outside: (Ipv4Addr, u16),
    sessions: u32,
    /// First of its sessions (linked through `Session::map_next`), [`NIL`] for none.
    first: u32,
}

/// The end of a mapping's session list.
const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Session<I> {
    mapping: u32,
    proto: Proto,
    inside: (I, u16),
    outside: (Ipv4Addr, u16),
    remote: (Ipv4Addr, u16),
    /// Meaningful for TCP only.
    tcp: TcpState,
    last_ns: u64,
    established_since_ns: Option<u64>,
    packets: u64,
    bytes: u64,
    offloaded: bool,
    /// Position in the dense `live` list.
    live_pos: u32,
    /// Neighbours in its mapping's session list ([`NIL`] at the ends).
    map_prev: u32,
    map_next: u32,
}

#[derive(Debug, Clone, Copy)]
struct SessionSlot<I> {
    gen: u32,
    s: Option<Session<I>>,
}

fn lifetime<I>(t: &Timeouts, s: &Session<I>) -> u64 {
    match s.proto {
        Proto::Udp => t.udp_ns,
        Proto::Icmp => t.icmp_ns,
        Proto::Tcp if s.tcp.is_transitory() => t.tcp_transitory_ns,
        Proto::Tcp => t.tcp_established_ns,
    }
}

fn deadline<I>(t: &Timeouts, s: &Session<I>) -> u64 {
    s.last_ns.saturating_add(lifetime(t, s))
}

/// Advances a session for a packet in direction `dir`.
fn touch<I>(s: &mut Session<I>, dir: Dir, flags: u8, now_ns: u64) {
    s.last_ns = s.last_ns.max(now_ns);
    match s.proto {
        Proto::Tcp => {
            let next = tcp_next(s.tcp, dir, flags);
            if next == TcpState::Established && s.tcp != TcpState::Established {
                s.established_since_ns = Some(s.last_ns);
            } else if next == TcpState::Opening {
                s.established_since_ns = None;
            }
            s.tcp = next;
        }
        Proto::Udp | Proto::Icmp => {
            if dir == Dir::In && s.established_since_ns.is_none() {
                s.established_since_ns = Some(s.last_ns);
            }
        }
    }
}

/// The ICMP "remote port" is meaningless: replies carry our identifier.
fn normalize_remote(proto: Proto, remote: (Ipv4Addr, u16)) -> (Ipv4Addr, u16) {
    match proto {
        Proto::Icmp => (remote.0, 0),
        Proto::Tcp | Proto::Udp => remote,
    }
}

/// The stateful NAT table; `I` is the inside address type (`Ipv4Addr` for NAPT44, `Ipv6Addr`
/// for NAT64). See the module documentation.
pub struct NatTable<I>
where
    I: Copy + Eq + Hash + Debug,
{
    cfg: NatConfig,
    /// Seed of the index hashes (secret, per table).
    seed: u64,
    /// Key of paired pooling (a function of the pool: equal across a group's members).
    pairing_key: u64,
    idx_bits: u32,
    gen_mask: u32,
    mappings: Vec<Option<Mapping<I>>>,
    free_mappings: Vec<u32>,
    map_index: Index,
    /// Mappings by outside endpoint `(proto, outside addr, outside port)`.
    bind_index: Index,
    sessions: Vec<SessionSlot<I>>,
    free_sessions: Vec<u32>,
    /// Dense list of occupied session slots.
    live: Vec<u32>,
    out_index: Index,
    in_index: Index,
    ports: PortBitmaps,
    cursor: usize,
    stats: NatStats,
    /// May outbound packets create sessions ([`NatTable::set_allocation`]).
    allocate: bool,
    /// The change log, when enabled ([`NatTable::enable_change_log`]).
    log: Option<Box<ChangeLog<I>>>,
}

impl<I> fmt::Debug for NatTable<I>
where
    I: Copy + Eq + Hash + Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatTable")
            .field("pool", &self.cfg.pool)
            .field("port_range", &self.cfg.port_range)
            .field("block", &self.cfg.block)
            .field("max_mappings", &self.cfg.max_mappings)
            .field("max_sessions", &self.cfg.max_sessions)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn validate(cfg: &NatConfig) -> Result<(), NatConfigError> {
    if cfg.pool.is_empty() {
        return Err(NatConfigError::EmptyPool);
    }
    if cfg.pool.len() > MAX_POOL {
        return Err(NatConfigError::PoolTooLarge {
            len: cfg.pool.len(),
            max: MAX_POOL,
        });
    }
    let mut sorted = cfg.pool.clone();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w.first() == w.get(1)) {
        if let Some(&a) = w.first() {
            return Err(NatConfigError::DuplicatePoolAddress(a));
        }
    }
    let (lo, hi) = cfg.port_range;
    if lo == 0 || lo > hi {
        return Err(NatConfigError::BadPortRange { lo, hi });
    }
    cfg.block.ports(cfg.port_range)?;
    if cfg.max_mappings == 0 {
        return Err(NatConfigError::ZeroMappings);
    }
    if cfg.max_sessions == 0 {
        return Err(NatConfigError::ZeroSessions);
    }
    if cfg.max_mappings > MAX_CAPACITY {
        return Err(NatConfigError::TooManyMappings {
            requested: cfg.max_mappings,
            max: MAX_CAPACITY,
        });
    }
    if cfg.max_sessions > MAX_CAPACITY {
        return Err(NatConfigError::TooManySessions {
            requested: cfg.max_sessions,
            max: MAX_CAPACITY,
        });
    }
    let t = &cfg.timeouts;
    for (name, v) in [
        ("tcp_established_ns", t.tcp_established_ns),
        ("tcp_transitory_ns", t.tcp_transitory_ns),
        ("udp_ns", t.udp_ns),
        ("icmp_ns", t.icmp_ns),
    ] {
        if v == 0 {
            return Err(NatConfigError::ZeroTimeout(name));
        }
    }
    Ok(())
}

/// The key of the outbound index, and of a new session.
#[derive(Clone, Copy)]
struct FlowKey<I> {
    proto: Proto,
    inside: (I, u16),
    remote: (Ipv4Addr, u16),
}

impl<I> NatTable<I>
where
    I: Copy + Eq + Hash + Debug,
{
    /// Validates `cfg` and allocates all storage. The hash seed is drawn from `rng`.
    pub fn new(cfg: NatConfig, rng: &mut impl Random) -> Result<Self, NatError> {
        validate(&cfg)?;
        let block = cfg.block.ports(cfg.port_range)?;
        let seed = (u64::from(rng.next_u32()) << 32) | u64::from(rng.next_u32());
        let (lo, hi) = cfg.port_range;
        let n_sess = cfg.max_sessions;
        let n_map = cfg.max_mappings;
        // Bits for slot numbers 0..n_sess (at least 1, at most 24).
        let idx_bits = (u32::BITS - ((n_sess - 1) as u32).leading_zeros()).max(1);
        let gen_mask = u32::MAX >> idx_bits;

        let mut mappings = Vec::with_capacity(n_map);
        mappings.resize_with(n_map, || None);
        let free_mappings: Vec<u32> = (0..n_map as u32).rev().collect();
        let mut sessions = Vec::with_capacity(n_sess);
        sessions.resize_with(n_sess, || SessionSlot { gen: 0, s: None });
        let free_sessions: Vec<u32> = (0..n_sess as u32).rev().collect();
        let ports = PortBitmaps::new(cfg.pool.len() * 3, lo, hi, block);
        Ok(NatTable {
            seed,
            pairing_key: hash::pairing_key(&cfg.pool),
            idx_bits,
            gen_mask,
            mappings,
            free_mappings,
            map_index: Index::with_capacity(n_map),
            bind_index: Index::with_capacity(n_map),
            sessions,
            free_sessions,
            live: Vec::with_capacity(n_sess),
            out_index: Index::with_capacity(n_sess),
            in_index: Index::with_capacity(n_sess),
            ports,
            cursor: 0,
            stats: NatStats::default(),
            allocate: true,
            log: None,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NatConfig {
        &self.cfg
    }

    // --- hashing -----------------------------------------------------------------------------

    fn hash_map(&self, proto: Proto, inside: (I, u16)) -> u64 {
        hash::map_key(self.seed, proto, &inside)
    }

    fn hash_out(&self, k: &FlowKey<I>) -> u64 {
        hash::out_key(self.seed, k.proto, &k.inside, k.remote)
    }

    fn hash_in(&self, proto: Proto, outside: (Ipv4Addr, u16), remote: (Ipv4Addr, u16)) -> u64 {
        hash::in_key(self.seed, proto, outside, remote)
    }

    fn hash_bind(&self, proto: Proto, outside: (Ipv4Addr, u16)) -> u64 {
        hash::bind_key(self.seed, proto, outside)
    }

    /// The pool index paired with an inside address.
    fn paired_addr(&self, inside: I) -> u32 {
        hash::pool_index(self.pairing_key, &inside, self.cfg.pool.len())
    }

    // --- ids ---------------------------------------------------------------------------------

    fn make_id(&self, idx: u32, gen: u32) -> SessionId {
        SessionId(((gen & self.gen_mask) << self.idx_bits) | idx)
    }

    /// The slot of a live handle.
    fn resolve(&self, id: SessionId) -> Option<usize> {
        let idx = (id.0 & ((1u32 << self.idx_bits) - 1)) as usize;
        let gen = id.0 >> self.idx_bits;
        let slot = self.sessions.get(idx)?;
        (slot.gen == gen && slot.s.is_some()).then_some(idx)
    }

    fn session_mut(&mut self, id: SessionId) -> Option<&mut Session<I>> {
        let idx = self.resolve(id)?;
        self.sessions.get_mut(idx)?.s.as_mut()
    }

    fn view(&self, idx: u32, gen: u32, s: &Session<I>) -> SessionView<I> {
        SessionView {
            id: self.make_id(idx, gen),
            proto: s.proto,
            inside: s.inside,
            outside: s.outside,
            remote: s.remote,
            tcp_state: (s.proto == Proto::Tcp).then_some(s.tcp),
            last_seen_ns: s.last_ns,
            expires_at_ns: deadline(&self.cfg.timeouts, s),
            established_since_ns: s.established_since_ns,
            packets: s.packets,
            bytes: s.bytes,
            offloaded: s.offloaded,
        }
    }

    fn translation(&self, idx: u32, gen: u32, s: &Session<I>) -> Translation<I> {
        Translation {
            session: self.make_id(idx, gen),
            inside: s.inside,
            outside: s.outside,
            remote: s.remote,
        }
    }

    /// Applies a packet to a session if it is still alive; `None` if it is dead.
    fn hit(&mut self, idx: u32, dir: Dir, flags: u8, now_ns: u64) -> Option<Translation<I>> {
        let timeouts = self.cfg.timeouts;
        let slot = self.sessions.get_mut(idx as usize)?;
        let gen = slot.gen;
        let s = slot.s.as_mut()?;
        if now_ns >= deadline(&timeouts, s) {
            return None;
        }
        let before = (s.tcp, s.established_since_ns.is_some());
        touch(s, dir, flags, now_ns);
        let s = *s;
        if self.log.is_some() && (s.tcp, s.established_since_ns.is_some()) != before {
            self.log_change(ChangeKind::Changed, idx, gen, &s);
        }
        Some(self.translation(idx, gen, &s))
    }

    // --- packets -----------------------------------------------------------------------------

    /// Inside → outside: finds or creates the mapping for `(proto, inside)` and the session to
    /// `remote`, and returns the outside endpoint to rewrite the source to. `tcp_flags` drives
    /// the TCP state machine (pass 0 for UDP and ICMP). For ICMP, `inside.1` is the echo
    /// identifier and the remote port is ignored.
    ///
    /// On error nothing is created.
    pub fn outbound(
        &mut self,
        proto: Proto,
        inside: (I, u16),
        remote: (Ipv4Addr, u16),
        tcp_flags: u8,
        now_ns: u64,
        rng: &mut impl Random,
    ) -> Result<Translation<I>, NatError> {
        let key = FlowKey {
            proto,
            inside,
            remote: normalize_remote(proto, remote),
        };
        let h_out = self.hash_out(&key);
        if let Some(idx) = self.find_flow(h_out, &key) {
            if let Some(t) = self.hit(idx, Dir::Out, tcp_flags, now_ns) {
                return Ok(t);
            }
            // Dead but not swept yet: replace it by a fresh session.
            self.remove_slot(idx);
        }
        self.create_session(&key, h_out, tcp_flags, now_ns, rng)
    }

    /// Outside → inside: a packet from `remote` to our `outside` endpoint. Returns the inside
    /// endpoint if a live session to exactly that remote exists (refreshing it and advancing
    /// its TCP state); `None` means drop. Inbound packets never create state. For ICMP,
    /// `outside.1` is the echo identifier and the remote port is ignored.
    pub fn inbound(
        &mut self,
        proto: Proto,
        remote: (Ipv4Addr, u16),
        outside: (Ipv4Addr, u16),
        tcp_flags: u8,
        now_ns: u64,
    ) -> Option<Translation<I>> {
        let remote = normalize_remote(proto, remote);
        let h_in = self.hash_in(proto, outside, remote);
        let sessions = &self.sessions;
        let found = self.in_index.find(h_in, |i| {
            sessions
                .get(i as usize)
                .and_then(|slot| slot.s.as_ref())
                .is_some_and(|s| s.proto == proto && s.outside == outside && s.remote == remote)
        });
        let Some(idx) = found else {
            self.stats.inbound_dropped += 1;
            return None;
        };
        let t = self.hit(idx, Dir::In, tcp_flags, now_ns);
        if t.is_none() {
            self.remove_slot(idx);
            self.stats.inbound_dropped += 1;
        }
        t
    }

    /// The session of a flow (`h_out` is the hash of `key`).
    fn find_flow(&self, h_out: u64, key: &FlowKey<I>) -> Option<u32> {
        let sessions = &self.sessions;
        self.out_index.find(h_out, |i| {
            sessions
                .get(i as usize)
                .and_then(|slot| slot.s.as_ref())
                .is_some_and(|s| {
                    s.proto == key.proto && s.inside == key.inside && s.remote == key.remote
                })
        })
    }

    fn find_mapping(&self, h_map: u64, key: &FlowKey<I>) -> Option<u32> {
        self.map_index.find(h_map, |i| {
            self.mappings
                .get(i as usize)
                .and_then(Option::as_ref)
                .is_some_and(|m| m.proto == key.proto && m.inside == key.inside)
        })
    }

    /// Whether creating a session (and a mapping unless `have_mapping`) would hit a limit.
    fn short_of_room(&self, have_mapping: bool, key: &FlowKey<I>) -> bool {
        if self.free_sessions.is_empty() {
            return true;
        }
        if have_mapping {
            return false;
        }
        let set = PortBitmaps::set_of(self.paired_addr(key.inside.0), key.proto);
        self.free_mappings.is_empty() || self.ports.block_free(set) == 0
    }

    fn create_session(
        &mut self,
        key: &FlowKey<I>,
        h_out: u64,
        tcp_flags: u8,
        now_ns: u64,
        rng: &mut impl Random,
    ) -> Result<Translation<I>, NatError> {
        if !self.allocate {
            self.stats.alloc_stopped += 1;
            return Err(NatError::AllocationStopped);
        }
        let h_map = self.hash_map(key.proto, key.inside);
        let mut found = self.find_mapping(h_map, key);
        if self.short_of_room(found.is_some(), key) {
            // Reclaim dead sessions before refusing; this may free the mapping found above.
            self.expire(now_ns, RECLAIM_BUDGET);
            found = self.find_mapping(h_map, key);
        }
        let Some(sidx) = self.free_sessions.pop() else {
            self.stats.table_full += 1;
            return Err(NatError::SessionTableFull {
                capacity: self.cfg.max_sessions,
            });
        };
        let midx = match found {
            Some(m) => m,
            None => match self.create_mapping(key, h_map, rng) {
                Ok(m) => m,
                Err(e) => {
                    self.free_sessions.push(sidx);
                    return Err(e);
                }
            },
        };
        let Some(m) = self
            .mappings
            .get_mut(midx as usize)
            .and_then(Option::as_mut)
        else {
            self.free_sessions.push(sidx);
            return Err(NatError::MappingTableFull {
                capacity: self.cfg.max_mappings,
            });
        };
        // Nothing can fail from here on.
        m.sessions += 1;
        let outside = m.outside;
        let mut s = Session {
            mapping: midx,
            proto: key.proto,
            inside: key.inside,
            outside,
            remote: key.remote,
            tcp: TcpState::Opening,
            last_ns: now_ns,
            established_since_ns: None,
            packets: 0,
            bytes: 0,
            offloaded: false,
            live_pos: self.live.len() as u32,
            map_prev: NIL,
            map_next: NIL,
        };
        touch(&mut s, Dir::Out, tcp_flags, now_ns);
        let gen = self.link_session(sidx, s, h_out);
        self.stats.created += 1;
        if self.log.is_some() {
            self.log_change(ChangeKind::Created, sidx, gen, &s);
        }
        Ok(self.translation(sidx, gen, &s))
    }

    /// Puts session `s` (whose mapping already counts it, and whose `live_pos` is the end of
    /// the live list) in the free slot `sidx` taken from the free list, links it into its
    /// mapping's session list and indexes it (`h_out` is the hash of its flow). Returns the
    /// slot's generation.
    fn link_session(&mut self, sidx: u32, mut s: Session<I>, h_out: u64) -> u32 {
        s.map_prev = NIL;
        s.map_next = NIL;
        if let Some(m) = self
            .mappings
            .get_mut(s.mapping as usize)
            .and_then(Option::as_mut)
        {
            s.map_next = m.first;
            m.first = sidx;
        }
        if let Some(next) = self
            .sessions
            .get_mut(s.map_next as usize)
            .and_then(|slot| slot.s.as_mut())
        {
            next.map_prev = sidx;
        }
        let h_in = self.hash_in(s.proto, s.outside, s.remote);
        let gen = match self.sessions.get_mut(sidx as usize) {
            Some(slot) => {
                slot.s = Some(s);
                slot.gen
            }
            None => 0,
        };
        self.live.push(sidx);
        self.out_index.insert(h_out, sidx);
        self.in_index.insert(h_in, sidx);
        gen
    }

    fn create_mapping(
        &mut self,
        key: &FlowKey<I>,
        h_map: u64,
        rng: &mut impl Random,
    ) -> Result<u32, NatError> {
        let Some(&midx) = self.free_mappings.last() else {
            self.stats.table_full += 1;
            return Err(NatError::MappingTableFull {
                capacity: self.cfg.max_mappings,
            });
        };
        let addr_idx = self.paired_addr(key.inside.0);
        let addr = self
            .cfg
            .pool
            .get(addr_idx as usize)
            .copied()
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        let set = PortBitmaps::set_of(addr_idx, key.proto);
        let Some(port) = self.ports.alloc(set, rng) else {
            self.stats.port_exhausted += 1;
            return Err(NatError::PortsExhausted { addr });
        };
        self.free_mappings.pop();
        self.insert_mapping(
            midx,
            h_map,
            Mapping {
                proto: key.proto,
                inside: key.inside,
                addr_idx,
                outside: (addr, port),
                sessions: 0,
                first: NIL,
            },
        );
        Ok(midx)
    }

    /// Stores a new mapping in slot `midx` (taken from the free list; its port already
    /// marked used) and indexes it (`h_map` is the hash of its inside endpoint).
    fn insert_mapping(&mut self, midx: u32, h_map: u64, m: Mapping<I>) {
        let h_bind = self.hash_bind(m.proto, m.outside);
        if let Some(slot) = self.mappings.get_mut(midx as usize) {
            *slot = Some(m);
        }
        self.map_index.insert(h_map, midx);
        self.bind_index.insert(h_bind, midx);
        self.stats.mappings_created += 1;
    }

    /// The mapping bound to an outside endpoint.
    fn find_binding(&self, proto: Proto, outside: (Ipv4Addr, u16)) -> Option<u32> {
        self.bind_index.find(self.hash_bind(proto, outside), |i| {
            self.mappings
                .get(i as usize)
                .and_then(Option::as_ref)
                .is_some_and(|m| m.proto == proto && m.outside == outside)
        })
    }

    /// Removes a dead session ([`Self::unlink_slot`]) and counts it as expired.
    fn remove_slot(&mut self, idx: u32) -> Option<SessionView<I>> {
        let v = self.unlink_slot(idx)?;
        self.stats.expired += 1;
        Some(v)
    }

    /// Removes a session, and its mapping if it was the last one. Returns what it was.
    fn unlink_slot(&mut self, idx: u32) -> Option<SessionView<I>> {
        let slot = self.sessions.get(idx as usize)?;
        let gen = slot.gen;
        let s = slot.s?;
        let view = self.view(idx, gen, &s);
        if self.log.is_some() {
            self.log_change(ChangeKind::Deleted, idx, gen, &s);
        }
        if let Some(slot) = self.sessions.get_mut(idx as usize) {
            slot.s = None;
            slot.gen = gen.wrapping_add(1) & self.gen_mask;
        }
        let key = FlowKey {
            proto: s.proto,
            inside: s.inside,
            remote: s.remote,
        };
        let h_out = self.hash_out(&key);
        self.out_index.remove(h_out, idx);
        let h_in = self.hash_in(s.proto, s.outside, s.remote);
        self.in_index.remove(h_in, idx);
        match self
            .sessions
            .get_mut(s.map_prev as usize)
            .and_then(|slot| slot.s.as_mut())
        {
            Some(prev) => prev.map_next = s.map_next,
            None => {
                if let Some(m) = self
                    .mappings
                    .get_mut(s.mapping as usize)
                    .and_then(Option::as_mut)
                {
                    m.first = s.map_next;
                }
            }
        }
        if let Some(next) = self
            .sessions
            .get_mut(s.map_next as usize)
            .and_then(|slot| slot.s.as_mut())
        {
            next.map_prev = s.map_prev;
        }
        let pos = s.live_pos as usize;
        if self.live.get(pos) == Some(&idx) {
            self.live.swap_remove(pos);
            if let Some(&moved) = self.live.get(pos) {
                if let Some(m) = self
                    .sessions
                    .get_mut(moved as usize)
                    .and_then(|slot| slot.s.as_mut())
                {
                    m.live_pos = pos as u32;
                }
            }
        }
        self.free_sessions.push(idx);
        self.release_mapping(s.mapping);
        Some(view)
    }

    fn release_mapping(&mut self, midx: u32) {
        let Some(m) = self
            .mappings
            .get_mut(midx as usize)
            .and_then(Option::as_mut)
        else {
            return;
        };
        m.sessions = m.sessions.saturating_sub(1);
        if m.sessions > 0 {
            return;
        }
        let m = *m;
        self.ports
            .release(PortBitmaps::set_of(m.addr_idx, m.proto), m.outside.1);
        let h_map = self.hash_map(m.proto, m.inside);
        self.map_index.remove(h_map, midx);
        let h_bind = self.hash_bind(m.proto, m.outside);
        self.bind_index.remove(h_bind, midx);
        if let Some(slot) = self.mappings.get_mut(midx as usize) {
            *slot = None;
        }
        self.free_mappings.push(midx);
    }

    // --- expiry ------------------------------------------------------------------------------

    /// Removes dead sessions (and mappings left without sessions), visiting at most `budget`
    /// sessions from where the previous call stopped. Returns how many sessions were removed.
    pub fn expire(&mut self, now_ns: u64, budget: usize) -> usize {
        self.expire_with(now_ns, budget, |_| {})
    }

    /// [`NatTable::expire`], calling `on_removed` with a snapshot of each removed session (so
    /// the agent can destroy the hardware rules of offloaded ones).
    pub fn expire_with(
        &mut self,
        now_ns: u64,
        budget: usize,
        mut on_removed: impl FnMut(&SessionView<I>),
    ) -> usize {
        let timeouts = self.cfg.timeouts;
        let mut removed = 0;
        let mut steps = budget.min(self.live.len());
        while steps > 0 {
            steps -= 1;
            if self.cursor >= self.live.len() {
                self.cursor = 0;
            }
            let Some(&idx) = self.live.get(self.cursor) else {
                break;
            };
            let dead = self
                .sessions
                .get(idx as usize)
                .and_then(|slot| slot.s.as_ref())
                .is_none_or(|s| now_ns >= deadline(&timeouts, s));
            if dead {
                // The last session moves into the cursor's place: look at it next.
                if let Some(v) = self.remove_slot(idx) {
                    on_removed(&v);
                    removed += 1;
                } else {
                    self.cursor += 1;
                }
            } else {
                self.cursor += 1;
            }
        }
        removed
    }

    // --- redundancy: the allocation gate ---------------------------------------------------

    /// Allows or stops the creation of sessions (and so of bindings) by outbound packets: a
    /// member of a redundancy group that is standby or fenced must not allocate. Stopped,
    /// [`NatTable::outbound`] still translates packets of live sessions, but a packet that
    /// would create one fails with [`NatError::AllocationStopped`] (counted in
    /// [`NatStats::alloc_stopped`]) and changes nothing. Imports are not affected. Allowed by
    /// default.
    pub fn set_allocation(&mut self, allow: bool) {
        self.allocate = allow;
    }

    /// Whether outbound packets may create sessions.
    pub fn allocation_allowed(&self) -> bool {
        self.allocate
    }

    /// Moves the table to another allocation block (see [`AllocBlock`]), e.g. when the agent
    /// learns at start that it is member `index` of a pair. Existing mappings keep their ports
    /// wherever they lie; new ports come from the new block only. Refused (nothing changes)
    /// if the port range cannot be cut so ([`AllocBlock::ports`]).
    pub fn set_block(&mut self, block: AllocBlock) -> Result<(), NatConfigError> {
        let ports = block.ports(self.cfg.port_range)?;
        self.ports.set_block(ports);
        self.cfg.block = block;
        Ok(())
    }

    // --- offload hooks -----------------------------------------------------------------------

    /// Counts one packet of `bytes` bytes on a session. Returns false for an unknown id.
    pub fn record(&mut self, id: SessionId, bytes: u32) -> bool {
        self.record_many(id, 1, u64::from(bytes))
    }

    /// Adds counter deltas (e.g. from hardware counters) to a session. Returns false for an
    /// unknown id.
    pub fn record_many(&mut self, id: SessionId, packets: u64, bytes: u64) -> bool {
        match self.session_mut(id) {
            Some(s) => {
                s.packets = s.packets.saturating_add(packets);
                s.bytes = s.bytes.saturating_add(bytes);
                true
            }
            None => false,
        }
    }

    /// Marks a session as offloaded to hardware (or not). Returns false for an unknown id.
    pub fn mark_offloaded(&mut self, id: SessionId, offloaded: bool) -> bool {
        match self.session_mut(id) {
            Some(s) => {
                s.offloaded = offloaded;
                true
            }
            None => false,
        }
    }

    /// Keeps a session alive as if a packet had been seen at `now_ns` (the agent calls this
    /// when the hardware counters of an offloaded session moved). The TCP state is unchanged.
    /// Returns false if the id is unknown or the session is already dead at `now_ns`.
    pub fn refresh(&mut self, id: SessionId, now_ns: u64) -> bool {
        let timeouts = self.cfg.timeouts;
        match self.session_mut(id) {
            Some(s) if now_ns < deadline(&timeouts, s) => {
                s.last_ns = s.last_ns.max(now_ns);
                true
            }
            _ => false,
        }
    }

    /// Established TCP sessions and two-way UDP sessions, alive at `now_ns`, established for at
    /// least `min_age_ns` and not marked offloaded: what the agent may offload.
    pub fn offload_candidates(
        &self,
        now_ns: u64,
        min_age_ns: u64,
    ) -> impl Iterator<Item = SessionView<I>> + '_ {
        self.sessions()
            .filter(move |v| v.is_offload_candidate(now_ns, min_age_ns))
    }

    /// The session at position `pos` of the dense list of sessions (`0..session_count()`), for
    /// scans that visit a bounded number of sessions per call. Removals move the last session
    /// into the removed one's position, so a scan may miss or repeat a session now and then.
    pub fn session_at(&self, pos: usize) -> Option<SessionView<I>> {
        let idx = *self.live.get(pos)?;
        let slot = self.sessions.get(idx as usize)?;
        let s = slot.s.as_ref()?;
        Some(self.view(idx, slot.gen, s))
    }

    // --- inspection --------------------------------------------------------------------------

    /// A snapshot of a session, while it is in the table (it may be past its deadline and not
    /// swept yet: compare [`SessionView::expires_at_ns`] with the time).
    pub fn session(&self, id: SessionId) -> Option<SessionView<I>> {
        let idx = self.resolve(id)?;
        let slot = self.sessions.get(idx)?;
        let s = slot.s.as_ref()?;
        Some(self.view(idx as u32, slot.gen, s))
    }

    /// Every session in the table (including dead ones not swept yet).
    pub fn sessions(&self) -> impl Iterator<Item = SessionView<I>> + '_ {
        self.live.iter().filter_map(move |&idx| {
            let slot = self.sessions.get(idx as usize)?;
            let s = slot.s.as_ref()?;
            Some(self.view(idx, slot.gen, s))
        })
    }

    /// The outside endpoint of the mapping of `(proto, inside)`, if there is one.
    pub fn mapping(&self, proto: Proto, inside: (I, u16)) -> Option<(Ipv4Addr, u16)> {
        let h_map = self.hash_map(proto, inside);
        let midx = self.map_index.find(h_map, |i| {
            self.mappings
                .get(i as usize)
                .and_then(Option::as_ref)
                .is_some_and(|m| m.proto == proto && m.inside == inside)
        })?;
        self.mappings
            .get(midx as usize)
            .and_then(Option::as_ref)
            .map(|m| m.outside)
    }

    /// The inside endpoint whose mapping uses `outside` for `proto`, if there is one (the
    /// reverse of [`NatTable::mapping`]).
    pub fn binding(&self, proto: Proto, outside: (Ipv4Addr, u16)) -> Option<(I, u16)> {
        let midx = self.find_binding(proto, outside)?;
        self.mappings
            .get(midx as usize)
            .and_then(Option::as_ref)
            .map(|m| m.inside)
    }

    /// The counters.
    pub fn stats(&self) -> NatStats {
        NatStats {
            mappings: self.mapping_count(),
            sessions: self.session_count(),
            ..self.stats
        }
    }

    /// Sessions in the table.
    pub fn session_count(&self) -> usize {
        self.live.len()
    }

    /// Mappings in the table.
    pub fn mapping_count(&self) -> usize {
        self.cfg.max_mappings - self.free_mappings.len()
    }
}
