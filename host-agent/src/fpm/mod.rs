//! FPM: zebra's routes in, offload status out.
//!
//! - [`frame`]: the FPM framing (streaming decoder, encoder);
//! - [`decode`]: netlink messages into [`FpmEvent`]s;
//! - [`rib`]: zebra's state and its conversion into model [`Change`](flow_offload::model::Change)s
//!   through an [`Attribution`];
//! - [`feedback`]: `RTM_F_OFFLOAD`/`TRAP`/`OFFLOAD_FAILED` frames from an
//!   [`OffloadStatus`](flow_offload::status::OffloadStatus);
//! - [`server`]: the tokio TCP server zebra connects to (one connection at a time);
//! - [`replay`]: when zebra's replay is over, and the rule for removing what it did not replay;
//! - [`refused`]: zebra's routes that are on no DPU, and why (shown by `dpuctl status`);
//! - [`build`]: zebra-shaped netlink messages (feedback, tests, benchmarks).
//!
//! # How the host agent uses it
//! Start an [`FpmServer`]; on [`ServerEvent::Connected`] call [`ReplayTracker::connected`]
//! (which calls [`Rib::begin_resync`]); feed [`ServerEvent::Events`] to [`Rib::apply_all`] and
//! [`ReplayTracker::events`], and send the [`ChangeBatch`] to the DPUs; on
//! [`ServerEvent::Disconnected`] call [`ReplayTracker::disconnected`]. At
//! [`ReplayTracker::deadline`] call [`ReplayTracker::quiet`]: when it returns true the replay
//! is over, the routes zebra did not replay are in the batch as deletes, and every route must
//! be acknowledged again, except those already acknowledged on this connection (zebra keeps
//! old flags, and we cannot know which). When a status comes back for a model route,
//! [`Rib::feedback_due`] says whether zebra still needs it (one acknowledgement per status
//! change: [`Rib::note_feedback`] records what was sent, [`Rib::forget_feedback`] forgets it
//! all on a reconnect, and a route zebra sends again is due again), [`Rib::zebra_route`] gives
//! what zebra must see, and [`FeedbackSender::ack`] sends it.
//!
//! # Errors
//! Framing errors (the connection is reset), undecodable messages and undecodable attributes
//! (the message is dropped, and not counted as received) are counted per kind
//! ([`FpmCounters::decode_errors`]) and logged at WARN, rate-limited ([`server`]).
//!
//! # Connections, and what a replay may remove
//! One zebra connection at a time: while one is alive (its socket open), another is closed at
//! once and reported as [`ServerEvent::Refused`]; it never replaces zebra's ([`server`]).
//! A connection removes stale routes only after it delivered a replay (at least one valid
//! route or nexthop message) and then went quiet for [`REPLAY_QUIET`]. A connection that
//! sends nothing, sends garbage, or dies mid-replay removes nothing ([`replay`]).
//!
//! # What FRR does, measured here (tests `fpm_frr84`, `fpm_frr103`, `fpm_golden`)
//! - 8.4 (Debian 12) and 10.3 (Debian 13) both send nexthop objects first and routes with
//!   `RTA_NH_ID`; 8.4 sends an update as DELROUTE + NEWROUTE in one frame and IPv6 routes
//!   without `NLM_F_REPLACE`; 10.3 sends one NEWROUTE with REPLACE and every connected route
//!   twice. [`ChangeBatch`] coalesces per route, so the DPU never sees the delete of an update.
//! - 8.4 reads and discards feedback: routes still flow in (the degraded path).
//! - 10.3.0–10.3.4 (Debian 13 ships 10.3.0) look an acknowledged route up as
//!   (VRF id = the table field, table id 0): upstream bug, fixed in 10.4. Feedback lands only
//!   with [`TableEncoding::VrfIdMainAsZero`] **and** zebra started with `-R 0`
//!   (`--routing-table 0`: zebra's main table id becomes 0; the kernel still installs into
//!   main). zebra then sends the main table as 0, which the [`Attribution`] must map to the
//!   underlay. Without `-R 0` nothing lands and routes stay `queued` (tested).
//! - Acknowledged routes show in `show ip route json` as `"offloaded":true` (Offloaded),
//!   `"trapped":true` plus `"offloaded":true` (Software), `"offloaded":false` (Failed, `o` in
//!   the text view); unacknowledged ones stay `"queued":true`.
//!
//! # What can be attributed
//! A route becomes a model route when the [`Attribution`] gives its table (by the first path's
//! VNI, then its interface, then zebra's table) and, for underlay paths, a DPU port and the
//! gateway's MAC; EVPN paths need the remote VTEP's router MAC (`AF_BRIDGE` neighbour).
//! Directly connected routes (no gateway), routes through host-only interfaces and
//! non-forwarding types stay unattributed: they are kept (for feedback) but not sent to DPUs.

pub mod build;
pub mod decode;
pub mod feedback;
pub mod frame;
pub mod fuzz;
pub mod refused;
pub mod replay;
pub mod rib;
pub mod server;

pub use decode::{decode_netlink, decode_netlink_with, DecodeErrorKind, DecodeStats, FpmEvent};
pub use feedback::{FeedbackEncoder, FrrVersion, TableEncoding};
pub use frame::{FrameDecoder, FrameError};
pub use refused::{Refusal, RefusedRoute, RefusedRoutes};
pub use replay::{ReplayEnd, ReplayState, ReplayTracker, REPLAY_QUIET};
pub use rib::{
    Attribution, ChangeBatch, NotTaken, PathHint, Rib, StaticAttribution, Unattributed, ZebraRoute,
};
pub use server::{
    DisconnectReason, FeedbackSender, FpmConfig, FpmCounters, FpmServer, ServerEvent,
};
