//! Ethernet ports with one rx and one tx queue.

use std::collections::HashSet;
use std::ffi::CString;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use dpdk_sys as sys;

use crate::errno::check;
use crate::{Errno, Mbuf, Mempool};

/// Why a port operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// No port of that name (is its driver loaded / vdev given to EAL?).
    #[error("no ethdev port named {0:?}")]
    NotFound(String),
    /// Another live `Port` already manages this port id.
    #[error("port {0} is already configured by another Port handle")]
    AlreadyClaimed(u16),
    /// A DPDK ethdev call failed.
    #[error("{call} failed: {errno}")]
    Call {
        /// The failing DPDK function.
        call: &'static str,
        /// Its error.
        errno: Errno,
    },
}

/// Port ids owned by a live `Port`, so one id never has two owners (two
/// owners could close it under each other).
static CLAIMED: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

fn claim(id: u16) -> bool {
    let mut g = CLAIMED.lock().unwrap_or_else(PoisonError::into_inner);
    g.get_or_insert_with(HashSet::new).insert(id)
}

/// Whether a live `Port` manages `id`.
pub(crate) fn is_claimed(id: u16) -> bool {
    let g = CLAIMED.lock().unwrap_or_else(PoisonError::into_inner);
    g.as_ref().is_some_and(|set| set.contains(&id))
}

fn release(id: u16) {
    let mut g = CLAIMED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(set) = g.as_mut() {
        set.remove(&id);
    }
}

fn call(name: &'static str, ret: i32) -> Result<(), PortError> {
    check(ret).map_err(|errno| PortError::Call { call: name, errno })
}

/// Ring sizes for [`Port::configure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortConfig {
    /// Rx descriptors.
    pub rx_desc: u16,
    /// Tx descriptors.
    pub tx_desc: u16,
}

impl Default for PortConfig {
    fn default() -> Self {
        Self {
            rx_desc: 256,
            tx_desc: 256,
        }
    }
}

/// A configured ethdev port with rx/tx queue 0, receiving into `'pool`.
/// Dropping it stops (if started) and closes the port.
#[derive(Debug)]
pub struct Port<'pool> {
    id: u16,
    pool: &'pool Mempool<'pool>,
    started: bool,
    /// Whether a [`Queue`] handle for queue 0 is out.
    queue_taken: AtomicBool,
}

/// Most packets one [`Queue::rx_burst`] or [`Queue::tx_burst`] call moves.
pub const MAX_BURST: usize = 64;

/// Exclusive use of a started port's rx/tx queue 0, for one lcore thread, while other
/// threads keep the [`Port`] for control (flows, meters, stats). Released on drop.
#[derive(Debug)]
pub struct Queue<'port, 'pool> {
    port: &'port Port<'pool>,
}

impl<'pool> Port<'pool> {
    /// Look up a port id by device name (e.g. `net_null0`).
    pub fn id_by_name(_eal: &crate::Eal, name: &str) -> Result<u16, PortError> {
        let cname = CString::new(name).map_err(|_| PortError::NotFound(name.to_owned()))?;
        let mut id = 0u16;
        // SAFETY: EAL is initialised; valid C string and out-pointer.
        let ret = unsafe { sys::rte_eth_dev_get_port_by_name(cname.as_ptr(), &mut id) };
        if ret != 0 {
            return Err(PortError::NotFound(name.to_owned()));
        }
        Ok(id)
    }

    /// Configure port `id` with one rx queue (filled from `pool`) and one tx
    /// queue, default offloads.
    pub fn configure(
        id: u16,
        pool: &'pool Mempool<'_>,
        cfg: PortConfig,
    ) -> Result<Self, PortError> {
        // SAFETY: plain query, any port id is accepted.
        let valid = unsafe { sys::rte_eth_dev_is_valid_port(id) };
        if valid == 0 {
            return Err(PortError::Call {
                call: "rte_eth_dev_is_valid_port",
                errno: Errno::NODEV,
            });
        }
        if !claim(id) {
            return Err(PortError::AlreadyClaimed(id));
        }
        // SAFETY: valid port id.
        let socket = unsafe { sys::rte_eth_dev_socket_id(id) };
        let socket = u32::try_from(socket).unwrap_or(0);
        let conf = sys::rte_eth_conf::default();
        // SAFETY: valid port, zeroed config living across the call.
        if let Err(e) = call("rte_eth_dev_configure", unsafe {
            sys::rte_eth_dev_configure(id, 1, 1, &conf)
        }) {
            release(id);
            return Err(e);
        }
        // From here on, Drop closes the port if a later step fails.
        // Lifetime note: `Mempool<'eal>` is covariant, so it shortens to 'pool.
        let port = Self {
            id,
            pool,
            started: false,
            queue_taken: AtomicBool::new(false),
        };
        // SAFETY: configured port, queue 0 < 1, NULL conf = driver defaults,
        // live pool that outlives the port (borrowed for 'pool).
        call("rte_eth_rx_queue_setup", unsafe {
            sys::rte_eth_rx_queue_setup(id, 0, cfg.rx_desc, socket, ptr::null(), pool.as_ptr())
        })?;
        // SAFETY: configured port, queue 0 < 1, NULL conf = driver defaults.
        call("rte_eth_tx_queue_setup", unsafe {
            sys::rte_eth_tx_queue_setup(id, 0, cfg.tx_desc, socket, ptr::null())
        })?;
        Ok(port)
    }

    /// The port id.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Start the port.
    pub fn start(&mut self) -> Result<(), PortError> {
        // SAFETY: configured port with its queues set up.
        call("rte_eth_dev_start", unsafe {
            sys::rte_eth_dev_start(self.id)
        })?;
        self.started = true;
        Ok(())
    }

    /// Stop the port (it can be started again).
    pub fn stop(&mut self) -> Result<(), PortError> {
        // SAFETY: valid port; stopping a stopped port is harmless.
        call("rte_eth_dev_stop", unsafe {
            sys::rte_eth_dev_stop(self.id)
        })?;
        self.started = false;
        Ok(())
    }

    /// Receive up to `max` (at most [`MAX_BURST`]) packets from queue 0, appending them to
    /// `out`; returns how many arrived.
    pub fn rx_burst(&mut self, out: &mut Vec<Mbuf<'pool>>, max: u16) -> usize {
        if !self.started {
            return 0;
        }
        rx_burst(self.id, out, max)
    }

    /// Send packets from the front of `pkts` on queue 0; the sent ones are
    /// removed from `pkts` (now owned by the driver), the rest stay. Returns
    /// how many were sent.
    pub fn tx_burst(&mut self, pkts: &mut Vec<Mbuf<'_>>) -> usize {
        if !self.started {
            return 0;
        }
        tx_burst(self.id, pkts)
    }

    /// Takes queue 0 for one thread while this handle stays usable for control. The port must
    /// be started; one queue handle at a time.
    pub fn queue(&self) -> Result<Queue<'_, 'pool>, PortError> {
        if !self.started {
            return Err(PortError::Call {
                call: "queue (port not started)",
                errno: Errno::INVAL,
            });
        }
        if self.queue_taken.swap(true, Ordering::AcqRel) {
            return Err(PortError::AlreadyClaimed(self.id));
        }
        Ok(Queue { port: self })
    }

    /// Basic counters (packets in/out, bytes, errors).
    pub fn stats(&self) -> Result<PortStats, PortError> {
        let mut s = sys::rte_eth_stats::default();
        // SAFETY: valid port and out-pointer.
        call("rte_eth_stats_get", unsafe {
            sys::rte_eth_stats_get(self.id, &mut s)
        })?;
        Ok(PortStats {
            ipackets: s.ipackets,
            opackets: s.opackets,
            ibytes: s.ibytes,
            obytes: s.obytes,
            imissed: s.imissed,
            ierrors: s.ierrors,
            oerrors: s.oerrors,
            rx_nombuf: s.rx_nombuf,
        })
    }

    /// The pool this port receives into.
    pub fn pool(&self) -> &'pool Mempool<'pool> {
        self.pool
    }
}

impl<'pool> Queue<'_, 'pool> {
    /// The port id.
    pub fn port_id(&self) -> u16 {
        self.port.id
    }

    /// Receive up to `max` (at most [`MAX_BURST`]) packets, appending them to `out` (no
    /// allocation when `out` has the capacity); returns how many arrived.
    pub fn rx_burst(&mut self, out: &mut Vec<Mbuf<'pool>>, max: u16) -> usize {
        rx_burst(self.port.id, out, max)
    }

    /// Send packets from the front of `pkts` (at most [`MAX_BURST`]); the sent ones are
    /// removed from `pkts`, the rest stay. Returns how many were sent.
    pub fn tx_burst(&mut self, pkts: &mut Vec<Mbuf<'_>>) -> usize {
        tx_burst(self.port.id, pkts)
    }
}

impl Drop for Queue<'_, '_> {
    fn drop(&mut self) {
        self.port.queue_taken.store(false, Ordering::Release);
    }
}

/// rx burst on queue 0 of a started port whose queue the caller holds exclusively.
fn rx_burst<'pool>(id: u16, out: &mut Vec<Mbuf<'pool>>, max: u16) -> usize {
    let mut buf: [*mut sys::rte_mbuf; MAX_BURST] = [ptr::null_mut(); MAX_BURST];
    let max = max.min(MAX_BURST as u16);
    // SAFETY: started port, queue 0 exists, `buf` has room for `max` pointers;
    // the caller holds queue 0 exclusively (`&mut` Port or Queue).
    let n = unsafe { sys::rte_eth_rx_burst(id, 0, buf.as_mut_ptr(), max) };
    let n = usize::from(n);
    out.extend(
        buf.iter()
            .take(n)
            .filter_map(|m| NonNull::new(*m))
            .map(|m| {
                // SAFETY: the PMD handed us ownership of `n` valid mbufs taken from
                // this port's rx pool, which lives for 'pool.
                unsafe { Mbuf::from_raw(m) }
            }),
    );
    n
}

/// tx burst on queue 0 of a started port whose queue the caller holds exclusively.
fn tx_burst(id: u16, pkts: &mut Vec<Mbuf<'_>>) -> usize {
    if pkts.is_empty() {
        return 0;
    }
    let mut raw: [*mut sys::rte_mbuf; MAX_BURST] = [ptr::null_mut(); MAX_BURST];
    let count = pkts.len().min(MAX_BURST);
    for (slot, m) in raw.iter_mut().zip(pkts.iter()) {
        *slot = m.as_raw();
    }
    // SAFETY: started port, queue 0 exists; `raw` holds `count` valid mbufs that
    // `pkts` owns; the driver takes ownership of the first `sent`, which we
    // forget below without freeing.
    let sent = unsafe { sys::rte_eth_tx_burst(id, 0, raw.as_mut_ptr(), count as u16) };
    let sent = usize::from(sent);
    for m in pkts.drain(..sent) {
        // Owned by the driver now.
        let _ = m.into_raw();
    }
    sent
}

/// `rte_eth_stats` without the per-queue arrays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct PortStats {
    pub ipackets: u64,
    pub opackets: u64,
    pub ibytes: u64,
    pub obytes: u64,
    pub imissed: u64,
    pub ierrors: u64,
    pub oerrors: u64,
    pub rx_nombuf: u64,
}

impl Drop for Port<'_> {
    fn drop(&mut self) {
        if self.started {
            // SAFETY: valid started port; errors cannot be reported from drop.
            let _ = unsafe { sys::rte_eth_dev_stop(self.id) };
        }
        // SAFETY: port stopped; it is not used after close (we are dropping).
        let _ = unsafe { sys::rte_eth_dev_close(self.id) };
        release(self.id);
    }
}
