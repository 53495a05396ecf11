//! The DPU agent: receives desired state from the host agent, compiles it against the probed
//! capabilities of its ports, programs what the NIC accepts and forwards the rest in software.
#![forbid(unsafe_code)]
