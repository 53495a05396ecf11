//! Longest-prefix match for the software pipeline: one table per VRF and address family.
//!
//! # Layouts
//!
//! Both layouts are fixed-stride multibit tries with controlled prefix expansion: a first
//! level indexed by the top bits of the key, then 256-entry *groups*, each indexed by the next
//! 8 bits. Groups live in one `Vec<u32>` arena and are recycled through an intrusive free list.
//!
//! - [`Layout::Trie16`], where every table starts: a 65536-entry first level (256 KiB), then
//!   groups; IPv4 is 16 + 8 + 8 (at most 3 dependent loads), IPv6 16 + 14 × 8.
//! - [`Layout::Direct24`], IPv4 only, the DIR-24-8 layout of DPDK's `rte_lpm`: a 2^24-entry
//!   first level (64 MiB) and one group level, so a lookup is one load when the match is /24 or
//!   shorter, two beyond.
//!
//! An IPv4 table is promoted to `Direct24` by the insert that brings it to [`PROMOTE_GROUPS`]
//! groups (16 MiB of groups, which takes at least 8192 routes longer than /16): a thousand
//! small VRF tables cost 256 KiB each, and only a table already holding tens of MiB pays the
//! 64 MiB first level. A removal that leaves fewer than [`DEMOTE_ROUTES`] routes returns the
//! table to `Trie16`. Both rebuild the table from its routes, shortest first, inside that one
//! insert or removal (a few ms at the promotion point, see the `lpm` bench); the gap between
//! the two thresholds keeps a table from flapping. The 64 MiB are allocated zeroed, so pages
//! that no route touches cost address space but no memory; [`Lpm::memory_bytes`] counts them
//! all.
//!
//! Every entry is 4 bytes: `valid` (bit 31), `group` (bit 30), the prefix length (`depth`) of
//! the route that filled it (bits 29..22) and a 22-bit payload, the group index or the value.
//!
//! # Rule store
//!
//! Updates must know the exact routes, to return the previous value and to find the covering
//! route that a removal restores. A route whose length ends a stride (16, 24, 32, … in
//! `Trie16`; 24 and 32 in `Direct24`) fills exactly one entry, so the trie itself stores it
//! exactly: the entry is a leaf of that depth, or it points to a child group whose *default*
//! (the entry the child replaced, kept in a parallel `Vec<u32>`) has that depth. All other
//! lengths are kept in one `HashMap<K, u32>` per length. On an Internet-like IPv4 table this
//! keeps the /24s, 60 % of the routes, out of the hash maps (about 9 MiB for 1M routes). The
//! price: [`Lpm::iter`] over a `Direct24` table, and so a demotion, reads all 2^24 entries.
//!
//! A removal restores the longest remaining route shorter than the removed one: within the
//! removed route's own stride it is found in the hash maps, above it it is the group default.
//! A group whose entries all equal its default holds no route and no child; it is freed and
//! its parent entry set back to the default, so memory stays bounded under churn, and a table
//! emptied of all routes holds exactly the memory of a new one.
//!
//! An insert or a removal rewrites the entries of its table that the route covers, except
//! those of longer routes, and the defaults and entries of the groups below them: an IPv4 /8
//! covers 256 first-level entries in `Trie16` but 65536 in `Direct24`.
//!
//! A failed [`Lpm::insert`] leaves the table unchanged: every check (length, host bits, value,
//! route and group limits) runs before the first mutation.

use core::fmt;
use core::hash::Hash;
use core::mem::size_of;
use std::collections::HashMap;

/// Largest value a route can carry (22 bits).
pub const MAX_VALUE: u32 = PAYLOAD;

/// What [`Lpm::lookup_batch_values`] writes for a key without a route (never a value).
pub const NO_ROUTE: u32 = u32::MAX;

/// Groups at which an IPv4 table is promoted from [`Layout::Trie16`] to [`Layout::Direct24`].
pub const PROMOTE_GROUPS: usize = 1 << 14;
/// Routes below which a [`Layout::Direct24`] table returns to [`Layout::Trie16`]; an IPv4
/// route makes at most 2 groups, so a table this small is far from [`PROMOTE_GROUPS`].
pub const DEMOTE_ROUTES: usize = 1 << 12;

/// Bits of the key consumed by the first level of [`Layout::Trie16`].
const TRIE_BITS: u32 = 16;
/// Entries in the first level of [`Layout::Trie16`].
const TRIE_SIZE: usize = 1 << TRIE_BITS;
/// Bits of the key consumed by the first level of [`Layout::Direct24`].
const DIRECT_BITS: u32 = 24;
/// Entries in the first level of [`Layout::Direct24`].
const DIRECT_SIZE: usize = 1 << DIRECT_BITS;
/// Bits consumed by every further level.
const STRIDE: u32 = 8;
/// Entries in one group.
const GROUP_SIZE: usize = 1 << STRIDE;
/// The entry holds something (a route or a group).
const VALID: u32 = 1 << 31;
/// The entry points to a group.
const GROUP: u32 = 1 << 30;
/// Position of the depth (prefix length) field.
const DEPTH_SHIFT: u32 = 22;
/// The payload: a value or a group index.
const PAYLOAD: u32 = (1 << DEPTH_SHIFT) - 1;
/// An empty entry.
const INVALID: u32 = 0;
/// Group indices fit the payload.
const MAX_GROUPS: usize = 1 << DEPTH_SHIFT;
/// End of the free list.
const NO_GROUP: u32 = u32::MAX;
/// Levels of the deepest trie (IPv6: the first level + 14 groups), with room to spare.
const MAX_LEVELS: usize = 16;
/// Keys per chunk in [`Lpm::lookup_batch`] for [`Layout::Trie16`].
const BATCH: usize = 16;
/// Keys per chunk in [`Lpm::lookup_batch`] for [`Layout::Direct24`].
const DIRECT_BATCH: usize = 8;

mod sealed {
    /// Key operations used by the trie; sealed so that only `u32` and `u128` are keys.
    pub trait Sealed: Sized {
        /// The top `bits` bits (16 or 24), as a first-level index.
        fn top(self, bits: u32) -> usize;
        /// The 8 bits at `shift` (`(self >> shift) & 0xff`).
        fn byte_at(self, shift: u32) -> usize;
        /// The key with only its top `len` bits kept.
        fn masked(self, len: u8) -> Self;
        /// Numeric widening.
        fn to_u128(self) -> u128;
        /// Numeric narrowing (the value must fit).
        fn from_u128(v: u128) -> Self;
    }
}

/// A key type for [`Lpm`]: `u32` (IPv4) or `u128` (IPv6), most significant bit first.
pub trait LpmKey: sealed::Sealed + Copy + Eq + Hash + fmt::Debug {
    /// Key width in bits.
    const BITS: u8;
}

macro_rules! impl_key {
    ($t:ty) => {
        impl sealed::Sealed for $t {
            #[inline(always)]
            fn top(self, bits: u32) -> usize {
                self.wrapping_shr(<$t>::BITS - bits) as usize
            }
            #[inline(always)]
            fn byte_at(self, shift: u32) -> usize {
                (self.wrapping_shr(shift) & 0xff) as usize
            }
            #[inline]
            fn masked(self, len: u8) -> Self {
                match <$t>::BITS
                    .checked_sub(u32::from(len))
                    .and_then(|s| <$t>::MAX.checked_shl(s))
                {
                    Some(m) => self & m,
                    None => 0,
                }
            }
            #[inline]
            fn to_u128(self) -> u128 {
                u128::from(self)
            }
            #[inline]
            #[allow(clippy::unnecessary_cast)]
            fn from_u128(v: u128) -> Self {
                v as $t
            }
        }
        impl LpmKey for $t {
            const BITS: u8 = <$t>::BITS as u8;
        }
    };
}

impl_key!(u32);
impl_key!(u128);

/// Size limits of one table; nothing is reserved up front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LpmLimits {
    /// Most routes the table holds.
    pub max_routes: usize,
    /// Most 256-entry groups (1 KiB each) the table allocates (capped at 2^22).
    pub max_groups: usize,
}

impl Default for LpmLimits {
    /// Generous: 16M routes, 1M groups (1 GiB of groups).
    fn default() -> Self {
        LpmLimits {
            max_routes: 1 << 24,
            max_groups: 1 << 20,
        }
    }
}

/// Why an update was refused; the table is unchanged.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LpmError {
    /// The prefix length exceeds the key width.
    #[error("prefix length {len} exceeds {max}")]
    InvalidLength {
        /// The length given.
        len: u8,
        /// The key width.
        max: u8,
    },
    /// The address has bits set beyond the prefix length.
    #[error("address has host bits set beyond the prefix length")]
    HostBitsSet,
    /// The value exceeds [`MAX_VALUE`].
    #[error("value {value} exceeds the largest storable value")]
    ValueTooLarge {
        /// The value given.
        value: u32,
    },
    /// The table already holds `max_routes` routes.
    #[error("route table full ({max_routes} routes)")]
    TableFull {
        /// The limit.
        max_routes: usize,
    },
    /// The route needs more groups than the limit allows.
    #[error("trie groups exhausted ({max_groups} groups)")]
    GroupsExhausted {
        /// The limit.
        max_groups: usize,
    },
}

/// The shape of a table's first level (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// 65536 entries indexed by the top 16 bits, then 8-bit groups.
    Trie16,
    /// 2^24 entries indexed by the top 24 bits, then one 8-bit group level (IPv4 only).
    Direct24,
}

/// Which entries a [`Lpm::spread`] overwrites.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Insert of a route of this length: empty entries and those of routes no longer.
    Insert(u8),
    /// Removal of a route of this length: exactly its entries.
    Remove(u8),
}

impl Mode {
    #[inline]
    fn matches(self, e: u32) -> bool {
        match self {
            Mode::Insert(len) => e & VALID == 0 || depth(e) <= len,
            Mode::Remove(len) => e & VALID != 0 && depth(e) == len,
        }
    }
}

/// A table of the trie: the first level or a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tab {
    L1,
    Group(usize),
}

/// The first level. Fixed-size arrays, so that an index made of the key's top bits is in
/// range by construction (no bounds check on the lookup path).
enum First {
    Trie(Box<[u32; TRIE_SIZE]>),
    Direct(Box<[u32; DIRECT_SIZE]>),
}

/// A zeroed (all [`INVALID`]) array on the heap, without building it on the stack.
fn zeroed<const N: usize>() -> Option<Box<[u32; N]>> {
    vec![INVALID; N].into_boxed_slice().try_into().ok()
}

impl First {
    fn new(layout: Layout) -> Self {
        if layout == Layout::Direct24 {
            if let Some(t) = zeroed() {
                return First::Direct(t);
            }
        }
        First::Trie(zeroed().unwrap_or_else(|| Box::new([INVALID; TRIE_SIZE])))
    }

    fn layout(&self) -> Layout {
        match self {
            First::Trie(_) => Layout::Trie16,
            First::Direct(_) => Layout::Direct24,
        }
    }

    fn as_slice(&self) -> &[u32] {
        match self {
            First::Trie(t) => &t[..],
            First::Direct(t) => &t[..],
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u32] {
        match self {
            First::Trie(t) => &mut t[..],
            First::Direct(t) => &mut t[..],
        }
    }
}

impl Clone for First {
    fn clone(&self) -> Self {
        match self {
            First::Trie(t) => First::Trie(t.clone()),
            // Through a zeroed heap array: `Box::clone` may build 64 MiB on the stack.
            First::Direct(t) => match zeroed::<DIRECT_SIZE>() {
                Some(mut c) => {
                    c.copy_from_slice(&t[..]);
                    First::Direct(c)
                }
                None => First::Direct(t.clone()),
            },
        }
    }
}

#[inline]
fn depth(e: u32) -> u8 {
    ((e >> DEPTH_SHIFT) & 0xff) as u8
}

#[inline]
fn leaf(len: u8, value: u32) -> u32 {
    VALID | (u32::from(len) << DEPTH_SHIFT) | (value & PAYLOAD)
}

#[inline]
fn pointer(g: usize) -> u32 {
    VALID | GROUP | (g as u32 & PAYLOAD)
}

#[inline]
fn group_of(e: u32) -> usize {
    (e & PAYLOAD) as usize
}

#[inline]
fn value_of(e: u32) -> Option<u32> {
    if e & VALID != 0 {
        Some(e & PAYLOAD)
    } else {
        None
    }
}

/// Heap bytes of a hash map, from its capacity (hashbrown layout: a power-of-two bucket
/// count at most 7/8 full, one control byte per bucket plus one SIMD group).
fn map_bytes<K>(m: &HashMap<K, u32>) -> usize {
    let cap = m.capacity();
    if cap == 0 {
        return 0;
    }
    let buckets = (cap.saturating_mul(8) / 7).next_power_of_two().max(4);
    buckets * (size_of::<(K, u32)>() + 1) + 16
}

/// A longest-prefix-match table.
#[derive(Clone)]
pub struct Lpm<K: LpmKey> {
    /// The first level, indexed by the top `l1_bits` bits.
    first: First,
    /// 16 or 24, after `first`'s layout.
    l1_bits: u32,
    /// Whether the layout follows the table's size (see the module documentation).
    auto_layout: bool,
    /// All groups, 256 entries each; a free group's first entry links the free list.
    arena: Vec<u32>,
    /// Per group: the entry its parent held before the group was created, kept up to date
    /// (the longest route covering the group's whole range, or empty).
    defaults: Vec<u32>,
    /// First free group, or `NO_GROUP`.
    free_head: u32,
    /// Groups reachable from the first level.
    groups_in_use: usize,
    /// Routes not stored by the trie itself, indexed by length.
    maps: Vec<HashMap<K, u32>>,
    /// Routes stored.
    routes: usize,
    limits: LpmLimits,
}

/// An IPv4 table.
pub type Lpm4 = Lpm<u32>;
/// An IPv6 table.
pub type Lpm6 = Lpm<u128>;

impl<K: LpmKey> fmt::Debug for Lpm<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lpm")
            .field("bits", &K::BITS)
            .field("layout", &self.layout())
            .field("routes", &self.routes)
            .field("groups", &self.groups_in_use)
            .field("memory_bytes", &self.memory_bytes())
            .field("limits", &self.limits)
            .finish()
    }
}

impl<K: LpmKey> Default for Lpm<K> {
    fn default() -> Self {
        Self::new(LpmLimits::default())
    }
}

impl<K: LpmKey> Lpm<K> {
    /// An empty table ([`Layout::Trie16`]: 256 KiB for the first level).
    pub fn new(limits: LpmLimits) -> Self {
        Self::with_layout(limits, Layout::Trie16)
    }

    /// An empty table in `layout` (IPv4 only for [`Layout::Direct24`]; IPv6 tables are always
    /// [`Layout::Trie16`]).
    fn with_layout(limits: LpmLimits, layout: Layout) -> Self {
        let layout = if K::BITS == 32 {
            layout
        } else {
            Layout::Trie16
        };
        let first = First::new(layout);
        let l1_bits = match first.layout() {
            Layout::Trie16 => TRIE_BITS,
            Layout::Direct24 => DIRECT_BITS,
        };
        Lpm {
            first,
            l1_bits,
            auto_layout: true,
            arena: Vec::new(),
            defaults: Vec::new(),
            free_head: NO_GROUP,
            groups_in_use: 0,
            maps: (0..=K::BITS).map(|_| HashMap::new()).collect(),
            routes: 0,
            limits,
        }
    }

    /// The limits given at creation.
    pub fn limits(&self) -> LpmLimits {
        self.limits
    }

    /// The current layout of the first level.
    pub fn layout(&self) -> Layout {
        self.first.layout()
    }

    /// Routes stored.
    pub fn len(&self) -> usize {
        self.routes
    }

    /// Whether no route is stored.
    pub fn is_empty(&self) -> bool {
        self.routes == 0
    }

    /// Groups in use (1 KiB each).
    pub fn group_count(&self) -> usize {
        self.groups_in_use
    }

    /// Heap bytes held, from capacities: the first level (all of it, touched or not), the
    /// group arena (including free groups), the group defaults and the hash maps of the rule
    /// store.
    pub fn memory_bytes(&self) -> usize {
        size_of_val(self.first.as_slice())
            + self.arena.capacity() * size_of::<u32>()
            + self.defaults.capacity() * size_of::<u32>()
            + self.maps.capacity() * size_of::<HashMap<K, u32>>()
            + self.maps.iter().map(map_bytes).sum::<usize>()
    }

    /// The longest-prefix match for `key`.
    #[inline]
    pub fn lookup(&self, key: K) -> Option<u32> {
        value_of(self.lookup_entry(key))
    }

    /// The entry that answers `key`: a leaf, or [`INVALID`].
    #[inline(always)]
    fn lookup_entry(&self, key: K) -> u32 {
        let (e, shift) = match &self.first {
            First::Trie(t) => (
                t.get(key.top(TRIE_BITS)).copied().unwrap_or(INVALID),
                u32::from(K::BITS) - TRIE_BITS,
            ),
            First::Direct(t) => (
                t.get(key.top(DIRECT_BITS)).copied().unwrap_or(INVALID),
                u32::from(K::BITS) - DIRECT_BITS,
            ),
        };
        self.descend(key, e, shift)
    }

    /// Follows group pointers from first-level entry `e` (whose key bits end at `shift`).
    #[inline(always)]
    fn descend(&self, key: K, mut e: u32, mut shift: u32) -> u32 {
        while e & GROUP != 0 {
            shift = shift.wrapping_sub(STRIDE);
            let i = (group_of(e) << STRIDE) | key.byte_at(shift);
            e = self.arena.get(i).copied().unwrap_or(INVALID);
        }
        e
    }

    /// [`Lpm::lookup`] for every key: `out[i]` is the match of `keys[i]`. Keys are processed
    /// in chunks: all first-level loads of a chunk are issued before any is used, then the
    /// group loads of the keys that need them, so that the cache misses of a chunk overlap.
    /// Only `min(keys.len(), out.len())` results are written.
    pub fn lookup_batch(&self, keys: &[K], out: &mut [Option<u32>]) {
        self.batch(keys, out, value_of);
    }

    /// [`Lpm::lookup_batch`] writing plain values, [`NO_ROUTE`] where no route matches. An
    /// `Option<u32>` is written with two 4-byte stores, a `u32` with one; on cache-cold keys
    /// this form measured a few per cent faster (the `lpm_vs_dpdk` bench), plausibly because
    /// fewer stores wait behind the cache-missing loads.
    pub fn lookup_batch_values(&self, keys: &[K], out: &mut [u32]) {
        self.batch(keys, out, |e| {
            if e & VALID != 0 {
                e & PAYLOAD
            } else {
                NO_ROUTE
            }
        });
    }

    #[inline(always)]
    fn batch<O>(&self, keys: &[K], out: &mut [O], conv: impl Fn(u32) -> O + Copy) {
        match &self.first {
            First::Trie(t) => self.batch_trie(t, keys, out, conv),
            First::Direct(t) => self.batch_direct(t, keys, out, conv),
        }
    }

    /// The batch path of [`Layout::Trie16`]: one level at a time for the whole chunk.
    #[inline(always)]
    fn batch_trie<O>(
        &self,
        l1: &[u32; TRIE_SIZE],
        keys: &[K],
        out: &mut [O],
        conv: impl Fn(u32) -> O,
    ) {
        for (kc, oc) in keys.chunks(BATCH).zip(out.chunks_mut(BATCH)) {
            let mut ent = [INVALID; BATCH];
            let mut any = 0;
            for (e, &k) in ent.iter_mut().zip(kc) {
                *e = l1.get(k.top(TRIE_BITS)).copied().unwrap_or(INVALID);
                any |= *e;
            }
            let mut shift = u32::from(K::BITS) - TRIE_BITS;
            while any & GROUP != 0 {
                shift = shift.wrapping_sub(STRIDE);
                any = 0;
                for (e, &k) in ent.iter_mut().zip(kc) {
                    if *e & GROUP != 0 {
                        let i = (group_of(*e) << STRIDE) | k.byte_at(shift);
                        *e = self.arena.get(i).copied().unwrap_or(INVALID);
                    }
                    any |= *e;
                }
            }
            for (o, &e) in oc.iter_mut().zip(ent.iter().take(kc.len())) {
                *o = conv(e);
            }
        }
    }

    /// The batch path of [`Layout::Direct24`], by chunks of [`DIRECT_BATCH`] keys: all
    /// first-level loads of the chunk, none of them waiting on another or on a branch, then
    /// the group loads of the entries that point to a group. A fixed-size chunk stays in
    /// registers; 8 measured faster than 4, 16 and 32, than carrying a chunk's loads over
    /// into the next one, and than a plain loop over the keys.
    #[inline(always)]
    fn batch_direct<O>(
        &self,
        l1: &[u32; DIRECT_SIZE],
        keys: &[K],
        out: &mut [O],
        conv: impl Fn(u32) -> O,
    ) {
        let shift = u32::from(K::BITS) - DIRECT_BITS;
        // Same lengths, so that both have the same chunks and the same remainder.
        let n = keys.len().min(out.len());
        let (keys, out) = (
            keys.get(..n).unwrap_or(&[]),
            out.get_mut(..n).unwrap_or(&mut []),
        );
        let mut kc = keys.chunks_exact(DIRECT_BATCH);
        let mut oc = out.chunks_exact_mut(DIRECT_BATCH);
        for (kc, oc) in (&mut kc).zip(&mut oc) {
            let mut ent = [INVALID; DIRECT_BATCH];
            for (e, &k) in ent.iter_mut().zip(kc) {
                // In range: the top 24 bits index a 2^24-entry array.
                *e = l1.get(k.top(DIRECT_BITS)).copied().unwrap_or(INVALID);
            }
            for ((o, &e), &k) in oc.iter_mut().zip(&ent).zip(kc) {
                let e = if e & GROUP == 0 {
                    e
                } else if K::BITS == 32 {
                    // IPv4: one group level, whose entries are leaves.
                    let i = (group_of(e) << STRIDE) | k.byte_at(0);
                    self.arena.get(i).copied().unwrap_or(INVALID)
                } else {
                    self.descend(k, e, shift)
                };
                *o = conv(e);
            }
        }
        // The last keys, fewer than a chunk.
        for (o, &k) in oc.into_remainder().iter_mut().zip(kc.remainder()) {
            *o = conv(self.lookup_entry(k));
        }
    }

    /// The value of exactly this prefix, if stored (`None` for an invalid prefix).
    pub fn get(&self, addr: K, len: u8) -> Option<u32> {
        if Self::check_prefix(addr, len).is_err() {
            return None;
        }
        if !self.is_boundary(len) {
            return self.maps.get(usize::from(len))?.get(&addr).copied();
        }
        let k = self.level_of(len);
        let tab = self.find(addr, k)?;
        let mut e = self.entry(tab, self.index_at(addr, k));
        if e & GROUP != 0 {
            e = self.defaults.get(group_of(e)).copied().unwrap_or(INVALID);
        }
        if e & VALID != 0 && depth(e) == len {
            value_of(e)
        } else {
            None
        }
    }

    /// Adds the route `addr/len → value`, or replaces the value of that exact prefix;
    /// returns the previous value. On error the table is unchanged. The insert that brings
    /// an IPv4 table to [`PROMOTE_GROUPS`] groups also rebuilds it as [`Layout::Direct24`].
    pub fn insert(&mut self, addr: K, len: u8, value: u32) -> Result<Option<u32>, LpmError> {
        Self::check_prefix(addr, len)?;
        if value > MAX_VALUE {
            return Err(LpmError::ValueTooLarge { value });
        }
        let old = self.get(addr, len);
        let k = self.level_of(len);
        if old.is_none() {
            if self.routes >= self.limits.max_routes {
                return Err(LpmError::TableFull {
                    max_routes: self.limits.max_routes,
                });
            }
            let needed = self.groups_needed(addr, k);
            let max_groups = self.limits.max_groups.min(MAX_GROUPS);
            if self.groups_in_use + needed > max_groups {
                return Err(LpmError::GroupsExhausted { max_groups });
            }
        }
        let tab = self.make_path(addr, k);
        if !self.is_boundary(len) {
            if let Some(m) = self.maps.get_mut(usize::from(len)) {
                m.insert(addr, value);
            }
        }
        let (lo, hi) = self.range(addr, len, k);
        self.spread(tab, lo, hi, leaf(len, value), Mode::Insert(len));
        if old.is_none() {
            self.routes += 1;
            if self.auto_layout
                && self.layout() == Layout::Trie16
                && K::BITS == 32
                && self.groups_in_use >= PROMOTE_GROUPS
            {
                self.relayout(Layout::Direct24);
            }
        }
        Ok(old)
    }

    /// Removes the route `addr/len`; returns its value, or `None` if it was not stored.
    /// Addresses it matched fall back to the longest remaining covering route. The removal
    /// that leaves a [`Layout::Direct24`] table under [`DEMOTE_ROUTES`] routes also rebuilds
    /// it as [`Layout::Trie16`].
    pub fn remove(&mut self, addr: K, len: u8) -> Result<Option<u32>, LpmError> {
        Self::check_prefix(addr, len)?;
        let Some(old) = self.get(addr, len) else {
            return Ok(None);
        };
        let k = self.level_of(len);
        let mut path = [Tab::L1; MAX_LEVELS];
        let Some(tab) = self.walk(addr, k, &mut path) else {
            return Ok(None);
        };

        // The longest remaining route covering this one: first within this stride (in the
        // hash maps), then above it (the group default).
        let first = if k == 0 {
            0
        } else {
            self.stride_end(k - 1) + 1
        };
        let mut cover = match tab {
            Tab::L1 => INVALID,
            Tab::Group(g) => self.defaults.get(g).copied().unwrap_or(INVALID),
        };
        for l in (first..len).rev() {
            let Some(m) = self.maps.get(usize::from(l)) else {
                continue;
            };
            if m.is_empty() {
                continue;
            }
            if let Some(&v) = m.get(&addr.masked(l)) {
                cover = leaf(l, v);
                break;
            }
        }

        if !self.is_boundary(len) {
            if let Some(m) = self.maps.get_mut(usize::from(len)) {
                m.remove(&addr);
                if m.is_empty() {
                    m.shrink_to_fit();
                } else if m.len() * 4 < m.capacity() {
                    m.shrink_to(m.len() * 2);
                }
            }
        }
        let (lo, hi) = self.range(addr, len, k);
        self.spread(tab, lo, hi, cover, Mode::Remove(len));
        self.routes -= 1;

        // Free the groups left without routes or children, bottom up.
        let mut j = k;
        while j > 0 {
            let Some(&Tab::Group(g)) = path.get(j) else {
                break;
            };
            let d = self.defaults.get(g).copied().unwrap_or(INVALID);
            if !self.table(Tab::Group(g)).iter().all(|&e| e == d) {
                break;
            }
            let parent = path.get(j - 1).copied().unwrap_or(Tab::L1);
            self.set_entry(parent, self.index_at(addr, j - 1), d);
            self.free_group(g);
            j -= 1;
        }
        if self.auto_layout && self.layout() == Layout::Direct24 && self.routes < DEMOTE_ROUTES {
            self.relayout(Layout::Trie16);
        }
        Ok(Some(old))
    }

    /// All routes as `(addr, len, value)`, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (K, u8, u32)> + '_ {
        let hashed = self
            .maps
            .iter()
            .enumerate()
            .flat_map(|(l, m)| m.iter().map(move |(&a, &v)| (a, l as u8, v)));
        hashed.chain(BoundaryIter {
            lpm: self,
            stack: vec![Frame {
                tab: Tab::L1,
                next: 0,
                level: 0,
                base: 0,
            }],
        })
    }

    /// Rebuilds the table in `layout`, shortest routes first so that every entry is written
    /// about once per covering route. Keeps the table as it is if the rebuilt one would
    /// exceed the limits (a demotion can need more groups than the table holds).
    fn relayout(&mut self, layout: Layout) {
        let mut routes: Vec<(K, u8, u32)> = self.iter().collect();
        routes.sort_unstable_by_key(|r| r.1);
        let mut t = Self::with_layout(self.limits, layout);
        t.auto_layout = false;
        for &(a, l, v) in &routes {
            if t.insert(a, l, v).is_err() {
                return;
            }
        }
        t.auto_layout = self.auto_layout;
        *self = t;
    }

    fn check_prefix(addr: K, len: u8) -> Result<(), LpmError> {
        if len > K::BITS {
            return Err(LpmError::InvalidLength { len, max: K::BITS });
        }
        if addr.masked(len) != addr {
            return Err(LpmError::HostBitsSet);
        }
        Ok(())
    }

    /// The level whose table holds the entries of a route of length `len` (0 = first level).
    #[inline]
    fn level_of(&self, len: u8) -> usize {
        let l1 = self.l1_bits as u8;
        if len <= l1 {
            0
        } else {
            usize::from((len - l1 - 1) / STRIDE as u8) + 1
        }
    }

    /// The prefix length at the end of level `k`'s stride.
    #[inline]
    fn stride_end(&self, k: usize) -> u8 {
        (self.l1_bits as usize + STRIDE as usize * k) as u8
    }

    /// Whether routes of this length are stored by the trie itself (one entry each): the
    /// ends of strides (16, 24, 32, … in `Trie16`; 24 and 32 in `Direct24`).
    #[inline]
    fn is_boundary(&self, len: u8) -> bool {
        let l1 = self.l1_bits as u8;
        len >= l1 && (len - l1) & (STRIDE as u8 - 1) == 0
    }

    /// The index of `addr` in its table at level `k`.
    #[inline]
    fn index_at(&self, addr: K, k: usize) -> usize {
        if k == 0 {
            addr.top(self.l1_bits)
        } else {
            addr.byte_at(u32::from(K::BITS).saturating_sub(u32::from(self.stride_end(k))))
        }
    }

    /// The entry range `[lo, hi)` of route `addr/len` in its table at level `k`.
    fn range(&self, addr: K, len: u8, k: usize) -> (usize, usize) {
        let lo = self.index_at(addr, k);
        (lo, lo + (1usize << (self.stride_end(k) - len)))
    }

    fn table(&self, tab: Tab) -> &[u32] {
        match tab {
            Tab::L1 => self.first.as_slice(),
            Tab::Group(g) => self
                .arena
                .get(g * GROUP_SIZE..(g + 1) * GROUP_SIZE)
                .unwrap_or(&[]),
        }
    }

    fn table_mut(&mut self, tab: Tab) -> &mut [u32] {
        match tab {
            Tab::L1 => self.first.as_mut_slice(),
            Tab::Group(g) => self
                .arena
                .get_mut(g * GROUP_SIZE..(g + 1) * GROUP_SIZE)
                .unwrap_or(&mut []),
        }
    }

    fn entry(&self, tab: Tab, i: usize) -> u32 {
        self.table(tab).get(i).copied().unwrap_or(INVALID)
    }

    fn set_entry(&mut self, tab: Tab, i: usize, e: u32) {
        if let Some(slot) = self.table_mut(tab).get_mut(i) {
            *slot = e;
        }
    }

    /// The table at level `k` on the path of `addr`, if all its groups exist.
    fn find(&self, addr: K, k: usize) -> Option<Tab> {
        let mut tab = Tab::L1;
        for j in 0..k {
            let e = self.entry(tab, self.index_at(addr, j));
            if e & GROUP == 0 {
                return None;
            }
            tab = Tab::Group(group_of(e));
        }
        Some(tab)
    }

    /// Like [`Lpm::find`], recording the table of every level in `path`.
    fn walk(&self, addr: K, k: usize, path: &mut [Tab; MAX_LEVELS]) -> Option<Tab> {
        let mut tab = Tab::L1;
        for j in 0..k {
            let e = self.entry(tab, self.index_at(addr, j));
            if e & GROUP == 0 {
                return None;
            }
            tab = Tab::Group(group_of(e));
            *path.get_mut(j + 1)? = tab;
        }
        Some(tab)
    }

    /// Groups that [`Lpm::make_path`] would allocate.
    fn groups_needed(&self, addr: K, k: usize) -> usize {
        let mut tab = Tab::L1;
        for j in 0..k {
            let e = self.entry(tab, self.index_at(addr, j));
            if e & GROUP == 0 {
                return k - j;
            }
            tab = Tab::Group(group_of(e));
        }
        0
    }

    /// The table at level `k` on the path of `addr`, creating missing groups.
    fn make_path(&mut self, addr: K, k: usize) -> Tab {
        let mut tab = Tab::L1;
        for j in 0..k {
            let i = self.index_at(addr, j);
            let e = self.entry(tab, i);
            let g = if e & GROUP != 0 {
                group_of(e)
            } else {
                let g = self.alloc_group(e);
                self.set_entry(tab, i, pointer(g));
                g
            };
            tab = Tab::Group(g);
        }
        tab
    }

    /// Writes `new` into the entries `[lo, hi)` of `tab` that `mode` selects, and into the
    /// groups below whose default it selects.
    fn spread(&mut self, tab: Tab, lo: usize, hi: usize, new: u32, mode: Mode) {
        let mut children = false;
        if let Some(s) = self.table_mut(tab).get_mut(lo..hi) {
            for e in s {
                if *e & GROUP != 0 {
                    children = true;
                } else if mode.matches(*e) {
                    *e = new;
                }
            }
        }
        if !children {
            return;
        }
        for i in lo..hi {
            let e = self.entry(tab, i);
            if e & GROUP == 0 {
                continue;
            }
            let g = group_of(e);
            match self.defaults.get_mut(g) {
                Some(d) if mode.matches(*d) => *d = new,
                _ => continue,
            }
            self.spread(Tab::Group(g), 0, GROUP_SIZE, new, mode);
        }
    }

    /// A group filled with `default`; the caller links it.
    fn alloc_group(&mut self, default: u32) -> usize {
        self.groups_in_use += 1;
        if self.free_head != NO_GROUP {
            let g = self.free_head as usize;
            let base = g * GROUP_SIZE;
            self.free_head = self.arena.get(base).copied().unwrap_or(NO_GROUP);
            if let Some(s) = self.arena.get_mut(base..base + GROUP_SIZE) {
                s.fill(default);
            }
            if let Some(d) = self.defaults.get_mut(g) {
                *d = default;
            }
            return g;
        }
        let g = self.defaults.len();
        // Grow by 1/32 at a time: the arena dominates memory, so keep its slack small.
        let extra = (g / 32).max(16);
        if self.defaults.len() == self.defaults.capacity() {
            self.defaults.reserve_exact(extra);
        }
        if self.arena.len() + GROUP_SIZE > self.arena.capacity() {
            self.arena.reserve_exact(extra * GROUP_SIZE);
        }
        self.arena.resize(self.arena.len() + GROUP_SIZE, default);
        self.defaults.push(default);
        g
    }

    /// Returns an unlinked group to the free list; releases the arena once no group is used.
    fn free_group(&mut self, g: usize) {
        self.groups_in_use -= 1;
        if self.groups_in_use == 0 {
            self.arena = Vec::new();
            self.defaults = Vec::new();
            self.free_head = NO_GROUP;
            return;
        }
        if let Some(first) = self.arena.get_mut(g * GROUP_SIZE) {
            *first = self.free_head;
            self.free_head = g as u32;
        }
    }
}

/// One table being walked by [`BoundaryIter`].
#[derive(Debug)]
struct Frame {
    tab: Tab,
    next: usize,
    level: usize,
    /// The address bits above this table.
    base: u128,
}

/// Walks the trie for the routes it stores itself (lengths at the end of a stride).
struct BoundaryIter<'a, K: LpmKey> {
    lpm: &'a Lpm<K>,
    stack: Vec<Frame>,
}

impl<K: LpmKey> Iterator for BoundaryIter<'_, K> {
    type Item = (K, u8, u32);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let f = self.stack.last_mut()?;
            if f.next >= self.lpm.table(f.tab).len() {
                self.stack.pop();
                continue;
            }
            let (tab, i, level, base) = (f.tab, f.next, f.level, f.base);
            f.next += 1;
            let end = self.lpm.stride_end(level);
            let addr = base | ((i as u128) << (u32::from(K::BITS) - u32::from(end)));
            let mut e = self.lpm.entry(tab, i);
            if e & GROUP != 0 {
                let g = group_of(e);
                self.stack.push(Frame {
                    tab: Tab::Group(g),
                    next: 0,
                    level: level + 1,
                    base: addr,
                });
                e = self.lpm.defaults.get(g).copied().unwrap_or(INVALID);
            }
            if e & VALID != 0 && depth(e) == end {
                return Some((K::from_u128(addr), end, e & PAYLOAD));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::sealed::Sealed;
    use super::*;
    use proptest::prelude::*;

    impl<K: LpmKey> Lpm<K> {
        /// An empty table that keeps `layout` whatever its size.
        fn pinned(limits: LpmLimits, layout: Layout) -> Self {
            let mut t = Self::with_layout(limits, layout);
            t.auto_layout = false;
            t
        }

        /// Checks the structural invariants; returns the reachable group count.
        fn check_invariants(&self) -> usize {
            fn visit<K: LpmKey>(t: &Lpm<K>, tab: Tab, level: usize) -> usize {
                let mut n = 0;
                for &e in t.table(tab) {
                    if e & GROUP != 0 {
                        let g = group_of(e);
                        let d = t.defaults[g];
                        assert_eq!(d & GROUP, 0, "default is a leaf");
                        assert!(
                            d & VALID == 0 || depth(d) <= t.stride_end(level),
                            "default depth within the parent's stride"
                        );
                        assert!(
                            !t.table(Tab::Group(g)).iter().all(|&x| x == d),
                            "group {g} holds nothing and should have been freed"
                        );
                        n += 1 + visit(t, Tab::Group(g), level + 1);
                    }
                }
                n
            }
            let n = visit(self, Tab::L1, 0);
            assert_eq!(n, self.groups_in_use);
            n
        }
    }

    /// The naive reference: a list of prefixes scanned for the longest match.
    struct Naive<K> {
        routes: Vec<(K, u8, u32)>,
    }

    impl<K: LpmKey> Naive<K> {
        fn insert(&mut self, a: K, l: u8, v: u32) -> Option<u32> {
            for r in &mut self.routes {
                if r.0 == a && r.1 == l {
                    return Some(core::mem::replace(&mut r.2, v));
                }
            }
            self.routes.push((a, l, v));
            None
        }
        fn remove(&mut self, a: K, l: u8) -> Option<u32> {
            let i = self.routes.iter().position(|r| r.0 == a && r.1 == l)?;
            Some(self.routes.swap_remove(i).2)
        }
        fn lookup(&self, key: K) -> Option<u32> {
            self.routes
                .iter()
                .filter(|r| key.masked(r.1) == r.0)
                .max_by_key(|r| r.1)
                .map(|r| r.2)
        }
    }

    #[derive(Debug, Clone)]
    enum Op<K> {
        Insert(K, u8, u32),
        Remove(K, u8),
        /// Replace the value of the n-th stored route (modulo).
        ReplaceNth(usize, u32),
        /// Remove the n-th stored route (modulo).
        RemoveNth(usize),
    }

    fn sorted<K: LpmKey>(mut v: Vec<(K, u8, u32)>) -> Vec<(u128, u8, u32)> {
        let mut w: Vec<_> = v.drain(..).map(|(a, l, x)| (a.to_u128(), l, x)).collect();
        w.sort_unstable();
        w
    }

    fn check_same<K: LpmKey>(t: &Lpm<K>, n: &Naive<K>, keys: &[K]) {
        assert_eq!(t.len(), n.routes.len());
        assert_eq!(sorted(t.iter().collect()), sorted(n.routes.clone()));
        for &(a, l, v) in &n.routes {
            assert_eq!(t.get(a, l), Some(v), "get {a:?}/{l}");
        }
        let mut all: Vec<K> = keys.to_vec();
        for &(a, l, _) in &n.routes {
            all.push(a);
            // The last address of the prefix.
            let ones = K::from_u128(u128::MAX);
            let last = a.to_u128() | (ones.to_u128() ^ ones.masked(l).to_u128());
            all.push(K::from_u128(last));
        }
        let mut batch = vec![None; all.len()];
        t.lookup_batch(&all, &mut batch);
        let mut values = vec![0; all.len()];
        t.lookup_batch_values(&all, &mut values);
        for ((&k, b), &v) in all.iter().zip(&batch).zip(&values) {
            let want = n.lookup(k);
            assert_eq!(t.lookup(k), want, "lookup {k:?}");
            assert_eq!(*b, want, "lookup_batch {k:?}");
            assert_eq!(v, want.unwrap_or(NO_ROUTE), "lookup_batch_values {k:?}");
        }
        t.check_invariants();
    }

    fn run_ops<K: LpmKey>(ops: &[Op<K>], keys: &[K]) {
        run_ops_in(Layout::Trie16, ops, keys);
    }

    fn run_ops_in<K: LpmKey>(layout: Layout, ops: &[Op<K>], keys: &[K]) {
        let mut t = Lpm::<K>::pinned(LpmLimits::default(), layout);
        assert_eq!(t.layout(), layout);
        let empty = t.memory_bytes();
        let mut n = Naive { routes: Vec::new() };
        for (i, op) in ops.iter().enumerate() {
            match *op {
                Op::Insert(a, l, v) => {
                    assert_eq!(t.insert(a, l, v), Ok(n.insert(a, l, v)), "{op:?}");
                }
                Op::Remove(a, l) => {
                    assert_eq!(t.remove(a, l), Ok(n.remove(a, l)), "{op:?}");
                }
                Op::ReplaceNth(i, v) => {
                    if !n.routes.is_empty() {
                        let (a, l, _) = n.routes[i % n.routes.len()];
                        assert_eq!(t.insert(a, l, v), Ok(n.insert(a, l, v)), "{op:?}");
                    }
                }
                Op::RemoveNth(i) => {
                    if !n.routes.is_empty() {
                        let (a, l, _) = n.routes[i % n.routes.len()];
                        assert_eq!(t.remove(a, l), Ok(n.remove(a, l)), "{op:?}");
                    }
                }
            }
            if i % 32 == 31 {
                check_same(&t, &n, keys);
            }
        }
        check_same(&t, &n, keys);
        // Removing everything returns all memory.
        while let Some((a, l, v)) = n.routes.pop() {
            assert_eq!(t.remove(a, l), Ok(Some(v)));
        }
        assert!(t.is_empty());
        assert_eq!(t.group_count(), 0);
        assert_eq!(t.memory_bytes(), empty);
        for &k in keys {
            assert_eq!(t.lookup(k), None);
        }
    }

    /// IPv4 addresses with few distinct bits, so that prefixes overlap often.
    fn v4_addr() -> BoxedStrategy<u32> {
        const NOISE: u32 = 0x0003_c1c1;
        prop_oneof![
            9 => (prop::sample::select(vec![0x0a00_0000u32, 0x0a01_0000, 0xc0a8_0000]), any::<u32>())
                .prop_map(|(base, r)| base ^ (r & NOISE)),
            1 => any::<u32>(),
        ]
        .boxed()
    }

    fn v4_len() -> BoxedStrategy<u8> {
        prop_oneof![
            0u8..=32,
            prop::sample::select(vec![0u8, 1, 7, 8, 15, 16, 17, 23, 24, 25, 31, 32]),
        ]
        .boxed()
    }

    /// IPv6 addresses with few distinct bits, one or two per level.
    fn v6_addr() -> BoxedStrategy<u128> {
        const NOISE: u128 = (1 << 112)
            | (1 << 104)
            | (1 << 103)
            | (1 << 96)
            | (1 << 88)
            | (1 << 72)
            | (1 << 64)
            | (1 << 48)
            | (1 << 40)
            | (1 << 8)
            | (1 << 7)
            | 1;
        prop_oneof![
            9 => (
                prop::sample::select(vec![
                    0x2001_0db8u128 << 96,
                    0x2001_0db9u128 << 96,
                    0x2a00u128 << 112,
                ]),
                any::<u128>()
            )
                .prop_map(|(base, r)| base ^ (r & NOISE)),
            1 => any::<u128>(),
        ]
        .boxed()
    }

    fn v6_len() -> BoxedStrategy<u8> {
        prop_oneof![
            0u8..=128,
            prop::sample::select(vec![
                0u8, 1, 15, 16, 17, 23, 24, 25, 31, 32, 33, 40, 47, 48, 49, 56, 63, 64, 65, 72,
                104, 119, 120, 121, 127, 128
            ]),
        ]
        .boxed()
    }

    fn ops<K: LpmKey + 'static>(
        addr: impl Strategy<Value = K> + Clone + 'static,
        len: impl Strategy<Value = u8> + Clone + 'static,
    ) -> impl Strategy<Value = Vec<Op<K>>> {
        let value = prop_oneof![0u32..8, Just(MAX_VALUE)];
        let op = prop_oneof![
            5 => (addr.clone(), len.clone(), value.clone())
                .prop_map(|(a, l, v)| Op::Insert(a.masked(l), l, v)),
            1 => (addr, len).prop_map(|(a, l)| Op::Remove(a.masked(l), l)),
            1 => (any::<usize>(), value).prop_map(|(i, v)| Op::ReplaceNth(i, v)),
            3 => any::<usize>().prop_map(Op::RemoveNth),
        ];
        prop::collection::vec(op, 0..160)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn v4_matches_naive_in_trie16(ops in ops(v4_addr(), v4_len()), keys in prop::collection::vec(v4_addr(), 0..64)) {
            run_ops(&ops, &keys);
        }

        #[test]
        fn v6_matches_naive_in_trie16(ops in ops(v6_addr(), v6_len()), keys in prop::collection::vec(v6_addr(), 0..64)) {
            run_ops(&ops, &keys);
        }
    }

    /// Lengths around the `Direct24` strides: /0, /1, /8, /23, /24, /25, /31, /32 often.
    fn v4_direct_len() -> BoxedStrategy<u8> {
        prop_oneof![
            0u8..=32,
            prop::sample::select(vec![0u8, 1, 8, 16, 23, 24, 24, 25, 25, 31, 32, 32]),
        ]
        .boxed()
    }

    proptest! {
        // Each case allocates and scans the 64 MiB first level: fewer cases.
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn v4_matches_naive_in_direct24(ops in ops(v4_addr(), v4_direct_len()), keys in prop::collection::vec(v4_addr(), 0..64)) {
            run_ops_in(Layout::Direct24, &ops, &keys);
        }
    }

    #[test]
    fn ipv6_tables_are_never_direct24() {
        let t = Lpm6::pinned(LpmLimits::default(), Layout::Direct24);
        assert_eq!(t.layout(), Layout::Trie16);
        assert_eq!(t.memory_bytes(), Lpm6::default().memory_bytes());
    }

    #[test]
    fn direct24_edges_and_covering_routes() {
        let a = |s: [u8; 4]| u32::from_be_bytes(s);
        let mut t = Lpm4::pinned(LpmLimits::default(), Layout::Direct24);
        let empty = t.memory_bytes();
        assert_eq!(
            empty,
            Lpm4::default().memory_bytes() - 4 * 65536 + 4 * (1 << 24)
        );
        t.insert(a([10, 1, 2, 0]), 24, 24).unwrap();
        t.insert(a([10, 1, 2, 128]), 25, 25).unwrap();
        t.insert(a([10, 1, 2, 129]), 32, 32).unwrap();
        assert_eq!(t.group_count(), 1);
        // A /8 and a /0 inserted after the longer routes fill only around them.
        t.insert(a([10, 0, 0, 0]), 8, 8).unwrap();
        t.insert(0, 0, 0).unwrap();
        let probe = [
            (a([10, 1, 2, 129]), 32),
            (a([10, 1, 2, 130]), 25),
            (a([10, 1, 2, 127]), 24),
            (a([10, 1, 3, 0]), 8),
            (a([10, 255, 255, 255]), 8),
            (a([11, 0, 0, 0]), 0),
            (u32::MAX, 0),
        ];
        for (k, want) in probe {
            assert_eq!(t.lookup(k), Some(want), "{k:#x}");
        }
        assert_eq!(t.get(a([10, 1, 2, 0]), 24), Some(24));
        // Removing the /24 under a group: the group default falls back to the /8.
        assert_eq!(t.remove(a([10, 1, 2, 0]), 24), Ok(Some(24)));
        assert_eq!(t.lookup(a([10, 1, 2, 127])), Some(8));
        assert_eq!(t.lookup(a([10, 1, 2, 130])), Some(25));
        assert_eq!(t.remove(a([10, 0, 0, 0]), 8), Ok(Some(8)));
        assert_eq!(t.lookup(a([10, 1, 2, 127])), Some(0));
        assert_eq!(t.lookup(a([10, 1, 3, 0])), Some(0));
        assert_eq!(t.remove(a([10, 1, 2, 128]), 25), Ok(Some(25)));
        assert_eq!(t.remove(a([10, 1, 2, 129]), 32), Ok(Some(32)));
        assert_eq!(t.group_count(), 0);
        assert_eq!(t.lookup(a([10, 1, 2, 129])), Some(0));
        t.check_invariants();
        // A copy is independent.
        let c = t.clone();
        assert_eq!(t.remove(0, 0), Ok(Some(0)));
        assert_eq!(c.lookup(u32::MAX), Some(0));
        assert_eq!(t.lookup(u32::MAX), None);
        assert_eq!(t.memory_bytes(), empty);
        assert_eq!(c.layout(), Layout::Direct24);
    }

    /// Pseudo-random IPv4 routes of mixed lengths (xorshift, fixed seed).
    fn random_v4_routes(n: usize, seed: u32) -> Vec<(u32, u8, u32)> {
        let mut x = seed;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        (0..n)
            .map(|i| {
                let l = [8u8, 16, 20, 24, 24, 25, 28, 32][(next() % 8) as usize];
                (next().masked(l), l, i as u32)
            })
            .collect()
    }

    #[test]
    fn large_tables_are_promoted_and_demoted_without_changing_answers() {
        // The reference is a pinned `Trie16` table (itself checked against the naive model
        // above), fed the same updates.
        let mut t = Lpm4::default();
        let mut r = Lpm4::pinned(LpmLimits::default(), Layout::Trie16);
        let empty = t.memory_bytes();
        let routes = random_v4_routes(16_000, 0x9e37_79b9);
        let mut probe: Vec<u32> = routes
            .iter()
            .flat_map(|&(a, l, _)| [a, a | (u32::MAX >> l.min(31))])
            .collect();
        probe.extend(random_v4_routes(4096, 7).iter().map(|r| r.0 ^ 0x55));
        let same = |t: &Lpm4, r: &Lpm4| {
            let mut bt = vec![None; probe.len()];
            let mut br = vec![None; probe.len()];
            t.lookup_batch(&probe, &mut bt);
            r.lookup_batch(&probe, &mut br);
            for (i, &k) in probe.iter().enumerate() {
                assert_eq!(bt[i], br[i], "batch {k:#x}");
                assert_eq!(t.lookup(k), br[i], "lookup {k:#x}");
            }
            assert_eq!(t.len(), r.len());
            let mut a: Vec<_> = t.iter().collect();
            let mut b: Vec<_> = r.iter().collect();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b);
        };
        let mut promoted_at = None;
        for (i, &(a, l, v)) in routes.iter().enumerate() {
            let groups_before = t.group_count();
            assert_eq!(t.insert(a, l, v), r.insert(a, l, v));
            if promoted_at.is_none() && t.layout() == Layout::Direct24 {
                assert!(groups_before < PROMOTE_GROUPS || l <= 16);
                assert!(r.group_count() >= PROMOTE_GROUPS);
                promoted_at = Some(i);
                same(&t, &r);
            }
        }
        assert!(
            promoted_at.is_some(),
            "16000 mixed routes reach {PROMOTE_GROUPS} groups"
        );
        assert!(t.memory_bytes() > 64 << 20);
        same(&t, &r);
        t.check_invariants();
        // Remove in a different order; the table returns to `Trie16` under DEMOTE_ROUTES.
        let mut order: Vec<_> = routes
            .iter()
            .rev()
            .step_by(2)
            .chain(routes.iter().step_by(2))
            .copied()
            .collect();
        order.dedup();
        let mut demoted = false;
        for (i, &(a, l, _)) in order.iter().enumerate() {
            assert_eq!(t.remove(a, l), r.remove(a, l));
            if !demoted && t.layout() == Layout::Trie16 {
                assert!(t.len() < DEMOTE_ROUTES);
                demoted = true;
                same(&t, &r);
                t.check_invariants();
            }
            if i % 4000 == 0 {
                same(&t, &r);
            }
        }
        assert!(demoted);
        assert!(t.is_empty());
        assert_eq!(t.memory_bytes(), empty);
    }

    #[test]
    fn removal_restores_covering_routes() {
        let mut t = Lpm4::default();
        let a = |s: [u8; 4]| u32::from_be_bytes(s);
        t.insert(a([10, 0, 0, 0]), 8, 1).unwrap();
        t.insert(a([10, 1, 0, 0]), 16, 2).unwrap();
        t.insert(a([10, 1, 2, 0]), 23, 3).unwrap();
        t.insert(a([10, 1, 2, 0]), 24, 4).unwrap();
        t.insert(a([10, 1, 2, 128]), 25, 5).unwrap();
        t.insert(a([10, 1, 2, 129]), 32, 6).unwrap();
        let key = a([10, 1, 2, 129]);
        let steps = [
            ((a([10, 1, 2, 129]), 32), Some(5)),
            ((a([10, 1, 2, 128]), 25), Some(4)),
            ((a([10, 1, 2, 0]), 24), Some(3)),
            ((a([10, 1, 2, 0]), 23), Some(2)),
            ((a([10, 1, 0, 0]), 16), Some(1)),
            ((a([10, 0, 0, 0]), 8), None),
        ];
        assert_eq!(t.lookup(key), Some(6));
        for ((p, l), after) in steps {
            t.remove(p, l).unwrap().unwrap();
            assert_eq!(t.lookup(key), after, "after removing /{l}");
            t.check_invariants();
        }
        assert_eq!(t.group_count(), 0);

        // Removing a covering route first keeps the more specific ones.
        t.insert(a([10, 0, 0, 0]), 8, 1).unwrap();
        t.insert(a([10, 1, 2, 0]), 24, 4).unwrap();
        t.insert(a([10, 1, 2, 128]), 25, 5).unwrap();
        assert_eq!(t.remove(a([10, 1, 2, 0]), 24), Ok(Some(4)));
        assert_eq!(t.lookup(a([10, 1, 2, 1])), Some(1));
        assert_eq!(t.lookup(a([10, 1, 2, 200])), Some(5));
        assert_eq!(t.remove(a([10, 0, 0, 0]), 8), Ok(Some(1)));
        assert_eq!(t.lookup(a([10, 1, 2, 1])), None);
        assert_eq!(t.lookup(a([10, 1, 2, 200])), Some(5));
        t.check_invariants();
    }

    #[test]
    fn default_route_and_host_routes() {
        let mut t = Lpm6::default();
        assert_eq!(t.insert(0, 0, 7), Ok(None));
        assert_eq!(t.lookup(u128::MAX), Some(7));
        let host = 0x2001_0db8_0000_0000_0000_0000_0000_0001u128;
        assert_eq!(t.insert(host, 128, 9), Ok(None));
        assert_eq!(t.lookup(host), Some(9));
        assert_eq!(t.lookup(host + 1), Some(7));
        assert_eq!(t.group_count(), 14);
        assert_eq!(t.insert(0, 0, 8), Ok(Some(7)));
        assert_eq!(t.lookup(host + 1), Some(8));
        assert_eq!(t.get(host, 128), Some(9));
        assert_eq!(t.remove(host, 128), Ok(Some(9)));
        assert_eq!(t.group_count(), 0);
        assert_eq!(t.lookup(host), Some(8));
        assert_eq!(t.remove(0, 0), Ok(Some(8)));
        assert_eq!(t.lookup(host), None);
        assert!(t.is_empty());
    }

    #[test]
    fn churn_keeps_memory_bounded() {
        let mut t = Lpm4::default();
        let empty = t.memory_bytes();
        let mut x = 0x1234_5678u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let mut peak = 0;
        for round in 0..4 {
            let routes: Vec<(u32, u8)> = (0..2000)
                .map(|_| {
                    let l = [20u8, 24, 26, 32][(next() % 4) as usize];
                    (next().masked(l), l)
                })
                .collect();
            for (i, &(a, l)) in routes.iter().enumerate() {
                t.insert(a, l, i as u32).unwrap();
            }
            if round == 0 {
                peak = t.memory_bytes();
            }
            assert!(t.memory_bytes() <= peak + peak / 8, "round {round}");
            for &(a, l) in &routes {
                t.remove(a, l).unwrap();
            }
            assert_eq!(t.memory_bytes(), empty);
            assert_eq!(t.group_count(), 0);
        }
    }

    #[test]
    fn invalid_prefixes_are_refused() {
        let mut t = Lpm4::default();
        assert_eq!(
            t.insert(0, 33, 1),
            Err(LpmError::InvalidLength { len: 33, max: 32 })
        );
        assert_eq!(
            Lpm6::default().insert(0, 129, 1),
            Err(LpmError::InvalidLength { len: 129, max: 128 })
        );
        assert_eq!(t.insert(0x0a00_0001, 24, 1), Err(LpmError::HostBitsSet));
        assert_eq!(t.remove(0x0a00_0001, 24), Err(LpmError::HostBitsSet));
        assert_eq!(
            t.remove(0, 40),
            Err(LpmError::InvalidLength { len: 40, max: 32 })
        );
        assert_eq!(
            t.insert(0x0a00_0000, 24, MAX_VALUE + 1),
            Err(LpmError::ValueTooLarge {
                value: MAX_VALUE + 1
            })
        );
        assert_eq!(t.insert(0x0a00_0000, 24, MAX_VALUE), Ok(None));
        assert_eq!(t.lookup(0x0a00_00ff), Some(MAX_VALUE));
        assert_eq!(t.get(0x0a00_0001, 24), None);
        assert_eq!(t.get(0, 33), None);
        assert_eq!(t.remove(0x0b00_0000, 24), Ok(None));
        assert_eq!(t.len(), 1);
    }

    fn snapshot(t: &Lpm4) -> (Vec<(u128, u8, u32)>, usize, usize, usize) {
        (
            sorted(t.iter().collect()),
            t.len(),
            t.group_count(),
            t.memory_bytes(),
        )
    }

    #[test]
    fn limits_give_typed_errors_and_leave_the_table_unchanged() {
        let mut t = Lpm4::new(LpmLimits {
            max_routes: 3,
            max_groups: 2,
        });
        t.insert(0x0a00_0000, 8, 1).unwrap();
        t.insert(0x0a01_0200, 24, 2).unwrap(); // one group (10.1/16)
        let before = snapshot(&t);
        // A /32 needs two more groups: 10.2/16 and 10.2.0/24.
        assert_eq!(
            t.insert(0x0a02_0001, 32, 3),
            Err(LpmError::GroupsExhausted { max_groups: 2 })
        );
        assert_eq!(snapshot(&t), before);
        assert_eq!(t.lookup(0x0a02_0001), Some(1));
        // One more group is fine.
        t.insert(0x0a01_0201, 32, 3).unwrap();
        let before = snapshot(&t);
        assert_eq!(
            t.insert(0x0b00_0000, 8, 4),
            Err(LpmError::TableFull { max_routes: 3 })
        );
        assert_eq!(snapshot(&t), before);
        // Replacing needs neither a route nor a group.
        assert_eq!(t.insert(0x0a01_0201, 32, 5), Ok(Some(3)));
        assert_eq!(t.lookup(0x0a01_0201), Some(5));
        // Room again after a removal.
        t.remove(0x0a00_0000, 8).unwrap();
        t.insert(0x0b00_0000, 8, 4).unwrap();
        t.check_invariants();
    }

    #[test]
    fn boundary_routes_survive_being_covered_by_more_specifics() {
        // A /24 whose 256 addresses are all overridden by /32s is still stored.
        let mut t = Lpm4::default();
        t.insert(0x0a01_0200, 24, 1).unwrap();
        t.insert(0x0a01_0000, 16, 9).unwrap();
        for i in 0..256 {
            t.insert(0x0a01_0200 | i, 32, 100 + i).unwrap();
        }
        assert_eq!(t.get(0x0a01_0200, 24), Some(1));
        assert_eq!(t.insert(0x0a01_0200, 24, 2), Ok(Some(1)));
        for i in 0..256 {
            assert_eq!(t.remove(0x0a01_0200 | i, 32), Ok(Some(100 + i)));
        }
        assert_eq!(t.lookup(0x0a01_0277), Some(2));
        assert_eq!(t.remove(0x0a01_0200, 24), Ok(Some(2)));
        assert_eq!(t.lookup(0x0a01_0277), Some(9));
        assert_eq!(t.group_count(), 0);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn batch_handles_ragged_lengths() {
        batch_handles_ragged_lengths_in(Layout::Trie16);
        batch_handles_ragged_lengths_in(Layout::Direct24);
    }

    fn batch_handles_ragged_lengths_in(layout: Layout) {
        let mut t = Lpm4::pinned(LpmLimits::default(), layout);
        t.insert(0x0a00_0000, 8, 1).unwrap();
        t.insert(0x0a01_0280, 25, 2).unwrap();
        let keys: Vec<u32> = (0..37).map(|i| 0x0a01_0200 + i * 7).collect();
        let mut out = vec![Some(99); 40];
        t.lookup_batch(&keys, &mut out);
        for (k, o) in keys.iter().zip(&out) {
            assert_eq!(*o, t.lookup(*k));
        }
        assert_eq!(out[39], Some(99));
        let mut short = vec![None; 5];
        t.lookup_batch(&keys, &mut short);
        assert_eq!(short[..], out[..5]);
        let mut mid = vec![None; 13];
        t.lookup_batch(&keys, &mut mid);
        assert_eq!(mid[..], out[..13]);
        let mut values = vec![7; 40];
        t.lookup_batch_values(&keys, &mut values);
        for (v, o) in values.iter().zip(&out).take(keys.len()) {
            assert_eq!(*v, o.unwrap_or(NO_ROUTE));
        }
        assert_eq!(values[37..], [7, 7, 7]);
        let mut miss = [0; 9];
        t.lookup_batch_values(&[0x0b00_0000; 9], &mut miss);
        assert_eq!(miss, [NO_ROUTE; 9]);
    }
}
