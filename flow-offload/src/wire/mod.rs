//! Host↔DPU messages, carried in [`frame`]s over TCP.
//!
//! The conversation: the DPU agent connects and says [`Message::Hello`] (who it is, since when,
//! the link protocol it speaks and its optional features, what each port can offload, the last
//! epoch it applied — `None` after a restart, because it starts empty). The host agent checks
//! the protocol (a peer speaking another [`PROTOCOL_VERSION`] is refused with
//! [`Refusal::Incompatible`] and the connection closed), answers with [`Message::HostHello`],
//! then sends [`Message::Apply`] batches, each with a strictly increasing epoch; `full: true`
//! means "this is the whole desired state, drop everything else" (sent after a hello). Epochs
//! increase across restarts of either side: the host continues from the hello's `last_epoch`.
//! The DPU applies every batch (whatever its epoch: the epoch pairs an answer with its batch),
//! then answers [`Message::Ack`] with the status of every object the batch touched.
//!
//! Nothing is skipped in silence: a well-framed message that a side cannot decode (a kind it
//! does not know, a batch it cannot read) is answered with [`Message::Refused`] naming why, and
//! with the batch's epoch when the payload still shows it ([`read_message`]). Counters and
//! heartbeats flow on their own.

pub mod frame;

use serde::{Deserialize, Serialize};

use crate::caps::Caps;
use crate::model::{Change, ModelError, ObjectKey, PortId, RouteKey};
use crate::status::OffloadStatus;

/// The link protocol this build speaks. Peers must speak the same one; optional behaviour is
/// negotiated with [`Features`]. Version 1 had no version in its hello and skipped messages it
/// could not decode.
pub const PROTOCOL_VERSION: u16 = 2;

bitflags::bitflags! {
    /// Optional behaviour a side supports. Unknown bits from a newer peer are kept (and
    /// ignored), so a feature can be added without a protocol version.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
    pub struct Features: u64 {
        /// The agent manages A/B image slots ([`Message::FlashImage`], [`Message::Boot`]).
        const IMAGES = 1 << 0;
        /// The agent is a member of an A/B pair and takes [`Message::HaRole`].
        const HA_PAIR = 1 << 1;
    }
}

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
    /// Either way: a message was refused; nothing of it was applied. `epoch` names the batch
    /// when the refused message was a batch whose epoch could still be read.
    Refused {
        /// The batch, if it was one.
        epoch: Option<u64>,
        /// Why.
        reason: Refusal,
    },
    /// DPU → host: counters.
    Counters(Counters),
    /// Either way: liveness.
    Heartbeat {
        /// Sender's sequence number.
        seq: u64,
    },
    /// Host → DPU: flash an image into the inactive slot.
    FlashImage(FlashImage),
    /// DPU → host: progress and outcome of a flash.
    Flash(FlashStatus),
    /// DPU → host: the boot-control state, sent after every hello by an agent that manages
    /// image slots.
    Boot(BootReport),
    /// Host → DPU: the host's answer to [`Message::Hello`], before any batch.
    HostHello(HostHello),
    /// Host → DPU: the outcome of the pair member's campaign for its group's leader key,
    /// relayed by the host agent, which holds the member's etcd lease.
    HaRole(HaRole),
    /// DPU → host: a pair member's state (with every heartbeat, and when it changes).
    HaStatus(HaStatus),
    /// Host → DPU: hand the pair's leadership of `epoch` over to the other member (a planned
    /// switchover): stop allocating, wait until the peer holds every binding, then ask the host
    /// to release the lease ([`HaStatus::handing_over`]).
    HaSwitchover {
        /// The epoch this member is active in.
        epoch: u64,
    },
}

/// Where a pair member stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PairRole {
    /// Not active: receives the active's sessions; never allocates.
    Standby,
    /// Holds the leader key: allocates and forwards, streams its sessions to the peer.
    Active,
    /// Lost (or may have lost) the key: forwards established sessions, allocates nothing.
    Fenced,
}

/// A pair member's state report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaStatus {
    /// Its role.
    pub role: PairRole,
    /// The newest epoch it has seen.
    pub epoch: u64,
    /// On a standby: it holds every session the active reported (caught up). On an active:
    /// its peer says so.
    pub ready: bool,
    /// Session events not yet acknowledged by the peer (active) or not yet applied (standby).
    pub lag_events: u64,
    /// Age in milliseconds of the oldest unacknowledged event (0 when none).
    pub lag_ms: u64,
    /// NAT sessions held.
    pub sessions: u64,
    /// Whether the sync channel to the peer is connected.
    pub peer_connected: bool,
    /// A planned switchover drained the sync stream (the peer holds every binding): the host
    /// must release this member's lease now.
    pub handing_over: bool,
}

impl Message {
    /// The message's kind, for logs and refusals.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Apply(_) => "batch",
            Message::Ack(_) => "ack",
            Message::Refused { .. } => "refusal",
            Message::Counters(_) => "counters",
            Message::Heartbeat { .. } => "heartbeat",
            Message::FlashImage(_) => "flash order",
            Message::Flash(_) => "flash status",
            Message::Boot(_) => "boot report",
            Message::HostHello(_) => "host hello",
            Message::HaRole(_) => "pair role",
            Message::HaStatus(_) => "pair status",
            Message::HaSwitchover { .. } => "pair switchover",
        }
    }
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// The desired state is invalid.
    #[error("{0}")]
    Model(Box<ModelError>),
    /// A well-framed message that this side cannot decode: `kind` is its variant index when it
    /// could be read (an index past the known ones means a newer peer).
    #[error("cannot decode message (kind {kind:?}): {detail}")]
    Undecodable {
        /// The message's variant index.
        kind: Option<u32>,
        /// The decoder's error.
        detail: String,
    },
    /// The peer speaks another link protocol.
    #[error("link protocol {theirs} is not supported (this side speaks {ours})")]
    Incompatible {
        /// This side's [`PROTOCOL_VERSION`].
        ours: u16,
        /// The peer's.
        theirs: u16,
    },
    /// The message is valid but not expected from this peer or in this state.
    #[error("unexpected message: {0}")]
    Unexpected(String),
}

/// The host's side of the introduction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostHello {
    /// The host's [`PROTOCOL_VERSION`].
    pub protocol: u16,
    /// What the host supports.
    pub features: Features,
}

/// A pair member's role, decided by its group's etcd leader key.
///
/// The host agent campaigns for the key with a lease that it keeps alive while the DPU's link
/// is up, and relays every outcome. `valid_ms` is how long, from when the host *sent* the
/// keepalive that proved the lease, the lease lives at least (the TTL minus the time since
/// that keepalive was sent); the DPU counts it from when it receives this message, which only
/// shortens it, and fences itself before it ends unless a newer role message arrives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaRole {
    /// The leader key's revision when this member holds it; otherwise the newest epoch the host
    /// has seen for the group.
    pub epoch: u64,
    /// This member holds the leader key.
    pub active: bool,
    /// Milliseconds the lease is still valid for (0 when not active).
    pub valid_ms: u32,
}

/// A message read from a frame's payload, or why it could not be: the refusal to send back and
/// the epoch of the batch it was, if its head shows one.
///
/// postcard writes a message as its variant index (a varint) followed by the variant's fields;
/// an [`Apply`] starts with its epoch, so a batch whose tail does not decode still names the
/// epoch to refuse.
pub fn read_message(payload: &[u8]) -> Result<Message, (Option<u64>, Refusal)> {
    match frame::decode_payload::<Message>(payload) {
        Ok(m) => Ok(m),
        Err(e) => {
            let kind = postcard::take_from_bytes::<u32>(payload)
                .ok()
                .map(|(k, _)| k);
            let epoch = match postcard::take_from_bytes::<(u32, u64)>(payload) {
                Ok(((APPLY_KIND, epoch), _)) => Some(epoch),
                _ => None,
            };
            Err((
                epoch,
                Refusal::Undecodable {
                    kind,
                    detail: e.to_string(),
                },
            ))
        }
    }
}

/// The variant index of [`Message::Apply`] (its position in the enum).
const APPLY_KIND: u32 = 1;

/// One of a DPU's two image slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SlotName {
    /// Slot A.
    A,
    /// Slot B.
    B,
}

impl core::fmt::Display for SlotName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            SlotName::A => "A",
            SlotName::B => "B",
        })
    }
}

/// A flash order. The DPU verifies the manifest against its own trusted keys and target
/// before it writes anything, then fetches chunks from the host's chunk server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlashImage {
    /// SHA-256 of the manifest bytes: the image's identity.
    pub image_id: [u8; 32],
    /// The signed manifest, as built.
    pub manifest: Vec<u8>,
    /// Its Ed25519 signature (64 bytes).
    pub signature: Vec<u8>,
    /// The chunk server's TCP port on the host; the address is the host end of this link.
    pub server_port: u16,
    /// Parallel fetch streams.
    pub streams: u8,
    /// Trial boots of the new slot before rolling back.
    pub tries: u8,
    /// Restart into the new slot once it is flashed and armed.
    pub activate: bool,
}

/// Progress of one flash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlashStatus {
    /// The image.
    pub image_id: [u8; 32],
    /// Where it stands.
    pub phase: FlashPhase,
}

/// The phases of a flash, in order (`Failed` ends it at any point).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlashPhase {
    /// Verified and writing into `slot`; `resumed` chunks were already there.
    Started {
        /// The inactive slot.
        slot: SlotName,
        /// Chunks in the image.
        total: u32,
        /// Chunks found on the slot from an interrupted flash of the same image.
        resumed: u32,
    },
    /// Chunks on the slot so far.
    Progress {
        /// Done.
        done: u32,
        /// Total.
        total: u32,
    },
    /// Read back, verified and armed: the next boot tries `slot`.
    Flashed {
        /// The slot.
        slot: SlotName,
        /// Trial boots allowed.
        tries: u8,
        /// Chunk fetches, re-fetches included.
        fetches: u64,
        /// Re-fetches after a corrupt chunk.
        refetches: u64,
        /// Chunks resumed from an interrupted flash.
        resumed: u32,
    },
    /// The agent is restarting into `slot` (activate).
    Rebooting {
        /// The slot on trial.
        slot: SlotName,
    },
    /// Nothing more happens for this flash.
    Failed {
        /// The class of failure.
        failure: FlashFailure,
        /// What happened, for people.
        message: String,
    },
}

/// Why a flash failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlashFailure {
    /// The agent has no `[image]` configuration.
    NotConfigured,
    /// A flash is already running on this DPU.
    Busy,
    /// Signature, key, target or manifest refused: nothing was written.
    Refused,
    /// Chunks could not be fetched (the journal keeps what landed; flashing again resumes).
    Fetch,
    /// A chunk stayed corrupt over every fetch.
    Corrupt,
    /// The slot could not be written, synced or read back (disk full, I/O error, mismatch).
    Slot,
    /// The boot-control state could not be read or written.
    Boot,
}

/// The boot-control state of a DPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootReport {
    /// The slot the agent runs from.
    pub running: SlotName,
    /// The last known-good slot.
    pub active: SlotName,
    /// A slot on trial and its remaining tries.
    pub pending: Option<(SlotName, u8)>,
    /// What the last start decided.
    pub last: BootOutcome,
    /// The image (manifest SHA-256) on each slot, when known.
    pub images: Vec<(SlotName, [u8; 32])>,
}

/// A start-up decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootOutcome {
    /// Nothing was on trial.
    Normal,
    /// The slot on trial booted healthy and is now active.
    Committed(SlotName),
    /// The slot on trial was unhealthy; it is tried again.
    Retry {
        /// The slot.
        slot: SlotName,
        /// Tries left.
        tries_left: u8,
    },
    /// Out of tries: back to `to`.
    RolledBack {
        /// The slot that failed.
        failed: SlotName,
        /// The slot running again.
        to: SlotName,
        /// Why the last trial failed.
        reason: String,
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
    /// The link protocol the agent speaks ([`PROTOCOL_VERSION`]).
    pub protocol: u16,
    /// What the agent supports.
    pub features: Features,
}

/// A batch of changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Apply {
    /// Strictly increasing, across restarts of either side (the host resumes after the
    /// hello's `last_epoch`).
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
