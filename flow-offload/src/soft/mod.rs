//! The software pipeline run by the DPU's lcores: [`pipeline`] ties the pieces together.
pub mod meter;
pub mod nat;
pub mod pipeline;
pub mod rfc6052;

pub use pipeline::{DropReason, HeadroomBuf, PacketBuf, Pipeline, PipelineLimits, Verdict};
