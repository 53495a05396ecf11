//! Zebra-shaped netlink messages, built the way `zebra/rt_netlink.c` lays them out: for the
//! feedback encoder, unit tests and benchmarks.

use std::net::IpAddr;

use flow_offload::model::{MacAddr, Prefix};

use super::decode::{
    NexthopKind, PathSpec, RouteKind, RouteNexthops, AF_BRIDGE, FPM_NH_ENCAP_VXLAN, NLMSG_HDR_LEN,
    NLM_F_REPLACE, NLM_F_REQUEST, RTM_DELNEIGH, RTM_DELNEXTHOP, RTM_DELROUTE, RTM_NEWNEIGH,
    RTM_NEWNEXTHOP, RTM_NEWROUTE,
};

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const RTA_MULTIPATH: u16 = 9;
const RTA_TABLE: u16 = 15;
const RTA_ENCAP_TYPE: u16 = 21;
const RTA_ENCAP: u16 = 22;
const RTA_NH_ID: u16 = 30;
const NLA_F_NESTED: u16 = 0x8000;

/// The address family of an address.
pub fn family(a: &IpAddr) -> u8 {
    match a {
        IpAddr::V4(_) => 2,
        IpAddr::V6(_) => 10,
    }
}

fn ip_bytes(a: &IpAddr, out: &mut Vec<u8>) {
    match a {
        IpAddr::V4(v) => out.extend_from_slice(&v.octets()),
        IpAddr::V6(v) => out.extend_from_slice(&v.octets()),
    }
}

/// Writes netlink messages (host byte order) into a buffer.
#[derive(Debug, Default)]
pub struct NlWriter {
    /// The bytes written.
    pub buf: Vec<u8>,
    msg: usize,
}

impl NlWriter {
    /// An empty writer.
    pub fn new() -> NlWriter {
        NlWriter::default()
    }

    /// Start a message (header length filled by [`NlWriter::end`]).
    pub fn begin(&mut self, kind: u16, flags: u16, seq: u32) {
        self.msg = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
    }

    /// Raw bytes (a fixed header such as `rtmsg`).
    pub fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// One attribute.
    pub fn attr(&mut self, kind: u16, value: &[u8]) {
        let len = (4 + value.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
    }

    /// A u32 attribute.
    pub fn attr_u32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_ne_bytes());
    }

    /// Open a nested attribute; close it with [`NlWriter::nest_end`].
    pub fn nest_begin(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        at
    }

    /// Close a nested attribute (or an `rtnexthop`, whose length is also its first u16).
    pub fn nest_end(&mut self, at: usize) {
        self.pad();
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// Finish the message.
    pub fn end(&mut self) {
        self.pad();
        let len = (self.buf.len() - self.msg) as u32;
        self.buf[self.msg..self.msg + 4].copy_from_slice(&len.to_ne_bytes());
    }
}

fn vxlan_encap(w: &mut NlWriter, vni: u32) {
    w.attr(RTA_ENCAP_TYPE, &FPM_NH_ENCAP_VXLAN.to_ne_bytes());
    let n = w.nest_begin(RTA_ENCAP | NLA_F_NESTED);
    w.attr_u32(0, vni);
    w.nest_end(n);
}

fn rtm_type(k: RouteKind) -> u8 {
    match k {
        RouteKind::Unicast => 1,
        RouteKind::Blackhole => 6,
        RouteKind::Unreachable => 7,
        RouteKind::Prohibit => 8,
        RouteKind::Other(t) => t,
    }
}

/// What to put in a route message.
#[derive(Debug, Clone)]
pub struct RouteSpec<'a> {
    /// Table id (in `rtm_table` when < 256, always in `RTA_TABLE`).
    pub table: u32,
    /// Destination.
    pub prefix: Prefix,
    /// `rtm_protocol`.
    pub protocol: u8,
    /// `rtm_type`.
    pub kind: RouteKind,
    /// `rtm_flags`.
    pub rtm_flags: u32,
    /// `RTA_PRIORITY`.
    pub metric: Option<u32>,
    /// Nexthops (`None`: no nexthop attributes at all).
    pub nexthops: Option<&'a RouteNexthops>,
}

/// Append an `RTM_NEWROUTE` (`new`) or `RTM_DELROUTE` as zebra lays it out.
pub fn route(w: &mut NlWriter, new: bool, flags: u16, r: &RouteSpec<'_>) {
    let (kind, flags) = if new {
        (RTM_NEWROUTE, flags)
    } else {
        (RTM_DELROUTE, flags & !NLM_F_REPLACE)
    };
    w.begin(kind, flags, 0);
    let addr = r.prefix.addr();
    let rtm_table = if r.table < 256 { r.table as u8 } else { 0 };
    w.bytes(&[
        family(&addr),
        r.prefix.len(),
        0,
        0,
        rtm_table,
        r.protocol,
        0, // RT_SCOPE_UNIVERSE
        rtm_type(r.kind),
    ]);
    w.bytes(&r.rtm_flags.to_ne_bytes());
    let mut dst = Vec::with_capacity(16);
    ip_bytes(&addr, &mut dst);
    w.attr(RTA_DST, &dst);
    w.attr_u32(RTA_TABLE, r.table);
    if let Some(m) = r.metric {
        w.attr_u32(RTA_PRIORITY, m);
    }
    match r.nexthops {
        Some(RouteNexthops::Id(id)) => w.attr_u32(RTA_NH_ID, *id),
        Some(RouteNexthops::Paths(p)) if p.len() == 1 => path_attrs(w, &p[0]),
        Some(RouteNexthops::Paths(p)) if !p.is_empty() => {
            let mp = w.nest_begin(RTA_MULTIPATH);
            for s in p {
                // struct rtnexthop { u16 len; u8 flags; u8 hops; i32 ifindex; }
                let at = w.buf.len();
                w.bytes(&0u16.to_ne_bytes());
                w.bytes(&[0, s.weight.saturating_sub(1).min(255) as u8]);
                w.bytes(&s.ifindex.to_ne_bytes());
                if let Some(g) = &s.gateway {
                    let mut b = Vec::with_capacity(16);
                    ip_bytes(g, &mut b);
                    w.attr(RTA_GATEWAY, &b);
                }
                if let Some(vni) = s.vni {
                    vxlan_encap(w, vni);
                }
                w.nest_end(at);
            }
            w.nest_end(mp);
        }
        _ => {}
    }
    w.end();
}

fn path_attrs(w: &mut NlWriter, s: &PathSpec) {
    if let Some(g) = &s.gateway {
        let mut b = Vec::with_capacity(16);
        ip_bytes(g, &mut b);
        w.attr(RTA_GATEWAY, &b);
    }
    if s.ifindex != 0 {
        w.attr_u32(RTA_OIF, s.ifindex);
    }
    if let Some(vni) = s.vni {
        vxlan_encap(w, vni);
    }
}

/// Append an `RTM_NEWNEXTHOP` (`Some(kind)`) or `RTM_DELNEXTHOP` (`None`).
pub fn nexthop(w: &mut NlWriter, id: u32, protocol: u8, kind: Option<&NexthopKind>) {
    let fam = match kind {
        Some(NexthopKind::Single(PathSpec {
            gateway: Some(g), ..
        })) => family(g),
        _ => 0,
    };
    w.begin(
        if kind.is_some() {
            RTM_NEWNEXTHOP
        } else {
            RTM_DELNEXTHOP
        },
        NLM_F_REQUEST,
        0,
    );
    w.bytes(&[fam, 0, protocol, 0, 0, 0, 0, 0]);
    w.attr_u32(1, id);
    match kind {
        Some(NexthopKind::Group(g)) => {
            let mut v = Vec::with_capacity(g.len() * 8);
            for (m, weight) in g {
                v.extend_from_slice(&m.to_ne_bytes());
                v.extend_from_slice(&[weight.saturating_sub(1).min(255) as u8, 0, 0, 0]);
            }
            w.attr(2, &v);
        }
        Some(NexthopKind::Blackhole) => w.attr(4, &[]),
        Some(NexthopKind::Single(s)) => {
            if s.ifindex != 0 {
                w.attr_u32(5, s.ifindex);
            }
            if let Some(g) = &s.gateway {
                let mut b = Vec::with_capacity(16);
                ip_bytes(g, &mut b);
                w.attr(6, &b);
            }
            if let Some(vni) = s.vni {
                w.attr(7, &FPM_NH_ENCAP_VXLAN.to_ne_bytes());
                let n = w.nest_begin(8 | NLA_F_NESTED);
                w.attr_u32(0, vni);
                w.nest_end(n);
            }
        }
        None => {}
    }
    w.end();
}

/// Append an `AF_BRIDGE` `RTM_NEWNEIGH`/`RTM_DELNEIGH`: a router MAC behind a remote VTEP on a
/// VXLAN device.
pub fn bridge_neigh(w: &mut NlWriter, new: bool, ifindex: u32, mac: MacAddr, vtep: IpAddr) {
    w.begin(
        if new { RTM_NEWNEIGH } else { RTM_DELNEIGH },
        NLM_F_REQUEST,
        0,
    );
    // struct ndmsg { u8 family; u8 pad[3]; i32 ifindex; u16 state; u8 flags; u8 type; }
    w.bytes(&[AF_BRIDGE, 0, 0, 0]);
    w.bytes(&ifindex.to_ne_bytes());
    w.bytes(&0x80u16.to_ne_bytes()); // NUD_NOARP
    w.bytes(&[0x02 | 0x10, 0]); // NTF_SELF | NTF_EXT_LEARNED
    w.attr(2, &mac.0); // NDA_LLADDR
    let mut b = Vec::with_capacity(16);
    ip_bytes(&vtep, &mut b);
    w.attr(1, &b); // NDA_DST
    w.end();
}

/// A route message header size without the netlink header: for sizing buffers.
pub const RTMSG_LEN: usize = 12;
/// Bytes of a typical IPv4 route with a nexthop id, for sizing buffers.
pub const TYPICAL_V4_ROUTE: usize = NLMSG_HDR_LEN + RTMSG_LEN + 8 + 8 + 8 + 8;
