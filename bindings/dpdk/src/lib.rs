//! Thin safe wrapper over [`dpdk_sys`]: a once-per-process [`Eal`], pktmbuf
//! [`Mempool`]s and [`Mbuf`]s, [`Port`]s with one rx/tx queue, and
//! [`flow_validate`] with a typed [`FlowRefusal`] naming the refused
//! item/action; IR rules ([`flow_offload::ir::Rule`]) become owned `rte_flow`
//! arrays ([`FlowSpec`]) for [`Port::flow_validate`] / [`Port::flow_create`]
//! (an RAII [`Flow`]). [`RingPort`]s are ports over an `rte_ring`, to feed chosen frames
//! through the rx path without a NIC.
//!
//! Ownership follows lifetimes: mempools borrow the `Eal`, ports and mbufs
//! borrow their mempool, so dropping happens in the only safe order
//! (mbufs, ports, pools, then `rte_eal_cleanup`).

#![warn(missing_docs)]

mod eal;
mod errno;
mod flow;
mod lpm;
mod mempool;
mod meter;
mod port;
mod probe;
mod ring;
mod rule;
mod target;

pub use eal::{cloexec_inherited_fds, Eal, EalError};
pub use errno::Errno;
pub use flow::{
    flow_validate, FlowAction, FlowAttr, FlowErrorCause, FlowItem, FlowRefusal, ItemPart,
};
pub use lpm::{RteFib, RteLpm, TableError};
pub use mempool::{Mbuf, Mempool, MempoolError};
pub use meter::MeterError;
pub use port::{Port, PortConfig, PortError, PortStats, Queue, MAX_BURST};
pub use probe::{
    probe, Probe, ProbeAnswer, DEFAULT_MAX_GROUPS, DEFAULT_MAX_RULES, PROBED_PRIORITIES,
};
pub use ring::{RingPort, RingPortError};
pub use rule::{Flow, FlowError, FlowSpec, VXLAN_UDP_PORT};
pub use target::{refusal_of, DpdkTarget};
