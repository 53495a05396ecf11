//! The role of one member of an A/B pair: standby, active, or fenced, decided by an etcd lease
//! and the passage of (virtual) time.
//!
//! The agent feeds [`RoleEvent`]s (lease outcomes, its peer's sync state, ticks, operator
//! requests) and asks the machine what it may do. Nothing here talks to etcd: the agent
//! campaigns for the leader key, keeps its lease alive, and reports the outcomes.
//!
//! # Rules
//! - **Active only by lease**: a member becomes [`Role::Active`] only by acquiring the leader
//!   key (`LeaseAcquired { epoch }`, the key's revision). There is no automatic failback: an
//!   active stays active while its lease lives, whatever the other member's preference.
//! - **Epochs only grow**: an event carrying an epoch older than the newest this member has
//!   seen is ignored and counted ([`RoleStats::stale_epoch`]); a member never returns to a lower
//!   epoch.
//! - **Fence before the lease can expire**: the lease is valid until at least the *send* time
//!   of the last successful keepalive (or campaign) plus the TTL, since etcd restarts the TTL
//!   on receipt. `margin_ns` before that deadline the member fences itself ([`Role::Fenced`]):
//!   it stops allocating new bindings and stops advertising itself as preferred, but keeps
//!   forwarding established sessions (cutting them would lose packets the peer may not be
//!   ready to take yet). [`RoleMachine::may_allocate`] checks the deadline against the caller's
//!   own `now_ns`, so a member resuming from a long stop (SIGSTOP, a VM pause) refuses to
//!   allocate before it has processed a single tick.
//! - **Fenced until known**: a renewal that proves the lease still lives (sent before the
//!   deadline, answered with success) returns a fenced member to Active in the same epoch;
//!   a lost lease (`LeaseLost`, or a release) makes the fence final, and the member steps down to
//!   [`Role::Standby`] `stand_down_ns` later, once routing has moved traffic to the new active.
//!   Without etcd the member stays fenced, forwarding on its last state.
//!
//! `margin_ns` must cover: the tick period, the time between the data path asking
//! [`RoleMachine::may_allocate`] and committing a binding, and the clock-rate difference
//! between this host and the etcd leader over one TTL. With etcd's smallest practical TTL of
//! about 2 s, a margin of 500 ms leaves 1.5 s of allocation per renewal; renew every TTL/4.
//!
//! # Planned switchover ("no packet lost"), step by step
//! 1. `SwitchoverRequested` on the active: recorded; allocation continues until the peer
//!    reports [`ReadyState::Ready`] (`PeerSyncState`, from the sync sender's
//!    [`crate::ha::sync::SyncSender::peer_state`]).
//! 2. Peer Ready: the machine stops allocation (new flows' first packets wait or are dropped
//!    and retransmitted by their senders; established flows keep forwarding, still here, still
//!    preferred) and returns [`RoleAction::DrainSync`]. The agent waits until the sync
//!    sender's lag is 0 (every binding is acknowledged by the peer), then feeds `SyncDrained`.
//!    The peer dropping out of Ready aborts the switchover.
//! 3. `SyncDrained`: the machine returns [`RoleAction::ReleaseLease`] and fences itself (not
//!    preferred, still forwarding). The agent revokes the lease.
//! 4. The peer acquires the lease (a newer epoch), becomes Active and preferred: routing moves
//!    traffic to it, and it finds every binding in its table.
//! 5. The old active keeps forwarding what still arrives for `stand_down_ns`, then becomes
//!    Standby and asks the new active for a snapshot.
//!
//! A switchover not completed within `switchover_timeout_ns` (peer never Ready, drain never
//! reported) is abandoned and allocation resumes; so is one interrupted by fencing.

use serde::{Deserialize, Serialize};

use crate::ha::sync::ReadyState;

/// What a member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Follows the active's sync stream; forwards nothing.
    Standby,
    /// Holds the lease of `epoch`: allocates, is preferred, forwards.
    Active {
        /// The leader key's revision when it was acquired.
        epoch: u64,
    },
    /// Held the lease of `epoch` and can no longer vouch for it: forwards established
    /// sessions only.
    Fenced {
        /// The epoch it held.
        epoch: u64,
    },
}

/// What happens to a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleEvent {
    /// The member created the leader key: `epoch` is its revision; `at_ns` is when the
    /// campaign request was sent (the lease is valid from at least then for one TTL).
    LeaseAcquired {
        /// The leader key's revision.
        epoch: u64,
        /// Send time of the request that acquired it.
        at_ns: u64,
    },
    /// A keepalive of the lease of `epoch` succeeded; `at_ns` is when it was *sent*.
    LeaseRenewed {
        /// The epoch whose lease was renewed.
        epoch: u64,
        /// Send time of the keepalive.
        at_ns: u64,
    },
    /// etcd says the lease of `epoch` is gone (expired, revoked, or the key is another's).
    LeaseLost {
        /// The epoch whose lease is gone.
        epoch: u64,
    },
    /// The peer's sync state (as the active's sync sender sees it).
    PeerSyncState(ReadyState),
    /// Time passes.
    Tick(u64),
    /// An operator asks the active to hand over.
    SwitchoverRequested,
    /// During a switchover: the sync stream is drained (every change acknowledged).
    SyncDrained,
}

/// What the agent must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleAction {
    /// Allocation is stopped: wait for the sync lag to reach 0, then feed
    /// [`RoleEvent::SyncDrained`].
    DrainSync {
        /// The epoch handing over.
        epoch: u64,
    },
    /// Revoke the lease of `epoch` so that the peer can acquire the leader key.
    ReleaseLease {
        /// The epoch released.
        epoch: u64,
    },
}

/// Where a planned switchover is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchoverPhase {
    /// Waiting for the peer to be Ready; allocation continues.
    WaitingForPeer,
    /// Allocation stopped; waiting for the sync stream to drain.
    Draining,
}

/// Timing of a [`RoleMachine`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleConfig {
    /// The etcd lease TTL.
    pub lease_ttl_ns: u64,
    /// Fence this long before the lease could expire (see the module docs for what it covers).
    pub margin_ns: u64,
    /// A member whose lease is lost stays fenced (forwarding) this long before standing down.
    pub stand_down_ns: u64,
    /// A planned switchover not done within this is abandoned.
    pub switchover_timeout_ns: u64,
}

impl Default for RoleConfig {
    fn default() -> Self {
        RoleConfig {
            lease_ttl_ns: 2_000_000_000,
            margin_ns: 500_000_000,
            stand_down_ns: 3_000_000_000,
            switchover_timeout_ns: 30_000_000_000,
        }
    }
}

/// A configuration the machine cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    /// A value out of range.
    #[error("invalid role configuration: {0}")]
    Config(&'static str),
}

/// What a machine has seen and done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleStats {
    /// Leases acquired (new epochs).
    pub acquired: u64,
    /// Renewals taken.
    pub renewed: u64,
    /// Times it fenced itself (deadline passed, lease lost or released).
    pub fenced: u64,
    /// Times a late renewal returned it from fenced to active.
    pub unfenced: u64,
    /// Times it stood down to standby.
    pub stood_down: u64,
    /// Events carrying an epoch older than the newest seen, ignored.
    pub stale_epoch: u64,
    /// Other events that did not apply in the current state, ignored.
    pub ignored: u64,
    /// Switchovers requested while active.
    pub switchovers_started: u64,
    /// Switchovers that released the lease.
    pub switchovers_completed: u64,
    /// Switchovers abandoned (timeout, fencing, peer no longer Ready).
    pub switchovers_aborted: u64,
}

/// The role state machine of one member.
#[derive(Debug, Clone)]
pub struct RoleMachine {
    cfg: RoleConfig,
    role: Role,
    /// Newest epoch seen (acquired).
    epoch: u64,
    /// Send time of the last successful keepalive or campaign of `epoch`.
    renewed_at: u64,
    /// When the lease of `epoch` was known lost (or released).
    lost_at: Option<u64>,
    now: u64,
    peer: Option<ReadyState>,
    switchover: Option<(SwitchoverPhase, u64)>,
    stats: RoleStats,
}

impl RoleMachine {
    /// A standby member.
    pub fn new(config: RoleConfig) -> Result<Self, RoleError> {
        if config.lease_ttl_ns == 0 {
            return Err(RoleError::Config("lease_ttl_ns must be positive"));
        }
        if config.margin_ns >= config.lease_ttl_ns {
            return Err(RoleError::Config("margin_ns must be below lease_ttl_ns"));
        }
        Ok(RoleMachine {
            cfg: config,
            role: Role::Standby,
            epoch: 0,
            renewed_at: 0,
            lost_at: None,
            now: 0,
            peer: None,
            switchover: None,
            stats: RoleStats::default(),
        })
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The newest epoch this member has held (0: none).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Counters.
    pub fn stats(&self) -> &RoleStats {
        &self.stats
    }

    /// The peer's last reported sync state.
    pub fn peer(&self) -> Option<ReadyState> {
        self.peer
    }

    /// The switchover in progress, if any.
    pub fn switchover(&self) -> Option<SwitchoverPhase> {
        self.switchover.map(|(p, _)| p)
    }

    /// When allocation stops unless the lease is renewed (while active or fenced).
    pub fn deadline(&self) -> Option<u64> {
        match self.role {
            Role::Standby => None,
            Role::Active { .. } | Role::Fenced { .. } => Some(self.deadline_ns()),
        }
    }

    fn deadline_ns(&self) -> u64 {
        self.renewed_at
            .saturating_add(self.cfg.lease_ttl_ns - self.cfg.margin_ns)
    }

    /// May this member create a new binding (NAT port, session) at `now_ns`: only an active
    /// member, not handing over, whose lease was renewed within `lease_ttl − margin`. Ask it
    /// right before committing, with the current time.
    pub fn may_allocate(&self, now_ns: u64) -> bool {
        matches!(self.role, Role::Active { .. })
            && self.lost_at.is_none()
            && self.switchover() != Some(SwitchoverPhase::Draining)
            && now_ns.max(self.now) < self.deadline_ns()
    }

    /// Should this member advertise itself as the preferred path (only while active).
    pub fn preferred(&self) -> bool {
        matches!(self.role, Role::Active { .. })
    }

    /// Does this member forward established sessions (active, and fenced).
    pub fn forwards_established(&self) -> bool {
        matches!(self.role, Role::Active { .. } | Role::Fenced { .. })
    }

    /// Takes one event; returns what the agent must do, if anything.
    pub fn handle(&mut self, event: RoleEvent) -> Option<RoleAction> {
        match event {
            RoleEvent::LeaseAcquired { epoch, at_ns } => {
                if epoch <= self.epoch {
                    self.stats.stale_epoch += 1;
                    return None;
                }
                self.epoch = epoch;
                self.renewed_at = at_ns;
                self.lost_at = None;
                self.now = self.now.max(at_ns);
                if self.switchover.take().is_some() {
                    self.stats.switchovers_aborted += 1;
                }
                self.role = Role::Active { epoch };
                self.stats.acquired += 1;
                self.check_deadline();
                None
            }
            RoleEvent::LeaseRenewed { epoch, at_ns } => {
                if !self.current_epoch(epoch) {
                    return None;
                }
                let holding = matches!(self.role, Role::Active { .. } | Role::Fenced { .. });
                if !holding || self.lost_at.is_some() {
                    self.stats.ignored += 1;
                    return None;
                }
                self.renewed_at = self.renewed_at.max(at_ns);
                self.now = self.now.max(at_ns);
                self.stats.renewed += 1;
                if matches!(self.role, Role::Fenced { .. }) && self.now < self.deadline_ns() {
                    self.role = Role::Active { epoch };
                    self.stats.unfenced += 1;
                }
                None
            }
            RoleEvent::LeaseLost { epoch } => {
                if !self.current_epoch(epoch) {
                    return None;
                }
                let holding = matches!(self.role, Role::Active { .. } | Role::Fenced { .. });
                if !holding || self.lost_at.is_some() {
                    self.stats.ignored += 1;
                    return None;
                }
                self.fence();
                self.lost_at = Some(self.now);
                None
            }
            RoleEvent::PeerSyncState(state) => {
                self.peer = Some(state);
                self.advance_switchover()
            }
            RoleEvent::Tick(now) => {
                self.now = self.now.max(now);
                self.check_deadline();
                if let (Role::Fenced { .. }, Some(t)) = (self.role, self.lost_at) {
                    if self.now >= t.saturating_add(self.cfg.stand_down_ns) {
                        self.role = Role::Standby;
                        self.stats.stood_down += 1;
                    }
                }
                if let Some((_, since)) = self.switchover {
                    if self.now >= since.saturating_add(self.cfg.switchover_timeout_ns) {
                        self.abort_switchover();
                    }
                }
                None
            }
            RoleEvent::SwitchoverRequested => {
                if !matches!(self.role, Role::Active { .. }) || self.switchover.is_some() {
                    self.stats.ignored += 1;
                    return None;
                }
                self.switchover = Some((SwitchoverPhase::WaitingForPeer, self.now));
                self.stats.switchovers_started += 1;
                self.advance_switchover()
            }
            RoleEvent::SyncDrained => match (self.role, self.switchover()) {
                (Role::Active { epoch }, Some(SwitchoverPhase::Draining)) => {
                    self.switchover = None;
                    self.role = Role::Fenced { epoch };
                    self.lost_at = Some(self.now);
                    self.stats.fenced += 1;
                    self.stats.switchovers_completed += 1;
                    Some(RoleAction::ReleaseLease { epoch })
                }
                _ => {
                    self.stats.ignored += 1;
                    None
                }
            },
        }
    }

    /// `true` if `epoch` is the newest held; counts the others.
    fn current_epoch(&mut self, epoch: u64) -> bool {
        if epoch < self.epoch {
            self.stats.stale_epoch += 1;
            false
        } else if epoch > self.epoch {
            // A lease this member never heard it acquired: nothing to renew or lose.
            self.stats.ignored += 1;
            false
        } else {
            true
        }
    }

    fn check_deadline(&mut self) {
        if matches!(self.role, Role::Active { .. }) && self.now >= self.deadline_ns() {
            self.fence();
        }
    }

    fn fence(&mut self) {
        if let Role::Active { epoch } = self.role {
            self.role = Role::Fenced { epoch };
            self.stats.fenced += 1;
        }
        if self.switchover.is_some() {
            self.abort_switchover();
        }
    }

    fn abort_switchover(&mut self) {
        self.switchover = None;
        self.stats.switchovers_aborted += 1;
    }

    fn advance_switchover(&mut self) -> Option<RoleAction> {
        let ready = self.peer.is_some_and(|p| p.is_ready());
        match (self.switchover, self.role) {
            (Some((SwitchoverPhase::WaitingForPeer, since)), Role::Active { epoch }) if ready => {
                self.switchover = Some((SwitchoverPhase::Draining, since));
                Some(RoleAction::DrainSync { epoch })
            }
            (Some((SwitchoverPhase::Draining, _)), _) if !ready => {
                self.abort_switchover();
                None
            }
            _ => None,
        }
    }
}
