//! DPDK ports as one [`FlowTarget`]: the compiler's rules become `rte_flow` rules on the port
//! each names, its meters `rte_mtr` objects on the ports whose rules use them.

use std::collections::{BTreeMap, BTreeSet};

use flow_offload::caps::Refusal;
use flow_offload::compile::RuleId;
use flow_offload::ir::{Action, MeterRef, Rule};
use flow_offload::model::{MeterProfile, PortId};
use flow_offload::program::{CountQuery, FlowTarget};

use crate::{Errno, Flow, FlowError, FlowErrorCause, MeterError, Port};

/// The policy every meter uses (green/yellow pass, red dropped), one per port.
const POLICY_ID: u32 = 1;

/// What the driver said, as the offload core's [`Refusal`]: ENOSYS is "no flow API",
/// ENOSPC "table full", ENOTSUP/EINVAL pointing at an item or action name it (by the IR
/// rule's index and kind); anything else keeps the driver's errno, cause and message.
pub fn refusal_of(err: &FlowError, rule: &Rule) -> Refusal {
    match err {
        FlowError::Unsupported(kind) => {
            let index = rule
                .actions
                .iter()
                .position(|a| a.kind() == *kind)
                .unwrap_or(0);
            Refusal::Action {
                index,
                action: *kind,
            }
        }
        FlowError::Invalid {
            what,
            index,
            reason,
        } => Refusal::Driver {
            errno: Errno::INVAL.name(),
            cause: format!("{what} #{index}"),
            message: Some((*reason).to_owned()),
        },
        FlowError::Refused(r) => {
            let by_index = match (r.errno, r.cause) {
                (e, _) if e == Errno::NOSYS => Some(Refusal::NotImplemented),
                (e, _) if e == Errno::NOSPC => Some(Refusal::NoSpace),
                (e, FlowErrorCause::Item { index: Some(i), .. })
                    if e == Errno::NOTSUP || e == Errno::INVAL =>
                {
                    rule.pattern.get(i).map(|item| Refusal::Item {
                        index: i,
                        item: item.kind(),
                    })
                }
                (e, FlowErrorCause::Action { index: Some(i), .. })
                    if e == Errno::NOTSUP || e == Errno::INVAL =>
                {
                    rule.actions.get(i).map(|a| Refusal::Action {
                        index: i,
                        action: a.kind(),
                    })
                }
                _ => None,
            };
            by_index.unwrap_or_else(|| Refusal::Driver {
                errno: r.errno.name(),
                cause: r.cause.to_string(),
                message: r.message.clone(),
            })
        }
    }
}

fn meter_refusal(e: &MeterError, rule: &Rule) -> Refusal {
    let index = rule
        .actions
        .iter()
        .position(|a| matches!(a, Action::Meter(_)))
        .unwrap_or(0);
    if e.errno == Errno::NOSYS || e.errno == Errno::NOTSUP {
        return Refusal::Action {
            index,
            action: flow_offload::ir::ActionKind::Meter,
        };
    }
    Refusal::Driver {
        errno: e.errno.name(),
        cause: format!("{} ({})", e.call, e.cause),
        message: e.message.clone(),
    }
}

/// The agent's ports as one target. Model port ids are the ethdev port ids.
#[derive(Debug)]
pub struct DpdkTarget<'a> {
    ports: BTreeMap<PortId, &'a Port<'a>>,
    flows: BTreeMap<RuleId, Flow<'a>>,
    /// Meter profiles the plan wants, created on a port when a rule there first uses them.
    meters: BTreeMap<MeterRef, MeterProfile>,
    /// (port, meter) pairs that exist on the NIC.
    on_port: BTreeSet<(PortId, MeterRef)>,
    /// Ports whose drop-red policy exists.
    policies: BTreeSet<PortId>,
}

impl<'a> DpdkTarget<'a> {
    /// A target over these ports, nothing installed.
    pub fn new(ports: impl IntoIterator<Item = &'a Port<'a>>) -> DpdkTarget<'a> {
        DpdkTarget {
            ports: ports.into_iter().map(|p| (PortId(p.id()), p)).collect(),
            flows: BTreeMap::new(),
            meters: BTreeMap::new(),
            on_port: BTreeSet::new(),
            policies: BTreeSet::new(),
        }
    }

    /// Rules installed.
    pub fn rule_count(&self) -> usize {
        self.flows.len()
    }

    /// The (packets, bytes) of an installed rule with a `COUNT` action (`rte_flow_query`);
    /// `None` when the rule is not installed or the driver cannot say.
    pub fn query_count(&self, id: &RuleId) -> Option<(u64, u64)> {
        self.flows.get(id)?.query_count().ok()
    }

    /// Destroys every rule, then every meter (shutdown), reporting what the driver refused.
    pub fn clear(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for (id, flow) in std::mem::take(&mut self.flows) {
            if let Err(e) = flow.destroy() {
                errors.push(format!("{id:?}: {e}"));
            }
        }
        for (port, m) in std::mem::take(&mut self.on_port) {
            if let Some(p) = self.ports.get(&port) {
                if let Err(e) = p.meter_destroy(m.0) {
                    errors.push(format!("meter {m:?} on port {}: {e}", port.0));
                }
                let _ = p.meter_profile_delete(m.0);
            }
        }
        errors
    }

    /// Makes sure every meter the rule uses exists on its port.
    fn ensure_meters(&mut self, rule: &Rule) -> Result<(), Refusal> {
        let Some(port) = self.ports.get(&rule.port).copied() else {
            return Ok(());
        };
        for a in &rule.actions {
            let Action::Meter(m) = a else { continue };
            if self.on_port.contains(&(rule.port, *m)) {
                continue;
            }
            let profile = self.meters.get(m).copied().ok_or_else(|| Refusal::Driver {
                errno: Errno::INVAL.name(),
                cause: format!("meter {}", m.0),
                message: Some("rule uses a meter that was not created".into()),
            })?;
            if !self.policies.contains(&rule.port) {
                port.meter_policy_add_drop_red(POLICY_ID)
                    .map_err(|e| meter_refusal(&e, rule))?;
                self.policies.insert(rule.port);
            }
            port.meter_profile_add(m.0, &profile)
                .map_err(|e| meter_refusal(&e, rule))?;
            if let Err(e) = port.meter_create(m.0, m.0, POLICY_ID) {
                let _ = port.meter_profile_delete(m.0);
                return Err(meter_refusal(&e, rule));
            }
            self.on_port.insert((rule.port, *m));
        }
        Ok(())
    }

    fn create(&mut self, rule: &Rule) -> Result<Flow<'a>, Refusal> {
        let port = self
            .ports
            .get(&rule.port)
            .copied()
            .ok_or_else(|| Refusal::Driver {
                errno: Errno::NODEV.name(),
                cause: format!("port {}", rule.port.0),
                message: Some("the agent has no such port".into()),
            })?;
        self.ensure_meters(rule)?;
        port.flow_create(rule).map_err(|e| refusal_of(&e, rule))
    }
}

impl FlowTarget for DpdkTarget<'_> {
    fn create_rule(&mut self, id: &RuleId, rule: &Rule) -> Result<(), Refusal> {
        let flow = self.create(rule)?;
        // An identity already installed is replaced (the old rule is destroyed on drop).
        self.flows.insert(id.clone(), flow);
        Ok(())
    }

    fn replace_rule(&mut self, id: &RuleId, rule: &Rule) -> Result<(), Refusal> {
        match self.create(rule) {
            Ok(flow) => {
                // Make before break: the new rule is in, the old one drops here.
                self.flows.insert(id.clone(), flow);
                Ok(())
            }
            Err(r) => {
                self.flows.remove(id);
                Err(r)
            }
        }
    }

    fn destroy_rule(&mut self, id: &RuleId) {
        if let Some(flow) = self.flows.remove(id) {
            // A driver refusing to destroy leaves nothing we can do but report it.
            if let Err(e) = flow.destroy() {
                tracing::warn!(rule = ?id, error = %e, "rte_flow_destroy failed");
            }
        }
    }

    fn create_meter(&mut self, meter: MeterRef, profile: &MeterProfile) -> Result<(), Refusal> {
        self.meters.insert(meter, *profile);
        Ok(())
    }

    fn update_meter(&mut self, meter: MeterRef, profile: &MeterProfile) -> Result<(), Refusal> {
        self.meters.insert(meter, *profile);
        // Profiles are immutable in rte_mtr: add the new one under a second id, point the
        // meter at it, then reuse the original id.
        let ports: Vec<PortId> = self
            .on_port
            .iter()
            .filter(|(_, m)| *m == meter)
            .map(|(p, _)| *p)
            .collect();
        for p in ports {
            let Some(port) = self.ports.get(&p).copied() else {
                continue;
            };
            let temp = meter.0 | 0x8000_0000;
            let step = port
                .meter_profile_add(temp, profile)
                .and_then(|()| port.meter_profile_update(meter.0, temp))
                .and_then(|()| port.meter_profile_delete(meter.0))
                .and_then(|()| port.meter_profile_add(meter.0, profile))
                .and_then(|()| port.meter_profile_update(meter.0, meter.0))
                .and_then(|()| port.meter_profile_delete(temp));
            if let Err(e) = step {
                return Err(Refusal::Driver {
                    errno: e.errno.name(),
                    cause: format!("{} ({})", e.call, e.cause),
                    message: e.message,
                });
            }
        }
        Ok(())
    }

    fn destroy_meter(&mut self, meter: MeterRef) {
        self.meters.remove(&meter);
        let ports: Vec<PortId> = self
            .on_port
            .iter()
            .filter(|(_, m)| *m == meter)
            .map(|(p, _)| *p)
            .collect();
        for p in ports {
            self.on_port.remove(&(p, meter));
            if let Some(port) = self.ports.get(&p) {
                if let Err(e) = port.meter_destroy(meter.0) {
                    tracing::warn!(meter = meter.0, port = p.0, error = %e, "rte_mtr_destroy failed");
                }
                let _ = port.meter_profile_delete(meter.0);
            }
        }
    }
}

impl CountQuery for DpdkTarget<'_> {
    fn query_count(&mut self, id: &RuleId) -> Option<(u64, u64)> {
        DpdkTarget::query_count(self, id)
    }
}
