//! Reconcile: from the plan in force to a new plan, the minimal ordered operations.
//!
//! Rule identities ([`RuleId`]) are stable, so a diff is a merge of two sorted maps: a rule only
//! in the new plan is created, only in the old one destroyed, in both but different replaced.
//! A single route change therefore touches only that route's rules (one per port its VRF is
//! instantiated on), and rules of untouched objects are never named.
//!
//! Order, so that traffic of untouched objects is never disturbed and nothing points at what
//! does not exist yet:
//! 1. meters are created;
//! 2. rules in non-root groups are created before rules in group 0 (a jump never targets an
//!    empty group, where the packet would be dropped);
//! 3. replacements are make-before-break: the agent creates the new rule (same group and
//!    priority; the older rule keeps winning ties until it is gone), then destroys the old one;
//! 4. destroys run in group 0 first, then deeper groups (nothing jumps into a group while its
//!    rules go away);
//! 5. meters are destroyed last.

use std::cmp::Ordering;

use crate::compile::{Op, Plan, RuleId};
use crate::ir::Rule;

/// All operations that turn `old` into `new`, in a safe order.
pub fn diff(old: &Plan, new: &Plan) -> Vec<Op> {
    let mut ops = Vec::new();
    for (r, p) in &new.hw.meters {
        match old.hw.meters.get(r) {
            None => ops.push(Op::CreateMeter(*r, *p)),
            Some(q) if q != p => ops.push(Op::UpdateMeter(*r, *p)),
            Some(_) => {}
        }
    }
    for r in old.hw.meters.keys() {
        if !new.hw.meters.contains_key(r) {
            ops.push(Op::DestroyMeter(*r));
        }
    }
    let mut a = old.hw.rules.iter().peekable();
    let mut b = new.hw.rules.iter().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((ka, _)), None) => {
                ops.push(Op::Destroy((*ka).clone()));
                a.next();
            }
            (None, Some((kb, rb))) => {
                ops.push(Op::Create((*kb).clone(), (*rb).clone()));
                b.next();
            }
            (Some((ka, ra)), Some((kb, rb))) => match ka.cmp(kb) {
                Ordering::Less => {
                    ops.push(Op::Destroy((*ka).clone()));
                    a.next();
                }
                Ordering::Greater => {
                    ops.push(Op::Create((*kb).clone(), (*rb).clone()));
                    b.next();
                }
                Ordering::Equal => {
                    if ra != rb {
                        ops.push(Op::Replace((*kb).clone(), (*rb).clone()));
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
    order(ops)
}

/// Sorts operations into the safe order described in the module doc. Operations on one rule
/// keep their relative order (the sort is stable).
pub fn order(mut ops: Vec<Op>) -> Vec<Op> {
    fn rank(op: &Op) -> (u8, u8) {
        let deep = |r: &Rule| u8::from(r.attr.group == 0);
        match op {
            Op::CreateMeter(..) | Op::UpdateMeter(..) => (0, 0),
            Op::Create(_, r) | Op::Replace(_, r) => (1, deep(r)),
            Op::Destroy(_) => (2, 0),
            Op::DestroyMeter(_) => (3, 0),
        }
    }
    ops.sort_by_key(rank);
    ops
}

/// Why a list of operations does not apply to a plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// Creating a rule that exists.
    #[error("create of existing rule {0:?}")]
    Exists(RuleId),
    /// Replacing or destroying a rule that does not exist.
    #[error("no rule {0:?}")]
    Missing(RuleId),
}

/// Applies operations to a plan's hardware part (what an agent does to its installed state).
pub fn apply(plan: &mut Plan, ops: &[Op]) -> Result<(), ApplyError> {
    for op in ops {
        match op {
            Op::CreateMeter(r, p) | Op::UpdateMeter(r, p) => {
                plan.hw.meters.insert(*r, *p);
            }
            Op::DestroyMeter(r) => {
                plan.hw.meters.remove(r);
            }
            Op::Create(id, rule) => {
                if plan.hw.rules.insert(id.clone(), rule.clone()).is_some() {
                    return Err(ApplyError::Exists(id.clone()));
                }
            }
            Op::Replace(id, rule) => match plan.hw.rules.get_mut(id) {
                Some(r) => *r = rule.clone(),
                None => return Err(ApplyError::Missing(id.clone())),
            },
            Op::Destroy(id) => {
                if plan.hw.rules.remove(id).is_none() {
                    return Err(ApplyError::Missing(id.clone()));
                }
            }
        }
    }
    Ok(())
}
