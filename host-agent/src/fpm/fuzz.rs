//! The FPM input path as one function of bytes, for the `fpm_stream` fuzz target and the
//! corpus test: whatever reaches the FPM port must not panic the daemon, nor make it hold
//! more than the input's size.

use super::decode::{decode_netlink, DecodeStats};
use super::frame::FrameDecoder;
use super::rib::{ChangeBatch, Rib, StaticAttribution};

/// Feeds `data` to a [`FrameDecoder`] in chunks whose sizes derive from the data itself (one
/// byte, a few, a few dozen, the rest), decodes every netlink frame and applies the events
/// to a [`Rib`] with an attribution that takes table 254 and VNI 1000 (so routes reach the
/// model side too), until the stream fails or the data runs out.
pub fn fuzz_stream(data: &[u8]) {
    let mut attr = StaticAttribution {
        default_mac: Some(flow_offload::model::MacAddr([2, 0, 0, 0, 0, 1])),
        ..StaticAttribution::default()
    };
    attr.tables.insert(254, flow_offload::model::UNDERLAY_TABLE);
    attr.vnis.insert(1000, flow_offload::model::TableId(10));
    let mut frames = FrameDecoder::new();
    let mut rib = Rib::new();
    let mut batch = ChangeBatch::new();
    let mut stats = DecodeStats::default();
    let mut events = Vec::new();
    let mut rest = data;
    let mut step = 0usize;
    while !rest.is_empty() {
        let selector = data.get(step % data.len()).copied().unwrap_or(0);
        let size = match selector % 4 {
            0 => 1,
            1 => 1 + usize::from(selector >> 2) % 7,
            2 => 1 + usize::from(selector >> 2) % 64,
            _ => rest.len(),
        };
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        step = step.wrapping_add(1);
        frames.extend(chunk);
        loop {
            match frames.next_frame() {
                Ok(Some(payload)) => {
                    events.clear();
                    decode_netlink(payload, &mut events, &mut stats);
                    rib.apply_all(&events, &attr, &mut batch);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}
