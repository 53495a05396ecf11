//! The open-addressing index: linear probing, backward-shift deletion, no tombstones.

const EMPTY: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Slot {
    hash: u32,
    idx: u32,
}

const EMPTY_SLOT: Slot = Slot {
    hash: 0,
    idx: EMPTY,
};

/// Linear probing over `u32` entry numbers, with the low 32 bits of the hash kept beside them;
/// backward-shift deletion. Sized to at least twice the entries it will ever hold.
pub(super) struct Index {
    slots: Vec<Slot>,
    mask: usize,
    pub(super) len: usize,
}

impl Index {
    pub(super) fn with_capacity(entries: usize) -> Self {
        let n = entries.saturating_mul(2).max(8).next_power_of_two();
        Index {
            slots: vec![EMPTY_SLOT; n],
            mask: n - 1,
            len: 0,
        }
    }

    #[inline]
    fn home(&self, hash: u32) -> usize {
        hash as usize & self.mask
    }

    /// The entry with this hash for which `eq` holds.
    #[inline]
    pub(super) fn find(&self, hash: u64, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
        let h = hash as u32;
        let mut pos = self.home(h);
        for _ in 0..self.slots.len() {
            let s = self.slots.get(pos)?;
            if s.idx == EMPTY {
                return None;
            }
            if s.hash == h && eq(s.idx) {
                return Some(s.idx);
            }
            pos = (pos + 1) & self.mask;
        }
        None
    }

    /// Adds an entry (the caller guarantees it is not present). Returns false only if the
    /// index is full, which its sizing rules out.
    pub(super) fn insert(&mut self, hash: u64, idx: u32) -> bool {
        let h = hash as u32;
        let mut pos = self.home(h);
        for _ in 0..self.slots.len() {
            if let Some(s) = self.slots.get_mut(pos) {
                if s.idx == EMPTY {
                    *s = Slot { hash: h, idx };
                    self.len += 1;
                    return true;
                }
            }
            pos = (pos + 1) & self.mask;
        }
        false
    }

    /// Removes entry `idx` stored under `hash`. Returns whether it was there.
    pub(super) fn remove(&mut self, hash: u64, idx: u32) -> bool {
        let h = hash as u32;
        let mut pos = self.home(h);
        let mut found = None;
        for _ in 0..self.slots.len() {
            let Some(s) = self.slots.get(pos) else {
                return false;
            };
            if s.idx == EMPTY {
                return false;
            }
            if s.idx == idx {
                found = Some(pos);
                break;
            }
            pos = (pos + 1) & self.mask;
        }
        let Some(mut hole) = found else {
            return false;
        };
        // Backward shift: pull later members of the cluster into the hole when the hole lies
        // on their probe path (between their home and where they sit).
        let mut j = (hole + 1) & self.mask;
        for _ in 0..self.slots.len() {
            let Some(&s) = self.slots.get(j) else {
                break;
            };
            if s.idx == EMPTY {
                break;
            }
            let from_home = j.wrapping_sub(self.home(s.hash)) & self.mask;
            let from_hole = j.wrapping_sub(hole) & self.mask;
            if from_home >= from_hole {
                if let Some(d) = self.slots.get_mut(hole) {
                    *d = s;
                }
                hole = j;
            }
            j = (j + 1) & self.mask;
        }
        if let Some(d) = self.slots.get_mut(hole) {
            *d = EMPTY_SLOT;
        }
        self.len -= 1;
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    // --- the index on its own, with hostile hashes -------------------------------------------

    proptest! {
        #[test]
        fn index_matches_a_hashmap(
            ops in prop::collection::vec((any::<bool>(), 0u32..40, 0u64..6), 1..300)
        ) {
            // Few distinct hashes, many keys: long clusters, wrap-around, backward shifts.
            let mut ix = Index::with_capacity(40);
            let mut model: HashMap<u32, u64> = HashMap::new();
            let hash_of = |k: u32, h: u64| if h == 5 { ix_wrap_hash() } else { h * 3 + u64::from(k % 2) };
            for (insert, key, h) in ops {
                let hash = hash_of(key, h);
                if insert {
                    if let std::collections::hash_map::Entry::Vacant(e) = model.entry(key) {
                        prop_assert!(ix.insert(hash, key));
                        e.insert(hash);
                    }
                } else if let Some(hash) = model.remove(&key) {
                    prop_assert!(ix.remove(hash, key));
                } else {
                    prop_assert!(!ix.remove(hash, key));
                }
                prop_assert_eq!(ix.len, model.len());
                for (&k, &hash) in &model {
                    prop_assert_eq!(ix.find(hash, |i| i == k), Some(k));
                }
                prop_assert_eq!(ix.find(12345, |_| true), None);
            }
        }
    }

    /// A hash whose home is the last slot of a 128-slot index.
    fn ix_wrap_hash() -> u64 {
        127
    }
}
