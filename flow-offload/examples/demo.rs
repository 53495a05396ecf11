//! Compiles a small gateway configuration under every capability profile, installs the
//! hardware part into the reference NIC, and runs a few packets through "NIC, then software",
//! printing where each object landed and why, and who forwarded each packet.
//!
//! `cargo run -p flow-offload --example demo`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use flow_offload::caps::{Caps, Profile};
use flow_offload::compile::compile;
use flow_offload::model::*;
use flow_offload::packet::checksum;
use flow_offload::refnic::{NicVerdict, RefNic};
use flow_offload::soft::{Pipeline, PipelineLimits};
use flow_offload::status::OffloadStatus;

fn mac(last: u8) -> MacAddr {
    MacAddr([0x02, 0, 0, 0, 0, last])
}

fn model() -> Model {
    let n = |s: &str| Name::new(s).unwrap();
    let p = |s: &str| s.parse::<Prefix>().unwrap();
    let blue = Vpc {
        name: n("blue"),
        vni: Vni::new(1000).unwrap(),
        table: TableId(100),
        ports: BTreeSet::from([PortId(1)]),
    };
    let gw = Nexthop::Underlay {
        gateway: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 254)),
        port: PortId(0),
        mac: mac(0xfe),
    };
    let route = |table, prefix, nh| {
        Change::UpsertRoute(Route {
            key: RouteKey { table, prefix },
            nexthops: vec![nh],
        })
    };
    let mut m = Model::new();
    m.apply(&[
        Change::SetNode(Node {
            vtep: Ipv4Addr::new(192, 0, 2, 1),
            router_mac: mac(1),
            uplinks: BTreeSet::from([PortId(0)]),
        }),
        Change::UpsertVpc(blue),
        route(UNDERLAY_TABLE, p("0.0.0.0/0"), gw),
        route(UNDERLAY_TABLE, p("198.51.100.0/24"), gw),
        route(
            TableId(100),
            p("10.0.0.0/24"),
            Nexthop::Underlay {
                gateway: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
                port: PortId(1),
                mac: mac(0x10),
            },
        ),
        route(
            TableId(100),
            p("10.1.0.0/16"),
            Nexthop::Vxlan {
                vni: Vni::new(1000).unwrap(),
                remote_vtep: Ipv4Addr::new(192, 0, 2, 2),
                router_mac: mac(2),
            },
        ),
        route(
            TableId(100),
            p("0.0.0.0/0"),
            Nexthop::Vrf {
                table: UNDERLAY_TABLE,
            },
        ),
        Change::UpsertNat(NatRule {
            name: n("blue-out"),
            vpc: n("blue"),
            kind: NatKind::Napt44 {
                pool: Ipv4Range {
                    first: Ipv4Addr::new(203, 0, 113, 10),
                    last: Ipv4Addr::new(203, 0, 113, 11),
                },
                ports: (1024, 65535),
            },
        }),
        Change::UpsertMeter(Meter {
            name: n("blue-10g"),
            profile: MeterProfile::TrTcm {
                cir: 1_250_000_000,
                cbs: 1 << 20,
                pir: 1_250_000_000,
                pbs: 1 << 20,
            },
            target: MeterTarget::Vpc(n("blue")),
        }),
    ])
    .expect("the demo model is valid");
    m
}

/// An Ethernet/IPv4/UDP frame with correct checksums.
fn udp4(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let payload = b"hello";
    let udp_len = 8 + payload.len();
    let mut f = vec![0u8; 14 + 20 + udp_len];
    f[0..6].copy_from_slice(&mac(1).0);
    f[6..12].copy_from_slice(&mac(0x10).0);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = checksum::finish(checksum::sum(ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let u = &mut f[34..];
    u[0..2].copy_from_slice(&40000u16.to_be_bytes());
    u[2..4].copy_from_slice(&53u16.to_be_bytes());
    u[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    u[8..].copy_from_slice(payload);
    let ph = checksum::pseudo_header_v4(src, dst, 17, udp_len as u16);
    let c = checksum::udp_nonzero(checksum::finish(ph + checksum::sum(&f[34..])));
    f[40..42].copy_from_slice(&c.to_be_bytes());
    f
}

fn main() {
    let model = model();
    let packets: Vec<(&str, PortId, Vec<u8>)> = vec![
        (
            "VPC host -> 10.1.2.3 (EVPN peer)",
            PortId(1),
            udp4(Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 1, 2, 3)),
        ),
        (
            "VPC host -> 8.8.8.8 (NAPT44 breakout)",
            PortId(1),
            udp4(Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(8, 8, 8, 8)),
        ),
        (
            "uplink -> 198.51.100.7 (underlay)",
            PortId(0),
            udp4(Ipv4Addr::new(192, 0, 2, 99), Ipv4Addr::new(198, 51, 100, 7)),
        ),
    ];
    for profile in Profile::ALL {
        let caps = Caps::profile(profile);
        let plan = compile(&model, &caps);
        let mut nic = RefNic::new(caps);
        for (r, p) in &plan.hw.meters {
            nic.create_meter(*r, *p, 0).expect("meter fits");
        }
        for (_, rule) in plan.hw.iter_rules() {
            nic.create(&rule)
                .expect("the compiler emits only what the caps accept");
        }
        println!(
            "\n=== profile {profile:?}: {} hardware rules, {} meters",
            plan.hw.rule_count(),
            plan.hw.meters.len()
        );
        let mut objects: Vec<ObjectKey> = model
            .vpcs()
            .keys()
            .map(|n| ObjectKey::Vpc(n.clone()))
            .collect();
        objects.extend(model.routes().keys().map(|k| ObjectKey::Route(*k)));
        objects.extend(model.nat_rules().keys().map(|n| ObjectKey::Nat(n.clone())));
        objects.extend(model.meters().keys().map(|n| ObjectKey::Meter(n.clone())));
        for o in objects {
            let s = match plan.status(&o) {
                OffloadStatus::Offloaded => "offloaded".to_string(),
                OffloadStatus::Software { reason } => format!("software: {reason}"),
                OffloadStatus::Failed { reason } => format!("failed: {reason}"),
            };
            println!("  {:<45} {s}", o.to_string());
        }
        let mut sw = Pipeline::new(&model, PipelineLimits::default(), 7).expect("tables fit");
        for (what, port, frame) in &packets {
            let mut f = frame.clone();
            let verdict = match nic.process(*port, &mut f, 1_000) {
                NicVerdict::Tx { port } => format!("hardware: tx port {}", port.0),
                NicVerdict::ToSoftware { mark, .. } => {
                    let v = sw.process(&mut f, *port, mark, 1_000);
                    format!("software: {v:?}")
                }
                NicVerdict::Drop(d) => format!("hardware: drop {d:?}"),
            };
            println!("  packet {what:<40} {verdict}");
        }
    }
}
