//! The reference NIC: executes [`crate::ir`] rules on packets under a capability profile and
//! table limits, answering with the same error kinds real NICs return.
//!
//! It is the executable definition of the execution model described in [`crate::ir`], the
//! oracle of the property tests (the hardware half of "hardware then software ≡ model") and a
//! benchmark target. It favours clarity and exactness over speed, without quadratic blowups:
//! rules are indexed per (port, group) and kept sorted by (priority, creation order).
//!
//! # Rule table
//!
//! - [`RefNic::validate`] is `rte_flow_validate`: [`Caps::check`] (which answers
//!   [`Refusal::NotImplemented`] for the `None` profile), then the attributes (ingress only;
//!   egress, transfer or no direction at all → [`Refusal::Attribute`]), then the actions: refnic
//!   never executes `Nat64` (no profile offers it; a probed capability set that lists it is
//!   still refused with [`Refusal::Action`]), an empty `Rss` list and a `VxlanEncap` whose VNI
//!   does not fit 24 bits are refused the same way; finally the rule needs exactly one fate
//!   action (`Queue`, `Rss`, `Drop`, `Port`, `Jump`), else [`Refusal::NoFate`]. No table space
//!   is checked.
//! - [`RefNic::create`] validates, then refuses with [`Refusal::NoSpace`] when `max_rules` rules
//!   are installed, with [`Refusal::Group`] when the rule would make its port use more distinct
//!   non-zero groups than `max_groups` (a rule uses its own group and the groups it jumps to;
//!   groups are per port, as tables of a non-transfer port are; the group reported is the first
//!   one over budget), and with [`Refusal::NoMeter`] when a `Meter` action names a meter that does
//!   not exist. Nothing changes when a call fails.
//! - Meters are created and destroyed separately, like `rte_mtr` objects. A meter still used by a
//!   rule cannot be destroyed ([`RefNicError::MeterInUse`], `EBUSY`), so every installed rule's
//!   meters exist.
//! - Rules on the same (port, group, priority) may overlap, as on real NICs; the one created first
//!   wins. (The compiler never relies on this; see [`crate::ir`].)
//!
//! # Lookup
//!
//! A packet starts in group 0 of its ingress port. Among the rules of that (port, group), the
//! matching one with the lowest priority value wins, ties going to the earliest created. A miss
//! in group 0 sends the packet to software: [`NicVerdict::ToSoftware`] on
//! [`ir::SOFTWARE_QUEUE`] with the mark set so far (none unless a jump set one). A miss in any
//! other group drops it ([`NicDrop::GroupMiss`]). At most [`MAX_JUMPS`] jumps are taken per
//! packet; one more drops it ([`NicDrop::JumpLoop`]).
//!
//! # Patterns
//!
//! The frame is dissected into a header stack, outer to inner: Ethernet; any 802.1Q tags
//! (EtherType `0x8100`); IPv4 or IPv6; UDP or TCP, chosen by the IPv4 protocol / the IPv6 base
//! header's next header (extension headers are not walked); for UDP to port 4789, VXLAN and
//! then the inner frame's stack the same way. Item `i` of a pattern must match header `i` of the
//! stack: same kind and `field & mask == spec & mask` for every field. So:
//! - an empty pattern matches every frame, even one too short to be Ethernet; a pattern shorter
//!   than the stack ignores the rest; a pattern longer than the stack does not match;
//! - the Eth item's `ethertype` is the two bytes after the MACs (`0x8100` for a tagged frame),
//!   and a tagged frame only matches patterns that have a Vlan item in that place;
//! - a pattern that does not start with an Eth item is read as if it started with an Eth item
//!   that matches anything (`IPV4 / UDP` works as in `rte_flow`); no other item is implied;
//! - IPv4 non-first fragments have no L4 header in the stack, so L4 items never match them;
//!   fragments (first ones included) are not followed into VXLAN;
//! - items after a Vxlan item describe the inner frame, starting with its Ethernet header.
//!
//! A header is in the stack when it is complete and its length fields are consistent: IPv4
//! needs version 4, IHL ≥ 5, the whole header in the frame and total length ≥ header length
//! (its payload ends at the total length, clamped to the frame: Ethernet padding is not
//! payload); IPv6 needs version 6 and 40 bytes (payload clamped the same way); UDP 8 bytes, TCP
//! 20 bytes of IP payload; VXLAN a UDP length of at least 16 that fits the IP payload. Checksums
//! are not verified, as NICs do not drop on them.
//!
//! # Actions
//!
//! Actions run in list order. The fate action records what happens to the packet, and takes
//! effect once the whole list has run: `Queue(q)` → [`NicVerdict::ToSoftware`] on `q`; `Rss(qs)`
//! → the same on `qs[0]` (refnic does not hash: the spread over queues is the agent's business);
//! `Drop` → [`NicDrop::Rule`]; `Port(p)` → [`NicVerdict::Tx`]; `Jump(g)` → lookup continues in
//! group `g` with the rewritten frame. Two actions end processing early, skipping the rest of
//! the list: a red meter, and `DecTtl` on an expired packet.
//!
//! - `Count` adds one packet and the frame's length at that point to the rule's counters (each
//!   `Count` in the list counts; counters wrap). [`RefNic::query_count`] reads them.
//! - `Mark(m)` sets the mark delivered with the packet; it survives jumps, the last one wins.
//! - `Meter(id)` colours the frame (its length at that point) with the meter; red →
//!   [`NicDrop::Meter`], green and yellow continue.
//! - `SetMacSrc`/`SetMacDst` rewrite the outer Ethernet header.
//! - `DecTtl` acts on the outer IP header. A TTL or hop limit of 0 or 1 traps the packet to
//!   software (routers punt TTL expiry): [`NicVerdict::ToSoftware`] on [`ir::SOFTWARE_QUEUE`] with
//!   the current mark, and the frame as it was when the current rule started (the rule's own
//!   rewrites are undone; those of rules in earlier groups, such as a decap, remain). Otherwise it
//!   decrements it and updates the IPv4 header checksum.
//! - `SetIpv4Src/Dst`, `SetIpv6Src/Dst`, `SetTpSrc/Dst` rewrite the outer IP / L4 header and
//!   update every checksum covering the field: the IPv4 header checksum, the TCP and UDP checksums
//!   through the pseudo-header (and the ICMPv6 one for IPv6 addresses). A UDP checksum of zero
//!   means "none" and stays zero (RFC 768; RFC 6935 tunnels over IPv6); a computed zero is sent as
//!   `0xFFFF`. Updates are incremental (RFC 1624 eqn. 3), which equals a full recomputation and
//!   also works on first fragments; IPv4 non-first fragments carry no L4 header, so only the IP
//!   header changes. `SetIpv6Src/Dst` on a packet whose next header is an IPv6 extension header
//!   drops it as malformed rather than leave a wrong upper-layer checksum behind it.
//! - `VxlanEncap(e)` pushes Ethernet (`e.eth_dst`, `e.eth_src`, `0x0800`), IPv4 (IHL 5, TOS 0,
//!   id 0, DF, TTL 64, UDP, checksum, `e.ip_src` → `e.ip_dst`), UDP (`e.udp_src` → 4789, checksum
//!   0) and VXLAN (flags `0x08`, the VNI) in front of the frame.
//! - `VxlanDecap` needs the frame to be Ethernet (untagged) / IPv4 or IPv6 / UDP to 4789 /
//!   VXLAN with at least an Ethernet header inside; it leaves the inner frame (up to the end of
//!   the UDP datagram).
//! - `RawEncap(b)` prepends `b`; `RawDecap(n)` strips `n` bytes.
//!
//! An action on a header the frame does not have (or one that cannot be done, like an
//! encapsulation beyond 65535 bytes of IP) drops the packet with [`NicDrop::Malformed`]. Nothing
//! panics, whatever the bytes.

use core::net::{Ipv4Addr, Ipv6Addr};
use std::collections::{BTreeMap, BTreeSet};

use crate::caps::{Caps, Refusal};
use crate::ir::{self, Action, Item, Masked, MeterRef, Rule, VxlanEncap};
use crate::model::{MacAddr, MeterProfile, PortId};
use crate::packet::{checksum, ethertype, ip_proto, VXLAN_PORT};
use crate::soft::meter::{Color, Meter};

/// The most jumps one packet may take; the next one drops it with [`NicDrop::JumpLoop`].
pub const MAX_JUMPS: u32 = 32;

/// A rule installed on the reference NIC. Handles grow with creation order and are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleHandle(pub u64);

/// What the NIC did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NicVerdict {
    /// Transmitted on a port (the frame as rewritten).
    Tx {
        /// The egress port.
        port: PortId,
    },
    /// Delivered to a software receive queue.
    ToSoftware {
        /// The queue.
        queue: u16,
        /// The last mark set, if any.
        mark: Option<u32>,
    },
    /// Dropped.
    Drop(NicDrop),
}

/// Why the NIC dropped a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NicDrop {
    /// A rule's `Drop` action.
    Rule,
    /// A meter coloured it red.
    Meter,
    /// No rule matched in this non-root group.
    GroupMiss {
        /// The group.
        group: u32,
    },
    /// More than [`MAX_JUMPS`] jumps.
    JumpLoop,
    /// An action needed a header the frame does not have.
    Malformed,
}

/// Errors of rule and meter management besides rule refusals.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefNicError {
    /// No rule with this handle.
    #[error("unknown rule {0:?}")]
    UnknownRule(RuleHandle),
    /// No meter with this id.
    #[error("unknown meter {0:?}")]
    UnknownMeter(MeterRef),
    /// A meter with this id exists already.
    #[error("meter {0:?} exists already")]
    DuplicateMeter(MeterRef),
    /// The meter is used by a rule (`EBUSY`): destroy the rules first.
    #[error("meter {meter:?} is used by rule {rule:?}")]
    MeterInUse {
        /// The meter.
        meter: MeterRef,
        /// One rule using it.
        rule: RuleHandle,
    },
    /// The target refuses ([`Refusal::NoMeter`] when the meter table is full,
    /// [`Refusal::NotImplemented`] for a port without a flow API).
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// One installed rule.
#[derive(Debug, Clone)]
struct Installed {
    rule: Rule,
    /// (packets, bytes), for rules with a `Count` action.
    counter: Option<(u64, u64)>,
    /// Whether to keep the frame as it was on entry, for a `DecTtl` trap after rewrites.
    snapshot_on_entry: bool,
}

/// Where an installed rule lives.
#[derive(Debug, Clone, Copy)]
struct Slot {
    port: PortId,
    group: u32,
    priority: u32,
}

/// The reference NIC. See the module documentation for its semantics.
#[derive(Debug, Clone)]
pub struct RefNic {
    caps: Caps,
    /// Rules per (port, group), in lookup order: (priority, creation order).
    tables: BTreeMap<(PortId, u32), BTreeMap<(u32, RuleHandle), Installed>>,
    /// Every installed rule, by handle.
    index: BTreeMap<RuleHandle, Slot>,
    /// How many installed rules use each non-zero (port, group).
    group_refs: BTreeMap<(PortId, u32), usize>,
    /// Distinct non-zero groups in use per port.
    groups_per_port: BTreeMap<PortId, u32>,
    meters: BTreeMap<MeterRef, Meter>,
    /// Which rules use each meter.
    meter_users: BTreeMap<MeterRef, BTreeSet<RuleHandle>>,
    next_handle: u64,
    /// Scratch space for the header stack, reused across packets.
    stack: Vec<Hdr>,
}

/// How a rule's action list ended.
enum Step {
    Jump(u32),
    Done(NicVerdict),
}

/// The recorded fate of an action list.
#[derive(Clone, Copy)]
enum Fate {
    Queue(u16),
    Drop,
    Port(PortId),
    Jump(u32),
}

fn is_fate(action: &Action) -> bool {
    matches!(
        action,
        Action::Queue(_) | Action::Rss(_) | Action::Drop | Action::Port(_) | Action::Jump(_)
    )
}

/// The non-zero groups a rule uses on its port: its own and those it jumps to.
fn groups_of(rule: &Rule) -> BTreeSet<u32> {
    let jumps = rule.actions.iter().filter_map(|a| match a {
        Action::Jump(g) => Some(*g),
        _ => None,
    });
    core::iter::once(rule.attr.group)
        .chain(jumps)
        .filter(|g| *g != 0)
        .collect()
}

fn meters_of(rule: &Rule) -> BTreeSet<MeterRef> {
    rule.actions
        .iter()
        .filter_map(|a| match a {
            Action::Meter(m) => Some(*m),
            _ => None,
        })
        .collect()
}

impl RefNic {
    /// An empty NIC with these capabilities.
    pub fn new(caps: Caps) -> Self {
        Self {
            caps,
            tables: BTreeMap::new(),
            index: BTreeMap::new(),
            group_refs: BTreeMap::new(),
            groups_per_port: BTreeMap::new(),
            meters: BTreeMap::new(),
            meter_users: BTreeMap::new(),
            next_handle: 1,
            stack: Vec::new(),
        }
    }

    /// The capabilities.
    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    /// Whether this port has no flow API at all (the `None` profile).
    fn not_implemented(&self) -> bool {
        self.caps.items.is_empty() && self.caps.actions.is_empty()
    }

    /// Checks a rule's shape like `rte_flow_validate`, without looking at table space.
    pub fn validate(&self, rule: &Rule) -> Result<(), Refusal> {
        self.caps.check(rule)?;
        let attr = &rule.attr;
        if !attr.ingress || attr.egress || attr.transfer {
            return Err(Refusal::Attribute);
        }
        for (index, action) in rule.actions.iter().enumerate() {
            let refused = match action {
                Action::Nat64(_) => true,
                Action::Rss(queues) => queues.is_empty(),
                Action::VxlanEncap(e) => e.vni > 0x00ff_ffff,
                _ => false,
            };
            if refused {
                return Err(Refusal::Action {
                    index,
                    action: action.kind(),
                });
            }
        }
        if rule.actions.iter().filter(|a| is_fate(a)).count() != 1 {
            return Err(Refusal::NoFate);
        }
        Ok(())
    }

    /// Installs a rule. On error nothing changes.
    pub fn create(&mut self, rule: &Rule) -> Result<RuleHandle, Refusal> {
        self.validate(rule)?;
        let max_rules = usize::try_from(self.caps.max_rules).unwrap_or(usize::MAX);
        if self.index.len() >= max_rules {
            return Err(Refusal::NoSpace);
        }
        let port = rule.port;
        let groups = groups_of(rule);
        let mut in_use = self.groups_per_port.get(&port).copied().unwrap_or(0);
        for &group in &groups {
            if !self.group_refs.contains_key(&(port, group)) {
                in_use = in_use.saturating_add(1);
                if in_use > self.caps.max_groups {
                    return Err(Refusal::Group { group });
                }
            }
        }
        let meters = meters_of(rule);
        if meters.iter().any(|m| !self.meters.contains_key(m)) {
            return Err(Refusal::NoMeter);
        }

        // Everything checked: install.
        let handle = RuleHandle(self.next_handle);
        self.next_handle = self.next_handle.wrapping_add(1);
        for &group in &groups {
            let refs = self.group_refs.entry((port, group)).or_insert(0);
            if *refs == 0 {
                *self.groups_per_port.entry(port).or_insert(0) += 1;
            }
            *refs += 1;
        }
        for m in meters {
            self.meter_users.entry(m).or_default().insert(handle);
        }
        let has_count = rule.actions.iter().any(|a| matches!(a, Action::Count));
        let snapshot_on_entry = rule
            .actions
            .iter()
            .position(|a| matches!(a, Action::DecTtl))
            .is_some_and(|ttl| {
                rule.actions.iter().take(ttl).any(|a| {
                    let k = a.kind();
                    k.is_modify() || k.is_encap()
                })
            });
        let slot = Slot {
            port,
            group: rule.attr.group,
            priority: rule.attr.priority,
        };
        self.tables.entry((port, slot.group)).or_default().insert(
            (slot.priority, handle),
            Installed {
                rule: rule.clone(),
                counter: has_count.then_some((0, 0)),
                snapshot_on_entry,
            },
        );
        self.index.insert(handle, slot);
        Ok(handle)
    }

    /// Removes a rule.
    pub fn destroy(&mut self, h: RuleHandle) -> Result<(), RefNicError> {
        let slot = self.index.remove(&h).ok_or(RefNicError::UnknownRule(h))?;
        let key = (slot.port, slot.group);
        let Some(installed) = self
            .tables
            .get_mut(&key)
            .and_then(|t| t.remove(&(slot.priority, h)))
        else {
            // The index and the tables always agree; nothing more to undo.
            return Ok(());
        };
        if self.tables.get(&key).is_some_and(|t| t.is_empty()) {
            self.tables.remove(&key);
        }
        for group in groups_of(&installed.rule) {
            let gk = (slot.port, group);
            if let Some(refs) = self.group_refs.get_mut(&gk) {
                *refs = refs.saturating_sub(1);
                if *refs == 0 {
                    self.group_refs.remove(&gk);
                    if let Some(n) = self.groups_per_port.get_mut(&slot.port) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            self.groups_per_port.remove(&slot.port);
                        }
                    }
                }
            }
        }
        for m in meters_of(&installed.rule) {
            if let Some(users) = self.meter_users.get_mut(&m) {
                users.remove(&h);
                if users.is_empty() {
                    self.meter_users.remove(&m);
                }
            }
        }
        Ok(())
    }

    /// Creates a meter with full buckets at `now_ns`.
    pub fn create_meter(
        &mut self,
        id: MeterRef,
        profile: MeterProfile,
        now_ns: u64,
    ) -> Result<(), RefNicError> {
        if self.not_implemented() {
            return Err(Refusal::NotImplemented.into());
        }
        if self.meters.contains_key(&id) {
            return Err(RefNicError::DuplicateMeter(id));
        }
        let max = usize::try_from(self.caps.max_meters).unwrap_or(usize::MAX);
        if self.meters.len() >= max {
            return Err(Refusal::NoMeter.into());
        }
        self.meters.insert(id, Meter::new(profile, now_ns));
        Ok(())
    }

    /// Changes a meter's profile in place (`rte_mtr_meter_profile_update`): its rules keep
    /// using it; the buckets restart full at `now_ns`.
    pub fn update_meter(
        &mut self,
        id: MeterRef,
        profile: MeterProfile,
        now_ns: u64,
    ) -> Result<(), RefNicError> {
        let m = self
            .meters
            .get_mut(&id)
            .ok_or(RefNicError::UnknownMeter(id))?;
        *m = Meter::new(profile, now_ns);
        Ok(())
    }

    /// Destroys a meter no rule uses.
    pub fn destroy_meter(&mut self, id: MeterRef) -> Result<(), RefNicError> {
        if !self.meters.contains_key(&id) {
            return Err(RefNicError::UnknownMeter(id));
        }
        if let Some(&rule) = self.meter_users.get(&id).and_then(|u| u.first()) {
            return Err(RefNicError::MeterInUse { meter: id, rule });
        }
        self.meters.remove(&id);
        Ok(())
    }

    /// Number of meters.
    pub fn meter_count(&self) -> usize {
        self.meters.len()
    }

    fn installed(&self, h: RuleHandle) -> Option<&Installed> {
        let slot = self.index.get(&h)?;
        self.tables
            .get(&(slot.port, slot.group))?
            .get(&(slot.priority, h))
    }

    /// (packets, bytes) counted by a rule; `Some` only for rules with a `Count` action.
    pub fn query_count(&self, h: RuleHandle) -> Option<(u64, u64)> {
        self.installed(h)?.counter
    }

    /// Number of installed rules.
    pub fn rule_count(&self) -> usize {
        self.index.len()
    }

    /// The installed rules in creation order.
    pub fn rules(&self) -> impl Iterator<Item = (RuleHandle, &Rule)> {
        self.index
            .keys()
            .filter_map(|&h| self.installed(h).map(|i| (h, &i.rule)))
    }

    /// Runs a frame received on `ingress` through the rules, rewriting it in place.
    pub fn process(&mut self, ingress: PortId, frame: &mut Vec<u8>, now_ns: u64) -> NicVerdict {
        let mut mark = None;
        let mut group = 0u32;
        let mut jumps = 0u32;
        loop {
            let Self {
                tables,
                meters,
                stack,
                ..
            } = self;
            let hit = tables.get_mut(&(ingress, group)).and_then(|t| {
                dissect(frame, stack, true);
                t.values_mut()
                    .find(|i| pattern_matches(&i.rule.pattern, stack))
            });
            let Some(rule) = hit else {
                return if group == 0 {
                    NicVerdict::ToSoftware {
                        queue: ir::SOFTWARE_QUEUE,
                        mark,
                    }
                } else {
                    NicVerdict::Drop(NicDrop::GroupMiss { group })
                };
            };
            match run(rule, meters, stack, frame, &mut mark, now_ns) {
                Step::Done(verdict) => return verdict,
                Step::Jump(next) => {
                    jumps += 1;
                    if jumps > MAX_JUMPS {
                        return NicVerdict::Drop(NicDrop::JumpLoop);
                    }
                    group = next;
                }
            }
        }
    }
}

/// Executes one rule's actions on the frame.
fn run(
    rule: &mut Installed,
    meters: &mut BTreeMap<MeterRef, Meter>,
    stack: &mut Vec<Hdr>,
    frame: &mut Vec<u8>,
    mark: &mut Option<u32>,
    now_ns: u64,
) -> Step {
    let malformed = Step::Done(NicVerdict::Drop(NicDrop::Malformed));
    let snapshot = rule.snapshot_on_entry.then(|| frame.clone());
    let mut fate = None;
    for action in &rule.rule.actions {
        let done = match action {
            Action::Queue(q) => {
                fate = Some(Fate::Queue(*q));
                Ok(())
            }
            Action::Rss(queues) => {
                let q = queues.first().copied().unwrap_or(ir::SOFTWARE_QUEUE);
                fate = Some(Fate::Queue(q));
                Ok(())
            }
            Action::Drop => {
                fate = Some(Fate::Drop);
                Ok(())
            }
            Action::Port(p) => {
                fate = Some(Fate::Port(*p));
                Ok(())
            }
            Action::Jump(g) => {
                fate = Some(Fate::Jump(*g));
                Ok(())
            }
            Action::Count => {
                if let Some((packets, bytes)) = &mut rule.counter {
                    *packets = packets.wrapping_add(1);
                    *bytes = bytes.wrapping_add(frame.len() as u64);
                }
                Ok(())
            }
            Action::Mark(m) => {
                *mark = Some(*m);
                Ok(())
            }
            Action::Meter(id) => {
                let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
                match meters.get_mut(id).map(|m| m.color(len, now_ns)) {
                    Some(Color::Green | Color::Yellow) => Ok(()),
                    Some(Color::Red) | None => {
                        return Step::Done(NicVerdict::Drop(NicDrop::Meter));
                    }
                }
            }
            Action::SetMacSrc(mac) => set_mac(frame, 6, *mac),
            Action::SetMacDst(mac) => set_mac(frame, 0, *mac),
            Action::DecTtl => match dec_ttl(frame, stack) {
                Ok(true) => Ok(()),
                Ok(false) => {
                    if let Some(original) = snapshot {
                        *frame = original;
                    }
                    return Step::Done(NicVerdict::ToSoftware {
                        queue: ir::SOFTWARE_QUEUE,
                        mark: *mark,
                    });
                }
                Err(Malformed) => Err(Malformed),
            },
            Action::SetIpv4Src(a) => set_ipv4_addr(frame, stack, 12, *a),
            Action::SetIpv4Dst(a) => set_ipv4_addr(frame, stack, 16, *a),
            Action::SetIpv6Src(a) => set_ipv6_addr(frame, stack, 8, *a),
            Action::SetIpv6Dst(a) => set_ipv6_addr(frame, stack, 24, *a),
            Action::SetTpSrc(p) => set_port(frame, stack, 0, *p),
            Action::SetTpDst(p) => set_port(frame, stack, 2, *p),
            Action::VxlanEncap(e) => vxlan_encap(frame, e),
            Action::VxlanDecap => vxlan_decap(frame, stack),
            Action::RawEncap(bytes) => {
                frame.splice(0..0, bytes.iter().copied());
                Ok(())
            }
            Action::RawDecap(n) => {
                let n = usize::from(*n);
                if n > frame.len() {
                    Err(Malformed)
                } else {
                    frame.drain(..n);
                    Ok(())
                }
            }
            // Refused at create; never executed.
            Action::Nat64(_) => Err(Malformed),
        };
        if done.is_err() {
            return malformed;
        }
    }
    match fate {
        Some(Fate::Queue(queue)) => Step::Done(NicVerdict::ToSoftware { queue, mark: *mark }),
        Some(Fate::Port(port)) => Step::Done(NicVerdict::Tx { port }),
        Some(Fate::Jump(group)) => Step::Jump(group),
        // Validation guarantees one fate; a rule without one could only drop.
        Some(Fate::Drop) | None => Step::Done(NicVerdict::Drop(NicDrop::Rule)),
    }
}

// ---------------------------------------------------------------------------------------------
// Dissection
// ---------------------------------------------------------------------------------------------

/// One header of the stack, with the fields items match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    Eth {
        dst: [u8; 6],
        src: [u8; 6],
        ethertype: u16,
    },
    Vlan {
        tci: u16,
        inner_type: u16,
    },
    Ipv4 {
        src: u32,
        dst: u32,
        proto: u8,
    },
    Ipv6 {
        src: u128,
        dst: u128,
        next_header: u8,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
    },
    Tcp {
        src_port: u16,
        dst_port: u16,
        flags: u8,
    },
    Vxlan {
        flags: u8,
        vni: u32,
    },
}

/// A header in the frame: where it starts, how long it is, where the data it governs ends
/// (the frame for Ethernet, the IP packet for IP, the datagram for UDP and VXLAN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hdr {
    off: usize,
    len: usize,
    end: usize,
    layer: Layer,
}

const ETH_LEN: usize = 14;
const VLAN_LEN: usize = 4;
const IPV4_MIN_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const UDP_LEN: usize = 8;
const TCP_MIN_LEN: usize = 20;
const VXLAN_LEN: usize = 8;

fn get_u8(b: &[u8], off: usize) -> u8 {
    b.get(off).copied().unwrap_or(0)
}

fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes(get_array(b, off))
}

fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(get_array(b, off))
}

fn get_array<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    off.checked_add(N)
        .and_then(|end| b.get(off..end))
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .unwrap_or([0; N])
}

/// Writes `v` at `off`; `Err` if it does not fit.
fn put(b: &mut [u8], off: usize, v: &[u8]) -> Result<(), Malformed> {
    let end = off.checked_add(v.len()).ok_or(Malformed)?;
    b.get_mut(off..end).ok_or(Malformed)?.copy_from_slice(v);
    Ok(())
}

fn put_u16(b: &mut [u8], off: usize, v: u16) -> Result<(), Malformed> {
    put(b, off, &v.to_be_bytes())
}

/// Dissects `frame` into its header stack (see the module documentation). With `deep`, follows
/// VXLAN into inner frames; without, stops after the outer L4 header.
fn dissect(frame: &[u8], out: &mut Vec<Hdr>, deep: bool) {
    out.clear();
    let mut start = 0usize;
    let mut end = frame.len();
    loop {
        // Ethernet.
        if end.saturating_sub(start) < ETH_LEN {
            return;
        }
        let mut ethertype = get_u16(frame, start + 12);
        out.push(Hdr {
            off: start,
            len: ETH_LEN,
            end,
            layer: Layer::Eth {
                dst: get_array(frame, start),
                src: get_array(frame, start + 6),
                ethertype,
            },
        });
        let mut off = start + ETH_LEN;
        while ethertype == ethertype::VLAN {
            if end.saturating_sub(off) < VLAN_LEN {
                return;
            }
            let tci = get_u16(frame, off);
            ethertype = get_u16(frame, off + 2);
            out.push(Hdr {
                off,
                len: VLAN_LEN,
                end,
                layer: Layer::Vlan {
                    tci,
                    inner_type: ethertype,
                },
            });
            off += VLAN_LEN;
        }

        // IP.
        let avail = end.saturating_sub(off);
        let (proto, l4_off, l4_end, fragment) = match ethertype {
            ethertype::IPV4 => {
                let vihl = get_u8(frame, off);
                let hlen = usize::from(vihl & 0x0f) * 4;
                if avail < IPV4_MIN_LEN || vihl >> 4 != 4 || hlen < IPV4_MIN_LEN || hlen > avail {
                    return;
                }
                let total = usize::from(get_u16(frame, off + 2));
                if total < hlen {
                    return;
                }
                let ip_end = off + total.min(avail);
                let frag = get_u16(frame, off + 6);
                let more_fragments = frag & 0x2000 != 0;
                let frag_offset = frag & 0x1fff;
                let proto = get_u8(frame, off + 9);
                out.push(Hdr {
                    off,
                    len: hlen,
                    end: ip_end,
                    layer: Layer::Ipv4 {
                        src: get_u32(frame, off + 12),
                        dst: get_u32(frame, off + 16),
                        proto,
                    },
                });
                if frag_offset != 0 {
                    return;
                }
                (proto, off + hlen, ip_end, more_fragments)
            }
            ethertype::IPV6 => {
                if avail < IPV6_LEN || get_u8(frame, off) >> 4 != 6 {
                    return;
                }
                let payload = usize::from(get_u16(frame, off + 4));
                let ip_end = off + (IPV6_LEN + payload).min(avail);
                let next_header = get_u8(frame, off + 6);
                out.push(Hdr {
                    off,
                    len: IPV6_LEN,
                    end: ip_end,
                    layer: Layer::Ipv6 {
                        src: u128::from_be_bytes(get_array(frame, off + 8)),
                        dst: u128::from_be_bytes(get_array(frame, off + 24)),
                        next_header,
                    },
                });
                (next_header, off + IPV6_LEN, ip_end, false)
            }
            _ => return,
        };

        // L4.
        let l4_len = l4_end.saturating_sub(l4_off);
        match proto {
            ip_proto::UDP if l4_len >= UDP_LEN => {
                let dst_port = get_u16(frame, l4_off + 2);
                let udp_len = usize::from(get_u16(frame, l4_off + 4));
                let datagram_ok = (UDP_LEN..=l4_len).contains(&udp_len);
                out.push(Hdr {
                    off: l4_off,
                    len: UDP_LEN,
                    end: if datagram_ok {
                        l4_off + udp_len
                    } else {
                        l4_end
                    },
                    layer: Layer::Udp {
                        src_port: get_u16(frame, l4_off),
                        dst_port,
                    },
                });
                if !deep
                    || fragment
                    || dst_port != VXLAN_PORT
                    || !datagram_ok
                    || udp_len < UDP_LEN + VXLAN_LEN
                {
                    return;
                }
                let vx = l4_off + UDP_LEN;
                out.push(Hdr {
                    off: vx,
                    len: VXLAN_LEN,
                    end: l4_off + udp_len,
                    layer: Layer::Vxlan {
                        flags: frame.get(vx).copied().unwrap_or(0),
                        vni: get_u32(frame, vx + 4) >> 8,
                    },
                });
                start = vx + VXLAN_LEN;
                end = l4_off + udp_len;
            }
            ip_proto::TCP if l4_len >= TCP_MIN_LEN => {
                out.push(Hdr {
                    off: l4_off,
                    len: TCP_MIN_LEN,
                    end: l4_end,
                    layer: Layer::Tcp {
                        src_port: get_u16(frame, l4_off),
                        dst_port: get_u16(frame, l4_off + 2),
                        flags: get_u8(frame, l4_off + 13),
                    },
                });
                return;
            }
            _ => return,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Matching
// ---------------------------------------------------------------------------------------------

fn eq16(v: u16, m: Masked<u16>) -> bool {
    v & m.mask == m.spec & m.mask
}

fn eq8(v: u8, spec: u8, mask: u8) -> bool {
    v & mask == spec & mask
}

fn eq_mac(v: [u8; 6], spec: MacAddr, mask: MacAddr) -> bool {
    v.iter()
        .zip(spec.0)
        .zip(mask.0)
        .all(|((v, s), m)| v & m == s & m)
}

fn eq_v4(v: u32, spec: Ipv4Addr, mask: Ipv4Addr) -> bool {
    let mask = u32::from(mask);
    v & mask == u32::from(spec) & mask
}

fn eq_v6(v: u128, spec: Ipv6Addr, mask: Ipv6Addr) -> bool {
    let mask = u128::from(mask);
    v & mask == u128::from(spec) & mask
}

fn m16(spec: u16, mask: u16) -> Masked<u16> {
    Masked { spec, mask }
}

fn item_matches(item: &Item, layer: &Layer) -> bool {
    match (item, *layer) {
        (
            Item::Eth(m),
            Layer::Eth {
                dst,
                src,
                ethertype,
            },
        ) => {
            eq_mac(dst, m.spec.dst, m.mask.dst)
                && eq_mac(src, m.spec.src, m.mask.src)
                && eq16(ethertype, m16(m.spec.ethertype, m.mask.ethertype))
        }
        (Item::Vlan(m), Layer::Vlan { tci, inner_type }) => {
            eq16(tci, m16(m.spec.tci, m.mask.tci))
                && eq16(inner_type, m16(m.spec.inner_type, m.mask.inner_type))
        }
        (Item::Ipv4(m), Layer::Ipv4 { src, dst, proto }) => {
            eq_v4(src, m.spec.src, m.mask.src)
                && eq_v4(dst, m.spec.dst, m.mask.dst)
                && eq8(proto, m.spec.proto, m.mask.proto)
        }
        (
            Item::Ipv6(m),
            Layer::Ipv6 {
                src,
                dst,
                next_header,
            },
        ) => {
            eq_v6(src, m.spec.src, m.mask.src)
                && eq_v6(dst, m.spec.dst, m.mask.dst)
                && eq8(next_header, m.spec.next_header, m.mask.next_header)
        }
        (Item::Udp(m), Layer::Udp { src_port, dst_port }) => {
            eq16(src_port, m16(m.spec.src_port, m.mask.src_port))
                && eq16(dst_port, m16(m.spec.dst_port, m.mask.dst_port))
        }
        (
            Item::Tcp(m),
            Layer::Tcp {
                src_port,
                dst_port,
                flags,
            },
        ) => {
            eq16(src_port, m16(m.spec.src_port, m.mask.src_port))
                && eq16(dst_port, m16(m.spec.dst_port, m.mask.dst_port))
                && eq8(flags, m.spec.flags, m.mask.flags)
        }
        (Item::Vxlan(m), Layer::Vxlan { flags, vni }) => {
            let mask = m.mask.vni & 0x00ff_ffff;
            vni & mask == m.spec.vni & mask && flags & m.mask.flags == m.spec.flags & m.mask.flags
        }
        _ => false,
    }
}

/// Whether a pattern matches a header stack (see the module documentation).
fn pattern_matches(pattern: &[Item], stack: &[Hdr]) -> bool {
    let stack = match pattern.first() {
        None => return true,
        Some(Item::Eth(_)) => stack,
        // An implied Eth item that matches any Ethernet header.
        Some(_) => match stack.split_first() {
            Some((first, rest)) if matches!(first.layer, Layer::Eth { .. }) => rest,
            _ => return false,
        },
    };
    pattern.len() <= stack.len()
        && pattern
            .iter()
            .zip(stack)
            .all(|(item, hdr)| item_matches(item, &hdr.layer))
}

// ---------------------------------------------------------------------------------------------
// Rewrites
// ---------------------------------------------------------------------------------------------

/// The action needs a header the frame does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Malformed;

/// The outer IP header's position in `stack` (dissected without `deep`).
fn outer_ip(stack: &[Hdr]) -> Option<usize> {
    stack
        .iter()
        .position(|h| matches!(h.layer, Layer::Ipv4 { .. } | Layer::Ipv6 { .. }))
}

/// Rewrites the Ethernet source (`at` 6) or destination (0): any frame of at least 14 bytes
/// has an Ethernet header.
fn set_mac(frame: &mut [u8], at: usize, mac: MacAddr) -> Result<(), Malformed> {
    if frame.len() < ETH_LEN {
        return Err(Malformed);
    }
    put(frame, at, &mac.0)
}

/// Decrements the outer TTL / hop limit: `Ok(false)` when it has expired (nothing changed).
fn dec_ttl(frame: &mut [u8], stack: &mut Vec<Hdr>) -> Result<bool, Malformed> {
    dissect(frame, stack, false);
    let ip = outer_ip(stack)
        .and_then(|i| stack.get(i))
        .copied()
        .ok_or(Malformed)?;
    match ip.layer {
        Layer::Ipv4 { proto, .. } => {
            let ttl = get_u8(frame, ip.off + 8);
            if ttl <= 1 {
                return Ok(false);
            }
            let old = u16::from_be_bytes([ttl, proto]);
            let new = u16::from_be_bytes([ttl - 1, proto]);
            let csum = checksum::update16(get_u16(frame, ip.off + 10), old, new);
            put(frame, ip.off + 8, &[ttl - 1])?;
            put_u16(frame, ip.off + 10, csum)?;
            Ok(true)
        }
        Layer::Ipv6 { .. } => {
            let hop_limit = get_u8(frame, ip.off + 7);
            if hop_limit <= 1 {
                return Ok(false);
            }
            put(frame, ip.off + 7, &[hop_limit - 1])?;
            Ok(true)
        }
        _ => Err(Malformed),
    }
}

/// Updates a TCP or UDP checksum at `off` with `f`; a zero UDP checksum ("none") stays zero.
fn update_l4_checksum(
    frame: &mut [u8],
    l4: &Hdr,
    f: impl FnOnce(u16) -> u16,
) -> Result<(), Malformed> {
    match l4.layer {
        Layer::Udp { .. } => {
            let at = l4.off + 6;
            let old = get_u16(frame, at);
            if old != 0 {
                put_u16(frame, at, checksum::udp_nonzero(f(old)))?;
            }
            Ok(())
        }
        Layer::Tcp { .. } => {
            let at = l4.off + 16;
            let old = get_u16(frame, at);
            put_u16(frame, at, f(old))
        }
        _ => Ok(()),
    }
}

/// Rewrites the outer IPv4 source (`at` 12) or destination (16).
fn set_ipv4_addr(
    frame: &mut [u8],
    stack: &mut Vec<Hdr>,
    at: usize,
    addr: Ipv4Addr,
) -> Result<(), Malformed> {
    dissect(frame, stack, false);
    let i = outer_ip(stack).ok_or(Malformed)?;
    let ip = stack.get(i).copied().ok_or(Malformed)?;
    if !matches!(ip.layer, Layer::Ipv4 { .. }) {
        return Err(Malformed);
    }
    let old = get_u32(frame, ip.off + at);
    let new = u32::from(addr);
    let csum = checksum::update32(get_u16(frame, ip.off + 10), old, new);
    put(frame, ip.off + at, &new.to_be_bytes())?;
    put_u16(frame, ip.off + 10, csum)?;
    // Non-first fragments have no L4 header in the stack: nothing more to fix.
    if let Some(l4) = stack.get(i + 1) {
        update_l4_checksum(frame, l4, |c| checksum::update32(c, old, new))?;
    }
    Ok(())
}

/// IPv6 next-header values that are extension headers (behind which an upper-layer checksum
/// could hide).
fn is_ipv6_extension(next_header: u8) -> bool {
    matches!(
        next_header,
        ip_proto::HOPOPT
            | ip_proto::IPV6_ROUTE
            | ip_proto::IPV6_FRAG
            | ip_proto::IPV6_OPTS
            | 51 // AH
            | 135 // Mobility
            | 139 // HIP
            | 140 // Shim6
    )
}

/// Rewrites the outer IPv6 source (`at` 8) or destination (24).
fn set_ipv6_addr(
    frame: &mut [u8],
    stack: &mut Vec<Hdr>,
    at: usize,
    addr: Ipv6Addr,
) -> Result<(), Malformed> {
    dissect(frame, stack, false);
    let i = outer_ip(stack).ok_or(Malformed)?;
    let ip = stack.get(i).copied().ok_or(Malformed)?;
    let Layer::Ipv6 { next_header, .. } = ip.layer else {
        return Err(Malformed);
    };
    if is_ipv6_extension(next_header) {
        return Err(Malformed);
    }
    let old: [u8; 16] = get_array(frame, ip.off + at);
    let new = addr.octets();
    put(frame, ip.off + at, &new)?;
    let update = |c: u16| checksum::update_bytes(c, &old, &new);
    if let Some(l4) = stack.get(i + 1) {
        update_l4_checksum(frame, l4, update)?;
    } else if next_header == ip_proto::ICMPV6 && ip.end.saturating_sub(ip.off + ip.len) >= 4 {
        let at = ip.off + ip.len + 2;
        let csum = update(get_u16(frame, at));
        put_u16(frame, at, csum)?;
    }
    Ok(())
}

/// Rewrites the outer L4 source (`at` 0) or destination (2) port.
fn set_port(frame: &mut [u8], stack: &mut Vec<Hdr>, at: usize, port: u16) -> Result<(), Malformed> {
    dissect(frame, stack, false);
    let i = outer_ip(stack).ok_or(Malformed)?;
    let l4 = stack.get(i + 1).copied().ok_or(Malformed)?;
    if !matches!(l4.layer, Layer::Udp { .. } | Layer::Tcp { .. }) {
        return Err(Malformed);
    }
    let old = get_u16(frame, l4.off + at);
    put_u16(frame, l4.off + at, port)?;
    update_l4_checksum(frame, &l4, |c| checksum::update16(c, old, port))
}

/// Bytes pushed by a VXLAN encapsulation.
const VXLAN_ENCAP_LEN: usize = ETH_LEN + IPV4_MIN_LEN + UDP_LEN + VXLAN_LEN;

fn vxlan_encap(frame: &mut Vec<u8>, e: &VxlanEncap) -> Result<(), Malformed> {
    let udp_len = frame
        .len()
        .checked_add(UDP_LEN + VXLAN_LEN)
        .ok_or(Malformed)?;
    let ip_len = udp_len.checked_add(IPV4_MIN_LEN).ok_or(Malformed)?;
    let udp_len = u16::try_from(udp_len).map_err(|_| Malformed)?;
    let ip_len = u16::try_from(ip_len).map_err(|_| Malformed)?;

    let mut h = [0u8; VXLAN_ENCAP_LEN];
    // Ethernet.
    put(&mut h, 0, &e.eth_dst.0)?;
    put(&mut h, 6, &e.eth_src.0)?;
    put_u16(&mut h, 12, ethertype::IPV4)?;
    // IPv4: version 4, IHL 5, TOS 0, total length, id 0, DF, TTL 64, UDP, checksum, addresses.
    let ip = ETH_LEN;
    put(&mut h, ip, &[0x45, 0x00])?;
    put_u16(&mut h, ip + 2, ip_len)?;
    put_u16(&mut h, ip + 4, 0)?;
    put_u16(&mut h, ip + 6, 0x4000)?;
    put(&mut h, ip + 8, &[64, ip_proto::UDP])?;
    put(&mut h, ip + 12, &e.ip_src.octets())?;
    put(&mut h, ip + 16, &e.ip_dst.octets())?;
    let csum = checksum::finish(checksum::sum(
        h.get(ip..ip + IPV4_MIN_LEN).ok_or(Malformed)?,
    ));
    put_u16(&mut h, ip + 10, csum)?;
    // UDP: checksum 0 (none).
    let udp = ip + IPV4_MIN_LEN;
    put_u16(&mut h, udp, e.udp_src)?;
    put_u16(&mut h, udp + 2, VXLAN_PORT)?;
    put_u16(&mut h, udp + 4, udp_len)?;
    // VXLAN: flags I, VNI in the top 24 bits of the second word.
    let vx = udp + UDP_LEN;
    put(&mut h, vx, &[0x08, 0, 0, 0])?;
    put(&mut h, vx + 4, &((e.vni & 0x00ff_ffff) << 8).to_be_bytes())?;

    frame.splice(0..0, h);
    Ok(())
}

fn vxlan_decap(frame: &mut Vec<u8>, stack: &mut Vec<Hdr>) -> Result<(), Malformed> {
    dissect(frame, stack, true);
    let shape = (stack.first(), stack.get(1), stack.get(2), stack.get(3));
    let (Some(eth), Some(ip), Some(udp), Some(vx)) = shape else {
        return Err(Malformed);
    };
    let ok = matches!(eth.layer, Layer::Eth { .. })
        && matches!(ip.layer, Layer::Ipv4 { .. } | Layer::Ipv6 { .. })
        && matches!(udp.layer, Layer::Udp { dst_port, .. } if dst_port == VXLAN_PORT)
        && matches!(vx.layer, Layer::Vxlan { .. });
    let inner = vx.off + vx.len;
    let inner_end = vx.end;
    if !ok || inner_end.saturating_sub(inner) < ETH_LEN || inner_end > frame.len() {
        return Err(Malformed);
    }
    frame.truncate(inner_end);
    frame.drain(..inner);
    Ok(())
}
