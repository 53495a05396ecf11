//! Desired state, validated on entry.

use serde::{Deserialize, Serialize};

/// A meter's token-bucket parameters. Rates are in bytes per second and bursts in bytes, as in
/// `rte_mtr`. Colour-blind: the packet's incoming colour is not consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MeterProfile {
    /// Single-rate three-colour marker, RFC 2697.
    SrTcm {
        /// Committed information rate, bytes/s.
        cir: u64,
        /// Committed burst size, bytes.
        cbs: u64,
        /// Excess burst size, bytes.
        ebs: u64,
    },
    /// Two-rate three-colour marker, RFC 2698.
    TrTcm {
        /// Committed information rate, bytes/s.
        cir: u64,
        /// Committed burst size, bytes.
        cbs: u64,
        /// Peak information rate, bytes/s (≥ cir).
        pir: u64,
        /// Peak burst size, bytes.
        pbs: u64,
    },
}
