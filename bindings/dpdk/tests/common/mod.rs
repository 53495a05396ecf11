//! Helpers shared by the DPDK test processes.
#![allow(dead_code)]

use std::net::Ipv4Addr;

use flow_offload::ir::{Action, Attr, EthFields, Ipv4Fields, Item, Masked, Rule};
use flow_offload::model::PortId;

/// eth(type 0x0800) / ipv4(dst 10.1.2.0/24) -> `actions`.
pub fn ipv4_prefix(actions: Vec<Action>) -> Rule {
    Rule {
        port: PortId(0),
        attr: Attr {
            ingress: true,
            ..Attr::default()
        },
        pattern: vec![
            Item::Eth(Masked {
                spec: EthFields {
                    ethertype: 0x0800,
                    ..EthFields::default()
                },
                mask: EthFields {
                    ethertype: 0xffff,
                    ..EthFields::default()
                },
            }),
            Item::Ipv4(Masked {
                spec: Ipv4Fields {
                    dst: Ipv4Addr::new(10, 1, 2, 0),
                    ..Ipv4Fields::default()
                },
                mask: Ipv4Fields {
                    dst: Ipv4Addr::new(255, 255, 255, 0),
                    ..Ipv4Fields::default()
                },
            }),
        ],
        actions,
    }
}

/// A node whose one uplink is `port`, with an underlay route 10.1.0.0/16 out of it.
pub fn one_route_model(port: u16) -> flow_offload::model::Model {
    use flow_offload::model::{
        Change, MacAddr, Model, Nexthop, Node, Prefix, Route, RouteKey, UNDERLAY_TABLE,
    };
    let mut m = Model::new();
    let prefix: Prefix = "10.1.0.0/16".parse().expect("prefix");
    m.apply(&[
        Change::SetNode(Node {
            vtep: Ipv4Addr::new(192, 0, 2, 1),
            router_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            uplinks: [PortId(port)].into_iter().collect(),
        }),
        Change::UpsertRoute(Route {
            key: RouteKey {
                table: UNDERLAY_TABLE,
                prefix,
            },
            nexthops: vec![Nexthop::Underlay {
                gateway: Ipv4Addr::new(192, 0, 2, 254).into(),
                port: PortId(port),
                mac: MacAddr([2, 0, 0, 0, 0, 2]),
            }],
        }),
    ])
    .expect("valid model");
    m
}
