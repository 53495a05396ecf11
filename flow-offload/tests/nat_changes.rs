//! Change capture in the NAT tables (the bounded change log an active member drains to feed its
//! standby), the allocation gate of a standby or fenced member, allocation blocks moved at run
//! time, and the pipeline's pair methods: the gate on real packets, the settings carried
//! across a rebuild, changes drained on one pipeline and applied on another.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flow_offload::ha::sync::Event;
use flow_offload::model::*;
use flow_offload::packet::{self, EthernetFrame, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket};
use flow_offload::soft::nat::{
    AllocBlock, ChangeKind, ChangeLogOverflow, NatConfig, NatError, NatFlowKey, NatSessionRecord,
    NatSyncError, NatTable, Proto, SessionChange, Timeouts, XorShift32, TCP_ACK, TCP_FIN, TCP_SYN,
};
use flow_offload::soft::{DropReason, Pipeline, PipelineLimits, Verdict};

const S: u64 = 1_000_000_000;
const POOL: [Ipv4Addr; 2] = [Ipv4Addr::new(203, 0, 113, 1), Ipv4Addr::new(203, 0, 113, 2)];
const R1: (Ipv4Addr, u16) = (Ipv4Addr::new(198, 51, 100, 7), 443);
const R2: (Ipv4Addr, u16) = (Ipv4Addr::new(198, 51, 100, 8), 53);

fn host(h: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 | h)
}

fn table(ports: (u16, u16), cap: usize, block: AllocBlock) -> NatTable<Ipv4Addr> {
    let cfg = NatConfig {
        max_mappings: cap,
        max_sessions: cap,
        pool: POOL.to_vec(),
        port_range: ports,
        timeouts: Timeouts::default(),
        block,
    };
    NatTable::new(cfg, &mut XorShift32(7)).unwrap()
}

fn drain(t: &mut NatTable<Ipv4Addr>) -> Vec<SessionChange<Ipv4Addr>> {
    let mut out = Vec::new();
    t.drain_changes(usize::MAX, &mut out).unwrap();
    out
}

fn kinds(v: &[SessionChange<Ipv4Addr>]) -> Vec<ChangeKind> {
    v.iter().map(|c| c.kind).collect()
}

#[test]
fn the_log_is_off_by_default_and_records_nothing() {
    let mut t = table((1024, 2047), 64, AllocBlock::WHOLE);
    let mut rng = XorShift32(1);
    t.outbound(Proto::Udp, (host(1), 1000), R1, 0, 0, &mut rng)
        .unwrap();
    assert_eq!(t.change_log_stats(), None);
    assert_eq!(t.change_log_capacity(), None);
    assert!(drain(&mut t).is_empty());
}

#[test]
fn creations_state_changes_and_deletions_are_recorded_refreshes_are_not() {
    let mut t = table((1024, 2047), 64, AllocBlock::WHOLE);
    t.enable_change_log(128);
    let mut rng = XorShift32(1);
    let inside = (host(1), 40000);

    // TCP: opened from inside (created), answered (established), data both ways (nothing),
    // FIN from inside (changed), FIN from outside (changed).
    let tr = t
        .outbound(Proto::Tcp, inside, R1, TCP_SYN, S, &mut rng)
        .unwrap();
    let c = drain(&mut t);
    assert_eq!(kinds(&c), [ChangeKind::Created]);
    assert_eq!(
        (c[0].session, c[0].proto, c[0].inside, c[0].remote),
        (tr.session, Proto::Tcp, inside, R1)
    );
    t.inbound(Proto::Tcp, R1, tr.outside, TCP_SYN | TCP_ACK, 2 * S)
        .unwrap();
    assert_eq!(kinds(&drain(&mut t)), [ChangeKind::Changed]);
    for i in 0..100 {
        t.outbound(Proto::Tcp, inside, R1, TCP_ACK, 3 * S + i, &mut rng)
            .unwrap();
        t.inbound(Proto::Tcp, R1, tr.outside, TCP_ACK, 3 * S + i)
            .unwrap();
    }
    assert!(t.refresh(tr.session, 4 * S));
    assert!(drain(&mut t).is_empty(), "refreshes are not changes");
    t.outbound(Proto::Tcp, inside, R1, TCP_FIN | TCP_ACK, 5 * S, &mut rng)
        .unwrap();
    t.inbound(Proto::Tcp, R1, tr.outside, TCP_FIN | TCP_ACK, 5 * S)
        .unwrap();
    assert_eq!(
        kinds(&drain(&mut t)),
        [ChangeKind::Changed, ChangeKind::Changed]
    );

    // UDP: created; more outbound packets change nothing; the first answer makes it
    // established (changed), later answers do not.
    let u = t
        .outbound(Proto::Udp, inside, R2, 0, 6 * S, &mut rng)
        .unwrap();
    t.outbound(Proto::Udp, inside, R2, 0, 6 * S + 1, &mut rng)
        .unwrap();
    t.inbound(Proto::Udp, R2, u.outside, 0, 7 * S).unwrap();
    t.inbound(Proto::Udp, R2, u.outside, 0, 7 * S + 1).unwrap();
    assert_eq!(
        kinds(&drain(&mut t)),
        [ChangeKind::Created, ChangeKind::Changed]
    );

    // Expiry: both sessions swept, each recorded with its flow.
    let later = 7 * S + Timeouts::default().tcp_established_ns + 1;
    assert_eq!(t.expire(later, 100), 2);
    let d = drain(&mut t);
    assert_eq!(kinds(&d), [ChangeKind::Deleted, ChangeKind::Deleted]);
    let flows: HashSet<_> = d.iter().map(|c| (c.proto, c.inside, c.remote)).collect();
    assert_eq!(
        flows,
        HashSet::from([(Proto::Tcp, inside, R1), (Proto::Udp, inside, R2)])
    );
    let st = t.change_log_stats().unwrap();
    assert_eq!((st.recorded, st.lost, st.pending), (8, 0, 0));
}

#[test]
fn a_dead_session_replaced_by_a_packet_is_deleted_then_created() {
    let mut t = table((1024, 2047), 64, AllocBlock::WHOLE);
    t.enable_change_log(16);
    let mut rng = XorShift32(1);
    t.outbound(Proto::Udp, (host(1), 1), R1, 0, 0, &mut rng)
        .unwrap();
    drain(&mut t);
    let later = Timeouts::default().udp_ns + 1;
    t.outbound(Proto::Udp, (host(1), 1), R1, 0, later, &mut rng)
        .unwrap();
    assert_eq!(
        kinds(&drain(&mut t)),
        [ChangeKind::Deleted, ChangeKind::Created]
    );
}

#[test]
fn imports_are_not_recorded_removals_are() {
    let mut a = table((1024, 2047), 64, AllocBlock::new(0, 2));
    let mut b = table((1024, 2047), 64, AllocBlock::new(1, 2));
    b.enable_change_log(16);
    let mut rng = XorShift32(1);
    let tr = a
        .outbound(Proto::Udp, (host(1), 1), R1, 0, 0, &mut rng)
        .unwrap();
    let rec = a.export(tr.session, S).unwrap();
    b.import(&rec, S).unwrap();
    b.import_ordered(&rec, S).unwrap();
    assert!(drain(&mut b).is_empty(), "replicated input is not echoed");
    assert!(b.remove_session(Proto::Udp, (host(1), 1), R1).is_some());
    assert_eq!(kinds(&drain(&mut b)), [ChangeKind::Deleted]);
}

#[test]
fn a_full_log_counts_what_it_loses_and_reports_the_overflow_once() {
    let mut t = table((1024, 2047), 64, AllocBlock::WHOLE);
    t.enable_change_log(4);
    let mut rng = XorShift32(1);
    for h in 0..6 {
        t.outbound(Proto::Udp, (host(h), 1), R1, 0, 0, &mut rng)
            .unwrap();
    }
    let st = t.change_log_stats().unwrap();
    assert_eq!((st.pending, st.recorded, st.lost), (4, 4, 2));
    let mut out = Vec::new();
    assert_eq!(
        t.drain_changes(100, &mut out),
        Err(ChangeLogOverflow {
            lost: 2,
            capacity: 4
        })
    );
    assert!(out.is_empty(), "an overflowed log hands out nothing");
    assert_eq!(t.change_log_stats().unwrap().pending, 0, "cleared");
    assert_eq!(t.drain_changes(100, &mut out), Ok(0), "reported once");
    // Recording goes on.
    t.outbound(Proto::Udp, (host(9), 1), R1, 0, 0, &mut rng)
        .unwrap();
    assert_eq!(t.drain_changes(100, &mut out), Ok(1));
    let st = t.change_log_stats().unwrap();
    assert_eq!((st.overflows, st.lost, st.recorded), (1, 2, 5));
}

#[test]
fn drains_are_bounded_and_in_order() {
    let mut t = table((1024, 2047), 64, AllocBlock::WHOLE);
    t.enable_change_log(64);
    let mut rng = XorShift32(1);
    let ids: Vec<_> = (0..10)
        .map(|h| {
            t.outbound(Proto::Udp, (host(h), 1), R1, 0, 0, &mut rng)
                .unwrap()
                .session
        })
        .collect();
    let mut out = Vec::new();
    assert_eq!(t.drain_changes(3, &mut out), Ok(3));
    assert_eq!(t.drain_changes(100, &mut out), Ok(7));
    assert_eq!(out.iter().map(|c| c.session).collect::<Vec<_>>(), ids);
    // Re-enabling with the same capacity keeps the log; another capacity starts afresh.
    t.outbound(Proto::Udp, (host(20), 1), R1, 0, 0, &mut rng)
        .unwrap();
    t.enable_change_log(64);
    assert_eq!(t.change_log_stats().unwrap().pending, 1);
    t.enable_change_log(8);
    assert_eq!(t.change_log_stats().unwrap().pending, 0);
    assert_eq!(t.change_log_capacity(), Some(8));
    t.disable_change_log();
    assert_eq!(t.change_log_stats(), None);
}

#[test]
fn the_gate_stops_new_sessions_and_keeps_established_ones() {
    let mut t = table((1024, 2047), 64, AllocBlock::WHOLE);
    t.enable_change_log(64);
    let mut rng = XorShift32(1);
    let tr = t
        .outbound(Proto::Udp, (host(1), 1), R1, 0, 0, &mut rng)
        .unwrap();
    drain(&mut t);
    t.set_allocation(false);
    assert!(!t.allocation_allowed());
    // A new flow, even of a mapped inside endpoint, is refused and changes nothing.
    assert_eq!(
        t.outbound(Proto::Udp, (host(2), 1), R1, 0, S, &mut rng),
        Err(NatError::AllocationStopped)
    );
    assert_eq!(
        t.outbound(Proto::Udp, (host(1), 1), R2, 0, S, &mut rng),
        Err(NatError::AllocationStopped)
    );
    assert_eq!(t.session_count(), 1);
    assert_eq!(t.stats().alloc_stopped, 2);
    assert!(drain(&mut t).is_empty());
    // The established flow still works both ways.
    let again = t
        .outbound(Proto::Udp, (host(1), 1), R1, 0, 2 * S, &mut rng)
        .unwrap();
    assert_eq!(again.outside, tr.outside);
    assert!(t.inbound(Proto::Udp, R1, tr.outside, 0, 2 * S).is_some());
    // Imports are not gated.
    let mut other = table((1024, 2047), 64, AllocBlock::WHOLE);
    let o = other
        .outbound(Proto::Udp, (host(3), 1), R2, 0, 0, &mut rng)
        .unwrap();
    t.import(&other.export(o.session, S).unwrap(), 2 * S)
        .unwrap();
    t.set_allocation(true);
    t.outbound(Proto::Udp, (host(2), 1), R1, 0, 3 * S, &mut rng)
        .unwrap();
    assert_eq!(t.session_count(), 3);
}

#[test]
fn moving_the_block_changes_where_new_ports_come_from() {
    // 16 ports: block 1 of 2 is 1032..=1039.
    let mut t = table((1024, 1039), 64, AllocBlock::WHOLE);
    let mut rng = XorShift32(3);
    // A port of the future block taken before the move.
    let mut early = None;
    for h in 0..64 {
        let tr = t
            .outbound(Proto::Udp, (host(h), 1), R1, 0, 0, &mut rng)
            .unwrap();
        if tr.outside.1 >= 1032 && tr.outside.0 == POOL[0] {
            early = Some(tr.outside.1);
            break;
        }
        assert!(t.remove_session(Proto::Udp, (host(h), 1), R1).is_some());
    }
    assert!(early.is_some());
    t.set_block(AllocBlock::new(1, 2)).unwrap();
    assert_eq!(t.config().block, AllocBlock::new(1, 2));
    // Exhaust POOL[0]'s block: 7 more ports, all in 1032..=1039, none the early one.
    let mut got = HashSet::new();
    let mut h = 1000;
    while got.len() < 7 {
        h += 1;
        match t.outbound(Proto::Udp, (host(h), 1), R1, 0, 0, &mut rng) {
            Ok(tr) if tr.outside.0 == POOL[0] => {
                assert!((1032..=1039).contains(&tr.outside.1), "{tr:?}");
                assert_ne!(Some(tr.outside.1), early);
                assert!(got.insert(tr.outside.1));
            }
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
        assert!(h < 5000);
    }
    // Next host paired with POOL[0]: exhausted.
    loop {
        h += 1;
        match t.outbound(Proto::Udp, (host(h), 1), R1, 0, 0, &mut rng) {
            Ok(tr) => assert_eq!(tr.outside.0, POOL[1]),
            Err(e) => {
                assert_eq!(e, NatError::PortsExhausted { addr: POOL[0] });
                break;
            }
        }
    }
    assert!(t.set_block(AllocBlock::new(2, 2)).is_err());
    assert_eq!(
        t.config().block,
        AllocBlock::new(1, 2),
        "refused: unchanged"
    );
}

// --- the pipeline --------------------------------------------------------------------------

const UPLINK: PortId = PortId(0);
const VPC_PORT: PortId = PortId(1);
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

fn model(extra: &[Change]) -> Model {
    let mut m = Model::new();
    let mut changes = vec![
        Change::SetNode(Node {
            vtep: Ipv4Addr::new(192, 0, 2, 1),
            router_mac: mac(1),
            uplinks: BTreeSet::from([UPLINK]),
        }),
        Change::UpsertVpc(Vpc {
            name: n("blue"),
            vni: Vni::new(100).unwrap(),
            table: TableId(10),
            ports: BTreeSet::from([VPC_PORT]),
        }),
        route(
            254,
            "0.0.0.0/0",
            vec![Nexthop::Underlay {
                gateway: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 254)),
                port: UPLINK,
                mac: mac(254),
            }],
        ),
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
                    first: POOL[0],
                    last: POOL[1],
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

fn eth(ethertype: u16, payload_len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 14 + payload_len];
    let mut e = EthernetFrame::new_unchecked(&mut f[..]);
    packet::EthernetRepr {
        src: mac(0x10).0,
        dst: mac(1).0,
        ethertype,
    }
    .emit(&mut e);
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

/// Ethernet/IPv4/UDP (or TCP with `tcp` flags).
fn v4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), tcp: Option<u8>) -> Vec<u8> {
    let l4_len = if tcp.is_some() { 20 } else { 12 };
    let mut f = eth(packet::ethertype::IPV4, 20 + l4_len);
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut f[14..]);
        packet::Ipv4Repr {
            src: src.0,
            dst: dst.0,
            protocol: if tcp.is_some() { 6 } else { 17 },
            ttl: 64,
            dscp_ecn: 0,
            ident: 1,
            dont_frag: true,
            payload_len: l4_len,
        }
        .emit(&mut ip);
        ip.fill_checksum();
    }
    fill_l4(&mut f[34..], src, dst, tcp);
    f
}

fn v6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16)) -> Vec<u8> {
    let mut f = eth(packet::ethertype::IPV6, 40 + 12);
    {
        let mut ip = Ipv6Packet::new_unchecked(&mut f[14..]);
        packet::Ipv6Repr {
            src: src.0,
            dst: dst.0,
            next_header: 17,
            hop_limit: 64,
            traffic_class: 0,
            flow_label: 0,
            payload_len: 12,
        }
        .emit(&mut ip);
    }
    fill_l4(&mut f[54..], src, dst, None);
    f
}

/// The translated source of an outbound IPv4 frame.
fn src_of(f: &[u8]) -> (Ipv4Addr, u16) {
    let ip = Ipv4Packet::new_checked(&f[14..]).unwrap();
    let u = UdpPacket::new_checked(ip.payload()).unwrap();
    (ip.src_addr(), u.src_port())
}

fn send(p: &mut Pipeline, sport: u16, now: u64) -> (Verdict, Vec<u8>) {
    let mut f = v4((HOST, sport), (SERVER, 53), None);
    (p.process(&mut f, VPC_PORT, None, now), f)
}

#[test]
fn the_pipeline_gate_drops_new_flows_with_a_reason_and_forwards_established_ones() {
    let m = model(&[]);
    let mut p = Pipeline::new(&m, PipelineLimits::default(), 1).unwrap();
    assert!(p.nat_allocation_allowed());
    let (v, out) = send(&mut p, 5000, 1);
    assert_eq!(v, Verdict::Tx(UPLINK));
    let outside = src_of(&out);
    p.set_nat_allocation(false);
    assert!(!p.nat_allocation_allowed());
    assert_eq!(
        send(&mut p, 5001, 2).0,
        Verdict::Drop(DropReason::NatNotActive)
    );
    let mut f6 = v6((HOST6, 7000), ("64:ff9b::c633:6407".parse().unwrap(), 53));
    assert_eq!(
        p.process(&mut f6, VPC_PORT, None, 2),
        Verdict::Drop(DropReason::NatNotActive),
        "NAT64 is gated too"
    );
    let (v, again) = send(&mut p, 5000, 3);
    assert_eq!(v, Verdict::Tx(UPLINK));
    assert_eq!(src_of(&again), outside);
    let mut reply = v4((SERVER, 53), outside, None);
    assert_eq!(
        p.process(&mut reply, UPLINK, None, 4),
        Verdict::Tx(VPC_PORT)
    );
    assert_eq!(p.nat_totals(), (1, 2));
    p.set_nat_allocation(true);
    assert_eq!(send(&mut p, 5001, 5).0, Verdict::Tx(UPLINK));
}

#[test]
fn pair_settings_survive_a_rebuild_and_apply_to_new_rules() {
    let m = model(&[]);
    let mut old = Pipeline::new(&m, PipelineLimits::default(), 1).unwrap();
    old.set_nat_block(AllocBlock::new(1, 2)).unwrap();
    old.enable_nat_change_log(32);
    let (_, out) = send(&mut old, 5000, 1);
    let outside = src_of(&out);
    assert!((1536..=2047).contains(&outside.1), "{outside:?}");
    old.set_nat_allocation(false);
    // A rebuild with a new NAPT44 rule in another VPC.
    let m2 = model(&[
        Change::UpsertVpc(Vpc {
            name: n("red"),
            vni: Vni::new(200).unwrap(),
            table: TableId(20),
            ports: BTreeSet::from([PortId(2)]),
        }),
        Change::UpsertNat(NatRule {
            name: n("red-out"),
            vpc: n("red"),
            kind: NatKind::Napt44 {
                pool: Ipv4Range::single(Ipv4Addr::new(203, 0, 113, 20)),
                ports: (1024, 2047),
            },
        }),
    ]);
    let mut new = Pipeline::new(&m2, PipelineLimits::default(), 2).unwrap();
    let carry = new.carry_nat_from(&mut old);
    assert_eq!(carry.sessions, 1, "the block does not count as a change");
    assert!(!new.nat_allocation_allowed());
    assert_eq!(new.nat_block(), AllocBlock::new(1, 2));
    let st = new.nat_change_log_stats();
    assert_eq!(st.capacity, 3 * 32, "every table logs, the new rule's too");
    assert_eq!(st.pending, 1, "the carried table keeps its log");
    assert_eq!(
        send(&mut new, 5001, 2).0,
        Verdict::Drop(DropReason::NatNotActive)
    );
    new.set_nat_allocation(true);
    let (_, out) = send(&mut new, 5001, 3);
    assert!((1536..=2047).contains(&src_of(&out).1));
}

#[test]
fn a_port_range_too_small_to_split_never_allocates() {
    let m = model(&[
        Change::UpsertVpc(Vpc {
            name: n("red"),
            vni: Vni::new(200).unwrap(),
            table: TableId(20),
            ports: BTreeSet::from([PortId(2)]),
        }),
        route(
            20,
            "0.0.0.0/0",
            vec![Nexthop::Vrf {
                table: UNDERLAY_TABLE,
            }],
        ),
        Change::UpsertNat(NatRule {
            name: n("tiny"),
            vpc: n("red"),
            kind: NatKind::Napt44 {
                pool: Ipv4Range::single(Ipv4Addr::new(203, 0, 113, 30)),
                ports: (5000, 5000),
            },
        }),
    ]);
    let mut p = Pipeline::new(&m, PipelineLimits::default(), 1).unwrap();
    let e = p.set_nat_block(AllocBlock::new(0, 2)).unwrap_err();
    assert!(e.to_string().contains("tiny"), "{e}");
    assert!(p.nat_allocation_allowed(), "the member may allocate");
    let mut f = v4((HOST, 5000), (SERVER, 53), None);
    assert_eq!(
        p.process(&mut f, PortId(2), None, 1),
        Verdict::Drop(DropReason::NatNotActive),
        "that table may not: it cannot stay out of the peer's ports"
    );
    assert_eq!(
        send(&mut p, 5000, 1).0,
        Verdict::Tx(UPLINK),
        "the others may"
    );
}

#[test]
fn changes_drained_on_the_active_apply_on_the_standby() {
    let m = model(&[]);
    let mut a = Pipeline::new(&m, PipelineLimits::default(), 1).unwrap();
    let mut b = Pipeline::new(&m, PipelineLimits::default(), 2).unwrap();
    a.set_nat_block(AllocBlock::new(0, 2)).unwrap();
    b.set_nat_block(AllocBlock::new(1, 2)).unwrap();
    b.set_nat_allocation(false);
    a.enable_nat_change_log(1024);
    let mut outs = Vec::new();
    for i in 0..50 {
        let (v, f) = send(&mut a, 6000 + i, S);
        assert_eq!(v, Verdict::Tx(UPLINK));
        outs.push(src_of(&f));
    }
    let mut f6 = v6((HOST6, 7000), ("64:ff9b::c633:6407".parse().unwrap(), 53));
    assert_eq!(a.process(&mut f6, VPC_PORT, None, S), Verdict::Tx(UPLINK));
    let mut events = Vec::new();
    assert_eq!(a.drain_nat_changes(2 * S, 20, &mut events), Ok(20));
    assert_eq!(a.drain_nat_changes(2 * S, 100, &mut events), Ok(31));
    assert_eq!(events.len(), 51);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Upsert(r) if matches!(r.session, NatSessionRecord::Nat64(_)))));
    for e in &events {
        b.apply_nat_replica(e, 10 * S).unwrap();
    }
    // The standby now forwards the replies of every flow, and the flows themselves, with the
    // same outside endpoints, without allocating.
    for (i, o) in outs.iter().enumerate() {
        assert!((1024..=1535).contains(&o.1), "member a's block: {o:?}");
        let mut reply = v4((SERVER, 53), *o, None);
        assert_eq!(
            b.process(&mut reply, UPLINK, None, 11 * S),
            Verdict::Tx(VPC_PORT)
        );
        let (v, f) = send(&mut b, 6000 + i as u16, 11 * S);
        assert_eq!(v, Verdict::Tx(UPLINK));
        assert_eq!(src_of(&f), *o);
    }
    assert_eq!(b.nat_totals(), (51, 0));
    // A deletion propagates.
    assert!(a
        .napt_remove_session(&n("out"), Proto::Udp, (HOST, 6000), (SERVER, 53))
        .is_some());
    events.clear();
    assert_eq!(a.drain_nat_changes(3 * S, 100, &mut events), Ok(1));
    assert_eq!(
        events[0],
        Event::Delete((
            n("out"),
            NatFlowKey::Napt44 {
                proto: Proto::Udp,
                inside: (HOST, 6000),
                remote: (SERVER, 53)
            }
        ))
    );
    b.apply_nat_replica(&events[0], 12 * S).unwrap();
    assert_eq!(b.nat_totals().0, 50);
    let mut reply = v4((SERVER, 53), outs[0], None);
    assert_eq!(
        b.process(&mut reply, UPLINK, None, 13 * S),
        Verdict::Drop(DropReason::NoSession)
    );
    // Unknown rules are typed errors.
    let bogus = Event::Delete((
        n("nope"),
        NatFlowKey::Napt44 {
            proto: Proto::Udp,
            inside: (HOST, 1),
            remote: R1,
        },
    ));
    assert_eq!(
        b.apply_nat_replica(&bogus, 0),
        Err(NatSyncError::UnknownRule)
    );
}

#[test]
fn an_overflow_in_any_table_clears_every_log_and_hands_out_nothing() {
    let m = model(&[]);
    let mut a = Pipeline::new(&m, PipelineLimits::default(), 1).unwrap();
    a.enable_nat_change_log(4);
    for i in 0..6 {
        send(&mut a, 6000 + i, S);
    }
    let mut f6 = v6((HOST6, 7000), ("64:ff9b::c633:6407".parse().unwrap(), 53));
    a.process(&mut f6, VPC_PORT, None, S);
    let mut events = Vec::new();
    let e = a.drain_nat_changes(2 * S, 100, &mut events).unwrap_err();
    assert_eq!(e.lost, 2);
    assert!(events.is_empty());
    assert_eq!(a.nat_change_log_stats().pending, 0);
    assert_eq!(a.drain_nat_changes(2 * S, 100, &mut events), Ok(0));
    a.disable_nat_change_log();
    assert_eq!(a.nat_change_log_stats().capacity, 0);
}

#[test]
fn a_walk_exports_every_session_of_every_rule() {
    let m = model(&[]);
    let mut a = Pipeline::new(&m, PipelineLimits::default(), 1).unwrap();
    let mut want = HashSet::new();
    for i in 0..300 {
        let (_, f) = send(&mut a, 6000 + i, S);
        want.insert(src_of(&f));
    }
    let mut f6 = v6((HOST6, 7000), ("64:ff9b::c633:6407".parse().unwrap(), 53));
    a.process(&mut f6, VPC_PORT, None, S);
    let mut cursor = a.nat_replica_cursor();
    assert_eq!(cursor.rules(), 2);
    let mut got = Vec::new();
    let mut steps = 0;
    while !a.export_nat_replicas(&mut cursor, 1000, 2 * S, &mut got) {
        steps += 1;
        assert!(steps < 1000);
    }
    assert_eq!(got.len(), 301);
    let v4: HashSet<_> = got
        .iter()
        .filter_map(|r| match r.session {
            NatSessionRecord::Napt44(s) => Some(s.outside),
            NatSessionRecord::Nat64(_) => None,
        })
        .collect();
    assert_eq!(v4, want);
    assert!(a.export_nat_replicas(&mut cursor, 1000, 2 * S, &mut got));
}

#[test]
fn ordered_imports_take_a_state_change_that_looks_older() {
    let mut a = table((1024, 2047), 64, AllocBlock::new(0, 2));
    let mut rng = XorShift32(1);
    let inside = (host(1), 40000);
    let tr = a
        .outbound(Proto::Tcp, inside, R1, TCP_SYN, S, &mut rng)
        .unwrap();
    a.inbound(Proto::Tcp, R1, tr.outside, TCP_SYN | TCP_ACK, S)
        .unwrap();
    a.outbound(Proto::Tcp, inside, R1, TCP_ACK, 2 * S, &mut rng)
        .unwrap();
    let rec1 = a.export(tr.session, 2 * S).unwrap();
    a.outbound(
        Proto::Tcp,
        inside,
        R1,
        TCP_FIN | TCP_ACK,
        2 * S + 1,
        &mut rng,
    )
    .unwrap();
    // Exported 5 ms after the FIN, delivered 1 ms after the first record: its last packet
    // looks 4 ms older than the first record's.
    let rec2 = a.export(tr.session, 2 * S + 5_000_000).unwrap();
    let state = |t: &NatTable<Ipv4Addr>| t.sessions().next().unwrap().tcp_state;
    let mut plain = table((1024, 2047), 64, AllocBlock::new(1, 2));
    plain.import(&rec1, 100 * S).unwrap();
    plain.import(&rec2, 100 * S + 1_000_000).unwrap();
    assert_eq!(
        state(&plain),
        Some(flow_offload::soft::nat::TcpState::Established)
    );
    let mut ordered = table((1024, 2047), 64, AllocBlock::new(1, 2));
    ordered.import_ordered(&rec1, 100 * S).unwrap();
    ordered.import_ordered(&rec2, 100 * S + 1_000_000).unwrap();
    assert_eq!(
        state(&ordered),
        Some(flow_offload::soft::nat::TcpState::FinOutbound)
    );
}
