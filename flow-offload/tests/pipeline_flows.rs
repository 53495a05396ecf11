//! The software pipeline on whole conversations: NAT round trips, VXLAN decap, meters, ECMP,
//! counters. Output checksums are verified with the packet views; inputs are built with them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flow_offload::model::*;
use flow_offload::packet::{
    self, EthernetFrame, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket, VXLAN_PORT,
};
use flow_offload::soft::pipeline::Counters;
use flow_offload::soft::{DropReason, Pipeline, PipelineLimits, Verdict};

const UPLINK: PortId = PortId(0);
const VPC_PORT: PortId = PortId(1);
const VTEP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const HOST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

fn mac(x: u8) -> MacAddr {
    MacAddr([2, 0, 0, 0, 0, x])
}

fn n(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn route(table: u32, prefix: &str, nexthops: Vec<Nexthop>) -> Change {
    Change::UpsertRoute(Route {
        key: RouteKey {
            table: TableId(table),
            prefix: prefix.parse().unwrap(),
        },
        nexthops,
    })
}

fn gw(port: PortId, last: u8) -> Nexthop {
    Nexthop::Underlay {
        gateway: IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)),
        port,
        mac: mac(last),
    }
}

fn model(extra: &[Change]) -> Model {
    let mut m = Model::new();
    let mut changes = vec![
        Change::SetNode(Node {
            vtep: VTEP,
            router_mac: mac(1),
            uplinks: BTreeSet::from([UPLINK, PortId(2)]),
        }),
        Change::UpsertVpc(Vpc {
            name: n("blue"),
            vni: Vni::new(100).unwrap(),
            table: TableId(10),
            ports: BTreeSet::from([VPC_PORT]),
        }),
        route(254, "0.0.0.0/0", vec![gw(UPLINK, 254)]),
        route(
            10,
            "10.0.0.0/24",
            vec![Nexthop::Underlay {
                gateway: IpAddr::V4(HOST),
                port: VPC_PORT,
                mac: mac(0x10),
            }],
        ),
        route(
            10,
            "fd00::/64",
            vec![Nexthop::Underlay {
                gateway: IpAddr::V6(HOST6),
                port: VPC_PORT,
                mac: mac(0x10),
            }],
        ),
        route(
            10,
            "0.0.0.0/0",
            vec![Nexthop::Vrf {
                table: UNDERLAY_TABLE,
            }],
        ),
        Change::UpsertNat(NatRule {
            name: n("out"),
            vpc: n("blue"),
            kind: NatKind::Napt44 {
                pool: Ipv4Range {
                    first: Ipv4Addr::new(203, 0, 113, 1),
                    last: Ipv4Addr::new(203, 0, 113, 2),
                },
                ports: (1024, 2047),
            },
        }),
        Change::UpsertNat(NatRule {
            name: n("six"),
            vpc: n("blue"),
            kind: NatKind::Nat64 {
                prefix: "64:ff9b::/96".parse().unwrap(),
                pool: Ipv4Range::single(Ipv4Addr::new(203, 0, 113, 9)),
                ports: (1024, 65535),
            },
        }),
    ];
    changes.extend_from_slice(extra);
    m.apply(&changes).unwrap();
    m
}

fn eth(dst: MacAddr, src: MacAddr, ethertype: u16, payload_len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 14 + payload_len];
    let mut e = EthernetFrame::new_unchecked(&mut f[..]);
    packet::EthernetRepr {
        src: src.0,
        dst: dst.0,
        ethertype,
    }
    .emit(&mut e);
    f
}

/// Ethernet/IPv4/UDP or TCP with valid checksums.
fn l4_v4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), tcp_flags: Option<u8>, ttl: u8) -> Vec<u8> {
    let l4_len = if tcp_flags.is_some() { 20 } else { 8 + 4 };
    let mut f = eth(mac(1), mac(0x10), packet::ethertype::IPV4, 20 + l4_len);
    let proto = if tcp_flags.is_some() { 6 } else { 17 };
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut f[14..]);
        packet::Ipv4Repr {
            src: src.0,
            dst: dst.0,
            protocol: proto,
            ttl,
            dscp_ecn: 0,
            ident: 1,
            dont_frag: true,
            payload_len: l4_len,
        }
        .emit(&mut ip);
        ip.fill_checksum();
    }
    fill_l4(&mut f[34..], src, dst, tcp_flags);
    f
}

fn fill_l4<A: packet::PseudoHeader>(l4: &mut [u8], src: (A, u16), dst: (A, u16), tcp: Option<u8>) {
    match tcp {
        Some(flags) => {
            let mut t = TcpPacket::new_unchecked(&mut l4[..]);
            packet::TcpRepr {
                src_port: src.1,
                dst_port: dst.1,
                seq: 1000,
                ack: 0,
                flags,
                window: 1024,
            }
            .emit(&mut t);
            t.fill_checksum(src.0, dst.0);
        }
        None => {
            let len = l4.len();
            l4[len - 4..].copy_from_slice(b"ping");
            let mut u = UdpPacket::new_unchecked(&mut l4[..]);
            packet::UdpRepr {
                src_port: src.1,
                dst_port: dst.1,
            }
            .emit(&mut u);
            u.set_len(len as u16);
            u.fill_checksum(src.0, dst.0);
        }
    }
}

fn l4_v6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), tcp_flags: Option<u8>) -> Vec<u8> {
    let l4_len = if tcp_flags.is_some() { 20 } else { 12 };
    let mut f = eth(mac(1), mac(0x10), packet::ethertype::IPV6, 40 + l4_len);
    {
        let mut ip = Ipv6Packet::new_unchecked(&mut f[14..]);
        packet::Ipv6Repr {
            src: src.0,
            dst: dst.0,
            next_header: if tcp_flags.is_some() { 6 } else { 17 },
            hop_limit: 64,
            traffic_class: 0,
            flow_label: 0,
            payload_len: l4_len,
        }
        .emit(&mut ip);
    }
    fill_l4(&mut f[54..], src, dst, tcp_flags);
    f
}

/// (src, sport, dst, dport, ttl) of an IPv4 TCP/UDP frame, checking every checksum.
fn v4_fields(f: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16, u8) {
    let ip = Ipv4Packet::new_checked(&f[14..]).unwrap();
    assert!(ip.verify_checksum(), "IPv4 header checksum");
    let (s, d) = (ip.src_addr(), ip.dst_addr());
    let (sp, dp) = match ip.protocol() {
        6 => {
            let t = TcpPacket::new_checked(ip.payload()).unwrap();
            assert!(t.verify_checksum(s, d), "TCP checksum");
            (t.src_port(), t.dst_port())
        }
        17 => {
            let u = UdpPacket::new_checked(ip.payload()).unwrap();
            assert!(u.verify_checksum(s, d), "UDP checksum");
            (u.src_port(), u.dst_port())
        }
        p => panic!("unexpected protocol {p}"),
    };
    (s, sp, d, dp, ip.ttl())
}

fn v6_fields(f: &[u8]) -> (Ipv6Addr, u16, Ipv6Addr, u16, u8) {
    let ip = Ipv6Packet::new_checked(&f[14..]).unwrap();
    let (s, d) = (ip.src_addr(), ip.dst_addr());
    let (sp, dp) = match ip.next_header() {
        6 => {
            let t = TcpPacket::new_checked(ip.payload()).unwrap();
            assert!(t.verify_checksum(s, d), "TCP checksum");
            (t.src_port(), t.dst_port())
        }
        17 => {
            let u = UdpPacket::new_checked(ip.payload()).unwrap();
            assert!(u.verify_checksum(s, d), "UDP checksum");
            (u.src_port(), u.dst_port())
        }
        p => panic!("unexpected next header {p}"),
    };
    (s, sp, d, dp, ip.hop_limit())
}

fn pipeline(m: &Model) -> Pipeline {
    Pipeline::new(m, PipelineLimits::default(), 42).unwrap()
}

#[test]
fn napt44_udp_round_trip() {
    let m = model(&[]);
    let mut p = pipeline(&m);
    let mut out = l4_v4((HOST, 5000), (SERVER, 53), None, 64);
    assert_eq!(p.process(&mut out, VPC_PORT, None, 1), Verdict::Tx(UPLINK));
    let (src, sport, dst, dport, ttl) = v4_fields(&out);
    assert!(src == Ipv4Addr::new(203, 0, 113, 1) || src == Ipv4Addr::new(203, 0, 113, 2));
    assert!((1024..=2047).contains(&sport));
    assert_eq!((dst, dport, ttl), (SERVER, 53, 63));
    assert_eq!(&out[0..6], &mac(254).0, "gateway MAC");
    assert_eq!(&out[6..12], &mac(1).0, "router MAC");

    let mut reply = l4_v4((SERVER, 53), (src, sport), None, 60);
    assert_eq!(
        p.process(&mut reply, UPLINK, None, 2),
        Verdict::Tx(VPC_PORT)
    );
    assert_eq!(v4_fields(&reply), (SERVER, 53, HOST, 5000, 59));
    assert_eq!(&reply[0..6], &mac(0x10).0);

    // Address-and-port-dependent filtering: another remote cannot use the mapping.
    let mut stranger = l4_v4((Ipv4Addr::new(198, 51, 100, 8), 53), (src, sport), None, 60);
    assert_eq!(
        p.process(&mut stranger, UPLINK, None, 3),
        Verdict::Drop(DropReason::NoSession)
    );
    // Endpoint-independent mapping: the same inside endpoint keeps its outside endpoint.
    let mut again = l4_v4((HOST, 5000), (Ipv4Addr::new(198, 51, 100, 9), 53), None, 64);
    assert_eq!(
        p.process(&mut again, VPC_PORT, None, 4),
        Verdict::Tx(UPLINK)
    );
    let (src2, sport2, ..) = v4_fields(&again);
    assert_eq!((src2, sport2), (src, sport));
}

#[test]
fn napt44_port_pool_exhaustion_drops_with_a_reason() {
    let m = model(&[]);
    let mut p = pipeline(&m);
    // Paired pooling (RFC 4787 REQ-2): one inside host always gets the same outside address,
    // so one host can use at most the 1024 ports of that address.
    let mut outside = BTreeSet::new();
    let mut exhausted = 0;
    for port in 0..1100u16 {
        let mut f = l4_v4((HOST, 10_000 + port), (SERVER, 53), None, 64);
        match p.process(&mut f, VPC_PORT, None, 1) {
            Verdict::Tx(_) => {
                let (src, sport, ..) = v4_fields(&f);
                assert!(outside.insert((src, sport)), "outside endpoint reused");
            }
            Verdict::Drop(DropReason::NatExhausted) => exhausted += 1,
            v => panic!("unexpected {v:?}"),
        }
    }
    assert_eq!(outside.len(), 1024);
    assert_eq!(exhausted, 1100 - 1024);
    let addrs: BTreeSet<Ipv4Addr> = outside.iter().map(|(a, _)| *a).collect();
    assert_eq!(addrs.len(), 1, "paired pooling");
    // Another host still gets mapped.
    let other = (1..50).map(|i| Ipv4Addr::new(10, 0, 0, 10 + i)).find(|h| {
        let mut f = l4_v4((*h, 1), (SERVER, 53), None, 64);
        matches!(p.process(&mut f, VPC_PORT, None, 1), Verdict::Tx(_))
    });
    assert!(other.is_some());
}

#[test]
fn nat64_tcp_round_trip() {
    let m = model(&[]);
    let mut p = pipeline(&m);
    let server6 = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0xc633, 0x6407);
    let mut syn = l4_v6((HOST6, 4000), (server6, 80), Some(0x02));
    assert_eq!(p.process(&mut syn, VPC_PORT, None, 1), Verdict::Tx(UPLINK));
    let (src, sport, dst, dport, ttl) = v4_fields(&syn);
    assert_eq!(src, Ipv4Addr::new(203, 0, 113, 9));
    assert_eq!((dst, dport, ttl), (SERVER, 80, 63));
    assert_eq!(u16::from_be_bytes([syn[12], syn[13]]), 0x0800);

    let mut synack = l4_v4((SERVER, 80), (src, sport), Some(0x12), 60);
    assert_eq!(
        p.process(&mut synack, UPLINK, None, 2),
        Verdict::Tx(VPC_PORT)
    );
    assert_eq!(u16::from_be_bytes([synack[12], synack[13]]), 0x86dd);
    assert_eq!(v6_fields(&synack), (server6, 80, HOST6, 4000, 59));
}

#[test]
fn vxlan_to_our_vtep_is_decapsulated_into_the_vpc() {
    let m = model(&[]);
    let mut p = pipeline(&m);
    let inner = l4_v4((Ipv4Addr::new(10, 9, 0, 1), 7), (HOST, 7), None, 30);
    let outer_len = 20 + 8 + 8 + inner.len();
    let mut f = eth(mac(1), mac(254), packet::ethertype::IPV4, outer_len);
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut f[14..]);
        packet::Ipv4Repr {
            src: Ipv4Addr::new(192, 0, 2, 2),
            dst: VTEP,
            protocol: 17,
            ttl: 64,
            dscp_ecn: 0,
            ident: 0,
            dont_frag: true,
            payload_len: outer_len - 20,
        }
        .emit(&mut ip);
        ip.fill_checksum();
    }
    f[34..36].copy_from_slice(&49152u16.to_be_bytes());
    f[36..38].copy_from_slice(&VXLAN_PORT.to_be_bytes());
    f[38..40].copy_from_slice(&((outer_len - 20) as u16).to_be_bytes());
    f[42] = 0x08;
    f[46..49].copy_from_slice(&100u32.to_be_bytes()[1..]);
    f[50..].copy_from_slice(&inner);
    let mut unknown = f.clone();
    unknown[48] = 101;

    assert_eq!(p.process(&mut f, UPLINK, None, 1), Verdict::Tx(VPC_PORT));
    assert_eq!(f.len(), inner.len());
    assert_eq!(v4_fields(&f), (Ipv4Addr::new(10, 9, 0, 1), 7, HOST, 7, 29));
    assert_eq!(
        p.process(&mut unknown, UPLINK, None, 1),
        Verdict::Drop(DropReason::UnknownVni)
    );
}

#[test]
fn vpc_meter_holds_a_flood_to_its_rate() {
    let cir = 1_000_000u64;
    let cbs = 10_000u64;
    let m = model(&[Change::UpsertMeter(Meter {
        name: n("cap"),
        profile: MeterProfile::TrTcm {
            cir,
            cbs,
            pir: cir,
            pbs: cbs,
        },
        target: MeterTarget::Vpc(n("blue")),
    })]);
    let mut p = pipeline(&m);
    let template = l4_v4((HOST, 1), (Ipv4Addr::new(10, 0, 0, 3), 2), None, 64);
    let mut passed = 0u64;
    // 10× the rate for one simulated second.
    let len = template.len() as u64;
    let count = 10 * cir / len;
    for i in 0..count {
        let mut f = template.clone();
        let now = i * 1_000_000_000 / count;
        if let Verdict::Tx(_) = p.process(&mut f, VPC_PORT, None, now) {
            passed += len;
        }
    }
    let allowed = cbs + cir;
    let err = passed.abs_diff(allowed) as f64 / allowed as f64;
    assert!(
        err < 0.01,
        "passed {passed} bytes, expected about {allowed}"
    );
}

#[test]
fn ttl_expiry_non_ip_and_unknown_ports() {
    let m = model(&[]);
    let mut p = pipeline(&m);
    let mut f = l4_v4((HOST, 1), (Ipv4Addr::new(10, 0, 0, 3), 2), None, 1);
    assert_eq!(
        p.process(&mut f, VPC_PORT, None, 0),
        Verdict::Drop(DropReason::TtlExceeded)
    );
    let mut arp = eth(MacAddr([0xff; 6]), mac(0x10), packet::ethertype::ARP, 28);
    assert_eq!(p.process(&mut arp, VPC_PORT, None, 0), Verdict::ToHost);
    let mut f = l4_v4((HOST, 1), (SERVER, 2), None, 64);
    assert_eq!(
        p.process(&mut f, PortId(9), None, 0),
        Verdict::Drop(DropReason::UnknownPort)
    );
    let mut junk = vec![0u8; 20];
    junk[12] = 0x08;
    assert_eq!(
        p.process(&mut junk, UPLINK, None, 0),
        Verdict::Drop(DropReason::Malformed)
    );
}

#[test]
fn ecmp_keeps_flows_together_and_uses_every_next_hop() {
    let m = model(&[route(
        254,
        "198.51.100.0/24",
        vec![gw(UPLINK, 250), gw(PortId(2), 251)],
    )]);
    let mut p = pipeline(&m);
    let mut seen = HashSet::new();
    for sport in 0..200u16 {
        let mut first = None;
        for _ in 0..3 {
            let mut f = l4_v4(
                (Ipv4Addr::new(192, 0, 2, 77), sport),
                (SERVER, 80),
                None,
                64,
            );
            let v = p.process(&mut f, UPLINK, None, 0);
            assert!(
                first.is_none() || first == Some(v),
                "a flow changed next hop"
            );
            first = Some(v);
            seen.insert(v);
        }
    }
    assert_eq!(
        seen,
        HashSet::from([Verdict::Tx(UPLINK), Verdict::Tx(PortId(2))])
    );
}

#[test]
fn routes_count_what_they_forward_and_updates_apply_in_place() {
    let mut m = model(&[]);
    let mut p = pipeline(&m);
    let key = RouteKey {
        table: TableId(10),
        prefix: "10.0.0.0/24".parse().unwrap(),
    };
    for _ in 0..5 {
        let mut f = l4_v4((Ipv4Addr::new(10, 0, 0, 9), 1), (HOST, 2), None, 64);
        assert_eq!(p.process(&mut f, VPC_PORT, None, 0), Verdict::Tx(VPC_PORT));
    }
    let len = l4_v4((HOST, 1), (HOST, 2), None, 64).len() as u64;
    assert_eq!(
        p.route_counters(&key),
        Some(Counters {
            packets: 5,
            bytes: 5 * len
        })
    );
    // Replace the route by a blackhole, then delete it.
    m.apply(&[route(10, "10.0.0.0/24", vec![Nexthop::Blackhole])])
        .unwrap();
    p.update_route(&m, key).unwrap();
    let mut f = l4_v4((Ipv4Addr::new(10, 0, 0, 9), 1), (HOST, 2), None, 64);
    assert_eq!(
        p.process(&mut f, VPC_PORT, None, 0),
        Verdict::Drop(DropReason::Blackhole)
    );
    m.apply(&[Change::DeleteRoute(key)]).unwrap();
    p.update_route(&m, key).unwrap();
    assert_eq!(p.route_counters(&key), None);
    // Now 10.0.0.2 breaks out to the underlay through NAPT.
    let mut f = l4_v4((Ipv4Addr::new(10, 0, 0, 9), 1), (HOST, 2), None, 64);
    assert_eq!(p.process(&mut f, VPC_PORT, None, 0), Verdict::Tx(UPLINK));
}

/// A rebuild (a new VPC, meter or NAT rule elsewhere) must not cost established flows their
/// bindings: the new pipeline takes the NAT tables of the rules that did not change.
#[test]
fn rebuild_carries_nat_sessions_of_unchanged_rules() {
    let m1 = model(&[]);
    let mut p1 = pipeline(&m1);
    // A NAPT44 UDP flow and a NAT64 TCP flow, established on the old pipeline.
    let mut out = l4_v4((HOST, 5000), (SERVER, 53), None, 64);
    assert_eq!(p1.process(&mut out, VPC_PORT, None, 1), Verdict::Tx(UPLINK));
    let (src, sport, ..) = v4_fields(&out);
    let server6 = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0xc633, 0x6407);
    let mut syn = l4_v6((HOST6, 4000), (server6, 80), Some(0x02));
    assert_eq!(p1.process(&mut syn, VPC_PORT, None, 1), Verdict::Tx(UPLINK));
    let (src6, sport6, ..) = v4_fields(&syn);

    // The model gains a VPC and changes the NAT64 rule's pool: a rebuild. NAPT44 "out" is
    // unchanged and keeps its sessions; "six" changed and starts empty.
    let m2 = model(&[
        Change::UpsertVpc(Vpc {
            name: n("green"),
            vni: Vni::new(300).unwrap(),
            table: TableId(30),
            ports: BTreeSet::from([PortId(3)]),
        }),
        Change::UpsertNat(NatRule {
            name: n("six"),
            vpc: n("blue"),
            kind: NatKind::Nat64 {
                prefix: "64:ff9b::/96".parse().unwrap(),
                pool: Ipv4Range::single(Ipv4Addr::new(203, 0, 113, 10)),
                ports: (1024, 65535),
            },
        }),
    ]);
    let mut p2 = pipeline(&m2);
    let carry = p2.carry_nat_from(&mut p1);
    assert_eq!(carry.carried, vec![n("out")]);
    assert_eq!(carry.sessions, 1);
    assert_eq!(carry.dropped, vec![(n("six"), 1)]);

    // The server's reply to the old binding reaches the host through the new pipeline.
    let mut reply = l4_v4((SERVER, 53), (src, sport), None, 60);
    assert_eq!(
        p2.process(&mut reply, UPLINK, None, 2),
        Verdict::Tx(VPC_PORT)
    );
    assert_eq!(v4_fields(&reply), (SERVER, 53, HOST, 5000, 59));
    // The host's next packet keeps its outside address and port.
    let mut again = l4_v4((HOST, 5000), (SERVER, 53), None, 64);
    assert_eq!(
        p2.process(&mut again, VPC_PORT, None, 3),
        Verdict::Tx(UPLINK)
    );
    assert_eq!(v4_fields(&again).0, src);
    assert_eq!(v4_fields(&again).1, sport);
    // The changed NAT64 rule's old binding is gone (its address left the pool): the answer
    // no longer reaches the VPC.
    let mut synack = l4_v4((SERVER, 80), (src6, sport6), Some(0x12), 60);
    assert_ne!(
        p2.process(&mut synack, UPLINK, None, 2),
        Verdict::Tx(VPC_PORT)
    );
    // The old pipeline was left with the empty tables.
    let mut late = l4_v4((SERVER, 53), (src, sport), None, 60);
    assert_eq!(
        p1.process(&mut late, UPLINK, None, 4),
        Verdict::Drop(DropReason::NoSession)
    );
}

/// A rule that keeps its name but moves to another pool starts empty: its old bindings may be
/// outside the new pool.
#[test]
fn rebuild_does_not_carry_a_rule_whose_pool_changed() {
    let m1 = model(&[]);
    let mut p1 = pipeline(&m1);
    let mut out = l4_v4((HOST, 5000), (SERVER, 53), None, 64);
    assert_eq!(p1.process(&mut out, VPC_PORT, None, 1), Verdict::Tx(UPLINK));
    let m2 = model(&[Change::UpsertNat(NatRule {
        name: n("out"),
        vpc: n("blue"),
        kind: NatKind::Napt44 {
            pool: Ipv4Range::single(Ipv4Addr::new(203, 0, 113, 7)),
            ports: (1024, 2047),
        },
    })]);
    let mut p2 = pipeline(&m2);
    let carry = p2.carry_nat_from(&mut p1);
    assert_eq!(carry.carried, vec![n("six")]);
    assert_eq!(carry.dropped, vec![(n("out"), 1)]);
}
