//! The real `dpu-agent` binary with `[nic] backend = "reference"`: two `net_null` ports, rules
//! into the reference NIC model. The host link sees the profile as every port's capabilities
//! and routes come back `Offloaded`. Needs root (EAL).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::{can_run, AgentProc, HostLink};
use flow_offload::caps::CapsSource;
use flow_offload::caps::Profile;
use flow_offload::model::{
    Change, MacAddr, Name, Nexthop, Node, ObjectKey, PortId, Route, RouteKey, TableId, Vni, Vpc,
    UNDERLAY_TABLE,
};
use flow_offload::status::OffloadStatus;
use flow_offload::wire::Message;

#[test]
fn reference_backend_offloads_routes_through_the_binary() {
    if !can_run() {
        return;
    }
    let mut agent = AgentProc::start_reference("refbin");
    let mut host = HostLink::connect(agent.link);
    // Every port reports the profile, not a probe.
    assert_eq!(host.hello.ports.len(), 2);
    for (_, caps) in &host.hello.ports {
        assert_eq!(caps.source, CapsSource::Profile(Profile::Full));
    }
    let name = |s: &str| Name::new(s).unwrap();
    let route = RouteKey {
        table: UNDERLAY_TABLE,
        prefix: "198.51.100.0/24".parse().unwrap(),
    };
    let changes = vec![
        Change::SetNode(Node {
            vtep: Ipv4Addr::new(192, 0, 2, 1),
            router_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            uplinks: [PortId(0)].into_iter().collect(),
        }),
        Change::UpsertVpc(Vpc {
            name: name("blue"),
            vni: Vni::new(100).unwrap(),
            table: TableId(10),
            ports: [PortId(1)].into_iter().collect(),
        }),
        Change::UpsertRoute(Route {
            key: route,
            nexthops: vec![Nexthop::Underlay {
                gateway: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)),
                port: PortId(0),
                mac: MacAddr([2, 0, 0, 0, 0, 2]),
            }],
        }),
    ];
    let status = match host.apply(1, true, changes) {
        Message::Ack(a) => a.status,
        other => panic!("{other:?}\n{}", agent.log()),
    };
    let of = |k: &ObjectKey| status.iter().find(|(x, _)| x == k).map(|(_, s)| s.clone());
    assert_eq!(
        of(&ObjectKey::Route(route)),
        Some(OffloadStatus::Offloaded),
        "{status:?}"
    );
    assert!(agent.log().contains("reference NIC"), "{}", agent.log());
    assert!(agent.stop().success(), "{}", agent.log());
}
