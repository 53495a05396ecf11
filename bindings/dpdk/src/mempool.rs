//! Packet-buffer pools and the mbufs drawn from them.

use std::ffi::CString;
use std::marker::PhantomData;
use std::ptr::NonNull;

use dpdk_sys as sys;

use crate::{Eal, Errno};

/// Why a mempool could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MempoolError {
    /// The name contains a NUL byte.
    #[error("mempool name contains a NUL byte")]
    BadName,
    /// `rte_pktmbuf_pool_create` failed (EEXIST for a duplicate name, ENOMEM, EINVAL...).
    #[error("rte_pktmbuf_pool_create failed: {0}")]
    Create(Errno),
}

/// A pktmbuf pool. Freed on drop; mbufs and ports borrow it, so it cannot be
/// freed while any of them is alive.
#[derive(Debug)]
pub struct Mempool<'eal> {
    raw: NonNull<sys::rte_mempool>,
    _eal: PhantomData<&'eal Eal>,
}

impl<'eal> Mempool<'eal> {
    /// Create a pool of `n` mbufs with `data_room` bytes of buffer each
    /// (use [`Mempool::DEFAULT_DATA_ROOM`] for 2 KiB + headroom), with a
    /// per-lcore cache of `cache` entries, on NUMA `socket` (`None`: any).
    pub fn pktmbuf(
        _eal: &'eal Eal,
        name: &str,
        n: u32,
        cache: u32,
        data_room: u16,
        socket: Option<u32>,
    ) -> Result<Self, MempoolError> {
        let cname = CString::new(name).map_err(|_| MempoolError::BadName)?;
        let socket = socket
            .and_then(|s| i32::try_from(s).ok())
            .unwrap_or(sys::SOCKET_ID_ANY);
        // SAFETY: EAL is initialised (borrowed `_eal`); `cname` is a valid C
        // string for the duration of the call (DPDK copies the name).
        let raw =
            unsafe { sys::rte_pktmbuf_pool_create(cname.as_ptr(), n, cache, 0, data_room, socket) };
        NonNull::new(raw)
            .map(|raw| Self {
                raw,
                _eal: PhantomData,
            })
            .ok_or_else(|| MempoolError::Create(Errno::last()))
    }

    /// DPDK's default mbuf data room (`RTE_MBUF_DEFAULT_BUF_SIZE`).
    pub const DEFAULT_DATA_ROOM: u16 = sys::RTE_MBUF_DEFAULT_BUF_SIZE as u16;

    /// Free mbufs currently in the pool (including per-lcore caches).
    pub fn available(&self) -> u32 {
        // SAFETY: `raw` is a live mempool.
        unsafe { sys::rte_mempool_avail_count(self.raw.as_ptr()) }
    }

    /// Take one mbuf from the pool (`None` when empty).
    pub fn alloc(&self) -> Option<Mbuf<'_>> {
        // SAFETY: `raw` is a live pktmbuf pool.
        let m = unsafe { sys::rte_pktmbuf_alloc(self.raw.as_ptr()) };
        NonNull::new(m).map(|raw| Mbuf {
            raw,
            _pool: PhantomData,
        })
    }

    /// Take `n` mbufs (at most [`crate::MAX_BURST`]) in one call, appending them to `out`
    /// (no allocation when `out` has the capacity): all or nothing, false when the pool has
    /// fewer than `n` free or `n` is too large.
    pub fn alloc_bulk<'a>(&'a self, out: &mut Vec<Mbuf<'a>>, n: usize) -> bool {
        let mut raw: [*mut sys::rte_mbuf; crate::MAX_BURST] =
            [std::ptr::null_mut(); crate::MAX_BURST];
        if n > raw.len() {
            return false;
        }
        // SAFETY: the array has room for `n` pointers; `self.raw` is a live pktmbuf pool.
        let ret =
            unsafe { sys::rte_pktmbuf_alloc_bulk(self.raw.as_ptr(), raw.as_mut_ptr(), n as u32) };
        if ret != 0 {
            return false;
        }
        out.extend(
            raw.iter()
                .take(n)
                .filter_map(|m| NonNull::new(*m))
                .map(|raw| Mbuf {
                    raw,
                    _pool: PhantomData,
                }),
        );
        true
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::rte_mempool {
        self.raw.as_ptr()
    }
}

impl Drop for Mempool<'_> {
    fn drop(&mut self) {
        // SAFETY: every mbuf and port using this pool borrows it, so all are
        // gone; the pool is freed exactly once.
        unsafe { sys::rte_mempool_free(self.raw.as_ptr()) };
    }
}

// SAFETY: rte_mempool get/put are multi-thread safe (ring-backed, per-lcore caches used only
// by EAL threads), so a pool may be shared by reference between the control thread and an
// lcore thread.
unsafe impl Sync for Mempool<'_> {}
// SAFETY: as above; the pool pointer is not tied to the creating thread.
unsafe impl Send for Mempool<'_> {}

/// One owned packet buffer; returned to its pool on drop.
#[derive(Debug)]
pub struct Mbuf<'pool> {
    raw: NonNull<sys::rte_mbuf>,
    _pool: PhantomData<&'pool ()>,
}

impl<'pool> Mbuf<'pool> {
    /// Wrap an mbuf handed over by DPDK.
    ///
    /// # Safety
    /// `raw` must be a valid mbuf owned by the caller, from a pool that
    /// outlives `'pool`.
    pub(crate) unsafe fn from_raw(raw: NonNull<sys::rte_mbuf>) -> Self {
        Self {
            raw,
            _pool: PhantomData,
        }
    }

    /// The raw pointer, still owned by this `Mbuf`.
    pub(crate) fn as_raw(&self) -> *mut sys::rte_mbuf {
        self.raw.as_ptr()
    }

    /// Give up ownership (e.g. to a tx queue).
    pub(crate) fn into_raw(self) -> *mut sys::rte_mbuf {
        let p = self.raw.as_ptr();
        std::mem::forget(self);
        p
    }

    /// Total packet length over all segments.
    pub fn pkt_len(&self) -> u32 {
        // SAFETY: we own a valid mbuf.
        unsafe { *sys::mbuf::pkt_len(self.raw.as_ptr()) }
    }

    /// Data length of this (first) segment.
    pub fn data_len(&self) -> u16 {
        // SAFETY: we own a valid mbuf.
        unsafe { *sys::mbuf::data_len(self.raw.as_ptr()) }
    }

    /// Port the packet arrived on.
    pub fn port(&self) -> u16 {
        // SAFETY: we own a valid mbuf.
        unsafe { *sys::mbuf::port(self.raw.as_ptr()) }
    }

    /// The first segment's data.
    pub fn data(&self) -> &[u8] {
        let m = self.raw.as_ptr();
        // SAFETY: we own a valid mbuf; buf_addr + data_off points at
        // data_len initialised bytes inside its buffer (DPDK's rte_pktmbuf_mtod).
        unsafe {
            let base = (*m)
                .buf_addr
                .cast::<u8>()
                .add(usize::from(*sys::mbuf::data_off(m)));
            std::slice::from_raw_parts(base, usize::from(*sys::mbuf::data_len(m)))
        }
    }

    /// Number of segments.
    pub fn segments(&self) -> u16 {
        // SAFETY: we own a valid mbuf.
        unsafe { *sys::mbuf::nb_segs(self.raw.as_ptr()) }
    }

    /// The 32-bit mark a `MARK` rte_flow action attached on receive, if any.
    pub fn mark(&self) -> Option<u32> {
        let m = self.raw.as_ptr();
        // SAFETY: we own a valid mbuf; ol_flags is a plain field.
        let flags = unsafe { (*m).ol_flags };
        if flags & u64::from(sys::RTE_MBUF_F_RX_FDIR_ID) == 0 {
            return None;
        }
        // SAFETY: with RTE_MBUF_F_RX_FDIR_ID set the driver stored the mark in
        // hash.fdir.hi (the union's active member).
        Some(unsafe { *sys::mbuf::fdir_hi(m) })
    }

    /// The first segment's data, writable.
    pub fn data_mut(&mut self) -> &mut [u8] {
        let m = self.raw.as_ptr();
        // SAFETY: as in `data`; `&mut self` makes the bytes exclusive (we own the
        // mbuf and hand out no other reference to its buffer).
        unsafe {
            let base = (*m)
                .buf_addr
                .cast::<u8>()
                .add(usize::from(*sys::mbuf::data_off(m)));
            std::slice::from_raw_parts_mut(base, usize::from(*sys::mbuf::data_len(m)))
        }
    }

    /// Append `len` bytes at the end of the packet and return them for
    /// writing; `None` if the buffer lacks tailroom.
    pub fn append(&mut self, len: u16) -> Option<&mut [u8]> {
        // SAFETY: we own a valid mbuf.
        let p = unsafe { sys::rte_pktmbuf_append(self.raw.as_ptr(), len) };
        if p.is_null() {
            return None;
        }
        // SAFETY: rte_pktmbuf_append returned `len` bytes of tailroom inside
        // our buffer, now counted in the packet; `&mut self` makes them exclusive.
        Some(unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), usize::from(len)) })
    }
}

// SAFETY: an mbuf is owned by one `Mbuf` at a time and may be freed from any thread.
unsafe impl Send for Mbuf<'_> {}

/// Headroom operations on single-segment mbufs, done on the fields as DPDK's inline helpers
/// do (no call per packet). A multi-segment mbuf refuses to change length (callers drop it).
impl flow_offload::soft::pipeline::PacketBuf for Mbuf<'_> {
    fn data(&self) -> &[u8] {
        Mbuf::data(self)
    }

    fn data_mut(&mut self) -> &mut [u8] {
        Mbuf::data_mut(self)
    }

    fn prepend(&mut self, n: usize) -> bool {
        let m = self.raw.as_ptr();
        let Ok(n) = u16::try_from(n) else {
            return false;
        };
        // SAFETY: we own a valid mbuf; only plain length fields change, and only
        // within the buffer (n <= data_off, the headroom).
        unsafe {
            if (*sys::mbuf::nb_segs(m)) != 1 || n > (*sys::mbuf::data_off(m)) {
                return false;
            }
            (*sys::mbuf::data_off(m)) -= n;
            (*sys::mbuf::data_len(m)) += n;
            (*sys::mbuf::pkt_len(m)) += u32::from(n);
        }
        true
    }

    fn adj(&mut self, n: usize) -> bool {
        let m = self.raw.as_ptr();
        let Ok(n) = u16::try_from(n) else {
            return false;
        };
        // SAFETY: we own a valid mbuf; n <= data_len keeps data inside the buffer.
        unsafe {
            if (*sys::mbuf::nb_segs(m)) != 1 || n > (*sys::mbuf::data_len(m)) {
                return false;
            }
            (*sys::mbuf::data_off(m)) += n;
            (*sys::mbuf::data_len(m)) -= n;
            (*sys::mbuf::pkt_len(m)) -= u32::from(n);
        }
        true
    }

    fn set_len(&mut self, len: usize) -> bool {
        let m = self.raw.as_ptr();
        let Ok(len) = u16::try_from(len) else {
            return false;
        };
        // SAFETY: we own a valid mbuf; data_off + len <= buf_len keeps the frame
        // inside the buffer.
        unsafe {
            if (*sys::mbuf::nb_segs(m)) != 1
                || u32::from(*sys::mbuf::data_off(m)) + u32::from(len)
                    > u32::from(*sys::mbuf::buf_len(m))
            {
                return false;
            }
            (*sys::mbuf::data_len(m)) = len;
            (*sys::mbuf::pkt_len(m)) = u32::from(len);
        }
        true
    }
}

impl Drop for Mbuf<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the mbuf and never use it again.
        unsafe { sys::rte_pktmbuf_free(self.raw.as_ptr()) };
    }
}
