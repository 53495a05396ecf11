//! One-pass dissection of an Ethernet frame for the per-packet hot path.
//!
//! [`parse_layout`] reads the Ethernet header, at most one 802.1Q tag, the IPv4 or IPv6
//! header and the first bytes of the transport header, with a handful of bounds checks and no
//! allocation. What it accepts, the checked views accept too: a `Layout` with `l3: Ipv4` means
//! [`Ipv4Packet::new_checked`](super::Ipv4Packet::new_checked) succeeds at `l3_offset`, and so
//! on for TCP, UDP (unfragmented) and ICMP at `l4_offset`.
//!
//! Scope, deliberately narrow:
//! - One VLAN tag (TPID 0x8100). A second tag (QinQ) leaves `ethertype` = 0x8100 and `l3` =
//!   `Other`.
//! - IPv4: a non-first fragment (offset ≠ 0) reports `l4: Other(protocol)` with no ports, since
//!   its payload does not start with a transport header. A first fragment (MF set, offset 0)
//!   is dissected like any packet, with `fragment: true`.
//! - IPv6: the fixed header's next header is taken as the transport protocol, except for a
//!   Fragment header (44), which is looked through: `fragment` is set, and the transport
//!   header after it is dissected if the fragment offset is 0 (else `Other(next header)`).
//!   Other extension headers (hop-by-hop, routing, destination options, AH, ESP…) are not
//!   walked: they show as `l4: Other(their number)`.

use super::{ethertype, ip_proto, malformed, truncated, Error, Header};

/// What follows the Ethernet (and VLAN) header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L3 {
    /// IPv4.
    Ipv4,
    /// IPv6.
    Ipv6,
    /// Anything else (ARP, …): not dissected.
    Other,
}

/// The transport header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L4 {
    /// TCP, header present.
    Tcp,
    /// UDP, header present.
    Udp,
    /// ICMP over IPv4, header present.
    Icmpv4,
    /// ICMPv6 over IPv6, header present.
    Icmpv6,
    /// Another protocol, an IPv6 extension header, or a non-first fragment: the number.
    Other(u8),
    /// No IP layer.
    None,
}

/// Offsets and keys of one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    /// The VLAN id of the 802.1Q tag, if any.
    pub vlan: Option<u16>,
    /// The EtherType of the L3 header (after the tag, if any).
    pub ethertype: u16,
    /// Offset of the L3 header: 14, or 18 with a tag.
    pub l3_offset: u16,
    /// The L3 header.
    pub l3: L3,
    /// Offset of the transport header (after any IPv6 fragment header). Equal to `l3_offset`
    /// when `l4` is `None`.
    pub l4_offset: u16,
    /// The transport header.
    pub l4: L4,
    /// TCP/UDP source port; for ICMP echo request/reply the identifier; 0 otherwise.
    pub src_port: u16,
    /// TCP/UDP destination port; for ICMP echo request/reply the identifier; 0 otherwise.
    pub dst_port: u16,
    /// An IPv4 fragment (MF or offset), or an IPv6 packet with a fragment header.
    pub fragment: bool,
}

const ETH_LEN: usize = 14;
const VLAN_LEN: usize = 4;
const IPV4_MIN: usize = 20;
const IPV6_LEN: usize = 40;
const FRAG_LEN: usize = 8;

#[inline(always)]
fn be16(b: &[u8], off: usize) -> u16 {
    match b.get(off..off + 2) {
        Some(&[x, y]) => u16::from_be_bytes([x, y]),
        _ => 0,
    }
}

/// Dissects a frame. Errors: `Truncated` when a header (or the length an IP header declares)
/// runs past the frame, `Malformed` for a bad IP version, IHL, total length, TCP data offset
/// or UDP length. Bytes after the IP packet (Ethernet padding) are ignored.
pub fn parse_layout(frame: &[u8]) -> Result<Layout, Error> {
    let eth: &[u8; ETH_LEN] = frame.first_chunk().ok_or(truncated(Header::Ethernet))?;
    let mut ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    let mut l3_offset = ETH_LEN;
    let mut vlan = None;
    if ethertype == ethertype::VLAN {
        let tag: &[u8; VLAN_LEN] = frame
            .get(ETH_LEN..)
            .and_then(|r| r.first_chunk())
            .ok_or(truncated(Header::Vlan))?;
        vlan = Some(u16::from_be_bytes([tag[0], tag[1]]) & 0x0FFF);
        ethertype = u16::from_be_bytes([tag[2], tag[3]]);
        l3_offset += VLAN_LEN;
    }
    let mut out = Layout {
        vlan,
        ethertype,
        l3_offset: l3_offset as u16,
        l3: L3::Other,
        l4_offset: l3_offset as u16,
        l4: L4::None,
        src_port: 0,
        dst_port: 0,
        fragment: false,
    };
    let l3 = frame.get(l3_offset..).unwrap_or(&[]);
    match ethertype {
        ethertype::IPV4 => {
            let h: &[u8; IPV4_MIN] = l3.first_chunk().ok_or(truncated(Header::Ipv4))?;
            let ihl = usize::from(h[0] & 0x0F) * 4;
            if h[0] >> 4 != 4 || ihl < IPV4_MIN {
                return Err(malformed(Header::Ipv4));
            }
            if ihl > l3.len() {
                return Err(truncated(Header::Ipv4));
            }
            let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
            if total < ihl {
                return Err(malformed(Header::Ipv4));
            }
            let body = l3.get(ihl..total).ok_or(truncated(Header::Ipv4))?;
            let frag = u16::from_be_bytes([h[6], h[7]]);
            let proto = h[9];
            out.l3 = L3::Ipv4;
            out.l4_offset = (l3_offset + ihl) as u16;
            out.fragment = frag & 0x3FFF != 0;
            if frag & 0x1FFF != 0 {
                out.l4 = L4::Other(proto);
            } else {
                let kind = match proto {
                    ip_proto::TCP => L4::Tcp,
                    ip_proto::UDP => L4::Udp,
                    ip_proto::ICMP => L4::Icmpv4,
                    p => L4::Other(p),
                };
                transport(&mut out, kind, body)?;
            }
        }
        ethertype::IPV6 => {
            let h: &[u8; IPV6_LEN] = l3.first_chunk().ok_or(truncated(Header::Ipv6))?;
            if h[0] >> 4 != 6 {
                return Err(malformed(Header::Ipv6));
            }
            let plen = usize::from(u16::from_be_bytes([h[4], h[5]]));
            let mut body = l3
                .get(IPV6_LEN..IPV6_LEN + plen)
                .ok_or(truncated(Header::Ipv6))?;
            let mut nh = h[6];
            let mut l4_offset = l3_offset + IPV6_LEN;
            out.l3 = L3::Ipv6;
            let mut first = true;
            if nh == ip_proto::IPV6_FRAG {
                let f: &[u8; FRAG_LEN] = body.first_chunk().ok_or(truncated(Header::Ipv6))?;
                nh = f[0];
                first = u16::from_be_bytes([f[2], f[3]]) & 0xFFF8 == 0;
                out.fragment = true;
                body = body.get(FRAG_LEN..).unwrap_or(&[]);
                l4_offset += FRAG_LEN;
            }
            out.l4_offset = l4_offset as u16;
            if first {
                let kind = match nh {
                    ip_proto::TCP => L4::Tcp,
                    ip_proto::UDP => L4::Udp,
                    ip_proto::ICMPV6 => L4::Icmpv6,
                    p => L4::Other(p),
                };
                transport(&mut out, kind, body)?;
            } else {
                out.l4 = L4::Other(nh);
            }
        }
        _ => {}
    }
    Ok(out)
}

/// Fills `l4` and the ports from the transport header at the start of `body` (the rest of the
/// IP payload).
#[inline(always)]
fn transport(out: &mut Layout, kind: L4, body: &[u8]) -> Result<(), Error> {
    out.l4 = kind;
    match kind {
        L4::Tcp => {
            let t: &[u8; 20] = body.first_chunk().ok_or(truncated(Header::Tcp))?;
            let hl = usize::from(t[12] >> 4) * 4;
            if hl < 20 {
                return Err(malformed(Header::Tcp));
            }
            if hl > body.len() {
                return Err(truncated(Header::Tcp));
            }
            out.src_port = u16::from_be_bytes([t[0], t[1]]);
            out.dst_port = u16::from_be_bytes([t[2], t[3]]);
        }
        L4::Udp => {
            let u: &[u8; 8] = body.first_chunk().ok_or(truncated(Header::Udp))?;
            // A first fragment holds the header but not the whole datagram.
            if !out.fragment {
                let len = usize::from(u16::from_be_bytes([u[4], u[5]]));
                if len < 8 {
                    return Err(malformed(Header::Udp));
                }
                if len > body.len() {
                    return Err(truncated(Header::Udp));
                }
            }
            out.src_port = u16::from_be_bytes([u[0], u[1]]);
            out.dst_port = u16::from_be_bytes([u[2], u[3]]);
        }
        L4::Icmpv4 | L4::Icmpv6 => {
            let i: &[u8; 8] = body.first_chunk().ok_or(truncated(if kind == L4::Icmpv4 {
                Header::Icmpv4
            } else {
                Header::Icmpv6
            }))?;
            let echo = match kind {
                L4::Icmpv4 => {
                    i[0] == super::icmpv4::ECHO_REQUEST || i[0] == super::icmpv4::ECHO_REPLY
                }
                _ => i[0] == super::icmpv6::ECHO_REQUEST || i[0] == super::icmpv6::ECHO_REPLY,
            };
            if echo {
                let id = be16(i, 4);
                out.src_port = id;
                out.dst_port = id;
            }
        }
        L4::Other(_) | L4::None => {}
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn eth(ethertype: u16) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    fn ipv4(proto: u8, frag: u16, payload: &[u8]) -> Vec<u8> {
        let total = (20 + payload.len()) as u16;
        let mut h = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(payload);
        h
    }

    fn udp(sp: u16, dp: u16, len: u16) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend_from_slice(&sp.to_be_bytes());
        u.extend_from_slice(&dp.to_be_bytes());
        u.extend_from_slice(&len.to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u
    }

    #[test]
    fn ipv4_udp_with_vlan_and_padding() {
        let mut f = eth(0x8100);
        f.extend_from_slice(&[0x20, 0x64, 0x08, 0x00]);
        f.extend(ipv4(17, 0x4000, &udp(1000, 53, 8)));
        f.extend_from_slice(&[0; 10]);
        let l = parse_layout(&f).unwrap();
        assert_eq!(l.vlan, Some(100));
        assert_eq!(l.ethertype, 0x0800);
        assert_eq!((l.l3_offset, l.l4_offset), (18, 38));
        assert_eq!((l.l3, l.l4), (L3::Ipv4, L4::Udp));
        assert_eq!((l.src_port, l.dst_port, l.fragment), (1000, 53, false));
    }

    #[test]
    fn ipv4_fragments() {
        let mut f = eth(0x0800);
        f.extend(ipv4(17, 0x2000, &udp(1, 2, 1000)));
        let l = parse_layout(&f).unwrap();
        assert_eq!((l.l4, l.src_port, l.fragment), (L4::Udp, 1, true));
        let mut f = eth(0x0800);
        f.extend(ipv4(17, 0x0010, &udp(1, 2, 8)));
        let l = parse_layout(&f).unwrap();
        assert_eq!((l.l4, l.src_port, l.fragment), (L4::Other(17), 0, true));
    }

    #[test]
    fn errors() {
        assert_eq!(parse_layout(&[0; 13]), Err(truncated(Header::Ethernet)));
        let mut f = eth(0x0800);
        f.extend(ipv4(17, 0, &udp(1, 2, 8)));
        f[14] = 0x44;
        assert_eq!(parse_layout(&f), Err(malformed(Header::Ipv4)));
        f[14] = 0x45;
        f.truncate(f.len() - 1);
        assert_eq!(parse_layout(&f), Err(truncated(Header::Ipv4)));
        let mut f = eth(0x0800);
        f.extend(ipv4(17, 0, &udp(1, 2, 9)));
        assert_eq!(parse_layout(&f), Err(truncated(Header::Udp)));
        let mut f = eth(0x0800);
        f.extend(ipv4(6, 0, &[0; 19]));
        assert_eq!(parse_layout(&f), Err(truncated(Header::Tcp)));
    }

    #[test]
    fn ipv6_fragment_header_is_looked_through() {
        let mut f = eth(0x86DD);
        let mut h = vec![0x60, 0, 0, 0, 0, 16, 44, 64];
        h.extend_from_slice(&[0; 32]);
        f.extend(h);
        f.extend_from_slice(&[17, 0, 0, 1, 0, 0, 0, 7]);
        f.extend(udp(5, 6, 100));
        let l = parse_layout(&f).unwrap();
        assert_eq!((l.l3, l.l4, l.l4_offset), (L3::Ipv6, L4::Udp, 62));
        assert_eq!((l.src_port, l.dst_port, l.fragment), (5, 6, true));
        f[56] = 1; // offset 8 * 32
        let l = parse_layout(&f).unwrap();
        assert_eq!((l.l4, l.src_port), (L4::Other(17), 0));
    }

    #[test]
    fn other_ethertype() {
        let mut f = eth(0x0806);
        f.extend_from_slice(&[0; 28]);
        let l = parse_layout(&f).unwrap();
        assert_eq!((l.l3, l.l4, l.l4_offset), (L3::Other, L4::None, 14));
    }
}
