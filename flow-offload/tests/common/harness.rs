//! "Reference NIC running `plan.hw`, then the software pipeline for what it misses or traps",
//! and the comparison of its results with the [`Reference`].

use core::net::Ipv4Addr;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use flow_offload::caps::{Caps, Profile};
use flow_offload::compile::{Op, RuleId};
use flow_offload::ir::Action;
use flow_offload::lpm::LpmLimits;
use flow_offload::model::{Model, PortId};
use flow_offload::packet::xlat;
use flow_offload::reconcile::Installed;
use flow_offload::refnic::{NicDrop, NicVerdict, RefNic, RuleHandle};
use flow_offload::soft::pipeline::{DropReason, Pipeline, PipelineLimits, Verdict};

use super::reference::{
    emit, emit_v6, parse, Expect, Frame, Net, Pick, Reference, Snat, L4, V4, V6,
};

/// Pipeline limits small enough to build quickly, large enough for every generated model.
pub fn limits() -> PipelineLimits {
    PipelineLimits {
        lpm: LpmLimits {
            max_routes: 1 << 12,
            max_groups: 1 << 12,
        },
        max_routes: 1 << 12,
        nat_sessions: 1 << 10,
    }
}

/// Every named profile plus small-capacity variants that force table-full, priorities-exhausted,
/// meters-exhausted and demotion paths.
pub fn caps_variants() -> Vec<(String, Caps)> {
    let mut out: Vec<(String, Caps)> = Profile::ALL
        .iter()
        .map(|p| (format!("{p:?}"), Caps::profile(*p)))
        .collect();
    let mut c = Caps::profile(Profile::Full);
    c.max_rules = 20;
    out.push(("Full/max_rules=20".into(), c));
    let mut c = Caps::profile(Profile::Partial);
    c.max_groups = 3;
    out.push(("Partial/max_groups=3".into(), c));
    let mut c = Caps::profile(Profile::Full);
    c.priorities = 6;
    c.max_meters = 1;
    out.push(("Full/priorities=6,max_meters=1".into(), c));
    let mut c = Caps::profile(Profile::Partial);
    c.max_rules = 40;
    c.max_groups = 8;
    out.push(("Partial/max_rules=40,max_groups=8".into(), c));
    let mut c = Caps::profile(Profile::TapLike);
    c.priorities = 6;
    out.push(("TapLike/priorities=6".into(), c));
    out
}

/// Whether RFC 7915 translation works (the translator was a stub when these tests were
/// written): an IPv6/UDP packet must translate.
pub fn xlat_available() -> bool {
    let v6 = emit_v6(
        &V6 {
            src: "2001:db8::1"
                .parse()
                .unwrap_or(core::net::Ipv6Addr::LOCALHOST),
            dst: "64:ff9b::a00:1"
                .parse()
                .unwrap_or(core::net::Ipv6Addr::LOCALHOST),
            hop_limit: 64,
            tclass: 0,
            flow: 0,
        },
        &L4::Udp {
            sport: 1000,
            dport: 53,
            csum: true,
            payload: vec![1, 2, 3, 4],
        },
    );
    let mut out = [0u8; 256];
    xlat::ipv6_to_ipv4(
        &v6,
        &mut out,
        Ipv4Addr::new(203, 0, 113, 1),
        Ipv4Addr::new(10, 0, 0, 1),
        None,
    )
    .is_ok()
}

/// What the system under test did with a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actual {
    /// Sent.
    Tx {
        /// Egress port.
        port: PortId,
        /// The frame.
        frame: Vec<u8>,
    },
    /// To the host.
    ToHost,
    /// Dropped.
    Drop {
        /// By a meter.
        policed: bool,
    },
}

/// The reference NIC loaded with a plan, and the software pipeline behind it.
#[derive(Debug)]
pub struct System {
    /// The NIC.
    pub nic: RefNic,
    /// Installed rules.
    pub handles: BTreeMap<RuleId, RuleHandle>,
    /// The pipeline.
    pub pipe: Pipeline,
    /// Where the last packet was decided (for messages).
    pub last_path: String,
}

/// Installs every meter and rule of a plan on a fresh NIC. Every create must succeed: a refusal
/// means the compiler emitted something the capabilities do not accept.
pub fn load_nic(
    caps: &Caps,
    hw: &Installed,
    reverse: bool,
) -> Result<(RefNic, BTreeMap<RuleId, RuleHandle>), String> {
    let mut nic = RefNic::new(caps.clone());
    for (r, p) in &hw.meters {
        nic.create_meter(*r, *p, 0)
            .map_err(|e| format!("meter {r:?} refused: {e}"))?;
    }
    let mut handles = BTreeMap::new();
    let rules: Vec<(&RuleId, &flow_offload::ir::Rule)> = if reverse {
        hw.rules.iter().rev().collect()
    } else {
        hw.rules.iter().collect()
    };
    for (id, rule) in rules {
        let h = nic
            .create(rule)
            .map_err(|e| format!("rule {id:?} refused: {e}: {rule:?}"))?;
        handles.insert(id.clone(), h);
    }
    Ok((nic, handles))
}

/// Applies compiler operations to an installed NIC, as an agent would (replace is make before
/// break).
pub fn apply_ops(
    nic: &mut RefNic,
    handles: &mut BTreeMap<RuleId, RuleHandle>,
    ops: &[Op],
) -> Result<(), String> {
    for op in ops {
        match op {
            Op::CreateMeter(r, p) => nic
                .create_meter(*r, *p, 0)
                .map_err(|e| format!("{op:?}: {e}"))?,
            Op::UpdateMeter(r, p) => {
                // The reference NIC has no in-place update: only used by rebuilds.
                return Err(format!("unexpected meter update {r:?} {p:?}"));
            }
            Op::DestroyMeter(r) => nic.destroy_meter(*r).map_err(|e| format!("{op:?}: {e}"))?,
            Op::Create(id, rule) => {
                let h = nic.create(rule).map_err(|e| format!("{op:?}: {e}"))?;
                if handles.insert(id.clone(), h).is_some() {
                    return Err(format!("{id:?} created twice"));
                }
            }
            Op::Replace(id, rule) => {
                let h = nic.create(rule).map_err(|e| format!("{op:?}: {e}"))?;
                let old = handles
                    .insert(id.clone(), h)
                    .ok_or_else(|| format!("replace of missing {id:?}"))?;
                nic.destroy(old).map_err(|e| format!("{op:?}: {e}"))?;
            }
            Op::Destroy(id, _) => {
                let old = handles
                    .remove(id)
                    .ok_or_else(|| format!("destroy of missing {id:?}"))?;
                nic.destroy(old).map_err(|e| format!("{op:?}: {e}"))?;
            }
        }
    }
    Ok(())
}

impl System {
    /// A NIC loaded with `hw` (a plan's hardware part, as installed) and a pipeline for `model`.
    pub fn new(
        model: &Model,
        caps: &Caps,
        hw: &Installed,
        reverse: bool,
        seed: u64,
    ) -> Result<System, String> {
        let (nic, handles) = load_nic(caps, hw, reverse)?;
        let pipe = Pipeline::new(model, limits(), seed).map_err(|e| format!("pipeline: {e}"))?;
        Ok(System {
            nic,
            handles,
            pipe,
            last_path: String::new(),
        })
    }

    /// Runs one packet: the NIC, then the pipeline for what the NIC hands to software.
    pub fn process(&mut self, port: PortId, bytes: &[u8], now: u64) -> Result<Actual, String> {
        let mut frame = bytes.to_vec();
        match self.nic.process(port, &mut frame, now) {
            NicVerdict::Tx { port } => {
                self.last_path = "hw: tx".into();
                Ok(Actual::Tx { port, frame })
            }
            NicVerdict::Drop(NicDrop::Rule) => {
                self.last_path = "hw: drop rule".into();
                Ok(Actual::Drop { policed: false })
            }
            NicVerdict::Drop(NicDrop::Meter) => {
                self.last_path = "hw: meter red".into();
                Ok(Actual::Drop { policed: true })
            }
            NicVerdict::Drop(d) => Err(format!(
                "the NIC dropped the packet with {d:?}: the plan leaves a reachable group \
                 unclosed or a rule that cannot apply"
            )),
            NicVerdict::ToSoftware { mark, .. } => {
                let v = self.pipe.process(&mut frame, port, mark, now);
                self.last_path = format!("hw: to software (mark {mark:x?}); sw: {v:?}");
                Ok(match v {
                    Verdict::Tx(port) => Actual::Tx { port, frame },
                    Verdict::ToHost => Actual::ToHost,
                    Verdict::Drop(r) => Actual::Drop {
                        policed: r == DropReason::Policed,
                    },
                })
            }
        }
    }
}

/// Hex of a frame, 16 bytes a line, for messages.
pub fn hex(b: &[u8]) -> String {
    let mut s = String::new();
    for (i, chunk) in b.chunks(16).enumerate() {
        let _ = write!(s, "\n  {:04x}:", i * 16);
        for x in chunk {
            let _ = write!(s, " {x:02x}");
        }
    }
    s
}

fn first_difference(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!("first difference at byte {i}"),
        None => format!("lengths {} vs {}", a.len(), b.len()),
    }
}

/// Whether the system's result is what the reference expects.
pub fn compare(e: &Expect, a: &Actual) -> Result<(), String> {
    let ok = match (e, a) {
        (Expect::Tx { port, frame }, Actual::Tx { port: p, frame: f }) => {
            if port != p || frame != f {
                return Err(format!(
                    "expected tx on {port:?}, got tx on {p:?} ({});\nexpected frame:{}\nactual frame:{}\nexpected: {:?}\nactual:   {:?}",
                    first_difference(frame, f),
                    hex(frame),
                    hex(f),
                    parse(frame),
                    parse(f),
                ));
            }
            true
        }
        (Expect::ToHost, Actual::ToHost) => true,
        (Expect::Drop { policed: None }, Actual::Drop { .. }) => true,
        (Expect::Drop { policed: Some(x) }, Actual::Drop { policed: y }) => x == y,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        let short = |e: &Expect| match e {
            Expect::Tx { port, frame } => format!("Tx {port:?} {:?}", parse(frame)),
            other => format!("{other:?}"),
        };
        let actual = match a {
            Actual::Tx { port, frame } => format!("Tx {port:?} {:?}", parse(frame)),
            other => format!("{other:?}"),
        };
        Err(format!("expected {}, got {actual}", short(e)))
    }
}

/// The system and the reference side by side.
#[derive(Debug)]
pub struct Checker {
    /// The system under test.
    pub sys: System,
    /// The reference.
    pub reference: Reference,
    /// Packets checked.
    pub packets: usize,
    /// Packets the system transmitted / dropped as policed / that went through stateful NAT.
    pub stats: Stats,
    /// What the system did with the last packet.
    pub last: Option<Actual>,
}

/// What the checked packets exercised.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// Transmitted.
    pub tx: usize,
    /// Transmitted by hardware alone.
    pub hw_tx: usize,
    /// Policed.
    pub policed: usize,
    /// Through NAPT44/NAT64 and transmitted.
    pub snat_tx: usize,
    /// Of those, through NAT64.
    pub nat64_tx: usize,
    /// Replies to those, translated back.
    pub replies_tx: usize,
}

/// A reply to a packet that left through a stateful NAT.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Ingress port.
    pub port: PortId,
    /// Frame.
    pub frame: Vec<u8>,
}

/// The NATed IPv4 header and transport of an output frame: the outer header if its source is
/// in the pool, else the inner one of a VXLAN encapsulation.
fn natted_header(frame: &[u8], pool: &flow_offload::model::Ipv4Range) -> Option<(V4, L4)> {
    let outer = parse(frame)?;
    let Net::V4 { ip, l4 } = outer.net else {
        return None;
    };
    if pool.contains(ip.src) {
        return Some((ip, l4));
    }
    let L4::Udp { payload, .. } = &l4 else {
        return Some((ip, l4));
    };
    match parse(payload.get(8..)?).map(|f| f.net) {
        Some(Net::V4 { ip, l4 }) => Some((ip, l4)),
        _ => Some((ip, l4)),
    }
}

impl Checker {
    /// A checker for `model` under `caps`.
    pub fn new(
        model: &Model,
        caps: &Caps,
        hw: &Installed,
        reverse: bool,
        seed: u64,
    ) -> Result<Checker, String> {
        Ok(Checker {
            sys: System::new(model, caps, hw, reverse, seed)?,
            reference: Reference::new(model, xlat_available()),
            packets: 0,
            stats: Stats::default(),
            last: None,
        })
    }

    /// A checker around an already loaded system.
    pub fn with_system(sys: System, model: &Model) -> Checker {
        Checker {
            sys,
            reference: Reference::new(model, xlat_available()),
            packets: 0,
            stats: Stats::default(),
            last: None,
        }
    }

    /// Checks one packet; returns a reply to send if it left through a stateful NAT.
    pub fn packet(
        &mut self,
        port: PortId,
        bytes: &[u8],
        now: u64,
    ) -> Result<Option<Reply>, String> {
        self.packets += 1;
        let actual = self.sys.process(port, bytes, now);
        let ctx = |msg: String, path: &str| {
            format!(
                "packet on {port:?} at t={now}: {msg}\npath: {path}\ninput: {:?}{}",
                parse(bytes),
                hex(bytes)
            )
        };
        let actual = actual.map_err(|m| ctx(m, &self.sys.last_path))?;
        self.last = Some(actual.clone());
        match &actual {
            Actual::Tx { .. } => {
                self.stats.tx += 1;
                if self.sys.last_path.starts_with("hw: tx") {
                    self.stats.hw_tx += 1;
                }
            }
            Actual::Drop { policed: true } => self.stats.policed += 1,
            _ => {}
        }
        let dry = self.reference.dry_run(port, bytes, now, Pick::Placeholder);
        let Some(snat) = dry.snat.clone() else {
            let e = self.reference.eval(port, bytes, now, Pick::Placeholder);
            return compare(&e.expect, &actual)
                .map(|()| None)
                .map_err(|m| ctx(m, &self.sys.last_path));
        };
        match &actual {
            Actual::Tx { frame, .. } => {
                let r = self
                    .snat_tx(&snat, frame)
                    .map_err(|m| ctx(m, &self.sys.last_path))?;
                let e = self.reference.eval(port, bytes, now, r.0);
                compare(&e.expect, &actual).map_err(|m| ctx(m, &self.sys.last_path))?;
                self.stats.snat_tx += 1;
                if snat.nat64 {
                    self.stats.nat64_tx += 1;
                }
                Ok(Some(r.1))
            }
            _ => {
                // Dropped (or to the host) after or instead of translation: some valid choice
                // must explain it. Most drops do not depend on the choice at all.
                if compare(&dry.expect, &actual).is_ok() {
                    self.reference.eval(port, bytes, now, Pick::Placeholder);
                    return Ok(None);
                }
                for addr in snat.pool.iter() {
                    for p in snat.ports.0..=snat.ports.1 {
                        let pick = Pick::Given {
                            addr,
                            port: p,
                            ident: 0,
                            df: false,
                        };
                        let e = self.reference.dry_run(port, bytes, now, pick);
                        if compare(&e.expect, &actual).is_ok() {
                            self.reference.eval(port, bytes, now, pick);
                            return Ok(None);
                        }
                    }
                }
                Err(ctx(
                    format!(
                        "no choice of outside endpoint explains {actual:?} (placeholder gives {:?})",
                        dry.expect
                    ),
                    &self.sys.last_path,
                ))
            }
        }
    }

    /// Reads the NAT's choice off a transmitted frame, checks it, records the session and
    /// builds the reply.
    fn snat_tx(&mut self, snat: &Snat, frame: &[u8]) -> Result<(Pick, Reply), String> {
        let (ip, l4) = natted_header(frame, &snat.pool).ok_or_else(|| {
            format!(
                "cannot find the translated IPv4 header in the output{}",
                hex(frame)
            )
        })?;
        let (addr, oport) = (ip.src, l4.sport());
        if !snat.pool.contains(addr) {
            return Err(format!(
                "translated source {addr} is outside the pool {:?}",
                snat.pool
            ));
        }
        if !(snat.ports.0..=snat.ports.1).contains(&oport) {
            return Err(format!(
                "translated port {oport} is outside {:?}",
                snat.ports
            ));
        }
        if l4.proto() != snat.proto {
            return Err(format!(
                "translated protocol {:?}, expected {:?}",
                l4.proto(),
                snat.proto
            ));
        }
        let book = &mut self.reference.book;
        let mkey = (snat.rule.clone(), snat.proto, snat.inside);
        if let Some(prev) = book.mappings.get(&mkey) {
            if *prev != (addr, oport) {
                return Err(format!(
                    "endpoint-independent mapping broken: {:?} was {prev:?}, now {:?}",
                    snat.inside,
                    (addr, oport)
                ));
            }
        }
        let pkey = (snat.rule.clone(), snat.inside.0);
        if let Some(prev) = book.paired.get(&pkey) {
            if *prev != addr {
                return Err(format!(
                    "paired pooling broken: {} was behind {prev}, now {addr}",
                    snat.inside.0
                ));
            }
        }
        book.mappings.insert(mkey, (addr, oport));
        book.paired.insert(pkey, addr);
        book.sessions
            .insert((snat.proto, (addr, oport), snat.remote), snat.inside);
        let pick = Pick::Given {
            addr,
            port: oport,
            ident: ip.ident,
            df: ip.df,
        };
        // The reply: from the remote endpoint to the outside endpoint, on the first uplink.
        let uplink = self
            .reference
            .model()
            .node()
            .and_then(|n| n.uplinks.iter().next().copied())
            .unwrap_or(PortId(1));
        let router = self
            .reference
            .model()
            .node()
            .map(|n| n.router_mac)
            .unwrap_or_default();
        let remote_port = match l4 {
            L4::Echo { .. } => oport,
            _ => snat.remote.1,
        };
        let reply_l4 = match l4 {
            L4::Udp { .. } => L4::Udp {
                sport: remote_port,
                dport: oport,
                csum: true,
                payload: b"reply".to_vec(),
            },
            L4::Tcp { seq, ack, .. } => L4::Tcp {
                sport: remote_port,
                dport: oport,
                seq: ack,
                ack: seq.wrapping_add(1),
                flags: 0x12,
                window: 1000,
                payload: Vec::new(),
            },
            L4::Echo { seq, .. } => L4::Echo {
                reply: true,
                ident: oport,
                seq,
                payload: b"pong".to_vec(),
            },
        };
        let reply = Frame {
            dst: router,
            src: flow_offload::model::MacAddr([0x02, 0, 0, 0, 0x07, 0x07]),
            vlan: None,
            net: Net::V4 {
                ip: V4 {
                    src: snat.remote.0,
                    dst: addr,
                    ttl: 60,
                    tos: 0,
                    ident: 7,
                    df: false,
                },
                l4: reply_l4,
            },
        };
        Ok((
            pick,
            Reply {
                port: uplink,
                frame: emit(&reply),
            },
        ))
    }

    /// Checks a packet and, if it left through a stateful NAT, its reply.
    pub fn packet_and_reply(&mut self, port: PortId, bytes: &[u8], now: u64) -> Result<(), String> {
        if let Some(reply) = self.packet(port, bytes, now)? {
            let before = self.stats.tx;
            self.packet(reply.port, &reply.frame, now + 1)
                .map_err(|m| format!("reply to a translated packet: {m}"))?;
            if self.stats.tx > before {
                self.stats.replies_tx += 1;
            }
        }
        Ok(())
    }
}

/// Checks the structure of a hardware plan: every group a port can jump to from group 0 has a
/// rule and a closing catch-all (an empty pattern), and every meter a rule uses exists.
pub fn check_hw_invariants(hw: &Installed) -> Result<(), String> {
    let mut by_port: BTreeMap<PortId, BTreeMap<u32, Vec<&flow_offload::ir::Rule>>> =
        BTreeMap::new();
    for r in hw.rules.values() {
        by_port
            .entry(r.port)
            .or_default()
            .entry(r.attr.group)
            .or_default()
            .push(r);
        for a in &r.actions {
            if let Action::Meter(m) = a {
                if !hw.meters.contains_key(m) {
                    return Err(format!("rule uses missing meter {m:?}: {r:?}"));
                }
            }
        }
    }
    for (port, groups) in &by_port {
        let mut seen = BTreeSet::new();
        let mut todo = vec![0u32];
        while let Some(g) = todo.pop() {
            if !seen.insert(g) {
                continue;
            }
            let rules = groups.get(&g).map(Vec::as_slice).unwrap_or(&[]);
            if g != 0 && !rules.iter().any(|r| r.pattern.is_empty()) {
                return Err(format!(
                    "group {g} on {port:?} is reachable from group 0 but not closed by a catch-all"
                ));
            }
            for r in rules {
                for a in &r.actions {
                    if let Action::Jump(t) = a {
                        todo.push(*t);
                    }
                }
            }
        }
    }
    Ok(())
}

/// A [`System`]'s NIC as a [`flow_offload::program::FlowTarget`] with counters, for the
/// session offload driver (rules by identity through the system's handles).
#[derive(Debug)]
pub struct SysTarget<'a> {
    /// The NIC.
    pub nic: &'a mut RefNic,
    /// Its handles.
    pub handles: &'a mut BTreeMap<RuleId, RuleHandle>,
}

impl SysTarget<'_> {
    fn refusal(e: flow_offload::refnic::RefNicError) -> flow_offload::caps::Refusal {
        match e {
            flow_offload::refnic::RefNicError::Refused(r) => r,
            other => flow_offload::caps::Refusal::Driver {
                errno: "EINVAL".into(),
                cause: "meter".into(),
                message: Some(other.to_string()),
            },
        }
    }
}

impl flow_offload::program::FlowTarget for SysTarget<'_> {
    fn create_rule(
        &mut self,
        id: &RuleId,
        rule: &flow_offload::ir::Rule,
    ) -> Result<(), flow_offload::caps::Refusal> {
        let h = self.nic.create(rule)?;
        if let Some(old) = self.handles.insert(id.clone(), h) {
            let _ = self.nic.destroy(old);
        }
        Ok(())
    }
    fn replace_rule(
        &mut self,
        id: &RuleId,
        rule: &flow_offload::ir::Rule,
    ) -> Result<(), flow_offload::caps::Refusal> {
        match self.nic.create(rule) {
            Ok(h) => {
                if let Some(old) = self.handles.insert(id.clone(), h) {
                    let _ = self.nic.destroy(old);
                }
                Ok(())
            }
            Err(r) => {
                self.destroy_rule(id);
                Err(r)
            }
        }
    }
    fn destroy_rule(&mut self, id: &RuleId) {
        if let Some(h) = self.handles.remove(id) {
            let _ = self.nic.destroy(h);
        }
    }
    fn create_meter(
        &mut self,
        meter: flow_offload::ir::MeterRef,
        profile: &flow_offload::model::MeterProfile,
    ) -> Result<(), flow_offload::caps::Refusal> {
        self.nic
            .create_meter(meter, *profile, 0)
            .map_err(Self::refusal)
    }
    fn update_meter(
        &mut self,
        meter: flow_offload::ir::MeterRef,
        profile: &flow_offload::model::MeterProfile,
    ) -> Result<(), flow_offload::caps::Refusal> {
        self.nic
            .update_meter(meter, *profile, 0)
            .map_err(Self::refusal)
    }
    fn destroy_meter(&mut self, meter: flow_offload::ir::MeterRef) {
        let _ = self.nic.destroy_meter(meter);
    }
}

impl flow_offload::program::CountQuery for SysTarget<'_> {
    fn query_count(&mut self, id: &RuleId) -> Option<(u64, u64)> {
        self.nic.query_count(*self.handles.get(id)?)
    }
}

impl System {
    /// The NIC as a target for the session offload driver.
    pub fn target(&mut self) -> (SysTarget<'_>, &mut Pipeline) {
        (
            SysTarget {
                nic: &mut self.nic,
                handles: &mut self.handles,
            },
            &mut self.pipe,
        )
    }
}
