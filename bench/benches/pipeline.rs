#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! The software pipeline, single thread, on an Internet-sized underlay.
//!
//! `cargo bench -p bench --bench pipeline`
//!
//! The model and the frames are those of `common/models.rs` (shared with `pipeline_dpdk`).
//!
//! Each iteration reloads 32 `HeadroomBuf`s from template frames (rotating through 4096
//! templates with distinct random destinations), reads the clock once for `now_ns`, and runs
//! `process_burst`. `pipeline/reload_only` measures the reload and the clock read alone:
//! subtract it from the other results for the pipeline's own cost. IPv4 frames are 60 bytes in
//! the buffer (64 on the wire with the FCS); IPv6 ones 80 bytes.
//!
//! `pipeline/ipv4_forward_hot32` is a diagnostic: the forward path with only 32 destinations,
//! whose table entries stay in cache; its gap to `ipv4_forward` is memory stalls.
//!
//! Before timing, every template is processed once and its verdict checked (this also creates
//! the NAT sessions, so the timed runs reuse them); during timing, verdicts other than the
//! expected `Tx` are counted and fail the bench afterwards.

#[path = "common/models.rs"]
mod models;

use std::hint::black_box;
use std::time::Instant;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use flow_offload::model::PortId;
use flow_offload::soft::{HeadroomBuf, Pipeline, Verdict};
use models::{now_ns, precheck, Case, BUF_SIZE, BURST, HEADROOM, UPLINKS};

struct Burst {
    bufs: Vec<HeadroomBuf>,
    ingress: Vec<PortId>,
    marks: Vec<Option<u32>>,
    verdicts: Vec<Verdict>,
    cursor: usize,
}

impl Burst {
    fn new(ingress: PortId) -> Burst {
        Burst {
            bufs: (0..BURST)
                .map(|_| HeadroomBuf::new(BUF_SIZE, HEADROOM))
                .collect(),
            ingress: vec![ingress; BURST],
            marks: vec![None; BURST],
            verdicts: vec![Verdict::ToHost; BURST],
            cursor: 0,
        }
    }

    /// Refills every buffer from the next templates.
    #[inline]
    fn reload(&mut self, templates: &[Vec<u8>]) {
        let mask = templates.len() - 1;
        for b in &mut self.bufs {
            let ok = b.load(&templates[self.cursor], HEADROOM);
            debug_assert!(ok);
            self.cursor = (self.cursor + 1) & mask;
        }
    }
}

fn bench_case(
    g: &mut BenchmarkGroup<'_, WallTime>,
    p: &mut Pipeline,
    case: &Case,
    clock: &Instant,
) {
    let dropping = precheck(p, case, clock);
    let mut burst = Burst::new(case.ingress);
    let mut unexpected = 0usize;
    g.bench_function(case.name, |b| {
        b.iter(|| {
            burst.reload(&case.templates);
            p.process_burst(
                &mut burst.bufs,
                &burst.ingress,
                &burst.marks,
                &mut burst.verdicts,
                now_ns(clock),
            );
            unexpected += burst
                .verdicts
                .iter()
                .filter(|v| !matches!(v, Verdict::Tx(_)))
                .count();
        })
    });
    assert!(
        dropping || unexpected == 0,
        "pipeline/{}: {unexpected} packets were not forwarded during the timed runs",
        case.name
    );
}

fn benches(c: &mut Criterion) {
    let (mut p, cases) = models::setup("pipeline");
    let clock = Instant::now();
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(BURST as u64));
    {
        let mut burst = Burst::new(UPLINKS[0]);
        g.bench_function("reload_only", |b| {
            b.iter(|| {
                burst.reload(&cases.forward.templates);
                black_box(now_ns(&clock));
                black_box(&mut burst.bufs);
            })
        });
    }
    for case in [
        &cases.forward,
        &cases.forward_hot,
        &cases.nat44,
        &cases.nat64,
        &cases.metered,
        &cases.plain,
        &cases.vxlan,
    ] {
        bench_case(&mut g, &mut p, case, &clock);
    }
    g.finish();
}

criterion_group!(pipeline_benches, benches);
criterion_main!(pipeline_benches);
