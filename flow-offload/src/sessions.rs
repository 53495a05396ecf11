//! The session offload driver: moves established NAPT44 sessions of one software pipeline into
//! hardware as exact-match rules, keeps them alive from the rules' counters, and takes them back
//! when they end.
//!
//! Pure like the rest of the crate: the agent calls [`SessionOffload::tick`] with the time, and
//! the driver talks to hardware only through [`FlowTarget`] and [`CountQuery`]. One driver per
//! [`Pipeline`] (per lcore); its [`SessionOffloadConfig::shard`] keeps the rule identities of
//! different pipelines apart, since session ids are per pipeline.
//!
//! # A tick
//! 1. **Expiry**: runs the pipeline's NAT sweep ([`Pipeline::expire_with`], at most
//!    `expire_budget` sessions per table; it replaces the agent's own `Pipeline::expire` calls)
//!    and destroys the rules of every offloaded session it removes.
//! 2. **Poll**: for at most `poll_budget` offloaded sessions, round robin: a session that is
//!    gone (its [`SessionId`] no longer resolves: expired, found dead by a packet, reclaimed) or
//!    dead, or a TCP session that left `Established` (a FIN or RST went through the teardown
//!    trap to software), loses its rules. Otherwise the rules' counters are read; if they moved,
//!    the session is refreshed with the deltas ([`Pipeline::refresh_session`]); if they did not
//!    and the session would expire within `idle_guard_ns`, its rules are destroyed and it is
//!    handed back to software, where it ages out like any other (or, if traffic resumes, is
//!    refreshed by the software path and may be offered again).
//! 3. **Install**: scans at most `scan_budget` sessions for candidates
//!    ([`Pipeline::scan_candidates`]) and installs at most `install_budget` of them: the rules
//!    of [`session_rules`], created one by one; when one is refused, the ones created are
//!    destroyed, the session stays in software, and no session is installed for
//!    `retry_after_ns`. Every refusal is counted by reason in [`SessionOffloadStats::refused`].
//!
//! Outside ticks, the agent must call [`SessionOffload::route_changed`] for every route change
//! (before or right after updating the pipeline and programming the plan's operations), and
//! [`SessionOffload::flush`] before anything else changes the plan or the pipeline (a rebuild:
//! VPC, NAT, meter or node changes; a new pipeline), so that no session rule forwards by a stale
//! path or holds a meter the plan destroys.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Unbounded};

use crate::caps::Caps;
use crate::compile::{session_rules, session_shape_refusal, Plan, RuleId, SwReason};
use crate::ir::Rule;
use crate::model::{Model, Name, RouteKey};
use crate::program::{CountQuery, FlowTarget};
use crate::soft::nat::{Proto, SessionId, TcpState};
use crate::soft::pipeline::{Pipeline, ScanCursor, SessionOffer};

/// Tuning of a [`SessionOffload`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOffloadConfig {
    /// The pipeline (lcore) this driver serves: part of every rule identity.
    pub shard: u16,
    /// Offload sessions established for at least this long (short flows are not worth two
    /// rule creations).
    pub min_age_ns: u64,
    /// Sessions the candidate scan visits per tick.
    pub scan_budget: usize,
    /// Sessions installed per tick, at most.
    pub install_budget: usize,
    /// Offloaded sessions polled per tick, at most.
    pub poll_budget: usize,
    /// Sessions the expiry sweep visits per tick and NAT table.
    pub expire_budget: usize,
    /// Most rules held for sessions (one per VPC port and uplink per session).
    pub max_rules: usize,
    /// Rules of the target's capacity (`Caps::max_rules`) kept free for the plan to grow
    /// into: sessions use at most `max_rules − plan rules − reserve_rules`. The compiler does
    /// not count session rules; when a plan rule is refused for lack of space anyway,
    /// [`crate::program::program`] puts its object in software as for any refusal.
    pub reserve_rules: usize,
    /// An offloaded session whose counters stand still is handed back to software this long
    /// before it would expire. Must exceed the time a full polling round takes (offloaded
    /// sessions / `poll_budget` ticks), or a session may expire while hardware carries it.
    pub idle_guard_ns: u64,
    /// After the target refuses a create, installing pauses this long.
    pub retry_after_ns: u64,
}

impl Default for SessionOffloadConfig {
    fn default() -> Self {
        SessionOffloadConfig {
            shard: 0,
            min_age_ns: 1_000_000_000,
            scan_budget: 256,
            install_budget: 32,
            poll_budget: 256,
            expire_budget: 256,
            max_rules: 1 << 16,
            reserve_rules: 1024,
            idle_guard_ns: 30_000_000_000,
            retry_after_ns: 5_000_000_000,
        }
    }
}

/// Why an offloaded session's rules were removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Removal {
    /// The session is gone from the table or dead.
    Gone,
    /// A TCP session left `Established`.
    Teardown,
    /// The counters stood still until the session neared its expiry.
    Idle,
    /// A route its path depends on changed.
    RouteChanged,
    /// [`SessionOffload::flush`].
    Flushed,
    /// A rule of the session vanished from the target (its counters cannot be read).
    Lost,
}

/// What a driver has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionOffloadStats {
    /// Sessions installed.
    pub installed: u64,
    /// Refreshes from moved counters.
    pub refreshed: u64,
    /// Sessions whose rules were removed, by why.
    pub removed: BTreeMap<Removal, u64>,
    /// Candidates left in software, by why (each attempt counts).
    pub refused: BTreeMap<SwReason, u64>,
}

/// One offloaded session.
#[derive(Debug, Clone)]
struct Offloaded {
    /// The offer it was installed from (its path, for route changes).
    offer: SessionOffer,
    /// Its rules, with the counters last read.
    rules: Vec<(RuleId, (u64, u64))>,
    /// What those rules are, in the same order: a rebuild keeps the session in hardware only
    /// if the new plan would give it exactly these.
    shape: Vec<Rule>,
}

/// The driver of one pipeline's session offload (see the module documentation).
#[derive(Debug, Clone)]
pub struct SessionOffload {
    cfg: SessionOffloadConfig,
    sessions: BTreeMap<(Name, SessionId), Offloaded>,
    rules_held: usize,
    scan: ScanCursor,
    /// The last session polled: the next poll starts after it.
    polled: Option<(Name, SessionId)>,
    /// No installs before this instant (after a create refusal).
    paused_until: u64,
    stats: SessionOffloadStats,
}

/// What one [`SessionOffload::tick`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Sessions installed.
    pub installed: usize,
    /// Sessions refreshed from counters.
    pub refreshed: usize,
    /// Sessions whose rules were removed.
    pub removed: usize,
    /// Candidates left in software.
    pub refused: usize,
}

impl SessionOffload {
    /// A driver holding nothing.
    pub fn new(cfg: SessionOffloadConfig) -> SessionOffload {
        SessionOffload {
            cfg,
            sessions: BTreeMap::new(),
            rules_held: 0,
            scan: ScanCursor::default(),
            polled: None,
            paused_until: 0,
            stats: SessionOffloadStats::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SessionOffloadConfig {
        &self.cfg
    }

    /// The counters.
    pub fn stats(&self) -> &SessionOffloadStats {
        &self.stats
    }

    /// Sessions offloaded now.
    pub fn offloaded_count(&self) -> usize {
        self.sessions.len()
    }

    /// Rules held for sessions now.
    pub fn rules_held(&self) -> usize {
        self.rules_held
    }

    /// Whether a session is offloaded by this driver.
    pub fn is_offloaded(&self, nat: &Name, id: SessionId) -> bool {
        self.sessions.contains_key(&(nat.clone(), id))
    }

    /// The offloaded sessions.
    pub fn offloaded(&self) -> impl Iterator<Item = (&Name, SessionId)> {
        self.sessions.keys().map(|(n, id)| (n, *id))
    }

    /// The rule identities of an offloaded session.
    pub fn rules_of(&self, nat: &Name, id: SessionId) -> Vec<RuleId> {
        self.sessions
            .get(&(nat.clone(), id))
            .map(|o| o.rules.iter().map(|(r, _)| r.clone()).collect())
            .unwrap_or_default()
    }

    /// One round of expiry, polling and installing (see the module documentation). `plan`
    /// and `caps` are the compiler's for `model`, which `pipeline` was built from.
    pub fn tick<T: FlowTarget + CountQuery + ?Sized>(
        &mut self,
        pipeline: &mut Pipeline,
        model: &Model,
        plan: &Plan,
        caps: &Caps,
        target: &mut T,
        now_ns: u64,
    ) -> TickReport {
        let mut report = TickReport::default();
        self.expire(pipeline, target, now_ns, &mut report);
        self.poll(pipeline, target, now_ns, &mut report);
        self.install(pipeline, model, plan, caps, target, now_ns, &mut report);
        report
    }

    /// Destroys the rules of every offloaded session whose path a change to route `key` may
    /// change, and hands those sessions back to software. Call it for every route change.
    /// Returns how many sessions were affected. O(offloaded sessions).
    pub fn route_changed<T: FlowTarget + CountQuery + ?Sized>(
        &mut self,
        pipeline: &mut Pipeline,
        target: &mut T,
        key: &RouteKey,
        now_ns: u64,
    ) -> usize {
        let hit: Vec<(Name, SessionId)> = self
            .sessions
            .iter()
            .filter(|(_, o)| o.offer.depends_on(key))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &hit {
            self.remove(pipeline, target, k, Removal::RouteChanged, now_ns);
        }
        hit.len()
    }

    /// Destroys every session rule and hands every session back to software. Call it before
    /// any change other than a route's (the plan is rebuilt, the pipeline replaced).
    pub fn flush<T: FlowTarget + CountQuery + ?Sized>(
        &mut self,
        pipeline: &mut Pipeline,
        target: &mut T,
        now_ns: u64,
    ) -> usize {
        let all: Vec<(Name, SessionId)> = self.sessions.keys().cloned().collect();
        for k in &all {
            self.remove(pipeline, target, k, Removal::Flushed, now_ns);
        }
        self.scan = ScanCursor::default();
        self.polled = None;
        all.len()
    }

    /// Before a rebuild takes effect (a new plan compiled, a new pipeline that took the old
    /// one's NAT tables with [`Pipeline::carry_nat_from`]): keeps in hardware every offloaded
    /// session whose NAT rule was carried over and whose rules the new plan would make
    /// exactly as installed; removes the others, as [`Self::flush`] would. `pipeline` is the
    /// new pipeline. Call it before programming the new plan, so that no kept rule refers to
    /// a meter or path the plan destroys. Returns (kept, removed).
    pub fn retain_valid<T: FlowTarget + CountQuery + ?Sized>(
        &mut self,
        pipeline: &mut Pipeline,
        target: &mut T,
        ctx: (&Plan, &Caps, &Model),
        carried: &[Name],
        now_ns: u64,
    ) -> (usize, usize) {
        let (plan, caps, model) = ctx;
        let shape = session_shape_refusal(caps);
        let stale: Vec<(Name, SessionId)> = self
            .sessions
            .iter()
            .filter(|((nat, _), o)| {
                let same = shape.is_none()
                    && carried.contains(nat)
                    && match session_rules(&o.offer, self.cfg.shard, plan, caps, model) {
                        Ok(rules) => {
                            rules.len() == o.rules.len()
                                && rules.iter().zip(o.rules.iter().zip(&o.shape)).all(
                                    |((id, rule), ((held, _), shape))| id == held && rule == shape,
                                )
                        }
                        Err(_) => false,
                    };
                !same
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in &stale {
            self.remove(pipeline, target, k, Removal::Flushed, now_ns);
        }
        self.scan = ScanCursor::default();
        self.polled = None;
        (self.sessions.len(), stale.len())
    }

    /// Destroys a session's rules after a last counter read, and unmarks it.
    fn remove<T: FlowTarget + CountQuery + ?Sized>(
        &mut self,
        pipeline: &mut Pipeline,
        target: &mut T,
        key: &(Name, SessionId),
        why: Removal,
        now_ns: u64,
    ) {
        let Some(o) = self.sessions.remove(key) else {
            return;
        };
        let (mut dp, mut db) = (0u64, 0u64);
        for (id, (p0, b0)) in &o.rules {
            if let Some((p, b)) = target.query_count(id) {
                dp = dp.saturating_add(p.wrapping_sub(*p0));
                db = db.saturating_add(b.wrapping_sub(*b0));
            }
            target.destroy_rule(id);
        }
        if dp > 0 {
            pipeline.refresh_session(&key.0, key.1, now_ns, dp, db);
        }
        pipeline.mark_offloaded(&key.0, key.1, false);
        self.rules_held = self.rules_held.saturating_sub(o.rules.len());
        *self.stats.removed.entry(why).or_default() += 1;
    }

    fn expire<T: FlowTarget + CountQuery + ?Sized>(
        &mut self,
        pipeline: &mut Pipeline,
        target: &mut T,
        now_ns: u64,
        report: &mut TickReport,
    ) {
        let mut gone: Vec<(Name, SessionId)> = Vec::new();
        pipeline.expire_with(now_ns, self.cfg.expire_budget, |nat, v| {
            if v.offloaded {
                gone.push((nat.clone(), v.id));
            }
        });
        for k in &gone {
            if self.sessions.contains_key(k) {
                self.remove(pipeline, target, k, Removal::Gone, now_ns);
                report.removed += 1;
            }
        }
    }

    fn poll<T: FlowTarget + CountQuery + ?Sized>(
        &mut self,
        pipeline: &mut Pipeline,
        target: &mut T,
        now_ns: u64,
        report: &mut TickReport,
    ) {
        let n = self.cfg.poll_budget.min(self.sessions.len());
        let start = self.polled.clone();
        let keys: Vec<(Name, SessionId)> = match &start {
            Some(k) => self
                .sessions
                .range((Excluded(k.clone()), Unbounded))
                .chain(self.sessions.range(..=k.clone()))
                .take(n)
                .map(|(k, _)| k.clone())
                .collect(),
            None => self.sessions.keys().take(n).cloned().collect(),
        };
        for key in keys {
            self.polled = Some(key.clone());
            let why = self.poll_one(pipeline, target, &key, now_ns, report);
            if let Some(why) = why {
                self.remove(pipeline, target, &key, why, now_ns);
                report.removed += 1;
            }
        }
    }

    /// Polls one session: `Some(why)` when its rules must go.
    fn poll_one<T: FlowTarget + CountQuery + ?Sized>(
        &mut self,
        pipeline: &mut Pipeline,
        target: &mut T,
        key: &(Name, SessionId),
        now_ns: u64,
        report: &mut TickReport,
    ) -> Option<Removal> {
        let Some(view) = pipeline.session(&key.0, key.1) else {
            return Some(Removal::Gone);
        };
        if now_ns >= view.expires_at_ns {
            return Some(Removal::Gone);
        }
        if view.proto == Proto::Tcp && view.tcp_state != Some(TcpState::Established) {
            return Some(Removal::Teardown);
        }
        let Some(o) = self.sessions.get_mut(key) else {
            return Some(Removal::Gone);
        };
        let (mut dp, mut db) = (0u64, 0u64);
        for (id, last) in &mut o.rules {
            let Some((p, b)) = target.query_count(id) else {
                return Some(Removal::Lost);
            };
            dp = dp.saturating_add(p.wrapping_sub(last.0));
            db = db.saturating_add(b.wrapping_sub(last.1));
            *last = (p, b);
        }
        if dp > 0 {
            if !pipeline.refresh_session(&key.0, key.1, now_ns, dp, db) {
                return Some(Removal::Gone);
            }
            self.stats.refreshed += 1;
            report.refreshed += 1;
            return None;
        }
        (now_ns.saturating_add(self.cfg.idle_guard_ns) >= view.expires_at_ns)
            .then_some(Removal::Idle)
    }

    #[allow(clippy::too_many_arguments)]
    fn install<T: FlowTarget + CountQuery + ?Sized>(
        &mut self,
        pipeline: &mut Pipeline,
        model: &Model,
        plan: &Plan,
        caps: &Caps,
        target: &mut T,
        now_ns: u64,
        report: &mut TickReport,
    ) {
        if now_ns < self.paused_until || self.cfg.install_budget == 0 {
            return;
        }
        let mut offers: Vec<SessionOffer> = Vec::new();
        let guard = self.cfg.idle_guard_ns;
        pipeline.scan_candidates(
            &mut self.scan,
            self.cfg.scan_budget,
            now_ns,
            self.cfg.min_age_ns,
            |o| {
                // Not worth it (and handed straight back) when about to expire idle.
                if now_ns.saturating_add(guard) < o.expires_at_ns {
                    offers.push(o);
                }
            },
        );
        let shape = session_shape_refusal(caps);
        let budget = self.cfg.max_rules.min(
            (caps.max_rules as usize)
                .saturating_sub(plan.hw.rule_count())
                .saturating_sub(self.cfg.reserve_rules),
        );
        let mut installed = 0;
        for offer in offers {
            if installed >= self.cfg.install_budget {
                break;
            }
            let key = (offer.nat.clone(), offer.id);
            if self.sessions.contains_key(&key) {
                continue;
            }
            let rules = match &shape {
                Some(r) => Err(SwReason::Unsupported(r.clone())),
                None => session_rules(&offer, self.cfg.shard, plan, caps, model),
            };
            let rules = match rules {
                Ok(r) if self.rules_held + r.len() > budget => Err(SwReason::SessionBudget),
                other => other,
            };
            let rules = match rules {
                Ok(r) => r,
                Err(why) => {
                    *self.stats.refused.entry(why).or_default() += 1;
                    report.refused += 1;
                    continue;
                }
            };
            let mut created: Vec<(RuleId, (u64, u64))> = Vec::with_capacity(rules.len());
            let mut refusal = None;
            for (id, rule) in &rules {
                match target.create_rule(id, rule) {
                    Ok(()) => created.push((id.clone(), (0, 0))),
                    Err(r) => {
                        refusal = Some(r);
                        break;
                    }
                }
            }
            if let Some(r) = refusal {
                for (id, _) in &created {
                    target.destroy_rule(id);
                }
                *self
                    .stats
                    .refused
                    .entry(SwReason::Unsupported(r))
                    .or_default() += 1;
                report.refused += 1;
                self.paused_until = now_ns.saturating_add(self.cfg.retry_after_ns);
                return;
            }
            pipeline.mark_offloaded(&key.0, key.1, true);
            self.rules_held += created.len();
            self.sessions.insert(
                key,
                Offloaded {
                    offer,
                    rules: created,
                    shape: rules.into_iter().map(|(_, r)| r).collect(),
                },
            );
            self.stats.installed += 1;
            report.installed += 1;
            installed += 1;
        }
    }
}
