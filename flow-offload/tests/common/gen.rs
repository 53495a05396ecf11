//! Proptest strategies for models, route changes and packets.
//!
//! Strategies produce small *specs* of raw numbers (so proptest shrinks them well); `build`
//! functions turn a spec into model changes or a frame against a concrete model. Addresses come
//! from small palettes with few distinct top bits, so prefixes of every length nest and overlap,
//! and packets are biased toward route prefixes, NAT addresses and VTEPs.
//!
//! Ports: uplinks are 1 and 2, VPC `i` has ports `10 + 10 i` and `11 + 10 i`, port 99 belongs
//! to nothing.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::collections::BTreeSet;

use flow_offload::model::{
    Change, Ipv4Range, MacAddr, Meter, MeterProfile, MeterTarget, Model, Name, NatKind, NatRule,
    Nexthop, Node, PortId, Prefix, Route, RouteKey, TableId, Vni, Vpc, UNDERLAY_TABLE,
};
use flow_offload::packet::VXLAN_PORT;
use proptest::collection::vec;
use proptest::prelude::*;

use super::reference::{emit, vxlan_payload, Frame, Net, L4, V4, V6};

// ---------------------------------------------------------------------------------------------
// Palettes
// ---------------------------------------------------------------------------------------------

/// IPv4 anchors: prefixes are anchors cut to some length, destinations anchors with low bits
/// flipped. Few distinct top bits, so /8 ... /32 nest.
pub const ANCHORS4: [[u8; 4]; 8] = [
    [10, 0, 0, 1],
    [10, 1, 2, 3],
    [10, 1, 2, 200],
    [10, 128, 0, 9],
    [10, 1, 0, 77],
    [172, 16, 5, 4],
    [100, 64, 0, 2],
    [100, 64, 1, 1],
];

/// IPv6 anchors, including addresses under the NAT64 prefix.
pub const ANCHORS6: [[u16; 8]; 7] = [
    [0x2001, 0xdb8, 0, 0, 0, 0, 0, 1],
    [0x2001, 0xdb8, 0, 1, 0, 0, 0, 5],
    [0x2001, 0xdb8, 0, 1, 2, 0, 0, 3],
    [0x2001, 0xdb8, 0x8000, 0, 0, 0, 0, 1],
    [0xfd00, 0, 0, 0, 0, 0, 0, 1],
    [0x64, 0xff9b, 0, 0, 0, 0, 0x0a01, 0x0203],
    [0x64, 0xff9b, 0, 0, 0, 0, 0x0a00, 0x0001],
];

/// Prefix lengths, weighted toward the usual ones.
const LENS4: [u8; 12] = [0, 1, 8, 9, 15, 16, 23, 24, 25, 30, 31, 32];
const LENS6: [u8; 12] = [0, 16, 32, 33, 48, 56, 64, 96, 112, 120, 127, 128];

/// Our VTEP candidates.
const VTEPS: [[u8; 4]; 2] = [[100, 64, 0, 1], [100, 64, 1, 1]];
/// Remote VTEPs: some inside anchor prefixes (may resolve), one outside every anchor.
const REMOTE_VTEPS: [[u8; 4]; 4] = [
    [100, 64, 0, 2],
    [100, 64, 1, 1],
    [100, 64, 0, 9],
    [100, 65, 0, 1],
];
/// Inside addresses of static NAT44 (also anchors, so VPCs route back to them).
/// Inside (VPC) IPv4 hosts.
pub const INSIDE4: [[u8; 4]; 4] = [
    [10, 1, 2, 3],
    [10, 0, 0, 1],
    [10, 1, 2, 200],
    [172, 16, 5, 4],
];
const INSIDE6: [[u16; 8]; 2] = [
    [0xfd00, 0, 0, 0, 0, 0, 0, 1],
    [0x2001, 0xdb8, 0, 1, 0, 0, 0, 5],
];
/// Port ranges of stateful NAT.
const NAT_PORTS: [(u16, u16); 3] = [(1024, 1087), (2000, 2255), (40000, 40127)];

/// Never the destination of a generated packet: sources of unsolicited inbound packets to NAT
/// pools, so they can never match a session the reference has not seen.
pub fn stranger(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 1 + i % 200)
}

fn is_stranger(a: Ipv4Addr) -> bool {
    a.octets()[..3] == [192, 0, 2]
}

/// A VNI no VPC has.
pub const UNKNOWN_VNI: u32 = 7777;
/// A port that belongs to nothing.
pub const UNKNOWN_PORT: PortId = PortId(99);

/// Uplink `i`.
pub fn uplink(i: usize) -> PortId {
    PortId(1 + i as u16)
}

/// Port `j` of VPC `i`.
pub fn vpc_port(i: usize, j: usize) -> PortId {
    PortId(10 + 10 * i as u16 + j as u16)
}

fn v4(o: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(o)
}

fn v6(s: [u16; 8]) -> Ipv6Addr {
    Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7])
}

fn pick<T: Copy>(xs: &[T], i: u8) -> T {
    xs[usize::from(i) % xs.len()]
}

fn name(s: &str) -> Name {
    Name::new(s).unwrap_or_else(|_| unreachable!("static names are valid"))
}

/// The MAC of neighbour `i`.
pub fn nh_mac(i: u8) -> MacAddr {
    MacAddr([0x02, 0, 0, 0, 0x01, 1 + i % 4])
}

/// The router MAC of remote VTEP router `i`.
pub fn remote_router_mac(i: u8) -> MacAddr {
    MacAddr([0x02, 0, 0, 0, 0x02, 1 + i % 3])
}

/// Our router MAC candidates.
pub fn router_mac(i: u8) -> MacAddr {
    MacAddr([0x02, 0, 0, 0, 0, 1 + i % 2])
}

/// `addr` cut to `len` bits.
pub fn cut(addr: IpAddr, len: u8) -> Prefix {
    let p = match addr {
        IpAddr::V4(a) => Prefix::v4(a, 32),
        IpAddr::V6(a) => Prefix::v6(a, 128),
    };
    p.unwrap_or_else(|_| unreachable!("host prefixes are valid"))
        .truncate(len)
}

/// Some address inside `p`: its network with the host bits from `bits`.
pub fn inside_prefix(p: &Prefix, bits: u128) -> IpAddr {
    match p.addr() {
        IpAddr::V4(a) => {
            let host = !flow_offload::model::mask32(p.len());
            IpAddr::V4(Ipv4Addr::from(u32::from(a) | (bits as u32 & host)))
        }
        IpAddr::V6(a) => {
            let host = !flow_offload::model::mask128(p.len());
            IpAddr::V6(Ipv6Addr::from(u128::from(a) | (bits & host)))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Models
// ---------------------------------------------------------------------------------------------

/// Next hops of a route, as indices into the palettes.
#[derive(Debug, Clone)]
pub enum NhSpec {
    /// Underlay next hops (port, MAC, gateway) — several make ECMP.
    Underlay(Vec<(u8, u8, u8)>),
    /// VXLAN next hops (VPC for the VNI, remote VTEP, router MAC) — several make ECMP.
    Vxlan(Vec<(u8, u8, u8)>),
    /// Breakout to the underlay (becomes a blackhole in the underlay table).
    Vrf,
    /// Blackhole.
    Blackhole,
}

/// One route.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    /// 0 is the underlay, `k` the (k-1)th VPC (modulo their number).
    pub table: u8,
    /// IPv6 rather than IPv4.
    pub v6: bool,
    /// Anchor index.
    pub anchor: u8,
    /// Length index.
    pub len: u8,
    /// Next hops.
    pub nh: NhSpec,
}

/// One NAT rule.
#[derive(Debug, Clone)]
pub enum NatSpec {
    /// Static NAT44 (VPC, inside, outside).
    Static44(u8, u8, u8),
    /// Static NAT66 (VPC, inside, outside).
    Static66(u8, u8, u8),
    /// NAPT44 (VPC, first pool address, pool size, port range).
    Napt44(u8, u8, u8, u8),
    /// NAT64 under 64:ff9b::/96 (VPC, first pool address, pool size, port range).
    Nat64(u8, u8, u8, u8),
}

/// One meter.
#[derive(Debug, Clone)]
pub struct MeterSpec {
    /// A VPC (true) or a route (false).
    pub on_vpc: bool,
    /// Which one.
    pub which: u8,
    /// Its profile.
    pub profile: MeterProfile,
}

/// A whole model.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Our VTEP.
    pub vtep: u8,
    /// Our router MAC.
    pub mac: u8,
    /// Number of uplinks (1 or 2).
    pub uplinks: u8,
    /// Port counts of the VPCs (0..=3 VPCs of 0..=2 ports).
    pub vpcs: Vec<u8>,
    /// Routes.
    pub routes: Vec<RouteSpec>,
    /// NAT rules.
    pub nats: Vec<NatSpec>,
    /// Meters.
    pub meters: Vec<MeterSpec>,
    /// Start from a realistic skeleton: an underlay default route, and in every VPC a default
    /// breakout route (v4 and v6) and a route back to its hosts on its first port.
    pub skeleton: bool,
}

fn nh_spec() -> impl Strategy<Value = NhSpec> {
    let triple = || (any::<u8>(), any::<u8>(), any::<u8>());
    prop_oneof![
        5 => vec(triple(), 1..=1).prop_map(NhSpec::Underlay),
        2 => vec(triple(), 2..=3).prop_map(NhSpec::Underlay),
        3 => vec(triple(), 1..=1).prop_map(NhSpec::Vxlan),
        1 => vec(triple(), 2..=2).prop_map(NhSpec::Vxlan),
        2 => Just(NhSpec::Vrf),
        2 => Just(NhSpec::Blackhole),
    ]
}

/// A route.
pub fn route_spec() -> impl Strategy<Value = RouteSpec> {
    (
        any::<u8>(),
        prop::bool::weighted(0.3),
        any::<u8>(),
        any::<u8>(),
        nh_spec(),
    )
        .prop_map(|(table, v6, anchor, len, nh)| RouteSpec {
            table,
            v6,
            anchor,
            len,
            nh,
        })
}

fn nat_spec() -> impl Strategy<Value = NatSpec> {
    let b = any::<u8>;
    prop_oneof![
        2 => (b(), b(), b()).prop_map(|(v, i, o)| NatSpec::Static44(v, i, o)),
        1 => (b(), b(), b()).prop_map(|(v, i, o)| NatSpec::Static66(v, i, o)),
        3 => (b(), b(), b(), b()).prop_map(|(v, f, s, p)| NatSpec::Napt44(v, f, s, p)),
        2 => (b(), b(), b(), b()).prop_map(|(v, f, s, p)| NatSpec::Nat64(v, f, s, p)),
    ]
}

/// Meter profiles small enough that a few dozen packets turn some of them red.
pub fn meter_profile() -> impl Strategy<Value = MeterProfile> {
    let cir = prop::sample::select(vec![1_000u64, 1_000, 100_000, 50_000_000]);
    let cbs = prop::sample::select(vec![1518u64, 1518, 2000, 10_000]);
    let ebs = prop::sample::select(vec![0u64, 1518, 5000]);
    prop_oneof![
        (cir.clone(), cbs.clone(), ebs).prop_map(|(cir, cbs, ebs)| MeterProfile::SrTcm {
            cir,
            cbs,
            ebs
        }),
        (cir, cbs.clone(), 1u64..=4, cbs).prop_map(|(cir, cbs, k, pbs)| MeterProfile::TrTcm {
            cir,
            cbs,
            pir: cir * k,
            pbs,
        }),
    ]
}

fn meter_spec() -> impl Strategy<Value = MeterSpec> {
    (any::<bool>(), any::<u8>(), meter_profile()).prop_map(|(on_vpc, which, profile)| MeterSpec {
        on_vpc,
        which,
        profile,
    })
}

/// A model.
pub fn model_spec() -> impl Strategy<Value = ModelSpec> {
    (
        any::<u8>(),
        any::<u8>(),
        1u8..=2,
        vec(0u8..=2, 0..=3),
        vec(route_spec(), 0..=16),
        vec(nat_spec(), 0..=4),
        vec(meter_spec(), 0..=4),
        any::<bool>(),
    )
        .prop_map(
            |(vtep, mac, uplinks, vpcs, routes, nats, meters, skeleton)| ModelSpec {
                vtep,
                mac,
                uplinks,
                vpcs,
                routes,
                nats,
                meters,
                skeleton,
            },
        )
}

/// The VPC objects of a spec.
fn vpcs_of(spec: &ModelSpec) -> Vec<Vpc> {
    spec.vpcs
        .iter()
        .enumerate()
        .map(|(i, n)| Vpc {
            name: name(&format!("vpc-{i}")),
            vni: Vni::new(100 + i as u32).unwrap_or_else(|_| unreachable!("small VNIs are valid")),
            table: TableId(10 + i as u32),
            ports: (0..usize::from(*n)).map(|j| vpc_port(i, j)).collect(),
        })
        .collect()
}

/// The table a route spec lands in, and its VPC if any.
fn table_of(model: &Model, sel: u8) -> (TableId, Option<Vpc>) {
    let vpcs: Vec<&Vpc> = model.vpcs().values().collect();
    let k = usize::from(sel) % (vpcs.len() + 1);
    match k.checked_sub(1).and_then(|i| vpcs.get(i)) {
        Some(v) => (v.table, Some((*v).clone())),
        None => (UNDERLAY_TABLE, None),
    }
}

/// The route a spec describes in `model`, if it can be expressed there.
pub fn build_route(model: &Model, r: &RouteSpec) -> Option<Route> {
    let (table, vpc) = table_of(model, r.table);
    let prefix = if r.v6 {
        cut(
            IpAddr::V6(v6(pick(&ANCHORS6, r.anchor))),
            pick(&LENS6, r.len),
        )
    } else {
        cut(
            IpAddr::V4(v4(pick(&ANCHORS4, r.anchor))),
            pick(&LENS4, r.len),
        )
    };
    let nexthops = build_nexthops(model, table, vpc.as_ref(), &r.nh)?;
    Some(Route {
        key: RouteKey { table, prefix },
        nexthops,
    })
}

fn build_nexthops(
    model: &Model,
    table: TableId,
    vpc: Option<&Vpc>,
    nh: &NhSpec,
) -> Option<Vec<Nexthop>> {
    let mut out: Vec<Nexthop> = Vec::new();
    match nh {
        NhSpec::Underlay(list) => {
            let ports: Vec<PortId> = match vpc {
                Some(v) => v.ports.iter().copied().collect(),
                None => model.node()?.uplinks.iter().copied().collect(),
            };
            if ports.is_empty() {
                return None;
            }
            for &(p, m, g) in list {
                let gateway = if g % 2 == 0 {
                    IpAddr::V4(Ipv4Addr::new(100, 64, 9, 1 + g % 8))
                } else {
                    IpAddr::V6(Ipv6Addr::new(
                        0xfe80,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        1 + u16::from(g % 8),
                    ))
                };
                out.push(Nexthop::Underlay {
                    gateway,
                    port: pick(&ports, p),
                    mac: nh_mac(m),
                });
            }
        }
        NhSpec::Vxlan(list) => {
            let vpcs: Vec<&Vpc> = model.vpcs().values().collect();
            if vpcs.is_empty() {
                return None;
            }
            for &(v, t, m) in list {
                out.push(Nexthop::Vxlan {
                    vni: pick(&vpcs, v).vni,
                    remote_vtep: v4(pick(&REMOTE_VTEPS, t)),
                    router_mac: remote_router_mac(m),
                });
            }
        }
        NhSpec::Vrf if table != UNDERLAY_TABLE => out.push(Nexthop::Vrf {
            table: UNDERLAY_TABLE,
        }),
        NhSpec::Vrf | NhSpec::Blackhole => out.push(Nexthop::Blackhole),
    }
    let mut seen = BTreeSet::new();
    out.retain(|n| seen.insert(*n));
    Some(out)
}

fn build_nat(model: &Model, i: usize, n: &NatSpec) -> Option<NatRule> {
    let vpcs: Vec<&Vpc> = model.vpcs().values().collect();
    if vpcs.is_empty() {
        return None;
    }
    let pool = |first: u8, size: u8, base: u8| {
        let a = base + first % 4;
        Ipv4Range {
            first: Ipv4Addr::new(203, 0, 113, a),
            last: Ipv4Addr::new(203, 0, 113, a + size % 3),
        }
    };
    let (vpc, kind) = match *n {
        NatSpec::Static44(v, i, o) => (
            v,
            NatKind::Static44 {
                inside: v4(pick(&INSIDE4, i)),
                outside: Ipv4Addr::new(203, 0, 113, 1 + o % 4),
            },
        ),
        NatSpec::Static66(v, i, o) => (
            v,
            NatKind::Static66 {
                inside: v6(pick(&INSIDE6, i)),
                outside: Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1 + u16::from(o % 3)),
            },
        ),
        NatSpec::Napt44(v, f, s, p) => (
            v,
            NatKind::Napt44 {
                pool: pool(f, s, 8),
                ports: pick(&NAT_PORTS, p),
            },
        ),
        NatSpec::Nat64(v, f, s, p) => (
            v,
            NatKind::Nat64 {
                prefix: Prefix::v6(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96).ok()?,
                pool: pool(f, s, 16),
                ports: pick(&NAT_PORTS, p),
            },
        ),
    };
    Some(NatRule {
        name: name(&format!("nat-{i}")),
        vpc: pick(&vpcs, vpc).name.clone(),
        kind,
    })
}

/// The node of a spec.
pub fn build_node(spec: &ModelSpec) -> Node {
    Node {
        vtep: v4(pick(&VTEPS, spec.vtep)),
        router_mac: router_mac(spec.mac),
        uplinks: (0..usize::from(spec.uplinks.clamp(1, 2)))
            .map(uplink)
            .collect(),
    }
}

/// Builds a model through `Model::apply`: the node and VPCs in one batch (`None` if refused),
/// then every route, NAT rule and meter as its own batch, skipping those the model refuses
/// (overlapping pools, duplicate NAT64 prefixes, ...).
pub fn build_model(spec: &ModelSpec) -> Option<Model> {
    let mut model = Model::new();
    let mut base = vec![Change::SetNode(build_node(spec))];
    base.extend(vpcs_of(spec).into_iter().map(Change::UpsertVpc));
    model.apply(&base).ok()?;
    if spec.skeleton {
        let mut sk = vec![Route {
            key: RouteKey {
                table: UNDERLAY_TABLE,
                prefix: cut(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            },
            nexthops: vec![Nexthop::Underlay {
                gateway: IpAddr::V4(Ipv4Addr::new(100, 64, 9, 1)),
                port: uplink(0),
                mac: nh_mac(0),
            }],
        }];
        for v in model.vpcs().values() {
            let any4 = cut(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
            let any6 = cut(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);
            for prefix in [any4, any6] {
                sk.push(Route {
                    key: RouteKey {
                        table: v.table,
                        prefix,
                    },
                    nexthops: vec![Nexthop::Vrf {
                        table: UNDERLAY_TABLE,
                    }],
                });
            }
            if let Some(port) = v.ports.iter().next() {
                sk.push(Route {
                    key: RouteKey {
                        table: v.table,
                        prefix: cut(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), 8),
                    },
                    nexthops: vec![Nexthop::Underlay {
                        gateway: IpAddr::V4(Ipv4Addr::new(10, 255, 255, 254)),
                        port: *port,
                        mac: nh_mac(3),
                    }],
                });
            }
        }
        for r in sk {
            let _ = model.apply(&[Change::UpsertRoute(r)]);
        }
    }
    for r in &spec.routes {
        if let Some(route) = build_route(&model, r) {
            let _ = model.apply(&[Change::UpsertRoute(route)]);
        }
    }
    for (i, n) in spec.nats.iter().enumerate() {
        if let Some(nat) = build_nat(&model, i, n) {
            let _ = model.apply(&[Change::UpsertNat(nat)]);
        }
    }
    for (i, m) in spec.meters.iter().enumerate() {
        let target = if m.on_vpc {
            let vpcs: Vec<&Vpc> = model.vpcs().values().collect();
            if vpcs.is_empty() {
                continue;
            }
            MeterTarget::Vpc(pick(&vpcs, m.which).name.clone())
        } else {
            let keys: Vec<RouteKey> = model.routes().keys().copied().collect();
            if keys.is_empty() {
                continue;
            }
            MeterTarget::Route(pick(&keys, m.which))
        };
        let meter = Meter {
            name: name(&format!("meter-{i}")),
            profile: m.profile,
            target,
        };
        let _ = model.apply(&[Change::UpsertMeter(meter)]);
    }
    Some(model)
}

/// One route change.
#[derive(Debug, Clone)]
pub enum RouteChange {
    /// Create or replace a route.
    Upsert(RouteSpec),
    /// Give an existing route (by index) new next hops.
    Renexthop(u8, NhSpec),
    /// Delete an existing route (by index).
    Delete(u8),
}

/// A route change.
pub fn route_change() -> impl Strategy<Value = RouteChange> {
    prop_oneof![
        3 => route_spec().prop_map(RouteChange::Upsert),
        2 => (any::<u8>(), nh_spec()).prop_map(|(i, nh)| RouteChange::Renexthop(i, nh)),
        2 => any::<u8>().prop_map(RouteChange::Delete),
    ]
}

/// The model change a route change makes, if it can be expressed in `model`.
pub fn build_change(model: &Model, c: &RouteChange) -> Option<Change> {
    let keys: Vec<RouteKey> = model.routes().keys().copied().collect();
    match c {
        RouteChange::Upsert(r) => build_route(model, r).map(Change::UpsertRoute),
        RouteChange::Renexthop(i, nh) => {
            let key = *keys.get(usize::from(*i) % keys.len().max(1))?;
            let vpc = model.vpc_by_table(key.table).cloned();
            let nexthops = build_nexthops(model, key.table, vpc.as_ref(), nh)?;
            Some(Change::UpsertRoute(Route { key, nexthops }))
        }
        RouteChange::Delete(i) => {
            let key = *keys.get(usize::from(*i) % keys.len().max(1))?;
            Some(Change::DeleteRoute(key))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------------------------

/// One packet, as raw choices.
#[derive(Debug, Clone)]
pub struct PktSpec {
    /// Ingress: uplink, VPC port or unknown port.
    pub port: u8,
    /// Plain IP, VXLAN-encapsulated, ARP or VLAN-tagged.
    pub kind: u8,
    /// IPv6.
    pub v6: bool,
    /// Destination class and index.
    pub dst: (u8, u8),
    /// Host bits to flip / fill.
    pub bits: u128,
    /// How many low bits to flip.
    pub flip: u8,
    /// Source.
    pub src: u8,
    /// Transport: UDP, TCP, echo.
    pub l4: u8,
    /// Ports.
    pub ports: (u8, u8),
    /// TCP flags / echo reply.
    pub flags: u8,
    /// TTL class.
    pub ttl: u8,
    /// UDP checksum present (IPv4).
    pub udp_csum: bool,
    /// VXLAN: VNI selector, destination selector, flags valid.
    pub vxlan: (u8, u8, bool),
    /// TOS, ident, DF, sequence.
    pub misc: (u8, u16, bool, u32),
    /// Payload.
    pub payload: Vec<u8>,
    /// Time since the previous packet, ns.
    pub dt: u64,
}

/// A packet.
pub fn pkt_spec() -> impl Strategy<Value = PktSpec> {
    (
        (any::<u8>(), any::<u8>(), prop::bool::weighted(0.35)),
        (
            (any::<u8>(), any::<u8>()),
            any::<u128>(),
            any::<u8>(),
            any::<u8>(),
        ),
        (
            any::<u8>(),
            (any::<u8>(), any::<u8>()),
            any::<u8>(),
            any::<u8>(),
            prop::bool::weighted(0.8),
        ),
        // VXLAN with the I flag clear is left out: hardware decapsulates it, software drops it
        // (see `known_divergence_vxlan_i_flag_clear` in differential.rs).
        (
            (any::<u8>(), any::<u8>(), Just(true)),
            (any::<u8>(), any::<u16>(), any::<bool>(), any::<u32>()),
        ),
        (
            prop_oneof![5 => vec(any::<u8>(), 0..24), 2 => vec(any::<u8>(), 200..600)],
            prop_oneof![1 => Just(0u64), 6 => 0u64..200_000, 1 => 0u64..20_000_000],
        ),
    )
        .prop_map(
            |(
                (port, kind, v6),
                (dst, bits, flip, src),
                (l4, ports, flags, ttl, udp_csum),
                (vxlan, misc),
                (payload, dt),
            )| {
                PktSpec {
                    port,
                    kind,
                    v6,
                    dst,
                    bits,
                    flip,
                    src,
                    l4,
                    ports,
                    flags,
                    ttl,
                    udp_csum,
                    vxlan,
                    misc,
                    payload,
                    dt,
                }
            },
        )
}

const SPORTS: [u16; 7] = [1000, 1001, 2000, 40000, 53, 33434, 5555];
const DPORTS: [u16; 7] = [53, 80, 443, VXLAN_PORT, 8080, 123, 1024];
const TCP_FLAGS: [u8; 4] = [0x02, 0x10, 0x18, 0x11];

/// Addresses of the NAT rules of a model: (static outsides, stateful pool addresses, NAT66
/// outsides).
fn nat_addresses(model: &Model) -> (Vec<Ipv4Addr>, Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let (mut s, mut p, mut s6) = (Vec::new(), Vec::new(), Vec::new());
    for n in model.nat_rules().values() {
        match &n.kind {
            NatKind::Static44 { outside, .. } => s.push(*outside),
            NatKind::Napt44 { pool, .. } | NatKind::Nat64 { pool, .. } => p.extend(pool.iter()),
            NatKind::Static66 { outside, .. } => s6.push(*outside),
        }
    }
    (s, p, s6)
}

fn flip4(a: Ipv4Addr, bits: u128, n: u8) -> Ipv4Addr {
    let n = u32::from(n % 13);
    let m = if n == 0 { 0 } else { (1u32 << n) - 1 };
    Ipv4Addr::from(u32::from(a) ^ (bits as u32 & m))
}

fn flip6(a: Ipv6Addr, bits: u128, n: u8) -> Ipv6Addr {
    let n = u32::from(n % 24);
    let m = if n == 0 { 0 } else { (1u128 << n) - 1 };
    Ipv6Addr::from(u128::from(a) ^ (bits & m))
}

/// Picks a destination; `Ok(true)` when it is a stateful NAT pool address.
fn dst_of(model: &Model, s: &PktSpec) -> (IpAddr, bool) {
    let (statics, pools, statics6) = nat_addresses(model);
    let (class, idx) = s.dst;
    let routes: Vec<Prefix> = model
        .routes()
        .keys()
        .map(|k| k.prefix)
        .filter(|p| p.is_v4() != s.v6)
        .collect();
    if !s.v6 {
        let a = match class % 8 {
            4 if !statics.is_empty() || !pools.is_empty() => {
                let all: Vec<Ipv4Addr> = statics.iter().chain(pools.iter()).copied().collect();
                let a = pick(&all, idx);
                return (IpAddr::V4(a), pools.contains(&a));
            }
            5 => {
                let mut vteps: Vec<Ipv4Addr> = REMOTE_VTEPS.iter().map(|o| v4(*o)).collect();
                if let Some(n) = model.node() {
                    vteps.push(n.vtep);
                }
                pick(&vteps, idx)
            }
            6 if !routes.is_empty() => match inside_prefix(&pick(&routes, idx), s.bits) {
                IpAddr::V4(a) => a,
                IpAddr::V6(_) => v4(pick(&ANCHORS4, idx)),
            },
            7 => v4(pick(&ANCHORS4, idx)),
            _ => flip4(v4(pick(&ANCHORS4, idx)), s.bits, s.flip),
        };
        let a = if is_stranger(a) || pools.contains(&a) {
            v4(pick(&ANCHORS4, idx))
        } else {
            a
        };
        (IpAddr::V4(a), false)
    } else {
        let a = match class % 8 {
            4 if !statics6.is_empty() => pick(&statics6, idx),
            3 | 5 => {
                // Toward the NAT64 prefix, embedding an anchor.
                let e = flip4(v4(pick(&ANCHORS4, idx)), s.bits, s.flip).octets();
                let e = if is_stranger(Ipv4Addr::from(e)) {
                    [10, 0, 0, 1]
                } else {
                    e
                };
                Ipv6Addr::new(
                    0x64,
                    0xff9b,
                    0,
                    0,
                    0,
                    0,
                    u16::from_be_bytes([e[0], e[1]]),
                    u16::from_be_bytes([e[2], e[3]]),
                )
            }
            6 if !routes.is_empty() => match inside_prefix(&pick(&routes, idx), s.bits) {
                IpAddr::V6(a) => a,
                IpAddr::V4(_) => v6(pick(&ANCHORS6, idx)),
            },
            7 => v6(pick(&ANCHORS6, idx)),
            _ => flip6(v6(pick(&ANCHORS6, idx)), s.bits, s.flip),
        };
        // Keep strangers out of NAT64 destinations too.
        let o = a.octets();
        let a = if o[..12] == [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0]
            && o[12..15] == [192, 0, 2]
        {
            v6(pick(&ANCHORS6, idx))
        } else {
            a
        };
        (IpAddr::V6(a), false)
    }
}

fn l4_of(s: &PktSpec) -> L4 {
    let sport = pick(&SPORTS, s.ports.0);
    let dport = pick(&DPORTS, s.ports.1);
    let payload = s.payload.clone();
    match s.l4 % 3 {
        0 => L4::Udp {
            sport,
            dport,
            csum: s.udp_csum || s.v6,
            payload,
        },
        1 => L4::Tcp {
            sport,
            dport,
            seq: s.misc.3,
            ack: s.misc.3.rotate_left(7),
            flags: pick(&TCP_FLAGS, s.flags),
            window: 0xffff,
            payload,
        },
        _ => L4::Echo {
            reply: s.flags.is_multiple_of(5),
            ident: sport,
            seq: s.misc.1,
            payload,
        },
    }
}

fn ttl_of(s: &PktSpec) -> u8 {
    match s.ttl % 16 {
        0 | 1 => 1,
        2 => 2,
        3 => 0,
        _ => 64,
    }
}

/// An IP frame toward `dst`.
fn ip_frame(model: &Model, s: &PktSpec, dst: IpAddr, pool: bool) -> Frame {
    let router = model.node().map(|n| n.router_mac).unwrap_or(router_mac(0));
    let l4 = l4_of(s);
    let net = match dst {
        IpAddr::V4(d) => {
            let src = if pool {
                stranger(s.src)
            } else {
                match s.src % 4 {
                    0 | 1 => v4(pick(&INSIDE4, s.src / 4)),
                    2 => v4(pick(&ANCHORS4, s.src / 4)),
                    _ => stranger(s.src),
                }
            };
            Net::V4 {
                ip: V4 {
                    src,
                    dst: d,
                    ttl: ttl_of(s),
                    tos: s.misc.0,
                    ident: s.misc.1,
                    df: s.misc.2,
                },
                l4,
            }
        }
        IpAddr::V6(d) => {
            let src = if s.src.is_multiple_of(2) {
                v6(pick(&INSIDE6, s.src / 2))
            } else {
                v6(pick(&ANCHORS6, s.src / 2))
            };
            Net::V6 {
                ip: V6 {
                    src,
                    dst: d,
                    hop_limit: ttl_of(s),
                    tclass: s.misc.0,
                    flow: s.misc.3 & 0xf_ffff,
                },
                l4,
            }
        }
    };
    Frame {
        dst: router,
        src: MacAddr([0x02, 0, 0, 0, 0x09, s.src]),
        vlan: None,
        net,
    }
}

/// The ingress port and the frame of a packet spec in `model`.
pub fn build_packet(model: &Model, s: &PktSpec) -> (PortId, Vec<u8>) {
    let uplinks: Vec<PortId> = model
        .node()
        .map(|n| n.uplinks.iter().copied().collect())
        .unwrap_or_default();
    let vpc_ports: Vec<PortId> = model
        .vpcs()
        .values()
        .flat_map(|v| v.ports.iter().copied())
        .collect();
    let port = match s.port % 10 {
        9 => UNKNOWN_PORT,
        4..=8 if !vpc_ports.is_empty() => pick(&vpc_ports, s.port / 10),
        _ if !uplinks.is_empty() => pick(&uplinks, s.port / 10),
        _ => UNKNOWN_PORT,
    };
    let (dst, pool) = dst_of(model, s);
    let mut frame = ip_frame(model, s, dst, pool);
    match s.kind % 16 {
        0 => {
            frame.net = Net::Other {
                ethertype: flow_offload::packet::ethertype::ARP,
                payload: vec![
                    0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 9, 1, 10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0,
                    0, 2,
                ],
            }
        }
        1 => frame.vlan = Some(100),
        2..=5 => {
            // VXLAN toward our VTEP (mostly) with a known or unknown VNI.
            let vpcs: Vec<&Vpc> = model.vpcs().values().collect();
            let (vni_sel, dst_sel, flags_ok) = s.vxlan;
            let vni = match usize::from(vni_sel) % (vpcs.len() + 1) {
                i if i < vpcs.len() => vpcs[i].vni.get(),
                _ => UNKNOWN_VNI,
            };
            let vtep = model.node().map(|n| n.vtep).unwrap_or(v4(VTEPS[0]));
            let outer_dst = if dst_sel % 6 == 0 {
                v4(pick(&REMOTE_VTEPS, dst_sel))
            } else {
                vtep
            };
            let inner = emit(&frame);
            frame = Frame {
                dst: frame.dst,
                src: nh_mac(s.src),
                vlan: None,
                net: Net::V4 {
                    ip: V4 {
                        src: v4(pick(&REMOTE_VTEPS, s.src)),
                        dst: outer_dst,
                        ttl: if s.ttl.is_multiple_of(16) { 1 } else { 64 },
                        tos: 0,
                        ident: s.misc.1,
                        df: true,
                    },
                    l4: L4::Udp {
                        sport: 49152 | u16::from(s.ports.0),
                        dport: VXLAN_PORT,
                        csum: s.udp_csum,
                        payload: vxlan_payload(vni, flags_ok, &inner),
                    },
                },
            };
        }
        _ => {}
    }
    (port, emit(&frame))
}
