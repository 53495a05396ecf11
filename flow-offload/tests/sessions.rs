//! Offloading established NAPT44 sessions on the reference NIC: the driver
//! ([`SessionOffload`]) installs exact-match rules for established sessions, keeps them alive
//! from the rules' counters, takes them back on teardown, idleness and route changes, and
//! "NIC with session rules, then pipeline" forwards exactly as software alone / the model does.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use core::net::{IpAddr, Ipv4Addr};
use std::cell::RefCell;

use flow_offload::caps::{Caps, Profile};
use flow_offload::compile::{
    compile, session_rules, Compiler, RuleId, SessionDir, SwReason, TeardownFlag, PRIO_SESSION,
    PRIO_TEARDOWN_TRAP,
};
use flow_offload::ir::Action;
use flow_offload::model::{
    Change, Ipv4Range, MacAddr, Meter, MeterProfile, MeterTarget, Model, Name, NatKind, NatRule,
    Nexthop, Node, PortId, Prefix, Route, RouteKey, TableId, Vni, Vpc, UNDERLAY_TABLE,
};
use flow_offload::program::{program, CountQuery, FlowTarget, RefNicTarget};
use flow_offload::refnic::{NicVerdict, RefNic};
use flow_offload::sessions::{Removal, SessionOffload, SessionOffloadConfig};
use flow_offload::soft::nat::{Proto, SessionId, TcpState};
use flow_offload::soft::pipeline::{Pipeline, Verdict};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};

use common::gen::{build_change, build_model, build_packet, model_spec, pkt_spec, route_change};
use common::harness::{caps_variants, limits, Checker};
use common::reference::{emit, parse, Frame, Net, L4, V4};

// ---------------------------------------------------------------------------------------------
// A small world: one VPC behind NAPT44, two uplinks
// ---------------------------------------------------------------------------------------------

const SEC: u64 = 1_000_000_000;
const ROUTER: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x01]);
const HOST_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0x09, 0x01]);
const BLUE: TableId = TableId(10);
const INSIDE: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 3);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const VPC_PORT: PortId = PortId(10);
const UPLINK: PortId = PortId(1);

fn nm(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn pfx(s: &str) -> Prefix {
    s.parse().unwrap()
}

fn mac(last: u8) -> MacAddr {
    MacAddr([0x02, 0, 0, 0, 0x01, last])
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

fn to_port(port: u16, mac_last: u8) -> Nexthop {
    Nexthop::Underlay {
        gateway: IpAddr::V4(Ipv4Addr::new(100, 64, 9, mac_last)),
        port: PortId(port),
        mac: mac(mac_last),
    }
}

/// Uplinks 1 and 2, VPC `blue` on port 10 with NAPT44 out of 203.0.113.8-9; the underlay's
/// default route is ECMP over both uplinks; `meter` adds a VPC meter.
fn world(meter: bool) -> Model {
    let mut changes = vec![
        Change::SetNode(Node {
            vtep: Ipv4Addr::new(100, 64, 0, 1),
            router_mac: ROUTER,
            uplinks: [PortId(1), PortId(2)].into_iter().collect(),
        }),
        Change::UpsertVpc(Vpc {
            name: nm("blue"),
            vni: Vni::new(100).unwrap(),
            table: BLUE,
            ports: [VPC_PORT].into_iter().collect(),
        }),
        route(
            UNDERLAY_TABLE,
            "0.0.0.0/0",
            vec![to_port(1, 1), to_port(2, 2)],
        ),
        route(
            BLUE,
            "0.0.0.0/0",
            vec![Nexthop::Vrf {
                table: UNDERLAY_TABLE,
            }],
        ),
        route(BLUE, "10.0.0.0/8", vec![to_port(10, 9)]),
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
    ];
    if meter {
        changes.push(Change::UpsertMeter(Meter {
            name: nm("blue-in"),
            target: MeterTarget::Vpc(nm("blue")),
            profile: MeterProfile::SrTcm {
                cir: 1_000_000_000,
                cbs: 1 << 20,
                ebs: 1 << 20,
            },
        }));
    }
    let mut m = Model::new();
    m.apply(&changes).unwrap();
    m
}

fn frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), l4: L4, ttl: u8) -> Vec<u8> {
    let mut l4 = l4;
    match &mut l4 {
        L4::Udp { sport, dport, .. } | L4::Tcp { sport, dport, .. } => {
            *sport = src.1;
            *dport = dst.1;
        }
        L4::Echo { .. } => {}
    }
    emit(&Frame {
        dst: ROUTER,
        src: HOST_MAC,
        vlan: None,
        net: Net::V4 {
            ip: V4 {
                src: src.0,
                dst: dst.0,
                ttl,
                tos: 0,
                ident: 9,
                df: true,
            },
            l4,
        },
    })
}

fn tcp(flags: u8, payload: &[u8]) -> L4 {
    L4::Tcp {
        sport: 0,
        dport: 0,
        seq: 100,
        ack: 200,
        flags,
        window: 1000,
        payload: payload.to_vec(),
    }
}

fn udp(payload: &[u8]) -> L4 {
    L4::Udp {
        sport: 0,
        dport: 0,
        csum: true,
        payload: payload.to_vec(),
    }
}

/// What happened to a packet, and whether the NIC alone decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Out {
    Tx(PortId, Vec<u8>),
    ToHost,
    Drop(String),
}

/// The NIC (programmed with the compiler's plan, plus whatever the driver adds) and the
/// pipeline behind it.
struct Sys {
    model: Model,
    caps: Caps,
    compiler: Compiler,
    target: RefNicTarget,
    pipe: Pipeline,
    offload: SessionOffload,
}

impl Sys {
    fn new(model: &Model, caps: Caps, cfg: SessionOffloadConfig) -> Sys {
        let mut compiler = Compiler::new(caps.clone());
        compiler.rebuild(model);
        let mut target = RefNicTarget::new(RefNic::new(caps.clone()));
        program(&mut compiler, model, &mut target).unwrap();
        Sys {
            model: model.clone(),
            caps,
            compiler,
            target,
            pipe: Pipeline::new(model, limits(), 7).unwrap(),
            offload: SessionOffload::new(cfg),
        }
    }

    /// Runs a packet: NIC, then pipeline. Returns the outcome and whether the NIC transmitted
    /// it by itself.
    fn send(&mut self, port: PortId, bytes: &[u8], now: u64) -> (Out, bool) {
        let mut f = bytes.to_vec();
        match self.target.nic.process(port, &mut f, now) {
            NicVerdict::Tx { port } => (Out::Tx(port, f), true),
            NicVerdict::Drop(d) => (Out::Drop(format!("nic {d:?}")), true),
            NicVerdict::ToSoftware { mark, .. } => {
                let out = match self.pipe.process(&mut f, port, mark, now) {
                    Verdict::Tx(p) => Out::Tx(p, f),
                    Verdict::ToHost => Out::ToHost,
                    Verdict::Drop(r) => Out::Drop(format!("sw {r:?}")),
                };
                (out, false)
            }
        }
    }

    fn tick(&mut self, now: u64) -> flow_offload::sessions::TickReport {
        self.offload.tick(
            &mut self.pipe,
            &self.model,
            self.compiler.plan(),
            &self.caps,
            &mut self.target,
            now,
        )
    }

    fn session_rules(&self) -> Vec<RuleId> {
        self.target
            .installed()
            .rules
            .keys()
            .filter(|id| matches!(id, RuleId::Session { .. }))
            .cloned()
            .collect()
    }

    /// The single NAPT44 session's id: the offloaded one, else the candidate.
    fn only_session(&self) -> SessionId {
        if let Some((_, id)) = self.offload.offloaded().next() {
            return id;
        }
        let offer = self.pipe.session_candidates(2 * SEC, 0).next();
        offer.map(|o| o.id).expect("no session")
    }
}

fn cfg() -> SessionOffloadConfig {
    SessionOffloadConfig {
        min_age_ns: SEC,
        idle_guard_ns: 30 * SEC,
        ..SessionOffloadConfig::default()
    }
}

/// A system with session offload and its twin without (same plan, same seed): the twin says
/// what software alone does.
fn pair(model: &Model, caps: Caps) -> (Sys, Sys) {
    (
        Sys::new(model, caps.clone(), cfg()),
        Sys::new(model, caps, cfg()),
    )
}

/// Sends a packet to both; they must agree exactly. Returns the offloading system's outcome
/// and whether its NIC alone transmitted it.
fn both(a: &mut Sys, twin: &mut Sys, port: PortId, bytes: &[u8], now: u64) -> (Out, bool) {
    let (x, hw) = a.send(port, bytes, now);
    let (y, _) = twin.send(port, bytes, now);
    assert_eq!(x, y, "offloaded vs software-only differ at t={now}");
    (x, hw)
}

fn translated(out: &Out) -> (Ipv4Addr, u16) {
    let Out::Tx(_, f) = out else {
        panic!("expected tx, got {out:?}")
    };
    let f = parse(f).unwrap();
    let Net::V4 { ip, l4 } = f.net else {
        panic!("not IPv4")
    };
    (ip.src, l4.sport())
}

/// SYN out, SYN-ACK back, ACK out, all through software. Returns the outside endpoint.
fn handshake(a: &mut Sys, twin: &mut Sys, sport: u16, t: u64) -> (Ipv4Addr, u16) {
    let inside = (INSIDE, sport);
    let remote = (REMOTE, 80);
    let (o, hw) = both(
        a,
        twin,
        VPC_PORT,
        &frame(inside, remote, tcp(0x02, b""), 64),
        t,
    );
    assert!(!hw, "a SYN of a new flow must take the software path");
    let outside = translated(&o);
    let (o, hw) = both(
        a,
        twin,
        UPLINK,
        &frame(remote, outside, tcp(0x12, b""), 60),
        t + 1,
    );
    assert!(!hw);
    assert!(matches!(o, Out::Tx(VPC_PORT, _)), "{o:?}");
    both(
        a,
        twin,
        VPC_PORT,
        &frame(inside, remote, tcp(0x10, b""), 64),
        t + 2,
    );
    outside
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// (a) An established TCP session is offloaded on a tick: its rules (outbound on the VPC port,
/// inbound on both uplinks) are installed at PRIO_SESSION, and later packets of the flow in
/// both directions are transmitted by the NIC alone, byte for byte as software alone does,
/// without reaching the pipeline's session.
#[test]
fn established_tcp_session_is_offloaded_and_hardware_matches_software() {
    for meter in [false, true] {
        let model = world(meter);
        let (mut a, mut twin) = pair(&model, Caps::profile(Profile::Full));
        let outside = handshake(&mut a, &mut twin, 1001, SEC);
        // Too young on the first tick, offloaded on the next.
        assert_eq!(a.tick(SEC + 10).installed, 0);
        let r = a.tick(3 * SEC);
        assert_eq!(r.installed, 1, "{:?}", a.offload.stats());
        let id = a.only_session();
        assert!(a.pipe.session(&nm("out"), id).unwrap().offloaded);
        let rules = a.session_rules();
        assert_eq!(rules.len(), 3, "{rules:?}");
        let installed = a.target.installed();
        for id in &rules {
            let RuleId::Session { dir, port, .. } = id else {
                unreachable!()
            };
            let rule = &installed.rules[id];
            assert_eq!((rule.attr.group, rule.attr.priority), (0, PRIO_SESSION));
            match dir {
                SessionDir::Outbound => {
                    assert_eq!(*port, VPC_PORT);
                    assert_eq!(rule.actions.contains(&Action::Meter(ir_meter())), meter);
                }
                SessionDir::Inbound => assert!([PortId(1), PortId(2)].contains(port)),
            }
        }
        let seen = a.pipe.session(&nm("out"), id).unwrap().last_seen_ns;
        let inside = (INSIDE, 1001);
        let remote = (REMOTE, 80);
        for i in 0..4u64 {
            let t = 4 * SEC + i * 1000;
            let (o, hw) = both(
                &mut a,
                &mut twin,
                VPC_PORT,
                &frame(inside, remote, tcp(0x18, b"data out"), 64),
                t,
            );
            assert!(hw, "outbound packet {i} was not handled by the NIC alone");
            assert_eq!(translated(&o), outside);
            for uplink in [PortId(1), PortId(2)] {
                let (o, hw) = both(
                    &mut a,
                    &mut twin,
                    uplink,
                    &frame(remote, outside, tcp(0x10, b"data in"), 50),
                    t + 1,
                );
                assert!(
                    hw,
                    "inbound packet {i} on {uplink:?} was not handled by the NIC"
                );
                assert!(matches!(o, Out::Tx(VPC_PORT, _)), "{o:?}");
            }
            // UDP to the same endpoints is another session: software.
            let (_, hw) = both(
                &mut a,
                &mut twin,
                VPC_PORT,
                &frame(inside, remote, udp(b"x"), 64),
                t + 2,
            );
            assert!(!hw);
        }
        assert_eq!(
            a.pipe.session(&nm("out"), id).unwrap().last_seen_ns,
            seen,
            "hardware-forwarded packets reached the session"
        );
        // TTL 1: hardware hands it back; software drops it, like the twin.
        let (o, hw) = both(
            &mut a,
            &mut twin,
            VPC_PORT,
            &frame(inside, remote, tcp(0x10, b""), 1),
            5 * SEC,
        );
        assert!(!hw && matches!(o, Out::Drop(_)), "{o:?}");
    }
}

/// The VPC meter sees an offloaded flow's packets exactly once and in the same place as
/// without offload, TTL-expired ones included (hardware polices before `DEC_TTL` hands them
/// back, marked, so software does not police them again): with a tight meter, the policing
/// decisions of the offloaded system equal software alone's.
#[test]
fn tight_vpc_meter_polices_offloaded_flows_like_software() {
    let mut model = world(false);
    model
        .apply(&[Change::UpsertMeter(Meter {
            name: nm("blue-in"),
            target: MeterTarget::Vpc(nm("blue")),
            profile: MeterProfile::SrTcm {
                cir: 100,
                cbs: 1518,
                ebs: 0,
            },
        })])
        .unwrap();
    let (mut a, mut twin) = pair(&model, Caps::profile(Profile::Full));
    handshake(&mut a, &mut twin, 1007, SEC);
    assert_eq!(a.tick(3 * SEC).installed, 1);
    let inside = (INSIDE, 1007);
    let remote = (REMOTE, 80);
    let big = [7u8; 600];
    let mut outcomes = Vec::new();
    for (i, ttl) in [1u8, 64, 64, 1, 64].into_iter().enumerate() {
        let t = 5 * SEC + i as u64;
        let (o, _) = both(
            &mut a,
            &mut twin,
            VPC_PORT,
            &frame(inside, remote, tcp(0x18, &big), ttl),
            t,
        );
        outcomes.push(o);
    }
    assert!(
        outcomes
            .iter()
            .any(|o| matches!(o, Out::Drop(d) if d.contains("Meter") || d.contains("Policed"))),
        "the meter never coloured red: {outcomes:?}"
    );
}

fn ir_meter() -> flow_offload::ir::MeterRef {
    flow_offload::ir::MeterRef(BLUE.0)
}

/// (b) While hardware carries the flow, polling its counters refreshes the session, so it
/// outlives its idle timeout (UDP: 5 minutes) by far, and the session counts what hardware
/// forwarded.
#[test]
fn counters_keep_an_offloaded_session_alive() {
    let model = world(false);
    let (mut a, mut twin) = pair(&model, Caps::profile(Profile::Full));
    let inside = (INSIDE, 5000);
    let remote = (REMOTE, 53);
    let (o, _) = both(
        &mut a,
        &mut twin,
        VPC_PORT,
        &frame(inside, remote, udp(b"q"), 64),
        SEC,
    );
    let outside = translated(&o);
    both(
        &mut a,
        &mut twin,
        UPLINK,
        &frame(remote, outside, udp(b"r"), 60),
        SEC + 1,
    );
    assert_eq!(a.tick(3 * SEC).installed, 1);
    let id = a.only_session();
    let first_deadline = a.pipe.session(&nm("out"), id).unwrap().expires_at_ns;
    let mut sent = 0u64;
    let mut t = 3 * SEC;
    // 20 minutes of traffic, one packet each way per minute, ticks every 30 s.
    while t < 20 * 60 * SEC {
        t += 30 * SEC;
        let (_, hw) = a.send(VPC_PORT, &frame(inside, remote, udp(b"more"), 64), t);
        let (_, hw2) = a.send(UPLINK, &frame(remote, outside, udp(b"back"), 64), t + 1);
        assert!(hw && hw2, "at t={t} the flow left hardware");
        sent += 2;
        a.tick(t + 2);
    }
    assert!(t > first_deadline + 10 * 60 * SEC);
    assert!(a.pipe.session_alive(&nm("out"), id, t + 3));
    let v = a.pipe.session(&nm("out"), id).unwrap();
    assert!(v.offloaded);
    assert_eq!(
        v.packets, sent,
        "hardware packets not recorded on the session"
    );
    assert!(v.expires_at_ns > t);
    assert!(a.offload.stats().refreshed >= 30);
    assert!(a.offload.is_offloaded(&nm("out"), id));
}

/// (c) An offloaded session nobody uses is handed back to software before its deadline (rules
/// destroyed, unmarked), then expires and is swept; it is not offered again meanwhile.
#[test]
fn idle_offloaded_session_ages_out() {
    let model = world(false);
    let (mut a, mut twin) = pair(&model, Caps::profile(Profile::Full));
    let inside = (INSIDE, 5001);
    let remote = (REMOTE, 123);
    let (o, _) = both(
        &mut a,
        &mut twin,
        VPC_PORT,
        &frame(inside, remote, udp(b"q"), 64),
        SEC,
    );
    let outside = translated(&o);
    both(
        &mut a,
        &mut twin,
        UPLINK,
        &frame(remote, outside, udp(b"r"), 60),
        SEC + 1,
    );
    assert_eq!(a.tick(3 * SEC).installed, 1);
    let id = a.only_session();
    let deadline = a.pipe.session(&nm("out"), id).unwrap().expires_at_ns;
    let mut t = 3 * SEC;
    let mut handed_back = None;
    while t < deadline + 60 * SEC {
        t += 10 * SEC;
        a.tick(t);
        if handed_back.is_none() && a.session_rules().is_empty() {
            handed_back = Some(t);
        }
    }
    let back = handed_back.expect("rules never removed");
    assert!(
        back < deadline,
        "rules outlived the session ({back} >= {deadline})"
    );
    assert!(back + 30 * SEC >= deadline);
    assert_eq!(a.offload.stats().removed.get(&Removal::Idle), Some(&1));
    assert_eq!(a.offload.stats().installed, 1, "re-offered while idle");
    assert!(
        a.pipe.session(&nm("out"), id).is_none(),
        "session not swept"
    );
    assert_eq!(a.offload.offloaded_count(), 0);
    // A late reply finds no session: dropped, in hardware and software alike.
    let (o, hw) = a.send(UPLINK, &frame(remote, outside, udp(b"late"), 60), t);
    assert!(!hw && matches!(o, Out::Drop(_)), "{o:?}");
}

/// (d) A FIN from inside and a RST from outside hit the teardown traps: software sees them
/// (and translates them exactly as without offload), the session leaves Established, and the
/// next tick removes its rules; later packets take the software path.
#[test]
fn fin_and_rst_reach_software_and_end_the_offload() {
    for (port, flags, from_inside) in [(VPC_PORT, 0x11u8, true), (UPLINK, 0x14u8, false)] {
        let model = world(true);
        let (mut a, mut twin) = pair(&model, Caps::profile(Profile::Full));
        let outside = handshake(&mut a, &mut twin, 1002, SEC);
        assert_eq!(a.tick(3 * SEC).installed, 1);
        let id = a.only_session();
        let inside = (INSIDE, 1002);
        let remote = (REMOTE, 80);
        let bytes = if from_inside {
            frame(inside, remote, tcp(flags, b""), 64)
        } else {
            frame(remote, outside, tcp(flags, b""), 60)
        };
        let (o, hw) = both(&mut a, &mut twin, port, &bytes, 4 * SEC);
        assert!(!hw, "teardown segment bypassed software");
        assert!(matches!(o, Out::Tx(..)), "{o:?}");
        let state = a.pipe.session(&nm("out"), id).unwrap().tcp_state;
        let want = if from_inside {
            TcpState::FinOutbound
        } else {
            TcpState::Reset
        };
        assert_eq!(state, Some(want));
        assert!(!a.session_rules().is_empty());
        a.tick(5 * SEC);
        assert!(a.session_rules().is_empty(), "rules left after teardown");
        assert_eq!(a.offload.stats().removed.get(&Removal::Teardown), Some(&1));
        assert!(!a.pipe.session(&nm("out"), id).unwrap().offloaded);
        let (_, hw) = both(
            &mut a,
            &mut twin,
            UPLINK,
            &frame(remote, outside, tcp(0x10, b""), 60),
            6 * SEC,
        );
        assert!(!hw, "after teardown the flow must be in software");
    }
}

/// (e) Targets whose capabilities refuse session rules (TapLike, None, and Partial without L4
/// port rewrites) hold no teardown traps and no session rules; sessions stay in software,
/// counted with the target's refusal.
#[test]
fn refusing_targets_keep_sessions_in_software() {
    for profile in [Profile::TapLike, Profile::None, Profile::Partial] {
        let model = world(false);
        let (mut a, mut twin) = pair(&model, Caps::profile(profile));
        let plan = a.compiler.plan().clone();
        assert!(
            !plan
                .hw
                .structure
                .keys()
                .any(|k| matches!(k, RuleId::TeardownTrap { .. })),
            "{profile:?} got teardown traps"
        );
        let outside = handshake(&mut a, &mut twin, 1003, SEC);
        let r = a.tick(3 * SEC);
        assert_eq!((r.installed, r.refused), (0, 1), "{profile:?}");
        let refused = &a.offload.stats().refused;
        assert!(
            refused
                .keys()
                .all(|k| matches!(k, SwReason::Unsupported(_))),
            "{profile:?}: {refused:?}"
        );
        assert!(a.session_rules().is_empty());
        let (_, hw) = both(
            &mut a,
            &mut twin,
            UPLINK,
            &frame((REMOTE, 80), outside, tcp(0x10, b""), 60),
            4 * SEC,
        );
        assert!(!hw);
    }
}

/// The teardown traps of the plan: FIN (RST clear) and RST on the VPC port (with the VPC's
/// meter and resume mark when it has a hardware meter) and on each uplink per pool block; a
/// session whose traps are missing is refused.
#[test]
fn teardown_traps_and_their_absence() {
    let model = world(true);
    let caps = Caps::profile(Profile::Full);
    let plan = compile(&model, &caps);
    let traps: Vec<(&RuleId, &flow_offload::ir::Rule)> = plan
        .hw
        .structure
        .iter()
        .filter(|(k, _)| matches!(k, RuleId::TeardownTrap { .. }))
        .collect();
    // VPC port: 2 flags; uplinks: 2 × one /31 block × 2 flags.
    assert_eq!(traps.len(), 2 + 2 * 2, "{traps:?}");
    for (id, rule) in &traps {
        assert_eq!(
            (rule.attr.group, rule.attr.priority),
            (0, PRIO_TEARDOWN_TRAP)
        );
        let RuleId::TeardownTrap { port, block, flag } = id else {
            unreachable!()
        };
        if *port == VPC_PORT {
            assert_eq!(*block, None);
            assert!(matches!(rule.actions.first(), Some(Action::Meter(_))));
        } else {
            assert_eq!(*block, Some(pfx("203.0.113.8/31")));
            assert_eq!(rule.actions, vec![Action::Queue(0)]);
        }
        let _ = flag;
    }
    // Without the FIN trap on one uplink, TCP sessions are refused, UDP ones are not.
    let mut a = Sys::new(&model, caps.clone(), cfg());
    handshake_single(&mut a, 1004, SEC);
    let offer = a.pipe.session_candidates(3 * SEC, 0).next().unwrap();
    let mut broken = plan.clone();
    broken.hw.structure.remove(&RuleId::TeardownTrap {
        port: PortId(2),
        block: Some(pfx("203.0.113.8/31")),
        flag: TeardownFlag::Fin,
    });
    assert_eq!(
        session_rules(&offer, 0, &broken, &caps, &model).unwrap_err(),
        SwReason::TeardownNotTrapped
    );
    assert_eq!(
        session_rules(&offer, 0, &plan, &caps, &model)
            .unwrap()
            .len(),
        3
    );
    let mut udp_offer = offer.clone();
    udp_offer.proto = Proto::Udp;
    assert!(session_rules(&udp_offer, 0, &broken, &caps, &model).is_ok());
}

fn handshake_single(a: &mut Sys, sport: u16, t: u64) -> (Ipv4Addr, u16) {
    let inside = (INSIDE, sport);
    let remote = (REMOTE, 80);
    let (o, _) = a.send(VPC_PORT, &frame(inside, remote, tcp(0x02, b""), 64), t);
    let outside = translated(&o);
    a.send(UPLINK, &frame(remote, outside, tcp(0x12, b""), 60), t + 1);
    outside
}

/// A change to a route a session's path depends on removes its rules at once (and only those
/// sessions'); software then forwards by the new route, and the session is offered again with
/// the new path.
#[test]
fn route_change_takes_dependent_sessions_back() {
    let model = world(false);
    let mut a = Sys::new(&model, Caps::profile(Profile::Full), cfg());
    handshake_single(&mut a, 1005, SEC);
    assert_eq!(a.tick(3 * SEC).installed, 1);
    // Unrelated: another VPC prefix.
    let unrelated = RouteKey {
        table: BLUE,
        prefix: pfx("172.16.0.0/12"),
    };
    assert_eq!(
        a.offload
            .route_changed(&mut a.pipe, &mut a.target, &unrelated, 4 * SEC),
        0
    );
    // A more specific underlay route toward the remote, via uplink 2 only.
    let key = RouteKey {
        table: UNDERLAY_TABLE,
        prefix: pfx("198.51.100.0/24"),
    };
    a.model
        .apply(&[route(
            UNDERLAY_TABLE,
            "198.51.100.0/24",
            vec![to_port(2, 2)],
        )])
        .unwrap();
    a.compiler.update_route(&a.model, key);
    a.pipe.update_route(&a.model, key).unwrap();
    assert_eq!(
        a.offload
            .route_changed(&mut a.pipe, &mut a.target, &key, 4 * SEC),
        1
    );
    program(&mut a.compiler, &a.model.clone(), &mut a.target).unwrap();
    assert!(a.session_rules().is_empty());
    assert_eq!(
        a.offload.stats().removed.get(&Removal::RouteChanged),
        Some(&1)
    );
    assert_eq!(a.tick(5 * SEC).installed, 1);
    let out_rule = a
        .target
        .installed()
        .rules
        .into_iter()
        .find(|(k, _)| {
            matches!(
                k,
                RuleId::Session {
                    dir: SessionDir::Outbound,
                    ..
                }
            )
        })
        .unwrap()
        .1;
    assert_eq!(out_rule.actions.last(), Some(&Action::Port(PortId(2))));
    // Flush takes everything back.
    assert_eq!(a.offload.flush(&mut a.pipe, &mut a.target, 6 * SEC), 1);
    assert!(a.session_rules().is_empty());
}

impl Sys {
    /// A rebuild as the DPU agent does it for a non-route change: new plan, new pipeline that
    /// takes the old one's NAT tables, offloaded sessions kept where their rules are the same,
    /// then the new plan programmed. Returns (kept, removed).
    fn rebuild(&mut self, model: &Model, now: u64) -> (usize, usize) {
        self.model = model.clone();
        self.compiler.rebuild(model);
        let mut fresh = Pipeline::new(model, limits(), 7).unwrap();
        let carry = fresh.carry_nat_from(&mut self.pipe);
        let r = self.offload.retain_valid(
            &mut fresh,
            &mut self.target,
            (self.compiler.plan(), &self.caps, model),
            &carry.carried,
            now,
        );
        self.pipe = fresh;
        program(&mut self.compiler, model, &mut self.target).unwrap();
        r
    }
}

/// A rebuild for an unrelated change (a new VPC) keeps an offloaded session in hardware, with
/// its binding; one that changes the session's own path (its VPC gains a meter) takes it back
/// to software, where the carried-over table still holds its binding.
#[test]
fn rebuild_keeps_offloaded_sessions_whose_rules_do_not_change() {
    let model = world(false);
    let mut a = Sys::new(&model, Caps::profile(Profile::Full), cfg());
    let outside = handshake_single(&mut a, 1005, SEC);
    assert_eq!(a.tick(3 * SEC).installed, 1);
    let rules = a.session_rules();
    assert!(!rules.is_empty());

    let mut green = model.clone();
    green
        .apply(&[Change::UpsertVpc(Vpc {
            name: nm("green"),
            vni: Vni::new(300).unwrap(),
            table: TableId(30),
            ports: [PortId(11)].into_iter().collect(),
        })])
        .unwrap();
    assert_eq!(a.rebuild(&green, 4 * SEC), (1, 0));
    assert_eq!(
        a.session_rules(),
        rules,
        "the session's rules stay in hardware"
    );
    // The remote's next segment is still answered by the NIC alone, to the same binding.
    let (o, hw) = a.send(
        UPLINK,
        &frame((REMOTE, 80), outside, tcp(0x10, b"x"), 60),
        5 * SEC,
    );
    assert!(hw, "still in hardware after the rebuild");
    assert!(matches!(o, Out::Tx(VPC_PORT, _)), "{o:?}");

    // A meter on the session's VPC changes its rules: taken back, binding kept in software.
    let mut metered = green.clone();
    metered
        .apply(&[Change::UpsertMeter(Meter {
            name: nm("blue-in"),
            target: MeterTarget::Vpc(nm("blue")),
            profile: MeterProfile::SrTcm {
                cir: 1_000_000_000,
                cbs: 1 << 20,
                ebs: 1 << 20,
            },
        })])
        .unwrap();
    assert_eq!(a.rebuild(&metered, 6 * SEC), (0, 1));
    assert!(a.session_rules().is_empty());
    let (o, hw) = a.send(
        UPLINK,
        &frame((REMOTE, 80), outside, tcp(0x10, b"y"), 60),
        7 * SEC,
    );
    assert!(!hw);
    assert!(
        matches!(o, Out::Tx(VPC_PORT, _)),
        "software still has the binding: {o:?}"
    );
    // And it is offered again under the new plan.
    assert_eq!(a.tick(8 * SEC).installed, 1);
}

/// A target that refuses a session rule's create: the rules created for that session are
/// destroyed, the session stays in software, and installing pauses.
#[test]
fn create_refusal_leaves_the_session_in_software() {
    struct Full(RefNicTarget);
    impl FlowTarget for Full {
        fn create_rule(
            &mut self,
            id: &RuleId,
            rule: &flow_offload::ir::Rule,
        ) -> Result<(), flow_offload::caps::Refusal> {
            if matches!(
                id,
                RuleId::Session {
                    port: PortId(2),
                    ..
                }
            ) {
                return Err(flow_offload::caps::Refusal::NoSpace);
            }
            self.0.create_rule(id, rule)
        }
        fn replace_rule(
            &mut self,
            id: &RuleId,
            rule: &flow_offload::ir::Rule,
        ) -> Result<(), flow_offload::caps::Refusal> {
            self.0.replace_rule(id, rule)
        }
        fn destroy_rule(&mut self, id: &RuleId) {
            self.0.destroy_rule(id)
        }
        fn create_meter(
            &mut self,
            m: flow_offload::ir::MeterRef,
            p: &MeterProfile,
        ) -> Result<(), flow_offload::caps::Refusal> {
            self.0.create_meter(m, p)
        }
        fn update_meter(
            &mut self,
            m: flow_offload::ir::MeterRef,
            p: &MeterProfile,
        ) -> Result<(), flow_offload::caps::Refusal> {
            self.0.update_meter(m, p)
        }
        fn destroy_meter(&mut self, m: flow_offload::ir::MeterRef) {
            self.0.destroy_meter(m)
        }
    }
    impl CountQuery for Full {
        fn query_count(&mut self, id: &RuleId) -> Option<(u64, u64)> {
            self.0.query_count(id)
        }
    }
    let model = world(false);
    let mut a = Sys::new(&model, Caps::profile(Profile::Full), cfg());
    handshake_single(&mut a, 1006, SEC);
    let mut t = Full(RefNicTarget::new(RefNic::new(Caps::profile(Profile::Full))));
    program(&mut a.compiler, &model, &mut t).unwrap();
    let plan_rules = t.0.installed().rules.len();
    let r = a.offload.tick(
        &mut a.pipe,
        &model,
        a.compiler.plan(),
        &a.caps,
        &mut t,
        3 * SEC,
    );
    assert_eq!((r.installed, r.refused), (0, 1));
    assert_eq!(
        t.0.installed().rules.len(),
        plan_rules,
        "partial session left behind"
    );
    assert_eq!(
        a.offload
            .stats()
            .refused
            .get(&SwReason::Unsupported(flow_offload::caps::Refusal::NoSpace)),
        Some(&1)
    );
    let id = a.only_session();
    assert!(!a.pipe.session(&nm("out"), id).unwrap().offloaded);
    // Paused: the next tick does not try again.
    let r = a.offload.tick(
        &mut a.pipe,
        &model,
        a.compiler.plan(),
        &a.caps,
        &mut t,
        4 * SEC,
    );
    assert_eq!((r.installed, r.refused), (0, 0));
}

/// Work per tick is bounded: at most `install_budget` sessions installed and `poll_budget`
/// polled per tick, polling round robin so every offloaded session is refreshed in turn.
#[test]
fn ticks_do_bounded_work_round_robin() {
    let model = world(false);
    let mut a = Sys::new(
        &model,
        Caps::profile(Profile::Full),
        SessionOffloadConfig {
            min_age_ns: 0,
            install_budget: 2,
            poll_budget: 1,
            ..cfg()
        },
    );
    let remote = (REMOTE, 53);
    let mut flows = Vec::new();
    for sport in [6000u16, 6001, 6002] {
        let inside = (INSIDE, sport);
        let (o, _) = a.send(VPC_PORT, &frame(inside, remote, udp(b"q"), 64), SEC);
        let outside = translated(&o);
        a.send(UPLINK, &frame(remote, outside, udp(b"r"), 60), SEC + 1);
        flows.push((inside, outside));
    }
    assert_eq!(a.tick(2 * SEC).installed, 2);
    assert_eq!(a.tick(2 * SEC + 1).installed, 1);
    assert_eq!(a.offload.offloaded_count(), 3);
    for (inside, outside) in &flows {
        let (_, hw) = a.send(VPC_PORT, &frame(*inside, remote, udp(b"x"), 64), 3 * SEC);
        let (_, hw2) = a.send(UPLINK, &frame(remote, *outside, udp(b"y"), 60), 3 * SEC);
        assert!(hw && hw2);
    }
    for i in 0..3 {
        let r = a.tick(4 * SEC + i);
        assert_eq!(
            r.refreshed, 1,
            "tick {i} refreshed {} sessions",
            r.refreshed
        );
    }
    let ids: Vec<SessionId> = a.offload.offloaded().map(|(_, id)| id).collect();
    for id in ids {
        assert_eq!(a.pipe.session(&nm("out"), id).unwrap().packets, 2);
    }
}

// ---------------------------------------------------------------------------------------------
// (f) The property
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Step {
    /// A new packet (and the reply, if it left through a stateful NAT).
    Packet(common::gen::PktSpec),
    /// The `n`-th earlier packet again (and its reply).
    Replay(u8),
    /// A driver tick.
    Tick,
    /// A route change (model, compiler, pipeline, driver, NIC).
    Route(common::gen::RouteChange),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => pkt_spec().prop_map(Step::Packet),
        // From an inside host on a VPC port, plain IPv4 TCP or UDP: NAPT44 candidates.
        4 => pkt_spec().prop_map(|mut p| {
            p.port = 4 + (p.port % 5) + 10 * (p.port / 50);
            p.kind = 6;
            p.v6 = false;
            p.src &= !3;
            p.l4 %= 2;
            if p.dst.0 % 8 == 4 {
                p.dst.0 = 7;
            }
            Step::Packet(p)
        }),
        6 => any::<u8>().prop_map(Step::Replay),
        3 => Just(Step::Tick),
        1 => route_change().prop_map(Step::Route),
    ]
}

/// Totals over all cases, to check that the property exercised what it should.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    installed: u64,
    refreshed: u64,
    removed: u64,
    route_removed: u64,
    snat_tx: u64,
    refused: u64,
    /// Session rules seen installed with a VXLAN encapsulation / with a meter.
    encap_rules: u64,
    metered_rules: u64,
}

fn check(
    spec: &common::gen::ModelSpec,
    steps: &[Step],
    seed: u64,
    caps: &Caps,
) -> Result<Totals, String> {
    let Some(mut model) = build_model(spec) else {
        return Ok(Totals::default());
    };
    if !seed.is_multiple_of(4) {
        // Most generated VPCs route their inside hosts nowhere (the reply breaks out again):
        // give them host routes to a VPC port, so that sessions have a path to offload.
        let mut extra = Vec::new();
        for vpc in model.vpcs().values() {
            let ports: Vec<PortId> = vpc.ports.iter().copied().collect();
            for (k, a) in common::gen::INSIDE4.iter().enumerate() {
                let Some(port) = ports.get(k % ports.len().max(1)) else {
                    continue;
                };
                extra.push(Change::UpsertRoute(Route {
                    key: RouteKey {
                        table: vpc.table,
                        prefix: Prefix::new(IpAddr::V4(Ipv4Addr::from(*a)), 32).unwrap(),
                    },
                    nexthops: vec![Nexthop::Underlay {
                        gateway: IpAddr::V4(Ipv4Addr::from(*a)),
                        port: *port,
                        mac: common::gen::nh_mac(k as u8),
                    }],
                }));
            }
        }
        for ch in extra {
            let _ = model.apply(std::slice::from_ref(&ch));
        }
    }
    let mut compiler = Compiler::new(caps.clone());
    compiler.rebuild(&model);
    let _ = compiler.take_ops();
    let mut c = Checker::new(&model, caps, &compiler.plan().hw.installed(), false, seed)?;
    let mut offload = SessionOffload::new(SessionOffloadConfig {
        min_age_ns: 0,
        // Tiny tables: let sessions take the last free rules, so that plan changes hit
        // `NoSpace` and go through `program`'s recompile.
        reserve_rules: usize::from(seed.is_multiple_of(3)),
        ..SessionOffloadConfig::default()
    });
    let mut sent: Vec<(PortId, Vec<u8>)> = Vec::new();
    let mut now = 1_000u64;
    let mut totals = Totals::default();
    for s in steps {
        now += 1_000;
        match s {
            Step::Packet(p) => {
                now += p.dt;
                let (port, bytes) = build_packet(&model, p);
                c.packet_and_reply(port, &bytes, now)?;
                sent.push((port, bytes));
            }
            Step::Replay(i) => {
                if sent.is_empty() {
                    continue;
                }
                let (port, bytes) = sent[usize::from(*i) % sent.len()].clone();
                c.packet_and_reply(port, &bytes, now)
                    .map_err(|m| format!("replay: {m}"))?;
            }
            Step::Tick => {
                let (mut t, pipe) = c.sys.target();
                let r = offload.tick(pipe, &model, compiler.plan(), caps, &mut t, now);
                totals.installed += r.installed as u64;
                let sessions: Vec<_> = c
                    .sys
                    .handles
                    .iter()
                    .filter(|(k, _)| matches!(k, RuleId::Session { .. }))
                    .map(|(_, h)| *h)
                    .collect();
                for (h, rule) in c.sys.nic.rules() {
                    if sessions.contains(&h) {
                        let has = |f: fn(&Action) -> bool| rule.actions.iter().any(f);
                        totals.encap_rules +=
                            u64::from(has(|a| matches!(a, Action::VxlanEncap(_))));
                        totals.metered_rules += u64::from(has(|a| matches!(a, Action::Meter(_))));
                    }
                }
                totals.refreshed += r.refreshed as u64;
                totals.removed += r.removed as u64;
            }
            Step::Route(ch) => {
                let Some(change) = build_change(&model, ch) else {
                    continue;
                };
                let key = match &change {
                    Change::UpsertRoute(r) => r.key,
                    Change::DeleteRoute(k) => *k,
                    _ => continue,
                };
                if model.apply(std::slice::from_ref(&change)).is_err() {
                    continue;
                }
                compiler.update_route(&model, key);
                let (mut t, pipe) = c.sys.target();
                pipe.update_route(&model, key)
                    .map_err(|e| format!("pipeline update: {e}"))?;
                totals.route_removed += offload.route_changed(pipe, &mut t, &key, now) as u64;
                program(&mut compiler, &model, &mut t).map_err(|e| format!("program: {e}"))?;
                c.reference.set_routes_from(&model);
            }
        }
    }
    totals.snat_tx = c.stats.snat_tx as u64;
    totals.refused = offload.stats().refused.values().sum();
    Ok(totals)
}

/// (f) For random models, flows, replays, route changes and driver ticks under the Full
/// profile and its small-capacity variants (where session creates hit `NoSpace`): "reference NIC with the plan and the driver's session rules, then the pipeline"
/// forwards every packet exactly as the reference evaluation of the model does.
#[test]
fn offloaded_sessions_equal_the_model() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let mut runner = TestRunner::new(Config {
        cases,
        max_shrink_iters: 4096,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        // A fixed seed: the coverage checks below (encapsulating session rules in
        // particular) depend on what the generators happen to produce, and a random seed
        // missed encap once in four CI runs. `PROPTEST_RNG_SEED` still overrides it.
        rng_seed: std::env::var("PROPTEST_RNG_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(proptest::test_runner::RngSeed::Fixed(1), |s| {
                proptest::test_runner::RngSeed::Fixed(s)
            }),
        ..Config::default()
    });
    let total = RefCell::new(Totals::default());
    let strategy = (model_spec(), vec(step(), 1..=96), any::<u64>());
    let result = runner.run(&strategy, |(spec, steps, seed)| {
        for (name, caps) in caps_variants() {
            if !name.starts_with("Full") {
                continue;
            }
            let t = check(&spec, &steps, seed, &caps)
                .map_err(|m| TestCaseError::fail(format!("under {name}: {m}")))?;
            let mut tot = total.borrow_mut();
            tot.installed += t.installed;
            tot.refreshed += t.refreshed;
            tot.removed += t.removed;
            tot.route_removed += t.route_removed;
            tot.snat_tx += t.snat_tx;
            tot.refused += t.refused;
            tot.encap_rules += t.encap_rules;
            tot.metered_rules += t.metered_rules;
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let t = total.into_inner();
    eprintln!("offloaded_sessions_equal_the_model exercised: {t:?}");
    assert!(t.installed > 0, "no session was offloaded: {t:?}");
    assert!(
        t.refreshed > 0,
        "no offloaded session carried traffic: {t:?}"
    );
    assert!(t.removed > 0, "no offloaded session was taken back: {t:?}");
    assert!(
        t.route_removed > 0,
        "no route change took a session back: {t:?}"
    );
    assert!(t.refused > 0, "no session was refused: {t:?}");
    assert!(t.encap_rules > 0, "no session rule encapsulated: {t:?}");
    assert!(t.metered_rules > 0, "no session rule metered: {t:?}");
}
