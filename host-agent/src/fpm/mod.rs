//! FPM: zebra's routes in, offload status out.
//!
//! - [`frame`]: the FPM framing (streaming decoder, encoder);
//! - [`decode`]: netlink messages into [`FpmEvent`]s;
//! - [`rib`]: zebra's state and its conversion into model [`Change`](flow_offload::model::Change)s
//!   through an [`Attribution`];
//! - [`feedback`]: `RTM_F_OFFLOAD`/`TRAP`/`OFFLOAD_FAILED` frames from an
//!   [`OffloadStatus`](flow_offload::status::OffloadStatus);
//! - [`server`]: the tokio TCP server zebra connects to;
//! - [`build`]: zebra-shaped netlink messages (feedback, tests, benchmarks).

pub mod build;
pub mod decode;
pub mod feedback;
pub mod frame;
pub mod rib;
pub mod server;

pub use decode::{decode_netlink, DecodeStats, FpmEvent};
pub use feedback::{FeedbackEncoder, FrrVersion, TableEncoding};
pub use frame::{FrameDecoder, FrameError};
pub use rib::{Attribution, ChangeBatch, PathHint, Rib, StaticAttribution, ZebraRoute};
pub use server::{FeedbackSender, FpmConfig, FpmCounters, FpmServer, ServerEvent};
