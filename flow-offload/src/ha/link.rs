//! What the two members of a pair say to each other on their sync connection: the frame set,
//! the hello, the standby's report, and the member letters. Decoded from the peer, so it is
//! outside input: [`crate::ha::fuzz::fuzz_pair`] fuzzes exactly this decoder.

use serde::{Deserialize, Serialize};

use crate::ha::sync::SyncMessage;
use crate::soft::nat::{AllocBlock, ReplicatedSession};

/// Version of the pair protocol (in [`PairHello`]).
pub const PROTOCOL: u32 = 1;

/// Which member of an A/B pair a DPU is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Member {
    /// Member a: NAT ports from the first half of every pool's port range.
    A,
    /// Member b: the second half.
    B,
}

impl Member {
    /// This member's NAT allocation block: two members never hand out the same binding.
    pub fn block(self) -> AllocBlock {
        match self {
            Member::A => AllocBlock::new(0, 2),
            Member::B => AllocBlock::new(1, 2),
        }
    }

    /// The other member.
    pub fn other(self) -> Member {
        match self {
            Member::A => Member::B,
            Member::B => Member::A,
        }
    }
}

impl core::fmt::Display for Member {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Member::A => "a",
            Member::B => "b",
        })
    }
}

/// Everything on the sync connection. New variants go at the end (postcard encodes the index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PairFrame {
    /// Sent first, by both sides.
    Hello(PairHello),
    /// The replication stream.
    Sync(SyncMessage<ReplicatedSession>),
    /// Standby → active: whether the standby's replica is complete and every record of it
    /// imported (see [`StandbyReport`]).
    Standby(StandbyReport),
}

/// The standby's own view of its replica, sent right after its hello, whenever it changes,
/// and, when a record is refused, before the acknowledgement that covers it.
///
/// The sync sender's acknowledgements say what the standby *received*; only the standby knows
/// whether its pipeline took every record (one missing the NAT rule refuses them and asks for
/// another snapshot later). The active counts its peer Ready only when both agree, so that a
/// planned switchover never hands over to a standby missing bindings. An active that never
/// hears a report (a peer from before this frame existed) goes by the acknowledgements alone;
/// a peer that does not know this frame counts it as a frame error and carries on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandbyReport {
    /// Snapshot complete, stream applied, no record refused since.
    pub ready: bool,
}

/// Who is at the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairHello {
    /// [`PROTOCOL`].
    pub protocol: u32,
    /// The sender's member letter.
    pub member: Member,
    /// The active's epoch (the active), or the newest epoch the standby knows.
    pub epoch: u64,
    /// Whether the sender is the active (dialling) side.
    pub active: bool,
}
