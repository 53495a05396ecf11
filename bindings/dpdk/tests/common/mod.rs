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
