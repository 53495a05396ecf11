//! The DPU agent: receives desired state from the host agent, compiles it against the probed
//! capabilities of its ports, programs what the NIC accepts and forwards the rest in software.
//!
//! - [`config`]: the TOML configuration, every bad field named.
//! - [`agent`]: model, compiler, hardware target and software pipeline kept in step, batch by
//!   batch, with per-object status.
//! - [`lcore`]: the software forwarding loop over DPDK queues.
//! - [`link`]: the host link server (framed postcard messages over TCP).
//! - [`image`]: A/B image slots: flashing on the host's order, boot-control decisions.
//! - [`ha`]: the A/B pair runtime: NAT session sync to the standby, the member's role.
//! - [`announce`]: frames the lcore sends on the control side's behalf (a new active's router
//!   MAC announcements).
#![forbid(unsafe_code)]

pub mod agent;
pub mod announce;
pub mod config;
pub mod ha;
pub mod image;
pub mod lcore;
pub mod link;
