//! Host↔DPU messages, carried in [`frame`]s over TCP.
//!
//! The conversation: the DPU agent connects and says [`Message::Hello`] (who it is, since when,
//! what each port can offload, the last epoch it applied — `None` after a restart, because it
//! starts empty). The host agent answers with [`Message::Apply`] batches, each with a strictly
//! increasing epoch; `full: true` means "this is the whole desired state, drop everything
//! else" (sent after a hello). The DPU applies a batch atomically and idempotently (an epoch it
//! has already applied is acknowledged again, not re-applied), then answers [`Message::Ack`]
//! with the status of every object the batch touched, or [`Message::Refused`] naming the bad
//! change. Counters and heartbeats flow on their own.

pub mod frame;

use serde::{Deserialize, Serialize};

use crate::caps::Caps;
use crate::model::{Change, ModelError, ObjectKey, PortId, RouteKey};
use crate::status::OffloadStatus;

/// The message set. New variants are added at the end (postcard encodes the variant index), and
/// a peer that cannot decode a variant reports a decode error for that frame only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// DPU → host, first message on a connection.
    Hello(Hello),
    /// Host → DPU: desired-state changes.
    Apply(Apply),
    /// DPU → host: the batch of `epoch` is in force; status of the objects it touched.
    Ack(Ack),
    /// DPU → host: the batch of `epoch` was refused; nothing of it was applied.
    Refused {
        /// The batch.
        epoch: u64,
        /// Why (names the change and the field).
        error: ModelError,
    },
    /// DPU → host: counters.
    Counters(Counters),
    /// Either way: liveness.
    Heartbeat {
        /// Sender's sequence number.
        seq: u64,
    },
}

/// Who the DPU is and what it can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The DPU's identity.
    pub dpu_id: String,
    /// The agent's version.
    pub agent_version: String,
    /// Changes on every agent start, so the host can tell a restart from a reconnect.
    pub boot_id: u64,
    /// The last epoch applied since boot (None: empty, resend everything).
    pub last_epoch: Option<u64>,
    /// What each port can offload (probed).
    pub ports: Vec<(PortId, Caps)>,
}

/// A batch of changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Apply {
    /// Strictly increasing per connection lifetime of the host's desired state.
    pub epoch: u64,
    /// The whole desired state: the DPU replaces its model with exactly these changes applied to
    /// an empty one (and reconciles hardware against it, never flushing what is unchanged).
    pub full: bool,
    /// The changes, applied atomically.
    pub changes: Vec<Change>,
}

/// Status after a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The batch.
    pub epoch: u64,
    /// Every object the batch touched (and any whose placement it changed).
    pub status: Vec<(ObjectKey, OffloadStatus)>,
}

/// Counters of routes (hardware and software added up).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// When, in the DPU's monotonic nanoseconds.
    pub at_ns: u64,
    /// Per route: packets, bytes.
    pub routes: Vec<(RouteKey, u64, u64)>,
}
