//! The reference evaluator: what the model says happens to a packet.
//!
//! It follows the forwarding semantics written in the module documentation of
//! `flow_offload::soft::pipeline`, applied to the [`Model`] directly and as plainly as possible:
//! a linear scan of `model.routes()` for the longest match, and every output frame built from
//! scratch with the packet reprs (every checksum computed in full, never updated). It shares no
//! code with `lpm`, `soft::pipeline` (except [`flow_hash`], which *defines* the ECMP choice),
//! `compile` or `refnic`.
//!
//! Meters: one `soft::meter::Meter` per meter object of the model, fed the packet's length and
//! `now_ns` at the point the semantics say it polices.
//!
//! Stateful NAT (NAPT44, NAT64) chooses the outside port at random, so the evaluation of an
//! outbound packet takes the choice as an input ([`Pick`]) and reports what it needed
//! ([`Snat`]); the harness reads the choice off the actual output, checks it against the pool
//! and the port range, and evaluates again with it. Inbound packets to a pool are translated
//! through the [`NatBook`] of sessions the harness has seen created.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::collections::BTreeMap;

use flow_offload::ir::vxlan_source_port;
use flow_offload::model::{
    Ipv4Range, MacAddr, MeterTarget, Model, Name, NatKind, NatRule, Nexthop, PortId, Prefix, Route,
    TableId, Vni, UNDERLAY_TABLE,
};
use flow_offload::packet::{
    ethertype, ip_proto, parse_layout, EthernetFrame, EthernetRepr, Icmpv4Packet, Icmpv4Repr,
    Icmpv6Packet, Icmpv6Repr, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpPacket, TcpRepr,
    UdpPacket, UdpRepr, VlanRepr, VlanTag, VxlanPacket, VxlanRepr, VXLAN_PORT,
};
use flow_offload::soft::meter::{Color, Meter};
use flow_offload::soft::pipeline::flow_hash;

// ---------------------------------------------------------------------------------------------
// Decoded frames
// ---------------------------------------------------------------------------------------------

/// A decoded Ethernet frame: everything the reference reasons about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Destination MAC.
    pub dst: MacAddr,
    /// Source MAC.
    pub src: MacAddr,
    /// The VLAN id of an 802.1Q tag (PCP and DEI zero), if tagged.
    pub vlan: Option<u16>,
    /// What follows.
    pub net: Net,
}

/// The network layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Net {
    /// Not IP (ARP, ...): the bytes after the EtherType.
    Other {
        /// The EtherType.
        ethertype: u16,
        /// The rest of the frame.
        payload: Vec<u8>,
    },
    /// IPv4 (20-byte header, not a fragment).
    V4 {
        /// The header.
        ip: V4,
        /// The transport.
        l4: L4,
    },
    /// IPv6 (no extension headers).
    V6 {
        /// The header.
        ip: V6,
        /// The transport.
        l4: L4,
    },
}

/// IPv4 header fields (besides lengths, protocol and checksum, which are derived).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V4 {
    /// Source.
    pub src: Ipv4Addr,
    /// Destination.
    pub dst: Ipv4Addr,
    /// Time to live.
    pub ttl: u8,
    /// DSCP/ECN.
    pub tos: u8,
    /// Identification.
    pub ident: u16,
    /// Don't fragment.
    pub df: bool,
}

/// IPv6 header fields (besides the payload length and next header, which are derived).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V6 {
    /// Source.
    pub src: Ipv6Addr,
    /// Destination.
    pub dst: Ipv6Addr,
    /// Hop limit.
    pub hop_limit: u8,
    /// Traffic class.
    pub tclass: u8,
    /// Flow label.
    pub flow: u32,
}

/// The transport layer (checksums are derived, except that a UDP datagram over IPv4 may carry
/// none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L4 {
    /// UDP.
    Udp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// Whether a checksum is carried (always over IPv6).
        csum: bool,
        /// Payload.
        payload: Vec<u8>,
    },
    /// TCP without options.
    Tcp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// Sequence number.
        seq: u32,
        /// Acknowledgment number.
        ack: u32,
        /// Flags.
        flags: u8,
        /// Window.
        window: u16,
        /// Payload.
        payload: Vec<u8>,
    },
    /// ICMP / ICMPv6 echo request or reply.
    Echo {
        /// A reply rather than a request.
        reply: bool,
        /// Identifier.
        ident: u16,
        /// Sequence number.
        seq: u16,
        /// Data.
        payload: Vec<u8>,
    },
}

/// The NAT protocol classes (the NAT keys ICMP echo by its identifier).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP echo.
    Icmp,
}

impl L4 {
    /// The NAT protocol class.
    pub fn proto(&self) -> Proto {
        match self {
            L4::Udp { .. } => Proto::Udp,
            L4::Tcp { .. } => Proto::Tcp,
            L4::Echo { .. } => Proto::Icmp,
        }
    }

    /// Source port, or the echo identifier.
    pub fn sport(&self) -> u16 {
        match self {
            L4::Udp { sport, .. } | L4::Tcp { sport, .. } => *sport,
            L4::Echo { ident, .. } => *ident,
        }
    }

    /// Destination port, or the echo identifier.
    pub fn dport(&self) -> u16 {
        match self {
            L4::Udp { dport, .. } | L4::Tcp { dport, .. } => *dport,
            L4::Echo { ident, .. } => *ident,
        }
    }

    /// The remote port as the NAT keys it: 0 for ICMP.
    pub fn nat_remote_port(&self, remote_port: u16) -> u16 {
        match self {
            L4::Echo { .. } => 0,
            _ => remote_port,
        }
    }

    /// Sets the source port (or the echo identifier).
    pub fn set_sport(&mut self, p: u16) {
        match self {
            L4::Udp { sport, .. } | L4::Tcp { sport, .. } => *sport = p,
            L4::Echo { ident, .. } => *ident = p,
        }
    }

    /// Sets the destination port (or the echo identifier).
    pub fn set_dport(&mut self, p: u16) {
        match self {
            L4::Udp { dport, .. } | L4::Tcp { dport, .. } => *dport = p,
            L4::Echo { ident, .. } => *ident = p,
        }
    }
}

fn mac(m: [u8; 6]) -> MacAddr {
    MacAddr(m)
}

/// Builds the transport bytes with a zero checksum; returns the protocol number.
fn l4_bytes(l4: &L4, v6: bool) -> (u8, Vec<u8>) {
    match l4 {
        L4::Udp {
            sport,
            dport,
            payload,
            ..
        } => {
            let mut b = vec![0u8; UdpRepr::HEADER_LEN + payload.len()];
            UdpRepr {
                src_port: *sport,
                dst_port: *dport,
            }
            .emit(&mut UdpPacket::new_unchecked(&mut b[..]));
            b[UdpRepr::HEADER_LEN..].copy_from_slice(payload);
            (ip_proto::UDP, b)
        }
        L4::Tcp {
            sport,
            dport,
            seq,
            ack,
            flags,
            window,
            payload,
        } => {
            let mut b = vec![0u8; TcpRepr::HEADER_LEN + payload.len()];
            TcpRepr {
                src_port: *sport,
                dst_port: *dport,
                seq: *seq,
                ack: *ack,
                flags: *flags,
                window: *window,
            }
            .emit(&mut TcpPacket::new_unchecked(&mut b[..]));
            b[TcpRepr::HEADER_LEN..].copy_from_slice(payload);
            (ip_proto::TCP, b)
        }
        L4::Echo {
            reply,
            ident,
            seq,
            payload,
        } => {
            let mut b = vec![0u8; Icmpv4Repr::HEADER_LEN + payload.len()];
            let (ident, seq_no) = (*ident, *seq);
            let proto = if v6 {
                let r = if *reply {
                    Icmpv6Repr::EchoReply { ident, seq_no }
                } else {
                    Icmpv6Repr::EchoRequest { ident, seq_no }
                };
                r.emit(&mut Icmpv6Packet::new_unchecked(&mut b[..]));
                ip_proto::ICMPV6
            } else {
                let r = if *reply {
                    Icmpv4Repr::EchoReply { ident, seq_no }
                } else {
                    Icmpv4Repr::EchoRequest { ident, seq_no }
                };
                r.emit(&mut Icmpv4Packet::new_unchecked(&mut b[..]));
                ip_proto::ICMP
            };
            b[Icmpv4Repr::HEADER_LEN..].copy_from_slice(payload);
            (proto, b)
        }
    }
}

/// The IPv4 packet (header and transport) with every checksum computed in full.
pub fn emit_v4(ip: &V4, l4: &L4) -> Vec<u8> {
    let (protocol, mut t) = l4_bytes(l4, false);
    match l4 {
        L4::Udp { csum: true, .. } => {
            UdpPacket::new_unchecked(&mut t[..]).fill_checksum(ip.src, ip.dst)
        }
        L4::Udp { csum: false, .. } => {}
        L4::Tcp { .. } => TcpPacket::new_unchecked(&mut t[..]).fill_checksum(ip.src, ip.dst),
        L4::Echo { .. } => Icmpv4Packet::new_unchecked(&mut t[..]).fill_checksum(),
    }
    let mut out = vec![0u8; Ipv4Repr::HEADER_LEN + t.len()];
    Ipv4Repr {
        src: ip.src,
        dst: ip.dst,
        protocol,
        ttl: ip.ttl,
        dscp_ecn: ip.tos,
        ident: ip.ident,
        dont_frag: ip.df,
        payload_len: t.len(),
    }
    .emit(&mut Ipv4Packet::new_unchecked(
        &mut out[..Ipv4Repr::HEADER_LEN],
    ));
    out[Ipv4Repr::HEADER_LEN..].copy_from_slice(&t);
    out
}

/// The IPv6 packet (header and transport) with every checksum computed in full.
pub fn emit_v6(ip: &V6, l4: &L4) -> Vec<u8> {
    let (next_header, mut t) = l4_bytes(l4, true);
    match l4 {
        L4::Udp { csum: true, .. } => {
            UdpPacket::new_unchecked(&mut t[..]).fill_checksum(ip.src, ip.dst)
        }
        L4::Udp { csum: false, .. } => {}
        L4::Tcp { .. } => TcpPacket::new_unchecked(&mut t[..]).fill_checksum(ip.src, ip.dst),
        L4::Echo { .. } => Icmpv6Packet::new_unchecked(&mut t[..]).fill_checksum(ip.src, ip.dst),
    }
    let mut out = vec![0u8; Ipv6Repr::HEADER_LEN + t.len()];
    Ipv6Repr {
        src: ip.src,
        dst: ip.dst,
        next_header,
        hop_limit: ip.hop_limit,
        traffic_class: ip.tclass,
        flow_label: ip.flow,
        payload_len: t.len(),
    }
    .emit(&mut Ipv6Packet::new_unchecked(
        &mut out[..Ipv6Repr::HEADER_LEN],
    ));
    out[Ipv6Repr::HEADER_LEN..].copy_from_slice(&t);
    out
}

/// The frame's bytes.
pub fn emit(f: &Frame) -> Vec<u8> {
    let (l3_type, l3) = match &f.net {
        Net::Other { ethertype, payload } => (*ethertype, payload.clone()),
        Net::V4 { ip, l4 } => (ethertype::IPV4, emit_v4(ip, l4)),
        Net::V6 { ip, l4 } => (ethertype::IPV6, emit_v6(ip, l4)),
    };
    let tag_len = if f.vlan.is_some() {
        VlanRepr::HEADER_LEN
    } else {
        0
    };
    let mut out = vec![0u8; EthernetRepr::HEADER_LEN + tag_len + l3.len()];
    EthernetRepr {
        src: f.src.0,
        dst: f.dst.0,
        ethertype: if f.vlan.is_some() {
            ethertype::VLAN
        } else {
            l3_type
        },
    }
    .emit(&mut EthernetFrame::new_unchecked(
        &mut out[..EthernetRepr::HEADER_LEN],
    ));
    if let Some(vid) = f.vlan {
        VlanRepr {
            pcp: 0,
            dei: false,
            vid,
            ethertype: l3_type,
        }
        .emit(&mut VlanTag::new_unchecked(
            &mut out[EthernetRepr::HEADER_LEN..EthernetRepr::HEADER_LEN + tag_len],
        ));
    }
    out[EthernetRepr::HEADER_LEN + tag_len..].copy_from_slice(&l3);
    out
}

fn parse_l4(proto: u8, b: &[u8], v6: bool) -> Option<L4> {
    match proto {
        ip_proto::UDP => {
            let u = UdpPacket::new_checked(b).ok()?;
            let r = UdpRepr::parse(&u).ok()?;
            Some(L4::Udp {
                sport: r.src_port,
                dport: r.dst_port,
                csum: u.checksum() != 0,
                payload: u.payload().to_vec(),
            })
        }
        ip_proto::TCP => {
            let t = TcpPacket::new_checked(b).ok()?;
            if t.header_len() != TcpRepr::HEADER_LEN {
                return None;
            }
            let r = TcpRepr::parse(&t).ok()?;
            Some(L4::Tcp {
                sport: r.src_port,
                dport: r.dst_port,
                seq: r.seq,
                ack: r.ack,
                flags: r.flags,
                window: r.window,
                payload: t.payload().to_vec(),
            })
        }
        ip_proto::ICMP if !v6 => {
            let p = Icmpv4Packet::new_checked(b).ok()?;
            let (reply, ident, seq) = match Icmpv4Repr::parse(&p).ok()? {
                Icmpv4Repr::EchoRequest { ident, seq_no } => (false, ident, seq_no),
                Icmpv4Repr::EchoReply { ident, seq_no } => (true, ident, seq_no),
            };
            Some(L4::Echo {
                reply,
                ident,
                seq,
                payload: p.payload().to_vec(),
            })
        }
        ip_proto::ICMPV6 if v6 => {
            let p = Icmpv6Packet::new_checked(b).ok()?;
            let (reply, ident, seq) = match Icmpv6Repr::parse(&p).ok()? {
                Icmpv6Repr::EchoRequest { ident, seq_no } => (false, ident, seq_no),
                Icmpv6Repr::EchoReply { ident, seq_no } => (true, ident, seq_no),
            };
            Some(L4::Echo {
                reply,
                ident,
                seq,
                payload: p.payload().to_vec(),
            })
        }
        _ => None,
    }
}

/// Decodes a frame of the shapes [`Frame`] describes; `None` for anything else.
pub fn parse(bytes: &[u8]) -> Option<Frame> {
    let eth = EthernetFrame::new_checked(bytes).ok()?;
    let e = EthernetRepr::parse(&eth).ok()?;
    let (vlan, l3_type, rest) = if e.ethertype == ethertype::VLAN {
        let inner = eth.payload();
        let tag = VlanTag::new_checked(inner).ok()?;
        let r = VlanRepr::parse(&tag).ok()?;
        (
            Some(r.vid),
            r.ethertype,
            inner.get(VlanRepr::HEADER_LEN..).unwrap_or(&[]),
        )
    } else {
        (None, e.ethertype, eth.payload())
    };
    let net = match l3_type {
        ethertype::IPV4 => {
            let p = Ipv4Packet::new_checked(rest).ok()?;
            if p.header_len() != Ipv4Repr::HEADER_LEN || p.more_frags() || p.frag_offset() != 0 {
                return None;
            }
            let r = Ipv4Repr::parse(&p).ok()?;
            let l4 = parse_l4(r.protocol, p.payload(), false)?;
            Net::V4 {
                ip: V4 {
                    src: r.src,
                    dst: r.dst,
                    ttl: r.ttl,
                    tos: r.dscp_ecn,
                    ident: r.ident,
                    df: r.dont_frag,
                },
                l4,
            }
        }
        ethertype::IPV6 => {
            let p = Ipv6Packet::new_checked(rest).ok()?;
            let r = Ipv6Repr::parse(&p).ok()?;
            let l4 = parse_l4(r.next_header, p.payload(), true)?;
            Net::V6 {
                ip: V6 {
                    src: r.src,
                    dst: r.dst,
                    hop_limit: r.hop_limit,
                    tclass: r.traffic_class,
                    flow: r.flow_label,
                },
                l4,
            }
        }
        other => Net::Other {
            ethertype: other,
            payload: rest.to_vec(),
        },
    };
    Some(Frame {
        dst: mac(e.dst),
        src: mac(e.src),
        vlan,
        net,
    })
}

/// The VXLAN header followed by the inner frame: the payload of the outer UDP datagram.
pub fn vxlan_payload(vni: u32, flags_ok: bool, inner: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; VxlanRepr::HEADER_LEN + inner.len()];
    VxlanRepr { vni }.emit(&mut VxlanPacket::new_unchecked(&mut b[..]));
    if !flags_ok {
        VxlanPacket::new_unchecked(&mut b[..]).set_flags(0);
    }
    b[VxlanRepr::HEADER_LEN..].copy_from_slice(inner);
    b
}

// ---------------------------------------------------------------------------------------------
// RFC 6052, written out
// ---------------------------------------------------------------------------------------------

/// Where the four IPv4 octets sit in an RFC 6052 address: from byte `len / 8` on, skipping the
/// "u" octet (byte 8).
fn rfc6052_positions(len: u8) -> [usize; 4] {
    let mut out = [0; 4];
    let mut at = usize::from(len / 8);
    for slot in &mut out {
        if at == 8 {
            at += 1;
        }
        *slot = at;
        at += 1;
    }
    out
}

/// The IPv6 address for `v4` under a NAT64 prefix.
pub fn nat64_embed(prefix: &Prefix, v4: Ipv4Addr) -> Option<Ipv6Addr> {
    let IpAddr::V6(p) = prefix.addr() else {
        return None;
    };
    let mut o = p.octets();
    for (at, b) in rfc6052_positions(prefix.len()).into_iter().zip(v4.octets()) {
        *o.get_mut(at)? = b;
    }
    Some(Ipv6Addr::from(o))
}

/// The IPv4 address embedded in `v6` under a NAT64 prefix of length `len`.
pub fn nat64_extract(len: u8, v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = v6.octets();
    if o[8] != 0 {
        return None;
    }
    let [a, b, c, d] = rfc6052_positions(len);
    Some(Ipv4Addr::new(
        *o.get(a)?,
        *o.get(b)?,
        *o.get(c)?,
        *o.get(d)?,
    ))
}

// ---------------------------------------------------------------------------------------------
// The evaluator
// ---------------------------------------------------------------------------------------------

/// What the model says happens to a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Sent on `port` as exactly `frame`.
    Tx {
        /// Egress port.
        port: PortId,
        /// The whole frame.
        frame: Vec<u8>,
    },
    /// Handed to the host.
    ToHost,
    /// Dropped. `policed`: `Some(true)` when a meter coloured it red, `Some(false)` for any
    /// other reason, `None` when either is acceptable (a blackhole route with a meter: the
    /// packet is dropped whatever the meter says).
    Drop {
        /// Whether by a meter.
        policed: Option<bool>,
    },
}

const DROP: Expect = Expect::Drop {
    policed: Some(false),
};
const POLICED: Expect = Expect::Drop {
    policed: Some(true),
};

/// The outside endpoint a stateful NAT chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Any valid choice: the first pool address and the first port (for dry runs).
    Placeholder,
    /// The choice read off the actual output. `ident` and `df` are the IPv4 header fields an
    /// RFC 7915 translator chooses (NAT64 only; ignored for NAPT44).
    Given {
        /// Outside address.
        addr: Ipv4Addr,
        /// Outside port (ICMP: identifier).
        port: u16,
        /// IPv4 identification written by the translator.
        ident: u16,
        /// DF written by the translator.
        df: bool,
    },
}

/// What a stateful source NAT on the packet's path needs and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snat {
    /// The NAT rule.
    pub rule: Name,
    /// NAT64 rather than NAPT44.
    pub nat64: bool,
    /// Its pool.
    pub pool: Ipv4Range,
    /// Its port range.
    pub ports: (u16, u16),
    /// Protocol class.
    pub proto: Proto,
    /// The inside endpoint (port: ICMP identifier).
    pub inside: (IpAddr, u16),
    /// The remote endpoint as the NAT keys it (port 0 for ICMP).
    pub remote: (Ipv4Addr, u16),
}

/// The result of one evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eval {
    /// The verdict.
    pub expect: Expect,
    /// The stateful source NAT the packet went through, if any.
    pub snat: Option<Snat>,
    /// Whether the result is VXLAN-encapsulated (the NATed header is then the inner one).
    pub encapsulated: bool,
}

/// An IPv4 address and port.
pub type Endpoint4 = (Ipv4Addr, u16);
/// An inside address (IPv4 for NAPT44, IPv6 for NAT64) and port.
pub type Inside = (IpAddr, u16);

/// Sessions the harness has seen a stateful NAT create.
#[derive(Debug, Clone, Default)]
pub struct NatBook {
    /// (protocol, outside endpoint, remote endpoint) → inside endpoint.
    pub sessions: BTreeMap<(Proto, Endpoint4, Endpoint4), Inside>,
    /// (rule, protocol, inside endpoint) → outside endpoint (endpoint-independent mapping).
    pub mappings: BTreeMap<(Name, Proto, Inside), Endpoint4>,
    /// (rule, inside address) → outside address (paired pooling).
    pub paired: BTreeMap<(Name, IpAddr), Ipv4Addr>,
}

/// The reference evaluator for one model.
#[derive(Debug, Clone)]
pub struct Reference {
    model: Model,
    meters: BTreeMap<Name, Meter>,
    /// Whether RFC 7915 translation is available; when it is not, the pipeline must drop what
    /// needs it (`DropReason::Untranslatable`) and so does the reference.
    pub xlat: bool,
    /// The NAT sessions known so far.
    pub book: NatBook,
}

#[derive(Debug, Default)]
struct Ctx {
    snat: Option<Snat>,
    encapsulated: bool,
}

enum Hit<'a> {
    Route(&'a Route),
    Nat64(&'a NatRule),
}

fn ip_dst(f: &Frame) -> Option<IpAddr> {
    match &f.net {
        Net::V4 { ip, .. } => Some(IpAddr::V4(ip.dst)),
        Net::V6 { ip, .. } => Some(IpAddr::V6(ip.dst)),
        Net::Other { .. } => None,
    }
}

impl Reference {
    /// A reference for `model`, every meter with full buckets at time 0.
    pub fn new(model: &Model, xlat: bool) -> Reference {
        Reference {
            model: model.clone(),
            meters: model
                .meters()
                .values()
                .map(|m| (m.name.clone(), Meter::new(m.profile, 0)))
                .collect(),
            xlat,
            book: NatBook::default(),
        }
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Replaces the model after a route change, keeping the meters' state and the NAT book
    /// (route changes touch neither).
    pub fn set_routes_from(&mut self, model: &Model) {
        self.model = model.clone();
    }

    /// Evaluates a packet, advancing the meters.
    pub fn eval(&mut self, port: PortId, bytes: &[u8], now: u64, pick: Pick) -> Eval {
        let mut meters = std::mem::take(&mut self.meters);
        let e = self.run(&mut meters, port, bytes, now, pick);
        self.meters = meters;
        e
    }

    /// Evaluates a packet without changing any state.
    pub fn dry_run(&self, port: PortId, bytes: &[u8], now: u64, pick: Pick) -> Eval {
        let mut meters = self.meters.clone();
        self.run(&mut meters, port, bytes, now, pick)
    }

    fn run(
        &self,
        meters: &mut BTreeMap<Name, Meter>,
        port: PortId,
        bytes: &[u8],
        now: u64,
        pick: Pick,
    ) -> Eval {
        let mut ctx = Ctx::default();
        let expect = self.ingress(meters, port, bytes, now, pick, &mut ctx);
        Eval {
            expect,
            snat: ctx.snat,
            encapsulated: ctx.encapsulated,
        }
    }

    /// Step 1: ingress by port.
    fn ingress(
        &self,
        meters: &mut BTreeMap<Name, Meter>,
        port: PortId,
        bytes: &[u8],
        now: u64,
        pick: Pick,
        ctx: &mut Ctx,
    ) -> Expect {
        let uplink = self.model.node().is_some_and(|n| n.uplinks.contains(&port));
        let vpc = self.model.vpc_by_port(port);
        if !uplink && vpc.is_none() {
            return DROP;
        }
        let Some(frame) = parse(bytes) else {
            return DROP;
        };
        // Non-IP and VLAN-tagged frames go to the host (on VPC ports and uplinks alike).
        if frame.vlan.is_some() || matches!(frame.net, Net::Other { .. }) {
            return Expect::ToHost;
        }
        let (frame, table) = match vpc {
            Some(vpc) => {
                if let Some(m) = self.model.meter_for(&MeterTarget::Vpc(vpc.name.clone())) {
                    if red(meters, &m.name, bytes.len(), now) {
                        return POLICED;
                    }
                }
                (frame, vpc.table)
            }
            None => match self.uplink(frame) {
                Ok(x) => x,
                Err(e) => return e,
            },
        };
        self.route(meters, frame, table, false, now, pick, ctx)
    }

    /// Uplink classification: VXLAN to our VTEP, reverse NAT, or the underlay.
    fn uplink(&self, mut frame: Frame) -> Result<(Frame, TableId), Expect> {
        let Some(node) = self.model.node() else {
            return Err(DROP);
        };
        let vpc_table = |name: &Name| self.model.vpcs().get(name).map(|v| v.table);
        match &mut frame.net {
            Net::V4 { ip, l4 } => {
                if ip.dst == node.vtep {
                    if let L4::Udp {
                        dport: VXLAN_PORT,
                        payload,
                        ..
                    } = l4
                    {
                        return self.decap(payload);
                    }
                }
                for nat in self.model.nat_rules().values() {
                    if let NatKind::Static44 { inside, outside } = nat.kind {
                        if outside == ip.dst {
                            ip.dst = inside;
                            let table = vpc_table(&nat.vpc).ok_or(DROP)?;
                            return Ok((frame, table));
                        }
                    }
                }
                for nat in self.model.nat_rules().values() {
                    let (pool, nat64) = match &nat.kind {
                        NatKind::Napt44 { pool, .. } => (*pool, None),
                        NatKind::Nat64 { pool, prefix, .. } => (*pool, Some(*prefix)),
                        _ => continue,
                    };
                    if !pool.contains(ip.dst) {
                        continue;
                    }
                    let key = (
                        l4.proto(),
                        (ip.dst, l4.dport()),
                        (ip.src, l4.nat_remote_port(l4.sport())),
                    );
                    let Some(&(inside, inside_port)) = self.book.sessions.get(&key) else {
                        return Err(DROP);
                    };
                    let table = vpc_table(&nat.vpc).ok_or(DROP)?;
                    match (nat64, inside) {
                        (None, IpAddr::V4(a)) => {
                            ip.dst = a;
                            l4.set_dport(inside_port);
                            return Ok((frame, table));
                        }
                        (Some(prefix), IpAddr::V6(a)) => {
                            if !self.xlat {
                                return Err(DROP);
                            }
                            let f = four_to_six(&frame, &prefix, a, inside_port).ok_or(DROP)?;
                            return Ok((f, table));
                        }
                        _ => return Err(DROP),
                    }
                }
                Ok((frame, UNDERLAY_TABLE))
            }
            Net::V6 { ip, .. } => {
                for nat in self.model.nat_rules().values() {
                    if let NatKind::Static66 { inside, outside } = nat.kind {
                        if outside == ip.dst {
                            ip.dst = inside;
                            let table = vpc_table(&nat.vpc).ok_or(DROP)?;
                            return Ok((frame, table));
                        }
                    }
                }
                Ok((frame, UNDERLAY_TABLE))
            }
            Net::Other { .. } => Err(Expect::ToHost),
        }
    }

    /// VXLAN to our VTEP: the VNI picks the VPC, the inner frame is what routes.
    fn decap(&self, payload: &[u8]) -> Result<(Frame, TableId), Expect> {
        let vx = VxlanPacket::new_checked(payload).map_err(|_| DROP)?;
        let r = VxlanRepr::parse(&vx).map_err(|_| DROP)?;
        let vpc = Vni::new(r.vni)
            .ok()
            .and_then(|v| self.model.vpc_by_vni(v))
            .ok_or(DROP)?;
        let inner = parse(vx.payload()).ok_or(DROP)?;
        if inner.vlan.is_some() || matches!(inner.net, Net::Other { .. }) {
            return Err(DROP);
        }
        Ok((inner, vpc.table))
    }

    /// The longest match in a table: routes, and in a VPC the NAT64 prefix.
    fn lookup(&self, table: TableId, dst: IpAddr) -> Option<Hit<'_>> {
        let mut best: Option<(u8, Hit<'_>)> = None;
        for r in self.model.routes().values() {
            if r.key.table == table && r.key.prefix.contains(dst) {
                let len = r.key.prefix.len();
                if best.as_ref().is_none_or(|(l, _)| len > *l) {
                    best = Some((len, Hit::Route(r)));
                }
            }
        }
        for n in self.model.nat_rules().values() {
            if let NatKind::Nat64 { prefix, .. } = &n.kind {
                let in_table = self
                    .model
                    .vpcs()
                    .get(&n.vpc)
                    .is_some_and(|v| v.table == table);
                if in_table && prefix.contains(dst) {
                    let len = prefix.len();
                    if best.as_ref().is_none_or(|(l, _)| len > *l) {
                        best = Some((len, Hit::Nat64(n)));
                    }
                }
            }
        }
        best.map(|(_, h)| h)
    }

    /// Steps 2 to 4: lookup, breakout, forward.
    #[allow(clippy::too_many_arguments)]
    fn route(
        &self,
        meters: &mut BTreeMap<Name, Meter>,
        frame: Frame,
        table: TableId,
        hopped: bool,
        now: u64,
        pick: Pick,
        ctx: &mut Ctx,
    ) -> Expect {
        let Some(dst) = ip_dst(&frame) else {
            return DROP;
        };
        let route = match self.lookup(table, dst) {
            None => return DROP,
            Some(Hit::Nat64(nat)) => {
                if hopped || !self.xlat {
                    return DROP;
                }
                return match self.nat64_out(&frame, nat, pick, ctx) {
                    Some(f) => self.route(meters, f, UNDERLAY_TABLE, true, now, pick, ctx),
                    None => DROP,
                };
            }
            Some(Hit::Route(r)) => r,
        };
        let Some(first) = route.nexthops.first() else {
            return DROP;
        };
        match *first {
            Nexthop::Blackhole => return Expect::Drop { policed: None },
            Nexthop::Vrf { table: target } => {
                if hopped {
                    return DROP;
                }
                let f = self.breakout(frame, table, pick, ctx);
                return self.route(meters, f, target, true, now, pick, ctx);
            }
            _ => {}
        }
        let ttl = match &frame.net {
            Net::V4 { ip, .. } => ip.ttl,
            Net::V6 { ip, .. } => ip.hop_limit,
            Net::Other { .. } => 0,
        };
        if ttl <= 1 {
            return DROP;
        }
        let bytes = emit(&frame);
        if let Some(m) = self.model.meter_for(&MeterTarget::Route(route.key)) {
            if red(meters, &m.name, bytes.len(), now) {
                return POLICED;
            }
        }
        let nh = if route.nexthops.len() > 1 {
            let Ok(layout) = parse_layout(&bytes) else {
                return DROP;
            };
            let i = flow_hash(&bytes, &layout) as usize % route.nexthops.len();
            route.nexthops[i]
        } else {
            *first
        };
        let Some(node) = self.model.node() else {
            return DROP;
        };
        let mut out = frame;
        match &mut out.net {
            Net::V4 { ip, .. } => ip.ttl -= 1,
            Net::V6 { ip, .. } => ip.hop_limit -= 1,
            Net::Other { .. } => {}
        }
        out.src = node.router_mac;
        match nh {
            Nexthop::Underlay { port, mac, .. } => {
                out.dst = mac;
                Expect::Tx {
                    port,
                    frame: emit(&out),
                }
            }
            Nexthop::Vxlan {
                vni,
                remote_vtep,
                router_mac,
            } => {
                let Some((port, next_mac)) = self.resolve_vtep(remote_vtep) else {
                    return DROP;
                };
                out.dst = router_mac;
                let outer = Frame {
                    dst: next_mac,
                    src: node.router_mac,
                    vlan: None,
                    net: Net::V4 {
                        ip: V4 {
                            src: node.vtep,
                            dst: remote_vtep,
                            ttl: 64,
                            tos: 0,
                            ident: 0,
                            df: true,
                        },
                        l4: L4::Udp {
                            sport: vxlan_source_port(vni.get()),
                            dport: VXLAN_PORT,
                            csum: false,
                            payload: vxlan_payload(vni.get(), true, &emit(&out)),
                        },
                    },
                };
                ctx.encapsulated = true;
                Expect::Tx {
                    port,
                    frame: emit(&outer),
                }
            }
            Nexthop::Blackhole | Nexthop::Vrf { .. } => DROP,
        }
    }

    /// The longest underlay route covering the VTEP, whose first next hop must be an underlay
    /// one.
    fn resolve_vtep(&self, vtep: Ipv4Addr) -> Option<(PortId, MacAddr)> {
        let mut best: Option<&Route> = None;
        for r in self.model.routes().values() {
            if r.key.table == UNDERLAY_TABLE
                && r.key.prefix.contains(IpAddr::V4(vtep))
                && best.is_none_or(|b| r.key.prefix.len() > b.key.prefix.len())
            {
                best = Some(r);
            }
        }
        match best?.nexthops.first()? {
            Nexthop::Underlay { port, mac, .. } => Some((*port, *mac)),
            _ => None,
        }
    }

    /// Source NAT on breakout from a VPC: static 1:1 when the source is its inside address,
    /// else NAPT44 for IPv4.
    fn breakout(&self, mut frame: Frame, table: TableId, pick: Pick, ctx: &mut Ctx) -> Frame {
        let Some(vpc) = self.model.vpc_by_table(table) else {
            return frame;
        };
        let rules: Vec<&NatRule> = self
            .model
            .nat_rules()
            .values()
            .filter(|n| n.vpc == vpc.name)
            .collect();
        match &mut frame.net {
            Net::V4 { ip, l4 } => {
                for n in &rules {
                    if let NatKind::Static44 { inside, outside } = n.kind {
                        if inside == ip.src {
                            ip.src = outside;
                            return frame;
                        }
                    }
                }
                for n in &rules {
                    if let NatKind::Napt44 { pool, ports } = n.kind {
                        let (addr, port) = match pick {
                            Pick::Placeholder => (pool.first, ports.0),
                            Pick::Given { addr, port, .. } => (addr, port),
                        };
                        ctx.snat = Some(Snat {
                            rule: n.name.clone(),
                            nat64: false,
                            pool,
                            ports,
                            proto: l4.proto(),
                            inside: (IpAddr::V4(ip.src), l4.sport()),
                            remote: (ip.dst, l4.nat_remote_port(l4.dport())),
                        });
                        ip.src = addr;
                        l4.set_sport(port);
                        return frame;
                    }
                }
                frame
            }
            Net::V6 { ip, .. } => {
                for n in &rules {
                    if let NatKind::Static66 { inside, outside } = n.kind {
                        if inside == ip.src {
                            ip.src = outside;
                            return frame;
                        }
                    }
                }
                frame
            }
            Net::Other { .. } => frame,
        }
    }

    /// NAT64, IPv6 to IPv4 (RFC 6146 with RFC 7915 header translation).
    fn nat64_out(&self, frame: &Frame, nat: &NatRule, pick: Pick, ctx: &mut Ctx) -> Option<Frame> {
        let NatKind::Nat64 {
            prefix,
            pool,
            ports,
        } = nat.kind
        else {
            return None;
        };
        let Net::V6 { ip, l4 } = &frame.net else {
            return None;
        };
        let dst = nat64_extract(prefix.len(), ip.dst)?;
        let (addr, port, ident, df) = match pick {
            Pick::Placeholder => (pool.first, ports.0, 0, false),
            Pick::Given {
                addr,
                port,
                ident,
                df,
            } => (addr, port, ident, df),
        };
        ctx.snat = Some(Snat {
            rule: nat.name.clone(),
            nat64: true,
            pool,
            ports,
            proto: l4.proto(),
            inside: (IpAddr::V6(ip.src), l4.sport()),
            remote: (dst, l4.nat_remote_port(l4.dport())),
        });
        let mut l4 = l4.clone();
        l4.set_sport(port);
        if let L4::Udp { csum, .. } = &mut l4 {
            *csum = true;
        }
        Some(Frame {
            dst: frame.dst,
            src: frame.src,
            vlan: None,
            net: Net::V4 {
                ip: V4 {
                    src: addr,
                    dst,
                    ttl: ip.hop_limit,
                    tos: ip.tclass,
                    ident,
                    df,
                },
                l4,
            },
        })
    }
}

/// NAT64, IPv4 to IPv6, for a packet of a known session.
fn four_to_six(
    frame: &Frame,
    prefix: &Prefix,
    inside: Ipv6Addr,
    inside_port: u16,
) -> Option<Frame> {
    let Net::V4 { ip, l4 } = &frame.net else {
        return None;
    };
    let mut l4 = l4.clone();
    l4.set_dport(inside_port);
    if let L4::Udp { csum, .. } = &mut l4 {
        *csum = true;
    }
    Some(Frame {
        dst: frame.dst,
        src: frame.src,
        vlan: None,
        net: Net::V6 {
            ip: V6 {
                src: nat64_embed(prefix, ip.src)?,
                dst: inside,
                hop_limit: ip.ttl,
                tclass: ip.tos,
                flow: 0,
            },
            l4,
        },
    })
}

fn red(meters: &mut BTreeMap<Name, Meter>, name: &Name, len: usize, now: u64) -> bool {
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    meters
        .get_mut(name)
        .is_some_and(|m| m.color(len, now) == Color::Red)
}
