//! The safe wrapper against DPDK's `net_null` PMD (needs root, no hugepages,
//! no NIC). One EAL per process: a single `#[test]` in this binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use dpdk::{
    flow_validate, Eal, EalError, Errno, FlowAction, FlowAttr, FlowError, FlowErrorCause, FlowItem,
    Mempool, Port, PortConfig,
};
use flow_offload::ir::Action;

const EAL_ARGS: &[&str] = &[
    "dpdk-null-port",
    "-l",
    "0",
    "--no-huge",
    "--no-pci",
    "--no-shconf",
    "-m",
    "256",
    "--vdev=net_null0",
    "--log-level=*:error",
];

#[test]
fn null_port_end_to_end() {
    let eal = Eal::init(EAL_ARGS).expect("EAL init");
    assert_eq!(
        Eal::init(EAL_ARGS).unwrap_err(),
        EalError::AlreadyInitialized
    );
    assert_eq!(eal.port_count(), 1);

    let pool = Mempool::pktmbuf(
        &eal,
        "null_port_pool",
        1023,
        32,
        Mempool::DEFAULT_DATA_ROOM,
        None,
    )
    .expect("mempool");
    assert_eq!(pool.available(), 1023);

    // Own-written mbuf through the static-inline wrappers.
    {
        let mut m = pool.alloc().expect("alloc");
        m.append(4)
            .expect("tailroom")
            .copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(m.data(), &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(m.pkt_len(), 4);
        assert_eq!(pool.available(), 1022);
    }
    assert_eq!(pool.available(), 1023, "dropped mbuf returned to the pool");

    let id = Port::id_by_name(&eal, "net_null0").expect("net_null0 present");
    assert!(Port::id_by_name(&eal, "no_such_port").is_err());
    let mut port = Port::configure(id, &pool, PortConfig::default()).expect("configure");
    assert!(matches!(
        Port::configure(id, &pool, PortConfig::default()),
        Err(dpdk::PortError::AlreadyClaimed(i)) if i == id
    ));
    port.start().expect("start");

    let mut pkts = Vec::new();
    let n = port.rx_burst(&mut pkts, 32);
    assert_eq!(n, 32);
    assert_eq!(pkts.len(), 32);
    assert!(pkts
        .iter()
        .all(|m| m.pkt_len() == 64 && m.data().len() == 64));
    assert_eq!(pool.available(), 1023 - 32);

    let sent = port.tx_burst(&mut pkts);
    assert_eq!(sent, 32);
    assert!(pkts.is_empty(), "null tx swallows the whole burst");
    assert_eq!(pool.available(), 1023);

    let stats = port.stats().expect("stats");
    println!("stats: {stats:?}");
    assert_eq!((stats.ipackets, stats.opackets), (32, 32));

    let err = flow_validate(
        &port,
        &FlowAttr::ingress(),
        &[FlowItem::Eth, FlowItem::Ipv4],
        &[FlowAction::Queue(0)],
    )
    .expect_err("net_null has no rte_flow");
    println!("flow_validate: {err}");
    assert_eq!(err.errno, Errno::NOSYS);
    assert_eq!(err.cause, FlowErrorCause::Unspecified);

    // The same through the IR: validate and create both fail with ENOSYS.
    let rule = common::ipv4_prefix(vec![Action::Queue(0)]);
    let err = port
        .flow_validate(&rule)
        .expect_err("net_null has no rte_flow");
    println!("Port::flow_validate(IR): {err}");
    assert_eq!(err.errno(), Some(Errno::NOSYS));
    assert_eq!(err.cause(), Some(FlowErrorCause::Unspecified));
    let err = port
        .flow_create(&rule)
        .expect_err("net_null has no rte_flow");
    println!("Port::flow_create(IR): {err}");
    assert!(matches!(&err, FlowError::Refused(r) if r.errno == Errno::NOSYS));
    // Repeated attempts leak nothing from the pool.
    for _ in 0..100 {
        assert!(port.flow_create(&rule).is_err());
    }
    assert_eq!(pool.available(), 1023);

    // The capability probe: nothing offloadable, every answer ENOSYS.
    let probe = dpdk::probe(&port);
    println!("{}", probe.table());
    assert!(!probe.answers.is_empty());
    for a in &probe.answers {
        let err = a.result.as_ref().expect_err(a.what);
        assert_eq!(err.errno(), Some(Errno::NOSYS), "{}", a.what);
    }
    assert_eq!(
        probe.caps,
        flow_offload::caps::Caps {
            source: flow_offload::caps::CapsSource::Probed,
            ..flow_offload::caps::Caps::profile(flow_offload::caps::Profile::None)
        }
    );

    // Programming a plan compiled for a full NIC onto net_null: every create answers ENOSYS,
    // so every rule falls back and the route reports the driver's answer.
    let model = common::one_route_model(port.id());
    let mut compiler = flow_offload::compile::Compiler::new(flow_offload::caps::Caps::profile(
        flow_offload::caps::Profile::Full,
    ));
    compiler.rebuild(&model);
    let mut target = dpdk::DpdkTarget::new([&port]);
    let report =
        flow_offload::program::program(&mut compiler, &model, &mut target).expect("settles");
    assert!(!report.refused.is_empty());
    assert!(report
        .refused
        .iter()
        .all(|(_, r)| *r == flow_offload::caps::Refusal::NotImplemented));
    assert_eq!(target.rule_count(), 0);
    assert_eq!(compiler.plan().hw.rule_count(), 0);
    let key = *model.routes().keys().next().expect("one route");
    assert_eq!(
        compiler
            .plan()
            .status(&flow_offload::model::ObjectKey::Route(key)),
        flow_offload::status::OffloadStatus::Software {
            reason: flow_offload::compile::SwReason::Unsupported(
                flow_offload::caps::Refusal::NotImplemented
            )
        }
    );
    // No rte_mtr either.
    let err = port
        .meter_profile_add(
            1,
            &flow_offload::model::MeterProfile::SrTcm {
                cir: 1_000_000,
                cbs: 2000,
                ebs: 2000,
            },
        )
        .expect_err("net_null has no rte_mtr");
    println!("meter_profile_add: {err}");
    assert_eq!(err.errno, Errno::NOSYS);
    drop(target);

    port.stop().expect("stop");
    // A stopped port delivers nothing.
    assert_eq!(port.rx_burst(&mut pkts, 32), 0);
    // Lifetimes force this order: mbufs, port, pool, EAL.
    drop(pkts);
    drop(port);
    drop(pool);
    drop(eal); // rte_eal_cleanup
}
