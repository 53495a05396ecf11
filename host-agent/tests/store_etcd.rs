//! The etcd store against a real etcd (Debian's etcd-server) started per test on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::Etcd;
use etcd_client::{CompactionOptions, GetOptions};
use flow_offload::caps::{CapsSource, Profile};
use flow_offload::compile::SwReason;
use flow_offload::model::{
    Change, ModelError, Name, Nexthop, ObjectKey, PortId, Prefix, Route, RouteKey, TableId, Vni,
    Vpc,
};
use flow_offload::status::OffloadStatus;
use host_agent::store::{
    DpuRecord, Guarded, ModelUpdate, ModelWatch, PortCaps, StatusChange, Store, StoreError,
};
use tokio_stream::StreamExt;

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn vpc(n: &str, vni: u32, table: u32, ports: &[u16]) -> Vpc {
    Vpc {
        name: name(n),
        vni: Vni::new(vni).unwrap(),
        table: TableId(table),
        ports: ports.iter().map(|p| PortId(*p)).collect(),
    }
}

fn blackhole(table: u32, prefix: &str) -> Route {
    Route {
        key: RouteKey {
            table: TableId(table),
            prefix: prefix.parse::<Prefix>().unwrap(),
        },
        nexthops: vec![Nexthop::Blackhole],
    }
}

async fn key_count(store: &Store) -> i64 {
    let mut kv = store.client().kv_client();
    kv.get(
        "/dpucp/v1/",
        Some(GetOptions::new().with_prefix().with_count_only()),
    )
    .await
    .unwrap()
    .count()
}

/// The next update of a watch, bounded.
async fn next_update(w: &mut ModelWatch) -> ModelUpdate {
    tokio::time::timeout(Duration::from_secs(30), w.next())
        .await
        .expect("no watch update within 30 s")
        .expect("watch ended")
        .expect("watch error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_roundtrip_is_json_readable_with_etcdctl() {
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    store
        .apply(&[
            Change::UpsertVpc(vpc("blue", 100, 10, &[1, 2])),
            Change::UpsertRoute(blackhole(10, "10.1.0.0/16")),
        ])
        .await
        .unwrap();

    let (model, _) = store.load().await.unwrap();
    assert_eq!(model.vpcs()[&name("blue")], vpc("blue", 100, 10, &[1, 2]));
    assert_eq!(model.routes().len(), 1);

    let json = etcd.etcdctl(&["get", "/dpucp/v1/vpcs/blue", "--print-value-only"]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["name"], "blue");
    assert_eq!(v["vni"], 100);
    assert_eq!(v["table"], 10);
    let routes = etcd.etcdctl(&["get", "/dpucp/v1/routes/", "--prefix", "--keys-only"]);
    assert_eq!(routes.trim(), "/dpucp/v1/routes/10/10.1.0.0_16");

    store
        .apply(&[
            Change::DeleteRoute(blackhole(10, "10.1.0.0/16").key),
            Change::DeleteVpc(name("blue")),
        ])
        .await
        .unwrap();
    let (model, _) = store.load().await.unwrap();
    assert!(model.vpcs().is_empty() && model.routes().is_empty());
    assert_eq!(etcd.etcdctl(&["get", "/dpucp/v1/vpcs/blue"]).trim(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_writer_gets_conflict() {
    let etcd = Etcd::start().await;
    let (a, b) = (etcd.store().await, etcd.store().await);
    a.apply(&[Change::UpsertVpc(vpc("blue", 100, 10, &[]))])
        .await
        .unwrap();
    let rev = a
        .snapshot()
        .await
        .unwrap()
        .revision_of(&ObjectKey::Vpc(name("blue")))
        .unwrap();
    // Both read revision `rev`, both try to update from it at the same time.
    let ba = [Guarded::at(
        Change::UpsertVpc(vpc("blue", 100, 10, &[1])),
        rev,
    )];
    let bb = [Guarded::at(
        Change::UpsertVpc(vpc("blue", 100, 10, &[2])),
        rev,
    )];
    let (wa, wb) = (a.write(&ba), b.write(&bb));
    let (ra, rb) = tokio::join!(wa, wb);
    let conflicts = [&ra, &rb]
        .iter()
        .filter(|r| matches!(r, Err(StoreError::Conflict { key }) if key == "/dpucp/v1/vpcs/blue"))
        .count();
    assert_eq!(conflicts, 1, "{ra:?} {rb:?}");
    let winner = if ra.is_ok() { 1 } else { 2 };
    let (model, _) = a.load().await.unwrap();
    assert_eq!(
        model.vpcs()[&name("blue")].ports,
        BTreeSet::from([PortId(winner)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_read_modify_write_loses_no_update() {
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    store
        .apply(&[Change::UpsertVpc(vpc("blue", 100, 10, &[]))])
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for port in 1..=8u16 {
        let s = etcd.store().await;
        tasks.push(tokio::spawn(async move {
            let key = ObjectKey::Vpc(name("blue"));
            for _ in 0..100 {
                let snap = s.snapshot().await.unwrap();
                let mut v = snap.model.vpcs()[&name("blue")].clone();
                v.ports.insert(PortId(port));
                match s
                    .write(&[Guarded::at(
                        Change::UpsertVpc(v),
                        snap.revision_of(&key).unwrap(),
                    )])
                    .await
                {
                    Ok(_) => return,
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => panic!("{e}"),
                }
            }
            panic!("port {port}: 100 conflicts in a row");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (model, _) = store.load().await.unwrap();
    assert_eq!(
        model.vpcs()[&name("blue")].ports,
        (1..=8).map(PortId).collect::<BTreeSet<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_of_existing_object_is_refused() {
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    store
        .write(&[Guarded::create(Change::UpsertVpc(vpc(
            "blue",
            100,
            10,
            &[],
        )))])
        .await
        .unwrap();
    let err = store
        .write(&[Guarded::create(Change::UpsertVpc(vpc(
            "blue",
            200,
            20,
            &[],
        )))])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::AlreadyExists { object: ObjectKey::Vpc(ref n) } if n.as_str() == "blue"),
        "{err}"
    );
    assert_eq!(
        store.load().await.unwrap().0.vpcs()[&name("blue")].table,
        TableId(10)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_changes_nothing() {
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    store
        .apply(&[Change::UpsertVpc(vpc("blue", 100, 10, &[]))])
        .await
        .unwrap();
    let before = key_count(&store).await;
    let rev_before = store.load().await.unwrap().1;

    // A route in a table no VPC owns.
    let err = store
        .apply(&[Change::UpsertRoute(blackhole(77, "10.0.0.0/8"))])
        .await
        .unwrap_err();
    let StoreError::Invalid(ModelError::InBatch { source, .. }) = &err else {
        panic!("{err}")
    };
    assert!(
        matches!(&**source, ModelError::Invalid { field, .. } if field == "table"),
        "{source}"
    );
    // A VNI another VPC has.
    let err = store
        .apply(&[Change::UpsertVpc(vpc("red", 100, 11, &[]))])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("field `vni`"), "{err}");
    // Deleting what does not exist.
    let err = store
        .apply(&[Change::DeleteVpc(name("nope"))])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");

    assert_eq!(key_count(&store).await, before);
    assert_eq!(store.load().await.unwrap().1, rev_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_is_atomic() {
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    let before = key_count(&store).await;
    // The third change refers to a table no VPC owns.
    let bad = [
        Change::UpsertVpc(vpc("green", 300, 30, &[3])),
        Change::UpsertRoute(blackhole(30, "10.3.0.0/16")),
        Change::UpsertRoute(blackhole(31, "10.4.0.0/16")),
    ];
    let err = store.apply(&bad).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Invalid(ModelError::InBatch { index: 2, .. })
        ),
        "{err}"
    );
    assert_eq!(key_count(&store).await, before);

    let rev = store.apply(&bad[..2]).await.unwrap();
    let snap = store.snapshot().await.unwrap();
    assert_eq!(snap.objects.len(), 2);
    // One transaction: every object carries the revision of the write.
    assert!(snap.objects.values().all(|(_, r)| *r == rev));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_revision_replays_and_follows() {
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    let (base, rev0) = store.load().await.unwrap();
    let r1 = store
        .apply(&[Change::UpsertVpc(vpc("blue", 100, 10, &[]))])
        .await
        .unwrap();
    // Started after the write, from the earlier revision: the write is replayed.
    let mut w = store.watch(&base, rev0);
    let u = next_update(&mut w).await;
    assert_eq!(
        u,
        ModelUpdate {
            revision: r1,
            changes: vec![Change::UpsertVpc(vpc("blue", 100, 10, &[]))],
            resync: false
        }
    );
    let r2 = store
        .apply(&[
            Change::UpsertRoute(blackhole(10, "10.1.0.0/16")),
            Change::UpsertRoute(blackhole(10, "10.2.0.0/16")),
        ])
        .await
        .unwrap();
    let u = next_update(&mut w).await;
    assert_eq!(u.revision, r2);
    assert_eq!(u.changes.len(), 2);
    let r3 = store
        .apply(&[Change::DeleteRoute(blackhole(10, "10.1.0.0/16").key)])
        .await
        .unwrap();
    let u = next_update(&mut w).await;
    assert_eq!(
        (u.revision, u.changes),
        (
            r3,
            vec![Change::DeleteRoute(blackhole(10, "10.1.0.0/16").key)]
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_forces_resync_with_correct_diff() {
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    store
        .apply(&[
            Change::UpsertVpc(vpc("a", 100, 10, &[1])),
            Change::UpsertVpc(vpc("b", 200, 20, &[2])),
            Change::UpsertVpc(vpc("keep", 300, 30, &[3])),
        ])
        .await
        .unwrap();
    let (base, rev0) = store.load().await.unwrap();
    store.apply(&[Change::DeleteVpc(name("b"))]).await.unwrap();
    store
        .apply(&[Change::UpsertVpc(vpc("a", 100, 10, &[1, 4]))])
        .await
        .unwrap();
    let last = store
        .apply(&[Change::UpsertVpc(vpc("c", 400, 40, &[5]))])
        .await
        .unwrap();
    etcd.etcdctl(&["compact", &last.to_string()]);

    let mut w = store.watch(&base, rev0);
    let u = next_update(&mut w).await;
    assert!(u.resync);
    assert_eq!(u.revision, last);
    assert_eq!(
        u.changes,
        vec![
            Change::DeleteVpc(name("b")),
            Change::UpsertVpc(vpc("a", 100, 10, &[1, 4])),
            Change::UpsertVpc(vpc("c", 400, 40, &[5])),
        ]
    );
    let mut m = base.clone();
    m.apply(&u.changes).unwrap();
    assert_eq!(m, store.load().await.unwrap().0);

    // And it follows on from there.
    let r = store
        .apply(&[Change::DeleteVpc(name("keep"))])
        .await
        .unwrap();
    let u = next_update(&mut w).await;
    assert_eq!(
        (u.revision, u.changes, u.resync),
        (r, vec![Change::DeleteVpc(name("keep"))], false)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_via_client_while_watching_from_old_revision() {
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    let (base, rev0) = store.load().await.unwrap();
    store
        .apply(&[Change::UpsertVpc(vpc("a", 100, 10, &[]))])
        .await
        .unwrap();
    let last = store.apply(&[Change::DeleteVpc(name("a"))]).await.unwrap();
    store
        .client()
        .compact(last, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    let mut w = store.watch(&base, rev0);
    let u = next_update(&mut w).await;
    // Created and deleted before the compacted window: the diff is empty, not a replay.
    assert!(u.resync);
    assert!(u.changes.is_empty(), "{:?}", u.changes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_writes_fail_unavailable_and_last_model_stays() {
    let mut etcd = Etcd::start().await;
    let store = etcd.store().await;
    store
        .apply(&[Change::UpsertVpc(vpc("blue", 100, 10, &[]))])
        .await
        .unwrap();
    let (model, rev) = store.load().await.unwrap();
    etcd.kill();

    // Bounded by the store's 2 s timeout; the outer bound only keeps a broken test from hanging.
    let res = tokio::time::timeout(
        Duration::from_secs(15),
        store.apply(&[Change::UpsertVpc(vpc("red", 200, 20, &[]))]),
    )
    .await
    .expect("write did not return");
    assert!(
        matches!(res, Err(StoreError::Unavailable { .. })),
        "{res:?}"
    );
    let res = tokio::time::timeout(Duration::from_secs(15), store.load())
        .await
        .expect("read did not return");
    assert!(matches!(res, Err(StoreError::Unavailable { .. })));
    assert_eq!(store.last_model(), Some((model, rev)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resyncs_after_etcd_restart() {
    let mut etcd = Etcd::start().await;
    let store = etcd.store().await;
    let (base, rev) = store.load().await.unwrap();
    let mut w = store.watch(&base, rev);
    etcd.restart().await;
    // The lost stream is noticed and replaced by a full reload.
    let u = next_update(&mut w).await;
    assert!(u.resync);
    assert!(u.changes.is_empty());
    let r = store
        .apply(&[Change::UpsertVpc(vpc("after", 100, 10, &[]))])
        .await
        .unwrap();
    let u = next_update(&mut w).await;
    assert_eq!(u.revision, r);
    assert!(!u.resync);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_marks_dpu_dead() {
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    let rec = DpuRecord {
        id: name("dpu0"),
        agent_version: "0.1.0".into(),
        ports: vec![
            PortCaps {
                port: PortId(0),
                caps: CapsSource::Profile(Profile::Partial),
            },
            PortCaps {
                port: PortId(1),
                caps: CapsSource::Probed,
            },
        ],
    };
    let lease = store.register_dpu(&rec, 2).await.unwrap();
    let dpus = store.dpus().await.unwrap();
    assert_eq!(dpus.len(), 1);
    assert!(dpus[0].alive);
    assert_eq!(dpus[0].record, rec);

    // Status entries bound to the lease go with it.
    store
        .put_status(
            &name("dpu0"),
            &[(ObjectKey::Node, OffloadStatus::Offloaded)],
            Some(lease.lease_id()),
        )
        .await
        .unwrap();

    lease.stop();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dpus = store.dpus().await.unwrap();
        if !dpus[0].alive {
            // Dead, not forgotten.
            assert_eq!(dpus[0].record, rec);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lease did not expire within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(store
        .status(Some(&name("dpu0")))
        .await
        .unwrap()
        .0
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_keeps_dpu_alive_and_revoke_kills_it() {
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    let rec = DpuRecord {
        id: name("dpu1"),
        agent_version: "0.1.0".into(),
        ports: vec![],
    };
    let lease = store.register_dpu(&rec, 2).await.unwrap();
    // Longer than the TTL (etcd's minimum TTL may raise it): keep-alives must be working.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(store.dpus().await.unwrap()[0].alive);
    lease.revoke(&store).await.unwrap();
    assert!(!store.dpus().await.unwrap()[0].alive);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_put_list_and_watch() {
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    let d = name("dpu0");
    let vpc_key = ObjectKey::Vpc(name("blue"));
    let route_key = ObjectKey::Route(blackhole(10, "10.0.0.0/8").key);
    let rev = store
        .put_status(&d, &[(vpc_key.clone(), OffloadStatus::Offloaded)], None)
        .await
        .unwrap();
    let mut w = store.watch_status(None, rev).await.unwrap();
    let sw = OffloadStatus::Software {
        reason: SwReason::TableFull,
    };
    store
        .put_status(&d, &[(route_key.clone(), sw.clone())], None)
        .await
        .unwrap();
    store
        .clear_status(&d, std::slice::from_ref(&vpc_key))
        .await
        .unwrap();

    let (list, _) = store.status(Some(&d)).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].object, route_key);
    assert_eq!(list[0].status, sw);
    let json = etcd.etcdctl(&[
        "get",
        "/dpucp/v1/status/dpu0/routes/10/10.0.0.0_8",
        "--print-value-only",
    ]);
    assert!(json.contains("TableFull"), "{json}");

    let first = tokio::time::timeout(Duration::from_secs(30), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(first, StatusChange::Set { ref entry, .. } if entry.object == route_key && entry.status == sw),
        "{first:?}"
    );
    let second = tokio::time::timeout(Duration::from_secs(30), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(second, StatusChange::Removed { ref object, .. } if *object == vpc_key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_without_etcd_is_lazy_and_requests_fail_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = host_agent::store::StoreConfig {
        endpoints: vec![format!("http://127.0.0.1:{port}")],
        timeout: Duration::from_secs(1),
        max_txn_ops: 128,
    };
    // The daemon must come up without etcd; the outer bound only keeps a broken test finite.
    let store = tokio::time::timeout(Duration::from_secs(15), Store::connect(&cfg))
        .await
        .expect("connect did not return")
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(15), store.load())
        .await
        .expect("load did not return");
    assert!(
        matches!(res, Err(StoreError::Unavailable { .. })),
        "{res:?}"
    );
    assert_eq!(store.last_model(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_batch_applies_change_by_change() {
    use flow_offload::model::{Meter, MeterProfile, MeterTarget};
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    let r = blackhole(10, "10.0.0.0/8");
    let meter = |target| Meter {
        name: name("m"),
        profile: MeterProfile::SrTcm {
            cir: 1000,
            cbs: 2000,
            ebs: 2000,
        },
        target,
    };
    store
        .apply(&[
            Change::UpsertVpc(vpc("a", 100, 10, &[])),
            Change::UpsertRoute(r.clone()),
            Change::UpsertMeter(meter(MeterTarget::Route(r.key))),
        ])
        .await
        .unwrap();
    let (mut mirror, rev) = store.load().await.unwrap();
    let mut w = store.watch(&mirror, rev);
    // Move the meter off the route and delete the route, in one batch.
    let wrote = store
        .apply(&[
            Change::UpsertMeter(meter(MeterTarget::Vpc(name("a")))),
            Change::DeleteRoute(r.key),
        ])
        .await
        .unwrap();
    let u = next_update(&mut w).await;
    assert_eq!(u.revision, wrote);
    // A consumer applying each event on its own stays valid all the way.
    for c in &u.changes {
        mirror.apply(std::slice::from_ref(c)).unwrap();
    }
    assert_eq!(mirror, store.load().await.unwrap().0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_beyond_one_transaction_is_refused_whole() {
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    store
        .apply(&[Change::UpsertVpc(vpc("a", 100, 10, &[]))])
        .await
        .unwrap();
    let routes = |n: u32| -> Vec<Change> {
        (0..n)
            .map(|k| {
                Change::UpsertRoute(Route {
                    key: RouteKey {
                        table: TableId(10),
                        prefix: Prefix::v4(std::net::Ipv4Addr::from(0x0a00_0000 + (k << 8)), 24)
                            .unwrap(),
                    },
                    nexthops: vec![Nexthop::Blackhole],
                })
            })
            .collect()
    };
    let before = key_count(&store).await;
    let err = store.apply(&routes(200)).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::BatchTooLarge {
                objects: 200,
                max: 127
            }
        ),
        "{err}"
    );
    assert_eq!(key_count(&store).await, before);
    // The largest batch etcd's default --max-txn-ops accepts.
    store.apply(&routes(127)).await.unwrap();
    assert_eq!(store.load().await.unwrap().0.routes().len(), 127);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_lost_behind_the_keeper_is_reported_expired() {
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    let rec = DpuRecord {
        id: name("dpu2"),
        agent_version: "0.1.0".into(),
        ports: vec![],
    };
    let lease = store.register_dpu(&rec, 2).await.unwrap();
    assert!(!lease.is_expired());
    // Revoked behind the keeper's back: its next keep-alive learns the lease is gone.
    store.client().lease_revoke(lease.lease_id()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lease.is_expired() {
        assert!(Instant::now() < deadline, "expiry not noticed within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!store.dpus().await.unwrap()[0].alive);
}

/// Writes validate against the store's cached view; a view made stale by another writer (a
/// separate store, so a separate cache) must still end in a conflict, never a lost update, and
/// unrelated writes from the stale store must still succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_view_made_stale_by_another_writer_still_conflicts() {
    let etcd = Etcd::start().await;
    let (a, b) = (etcd.store().await, etcd.store().await);
    let rev = a
        .write(&[Guarded::create(Change::UpsertVpc(vpc(
            "blue",
            100,
            10,
            &[],
        )))])
        .await
        .unwrap();
    // a's cache now holds blue at `rev`. b changes blue behind a's back.
    b.write(&[Guarded::any(Change::UpsertVpc(vpc("blue", 100, 10, &[3])))])
        .await
        .unwrap();
    // a updates from the revision it saw: a conflict, and b's change stays.
    let r = a
        .write(&[Guarded::at(
            Change::UpsertVpc(vpc("blue", 100, 10, &[1])),
            rev,
        )])
        .await;
    assert!(
        matches!(&r, Err(StoreError::Conflict { key }) if key == "/dpucp/v1/vpcs/blue"),
        "{r:?}"
    );
    // A create of what b deleted meanwhile is judged on etcd's state, not a's cache.
    b.write(&[Guarded::any(Change::DeleteVpc(name("blue")))])
        .await
        .unwrap();
    a.write(&[Guarded::create(Change::UpsertVpc(vpc(
        "blue",
        100,
        10,
        &[2],
    )))])
    .await
    .unwrap();
    // An unrelated write from a (its cache stale again after b's next write) succeeds.
    b.write(&[Guarded::create(Change::UpsertVpc(vpc(
        "green",
        300,
        30,
        &[],
    )))])
    .await
    .unwrap();
    a.write(&[Guarded::create(Change::UpsertVpc(vpc("red", 200, 20, &[])))])
        .await
        .unwrap();
    let (model, _) = b.load().await.unwrap();
    assert_eq!(
        model.vpcs()[&name("blue")].ports,
        BTreeSet::from([PortId(2)])
    );
    assert!(model.vpcs().contains_key(&name("red")));
    assert!(model.vpcs().contains_key(&name("green")));
}
