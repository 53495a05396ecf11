//! Where each object landed: the one status type every report uses (DPU acks, etcd, gRPC,
//! `dpuctl`, FRR feedback).

use serde::{Deserialize, Serialize};

use crate::caps::Refusal;
use crate::compile::{Plan, SwReason};
use crate::model::ObjectKey;

/// Why an object is not forwarded at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum FailReason {
    /// The software tables are full too.
    #[error("software table full")]
    SoftwareTableFull,
    /// The DPU refused the desired state as invalid.
    #[error("refused by the DPU: {0}")]
    Invalid(crate::model::ModelError),
}

/// Where an object landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OffloadStatus {
    /// Entirely in hardware.
    Offloaded,
    /// Forwarded by the software lcores (maybe partly in hardware), and why.
    Software {
        /// Why it is not (wholly) in hardware.
        reason: SwReason,
    },
    /// Not forwarded.
    Failed {
        /// Why.
        reason: FailReason,
    },
}

impl OffloadStatus {
    /// The status of a compiled object that the NIC then refused at create time.
    pub fn refused_by_nic(refusal: Refusal) -> OffloadStatus {
        OffloadStatus::Software {
            reason: SwReason::Unsupported(refusal),
        }
    }
}

impl Plan {
    /// The status the plan gives an object of the model.
    pub fn status(&self, object: &ObjectKey) -> OffloadStatus {
        match self.sw.get(object) {
            None => OffloadStatus::Offloaded,
            Some(reason) => OffloadStatus::Software {
                reason: reason.clone(),
            },
        }
    }
}
