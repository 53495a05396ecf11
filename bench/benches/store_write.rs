//! One desired-state write through the etcd store (a static route replaced), with 0, 1k and
//! 10k routes already stored, against a real etcd started here on loopback (its own data
//! directory; stopped by PID). Beside it, in the same run, a full read of the desired state
//! (`Store::snapshot`): what every write paid before writes validated against the cached view.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use flow_offload::model::{
    Change, MacAddr, Name, Nexthop, Node, PortId, Prefix, Route, RouteKey, TableId, Vni, Vpc,
};
use host_agent::store::{Guarded, Store, StoreConfig};

struct Etcd {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_etcd() -> (Etcd, String) {
    let dir = std::env::temp_dir().join(format!("bench-etcd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let client = format!("http://127.0.0.1:{}", free_port());
    let peer = format!("http://127.0.0.1:{}", free_port());
    let child = Command::new("etcd")
        .args(["--name", "b", "--data-dir"])
        .arg(dir.join("data"))
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("b={peer}")])
        .args(["--log-level", "error", "--logger", "zap"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd (apt install etcd-server)");
    (Etcd { child, dir }, client)
}

fn route(i: u32) -> Route {
    let a = Ipv4Addr::from(0x0a00_0000 + (i << 8));
    Route {
        key: RouteKey {
            table: TableId(10),
            prefix: format!("{a}/24").parse::<Prefix>().unwrap(),
        },
        nexthops: vec![Nexthop::Blackhole],
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_etcd, endpoint) = start_etcd();
    let store = rt.block_on(async {
        let cfg = StoreConfig {
            endpoints: vec![endpoint],
            timeout: Duration::from_secs(5),
            max_txn_ops: 128,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = Store::connect(&cfg).await {
                if s.snapshot().await.is_ok() {
                    break s;
                }
            }
            assert!(Instant::now() < deadline, "etcd not up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    rt.block_on(async {
        store
            .write(&[
                Guarded::any(Change::SetNode(Node {
                    vtep: Ipv4Addr::new(192, 0, 2, 1),
                    router_mac: MacAddr([2, 0, 0, 0, 0, 1]),
                    uplinks: [PortId(0)].into_iter().collect(),
                })),
                Guarded::any(Change::UpsertVpc(Vpc {
                    name: Name::new("blue").unwrap(),
                    vni: Vni::new(100).unwrap(),
                    table: TableId(10),
                    ports: [PortId(1)].into_iter().collect(),
                })),
            ])
            .await
            .unwrap();
    });
    let mut g = c.benchmark_group("store_write");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(5));
    let mut stored = 0u32;
    for n in [0u32, 1000, 10_000] {
        // Fill up to n routes, 100 per transaction.
        rt.block_on(async {
            while stored < n {
                let batch: Vec<Guarded> = (stored..(stored + 100).min(n))
                    .map(|i| Guarded::any(Change::UpsertRoute(route(i))))
                    .collect();
                stored += batch.len() as u32;
                store.write(&batch).await.unwrap();
            }
        });
        // The measured write: a route beyond the filled ones, replaced with a new next hop.
        let mut flip = false;
        g.bench_with_input(BenchmarkId::new("one_route_write", n), &n, |b, _| {
            b.iter(|| {
                flip = !flip;
                let mut r = route(60_000);
                if flip {
                    r.nexthops = vec![Nexthop::Vrf {
                        table: TableId(254),
                    }];
                }
                rt.block_on(store.write(&[Guarded::any(Change::UpsertRoute(r))]))
                    .unwrap()
            })
        });
        g.bench_with_input(BenchmarkId::new("full_read", n), &n, |b, _| {
            b.iter(|| rt.block_on(store.snapshot()).unwrap().revision)
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
