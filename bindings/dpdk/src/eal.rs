//! The Environment Abstraction Layer, initialised at most once per process.

use std::ffi::{CString, NulError};
use std::marker::PhantomData;
use std::os::raw::{c_char, c_int};
use std::sync::OnceLock;

use dpdk_sys as sys;

use crate::Errno;

/// Why [`Eal::init`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EalError {
    /// `Eal::init` was already called in this process (whether it succeeded,
    /// failed, or was cleaned up since): DPDK cannot initialise twice.
    #[error("EAL init was already attempted in this process")]
    AlreadyInitialized,
    /// An argument contains an interior NUL byte.
    #[error("EAL argument {index} contains a NUL byte")]
    NulInArgument {
        /// Position in the argument list (0 is the program name).
        index: usize,
    },
    /// More arguments than a C `int` can count.
    #[error("too many EAL arguments")]
    TooManyArguments,
    /// `rte_eal_init` returned an error.
    #[error("rte_eal_init failed: {0}")]
    Init(Errno),
}

/// Set by the first (and only) `Eal::init` call.
static EAL_INIT: OnceLock<Result<(), EalError>> = OnceLock::new();

/// A live EAL. Dropping it calls `rte_eal_cleanup`; every DPDK object of this
/// crate borrows it, so they are all gone by then.
///
/// `rte_eal_init` pins the calling thread to the main lcore, so `Eal` is
/// neither `Send` nor `Sync`: it stays on the thread that created it.
#[derive(Debug)]
pub struct Eal {
    _not_send: PhantomData<*const ()>,
}

impl Eal {
    /// Initialise EAL with `args` (the first one is the program name, as in
    /// `argv`). Succeeds at most once per process; every later call returns
    /// [`EalError::AlreadyInitialized`].
    ///
    /// Works without hugepages or NICs with e.g.
    /// `["prog", "-l", "0", "--no-huge", "--no-pci", "--no-shconf", "-m", "256",
    /// "--vdev=net_null0"]`.
    pub fn init<S: AsRef<str>>(args: &[S]) -> Result<Self, EalError> {
        let mut first = false;
        let outcome = EAL_INIT.get_or_init(|| {
            first = true;
            init_once(args)
        });
        if !first {
            return Err(EalError::AlreadyInitialized);
        }
        outcome.clone().map(|()| Self {
            _not_send: PhantomData,
        })
    }

    /// Number of ethdev ports available.
    pub fn port_count(&self) -> u16 {
        // SAFETY: EAL is initialised (we hold an `Eal`).
        unsafe { sys::rte_eth_dev_count_avail() }
    }
}

fn init_once<S: AsRef<str>>(args: &[S]) -> Result<(), EalError> {
    let owned = args
        .iter()
        .enumerate()
        .map(|(index, a)| {
            CString::new(a.as_ref()).map_err(|_: NulError| EalError::NulInArgument { index })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // EAL keeps pointers into argv (e.g. for the program name), so the
    // strings must live for the rest of the process.
    let owned: &'static [CString] = Box::leak(owned.into_boxed_slice());
    let argv: &'static mut [*mut c_char] = Box::leak(
        owned
            .iter()
            .map(|a| a.as_ptr().cast_mut())
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    let argc = c_int::try_from(argv.len()).map_err(|_| EalError::TooManyArguments)?;
    // SAFETY: argv holds argc valid NUL-terminated strings that are never
    // freed; the OnceLock guarantees this runs at most once per process.
    let ret = unsafe { sys::rte_eal_init(argc, argv.as_mut_ptr()) };
    if ret < 0 {
        return Err(EalError::Init(Errno::last()));
    }
    Ok(())
}

impl Drop for Eal {
    fn drop(&mut self) {
        // SAFETY: all DPDK objects of this crate borrow `self`, so none is
        // alive; EAL was initialised and is cleaned up only here, once.
        let _ = unsafe { sys::rte_eal_cleanup() };
    }
}

/// Marks every file descriptor from 3 up close-on-exec, for a process about to re-execute
/// itself after EAL has been cleaned up.
///
/// DPDK opens some descriptors without `O_CLOEXEC`, the telemetry socket among them. Handed
/// to the next incarnation, that listening socket is never accepted on, and the next EAL's
/// telemetry init blocks connecting to it (its path is the same): measured here, the third
/// start of a re-executing agent hung in `rte_telemetry_init`.
pub fn cloexec_inherited_fds() -> std::io::Result<()> {
    // SAFETY: close_range only changes descriptor flags (CLOSE_RANGE_CLOEXEC closes nothing);
    // it takes plain integers and touches no memory of ours.
    let rc = unsafe {
        libc::close_range(
            3,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
