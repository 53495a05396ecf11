//! The rule IR, shaped like `rte_flow`: a rule is created on one port and has attributes, a
//! pattern of match items (each a spec and a mask) and a list of actions.
//!
//! The IR says nothing about how a target executes it; [`crate::caps`] says what a target
//! accepts, [`crate::refnic`] executes it in software, and the DPU agent turns it into
//! `rte_flow_item`/`rte_flow_action` arrays.
//!
//! Execution model shared by every backend (and checked by the reference NIC):
//! - a packet enters group 0 of the port it arrived on; within a group the matching rule with
//!   the lowest `priority` value wins (ties are a compiler bug: the compiler never emits two rules
//!   that can match the same packet at the same priority in one group);
//! - a packet that matches nothing in group 0 goes to the software queues unmarked (DPDK's
//!   default RSS); a packet that matches nothing in any other group is **dropped**, as on mlx5, so
//!   the compiler always closes a non-root group with a catch-all;
//! - `Mark` values survive `Jump`; the last one set is delivered with the packet;
//! - a meter colours the packet; red is dropped, green and yellow continue.

use core::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::model::{MacAddr, PortId};

/// The ordered list of software queues a rule may steer to is the agent's business; the IR
/// names one logical software queue.
pub const SOFTWARE_QUEUE: u16 = 0;

/// A value with a mask: a packet field matches when `field & mask == spec & mask`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Masked<T> {
    /// The value to match.
    pub spec: T,
    /// Which bits of it count.
    pub mask: T,
}

/// Ethernet header fields.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct EthFields {
    /// Destination MAC.
    pub dst: MacAddr,
    /// Source MAC.
    pub src: MacAddr,
    /// EtherType (after any VLAN tag, as `rte_flow` reports it for untagged frames).
    pub ethertype: u16,
}

/// 802.1Q tag fields.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct VlanFields {
    /// Tag control information (PCP, DEI, VID).
    pub tci: u16,
    /// The EtherType that follows the tag.
    pub inner_type: u16,
}

/// IPv4 header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Ipv4Fields {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Protocol number.
    pub proto: u8,
}

impl Default for Ipv4Fields {
    fn default() -> Self {
        Self {
            src: Ipv4Addr::UNSPECIFIED,
            dst: Ipv4Addr::UNSPECIFIED,
            proto: 0,
        }
    }
}

/// IPv6 header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Ipv6Fields {
    /// Source address.
    pub src: Ipv6Addr,
    /// Destination address.
    pub dst: Ipv6Addr,
    /// Next header.
    pub next_header: u8,
}

impl Default for Ipv6Fields {
    fn default() -> Self {
        Self {
            src: Ipv6Addr::UNSPECIFIED,
            dst: Ipv6Addr::UNSPECIFIED,
            next_header: 0,
        }
    }
}

/// UDP or TCP ports.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct L4Fields {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
}

/// TCP fields.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct TcpFields {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// The flags byte (FIN 0x01, SYN 0x02, RST 0x04, ...).
    pub flags: u8,
}

/// VXLAN header fields.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct VxlanFields {
    /// The flags byte (0x08: the VNI is valid, RFC 7348 "I" flag).
    pub flags: u8,
    /// The 24-bit VNI.
    pub vni: u32,
}

/// One match item, in pattern order (outer to inner).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Item {
    /// `RTE_FLOW_ITEM_TYPE_ETH`.
    Eth(Masked<EthFields>),
    /// `RTE_FLOW_ITEM_TYPE_VLAN`.
    Vlan(Masked<VlanFields>),
    /// `RTE_FLOW_ITEM_TYPE_IPV4`.
    Ipv4(Masked<Ipv4Fields>),
    /// `RTE_FLOW_ITEM_TYPE_IPV6`.
    Ipv6(Masked<Ipv6Fields>),
    /// `RTE_FLOW_ITEM_TYPE_UDP`.
    Udp(Masked<L4Fields>),
    /// `RTE_FLOW_ITEM_TYPE_TCP`.
    Tcp(Masked<TcpFields>),
    /// `RTE_FLOW_ITEM_TYPE_VXLAN`.
    Vxlan(Masked<VxlanFields>),
}

/// Item kinds, for capability sets and error reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ItemKind {
    /// Ethernet.
    Eth,
    /// 802.1Q.
    Vlan,
    /// IPv4.
    Ipv4,
    /// IPv6.
    Ipv6,
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
    /// VXLAN.
    Vxlan,
    /// Not an item of its own: a TCP item whose mask covers the flags byte
    /// (`hdr.tcp_flags` of `rte_flow_item_tcp`) needs this besides [`ItemKind::Tcp`], because
    /// many NICs match TCP ports but not flags. [`Item::kind`] never returns it.
    TcpFlags,
}

impl Item {
    /// The kind of this item.
    pub fn kind(&self) -> ItemKind {
        match self {
            Item::Eth(_) => ItemKind::Eth,
            Item::Vlan(_) => ItemKind::Vlan,
            Item::Ipv4(_) => ItemKind::Ipv4,
            Item::Ipv6(_) => ItemKind::Ipv6,
            Item::Udp(_) => ItemKind::Udp,
            Item::Tcp(_) => ItemKind::Tcp,
            Item::Vxlan(_) => ItemKind::Vxlan,
        }
    }
}

/// The outer headers a VXLAN encapsulation pushes (IPv4 underlay).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VxlanEncap {
    /// Outer source MAC (our router MAC).
    pub eth_src: MacAddr,
    /// Outer destination MAC (the underlay next hop toward the remote VTEP).
    pub eth_dst: MacAddr,
    /// Local VTEP.
    pub ip_src: Ipv4Addr,
    /// Remote VTEP.
    pub ip_dst: Ipv4Addr,
    /// The VNI.
    pub vni: u32,
    /// Outer UDP source port (see [`vxlan_source_port`]).
    pub udp_src: u16,
}

/// The outer UDP source port for a VNI. Hardware encap pushes fixed bytes, so the port cannot
/// follow the inner flow's hash there; hardware and software both use this per-VNI value so
/// they produce identical packets. (Flow entropy in the outer header is a known gap.)
pub fn vxlan_source_port(vni: u32) -> u16 {
    49152 | (vni % 16384) as u16
}

/// Direction of a NAT64 translation action, where a target has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Nat64Direction {
    /// IPv6 in, IPv4 out.
    SixToFour,
    /// IPv4 in, IPv6 out.
    FourToSix,
}

/// A meter object as the IR names it: an index into the plan's meter list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MeterRef(pub u32);

/// One action, executed in list order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Action {
    /// Deliver to a receive queue (software).
    Queue(u16),
    /// Spread over receive queues.
    Rss(Vec<u16>),
    /// Drop.
    Drop,
    /// Count packets and bytes (queried per rule).
    Count,
    /// Attach a 32-bit mark delivered with the packet.
    Mark(u32),
    /// Continue in another group.
    Jump(u32),
    /// Police with a meter; red is dropped.
    Meter(MeterRef),
    /// Transmit on a port.
    Port(PortId),
    /// Set the source MAC.
    SetMacSrc(MacAddr),
    /// Set the destination MAC.
    SetMacDst(MacAddr),
    /// Decrement the IPv4 TTL / IPv6 hop limit (checksum updated).
    DecTtl,
    /// Set the IPv4 source address.
    SetIpv4Src(Ipv4Addr),
    /// Set the IPv4 destination address.
    SetIpv4Dst(Ipv4Addr),
    /// Set the IPv6 source address.
    SetIpv6Src(Ipv6Addr),
    /// Set the IPv6 destination address.
    SetIpv6Dst(Ipv6Addr),
    /// Set the TCP/UDP source port.
    SetTpSrc(u16),
    /// Set the TCP/UDP destination port.
    SetTpDst(u16),
    /// Push outer Ethernet/IPv4/UDP/VXLAN headers.
    VxlanEncap(VxlanEncap),
    /// Strip outer headers up to and including VXLAN.
    VxlanDecap,
    /// Push raw bytes.
    RawEncap(Vec<u8>),
    /// Strip this many bytes.
    RawDecap(u16),
    /// Stateless NAT64 header translation, where the target has it.
    Nat64(Nat64Direction),
}

/// Action kinds, for capability sets and error reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ActionKind {
    /// Queue.
    Queue,
    /// RSS.
    Rss,
    /// Drop.
    Drop,
    /// Count.
    Count,
    /// Mark.
    Mark,
    /// Jump.
    Jump,
    /// Meter.
    Meter,
    /// Port.
    Port,
    /// Set MAC source.
    SetMacSrc,
    /// Set MAC destination.
    SetMacDst,
    /// Decrement TTL.
    DecTtl,
    /// Set IPv4 source.
    SetIpv4Src,
    /// Set IPv4 destination.
    SetIpv4Dst,
    /// Set IPv6 source.
    SetIpv6Src,
    /// Set IPv6 destination.
    SetIpv6Dst,
    /// Set L4 source port.
    SetTpSrc,
    /// Set L4 destination port.
    SetTpDst,
    /// VXLAN encapsulation.
    VxlanEncap,
    /// VXLAN decapsulation.
    VxlanDecap,
    /// Raw encapsulation.
    RawEncap,
    /// Raw decapsulation.
    RawDecap,
    /// NAT64.
    Nat64,
}

impl ActionKind {
    /// Actions that rewrite headers (for the "no encap together with modify" limit some NICs have).
    pub fn is_modify(self) -> bool {
        matches!(
            self,
            ActionKind::SetMacSrc
                | ActionKind::SetMacDst
                | ActionKind::DecTtl
                | ActionKind::SetIpv4Src
                | ActionKind::SetIpv4Dst
                | ActionKind::SetIpv6Src
                | ActionKind::SetIpv6Dst
                | ActionKind::SetTpSrc
                | ActionKind::SetTpDst
        )
    }

    /// Actions that push or pop headers.
    pub fn is_encap(self) -> bool {
        matches!(
            self,
            ActionKind::VxlanEncap
                | ActionKind::VxlanDecap
                | ActionKind::RawEncap
                | ActionKind::RawDecap
        )
    }
}

impl Action {
    /// The kind of this action.
    pub fn kind(&self) -> ActionKind {
        match self {
            Action::Queue(_) => ActionKind::Queue,
            Action::Rss(_) => ActionKind::Rss,
            Action::Drop => ActionKind::Drop,
            Action::Count => ActionKind::Count,
            Action::Mark(_) => ActionKind::Mark,
            Action::Jump(_) => ActionKind::Jump,
            Action::Meter(_) => ActionKind::Meter,
            Action::Port(_) => ActionKind::Port,
            Action::SetMacSrc(_) => ActionKind::SetMacSrc,
            Action::SetMacDst(_) => ActionKind::SetMacDst,
            Action::DecTtl => ActionKind::DecTtl,
            Action::SetIpv4Src(_) => ActionKind::SetIpv4Src,
            Action::SetIpv4Dst(_) => ActionKind::SetIpv4Dst,
            Action::SetIpv6Src(_) => ActionKind::SetIpv6Src,
            Action::SetIpv6Dst(_) => ActionKind::SetIpv6Dst,
            Action::SetTpSrc(_) => ActionKind::SetTpSrc,
            Action::SetTpDst(_) => ActionKind::SetTpDst,
            Action::VxlanEncap(_) => ActionKind::VxlanEncap,
            Action::VxlanDecap => ActionKind::VxlanDecap,
            Action::RawEncap(_) => ActionKind::RawEncap,
            Action::RawDecap(_) => ActionKind::RawDecap,
            Action::Nat64(_) => ActionKind::Nat64,
        }
    }
}

/// Rule attributes.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Attr {
    /// Group (table).
    pub group: u32,
    /// Priority within the group: lower wins.
    pub priority: u32,
    /// Applies to received traffic.
    pub ingress: bool,
    /// Applies to transmitted traffic.
    pub egress: bool,
    /// E-switch (transfer) domain.
    pub transfer: bool,
}

/// One rule: where it is created, what it matches, what it does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Rule {
    /// The port the rule is created on.
    pub port: PortId,
    /// Attributes.
    pub attr: Attr,
    /// Match items, outer to inner. Empty matches everything.
    pub pattern: Vec<Item>,
    /// Actions, in order.
    pub actions: Vec<Action>,
}

/// Whether a packet context is decided: the mark value format shared by the compiler (which
/// emits `Mark`) and the software pipeline (which resumes from it).
///
/// A packet that reaches software with mark `m != 0` has had its ingress stage done in hardware
/// (port classification, VXLAN decap, VPC meter) and continues with the route lookup in VRF
/// table `m & 0x00ff_ffff`. Unmarked packets start from the beginning.
pub mod mark {
    /// The tag in the top byte that says "ingress done, resume in a VRF".
    pub const RESUME_IN_VRF: u32 = 0x0100_0000;

    /// The mark for "resume in VRF table `table`" (tables are below 2^24).
    pub fn resume_in_vrf(table: u32) -> u32 {
        RESUME_IN_VRF | (table & 0x00ff_ffff)
    }

    /// The VRF table a mark says to resume in, if it is one of ours.
    pub fn vrf_of(mark: u32) -> Option<u32> {
        (mark & 0xff00_0000 == RESUME_IN_VRF).then_some(mark & 0x00ff_ffff)
    }
}
