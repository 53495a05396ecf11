//! IPv4 longest-prefix-match tables from DPDK: [`RteLpm`] (`rte_lpm`) and
//! [`RteFib`] (`rte_fib`, DIR24_8 with 4-byte next hops).
//!
//! Both tables are freed on drop and borrow the [`Eal`], so they cannot
//! outlive it. They hold a raw pointer and are therefore neither `Send` nor
//! `Sync`: they stay on the EAL thread.

use std::ffi::CString;
use std::marker::PhantomData;
use std::os::raw::{c_int, c_uint};
use std::ptr::NonNull;

use dpdk_sys as sys;

use crate::{Eal, Errno};

/// Why an LPM/FIB table could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The name contains a NUL byte.
    #[error("table name contains a NUL byte")]
    BadName,
    /// A size does not fit the C type DPDK takes.
    #[error("table size out of range")]
    TooLarge,
    /// `rte_lpm_create` / `rte_fib_create` failed (EEXIST, ENOMEM, EINVAL...).
    #[error("table create failed: {0}")]
    Create(Errno),
}

/// Bit set in a raw `rte_lpm` entry when the lookup found a route.
const LPM_SUCCESS: u32 = sys::RTE_LPM_LOOKUP_SUCCESS;
/// The next-hop bits of a raw `rte_lpm` entry.
const LPM_NH_MASK: u32 = 0x00ff_ffff;

/// An `rte_lpm` table (24-bit next hops).
#[derive(Debug)]
pub struct RteLpm<'eal> {
    raw: NonNull<sys::rte_lpm>,
    _eal: PhantomData<&'eal Eal>,
}

impl<'eal> RteLpm<'eal> {
    /// Largest next hop `rte_lpm` stores.
    pub const MAX_NEXT_HOP: u32 = LPM_NH_MASK;

    /// `rte_lpm_create` with room for `max_rules` routes and `number_tbl8s`
    /// tbl8 groups (one per /24 that holds a route longer than /24), on any
    /// NUMA socket.
    pub fn new(
        _eal: &'eal Eal,
        name: &str,
        max_rules: u32,
        number_tbl8s: u32,
    ) -> Result<Self, TableError> {
        let cname = CString::new(name).map_err(|_| TableError::BadName)?;
        let config = sys::rte_lpm_config {
            max_rules,
            number_tbl8s,
            flags: 0,
        };
        // SAFETY: EAL is initialised (borrowed `_eal`); `cname` and `config`
        // are valid for the duration of the call (DPDK copies both).
        let raw = unsafe { sys::rte_lpm_create(cname.as_ptr(), sys::SOCKET_ID_ANY, &config) };
        NonNull::new(raw)
            .map(|raw| Self {
                raw,
                _eal: PhantomData,
            })
            .ok_or_else(|| TableError::Create(Errno::last()))
    }

    /// `rte_lpm_add`: route `ip/depth` (host byte order) to `next_hop`
    /// (at most [`RteLpm::MAX_NEXT_HOP`]).
    pub fn add(&mut self, ip: u32, depth: u8, next_hop: u32) -> Result<(), Errno> {
        // SAFETY: `raw` is a live table, exclusively borrowed; rte_lpm_add
        // validates depth and next hop itself.
        let ret = unsafe { sys::rte_lpm_add(self.raw.as_ptr(), ip, depth, next_hop) };
        if ret < 0 {
            Err(Errno::from_ret(ret))
        } else {
            Ok(())
        }
    }

    /// `rte_lpm_lookup`: the next hop of the longest match for `ip`.
    ///
    /// This goes through the out-of-line wrapper `dpdk-sys` generates for the
    /// `static inline` C function, so every lookup is a function call.
    #[inline]
    pub fn lookup(&self, ip: u32) -> Option<u32> {
        let mut nh = 0u32;
        // SAFETY: `raw` is a live table (only read); `nh` is a valid u32 to
        // write to.
        let ret = unsafe { sys::rte_lpm_lookup(self.raw.as_ptr(), ip, &mut nh) };
        (ret == 0).then_some(nh)
    }

    /// `rte_lpm_lookup_bulk`: writes the *raw* entry of `ips[i]` to `out[i]`
    /// (decode with [`RteLpm::decode`]) for `min(ips.len(), out.len())` keys.
    #[inline]
    pub fn lookup_bulk(&self, ips: &[u32], out: &mut [u32]) {
        let n = ips.len().min(out.len()).min(c_uint::MAX as usize);
        // SAFETY: `raw` is a live table (only read); `ips` has at least `n`
        // readable u32s and `out` at least `n` writable ones; `n` fits c_uint.
        unsafe {
            sys::rte_lpm_lookup_bulk_func(
                self.raw.as_ptr(),
                ips.as_ptr(),
                out.as_mut_ptr(),
                n as c_uint,
            )
        };
    }

    /// The next hop in a raw entry written by [`RteLpm::lookup_bulk`].
    #[inline]
    pub fn decode(entry: u32) -> Option<u32> {
        (entry & LPM_SUCCESS != 0).then_some(entry & LPM_NH_MASK)
    }
}

impl Drop for RteLpm<'_> {
    fn drop(&mut self) {
        // SAFETY: `raw` came from rte_lpm_create and is freed only here, once;
        // EAL is still alive (borrowed for 'eal).
        unsafe { sys::rte_lpm_free(self.raw.as_ptr()) };
    }
}

/// An `rte_fib` table of type DIR24_8 with 4-byte next hops.
#[derive(Debug)]
pub struct RteFib<'eal> {
    raw: NonNull<sys::rte_fib>,
    default_nh: u64,
    _eal: PhantomData<&'eal Eal>,
}

impl<'eal> RteFib<'eal> {
    /// Largest next hop (and default) of a 4-byte DIR24_8 table: one bit of
    /// each entry flags an extended (tbl8) entry.
    pub const MAX_NEXT_HOP: u64 = (1 << 31) - 1;

    /// `rte_fib_create` (DIR24_8, 4-byte next hops) with room for
    /// `max_routes` routes and `num_tbl8` tbl8 groups; addresses without a
    /// route look up as `default_nh`. Uses DPDK's default lookup function.
    pub fn dir24_8(
        _eal: &'eal Eal,
        name: &str,
        max_routes: u32,
        num_tbl8: u32,
        default_nh: u64,
    ) -> Result<Self, TableError> {
        let cname = CString::new(name).map_err(|_| TableError::BadName)?;
        let max_routes = c_int::try_from(max_routes).map_err(|_| TableError::TooLarge)?;
        // Field by field on a zeroed struct: DPDK 24.11 added `flags` (0 = defaults).
        // SAFETY: rte_fib_conf is plain integers and a union of integer structs, for
        // which all-zero is valid.
        let mut conf: sys::rte_fib_conf = unsafe { std::mem::zeroed() };
        conf.type_ = sys::RTE_FIB_DIR24_8;
        conf.default_nh = default_nh;
        conf.max_routes = max_routes;
        conf.rib_ext_sz = 0;
        conf.__bindgen_anon_1 = sys::rte_fib_conf__bindgen_ty_1 {
            dir24_8: sys::rte_fib_conf__bindgen_ty_1__bindgen_ty_1 {
                nh_sz: sys::RTE_FIB_DIR24_8_4B,
                num_tbl8,
            },
        };
        // SAFETY: EAL is initialised (borrowed `_eal`); `cname` and `conf`
        // are valid for the duration of the call (DPDK copies what it keeps).
        let raw = unsafe { sys::rte_fib_create(cname.as_ptr(), sys::SOCKET_ID_ANY, &mut conf) };
        NonNull::new(raw)
            .map(|raw| Self {
                raw,
                default_nh,
                _eal: PhantomData,
            })
            .ok_or_else(|| TableError::Create(Errno::last()))
    }

    /// The next hop that [`RteFib::lookup_bulk`] writes for an address
    /// without a route.
    pub fn default_nh(&self) -> u64 {
        self.default_nh
    }

    /// `rte_fib_add`: route `ip/depth` (host byte order) to `next_hop`
    /// (at most [`RteFib::MAX_NEXT_HOP`]).
    pub fn add(&mut self, ip: u32, depth: u8, next_hop: u64) -> Result<(), Errno> {
        // SAFETY: `raw` is a live table, exclusively borrowed; rte_fib_add
        // validates depth and next hop itself.
        let ret = unsafe { sys::rte_fib_add(self.raw.as_ptr(), ip, depth, next_hop) };
        if ret < 0 {
            Err(Errno::from_ret(ret))
        } else {
            Ok(())
        }
    }

    /// `rte_fib_lookup_bulk`: writes the next hop of `ips[i]` (or the default)
    /// to `out[i]` for `min(ips.len(), out.len())` keys.
    #[inline]
    pub fn lookup_bulk(&self, ips: &[u32], out: &mut [u64]) {
        let n = ips.len().min(out.len()).min(c_int::MAX as usize);
        // SAFETY: `raw` is a live table; the lookup only reads it. `ips` has
        // at least `n` readable u32s: the C prototype takes `uint32_t *` but
        // the data-plane lookup never writes through it. `out` has at least
        // `n` writable u64s; `n` fits c_int. With valid arguments the call
        // cannot fail (it returns -EINVAL only for NULL pointers).
        let _ = unsafe {
            sys::rte_fib_lookup_bulk(
                self.raw.as_ptr(),
                ips.as_ptr().cast_mut(),
                out.as_mut_ptr(),
                n as c_int,
            )
        };
    }
}

impl Drop for RteFib<'_> {
    fn drop(&mut self) {
        // SAFETY: `raw` came from rte_fib_create and is freed only here, once;
        // EAL is still alive (borrowed for 'eal).
        unsafe { sys::rte_fib_free(self.raw.as_ptr()) };
    }
}
