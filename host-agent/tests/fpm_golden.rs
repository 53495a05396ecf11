//! Golden vectors: FPM byte streams captured from real zebra (FRR 8.4 on Debian 12, FRR 10.3 on
//! Debian 13) in a network namespace, with static routes: 10.1.0.0/24 via 10.0.0.1 (later
//! moved to via 10.0.1.1), 10.2.0.0/24 ECMP via 10.0.0.1 and 10.0.1.1, 192.0.2.0/24
//! blackhole, 2001:db8:1::/48 via fd00::1; interfaces v0 (10.0.0.2/24, fd00::2/64) and
//! v1 (10.0.1.2/24).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use flow_offload::model::{Change, MacAddr, Nexthop, PortId, Prefix, RouteKey, TableId};
use host_agent::fpm::decode::{FpmEvent, NexthopKind, RouteKind, RouteNexthops};
use host_agent::fpm::{
    decode_netlink, ChangeBatch, DecodeStats, FrameDecoder, Rib, StaticAttribution,
};

/// Decode a capture: frames (each a list of events) and the counters.
fn decode(bytes: &[u8]) -> (Vec<Vec<FpmEvent>>, DecodeStats) {
    let mut d = FrameDecoder::new();
    d.extend(bytes);
    let mut frames = Vec::new();
    let mut st = DecodeStats::default();
    while let Some(f) = d.next_frame().unwrap() {
        let mut evs = Vec::new();
        decode_netlink(f, &mut evs, &mut st);
        frames.push(evs);
    }
    assert_eq!(d.buffered(), 0);
    (frames, st)
}

fn p(s: &str) -> Prefix {
    s.parse().unwrap()
}

fn find_route<'a>(frames: &'a [Vec<FpmEvent>], prefix: &str) -> Vec<&'a FpmEvent> {
    let want = p(prefix);
    frames
        .iter()
        .flatten()
        .filter(|e| match e {
            FpmEvent::Route(r) => r.prefix == want,
            FpmEvent::RouteDeleted(r) => r.prefix == want,
            _ => false,
        })
        .collect()
}

/// The model routes a capture ends with, attributing v0/v1 by the ifindexes of the capture.
fn model(frames: &[Vec<FpmEvent>], main: u32, v0: u32, v1: u32) -> Vec<Change> {
    let mut a = StaticAttribution {
        default_mac: Some(MacAddr([2, 0, 0, 0, 0, 1])),
        ..Default::default()
    };
    a.tables.insert(main, TableId(254));
    a.ports.insert(v0, PortId(0));
    a.ports.insert(v1, PortId(1));
    let mut rib = Rib::new();
    let mut b = ChangeBatch::new();
    for f in frames {
        rib.apply_all(f, &a, &mut b);
    }
    b.take()
}

fn upsert(changes: &[Change], prefix: &str) -> Option<Vec<Nexthop>> {
    let k = RouteKey {
        table: TableId(254),
        prefix: p(prefix),
    };
    changes.iter().find_map(|c| match c {
        Change::UpsertRoute(r) if r.key == k => Some(r.nexthops.clone()),
        _ => None,
    })
}

fn via(gw: &str, port: u16) -> Nexthop {
    Nexthop::Underlay {
        gateway: gw.parse().unwrap(),
        port: PortId(port),
        mac: MacAddr([2, 0, 0, 0, 0, 1]),
    }
}

/// FRR 8.4: nexthop objects before the routes using them, an update as DELROUTE + NEWROUTE
/// in one frame, IPv6 routes without NLM_F_REPLACE, blackholes as `rtm_type` 6.
#[test]
fn frr84_capture() {
    let (frames, st) = decode(include_bytes!("data/frr84-static.fpm"));
    assert_eq!(frames.len(), 18);
    assert_eq!(
        (
            st.messages,
            st.new_route,
            st.del_route,
            st.new_nexthop,
            st.malformed,
            st.ignored
        ),
        (19, 9, 1, 9, 0, 0)
    );
    // The update of 10.1.0.0/24: one frame, delete then add.
    let last = frames.last().unwrap();
    assert_eq!(last.len(), 2);
    assert!(
        matches!(&last[0], FpmEvent::RouteDeleted(d) if d.prefix == p("10.1.0.0/24") && d.protocol == 196)
    );
    assert!(
        matches!(&last[1], FpmEvent::Route(r) if r.prefix == p("10.1.0.0/24") && r.nexthops == RouteNexthops::Id(16))
    );
    let v6 = find_route(&frames, "2001:db8:1::/48");
    assert!(
        matches!(v6[..], [FpmEvent::Route(r)] if !r.replace && r.protocol == 196 && r.table == 254)
    );
    let bh = find_route(&frames, "192.0.2.0/24");
    assert!(matches!(bh[..], [FpmEvent::Route(r)] if r.kind == RouteKind::Blackhole));
    assert!(frames.iter().flatten().any(|e| matches!(e,
        FpmEvent::Nexthop(n) if n.id == 15 && n.kind == NexthopKind::Group(vec![(14, 1), (16, 1)]))));
    // v0 is ifindex 3, v1 ifindex 2 in the capture's namespace.
    let changes = model(&frames, 254, 3, 2);
    assert_eq!(
        upsert(&changes, "10.1.0.0/24"),
        Some(vec![via("10.0.1.1", 1)])
    );
    assert_eq!(
        upsert(&changes, "10.2.0.0/24"),
        Some(vec![via("10.0.0.1", 0), via("10.0.1.1", 1)])
    );
    assert_eq!(
        upsert(&changes, "192.0.2.0/24"),
        Some(vec![Nexthop::Blackhole])
    );
    assert_eq!(
        upsert(&changes, "2001:db8:1::/48"),
        Some(vec![via("fd00::1", 0)])
    );
    // Connected routes have no gateway: not the DPU's, no change.
    assert_eq!(upsert(&changes, "10.0.0.0/24"), None);
    assert_eq!(changes.len(), 4);
}

/// FRR 10.3: NLM_F_REPLACE on IPv6 too, each connected route sent twice, no DELROUTE.
#[test]
fn frr103_capture() {
    let (frames, st) = decode(include_bytes!("data/frr103-static.fpm"));
    assert_eq!(
        (
            st.messages,
            st.new_route,
            st.del_route,
            st.new_nexthop,
            st.malformed,
            st.ignored
        ),
        (27, 18, 0, 9, 0, 0)
    );
    assert!(frames
        .iter()
        .flatten()
        .all(|e| !matches!(e, FpmEvent::Route(r) if !r.replace)));
    assert_eq!(find_route(&frames, "10.0.0.0/24").len(), 2);
    assert_eq!(find_route(&frames, "fd00::/64").len(), 2);
    let changes = model(&frames, 254, 3, 2);
    assert_eq!(
        upsert(&changes, "10.1.0.0/24"),
        Some(vec![via("10.0.1.1", 1)])
    );
    assert_eq!(
        upsert(&changes, "10.2.0.0/24"),
        Some(vec![via("10.0.0.1", 0), via("10.0.1.1", 1)])
    );
    assert_eq!(
        upsert(&changes, "192.0.2.0/24"),
        Some(vec![Nexthop::Blackhole])
    );
    assert_eq!(
        upsert(&changes, "2001:db8:1::/48"),
        Some(vec![via("fd00::1", 0)])
    );
    assert_eq!(changes.len(), 4);
}

/// The captures cut at every byte boundary decode to the same events.
#[test]
fn captures_split_anywhere() {
    for bytes in [
        &include_bytes!("data/frr84-static.fpm")[..],
        &include_bytes!("data/frr103-static.fpm")[..],
    ] {
        let (whole, _) = decode(bytes);
        let whole: Vec<FpmEvent> = whole.into_iter().flatten().collect();
        for cut in [1, 3, 7, 64, 333] {
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            let mut st = DecodeStats::default();
            for chunk in bytes.chunks(cut) {
                d.extend(chunk);
                while let Some(f) = d.next_frame().unwrap() {
                    decode_netlink(f, &mut got, &mut st);
                }
            }
            assert_eq!(got, whole, "cut {cut}");
        }
    }
}
