//! Seeded generators of Internet-like route tables and lookup keys.
//!
//! IPv4 prefixes are spread uniformly over the unicast space outside 0/8, 10/8, 127/8 and
//! 224/3, which is harsher on a multibit trie than the real table (real routes cluster). IPv6
//! prefixes are built like the real table: provider allocations (/29–/32) inside RIR blocks,
//! customer prefixes (/33–/64) inside allocations, so that they share their upper bits.

use std::collections::HashSet;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// IPv4 prefix-length mix, in 1/10000: /8–/15 1 %, /16–/21 18 %, /22–/23 18 %, /24 60 %,
/// /25–/32 3 %.
const V4_MIX: &[(u8, u32)] = &[
    (8, 3),
    (9, 5),
    (10, 7),
    (11, 10),
    (12, 13),
    (13, 16),
    (14, 20),
    (15, 26),
    (16, 300),
    (17, 200),
    (18, 300),
    (19, 350),
    (20, 350),
    (21, 300),
    (22, 900),
    (23, 900),
    (24, 6000),
    (25, 60),
    (26, 50),
    (27, 40),
    (28, 40),
    (29, 40),
    (30, 30),
    (31, 10),
    (32, 30),
];

/// IPv6 prefix-length mix, in 1/10000: /48 45 %, /32 10 %, /29–/31 3 %, /33–/47 32 %,
/// /56 6 %, /64 4 %.
const V6_MIX: &[(u8, u32)] = &[
    (29, 200),
    (30, 50),
    (31, 50),
    (32, 1000),
    (33, 50),
    (34, 100),
    (35, 50),
    (36, 400),
    (37, 50),
    (38, 100),
    (39, 100),
    (40, 600),
    (41, 100),
    (42, 150),
    (43, 100),
    (44, 800),
    (45, 150),
    (46, 250),
    (47, 200),
    (48, 4500),
    (56, 600),
    (64, 400),
];

/// RIR blocks `(prefix, len, weight)` that IPv6 allocations are drawn from.
const V6_RIR_BLOCKS: &[(u128, u8, u32)] = &[
    (0x2001 << 112, 16, 10),
    (0x2400 << 112, 12, 20),
    (0x2600 << 112, 12, 20),
    (0x2800 << 112, 12, 8),
    (0x2a00 << 112, 12, 25),
    (0x2a10 << 112, 12, 7),
    (0x2c00 << 112, 12, 3),
    (0x2003 << 112, 16, 2),
];

/// Draws a prefix length from a mix.
fn pick_len(rng: &mut SmallRng, mix: &[(u8, u32)]) -> u8 {
    let total: u32 = mix.iter().map(|&(_, w)| w).sum();
    let mut x = rng.gen_range(0..total.max(1));
    for &(len, w) in mix {
        if x < w {
            return len;
        }
        x -= w;
    }
    mix.last().map_or(0, |&(len, _)| len)
}

fn mask4(len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0)
}

fn mask6(len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0)
}

/// Whether an IPv4 prefix avoids 0/8, 10/8, 127/8 and 224/3 (needs `len >= 8`).
fn v4_allowed(addr: u32) -> bool {
    let first = addr >> 24;
    first != 0 && first != 10 && first != 127 && first < 224
}

/// `n` distinct IPv4 prefixes (host bits zero) with an Internet-like length mix.
///
/// Returns fewer only if the space runs out, which does not happen for realistic `n`.
pub fn internet_v4(n: usize, seed: u64) -> Vec<(u32, u8)> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    let mut budget = n.saturating_mul(64).saturating_add(1024);
    while out.len() < n && budget > 0 {
        let len = pick_len(&mut rng, V4_MIX);
        // A few tries per length: short lengths run out of room in large tables.
        for _ in 0..16 {
            budget = budget.saturating_sub(1);
            let addr = rng.gen::<u32>() & mask4(len);
            if v4_allowed(addr) && seen.insert((addr, len)) {
                out.push((addr, len));
                break;
            }
        }
    }
    out
}

/// `n` distinct IPv6 prefixes (host bits zero) within 2000::/3, with an Internet-like
/// length mix and structure.
///
/// Returns fewer only if the space runs out, which does not happen for realistic `n`.
pub fn internet_v6(n: usize, seed: u64) -> Vec<(u128, u8)> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let total_w: u32 = V6_RIR_BLOCKS.iter().map(|b| b.2).sum();
    // Provider allocations: mostly /32, some /29.
    let allocations: Vec<(u128, u8)> = (0..(n / 6).max(16))
        .map(|_| {
            let mut x = rng.gen_range(0..total_w);
            let mut block = (0x2001 << 112, 16);
            for &(p, l, w) in V6_RIR_BLOCKS {
                if x < w {
                    block = (p, l);
                    break;
                }
                x -= w;
            }
            let len = if rng.gen_bool(0.8) { 32 } else { 29 };
            let addr = block.0 | (rng.gen::<u128>() & !mask6(block.1));
            (addr & mask6(len), len)
        })
        .collect();

    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    let mut budget = n.saturating_mul(64).saturating_add(1024);
    while out.len() < n && budget > 0 {
        let len = pick_len(&mut rng, V6_MIX);
        for _ in 0..16 {
            budget = budget.saturating_sub(1);
            let addr = v6_candidate(&mut rng, &allocations) & mask6(len);
            if seen.insert((addr, len)) {
                out.push((addr, len));
                break;
            }
        }
    }
    out
}

/// A full address inside a random allocation, with the site and subnet numbering of real
/// networks.
fn v6_candidate(rng: &mut SmallRng, allocations: &[(u128, u8)]) -> u128 {
    let (alloc, alloc_len) = allocations[rng.gen_range(0..allocations.len())];
    // Sites (/48) are mostly numbered from the start of the allocation.
    let site: u128 = if rng.gen_bool(0.75) {
        rng.gen_range(0..1024)
    } else {
        rng.gen_range(0..1 << 16)
    };
    // Subnets (/64) mostly low too.
    let subnet: u128 = if rng.gen_bool(0.75) {
        rng.gen_range(0..256)
    } else {
        rng.gen_range(0..1 << 16)
    };
    alloc
        | (rng.gen::<u128>() & !mask6(alloc_len) & mask6(32))
        | (site << 80)
        | (subnet << 64)
        | (rng.gen::<u128>() & !mask6(64))
}

/// `n` IPv4 lookup keys: 90 % inside a random route (random host bits), 10 % random.
pub fn lookup_keys_v4(routes: &[(u32, u8)], n: usize, seed: u64) -> Vec<u32> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let r: u32 = rng.gen();
            if routes.is_empty() || rng.gen_bool(0.1) {
                return r;
            }
            let (addr, len) = routes[rng.gen_range(0..routes.len())];
            addr | (r & !mask4(len))
        })
        .collect()
}

/// `n` IPv6 lookup keys: 90 % inside a random route (random host bits), 10 % random.
pub fn lookup_keys_v6(routes: &[(u128, u8)], n: usize, seed: u64) -> Vec<u128> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let r: u128 = rng.gen();
            if routes.is_empty() || rng.gen_bool(0.1) {
                return r;
            }
            let (addr, len) = routes[rng.gen_range(0..routes.len())];
            addr | (r & !mask6(len))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use flow_offload::lpm::{Lpm4, Lpm6};

    fn fraction<K>(routes: &[(K, u8)], lens: std::ops::RangeInclusive<u8>) -> f64 {
        routes.iter().filter(|r| lens.contains(&r.1)).count() as f64 / routes.len() as f64
    }

    fn assert_near(got: f64, want: f64, what: &str) {
        assert!(
            (got - want).abs() <= want * 0.1 + 0.002,
            "{what}: {got:.4}, want {want}"
        );
    }

    #[test]
    fn v4_mix_and_shape() {
        let r = internet_v4(200_000, 7);
        assert_eq!(r.len(), 200_000);
        let set: HashSet<_> = r.iter().copied().collect();
        assert_eq!(set.len(), r.len(), "duplicates");
        for &(a, l) in &r {
            assert_eq!(a & !mask4(l), 0, "host bits in {a:#x}/{l}");
            assert!(v4_allowed(a), "reserved range {a:#x}/{l}");
            assert!((8..=32).contains(&l));
        }
        assert_near(fraction(&r, 24..=24), 0.60, "/24");
        assert_near(fraction(&r, 22..=23), 0.18, "/22-/23");
        assert_near(fraction(&r, 16..=21), 0.18, "/16-/21");
        assert_near(fraction(&r, 8..=15), 0.01, "/8-/15");
        assert_near(fraction(&r, 25..=32), 0.03, "/25-/32");
        assert_eq!(internet_v4(1000, 7), internet_v4(1000, 7));
        assert_ne!(internet_v4(1000, 7), internet_v4(1000, 8));
    }

    #[test]
    fn v6_mix_and_shape() {
        let r = internet_v6(100_000, 7);
        assert_eq!(r.len(), 100_000);
        let set: HashSet<_> = r.iter().copied().collect();
        assert_eq!(set.len(), r.len(), "duplicates");
        for &(a, l) in &r {
            assert_eq!(a & !mask6(l), 0, "host bits in {a:#x}/{l}");
            assert_eq!(a >> 125, 1, "outside 2000::/3: {a:#x}/{l}");
        }
        assert_near(fraction(&r, 48..=48), 0.45, "/48");
        assert_near(fraction(&r, 32..=32), 0.10, "/32");
        assert_near(fraction(&r, 29..=31), 0.03, "/29-/31");
        assert_near(fraction(&r, 33..=47), 0.32, "/33-/47");
        assert_near(fraction(&r, 56..=56), 0.06, "/56");
        assert_near(fraction(&r, 64..=64), 0.04, "/64");
        assert_eq!(internet_v6(1000, 7), internet_v6(1000, 7));
    }

    #[test]
    fn keys_mostly_hit_routes() {
        let r4 = internet_v4(50_000, 1);
        let mut t4 = Lpm4::default();
        for (i, &(a, l)) in r4.iter().enumerate() {
            t4.insert(a, l, i as u32).unwrap();
        }
        let k4 = lookup_keys_v4(&r4, 20_000, 2);
        assert_eq!(k4.len(), 20_000);
        let hits = k4.iter().filter(|&&k| t4.lookup(k).is_some()).count();
        assert!(hits >= 17_600, "{hits}");

        let r6 = internet_v6(50_000, 1);
        let mut t6 = Lpm6::default();
        for (i, &(a, l)) in r6.iter().enumerate() {
            t6.insert(a, l, i as u32).unwrap();
        }
        let k6 = lookup_keys_v6(&r6, 20_000, 2);
        let hits = k6.iter().filter(|&&k| t6.lookup(k).is_some()).count();
        assert!((17_600..=18_600).contains(&hits), "{hits}");
        assert_eq!(lookup_keys_v6(&r6, 10, 2), k6[..10]);
    }
}
