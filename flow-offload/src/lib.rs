//! The pure offload core of the DPU gateway control plane.
//!
//! Nothing in this crate does I/O, spawns threads, touches DPDK or reads a clock: time comes in
//! as `now_ns: u64` arguments, randomness through [`soft::nat::Random`], hardware through
//! [`refnic`] (the reference NIC) or the DPU agent's backends. Everything here is testable in
//! microseconds.
//!
//! The path of desired state: [`model`] (validated) → [`compile`] under [`caps`] into a
//! [`compile::Plan`] of [`ir`] rules for hardware plus software entries with reasons →
//! [`reconcile`] into minimal ordered operations. Packets the hardware does not handle run
//! through [`soft`]. [`wire`] carries all of it between the host and the DPU.
#![forbid(unsafe_code)]

pub mod caps;
pub mod compile;
pub mod ha;
pub mod ir;
pub mod lpm;
pub mod model;
pub mod packet;
pub mod program;
pub mod reconcile;
pub mod refnic;
pub mod sessions;
pub mod soft;
pub mod status;
pub mod wire;
