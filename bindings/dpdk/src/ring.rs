//! Ethdev ports backed by an `rte_ring` (the `net_ring` PMD through `rte_eth_from_ring`): what
//! one side enqueues, the port's rx queue delivers as ordinary mbufs. Benches and tests use
//! them to feed chosen frames through the real rx path without a NIC.

use std::ffi::CString;
use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use dpdk_sys as sys;

use crate::{Eal, Errno, Mbuf, Mempool, Port, PortConfig, PortError, MAX_BURST};

/// Why a [`RingPort`] could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingPortError {
    /// The name contains a NUL byte.
    #[error("ring port name contains a NUL byte")]
    BadName,
    /// `rte_ring_create` failed (EEXIST for a name in use, EINVAL for a size that is not a
    /// power of two, ENAMETOOLONG, ENOMEM...).
    #[error("rte_ring_create failed: {0}")]
    Ring(Errno),
    /// `rte_eth_from_ring` failed (is the `net_ring` PMD present?).
    #[error("rte_eth_from_ring failed: {0}")]
    Port(Errno),
}

/// An `rte_ring` and the ethdev port `net_ring_<name>` over it, whose rx and tx queue 0 are
/// both that ring: [`RingPort::inject`] (or a tx burst on the port) enqueues, an rx burst on
/// the port dequeues, in order. Dropping it removes the port and frees the ring.
///
/// Mbufs still queued in the ring on drop are not freed (their pools may be gone already):
/// drain the port first.
#[derive(Debug)]
pub struct RingPort<'eal> {
    ring: NonNull<sys::rte_ring>,
    id: u16,
    /// The vdev name, `net_ring_<name>`, for `rte_vdev_uninit`.
    dev_name: CString,
    _eal: PhantomData<&'eal Eal>,
}

impl<'eal> RingPort<'eal> {
    /// Ring slots used by benches and tests (holds `DEFAULT_SIZE - 1` mbufs).
    pub const DEFAULT_SIZE: u32 = 1024;

    /// Creates ring `name` with `size` slots (a power of two; it holds `size - 1` mbufs),
    /// multi-producer and multi-consumer, and the port `net_ring_<name>` over it. `name` must
    /// be unique among rings and at most 29 bytes.
    pub fn new(_eal: &'eal Eal, name: &str, size: u32) -> Result<Self, RingPortError> {
        let cname = CString::new(name).map_err(|_| RingPortError::BadName)?;
        let dev_name =
            CString::new(format!("net_ring_{name}")).map_err(|_| RingPortError::BadName)?;
        // SAFETY: EAL is initialised (borrowed `_eal`); `cname` is a valid C string for the
        // call (DPDK copies the name); flags 0 = multi-producer/multi-consumer.
        let raw = unsafe { sys::rte_ring_create(cname.as_ptr(), size, sys::SOCKET_ID_ANY, 0) };
        let ring = NonNull::new(raw).ok_or_else(|| RingPortError::Ring(Errno::last()))?;
        // SAFETY: `ring` is the live ring just created; the PMD keeps the pointer, and the ring
        // outlives the port (the port is removed in Drop before the ring is freed).
        let ret = unsafe { sys::rte_eth_from_ring(ring.as_ptr()) };
        let Ok(id) = u16::try_from(ret) else {
            let errno = Errno::last();
            // SAFETY: no port refers to the ring (creation failed); freed once.
            unsafe { sys::rte_ring_free(ring.as_ptr()) };
            return Err(RingPortError::Port(errno));
        };
        Ok(Self {
            ring,
            id,
            dev_name,
            _eal: PhantomData,
        })
    }

    /// The ethdev port id.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Configures the port (one rx queue into `pool`, one tx queue). The [`Port`] borrows this
    /// `RingPort`, so it is closed before the ring is freed.
    pub fn configure<'a>(
        &'a self,
        pool: &'a Mempool<'_>,
        cfg: PortConfig,
    ) -> Result<Port<'a>, PortError> {
        Port::configure(self.id, pool, cfg)
    }

    /// Enqueues mbufs from the front of `pkts` (at most [`MAX_BURST`]) for the port to
    /// receive; the queued ones are removed from `pkts`, the rest (ring full) stay. Returns how
    /// many were queued. Safe from any thread (the ring is multi-producer).
    pub fn inject(&self, pkts: &mut Vec<Mbuf<'_>>) -> usize {
        if pkts.is_empty() {
            return 0;
        }
        let mut raw: [*mut std::ffi::c_void; MAX_BURST] = [ptr::null_mut(); MAX_BURST];
        let count = pkts.len().min(MAX_BURST);
        for (slot, m) in raw.iter_mut().zip(pkts.iter()) {
            *slot = m.as_raw().cast();
        }
        // SAFETY: live multi-producer ring; `raw` holds `count` valid mbufs owned by `pkts`;
        // the ring takes ownership of the first `queued`, forgotten below without freeing.
        let queued = unsafe {
            sys::rte_ring_enqueue_burst(
                self.ring.as_ptr(),
                raw.as_ptr(),
                count as u32,
                ptr::null_mut(),
            )
        };
        let queued = (queued as usize).min(count);
        for m in pkts.drain(..queued) {
            // Owned by the ring now.
            let _ = m.into_raw();
        }
        queued
    }

    /// Mbufs waiting in the ring.
    pub fn queued(&self) -> usize {
        // SAFETY: live ring; a plain read of its head/tail.
        unsafe { sys::rte_ring_count(self.ring.as_ptr()) as usize }
    }
}

impl Drop for RingPort<'_> {
    fn drop(&mut self) {
        if crate::port::is_claimed(self.id) {
            // A `Port` configured through `Port::configure(ring.id())` (not through
            // `RingPort::configure`) still uses the ring: leak it rather than free it under
            // the port.
            tracing::error!(
                port = self.id,
                "RingPort dropped while a Port still manages it; ring leaked"
            );
            return;
        }
        // SAFETY: no `Port` manages the id; removing the vdev closes and releases the ethdev if
        // still there (a `Port` drop may have closed it already), so nothing uses the ring after.
        let _ = unsafe { sys::rte_vdev_uninit(self.dev_name.as_ptr()) };
        // SAFETY: the port over the ring is gone; the ring is freed exactly once.
        unsafe { sys::rte_ring_free(self.ring.as_ptr()) };
    }
}
