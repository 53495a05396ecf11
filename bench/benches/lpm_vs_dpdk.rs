//! Our IPv4 LPM (`flow_offload::lpm::Lpm4`) against DPDK's `rte_lpm` and `rte_fib` (DIR24_8),
//! on the same seeded 1M-route Internet-like table, in one process.
//!
//! `cargo bench -p bench --bench lpm_vs_dpdk` (as root: EAL needs it even without hugepages).
//!
//! The three tables are built from the same routes with the same next hops and checked to agree
//! on 100k keys before anything is timed. Single lookups and 32-key bulk lookups are then timed
//! over a warm 4096-key set and a cold 4M-key set, first by a simple timing loop that times the
//! five paths round-robin in short measurements (medians, 10th percentiles and ratios are
//! printed), then by criterion.
//!
//! Caveats: `rte_lpm_lookup` and `rte_lpm_lookup_bulk` are `static inline` in C; here they are
//! called through the out-of-line wrappers `dpdk-sys` generates, so each single lookup pays a
//! function call that a C caller would not. `rte_fib` has no single-key lookup. Results of our
//! `lookup_batch` are `Option<u32>` (two 4-byte stores each), those of `lookup_batch_values`
//! plain `u32`s like `rte_lpm`'s raw entries; `rte_fib` writes `u64` next hops.

use std::collections::HashSet;
use std::hint::black_box;
use std::time::Instant;

use bench::tables::{internet_v4, lookup_keys_v4};
use criterion::{Criterion, Throughput};
use dpdk::{Eal, RteFib, RteLpm};
use flow_offload::lpm::{Lpm4, LpmLimits, MAX_VALUE, NO_ROUTE};

/// Routes in the table.
const ROUTES: usize = 1_000_000;
/// Warm key set: the keys' paths stay in cache across iterations.
const KEYS: usize = 4096;
/// Cold key set: 4M keys spread over the whole table.
const COLD_KEYS: usize = 1 << 22;
/// Keys of the correctness check.
const CHECK_KEYS: usize = 100_000;
/// Keys per batch/bulk call.
const BATCH: usize = 32;
/// Rounds of the simple timing loop (each times every path once).
const ROUNDS: usize = 101;
/// Lookups per measurement of the simple timing loop.
const SLICE: usize = 1 << 18;
/// `rte_fib`'s answer for an address without a route (never a route's next hop).
const FIB_MISS: u64 = RteFib::MAX_NEXT_HOP;

const EAL_ARGS: &[&str] = &[
    "lpm_vs_dpdk",
    "-l",
    "0",
    "--no-huge",
    "--no-pci",
    "--no-shconf",
    "-m",
    "1024",
    "--log-level=*:error",
];

/// Print `msg` and stop (the workspace lints forbid `panic!`/`expect`).
fn fail(msg: &str) -> ! {
    eprintln!("lpm_vs_dpdk: {msg}");
    std::process::exit(1)
}

/// The same routes in the three implementations.
struct Tables<'eal> {
    ours: Lpm4,
    lpm: RteLpm<'eal>,
    fib: RteFib<'eal>,
}

fn build<'eal>(eal: &'eal Eal, routes: &[(u32, u8)]) -> Tables<'eal> {
    // Both DPDK tables need one tbl8 group per /24 that holds a route longer than /24.
    let tbl8_needed = routes
        .iter()
        .filter(|&&(_, l)| l > 24)
        .map(|&(a, _)| a >> 8)
        .collect::<HashSet<_>>()
        .len();
    let tbl8s = u32::try_from(tbl8_needed + tbl8_needed / 4 + 1024)
        .unwrap_or_else(|_| fail("too many tbl8 groups"));
    let max_rules =
        u32::try_from(routes.len() + 65_536).unwrap_or_else(|_| fail("too many routes"));
    eprintln!(
        "lpm_vs_dpdk: {} routes, {tbl8_needed} /24s with longer routes; tbl8 groups {tbl8s}, max_rules {max_rules}",
        routes.len()
    );

    let mut ours = Lpm4::new(LpmLimits::default());
    let mut lpm = RteLpm::new(eal, "bench_lpm4", max_rules, tbl8s)
        .unwrap_or_else(|e| fail(&format!("rte_lpm_create: {e}")));
    let mut fib = RteFib::dir24_8(eal, "bench_fib4", max_rules, tbl8s, FIB_MISS)
        .unwrap_or_else(|e| fail(&format!("rte_fib_create: {e}")));

    let mut failed = [0usize; 3];
    let mut secs = [0f64; 3];
    for (impl_i, t) in secs.iter_mut().enumerate() {
        let start = Instant::now();
        for (i, &(a, l)) in routes.iter().enumerate() {
            let v = i as u32 & MAX_VALUE;
            let err = match impl_i {
                0 => ours.insert(a, l, v).err().map(|e| format!("{e:?}")),
                1 => lpm.add(a, l, v).err().map(|e| e.to_string()),
                _ => fib.add(a, l, u64::from(v)).err().map(|e| e.to_string()),
            };
            if let Some(e) = err {
                if failed[impl_i] < 5 {
                    eprintln!(
                        "lpm_vs_dpdk: impl {impl_i}: add {:#010x}/{l} failed: {e}",
                        a
                    );
                }
                failed[impl_i] += 1;
            }
        }
        *t = start.elapsed().as_secs_f64();
    }
    eprintln!(
        "lpm_vs_dpdk: build: ours {} routes in {:.2} s ({} refused, {:.1} MiB, {:?}), rte_lpm {:.2} s ({} refused), rte_fib {:.2} s ({} refused)",
        ours.len(),
        secs[0],
        failed[0],
        ours.memory_bytes() as f64 / (1024.0 * 1024.0),
        ours.layout(),
        secs[1],
        failed[1],
        secs[2],
        failed[2],
    );
    assert_eq!(
        failed,
        [0, 0, 0],
        "routes refused by [ours, rte_lpm, rte_fib]: every implementation must take all {} routes",
        routes.len()
    );
    Tables { ours, lpm, fib }
}

/// Every implementation and lookup path must give the same next hop for every key.
fn verify(t: &Tables<'_>, keys: &[u32]) {
    let n = keys.len();
    let mut ours_batch = vec![None; n];
    t.ours.lookup_batch(keys, &mut ours_batch);
    let mut ours_values = vec![0u32; n];
    t.ours.lookup_batch_values(keys, &mut ours_values);
    let mut lpm_bulk = vec![0u32; n];
    for (k, o) in keys.chunks(BATCH).zip(lpm_bulk.chunks_mut(BATCH)) {
        t.lpm.lookup_bulk(k, o);
    }
    let mut fib_bulk = vec![0u64; n];
    for (k, o) in keys.chunks(BATCH).zip(fib_bulk.chunks_mut(BATCH)) {
        t.fib.lookup_bulk(k, o);
    }
    let mut mismatches = 0usize;
    let mut hits = 0usize;
    for (i, &k) in keys.iter().enumerate() {
        let ours = t.ours.lookup(k);
        let got = [
            ours_batch[i],
            (ours_values[i] != NO_ROUTE).then_some(ours_values[i]),
            t.lpm.lookup(k),
            RteLpm::decode(lpm_bulk[i]),
            (fib_bulk[i] != t.fib.default_nh()).then(|| fib_bulk[i] as u32),
        ];
        hits += usize::from(ours.is_some());
        if got.iter().any(|&g| g != ours) {
            if mismatches < 10 {
                eprintln!(
                    "lpm_vs_dpdk: MISMATCH key {k:#010x}: ours lookup {ours:?}, ours batch {:?}, ours batch values {:?}, rte_lpm lookup {:?}, rte_lpm bulk {:?}, rte_fib bulk {:?}",
                    got[0], got[1], got[2], got[3], got[4]
                );
            }
            mismatches += 1;
        }
    }
    eprintln!("lpm_vs_dpdk: verify: {n} keys, {hits} with a route, {mismatches} mismatches");
    assert_eq!(
        mismatches, 0,
        "ours, rte_lpm and rte_fib disagree on {mismatches} of {n} keys (see MISMATCH lines)"
    );
}

fn ours_lookup(t: &Lpm4, keys: &[u32]) {
    for &k in keys {
        black_box(t.lookup(k));
    }
}

fn ours_batch(t: &Lpm4, keys: &[u32], out: &mut [Option<u32>]) {
    for chunk in keys.chunks(BATCH) {
        t.lookup_batch(chunk, out);
        black_box(&*out);
    }
}

fn ours_values(t: &Lpm4, keys: &[u32], out: &mut [u32]) {
    for chunk in keys.chunks(BATCH) {
        t.lookup_batch_values(chunk, out);
        black_box(&*out);
    }
}

fn lpm_lookup(t: &RteLpm<'_>, keys: &[u32]) {
    for &k in keys {
        black_box(t.lookup(k));
    }
}

fn lpm_bulk(t: &RteLpm<'_>, keys: &[u32], out: &mut [u32]) {
    for chunk in keys.chunks(BATCH) {
        t.lookup_bulk(chunk, out);
        black_box(&*out);
    }
}

fn fib_bulk(t: &RteFib<'_>, keys: &[u32], out: &mut [u64]) {
    for chunk in keys.chunks(BATCH) {
        t.lookup_bulk(chunk, out);
        black_box(&*out);
    }
}

/// Quantiles of one path's measurements, ns per lookup.
struct Stats {
    median: f64,
    p10: f64,
    best: f64,
}

fn stats(mut ns: Vec<f64>) -> Stats {
    ns.sort_by(f64::total_cmp);
    let at = |q: usize| ns.get(ns.len() * q / 100).copied().unwrap_or(f64::NAN);
    Stats {
        median: at(50),
        p10: at(10),
        best: at(0),
    }
}

/// The simple timing loop over one key set; returns the summary line.
///
/// The machine is shared, so the six paths are timed in rounds, [`ROUNDS`] rounds of one
/// short measurement each (~[`SLICE`] lookups, a few ms), in a new shuffled order every
/// round: load from other processes then affects them alike, and the 10th percentile shows
/// the speed of a measurement that ran undisturbed. A warm measurement repeats the 4096 keys;
/// a cold one takes the next [`SLICE`] keys of the cold set, so that no path reuses keys
/// another path just looked up.
fn simple_timing(set: &str, t: &Tables<'_>, keys: &[u32]) -> String {
    let n = keys.len();
    let mut o_ours = vec![None; BATCH];
    let mut o_lpm = vec![0u32; BATCH];
    let mut o_fib = vec![0u64; BATCH];
    let mut o_values = vec![0u32; BATCH];
    let mut ns: Vec<Vec<f64>> = (0..6).map(|_| Vec::with_capacity(ROUNDS)).collect();
    let mut off = 0;
    let mut order: Vec<usize> = (0..ns.len()).collect();
    let mut seed = 0x2545_f491_u32;
    for round in 0..=ROUNDS {
        // A new order every round (seeded shuffle), so that no path always follows the same
        // one: a path leaves the shared caches full of its own table.
        for i in (1..order.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            order.swap(i, seed as usize % (i + 1));
        }
        for &path in &order {
            let Some(v) = ns.get_mut(path) else {
                continue;
            };
            let (ks, reps) = if n > SLICE {
                let s = keys.get(off..off + SLICE).unwrap_or(keys);
                off = if off + 2 * SLICE <= n { off + SLICE } else { 0 };
                (s, 1)
            } else {
                (keys, SLICE / n.max(1))
            };
            let start = Instant::now();
            for _ in 0..reps {
                match path {
                    0 => ours_lookup(&t.ours, black_box(ks)),
                    1 => lpm_lookup(&t.lpm, black_box(ks)),
                    2 => ours_batch(&t.ours, black_box(ks), &mut o_ours),
                    3 => lpm_bulk(&t.lpm, black_box(ks), &mut o_lpm),
                    4 => fib_bulk(&t.fib, black_box(ks), &mut o_fib),
                    _ => ours_values(&t.ours, black_box(ks), &mut o_values),
                }
            }
            // Round 0 warms up.
            if round > 0 {
                v.push(start.elapsed().as_nanos() as f64 / (ks.len() * reps) as f64);
            }
        }
    }
    let s: Vec<Stats> = ns.into_iter().map(stats).collect();
    let [ol, ll, ob, lb, fb, ov] = [&s[0], &s[1], &s[2], &s[3], &s[4], &s[5]];
    format!(
        "lpm_vs_dpdk {set} ({n} keys, {ROUNDS} shuffled rounds of ~{SLICE} lookups, ns/lookup median [p10, best]): \
         single: ours {:.2} [{:.2}, {:.2}], rte_lpm {:.2} [{:.2}, {:.2}], ours/rte_lpm {:.2} [p10 {:.2}] | \
         bulk{BATCH}: ours Option {:.2} [{:.2}, {:.2}], ours u32 {:.2} [{:.2}, {:.2}], rte_lpm {:.2} [{:.2}, {:.2}], \
         rte_fib {:.2} [{:.2}, {:.2}] | ours Option/rte_lpm {:.2} [p10 {:.2}], ours Option/rte_fib {:.2} [p10 {:.2}], \
         ours u32/rte_lpm {:.2} [p10 {:.2}], ours u32/rte_fib {:.2} [p10 {:.2}]",
        ol.median,
        ol.p10,
        ol.best,
        ll.median,
        ll.p10,
        ll.best,
        ol.median / ll.median,
        ol.p10 / ll.p10,
        ob.median,
        ob.p10,
        ob.best,
        ov.median,
        ov.p10,
        ov.best,
        lb.median,
        lb.p10,
        lb.best,
        fb.median,
        fb.p10,
        fb.best,
        ob.median / lb.median,
        ob.p10 / lb.p10,
        ob.median / fb.median,
        ob.p10 / fb.p10,
        ov.median / lb.median,
        ov.p10 / lb.p10,
        ov.median / fb.median,
        ov.p10 / fb.p10,
    )
}

fn criterion_set(c: &mut Criterion, set: &str, t: &Tables<'_>, keys: &[u32]) {
    let mut g = c.benchmark_group(format!("lpm_vs_dpdk/{set}"));
    if keys.len() > KEYS {
        g.sample_size(10);
    }
    g.throughput(Throughput::Elements(keys.len() as u64));
    g.bench_function("ours/lookup", |b| {
        b.iter(|| ours_lookup(&t.ours, black_box(keys)))
    });
    g.bench_function("rte_lpm/lookup", |b| {
        b.iter(|| lpm_lookup(&t.lpm, black_box(keys)))
    });
    let mut o_ours = vec![None; BATCH];
    g.bench_function(format!("ours/lookup_batch{BATCH}"), |b| {
        b.iter(|| ours_batch(&t.ours, black_box(keys), &mut o_ours))
    });
    let mut o_values = vec![0u32; BATCH];
    g.bench_function(format!("ours/lookup_batch_values{BATCH}"), |b| {
        b.iter(|| ours_values(&t.ours, black_box(keys), &mut o_values))
    });
    let mut o_lpm = vec![0u32; BATCH];
    g.bench_function(format!("rte_lpm/lookup_bulk{BATCH}"), |b| {
        b.iter(|| lpm_bulk(&t.lpm, black_box(keys), &mut o_lpm))
    });
    let mut o_fib = vec![0u64; BATCH];
    g.bench_function(format!("rte_fib/lookup_bulk{BATCH}"), |b| {
        b.iter(|| fib_bulk(&t.fib, black_box(keys), &mut o_fib))
    });
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let eal = Eal::init(EAL_ARGS).unwrap_or_else(|e| fail(&format!("EAL init: {e}")));

    let routes = internet_v4(ROUTES, 1);
    let tables = build(&eal, &routes);
    verify(&tables, &lookup_keys_v4(&routes, CHECK_KEYS, 4));

    let warm = lookup_keys_v4(&routes, KEYS, 2);
    let cold = lookup_keys_v4(&routes, COLD_KEYS, 3);
    let summary = [
        simple_timing("v4_warm", &tables, &warm),
        simple_timing("v4_cold", &tables, &cold),
    ];
    for line in &summary {
        eprintln!("{line}");
    }

    criterion_set(&mut c, "v4_warm", &tables, &warm);
    criterion_set(&mut c, "v4_cold", &tables, &cold);
    c.final_summary();

    for line in &summary {
        eprintln!("{line}");
    }
    // rte_lpm_free and rte_fib_free, then rte_eal_cleanup.
    drop(tables);
    drop(eal);
}
