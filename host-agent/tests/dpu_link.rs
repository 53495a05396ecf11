//! The host side of the DPU link against the real DPU agent's link server and agent state
//! (in-process, over the reference NIC backend): first full sync, incremental batches, a DPU
//! restart answered by a full resend, and refusals.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod dpu;

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use dpu::Dpu;
use dpu_agent::config::Role;
use flow_offload::model::{
    Change, MacAddr, Model, Name, Nexthop, Node, ObjectKey, PortId, Prefix, Route, RouteKey,
    TableId, Vni, Vpc, UNDERLAY_TABLE,
};
use flow_offload::status::OffloadStatus;
use host_agent::dpu_link::{run, DpuEvent, LinkConfig};
use tokio::sync::{mpsc, watch};

fn route(prefix: &str) -> Change {
    Change::UpsertRoute(Route {
        key: RouteKey {
            table: UNDERLAY_TABLE,
            prefix: prefix.parse::<Prefix>().unwrap(),
        },
        nexthops: vec![Nexthop::Underlay {
            gateway: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)),
            port: PortId(0),
            mac: MacAddr([2, 0, 0, 0, 0, 2]),
        }],
    })
}

fn model(changes: &[Change]) -> Arc<Model> {
    let mut m = Model::new();
    m.apply(changes).unwrap();
    Arc::new(m)
}

fn base() -> Vec<Change> {
    vec![
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
        route("10.0.1.0/24"),
        route("10.0.2.0/24"),
    ]
}

async fn next(rx: &mut mpsc::Receiver<DpuEvent>) -> DpuEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an event within 10 s")
        .expect("link running")
}

/// The next event that is not a counter report.
async fn next_state(rx: &mut mpsc::Receiver<DpuEvent>) -> DpuEvent {
    loop {
        match next(rx).await {
            DpuEvent::Counters { .. } => continue,
            e => return e,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_then_incremental_then_resend_after_restart() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dpu = Dpu::start(addr, "dpu-t", 1, &[(0, Role::Uplink), (1, Role::Vpc)]);
    let (desired_tx, desired_rx) = watch::channel(model(&base()));
    let (ev_tx, mut ev) = mpsc::channel(64);
    let (stop_tx, stop_rx) = watch::channel(false);
    let cfg = LinkConfig {
        heartbeat: Duration::from_millis(200),
        timeout: Duration::from_secs(3),
        reconnect: Duration::from_millis(100),
        batch_timeout: Duration::from_secs(30),
    };
    let link = tokio::spawn(run(addr, cfg, desired_rx, ev_tx, stop_rx, None));

    // First contact: the agent is empty, so the whole model goes.
    match next_state(&mut ev).await {
        DpuEvent::Connected { hello, restarted } => {
            assert_eq!(hello.dpu_id, "dpu-t");
            assert_eq!(hello.last_epoch, None);
            assert!(restarted);
        }
        e => panic!("{e:?}"),
    }
    match next_state(&mut ev).await {
        DpuEvent::Acked {
            full,
            status,
            epoch,
            ..
        } => {
            assert!(full);
            assert_eq!(epoch, 1);
            assert_eq!(status.len(), 4, "{status:?}");
            assert!(
                status.iter().all(|(_, s)| *s == OffloadStatus::Offloaded),
                "{status:?}"
            );
        }
        e => panic!("{e:?}"),
    }

    // One more route: only the difference goes.
    let mut more = base();
    more.push(route("10.0.3.0/24"));
    desired_tx.send(model(&more)).unwrap();
    match next_state(&mut ev).await {
        DpuEvent::Acked { full, status, .. } => {
            assert!(!full);
            assert_eq!(status.len(), 1, "{status:?}");
            assert!(matches!(status[0].0, ObjectKey::Route(_)));
        }
        e => panic!("{e:?}"),
    }

    // The agent restarts empty (new boot id): the host notices and resends everything.
    drop(dpu);
    let dpu = Dpu::start(addr, "dpu-t", 2, &[(0, Role::Uplink), (1, Role::Vpc)]);
    assert!(matches!(
        next_state(&mut ev).await,
        DpuEvent::Disconnected { .. }
    ));
    match next_state(&mut ev).await {
        DpuEvent::Connected { restarted, hello } => {
            assert!(restarted);
            assert_eq!(hello.boot_id, 2);
        }
        e => panic!("{e:?}"),
    }
    match next_state(&mut ev).await {
        DpuEvent::Acked { full, status, .. } => {
            assert!(full);
            assert_eq!(status.len(), 5);
        }
        e => panic!("{e:?}"),
    }

    // A desired model with an object this DPU cannot take (a VPC on a port it does not have):
    // that object fails alone, the batch is acknowledged, nothing is resent in a loop.
    let mut bad = more.clone();
    bad.push(Change::UpsertVpc(Vpc {
        name: Name::new("red").unwrap(),
        vni: Vni::new(200).unwrap(),
        table: TableId(20),
        ports: [PortId(7)].into_iter().collect(),
    }));
    desired_tx.send(model(&bad)).unwrap();
    let last_epoch = match next_state(&mut ev).await {
        DpuEvent::Acked {
            full,
            status,
            epoch,
            ..
        } => {
            assert!(!full);
            assert_eq!(status.len(), 1, "{status:?}");
            match &status[0] {
                (ObjectKey::Vpc(n), OffloadStatus::Failed { reason }) => {
                    assert_eq!(n.as_str(), "red");
                    assert!(
                        reason.to_string().contains("not a VPC-facing port"),
                        "{reason}"
                    );
                }
                other => panic!("{other:?}"),
            }
            epoch
        }
        e => panic!("{e:?}"),
    };
    // Fixing the desired state converges, incrementally from what the DPU acknowledged.
    let mut fixed = more.clone();
    fixed.push(route("10.0.4.0/24"));
    desired_tx.send(model(&fixed)).unwrap();
    match next_state(&mut ev).await {
        DpuEvent::Acked { full, status, .. } => {
            assert!(!full);
            assert_eq!(status.len(), 1, "{status:?}");
            assert!(matches!(status[0].0, ObjectKey::Route(_)));
        }
        e => panic!("{e:?}"),
    }

    // The host side restarts (a new link, knowing nothing): it resumes numbering after the
    // DPU's last epoch, so its resync is never mistaken for a replay.
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), link)
        .await
        .expect("link stops on shutdown")
        .unwrap();
    let (ev_tx, mut ev) = mpsc::channel(64);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (_desired_tx2, desired_rx) = watch::channel(model(&fixed));
    let link = tokio::spawn(run(addr, cfg, desired_rx, ev_tx, stop_rx, None));
    match next_state(&mut ev).await {
        DpuEvent::Connected { hello, restarted } => {
            assert!(restarted);
            assert!(hello.last_epoch >= Some(last_epoch + 1), "{hello:?}");
        }
        e => panic!("{e:?}"),
    }
    match next_state(&mut ev).await {
        DpuEvent::Acked { full, epoch, .. } => {
            assert!(full);
            assert!(epoch > last_epoch + 1, "epoch {epoch} after {last_epoch}");
        }
        e => panic!("{e:?}"),
    }

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), link)
        .await
        .expect("link stops on shutdown")
        .unwrap();
    drop(dpu);
}
