//! Reconcile: from the plan in force to a new plan, the minimal ordered operations.
//!
//! Rule identities ([`RuleId`]) are stable, so a diff is a merge of sorted maps: a rule only in
//! the new plan is created, only in the old one destroyed, in both but different replaced. A
//! single route change therefore touches only that route's rules (one per port its VRF is
//! instantiated on), and rules of untouched objects are never named.
//!
//! Order, so that traffic of untouched objects is never disturbed and nothing points at what
//! does not exist yet:
//! 1. meters are created (or their profile updated);
//! 2. rules in non-root groups are created before rules in group 0 (a jump never targets an
//!    empty group, where the packet would be dropped);
//! 3. replacements are make-before-break: the agent creates the new rule (same group and
//!    priority; the older rule keeps winning ties until it is gone), then destroys the old one;
//! 4. destroys run in group 0 first, then deeper groups (nothing jumps into a group while its
//!    rules go away);
//! 5. meters are destroyed last.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use crate::compile::{route_ops, HwPlan, Op, Plan, RuleId};
use crate::ir::{MeterRef, Rule};
use crate::model::MeterProfile;

/// What a target has installed, rule by rule: the agent's view, and what operations apply to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// Rules by identity.
    pub rules: BTreeMap<RuleId, Rule>,
    /// Meters by reference.
    pub meters: BTreeMap<MeterRef, MeterProfile>,
}

impl HwPlan {
    /// The plan as a target holds it: every rule by identity.
    pub fn installed(&self) -> Installed {
        Installed {
            rules: self.iter_rules().collect(),
            meters: self.meters.clone(),
        }
    }
}

/// Merge-joins two sorted maps, calling `f(key, old, new)` for every key in either.
fn merge<'a, K: Ord, V>(
    a: &'a BTreeMap<K, V>,
    b: &'a BTreeMap<K, V>,
    mut f: impl FnMut(&'a K, Option<&'a V>, Option<&'a V>),
) {
    let mut a = a.iter().peekable();
    let mut b = b.iter().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(&(ka, va)), None) => {
                f(ka, Some(va), None);
                a.next();
            }
            (None, Some(&(kb, vb))) => {
                f(kb, None, Some(vb));
                b.next();
            }
            (Some(&(ka, va)), Some(&(kb, vb))) => match ka.cmp(kb) {
                Ordering::Less => {
                    f(ka, Some(va), None);
                    a.next();
                }
                Ordering::Greater => {
                    f(kb, None, Some(vb));
                    b.next();
                }
                Ordering::Equal => {
                    f(ka, Some(va), Some(vb));
                    a.next();
                    b.next();
                }
            },
        }
    }
}

/// All operations that turn `old` into `new`, in a safe order.
pub fn diff(old: &Plan, new: &Plan) -> Vec<Op> {
    let mut ops = Vec::new();
    merge(&old.hw.meters, &new.hw.meters, |r, a, b| match (a, b) {
        (None, Some(p)) => ops.push(Op::CreateMeter(*r, *p)),
        (Some(p), Some(q)) if p != q => ops.push(Op::UpdateMeter(*r, *q)),
        (Some(_), None) => ops.push(Op::DestroyMeter(*r)),
        _ => {}
    });
    merge(&old.hw.structure, &new.hw.structure, |id, a, b| {
        match (a, b) {
            (None, Some(r)) => ops.push(Op::Create(id.clone(), r.clone())),
            (Some(r), None) => ops.push(Op::Destroy(id.clone(), r.attr.group)),
            (Some(p), Some(q)) if p != q => ops.push(Op::Replace(id.clone(), q.clone())),
            _ => {}
        }
    });
    merge(&old.hw.routes, &new.hw.routes, |key, a, b| {
        route_ops(key, a, b, &mut ops)
    });
    order(ops)
}

/// Sorts operations into the safe order described in the module doc. Operations on one rule
/// keep their relative order (the sort is stable).
pub fn order(mut ops: Vec<Op>) -> Vec<Op> {
    fn rank(op: &Op) -> (u8, u8) {
        let root = |group: u32| u8::from(group == 0);
        match op {
            Op::CreateMeter(..) | Op::UpdateMeter(..) => (0, 0),
            Op::Create(_, r) | Op::Replace(_, r) => (1, root(r.attr.group)),
            Op::Destroy(_, group) => (2, 1 - root(*group)),
            Op::DestroyMeter(_) => (3, 0),
        }
    }
    ops.sort_by_key(rank);
    ops
}

/// Why a list of operations does not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// Creating a rule that exists.
    #[error("create of existing rule {0:?}")]
    Exists(RuleId),
    /// Replacing or destroying a rule that does not exist.
    #[error("no rule {0:?}")]
    Missing(RuleId),
}

/// Applies operations to what a target holds (what an agent does with its handles).
pub fn apply(installed: &mut Installed, ops: &[Op]) -> Result<(), ApplyError> {
    for op in ops {
        match op {
            Op::CreateMeter(r, p) | Op::UpdateMeter(r, p) => {
                installed.meters.insert(*r, *p);
            }
            Op::DestroyMeter(r) => {
                installed.meters.remove(r);
            }
            Op::Create(id, rule) => {
                if installed.rules.insert(id.clone(), rule.clone()).is_some() {
                    return Err(ApplyError::Exists(id.clone()));
                }
            }
            Op::Replace(id, rule) => match installed.rules.get_mut(id) {
                Some(r) => *r = rule.clone(),
                None => return Err(ApplyError::Missing(id.clone())),
            },
            Op::Destroy(id, _) => {
                if installed.rules.remove(id).is_none() {
                    return Err(ApplyError::Missing(id.clone()));
                }
            }
        }
    }
    Ok(())
}
