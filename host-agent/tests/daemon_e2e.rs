//! The host-agent daemon end to end: a real etcd, the real `host-agent` binary, and a DPU agent
//! (its real link server and state, in this process, on the reference NIC backend). Desired
//! state written to etcd reaches the DPU; its statuses come back into etcd, `dpuctl status` and
//! the Prometheus endpoint; SIGTERM stops the daemon with exit 0.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod dpu;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dpu::{terminate, Dpu};
use dpu_agent::config::Role;
use flow_offload::model::{
    Change, MacAddr, Name, Nexthop, Node, ObjectKey, PortId, Prefix, Route, RouteKey, TableId, Vni,
    Vpc, UNDERLAY_TABLE,
};
use flow_offload::status::OffloadStatus;

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The `host-agent` binary started on a config file written from `config` in its own
/// directory; its log goes to `host-agent.log` there.
struct Daemon {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Daemon {
    fn start(name: &str, config: &str) -> Daemon {
        let dir = std::env::temp_dir().join(format!("host-agent-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("host-agent.toml");
        std::fs::write(&cfg, config).unwrap();
        let log = std::fs::File::create(dir.join("host-agent.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_host-agent"))
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Daemon { child, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("host-agent.log")).unwrap_or_default()
    }

    /// SIGTERM; the daemon must exit 0.
    fn stop(mut self) {
        let dir = self.dir.clone();
        let read = move || std::fs::read_to_string(dir.join("host-agent.log")).unwrap_or_default();
        let status = terminate(&mut self.child, &read);
        assert!(status.success(), "exit {status}\n{}", read());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_reaches_the_dpu_and_status_comes_back() {
    let etcd = common::Etcd::start().await;
    let store = etcd.store().await;

    // The DPU agent.
    let link = free_addr();
    let dpu = Dpu::start(link, "dpu-e2e", 42, &[(0, Role::Uplink), (1, Role::Vpc)]);

    // The daemon.
    let api = free_addr();
    let metrics = free_addr();
    let daemon = Daemon::start(
        "e2e",
        &format!(
            "[etcd]\nendpoints = [\"{}\"]\n[api]\nlisten = \"{api}\"\n[metrics]\nlisten = \"{metrics}\"\n[[dpus]]\nid = \"dpu-e2e\"\nlink = \"{link}\"\n",
            etcd.endpoint()
        ),
    );
    let read_log = || daemon.log();

    // Desired state, written the way the API writes it.
    let key = RouteKey {
        table: UNDERLAY_TABLE,
        prefix: "10.7.0.0/16".parse::<Prefix>().unwrap(),
    };
    store
        .apply(&[
            Change::SetNode(Node {
                vtep: Ipv4Addr::new(192, 0, 2, 1),
                router_mac: MacAddr([2, 0, 0, 0, 0, 1]),
                uplinks: [PortId(0)].into_iter().collect(),
            }),
            Change::UpsertVpc(Vpc {
                name: Name::new("blue").unwrap(),
                vni: Vni::new(100).unwrap(),
                table: TableId(10),
                ports: [PortId(1)].into_iter().collect(),
            }),
            Change::UpsertRoute(Route {
                key,
                nexthops: vec![Nexthop::Underlay {
                    gateway: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)),
                    port: PortId(0),
                    mac: MacAddr([2, 0, 0, 0, 0, 2]),
                }],
            }),
        ])
        .await
        .unwrap();

    // The route's status arrives in etcd under the DPU.
    let dpu_name = Name::new("dpu-e2e").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (entries, _) = store.status(Some(&dpu_name)).await.unwrap();
        if entries
            .iter()
            .any(|e| e.object == ObjectKey::Route(key) && e.status == OffloadStatus::Offloaded)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no status in etcd: {entries:?}\n{}",
            read_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // dpuctl shows it.
    let out = Command::new(env!("CARGO_BIN_EXE_dpuctl"))
        .args(["--server", &format!("http://{api}"), "status", "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("10.7.0.0/16"), "{text}");

    // And Prometheus (object counts are refreshed every 2 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = http_get(metrics, "/metrics");
        if m.contains("dpucp_objects{dpu=\"dpu-e2e\",kind=\"route\",where=\"offloaded\"} 1") {
            break m;
        }
        assert!(Instant::now() < deadline, "no object count: {m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(m.contains("dpucp_dpu_up{dpu=\"dpu-e2e\"} 1"), "{m}");
    assert!(m.contains("dpucp_etcd_up 1"), "{m}");

    // The DPU is registered and alive.
    let dpus = store.dpus().await.unwrap();
    assert!(
        dpus.iter().any(|d| d.record.id == dpu_name && d.alive),
        "{dpus:?}"
    );

    // Graceful stop.
    daemon.stop();
    drop(dpu);
}

/// zebra's side through the daemon, with real zebra bytes: the FRR 8.4 capture in
/// `tests/data/` is replayed to the daemon's FPM port (as zebra would on connect). Its blackhole
/// routes need no interface or neighbour, so they reach the DPU; once it acknowledges them,
/// the daemon answers on the same connection with RTM_NEWROUTE carrying RTM_F_OFFLOAD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zebra_routes_reach_the_dpu_and_offload_flags_come_back() {
    use host_agent::fpm::{decode_netlink, FpmEvent, FrameDecoder};
    let capture = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/frr84-static.fpm"
    ))
    .unwrap();
    // The blackholes in the capture.
    let mut dec = FrameDecoder::new();
    dec.extend(&capture);
    let mut events = Vec::new();
    let mut stats = Default::default();
    while let Some(f) = dec.next_frame().unwrap() {
        decode_netlink(f, &mut events, &mut stats);
    }
    let blackholes: Vec<Prefix> = events
        .iter()
        .filter_map(|e| match e {
            FpmEvent::Route(r) if r.kind.drops() && r.table == 254 => Some(r.prefix),
            _ => None,
        })
        .collect();
    assert!(!blackholes.is_empty(), "the capture has blackhole routes");

    let etcd = common::Etcd::start().await;
    let store = etcd.store().await;
    store
        .apply(&[Change::SetNode(Node {
            vtep: Ipv4Addr::new(192, 0, 2, 1),
            router_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            uplinks: [PortId(0)].into_iter().collect(),
        })])
        .await
        .unwrap();
    let link = free_addr();
    let dpu = Dpu::start(link, "dpu-fpm", 7, &[(0, Role::Uplink)]);
    let (api, metrics, fpm) = (free_addr(), free_addr(), free_addr());
    let daemon = Daemon::start(
        "fpm",
        &format!(
            "[etcd]\nendpoints = [\"{}\"]\n[api]\nlisten = \"{api}\"\n[metrics]\nlisten = \"{metrics}\"\n[fpm]\nlisten = \"{fpm}\"\ntable_encoding = \"table-id\"\n[[dpus]]\nid = \"dpu-fpm\"\nlink = \"{link}\"\n",
            etcd.endpoint()
        ),
    );
    let read_log = || daemon.log();

    // "zebra" connects and replays.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut z = loop {
        match TcpStream::connect(fpm) {
            Ok(z) => break z,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("FPM port: {e}\n{}", read_log()),
        }
    };
    z.write_all(&capture).unwrap();
    z.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // Feedback: RTM_NEWROUTE (24) with RTM_F_OFFLOAD for every blackhole prefix length.
    let mut dec = FrameDecoder::new();
    let mut offloaded: Vec<(u8, u8)> = Vec::new();
    let want: std::collections::BTreeSet<(u8, u8)> = blackholes
        .iter()
        .map(|p| (if p.is_v4() { 2 } else { 10 }, p.len()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = vec![0u8; 65536];
    while !want.iter().all(|w| offloaded.contains(w)) {
        assert!(
            Instant::now() < deadline,
            "no offload feedback for {want:?} (got {offloaded:?})\n{}",
            read_log()
        );
        match z.read(&mut buf) {
            Ok(0) => panic!("daemon closed the FPM connection\n{}", read_log()),
            Ok(n) => dec.extend(&buf[..n]),
            Err(_) => continue,
        }
        while let Some(f) = dec.next_frame().unwrap() {
            // nlmsghdr (16) then rtmsg: family, dst_len, src_len, tos, table, protocol,
            // scope, type, flags (u32).
            let kind = u16::from_ne_bytes([f[4], f[5]]);
            let flags = u32::from_ne_bytes([f[24], f[25], f[26], f[27]]);
            if kind == 24 && flags & 0x4000 != 0 {
                offloaded.push((f[16], f[17]));
            }
        }
    }
    let m = http_get(metrics, "/metrics");
    assert!(m.contains("dpucp_fpm_connections_total 1"), "{m}");

    daemon.stop();
    drop(dpu);
}
