//! The host's FRR (Debian 12: 8.4) against our FPM server: static IPv4/IPv6/ECMP/blackhole
//! routes arrive as model changes, an update arrives as one coalesced change, and offload
//! feedback is discarded by 8.4 (the degraded path: routes still flow in).
//! Needs root, iproute2 and the `frr` package.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod frr;

use std::path::Path;
use std::time::Duration;

use flow_offload::model::{Change, Nexthop, PortId, Prefix, RouteKey, TableId};
use flow_offload::status::OffloadStatus;
use frr::*;
use host_agent::fpm::{FeedbackEncoder, FpmEvent, FrrVersion, Rib};

fn key(p: &str) -> RouteKey {
    RouteKey {
        table: TableId(254),
        prefix: p.parse().unwrap(),
    }
}

fn upserted<'a>(changes: &'a [Change], p: &str) -> Option<&'a [Nexthop]> {
    let k = key(p);
    changes.iter().rev().find_map(|c| match c {
        Change::UpsertRoute(r) if r.key == k => Some(r.nexthops.as_slice()),
        _ => None,
    })
}

fn start_frr84(ns: &str) -> Frr {
    let mut frr = Frr::new(Path::new("/"), ns);
    let v = FrrVersion::parse(&frr.zebra_version()).expect("zebra --version");
    assert_eq!(
        (v.major, v.minor),
        (8, 4),
        "this test is for the host's FRR 8.4"
    );
    assert!(!v.reads_feedback());
    let zconf = frr.write("zebra.conf", "fpm address 127.0.0.1 port 2620\n");
    let sconf = frr.write("staticd.conf", "");
    frr.start("zebra", &["-M", "dplane_fpm_nl", "-f", &zconf]);
    frr.start("staticd", &["-f", &sconf]);
    frr
}

#[test]
fn frr84_static_routes_flow_in_and_feedback_is_discarded() {
    let Some(ns) = inner_netns() else {
        let netns = Netns::new("fpm84");
        netns.run_inner(
            "frr84_static_routes_flow_in_and_feedback_is_discarded",
            Duration::from_secs(120),
            &[],
        );
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (server, mut rx) = server(FeedbackEncoder::default()).await;
        let mut frr = start_frr84(&ns);
        // zebra connects within its 3 s retry period.
        let first = tokio::time::timeout(Duration::from_secs(15), rx.recv())
            .await
            .expect("zebra did not connect")
            .unwrap();
        assert!(matches!(first, host_agent::fpm::ServerEvent::Connected { .. }));
        frr.vtysh(&[
            "-c",
            "configure terminal",
            "-c",
            "ip route 10.1.0.0/24 10.0.0.1",
            "-c",
            "ip route 10.2.0.0/24 10.0.0.1",
            "-c",
            "ip route 10.2.0.0/24 10.0.1.1",
            "-c",
            "ip route 192.0.2.0/24 blackhole",
            "-c",
            "ipv6 route 2001:db8:1::/48 fd00::1",
        ]);
        let want = ["10.1.0.0/24", "10.2.0.0/24", "192.0.2.0/24", "2001:db8:1::/48"];
        let events = collect(&mut rx, Duration::from_secs(20), |evs| {
            want.iter().all(|p| has_route(evs, p))
        })
        .await;
        let attr = attribution(&[254]);
        let mut rib = Rib::new();
        let changes = to_changes(&mut rib, &attr, &events);
        let mac = attr.default_mac.unwrap();
        let via = |gw: &str, port| Nexthop::Underlay {
            gateway: gw.parse().unwrap(),
            port: PortId(port),
            mac,
        };
        assert_eq!(
            upserted(&changes, "10.1.0.0/24"),
            Some(&[via("10.0.0.1", 0)][..]),
            "{events:#?}"
        );
        assert_eq!(
            upserted(&changes, "10.2.0.0/24"),
            Some(&[via("10.0.0.1", 0), via("10.0.1.1", 1)][..])
        );
        assert_eq!(
            upserted(&changes, "192.0.2.0/24"),
            Some(&[Nexthop::Blackhole][..])
        );
        assert_eq!(
            upserted(&changes, "2001:db8:1::/48"),
            Some(&[via("fd00::1", 0)][..])
        );
        let stats = server.counters();
        assert_eq!(stats.messages.malformed, 0);
        assert!(stats.messages.new_nexthop > 0, "8.4 uses nexthop groups by default");
        // 8.4 sends an update as DELROUTE + NEWROUTE: the batch holds one upsert, no delete.
        frr.vtysh(&[
            "-c",
            "configure terminal",
            "-c",
            "ip route 10.1.0.0/24 10.0.1.1",
            "-c",
            "no ip route 10.1.0.0/24 10.0.0.1",
        ]);
        let p1: Prefix = "10.1.0.0/24".parse().unwrap();
        let mut update = Vec::new();
        for _ in 0..40 {
            let more = collect(&mut rx, Duration::from_millis(500), |_| false).await;
            update.extend(more);
            let mut probe = Rib::new();
            let all: Vec<FpmEvent> = events.iter().chain(update.iter()).cloned().collect();
            let c = to_changes(&mut probe, &attr, &all);
            if upserted(&c, "10.1.0.0/24") == Some(&[via("10.0.1.1", 1)][..]) {
                break;
            }
        }
        let changes = to_changes(&mut rib, &attr, &update);
        let for_p1: Vec<&Change> = changes
            .iter()
            .filter(|c| c.object() == flow_offload::model::ObjectKey::Route(key("10.1.0.0/24")))
            .collect();
        assert!(
            matches!(for_p1.last(), Some(Change::UpsertRoute(r)) if r.nexthops == [via("10.0.1.1", 1)]),
            "update of {p1}: {update:#?}"
        );
        assert!(!for_p1.iter().any(|c| matches!(c, Change::DeleteRoute(_))));

        // Degraded path: acknowledge everything; 8.4 reads and discards it.
        let zr = rib.zebra_route(&key("10.2.0.0/24")).unwrap();
        assert_eq!(zr.protocol, 196, "static routes carry rtm_protocol 196");
        server
            .feedback()
            .ack([(&zr, &OffloadStatus::Offloaded)])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(server.counters().feedback_frames, 1);
        let json = frr.vtysh(&["-c", "show ip route 10.2.0.0/24 json"]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let entry = &v["10.2.0.0/24"][0];
        assert_eq!(entry["installed"], serde_json::Value::Bool(true), "{json}");
        assert!(
            entry.get("offloaded").is_none(),
            "8.4 is not expected to read feedback: {json}"
        );
        frr.stop();
    });
}
