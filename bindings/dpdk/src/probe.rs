//! Capability probing: one `rte_flow_validate` per item kind, action kind and
//! attribute of interest, folded into a [`Caps`] with `source: Probed`.
//!
//! Validate says nothing about table sizes, so [`probe`] fills the limits
//! with conservative defaults: `max_groups` is [`DEFAULT_MAX_GROUPS`] only if a
//! group-1 rule and a `Jump` both validated (else 0: `net_tap` accepts a
//! group-1 attribute but has no jump, so its groups are unreachable), `max_rules` is [`DEFAULT_MAX_RULES`] (0 if
//! nothing validated) and `max_meters` is 0 (`rte_mtr` is not wrapped yet).
//! The agent learns the real limits from create failures.

use core::net::{Ipv4Addr, Ipv6Addr};
use std::collections::BTreeSet;
use std::fmt::Write as _;

use flow_offload::caps::{Caps, CapsSource, Profile};
use flow_offload::ir::{
    self, vxlan_source_port, Action, Attr, EthFields, Ipv4Fields, Ipv6Fields, Item, ItemKind,
    L4Fields, Masked, MeterRef, TcpFields, VlanFields, VxlanEncap, VxlanFields,
};
use flow_offload::model::{MacAddr, PortId};

use crate::{Errno, FlowError, Port};

/// Groups assumed usable when a group-1 rule validates.
pub const DEFAULT_MAX_GROUPS: u32 = 64;
/// Rules assumed to fit when anything validates.
pub const DEFAULT_MAX_RULES: u32 = 4096;
/// Priorities tried, in increasing order.
pub const PROBED_PRIORITIES: [u32; 4] = [1, 7, 63, 65535];

/// One validated rule and the driver's answer.
#[derive(Debug, Clone)]
pub struct ProbeAnswer {
    /// What the rule asks, e.g. `"match ipv4 dst prefix -> queue"`.
    pub what: &'static str,
    /// The rule validated.
    pub rule: ir::Rule,
    /// The driver's answer.
    pub result: Result<(), FlowError>,
}

/// The result of [`probe`].
#[derive(Debug, Clone)]
pub struct Probe {
    /// What the port accepts (see the module doc for the limits).
    pub caps: Caps,
    /// Every rule tried, in order.
    pub answers: Vec<ProbeAnswer>,
}

fn exact<T: Copy>(spec: T, mask: T) -> Masked<T> {
    Masked { spec, mask }
}

fn eth(ethertype: u16) -> Item {
    Item::Eth(exact(
        EthFields {
            ethertype,
            ..EthFields::default()
        },
        EthFields {
            ethertype: 0xffff,
            ..EthFields::default()
        },
    ))
}

fn ipv4_dst() -> Item {
    Item::Ipv4(exact(
        Ipv4Fields {
            dst: Ipv4Addr::new(10, 1, 2, 0),
            ..Ipv4Fields::default()
        },
        Ipv4Fields {
            dst: Ipv4Addr::new(255, 255, 255, 0),
            ..Ipv4Fields::default()
        },
    ))
}

fn ipv4_proto(proto: u8) -> Item {
    Item::Ipv4(exact(
        Ipv4Fields {
            proto,
            ..Ipv4Fields::default()
        },
        Ipv4Fields {
            proto: 0xff,
            ..Ipv4Fields::default()
        },
    ))
}

fn rule(attr: Attr, pattern: Vec<Item>, actions: Vec<Action>) -> ir::Rule {
    ir::Rule {
        port: PortId(0),
        attr,
        pattern,
        actions,
    }
}

fn ingress() -> Attr {
    Attr {
        ingress: true,
        ..Attr::default()
    }
}

fn base(actions: Vec<Action>) -> ir::Rule {
    rule(ingress(), vec![eth(0x0800), ipv4_dst()], actions)
}

fn encap() -> Action {
    Action::VxlanEncap(VxlanEncap {
        eth_src: MacAddr([2, 0, 0, 0, 0, 1]),
        eth_dst: MacAddr([2, 0, 0, 0, 0, 2]),
        ip_src: Ipv4Addr::new(192, 0, 2, 1),
        ip_dst: Ipv4Addr::new(192, 0, 2, 2),
        vni: 100,
        udp_src: vxlan_source_port(100),
    })
}

/// What a probe rule is for.
enum Purpose {
    Item(ItemKind),
    Action(ir::ActionKind),
    EncapWithModify,
    Group,
    Priority(u32),
}

fn rules() -> Vec<(&'static str, Purpose, ir::Rule)> {
    use ir::ActionKind as A;
    let q = || Action::Queue(ir::SOFTWARE_QUEUE);
    let mac = MacAddr([2, 0, 0, 0, 0, 9]);
    let v6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    let udp = Item::Udp(exact(
        L4Fields {
            dst_port: 4789,
            ..L4Fields::default()
        },
        L4Fields {
            dst_port: 0xffff,
            ..L4Fields::default()
        },
    ));
    let mut v = vec![
        (
            "match eth type -> queue",
            Purpose::Item(ItemKind::Eth),
            rule(ingress(), vec![eth(0x0800)], vec![q()]),
        ),
        (
            "match eth / vlan vid -> queue",
            Purpose::Item(ItemKind::Vlan),
            rule(
                ingress(),
                vec![
                    eth(0x8100),
                    Item::Vlan(exact(
                        VlanFields {
                            tci: 100,
                            ..VlanFields::default()
                        },
                        VlanFields {
                            tci: 0x0fff,
                            ..VlanFields::default()
                        },
                    )),
                ],
                vec![q()],
            ),
        ),
        (
            "match ipv4 dst prefix -> queue",
            Purpose::Item(ItemKind::Ipv4),
            base(vec![q()]),
        ),
        (
            "match ipv6 dst prefix -> queue",
            Purpose::Item(ItemKind::Ipv6),
            rule(
                ingress(),
                vec![
                    eth(0x86dd),
                    Item::Ipv6(exact(
                        Ipv6Fields {
                            dst: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0),
                            ..Ipv6Fields::default()
                        },
                        Ipv6Fields {
                            dst: Ipv6Addr::new(0xffff, 0xffff, 0, 0, 0, 0, 0, 0),
                            ..Ipv6Fields::default()
                        },
                    )),
                ],
                vec![q()],
            ),
        ),
        (
            "match ipv4 / udp dst port -> queue",
            Purpose::Item(ItemKind::Udp),
            rule(ingress(), vec![eth(0x0800), ipv4_proto(17), udp], vec![q()]),
        ),
        (
            "match ipv4 / tcp dst port -> queue",
            Purpose::Item(ItemKind::Tcp),
            rule(
                ingress(),
                vec![
                    eth(0x0800),
                    ipv4_proto(6),
                    Item::Tcp(exact(
                        TcpFields {
                            dst_port: 179,
                            ..TcpFields::default()
                        },
                        TcpFields {
                            dst_port: 0xffff,
                            ..TcpFields::default()
                        },
                    )),
                ],
                vec![q()],
            ),
        ),
        (
            "match ipv4 / tcp flags (FIN, not RST) -> queue",
            Purpose::Item(ItemKind::TcpFlags),
            rule(
                ingress(),
                vec![
                    eth(0x0800),
                    ipv4_proto(6),
                    Item::Tcp(exact(
                        TcpFields {
                            flags: 0x01,
                            ..TcpFields::default()
                        },
                        TcpFields {
                            flags: 0x05,
                            ..TcpFields::default()
                        },
                    )),
                ],
                vec![q()],
            ),
        ),
        (
            "match ipv4 / udp / vxlan vni -> queue",
            Purpose::Item(ItemKind::Vxlan),
            rule(
                ingress(),
                vec![
                    eth(0x0800),
                    ipv4_proto(17),
                    udp,
                    Item::Vxlan(exact(
                        VxlanFields {
                            flags: 0x08,
                            vni: 100,
                        },
                        VxlanFields {
                            flags: 0,
                            vni: 0x00ff_ffff,
                        },
                    )),
                ],
                vec![q()],
            ),
        ),
    ];
    let actions: [(&'static str, A, Vec<Action>); 21] = [
        ("eth/ipv4 -> queue", A::Queue, vec![q()]),
        ("eth/ipv4 -> rss", A::Rss, vec![Action::Rss(vec![0])]),
        ("eth/ipv4 -> drop", A::Drop, vec![Action::Drop]),
        (
            "eth/ipv4 -> count, queue",
            A::Count,
            vec![Action::Count, q()],
        ),
        (
            "eth/ipv4 -> mark, queue",
            A::Mark,
            vec![Action::Mark(1), q()],
        ),
        ("eth/ipv4 -> jump group 1", A::Jump, vec![Action::Jump(1)]),
        (
            "eth/ipv4 -> meter, queue",
            A::Meter,
            vec![Action::Meter(MeterRef(0)), q()],
        ),
        ("eth/ipv4 -> port", A::Port, vec![Action::Port(PortId(0))]),
        (
            "eth/ipv4 -> set mac src, queue",
            A::SetMacSrc,
            vec![Action::SetMacSrc(mac), q()],
        ),
        (
            "eth/ipv4 -> set mac dst, queue",
            A::SetMacDst,
            vec![Action::SetMacDst(mac), q()],
        ),
        (
            "eth/ipv4 -> dec ttl, queue",
            A::DecTtl,
            vec![Action::DecTtl, q()],
        ),
        (
            "eth/ipv4 -> set ipv4 src, queue",
            A::SetIpv4Src,
            vec![Action::SetIpv4Src(Ipv4Addr::new(10, 9, 9, 9)), q()],
        ),
        (
            "eth/ipv4 -> set ipv4 dst, queue",
            A::SetIpv4Dst,
            vec![Action::SetIpv4Dst(Ipv4Addr::new(10, 9, 9, 9)), q()],
        ),
        (
            "eth/ipv4 -> set ipv6 src, queue",
            A::SetIpv6Src,
            vec![Action::SetIpv6Src(v6), q()],
        ),
        (
            "eth/ipv4 -> set ipv6 dst, queue",
            A::SetIpv6Dst,
            vec![Action::SetIpv6Dst(v6), q()],
        ),
        (
            "eth/ipv4 -> set tp src, queue",
            A::SetTpSrc,
            vec![Action::SetTpSrc(1000), q()],
        ),
        (
            "eth/ipv4 -> set tp dst, queue",
            A::SetTpDst,
            vec![Action::SetTpDst(1000), q()],
        ),
        (
            "eth/ipv4 -> vxlan encap, queue",
            A::VxlanEncap,
            vec![encap(), q()],
        ),
        (
            "eth/ipv4 -> vxlan decap, queue",
            A::VxlanDecap,
            vec![Action::VxlanDecap, q()],
        ),
        (
            "eth/ipv4 -> raw encap, queue",
            A::RawEncap,
            vec![Action::RawEncap(vec![0; 14]), q()],
        ),
        (
            "eth/ipv4 -> raw decap, queue",
            A::RawDecap,
            vec![Action::RawDecap(14), q()],
        ),
    ];
    for (what, kind, acts) in actions {
        v.push((what, Purpose::Action(kind), base(acts)));
    }
    v.push((
        "eth/ipv4 -> set mac src, vxlan encap, queue",
        Purpose::EncapWithModify,
        base(vec![Action::SetMacSrc(mac), encap(), q()]),
    ));
    v.push((
        "group 1: eth/ipv4 -> queue",
        Purpose::Group,
        rule(
            Attr {
                group: 1,
                ..ingress()
            },
            vec![eth(0x0800), ipv4_dst()],
            vec![q()],
        ),
    ));
    for (what, priority) in [
        ("priority 1: eth/ipv4 -> queue", 1),
        ("priority 7: eth/ipv4 -> queue", 7),
        ("priority 63: eth/ipv4 -> queue", 63),
        ("priority 65535: eth/ipv4 -> queue", 65535),
    ] {
        v.push((
            what,
            Purpose::Priority(priority),
            rule(
                Attr {
                    priority,
                    ..ingress()
                },
                vec![eth(0x0800), ipv4_dst()],
                vec![q()],
            ),
        ));
    }
    v
}

/// Validates one representative rule per item kind, action kind, encap
/// together with a rewrite, group 1 and priorities [`PROBED_PRIORITIES`]
/// on `port`, and folds the answers into a [`Caps`] (`source: Probed`).
///
/// An item or action is in the caps iff its representative rule validated.
/// `priorities` is the highest accepted probed priority + 1 (1 if only
/// priority 0 rules validated). The table limits are defaults, not
/// measurements: see the module doc. `Nat64` is not probed (this crate has
/// no `rte_flow` translation for it, so it is never offloadable). If the port answers ENOSYS to
/// everything, the caps are those of [`Profile::None`] with `source: Probed`.
pub fn probe(port: &Port) -> Probe {
    let mut items = BTreeSet::new();
    let mut actions = BTreeSet::new();
    let mut encap_with_modify = false;
    let mut group = false;
    let mut priorities = 0;
    let mut answers = Vec::new();
    for (what, purpose, rule) in rules() {
        let result = port.flow_validate(&rule);
        if result.is_ok() {
            match purpose {
                Purpose::Item(k) => {
                    items.insert(k);
                }
                Purpose::Action(k) => {
                    actions.insert(k);
                }
                Purpose::EncapWithModify => encap_with_modify = true,
                Purpose::Group => group = true,
                Purpose::Priority(p) => priorities = priorities.max(p.saturating_add(1)),
            }
        }
        answers.push(ProbeAnswer { what, rule, result });
    }
    let all_nosys = answers
        .iter()
        .all(|a| matches!(&a.result, Err(e) if e.errno() == Some(Errno::NOSYS)));
    let anything = answers.iter().any(|a| a.result.is_ok());
    let jump = actions.contains(&ir::ActionKind::Jump);
    let caps = if all_nosys {
        Caps {
            source: CapsSource::Probed,
            ..Caps::profile(Profile::None)
        }
    } else {
        Caps {
            source: CapsSource::Probed,
            items,
            actions,
            encap_with_modify,
            priorities: if anything { priorities.max(1) } else { 0 },
            max_groups: if group && jump { DEFAULT_MAX_GROUPS } else { 0 },
            max_rules: if anything { DEFAULT_MAX_RULES } else { 0 },
            max_meters: 0,
        }
    };
    Probe { caps, answers }
}

impl Probe {
    /// A human table: what, offloadable yes/no, reason (errno and the
    /// refused part, in IR indices).
    pub fn table(&self) -> String {
        let w = self.answers.iter().map(|a| a.what.len()).max().unwrap_or(4);
        let mut s = String::new();
        let _ = writeln!(s, "{:<w$}  offload  reason", "what");
        for a in &self.answers {
            let (yes, reason) = match &a.result {
                Ok(()) => ("yes", String::new()),
                Err(e) => match (e.errno(), e.cause()) {
                    (Some(errno), Some(cause)) => ("no", format!("{errno}, {cause}")),
                    _ => ("no", e.to_string()),
                },
            };
            let _ = writeln!(s, "{:<w$}  {yes:<7}  {reason}", a.what);
        }
        s
    }
}
