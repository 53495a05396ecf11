//! Protobuf messages <-> the model. Parsing errors name the field as the API spells it.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use core::str::FromStr;

use flow_offload::caps::{CapsSource, Profile};
use flow_offload::compile::SwReason;
use flow_offload::model::{
    Ipv4Range, MacAddr, Meter, MeterProfile, MeterTarget, ModelError, Name, NatKind, NatRule,
    Nexthop, Node, ObjectKey, PortId, Prefix, Problem, Route, RouteKey, TableId, Vni, Vpc,
};
use flow_offload::status::{FailReason, OffloadStatus};
use flow_offload::wire::{BootOutcome, BootReport, FlashPhase};

use super::pb;
use crate::flashing::{FlashEvent, FlashStep};
use crate::store::{DpuInfo, StatusEntry};

/// An input field that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: field `{field}`: {problem}")]
pub struct FieldError {
    /// The object, as far as it is known ("vpc blue", "route").
    pub object: String,
    /// The field path (`nexthops[0].underlay.mac`).
    pub field: String,
    /// What is wrong.
    pub problem: Problem,
}

impl FieldError {
    fn new(object: &str, field: impl Into<String>, problem: Problem) -> FieldError {
        FieldError {
            object: object.to_owned(),
            field: field.into(),
            problem,
        }
    }
}

impl From<ModelError> for FieldError {
    fn from(e: ModelError) -> FieldError {
        match e {
            ModelError::Invalid {
                object,
                field,
                problem,
            } => FieldError {
                object: object.to_string(),
                field,
                problem,
            },
            ModelError::InBatch { source, .. } => FieldError::from(*source),
            other => FieldError {
                object: other.to_string(),
                field: String::new(),
                problem: Problem::BadSyntax,
            },
        }
    }
}

type R<T> = Result<T, FieldError>;

fn name(object: &str, field: &str, s: &str) -> R<Name> {
    Name::new(s).map_err(|p| FieldError::new(object, field, p))
}

fn parse<T: FromStr>(object: &str, field: &str, s: &str) -> R<T> {
    s.parse()
        .map_err(|_| FieldError::new(object, field, Problem::BadSyntax))
}

fn prefix(object: &str, field: &str, s: &str) -> R<Prefix> {
    s.parse().map_err(|p| FieldError::new(object, field, p))
}

/// Parses "02:00:00:00:00:01".
pub fn parse_mac(s: &str) -> Option<MacAddr> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(MacAddr(out))
}

fn mac(object: &str, field: &str, s: &str) -> R<MacAddr> {
    parse_mac(s).ok_or_else(|| FieldError::new(object, field, Problem::BadSyntax))
}

fn port(object: &str, field: &str, p: u32) -> R<PortId> {
    u16::try_from(p).map(PortId).map_err(|_| {
        FieldError::new(
            object,
            field,
            Problem::OutOfRange {
                min: 0,
                max: u64::from(u16::MAX),
            },
        )
    })
}

fn vni(object: &str, field: &str, v: u32) -> R<Vni> {
    Vni::new(v).map_err(|p| FieldError::new(object, field, p))
}

fn missing(object: &str, field: &str) -> FieldError {
    FieldError::new(object, field, Problem::Count { min: 1, max: 1 })
}

/// A route key from the API.
pub fn route_key(k: Option<&pb::RouteKey>, field: &str) -> R<RouteKey> {
    let k = k.ok_or_else(|| missing("route", field))?;
    Ok(RouteKey {
        table: TableId(k.table),
        prefix: prefix("route", &format!("{field}.prefix"), &k.prefix)?,
    })
}

/// A route key for the API.
pub fn route_key_pb(k: &RouteKey) -> pb::RouteKey {
    pb::RouteKey {
        table: k.table.0,
        prefix: k.prefix.to_string(),
    }
}

/// A VPC from the API.
pub fn vpc(v: &pb::Vpc) -> R<Vpc> {
    let o = "vpc";
    let name = name(o, "name", &v.name)?;
    let o = &format!("vpc {}", v.name);
    Ok(Vpc {
        name,
        vni: vni(o, "vni", v.vni)?,
        table: TableId(v.table),
        ports: v
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| port(o, &format!("ports[{i}]"), *p))
            .collect::<R<_>>()?,
    })
}

/// A VPC for the API.
pub fn vpc_pb(v: &Vpc, revision: i64) -> pb::Vpc {
    pb::Vpc {
        name: v.name.to_string(),
        vni: v.vni.get(),
        table: v.table.0,
        ports: v.ports.iter().map(|p| u32::from(p.0)).collect(),
        revision,
    }
}

/// A route from the API.
pub fn route(r: &pb::Route) -> R<Route> {
    let key = route_key(r.key.as_ref(), "key")?;
    let o = &format!("route {}", key.prefix);
    let mut nexthops = Vec::with_capacity(r.nexthops.len());
    for (i, nh) in r.nexthops.iter().enumerate() {
        let f = |s: &str| format!("nexthops[{i}].{s}");
        use pb::nexthop::Kind;
        nexthops.push(match &nh.kind {
            None => return Err(missing(o, &format!("nexthops[{i}]"))),
            Some(Kind::Underlay(u)) => Nexthop::Underlay {
                gateway: parse::<IpAddr>(o, &f("underlay.gateway"), &u.gateway)?,
                port: port(o, &f("underlay.port"), u.port)?,
                mac: mac(o, &f("underlay.mac"), &u.mac)?,
            },
            Some(Kind::Vxlan(x)) => Nexthop::Vxlan {
                vni: vni(o, &f("vxlan.vni"), x.vni)?,
                remote_vtep: parse::<Ipv4Addr>(o, &f("vxlan.remote_vtep"), &x.remote_vtep)?,
                router_mac: mac(o, &f("vxlan.router_mac"), &x.router_mac)?,
            },
            Some(Kind::Vrf(v)) => Nexthop::Vrf {
                table: TableId(v.table),
            },
            Some(Kind::Blackhole(_)) => Nexthop::Blackhole,
        });
    }
    Ok(Route { key, nexthops })
}

/// A route for the API.
pub fn route_pb(r: &Route, revision: i64) -> pb::Route {
    use pb::nexthop::Kind;
    pb::Route {
        key: Some(route_key_pb(&r.key)),
        nexthops: r
            .nexthops
            .iter()
            .map(|nh| pb::Nexthop {
                kind: Some(match *nh {
                    Nexthop::Underlay { gateway, port, mac } => {
                        Kind::Underlay(pb::UnderlayNexthop {
                            gateway: gateway.to_string(),
                            port: u32::from(port.0),
                            mac: mac.to_string(),
                        })
                    }
                    Nexthop::Vxlan {
                        vni,
                        remote_vtep,
                        router_mac,
                    } => Kind::Vxlan(pb::VxlanNexthop {
                        vni: vni.get(),
                        remote_vtep: remote_vtep.to_string(),
                        router_mac: router_mac.to_string(),
                    }),
                    Nexthop::Vrf { table } => Kind::Vrf(pb::VrfNexthop { table: table.0 }),
                    Nexthop::Blackhole => Kind::Blackhole(pb::BlackholeNexthop {}),
                }),
            })
            .collect(),
        revision,
        source: "static".to_owned(),
    }
}

fn pool(o: &str, field: &str, p: Option<&pb::Ipv4Range>) -> R<Ipv4Range> {
    let p = p.ok_or_else(|| missing(o, field))?;
    Ok(Ipv4Range {
        first: parse(o, &format!("{field}.first"), &p.first)?,
        last: parse(o, &format!("{field}.last"), &p.last)?,
    })
}

fn ports(o: &str, field: &str, p: Option<&pb::PortRange>) -> R<(u16, u16)> {
    let p = p.ok_or_else(|| missing(o, field))?;
    let one = |f: &str, v: u32| {
        u16::try_from(v).map_err(|_| {
            FieldError::new(
                o,
                format!("{field}.{f}"),
                Problem::OutOfRange { min: 1, max: 65535 },
            )
        })
    };
    Ok((one("first", p.first)?, one("last", p.last)?))
}

/// A NAT rule from the API.
pub fn nat(n: &pb::NatRule) -> R<NatRule> {
    use pb::nat_rule::Kind;
    let name = name("nat", "name", &n.name)?;
    let o = &format!("nat {}", n.name);
    let vpc = self::name(o, "vpc", &n.vpc)?;
    let kind = match &n.kind {
        None => return Err(missing(o, "kind")),
        Some(Kind::Static44(s)) => NatKind::Static44 {
            inside: parse::<Ipv4Addr>(o, "static44.inside", &s.inside)?,
            outside: parse::<Ipv4Addr>(o, "static44.outside", &s.outside)?,
        },
        Some(Kind::Static66(s)) => NatKind::Static66 {
            inside: parse::<Ipv6Addr>(o, "static66.inside", &s.inside)?,
            outside: parse::<Ipv6Addr>(o, "static66.outside", &s.outside)?,
        },
        Some(Kind::Napt44(s)) => NatKind::Napt44 {
            pool: pool(o, "napt44.pool", s.pool.as_ref())?,
            ports: ports(o, "napt44.ports", s.ports.as_ref())?,
        },
        Some(Kind::Nat64(s)) => NatKind::Nat64 {
            prefix: prefix(o, "nat64.prefix", &s.prefix)?,
            pool: pool(o, "nat64.pool", s.pool.as_ref())?,
            ports: ports(o, "nat64.ports", s.ports.as_ref())?,
        },
    };
    Ok(NatRule { name, vpc, kind })
}

/// A NAT rule for the API.
pub fn nat_pb(n: &NatRule, revision: i64) -> pb::NatRule {
    use pb::nat_rule::Kind;
    let range = |r: &Ipv4Range| pb::Ipv4Range {
        first: r.first.to_string(),
        last: r.last.to_string(),
    };
    let ports = |p: &(u16, u16)| pb::PortRange {
        first: u32::from(p.0),
        last: u32::from(p.1),
    };
    pb::NatRule {
        name: n.name.to_string(),
        vpc: n.vpc.to_string(),
        kind: Some(match &n.kind {
            NatKind::Static44 { inside, outside } => Kind::Static44(pb::Static44 {
                inside: inside.to_string(),
                outside: outside.to_string(),
            }),
            NatKind::Static66 { inside, outside } => Kind::Static66(pb::Static66 {
                inside: inside.to_string(),
                outside: outside.to_string(),
            }),
            NatKind::Napt44 { pool, ports: p } => Kind::Napt44(pb::Napt44 {
                pool: Some(range(pool)),
                ports: Some(ports(p)),
            }),
            NatKind::Nat64 {
                prefix,
                pool,
                ports: p,
            } => Kind::Nat64(pb::Nat64 {
                prefix: prefix.to_string(),
                pool: Some(range(pool)),
                ports: Some(ports(p)),
            }),
        }),
        revision,
    }
}

/// A meter from the API.
pub fn meter(m: &pb::Meter) -> R<Meter> {
    let name = name("meter", "name", &m.name)?;
    let o = &format!("meter {}", m.name);
    let profile = match &m.profile {
        None => return Err(missing(o, "profile")),
        Some(pb::meter::Profile::Srtcm(p)) => MeterProfile::SrTcm {
            cir: p.cir,
            cbs: p.cbs,
            ebs: p.ebs,
        },
        Some(pb::meter::Profile::Trtcm(p)) => MeterProfile::TrTcm {
            cir: p.cir,
            cbs: p.cbs,
            pir: p.pir,
            pbs: p.pbs,
        },
    };
    let target = match &m.target {
        None => return Err(missing(o, "target")),
        Some(pb::meter::Target::Vpc(v)) => MeterTarget::Vpc(self::name(o, "target.vpc", v)?),
        Some(pb::meter::Target::Route(k)) => {
            MeterTarget::Route(route_key(Some(k), "target.route")?)
        }
    };
    Ok(Meter {
        name,
        profile,
        target,
    })
}

/// A meter for the API.
pub fn meter_pb(m: &Meter, revision: i64) -> pb::Meter {
    pb::Meter {
        name: m.name.to_string(),
        profile: Some(match m.profile {
            MeterProfile::SrTcm { cir, cbs, ebs } => {
                pb::meter::Profile::Srtcm(pb::SrTcm { cir, cbs, ebs })
            }
            MeterProfile::TrTcm { cir, cbs, pir, pbs } => {
                pb::meter::Profile::Trtcm(pb::TrTcm { cir, cbs, pir, pbs })
            }
        }),
        target: Some(match &m.target {
            MeterTarget::Vpc(n) => pb::meter::Target::Vpc(n.to_string()),
            MeterTarget::Route(k) => pb::meter::Target::Route(route_key_pb(k)),
        }),
        revision,
    }
}

/// An object reference for the API.
pub fn object_ref(k: &ObjectKey) -> pb::ObjectRef {
    use pb::object_ref::Kind;
    pb::ObjectRef {
        kind: Some(match k {
            ObjectKey::Node => Kind::Node(true),
            ObjectKey::Vpc(n) => Kind::Vpc(n.to_string()),
            ObjectKey::Route(r) => Kind::Route(route_key_pb(r)),
            ObjectKey::Nat(n) => Kind::Nat(n.to_string()),
            ObjectKey::Meter(n) => Kind::Meter(n.to_string()),
        }),
    }
}

/// The machine-readable code of a software reason.
pub fn sw_reason_code(r: &SwReason) -> &'static str {
    match r {
        SwReason::Unsupported(_) => "unsupported",
        SwReason::TableFull => "table_full",
        SwReason::MetersExhausted => "meters_exhausted",
        SwReason::PrioritiesExhausted => "priorities_exhausted",
        SwReason::NoHardwarePath => "no_hardware_path",
        SwReason::NeedsState => "needs_state",
        SwReason::Ecmp => "ecmp",
        SwReason::Breakout => "breakout",
        SwReason::Unresolved(_) => "unresolved",
        SwReason::ShadowsSoftwareRoute(_) => "shadows_software_route",
        SwReason::MeterInSoftware => "meter_in_software",
        SwReason::VpcInSoftware => "vpc_in_software",
        SwReason::TeardownNotTrapped => "teardown_not_trapped",
        SwReason::SessionPath => "session_path",
        SwReason::SessionBudget => "session_budget",
    }
}

/// A status entry for the API.
pub fn status_pb(e: &StatusEntry) -> pb::ObjectStatus {
    let (placement, code, reason) = match &e.status {
        OffloadStatus::Offloaded => (pb::Placement::Offloaded, "", String::new()),
        OffloadStatus::Software { reason } => (
            pb::Placement::Software,
            sw_reason_code(reason),
            reason.to_string(),
        ),
        OffloadStatus::Failed { reason } => (
            pb::Placement::Failed,
            match reason {
                FailReason::SoftwareTableFull => "software_table_full",
                FailReason::Invalid(_) => "invalid",
            },
            reason.to_string(),
        ),
    };
    pb::ObjectStatus {
        dpu: e.dpu.to_string(),
        object: Some(object_ref(&e.object)),
        object_text: e.object.to_string(),
        placement: placement.into(),
        reason_code: code.to_owned(),
        reason,
    }
}

/// A route zebra sent that is on no DPU: no DPU, placement failed, its reason code and text
/// (`connected`, `no_port`, ..., or `invalid` with the model's error).
pub fn refused_pb(r: &crate::fpm::RefusedRoute) -> pb::ObjectStatus {
    let object = r.object();
    pb::ObjectStatus {
        dpu: String::new(),
        object: Some(object_ref(&object)),
        object_text: format!("{object} (from zebra)"),
        placement: pb::Placement::Failed.into(),
        reason_code: r.why.code().to_owned(),
        reason: r.why.to_string(),
    }
}

/// The API name of a capability profile.
pub fn caps_name(c: &CapsSource) -> &'static str {
    match c {
        CapsSource::Profile(Profile::Full) => "full",
        CapsSource::Profile(Profile::Partial) => "partial",
        CapsSource::Profile(Profile::TapLike) => "tap_like",
        CapsSource::Profile(Profile::None) => "none",
        CapsSource::Probed => "probed",
    }
}

/// A DPU for the API.
pub fn dpu_pb(d: &DpuInfo) -> pb::Dpu {
    pb::Dpu {
        id: d.record.id.to_string(),
        agent_version: d.record.agent_version.clone(),
        alive: d.alive,
        ports: d
            .record
            .ports
            .iter()
            .map(|p| pb::PortCaps {
                port: u32::from(p.port.0),
                profile: caps_name(&p.caps).to_owned(),
            })
            .collect(),
        ..pb::Dpu::default()
    }
}

fn boot_outcome_str(o: &BootOutcome) -> String {
    match o {
        BootOutcome::Normal => "normal".to_owned(),
        BootOutcome::Committed(s) => format!("committed {s}"),
        BootOutcome::Retry { slot, tries_left } => format!("retry {slot} ({tries_left} left)"),
        BootOutcome::RolledBack { failed, to, reason } => {
            format!("rolled back {failed} -> {to}: {reason}")
        }
    }
}

/// Adds a DPU's boot report to its API view.
pub fn boot_into(d: &mut pb::Dpu, r: &BootReport) {
    d.running_slot = r.running.to_string();
    d.active_slot = r.active.to_string();
    d.pending_slot = r.pending.map(|(s, _)| s.to_string()).unwrap_or_default();
    d.tries_left = r.pending.map(|(_, t)| u32::from(t)).unwrap_or(0);
    d.last_boot = boot_outcome_str(&r.last);
    d.slot_images = r
        .images
        .iter()
        .map(|(s, id)| (s.to_string(), images::hex::encode(id)))
        .collect();
}

/// A flash event for the API.
pub fn flash_event_pb(e: &FlashEvent) -> pb::FlashEvent {
    let mut out = pb::FlashEvent {
        dpu_id: e.dpu.clone(),
        image_id: e.image_id.clone(),
        chunk_server: e.chunk_server.clone(),
        ..pb::FlashEvent::default()
    };
    match &e.step {
        FlashStep::Queued => out.phase = "queued".into(),
        FlashStep::Dpu(FlashPhase::Started {
            slot,
            total,
            resumed,
        }) => {
            out.phase = "started".into();
            out.slot = slot.to_string();
            out.total = *total;
            out.resumed = *resumed;
        }
        FlashStep::Dpu(FlashPhase::Progress { done, total }) => {
            out.phase = "progress".into();
            out.done = *done;
            out.total = *total;
        }
        FlashStep::Dpu(FlashPhase::Flashed {
            slot,
            tries,
            fetches,
            refetches,
            resumed,
        }) => {
            out.phase = "flashed".into();
            out.slot = slot.to_string();
            out.tries = u32::from(*tries);
            out.fetches = *fetches;
            out.refetches = *refetches;
            out.resumed = *resumed;
        }
        FlashStep::Dpu(FlashPhase::Rebooting { slot }) => {
            out.phase = "rebooting".into();
            out.slot = slot.to_string();
        }
        FlashStep::Dpu(FlashPhase::Failed { failure, message }) => {
            out.phase = "failed".into();
            out.failure = crate::flashing::failure_str(*failure).into();
            out.message = message.clone();
        }
        FlashStep::Booted(r) => {
            out.phase = match r.last {
                BootOutcome::Committed(_) => "committed",
                BootOutcome::RolledBack { .. } => "rolled_back",
                _ => "booted",
            }
            .into();
            out.slot = r.running.to_string();
            out.tries = r.pending.map(|(_, t)| u32::from(t)).unwrap_or(0);
            out.message = boot_outcome_str(&r.last);
        }
        FlashStep::Lost(why) => {
            out.phase = "failed".into();
            out.failure = "link_lost".into();
            out.message = why.clone();
        }
    }
    out
}

/// The node from the API.
pub fn node(n: &pb::Node) -> R<Node> {
    let o = "node";
    Ok(Node {
        vtep: parse(o, "vtep", &n.vtep)?,
        router_mac: mac(o, "router_mac", &n.router_mac)?,
        uplinks: n
            .uplinks
            .iter()
            .enumerate()
            .map(|(i, p)| port(o, &format!("uplinks[{i}]"), *p))
            .collect::<R<_>>()?,
    })
}

/// The node for the API.
pub fn node_pb(n: &Node, revision: i64) -> pb::Node {
    pb::Node {
        vtep: n.vtep.to_string(),
        router_mac: n.router_mac.to_string(),
        uplinks: n.uplinks.iter().map(|p| u32::from(p.0)).collect(),
        revision,
    }
}

/// A pair member's report.
pub fn pair_pb(s: &flow_offload::wire::HaStatus) -> pb::PairState {
    use flow_offload::wire::PairRole;
    pb::PairState {
        role: match s.role {
            PairRole::Standby => "standby",
            PairRole::Active => "active",
            PairRole::Fenced => "fenced",
        }
        .to_owned(),
        epoch: s.epoch,
        ready: s.ready,
        lag_events: s.lag_events,
        lag_ms: s.lag_ms,
        sessions: s.sessions,
        peer_connected: s.peer_connected,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn mac_parse() {
        assert_eq!(
            parse_mac("02:00:00:00:0a:FF"),
            Some(MacAddr([2, 0, 0, 0, 10, 255]))
        );
        assert_eq!(parse_mac("02:00:00:00:0a"), None);
        assert_eq!(parse_mac("02:00:00:00:0a:ff:01"), None);
        assert_eq!(parse_mac("2:00:00:00:0a:ff"), None);
    }

    #[test]
    fn route_roundtrip_and_field_paths() {
        let r = pb::Route {
            key: Some(pb::RouteKey {
                table: 10,
                prefix: "10.0.0.0/8".into(),
            }),
            nexthops: vec![pb::Nexthop {
                kind: Some(pb::nexthop::Kind::Vxlan(pb::VxlanNexthop {
                    vni: 100,
                    remote_vtep: "192.0.2.1".into(),
                    router_mac: "02:00:00:00:00:01".into(),
                })),
            }],
            revision: 0,
            source: "static".into(),
        };
        let m = route(&r).unwrap();
        assert_eq!(route_pb(&m, 0), r);

        let mut bad = r.clone();
        if let Some(pb::nexthop::Kind::Vxlan(x)) = &mut bad.nexthops[0].kind {
            x.router_mac = "zz".into();
        }
        assert_eq!(
            route(&bad).unwrap_err().field,
            "nexthops[0].vxlan.router_mac"
        );
        let mut bad = r;
        bad.key.as_mut().unwrap().prefix = "10.0.0.1/8".into();
        let e = route(&bad).unwrap_err();
        assert_eq!(e.field, "key.prefix");
        assert!(matches!(e.problem, Problem::HostBitsSet { .. }));
    }
}
