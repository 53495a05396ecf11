//! zebra's routes that are on no DPU, and why: the ones the RIB did not take ([`NotTaken`]:
//! not ours, or waiting for a nexthop or a router MAC) and the ones the desired-state model
//! refused (its [`ModelError`]).
//!
//! The host agent's main loop keeps this registry up to date, change by change (never a full
//! pass per batch); the management API lists it in `ListStatus` (`dpuctl status`) beside the
//! statuses the DPUs report, and the metrics count it per reason code
//! (`dpucp_frr_routes_refused{reason}`). It is shared behind a lock: the loop writes, the API
//! reads.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use flow_offload::model::{ModelError, ObjectKey, Prefix, RouteKey, TableId};

use super::rib::{NotTaken, ZebraRoute};

/// Why a route zebra sent is on no DPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The RIB did not take it.
    NotTaken(NotTaken),
    /// The desired-state model refused it.
    Model(ModelError),
}

impl Refusal {
    /// The reason code of a model refusal.
    pub const MODEL: &'static str = "invalid";

    /// A machine-readable reason code.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::NotTaken(n) => n.code(),
            Refusal::Model(_) => Self::MODEL,
        }
    }

    /// Every code [`Refusal::code`] gives.
    pub fn codes() -> impl Iterator<Item = &'static str> {
        NotTaken::CODES
            .into_iter()
            .chain(std::iter::once(Self::MODEL))
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotTaken(n) => n.fmt(f),
            // The model wraps a one-change batch's error; the change itself is the route.
            Refusal::Model(ModelError::InBatch { source, .. }) => {
                write!(f, "refused by the model: {source}")
            }
            Refusal::Model(e) => write!(f, "refused by the model: {e}"),
        }
    }
}

/// One route zebra sent that is on no DPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedRoute {
    /// zebra's route (its table as zebra sent it).
    pub zebra: ZebraRoute,
    /// The model route it maps to, when it got that far (model refusals).
    pub model: Option<RouteKey>,
    /// Why.
    pub why: Refusal,
}

impl RefusedRoute {
    /// The route as an object: the model's table when known, zebra's table otherwise.
    pub fn object(&self) -> ObjectKey {
        ObjectKey::Route(self.model.unwrap_or(RouteKey {
            table: TableId(self.zebra.table),
            prefix: self.zebra.prefix,
        }))
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// By zebra's table and prefix.
    not_taken: BTreeMap<(u32, Prefix), RefusedRoute>,
    /// By model route.
    model: BTreeMap<RouteKey, RefusedRoute>,
    /// Per reason code.
    counts: BTreeMap<&'static str, u64>,
}

impl Inner {
    fn count(&mut self, old: Option<&RefusedRoute>, new: Option<&RefusedRoute>) {
        if let Some(o) = old {
            if let Some(n) = self.counts.get_mut(o.why.code()) {
                *n = n.saturating_sub(1);
            }
        }
        if let Some(n) = new {
            *self.counts.entry(n.why.code()).or_insert(0) += 1;
        }
    }
}

/// The registry of zebra's routes on no DPU. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct RefusedRoutes(Arc<RwLock<Inner>>);

impl RefusedRoutes {
    /// An empty registry.
    pub fn new() -> RefusedRoutes {
        RefusedRoutes::default()
    }

    /// The RIB took (`None`) or did not take (`Some`) zebra route `zebra`. Returns true if
    /// this is a new refusal or a new reason (worth a log line).
    pub fn set_not_taken(&self, zebra: ZebraRoute, why: Option<NotTaken>) -> bool {
        let mut g = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let key = (zebra.table, zebra.prefix);
        match why {
            Some(n) => {
                let new = RefusedRoute {
                    zebra,
                    model: None,
                    why: Refusal::NotTaken(n),
                };
                let old = g.not_taken.insert(key, new.clone());
                let fresh = old.as_ref().map(|o| &o.why) != Some(&new.why);
                g.count(old.as_ref(), Some(&new));
                fresh
            }
            None => {
                let old = g.not_taken.remove(&key);
                g.count(old.as_ref(), None);
                false
            }
        }
    }

    /// The model refused (`Some`) or no longer refuses (`None`: accepted, shadowed by the
    /// configuration, or deleted) model route `key`, which is zebra's `zebra`. Returns true if
    /// this is a new refusal or a new reason.
    pub fn set_model(
        &self,
        key: RouteKey,
        zebra: Option<ZebraRoute>,
        error: Option<ModelError>,
    ) -> bool {
        let mut g = self.0.write().unwrap_or_else(PoisonError::into_inner);
        match error {
            Some(e) => {
                let new = RefusedRoute {
                    zebra: zebra.unwrap_or(ZebraRoute {
                        table: key.table.0,
                        prefix: key.prefix,
                        protocol: 0,
                    }),
                    model: Some(key),
                    why: Refusal::Model(e),
                };
                let old = g.model.insert(key, new.clone());
                let fresh = old.as_ref().map(|o| &o.why) != Some(&new.why);
                g.count(old.as_ref(), Some(&new));
                fresh
            }
            None => {
                let old = g.model.remove(&key);
                g.count(old.as_ref(), None);
                false
            }
        }
    }

    /// Every refused route: the RIB's, then the model's.
    pub fn list(&self) -> Vec<RefusedRoute> {
        let g = self.0.read().unwrap_or_else(PoisonError::into_inner);
        g.not_taken
            .values()
            .chain(g.model.values())
            .cloned()
            .collect()
    }

    /// The model refusals (to acknowledge again after zebra reconnects).
    pub fn model_refusals(&self) -> Vec<(RouteKey, ModelError)> {
        let g = self.0.read().unwrap_or_else(PoisonError::into_inner);
        g.model
            .iter()
            .filter_map(|(k, r)| match &r.why {
                Refusal::Model(e) => Some((*k, e.clone())),
                Refusal::NotTaken(_) => None,
            })
            .collect()
    }

    /// How many are refused, per reason code (every code, 0 included).
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        let g = self.0.read().unwrap_or_else(PoisonError::into_inner);
        Refusal::codes()
            .map(|c| (c, g.counts.get(c).copied().unwrap_or(0)))
            .collect()
    }

    /// How many are refused.
    pub fn len(&self) -> usize {
        let g = self.0.read().unwrap_or_else(PoisonError::into_inner);
        g.not_taken.len() + g.model.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::fpm::rib::Unattributed;
    use flow_offload::model::{ObjectKeyOrTable, PortId, Problem};

    fn z(prefix: &str) -> ZebraRoute {
        ZebraRoute {
            table: 254,
            prefix: prefix.parse().unwrap(),
            protocol: 186,
        }
    }

    #[test]
    fn counts_per_code_follow_every_change() {
        let r = RefusedRoutes::new();
        let connected = Some(NotTaken::Unattributed(Unattributed::Connected));
        assert!(r.set_not_taken(z("10.0.0.0/24"), connected));
        assert!(
            !r.set_not_taken(z("10.0.0.0/24"), connected),
            "same reason: not new"
        );
        let key = RouteKey {
            table: TableId(254),
            prefix: "10.5.0.0/24".parse().unwrap(),
        };
        let e = ModelError::InBatch {
            index: 0,
            source: Box::new(ModelError::Invalid {
                object: ObjectKey::Route(key),
                field: "nexthops[0].port".into(),
                problem: Problem::Unknown(ObjectKeyOrTable::Uplink(PortId(0))),
            }),
        };
        assert!(r.set_model(key, Some(z("10.5.0.0/24")), Some(e.clone())));
        let c = r.counts();
        assert_eq!((c["connected"], c["invalid"], c["no_port"]), (1, 1, 0));
        let list = r.list();
        assert_eq!(list.len(), 2);
        assert_eq!(
            list[1].why.to_string(),
            "refused by the model: route 10.5.0.0/24 in table 254: field `nexthops[0].port`: refers to unknown port 0 (not an uplink)"
        );
        assert_eq!(list[1].object(), ObjectKey::Route(key));
        assert_eq!(r.model_refusals(), vec![(key, e)]);
        r.set_model(key, None, None);
        r.set_not_taken(z("10.0.0.0/24"), None);
        assert!(r.is_empty());
        assert!(r.counts().values().all(|n| *n == 0));
    }
}
