//! Translation of [`flow_offload::ir::Rule`] into `rte_flow` arrays
//! ([`FlowSpec`]), and [`Port::flow_validate`] / [`Port::flow_create`] with
//! an RAII [`Flow`] handle.
//!
//! Storage discipline of [`FlowSpec`]: every C struct a pointer may point
//! into (item specs/masks, action confs, RSS queue lists, raw encap bytes,
//! VXLAN encap definitions) lives in a `Vec` that is completely filled
//! before any pointer into it is taken, and is never pushed to afterwards.
//! Moving a `Vec` does not move its heap buffer, so the `FlowSpec` itself
//! may be moved freely while the pointers stay valid.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use dpdk_sys as sys;
use flow_offload::ir::{self, Action, ActionKind, Item};

use crate::flow::{classify_cause, refusal, FlowErrorCause, FlowRefusal};
use crate::Port;

/// Why a rule could not be translated, validated or created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// The IR action has no `rte_flow` translation in this crate (DPDK
    /// 22.11 has no NAT64 action, for one).
    #[error("action {0:?} has no rte_flow translation")]
    Unsupported(ActionKind),
    /// A value does not fit the `rte_flow` field (e.g. a VNI above 24 bits).
    #[error("{what} #{index}: {reason}")]
    Invalid {
        /// `"pattern item"` or `"action"`.
        what: &'static str,
        /// Index into the IR rule's pattern or actions.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The driver refused the rule; indices in the cause are those of the
    /// IR rule's `pattern` / `actions`.
    #[error(transparent)]
    Refused(#[from] FlowRefusal),
}

impl FlowError {
    /// The driver's errno, if the driver refused the rule.
    pub fn errno(&self) -> Option<crate::Errno> {
        match self {
            Self::Refused(r) => Some(r.errno),
            _ => None,
        }
    }

    /// The driver's cause, if the driver refused the rule.
    pub fn cause(&self) -> Option<FlowErrorCause> {
        match self {
            Self::Refused(r) => Some(r.cause),
            _ => None,
        }
    }
}

/// The IANA VXLAN port, used as outer UDP destination by [`Action::VxlanEncap`].
pub const VXLAN_UDP_PORT: u16 = 4789;

/// Where an item's spec/mask pair lives (index of the spec; the mask is next).
#[derive(Debug, Clone, Copy)]
enum ItemSlot {
    Eth(usize),
    Vlan(usize),
    Ipv4(usize),
    Ipv6(usize),
    Udp(usize),
    Tcp(usize),
    Vxlan(usize),
}

/// Where an action's conf lives.
#[derive(Debug, Clone, Copy)]
enum ActionSlot {
    NoConf(sys::rte_flow_action_type),
    Queue(usize),
    Rss(usize),
    Count(usize),
    Mark(usize),
    Jump(usize),
    Meter(usize),
    PortId(usize),
    SetMac(sys::rte_flow_action_type, usize),
    SetIpv4(sys::rte_flow_action_type, usize),
    SetIpv6(sys::rte_flow_action_type, usize),
    SetTp(sys::rte_flow_action_type, usize),
    RawEncap(usize),
    RawDecap(usize),
    /// Index into `encap_def_slots`.
    VxlanEncap(usize),
}

/// An IR rule as `rte_flow` attr/pattern/actions arrays, owning every C
/// struct the arrays point into. Pattern item `i` and action `i` of the
/// arrays are pattern item `i` and action `i` of the IR rule (plus a final
/// END in each).
pub struct FlowSpec {
    attr: sys::rte_flow_attr,
    // --- storage, filled before any pointer is taken ---
    eth: Vec<sys::rte_flow_item_eth>,
    vlan: Vec<sys::rte_flow_item_vlan>,
    ipv4: Vec<sys::rte_flow_item_ipv4>,
    ipv6: Vec<sys::rte_flow_item_ipv6>,
    udp: Vec<sys::rte_flow_item_udp>,
    tcp: Vec<sys::rte_flow_item_tcp>,
    vxlan: Vec<sys::rte_flow_item_vxlan>,
    queue: Vec<sys::rte_flow_action_queue>,
    count: Vec<sys::rte_flow_action_count>,
    mark: Vec<sys::rte_flow_action_mark>,
    jump: Vec<sys::rte_flow_action_jump>,
    meter: Vec<sys::rte_flow_action_meter>,
    port_id: Vec<sys::rte_flow_action_port_id>,
    set_mac: Vec<sys::rte_flow_action_set_mac>,
    set_ipv4: Vec<sys::rte_flow_action_set_ipv4>,
    set_ipv6: Vec<sys::rte_flow_action_set_ipv6>,
    set_tp: Vec<sys::rte_flow_action_set_tp>,
    rss_queues: Vec<Vec<u16>>,
    raw_bytes: Vec<Vec<u8>>,
    raw_decap_sizes: Vec<usize>,
    // --- second stage: point into the storage above ---
    /// END-terminated definitions of VXLAN encaps, each with the index of
    /// the IR action it belongs to.
    encap_defs: Vec<(usize, Vec<sys::rte_flow_item>)>,
    rss: Vec<sys::rte_flow_action_rss>,
    raw_encap: Vec<sys::rte_flow_action_raw_encap>,
    raw_decap: Vec<sys::rte_flow_action_raw_decap>,
    vxlan_encap: Vec<sys::rte_flow_action_vxlan_encap>,
    // --- last: the arrays handed to rte_flow ---
    items: Vec<sys::rte_flow_item>,
    actions: Vec<sys::rte_flow_action>,
}

impl std::fmt::Debug for FlowSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let items: Vec<_> = self.items.iter().map(|i| i.type_).collect();
        let actions: Vec<_> = self.actions.iter().map(|a| a.type_).collect();
        f.debug_struct("FlowSpec")
            .field("attr", &self.attr)
            .field("item_types", &items)
            .field("action_types", &actions)
            .finish_non_exhaustive()
    }
}

fn be16(v: u16) -> sys::rte_be16_t {
    v.to_be()
}

fn be32_ip(a: std::net::Ipv4Addr) -> sys::rte_be32_t {
    u32::from(a).to_be()
}

/// The 24-bit VNI as its three network-order bytes.
fn vni_bytes(vni: u32) -> Option<[u8; 3]> {
    if vni > 0x00ff_ffff {
        return None;
    }
    let [_, a, b, c] = vni.to_be_bytes();
    Some([a, b, c])
}

fn eth_conv(f: &ir::EthFields) -> sys::rte_flow_item_eth {
    let mut e = sys::rte_flow_item_eth::default();
    e.__bindgen_anon_1.hdr = sys::rte_ether_hdr {
        dst_addr: sys::rte_ether_addr {
            addr_bytes: f.dst.0,
        },
        src_addr: sys::rte_ether_addr {
            addr_bytes: f.src.0,
        },
        ether_type: be16(f.ethertype),
    };
    e
}

fn vlan_conv(f: &ir::VlanFields) -> sys::rte_flow_item_vlan {
    let mut v = sys::rte_flow_item_vlan::default();
    v.__bindgen_anon_1.hdr = sys::rte_vlan_hdr {
        vlan_tci: be16(f.tci),
        eth_proto: be16(f.inner_type),
    };
    v
}

fn ipv4_conv(f: &ir::Ipv4Fields) -> sys::rte_flow_item_ipv4 {
    let mut v = sys::rte_flow_item_ipv4::default();
    v.hdr.src_addr = be32_ip(f.src);
    v.hdr.dst_addr = be32_ip(f.dst);
    v.hdr.next_proto_id = f.proto;
    v
}

fn ipv6_conv(f: &ir::Ipv6Fields) -> sys::rte_flow_item_ipv6 {
    let mut v = sys::rte_flow_item_ipv6::default();
    v.hdr.src_addr = sys::ipv6_bytes(f.src.octets());
    v.hdr.dst_addr = sys::ipv6_bytes(f.dst.octets());
    v.hdr.proto = f.next_header;
    v
}

fn udp_conv(f: &ir::L4Fields) -> sys::rte_flow_item_udp {
    let mut v = sys::rte_flow_item_udp::default();
    v.hdr.src_port = be16(f.src_port);
    v.hdr.dst_port = be16(f.dst_port);
    v
}

fn tcp_conv(f: &ir::TcpFields) -> sys::rte_flow_item_tcp {
    let mut v = sys::rte_flow_item_tcp::default();
    v.hdr.src_port = be16(f.src_port);
    v.hdr.dst_port = be16(f.dst_port);
    v.hdr.tcp_flags = f.flags;
    v
}

fn vxlan_conv(flags: u8, vni: [u8; 3]) -> sys::rte_flow_item_vxlan {
    let mut v = sys::rte_flow_item_vxlan::default();
    v.__bindgen_anon_1.__bindgen_anon_1 = sys::rte_flow_item_vxlan__bindgen_ty_1__bindgen_ty_1 {
        flags,
        rsvd0: [0; 3],
        vni,
        rsvd1: 0,
    };
    v
}

fn end_item() -> sys::rte_flow_item {
    sys::rte_flow_item {
        type_: sys::RTE_FLOW_ITEM_TYPE_END,
        spec: ptr::null(),
        last: ptr::null(),
        mask: ptr::null(),
    }
}

fn no_conf(type_: sys::rte_flow_action_type) -> sys::rte_flow_action {
    sys::rte_flow_action {
        type_,
        conf: ptr::null(),
    }
}

/// Push `x` onto `v`, returning its index.
fn push<T>(v: &mut Vec<T>, x: T) -> usize {
    v.push(x);
    v.len() - 1
}

fn cptr<T>(x: &T) -> *const c_void {
    ptr::from_ref(x).cast()
}

impl FlowSpec {
    /// Translate `rule` (its `port` is not consulted: the rule goes to the
    /// [`Port`] it is given to). Fails with [`FlowError::Unsupported`] for
    /// an action without translation and [`FlowError::Invalid`] for a value
    /// out of range; nothing is silently skipped.
    pub fn new(rule: &ir::Rule) -> Result<Self, FlowError> {
        let mut s = Self {
            attr: sys::rte_flow_attr {
                group: rule.attr.group,
                priority: rule.attr.priority,
                ..Default::default()
            },
            eth: Vec::new(),
            vlan: Vec::new(),
            ipv4: Vec::new(),
            ipv6: Vec::new(),
            udp: Vec::new(),
            tcp: Vec::new(),
            vxlan: Vec::new(),
            queue: Vec::new(),
            count: Vec::new(),
            mark: Vec::new(),
            jump: Vec::new(),
            meter: Vec::new(),
            port_id: Vec::new(),
            set_mac: Vec::new(),
            set_ipv4: Vec::new(),
            set_ipv6: Vec::new(),
            set_tp: Vec::new(),
            rss_queues: Vec::new(),
            raw_bytes: Vec::new(),
            raw_decap_sizes: Vec::new(),
            encap_defs: Vec::new(),
            rss: Vec::new(),
            raw_encap: Vec::new(),
            raw_decap: Vec::new(),
            vxlan_encap: Vec::new(),
            items: Vec::new(),
            actions: Vec::new(),
        };
        s.attr.set_ingress(u32::from(rule.attr.ingress));
        s.attr.set_egress(u32::from(rule.attr.egress));
        s.attr.set_transfer(u32::from(rule.attr.transfer));

        // Stage 1: plain values into storage, remembering where they went.
        let mut item_slots = Vec::with_capacity(rule.pattern.len());
        for (index, item) in rule.pattern.iter().enumerate() {
            let slot = match item {
                Item::Eth(m) => {
                    let i = push(&mut s.eth, eth_conv(&m.spec));
                    s.eth.push(eth_conv(&m.mask));
                    ItemSlot::Eth(i)
                }
                Item::Vlan(m) => {
                    let i = push(&mut s.vlan, vlan_conv(&m.spec));
                    s.vlan.push(vlan_conv(&m.mask));
                    ItemSlot::Vlan(i)
                }
                Item::Ipv4(m) => {
                    let i = push(&mut s.ipv4, ipv4_conv(&m.spec));
                    s.ipv4.push(ipv4_conv(&m.mask));
                    ItemSlot::Ipv4(i)
                }
                Item::Ipv6(m) => {
                    let i = push(&mut s.ipv6, ipv6_conv(&m.spec));
                    s.ipv6.push(ipv6_conv(&m.mask));
                    ItemSlot::Ipv6(i)
                }
                Item::Udp(m) => {
                    let i = push(&mut s.udp, udp_conv(&m.spec));
                    s.udp.push(udp_conv(&m.mask));
                    ItemSlot::Udp(i)
                }
                Item::Tcp(m) => {
                    let i = push(&mut s.tcp, tcp_conv(&m.spec));
                    s.tcp.push(tcp_conv(&m.mask));
                    ItemSlot::Tcp(i)
                }
                Item::Vxlan(m) => {
                    let bad = FlowError::Invalid {
                        what: "pattern item",
                        index,
                        reason: "VNI above 24 bits",
                    };
                    let spec = vni_bytes(m.spec.vni).ok_or(bad.clone())?;
                    let mask = vni_bytes(m.mask.vni).ok_or(bad)?;
                    let i = push(&mut s.vxlan, vxlan_conv(m.spec.flags, spec));
                    s.vxlan.push(vxlan_conv(m.mask.flags, mask));
                    ItemSlot::Vxlan(i)
                }
            };
            item_slots.push(slot);
        }

        let mut action_slots = Vec::with_capacity(rule.actions.len());
        // Per VXLAN encap: (IR action index, eth, ipv4, udp, vxlan spec slots).
        let mut encap_slots: Vec<(usize, [usize; 4])> = Vec::new();
        for (index, action) in rule.actions.iter().enumerate() {
            let invalid = |reason| FlowError::Invalid {
                what: "action",
                index,
                reason,
            };
            let slot = match action {
                Action::Queue(q) => {
                    ActionSlot::Queue(push(&mut s.queue, sys::rte_flow_action_queue { index: *q }))
                }
                Action::Rss(qs) => {
                    if qs.is_empty() {
                        return Err(invalid("RSS over no queue"));
                    }
                    if u32::try_from(qs.len()).is_err() {
                        return Err(invalid("too many RSS queues"));
                    }
                    ActionSlot::Rss(push(&mut s.rss_queues, qs.clone()))
                }
                Action::Drop => ActionSlot::NoConf(sys::RTE_FLOW_ACTION_TYPE_DROP),
                Action::Count => {
                    ActionSlot::Count(push(&mut s.count, sys::rte_flow_action_count { id: 0 }))
                }
                Action::Mark(id) => {
                    ActionSlot::Mark(push(&mut s.mark, sys::rte_flow_action_mark { id: *id }))
                }
                Action::Jump(group) => ActionSlot::Jump(push(
                    &mut s.jump,
                    sys::rte_flow_action_jump { group: *group },
                )),
                Action::Meter(m) => ActionSlot::Meter(push(
                    &mut s.meter,
                    sys::rte_flow_action_meter { mtr_id: m.0 },
                )),
                Action::Port(p) => {
                    let mut conf = sys::rte_flow_action_port_id::default();
                    conf.set_original(0);
                    conf.id = u32::from(p.0);
                    ActionSlot::PortId(push(&mut s.port_id, conf))
                }
                Action::SetMacSrc(mac) | Action::SetMacDst(mac) => {
                    let ty = if matches!(action, Action::SetMacSrc(_)) {
                        sys::RTE_FLOW_ACTION_TYPE_SET_MAC_SRC
                    } else {
                        sys::RTE_FLOW_ACTION_TYPE_SET_MAC_DST
                    };
                    let i = push(
                        &mut s.set_mac,
                        sys::rte_flow_action_set_mac { mac_addr: mac.0 },
                    );
                    ActionSlot::SetMac(ty, i)
                }
                Action::DecTtl => ActionSlot::NoConf(sys::RTE_FLOW_ACTION_TYPE_DEC_TTL),
                Action::SetIpv4Src(a) | Action::SetIpv4Dst(a) => {
                    let ty = if matches!(action, Action::SetIpv4Src(_)) {
                        sys::RTE_FLOW_ACTION_TYPE_SET_IPV4_SRC
                    } else {
                        sys::RTE_FLOW_ACTION_TYPE_SET_IPV4_DST
                    };
                    let i = push(
                        &mut s.set_ipv4,
                        sys::rte_flow_action_set_ipv4 {
                            ipv4_addr: be32_ip(*a),
                        },
                    );
                    ActionSlot::SetIpv4(ty, i)
                }
                Action::SetIpv6Src(a) | Action::SetIpv6Dst(a) => {
                    let ty = if matches!(action, Action::SetIpv6Src(_)) {
                        sys::RTE_FLOW_ACTION_TYPE_SET_IPV6_SRC
                    } else {
                        sys::RTE_FLOW_ACTION_TYPE_SET_IPV6_DST
                    };
                    let i = push(
                        &mut s.set_ipv6,
                        sys::rte_flow_action_set_ipv6 {
                            ipv6_addr: sys::ipv6_bytes(a.octets()),
                        },
                    );
                    ActionSlot::SetIpv6(ty, i)
                }
                Action::SetTpSrc(p) | Action::SetTpDst(p) => {
                    let ty = if matches!(action, Action::SetTpSrc(_)) {
                        sys::RTE_FLOW_ACTION_TYPE_SET_TP_SRC
                    } else {
                        sys::RTE_FLOW_ACTION_TYPE_SET_TP_DST
                    };
                    let i = push(
                        &mut s.set_tp,
                        sys::rte_flow_action_set_tp { port: be16(*p) },
                    );
                    ActionSlot::SetTp(ty, i)
                }
                Action::VxlanEncap(e) => {
                    let vni = vni_bytes(e.vni).ok_or(invalid("VNI above 24 bits"))?;
                    let eth = push(
                        &mut s.eth,
                        eth_conv(&ir::EthFields {
                            dst: e.eth_dst,
                            src: e.eth_src,
                            ethertype: 0x0800,
                        }),
                    );
                    let mut ip = ipv4_conv(&ir::Ipv4Fields {
                        src: e.ip_src,
                        dst: e.ip_dst,
                        proto: 17,
                    });
                    ip.hdr.__bindgen_anon_1.version_ihl = 0x45;
                    ip.hdr.time_to_live = 64;
                    let ip = push(&mut s.ipv4, ip);
                    let udp = push(
                        &mut s.udp,
                        udp_conv(&ir::L4Fields {
                            src_port: e.udp_src,
                            dst_port: VXLAN_UDP_PORT,
                        }),
                    );
                    let vx = push(&mut s.vxlan, vxlan_conv(0x08, vni));
                    encap_slots.push((index, [eth, ip, udp, vx]));
                    ActionSlot::VxlanEncap(encap_slots.len() - 1)
                }
                Action::VxlanDecap => ActionSlot::NoConf(sys::RTE_FLOW_ACTION_TYPE_VXLAN_DECAP),
                Action::RawEncap(bytes) => {
                    if bytes.is_empty() {
                        return Err(invalid("raw encap of no bytes"));
                    }
                    ActionSlot::RawEncap(push(&mut s.raw_bytes, bytes.clone()))
                }
                Action::RawDecap(n) => {
                    ActionSlot::RawDecap(push(&mut s.raw_decap_sizes, usize::from(*n)))
                }
                Action::Nat64(_) => return Err(FlowError::Unsupported(action.kind())),
            };
            action_slots.push(slot);
        }

        // Stage 2: structs pointing into the (now final) storage.
        s.rss = s
            .rss_queues
            .iter()
            .map(|qs| sys::rte_flow_action_rss {
                func: sys::RTE_ETH_HASH_FUNCTION_DEFAULT,
                level: 0,
                types: 0,
                key_len: 0,
                queue_num: u32::try_from(qs.len()).unwrap_or(u32::MAX),
                key: ptr::null(),
                queue: qs.as_ptr(),
            })
            .collect();
        s.raw_encap = s
            .raw_bytes
            .iter()
            .map(|b| sys::rte_flow_action_raw_encap {
                // DPDK reads, never writes, the encap data.
                data: b.as_ptr().cast_mut(),
                preserve: ptr::null_mut(),
                size: b.len(),
            })
            .collect();
        s.raw_decap = s
            .raw_decap_sizes
            .iter()
            .map(|&size| sys::rte_flow_action_raw_decap {
                data: ptr::null_mut(),
                size,
            })
            .collect();
        s.encap_defs = encap_slots
            .iter()
            .map(|&(index, [eth, ip, udp, vx])| {
                let it = |type_, spec: *const c_void| sys::rte_flow_item {
                    type_,
                    spec,
                    last: ptr::null(),
                    mask: ptr::null(),
                };
                let def = vec![
                    it(sys::RTE_FLOW_ITEM_TYPE_ETH, cptr(&s.eth[eth])),
                    it(sys::RTE_FLOW_ITEM_TYPE_IPV4, cptr(&s.ipv4[ip])),
                    it(sys::RTE_FLOW_ITEM_TYPE_UDP, cptr(&s.udp[udp])),
                    it(sys::RTE_FLOW_ITEM_TYPE_VXLAN, cptr(&s.vxlan[vx])),
                    end_item(),
                ];
                (index, def)
            })
            .collect();
        s.vxlan_encap = s
            .encap_defs
            .iter()
            .map(|(_, def)| sys::rte_flow_action_vxlan_encap {
                // DPDK reads, never writes, the definition.
                definition: def.as_ptr().cast_mut(),
            })
            .collect();

        // Stage 3: the arrays themselves, END-terminated.
        s.items = item_slots
            .iter()
            .map(|slot| {
                let (type_, spec, mask) = match *slot {
                    ItemSlot::Eth(i) => (
                        sys::RTE_FLOW_ITEM_TYPE_ETH,
                        cptr(&s.eth[i]),
                        cptr(&s.eth[i + 1]),
                    ),
                    ItemSlot::Vlan(i) => (
                        sys::RTE_FLOW_ITEM_TYPE_VLAN,
                        cptr(&s.vlan[i]),
                        cptr(&s.vlan[i + 1]),
                    ),
                    ItemSlot::Ipv4(i) => (
                        sys::RTE_FLOW_ITEM_TYPE_IPV4,
                        cptr(&s.ipv4[i]),
                        cptr(&s.ipv4[i + 1]),
                    ),
                    ItemSlot::Ipv6(i) => (
                        sys::RTE_FLOW_ITEM_TYPE_IPV6,
                        cptr(&s.ipv6[i]),
                        cptr(&s.ipv6[i + 1]),
                    ),
                    ItemSlot::Udp(i) => (
                        sys::RTE_FLOW_ITEM_TYPE_UDP,
                        cptr(&s.udp[i]),
                        cptr(&s.udp[i + 1]),
                    ),
                    ItemSlot::Tcp(i) => (
                        sys::RTE_FLOW_ITEM_TYPE_TCP,
                        cptr(&s.tcp[i]),
                        cptr(&s.tcp[i + 1]),
                    ),
                    ItemSlot::Vxlan(i) => (
                        sys::RTE_FLOW_ITEM_TYPE_VXLAN,
                        cptr(&s.vxlan[i]),
                        cptr(&s.vxlan[i + 1]),
                    ),
                };
                item3(type_, spec, mask)
            })
            .chain(std::iter::once(end_item()))
            .collect();
        s.actions = action_slots
            .iter()
            .map(|slot| {
                let with = |type_, conf| sys::rte_flow_action { type_, conf };
                match *slot {
                    ActionSlot::NoConf(ty) => no_conf(ty),
                    ActionSlot::Queue(i) => {
                        with(sys::RTE_FLOW_ACTION_TYPE_QUEUE, cptr(&s.queue[i]))
                    }
                    ActionSlot::Rss(i) => with(sys::RTE_FLOW_ACTION_TYPE_RSS, cptr(&s.rss[i])),
                    ActionSlot::Count(i) => {
                        with(sys::RTE_FLOW_ACTION_TYPE_COUNT, cptr(&s.count[i]))
                    }
                    ActionSlot::Mark(i) => with(sys::RTE_FLOW_ACTION_TYPE_MARK, cptr(&s.mark[i])),
                    ActionSlot::Jump(i) => with(sys::RTE_FLOW_ACTION_TYPE_JUMP, cptr(&s.jump[i])),
                    ActionSlot::Meter(i) => {
                        with(sys::RTE_FLOW_ACTION_TYPE_METER, cptr(&s.meter[i]))
                    }
                    ActionSlot::PortId(i) => {
                        with(sys::RTE_FLOW_ACTION_TYPE_PORT_ID, cptr(&s.port_id[i]))
                    }
                    ActionSlot::SetMac(ty, i) => with(ty, cptr(&s.set_mac[i])),
                    ActionSlot::SetIpv4(ty, i) => with(ty, cptr(&s.set_ipv4[i])),
                    ActionSlot::SetIpv6(ty, i) => with(ty, cptr(&s.set_ipv6[i])),
                    ActionSlot::SetTp(ty, i) => with(ty, cptr(&s.set_tp[i])),
                    ActionSlot::RawEncap(i) => {
                        with(sys::RTE_FLOW_ACTION_TYPE_RAW_ENCAP, cptr(&s.raw_encap[i]))
                    }
                    ActionSlot::RawDecap(i) => {
                        with(sys::RTE_FLOW_ACTION_TYPE_RAW_DECAP, cptr(&s.raw_decap[i]))
                    }
                    ActionSlot::VxlanEncap(i) => with(
                        sys::RTE_FLOW_ACTION_TYPE_VXLAN_ENCAP,
                        cptr(&s.vxlan_encap[i]),
                    ),
                }
            })
            .chain(std::iter::once(no_conf(sys::RTE_FLOW_ACTION_TYPE_END)))
            .collect();
        Ok(s)
    }

    /// The attributes.
    pub fn attr(&self) -> &sys::rte_flow_attr {
        &self.attr
    }

    /// The END-terminated pattern (one entry per IR item, then END).
    pub fn items(&self) -> &[sys::rte_flow_item] {
        &self.items
    }

    /// The END-terminated actions (one entry per IR action, then END).
    pub fn actions(&self) -> &[sys::rte_flow_action] {
        &self.actions
    }

    /// Resolve a driver error's cause pointer to IR indices; a pointer into
    /// a VXLAN encap definition names the encap action (as its conf).
    fn cause_of(&self, ty: sys::rte_flow_error_type, cause: *const c_void) -> FlowErrorCause {
        let c = classify_cause(ty, cause, &self.items, &self.actions);
        // The END entries are not IR items/actions.
        let c = match c {
            FlowErrorCause::Item {
                index: Some(i),
                part,
            } if i >= self.items.len() - 1 => FlowErrorCause::Item { index: None, part },
            FlowErrorCause::Action {
                index: Some(i),
                conf,
            } if i >= self.actions.len() - 1 => FlowErrorCause::Action { index: None, conf },
            other => other,
        };
        let unresolved = matches!(
            c,
            FlowErrorCause::Item { index: None, .. } | FlowErrorCause::Action { index: None, .. }
        );
        if !unresolved || cause.is_null() {
            return c;
        }
        for (index, def) in &self.encap_defs {
            let hit = def.iter().any(|it| {
                cptr(it) == cause || it.spec == cause || it.mask == cause || it.last == cause
            });
            if hit {
                return FlowErrorCause::Action {
                    index: Some(*index),
                    conf: true,
                };
            }
        }
        c
    }

    fn call(
        &self,
        f: impl FnOnce(
            *const sys::rte_flow_attr,
            *const sys::rte_flow_item,
            *const sys::rte_flow_action,
            *mut sys::rte_flow_error,
        ) -> i32,
    ) -> Result<(), FlowRefusal> {
        let mut err = sys::rte_flow_error {
            type_: sys::RTE_FLOW_ERROR_TYPE_NONE,
            cause: ptr::null(),
            message: ptr::null(),
        };
        let ret = f(
            &self.attr,
            self.items.as_ptr(),
            self.actions.as_ptr(),
            &mut err,
        );
        if ret >= 0 {
            return Ok(());
        }
        Err(refusal(ret, &err, self.cause_of(err.type_, err.cause)))
    }
}

fn item3(
    type_: sys::rte_flow_item_type,
    spec: *const c_void,
    mask: *const c_void,
) -> sys::rte_flow_item {
    sys::rte_flow_item {
        type_,
        spec,
        last: ptr::null(),
        mask,
    }
}

/// An installed rule; `rte_flow_destroy` on drop. Borrows its port, so it
/// cannot outlive it (the port closes only after every flow is gone).
#[derive(Debug)]
pub struct Flow<'port> {
    port_id: u16,
    raw: NonNull<sys::rte_flow>,
    _port: PhantomData<&'port Port<'port>>,
}

impl Flow<'_> {
    /// The raw handle (for queries).
    pub fn as_ptr(&self) -> *mut sys::rte_flow {
        self.raw.as_ptr()
    }

    /// Reads the rule's `COUNT` action: (packets, bytes) since creation (the counter is not
    /// reset). The rule must carry a `COUNT` action; drivers answer ENOTSUP otherwise.
    pub fn query_count(&self) -> Result<(u64, u64), FlowRefusal> {
        let action = sys::rte_flow_action {
            type_: sys::RTE_FLOW_ACTION_TYPE_COUNT,
            conf: ptr::null(),
        };
        let mut data = sys::rte_flow_query_count::default();
        let mut err = sys::rte_flow_error {
            type_: sys::RTE_FLOW_ERROR_TYPE_NONE,
            cause: ptr::null(),
            message: ptr::null(),
        };
        // SAFETY: `raw` is a live rule of this open port; `action`, `data` and `err`
        // live across the call; COUNT's query data is an rte_flow_query_count.
        let ret = unsafe {
            sys::rte_flow_query(
                self.port_id,
                self.raw.as_ptr(),
                &action,
                (&mut data as *mut sys::rte_flow_query_count).cast(),
                &mut err,
            )
        };
        if ret < 0 {
            return Err(refusal(
                ret,
                &err,
                classify_cause(err.type_, err.cause, &[], &[]),
            ));
        }
        Ok((data.hits, data.bytes))
    }

    /// Destroy now, reporting the driver's error (drop ignores it).
    pub fn destroy(self) -> Result<(), FlowRefusal> {
        let r = self.destroy_raw();
        std::mem::forget(self);
        r
    }

    fn destroy_raw(&self) -> Result<(), FlowRefusal> {
        let mut err = sys::rte_flow_error {
            type_: sys::RTE_FLOW_ERROR_TYPE_NONE,
            cause: ptr::null(),
            message: ptr::null(),
        };
        // SAFETY: `raw` came from rte_flow_create on this port, which is
        // still open (borrowed), and is destroyed exactly once (drop or
        // `destroy`, which forgets `self`).
        let ret = unsafe { sys::rte_flow_destroy(self.port_id, self.raw.as_ptr(), &mut err) };
        if ret < 0 {
            return Err(refusal(
                ret,
                &err,
                classify_cause(err.type_, err.cause, &[], &[]),
            ));
        }
        Ok(())
    }
}

impl Drop for Flow<'_> {
    fn drop(&mut self) {
        let _ = self.destroy_raw();
    }
}

impl<'pool> Port<'pool> {
    /// Ask the driver whether it would accept the IR rule
    /// (`rte_flow_validate`); nothing is installed.
    pub fn flow_validate(&self, rule: &ir::Rule) -> Result<(), FlowError> {
        let spec = FlowSpec::new(rule)?;
        self.flow_validate_spec(&spec)
    }

    /// [`Port::flow_validate`] for an already translated rule.
    pub fn flow_validate_spec(&self, spec: &FlowSpec) -> Result<(), FlowError> {
        let id = self.id();
        spec.call(|attr, items, actions, err| {
            // SAFETY: attr and END-terminated arrays (with everything they
            // point into) are owned by `spec`, alive for the call; `err` is a
            // valid out-pointer; validate installs nothing.
            unsafe { sys::rte_flow_validate(id, attr, items, actions, err) }
        })?;
        Ok(())
    }

    /// Install the IR rule (`rte_flow_create`); it is destroyed when the
    /// returned [`Flow`] drops.
    pub fn flow_create(&self, rule: &ir::Rule) -> Result<Flow<'_>, FlowError> {
        let spec = FlowSpec::new(rule)?;
        self.flow_create_spec(&spec)
    }

    /// [`Port::flow_create`] for an already translated rule. DPDK copies
    /// what it needs, so `spec` may be dropped after the call.
    pub fn flow_create_spec(&self, spec: &FlowSpec) -> Result<Flow<'_>, FlowError> {
        let id = self.id();
        let mut raw: *mut sys::rte_flow = ptr::null_mut();
        spec.call(|attr, items, actions, err| {
            // SAFETY: as for validate; the returned handle is owned by the
            // `Flow` built below.
            raw = unsafe { sys::rte_flow_create(id, attr, items, actions, err) };
            if raw.is_null() {
                // rte_flow_create reports through rte_errno.
                // SAFETY: reads this thread's rte_errno.
                let e = unsafe { sys::dpdk_sys_errno() };
                -(if e > 0 { e } else { sys::EINVAL as i32 })
            } else {
                0
            }
        })?;
        let raw = NonNull::new(raw).ok_or(FlowError::Invalid {
            what: "action",
            index: 0,
            reason: "rte_flow_create returned NULL without error",
        })?;
        Ok(Flow {
            port_id: id,
            raw,
            _port: PhantomData,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use flow_offload::ir::{Attr, EthFields, Ipv4Fields, Masked, Rule, VxlanEncap};
    use flow_offload::model::{MacAddr, PortId};
    use std::net::Ipv4Addr;

    fn rule(pattern: Vec<Item>, actions: Vec<Action>) -> Rule {
        Rule {
            port: PortId(0),
            attr: Attr {
                ingress: true,
                ..Attr::default()
            },
            pattern,
            actions,
        }
    }

    #[test]
    fn arrays_point_into_owned_storage_in_network_order() {
        let r = rule(
            vec![
                Item::Eth(Masked {
                    spec: EthFields {
                        ethertype: 0x0800,
                        ..EthFields::default()
                    },
                    mask: EthFields {
                        ethertype: 0xffff,
                        ..EthFields::default()
                    },
                }),
                Item::Ipv4(Masked {
                    spec: Ipv4Fields {
                        dst: Ipv4Addr::new(10, 1, 2, 0),
                        ..Ipv4Fields::default()
                    },
                    mask: Ipv4Fields {
                        dst: Ipv4Addr::new(255, 255, 255, 0),
                        ..Ipv4Fields::default()
                    },
                }),
            ],
            vec![
                Action::SetTpDst(0x1234),
                Action::VxlanEncap(VxlanEncap {
                    eth_src: MacAddr([2, 0, 0, 0, 0, 1]),
                    eth_dst: MacAddr([2, 0, 0, 0, 0, 2]),
                    ip_src: Ipv4Addr::new(192, 0, 2, 1),
                    ip_dst: Ipv4Addr::new(192, 0, 2, 2),
                    vni: 0x0a0b0c,
                    udp_src: 50000,
                }),
                Action::Rss(vec![0, 1]),
                Action::Queue(3),
            ],
        );
        let spec = FlowSpec::new(&r).unwrap();
        // Moving the spec keeps every pointer valid.
        let spec = Box::new(spec);
        assert_eq!(spec.items().len(), 3);
        assert_eq!(spec.actions().len(), 5);
        assert_eq!(spec.items()[2].type_, sys::RTE_FLOW_ITEM_TYPE_END);
        assert_eq!(spec.actions()[4].type_, sys::RTE_FLOW_ACTION_TYPE_END);
        // SAFETY: (test) the pointers were built from spec's storage.
        let ip: &sys::rte_flow_item_ipv4 = unsafe { &*spec.items()[1].spec.cast() };
        assert_eq!(ip.hdr.dst_addr.to_ne_bytes(), [10, 1, 2, 0]);
        // SAFETY: (test) as above.
        let ip_mask: &sys::rte_flow_item_ipv4 = unsafe { &*spec.items()[1].mask.cast() };
        assert_eq!(ip_mask.hdr.dst_addr.to_ne_bytes(), [255, 255, 255, 0]);
        // SAFETY: (test) as above.
        let tp: &sys::rte_flow_action_set_tp = unsafe { &*spec.actions()[0].conf.cast() };
        assert_eq!(tp.port.to_ne_bytes(), [0x12, 0x34]);
        // SAFETY: (test) as above.
        let enc: &sys::rte_flow_action_vxlan_encap = unsafe { &*spec.actions()[1].conf.cast() };
        // SAFETY: (test) END-terminated 5-entry definition built by FlowSpec.
        let def = unsafe { std::slice::from_raw_parts(enc.definition, 5) };
        let types: Vec<_> = def.iter().map(|i| i.type_).collect();
        assert_eq!(
            types,
            [
                sys::RTE_FLOW_ITEM_TYPE_ETH,
                sys::RTE_FLOW_ITEM_TYPE_IPV4,
                sys::RTE_FLOW_ITEM_TYPE_UDP,
                sys::RTE_FLOW_ITEM_TYPE_VXLAN,
                sys::RTE_FLOW_ITEM_TYPE_END
            ]
        );
        // SAFETY: (test) as above.
        let vx: &sys::rte_flow_item_vxlan = unsafe { &*def[3].spec.cast() };
        // SAFETY: (test) reading the plain-bytes view of the union.
        let vni = unsafe { vx.__bindgen_anon_1.__bindgen_anon_1.vni };
        assert_eq!(vni, [0x0a, 0x0b, 0x0c]);
        // SAFETY: (test) as above.
        let udp: &sys::rte_flow_item_udp = unsafe { &*def[2].spec.cast() };
        assert_eq!(udp.hdr.dst_port.to_ne_bytes(), 4789u16.to_be_bytes());
        // SAFETY: (test) as above.
        let rss: &sys::rte_flow_action_rss = unsafe { &*spec.actions()[2].conf.cast() };
        // SAFETY: (test) queue points at the 2 owned queue ids.
        let qs = unsafe { std::slice::from_raw_parts(rss.queue, 2) };
        assert_eq!(qs, [0, 1]);

        // A cause pointer into the encap definition names the encap action.
        assert_eq!(
            spec.cause_of(sys::RTE_FLOW_ERROR_TYPE_ITEM_SPEC, def[1].spec),
            FlowErrorCause::Action {
                index: Some(1),
                conf: true
            }
        );
        assert_eq!(
            spec.cause_of(sys::RTE_FLOW_ERROR_TYPE_ACTION, cptr(&spec.actions()[0])),
            FlowErrorCause::Action {
                index: Some(0),
                conf: false
            }
        );
    }

    #[test]
    fn every_action_translates_or_is_typed_unsupported() {
        use flow_offload::ir::{MeterRef, Nat64Direction};
        let all = vec![
            Action::Queue(0),
            Action::Rss(vec![0]),
            Action::Drop,
            Action::Count,
            Action::Mark(1),
            Action::Jump(2),
            Action::Meter(MeterRef(3)),
            Action::Port(PortId(1)),
            Action::SetMacSrc(MacAddr([1; 6])),
            Action::SetMacDst(MacAddr([2; 6])),
            Action::DecTtl,
            Action::SetIpv4Src(Ipv4Addr::LOCALHOST),
            Action::SetIpv4Dst(Ipv4Addr::LOCALHOST),
            Action::SetIpv6Src(std::net::Ipv6Addr::LOCALHOST),
            Action::SetIpv6Dst(std::net::Ipv6Addr::LOCALHOST),
            Action::SetTpSrc(1),
            Action::SetTpDst(2),
            Action::VxlanDecap,
            Action::RawEncap(vec![1, 2, 3]),
            Action::RawDecap(14),
        ];
        let spec = FlowSpec::new(&rule(vec![], all.clone())).unwrap();
        assert_eq!(spec.actions().len(), all.len() + 1);
        // SAFETY: (test) built by FlowSpec.
        let m: &sys::rte_flow_action_meter = unsafe { &*spec.actions()[6].conf.cast() };
        assert_eq!(m.mtr_id, 3);
        let err = FlowSpec::new(&rule(
            vec![],
            vec![Action::Drop, Action::Nat64(Nat64Direction::SixToFour)],
        ))
        .unwrap_err();
        assert_eq!(err, FlowError::Unsupported(ActionKind::Nat64));
        let err = FlowSpec::new(&rule(
            vec![],
            vec![Action::VxlanEncap(VxlanEncap {
                eth_src: MacAddr([0; 6]),
                eth_dst: MacAddr([0; 6]),
                ip_src: Ipv4Addr::UNSPECIFIED,
                ip_dst: Ipv4Addr::UNSPECIFIED,
                vni: 1 << 24,
                udp_src: 1,
            })],
        ))
        .unwrap_err();
        assert!(matches!(err, FlowError::Invalid { index: 0, .. }));
    }
}
