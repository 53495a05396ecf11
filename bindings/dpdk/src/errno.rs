//! DPDK error numbers.

use std::ffi::CStr;
use std::fmt;
use std::os::raw::c_int;

use dpdk_sys as sys;

/// A positive errno value as reported by DPDK (return codes are `-errno`,
/// `rte_errno` holds `errno`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub c_int);

impl Errno {
    /// Function not implemented: the PMD has no such op (e.g. rte_flow on net_null).
    pub const NOSYS: Self = Self(sys::ENOSYS as c_int);
    /// Valid but unsupported by this device.
    pub const NOTSUP: Self = Self(sys::ENOTSUP as c_int);
    /// Invalid argument or rule.
    pub const INVAL: Self = Self(sys::EINVAL as c_int);
    /// No space left (e.g. a full flow table).
    pub const NOSPC: Self = Self(sys::ENOSPC as c_int);
    /// Already exists (colliding rule, duplicate name).
    pub const EXIST: Self = Self(sys::EEXIST as c_int);
    /// Out of memory.
    pub const NOMEM: Self = Self(sys::ENOMEM as c_int);
    /// Device or resource busy.
    pub const BUSY: Self = Self(sys::EBUSY as c_int);
    /// No such device (bad port id).
    pub const NODEV: Self = Self(sys::ENODEV as c_int);
    /// I/O error (device removed).
    pub const IO: Self = Self(sys::EIO as c_int);
    /// Already done (e.g. EAL initialised twice).
    pub const ALREADY: Self = Self(sys::EALREADY as c_int);

    /// The calling thread's current `rte_errno`.
    pub fn last() -> Self {
        // SAFETY: reads a thread-local int; valid on any thread at any time.
        Self(unsafe { sys::dpdk_sys_errno() })
    }

    /// From a DPDK return code `ret < 0` (which is `-errno`).
    pub fn from_ret(ret: c_int) -> Self {
        Self(ret.saturating_abs())
    }

    /// The symbolic name of the common codes (`"EEXIST"`, ...), for machine-readable reasons.
    pub fn name(self) -> String {
        let known = [
            (Self::NOSYS, "ENOSYS"),
            (Self::NOTSUP, "ENOTSUP"),
            (Self::INVAL, "EINVAL"),
            (Self::NOSPC, "ENOSPC"),
            (Self::EXIST, "EEXIST"),
            (Self::NOMEM, "ENOMEM"),
            (Self::BUSY, "EBUSY"),
            (Self::NODEV, "ENODEV"),
            (Self::IO, "EIO"),
            (Self::ALREADY, "EALREADY"),
        ];
        known
            .iter()
            .find(|(e, _)| *e == self)
            .map_or_else(|| format!("errno {}", self.0), |(_, n)| (*n).to_owned())
    }

    /// DPDK's description of this error (covers DPDK-specific codes too).
    pub fn description(self) -> String {
        // SAFETY: rte_strerror accepts any int and returns a NUL-terminated
        // string valid until the next call on this thread; we copy it at once.
        let s = unsafe { CStr::from_ptr(sys::rte_strerror(self.0)) };
        s.to_string_lossy().into_owned()
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (errno {})", self.description(), self.0)
    }
}

/// Turn a DPDK `0 / -errno` return code into a `Result`.
pub(crate) fn check(ret: c_int) -> Result<(), Errno> {
    if ret < 0 {
        Err(Errno::from_ret(ret))
    } else {
        Ok(())
    }
}
