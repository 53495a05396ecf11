//! What the FRR path used to hide or say twice (issue 15), against the real `host-agent`
//! binary over a real etcd, with a fake zebra on its FPM port:
//! - routes zebra sent that are on no DPU are listed by `dpuctl status` with their real reason,
//!   counted in `dpucp_frr_routes_refused{reason}`, and logged at WARN, rate-limited (before:
//!   missing from `dpuctl status`, the reason hard-coded as `NotFound{Node}`, DEBUG only);
//! - framing errors, undecodable messages and undecodable attributes are counted per kind in
//!   `dpucp_fpm_decode_errors_total` and logged at WARN, rate-limited; a dropped message is not
//!   counted as received (before: no metric, and the message counted as received);
//! - every route is acknowledged to zebra once per status and connection (before: twice, once
//!   at the DPU's acknowledgement and again in the re-acknowledgement after the replay).
//!
//! Needs etcd (Debian's `etcd-server`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod agent;
mod common;
mod dpu;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent::{blackhole, free_addr, read_feedback, route_frame, Agent};
use dpu::Dpu;
use dpu_agent::config::Role;
use flow_offload::model::{Change, MacAddr, Node, PortId};
use host_agent::fpm::build::NlWriter;
use host_agent::fpm::decode::{PathSpec, RouteKind, RouteNexthops, NLM_F_REQUEST, RTM_NEWROUTE};
use host_agent::fpm::frame::encode_frame;
use host_agent::fpm::{FpmConfig, FpmServer, FrameDecoder, ServerEvent};

const OFFLOAD: u32 = 0x4000;
const OFFLOAD_FAILED: u32 = 0x2000_0000;

/// The FPM section of these tests: `lo` stands for DPU port 0, and 192.0.2.2 is a gateway
/// with a known MAC. (No node is configured unless a test sets one: port 0 is then no
/// uplink, and the model refuses routes through it.)
const FPM: &str =
    "interfaces = { \"lo\" = 0 }\nneighbours = { \"192.0.2.2\" = \"02:00:00:00:00:02\" }";

fn lo_ifindex() -> u32 {
    std::fs::read_to_string("/sys/class/net/lo/ifindex")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1)
}

fn via(gateway: &str, ifindex: u32) -> RouteNexthops {
    RouteNexthops::Paths(vec![PathSpec {
        gateway: Some(gateway.parse().unwrap()),
        ifindex,
        vni: None,
        weight: 1,
    }])
}

fn connected(ifindex: u32) -> RouteNexthops {
    RouteNexthops::Paths(vec![PathSpec {
        gateway: None,
        ifindex,
        vni: None,
        weight: 1,
    }])
}

fn node_with_uplink0() -> Change {
    Change::SetNode(Node {
        vtep: Ipv4Addr::new(192, 0, 2, 1),
        router_mac: MacAddr([2, 0, 0, 0, 0, 1]),
        uplinks: [PortId(0)].into_iter().collect(),
    })
}

/// A route message whose RTA_DST is 3 bytes long: an undecodable attribute.
fn bad_attribute(w: &mut NlWriter) {
    w.begin(RTM_NEWROUTE, NLM_F_REQUEST, 0);
    w.bytes(&[2, 24, 0, 0, 254, 196, 0, 1, 0, 0, 0, 0]);
    w.attr(1, &[10, 0, 0]);
    w.end();
}

/// A route message for 10.0.0.1/8 (host bits set): an undecodable message.
fn bad_message(w: &mut NlWriter) {
    w.begin(RTM_NEWROUTE, NLM_F_REQUEST, 0);
    w.bytes(&[2, 8, 0, 0, 254, 196, 0, 1, 0, 0, 0, 0]);
    w.attr(1, &[10, 0, 0, 1]);
    w.end();
}

fn frame(w: &NlWriter) -> Vec<u8> {
    let mut f = Vec::new();
    encode_frame(&w.buf, &mut f).unwrap();
    f
}

/// The statuses `dpuctl status --json` lists with no DPU (zebra's routes on no DPU):
/// object text → (reason code, reason).
fn refused_in_status(agent: &Agent) -> BTreeMap<String, (String, String)> {
    agent
        .status_json()
        .into_iter()
        .filter(|s| s["dpu"] == "")
        .map(|s| {
            (
                s["object"].as_str().unwrap_or_default().to_owned(),
                (
                    s["reason_code"].as_str().unwrap_or_default().to_owned(),
                    s["reason"].as_str().unwrap_or_default().to_owned(),
                ),
            )
        })
        .collect()
}

fn find<'a>(
    m: &'a BTreeMap<String, (String, String)>,
    prefix: &str,
) -> Option<&'a (String, String)> {
    m.iter()
        .find(|(k, _)| k.contains(&format!("{prefix} ")))
        .map(|(_, v)| v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_on_no_dpu_are_listed_with_their_reason_counted_and_logged() {
    let etcd = common::Etcd::start().await;
    let agent = Agent::start("vis-refused", &etcd.endpoint(), Some(FPM), "");
    let lo = lo_ifindex();
    let mut zebra = agent.connect_fpm();
    let mut bytes = Vec::new();
    // Through DPU port 0, which is no uplink: the model refuses it.
    bytes.extend(route_frame(
        "10.5.0.0/24",
        RouteKind::Unicast,
        Some(&via("192.0.2.2", lo)),
    ));
    // Directly connected: not ours.
    bytes.extend(route_frame(
        "10.0.0.0/24",
        RouteKind::Unicast,
        Some(&connected(lo)),
    ));
    // Out of an interface that is no DPU port: not ours.
    bytes.extend(route_frame(
        "10.9.0.0/24",
        RouteKind::Unicast,
        Some(&via("192.0.2.9", 999)),
    ));
    // A nexthop id zebra never defines: waiting.
    bytes.extend(route_frame(
        "10.1.0.0/24",
        RouteKind::Unicast,
        Some(&RouteNexthops::Id(77)),
    ));
    // Taken.
    bytes.extend(blackhole("198.51.100.0/24"));
    zebra.write_all(&bytes).unwrap();

    for (reason, n) in [
        ("invalid", 1.0),
        ("connected", 1.0),
        ("no_port", 1.0),
        ("pending_nexthop", 1.0),
    ] {
        agent
            .wait_metric(
                &format!("dpucp_frr_routes_refused{{reason=\"{reason}\"}}"),
                n,
                Duration::from_secs(10),
            )
            .await;
    }
    let listed = refused_in_status(&agent);
    assert_eq!(listed.len(), 4, "{listed:?}");
    let (code, why) = find(&listed, "10.5.0.0/24").unwrap();
    assert_eq!(code, "invalid");
    assert!(
        why.contains("refused by the model") && why.contains("port 0 (not an uplink)"),
        "the model's own reason: {why}"
    );
    let (code, why) = find(&listed, "10.0.0.0/24").unwrap();
    assert_eq!(code, "connected");
    assert!(why.contains("connected route: not ours"), "{why}");
    assert_eq!(find(&listed, "10.9.0.0/24").unwrap().0, "no_port");
    assert_eq!(find(&listed, "10.1.0.0/24").unwrap().0, "pending_nexthop");
    assert!(find(&listed, "198.51.100.0/24").is_none());
    // The human table shows them too, with no DPU.
    let table = String::from_utf8(agent.dpuctl(&["status"]).stdout).unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with('-') && l.contains("10.5.0.0/24") && l.contains("invalid")),
        "{table}"
    );
    // zebra is told the refused route failed, once.
    zebra
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut dec = FrameDecoder::new();
    let mut acks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while !acks.iter().any(|(p, _): &(String, u32)| p == "10.5.0.0/24") {
        assert!(Instant::now() < deadline, "no feedback\n{}", agent.log());
        if let Ok(n) = zebra.read(&mut buf) {
            acks.extend(read_feedback(&mut dec, &buf[..n]));
        }
    }
    assert_eq!(acks, vec![("10.5.0.0/24".to_owned(), OFFLOAD_FAILED)]);
    // Logged at WARN with the reason.
    let warned = agent.log_lines("FRR route on no DPU");
    assert!(
        warned.iter().any(|l| l.contains("WARN")
            && l.contains("10.5.0.0/24")
            && l.contains("not an uplink")),
        "{}",
        agent.log()
    );
    assert!(warned
        .iter()
        .any(|l| l.contains("WARN") && l.contains("connected route")));

    // The node gets uplink 0: the route is valid now, and no longer listed.
    etcd.store()
        .await
        .apply(&[node_with_uplink0()])
        .await
        .unwrap();
    agent
        .wait_metric(
            "dpucp_frr_routes_refused{reason=\"invalid\"}",
            0.0,
            Duration::from_secs(10),
        )
        .await;
    assert!(find(&refused_in_status(&agent), "10.5.0.0/24").is_none());

    // A burst of 3000 connected routes: each counted and listed, a few examples logged, and
    // the rest summarised.
    let before = agent.log_lines("FRR route on no DPU").len();
    let mut burst = Vec::new();
    for i in 0..3000u32 {
        let a = Ipv4Addr::from(0x0a64_0000 + i);
        burst.extend(route_frame(
            &format!("{a}/32"),
            RouteKind::Unicast,
            Some(&connected(lo)),
        ));
    }
    zebra.write_all(&burst).unwrap();
    agent
        .wait_metric(
            "dpucp_frr_routes_refused{reason=\"connected\"}",
            3001.0,
            Duration::from_secs(20),
        )
        .await;
    agent
        .wait_log("more FRR routes on no DPU than logged", 1)
        .await;
    let examples = agent.log_lines("FRR route on no DPU").len() - before;
    assert!(
        examples <= 20,
        "{examples} lines for 3000 routes\n{}",
        agent.log()
    );
    let summary = agent.log_lines("more FRR routes on no DPU than logged");
    assert!(
        summary.iter().all(|l| l.contains("WARN"))
            && summary.iter().any(|l| l.contains("connected=")),
        "{summary:?}"
    );
    assert_eq!(refused_in_status(&agent).len(), 3003);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_errors_are_counted_by_kind_and_logged_rate_limited() {
    let etcd = common::Etcd::start().await;
    let agent = Agent::start("vis-decode", &etcd.endpoint(), Some(""), "");
    for kind in ["frame", "message", "attribute"] {
        agent
            .wait_metric(
                &format!("dpucp_fpm_decode_errors_total{{kind=\"{kind}\"}}"),
                0.0,
                Duration::from_secs(20),
            )
            .await;
    }
    let mut zebra = agent.connect_fpm();
    // One frame: a good route, a bad attribute, a bad message.
    let mut w = NlWriter::new();
    w.buf.extend(&blackhole("10.1.0.0/24")[4..]);
    bad_attribute(&mut w);
    bad_message(&mut w);
    let mut bytes = frame(&w);
    // Then 600 frames with one bad attribute each.
    for _ in 0..600 {
        let mut w = NlWriter::new();
        bad_attribute(&mut w);
        bytes.extend(frame(&w));
    }
    zebra.write_all(&bytes).unwrap();
    agent
        .wait_metric(
            "dpucp_fpm_decode_errors_total{kind=\"attribute\"}",
            601.0,
            Duration::from_secs(10),
        )
        .await;
    agent
        .wait_metric(
            "dpucp_fpm_decode_errors_total{kind=\"message\"}",
            1.0,
            Duration::from_secs(10),
        )
        .await;
    // Only the good message was received.
    assert_eq!(
        agent.metric("dpucp_fpm_messages_total"),
        Some(1.0),
        "{}",
        agent.metrics_text()
    );
    agent
        .wait_log("more framing/decode errors than logged", 1)
        .await;
    let examples = agent.log_lines("undecodable netlink message dropped");
    assert!(
        !examples.is_empty() && examples.len() <= 15 && examples.iter().all(|l| l.contains("WARN")),
        "{} example lines for 602 errors\n{}",
        examples.len(),
        agent.log()
    );
    assert!(
        examples.iter().any(|l| l.contains("kind=attribute")),
        "{examples:?}"
    );
    assert!(
        examples.iter().any(|l| l.contains("kind=message")),
        "{examples:?}"
    );
    let summary = agent.log_lines("more framing/decode errors than logged");
    assert!(
        summary
            .iter()
            .any(|l| l.contains("WARN") && l.contains("attribute=")),
        "{summary:?}"
    );
    // The connection is still zebra's: a route on it lands.
    zebra.write_all(&blackhole("10.2.0.0/24")).unwrap();
    agent
        .wait_metric("dpucp_fpm_messages_total", 2.0, Duration::from_secs(10))
        .await;

    // A stream that cannot be framed: the connection is reset, the error counted and logged.
    drop(zebra);
    agent
        .wait_metric("dpucp_fpm_connected", 0.0, Duration::from_secs(5))
        .await;
    let mut garbage = agent.connect_fpm();
    garbage.write_all(&[1, 1, 0, 2]).unwrap();
    agent
        .wait_metric(
            "dpucp_fpm_decode_errors_total{kind=\"frame\"}",
            1.0,
            Duration::from_secs(10),
        )
        .await;
    assert!(
        agent
            .log_lines("framing error; resetting the connection")
            .iter()
            .any(|l| l.contains("WARN")),
        "{}",
        agent.log()
    );
}

/// The server's own counters: a dropped message counts as dropped, not as received.
#[tokio::test]
async fn dropped_messages_are_not_counted_as_received() {
    let (server, mut rx) = FpmServer::start(FpmConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..FpmConfig::default()
    })
    .await
    .unwrap();
    let mut z = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let mut w = NlWriter::new();
    w.buf.extend(&blackhole("10.1.0.0/24")[4..]);
    bad_attribute(&mut w);
    bad_message(&mut w);
    tokio::io::AsyncWriteExt::write_all(&mut z, &frame(&w))
        .await
        .unwrap();
    let mut events = 0;
    while events < 1 {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            ServerEvent::Events(e) => events += e.len(),
            ServerEvent::Connected { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.counters().messages.dropped() < 2 {
        assert!(Instant::now() < deadline, "{:?}", server.counters());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = server.counters();
    assert_eq!((c.messages.messages, c.messages.new_route), (1, 1), "{c:?}");
    assert_eq!(
        (c.messages.malformed, c.messages.bad_attributes),
        (1, 1),
        "{c:?}"
    );
    assert_eq!(c.live, Some(1));
}

/// Collects zebra's acknowledgements on one connection, in a thread.
struct Feedback {
    acks: Arc<Mutex<Vec<(String, u32)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Feedback {
    fn read(stream: &TcpStream) -> Feedback {
        let mut s = stream.try_clone().unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let acks = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, st) = (acks.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut dec = FrameDecoder::new();
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::Relaxed) {
                match s.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        let got = read_feedback(&mut dec, &buf[..n]);
                        a.lock().unwrap().extend(got);
                    }
                    Err(_) => continue,
                }
            }
        });
        Feedback {
            acks,
            stop,
            thread: Some(thread),
        }
    }

    /// Acknowledgements per prefix: the flags of each, in order.
    fn per_prefix(&self) -> BTreeMap<String, Vec<u32>> {
        let mut m: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (p, f) in self.acks.lock().unwrap().iter() {
            m.entry(p.clone()).or_default().push(*f);
        }
        m
    }

    /// Waits (bounded) until each of `prefixes` was acknowledged with OFFLOAD.
    async fn wait_offloaded(&self, prefixes: &[String], agent: &Agent) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let m = self.per_prefix();
            if prefixes
                .iter()
                .all(|p| m.get(p).is_some_and(|f| f.iter().any(|x| x & OFFLOAD != 0)))
            {
                return;
            }
            assert!(Instant::now() < deadline, "acks {m:?}\n{}", agent.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Feedback {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_is_acknowledged_once_per_status_and_connection() {
    let etcd = common::Etcd::start().await;
    etcd.store()
        .await
        .apply(&[node_with_uplink0()])
        .await
        .unwrap();
    let link = free_addr();
    let dpu = Dpu::start(link, "dpu-fb", 1, &[(0, Role::Uplink)]);
    // The links run from the start, so the DPU acknowledges routes during zebra's replay.
    let agent = Agent::start(
        "vis-feedback",
        &etcd.endpoint(),
        Some(&format!("startup_hold_secs = 0\n{FPM}")),
        &format!("[[dpus]]\nid = \"dpu-fb\"\nlink = \"{link}\"\n"),
    );
    agent
        .wait_metric(
            "dpucp_dpu_link_up{dpu=\"dpu-fb\"}",
            1.0,
            Duration::from_secs(20),
        )
        .await;
    let lo = lo_ifindex();
    let prefixes: Vec<String> = (0..20).map(|i| format!("10.20.{i}.0/24")).collect();

    // zebra's first connection and replay.
    let mut zebra = agent.connect_fpm();
    let fb = Feedback::read(&zebra);
    let replay: Vec<u8> = prefixes.iter().flat_map(|p| blackhole(p)).collect();
    zebra.write_all(&replay).unwrap();
    fb.wait_offloaded(&prefixes, &agent).await;
    agent.wait_log("zebra replay over", 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = fb.per_prefix();
    for p in &prefixes {
        assert!(
            matches!(m.get(p).map(Vec::as_slice), Some([f]) if f & OFFLOAD != 0),
            "{p}: not exactly one acknowledgement: {m:?}\n{}",
            agent.log()
        );
    }
    assert_eq!(m.len(), prefixes.len(), "{m:?}");

    // A new route in steady state: one acknowledgement, and none for the others.
    zebra.write_all(&blackhole("10.30.0.0/24")).unwrap();
    fb.wait_offloaded(&["10.30.0.0/24".to_owned()], &agent)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fb.acks.lock().unwrap().len(), 21, "{:?}", fb.per_prefix());
    agent
        .wait_metric("dpucp_fpm_feedback_total", 21.0, Duration::from_secs(5))
        .await;
    drop(fb);
    drop(zebra);
    agent.wait_log("zebra disconnected", 1).await;

    // zebra reconnects and replays: 10.20.0.0/24 now through a gateway (a changed route,
    // which the DPU acknowledges during the replay), 10.30.0.0/24 gone. Each replayed route
    // is acknowledged once on this connection: the changed one by the DPU's acknowledgement,
    // the others after the replay.
    let mut zebra = agent.connect_fpm();
    let fb = Feedback::read(&zebra);
    let mut replay = route_frame(
        &prefixes[0],
        RouteKind::Unicast,
        Some(&via("192.0.2.2", lo)),
    );
    for p in &prefixes[1..] {
        replay.extend(blackhole(p));
    }
    zebra.write_all(&replay).unwrap();
    fb.wait_offloaded(&prefixes, &agent).await;
    agent.wait_log("zebra replay over", 2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = fb.per_prefix();
    for p in &prefixes {
        assert!(
            matches!(m.get(p).map(Vec::as_slice), Some([f]) if f & OFFLOAD != 0),
            "{p}: not exactly one acknowledgement: {m:?}\n{}",
            agent.log()
        );
    }
    assert_eq!(m.len(), prefixes.len(), "{m:?}");
    agent
        .wait_metric("dpucp_fpm_feedback_total", 41.0, Duration::from_secs(5))
        .await;
    drop(fb);
    drop(zebra);
    drop(agent);
    drop(dpu);
}
