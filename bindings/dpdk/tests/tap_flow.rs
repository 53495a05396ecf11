//! IR rules against DPDK's `net_tap` PMD (needs root and /dev/net/tun). The
//! PMD creates the kernel interface `dpcptap0` itself and deletes it when the
//! port closes; this test creates and removes nothing else. One EAL per
//! process: a single `#[test]` in this binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::Ipv4Addr;
use std::path::Path;

use dpdk::{
    DpdkTarget, Eal, Errno, FlowError, FlowErrorCause, ItemPart, Mempool, Port, PortConfig,
};
use flow_offload::caps::{Caps, CapsSource, Profile, Refusal};
use flow_offload::compile::{Compiler, SwReason};
use flow_offload::ir::{vxlan_source_port, Action, ActionKind, VxlanEncap};
use flow_offload::model::MacAddr;
use flow_offload::model::{MeterProfile, ObjectKey};
use flow_offload::program::program;
use flow_offload::status::OffloadStatus;

const IFACE: &str = "dpcptap0";

const EAL_ARGS: &[&str] = &[
    "dpdk-tap-flow",
    "-l",
    "0",
    "--no-huge",
    "--no-pci",
    "--no-shconf",
    "-m",
    "256",
    "--vdev=net_tap0,iface=dpcptap0",
    "--log-level=*:error",
];

fn iface_exists() -> bool {
    Path::new("/sys/class/net").join(IFACE).exists()
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

fn show(what: &str, r: &Result<(), FlowError>) {
    match r {
        Ok(()) => println!("{what}: OK"),
        Err(e) => println!("{what}: {e}"),
    }
}

#[test]
fn tap_flow_rules() {
    if !Path::new("/dev/net/tun").exists() {
        println!("SKIP: no /dev/net/tun");
        return;
    }
    assert!(
        !iface_exists(),
        "{IFACE} already exists: not ours, refusing to touch it"
    );
    let eal = Eal::init(EAL_ARGS).expect("EAL init");
    assert!(iface_exists(), "net_tap created {IFACE}");
    let pool = Mempool::pktmbuf(&eal, "tap_pool", 1023, 32, Mempool::DEFAULT_DATA_ROOM, None)
        .expect("mempool");
    let id = Port::id_by_name(&eal, "net_tap0").expect("net_tap0 present");
    let mut port = Port::configure(id, &pool, PortConfig::default()).expect("configure");
    port.start().expect("start");

    // eth/ipv4-prefix -> queue / drop: validate OK, create refused (this
    // kernel has no multiq qdisc, so the PMD cannot install TC rules).
    for (name, actions) in [
        ("queue", vec![Action::Queue(0)]),
        ("drop", vec![Action::Drop]),
    ] {
        let rule = common::ipv4_prefix(actions);
        let v = port.flow_validate(&rule);
        show(&format!("validate {name}"), &v);
        assert_eq!(v, Ok(()), "{name} validates");
        let c = port.flow_create(&rule).map(drop);
        show(&format!("create {name}"), &c);
        let err = c.expect_err("net_tap cannot install TC rules here");
        let errno = err.errno().expect("a driver refusal");
        println!("  errno {} = {errno}", errno.0);
        assert_eq!(errno, Errno::EXIST);
        assert_eq!(err.cause(), Some(FlowErrorCause::Handle));
    }

    // Actions net_tap has no translation for: the refusal names the action
    // by its index in the IR rule (put second on purpose).
    for (name, kind, action) in [
        (
            "set_ipv4_dst",
            ActionKind::SetIpv4Dst,
            Action::SetIpv4Dst(Ipv4Addr::new(10, 9, 9, 9)),
        ),
        ("vxlan_encap", ActionKind::VxlanEncap, encap()),
    ] {
        let rule = common::ipv4_prefix(vec![Action::Queue(0), action]);
        assert_eq!(rule.actions[1].kind(), kind);
        let v = port.flow_validate(&rule);
        show(&format!("validate queue+{name}"), &v);
        let c = port.flow_create(&rule).map(drop);
        show(&format!("create queue+{name}"), &c);
        for err in [v.expect_err("refused"), c.expect_err("refused")] {
            assert_eq!(err.errno(), Some(Errno::NOTSUP));
            assert_eq!(
                err.cause(),
                Some(FlowErrorCause::Action {
                    index: Some(1),
                    conf: false
                })
            );
        }
    }

    // The capability probe.
    let probe = dpdk::probe(&port);
    println!("{}", probe.table());
    println!("{:?}", probe.caps);
    // What this net_tap validates is exactly the TapLike profile.
    assert_eq!(
        probe.caps,
        Caps {
            source: CapsSource::Probed,
            ..Caps::profile(Profile::TapLike)
        }
    );
    let answer = |what: &str| {
        &probe
            .answers
            .iter()
            .find(|a| a.what == what)
            .unwrap_or_else(|| panic!("no probe answer {what:?}"))
            .result
    };
    // net_tap accepts group 1 as an attribute, but without Jump it counts
    // for nothing; priorities stop at 63 (65535 is EINVAL on the priority).
    assert_eq!(answer("group 1: eth/ipv4 -> queue"), &Ok(()));
    assert_eq!(answer("priority 63: eth/ipv4 -> queue"), &Ok(()));
    let err = answer("priority 65535: eth/ipv4 -> queue")
        .as_ref()
        .unwrap_err();
    assert_eq!(err.errno(), Some(Errno::INVAL));
    assert_eq!(err.cause(), Some(FlowErrorCause::AttrPriority));
    let err = answer("match ipv4 / udp / vxlan vni -> queue")
        .as_ref()
        .unwrap_err();
    assert_eq!(err.errno(), Some(Errno::NOTSUP));
    assert_eq!(
        err.cause(),
        Some(FlowErrorCause::Item {
            index: Some(3),
            part: ItemPart::Item
        })
    );
    // Refused actions are named by their IR index (first in these rules).
    for what in [
        "eth/ipv4 -> set ipv4 dst, queue",
        "eth/ipv4 -> vxlan encap, queue",
        "eth/ipv4 -> set mac src, vxlan encap, queue",
        "eth/ipv4 -> jump group 1",
    ] {
        let err = answer(what).as_ref().unwrap_err();
        assert_eq!(err.errno(), Some(Errno::NOTSUP), "{what}");
        assert_eq!(
            err.cause(),
            Some(FlowErrorCause::Action {
                index: Some(0),
                conf: false
            }),
            "{what}"
        );
    }
    // Programming a plan: the route's rule validates (the compiler trusts the probe) but its
    // create fails, so the route lands in software with the driver's errno as the reason;
    // the target ends up holding exactly the recompiled plan (nothing).
    let model = common::one_route_model(port.id());
    let mut compiler = Compiler::new(probe.caps.clone());
    compiler.rebuild(&model);
    let wanted = compiler.plan().hw.rule_count();
    assert!(wanted > 0, "the probed caps admit the route rule");
    let mut target = DpdkTarget::new([&port]);
    let report = program(&mut compiler, &model, &mut target).expect("settles");
    println!("program report: {report:?}");
    assert!(!report.refused.is_empty());
    assert_eq!(target.rule_count(), compiler.plan().hw.rule_count());
    let key = *model.routes().keys().next().expect("one route");
    match compiler.plan().status(&ObjectKey::Route(key)) {
        OffloadStatus::Software {
            reason: SwReason::Unsupported(Refusal::Driver { errno, .. }),
        } => assert_eq!(errno, "EEXIST"),
        other => panic!("route status {other:?}"),
    }
    // net_tap has no rte_mtr: a metered rule is refused naming the meter action.
    assert!(port
        .meter_profile_add(
            7,
            &MeterProfile::SrTcm {
                cir: 1_000_000,
                cbs: 2000,
                ebs: 2000
            }
        )
        .is_err());
    drop(target);

    drop(port);
    assert!(!iface_exists(), "port close removed {IFACE}");
    drop(pool);
    drop(eal);
}
