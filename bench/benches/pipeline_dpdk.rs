#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! The software pipeline on real DPDK mbufs through ports, one lcore, side by side with a
//! testpmd-style io-forward baseline on the same ports.
//!
//! `cargo bench -p bench --bench pipeline_dpdk` (as root: EAL needs it even without hugepages).
//!
//! One process, one EAL (`--no-huge --no-pci --no-shconf`), one pktmbuf pool, three ports:
//! `net_null0` (rx source of the plain io-forward baseline), `net_null1` (the tx sink: it
//! frees what it is given) and a `net_ring` port over an `rte_ring` ([`dpdk::RingPort`]). The
//! model and the 4096 template frames per case are those of `common/models.rs` (shared with the
//! `pipeline` bench). Every iteration moves a burst of 32 packets:
//!
//! - `io_fwd_null`: rx burst from `net_null0` (the PMD allocates 64-byte mbufs, no copy), tx
//!   burst to `net_null1`: testpmd's io forwarding, no processing;
//! - `io_fwd_fill`: 32 mbufs from the pool in one bulk call, each filled with the next
//!   template (60 bytes), injected into the ring, rx burst from the ring port, tx burst to
//!   `net_null1`: the same with the fill step, the baseline of the rows below;
//! - `ipv4_forward`, `nat44_napt`, `nat64`, `metered`: as `io_fwd_fill`, plus
//!   `Pipeline::process_burst` over the received `dpdk::Mbuf`s; the `Tx` verdicts go to
//!   `net_null1`, the rest are freed;
//! - `soft/reload_only`, `soft/<case>`: the `pipeline` bench's steps (`HeadroomBuf`s reloaded
//!   from the same templates, `process_burst`), in the same process, so that the cost of the
//!   pipeline on mbufs and on plain buffers can be compared from one run.
//!
//! Before timing, every template goes through the pipeline once (checking its verdict and
//! creating the NAT sessions), and 256 per case go through both `HeadroomBuf` and mbufs, which
//! must give the same verdicts and bytes. After criterion, a simple timing loop (21 passes) of
//! the same steps, taking turns within each pass, prints the medians in ns/packet, Mpps, the
//! ratio to `io_fwd_fill` and each pipeline row's own cost (minus its buffer reload).

#[path = "common/models.rs"]
// Shared with `pipeline.rs`, which uses every case; this bench uses four.
#[allow(dead_code)]
mod models;

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput};
use dpdk::{Eal, Mbuf, Mempool, Port, PortConfig, RingPort};
use flow_offload::model::PortId;
use flow_offload::soft::{HeadroomBuf, PacketBuf, Pipeline, Verdict};
use models::{now_ns, precheck, Case, BUF_SIZE, BURST, HEADROOM};

const EAL_ARGS: &[&str] = &[
    "pipeline_dpdk",
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
/// Mbufs in the pool: a few bursts in flight and the lcore cache.
const POOL_SIZE: u32 = 8191;
const POOL_CACHE: u32 = 256;
/// Templates checked through both buffer kinds before timing.
const CROSS_CHECK: usize = 256;
/// Passes of the simple timing loop, and bursts per pass.
const PASSES: usize = 21;
const BURSTS_PER_PASS: usize = 4000;

/// What one iteration does.
#[derive(Clone, Copy)]
enum Step<'c> {
    IoFwdNull,
    /// Fill from these templates, through the ring, to the sink.
    IoFwdFill(&'c Case),
    Pipeline(&'c Case),
    /// `HeadroomBuf`s reloaded from these templates, as in the `pipeline` bench.
    SoftReload(&'c Case),
    /// The `pipeline` bench's step: reload `HeadroomBuf`s, `process_burst`.
    Soft(&'c Case),
}

impl Step<'_> {
    fn name(&self) -> String {
        match self {
            Step::IoFwdNull => "io_fwd_null".into(),
            Step::IoFwdFill(_) => "io_fwd_fill".into(),
            Step::Pipeline(c) => c.name.into(),
            Step::SoftReload(_) => "soft/reload_only".into(),
            Step::Soft(c) => format!("soft/{}", c.name),
        }
    }
}

/// The ports and the burst buffers (allocated once: the timed steps do not allocate).
struct Rig<'a> {
    pool: &'a Mempool<'a>,
    ring: &'a RingPort<'a>,
    ring_port: Port<'a>,
    null_rx: Port<'a>,
    null_tx: Port<'a>,
    fill: Vec<Mbuf<'a>>,
    rx: Vec<Mbuf<'a>>,
    tx: Vec<Mbuf<'a>>,
    ingress: Vec<PortId>,
    marks: Vec<Option<u32>>,
    verdicts: Vec<Verdict>,
    /// The software rows' buffers.
    soft: Vec<HeadroomBuf>,
    cursor: usize,
    /// Packets that did not come back as expected (lost in a port, or a verdict other than
    /// `Tx` outside a tolerated drop): must stay 0.
    unexpected: usize,
}

impl Rig<'_> {
    /// Takes 32 mbufs from the pool and fills them with the next templates.
    #[inline]
    fn fill(&mut self, templates: &[Vec<u8>]) {
        let ok = self.pool.alloc_bulk(&mut self.fill, BURST);
        assert!(ok, "mempool exhausted");
        let mask = templates.len() - 1;
        for m in &mut self.fill {
            let t = &templates[self.cursor & mask];
            let ok = m.set_len(t.len());
            debug_assert!(ok);
            m.data_mut().copy_from_slice(t);
            self.cursor = (self.cursor + 1) & mask;
        }
    }

    /// Fill, inject into the ring, receive from the ring port.
    #[inline]
    fn fill_and_receive(&mut self, templates: &[Vec<u8>]) {
        self.fill(templates);
        let queued = self.ring.inject(&mut self.fill);
        self.fill.clear(); // anything the ring refused goes back to the pool
        let got = self.ring_port.rx_burst(&mut self.rx, BURST as u16);
        self.unexpected += (BURST - queued) + (queued - got);
    }

    /// Sends `self.tx` to the null sink; what it does not take is freed.
    #[inline]
    fn send(&mut self) {
        self.null_tx.tx_burst(&mut self.tx);
        self.unexpected += self.tx.len();
        self.tx.clear();
    }

    /// Runs `process_burst` over the received mbufs.
    #[inline]
    fn process(&mut self, p: &mut Pipeline, clock: &Instant) {
        let n = self.rx.len();
        p.process_burst(
            &mut self.rx,
            &self.ingress[..n],
            &self.marks[..n],
            &mut self.verdicts[..n],
            now_ns(clock),
        );
    }

    /// Makes the per-packet inputs those of `step`.
    fn prepare(&mut self, step: Step<'_>) {
        if let Step::Pipeline(case) | Step::Soft(case) = step {
            self.ingress.fill(case.ingress);
        }
        self.cursor = 0;
    }

    #[inline]
    fn run(&mut self, step: Step<'_>, p: &mut Pipeline, clock: &Instant) {
        match step {
            Step::IoFwdNull => {
                let got = self.null_rx.rx_burst(&mut self.tx, BURST as u16);
                self.unexpected += BURST - got;
                self.send();
            }
            Step::IoFwdFill(case) => {
                self.fill_and_receive(&case.templates);
                std::mem::swap(&mut self.rx, &mut self.tx);
                self.send();
            }
            Step::Pipeline(case) => {
                self.fill_and_receive(&case.templates);
                self.process(p, clock);
                let tolerated = case.tolerated;
                for (m, v) in self.rx.drain(..).zip(&self.verdicts) {
                    match v {
                        Verdict::Tx(_) => self.tx.push(m),
                        Verdict::Drop(r) if Some(*r) == tolerated => drop(m),
                        _ => {
                            self.unexpected += 1;
                            drop(m);
                        }
                    }
                }
                self.send();
            }
            Step::SoftReload(case) => {
                self.reload_soft(&case.templates);
                black_box(now_ns(clock));
                black_box(&mut self.soft);
            }
            Step::Soft(case) => {
                self.reload_soft(&case.templates);
                p.process_burst(
                    &mut self.soft,
                    &self.ingress,
                    &self.marks,
                    &mut self.verdicts,
                    now_ns(clock),
                );
                let tolerated = case.tolerated;
                self.unexpected += self
                    .verdicts
                    .iter()
                    .filter(|v| match v {
                        Verdict::Tx(_) => false,
                        Verdict::Drop(r) => Some(*r) != tolerated,
                        _ => true,
                    })
                    .count();
            }
        }
    }

    /// Refills the `HeadroomBuf`s from the next templates (the `pipeline` bench's reload).
    #[inline]
    fn reload_soft(&mut self, templates: &[Vec<u8>]) {
        let mask = templates.len() - 1;
        for b in &mut self.soft {
            let ok = b.load(&templates[self.cursor & mask], HEADROOM);
            debug_assert!(ok);
            self.cursor = (self.cursor + 1) & mask;
        }
    }

    /// The first `CROSS_CHECK` templates through mbufs (in bursts) and through a
    /// `HeadroomBuf` (one by one): same verdicts, same bytes.
    fn cross_check(&mut self, p: &mut Pipeline, case: &Case, clock: &Instant) {
        self.prepare(Step::Pipeline(case));
        let mut hb = HeadroomBuf::new(BUF_SIZE, HEADROOM);
        let mut checked = 0;
        for chunk in case.templates[..CROSS_CHECK].chunks(BURST) {
            self.fill_and_receive(chunk);
            assert_eq!(
                self.rx.len(),
                chunk.len(),
                "{}: ring lost packets",
                case.name
            );
            self.process(p, clock);
            for (i, (m, t)) in self.rx.iter().zip(chunk).enumerate() {
                assert!(hb.load(t, HEADROOM));
                let v = p.process(&mut hb, case.ingress, None, now_ns(clock));
                assert_eq!(
                    self.verdicts[i], v,
                    "{}: verdict of template {i}",
                    case.name
                );
                assert_eq!(m.data(), hb.data(), "{}: bytes of template {i}", case.name);
                checked += 1;
            }
            self.rx.clear();
        }
        assert_eq!(checked, CROSS_CHECK);
        assert_eq!(self.unexpected, 0);
    }
}

/// Median ns per packet of each step over `PASSES` passes of `BURSTS_PER_PASS` iterations;
/// the steps take turns within each pass, so load changes on the machine hit them alike.
fn simple_timing(
    rig: &mut Rig<'_>,
    steps: &[Step<'_>],
    p: &mut Pipeline,
    clock: &Instant,
) -> Vec<f64> {
    let mut per_packet = vec![Vec::with_capacity(PASSES); steps.len()];
    for _ in 0..PASSES {
        for (&step, times) in steps.iter().zip(&mut per_packet) {
            rig.prepare(step);
            let t = Instant::now();
            for _ in 0..BURSTS_PER_PASS {
                rig.run(step, p, clock);
            }
            times.push(t.elapsed().as_nanos() as f64 / (BURSTS_PER_PASS * BURST) as f64);
        }
    }
    per_packet
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[PASSES / 2]
        })
        .collect()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let eal = Eal::init(EAL_ARGS).unwrap_or_else(|e| panic!("EAL init (root?): {e}"));
    let (mut p, cases) = models::setup("pipeline_dpdk");
    let clock = Instant::now();
    for case in [&cases.forward, &cases.nat44, &cases.nat64, &cases.metered] {
        precheck(&mut p, case, &clock);
    }

    let pool = Mempool::pktmbuf(
        &eal,
        "pd_pool",
        POOL_SIZE,
        POOL_CACHE,
        Mempool::DEFAULT_DATA_ROOM,
        None,
    )
    .unwrap();
    let ring = RingPort::new(&eal, "pd_ring", RingPort::DEFAULT_SIZE).unwrap();
    let port = |name: &str| {
        let id = Port::id_by_name(&eal, name).unwrap();
        let mut port = Port::configure(id, &pool, PortConfig::default()).unwrap();
        port.start().unwrap();
        port
    };
    let mut ring_port = ring.configure(&pool, PortConfig::default()).unwrap();
    ring_port.start().unwrap();
    let mut rig = Rig {
        pool: &pool,
        ring: &ring,
        ring_port,
        null_rx: port("net_null0"),
        null_tx: port("net_null1"),
        fill: Vec::with_capacity(BURST),
        rx: Vec::with_capacity(BURST),
        tx: Vec::with_capacity(BURST),
        ingress: vec![PortId(0); BURST],
        marks: vec![None; BURST],
        verdicts: vec![Verdict::ToHost; BURST],
        soft: (0..BURST)
            .map(|_| HeadroomBuf::new(BUF_SIZE, HEADROOM))
            .collect(),
        cursor: 0,
        unexpected: 0,
    };
    let steps = [
        Step::IoFwdNull,
        Step::IoFwdFill(&cases.forward),
        Step::Pipeline(&cases.forward),
        Step::Pipeline(&cases.nat44),
        Step::Pipeline(&cases.nat64),
        Step::Pipeline(&cases.metered),
        Step::SoftReload(&cases.forward),
        Step::Soft(&cases.forward),
        Step::Soft(&cases.nat44),
        Step::Soft(&cases.nat64),
        Step::Soft(&cases.metered),
    ];
    for step in steps {
        if let Step::Pipeline(case) = step {
            rig.cross_check(&mut p, case, &clock);
        }
    }
    // The count includes the lcore cache: every mbuf is back.
    assert_eq!(
        pool.available(),
        POOL_SIZE,
        "mbufs not returned to the pool"
    );

    let mut g = c.benchmark_group("pipeline_dpdk");
    g.throughput(Throughput::Elements(BURST as u64));
    for step in steps {
        rig.prepare(step);
        g.bench_function(step.name(), |b| {
            b.iter(|| rig.run(black_box(step), &mut p, &clock))
        });
        assert_eq!(
            rig.unexpected,
            0,
            "pipeline_dpdk/{}: packets lost or not forwarded",
            step.name()
        );
    }
    g.finish();
    c.final_summary();

    // Side by side from one loop, after criterion's runs (NAT sessions warm).
    let medians = simple_timing(&mut rig, &steps, &mut p, &clock);
    assert_eq!(rig.unexpected, 0);
    let median = |want: &str| {
        steps
            .iter()
            .zip(&medians)
            .find(|(s, _)| s.name() == want)
            .map(|(_, m)| *m)
            .unwrap()
    };
    let fill = median("io_fwd_fill");
    let reload = median("soft/reload_only");
    eprintln!(
        "pipeline_dpdk: median of {PASSES} interleaved passes x {BURSTS_PER_PASS} bursts of \
         {BURST}; own = the step minus its buffer reload (io_fwd_fill for mbufs, \
         soft/reload_only for HeadroomBuf)"
    );
    eprintln!(
        "{:<24} {:>10} {:>8} {:>13} {:>8}",
        "step", "ns/packet", "Mpps", "x io_fwd_fill", "own ns"
    );
    for (step, ns) in steps.iter().zip(&medians) {
        let own = match step {
            Step::Pipeline(_) => format!("{:.1}", ns - fill),
            Step::Soft(_) => format!("{:.1}", ns - reload),
            _ => String::new(),
        };
        eprintln!(
            "{:<24} {ns:>10.1} {:>8.2} {:>13.2} {own:>8}",
            step.name(),
            1e3 / ns,
            ns / fill
        );
    }
    let stats = rig.null_tx.stats().unwrap();
    eprintln!("pipeline_dpdk: net_null1 sent {} packets", stats.opackets);
    // Ports, then the ring, the pool and EAL.
    drop(rig);
    drop(ring);
    drop(pool);
    drop(eal);
}
