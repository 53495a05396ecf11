//! The free-port bitmaps, one per (outside address, protocol), and the allocation blocks that
//! split the port range between the members of a redundancy group.

use serde::{Deserialize, Serialize};

use super::{NatConfigError, Proto, Random, PORT_PROBES};

/// A member's share of the port range, for a group of NAT members (an active/standby pair,
/// say) that must never hand out the same outside endpoint, even when each believes it is the
/// only one (split brain).
///
/// The configured port range `lo..=hi` (`n` ports) is cut into `count` contiguous, disjoint
/// blocks of near-equal size (they differ by at most one port): block `i` is the offsets
/// `i·n/count .. (i+1)·n/count` (rounded down) of the range. A member allocates new ports only
/// from block `index`, on every outside address of the pool and for every protocol, so two
/// members with different indexes never choose the same `(outside addr, port, proto)`.
///
/// The split is by port, not by address, because of paired pooling (RFC 4787 REQ-2): an inside
/// host is always behind the one outside address its hash picks, and that address must offer
/// ports to the host whichever member serves it. Splitting the pool's addresses between
/// members would instead move hosts to other addresses on failover (breaking pairing for
/// their live mappings) or leave a member without any port for the hosts paired with the
/// other's addresses. Each member therefore gets `1/count` of every address's ports.
///
/// Ports outside the block are still tracked: sessions imported from a peer
/// ([`super::NatTable::import`]) keep the port the peer chose in its own block, and that port
/// is marked used here, so it is never handed out twice; when such a mapping ends its port is
/// simply not reused by this member.
///
/// The default, block 0 of 1, is the whole range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AllocBlock {
    /// This member's block, `0..count`.
    pub index: u8,
    /// Blocks the port range is cut into (members of the group), at least 1.
    pub count: u8,
}

impl AllocBlock {
    /// The whole port range: block 0 of 1.
    pub const WHOLE: AllocBlock = AllocBlock { index: 0, count: 1 };

    /// Block `index` of `count` (checked when the table is built).
    pub const fn new(index: u8, count: u8) -> Self {
        AllocBlock { index, count }
    }

    /// The ports of this block within the inclusive `port_range`, or why the block is refused:
    /// it does not exist (`count` is 0 or `index >= count`), or the range has fewer ports than
    /// `count`, so that some block of the group would be empty. The range itself must be
    /// valid (non-empty).
    pub fn ports(self, port_range: (u16, u16)) -> Result<(u16, u16), NatConfigError> {
        let AllocBlock { index, count } = self;
        if count == 0 || index >= count {
            return Err(NatConfigError::BadBlock { index, count });
        }
        let (lo, hi) = port_range;
        let n = (u32::from(hi) + 1).saturating_sub(u32::from(lo));
        let (start, end) = block_offsets(n, index, count);
        if n < u32::from(count) || end <= start {
            return Err(NatConfigError::EmptyBlock {
                index,
                count,
                ports: n,
            });
        }
        let first = u16::try_from(u32::from(lo) + start);
        let last = u16::try_from(u32::from(lo) + end - 1);
        match (first, last) {
            (Ok(a), Ok(b)) => Ok((a, b)),
            _ => Err(NatConfigError::BadPortRange { lo, hi }),
        }
    }
}

impl Default for AllocBlock {
    fn default() -> Self {
        AllocBlock::WHOLE
    }
}

/// The offsets `start..end` of block `index` of `count` in a range of `n` ports.
fn block_offsets(n: u32, index: u8, count: u8) -> (u32, u32) {
    let n = u64::from(n);
    let c = u64::from(count.max(1));
    let start = n * u64::from(index) / c;
    let end = n * (u64::from(index) + 1) / c;
    (start as u32, end as u32)
}

/// One free-port bitmap per (outside address, protocol), over the configured range; new ports
/// come from the allocation block only.
pub(super) struct PortBitmaps {
    pub(super) lo: u16,
    /// Ports in the range (1..=65535).
    pub(super) n: u32,
    /// 64-bit words per bitmap.
    pub(super) words: usize,
    /// Set bit = port in use.
    pub(super) bits: Vec<u64>,
    /// Free ports per bitmap.
    pub(super) free: Vec<u32>,
    /// First offset of the allocation block.
    pub(super) blo: u32,
    /// Ports in the allocation block (at least 1).
    pub(super) bn: u32,
    /// Free ports of the allocation block, per bitmap.
    pub(super) block_free: Vec<u32>,
}

impl PortBitmaps {
    /// Bitmaps for `lo..=hi`, allocating from `block` (inclusive, within the range).
    pub(super) fn new(sets: usize, lo: u16, hi: u16, block: (u16, u16)) -> Self {
        let n = u32::from(hi) - u32::from(lo) + 1;
        let words = n.div_ceil(64) as usize;
        let blo = u32::from(block.0).saturating_sub(u32::from(lo));
        let bn = (u32::from(block.1) + 1).saturating_sub(u32::from(block.0));
        PortBitmaps {
            lo,
            n,
            words,
            bits: vec![0; sets * words],
            free: vec![n; sets],
            blo,
            bn,
            block_free: vec![bn; sets],
        }
    }

    /// Moves the allocation block to `block` (inclusive, within the range): ports in use stay
    /// in use wherever they are; only where new ports come from changes.
    pub(super) fn set_block(&mut self, block: (u16, u16)) {
        self.blo = u32::from(block.0).saturating_sub(u32::from(self.lo));
        self.bn = (u32::from(block.1) + 1).saturating_sub(u32::from(block.0));
        let (bn, words) = (self.bn, self.words);
        if bn == 0 {
            self.block_free.iter_mut().for_each(|f| *f = 0);
            return;
        }
        let wlo = (self.blo / 64) as usize;
        let whi = ((self.blo + bn - 1) / 64) as usize;
        let masks: Vec<u64> = (wlo..=whi).map(|w| !self.outside_block(w)).collect();
        for (set, f) in self.block_free.iter_mut().enumerate() {
            let used: u32 = (wlo..=whi)
                .zip(&masks)
                .map(|(w, m)| {
                    self.bits
                        .get(set * words + w)
                        .map_or(0, |b| (b & m).count_ones())
                })
                .sum();
            *f = bn.saturating_sub(used);
        }
    }

    pub(super) fn set_of(addr_idx: u32, proto: Proto) -> usize {
        addr_idx as usize * 3 + proto.index()
    }

    /// Free ports of the allocation block in bitmap `set`.
    pub(super) fn block_free(&self, set: usize) -> u32 {
        self.block_free.get(set).copied().unwrap_or(0)
    }

    fn in_block(&self, off: u32) -> bool {
        off >= self.blo && off - self.blo < self.bn
    }

    /// Bits of word `w` outside the allocation block (and so beyond the range), reported as
    /// used. For the whole range this is just the bits beyond its end.
    fn outside_block(&self, w: usize) -> u64 {
        let first = w as u64 * 64;
        let blo = u64::from(self.blo);
        let bend = blo + u64::from(self.bn);
        let mut mask = 0;
        if blo > first {
            let below = blo - first;
            mask |= if below >= 64 {
                u64::MAX
            } else {
                (1u64 << below) - 1
            };
        }
        if bend < first + 64 {
            let keep = bend.saturating_sub(first);
            mask |= if keep == 0 {
                u64::MAX
            } else {
                !((1u64 << keep) - 1)
            };
        }
        mask
    }

    fn take(&mut self, set: usize, off: u32) -> Option<u16> {
        let word = self.bits.get_mut(set * self.words + (off / 64) as usize)?;
        *word |= 1u64 << (off % 64);
        if let Some(f) = self.free.get_mut(set) {
            *f = f.saturating_sub(1);
        }
        if self.in_block(off) {
            if let Some(f) = self.block_free.get_mut(set) {
                *f = f.saturating_sub(1);
            }
        }
        u16::try_from(u32::from(self.lo) + off).ok()
    }

    pub(super) fn is_free(&self, set: usize, off: u32) -> bool {
        self.bits
            .get(set * self.words + (off / 64) as usize)
            .is_some_and(|w| w & (1u64 << (off % 64)) == 0)
    }

    /// The offset of `port` in the range, if it lies in it.
    fn offset(&self, port: u16) -> Option<u32> {
        u32::from(port)
            .checked_sub(u32::from(self.lo))
            .filter(|off| *off < self.n)
    }

    /// Whether `port` (anywhere in the range, in the block or not) is free in bitmap `set`.
    /// False for a port outside the range.
    pub(super) fn port_free(&self, set: usize, port: u16) -> bool {
        self.offset(port).is_some_and(|off| self.is_free(set, off))
    }

    /// Marks a given free `port` (anywhere in the range) used. Returns false, changing
    /// nothing, if it is already used or outside the range.
    pub(super) fn claim(&mut self, set: usize, port: u16) -> bool {
        match self.offset(port) {
            Some(off) if self.is_free(set, off) => self.take(set, off).is_some(),
            _ => false,
        }
    }

    /// A free port of the allocation block, marked used: [`PORT_PROBES`] uniform random
    /// probes of the block, then a word-wise scan of the block from a random word.
    pub(super) fn alloc(&mut self, set: usize, rng: &mut impl Random) -> Option<u16> {
        if self.block_free(set) == 0 {
            return None;
        }
        let n = u64::from(self.bn);
        for _ in 0..PORT_PROBES {
            let off = self.blo + ((u64::from(rng.next_u32()) * n) >> 32) as u32;
            if self.is_free(set, off) {
                return self.take(set, off);
            }
        }
        let wlo = (self.blo / 64) as usize;
        let whi = ((self.blo + self.bn - 1) / 64) as usize;
        let words = whi - wlo + 1;
        let start = ((u64::from(rng.next_u32()) * words as u64) >> 32) as usize;
        for k in 0..words {
            let w = wlo + (start + k) % words;
            let used = self
                .bits
                .get(set * self.words + w)
                .copied()
                .unwrap_or(u64::MAX)
                | self.outside_block(w);
            if used != u64::MAX {
                let off = (w * 64) as u32 + (!used).trailing_zeros();
                return self.take(set, off);
            }
        }
        None
    }

    pub(super) fn release(&mut self, set: usize, port: u16) {
        let Some(off) = self.offset(port) else {
            return;
        };
        let in_block = self.in_block(off);
        if let Some(word) = self.bits.get_mut(set * self.words + (off / 64) as usize) {
            let bit = 1u64 << (off % 64);
            if *word & bit != 0 {
                *word &= !bit;
                if let Some(f) = self.free.get_mut(set) {
                    *f += 1;
                }
                if in_block {
                    if let Some(f) = self.block_free.get_mut(set) {
                        *f += 1;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::soft::nat::XorShift32;
    use proptest::prelude::*;

    #[test]
    fn blocks_tile_the_range() {
        assert_eq!(
            AllocBlock::default().ports((1024, 65535)),
            Ok((1024, 65535))
        );
        assert_eq!(
            AllocBlock::new(0, 2).ports((1024, 65535)),
            Ok((1024, 33279))
        );
        assert_eq!(
            AllocBlock::new(1, 2).ports((1024, 65535)),
            Ok((33280, 65535))
        );
        assert_eq!(AllocBlock::new(2, 3).ports((1, 10)), Ok((7, 10)));
        assert_eq!(
            AllocBlock::new(0, 1).ports((65535, 65535)),
            Ok((65535, 65535))
        );
        assert_eq!(
            AllocBlock::new(0, 0).ports((1, 10)),
            Err(NatConfigError::BadBlock { index: 0, count: 0 })
        );
        assert_eq!(
            AllocBlock::new(2, 2).ports((1, 10)),
            Err(NatConfigError::BadBlock { index: 2, count: 2 })
        );
        assert_eq!(
            AllocBlock::new(0, 3).ports((5, 6)),
            Err(NatConfigError::EmptyBlock {
                index: 0,
                count: 3,
                ports: 2
            })
        );
    }

    proptest! {
        #[test]
        fn blocks_are_contiguous_disjoint_and_near_equal(
            lo in 1u16..=65535, len in 0u32..70000, count in 1u8..=255
        ) {
            let hi = u16::try_from((u32::from(lo) + len).min(65535)).unwrap();
            let n = u32::from(hi) - u32::from(lo) + 1;
            let mut next = u32::from(lo);
            let mut sizes = Vec::new();
            for index in 0..count {
                match AllocBlock::new(index, count).ports((lo, hi)) {
                    Ok((a, b)) => {
                        prop_assert!(n >= u32::from(count));
                        prop_assert_eq!(u32::from(a), next);
                        prop_assert!(a <= b);
                        next = u32::from(b) + 1;
                        sizes.push(u32::from(b) - u32::from(a) + 1);
                    }
                    Err(e) => {
                        prop_assert!(n < u32::from(count));
                        prop_assert!(matches!(e, NatConfigError::EmptyBlock { .. }), "{:?}", e);
                    }
                }
            }
            if n >= u32::from(count) {
                prop_assert_eq!(next, u32::from(hi) + 1, "the blocks tile the range");
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                prop_assert!(max - min <= 1);
            }
        }

        #[test]
        fn alloc_stays_in_the_block_and_finds_every_port(
            lo in 1u16..2000, len in 0u16..300, count in 1u8..5, pick in any::<u8>(), seed in any::<u32>()
        ) {
            let hi = lo + len;
            let index = pick % count;
            let Ok(block) = AllocBlock::new(index, count).ports((lo, hi)) else {
                return Ok(());
            };
            let mut p = PortBitmaps::new(3, lo, hi, block);
            let mut rng = XorShift32(seed);
            // Some ports outside the block taken by a peer first.
            let mut foreign = 0;
            for port in (lo..=hi).step_by(7) {
                if port < block.0 || port > block.1 {
                    prop_assert!(p.claim(1, port));
                    prop_assert!(!p.claim(1, port));
                    foreign += 1;
                }
            }
            let size = u32::from(block.1 - block.0) + 1;
            let mut got = std::collections::HashSet::new();
            while let Some(port) = p.alloc(1, &mut rng) {
                prop_assert!(port >= block.0 && port <= block.1);
                prop_assert!(got.insert(port));
            }
            prop_assert_eq!(got.len() as u32, size);
            prop_assert_eq!(p.block_free(1), 0);
            prop_assert_eq!(p.free[1], p.n - size - foreign);
            for port in got {
                p.release(1, port);
            }
            prop_assert_eq!(p.block_free(1), size);
            prop_assert_eq!(p.block_free(0), size);
        }
    }
}
