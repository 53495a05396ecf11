//! Compile: model + capabilities → [`Plan`] `{ hw, sw }`, deterministic and side-effect free.
//!
//! # How the rules are laid out
//! Rules are ingress rules created per port (`rte_flow` ingress domain: groups are per port).
//!
//! **Group 0** classifies by port:
//! - a VPC port: `eth type=IPv4|IPv6 → [meter(VPC)], mark(resume in VRF), jump(VRF chain)`;
//! - an uplink: VXLAN to our VTEP with a known VNI and inner `eth type` →
//!   `decap, mark(VPC VRF), jump(VPC chain)` (priority 0); any other VXLAN to our VTEP and every
//!   NAT outside address → `queue` (software, priority 1); then `eth type → mark(underlay),
//!   jump(underlay chain)` (priority 2). An uplink's final jump is installed only when every rule
//!   above it is, so that nothing meant for software can fall through into the underlay table.
//!
//! **Longest-prefix match** lives in a chain of groups per (VRF, family). A route of length `L`
//! gets the *level* `max_len − L` (0 for a /32 or /128). A group holds `P − 1` levels (`P` = the
//! target's priorities) and closes with a catch-all at priority `P − 1` that jumps to the next
//! group of the chain, or queues to software in the last one. So level `l` is group
//! `chain[l / (P−1)]`, priority `l % (P−1)`, and a more specific route always wins: either a
//! lower priority in the same group, or an earlier group. Groups are budgeted up front in a fixed
//! order (underlay v4, underlay v6, then each VPC by table id, v4 then v6); levels beyond a
//! truncated chain go to software as `PrioritiesExhausted` (they are the shortest prefixes,
//! so no more specific hardware rule is harmed). On targets without groups (`TapLike`), routes
//! go straight into group 0 of the VRF's own ports at priority `1 + level`, behind the
//! classification traps.
//!
//! **Software routes inside hardware routes.** A route that must run in software gets a *trap*
//! rule at its own level (`queue`), so a covering hardware route cannot steal its packets. When
//! even the trap cannot be installed the route is *untrapped*, and every hardware route covering
//! it is demoted to software (`ShadowsSoftwareRoute`), and no new covering route is put into
//! hardware while it lasts. So `hw` then `sw` forwards every packet as the model does.
//!
//! **Capacity** is first come, first served in a canonical order (structure rules, then routes by
//! table and prefix). An incremental update that frees space does not promote anything; the
//! next full compile does. Correctness never depends on it.
//!
//! **Reserved priorities.** Group 0 keeps priority [`PRIO_TEARDOWN_TRAP`] (0) and
//! [`PRIO_SESSION`] (1) free for offloaded NAT sessions; port classification starts at 2.
//!
//! # Offloading established NAT sessions
//! NAPT44 starts in software. An established session (see "Offloading established sessions"
//! in [`crate::soft::nat`]) whose software path [`crate::soft::pipeline::Pipeline`] can resolve
//! to a plain port is offloaded by [`crate::sessions::SessionOffload`] as exact-match rules in
//! group 0 at [`PRIO_SESSION`] ([`session_rules`]): outbound on every port of the VPC and inbound
//! on every uplink, matching the full 5-tuple and carrying the translation
//! (`SetIpv4Src`+`SetTpSrc`, resp. `SetIpv4Dst`+`SetTpDst`), the VPC's hardware meter (outbound,
//! with the resume mark, ahead of everything, as software polices at ingress), `DecTtl`, `Count`
//! and the forwarding actions the software path resolved (MACs and port, ECMP already picked):
//! the rule replaces the whole software path for that flow. The rules are not part of the plan;
//! their identities are [`RuleId::Session`].
//!
//! The plan holds the shared [`RuleId::TeardownTrap`]s at [`PRIO_TEARDOWN_TRAP`] whenever a
//! NAPT44 rule exists and the target can hold session rules (items `Eth`, `Ipv4`, `Tcp` with
//! [`ItemKind::TcpFlags`], `Udp`; actions `Set*`, `DecTtl`, `Count`, MAC rewrites, `Port`,
//! `Queue`): TCP with FIN (RST clear) and TCP with RST go to software, on every port of a VPC
//! with a NAPT44 rule (doing the VPC's hardware meter and resume mark first, like the port's
//! classification) and on every uplink for each pool block. So the session's state machine
//! still sees teardown; the driver then removes the session's rules.
//!
//! Not offloaded (the session stays in software): NAT64 and ICMP sessions; sessions whose path
//! has a VXLAN next hop, a blackhole, a route meter, a VRF loop, or static NAT taking precedence;
//! sessions of a VPC whose meter runs in software; TCP sessions whose traps are not all
//! installed; anything the target refuses (`Partial` lacks L4 port rewrites, `TapLike` and
//! `None` all rewrites). Known gap: the IR cannot match "not a fragment", so a first IPv4
//! fragment of an offloaded flow is translated by hardware, while software drops NAPT fragments.
//!
//! # What stays in software, by design
//! ECMP (the IR has no hash-select action), VPC breakout to the underlay (with its NAT), NAPT44
//! and NAT64 (stateful; established NAPT44 sessions are offloaded one by one, see above),
//! VXLAN routes whose VTEP does not resolve.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::caps::{Caps, Refusal};
use crate::ir::{
    self, mark, Action, ActionKind, Attr, EthFields, Ipv4Fields, Ipv6Fields, Item, ItemKind,
    L4Fields, Masked, MeterRef, Rule, VxlanEncap, VxlanFields,
};
use crate::model::{
    MacAddr, MeterProfile, MeterTarget, Model, Name, NatKind, Nexthop, ObjectKey, PortId, Prefix,
    Route, RouteKey, TableId, UNDERLAY_TABLE,
};
use crate::soft::nat::{Proto, SessionId, TCP_FIN, TCP_RST};
use crate::soft::pipeline::{Forward, SessionOffer};

/// Group-0 priority reserved for TCP FIN/RST traps of offloaded NAT sessions.
pub const PRIO_TEARDOWN_TRAP: u32 = 0;
/// Group-0 priority reserved for exact-match rules of offloaded NAT sessions.
pub const PRIO_SESSION: u32 = 1;
/// Most groups in one chain: bounds the jumps a lookup takes (a target with very few
/// priorities gives its shortest prefixes to software instead of chaining deeper).
pub const MAX_CHAIN_GROUPS: u32 = 16;
/// First group-0 priority of port classification.
const CLASSIFY: u32 = 2;

/// IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Both, in layout order.
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    fn of(p: &Prefix) -> Family {
        if p.is_v4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    fn max_len(self) -> u32 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// The EtherType.
    pub fn ethertype(self) -> u16 {
        match self {
            Family::V4 => 0x0800,
            Family::V6 => 0x86dd,
        }
    }
}

/// The stable identity of a hardware rule: the same object always compiles to the same id, so
/// reconcile can tell create from modify from destroy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RuleId {
    /// Group 0 of a VPC port: classify one family into the VPC's chain.
    Classify {
        /// The port.
        port: PortId,
        /// The family.
        family: Family,
    },
    /// Group 0 of an uplink: decapsulate one VNI / inner family.
    Decap {
        /// The uplink.
        port: PortId,
        /// The VPC's table.
        table: TableId,
        /// Inner family.
        family: Family,
    },
    /// Group 0 of an uplink: other VXLAN to our VTEP goes to software.
    VxlanTrap {
        /// The uplink.
        port: PortId,
    },
    /// Group 0 of an uplink: a NAT outside block goes to software.
    NatTrap {
        /// The uplink.
        port: PortId,
        /// The block.
        block: Prefix,
    },
    /// Group 0 of an uplink: everything else into the underlay chain.
    UplinkDefault {
        /// The uplink.
        port: PortId,
        /// The family.
        family: Family,
    },
    /// The closing catch-all of one group of a chain.
    ChainEnd {
        /// The port the chain is instantiated on.
        port: PortId,
        /// The VRF.
        table: TableId,
        /// The family.
        family: Family,
        /// Position in the chain.
        index: u32,
    },
    /// A route (or its trap), instantiated on one port.
    Route {
        /// The route (first: a full compile then inserts in key order, at the map's hot right
        /// edge).
        key: RouteKey,
        /// The port.
        port: PortId,
    },
    /// The implicit route of a NAT64 prefix: always a trap.
    Nat64Prefix {
        /// The port.
        port: PortId,
        /// The rule.
        nat: Name,
    },
    /// Group 0 at [`PRIO_TEARDOWN_TRAP`]: TCP with FIN (resp. RST) goes to software, so the
    /// state machine of an offloaded NAPT44 session sees its teardown. On every port of a VPC
    /// with a NAPT44 rule (`block: None`) and on every uplink per NAPT44 pool block.
    TeardownTrap {
        /// The port.
        port: PortId,
        /// The pool block on an uplink; `None` on a VPC port.
        block: Option<Prefix>,
        /// Which flag.
        flag: TeardownFlag,
    },
    /// Group 0 at [`PRIO_SESSION`]: one direction of an offloaded NAPT44 session on one port.
    /// Never part of a [`Plan`]: [`crate::sessions::SessionOffload`] installs and removes these
    /// next to the plan's rules (see [`session_rules`]).
    Session {
        /// The pipeline (lcore) that owns the session: session ids are per pipeline.
        shard: u16,
        /// The NAPT44 rule.
        nat: Name,
        /// The session.
        id: SessionId,
        /// Which direction.
        dir: SessionDir,
        /// The ingress port the rule is created on.
        port: PortId,
    },
}

/// The TCP flag a teardown trap catches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TeardownFlag {
    /// FIN with RST clear (a FIN+RST segment is the RST trap's, so the two never overlap).
    Fin,
    /// RST.
    Rst,
}

impl TeardownFlag {
    /// Both.
    pub const BOTH: [TeardownFlag; 2] = [TeardownFlag::Fin, TeardownFlag::Rst];

    /// The flags byte (spec, mask) matched.
    pub fn spec_mask(self) -> (u8, u8) {
        match self {
            TeardownFlag::Fin => (TCP_FIN, TCP_FIN | TCP_RST),
            TeardownFlag::Rst => (TCP_RST, TCP_RST),
        }
    }
}

/// The direction of an offloaded session's rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SessionDir {
    /// Inside → remote, on the VPC's ports: source NAT.
    Outbound,
    /// Remote → outside endpoint, on the uplinks: back to the inside endpoint.
    Inbound,
}

impl RuleId {
    /// The model object a rule belongs to, for status reports.
    pub fn object(&self) -> Option<ObjectKey> {
        match self {
            RuleId::Route { key, .. } => Some(ObjectKey::Route(*key)),
            RuleId::Nat64Prefix { nat, .. } | RuleId::Session { nat, .. } => {
                Some(ObjectKey::Nat(nat.clone()))
            }
            _ => None,
        }
    }
}

/// Why an object runs in software: machine-readable, shown to operators.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, thiserror::Error,
)]
pub enum SwReason {
    /// The target refuses the rule's shape (names the item or action).
    #[error("target refuses the rule: {0}")]
    Unsupported(Refusal),
    /// No room in the rule table.
    #[error("rule table full")]
    TableFull,
    /// No meter left.
    #[error("no hardware meter left")]
    MetersExhausted,
    /// The prefix length has no priority level in the target's groups.
    #[error("priorities exhausted for this prefix length")]
    PrioritiesExhausted,
    /// The VRF got no group from the budget or has no port to enter through.
    #[error("VRF has no hardware path (groups exhausted or no ports)")]
    NoHardwarePath,
    /// Needs per-flow state (NAPT44, NAT64).
    #[error("needs per-flow state")]
    NeedsState,
    /// ECMP needs a hash-select action the IR does not have.
    #[error("ECMP runs in software")]
    Ecmp,
    /// Breakout from a VPC to the underlay (and its NAT) runs in software.
    #[error("VPC breakout runs in software")]
    Breakout,
    /// The VXLAN next hop's VTEP has no usable underlay route.
    #[error("remote VTEP {0} unresolved in the underlay")]
    Unresolved(Ipv4Addr),
    /// A more specific route runs in software and could not be trapped.
    #[error("covers software route {0:?} that could not be trapped")]
    ShadowsSoftwareRoute(RouteKey),
    /// The object's meter runs in software.
    #[error("its meter runs in software")]
    MeterInSoftware,
    /// Every object of a VPC whose ingress runs in software.
    #[error("the VPC's ingress runs in software")]
    VpcInSoftware,
    /// A TCP session cannot be offloaded: the TCP FIN/RST traps of its ports are not
    /// installed, so teardown would bypass the session's state machine.
    #[error("TCP teardown traps are not installed")]
    TeardownNotTrapped,
    /// The session's software path is not one a session rule reproduces (ECMP is fine; a
    /// blackhole, VXLAN encapsulation, a route meter, NAT64, static NAT taking precedence, ...),
    /// or it vanished.
    #[error("the session's path cannot be offloaded")]
    SessionPath,
    /// The session offload budget (rules the driver may hold) is used up.
    #[error("session offload budget exhausted")]
    SessionBudget,
}

/// A route's hardware rule: the same match and actions on every port its VRF's chain is
/// instantiated on. Kept once per route, not per port, with actions shared between routes that
/// have the same next hop, so a million routes cost tens of megabytes, not a gigabyte;
/// [`RouteRules::rule`] gives the IR rule for one port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRules {
    /// The ports the rule is created on.
    pub ports: Arc<[PortId]>,
    /// Its group.
    pub group: u32,
    /// Its priority (the prefix length's level).
    pub priority: u32,
    /// Direct mode: the pattern also matches the EtherType (group 0 of the VRF's own ports).
    pub match_ethertype: bool,
    /// Forwarding actions, or a trap to software.
    pub actions: Arc<[Action]>,
}

impl RouteRules {
    /// The IR rule on one port.
    pub fn rule(&self, key: &RouteKey, port: PortId) -> Rule {
        Rule {
            port,
            attr: ingress(self.group, self.priority),
            pattern: dst_prefix_items(&key.prefix, self.match_ethertype),
            actions: self.actions.to_vec(),
        }
    }

    /// Whether this only sends the route's packets to software.
    pub fn is_trap(&self) -> bool {
        matches!(&*self.actions, [Action::Queue(_)])
    }
}

/// What goes to hardware.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HwPlan {
    /// Every rule but the routes' (classification, traps, chain ends), by identity. For every
    /// rule of the plan use [`HwPlan::iter_rules`].
    pub structure: BTreeMap<RuleId, Rule>,
    /// Route rules (forwarding or trap), one entry per route; their identities are
    /// [`RuleId::Route`] per port.
    pub routes: BTreeMap<RouteKey, RouteRules>,
    /// Meters by reference.
    pub meters: BTreeMap<MeterRef, MeterProfile>,
}

impl HwPlan {
    /// How many rules the target holds for this plan.
    pub fn rule_count(&self) -> usize {
        self.structure.len() + self.routes.values().map(|r| r.ports.len()).sum::<usize>()
    }

    /// One rule by identity.
    pub fn rule(&self, id: &RuleId) -> Option<Rule> {
        match id {
            RuleId::Route { key, port } => self
                .routes
                .get(key)
                .filter(|r| r.ports.contains(port))
                .map(|r| r.rule(key, *port)),
            _ => self.structure.get(id).cloned(),
        }
    }

    /// Every rule with its identity: the other rules, then the routes' per port.
    pub fn iter_rules(&self) -> impl Iterator<Item = (RuleId, Rule)> + '_ {
        let other = self.structure.iter().map(|(id, r)| (id.clone(), r.clone()));
        let routes = self.routes.iter().flat_map(|(key, r)| {
            r.ports.iter().map(move |port| {
                (
                    RuleId::Route {
                        key: *key,
                        port: *port,
                    },
                    r.rule(key, *port),
                )
            })
        });
        other.chain(routes)
    }
}

/// The compiled plan. Every object of the model is in hardware unless `sw` names it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Hardware rules and meters.
    pub hw: HwPlan,
    /// Objects that run (wholly or partly) in software, and why.
    pub sw: BTreeMap<ObjectKey, SwReason>,
}

/// A change to the hardware state, recorded as the compiler makes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Create a meter (before the rules using it).
    CreateMeter(MeterRef, MeterProfile),
    /// Change a meter's profile in place (`rte_mtr_meter_profile_update`).
    UpdateMeter(MeterRef, MeterProfile),
    /// Create a rule.
    Create(RuleId, Rule),
    /// Replace a rule: make before break (create the new one, then destroy the old).
    Replace(RuleId, Rule),
    /// Destroy a rule in a group (group 0 first, so nothing jumps into a group being emptied).
    Destroy(RuleId, u32),
    /// Destroy a meter (after the rules using it).
    DestroyMeter(MeterRef),
}

/// Where a (VRF, family)'s routes are instantiated.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chain {
    /// Ports the chain is instantiated on.
    ports: Vec<PortId>,
    /// The same, shared by the chain's route rules (set once the structure is built).
    shared_ports: Arc<[PortId]>,
    /// Group ids in order; empty in direct mode.
    groups: Vec<u32>,
    /// Levels available.
    levels: u32,
}

/// Per (VRF, family) route placement state.
#[derive(Debug, Clone, Default)]
struct VrfState {
    /// Software routes that have no trap.
    untrapped: BTreeSet<Prefix>,
}

/// The compiler: holds the plan and what incremental updates need.
#[derive(Debug, Clone)]
pub struct Compiler {
    caps: Caps,
    plan: Plan,
    /// Shared so a route placement does not copy its chain.
    chains: BTreeMap<(TableId, Family), Arc<Chain>>,
    vrfs: BTreeMap<(TableId, Family), VrfState>,
    /// VXLAN route keys by remote VTEP, to recompile when the underlay changes.
    vtep_users: BTreeMap<Ipv4Addr, BTreeSet<RouteKey>>,
    ops: Vec<Op>,
    /// Whether to record operations (off while building from scratch: the diff does it).
    journal: bool,
    /// Rules held by `plan.hw.routes` (one per route and port), for capacity checks.
    route_rules: usize,
    /// Action lists by next hop, shared between routes.
    actions: BTreeMap<Nexthop, Arc<[Action]>>,
    /// The trap action list, shared.
    trap: Arc<[Action]>,
    /// What the target refused at create time although its capabilities admit it: such a
    /// rule is treated as refused by the capabilities from then on (see [`Compiler::refuse`]).
    refused: Refusals,
}

/// Rules and meters the target refused when they were created.
#[derive(Debug, Clone, Default)]
struct Refusals {
    /// Non-route rules by identity.
    rules: BTreeMap<RuleId, Refusal>,
    /// Route rules by route and kind (`true`: the trap); one refusal covers every port.
    routes: BTreeMap<(RouteKey, bool), Refusal>,
    /// Meters.
    meters: BTreeMap<MeterRef, Refusal>,
}

/// A plan compiled from scratch.
pub fn compile(model: &Model, caps: &Caps) -> Plan {
    let mut c = Compiler::new(caps.clone());
    c.journal = false;
    c.build(model);
    c.plan
}

fn exact4(a: Ipv4Addr) -> Masked<Ipv4Fields> {
    Masked {
        spec: Ipv4Fields {
            dst: a,
            ..Default::default()
        },
        mask: Ipv4Fields {
            dst: Ipv4Addr::BROADCAST,
            ..Default::default()
        },
    }
}

fn eth_type(family: Family) -> Item {
    Item::Eth(Masked {
        spec: EthFields {
            ethertype: family.ethertype(),
            ..Default::default()
        },
        mask: EthFields {
            ethertype: 0xffff,
            ..Default::default()
        },
    })
}

fn dst_prefix_items(p: &Prefix, ethertype: bool) -> Vec<Item> {
    let eth = if ethertype {
        eth_type(Family::of(p))
    } else {
        Item::Eth(Masked::default())
    };
    let ip = match p.addr() {
        IpAddr::V4(a) => Item::Ipv4(Masked {
            spec: Ipv4Fields {
                dst: a,
                ..Default::default()
            },
            mask: Ipv4Fields {
                dst: Ipv4Addr::from(crate::model::mask32(p.len())),
                ..Default::default()
            },
        }),
        IpAddr::V6(a) => Item::Ipv6(Masked {
            spec: Ipv6Fields {
                dst: a,
                ..Default::default()
            },
            mask: Ipv6Fields {
                dst: Ipv6Addr::from(crate::model::mask128(p.len())),
                ..Default::default()
            },
        }),
    };
    vec![eth, ip]
}

impl Default for Masked<EthFields> {
    fn default() -> Self {
        Masked {
            spec: EthFields::default(),
            mask: EthFields::default(),
        }
    }
}

/// Group number of a chain member: stable across compiles.
fn group_id(table: TableId, family: Family, index: u32) -> u32 {
    let fam = match family {
        Family::V4 => 0,
        Family::V6 => 1,
    };
    1 + ((table.0 << 9) | (fam << 8) | index)
}

fn trap() -> Vec<Action> {
    vec![Action::Queue(ir::SOFTWARE_QUEUE)]
}

impl Compiler {
    /// An empty compiler for a target.
    pub fn new(caps: Caps) -> Compiler {
        Compiler {
            caps,
            plan: Plan::default(),
            chains: BTreeMap::new(),
            vrfs: BTreeMap::new(),
            vtep_users: BTreeMap::new(),
            ops: Vec::new(),
            journal: true,
            route_rules: 0,
            actions: BTreeMap::new(),
            trap: Arc::from(trap()),
            refused: Refusals::default(),
        }
    }

    /// Records that the target refused to create rule `id` (the rule it was given) although
    /// the capabilities admit it: "do not trust validate alone". From now on the compiler
    /// treats that rule as refused with `refusal`, so the next [`Compiler::rebuild`] (or
    /// [`Compiler::update_route`] of that route) puts the object in software with the
    /// driver's reason, trapping or demoting as for any other refusal. A route's refusal is
    /// kept until [`Compiler::forget_route_refusals`]; others until the compiler is rebuilt
    /// from [`Compiler::new`].
    pub fn refuse(&mut self, id: &RuleId, rule: &Rule, refusal: Refusal) {
        match id {
            RuleId::Route { key, .. } => {
                let is_trap = matches!(&*rule.actions, [Action::Queue(_)]);
                self.refused.routes.insert((*key, is_trap), refusal);
            }
            other => {
                self.refused.rules.insert(other.clone(), refusal);
            }
        }
    }

    /// Records that the target refused to create a meter.
    pub fn refuse_meter(&mut self, meter: MeterRef, refusal: Refusal) {
        self.refused.meters.insert(meter, refusal);
    }

    /// Forgets create-time refusals of a route (it changed: worth trying again).
    pub fn forget_route_refusals(&mut self, key: &RouteKey) {
        self.refused.routes.remove(&(*key, false));
        self.refused.routes.remove(&(*key, true));
    }

    /// Whether the target admits a non-route rule: its capabilities, then what it refused.
    fn admits(&self, id: &RuleId, rule: &Rule) -> Result<(), Refusal> {
        if let Some(r) = self.refused.rules.get(id) {
            return Err(r.clone());
        }
        self.caps.check(rule)
    }

    /// The plan in force.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The target's capabilities.
    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    /// The operations made since the last call, in a safe order (see [`crate::reconcile`]).
    /// Several operations on one rule (a route recompiled in place is destroyed, then created
    /// again) are merged into the one with the same effect first, since ordering may move a
    /// create before a destroy.
    pub fn take_ops(&mut self) -> Vec<Op> {
        crate::reconcile::order(coalesce(std::mem::take(&mut self.ops)))
    }

    /// Recompiles everything from the model (after VPC, NAT, meter or node changes, or to
    /// re-pack capacity). Records the operations from the previous plan.
    pub fn rebuild(&mut self, model: &Model) {
        let old = std::mem::take(&mut self.plan);
        let mut fresh = Compiler::new(self.caps.clone());
        fresh.refused = std::mem::take(&mut self.refused);
        fresh.journal = false;
        fresh.build(model);
        fresh.journal = true;
        self.ops.extend(crate::reconcile::diff(&old, &fresh.plan));
        fresh.ops = std::mem::take(&mut self.ops);
        *self = fresh;
    }

    /// Recompiles one route after the model changed it (created, replaced or deleted), and any
    /// VXLAN routes whose VTEP resolution it changes. O(1) rules for a route that no VTEP
    /// depends on.
    pub fn update_route(&mut self, model: &Model, key: RouteKey) {
        let vteps_before = self.vteps_resolved_by(model, key);
        let was_untrapped = self.is_untrapped(key);
        self.remove_route(key);
        if let Some(route) = model.routes().get(&key) {
            self.place_route(model, route);
        }
        if was_untrapped && !self.is_untrapped(key) {
            // Routes demoted because of it may go back to hardware.
            for len in (0..key.prefix.len()).rev() {
                let cover = RouteKey {
                    table: key.table,
                    prefix: key.prefix.truncate(len),
                };
                let demoted_by_it = self.plan.sw.get(&ObjectKey::Route(cover))
                    == Some(&SwReason::ShadowsSoftwareRoute(key));
                if demoted_by_it {
                    if let Some(route) = model.routes().get(&cover) {
                        self.remove_route(cover);
                        self.place_route(model, route);
                    }
                }
            }
        }
        if key.table == UNDERLAY_TABLE && key.prefix.is_v4() {
            let mut users: BTreeSet<RouteKey> = BTreeSet::new();
            for (vtep, keys) in &self.vtep_users {
                if key.prefix.contains(IpAddr::V4(*vtep)) || vteps_before.contains(vtep) {
                    users.extend(keys.iter().copied());
                }
            }
            for user in users {
                self.remove_route(user);
                if let Some(route) = model.routes().get(&user) {
                    self.place_route(model, route);
                }
            }
        }
    }

    fn is_untrapped(&self, key: RouteKey) -> bool {
        self.vrfs
            .get(&(key.table, Family::of(&key.prefix)))
            .is_some_and(|v| v.untrapped.contains(&key.prefix))
    }

    fn vteps_resolved_by(&self, model: &Model, key: RouteKey) -> Vec<Ipv4Addr> {
        if key.table != UNDERLAY_TABLE {
            return Vec::new();
        }
        self.vtep_users
            .keys()
            .filter(|v| {
                model
                    .lookup(UNDERLAY_TABLE, IpAddr::V4(**v))
                    .is_some_and(|r| r.key == key)
            })
            .copied()
            .collect()
    }

    fn build(&mut self, model: &Model) {
        self.alloc_chains(model);
        self.build_structure(model);
        for chain in self.chains.values_mut() {
            let chain = Arc::make_mut(chain);
            chain.shared_ports = Arc::from(chain.ports.as_slice());
        }
        // Each route's next hops are a heap allocation of their own: touch a chunk of them
        // before placing it, so their cache misses overlap instead of queueing one by one.
        let routes: Vec<&Route> = model.routes().values().collect();
        for chunk in routes.chunks(16) {
            for route in chunk {
                core::hint::black_box(route.nexthops.first().map(core::mem::discriminant));
            }
            for route in chunk {
                self.place_route(model, route);
            }
        }
        self.place_nat(model);
    }

    fn set_rule(&mut self, id: RuleId, rule: Option<Rule>) {
        use std::collections::btree_map::Entry;
        // One search per rule: this runs for every rule of a full compile.
        match (self.plan.hw.structure.entry(id), rule) {
            (Entry::Vacant(_), None) => {}
            (Entry::Occupied(o), None) => {
                let (id, old) = o.remove_entry();
                if self.journal {
                    self.ops.push(Op::Destroy(id, old.attr.group));
                }
            }
            (Entry::Vacant(v), Some(r)) => {
                if self.journal {
                    self.ops.push(Op::Create(v.key().clone(), r.clone()));
                }
                v.insert(r);
            }
            (Entry::Occupied(mut o), Some(r)) => {
                if *o.get() != r {
                    if self.journal {
                        self.ops.push(Op::Replace(o.key().clone(), r.clone()));
                    }
                    o.insert(r);
                }
            }
        }
    }

    fn room_for(&self, n: usize) -> bool {
        self.plan.hw.structure.len() + self.route_rules + n <= self.caps.max_rules as usize
    }

    /// Sets (or removes) a route's rules, journaling per-port operations.
    fn set_route(&mut self, key: RouteKey, new: Option<RouteRules>) {
        let added = new.as_ref().map_or(0, |r| r.ports.len());
        let old = match &new {
            Some(r) => self.plan.hw.routes.insert(key, r.clone()),
            None => self.plan.hw.routes.remove(&key),
        };
        let removed = old.as_ref().map_or(0, |r| r.ports.len());
        self.route_rules = self.route_rules + added - removed;
        if self.journal {
            route_ops(&key, old.as_ref(), new.as_ref(), &mut self.ops);
        }
    }

    fn is_hw_route(&self, key: &RouteKey) -> bool {
        self.plan.hw.routes.get(key).is_some_and(|r| !r.is_trap())
    }

    /// The hardware meter of a VPC: its reference is the VPC's table id (one meter per target,
    /// one table per VPC), stable across compiles.
    fn vpc_meter_ref(table: TableId) -> MeterRef {
        MeterRef(table.0)
    }

    fn alloc_chains(&mut self, model: &Model) {
        let uplinks: Vec<PortId> = model
            .node()
            .map(|n| n.uplinks.iter().copied().collect())
            .unwrap_or_default();
        let mut vrfs: Vec<(TableId, Vec<PortId>)> = vec![(UNDERLAY_TABLE, uplinks.clone())];
        for vpc in model.vpcs().values() {
            vrfs.push((vpc.table, vpc.ports.iter().copied().collect()));
        }
        let grouped = self.caps.has_groups();
        let p = self.caps.priorities;
        let mut budget = self.caps.max_groups;
        for (table, own_ports) in vrfs {
            for family in Family::BOTH {
                let needed_levels = family.max_len() + 1;
                let chain = if grouped && p >= 2 {
                    let per_group = p - 1;
                    let want = needed_levels.div_ceil(per_group).min(MAX_CHAIN_GROUPS);
                    let got = want.min(budget);
                    budget -= got;
                    let mut ports = own_ports.clone();
                    if table != UNDERLAY_TABLE {
                        ports.extend(uplinks.iter().copied());
                    }
                    ports.sort();
                    ports.dedup();
                    Chain {
                        shared_ports: Arc::from(ports.as_slice()),
                        ports,
                        groups: (0..got).map(|i| group_id(table, family, i)).collect(),
                        levels: (got * per_group).min(needed_levels),
                    }
                } else {
                    Chain {
                        shared_ports: Arc::from(own_ports.as_slice()),
                        ports: own_ports.clone(),
                        groups: Vec::new(),
                        levels: needed_levels.min(p.saturating_sub(CLASSIFY + 1)),
                    }
                };
                self.chains.insert((table, family), Arc::new(chain));
                self.vrfs.insert((table, family), VrfState::default());
            }
        }
    }

    /// Where a level lands: (group, priority), or None when out of levels.
    fn slot(&self, chain: &Chain, level: u32) -> Option<(u32, u32)> {
        if level >= chain.levels {
            return None;
        }
        if chain.groups.is_empty() {
            Some((0, CLASSIFY + 1 + level))
        } else {
            let per = self.caps.priorities - 1;
            let g = chain.groups.get((level / per) as usize)?;
            Some((*g, level % per))
        }
    }

    fn build_structure(&mut self, model: &Model) {
        let Some(node) = model.node().cloned() else {
            return;
        };
        // Chain ends first: a jump may only target a group that is closed.
        let chains: Vec<((TableId, Family), Arc<Chain>)> =
            self.chains.iter().map(|(k, c)| (*k, c.clone())).collect();
        for ((table, family), chain) in &chains {
            for port in &chain.ports {
                for (i, g) in chain.groups.iter().enumerate() {
                    let next = chain.groups.get(i + 1);
                    let actions = match next {
                        Some(n) => vec![Action::Jump(*n)],
                        None => trap(),
                    };
                    let rule = Rule {
                        port: *port,
                        attr: ingress(*g, self.caps.priorities - 1),
                        pattern: Vec::new(),
                        actions,
                    };
                    let id = RuleId::ChainEnd {
                        port: *port,
                        table: *table,
                        family: *family,
                        index: i as u32,
                    };
                    if self.admits(&id, &rule).is_ok() && self.room_for(1) {
                        self.set_rule(id, Some(rule));
                    }
                }
            }
        }
        // VPC ports.
        for vpc in model.vpcs().values() {
            self.classify_vpc(model, vpc);
        }
        // Uplinks.
        let blocks: Vec<Prefix> = model
            .nat_rules()
            .values()
            .filter_map(|n| n.kind.outside_v4())
            .flat_map(|r| r.to_prefixes())
            .collect();
        let static66: Vec<Ipv6Addr> = model
            .nat_rules()
            .values()
            .filter_map(|n| match n.kind {
                NatKind::Static66 { outside, .. } => Some(outside),
                _ => None,
            })
            .collect();
        for port in node.uplinks.iter().copied() {
            let mut complete = true;
            let grouped = self.caps.has_groups();
            // Decap per VPC and inner family.
            if grouped {
                for vpc in model.vpcs().values() {
                    for family in Family::BOTH {
                        let Some(chain) = self.chains.get(&(vpc.table, family)).cloned() else {
                            continue;
                        };
                        let Some(first) = chain.groups.first().copied() else {
                            continue;
                        };
                        if !chain_complete(&self.plan, &chain, vpc.table, family) {
                            continue;
                        }
                        let mut pattern = vxlan_to(node.vtep);
                        pattern.push(Item::Vxlan(Masked {
                            spec: VxlanFields {
                                flags: 0x08,
                                vni: vpc.vni.get(),
                            },
                            mask: VxlanFields {
                                flags: 0x08,
                                vni: 0x00ff_ffff,
                            },
                        }));
                        pattern.push(eth_type(family));
                        let rule = Rule {
                            port,
                            attr: ingress(0, CLASSIFY),
                            pattern,
                            actions: vec![
                                Action::VxlanDecap,
                                Action::Mark(mark::resume_in_vrf(vpc.table.0)),
                                Action::Jump(first),
                            ],
                        };
                        // A refused decap is covered by the VXLAN trap below.
                        let id = RuleId::Decap {
                            port,
                            table: vpc.table,
                            family,
                        };
                        if self.admits(&id, &rule).is_ok() && self.room_for(1) {
                            self.set_rule(id, Some(rule));
                        }
                    }
                }
            }
            let prio = if grouped { CLASSIFY + 1 } else { CLASSIFY };
            let vx = Rule {
                port,
                attr: ingress(0, prio),
                pattern: vxlan_to(node.vtep),
                actions: trap(),
            };
            complete &= self.try_rule(RuleId::VxlanTrap { port }, vx);
            for block in &blocks {
                let rule = Rule {
                    port,
                    attr: ingress(0, prio),
                    pattern: dst_prefix_items(block, true),
                    actions: trap(),
                };
                complete &= self.try_rule(
                    RuleId::NatTrap {
                        port,
                        block: *block,
                    },
                    rule,
                );
            }
            for a in &static66 {
                let Ok(block) = Prefix::v6(*a, 128) else {
                    continue;
                };
                let rule = Rule {
                    port,
                    attr: ingress(0, prio),
                    pattern: dst_prefix_items(&block, true),
                    actions: trap(),
                };
                complete &= self.try_rule(RuleId::NatTrap { port, block }, rule);
            }
            if !complete {
                // Something meant for software would fall into the underlay table: keep the
                // underlay's rules off this port.
                for family in Family::BOTH {
                    if let Some(chain) = self
                        .chains
                        .get_mut(&(UNDERLAY_TABLE, family))
                        .map(Arc::make_mut)
                    {
                        chain.ports.retain(|p| *p != port);
                    }
                }
                for (id, _) in self.rules_of_port_chain(port) {
                    self.set_rule(id, None);
                }
                continue;
            }
            if grouped {
                for family in Family::BOTH {
                    let Some(chain) = self.chains.get(&(UNDERLAY_TABLE, family)).cloned() else {
                        continue;
                    };
                    let Some(first) = chain.groups.first().copied() else {
                        continue;
                    };
                    if !chain_complete(&self.plan, &chain, UNDERLAY_TABLE, family) {
                        continue;
                    }
                    let rule = Rule {
                        port,
                        attr: ingress(0, CLASSIFY + 2),
                        pattern: vec![eth_type(family)],
                        actions: vec![
                            Action::Mark(mark::resume_in_vrf(UNDERLAY_TABLE.0)),
                            Action::Jump(first),
                        ],
                    };
                    self.try_rule(RuleId::UplinkDefault { port, family }, rule);
                }
            }
        }
        self.place_teardown_traps(model);
        // Chains nobody can enter are useless: drop their ports so no route rule lands there.
        let entered: Vec<(TableId, Family)> = self.chains.keys().copied().collect();
        for (table, family) in entered {
            let reachable: BTreeSet<PortId> = self
                .plan
                .hw
                .structure
                .iter()
                .filter(|(_, r)| r.attr.group == 0)
                .filter(|(_, r)| {
                    self.chains.get(&(table, family)).is_some_and(|c| {
                        c.groups
                            .first()
                            .is_some_and(|g| r.actions.contains(&Action::Jump(*g)))
                    })
                })
                .map(|(_, r)| r.port)
                .collect();
            let direct = self
                .chains
                .get(&(table, family))
                .is_some_and(|c| c.groups.is_empty());
            if direct {
                // Direct mode: usable on a VPC port when the VPC has no meter; on uplinks when
                // the classification traps are in (ports were already pruned above).
                if table != UNDERLAY_TABLE {
                    let metered = model
                        .vpc_by_table(table)
                        .and_then(|v| model.meter_for(&MeterTarget::Vpc(v.name.clone())))
                        .is_some();
                    if metered {
                        if let Some(c) = self.chains.get_mut(&(table, family)).map(Arc::make_mut) {
                            c.ports.clear();
                        }
                    }
                }
                continue;
            }
            let stale: Vec<PortId> = self
                .chains
                .get(&(table, family))
                .map(|c| {
                    c.ports
                        .iter()
                        .filter(|p| !reachable.contains(p))
                        .copied()
                        .collect()
                })
                .unwrap_or_default();
            for port in stale {
                if let Some(c) = self.chains.get_mut(&(table, family)).map(Arc::make_mut) {
                    c.ports.retain(|p| *p != port);
                }
                let ends: Vec<RuleId> = self
                    .plan
                    .hw
                    .structure
                    .keys()
                    .filter(|id| {
                        matches!(id, RuleId::ChainEnd { port: p, table: t, family: f, .. }
                            if *p == port && *t == table && *f == family)
                    })
                    .cloned()
                    .collect();
                for id in ends {
                    self.set_rule(id, None);
                }
            }
        }
    }

    /// Classification rules of a VPC's ports. With a VPC meter it is all or nothing (every
    /// port, both families), so the meter's state lives in exactly one place; without one,
    /// whatever fits is installed and the rest is classified in software.
    fn classify_vpc(&mut self, model: &Model, vpc: &crate::model::Vpc) {
        let meter = model.meter_for(&MeterTarget::Vpc(vpc.name.clone()));
        let mut rules = Vec::new();
        let mut complete = !vpc.ports.is_empty();
        for family in Family::BOTH {
            let Some(chain) = self.chains.get(&(vpc.table, family)).cloned() else {
                complete = false;
                continue;
            };
            let Some(first) = chain.groups.first().copied() else {
                // Direct mode: the VPC's routes sit in group 0 of its ports.
                complete = false;
                continue;
            };
            if !chain_complete(&self.plan, &chain, vpc.table, family) {
                complete = false;
                continue;
            }
            let mut actions = Vec::new();
            if meter.is_some() {
                actions.push(Action::Meter(Self::vpc_meter_ref(vpc.table)));
            }
            actions.push(Action::Mark(mark::resume_in_vrf(vpc.table.0)));
            actions.push(Action::Jump(first));
            for port in &vpc.ports {
                let rule = Rule {
                    port: *port,
                    attr: ingress(0, CLASSIFY),
                    pattern: vec![eth_type(family)],
                    actions: actions.clone(),
                };
                rules.push((
                    RuleId::Classify {
                        port: *port,
                        family,
                    },
                    rule,
                ));
            }
        }
        let vpc_key = ObjectKey::Vpc(vpc.name.clone());
        let Some(meter) = meter else {
            for (id, rule) in rules {
                complete &= self.try_rule(id, rule);
            }
            if !complete {
                self.plan.sw.insert(vpc_key, SwReason::NoHardwarePath);
            }
            return;
        };
        let meter_key = ObjectKey::Meter(meter.name.clone());
        let refusal = rules
            .iter()
            .find_map(|(id, r)| self.admits(id, r).err())
            .or_else(|| {
                self.refused
                    .meters
                    .get(&Self::vpc_meter_ref(vpc.table))
                    .cloned()
            });
        let reason = if let Some(refusal) = refusal {
            Some(SwReason::Unsupported(refusal))
        } else if !complete {
            Some(SwReason::NoHardwarePath)
        } else if self.plan.hw.meters.len() >= self.caps.max_meters as usize {
            Some(SwReason::MetersExhausted)
        } else if !self.room_for(rules.len()) {
            Some(SwReason::TableFull)
        } else {
            None
        };
        match reason {
            Some(reason) => {
                self.plan.sw.insert(vpc_key, SwReason::MeterInSoftware);
                self.plan.sw.insert(meter_key, reason);
            }
            None => {
                let r = Self::vpc_meter_ref(vpc.table);
                self.plan.hw.meters.insert(r, meter.profile);
                if self.journal {
                    self.ops.push(Op::CreateMeter(r, meter.profile));
                }
                for (id, rule) in rules {
                    self.set_rule(id, Some(rule));
                }
            }
        }
    }

    /// The TCP FIN/RST traps that offloaded NAPT44 sessions need (see
    /// [`RuleId::TeardownTrap`]), when the target can hold session rules at all. On a VPC port
    /// the trap does what the port's classification would before handing over (the VPC's
    /// hardware meter and the resume mark), so the meter's state stays in one place.
    fn place_teardown_traps(&mut self, model: &Model) {
        let Some(node) = model.node() else {
            return;
        };
        if session_shape_refusal(&self.caps).is_some() {
            return;
        }
        let mut vpcs: BTreeSet<Name> = BTreeSet::new();
        let mut blocks: BTreeSet<Prefix> = BTreeSet::new();
        for nat in model.nat_rules().values() {
            if let NatKind::Napt44 { pool, .. } = &nat.kind {
                vpcs.insert(nat.vpc.clone());
                blocks.extend(pool.to_prefixes());
            }
        }
        for name in &vpcs {
            let Some(vpc) = model.vpcs().get(name) else {
                continue;
            };
            let meter = Self::vpc_meter_ref(vpc.table);
            let actions = if self.plan.hw.meters.contains_key(&meter) {
                vec![
                    Action::Meter(meter),
                    Action::Mark(mark::resume_in_vrf(vpc.table.0)),
                    Action::Queue(ir::SOFTWARE_QUEUE),
                ]
            } else {
                trap()
            };
            for port in &vpc.ports {
                for flag in TeardownFlag::BOTH {
                    let rule = Rule {
                        port: *port,
                        attr: ingress(0, PRIO_TEARDOWN_TRAP),
                        pattern: teardown_pattern(None, flag),
                        actions: actions.clone(),
                    };
                    let id = RuleId::TeardownTrap {
                        port: *port,
                        block: None,
                        flag,
                    };
                    self.try_rule(id, rule);
                }
            }
        }
        for port in &node.uplinks {
            for block in &blocks {
                for flag in TeardownFlag::BOTH {
                    let rule = Rule {
                        port: *port,
                        attr: ingress(0, PRIO_TEARDOWN_TRAP),
                        pattern: teardown_pattern(Some(block), flag),
                        actions: trap(),
                    };
                    let id = RuleId::TeardownTrap {
                        port: *port,
                        block: Some(*block),
                        flag,
                    };
                    self.try_rule(id, rule);
                }
            }
        }
    }

    fn rules_of_port_chain(&self, port: PortId) -> Vec<(RuleId, ())> {
        self.plan
            .hw
            .structure
            .keys()
            .filter(|id| match id {
                RuleId::ChainEnd { port: p, table, .. } => *p == port && *table == UNDERLAY_TABLE,
                RuleId::UplinkDefault { port: p, .. } => *p == port,
                _ => false,
            })
            .map(|id| (id.clone(), ()))
            .collect()
    }

    fn try_rule(&mut self, id: RuleId, rule: Rule) -> bool {
        if self.admits(&id, &rule).is_ok() && self.room_for(1) {
            self.set_rule(id, Some(rule));
            true
        } else {
            false
        }
    }

    /// The forwarding actions a route wants in hardware, or why it cannot have them.
    fn route_actions(&mut self, model: &Model, route: &Route) -> Result<Arc<[Action]>, SwReason> {
        if let Some(a) = route
            .nexthops
            .first()
            .filter(|nh| !matches!(nh, Nexthop::Vxlan { .. }))
            .and_then(|nh| self.actions.get(nh))
        {
            // Underlay and blackhole actions depend only on the next hop (VXLAN ones also on
            // the VTEP's resolution, so they are not cached).
            if route.nexthops.len() == 1
                && model.meter_for(&MeterTarget::Route(route.key)).is_none()
            {
                return Ok(a.clone());
            }
        }
        let actions: Arc<[Action]> = Arc::from(self.route_action_list(model, route)?);
        if let Some(nh) = route
            .nexthops
            .first()
            .filter(|nh| !matches!(nh, Nexthop::Vxlan { .. }))
        {
            self.actions.insert(*nh, actions.clone());
        }
        Ok(actions)
    }

    fn route_action_list(&self, model: &Model, route: &Route) -> Result<Vec<Action>, SwReason> {
        let Some(node) = model.node() else {
            return Err(SwReason::NoHardwarePath);
        };
        if route.nexthops.len() > 1 {
            return Err(SwReason::Ecmp);
        }
        // A route's meter must see every packet of the route, and software paths reach every
        // VRF (breakout, reverse NAT, trapped decap): its state lives in software, and so does
        // the route.
        if model.meter_for(&MeterTarget::Route(route.key)).is_some() {
            return Err(SwReason::MeterInSoftware);
        }
        let meter: Option<MeterRef> = None;
        let count = self.caps.actions.contains(&ActionKind::Count);
        let mut actions = Vec::new();
        let forward_prelude = |actions: &mut Vec<Action>| {
            actions.push(Action::DecTtl);
            if let Some(m) = meter {
                actions.push(Action::Meter(m));
            }
            if count {
                actions.push(Action::Count);
            }
        };
        match route.nexthops.first() {
            None => return Err(SwReason::NoHardwarePath),
            Some(Nexthop::Blackhole) => {
                if let Some(m) = meter {
                    actions.push(Action::Meter(m));
                }
                if count {
                    actions.push(Action::Count);
                }
                actions.push(Action::Drop);
            }
            Some(Nexthop::Vrf { .. }) => return Err(SwReason::Breakout),
            Some(Nexthop::Underlay { port, mac, .. }) => {
                forward_prelude(&mut actions);
                actions.push(Action::SetMacSrc(node.router_mac));
                actions.push(Action::SetMacDst(*mac));
                actions.push(Action::Port(*port));
            }
            Some(Nexthop::Vxlan {
                vni,
                remote_vtep,
                router_mac,
            }) => {
                let (port, mac) =
                    resolve_vtep(model, *remote_vtep).ok_or(SwReason::Unresolved(*remote_vtep))?;
                forward_prelude(&mut actions);
                actions.push(Action::SetMacSrc(node.router_mac));
                actions.push(Action::SetMacDst(*router_mac));
                actions.push(Action::VxlanEncap(VxlanEncap {
                    eth_src: node.router_mac,
                    eth_dst: mac,
                    ip_src: node.vtep,
                    ip_dst: *remote_vtep,
                    vni: vni.get(),
                    udp_src: ir::vxlan_source_port(vni.get()),
                }));
                actions.push(Action::Port(port));
            }
        }
        Ok(actions)
    }

    fn place_route(&mut self, model: &Model, route: &Route) {
        let key = route.key;
        let family = Family::of(&key.prefix);
        if let Some(Nexthop::Vxlan { remote_vtep, .. }) = route.nexthops.first() {
            self.vtep_users.entry(*remote_vtep).or_default().insert(key);
        }
        let Some(chain) = self.chains.get(&(key.table, family)).cloned() else {
            self.plan
                .sw
                .insert(ObjectKey::Route(key), SwReason::NoHardwarePath);
            return;
        };
        let level = family.max_len() - u32::from(key.prefix.len());
        let slot = self.slot(&chain, level);
        let n = chain.ports.len();
        let make = |actions: Arc<[Action]>| {
            slot.map(|(group, priority)| RouteRules {
                ports: chain.shared_ports.clone(),
                group,
                priority,
                match_ethertype: chain.groups.is_empty(),
                actions,
            })
        };
        let items = [
            ItemKind::Eth,
            match family {
                Family::V4 => ItemKind::Ipv4,
                Family::V6 => ItemKind::Ipv6,
            },
        ];
        let refused_fwd = self.refused.routes.get(&(key, false)).cloned();
        let refused_trap = self.refused.routes.get(&(key, true)).cloned();
        let check = |caps: &Caps, r: &RouteRules| {
            let refused = if r.is_trap() {
                &refused_trap
            } else {
                &refused_fwd
            };
            match refused {
                Some(refusal) => Err(refusal.clone()),
                None => caps.check_parts(items, &r.actions, &ingress(r.group, r.priority)),
            }
        };
        // 1. Forward in hardware.
        let wanted = if n == 0 {
            // The target's own refusal of this route says more than the missing path.
            Err(match refused_fwd.as_ref().or(refused_trap.as_ref()) {
                Some(r) => SwReason::Unsupported(r.clone()),
                None => SwReason::NoHardwarePath,
            })
        } else if slot.is_none() {
            Err(SwReason::PrioritiesExhausted)
        } else {
            self.route_actions(model, route)
        };
        let reason = match wanted.map(make) {
            Ok(Some(rules)) => {
                let shadows = self.covers_untrapped(key.table, family, &key.prefix);
                match (check(&self.caps, &rules), shadows) {
                    (Err(refusal), _) => SwReason::Unsupported(refusal),
                    (Ok(()), Some(s)) => SwReason::ShadowsSoftwareRoute(RouteKey {
                        table: key.table,
                        prefix: s,
                    }),
                    (Ok(()), None) if !self.room_for(n) => SwReason::TableFull,
                    (Ok(()), None) => {
                        // No software entry to clear: callers place a route only after
                        // `remove_route` (or for the first time).
                        self.set_route(key, Some(rules));
                        return;
                    }
                }
            }
            Ok(None) => SwReason::PrioritiesExhausted,
            Err(r) => r,
        };
        self.plan.sw.insert(ObjectKey::Route(key), reason);
        // 2. Trap to software so no covering hardware route takes its packets.
        if let Some(trap) = make(self.trap.clone()) {
            if n > 0 && check(&self.caps, &trap).is_ok() && self.room_for(n) {
                self.set_route(key, Some(trap));
                return;
            }
        }
        // 3. Untrapped: demote every hardware route covering it.
        self.mark_untrapped(key, key);
    }

    /// Records `prefix_key` as a software prefix without a trap and demotes every hardware
    /// route covering it, giving `because` as the reason.
    fn mark_untrapped(&mut self, prefix_key: RouteKey, because: RouteKey) {
        let family = Family::of(&prefix_key.prefix);
        if let Some(v) = self.vrfs.get_mut(&(prefix_key.table, family)) {
            v.untrapped.insert(prefix_key.prefix);
        }
        for len in (0..prefix_key.prefix.len()).rev() {
            let cover = RouteKey {
                table: prefix_key.table,
                prefix: prefix_key.prefix.truncate(len),
            };
            if self.is_hw_route(&cover) {
                self.set_route(cover, None);
                self.plan.sw.insert(
                    ObjectKey::Route(cover),
                    SwReason::ShadowsSoftwareRoute(because),
                );
                // Demoted without a trap: it is itself an untrapped software route now, so a
                // shorter route placed later must not cover it from hardware.
                if let Some(v) = self.vrfs.get_mut(&(prefix_key.table, family)) {
                    v.untrapped.insert(cover.prefix);
                }
            }
        }
    }

    fn remove_route(&mut self, key: RouteKey) {
        let family = Family::of(&key.prefix);
        self.set_route(key, None);
        if let Some(v) = self.vrfs.get_mut(&(key.table, family)) {
            v.untrapped.remove(&key.prefix);
        }
        self.plan.sw.remove(&ObjectKey::Route(key));
        for users in self.vtep_users.values_mut() {
            users.remove(&key);
        }
    }

    /// Some untrapped software prefix strictly inside (or equal to) `p`.
    fn covers_untrapped(&self, table: TableId, family: Family, p: &Prefix) -> Option<Prefix> {
        let v = self.vrfs.get(&(table, family))?;
        let lo = *p;
        v.untrapped
            .range(lo..)
            .take_while(|u| p.contains(u.addr()))
            .find(|u| p.covers(u))
            .copied()
    }

    fn place_nat(&mut self, model: &Model) {
        for nat in model.nat_rules().values() {
            let key = ObjectKey::Nat(nat.name.clone());
            match &nat.kind {
                NatKind::Static44 { .. } | NatKind::Static66 { .. } => {
                    self.plan.sw.insert(key, SwReason::Breakout);
                }
                NatKind::Napt44 { .. } => {
                    self.plan.sw.insert(key, SwReason::NeedsState);
                }
                NatKind::Nat64 { prefix, .. } => {
                    self.plan.sw.insert(key, SwReason::NeedsState);
                    // The NAT64 prefix acts as a route of the VPC: trap it so covering
                    // hardware routes do not take its packets; if that fails, demote them.
                    let Some(vpc) = model.vpcs().get(&nat.vpc) else {
                        continue;
                    };
                    let route = Route {
                        key: RouteKey {
                            table: vpc.table,
                            prefix: *prefix,
                        },
                        nexthops: vec![Nexthop::Vrf {
                            table: UNDERLAY_TABLE,
                        }],
                    };
                    self.place_nat64_trap(&nat.name, &route);
                }
            }
        }
    }

    fn place_nat64_trap(&mut self, nat: &Name, route: &Route) {
        let key = route.key;
        let Some(chain) = self.chains.get(&(key.table, Family::V6)).cloned() else {
            return;
        };
        let level = 128 - u32::from(key.prefix.len());
        let slot = self.slot(&chain, level);
        let pattern = dst_prefix_items(&key.prefix, chain.groups.is_empty());
        let rules: Vec<(PortId, Option<Rule>)> = chain
            .ports
            .iter()
            .map(|p| {
                (
                    *p,
                    slot.map(|(group, priority)| Rule {
                        port: *p,
                        attr: ingress(group, priority),
                        pattern: pattern.clone(),
                        actions: trap(),
                    }),
                )
            })
            .collect();
        let ok = rules.iter().all(|(port, r)| {
            r.as_ref().is_some_and(|r| {
                let id = RuleId::Nat64Prefix {
                    port: *port,
                    nat: nat.clone(),
                };
                self.admits(&id, r).is_ok()
            })
        }) && self.room_for(rules.len());
        if ok {
            for (port, rule) in rules {
                self.set_rule(
                    RuleId::Nat64Prefix {
                        port,
                        nat: nat.clone(),
                    },
                    rule,
                );
            }
            return;
        }
        self.mark_untrapped(key, key);
    }
}

/// The per-port operations that turn a route's rules `old` into `new`.
pub(crate) fn route_ops(
    key: &RouteKey,
    old: Option<&RouteRules>,
    new: Option<&RouteRules>,
    out: &mut Vec<Op>,
) {
    if let (Some(a), Some(b)) = (old, new) {
        if a == b {
            return;
        }
    }
    let ports: BTreeSet<PortId> = old
        .iter()
        .chain(new.iter())
        .flat_map(|r| r.ports.iter().copied())
        .collect();
    for port in ports {
        let id = RuleId::Route { key: *key, port };
        let before = old.filter(|r| r.ports.contains(&port));
        let after = new.filter(|r| r.ports.contains(&port));
        match (before, after) {
            (None, None) => {}
            (None, Some(b)) => out.push(Op::Create(id, b.rule(key, port))),
            (Some(a), None) => out.push(Op::Destroy(id, a.group)),
            (Some(a), Some(b)) => {
                let (ra, rb) = (a.rule(key, port), b.rule(key, port));
                if ra != rb {
                    out.push(Op::Replace(id, rb));
                }
            }
        }
    }
}

/// Merges the operations on each rule and each meter into the single operation with the same
/// effect (none if it is created and destroyed again), at the position of its first operation.
/// Whether the object existed before is told by its first operation: only a create starts from
/// nothing.
fn coalesce(ops: Vec<Op>) -> Vec<Op> {
    // Per rule: first position, whether it existed before, its last state, and the group of
    // the rule as it was (what a destroy removes).
    let mut rules: BTreeMap<RuleId, (usize, bool, Option<Rule>, u32)> = BTreeMap::new();
    let mut meters: BTreeMap<MeterRef, (usize, bool, Option<MeterProfile>)> = BTreeMap::new();
    for (i, op) in ops.into_iter().enumerate() {
        match op {
            Op::Create(id, r) => rules.entry(id).or_insert((i, false, None, 0)).2 = Some(r),
            Op::Replace(id, r) => {
                let group = r.attr.group;
                rules.entry(id).or_insert((i, true, None, group)).2 = Some(r)
            }
            Op::Destroy(id, group) => {
                let e = rules.entry(id).or_insert((i, true, None, group));
                e.2 = None;
                e.3 = group;
            }
            Op::CreateMeter(m, p) => meters.entry(m).or_insert((i, false, None)).2 = Some(p),
            Op::UpdateMeter(m, p) => meters.entry(m).or_insert((i, true, None)).2 = Some(p),
            Op::DestroyMeter(m) => meters.entry(m).or_insert((i, true, None)).2 = None,
        }
    }
    let mut out: Vec<(usize, Op)> = Vec::new();
    for (id, (i, existed, last, group)) in rules {
        match (existed, last) {
            (false, None) => {}
            (false, Some(r)) => out.push((i, Op::Create(id, r))),
            (true, Some(r)) => out.push((i, Op::Replace(id, r))),
            (true, None) => out.push((i, Op::Destroy(id, group))),
        }
    }
    for (m, (i, existed, last)) in meters {
        match (existed, last) {
            (false, None) => {}
            (false, Some(p)) => out.push((i, Op::CreateMeter(m, p))),
            (true, Some(p)) => out.push((i, Op::UpdateMeter(m, p))),
            (true, None) => out.push((i, Op::DestroyMeter(m))),
        }
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, op)| op).collect()
}

/// Whether every group of a chain is closed on every port of the chain.
fn chain_complete(plan: &Plan, chain: &Chain, table: TableId, family: Family) -> bool {
    chain.ports.iter().all(|port| {
        (0..chain.groups.len()).all(|index| {
            plan.hw.structure.contains_key(&RuleId::ChainEnd {
                port: *port,
                table,
                family,
                index: index as u32,
            })
        })
    })
}

fn ingress(group: u32, priority: u32) -> Attr {
    Attr {
        group,
        priority,
        ingress: true,
        egress: false,
        transfer: false,
    }
}

fn vxlan_to(vtep: Ipv4Addr) -> Vec<Item> {
    let mut ip = exact4(vtep);
    ip.spec.proto = 17;
    ip.mask.proto = 0xff;
    vec![
        eth_type(Family::V4),
        Item::Ipv4(ip),
        Item::Udp(Masked {
            spec: L4Fields {
                src_port: 0,
                dst_port: crate::packet::VXLAN_PORT,
            },
            mask: L4Fields {
                src_port: 0,
                dst_port: 0xffff,
            },
        }),
    ]
}

/// The underlay next hop (port, MAC) toward a remote VTEP: the longest underlay route covering
/// it, which must have underlay next hops; with ECMP, the first. The software pipeline uses the
/// same rule.
pub fn resolve_vtep(model: &Model, vtep: Ipv4Addr) -> Option<(PortId, MacAddr)> {
    let route = model.lookup(UNDERLAY_TABLE, IpAddr::V4(vtep))?;
    match route.nexthops.first()? {
        Nexthop::Underlay { port, mac, .. } => Some((*port, *mac)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Offloaded NAPT44 sessions

/// `eth type=IPv4 / ipv4 [dst in block] proto=TCP / tcp flags` for a teardown trap.
fn teardown_pattern(block: Option<&Prefix>, flag: TeardownFlag) -> Vec<Item> {
    let mut ip = Masked {
        spec: Ipv4Fields {
            proto: ip_proto_of(Proto::Tcp),
            ..Default::default()
        },
        mask: Ipv4Fields {
            proto: 0xff,
            ..Default::default()
        },
    };
    if let Some(IpAddr::V4(a)) = block.map(Prefix::addr) {
        ip.spec.dst = a;
        ip.mask.dst = Ipv4Addr::from(crate::model::mask32(block.map_or(0, Prefix::len)));
    }
    let (spec, mask) = flag.spec_mask();
    vec![
        eth_type(Family::V4),
        Item::Ipv4(ip),
        Item::Tcp(Masked {
            spec: ir::TcpFields {
                flags: spec,
                ..Default::default()
            },
            mask: ir::TcpFields {
                flags: mask,
                ..Default::default()
            },
        }),
    ]
}

fn ip_proto_of(proto: Proto) -> u8 {
    match proto {
        Proto::Tcp => crate::packet::ip_proto::TCP,
        Proto::Udp => crate::packet::ip_proto::UDP,
        Proto::Icmp => crate::packet::ip_proto::ICMP,
    }
}

/// The exact 5-tuple match of one direction of a session (TCP flags not matched).
fn five_tuple(proto: Proto, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<Item> {
    let ip = Item::Ipv4(Masked {
        spec: Ipv4Fields {
            src: src.0,
            dst: dst.0,
            proto: ip_proto_of(proto),
        },
        mask: Ipv4Fields {
            src: Ipv4Addr::BROADCAST,
            dst: Ipv4Addr::BROADCAST,
            proto: 0xff,
        },
    });
    let l4 = match proto {
        Proto::Tcp => Item::Tcp(Masked {
            spec: ir::TcpFields {
                src_port: src.1,
                dst_port: dst.1,
                flags: 0,
            },
            mask: ir::TcpFields {
                src_port: 0xffff,
                dst_port: 0xffff,
                flags: 0,
            },
        }),
        Proto::Udp | Proto::Icmp => Item::Udp(Masked {
            spec: L4Fields {
                src_port: src.1,
                dst_port: dst.1,
            },
            mask: L4Fields {
                src_port: 0xffff,
                dst_port: 0xffff,
            },
        }),
    };
    vec![eth_type(Family::V4), ip, l4]
}

/// The forwarding tail of a session rule: what the software path does after the TTL.
fn push_forward(actions: &mut Vec<Action>, f: &Forward) {
    actions.push(Action::SetMacSrc(f.src_mac));
    actions.push(Action::SetMacDst(f.dst_mac));
    if let Some(e) = f.encap {
        actions.push(Action::VxlanEncap(e));
    }
    actions.push(Action::Port(f.port));
}

/// Why a target cannot hold session rules and teardown traps at all (a representative TCP
/// session rule of each direction and a teardown trap, checked against the capabilities), or
/// `None` when it can.
pub fn session_shape_refusal(caps: &Caps) -> Option<Refusal> {
    let a = (Ipv4Addr::new(10, 0, 0, 1), 1000);
    let b = (Ipv4Addr::new(192, 0, 2, 1), 80);
    let fwd = Forward {
        port: PortId(0),
        src_mac: MacAddr::default(),
        dst_mac: MacAddr::default(),
        encap: None,
    };
    let mut out = vec![Action::SetIpv4Src(a.0), Action::SetTpSrc(a.1)];
    let mut inb = vec![Action::SetIpv4Dst(a.0), Action::SetTpDst(a.1)];
    for actions in [&mut out, &mut inb] {
        actions.push(Action::DecTtl);
        actions.push(Action::Count);
        push_forward(actions, &fwd);
    }
    let rules = [
        Rule {
            port: PortId(0),
            attr: ingress(0, PRIO_SESSION),
            pattern: five_tuple(Proto::Tcp, a, b),
            actions: out,
        },
        Rule {
            port: PortId(0),
            attr: ingress(0, PRIO_SESSION),
            pattern: five_tuple(Proto::Tcp, b, a),
            actions: inb,
        },
        Rule {
            port: PortId(0),
            attr: ingress(0, PRIO_TEARDOWN_TRAP),
            pattern: teardown_pattern(None, TeardownFlag::Fin),
            actions: trap(),
        },
    ];
    rules.iter().find_map(|r| caps.check(r).err())
}

/// The hardware rules of one offloaded NAPT44 session (see "Offloading established NAT
/// sessions" in the module documentation): the outbound rule on every port of the NAT's VPC,
/// the inbound rule on every uplink, all in group 0 at [`PRIO_SESSION`], each doing to its
/// packets exactly what the software path does:
///
/// - outbound: `eth/ipv4 src=inside dst=remote/tcp|udp sport=inside dport=remote` →
///   `[METER(VPC), MARK(resume in the VPC), ] SET_IPV4_SRC outside, SET_TP_SRC outside port,
///   DEC_TTL, COUNT, SET_MAC_SRC, SET_MAC_DST, PORT`. The VPC meter comes first because the
///   software path polices at ingress, before the TTL check; its mark makes a packet that
///   `DEC_TTL` hands back to software (TTL ≤ 1) resume in the VPC without being policed twice.
/// - inbound: `eth/ipv4 src=remote dst=outside/tcp|udp sport=remote dport=outside port` →
///   `SET_IPV4_DST inside, SET_TP_DST inside port, DEC_TTL, COUNT, SET_MAC_SRC, SET_MAC_DST,
///   PORT` (no meter: the software path polices nothing on an uplink).
///
/// Refused (the session stays in software) when the VPC's meter runs in software, when a TCP
/// session's teardown traps are not all in `plan`, or when `caps` refuse the shape. `shard`
/// names the pipeline (lcore) the session belongs to.
pub fn session_rules(
    offer: &SessionOffer,
    shard: u16,
    plan: &Plan,
    caps: &Caps,
    model: &Model,
) -> Result<Vec<(RuleId, Rule)>, SwReason> {
    let nat = model
        .nat_rules()
        .get(&offer.nat)
        .ok_or(SwReason::SessionPath)?;
    let NatKind::Napt44 { pool, .. } = &nat.kind else {
        return Err(SwReason::SessionPath);
    };
    if offer.proto == Proto::Icmp {
        return Err(SwReason::SessionPath);
    }
    let vpc = model.vpcs().get(&nat.vpc).ok_or(SwReason::NoHardwarePath)?;
    let node = model.node().ok_or(SwReason::NoHardwarePath)?;
    if vpc.ports.is_empty() || node.uplinks.is_empty() {
        return Err(SwReason::NoHardwarePath);
    }
    let meter = match model.meter_for(&MeterTarget::Vpc(vpc.name.clone())) {
        None => None,
        Some(_) => {
            let r = Compiler::vpc_meter_ref(vpc.table);
            if !plan.hw.meters.contains_key(&r) {
                return Err(SwReason::MeterInSoftware);
            }
            Some(r)
        }
    };
    if offer.proto == Proto::Tcp {
        let block = pool
            .to_prefixes()
            .into_iter()
            .find(|b| b.contains(IpAddr::V4(offer.outside.0)))
            .ok_or(SwReason::SessionPath)?;
        let trapped = |port: PortId, block: Option<Prefix>| {
            TeardownFlag::BOTH.iter().all(|flag| {
                plan.hw.structure.contains_key(&RuleId::TeardownTrap {
                    port,
                    block,
                    flag: *flag,
                })
            })
        };
        let all = vpc.ports.iter().all(|p| trapped(*p, None))
            && node.uplinks.iter().all(|p| trapped(*p, Some(block)));
        if !all {
            return Err(SwReason::TeardownNotTrapped);
        }
    }
    let mut out_actions = Vec::with_capacity(10);
    if let Some(m) = meter {
        out_actions.push(Action::Meter(m));
        out_actions.push(Action::Mark(mark::resume_in_vrf(vpc.table.0)));
    }
    out_actions.push(Action::SetIpv4Src(offer.outside.0));
    out_actions.push(Action::SetTpSrc(offer.outside.1));
    out_actions.push(Action::DecTtl);
    out_actions.push(Action::Count);
    push_forward(&mut out_actions, &offer.outbound);
    let mut in_actions = Vec::with_capacity(8);
    in_actions.push(Action::SetIpv4Dst(offer.inside.0));
    in_actions.push(Action::SetTpDst(offer.inside.1));
    in_actions.push(Action::DecTtl);
    in_actions.push(Action::Count);
    push_forward(&mut in_actions, &offer.inbound);
    let out_rule = |port: PortId| Rule {
        port,
        attr: ingress(0, PRIO_SESSION),
        pattern: five_tuple(offer.proto, offer.inside, offer.remote),
        actions: out_actions.clone(),
    };
    let in_rule = |port: PortId| Rule {
        port,
        attr: ingress(0, PRIO_SESSION),
        pattern: five_tuple(offer.proto, offer.remote, offer.outside),
        actions: in_actions.clone(),
    };
    let id = |dir: SessionDir, port: PortId| RuleId::Session {
        shard,
        nat: offer.nat.clone(),
        id: offer.id,
        dir,
        port,
    };
    let mut rules = Vec::with_capacity(vpc.ports.len() + node.uplinks.len());
    for port in &vpc.ports {
        rules.push((id(SessionDir::Outbound, *port), out_rule(*port)));
    }
    for port in &node.uplinks {
        rules.push((id(SessionDir::Inbound, *port), in_rule(*port)));
    }
    // Every rule of a direction has the same shape: check one of each.
    for (_, r) in rules
        .iter()
        .take(1)
        .chain(rules.iter().skip(vpc.ports.len()).take(1))
    {
        caps.check(r).map_err(SwReason::Unsupported)?;
    }
    Ok(rules)
}
