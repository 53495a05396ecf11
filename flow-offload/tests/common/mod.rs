//! Helpers of the differential tests: a reference evaluator of the model, generators of models
//! and packets, and the harness that runs the reference NIC and the software pipeline side by
//! side with the reference.
#![allow(dead_code)]

pub mod gen;
pub mod harness;
pub mod reference;
