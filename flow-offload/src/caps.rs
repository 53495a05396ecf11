//! What a target accepts: match items, actions, combinations and table limits.
//!
//! Named profiles describe classes of NIC; the DPU agent builds a probed [`Caps`] per port from
//! `rte_flow_validate` answers (same type, `source: Probed`).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::ir::{ActionKind, Item, ItemKind, Rule};

/// Where a capability set came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CapsSource {
    /// A named profile.
    Profile(Profile),
    /// Probed on a real port by the DPU agent.
    Probed,
}

/// The named profiles. No profile offers the stateless `Nat64` action yet: stateful NAT64
/// runs in software, and session offload (see [`crate::soft::nat`]) uses address rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Profile {
    /// ConnectX-7 / BlueField-3 class: every item (TCP flags included) and action, deep
    /// tables, many priorities.
    Full,
    /// E810 class: no encap together with header rewrites, 8 priorities, fewer entries.
    Partial,
    /// Like `net_tap`: eth/vlan/ipv4/ipv6/udp/tcp match with queue/drop, group 0 only.
    TapLike,
    /// Nothing is offloaded.
    None,
}

impl Profile {
    /// Every named profile, for tests that run under each.
    pub const ALL: [Profile; 4] = [
        Profile::Full,
        Profile::Partial,
        Profile::TapLike,
        Profile::None,
    ];
}

/// A target's capabilities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caps {
    /// Where this came from.
    pub source: CapsSource,
    /// Match items accepted.
    pub items: BTreeSet<ItemKind>,
    /// Actions accepted.
    pub actions: BTreeSet<ActionKind>,
    /// Whether one rule may both push/pop headers and rewrite fields.
    pub encap_with_modify: bool,
    /// Priority levels per group (valid priorities are `0..priorities`).
    pub priorities: u32,
    /// Groups usable besides group 0.
    pub max_groups: u32,
    /// Rules the target holds in all.
    pub max_rules: u32,
    /// Meters the target holds.
    pub max_meters: u32,
}

/// Why a target refuses a rule: the error kinds real NICs return (ENOTSUP naming the item or
/// action, ENOSPC, ...).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error, Serialize, Deserialize,
)]
pub enum Refusal {
    /// A match item the target does not support, with its index in the pattern.
    #[error("match item {index} ({item:?}) not supported")]
    Item {
        /// Position in the pattern.
        index: usize,
        /// The item kind.
        item: ItemKind,
    },
    /// An action the target does not support, with its index in the action list.
    #[error("action {index} ({action:?}) not supported")]
    Action {
        /// Position in the action list.
        index: usize,
        /// The action kind.
        action: ActionKind,
    },
    /// Header push/pop together with a field rewrite in one rule.
    #[error("action {index} ({action:?}) cannot be combined with header rewrites")]
    EncapWithModify {
        /// Position of the encap/decap action.
        index: usize,
        /// The action kind.
        action: ActionKind,
    },
    /// A priority beyond the target's range.
    #[error("priority {priority} out of range (target has {available})")]
    Priority {
        /// Requested.
        priority: u32,
        /// Levels available.
        available: u32,
    },
    /// A group beyond the target's budget.
    #[error("group {group} not available")]
    Group {
        /// Requested group.
        group: u32,
    },
    /// No room left (ENOSPC).
    #[error("no space left in the rule table")]
    NoSpace,
    /// No meter left.
    #[error("no meter left")]
    NoMeter,
    /// A rule with no fate (queue, rss, drop, port, jump) or with more than one.
    #[error("rule needs exactly one fate action")]
    NoFate,
    /// An attribute the target does not support (egress, transfer).
    #[error("attribute not supported")]
    Attribute,
    /// The target answers ENOSYS for everything.
    #[error("flow API not implemented by this port")]
    NotImplemented,
    /// The target refused at create time for another reason (a driver error that validation
    /// did not predict), as the driver reported it.
    #[error("driver refused: {errno} ({cause}){}", message.as_ref().map(|m| format!(": {m}")).unwrap_or_default())]
    Driver {
        /// The errno's symbolic name (`EEXIST`, `EINVAL`, ...).
        errno: String,
        /// What the driver pointed at (`pattern item #1`, `action #2`, `attributes`).
        cause: String,
        /// The driver's message, if any.
        message: Option<String>,
    },
}

impl Caps {
    /// What two targets both accept: a plan compiled for the result fits either (the agent
    /// compiles once for all its ports).
    pub fn meet(&self, other: &Caps) -> Caps {
        Caps {
            source: if self.source == other.source {
                self.source
            } else {
                CapsSource::Probed
            },
            items: self.items.intersection(&other.items).copied().collect(),
            actions: self.actions.intersection(&other.actions).copied().collect(),
            encap_with_modify: self.encap_with_modify && other.encap_with_modify,
            priorities: self.priorities.min(other.priorities),
            max_groups: self.max_groups.min(other.max_groups),
            max_rules: self.max_rules.min(other.max_rules),
            max_meters: self.max_meters.min(other.max_meters),
        }
    }

    /// A named profile.
    pub fn profile(profile: Profile) -> Caps {
        use ActionKind as A;
        use ItemKind as I;
        let all_items = [I::Eth, I::Vlan, I::Ipv4, I::Ipv6, I::Udp, I::Tcp, I::Vxlan];
        let source = CapsSource::Profile(profile);
        match profile {
            Profile::Full => Caps {
                source,
                items: all_items
                    .into_iter()
                    .chain(core::iter::once(I::TcpFlags))
                    .collect(),
                actions: [
                    A::Queue,
                    A::Rss,
                    A::Drop,
                    A::Count,
                    A::Mark,
                    A::Jump,
                    A::Meter,
                    A::Port,
                    A::SetMacSrc,
                    A::SetMacDst,
                    A::DecTtl,
                    A::SetIpv4Src,
                    A::SetIpv4Dst,
                    A::SetIpv6Src,
                    A::SetIpv6Dst,
                    A::SetTpSrc,
                    A::SetTpDst,
                    A::VxlanEncap,
                    A::VxlanDecap,
                    A::RawEncap,
                    A::RawDecap,
                ]
                .into_iter()
                .collect(),
                encap_with_modify: true,
                priorities: 1 << 16,
                max_groups: 4096,
                max_rules: 4 << 20,
                max_meters: 1 << 16,
            },
            Profile::Partial => Caps {
                source,
                items: all_items.into_iter().collect(),
                // The full set less L4 port rewrites and raw encap/decap.
                actions: Caps::profile(Profile::Full)
                    .actions
                    .into_iter()
                    .filter(|a| !matches!(a, A::SetTpSrc | A::SetTpDst | A::RawEncap | A::RawDecap))
                    .collect(),
                encap_with_modify: false,
                priorities: 8,
                max_groups: 64,
                max_rules: 16 << 10,
                max_meters: 256,
            },
            Profile::TapLike => Caps {
                source,
                items: [I::Eth, I::Vlan, I::Ipv4, I::Ipv6, I::Udp, I::Tcp]
                    .into_iter()
                    .collect(),
                actions: [A::Queue, A::Drop].into_iter().collect(),
                encap_with_modify: false,
                priorities: 64,
                max_groups: 0,
                max_rules: 4096,
                max_meters: 0,
            },
            Profile::None => Caps {
                source,
                items: BTreeSet::new(),
                actions: BTreeSet::new(),
                encap_with_modify: false,
                priorities: 0,
                max_groups: 0,
                max_rules: 0,
                max_meters: 0,
            },
        }
    }

    /// Whether groups and jumps are usable.
    pub fn has_groups(&self) -> bool {
        self.max_groups > 0 && self.actions.contains(&ActionKind::Jump)
    }

    /// Checks one rule's shape (not table space) the way a NIC's validate does. A TCP item
    /// that matches flags also needs [`ItemKind::TcpFlags`].
    pub fn check(&self, rule: &Rule) -> Result<(), Refusal> {
        self.check_parts(
            rule.pattern.iter().map(|i| i.kind()),
            &rule.actions,
            &rule.attr,
        )?;
        let flags = rule
            .pattern
            .iter()
            .position(|i| matches!(i, Item::Tcp(m) if m.mask.flags != 0));
        match flags {
            Some(index) if !self.items.contains(&ItemKind::TcpFlags) => Err(Refusal::Item {
                index,
                item: ItemKind::TcpFlags,
            }),
            _ => Ok(()),
        }
    }

    /// [`Caps::check`] on the parts of a rule, so a caller need not build one to ask.
    pub fn check_parts(
        &self,
        items: impl IntoIterator<Item = ItemKind>,
        actions: &[crate::ir::Action],
        attr: &crate::ir::Attr,
    ) -> Result<(), Refusal> {
        if self.items.is_empty() && self.actions.is_empty() {
            return Err(Refusal::NotImplemented);
        }
        for (index, item) in items.into_iter().enumerate() {
            if !self.items.contains(&item) {
                return Err(Refusal::Item { index, item });
            }
        }
        let mut modifies = false;
        for (index, action) in actions.iter().enumerate() {
            if !self.actions.contains(&action.kind()) {
                return Err(Refusal::Action {
                    index,
                    action: action.kind(),
                });
            }
            modifies |= action.kind().is_modify();
        }
        if modifies && !self.encap_with_modify {
            if let Some((index, action)) = actions
                .iter()
                .enumerate()
                .find(|(_, a)| a.kind().is_encap())
            {
                return Err(Refusal::EncapWithModify {
                    index,
                    action: action.kind(),
                });
            }
        }
        if attr.priority >= self.priorities {
            return Err(Refusal::Priority {
                priority: attr.priority,
                available: self.priorities,
            });
        }
        if attr.group != 0 && !self.has_groups() {
            return Err(Refusal::Group { group: attr.group });
        }
        Ok(())
    }
}
