//! The agent's state: the desired model, its compiled plan on the hardware target, the
//! software pipeline the lcores run, and what was last reported to the host.
//!
//! [`Agent::apply`] takes one batch from the host: refused as a whole when any change is
//! invalid (nothing changes), otherwise applied to the model, recompiled (route-only batches
//! incrementally, anything else from scratch against the plan in force, so unchanged rules stay
//! untouched), programmed through the [`FlowTarget`] (creates the NIC refuses fall back to
//! software with the driver's reason), and mirrored into the software pipeline. A full batch
//! is diffed against the model in force first, so a resync that changes nothing, or only
//! routes, rebuilds nothing. A rebuild carries the NAT state of every NAT rule that survives
//! unchanged into the new pipeline (established sessions keep their outside address and port)
//! and keeps offloaded sessions in hardware where the new plan gives them the same rules.
//!
//! Every batch is applied, whatever its epoch: the epoch only pairs an answer with its batch.
//! The host resumes numbering from the hello's `last_epoch`, so epochs increase across restarts
//! of either side; a batch whose epoch does not is still applied, and counted and logged.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use flow_offload::caps::Caps;
use flow_offload::compile::{Compiler, SwReason};
use flow_offload::model::{
    Change, Model, ModelError, Nexthop, ObjectKey, PortId, Problem, RouteKey,
};
use flow_offload::program::{program, CountQuery, FlowTarget};
use flow_offload::sessions::{SessionOffload, SessionOffloadConfig};
use flow_offload::soft::pipeline::{Pipeline, PipelineError, PipelineLimits};
use flow_offload::status::{FailReason, OffloadStatus};
use flow_offload::wire::{Ack, Apply, Message};

use crate::config::Role;

/// The pipeline the lcores run, shared with the control thread (locked once per burst).
pub type SharedPipeline = Arc<Mutex<Pipeline>>;

/// What one batch did, for logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Changes applied.
    pub changes: usize,
    /// Whether the plan was rebuilt from scratch (otherwise incremental).
    pub rebuilt: bool,
    /// Hardware operations applied.
    pub hw_ops: usize,
    /// Creates the NIC refused (each moved its object to software).
    pub nic_refusals: usize,
    /// Objects whose status changed.
    pub status_changes: usize,
    /// Objects of the desired state held as refused after the batch.
    pub refused: usize,
}

/// The agent's state over one hardware target.
#[derive(Debug)]
pub struct Agent {
    model: Model,
    compiler: Compiler,
    pipeline: SharedPipeline,
    limits: PipelineLimits,
    seed: u64,
    roles: BTreeMap<PortId, Role>,
    last_epoch: Option<u64>,
    /// Batches whose epoch did not increase (applied anyway, counted and logged).
    epoch_regressions: u64,
    /// The plan's software placements as last reported.
    reported_sw: BTreeMap<ObjectKey, SwReason>,
    /// Objects the software pipeline could not take.
    failed: BTreeMap<ObjectKey, FailReason>,
    /// Objects of the host's desired state this DPU refused (not in `model`), with why and
    /// the change that would put them in: retried whenever a batch changes what they depend
    /// on, so that a VPC that gains a valid port brings its refused routes with it.
    refused: BTreeMap<ObjectKey, (ModelError, Change)>,
    /// Established NAT sessions offloaded as exact-match rules (targets that can).
    sessions: SessionOffload,
    /// The agent's clock: the pipeline's time base (the lcores use the same).
    clock: Instant,
}

impl Agent {
    /// An empty agent: no model, nothing programmed, for a target with `caps` whose ports have
    /// these roles.
    pub fn new(
        caps: Caps,
        roles: BTreeMap<PortId, Role>,
        limits: PipelineLimits,
        seed: u64,
    ) -> Result<Agent, PipelineError> {
        let model = Model::new();
        let pipeline = Pipeline::new(&model, limits, seed)?;
        Ok(Agent {
            model,
            compiler: Compiler::new(caps),
            pipeline: Arc::new(Mutex::new(pipeline)),
            limits,
            seed,
            roles,
            last_epoch: None,
            epoch_regressions: 0,
            reported_sw: BTreeMap::new(),
            failed: BTreeMap::new(),
            refused: BTreeMap::new(),
            sessions: SessionOffload::new(SessionOffloadConfig::default()),
            clock: Instant::now(),
        })
    }

    /// The time base of the pipeline: lcores must use this one.
    pub fn clock(&self) -> Instant {
        self.clock
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Session offload housekeeping: expire, poll the counters of offloaded sessions, offload
    /// new established ones. Call every 100 ms to 1 s.
    pub fn tick<T: FlowTarget + CountQuery + ?Sized>(&mut self, target: &mut T) {
        let now = self.now_ns();
        let mut pipe = self.pipeline.lock().unwrap_or_else(PoisonError::into_inner);
        let r = self.sessions.tick(
            &mut pipe,
            &self.model,
            self.compiler.plan(),
            self.compiler.caps(),
            target,
            now,
        );
        drop(pipe);
        tracing::trace!(report = ?r, "session offload tick");
    }

    /// Sessions offloaded to hardware now.
    pub fn offloaded_sessions(&self) -> usize {
        self.sessions.offloaded_count()
    }

    /// The pipeline, for the lcores.
    pub fn pipeline(&self) -> SharedPipeline {
        self.pipeline.clone()
    }

    /// The model in force.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The last epoch applied since start (`None`: empty, the host must send everything).
    pub fn last_epoch(&self) -> Option<u64> {
        self.last_epoch
    }

    /// Batches applied whose epoch did not increase (a host that did not resume numbering).
    pub fn epoch_regressions(&self) -> u64 {
        self.epoch_regressions
    }

    /// The target's capabilities the compiler uses.
    pub fn caps(&self) -> &Caps {
        self.compiler.caps()
    }

    /// Where an object landed.
    pub fn status(&self, object: &ObjectKey) -> OffloadStatus {
        if let Some((error, _)) = self.refused.get(object) {
            return OffloadStatus::Failed {
                reason: FailReason::Invalid(error.clone()),
            };
        }
        if let Some(reason) = self.failed.get(object) {
            return OffloadStatus::Failed {
                reason: reason.clone(),
            };
        }
        self.compiler.plan().status(object)
    }

    /// Rules the plan holds in hardware.
    pub fn hw_rule_count(&self) -> usize {
        self.compiler.plan().hw.rule_count()
    }

    /// Every object of the model.
    pub fn objects(&self) -> Vec<ObjectKey> {
        let m = &self.model;
        let mut v: Vec<ObjectKey> = Vec::new();
        if m.node().is_some() {
            v.push(ObjectKey::Node);
        }
        v.extend(m.vpcs().keys().map(|n| ObjectKey::Vpc(n.clone())));
        v.extend(m.routes().keys().map(|k| ObjectKey::Route(*k)));
        v.extend(m.nat_rules().keys().map(|n| ObjectKey::Nat(n.clone())));
        v.extend(m.meters().keys().map(|n| ObjectKey::Meter(n.clone())));
        v.extend(self.refused.keys().cloned());
        v
    }

    /// Applies one batch from the host and answers it with [`Message::Ack`]: every object it
    /// could take is applied, every other one is reported `Failed` with the reason (the agent
    /// no longer answers [`Message::Refused`]: one bad object must not block the rest).
    pub fn apply<T: FlowTarget + CountQuery + ?Sized>(
        &mut self,
        target: &mut T,
        batch: &Apply,
    ) -> (Message, BatchReport) {
        let mut report = BatchReport::default();
        if let Some(last) = self.last_epoch {
            if batch.epoch <= last {
                // The host is the authority on desired state: a batch is applied whatever its
                // epoch. A host resumes numbering from our hello's `last_epoch`, so this means
                // a host that does not; acknowledging without applying would lose its changes.
                self.epoch_regressions += 1;
                tracing::warn!(
                    epoch = batch.epoch,
                    last,
                    "batch epoch did not increase (host restarted without resuming from our last epoch); applying it"
                );
            }
        }
        // Admission, object by object: an object this DPU cannot take (a port it lacks, a
        // reference to an object it refused) is held as `Failed` and everything else applies.
        // A full batch (after a restart or reconnect of either side) is then diffed against
        // the model in force, so that a model equal to the running one, or differing only in
        // routes, takes the incremental path and rebuilds nothing.
        let refused_before: BTreeSet<ObjectKey> = self.refused.keys().cloned().collect();
        let (effective, routes_only) = if batch.full {
            let mut fresh = Model::new();
            self.refused.clear();
            admit(&self.roles, &mut fresh, &mut self.refused, &batch.changes);
            let diff = self.model.changes_to(&fresh);
            self.model = fresh;
            match diff {
                Some(d) => {
                    let routes_only = d.iter().all(is_route_change);
                    (d, routes_only)
                }
                None => (batch.changes.clone(), false),
            }
        } else {
            let applied = admit(
                &self.roles,
                &mut self.model,
                &mut self.refused,
                &batch.changes,
            );
            let routes_only = applied.iter().all(is_route_change);
            (applied, routes_only)
        };
        report.changes = effective.len();
        report.refused = self.refused.len();
        for (object, (error, _)) in &self.refused {
            if !refused_before.contains(object) {
                tracing::warn!(%object, %error, "object refused; held as failed until it or what it depends on changes");
            }
        }

        // Compile and mirror into the software pipeline.
        let mut touched: BTreeSet<ObjectKey> = batch.changes.iter().map(Change::object).collect();
        touched.extend(effective.iter().map(Change::object));
        // Objects that left or joined the refused set report their new status.
        touched.extend(
            refused_before
                .symmetric_difference(&self.refused.keys().cloned().collect())
                .cloned(),
        );
        if routes_only {
            let keys: BTreeSet<RouteKey> = effective
                .iter()
                .filter_map(|c| match c {
                    Change::UpsertRoute(r) => Some(r.key),
                    Change::DeleteRoute(k) => Some(*k),
                    _ => None,
                })
                .collect();
            let now = self.now_ns();
            let mut pipe = self.pipeline.lock().unwrap_or_else(PoisonError::into_inner);
            for key in &keys {
                // Sessions whose path the route may change go back to software first.
                self.sessions.route_changed(&mut pipe, target, key, now);
                self.compiler.forget_route_refusals(key);
                self.compiler.update_route(&self.model, *key);
                let object = ObjectKey::Route(*key);
                self.failed.remove(&object);
                if let Err(e) = pipe.update_route(&self.model, *key) {
                    tracing::warn!(route = ?key, error = %e, "software tables refuse the route");
                    self.failed.insert(object, FailReason::SoftwareTableFull);
                }
            }
        } else {
            report.rebuilt = true;
            self.compiler.rebuild(&self.model);
            self.rebuild_pipeline(target, &mut touched);
        }
        match program(&mut self.compiler, &self.model, target) {
            Ok(r) => {
                report.hw_ops = r.applied;
                report.nic_refusals = r.refused.len() + r.refused_meters.len();
                for (id, refusal) in &r.refused {
                    tracing::info!(rule = ?id, %refusal, "NIC refused a rule at create time; its object runs in software");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "hardware programming did not settle");
            }
        }
        let mut failed = std::mem::take(&mut self.failed);
        failed.retain(|k, _| self.model_has(k));
        self.failed = failed;

        // Report the batch's objects and every object whose placement changed.
        let sw = &self.compiler.plan().sw;
        let changed = changed_keys(&self.reported_sw, sw);
        report.status_changes = changed.len();
        touched.extend(changed);
        self.reported_sw = sw.clone();
        self.last_epoch = Some(batch.epoch);
        let status = self.status_of(touched.into_iter());
        (
            Message::Ack(Ack {
                epoch: batch.epoch,
                status,
            }),
            report,
        )
    }

    /// Replaces the software pipeline with one built from the model in force, carrying over
    /// the NAT state (mappings and sessions) of every NAT rule that survives unchanged, and
    /// keeping in hardware the offloaded sessions whose rules the new plan makes the same.
    /// Call after the compiler rebuilt the plan and before programming it.
    fn rebuild_pipeline<T: FlowTarget + CountQuery + ?Sized>(
        &mut self,
        target: &mut T,
        touched: &mut BTreeSet<ObjectKey>,
    ) {
        self.failed.clear();
        let now = self.now_ns();
        // Built outside the lock: the lcores keep forwarding on the old one meanwhile.
        match Pipeline::new(&self.model, self.limits, self.seed) {
            Ok(mut p) => {
                let mut pipe = self.pipeline.lock().unwrap_or_else(PoisonError::into_inner);
                let carry = p.carry_nat_from(&mut pipe);
                let (kept, removed) = self.sessions.retain_valid(
                    &mut p,
                    target,
                    (self.compiler.plan(), self.compiler.caps(), &self.model),
                    &carry.carried,
                    now,
                );
                *pipe = p;
                drop(pipe);
                for (rule, sessions) in &carry.dropped {
                    if *sessions > 0 {
                        tracing::warn!(nat = %rule, sessions, "NAT rule removed or changed: its sessions are dropped");
                    }
                }
                tracing::info!(
                    nat_rules = carry.carried.len(),
                    sessions = carry.sessions,
                    offloaded_kept = kept,
                    offloaded_removed = removed,
                    "software pipeline rebuilt; NAT state carried over"
                );
            }
            Err(e) => {
                // The software tables cannot hold the model: the old pipeline keeps running.
                tracing::error!(error = %e, "software pipeline refused the model; keeping the previous one");
                let object = match &e {
                    PipelineError::Lpm { key, .. } => Some(ObjectKey::Route(*key)),
                    PipelineError::Nat { rule, .. } => Some(ObjectKey::Nat(rule.clone())),
                    PipelineError::RoutesFull { .. } => None,
                };
                if let Some(o) = object {
                    touched.insert(o.clone());
                    self.failed.insert(o, FailReason::SoftwareTableFull);
                }
                // The plan changed under the sessions' rules: take them all back.
                let mut pipe = self.pipeline.lock().unwrap_or_else(PoisonError::into_inner);
                self.sessions.flush(&mut pipe, target, now);
            }
        }
    }

    fn model_has(&self, k: &ObjectKey) -> bool {
        match k {
            ObjectKey::Node => self.model.node().is_some(),
            ObjectKey::Vpc(n) => self.model.vpcs().contains_key(n),
            ObjectKey::Route(r) => self.model.routes().contains_key(r),
            ObjectKey::Nat(n) => self.model.nat_rules().contains_key(n),
            ObjectKey::Meter(n) => self.model.meters().contains_key(n),
        }
    }

    fn status_of(
        &self,
        objects: impl Iterator<Item = ObjectKey>,
    ) -> Vec<(ObjectKey, OffloadStatus)> {
        let set: BTreeSet<ObjectKey> = objects
            .filter(|o| self.model_has(o) || self.refused.contains_key(o))
            .collect();
        set.into_iter()
            .map(|o| {
                let s = self.status(&o);
                (o, s)
            })
            .collect()
    }
}

/// Keys whose software placement differs between two plans' `sw` maps (merge-join).
fn changed_keys(
    old: &BTreeMap<ObjectKey, SwReason>,
    new: &BTreeMap<ObjectKey, SwReason>,
) -> Vec<ObjectKey> {
    let mut out = Vec::new();
    let mut a = old.iter().peekable();
    let mut b = new.iter().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((k, _)), None) => {
                out.push((*k).clone());
                a.next();
            }
            (None, Some((k, _))) => {
                out.push((*k).clone());
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    out.push((*ka).clone());
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push((*kb).clone());
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if va != vb {
                        out.push((*ka).clone());
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
    out
}

fn is_route_change(c: &Change) -> bool {
    matches!(c, Change::UpsertRoute(_) | Change::DeleteRoute(_))
}

/// The error of a one-change `Model::apply`, without its batch index.
fn unbatched(e: ModelError) -> ModelError {
    match e {
        ModelError::InBatch { source, .. } => *source,
        other => other,
    }
}

/// Applies `changes` to `model` object by object: a change naming a port this DPU does not
/// have in that role, or one the model refuses (a route in a refused VPC's table, a NAT rule of
/// a missing VPC), is held in `refused` instead; a deletion clears what is held for its object
/// (deleting what this DPU does not have is done already). Then retries what is held, since
/// the batch may have brought what it lacked. Returns the changes that took effect, in order.
/// One `Model::apply` of the whole batch when everything is valid (the common case).
fn admit(
    roles: &BTreeMap<PortId, Role>,
    model: &mut Model,
    refused: &mut BTreeMap<ObjectKey, (ModelError, Change)>,
    changes: &[Change],
) -> Vec<Change> {
    let ports_ok = changes.iter().all(|c| check_port(roles, c).is_ok());
    let mut applied: Vec<Change> = Vec::new();
    if ports_ok && model.apply(changes).is_ok() {
        for c in changes {
            refused.remove(&c.object());
        }
        applied.extend_from_slice(changes);
    } else {
        for c in changes {
            let object = c.object();
            let is_delete = matches!(
                c,
                Change::DeleteVpc(_)
                    | Change::DeleteRoute(_)
                    | Change::DeleteNat(_)
                    | Change::DeleteMeter(_)
            );
            if is_delete {
                refused.remove(&object);
            }
            let result = check_port(roles, c)
                .and_then(|()| model.apply(std::slice::from_ref(c)).map_err(unbatched));
            match result {
                Ok(()) => {
                    refused.remove(&object);
                    applied.push(c.clone());
                }
                Err(ModelError::NotFound { .. }) if is_delete => {}
                Err(e) => {
                    refused.insert(object, (e, c.clone()));
                }
            }
        }
    }
    // What is held may depend on what just applied; retry until nothing more goes in. Only
    // after changes that others can depend on (routes depend on VPCs, NAT rules on VPCs,
    // meters on VPCs, NAT rules and routes), so a large batch of plain routes pays nothing.
    let enables = applied.iter().any(|c| {
        !matches!(
            c,
            Change::DeleteRoute(_) | Change::DeleteNat(_) | Change::DeleteMeter(_)
        )
    });
    if enables && !refused.is_empty() {
        loop {
            let mut progress = false;
            let held: Vec<(ObjectKey, Change)> = refused
                .iter()
                .map(|(k, (_, c))| (k.clone(), c.clone()))
                .collect();
            for (object, c) in held {
                let result = check_port(roles, &c)
                    .and_then(|()| model.apply(std::slice::from_ref(&c)).map_err(unbatched));
                match result {
                    Ok(()) => {
                        refused.remove(&object);
                        applied.push(c);
                        progress = true;
                    }
                    Err(e) => {
                        if let Some(entry) = refused.get_mut(&object) {
                            entry.0 = e;
                        }
                    }
                }
            }
            if !progress {
                break;
            }
        }
    }
    applied
}

/// Refuses a change naming a port this DPU does not have in that role.
fn check_port(roles: &BTreeMap<PortId, Role>, c: &Change) -> Result<(), ModelError> {
    let object = c.object();
    let bad = |field: String, problem: Problem| ModelError::Invalid {
        object: object.clone(),
        field,
        problem,
    };
    match c {
        Change::SetNode(n) => {
            for (i, p) in n.uplinks.iter().enumerate() {
                if roles.get(p) != Some(&Role::Uplink) {
                    return Err(bad(format!("uplinks[{i}]"), Problem::NotAnUplink(p.0)));
                }
            }
        }
        Change::UpsertVpc(v) => {
            for (i, p) in v.ports.iter().enumerate() {
                if roles.get(p) != Some(&Role::Vpc) {
                    return Err(bad(format!("ports[{i}]"), Problem::NotAVpcPort(p.0)));
                }
            }
        }
        Change::UpsertRoute(r) => {
            for (i, nh) in r.nexthops.iter().enumerate() {
                if let Nexthop::Underlay { port, .. } = nh {
                    if !roles.contains_key(port) {
                        return Err(bad(
                            format!("nexthops[{i}].port"),
                            Problem::NotAnUplink(port.0),
                        ));
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}
