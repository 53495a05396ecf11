//! The agent over the reference NIC backend (`flow_offload::program::RefNicTarget`): what lands
//! in hardware under each profile, overflow into software when tables are full, batch
//! atomicity and epoch idempotency, and full resyncs that leave unchanged rules alone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use dpu_agent::agent::Agent;
use dpu_agent::config::Role;
use flow_offload::caps::{Caps, Profile, Refusal};
use flow_offload::compile::{RuleId, SwReason};
use flow_offload::ir::{MeterRef, Rule};
use flow_offload::model::{
    Change, Ipv4Range, MacAddr, Meter, MeterProfile, MeterTarget, Name, NatKind, NatRule, Nexthop,
    Node, ObjectKey, PortId, Route, RouteKey, TableId, Vni, Vpc, UNDERLAY_TABLE,
};
use flow_offload::program::{CountQuery, FlowTarget, RefNicTarget};
use flow_offload::refnic::RefNic;
use flow_offload::soft::pipeline::PipelineLimits;
use flow_offload::status::{FailReason, OffloadStatus};
use flow_offload::wire::{Apply, Message};

const UP: PortId = PortId(0);
const VPC_PORT: PortId = PortId(1);
const BLUE: TableId = TableId(10);

/// The reference NIC, counting what is asked of it.
struct Counting {
    inner: RefNicTarget,
    creates: usize,
    destroys: usize,
}

impl FlowTarget for Counting {
    fn create_rule(&mut self, id: &RuleId, rule: &Rule) -> Result<(), Refusal> {
        self.creates += 1;
        self.inner.create_rule(id, rule)
    }
    fn replace_rule(&mut self, id: &RuleId, rule: &Rule) -> Result<(), Refusal> {
        self.creates += 1;
        self.inner.replace_rule(id, rule)
    }
    fn destroy_rule(&mut self, id: &RuleId) {
        self.destroys += 1;
        self.inner.destroy_rule(id);
    }
    fn create_meter(&mut self, m: MeterRef, p: &MeterProfile) -> Result<(), Refusal> {
        self.inner.create_meter(m, p)
    }
    fn update_meter(&mut self, m: MeterRef, p: &MeterProfile) -> Result<(), Refusal> {
        self.inner.update_meter(m, p)
    }
    fn destroy_meter(&mut self, m: MeterRef) {
        self.inner.destroy_meter(m);
    }
}

impl CountQuery for Counting {
    fn query_count(&mut self, id: &RuleId) -> Option<(u64, u64)> {
        self.inner.query_count(id)
    }
}

fn setup(caps: Caps) -> (Agent, Counting) {
    let roles: BTreeMap<PortId, Role> = [(UP, Role::Uplink), (VPC_PORT, Role::Vpc)]
        .into_iter()
        .collect();
    let agent = Agent::new(caps.clone(), roles, PipelineLimits::default(), 1).unwrap();
    let nic = Counting {
        inner: RefNicTarget::new(RefNic::new(caps)),
        creates: 0,
        destroys: 0,
    };
    (agent, nic)
}

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn underlay(i: u32) -> Change {
    let a = Ipv4Addr::from(0x0a00_0000 | (i << 8));
    Change::UpsertRoute(Route {
        key: RouteKey {
            table: UNDERLAY_TABLE,
            prefix: flow_offload::model::Prefix::new(IpAddr::V4(a), 24).unwrap(),
        },
        nexthops: vec![Nexthop::Underlay {
            gateway: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)),
            port: UP,
            mac: MacAddr([2, 0, 0, 0, 0, 2]),
        }],
    })
}

fn base() -> Vec<Change> {
    vec![
        Change::SetNode(Node {
            vtep: Ipv4Addr::new(192, 0, 2, 1),
            router_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            uplinks: [UP].into_iter().collect(),
        }),
        Change::UpsertVpc(Vpc {
            name: name("blue"),
            vni: Vni::new(100).unwrap(),
            table: BLUE,
            ports: [VPC_PORT].into_iter().collect(),
        }),
        Change::UpsertMeter(Meter {
            name: name("blue-limit"),
            profile: MeterProfile::SrTcm {
                cir: 1_000_000,
                cbs: 10_000,
                ebs: 10_000,
            },
            target: MeterTarget::Vpc(name("blue")),
        }),
        Change::UpsertNat(NatRule {
            name: name("blue-out"),
            vpc: name("blue"),
            kind: NatKind::Napt44 {
                pool: Ipv4Range {
                    first: Ipv4Addr::new(203, 0, 113, 1),
                    last: Ipv4Addr::new(203, 0, 113, 1),
                },
                ports: (1024, 65535),
            },
        }),
        underlay(1),
        underlay(2),
    ]
}

fn ack(m: Message) -> Vec<(ObjectKey, OffloadStatus)> {
    match m {
        Message::Ack(a) => a.status,
        other => panic!("not an ack: {other:?}"),
    }
}

fn apply(
    agent: &mut Agent,
    nic: &mut Counting,
    epoch: u64,
    full: bool,
    changes: Vec<Change>,
) -> Message {
    agent
        .apply(
            nic,
            &Apply {
                epoch,
                full,
                changes,
            },
        )
        .0
}

#[test]
fn full_profile_offloads_routes_and_meters_nat_stays_in_software() {
    let (mut agent, mut nic) = setup(Caps::profile(Profile::Full));
    let status: BTreeMap<_, _> = ack(apply(&mut agent, &mut nic, 1, true, base()))
        .into_iter()
        .collect();
    assert_eq!(status.len(), 6, "{status:?}");
    let route1 = match underlay(1) {
        Change::UpsertRoute(r) => ObjectKey::Route(r.key),
        _ => unreachable!(),
    };
    assert_eq!(status[&route1], OffloadStatus::Offloaded);
    assert_eq!(
        status[&ObjectKey::Vpc(name("blue"))],
        OffloadStatus::Offloaded
    );
    assert_eq!(
        status[&ObjectKey::Meter(name("blue-limit"))],
        OffloadStatus::Offloaded
    );
    assert_eq!(
        status[&ObjectKey::Nat(name("blue-out"))],
        OffloadStatus::Software {
            reason: SwReason::NeedsState
        }
    );
    // The NIC holds exactly the plan, with the meter.
    assert_eq!(nic.inner.installed().rules.len(), agent.hw_rule_count());
    assert_eq!(nic.inner.nic.meter_count(), 1);
}

#[test]
fn table_limits_overflow_into_software_as_table_full() {
    let mut caps = Caps::profile(Profile::Partial);
    let (mut agent0, mut nic0) = setup(caps.clone());
    ack(apply(&mut agent0, &mut nic0, 1, true, base()));
    // Room for the structure and two more route rules.
    caps.max_rules = u32::try_from(agent0.hw_rule_count()).unwrap();
    let (mut agent, mut nic) = setup(caps);
    ack(apply(&mut agent, &mut nic, 1, true, base()));
    let more: Vec<Change> = (3..40).map(underlay).collect();
    let status = ack(apply(&mut agent, &mut nic, 2, false, more));
    let full = status
        .iter()
        .filter(|(_, s)| {
            *s == OffloadStatus::Software {
                reason: SwReason::TableFull,
            }
        })
        .count();
    assert_eq!(full, 37, "{status:?}");
    assert!(nic.inner.installed().rules.len() <= agent.hw_rule_count());
    assert_eq!(nic.inner.installed().rules.len(), agent.hw_rule_count());
}

#[test]
fn a_bad_object_fails_alone_and_an_equal_resync_changes_nothing() {
    let (mut agent, mut nic) = setup(Caps::profile(Profile::Full));
    ack(apply(&mut agent, &mut nic, 1, true, base()));
    // The second change names a VPC that does not exist: that NAT rule fails, the route
    // beside it applies.
    let bad = vec![
        underlay(7),
        Change::UpsertNat(NatRule {
            name: name("ghost"),
            vpc: name("nope"),
            kind: NatKind::Static44 {
                inside: Ipv4Addr::new(10, 0, 0, 1),
                outside: Ipv4Addr::new(203, 0, 113, 9),
            },
        }),
    ];
    let status: BTreeMap<_, _> = ack(apply(&mut agent, &mut nic, 2, false, bad))
        .into_iter()
        .collect();
    match &status[&ObjectKey::Nat(name("ghost"))] {
        OffloadStatus::Failed {
            reason: FailReason::Invalid(e),
        } => assert!(e.to_string().contains("nope"), "{e}"),
        other => panic!("{other:?}"),
    }
    let route7 = match underlay(7) {
        Change::UpsertRoute(r) => ObjectKey::Route(r.key),
        _ => unreachable!(),
    };
    assert_eq!(status[&route7], OffloadStatus::Offloaded);
    assert!(agent.model().nat_rules().get(&name("ghost")).is_none());
    assert_eq!(agent.last_epoch(), Some(2));
    let creates = nic.creates;
    // The same full state again (even under an old epoch): applied, and since it equals the
    // model in force, nothing is rebuilt or reprogrammed.
    let mut all = base();
    all.push(underlay(7));
    let again = ack(apply(&mut agent, &mut nic, 1, true, all));
    assert_eq!(again.len(), 7);
    assert_eq!(nic.creates, creates);
    assert_eq!(agent.epoch_regressions(), 1);
}

/// Issue 17's case: a VPC naming a port this DPU lacks must not block the rest. It fails, its
/// routes fail with it, later valid changes apply, and once the VPC is fixed its held routes
/// go in without the host resending them.
#[test]
fn a_vpc_on_a_missing_port_fails_with_its_routes_and_blocks_nothing() {
    let (mut agent, mut nic) = setup(Caps::profile(Profile::Full));
    ack(apply(&mut agent, &mut nic, 1, true, base()));
    let pv1 = |port: Option<PortId>| {
        Change::UpsertVpc(Vpc {
            name: name("pv1"),
            vni: Vni::new(3001).unwrap(),
            table: TableId(31),
            ports: port.into_iter().collect(),
        })
    };
    let pv1_route = Change::UpsertRoute(Route {
        key: RouteKey {
            table: TableId(31),
            prefix: "10.31.0.0/16".parse().unwrap(),
        },
        nexthops: vec![Nexthop::Blackhole],
    });
    let status: BTreeMap<_, _> = ack(apply(
        &mut agent,
        &mut nic,
        2,
        false,
        vec![pv1(Some(PortId(99)))],
    ))
    .into_iter()
    .collect();
    let failed = |s: &OffloadStatus, want: &str| match s {
        OffloadStatus::Failed {
            reason: FailReason::Invalid(e),
        } => assert!(e.to_string().contains(want), "{e}"),
        other => panic!("{other:?}"),
    };
    failed(&status[&ObjectKey::Vpc(name("pv1"))], "port 99");
    // Its route, and an unrelated valid route in the same batch.
    let status: BTreeMap<_, _> = ack(apply(
        &mut agent,
        &mut nic,
        3,
        false,
        vec![pv1_route.clone(), underlay(8)],
    ))
    .into_iter()
    .collect();
    failed(&status[&pv1_route.object()], "31");
    assert_eq!(status[&underlay(8).object()], OffloadStatus::Offloaded);
    // A full resend (a reconnect) keeps both refused and everything else in force.
    let mut all = base();
    all.extend([underlay(8), pv1(Some(PortId(99))), pv1_route.clone()]);
    let status: BTreeMap<_, _> = ack(apply(&mut agent, &mut nic, 4, true, all))
        .into_iter()
        .collect();
    failed(&status[&ObjectKey::Vpc(name("pv1"))], "port 99");
    failed(&status[&pv1_route.object()], "31");
    assert_eq!(status[&underlay(8).object()], OffloadStatus::Offloaded);
    // The operator fixes the VPC (no port for now): the held route goes in with it.
    let status: BTreeMap<_, _> = ack(apply(&mut agent, &mut nic, 5, false, vec![pv1(None)]))
        .into_iter()
        .collect();
    assert!(
        !matches!(
            status[&ObjectKey::Vpc(name("pv1"))],
            OffloadStatus::Failed { .. }
        ),
        "{status:?}"
    );
    assert!(
        !matches!(status[&pv1_route.object()], OffloadStatus::Failed { .. }),
        "{status:?}"
    );
    assert!(agent.model().routes().contains_key(&RouteKey {
        table: TableId(31),
        prefix: "10.31.0.0/16".parse().unwrap(),
    }));
}

/// The bug this guards against: a restarted host numbers its batches from 1 again, and an agent
/// that took "epoch ≤ last" for a replay acknowledged them without applying anything.
#[test]
fn batches_after_a_host_restart_are_applied_whatever_their_epoch() {
    let (mut agent, mut nic) = setup(Caps::profile(Profile::Full));
    ack(apply(&mut agent, &mut nic, 1, true, base()));
    for e in 2..=14 {
        ack(apply(
            &mut agent,
            &mut nic,
            e,
            false,
            vec![underlay(e as u32 + 10)],
        ));
    }
    assert_eq!(agent.last_epoch(), Some(14));
    // The host restarts: a full resync with one more route, then an incremental NAT rule,
    // numbered from 1 again.
    let mut all = base();
    all.extend((2..=14).map(|e| underlay(e + 10)));
    all.push(underlay(99));
    ack(apply(&mut agent, &mut nic, 1, true, all));
    let nat = NatRule {
        name: name("late"),
        vpc: name("blue"),
        kind: NatKind::Static44 {
            inside: Ipv4Addr::new(10, 0, 0, 5),
            outside: Ipv4Addr::new(203, 0, 113, 50),
        },
    };
    let status = ack(apply(
        &mut agent,
        &mut nic,
        2,
        false,
        vec![Change::UpsertNat(nat.clone())],
    ));
    let route99 = match underlay(99) {
        Change::UpsertRoute(r) => r.key,
        _ => unreachable!(),
    };
    assert!(agent.model().routes().contains_key(&route99));
    assert_eq!(agent.model().nat_rules().get(&name("late")), Some(&nat));
    assert!(
        status
            .iter()
            .any(|(k, _)| *k == ObjectKey::Nat(name("late"))),
        "{status:?}"
    );
    // Only the first batch after the restart went backwards (1 after 14).
    assert_eq!(agent.epoch_regressions(), 1);
    assert_eq!(agent.last_epoch(), Some(2));
}

#[test]
fn full_resync_touches_only_what_changed() {
    let (mut agent, mut nic) = setup(Caps::profile(Profile::Full));
    ack(apply(&mut agent, &mut nic, 1, true, base()));
    let (c0, d0) = (nic.creates, nic.destroys);
    // The host resends everything (e.g. after its own restart) with one route added.
    let mut all = base();
    all.push(underlay(3));
    ack(apply(&mut agent, &mut nic, 2, true, all));
    assert_eq!(nic.creates - c0, 1, "only the new route's rule is created");
    assert_eq!(nic.destroys - d0, 0, "nothing is flushed");
    // And one route fewer.
    ack(apply(&mut agent, &mut nic, 3, true, base()));
    assert_eq!(nic.destroys - d0, 1);
    assert_eq!(nic.inner.installed().rules.len(), agent.hw_rule_count());
}

#[test]
fn a_nic_refusing_creates_reports_its_reason() {
    /// Refuses every route rule at create time, as a NIC whose validation over-promised.
    struct NoRoutes(Counting);
    impl FlowTarget for NoRoutes {
        fn create_rule(&mut self, id: &RuleId, rule: &Rule) -> Result<(), Refusal> {
            if matches!(id, RuleId::Route { .. }) {
                return Err(Refusal::Driver {
                    errno: "ENOMEM".into(),
                    cause: "Unspecified".into(),
                    message: Some("flow table fragmented".into()),
                });
            }
            self.0.create_rule(id, rule)
        }
        fn replace_rule(&mut self, id: &RuleId, rule: &Rule) -> Result<(), Refusal> {
            self.0.replace_rule(id, rule)
        }
        fn destroy_rule(&mut self, id: &RuleId) {
            self.0.destroy_rule(id);
        }
        fn create_meter(&mut self, m: MeterRef, p: &MeterProfile) -> Result<(), Refusal> {
            self.0.create_meter(m, p)
        }
        fn update_meter(&mut self, m: MeterRef, p: &MeterProfile) -> Result<(), Refusal> {
            self.0.update_meter(m, p)
        }
        fn destroy_meter(&mut self, m: MeterRef) {
            self.0.destroy_meter(m);
        }
    }
    impl CountQuery for NoRoutes {
        fn query_count(&mut self, id: &RuleId) -> Option<(u64, u64)> {
            self.0.query_count(id)
        }
    }
    let (mut agent, nic) = setup(Caps::profile(Profile::Full));
    let mut nic = NoRoutes(nic);
    let status = agent
        .apply(
            &mut nic,
            &Apply {
                epoch: 1,
                full: true,
                changes: base(),
            },
        )
        .0;
    let status = ack(status);
    let routes: Vec<_> = status
        .iter()
        .filter(|(k, _)| matches!(k, ObjectKey::Route(_)))
        .collect();
    assert_eq!(routes.len(), 2);
    for (_, s) in routes {
        match s {
            OffloadStatus::Software {
                reason: SwReason::Unsupported(Refusal::Driver { errno, .. }),
            } => assert_eq!(errno, "ENOMEM"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(nic.0.inner.installed().rules.len(), agent.hw_rule_count());
}
