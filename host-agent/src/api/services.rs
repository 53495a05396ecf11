//! The gRPC service implementations: thin translations onto [`Store`].

use std::pin::Pin;

use flow_offload::model::{Change, Name, ObjectKey, TableId};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::convert::{self, FieldError};
use super::{invalid_argument, pb, store_status};
use crate::flashing::{FlashHub, FlashRequest, FlashRequestError};
use crate::store::{Guarded, Object, StatusChange, Store};

/// The service state: the store.
#[derive(Debug, Clone)]
pub struct Api {
    store: Store,
    desired: Option<super::DesiredState>,
    hub: Option<FlashHub>,
    refused: Option<crate::fpm::RefusedRoutes>,
    pairs: Option<crate::pair::PairStates>,
    pair_controls: Option<crate::pair::PairControls>,
}

impl Api {
    pub fn new(store: Store, views: super::DaemonViews) -> Api {
        Api {
            store,
            desired: views.desired,
            hub: views.hub,
            refused: views.refused,
            pairs: views.pairs,
            pair_controls: views.pair_controls,
        }
    }

    /// Creates one object (must not exist) and returns its stored revision.
    async fn create(&self, change: Change) -> Result<i64, Status> {
        self.store
            .write(&[Guarded::create(change)])
            .await
            .map_err(|e| store_status(&e))
    }

    /// Deletes one object, at `revision` if non-zero.
    async fn delete(&self, change: Change, revision: i64) -> Result<pb::DeleteResponse, Status> {
        let g = if revision == 0 {
            Guarded::any(change)
        } else {
            Guarded::at(change, revision)
        };
        let revision = self.store.write(&[g]).await.map_err(|e| store_status(&e))?;
        Ok(pb::DeleteResponse { revision })
    }

    async fn get(&self, key: ObjectKey) -> Result<(Object, i64), Status> {
        self.store.get(&key).await.map_err(|e| store_status(&e))
    }
}

fn bad(e: FieldError) -> Status {
    invalid_argument(&e)
}

fn name(object: &str, s: &str) -> Result<Name, Status> {
    Name::new(s).map_err(|problem| {
        bad(FieldError {
            object: object.to_owned(),
            field: "name".to_owned(),
            problem,
        })
    })
}

fn required<T>(v: Option<T>, object: &str, field: &str) -> Result<T, Status> {
    v.ok_or_else(|| {
        bad(FieldError {
            object: object.to_owned(),
            field: field.to_owned(),
            problem: flow_offload::model::Problem::Count { min: 1, max: 1 },
        })
    })
}

fn wrong_kind() -> Status {
    Status::internal("stored object of an unexpected kind")
}

#[tonic::async_trait]
impl pb::vpc_service_server::VpcService for Api {
    async fn create_vpc(
        &self,
        req: Request<pb::CreateVpcRequest>,
    ) -> Result<Response<pb::Vpc>, Status> {
        let v = required(req.into_inner().vpc, "vpc", "vpc")?;
        let v = convert::vpc(&v).map_err(bad)?;
        let rev = self.create(Change::UpsertVpc(v.clone())).await?;
        Ok(Response::new(convert::vpc_pb(&v, rev)))
    }

    async fn get_vpc(&self, req: Request<pb::GetVpcRequest>) -> Result<Response<pb::Vpc>, Status> {
        let n = name("vpc", &req.into_inner().name)?;
        match self.get(ObjectKey::Vpc(n)).await? {
            (Object::Vpc(v), rev) => Ok(Response::new(convert::vpc_pb(&v, rev))),
            _ => Err(wrong_kind()),
        }
    }

    async fn list_vpcs(
        &self,
        _: Request<pb::ListVpcsRequest>,
    ) -> Result<Response<pb::ListVpcsResponse>, Status> {
        let s = self.store.snapshot().await.map_err(|e| store_status(&e))?;
        let vpcs = s
            .objects
            .values()
            .filter_map(|(o, r)| match o {
                Object::Vpc(v) => Some(convert::vpc_pb(v, *r)),
                _ => None,
            })
            .collect();
        Ok(Response::new(pb::ListVpcsResponse {
            vpcs,
            revision: s.revision,
        }))
    }

    async fn delete_vpc(
        &self,
        req: Request<pb::DeleteVpcRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let req = req.into_inner();
        let n = name("vpc", &req.name)?;
        Ok(Response::new(
            self.delete(Change::DeleteVpc(n), req.revision).await?,
        ))
    }
}

#[tonic::async_trait]
impl pb::route_service_server::RouteService for Api {
    async fn create_route(
        &self,
        req: Request<pb::CreateRouteRequest>,
    ) -> Result<Response<pb::Route>, Status> {
        let r = required(req.into_inner().route, "route", "route")?;
        let r = convert::route(&r).map_err(bad)?;
        let rev = self.create(Change::UpsertRoute(r.clone())).await?;
        Ok(Response::new(convert::route_pb(&r, rev)))
    }

    async fn get_route(
        &self,
        req: Request<pb::GetRouteRequest>,
    ) -> Result<Response<pb::Route>, Status> {
        let k = convert::route_key(req.into_inner().key.as_ref(), "key").map_err(bad)?;
        match self.get(ObjectKey::Route(k)).await? {
            (Object::Route(r), rev) => Ok(Response::new(convert::route_pb(&r, rev))),
            _ => Err(wrong_kind()),
        }
    }

    async fn list_routes(
        &self,
        req: Request<pb::ListRoutesRequest>,
    ) -> Result<Response<pb::ListRoutesResponse>, Status> {
        let req = req.into_inner();
        let s = self.store.snapshot().await.map_err(|e| store_status(&e))?;
        let table = if req.vpc.is_empty() {
            (req.table != 0).then_some(TableId(req.table))
        } else {
            let n = Name::new(&req.vpc).map_err(|problem| {
                bad(FieldError {
                    object: "routes".into(),
                    field: "vpc".into(),
                    problem,
                })
            })?;
            let v = s
                .model
                .vpcs()
                .get(&n)
                .ok_or_else(|| Status::not_found(format!("vpc {n}: not found")))?;
            Some(v.table)
        };
        let mut routes: Vec<pb::Route> = s
            .objects
            .values()
            .filter_map(|(o, r)| match o {
                Object::Route(x) if table.is_none_or(|t| x.key.table == t) => {
                    Some(convert::route_pb(x, *r))
                }
                _ => None,
            })
            .collect();
        if req.learned {
            if let Some(d) = &self.desired {
                let model = d.borrow().clone();
                let statics: std::collections::BTreeSet<_> = s
                    .objects
                    .values()
                    .filter_map(|(o, _)| match o {
                        Object::Route(x) => Some(x.key),
                        _ => None,
                    })
                    .collect();
                routes.extend(
                    model
                        .routes()
                        .values()
                        .filter(|x| table.is_none_or(|t| x.key.table == t))
                        .filter(|x| !statics.contains(&x.key))
                        .map(|x| pb::Route {
                            source: "frr".to_owned(),
                            ..convert::route_pb(x, 0)
                        }),
                );
            }
        }
        Ok(Response::new(pb::ListRoutesResponse {
            routes,
            revision: s.revision,
        }))
    }

    async fn delete_route(
        &self,
        req: Request<pb::DeleteRouteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let req = req.into_inner();
        let k = convert::route_key(req.key.as_ref(), "key").map_err(bad)?;
        Ok(Response::new(
            self.delete(Change::DeleteRoute(k), req.revision).await?,
        ))
    }
}

#[tonic::async_trait]
impl pb::nat_service_server::NatService for Api {
    async fn create_nat_rule(
        &self,
        req: Request<pb::CreateNatRuleRequest>,
    ) -> Result<Response<pb::NatRule>, Status> {
        let n = required(req.into_inner().rule, "nat", "rule")?;
        let n = convert::nat(&n).map_err(bad)?;
        let rev = self.create(Change::UpsertNat(n.clone())).await?;
        Ok(Response::new(convert::nat_pb(&n, rev)))
    }

    async fn get_nat_rule(
        &self,
        req: Request<pb::GetNatRuleRequest>,
    ) -> Result<Response<pb::NatRule>, Status> {
        let n = name("nat", &req.into_inner().name)?;
        match self.get(ObjectKey::Nat(n)).await? {
            (Object::Nat(x), rev) => Ok(Response::new(convert::nat_pb(&x, rev))),
            _ => Err(wrong_kind()),
        }
    }

    async fn list_nat_rules(
        &self,
        _: Request<pb::ListNatRulesRequest>,
    ) -> Result<Response<pb::ListNatRulesResponse>, Status> {
        let s = self.store.snapshot().await.map_err(|e| store_status(&e))?;
        let rules = s
            .objects
            .values()
            .filter_map(|(o, r)| match o {
                Object::Nat(x) => Some(convert::nat_pb(x, *r)),
                _ => None,
            })
            .collect();
        Ok(Response::new(pb::ListNatRulesResponse {
            rules,
            revision: s.revision,
        }))
    }

    async fn delete_nat_rule(
        &self,
        req: Request<pb::DeleteNatRuleRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let req = req.into_inner();
        let n = name("nat", &req.name)?;
        Ok(Response::new(
            self.delete(Change::DeleteNat(n), req.revision).await?,
        ))
    }
}

#[tonic::async_trait]
impl pb::meter_service_server::MeterService for Api {
    async fn create_meter(
        &self,
        req: Request<pb::CreateMeterRequest>,
    ) -> Result<Response<pb::Meter>, Status> {
        let m = required(req.into_inner().meter, "meter", "meter")?;
        let m = convert::meter(&m).map_err(bad)?;
        let rev = self.create(Change::UpsertMeter(m.clone())).await?;
        Ok(Response::new(convert::meter_pb(&m, rev)))
    }

    async fn get_meter(
        &self,
        req: Request<pb::GetMeterRequest>,
    ) -> Result<Response<pb::Meter>, Status> {
        let n = name("meter", &req.into_inner().name)?;
        match self.get(ObjectKey::Meter(n)).await? {
            (Object::Meter(x), rev) => Ok(Response::new(convert::meter_pb(&x, rev))),
            _ => Err(wrong_kind()),
        }
    }

    async fn list_meters(
        &self,
        _: Request<pb::ListMetersRequest>,
    ) -> Result<Response<pb::ListMetersResponse>, Status> {
        let s = self.store.snapshot().await.map_err(|e| store_status(&e))?;
        let meters = s
            .objects
            .values()
            .filter_map(|(o, r)| match o {
                Object::Meter(x) => Some(convert::meter_pb(x, *r)),
                _ => None,
            })
            .collect();
        Ok(Response::new(pb::ListMetersResponse {
            meters,
            revision: s.revision,
        }))
    }

    async fn delete_meter(
        &self,
        req: Request<pb::DeleteMeterRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let req = req.into_inner();
        let n = name("meter", &req.name)?;
        Ok(Response::new(
            self.delete(Change::DeleteMeter(n), req.revision).await?,
        ))
    }
}

fn dpu_filter(dpu: &str) -> Result<Option<Name>, Status> {
    if dpu.is_empty() {
        return Ok(None);
    }
    Name::new(dpu).map(Some).map_err(|problem| {
        bad(FieldError {
            object: "status".into(),
            field: "dpu".into(),
            problem,
        })
    })
}

/// The stream of a status watch.
type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::StatusEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::status_service_server::StatusService for Api {
    async fn list_status(
        &self,
        req: Request<pb::ListStatusRequest>,
    ) -> Result<Response<pb::ListStatusResponse>, Status> {
        let dpu = dpu_filter(&req.into_inner().dpu)?;
        let (entries, revision) = self
            .store
            .status(dpu.as_ref())
            .await
            .map_err(|e| store_status(&e))?;
        let mut statuses: Vec<pb::ObjectStatus> = entries.iter().map(convert::status_pb).collect();
        // zebra's routes on no DPU (kept in the daemon's memory, not in etcd): listed with no
        // DPU, unless the request names one.
        if let (None, Some(r)) = (&dpu, &self.refused) {
            statuses.extend(r.list().iter().map(convert::refused_pb));
        }
        Ok(Response::new(pb::ListStatusResponse { statuses, revision }))
    }

    type WatchStream = StatusStream;

    async fn watch(
        &self,
        req: Request<pb::WatchStatusRequest>,
    ) -> Result<Response<StatusStream>, Status> {
        let dpu = dpu_filter(&req.into_inner().dpu)?;
        let (entries, revision) = self
            .store
            .status(dpu.as_ref())
            .await
            .map_err(|e| store_status(&e))?;
        let changes = self
            .store
            .watch_status(dpu.as_ref(), revision)
            .await
            .map_err(|e| store_status(&e))?;
        // The current state first, then every change after it.
        let initial = entries.into_iter().map(move |e| {
            Ok(pb::StatusEvent {
                status: Some(convert::status_pb(&e)),
                removed: false,
                revision,
            })
        });
        let follow = changes.map(|c| match c {
            Ok(StatusChange::Set { entry, revision }) => Ok(pb::StatusEvent {
                status: Some(convert::status_pb(&entry)),
                removed: false,
                revision,
            }),
            Ok(StatusChange::Removed {
                dpu,
                object,
                revision,
            }) => Ok(pb::StatusEvent {
                status: Some(pb::ObjectStatus {
                    dpu: dpu.to_string(),
                    object: Some(convert::object_ref(&object)),
                    object_text: object.to_string(),
                    ..Default::default()
                }),
                removed: true,
                revision,
            }),
            Err(e) => Err(store_status(&e)),
        });
        let stream = tokio_stream::iter(initial).chain(follow);
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl pb::dpu_service_server::DpuService for Api {
    async fn list_dpus(
        &self,
        _: Request<pb::ListDpusRequest>,
    ) -> Result<Response<pb::ListDpusResponse>, Status> {
        let dpus = self.store.dpus().await.map_err(|e| store_status(&e))?;
        let dpus = dpus
            .iter()
            .map(|d| {
                let mut out = convert::dpu_pb(d);
                if let Some(r) = self.hub.as_ref().and_then(|h| h.boot_of(&out.id)) {
                    convert::boot_into(&mut out, &r);
                }
                if let Some(p) = &self.pairs {
                    let states = p.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                    out.pair = states.get(&out.id).map(convert::pair_pb);
                }
                out
            })
            .collect();
        Ok(Response::new(pb::ListDpusResponse { dpus }))
    }

    async fn switchover(
        &self,
        req: Request<pb::SwitchoverRequest>,
    ) -> Result<Response<pb::SwitchoverResponse>, Status> {
        use flow_offload::wire::PairRole;
        let group = req.into_inner().group;
        let (Some(controls), Some(states)) = (&self.pair_controls, &self.pairs) else {
            return Err(Status::failed_precondition(
                "this host agent runs no A/B pair",
            ));
        };
        let members: Vec<&String> = controls
            .iter()
            .filter(|(_, c)| group.is_empty() || c.group == group)
            .map(|(d, _)| d)
            .collect();
        let groups: std::collections::BTreeSet<&str> = members
            .iter()
            .filter_map(|d| controls.get(*d).map(|c| c.group.as_str()))
            .collect();
        if groups.len() != 1 {
            return Err(super::invalid_field(
                "switchover",
                "group",
                "names no pair of this host agent",
                format!(
                    "switchover: field `group`: {group:?} names no pair of this host agent (pairs: {:?})",
                    controls.values().map(|c| c.group.as_str()).collect::<std::collections::BTreeSet<_>>()
                ),
            ));
        }
        let snapshot = |states: &crate::pair::PairStates| {
            let s = states
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            members
                .iter()
                .map(|d| ((*d).clone(), s.get(*d).cloned()))
                .collect::<Vec<_>>()
        };
        let now = snapshot(states);
        let Some((from, epoch)) = now.iter().find_map(|(d, s)| {
            s.as_ref()
                .filter(|s| s.role == PairRole::Active)
                .map(|s| (d.clone(), s.epoch))
        }) else {
            return Err(Status::failed_precondition(format!(
                "pair {}: no member is active now",
                groups.iter().next().copied().unwrap_or_default()
            )));
        };
        let standby_ready = now.iter().any(|(d, s)| {
            *d != from
                && s.as_ref()
                    .is_some_and(|s| s.role == PairRole::Standby && s.ready)
        });
        if !standby_ready {
            return Err(Status::failed_precondition(format!(
                "pair {}: the standby is not Ready (it must hold every session before a planned switchover)",
                groups.iter().next().copied().unwrap_or_default()
            )));
        }
        let started = std::time::Instant::now();
        let sent = controls
            .get(&from)
            .map(|c| c.switchover.try_send(epoch).is_ok())
            .unwrap_or(false);
        if !sent {
            return Err(Status::unavailable(format!(
                "{from}: its link cannot take a switchover order now"
            )));
        }
        tracing::info!(%from, epoch, "planned switchover requested");
        let deadline = started + SWITCHOVER_WAIT;
        loop {
            let now = snapshot(states);
            if let Some((to, e)) = now.iter().find_map(|(d, s)| {
                s.as_ref()
                    .filter(|s| *d != from && s.role == PairRole::Active && s.epoch > epoch)
                    .map(|s| (d.clone(), s.epoch))
            }) {
                let took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                tracing::info!(%from, %to, epoch = e, took_ms, "planned switchover done");
                return Ok(Response::new(pb::SwitchoverResponse {
                    from,
                    to,
                    epoch: e,
                    took_ms,
                }));
            }
            if std::time::Instant::now() > deadline {
                return Err(Status::deadline_exceeded(format!(
                    "switchover from {from} (epoch {epoch}) not complete after {}s; states: {now:?}",
                    SWITCHOVER_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// How long a planned switchover may take before the API gives up waiting (the DPUs go on).
const SWITCHOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

fn flash_field(field: &str, description: &str) -> Status {
    super::invalid_field(
        "flash",
        field,
        description,
        format!("flash: field `{field}`: {description}"),
    )
}

#[tonic::async_trait]
impl pb::image_service_server::ImageService for Api {
    type FlashStream = Pin<Box<dyn Stream<Item = Result<pb::FlashEvent, Status>> + Send>>;

    async fn flash(
        &self,
        req: Request<pb::FlashRequest>,
    ) -> Result<Response<Self::FlashStream>, Status> {
        let Some(hub) = &self.hub else {
            return Err(Status::unavailable("this server does not flash images"));
        };
        let r = req.into_inner();
        let path = std::path::PathBuf::from(&r.image_path);
        if !path.is_absolute() {
            return Err(flash_field(
                "image_path",
                "an absolute path on the host agent's machine",
            ));
        }
        if r.all != r.dpu_ids.is_empty() {
            return Err(flash_field("dpu_ids", "name DPUs, or set all (not both)"));
        }
        let ranged = |field: &str, v: u32, default: u32, max: u32| {
            if v > max {
                Err(flash_field(field, &format!("at most {max}")))
            } else if v == 0 {
                Ok(default)
            } else {
                Ok(v)
            }
        };
        let parallel = ranged("parallel", r.parallel, 4, 1024)?;
        let streams = ranged("streams", r.streams, 4, 16)?;
        let tries = ranged("tries", r.tries, 3, 10)?;
        let request = FlashRequest {
            image_path: path,
            dpus: r.dpu_ids,
            all: r.all,
            parallel: parallel as usize,
            streams: u8::try_from(streams).unwrap_or(4),
            tries: u8::try_from(tries).unwrap_or(3),
            activate: r.activate,
        };
        let events = hub.flash(request).await.map_err(|e| match &e {
            FlashRequestError::Image(_) | FlashRequestError::Verify { .. } => {
                super::invalid_field("flash", "image_path", &e.to_string(), e.to_string())
            }
            FlashRequestError::NotConnected(_) => Status::not_found(e.to_string()),
            FlashRequestError::NoDpus | FlashRequestError::Busy(_) => {
                Status::failed_precondition(e.to_string())
            }
            FlashRequestError::Serve(_)
            | FlashRequestError::Listen(_)
            | FlashRequestError::Keys(_) => Status::internal(e.to_string()),
        })?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(events)
            .map(|e| Ok(convert::flash_event_pb(&e)));
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl pb::node_service_server::NodeService for Api {
    async fn set_node(
        &self,
        req: Request<pb::SetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let req = req.into_inner();
        let n = required(req.node, "node", "node")?;
        let n = convert::node(&n).map_err(bad)?;
        let change = Change::SetNode(n.clone());
        let g = if req.revision == 0 {
            Guarded::any(change)
        } else {
            Guarded::at(change, req.revision)
        };
        let rev = self.store.write(&[g]).await.map_err(|e| store_status(&e))?;
        Ok(Response::new(convert::node_pb(&n, rev)))
    }

    async fn get_node(&self, _: Request<pb::GetNodeRequest>) -> Result<Response<pb::Node>, Status> {
        match self.get(ObjectKey::Node).await? {
            (Object::Node(n), rev) => Ok(Response::new(convert::node_pb(&n, rev))),
            _ => Err(wrong_kind()),
        }
    }
}
