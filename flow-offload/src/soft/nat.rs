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
//!   seeded hash of the inside address, so one inside host always appears behind one outside
//!   address. When that address has no free port for the protocol the packet fails with
//!   [`NatError::PortsExhausted`]; there is no fallback to another address (which would break
//!   pairing).
//! - **Port choice** (RFC 6056 in spirit): a uniformly random port of the configured range,
//!   [`PORT_PROBES`] tries against a per-(outside address, protocol) free-port bitmap, then a
//!   word-wise scan of that bitmap from a random word — bounded by the range size. ICMP query
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
//! lists, the dense list of live sessions (for the sweep and iteration), the port bitmaps and
//! three open-addressing indexes with linear probing and backward-shift deletion (no
//! tombstones), each at most half full:
//!
//! - mapping index: `(proto, inside addr, inside port)` → mapping;
//! - outbound index: `(proto, inside addr, inside port, remote addr, remote port)` → session;
//! - inbound index: `(proto, outside addr, outside port, remote addr, remote port)` → session.
//!
//! A packet of a known flow costs one index lookup. `outbound`, `inbound` and `expire` never
//! allocate. Keys are attacker-influenced, so the hash (a multiply-xorshift over the key's
//! words with a murmur-style finaliser, written here) starts from a per-table seed drawn from
//! [`Random`] at construction. It is not a cryptographic PRF; it makes collisions unpredictable
//! to an outsider, and probe lengths are bounded by the index size in any case.
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
use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// TCP FIN flag, as in the `tcp_flags` arguments.
pub const TCP_FIN: u8 = 0x01;
/// TCP SYN flag.
pub const TCP_SYN: u8 = 0x02;
/// TCP RST flag.
pub const TCP_RST: u8 = 0x04;
/// TCP ACK flag.
pub const TCP_ACK: u8 = 0x10;

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
    /// The outside address paired with the inside host has no free port for the protocol.
    #[error("no free port left on outside address {addr}")]
    PortsExhausted {
        /// The paired outside address.
        addr: Ipv4Addr,
    },
}

/// The TCP state of a session (simplified RFC 6146 §3.5.2).
///
/// Transitions, for a packet in either direction (`out` = from inside):
/// - any RST → `Reset`;
/// - `Opening` + packet from outside → `Established`;
/// - `Reset` + SYN from inside → `Opening`; `Reset` + any other packet → `Established`;
/// - `Closing` + SYN from inside → `Opening` (the 5-tuple is reused, RFC 7857);
/// - then a FIN: `Established` → `FinOutbound`/`FinInbound` by direction, and the one-sided
///   FIN states → `Closing` on a FIN from the other side.
///
/// `Opening`, `Closing` and `Reset` get the transitory lifetime, the others the established one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TcpState {
    /// Opened from inside, nothing seen from the remote yet.
    Opening,
    /// Both sides have spoken.
    Established,
    /// FIN seen from inside only.
    FinOutbound,
    /// FIN seen from outside only.
    FinInbound,
    /// FIN seen from both sides.
    Closing,
    /// RST seen.
    Reset,
}

impl TcpState {
    /// Whether this state gets the transitory lifetime.
    pub const fn is_transitory(self) -> bool {
        matches!(
            self,
            TcpState::Opening | TcpState::Closing | TcpState::Reset
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Out,
    In,
}

fn tcp_next(state: TcpState, dir: Dir, flags: u8) -> TcpState {
    use TcpState::*;
    if flags & TCP_RST != 0 {
        return Reset;
    }
    let syn = flags & TCP_SYN != 0;
    let s = match (state, dir) {
        (Opening, Dir::In) => Established,
        (Reset | Closing, Dir::Out) if syn => Opening,
        (Reset, _) => Established,
        (s, _) => s,
    };
    if flags & TCP_FIN == 0 {
        return s;
    }
    match (s, dir) {
        (Established, Dir::Out) => FinOutbound,
        (Established, Dir::In) => FinInbound,
        (FinInbound, Dir::Out) | (FinOutbound, Dir::In) => Closing,
        (s, _) => s,
    }
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
}

// ---------------------------------------------------------------------------------------------
// Hashing

const MUL: u64 = 0x9E37_79B9_7F4A_7C15;
const TAG_MAP: u64 = 0x6d61_7070_696e_6721;
const TAG_OUT: u64 = 0x6f75_7462_6f75_6e64;
const TAG_IN: u64 = 0x696e_626f_756e_6421;
const TAG_POOL: u64 = 0x706f_6f6c_6564_2121;

/// A seeded multiply-xorshift hasher over 64-bit words.
#[derive(Clone, Copy)]
struct Mix(u64);

impl Mix {
    #[inline]
    fn new(seed: u64, tag: u64) -> Self {
        Mix(seed ^ tag.wrapping_mul(MUL))
    }

    #[inline]
    fn add(&mut self, v: u64) {
        let x = (self.0 ^ v).wrapping_mul(MUL);
        self.0 = x ^ (x >> 29);
    }
}

impl Hasher for Mix {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            if let Ok(b) = <[u8; 8]>::try_from(c) {
                self.add(u64::from_le_bytes(b));
            }
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            for (d, s) in b.iter_mut().zip(rest) {
                *d = *s;
            }
            self.add(u64::from_le_bytes(b) ^ ((rest.len() as u64) << 59));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        // The murmur3 64-bit finaliser.
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }
}

fn addr_word(a: Ipv4Addr) -> u64 {
    u64::from(u32::from(a))
}

// ---------------------------------------------------------------------------------------------
// Open-addressing index

const EMPTY: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Slot {
    hash: u32,
    idx: u32,
}

const EMPTY_SLOT: Slot = Slot {
    hash: 0,
    idx: EMPTY,
};

/// Linear probing over `u32` entry numbers, with the low 32 bits of the hash kept beside them;
/// backward-shift deletion. Sized to at least twice the entries it will ever hold.
struct Index {
    slots: Vec<Slot>,
    mask: usize,
    len: usize,
}

impl Index {
    fn with_capacity(entries: usize) -> Self {
        let n = entries.saturating_mul(2).max(8).next_power_of_two();
        Index {
            slots: vec![EMPTY_SLOT; n],
            mask: n - 1,
            len: 0,
        }
    }

    #[inline]
    fn home(&self, hash: u32) -> usize {
        hash as usize & self.mask
    }

    /// The entry with this hash for which `eq` holds.
    #[inline]
    fn find(&self, hash: u64, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
        let h = hash as u32;
        let mut pos = self.home(h);
        for _ in 0..self.slots.len() {
            let s = self.slots.get(pos)?;
            if s.idx == EMPTY {
                return None;
            }
            if s.hash == h && eq(s.idx) {
                return Some(s.idx);
            }
            pos = (pos + 1) & self.mask;
        }
        None
    }

    /// Adds an entry (the caller guarantees it is not present). Returns false only if the
    /// index is full, which its sizing rules out.
    fn insert(&mut self, hash: u64, idx: u32) -> bool {
        let h = hash as u32;
        let mut pos = self.home(h);
        for _ in 0..self.slots.len() {
            if let Some(s) = self.slots.get_mut(pos) {
                if s.idx == EMPTY {
                    *s = Slot { hash: h, idx };
                    self.len += 1;
                    return true;
                }
            }
            pos = (pos + 1) & self.mask;
        }
        false
    }

    /// Removes entry `idx` stored under `hash`. Returns whether it was there.
    fn remove(&mut self, hash: u64, idx: u32) -> bool {
        let h = hash as u32;
        let mut pos = self.home(h);
        let mut found = None;
        for _ in 0..self.slots.len() {
            let Some(s) = self.slots.get(pos) else {
                return false;
            };
            if s.idx == EMPTY {
                return false;
            }
            if s.idx == idx {
                found = Some(pos);
                break;
            }
            pos = (pos + 1) & self.mask;
        }
        let Some(mut hole) = found else {
            return false;
        };
        // Backward shift: pull later members of the cluster into the hole when the hole lies
        // on their probe path (between their home and where they sit).
        let mut j = (hole + 1) & self.mask;
        for _ in 0..self.slots.len() {
            let Some(&s) = self.slots.get(j) else {
                break;
            };
            if s.idx == EMPTY {
                break;
            }
            let from_home = j.wrapping_sub(self.home(s.hash)) & self.mask;
            let from_hole = j.wrapping_sub(hole) & self.mask;
            if from_home >= from_hole {
                if let Some(d) = self.slots.get_mut(hole) {
                    *d = s;
                }
                hole = j;
            }
            j = (j + 1) & self.mask;
        }
        if let Some(d) = self.slots.get_mut(hole) {
            *d = EMPTY_SLOT;
        }
        self.len -= 1;
        true
    }
}

// ---------------------------------------------------------------------------------------------
// Port bitmaps

/// One free-port bitmap per (outside address, protocol), over the configured range.
struct PortBitmaps {
    lo: u16,
    /// Ports in the range (1..=65535).
    n: u32,
    /// 64-bit words per bitmap.
    words: usize,
    /// Set bit = port in use.
    bits: Vec<u64>,
    /// Free ports per bitmap.
    free: Vec<u32>,
}

impl PortBitmaps {
    fn new(sets: usize, lo: u16, hi: u16) -> Self {
        let n = u32::from(hi) - u32::from(lo) + 1;
        let words = n.div_ceil(64) as usize;
        PortBitmaps {
            lo,
            n,
            words,
            bits: vec![0; sets * words],
            free: vec![n; sets],
        }
    }

    fn set_of(addr_idx: u32, proto: Proto) -> usize {
        addr_idx as usize * 3 + proto.index()
    }

    /// Bits of word `w` beyond the range, reported as used.
    fn tail(&self, w: usize) -> u64 {
        let rem = self.n % 64;
        if w + 1 == self.words && rem != 0 {
            !((1u64 << rem) - 1)
        } else {
            0
        }
    }

    fn take(&mut self, set: usize, off: u32) -> Option<u16> {
        let word = self.bits.get_mut(set * self.words + (off / 64) as usize)?;
        *word |= 1u64 << (off % 64);
        if let Some(f) = self.free.get_mut(set) {
            *f = f.saturating_sub(1);
        }
        u16::try_from(u32::from(self.lo) + off).ok()
    }

    fn is_free(&self, set: usize, off: u32) -> bool {
        self.bits
            .get(set * self.words + (off / 64) as usize)
            .is_some_and(|w| w & (1u64 << (off % 64)) == 0)
    }

    fn alloc(&mut self, set: usize, rng: &mut impl Random) -> Option<u16> {
        if self.free.get(set).copied().unwrap_or(0) == 0 {
            return None;
        }
        let n = u64::from(self.n);
        for _ in 0..PORT_PROBES {
            let off = ((u64::from(rng.next_u32()) * n) >> 32) as u32;
            if self.is_free(set, off) {
                return self.take(set, off);
            }
        }
        let words = self.words;
        let start = ((u64::from(rng.next_u32()) * words as u64) >> 32) as usize;
        for k in 0..words {
            let w = (start + k) % words;
            let used = self.bits.get(set * words + w).copied().unwrap_or(u64::MAX) | self.tail(w);
            if used != u64::MAX {
                let off = (w * 64) as u32 + (!used).trailing_zeros();
                return self.take(set, off);
            }
        }
        None
    }

    fn release(&mut self, set: usize, port: u16) {
        let Some(off) = u32::from(port).checked_sub(u32::from(self.lo)) else {
            return;
        };
        if off >= self.n {
            return;
        }
        if let Some(word) = self.bits.get_mut(set * self.words + (off / 64) as usize) {
            let bit = 1u64 << (off % 64);
            if *word & bit != 0 {
                *word &= !bit;
                if let Some(f) = self.free.get_mut(set) {
                    *f += 1;
                }
            }
        }
    }
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
}

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
    seed: u64,
    idx_bits: u32,
    gen_mask: u32,
    mappings: Vec<Option<Mapping<I>>>,
    free_mappings: Vec<u32>,
    map_index: Index,
    sessions: Vec<SessionSlot<I>>,
    free_sessions: Vec<u32>,
    /// Dense list of occupied session slots.
    live: Vec<u32>,
    out_index: Index,
    in_index: Index,
    ports: PortBitmaps,
    cursor: usize,
    stats: NatStats,
}

impl<I> fmt::Debug for NatTable<I>
where
    I: Copy + Eq + Hash + Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatTable")
            .field("pool", &self.cfg.pool)
            .field("port_range", &self.cfg.port_range)
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
        let ports = PortBitmaps::new(cfg.pool.len() * 3, lo, hi);
        Ok(NatTable {
            seed,
            idx_bits,
            gen_mask,
            mappings,
            free_mappings,
            map_index: Index::with_capacity(n_map),
            sessions,
            free_sessions,
            live: Vec::with_capacity(n_sess),
            out_index: Index::with_capacity(n_sess),
            in_index: Index::with_capacity(n_sess),
            ports,
            cursor: 0,
            stats: NatStats::default(),
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NatConfig {
        &self.cfg
    }

    // --- hashing -----------------------------------------------------------------------------

    fn hash_map(&self, proto: Proto, inside: (I, u16)) -> u64 {
        let mut h = Mix::new(self.seed, TAG_MAP);
        h.add((proto.tag() << 16) | u64::from(inside.1));
        inside.0.hash(&mut h);
        h.finish()
    }

    fn hash_out(&self, k: &FlowKey<I>) -> u64 {
        let mut h = Mix::new(self.seed, TAG_OUT);
        h.add(
            (addr_word(k.remote.0) << 32) | (u64::from(k.inside.1) << 16) | u64::from(k.remote.1),
        );
        h.add(k.proto.tag());
        k.inside.0.hash(&mut h);
        h.finish()
    }

    fn hash_in(&self, proto: Proto, outside: (Ipv4Addr, u16), remote: (Ipv4Addr, u16)) -> u64 {
        let mut h = Mix::new(self.seed, TAG_IN);
        h.add((addr_word(outside.0) << 32) | (u64::from(outside.1) << 16) | u64::from(remote.1));
        h.add((addr_word(remote.0) << 8) | proto.tag());
        h.finish()
    }

    /// The pool index paired with an inside address.
    fn paired_addr(&self, inside: I) -> u32 {
        let mut h = Mix::new(self.seed, TAG_POOL);
        inside.hash(&mut h);
        (h.finish() % self.cfg.pool.len() as u64) as u32
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
        touch(s, dir, flags, now_ns);
        let s = *s;
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
        let sessions = &self.sessions;
        let found = self.out_index.find(h_out, |i| {
            sessions
                .get(i as usize)
                .and_then(|slot| slot.s.as_ref())
                .is_some_and(|s| {
                    s.proto == key.proto && s.inside == key.inside && s.remote == key.remote
                })
        });
        if let Some(idx) = found {
            if let Some(t) = self.hit(idx, Dir::Out, tcp_flags, now_ns) {
                return Ok(t);
            }
            // Dead but not swept yet: replace it by a fresh session.
            self.remove_session(idx);
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
            self.remove_session(idx);
            self.stats.inbound_dropped += 1;
        }
        t
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
        self.free_mappings.is_empty() || self.ports.free.get(set).copied().unwrap_or(0) == 0
    }

    fn create_session(
        &mut self,
        key: &FlowKey<I>,
        h_out: u64,
        tcp_flags: u8,
        now_ns: u64,
        rng: &mut impl Random,
    ) -> Result<Translation<I>, NatError> {
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
        };
        touch(&mut s, Dir::Out, tcp_flags, now_ns);
        let h_in = self.hash_in(key.proto, outside, key.remote);
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
        self.stats.created += 1;
        Ok(self.translation(sidx, gen, &s))
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
        if let Some(slot) = self.mappings.get_mut(midx as usize) {
            *slot = Some(Mapping {
                proto: key.proto,
                inside: key.inside,
                addr_idx,
                outside: (addr, port),
                sessions: 0,
            });
        }
        self.map_index.insert(h_map, midx);
        self.stats.mappings_created += 1;
        Ok(midx)
    }

    /// Removes a session, and its mapping if it was the last one. Returns what it was.
    fn remove_session(&mut self, idx: u32) -> Option<SessionView<I>> {
        let slot = self.sessions.get(idx as usize)?;
        let gen = slot.gen;
        let s = slot.s?;
        let view = self.view(idx, gen, &s);
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
        self.stats.expired += 1;
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
                if let Some(v) = self.remove_session(idx) {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};
    use std::net::Ipv6Addr;

    impl<I> NatTable<I>
    where
        I: Copy + Eq + Hash + Debug,
    {
        /// Checks every internal invariant; used after each step of the property tests.
        fn check_invariants(&self) -> Result<(), String> {
            let cap_s = self.cfg.max_sessions;
            let cap_m = self.cfg.max_mappings;
            if self.live.len() + self.free_sessions.len() != cap_s {
                return Err("session free list and live list do not add up".into());
            }
            if self.out_index.len != self.live.len() || self.in_index.len != self.live.len() {
                return Err("session index sizes differ from the live count".into());
            }
            let occupied = self.sessions.iter().filter(|s| s.s.is_some()).count();
            if occupied != self.live.len() {
                return Err("occupied session slots differ from the live list".into());
            }
            let mut per_mapping: HashMap<u32, u32> = HashMap::new();
            for (pos, &idx) in self.live.iter().enumerate() {
                let s = self.sessions[idx as usize].s.ok_or("live entry is empty")?;
                if s.live_pos as usize != pos {
                    return Err(format!("session {idx} has a stale live_pos"));
                }
                let key = FlowKey {
                    proto: s.proto,
                    inside: s.inside,
                    remote: s.remote,
                };
                let f = self.out_index.find(self.hash_out(&key), |i| i == idx);
                let g = self
                    .in_index
                    .find(self.hash_in(s.proto, s.outside, s.remote), |i| i == idx);
                if f != Some(idx) || g != Some(idx) {
                    return Err(format!("session {idx} not reachable through the indexes"));
                }
                let m = self.mappings[s.mapping as usize].ok_or("session without mapping")?;
                if m.proto != s.proto || m.inside != s.inside || m.outside != s.outside {
                    return Err(format!("session {idx} disagrees with its mapping"));
                }
                if s.proto == Proto::Icmp && s.remote.1 != 0 {
                    return Err("ICMP session with a remote port".into());
                }
                *per_mapping.entry(s.mapping).or_default() += 1;
            }
            let mut outside_seen = HashSet::new();
            let mut per_set: HashMap<usize, u32> = HashMap::new();
            let mut n_maps = 0;
            for (midx, m) in self.mappings.iter().enumerate() {
                let Some(m) = m else { continue };
                n_maps += 1;
                let midx = midx as u32;
                if per_mapping.get(&midx).copied().unwrap_or(0) != m.sessions || m.sessions == 0 {
                    return Err(format!("mapping {midx} has a wrong session count"));
                }
                if !outside_seen.insert((m.proto, m.outside)) {
                    return Err(format!("two mappings share {:?} {:?}", m.proto, m.outside));
                }
                if self.cfg.pool[m.addr_idx as usize] != m.outside.0
                    || m.addr_idx != self.paired_addr(m.inside.0)
                {
                    return Err(format!("mapping {midx} not on its paired address"));
                }
                let (lo, hi) = self.cfg.port_range;
                if m.outside.1 < lo || m.outside.1 > hi {
                    return Err(format!("mapping {midx} port out of range"));
                }
                let set = PortBitmaps::set_of(m.addr_idx, m.proto);
                if self.ports.is_free(set, u32::from(m.outside.1 - lo)) {
                    return Err(format!("mapping {midx} port not marked used"));
                }
                *per_set.entry(set).or_default() += 1;
                if self
                    .map_index
                    .find(self.hash_map(m.proto, m.inside), |i| i == midx)
                    != Some(midx)
                {
                    return Err(format!("mapping {midx} not reachable through its index"));
                }
            }
            if n_maps != self.mapping_count() || n_maps + self.free_mappings.len() != cap_m {
                return Err("mapping counts do not add up".into());
            }
            if self.map_index.len != n_maps {
                return Err("mapping index size differs".into());
            }
            for set in 0..self.cfg.pool.len() * 3 {
                let used = per_set.get(&set).copied().unwrap_or(0);
                let words = &self.ports.bits[set * self.ports.words..(set + 1) * self.ports.words];
                let ones: u32 = words.iter().map(|w| w.count_ones()).sum();
                if ones != used || self.ports.free[set] != self.ports.n - used {
                    return Err(format!("port bitmap {set} out of sync"));
                }
            }
            Ok(())
        }
    }

    const S: u64 = SEC;
    const POOL_A: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const POOL_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
    const H1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const H2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const R1: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
    const R2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
    const R3: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);

    fn cfg(pool: Vec<Ipv4Addr>, range: (u16, u16), sessions: usize, mappings: usize) -> NatConfig {
        NatConfig {
            max_mappings: mappings,
            max_sessions: sessions,
            pool,
            port_range: range,
            timeouts: Timeouts::default(),
        }
    }

    fn table(c: NatConfig) -> (NatTable<Ipv4Addr>, XorShift32) {
        let mut rng = XorShift32(0x1234_5678);
        let t = NatTable::new(c, &mut rng).unwrap();
        (t, rng)
    }

    fn small() -> (NatTable<Ipv4Addr>, XorShift32) {
        table(cfg(vec![POOL_A, POOL_B], (1024, 65535), 64, 64))
    }

    #[test]
    fn default_timeouts() {
        let t = Timeouts::default();
        assert_eq!(t.tcp_established_ns, 7440 * S);
        assert_eq!(t.tcp_transitory_ns, 240 * S);
        assert_eq!(t.udp_ns, 300 * S);
        assert_eq!(t.icmp_ns, 60 * S);
    }

    #[test]
    fn xorshift_is_deterministic_and_survives_zero() {
        let mut a = XorShift32(7);
        let mut b = XorShift32(7);
        let xs: Vec<u32> = (0..5).map(|_| a.next_u32()).collect();
        let ys: Vec<u32> = (0..5).map(|_| b.next_u32()).collect();
        assert_eq!(xs, ys);
        let mut z = XorShift32(0);
        assert_ne!(z.next_u32(), 0);
        assert_ne!(z.0, 0);
    }

    #[test]
    fn config_validation() {
        let mut rng = XorShift32(1);
        let ok = cfg(vec![POOL_A], (1024, 2047), 8, 8);
        assert!(NatTable::<Ipv4Addr>::new(ok.clone(), &mut rng).is_ok());
        let cases: Vec<(NatConfig, NatConfigError)> = vec![
            (
                NatConfig {
                    pool: vec![],
                    ..ok.clone()
                },
                NatConfigError::EmptyPool,
            ),
            (
                NatConfig {
                    pool: vec![POOL_A, POOL_B, POOL_A],
                    ..ok.clone()
                },
                NatConfigError::DuplicatePoolAddress(POOL_A),
            ),
            (
                NatConfig {
                    pool: (0..=MAX_POOL as u32).map(Ipv4Addr::from).collect(),
                    ..ok.clone()
                },
                NatConfigError::PoolTooLarge {
                    len: MAX_POOL + 1,
                    max: MAX_POOL,
                },
            ),
            (
                NatConfig {
                    port_range: (2000, 1999),
                    ..ok.clone()
                },
                NatConfigError::BadPortRange { lo: 2000, hi: 1999 },
            ),
            (
                NatConfig {
                    port_range: (0, 10),
                    ..ok.clone()
                },
                NatConfigError::BadPortRange { lo: 0, hi: 10 },
            ),
            (
                NatConfig {
                    max_mappings: 0,
                    ..ok.clone()
                },
                NatConfigError::ZeroMappings,
            ),
            (
                NatConfig {
                    max_sessions: 0,
                    ..ok.clone()
                },
                NatConfigError::ZeroSessions,
            ),
            (
                NatConfig {
                    max_sessions: MAX_CAPACITY + 1,
                    ..ok.clone()
                },
                NatConfigError::TooManySessions {
                    requested: MAX_CAPACITY + 1,
                    max: MAX_CAPACITY,
                },
            ),
            (
                NatConfig {
                    max_mappings: MAX_CAPACITY + 1,
                    ..ok.clone()
                },
                NatConfigError::TooManyMappings {
                    requested: MAX_CAPACITY + 1,
                    max: MAX_CAPACITY,
                },
            ),
            (
                NatConfig {
                    timeouts: Timeouts {
                        udp_ns: 0,
                        ..Timeouts::default()
                    },
                    ..ok.clone()
                },
                NatConfigError::ZeroTimeout("udp_ns"),
            ),
        ];
        for (c, e) in cases {
            assert_eq!(
                NatTable::<Ipv4Addr>::new(c, &mut rng).err(),
                Some(NatError::Config(e))
            );
        }
        // Single port, single session: the smallest table.
        assert!(NatTable::<Ipv4Addr>::new(cfg(vec![POOL_A], (1, 1), 1, 1), &mut rng).is_ok());
        assert!(
            NatTable::<Ipv4Addr>::new(cfg(vec![POOL_A], (65535, 65535), 1, 1), &mut rng).is_ok()
        );
    }

    #[test]
    fn outbound_then_inbound_round_trip() {
        let (mut t, mut rng) = small();
        let o = t
            .outbound(Proto::Udp, (H1, 5000), (R1, 53), 0, 0, &mut rng)
            .unwrap();
        assert!(o.outside.0 == POOL_A || o.outside.0 == POOL_B);
        assert!(o.outside.1 >= 1024);
        assert_eq!((o.inside, o.remote), ((H1, 5000), (R1, 53)));
        let i = t.inbound(Proto::Udp, (R1, 53), o.outside, 0, S).unwrap();
        assert_eq!(i, o);
        // The same flow again is the same session.
        let o2 = t
            .outbound(Proto::Udp, (H1, 5000), (R1, 53), 0, 2 * S, &mut rng)
            .unwrap();
        assert_eq!(o2, o);
        assert_eq!(t.session_count(), 1);
        assert_eq!(t.mapping_count(), 1);
        assert_eq!(t.mapping(Proto::Udp, (H1, 5000)), Some(o.outside));
        // Another protocol is another mapping.
        assert_eq!(t.inbound(Proto::Tcp, (R1, 53), o.outside, 0, S), None);
        let s = t.stats();
        assert_eq!(
            (s.created, s.mappings_created, s.inbound_dropped),
            (1, 1, 1)
        );
        t.check_invariants().unwrap();
    }

    #[test]
    fn endpoint_independent_mapping() {
        let (mut t, mut rng) = small();
        let a = t
            .outbound(Proto::Udp, (H1, 5000), (R1, 1000), 0, 0, &mut rng)
            .unwrap();
        let b = t
            .outbound(Proto::Udp, (H1, 5000), (R2, 2000), 0, 0, &mut rng)
            .unwrap();
        assert_eq!(a.outside, b.outside);
        assert_ne!(a.session, b.session);
        assert_eq!(t.mapping_count(), 1);
        assert_eq!(t.session_count(), 2);
        // A different inside port is a different mapping.
        let c = t
            .outbound(Proto::Udp, (H1, 5001), (R1, 1000), 0, 0, &mut rng)
            .unwrap();
        assert_ne!(c.outside, a.outside);
        t.check_invariants().unwrap();
    }

    #[test]
    fn address_and_port_dependent_filtering() {
        let (mut t, mut rng) = small();
        let a = t
            .outbound(Proto::Udp, (H1, 5000), (R1, 1000), 0, 0, &mut rng)
            .unwrap();
        t.outbound(Proto::Udp, (H1, 5000), (R2, 2000), 0, 0, &mut rng)
            .unwrap();
        assert!(t.inbound(Proto::Udp, (R1, 1000), a.outside, 0, 1).is_some());
        assert!(t.inbound(Proto::Udp, (R2, 2000), a.outside, 0, 1).is_some());
        // A third remote is refused, and so is a known remote from another port.
        assert_eq!(t.inbound(Proto::Udp, (R3, 1000), a.outside, 0, 1), None);
        assert_eq!(t.inbound(Proto::Udp, (R1, 1001), a.outside, 0, 1), None);
        // Refused packets create nothing.
        assert_eq!(t.session_count(), 2);
        assert_eq!(t.stats().inbound_dropped, 2);
    }

    #[test]
    fn paired_pooling() {
        let (mut t, mut rng) = table(cfg(
            (1..=8).map(|i| Ipv4Addr::new(198, 51, 100, i)).collect(),
            (1024, 65535),
            256,
            256,
        ));
        for h in 1..=20u8 {
            let host = Ipv4Addr::new(10, 0, 0, h);
            let mut addrs = HashSet::new();
            for (i, p) in Proto::ALL.into_iter().enumerate() {
                for port in 0..3u16 {
                    let o = t
                        .outbound(p, (host, 4000 + port), (R1, 80 + i as u16), 0, 0, &mut rng)
                        .unwrap();
                    addrs.insert(o.outside.0);
                }
            }
            assert_eq!(addrs.len(), 1, "host {host} spread over {addrs:?}");
        }
        t.check_invariants().unwrap();
    }

    #[test]
    fn icmp_identifier_is_the_port() {
        let (mut t, mut rng) = small();
        let o = t
            .outbound(Proto::Icmp, (H1, 77), (R1, 12345), 0, 0, &mut rng)
            .unwrap();
        assert_eq!(o.remote, (R1, 0));
        assert!(o.outside.1 >= 1024);
        // The echo reply carries our identifier; whatever "remote port" the caller passes.
        let i = t.inbound(Proto::Icmp, (R1, 999), o.outside, 0, S).unwrap();
        assert_eq!(i.inside, (H1, 77));
        assert_eq!(t.inbound(Proto::Icmp, (R2, 0), o.outside, 0, S), None);
        // Another echo to the same remote with a different remote port is the same session.
        let o2 = t
            .outbound(Proto::Icmp, (H1, 77), (R1, 1), 0, S, &mut rng)
            .unwrap();
        assert_eq!(o2.session, o.session);
    }

    #[test]
    fn nat64_inside_addresses() {
        let mut rng = XorShift32(99);
        let mut t: NatTable<Ipv6Addr> =
            NatTable::new(cfg(vec![POOL_A], (1024, 2047), 16, 16), &mut rng).unwrap();
        let h6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
        let o = t
            .outbound(Proto::Tcp, (h6, 40000), (R1, 443), TCP_SYN, 0, &mut rng)
            .unwrap();
        assert_eq!(o.outside.0, POOL_A);
        let i = t
            .inbound(Proto::Tcp, (R1, 443), o.outside, TCP_SYN | TCP_ACK, 1)
            .unwrap();
        assert_eq!(i.inside, (h6, 40000));
        assert_eq!(
            t.session(o.session).unwrap().tcp_state,
            Some(TcpState::Established)
        );
        t.check_invariants().unwrap();
    }

    /// Whether the session would still be alive at `now` (looks, does not refresh).
    fn alive_at(t: &NatTable<Ipv4Addr>, o: &Translation<Ipv4Addr>, now: u64) -> bool {
        t.session(o.session).is_some_and(|v| now < v.expires_at_ns)
    }

    #[test]
    fn udp_timeout_refreshed_both_ways() {
        let (mut t, mut rng) = small();
        let o = t
            .outbound(Proto::Udp, (H1, 5000), (R1, 53), 0, 0, &mut rng)
            .unwrap();
        assert!(alive_at(&t, &o, 300 * S - 1));
        assert!(!alive_at(&t, &o, 300 * S));
        // Inbound refreshes (RFC 4787 REQ-6 permits it; we do it).
        assert!(t
            .inbound(Proto::Udp, (R1, 53), o.outside, 0, 200 * S)
            .is_some());
        assert!(t
            .inbound(Proto::Udp, (R1, 53), o.outside, 0, 499 * S)
            .is_some());
        // Outbound refreshes.
        t.outbound(Proto::Udp, (H1, 5000), (R1, 53), 0, 700 * S, &mut rng)
            .unwrap();
        assert_eq!(t.expire(999 * S, 100), 0);
        assert_eq!(t.expire(1000 * S, 100), 1);
        assert_eq!(t.session_count(), 0);
        assert_eq!(t.mapping_count(), 0);
        assert_eq!(t.stats().expired, 1);
    }

    #[test]
    fn dead_session_refuses_inbound_before_the_sweep() {
        let (mut t, mut rng) = small();
        let o = t
            .outbound(Proto::Udp, (H1, 5000), (R1, 53), 0, 0, &mut rng)
            .unwrap();
        assert_eq!(t.inbound(Proto::Udp, (R1, 53), o.outside, 0, 300 * S), None);
        assert_eq!(t.session_count(), 0, "found dead, removed on the spot");
        assert_eq!(t.mapping_count(), 0);
        t.check_invariants().unwrap();
    }

    #[test]
    fn dead_session_is_replaced_by_outbound() {
        let (mut t, mut rng) = small();
        let o = t
            .outbound(Proto::Udp, (H1, 5000), (R1, 53), 0, 0, &mut rng)
            .unwrap();
        t.record(o.session, 100);
        let o2 = t
            .outbound(Proto::Udp, (H1, 5000), (R1, 53), 0, 300 * S, &mut rng)
            .unwrap();
        assert_ne!(o2.session, o.session);
        assert_eq!(t.session(o.session), None);
        let v = t.session(o2.session).unwrap();
        assert_eq!((v.packets, v.bytes, v.last_seen_ns), (0, 0, 300 * S));
        assert_eq!(t.session_count(), 1);
        let s = t.stats();
        assert_eq!((s.created, s.expired), (2, 1));
        t.check_invariants().unwrap();
    }

    #[test]
    fn icmp_timeout() {
        let (mut t, mut rng) = small();
        let o = t
            .outbound(Proto::Icmp, (H1, 1), (R1, 0), 0, 10 * S, &mut rng)
            .unwrap();
        assert_eq!(t.session(o.session).unwrap().expires_at_ns, 70 * S);
        assert!(t
            .inbound(Proto::Icmp, (R1, 0), o.outside, 0, 69 * S)
            .is_some());
        assert_eq!(t.expire(128 * S, 10), 0);
        assert_eq!(t.expire(129 * S, 10), 1);
    }

    fn tcp_state(t: &NatTable<Ipv4Addr>, o: &Translation<Ipv4Addr>) -> (TcpState, u64) {
        let v = t.session(o.session).unwrap();
        (v.tcp_state.unwrap(), v.expires_at_ns - v.last_seen_ns)
    }

    #[test]
    fn tcp_handshake_and_close() {
        let to = Timeouts::default();
        let (mut t, mut rng) = small();
        let o = t
            .outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_SYN, 0, &mut rng)
            .unwrap();
        assert_eq!(tcp_state(&t, &o), (TcpState::Opening, to.tcp_transitory_ns));
        // Retransmitted SYN: still opening.
        t.outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_SYN, S, &mut rng)
            .unwrap();
        assert_eq!(tcp_state(&t, &o).0, TcpState::Opening);
        t.inbound(Proto::Tcp, (R1, 80), o.outside, TCP_SYN | TCP_ACK, 2 * S)
            .unwrap();
        assert_eq!(
            tcp_state(&t, &o),
            (TcpState::Established, to.tcp_established_ns)
        );
        assert_eq!(
            t.session(o.session).unwrap().established_since_ns,
            Some(2 * S)
        );
        t.outbound(
            Proto::Tcp,
            (H1, 40000),
            (R1, 80),
            TCP_FIN | TCP_ACK,
            3 * S,
            &mut rng,
        )
        .unwrap();
        assert_eq!(
            tcp_state(&t, &o),
            (TcpState::FinOutbound, to.tcp_established_ns)
        );
        t.inbound(Proto::Tcp, (R1, 80), o.outside, TCP_FIN | TCP_ACK, 4 * S)
            .unwrap();
        assert_eq!(tcp_state(&t, &o), (TcpState::Closing, to.tcp_transitory_ns));
        // The last ACK keeps it closing.
        t.outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_ACK, 5 * S, &mut rng)
            .unwrap();
        assert_eq!(tcp_state(&t, &o).0, TcpState::Closing);
        assert_eq!(t.expire(5 * S + 240 * S - 1, 10), 0);
        assert_eq!(t.expire(5 * S + 240 * S, 10), 1);
    }

    #[test]
    fn tcp_fin_from_outside_first() {
        let (mut t, mut rng) = small();
        let o = t
            .outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_SYN, 0, &mut rng)
            .unwrap();
        t.inbound(Proto::Tcp, (R1, 80), o.outside, TCP_SYN | TCP_ACK, 1)
            .unwrap();
        t.inbound(Proto::Tcp, (R1, 80), o.outside, TCP_FIN, 2)
            .unwrap();
        assert_eq!(tcp_state(&t, &o).0, TcpState::FinInbound);
        t.outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_FIN, 3, &mut rng)
            .unwrap();
        assert_eq!(tcp_state(&t, &o).0, TcpState::Closing);
    }

    #[test]
    fn tcp_rst_is_transitory_and_recovers() {
        let to = Timeouts::default();
        let (mut t, mut rng) = small();
        let o = t
            .outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_SYN, 0, &mut rng)
            .unwrap();
        t.inbound(Proto::Tcp, (R1, 80), o.outside, TCP_SYN | TCP_ACK, 1)
            .unwrap();
        t.inbound(Proto::Tcp, (R1, 80), o.outside, TCP_RST, 2)
            .unwrap();
        assert_eq!(tcp_state(&t, &o), (TcpState::Reset, to.tcp_transitory_ns));
        // Any later non-RST packet reopens (RFC 6146 TRANS state).
        t.outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_ACK, 3, &mut rng)
            .unwrap();
        assert_eq!(tcp_state(&t, &o).0, TcpState::Established);
        t.outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_RST, 4, &mut rng)
            .unwrap();
        assert_eq!(tcp_state(&t, &o).0, TcpState::Reset);
        // A fresh SYN from inside after a RST starts over.
        t.outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_SYN, 5, &mut rng)
            .unwrap();
        assert_eq!(tcp_state(&t, &o).0, TcpState::Opening);
        assert_eq!(t.session(o.session).unwrap().established_since_ns, None);
        // Transitory lifetime: dies 4 min after the last packet.
        assert_eq!(t.expire(5 + 240 * S, 10), 1);
    }

    #[test]
    fn tcp_established_timeout() {
        let (mut t, mut rng) = small();
        let o = t
            .outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_SYN, 0, &mut rng)
            .unwrap();
        t.inbound(Proto::Tcp, (R1, 80), o.outside, TCP_SYN | TCP_ACK, S)
            .unwrap();
        // Unanswered SYNs only get the transitory lifetime; established ones 2h4m.
        assert_eq!(t.expire(S + 7440 * S - 1, 10), 0);
        assert!(t
            .inbound(Proto::Tcp, (R1, 80), o.outside, TCP_ACK, S + 7440 * S - 1)
            .is_some());
        assert_eq!(t.expire(2 * S + 2 * 7440 * S, 10), 1);
    }

    #[test]
    fn tcp_unanswered_syn_expires_quickly() {
        let (mut t, mut rng) = small();
        t.outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_SYN, 0, &mut rng)
            .unwrap();
        // A mid-stream packet from inside opens a session too, transitory until answered.
        let o = t
            .outbound(Proto::Tcp, (H1, 40001), (R1, 80), TCP_ACK, 0, &mut rng)
            .unwrap();
        assert_eq!(tcp_state(&t, &o).0, TcpState::Opening);
        assert_eq!(t.expire(240 * S - 1, 10), 0);
        assert_eq!(t.expire(240 * S, 10), 2);
        assert_eq!(t.mapping_count(), 0);
    }

    #[test]
    fn tcp_inbound_syn_without_session_is_dropped() {
        let (mut t, mut rng) = small();
        let o = t
            .outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_SYN, 0, &mut rng)
            .unwrap();
        assert_eq!(t.inbound(Proto::Tcp, (R2, 80), o.outside, TCP_SYN, 1), None);
        assert_eq!(
            t.inbound(Proto::Tcp, (R1, 80), (POOL_A, 1), TCP_SYN, 1),
            None
        );
        assert_eq!(t.session_count(), 1);
    }

    #[test]
    fn port_exhaustion_creates_nothing() {
        let (mut t, mut rng) = table(cfg(vec![POOL_A], (2000, 2001), 16, 16));
        let a = t
            .outbound(Proto::Udp, (H1, 1), (R1, 1), 0, 0, &mut rng)
            .unwrap();
        let b = t
            .outbound(Proto::Udp, (H1, 2), (R1, 1), 0, 0, &mut rng)
            .unwrap();
        let mut ports = [a.outside.1, b.outside.1];
        ports.sort_unstable();
        assert_eq!(ports, [2000, 2001]);
        let before = t.stats();
        assert_eq!(
            t.outbound(Proto::Udp, (H2, 3), (R1, 1), 0, 0, &mut rng),
            Err(NatError::PortsExhausted { addr: POOL_A })
        );
        let after = t.stats();
        assert_eq!(after.sessions, before.sessions);
        assert_eq!(after.mappings, before.mappings);
        assert_eq!(after.created, before.created);
        assert_eq!(after.port_exhausted, 1);
        // Existing mappings still take new sessions; other protocols have their own ports.
        t.outbound(Proto::Udp, (H1, 1), (R2, 1), 0, 0, &mut rng)
            .unwrap();
        t.outbound(Proto::Tcp, (H2, 3), (R1, 1), TCP_SYN, 0, &mut rng)
            .unwrap();
        t.check_invariants().unwrap();
    }

    #[test]
    fn session_table_full_creates_nothing() {
        let (mut t, mut rng) = table(cfg(vec![POOL_A], (1024, 65535), 2, 16));
        t.outbound(Proto::Udp, (H1, 1), (R1, 1), 0, 0, &mut rng)
            .unwrap();
        t.outbound(Proto::Udp, (H1, 1), (R2, 1), 0, 0, &mut rng)
            .unwrap();
        assert_eq!(
            t.outbound(Proto::Udp, (H2, 1), (R1, 1), 0, 0, &mut rng),
            Err(NatError::SessionTableFull { capacity: 2 })
        );
        assert_eq!(t.mapping_count(), 1, "no mapping left behind");
        assert_eq!(t.stats().table_full, 1);
        // Known flows still pass.
        assert!(t
            .outbound(Proto::Udp, (H1, 1), (R1, 1), 0, 1, &mut rng)
            .is_ok());
        t.check_invariants().unwrap();
    }

    #[test]
    fn mapping_table_full_creates_nothing() {
        let (mut t, mut rng) = table(cfg(vec![POOL_A], (1024, 65535), 16, 1));
        t.outbound(Proto::Udp, (H1, 1), (R1, 1), 0, 0, &mut rng)
            .unwrap();
        assert_eq!(
            t.outbound(Proto::Udp, (H1, 2), (R1, 1), 0, 0, &mut rng),
            Err(NatError::MappingTableFull { capacity: 1 })
        );
        assert_eq!((t.session_count(), t.mapping_count()), (1, 1));
        // The one mapping still gets sessions to other remotes.
        t.outbound(Proto::Udp, (H1, 1), (R2, 1), 0, 0, &mut rng)
            .unwrap();
        t.check_invariants().unwrap();
    }

    #[test]
    fn expiry_frees_ports_for_reuse() {
        let (mut t, mut rng) = table(cfg(vec![POOL_A], (3000, 3000), 4, 4));
        let a = t
            .outbound(Proto::Udp, (H1, 1), (R1, 1), 0, 0, &mut rng)
            .unwrap();
        assert_eq!(a.outside, (POOL_A, 3000));
        assert!(matches!(
            t.outbound(Proto::Udp, (H2, 1), (R1, 1), 0, S, &mut rng),
            Err(NatError::PortsExhausted { .. })
        ));
        assert_eq!(t.expire(300 * S, 10), 1);
        assert_eq!(t.mapping_count(), 0);
        let b = t
            .outbound(Proto::Udp, (H2, 1), (R1, 1), 0, 301 * S, &mut rng)
            .unwrap();
        assert_eq!(b.outside, (POOL_A, 3000));
        // The old handle does not resolve to the new session that reused its slot.
        assert_eq!(t.session(a.session), None);
        assert!(t.session(b.session).is_some());
        assert!(!t.refresh(a.session, 301 * S));
        assert!(!t.record(a.session, 1));
        t.check_invariants().unwrap();
    }

    #[test]
    fn mapping_lives_while_it_has_sessions() {
        let (mut t, mut rng) = small();
        let a = t
            .outbound(Proto::Udp, (H1, 1), (R1, 1), 0, 0, &mut rng)
            .unwrap();
        t.outbound(Proto::Udp, (H1, 1), (R2, 1), 0, 200 * S, &mut rng)
            .unwrap();
        assert_eq!(t.expire(300 * S, 10), 1);
        assert_eq!(t.mapping_count(), 1);
        assert_eq!(t.mapping(Proto::Udp, (H1, 1)), Some(a.outside));
        // Still EIM: a new remote reuses the surviving mapping.
        let c = t
            .outbound(Proto::Udp, (H1, 1), (R3, 1), 0, 300 * S, &mut rng)
            .unwrap();
        assert_eq!(c.outside, a.outside);
        assert_eq!(t.expire(600 * S, 10), 2);
        assert_eq!(t.mapping_count(), 0);
        assert_eq!(t.mapping(Proto::Udp, (H1, 1)), None);
    }

    #[test]
    fn sweep_budget_is_respected() {
        let (mut t, mut rng) = small();
        for p in 0..10 {
            t.outbound(Proto::Udp, (H1, p), (R1, 1), 0, 0, &mut rng)
                .unwrap();
        }
        // One that stays alive.
        t.outbound(Proto::Udp, (H2, 1), (R1, 1), 0, 100 * S, &mut rng)
            .unwrap();
        let mut removed = Vec::new();
        let now = 300 * S;
        assert_eq!(t.expire(now, 0), 0);
        for _ in 0..10 {
            let n = t.expire_with(now, 3, |v| removed.push(v.inside));
            assert!(n <= 3);
            t.check_invariants().unwrap();
        }
        assert_eq!(removed.len(), 10);
        assert_eq!(t.session_count(), 1);
        assert!(!removed.contains(&(H2, 1)));
        assert_eq!(t.stats().expired, 10);
    }

    #[test]
    fn sweep_visits_at_most_budget_sessions() {
        let (mut t, mut rng) = small();
        for p in 0..20 {
            t.outbound(Proto::Udp, (H1, p), (R1, 1), 0, p as u64 * S, &mut rng)
                .unwrap();
        }
        // At 305 s the first six (created at 0..=5 s) are dead; a budget of 4 from the start
        // of the list can remove at most 4 of them.
        let n = t.expire(305 * S, 4);
        assert!(n <= 4);
        let mut total = n;
        for _ in 0..20 {
            total += t.expire(305 * S, 4);
        }
        assert_eq!(total, 6);
        t.check_invariants().unwrap();
    }

    #[test]
    fn offload_hooks() {
        let (mut t, mut rng) = small();
        let tcp = t
            .outbound(Proto::Tcp, (H1, 40000), (R1, 443), TCP_SYN, 0, &mut rng)
            .unwrap();
        let udp = t
            .outbound(Proto::Udp, (H1, 5000), (R1, 4500), 0, 0, &mut rng)
            .unwrap();
        let icmp = t
            .outbound(Proto::Icmp, (H1, 9), (R1, 0), 0, 0, &mut rng)
            .unwrap();
        let one_way = t
            .outbound(Proto::Udp, (H1, 5001), (R1, 4500), 0, 0, &mut rng)
            .unwrap();
        assert_eq!(
            t.offload_candidates(100 * S, 0).count(),
            0,
            "nothing established"
        );
        t.inbound(Proto::Tcp, (R1, 443), tcp.outside, TCP_SYN | TCP_ACK, S)
            .unwrap();
        t.inbound(Proto::Udp, (R1, 4500), udp.outside, 0, 2 * S)
            .unwrap();
        t.inbound(Proto::Icmp, (R1, 0), icmp.outside, 0, 2 * S)
            .unwrap();
        let ids = |t: &NatTable<Ipv4Addr>, now, age| {
            let mut v: Vec<SessionId> = t.offload_candidates(now, age).map(|v| v.id).collect();
            v.sort_unstable();
            v
        };
        let mut both = vec![tcp.session, udp.session];
        both.sort_unstable();
        assert_eq!(ids(&t, 10 * S, 5 * S), both);
        assert_eq!(ids(&t, 10 * S, 9 * S), vec![tcp.session]);
        assert!(!ids(&t, 10 * S, 0).contains(&one_way.session));
        assert!(t.mark_offloaded(tcp.session, true));
        assert_eq!(ids(&t, 10 * S, 5 * S), vec![udp.session]);
        // The agent feeds hardware counters back.
        assert!(t.record(tcp.session, 1500));
        assert!(t.record_many(tcp.session, 10, 15000));
        let v = t.session(tcp.session).unwrap();
        assert_eq!((v.packets, v.bytes, v.offloaded), (11, 16500, true));
        // Refresh keeps an offloaded session alive far beyond its last software packet.
        let mut now = S;
        for _ in 0..5 {
            now += 7000 * S;
            assert!(t.refresh(tcp.session, now));
            t.expire(now, usize::MAX);
        }
        assert!(t.session(tcp.session).is_some());
        // Without refresh it ages out like any other and is reported to the agent.
        let mut gone = Vec::new();
        t.expire_with(now + 7440 * S, usize::MAX, |v| {
            if v.offloaded {
                gone.push(v.id);
            }
        });
        assert_eq!(gone, vec![tcp.session]);
        assert!(!t.refresh(tcp.session, now + 7440 * S));
        assert!(!t.mark_offloaded(tcp.session, false));
        // A dead session cannot be refreshed back to life.
        let (mut t, mut rng) = small();
        let u = t
            .outbound(Proto::Udp, (H1, 1), (R1, 1), 0, 0, &mut rng)
            .unwrap();
        assert!(!t.refresh(u.session, 300 * S));
        assert!(t.refresh(u.session, 299 * S));
        assert_eq!(t.session(u.session).unwrap().expires_at_ns, 599 * S);
    }

    #[test]
    fn fin_leaves_offload_candidates() {
        let (mut t, mut rng) = small();
        let o = t
            .outbound(Proto::Tcp, (H1, 40000), (R1, 443), TCP_SYN, 0, &mut rng)
            .unwrap();
        t.inbound(Proto::Tcp, (R1, 443), o.outside, TCP_SYN | TCP_ACK, 0)
            .unwrap();
        assert_eq!(t.offload_candidates(S, 0).count(), 1);
        t.inbound(Proto::Tcp, (R1, 443), o.outside, TCP_FIN, S)
            .unwrap();
        assert_eq!(t.offload_candidates(2 * S, 0).count(), 0);
    }

    #[test]
    fn session_ids_carry_generations() {
        let (mut t, mut rng) = table(cfg(vec![POOL_A], (1024, 65535), 1, 1));
        let mut seen = HashSet::new();
        let mut now = 0;
        for i in 0..300u16 {
            let o = t
                .outbound(Proto::Udp, (H1, i), (R1, 1), 0, now, &mut rng)
                .unwrap();
            assert!(seen.insert(o.session), "id reused at {i}");
            now += 300 * S;
        }
        for id in &seen {
            assert_eq!(SessionId::from_raw(id.to_raw()), *id);
        }
        assert_eq!(t.session(SessionId::from_raw(u32::MAX)), None);
        for raw in [0, 1, 2, 0xFFFF_FFFE, 0x8000_0000] {
            let _ = t.session(SessionId::from_raw(raw));
            let _ = t.refresh(SessionId::from_raw(raw), 0);
        }
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let (mut t, mut rng) = small();
        let o = t
            .outbound(Proto::Udp, (H1, 1), (R1, 1), 0, 1000 * S, &mut rng)
            .unwrap();
        assert!(t
            .inbound(Proto::Udp, (R1, 1), o.outside, 0, 10 * S)
            .is_some());
        assert_eq!(t.session(o.session).unwrap().last_seen_ns, 1000 * S);
        assert_eq!(t.expire(0, 10), 0);
        assert_eq!(t.expire(u64::MAX, 10), 1);
    }

    #[test]
    fn hash_depends_on_seed() {
        let mut r1 = XorShift32(1);
        let mut r2 = XorShift32(2);
        let a: NatTable<Ipv4Addr> =
            NatTable::new(cfg(vec![POOL_A], (1, 10), 1, 1), &mut r1).unwrap();
        let b: NatTable<Ipv4Addr> =
            NatTable::new(cfg(vec![POOL_A], (1, 10), 1, 1), &mut r2).unwrap();
        assert_ne!(
            a.hash_map(Proto::Udp, (H1, 1)),
            b.hash_map(Proto::Udp, (H1, 1))
        );
        assert_ne!(
            a.hash_map(Proto::Udp, (H1, 1)),
            a.hash_map(Proto::Udp, (H1, 2))
        );
        assert_ne!(
            a.hash_map(Proto::Udp, (H1, 1)),
            a.hash_map(Proto::Tcp, (H1, 1))
        );
        let _ = format!("{a:?}");
    }

    #[test]
    fn full_port_range_on_many_addresses() {
        // Exhaust a 100-port range completely and refill it after expiry: the bounded scan
        // finds every last port.
        let (mut t, mut rng) = table(cfg(vec![POOL_A], (60000, 60099), 200, 200));
        let mut ports = HashSet::new();
        for i in 0..100u16 {
            let o = t
                .outbound(Proto::Tcp, (H1, i), (R1, 1), TCP_SYN, 0, &mut rng)
                .unwrap();
            assert!(ports.insert(o.outside.1));
        }
        assert!(t
            .outbound(Proto::Tcp, (H1, 100), (R1, 1), TCP_SYN, 0, &mut rng)
            .is_err());
        assert_eq!(t.expire(240 * S, usize::MAX), 100);
        for i in 0..100u16 {
            t.outbound(Proto::Tcp, (H2, i), (R1, 1), TCP_SYN, 241 * S, &mut rng)
                .unwrap();
        }
        t.check_invariants().unwrap();
    }

    // --- the index on its own, with hostile hashes -------------------------------------------

    proptest! {
        #[test]
        fn index_matches_a_hashmap(
            ops in prop::collection::vec((any::<bool>(), 0u32..40, 0u64..6), 1..300)
        ) {
            // Few distinct hashes, many keys: long clusters, wrap-around, backward shifts.
            let mut ix = Index::with_capacity(40);
            let mut model: HashMap<u32, u64> = HashMap::new();
            let hash_of = |k: u32, h: u64| if h == 5 { ix_wrap_hash() } else { h * 3 + u64::from(k % 2) };
            for (insert, key, h) in ops {
                let hash = hash_of(key, h);
                if insert {
                    if let std::collections::hash_map::Entry::Vacant(e) = model.entry(key) {
                        prop_assert!(ix.insert(hash, key));
                        e.insert(hash);
                    }
                } else if let Some(hash) = model.remove(&key) {
                    prop_assert!(ix.remove(hash, key));
                } else {
                    prop_assert!(!ix.remove(hash, key));
                }
                prop_assert_eq!(ix.len, model.len());
                for (&k, &hash) in &model {
                    prop_assert_eq!(ix.find(hash, |i| i == k), Some(k));
                }
                prop_assert_eq!(ix.find(12345, |_| true), None);
            }
        }
    }

    /// A hash whose home is the last slot of a 128-slot index.
    fn ix_wrap_hash() -> u64 {
        127
    }

    // --- the NAT against a reference model ---------------------------------------------------

    /// Time steps in seconds: mostly small, so flows live through many packets. Packets use
    /// the first 12 (up to 61 s), sweeps all of them.
    const DTS: [u64; 16] = [0, 0, 0, 0, 1, 1, 1, 2, 5, 20, 59, 61, 239, 241, 301, 7441];
    const FLAGS: [u8; 6] = [
        0,
        TCP_SYN,
        TCP_SYN | TCP_ACK,
        TCP_ACK,
        TCP_FIN | TCP_ACK,
        TCP_RST,
    ];
    const MPOOL: [Ipv4Addr; 2] = [POOL_A, POOL_B];
    const MRANGE: (u16, u16) = (1000, 1099);

    /// Nine known remotes; anything above is a stranger.
    fn remote_of(i: u8) -> (Ipv4Addr, u16) {
        let addrs = [R1, R2, R3];
        if i >= 9 {
            return (Ipv4Addr::new(192, 0, 2, 99), 9);
        }
        (addrs[usize::from(i % 3)], 7000 + u16::from(i / 3))
    }

    #[derive(Debug, Clone)]
    enum Op {
        Out {
            proto: u8,
            host: u8,
            hport: u8,
            remote: u8,
            flags: u8,
            dt: u8,
            reuse: u8,
        },
        In {
            proto: u8,
            remote: u8,
            target: u16,
            flags: u8,
            dt: u8,
        },
        Expire {
            dt: u8,
            budget: u8,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..3, 0u8..3, 0u8..3, 0u8..6, 0u8..6, 0u8..12, any::<u8>()).prop_map(
                |(proto, host, hport, remote, flags, dt, reuse)| Op::Out { proto, host, hport, remote, flags, dt, reuse }
            ),
            4 => (0u8..3, 0u8..10, any::<u16>(), 0u8..6, 0u8..12).prop_map(
                |(proto, remote, target, flags, dt)| Op::In { proto, remote, target, flags, dt }
            ),
            1 => (0u8..16, 0u8..8).prop_map(|(dt, budget)| Op::Expire { dt, budget }),
        ]
    }

    /// The reference model's TCP state, kept as independent facts rather than a state enum.
    #[derive(Debug, Clone, Copy, Default)]
    struct MTcp {
        est: bool,
        fin_out: bool,
        fin_in: bool,
        rst: bool,
    }

    impl MTcp {
        fn apply(&mut self, out: bool, flags: u8) {
            if flags & TCP_RST != 0 {
                self.rst = true;
                return;
            }
            let syn = flags & TCP_SYN != 0;
            let closing = self.fin_in && self.fin_out;
            if out && syn && (self.rst || closing) {
                *self = MTcp::default();
            } else if self.rst {
                *self = MTcp {
                    est: true,
                    ..MTcp::default()
                };
            }
            if !out {
                self.est = true;
            }
            if flags & TCP_FIN != 0 && self.est {
                if out {
                    self.fin_out = true;
                } else {
                    self.fin_in = true;
                }
            }
        }

        fn transitory(&self) -> bool {
            self.rst || !self.est || (self.fin_in && self.fin_out)
        }

        fn as_state(&self) -> TcpState {
            if self.rst {
                TcpState::Reset
            } else if !self.est {
                TcpState::Opening
            } else if self.fin_in && self.fin_out {
                TcpState::Closing
            } else if self.fin_out {
                TcpState::FinOutbound
            } else if self.fin_in {
                TcpState::FinInbound
            } else {
                TcpState::Established
            }
        }
    }

    #[derive(Debug, Clone, Copy)]
    struct MSession {
        id: SessionId,
        outside: (Ipv4Addr, u16),
        tcp: MTcp,
        last: u64,
    }

    type MKey = (Proto, (Ipv4Addr, u16), (Ipv4Addr, u16));
    type Flow = (Proto, (Ipv4Addr, u16), (Ipv4Addr, u16), (Ipv4Addr, u16));

    struct Model {
        t: Timeouts,
        sessions: HashMap<MKey, MSession>,
        paired: HashMap<Ipv4Addr, Ipv4Addr>,
    }

    impl Model {
        fn alive(&self, k: &MKey, s: &MSession, now: u64) -> bool {
            let life = match k.0 {
                Proto::Udp => self.t.udp_ns,
                Proto::Icmp => self.t.icmp_ns,
                Proto::Tcp if s.tcp.transitory() => self.t.tcp_transitory_ns,
                Proto::Tcp => self.t.tcp_established_ns,
            };
            now < s.last + life
        }

        fn live_mapping(
            &self,
            proto: Proto,
            inside: (Ipv4Addr, u16),
            now: u64,
        ) -> Option<(Ipv4Addr, u16)> {
            self.sessions
                .iter()
                .find(|(k, s)| k.0 == proto && k.1 == inside && self.alive(k, s, now))
                .map(|(_, s)| s.outside)
        }

        fn live_mappings(&self, now: u64) -> HashMap<(Proto, (Ipv4Addr, u16)), (Ipv4Addr, u16)> {
            self.sessions
                .iter()
                .filter(|(k, s)| self.alive(k, s, now))
                .map(|(k, s)| ((k.0, k.1), s.outside))
                .collect()
        }
    }

    fn run_against_model(seed: u32, ops: Vec<Op>) -> Result<(), TestCaseError> {
        let mut rng = XorShift32(seed);
        let c = cfg(MPOOL.to_vec(), MRANGE, 512, 512);
        let mut nat: NatTable<Ipv4Addr> = NatTable::new(c, &mut rng).unwrap();
        let mut m = Model {
            t: Timeouts::default(),
            sessions: HashMap::new(),
            paired: HashMap::new(),
        };
        // Flows opened so far: (proto, inside, outside, remote as passed).
        let mut observed: Vec<Flow> = Vec::new();
        let mut now = 0u64;
        for op in ops {
            match op {
                Op::Out {
                    proto,
                    host,
                    hport,
                    remote,
                    flags,
                    dt,
                    reuse,
                } => {
                    now += DTS[usize::from(dt)] * S;
                    // Mostly continue a recent flow, else a new or older one.
                    let recent = observed
                        .len()
                        .checked_sub(1 + usize::from(reuse % 8))
                        .and_then(|i| observed.get(i).copied())
                        .filter(|_| reuse < 192);
                    let (proto, inside, raw_remote) = match recent {
                        Some((p, ins, _, r)) => (p, ins, r),
                        None => (
                            Proto::ALL[usize::from(proto)],
                            (Ipv4Addr::new(10, 0, 0, host + 1), 100 + u16::from(hport)),
                            remote_of(remote),
                        ),
                    };
                    let remote = if proto == Proto::Icmp {
                        (raw_remote.0, 0)
                    } else {
                        raw_remote
                    };
                    let flags = if proto == Proto::Tcp {
                        FLAGS[usize::from(flags)]
                    } else {
                        0
                    };
                    let expected_map = m.live_mapping(proto, inside, now);
                    let live_before = m.live_mappings(now);
                    let key = (proto, inside, remote);
                    let r = nat.outbound(proto, inside, raw_remote, flags, now, &mut rng);
                    let tr = r.map_err(|e| TestCaseError::fail(format!("outbound failed: {e}")))?;
                    prop_assert_eq!(tr.inside, inside);
                    prop_assert_eq!(tr.remote, remote);
                    match expected_map {
                        Some(out) => prop_assert_eq!(tr.outside, out, "EIM broken"),
                        None => {
                            prop_assert!(MPOOL.contains(&tr.outside.0));
                            prop_assert!(tr.outside.1 >= MRANGE.0 && tr.outside.1 <= MRANGE.1);
                            for ((p, ins), out) in &live_before {
                                if *p == proto && *ins != inside {
                                    prop_assert_ne!(*out, tr.outside, "outside endpoint shared");
                                }
                            }
                        }
                    }
                    let paired = *m.paired.entry(inside.0).or_insert(tr.outside.0);
                    prop_assert_eq!(paired, tr.outside.0, "pairing broken");
                    let existing = m
                        .sessions
                        .get(&key)
                        .copied()
                        .filter(|s| m.alive(&key, s, now));
                    let s = match existing {
                        Some(mut s) => {
                            prop_assert_eq!(s.id, tr.session);
                            s.tcp.apply(true, flags);
                            s.last = s.last.max(now);
                            s
                        }
                        None => {
                            let mut tcp = MTcp::default();
                            tcp.apply(true, flags);
                            MSession {
                                id: tr.session,
                                outside: tr.outside,
                                tcp,
                                last: now,
                            }
                        }
                    };
                    m.sessions.insert(key, s);
                    observed.push((proto, inside, tr.outside, raw_remote));
                }
                Op::In {
                    proto,
                    remote,
                    target,
                    flags,
                    dt,
                } => {
                    now += DTS[usize::from(dt)] * S;
                    // Mostly answer a flow that was opened (its protocol, outside endpoint and
                    // remote); sometimes a stranger, another protocol or an unused port.
                    let pick = observed
                        .len()
                        .checked_sub(1 + usize::from(target % 8))
                        .and_then(|i| observed.get(i).copied());
                    let (proto, outside, raw_remote) = match (pick, target % 16) {
                        (Some((p, _, o, r)), 0..=10) => (p, o, r),
                        (Some((p, _, o, _)), 11..=12) => (p, o, remote_of(remote)),
                        (Some((_, _, o, r)), 13) => (Proto::ALL[usize::from(proto)], o, r),
                        _ => (
                            Proto::ALL[usize::from(proto)],
                            (MPOOL[usize::from(target & 1)], MRANGE.0 + target % 120),
                            remote_of(remote),
                        ),
                    };
                    let remote = if proto == Proto::Icmp {
                        (raw_remote.0, 0)
                    } else {
                        raw_remote
                    };
                    let flags = if proto == Proto::Tcp {
                        FLAGS[usize::from(flags)]
                    } else {
                        0
                    };
                    let hit = m
                        .sessions
                        .iter()
                        .find(|(k, s)| {
                            k.0 == proto
                                && k.2 == remote
                                && s.outside == outside
                                && m.alive(k, s, now)
                        })
                        .map(|(k, s)| (*k, *s));
                    let r = nat.inbound(proto, raw_remote, outside, flags, now);
                    match hit {
                        None => prop_assert_eq!(r, None),
                        Some((k, mut s)) => {
                            let r = r.ok_or_else(|| {
                                TestCaseError::fail("APDF refused a live session")
                            })?;
                            prop_assert_eq!(r.inside, k.1);
                            prop_assert_eq!(r.session, s.id);
                            prop_assert_eq!(r.outside, outside);
                            s.tcp.apply(false, flags);
                            s.last = s.last.max(now);
                            m.sessions.insert(k, s);
                        }
                    }
                }
                Op::Expire { dt, budget } => {
                    now += DTS[usize::from(dt)] * S;
                    let budget = usize::from(budget) * 3;
                    let mut visited_dead = true;
                    let n = nat.expire_with(now, budget, |v| {
                        visited_dead &= now >= v.expires_at_ns;
                    });
                    prop_assert!(n <= budget);
                    prop_assert!(visited_dead, "a live session was expired");
                }
            }
            // Every live model session is in the table, unchanged.
            for (k, s) in &m.sessions {
                if !m.alive(k, s, now) {
                    continue;
                }
                let v = nat
                    .session(s.id)
                    .ok_or_else(|| TestCaseError::fail("live session missing"))?;
                prop_assert_eq!(
                    (v.proto, v.inside, v.remote, v.outside),
                    (k.0, k.1, k.2, s.outside)
                );
                if k.0 == Proto::Tcp {
                    prop_assert_eq!(v.tcp_state, Some(s.tcp.as_state()));
                }
                prop_assert!(now < v.expires_at_ns);
            }
            nat.check_invariants().map_err(TestCaseError::fail)?;
        }
        // Drain: everything goes, every port comes back.
        now += 10 * 7440 * S;
        nat.expire(now, usize::MAX);
        prop_assert_eq!(nat.session_count(), 0);
        prop_assert_eq!(nat.mapping_count(), 0);
        nat.check_invariants().map_err(TestCaseError::fail)?;
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn nat_matches_reference_model(seed in any::<u32>(), ops in prop::collection::vec(op(), 1..120)) {
            run_against_model(seed, ops)?;
        }

        #[test]
        fn tiny_tables_never_break_invariants(
            seed in any::<u32>(),
            ops in prop::collection::vec(op(), 1..200),
            sessions in 1usize..6,
            mappings in 1usize..6,
            ports in 0u16..4,
        ) {
            // Errors are expected here; the point is that nothing half-created is left behind
            // and no two mappings share an outside endpoint.
            let mut rng = XorShift32(seed);
            let c = cfg(vec![POOL_A], (5000, 5000 + ports), sessions, mappings);
            let mut nat: NatTable<Ipv4Addr> = NatTable::new(c, &mut rng).unwrap();
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Out { proto, host, hport, remote, flags, dt, .. } => {
                        now += DTS[usize::from(dt)] * S;
                        let before = (nat.session_count(), nat.mapping_count());
                        let r = nat.outbound(
                            Proto::ALL[usize::from(proto)],
                            (Ipv4Addr::new(10, 0, 0, host), u16::from(hport)),
                            remote_of(remote),
                            FLAGS[usize::from(flags)],
                            now,
                            &mut rng,
                        );
                        if r.is_err() {
                            // Only dead sessions may have been cleared on the way.
                            prop_assert!(nat.session_count() <= before.0);
                            prop_assert!(nat.mapping_count() <= before.1);
                        }
                    }
                    Op::In { proto, remote, target, flags, dt } => {
                        now += DTS[usize::from(dt)] * S;
                        let _ = nat.inbound(
                            Proto::ALL[usize::from(proto)],
                            remote_of(remote),
                            (POOL_A, 5000 + target % 5),
                            FLAGS[usize::from(flags)],
                            now,
                        );
                    }
                    Op::Expire { dt, budget } => {
                        now += DTS[usize::from(dt)] * S;
                        prop_assert!(nat.expire(now, usize::from(budget)) <= usize::from(budget));
                    }
                }
                nat.check_invariants().map_err(TestCaseError::fail)?;
            }
        }
    }
}
