//! The model refuses bad input with the offending field named, and a refused batch changes
//! nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flow_offload::model::*;

fn n(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn p(s: &str) -> Prefix {
    s.parse().unwrap()
}

fn mac(x: u8) -> MacAddr {
    MacAddr([2, 0, 0, 0, 0, x])
}

fn node() -> Change {
    Change::SetNode(Node {
        vtep: Ipv4Addr::new(192, 0, 2, 1),
        router_mac: mac(1),
        uplinks: BTreeSet::from([PortId(0)]),
    })
}

fn vpc(name: &str, vni: u32, table: u32, port: u16) -> Change {
    Change::UpsertVpc(Vpc {
        name: n(name),
        vni: Vni::new(vni).unwrap(),
        table: TableId(table),
        ports: BTreeSet::from([PortId(port)]),
    })
}

fn base() -> Model {
    let mut m = Model::new();
    m.apply(&[node(), vpc("blue", 100, 10, 1)]).unwrap();
    m
}

/// Applies one change, expects refusal, returns (field, problem); checks nothing changed.
fn refused(m: &mut Model, c: Change) -> (String, Problem) {
    let before = m.clone();
    let err = m.apply(&[c]).expect_err("must be refused");
    assert_eq!(
        *m, before,
        "a refused change must leave the model unchanged"
    );
    match err {
        ModelError::InBatch { index: 0, source } => match *source {
            ModelError::Invalid { field, problem, .. } => (field, problem),
            other => panic!("expected a field error, got {other}"),
        },
        other => panic!("expected a batch error, got {other}"),
    }
}

fn upsert_route(table: u32, prefix: &str, nexthops: Vec<Nexthop>) -> Change {
    Change::UpsertRoute(Route {
        key: RouteKey {
            table: TableId(table),
            prefix: p(prefix),
        },
        nexthops,
    })
}

fn gw(port: u16) -> Nexthop {
    Nexthop::Underlay {
        gateway: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 254)),
        port: PortId(port),
        mac: mac(0xfe),
    }
}

#[test]
fn prefixes_with_host_bits_are_refused_and_the_fix_is_suggested() {
    let e = Prefix::v4(Ipv4Addr::new(10, 1, 2, 3), 16).unwrap_err();
    assert_eq!(
        e,
        Problem::HostBitsSet {
            network: p("10.1.0.0/16")
        }
    );
    assert!(e.to_string().contains("10.1.0.0/16"));
    assert!(matches!(
        "2001:db8::1/32".parse::<Prefix>(),
        Err(Problem::HostBitsSet { .. })
    ));
    assert!(matches!(
        "10.0.0.0/33".parse::<Prefix>(),
        Err(Problem::OutOfRange { .. })
    ));
    assert_eq!("10.0.0.0".parse::<Prefix>(), Err(Problem::BadSyntax));
    // Deserialising cannot bypass the check either.
    let json = postcard::to_allocvec(&(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 8u8)).unwrap();
    assert!(postcard::from_bytes::<Prefix>(&json).is_err());
}

#[test]
fn duplicate_vni_and_table_are_refused() {
    let mut m = base();
    let (field, problem) = refused(&mut m, vpc("red", 100, 11, 2));
    assert_eq!(field, "vni");
    assert_eq!(problem, Problem::DuplicateVni { other: n("blue") });
    let (field, _) = refused(&mut m, vpc("red", 101, 10, 2));
    assert_eq!(field, "table");
    let (field, _) = refused(&mut m, vpc("red", 101, 254, 2));
    assert_eq!(field, "table", "the underlay table is reserved");
    let (field, problem) = refused(&mut m, vpc("red", 101, 11, 1));
    assert_eq!(field, "ports");
    assert!(matches!(problem, Problem::PortInUse { port: 1, .. }));
    let (field, _) = refused(&mut m, vpc("red", 101, 11, 0));
    assert_eq!(field, "ports", "an uplink cannot join a VPC");
    assert!(Vni::new(0).is_err() && Vni::new(1 << 24).is_err());
    assert_eq!(Name::new("Blue"), Err(Problem::BadName));
}

#[test]
fn routes_into_unknown_tables_and_vrfs_are_refused() {
    let mut m = base();
    let (field, problem) = refused(&mut m, upsert_route(99, "10.0.0.0/8", vec![gw(0)]));
    assert_eq!(field, "table");
    assert_eq!(
        problem,
        Problem::Unknown(ObjectKeyOrTable::Table(TableId(99)))
    );
    let vx = Nexthop::Vxlan {
        vni: Vni::new(4242).unwrap(),
        remote_vtep: Ipv4Addr::new(192, 0, 2, 2),
        router_mac: mac(2),
    };
    let (field, problem) = refused(&mut m, upsert_route(10, "10.1.0.0/16", vec![vx]));
    assert_eq!(field, "nexthops[0].vni");
    assert_eq!(problem, Problem::Unknown(ObjectKeyOrTable::Vni(4242)));
    let leak = Nexthop::Vrf { table: TableId(10) };
    let (field, _) = refused(&mut m, upsert_route(254, "10.0.0.0/8", vec![leak]));
    assert_eq!(field, "nexthops[0].table", "only VPC → underlay breakout");
    let (field, _) = refused(&mut m, upsert_route(254, "10.0.0.0/8", vec![gw(1)]));
    assert_eq!(
        field, "nexthops[0].port",
        "underlay next hops leave by uplinks"
    );
    let (field, problem) = refused(&mut m, upsert_route(254, "10.0.0.0/8", vec![]));
    assert_eq!(field, "nexthops");
    assert!(matches!(problem, Problem::Count { .. }));
    let (field, problem) = refused(
        &mut m,
        upsert_route(254, "10.0.0.0/8", vec![gw(0), Nexthop::Blackhole]),
    );
    assert_eq!(
        (field.as_str(), problem),
        ("nexthops", Problem::MixedNexthops)
    );
    let (field, _) = refused(&mut m, upsert_route(254, "10.0.0.0/8", vec![gw(0), gw(0)]));
    assert_eq!(field, "nexthops[1]");
}

fn napt(name: &str, first: [u8; 4], last: [u8; 4]) -> Change {
    Change::UpsertNat(NatRule {
        name: n(name),
        vpc: n("blue"),
        kind: NatKind::Napt44 {
            pool: Ipv4Range {
                first: Ipv4Addr::from(first),
                last: Ipv4Addr::from(last),
            },
            ports: (1024, 65535),
        },
    })
}

#[test]
fn overlapping_nat_pools_are_refused() {
    let mut m = base();
    m.apply(&[napt("a", [203, 0, 113, 0], [203, 0, 113, 15])])
        .unwrap();
    m.apply(&[vpc("red", 101, 11, 2)]).unwrap();
    let nat64 = Change::UpsertNat(NatRule {
        name: n("b"),
        vpc: n("red"),
        kind: NatKind::Nat64 {
            prefix: p("64:ff9b::/96"),
            pool: Ipv4Range {
                first: Ipv4Addr::new(203, 0, 113, 15),
                last: Ipv4Addr::new(203, 0, 113, 20),
            },
            ports: (1024, 65535),
        },
    });
    let (field, problem) = refused(&mut m, nat64);
    assert_eq!(field, "pool");
    assert_eq!(
        problem,
        Problem::Overlaps {
            other: ObjectKey::Nat(n("a"))
        }
    );
    let static44 = Change::UpsertNat(NatRule {
        name: n("c"),
        vpc: n("red"),
        kind: NatKind::Static44 {
            inside: Ipv4Addr::new(10, 0, 0, 5),
            outside: Ipv4Addr::new(203, 0, 113, 7),
        },
    });
    let (field, _) = refused(&mut m, static44);
    assert_eq!(field, "outside");
    let (field, _) = refused(&mut m, napt("d", [203, 0, 114, 9], [203, 0, 114, 1]));
    assert_eq!(field, "pool", "first > last");
    let (field, _) = refused(&mut m, napt("d", [10, 0, 0, 0], [10, 1, 0, 0]));
    assert_eq!(field, "pool", "more than a /16");
    let bad64 = Change::UpsertNat(NatRule {
        name: n("e"),
        vpc: n("red"),
        kind: NatKind::Nat64 {
            prefix: p("64:ff9b::/80"),
            pool: Ipv4Range {
                first: Ipv4Addr::new(198, 51, 100, 1),
                last: Ipv4Addr::new(198, 51, 100, 1),
            },
            ports: (1024, 65535),
        },
    });
    let (field, problem) = refused(&mut m, bad64);
    assert_eq!(
        (field.as_str(), problem),
        ("prefix", Problem::Nat64PrefixLength)
    );
    let s66 = |name: &str, inside: u16| {
        Change::UpsertNat(NatRule {
            name: n(name),
            vpc: n("blue"),
            kind: NatKind::Static66 {
                inside: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, inside),
                outside: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
            },
        })
    };
    m.apply(&[s66("f", 1)]).unwrap();
    let (field, _) = refused(&mut m, s66("g", 2));
    assert_eq!(field, "outside");
}

#[test]
fn zero_and_absurd_meter_rates_are_refused() {
    let mut m = base();
    let meter = |profile| {
        Change::UpsertMeter(Meter {
            name: n("m"),
            profile,
            target: MeterTarget::Vpc(n("blue")),
        })
    };
    let ok = MeterProfile::TrTcm {
        cir: 1_000_000,
        cbs: 10_000,
        pir: 2_000_000,
        pbs: 20_000,
    };
    let cases = [
        (
            MeterProfile::SrTcm {
                cir: 0,
                cbs: 10_000,
                ebs: 0,
            },
            "profile.cir",
        ),
        (
            MeterProfile::SrTcm {
                cir: 1 << 50,
                cbs: 10_000,
                ebs: 0,
            },
            "profile.cir",
        ),
        (
            MeterProfile::SrTcm {
                cir: 1_000,
                cbs: 100,
                ebs: 0,
            },
            "profile.cbs",
        ),
        (
            MeterProfile::TrTcm {
                cir: 2_000_000,
                cbs: 10_000,
                pir: 1_000_000,
                pbs: 20_000,
            },
            "profile.pir",
        ),
        (
            MeterProfile::TrTcm {
                cir: 1_000_000,
                cbs: 10_000,
                pir: 2_000_000,
                pbs: 1 << 40,
            },
            "profile.pbs",
        ),
    ];
    for (profile, expected) in cases {
        let (field, _) = refused(&mut m, meter(profile));
        assert_eq!(field, expected, "{profile:?}");
    }
    let orphan = Change::UpsertMeter(Meter {
        name: n("m"),
        profile: ok,
        target: MeterTarget::Vpc(n("green")),
    });
    let (field, _) = refused(&mut m, orphan);
    assert_eq!(field, "target");
    m.apply(&[meter(ok)]).unwrap();
    let second = Change::UpsertMeter(Meter {
        name: n("m2"),
        profile: ok,
        target: MeterTarget::Vpc(n("blue")),
    });
    let (field, _) = refused(&mut m, second);
    assert_eq!(field, "target", "one meter per target");
}

#[test]
fn a_failing_batch_is_applied_not_at_all() {
    let mut m = base();
    let before = m.clone();
    let err = m
        .apply(&[
            upsert_route(254, "10.0.0.0/8", vec![gw(0)]),
            vpc("red", 101, 11, 2),
            upsert_route(99, "10.0.0.0/8", vec![gw(0)]),
        ])
        .unwrap_err();
    assert!(matches!(err, ModelError::InBatch { index: 2, .. }));
    assert_eq!(m, before);
    assert!(err
        .to_string()
        .starts_with("change 2: route 10.0.0.0/8 in table 99"));
}

#[test]
fn objects_in_use_cannot_be_deleted() {
    let mut m = base();
    m.apply(&[upsert_route(10, "10.0.0.0/24", vec![Nexthop::Blackhole])])
        .unwrap();
    let err = m.apply(&[Change::DeleteVpc(n("blue"))]).unwrap_err();
    let ModelError::InBatch { source, .. } = err else {
        panic!()
    };
    assert!(matches!(*source, ModelError::InUse { .. }));
    let err = m
        .apply(&[Change::DeleteRoute(RouteKey {
            table: TableId(10),
            prefix: p("10.9.0.0/24"),
        })])
        .unwrap_err();
    let ModelError::InBatch { source, .. } = err else {
        panic!()
    };
    assert!(matches!(*source, ModelError::NotFound { .. }));
    // Deleting in the right order works.
    m.apply(&[
        Change::DeleteRoute(RouteKey {
            table: TableId(10),
            prefix: p("10.0.0.0/24"),
        }),
        Change::DeleteVpc(n("blue")),
    ])
    .unwrap();
    assert!(m.vpcs().is_empty());
}

#[test]
fn ranges_split_into_exact_prefixes() {
    let r = Ipv4Range {
        first: Ipv4Addr::new(10, 0, 0, 1),
        last: Ipv4Addr::new(10, 0, 0, 6),
    };
    let ps: Vec<String> = r.to_prefixes().iter().map(|p| p.to_string()).collect();
    assert_eq!(
        ps,
        ["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/31", "10.0.0.6/32"]
    );
    let all = Ipv4Range {
        first: Ipv4Addr::new(0, 0, 0, 0),
        last: Ipv4Addr::new(255, 255, 255, 255),
    };
    assert_eq!(all.to_prefixes(), vec![p("0.0.0.0/0")]);
}

/// Input that was once accepted and should not have been (issue 17), each refused with a
/// problem that says what is wrong.
#[test]
fn cross_tenant_vnis_own_vtep_reserved_tables_and_families_are_refused() {
    let mut m = base();
    m.apply(&[vpc("red", 200, 20, 2)]).unwrap();
    // A route of blue encapsulating into red's VNI would leak blue's traffic into red.
    let into_red = Nexthop::Vxlan {
        vni: Vni::new(200).unwrap(),
        remote_vtep: Ipv4Addr::new(192, 0, 2, 2),
        router_mac: mac(2),
    };
    let (field, problem) = refused(&mut m, upsert_route(10, "10.9.0.0/16", vec![into_red]));
    assert_eq!(field, "nexthops[0].vni");
    assert_eq!(
        problem,
        Problem::ForeignVni {
            vni: 200,
            owner: n("red"),
            vpc: n("blue")
        }
    );
    // Its own VNI is fine, unless the remote VTEP is this node's.
    let own = |vtep: Ipv4Addr| Nexthop::Vxlan {
        vni: Vni::new(100).unwrap(),
        remote_vtep: vtep,
        router_mac: mac(2),
    };
    let (field, problem) = refused(
        &mut m,
        upsert_route(10, "10.9.0.0/16", vec![own(Ipv4Addr::new(192, 0, 2, 1))]),
    );
    assert_eq!(
        (field.as_str(), problem),
        ("nexthops[0].remote_vtep", Problem::OwnVtep)
    );
    m.apply(&[upsert_route(
        10,
        "10.9.0.0/16",
        vec![own(Ipv4Addr::new(192, 0, 2, 2))],
    )])
    .unwrap();
    // Tables the kernel reserves.
    for t in [253, 254, 255] {
        let (field, problem) = refused(&mut m, vpc("green", 300, t, 3));
        assert_eq!(
            (field.as_str(), problem),
            ("table", Problem::ReservedTable(t))
        );
    }
    // An IPv6 route through an IPv4 gateway; an IPv4 route through an IPv6 gateway is RFC 8950
    // (BGP unnumbered) and accepted.
    let v4gw = Nexthop::Underlay {
        gateway: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 254)),
        port: PortId(0),
        mac: mac(0xfe),
    };
    let (field, problem) = refused(&mut m, upsert_route(254, "2001:db8::/32", vec![v4gw]));
    assert_eq!(
        (field.as_str(), problem),
        ("nexthops[0].gateway", Problem::WrongFamily)
    );
    let v6gw = Nexthop::Underlay {
        gateway: IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
        port: PortId(0),
        mac: mac(0xfe),
    };
    m.apply(&[upsert_route(254, "198.18.0.0/15", vec![v6gw])])
        .unwrap();
    // Clear messages for what was misleading.
    let (_, problem) = refused(
        &mut m,
        upsert_route(
            254,
            "10.0.0.0/8",
            vec![Nexthop::Vrf {
                table: TableId(254),
            }],
        ),
    );
    assert_eq!(problem, Problem::VrfInUnderlay);
    let (field, problem) = refused(&mut m, upsert_route(10, "10.8.0.0/16", vec![gw(0)]));
    assert_eq!(
        (field.as_str(), problem),
        ("nexthops[0].port", Problem::UplinkInVpc(0))
    );
    let (field, problem) = refused(&mut m, upsert_route(254, "10.0.0.0/8", vec![gw(0), gw(0)]));
    assert_eq!(
        (field.as_str(), problem),
        ("nexthops[1]", Problem::DuplicateNexthop { index: 0 })
    );
    let (field, problem) = refused(&mut m, napt("rev", [203, 0, 113, 9], [203, 0, 113, 1]));
    assert_eq!(field, "pool");
    assert!(matches!(problem, Problem::Reversed { .. }), "{problem}");
    let backwards = Change::UpsertNat(NatRule {
        name: n("ports"),
        vpc: n("blue"),
        kind: NatKind::Napt44 {
            pool: Ipv4Range::single(Ipv4Addr::new(203, 0, 113, 20)),
            ports: (2000, 1000),
        },
    });
    let (field, problem) = refused(&mut m, backwards);
    assert_eq!(field, "ports");
    assert!(
        problem
            .to_string()
            .contains("reversed range: first 2000 is above last 1000"),
        "{problem}"
    );
}

/// RFC 6052 §2.2: the "u" octet (bits 64-71) of a NAT64 prefix must be zero.
#[test]
fn nat64_prefixes_with_the_u_octet_set_are_refused() {
    let mut m = base();
    let nat64 = |prefix: &str| {
        Change::UpsertNat(NatRule {
            name: n("six"),
            vpc: n("blue"),
            kind: NatKind::Nat64 {
                prefix: p(prefix),
                pool: Ipv4Range::single(Ipv4Addr::new(203, 0, 113, 9)),
                ports: (1024, 65535),
            },
        })
    };
    let (field, problem) = refused(&mut m, nat64("2001:db8:0:0:ff00::/96"));
    assert_eq!((field.as_str(), problem), ("prefix", Problem::Nat64UOctet));
    m.apply(&[nat64("64:ff9b::/96")]).unwrap();
}
