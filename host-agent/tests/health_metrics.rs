//! Health metrics that tell the truth (issue 16): each is tested by killing what it reports on
//! and watching the metric, on the real `host-agent` binary's Prometheus endpoint, fall and
//! come back within [`WITHIN`] (one scrape interval).
//!
//! - `dpucp_etcd_up`: the real etcd, killed with SIGKILL and restarted. Before the fix, it was
//!   set only by the watch, which does not notice a dead etcd for a long while: it read 1
//!   fifteen seconds after the kill.
//! - `dpucp_fpm_connected`: "zebra" is a process holding a TCP connection to the FPM port,
//!   killed with SIGKILL (the kernel closes its socket, as for a zebra that dies).
//! - `dpucp_dpu_link_up`: a DPU agent (the real link server and state, in this process, over the
//!   reference NIC), stopped and started again on the same address.
//!
//! Needs etcd (Debian's `etcd-server`) and bash (its `/dev/tcp`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod agent;
mod common;
mod dpu;

use std::process::{Command, Stdio};
use std::time::Duration;

use agent::{blackhole, free_addr, Agent};
use dpu::Dpu;
use dpu_agent::config::Role;

/// One scrape interval: the most a health metric may lag behind reality.
const WITHIN: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_up_falls_within_a_scrape_interval_of_a_kill_and_comes_back() {
    let mut etcd = common::Etcd::start().await;
    let agent = Agent::start("health-etcd", &etcd.endpoint(), None, "");
    agent
        .wait_metric("dpucp_etcd_up", 1.0, Duration::from_secs(20))
        .await;

    etcd.kill();
    let fell = agent.wait_metric("dpucp_etcd_up", 0.0, WITHIN).await;
    // What the operator sees at the same time: the API answers Unavailable.
    let out = agent.dpuctl(&["status"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("etcd unavailable"),
        "{out:?}"
    );
    // And it stays down while etcd is.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(agent.metric("dpucp_etcd_up"), Some(0.0), "{}", agent.log());

    etcd.restart().await;
    let rose = agent.wait_metric("dpucp_etcd_up", 1.0, WITHIN).await;
    eprintln!("dpucp_etcd_up fell {fell:?} after the kill, rose {rose:?} after the restart");
    assert!(
        agent.log().contains("etcd probe: etcd does not answer"),
        "{}",
        agent.log()
    );
}

/// A process that connects to the FPM port, sends `frames`, and holds the connection open
/// until killed (bash's `/dev/tcp`; `sleep` inherits the socket).
fn zebra_process(fpm: std::net::SocketAddr, frames: &std::path::Path) -> std::process::Child {
    Command::new("bash")
        .arg("-c")
        .arg(format!(
            "exec 3<>/dev/tcp/{}/{} && cat {} >&3 && exec sleep 600",
            fpm.ip(),
            fpm.port(),
            frames.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fpm_connected_follows_zebras_socket() {
    let etcd = common::Etcd::start().await;
    let agent = Agent::start("health-fpm", &etcd.endpoint(), Some(""), "");
    // No zebra yet: 0, from the start (the series appears once the FPM port listens).
    agent
        .wait_metric("dpucp_fpm_connected", 0.0, Duration::from_secs(20))
        .await;
    let frames = std::env::temp_dir().join(format!("health-fpm-{}.bin", std::process::id()));
    std::fs::write(&frames, blackhole("10.1.0.0/24")).unwrap();

    let fpm = agent.fpm.unwrap();
    let mut zebra = zebra_process(fpm, &frames);
    agent.wait_metric("dpucp_fpm_connected", 1.0, WITHIN).await;
    agent.wait_log("zebra replay over", 1).await;

    // kill -9: the kernel closes zebra's socket.
    zebra.kill().unwrap();
    zebra.wait().unwrap();
    let fell = agent.wait_metric("dpucp_fpm_connected", 0.0, WITHIN).await;

    // zebra comes back.
    let mut zebra = zebra_process(fpm, &frames);
    let rose = agent.wait_metric("dpucp_fpm_connected", 1.0, WITHIN).await;
    eprintln!(
        "dpucp_fpm_connected fell {fell:?} after the kill, rose {rose:?} after the reconnect"
    );
    assert_eq!(agent.metric("dpucp_fpm_connections_total"), Some(2.0));
    zebra.kill().unwrap();
    zebra.wait().unwrap();
    agent.wait_metric("dpucp_fpm_connected", 0.0, WITHIN).await;
    let _ = std::fs::remove_file(&frames);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpu_link_up_follows_the_dpu_agent() {
    let etcd = common::Etcd::start().await;
    let link = free_addr();
    let agent = Agent::start(
        "health-dpu",
        &etcd.endpoint(),
        None,
        &format!("[[dpus]]\nid = \"dpu-h\"\nlink = \"{link}\"\n"),
    );
    // Configured, not there yet: 0 from the start.
    let series = "dpucp_dpu_link_up{dpu=\"dpu-h\"}";
    agent
        .wait_metric(series, 0.0, Duration::from_secs(20))
        .await;

    let dpu = Dpu::start(link, "dpu-h", 1, &[(0, Role::Uplink)]);
    agent.wait_metric(series, 1.0, WITHIN).await;
    assert_eq!(agent.metric("dpucp_dpu_up{dpu=\"dpu-h\"}"), Some(1.0));

    // The agent stops: its sockets close.
    drop(dpu);
    let fell = agent.wait_metric(series, 0.0, WITHIN).await;
    assert_eq!(agent.metric("dpucp_dpu_up{dpu=\"dpu-h\"}"), Some(0.0));

    let dpu = Dpu::start(link, "dpu-h", 2, &[(0, Role::Uplink)]);
    let rose = agent.wait_metric(series, 1.0, WITHIN).await;
    eprintln!("dpucp_dpu_link_up fell {fell:?} after the stop, rose {rose:?} after the start");
    drop(dpu);
}
