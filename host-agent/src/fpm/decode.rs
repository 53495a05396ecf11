//! Netlink inside FPM frames: zebra's route, nexthop and neighbour messages as typed events.
//!
//! Routes and neighbours are parsed with `netlink-packet-route`; nexthop objects
//! (`RTM_NEWNEXTHOP`, absent from that crate's 0.34) are walked with `netlink-packet-core`'s
//! attribute iterator. A message that cannot be decoded is dropped and counted, as an
//! undecodable message ([`DecodeStats::malformed`]) or an undecodable attribute
//! ([`DecodeStats::bad_attributes`]), and never as received; the messages after it in the
//! same frame are still read when its length field can be trusted. Each error also goes to the
//! caller's sink ([`decode_netlink_with`]): the FPM server logs them at WARN, rate-limited.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flow_offload::model::{MacAddr, Prefix};
use netlink_packet_core::{NlaBuffer, NlasIterator, Parseable};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};

/// `RTM_NEWROUTE`.
pub const RTM_NEWROUTE: u16 = 24;
/// `RTM_DELROUTE`.
pub const RTM_DELROUTE: u16 = 25;
/// `RTM_NEWNEIGH`.
pub const RTM_NEWNEIGH: u16 = 28;
/// `RTM_DELNEIGH`.
pub const RTM_DELNEIGH: u16 = 29;
/// `RTM_NEWNEXTHOP`.
pub const RTM_NEWNEXTHOP: u16 = 104;
/// `RTM_DELNEXTHOP`.
pub const RTM_DELNEXTHOP: u16 = 105;
/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_REPLACE`.
pub const NLM_F_REPLACE: u16 = 0x100;
/// zebra's private `RTA_ENCAP_TYPE` value for VXLAN (`FPM_NH_ENCAP_VXLAN`), nested
/// `RTA_ENCAP { 0 /* VXLAN_VNI */: u32 }`.
pub const FPM_NH_ENCAP_VXLAN: u16 = 100;
/// `AF_BRIDGE`.
pub const AF_BRIDGE: u8 = 7;
/// Netlink message header size.
pub const NLMSG_HDR_LEN: usize = 16;

const NHA_ID: u16 = 1;
const NHA_GROUP: u16 = 2;
const NHA_BLACKHOLE: u16 = 4;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const NHA_ENCAP_TYPE: u16 = 7;
const NHA_ENCAP: u16 = 8;
const NHMSG_LEN: usize = 8;

/// What a route does with packets, from `rtm_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// Forward to the nexthops.
    Unicast,
    /// Drop silently.
    Blackhole,
    /// Drop with ICMP unreachable.
    Unreachable,
    /// Drop with ICMP administratively prohibited.
    Prohibit,
    /// Any other type (local, broadcast, ...), by number.
    Other(u8),
}

impl RouteKind {
    /// Whether packets are dropped (the model's `Blackhole`).
    pub fn drops(self) -> bool {
        matches!(
            self,
            RouteKind::Blackhole | RouteKind::Unreachable | RouteKind::Prohibit
        )
    }
}

/// One forwarding path as zebra describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PathSpec {
    /// The gateway, if any (none: directly connected).
    pub gateway: Option<IpAddr>,
    /// The outgoing interface (0: none).
    pub ifindex: u32,
    /// VXLAN VNI from zebra's private encap (EVPN routes).
    pub vni: Option<u32>,
    /// ECMP weight, 1-based (netlink's `rtnh_hops + 1`).
    pub weight: u16,
}

/// How a route names its nexthops.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RouteNexthops {
    /// A nexthop object (`RTA_NH_ID`, `fpm use-next-hop-groups`).
    Id(u32),
    /// Inline paths (one, or `RTA_MULTIPATH`).
    Paths(Vec<PathSpec>),
}

/// An `RTM_NEWROUTE` from zebra.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteUpdate {
    /// The table: `RTA_TABLE` if present, else `rtm_table`.
    pub table: u32,
    /// The destination.
    pub prefix: Prefix,
    /// `rtm_protocol` (BGP 186, static 196, ...): feedback must echo it.
    pub protocol: u8,
    /// `rtm_type`.
    pub kind: RouteKind,
    /// `NLM_F_REPLACE` was set.
    pub replace: bool,
    /// `RTA_PRIORITY` (zebra's metric), if present.
    pub metric: Option<u32>,
    /// The nexthops.
    pub nexthops: RouteNexthops,
}

/// An `RTM_DELROUTE` from zebra.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RouteDelete {
    /// The table.
    pub table: u32,
    /// The destination.
    pub prefix: Prefix,
    /// `rtm_protocol`.
    pub protocol: u8,
}

/// What a nexthop object is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NexthopKind {
    /// One path.
    Single(PathSpec),
    /// Drop.
    Blackhole,
    /// A group of other nexthop ids with weights (1-based).
    Group(Vec<(u32, u16)>),
}

/// An `RTM_NEWNEXTHOP` from zebra.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NexthopUpdate {
    /// `NHA_ID`.
    pub id: u32,
    /// `nh_protocol`.
    pub protocol: u8,
    /// The definition.
    pub kind: NexthopKind,
}

/// An `RTM_NEWNEIGH`/`RTM_DELNEIGH` (EVPN router MACs are `AF_BRIDGE` FDB entries on the VXLAN
/// device: `NDA_LLADDR` the router MAC, `NDA_DST` the remote VTEP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NeighbourUpdate {
    /// `ndm_family` (7 = `AF_BRIDGE`).
    pub family: u8,
    /// `ndm_ifindex`.
    pub ifindex: u32,
    /// `ndm_state`.
    pub state: u16,
    /// `NDA_LLADDR`, if 6 bytes.
    pub mac: Option<MacAddr>,
    /// `NDA_DST`.
    pub dst: Option<IpAddr>,
    /// `NDA_VNI`.
    pub vni: Option<u32>,
    /// `NDA_VLAN`.
    pub vlan: Option<u16>,
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FpmEvent {
    /// A route was added or replaced.
    Route(RouteUpdate),
    /// A route was removed.
    RouteDeleted(RouteDelete),
    /// A nexthop object was added or replaced.
    Nexthop(NexthopUpdate),
    /// A nexthop object was removed.
    NexthopDeleted(u32),
    /// A neighbour (router MAC) was added.
    Neighbour(NeighbourUpdate),
    /// A neighbour was removed.
    NeighbourDeleted(NeighbourUpdate),
}

/// Per-kind counters of what the decoder saw. Every netlink message is counted exactly once:
/// as received (`messages`: decoded, or well-formed and ignored) or as dropped (`malformed`,
/// `bad_attributes`). The per-type counters count decoded messages only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeStats {
    /// Netlink messages received: decoded, or well-formed and ignored (not the dropped ones).
    pub messages: u64,
    /// `RTM_NEWROUTE`.
    pub new_route: u64,
    /// `RTM_DELROUTE`.
    pub del_route: u64,
    /// `RTM_NEWNEXTHOP`.
    pub new_nexthop: u64,
    /// `RTM_DELNEXTHOP`.
    pub del_nexthop: u64,
    /// `RTM_NEWNEIGH`.
    pub new_neigh: u64,
    /// `RTM_DELNEIGH`.
    pub del_neigh: u64,
    /// Well-formed messages of other kinds or families (MPLS routes, ...).
    pub ignored: u64,
    /// Messages dropped because the message itself could not be decoded (its length, its
    /// header, a bad prefix, a required attribute missing).
    pub malformed: u64,
    /// Messages dropped because one of their attributes could not be decoded (a length that
    /// does not fit, a value of the wrong size).
    pub bad_attributes: u64,
}

impl DecodeStats {
    /// Add another set of counters.
    pub fn add(&mut self, o: &DecodeStats) {
        self.messages += o.messages;
        self.new_route += o.new_route;
        self.del_route += o.del_route;
        self.new_nexthop += o.new_nexthop;
        self.del_nexthop += o.del_nexthop;
        self.new_neigh += o.new_neigh;
        self.del_neigh += o.del_neigh;
        self.ignored += o.ignored;
        self.malformed += o.malformed;
        self.bad_attributes += o.bad_attributes;
    }

    /// Messages dropped, for either reason.
    pub fn dropped(&self) -> u64 {
        self.malformed + self.bad_attributes
    }
}

/// What could not be decoded: the metric label of `dpucp_fpm_decode_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DecodeErrorKind {
    /// The FPM byte stream could not be framed (the connection is reset).
    Frame,
    /// A netlink message could not be decoded (dropped).
    Message,
    /// An attribute of a netlink message could not be decoded (the message is dropped).
    Attribute,
}

impl DecodeErrorKind {
    /// The label: `frame`, `message` or `attribute`.
    pub fn as_str(self) -> &'static str {
        match self {
            DecodeErrorKind::Frame => "frame",
            DecodeErrorKind::Message => "message",
            DecodeErrorKind::Attribute => "attribute",
        }
    }
}

/// Why one message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The netlink header's length does not fit the frame.
    #[error("netlink length {len} does not fit the {left} bytes left in the frame")]
    BadLength {
        /// `nlmsg_len`.
        len: u32,
        /// Bytes left.
        left: usize,
    },
    /// The payload did not parse.
    #[error("malformed {what}: {detail}")]
    Parse {
        /// Which message.
        what: &'static str,
        /// The parser's message.
        detail: String,
    },
    /// Prefix length beyond the family, or host bits set.
    #[error("bad prefix {addr}/{len}")]
    BadPrefix {
        /// Address.
        addr: IpAddr,
        /// Length.
        len: u8,
    },
    /// A required attribute is missing.
    #[error("{0} without {1}")]
    Missing(&'static str, &'static str),
    /// An attribute's length does not fit, or its value has the wrong size.
    #[error("bad attribute {what}: {detail}")]
    Attribute {
        /// Which attribute.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// Bytes after the last message of a frame that do not make a message.
    #[error("{0} trailing bytes after the last netlink message")]
    Trailing(usize),
}

impl MessageError {
    /// Whether the message or one of its attributes could not be decoded.
    pub fn kind(&self) -> DecodeErrorKind {
        match self {
            MessageError::Attribute { .. } => DecodeErrorKind::Attribute,
            _ => DecodeErrorKind::Message,
        }
    }
}

fn parse_err(what: &'static str, e: impl std::fmt::Display) -> MessageError {
    MessageError::Parse {
        what,
        detail: e.to_string(),
    }
}

fn attr_err(what: &'static str, e: impl std::fmt::Display) -> MessageError {
    MessageError::Attribute {
        what,
        detail: e.to_string(),
    }
}

fn read_u16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(&[x, y]) => u16::from_ne_bytes([x, y]),
        _ => 0,
    }
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    match b.get(at..at + 4) {
        Some(&[a, c, d, e]) => u32::from_ne_bytes([a, c, d, e]),
        _ => 0,
    }
}

/// Decode every netlink message of one frame's payload, appending events to `out`. Errors are
/// counted in `stats` and logged at DEBUG; [`decode_netlink_with`] hands them to the caller.
pub fn decode_netlink(payload: &[u8], out: &mut Vec<FpmEvent>, stats: &mut DecodeStats) {
    decode_netlink_with(payload, out, stats, |e, nlmsg_type| {
        tracing::debug!(error = %e, nlmsg_type, "FPM: netlink message dropped");
    });
}

/// As [`decode_netlink`], calling `on_error(error, nlmsg_type)` for every message dropped.
pub fn decode_netlink_with(
    payload: &[u8],
    out: &mut Vec<FpmEvent>,
    stats: &mut DecodeStats,
    mut on_error: impl FnMut(&MessageError, u16),
) {
    let mut rest = payload;
    let mut dropped = |e: MessageError, kind: u16, stats: &mut DecodeStats| {
        match e.kind() {
            DecodeErrorKind::Attribute => stats.bad_attributes += 1,
            _ => stats.malformed += 1,
        }
        on_error(&e, kind);
    };
    while rest.len() >= NLMSG_HDR_LEN {
        let len = read_u32(rest, 0);
        let kind = read_u16(rest, 4);
        let flags = read_u16(rest, 6);
        let ulen = len as usize;
        if ulen < NLMSG_HDR_LEN || ulen > rest.len() {
            // Nothing after this message can be located: drop the rest of the frame.
            dropped(
                MessageError::BadLength {
                    len,
                    left: rest.len(),
                },
                kind,
                stats,
            );
            return;
        }
        let body = &rest[NLMSG_HDR_LEN..ulen];
        match decode_message(kind, flags, body) {
            Ok(Some(ev)) => {
                stats.messages += 1;
                count(stats, kind);
                out.push(ev);
            }
            Ok(None) => {
                stats.messages += 1;
                stats.ignored += 1;
            }
            Err(e) => dropped(e, kind, stats),
        }
        // Messages are 4-byte aligned; the last one may omit its padding.
        let next = (ulen + 3) & !3;
        rest = rest.get(next..).unwrap_or(&[]);
    }
    if !rest.is_empty() {
        dropped(MessageError::Trailing(rest.len()), 0, stats);
    }
}

/// Counts a decoded message by type.
fn count(stats: &mut DecodeStats, kind: u16) {
    match kind {
        RTM_NEWROUTE => stats.new_route += 1,
        RTM_DELROUTE => stats.del_route += 1,
        RTM_NEWNEXTHOP => stats.new_nexthop += 1,
        RTM_DELNEXTHOP => stats.del_nexthop += 1,
        RTM_NEWNEIGH => stats.new_neigh += 1,
        RTM_DELNEIGH => stats.del_neigh += 1,
        _ => {}
    }
}

fn decode_message(kind: u16, flags: u16, body: &[u8]) -> Result<Option<FpmEvent>, MessageError> {
    match kind {
        RTM_NEWROUTE => decode_route(body, flags, true),
        RTM_DELROUTE => decode_route(body, flags, false),
        RTM_NEWNEXTHOP => decode_nexthop(body).map(|n| Some(FpmEvent::Nexthop(n))),
        RTM_DELNEXTHOP => {
            let id = nexthop_id(body)?;
            Ok(Some(FpmEvent::NexthopDeleted(id)))
        }
        RTM_NEWNEIGH => decode_neigh(body).map(|n| Some(FpmEvent::Neighbour(n))),
        RTM_DELNEIGH => decode_neigh(body).map(|n| Some(FpmEvent::NeighbourDeleted(n))),
        _ => Ok(None),
    }
}

/// Walk netlink attributes: `(kind without flag bits, value)`; an attribute whose length does
/// not fit is an error.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), MessageError>> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(read_u16(buf, 0));
        let kind = read_u16(buf, 2) & 0x3fff;
        let Some(value) = buf.get(4..len).filter(|_| len >= 4) else {
            buf = &[];
            return Some(Err(attr_err("attribute", "length does not fit")));
        };
        buf = buf.get((len + 3) & !3..).unwrap_or(&[]);
        Some(Ok((kind, value)))
    })
}

fn u32_attr(what: &'static str, v: &[u8]) -> Result<u32, MessageError> {
    nla_u32(v).ok_or_else(|| attr_err(what, "not 4 bytes"))
}

fn ip_of_family(family: u8, v: &[u8]) -> Result<IpAddr, MessageError> {
    match (family, v.len()) {
        (AF_INET, 4) | (AF_INET6, 16) => ip_from(v).ok_or_else(|| attr_err("address", "bad")),
        _ => Err(attr_err("address", "length does not match the family")),
    }
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const RTA_MULTIPATH: u16 = 9;
const RTA_TABLE: u16 = 15;
const RTA_VIA: u16 = 18;
const RTA_ENCAP_TYPE: u16 = 21;
const RTA_ENCAP: u16 = 22;
const RTA_NH_ID: u16 = 30;

/// Gateway, interface and VXLAN VNI from one path's attributes (top level or `rtnexthop`).
fn path_attr(
    family: u8,
    kind: u16,
    v: &[u8],
    spec: &mut PathSpec,
    encap: &mut (u16, Option<u32>),
) -> Result<(), MessageError> {
    match kind {
        RTA_GATEWAY => spec.gateway = Some(ip_of_family(family, v)?),
        RTA_VIA => {
            // struct rtvia { u16 family; u8 addr[]; }: IPv4 routes over IPv6 nexthops.
            let fam = read_u16(v, 0);
            let addr = v.get(2..).unwrap_or(&[]);
            spec.gateway = Some(ip_of_family(fam as u8, addr)?);
        }
        RTA_OIF => spec.ifindex = u32_attr("RTA_OIF", v)?,
        RTA_ENCAP_TYPE => {
            if v.len() != 2 {
                return Err(attr_err("RTA_ENCAP_TYPE", "not 2 bytes"));
            }
            encap.0 = read_u16(v, 0);
        }
        RTA_ENCAP => {
            for a in attrs(v) {
                let (k, val) = a?;
                if k == 0 && val.len() == 4 {
                    encap.1 = nla_u32(val);
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn multipath_fast(family: u8, mut v: &[u8]) -> Result<Vec<PathSpec>, MessageError> {
    let mut out = Vec::with_capacity(4);
    while !v.is_empty() {
        // struct rtnexthop { u16 len; u8 flags; u8 hops; i32 ifindex; } then attributes.
        let len = usize::from(read_u16(v, 0));
        let Some(body) = v.get(8..len).filter(|_| len >= 8) else {
            return Err(attr_err("RTA_MULTIPATH", "rtnexthop length does not fit"));
        };
        let mut spec = PathSpec {
            gateway: None,
            ifindex: read_u32(v, 4),
            vni: None,
            weight: u16::from(v[3]) + 1,
        };
        let mut encap = (0u16, None);
        for a in attrs(body) {
            let (k, val) = a?;
            path_attr(family, k, val, &mut spec, &mut encap)?;
        }
        if encap.0 == FPM_NH_ENCAP_VXLAN {
            spec.vni = encap.1;
        }
        out.push(spec);
        v = v.get((len + 3) & !3..).unwrap_or(&[]);
    }
    Ok(out)
}

/// `RTM_NEWROUTE`/`RTM_DELROUTE` without allocating for the common case (a nexthop id): this
/// is the replay hot path. `reference::decode_route` (netlink-packet-route) is its test oracle.
fn decode_route(body: &[u8], flags: u16, new: bool) -> Result<Option<FpmEvent>, MessageError> {
    let Some(&[family, dst_len, _src_len, _tos, rtm_table, protocol, _scope, rtype]) =
        body.get(..8)
    else {
        return Err(parse_err("route", "shorter than rtmsg"));
    };
    if body.len() < 12 {
        return Err(parse_err("route", "shorter than rtmsg"));
    }
    if family != AF_INET && family != AF_INET6 {
        return Ok(None);
    }
    let mut table = u32::from(rtm_table);
    let mut dst = None;
    let mut metric = None;
    let mut nh_id = None;
    let mut paths = None;
    let mut single = PathSpec {
        weight: 1,
        ..PathSpec::default()
    };
    let mut encap = (0u16, None);
    for a in attrs(&body[12..]) {
        let (kind, v) = a?;
        match kind {
            RTA_DST => dst = Some(ip_of_family(family, v)?),
            RTA_TABLE => table = u32_attr("RTA_TABLE", v)?,
            RTA_PRIORITY => metric = Some(u32_attr("RTA_PRIORITY", v)?),
            RTA_NH_ID => nh_id = Some(u32_attr("RTA_NH_ID", v)?),
            RTA_MULTIPATH => paths = Some(multipath_fast(family, v)?),
            k => path_attr(family, k, v, &mut single, &mut encap)?,
        }
    }
    let addr = dst.unwrap_or(if family == AF_INET {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    });
    let prefix =
        Prefix::new(addr, dst_len).map_err(|_| MessageError::BadPrefix { addr, len: dst_len })?;
    if !new {
        return Ok(Some(FpmEvent::RouteDeleted(RouteDelete {
            table,
            prefix,
            protocol,
        })));
    }
    let kind = match rtype {
        1 => RouteKind::Unicast,
        6 => RouteKind::Blackhole,
        7 => RouteKind::Unreachable,
        8 => RouteKind::Prohibit,
        t => RouteKind::Other(t),
    };
    if encap.0 == FPM_NH_ENCAP_VXLAN {
        single.vni = encap.1;
    }
    let nexthops = match (nh_id, paths) {
        (Some(id), _) => RouteNexthops::Id(id),
        (None, Some(p)) => RouteNexthops::Paths(p),
        (None, None) if single.gateway.is_none() && single.ifindex == 0 && single.vni.is_none() => {
            RouteNexthops::Paths(Vec::new())
        }
        (None, None) => RouteNexthops::Paths(vec![single]),
    };
    Ok(Some(FpmEvent::Route(RouteUpdate {
        table,
        prefix,
        protocol,
        kind,
        replace: flags & NLM_F_REPLACE != 0,
        metric,
        nexthops,
    })))
}

fn nla_u32(v: &[u8]) -> Option<u32> {
    match *v {
        [a, b, c, d] => Some(u32::from_ne_bytes([a, b, c, d])),
        _ => None,
    }
}

fn ip_from(v: &[u8]) -> Option<IpAddr> {
    match v.len() {
        4 => <[u8; 4]>::try_from(v).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(v).ok().map(IpAddr::from),
        _ => None,
    }
}

fn nlas(buf: &[u8]) -> impl Iterator<Item = Result<NlaBuffer<&[u8]>, String>> {
    NlasIterator::new(buf).map(|r| r.map_err(|e| e.to_string()))
}

fn nexthop_id(body: &[u8]) -> Result<u32, MessageError> {
    let attrs = body
        .get(NHMSG_LEN..)
        .ok_or(MessageError::Missing("nexthop", "nhmsg header"))?;
    for nla in nlas(attrs) {
        let nla = nla.map_err(|e| attr_err("nexthop", e))?;
        if nla.kind() == NHA_ID {
            return nla_u32(nla.value()).ok_or(MessageError::Missing("nexthop", "valid NHA_ID"));
        }
    }
    Err(MessageError::Missing("nexthop", "NHA_ID"))
}

fn decode_nexthop(body: &[u8]) -> Result<NexthopUpdate, MessageError> {
    let protocol = *body
        .get(2)
        .ok_or(MessageError::Missing("nexthop", "nhmsg header"))?;
    let attrs = body
        .get(NHMSG_LEN..)
        .ok_or(MessageError::Missing("nexthop", "nhmsg header"))?;
    let mut id = None;
    let mut group = None;
    let mut blackhole = false;
    let mut spec = PathSpec {
        weight: 1,
        ..PathSpec::default()
    };
    let mut encap_type = None;
    let mut vni = None;
    for nla in nlas(attrs) {
        let nla = nla.map_err(|e| attr_err("nexthop", e))?;
        let v = nla.value();
        match nla.kind() {
            NHA_ID => id = nla_u32(v),
            NHA_GROUP => {
                // struct nexthop_grp { u32 id; u8 weight; u8 resvd1; u16 resvd2; }
                if v.len() % 8 != 0 {
                    return Err(attr_err("NHA_GROUP", "not a multiple of 8 bytes"));
                }
                group = Some(
                    v.chunks_exact(8)
                        .map(|c| (read_u32(c, 0), u16::from(c[4]) + 1))
                        .collect::<Vec<_>>(),
                );
            }
            NHA_BLACKHOLE => blackhole = true,
            NHA_OIF => spec.ifindex = nla_u32(v).unwrap_or(0),
            NHA_GATEWAY => {
                spec.gateway =
                    Some(ip_from(v).ok_or_else(|| attr_err("NHA_GATEWAY", "not 4 or 16 bytes"))?);
            }
            NHA_ENCAP_TYPE => encap_type = Some(read_u16(v, 0)),
            NHA_ENCAP => {
                for inner in nlas(v) {
                    let inner = inner.map_err(|e| attr_err("NHA_ENCAP", e))?;
                    if inner.kind() == 0 {
                        vni = nla_u32(inner.value());
                    }
                }
            }
            _ => {}
        }
    }
    let id = id.ok_or(MessageError::Missing("nexthop", "NHA_ID"))?;
    if encap_type == Some(FPM_NH_ENCAP_VXLAN) {
        spec.vni = vni;
    }
    let kind = match group {
        Some(g) => NexthopKind::Group(g),
        None if blackhole => NexthopKind::Blackhole,
        None => NexthopKind::Single(spec),
    };
    Ok(NexthopUpdate { id, protocol, kind })
}

fn decode_neigh(body: &[u8]) -> Result<NeighbourUpdate, MessageError> {
    let msg = NeighbourMessage::parse(body).map_err(|e| parse_err("neighbour", e))?;
    let mut n = NeighbourUpdate {
        family: u8::from(msg.header.family),
        ifindex: msg.header.ifindex,
        state: u16::from(msg.header.state),
        mac: None,
        dst: None,
        vni: None,
        vlan: None,
    };
    for a in &msg.attributes {
        match a {
            NeighbourAttribute::LinkLayerAddress(m) => {
                n.mac = <[u8; 6]>::try_from(m.as_slice()).ok().map(MacAddr);
            }
            NeighbourAttribute::Destination(d) => {
                n.dst = match d {
                    NeighbourAddress::Inet(a) => Some(IpAddr::V4(*a)),
                    NeighbourAddress::Inet6(a) => Some(IpAddr::V6(*a)),
                    NeighbourAddress::Other(v) => ip_from(v),
                    _ => None,
                }
            }
            NeighbourAttribute::Vni(v) => n.vni = Some(*v),
            NeighbourAttribute::Vlan(v) => n.vlan = Some(*v),
            _ => {}
        }
    }
    Ok(n)
}

/// The same route decoding through `netlink-packet-route`: the oracle the fast path is
/// checked against.
#[cfg(test)]
pub(crate) mod reference {
    use super::*;
    use netlink_packet_core::Nla;
    use netlink_packet_route::route::{
        RouteAddress, RouteAttribute, RouteLwTunnelEncap, RouteMessage, RouteNextHop, RouteType,
        RouteVia,
    };
    use netlink_packet_route::AddressFamily;

    fn route_kind(t: RouteType) -> RouteKind {
        match t {
            RouteType::Unicast => RouteKind::Unicast,
            RouteType::BlackHole => RouteKind::Blackhole,
            RouteType::Unreachable => RouteKind::Unreachable,
            RouteType::Prohibit => RouteKind::Prohibit,
            other => RouteKind::Other(u8::from(other)),
        }
    }

    fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
        match a {
            RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
            RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
            _ => None,
        }
    }

    fn via_addr(v: &RouteVia) -> Option<IpAddr> {
        match v {
            RouteVia::Inet(a) => Some(IpAddr::V4(*a)),
            RouteVia::Inet6(a) => Some(IpAddr::V6(*a)),
            _ => None,
        }
    }

    /// zebra's VXLAN encap: the nested attribute of type 0 holds the VNI as a host-order u32.
    fn encap_vni(encaps: &[RouteLwTunnelEncap]) -> Option<u32> {
        encaps.iter().find_map(|e| match e {
            RouteLwTunnelEncap::Other(nla) if nla.kind() & 0x3fff == 0 && nla.value_len() == 4 => {
                let mut v = [0u8; 4];
                nla.emit_value(&mut v);
                Some(u32::from_ne_bytes(v))
            }
            _ => None,
        })
    }

    /// Gateway, VNI and whether the encap was zebra's VXLAN, from one attribute list.
    fn path_attrs(attrs: &[RouteAttribute], spec: &mut PathSpec) {
        let mut encap_type = None;
        let mut vni = None;
        for a in attrs {
            match a {
                RouteAttribute::Gateway(g) => spec.gateway = route_addr(g),
                RouteAttribute::Via(v) => spec.gateway = via_addr(v),
                RouteAttribute::Oif(i) => spec.ifindex = *i,
                RouteAttribute::EncapType(t) => encap_type = Some(u16::from(*t)),
                RouteAttribute::Encap(e) => vni = encap_vni(e),
                _ => {}
            }
        }
        if encap_type == Some(FPM_NH_ENCAP_VXLAN) {
            spec.vni = vni;
        }
    }

    fn multipath(hops: &[RouteNextHop]) -> Vec<PathSpec> {
        hops.iter()
            .map(|h| {
                let mut spec = PathSpec {
                    ifindex: h.interface_index,
                    weight: u16::from(h.hops) + 1,
                    ..PathSpec::default()
                };
                path_attrs(&h.attributes, &mut spec);
                spec
            })
            .collect()
    }

    pub(crate) fn decode_route(
        body: &[u8],
        flags: u16,
        new: bool,
    ) -> Result<Option<FpmEvent>, MessageError> {
        let msg = RouteMessage::parse(body).map_err(|e| parse_err("route", e))?;
        let h = &msg.header;
        let family = h.address_family;
        if family != AddressFamily::Inet && family != AddressFamily::Inet6 {
            // MPLS and other families carry no IP prefix for the model.
            return Ok(None);
        }
        let mut table = u32::from(h.table);
        let mut dst = None;
        let mut metric = None;
        let mut nh_id = None;
        let mut paths = None;
        for a in &msg.attributes {
            match a {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Destination(d) => dst = route_addr(d),
                RouteAttribute::Priority(p) => metric = Some(*p),
                RouteAttribute::NhId(id) => nh_id = Some(*id),
                RouteAttribute::MultiPath(hops) => paths = Some(multipath(hops)),
                _ => {}
            }
        }
        let addr = dst.unwrap_or(if family == AddressFamily::Inet {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        });
        let len = h.destination_prefix_length;
        let prefix = Prefix::new(addr, len).map_err(|_| MessageError::BadPrefix { addr, len })?;
        let protocol = u8::from(h.protocol);
        if !new {
            return Ok(Some(FpmEvent::RouteDeleted(RouteDelete {
                table,
                prefix,
                protocol,
            })));
        }
        let kind = route_kind(h.kind);
        let nexthops = match (nh_id, paths) {
            (Some(id), _) => RouteNexthops::Id(id),
            (None, Some(p)) => RouteNexthops::Paths(p),
            (None, None) => {
                let mut spec = PathSpec {
                    weight: 1,
                    ..PathSpec::default()
                };
                path_attrs(&msg.attributes, &mut spec);
                if spec.gateway.is_none() && spec.ifindex == 0 && spec.vni.is_none() {
                    RouteNexthops::Paths(Vec::new())
                } else {
                    RouteNexthops::Paths(vec![spec])
                }
            }
        };
        Ok(Some(FpmEvent::Route(RouteUpdate {
            table,
            prefix,
            protocol,
            kind,
            replace: flags & NLM_F_REPLACE != 0,
            metric,
            nexthops,
        })))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::fpm::build::{self, NlWriter, RouteSpec};
    use proptest::prelude::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn decode(buf: &[u8]) -> (Vec<FpmEvent>, DecodeStats) {
        let mut out = Vec::new();
        let mut st = DecodeStats::default();
        decode_netlink(buf, &mut out, &mut st);
        (out, st)
    }

    fn spec<'a>(table: u32, prefix: &str, nh: &'a RouteNexthops) -> RouteSpec<'a> {
        RouteSpec {
            table,
            prefix: p(prefix),
            protocol: 196,
            kind: RouteKind::Unicast,
            rtm_flags: 0,
            metric: Some(20),
            nexthops: Some(nh),
        }
    }

    #[test]
    fn route_with_nexthop_id() {
        let nh = RouteNexthops::Id(17);
        let mut w = NlWriter::new();
        build::route(
            &mut w,
            true,
            NLM_F_REQUEST | NLM_F_REPLACE,
            &spec(254, "10.1.0.0/24", &nh),
        );
        let (ev, st) = decode(&w.buf);
        assert_eq!(st.new_route, 1);
        assert_eq!(
            ev,
            vec![FpmEvent::Route(RouteUpdate {
                table: 254,
                prefix: p("10.1.0.0/24"),
                protocol: 196,
                kind: RouteKind::Unicast,
                replace: true,
                metric: Some(20),
                nexthops: RouteNexthops::Id(17),
            })]
        );
    }

    /// FRR 8.4 sends an update as DELROUTE + NEWROUTE in one frame, IPv6 without REPLACE.
    #[test]
    fn delete_then_add_in_one_frame_v6_ecmp() {
        let gw = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let nh = RouteNexthops::Paths(vec![
            PathSpec {
                gateway: gw("fe80::1"),
                ifindex: 3,
                vni: None,
                weight: 1,
            },
            PathSpec {
                gateway: gw("fe80::2"),
                ifindex: 4,
                vni: None,
                weight: 3,
            },
        ]);
        let mut w = NlWriter::new();
        build::route(
            &mut w,
            false,
            NLM_F_REQUEST,
            &spec(1000, "2001:db8:1::/48", &nh),
        );
        build::route(
            &mut w,
            true,
            NLM_F_REQUEST,
            &spec(1000, "2001:db8:1::/48", &nh),
        );
        let (ev, st) = decode(&w.buf);
        assert_eq!((st.del_route, st.new_route, st.malformed), (1, 1, 0));
        assert_eq!(
            ev[0],
            FpmEvent::RouteDeleted(RouteDelete {
                table: 1000,
                prefix: p("2001:db8:1::/48"),
                protocol: 196
            })
        );
        let FpmEvent::Route(r) = &ev[1] else { panic!() };
        assert!(!r.replace);
        assert_eq!(r.nexthops, nh);
    }

    #[test]
    fn blackhole_and_unreachable() {
        let none = RouteNexthops::Paths(vec![]);
        for (kind, want) in [
            (RouteKind::Blackhole, RouteKind::Blackhole),
            (RouteKind::Unreachable, RouteKind::Unreachable),
        ] {
            let mut w = NlWriter::new();
            let mut s = spec(254, "192.0.2.0/24", &none);
            s.kind = kind;
            build::route(&mut w, true, NLM_F_REQUEST, &s);
            let (ev, _) = decode(&w.buf);
            let FpmEvent::Route(r) = &ev[0] else { panic!() };
            assert_eq!(r.kind, want);
            assert!(r.kind.drops());
            assert_eq!(r.nexthops, none);
        }
    }

    /// zebra's EVPN encoding: RTA_ENCAP_TYPE=100 and RTA_ENCAP{0: vni} per multipath nexthop.
    #[test]
    fn vxlan_encap_per_nexthop() {
        let v4 = |s: &str| Some(IpAddr::V4(s.parse().unwrap()));
        let nh = RouteNexthops::Paths(vec![
            PathSpec {
                gateway: v4("192.0.2.1"),
                ifindex: 9,
                vni: Some(10100),
                weight: 1,
            },
            PathSpec {
                gateway: v4("192.0.2.2"),
                ifindex: 9,
                vni: Some(10100),
                weight: 1,
            },
        ]);
        let mut w = NlWriter::new();
        build::route(&mut w, true, NLM_F_REQUEST, &spec(1001, "10.9.0.0/16", &nh));
        let (ev, st) = decode(&w.buf);
        assert_eq!(st.malformed, 0);
        let FpmEvent::Route(r) = &ev[0] else { panic!() };
        assert_eq!(r.nexthops, nh);
        // Single-path (10.3 style) too.
        let one = RouteNexthops::Paths(vec![PathSpec {
            gateway: v4("192.0.2.1"),
            ifindex: 9,
            vni: Some(4242),
            weight: 1,
        }]);
        let mut w = NlWriter::new();
        build::route(
            &mut w,
            true,
            NLM_F_REQUEST,
            &spec(1001, "10.8.0.0/16", &one),
        );
        let (ev, _) = decode(&w.buf);
        let FpmEvent::Route(r) = &ev[0] else { panic!() };
        assert_eq!(r.nexthops, one);
    }

    #[test]
    fn nexthops_groups_and_neighbours() {
        let single = NexthopKind::Single(PathSpec {
            gateway: Some("10.0.0.1".parse().unwrap()),
            ifindex: 2,
            vni: None,
            weight: 1,
        });
        let group = NexthopKind::Group(vec![(1, 1), (2, 5)]);
        let mac = MacAddr([0x02, 0, 0, 0, 0, 0x11]);
        let mut w = NlWriter::new();
        build::nexthop(&mut w, 1, 196, Some(&single));
        build::nexthop(&mut w, 3, 196, Some(&group));
        build::nexthop(&mut w, 4, 196, Some(&NexthopKind::Blackhole));
        build::nexthop(&mut w, 3, 196, None);
        build::bridge_neigh(&mut w, true, 12, mac, "192.0.2.7".parse().unwrap());
        build::bridge_neigh(&mut w, false, 12, mac, "192.0.2.7".parse().unwrap());
        let (ev, st) = decode(&w.buf);
        assert_eq!(st.malformed, 0, "{ev:?}");
        assert_eq!(
            (st.new_nexthop, st.del_nexthop, st.new_neigh, st.del_neigh),
            (3, 1, 1, 1)
        );
        assert_eq!(
            ev[0],
            FpmEvent::Nexthop(NexthopUpdate {
                id: 1,
                protocol: 196,
                kind: single
            })
        );
        assert_eq!(
            ev[1],
            FpmEvent::Nexthop(NexthopUpdate {
                id: 3,
                protocol: 196,
                kind: group
            })
        );
        assert!(matches!(&ev[2], FpmEvent::Nexthop(n) if n.kind == NexthopKind::Blackhole));
        assert_eq!(ev[3], FpmEvent::NexthopDeleted(3));
        let FpmEvent::Neighbour(n) = &ev[4] else {
            panic!()
        };
        assert_eq!(
            (n.family, n.ifindex, n.mac, n.dst),
            (AF_BRIDGE, 12, Some(mac), Some("192.0.2.7".parse().unwrap()))
        );
        assert!(matches!(ev[5], FpmEvent::NeighbourDeleted(_)));
    }

    #[test]
    fn other_types_are_ignored_and_malformed_are_skipped() {
        let nh = RouteNexthops::Id(5);
        let mut w = NlWriter::new();
        w.begin(16, NLM_F_REQUEST, 0); // RTM_NEWLINK
        w.bytes(&[0; 16]);
        w.end();
        // A route whose RTA_DST is 3 bytes long.
        w.begin(RTM_NEWROUTE, NLM_F_REQUEST, 0);
        w.bytes(&[2, 24, 0, 0, 254, 196, 0, 1, 0, 0, 0, 0]);
        w.attr(1, &[10, 0, 0]);
        w.end();
        // Host bits set.
        w.begin(RTM_NEWROUTE, NLM_F_REQUEST, 0);
        w.bytes(&[2, 8, 0, 0, 254, 196, 0, 1, 0, 0, 0, 0]);
        w.attr(1, &[10, 0, 0, 1]);
        w.end();
        build::route(&mut w, true, NLM_F_REQUEST, &spec(254, "10.2.0.0/16", &nh));
        let (ev, st) = decode(&w.buf);
        // Dropped messages are not received: 2 of the 4 are (one ignored, one decoded).
        assert_eq!(st.messages, 2);
        assert_eq!(st.ignored, 1);
        assert_eq!(st.new_route, 1);
        assert_eq!((st.malformed, st.bad_attributes), (1, 1));
        assert_eq!(ev.len(), 1);
        // The sink hears of each, with its kind.
        let mut errors = Vec::new();
        decode_netlink_with(
            &w.buf,
            &mut Vec::new(),
            &mut DecodeStats::default(),
            |e, t| errors.push((e.kind(), t)),
        );
        assert_eq!(
            errors,
            vec![
                (DecodeErrorKind::Attribute, RTM_NEWROUTE),
                (DecodeErrorKind::Message, RTM_NEWROUTE)
            ]
        );
        // A bad length drops the rest of the frame, counted once.
        let mut bad = w.buf.clone();
        bad[0..4].copy_from_slice(&9999u32.to_ne_bytes());
        let (ev, st) = decode(&bad);
        assert!(ev.is_empty());
        assert_eq!((st.malformed, st.messages), (1, 0));
    }

    fn arb_prefix() -> impl Strategy<Value = Prefix> {
        prop_oneof![
            (any::<u32>(), 0u8..=32)
                .prop_map(|(a, l)| Prefix::v4(Ipv4Addr::from(a), 32).unwrap().truncate(l)),
            (any::<u128>(), 0u8..=128)
                .prop_map(|(a, l)| Prefix::v6(Ipv6Addr::from(a), 128).unwrap().truncate(l)),
        ]
    }

    fn arb_route() -> impl Strategy<Value = RouteUpdate> {
        (
            arb_prefix(),
            any::<u32>(),
            any::<u8>(),
            prop_oneof![
                Just(RouteKind::Unicast),
                Just(RouteKind::Blackhole),
                Just(RouteKind::Unreachable),
                Just(RouteKind::Prohibit)
            ],
            any::<bool>(),
            proptest::option::of(any::<u32>()),
            prop_oneof![
                any::<u32>().prop_map(RouteNexthops::Id),
                proptest::collection::vec(
                    (
                        any::<u128>(),
                        1u32..1000,
                        proptest::option::of(1u32..0xff_ffff),
                        1u16..=256
                    ),
                    0..5
                )
                .prop_map(|v| RouteNexthops::Paths(
                    v.into_iter()
                        .map(|(g, i, vni, w)| PathSpec {
                            gateway: Some(IpAddr::V6(Ipv6Addr::from(g))),
                            ifindex: i,
                            vni,
                            weight: w
                        })
                        .collect()
                )),
            ],
        )
            .prop_map(|(prefix, table, protocol, kind, replace, metric, nh)| {
                // Gateways of the route's own family.
                let nexthops = match nh {
                    RouteNexthops::Paths(mut ps) => {
                        let single = ps.len() == 1;
                        for s in &mut ps {
                            if let (true, Some(IpAddr::V6(g))) = (prefix.is_v4(), s.gateway) {
                                s.gateway = Some(IpAddr::V4(Ipv4Addr::from(
                                    (u128::from(g) & 0xffff_ffff) as u32,
                                )));
                            }
                            if single {
                                s.weight = 1;
                            }
                        }
                        RouteNexthops::Paths(ps)
                    }
                    other => other,
                };
                RouteUpdate {
                    table,
                    prefix,
                    protocol,
                    kind,
                    replace,
                    metric,
                    nexthops,
                }
            })
    }

    proptest! {
        /// Whatever we build decodes to the same route.
        #[test]
        fn route_round_trip(r in arb_route()) {
            let mut w = NlWriter::new();
            build::route(&mut w, true, NLM_F_REQUEST | if r.replace { NLM_F_REPLACE } else { 0 },
                &RouteSpec { table: r.table, prefix: r.prefix, protocol: r.protocol, kind: r.kind,
                    rtm_flags: 0, metric: r.metric, nexthops: Some(&r.nexthops) });
            let (ev, st) = decode(&w.buf);
            prop_assert_eq!(st.dropped(), 0);
            prop_assert_eq!(ev, vec![FpmEvent::Route(r)]);
        }

        /// The fast route decoder agrees with netlink-packet-route on every well-formed route.
        #[test]
        fn fast_path_matches_reference(r in arb_route(), new in any::<bool>()) {
            let mut w = NlWriter::new();
            build::route(&mut w, new, if r.replace { NLM_F_REPLACE } else { 0 },
                &RouteSpec { table: r.table, prefix: r.prefix, protocol: r.protocol, kind: r.kind,
                    rtm_flags: 0, metric: r.metric, nexthops: Some(&r.nexthops) });
            let flags = read_u16(&w.buf, 6);
            let body = &w.buf[NLMSG_HDR_LEN..];
            let fast = decode_route(body, flags, new);
            let oracle = reference::decode_route(body, flags, new);
            prop_assert!(fast.is_ok());
            prop_assert_eq!(fast.ok(), oracle.ok());
        }

        /// On corrupted routes, whenever both decoders accept, they agree.
        #[test]
        fn fast_path_matches_reference_on_corruption(r in arb_route(), at in any::<usize>(), b in any::<u8>()) {
            let mut w = NlWriter::new();
            build::route(&mut w, true, 0, &RouteSpec { table: r.table, prefix: r.prefix,
                protocol: r.protocol, kind: r.kind, rtm_flags: 0, metric: r.metric,
                nexthops: Some(&r.nexthops) });
            let n = w.buf.len() - NLMSG_HDR_LEN;
            w.buf[NLMSG_HDR_LEN + at % n] = b;
            let body = &w.buf[NLMSG_HDR_LEN..];
            if let (Ok(f), Ok(o)) = (decode_route(body, 0, true), reference::decode_route(body, 0, true)) {
                prop_assert_eq!(f, o);
            }
        }

        /// Arbitrary bytes never panic; every message is counted once.
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..512)) {
            let (ev, st) = decode(&buf);
            prop_assert_eq!(st.ignored + ev.len() as u64, st.messages);
            let typed = st.new_route + st.del_route + st.new_nexthop + st.del_nexthop
                + st.new_neigh + st.del_neigh;
            prop_assert_eq!(typed, ev.len() as u64);
        }

        /// Valid messages with corrupted bytes never panic either.
        #[test]
        fn corrupted_messages_never_panic(r in arb_route(), at in any::<usize>(), b in any::<u8>()) {
            let mut w = NlWriter::new();
            build::route(&mut w, true, 0, &RouteSpec { table: r.table, prefix: r.prefix,
                protocol: r.protocol, kind: r.kind, rtm_flags: 0, metric: r.metric,
                nexthops: Some(&r.nexthops) });
            build::nexthop(&mut w, 1, 2, Some(&NexthopKind::Group(vec![(1, 1), (2, 2)])));
            let n = w.buf.len();
            w.buf[at % n] = b;
            let (_ev, st) = decode(&w.buf);
            prop_assert!(st.messages + st.dropped() >= 1);
        }
    }
}
