//! The TCP state machine of a session (simplified RFC 6146 §3.5.2, RFC 7857).

use serde::{Deserialize, Serialize};

/// TCP FIN flag, as in the `tcp_flags` arguments.
pub const TCP_FIN: u8 = 0x01;
/// TCP SYN flag.
pub const TCP_SYN: u8 = 0x02;
/// TCP RST flag.
pub const TCP_RST: u8 = 0x04;
/// TCP ACK flag.
pub const TCP_ACK: u8 = 0x10;

/// The TCP state of a session (simplified RFC 6146 §3.5.2).
///
/// Transitions, for a packet in either direction (`out` = from inside):
/// - any RST → `Reset`;
/// - `Opening` + packet from outside → `Established`;
/// - `Reset` + SYN from inside → `Opening`; `Reset` + any other packet → `Established`;
/// - `Closing` + SYN from inside → `Opening` (the 5-tuple is reused, RFC 7857);
/// - then a FIN: `Established` → `FinOutbound`/`FinInbound` by direction, and the one-sided
///   FIN states → `Closing` on a FIN from the other side.
///
/// `Opening`, `Closing` and `Reset` get the transitory lifetime, the others the established one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TcpState {
    /// Opened from inside, nothing seen from the remote yet.
    Opening,
    /// Both sides have spoken.
    Established,
    /// FIN seen from inside only.
    FinOutbound,
    /// FIN seen from outside only.
    FinInbound,
    /// FIN seen from both sides.
    Closing,
    /// RST seen.
    Reset,
}

impl TcpState {
    /// Whether this state gets the transitory lifetime.
    pub const fn is_transitory(self) -> bool {
        matches!(
            self,
            TcpState::Opening | TcpState::Closing | TcpState::Reset
        )
    }
}

/// The direction of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dir {
    Out,
    In,
}

/// The state after a packet with `flags` in direction `dir`.
pub(super) fn tcp_next(state: TcpState, dir: Dir, flags: u8) -> TcpState {
    use TcpState::*;
    if flags & TCP_RST != 0 {
        return Reset;
    }
    let syn = flags & TCP_SYN != 0;
    let s = match (state, dir) {
        (Opening, Dir::In) => Established,
        (Reset | Closing, Dir::Out) if syn => Opening,
        (Reset, _) => Established,
        (s, _) => s,
    };
    if flags & TCP_FIN == 0 {
        return s;
    }
    match (s, dir) {
        (Established, Dir::Out) => FinOutbound,
        (Established, Dir::In) => FinInbound,
        (FinInbound, Dir::Out) | (FinOutbound, Dir::In) => Closing,
        (s, _) => s,
    }
}
