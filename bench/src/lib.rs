//! Benchmarks of the offload core, and the table generators they use.
#![forbid(unsafe_code)]

pub mod tables;
