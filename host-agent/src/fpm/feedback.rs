//! Offload status back to zebra: one `RTM_NEWROUTE` per FPM frame, `NLM_F_REQUEST`, unicast,
//! zebra's own prefix, table and protocol, and the status in `rtm_flags` (FRR ≥ 8.5; 8.4
//! discards everything it reads on the FPM socket).

use flow_offload::status::OffloadStatus;

use super::build::{self, NlWriter, RouteSpec};
use super::decode::{RouteKind, NLM_F_REQUEST};
use super::frame::{encode_frame, FrameError};
use super::rib::ZebraRoute;

/// `RTM_F_OFFLOAD`: the route is in hardware.
pub const RTM_F_OFFLOAD: u32 = 0x4000;
/// `RTM_F_TRAP`: packets are trapped to software (which forwards them).
pub const RTM_F_TRAP: u32 = 0x8000;
/// `RTM_F_OFFLOAD_FAILED`: the route is not forwarded by the device.
pub const RTM_F_OFFLOAD_FAILED: u32 = 0x2000_0000;
/// The kernel's main table.
pub const RT_TABLE_MAIN: u32 = 254;

/// The `rtm_flags` for a status: Offloaded → OFFLOAD; Software → TRAP|OFFLOAD (it is
/// forwarded, so the route must not be withheld); Failed → OFFLOAD_FAILED.
pub fn status_flags(status: &OffloadStatus) -> u32 {
    match status {
        OffloadStatus::Offloaded => RTM_F_OFFLOAD,
        OffloadStatus::Software { .. } => RTM_F_TRAP | RTM_F_OFFLOAD,
        OffloadStatus::Failed { .. } => RTM_F_OFFLOAD_FAILED,
    }
}

/// How zebra reads the table field of feedback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TableEncoding {
    /// The table id, as zebra sent it (FRR 8.5–10.2 and ≥ 10.4).
    #[default]
    TableId,
    /// FRR 10.3.0–10.3.4 read the field as a VRF id: the main table is sent as 0 (the default
    /// VRF). Other tables are sent unchanged; zebra's VRF ids are not known over FPM, so
    /// feedback for non-default VRFs cannot be addressed on those versions.
    VrfIdMainAsZero,
}

/// A parsed FRR version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FrrVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch (0 when the text gives none: Debian's zebra prints "10.3").
    pub patch: u32,
}

impl FrrVersion {
    /// The version in `zebra --version` ("zebra version 10.3.1") or `vtysh -c "show version"`
    /// ("FRRouting 10.3.1 (host) on Linux...") output; `None` if neither form is found.
    pub fn parse(output: &str) -> Option<FrrVersion> {
        for line in output.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            for w in words.windows(2) {
                let tag = w[0].to_ascii_lowercase();
                if tag == "version" || tag == "frrouting" {
                    if let Some(v) = Self::parse_number(w[1]) {
                        return Some(v);
                    }
                }
            }
        }
        None
    }

    fn parse_number(s: &str) -> Option<FrrVersion> {
        // "10.3.1", "10.3", "8.4.4-1.1~deb12u2", "10.3-dev"
        let core: String = s
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let mut it = core.split('.').filter(|p| !p.is_empty());
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        let patch = it.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(FrrVersion {
            major,
            minor,
            patch,
        })
    }

    /// Whether this FRR reads offload feedback at all (8.4 and older discard it).
    pub fn reads_feedback(&self) -> bool {
        (self.major, self.minor) >= (8, 5)
    }

    /// The table encoding this FRR expects.
    pub fn table_encoding(&self) -> TableEncoding {
        if self.major == 10 && self.minor == 3 && self.patch <= 4 {
            TableEncoding::VrfIdMainAsZero
        } else {
            TableEncoding::TableId
        }
    }
}

impl TableEncoding {
    /// The encoding for FRR's version output, unless configured: `configured` wins; unknown
    /// output gives the standard encoding.
    pub fn detect(version_output: &str, configured: Option<TableEncoding>) -> TableEncoding {
        configured.unwrap_or_else(|| {
            FrrVersion::parse(version_output)
                .map(|v| v.table_encoding())
                .unwrap_or_default()
        })
    }

    /// The table value to put on the wire for zebra table `table`.
    pub fn wire_table(self, table: u32) -> u32 {
        match self {
            TableEncoding::VrfIdMainAsZero if table == RT_TABLE_MAIN => 0,
            _ => table,
        }
    }
}

/// Encodes feedback frames.
#[derive(Debug, Clone, Copy, Default)]
pub struct FeedbackEncoder {
    /// The table encoding.
    pub tables: TableEncoding,
}

impl FeedbackEncoder {
    /// An encoder with this table encoding.
    pub fn new(tables: TableEncoding) -> FeedbackEncoder {
        FeedbackEncoder { tables }
    }

    /// Append one FPM frame acknowledging `route` with `status` to `out`.
    pub fn encode(
        &self,
        route: &ZebraRoute,
        status: &OffloadStatus,
        out: &mut Vec<u8>,
    ) -> Result<(), FrameError> {
        self.encode_flags(route, status_flags(status), out)
    }

    /// Append one FPM frame with explicit `rtm_flags`.
    pub fn encode_flags(
        &self,
        route: &ZebraRoute,
        rtm_flags: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), FrameError> {
        let mut w = NlWriter::new();
        build::route(
            &mut w,
            true,
            NLM_F_REQUEST,
            &RouteSpec {
                table: self.tables.wire_table(route.table),
                prefix: route.prefix,
                protocol: route.protocol,
                kind: RouteKind::Unicast,
                rtm_flags,
                metric: None,
                nexthops: None,
            },
        );
        encode_frame(&w.buf, out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::fpm::decode::{decode_netlink, DecodeStats, FpmEvent};
    use crate::fpm::frame::FrameDecoder;
    use flow_offload::compile::SwReason;
    use flow_offload::status::FailReason;

    #[test]
    fn version_detection() {
        let deb13 = "zebra version 10.3\nCopyright 1996-2005 Kunihiro Ishiguro, et al.\n";
        assert_eq!(
            FrrVersion::parse(deb13),
            Some(FrrVersion {
                major: 10,
                minor: 3,
                patch: 0
            })
        );
        assert_eq!(
            TableEncoding::detect(deb13, None),
            TableEncoding::VrfIdMainAsZero
        );
        let show = "FRRouting 10.3.5 (host) on Linux(6.1.0).\nCopyright ...";
        assert_eq!(TableEncoding::detect(show, None), TableEncoding::TableId);
        let show = "FRRouting 10.4.1 (host) on Linux(6.1.0).";
        assert_eq!(TableEncoding::detect(show, None), TableEncoding::TableId);
        let deb12 = "zebra version 8.4.4\n";
        let v = FrrVersion::parse(deb12).unwrap();
        assert!(!v.reads_feedback());
        assert!(FrrVersion::parse("FRRouting 8.5.1 (x)")
            .unwrap()
            .reads_feedback());
        assert_eq!(
            TableEncoding::detect("garbage", None),
            TableEncoding::TableId
        );
        assert_eq!(
            TableEncoding::detect(deb13, Some(TableEncoding::TableId)),
            TableEncoding::TableId
        );
    }

    #[test]
    fn flags_follow_the_design_mapping() {
        assert_eq!(status_flags(&OffloadStatus::Offloaded), 0x4000);
        assert_eq!(
            status_flags(&OffloadStatus::Software {
                reason: SwReason::Ecmp
            }),
            0xc000
        );
        assert_eq!(
            status_flags(&OffloadStatus::Failed {
                reason: FailReason::SoftwareTableFull
            }),
            0x2000_0000
        );
    }

    /// Golden bytes: an ack for 10.1.0.0/24 in the main table, static, offloaded.
    #[test]
    fn golden_ack_frame() {
        let route = ZebraRoute {
            table: 254,
            prefix: "10.1.0.0/24".parse().unwrap(),
            protocol: 196,
        };
        let mut out = Vec::new();
        FeedbackEncoder::new(TableEncoding::TableId)
            .encode(&route, &OffloadStatus::Offloaded, &mut out)
            .unwrap();
        #[rustfmt::skip]
        let want: Vec<u8> = [
            &[1u8, 1, 0, 48][..],                       // FPM header, 48 bytes
            &44u32.to_ne_bytes(), &24u16.to_ne_bytes(), // nlmsg_len, RTM_NEWROUTE
            &1u16.to_ne_bytes(), &0u32.to_ne_bytes(), &0u32.to_ne_bytes(), // REQUEST, seq, pid
            &[2, 24, 0, 0, 254, 196, 0, 1],             // rtmsg: inet /24 main static unicast
            &0x4000u32.to_ne_bytes(),                   // rtm_flags: OFFLOAD
            &8u16.to_ne_bytes(), &1u16.to_ne_bytes(), &[10, 1, 0, 0], // RTA_DST
            &8u16.to_ne_bytes(), &15u16.to_ne_bytes(), &254u32.to_ne_bytes(), // RTA_TABLE
        ].concat();
        assert_eq!(out, want);
        // The 10.3 quirk: main table as 0, both in rtm_table and RTA_TABLE.
        let mut q = Vec::new();
        FeedbackEncoder::new(TableEncoding::VrfIdMainAsZero)
            .encode(&route, &OffloadStatus::Offloaded, &mut q)
            .unwrap();
        assert_eq!(q[24], 0);
        assert_eq!(&q[q.len() - 4..], &0u32.to_ne_bytes());
    }

    #[test]
    fn ack_decodes_as_the_same_route() {
        let route = ZebraRoute {
            table: 1000,
            prefix: "2001:db8::/32".parse().unwrap(),
            protocol: 186,
        };
        let mut out = Vec::new();
        FeedbackEncoder::default()
            .encode(
                &route,
                &OffloadStatus::Software {
                    reason: SwReason::Ecmp,
                },
                &mut out,
            )
            .unwrap();
        let mut d = FrameDecoder::new();
        d.extend(&out);
        let f = d.next_frame().unwrap().unwrap().to_vec();
        let mut evs = Vec::new();
        let mut st = DecodeStats::default();
        decode_netlink(&f, &mut evs, &mut st);
        assert_eq!(st.malformed, 0);
        let FpmEvent::Route(r) = &evs[0] else {
            panic!("{evs:?}")
        };
        assert_eq!((r.table, r.prefix, r.protocol), (1000, route.prefix, 186));
        // rtm_flags at netlink offset 16 + 8.
        assert_eq!(&f[24..28], &0xc000u32.to_ne_bytes());
    }
}
