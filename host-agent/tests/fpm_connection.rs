//! Who may connect to the FPM port, and what a connection may remove (issue 15): the real
//! `host-agent` binary over a real etcd, its FPM port on loopback, and routes observed where
//! the DPUs get them from (the gRPC API's `learned` listing is the desired state the daemon
//! pushes to its DPUs).
//!
//! "zebra" here is a TCP client that sends zebra-shaped frames (`host_agent::fpm::build`,
//! laid out as `zebra/rt_netlink.c` does; blackhole routes in the main table, which the daemon
//! takes without any interface or neighbour configured). The other clients are plain TCP
//! clients: an idle one, one that sends garbage, one that connects beside zebra. That is the
//! whole point: any local process can open this port.
//!
//! Each test first establishes zebra's routes (a replay that completes), then does the thing,
//! then checks, repeatedly over three quiet periods and at the end, that every route is still
//! in the desired state. On the old code (any connection replaced zebra's, and the replay timer
//! ran from the connect) every one of them lost all routes about a second in.
//! Needs etcd (Debian's `etcd-server`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use host_agent::api::pb;
use host_agent::fpm::build::{self, NlWriter, RouteSpec};
use host_agent::fpm::decode::{RouteKind, NLM_F_REPLACE, NLM_F_REQUEST};
use host_agent::fpm::frame::encode_frame;
use host_agent::fpm::REPLAY_QUIET;
use pb::route_service_client::RouteServiceClient;

/// zebra's routes in every test.
const ROUTES: [&str; 4] = [
    "10.1.0.0/24",
    "10.2.0.0/24",
    "198.51.100.0/24",
    "2001:db8:1::/48",
];

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// One zebra-shaped RTM_NEWROUTE frame: a static blackhole in the main table.
fn route_frame(prefix: &str) -> Vec<u8> {
    let mut w = NlWriter::new();
    build::route(
        &mut w,
        true,
        NLM_F_REQUEST | NLM_F_REPLACE,
        &RouteSpec {
            table: 254,
            prefix: prefix.parse().unwrap(),
            protocol: 196,
            kind: RouteKind::Blackhole,
            rtm_flags: 0,
            metric: Some(20),
            nexthops: None,
        },
    );
    let mut f = Vec::new();
    encode_frame(&w.buf, &mut f).unwrap();
    f
}

/// etcd and the `host-agent` binary with an FPM port and no DPU; stopped (by PID) on drop.
struct Site {
    _etcd: common::Etcd,
    daemon: Child,
    dir: std::path::PathBuf,
    api: SocketAddr,
    metrics: SocketAddr,
    fpm: SocketAddr,
}

impl Site {
    async fn start(name: &str) -> Site {
        let etcd = common::Etcd::start().await;
        let (api, metrics, fpm) = (free_addr(), free_addr(), free_addr());
        let dir = std::env::temp_dir().join(format!("fpm-conn-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("host-agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "[etcd]\nendpoints = [\"{}\"]\n[api]\nlisten = \"{api}\"\n[metrics]\nlisten = \"{metrics}\"\n[fpm]\nlisten = \"{fpm}\"\ntable_encoding = \"table-id\"\n",
                etcd.endpoint()
            ),
        )
        .unwrap();
        let daemon = Command::new(env!("CARGO_BIN_EXE_host-agent"))
            .arg("--config")
            .arg(&cfg)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("host-agent.log")).unwrap())
            .spawn()
            .unwrap();
        Site {
            _etcd: etcd,
            daemon,
            dir,
            api,
            metrics,
            fpm,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("host-agent.log")).unwrap_or_default()
    }

    /// A TCP connection to the FPM port (retried while the daemon starts).
    fn connect(&self) -> TcpStream {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match TcpStream::connect(self.fpm) {
                Ok(s) => return s,
                Err(e) => assert!(Instant::now() < deadline, "FPM port: {e}\n{}", self.log()),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// FRR's routes in the desired state the daemon pushes to its DPUs.
    async fn routes(&self) -> BTreeSet<String> {
        let mut c = RouteServiceClient::connect(format!("http://{}", self.api))
            .await
            .unwrap();
        let r = c
            .list_routes(pb::ListRoutesRequest {
                table: 254,
                vpc: String::new(),
                learned: true,
            })
            .await
            .unwrap()
            .into_inner();
        r.routes
            .into_iter()
            .filter(|r| r.source == "frr")
            .filter_map(|r| r.key.map(|k| k.prefix))
            .collect()
    }

    /// Waits (bounded) until the desired state holds exactly `want`.
    async fn wait_routes(&self, want: &[&str], what: &str) {
        let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.routes().await;
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: routes {got:?}, expected {want:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Checks every 50 ms for `periods` quiet periods that all of `want` stays in the
    /// desired state. A bounded wait, not a timing assertion: the routes must never go.
    async fn routes_stay(&self, want: &[&str], periods: u32, what: &str) {
        let until = Instant::now() + REPLAY_QUIET * periods;
        loop {
            let got = self.routes().await;
            let missing: Vec<&&str> = want.iter().filter(|p| !got.contains(**p)).collect();
            assert!(
                missing.is_empty(),
                "{what}: routes {missing:?} were withdrawn (have {got:?})\n{}",
                self.log()
            );
            if Instant::now() >= until {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded) until the daemon has logged `needle` at least `n` times.
    async fn wait_log(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.log().matches(needle).count() < n {
            assert!(
                Instant::now() < deadline,
                "never logged {n}× {needle:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn metrics(&self) -> String {
        let mut s = TcpStream::connect(self.metrics).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// zebra connects, replays [`ROUTES`], and its replay completes (the daemon says so).
    /// Returns zebra's connection, still open.
    async fn establish(&self) -> TcpStream {
        let mut zebra = self.connect();
        for p in ROUTES {
            zebra.write_all(&route_frame(p)).unwrap();
        }
        self.wait_routes(&ROUTES, "zebra's first replay").await;
        self.wait_log("zebra replay over", 1).await;
        zebra
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.daemon.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while !matches!(self.daemon.try_wait(), Ok(Some(_))) {
            if Instant::now() > deadline {
                let _ = self.daemon.kill();
                let _ = self.daemon.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads until the peer closes (bounded): true if it did.
fn closed_by_peer(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// zebra is gone (restarting); a process connects to the FPM port and closes without a
/// byte. Nothing is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_that_connects_and_closes_removes_no_route() {
    let site = Site::start("idle").await;
    let zebra = site.establish().await;
    drop(zebra);
    site.wait_log("zebra disconnected", 1).await;

    let idle = site.connect();
    drop(idle);
    site.routes_stay(&ROUTES, 3, "after an idle connection")
        .await;
    site.wait_log("closed before sending any route", 1).await;
}

/// zebra is gone; a process sends something that is not FPM (an HTTP request) and is reset
/// for it. Nothing is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_connection_removes_no_route() {
    let site = Site::start("garbage").await;
    let zebra = site.establish().await;
    drop(zebra);
    site.wait_log("zebra disconnected", 1).await;

    let mut garbage = site.connect();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    site.routes_stay(&ROUTES, 3, "after a garbage connection")
        .await;
    assert!(closed_by_peer(&mut garbage), "the server resets garbage");
    site.wait_log("resetting the connection", 1).await;
}

/// zebra is connected; another process connects. It is closed at once, logged with its
/// address and counted; zebra's connection goes on and nothing is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_while_zebra_is_alive_is_refused_and_replaces_nothing() {
    let site = Site::start("second").await;
    let mut zebra = site.establish().await;

    let mut intruder = site.connect();
    let intruder_addr = intruder.local_addr().unwrap();
    site.routes_stay(&ROUTES, 3, "after a second connection")
        .await;
    assert!(closed_by_peer(&mut intruder), "refused: closed at once");
    let log = site.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains(&intruder_addr.to_string())),
        "no WARN naming {intruder_addr}\n{log}"
    );
    let m = site.metrics();
    assert!(m.contains("dpucp_fpm_refused_connections_total 1"), "{m}");
    assert!(m.contains("dpucp_fpm_connections_total 1"), "{m}");

    // zebra's connection is still the one in use: a new route on it lands.
    zebra.write_all(&route_frame("10.9.0.0/24")).unwrap();
    let mut all = ROUTES.to_vec();
    all.push("10.9.0.0/24");
    site.wait_routes(&all, "a route on zebra's connection")
        .await;
}

/// zebra restarts and is slow: it connects, says nothing for longer than the quiet period,
/// then replays with gaps shorter than it. No route is withdrawn at any point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_replay_withdraws_nothing() {
    let site = Site::start("slow").await;
    let zebra = site.establish().await;
    drop(zebra);
    site.wait_log("zebra disconnected", 1).await;

    let mut zebra = site.connect();
    // Slow to start...
    site.routes_stay(&ROUTES, 2, "zebra connected, not replaying yet")
        .await;
    // ...then trickling: each gap is 40% of the quiet period.
    for p in ROUTES {
        zebra.write_all(&route_frame(p)).unwrap();
        let until = Instant::now() + REPLAY_QUIET * 2 / 5;
        while Instant::now() < until {
            let got = site.routes().await;
            assert!(
                ROUTES.iter().all(|r| got.contains(*r)),
                "withdrawn mid-replay: {got:?}\n{}",
                site.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    site.wait_log("zebra replay over", 2).await;
    site.routes_stay(&ROUTES, 1, "after the slow replay").await;
}

/// The sweep still happens, by the right connection: a zebra that dies mid-replay removes
/// nothing; the next one, whose replay completes, removes what it did not replay (also what
/// the dead one did not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_completed_replay_removes_routes_zebra_no_longer_has() {
    let site = Site::start("sweep").await;
    let zebra = site.establish().await;
    drop(zebra);
    site.wait_log("zebra disconnected", 1).await;

    // Replays one route and dies before going quiet.
    let mut dying = site.connect();
    dying.write_all(&route_frame(ROUTES[0])).unwrap();
    drop(dying);
    site.wait_log("disconnected mid-replay", 1).await;
    site.routes_stay(&ROUTES, 3, "after a replay cut short")
        .await;

    // Replays two routes and stays: the other two go once it is quiet.
    let mut zebra = site.connect();
    zebra.write_all(&route_frame(ROUTES[1])).unwrap();
    zebra.write_all(&route_frame(ROUTES[2])).unwrap();
    site.wait_routes(&ROUTES[1..3], "after a completed replay")
        .await;
}
