#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! Control-plane costs on an Internet-sized model: full compile, incremental route updates,
//! plan diffs and model validation.
//!
//! `cargo bench -p bench --bench compile`
//!
//! The model: a node with 2 uplinks, 1M IPv4 underlay routes (`internet_v4`) each with one
//! underlay next hop out of 8 gateways (4 per uplink), and a small overlay: a VPC breaking out
//! to the underlay through NAPT44, a metered VPC with one VXLAN route (so the compiler tracks
//! one remote VTEP, as an EVPN gateway always does). `compile/full_1m_v4_200k_v6` adds a
//! 200k-route IPv6 underlay table.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bench::tables::{internet_v4, internet_v6};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use flow_offload::caps::{Caps, Profile};
use flow_offload::compile::{compile, Compiler, Op, RuleId};
use flow_offload::model::{
    Change, Ipv4Range, MacAddr, Meter, MeterProfile, MeterTarget, Model, Name, NatKind, NatRule,
    Nexthop, Node, PortId, Prefix, Route, RouteKey, TableId, Vni, Vpc, UNDERLAY_TABLE,
};
use flow_offload::reconcile;

const V4_ROUTES: usize = 1_000_000;
const V6_ROUTES: usize = 200_000;
const SEED: u64 = 0x5eed;
/// Changes per `Model::apply` batch when building the big model.
const BATCH: usize = 10_000;
const UPLINKS: [PortId; 2] = [PortId(0), PortId(1)];
const GATEWAYS: usize = 8;
const ROUTER_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x01]);

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn gateway_mac(i: usize) -> MacAddr {
    MacAddr([0x02, 0, 0, 0, 0x01, i as u8 + 1])
}

/// Underlay next hop `i % GATEWAYS`: gateways alternate between the two uplinks.
fn underlay_nh(i: usize, v6: bool) -> Nexthop {
    let g = i % GATEWAYS;
    let gateway = if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, g as u16 + 1))
    } else {
        IpAddr::V4(Ipv4Addr::new(100, 64, 0, g as u8 + 1))
    };
    Nexthop::Underlay {
        gateway,
        port: UPLINKS[g % UPLINKS.len()],
        mac: gateway_mac(g),
    }
}

fn route(table: TableId, prefix: Prefix, nh: Nexthop) -> Change {
    Change::UpsertRoute(Route {
        key: RouteKey { table, prefix },
        nexthops: vec![nh],
    })
}

fn v4_changes(n: usize, seed: u64) -> Vec<Change> {
    internet_v4(n, seed)
        .into_iter()
        .enumerate()
        .map(|(i, (a, l))| {
            let p = Prefix::v4(Ipv4Addr::from(a), l).unwrap();
            route(UNDERLAY_TABLE, p, underlay_nh(i, false))
        })
        .collect()
}

fn v6_changes(n: usize, seed: u64) -> Vec<Change> {
    internet_v6(n, seed)
        .into_iter()
        .enumerate()
        .map(|(i, (a, l))| {
            let p = Prefix::v6(Ipv6Addr::from(a), l).unwrap();
            route(UNDERLAY_TABLE, p, underlay_nh(i, true))
        })
        .collect()
}

fn node_change() -> Change {
    Change::SetNode(Node {
        vtep: Ipv4Addr::new(192, 0, 2, 1),
        router_mac: ROUTER_MAC,
        uplinks: UPLINKS.into_iter().collect(),
    })
}

/// VPCs, NAT, a meter and a VXLAN route: applied after the underlay table.
fn overlay_changes() -> Vec<Change> {
    let vpc = |n: &str, vni: u32, table: u32, port: u16| {
        Change::UpsertVpc(Vpc {
            name: name(n),
            vni: Vni::new(vni).unwrap(),
            table: TableId(table),
            ports: BTreeSet::from([PortId(port)]),
        })
    };
    vec![
        vpc("tenant-a", 1100, 100, 10),
        vpc("tenant-b", 1200, 200, 20),
        route(
            TableId(100),
            "0.0.0.0/0".parse().unwrap(),
            Nexthop::Vrf {
                table: UNDERLAY_TABLE,
            },
        ),
        Change::UpsertNat(NatRule {
            name: name("tenant-a-napt"),
            vpc: name("tenant-a"),
            kind: NatKind::Napt44 {
                pool: Ipv4Range {
                    first: Ipv4Addr::new(203, 0, 113, 0),
                    last: Ipv4Addr::new(203, 0, 113, 3),
                },
                ports: (1024, 65535),
            },
        }),
        // The remote VTEP's underlay route.
        route(
            UNDERLAY_TABLE,
            "198.51.100.0/24".parse().unwrap(),
            underlay_nh(0, false),
        ),
        route(
            TableId(200),
            "10.30.0.0/16".parse().unwrap(),
            Nexthop::Vxlan {
                vni: Vni::new(1200).unwrap(),
                remote_vtep: Ipv4Addr::new(198, 51, 100, 7),
                router_mac: MacAddr([0x02, 0, 0, 0, 0x02, 0x01]),
            },
        ),
        Change::UpsertMeter(Meter {
            name: name("tenant-b-ingress"),
            profile: MeterProfile::TrTcm {
                cir: 1_250_000_000,
                cbs: 1 << 20,
                pir: 2_500_000_000,
                pbs: 1 << 20,
            },
            target: MeterTarget::Vpc(name("tenant-b")),
        }),
    ]
}

fn apply_batched(model: &mut Model, changes: &[Change]) {
    for chunk in changes.chunks(BATCH) {
        model.apply(chunk).unwrap();
    }
}

/// A /32 no route of the table has: the route the incremental benches add and remove.
fn fresh_key(model: &Model) -> RouteKey {
    (1u32..)
        .map(|i| RouteKey {
            table: UNDERLAY_TABLE,
            prefix: Prefix::v4(Ipv4Addr::from(0xcb00_7100 + (i << 8) + 0x42), 32).unwrap(),
        })
        .find(|k| !model.routes().contains_key(k))
        .unwrap()
}

/// What an empty `Instant::now()` / `elapsed()` pair costs here: the bias of the
/// `iter_custom` benches below, which time single operations.
fn timer_overhead() -> Duration {
    let n = 100_000u32;
    let mut t = Duration::ZERO;
    for _ in 0..n {
        let s = Instant::now();
        t += black_box(s).elapsed();
    }
    t / n
}

fn benches(c: &mut Criterion) {
    let caps = Caps::profile(Profile::Full);

    // --- model/validate_1m: the big model, built through `Model::apply` in batches. ---
    let mut changes = vec![node_change()];
    changes.extend(v4_changes(V4_ROUTES, SEED));
    changes.extend(overlay_changes());
    let route_changes = changes
        .iter()
        .filter(|c| matches!(c, Change::UpsertRoute(_)))
        .count();
    {
        let mut g = c.benchmark_group("model");
        g.sample_size(10);
        g.sampling_mode(SamplingMode::Flat);
        g.throughput(Throughput::Elements(route_changes as u64));
        g.bench_function("validate_1m", |b| {
            b.iter_with_large_drop(|| {
                let mut m = Model::new();
                apply_batched(&mut m, black_box(&changes));
                m
            })
        });
        g.finish();
    }
    let mut model = Model::new();
    let start = Instant::now();
    apply_batched(&mut model, &changes);
    let routes = model.routes().len();
    eprintln!(
        "model: {routes} routes ({} underlay v4) built in {:.2} s",
        model
            .routes()
            .keys()
            .filter(|k| k.table == UNDERLAY_TABLE && k.prefix.is_v4())
            .count(),
        start.elapsed().as_secs_f64()
    );
    drop(changes);

    // --- compile/full_1m_v4 ---
    {
        let mut g = c.benchmark_group("compile");
        g.sample_size(10);
        g.sampling_mode(SamplingMode::Flat);
        g.throughput(Throughput::Elements(routes as u64));
        let plan = compile(&model, &caps);
        let in_sw = plan.sw.keys().count();
        eprintln!(
            "compile: {} hardware rules, {} meters, {in_sw} objects in software",
            plan.hw.rule_count(),
            plan.hw.meters.len()
        );
        drop(plan);
        g.bench_function("full_1m_v4", |b| {
            b.iter_with_large_drop(|| compile(black_box(&model), black_box(&caps)))
        });
        g.finish();
    }

    // --- Incremental: one route added then removed, on a compiler holding the 1M model. ---
    let mut compiler = Compiler::new(caps.clone());
    compiler.rebuild(&model);
    drop(compiler.take_ops());
    let key = fresh_key(&model);
    let add = [route(key.table, key.prefix, underlay_nh(3, false))];
    let del = [Change::DeleteRoute(key)];
    // What one added route compiles to: one rule per uplink, nothing else.
    model.apply(&add).unwrap();
    compiler.update_route(&model, key);
    let ops = compiler.take_ops();
    let route_rule =
        |op: &Op| matches!(op, Op::Create(RuleId::Route { key: k, .. }, _) if *k == key);
    assert!(
        ops.len() == UPLINKS.len() && ops.iter().all(route_rule),
        "adding one underlay route should create {} rules, got {ops:?}",
        UPLINKS.len()
    );
    model.apply(&del).unwrap();
    compiler.update_route(&model, key);
    assert_eq!(compiler.take_ops().len(), UPLINKS.len(), "removal ops");
    eprintln!(
        "timer overhead (Instant pair, included in the iter_custom timings): {:?}",
        timer_overhead()
    );

    {
        let mut g = c.benchmark_group("compile");
        // One iteration = one `update_route`, alternating add and remove; the model change and
        // `take_ops` run untimed.
        g.bench_function("incremental_one_route", |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    let present = model.routes().contains_key(&key);
                    model.apply(if present { &del } else { &add }).unwrap();
                    let s = Instant::now();
                    compiler.update_route(black_box(&model), key);
                    t += s.elapsed();
                    black_box(compiler.take_ops());
                }
                t
            })
        });
        g.finish();
    }
    if model.routes().contains_key(&key) {
        model.apply(&del).unwrap();
        compiler.update_route(&model, key);
        drop(compiler.take_ops());
    }

    {
        let mut g = c.benchmark_group("model");
        // One iteration = add then remove (validation, insertion, undo log, removal).
        g.throughput(Throughput::Elements(2));
        g.bench_function("apply_one_route", |b| {
            b.iter(|| {
                model.apply(black_box(&add)).unwrap();
                model.apply(black_box(&del)).unwrap();
            })
        });
        g.finish();
    }

    // --- reconcile: the O(n) merge vs the compiler's recorded ops. ---
    {
        let plan_a = compiler.plan().clone();
        model.apply(&add).unwrap();
        compiler.update_route(&model, key);
        drop(compiler.take_ops());
        let plan_b = compiler.plan().clone();
        model.apply(&del).unwrap();
        compiler.update_route(&model, key);
        drop(compiler.take_ops());
        let ops = reconcile::diff(&plan_a, &plan_b);
        assert!(
            ops.len() == UPLINKS.len() && ops.iter().all(route_rule),
            "plans should differ by one route's rules, diff gave {ops:?}"
        );
        eprintln!(
            "reconcile: plans of {} / {} rules",
            plan_a.hw.rule_count(),
            plan_b.hw.rule_count()
        );
        let mut g = c.benchmark_group("reconcile");
        g.sample_size(10);
        g.sampling_mode(SamplingMode::Flat);
        g.bench_function("diff_one_route", |b| {
            b.iter(|| reconcile::diff(black_box(&plan_a), black_box(&plan_b)))
        });
        g.sample_size(100);
        g.sampling_mode(SamplingMode::Auto);
        // One iteration = `take_ops` after one `update_route` (alternating add and remove),
        // which runs untimed.
        g.bench_function("take_ops_one_route", |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    let present = model.routes().contains_key(&key);
                    model.apply(if present { &del } else { &add }).unwrap();
                    compiler.update_route(&model, key);
                    let s = Instant::now();
                    let ops = compiler.take_ops();
                    t += s.elapsed();
                    black_box(ops);
                }
                t
            })
        });
        g.finish();
    }
    if model.routes().contains_key(&key) {
        model.apply(&del).unwrap();
    }
    drop(compiler);

    // --- compile/full_1m_v4_200k_v6: the same with the IPv6 table. ---
    apply_batched(&mut model, &v6_changes(V6_ROUTES, SEED + 1));
    let routes = model.routes().len();
    {
        let mut g = c.benchmark_group("compile");
        g.sample_size(10);
        g.sampling_mode(SamplingMode::Flat);
        g.throughput(Throughput::Elements(routes as u64));
        g.bench_function("full_1m_v4_200k_v6", |b| {
            b.iter_with_large_drop(|| compile(black_box(&model), black_box(&caps)))
        });
        g.finish();
    }
}

criterion_group!(compile_benches, benches);
criterion_main!(compile_benches);
