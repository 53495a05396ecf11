//! Offload feedback against real FRR 10.3 (Debian 13, from the chroot `scripts/frr-chroot`
//! builds and caches): routes acknowledged as Offloaded, Software and Failed show up in
//! `show ip route json` as offloaded, trapped+offloaded and offload-failed; an unacknowledged
//! route stays queued.
//!
//! FRR 10.3.0–10.3.4 look the acknowledged route up with the table field as the VRF id *and*
//! table id 0 (upstream bug, fixed in 10.4 by "zebra: Fix pass back of data from dplane through
//! fpm pipe"). Feedback therefore only lands when zebra's main table id is 0 (`zebra -R 0`; the
//! kernel still installs into main) and the VRF id is sent in the table field
//! ([`TableEncoding::VrfIdMainAsZero`]). The second test shows that without `-R 0` nothing lands.
//! Needs root, iproute2, debootstrap and network access the first time (the chroot is cached).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod frr;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flow_offload::compile::SwReason;
use flow_offload::model::{Change, Prefix};
use flow_offload::status::{FailReason, OffloadStatus};
use frr::*;
use host_agent::fpm::{FeedbackEncoder, FrrVersion, Rib, ServerEvent, TableEncoding};

fn chroot() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/frr-chroot");
    let out = std::process::Command::new(&script).output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn outer(test: &str) {
    let root = chroot();
    let netns = Netns::new("fpm103");
    netns.run_inner_at(
        &root,
        test,
        Duration::from_secs(150),
        &[(CHROOT_ENV, root.to_str().unwrap())],
    );
}

const ROUTES: &str = "\
ip route 10.1.0.0/24 10.0.0.1
ip route 10.2.0.0/24 10.0.0.1
ip route 10.3.0.0/24 10.0.0.1
ip route 10.4.0.0/24 10.0.0.1
ip route 10.5.0.0/24 10.0.0.1
ip route 10.5.0.0/24 10.0.1.1
ipv6 route 2001:db8:1::/48 fd00::1
";

/// What the test's "DPU" reports per prefix (10.4 is never acknowledged).
fn status_for(p: &Prefix) -> Option<OffloadStatus> {
    match p.to_string().as_str() {
        "10.1.0.0/24" | "2001:db8:1::/48" | "10.6.0.0/24" => Some(OffloadStatus::Offloaded),
        "10.2.0.0/24" | "10.5.0.0/24" => Some(OffloadStatus::Software {
            reason: SwReason::Ecmp,
        }),
        "10.3.0.0/24" => Some(OffloadStatus::Failed {
            reason: FailReason::SoftwareTableFull,
        }),
        _ => None,
    }
}

/// Start FRR 10.3 in the chroot with FPM and asic-offload; `main_table_zero` adds `-R 0`.
fn start(ns: &str, main_table_zero: bool) -> (Frr, TableEncoding) {
    let root = PathBuf::from(std::env::var(CHROOT_ENV).unwrap());
    let mut frr = Frr::new(&root, ns);
    let version_text = frr.zebra_version();
    let v = FrrVersion::parse(&version_text).expect("zebra --version");
    assert!(v.reads_feedback(), "{version_text}");
    let enc = TableEncoding::detect(&version_text, None);
    frr.start("mgmtd", &[]);
    let mut zebra = vec!["-M", "dplane_fpm_nl", "--asic-offload=notify_on_offload"];
    if main_table_zero {
        zebra.extend(["-R", "0"]);
    }
    frr.start("zebra", &zebra);
    frr.start("staticd", &[]);
    (frr, enc)
}

/// Feed events to a RIB and acknowledge every installed route by its prefix's status.
async fn ack_loop(
    rx: &mut tokio::sync::mpsc::Receiver<ServerEvent>,
    server: &host_agent::fpm::FpmServer,
    rib: &mut Rib,
    attr: &host_agent::fpm::StaticAttribution,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) {
    let deadline = tokio::time::Instant::now() + limit;
    let fb = server.feedback();
    while tokio::time::Instant::now() < deadline && !done() {
        let ev = match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            Ok(Some(ServerEvent::Events(evs))) => evs,
            Ok(Some(ServerEvent::Connected { .. })) => {
                // zebra replays everything and keeps old flags: acknowledge all again.
                rib.begin_resync();
                let acks: Vec<_> = rib
                    .routes()
                    .filter_map(|(z, _)| status_for(&z.prefix).map(|s| (z, s)))
                    .collect();
                fb.ack(acks.iter().map(|(z, s)| (z, s))).await.unwrap();
                continue;
            }
            Ok(Some(_)) => continue,
            Ok(None) => return,
            Err(_) => continue,
        };
        let changes = to_changes(rib, attr, &ev);
        let mut acks = Vec::new();
        for c in &changes {
            if let Change::UpsertRoute(r) = c {
                if let (Some(z), Some(s)) = (rib.zebra_route(&r.key), status_for(&r.key.prefix)) {
                    acks.push((z, s));
                }
            }
        }
        fb.ack(acks.iter().map(|(z, s)| (z, s))).await.unwrap();
    }
}

fn route_json(frr: &Frr) -> HashMap<String, serde_json::Value> {
    let mut out = HashMap::new();
    for cmd in ["show ip route json", "show ipv6 route json"] {
        let text = frr.vtysh(&["-c", cmd]);
        if let Ok(serde_json::Value::Object(m)) = serde_json::from_str(&text) {
            for (k, v) in m {
                out.insert(k, v[0].clone());
            }
        }
    }
    out
}

fn flag(routes: &HashMap<String, serde_json::Value>, p: &str, f: &str) -> Option<bool> {
    routes
        .get(p)
        .and_then(|r| r.get(f))
        .and_then(|v| v.as_bool())
}

fn expected(routes: &HashMap<String, serde_json::Value>) -> bool {
    let on = |p, f| flag(routes, p, f) == Some(true);
    on("10.1.0.0/24", "offloaded")
        && on("2001:db8:1::/48", "offloaded")
        && on("10.2.0.0/24", "trapped")
        && on("10.2.0.0/24", "offloaded")
        && on("10.5.0.0/24", "trapped")
        && flag(routes, "10.3.0.0/24", "offloaded") == Some(false)
        && on("10.4.0.0/24", "queued")
}

#[test]
fn frr103_feedback_offloaded_trapped_failed() {
    let Some(ns) = inner_netns() else {
        outer("frr103_feedback_offloaded_trapped_failed");
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (mut frr, enc) = start(&ns, true);
        assert_eq!(
            enc,
            TableEncoding::VrfIdMainAsZero,
            "Debian 13 ships 10.3.0: {}",
            frr.zebra_version()
        );
        let (server, mut rx) = server(FeedbackEncoder::new(enc)).await;
        frr.load_config(
            "frr.conf",
            &format!("fpm address 127.0.0.1 port 2620\n{ROUTES}"),
        );
        // With -R 0 zebra sends the main table as 0.
        let attr = attribution(&[0, 254]);
        let mut rib = Rib::new();
        let mut last = HashMap::new();
        let mut polls = 0u32;
        ack_loop(
            &mut rx,
            &server,
            &mut rib,
            &attr,
            Duration::from_secs(40),
            || {
                polls += 1;
                // vtysh costs ~50 ms: look every few iterations only.
                if polls.is_multiple_of(4) {
                    last = route_json(&frr);
                }
                expected(&last)
            },
        )
        .await;
        let routes = route_json(&frr);
        let show = |p: &str| format!("{p}: {}", routes.get(p).cloned().unwrap_or_default());
        assert!(
            expected(&routes),
            "{}\n{}\n{}\n{}\n{}\n{}\ncounters {:?}\nzebra log:\n{}",
            show("10.1.0.0/24"),
            show("10.2.0.0/24"),
            show("10.3.0.0/24"),
            show("10.4.0.0/24"),
            show("10.5.0.0/24"),
            show("2001:db8:1::/48"),
            server.counters(),
            frr.log("zebra")
        );
        let summary = frr.vtysh(&["-c", "show ip route summary json"]);
        let s: serde_json::Value = serde_json::from_str(&summary).unwrap();
        let statics = s["routes"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["type"] == "static"))
            .cloned()
            .unwrap_or_default();
        // 10.1, 10.2 and 10.5 carry RTM_F_OFFLOAD (Software = trap + offload); 10.2, 10.5 trap.
        assert_eq!(statics["fibOffLoaded"].as_u64(), Some(3), "{summary}");
        assert_eq!(statics["fibTrapped"].as_u64(), Some(2), "{summary}");
        assert_eq!(server.counters().messages.malformed, 0);

        // The agent restarts: zebra reconnects (3 s retry) and replays everything, keeping
        // the flags it had; the consumer re-acknowledges all and new routes still land.
        server.shutdown().await;
        drop(rx);
        let (server, mut rx) = frr::server(FeedbackEncoder::new(enc)).await;
        let mut resynced = false;
        let mut polls = 0u32;
        let mut last = HashMap::new();
        ack_loop(
            &mut rx,
            &server,
            &mut rib,
            &attr,
            Duration::from_secs(40),
            || {
                polls += 1;
                let replayed = server.counters().messages.new_route >= 7;
                if replayed && !resynced {
                    resynced = true;
                    frr.vtysh(&[
                        "-c",
                        "configure terminal",
                        "-c",
                        "ip route 10.6.0.0/24 10.0.0.1",
                    ]);
                }
                if resynced && polls.is_multiple_of(4) {
                    last = route_json(&frr);
                }
                expected(&last) && flag(&last, "10.6.0.0/24", "offloaded") == Some(true)
            },
        )
        .await;
        let routes = route_json(&frr);
        assert!(
            expected(&routes) && flag(&routes, "10.6.0.0/24", "offloaded") == Some(true),
            "after reconnect: {:?}\ncounters {:?}",
            routes.get("10.6.0.0/24"),
            server.counters()
        );
        assert_eq!(server.counters().connections, 1);
        let mut gone = host_agent::fpm::ChangeBatch::new();
        rib.end_resync(&attr, &mut gone);
        assert!(
            gone.is_empty(),
            "every route was replayed: {:?}",
            gone.changes()
        );
        frr.stop();
    });
}

#[test]
fn frr103_without_main_table_zero_feedback_is_not_applied() {
    let Some(ns) = inner_netns() else {
        outer("frr103_without_main_table_zero_feedback_is_not_applied");
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (mut frr, enc) = start(&ns, false);
        let (server, mut rx) = server(FeedbackEncoder::new(enc)).await;
        frr.load_config(
            "frr.conf",
            &format!("fpm address 127.0.0.1 port 2620\n{ROUTES}"),
        );
        let attr = attribution(&[254]);
        let mut rib = Rib::new();
        // Acknowledge for 8 s; then every acknowledged route must still be queued.
        ack_loop(
            &mut rx,
            &server,
            &mut rib,
            &attr,
            Duration::from_secs(8),
            || false,
        )
        .await;
        assert!(
            server.counters().feedback_frames >= 5,
            "{:?}",
            server.counters()
        );
        let routes = route_json(&frr);
        for p in ["10.1.0.0/24", "10.2.0.0/24", "10.3.0.0/24"] {
            assert_eq!(
                flag(&routes, p, "queued"),
                Some(true),
                "{p}: {:?}",
                routes.get(p)
            );
            assert_eq!(flag(&routes, p, "offloaded"), None, "{p}");
        }
        frr.stop();
    });
}
