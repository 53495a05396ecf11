//! Stateless IP/ICMP header translation, RFC 7915, for stateful NAT64.
//!
//! The caller decides the addresses (and ports) of the translated packet; these functions
//! rewrite headers and checksums only. `input` starts at the IP header, `out` receives the
//! translated IP packet; the number of bytes written is returned. Nothing is allocated. When
//! an error is returned, the contents of `out` are unspecified.
//!
//! # Choices
//! - **TTL / hop limit** are copied unchanged: the caller decrements and generates Time
//!   Exceeded.
//! - **Traffic class ↔ TOS**: all 8 bits copied. **Flow label**: 0.
//! - **IPv6 → IPv4 identification and DF** (§5.1): identification 0; DF = 0 if the translated
//!   packet is at most 1260 bytes, 1 otherwise, as RFC 7915 §5.1 says (RFC 6145 had DF = 1
//!   always; RFC 7915 clears it for small packets so that IPv6 hosts, which never get a Packet
//!   Too Big below 1280, are not black-holed by IPv4 links with a smaller MTU). A pure function
//!   has no per-destination counter for the identification the RFC asks for; a caller that
//!   wants one writes it afterwards with `Ipv4Packet::set_ident` and adjusts the header
//!   checksum with [`update16`](super::checksum::update16).
//! - **Fragments are not translated**: an IPv4 fragment (MF or offset) or an IPv6 packet with
//!   a Fragment header gives [`Untranslatable::Fragment`]; the caller reassembles first or
//!   drops. No Fragment header is ever added: the caller enforces the MTU.
//! - **IPv4 options** give [`Untranslatable::Ipv4Options`] (RFC 7915 would ignore them, but
//!   a source-route option must not be ignored, and options are rare enough to drop).
//! - **IPv6 extension headers**: hop-by-hop, destination options and routing headers with
//!   Segments Left = 0 are skipped (§5.1); a routing header with segments left gives
//!   [`Untranslatable::RoutingHeader`].
//! - **IPv4 header checksum** is verified: a corrupt IPv4 header must not become an IPv6
//!   header, which has no checksum.
//! - **TCP/UDP checksums** are adjusted incrementally (RFC 1624) for the new addresses and
//!   ports, so a corrupt segment stays corrupt. A UDP/IPv4 datagram with a zero checksum gets
//!   a full checksum computed for IPv6 (§4.5). A UDP/IPv6 zero checksum (RFC 6936 tunnels)
//!   stays zero (= none) in IPv4.
//! - **ICMP echo** request/reply (8/0 ↔ 128/129): type mapped, identifier rewritten to
//!   [`L4Rewrite::src_port`], checksum adjusted incrementally for the ICMPv6 pseudo-header.
//! - **ICMP errors** (destination unreachable, time exceeded, packet too big ↔ fragmentation
//!   needed, parameter problem) are mapped per §4.2/§5.2; the incoming ICMP checksum is
//!   verified ([`Untranslatable::BadChecksum`]) and the outgoing one computed in full. The
//!   embedded packet is translated too: its IP header is rebuilt in the other family, its
//!   ports or echo identifier rewritten and its transport checksum adjusted incrementally
//!   (it may be truncated). ICMPv6 errors made from ICMPv4 errors are cut to 1280 bytes.
//!   RFC 4884 extension lengths are not carried over: trailing extensions read as part of
//!   the embedded packet. Informational messages other than echo, unknown types and codes,
//!   and pointers with no counterpart give [`Untranslatable`] reasons, i.e. the packet is
//!   silently dropped as the RFC says.
//!
//! # The embedded packet of an ICMP error
//! An ICMP error travels back to the sender of the packet it embeds, so with `inner: None`
//! the embedded packet is given the outer addresses swapped (its source is the outer
//! destination, its destination the outer source) and, if `l4` is given, its ports
//! reversed (source port = `l4.dst_port`, destination port = `l4.src_port`; for an embedded
//! echo the identifier is `l4.dst_port`). That is right when the error comes from the flow's
//! peer itself (port unreachable). For an error from a router on the path (time exceeded,
//! packet too big) the embedded destination is not the outer source: look up the flow of the
//! embedded packet and pass its translation as [`InnerRewrite`] to
//! [`ipv4_to_ipv6_with_inner`] / [`ipv6_to_ipv4_with_inner`].

use core::net::{Ipv4Addr, Ipv6Addr};

use super::checksum::{fold, pseudo_header_v6, sum, udp_nonzero};
use super::{icmpv4, icmpv6, ip_proto, Error, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr};
use super::{Icmpv4Packet, Icmpv6Packet, TcpPacket, UdpPacket};

/// Ports written into the translated transport header. For ICMP echo, `src_port` is the
/// identifier written into the message (set both fields to it, as [`super::Layout`] does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct L4Rewrite {
    /// Source port, or the echo identifier.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
}

/// The addresses and ports to give the packet embedded in an ICMP error, in that packet's own
/// direction (its source is the host the error is sent to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InnerRewrite<A> {
    /// Source address of the embedded packet.
    pub src: A,
    /// Destination address of the embedded packet.
    pub dst: A,
    /// Its ports (embedded echo: `src_port` is the identifier); `None` keeps them.
    pub l4: Option<L4Rewrite>,
}

/// Why a packet is not translated (RFC 7915's "silently drop", or a choice documented in the
/// [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Untranslatable {
    /// An IPv4 header with options.
    Ipv4Options,
    /// A fragment (IPv4 MF/offset, IPv6 Fragment header), outer or embedded.
    Fragment,
    /// An IPv6 routing header with segments left.
    RoutingHeader,
    /// More IPv6 extension headers than the translator walks (8).
    TooManyExtensionHeaders,
    /// ICMPv6 carried over IPv4, or ICMPv4 over IPv6.
    Protocol {
        /// The protocol number.
        protocol: u8,
    },
    /// An ICMP type or code with no translation.
    IcmpType {
        /// Type.
        msg_type: u8,
        /// Code.
        code: u8,
    },
    /// A parameter-problem pointer with no counterpart in the other header.
    IcmpPointer {
        /// The pointer.
        pointer: u32,
    },
    /// The packet embedded in an ICMP error cannot be translated (wrong version, bad header,
    /// an ICMP error or non-echo message inside).
    InnerPacket,
    /// The IPv4 header checksum or the incoming ICMP error's checksum is wrong.
    BadChecksum,
    /// The translated packet would exceed 65535 bytes of IPv4 total length.
    TooLarge,
}

impl core::fmt::Display for Untranslatable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Untranslatable::Ipv4Options => f.write_str("IPv4 options"),
            Untranslatable::Fragment => f.write_str("fragment"),
            Untranslatable::RoutingHeader => f.write_str("routing header with segments left"),
            Untranslatable::TooManyExtensionHeaders => f.write_str("too many extension headers"),
            Untranslatable::Protocol { protocol } => write!(f, "protocol {protocol}"),
            Untranslatable::IcmpType { msg_type, code } => {
                write!(f, "ICMP type {msg_type} code {code}")
            }
            Untranslatable::IcmpPointer { pointer } => write!(f, "ICMP pointer {pointer}"),
            Untranslatable::InnerPacket => f.write_str("embedded packet"),
            Untranslatable::BadChecksum => f.write_str("bad checksum"),
            Untranslatable::TooLarge => f.write_str("too large"),
        }
    }
}

/// Translation failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum XlatError {
    /// The packet ends before a field the translation reads or rewrites: an IPv6 extension
    /// header, the packet embedded in an ICMP error, or its transport ports.
    #[error("packet truncated before a field the translation needs")]
    Truncated,
    /// `out` is shorter than the translated packet.
    #[error("output buffer too small: {need} bytes needed")]
    OutputTooSmall {
        /// Bytes the translated packet needs.
        need: usize,
    },
    /// The packet is not translated.
    #[error("not translatable: {reason}")]
    Untranslatable {
        /// Why.
        reason: Untranslatable,
    },
    /// The IP header or the transport header is invalid.
    #[error(transparent)]
    Packet(#[from] Error),
}

type Result<T> = core::result::Result<T, XlatError>;

const fn refuse(reason: Untranslatable) -> XlatError {
    XlatError::Untranslatable { reason }
}

const V4_HDR: usize = 20;
const V6_HDR: usize = 40;
const ICMP_HDR: usize = 8;
/// Translated packets above this size get DF = 1 (RFC 7915 §5.1).
const DF_THRESHOLD: usize = 1260;
/// The IPv6 minimum MTU: ICMPv6 errors are cut to it.
const IPV6_MIN_MTU: usize = 1280;
const MAX_EXT_HEADERS: usize = 8;

// ---------------------------------------------------------------------------------------------
// Checksum helpers.

/// RFC 1624 eqn. 3 for several words at once: takes `remove` (a partial sum of the old words)
/// out of the checksum and puts `add` (of the new words) in.
fn adjust(csum: u16, remove: u32, add: u32) -> u16 {
    !fold(u32::from(!csum) + u32::from(!fold(remove)) + add)
}

fn sum4(a: Ipv4Addr) -> u32 {
    sum(&a.octets())
}

fn sum6(a: Ipv6Addr) -> u32 {
    sum(&a.octets())
}

fn be16(b: &[u8], off: usize) -> Option<u16> {
    match b.get(off..off + 2) {
        Some(&[x, y]) => Some(u16::from_be_bytes([x, y])),
        _ => None,
    }
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    if let Some(d) = b.get_mut(off..off + 2) {
        d.copy_from_slice(&v.to_be_bytes());
    }
}

fn out_slice(out: &mut [u8], need: usize) -> Result<&mut [u8]> {
    out.get_mut(..need)
        .ok_or(XlatError::OutputTooSmall { need })
}

/// Rewrites the ports (if asked) of a TCP or UDP header at the start of `data`, which may be
/// truncated, and adjusts its checksum if present: `remove`/`add` are the partial sums of the
/// old and new pseudo-header addresses. A zero UDP checksum is left alone.
fn fix_transport(
    data: &mut [u8],
    udp: bool,
    remove: u32,
    add: u32,
    l4: Option<L4Rewrite>,
) -> Result<()> {
    let (mut remove, mut add) = (remove, add);
    if let Some(rw) = l4 {
        let (sp, dp) = match (be16(data, 0), be16(data, 2)) {
            (Some(s), Some(d)) => (s, d),
            _ => return Err(XlatError::Truncated),
        };
        remove += u32::from(sp) + u32::from(dp);
        add += u32::from(rw.src_port) + u32::from(rw.dst_port);
        put16(data, 0, rw.src_port);
        put16(data, 2, rw.dst_port);
    }
    let off = if udp { 6 } else { 16 };
    if let Some(c) = be16(data, off) {
        if udp && c == 0 {
            return Ok(());
        }
        let n = adjust(c, remove, add);
        put16(data, off, if udp { udp_nonzero(n) } else { n });
    }
    Ok(())
}

/// Maps an echo message at the start of `data` (possibly truncated after the identifier) to
/// `new_type`, rewrites the identifier if asked and adjusts the checksum by the type change,
/// the identifier change and `remove`/`add` (pseudo-header sums).
fn fix_echo(
    data: &mut [u8],
    new_type: u8,
    remove: u32,
    add: u32,
    ident: Option<u16>,
) -> Result<()> {
    let (tc, csum, id) = match (be16(data, 0), be16(data, 2), be16(data, 4)) {
        (Some(tc), Some(c), Some(id)) => (tc, c, id),
        _ => return Err(XlatError::Truncated),
    };
    let new_tc = (u16::from(new_type) << 8) | (tc & 0x00FF);
    let new_id = ident.unwrap_or(id);
    let c = adjust(
        csum,
        remove + u32::from(tc) + u32::from(id),
        add + u32::from(new_tc) + u32::from(new_id),
    );
    put16(data, 0, new_tc);
    put16(data, 2, c);
    put16(data, 4, new_id);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// IPv6 extension headers.

/// Walks hop-by-hop, destination-options and (exhausted) routing headers at the start of
/// `data`: the upper-layer protocol and its offset.
fn skip_extensions(mut nh: u8, data: &[u8]) -> Result<(u8, usize)> {
    let mut off = 0usize;
    for _ in 0..MAX_EXT_HEADERS {
        match nh {
            ip_proto::HOPOPT | ip_proto::IPV6_OPTS | ip_proto::IPV6_ROUTE => {
                let h = data.get(off..off + 4).ok_or(XlatError::Truncated)?;
                let (next, len_units, segments_left) = match *h {
                    [a, b, _, d] => (a, b, d),
                    _ => return Err(XlatError::Truncated),
                };
                if nh == ip_proto::IPV6_ROUTE && segments_left != 0 {
                    return Err(refuse(Untranslatable::RoutingHeader));
                }
                let len = (usize::from(len_units) + 1) * 8;
                if off + len > data.len() {
                    return Err(XlatError::Truncated);
                }
                nh = next;
                off += len;
            }
            ip_proto::IPV6_FRAG => return Err(refuse(Untranslatable::Fragment)),
            _ => return Ok((nh, off)),
        }
    }
    Err(refuse(Untranslatable::TooManyExtensionHeaders))
}

// ---------------------------------------------------------------------------------------------
// IPv4 → IPv6.

/// Translates an IPv4 packet into IPv6 with the given addresses (RFC 7915 §4). `l4` rewrites
/// the TCP/UDP ports or the echo identifier (`None` keeps them). For an ICMP error the
/// embedded packet gets the swapped outer addresses (see the [module docs](self); use
/// [`ipv4_to_ipv6_with_inner`] to choose them).
pub fn ipv4_to_ipv6(
    input: &[u8],
    out: &mut [u8],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    l4: Option<L4Rewrite>,
) -> Result<usize> {
    ipv4_to_ipv6_with_inner(input, out, src, dst, l4, None)
}

/// [`ipv4_to_ipv6`] with explicit addresses and ports for the packet embedded in an ICMP
/// error (ignored for other packets).
pub fn ipv4_to_ipv6_with_inner(
    input: &[u8],
    out: &mut [u8],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    l4: Option<L4Rewrite>,
    inner: Option<InnerRewrite<Ipv6Addr>>,
) -> Result<usize> {
    let ip = Ipv4Packet::new_checked(input)?;
    if !ip.verify_checksum() {
        return Err(refuse(Untranslatable::BadChecksum));
    }
    if ip.header_len() != V4_HDR {
        return Err(refuse(Untranslatable::Ipv4Options));
    }
    if ip.is_fragment() {
        return Err(refuse(Untranslatable::Fragment));
    }
    let payload = ip.payload();
    let proto = ip.protocol();
    let hdr = Ipv6Repr {
        src,
        dst,
        next_header: proto,
        hop_limit: ip.ttl(),
        traffic_class: ip.dscp_ecn(),
        flow_label: 0,
        payload_len: payload.len(),
    };
    let old_addrs = sum4(ip.src_addr()) + sum4(ip.dst_addr());
    let new_addrs = sum6(src) + sum6(dst);
    match proto {
        ip_proto::ICMP => icmp4_to_6(payload, out, hdr, l4, inner),
        ip_proto::ICMPV6 => Err(refuse(Untranslatable::Protocol { protocol: proto })),
        _ => {
            let need = V6_HDR + payload.len();
            let o = out_slice(out, need)?;
            let (h, body) = o.split_at_mut(V6_HDR);
            body.copy_from_slice(payload);
            match proto {
                ip_proto::TCP => {
                    TcpPacket::new_checked(&*body)?;
                    fix_transport(body, false, old_addrs, new_addrs, l4)?;
                }
                ip_proto::UDP => {
                    let zero = UdpPacket::new_checked(&*body)?.checksum() == 0;
                    fix_transport(body, true, old_addrs, new_addrs, l4)?;
                    if zero {
                        // No checksum over IPv4; IPv6 requires one (RFC 7915 §4.5).
                        UdpPacket::new_unchecked(&mut *body).fill_checksum(src, dst);
                    }
                }
                _ => {}
            }
            hdr.emit(&mut Ipv6Packet::new_unchecked(h));
            Ok(need)
        }
    }
}

/// RFC 1191 plateaus, for a fragmentation-needed message without an MTU.
const PLATEAUS: [u16; 11] = [
    65535, 32000, 17914, 8166, 4352, 2002, 1492, 1006, 508, 296, 68,
];

/// What an ICMPv4 error becomes: ICMPv6 type, code and bytes 4..8, where the MTU of a packet
/// too big is filled in later from the embedded packet.
enum Mapped {
    Plain(u8, u8, u32),
    TooBig(u16),
}

fn map_icmp4_error(msg_type: u8, code: u8, icmp: &Icmpv4Packet<&[u8]>) -> Result<Mapped> {
    use icmpv4::unreachable as u4;
    use icmpv6::unreachable as u6;
    let no = refuse(Untranslatable::IcmpType { msg_type, code });
    Ok(match msg_type {
        icmpv4::DST_UNREACHABLE => match code {
            u4::NET | u4::HOST | 5..=8 | 11 | 12 => {
                Mapped::Plain(icmpv6::DST_UNREACHABLE, u6::NO_ROUTE, 0)
            }
            // Protocol unreachable → parameter problem pointing at the next header field.
            u4::PROTOCOL => {
                Mapped::Plain(icmpv6::PARAM_PROBLEM, icmpv6::param_problem::NEXT_HEADER, 6)
            }
            u4::PORT => Mapped::Plain(icmpv6::DST_UNREACHABLE, u6::PORT, 0),
            u4::FRAG_NEEDED => Mapped::TooBig(icmp.next_hop_mtu()),
            9 | u4::HOST_PROHIBITED | u4::ADMIN_PROHIBITED | 15 => {
                Mapped::Plain(icmpv6::DST_UNREACHABLE, u6::ADMIN_PROHIBITED, 0)
            }
            _ => return Err(no),
        },
        icmpv4::TIME_EXCEEDED => Mapped::Plain(icmpv6::TIME_EXCEEDED, code, 0),
        icmpv4::PARAM_PROBLEM => match code {
            0 | 2 => {
                let p = icmp.pointer();
                // RFC 7915 Figure 3.
                let q: u32 = match p {
                    0 => 0,
                    1 => 1,
                    2 | 3 => 4,
                    8 => 7,
                    9 => 6,
                    12..=15 => 8,
                    16..=19 => 24,
                    _ => {
                        return Err(refuse(Untranslatable::IcmpPointer {
                            pointer: u32::from(p),
                        }))
                    }
                };
                Mapped::Plain(
                    icmpv6::PARAM_PROBLEM,
                    icmpv6::param_problem::HEADER_FIELD,
                    q,
                )
            }
            _ => return Err(no),
        },
        _ => return Err(no),
    })
}

fn icmp4_to_6(
    payload: &[u8],
    out: &mut [u8],
    mut hdr: Ipv6Repr,
    l4: Option<L4Rewrite>,
    inner: Option<InnerRewrite<Ipv6Addr>>,
) -> Result<usize> {
    let icmp = Icmpv4Packet::new_checked(payload)?;
    let (msg_type, code) = (icmp.msg_type(), icmp.code());
    hdr.next_header = ip_proto::ICMPV6;
    let echo_type = match msg_type {
        icmpv4::ECHO_REQUEST => Some(icmpv6::ECHO_REQUEST),
        icmpv4::ECHO_REPLY => Some(icmpv6::ECHO_REPLY),
        _ => None,
    };
    if let Some(new_type) = echo_type {
        let need = V6_HDR + payload.len();
        let o = out_slice(out, need)?;
        let (h, body) = o.split_at_mut(V6_HDR);
        body.copy_from_slice(payload);
        let ph = pseudo_header_v6(hdr.src, hdr.dst, ip_proto::ICMPV6, payload.len() as u32);
        fix_echo(body, new_type, 0, ph, l4.map(|r| r.src_port))?;
        hdr.emit(&mut Ipv6Packet::new_unchecked(h));
        return Ok(need);
    }

    let mapped = map_icmp4_error(msg_type, code, &icmp)?;
    if !icmp.verify_checksum() {
        return Err(refuse(Untranslatable::BadChecksum));
    }
    // The embedded IPv4 packet: a whole header, then whatever of its payload was quoted.
    let emb = icmp.payload();
    let eh = Ipv4Packet::new_unchecked(emb);
    if emb.len() < V4_HDR {
        return Err(XlatError::Truncated);
    }
    let ihl = eh.header_len();
    if eh.version() != 4 || ihl < V4_HDR || usize::from(eh.total_len()) < ihl {
        return Err(refuse(Untranslatable::InnerPacket));
    }
    if eh.is_fragment() {
        return Err(refuse(Untranslatable::Fragment));
    }
    let rest = emb.get(ihl..).ok_or(XlatError::Truncated)?;
    let rest_claimed = usize::from(eh.total_len()) - ihl;
    let (isrc, idst, il4) = match inner {
        Some(r) => (r.src, r.dst, r.l4),
        None => (
            hdr.dst,
            hdr.src,
            l4.map(|r| L4Rewrite {
                src_port: r.dst_port,
                dst_port: r.src_port,
            }),
        ),
    };
    let iproto = match eh.protocol() {
        ip_proto::ICMP => ip_proto::ICMPV6,
        ip_proto::ICMPV6 => return Err(refuse(Untranslatable::InnerPacket)),
        p => p,
    };
    let rest_of_header = match mapped {
        Mapped::Plain(_, _, r) => r,
        Mapped::TooBig(mtu) => {
            let mtu = if mtu == 0 {
                let tl = eh.total_len();
                PLATEAUS.iter().copied().find(|&p| p < tl).unwrap_or(68)
            } else {
                mtu
            };
            u32::from(mtu) + 20
        }
    };
    let (new_type, new_code) = match mapped {
        Mapped::Plain(t, c, _) => (t, c),
        Mapped::TooBig(_) => (icmpv6::PKT_TOO_BIG, 0),
    };

    let full = V6_HDR + ICMP_HDR + V6_HDR + rest.len();
    let need = full.min(IPV6_MIN_MTU);
    let o = out_slice(out, need)?;
    let (h, msg) = o.split_at_mut(V6_HDR);
    let (ih, body) = msg.split_at_mut(ICMP_HDR);
    let (ip6, data) = ih_split(body)?;
    let keep = data.len();
    data.copy_from_slice(rest.get(..keep).unwrap_or(&[]));
    Ipv6Repr {
        src: isrc,
        dst: idst,
        next_header: iproto,
        hop_limit: eh.ttl(),
        traffic_class: eh.dscp_ecn(),
        flow_label: 0,
        payload_len: rest_claimed,
    }
    .emit(&mut Ipv6Packet::new_unchecked(ip6));
    let old_addrs = sum4(eh.src_addr()) + sum4(eh.dst_addr());
    let new_addrs = sum6(isrc) + sum6(idst);
    match eh.protocol() {
        ip_proto::TCP => fix_transport(data, false, old_addrs, new_addrs, il4)?,
        ip_proto::UDP => fix_transport(data, true, old_addrs, new_addrs, il4)?,
        ip_proto::ICMP => {
            let t = match data.first().copied() {
                Some(icmpv4::ECHO_REQUEST) => icmpv6::ECHO_REQUEST,
                Some(icmpv4::ECHO_REPLY) => icmpv6::ECHO_REPLY,
                Some(_) => return Err(refuse(Untranslatable::InnerPacket)),
                None => return Err(XlatError::Truncated),
            };
            let ph = pseudo_header_v6(isrc, idst, ip_proto::ICMPV6, rest_claimed as u32);
            fix_echo(data, t, 0, ph, il4.map(|r| r.src_port))?;
        }
        _ => {}
    }
    let mut m = Icmpv6Packet::new_unchecked(ih);
    m.set_msg_type(new_type);
    m.set_code(new_code);
    m.set_rest_of_header(rest_of_header);
    hdr.payload_len = need - V6_HDR;
    hdr.emit(&mut Ipv6Packet::new_unchecked(h));
    let msg = o.get_mut(V6_HDR..).unwrap_or(&mut []);
    Icmpv6Packet::new_unchecked(msg).fill_checksum(hdr.src, hdr.dst);
    Ok(need)
}

/// Splits the body of a translated ICMPv6 error into the embedded IPv6 header and the rest.
fn ih_split(body: &mut [u8]) -> Result<(&mut [u8], &mut [u8])> {
    if body.len() < V6_HDR {
        return Err(XlatError::Truncated);
    }
    Ok(body.split_at_mut(V6_HDR))
}

// ---------------------------------------------------------------------------------------------
// IPv6 → IPv4.

/// Translates an IPv6 packet into IPv4 with the given addresses (RFC 7915 §5). `l4` rewrites
/// the TCP/UDP ports or the echo identifier (`None` keeps them). For an ICMP error the
/// embedded packet gets the swapped outer addresses (see the [module docs](self); use
/// [`ipv6_to_ipv4_with_inner`] to choose them).
pub fn ipv6_to_ipv4(
    input: &[u8],
    out: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    l4: Option<L4Rewrite>,
) -> Result<usize> {
    ipv6_to_ipv4_with_inner(input, out, src, dst, l4, None)
}

/// [`ipv6_to_ipv4`] with explicit addresses and ports for the packet embedded in an ICMP
/// error (ignored for other packets).
pub fn ipv6_to_ipv4_with_inner(
    input: &[u8],
    out: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    l4: Option<L4Rewrite>,
    inner: Option<InnerRewrite<Ipv4Addr>>,
) -> Result<usize> {
    let ip = Ipv6Packet::new_checked(input)?;
    let (proto, skip) = skip_extensions(ip.next_header(), ip.payload())?;
    let upper = ip.payload().get(skip..).unwrap_or(&[]);
    let total = V4_HDR + upper.len();
    if total > usize::from(u16::MAX) {
        return Err(refuse(Untranslatable::TooLarge));
    }
    let hdr = Ipv4Repr {
        src,
        dst,
        protocol: proto,
        ttl: ip.hop_limit(),
        dscp_ecn: ip.traffic_class(),
        ident: 0,
        dont_frag: total > DF_THRESHOLD,
        payload_len: upper.len(),
    };
    let (osrc, odst) = (ip.src_addr(), ip.dst_addr());
    let old_addrs = sum6(osrc) + sum6(odst);
    let new_addrs = sum4(src) + sum4(dst);
    match proto {
        ip_proto::ICMPV6 => icmp6_to_4(upper, out, hdr, (osrc, odst), l4, inner),
        ip_proto::ICMP => Err(refuse(Untranslatable::Protocol { protocol: proto })),
        _ => {
            let o = out_slice(out, total)?;
            let (h, body) = o.split_at_mut(V4_HDR);
            body.copy_from_slice(upper);
            match proto {
                ip_proto::TCP => {
                    TcpPacket::new_checked(&*body)?;
                    fix_transport(body, false, old_addrs, new_addrs, l4)?;
                }
                ip_proto::UDP => {
                    UdpPacket::new_checked(&*body)?;
                    fix_transport(body, true, old_addrs, new_addrs, l4)?;
                }
                _ => {}
            }
            hdr.emit(&mut Ipv4Packet::new_unchecked(h));
            Ok(total)
        }
    }
}

fn map_icmp6_error(msg_type: u8, code: u8, icmp: &Icmpv6Packet<&[u8]>) -> Result<(u8, u8, u32)> {
    use icmpv4::unreachable as u4;
    use icmpv6::unreachable as u6;
    let no = refuse(Untranslatable::IcmpType { msg_type, code });
    Ok(match msg_type {
        icmpv6::DST_UNREACHABLE => match code {
            u6::NO_ROUTE | u6::BEYOND_SCOPE | u6::ADDRESS => (icmpv4::DST_UNREACHABLE, u4::HOST, 0),
            u6::ADMIN_PROHIBITED => (icmpv4::DST_UNREACHABLE, u4::HOST_PROHIBITED, 0),
            u6::PORT => (icmpv4::DST_UNREACHABLE, u4::PORT, 0),
            _ => return Err(no),
        },
        icmpv6::PKT_TOO_BIG => {
            let mtu = icmp.mtu().saturating_sub(20).min(u32::from(u16::MAX));
            (icmpv4::DST_UNREACHABLE, u4::FRAG_NEEDED, mtu)
        }
        icmpv6::TIME_EXCEEDED => (icmpv4::TIME_EXCEEDED, code, 0),
        icmpv6::PARAM_PROBLEM => match code {
            icmpv6::param_problem::HEADER_FIELD => {
                let p = icmp.pointer();
                // RFC 7915 Figure 6.
                let q: u32 = match p {
                    0 => 0,
                    1 => 1,
                    4 | 5 => 2,
                    6 => 9,
                    7 => 8,
                    8..=23 => 12,
                    24..=39 => 16,
                    _ => return Err(refuse(Untranslatable::IcmpPointer { pointer: p })),
                };
                (icmpv4::PARAM_PROBLEM, 0, q << 24)
            }
            icmpv6::param_problem::NEXT_HEADER => (icmpv4::DST_UNREACHABLE, u4::PROTOCOL, 0),
            _ => return Err(no),
        },
        _ => return Err(no),
    })
}

fn icmp6_to_4(
    upper: &[u8],
    out: &mut [u8],
    mut hdr: Ipv4Repr,
    (osrc, odst): (Ipv6Addr, Ipv6Addr),
    l4: Option<L4Rewrite>,
    inner: Option<InnerRewrite<Ipv4Addr>>,
) -> Result<usize> {
    let icmp = Icmpv6Packet::new_checked(upper)?;
    let (msg_type, code) = (icmp.msg_type(), icmp.code());
    hdr.protocol = ip_proto::ICMP;
    let echo_type = match msg_type {
        icmpv6::ECHO_REQUEST => Some(icmpv4::ECHO_REQUEST),
        icmpv6::ECHO_REPLY => Some(icmpv4::ECHO_REPLY),
        _ => None,
    };
    if let Some(new_type) = echo_type {
        let need = V4_HDR + upper.len();
        let o = out_slice(out, need)?;
        let (h, body) = o.split_at_mut(V4_HDR);
        body.copy_from_slice(upper);
        let ph = pseudo_header_v6(osrc, odst, ip_proto::ICMPV6, upper.len() as u32);
        fix_echo(body, new_type, ph, 0, l4.map(|r| r.src_port))?;
        hdr.emit(&mut Ipv4Packet::new_unchecked(h));
        return Ok(need);
    }

    let (new_type, new_code, rest_of_header) = map_icmp6_error(msg_type, code, &icmp)?;
    if !icmp.verify_checksum(osrc, odst) {
        return Err(refuse(Untranslatable::BadChecksum));
    }
    // The embedded IPv6 packet: the fixed header, extension headers, quoted payload.
    let emb = icmp.payload();
    let eh = Ipv6Packet::new_unchecked(emb);
    if emb.len() < V6_HDR {
        return Err(XlatError::Truncated);
    }
    if eh.version() != 6 {
        return Err(refuse(Untranslatable::InnerPacket));
    }
    let after = emb.get(V6_HDR..).unwrap_or(&[]);
    let (inproto, skip) = skip_extensions(eh.next_header(), after)?;
    let rest = after.get(skip..).unwrap_or(&[]);
    let rest_claimed = usize::from(eh.payload_len())
        .checked_sub(skip)
        .ok_or(refuse(Untranslatable::InnerPacket))?;
    let (isrc, idst, il4) = match inner {
        Some(r) => (r.src, r.dst, r.l4),
        None => (
            hdr.dst,
            hdr.src,
            l4.map(|r| L4Rewrite {
                src_port: r.dst_port,
                dst_port: r.src_port,
            }),
        ),
    };
    let iproto = match inproto {
        ip_proto::ICMPV6 => ip_proto::ICMP,
        ip_proto::ICMP => return Err(refuse(Untranslatable::InnerPacket)),
        p => p,
    };
    let inner_total = (V4_HDR + rest_claimed).min(usize::from(u16::MAX));

    let need = V4_HDR + ICMP_HDR + V4_HDR + rest.len();
    if need > usize::from(u16::MAX) {
        return Err(refuse(Untranslatable::TooLarge));
    }
    let o = out_slice(out, need)?;
    let (h, msg) = o.split_at_mut(V4_HDR);
    let (ih, body) = msg.split_at_mut(ICMP_HDR);
    let (ip4, data) = body.split_at_mut(V4_HDR);
    data.copy_from_slice(rest);
    Ipv4Repr {
        src: isrc,
        dst: idst,
        protocol: iproto,
        ttl: eh.hop_limit(),
        dscp_ecn: eh.traffic_class(),
        ident: 0,
        dont_frag: inner_total > DF_THRESHOLD,
        payload_len: inner_total - V4_HDR,
    }
    .emit(&mut Ipv4Packet::new_unchecked(ip4));
    let old_addrs = sum6(eh.src_addr()) + sum6(eh.dst_addr());
    let new_addrs = sum4(isrc) + sum4(idst);
    match inproto {
        ip_proto::TCP => fix_transport(data, false, old_addrs, new_addrs, il4)?,
        ip_proto::UDP => fix_transport(data, true, old_addrs, new_addrs, il4)?,
        ip_proto::ICMPV6 => {
            let t = match data.first().copied() {
                Some(icmpv6::ECHO_REQUEST) => icmpv4::ECHO_REQUEST,
                Some(icmpv6::ECHO_REPLY) => icmpv4::ECHO_REPLY,
                Some(_) => return Err(refuse(Untranslatable::InnerPacket)),
                None => return Err(XlatError::Truncated),
            };
            let ph = pseudo_header_v6(
                eh.src_addr(),
                eh.dst_addr(),
                ip_proto::ICMPV6,
                rest_claimed as u32,
            );
            fix_echo(data, t, ph, 0, il4.map(|r| r.src_port))?;
        }
        _ => {}
    }
    let mut m = Icmpv4Packet::new_unchecked(ih);
    m.set_msg_type(new_type);
    m.set_code(new_code);
    m.set_rest_of_header(rest_of_header);
    hdr.payload_len = need - V4_HDR;
    hdr.dont_frag = need > DF_THRESHOLD;
    hdr.emit(&mut Ipv4Packet::new_unchecked(h));
    let msg = o.get_mut(V4_HDR..).unwrap_or(&mut []);
    Icmpv4Packet::new_unchecked(msg).fill_checksum();
    Ok(need)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn adjust_is_update16_for_one_word() {
        for (c, o, n) in [(0xDD2F, 0x5555, 0x3285), (0x1234, 0xffff, 0), (0, 1, 2)] {
            assert_eq!(
                adjust(c, o, u32::from(n)),
                crate::packet::checksum::update16(c, o as u16, n)
            );
        }
    }

    #[test]
    fn extension_walk() {
        // Hop-by-hop (8 bytes) then UDP.
        let d = [17u8, 0, 0, 0, 0, 0, 0, 0, 1, 2];
        assert_eq!(skip_extensions(0, &d).unwrap(), (17, 8));
        // Routing header with one segment left.
        let r = [17u8, 0, 0, 1, 0, 0, 0, 0];
        assert_eq!(
            skip_extensions(43, &r).unwrap_err(),
            refuse(Untranslatable::RoutingHeader)
        );
        assert_eq!(
            skip_extensions(60, &d[..6]).unwrap_err(),
            XlatError::Truncated
        );
        assert_eq!(
            skip_extensions(44, &d).unwrap_err(),
            refuse(Untranslatable::Fragment)
        );
        let loopy = [0u8; 80];
        assert_eq!(
            skip_extensions(0, &loopy).unwrap_err(),
            refuse(Untranslatable::TooManyExtensionHeaders)
        );
    }

    #[test]
    fn plateau() {
        assert_eq!(PLATEAUS.iter().copied().find(|&p| p < 1500), Some(1492));
        assert_eq!(PLATEAUS.iter().copied().find(|&p| p < 60), None);
    }
}
