//! The host agent: FRR's routes in over FPM (offload status back), desired state in etcd, the
//! management API, and the link that pushes desired state to each DPU agent.
#![forbid(unsafe_code)]

pub mod fpm;
