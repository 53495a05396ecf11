//! A member of an A/B pair of DPUs: the host agent campaigns for the pair's leader key on the
//! DPU's behalf, keeps its lease alive, and relays every outcome to the DPU agent as a
//! [`HaRole`] over the DPU link.
//!
//! Why the host holds the lease and not the DPU: the DPU agent talks only to its host (one
//! link, one identity to secure), and the lease then means "this DPU's agent is alive *and*
//! its host can reach etcd". The DPU still fences itself on its own clock: a role message
//! gives how long the lease is valid for at least, and a DPU that hears no renewal in time
//! stops allocating before the lease can expire (see `flow_offload::ha::role`).
//!
//! The member campaigns only while its DPU link is up. When the link goes down (the agent was
//! killed, or hangs past the link timeout) the lease is revoked at once, so the other member
//! takes over without waiting for the TTL. A member that finds the key held watches it and
//! campaigns again as soon as it is deleted. There is no failback: a member that comes back
//! finds the key held and stays standby.

use std::time::Duration;

use flow_offload::model::Name;
use flow_offload::wire::HaRole;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::store::leader::{Campaign, Renewal};
use crate::store::Store;

/// Every pair member's last report, by DPU id (shared with the API).
pub type PairStates = std::sync::Arc<
    std::sync::RwLock<std::collections::BTreeMap<String, flow_offload::wire::HaStatus>>,
>;

/// The API's handle on a member: its pair, and where to send a switchover order (the epoch it
/// is active in) for its DPU link to relay.
#[derive(Debug, Clone)]
pub struct PairControl {
    /// The pair.
    pub group: String,
    /// Switchover orders.
    pub switchover: tokio::sync::mpsc::Sender<u64>,
}

/// Every member's control, by DPU id.
pub type PairControls = std::sync::Arc<std::collections::BTreeMap<String, PairControl>>;

/// One member's identity in its pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The pair (its leader key's name).
    pub group: Name,
    /// The member's name in the key (`a` or `b`).
    pub member: String,
    /// The DPU.
    pub dpu: String,
}

/// Lease timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Lease TTL in seconds (etcd's smallest practical one is about 2 s here).
    pub ttl_secs: i64,
    /// Wait before campaigning again after an etcd error.
    pub retry: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            ttl_secs: 2,
            retry: Duration::from_millis(500),
        }
    }
}

impl Timing {
    fn ttl(&self) -> Duration {
        Duration::from_secs(u64::try_from(self.ttl_secs.max(1)).unwrap_or(1))
    }

    /// How long the lease is valid for at least, given when the request that proved it was
    /// sent (etcd restarts the TTL when it receives it, which is later).
    fn valid_ms(&self, sent: Instant) -> u32 {
        let left = self.ttl().saturating_sub(sent.elapsed());
        u32::try_from(left.as_millis()).unwrap_or(u32::MAX)
    }
}

/// Waits until `up` reads `want` (or its sender is gone: returns false).
async fn until(up: &mut watch::Receiver<bool>, want: bool) -> bool {
    up.wait_for(|v| *v == want).await.is_ok()
}

/// Runs `member`'s campaign until `shutdown` turns true. `link_up` says whether the DPU's
/// link is up; every outcome goes to `role`; `release` names an epoch whose lease the DPU
/// asks to release (a drained planned switchover).
pub async fn run(
    store: Store,
    member: Member,
    timing: Timing,
    mut link_up: watch::Receiver<bool>,
    role: watch::Sender<Option<HaRole>>,
    mut release: watch::Receiver<Option<u64>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut newest_epoch = 0u64;
    let publish = |r: HaRole| {
        role.send_replace(Some(r));
    };
    loop {
        if *shutdown.borrow() {
            return;
        }
        tokio::select! {
            ok = until(&mut link_up, true) => if !ok { return },
            _ = shutdown.changed() => continue,
        }
        let sent = Instant::now();
        let outcome = store
            .campaign(&member.group, &member.member, timing.ttl_secs)
            .await;
        match outcome {
            Err(e) => {
                tracing::warn!(dpu = %member.dpu, group = %member.group, error = %e, "pair campaign failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(timing.retry) => {}
                    _ = shutdown.changed() => {}
                }
            }
            Ok(Campaign::Held {
                holder,
                epoch,
                revision,
            }) => {
                newest_epoch = newest_epoch.max(epoch);
                if !holder.is_empty() {
                    tracing::info!(dpu = %member.dpu, group = %member.group, %holder, epoch, "pair member is standby");
                    publish(HaRole {
                        epoch: newest_epoch,
                        active: false,
                        valid_ms: 0,
                    });
                }
                tokio::select! {
                    r = store.leader_gone(&member.group, revision) => {
                        if let Err(e) = r {
                            tracing::debug!(dpu = %member.dpu, error = %e, "leader watch ended");
                            tokio::time::sleep(timing.retry).await;
                        }
                    }
                    ok = until(&mut link_up, false) => if !ok { return },
                    _ = shutdown.changed() => {}
                }
            }
            Ok(Campaign::Won {
                lease,
                epoch,
                adopted,
            }) => {
                newest_epoch = newest_epoch.max(epoch);
                tracing::info!(dpu = %member.dpu, group = %member.group, epoch, adopted, "pair member is active");
                publish(HaRole {
                    epoch,
                    active: true,
                    valid_ms: timing.valid_ms(sent),
                });
                let handed = hold(
                    &store,
                    &member,
                    timing,
                    Held { lease, epoch },
                    &mut link_up,
                    &role,
                    &mut release,
                    &mut shutdown,
                )
                .await;
                if handed {
                    // Let the other member take the key before campaigning again; if it
                    // does not within the bound, campaign (the pair must not stay leaderless).
                    let end = Instant::now() + HANDOVER_WAIT;
                    while Instant::now() < end {
                        match store.leader(&member.group).await {
                            Ok(Some((holder, e))) if holder != member.member && e > epoch => break,
                            _ => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    }
                }
            }
        }
    }
}

/// After a planned switchover, how long a member waits for the other to take the key before
/// it campaigns again.
pub const HANDOVER_WAIT: Duration = Duration::from_secs(10);

/// A lease held for an epoch.
#[derive(Debug, Clone, Copy)]
struct Held {
    lease: i64,
    epoch: u64,
}

/// Keeps the lease of `epoch` alive while the link is up; resigns when it goes down, or when
/// the DPU asks to release it (returns true then); reports a lost lease.
#[allow(clippy::too_many_arguments)]
async fn hold(
    store: &Store,
    member: &Member,
    timing: Timing,
    held: Held,
    link_up: &mut watch::Receiver<bool>,
    role: &watch::Sender<Option<HaRole>>,
    release: &mut watch::Receiver<Option<u64>>,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let Held { lease, epoch } = held;
    let every = timing.ttl() / 4;
    loop {
        tokio::select! {
            ok = async { release.wait_for(|e| *e == Some(epoch)).await.is_ok() } => {
                if !ok {
                    // No link task any more: keep holding until the link says otherwise.
                    std::future::pending::<()>().await;
                }
                tracing::info!(dpu = %member.dpu, group = %member.group, epoch, "planned switchover: releasing the leader key");
                if let Err(e) = store.resign(lease).await {
                    tracing::warn!(dpu = %member.dpu, epoch, error = %e, "release failed; the lease expires after its TTL");
                }
                role.send_replace(Some(HaRole { epoch, active: false, valid_ms: 0 }));
                return true;
            }
            _ = tokio::time::sleep(every) => {
                let sent = Instant::now();
                match store.renew(lease).await {
                    Ok(Renewal::Alive) => {
                        role.send_replace(Some(HaRole { epoch, active: true, valid_ms: timing.valid_ms(sent) }));
                    }
                    Ok(Renewal::Gone) => {
                        tracing::warn!(dpu = %member.dpu, group = %member.group, epoch, "pair lease lost");
                        role.send_replace(Some(HaRole { epoch, active: false, valid_ms: 0 }));
                        return false;
                    }
                    // The DPU fences itself when the last proof runs out; keep trying.
                    Err(e) => tracing::warn!(dpu = %member.dpu, epoch, error = %e, "pair lease renewal failed"),
                }
            }
            ok = until(link_up, false) => {
                if ok {
                    tracing::info!(dpu = %member.dpu, group = %member.group, epoch, "DPU link down: resigning the pair's leadership");
                }
                if let Err(e) = store.resign(lease).await {
                    tracing::warn!(dpu = %member.dpu, epoch, error = %e, "resign failed; the lease expires after its TTL");
                }
                role.send_replace(Some(HaRole { epoch, active: false, valid_ms: 0 }));
                return false;
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    // A planned stop of the host agent: leave the key to the lease, so that a
                    // restart within the TTL adopts it and the DPU stays active.
                    return false;
                }
            }
        }
    }
}
