//! Longest-prefix-match lookups and updates on Internet-sized tables.
//!
//! `cargo bench -p bench --bench lpm`

use std::hint::black_box;
use std::time::Instant;

use bench::tables::{internet_v4, internet_v6, lookup_keys_v4, lookup_keys_v6};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flow_offload::lpm::{Layout, Lpm, LpmKey, LpmLimits, MAX_VALUE};

/// Keys per timed iteration.
/// Warm: the keys' trie paths stay in cache across iterations.
const KEYS: usize = 4096;
/// Cold: 4M keys spread over the whole table, so most lookups miss the caches, like DPDK's
/// `lpm_perf_autotest` with fresh random addresses.
const COLD_KEYS: usize = 1 << 22;
/// Keys per `lookup_batch` call.
const BATCH: usize = 32;

const MIB: f64 = 1024.0 * 1024.0;

fn build<K: LpmKey>(name: &str, routes: &[(K, u8)]) -> Lpm<K> {
    let start = Instant::now();
    let mut t = Lpm::new(LpmLimits::default());
    let empty = t.memory_bytes();
    let mut failed = 0usize;
    // The slowest insert, which for a large IPv4 table is the one that promotes it.
    let mut slowest = (0f64, 0usize, Layout::Trie16);
    for (i, &(a, l)) in routes.iter().enumerate() {
        let one = Instant::now();
        if t.insert(a, l, i as u32 & MAX_VALUE).is_err() {
            failed += 1;
        }
        let secs = one.elapsed().as_secs_f64();
        if secs > slowest.0 {
            slowest = (secs, i, t.layout());
        }
    }
    eprintln!(
        "lpm {name}: {} routes ({failed} refused) in {:.2} s, layout {:?}, memory_bytes {:.2} MiB (empty table {:.2} MiB), {} groups ({:.2} MiB of groups); slowest insert {:.2} ms (route #{}, layout after {:?})",
        t.len(),
        start.elapsed().as_secs_f64(),
        t.layout(),
        t.memory_bytes() as f64 / MIB,
        empty as f64 / MIB,
        t.group_count(),
        (t.group_count() * 1024) as f64 / MIB,
        slowest.0 * 1e3,
        slowest.1,
        slowest.2,
    );
    t
}

fn bench_lookups<K: LpmKey>(c: &mut Criterion, family: &str, t: &Lpm<K>, keys: &[K]) {
    let mut g = c.benchmark_group(format!("lpm/{family}"));
    if keys.len() > KEYS {
        g.sample_size(10);
    }
    g.throughput(Throughput::Elements(keys.len() as u64));
    g.bench_function("lookup", |b| {
        b.iter(|| {
            for &k in black_box(keys) {
                black_box(t.lookup(k));
            }
        })
    });
    let mut out = vec![None; BATCH];
    g.bench_function(format!("lookup_batch{BATCH}"), |b| {
        b.iter(|| {
            for chunk in black_box(keys).chunks(BATCH) {
                t.lookup_batch(chunk, &mut out);
                black_box(&out);
            }
        })
    });
    let mut values = vec![0u32; BATCH];
    g.bench_function(format!("lookup_batch_values{BATCH}"), |b| {
        b.iter(|| {
            for chunk in black_box(keys).chunks(BATCH) {
                t.lookup_batch_values(chunk, &mut values);
                black_box(&values);
            }
        })
    });
    g.finish();
}

fn lpm(c: &mut Criterion) {
    let routes4 = internet_v4(1_000_000, 1);
    let mut v4 = build("v4", &routes4);
    let keys4 = lookup_keys_v4(&routes4, KEYS, 2);

    let routes6 = internet_v6(200_000, 1);
    let v6 = build("v6", &routes6);
    let keys6 = lookup_keys_v6(&routes6, KEYS, 2);

    bench_lookups(c, "v4", &v4, &keys4);
    bench_lookups(c, "v6", &v6, &keys6);
    bench_lookups(c, "v4_cold", &v4, &lookup_keys_v4(&routes4, COLD_KEYS, 3));
    bench_lookups(c, "v6_cold", &v6, &lookup_keys_v6(&routes6, COLD_KEYS, 3));

    // A /24 that is not in the table, in a /16 that already has a group (all of them do).
    let fresh = (0..u32::MAX)
        .map(|i| (0x0b00_0000u32.wrapping_add(i << 8), 24u8))
        .find(|&(a, l)| v4.get(a, l).is_none())
        .unwrap_or((0x0a01_0200, 24));
    let mut g = c.benchmark_group("lpm/v4");
    g.throughput(Throughput::Elements(1));
    g.bench_function("insert_remove_one", |b| {
        b.iter(|| {
            let _ = black_box(v4.insert(fresh.0, fresh.1, 7));
            let _ = black_box(v4.remove(fresh.0, fresh.1));
        })
    });
    // A /8 that is not in the table: in `Direct24` its insert and its removal each rewrite
    // the 65536 first-level entries it covers (except those of longer routes) and the
    // defaults of the groups below.
    let slash8 = (1u32..224)
        .map(|b| (b << 24, 8u8))
        .find(|&(a, l)| v4.get(a, l).is_none())
        .unwrap_or((0x0b00_0000, 8));
    g.bench_function("insert_remove_slash8", |b| {
        b.iter(|| {
            let _ = black_box(v4.insert(slash8.0, slash8.1, 7));
            let _ = black_box(v4.remove(slash8.0, slash8.1));
        })
    });
    g.finish();
}

criterion_group!(benches, lpm);
criterion_main!(benches);
