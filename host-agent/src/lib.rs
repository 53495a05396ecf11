//! The host agent: FRR's routes in over FPM (offload status back), desired state in etcd, the
//! management API, and the link that pushes desired state to each DPU agent.
#![forbid(unsafe_code)]

pub mod api;
pub mod daemon;
pub mod dpu_link;
pub mod flashing;
pub mod fpm;
pub mod ifmgr;
pub mod metrics;
pub mod pair;
pub mod store;
