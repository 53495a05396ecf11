//! Programming a target: applying a compiler's operations to hardware that may still refuse.
//!
//! Validation is a promise the hardware need not keep ("do not trust validate alone"): a rule
//! the capabilities admit can still fail at create time (table fragmentation, a driver bug, a
//! kernel without the needed qdisc). [`program`] applies the operations through the one
//! hardware trait, [`FlowTarget`], and when a create fails it records the refusal in the
//! compiler ([`Compiler::refuse`]), recompiles the affected objects (a route alone, or
//! everything for a structure rule or a meter) and applies the resulting operations, until the
//! target accepts everything asked of it. The plan then says where every object landed, with
//! the driver's own reason for what it refused.
//!
//! Between a refused create and the recompile that follows, the target briefly lacks the rule
//! (a packet may take a covering route for that moment), as it does while any rule is being
//! programmed.

use std::collections::{BTreeMap, BTreeSet};

use crate::caps::Refusal;
use crate::compile::{Compiler, Op, RuleId};
use crate::ir::{MeterRef, Rule};
use crate::model::{MeterProfile, Model, RouteKey};
use crate::reconcile::Installed;
use crate::refnic::{RefNic, RefNicError, RuleHandle};

/// Recompile rounds before [`program`] gives up. Each round records at least one new refusal
/// and recompiling a refused route needs at most two (its forwarding rule, then its trap), so
/// real targets settle in a handful; the bound only stops a target that refuses at random.
pub const MAX_ROUNDS: usize = 64;

/// One hardware backend (a DPDK port set, the reference NIC, ...): rules and meters by the
/// compiler's identities. Destroying what is not installed is not an error (a rule whose create
/// was refused is destroyed by the recompile that follows).
pub trait FlowTarget {
    /// Creates a rule under `id`.
    fn create_rule(&mut self, id: &RuleId, rule: &Rule) -> Result<(), Refusal>;
    /// Replaces the rule under `id`: make before break. When the new rule is refused the old
    /// one is destroyed too (it no longer says what the plan wants) and the refusal returned.
    fn replace_rule(&mut self, id: &RuleId, rule: &Rule) -> Result<(), Refusal>;
    /// Destroys the rule under `id`, if installed.
    fn destroy_rule(&mut self, id: &RuleId);
    /// Creates a meter.
    fn create_meter(&mut self, meter: MeterRef, profile: &MeterProfile) -> Result<(), Refusal>;
    /// Changes a meter's profile in place.
    fn update_meter(&mut self, meter: MeterRef, profile: &MeterProfile) -> Result<(), Refusal>;
    /// Destroys a meter, if installed.
    fn destroy_meter(&mut self, meter: MeterRef);
}

/// Reading a rule's `Count` action (`rte_flow_query` with `RTE_FLOW_ACTION_TYPE_COUNT`): what
/// [`crate::sessions::SessionOffload`] polls to keep offloaded NAT sessions alive. A separate
/// trait so that targets without counters need not pretend.
pub trait CountQuery {
    /// Total (packets, bytes) counted by the `Count` action of the rule installed under `id`
    /// since it was created; `None` if no such rule is installed or it has no `Count` action.
    fn query_count(&mut self, id: &RuleId) -> Option<(u64, u64)>;
}

/// What a [`program`] call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Operations applied (all rounds).
    pub applied: usize,
    /// Creates the target refused, with its reasons (all rounds).
    pub refused: Vec<(RuleId, Refusal)>,
    /// Meters the target refused.
    pub refused_meters: Vec<(MeterRef, Refusal)>,
    /// Recompile rounds after the first pass.
    pub rounds: usize,
}

/// Why programming stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgramError {
    /// The target kept refusing new rules after [`MAX_ROUNDS`] recompiles.
    #[error("target still refusing after {rounds} recompile rounds")]
    NotSettled {
        /// Rounds run.
        rounds: usize,
    },
}

/// Applies the compiler's pending operations to `target`, recompiling around every create it
/// refuses, until the target holds exactly the compiler's plan. `model` must be the model the
/// compiler last compiled.
pub fn program<T: FlowTarget + ?Sized>(
    compiler: &mut Compiler,
    model: &Model,
    target: &mut T,
) -> Result<Report, ProgramError> {
    let mut report = Report::default();
    let mut ops = compiler.take_ops();
    loop {
        let mut routes: BTreeSet<RouteKey> = BTreeSet::new();
        let mut everything = false;
        for op in &ops {
            report.applied += 1;
            let refused = match op {
                Op::CreateMeter(m, p) => target.create_meter(*m, p).err().map(|r| (None, *m, r)),
                Op::UpdateMeter(m, p) => target.update_meter(*m, p).err().map(|r| (None, *m, r)),
                Op::DestroyMeter(m) => {
                    target.destroy_meter(*m);
                    None
                }
                Op::Destroy(id, _) => {
                    target.destroy_rule(id);
                    None
                }
                Op::Create(id, rule) => target
                    .create_rule(id, rule)
                    .err()
                    .map(|r| (Some((id, rule)), MeterRef(0), r)),
                Op::Replace(id, rule) => target
                    .replace_rule(id, rule)
                    .err()
                    .map(|r| (Some((id, rule)), MeterRef(0), r)),
            };
            match refused {
                None => {}
                Some((Some((id, rule)), _, refusal)) => {
                    compiler.refuse(id, rule, refusal.clone());
                    report.refused.push((id.clone(), refusal));
                    match id {
                        RuleId::Route { key, .. } => {
                            routes.insert(*key);
                        }
                        _ => everything = true,
                    }
                }
                Some((None, meter, refusal)) => {
                    compiler.refuse_meter(meter, refusal.clone());
                    report.refused_meters.push((meter, refusal));
                    everything = true;
                }
            }
        }
        if routes.is_empty() && !everything {
            return Ok(report);
        }
        if report.rounds == MAX_ROUNDS {
            return Err(ProgramError::NotSettled {
                rounds: report.rounds,
            });
        }
        report.rounds += 1;
        if everything {
            compiler.rebuild(model);
        } else {
            for key in routes {
                compiler.update_route(model, key);
            }
        }
        ops = compiler.take_ops();
    }
}

/// The reference NIC as a [`FlowTarget`]: the test oracle's backend and the agent's
/// `refnic` port backend.
#[derive(Debug)]
pub struct RefNicTarget {
    /// The NIC.
    pub nic: RefNic,
    handles: BTreeMap<RuleId, (RuleHandle, Rule)>,
    meters: BTreeMap<MeterRef, MeterProfile>,
}

impl RefNicTarget {
    /// An empty NIC.
    pub fn new(nic: RefNic) -> RefNicTarget {
        RefNicTarget {
            nic,
            handles: BTreeMap::new(),
            meters: BTreeMap::new(),
        }
    }

    /// What is installed, by identity.
    pub fn installed(&self) -> Installed {
        Installed {
            rules: self
                .handles
                .iter()
                .map(|(id, (_, r))| (id.clone(), r.clone()))
                .collect(),
            meters: self.meters.clone(),
        }
    }

    /// The NIC's handle of an installed rule (for counters).
    pub fn handle(&self, id: &RuleId) -> Option<RuleHandle> {
        self.handles.get(id).map(|(h, _)| *h)
    }
}

impl CountQuery for RefNicTarget {
    fn query_count(&mut self, id: &RuleId) -> Option<(u64, u64)> {
        let (h, _) = self.handles.get(id)?;
        self.nic.query_count(*h)
    }
}

fn meter_refusal(e: RefNicError) -> Refusal {
    match e {
        RefNicError::Refused(r) => r,
        other => Refusal::Driver {
            errno: "EINVAL".into(),
            cause: "meter".into(),
            message: Some(other.to_string()),
        },
    }
}

impl FlowTarget for RefNicTarget {
    fn create_rule(&mut self, id: &RuleId, rule: &Rule) -> Result<(), Refusal> {
        // A create under an identity already installed replaces it (an agent restarted on a
        // NIC it had programmed).
        let h = self.nic.create(rule)?;
        if let Some((old, _)) = self.handles.insert(id.clone(), (h, rule.clone())) {
            let _ = self.nic.destroy(old);
        }
        Ok(())
    }

    fn replace_rule(&mut self, id: &RuleId, rule: &Rule) -> Result<(), Refusal> {
        match self.nic.create(rule) {
            Ok(h) => {
                if let Some((old, _)) = self.handles.insert(id.clone(), (h, rule.clone())) {
                    let _ = self.nic.destroy(old);
                }
                Ok(())
            }
            Err(refusal) => {
                self.destroy_rule(id);
                Err(refusal)
            }
        }
    }

    fn destroy_rule(&mut self, id: &RuleId) {
        if let Some((h, _)) = self.handles.remove(id) {
            let _ = self.nic.destroy(h);
        }
    }

    fn create_meter(&mut self, meter: MeterRef, profile: &MeterProfile) -> Result<(), Refusal> {
        self.nic
            .create_meter(meter, *profile, 0)
            .map_err(meter_refusal)?;
        self.meters.insert(meter, *profile);
        Ok(())
    }

    fn update_meter(&mut self, meter: MeterRef, profile: &MeterProfile) -> Result<(), Refusal> {
        self.nic
            .update_meter(meter, *profile, 0)
            .map_err(meter_refusal)?;
        self.meters.insert(meter, *profile);
        Ok(())
    }

    fn destroy_meter(&mut self, meter: MeterRef) {
        let _ = self.nic.destroy_meter(meter);
        self.meters.remove(&meter);
    }
}
