//! The keyed hashes of the NAT: the four index keys, seeded per table (keys are
//! attacker-influenced), and paired pooling, keyed by the pool (so that members of an
//! allocation group pair every inside host with the same outside address).
//!
//! The hasher is a multiply-xorshift over 64-bit words with the murmur3 finaliser. It is not a
//! cryptographic PRF: it makes index collisions unpredictable to an outsider who does not know
//! the seed, and probe lengths are bounded by the index size in any case.

use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;

use super::Proto;

const MUL: u64 = 0x9E37_79B9_7F4A_7C15;
const TAG_MAP: u64 = 0x6d61_7070_696e_6721;
const TAG_OUT: u64 = 0x6f75_7462_6f75_6e64;
const TAG_IN: u64 = 0x696e_626f_756e_6421;
const TAG_POOL: u64 = 0x706f_6f6c_6564_2121;
const TAG_PAIR_KEY: u64 = 0x7061_6972_2d6b_6579;
const TAG_BIND: u64 = 0x6269_6e64_696e_6721;

/// A seeded multiply-xorshift hasher over 64-bit words.
#[derive(Clone, Copy)]
struct Mix(u64);

impl Mix {
    #[inline]
    fn new(seed: u64, tag: u64) -> Self {
        Mix(seed ^ tag.wrapping_mul(MUL))
    }

    #[inline]
    fn add(&mut self, v: u64) {
        let x = (self.0 ^ v).wrapping_mul(MUL);
        self.0 = x ^ (x >> 29);
    }
}

impl Hasher for Mix {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            if let Ok(b) = <[u8; 8]>::try_from(c) {
                self.add(u64::from_le_bytes(b));
            }
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            for (d, s) in b.iter_mut().zip(rest) {
                *d = *s;
            }
            self.add(u64::from_le_bytes(b) ^ ((rest.len() as u64) << 59));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        // The murmur3 64-bit finaliser.
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }
}

fn addr_word(a: Ipv4Addr) -> u64 {
    u64::from(u32::from(a))
}

/// The mapping index key `(proto, inside addr, inside port)`.
pub(super) fn map_key<I: Hash>(seed: u64, proto: Proto, inside: &(I, u16)) -> u64 {
    let mut h = Mix::new(seed, TAG_MAP);
    h.add((proto.tag() << 16) | u64::from(inside.1));
    inside.0.hash(&mut h);
    h.finish()
}

/// The outbound index key `(proto, inside addr, inside port, remote addr, remote port)`.
pub(super) fn out_key<I: Hash>(
    seed: u64,
    proto: Proto,
    inside: &(I, u16),
    remote: (Ipv4Addr, u16),
) -> u64 {
    let mut h = Mix::new(seed, TAG_OUT);
    h.add((addr_word(remote.0) << 32) | (u64::from(inside.1) << 16) | u64::from(remote.1));
    h.add(proto.tag());
    inside.0.hash(&mut h);
    h.finish()
}

/// The inbound index key `(proto, outside addr, outside port, remote addr, remote port)`.
pub(super) fn in_key(
    seed: u64,
    proto: Proto,
    outside: (Ipv4Addr, u16),
    remote: (Ipv4Addr, u16),
) -> u64 {
    let mut h = Mix::new(seed, TAG_IN);
    h.add((addr_word(outside.0) << 32) | (u64::from(outside.1) << 16) | u64::from(remote.1));
    h.add((addr_word(remote.0) << 8) | proto.tag());
    h.finish()
}

/// The binding index key `(proto, outside addr, outside port)`.
pub(super) fn bind_key(seed: u64, proto: Proto, outside: (Ipv4Addr, u16)) -> u64 {
    let mut h = Mix::new(seed, TAG_BIND);
    h.add((addr_word(outside.0) << 24) | (u64::from(outside.1) << 8) | proto.tag());
    h.finish()
}

/// The key of paired pooling: a function of the pool (addresses in order) only, so that every
/// member of an allocation group configured with the same pool pairs every inside host with
/// the same outside address, whatever its own random seed.
pub(super) fn pairing_key(pool: &[Ipv4Addr]) -> u64 {
    let mut h = Mix::new(pool.len() as u64, TAG_PAIR_KEY);
    for a in pool {
        h.add(addr_word(*a));
    }
    h.finish()
}

/// The pool index paired with an inside address (`pool_len` > 0).
pub(super) fn pool_index<I: Hash>(pairing_key: u64, inside: &I, pool_len: usize) -> u32 {
    let mut h = Mix::new(pairing_key, TAG_POOL);
    inside.hash(&mut h);
    (h.finish() % pool_len.max(1) as u64) as u32
}
