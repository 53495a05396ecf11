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

use crate::ir::{mark, vxlan_source_port};
use crate::lpm::{Lpm4, Lpm6, LpmError, LpmLimits};
use crate::model::{
    MacAddr, MeterTarget, Model, Name, NatKind, Nexthop, PortId, Prefix, RouteKey, TableId,
    UNDERLAY_TABLE,
};
use crate::packet::{self, checksum, ip_proto, parse_layout, Layout, L3, L4, VXLAN_PORT};
use crate::soft::meter::{Color, Meter};
use crate::soft::nat::{NatConfig, NatError, NatTable, Proto, Random, Timeouts};
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

/// Per-route counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets forwarded or dropped by the route.
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
}

#[derive(Debug, Clone)]
struct RouteEntry {
    nexthops: Vec<Nexthop>,
    meter: Option<usize>,
    counters: Counters,
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
    prefix: Prefix,
    table: NatTable<Ipv6Addr>,
    vrf: TableId,
}

/// A value in the LPM: route entries below this, NAT64 prefixes above.
const NAT64_BASE: u32 = 1 << 21;

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
    routes: Vec<Option<RouteEntry>>,
    free_routes: Vec<usize>,
    route_index: BTreeMap<RouteKey, usize>,
    meters: Vec<Meter>,
    napt: Vec<(TableId, NatTable<Ipv4Addr>)>,
    nat64: Vec<Nat64>,
    /// Reverse static NAT: outside → (inside, table).
    rev44: BTreeMap<Ipv4Addr, (Ipv4Addr, TableId)>,
    rev66: BTreeMap<Ipv6Addr, (Ipv6Addr, TableId)>,
    scratch: Vec<u8>,
    rng: XorShift64,
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
            meters: Vec::new(),
            napt: Vec::new(),
            nat64: Vec::new(),
            rev44: BTreeMap::new(),
            rev66: BTreeMap::new(),
            scratch: vec![0; 16 * 1024],
            rng: XorShift64(seed | 1),
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
                    *slot = None;
                }
                self.free_routes.push(idx);
            }
            return Ok(());
        };
        let meter = model.meter_for(&MeterTarget::Route(key)).map(|m| m.profile);
        if let Some(&idx) = self.route_index.get(&key) {
            if let Some(Some(entry)) = self.routes.get_mut(idx) {
                entry.nexthops.clone_from(&route.nexthops);
                match (entry.meter, meter) {
                    (Some(m), Some(profile)) => {
                        if self.meters.get(m).map(|x| x.profile()) != Some(profile) {
                            if let Some(x) = self.meters.get_mut(m) {
                                *x = Meter::new(profile, 0);
                            }
                        }
                    }
                    (None, Some(profile)) => {
                        entry.meter = Some(self.meters.len());
                        self.meters.push(Meter::new(profile, 0));
                    }
                    (_, None) => entry.meter = None,
                }
            }
            return Ok(());
        }
        let live = self.route_index.len();
        if live >= self.limits.max_routes {
            return Err(PipelineError::RoutesFull {
                max: self.limits.max_routes,
            });
        }
        let idx = self.free_routes.pop().unwrap_or(self.routes.len());
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
        let meter = meter.map(|profile| {
            self.meters.push(Meter::new(profile, 0));
            self.meters.len() - 1
        });
        let entry = RouteEntry {
            nexthops: route.nexthops.clone(),
            meter,
            counters: Counters::default(),
        };
        if idx == self.routes.len() {
            self.routes.push(Some(entry));
        } else if let Some(slot) = self.routes.get_mut(idx) {
            *slot = Some(entry);
        }
        self.route_index.insert(key, idx);
        Ok(())
    }

    /// Counters of a route.
    pub fn route_counters(&self, key: &RouteKey) -> Option<Counters> {
        let idx = *self.route_index.get(key)?;
        self.routes.get(idx)?.as_ref().map(|e| e.counters)
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
    pub fn process_burst<B: PacketBuf>(
        &mut self,
        pkts: &mut [B],
        ingress: &[PortId],
        marks: &[Option<u32>],
        verdicts: &mut [Verdict],
        now_ns: u64,
    ) {
        for (i, (pkt, v)) in pkts.iter_mut().zip(verdicts.iter_mut()).enumerate() {
            let port = ingress.get(i).copied().unwrap_or(PortId(u16::MAX));
            let mark = marks.get(i).copied().flatten();
            *v = self.process(pkt, port, mark, now_ns);
        }
    }

    /// Processes one packet.
    pub fn process<B: PacketBuf>(
        &mut self,
        pkt: &mut B,
        ingress: PortId,
        hw_mark: Option<u32>,
        now_ns: u64,
    ) -> Verdict {
        match self.run(pkt, ingress, hw_mark, now_ns) {
            Ok(v) => v,
            Err(r) => Verdict::Drop(r),
        }
    }

    fn run<B: PacketBuf>(
        &mut self,
        pkt: &mut B,
        ingress: PortId,
        hw_mark: Option<u32>,
        now_ns: u64,
    ) -> Result<Verdict, DropReason> {
        let mut l = parse_layout(pkt.data()).map_err(|_| DropReason::Malformed)?;
        let table = match hw_mark.and_then(mark::vrf_of) {
            Some(t) => TableId(t),
            None => {
                if l.l3 == L3::Other || l.vlan.is_some() {
                    return if self.vpc_ports.contains_key(&ingress)
                        || self.uplinks.contains(&ingress)
                    {
                        Ok(Verdict::ToHost)
                    } else {
                        Err(DropReason::UnknownPort)
                    };
                }
                if let Some(&t) = self.vpc_ports.get(&ingress) {
                    let len = pkt.data().len() as u32;
                    if let Some(m) = self.vrfs.get(&t).and_then(|v| v.meter) {
                        if let Some(meter) = self.meters.get_mut(m) {
                            if meter.color(len, now_ns) == Color::Red {
                                return Err(DropReason::Policed);
                            }
                        }
                    }
                    t
                } else if self.uplinks.contains(&ingress) {
                    self.uplink_ingress(pkt, &mut l, now_ns)?
                } else {
                    return Err(DropReason::UnknownPort);
                }
            }
        };
        self.route(pkt, l, table, now_ns, false)
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
                *l = parse_layout(pkt.data()).map_err(|_| DropReason::Malformed)?;
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
                    set_l4_port(pkt.data_mut(), l, false, t.inside.1);
                    // The layout's ports must describe the rewritten packet (NAT keys, ECMP).
                    *l = parse_layout(pkt.data()).map_err(|_| DropReason::Malformed)?;
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
        let vrf = self.vrfs.get(&table)?;
        let l3 = usize::from(l.l3_offset);
        let v = match l.l3 {
            L3::Ipv4 => vrf.v4.lookup(u32::from(ipv4_at(pkt, l3 + 16)))?,
            L3::Ipv6 => vrf.v6.lookup(u128::from(ipv6_at(pkt, l3 + 24)))?,
            L3::Other => return None,
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
        mut l: Layout,
        table: TableId,
        now_ns: u64,
        hopped: bool,
    ) -> Result<Verdict, DropReason> {
        let hit = self
            .lookup(table, pkt.data(), &l)
            .ok_or(DropReason::NoRoute)?;
        let idx = match hit {
            Hit::Nat64(n) => {
                if hopped {
                    return Err(DropReason::VrfLoop);
                }
                self.nat64_out(pkt, &mut l, n, now_ns)?;
                return self.route(pkt, l, UNDERLAY_TABLE, now_ns, true);
            }
            Hit::Route(i) => i,
        };
        let len = pkt.data().len() as u64;
        let entry = self
            .routes
            .get_mut(idx)
            .and_then(|e| e.as_mut())
            .ok_or(DropReason::NoRoute)?;
        entry.counters.packets += 1;
        entry.counters.bytes += len;
        let nh_count = entry.nexthops.len();
        let first = *entry.nexthops.first().ok_or(DropReason::NoRoute)?;
        let meter = entry.meter;
        match first {
            Nexthop::Blackhole => return Err(DropReason::Blackhole),
            Nexthop::Vrf { table: target } => {
                if hopped {
                    return Err(DropReason::VrfLoop);
                }
                self.breakout_nat(pkt, &l, table, now_ns)?;
                // The layout's ports must describe the translated packet (ECMP hash).
                let l = parse_layout(pkt.data()).map_err(|_| DropReason::Malformed)?;
                return self.route(pkt, l, target, now_ns, true);
            }
            _ => {}
        }
        let ttl = ttl_of(pkt.data(), &l);
        if ttl <= 1 {
            return Err(DropReason::TtlExceeded);
        }
        if let Some(m) = meter.and_then(|m| self.meters.get_mut(m)) {
            if m.color(len as u32, now_ns) == Color::Red {
                return Err(DropReason::Policed);
            }
        }
        let nh = if nh_count > 1 {
            let pick = flow_hash(pkt.data(), &l) as usize % nh_count;
            self.routes
                .get(idx)
                .and_then(|e| e.as_ref())
                .and_then(|e| e.nexthops.get(pick).copied())
                .unwrap_or(first)
        } else {
            first
        };
        dec_ttl(pkt.data_mut(), &l);
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
        let entry = self
            .routes
            .get(idx as usize)
            .and_then(|e| e.as_ref())
            .ok_or(DropReason::Unresolved)?;
        match entry.nexthops.first() {
            Some(Nexthop::Underlay { port, mac, .. }) => Ok((*port, *mac)),
            _ => Err(DropReason::Unresolved),
        }
    }

    /// Source NAT on breakout from a VPC: static 1:1, else NAPT44 for IPv4.
    fn breakout_nat<B: PacketBuf>(
        &mut self,
        pkt: &mut B,
        l: &Layout,
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
                    .map_err(|_| DropReason::NatExhausted)?;
                set_ipv4_addr(pkt.data_mut(), l, 12, t.outside.0);
                set_l4_port(pkt.data_mut(), l, true, t.outside.1);
                Ok(())
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
            .map_err(|_| DropReason::NatExhausted)?;
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
    *l = parse_layout(pkt.data()).map_err(|_| DropReason::Malformed)?;
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

/// Rewrites the L4 source (or destination) port, or the ICMP echo identifier.
fn set_l4_port(d: &mut [u8], l: &Layout, source: bool, new: u16) {
    let l4 = usize::from(l.l4_offset);
    let at = match l.l4 {
        L4::Tcp | L4::Udp => l4 + if source { 0 } else { 2 },
        L4::Icmpv4 | L4::Icmpv6 => l4 + 4,
        _ => return,
    };
    let old = get16(d, at);
    put16(d, at, new);
    if let Some((c_at, _)) = l4_csum_offset(l) {
        let c = get16(d, c_at);
        if l.l4 == L4::Udp && c == 0 {
            return;
        }
        let mut nc = checksum::update16(c, old, new);
        if l.l4 == L4::Udp {
            nc = checksum::udp_nonzero(nc);
        }
        put16(d, c_at, nc);
    }
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
