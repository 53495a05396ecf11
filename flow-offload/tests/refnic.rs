//! The reference NIC: lookup, actions, checksums, limits and refusals.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use core::net::{Ipv4Addr, Ipv6Addr};

use flow_offload::caps::{Caps, Profile, Refusal};
use flow_offload::ir::{
    self, Action, ActionKind, Attr, EthFields, Ipv4Fields, Ipv6Fields, Item, ItemKind, L4Fields,
    Masked, MeterRef, Nat64Direction, Rule, TcpFields, VlanFields, VxlanEncap, VxlanFields,
};
use flow_offload::model::{MacAddr, MeterProfile, PortId};
use flow_offload::refnic::{NicDrop, NicVerdict, RefNic, RefNicError, RuleHandle, MAX_JUMPS};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Packet building and checking, by hand.
// ---------------------------------------------------------------------------------------------

const MAC_A: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x0a]);
const MAC_B: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x0b]);
const MAC_C: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x0c]);
const MAC_D: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x0d]);

const UDP: u8 = 17;
const TCP: u8 = 6;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

/// The ones' complement sum of 16-bit big-endian words (odd byte padded), folded.
fn ones_sum(data: &[u8]) -> u32 {
    let mut s: u32 = 0;
    for pair in data.chunks(2) {
        let word = if pair.len() == 2 {
            u16::from_be_bytes([pair[0], pair[1]])
        } else {
            u16::from_be_bytes([pair[0], 0])
        };
        s += u32::from(word);
        s = (s & 0xffff) + (s >> 16);
    }
    s
}

/// The Internet checksum of `data`: the complement of its ones' complement sum.
fn internet_checksum(data: &[u8]) -> u16 {
    !(ones_sum(data) as u16)
}

fn pseudo_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.push(0);
    p.push(proto);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

fn pseudo_v6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&(len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, next_header]);
    p
}

/// The checksum of an L4 segment (checksum field already zero) behind a pseudo-header.
fn l4_checksum(pseudo: &[u8], segment: &[u8]) -> u16 {
    let mut all = pseudo.to_vec();
    all.extend_from_slice(segment);
    internet_checksum(&all)
}

fn udp_segment(sport: u16, dport: u16, payload: &[u8], pseudo: Option<&[u8]>) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&(len as u16).to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(payload);
    if let Some(pseudo) = pseudo {
        let mut c = l4_checksum(pseudo, &s);
        if c == 0 {
            c = 0xffff;
        }
        s[6..8].copy_from_slice(&c.to_be_bytes());
    }
    s
}

fn tcp_segment(sport: u16, dport: u16, flags: u8, payload: &[u8], pseudo: &[u8]) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // seq
    s.extend_from_slice(&0x0a0b_0c0du32.to_be_bytes()); // ack
    s.push(5 << 4); // data offset 5
    s.push(flags);
    s.extend_from_slice(&8192u16.to_be_bytes()); // window
    s.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
    s.extend_from_slice(payload);
    let c = l4_checksum(pseudo, &s);
    s[16..18].copy_from_slice(&c.to_be_bytes());
    s
}

fn icmpv6_echo(payload: &[u8], pseudo: &[u8]) -> Vec<u8> {
    let mut s = vec![128, 0, 0, 0, 0x12, 0x34, 0, 1];
    s.extend_from_slice(payload);
    let c = l4_checksum(pseudo, &s);
    s[2..4].copy_from_slice(&c.to_be_bytes());
    s
}

/// An IPv4 packet with header checksum; `frag` is the flags/fragment-offset word.
fn ipv4_packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    ttl: u8,
    frag: u16,
    payload: &[u8],
) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[ttl, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = internet_checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

fn ipv6_packet(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next_header: u8,
    hop_limit: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.push(next_header);
    h.push(hop_limit);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

fn ether(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn v4(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// Ethernet / IPv4 / UDP with a checksum, TTL 64.
fn udp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let pseudo = pseudo_v4(src, dst, UDP, 8 + payload.len());
    let seg = udp_segment(sport, dport, payload, Some(&pseudo));
    ether(
        MAC_A,
        MAC_B,
        0x0800,
        &ipv4_packet(src, dst, UDP, 64, 0, &seg),
    )
}

/// Ethernet / IPv4 / TCP, TTL 64.
fn tcp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let pseudo = pseudo_v4(src, dst, TCP, 20 + payload.len());
    let seg = tcp_segment(sport, dport, 0x18, payload, &pseudo);
    ether(
        MAC_A,
        MAC_B,
        0x0800,
        &ipv4_packet(src, dst, TCP, 64, 0, &seg),
    )
}

/// Ethernet / IPv6 / UDP, hop limit 64.
fn udp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let pseudo = pseudo_v6(src, dst, UDP, 8 + payload.len());
    let seg = udp_segment(sport, dport, payload, Some(&pseudo));
    ether(MAC_A, MAC_B, 0x86dd, &ipv6_packet(src, dst, UDP, 64, &seg))
}

/// Ethernet / IPv6 / TCP, hop limit 64.
fn tcp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let pseudo = pseudo_v6(src, dst, TCP, 20 + payload.len());
    let seg = tcp_segment(sport, dport, 0x02, payload, &pseudo);
    ether(MAC_A, MAC_B, 0x86dd, &ipv6_packet(src, dst, TCP, 64, &seg))
}

/// Ethernet / IPv6 / ICMPv6 echo request, hop limit 64.
fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let pseudo = pseudo_v6(src, dst, ICMPV6, 8 + payload.len());
    let seg = icmpv6_echo(payload, &pseudo);
    ether(
        MAC_A,
        MAC_B,
        0x86dd,
        &ipv6_packet(src, dst, ICMPV6, 64, &seg),
    )
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

/// Which checksums [`verify_checksums`] found and recomputed.
#[derive(Debug, PartialEq, Eq)]
struct Checked {
    ipv4_header: bool,
    l4: Option<u8>,
    udp_none: bool,
}

/// Recomputes every checksum of an (untagged) Ethernet frame from scratch and asserts the
/// packet carries exactly those values.
fn verify_checksums(frame: &[u8]) -> Checked {
    let mut out = Checked {
        ipv4_header: false,
        l4: None,
        udp_none: false,
    };
    let ip = &frame[14..];
    let (proto, segment, pseudo): (u8, &[u8], Vec<u8>) = match be16(frame, 12) {
        0x0800 => {
            let hl = usize::from(ip[0] & 0x0f) * 4;
            let mut header = ip[..hl].to_vec();
            let carried = be16(&header, 10);
            header[10] = 0;
            header[11] = 0;
            assert_eq!(carried, internet_checksum(&header), "IPv4 header checksum");
            out.ipv4_header = true;
            let total = usize::from(be16(ip, 2));
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            let segment = &ip[hl..total];
            (ip[9], segment, pseudo_v4(src, dst, ip[9], segment.len()))
        }
        0x86dd => {
            let plen = usize::from(be16(ip, 4));
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
            let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
            let segment = &ip[40..40 + plen];
            (ip[6], segment, pseudo_v6(src, dst, ip[6], segment.len()))
        }
        other => panic!("not IP: {other:#x}"),
    };
    let field = match proto {
        UDP => 6,
        TCP => 16,
        ICMPV6 => 2,
        _ => return out,
    };
    let carried = be16(segment, field);
    out.l4 = Some(proto);
    if proto == UDP && carried == 0 {
        out.udp_none = true;
        return out;
    }
    let mut zeroed = segment.to_vec();
    zeroed[field] = 0;
    zeroed[field + 1] = 0;
    let mut expected = l4_checksum(&pseudo, &zeroed);
    if proto == UDP && expected == 0 {
        expected = 0xffff;
    }
    assert_eq!(carried, expected, "L4 checksum (protocol {proto})");
    out
}

// ---------------------------------------------------------------------------------------------
// Rule building.
// ---------------------------------------------------------------------------------------------

fn rule(port: u16, group: u32, priority: u32, pattern: Vec<Item>, actions: Vec<Action>) -> Rule {
    Rule {
        port: PortId(port),
        attr: Attr {
            group,
            priority,
            ingress: true,
            egress: false,
            transfer: false,
        },
        pattern,
        actions,
    }
}

fn any_eth() -> Item {
    Item::Eth(Masked {
        spec: EthFields::default(),
        mask: EthFields::default(),
    })
}

fn eth_type(ethertype: u16) -> Item {
    Item::Eth(Masked {
        spec: EthFields {
            ethertype,
            ..EthFields::default()
        },
        mask: EthFields {
            ethertype: 0xffff,
            ..EthFields::default()
        },
    })
}

fn ipv4_dst(addr: [u8; 4], len: u32) -> Item {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Item::Ipv4(Masked {
        spec: Ipv4Fields {
            dst: v4(addr),
            ..Ipv4Fields::default()
        },
        mask: Ipv4Fields {
            dst: Ipv4Addr::from(mask),
            ..Ipv4Fields::default()
        },
    })
}

fn any_ipv4() -> Item {
    ipv4_dst([0; 4], 0)
}

fn any_ipv6() -> Item {
    Item::Ipv6(Masked {
        spec: Ipv6Fields::default(),
        mask: Ipv6Fields::default(),
    })
}

fn udp_dst(port: u16) -> Item {
    Item::Udp(Masked {
        spec: L4Fields {
            src_port: 0,
            dst_port: port,
        },
        mask: L4Fields {
            src_port: 0,
            dst_port: 0xffff,
        },
    })
}

fn any_udp() -> Item {
    Item::Udp(Masked {
        spec: L4Fields::default(),
        mask: L4Fields::default(),
    })
}

fn tcp_dst(port: u16) -> Item {
    Item::Tcp(Masked {
        spec: TcpFields {
            dst_port: port,
            ..TcpFields::default()
        },
        mask: TcpFields {
            dst_port: 0xffff,
            ..TcpFields::default()
        },
    })
}

fn vxlan_vni(vni: u32) -> Item {
    Item::Vxlan(Masked {
        spec: VxlanFields { flags: 0, vni },
        mask: VxlanFields {
            flags: 0,
            vni: 0x00ff_ffff,
        },
    })
}

fn vlan_vid(vid: u16) -> Item {
    Item::Vlan(Masked {
        spec: VlanFields {
            tci: vid,
            inner_type: 0,
        },
        mask: VlanFields {
            tci: 0x0fff,
            inner_type: 0,
        },
    })
}

fn nic(profile: Profile) -> RefNic {
    RefNic::new(Caps::profile(profile))
}

fn tx(port: u16) -> NicVerdict {
    NicVerdict::Tx { port: PortId(port) }
}

fn to_sw(queue: u16, mark: Option<u32>) -> NicVerdict {
    NicVerdict::ToSoftware { queue, mark }
}

fn dropped(why: NicDrop) -> NicVerdict {
    NicVerdict::Drop(why)
}

fn run(nic: &mut RefNic, port: u16, frame: &[u8]) -> (NicVerdict, Vec<u8>) {
    let mut f = frame.to_vec();
    let v = nic.process(PortId(port), &mut f, 0);
    (v, f)
}

fn encap_spec(vni: u32) -> VxlanEncap {
    VxlanEncap {
        eth_src: MAC_C,
        eth_dst: MAC_D,
        ip_src: v4([192, 0, 2, 1]),
        ip_dst: v4([192, 0, 2, 2]),
        vni,
        udp_src: ir::vxlan_source_port(vni),
    }
}

// ---------------------------------------------------------------------------------------------
// Lookup.
// ---------------------------------------------------------------------------------------------

#[test]
fn longest_prefix_by_priority() {
    // Created /16 first and /24 second, then the other way round: priority decides, not order.
    for reversed in [false, true] {
        let mut n = nic(Profile::Full);
        let wide = rule(
            0,
            0,
            1,
            vec![any_eth(), ipv4_dst([10, 1, 0, 0], 16)],
            vec![Action::Port(PortId(1))],
        );
        let narrow = rule(
            0,
            0,
            0,
            vec![any_eth(), ipv4_dst([10, 1, 2, 0], 24)],
            vec![Action::Port(PortId(2))],
        );
        if reversed {
            n.create(&narrow).unwrap();
            n.create(&wide).unwrap();
        } else {
            n.create(&wide).unwrap();
            n.create(&narrow).unwrap();
        }
        let to = |d| udp4(v4([10, 9, 9, 9]), v4(d), 1000, 2000, b"hello");
        assert_eq!(run(&mut n, 0, &to([10, 1, 2, 5])).0, tx(2));
        assert_eq!(run(&mut n, 0, &to([10, 1, 2, 255])).0, tx(2));
        assert_eq!(run(&mut n, 0, &to([10, 1, 3, 5])).0, tx(1));
        assert_eq!(run(&mut n, 0, &to([10, 1, 255, 0])).0, tx(1));
        // Outside both: group-0 miss goes to software without a mark.
        assert_eq!(
            run(&mut n, 0, &to([10, 2, 0, 1])).0,
            to_sw(ir::SOFTWARE_QUEUE, None)
        );
        // Rules are per port: nothing is installed on port 3.
        assert_eq!(
            run(&mut n, 3, &to([10, 1, 2, 5])).0,
            to_sw(ir::SOFTWARE_QUEUE, None)
        );
    }
}

#[test]
fn group0_miss_goes_to_software_unmarked() {
    let mut n = nic(Profile::Full);
    n.create(&rule(
        0,
        0,
        0,
        vec![any_eth(), any_ipv4(), udp_dst(53)],
        vec![Action::Mark(5), Action::Queue(3)],
    ))
    .unwrap();
    let dns = udp4(v4([1, 1, 1, 1]), v4([2, 2, 2, 2]), 999, 53, b"q");
    let other = udp4(v4([1, 1, 1, 1]), v4([2, 2, 2, 2]), 999, 54, b"q");
    assert_eq!(run(&mut n, 0, &dns).0, to_sw(3, Some(5)));
    let (v, f) = run(&mut n, 0, &other);
    assert_eq!(v, to_sw(ir::SOFTWARE_QUEUE, None));
    assert_eq!(f, other);
    // An empty NIC sends everything to software, even runts.
    let mut empty = nic(Profile::Full);
    assert_eq!(
        run(&mut empty, 0, &[1, 2, 3]).0,
        to_sw(ir::SOFTWARE_QUEUE, None)
    );
}

#[test]
fn non_root_group_miss_drops() {
    let mut n = nic(Profile::Full);
    n.create(&rule(0, 0, 0, vec![], vec![Action::Jump(5)]))
        .unwrap();
    n.create(&rule(
        0,
        5,
        0,
        vec![any_eth(), any_ipv4(), udp_dst(53)],
        vec![Action::Queue(1)],
    ))
    .unwrap();
    let dns = udp4(v4([1, 1, 1, 1]), v4([2, 2, 2, 2]), 999, 53, b"q");
    let web = tcp4(v4([1, 1, 1, 1]), v4([2, 2, 2, 2]), 999, 80, b"GET");
    assert_eq!(run(&mut n, 0, &dns).0, to_sw(1, None));
    assert_eq!(
        run(&mut n, 0, &web).0,
        dropped(NicDrop::GroupMiss { group: 5 })
    );
    // A jump to a group without any rule drops as well.
    let mut n = nic(Profile::Full);
    n.create(&rule(0, 0, 0, vec![], vec![Action::Jump(9)]))
        .unwrap();
    assert_eq!(
        run(&mut n, 0, &dns).0,
        dropped(NicDrop::GroupMiss { group: 9 })
    );
}

#[test]
fn jump_carries_the_mark() {
    let mut n = nic(Profile::Full);
    let m = ir::mark::resume_in_vrf(7);
    n.create(&rule(
        0,
        0,
        0,
        vec![any_eth(), ipv4_dst([10, 0, 0, 1], 32)],
        vec![Action::Mark(m), Action::Jump(1)],
    ))
    .unwrap();
    n.create(&rule(
        0,
        1,
        0,
        vec![any_eth(), any_ipv4(), udp_dst(53)],
        vec![Action::Queue(4)],
    ))
    .unwrap();
    // Rewrite the destination and go back to group 0, where nothing matches any more: the
    // miss delivers the mark set before the jumps.
    n.create(&rule(
        0,
        1,
        1,
        vec![],
        vec![Action::SetIpv4Dst(v4([10, 0, 0, 2])), Action::Jump(0)],
    ))
    .unwrap();
    let dns = udp4(v4([10, 0, 0, 9]), v4([10, 0, 0, 1]), 999, 53, b"q");
    assert_eq!(run(&mut n, 0, &dns).0, to_sw(4, Some(m)));
    let ntp = udp4(v4([10, 0, 0, 9]), v4([10, 0, 0, 1]), 999, 123, b"q");
    let (v, f) = run(&mut n, 0, &ntp);
    assert_eq!(v, to_sw(ir::SOFTWARE_QUEUE, Some(m)));
    assert_eq!(&f[30..34], &[10, 0, 0, 2]);
    verify_checksums(&f);
    // A later mark replaces an earlier one.
    let mut n = nic(Profile::Full);
    n.create(&rule(
        0,
        0,
        0,
        vec![],
        vec![Action::Mark(1), Action::Jump(2)],
    ))
    .unwrap();
    n.create(&rule(
        0,
        2,
        0,
        vec![],
        vec![Action::Mark(2), Action::Queue(0)],
    ))
    .unwrap();
    assert_eq!(run(&mut n, 0, &dns).0, to_sw(0, Some(2)));
}

#[test]
fn jump_loops_are_bounded() {
    let mut n = nic(Profile::Full);
    n.create(&rule(0, 0, 0, vec![], vec![Action::Count, Action::Jump(1)]))
        .unwrap();
    let back = n
        .create(&rule(0, 1, 0, vec![], vec![Action::Count, Action::Jump(0)]))
        .unwrap();
    let dns = udp4(v4([1, 1, 1, 1]), v4([2, 2, 2, 2]), 999, 53, b"q");
    assert_eq!(run(&mut n, 0, &dns).0, dropped(NicDrop::JumpLoop));
    // Exactly MAX_JUMPS jumps are taken: the group-1 rule ran MAX_JUMPS / 2 times.
    assert_eq!(n.query_count(back).unwrap().0, u64::from(MAX_JUMPS / 2));
    // A self-loop too.
    let mut n = nic(Profile::Full);
    n.create(&rule(0, 0, 0, vec![], vec![Action::Jump(3)]))
        .unwrap();
    n.create(&rule(0, 3, 0, vec![], vec![Action::Jump(3)]))
        .unwrap();
    assert_eq!(run(&mut n, 0, &dns).0, dropped(NicDrop::JumpLoop));
}

#[test]
fn overlapping_rules_at_equal_priority_go_by_creation_order() {
    let mut n = nic(Profile::Full);
    let first = n
        .create(&rule(
            0,
            0,
            3,
            vec![any_eth(), any_ipv4()],
            vec![Action::Port(PortId(1))],
        ))
        .unwrap();
    let second = n
        .create(&rule(
            0,
            0,
            3,
            vec![any_eth(), any_ipv4(), udp_dst(53)],
            vec![Action::Port(PortId(2))],
        ))
        .unwrap();
    assert!(first < second);
    let dns = udp4(v4([1, 1, 1, 1]), v4([2, 2, 2, 2]), 999, 53, b"q");
    assert_eq!(run(&mut n, 0, &dns).0, tx(1));
    n.destroy(first).unwrap();
    assert_eq!(run(&mut n, 0, &dns).0, tx(2));
    assert_eq!(n.destroy(first), Err(RefNicError::UnknownRule(first)));
    let rules: Vec<RuleHandle> = n.rules().map(|(h, _)| h).collect();
    assert_eq!(rules, vec![second]);
    n.destroy(second).unwrap();
    assert_eq!(n.rule_count(), 0);
    assert_eq!(run(&mut n, 0, &dns).0, to_sw(ir::SOFTWARE_QUEUE, None));
}

#[test]
fn rules_iterate_in_creation_order() {
    let mut n = nic(Profile::Full);
    let a = rule(1, 2, 5, vec![], vec![Action::Drop]);
    let b = rule(0, 0, 0, vec![], vec![Action::Drop]);
    let c = rule(0, 0, 9, vec![any_eth()], vec![Action::Queue(1)]);
    let ha = n.create(&a).unwrap();
    let hb = n.create(&b).unwrap();
    let hc = n.create(&c).unwrap();
    let all: Vec<(RuleHandle, Rule)> = n.rules().map(|(h, r)| (h, r.clone())).collect();
    assert_eq!(all, vec![(ha, a), (hb, b), (hc, c)]);
    assert_eq!(n.rule_count(), 3);
}

// ---------------------------------------------------------------------------------------------
// Patterns.
// ---------------------------------------------------------------------------------------------

#[test]
fn vlan_tags_need_a_vlan_item() {
    let mut n = nic(Profile::Full);
    n.create(&rule(
        0,
        0,
        0,
        vec![any_eth(), any_ipv4()],
        vec![Action::Queue(1)],
    ))
    .unwrap();
    n.create(&rule(
        0,
        0,
        1,
        vec![eth_type(0x8100), vlan_vid(100), any_ipv4(), udp_dst(53)],
        vec![Action::Queue(2)],
    ))
    .unwrap();
    n.create(&rule(
        0,
        0,
        2,
        vec![eth_type(0x8100), vlan_vid(200)],
        vec![Action::Queue(3)],
    ))
    .unwrap();
    let plain = udp4(v4([1, 1, 1, 1]), v4([2, 2, 2, 2]), 999, 53, b"q");
    let tag = |vid: u16| {
        let mut f = plain[..12].to_vec();
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&(0x2000 | vid).to_be_bytes());
        f.extend_from_slice(&plain[12..]);
        f
    };
    assert_eq!(run(&mut n, 0, &plain).0, to_sw(1, None));
    assert_eq!(run(&mut n, 0, &tag(100)).0, to_sw(2, None));
    assert_eq!(run(&mut n, 0, &tag(200)).0, to_sw(3, None));
    // VID 300: no rule has it; the untagged rule does not match a tagged frame.
    assert_eq!(run(&mut n, 0, &tag(300)).0, to_sw(ir::SOFTWARE_QUEUE, None));
}

#[test]
fn pattern_without_eth_implies_any_eth() {
    let mut n = nic(Profile::Full);
    n.create(&rule(
        0,
        0,
        0,
        vec![ipv4_dst([10, 0, 0, 0], 8), any_udp()],
        vec![Action::Queue(1)],
    ))
    .unwrap();
    n.create(&rule(0, 0, 1, vec![any_udp()], vec![Action::Queue(2)]))
        .unwrap();
    let udp = udp4(v4([1, 1, 1, 1]), v4([10, 2, 2, 2]), 999, 53, b"q");
    let far = udp4(v4([1, 1, 1, 1]), v4([11, 2, 2, 2]), 999, 53, b"q");
    assert_eq!(run(&mut n, 0, &udp).0, to_sw(1, None));
    // [Udp] means Eth/Udp, which no IP packet is.
    assert_eq!(run(&mut n, 0, &far).0, to_sw(ir::SOFTWARE_QUEUE, None));
}

#[test]
fn l4_items_follow_the_ip_protocol() {
    let mut n = nic(Profile::Full);
    n.create(&rule(
        0,
        0,
        0,
        vec![any_eth(), any_ipv4(), tcp_dst(80)],
        vec![Action::Queue(1)],
    ))
    .unwrap();
    n.create(&rule(
        0,
        0,
        1,
        vec![any_eth(), any_ipv4(), udp_dst(80)],
        vec![Action::Queue(2)],
    ))
    .unwrap();
    n.create(&rule(
        0,
        0,
        2,
        vec![any_eth(), any_ipv6(), tcp_dst(80)],
        vec![Action::Queue(3)],
    ))
    .unwrap();
    let (s, d) = (v4([1, 1, 1, 1]), v4([2, 2, 2, 2]));
    assert_eq!(run(&mut n, 0, &tcp4(s, d, 5, 80, b"x")).0, to_sw(1, None));
    assert_eq!(run(&mut n, 0, &udp4(s, d, 5, 80, b"x")).0, to_sw(2, None));
    assert_eq!(
        run(
            &mut n,
            0,
            &tcp6(v6("2001:db8::1"), v6("2001:db8::2"), 5, 80, b"x")
        )
        .0,
        to_sw(3, None)
    );
    assert_eq!(
        run(
            &mut n,
            0,
            &udp6(v6("2001:db8::1"), v6("2001:db8::2"), 5, 80, b"x")
        )
        .0,
        to_sw(0, None)
    );
    // Same bytes after the IPv4 header, but protocol ICMP: no UDP item matches.
    let seg = udp_segment(5, 80, b"x", None);
    let icmp = ether(MAC_A, MAC_B, 0x0800, &ipv4_packet(s, d, ICMP, 64, 0, &seg));
    assert_eq!(run(&mut n, 0, &icmp).0, to_sw(ir::SOFTWARE_QUEUE, None));
}

#[test]
fn non_first_fragments_do_not_match_l4_items() {
    let mut n = nic(Profile::Full);
    n.create(&rule(
        0,
        0,
        0,
        vec![any_eth(), any_ipv4(), udp_dst(53)],
        vec![Action::Queue(1)],
    ))
    .unwrap();
    n.create(&rule(
        0,
        0,
        1,
        vec![any_eth(), any_ipv4()],
        vec![Action::Queue(2)],
    ))
    .unwrap();
    let (s, d) = (v4([1, 1, 1, 1]), v4([2, 2, 2, 2]));
    let seg = udp_segment(999, 53, &[7; 32], None);
    // First fragment (MF, offset 0): the UDP header is there.
    let first = ether(
        MAC_A,
        MAC_B,
        0x0800,
        &ipv4_packet(s, d, UDP, 64, 0x2000, &seg[..24]),
    );
    assert_eq!(run(&mut n, 0, &first).0, to_sw(1, None));
    // Offset 24 bytes (3 units) whose payload happens to look like a UDP header.
    let later = ether(MAC_A, MAC_B, 0x0800, &ipv4_packet(s, d, UDP, 64, 3, &seg));
    assert_eq!(run(&mut n, 0, &later).0, to_sw(2, None));
}

#[test]
fn vxlan_items_describe_the_inner_frame() {
    let mut n = nic(Profile::Full);
    let inner_tcp = vec![
        any_eth(),
        any_ipv4(),
        udp_dst(4789),
        vxlan_vni(42),
        any_eth(),
        any_ipv4(),
        tcp_dst(443),
    ];
    n.create(&rule(0, 0, 0, inner_tcp, vec![Action::Queue(1)]))
        .unwrap();
    n.create(&rule(
        0,
        0,
        1,
        vec![any_eth(), any_ipv4(), udp_dst(4789), vxlan_vni(42)],
        vec![Action::Queue(2)],
    ))
    .unwrap();
    let inner = tcp4(v4([10, 0, 0, 1]), v4([10, 0, 0, 2]), 5555, 443, b"hi");
    let mut e = run_encap(&inner, 42);
    assert_eq!(run(&mut n, 0, &e).0, to_sw(1, None));
    let other = tcp4(v4([10, 0, 0, 1]), v4([10, 0, 0, 2]), 5555, 80, b"hi");
    assert_eq!(run(&mut n, 0, &run_encap(&other, 42)).0, to_sw(2, None));
    assert_eq!(run(&mut n, 0, &run_encap(&inner, 43)).0, to_sw(0, None));
    // A UDP length that does not cover the VXLAN header: no VXLAN in the stack.
    e[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&12u16.to_be_bytes());
    assert_eq!(run(&mut n, 0, &e).0, to_sw(0, None));
}

fn run_encap(inner: &[u8], vni: u32) -> Vec<u8> {
    let mut n = nic(Profile::Full);
    n.create(&rule(
        9,
        0,
        0,
        vec![],
        vec![Action::VxlanEncap(encap_spec(vni)), Action::Port(PortId(0))],
    ))
    .unwrap();
    let (v, f) = run(&mut n, 9, inner);
    assert_eq!(v, tx(0));
    f
}

// ---------------------------------------------------------------------------------------------
// Meters and counters.
// ---------------------------------------------------------------------------------------------

#[test]
fn meter_polices_a_flood() {
    let (cir, cbs) = (1_000_000u64, 15_000u64);
    let mut n = nic(Profile::Full);
    let m = MeterRef(1);
    n.create_meter(
        m,
        MeterProfile::TrTcm {
            cir,
            cbs,
            pir: cir,
            pbs: cbs,
        },
        0,
    )
    .unwrap();
    let h = n
        .create(&rule(
            0,
            0,
            0,
            vec![],
            vec![Action::Meter(m), Action::Count, Action::Port(PortId(1))],
        ))
        .unwrap();
    let payload = vec![0u8; 1500 - 42];
    let frame = udp4(v4([1, 1, 1, 1]), v4([2, 2, 2, 2]), 1, 2, &payload);
    assert_eq!(frame.len(), 1500);
    let mut f = frame.clone();
    let (mut forwarded, mut red) = (0u64, 0u64);
    // 1500-byte packets every microsecond for one second: 1.5 GB/s offered.
    for i in 0..1_000_000u64 {
        match n.process(PortId(0), &mut f, i * 1_000) {
            NicVerdict::Tx { port } => {
                assert_eq!(port, PortId(1));
                forwarded += f.len() as u64;
            }
            NicVerdict::Drop(NicDrop::Meter) => red += 1,
            other => panic!("{other:?}"),
        }
    }
    let expected = cbs + cir;
    let diff = forwarded.abs_diff(expected);
    assert!(
        diff * 100 <= expected,
        "forwarded {forwarded}, expected about {expected}"
    );
    assert_eq!(n.query_count(h), Some((forwarded / 1500, forwarded)));
    assert_eq!(red + forwarded / 1500, 1_000_000);
    // In use: cannot be destroyed before its rule.
    assert_eq!(
        n.destroy_meter(m),
        Err(RefNicError::MeterInUse { meter: m, rule: h })
    );
    n.destroy(h).unwrap();
    n.destroy_meter(m).unwrap();
    assert_eq!(n.destroy_meter(m), Err(RefNicError::UnknownMeter(m)));
}

#[test]
fn meter_red_skips_the_rest_of_the_list() {
    let mut n = nic(Profile::Full);
    let m = MeterRef(3);
    n.create_meter(
        m,
        MeterProfile::SrTcm {
            cir: 1,
            cbs: 100,
            ebs: 0,
        },
        0,
    )
    .unwrap();
    n.create(&rule(
        0,
        0,
        0,
        vec![],
        vec![
            Action::Mark(1),
            Action::Meter(m),
            Action::SetMacDst(MAC_C),
            Action::Queue(2),
        ],
    ))
    .unwrap();
    let small = vec![0u8; 60];
    let (v, f) = run(&mut n, 0, &small);
    assert_eq!(v, to_sw(2, Some(1)));
    assert_eq!(&f[..6], &MAC_C.0);
    let (v, f) = run(&mut n, 0, &small);
    assert_eq!(v, dropped(NicDrop::Meter));
    assert_eq!(f, small);
}

#[test]
fn counters_count_packets_and_bytes_at_that_point() {
    let mut n = nic(Profile::Full);
    let counted = n
        .create(&rule(
            0,
            0,
            0,
            vec![any_eth(), any_ipv4(), udp_dst(53)],
            vec![
                Action::Count,
                Action::RawEncap(vec![0xee; 4]),
                Action::Count,
                Action::Port(PortId(1)),
            ],
        ))
        .unwrap();
    let uncounted = n
        .create(&rule(0, 0, 1, vec![], vec![Action::Drop]))
        .unwrap();
    let a = udp4(v4([1, 1, 1, 1]), v4([2, 2, 2, 2]), 1, 53, b"abc");
    let b = udp4(v4([1, 1, 1, 1]), v4([2, 2, 2, 2]), 1, 53, &[0; 100]);
    let c = udp4(v4([1, 1, 1, 1]), v4([2, 2, 2, 2]), 1, 54, &[0; 100]);
    assert_eq!(n.query_count(counted), Some((0, 0)));
    assert_eq!(run(&mut n, 0, &a).0, tx(1));
    assert_eq!(run(&mut n, 0, &b).0, tx(1));
    assert_eq!(run(&mut n, 0, &c).0, dropped(NicDrop::Rule));
    // Each Count counts: once before and once after the 4-byte push.
    let bytes = (a.len() + b.len()) as u64 + (a.len() + b.len() + 8) as u64;
    assert_eq!(n.query_count(counted), Some((4, bytes)));
    assert_eq!(n.query_count(uncounted), None);
    assert_eq!(n.query_count(RuleHandle(12345)), None);
}

// ---------------------------------------------------------------------------------------------
// Refusals.
// ---------------------------------------------------------------------------------------------

/// Asserts that `create` refuses with `want` and leaves the NIC exactly as it was.
fn refused(n: &mut RefNic, r: &Rule, want: Refusal) {
    let before = format!("{n:?}");
    assert_eq!(n.create(r), Err(want));
    assert_eq!(format!("{n:?}"), before, "state changed after a refusal");
}

#[test]
fn unsupported_item_under_taplike() {
    let mut n = nic(Profile::TapLike);
    let r = rule(
        0,
        0,
        0,
        vec![any_eth(), any_ipv4(), udp_dst(4789), vxlan_vni(1)],
        vec![Action::Queue(1)],
    );
    assert_eq!(
        n.validate(&r),
        Err(Refusal::Item {
            index: 3,
            item: ItemKind::Vxlan
        })
    );
    refused(
        &mut n,
        &r,
        Refusal::Item {
            index: 3,
            item: ItemKind::Vxlan,
        },
    );
    // What TapLike does support works.
    n.create(&rule(
        0,
        0,
        63,
        vec![any_eth(), any_ipv4(), udp_dst(53)],
        vec![Action::Queue(1)],
    ))
    .unwrap();
}

#[test]
fn unsupported_actions() {
    let mut n = nic(Profile::TapLike);
    let r = rule(0, 0, 0, vec![], vec![Action::Mark(1), Action::Queue(1)]);
    refused(
        &mut n,
        &r,
        Refusal::Action {
            index: 0,
            action: ActionKind::Mark,
        },
    );
    let r = rule(0, 0, 0, vec![], vec![Action::Port(PortId(1))]);
    refused(
        &mut n,
        &r,
        Refusal::Action {
            index: 0,
            action: ActionKind::Port,
        },
    );
    // Partial has no port rewrites.
    let mut n = nic(Profile::Partial);
    let r = rule(
        0,
        0,
        0,
        vec![],
        vec![Action::SetTpDst(80), Action::Port(PortId(1))],
    );
    refused(
        &mut n,
        &r,
        Refusal::Action {
            index: 0,
            action: ActionKind::SetTpDst,
        },
    );
    // No profile offers Nat64; refnic refuses it even when a probed set lists it.
    let r = rule(
        0,
        0,
        0,
        vec![],
        vec![
            Action::Nat64(Nat64Direction::SixToFour),
            Action::Port(PortId(1)),
        ],
    );
    refused(
        &mut nic(Profile::Full),
        &r,
        Refusal::Action {
            index: 0,
            action: ActionKind::Nat64,
        },
    );
    let mut probed = Caps::profile(Profile::Full);
    probed.actions.insert(ActionKind::Nat64);
    refused(
        &mut RefNic::new(probed),
        &r,
        Refusal::Action {
            index: 0,
            action: ActionKind::Nat64,
        },
    );
    // An empty RSS list, a VNI beyond 24 bits.
    let mut n = nic(Profile::Full);
    refused(
        &mut n,
        &rule(0, 0, 0, vec![], vec![Action::Count, Action::Rss(vec![])]),
        Refusal::Action {
            index: 1,
            action: ActionKind::Rss,
        },
    );
    let big = rule(
        0,
        0,
        0,
        vec![],
        vec![
            Action::VxlanEncap(encap_spec(1 << 24)),
            Action::Port(PortId(1)),
        ],
    );
    refused(
        &mut n,
        &big,
        Refusal::Action {
            index: 0,
            action: ActionKind::VxlanEncap,
        },
    );
}

#[test]
fn encap_with_modify_under_partial() {
    let actions = vec![
        Action::DecTtl,
        Action::VxlanEncap(encap_spec(5)),
        Action::Port(PortId(1)),
    ];
    let r = rule(0, 0, 0, vec![], actions);
    refused(
        &mut nic(Profile::Partial),
        &r,
        Refusal::EncapWithModify {
            index: 1,
            action: ActionKind::VxlanEncap,
        },
    );
    // Either alone is fine under Partial, both together under Full.
    let mut n = nic(Profile::Partial);
    n.create(&rule(
        0,
        0,
        0,
        vec![],
        vec![Action::DecTtl, Action::Port(PortId(1))],
    ))
    .unwrap();
    n.create(&rule(
        0,
        0,
        1,
        vec![],
        vec![Action::VxlanEncap(encap_spec(5)), Action::Port(PortId(1))],
    ))
    .unwrap();
    nic(Profile::Full).create(&r).unwrap();
}

#[test]
fn priority_out_of_range() {
    let mut n = nic(Profile::Partial);
    n.create(&rule(0, 0, 7, vec![], vec![Action::Drop]))
        .unwrap();
    let r = rule(0, 0, 8, vec![], vec![Action::Drop]);
    refused(
        &mut n,
        &r,
        Refusal::Priority {
            priority: 8,
            available: 8,
        },
    );
}

#[test]
fn too_many_groups() {
    let caps = Caps {
        max_groups: 2,
        ..Caps::profile(Profile::Full)
    };
    let mut n = RefNic::new(caps);
    n.create(&rule(0, 0, 0, vec![], vec![Action::Jump(1)]))
        .unwrap();
    let in2 = n
        .create(&rule(0, 2, 0, vec![], vec![Action::Jump(1)]))
        .unwrap();
    // Groups 1 and 2 are used: a third is refused, as its own group or as a jump target.
    refused(
        &mut n,
        &rule(0, 3, 0, vec![], vec![Action::Drop]),
        Refusal::Group { group: 3 },
    );
    refused(
        &mut n,
        &rule(0, 1, 0, vec![], vec![Action::Jump(4)]),
        Refusal::Group { group: 4 },
    );
    // Reusing them is fine; group 0 is free; other ports have their own budget.
    n.create(&rule(0, 1, 0, vec![], vec![Action::Jump(2)]))
        .unwrap();
    n.create(&rule(0, 0, 1, vec![], vec![Action::Drop]))
        .unwrap();
    n.create(&rule(1, 3, 0, vec![], vec![Action::Jump(4)]))
        .unwrap();
    // Group 2 stays in use after its only rule goes: the group-1 rule still jumps to it.
    n.destroy(in2).unwrap();
    refused(
        &mut n,
        &rule(0, 5, 0, vec![], vec![Action::Drop]),
        Refusal::Group { group: 5 },
    );
    // TapLike has no groups at all.
    refused(
        &mut nic(Profile::TapLike),
        &rule(0, 1, 0, vec![], vec![Action::Drop]),
        Refusal::Group { group: 1 },
    );
}

#[test]
fn groups_are_released_with_their_rules() {
    let caps = Caps {
        max_groups: 1,
        ..Caps::profile(Profile::Full)
    };
    let mut n = RefNic::new(caps);
    let a = n
        .create(&rule(0, 0, 0, vec![], vec![Action::Jump(1)]))
        .unwrap();
    let b = n
        .create(&rule(0, 1, 0, vec![], vec![Action::Drop]))
        .unwrap();
    refused(
        &mut n,
        &rule(0, 2, 0, vec![], vec![Action::Drop]),
        Refusal::Group { group: 2 },
    );
    n.destroy(a).unwrap();
    refused(
        &mut n,
        &rule(0, 2, 0, vec![], vec![Action::Drop]),
        Refusal::Group { group: 2 },
    );
    n.destroy(b).unwrap();
    n.create(&rule(0, 2, 0, vec![], vec![Action::Drop]))
        .unwrap();
}

#[test]
fn table_full_at_max_rules_exactly() {
    let caps = Caps {
        max_rules: 3,
        ..Caps::profile(Profile::Full)
    };
    let mut n = RefNic::new(caps);
    let hs: Vec<RuleHandle> = (0..3)
        .map(|p| {
            n.create(&rule(0, 0, p, vec![], vec![Action::Drop]))
                .unwrap()
        })
        .collect();
    let r = rule(0, 0, 5, vec![], vec![Action::Drop]);
    // Validation does not look at table space.
    assert_eq!(n.validate(&r), Ok(()));
    refused(&mut n, &r, Refusal::NoSpace);
    n.destroy(hs[1]).unwrap();
    n.create(&r).unwrap();
    refused(&mut n, &r, Refusal::NoSpace);
    assert_eq!(n.rule_count(), 3);
}

#[test]
fn meter_limits_and_missing_meters() {
    let caps = Caps {
        max_meters: 2,
        ..Caps::profile(Profile::Full)
    };
    let p = MeterProfile::SrTcm {
        cir: 1000,
        cbs: 2000,
        ebs: 2000,
    };
    let mut n = RefNic::new(caps);
    n.create_meter(MeterRef(1), p, 0).unwrap();
    assert_eq!(
        n.create_meter(MeterRef(1), p, 0),
        Err(RefNicError::DuplicateMeter(MeterRef(1)))
    );
    n.create_meter(MeterRef(2), p, 0).unwrap();
    assert_eq!(
        n.create_meter(MeterRef(3), p, 0),
        Err(RefNicError::Refused(Refusal::NoMeter))
    );
    assert_eq!(n.meter_count(), 2);
    // A rule naming a meter that does not exist.
    let r = rule(
        0,
        0,
        0,
        vec![],
        vec![Action::Meter(MeterRef(3)), Action::Drop],
    );
    refused(&mut n, &r, Refusal::NoMeter);
    n.destroy_meter(MeterRef(2)).unwrap();
    n.create_meter(MeterRef(3), p, 0).unwrap();
    n.create(&r).unwrap();
    // TapLike has no meters.
    assert_eq!(
        nic(Profile::TapLike).create_meter(MeterRef(1), p, 0),
        Err(RefNicError::Refused(Refusal::NoMeter))
    );
}

#[test]
fn exactly_one_fate() {
    let mut n = nic(Profile::Full);
    for actions in [
        vec![],
        vec![Action::Count, Action::Mark(3)],
        vec![Action::Queue(1), Action::Drop],
        vec![Action::Jump(1), Action::Port(PortId(2))],
        vec![Action::Rss(vec![1, 2]), Action::Queue(1)],
    ] {
        let r = rule(0, 0, 0, vec![], actions);
        assert_eq!(n.validate(&r), Err(Refusal::NoFate));
        refused(&mut n, &r, Refusal::NoFate);
    }
}

#[test]
fn only_ingress_attributes() {
    let mut n = nic(Profile::Full);
    let base = rule(0, 0, 0, vec![], vec![Action::Drop]);
    for (ingress, egress, transfer) in [
        (true, true, false),
        (true, false, true),
        (false, true, false),
        (false, false, false),
    ] {
        let mut r = base.clone();
        r.attr.ingress = ingress;
        r.attr.egress = egress;
        r.attr.transfer = transfer;
        refused(&mut n, &r, Refusal::Attribute);
    }
    n.create(&base).unwrap();
}

#[test]
fn none_profile_refuses_everything() {
    let mut n = nic(Profile::None);
    let rules = [
        rule(0, 0, 0, vec![], vec![Action::Drop]),
        rule(0, 0, 0, vec![any_eth()], vec![Action::Queue(0)]),
        rule(0, 3, 9, vec![any_eth(), any_ipv4()], vec![Action::Jump(2)]),
        rule(0, 0, 0, vec![], vec![]),
    ];
    for r in &rules {
        assert_eq!(n.validate(r), Err(Refusal::NotImplemented));
        refused(&mut n, r, Refusal::NotImplemented);
    }
    let p = MeterProfile::SrTcm {
        cir: 1,
        cbs: 2000,
        ebs: 0,
    };
    assert_eq!(
        n.create_meter(MeterRef(0), p, 0),
        Err(RefNicError::Refused(Refusal::NotImplemented))
    );
    // Everything goes to software.
    let f = udp4(v4([1, 1, 1, 1]), v4([2, 2, 2, 2]), 1, 2, b"x");
    assert_eq!(run(&mut n, 0, &f), (to_sw(ir::SOFTWARE_QUEUE, None), f));
}

#[test]
fn refused_rules_leave_lookup_unchanged() {
    let caps = Caps {
        max_rules: 1,
        ..Caps::profile(Profile::Full)
    };
    let mut n = RefNic::new(caps);
    n.create(&rule(0, 0, 1, vec![], vec![Action::Queue(1)]))
        .unwrap();
    let f = udp4(v4([1, 1, 1, 1]), v4([2, 2, 2, 2]), 1, 2, b"x");
    refused(
        &mut n,
        &rule(0, 0, 0, vec![], vec![Action::Drop]),
        Refusal::NoSpace,
    );
    assert_eq!(run(&mut n, 0, &f).0, to_sw(1, None));
}

// ---------------------------------------------------------------------------------------------
// Rewrites and checksums.
// ---------------------------------------------------------------------------------------------

fn rewrite(frame: &[u8], actions: Vec<Action>) -> (NicVerdict, Vec<u8>) {
    let mut n = nic(Profile::Full);
    let mut actions = actions;
    actions.push(Action::Port(PortId(1)));
    n.create(&rule(0, 0, 0, vec![], actions)).unwrap();
    run(&mut n, 0, frame)
}

#[test]
fn ipv4_rewrites_fix_checksums() {
    let (s, d) = (v4([10, 0, 0, 1]), v4([10, 0, 0, 2]));
    let new = v4([203, 0, 113, 77]);
    for frame in [
        udp4(s, d, 1111, 2222, b"payload!"),
        tcp4(s, d, 1111, 2222, b"odd"),
    ] {
        let proto = frame[23];
        let cases: Vec<(Action, usize, Vec<u8>)> = vec![
            (Action::SetIpv4Src(new), 26, new.octets().to_vec()),
            (Action::SetIpv4Dst(new), 30, new.octets().to_vec()),
            (Action::SetTpSrc(53), 34, 53u16.to_be_bytes().to_vec()),
            (Action::SetTpDst(65535), 36, 65535u16.to_be_bytes().to_vec()),
            (Action::SetMacSrc(MAC_C), 6, MAC_C.0.to_vec()),
            (Action::SetMacDst(MAC_D), 0, MAC_D.0.to_vec()),
            (Action::DecTtl, 22, vec![63]),
        ];
        for (action, at, bytes) in cases {
            let (v, f) = rewrite(&frame, vec![action.clone()]);
            assert_eq!(v, tx(1), "{action:?}");
            assert_eq!(&f[at..at + bytes.len()], &bytes[..], "{action:?}");
            assert_eq!(f.len(), frame.len());
            let c = verify_checksums(&f);
            assert!(
                c.ipv4_header && c.l4 == Some(proto) && !c.udp_none,
                "{action:?}: {c:?}"
            );
        }
        // All at once.
        let (v, f) = rewrite(
            &frame,
            vec![
                Action::SetIpv4Src(new),
                Action::SetIpv4Dst(v4([198, 51, 100, 1])),
                Action::SetTpSrc(40000),
                Action::SetTpDst(443),
                Action::DecTtl,
                Action::DecTtl,
            ],
        );
        assert_eq!(v, tx(1));
        assert_eq!(f[22], 62);
        verify_checksums(&f);
    }
}

#[test]
fn zero_udp_checksum_stays_zero() {
    let (s, d) = (v4([10, 0, 0, 1]), v4([10, 0, 0, 2]));
    let seg = udp_segment(1, 2, b"no checksum", None);
    let frame = ether(MAC_A, MAC_B, 0x0800, &ipv4_packet(s, d, UDP, 64, 0, &seg));
    let (v, f) = rewrite(
        &frame,
        vec![
            Action::SetIpv4Src(v4([1, 2, 3, 4])),
            Action::SetTpDst(99),
            Action::DecTtl,
        ],
    );
    assert_eq!(v, tx(1));
    assert_eq!(be16(&f, 34 + 6), 0);
    let c = verify_checksums(&f);
    assert!(c.ipv4_header && c.udp_none);
}

#[test]
fn ipv6_rewrites_fix_checksums() {
    let (s, d) = (v6("2001:db8::1"), v6("2001:db8:ffff::2"));
    let new = v6("fd00:1234:5678::abcd");
    let frames = [
        udp6(s, d, 7, 8, b"datagram"),
        tcp6(s, d, 7, 8, b"segment"),
        icmp6(s, d, b"ping"),
    ];
    for frame in frames {
        let nh = frame[20];
        for (action, at) in [(Action::SetIpv6Src(new), 22), (Action::SetIpv6Dst(new), 38)] {
            let (v, f) = rewrite(&frame, vec![action.clone()]);
            assert_eq!(v, tx(1));
            assert_eq!(&f[at..at + 16], &new.octets());
            assert_eq!(verify_checksums(&f).l4, Some(nh));
        }
        let (v, f) = rewrite(&frame, vec![Action::DecTtl]);
        assert_eq!(v, tx(1));
        assert_eq!(f[21], 63);
        verify_checksums(&f);
        if nh != ICMPV6 {
            let (v, f) = rewrite(&frame, vec![Action::SetTpSrc(1), Action::SetTpDst(0xfffe)]);
            assert_eq!(v, tx(1));
            assert_eq!((be16(&f, 54), be16(&f, 56)), (1, 0xfffe));
            verify_checksums(&f);
        } else {
            let (v, _) = rewrite(&frame, vec![Action::SetTpSrc(1)]);
            assert_eq!(v, dropped(NicDrop::Malformed));
        }
    }
}

#[test]
fn rewriting_a_missing_header_drops_as_malformed() {
    let four = udp4(v4([1, 1, 1, 1]), v4([2, 2, 2, 2]), 1, 2, b"x");
    let six = udp6(v6("::1"), v6("::2"), 1, 2, b"x");
    let arp = ether(MAC_A, MAC_B, 0x0806, &[0; 28]);
    let malformed = dropped(NicDrop::Malformed);
    assert_eq!(
        rewrite(&six, vec![Action::SetIpv4Src(v4([1, 2, 3, 4]))]).0,
        malformed
    );
    assert_eq!(
        rewrite(&four, vec![Action::SetIpv6Dst(v6("::3"))]).0,
        malformed
    );
    assert_eq!(rewrite(&arp, vec![Action::DecTtl]).0, malformed);
    assert_eq!(rewrite(&arp, vec![Action::SetTpDst(1)]).0, malformed);
    assert_eq!(rewrite(&four, vec![Action::VxlanDecap]).0, malformed);
    assert_eq!(
        rewrite(&four, vec![Action::RawDecap(four.len() as u16 + 1)]).0,
        malformed
    );
    assert_eq!(
        rewrite(&[1, 2, 3], vec![Action::SetMacSrc(MAC_C)]).0,
        malformed
    );
    // An IPv6 extension header hides the upper-layer checksum: refused rather than broken.
    let hbh = ether(
        MAC_A,
        MAC_B,
        0x86dd,
        &ipv6_packet(v6("::1"), v6("::2"), 0, 64, &[17, 0, 1, 4, 0, 0, 0, 0]),
    );
    assert_eq!(
        rewrite(&hbh, vec![Action::SetIpv6Src(v6("::9"))]).0,
        malformed
    );
    // A rewrite on a non-first fragment fixes the IP header only.
    let s = v4([1, 1, 1, 1]);
    let later = ether(
        MAC_A,
        MAC_B,
        0x0800,
        &ipv4_packet(s, s, UDP, 64, 100, &[9; 16]),
    );
    let (v, f) = rewrite(&later, vec![Action::SetIpv4Dst(v4([5, 5, 5, 5]))]);
    assert_eq!(v, tx(1));
    assert_eq!(&f[34..], &later[34..]);
    assert_eq!(rewrite(&later, vec![Action::SetTpSrc(1)]).0, malformed);
}

#[test]
fn fate_applies_after_the_whole_list() {
    let frame = udp4(v4([1, 1, 1, 1]), v4([2, 2, 2, 2]), 1, 2, b"x");
    let mut n = nic(Profile::Full);
    n.create(&rule(
        0,
        0,
        0,
        vec![],
        vec![
            Action::Port(PortId(4)),
            Action::SetMacDst(MAC_D),
            Action::Mark(1),
        ],
    ))
    .unwrap();
    let (v, f) = run(&mut n, 0, &frame);
    assert_eq!(v, tx(4));
    assert_eq!(&f[..6], &MAC_D.0);
    // RSS delivers to the first queue of its list.
    let mut n = nic(Profile::Full);
    n.create(&rule(
        0,
        0,
        0,
        vec![],
        vec![Action::Rss(vec![6, 7, 8]), Action::Mark(9)],
    ))
    .unwrap();
    assert_eq!(run(&mut n, 0, &frame).0, to_sw(6, Some(9)));
}

#[test]
fn dec_ttl_at_one_traps_unmodified() {
    let (s, d) = (v4([10, 0, 0, 1]), v4([10, 9, 0, 2]));
    let pseudo = pseudo_v4(s, d, UDP, 12);
    let seg = udp_segment(1, 2, b"ttl!", Some(&pseudo));
    let m = ir::mark::resume_in_vrf(3);
    let route = vec![
        Action::Mark(m),
        Action::SetMacSrc(MAC_C),
        Action::SetMacDst(MAC_D),
        Action::Count,
        Action::DecTtl,
        Action::Port(PortId(1)),
    ];
    for ttl in [0u8, 1] {
        let frame = ether(MAC_A, MAC_B, 0x0800, &ipv4_packet(s, d, UDP, ttl, 0, &seg));
        let mut n = nic(Profile::Full);
        let h = n
            .create(&rule(0, 0, 0, vec![any_eth(), any_ipv4()], route.clone()))
            .unwrap();
        let (v, f) = run(&mut n, 0, &frame);
        assert_eq!(v, to_sw(ir::SOFTWARE_QUEUE, Some(m)));
        assert_eq!(f, frame, "trapped frame must be unmodified");
        assert_eq!(n.query_count(h), Some((1, frame.len() as u64)));
    }
    // TTL 2 is forwarded with TTL 1.
    let frame = ether(MAC_A, MAC_B, 0x0800, &ipv4_packet(s, d, UDP, 2, 0, &seg));
    let mut n = nic(Profile::Full);
    n.create(&rule(0, 0, 0, vec![], route.clone())).unwrap();
    let (v, f) = run(&mut n, 0, &frame);
    assert_eq!(v, tx(1));
    assert_eq!((f[22], &f[..6], &f[6..12]), (1, &MAC_D.0[..], &MAC_C.0[..]));
    verify_checksums(&f);
    // IPv6 hop limit 1.
    let six = ether(
        MAC_A,
        MAC_B,
        0x86dd,
        &ipv6_packet(v6("::1"), v6("::2"), UDP, 1, &[0; 8]),
    );
    let (v, f) = run(&mut n, 0, &six);
    assert_eq!((v, f), (to_sw(ir::SOFTWARE_QUEUE, Some(m)), six));
    // A decap in an earlier group stays done: only the routing rule's rewrites are undone.
    let mut n = nic(Profile::Full);
    n.create(&rule(
        0,
        0,
        0,
        vec![any_eth(), any_ipv4(), udp_dst(4789)],
        vec![Action::VxlanDecap, Action::Mark(m), Action::Jump(1)],
    ))
    .unwrap();
    n.create(&rule(0, 1, 0, vec![], route[1..].to_vec()))
        .unwrap();
    let expiring = ether(MAC_A, MAC_B, 0x0800, &ipv4_packet(s, d, UDP, 1, 0, &seg));
    let (v, f) = run(&mut n, 0, &run_encap(&expiring, 77));
    assert_eq!((v, f), (to_sw(ir::SOFTWARE_QUEUE, Some(m)), expiring));
}

// ---------------------------------------------------------------------------------------------
// Encapsulation.
// ---------------------------------------------------------------------------------------------

/// Checks the 50 bytes a VXLAN encap pushed in front of `inner`.
fn check_vxlan_outer(f: &[u8], inner: &[u8], e: &VxlanEncap) {
    assert_eq!(f.len(), inner.len() + 50);
    assert_eq!(&f[50..], inner);
    assert_eq!(&f[0..6], &e.eth_dst.0);
    assert_eq!(&f[6..12], &e.eth_src.0);
    assert_eq!(be16(f, 12), 0x0800);
    let ip = &f[14..34];
    assert_eq!(ip[0], 0x45);
    assert_eq!(ip[1], 0);
    assert_eq!(usize::from(be16(ip, 2)), inner.len() + 36);
    assert_eq!(be16(ip, 4), 0);
    assert_eq!(be16(ip, 6), 0x4000);
    assert_eq!((ip[8], ip[9]), (64, UDP));
    assert_eq!(&ip[12..16], &e.ip_src.octets());
    assert_eq!(&ip[16..20], &e.ip_dst.octets());
    let udp = &f[34..42];
    assert_eq!(be16(udp, 0), e.udp_src);
    assert_eq!(be16(udp, 2), 4789);
    assert_eq!(usize::from(be16(udp, 4)), inner.len() + 16);
    assert_eq!(be16(udp, 6), 0);
    assert_eq!(&f[42..46], &[0x08, 0, 0, 0]);
    assert_eq!(&f[46..50], &(e.vni << 8).to_be_bytes());
    let c = verify_checksums(f);
    assert!(c.ipv4_header && c.udp_none);
}

#[test]
fn vxlan_encap_then_decap_round_trip() {
    let e = encap_spec(0x00ab_cdef);
    let mut n = nic(Profile::Full);
    n.create(&rule(
        0,
        0,
        0,
        vec![any_eth(), ipv4_dst([10, 0, 0, 0], 8)],
        vec![
            Action::Count,
            Action::VxlanEncap(e),
            Action::Port(PortId(1)),
        ],
    ))
    .unwrap();
    let decap = vec![any_eth(), any_ipv4(), udp_dst(4789), vxlan_vni(e.vni)];
    n.create(&rule(
        1,
        0,
        0,
        decap,
        vec![Action::VxlanDecap, Action::Port(PortId(2))],
    ))
    .unwrap();
    for inner in [
        udp4(v4([10, 1, 1, 1]), v4([10, 2, 2, 2]), 1, 2, b"hello"),
        tcp4(v4([10, 1, 1, 1]), v4([10, 2, 2, 2]), 1, 2, &[0x55; 1400]),
    ] {
        let (v, f) = run(&mut n, 0, &inner);
        assert_eq!(v, tx(1));
        check_vxlan_outer(&f, &inner, &e);
        let (v, back) = run(&mut n, 1, &f);
        assert_eq!(v, tx(2));
        assert_eq!(back, inner);
    }
    // Decap over an IPv6 underlay, and trailing bytes beyond the UDP datagram are dropped.
    let inner = udp4(v4([10, 1, 1, 1]), v4([10, 2, 2, 2]), 1, 2, b"v6 underlay");
    let mut vx = vec![0x08, 0, 0, 0, 0, 0, 0x2a, 0];
    vx.extend_from_slice(&inner);
    let seg = udp_segment(5000, 4789, &vx, None);
    let mut outer = ether(
        MAC_C,
        MAC_D,
        0x86dd,
        &ipv6_packet(v6("fd00::1"), v6("fd00::2"), UDP, 64, &seg),
    );
    outer.extend_from_slice(&[0xaa; 6]);
    assert_eq!(rewrite(&outer, vec![Action::VxlanDecap]), (tx(1), inner));
}

#[test]
fn raw_encap_and_decap() {
    let frame = udp4(v4([1, 1, 1, 1]), v4([2, 2, 2, 2]), 1, 2, b"raw");
    let push = vec![1u8, 2, 3, 4, 5];
    let (v, f) = rewrite(&frame, vec![Action::RawEncap(push.clone())]);
    assert_eq!(v, tx(1));
    assert_eq!(&f[..5], &push[..]);
    assert_eq!(&f[5..], &frame[..]);
    let (v, back) = rewrite(&f, vec![Action::RawDecap(5)]);
    assert_eq!((v, back), (tx(1), frame.clone()));
    assert_eq!(
        rewrite(&frame, vec![Action::RawDecap(frame.len() as u16)]),
        (tx(1), vec![])
    );
}

// ---------------------------------------------------------------------------------------------
// Properties.
// ---------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn vxlan_round_trip_any_inner_frame(
        inner in proptest::collection::vec(any::<u8>(), 14..300),
        vni in 0u32..(1 << 24),
        src in any::<[u8; 4]>(),
        dst in any::<[u8; 4]>(),
    ) {
        let e = VxlanEncap {
            ip_src: v4(src),
            ip_dst: v4(dst),
            ..encap_spec(vni)
        };
        let (v, f) = rewrite(&inner, vec![Action::VxlanEncap(e)]);
        prop_assert_eq!(v, tx(1));
        check_vxlan_outer(&f, &inner, &e);
        let (v, back) = rewrite(&f, vec![Action::VxlanDecap]);
        prop_assert_eq!(v, tx(1));
        prop_assert_eq!(back, inner);
    }

    #[test]
    fn ipv4_rewrites_match_a_full_recomputation(
        src in any::<[u8; 4]>(),
        dst in any::<[u8; 4]>(),
        new_addr in any::<[u8; 4]>(),
        ports in any::<(u16, u16, u16)>(),
        ttl in 2u8..=255,
        tcp in any::<bool>(),
        payload in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let (s, d) = (v4(src), v4(dst));
        let (sport, dport, new_port) = ports;
        let mut frame = if tcp {
            tcp4(s, d, sport, dport, &payload)
        } else {
            udp4(s, d, sport, dport, &payload)
        };
        frame[22] = ttl;
        frame[24] = 0;
        frame[25] = 0;
        let c = internet_checksum(&frame[14..34]);
        frame[24..26].copy_from_slice(&c.to_be_bytes());
        for action in [
            Action::SetIpv4Src(v4(new_addr)),
            Action::SetIpv4Dst(v4(new_addr)),
            Action::SetTpSrc(new_port),
            Action::SetTpDst(new_port),
            Action::DecTtl,
        ] {
            let (v, f) = rewrite(&frame, vec![action]);
            prop_assert_eq!(v, tx(1));
            verify_checksums(&f);
        }
    }

    #[test]
    fn ipv6_rewrites_match_a_full_recomputation(
        src in any::<u128>(),
        dst in any::<u128>(),
        new_addr in any::<u128>(),
        ports in any::<(u16, u16, u16)>(),
        kind in 0u8..3,
        payload in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let (s, d, new) = (Ipv6Addr::from(src), Ipv6Addr::from(dst), Ipv6Addr::from(new_addr));
        let (sport, dport, new_port) = ports;
        let frame = match kind {
            0 => udp6(s, d, sport, dport, &payload),
            1 => tcp6(s, d, sport, dport, &payload),
            _ => icmp6(s, d, &payload),
        };
        let mut actions = vec![Action::SetIpv6Src(new), Action::SetIpv6Dst(new), Action::DecTtl];
        if kind < 2 {
            actions.push(Action::SetTpSrc(new_port));
            actions.push(Action::SetTpDst(new_port));
        }
        for action in actions {
            let (v, f) = rewrite(&frame, vec![action]);
            prop_assert_eq!(v, tx(1));
            verify_checksums(&f);
        }
    }

    #[test]
    fn any_bytes_are_processed_without_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        prefix in 0u8..4,
    ) {
        // Valid-looking headers in front of random bytes reach the deeper parsers.
        let mut frame = match prefix {
            0 => vec![],
            1 => ether(MAC_A, MAC_B, 0x0800, &[0x45, 0, 0, 60, 0, 0, 0, 0, 64, 17, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]),
            2 => ether(MAC_A, MAC_B, 0x86dd, &ipv6_packet(v6("::1"), v6("::2"), 6, 2, &[])),
            _ => run_encap(&ether(MAC_A, MAC_B, 0x8100, &[]), 9),
        };
        frame.extend_from_slice(&bytes);
        let mut n = nic(Profile::Full);
        n.create_meter(MeterRef(0), MeterProfile::SrTcm { cir: 1, cbs: 1 << 20, ebs: 0 }, 0).unwrap();
        let everything = vec![
            Action::Count,
            Action::Meter(MeterRef(0)),
            Action::SetMacSrc(MAC_C),
            Action::DecTtl,
            Action::SetIpv4Src(v4([9, 9, 9, 9])),
            Action::SetTpDst(7),
            Action::Jump(1),
        ];
        n.create(&rule(0, 0, 0, vec![any_eth(), any_ipv4(), any_udp(), vxlan_vni(9)], vec![Action::VxlanDecap, Action::Jump(1)])).unwrap();
        n.create(&rule(0, 0, 1, vec![any_eth(), any_ipv4()], everything)).unwrap();
        n.create(&rule(0, 0, 2, vec![any_eth(), any_ipv6()], vec![Action::SetIpv6Dst(v6("::9")), Action::DecTtl, Action::Jump(1)])).unwrap();
        n.create(&rule(0, 1, 0, vec![], vec![Action::RawEncap(vec![0; 3]), Action::RawDecap(3), Action::VxlanEncap(encap_spec(1)), Action::Port(PortId(1))])).unwrap();
        let before = frame.clone();
        let v = n.process(PortId(0), &mut frame, 5);
        if v == to_sw(ir::SOFTWARE_QUEUE, None) {
            prop_assert_eq!(frame, before);
        }
    }
}
