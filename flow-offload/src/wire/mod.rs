//! Host↔DPU messages.
pub mod frame;

/// Placeholder until the message set lands.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Message {
    /// Liveness.
    Heartbeat { seq: u64 },
}
