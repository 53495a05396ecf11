//! Zero-copy packet views, in the style of smoltcp's `wire` module.
//!
//! Each header has a view `XxxPacket<T: AsRef<[u8]>>` over a byte buffer that starts at the
//! header, with getters, setters (when `T: AsMut<[u8]>`), `payload()`/`payload_mut()` and a
//! `HEADER_LEN`, plus a `XxxRepr` struct holding the decoded fields for building packets in
//! tests and reference models.
//!
//! # Never panics
//! `new_checked` validates lengths (and the fields that decide lengths) so that every accessor
//! of a checked view reads inside the buffer. Views built with `new_unchecked` over a buffer
//! that is too short do not panic either: getters then read missing bytes as zero, setters
//! skip the bytes that do not exist, and `payload()` is clamped to the buffer. The hot path
//! uses [`layout::parse_layout`], which does its own minimal checks.
//!
//! # Checksums
//! `parse` of a repr never verifies checksums; call `verify_checksum` on the view. `emit` of
//! the IPv4 repr fills the header checksum (the header is self-contained); `emit` of the L4
//! reprs (UDP, TCP, ICMP) writes a zero checksum: write the payload, then call the view's
//! `fill_checksum` with the pseudo-header addresses.

use core::net::{Ipv4Addr, Ipv6Addr};

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod icmpv4;
pub mod icmpv6;
pub mod ipv4;
pub mod ipv6;
pub mod layout;
pub mod tcp;
pub mod udp;
pub mod vlan;
pub mod vxlan;
pub mod xlat;

pub use ethernet::{EthernetFrame, EthernetRepr};
pub use icmpv4::{Icmpv4Packet, Icmpv4Repr};
pub use icmpv6::{Icmpv6Packet, Icmpv6Repr};
pub use ipv4::{Ipv4Packet, Ipv4Repr};
pub use ipv6::{Ipv6Packet, Ipv6Repr};
pub use layout::{parse_layout, Layout, L3, L4};
pub use tcp::{TcpPacket, TcpRepr};
pub use udp::{UdpPacket, UdpRepr};
pub use vlan::{VlanRepr, VlanTag};
pub use vxlan::{VxlanPacket, VxlanRepr};

/// EtherType values.
pub mod ethertype {
    /// IPv4.
    pub const IPV4: u16 = 0x0800;
    /// ARP.
    pub const ARP: u16 = 0x0806;
    /// IEEE 802.1Q VLAN tag.
    pub const VLAN: u16 = 0x8100;
    /// IPv6.
    pub const IPV6: u16 = 0x86DD;
}

/// IP protocol numbers (IPv4 protocol, IPv6 next header).
pub mod ip_proto {
    /// IPv6 hop-by-hop options.
    pub const HOPOPT: u8 = 0;
    /// ICMP for IPv4.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// IPv6 routing header.
    pub const IPV6_ROUTE: u8 = 43;
    /// IPv6 fragment header.
    pub const IPV6_FRAG: u8 = 44;
    /// ICMP for IPv6.
    pub const ICMPV6: u8 = 58;
    /// IPv6 "no next header".
    pub const IPV6_NONXT: u8 = 59;
    /// IPv6 destination options.
    pub const IPV6_OPTS: u8 = 60;
}

/// The IANA UDP port of VXLAN (RFC 7348).
pub const VXLAN_PORT: u16 = 4789;

/// Which header an [`Error`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Header {
    /// Ethernet II.
    Ethernet,
    /// 802.1Q tag.
    Vlan,
    /// IPv4.
    Ipv4,
    /// IPv6.
    Ipv6,
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
    /// ICMP for IPv4.
    Icmpv4,
    /// ICMPv6.
    Icmpv6,
    /// VXLAN.
    Vxlan,
}

impl core::fmt::Display for Header {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Header::Ethernet => "Ethernet",
            Header::Vlan => "VLAN",
            Header::Ipv4 => "IPv4",
            Header::Ipv6 => "IPv6",
            Header::Udp => "UDP",
            Header::Tcp => "TCP",
            Header::Icmpv4 => "ICMPv4",
            Header::Icmpv6 => "ICMPv6",
            Header::Vxlan => "VXLAN",
        })
    }
}

/// Why a buffer is not a valid header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Error {
    /// The buffer ends before the header (or the length it declares) does.
    #[error("truncated {header} header")]
    Truncated {
        /// The header.
        header: Header,
    },
    /// A field is invalid: bad version, header length, data offset, length field, or (for a
    /// repr's `parse`) a message kind the repr does not describe.
    #[error("malformed {header} header")]
    Malformed {
        /// The header.
        header: Header,
    },
}

/// Results of this module.
pub type Result<T> = core::result::Result<T, Error>;

pub(crate) const fn truncated(header: Header) -> Error {
    Error::Truncated { header }
}

pub(crate) const fn malformed(header: Header) -> Error {
    Error::Malformed { header }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for core::net::Ipv4Addr {}
    impl Sealed for core::net::Ipv6Addr {}
}

/// An address family whose addresses make a transport pseudo-header: [`Ipv4Addr`] (RFC 768 /
/// RFC 793) or [`Ipv6Addr`] (RFC 8200 §8.1). UDP/TCP checksum methods are generic over it, so
/// `udp.fill_checksum(src, dst)` works the same for both families and mixing them is a type
/// error.
pub trait PseudoHeader: Copy + sealed::Sealed {
    /// Whether a UDP checksum of zero means "no checksum" (IPv4) rather than an error (IPv6).
    const UDP_ZERO_MEANS_NONE: bool;

    /// The folded partial sum of the pseudo-header for an upper-layer packet of `len` bytes.
    fn pseudo_header_sum(src: Self, dst: Self, protocol: u8, len: u32) -> u32;
}

impl PseudoHeader for Ipv4Addr {
    const UDP_ZERO_MEANS_NONE: bool = true;

    fn pseudo_header_sum(src: Self, dst: Self, protocol: u8, len: u32) -> u32 {
        checksum::pseudo_header_v4(src, dst, protocol, u16::try_from(len).unwrap_or(u16::MAX))
    }
}

impl PseudoHeader for Ipv6Addr {
    const UDP_ZERO_MEANS_NONE: bool = false;

    fn pseudo_header_sum(src: Self, dst: Self, protocol: u8, len: u32) -> u32 {
        checksum::pseudo_header_v6(src, dst, protocol, len)
    }
}

// Field access that cannot panic: reads past the end give zero, writes past the end are
// dropped. Offsets are small constants, so `off + N` cannot overflow.

#[inline]
fn get_u8(b: &[u8], off: usize) -> u8 {
    b.get(off).copied().unwrap_or(0)
}

#[inline]
fn get_u16(b: &[u8], off: usize) -> u16 {
    match b.get(off..off + 2) {
        Some(&[x, y]) => u16::from_be_bytes([x, y]),
        _ => 0,
    }
}

#[inline]
fn get_u32(b: &[u8], off: usize) -> u32 {
    match b.get(off..off + 4) {
        Some(&[w, x, y, z]) => u32::from_be_bytes([w, x, y, z]),
        _ => 0,
    }
}

#[inline]
fn get_array<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    b.get(off..off + N)
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .unwrap_or([0; N])
}

#[inline]
fn set_u8(b: &mut [u8], off: usize, v: u8) {
    if let Some(x) = b.get_mut(off) {
        *x = v;
    }
}

#[inline]
fn set_bytes(b: &mut [u8], off: usize, v: &[u8]) {
    if let Some(d) = b.get_mut(off..off + v.len()) {
        d.copy_from_slice(v);
    }
}

#[inline]
fn set_u16(b: &mut [u8], off: usize, v: u16) {
    set_bytes(b, off, &v.to_be_bytes());
}

#[inline]
fn set_u32(b: &mut [u8], off: usize, v: u32) {
    set_bytes(b, off, &v.to_be_bytes());
}

/// `b[start..end]` clamped to the buffer (empty when out of range).
#[inline]
fn clamp(b: &[u8], start: usize, end: usize) -> &[u8] {
    let end = end.min(b.len());
    b.get(start.min(end)..end).unwrap_or(&[])
}

/// Mutable `b[start..end]` clamped to the buffer.
#[inline]
fn clamp_mut(b: &mut [u8], start: usize, end: usize) -> &mut [u8] {
    let end = end.min(b.len());
    b.get_mut(start.min(end)..end).unwrap_or(&mut [])
}

/// The fuzzing entry point: dissects `data` as an Ethernet frame with
/// [`layout::parse_layout`], builds every applicable view with `new_checked`, reads every
/// field, parses the reprs (and checks that emitting them reproduces the parse), verifies
/// checksums, follows VXLAN into the inner frame (a few levels deep), and runs the RFC 7915
/// translator on the L3 packet. Also tries each view directly on `data`. Never panics on any
/// input; internal consistency checks are `debug_assert!`s, so a fuzzer built with debug
/// assertions reports disagreements between the dissector and the views.
pub fn fuzz_parse(data: &[u8]) {
    fuzz_frame(data, 0);
    fuzz_raw(data);
}

use core::hint::black_box;

const FUZZ_MAX_DEPTH: u8 = 3;

fn fuzz_frame(frame: &[u8], depth: u8) {
    if let Ok(eth) = EthernetFrame::new_checked(frame) {
        black_box((
            eth.dst_addr(),
            eth.src_addr(),
            eth.ethertype(),
            eth.payload().len(),
        ));
        if let Ok(r) = EthernetRepr::parse(&eth) {
            let mut buf = [0u8; EthernetFrame::<&[u8]>::HEADER_LEN];
            r.emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
            debug_assert_eq!(
                EthernetRepr::parse(&EthernetFrame::new_unchecked(&buf[..])),
                Ok(r)
            );
        }
        if eth.ethertype() == ethertype::VLAN {
            fuzz_vlan(eth.payload());
        }
    }
    let Ok(l) = parse_layout(frame) else {
        return;
    };
    black_box(l);
    let l3 = frame.get(usize::from(l.l3_offset)..).unwrap_or(&[]);
    let l4 = frame.get(usize::from(l.l4_offset)..).unwrap_or(&[]);
    match l.l3 {
        L3::Ipv4 => {
            let ip = Ipv4Packet::new_checked(l3);
            debug_assert!(ip.is_ok());
            if let Ok(ip) = ip {
                debug_assert_eq!(ip.is_fragment(), l.fragment);
                fuzz_ipv4(&ip);
                fuzz_l4(
                    l,
                    ip.payload(),
                    Some((ip.src_addr(), ip.dst_addr())),
                    None,
                    depth,
                );
            }
        }
        L3::Ipv6 => {
            let ip = Ipv6Packet::new_checked(l3);
            debug_assert!(ip.is_ok());
            if let Ok(ip) = ip {
                fuzz_ipv6(&ip);
                // The L4 bytes end where the IPv6 payload ends.
                let end = usize::from(l.l3_offset) + Ipv6Packet::<&[u8]>::HEADER_LEN;
                let end = end + usize::from(ip.payload_len());
                let l4 = clamp(frame, usize::from(l.l4_offset), end);
                fuzz_l4(l, l4, None, Some((ip.src_addr(), ip.dst_addr())), depth);
            }
        }
        L3::Other => {
            debug_assert_eq!(l.l4, L4::None);
        }
    }
    black_box(l4.len());
}

fn fuzz_vlan(data: &[u8]) {
    if let Ok(tag) = VlanTag::new_checked(data) {
        black_box((tag.pcp(), tag.dei(), tag.vid(), tag.tci(), tag.ethertype()));
        black_box(tag.payload().len());
        if let Ok(r) = VlanRepr::parse(&tag) {
            let mut buf = [0u8; VlanTag::<&[u8]>::HEADER_LEN];
            r.emit(&mut VlanTag::new_unchecked(&mut buf[..]));
            debug_assert_eq!(VlanRepr::parse(&VlanTag::new_unchecked(&buf[..])), Ok(r));
        }
    }
}

fn fuzz_ipv4(ip: &Ipv4Packet<&[u8]>) {
    black_box((
        ip.version(),
        ip.header_len(),
        ip.dscp_ecn(),
        ip.dscp(),
        ip.ecn(),
    ));
    black_box((ip.total_len(), ip.ident(), ip.dont_frag(), ip.more_frags()));
    black_box((ip.frag_offset(), ip.ttl(), ip.protocol(), ip.checksum()));
    black_box((
        ip.src_addr(),
        ip.dst_addr(),
        ip.options().len(),
        ip.payload().len(),
    ));
    black_box(ip.verify_checksum());
    if let Ok(r) = Ipv4Repr::parse(ip) {
        let mut buf = [0u8; Ipv4Packet::<&[u8]>::HEADER_LEN];
        let mut out = Ipv4Packet::new_unchecked(&mut buf[..]);
        r.emit(&mut out);
        debug_assert!(out.verify_checksum());
        debug_assert_eq!(
            out.total_len(),
            ip.total_len().wrapping_sub(ip.options().len() as u16)
        );
    }
}

fn fuzz_ipv6(ip: &Ipv6Packet<&[u8]>) {
    black_box((
        ip.version(),
        ip.traffic_class(),
        ip.flow_label(),
        ip.payload_len(),
    ));
    black_box((
        ip.next_header(),
        ip.hop_limit(),
        ip.src_addr(),
        ip.dst_addr(),
    ));
    black_box(ip.payload().len());
    if let Ok(r) = Ipv6Repr::parse(ip) {
        let mut buf = [0u8; Ipv6Packet::<&[u8]>::HEADER_LEN];
        r.emit(&mut Ipv6Packet::new_unchecked(&mut buf[..]));
        let back = Ipv6Packet::new_unchecked(&buf[..]);
        debug_assert_eq!(back.src_addr(), ip.src_addr());
        debug_assert_eq!(back.flow_label(), ip.flow_label());
        debug_assert_eq!(back.payload_len(), ip.payload_len());
    }
}

type V4Pair = Option<(Ipv4Addr, Ipv4Addr)>;
type V6Pair = Option<(Ipv6Addr, Ipv6Addr)>;

fn fuzz_l4(l: Layout, data: &[u8], v4: V4Pair, v6: V6Pair, depth: u8) {
    match l.l4 {
        L4::Tcp => {
            let tcp = TcpPacket::new_checked(data);
            debug_assert!(tcp.is_ok());
            if let Ok(tcp) = tcp {
                debug_assert_eq!((tcp.src_port(), tcp.dst_port()), (l.src_port, l.dst_port));
                fuzz_tcp(&tcp, v4, v6);
            }
        }
        L4::Udp => {
            // A first fragment carries the UDP header but not the whole datagram.
            if l.fragment {
                black_box(UdpPacket::new_unchecked(data).src_port());
                return;
            }
            let udp = UdpPacket::new_checked(data);
            debug_assert!(udp.is_ok());
            if let Ok(udp) = udp {
                debug_assert_eq!((udp.src_port(), udp.dst_port()), (l.src_port, l.dst_port));
                fuzz_udp(&udp, v4, v6);
                if udp.dst_port() == VXLAN_PORT {
                    fuzz_vxlan(udp.payload(), depth);
                }
            }
        }
        L4::Icmpv4 => {
            let icmp = Icmpv4Packet::new_checked(data);
            debug_assert!(icmp.is_ok());
            if let Ok(icmp) = icmp {
                fuzz_icmpv4(&icmp);
            }
        }
        L4::Icmpv6 => {
            let icmp = Icmpv6Packet::new_checked(data);
            debug_assert!(icmp.is_ok());
            if let Ok(icmp) = icmp {
                fuzz_icmpv6(&icmp, v6);
            }
        }
        L4::Other(p) => {
            black_box(p);
        }
        L4::None => {}
    }
}

fn fuzz_tcp(tcp: &TcpPacket<&[u8]>, v4: V4Pair, v6: V6Pair) {
    black_box((
        tcp.src_port(),
        tcp.dst_port(),
        tcp.seq_number(),
        tcp.ack_number(),
    ));
    black_box((tcp.header_len(), tcp.flags(), tcp.window(), tcp.checksum()));
    black_box((tcp.urgent(), tcp.options().len(), tcp.payload().len()));
    if let Some((s, d)) = v4 {
        black_box(tcp.verify_checksum(s, d));
    }
    if let Some((s, d)) = v6 {
        black_box(tcp.verify_checksum(s, d));
    }
    if let Ok(r) = TcpRepr::parse(tcp) {
        let mut buf = [0u8; TcpPacket::<&[u8]>::HEADER_LEN];
        r.emit(&mut TcpPacket::new_unchecked(&mut buf[..]));
        debug_assert_eq!(TcpRepr::parse(&TcpPacket::new_unchecked(&buf[..])), Ok(r));
    }
}

fn fuzz_udp(udp: &UdpPacket<&[u8]>, v4: V4Pair, v6: V6Pair) {
    black_box((udp.src_port(), udp.dst_port(), udp.len(), udp.checksum()));
    black_box(udp.payload().len());
    if let Some((s, d)) = v4 {
        black_box(udp.verify_checksum(s, d));
    }
    if let Some((s, d)) = v6 {
        black_box(udp.verify_checksum(s, d));
    }
    if let Ok(r) = UdpRepr::parse(udp) {
        let mut buf = [0u8; UdpPacket::<&[u8]>::HEADER_LEN];
        r.emit(&mut UdpPacket::new_unchecked(&mut buf[..]));
        debug_assert_eq!(UdpRepr::parse(&UdpPacket::new_unchecked(&buf[..])), Ok(r));
    }
}

fn fuzz_icmpv4(icmp: &Icmpv4Packet<&[u8]>) {
    black_box((
        icmp.msg_type(),
        icmp.code(),
        icmp.checksum(),
        icmp.rest_of_header(),
    ));
    black_box((
        icmp.echo_ident(),
        icmp.echo_seq_no(),
        icmp.next_hop_mtu(),
        icmp.pointer(),
    ));
    black_box((icmp.payload().len(), icmp.verify_checksum()));
    if let Ok(r) = Icmpv4Repr::parse(icmp) {
        let mut buf = [0u8; Icmpv4Packet::<&[u8]>::HEADER_LEN];
        r.emit(&mut Icmpv4Packet::new_unchecked(&mut buf[..]));
        debug_assert_eq!(
            Icmpv4Repr::parse(&Icmpv4Packet::new_unchecked(&buf[..])),
            Ok(r)
        );
    }
}

fn fuzz_icmpv6(icmp: &Icmpv6Packet<&[u8]>, v6: V6Pair) {
    black_box((
        icmp.msg_type(),
        icmp.code(),
        icmp.checksum(),
        icmp.rest_of_header(),
    ));
    black_box((
        icmp.echo_ident(),
        icmp.echo_seq_no(),
        icmp.mtu(),
        icmp.pointer(),
    ));
    black_box(icmp.payload().len());
    if let Some((s, d)) = v6 {
        black_box(icmp.verify_checksum(s, d));
    }
    if let Ok(r) = Icmpv6Repr::parse(icmp) {
        let mut buf = [0u8; Icmpv6Packet::<&[u8]>::HEADER_LEN];
        r.emit(&mut Icmpv6Packet::new_unchecked(&mut buf[..]));
        debug_assert_eq!(
            Icmpv6Repr::parse(&Icmpv6Packet::new_unchecked(&buf[..])),
            Ok(r)
        );
    }
}

fn fuzz_vxlan(data: &[u8], depth: u8) {
    let Ok(vx) = VxlanPacket::new_checked(data) else {
        return;
    };
    black_box((vx.flags(), vx.vni(), vx.payload().len()));
    if let Ok(r) = VxlanRepr::parse(&vx) {
        let mut buf = [0u8; VxlanPacket::<&[u8]>::HEADER_LEN];
        r.emit(&mut VxlanPacket::new_unchecked(&mut buf[..]));
        debug_assert_eq!(
            VxlanRepr::parse(&VxlanPacket::new_unchecked(&buf[..])),
            Ok(r)
        );
    }
    if depth < FUZZ_MAX_DEPTH {
        fuzz_frame(vx.payload(), depth + 1);
    }
}

/// Views tried directly on the input, whatever the dissector says, and the translator.
fn fuzz_raw(data: &[u8]) {
    let v4 = (Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(198, 51, 100, 2));
    let v6 = (
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
        Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0xc633, 0x6402),
    );
    if let Ok(ip) = Ipv4Packet::new_checked(data) {
        fuzz_ipv4(&ip);
    }
    if let Ok(ip) = Ipv6Packet::new_checked(data) {
        fuzz_ipv6(&ip);
    }
    if let Ok(p) = TcpPacket::new_checked(data) {
        fuzz_tcp(&p, Some(v4), Some(v6));
    }
    if let Ok(p) = UdpPacket::new_checked(data) {
        fuzz_udp(&p, Some(v4), Some(v6));
    }
    if let Ok(p) = Icmpv4Packet::new_checked(data) {
        fuzz_icmpv4(&p);
    }
    if let Ok(p) = Icmpv6Packet::new_checked(data) {
        fuzz_icmpv6(&p, Some(v6));
    }
    fuzz_vlan(data);
    fuzz_vxlan(data, FUZZ_MAX_DEPTH);

    // The translator, on the input as an L3 packet and on the L3 packet of the frame.
    let l3 = match parse_layout(data) {
        Ok(l) if l.l3 != L3::Other => data.get(usize::from(l.l3_offset)..).unwrap_or(&[]),
        _ => data,
    };
    let mut out = [0u8; 1600];
    let rw = Some(xlat::L4Rewrite {
        src_port: 1234,
        dst_port: 80,
    });
    for input in [data, l3] {
        black_box(xlat::ipv4_to_ipv6(input, &mut out, v6.0, v6.1, rw).ok());
        black_box(xlat::ipv4_to_ipv6(input, &mut out[..64], v6.0, v6.1, None).ok());
        black_box(xlat::ipv6_to_ipv4(input, &mut out, v4.0, v4.1, rw).ok());
        black_box(xlat::ipv6_to_ipv4(input, &mut out[..48], v4.0, v4.1, None).ok());
    }
}
