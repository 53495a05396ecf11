//! RFC 7915 translation: hand-worked packets in and out, checksums checked by the plain
//! recomputation below (not the library), and round-trip properties.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use core::net::{Ipv4Addr, Ipv6Addr};

use flow_offload::packet::xlat::{
    ipv4_to_ipv6, ipv4_to_ipv6_with_inner, ipv6_to_ipv4, ipv6_to_ipv4_with_inner, InnerRewrite,
    L4Rewrite, Untranslatable, XlatError,
};
use flow_offload::packet::{
    Error, Header, Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, Ipv4Packet, Ipv4Repr,
    Ipv6Packet, Ipv6Repr, TcpPacket, TcpRepr, UdpPacket, UdpRepr,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Independent checksum arithmetic.

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

fn pseudo4(src: &[u8], dst: &[u8], proto: u8, len: usize) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(src);
    v.extend_from_slice(dst);
    v.push(0);
    v.push(proto);
    v.extend_from_slice(&(len as u16).to_be_bytes());
    v
}

fn pseudo6(src: &[u8], dst: &[u8], next: u8, len: usize) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(src);
    v.extend_from_slice(dst);
    v.extend_from_slice(&(len as u32).to_be_bytes());
    v.extend_from_slice(&[0, 0, 0, next]);
    v
}

/// Checks every checksum of an IPv4 packet: the header, and TCP/UDP/ICMP over the payload.
fn assert_v4_checksums(p: &[u8]) {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    assert_eq!(ones_sum(&[&p[..ihl]]), 0xFFFF, "IPv4 header checksum");
    let (src, dst, proto) = (&p[12..16], &p[16..20], p[9]);
    let body = &p[ihl..];
    match proto {
        6 => assert_eq!(
            ones_sum(&[&pseudo4(src, dst, 6, body.len()), body]),
            0xFFFF,
            "TCP checksum"
        ),
        17 if body[6..8] != [0, 0] => assert_eq!(
            ones_sum(&[&pseudo4(src, dst, 17, body.len()), body]),
            0xFFFF,
            "UDP checksum"
        ),
        1 => assert_eq!(ones_sum(&[body]), 0xFFFF, "ICMP checksum"),
        _ => {}
    }
}

/// Checks the transport checksum of an IPv6 packet without extension headers.
fn assert_v6_checksums(p: &[u8]) {
    let (src, dst, next) = (&p[8..24], &p[24..40], p[6]);
    let body = &p[40..];
    if matches!(next, 6 | 17 | 58) {
        assert_ne!(
            (next, &body[6..8]),
            (17, &[0u8, 0][..]),
            "UDP/IPv6 zero checksum"
        );
        assert_eq!(
            ones_sum(&[&pseudo6(src, dst, next, body.len()), body]),
            0xFFFF,
            "transport checksum over IPv6"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The cast: an IPv6 client behind NAT64, its pool address, a remote IPv4 server and its
// 64:ff9b::/96 image, and a router on the IPv4 path.

const C6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const R6: Ipv6Addr = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0xc633, 0x6402);
const P4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const R4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const RT4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const RT6: Ipv6Addr = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0xcb00, 0x7109);

fn translate_6to4(input: &[u8], src: Ipv4Addr, dst: Ipv4Addr, l4: Option<L4Rewrite>) -> Vec<u8> {
    let mut out = vec![0u8; input.len() + 40];
    let n = ipv6_to_ipv4(input, &mut out, src, dst, l4).unwrap();
    out.truncate(n);
    out
}

fn translate_4to6(input: &[u8], src: Ipv6Addr, dst: Ipv6Addr, l4: Option<L4Rewrite>) -> Vec<u8> {
    let mut out = vec![0u8; input.len() + 60];
    let n = ipv4_to_ipv6(input, &mut out, src, dst, l4).unwrap();
    out.truncate(n);
    out
}

// ---------------------------------------------------------------------------------------------
// 1. IPv6 UDP → IPv4 UDP.
//
// [2001:db8::1]:12345 → [64:ff9b::198.51.100.2]:53, flow label 0x12345, hop limit 63, "abcd",
// becomes 192.0.2.1:40000 → 198.51.100.2:53.
//
// UDP/IPv6 checksum: pseudo-header 2001 0db8 0000×5 0001 + 0064 ff9b 0000×4 c633 6402 +
// 0000 000c + 0000 0011, datagram 3039 0035 000c 0000 6162 6364 → 0xb2b1.
// IPv4 header: 4500 0020 0000 0000 (DF clear: 32 ≤ 1260; ident 0) 3f11 c000 0201 c633 6402
// → sum 0x7069 → checksum 0x8f96.
// UDP/IPv4 checksum: c000 0201 c633 6402 0011 000c + 9c40 0035 000c 0000 6162 6364 → 0xb262.

#[rustfmt::skip]
const V6_UDP: [u8; 52] = [
    0x60, 0x01, 0x23, 0x45, 0x00, 0x0c, 0x11, 0x3f,
    0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x00, 0x64, 0xff, 0x9b, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc6, 0x33, 0x64, 0x02,
    0x30, 0x39, 0x00, 0x35, 0x00, 0x0c, 0xb2, 0xb1,
    0x61, 0x62, 0x63, 0x64,
];

#[rustfmt::skip]
const V4_UDP: [u8; 32] = [
    0x45, 0x00, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x3f, 0x11, 0x8f, 0x96,
    0xc0, 0x00, 0x02, 0x01, 0xc6, 0x33, 0x64, 0x02,
    0x9c, 0x40, 0x00, 0x35, 0x00, 0x0c, 0xb2, 0x62,
    0x61, 0x62, 0x63, 0x64,
];

const TO_POOL: L4Rewrite = L4Rewrite {
    src_port: 40000,
    dst_port: 53,
};

#[test]
fn ipv6_udp_to_ipv4() {
    assert_v6_checksums(&V6_UDP);
    let out = translate_6to4(&V6_UDP, P4, R4, Some(TO_POOL));
    assert_eq!(out, V4_UDP);
    assert_v4_checksums(&out);
    // And back, with the client's own port: the original minus its flow label.
    let back = translate_4to6(
        &V4_UDP,
        C6,
        R6,
        Some(L4Rewrite {
            src_port: 12345,
            dst_port: 53,
        }),
    );
    let mut expect = V6_UDP;
    expect[1] = 0x00;
    expect[2] = 0x00;
    expect[3] = 0x00;
    assert_eq!(back, expect);
}

#[test]
fn ipv6_udp_zero_checksum_stays_none() {
    let mut p = V6_UDP;
    p[46] = 0;
    p[47] = 0;
    let out = translate_6to4(&p, P4, R4, Some(TO_POOL));
    assert_eq!(&out[26..28], &[0, 0]);
    assert_v4_checksums(&out);
}

#[test]
fn ipv4_udp_zero_checksum_gets_one() {
    let mut p = V4_UDP;
    p[26] = 0;
    p[27] = 0;
    let out = translate_4to6(
        &p,
        C6,
        R6,
        Some(L4Rewrite {
            src_port: 12345,
            dst_port: 53,
        }),
    );
    assert_eq!(&out[46..48], &[0xb2, 0xb1]);
    assert_v6_checksums(&out);
}

// ---------------------------------------------------------------------------------------------
// 2. IPv4 TCP SYN → IPv6.
//
// 198.51.100.2:443 → 192.0.2.1:40000, TOS 0x28, ident 0xbeef, DF, TTL 50, SYN with MSS 1460,
// becomes [64:ff9b::198.51.100.2]:443 → [2001:db8::1]:12345, traffic class 0x28, hop limit 50.
//
// IPv4 header: 4528 002c beef 4000 3206 c633 6402 c000 0201 → checksum 0x9d7d.
// TCP/IPv4: pseudo c633 6402 c000 0201 0006 0018 + 01bb 9c40 a1b2 c3d4 0000 0000 6002 7210
// 0000 0000 0204 05b4 → 0x365c. TCP/IPv6: the same segment with port 12345 over the IPv6
// pseudo-header → 0x36ab.

#[rustfmt::skip]
const V4_SYN: [u8; 44] = [
    0x45, 0x28, 0x00, 0x2c, 0xbe, 0xef, 0x40, 0x00, 0x32, 0x06, 0x9d, 0x7d,
    0xc6, 0x33, 0x64, 0x02, 0xc0, 0x00, 0x02, 0x01,
    0x01, 0xbb, 0x9c, 0x40, 0xa1, 0xb2, 0xc3, 0xd4, 0x00, 0x00, 0x00, 0x00,
    0x60, 0x02, 0x72, 0x10, 0x36, 0x5c, 0x00, 0x00, 0x02, 0x04, 0x05, 0xb4,
];

#[rustfmt::skip]
const V6_SYN: [u8; 64] = [
    0x62, 0x80, 0x00, 0x00, 0x00, 0x18, 0x06, 0x32,
    0x00, 0x64, 0xff, 0x9b, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc6, 0x33, 0x64, 0x02,
    0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x01, 0xbb, 0x30, 0x39, 0xa1, 0xb2, 0xc3, 0xd4, 0x00, 0x00, 0x00, 0x00,
    0x60, 0x02, 0x72, 0x10, 0x36, 0xab, 0x00, 0x00, 0x02, 0x04, 0x05, 0xb4,
];

#[test]
fn ipv4_tcp_syn_to_ipv6() {
    assert_v4_checksums(&V4_SYN);
    let out = translate_4to6(
        &V4_SYN,
        R6,
        C6,
        Some(L4Rewrite {
            src_port: 443,
            dst_port: 12345,
        }),
    );
    assert_eq!(out, V6_SYN);
    assert_v6_checksums(&out);
    // Back to IPv4: ident 0, DF clear (44 ≤ 1260), so a new header checksum.
    let back = translate_6to4(
        &V6_SYN,
        R4,
        P4,
        Some(L4Rewrite {
            src_port: 443,
            dst_port: 40000,
        }),
    );
    let mut expect = V4_SYN;
    expect[4..8].copy_from_slice(&[0, 0, 0, 0]);
    expect[10..12].copy_from_slice(&[0, 0]);
    let c = !ones_sum(&[&expect[..20]]);
    expect[10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(back, expect);
    assert_v4_checksums(&back);
}

// ---------------------------------------------------------------------------------------------
// 3. ICMPv6 echo request → ICMPv4 echo request.
//
// [2001:db8::1] → [64:ff9b::198.51.100.2], ident 0x1234 seq 7 "pingdata", becomes
// 192.0.2.1 → 198.51.100.2 with ident 0x0457.
//
// ICMPv6: pseudo-header (length 16, next header 58) + 8000 0000 1234 0007 7069 6e67 6461 7461
// → 0x5df6. ICMPv4: 0800 0000 0457 0007 7069 6e67 6461 7461 → 0x3c0e. IPv4 header 4500 0024
// 0000 0000 4001 c000 0201 c633 6402 → 0x8ea2.

#[rustfmt::skip]
const V6_ECHO: [u8; 56] = [
    0x60, 0x0a, 0xbc, 0xde, 0x00, 0x10, 0x3a, 0x40,
    0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x00, 0x64, 0xff, 0x9b, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc6, 0x33, 0x64, 0x02,
    0x80, 0x00, 0x5d, 0xf6, 0x12, 0x34, 0x00, 0x07,
    0x70, 0x69, 0x6e, 0x67, 0x64, 0x61, 0x74, 0x61,
];

#[rustfmt::skip]
const V4_ECHO: [u8; 36] = [
    0x45, 0x00, 0x00, 0x24, 0x00, 0x00, 0x00, 0x00, 0x40, 0x01, 0x8e, 0xa2,
    0xc0, 0x00, 0x02, 0x01, 0xc6, 0x33, 0x64, 0x02,
    0x08, 0x00, 0x3c, 0x0e, 0x04, 0x57, 0x00, 0x07,
    0x70, 0x69, 0x6e, 0x67, 0x64, 0x61, 0x74, 0x61,
];

#[test]
fn icmpv6_echo_to_icmpv4() {
    assert_v6_checksums(&V6_ECHO);
    let out = translate_6to4(
        &V6_ECHO,
        P4,
        R4,
        Some(L4Rewrite {
            src_port: 0x0457,
            dst_port: 0x0457,
        }),
    );
    assert_eq!(out, V4_ECHO);
    assert_v4_checksums(&out);
    // The reply comes back: type 0 → 129.
    let mut reply = V4_ECHO;
    reply[12..16].copy_from_slice(&R4.octets());
    reply[16..20].copy_from_slice(&P4.octets());
    reply[20] = 0;
    reply[22..24].copy_from_slice(&[0, 0]);
    let c = !ones_sum(&[&reply[20..]]);
    reply[22..24].copy_from_slice(&c.to_be_bytes());
    assert_v4_checksums(&reply);
    let back = translate_4to6(
        &reply,
        R6,
        C6,
        Some(L4Rewrite {
            src_port: 0x1234,
            dst_port: 0x1234,
        }),
    );
    assert_eq!(back[40], 129);
    assert_eq!(&back[44..48], &[0x12, 0x34, 0x00, 0x07]);
    assert_eq!(&back[48..], b"pingdata");
    assert_v6_checksums(&back);
}

// ---------------------------------------------------------------------------------------------
// 4. ICMPv4 port unreachable about the UDP datagram of example 1 → ICMPv6.
//
// 198.51.100.2 → 192.0.2.1, TTL 60, type 3 code 3, quoting V4_UDP whole. Translated to
// [64:ff9b::198.51.100.2] → [2001:db8::1], type 1 code 4; the quoted packet becomes V6_UDP
// again (flow label 0), as the client sent it, so its UDP checksum is 0xb2b1 once more.
//
// ICMPv4: 0303 0000 0000 0000 + V4_UDP → 0xe951. IPv4 header 4500 003c 0101 0000 3c01
// c633 6402 c000 0201 → 0x9189. ICMPv6: pseudo-header (length 60, 58) + 0104 0000 0000 0000
// + the 52 quoted bytes → 0x3567.

#[rustfmt::skip]
const V4_PORT_UNREACH: [u8; 60] = [
    0x45, 0x00, 0x00, 0x3c, 0x01, 0x01, 0x00, 0x00, 0x3c, 0x01, 0x91, 0x89,
    0xc6, 0x33, 0x64, 0x02, 0xc0, 0x00, 0x02, 0x01,
    0x03, 0x03, 0xe9, 0x51, 0x00, 0x00, 0x00, 0x00,
    // quoted: V4_UDP
    0x45, 0x00, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x3f, 0x11, 0x8f, 0x96,
    0xc0, 0x00, 0x02, 0x01, 0xc6, 0x33, 0x64, 0x02,
    0x9c, 0x40, 0x00, 0x35, 0x00, 0x0c, 0xb2, 0x62, 0x61, 0x62, 0x63, 0x64,
];

#[rustfmt::skip]
const V6_PORT_UNREACH: [u8; 100] = [
    0x60, 0x00, 0x00, 0x00, 0x00, 0x3c, 0x3a, 0x3c,
    0x00, 0x64, 0xff, 0x9b, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc6, 0x33, 0x64, 0x02,
    0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x01, 0x04, 0x35, 0x67, 0x00, 0x00, 0x00, 0x00,
    // quoted: V6_UDP with flow label 0
    0x60, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x11, 0x3f,
    0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x00, 0x64, 0xff, 0x9b, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc6, 0x33, 0x64, 0x02,
    0x30, 0x39, 0x00, 0x35, 0x00, 0x0c, 0xb2, 0xb1, 0x61, 0x62, 0x63, 0x64,
];

/// The rewrite of the flow's reply direction (server → client), which is the direction the
/// error travels in: the quoted packet gets these reversed.
const REPLY_TO_CLIENT: L4Rewrite = L4Rewrite {
    src_port: 53,
    dst_port: 12345,
};

#[test]
fn icmpv4_port_unreachable_to_icmpv6() {
    assert_v4_checksums(&V4_PORT_UNREACH);
    assert_v4_checksums(&V4_PORT_UNREACH[28..]);
    let out = translate_4to6(&V4_PORT_UNREACH, R6, C6, Some(REPLY_TO_CLIENT));
    assert_eq!(out, V6_PORT_UNREACH);
    assert_v6_checksums(&out);
    assert_v6_checksums(&out[48..]);
    // The same with the embedded rewrite spelled out.
    let mut o2 = [0u8; 200];
    let n = ipv4_to_ipv6_with_inner(
        &V4_PORT_UNREACH,
        &mut o2,
        R6,
        C6,
        None,
        Some(InnerRewrite {
            src: C6,
            dst: R6,
            l4: Some(L4Rewrite {
                src_port: 12345,
                dst_port: 53,
            }),
        }),
    )
    .unwrap();
    assert_eq!(&o2[..n], &V6_PORT_UNREACH[..]);
}

#[test]
fn icmpv6_port_unreachable_to_icmpv4() {
    // The reverse: the IPv6 client's stack reports port unreachable about a datagram it got.
    let out = translate_6to4(
        &V6_PORT_UNREACH,
        R4,
        P4,
        Some(L4Rewrite {
            src_port: 53,
            dst_port: 40000,
        }),
    );
    // Exactly V4_PORT_UNREACH, but identification 0 (DF stays clear at 60 bytes).
    let mut expect = V4_PORT_UNREACH;
    expect[4..6].copy_from_slice(&[0, 0]);
    expect[10..12].copy_from_slice(&[0, 0]);
    let c = !ones_sum(&[&expect[..20]]);
    expect[10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(out, expect);
    assert_v4_checksums(&out);
}

// ---------------------------------------------------------------------------------------------
// 5. Fragmentation needed (MTU 1400) from a router → Packet Too Big (MTU 1420).
//
// 203.0.113.9 → 192.0.2.1, TTL 250, type 3 code 4, next-hop MTU 0x0578, quoting the IPv4
// header of a 1500-byte TCP segment 192.0.2.1:40000 → 198.51.100.2:443 and its first 8 bytes
// (ports and sequence number; no TCP checksum quoted, so none to adjust).
// ICMPv4 → 0x5582; IPv4 header → 0xc2b9; quoted IPv4 header → 0x49e5.
// Translated to [64:ff9b::203.0.113.9] → [2001:db8::1], type 2 code 0, MTU 1400 + 20 = 1420
// (0x058c); quoted IPv6 header with payload length 1480 (0x05c8), hop limit 63.
// ICMPv6 checksum over the pseudo-header (length 56) and the message → 0x944b.

#[rustfmt::skip]
const V4_FRAG_NEEDED: [u8; 56] = [
    0x45, 0x00, 0x00, 0x38, 0x00, 0x00, 0x00, 0x00, 0xfa, 0x01, 0xc2, 0xb9,
    0xcb, 0x00, 0x71, 0x09, 0xc0, 0x00, 0x02, 0x01,
    0x03, 0x04, 0x55, 0x82, 0x00, 0x00, 0x05, 0x78,
    0x45, 0x00, 0x05, 0xdc, 0x00, 0x00, 0x40, 0x00, 0x3f, 0x06, 0x49, 0xe5,
    0xc0, 0x00, 0x02, 0x01, 0xc6, 0x33, 0x64, 0x02,
    0x9c, 0x40, 0x01, 0xbb, 0x01, 0x02, 0x03, 0x04,
];

#[rustfmt::skip]
const V6_TOO_BIG: [u8; 96] = [
    0x60, 0x00, 0x00, 0x00, 0x00, 0x38, 0x3a, 0xfa,
    0x00, 0x64, 0xff, 0x9b, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xcb, 0x00, 0x71, 0x09,
    0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x02, 0x00, 0x94, 0x4b, 0x00, 0x00, 0x05, 0x8c,
    0x60, 0x00, 0x00, 0x00, 0x05, 0xc8, 0x06, 0x3f,
    0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x00, 0x64, 0xff, 0x9b, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc6, 0x33, 0x64, 0x02,
    0x30, 0x39, 0x01, 0xbb, 0x01, 0x02, 0x03, 0x04,
];

const CLIENT_FLOW: InnerRewrite<Ipv6Addr> = InnerRewrite {
    src: C6,
    dst: R6,
    l4: Some(L4Rewrite {
        src_port: 12345,
        dst_port: 443,
    }),
};

#[test]
fn frag_needed_to_packet_too_big() {
    assert_v4_checksums(&V4_FRAG_NEEDED);
    assert_eq!(ones_sum(&[&V4_FRAG_NEEDED[28..48]]), 0xFFFF);
    let mut out = [0u8; 200];
    let n = ipv4_to_ipv6_with_inner(&V4_FRAG_NEEDED, &mut out, RT6, C6, None, Some(CLIENT_FLOW))
        .unwrap();
    assert_eq!(&out[..n], &V6_TOO_BIG[..]);
    assert_v6_checksums(&out[..n]);
    let m = Icmpv6Packet::new_checked(&out[40..n]).unwrap();
    assert_eq!((m.msg_type(), m.code(), m.mtu()), (2, 0, 1420));
}

#[test]
fn frag_needed_without_mtu_uses_plateau() {
    // An old router sends MTU 0: the greatest RFC 1191 plateau below the quoted total length
    // (1500) is 1492, so the IPv6 MTU is 1512.
    let mut p = V4_FRAG_NEEDED;
    p[26..28].copy_from_slice(&[0, 0]);
    p[22..24].copy_from_slice(&[0, 0]);
    let c = !ones_sum(&[&p[20..]]);
    p[22..24].copy_from_slice(&c.to_be_bytes());
    let mut out = [0u8; 200];
    let n = ipv4_to_ipv6_with_inner(&p, &mut out, RT6, C6, None, Some(CLIENT_FLOW)).unwrap();
    let m = Icmpv6Packet::new_checked(&out[40..n]).unwrap();
    assert_eq!(m.mtu(), 1512);
    assert_v6_checksums(&out[..n]);
}

#[test]
fn packet_too_big_to_frag_needed() {
    // The reverse direction: an IPv6 router says 1280; IPv4 gets 1260.
    let mut out = [0u8; 200];
    let n = ipv6_to_ipv4_with_inner(
        &V6_TOO_BIG,
        &mut out,
        RT4,
        P4,
        None,
        Some(InnerRewrite {
            src: P4,
            dst: R4,
            l4: Some(L4Rewrite {
                src_port: 40000,
                dst_port: 443,
            }),
        }),
    )
    .unwrap();
    let out = &out[..n];
    assert_v4_checksums(out);
    let m = Icmpv4Packet::new_checked(&out[20..]).unwrap();
    assert_eq!((m.msg_type(), m.code(), m.next_hop_mtu()), (3, 4, 1400));
    // Everything comes back as it was: the quoted header had ident 0 and DF (1500 > 1260),
    // the outer one ident 0 and no DF (56 bytes).
    assert_eq!(out, &V4_FRAG_NEEDED[..]);

    let mut small = V6_TOO_BIG;
    small[44..48].copy_from_slice(&1280u32.to_be_bytes());
    small[42..44].copy_from_slice(&[0, 0]);
    let c = !ones_sum(&[
        &pseudo6(&small[8..24], &small[24..40], 58, 56),
        &small[40..],
    ]);
    small[42..44].copy_from_slice(&c.to_be_bytes());
    let mut out = [0u8; 200];
    let n = ipv6_to_ipv4(&small, &mut out, RT4, P4, None).unwrap();
    let m = Icmpv4Packet::new_checked(&out[20..n]).unwrap();
    assert_eq!(m.next_hop_mtu(), 1260);
    assert_v4_checksums(&out[..n]);
}

// ---------------------------------------------------------------------------------------------
// Parameter problems and other mappings.

/// An ICMPv4 error from R4 to P4 about V4_UDP, with a correct checksum.
fn v4_error(msg_type: u8, code: u8, rest: [u8; 4]) -> Vec<u8> {
    let mut m = vec![msg_type, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(&V4_UDP);
    let c = !ones_sum(&[&m]);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    let mut p = vec![0u8; 20];
    Ipv4Repr {
        src: R4,
        dst: P4,
        protocol: 1,
        ttl: 64,
        dscp_ecn: 0,
        ident: 0,
        dont_frag: false,
        payload_len: m.len(),
    }
    .emit(&mut Ipv4Packet::new_unchecked(&mut p[..]));
    p.extend_from_slice(&m);
    p
}

/// An ICMPv6 error from R6 to C6 about V6_UDP, with a correct checksum.
fn v6_error(msg_type: u8, code: u8, rest: u32) -> Vec<u8> {
    let mut m = vec![msg_type, code, 0, 0];
    m.extend_from_slice(&rest.to_be_bytes());
    m.extend_from_slice(&V6_UDP);
    let c = !ones_sum(&[&pseudo6(&R6.octets(), &C6.octets(), 58, m.len()), &m]);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    let mut p = vec![0u8; 40];
    Ipv6Repr {
        src: R6,
        dst: C6,
        next_header: 58,
        hop_limit: 64,
        traffic_class: 0,
        flow_label: 0,
        payload_len: m.len(),
    }
    .emit(&mut Ipv6Packet::new_unchecked(&mut p[..]));
    p.extend_from_slice(&m);
    p
}

fn v4_to_v6_icmp(p: &[u8]) -> Result<(u8, u8, u32), XlatError> {
    let mut out = [0u8; 300];
    let n = ipv4_to_ipv6(p, &mut out, R6, C6, Some(REPLY_TO_CLIENT))?;
    assert_v6_checksums(&out[..n]);
    let m = Icmpv6Packet::new_checked(&out[40..n]).unwrap();
    Ok((m.msg_type(), m.code(), m.rest_of_header()))
}

fn v6_to_v4_icmp(p: &[u8]) -> Result<(u8, u8, u32), XlatError> {
    let mut out = [0u8; 300];
    let n = ipv6_to_ipv4(p, &mut out, R4, P4, Some(TO_POOL))?;
    assert_v4_checksums(&out[..n]);
    let m = Icmpv4Packet::new_checked(&out[20..n]).unwrap();
    Ok((m.msg_type(), m.code(), m.rest_of_header()))
}

#[test]
fn icmpv4_error_mappings() {
    // Figure 3 pointers: protocol (9) → next header (6), TTL (8) → hop limit (7), source (12)
    // → 8, destination (16..19) → 24, total length (2) → payload length (4).
    for (p4, p6) in [
        (0u8, 0u32),
        (1, 1),
        (2, 4),
        (3, 4),
        (8, 7),
        (9, 6),
        (12, 8),
        (19, 24),
    ] {
        assert_eq!(
            v4_to_v6_icmp(&v4_error(12, 0, [p4, 0, 0, 0])).unwrap(),
            (4, 0, p6),
            "pointer {p4}"
        );
    }
    for p4 in [4u8, 5, 6, 7, 10, 11, 20] {
        assert_eq!(
            v4_to_v6_icmp(&v4_error(12, 0, [p4, 0, 0, 0])).unwrap_err(),
            XlatError::Untranslatable {
                reason: Untranslatable::IcmpPointer {
                    pointer: u32::from(p4)
                }
            }
        );
    }
    assert_eq!(
        v4_to_v6_icmp(&v4_error(12, 2, [9, 0, 0, 0])).unwrap(),
        (4, 0, 6)
    );
    assert!(v4_to_v6_icmp(&v4_error(12, 1, [0; 4])).is_err());
    // Destination unreachable codes.
    assert_eq!(v4_to_v6_icmp(&v4_error(3, 0, [0; 4])).unwrap(), (1, 0, 0));
    assert_eq!(v4_to_v6_icmp(&v4_error(3, 1, [0; 4])).unwrap(), (1, 0, 0));
    assert_eq!(v4_to_v6_icmp(&v4_error(3, 2, [0; 4])).unwrap(), (4, 1, 6));
    assert_eq!(v4_to_v6_icmp(&v4_error(3, 3, [0; 4])).unwrap(), (1, 4, 0));
    assert_eq!(v4_to_v6_icmp(&v4_error(3, 10, [0; 4])).unwrap(), (1, 1, 0));
    assert_eq!(v4_to_v6_icmp(&v4_error(3, 13, [0; 4])).unwrap(), (1, 1, 0));
    assert!(v4_to_v6_icmp(&v4_error(3, 14, [0; 4])).is_err());
    // Time exceeded keeps its code.
    assert_eq!(v4_to_v6_icmp(&v4_error(11, 1, [0; 4])).unwrap(), (3, 1, 0));
    // Informational and obsolete types are dropped.
    for t in [4u8, 5, 13, 14, 17] {
        assert_eq!(
            v4_to_v6_icmp(&v4_error(t, 0, [0; 4])).unwrap_err(),
            XlatError::Untranslatable {
                reason: Untranslatable::IcmpType {
                    msg_type: t,
                    code: 0
                }
            }
        );
    }
}

#[test]
fn icmpv6_error_mappings() {
    // Figure 6 pointers, in byte 4 of the ICMPv4 message.
    for (p6, p4) in [
        (0u32, 0u32),
        (1, 1),
        (4, 2),
        (5, 2),
        (6, 9),
        (7, 8),
        (8, 12),
        (23, 12),
    ] {
        assert_eq!(
            v6_to_v4_icmp(&v6_error(4, 0, p6)).unwrap(),
            (12, 0, p4 << 24),
            "pointer {p6}"
        );
    }
    assert_eq!(
        v6_to_v4_icmp(&v6_error(4, 0, 24)).unwrap(),
        (12, 0, 16 << 24)
    );
    assert_eq!(
        v6_to_v4_icmp(&v6_error(4, 0, 39)).unwrap(),
        (12, 0, 16 << 24)
    );
    for p6 in [2u32, 3, 40, 1000] {
        assert!(v6_to_v4_icmp(&v6_error(4, 0, p6)).is_err(), "pointer {p6}");
    }
    assert_eq!(v6_to_v4_icmp(&v6_error(4, 1, 0)).unwrap(), (3, 2, 0));
    assert!(v6_to_v4_icmp(&v6_error(4, 2, 0)).is_err());
    assert_eq!(v6_to_v4_icmp(&v6_error(1, 0, 0)).unwrap(), (3, 1, 0));
    assert_eq!(v6_to_v4_icmp(&v6_error(1, 1, 0)).unwrap(), (3, 10, 0));
    assert_eq!(v6_to_v4_icmp(&v6_error(1, 3, 0)).unwrap(), (3, 1, 0));
    assert_eq!(v6_to_v4_icmp(&v6_error(1, 4, 0)).unwrap(), (3, 3, 0));
    assert!(v6_to_v4_icmp(&v6_error(1, 5, 0)).is_err());
    assert_eq!(v6_to_v4_icmp(&v6_error(3, 0, 0)).unwrap(), (11, 0, 0));
    assert_eq!(v6_to_v4_icmp(&v6_error(2, 0, 9000)).unwrap(), (3, 4, 8980));
    // Neighbour discovery, MLD and unknown types are dropped.
    for t in [130u8, 133, 135, 137, 200] {
        assert!(matches!(
            v6_to_v4_icmp(&v6_error(t, 0, 0)).unwrap_err(),
            XlatError::Untranslatable {
                reason: Untranslatable::IcmpType { .. }
            }
        ));
    }
}

#[test]
fn icmp_error_with_bad_checksum_is_dropped() {
    let mut p = v4_error(3, 3, [0; 4]);
    p[30] ^= 1;
    assert_eq!(
        v4_to_v6_icmp(&p).unwrap_err(),
        XlatError::Untranslatable {
            reason: Untranslatable::BadChecksum
        }
    );
    let mut p = v6_error(1, 4, 0);
    p[60] ^= 1;
    assert_eq!(
        v6_to_v4_icmp(&p).unwrap_err(),
        XlatError::Untranslatable {
            reason: Untranslatable::BadChecksum
        }
    );
}

#[test]
fn embedded_echo_in_time_exceeded() {
    // A traceroute-style echo request quoted in a time exceeded: type, identifier and the
    // checksum (now with the ICMPv6 pseudo-header) are translated in the quoted message.
    let mut m = vec![11u8, 0, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&V4_ECHO);
    let c = !ones_sum(&[&m]);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    let mut p = vec![0u8; 20];
    Ipv4Repr {
        src: RT4,
        dst: P4,
        protocol: 1,
        ttl: 64,
        dscp_ecn: 0,
        ident: 0,
        dont_frag: false,
        payload_len: m.len(),
    }
    .emit(&mut Ipv4Packet::new_unchecked(&mut p[..]));
    p.extend_from_slice(&m);
    let mut out = [0u8; 200];
    let n = ipv4_to_ipv6_with_inner(
        &p,
        &mut out,
        RT6,
        C6,
        None,
        Some(InnerRewrite {
            src: C6,
            dst: R6,
            l4: Some(L4Rewrite {
                src_port: 0x1234,
                dst_port: 0x1234,
            }),
        }),
    )
    .unwrap();
    assert_v6_checksums(&out[..n]);
    // The quoted packet is V6_ECHO again, with flow label 0.
    let mut expect = V6_ECHO;
    expect[1..4].copy_from_slice(&[0, 0, 0]);
    assert_eq!(&out[48..n], &expect[..]);
    assert_eq!(out[40], 3);
}

#[test]
fn icmpv6_errors_are_cut_to_1280_bytes() {
    // An ICMPv4 error quoting a 1400-byte UDP datagram whole.
    let mut inner = vec![0u8; 20];
    let mut udp = vec![0u8; 1380];
    let mut u = UdpPacket::new_unchecked(&mut udp[..]);
    UdpRepr {
        src_port: 40000,
        dst_port: 53,
    }
    .emit(&mut u);
    u.fill_checksum(P4, R4);
    Ipv4Repr {
        src: P4,
        dst: R4,
        protocol: 17,
        ttl: 63,
        dscp_ecn: 0,
        ident: 0,
        dont_frag: true,
        payload_len: udp.len(),
    }
    .emit(&mut Ipv4Packet::new_unchecked(&mut inner[..]));
    inner.extend_from_slice(&udp);
    let mut m = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&inner);
    let c = !ones_sum(&[&m]);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    let mut p = vec![0u8; 20];
    Ipv4Repr {
        src: R4,
        dst: P4,
        protocol: 1,
        ttl: 64,
        dscp_ecn: 0,
        ident: 0,
        dont_frag: false,
        payload_len: m.len(),
    }
    .emit(&mut Ipv4Packet::new_unchecked(&mut p[..]));
    p.extend_from_slice(&m);
    let mut out = vec![0u8; 2000];
    let n = ipv4_to_ipv6(&p, &mut out, R6, C6, Some(REPLY_TO_CLIENT)).unwrap();
    assert_eq!(n, 1280);
    assert_v6_checksums(&out[..n]);
    let quoted = Ipv6Packet::new_unchecked(&out[48..n]);
    assert_eq!(
        quoted.payload_len(),
        1380,
        "the quoted header keeps the original length"
    );
    assert_eq!(
        ipv4_to_ipv6(&p, &mut out[..1279], R6, C6, None),
        Err(XlatError::OutputTooSmall { need: 1280 })
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals.

#[test]
fn refusals() {
    let mut out = [0u8; 300];
    let untrans = |reason| XlatError::Untranslatable { reason };

    // IPv4 fragment (MF).
    let mut frag = V4_UDP;
    frag[6] = 0x20;
    frag[10..12].copy_from_slice(&[0, 0]);
    let c = !ones_sum(&[&frag[..20]]);
    frag[10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(
        ipv4_to_ipv6(&frag, &mut out, C6, R6, None),
        Err(untrans(Untranslatable::Fragment))
    );

    // IPv4 options (IHL 6, a NOP option word).
    let mut opt = vec![0x46u8];
    opt.extend_from_slice(&V4_UDP[1..20]);
    opt.extend_from_slice(&[1, 1, 1, 0]);
    opt.extend_from_slice(&V4_UDP[20..]);
    opt[3] = 36;
    opt[10..12].copy_from_slice(&[0, 0]);
    let c = !ones_sum(&[&opt[..24]]);
    opt[10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(
        ipv4_to_ipv6(&opt, &mut out, C6, R6, None),
        Err(untrans(Untranslatable::Ipv4Options))
    );

    // Corrupt IPv4 header.
    let mut bad = V4_UDP;
    bad[8] = 0x40;
    assert_eq!(
        ipv4_to_ipv6(&bad, &mut out, C6, R6, None),
        Err(untrans(Untranslatable::BadChecksum))
    );

    // IPv6 fragment header.
    let mut f6 = V6_UDP[..40].to_vec();
    f6[6] = 44;
    f6[5] = 20;
    f6.extend_from_slice(&[17, 0, 0, 1, 0, 0, 0, 1]);
    f6.extend_from_slice(&V6_UDP[40..]);
    assert_eq!(
        ipv6_to_ipv4(&f6, &mut out, P4, R4, None),
        Err(untrans(Untranslatable::Fragment))
    );

    // A hop-by-hop header is skipped.
    let mut hbh = V6_UDP[..40].to_vec();
    hbh[6] = 0;
    hbh[5] = 20;
    hbh.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
    hbh.extend_from_slice(&V6_UDP[40..]);
    let n = ipv6_to_ipv4(&hbh, &mut out, P4, R4, Some(TO_POOL)).unwrap();
    assert_eq!(&out[..n], &V4_UDP[..]);

    // ICMPv6 over IPv4 and ICMPv4 over IPv6.
    let mut p = V4_ECHO;
    p[9] = 58;
    p[10..12].copy_from_slice(&[0, 0]);
    let c = !ones_sum(&[&p[..20]]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(
        ipv4_to_ipv6(&p, &mut out, C6, R6, None),
        Err(untrans(Untranslatable::Protocol { protocol: 58 }))
    );
    let mut p = V6_ECHO;
    p[6] = 1;
    assert_eq!(
        ipv6_to_ipv4(&p, &mut out, P4, R4, None),
        Err(untrans(Untranslatable::Protocol { protocol: 1 }))
    );

    // Output too small, and truncated or malformed input.
    assert_eq!(
        ipv6_to_ipv4(&V6_UDP, &mut out[..31], P4, R4, None),
        Err(XlatError::OutputTooSmall { need: 32 })
    );
    assert_eq!(
        ipv4_to_ipv6(&V4_UDP, &mut out[..51], C6, R6, None),
        Err(XlatError::OutputTooSmall { need: 52 })
    );
    assert_eq!(
        ipv6_to_ipv4(&V6_UDP[..51], &mut out, P4, R4, None),
        Err(XlatError::Packet(Error::Truncated {
            header: Header::Ipv6
        }))
    );
    assert_eq!(
        ipv4_to_ipv6(&V6_UDP, &mut out, C6, R6, None),
        Err(XlatError::Packet(Error::Malformed {
            header: Header::Ipv4
        }))
    );
    // A UDP header that lies about its length.
    let mut p = V6_UDP;
    p[45] = 13;
    assert_eq!(
        ipv6_to_ipv4(&p, &mut out, P4, R4, None),
        Err(XlatError::Packet(Error::Truncated {
            header: Header::Udp
        }))
    );
    // A quoted packet too short for an IPv4 header.
    let mut m = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&V4_UDP[..12]);
    let c = !ones_sum(&[&m]);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    let mut p = V4_UDP[..20].to_vec();
    p[9] = 1;
    p[3] = (20 + m.len()) as u8;
    p[10..12].copy_from_slice(&[0, 0]);
    let c = !ones_sum(&[&p[..20]]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&m);
    assert_eq!(
        ipv4_to_ipv6(&p, &mut out, C6, R6, None),
        Err(XlatError::Truncated)
    );
}

// ---------------------------------------------------------------------------------------------
// Round trips.

#[derive(Debug, Clone)]
enum Kind {
    Udp {
        sport: u16,
        dport: u16,
    },
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        window: u16,
    },
    Echo {
        request: bool,
        ident: u16,
        seq: u16,
    },
}

fn kind_strategy() -> impl Strategy<Value = Kind> {
    prop_oneof![
        (any::<u16>(), any::<u16>()).prop_map(|(sport, dport)| Kind::Udp { sport, dport }),
        (
            any::<u16>(),
            any::<u16>(),
            any::<u32>(),
            any::<u32>(),
            any::<u8>(),
            any::<u16>()
        )
            .prop_map(|(sport, dport, seq, ack, flags, window)| Kind::Tcp {
                sport,
                dport,
                seq,
                ack,
                flags,
                window
            }),
        (any::<bool>(), any::<u16>(), any::<u16>()).prop_map(|(request, ident, seq)| Kind::Echo {
            request,
            ident,
            seq
        }),
    ]
}

impl Kind {
    fn ports(&self) -> L4Rewrite {
        match *self {
            Kind::Udp { sport, dport } | Kind::Tcp { sport, dport, .. } => L4Rewrite {
                src_port: sport,
                dst_port: dport,
            },
            Kind::Echo { ident, .. } => L4Rewrite {
                src_port: ident,
                dst_port: ident,
            },
        }
    }

    fn header_len(&self) -> usize {
        match self {
            Kind::Tcp { .. } => 20,
            _ => 8,
        }
    }
}

/// An IPv6 packet of this kind with valid checksums, built with the library's reprs.
fn build_v6(
    k: &Kind,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    tc: u8,
    fl: u32,
    hl: u8,
    data: &[u8],
) -> Vec<u8> {
    let l4_len = k.header_len() + data.len();
    let mut p = vec![0u8; 40 + l4_len];
    let next_header = match k {
        Kind::Udp { .. } => 17,
        Kind::Tcp { .. } => 6,
        Kind::Echo { .. } => 58,
    };
    Ipv6Repr {
        src,
        dst,
        next_header,
        hop_limit: hl,
        traffic_class: tc,
        flow_label: fl,
        payload_len: l4_len,
    }
    .emit(&mut Ipv6Packet::new_unchecked(&mut p[..]));
    let body = &mut p[40..];
    body[k.header_len()..].copy_from_slice(data);
    match *k {
        Kind::Udp { sport, dport } => {
            let mut u = UdpPacket::new_unchecked(body);
            UdpRepr {
                src_port: sport,
                dst_port: dport,
            }
            .emit(&mut u);
            u.fill_checksum(src, dst);
        }
        Kind::Tcp {
            sport,
            dport,
            seq,
            ack,
            flags,
            window,
        } => {
            let mut t = TcpPacket::new_unchecked(body);
            TcpRepr {
                src_port: sport,
                dst_port: dport,
                seq,
                ack,
                flags,
                window,
            }
            .emit(&mut t);
            t.fill_checksum(src, dst);
        }
        Kind::Echo {
            request,
            ident,
            seq,
        } => {
            let mut m = Icmpv6Packet::new_unchecked(body);
            let r = if request {
                Icmpv6Repr::EchoRequest { ident, seq_no: seq }
            } else {
                Icmpv6Repr::EchoReply { ident, seq_no: seq }
            };
            r.emit(&mut m);
            m.fill_checksum(src, dst);
        }
    }
    p
}

/// The same for IPv4.
#[allow(clippy::too_many_arguments)]
fn build_v4(
    k: &Kind,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    tos: u8,
    ident: u16,
    df: bool,
    ttl: u8,
    data: &[u8],
) -> Vec<u8> {
    let l4_len = k.header_len() + data.len();
    let mut p = vec![0u8; 20 + l4_len];
    let protocol = match k {
        Kind::Udp { .. } => 17,
        Kind::Tcp { .. } => 6,
        Kind::Echo { .. } => 1,
    };
    Ipv4Repr {
        src,
        dst,
        protocol,
        ttl,
        dscp_ecn: tos,
        ident,
        dont_frag: df,
        payload_len: l4_len,
    }
    .emit(&mut Ipv4Packet::new_unchecked(&mut p[..]));
    let body = &mut p[20..];
    body[k.header_len()..].copy_from_slice(data);
    match *k {
        Kind::Udp { sport, dport } => {
            let mut u = UdpPacket::new_unchecked(body);
            UdpRepr {
                src_port: sport,
                dst_port: dport,
            }
            .emit(&mut u);
            u.fill_checksum(src, dst);
        }
        Kind::Tcp {
            sport,
            dport,
            seq,
            ack,
            flags,
            window,
        } => {
            let mut t = TcpPacket::new_unchecked(body);
            TcpRepr {
                src_port: sport,
                dst_port: dport,
                seq,
                ack,
                flags,
                window,
            }
            .emit(&mut t);
            t.fill_checksum(src, dst);
        }
        Kind::Echo {
            request,
            ident,
            seq,
        } => {
            let mut m = Icmpv4Packet::new_unchecked(body);
            let r = if request {
                Icmpv4Repr::EchoRequest { ident, seq_no: seq }
            } else {
                Icmpv4Repr::EchoReply { ident, seq_no: seq }
            };
            r.emit(&mut m);
            m.fill_checksum();
        }
    }
    p
}

fn v6_addr() -> impl Strategy<Value = Ipv6Addr> {
    any::<u128>().prop_map(Ipv6Addr::from)
}

fn v4_addr() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// 6 → 4 → 6 gives the original packet, except the flow label (not carried by IPv4).
    #[test]
    fn round_trip_6_4_6(
        k in kind_strategy(),
        (s6, d6) in (v6_addr(), v6_addr()),
        (s4, d4) in (v4_addr(), v4_addr()),
        (tc, fl, hl) in (any::<u8>(), 0u32..0x10_0000, any::<u8>()),
        new in kind_strategy(),
        data in proptest::collection::vec(any::<u8>(), 0..1400),
    ) {
        let orig = build_v6(&k, s6, d6, tc, fl, hl, &data);
        assert_v6_checksums(&orig);
        let new_ports = match k { Kind::Echo { .. } => {
            let id = new.ports().src_port;
            L4Rewrite { src_port: id, dst_port: id }
        } _ => new.ports() };
        let v4 = translate_6to4(&orig, s4, d4, Some(new_ports));
        assert_v4_checksums(&v4);
        let ip = Ipv4Packet::new_checked(&v4[..]).unwrap();
        prop_assert_eq!((ip.src_addr(), ip.dst_addr()), (s4, d4));
        prop_assert_eq!((ip.ttl(), ip.dscp_ecn(), ip.ident()), (hl, tc, 0));
        prop_assert_eq!(ip.dont_frag(), v4.len() > 1260);
        prop_assert_eq!(usize::from(ip.total_len()), orig.len() - 20);
        let back = translate_4to6(&v4, s6, d6, Some(k.ports()));
        let mut expect = orig.clone();
        Ipv6Packet::new_unchecked(&mut expect[..]).set_flow_label(0);
        prop_assert_eq!(back, expect);
    }

    /// 4 → 6 → 4 gives the original packet, except identification (0) and DF (by size).
    #[test]
    fn round_trip_4_6_4(
        k in kind_strategy(),
        (s6, d6) in (v6_addr(), v6_addr()),
        (s4, d4) in (v4_addr(), v4_addr()),
        (tos, ident, df, ttl) in (any::<u8>(), any::<u16>(), any::<bool>(), any::<u8>()),
        data in proptest::collection::vec(any::<u8>(), 0..1400),
    ) {
        let orig = build_v4(&k, s4, d4, tos, ident, df, ttl, &data);
        assert_v4_checksums(&orig);
        let v6 = translate_4to6(&orig, s6, d6, None);
        assert_v6_checksums(&v6);
        let ip = Ipv6Packet::new_checked(&v6[..]).unwrap();
        prop_assert_eq!((ip.src_addr(), ip.dst_addr(), ip.flow_label()), (s6, d6, 0));
        prop_assert_eq!((ip.hop_limit(), ip.traffic_class()), (ttl, tos));
        let back = translate_6to4(&v6, s4, d4, None);
        let mut expect = orig.clone();
        {
            let mut e = Ipv4Packet::new_unchecked(&mut expect[..]);
            e.set_ident(0);
            e.set_dont_frag(orig.len() > 1260);
        }
        expect[10..12].copy_from_slice(&[0, 0]);
        let c = !ones_sum(&[&expect[..20]]);
        expect[10..12].copy_from_slice(&c.to_be_bytes());
        prop_assert_eq!(back, expect);
    }

    /// Port unreachable about a translated datagram, translated back, quotes the datagram as
    /// it was sent (less the flow label).
    #[test]
    fn icmp_error_quotes_the_original(
        (sport, dport, pool_port) in (any::<u16>(), any::<u16>(), any::<u16>()),
        (s6, d6) in (v6_addr(), v6_addr()),
        (s4, d4) in (v4_addr(), v4_addr()),
        data in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let k = Kind::Udp { sport, dport };
        let orig = build_v6(&k, s6, d6, 0, 7, 64, &data);
        let v4 = translate_6to4(&orig, s4, d4, Some(L4Rewrite { src_port: pool_port, dst_port: dport }));
        // The server answers with port unreachable, quoting (at most 548 bytes of) it.
        let quote = &v4[..v4.len().min(548)];
        let mut m = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(quote);
        let c = !ones_sum(&[&m]);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        let mut err = vec![0u8; 20];
        Ipv4Repr { src: d4, dst: s4, protocol: 1, ttl: 64, dscp_ecn: 0, ident: 9, dont_frag: false, payload_len: m.len() }
            .emit(&mut Ipv4Packet::new_unchecked(&mut err[..]));
        err.extend_from_slice(&m);
        let back = translate_4to6(&err, d6, s6, Some(L4Rewrite { src_port: dport, dst_port: sport }));
        assert_v6_checksums(&back);
        let mut expect = orig.clone();
        Ipv6Packet::new_unchecked(&mut expect[..]).set_flow_label(0);
        prop_assert_eq!(&back[48..], &expect[..quote.len() + 20]);
    }

    /// Arbitrary bytes never panic the translator.
    #[test]
    fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..200), small in 0usize..100) {
        let mut out = [0u8; 400];
        let _ = ipv6_to_ipv4(&data, &mut out, P4, R4, Some(TO_POOL));
        let _ = ipv4_to_ipv6(&data, &mut out, C6, R6, Some(TO_POOL));
        let _ = ipv6_to_ipv4(&data, &mut out[..small], P4, R4, None);
        let _ = ipv4_to_ipv6(&data, &mut out[..small], C6, R6, None);
    }
}
