//! Software meters: RFC 2697 single-rate and RFC 2698 two-rate three-colour markers, both in
//! colour-blind mode, plus a bounded table of meters with per-meter colour counters.
//!
//! # Arithmetic
//!
//! The per-packet path uses integers only. Tokens are kept in *nano-bytes* (1 byte =
//! 10⁹ units) in `u128`. Refilling after `elapsed_ns` nanoseconds at `rate` bytes/s adds
//! `rate × elapsed_ns` units — exactly `rate × elapsed_ns / 10⁹` bytes with no division and no
//! rounding. Because both factors are `u64`, the product always fits in `u128`
//! (`(2⁶⁴−1)² < 2¹²⁸`), so any rate (400 Gbit/s is 5·10¹⁰ B/s) and any elapsed time (up to the
//! full `u64` range of nanoseconds, about 584 years) is exact without overflow. Adding the
//! refill to a bucket saturates and is then clamped at the bucket size, which is the "cap the
//! elapsed time so buckets saturate" behaviour: a long idle period simply leaves the buckets
//! full. A packet of `len` bytes needs `len × 10⁹` units.
//!
//! # Time
//!
//! Time comes in as `now_ns`. A timestamp earlier than the last one seen (clocks of different
//! lcores, a stepped clock) counts as zero elapsed time and does *not* move the meter's notion
//! of "last update" backwards, so the interval is never credited twice.
//!
//! # Table layout
//!
//! [`MeterTable`] preallocates everything in [`MeterTable::new`]: a slot array of
//! `capacity` entries, a free list of slot numbers, and an open-addressing index (linear
//! probing, power-of-two size at least twice the capacity so the load factor stays ≤ ½) that
//! maps a [`MeterId`] to its slot. Lookups are O(1) expected; removal uses backward-shift
//! deletion, so there are no tombstones and probe sequences never degrade. Nothing allocates
//! after `new`.

use crate::model::MeterProfile;
use serde::{Deserialize, Serialize};

/// Token units per byte (tokens are nano-bytes).
const UNITS_PER_BYTE: u128 = 1_000_000_000;

/// The colour a meter assigns to a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Color {
    /// Within the committed rate and burst.
    Green,
    /// Above the committed, within the excess (srTCM) or peak (trTCM) allowance.
    Yellow,
    /// Beyond every allowance.
    Red,
}

fn units(bytes: u64) -> u128 {
    u128::from(bytes) * UNITS_PER_BYTE
}

/// Adds `add` to a bucket of size `cap`, returning the new level and the part that spilled.
fn fill(level: u128, add: u128, cap: u128) -> (u128, u128) {
    let space = cap.saturating_sub(level);
    if add <= space {
        (level + add, 0)
    } else {
        (cap.max(level), add - space)
    }
}

/// One three-colour marker, colour-blind.
///
/// Holds the profile, two token counters in nano-bytes and the time of the last update. The
/// counters are (Tc, Te) for srTCM and (Tc, Tp) for trTCM; bucket sizes are derived from the
/// profile when needed, which keeps the struct small for large tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meter {
    profile: MeterProfile,
    /// Tc: the committed bucket.
    committed: u128,
    /// Te (srTCM) or Tp (trTCM).
    other: u128,
    last_ns: u64,
}

impl Meter {
    /// A meter with both buckets full, as both RFCs specify, last updated at `now_ns`.
    pub fn new(profile: MeterProfile, now_ns: u64) -> Self {
        let (committed, other) = match profile {
            MeterProfile::SrTcm { cbs, ebs, .. } => (units(cbs), units(ebs)),
            MeterProfile::TrTcm { cbs, pbs, .. } => (units(cbs), units(pbs)),
        };
        Self {
            profile,
            committed,
            other,
            last_ns: now_ns,
        }
    }

    /// The profile this meter was built from.
    pub fn profile(&self) -> MeterProfile {
        self.profile
    }

    /// Whole bytes currently in the (committed, excess-or-peak) buckets: (Tc, Te) for srTCM,
    /// (Tc, Tp) for trTCM.
    pub fn tokens(&self) -> (u64, u64) {
        let whole = |u: u128| u64::try_from(u / UNITS_PER_BYTE).unwrap_or(u64::MAX);
        (whole(self.committed), whole(self.other))
    }

    /// Brings the buckets up to `now_ns`.
    fn refill(&mut self, now_ns: u64) {
        // Time going backwards counts as no time at all; `last_ns` never decreases.
        let elapsed = now_ns.saturating_sub(self.last_ns);
        if elapsed == 0 {
            return;
        }
        self.last_ns = now_ns;
        let elapsed = u128::from(elapsed);
        match self.profile {
            MeterProfile::SrTcm { cir, cbs, ebs } => {
                // RFC 2697 §3: tokens arrive at CIR; they go to C while Tc < CBS, then to E
                // while Te < EBS, otherwise they are discarded.
                let (tc, spill) = fill(self.committed, u128::from(cir) * elapsed, units(cbs));
                self.committed = tc;
                if spill > 0 {
                    self.other = fill(self.other, spill, units(ebs)).0;
                }
            }
            MeterProfile::TrTcm { cir, cbs, pir, pbs } => {
                // RFC 2698 §3: Tp grows at PIR up to PBS, Tc at CIR up to CBS, independently.
                self.other = fill(self.other, u128::from(pir) * elapsed, units(pbs)).0;
                self.committed = fill(self.committed, u128::from(cir) * elapsed, units(cbs)).0;
            }
        }
    }

    /// Colours a packet of `len` bytes arriving at `now_ns` and takes its tokens.
    ///
    /// srTCM (RFC 2697 §3, colour-blind): green if `Tc ≥ B` (Tc −= B), else yellow if
    /// `Te ≥ B` (Te −= B), else red (no bucket touched).
    ///
    /// trTCM (RFC 2698 §3, colour-blind): red if `Tp < B` (no bucket touched), else yellow if
    /// `Tc < B` (Tp −= B), else green (Tp −= B and Tc −= B).
    pub fn color(&mut self, len: u32, now_ns: u64) -> Color {
        self.refill(now_ns);
        let need = u128::from(len) * UNITS_PER_BYTE;
        match self.profile {
            MeterProfile::SrTcm { .. } => {
                if self.committed >= need {
                    self.committed -= need;
                    Color::Green
                } else if self.other >= need {
                    self.other -= need;
                    Color::Yellow
                } else {
                    Color::Red
                }
            }
            MeterProfile::TrTcm { .. } => {
                if self.other < need {
                    Color::Red
                } else if self.committed < need {
                    self.other -= need;
                    Color::Yellow
                } else {
                    self.other -= need;
                    self.committed -= need;
                    Color::Green
                }
            }
        }
    }
}

/// Identifier of a meter in a [`MeterTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MeterId(pub u32);

/// Per-meter counters of coloured traffic. Counters wrap on overflow, like hardware counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MeterStats {
    /// Packets marked green.
    pub green_packets: u64,
    /// Bytes marked green.
    pub green_bytes: u64,
    /// Packets marked yellow.
    pub yellow_packets: u64,
    /// Bytes marked yellow.
    pub yellow_bytes: u64,
    /// Packets marked red.
    pub red_packets: u64,
    /// Bytes marked red.
    pub red_bytes: u64,
}

impl MeterStats {
    fn record(&mut self, color: Color, len: u32) {
        let (packets, bytes) = match color {
            Color::Green => (&mut self.green_packets, &mut self.green_bytes),
            Color::Yellow => (&mut self.yellow_packets, &mut self.yellow_bytes),
            Color::Red => (&mut self.red_packets, &mut self.red_bytes),
        };
        *packets = packets.wrapping_add(1);
        *bytes = bytes.wrapping_add(u64::from(len));
    }
}

/// Errors from [`MeterTable`] management.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MeterError {
    /// The table already holds `capacity` meters.
    #[error("meter table is full ({capacity} meters)")]
    Full {
        /// The table's capacity.
        capacity: usize,
    },
    /// A meter with this id already exists.
    #[error("meter {} already exists", id.0)]
    Duplicate {
        /// The id that was inserted twice.
        id: MeterId,
    },
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    id: MeterId,
    meter: Meter,
    stats: MeterStats,
}

/// Marks an empty index cell.
const EMPTY: u32 = u32::MAX;

/// A bounded, preallocated set of meters addressed by [`MeterId`]; see the module docs for
/// the layout.
#[derive(Debug)]
pub struct MeterTable {
    slots: Vec<Option<Entry>>,
    free: Vec<u32>,
    /// Open-addressing index: each cell is `EMPTY` or a slot number.
    index: Vec<u32>,
    mask: usize,
    len: usize,
}

impl MeterTable {
    /// Largest supported capacity; larger requests are clamped to it.
    pub const MAX_CAPACITY: usize = 1 << 20;

    /// A table for up to `capacity` meters (clamped to [`Self::MAX_CAPACITY`]), with all
    /// storage allocated now.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.min(Self::MAX_CAPACITY);
        let index_len = (capacity * 2).next_power_of_two().max(2);
        let mut slots = Vec::with_capacity(capacity);
        slots.resize_with(capacity, || None);
        // Pop order hands out slot 0 first.
        let free = (0..capacity)
            .rev()
            .filter_map(|s| u32::try_from(s).ok())
            .collect();
        Self {
            slots,
            free,
            index: vec![EMPTY; index_len],
            mask: index_len - 1,
            len: 0,
        }
    }

    /// Maximum number of meters.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Number of meters present.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table holds no meters.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn home(&self, id: MeterId) -> usize {
        // Fibonacci hashing: multiply by 2^32/φ and keep the high bits via the mask after a
        // fold, which spreads sequential ids well.
        let h = u64::from(id.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((h >> 32) ^ h) as usize & self.mask
    }

    fn slot_id(&self, slot: u32) -> Option<MeterId> {
        self.slots
            .get(slot as usize)
            .and_then(|e| e.as_ref())
            .map(|e| e.id)
    }

    /// Index cell holding `id`, if present.
    fn find(&self, id: MeterId) -> Option<usize> {
        let mut pos = self.home(id);
        // The load factor is at most ½, so an EMPTY cell is always reached; the bound is a
        // belt-and-braces guarantee of termination.
        for _ in 0..self.index.len() {
            let cell = *self.index.get(pos)?;
            if cell == EMPTY {
                return None;
            }
            if self.slot_id(cell) == Some(id) {
                return Some(pos);
            }
            pos = (pos + 1) & self.mask;
        }
        None
    }

    fn entry(&self, id: MeterId) -> Option<&Entry> {
        let pos = self.find(id)?;
        let slot = *self.index.get(pos)?;
        self.slots.get(slot as usize)?.as_ref()
    }

    fn entry_mut(&mut self, id: MeterId) -> Option<&mut Entry> {
        let pos = self.find(id)?;
        let slot = *self.index.get(pos)?;
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    /// Adds a meter with full buckets at `now_ns` and zeroed counters.
    pub fn insert(
        &mut self,
        id: MeterId,
        profile: MeterProfile,
        now_ns: u64,
    ) -> Result<(), MeterError> {
        if self.find(id).is_some() {
            return Err(MeterError::Duplicate { id });
        }
        let full = MeterError::Full {
            capacity: self.capacity(),
        };
        // Find the index cell first so a failure leaves the table untouched.
        let mut pos = self.home(id);
        let mut found = None;
        for _ in 0..self.index.len() {
            if self.index.get(pos) == Some(&EMPTY) {
                found = Some(pos);
                break;
            }
            pos = (pos + 1) & self.mask;
        }
        let Some(pos) = found else {
            return Err(full);
        };
        let Some(slot) = self.free.pop() else {
            return Err(full);
        };
        let (Some(cell), Some(entry)) =
            (self.index.get_mut(pos), self.slots.get_mut(slot as usize))
        else {
            self.free.push(slot);
            return Err(full);
        };
        *cell = slot;
        *entry = Some(Entry {
            id,
            meter: Meter::new(profile, now_ns),
            stats: MeterStats::default(),
        });
        self.len += 1;
        Ok(())
    }

    /// Removes a meter, returning its final counters.
    pub fn remove(&mut self, id: MeterId) -> Option<MeterStats> {
        let mut hole = self.find(id)?;
        let slot = *self.index.get(hole)?;
        let entry = self.slots.get_mut(slot as usize)?.take()?;
        self.free.push(slot);
        self.len -= 1;
        // Backward-shift deletion: pull later members of the probe run into the hole when
        // their home position allows it, so lookups never need tombstones.
        let mut next = (hole + 1) & self.mask;
        for _ in 0..self.index.len() {
            let cell = self.index.get(next).copied().unwrap_or(EMPTY);
            if cell == EMPTY {
                break;
            }
            let home = self.slot_id(cell).map_or(next, |cid| self.home(cid));
            // Distance from `home` to the hole vs. to `next`, cyclically: the entry may move
            // into the hole iff the hole lies on its probe path (between home and next).
            let to_hole = hole.wrapping_sub(home) & self.mask;
            let to_next = next.wrapping_sub(home) & self.mask;
            if to_hole < to_next {
                if let Some(h) = self.index.get_mut(hole) {
                    *h = cell;
                }
                hole = next;
            }
            next = (next + 1) & self.mask;
        }
        if let Some(h) = self.index.get_mut(hole) {
            *h = EMPTY;
        }
        Some(entry.stats)
    }

    /// Whether a meter with this id exists.
    pub fn contains(&self, id: MeterId) -> bool {
        self.find(id).is_some()
    }

    /// The meter with this id.
    pub fn get(&self, id: MeterId) -> Option<&Meter> {
        self.entry(id).map(|e| &e.meter)
    }

    /// The meter with this id, mutably (e.g. to colour without counting).
    pub fn get_mut(&mut self, id: MeterId) -> Option<&mut Meter> {
        self.entry_mut(id).map(|e| &mut e.meter)
    }

    /// The counters of the meter with this id.
    pub fn stats(&self, id: MeterId) -> Option<MeterStats> {
        self.entry(id).map(|e| e.stats)
    }

    /// Colours a packet with meter `id` and counts it; `None` if there is no such meter.
    pub fn color(&mut self, id: MeterId, len: u32, now_ns: u64) -> Option<Color> {
        let entry = self.entry_mut(id)?;
        let color = entry.meter.color(len, now_ns);
        entry.stats.record(color, len);
        Some(color)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;

    fn sr(cir: u64, cbs: u64, ebs: u64) -> MeterProfile {
        MeterProfile::SrTcm { cir, cbs, ebs }
    }

    fn tr(cir: u64, cbs: u64, pir: u64, pbs: u64) -> MeterProfile {
        MeterProfile::TrTcm { cir, cbs, pir, pbs }
    }

    /// Sends `len`-byte packets at `rate` bytes/s for `secs` seconds from t = 0, returning
    /// bytes per colour (green, yellow, red).
    fn drive(m: &mut Meter, rate: u64, len: u32, secs: u64) -> (u64, u64, u64) {
        let gap_ns = u64::from(len) * SEC / rate;
        let n = secs * SEC / gap_ns;
        let (mut g, mut y, mut r) = (0, 0, 0);
        for i in 0..n {
            match m.color(len, i * gap_ns) {
                Color::Green => g += u64::from(len),
                Color::Yellow => y += u64::from(len),
                Color::Red => r += u64::from(len),
            }
        }
        (g, y, r)
    }

    fn within(actual: u64, expected: u64, pct: f64) -> bool {
        let diff = (actual as f64 - expected as f64).abs();
        diff <= expected as f64 * pct / 100.0
    }

    #[test]
    fn buckets_start_full() {
        let m = Meter::new(sr(1000, 3000, 5000), 7);
        assert_eq!(m.tokens(), (3000, 5000));
        let m = Meter::new(tr(1000, 3000, 2000, 6000), 7);
        assert_eq!(m.tokens(), (3000, 6000));
    }

    #[test]
    fn srtcm_burst_then_steady_state() {
        let cir = 1_250_000; // 10 Mbit/s
        let cbs = 100_000;
        let mut m = Meter::new(sr(cir, cbs, 0), 0);
        let (g, y, r) = drive(&mut m, 2 * cir, 1000, 10);
        assert!(within(g, cir * 10 + cbs, 1.0), "green {g}");
        assert_eq!(y, 0);
        assert!(within(r, cir * 10 - cbs, 1.0), "red {r}");
    }

    #[test]
    fn trtcm_burst_then_steady_state() {
        let cir = 1_250_000;
        let cbs = 100_000;
        let mut m = Meter::new(tr(cir, cbs, 10 * cir, 200_000), 0);
        let (g, _, _) = drive(&mut m, 2 * cir, 1000, 10);
        assert!(within(g, cir * 10 + cbs, 1.0), "green {g}");
    }

    #[test]
    fn trtcm_flood_above_pir() {
        let cir = 1_000_000;
        let pir = 2_000_000;
        let (cbs, pbs) = (20_000, 40_000);
        let mut m = Meter::new(tr(cir, cbs, pir, pbs), 0);
        // 3 × PIR for 10 s.
        let (g, y, r) = drive(&mut m, 3 * pir, 500, 10);
        let total = g + y + r;
        assert!(within(total, 3 * pir * 10, 0.1), "total {total}");
        assert!(within(g, cir * 10 + cbs, 1.0), "green {g}");
        // Everything within PIR that is not green is yellow.
        assert!(within(g + y, pir * 10 + pbs, 1.0), "green+yellow {}", g + y);
        assert!(within(r, total - pir * 10 - pbs, 1.0), "red {r}");
        // Roughly two thirds red.
        let share = r as f64 / total as f64;
        assert!((share - 2.0 / 3.0).abs() < 0.01, "red share {share}");
    }

    #[test]
    fn srtcm_excess_bucket_gives_yellow() {
        let mut m = Meter::new(sr(1000, 1500, 3000), 0);
        assert_eq!(m.color(1500, 0), Color::Green); // Tc 1500 → 0
        assert_eq!(m.color(1500, 0), Color::Yellow); // Te 3000 → 1500
        assert_eq!(m.color(1000, 0), Color::Yellow); // Te → 500
        assert_eq!(m.color(1000, 0), Color::Red); // nothing touched
        assert_eq!(m.tokens(), (0, 500));
        // A red packet takes nothing: a smaller packet still fits E.
        assert_eq!(m.color(500, 0), Color::Yellow);
        // Refill goes to C first: 1 s at CIR 1000 = 1000 bytes, all into C.
        assert_eq!(m.color(1, SEC), Color::Green);
        assert_eq!(m.tokens(), (999, 0));
        // 10 s more: C fills (501 to 1500), the remaining 9499 spill into E (capped at 3000).
        assert_eq!(m.color(1, 11 * SEC), Color::Green);
        assert_eq!(m.tokens(), (1499, 3000));
    }

    #[test]
    fn srtcm_green_checked_before_yellow_and_red_leaves_buckets() {
        // A packet larger than C but within E is yellow and does not touch C.
        let mut m = Meter::new(sr(0, 100, 1000), 0);
        assert_eq!(m.color(200, 0), Color::Yellow);
        assert_eq!(m.tokens(), (100, 800));
        assert_eq!(m.color(5000, 0), Color::Red);
        assert_eq!(m.tokens(), (100, 800));
    }

    #[test]
    fn trtcm_order_of_checks() {
        let mut m = Meter::new(tr(0, 1000, 0, 1500), 0);
        // Tp ≥ B and Tc ≥ B: green, both decremented.
        assert_eq!(m.color(800, 0), Color::Green);
        assert_eq!(m.tokens(), (200, 700));
        // Tp ≥ B, Tc < B: yellow, only Tp decremented.
        assert_eq!(m.color(500, 0), Color::Yellow);
        assert_eq!(m.tokens(), (200, 200));
        // Tp < B: red and nothing decremented, even though Tc could cover the packet.
        let mut m = Meter::new(tr(0, 1000, 0, 100), 0);
        assert_eq!(m.color(500, 0), Color::Red);
        assert_eq!(m.tokens(), (1000, 100));
    }

    #[test]
    fn zero_elapsed_time_adds_nothing() {
        let mut m = Meter::new(sr(1_000_000_000, 1000, 0), 5 * SEC);
        assert_eq!(m.color(1000, 5 * SEC), Color::Green);
        assert_eq!(m.color(1, 5 * SEC), Color::Red);
        // One nanosecond at 1 GB/s is exactly one byte.
        assert_eq!(m.color(1, 5 * SEC + 1), Color::Green);
        assert_eq!(m.color(1, 5 * SEC + 1), Color::Red);
    }

    #[test]
    fn sub_byte_refill_is_exact() {
        // 3 bytes/s: after 1/3 s exactly one byte, never lost to rounding.
        let mut m = Meter::new(sr(3, 1, 0), 0);
        assert_eq!(m.color(1, 0), Color::Green);
        assert_eq!(m.color(1, 333_333_333), Color::Red); // 0.999999999 byte
        assert_eq!(m.color(1, 333_333_334), Color::Green); // 1.000000002 bytes
    }

    #[test]
    fn time_going_backwards_is_zero_elapsed() {
        let mut m = Meter::new(tr(1000, 1000, 2000, 2000), 10 * SEC);
        assert_eq!(m.color(1000, 10 * SEC), Color::Green);
        assert_eq!(m.tokens(), (0, 1000));
        // Backwards: nothing added.
        assert_eq!(m.color(1000, 3 * SEC), Color::Yellow);
        assert_eq!(m.tokens(), (0, 0));
        // Back to 10 s: still nothing — the interval 3..10 s is not credited.
        assert_eq!(m.color(1, 10 * SEC), Color::Red);
        // Half a second later: 500 committed, 1000 peak.
        assert_eq!(m.color(500, 10 * SEC + SEC / 2), Color::Green);
        assert_eq!(m.tokens(), (0, 500));
    }

    #[test]
    fn huge_elapsed_time_saturates_without_overflow() {
        let max = u64::MAX;
        let mut m = Meter::new(sr(max, max, max), 0);
        assert_eq!(m.color(u32::MAX, 0), Color::Green);
        assert_eq!(m.color(u32::MAX, max), Color::Green);
        assert_eq!(m.tokens(), (max - u64::from(u32::MAX), max));
        let mut m = Meter::new(tr(max, max, max, max), 0);
        assert_eq!(m.color(u32::MAX, max), Color::Green);
        // 400 Gbit/s for hours after draining.
        let rate = 50_000_000_000;
        let mut m = Meter::new(sr(rate, 1 << 20, 1 << 20), 0);
        assert_eq!(m.color(u32::MAX, 0), Color::Red);
        assert_eq!(m.color(1 << 20, 0), Color::Green);
        assert_eq!(m.color(1 << 20, 0), Color::Yellow);
        assert_eq!(m.color(1, 0), Color::Red);
        assert_eq!(m.tokens(), (0, 0));
        m.color(0, 5 * 3600 * SEC);
        assert_eq!(m.tokens(), (1 << 20, 1 << 20));
        let mut m = Meter::new(tr(rate, 1 << 20, 2 * rate, 1 << 21), 0);
        assert_eq!(m.color(1 << 21, 0), Color::Yellow);
        assert_eq!(m.tokens(), (1 << 20, 0));
        assert_eq!(m.color(1 << 20, 5 * 3600 * SEC), Color::Green);
        assert_eq!(m.tokens(), (0, 1 << 20));
    }

    #[test]
    fn zero_length_packets_are_green() {
        let mut m = Meter::new(sr(0, 0, 0), 0);
        assert_eq!(m.color(0, 0), Color::Green);
        assert_eq!(m.color(1, 0), Color::Red);
    }

    #[test]
    fn table_insert_color_stats_remove() {
        let mut t = MeterTable::new(2);
        assert!(t.is_empty());
        t.insert(MeterId(7), sr(0, 1000, 500), 0).unwrap();
        assert_eq!(
            t.insert(MeterId(7), sr(0, 1, 1), 0),
            Err(MeterError::Duplicate { id: MeterId(7) })
        );
        t.insert(MeterId(9), tr(0, 10, 0, 10), 0).unwrap();
        assert_eq!(
            t.insert(MeterId(11), sr(0, 1, 1), 0),
            Err(MeterError::Full { capacity: 2 })
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t.color(MeterId(7), 600, 0), Some(Color::Green));
        assert_eq!(t.color(MeterId(7), 600, 0), Some(Color::Red));
        assert_eq!(t.color(MeterId(7), 400, 0), Some(Color::Green));
        assert_eq!(t.color(MeterId(7), 400, 0), Some(Color::Yellow));
        assert_eq!(t.color(MeterId(8), 1, 0), None);
        let s = t.stats(MeterId(7)).unwrap();
        assert_eq!(
            s,
            MeterStats {
                green_packets: 2,
                green_bytes: 1000,
                yellow_packets: 1,
                yellow_bytes: 400,
                red_packets: 1,
                red_bytes: 600,
            }
        );
        assert_eq!(t.get(MeterId(9)).unwrap().profile(), tr(0, 10, 0, 10));
        assert_eq!(t.get_mut(MeterId(9)).unwrap().color(11, 0), Color::Red);
        assert_eq!(t.stats(MeterId(9)), Some(MeterStats::default()));
        assert_eq!(t.remove(MeterId(7)), Some(s));
        assert_eq!(t.remove(MeterId(7)), None);
        assert!(!t.contains(MeterId(7)));
        t.insert(MeterId(11), sr(0, 1, 1), 0).unwrap();
        assert!(t.contains(MeterId(9)) && t.contains(MeterId(11)));
    }

    #[test]
    fn table_zero_capacity() {
        let mut t = MeterTable::new(0);
        assert_eq!(
            t.insert(MeterId(0), sr(1, 1, 1), 0),
            Err(MeterError::Full { capacity: 0 })
        );
        assert_eq!(t.color(MeterId(0), 1, 0), None);
        assert_eq!(t.remove(MeterId(0)), None);
    }

    #[test]
    fn table_huge_capacity_is_clamped() {
        let t = MeterTable::new(usize::MAX);
        assert_eq!(t.capacity(), MeterTable::MAX_CAPACITY);
    }

    proptest! {
        #[test]
        fn table_matches_reference_map(ops in proptest::collection::vec((0u8..3, 0u32..40), 0..300)) {
            let mut t = MeterTable::new(16);
            let mut reference = std::collections::BTreeSet::new();
            for (op, id) in ops {
                let id = MeterId(id);
                match op {
                    0 => {
                        let r = t.insert(id, sr(0, 1, 1), 0);
                        if reference.contains(&id) {
                            prop_assert_eq!(r, Err(MeterError::Duplicate { id }));
                        } else if reference.len() == 16 {
                            prop_assert_eq!(r, Err(MeterError::Full { capacity: 16 }));
                        } else {
                            prop_assert_eq!(r, Ok(()));
                            reference.insert(id);
                        }
                    }
                    1 => prop_assert_eq!(t.remove(id).is_some(), reference.remove(&id)),
                    _ => prop_assert_eq!(t.contains(id), reference.contains(&id)),
                }
                prop_assert_eq!(t.len(), reference.len());
                for probe in 0..40 {
                    prop_assert_eq!(t.contains(MeterId(probe)), reference.contains(&MeterId(probe)));
                }
            }
        }

        #[test]
        fn green_never_exceeds_committed_allowance(
            cir in 0u64..10_000_000,
            cbs in 0u64..100_000,
            excess in 0u64..100_000,
            two_rate in any::<bool>(),
            start in any::<u64>(),
            arrivals in proptest::collection::vec((-10_000_000i64..50_000_000, 0u32..20_000), 1..200),
        ) {
            let profile = if two_rate {
                tr(cir, cbs, cir.saturating_mul(2), excess)
            } else {
                sr(cir, cbs, excess)
            };
            let start = start / 2;
            let mut m = Meter::new(profile, start);
            let mut now = start;
            let mut latest = start;
            let mut green: u128 = 0;
            for (gap, len) in arrivals {
                // Negative gaps model time going backwards.
                now = now.saturating_add_signed(gap);
                latest = latest.max(now);
                if m.color(len, now) == Color::Green {
                    green += u128::from(len);
                }
                let t_ns = u128::from(latest - start);
                // green ≤ cbs + cir × t, compared in nano-bytes to stay exact.
                prop_assert!(
                    green * UNITS_PER_BYTE
                        <= u128::from(cbs) * UNITS_PER_BYTE + u128::from(cir) * t_ns
                );
            }
        }
    }
}
