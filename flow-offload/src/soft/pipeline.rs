//! The forwarding pipeline the DPU's lcores run for everything hardware does not handle.
//!
//! # Forwarding semantics (the model's, which hardware must match)
//! 1. **Ingress.** A packet marked by hardware with [`crate::ir::mark`] resumes at step 2 in the
//!    VRF the mark names. Otherwise, by ingress port:
//!    - a VPC port: non-IP (or VLAN-tagged) frames go to the host; the VPC's meter polices (red
//!      is dropped); the VRF is the VPC's.
//!    - an uplink: IPv4/UDP to our VTEP on port 4789 is VXLAN: the VNI picks the VPC (unknown:
//!      drop), the outer headers are stripped. IPv4 to a NAT outside address is translated back
//!      (static 1:1; NAPT44 and NAT64 through their session tables, no session: drop) into the
//!      VPC's VRF; IPv6 to a static NAT66 outside address likewise. Everything else routes in the
//!      underlay. Non-IP goes to the host.
//!    - any other port: drop.
//! 2. **Lookup** of the destination in the VRF, longest prefix first. A VPC's NAT64 prefix acts
//!    as a route there. No route: drop.
//! 3. **Breakout** (a VPC route with a `Vrf` next hop, or the NAT64 prefix): source NAT — static
//!    1:1 when the source is its inside address, else NAPT44 for IPv4, NAT64 for the prefix —
//!    then a lookup in the underlay (one VRF hop at most).
//! 4. **Forward.** Blackhole: drop. TTL/hop limit ≤ 1: drop. The route's meter polices. ECMP picks
//!    a next hop by [`flow_hash`]. The TTL is decremented (RFC 1624 incremental checksum), the
//!    source MAC becomes our router MAC; an underlay next hop sets the destination MAC and sends
//!    on its port; a VXLAN next hop sets the inner destination MAC to the remote router MAC and
//!    pushes outer Ethernet/IPv4/UDP/VXLAN toward the VTEP's underlay next hop
//!    ([`crate::compile::resolve_vtep`]'s rule: longest underlay route, first next hop).
//!
//! Everything is bounded: routes in [`crate::lpm`] tables with limits, NAT state in fixed-size
//! tables, meters in a fixed-size table. Nothing allocates per packet.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::collections::BTreeMap;

use crate::ir::{mark, vxlan_source_port, VxlanEncap};
use crate::lpm::{Lpm4, Lpm6, LpmError, LpmLimits};
use crate::model::{
    MacAddr, MeterTarget, Model, Name, NatKind, Nexthop, PortId, Prefix, RouteKey, TableId,
    UNDERLAY_TABLE,
};
use crate::packet::{self, checksum, ip_proto, parse_layout, Layout, L3, L4, VXLAN_PORT};
use crate::soft::meter::{Color, Meter};
use crate::soft::nat::{
    NatConfig, NatError, NatTable, Proto, Random, SessionId, SessionView, Timeouts,
};
use crate::soft::rfc6052;

/// What the pipeline decided for a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Send the (rewritten) frame on a port.
    Tx(PortId),
    /// Hand to the host's stack (non-IP, e.g. ARP).
    ToHost,
    /// Drop, and why.
    Drop(DropReason),
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The frame does not parse.
    Malformed,
    /// Arrived on a port that belongs to nothing.
    UnknownPort,
    /// VXLAN with a VNI no VPC has.
    UnknownVni,
    /// No route.
    NoRoute,
    /// A blackhole route.
    Blackhole,
    /// TTL or hop limit expired.
    TtlExceeded,
    /// A meter coloured it red.
    Policed,
    /// Inbound to a NAT pool with no session.
    NoSession,
    /// NAT could not create state (table full, ports exhausted).
    NatExhausted,
    /// The packet cannot be translated (NAT64: fragments, options, unknown ICMP).
    Untranslatable,
    /// The VXLAN next hop's VTEP has no underlay route.
    Unresolved,
    /// More than one VRF hop.
    VrfLoop,
    /// No room in the buffer to push headers.
    NoHeadroom,
    /// A packet that would create a NAT session on a member of a pair that may not allocate
    /// (standby or fenced; [`Pipeline::set_nat_allocation`]).
    NatNotActive,
}

/// A packet buffer with headroom, as an mbuf is.
pub trait PacketBuf {
    /// The frame.
    fn data(&self) -> &[u8];
    /// The frame, writable.
    fn data_mut(&mut self) -> &mut [u8];
    /// Grows the frame by `n` bytes at the front (uninitialised content); false if no room.
    fn prepend(&mut self, n: usize) -> bool;
    /// Removes `n` bytes from the front; false if the frame is shorter.
    fn adj(&mut self, n: usize) -> bool;
    /// Sets the frame length, keeping the front; false if beyond the capacity.
    fn set_len(&mut self, len: usize) -> bool;
}

impl PacketBuf for Vec<u8> {
    fn data(&self) -> &[u8] {
        self
    }
    fn data_mut(&mut self) -> &mut [u8] {
        self
    }
    fn prepend(&mut self, n: usize) -> bool {
        self.splice(0..0, core::iter::repeat_n(0u8, n));
        true
    }
    fn adj(&mut self, n: usize) -> bool {
        if n > self.len() {
            return false;
        }
        self.drain(..n);
        true
    }
    fn set_len(&mut self, len: usize) -> bool {
        self.resize(len, 0);
        true
    }
}

/// A fixed buffer with headroom, allocated once and reused (benchmarks, tests).
#[derive(Debug, Clone)]
pub struct HeadroomBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl HeadroomBuf {
    /// A buffer of `capacity` bytes, `headroom` of them before the frame.
    pub fn new(capacity: usize, headroom: usize) -> HeadroomBuf {
        let headroom = headroom.min(capacity);
        HeadroomBuf {
            buf: vec![0; capacity].into_boxed_slice(),
            start: headroom,
            end: headroom,
        }
    }

    /// Replaces the content with `frame` after `headroom` bytes; false if it does not fit.
    pub fn load(&mut self, frame: &[u8], headroom: usize) -> bool {
        let Some(dst) = self.buf.get_mut(headroom..headroom + frame.len()) else {
            return false;
        };
        dst.copy_from_slice(frame);
        self.start = headroom;
        self.end = headroom + frame.len();
        true
    }
}

impl PacketBuf for HeadroomBuf {
    fn data(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or(&[])
    }
    fn data_mut(&mut self) -> &mut [u8] {
        self.buf.get_mut(self.start..self.end).unwrap_or(&mut [])
    }
    fn prepend(&mut self, n: usize) -> bool {
        if n > self.start {
            return false;
        }
        self.start -= n;
        true
    }
    fn adj(&mut self, n: usize) -> bool {
        if self.start + n > self.end {
            return false;
        }
        self.start += n;
        true
    }
    fn set_len(&mut self, len: usize) -> bool {
        if self.start + len > self.buf.len() {
            return false;
        }
        self.end = self.start + len;
        true
    }
}

/// Sizes of the pipeline's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineLimits {
    /// Per VRF and family route table limits.
    pub lpm: LpmLimits,
    /// Routes in all (route entries).
    pub max_routes: usize,
    /// NAT sessions per stateful rule.
    pub nat_sessions: usize,
}

impl Default for PipelineLimits {
    fn default() -> Self {
        PipelineLimits {
            lpm: LpmLimits::default(),
            max_routes: 1 << 24,
            nat_sessions: 1 << 16,
        }
    }
}

/// Why the pipeline could not take the desired state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipelineError {
    /// A route table is full.
    #[error("route {key:?}: {source}")]
    Lpm {
        /// The route.
        key: RouteKey,
        /// The table's error.
        source: LpmError,
    },
    /// Too many routes.
    #[error("route table full ({max} routes)")]
    RoutesFull {
        /// The limit.
        max: usize,
    },
    /// A NAT table could not be built.
    #[error("nat rule {rule}: {source}")]
    Nat {
        /// The rule.
        rule: Name,
        /// Why.
        source: NatError,
    },
}

/// What [`Pipeline::carry_nat_from`] moved into a new pipeline, and what it could not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatCarry {
    /// NAT rules whose tables (every mapping and session) were carried over.
    pub carried: Vec<Name>,
    /// Sessions carried over.
    pub sessions: usize,
    /// NAT rules of the old pipeline whose state was dropped (the rule is gone, or its pool,
    /// ports, limits, VPC table or NAT64 prefix changed), with the sessions each held.
    pub dropped: Vec<(Name, usize)>,
}

/// Per-route counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets forwarded or dropped by the route.
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// One route as the fast path sees it: its next-hop group, its meter and its counters, in
/// 32 bytes, so that one cache line serves the read and the counter update.
#[derive(Debug, Clone, Copy)]
#[repr(align(32))]
struct RouteSlot {
    /// Index into `Pipeline::nh_groups`; `NO_GROUP` for a free slot.
    group: u32,
    /// Index into `Pipeline::meters`; `NO_METER` for none.
    meter: u32,
    packets: u64,
    bytes: u64,
}

/// `RouteSlot::group` of a free slot.
const NO_GROUP: u32 = u32::MAX;
/// `RouteSlot::meter` of a route without a meter.
const NO_METER: u32 = u32::MAX;

impl RouteSlot {
    const FREE: RouteSlot = RouteSlot {
        group: NO_GROUP,
        meter: NO_METER,
        packets: 0,
        bytes: 0,
    };

    fn is_live(&self) -> bool {
        self.group != NO_GROUP
    }

    fn meter(&self) -> Option<usize> {
        (self.meter != NO_METER).then_some(self.meter as usize)
    }
}

/// A set of next hops shared by every route that has exactly this list (in this order:
/// ECMP picks by position). Routes typically share a handful of groups, which stay in cache.
#[derive(Debug, Clone)]
struct NhGroup {
    nexthops: Box<[Nexthop]>,
    /// Routes using the group; 0 for a free group.
    refs: u32,
}

/// The routes' next-hop groups, deduplicated and reference counted.
#[derive(Debug, Default)]
struct NhGroups {
    groups: Vec<NhGroup>,
    free: Vec<u32>,
    index: BTreeMap<Box<[Nexthop]>, u32>,
}

impl NhGroups {
    /// The group for this list, created if needed, with one more reference.
    fn acquire(&mut self, nexthops: &[Nexthop]) -> u32 {
        if let Some(&g) = self.index.get(nexthops) {
            if let Some(x) = self.groups.get_mut(g as usize) {
                x.refs += 1;
                return g;
            }
        }
        let group = NhGroup {
            nexthops: nexthops.into(),
            refs: 1,
        };
        let g = match self.free.pop() {
            Some(g) => {
                if let Some(x) = self.groups.get_mut(g as usize) {
                    *x = group;
                }
                g
            }
            None => {
                self.groups.push(group);
                (self.groups.len() - 1) as u32
            }
        };
        self.index.insert(nexthops.into(), g);
        g
    }

    /// Drops one reference; the last one frees the group.
    fn release(&mut self, g: u32) {
        let Some(x) = self.groups.get_mut(g as usize) else {
            return;
        };
        x.refs = x.refs.saturating_sub(1);
        if x.refs == 0 {
            let nexthops = core::mem::take(&mut x.nexthops);
            self.index.remove(&nexthops);
            self.free.push(g);
        }
    }

    #[inline]
    fn get(&self, g: u32) -> &[Nexthop] {
        self.groups.get(g as usize).map_or(&[], |x| &x.nexthops)
    }

    /// Groups in use.
    #[cfg(test)]
    fn live(&self) -> usize {
        self.index.len()
    }
}

/// What a lookup hit.
#[derive(Debug, Clone, Copy)]
enum Hit {
    Route(usize),
    Nat64(usize),
}

#[derive(Debug)]
struct Vrf {
    v4: Lpm4,
    v6: Lpm6,
    /// NAT rules applied on breakout from this VRF.
    static44: Vec<(Ipv4Addr, Ipv4Addr)>,
    static66: Vec<(Ipv6Addr, Ipv6Addr)>,
    napt: Option<usize>,
    meter: Option<usize>,
}

#[derive(Debug)]
struct Nat64 {
    /// The rule's name (matched by [`Pipeline::carry_nat_from`]).
    name: Name,
    prefix: Prefix,
    table: NatTable<Ipv6Addr>,
    vrf: TableId,
}

/// Packets per first pass of [`Pipeline::process_burst`].
const BURST: usize = 32;

/// A destination address to look up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LookupKey {
    None,
    V4(u32),
    /// High and low halves (8-byte alignment keeps memos at 32 bytes).
    V6([u64; 2]),
}

impl LookupKey {
    #[inline]
    fn v6(a: Ipv6Addr) -> LookupKey {
        let a = u128::from(a);
        LookupKey::V6([(a >> 64) as u64, a as u64])
    }
}

#[inline]
fn v6_key(k: [u64; 2]) -> u128 {
    (u128::from(k[0]) << 64) | u128::from(k[1])
}

/// The destination address of a frame, found without validating anything: a guess for
/// the burst's first pass, where a wrong one only wastes a lookup. `None` for non-IP frames,
/// and for tagged ones unless `tagged` (they go to the host unless a mark routes them).
#[inline]
fn guess_dst(d: &[u8], tagged: bool) -> LookupKey {
    let (et, l3) = match get16(d, 12) {
        packet::ethertype::VLAN if tagged => (get16(d, 16), 18),
        packet::ethertype::VLAN => return LookupKey::None,
        et => (et, 14),
    };
    match et {
        packet::ethertype::IPV4 => match d.get(l3 + 16..l3 + 20) {
            Some(&[a, b, c, e]) => LookupKey::V4(u32::from_be_bytes([a, b, c, e])),
            _ => LookupKey::None,
        },
        packet::ethertype::IPV6 => match d.get(l3 + 24..l3 + 40) {
            Some(a) => LookupKey::v6(ipv6_at(a, 0)),
            None => LookupKey::None,
        },
        _ => LookupKey::None,
    }
}

/// The destination of a packet as its layout says.
#[inline]
fn dst_key(d: &[u8], l: &Layout) -> LookupKey {
    let l3 = usize::from(l.l3_offset);
    match l.l3 {
        L3::Ipv4 => LookupKey::V4(u32::from(ipv4_at(d, l3 + 16))),
        L3::Ipv6 => LookupKey::v6(ipv6_at(d, l3 + 24)),
        L3::Other => LookupKey::None,
    }
}

/// A lookup done ahead by the burst's first pass: `value` is what the LPM of `table` holds
/// for `key` (`NO_VALUE`: no match, or no such table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Memo {
    table: TableId,
    value: u32,
    key: LookupKey,
}

/// `Memo::value` for no match (LPM values are below 2^22).
const NO_VALUE: u32 = u32::MAX;

/// A memo that matches no lookup.
const NO_MEMO: Memo = Memo {
    table: UNDERLAY_TABLE,
    value: NO_VALUE,
    key: LookupKey::None,
};

impl Memo {
    fn value(&self) -> Option<u32> {
        (self.value != NO_VALUE).then_some(self.value)
    }
}

/// The burst's first-pass results, kept in the pipeline so a burst allocates nothing.
#[derive(Debug)]
struct BurstScratch {
    /// Per packet, the lookup its ingress stage should lead to.
    first: [Memo; BURST],
    /// Per packet, the underlay lookup behind a breakout.
    second: [Memo; BURST],
    /// The packet being processed (an index in the arrays), or `BURST` outside a burst.
    current: usize,
}

/// Fills `value` of every memo with a key, by batched lookups per table and family, then
/// reads the route slots they hit, so that the cache misses of all the memos overlap.
fn lookup_many(vrfs: &BTreeMap<TableId, Vrf>, routes: &[RouteSlot], memos: &mut [Memo]) {
    let mut done = [false; BURST];
    let mut keys4 = [0u32; BURST];
    let mut keys6 = [0u128; BURST];
    let mut at4 = [0usize; BURST];
    let mut at6 = [0usize; BURST];
    let mut out = [None; BURST];
    for i in 0..memos.len().min(BURST) {
        let Some(&Memo { table, key, .. }) = memos.get(i) else {
            break;
        };
        if key == LookupKey::None || done.get(i).copied().unwrap_or(true) {
            continue;
        }
        // Every pending memo of this table.
        let (mut n4, mut n6) = (0, 0);
        for ((j, m), d) in memos.iter().enumerate().zip(done.iter_mut()).skip(i) {
            if m.table != table || *d {
                continue;
            }
            *d = true;
            match m.key {
                LookupKey::V4(k) => {
                    if let (Some(x), Some(a)) = (keys4.get_mut(n4), at4.get_mut(n4)) {
                        (*x, *a) = (k, j);
                        n4 += 1;
                    }
                }
                LookupKey::V6(k) => {
                    if let (Some(x), Some(a)) = (keys6.get_mut(n6), at6.get_mut(n6)) {
                        (*x, *a) = (v6_key(k), j);
                        n6 += 1;
                    }
                }
                LookupKey::None => {}
            }
        }
        let Some(vrf) = vrfs.get(&table) else {
            continue; // no such table: every lookup misses, as `NO_VALUE` says
        };
        if n4 > 0 {
            vrf.v4.lookup_batch(&keys4[..n4], &mut out[..n4]);
            for (&j, &v) in at4[..n4].iter().zip(&out[..n4]) {
                if let Some(m) = memos.get_mut(j) {
                    m.value = v.unwrap_or(NO_VALUE);
                }
            }
        }
        if n6 > 0 {
            vrf.v6.lookup_batch(&keys6[..n6], &mut out[..n6]);
            for (&j, &v) in at6[..n6].iter().zip(&out[..n6]) {
                if let Some(m) = memos.get_mut(j) {
                    m.value = v.unwrap_or(NO_VALUE);
                }
            }
        }
    }
    // Start the route slots' misses together (independent loads).
    for m in memos.iter() {
        if m.value < NAT64_BASE {
            core::hint::black_box(routes.get(m.value as usize).map(|s| s.group));
        }
    }
}

/// A value in the LPM: route entries below this, NAT64 prefixes above.
const NAT64_BASE: u32 = 1 << 21;

/// What an ingress port is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortKind {
    /// A VPC port: the VPC's table and meter.
    Vpc {
        table: TableId,
        meter: Option<usize>,
    },
    Uplink,
    Unknown,
}

/// The software pipeline for one DPU.
#[derive(Debug)]
pub struct Pipeline {
    limits: PipelineLimits,
    vtep: Option<Ipv4Addr>,
    router_mac: MacAddr,
    uplinks: Vec<PortId>,
    vpc_ports: BTreeMap<PortId, TableId>,
    vni_to_table: BTreeMap<u32, TableId>,
    vrfs: BTreeMap<TableId, Vrf>,
    /// Route slots, indexed by the LPM value.
    routes: Vec<RouteSlot>,
    free_routes: Vec<usize>,
    route_index: BTreeMap<RouteKey, usize>,
    nh_groups: NhGroups,
    meters: Vec<Meter>,
    napt: Vec<(TableId, NatTable<Ipv4Addr>)>,
    /// The NAPT44 rules' names, by index of `napt` (kept apart: the fast path never reads them).
    napt_names: Vec<Name>,
    nat64: Vec<Nat64>,
    /// Reverse static NAT: outside → (inside, table).
    rev44: BTreeMap<Ipv4Addr, (Ipv4Addr, TableId)>,
    rev66: BTreeMap<Ipv6Addr, (Ipv6Addr, TableId)>,
    scratch: Vec<u8>,
    rng: XorShift64,
    /// The last port classified.
    port_cache: Option<(PortId, PortKind)>,
    /// The lookups done ahead for the packets of a burst (see `process_burst`).
    burst: Box<BurstScratch>,
    /// The member's NAT settings as part of an A/B pair (see "A/B pair" below).
    pair: PairNat,
}

/// The pipeline's own randomness for port choice: seeded by the caller.
#[derive(Debug, Clone)]
struct XorShift64(u64);

impl Random for XorShift64 {
    fn next_u32(&mut self) -> u32 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 32) as u32
    }
}

/// The ECMP hash of a packet: a multiply-xorshift over addresses, protocol and ports. Software
/// ECMP uses it; it is deterministic so tests can predict the choice.
pub fn flow_hash(frame: &[u8], l: &Layout) -> u32 {
    let l3 = usize::from(l.l3_offset);
    let (addrs, proto) = match l.l3 {
        L3::Ipv4 => (frame.get(l3 + 12..l3 + 20), frame.get(l3 + 9).copied()),
        L3::Ipv6 => (frame.get(l3 + 8..l3 + 40), frame.get(l3 + 6).copied()),
        L3::Other => (None, None),
    };
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in addrs.unwrap_or(&[]).chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
    }
    let ports = (u64::from(l.src_port) << 16) | u64::from(l.dst_port);
    h = (h ^ (ports << 8) ^ u64::from(proto.unwrap_or(0))).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h as u32
}

impl Pipeline {
    /// Builds the pipeline's tables from the model. `seed` feeds NAT port randomisation.
    pub fn new(
        model: &Model,
        limits: PipelineLimits,
        seed: u64,
    ) -> Result<Pipeline, PipelineError> {
        let node = model.node();
        let mut p = Pipeline {
            limits,
            vtep: node.map(|n| n.vtep),
            router_mac: node.map(|n| n.router_mac).unwrap_or_default(),
            uplinks: node
                .map(|n| n.uplinks.iter().copied().collect())
                .unwrap_or_default(),
            vpc_ports: BTreeMap::new(),
            vni_to_table: BTreeMap::new(),
            vrfs: BTreeMap::new(),
            routes: Vec::new(),
            free_routes: Vec::new(),
            route_index: BTreeMap::new(),
            nh_groups: NhGroups::default(),
            meters: Vec::new(),
            napt: Vec::new(),
            napt_names: Vec::new(),
            nat64: Vec::new(),
            rev44: BTreeMap::new(),
            rev66: BTreeMap::new(),
            scratch: vec![0; 16 * 1024],
            rng: XorShift64(seed | 1),
            port_cache: None,
            burst: Box::new(BurstScratch {
                first: [NO_MEMO; BURST],
                second: [NO_MEMO; BURST],
                current: BURST,
            }),
            pair: PairNat::default(),
        };
        p.vrfs.insert(UNDERLAY_TABLE, p.empty_vrf());
        for vpc in model.vpcs().values() {
            for port in &vpc.ports {
                p.vpc_ports.insert(*port, vpc.table);
            }
            p.vni_to_table.insert(vpc.vni.get(), vpc.table);
            let mut vrf = p.empty_vrf();
            if let Some(m) = model.meter_for(&MeterTarget::Vpc(vpc.name.clone())) {
                vrf.meter = Some(p.meters.len());
                p.meters.push(Meter::new(m.profile, 0));
            }
            p.vrfs.insert(vpc.table, vrf);
        }
        for nat in model.nat_rules().values() {
            let Some(vpc) = model.vpcs().get(&nat.vpc) else {
                continue;
            };
            let table = vpc.table;
            let nat_err = |source| PipelineError::Nat {
                rule: nat.name.clone(),
                source,
            };
            match &nat.kind {
                NatKind::Static44 { inside, outside } => {
                    if let Some(v) = p.vrfs.get_mut(&table) {
                        v.static44.push((*inside, *outside));
                    }
                    p.rev44.insert(*outside, (*inside, table));
                }
                NatKind::Static66 { inside, outside } => {
                    if let Some(v) = p.vrfs.get_mut(&table) {
                        v.static66.push((*inside, *outside));
                    }
                    p.rev66.insert(*outside, (*inside, table));
                }
                NatKind::Napt44 { pool, ports } => {
                    let cfg = p.nat_config(pool.iter().collect(), *ports);
                    let t = NatTable::new(cfg, &mut p.rng).map_err(nat_err)?;
                    if let Some(v) = p.vrfs.get_mut(&table) {
                        v.napt = Some(p.napt.len());
                    }
                    p.napt.push((table, t));
                    p.napt_names.push(nat.name.clone());
                }
                NatKind::Nat64 {
                    prefix,
                    pool,
                    ports,
                } => {
                    let cfg = p.nat_config(pool.iter().collect(), *ports);
                    let t = NatTable::new(cfg, &mut p.rng).map_err(nat_err)?;
                    let idx = p.nat64.len() as u32;
                    if let (Some(v), IpAddr::V6(a)) = (p.vrfs.get_mut(&table), prefix.addr()) {
                        v.v6.insert(u128::from(a), prefix.len(), NAT64_BASE + idx)
                            .map_err(|source| PipelineError::Lpm {
                                key: RouteKey {
                                    table,
                                    prefix: *prefix,
                                },
                                source,
                            })?;
                    }
                    p.nat64.push(Nat64 {
                        name: nat.name.clone(),
                        prefix: *prefix,
                        table: t,
                        vrf: table,
                    });
                }
            }
        }
        for key in model.routes().keys() {
            p.update_route(model, *key)?;
        }
        Ok(p)
    }

    /// Moves the NAT state of `old` into this pipeline, built from a newer model: for each
    /// NAPT44 and NAT64 rule that both have under the same name, in the same VPC table, with
    /// the same configuration (pool, port range, limits, timeouts; for NAT64 the prefix too),
    /// this pipeline takes `old`'s table whole: every mapping and session, with its counters,
    /// expiry and offload mark, so the session ids held elsewhere stay valid and established
    /// flows keep their outside address and port. A rule whose configuration changed starts
    /// empty: its old bindings might lie outside its new pool. O(NAT rules); `old` is left
    /// with the empty tables.
    ///
    /// The pair settings ([`Pipeline::set_nat_allocation`], [`Pipeline::set_nat_block`],
    /// [`Pipeline::enable_nat_change_log`]) are carried too, and apply to the new rules'
    /// tables (the block before the comparison, so that it does not count as a change).
    pub fn carry_nat_from(&mut self, old: &mut Pipeline) -> NatCarry {
        let mut out = NatCarry::default();
        self.pair = old.pair;
        self.apply_pair_block();
        let mut taken = vec![false; old.napt.len()];
        for (i, (table, t)) in self.napt.iter_mut().enumerate() {
            let Some(name) = self.napt_names.get(i) else {
                continue;
            };
            let found = old.napt_names.iter().position(|n| n == name);
            let Some(j) = found else { continue };
            let Some((old_table, old_t)) = old.napt.get_mut(j) else {
                continue;
            };
            if old_table == table && old_t.config() == t.config() {
                std::mem::swap(t, old_t);
                out.sessions += t.session_count();
                out.carried.push(name.clone());
                if let Some(x) = taken.get_mut(j) {
                    *x = true;
                }
            }
        }
        for ((j, (_, t)), name) in old.napt.iter().enumerate().zip(&old.napt_names) {
            if !taken.get(j).copied().unwrap_or(true) {
                out.dropped.push((name.clone(), t.session_count()));
            }
        }
        let mut taken = vec![false; old.nat64.len()];
        for n in &mut self.nat64 {
            let found = old.nat64.iter().position(|o| o.name == n.name);
            let Some(j) = found else { continue };
            let Some(o) = old.nat64.get_mut(j) else {
                continue;
            };
            if o.vrf == n.vrf && o.prefix == n.prefix && o.table.config() == n.table.config() {
                std::mem::swap(&mut n.table, &mut o.table);
                out.sessions += n.table.session_count();
                out.carried.push(n.name.clone());
                if let Some(x) = taken.get_mut(j) {
                    *x = true;
                }
            }
        }
        for (j, o) in old.nat64.iter().enumerate() {
            if !taken.get(j).copied().unwrap_or(true) {
                out.dropped.push((o.name.clone(), o.table.session_count()));
            }
        }
        self.apply_pair_settings();
        out
    }

    fn empty_vrf(&self) -> Vrf {
        Vrf {
            v4: Lpm4::new(self.limits.lpm),
            v6: Lpm6::new(self.limits.lpm),
            static44: Vec::new(),
            static66: Vec::new(),
            napt: None,
            meter: None,
        }
    }

    fn nat_config(&self, pool: Vec<Ipv4Addr>, ports: (u16, u16)) -> NatConfig {
        NatConfig {
            max_mappings: self.limits.nat_sessions,
            max_sessions: self.limits.nat_sessions,
            pool,
            port_range: ports,
            timeouts: Timeouts::default(),
            block: crate::soft::nat::AllocBlock::WHOLE,
        }
    }

    /// Installs, replaces or removes one route after the model changed it. On error the
    /// pipeline keeps the route's previous state.
    pub fn update_route(&mut self, model: &Model, key: RouteKey) -> Result<(), PipelineError> {
        let Some(route) = model.routes().get(&key) else {
            if let Some(idx) = self.route_index.remove(&key) {
                if let Some(vrf) = self.vrfs.get_mut(&key.table) {
                    let _ = match key.prefix.addr() {
                        IpAddr::V4(a) => vrf.v4.remove(u32::from(a), key.prefix.len()),
                        IpAddr::V6(a) => vrf.v6.remove(u128::from(a), key.prefix.len()),
                    };
                }
                if let Some(slot) = self.routes.get_mut(idx) {
                    if slot.is_live() {
                        self.nh_groups.release(slot.group);
                    }
                    *slot = RouteSlot::FREE;
                }
                self.free_routes.push(idx);
            }
            return Ok(());
        };
        let meter = model.meter_for(&MeterTarget::Route(key)).map(|m| m.profile);
        if let Some(&idx) = self.route_index.get(&key) {
            if let Some(slot) = self.routes.get_mut(idx).filter(|s| s.is_live()) {
                // Take the new group before releasing the old one: an unchanged list keeps
                // its group.
                let g = self.nh_groups.acquire(&route.nexthops);
                self.nh_groups.release(slot.group);
                slot.group = g;
                match (slot.meter(), meter) {
                    (Some(m), Some(profile)) => {
                        if self.meters.get(m).map(|x| x.profile()) != Some(profile) {
                            if let Some(x) = self.meters.get_mut(m) {
                                *x = Meter::new(profile, 0);
                            }
                        }
                    }
                    (None, Some(profile)) => {
                        slot.meter = self.meters.len() as u32;
                        self.meters.push(Meter::new(profile, 0));
                    }
                    (_, None) => slot.meter = NO_METER,
                }
            }
            return Ok(());
        }
        // Route slot numbers share the LPM value space with the NAT64 prefixes.
        let max = self.limits.max_routes.min(NAT64_BASE as usize);
        if self.route_index.len() >= max {
            return Err(PipelineError::RoutesFull { max });
        }
        let idx = self.free_routes.pop().unwrap_or(self.routes.len());
        if idx >= NAT64_BASE as usize {
            // Unreachable while slots and live routes match; never hand out such a value.
            self.free_routes.push(idx);
            return Err(PipelineError::RoutesFull { max });
        }
        let Some(vrf) = self.vrfs.get_mut(&key.table) else {
            self.free_routes.push(idx);
            return Ok(());
        };
        let res = match key.prefix.addr() {
            IpAddr::V4(a) => vrf.v4.insert(u32::from(a), key.prefix.len(), idx as u32),
            IpAddr::V6(a) => vrf.v6.insert(u128::from(a), key.prefix.len(), idx as u32),
        };
        if let Err(source) = res {
            self.free_routes.push(idx);
            return Err(PipelineError::Lpm { key, source });
        }
        let meter = meter.map_or(NO_METER, |profile| {
            self.meters.push(Meter::new(profile, 0));
            (self.meters.len() - 1) as u32
        });
        let slot = RouteSlot {
            group: self.nh_groups.acquire(&route.nexthops),
            meter,
            packets: 0,
            bytes: 0,
        };
        if idx == self.routes.len() {
            self.routes.push(slot);
        } else if let Some(s) = self.routes.get_mut(idx) {
            *s = slot;
        }
        self.route_index.insert(key, idx);
        Ok(())
    }

    /// Counters of a route.
    pub fn route_counters(&self, key: &RouteKey) -> Option<Counters> {
        let idx = *self.route_index.get(key)?;
        let slot = self.routes.get(idx).filter(|s| s.is_live())?;
        Some(Counters {
            packets: slot.packets,
            bytes: slot.bytes,
        })
    }

    /// Expires idle NAT sessions, at most `budget` units of work per table.
    pub fn expire(&mut self, now_ns: u64, budget: usize) -> usize {
        let mut n = 0;
        for (_, t) in &mut self.napt {
            n += t.expire(now_ns, budget);
        }
        for t in &mut self.nat64 {
            n += t.table.expire(now_ns, budget);
        }
        n
    }

    /// Processes a burst: `verdicts[i]` is the decision for `pkts[i]` (which is rewritten in
    /// place). `marks[i]` is the hardware mark delivered with it, if any.
    ///
    /// The result is exactly that of [`Pipeline::process`] on each packet in order. Up to 32
    /// packets at a time first go through a read-only pass that looks up the route the common
    /// case will need (and, for a breakout, the underlay route behind it), so that the cache
    /// misses of the whole burst overlap; the per-packet pass then reuses those lookups. No
    /// allocation: the first pass's results live in the pipeline.
    pub fn process_burst<B: PacketBuf>(
        &mut self,
        pkts: &mut [B],
        ingress: &[PortId],
        marks: &[Option<u32>],
        verdicts: &mut [Verdict],
        now_ns: u64,
    ) {
        let n = pkts.len().min(verdicts.len());
        let mut start = 0;
        while start < n {
            let end = (start + BURST).min(n);
            let (Some(chunk), Some(vs)) = (pkts.get_mut(start..end), verdicts.get_mut(start..end))
            else {
                return;
            };
            let ports = ingress.get(start..).unwrap_or(&[]);
            let marks = marks.get(start..).unwrap_or(&[]);
            self.prepare(chunk, ports, marks);
            for (i, (pkt, v)) in chunk.iter_mut().zip(vs.iter_mut()).enumerate() {
                let port = ports.get(i).copied().unwrap_or(PortId(u16::MAX));
                let mark = marks.get(i).copied().flatten();
                self.burst.current = i;
                *v = self.process(pkt, port, mark, now_ns);
            }
            self.burst.current = BURST;
            start = end;
        }
    }

    /// The burst's read-only first pass: for each of up to `BURST` packets, looks up the
    /// route the common case needs: in the VRF of the hardware mark, else the VPC of the
    /// ingress port's, else the underlay for an uplink; then, when that route breaks out (a
    /// `Vrf` next hop or a NAT64 prefix), the underlay route behind it. The lookups run as
    /// batches and the route slots are read, so their cache misses overlap. Results are left
    /// in `self.burst` as memos keyed by (table, address), which `lookup` consults: a packet
    /// that the ingress stage rewrites or sends elsewhere, or whose headers the guess misread,
    /// simply misses them, so they never change a result.
    fn prepare<B: PacketBuf>(&mut self, pkts: &[B], ports: &[PortId], marks: &[Option<u32>]) {
        let n = pkts.len().min(BURST);
        for (i, pkt) in pkts.iter().enumerate().take(BURST) {
            let d = pkt.data();
            let mark = marks.get(i).copied().flatten().and_then(mark::vrf_of);
            let key = guess_dst(d, mark.is_some());
            let table = match mark {
                _ if key == LookupKey::None => None,
                Some(t) => Some(TableId(t)),
                None => match self.port_kind(ports.get(i).copied().unwrap_or(PortId(u16::MAX))) {
                    PortKind::Vpc { table, .. } => Some(table),
                    PortKind::Uplink => Some(UNDERLAY_TABLE),
                    PortKind::Unknown => None,
                },
            };
            if let Some(w) = self.burst.first.get_mut(i) {
                *w = match table {
                    Some(table) => Memo {
                        table,
                        value: NO_VALUE,
                        key,
                    },
                    None => NO_MEMO,
                };
            }
        }
        let burst = &mut *self.burst;
        lookup_many(&self.vrfs, &self.routes, &mut burst.first[..n]);

        // Behind a breakout, the underlay route for the same destination (source NAT keeps
        // it), or for the NAT64 prefix's embedded IPv4 destination.
        for (w, nx) in burst.first.iter().zip(burst.second.iter_mut()).take(n) {
            *nx = NO_MEMO;
            let Some(v) = w.value() else {
                continue;
            };
            if v >= NAT64_BASE {
                if let (Some(n), LookupKey::V6(a)) =
                    (self.nat64.get((v - NAT64_BASE) as usize), w.key)
                {
                    if let Ok(d4) = rfc6052::extract(n.prefix.len(), Ipv6Addr::from(v6_key(a))) {
                        *nx = Memo {
                            table: UNDERLAY_TABLE,
                            value: NO_VALUE,
                            key: LookupKey::V4(u32::from(d4)),
                        };
                    }
                }
                continue;
            }
            let g = self.routes.get(v as usize).map_or(NO_GROUP, |s| s.group);
            if let Some(&Nexthop::Vrf { table }) = self.nh_groups.get(g).first() {
                *nx = Memo {
                    table,
                    value: NO_VALUE,
                    key: w.key,
                };
            }
        }
        lookup_many(&self.vrfs, &self.routes, &mut burst.second[..n]);
    }

    /// Processes one packet.
    pub fn process<B: PacketBuf>(
        &mut self,
        pkt: &mut B,
        ingress: PortId,
        hw_mark: Option<u32>,
        now_ns: u64,
    ) -> Verdict {
        // Used in place, not moved: copying the fresh result out whole would stall on store
        // forwarding (it was written field by field).
        let mut parsed = parse_layout(pkt.data());
        let r = match &mut parsed {
            Ok(l) => self.run_parsed(pkt, l, ingress, hw_mark, now_ns),
            Err(_) => Err(DropReason::Malformed),
        };
        match r {
            Ok(v) => v,
            Err(r) => Verdict::Drop(r),
        }
    }

    fn run_parsed<B: PacketBuf>(
        &mut self,
        pkt: &mut B,
        l: &mut Layout,
        ingress: PortId,
        hw_mark: Option<u32>,
        now_ns: u64,
    ) -> Result<Verdict, DropReason> {
        let table = match hw_mark.and_then(mark::vrf_of) {
            Some(t) => TableId(t),
            None => {
                let kind = self.port_kind(ingress);
                if l.l3 == L3::Other || l.vlan.is_some() {
                    return match kind {
                        PortKind::Vpc { .. } | PortKind::Uplink => Ok(Verdict::ToHost),
                        PortKind::Unknown => Err(DropReason::UnknownPort),
                    };
                }
                match kind {
                    PortKind::Vpc { table, meter } => {
                        let len = pkt.data().len() as u32;
                        if let Some(meter) = meter.and_then(|m| self.meters.get_mut(m)) {
                            if meter.color(len, now_ns) == Color::Red {
                                return Err(DropReason::Policed);
                            }
                        }
                        table
                    }
                    PortKind::Uplink => self.uplink_ingress(pkt, l, now_ns)?,
                    PortKind::Unknown => return Err(DropReason::UnknownPort),
                }
            }
        };
        self.route(pkt, l, table, now_ns, false)
    }

    /// What a port is, through a one-entry cache (a burst usually comes from one port; the
    /// ports never change after [`Pipeline::new`]).
    #[inline]
    fn port_kind(&mut self, port: PortId) -> PortKind {
        if let Some((p, k)) = self.port_cache {
            if p == port {
                return k;
            }
        }
        let k = if let Some(&table) = self.vpc_ports.get(&port) {
            PortKind::Vpc {
                table,
                meter: self.vrfs.get(&table).and_then(|v| v.meter),
            }
        } else if self.uplinks.contains(&port) {
            PortKind::Uplink
        } else {
            PortKind::Unknown
        };
        self.port_cache = Some((port, k));
        k
    }

    /// Uplink classification: VXLAN decap, reverse NAT, or the underlay.
    fn uplink_ingress<B: PacketBuf>(
        &mut self,
        pkt: &mut B,
        l: &mut Layout,
        now_ns: u64,
    ) -> Result<TableId, DropReason> {
        let l3 = usize::from(l.l3_offset);
        let l4 = usize::from(l.l4_offset);
        if l.l3 == L3::Ipv4 {
            let dst = ipv4_at(pkt.data(), l3 + 16);
            if Some(dst) == self.vtep && l.l4 == L4::Udp && l.dst_port == VXLAN_PORT {
                let vx = pkt
                    .data()
                    .get(l4 + 8..l4 + 16)
                    .ok_or(DropReason::Malformed)?;
                let vni = u32::from_be_bytes([0, vx[4], vx[5], vx[6]]);
                if vx[0] & 0x08 == 0 {
                    return Err(DropReason::Malformed);
                }
                let table = *self.vni_to_table.get(&vni).ok_or(DropReason::UnknownVni)?;
                if !pkt.adj(l4 + 16) {
                    return Err(DropReason::Malformed);
                }
                reparse(pkt.data(), l)?;
                if l.l3 == L3::Other || l.vlan.is_some() {
                    return Err(DropReason::Malformed);
                }
                return Ok(table);
            }
            if let Some(&(inside, table)) = self.rev44.get(&dst) {
                set_ipv4_addr(pkt.data_mut(), l, 16, inside);
                return Ok(table);
            }
            if l.fragment {
                return Ok(UNDERLAY_TABLE);
            }
            let src = ipv4_at(pkt.data(), l3 + 12);
            let proto = nat_proto(l);
            let flags = tcp_flags(pkt.data(), l);
            if let Some(proto) = proto {
                let outside = (dst, l.dst_port);
                let remote = (src, l.src_port);
                for (table, nat) in &mut self.napt {
                    if !nat.config().pool.contains(&dst) {
                        continue;
                    }
                    let t = nat
                        .inbound(proto, remote, outside, flags, now_ns)
                        .ok_or(DropReason::NoSession)?;
                    set_ipv4_addr(pkt.data_mut(), l, 16, t.inside.0);
                    set_l4_port(pkt.data_mut(), l, false, t.inside.1)?;
                    return Ok(*table);
                }
                for n in &mut self.nat64 {
                    if !n.table.config().pool.contains(&dst) {
                        continue;
                    }
                    let t = n
                        .table
                        .inbound(proto, remote, outside, flags, now_ns)
                        .ok_or(DropReason::NoSession)?;
                    let IpAddr::V6(pfx) = n.prefix.addr() else {
                        return Err(DropReason::Untranslatable);
                    };
                    let src6 = rfc6052::embed(pfx, n.prefix.len(), src)
                        .map_err(|_| DropReason::Untranslatable)?;
                    // For ICMP echo the translator writes `src_port` as the identifier, which
                    // must become the inside one.
                    let rw = packet::xlat::L4Rewrite {
                        src_port: if proto == Proto::Icmp {
                            t.inside.1
                        } else {
                            l.src_port
                        },
                        dst_port: t.inside.1,
                    };
                    let vrf = n.vrf;
                    translate(
                        pkt,
                        &mut self.scratch,
                        l,
                        Xlat::FourToSix(src6, t.inside.0),
                        rw,
                    )?;
                    return Ok(vrf);
                }
            } else if self
                .napt
                .iter()
                .any(|(_, n)| n.config().pool.contains(&dst))
                || self
                    .nat64
                    .iter()
                    .any(|n| n.table.config().pool.contains(&dst))
            {
                return Err(DropReason::NoSession);
            }
        } else if l.l3 == L3::Ipv6 {
            let dst = ipv6_at(pkt.data(), l3 + 24);
            if let Some(&(inside, table)) = self.rev66.get(&dst) {
                set_ipv6_addr(pkt.data_mut(), l, 24, inside);
                return Ok(table);
            }
        }
        Ok(UNDERLAY_TABLE)
    }

    fn lookup(&self, table: TableId, pkt: &[u8], l: &Layout) -> Option<Hit> {
        let key = dst_key(pkt, l);
        let b = &*self.burst;
        let memo = [b.first.get(b.current), b.second.get(b.current)]
            .into_iter()
            .flatten()
            .find(|m| m.table == table && m.key == key);
        let v = match (memo, key) {
            (_, LookupKey::None) => return None,
            (Some(m), _) => m.value()?,
            (None, LookupKey::V4(a)) => self.vrfs.get(&table)?.v4.lookup(a)?,
            (None, LookupKey::V6(a)) => self.vrfs.get(&table)?.v6.lookup(v6_key(a))?,
        };
        Some(if v >= NAT64_BASE {
            Hit::Nat64((v - NAT64_BASE) as usize)
        } else {
            Hit::Route(v as usize)
        })
    }

    fn route<B: PacketBuf>(
        &mut self,
        pkt: &mut B,
        l: &mut Layout,
        table: TableId,
        now_ns: u64,
        hopped: bool,
    ) -> Result<Verdict, DropReason> {
        let hit = self
            .lookup(table, pkt.data(), l)
            .ok_or(DropReason::NoRoute)?;
        let idx = match hit {
            Hit::Nat64(n) => {
                if hopped {
                    return Err(DropReason::VrfLoop);
                }
                self.nat64_out(pkt, l, n, now_ns)?;
                return self.route(pkt, l, UNDERLAY_TABLE, now_ns, true);
            }
            Hit::Route(i) => i,
        };
        let len = pkt.data().len() as u64;
        let slot = self
            .routes
            .get_mut(idx)
            .filter(|s| s.is_live())
            .ok_or(DropReason::NoRoute)?;
        slot.packets += 1;
        slot.bytes += len;
        let meter = slot.meter();
        let nexthops = self.nh_groups.get(slot.group);
        let first = *nexthops.first().ok_or(DropReason::NoRoute)?;
        match first {
            Nexthop::Blackhole => return Err(DropReason::Blackhole),
            Nexthop::Vrf { table: target } => {
                if hopped {
                    return Err(DropReason::VrfLoop);
                }
                // Keeps `l` describing the translated packet (ports: ECMP hash).
                self.breakout_nat(pkt, l, table, now_ns)?;
                return self.route(pkt, l, target, now_ns, true);
            }
            _ => {}
        }
        let nh = match nexthops.len() {
            0 | 1 => first,
            n => {
                let pick = flow_hash(pkt.data(), l) as usize % n;
                nexthops.get(pick).copied().unwrap_or(first)
            }
        };
        let ttl = ttl_of(pkt.data(), l);
        if ttl <= 1 {
            return Err(DropReason::TtlExceeded);
        }
        if let Some(m) = meter.and_then(|m| self.meters.get_mut(m)) {
            if m.color(len as u32, now_ns) == Color::Red {
                return Err(DropReason::Policed);
            }
        }
        dec_ttl(pkt.data_mut(), l);
        let router_mac = self.router_mac;
        match nh {
            Nexthop::Underlay { port, mac, .. } => {
                set_macs(pkt.data_mut(), router_mac, mac);
                Ok(Verdict::Tx(port))
            }
            Nexthop::Vxlan {
                vni,
                remote_vtep,
                router_mac: remote_mac,
            } => {
                let (port, outer_mac) = self.resolve_vtep(remote_vtep)?;
                let vtep = self.vtep.ok_or(DropReason::Unresolved)?;
                set_macs(pkt.data_mut(), router_mac, remote_mac);
                let encap = crate::ir::VxlanEncap {
                    eth_src: router_mac,
                    eth_dst: outer_mac,
                    ip_src: vtep,
                    ip_dst: remote_vtep,
                    vni: vni.get(),
                    udp_src: vxlan_source_port(vni.get()),
                };
                push_vxlan(pkt, &encap)?;
                Ok(Verdict::Tx(port))
            }
            Nexthop::Blackhole | Nexthop::Vrf { .. } => Err(DropReason::NoRoute),
        }
    }

    fn resolve_vtep(&self, vtep: Ipv4Addr) -> Result<(PortId, MacAddr), DropReason> {
        let vrf = self
            .vrfs
            .get(&UNDERLAY_TABLE)
            .ok_or(DropReason::Unresolved)?;
        let idx = vrf
            .v4
            .lookup(u32::from(vtep))
            .ok_or(DropReason::Unresolved)?;
        let slot = self
            .routes
            .get(idx as usize)
            .filter(|s| s.is_live())
            .ok_or(DropReason::Unresolved)?;
        match self.nh_groups.get(slot.group).first() {
            Some(Nexthop::Underlay { port, mac, .. }) => Ok((*port, *mac)),
            _ => Err(DropReason::Unresolved),
        }
    }

    /// Source NAT on breakout from a VPC: static 1:1, else NAPT44 for IPv4.
    fn breakout_nat<B: PacketBuf>(
        &mut self,
        pkt: &mut B,
        l: &mut Layout,
        table: TableId,
        now_ns: u64,
    ) -> Result<(), DropReason> {
        let l3 = usize::from(l.l3_offset);
        let Some(vrf) = self.vrfs.get(&table) else {
            return Ok(());
        };
        match l.l3 {
            L3::Ipv4 => {
                let src = ipv4_at(pkt.data(), l3 + 12);
                if let Some(&(_, out)) = vrf.static44.iter().find(|(i, _)| *i == src) {
                    set_ipv4_addr(pkt.data_mut(), l, 12, out);
                    return Ok(());
                }
                let Some(n) = vrf.napt else {
                    return Ok(());
                };
                let proto = nat_proto(l).ok_or(DropReason::Untranslatable)?;
                if l.fragment {
                    return Err(DropReason::Untranslatable);
                }
                let dst = ipv4_at(pkt.data(), l3 + 16);
                let flags = tcp_flags(pkt.data(), l);
                let Some((_, nat)) = self.napt.get_mut(n) else {
                    return Ok(());
                };
                let t = nat
                    .outbound(
                        proto,
                        (src, l.src_port),
                        (dst, l.dst_port),
                        flags,
                        now_ns,
                        &mut self.rng,
                    )
                    .map_err(nat_drop)?;
                set_ipv4_addr(pkt.data_mut(), l, 12, t.outside.0);
                set_l4_port(pkt.data_mut(), l, true, t.outside.1)
            }
            L3::Ipv6 => {
                let src = ipv6_at(pkt.data(), l3 + 8);
                if let Some(&(_, out)) = vrf.static66.iter().find(|(i, _)| *i == src) {
                    set_ipv6_addr(pkt.data_mut(), l, 8, out);
                }
                Ok(())
            }
            L3::Other => Err(DropReason::Malformed),
        }
    }

    fn nat64_out<B: PacketBuf>(
        &mut self,
        pkt: &mut B,
        l: &mut Layout,
        n: usize,
        now_ns: u64,
    ) -> Result<(), DropReason> {
        let l3 = usize::from(l.l3_offset);
        let proto = nat_proto(l).ok_or(DropReason::Untranslatable)?;
        if l.fragment {
            return Err(DropReason::Untranslatable);
        }
        let src = ipv6_at(pkt.data(), l3 + 8);
        let dst6 = ipv6_at(pkt.data(), l3 + 24);
        let flags = tcp_flags(pkt.data(), l);
        let nat = self.nat64.get_mut(n).ok_or(DropReason::NoRoute)?;
        let dst =
            rfc6052::extract(nat.prefix.len(), dst6).map_err(|_| DropReason::Untranslatable)?;
        let t = nat
            .table
            .outbound(
                proto,
                (src, l.src_port),
                (dst, l.dst_port),
                flags,
                now_ns,
                &mut self.rng,
            )
            .map_err(nat_drop)?;
        let rw = packet::xlat::L4Rewrite {
            src_port: t.outside.1,
            dst_port: l.dst_port,
        };
        translate(
            pkt,
            &mut self.scratch,
            l,
            Xlat::SixToFour(t.outside.0, dst),
            rw,
        )
    }
}

enum Xlat {
    SixToFour(Ipv4Addr, Ipv4Addr),
    FourToSix(Ipv6Addr, Ipv6Addr),
}

/// Translates the L3 packet through the scratch buffer and puts it back behind the Ethernet
/// header, fixing the EtherType and the layout.
fn translate<B: PacketBuf>(
    pkt: &mut B,
    scratch: &mut [u8],
    l: &mut Layout,
    how: Xlat,
    rw: packet::xlat::L4Rewrite,
) -> Result<(), DropReason> {
    let l3 = usize::from(l.l3_offset);
    let input = pkt.data().get(l3..).ok_or(DropReason::Malformed)?;
    let (n, ethertype) = match how {
        Xlat::SixToFour(s, d) => (
            packet::xlat::ipv6_to_ipv4(input, scratch, s, d, Some(rw)),
            packet::ethertype::IPV4,
        ),
        Xlat::FourToSix(s, d) => (
            packet::xlat::ipv4_to_ipv6(input, scratch, s, d, Some(rw)),
            packet::ethertype::IPV6,
        ),
    };
    let n = n.map_err(|_| DropReason::Untranslatable)?;
    let old_len = pkt.data().len() - l3;
    if n > old_len {
        // Grow at the front: move the Ethernet header forward.
        let grow = n - old_len;
        if !pkt.prepend(grow) {
            return Err(DropReason::NoHeadroom);
        }
        pkt.data_mut().copy_within(grow..grow + l3, 0);
    } else if n < old_len {
        let shrink = old_len - n;
        pkt.data_mut().copy_within(0..l3, shrink);
        if !pkt.adj(shrink) {
            return Err(DropReason::Malformed);
        }
    }
    let d = pkt.data_mut();
    let (Some(dst), Some(src)) = (d.get_mut(l3..l3 + n), scratch.get(..n)) else {
        return Err(DropReason::Malformed);
    };
    dst.copy_from_slice(src);
    if let Some(et) = d.get_mut(l3 - 2..l3) {
        et.copy_from_slice(&ethertype.to_be_bytes());
    }
    reparse(pkt.data(), l)
}

/// Dissects the frame again into `l` after a rewrite changed its headers. Field by field
/// from the fresh result, not as one block: the block copy would load across the callee's
/// narrow stores right after them and stall on store forwarding.
fn reparse(d: &[u8], l: &mut Layout) -> Result<(), DropReason> {
    let parsed = parse_layout(d);
    let Ok(Layout {
        vlan,
        ethertype,
        l3_offset,
        l3,
        l4_offset,
        l4,
        src_port,
        dst_port,
        fragment,
    }) = &parsed
    else {
        return Err(DropReason::Malformed);
    };
    l.vlan = *vlan;
    l.ethertype = *ethertype;
    l.l3_offset = *l3_offset;
    l.l3 = *l3;
    l.l4_offset = *l4_offset;
    l.l4 = *l4;
    l.src_port = *src_port;
    l.dst_port = *dst_port;
    l.fragment = *fragment;
    Ok(())
}

fn nat_proto(l: &Layout) -> Option<Proto> {
    match l.l4 {
        L4::Tcp => Some(Proto::Tcp),
        L4::Udp => Some(Proto::Udp),
        L4::Icmpv4 | L4::Icmpv6 if l.src_port == l.dst_port => Some(Proto::Icmp),
        _ => None,
    }
}

fn tcp_flags(d: &[u8], l: &Layout) -> u8 {
    if l.l4 == L4::Tcp {
        d.get(usize::from(l.l4_offset) + 13).copied().unwrap_or(0)
    } else {
        0
    }
}

fn ipv4_at(d: &[u8], off: usize) -> Ipv4Addr {
    match d.get(off..off + 4) {
        Some(&[a, b, c, e]) => Ipv4Addr::new(a, b, c, e),
        _ => Ipv4Addr::UNSPECIFIED,
    }
}

fn ipv6_at(d: &[u8], off: usize) -> Ipv6Addr {
    let mut a = [0u8; 16];
    if let Some(s) = d.get(off..off + 16) {
        a.copy_from_slice(s);
    }
    Ipv6Addr::from(a)
}

fn get16(d: &[u8], off: usize) -> u16 {
    match d.get(off..off + 2) {
        Some(&[a, b]) => u16::from_be_bytes([a, b]),
        _ => 0,
    }
}

fn put16(d: &mut [u8], off: usize, v: u16) {
    if let Some(s) = d.get_mut(off..off + 2) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// Where the L4 checksum of a packet is, and whether it covers the pseudo-header.
fn l4_csum_offset(l: &Layout) -> Option<(usize, bool)> {
    let l4 = usize::from(l.l4_offset);
    match l.l4 {
        L4::Tcp if !l.fragment => Some((l4 + 16, true)),
        L4::Udp if !l.fragment => Some((l4 + 6, true)),
        L4::Icmpv4 => Some((l4 + 2, false)),
        L4::Icmpv6 => Some((l4 + 2, true)),
        _ => None,
    }
}

/// Rewrites an IPv4 address at `l3 + off` (12 source, 16 destination), updating the header
/// checksum and the L4 checksum incrementally (RFC 1624).
fn set_ipv4_addr(d: &mut [u8], l: &Layout, off: usize, new: Ipv4Addr) {
    let l3 = usize::from(l.l3_offset);
    let old = u32::from(ipv4_at(d, l3 + off));
    let new = u32::from(new);
    if let Some(s) = d.get_mut(l3 + off..l3 + off + 4) {
        s.copy_from_slice(&new.to_be_bytes());
    }
    let c = get16(d, l3 + 10);
    put16(d, l3 + 10, checksum::update32(c, old, new));
    if let Some((at, pseudo)) = l4_csum_offset(l) {
        if pseudo {
            let c = get16(d, at);
            if l.l4 == L4::Udp && c == 0 {
                return; // no UDP checksum over IPv4
            }
            let mut nc = checksum::update32(c, old, new);
            if l.l4 == L4::Udp {
                nc = checksum::udp_nonzero(nc);
            }
            put16(d, at, nc);
        }
    }
}

fn set_ipv6_addr(d: &mut [u8], l: &Layout, off: usize, new: Ipv6Addr) {
    let l3 = usize::from(l.l3_offset);
    let old = ipv6_at(d, l3 + off).octets();
    let new = new.octets();
    if let Some(s) = d.get_mut(l3 + off..l3 + off + 16) {
        s.copy_from_slice(&new);
    }
    if let Some((at, true)) = l4_csum_offset(l) {
        let c = get16(d, at);
        let mut nc = checksum::update_bytes(c, &old, &new);
        if l.l4 == L4::Udp {
            nc = checksum::udp_nonzero(nc);
        }
        put16(d, at, nc);
    }
}

/// Rewrites the L4 source (or destination) port, or the ICMP echo identifier, and keeps the
/// layout's ports describing the rewritten packet (NAT keys, ECMP hash).
fn set_l4_port(d: &mut [u8], l: &mut Layout, source: bool, new: u16) -> Result<(), DropReason> {
    let l4 = usize::from(l.l4_offset);
    let at = match l.l4 {
        L4::Tcp | L4::Udp => l4 + if source { 0 } else { 2 },
        L4::Icmpv4 | L4::Icmpv6 => l4 + 4,
        _ => return Ok(()),
    };
    let old = get16(d, at);
    put16(d, at, new);
    if let Some((c_at, _)) = l4_csum_offset(l) {
        let c = get16(d, c_at);
        if !(l.l4 == L4::Udp && c == 0) {
            let mut nc = checksum::update16(c, old, new);
            if l.l4 == L4::Udp {
                nc = checksum::udp_nonzero(nc);
            }
            put16(d, c_at, nc);
        }
    }
    match l.l4 {
        L4::Tcp | L4::Udp if source => l.src_port = new,
        L4::Tcp | L4::Udp => l.dst_port = new,
        // Whether the identifier counts as the ports depends on the ICMP type: dissect again
        // (rare; the rewrite cannot make a parsed packet unparsable).
        _ => *l = parse_layout(d).map_err(|_| DropReason::Malformed)?,
    }
    Ok(())
}

fn ttl_of(d: &[u8], l: &Layout) -> u8 {
    let l3 = usize::from(l.l3_offset);
    match l.l3 {
        L3::Ipv4 => d.get(l3 + 8).copied().unwrap_or(0),
        L3::Ipv6 => d.get(l3 + 7).copied().unwrap_or(0),
        L3::Other => 0,
    }
}

fn dec_ttl(d: &mut [u8], l: &Layout) {
    let l3 = usize::from(l.l3_offset);
    match l.l3 {
        L3::Ipv4 => {
            // TTL shares a 16-bit word with the protocol.
            let old = get16(d, l3 + 8);
            let new = old.wrapping_sub(0x0100);
            put16(d, l3 + 8, new);
            let c = get16(d, l3 + 10);
            put16(d, l3 + 10, checksum::update16(c, old, new));
        }
        L3::Ipv6 => {
            if let Some(h) = d.get_mut(l3 + 7) {
                *h = h.saturating_sub(1);
            }
        }
        L3::Other => {}
    }
}

fn set_macs(d: &mut [u8], src: MacAddr, dst: MacAddr) {
    if let Some(s) = d.get_mut(0..6) {
        s.copy_from_slice(&dst.0);
    }
    if let Some(s) = d.get_mut(6..12) {
        s.copy_from_slice(&src.0);
    }
}

/// Outer header bytes of VXLAN over IPv4.
pub const VXLAN_OVERHEAD: usize = 14 + 20 + 8 + 8;

/// Pushes outer Ethernet/IPv4/UDP/VXLAN headers exactly as the IR's `VxlanEncap` defines them.
pub fn push_vxlan<B: PacketBuf>(pkt: &mut B, e: &crate::ir::VxlanEncap) -> Result<(), DropReason> {
    let inner = pkt.data().len();
    if !pkt.prepend(VXLAN_OVERHEAD) {
        return Err(DropReason::NoHeadroom);
    }
    let d = pkt.data_mut();
    let Some(h) = d.get_mut(..VXLAN_OVERHEAD) else {
        return Err(DropReason::NoHeadroom);
    };
    h[0..6].copy_from_slice(&e.eth_dst.0);
    h[6..12].copy_from_slice(&e.eth_src.0);
    h[12..14].copy_from_slice(&packet::ethertype::IPV4.to_be_bytes());
    let ip_len = (20 + 8 + 8 + inner) as u16;
    let ip = &mut h[14..34];
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[4..6].copy_from_slice(&[0, 0]);
    ip[6..8].copy_from_slice(&[0x40, 0]); // DF
    ip[8] = 64;
    ip[9] = ip_proto::UDP;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&e.ip_src.octets());
    ip[16..20].copy_from_slice(&e.ip_dst.octets());
    let c = checksum::finish(checksum::sum(ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let udp = &mut h[34..42];
    udp[0..2].copy_from_slice(&e.udp_src.to_be_bytes());
    udp[2..4].copy_from_slice(&VXLAN_PORT.to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_len - 20).to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
    let vx = &mut h[42..50];
    vx.copy_from_slice(&[0x08, 0, 0, 0, 0, 0, 0, 0]);
    vx[4..7].copy_from_slice(&e.vni.to_be_bytes()[1..4]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Offloading established NAPT44 sessions (off the fast path)

/// Where the software path sends one direction of a session after translating it: what a
/// session rule must do after the rewrite ([`crate::compile::session_rules`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Forward {
    /// Egress port.
    pub port: PortId,
    /// Source MAC written (our router MAC).
    pub src_mac: MacAddr,
    /// Destination MAC written (the next hop's; with `encap`, the remote router's, inside).
    pub dst_mac: MacAddr,
    /// VXLAN encapsulation pushed after the MAC rewrite (a VXLAN next hop, its VTEP resolved
    /// as the fast path resolves it).
    pub encap: Option<VxlanEncap>,
}

fn vtep_of(f: &Forward) -> Option<Ipv4Addr> {
    f.encap.map(|e| e.ip_dst)
}

/// An established NAPT44 session whose software path hardware can reproduce, with everything
/// the software path resolved for it: what [`crate::compile::session_rules`] turns into rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOffer {
    /// The NAPT44 rule.
    pub nat: Name,
    /// The session.
    pub id: SessionId,
    /// TCP or UDP.
    pub proto: Proto,
    /// The inside endpoint.
    pub inside: (Ipv4Addr, u16),
    /// The outside endpoint (pool address and port).
    pub outside: (Ipv4Addr, u16),
    /// The remote endpoint.
    pub remote: (Ipv4Addr, u16),
    /// The VPC's table.
    pub vpc_table: TableId,
    /// Inside → remote (received on a VPC port as `inside → remote`, sent as
    /// `outside → remote`).
    pub outbound: Forward,
    /// Remote → inside (received on an uplink as `remote → outside`, sent as
    /// `remote → inside`).
    pub inbound: Forward,
    /// The route lookups the forwarding was resolved by, as (table, address): a change to a
    /// route of that table whose prefix covers that address may change the result. (The
    /// breakout route, the underlay route behind it, the VPC route back to the inside host,
    /// and the underlay routes to the remote VTEPs of VXLAN next hops, or repeats.)
    pub lookups: [(TableId, Ipv4Addr); 5],
    /// When the session dies unless refreshed.
    pub expires_at_ns: u64,
}

impl SessionOffer {
    /// The (source, destination) endpoints of a direction as the packet arrives.
    pub fn arriving(&self, outbound: bool) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
        if outbound {
            (self.inside, self.remote)
        } else {
            (self.remote, self.outside)
        }
    }

    /// Whether a change to route `key` may change this session's forwarding.
    pub fn depends_on(&self, key: &RouteKey) -> bool {
        self.lookups
            .iter()
            .any(|(t, a)| *t == key.table && key.prefix.contains(IpAddr::V4(*a)))
    }
}

/// Where [`Pipeline::scan_candidates`] resumes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanCursor {
    table: usize,
    pos: usize,
}

impl Pipeline {
    /// The NAPT44 rules, by name, in the pipeline's order.
    pub fn napt_rules(&self) -> impl Iterator<Item = &Name> {
        self.napt_names.iter()
    }

    fn napt_index(&self, nat: &Name) -> Option<usize> {
        self.napt_names.iter().position(|n| n == nat)
    }

    /// Established NAPT44 sessions (see [`NatTable::offload_candidates`]: established TCP, two-way
    /// UDP, alive, established for `min_age_ns`, not marked offloaded) whose software path a
    /// session rule reproduces exactly, with that path resolved. Visits every session: the
    /// driver uses the bounded [`Pipeline::scan_candidates`] instead.
    ///
    /// A session is offered when, in both directions, the packet's path is: (outbound) no
    /// static NAT for the inside address, the VPC route of the remote a breakout whose NAT is
    /// this rule; (inbound) the outside address not our VTEP's VXLAN endpoint nor a static NAT
    /// address, this rule the first whose pool holds it; and then a route without a meter
    /// whose next hop (picked by [`flow_hash`] under ECMP, as the fast path does) is a port
    /// (MAC rewrite) or a VXLAN next hop whose VTEP resolves (MAC rewrite and encapsulation).
    /// Blackholes, NAT64 and VRF loops stay in software.
    pub fn session_candidates(
        &self,
        now_ns: u64,
        min_age_ns: u64,
    ) -> impl Iterator<Item = SessionOffer> + '_ {
        self.napt.iter().enumerate().flat_map(move |(i, (_, t))| {
            t.offload_candidates(now_ns, min_age_ns)
                .filter_map(move |v| self.offer(i, &v))
        })
    }

    /// [`Pipeline::session_candidates`] in bounded steps: visits at most `budget` sessions from
    /// `cursor` (all NAPT44 tables in turn, then around again), calling `f` for each offer.
    /// Returns how many sessions it visited.
    pub fn scan_candidates(
        &self,
        cursor: &mut ScanCursor,
        budget: usize,
        now_ns: u64,
        min_age_ns: u64,
        mut f: impl FnMut(SessionOffer),
    ) -> usize {
        let total: usize = self.napt.iter().map(|(_, t)| t.session_count()).sum();
        let mut visited = 0;
        // Tables found exhausted in a row: more than all of them means nothing is left.
        let mut exhausted = 0;
        while visited < budget.min(total) && exhausted <= self.napt.len() {
            if cursor.table >= self.napt.len() {
                *cursor = ScanCursor::default();
            }
            let Some((_, t)) = self.napt.get(cursor.table) else {
                break;
            };
            let Some(v) = t.session_at(cursor.pos) else {
                cursor.table += 1;
                cursor.pos = 0;
                exhausted += 1;
                continue;
            };
            exhausted = 0;
            cursor.pos += 1;
            visited += 1;
            if v.is_offload_candidate(now_ns, min_age_ns) {
                if let Some(o) = self.offer(cursor.table, &v) {
                    f(o);
                }
            }
        }
        visited
    }

    /// The session's path resolved again against the current routes (whatever its state), if
    /// it is still in the table and its path can still be offloaded.
    pub fn session_offer(&self, nat: &Name, id: SessionId) -> Option<SessionOffer> {
        let i = self.napt_index(nat)?;
        let v = self.napt.get(i)?.1.session(id)?;
        self.offer(i, &v)
    }

    /// A snapshot of a NAPT44 session, while it is in the table (see [`NatTable::session`]).
    pub fn session(&self, nat: &Name, id: SessionId) -> Option<SessionView<Ipv4Addr>> {
        self.napt.get(self.napt_index(nat)?)?.1.session(id)
    }

    /// Whether a session is in its table and alive at `now_ns`.
    pub fn session_alive(&self, nat: &Name, id: SessionId, now_ns: u64) -> bool {
        self.session(nat, id)
            .is_some_and(|v| now_ns < v.expires_at_ns)
    }

    /// Marks a NAPT44 session offloaded (or not); false for an unknown session.
    pub fn mark_offloaded(&mut self, nat: &Name, id: SessionId, offloaded: bool) -> bool {
        let Some(i) = self.napt_index(nat) else {
            return false;
        };
        self.napt
            .get_mut(i)
            .is_some_and(|(_, t)| t.mark_offloaded(id, offloaded))
    }

    /// Keeps an offloaded session alive as of `now_ns` and adds hardware counter deltas to it
    /// ([`NatTable::refresh`], [`NatTable::record_many`]). False if the session is unknown or
    /// already dead at `now_ns`.
    pub fn refresh_session(
        &mut self,
        nat: &Name,
        id: SessionId,
        now_ns: u64,
        packets: u64,
        bytes: u64,
    ) -> bool {
        let Some(i) = self.napt_index(nat) else {
            return false;
        };
        let Some((_, t)) = self.napt.get_mut(i) else {
            return false;
        };
        t.refresh(id, now_ns) && t.record_many(id, packets, bytes)
    }

    /// [`Pipeline::expire`], calling `on_removed` with the NAPT44 rule and a snapshot of every
    /// NAPT44 session removed (NAT64 sessions are never offloaded and are not reported).
    pub fn expire_with(
        &mut self,
        now_ns: u64,
        budget: usize,
        mut on_removed: impl FnMut(&Name, &SessionView<Ipv4Addr>),
    ) -> usize {
        let mut n = 0;
        for ((_, t), name) in self.napt.iter_mut().zip(&self.napt_names) {
            n += t.expire_with(now_ns, budget, |v| on_removed(name, v));
        }
        for t in &mut self.nat64 {
            n += t.table.expire(now_ns, budget);
        }
        n
    }

    /// The live route a lookup of `a` in `table` hits (not a NAT64 prefix).
    fn route_slot(&self, table: TableId, a: Ipv4Addr) -> Option<&RouteSlot> {
        let v = self.vrfs.get(&table)?.v4.lookup(u32::from(a))?;
        if v >= NAT64_BASE {
            return None;
        }
        self.routes.get(v as usize).filter(|s| s.is_live())
    }

    /// The forwarding of a packet `src → dst` (already translated) routed in `table`, if it is
    /// an unmetered route to a port or a resolvable VXLAN next hop, as [`Pipeline::route`]
    /// would pick it.
    fn plain_forward(
        &self,
        table: TableId,
        proto: Proto,
        src: (Ipv4Addr, u16),
        dst: (Ipv4Addr, u16),
    ) -> Option<Forward> {
        let slot = self.route_slot(table, dst.0)?;
        if slot.meter().is_some() {
            return None;
        }
        let nexthops = self.nh_groups.get(slot.group);
        // The fast path decides on the first next hop before any ECMP pick.
        let first = *nexthops.first()?;
        if matches!(first, Nexthop::Blackhole | Nexthop::Vrf { .. }) {
            return None;
        }
        let nh = match nexthops.len() {
            0 | 1 => first,
            n => {
                // The ECMP hash of the translated packet, from its IPv4 header fields.
                let mut ip = [0u8; 20];
                ip[9] = match proto {
                    Proto::Tcp => ip_proto::TCP,
                    Proto::Udp => ip_proto::UDP,
                    Proto::Icmp => return None,
                };
                ip[12..16].copy_from_slice(&src.0.octets());
                ip[16..20].copy_from_slice(&dst.0.octets());
                let l = Layout {
                    vlan: None,
                    ethertype: packet::ethertype::IPV4,
                    l3_offset: 0,
                    l3: L3::Ipv4,
                    l4_offset: 20,
                    l4: if proto == Proto::Tcp {
                        L4::Tcp
                    } else {
                        L4::Udp
                    },
                    src_port: src.1,
                    dst_port: dst.1,
                    fragment: false,
                };
                *nexthops.get(flow_hash(&ip, &l) as usize % n)?
            }
        };
        match nh {
            Nexthop::Underlay { port, mac, .. } => Some(Forward {
                port,
                src_mac: self.router_mac,
                dst_mac: mac,
                encap: None,
            }),
            Nexthop::Vxlan {
                vni,
                remote_vtep,
                router_mac,
            } => {
                let (port, outer_mac) = self.resolve_vtep(remote_vtep).ok()?;
                Some(Forward {
                    port,
                    src_mac: self.router_mac,
                    dst_mac: router_mac,
                    encap: Some(VxlanEncap {
                        eth_src: self.router_mac,
                        eth_dst: outer_mac,
                        ip_src: self.vtep?,
                        ip_dst: remote_vtep,
                        vni: vni.get(),
                        udp_src: vxlan_source_port(vni.get()),
                    }),
                })
            }
            Nexthop::Blackhole | Nexthop::Vrf { .. } => None,
        }
    }

    /// The offer for session `v` of NAPT44 table `i`, if both directions' paths can be
    /// reproduced by a session rule.
    fn offer(&self, i: usize, v: &SessionView<Ipv4Addr>) -> Option<SessionOffer> {
        let (table, nat) = self.napt.get(i)?;
        let name = self.napt_names.get(i)?;
        if v.proto == Proto::Icmp {
            return None;
        }
        // Outbound: VPC route of the remote breaks out through this rule.
        let vrf = self.vrfs.get(table)?;
        if vrf.napt != Some(i) || vrf.static44.iter().any(|(a, _)| *a == v.inside.0) {
            return None;
        }
        let breakout = self.route_slot(*table, v.remote.0)?;
        let Some(&Nexthop::Vrf { table: target }) = self.nh_groups.get(breakout.group).first()
        else {
            return None;
        };
        if target == *table {
            return None;
        }
        let outbound = self.plain_forward(target, v.proto, v.outside, v.remote)?;
        // Inbound: this rule translates the outside endpoint back.
        let (out_addr, out_port) = v.outside;
        let vxlan = v.proto == Proto::Udp && out_port == VXLAN_PORT;
        if (Some(out_addr) == self.vtep && vxlan) || self.rev44.contains_key(&out_addr) {
            return None;
        }
        let first = self
            .napt
            .iter()
            .position(|(_, n)| n.config().pool.contains(&out_addr));
        if first != Some(i) || !nat.config().pool.contains(&out_addr) {
            return None;
        }
        let inbound = self.plain_forward(*table, v.proto, v.remote, v.inside)?;
        Some(SessionOffer {
            nat: name.clone(),
            id: v.id,
            proto: v.proto,
            inside: v.inside,
            outside: v.outside,
            remote: v.remote,
            vpc_table: *table,
            outbound,
            inbound,
            lookups: [
                (*table, v.remote.0),
                (target, v.remote.0),
                (*table, v.inside.0),
                (UNDERLAY_TABLE, vtep_of(&outbound).unwrap_or(v.remote.0)),
                (UNDERLAY_TABLE, vtep_of(&inbound).unwrap_or(v.remote.0)),
            ],
            expires_at_ns: v.expires_at_ns,
        })
    }
}

// --- NAT session sync: thin pass-throughs to the rules' tables (see crate::soft::nat) --------

use crate::soft::nat::{ExportCursor, NatSyncError, SessionRecord};

impl Pipeline {
    /// The NAT64 rules, by name, in the pipeline's order.
    pub fn nat64_rules(&self) -> impl Iterator<Item = &Name> {
        self.nat64.iter().map(|n| &n.name)
    }

    fn napt_table(&self, nat: &Name) -> Result<&NatTable<Ipv4Addr>, NatSyncError> {
        let i = self.napt_index(nat).ok_or(NatSyncError::UnknownRule)?;
        self.napt
            .get(i)
            .map(|(_, t)| t)
            .ok_or(NatSyncError::UnknownRule)
    }

    fn napt_table_mut(&mut self, nat: &Name) -> Result<&mut NatTable<Ipv4Addr>, NatSyncError> {
        let i = self.napt_index(nat).ok_or(NatSyncError::UnknownRule)?;
        self.napt
            .get_mut(i)
            .map(|(_, t)| t)
            .ok_or(NatSyncError::UnknownRule)
    }

    fn nat64_table(&self, nat: &Name) -> Result<&NatTable<Ipv6Addr>, NatSyncError> {
        self.nat64
            .iter()
            .find(|n| n.name == *nat)
            .map(|n| &n.table)
            .ok_or(NatSyncError::UnknownRule)
    }

    fn nat64_table_mut(&mut self, nat: &Name) -> Result<&mut NatTable<Ipv6Addr>, NatSyncError> {
        self.nat64
            .iter_mut()
            .find(|n| n.name == *nat)
            .map(|n| &mut n.table)
            .ok_or(NatSyncError::UnknownRule)
    }

    /// [`NatTable::export`] of a session of the NAPT44 rule `nat` (`None` also for an unknown
    /// rule).
    pub fn napt_export(
        &self,
        nat: &Name,
        id: SessionId,
        now_ns: u64,
    ) -> Option<SessionRecord<Ipv4Addr>> {
        self.napt_table(nat).ok()?.export(id, now_ns)
    }

    /// [`NatTable::export_batch`] of the NAPT44 rule `nat`.
    pub fn napt_export_batch(
        &self,
        nat: &Name,
        cursor: ExportCursor,
        budget: usize,
        now_ns: u64,
        out: &mut Vec<SessionRecord<Ipv4Addr>>,
    ) -> Result<Option<ExportCursor>, NatSyncError> {
        Ok(self
            .napt_table(nat)?
            .export_batch(cursor, budget, now_ns, out))
    }

    /// [`NatTable::import`] into the NAPT44 rule `nat`.
    pub fn napt_import(
        &mut self,
        nat: &Name,
        rec: &SessionRecord<Ipv4Addr>,
        now_ns: u64,
    ) -> Result<SessionId, NatSyncError> {
        Ok(self.napt_table_mut(nat)?.import(rec, now_ns)?)
    }

    /// [`NatTable::remove_session`] in the NAPT44 rule `nat` (`None` also for an unknown rule).
    pub fn napt_remove_session(
        &mut self,
        nat: &Name,
        proto: Proto,
        inside: (Ipv4Addr, u16),
        remote: (Ipv4Addr, u16),
    ) -> Option<SessionView<Ipv4Addr>> {
        self.napt_table_mut(nat)
            .ok()?
            .remove_session(proto, inside, remote)
    }

    /// [`NatTable::export_batch`] of the NAT64 rule `nat`.
    pub fn nat64_export_batch(
        &self,
        nat: &Name,
        cursor: ExportCursor,
        budget: usize,
        now_ns: u64,
        out: &mut Vec<SessionRecord<Ipv6Addr>>,
    ) -> Result<Option<ExportCursor>, NatSyncError> {
        Ok(self
            .nat64_table(nat)?
            .export_batch(cursor, budget, now_ns, out))
    }

    /// [`NatTable::import`] into the NAT64 rule `nat`.
    pub fn nat64_import(
        &mut self,
        nat: &Name,
        rec: &SessionRecord<Ipv6Addr>,
        now_ns: u64,
    ) -> Result<SessionId, NatSyncError> {
        Ok(self.nat64_table_mut(nat)?.import(rec, now_ns)?)
    }

    /// [`NatTable::remove_session`] in the NAT64 rule `nat` (`None` also for an unknown rule).
    pub fn nat64_remove_session(
        &mut self,
        nat: &Name,
        proto: Proto,
        inside: (Ipv6Addr, u16),
        remote: (Ipv4Addr, u16),
    ) -> Option<SessionView<Ipv6Addr>> {
        self.nat64_table_mut(nat)
            .ok()?
            .remove_session(proto, inside, remote)
    }
}

// --- A/B pair: the NAT allocation gate, the allocation block, change capture and replicas ----

use crate::ha::sync::Event;
use crate::soft::nat::{
    AllocBlock, ChangeLogOverflow, ChangeLogStats, NatFlowKey, NatSessionRecord, ReplicaCursor,
    ReplicatedSession,
};

/// A member's NAT settings as part of an A/B pair, applied to every NAT table and carried
/// across rebuilds by [`Pipeline::carry_nat_from`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PairNat {
    /// May outbound packets create sessions.
    allocate: bool,
    /// The port block new bindings come from.
    block: AllocBlock,
    /// The change log's capacity per table, when on.
    change_log: Option<usize>,
}

impl Default for PairNat {
    fn default() -> Self {
        PairNat {
            allocate: true,
            block: AllocBlock::WHOLE,
            change_log: None,
        }
    }
}

/// The drop reason of a NAT table's refusal to create a session.
fn nat_drop(e: NatError) -> DropReason {
    match e {
        NatError::AllocationStopped => DropReason::NatNotActive,
        _ => DropReason::NatExhausted,
    }
}

impl Pipeline {
    fn tables_mut(
        &mut self,
    ) -> (
        impl Iterator<Item = &mut NatTable<Ipv4Addr>>,
        impl Iterator<Item = &mut NatTable<Ipv6Addr>>,
    ) {
        (
            self.napt.iter_mut().map(|(_, t)| t),
            self.nat64.iter_mut().map(|n| &mut n.table),
        )
    }

    /// Puts every table in the pair's block. A table whose port range cannot be cut so keeps
    /// its block and never allocates (see [`Pipeline::apply_pair_settings`]).
    fn apply_pair_block(&mut self) {
        let block = self.pair.block;
        let (v4, v6) = self.tables_mut();
        for t in v4 {
            let _ = t.set_block(block);
        }
        for t in v6 {
            let _ = t.set_block(block);
        }
    }

    /// Applies the gate and the change log to every table: a table allocates only while the
    /// pair allows it and it is in the pair's block.
    fn apply_pair_settings(&mut self) {
        let PairNat {
            allocate,
            block,
            change_log,
        } = self.pair;
        fn apply<I: Copy + Eq + core::hash::Hash + core::fmt::Debug>(
            t: &mut NatTable<I>,
            allocate: bool,
            block: AllocBlock,
            change_log: Option<usize>,
        ) {
            t.set_allocation(allocate && t.config().block == block);
            match change_log {
                Some(c) => t.enable_change_log(c),
                None => t.disable_change_log(),
            }
        }
        let (v4, v6) = self.tables_mut();
        for t in v4 {
            apply(t, allocate, block, change_log);
        }
        for t in v6 {
            apply(t, allocate, block, change_log);
        }
    }

    /// Allows or stops the creation of NAT sessions (NAPT44 and NAT64): a member of a pair
    /// that is standby or fenced must not allocate. Stopped, packets of live sessions are
    /// translated as before (both ways), and a packet that would create a session is dropped
    /// with [`DropReason::NatNotActive`] (counted per table in
    /// [`crate::soft::nat::NatStats::alloc_stopped`]). Allowed by default.
    pub fn set_nat_allocation(&mut self, allow: bool) {
        self.pair.allocate = allow;
        self.apply_pair_settings();
    }

    /// Whether NAT sessions may be created.
    pub fn nat_allocation_allowed(&self) -> bool {
        self.pair.allocate
    }

    /// Puts every NAT table in allocation block `block` ([`AllocBlock`]; member `i` of a pair
    /// is `AllocBlock::new(i, 2)`, a single gateway keeps [`AllocBlock::WHOLE`]), now and in
    /// every rebuild carried from this pipeline. A table whose port range cannot be cut so
    /// keeps its block and stops allocating; the first such refusal is returned.
    pub fn set_nat_block(&mut self, block: AllocBlock) -> Result<(), PipelineError> {
        self.pair.block = block;
        let mut first = None;
        for ((_, t), name) in self.napt.iter_mut().zip(&self.napt_names) {
            if let Err(e) = t.set_block(block) {
                first.get_or_insert((name.clone(), e));
            }
        }
        for n in &mut self.nat64 {
            if let Err(e) = n.table.set_block(block) {
                first.get_or_insert((n.name.clone(), e));
            }
        }
        self.apply_pair_settings();
        match first {
            Some((rule, e)) => Err(PipelineError::Nat {
                rule,
                source: NatError::Config(e),
            }),
            None => Ok(()),
        }
    }

    /// The allocation block of the NAT tables.
    pub fn nat_block(&self) -> AllocBlock {
        self.pair.block
    }

    /// Starts change capture in every NAT table (a log of `capacity` entries each, see
    /// [`crate::soft::nat::ChangeLog`]), now and in every rebuild carried from this pipeline.
    pub fn enable_nat_change_log(&mut self, capacity: usize) {
        self.pair.change_log = Some(capacity);
        self.apply_pair_settings();
    }

    /// Stops change capture and frees the logs.
    pub fn disable_nat_change_log(&mut self) {
        self.pair.change_log = None;
        self.apply_pair_settings();
    }

    /// Drains at most `max` change-log entries of all NAT tables into `out` as sync events
    /// (see [`NatTable::drain_replica_events`]: upserts carry each session's record at
    /// `now_ns`). Returns the entries drained, or, if any table lost changes since the
    /// previous drain, the overflow (`lost` summed over the tables): then every log is cleared,
    /// nothing is appended, and the standby needs a snapshot.
    pub fn drain_nat_changes(
        &mut self,
        now_ns: u64,
        max: usize,
        out: &mut Vec<Event<ReplicatedSession>>,
    ) -> Result<usize, ChangeLogOverflow> {
        let start = out.len();
        let mut left = max;
        let mut overflow: Option<ChangeLogOverflow> = None;
        let mut note = |r: Result<usize, ChangeLogOverflow>, left: &mut usize| match r {
            Ok(n) => *left -= n.min(*left),
            Err(o) => {
                let acc = overflow.get_or_insert(ChangeLogOverflow {
                    lost: 0,
                    capacity: o.capacity,
                });
                acc.lost += o.lost;
            }
        };
        let mut scratch4 = Vec::new();
        for ((_, t), name) in self.napt.iter_mut().zip(&self.napt_names) {
            let r = t.drain_replica_events(name, now_ns, left, &mut scratch4, out);
            note(r, &mut left);
        }
        let mut scratch6 = Vec::new();
        for n in &mut self.nat64 {
            let r = n
                .table
                .drain_replica_events(&n.name, now_ns, left, &mut scratch6, out);
            note(r, &mut left);
        }
        match overflow {
            Some(o) => {
                out.truncate(start);
                self.clear_nat_changes();
                Err(o)
            }
            None => Ok(max - left),
        }
    }

    /// Forgets every change held in the NAT change logs (a snapshot is about to cover them).
    pub fn clear_nat_changes(&mut self) {
        let (v4, v6) = self.tables_mut();
        v4.for_each(NatTable::clear_changes);
        v6.for_each(NatTable::clear_changes);
    }

    /// The NAT change logs' counters, summed over the tables (zero when capture is off).
    pub fn nat_change_log_stats(&self) -> ChangeLogStats {
        let v4 = self.napt.iter().filter_map(|(_, t)| t.change_log_stats());
        let v6 = self.nat64.iter().filter_map(|n| n.table.change_log_stats());
        v4.chain(v6)
            .fold(ChangeLogStats::default(), |a, s| ChangeLogStats {
                pending: a.pending + s.pending,
                capacity: a.capacity + s.capacity,
                recorded: a.recorded + s.recorded,
                lost: a.lost + s.lost,
                overflows: a.overflows + s.overflows,
            })
    }

    /// NAT sessions held by every stateful rule, and the outbound packets refused because
    /// allocation is stopped.
    pub fn nat_totals(&self) -> (usize, u64) {
        let v4 = self.napt.iter().map(|(_, t)| t.stats());
        let v6 = self.nat64.iter().map(|n| n.table.stats());
        v4.chain(v6)
            .fold((0, 0), |(s, a), t| (s + t.sessions, a + t.alloc_stopped))
    }

    /// A walk over every session of every stateful NAT rule (NAPT44 rules first), for a
    /// snapshot or a keepalive pass: see [`Pipeline::export_nat_replicas`].
    pub fn nat_replica_cursor(&self) -> ReplicaCursor {
        let v4 = self.napt_names.iter().map(|n| (false, n.clone()));
        let v6 = self.nat64.iter().map(|n| (true, n.name.clone()));
        ReplicaCursor {
            rules: v4.chain(v6).collect(),
            pos: 0,
            slot: ExportCursor::START,
        }
    }

    /// One bounded step of a walk: visits at most `budget` session slots of the rule the
    /// cursor is at, appending the record of each session alive at `now_ns` (so at most
    /// `budget` records), and moves the cursor on. Returns `true` when the walk is complete.
    /// Pipelines rebuilt between steps are fine (see [`ReplicaCursor`]): the walk yields every
    /// session that lives through it at least once.
    pub fn export_nat_replicas(
        &self,
        cursor: &mut ReplicaCursor,
        budget: usize,
        now_ns: u64,
        out: &mut Vec<ReplicatedSession>,
    ) -> bool {
        let Some((nat64, name)) = cursor.rules.get(cursor.pos) else {
            return true;
        };
        let next = if *nat64 {
            self.nat64_table(name)
                .ok()
                .and_then(|t| t.export_replicas(name, cursor.slot, budget, now_ns, out))
        } else {
            self.napt_table(name)
                .ok()
                .and_then(|t| t.export_replicas(name, cursor.slot, budget, now_ns, out))
        };
        match next {
            Some(c) => cursor.slot = c,
            None => {
                cursor.pos += 1;
                cursor.slot = ExportCursor::START;
            }
        }
        cursor.is_done()
    }

    /// Applies a replicated change from the active member: an upsert imports the session
    /// with [`NatTable::import_ordered`] (the sync stream orders changes by version), a delete
    /// removes it (deleting what is not here is done already).
    pub fn apply_nat_replica(
        &mut self,
        event: &Event<ReplicatedSession>,
        now_ns: u64,
    ) -> Result<(), NatSyncError> {
        match event {
            Event::Upsert(r) => match &r.session {
                NatSessionRecord::Napt44(rec) => {
                    self.napt_table_mut(&r.rule)?.import_ordered(rec, now_ns)?;
                }
                NatSessionRecord::Nat64(rec) => {
                    self.nat64_table_mut(&r.rule)?.import_ordered(rec, now_ns)?;
                }
            },
            Event::Delete((rule, key)) => match *key {
                NatFlowKey::Napt44 {
                    proto,
                    inside,
                    remote,
                } => {
                    self.napt_table_mut(rule)?
                        .remove_session(proto, inside, remote);
                }
                NatFlowKey::Nat64 {
                    proto,
                    inside,
                    remote,
                } => {
                    self.nat64_table_mut(rule)?
                        .remove_session(proto, inside, remote);
                }
            },
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::model::{
        Change, Ipv4Range, Meter as MeterSpec, MeterProfile, NatRule, Node, Route, Vni, Vpc,
    };
    use crate::packet::{
        ethertype, EthernetFrame, EthernetRepr, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr,
        TcpPacket, TcpRepr, UdpPacket, UdpRepr,
    };

    const UPLINKS: [PortId; 2] = [PortId(0), PortId(1)];
    const PORT_A: PortId = PortId(10);
    const PORT_A2: PortId = PortId(11);
    const PORT_B: PortId = PortId(20);
    const VTEP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const STATIC_IN: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
    const STATIC_OUT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 50);
    const NAT64_POOL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);

    fn mac(x: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, x])
    }

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn key(table: u32, prefix: &str) -> RouteKey {
        RouteKey {
            table: TableId(table),
            prefix: prefix.parse().unwrap(),
        }
    }

    fn route(table: u32, prefix: &str, nexthops: Vec<Nexthop>) -> Change {
        Change::UpsertRoute(Route {
            key: key(table, prefix),
            nexthops,
        })
    }

    fn gw(port: PortId, last: u8) -> Nexthop {
        Nexthop::Underlay {
            gateway: IpAddr::V4(Ipv4Addr::new(100, 64, 0, last)),
            port,
            mac: mac(last),
        }
    }

    fn breakout() -> Nexthop {
        Nexthop::Vrf {
            table: UNDERLAY_TABLE,
        }
    }

    fn vxlan(last: u8) -> Nexthop {
        Nexthop::Vxlan {
            vni: Vni::new(100).unwrap(),
            remote_vtep: Ipv4Addr::new(198, 51, 100, last),
            router_mac: mac(0x80 | last),
        }
    }

    fn tr_tcm(rate: u64, burst: u64) -> MeterProfile {
        MeterProfile::TrTcm {
            cir: rate,
            cbs: burst,
            pir: rate,
            pbs: burst,
        }
    }

    /// Two VPCs and an underlay with a bit of everything: ECMP at both levels, NAPT44,
    /// NAT64, static NAT, VXLAN, blackholes, a VPC meter and a route meter that police.
    fn model() -> Model {
        let vpc = |n: &str, vni: u32, table: u32, ports: &[PortId]| {
            Change::UpsertVpc(Vpc {
                name: name(n),
                vni: Vni::new(vni).unwrap(),
                table: TableId(table),
                ports: ports.iter().copied().collect(),
            })
        };
        let host = Nexthop::Underlay {
            gateway: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            port: PORT_A,
            mac: mac(0x10),
        };
        let host6 = Nexthop::Underlay {
            gateway: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
            port: PORT_A2,
            mac: mac(0x11),
        };
        let mut m = Model::new();
        m.apply(&[
            Change::SetNode(Node {
                vtep: VTEP,
                router_mac: mac(1),
                uplinks: UPLINKS.into_iter().collect::<BTreeSet<_>>(),
            }),
            vpc("a", 100, 10, &[PORT_A, PORT_A2]),
            vpc("b", 200, 20, &[PORT_B]),
            route(
                254,
                "0.0.0.0/0",
                vec![gw(UPLINKS[0], 1), gw(UPLINKS[1], 2), gw(UPLINKS[0], 3)],
            ),
            route(254, "8.0.0.0/8", vec![gw(UPLINKS[1], 4)]),
            route(
                254,
                "8.8.0.0/16",
                vec![gw(UPLINKS[0], 5), gw(UPLINKS[1], 6)],
            ),
            route(254, "8.8.8.0/24", vec![gw(UPLINKS[1], 4)]),
            route(254, "100.64.0.0/10", vec![Nexthop::Blackhole]),
            route(254, "198.51.100.0/24", vec![gw(UPLINKS[1], 7)]),
            route(
                254,
                "::/0",
                vec![Nexthop::Underlay {
                    gateway: IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
                    port: UPLINKS[0],
                    mac: mac(9),
                }],
            ),
            route(10, "10.0.0.0/24", vec![host]),
            route(10, "10.9.0.0/16", vec![Nexthop::Blackhole]),
            route(10, "10.20.0.0/16", vec![vxlan(1), vxlan(2)]),
            route(10, "0.0.0.0/0", vec![breakout()]),
            route(10, "fd00::/64", vec![host6]),
            route(10, "::/0", vec![breakout()]),
            route(20, "0.0.0.0/0", vec![breakout()]),
            route(20, "10.1.0.0/16", vec![gw(PORT_B, 0x20)]),
            Change::UpsertNat(NatRule {
                name: name("napt"),
                vpc: name("a"),
                kind: NatKind::Napt44 {
                    pool: Ipv4Range {
                        first: Ipv4Addr::new(203, 0, 113, 1),
                        last: Ipv4Addr::new(203, 0, 113, 2),
                    },
                    ports: (1024, 1279),
                },
            }),
            Change::UpsertNat(NatRule {
                name: name("six"),
                vpc: name("a"),
                kind: NatKind::Nat64 {
                    prefix: "64:ff9b::/96".parse().unwrap(),
                    pool: Ipv4Range::single(NAT64_POOL),
                    ports: (1024, 65535),
                },
            }),
            Change::UpsertNat(NatRule {
                name: name("static"),
                vpc: name("a"),
                kind: NatKind::Static44 {
                    inside: STATIC_IN,
                    outside: STATIC_OUT,
                },
            }),
            Change::UpsertMeter(MeterSpec {
                name: name("vpc-b"),
                profile: tr_tcm(50_000, 3_000),
                target: MeterTarget::Vpc(name("b")),
            }),
            Change::UpsertMeter(MeterSpec {
                name: name("route-b"),
                profile: tr_tcm(20_000, 1_600),
                target: MeterTarget::Route(key(20, "10.1.0.0/16")),
            }),
        ])
        .unwrap();
        m
    }

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn v4(&mut self) -> Ipv4Addr {
            Ipv4Addr::from(self.next() as u32)
        }
    }

    #[derive(Clone, Copy)]
    enum L4Kind {
        Udp(u16, u16),
        Tcp(u16, u16, u8),
        Echo(u16),
        /// Destination unreachable (not an echo: no identifier in the layout).
        Unreachable,
    }

    fn eth(ethertype: u16, payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 14 + payload];
        EthernetRepr {
            src: mac(0x42).0,
            dst: mac(1).0,
            ethertype,
        }
        .emit(&mut EthernetFrame::new_unchecked(&mut f[..]));
        f
    }

    fn l4_bytes(kind: L4Kind) -> (u8, Vec<u8>) {
        match kind {
            L4Kind::Udp(s, d) => {
                let mut b = vec![0u8; 8 + 6];
                UdpRepr {
                    src_port: s,
                    dst_port: d,
                }
                .emit(&mut UdpPacket::new_unchecked(&mut b[..]));
                (ip_proto::UDP, b)
            }
            L4Kind::Tcp(s, d, flags) => {
                let mut b = vec![0u8; TcpRepr::HEADER_LEN + 4];
                TcpRepr {
                    src_port: s,
                    dst_port: d,
                    seq: 1,
                    ack: 0,
                    flags,
                    window: 1000,
                }
                .emit(&mut TcpPacket::new_unchecked(&mut b[..]));
                (ip_proto::TCP, b)
            }
            L4Kind::Echo(id) => {
                let mut b = vec![8, 0, 0, 0, (id >> 8) as u8, id as u8, 0, 1, 0xaa, 0xbb];
                let c = checksum::finish(checksum::sum(&b));
                b[2..4].copy_from_slice(&c.to_be_bytes());
                (ip_proto::ICMP, b)
            }
            L4Kind::Unreachable => {
                let mut b = vec![3, 1, 0, 0, 0x12, 0x34, 0, 0, 0x45, 0];
                let c = checksum::finish(checksum::sum(&b));
                b[2..4].copy_from_slice(&c.to_be_bytes());
                (ip_proto::ICMP, b)
            }
        }
    }

    fn udp4_csum(f: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr) {
        let mut u = UdpPacket::new_unchecked(&mut f[34..]);
        u.fill_checksum(src, dst);
    }

    fn v4(src: Ipv4Addr, dst: Ipv4Addr, kind: L4Kind, ttl: u8) -> Vec<u8> {
        let (protocol, l4) = l4_bytes(kind);
        let mut f = eth(ethertype::IPV4, 20 + l4.len());
        Ipv4Repr {
            src,
            dst,
            protocol,
            ttl,
            dscp_ecn: 0,
            ident: 7,
            dont_frag: true,
            payload_len: l4.len(),
        }
        .emit(&mut Ipv4Packet::new_unchecked(&mut f[14..]));
        f[34..].copy_from_slice(&l4);
        match kind {
            L4Kind::Udp(..) => udp4_csum(&mut f, src, dst),
            L4Kind::Tcp(..) => TcpPacket::new_unchecked(&mut f[34..]).fill_checksum(src, dst),
            L4Kind::Echo(_) | L4Kind::Unreachable => {}
        }
        f
    }

    fn v6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
        let (_, l4) = l4_bytes(L4Kind::Udp(sport, dport));
        let mut f = eth(ethertype::IPV6, 40 + l4.len());
        Ipv6Repr {
            src,
            dst,
            next_header: ip_proto::UDP,
            hop_limit: 9,
            traffic_class: 0,
            flow_label: 0,
            payload_len: l4.len(),
        }
        .emit(&mut Ipv6Packet::new_unchecked(&mut f[14..]));
        f[54..].copy_from_slice(&l4);
        UdpPacket::new_unchecked(&mut f[54..]).fill_checksum(src, dst);
        f
    }

    /// `inner` in VXLAN to our VTEP.
    fn vxlan_in(inner: &[u8], vni: u32) -> Vec<u8> {
        let udp_len = 8 + 8 + inner.len();
        let mut f = eth(ethertype::IPV4, 20 + udp_len);
        Ipv4Repr {
            src: Ipv4Addr::new(198, 51, 100, 1),
            dst: VTEP,
            protocol: ip_proto::UDP,
            ttl: 64,
            dscp_ecn: 0,
            ident: 0,
            dont_frag: true,
            payload_len: udp_len,
        }
        .emit(&mut Ipv4Packet::new_unchecked(&mut f[14..]));
        UdpRepr {
            src_port: 49152,
            dst_port: VXLAN_PORT,
        }
        .emit(&mut UdpPacket::new_unchecked(&mut f[34..]));
        f[42..50].copy_from_slice(&[
            0x08,
            0,
            0,
            0,
            (vni >> 16) as u8,
            (vni >> 8) as u8,
            vni as u8,
            0,
        ]);
        f[50..].copy_from_slice(inner);
        f
    }

    /// The reply to a frame the pipeline sent: addresses and ports swapped.
    fn reply_to(out: &[u8]) -> Option<Vec<u8>> {
        let l = parse_layout(out).ok()?;
        if l.l3 != L3::Ipv4 {
            return None;
        }
        let src = ipv4_at(out, 26);
        let dst = ipv4_at(out, 30);
        let kind = match l.l4 {
            L4::Udp => L4Kind::Udp(l.dst_port, l.src_port),
            L4::Tcp => L4Kind::Tcp(l.dst_port, l.src_port, 0x12),
            L4::Icmpv4 if l.src_port == l.dst_port && out.get(34) == Some(&8) => {
                let mut f = v4(dst, src, L4Kind::Echo(l.src_port), 64);
                f[34] = 0; // echo reply
                let c = get16(&f, 36);
                put16(&mut f, 36, checksum::update16(c, 0x0800, 0x0000));
                return Some(f);
            }
            _ => return None,
        };
        Some(v4(dst, src, kind, 64))
    }

    /// One generated packet: frame, ingress port, mark.
    type Pkt = (Vec<u8>, PortId, Option<u32>);

    fn gen(rng: &mut Rng, sent: &[Vec<u8>]) -> Pkt {
        let inside = |rng: &mut Rng| Ipv4Addr::new(10, 0, 0, 2 + rng.below(40) as u8);
        let l4 = |rng: &mut Rng| match rng.below(7) {
            0..=2 => L4Kind::Udp(1000 + rng.below(8) as u16, 53 + rng.below(3) as u16),
            3..=4 => L4Kind::Tcp(
                2000 + rng.below(8) as u16,
                443,
                [0x02, 0x10, 0x11][rng.below(3) as usize],
            ),
            5 => L4Kind::Echo(rng.below(4) as u16),
            _ => L4Kind::Unreachable,
        };
        let internet = |rng: &mut Rng| match rng.below(4) {
            0 => Ipv4Addr::new(8, 8, rng.below(3) as u8 + 7, rng.below(256) as u8),
            1 => Ipv4Addr::new(100, 64, 1, 1),
            _ => rng.v4(),
        };
        let vpc_port = |rng: &mut Rng| if rng.below(2) == 0 { PORT_A } else { PORT_A2 };
        let uplink = |rng: &mut Rng| UPLINKS[rng.below(2) as usize];
        match rng.below(20) {
            0..=3 => {
                let src = if rng.below(5) == 0 {
                    STATIC_IN
                } else {
                    inside(rng)
                };
                let ttl = if rng.below(20) == 0 { 1 } else { 64 };
                let k = l4(rng);
                let dst = internet(rng);
                (v4(src, dst, k, ttl), vpc_port(rng), None)
            }
            4 => {
                let dst = match rng.below(3) {
                    0 => inside(rng),
                    1 => Ipv4Addr::new(10, 9, 1, 1),
                    _ => Ipv4Addr::new(10, 20, rng.below(4) as u8, rng.below(256) as u8),
                };
                let k = l4(rng);
                (v4(inside(rng), dst, k, 64), vpc_port(rng), None)
            }
            5 => {
                let src = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2 + rng.below(8) as u16);
                let dst = match rng.below(3) {
                    0 => Ipv6Addr::from(
                        (0x64_ff9b_u128 << 96) | u128::from(u32::from(internet(rng))),
                    ),
                    1 => Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7),
                    _ => Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, rng.below(9) as u16),
                };
                (
                    v6(src, dst, 3000 + rng.below(4) as u16, 80),
                    vpc_port(rng),
                    None,
                )
            }
            6..=9 => match sent
                .get(rng.below(sent.len().max(1) as u64) as usize)
                .and_then(|o| reply_to(o))
            {
                Some(f) => (f, uplink(rng), None),
                None => (
                    v4(rng.v4(), NAT64_POOL, L4Kind::Udp(53, 1024), 64),
                    uplink(rng),
                    None,
                ),
            },
            10 => {
                let dst =
                    [Ipv4Addr::new(203, 0, 113, 1), NAT64_POOL, STATIC_OUT][rng.below(3) as usize];
                let k = l4(rng);
                (v4(rng.v4(), dst, k, 64), uplink(rng), None)
            }
            11 => {
                let inner_dst = if rng.below(2) == 0 {
                    inside(rng)
                } else {
                    internet(rng)
                };
                let k = l4(rng);
                let mut inner = v4(Ipv4Addr::new(10, 0, 1, 9), inner_dst, k, 64);
                if rng.below(4) == 0 {
                    inner[12..14].copy_from_slice(&[0x08, 0x06]); // ARP inside
                }
                let vni = if rng.below(6) == 0 { 999 } else { 100 };
                (vxlan_in(&inner, vni), uplink(rng), None)
            }
            12 | 13 => {
                let k = l4(rng);
                (v4(rng.v4(), internet(rng), k, 64), uplink(rng), None)
            }
            14 | 15 => {
                let src = Ipv4Addr::new(10, 1, 0, rng.below(256) as u8);
                let dst = if rng.below(3) == 0 {
                    Ipv4Addr::new(10, 1, 2, 3)
                } else {
                    internet(rng)
                };
                let k = l4(rng);
                (v4(src, dst, k, 64), PORT_B, None)
            }
            16 => {
                let table = [10, 20, 254, 77][rng.below(4) as usize];
                let k = l4(rng);
                let f = if rng.below(4) == 0 {
                    v6(
                        Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3),
                        Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7),
                        1,
                        2,
                    )
                } else {
                    v4(inside(rng), internet(rng), k, 64)
                };
                (f, uplink(rng), Some(mark::resume_in_vrf(table)))
            }
            17 => {
                // Junk: ARP, VLAN-tagged, truncated, unknown port, unknown mark.
                let mut f = v4(inside(rng), internet(rng), L4Kind::Udp(1, 2), 64);
                match rng.below(5) {
                    0 => f[12..14].copy_from_slice(&[0x08, 0x06]),
                    1 => {
                        f.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
                    }
                    2 => f.truncate(30 + rng.below(10) as usize),
                    3 => return (f, PortId(99), None),
                    _ => return (f, vpc_port(rng), Some(0x0300_0001)),
                }
                (f, vpc_port(rng), None)
            }
            _ => {
                let k = l4(rng);
                (v4(inside(rng), internet(rng), k, 64), PORT_A, None)
            }
        }
    }

    fn bufs(pkts: &[Pkt]) -> Vec<HeadroomBuf> {
        pkts.iter()
            .map(|(f, _, _)| {
                let mut b = HeadroomBuf::new(512, 128);
                assert!(b.load(f, 128));
                b
            })
            .collect()
    }

    /// `process_burst` decides and rewrites exactly as `process` on each packet in turn, also
    /// when a burst holds both a packet that creates NAT state and the reply that uses it,
    /// and across the first pass's chunk boundary.
    #[test]
    fn burst_equals_one_by_one() {
        let m = model();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut one = Pipeline::new(&m, PipelineLimits::default(), 7).unwrap();
        let mut burst = Pipeline::new(&m, PipelineLimits::default(), 7).unwrap();
        let mut sent: Vec<Vec<u8>> = Vec::new();
        let mut seen = BTreeMap::<String, usize>::new();
        for b in 0..300u64 {
            let now = b * 3_000_000;
            let n = [1, 5, 31, 32, 33, 64, 70][rng.below(7) as usize];
            let mut pkts = Vec::new();
            let mut want = Vec::new();
            for _ in 0..n {
                let p = gen(&mut rng, &sent);
                let mut buf = bufs(std::slice::from_ref(&p)).pop().unwrap();
                let v = one.process(&mut buf, p.1, p.2, now);
                if let Verdict::Tx(_) = v {
                    sent.push(buf.data().to_vec());
                }
                *seen.entry(format!("{v:?}")).or_default() += 1;
                want.push((v, buf.data().to_vec()));
                pkts.push(p);
            }
            let mut bs = bufs(&pkts);
            let ports: Vec<PortId> = pkts.iter().map(|p| p.1).collect();
            let marks: Vec<Option<u32>> = pkts.iter().map(|p| p.2).collect();
            let mut verdicts = vec![Verdict::ToHost; n];
            burst.process_burst(&mut bs, &ports, &marks, &mut verdicts, now);
            for (i, ((v, out), (got, buf))) in want.iter().zip(verdicts.iter().zip(&bs)).enumerate()
            {
                assert_eq!(got, v, "burst {b} packet {i}: verdict");
                assert_eq!(buf.data(), &out[..], "burst {b} packet {i}: bytes");
            }
        }
        for k in m.routes().keys() {
            assert_eq!(one.route_counters(k), burst.route_counters(k), "{k:?}");
        }
        // The traffic covers the interesting outcomes.
        for v in [
            "Tx(PortId(0))",
            "Tx(PortId(1))",
            "Tx(PortId(10))",
            "Tx(PortId(11))",
            "Tx(PortId(20))",
            "ToHost",
            "Drop(NoSession)",
            "Drop(Policed)",
            "Drop(Blackhole)",
            "Drop(TtlExceeded)",
            "Drop(UnknownVni)",
            "Drop(UnknownPort)",
            "Drop(Malformed)",
            "Drop(NoRoute)",
        ] {
            assert!(seen.contains_key(v), "no {v} in {seen:?}");
        }
    }

    /// Shorter `ingress`/`marks` than packets, fewer verdicts than packets.
    #[test]
    fn burst_with_short_slices() {
        let m = model();
        let mut a = Pipeline::new(&m, PipelineLimits::default(), 1).unwrap();
        let mut b = Pipeline::new(&m, PipelineLimits::default(), 1).unwrap();
        let f = v4(
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(8, 8, 8, 8),
            L4Kind::Udp(1, 2),
            64,
        );
        let pkts: Vec<Pkt> = (0..40).map(|_| (f.clone(), PORT_A, None)).collect();
        let mut bs = bufs(&pkts);
        let ports = vec![PORT_A; 35];
        let mut verdicts = vec![Verdict::ToHost; 38];
        b.process_burst(&mut bs, &ports, &[], &mut verdicts, 5);
        for (i, (v, buf)) in verdicts.iter().zip(&bs).enumerate() {
            let mut x = bufs(&pkts[i..=i]).pop().unwrap();
            let port = ports.get(i).copied().unwrap_or(PortId(u16::MAX));
            assert_eq!(*v, a.process(&mut x, port, None, 5), "packet {i}");
            assert_eq!(buf.data(), x.data());
        }
        // Packets without a verdict slot are left alone.
        assert_eq!(bs[39].data(), &f[..]);
    }

    fn with(m: &Model, changes: &[Change]) -> Model {
        let mut m = m.clone();
        m.apply(changes).unwrap();
        m
    }

    fn send(p: &mut Pipeline, dst: Ipv4Addr) -> Verdict {
        let f = v4(Ipv4Addr::new(1, 2, 3, 4), dst, L4Kind::Udp(1, 2), 64);
        let mut b = bufs(&[(f, UPLINKS[0], None)]).pop().unwrap();
        p.process(&mut b, UPLINKS[0], None, 1)
    }

    /// Next-hop groups are shared by equal lists, survive replacement of one route, and are
    /// freed with their last route; route slots are reused; counters follow the route.
    #[test]
    fn nexthop_groups_are_shared_and_freed() {
        let base = model();
        let before = Pipeline::new(&base, PipelineLimits::default(), 1).unwrap();
        let groups0 = before.nh_groups.live();
        let prefixes: Vec<String> = (0..200).map(|i| format!("172.16.{i}.0/24")).collect();
        let adds: Vec<Change> = prefixes
            .iter()
            .enumerate()
            .map(|(i, p)| route(254, p, vec![gw(UPLINKS[i % 2], 40 + (i % 2) as u8)]))
            .collect();
        let m1 = with(&base, &adds);
        let mut p = Pipeline::new(&base, PipelineLimits::default(), 1).unwrap();
        for p2 in &prefixes {
            p.update_route(&m1, key(254, p2)).unwrap();
        }
        assert_eq!(p.nh_groups.live(), groups0 + 2);
        let slots = p.routes.len();

        let k0 = key(254, &prefixes[0]);
        assert_eq!(
            send(&mut p, Ipv4Addr::new(172, 16, 0, 9)),
            Verdict::Tx(UPLINKS[0])
        );
        assert_eq!(p.route_counters(&k0).map(|c| c.packets), Some(1));

        // Replace: a new list makes a new group, the counters stay.
        let m2 = with(&m1, &[route(254, &prefixes[0], vec![gw(UPLINKS[1], 50)])]);
        p.update_route(&m2, k0).unwrap();
        assert_eq!(p.nh_groups.live(), groups0 + 3);
        assert_eq!(
            send(&mut p, Ipv4Addr::new(172, 16, 0, 9)),
            Verdict::Tx(UPLINKS[1])
        );
        assert_eq!(p.route_counters(&k0).map(|c| c.packets), Some(2));
        // Back to the shared list: the private group goes away.
        p.update_route(&m1, k0).unwrap();
        assert_eq!(p.nh_groups.live(), groups0 + 2);

        // Delete everything: groups and slots come back.
        let dels: Vec<Change> = prefixes
            .iter()
            .map(|p| Change::DeleteRoute(key(254, p)))
            .collect();
        let m3 = with(&m1, &dels);
        for p2 in &prefixes {
            p.update_route(&m3, key(254, p2)).unwrap();
        }
        assert_eq!(p.nh_groups.live(), groups0);
        assert_eq!(p.route_counters(&k0), None);
        assert!(matches!(
            send(&mut p, Ipv4Addr::new(172, 16, 0, 9)),
            Verdict::Tx(_)
        ));
        for p2 in &prefixes {
            p.update_route(&m1, key(254, p2)).unwrap();
        }
        assert_eq!(p.routes.len(), slots, "free slots are reused");
        assert_eq!(p.route_counters(&k0).map(|c| c.packets), Some(0));
        assert_eq!(p.nh_groups.live(), groups0 + 2);
    }
}
