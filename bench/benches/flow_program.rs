#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! rte_flow programming cost per rule: the same compiled plan programmed into the reference NIC
//! and into DPDK ports, side by side, in one process.
//!
//! `cargo bench -p bench --bench flow_program` (as root: EAL needs it even without hugepages).
//!
//! The model: a node whose two uplinks are the ethdev ports `net_null0` and `net_null1` (model
//! port ids are ethdev port ids), and 1k or 10k Internet-like IPv4 underlay routes
//! (`internet_v4`), next hops alternating between the uplinks; compiled under the `Full`
//! profile. Rows, per table size:
//!
//! - `program/refnic`, `program/dpdk`: `flow_offload::program::program` from a fresh compiler
//!   holding the whole plan's creates (compiled outside the timing) into a fresh
//!   `RefNicTarget` (which accepts everything), resp. a `dpdk::DpdkTarget` over the two
//!   `net_null` ports, where every create answers ENOSYS: each refusal is recorded in the
//!   compiler, which recompiles and tries again (traps), so this row is FFI + `rte_flow`
//!   translation + error path + the recompiles. Per rule = time / creates attempted (counted
//!   on a first run; the count is printed).
//! - `create/refnic`, `create/dpdk`: the plan's rules created one by one through
//!   `FlowTarget::create_rule`, nothing else: the target's own cost per rule.
//! - `flowspec`: `dpdk::FlowSpec::new(rule)` alone (IR → owned `rte_flow` arrays).
//!
//! After criterion, a simple timing loop (the rows taking turns within each pass) prints median
//! ns per rule and the DPDK/RefNic ratios.

use core::net::{IpAddr, Ipv4Addr};
use std::hint::black_box;
use std::time::Instant;

use bench::tables::internet_v4;
use criterion::{BatchSize, Criterion, Throughput};
use dpdk::{DpdkTarget, Eal, FlowSpec, Mempool, Port, PortConfig};
use flow_offload::caps::{Caps, Profile, Refusal};
use flow_offload::compile::{Compiler, RuleId};
use flow_offload::ir::{MeterRef, Rule};
use flow_offload::model::{
    Change, MacAddr, MeterProfile, Model, Nexthop, Node, PortId, Prefix, Route, RouteKey,
    UNDERLAY_TABLE,
};
use flow_offload::program::{program, FlowTarget, RefNicTarget, Report};
use flow_offload::refnic::RefNic;

const EAL_ARGS: &[&str] = &[
    "flow_program",
    "-l",
    "0",
    "--no-huge",
    "--no-pci",
    "--no-shconf",
    "-m",
    "256",
    "--vdev=net_null0",
    "--vdev=net_null1",
    "--log-level=*:error",
];
const SIZES: [usize; 2] = [1_000, 10_000];
const SEED: u64 = 0x5eed;
const GATEWAYS: usize = 8;
/// Passes of the simple timing loop.
const PASSES: usize = 11;

fn model(routes: usize, uplinks: [PortId; 2]) -> Model {
    let mut changes = vec![Change::SetNode(Node {
        vtep: Ipv4Addr::new(192, 0, 2, 1),
        router_mac: MacAddr([0x02, 0, 0, 0, 0, 0x01]),
        uplinks: uplinks.into_iter().collect(),
    })];
    changes.extend(
        internet_v4(routes, SEED)
            .into_iter()
            .enumerate()
            .map(|(i, (a, l))| {
                let g = i % GATEWAYS;
                Change::UpsertRoute(Route {
                    key: RouteKey {
                        table: UNDERLAY_TABLE,
                        prefix: Prefix::v4(Ipv4Addr::from(a), l).unwrap(),
                    },
                    nexthops: vec![Nexthop::Underlay {
                        gateway: IpAddr::V4(Ipv4Addr::new(100, 64, 0, g as u8 + 1)),
                        port: uplinks[g % 2],
                        mac: MacAddr([0x02, 0, 0, 0, 0x01, g as u8 + 1]),
                    }],
                })
            }),
    );
    let mut m = Model::new();
    m.apply(&changes).unwrap();
    m
}

/// A compiler holding the whole plan as pending creates.
fn fresh_compiler(model: &Model) -> Compiler {
    let mut c = Compiler::new(Caps::profile(Profile::Full));
    c.rebuild(model);
    c
}

/// Counts the creates a target is asked for.
struct Counting<'t, T> {
    inner: &'t mut T,
    creates: usize,
}

impl<T: FlowTarget> FlowTarget for Counting<'_, T> {
    fn create_rule(&mut self, id: &RuleId, rule: &Rule) -> Result<(), Refusal> {
        self.creates += 1;
        self.inner.create_rule(id, rule)
    }
    fn replace_rule(&mut self, id: &RuleId, rule: &Rule) -> Result<(), Refusal> {
        self.creates += 1;
        self.inner.replace_rule(id, rule)
    }
    fn destroy_rule(&mut self, id: &RuleId) {
        self.inner.destroy_rule(id)
    }
    fn create_meter(&mut self, meter: MeterRef, profile: &MeterProfile) -> Result<(), Refusal> {
        self.inner.create_meter(meter, profile)
    }
    fn update_meter(&mut self, meter: MeterRef, profile: &MeterProfile) -> Result<(), Refusal> {
        self.inner.update_meter(meter, profile)
    }
    fn destroy_meter(&mut self, meter: MeterRef) {
        self.inner.destroy_meter(meter)
    }
}

/// Creates attempted by one `program` run, and its report.
fn count<T: FlowTarget>(model: &Model, target: &mut T) -> (usize, Report) {
    let mut compiler = fresh_compiler(model);
    let mut counting = Counting {
        inner: target,
        creates: 0,
    };
    let report = program(&mut compiler, model, &mut counting).unwrap();
    (counting.creates, report)
}

fn refnic() -> RefNicTarget {
    RefNicTarget::new(RefNic::new(Caps::profile(Profile::Full)))
}

/// One timed run of `run` after an untimed `setup`, in ns per `per`.
fn timed<S, R>(per: usize, setup: impl Fn() -> S, run: impl Fn(S) -> R) -> impl FnMut() -> f64 {
    move || {
        let s = setup();
        let start = Instant::now();
        let out = run(s);
        let ns = start.elapsed().as_nanos() as f64;
        drop(black_box(out));
        ns / per as f64
    }
}

/// Medians of `PASSES` passes in which the measurements take turns, so that load changes on
/// the machine hit them alike.
fn interleaved(runs: &mut [&mut dyn FnMut() -> f64]) -> Vec<f64> {
    let mut t = vec![Vec::with_capacity(PASSES); runs.len()];
    for _ in 0..PASSES {
        for (run, times) in runs.iter_mut().zip(&mut t) {
            times.push(run());
        }
    }
    t.into_iter()
        .map(|mut v| {
            v.sort_by(f64::total_cmp);
            v[PASSES / 2]
        })
        .collect()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let eal = Eal::init(EAL_ARGS).unwrap_or_else(|e| panic!("EAL init (root?): {e}"));
    let pool =
        Mempool::pktmbuf(&eal, "fp_pool", 1023, 0, Mempool::DEFAULT_DATA_ROOM, None).unwrap();
    let port = |name: &str| {
        let id = Port::id_by_name(&eal, name).unwrap();
        let mut port = Port::configure(id, &pool, PortConfig::default()).unwrap();
        port.start().unwrap();
        port
    };
    let ports = [port("net_null0"), port("net_null1")];
    let uplinks = [PortId(ports[0].id()), PortId(ports[1].id())];

    let mut summary = Vec::new();
    for n in SIZES {
        let model = model(n, uplinks);
        let rules: Vec<(RuleId, Rule)> = fresh_compiler(&model).plan().hw.iter_rules().collect();

        let (ref_creates, ref_report) = count(&model, &mut refnic());
        let (dpdk_creates, dpdk_report) = count(&model, &mut DpdkTarget::new(&ports));
        eprintln!(
            "flow_program/{n}: plan of {} rules; refnic: {ref_creates} creates, {} refused, {} \
             rounds; dpdk (net_null): {dpdk_creates} creates, {} refused, {} rounds",
            rules.len(),
            ref_report.refused.len(),
            ref_report.rounds,
            dpdk_report.refused.len(),
            dpdk_report.rounds,
        );
        assert!(
            ref_report.refused.is_empty(),
            "the reference NIC refused rules"
        );
        assert_eq!(
            dpdk_report.refused.len(),
            dpdk_creates,
            "net_null accepted a rule"
        );
        assert!(dpdk_report
            .refused
            .iter()
            .all(|(_, r)| *r == Refusal::NotImplemented));
        let translate_errors = rules
            .iter()
            .filter(|(_, r)| FlowSpec::new(r).is_err())
            .count();
        assert_eq!(translate_errors, 0, "rules without an rte_flow translation");

        let mut g = c.benchmark_group(format!("flow_program/{n}"));
        g.sample_size(10);
        g.throughput(Throughput::Elements(ref_creates as u64));
        g.bench_function("program/refnic", |b| {
            b.iter_batched(
                || (fresh_compiler(&model), refnic()),
                |(mut compiler, mut target)| {
                    program(&mut compiler, &model, &mut target).unwrap();
                    (compiler, target)
                },
                BatchSize::PerIteration,
            )
        });
        g.throughput(Throughput::Elements(dpdk_creates as u64));
        g.bench_function("program/dpdk", |b| {
            b.iter_batched(
                || (fresh_compiler(&model), DpdkTarget::new(&ports)),
                |(mut compiler, mut target)| {
                    program(&mut compiler, &model, &mut target).unwrap();
                    compiler
                },
                BatchSize::PerIteration,
            )
        });
        g.throughput(Throughput::Elements(rules.len() as u64));
        g.bench_function("create/refnic", |b| {
            b.iter_batched(
                refnic,
                |mut target| {
                    for (id, rule) in &rules {
                        target.create_rule(id, rule).unwrap();
                    }
                    target
                },
                BatchSize::PerIteration,
            )
        });
        let mut dpdk_target = DpdkTarget::new(&ports);
        g.bench_function("create/dpdk", |b| {
            b.iter(|| {
                for (id, rule) in &rules {
                    black_box(dpdk_target.create_rule(id, rule)).unwrap_err();
                }
            })
        });
        g.bench_function("flowspec", |b| {
            b.iter(|| {
                for (_, rule) in &rules {
                    black_box(FlowSpec::new(black_box(rule))).unwrap();
                }
            })
        });
        g.finish();

        // The same, side by side from one loop.
        let dpdk_target = std::cell::RefCell::new(dpdk_target);
        let mut prog_ref = timed(
            ref_creates,
            || (fresh_compiler(&model), refnic()),
            |(mut compiler, mut target)| {
                program(&mut compiler, &model, &mut target).unwrap();
                (compiler, target)
            },
        );
        let mut prog_dpdk = timed(
            dpdk_creates,
            || (fresh_compiler(&model), DpdkTarget::new(&ports)),
            |(mut compiler, mut target)| {
                program(&mut compiler, &model, &mut target).unwrap();
                compiler
            },
        );
        let mut create_ref = timed(rules.len(), refnic, |mut target| {
            for (id, rule) in &rules {
                target.create_rule(id, rule).unwrap();
            }
            target
        });
        let mut create_dpdk = timed(
            rules.len(),
            || (),
            |()| {
                let mut target = dpdk_target.borrow_mut();
                for (id, rule) in &rules {
                    black_box(target.create_rule(id, rule)).unwrap_err();
                }
            },
        );
        let mut spec = timed(
            rules.len(),
            || (),
            |()| {
                for (_, rule) in &rules {
                    black_box(FlowSpec::new(black_box(rule))).unwrap();
                }
            },
        );
        let m = interleaved(&mut [
            &mut prog_ref,
            &mut prog_dpdk,
            &mut create_ref,
            &mut create_dpdk,
            &mut spec,
        ]);
        let [prog_ref, prog_dpdk, create_ref, create_dpdk, spec] = m[..] else {
            unreachable!()
        };
        summary.push(format!(
            "{n:>6} routes {:>6} rules | program ns/create: refnic {prog_ref:>7.0} dpdk \
             {prog_dpdk:>7.0} ({:.2}x) | create_rule ns: refnic {create_ref:>6.0} dpdk \
             {create_dpdk:>6.0} ({:.2}x) | FlowSpec::new ns: {spec:>5.0}",
            rules.len(),
            prog_dpdk / prog_ref,
            create_dpdk / create_ref,
        ));
    }
    c.final_summary();
    eprintln!("flow_program: medians of {PASSES} passes");
    for line in &summary {
        eprintln!("{line}");
    }
    drop(ports);
    drop(pool);
    drop(eal);
}
