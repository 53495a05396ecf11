//! The software pipeline run by the DPU's lcores.
pub mod meter;
pub mod nat;
pub mod rfc6052;
