//! High availability of an A/B pair of DPU gateways: one member is active (allocates NAT
//! bindings, is the preferred path, forwards), the other is standby (holds a replica of the
//! active's state, ready to take over). Pure, like the rest of the crate: the agents move the
//! messages, talk to etcd and pass the time in.
//!
//! - [`role`]: the role state machine of one member. Leadership comes from an etcd lease on a
//!   leader key; its revision is the *epoch* (the *term* of the sync stream). A member that can
//!   no longer vouch for its lease fences itself (stops allocating, keeps forwarding
//!   established sessions); nothing ever goes back to an older epoch; there is no automatic
//!   failback; a planned switchover hands over only once the standby is Ready.
//! - [`link`]: the frames the two members exchange (hello, stream, standby report).
//! - [`sync`]: the replication stream from active to standby: versioned changes in ordered,
//!   acknowledged batches, with a bulk snapshot for a standby that joins, and the
//!   [`sync::ReadyState`] the role machine waits for before a switchover.
//!
//! Unplanned failover: the active dies or is cut off; its lease expires after at most one TTL
//! (it fenced itself `margin` before that, if it is still running); the standby, campaigning,
//! acquires the leader key with a newer epoch and becomes active with whatever the stream had
//! delivered. Bindings created but not yet acknowledged are lost (the sync lag is the bound).

pub mod fuzz;
pub mod link;
pub mod role;
pub mod sync;
