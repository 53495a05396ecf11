//! The pair's election against a real etcd: the host agent's campaign tasks (`pair::run`) for
//! two members, each driven by its DPU link's up/down state. Exactly one member is active; a
//! link that goes down hands the key over at once (not after the TTL) with a larger epoch;
//! the old active comes back as standby (no failback); a host agent restarted within the TTL
//! adopts its member's lease and stays active in the same epoch; one whose keep-alives stop
//! loses the key to the other member after the TTL; after etcd is killed and restarted, the
//! members converge on one active again; a released lease (a drained planned switchover)
//! hands the key to the other member, and the releasing one does not take it back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::Etcd;
use flow_offload::model::Name;
use flow_offload::wire::HaRole;
use host_agent::pair::{run, Member, Timing};
use host_agent::store::Store;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

struct Side {
    up: watch::Sender<bool>,
    release: watch::Sender<Option<u64>>,
    role: watch::Receiver<Option<HaRole>>,
    task: JoinHandle<()>,
    _stop: watch::Sender<bool>,
}

fn start(store: &Store, member: &str, up: bool) -> Side {
    let (up_tx, up_rx) = watch::channel(up);
    let (role_tx, role_rx) = watch::channel(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (release_tx, release_rx) = watch::channel(None);
    let m = Member {
        group: Name::new("site-a").unwrap(),
        member: member.to_owned(),
        dpu: format!("dpu-{member}"),
    };
    let timing = Timing {
        ttl_secs: 2,
        retry: Duration::from_millis(200),
    };
    let task = tokio::spawn(run(
        store.clone(),
        m,
        timing,
        up_rx,
        role_tx,
        release_rx,
        stop_rx,
    ));
    Side {
        up: up_tx,
        release: release_tx,
        role: role_rx,
        task,
        _stop: stop_tx,
    }
}

impl Side {
    /// Waits (bounded) until the role satisfies `f`; returns it.
    async fn wait(&mut self, what: &str, f: impl Fn(&HaRole) -> bool) -> HaRole {
        let got = timeout(
            Duration::from_secs(15),
            self.role.wait_for(|r| r.as_ref().is_some_and(&f)),
        )
        .await
        .map(|r| r.unwrap().clone());
        match got {
            Ok(r) => r.unwrap(),
            Err(_) => panic!("{what}: not within 15 s (now {:?})", self.now()),
        }
    }

    fn now(&self) -> Option<HaRole> {
        self.role.borrow().clone()
    }
}

fn active(r: &HaRole) -> bool {
    r.active && r.valid_ms > 0
}

#[tokio::test]
async fn one_active_handover_on_link_loss_no_failback_adoption_and_expiry() {
    let etcd = Etcd::start().await;
    let store = etcd.store().await;

    // Both links up: exactly one member wins, the other is standby in the same epoch.
    let mut a = start(&store, "a", true);
    let first = a.wait("a active", active).await;
    let mut b = start(&store, "b", true);
    let b_standby = b.wait("b standby", |r| !r.active).await;
    assert_eq!(b_standby.epoch, first.epoch);
    assert!(first.valid_ms <= 2000 && first.valid_ms > 1000, "{first:?}");
    // Renewals keep arriving, in the same epoch: the role is republished every TTL/4, and
    // the lease outlives several TTLs.
    a.role.borrow_and_update();
    for _ in 0..3 {
        timeout(Duration::from_secs(2), a.role.changed())
            .await
            .expect("no renewal within 2 s")
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let renewed = a.now().unwrap();
    assert!(
        active(&renewed) && renewed.epoch == first.epoch,
        "{renewed:?}"
    );
    assert!(!b.now().unwrap().active);

    // a's DPU link goes down: a resigns at once and b takes over with a larger epoch, well
    // before the 2 s TTL could have run out.
    let t = Instant::now();
    a.up.send_replace(false);
    a.wait("a reports the loss", |r| !r.active).await;
    println!("a resigned after {:?}", t.elapsed());
    let b_active = b.wait("b active", active).await;
    let took = t.elapsed();
    assert!(b_active.epoch > first.epoch, "{b_active:?} after {first:?}");
    assert!(took < Duration::from_millis(1500), "handover took {took:?}");
    println!("handover after link loss: {took:?}");
    assert!(!a.now().unwrap().active, "a must report the loss");

    // a comes back: it stays standby (no failback) and learns the new epoch.
    a.up.send_replace(true);
    let a_back = a
        .wait("a standby in b's epoch", |r| {
            !r.active && r.epoch == b_active.epoch
        })
        .await;
    assert!(!a_back.active);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(active(&b.now().unwrap()) && !a.now().unwrap().active);

    // b's host agent restarts within the TTL (its task is gone, then a new one): the new task
    // adopts b's lease and stays active in the same epoch.
    b.task.abort();
    let mut b2 = start(&store, "b", true);
    let adopted = b2.wait("b adopts its lease", active).await;
    assert_eq!(adopted.epoch, b_active.epoch, "adoption keeps the epoch");
    assert!(!a.now().unwrap().active);

    // b's host agent dies for good (keep-alives stop, nothing resigns): the lease expires after
    // the TTL and a takes over with a larger epoch.
    b2.task.abort();
    let t = Instant::now();
    let a_active = a.wait("a active after b's lease expired", active).await;
    assert!(a_active.epoch > adopted.epoch);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "a must wait for the lease: {took:?}"
    );
    println!("takeover after lease expiry: {took:?}");
    drop(b);
    drop(b2);
}

#[tokio::test]
async fn simultaneous_campaigns_elect_exactly_one() {
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    for round in 0..5 {
        let mut a = start(&store, "a", false);
        let mut b = start(&store, "b", false);
        a.up.send_replace(true);
        b.up.send_replace(true);
        let ra = a.wait("a decided", |_| true).await;
        let rb = b.wait("b decided", |_| true).await;
        // Give the loser time to see the winner, then check: one active, same epoch.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (ra2, rb2) = (a.now().unwrap(), b.now().unwrap());
        assert!(
            ra2.active ^ rb2.active,
            "round {round}: exactly one active ({ra:?}/{rb:?} then {ra2:?}/{rb2:?})"
        );
        assert_eq!(ra2.epoch, rb2.epoch, "round {round}");
        // Both links down: both resign; the key is free for the next round.
        a.up.send_replace(false);
        b.up.send_replace(false);
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.task.abort();
        b.task.abort();
    }
}

#[tokio::test]
async fn after_etcd_is_killed_and_restarted_one_member_is_active_again() {
    let mut etcd = Etcd::start().await;
    let store = etcd.store().await;
    let mut a = start(&store, "a", true);
    let first = a.wait("a active", active).await;
    let mut b = start(&store, "b", true);
    b.wait("b standby", |r| !r.active).await;

    etcd.kill();
    // No renewal can succeed: no role message proves the lease any more, so the DPU's own
    // clock fences it (the last valid_ms runs out). Wait past the TTL.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stale = a.now().unwrap();
    assert!(
        stale.epoch == first.epoch,
        "no new epoch without etcd: {stale:?}"
    );
    etcd.restart().await;
    // etcd kept the lease's deadline across its restart (leases are persisted and get a fresh
    // TTL on a leader start), so a may keep the key, or lose it and re-campaign. Either way:
    // exactly one active, both in the same epoch, and never an epoch below the first.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (ra, rb) = (a.now().unwrap(), b.now().unwrap());
        if ra.active ^ rb.active && ra.epoch == rb.epoch {
            assert!(ra.epoch >= first.epoch);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no single active after etcd came back: {ra:?} {rb:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_released_lease_hands_over_without_taking_it_back() {
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    let mut a = start(&store, "a", true);
    let first = a.wait("a active", active).await;
    let mut b = start(&store, "b", true);
    b.wait("b standby", |r| !r.active).await;
    // A release for another epoch changes nothing.
    a.release.send_replace(Some(first.epoch + 1000));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(active(&a.now().unwrap()) && !b.now().unwrap().active);
    // The DPU drained its switchover: the host releases, b takes over.
    let t = Instant::now();
    a.release.send_replace(Some(first.epoch));
    let b_active = b.wait("b active after the release", active).await;
    println!("handover after a release: {:?}", t.elapsed());
    assert!(b_active.epoch > first.epoch);
    a.wait("a standby in b's epoch", |r| {
        !r.active && r.epoch == b_active.epoch
    })
    .await;
    // a keeps campaigning as a standby only: b stays active.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(active(&b.now().unwrap()) && !a.now().unwrap().active);
}
