//! The pipeline benches' model and frames, shared by `pipeline.rs` (software buffers) and
//! `pipeline_dpdk.rs` (DPDK mbufs through ports), which include this file with `#[path]`.
//!
//! The model: a node with 2 uplinks; 1M IPv4 underlay routes (`internet_v4`) and 200k IPv6
//! ones (`internet_v6`), each with one underlay next hop out of 8 gateways (4 per uplink); and
//! four VPCs:
//! - `nat` (port 10): `0.0.0.0/0 → Vrf{underlay}` with a NAPT44 pool of 4 addresses, and a
//!   NAT64 rule for `64:ff9b::/96` with its own pool;
//! - `metered` (port 20): `0.0.0.0/0 → Vrf{underlay}`, no NAT, a VPC meter at 80 Gbit/s;
//! - `plain` (port 30): the same without the meter (the baseline for `metered`);
//! - `overlay` (port 40): 256 routes `10.40.x.0/24` with VXLAN next hops to 16 remote VTEPs,
//!   which resolve through the underlay.
//!
//! Each case has 4096 template frames with distinct random destinations the underlay covers.
//! IPv4 frames are 60 bytes (64 on the wire with the FCS); IPv6 ones 80 bytes.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::collections::BTreeSet;
use std::time::Instant;

use bench::tables::{internet_v4, internet_v6, lookup_keys_v4};
use flow_offload::model::{
    Change, Ipv4Range, MacAddr, Meter, MeterProfile, MeterTarget, Model, Name, NatKind, NatRule,
    Nexthop, Node, PortId, Prefix, Route, RouteKey, TableId, Vni, Vpc, UNDERLAY_TABLE,
};
use flow_offload::packet::{
    ethertype, ip_proto, EthernetFrame, EthernetRepr, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr,
    UdpPacket, UdpRepr,
};
use flow_offload::soft::{DropReason, HeadroomBuf, PacketBuf, Pipeline, PipelineLimits, Verdict};

pub const V4_ROUTES: usize = 1_000_000;
pub const V6_ROUTES: usize = 200_000;
pub const SEED: u64 = 0x5eed;
pub const BATCH: usize = 10_000;
/// Packets per burst.
pub const BURST: usize = 32;
/// Distinct template frames per bench (a power of two).
pub const TEMPLATES: usize = 4096;
pub const HEADROOM: usize = 128;
pub const BUF_SIZE: usize = 2048;
/// UDP payload bytes: 14 + 20 + 8 + 18 = 60-byte IPv4 frames.
pub const PAYLOAD: usize = 18;

pub const UPLINKS: [PortId; 2] = [PortId(0), PortId(1)];
pub const NAT_PORT: PortId = PortId(10);
pub const METERED_PORT: PortId = PortId(20);
pub const PLAIN_PORT: PortId = PortId(30);
pub const OVERLAY_PORT: PortId = PortId(40);
pub const GATEWAYS: usize = 8;
pub const VTEP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const ROUTER_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x01]);
pub const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x01];
pub const NAPT_POOL: Ipv4Range = Ipv4Range {
    first: Ipv4Addr::new(203, 0, 113, 0),
    last: Ipv4Addr::new(203, 0, 113, 3),
};
pub const NAT64_POOL: Ipv4Range = Ipv4Range {
    first: Ipv4Addr::new(203, 0, 113, 16),
    last: Ipv4Addr::new(203, 0, 113, 19),
};
/// The well-known NAT64 prefix 64:ff9b::/96.
pub const NAT64_PREFIX: u128 = 0x0064_ff9b << 96;

pub fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

pub fn underlay_nh(i: usize, v6: bool) -> Nexthop {
    let g = i % GATEWAYS;
    let gateway = if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, g as u16 + 1))
    } else {
        IpAddr::V4(Ipv4Addr::new(100, 64, 0, g as u8 + 1))
    };
    Nexthop::Underlay {
        gateway,
        port: UPLINKS[g % UPLINKS.len()],
        mac: MacAddr([0x02, 0, 0, 0, 0x01, g as u8 + 1]),
    }
}

pub fn route(table: TableId, prefix: Prefix, nh: Nexthop) -> Change {
    Change::UpsertRoute(Route {
        key: RouteKey { table, prefix },
        nexthops: vec![nh],
    })
}

pub fn breakout(table: u32) -> Change {
    route(
        TableId(table),
        "0.0.0.0/0".parse().unwrap(),
        Nexthop::Vrf {
            table: UNDERLAY_TABLE,
        },
    )
}

pub fn build_model(v4: &[(u32, u8)]) -> Model {
    let mut changes = vec![Change::SetNode(Node {
        vtep: VTEP,
        router_mac: ROUTER_MAC,
        uplinks: UPLINKS.into_iter().collect(),
    })];
    changes.extend(v4.iter().enumerate().map(|(i, &(a, l))| {
        route(
            UNDERLAY_TABLE,
            Prefix::v4(Ipv4Addr::from(a), l).unwrap(),
            underlay_nh(i, false),
        )
    }));
    changes.extend(
        internet_v6(V6_ROUTES, SEED + 1)
            .into_iter()
            .enumerate()
            .map(|(i, (a, l))| {
                route(
                    UNDERLAY_TABLE,
                    Prefix::v6(Ipv6Addr::from(a), l).unwrap(),
                    underlay_nh(i, true),
                )
            }),
    );
    let vpc = |n: &str, id: u32, port: PortId| {
        Change::UpsertVpc(Vpc {
            name: name(n),
            vni: Vni::new(1000 + id).unwrap(),
            table: TableId(id),
            ports: BTreeSet::from([port]),
        })
    };
    changes.extend([
        vpc("nat", 100, NAT_PORT),
        vpc("metered", 200, METERED_PORT),
        vpc("plain", 300, PLAIN_PORT),
        vpc("overlay", 400, OVERLAY_PORT),
        breakout(100),
        breakout(200),
        breakout(300),
        Change::UpsertNat(NatRule {
            name: name("nat-napt44"),
            vpc: name("nat"),
            kind: NatKind::Napt44 {
                pool: NAPT_POOL,
                ports: (1024, 65535),
            },
        }),
        Change::UpsertNat(NatRule {
            name: name("nat-nat64"),
            vpc: name("nat"),
            kind: NatKind::Nat64 {
                prefix: Prefix::v6(Ipv6Addr::from(NAT64_PREFIX), 96).unwrap(),
                pool: NAT64_POOL,
                ports: (1024, 65535),
            },
        }),
        Change::UpsertMeter(Meter {
            name: name("metered-ingress"),
            // 80 Gbit/s with 1 GiB bursts: a single core stays far below it.
            profile: MeterProfile::TrTcm {
                cir: 10_000_000_000,
                cbs: 1 << 30,
                pir: 10_000_000_000,
                pbs: 1 << 30,
            },
            target: MeterTarget::Vpc(name("metered")),
        }),
        // The remote VTEPs' underlay route.
        route(
            UNDERLAY_TABLE,
            "198.51.100.0/24".parse().unwrap(),
            underlay_nh(1, false),
        ),
    ]);
    changes.extend((0..256u32).map(|x| {
        route(
            TableId(400),
            Prefix::v4(Ipv4Addr::new(10, 40, x as u8, 0), 24).unwrap(),
            Nexthop::Vxlan {
                vni: Vni::new(1400).unwrap(),
                remote_vtep: Ipv4Addr::new(198, 51, 100, 1 + (x % 16) as u8),
                router_mac: MacAddr([0x02, 0, 0, 0, 0x04, 1 + (x % 16) as u8]),
            },
        )
    }));
    let mut model = Model::new();
    for chunk in changes.chunks(BATCH) {
        model.apply(chunk).unwrap();
    }
    model
}

/// An Ethernet/IPv4/UDP frame to our router MAC with a valid UDP checksum.
pub fn udp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut f = vec![0u8; EthernetRepr::HEADER_LEN + Ipv4Repr::HEADER_LEN + 8 + PAYLOAD];
    EthernetRepr {
        src: HOST_MAC,
        dst: ROUTER_MAC.0,
        ethertype: ethertype::IPV4,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut f[..]));
    let ip = &mut f[EthernetRepr::HEADER_LEN..];
    Ipv4Repr {
        src,
        dst,
        protocol: ip_proto::UDP,
        ttl: 64,
        dscp_ecn: 0,
        ident: 0,
        dont_frag: true,
        payload_len: 8 + PAYLOAD,
    }
    .emit(&mut Ipv4Packet::new_unchecked(&mut ip[..]));
    let mut udp = UdpPacket::new_unchecked(&mut ip[Ipv4Repr::HEADER_LEN..]);
    UdpRepr {
        src_port: sport,
        dst_port: dport,
    }
    .emit(&mut udp);
    for (i, b) in udp.payload_mut().iter_mut().enumerate() {
        *b = i as u8;
    }
    udp.fill_checksum(src, dst);
    f
}

/// An Ethernet/IPv6/UDP frame to our router MAC with a valid UDP checksum.
pub fn udp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut f = vec![0u8; EthernetRepr::HEADER_LEN + Ipv6Repr::HEADER_LEN + 8 + PAYLOAD];
    EthernetRepr {
        src: HOST_MAC,
        dst: ROUTER_MAC.0,
        ethertype: ethertype::IPV6,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut f[..]));
    let ip = &mut f[EthernetRepr::HEADER_LEN..];
    Ipv6Repr {
        src,
        dst,
        next_header: ip_proto::UDP,
        hop_limit: 64,
        traffic_class: 0,
        flow_label: 0,
        payload_len: 8 + PAYLOAD,
    }
    .emit(&mut Ipv6Packet::new_unchecked(&mut ip[..]));
    let mut udp = UdpPacket::new_unchecked(&mut ip[Ipv6Repr::HEADER_LEN..]);
    UdpRepr {
        src_port: sport,
        dst_port: dport,
    }
    .emit(&mut udp);
    for (i, b) in udp.payload_mut().iter_mut().enumerate() {
        *b = i as u8;
    }
    udp.fill_checksum(src, dst);
    f
}

/// `TEMPLATES` random destinations the underlay table covers, outside our own addresses.
pub fn destinations(model: &Model, v4: &[(u32, u8)]) -> Vec<Ipv4Addr> {
    let ours = |a: Ipv4Addr| a == VTEP || NAPT_POOL.contains(a) || NAT64_POOL.contains(a);
    let dsts: Vec<Ipv4Addr> = lookup_keys_v4(v4, TEMPLATES * 2, SEED + 2)
        .into_iter()
        .map(Ipv4Addr::from)
        .filter(|a| !ours(*a) && model.lookup(UNDERLAY_TABLE, IpAddr::V4(*a)).is_some())
        .take(TEMPLATES)
        .collect();
    assert_eq!(dsts.len(), TEMPLATES, "not enough covered destinations");
    dsts
}

/// A host address numbered `i` inside `10.net.0.0/16`.
pub fn host(net: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, net, (i >> 8) as u8, i as u8)
}

/// One benchmark's input: frames and the port they arrive on.
pub struct Case {
    pub name: &'static str,
    pub ingress: PortId,
    pub templates: Vec<Vec<u8>>,
    /// Bytes the pipeline adds to each frame (VXLAN encapsulation) or removes (NAT64).
    pub growth: isize,
    /// The verdict is allowed to be this drop instead of `Tx` (with a warning): for a path
    /// whose library code is known to be unfinished.
    pub tolerated: Option<DropReason>,
}

pub fn now_ns(clock: &Instant) -> u64 {
    clock.elapsed().as_nanos() as u64
}

/// Processes every template once and checks the verdicts. Returns whether the case is
/// measuring its tolerated drop instead of forwarding.
pub fn precheck(p: &mut Pipeline, case: &Case, clock: &Instant) -> bool {
    let mut buf = HeadroomBuf::new(BUF_SIZE, HEADROOM);
    let mut tolerated = 0usize;
    for (i, t) in case.templates.iter().enumerate() {
        assert!(buf.load(t, HEADROOM), "template does not fit");
        let v = p.process(&mut buf, case.ingress, None, now_ns(clock));
        match v {
            Verdict::Tx(port) if UPLINKS.contains(&port) => {
                let want = t.len() as isize + case.growth;
                assert_eq!(
                    buf.data().len() as isize,
                    want,
                    "{}: template {i} forwarded with an unexpected length",
                    case.name
                );
            }
            Verdict::Drop(r) if Some(r) == case.tolerated => tolerated += 1,
            other => panic!(
                "{}: template {i} should be sent on an uplink, got {other:?}",
                case.name
            ),
        }
    }
    if tolerated == 0 {
        return false;
    }
    assert_eq!(
        tolerated,
        case.templates.len(),
        "{}: some but not all templates dropped",
        case.name
    );
    eprintln!(
        "WARNING: {}: every packet is dropped with {:?}; the bench measures the drop \
         path (is packet::xlat still a stub?), not forwarding",
        case.name,
        case.tolerated.unwrap()
    );
    true
}

/// Every case of the pipeline benches, over one model.
pub struct Cases {
    pub forward: Case,
    pub forward_hot: Case,
    pub nat44: Case,
    pub nat64: Case,
    pub metered: Case,
    pub plain: Case,
    pub vxlan: Case,
}

/// Builds the model (printing how long it took), its pipeline and every case's templates.
pub fn setup(bench: &str) -> (Pipeline, Cases) {
    let start = Instant::now();
    let v4 = internet_v4(V4_ROUTES, SEED);
    let model = build_model(&v4);
    eprintln!(
        "{bench}: model of {} routes built in {:.2} s",
        model.routes().len(),
        start.elapsed().as_secs_f64()
    );
    let start = Instant::now();
    let p = Pipeline::new(&model, PipelineLimits::default(), SEED).unwrap();
    eprintln!(
        "{bench}: tables built in {:.2} s",
        start.elapsed().as_secs_f64()
    );
    let dsts = destinations(&model, &v4);
    drop(v4);
    let case = |name, ingress, growth, f: &dyn Fn(usize, Ipv4Addr) -> Vec<u8>| Case {
        name,
        ingress,
        templates: dsts.iter().enumerate().map(|(i, d)| f(i, *d)).collect(),
        growth,
        tolerated: None,
    };
    let forward = case("ipv4_forward", UPLINKS[0], 0, &|i, d| {
        udp4(
            Ipv4Addr::new(198, 18, (i >> 8) as u8, i as u8),
            d,
            40000,
            443,
        )
    });
    let nat44 = case("nat44_napt", NAT_PORT, 0, &|i, d| {
        udp4(host(1, i), d, 40000, 443)
    });
    let mut nat64 = case("nat64", NAT_PORT, -20, &|i, d| {
        let src = Ipv6Addr::from((0x2001_0db8_0100u128 << 80) | i as u128);
        let dst = Ipv6Addr::from(NAT64_PREFIX | u128::from(u32::from(d)));
        udp6(src, dst, 40000, 443)
    });
    nat64.tolerated = Some(DropReason::Untranslatable);
    let metered = case("metered", METERED_PORT, 0, &|i, d| {
        udp4(host(2, i), d, 40000, 443)
    });
    let plain = case("vpc_breakout", PLAIN_PORT, 0, &|i, d| {
        udp4(host(3, i), d, 40000, 443)
    });
    let vxlan = case("vxlan_encap", OVERLAY_PORT, 50, &|i, _| {
        // Destinations spread over the 256 overlay routes (and so over the 16 VTEPs).
        let d = Ipv4Addr::new(10, 40, i as u8, (i >> 8) as u8 + 1);
        udp4(host(4, i), d, 40000, 443)
    });

    // Diagnostic: the forward path with only 32 destinations, so the LPM groups and route
    // entries they touch stay in cache. The gap to `ipv4_forward` is memory stalls.
    let forward_hot = Case {
        name: "ipv4_forward_hot32",
        ingress: forward.ingress,
        templates: forward.templates[..BURST].to_vec(),
        growth: 0,
        tolerated: None,
    };

    (
        p,
        Cases {
            forward,
            forward_hot,
            nat44,
            nat64,
            metered,
            plain,
            vxlan,
        },
    )
}
