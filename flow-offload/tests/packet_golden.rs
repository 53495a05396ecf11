//! Golden bytes for every packet view: hand-written packets with hand-worked checksums, parsed
//! into the expected fields and re-emitted from reprs into exactly the same bytes. Checksums
//! are checked against the plain recomputation below, which does not use the library.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use core::net::{Ipv4Addr, Ipv6Addr};

use flow_offload::packet::checksum;
use flow_offload::packet::{
    ethertype, ip_proto, parse_layout, tcp, Error, EthernetFrame, EthernetRepr, Header,
    Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr,
    Layout, TcpPacket, TcpRepr, UdpPacket, UdpRepr, VlanRepr, VlanTag, VxlanPacket, VxlanRepr, L3,
    L4, VXLAN_PORT,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Independent checksum arithmetic: 16-bit big-endian words, end-around carry, one at a time.

fn ones_sum(parts: &[&[u8]]) -> u16 {
    let mut bytes = Vec::new();
    for p in parts {
        bytes.extend_from_slice(p);
    }
    if bytes.len() % 2 == 1 {
        bytes.push(0);
    }
    let mut acc: u32 = 0;
    for w in bytes.chunks(2) {
        acc += (u32::from(w[0]) << 8) | u32::from(w[1]);
        if acc > 0xFFFF {
            acc -= 0xFFFF;
        }
    }
    acc as u16
}

/// The checksum a header should carry, computed with its checksum field treated as zero.
fn internet_checksum(parts: &[&[u8]]) -> u16 {
    !ones_sum(parts)
}

fn pseudo4(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&src);
    v.extend_from_slice(&dst);
    v.push(0);
    v.push(proto);
    v.extend_from_slice(&len.to_be_bytes());
    v
}

fn pseudo6(src: [u8; 16], dst: [u8; 16], next: u8, len: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&src);
    v.extend_from_slice(&dst);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(&[0, 0, 0, next]);
    v
}

fn zero_at(bytes: &[u8], off: usize) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v[off] = 0;
    v[off + 1] = 0;
    v
}

// ---------------------------------------------------------------------------------------------
// Addresses used throughout.

const H1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const H2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const V6A: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const V6B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

// ---------------------------------------------------------------------------------------------
// Ethernet and VLAN.

#[rustfmt::skip]
const ETH: [u8; 14] = [
    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, // dst
    0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, // src
    0x81, 0x00,                         // 802.1Q
];

#[rustfmt::skip]
const VLAN: [u8; 4] = [
    0x60, 0x64, // PCP 3, DEI 0, VID 100
    0x86, 0xdd, // IPv6 inside
];

#[test]
fn ethernet_golden() {
    let f = EthernetFrame::new_checked(&ETH[..]).unwrap();
    assert_eq!(f.dst_addr(), [0x00, 0x11, 0x22, 0x33, 0x44, 0x55]);
    assert_eq!(f.src_addr(), [0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb]);
    assert_eq!(f.ethertype(), ethertype::VLAN);
    assert!(f.payload().is_empty());
    let r = EthernetRepr::parse(&f).unwrap();
    assert_eq!(
        r,
        EthernetRepr {
            src: [0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb],
            dst: [0x00, 0x11, 0x22, 0x33, 0x44, 0x55],
            ethertype: 0x8100,
        }
    );
    let mut out = [0xffu8; 14];
    r.emit(&mut EthernetFrame::new_unchecked(&mut out[..]));
    assert_eq!(out, ETH);
    assert_eq!(
        EthernetFrame::new_checked(&ETH[..13]).unwrap_err(),
        Error::Truncated {
            header: Header::Ethernet
        }
    );
}

#[test]
fn vlan_golden() {
    let t = VlanTag::new_checked(&VLAN[..]).unwrap();
    assert_eq!((t.pcp(), t.dei(), t.vid()), (3, false, 100));
    assert_eq!(t.tci(), 0x6064);
    assert_eq!(t.ethertype(), ethertype::IPV6);
    let r = VlanRepr::parse(&t).unwrap();
    assert_eq!(
        r,
        VlanRepr {
            pcp: 3,
            dei: false,
            vid: 100,
            ethertype: 0x86dd
        }
    );
    let mut out = [0u8; 4];
    r.emit(&mut VlanTag::new_unchecked(&mut out[..]));
    assert_eq!(out, VLAN);
    let mut out = VLAN;
    let mut v = VlanTag::new_unchecked(&mut out[..]);
    v.set_dei(true);
    v.set_vid(4095);
    v.set_pcp(7);
    assert_eq!(out, [0xff, 0xff, 0x86, 0xdd]);
    assert!(VlanTag::new_checked(&VLAN[..3]).is_err());
}

// ---------------------------------------------------------------------------------------------
// IPv4: the classic header with a published checksum of 0xb861.

#[rustfmt::skip]
const IPV4_CLASSIC: [u8; 20] = [
    0x45, 0x00, 0x00, 0x73, // v4, IHL 5, TOS 0, total length 115
    0x00, 0x00, 0x40, 0x00, // ident 0, DF
    0x40, 0x11, 0xb8, 0x61, // TTL 64, UDP, checksum
    0xc0, 0xa8, 0x00, 0x01, // 192.168.0.1
    0xc0, 0xa8, 0x00, 0xc7, // 192.168.0.199
];

#[test]
fn ipv4_classic_header() {
    // The header alone is 20 of its 115 bytes: pad it to the total length.
    let mut buf = [0u8; 115];
    buf[..20].copy_from_slice(&IPV4_CLASSIC);
    let p = Ipv4Packet::new_checked(&buf[..]).unwrap();
    assert_eq!(p.version(), 4);
    assert_eq!(p.header_len(), 20);
    assert_eq!((p.dscp_ecn(), p.dscp(), p.ecn()), (0, 0, 0));
    assert_eq!(p.total_len(), 115);
    assert_eq!(p.ident(), 0);
    assert!(p.dont_frag());
    assert!(!p.more_frags());
    assert_eq!(p.frag_offset(), 0);
    assert!(!p.is_fragment());
    assert_eq!(p.ttl(), 64);
    assert_eq!(p.protocol(), ip_proto::UDP);
    assert_eq!(p.checksum(), 0xb861);
    assert_eq!(p.src_addr(), Ipv4Addr::new(192, 168, 0, 1));
    assert_eq!(p.dst_addr(), Ipv4Addr::new(192, 168, 0, 199));
    assert!(p.options().is_empty());
    assert_eq!(p.payload().len(), 95);
    assert!(p.verify_checksum());
    assert_eq!(internet_checksum(&[&zero_at(&IPV4_CLASSIC, 10)]), 0xb861);

    let r = Ipv4Repr::parse(&p).unwrap();
    assert_eq!(
        r,
        Ipv4Repr {
            src: Ipv4Addr::new(192, 168, 0, 1),
            dst: Ipv4Addr::new(192, 168, 0, 199),
            protocol: 17,
            ttl: 64,
            dscp_ecn: 0,
            ident: 0,
            dont_frag: true,
            payload_len: 95,
        }
    );
    let mut out = [0xaau8; 20];
    r.emit(&mut Ipv4Packet::new_unchecked(&mut out[..]));
    assert_eq!(out, IPV4_CLASSIC);

    // A flipped bit fails verification; fill_checksum repairs it.
    let mut bad = IPV4_CLASSIC;
    bad[8] = 0x3f;
    let mut v = Ipv4Packet::new_unchecked(&mut bad[..]);
    assert!(!v.verify_checksum());
    v.fill_checksum();
    assert!(v.verify_checksum());
    assert_eq!(
        v.checksum(),
        internet_checksum(&[&zero_at(&bad, 10)]),
        "fill_checksum agrees with the plain computation"
    );
}

#[test]
fn ipv4_check_len_errors() {
    let trunc = Error::Truncated {
        header: Header::Ipv4,
    };
    let bad = Error::Malformed {
        header: Header::Ipv4,
    };
    // Total length 115 but only 20 bytes.
    assert_eq!(
        Ipv4Packet::new_checked(&IPV4_CLASSIC[..]).unwrap_err(),
        trunc
    );
    assert_eq!(
        Ipv4Packet::new_checked(&IPV4_CLASSIC[..19]).unwrap_err(),
        trunc
    );
    let mut h = IPV4_CLASSIC;
    h[2..4].copy_from_slice(&20u16.to_be_bytes());
    assert!(Ipv4Packet::new_checked(&h[..]).is_ok());
    h[0] = 0x65;
    assert_eq!(Ipv4Packet::new_checked(&h[..]).unwrap_err(), bad);
    h[0] = 0x44;
    assert_eq!(Ipv4Packet::new_checked(&h[..]).unwrap_err(), bad);
    h[0] = 0x46; // IHL 6: 24 bytes of header in 20
    assert_eq!(Ipv4Packet::new_checked(&h[..]).unwrap_err(), trunc);
    h[0] = 0x45;
    h[2..4].copy_from_slice(&19u16.to_be_bytes());
    assert_eq!(Ipv4Packet::new_checked(&h[..]).unwrap_err(), bad);
}

// ---------------------------------------------------------------------------------------------
// A whole frame: Ethernet / IPv4 / UDP 12345 → 53 with "abcd".
//
// IPv4 header checksum, by hand: 4500 + 0020 + 1234 + 4000 + 4011 + 0000 + 0a00 + 0001 +
// 0a00 + 0002 = 0xeb68 → !0xeb68 = 0x1497.
// UDP checksum: pseudo 0a00 0001 0a00 0002 0011 000c, UDP 3039 0035 000c 0000 6162 6364:
// sum 0x10960 → 0x0961 → !0x0961 = 0xf69e.

#[rustfmt::skip]
const FRAME_V4_UDP: [u8; 46] = [
    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0x08, 0x00,
    0x45, 0x00, 0x00, 0x20, 0x12, 0x34, 0x40, 0x00, 0x40, 0x11, 0x14, 0x97,
    0x0a, 0x00, 0x00, 0x01, 0x0a, 0x00, 0x00, 0x02,
    0x30, 0x39, 0x00, 0x35, 0x00, 0x0c, 0xf6, 0x9e,
    b'a', b'b', b'c', b'd',
];

#[test]
fn ipv4_udp_frame_golden() {
    let f = EthernetFrame::new_checked(&FRAME_V4_UDP[..]).unwrap();
    assert_eq!(f.ethertype(), ethertype::IPV4);
    let ip = Ipv4Packet::new_checked(f.payload()).unwrap();
    assert_eq!(ip.checksum(), 0x1497);
    assert!(ip.verify_checksum());
    assert_eq!(
        internet_checksum(&[&zero_at(&FRAME_V4_UDP[14..34], 10)]),
        0x1497
    );
    let ip_repr = Ipv4Repr::parse(&ip).unwrap();
    assert_eq!(
        ip_repr,
        Ipv4Repr {
            src: H1,
            dst: H2,
            protocol: ip_proto::UDP,
            ttl: 64,
            dscp_ecn: 0,
            ident: 0x1234,
            dont_frag: true,
            payload_len: 12,
        }
    );
    let udp = UdpPacket::new_checked(ip.payload()).unwrap();
    assert_eq!((udp.src_port(), udp.dst_port(), udp.len()), (12345, 53, 12));
    assert_eq!(udp.checksum(), 0xf69e);
    assert_eq!(udp.payload(), b"abcd");
    assert!(udp.verify_checksum(H1, H2));
    assert!(!udp.verify_checksum(H2, Ipv4Addr::new(10, 0, 0, 3)));
    let ph = pseudo4(H1.octets(), H2.octets(), 17, 12);
    assert_eq!(
        internet_checksum(&[&ph, &zero_at(&FRAME_V4_UDP[34..], 6)]),
        0xf69e
    );
    let udp_repr = UdpRepr::parse(&udp).unwrap();
    assert_eq!(
        udp_repr,
        UdpRepr {
            src_port: 12345,
            dst_port: 53
        }
    );

    // Emit the whole frame from reprs.
    let mut out = [0u8; 46];
    EthernetRepr {
        src: [0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb],
        dst: [0x00, 0x11, 0x22, 0x33, 0x44, 0x55],
        ethertype: ethertype::IPV4,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut out[..]));
    ip_repr.emit(&mut Ipv4Packet::new_unchecked(&mut out[14..]));
    let mut u = UdpPacket::new_unchecked(&mut out[34..]);
    udp_repr.emit(&mut u);
    u.payload_mut().copy_from_slice(b"abcd");
    u.fill_checksum(H1, H2);
    assert_eq!(out, FRAME_V4_UDP);

    // The dissector agrees.
    assert_eq!(
        parse_layout(&FRAME_V4_UDP).unwrap(),
        Layout {
            vlan: None,
            ethertype: ethertype::IPV4,
            l3_offset: 14,
            l3: L3::Ipv4,
            l4_offset: 34,
            l4: L4::Udp,
            src_port: 12345,
            dst_port: 53,
            fragment: false,
        }
    );
}

#[test]
fn udp_zero_checksum() {
    let mut d = FRAME_V4_UDP[34..].to_vec();
    d[6] = 0;
    d[7] = 0;
    let u = UdpPacket::new_checked(&d[..]).unwrap();
    assert!(u.verify_checksum(H1, H2), "zero means none over IPv4");
    assert!(!u.verify_checksum(V6A, V6B), "zero is invalid over IPv6");
    // A datagram whose sum is 0xFFFF computes to 0 and is sent as 0xFFFF: choose the data
    // word that makes the total 0xFFFF.
    let mut d = [0x30, 0x39, 0x00, 0x35, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x00];
    let ph = pseudo4(H1.octets(), H2.octets(), 17, 10);
    let w = !ones_sum(&[&ph, &d]);
    d[8..10].copy_from_slice(&w.to_be_bytes());
    assert_eq!(ones_sum(&[&ph, &d]), 0xFFFF);
    let mut u = UdpPacket::new_unchecked(&mut d[..]);
    u.fill_checksum(H1, H2);
    assert_eq!(u.checksum(), 0xFFFF);
    assert!(u.verify_checksum(H1, H2));
}

#[test]
fn udp_check_len_errors() {
    let d = &FRAME_V4_UDP[34..];
    assert_eq!(
        UdpPacket::new_checked(&d[..7]).unwrap_err(),
        Error::Truncated {
            header: Header::Udp
        }
    );
    assert_eq!(
        UdpPacket::new_checked(&d[..11]).unwrap_err(),
        Error::Truncated {
            header: Header::Udp
        }
    );
    let mut b = d.to_vec();
    b[5] = 7;
    assert_eq!(
        UdpPacket::new_checked(&b[..]).unwrap_err(),
        Error::Malformed {
            header: Header::Udp
        }
    );
    // Trailing bytes after the length are not payload.
    let mut b = d.to_vec();
    b.extend_from_slice(&[9, 9]);
    assert_eq!(UdpPacket::new_checked(&b[..]).unwrap().payload(), b"abcd");
}

// ---------------------------------------------------------------------------------------------
// IPv4 TCP SYN 10.0.0.1:40000 → 10.0.0.2:80.
//
// IP checksum: 4500 + 0028 + abcd + 4000 + 4006 + 0a00 + 0001 + 0a00 + 0002 = 0x184fe →
// 0x84ff → !0x84ff = 0x7b00.
// TCP checksum: pseudo 0a00 0001 0a00 0002 0006 0014 + segment 9c40 0050 0102 0304 0000 0000
// 5002 faf0 0000 0000 = 0x2ffa4 → 0xffa6 → !0xffa6 = 0x0059.

#[rustfmt::skip]
const IPV4_TCP_SYN: [u8; 40] = [
    0x45, 0x00, 0x00, 0x28, 0xab, 0xcd, 0x40, 0x00, 0x40, 0x06, 0x7b, 0x00,
    0x0a, 0x00, 0x00, 0x01, 0x0a, 0x00, 0x00, 0x02,
    0x9c, 0x40, 0x00, 0x50, // ports
    0x01, 0x02, 0x03, 0x04, // seq
    0x00, 0x00, 0x00, 0x00, // ack
    0x50, 0x02, 0xfa, 0xf0, // offset 5, SYN, window
    0x00, 0x59, 0x00, 0x00, // checksum, urgent
];

#[test]
fn tcp_v4_golden() {
    let ip = Ipv4Packet::new_checked(&IPV4_TCP_SYN[..]).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!(
        internet_checksum(&[&zero_at(&IPV4_TCP_SYN[..20], 10)]),
        0x7b00
    );
    let t = TcpPacket::new_checked(ip.payload()).unwrap();
    assert_eq!((t.src_port(), t.dst_port()), (40000, 80));
    assert_eq!((t.seq_number(), t.ack_number()), (0x0102_0304, 0));
    assert_eq!(t.header_len(), 20);
    assert_eq!(t.flags(), tcp::SYN);
    assert_eq!((t.window(), t.checksum(), t.urgent()), (0xfaf0, 0x0059, 0));
    assert!(t.options().is_empty() && t.payload().is_empty());
    assert!(t.verify_checksum(H1, H2));
    let ph = pseudo4(H1.octets(), H2.octets(), 6, 20);
    assert_eq!(
        internet_checksum(&[&ph, &zero_at(&IPV4_TCP_SYN[20..], 16)]),
        0x0059
    );
    let r = TcpRepr::parse(&t).unwrap();
    assert_eq!(
        r,
        TcpRepr {
            src_port: 40000,
            dst_port: 80,
            seq: 0x0102_0304,
            ack: 0,
            flags: tcp::SYN,
            window: 0xfaf0,
        }
    );
    let mut out = [0u8; 40];
    Ipv4Repr::parse(&ip)
        .unwrap()
        .emit(&mut Ipv4Packet::new_unchecked(&mut out[..]));
    let mut tp = TcpPacket::new_unchecked(&mut out[20..]);
    r.emit(&mut tp);
    tp.fill_checksum(H1, H2);
    assert_eq!(out, IPV4_TCP_SYN);
}

#[test]
fn tcp_check_len_errors() {
    let seg = &IPV4_TCP_SYN[20..];
    assert!(TcpPacket::new_checked(&seg[..19]).is_err());
    let mut b = seg.to_vec();
    b[12] = 0x40;
    assert_eq!(
        TcpPacket::new_checked(&b[..]).unwrap_err(),
        Error::Malformed {
            header: Header::Tcp
        }
    );
    b[12] = 0x60; // 24-byte header in 20 bytes
    assert_eq!(
        TcpPacket::new_checked(&b[..]).unwrap_err(),
        Error::Truncated {
            header: Header::Tcp
        }
    );
    b.extend_from_slice(&[2, 4, 5, 0xb4, 1]);
    let t = TcpPacket::new_checked(&b[..]).unwrap();
    assert_eq!((t.options(), t.payload()), (&[2, 4, 5, 0xb4][..], &[1][..]));
}

// ---------------------------------------------------------------------------------------------
// ICMPv4 echo request, ident 0x1234, seq 1, data "abcdefgh".
//
// IP checksum: 4500 + 0024 + 0000 + 4000 + 4001 + 0a00 + 0001 + 0a00 + 0002 = 0xd928 →
// !0xd928 = 0x26d7.
// ICMP checksum: 0800 + 1234 + 0001 = 0x1a35; 6162 + 6364 + 6566 + 6768 = 0x19194; total
// 0x1abc9 → 0xabca → !0xabca = 0x5435.

#[rustfmt::skip]
const IPV4_ICMP_ECHO: [u8; 36] = [
    0x45, 0x00, 0x00, 0x24, 0x00, 0x00, 0x40, 0x00, 0x40, 0x01, 0x26, 0xd7,
    0x0a, 0x00, 0x00, 0x01, 0x0a, 0x00, 0x00, 0x02,
    0x08, 0x00, 0x54, 0x35, 0x12, 0x34, 0x00, 0x01,
    b'a', b'b', b'c', b'd', b'e', b'f', b'g', b'h',
];

#[test]
fn icmpv4_echo_golden() {
    let ip = Ipv4Packet::new_checked(&IPV4_ICMP_ECHO[..]).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!(
        internet_checksum(&[&zero_at(&IPV4_ICMP_ECHO[..20], 10)]),
        0x26d7
    );
    let i = Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert_eq!((i.msg_type(), i.code(), i.checksum()), (8, 0, 0x5435));
    assert_eq!((i.echo_ident(), i.echo_seq_no()), (0x1234, 1));
    assert_eq!(i.rest_of_header(), 0x1234_0001);
    assert_eq!(i.payload(), b"abcdefgh");
    assert!(i.verify_checksum());
    assert_eq!(
        internet_checksum(&[&zero_at(&IPV4_ICMP_ECHO[20..], 2)]),
        0x5435
    );
    let r = Icmpv4Repr::parse(&i).unwrap();
    assert_eq!(
        r,
        Icmpv4Repr::EchoRequest {
            ident: 0x1234,
            seq_no: 1
        }
    );
    let mut out = IPV4_ICMP_ECHO;
    out[20..28].fill(0xee);
    let mut p = Icmpv4Packet::new_unchecked(&mut out[20..]);
    r.emit(&mut p);
    p.fill_checksum();
    assert_eq!(out, IPV4_ICMP_ECHO);
    // Not an echo: the repr refuses it.
    let mut un = IPV4_ICMP_ECHO[20..].to_vec();
    un[0] = 3;
    assert_eq!(
        Icmpv4Repr::parse(&Icmpv4Packet::new_unchecked(&un[..])).unwrap_err(),
        Error::Malformed {
            header: Header::Icmpv4
        }
    );
    assert_eq!(
        parse_layout(&[&FRAME_V4_UDP[..14], &IPV4_ICMP_ECHO[..]].concat())
            .map(|l| (l.l4, l.src_port, l.dst_port)),
        Ok((L4::Icmpv4, 0x1234, 0x1234))
    );
}

// ---------------------------------------------------------------------------------------------
// IPv6 / UDP 12345 → 53 "abcd", 2001:db8::1 → 2001:db8::2, TC 0xb8, flow label 0x12345.
// UDP checksum: the IPv6 pseudo-header differs from the IPv4 one in the addresses only (plus
// a 32-bit length): 0xaf2c.

#[rustfmt::skip]
const IPV6_UDP: [u8; 52] = [
    0x6b, 0x81, 0x23, 0x45, // v6, TC 0xb8, flow 0x12345
    0x00, 0x0c, 0x11, 0x40, // payload 12, UDP, hop limit 64
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,
    0x30, 0x39, 0x00, 0x35, 0x00, 0x0c, 0xaf, 0x2c,
    b'a', b'b', b'c', b'd',
];

#[test]
fn ipv6_udp_golden() {
    let ip = Ipv6Packet::new_checked(&IPV6_UDP[..]).unwrap();
    assert_eq!(ip.version(), 6);
    assert_eq!(ip.traffic_class(), 0xb8);
    assert_eq!(ip.flow_label(), 0x12345);
    assert_eq!(ip.payload_len(), 12);
    assert_eq!(ip.next_header(), ip_proto::UDP);
    assert_eq!(ip.hop_limit(), 64);
    assert_eq!((ip.src_addr(), ip.dst_addr()), (V6A, V6B));
    let r = Ipv6Repr::parse(&ip).unwrap();
    assert_eq!(
        r,
        Ipv6Repr {
            src: V6A,
            dst: V6B,
            next_header: 17,
            hop_limit: 64,
            traffic_class: 0xb8,
            flow_label: 0x12345,
            payload_len: 12,
        }
    );
    let u = UdpPacket::new_checked(ip.payload()).unwrap();
    assert_eq!(
        (u.src_port(), u.dst_port(), u.checksum()),
        (12345, 53, 0xaf2c)
    );
    assert!(u.verify_checksum(V6A, V6B));
    let ph = pseudo6(V6A.octets(), V6B.octets(), 17, 12);
    assert_eq!(
        internet_checksum(&[&ph, &zero_at(&IPV6_UDP[40..], 6)]),
        0xaf2c
    );

    let mut out = [0u8; 52];
    r.emit(&mut Ipv6Packet::new_unchecked(&mut out[..]));
    let mut up = UdpPacket::new_unchecked(&mut out[40..]);
    UdpRepr::parse(&u).unwrap().emit(&mut up);
    up.payload_mut().copy_from_slice(b"abcd");
    up.fill_checksum(V6A, V6B);
    assert_eq!(out, IPV6_UDP);

    // Setters touch only their bits.
    let mut b = IPV6_UDP;
    let mut p = Ipv6Packet::new_unchecked(&mut b[..]);
    p.set_flow_label(0);
    assert_eq!((p.traffic_class(), p.version()), (0xb8, 6));
    p.set_traffic_class(0);
    assert_eq!(&b[..4], &[0x60, 0, 0, 0]);

    // Checks.
    assert_eq!(
        Ipv6Packet::new_checked(&IPV6_UDP[..51]).unwrap_err(),
        Error::Truncated {
            header: Header::Ipv6
        }
    );
    let mut b = IPV6_UDP;
    b[0] = 0x4b;
    assert_eq!(
        Ipv6Packet::new_checked(&b[..]).unwrap_err(),
        Error::Malformed {
            header: Header::Ipv6
        }
    );
}

// ---------------------------------------------------------------------------------------------
// TCP SYN over IPv6 (the same segment as over IPv4, another pseudo-header): 0xb8e6.

#[test]
fn tcp_v6_checksum_golden() {
    let mut seg = IPV4_TCP_SYN[20..].to_vec();
    seg[16] = 0xb8;
    seg[17] = 0xe6;
    let t = TcpPacket::new_checked(&seg[..]).unwrap();
    assert!(t.verify_checksum(V6A, V6B));
    assert!(!t.verify_checksum(H1, H2));
    let ph = pseudo6(V6A.octets(), V6B.octets(), 6, 20);
    assert_eq!(internet_checksum(&[&ph, &zero_at(&seg, 16)]), 0xb8e6);
}

// ---------------------------------------------------------------------------------------------
// ICMPv6 echo request, ident 0x1234, seq 1, "abcdefgh": checksum 0x8075 over the pseudo-header.

#[rustfmt::skip]
const ICMPV6_ECHO: [u8; 16] = [
    0x80, 0x00, 0x80, 0x75, 0x12, 0x34, 0x00, 0x01,
    b'a', b'b', b'c', b'd', b'e', b'f', b'g', b'h',
];

#[test]
fn icmpv6_echo_golden() {
    let i = Icmpv6Packet::new_checked(&ICMPV6_ECHO[..]).unwrap();
    assert_eq!((i.msg_type(), i.code(), i.checksum()), (128, 0, 0x8075));
    assert_eq!((i.echo_ident(), i.echo_seq_no()), (0x1234, 1));
    assert_eq!(i.payload(), b"abcdefgh");
    assert!(i.verify_checksum(V6A, V6B));
    assert!(!i.verify_checksum(V6B, V6B));
    let ph = pseudo6(V6A.octets(), V6B.octets(), 58, 16);
    assert_eq!(internet_checksum(&[&ph, &zero_at(&ICMPV6_ECHO, 2)]), 0x8075);
    let r = Icmpv6Repr::parse(&i).unwrap();
    assert_eq!(
        r,
        Icmpv6Repr::EchoRequest {
            ident: 0x1234,
            seq_no: 1
        }
    );
    let mut out = [0u8; 16];
    out[8..].copy_from_slice(b"abcdefgh");
    let mut p = Icmpv6Packet::new_unchecked(&mut out[..]);
    r.emit(&mut p);
    p.fill_checksum(V6A, V6B);
    assert_eq!(out, ICMPV6_ECHO);

    // Packet too big carries a 32-bit MTU.
    let ptb = [2u8, 0, 0, 0, 0, 0, 0x05, 0xdc];
    let p = Icmpv6Packet::new_checked(&ptb[..]).unwrap();
    assert_eq!((p.msg_type(), p.mtu()), (2, 1500));
    assert!(Icmpv6Packet::new_checked(&ptb[..7]).is_err());
}

// ---------------------------------------------------------------------------------------------
// VXLAN: a VLAN-tagged outer frame is not needed; outer IPv4/UDP to 4789, VNI 0x123456.

#[rustfmt::skip]
const VXLAN_HDR: [u8; 8] = [0x08, 0x00, 0x00, 0x00, 0x12, 0x34, 0x56, 0x00];

#[test]
fn vxlan_golden() {
    let mut pkt = VXLAN_HDR.to_vec();
    pkt.extend_from_slice(&FRAME_V4_UDP);
    let v = VxlanPacket::new_checked(&pkt[..]).unwrap();
    assert_eq!((v.flags(), v.vni()), (0x08, 0x123456));
    assert_eq!(v.payload(), &FRAME_V4_UDP[..]);
    let r = VxlanRepr::parse(&v).unwrap();
    assert_eq!(r, VxlanRepr { vni: 0x123456 });
    let mut out = [0xffu8; 8];
    r.emit(&mut VxlanPacket::new_unchecked(&mut out[..]));
    assert_eq!(out, VXLAN_HDR);
    let mut no_i = VXLAN_HDR;
    no_i[0] = 0;
    assert_eq!(
        VxlanRepr::parse(&VxlanPacket::new_unchecked(&no_i[..])).unwrap_err(),
        Error::Malformed {
            header: Header::Vxlan
        }
    );
    assert!(VxlanPacket::new_checked(&VXLAN_HDR[..7]).is_err());
}

/// Outer Ethernet / 802.1Q 100 / IPv6 / UDP → 4789 / VXLAN / inner frame: the dissector finds
/// the outer layers; the inner frame dissects on its own.
#[test]
fn vlan_ipv6_vxlan_layout() {
    let mut vx = VXLAN_HDR.to_vec();
    vx.extend_from_slice(&FRAME_V4_UDP);
    let udp_len = 8 + vx.len();
    let mut frame = ETH.to_vec();
    frame.extend_from_slice(&VLAN);
    let mut ip = [0u8; 40];
    Ipv6Repr {
        src: V6A,
        dst: V6B,
        next_header: ip_proto::UDP,
        hop_limit: 64,
        traffic_class: 0,
        flow_label: 0,
        payload_len: udp_len,
    }
    .emit(&mut Ipv6Packet::new_unchecked(&mut ip[..]));
    frame.extend_from_slice(&ip);
    let mut udp = vec![0u8; 8];
    udp.extend_from_slice(&vx);
    let mut u = UdpPacket::new_unchecked(&mut udp[..]);
    UdpRepr {
        src_port: 50000,
        dst_port: VXLAN_PORT,
    }
    .emit(&mut u);
    u.fill_checksum(V6A, V6B);
    assert!(u.verify_checksum(V6A, V6B));
    frame.extend_from_slice(&udp);
    let l = parse_layout(&frame).unwrap();
    assert_eq!(
        l,
        Layout {
            vlan: Some(100),
            ethertype: ethertype::IPV6,
            l3_offset: 18,
            l3: L3::Ipv6,
            l4_offset: 58,
            l4: L4::Udp,
            src_port: 50000,
            dst_port: VXLAN_PORT,
            fragment: false,
        }
    );
    let inner = &frame[usize::from(l.l4_offset) + 16..];
    assert_eq!(parse_layout(inner).unwrap().dst_port, 53);
    flow_offload::packet::fuzz_parse(&frame);
}

// ---------------------------------------------------------------------------------------------
// Views never panic on short buffers, even unchecked.

#[test]
fn unchecked_views_on_short_buffers_do_not_panic() {
    for n in 0..8 {
        let b = vec![0xffu8; n];
        let ip = Ipv4Packet::new_unchecked(&b[..]);
        let _ = (
            ip.src_addr(),
            ip.payload(),
            ip.options(),
            ip.verify_checksum(),
        );
        let ip6 = Ipv6Packet::new_unchecked(&b[..]);
        let _ = (ip6.dst_addr(), ip6.payload(), ip6.flow_label());
        let t = TcpPacket::new_unchecked(&b[..]);
        let _ = (
            t.ack_number(),
            t.payload(),
            t.options(),
            t.verify_checksum(H1, H2),
        );
        let u = UdpPacket::new_unchecked(&b[..]);
        let _ = (u.checksum(), u.payload(), u.verify_checksum(V6A, V6B));
        let mut m = b.clone();
        let mut ip = Ipv4Packet::new_unchecked(&mut m[..]);
        ip.set_dst_addr(H1);
        ip.fill_checksum();
        let _ = ip.payload_mut();
        let mut t = TcpPacket::new_unchecked(&mut m[..]);
        t.fill_checksum(V6A, V6B);
        let _ = t.options_mut();
    }
}

// ---------------------------------------------------------------------------------------------
// Incremental updates (RFC 1624) against full recomputation.

/// A 20-byte "header" whose first word is never zero (a real header never sums to zero),
/// with its checksum at bytes 10..12.
fn header_strategy() -> impl Strategy<Value = [u8; 20]> {
    proptest::array::uniform20(any::<u8>()).prop_map(|mut h| {
        h[0] |= 0x40;
        h
    })
}

fn with_checksum(mut h: [u8; 20]) -> [u8; 20] {
    h[10] = 0;
    h[11] = 0;
    let c = internet_checksum(&[&h]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn update16_matches_recompute(h in header_strategy(), word in 0usize..10, new in any::<u16>()) {
        prop_assume!(word != 5);
        let h = with_checksum(h);
        let old_c = u16::from_be_bytes([h[10], h[11]]);
        let old = u16::from_be_bytes([h[2 * word], h[2 * word + 1]]);
        let mut m = h;
        m[2 * word..2 * word + 2].copy_from_slice(&new.to_be_bytes());
        if word == 0 {
            m[0] |= 0x40;
        }
        let new = u16::from_be_bytes([m[2 * word], m[2 * word + 1]]);
        let expect = with_checksum(m);
        prop_assert_eq!(
            checksum::update16(old_c, old, new),
            u16::from_be_bytes([expect[10], expect[11]])
        );
    }

    #[test]
    fn update32_matches_recompute(h in header_strategy(), new in any::<u32>()) {
        // The addresses of an IPv4-like header: bytes 12..16.
        let h = with_checksum(h);
        let old_c = u16::from_be_bytes([h[10], h[11]]);
        let old = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let mut m = h;
        m[12..16].copy_from_slice(&new.to_be_bytes());
        let expect = with_checksum(m);
        prop_assert_eq!(
            checksum::update32(old_c, old, new),
            u16::from_be_bytes([expect[10], expect[11]])
        );
    }

    #[test]
    fn update_bytes_matches_recompute(
        data in proptest::collection::vec(any::<u8>(), 48..64),
        new in proptest::array::uniform16(any::<u8>()),
    ) {
        // An IPv6-address-sized field at 8..24 of a buffer whose first byte is non-zero, with
        // the checksum at 2..4.
        let mut d = data;
        d[0] |= 0x60;
        d[2] = 0;
        d[3] = 0;
        let c = internet_checksum(&[&d]);
        d[2..4].copy_from_slice(&c.to_be_bytes());
        let mut m = d.clone();
        m[8..24].copy_from_slice(&new);
        m[2] = 0;
        m[3] = 0;
        let expect = internet_checksum(&[&m]);
        prop_assert_eq!(checksum::update_bytes(c, &d[8..24], &new), expect);
    }

    #[test]
    fn udp_incremental_port_rewrite(
        data in proptest::collection::vec(any::<u8>(), 0..40),
        sport in any::<u16>(),
        new_sport in any::<u16>(),
    ) {
        // Rewriting a UDP port incrementally equals refilling, including the 0 → 0xFFFF rule.
        let mut d = vec![0u8; 8];
        d.extend_from_slice(&data);
        let mut u = UdpPacket::new_unchecked(&mut d[..]);
        UdpRepr { src_port: sport, dst_port: 53 }.emit(&mut u);
        u.fill_checksum(H1, H2);
        let c = u.checksum();
        u.set_src_port(new_sport);
        let inc = checksum::udp_nonzero(checksum::update16(c, sport, new_sport));
        u.fill_checksum(H1, H2);
        prop_assert_eq!(inc, u.checksum());
        prop_assert!(u.verify_checksum(H1, H2));
    }

    #[test]
    fn sum_matches_plain(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        prop_assert_eq!(checksum::fold(checksum::sum(&data)), ones_sum(&[&data]));
        let ph = pseudo6(V6A.octets(), V6B.octets(), 17, data.len() as u32);
        prop_assert_eq!(
            checksum::fold(checksum::pseudo_header_v6(V6A, V6B, 17, data.len() as u32)),
            ones_sum(&[&ph])
        );
        let ph = pseudo4(H1.octets(), H2.octets(), 6, data.len() as u16);
        prop_assert_eq!(
            checksum::fold(checksum::pseudo_header_v4(H1, H2, 6, data.len() as u16)),
            ones_sum(&[&ph])
        );
    }

    #[test]
    fn parse_layout_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_layout(&data);
        flow_offload::packet::fuzz_parse(&data);
    }
}
