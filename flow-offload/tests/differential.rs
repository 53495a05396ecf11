//! The central correctness property: for random route tables, NAT rules and meters, under every
//! capability profile, "the reference NIC running `plan.hw`, then the software pipeline for what
//! it misses or traps" forwards every packet exactly as a plain reference evaluation of the
//! model does (egress port and every byte of the frame, host delivery, drop, policing).
//!
//! The reference evaluator, the generators and the harness live in `tests/common/`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::cell::RefCell;

use flow_offload::caps::{Caps, Profile, Refusal};
use flow_offload::compile::{compile, Compiler, Family, Plan, RuleId, SwReason};
use flow_offload::ir::{self, Action};
use flow_offload::model::{
    Change, Ipv4Range, MacAddr, Meter, MeterProfile, MeterTarget, Model, Name, NatKind, NatRule,
    Nexthop, Node, ObjectKey, PortId, Prefix, Route, RouteKey, TableId, Vni, Vpc, UNDERLAY_TABLE,
};
use flow_offload::reconcile::{self, Installed};
use flow_offload::soft::pipeline::Pipeline;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};

use common::gen::{
    build_change, build_model, build_packet, model_spec, pkt_spec, route_change, PktSpec,
    RouteChange,
};
use common::harness::{
    apply_ops, caps_variants, check_hw_invariants, limits, load_nic, xlat_available, Actual,
    Checker, Stats, System,
};
use common::reference::{emit, parse, Frame, Net, L4, V4, V6};

// ---------------------------------------------------------------------------------------------
// Shared
// ---------------------------------------------------------------------------------------------

/// `cases` property cases, or `PROPTEST_CASES` when set (for soak runs).
fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        max_shrink_iters: 4096,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..Config::default()
    }
}

/// Sends every packet (and the reply to every packet that left through a stateful NAT).
fn run_packets(c: &mut Checker, model: &Model, pkts: &[PktSpec]) -> Result<(), String> {
    let mut now = 1_000u64;
    for p in pkts {
        now += p.dt;
        let (port, bytes) = build_packet(model, p);
        c.packet_and_reply(port, &bytes, now)?;
        now += 2;
    }
    Ok(())
}

fn add(total: &mut Stats, s: Stats) {
    total.tx += s.tx;
    total.hw_tx += s.hw_tx;
    total.policed += s.policed;
    total.snat_tx += s.snat_tx;
    total.nat64_tx += s.nat64_tx;
    total.replies_tx += s.replies_tx;
}

thread_local! {
    /// Why objects ran in software, over every compiled plan (coverage report).
    static REASONS: RefCell<std::collections::BTreeMap<String, usize>> = RefCell::default();
}

fn count_reasons(plan: &Plan) {
    REASONS.with(|r| {
        let mut r = r.borrow_mut();
        for reason in plan.sw.values() {
            let s = format!("{reason:?}");
            let kind = s.split(['(', ' ']).next().unwrap_or("").to_string();
            *r.entry(kind).or_default() += 1;
        }
    });
}

/// hw-then-sw ≡ model for one model under every capability variant.
fn check_model(model: &Model, pkts: &[PktSpec], reverse: bool, seed: u64) -> Result<Stats, String> {
    let mut total = Stats::default();
    for (name, caps) in caps_variants() {
        let plan = compile(model, &caps);
        count_reasons(&plan);
        check_hw_invariants(&plan.hw.installed()).map_err(|m| format!("under {name}: {m}"))?;
        let mut c = Checker::new(model, &caps, &plan.hw.installed(), reverse, seed)
            .map_err(|m| format!("under {name}: {m}"))?;
        run_packets(&mut c, model, pkts).map_err(|m| {
            format!(
                "under {name}: {m}\n{}\n{}",
                model_summary(model),
                plan_summary(&plan)
            )
        })?;
        add(&mut total, c.stats);
    }
    Ok(total)
}

/// The model, one object a line, for failure messages.
fn model_summary(model: &Model) -> String {
    let mut out = String::from("model:");
    if let Some(n) = model.node() {
        out += &format!("\n  {n:?}");
    }
    for v in model.vpcs().values() {
        out += &format!("\n  {v:?}");
    }
    for r in model.routes().values() {
        out += &format!("\n  {r:?}");
    }
    for n in model.nat_rules().values() {
        out += &format!("\n  {n:?}");
    }
    for m in model.meters().values() {
        out += &format!("\n  {m:?}");
    }
    out
}

/// The plan, one rule or software object a line, for failure messages.
fn plan_summary(plan: &Plan) -> String {
    let mut out = String::from("software objects:");
    for (k, r) in &plan.sw {
        out += &format!("\n  {k:?}: {r:?}");
    }
    out += "\nhardware rules:";
    for (id, r) in plan.hw.iter_rules() {
        out += &format!(
            "\n  {id:?}: group {} priority {} {:?} => {:?}",
            r.attr.group, r.attr.priority, r.pattern, r.actions
        );
    }
    out
}

fn fail(m: String) -> TestCaseError {
    TestCaseError::fail(m)
}

// ---------------------------------------------------------------------------------------------
// The property
// ---------------------------------------------------------------------------------------------

/// For random models and packets, under every profile (and small-capacity variants): the
/// reference NIC running `plan.hw`, then the pipeline for what it misses or traps, equals the
/// reference evaluation of the model. Also checks that the generators exercise what they should
/// (hardware forwarding, software forwarding, policing, stateful NAT and its replies).
#[test]
fn hw_then_sw_equals_model() {
    let mut runner = TestRunner::new(config(256));
    let total = RefCell::new(Stats::default());
    let strategy = (
        model_spec(),
        vec(pkt_spec(), 1..=64),
        any::<bool>(),
        any::<u64>(),
    );
    let result = runner.run(&strategy, |(spec, pkts, reverse, seed)| {
        let Some(model) = build_model(&spec) else {
            return Err(TestCaseError::reject("node and VPCs refused"));
        };
        let s = check_model(&model, &pkts, reverse, seed).map_err(fail)?;
        add(&mut total.borrow_mut(), s);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let t = total.into_inner();
    eprintln!("hw_then_sw_equals_model exercised: {t:?}");
    REASONS.with(|r| eprintln!("software reasons: {:?}", r.borrow()));
    assert!(
        t.hw_tx > 0,
        "no packet was forwarded by hardware alone: {t:?}"
    );
    assert!(t.tx > t.hw_tx, "no packet was forwarded by software: {t:?}");
    assert!(t.policed > 0, "no packet was policed: {t:?}");
    assert!(
        t.snat_tx > t.nat64_tx,
        "no packet went through NAPT44: {t:?}"
    );
    assert!(t.nat64_tx > 0, "no packet went through NAT64: {t:?}");
    assert!(
        t.replies_tx > 0,
        "no reply came back through a stateful NAT: {t:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Incremental compile
// ---------------------------------------------------------------------------------------------

/// Whether changing `key` may change how a VXLAN next hop's VTEP resolves (the compiler then
/// recompiles those routes too, beyond the O(1) bound).
fn touches_vteps(model: &Model, before: &Model, key: RouteKey) -> bool {
    if key.table != UNDERLAY_TABLE || !key.prefix.is_v4() {
        return false;
    }
    [model, before].iter().any(|m| {
        m.routes().values().flat_map(|r| r.nexthops.iter()).any(
            |nh| matches!(nh, Nexthop::Vxlan { remote_vtep, .. } if key.prefix.contains(IpAddr::V4(*remote_vtep))),
        )
    })
}

/// Ports a (VRF, family) chain is instantiated on in a plan.
fn chain_ports(plan: &Plan, table: TableId, family: Family) -> usize {
    plan.hw
        .structure
        .keys()
        .filter(|id| {
            matches!(id, RuleId::ChainEnd { table: t, family: f, index: 0, .. } if *t == table && *f == family)
        })
        .count()
}

fn family(p: &Prefix) -> Family {
    if p.is_v4() {
        Family::V4
    } else {
        Family::V6
    }
}

/// One model, a sequence of single-route upserts and deletes applied through
/// `Compiler::update_route` and `Pipeline::update_route`:
/// - under the full profile with ample capacity, the incremental plan equals `compile` of the
///   final model after every change, the recorded operations turn the previous plan into the
///   new one (and install on the reference NIC), and a change costs at most two operations per
///   port of its VRF;
/// - under small capacities (where incremental placement may differ from a full compile by
///   design), hw-then-sw still equals the model after the changes.
fn check_incremental(
    model0: &Model,
    changes: &[RouteChange],
    pkts: &[PktSpec],
    seed: u64,
) -> Result<(), String> {
    let mut variants = vec![("Full".to_string(), Caps::profile(Profile::Full))];
    variants.extend(
        caps_variants()
            .into_iter()
            .filter(|(n, _)| n.contains('/') || n == "TapLike" || n == "Partial"),
    );
    for (vi, (name, caps)) in variants.into_iter().enumerate() {
        let ample = vi == 0;
        let mut model = model0.clone();
        let mut comp = Compiler::new(caps.clone());
        comp.rebuild(&model);
        let _ = comp.take_ops();
        let mut pipe =
            Pipeline::new(&model, limits(), seed).map_err(|e| format!("pipeline: {e}"))?;
        let (mut nic, mut handles) = load_nic(&caps, &comp.plan().hw.installed(), false)?;
        for ch in changes {
            let Some(change) = build_change(&model, ch) else {
                continue;
            };
            let key = match &change {
                Change::UpsertRoute(r) => r.key,
                Change::DeleteRoute(k) => *k,
                _ => continue,
            };
            let before_model = model.clone();
            if model.apply(std::slice::from_ref(&change)).is_err() {
                continue;
            }
            let before = comp.plan().clone();
            comp.update_route(&model, key);
            pipe.update_route(&model, key)
                .map_err(|e| format!("pipeline update {change:?}: {e}"))?;
            let ops = comp.take_ops();
            let ctx = |m: String| format!("under {name}, after {change:?}: {m}\nops: {ops:?}");
            check_hw_invariants(&comp.plan().hw.installed()).map_err(ctx)?;
            let mut replayed = before.hw.installed();
            reconcile::apply(&mut replayed, &ops).map_err(|e| {
                ctx(format!(
                    "the operations do not apply to the previous plan: {e}"
                ))
            })?;
            if replayed != comp.plan().hw.installed() {
                return Err(ctx("previous plan + operations != new plan".into()));
            }
            if ample {
                let full = compile(&model, &caps);
                if *comp.plan() != full {
                    return Err(ctx(format!(
                        "incremental plan differs from a full compile\nincremental {}\nfull {}",
                        plan_summary(comp.plan()),
                        plan_summary(&full)
                    )));
                }
                if !touches_vteps(&model, &before_model, key) {
                    let ports = chain_ports(comp.plan(), key.table, family(&key.prefix))
                        .max(chain_ports(&before, key.table, family(&key.prefix)));
                    if ops.len() > 2 * ports {
                        return Err(ctx(format!(
                            "{} operations for one route on a VRF instantiated on {ports} ports",
                            ops.len()
                        )));
                    }
                }
                apply_ops(&mut nic, &mut handles, &ops).map_err(ctx)?;
            }
        }
        // hw-then-sw ≡ model after the changes: the incrementally updated pipeline behind the
        // NIC (updated operation by operation with ample capacity, loaded fresh otherwise).
        if !ample {
            (nic, handles) = load_nic(&caps, &comp.plan().hw.installed(), false)?;
        }
        let sys = System {
            nic,
            handles,
            pipe,
            last_path: String::new(),
        };
        let mut c = Checker::with_system(sys, &model);
        run_packets(&mut c, &model, pkts).map_err(|m| {
            format!(
                "under {name} after the changes: {m}\n{}\n{}",
                model_summary(&model),
                plan_summary(comp.plan())
            )
        })?;
    }
    Ok(())
}

#[test]
fn incremental_equals_full() {
    let mut runner = TestRunner::new(config(64));
    let strategy = (
        model_spec(),
        vec(route_change(), 1..12),
        vec(pkt_spec(), 1..=40),
        any::<u64>(),
    );
    let result = runner.run(&strategy, |(spec, changes, pkts, seed)| {
        let Some(model) = build_model(&spec) else {
            return Err(TestCaseError::reject("node and VPCs refused"));
        };
        check_incremental(&model, &changes, &pkts, seed).map_err(fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Reconcile
// ---------------------------------------------------------------------------------------------

/// `apply(old, diff(old, new))` gives `new.hw`, for two random models (independent ones, and one
/// derived from the other by route changes); the plan stays well formed after every single
/// operation (no reachable group without a catch-all, no rule without its meter).
fn check_roundtrip(a: &Model, b: &Model) -> Result<(), String> {
    for (name, caps) in caps_variants() {
        let old = compile(a, &caps);
        let new = compile(b, &caps);
        let ops = reconcile::diff(&old, &new);
        let mut p = old.hw.installed();
        for (i, op) in ops.iter().enumerate() {
            reconcile::apply(&mut p, std::slice::from_ref(op))
                .map_err(|e| format!("under {name}: operation {i} {op:?}: {e}"))?;
            check_hw_invariants(&p).map_err(|m| {
                format!(
                    "under {name}: after operation {i} of {}: {op:?}: {m}",
                    ops.len()
                )
            })?;
        }
        if p != new.hw.installed() {
            return Err(format!("under {name}: apply(old, diff(old, new)) != new"));
        }
        if !reconcile::diff(&new, &new).is_empty() {
            return Err(format!("under {name}: diff(new, new) is not empty"));
        }
    }
    Ok(())
}

#[test]
fn reconcile_diff_roundtrip() {
    let mut runner = TestRunner::new(config(96));
    let strategy = (model_spec(), model_spec(), vec(route_change(), 0..8));
    let result = runner.run(&strategy, |(sa, sb, changes)| {
        let (Some(a), Some(b)) = (build_model(&sa), build_model(&sb)) else {
            return Err(TestCaseError::reject("node and VPCs refused"));
        };
        check_roundtrip(&a, &b).map_err(fail)?;
        check_roundtrip(&b, &a).map_err(fail)?;
        let mut c = a.clone();
        for ch in &changes {
            if let Some(change) = build_change(&c, ch) {
                let _ = c.apply(&[change]);
            }
        }
        check_roundtrip(&a, &c).map_err(fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

fn nm(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn pfx(s: &str) -> Prefix {
    s.parse().unwrap()
}

const ROUTER: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x01]);
const VTEP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const HOST_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0x09, 0x01]);

fn mac(last: u8) -> MacAddr {
    MacAddr([0x02, 0, 0, 0, 0x01, last])
}

fn node() -> Node {
    Node {
        vtep: VTEP,
        router_mac: ROUTER,
        uplinks: [PortId(1), PortId(2)].into_iter().collect(),
    }
}

fn vpc(name: &str, vni: u32, table: u32, ports: &[u16]) -> Vpc {
    Vpc {
        name: nm(name),
        vni: Vni::new(vni).unwrap(),
        table: TableId(table),
        ports: ports.iter().map(|p| PortId(*p)).collect(),
    }
}

fn via(port: u16, mac_last: u8) -> Nexthop {
    Nexthop::Underlay {
        gateway: IpAddr::V4(Ipv4Addr::new(100, 64, 9, mac_last)),
        port: PortId(port),
        mac: mac(mac_last),
    }
}

fn route(table: TableId, prefix: &str, nexthops: Vec<Nexthop>) -> Change {
    Change::UpsertRoute(Route {
        key: RouteKey {
            table,
            prefix: pfx(prefix),
        },
        nexthops,
    })
}

fn model_of(changes: Vec<Change>) -> Model {
    let mut m = Model::new();
    m.apply(&changes).unwrap();
    m
}

fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, ttl: u8) -> Vec<u8> {
    emit(&Frame {
        dst: ROUTER,
        src: HOST_MAC,
        vlan: None,
        net: Net::V4 {
            ip: V4 {
                src: Ipv4Addr::from(src),
                dst: Ipv4Addr::from(dst),
                ttl,
                tos: 0,
                ident: 1,
                df: true,
            },
            l4: L4::Udp {
                sport,
                dport,
                csum: true,
                payload: b"hello".to_vec(),
            },
        },
    })
}

fn rule_of(plan: &Plan, port: u16, key: RouteKey) -> ir::Rule {
    plan.hw
        .rule(&RuleId::Route {
            port: PortId(port),
            key,
        })
        .unwrap_or_else(|| panic!("no rule for {key:?} on port {port}"))
}

fn key(table: TableId, p: &str) -> RouteKey {
    RouteKey {
        table,
        prefix: pfx(p),
    }
}

fn checker(model: &Model, caps: &Caps, plan: &Plan) -> Checker {
    checker_installed(model, caps, &plan.hw.installed())
}

fn checker_installed(model: &Model, caps: &Caps, hw: &Installed) -> Checker {
    check_hw_invariants(hw).unwrap();
    Checker::new(model, caps, hw, false, 7).unwrap()
}

fn lpm_nesting_model() -> Model {
    model_of(vec![
        Change::SetNode(node()),
        route(UNDERLAY_TABLE, "10.0.0.0/8", vec![via(1, 1)]),
        route(UNDERLAY_TABLE, "10.1.2.0/24", vec![via(1, 2), via(2, 3)]),
    ])
}

/// Under the full profile a /8 with one next hop is forwarded by hardware, and the /24 ECMP
/// inside it runs in software behind a trap rule at its own (more specific) level, so packets
/// to it are ECMP'd by the pipeline over both next hops.
#[test]
fn scenario_lpm_nesting_ecmp_trap() {
    let model = lpm_nesting_model();
    let caps = Caps::profile(Profile::Full);
    let plan = compile(&model, &caps);
    let k8 = key(UNDERLAY_TABLE, "10.0.0.0/8");
    let k24 = key(UNDERLAY_TABLE, "10.1.2.0/24");
    assert_eq!(plan.sw.get(&ObjectKey::Route(k24)), Some(&SwReason::Ecmp));
    assert_eq!(plan.sw.get(&ObjectKey::Route(k8)), None);
    for port in [1, 2] {
        let r8 = rule_of(&plan, port, k8);
        let r24 = rule_of(&plan, port, k24);
        assert!(r8.actions.contains(&Action::Port(PortId(1))), "{r8:?}");
        assert_eq!(r24.actions, vec![Action::Queue(ir::SOFTWARE_QUEUE)]);
        assert_eq!(r8.attr.group, r24.attr.group);
        assert!(
            r24.attr.priority < r8.attr.priority,
            "the /24 trap must win over the /8"
        );
    }
    let mut c = checker(&model, &caps, &plan);
    // Outside the /24: hardware forwards.
    c.packet(
        PortId(1),
        &udp4([192, 0, 2, 1], [10, 9, 9, 9], 1000, 53, 64),
        10,
    )
    .unwrap();
    assert_eq!(c.sys.last_path, "hw: tx");
    // Inside: software, spread over both next hops.
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..32u16 {
        let bytes = udp4([192, 0, 2, 1], [10, 1, 2, 7], 1000 + i, 53, 64);
        c.packet(PortId(2), &bytes, 20 + u64::from(i)).unwrap();
        assert!(
            c.sys.last_path.starts_with("hw: to software"),
            "{}",
            c.sys.last_path
        );
        if let Some(Actual::Tx { port, .. }) = c.last {
            ports.insert(port);
        }
    }
    assert_eq!(ports.len(), 2, "ECMP should use both next hops: {ports:?}");
}

fn full() -> Caps {
    Caps::profile(Profile::Full)
}

fn blue(ports: &[u16]) -> Vpc {
    vpc("blue", 100, 10, ports)
}

const BLUE: TableId = TableId(10);

fn to_port(port: u16, mac_last: u8, gw: Ipv4Addr) -> Nexthop {
    Nexthop::Underlay {
        gateway: IpAddr::V4(gw),
        port: PortId(port),
        mac: mac(mac_last),
    }
}

fn packet(ip: Net) -> Vec<u8> {
    emit(&Frame {
        dst: ROUTER,
        src: HOST_MAC,
        vlan: None,
        net: ip,
    })
}

fn v4(src: [u8; 4], dst: [u8; 4], l4: L4) -> Vec<u8> {
    packet(Net::V4 {
        ip: V4 {
            src: Ipv4Addr::from(src),
            dst: Ipv4Addr::from(dst),
            ttl: 64,
            tos: 0,
            ident: 9,
            df: false,
        },
        l4,
    })
}

fn v6(src: &str, dst: &str, l4: L4) -> Vec<u8> {
    packet(Net::V6 {
        ip: V6 {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            hop_limit: 64,
            tclass: 0,
            flow: 0,
        },
        l4,
    })
}

fn udp(sport: u16, dport: u16) -> L4 {
    L4::Udp {
        sport,
        dport,
        csum: true,
        payload: b"payload".to_vec(),
    }
}

fn tcp(sport: u16, dport: u16) -> L4 {
    L4::Tcp {
        sport,
        dport,
        seq: 1,
        ack: 0,
        flags: 0x02,
        window: 1000,
        payload: Vec::new(),
    }
}

fn echo(ident: u16) -> L4 {
    L4::Echo {
        reply: false,
        ident,
        seq: 1,
        payload: b"ping".to_vec(),
    }
}

/// The frame is exactly what building it from its fields gives: every checksum is correct.
fn checksums_ok(frame: &[u8]) -> bool {
    parse(frame).is_some_and(|f| emit(&f) == frame)
}

/// Sends a packet through the checker (which compares it with the reference) and returns what
/// the system did.
fn send(c: &mut Checker, port: u16, bytes: &[u8], now: u64) -> Actual {
    c.packet(PortId(port), bytes, now)
        .unwrap_or_else(|m| panic!("{m}"));
    c.last.clone().unwrap()
}

fn tx(a: &Actual) -> (PortId, Frame) {
    match a {
        Actual::Tx { port, frame } => {
            assert!(checksums_ok(frame), "bad checksums in {frame:x?}");
            (*port, parse(frame).unwrap())
        }
        other => panic!("expected a transmitted packet, got {other:?}"),
    }
}

fn v4_of(f: &Frame) -> (V4, L4) {
    match &f.net {
        Net::V4 { ip, l4 } => (*ip, l4.clone()),
        other => panic!("expected IPv4, got {other:?}"),
    }
}

fn v6_of(f: &Frame) -> (V6, L4) {
    match &f.net {
        Net::V6 { ip, l4 } => (*ip, l4.clone()),
        other => panic!("expected IPv6, got {other:?}"),
    }
}

fn sw_reason(plan: &Plan, k: RouteKey) -> Option<&SwReason> {
    plan.sw.get(&ObjectKey::Route(k))
}

/// A VPC with a VXLAN route to a remote VTEP that the underlay resolves.
fn vxlan_model() -> Model {
    model_of(vec![
        Change::SetNode(node()),
        Change::UpsertVpc(blue(&[10])),
        route(UNDERLAY_TABLE, "100.64.0.0/16", vec![via(1, 1)]),
        route(
            BLUE,
            "10.9.0.0/16",
            vec![Nexthop::Vxlan {
                vni: Vni::new(100).unwrap(),
                remote_vtep: Ipv4Addr::new(100, 64, 0, 2),
                router_mac: MacAddr([0x02, 0, 0, 0, 0x02, 0x01]),
            }],
        ),
    ])
}

/// The partial profile cannot rewrite headers and encapsulate in one rule: the VXLAN route runs
/// in software (the reason names the refused action), behind a trap; the packet it sends is
/// byte for byte the one the full profile's hardware sends.
#[test]
fn scenario_partial_puts_vxlan_encap_in_software() {
    let model = vxlan_model();
    let k = key(BLUE, "10.9.0.0/16");
    let bytes = udp4([10, 1, 2, 3], [10, 9, 1, 1], 1000, 53, 64);

    let caps = Caps::profile(Profile::Partial);
    let plan = compile(&model, &caps);
    assert!(
        matches!(
            sw_reason(&plan, k),
            Some(SwReason::Unsupported(Refusal::EncapWithModify {
                action: flow_offload::ir::ActionKind::VxlanEncap,
                ..
            }))
        ),
        "{:?}",
        sw_reason(&plan, k)
    );
    assert_eq!(
        rule_of(&plan, 10, k).actions,
        vec![Action::Queue(ir::SOFTWARE_QUEUE)]
    );
    let mut c = checker(&model, &caps, &plan);
    let sw_out = send(&mut c, 10, &bytes, 10);
    assert!(
        c.sys.last_path.starts_with("hw: to software (mark Some("),
        "{}",
        c.sys.last_path
    );
    let (port, outer) = tx(&sw_out);
    assert_eq!(port, PortId(1));
    let (ip, l4) = v4_of(&outer);
    assert_eq!((ip.src, ip.dst), (VTEP, Ipv4Addr::new(100, 64, 0, 2)));
    assert!(
        matches!(l4, L4::Udp { dport: 4789, sport, .. } if sport == ir::vxlan_source_port(100))
    );

    let caps = full();
    let plan = compile(&model, &caps);
    assert_eq!(sw_reason(&plan, k), None);
    let mut c = checker(&model, &caps, &plan);
    let hw_out = send(&mut c, 10, &bytes, 10);
    assert_eq!(c.sys.last_path, "hw: tx");
    assert_eq!(
        hw_out, sw_out,
        "hardware and software encapsulate identically"
    );
}

/// `net_tap`-like targets match and drop or queue: only blackholes are forwarded (dropped) in
/// hardware, every other route gets a trap and runs in software.
#[test]
fn scenario_taplike_offloads_only_blackholes() {
    let model = model_of(vec![
        Change::SetNode(node()),
        Change::UpsertVpc(blue(&[10])),
        route(UNDERLAY_TABLE, "0.0.0.0/0", vec![via(2, 4)]),
        route(UNDERLAY_TABLE, "10.0.0.0/8", vec![via(1, 1)]),
        route(UNDERLAY_TABLE, "10.66.0.0/16", vec![Nexthop::Blackhole]),
        route(UNDERLAY_TABLE, "10.1.2.0/24", vec![via(1, 2), via(2, 3)]),
        route(BLUE, "172.16.0.0/12", vec![Nexthop::Blackhole]),
        route(
            BLUE,
            "0.0.0.0/0",
            vec![Nexthop::Vrf {
                table: UNDERLAY_TABLE,
            }],
        ),
    ]);
    let caps = Caps::profile(Profile::TapLike);
    let plan = compile(&model, &caps);
    for (id, rule) in plan.hw.iter_rules() {
        assert!(
            !rule.actions.iter().any(|a| matches!(a, Action::Port(_))),
            "nothing is forwarded by a tap-like target: {id:?}"
        );
        if rule.actions.contains(&Action::Drop) {
            let RuleId::Route { key, .. } = &id else {
                panic!("only routes drop: {id:?}")
            };
            assert_eq!(model.routes()[key].nexthops, vec![Nexthop::Blackhole]);
        }
    }
    for (k, r) in model.routes() {
        let blackhole = r.nexthops == vec![Nexthop::Blackhole];
        assert_eq!(
            sw_reason(&plan, *k).is_none(),
            blackhole,
            "{k:?}: {:?}",
            sw_reason(&plan, *k)
        );
    }
    let mut c = checker(&model, &caps, &plan);
    assert_eq!(
        send(
            &mut c,
            1,
            &udp4([192, 0, 2, 1], [10, 66, 1, 1], 1, 2, 64),
            10
        ),
        Actual::Drop { policed: false }
    );
    assert_eq!(c.sys.last_path, "hw: drop rule");
    send(
        &mut c,
        10,
        &udp4([10, 1, 2, 3], [172, 16, 1, 1], 1, 2, 64),
        11,
    );
    assert_eq!(c.sys.last_path, "hw: drop rule");
    let (port, _) = tx(&send(
        &mut c,
        1,
        &udp4([192, 0, 2, 1], [10, 9, 9, 9], 1, 2, 64),
        12,
    ));
    assert_eq!(port, PortId(1));
    assert!(c.sys.last_path.starts_with("hw: to software"));
    let (port, _) = tx(&send(
        &mut c,
        10,
        &udp4([10, 1, 2, 3], [8, 8, 8, 8], 1, 2, 64),
        13,
    ));
    assert_eq!(port, PortId(2));
}

/// With room for only a few rules, routes overflow to software (`TableFull`) and everything
/// still forwards as the model says, whichever of hardware or software handles a packet.
#[test]
fn scenario_tiny_table_full_still_correct() {
    let mut changes = vec![Change::SetNode(node()), Change::UpsertVpc(blue(&[10, 11]))];
    for (p, nh) in [
        ("0.0.0.0/0", vec![via(2, 4)]),
        ("10.0.0.0/8", vec![via(1, 1)]),
        ("10.1.0.0/16", vec![via(2, 2)]),
        ("10.1.2.0/24", vec![via(1, 3)]),
        ("10.1.2.128/25", vec![Nexthop::Blackhole]),
        ("10.1.2.200/32", vec![via(2, 5)]),
        ("10.128.0.0/9", vec![via(1, 2), via(2, 3)]),
    ] {
        changes.push(route(UNDERLAY_TABLE, p, nh));
    }
    changes.push(route(
        BLUE,
        "0.0.0.0/0",
        vec![Nexthop::Vrf {
            table: UNDERLAY_TABLE,
        }],
    ));
    changes.push(route(
        BLUE,
        "10.1.0.0/16",
        vec![to_port(11, 6, Ipv4Addr::new(10, 1, 0, 1))],
    ));
    changes.push(route(
        BLUE,
        "10.1.2.0/24",
        vec![to_port(10, 7, Ipv4Addr::new(10, 1, 2, 1))],
    ));
    let model = model_of(changes);
    let dsts: [[u8; 4]; 9] = [
        [8, 8, 8, 8],
        [10, 9, 9, 9],
        [10, 1, 9, 9],
        [10, 1, 2, 7],
        [10, 1, 2, 130],
        [10, 1, 2, 200],
        [10, 200, 0, 1],
        [10, 1, 2, 201],
        [172, 16, 0, 1],
    ];
    let mut table_full = 0;
    for max_rules in [4, 8, 12, 16, 24] {
        let mut caps = full();
        caps.max_rules = max_rules;
        let plan = compile(&model, &caps);
        assert!(plan.hw.rule_count() <= max_rules as usize);
        table_full += plan
            .sw
            .values()
            .filter(|r| **r == SwReason::TableFull)
            .count();
        let mut c = checker(&model, &caps, &plan);
        let mut now = 10;
        for port in [1, 2, 10, 11] {
            for (i, d) in dsts.iter().enumerate() {
                for ttl in [64, 1] {
                    now += 1;
                    let bytes = udp4([10, 1, 2, 3], *d, 1000 + i as u16, 53, ttl);
                    c.packet(PortId(port), &bytes, now)
                        .unwrap_or_else(|m| panic!("max_rules {max_rules}: {m}"));
                }
            }
        }
    }
    assert!(table_full > 0, "some route should have overflowed");
}

/// A VPC meter is one token bucket, whether the VPC's ports are classified by hardware or
/// software: with room for only part of the VPC's rules, the compiler never leaves some ports
/// metered by a hardware meter and others by the software one.
#[test]
fn scenario_vpc_meter_never_split() {
    let mut n = node();
    n.uplinks = [PortId(1)].into_iter().collect();
    let model = model_of(vec![
        Change::SetNode(n),
        Change::UpsertVpc(blue(&[10, 11])),
        route(
            BLUE,
            "0.0.0.0/0",
            vec![to_port(10, 9, Ipv4Addr::new(10, 0, 0, 254))],
        ),
        Change::UpsertMeter(Meter {
            name: nm("m"),
            profile: MeterProfile::SrTcm {
                cir: 1000,
                cbs: 1518,
                ebs: 0,
            },
            target: MeterTarget::Vpc(nm("blue")),
        }),
    ]);
    for max_rules in 0..16 {
        let mut caps = full();
        caps.max_rules = max_rules;
        let plan = compile(&model, &caps);
        let mut c = checker(&model, &caps, &plan);
        for i in 0..60u64 {
            let port = if i % 2 == 0 { 10 } else { 11 };
            let bytes = udp4([10, 1, 1, 1], [10, 2, 2, 2], 1000, 53, 64);
            c.packet(PortId(port), &bytes, 10 + i)
                .unwrap_or_else(|m| panic!("max_rules {max_rules}: {m}"));
        }
        assert!(c.stats.policed > 0);
    }
}

fn napt_model() -> Model {
    model_of(vec![
        Change::SetNode(node()),
        Change::UpsertVpc(blue(&[10])),
        route(UNDERLAY_TABLE, "0.0.0.0/0", vec![via(1, 1)]),
        route(
            BLUE,
            "0.0.0.0/0",
            vec![Nexthop::Vrf {
                table: UNDERLAY_TABLE,
            }],
        ),
        route(
            BLUE,
            "10.0.0.0/8",
            vec![to_port(10, 9, Ipv4Addr::new(10, 0, 0, 254))],
        ),
        Change::UpsertNat(NatRule {
            name: nm("out"),
            vpc: nm("blue"),
            kind: NatKind::Napt44 {
                pool: Ipv4Range {
                    first: Ipv4Addr::new(203, 0, 113, 8),
                    last: Ipv4Addr::new(203, 0, 113, 9),
                },
                ports: (1024, 1087),
            },
        }),
    ])
}

/// NAPT44: a VPC host's UDP, TCP and echo leave with a pool address and a port of the range
/// (checksums valid), and a reply to that endpoint comes back to the host's own address and
/// port.
#[test]
fn scenario_napt44_round_trip() {
    let model = napt_model();
    for caps in [
        full(),
        Caps::profile(Profile::Partial),
        Caps::profile(Profile::None),
    ] {
        let plan = compile(&model, &caps);
        let mut c = checker(&model, &caps, &plan);
        for (i, l4) in [udp(1000, 53), tcp(1001, 80), echo(1002)]
            .into_iter()
            .enumerate()
        {
            let now = 100 * (i as u64 + 1);
            let inside_port = l4.sport();
            let out = send(&mut c, 10, &v4([10, 1, 2, 3], [198, 51, 100, 7], l4), now);
            let (port, f) = tx(&out);
            assert_eq!(port, PortId(1));
            let (ip, l4) = v4_of(&f);
            assert!((8..=9).contains(&ip.src.octets()[3]) && ip.src.octets()[..3] == [203, 0, 113]);
            assert!((1024..=1087).contains(&l4.sport()), "{l4:?}");
            assert_eq!((ip.dst, ip.ttl), (Ipv4Addr::new(198, 51, 100, 7), 63));
            let reply_l4 = match l4 {
                L4::Udp { sport, .. } => udp(53, sport),
                L4::Tcp { sport, .. } => tcp(80, sport),
                L4::Echo { ident, .. } => L4::Echo {
                    reply: true,
                    ident,
                    seq: 1,
                    payload: b"pong".to_vec(),
                },
            };
            let back = send(
                &mut c,
                1,
                &v4([198, 51, 100, 7], ip.src.octets(), reply_l4),
                now + 1,
            );
            let (port, f) = tx(&back);
            assert_eq!(port, PortId(10));
            let (ip, l4) = v4_of(&f);
            assert_eq!(
                (ip.src, ip.dst),
                (Ipv4Addr::new(198, 51, 100, 7), Ipv4Addr::new(10, 1, 2, 3))
            );
            assert_eq!(l4.dport(), inside_port);
        }
        // A stranger gets nothing through.
        let unsolicited = v4([192, 0, 2, 99], [203, 0, 113, 8], udp(53, 1024));
        assert_eq!(
            send(&mut c, 1, &unsolicited, 1000),
            Actual::Drop { policed: false }
        );
    }
}

fn nat64_model() -> Model {
    model_of(vec![
        Change::SetNode(node()),
        Change::UpsertVpc(blue(&[10])),
        route(UNDERLAY_TABLE, "0.0.0.0/0", vec![via(1, 1)]),
        route(
            BLUE,
            "fd00::/64",
            vec![Nexthop::Underlay {
                gateway: IpAddr::V6("fe80::1".parse().unwrap()),
                port: PortId(10),
                mac: mac(9),
            }],
        ),
        Change::UpsertNat(NatRule {
            name: nm("six"),
            vpc: nm("blue"),
            kind: NatKind::Nat64 {
                prefix: pfx("64:ff9b::/96"),
                pool: Ipv4Range::single(Ipv4Addr::new(203, 0, 113, 16)),
                ports: (2000, 2255),
            },
        }),
    ])
}

/// NAT64: an IPv6 host reaches 198.51.100.7 through 64:ff9b::c633:6407; the packet leaves as
/// IPv4 from the pool (hop limit → TTL, decremented once), and the reply comes back as IPv6 to
/// the host's address and port — for ICMP echo with the host's own identifier.
#[test]
fn scenario_nat64_round_trip() {
    assert!(
        xlat_available(),
        "RFC 7915 translation is needed for this test"
    );
    let model = nat64_model();
    for caps in [full(), Caps::profile(Profile::TapLike)] {
        let plan = compile(&model, &caps);
        let mut c = checker(&model, &caps, &plan);
        for (i, l4) in [udp(1000, 53), tcp(1001, 80), echo(1002)]
            .into_iter()
            .enumerate()
        {
            let now = 100 * (i as u64 + 1);
            let inside_port = l4.sport();
            let out = send(&mut c, 10, &v6("fd00::1", "64:ff9b::c633:6407", l4), now);
            let (port, f) = tx(&out);
            assert_eq!(port, PortId(1));
            let (ip, l4) = v4_of(&f);
            assert_eq!(ip.src, Ipv4Addr::new(203, 0, 113, 16));
            assert_eq!((ip.dst, ip.ttl), (Ipv4Addr::new(198, 51, 100, 7), 63));
            assert!((2000..=2255).contains(&l4.sport()), "{l4:?}");
            let reply_l4 = match l4 {
                L4::Udp { sport, .. } => udp(53, sport),
                L4::Tcp { sport, .. } => tcp(80, sport),
                L4::Echo { ident, .. } => L4::Echo {
                    reply: true,
                    ident,
                    seq: 1,
                    payload: b"pong".to_vec(),
                },
            };
            let back = send(
                &mut c,
                1,
                &v4([198, 51, 100, 7], [203, 0, 113, 16], reply_l4),
                now + 1,
            );
            let (port, f) = tx(&back);
            assert_eq!(port, PortId(10));
            let (ip, l4) = v6_of(&f);
            assert_eq!(ip.src, "64:ff9b::c633:6407".parse::<Ipv6Addr>().unwrap());
            assert_eq!(ip.dst, "fd00::1".parse::<Ipv6Addr>().unwrap());
            assert_eq!(l4.dport(), inside_port, "{l4:?}");
        }
    }
}

/// ECMP after NAPT44 hashes the translated packet (as the reference does, with
/// `soft::pipeline::flow_hash` on the frame as it is): many flows, each compared byte for byte.
#[test]
fn scenario_ecmp_after_napt_hashes_the_translated_packet() {
    let mut model = napt_model();
    model
        .apply(&[route(
            UNDERLAY_TABLE,
            "0.0.0.0/0",
            vec![via(1, 1), via(2, 2), via(1, 3)],
        )])
        .unwrap();
    let caps = full();
    let plan = compile(&model, &caps);
    let mut c = checker(&model, &caps, &plan);
    for i in 0..64u16 {
        let now = 10 + u64::from(i) * 10;
        let bytes = v4([10, 1, 2, 3], [198, 51, 100, 7], udp(3000 + i, 53));
        c.packet_and_reply(PortId(10), &bytes, now)
            .unwrap_or_else(|m| panic!("{m}"));
    }
    assert_eq!(c.stats.snat_tx, 64);
    assert_eq!(c.stats.replies_tx, 64);
}

// ---------------------------------------------------------------------------------------------
// The checker has teeth
// ---------------------------------------------------------------------------------------------

/// Plans broken on purpose (the trap of a software route skipped, LPM priorities inverted, the
/// TTL decrement forgotten) are caught by the checker.
#[test]
fn checker_catches_broken_plans() {
    let model = lpm_nesting_model();
    let caps = full();
    let plan = compile(&model, &caps);
    let k8 = key(UNDERLAY_TABLE, "10.0.0.0/8");
    let k24 = key(UNDERLAY_TABLE, "10.1.2.0/24");
    let fails = |broken: &Installed, dst: [u8; 4]| {
        let mut c = Checker::new(&model, &caps, broken, false, 7).unwrap();
        (0..8u16)
            .filter(|i| {
                let bytes = udp4([192, 0, 2, 1], dst, 1000 + i, 53, 64);
                c.packet(PortId(1), &bytes, 10 + u64::from(*i)).is_err()
            })
            .count()
    };
    let installed = plan.hw.installed();
    assert_eq!(fails(&installed, [10, 1, 2, 7]), 0);
    assert_eq!(fails(&installed, [10, 9, 9, 9]), 0);

    let mut no_trap = plan.hw.installed();
    for port in [1, 2] {
        no_trap.rules.remove(&RuleId::Route {
            port: PortId(port),
            key: k24,
        });
    }
    assert_eq!(fails(&no_trap, [10, 1, 2, 7]), 8, "skipped trap not caught");

    let mut flipped = plan.hw.installed();
    for port in [1, 2] {
        let p8 = rule_of(&plan, port, k8).attr.priority;
        let p24 = rule_of(&plan, port, k24).attr.priority;
        for (k, p) in [(k8, p24), (k24, p8)] {
            if let Some(r) = flipped.rules.get_mut(&RuleId::Route {
                port: PortId(port),
                key: k,
            }) {
                r.attr.priority = p;
            }
        }
    }
    assert_eq!(fails(&flipped, [10, 1, 2, 7]), 8, "inverted LPM not caught");

    let mut no_ttl = plan.hw.installed();
    for r in no_ttl.rules.values_mut() {
        r.actions.retain(|a| *a != Action::DecTtl);
    }
    assert_eq!(
        fails(&no_ttl, [10, 9, 9, 9]),
        8,
        "missing TTL decrement not caught"
    );
}

/// The same on random models: every kind of breakage is caught on some of them.
#[test]
fn random_broken_plans_are_caught() {
    type Mutation = fn(&mut Installed);
    fn no_traps(p: &mut Installed) {
        p.rules.retain(|id, r| {
            !(matches!(id, RuleId::Route { .. })
                && r.actions == vec![Action::Queue(ir::SOFTWARE_QUEUE)])
        });
    }
    fn mirrored_priorities(p: &mut Installed) {
        let top = Caps::profile(Profile::Full).priorities - 2;
        for (id, r) in p.rules.iter_mut() {
            if matches!(id, RuleId::Route { .. }) && r.attr.group != 0 {
                r.attr.priority = top - r.attr.priority;
            }
        }
    }
    fn no_dec_ttl(p: &mut Installed) {
        for r in p.rules.values_mut() {
            r.actions.retain(|a| *a != Action::DecTtl);
        }
    }
    fn no_meters(p: &mut Installed) {
        for r in p.rules.values_mut() {
            r.actions.retain(|a| !matches!(a, Action::Meter(_)));
        }
    }
    let mutations: [(&str, Mutation); 4] = [
        ("skip the traps", no_traps),
        ("mirror route priorities", mirrored_priorities),
        ("forget the TTL decrement", no_dec_ttl),
        ("forget the meters", no_meters),
    ];
    let caught = RefCell::new([0usize; 4]);
    let mut runner = TestRunner::new_with_rng(
        config(128),
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    let strategy = (model_spec(), vec(pkt_spec(), 48));
    let caps = full();
    let result = runner.run(&strategy, |(spec, pkts)| {
        let Some(model) = build_model(&spec) else {
            return Err(TestCaseError::reject("node and VPCs refused"));
        };
        let plan = compile(&model, &caps);
        for (i, (_, mutate)) in mutations.iter().enumerate() {
            let installed = plan.hw.installed();
            let mut broken = installed.clone();
            mutate(&mut broken);
            if broken == installed {
                continue;
            }
            let Ok(mut c) = Checker::new(&model, &caps, &broken, false, 1) else {
                continue;
            };
            if run_packets(&mut c, &model, &pkts).is_err() {
                caught.borrow_mut()[i] += 1;
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let caught = caught.into_inner();
    for ((name, _), n) in mutations.iter().zip(caught) {
        assert!(n > 0, "\"{name}\" was never caught");
    }
}

// ---------------------------------------------------------------------------------------------
// Former divergences found by the property above, kept as regression tests
// ---------------------------------------------------------------------------------------------

/// VXLAN to our VTEP with a known VNI but the I flag clear: the pipeline drops it (RFC 7348
/// §5); the decap rule matches the flag too, so hardware leaves it to software.
#[test]
fn vxlan_with_the_i_flag_clear_is_not_decapsulated() {
    let model = model_of(vec![
        Change::SetNode(node()),
        Change::UpsertVpc(blue(&[10])),
        route(
            BLUE,
            "0.0.0.0/0",
            vec![to_port(10, 9, Ipv4Addr::new(10, 0, 0, 254))],
        ),
    ]);
    let inner = udp4([10, 1, 2, 3], [10, 0, 0, 1], 1000, 53, 64);
    let outer = packet(Net::V4 {
        ip: V4 {
            src: Ipv4Addr::new(100, 64, 0, 2),
            dst: VTEP,
            ttl: 64,
            tos: 0,
            ident: 0,
            df: true,
        },
        l4: L4::Udp {
            sport: 49152,
            dport: 4789,
            csum: false,
            payload: common::reference::vxlan_payload(100, false, &inner),
        },
    });
    let caps = full();
    let plan = compile(&model, &caps);
    let mut c = checker(&model, &caps, &plan);
    c.packet(PortId(1), &outer, 10)
        .unwrap_or_else(|m| panic!("{m}"));
}

/// With few priorities an IPv6 chain would be long (priorities 5: 4 levels a group, 33 groups);
/// the compiler caps chains at `compile::MAX_CHAIN_GROUPS`, so a lookup stays within the
/// reference NIC's jump bound and unmatched packets still reach software.
#[test]
fn chains_stay_within_the_jump_bound() {
    let model = model_of(vec![Change::SetNode(node())]);
    let mut caps = full();
    caps.priorities = 5;
    let plan = compile(&model, &caps);
    let mut c = checker(&model, &caps, &plan);
    let bytes = v6("2001:db8::1", "2001:db8::2", udp(1, 2));
    c.packet(PortId(1), &bytes, 10)
        .unwrap_or_else(|m| panic!("{m}"));
}

// ---------------------------------------------------------------------------------------------
// Create-time refusals (do not trust validate alone)
// ---------------------------------------------------------------------------------------------

/// A target that refuses some creates its capabilities admit, as a real NIC does when
/// validation promised more than creation keeps: a seeded choice per (identity, rule), so the
/// same rule is refused every time it is asked for, but a route's trap is judged apart from
/// its forwarding rule.
struct Refusing {
    inner: flow_offload::program::RefNicTarget,
    seed: u64,
    one_in: u64,
    refused: usize,
}

impl Refusing {
    fn refuses(&mut self, id: &RuleId, rule: &ir::Rule) -> Option<Refusal> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.seed.hash(&mut h);
        format!("{id:?}{:?}", rule.actions).hash(&mut h);
        if h.finish().is_multiple_of(self.one_in) {
            self.refused += 1;
            Some(Refusal::Driver {
                errno: "EEXIST".into(),
                cause: "Unspecified".into(),
                message: Some("refused by the test target".into()),
            })
        } else {
            None
        }
    }
}

impl flow_offload::program::FlowTarget for Refusing {
    fn create_rule(&mut self, id: &RuleId, rule: &ir::Rule) -> Result<(), Refusal> {
        match self.refuses(id, rule) {
            Some(r) => Err(r),
            None => self.inner.create_rule(id, rule),
        }
    }
    fn replace_rule(&mut self, id: &RuleId, rule: &ir::Rule) -> Result<(), Refusal> {
        match self.refuses(id, rule) {
            Some(r) => {
                self.inner.destroy_rule(id);
                Err(r)
            }
            None => self.inner.replace_rule(id, rule),
        }
    }
    fn destroy_rule(&mut self, id: &RuleId) {
        self.inner.destroy_rule(id);
    }
    fn create_meter(&mut self, m: ir::MeterRef, p: &MeterProfile) -> Result<(), Refusal> {
        self.inner.create_meter(m, p)
    }
    fn update_meter(&mut self, m: ir::MeterRef, p: &MeterProfile) -> Result<(), Refusal> {
        self.inner.update_meter(m, p)
    }
    fn destroy_meter(&mut self, m: ir::MeterRef) {
        self.inner.destroy_meter(m);
    }
}

/// For random models and packets under the grouped profiles: a target that refuses a random
/// quarter of the creates it is asked for ends up holding exactly the compiler's plan, every
/// refused route reports software with the driver's reason (or a reason that follows from
/// it), and "target, then pipeline" still forwards every packet as the model does. Then a
/// batch of route changes is programmed incrementally on the same target and checked again.
#[test]
fn create_refusals_fall_back_to_software() {
    use flow_offload::program::{program, RefNicTarget};
    use flow_offload::refnic::RefNic;
    let mut runner = TestRunner::new(config(96));
    let refused_total = RefCell::new(0usize);
    let strategy = (
        model_spec(),
        vec(pkt_spec(), 1..=32),
        vec(route_change(), 0..=8),
        any::<u64>(),
    );
    let result = runner.run(&strategy, |(spec, pkts, changes, seed)| {
        let Some(model) = build_model(&spec) else {
            return Err(TestCaseError::reject("node and VPCs refused"));
        };
        for profile in [Profile::Full, Profile::Partial, Profile::TapLike] {
            let caps = Caps::profile(profile);
            let mut target = Refusing {
                inner: RefNicTarget::new(RefNic::new(caps.clone())),
                seed,
                one_in: 4,
                refused: 0,
            };
            let mut compiler = Compiler::new(caps.clone());
            compiler.rebuild(&model);
            let report = program(&mut compiler, &model, &mut target)
                .map_err(|e| fail(format!("{profile:?}: {e}")))?;
            *refused_total.borrow_mut() += report.refused.len();
            let installed = target.inner.installed();
            let planned = compiler.plan().hw.installed();
            if installed != planned {
                return Err(fail(format!(
                    "{profile:?}: target holds {} rules, plan {}",
                    installed.rules.len(),
                    planned.rules.len()
                )));
            }
            for (id, refusal) in &report.refused {
                if let RuleId::Route { key, .. } = id {
                    let status = compiler.plan().status(&ObjectKey::Route(*key));
                    if status == flow_offload::status::OffloadStatus::Offloaded {
                        return Err(fail(format!(
                            "{profile:?}: {key:?} refused ({refusal}) but reported offloaded"
                        )));
                    }
                }
            }
            let mut c = Checker::new(&model, &caps, &installed, false, seed)
                .map_err(|m| fail(format!("{profile:?}: {m}")))?;
            run_packets(&mut c, &model, &pkts).map_err(|m| {
                fail(format!(
                    "{profile:?}: {m}\n{}\n{}",
                    model_summary(&model),
                    plan_summary(compiler.plan())
                ))
            })?;

            // Incremental route changes on the same target.
            let mut model2 = model.clone();
            let mut keys = Vec::new();
            for ch in &changes {
                let change = build_change(&model2, ch);
                let Some(change) = change else { continue };
                if model2.apply(std::slice::from_ref(&change)).is_ok() {
                    if let Change::UpsertRoute(r) = &change {
                        keys.push(r.key);
                    }
                    if let Change::DeleteRoute(k) = &change {
                        keys.push(*k);
                    }
                }
            }
            for k in &keys {
                compiler.forget_route_refusals(k);
                compiler.update_route(&model2, *k);
            }
            program(&mut compiler, &model2, &mut target)
                .map_err(|e| fail(format!("{profile:?} incremental: {e}")))?;
            let installed = target.inner.installed();
            if installed != compiler.plan().hw.installed() {
                return Err(fail(format!(
                    "{profile:?}: incremental target differs from plan"
                )));
            }
            let mut c = Checker::new(&model2, &caps, &installed, false, seed)
                .map_err(|m| fail(format!("{profile:?} incremental: {m}")))?;
            run_packets(&mut c, &model2, &pkts)
                .map_err(|m| fail(format!("{profile:?} incremental: {m}")))?;
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let refused = refused_total.into_inner();
    eprintln!("create_refusals_fall_back_to_software: {refused} creates refused");
    assert!(refused > 0, "the test target never refused a create");
}

/// Model differences as changes: `to_changes` always rebuilds a model exactly, and
/// `changes_to` turns one random model into another whenever `apply` accepts the batch (it
/// refuses only what the docs say: a VPC moved to another table under its routes, and the
/// like; the host then sends the whole model).
#[test]
fn model_changes_roundtrip() {
    let mut runner = TestRunner::new(config(256));
    let applied = RefCell::new((0usize, 0usize));
    let result = runner.run(&(model_spec(), model_spec()), |(sa, sb)| {
        let (Some(a), Some(b)) = (build_model(&sa), build_model(&sb)) else {
            return Err(TestCaseError::reject("node and VPCs refused"));
        };
        for m in [&a, &b] {
            let mut fresh = Model::new();
            fresh
                .apply(&m.to_changes())
                .map_err(|e| fail(format!("to_changes refused: {e}")))?;
            if fresh != *m {
                return Err(fail("to_changes did not rebuild the model".into()));
            }
        }
        let Some(ch) = a.changes_to(&b) else {
            return Ok(());
        };
        let mut m = a.clone();
        let mut counts = applied.borrow_mut();
        counts.1 += 1;
        if m.apply(&ch).is_ok() {
            counts.0 += 1;
            if m != b {
                return Err(fail(
                    "changes_to applied but did not reach the target".into(),
                ));
            }
        } else if m != a {
            return Err(fail("a refused batch changed the model".into()));
        }
        // And back.
        if let Some(back) = b.changes_to(&a) {
            let mut m = b.clone();
            if m.apply(&back).is_ok() && m != a {
                return Err(fail("changes back did not reach the start".into()));
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let (ok, all) = applied.into_inner();
    eprintln!("model_changes_roundtrip: {ok} of {all} incremental batches applied");
    assert!(
        ok * 2 > all,
        "most differences must apply incrementally: {ok}/{all}"
    );
}
