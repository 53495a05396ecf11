//! End-to-end tests of the lab (`scripts/lab`): two sites with real FRR 10.3, etcd, the host
//! and DPU agents on DPDK TAP ports, and VPC hosts. The tests live in `tests/`; this crate has
//! no library code.
